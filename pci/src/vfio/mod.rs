//! VFIO passthrough: a host PCI function presented to the guest as one of
//! its own, with the parts the VMM must own virtualised.
//!
//! What the guest sees, and where it comes from:
//!
//! - Configuration space ([`config`]): read from and written to the host
//!   function through the VFIO configuration region, except the BARs and
//!   the expansion ROM BAR (a shadow [`PciConfiguration`] holding the
//!   addresses the VMM allocated, with sizing and move detection), the
//!   interrupt line and pin, the capability pointers (rewritten so that
//!   capabilities the VMM cannot support are left out of the chain), and
//!   the MSI and MSI-X capabilities (emulated with [`MsiConfig`] and
//!   [`MsixConfig`]).
//! - BARs ([`bars`]): the parts VFIO lets us mmap go straight into the
//!   guest as memory slots, following the BAR when the guest moves it;
//!   the pages holding the MSI-X table and PBA stay trapped (only those
//!   pages: the rest of that BAR is mapped). Everything trapped that is not
//!   the table or PBA is forwarded with VFIO region reads and writes, I/O
//!   BARs included.
//! - Interrupts (`irq`): each MSI or MSI-X vector is an eventfd of an
//!   [`MsiInterruptGroup`] (a KVM irqfd in the VMM) handed to VFIO, so the
//!   host interrupt reaches the guest without the VMM; INTx is an eventfd
//!   pair (trigger, and unmask on EOI) handed to VFIO while the guest uses
//!   neither MSI nor MSI-X.
//!
//! The VFIO device itself is behind [`VfioBackend`] and guest memory slots
//! behind [`GuestMemoryMapper`], so all of this runs in tests against a fake
//! device with a fake configuration space and regions.
//!
//! [`PciConfiguration`]: crate::PciConfiguration
//! [`MsiConfig`]: crate::MsiConfig
//! [`MsixConfig`]: crate::MsixConfig
//! [`MsiInterruptGroup`]: crate::MsiInterruptGroup

pub mod bars;
pub mod config;
mod device;
mod irq;

#[cfg(test)]
mod tests;

use std::io;

use vmm_sys_util::eventfd::EventFd;

pub use bars::{mmap_chunks, BarInfo, MmapChunk};
pub use config::{ConfigLayout, KEPT_CAPABILITIES, KEPT_EXTENDED_CAPABILITIES};
pub use device::{VfioAccessStats, VfioDeviceInfo, VfioPciDevice, VfioResources};
pub use irq::IntxEventFds;

/// VFIO region index of BAR 0 (BARs 1-5 follow).
pub const VFIO_PCI_BAR0_REGION_INDEX: u32 = 0;
/// VFIO region index of the expansion ROM.
pub const VFIO_PCI_ROM_REGION_INDEX: u32 = 6;
/// VFIO region index of the configuration space.
pub const VFIO_PCI_CONFIG_REGION_INDEX: u32 = 7;

/// The interrupt kinds of a vfio-pci device (VFIO IRQ indices).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VfioIrqIndex {
    /// Legacy INTx (index 0).
    Intx = 0,
    /// MSI (index 1).
    Msi = 1,
    /// MSI-X (index 2).
    Msix = 2,
}

/// One area of a region that may be mmapped, as an offset and size in
/// the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapArea {
    /// Offset in the region.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

/// What VFIO says about one region of the device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VfioRegionInfo {
    /// Size in bytes (0: the region, e.g. a BAR, does not exist).
    pub size: u64,
    /// Reads are allowed.
    pub readable: bool,
    /// Writes are allowed.
    pub writable: bool,
    /// Which parts may be mmapped: empty if none. Without a sparse mmap
    /// capability this is the whole region.
    pub mmap_areas: Vec<MmapArea>,
}

