//! The interface between a PCI function and the root bus that routes
//! configuration accesses to it.

use std::any::Any;

use crate::configuration::{PciBarRegionType, PciConfiguration};

/// Errors of the PCI crate.
#[derive(Debug, thiserror::Error)]
pub enum PciError {
    /// No room left in configuration space for a capability.
    #[error("capability of {size} bytes does not fit in configuration space")]
    CapabilitySpaceFull {
        /// Size of the capability that did not fit.
        size: usize,
    },
    /// A capability was malformed (empty, too long, mask length mismatch).
    #[error("invalid capability: {0}")]
    InvalidCapability(&'static str),
    /// The BAR index is not 0..=5, or a 64-bit BAR was placed at index 5.
    #[error("invalid BAR index {0}")]
    InvalidBarIndex(usize),
    /// The BAR register is already taken (including the upper half of a 64-bit BAR).
    #[error("BAR {0} is already in use")]
    BarInUse(usize),
    /// BAR sizes must be a power of two and at least the minimum for the type.
    #[error("invalid BAR size {size:#x} for BAR {index}")]
    InvalidBarSize {
        /// BAR index.
        index: usize,
        /// The rejected size.
        size: u64,
    },
    /// The BAR address is not aligned to its size, or does not fit the BAR type.
    #[error("invalid BAR address {addr:#x} for BAR {index}")]
    InvalidBarAddress {
        /// BAR index.
        index: usize,
        /// The rejected address.
        addr: u64,
    },
    /// The device slot on the bus is taken.
    #[error("PCI slot {0} is already in use")]
    SlotInUse(String),
    /// No free device slot left on the bus.
    #[error("no free PCI slot left on the bus")]
    NoFreeSlot,
    /// The number of MSI-X vectors is not 1..=2048.
    #[error("invalid number of MSI-X vectors: {0}")]
    InvalidMsixVectorCount(usize),
    /// The number of MSI vectors is not a power of two in 1..=32.
    #[error("invalid number of MSI vectors: {0}")]
    InvalidMsiVectorCount(usize),
    /// The VMM could not apply a BAR move.
    #[error("failed to move BAR {index} from {old_base:#x} to {new_base:#x}: {reason}")]
    BarRelocation {
        /// BAR index.
        index: usize,
        /// Address the BAR was mapped at.
        old_base: u64,
        /// Address the guest asked for.
        new_base: u64,
        /// Why it failed.
        reason: String,
    },
}

/// A BAR the guest moved: the owner must move whatever it mapped at
/// `old_base` (bus range, ioeventfds, memory slots) to `new_base`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarReprogrammingParams {
    /// Index of the BAR register (the lower one for a 64-bit BAR).
    pub bar_index: usize,
    /// Where the BAR was decoded before.
    pub old_base: u64,
    /// Where the guest put it.
    pub new_base: u64,
    /// Size of the BAR.
    pub len: u64,
    /// Which address space the BAR lives in.
    pub region_type: PciBarRegionType,
}

/// A PCI function on the root bus.
///
/// Configuration accesses arrive split into pieces that never cross a dword
/// boundary: `reg_idx` is the dword index in configuration space and `offset`
/// the byte offset inside that dword.
pub trait PciDevice: Send {
    /// Reads configuration dword `reg_idx`.
    fn read_config_register(&mut self, reg_idx: usize) -> u32;

    /// Writes `data` at byte `offset` of configuration dword `reg_idx`.
    /// Returns the BARs whose decoded address changed because of the write,
    /// for the root bus to hand to its [`DeviceRelocation`].
    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogrammingParams>;

    /// The VMM could not apply `params`: put the BAR back at `old_base`.
    fn restore_bar(&mut self, params: &BarReprogrammingParams);

    /// Size of this function's configuration space: 256, or 4096 for PCIe.
    fn config_space_size(&self) -> usize {
        crate::LEGACY_CONFIG_SPACE_SIZE
    }

    /// Guest read of a BAR region; `base` is where the BAR is mapped.
    fn read_bar(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// Guest write to a BAR region.
    fn write_bar(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}

    /// Downcasting support for the VMM.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// A function whose configuration space is exactly its [`PciConfiguration`]
/// (no emulated capability behind it): implementing this gives it
/// [`PciDevice`], configuration accesses, BAR moves and their rollback
/// all going to the configuration. Its BAR accesses go to
/// [`on_bar_read`](Self::on_bar_read) and [`on_bar_write`](Self::on_bar_write)
/// (named apart from [`PciDevice`]'s, so calls on the type stay unambiguous).
pub trait ConfigSpaceFunction: Send + 'static {
    /// The configuration space.
    fn config(&self) -> &PciConfiguration;

    /// The configuration space, to write.
    fn config_mut(&mut self) -> &mut PciConfiguration;

    /// Guest read of a BAR region ([`PciDevice::read_bar`]): all ones by
    /// default.
    fn on_bar_read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// Guest write to a BAR region ([`PciDevice::write_bar`]): ignored by
    /// default.
    fn on_bar_write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

impl<T: ConfigSpaceFunction> PciDevice for T {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        self.config().read_reg(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogrammingParams> {
        self.config_mut().write_reg(reg_idx, offset, data)
    }

    fn restore_bar(&mut self, params: &BarReprogrammingParams) {
        self.config_mut().restore_bar(params);
    }

    fn config_space_size(&self) -> usize {
        self.config().size()
    }

    fn read_bar(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.on_bar_read(base, offset, data);
    }

    fn write_bar(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.on_bar_write(base, offset, data);
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The VMM side of a BAR move: moves bus ranges, ioeventfds and memory
/// slots. Errors are reported back so the BAR can be restored.
pub trait DeviceRelocation: Send + Sync {
    /// Applies `params` for `device`.
    fn move_bar(
        &self,
        params: &BarReprogrammingParams,
        device: &mut dyn PciDevice,
    ) -> Result<(), PciError>;
}
