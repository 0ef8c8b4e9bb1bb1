//! PCI emulation: type-0 configuration space with capability chains and
//! BARs, MSI and MSI-X, and the root bus reached through configuration
//! mechanism #1 (ports 0xCF8/0xCFC) and an ECAM window; host functions
//! passed through with VFIO ([`vfio`]).

mod bus;
mod capability;
mod configuration;
mod device;
pub mod interrupt;
pub mod msi;
pub mod msix;
mod pcie;
pub mod vfio;

pub use bus::{
    PciBdf, PciConfigIo, PciConfigMmio, PciHostBridge, PciRoot, ECAM_BUS_SIZE, ECAM_FUNCTION_SIZE,
    PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};
pub use capability::{PciCapability, PciCapabilityId};
pub use configuration::{
    PciBarPrefetchable, PciBarRegionType, PciClassCode, PciConfiguration, PciConfigurationParams,
    PciHeaderType, BAR_COUNT, CAPABILITY_LIST_START, COMMAND_INTERRUPT_DISABLE, COMMAND_IO_SPACE,
    COMMAND_MEMORY_SPACE, EXTENDED_CONFIG_SPACE_SIZE, LEGACY_CONFIG_SPACE_SIZE, ROM_BAR_INDEX,
};
pub use device::{
    BarReprogrammingParams, ConfigSpaceFunction, DeviceRelocation, PciDevice, PciError,
};
pub use interrupt::{InterruptError, IntxInterrupt, MsiInterruptGroup, MsiMessage, VectorUpdate};
pub use msi::{MsiCapability, MsiConfig, MsiLayout};
pub use msix::{
    MsixCapability, MsixConfig, MsixTableEntry, MAX_MSIX_VECTORS, MSIX_TABLE_ENTRY_SIZE,
};
pub use pcie::{PciExpressCapability, PciExpressDeviceType};
