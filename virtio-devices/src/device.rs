//! What a virtio device is to its transport.

use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as devices see it: swappable, shared with the VMM.
pub type GuestMemoryMmapAtomic = GuestMemoryAtomic<GuestMemoryMmap>;

/// Device status bits (virtio 1.2 §2.1).
pub const DEVICE_ACKNOWLEDGE: u8 = 0x01;
/// The driver knows how to drive the device.
pub const DEVICE_DRIVER: u8 = 0x02;
/// The driver is set up and ready to drive the device.
pub const DEVICE_DRIVER_OK: u8 = 0x04;
/// Feature negotiation is complete.
pub const DEVICE_FEATURES_OK: u8 = 0x08;
/// The device hit an error it cannot recover from without a reset.
pub const DEVICE_NEEDS_RESET: u8 = 0x40;
/// The driver gave up on the device.
pub const DEVICE_FAILED: u8 = 0x80;

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtioInterruptType {
    /// The device configuration changed.
    Config,
    /// Used buffers were added to queue `n`.
    Queue(u16),
}

/// How a device's worker raises interrupts; the transport decides between
/// MSI-X vectors and INTx and keeps the ISR register.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises `int_type`.
    fn trigger(&self, int_type: VirtioInterruptType) -> std::io::Result<()>;

    /// The device stopped using a queue the driver broke and will do
    /// nothing more until it is reset: the transport sets
    /// DEVICE_NEEDS_RESET and raises a configuration interrupt (virtio 1.2
    /// §2.1.2), so the driver learns it instead of waiting forever. The
    /// default, for transports that cannot tell the driver, does nothing.
    fn set_needs_reset(&self) {}
}

/// One enabled queue handed to a device at activation.
pub struct QueueActivation {
    /// Queue index.
    pub index: u16,
    /// The queue as the driver configured it.
    pub queue: Queue,
    /// Signalled when the driver notifies the queue (an ioeventfd, or the
    /// transport on an MMIO write to the notify region).
    pub notifier: EventFd,
}

/// Why a device could not start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver enabled no queue the device needs, or queue setup is bad.
    #[error("invalid queue configuration: {0}")]
    BadQueues(String),
    /// Starting the worker or opening the backend failed.
    #[error("failed to start the device worker: {0}")]
    Worker(#[source] std::io::Error),
}

/// A virtio device, independent of its transport.
///
/// Lifecycle: the transport negotiates features (`ack_features`), then on
/// DRIVER_OK calls `activate` with the enabled queues; the device processes
/// them on its own thread until `reset`, which must stop that thread and
/// leave the device as new.
pub trait VirtioDevice: Send {
    /// The virtio device ID (see [`crate::device_type`]).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the number of entries is the number of
    /// queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Features offered (including transport features such as
    /// VIRTIO_F_VERSION_1, which the transport may add or mask).
    fn features(&self) -> u64;

    /// The features the driver accepted (a subset of `features`).
    fn ack_features(&mut self, features: u64);

    /// Size in bytes of the device configuration space, 0 for a device
    /// without one. The transport exposes exactly this many bytes (no
    /// device configuration capability at all when it is 0).
    fn config_size(&self) -> usize;

    /// Reads device configuration space at `offset`. Bytes past its end
    /// read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space; most fields are read-only.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    /// Starts processing `queues` on the device's worker.
    fn activate(
        &mut self,
        mem: GuestMemoryMmapAtomic,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueActivation>,
    ) -> Result<(), ActivateError>;

    /// Stops the worker and returns the device to its initial state.
    fn reset(&mut self);

    /// Whether the device can stop and restart single queues
    /// (VIRTIO_F_RING_RESET); the transport offers the feature only then.
    fn supports_queue_reset(&self) -> bool {
        false
    }

    /// Stops using queue `index` while the others keep running, and returns
    /// it so the transport can reset it.
    fn reset_queue(&mut self, _index: u16) -> Option<QueueActivation> {
        None
    }

    /// Starts using a queue again after [`reset_queue`](Self::reset_queue).
    fn enable_queue(&mut self, queue: QueueActivation) -> Result<(), ActivateError> {
        Err(ActivateError::BadQueues(format!(
            "queue {} cannot be restarted on its own",
            queue.index
        )))
    }

    /// Counter that changes whenever the device changes its configuration
    /// space on its own (e.g. link status); the transport folds it into
    /// config_generation.
    fn config_generation(&self) -> u32 {
        0
    }
}

/// Copies `config[offset..]` into `data`, for [`VirtioDevice::read_config`]:
/// bytes past the end of `config` (or an offset beyond it) read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded_and_zero_filled() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 3];
        read_config_bytes(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0]);
        read_config_bytes(&config, 10, &mut data);
        assert_eq!(data, [0, 0, 0]);
        read_config_bytes(&config, u64::MAX, &mut data);
        assert_eq!(data, [0, 0, 0]);
    }
}
