//! The virtio-pci transport (virtio 1.2 §4.1): a modern, non-transitional
//! PCI function that exposes a [`VirtioDevice`](crate::VirtioDevice).
//!
//! The function has a conventional 256-byte configuration space (no PCIe
//! capability: virtio drivers do not need one, and a root-complex integrated
//! endpoint gains nothing from it) with one 64-bit, non-prefetchable memory
//! BAR (BAR 0) of [`VIRTIO_PCI_BAR_SIZE`] bytes, laid out page by page:
//!
//! | offset   | region                                   | cap type |
//! |----------|------------------------------------------|----------|
//! | `0x0000` | common configuration (`0x3c` bytes)      | 1        |
//! | `0x1000` | ISR status (1 byte)                      | 3        |
//! | `0x2000` | device configuration (if the device has one) | 4    |
//! | `0x3000` | notifications, 4 bytes per queue         | 2        |
//! | `0x5000` | MSI-X table (up to 2048 entries)         | MSI-X    |
//! | `0xd000` | MSI-X pending bit array                  | MSI-X    |
//!
//! Each region sits on its own page so that a VMM can trap them separately
//! (e.g. register ioeventfds for the notify page only). A `virtio_pci_cfg_cap`
//! (type 5) gives access to the BAR through configuration space.
//!
//! The VMM sizes the interrupt group with [`msix_vector_count`] (one vector
//! per queue plus one for configuration changes), allocates
//! [`VIRTIO_PCI_BAR_SIZE`] bytes aligned to [`VIRTIO_PCI_BAR_ALIGNMENT`] in
//! 64-bit MMIO space, builds a [`VirtioPciDevice`], and places it both on the
//! PCI root (as a `PciDevice`) and on the MMIO bus at the BAR address (as a
//! `devices::BusDevice`). After a BAR move it re-registers
//! [`VirtioPciDevice::ioeventfds`] at the new base.

mod capabilities;
mod common_config;
mod interrupt;
mod pci_device;

#[cfg(test)]
mod tests;

pub use capabilities::{
    VirtioPciCap, VIRTIO_PCI_CAP_COMMON_CFG, VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_ISR_CFG,
    VIRTIO_PCI_CAP_NOTIFY_CFG, VIRTIO_PCI_CAP_PCI_CFG,
};
pub use interrupt::{VirtioPciInterrupt, ISR_CONFIG_CHANGED, ISR_QUEUE};
pub use pci_device::{msix_vector_count, VirtioPciDevice};

/// PCI vendor ID of virtio devices (Red Hat, Inc.).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern device IDs are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// PCI revision ID: 1 marks a modern (virtio 1.x only) device.
pub const VIRTIO_PCI_REVISION: u8 = 1;
/// Subsystem ID: the spec asks for at least 0x40 on modern-only devices.
pub const VIRTIO_PCI_SUBSYSTEM_ID: u16 = 0x40;

/// "No MSI-X vector" in `config_msix_vector` and `queue_msix_vector`.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

/// Size of BAR 0; a power of two, as every BAR size must be.
pub const VIRTIO_PCI_BAR_SIZE: u64 = 0x1_0000;
/// Alignment the VMM must allocate BAR 0 with (a BAR is aligned to its size).
pub const VIRTIO_PCI_BAR_ALIGNMENT: u64 = VIRTIO_PCI_BAR_SIZE;

/// Offset of the common configuration structure in BAR 0.
pub const COMMON_CONFIG_OFFSET: u64 = 0x0000;
/// Size of the common configuration structure (through `queue_reset`).
pub const COMMON_CONFIG_SIZE: u64 = 0x3c;
/// Offset of the ISR status byte in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Size of the ISR status structure.
pub const ISR_SIZE: u64 = 1;
/// Offset of the device configuration in BAR 0.
pub const DEVICE_CONFIG_OFFSET: u64 = 0x2000;
/// Room reserved for the device configuration.
pub const DEVICE_CONFIG_MAX_SIZE: u64 = 0x1000;
/// Offset of the notification region in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between the notification addresses of consecutive queues.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Room reserved for notification addresses.
pub const NOTIFY_MAX_SIZE: u64 = 0x2000;
/// Offset of the MSI-X table in BAR 0.
pub const MSIX_TABLE_OFFSET: u64 = 0x5000;
/// Room reserved for the MSI-X table: 2048 entries of 16 bytes.
pub const MSIX_TABLE_MAX_SIZE: u64 = 0x8000;
/// Offset of the MSI-X pending bit array in BAR 0.
pub const MSIX_PBA_OFFSET: u64 = 0xd000;
/// Room reserved for the PBA.
pub const MSIX_PBA_MAX_SIZE: u64 = 0x1000;

/// Most queues a device may have: bounded by the notification region and
/// by the MSI-X table (one vector per queue plus the configuration vector).
pub const MAX_QUEUES: usize = 2047;

/// Why a [`VirtioPciDevice`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The device reports more queues than the BAR layout can serve.
    #[error("device has {0} queues, at most {MAX_QUEUES} are supported")]
    TooManyQueues(usize),
    /// A queue's maximum size is not a power of two in 1..=32768.
    #[error("queue {index} has invalid maximum size {size}")]
    InvalidQueueSize {
        /// Queue index.
        index: usize,
        /// The rejected maximum size.
        size: u16,
    },
    /// The device configuration space does not fit in its BAR region.
    #[error("device configuration space of {0} bytes, at most {DEVICE_CONFIG_MAX_SIZE} fit")]
    ConfigSpaceTooLarge(usize),
    /// The device type does not fit in a PCI device ID.
    #[error("virtio device type {0} has no PCI device ID")]
    InvalidDeviceType(u32),
    /// A queue notifier could not be created.
    #[error("failed to create the notifier of queue {index}: {source}")]
    Notifier {
        /// Queue index.
        index: usize,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// Setting up configuration space, the BAR or MSI-X failed.
    #[error("PCI setup failed: {0}")]
    Pci(#[from] pci::PciError),
}
