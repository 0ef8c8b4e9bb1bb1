//! Host PCI functions passed through with VFIO (`--device path=...`).
//!
//! One VFIO container per VM holds every function's IOMMU group; it is
//! registered with KVM (the KVM VFIO device) and maps all guest RAM for
//! DMA at guest-physical addresses, so a passed-through device's DMA lands
//! in guest RAM and nowhere else. Each function is reset, probed, given
//! BARs from the allocator, MSI and MSI-X vector groups from the VM's one
//! routing-table owner, and INTx on the IOAPIC pin of its slot's INTA#
//! (a resampling irqfd whose eventfds go straight to VFIO). The device
//! model ([`pci::vfio::VfioPciDevice`]) does the rest; KVM memory slots for
//! its BARs come from the [`MemoryManager`].
//!
//! At shutdown every function has its interrupts stopped and its slots
//! removed, and is reset; then the DMA mappings go.

mod host;
#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_create_device, kvm_device_type_KVM_DEV_TYPE_VFIO};
use kvm_ioctls::VmFd;
use log::{info, warn};
use pci::vfio::{
    BarInfo, GuestMemoryMapper, IntxEventFds, VfioBackend, VfioDeviceInfo, VfioPciDevice,
    VfioResources,
};
use pci::{MsiInterruptGroup, PciBarRegionType, ROM_BAR_INDEX};
use vfio_ioctls::{VfioContainer, VfioDeviceFd};
use vm_allocator::{AddressSpace, GuestRange};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{BarSetup, DeviceManager, DeviceManagerError, PciInterrupts, TOPOLOGY_LOG_TARGET};
use crate::config::{VfioDeviceConfig, VmConfig};
use crate::interrupt::{IrqBackend, KvmMsiInterruptGroup};
use crate::memory::{GuestMemoryMmap, MemoryManager};

use host::{check_host_function, HostVfioDevice};

