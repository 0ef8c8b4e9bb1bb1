//! Builds the devices of a VM and owns what connects them to the guest.
//!
//! - The buses: port I/O and MMIO ([`devices::Bus`]); vCPU exits go there.
//! - The PCI root bus with a host bridge at 00:00.0, reached through
//!   mechanism #1 at ports 0xCF8-0xCFF and through ECAM at
//!   [`layout::PCI_ECAM_START`] (256 buses).
//! - virtio-pci functions, one per device of the configuration: a slot, a
//!   64-bit BAR, an MSI-X group (queues + 1 vectors), INTA# on the IOAPIC
//!   pin the platform's swizzle gives (the same one ACPI's `_PRT` lists),
//!   and one ioeventfd per queue notification address.
//! - BAR moves by the guest ([`PciBarRelocator`]).
//! - Host PCI functions passed through with VFIO (`vfio`): one container
//!   per VM mapping all guest RAM for DMA, BARs mmapped into KVM memory
//!   slots, MSI/MSI-X vectors and INTx handed to VFIO as irqfds.
//! - The legacy devices: 8250 serial on COM1, i8042 reset.
//! - The "vmm events" thread ([`EventLoop`]): INTx resampling and serial
//!   input.
//!
//! The PCI topology is logged at info level under the target
//! [`TOPOLOGY_LOG_TARGET`], which the default log filter shows.

mod event_loop;
mod legacy;
mod outputs;
mod relocation;
mod topology;
mod vfio;
mod virtio;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::{Bus, BusDevice, BusError};
use kvm_ioctls::VmFd;
use log::info;
use pci::{
    PciBdf, PciConfigIo, PciConfigMmio, PciDevice, PciError, PciRoot, ECAM_BUS_SIZE,
    PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};
use vm_allocator::{layout, AddressSpace, GuestRange, SystemAllocator, SystemAllocatorConfig};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::{PCI_INTX_GSIS, PCI_INTX_GSI_BASE};
use crate::config::OutputMode;
use crate::interrupt::{GsiRoutingTable, IrqBackend, IrqError, KvmIntx, KvmMsiInterruptGroup};

pub use event_loop::{EventLoop, EventLoopHandle, Subscriber};
pub use legacy::{SerialDevice, SerialInput};
pub use outputs::{Output, Outputs};
pub use relocation::{BarMapError, IoEventBackend, PciBarRelocator};
pub use topology::PciFunctionInfo;
pub use vfio::VfioSetupError;

/// `log` target of the PCI topology lines (and BAR moves).
pub const TOPOLOGY_LOG_TARGET: &str = "trellis::topology";