/// A host mapping of (part of) a device region, unmapped when dropped.
///
/// # Safety
///
/// Implementations promise that `host_addr()..host_addr() + size()` is a
/// mapping in this process that stays valid until the value is dropped: the
/// VMM hands it to KVM as guest memory.
pub unsafe trait HostMapping: Send + Sync {
    /// First host virtual address of the mapping.
    fn host_addr(&self) -> u64;
    /// Size of the mapping in bytes.
    fn size(&self) -> u64;
}

/// The VFIO operations the device model needs, implemented by the VMM over
/// the kernel's VFIO device file and by fakes in tests.
pub trait VfioBackend: Send + Sync {
    /// Information about region `index`, `None` if the device has no such
    /// region.
    fn region_info(&self, index: u32) -> Option<VfioRegionInfo>;
    /// Reads `data.len()` bytes at `offset` in region `index`.
    fn read_region(&self, index: u32, offset: u64, data: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset` in region `index`.
    fn write_region(&self, index: u32, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Number of interrupts of kind `index` the device has (0: none).
    fn irq_count(&self, index: VfioIrqIndex) -> u32;
    /// Makes interrupt `i` of kind `index` signal `fds[i]`
    /// (`VFIO_IRQ_SET_ACTION_TRIGGER` with eventfds), enabling that kind.
    fn enable_irq(&self, index: VfioIrqIndex, fds: &[&EventFd]) -> io::Result<()>;
    /// Disables every interrupt of kind `index`.
    fn disable_irq(&self, index: VfioIrqIndex) -> io::Result<()>;
    /// Makes a write to `fd` unmask INTx (`VFIO_IRQ_SET_ACTION_UNMASK`),
    /// which VFIO masks each time it fires.
    fn set_intx_unmask_fd(&self, fd: &EventFd) -> io::Result<()>;
    /// Resets the function: `Ok(true)` if it was reset, `Ok(false)` if it
    /// has no reset method.
    fn reset(&self) -> io::Result<bool>;
    /// Maps `size` bytes at `offset` of region `index` (both page aligned).
    fn mmap_region(&self, index: u32, offset: u64, size: u64) -> io::Result<Box<dyn HostMapping>>;
}

/// Guest memory slots for mmapped BAR areas (KVM memory slots in the VMM).
pub trait GuestMemoryMapper: Send + Sync {
    /// Maps `size` bytes of host memory at `host_addr` into the guest at
    /// `guest_addr` and returns a slot handle.
    ///
    /// # Safety
    ///
    /// The host range must stay mapped until [`unmap`](Self::unmap) is
    /// called with the returned slot.
    unsafe fn map(&self, guest_addr: u64, size: u64, host_addr: u64) -> io::Result<u32>;
    /// Removes a slot returned by [`map`](Self::map).
    fn unmap(&self, slot: u32) -> io::Result<()>;
}

/// Why a VFIO function could not be presented to the guest.
#[derive(Debug, thiserror::Error)]
pub enum VfioPciError {
    /// The configuration region is missing or too small.
    #[error("the device has no usable configuration region (size {0:#x})")]
    NoConfigRegion(u64),
    /// Reading the configuration region failed.
    #[error("cannot read the configuration space at {offset:#x}")]
    ConfigRead {
        /// Offset of the read.
        offset: u64,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The function is not a type-0 (endpoint) function.
    #[error("header type {0:#x} is not an endpoint (bridges cannot be passed through)")]
    NotAnEndpoint(u8),
    /// The shadow configuration refused a BAR.
    #[error("BAR {index} cannot be presented")]
    Bar {
        /// BAR index (6 for the ROM).
        index: usize,
        /// The error.
        #[source]
        source: crate::PciError,
    },
    /// A BAR the device has was given no address.
    #[error("BAR {0} was given no guest address")]
    MissingBarAddress(usize),
    /// The MSI or MSI-X state could not be built.
    #[error("cannot emulate the {what} capability")]
    Interrupts {
        /// "MSI" or "MSI-X".
        what: &'static str,
        /// The error.
        #[source]
        source: crate::PciError,
    },
}
