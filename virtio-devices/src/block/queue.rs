//! Draining a split virtqueue: pop every available chain, hand it to the
//! device, put it on the used ring, with notification suppression and the
//! decision whether to interrupt. Shared by the block and rng devices.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

/// A queue the driver left in a state the device cannot work with; the
/// device stops processing it until it is reset.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring could not be read, or its index is impossible.
    #[error("cannot read the available ring: {0}")]
    AvailRing(virtio_queue::Error),
    /// The used ring could not be written.
    #[error("cannot write the used ring: {0}")]
    UsedRing(virtio_queue::Error),
    /// The available index announces chains whose ring entries cannot be
    /// read.
    #[error("available ring entries are unreadable")]
    Stuck,
}

/// What one pass over a queue did.
#[derive(Debug, Default)]
pub struct QueueOutcome {
    /// Chains put on the used ring.
    pub completed: usize,
    /// Whether the driver asked to be interrupted for them (always true
    /// without VIRTIO_RING_F_EVENT_IDX if anything completed).
    pub notify: bool,
    /// Set when the queue is broken: the device must stop using it. Chains
    /// completed before the error are still counted above.
    pub error: Option<QueueError>,
}

/// A used ring element whose head index is out of range is dropped rather
/// than breaking the queue: it is the guest's own malformed entry.
fn add_used(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    head: u16,
    len: u32,
) -> Result<bool, QueueError> {
    match queue.add_used(mem, head, len) {
        Ok(()) => Ok(true),
        Err(virtio_queue::Error::InvalidDescriptorIndex) => {
            log::warn!("available ring names descriptor {head}, beyond the queue; dropped");
            Ok(false)
        }
        Err(e) => Err(QueueError::UsedRing(e)),
    }
}

/// Processes every chain the driver made available on `queue`.
///
/// `handle` performs one request and returns the used length (bytes it
/// wrote into device-writable buffers). Driver notifications are
/// suppressed while draining, and the ring is re-checked after they are
/// re-enabled so no chain published in between is missed.
pub(crate) fn drain_queue<F>(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    mut handle: F,
) -> QueueOutcome
where
    F: FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
{
    let mut outcome = QueueOutcome::default();
    // Passes that found nothing although the index said otherwise. One can
    // be a race with the driver publishing; two in a row mean the ring
    // entries themselves are unreadable.
    let mut idle_passes = 0;
    let result = (|| -> Result<(), QueueError> {
        loop {
            queue
                .disable_notification(mem)
                .map_err(QueueError::UsedRing)?;
            let mut progressed = false;
            loop {
                let chain = match queue.iter(mem) {
                    Ok(mut iter) => iter.next(),
                    Err(e) => return Err(QueueError::AvailRing(e)),
                };
                let Some(chain) = chain else { break };
                progressed = true;
                let head = chain.head_index();
                let len = handle(chain);
                if add_used(mem, queue, head, len)? {
                    outcome.completed += 1;
                }
            }
            if !queue
                .enable_notification(mem)
                .map_err(QueueError::UsedRing)?
            {
                return Ok(());
            }
            idle_passes = if progressed { 0 } else { idle_passes + 1 };
            if idle_passes >= 2 {
                return Err(QueueError::Stuck);
            }
        }
    })();
    if let Err(e) = result {
        outcome.error = Some(e);
    }
    if outcome.completed > 0 {
        outcome.notify = queue.needs_notification(mem).unwrap_or_else(|e| {
            // Interrupting needlessly is harmless; missing one hangs I/O.
            log::warn!("cannot read used_event: {e}");
            true
        });
    }
    outcome
}