/// Why the devices of a VM could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// The guest address layout or an allocation failed.
    #[error("cannot allocate {what}")]
    Allocation {
        /// What was being allocated.
        what: String,
        /// The allocator's error.
        #[source]
        source: vm_allocator::Error,
    },
    /// A device could not be placed on a bus.
    #[error("cannot place the {what} on its bus")]
    Bus {
        /// The device.
        what: String,
        /// The bus' error.
        #[source]
        source: BusError,
    },
    /// The PCI root refused a function.
    #[error("cannot add {id} to the PCI bus")]
    Pci {
        /// The device ID.
        id: String,
        /// The PCI error.
        #[source]
        source: PciError,
    },
    /// A BAR could not be mapped (ioeventfds).
    #[error("cannot map BAR {index} of {id}")]
    BarMap {
        /// The device ID.
        id: String,
        /// BAR index.
        index: usize,
        /// What failed.
        #[source]
        source: BarMapError,
    },
    /// Interrupt setup (GSIs, MSI-X group, INTx) failed.
    #[error("cannot set up the interrupts of {id}")]
    Interrupts {
        /// The device ID.
        id: String,
        /// What failed.
        #[source]
        source: IrqError,
    },
    /// The irqfd of a legacy device could not be registered.
    #[error("cannot connect the {what} to GSI {gsi}")]
    LegacyIrq {
        /// The device.
        what: &'static str,
        /// Its GSI.
        gsi: u32,
        /// KVM's error.
        #[source]
        source: io::Error,
    },
    /// The output file of a console could not be opened.
    #[error("cannot open the output of the {what}")]
    Output {
        /// The device.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// The event loop thread could not be set up or started.
    #[error("cannot start the vmm events thread")]
    EventLoop(#[source] io::Error),
    /// The virtio-pci transport refused the device.
    #[error("cannot build the virtio-pci function of {id}")]
    Virtio {
        /// The device ID.
        id: String,
        /// The transport's error.
        #[source]
        source: virtio_devices::transport::VirtioPciError,
    },
    /// A queue notifier could not be duplicated for its ioeventfd.
    #[error("cannot set up the notifier of queue {queue} of {id}")]
    Notifier {
        /// The device ID.
        id: String,
        /// Queue index.
        queue: u16,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A virtio device could not be created (tap, output file...).
    #[error("cannot create {id}")]
    Device {
        /// The device ID.
        id: String,
        /// The device's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A host function could not be passed through.
    #[error("cannot pass {id} through")]
    Vfio {
        /// The device ID.
        id: String,
        /// What failed.
        #[source]
        source: VfioSetupError,
    },
}

/// One PCI function the manager added.
struct PciFunction {
    id: String,
    bdf: PciBdf,
    msix: Option<Arc<KvmMsiInterruptGroup>>,
    intx: Option<Arc<KvmIntx>>,
    /// Called on shutdown (stops device workers).
    reset: Option<Box<dyn FnMut() + Send>>,
}

/// The interrupts of a PCI function, handed to [`DeviceManager::add_pci_device`].
#[derive(Default)]
pub struct PciInterrupts {
    /// The MSI-X vectors.
    pub msix: Option<Arc<KvmMsiInterruptGroup>>,
    /// INTA#.
    pub intx: Option<Arc<KvmIntx>>,
}

/// One BAR of a function being added: its range (allocated by the caller)
/// and the ioeventfds inside it as (offset in the BAR, eventfd).
pub struct BarSetup {
    /// BAR register index.
    pub index: usize,
    /// Where it is mapped.
    pub range: GuestRange,
    /// Ioeventfds by offset in the BAR.
    pub ioevents: Vec<(u64, EventFd)>,
}

/// The devices of one VM; see the module documentation.
pub struct DeviceManager {
    irq: Arc<dyn IrqBackend>,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    allocator: Arc<Mutex<SystemAllocator>>,
    routing: Arc<GsiRoutingTable>,
    pci_root: Arc<Mutex<PciRoot>>,
    relocator: Arc<PciBarRelocator>,
    functions: Vec<PciFunction>,
    subscribers: Vec<Subscriber>,
    serial: Option<Arc<Mutex<SerialDevice>>>,
    events: Option<EventLoopHandle>,
    vfio: Option<vfio::VfioContext>,
}

impl DeviceManager {
    /// Devices for the KVM VM `vm` (with its in-kernel irqchip created)
    /// whose RAM ends at `ram_end` (see `vm_allocator::layout::RamLayout::end`).
    pub fn new(vm: Arc<VmFd>, ram_end: u64) -> Result<Self, DeviceManagerError> {
        let allocator = SystemAllocatorConfig::for_x86_64(ram_end)
            .and_then(|config| SystemAllocator::new(&config))
            .map_err(|source| DeviceManagerError::Allocation {
                what: "the guest address layout".to_string(),
                source,
            })?;
        Self::with_backends(vm.clone(), vm, allocator)
    }

    /// Like [`new`](Self::new) with explicit KVM backends and allocator
    /// (tests use recorders).
    pub fn with_backends(
        irq: Arc<dyn IrqBackend>,
        ioevents: Arc<dyn IoEventBackend>,
        mut allocator: SystemAllocator,
    ) -> Result<Self, DeviceManagerError> {
        // INTx pins are shared by design; keep them from being handed out
        // as exclusive legacy IRQs.
        for gsi in PCI_INTX_GSI_BASE..PCI_INTX_GSI_BASE + PCI_INTX_GSIS {
            allocator
                .reserve_legacy_irq(gsi)
                .map_err(|source| DeviceManagerError::Allocation {
                    what: format!("IOAPIC pin {gsi} for PCI INTx"),
                    source,
                })?;
        }
        let routing = Arc::new(GsiRoutingTable::new(irq.clone(), allocator.msi_gsis()));
        let allocator = Arc::new(Mutex::new(allocator));
        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let relocator = Arc::new(PciBarRelocator::new(
            io_bus.clone(),
            mmio_bus.clone(),
            allocator.clone(),
            ioevents,
        ));
        let pci_root = Arc::new(Mutex::new(PciRoot::new(Some(relocator.clone()))));
        io_bus
            .insert(
                Arc::new(Mutex::new(PciConfigIo::new(pci_root.clone()))),
                PCI_CONFIG_IO_PORT,
                PCI_CONFIG_IO_PORT_SIZE,
            )
            .map_err(|source| DeviceManagerError::Bus {
                what: "PCI configuration ports".to_string(),
                source,
            })?;
        // The whole fixed ECAM region decodes; only bus 0 is populated (and
        // announced in the MCFG), the other buses read as absent.
        let ecam = PciConfigMmio::new(
            pci_root.clone(),
            (layout::PCI_ECAM_SIZE / ECAM_BUS_SIZE) as u16,
        );
        let ecam_size = ecam.window_size();
        mmio_bus
            .insert(
                Arc::new(Mutex::new(ecam)),
                layout::PCI_ECAM_START,
                ecam_size,
            )
            .map_err(|source| DeviceManagerError::Bus {
                what: "PCI ECAM window".to_string(),
                source,
            })?;
        Ok(DeviceManager {
            irq,
            io_bus,
            mmio_bus,
            allocator,
            routing,
            pci_root,
            relocator,
            functions: Vec::new(),
            subscribers: Vec::new(),
            serial: None,
            events: None,
            vfio: None,
        })
    }

    /// The port I/O bus (vCPU `IoIn`/`IoOut` exits go here).
    pub fn io_bus(&self) -> &Arc<Bus> {
        &self.io_bus
    }

    /// The MMIO bus (vCPU `MmioRead`/`MmioWrite` exits go here).
    pub fn mmio_bus(&self) -> &Arc<Bus> {
        &self.mmio_bus
    }

    /// The guest address and GSI allocator.
    pub fn allocator(&self) -> &Arc<Mutex<SystemAllocator>> {
        &self.allocator
    }

    /// The VM's GSI routing table.
    pub fn routing_table(&self) -> &Arc<GsiRoutingTable> {
        &self.routing
    }

    /// The PCI root bus.
    pub fn pci_root(&self) -> &Arc<Mutex<PciRoot>> {
        &self.pci_root
    }

    /// The BAR mappings.
    pub fn relocator(&self) -> &Arc<PciBarRelocator> {
        &self.relocator
    }

    /// The PCI host bridge as ACPI describes it (DSDT `_CRS`, MCFG): ECAM
    /// for bus 0 and the allocator's two MMIO windows.
    pub fn pci_host_info(&self) -> crate::acpi::PciHostInfo {
        let allocator = self.lock_allocator();
        crate::acpi::PciHostInfo {
            ecam_base: layout::PCI_ECAM_START,
            last_bus: 0,
            mmio32: allocator.window(AddressSpace::Mmio32),
            mmio64: allocator.window(AddressSpace::Mmio64),
        }
    }

    /// The serial port, if there is one.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.serial.as_ref()
    }

    fn lock_allocator(&self) -> MutexGuard<'_, SystemAllocator> {
        self.allocator.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_root(&self) -> MutexGuard<'_, PciRoot> {
        self.pci_root.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds the serial port on COM1 (unless `serial` is off; with `tty`,
    /// stdin is its input) and the i8042, which writes `reset_evt` when the
    /// guest asks for a reset.
    pub fn add_legacy_devices(
        &mut self,
        serial: &Output,
        reset_evt: EventFd,
    ) -> Result<(), DeviceManagerError> {
        if *serial.mode() != OutputMode::Off {
            self.lock_allocator()
                .reserve_legacy_irq(layout::COM1_IRQ)
                .map_err(|source| DeviceManagerError::Allocation {
                    what: "IRQ 4 for the serial port".to_string(),
                    source,
                })?;
        }
        self.serial = legacy::add_serial(&self.io_bus, &*self.irq, serial)?;
        if let (Some(port), OutputMode::Tty) = (&self.serial, serial.mode()) {
            let input = SerialInput::new(port.clone()).map_err(DeviceManagerError::EventFd)?;
            self.subscribers.push(Arc::new(input));
        }
        legacy::add_i8042(&self.io_bus, reset_evt)
    }

    /// Adds the debug exit port (0xf4) that test guests use to end the VM
    /// with a status; `exit_evt` is the VM's power-off event.
    pub fn add_debug_exit(
        &mut self,
        exit_evt: EventFd,
    ) -> Result<devices::debug_exit::DebugExitStatus, DeviceManagerError> {
        legacy::add_debug_exit(&self.io_bus, exit_evt)
    }

    /// An MSI-X group of `vectors` vectors for device `id`.
    pub fn create_msix_group(
        &self,
        id: &str,
        vectors: usize,
    ) -> Result<Arc<KvmMsiInterruptGroup>, DeviceManagerError> {
        KvmMsiInterruptGroup::new(self.routing.clone(), self.allocator.clone(), vectors)
            .map(Arc::new)
            .map_err(|source| DeviceManagerError::Interrupts {
                id: id.to_string(),
                source,
            })
    }

    /// INTA# of the function in `slot`, on the pin the platform's swizzle
    /// (and ACPI `_PRT`) assigns; its resampling joins the event loop.
    pub fn create_intx(&mut self, id: &str, slot: u8) -> Result<Arc<KvmIntx>, DeviceManagerError> {
        let gsi = crate::arch::legacy_irq_for(slot, crate::arch::IntxPin::IntA);
        let intx = KvmIntx::new(self.irq.clone(), gsi)
            .map(Arc::new)
            .map_err(|source| DeviceManagerError::Interrupts {
                id: id.to_string(),
                source,
            })?;
        self.subscribers.push(intx.clone());
        Ok(intx)
    }

    /// Allocates a 64-bit MMIO BAR of `size` bytes (naturally aligned).
    pub fn allocate_bar(&self, id: &str, size: u64) -> Result<GuestRange, DeviceManagerError> {
        self.lock_allocator()
            .allocate(AddressSpace::Mmio64, size, size)
            .map_err(|source| DeviceManagerError::Allocation {
                what: format!("a {size:#x}-byte BAR for {id}"),
                source,
            })
    }

    /// The lowest free slot on the root bus.
    pub fn next_free_slot(&self) -> Result<PciBdf, DeviceManagerError> {
        self.lock_root()
            .next_free_slot()
            .map_err(|source| DeviceManagerError::Pci {
                id: "a new device".to_string(),
                source,
            })
    }

    /// Places `device` at `bdf`: each BAR on its bus and in the relocator
    /// (with its ioeventfds), the interrupt line register set to the INTx
    /// GSI, the function on the root bus. The BAR ranges must be allocated;
    /// on error they are freed again and nothing stays registered.
    /// `reset` runs on shutdown.
    pub fn add_pci_device<T: PciDevice + BusDevice + 'static>(
        &mut self,
        id: &str,
        bdf: PciBdf,
        device: Arc<Mutex<T>>,
        bars: Vec<BarSetup>,
        interrupts: PciInterrupts,
        reset: Option<Box<dyn FnMut() + Send>>,
    ) -> Result<(), DeviceManagerError> {
        let ranges: Vec<GuestRange> = bars.iter().map(|b| b.range).collect();
        let mut on_bus = Vec::new();
        if let Err(e) = self.place_pci_device(id, bdf, device, bars, &interrupts, &mut on_bus) {
            // The slot was free, so every mapping at `bdf` is this device's.
            self.relocator.unmap_device(bdf);
            for range in on_bus {
                let _ = self.relocator.bus(range.space()).remove(range.base());
            }
            let mut allocator = self.lock_allocator();
            for range in &ranges {
                if let Err(e) = allocator.free(range) {
                    log::error!("failed to free {range} of {id}: {e}");
                }
            }
            drop(allocator);
            if let Some(intx) = &interrupts.intx {
                self.forget_intx(intx);
            }
            return Err(e);
        }
        info!("added {id} at {bdf}");
        self.functions.push(PciFunction {
            id: id.to_string(),
            bdf,
            msix: interrupts.msix,
            intx: interrupts.intx,
            reset,
        });
        Ok(())
    }

    /// The steps of [`add_pci_device`](Self::add_pci_device); records the
    /// bus ranges it inserted in `on_bus` so a failure can undo exactly those.
    fn place_pci_device<T: PciDevice + BusDevice + 'static>(
        &mut self,
        id: &str,
        bdf: PciBdf,
        device: Arc<Mutex<T>>,
        bars: Vec<BarSetup>,
        interrupts: &PciInterrupts,
        on_bus: &mut Vec<GuestRange>,
    ) -> Result<(), DeviceManagerError> {
        let pci_error = |source| DeviceManagerError::Pci {
            id: id.to_string(),
            source,
        };
        if self.lock_root().device(bdf).is_some() {
            return Err(pci_error(PciError::SlotInUse(bdf.to_string())));
        }
        for bar in bars {
            self.relocator
                .bus(bar.range.space())
                .insert(device.clone(), bar.range.base(), bar.range.size())
                .map_err(|source| DeviceManagerError::Bus {
                    what: format!("BAR {} of {id}", bar.index),
                    source,
                })?;
            on_bus.push(bar.range);
            self.relocator
                .map_bar(bdf, bar.index, bar.range, bar.ioevents)
                .map_err(|source| DeviceManagerError::BarMap {
                    id: id.to_string(),
                    index: bar.index,
                    source,
                })?;
        }
        if let Some(intx) = &interrupts.intx {
            // Interrupt Line (0x3C): firmware's job on real hardware; the
            // GSI fits a byte (IOAPIC pins are below 24).
            let line = u8::try_from(intx.gsi()).unwrap_or(0xff);
            let mut dev = device.lock().unwrap_or_else(|e| e.into_inner());
            dev.write_config_register(0x3c / 4, 0, &[line]);
        }
        self.lock_root().add_device(bdf, device).map_err(pci_error)
    }

    /// Drops an INTx line from the event loop's subscribers (its irqfd goes
    /// when the last reference does).
    fn forget_intx(&mut self, intx: &Arc<KvmIntx>) {
        let target = Arc::as_ptr(intx) as *const ();
        self.subscribers
            .retain(|s| Arc::as_ptr(s) as *const () != target);
    }

    /// Starts the "vmm events" thread with the subscribers gathered so
    /// far (INTx resamplers, serial input). Call once, after adding the
    /// devices; it stops when the manager is dropped.
    pub fn start_event_loop(&mut self) -> Result<(), DeviceManagerError> {
        let mut event_loop = EventLoop::new().map_err(DeviceManagerError::EventLoop)?;
        for subscriber in self.subscribers.drain(..) {
            event_loop.add(subscriber);
        }
        self.events = Some(event_loop.start().map_err(DeviceManagerError::EventLoop)?);
        Ok(())
    }

    /// Stops the event loop and resets every device (stopping their
    /// workers). Also done on drop.
    pub fn shutdown(&mut self) {
        if let Some(events) = self.events.take() {
            events.stop();
        }
        for function in &mut self.functions {
            if let Some(mut reset) = function.reset.take() {
                reset();
            }
        }
        // After the resets: no passed-through device does DMA any more.
        if let Some(mut vfio) = self.vfio.take() {
            vfio.shutdown();
        }
    }
}

impl Drop for DeviceManager {
    fn drop(&mut self) {
        self.shutdown();
        // The buses hold the PCI root (through the configuration ports and
        // ECAM), which holds the relocator, which holds the buses: without
        // this the devices, and all they hold (taps, VFIO groups, guest RAM,
        // the VM fd), would outlive the manager, and a VM rebuilt after a
        // guest reset could not have them again.
        self.io_bus.clear();
        self.mmio_bus.clear();
    }
}