/// Why a host function could not be passed through.
#[derive(Debug, thiserror::Error)]
pub enum VfioSetupError {
    /// The sysfs path names no PCI function.
    #[error("{0}: no such PCI function on this host")]
    NoSuchDevice(PathBuf),
    /// The function is not bound to vfio-pci.
    #[error(
        "{path} is bound to {driver}, not to vfio-pci (unbind it, then \
         `echo vfio-pci > {path}/driver_override` and bind it to vfio-pci)",
        path = .path.display()
    )]
    NotBoundToVfio {
        /// The sysfs path.
        path: PathBuf,
        /// Its driver, or "no driver".
        driver: String,
    },
    /// The function has no IOMMU group.
    #[error(
        "{} has no IOMMU group: the host IOMMU is off (boot with intel_iommu=on \
         or amd_iommu=on) or the device is not behind one",
        .0.display()
    )]
    NoIommuGroup(PathBuf),
    /// /dev/vfio/vfio is missing.
    #[error("/dev/vfio/vfio does not exist: load the vfio-pci module")]
    NoVfio,
    /// /dev/vfio/N is missing.
    #[error("/dev/vfio/{0} does not exist although the device is bound to vfio-pci")]
    NoGroupNode(u32),
    /// Another member of the IOMMU group is held by a host driver.
    #[error("IOMMU group {group} is not viable: {blocking}; every device in the group must be bound to vfio-pci or to no driver")]
    GroupNotViable {
        /// The group.
        group: u32,
        /// The members in the way and their drivers.
        blocking: String,
    },
    /// VFIO refused to open the function.
    #[error("cannot open {} through VFIO", .path.display())]
    Open {
        /// The sysfs path.
        path: PathBuf,
        /// VFIO's error.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// VFIO_DEVICE_GET_INFO or duplicating the device fd failed.
    #[error("cannot query {} through VFIO", .path.display())]
    DeviceInfo {
        /// The sysfs path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The VFIO container could not be created.
    #[error("cannot create the VFIO container (/dev/vfio/vfio, type-1 IOMMU)")]
    Container(#[source] vfio_ioctls::VfioError),
    /// KVM_CREATE_DEVICE (KVM_DEV_TYPE_VFIO) failed.
    #[error("cannot create the KVM VFIO device")]
    KvmDevice(#[source] kvm_ioctls::Error),
    /// Mapping guest RAM into the IOMMU failed.
    #[error(
        "cannot map guest RAM for device DMA (VFIO_IOMMU_MAP_DMA; is RLIMIT_MEMLOCK large enough?)"
    )]
    DmaMap(#[source] vfio_ioctls::VfioError),
    /// The device model refused the function.
    #[error("cannot present the function to the guest")]
    Model(#[source] pci::vfio::VfioPciError),
}

/// The VM's VFIO state: the container, and what shutdown must undo.
pub(crate) struct VfioContext {
    container: Arc<VfioContainer>,
    /// Guest RAM as it was mapped for DMA (kept alive until unmapped).
    dma_memory: Option<GuestMemoryMmap>,
    /// INTx irqfds, unregistered when dropped.
    intx: Vec<VfioIntxLine>,
}

impl VfioContext {
    /// A container registered with KVM's VFIO device.
    fn new(vm: &VmFd) -> Result<Self, VfioSetupError> {
        let mut device = kvm_create_device {
            type_: kvm_device_type_KVM_DEV_TYPE_VFIO,
            fd: 0,
            flags: 0,
        };
        let kvm_vfio = vm
            .create_device(&mut device)
            .map_err(VfioSetupError::KvmDevice)?;
        let handle = Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio));
        let container = VfioContainer::new(Some(handle)).map_err(VfioSetupError::Container)?;
        Ok(VfioContext {
            container: Arc::new(container),
            dma_memory: None,
            intx: Vec::new(),
        })
    }

    /// Maps all guest RAM for DMA (once: every group of the container
    /// shares the mappings). Needs a group in the container first.
    fn map_dma(&mut self, memory: &MemoryManager) -> Result<(), VfioSetupError> {
        if self.dma_memory.is_some() {
            return Ok(());
        }
        let mem: GuestMemoryMmap =
            (*vm_memory::GuestAddressSpace::memory(&memory.guest_memory())).clone();
        // SAFETY: guest RAM stays mapped for as long as `dma_memory` holds
        // its regions, and it is unmapped from the IOMMU in `shutdown`
        // before they are released. The VMM only touches guest RAM through
        // vm-memory's volatile accessors, never through Rust references.
        unsafe { self.container.vfio_map_guest_memory(&mem) }.map_err(VfioSetupError::DmaMap)?;
        info!("VFIO: guest RAM mapped for DMA");
        self.dma_memory = Some(mem);
        Ok(())
    }

    /// Unmaps guest RAM from the IOMMU; the functions were stopped and
    /// reset first (their reset hooks run before this).
    pub(crate) fn shutdown(&mut self) {
        if let Some(mem) = self.dma_memory.take() {
            if let Err(e) = self.container.vfio_unmap_guest_memory(&mem) {
                warn!("VFIO: cannot unmap guest RAM from the IOMMU: {e}");
            }
        }
    }
}

/// An INTx line for VFIO: a KVM irqfd with resampling on an IOAPIC pin,
/// its two eventfds handed to VFIO (trigger, and unmask on EOI).
struct VfioIntxLine {
    backend: Arc<dyn IrqBackend>,
    gsi: u32,
    trigger: EventFd,
    resample: EventFd,
}

impl VfioIntxLine {
    fn new(backend: Arc<dyn IrqBackend>, gsi: u32) -> io::Result<Self> {
        let trigger = EventFd::new(EFD_NONBLOCK)?;
        let resample = EventFd::new(EFD_NONBLOCK)?;
        backend.register_irqfd_with_resample(&trigger, &resample, gsi)?;
        Ok(VfioIntxLine {
            backend,
            gsi,
            trigger,
            resample,
        })
    }

    fn fds(&self) -> io::Result<IntxEventFds> {
        Ok(IntxEventFds {
            trigger: self.trigger.try_clone()?,
            resample: self.resample.try_clone()?,
        })
    }
}

impl Drop for VfioIntxLine {
    fn drop(&mut self) {
        if let Err(e) = self.backend.unregister_irqfd(&self.trigger, self.gsi) {
            warn!(
                "VFIO: cannot unregister the INTx irqfd of GSI {}: {e}",
                self.gsi
            );
        }
    }
}

/// KVM memory slots for BAR mappings.
struct SlotMapper(Arc<MemoryManager>);

impl GuestMemoryMapper for SlotMapper {
    unsafe fn map(&self, guest_addr: u64, size: u64, host_addr: u64) -> io::Result<u32> {
        // SAFETY: forwarded from our caller's contract (the host range
        // stays mapped until `unmap`).
        unsafe { self.0.add_slot(guest_addr, size, host_addr, 0) }.map_err(io::Error::other)
    }

    fn unmap(&self, slot: u32) -> io::Result<()> {
        self.0.remove_slot(slot).map_err(io::Error::other)
    }
}

fn host_page_size() -> u64 {
    // SAFETY: sysconf reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

impl DeviceManager {
    /// Checks the host functions `config` passes through before anything
    /// is built, so setup mistakes come out as one clear error.
    pub fn check_vfio(&self, config: &VmConfig) -> Result<(), DeviceManagerError> {
        for dev in &config.vfio_devices {
            check_host_function(&dev.path).map_err(|source| DeviceManagerError::Vfio {
                id: dev.id.clone(),
                source,
            })?;
        }
        Ok(())
    }

    /// Passes the `--device` functions of `config` through, each in the
    /// next free slot. `vm` registers the container with KVM; `memory`
    /// provides guest RAM for DMA and the slots for BAR mappings.
    pub fn add_vfio_devices(
        &mut self,
        config: &VmConfig,
        vm: &VmFd,
        memory: &Arc<MemoryManager>,
    ) -> Result<(), DeviceManagerError> {
        if config.vfio_devices.is_empty() {
            return Ok(());
        }
        self.check_vfio(config)?;
        let first = &config.vfio_devices[0].id;
        let ctx = VfioContext::new(vm).map_err(|source| DeviceManagerError::Vfio {
            id: first.clone(),
            source,
        })?;
        self.vfio = Some(ctx);
        for dev in &config.vfio_devices {
            self.add_vfio_device(dev, memory)?;
        }
        Ok(())
    }

    fn add_vfio_device(
        &mut self,
        dev: &VfioDeviceConfig,
        memory: &Arc<MemoryManager>,
    ) -> Result<(), DeviceManagerError> {
        let id = dev.id.as_str();
        let vfio_err = |source| DeviceManagerError::Vfio {
            id: id.to_string(),
            source,
        };
        let Some(ctx) = self.vfio.as_mut() else {
            return Ok(());
        };
        let backend =
            Arc::new(HostVfioDevice::open(&dev.path, ctx.container.clone()).map_err(vfio_err)?);
        ctx.map_dma(memory).map_err(vfio_err)?;
        match backend.reset() {
            Ok(true) => info!("{id}: reset"),
            Ok(false) => info!("{id}: {} has no reset method", dev.address),
            Err(e) => warn!("{id}: reset of {} failed: {e}", dev.address),
        }
        let info =
            VfioPciDevice::probe(&*backend).map_err(|e| vfio_err(VfioSetupError::Model(e)))?;
        info!(
            target: TOPOLOGY_LOG_TARGET,
            "{id}: host {} [{:04x}:{:04x}], BARs {:x?}, ROM {:x?}, MSI {:?}, MSI-X {:?}, INTx {}",
            dev.address,
            info.vendor_id,
            info.device_id,
            info.bars
                .iter()
                .map(|b| (b.index, b.size))
                .collect::<Vec<_>>(),
            info.rom.map(|r| r.size),
            info.msi_vectors,
            info.msix_vectors,
            info.has_intx
        );
        let bdf = self.next_free_slot()?;
        let ranges = self.allocate_vfio_bars(id, info.bars.iter().chain(info.rom.iter()))?;
        let setup = self.vfio_resources(id, bdf.device(), &info, &ranges, memory);
        let (res, msix_group, intx_line) = match setup {
            Ok(s) => s,
            Err(e) => {
                self.free_ranges(id, &ranges);
                return Err(e);
            }
        };
        let device = match VfioPciDevice::new(id, backend, info, res) {
            Ok(d) => Arc::new(Mutex::new(d)),
            Err(e) => {
                self.free_ranges(id, &ranges);
                return Err(vfio_err(VfioSetupError::Model(e)));
            }
        };
        log_direct_map(id, &device.lock().unwrap_or_else(|e| e.into_inner()));
        let for_reset = device.clone();
        let reset_id = id.to_string();
        let reset = Box::new(move || {
            let mut device = for_reset.lock().unwrap_or_else(|e| e.into_inner());
            let stats = device.access_stats();
            // One line the rig checks: with BARs direct-mapped, the guest's
            // BAR accesses never reach the VMM, except the MSI-X table.
            info!(
                target: TOPOLOGY_LOG_TARGET,
                "vfio-stats id={reset_id} forwarded={} msix={} direct_mapped={:#x}",
                stats.forwarded,
                stats.msix,
                device.mmapped_areas().iter().map(|(_, c)| c.size).sum::<u64>()
            );
            device.shutdown();
        });
        let bars = ranges
            .iter()
            .map(|&(index, range)| BarSetup {
                index,
                range,
                ioevents: Vec::new(),
            })
            .collect();
        // The topology lists these vectors as MSI-X: only give it those.
        let interrupts = PciInterrupts {
            msix: msix_group,
            intx: None,
        };
        self.add_pci_device(id, bdf, device, bars, interrupts, Some(reset))?;
        if let Some(ctx) = self.vfio.as_mut() {
            ctx.intx.extend(intx_line);
        }
        Ok(())
    }

    /// Allocates every BAR of `bars` (the ROM included) in its address
    /// space, naturally aligned, memory BARs at least page aligned (so
    /// their slots can be). All or nothing.
    fn allocate_vfio_bars<'a>(
        &self,
        id: &str,
        bars: impl Iterator<Item = &'a BarInfo>,
    ) -> Result<Vec<(usize, GuestRange)>, DeviceManagerError> {
        let page = host_page_size();
        let mut ranges = Vec::new();
        for bar in bars {
            let (space, align) = match bar.region_type {
                PciBarRegionType::IoRegion => (AddressSpace::Io, bar.size),
                PciBarRegionType::Memory32BitRegion => (AddressSpace::Mmio32, bar.size.max(page)),
                PciBarRegionType::Memory64BitRegion => (AddressSpace::Mmio64, bar.size.max(page)),
            };
            let what = if bar.index == ROM_BAR_INDEX {
                "expansion ROM".to_string()
            } else {
                format!("BAR {}", bar.index)
            };
            let range = self
                .lock_allocator()
                .allocate(space, bar.size, align)
                .map_err(|source| DeviceManagerError::Allocation {
                    what: format!("{what} ({:#x} bytes) of {id}", bar.size),
                    source,
                });
            match range {
                Ok(r) => ranges.push((bar.index, r)),
                Err(e) => {
                    self.free_ranges(id, &ranges);
                    return Err(e);
                }
            }
        }
        Ok(ranges)
    }

    fn free_ranges(&self, id: &str, ranges: &[(usize, GuestRange)]) {
        let mut allocator = self.lock_allocator();
        for (_, range) in ranges {
            if let Err(e) = allocator.free(range) {
                log::error!("failed to free {range} of {id}: {e}");
            }
        }
    }

    /// Interrupts and the rest of what the device model needs.
    #[allow(clippy::type_complexity)]
    fn vfio_resources(
        &mut self,
        id: &str,
        slot: u8,
        info: &VfioDeviceInfo,
        ranges: &[(usize, GuestRange)],
        memory: &Arc<MemoryManager>,
    ) -> Result<
        (
            VfioResources,
            Option<Arc<KvmMsiInterruptGroup>>,
            Option<VfioIntxLine>,
        ),
        DeviceManagerError,
    > {
        let msi = match info.msi_vectors {
            Some(n) => Some(self.create_msix_group(id, usize::from(n))?),
            None => None,
        };
        let msix = match info.msix_vectors {
            Some(n) => Some(self.create_msix_group(id, usize::from(n))?),
            None => None,
        };
        let gsi = crate::arch::legacy_irq_for(slot, crate::arch::IntxPin::IntA);
        let intx_line = if info.has_intx {
            match VfioIntxLine::new(self.irq.clone(), gsi) {
                Ok(line) => Some(line),
                Err(e) => {
                    warn!("{id}: INTx unavailable (GSI {gsi}): {e}");
                    None
                }
            }
        } else {
            None
        };
        let intx = match intx_line.as_ref().map(VfioIntxLine::fds) {
            Some(Ok(fds)) => Some(fds),
            Some(Err(e)) => return Err(DeviceManagerError::EventFd(e)),
            None => None,
        };
        let windows = {
            let allocator = self.lock_allocator();
            [AddressSpace::Mmio32, AddressSpace::Mmio64]
                .into_iter()
                .map(|space| {
                    let w = allocator.window(space);
                    (w.base, w.base.saturating_add(w.size))
                })
                .collect()
        };
        let res = VfioResources {
            bar_addresses: ranges.iter().map(|&(i, r)| (i, r.base())).collect(),
            msi_group: msi.clone().map(|g| g as Arc<dyn MsiInterruptGroup>),
            msix_group: msix.clone().map(|g| g as Arc<dyn MsiInterruptGroup>),
            intx,
            intx_line: u8::try_from(gsi).unwrap_or(0xff),
            mapper: Arc::new(SlotMapper(memory.clone())),
            mmio_windows: windows,
            page_size: host_page_size(),
        };
        if let Some(group) = &msi {
            info!(target: TOPOLOGY_LOG_TARGET, "{id}: MSI {} vector(s) on GSIs {:?}", group.len(), group.gsis());
        }
        if intx_line.is_some() {
            info!(target: TOPOLOGY_LOG_TARGET, "{id}: INTA# on GSI {gsi} (VFIO INTx, resampled by KVM)");
        }
        Ok((res, msix, intx_line))
    }
}

/// Logs which BAR areas go straight to the device.
fn log_direct_map(id: &str, device: &VfioPciDevice) {
    let areas: Vec<String> = device
        .mmapped_areas()
        .iter()
        .map(|(bar, c)| format!("BAR{bar}+{:#x}..{:#x}", c.offset, c.offset + c.size))
        .collect();
    info!(
        target: TOPOLOGY_LOG_TARGET,
        "{id}: direct-mapped {}",
        if areas.is_empty() { "nothing".to_string() } else { areas.join(", ") }
    );
}
