//! A small virtio-pci guest driver written from the virtio 1.2
//! specification (§2, §4.1), for driving the VMM's transport in-process the
//! way a guest kernel would: through configuration space (port I/O or
//! ECAM) and MMIO accesses to the BAR, with split virtqueues in guest
//! memory. It shares no code with the device side.
//!
//! - [`machine`]: the buses, the PCI root and BAR relocation (the VMM's
//!   part, modelled with the `pci` and `devices` crates).
//! - [`pci`]: enumeration, BAR sizing and assignment, capability lists.
//! - [`transport`]: the virtio-pci driver proper.
//! - [`virtqueue`]: split virtqueues.

pub mod machine;
pub mod pci;
pub mod transport;
pub mod virtqueue;

pub use machine::{ConfigAccess, ConfigMechanism, Machine};
pub use transport::{AddrWidth, VirtioCap, VirtioPciDriver};
pub use virtqueue::{Buffer, SplitQueue};

/// What can go wrong while driving a device.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The function is not a modern virtio device.
    #[error("{vendor:04x}:{device:04x} is not a modern virtio device")]
    NotVirtio {
        /// Vendor ID.
        vendor: u16,
        /// Device ID.
        device: u16,
    },
    /// BAR 0 is not what the transport needs.
    #[error("BAR: {0}")]
    Bar(&'static str),
    /// A capability is malformed.
    #[error("capability: {0}")]
    Capability(&'static str),
    /// A required virtio capability is missing.
    #[error("no virtio capability of type {0}")]
    MissingCapability(u8),
    /// The device did not keep FEATURES_OK.
    #[error("device refused features {0:#x}")]
    FeaturesRefused(u64),
    /// The device did not report reset completion.
    #[error("device did not finish resetting")]
    ResetTimeout,
    /// Queue `0` does not exist (size 0).
    #[error("queue {0} is not available")]
    QueueUnavailable(u16),
    /// The requested size exceeds the queue maximum.
    #[error("queue {index}: size {size} exceeds the maximum {max}")]
    QueueTooLarge {
        /// Queue index.
        index: u16,
        /// Requested size.
        size: u16,
        /// Device maximum.
        max: u16,
    },
    /// queue_enable read back 0.
    #[error("queue {0} did not enable")]
    QueueNotEnabled(u16),
    /// An MSI-X vector read back as something else (NO_VECTOR).
    #[error("vector {wanted} refused, read back {got:#x}")]
    VectorRefused {
        /// Vector written.
        wanted: u16,
        /// Vector read back.
        got: u16,
    },
    /// No free descriptors.
    #[error("virtqueue full")]
    QueueFull,
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// Waited too long.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// config_generation kept changing.
    #[error("device configuration never read consistently")]
    ConfigUnstable,
}
