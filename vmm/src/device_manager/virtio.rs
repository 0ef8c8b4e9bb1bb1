//! virtio devices as PCI functions.

use std::sync::{Arc, Mutex};

use pci::{IntxInterrupt, MsiInterruptGroup, PciBdf};
use virtio_devices::block::{Block, BlockConfig};
use virtio_devices::console::{Console, ConsoleInput};
use virtio_devices::net::{Net, NetConfig as NetDeviceConfig};
use virtio_devices::rng::Rng;
use virtio_devices::transport::{
    msix_vector_count, VirtioPciDevice, VIRTIO_PCI_BAR_ALIGNMENT, VIRTIO_PCI_BAR_SIZE,
};
use virtio_devices::{GuestMemoryMmapAtomic, VirtioDevice};

use super::{BarSetup, DeviceManager, DeviceManagerError, Output, PciInterrupts};
use crate::config::{OutputMode, VmConfig};

/// Wraps a device constructor's error.
fn device_error(
    id: &str,
    source: impl std::error::Error + Send + Sync + 'static,
) -> DeviceManagerError {
    DeviceManagerError::Device {
        id: id.to_string(),
        source: Box::new(source),
    }
}

// The BAR is allocated with its size as alignment (natural alignment);
// the transport asks for exactly that.
const _: () = assert!(VIRTIO_PCI_BAR_ALIGNMENT == VIRTIO_PCI_BAR_SIZE);

impl DeviceManager {
    /// Creates the devices `config` asks for and adds them to the PCI bus,
    /// in command line order by kind: disks, NICs, rng, console (writing
    /// to `console`, made from `config.console`). Checks the host
    /// functions of `--device` before creating anything (they are added by
    /// [`DeviceManager::add_vfio_devices`]).
    pub fn create_devices(
        &mut self,
        config: &VmConfig,
        console: &Output,
        memory: GuestMemoryMmapAtomic,
    ) -> Result<(), DeviceManagerError> {
        self.check_vfio(config)?;
        for disk in &config.disks {
            let device = Block::new(BlockConfig {
                read_only: disk.readonly,
                lock: disk.lock,
                serial: Some(disk.id.clone()),
                ..BlockConfig::new(&disk.path)
            })
            .map_err(|e| device_error(&disk.id, e))?;
            self.add_virtio_device(&disk.id, Arc::new(Mutex::new(device)), memory.clone())?;
        }
        for net in &config.nets {
            let device = Net::new(NetDeviceConfig {
                tap_name: net.tap.clone(),
                mac: net.mac,
                ..Default::default()
            })
            .map_err(|e| device_error(&net.id, e))?;
            self.add_virtio_device(&net.id, Arc::new(Mutex::new(device)), memory.clone())?;
        }
        if let Some(rng) = &config.rng {
            let device = Rng::new(rng.src.clone()).map_err(|e| device_error("rng", e))?;
            self.add_virtio_device("rng", Arc::new(Mutex::new(device)), memory.clone())?;
        }
        let console = match console.mode() {
            OutputMode::Off => None,
            OutputMode::Tty => {
                let input = ConsoleInput::stdin().map_err(|e| device_error("console", e))?;
                Some(Console::with_stdout(Some(input)))
            }
            OutputMode::File(_) => console
                .file()
                .map_err(|source| DeviceManagerError::Output {
                    what: "console",
                    source,
                })?
                .map(|file| Console::with_file(file, None)),
        };
        if let Some(console) = console {
            self.add_virtio_device("console", Arc::new(Mutex::new(console)), memory)?;
        }
        Ok(())
    }

    /// Adds `device` as a virtio-pci function in the next free slot, with
    /// its BAR in the 64-bit window, an MSI-X vector per queue plus one,
    /// INTA#, and an ioeventfd per queue. Returns where it went.
    pub fn add_virtio_device(
        &mut self,
        id: &str,
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: GuestMemoryMmapAtomic,
    ) -> Result<PciBdf, DeviceManagerError> {
        let bdf = self.next_free_slot()?;
        let vectors = msix_vector_count(&*device.lock().unwrap_or_else(|e| e.into_inner()));
        let msix = self.create_msix_group(id, usize::from(vectors))?;
        let intx = self.create_intx(id, bdf.device())?;
        let bar = self.allocate_bar(id, VIRTIO_PCI_BAR_SIZE)?;

        let transport = VirtioPciDevice::new(
            id.to_string(),
            device,
            memory,
            msix.clone() as Arc<dyn MsiInterruptGroup>,
            Some(intx.clone() as Arc<dyn IntxInterrupt>),
            bar.base(),
        );
        let transport = match transport {
            Ok(t) => t,
            Err(e) => {
                self.release(bar, &intx);
                return Err(DeviceManagerError::Virtio {
                    id: id.to_string(),
                    source: e,
                });
            }
        };
        let mut ioevents = Vec::new();
        for (addr, fd, queue) in transport.ioeventfds(bar.base()) {
            match fd.try_clone() {
                Ok(fd) => ioevents.push((addr - bar.base(), fd)),
                Err(e) => {
                    self.release(bar, &intx);
                    return Err(DeviceManagerError::Notifier {
                        id: id.to_string(),
                        queue,
                        source: e,
                    });
                }
            }
        }
        let transport = Arc::new(Mutex::new(transport));
        let for_reset = transport.clone();
        let reset = Box::new(move || {
            for_reset.lock().unwrap_or_else(|e| e.into_inner()).reset();
        });
        let bars = vec![BarSetup {
            index: 0,
            range: bar,
            ioevents,
        }];
        let interrupts = PciInterrupts {
            msix: Some(msix),
            intx: Some(intx),
        };
        self.add_pci_device(id, bdf, transport, bars, interrupts, Some(reset))?;
        Ok(bdf)
    }

    /// Undoes the allocations of a virtio device that could not be built.
    fn release(&mut self, bar: vm_allocator::GuestRange, intx: &Arc<super::KvmIntx>) {
        if let Err(e) = self
            .allocator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .free(&bar)
        {
            log::error!("failed to free {bar}: {e}");
        }
        self.forget_intx(intx);
    }
}
