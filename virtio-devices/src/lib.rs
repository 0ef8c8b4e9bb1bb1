//! virtio 1.x devices and their PCI transport.
//!
//! A device ([`VirtioDevice`]) knows its queues, features and
//! configuration space and processes requests on its own worker thread; the
//! transport ([`transport::VirtioPciDevice`]) makes it a PCI function with
//! the virtio capabilities, common configuration, notification and ISR
//! regions and MSI-X.

pub mod block;
pub mod console;
mod device;
pub mod net;
mod queue;
pub mod rng;
#[cfg(test)]
mod test_ring;
pub mod transport;
pub mod worker;

pub use device::{
    read_config_bytes, ActivateError, GuestMemoryMmapAtomic, QueueActivation, VirtioDevice,
    VirtioInterrupt, VirtioInterruptType, DEVICE_ACKNOWLEDGE, DEVICE_DRIVER, DEVICE_DRIVER_OK,
    DEVICE_FAILED, DEVICE_FEATURES_OK, DEVICE_NEEDS_RESET,
};
pub use queue::{QueueError, QueueOutcome};

/// virtio device IDs (virtio 1.2 §5).
pub mod device_type {
    /// Network card.
    pub const NET: u32 = 1;
    /// Block device.
    pub const BLOCK: u32 = 2;
    /// Console.
    pub const CONSOLE: u32 = 3;
    /// Entropy source.
    pub const RNG: u32 = 4;
}
