//! Serving split virtqueues, for every device: validating descriptor chains
//! and copying between their buffers and the host, putting chains on the
//! used ring, deciding when to interrupt the driver and re-arming its
//! notifications.
//!
//! Two ways to serve a queue:
//! - [`drain_queue`] answers every available chain on the spot, with driver
//!   notifications suppressed meanwhile, and stops using a ring the driver
//!   broke ([`QueueOutcome::error`]); block and rng work this way.
//! - Devices that move data when the host side is ready (net, console) pop
//!   chains themselves, validate each as a whole with [`collect_bufs`] or
//!   [`collect_split`] before acting on it, so that a hostile chain is
//!   rejected without side effects (no half-written frame on the tap, no
//!   half-consumed console input), complete them with [`add_used`] and
//!   interrupt with [`signal_used`], and [`rearm`] notifications when they
//!   run out of chains.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::worker::Backlog;
use crate::{VirtioInterrupt, VirtioInterruptType};

/// One guest buffer of a validated chain, known to lie inside guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GuestBuf {
    /// Guest-physical start.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: usize,
}

/// Why a chain was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum ChainError {
    /// A descriptor has the wrong direction for this queue.
    #[error("descriptor of the wrong direction")]
    WrongDirection,
    /// A descriptor points outside guest RAM.
    #[error("descriptor {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The chain holds more bytes than the device accepts.
    #[error("chain longer than {max} bytes")]
    TooLong {
        /// The limit that was exceeded.
        max: usize,
    },
    /// The chain stops at a descriptor that still has NEXT set: it loops,
    /// names a descriptor beyond its table, or runs into a descriptor or
    /// indirect table that cannot be read. A loop would otherwise hand the
    /// device the same buffers up to a queue size of times.
    #[error("descriptor chain cut short (loop, bad next index or unreadable descriptor)")]
    CutShort,
}

/// The buffers of a chain whose descriptors all go in one direction.
#[derive(Debug, Default)]
pub(crate) struct ChainBufs {
    /// Non-empty buffers, in chain order.
    pub bufs: Vec<GuestBuf>,
    /// Sum of their lengths.
    pub total: usize,
}

/// Collects the buffers of `chain`, requiring every descriptor to be
/// device-writable (`writable`) or device-readable (`!writable`), inside
/// guest memory, and `max_total` bytes at most in all.
pub(crate) fn collect_bufs(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    writable: bool,
    max_total: usize,
) -> Result<ChainBufs, ChainError> {
    let (readable, writable_bufs) = if writable {
        collect_split(mem, chain, 0, max_total)?
    } else {
        collect_split(mem, chain, max_total, 0)?
    };
    Ok(if writable { writable_bufs } else { readable })
}

/// Splits `chain` into its device-readable part and the device-writable
/// part that must follow it (virtio 1.2 §2.7.4.2), each inside guest memory
/// and within its byte limit, and ending properly (no loop). Empty
/// descriptors are skipped.
pub(crate) fn collect_split(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max_readable: usize,
    max_writable: usize,
) -> Result<(ChainBufs, ChainBufs), ChainError> {
    let mut readable = ChainBufs::default();
    let mut writable = ChainBufs::default();
    // virtio-queue's iterator ends a bad chain early rather than failing;
    // only a last descriptor without NEXT shows the chain is whole. An
    // empty chain (unreadable head or indirect table) is cut short too.
    let mut whole = false;
    for desc in chain {
        whole = !desc.has_next();
        if desc.len() == 0 {
            continue;
        }
        let (part, max) = if desc.is_write_only() {
            (&mut writable, max_writable)
        } else if writable.bufs.is_empty() {
            (&mut readable, max_readable)
        } else {
            // A readable buffer after a writable one.
            return Err(ChainError::WrongDirection);
        };
        let len = desc.len() as usize;
        if !mem.check_range(desc.addr(), len) {
            return Err(ChainError::OutOfRange {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        part.total = match part.total.checked_add(len) {
            Some(total) if total <= max => total,
            _ if max == 0 => return Err(ChainError::WrongDirection),
            _ => return Err(ChainError::TooLong { max }),
        };
        part.bufs.push(GuestBuf {
            addr: desc.addr(),
            len,
        });
    }
    if !whole {
        return Err(ChainError::CutShort);
    }
    Ok((readable, writable))
}

/// Copies `data` into `bufs` in order; returns how many bytes landed
/// (less than `data.len()` if the buffers are shorter).
pub(crate) fn write_to_bufs(mem: &GuestMemoryMmap, bufs: &[GuestBuf], data: &[u8]) -> usize {
    let mut done = 0;
    for buf in bufs {
        let Some(rest) = data.get(done..).filter(|r| !r.is_empty()) else {
            break;
        };
        let n = rest.len().min(buf.len);
        // The range was checked when the chain was collected; a failure
        // here would mean memory was unplugged meanwhile.
        if let Err(e) = mem.write_slice(&rest[..n], buf.addr) {
            log::warn!("cannot write guest buffer at {:#x}: {e}", buf.addr.0);
            break;
        }
        done += n;
    }
    done
}

/// Appends the contents of `bufs` to `out`.
pub(crate) fn read_from_bufs(
    mem: &GuestMemoryMmap,
    bufs: &[GuestBuf],
    out: &mut Vec<u8>,
) -> Result<(), vm_memory::GuestMemoryError> {
    for buf in bufs {
        let start = out.len();
        out.resize(start + buf.len, 0);
        mem.read_slice(&mut out[start..], buf.addr)?;
    }
    Ok(())
}

/// Re-arms driver notifications once the device has used up what it can
/// of `queue`, and returns true when more chains arrived meanwhile so the
/// caller should go round again.
///
/// `seen` is the available index up to which the device looked: normally
/// `next_avail`, but further when chains were popped and put back for lack
/// of room (a frame that needs more merged buffers). With EVENT_IDX this
/// publishes `avail_event = seen`: the driver only notifies when it moves
/// its index past `avail_event`, so without it the driver would stop
/// notifying. `fruitless_rounds` guards against a driver whose index keeps
/// claiming chains that cannot be popped: after two rounds without progress
/// the caller gives up until the next notification.
pub(crate) fn rearm(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    seen: u16,
    fruitless_rounds: u32,
) -> bool {
    if fruitless_rounds >= 2 {
        return false;
    }
    let next = queue.next_avail();
    // enable_notification works from next_avail; point it at `seen` for
    // the duration of the call.
    queue.set_next_avail(seen);
    let result = queue.enable_notification(mem);
    queue.set_next_avail(next);
    result.unwrap_or_else(|e| {
        log::warn!("cannot re-enable queue notifications: {e}");
        false
    })
}

/// Puts `head` in the used ring with `len` bytes written; returns whether
/// it is there. A failure (bad head index from the driver, used ring
/// outside memory) is only logged.
pub(crate) fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    try_add_used(queue, mem, head, len).unwrap_or_else(|e| {
        log::warn!("cannot add descriptor {head} to the used ring: {e}");
        false
    })
}

/// Puts `head` in the used ring with `len` bytes written. A head index out
/// of range is dropped (`Ok(false)`) rather than breaking the queue: it is
/// the driver's own malformed entry. A used ring that cannot be written is
/// an error.
fn try_add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
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

/// Whether the driver asked to be interrupted for the used buffers added
/// since the last interrupt (always, without VIRTIO_RING_F_EVENT_IDX).
fn wants_interrupt(queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
    queue.needs_notification(mem).unwrap_or_else(|e| {
        // Interrupting too often is harmless; not at all could hang the guest.
        log::warn!("cannot read used_event: {e}");
        true
    })
}

/// Raises the interrupt of queue `index`; a failure is only logged.
pub(crate) fn interrupt_queue(interrupt: &dyn VirtioInterrupt, index: u16) {
    if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(index)) {
        log::error!("cannot raise the interrupt of queue {index}: {e}");
    }
}

/// Interrupts the driver for queue `index` if it asked to be told about the
/// used buffers added since the last call.
pub(crate) fn signal_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
) {
    if wants_interrupt(queue, mem) {
        interrupt_queue(interrupt, index);
    }
}

/// Completes every chain available on queue `index` with `serve`, which
/// returns the used length, or `None` when the device cannot take the chain
/// yet: the chain is then put back and serving stops until the device
/// calls again. Otherwise, once the ring is empty, notifications are
/// re-armed (see [`rearm`]). Interrupts the driver at the end if anything
/// was used and it asked for that. Stops after [`CHAINS_PER_PASS`] chains
/// and returns [`Backlog::Remaining`] if any are left.
pub(crate) fn serve_chains(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &dyn VirtioInterrupt,
    index: u16,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> Option<u32>,
) -> Backlog {
    let mut used = false;
    let mut fruitless = 0;
    let mut handled = 0;
    let mut backlog = Backlog::Empty;
    'rounds: loop {
        let mut progress = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            if handled == CHAINS_PER_PASS {
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                backlog = Backlog::Remaining;
                break 'rounds;
            }
            handled += 1;
            progress = true;
            let head = chain.head_index();
            let Some(len) = serve(chain) else {
                queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                break 'rounds;
            };
            used |= add_used(queue, mem, head, len);
        }
        if !progress {
            fruitless += 1;
        }
        if !rearm(queue, mem, queue.next_avail(), fruitless) {
            break;
        }
    }
    if used {
        signal_used(queue, mem, interrupt, index);
    }
    backlog
}

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
    /// Set when the pass stopped at [`CHAINS_PER_PASS`] with chains left:
    /// the caller must come back (see [`crate::worker::Backlog`]).
    pub pending: bool,
    /// Chains put on the used ring.
    pub completed: usize,
    /// Whether the driver asked to be interrupted for them (always true
    /// without VIRTIO_RING_F_EVENT_IDX if anything completed).
    pub notify: bool,
    /// Set when the queue is broken: the device must stop using it. Chains
    /// completed before the error are still counted above.
    pub error: Option<QueueError>,
}

/// The most chains one pass over a queue completes before it yields to the
/// worker's other events.
pub const CHAINS_PER_PASS: usize = 256;

/// Processes the chains the driver made available on `queue`, at most
/// [`CHAINS_PER_PASS`] of them.
///
/// `handle` performs one request and returns the used length (bytes it
/// wrote into device-writable buffers). Driver notifications are
/// suppressed while draining, and the ring is re-checked after they are
/// re-enabled so no chain published in between is missed.
pub(crate) fn drain_queue<F>(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
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
    let mut handled = 0;
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
                if handled == CHAINS_PER_PASS {
                    // Put it back for the next pass; notifications stay
                    // off, since the device comes back on its own.
                    queue.set_next_avail(queue.next_avail().wrapping_sub(1));
                    outcome.pending = true;
                    return Ok(());
                }
                handled += 1;
                progressed = true;
                let head = chain.head_index();
                let len = handle(chain);
                if try_add_used(queue, mem, head, len)? {
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
        outcome.notify = wants_interrupt(queue, mem);
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ring::{guest_memory, Desc, RecordingInterrupt, TestRing, F_INDIRECT, F_NEXT};

    /// Pops the next chain of `queue` and collects it.
    fn collect_next(
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
    ) -> Result<(ChainBufs, ChainBufs), ChainError> {
        let chain = queue.pop_descriptor_chain(mem).expect("a chain");
        collect_split(mem, chain, usize::MAX, usize::MAX)
    }

    #[test]
    fn chains_cut_short_are_rejected() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, 0, 8);
        let mut queue = ring.queue();
        let looping = |next| Desc {
            flags: F_NEXT,
            next,
            ..Desc::r(0x10_0000, 16)
        };
        // A loop onto itself, and one through a second descriptor.
        ring.set_desc(0, looping(0));
        ring.publish(0);
        ring.set_desc(1, looping(2));
        ring.set_desc(2, looping(1));
        ring.publish(1);
        // A next index beyond the table.
        ring.set_desc(3, looping(200));
        ring.publish(3);
        // An indirect table inside an indirect table, and an empty one.
        let (outer, inner) = (0x20_0000, 0x20_1000);
        ring.write_indirect_table(
            outer,
            &[
                looping(1),
                Desc {
                    flags: F_INDIRECT,
                    ..Desc::r(inner, 16)
                },
            ],
        );
        ring.write_indirect_table(inner, &[Desc::r(0x10_0000, 16)]);
        for (index, len) in [(4, 32), (5, 0)] {
            ring.set_desc(
                index,
                Desc {
                    flags: F_INDIRECT,
                    ..Desc::r(outer, len)
                },
            );
            ring.publish(index);
        }
        for what in [
            "self-loop",
            "2-cycle",
            "bad next",
            "nested indirect",
            "empty table",
        ] {
            assert_eq!(
                collect_next(&mem, &mut queue).err(),
                Some(ChainError::CutShort),
                "{what}"
            );
        }
        // A whole chain, ending in an empty descriptor, is fine.
        ring.add_chain(&[Desc::r(0x10_0000, 16), Desc::w(0x10_1000, 0)]);
        let (readable, writable) = collect_next(&mem, &mut queue).unwrap();
        assert_eq!((readable.total, writable.total), (16, 0));
    }

    #[test]
    fn serve_chains_puts_back_a_chain_the_device_cannot_take() {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, 0, 8);
        let mut queue = ring.queue();
        let irq = RecordingInterrupt::default();
        for i in 0..3 {
            ring.add_chain(&[Desc::w(0x10_0000 + 0x100 * i, 16)]);
        }
        let mut served = Vec::new();
        let backlog = serve_chains(&mut queue, &mem, &irq, 0, |chain| {
            if !served.is_empty() {
                return None;
            }
            served.push(chain.head_index());
            Some(4)
        });
        // Put back by the device, not left over from the budget.
        assert_eq!(backlog, Backlog::Empty);
        assert_eq!(served, [0]);
        assert_eq!(ring.used_idx(), 1);
        assert_eq!(ring.used_elem(0), (0, 4));
        assert_eq!(irq.count(0), 1);
        // The chain put back comes first the next time round.
        let backlog = serve_chains(&mut queue, &mem, &irq, 0, |chain| {
            served.push(chain.head_index());
            Some(0)
        });
        assert_eq!(backlog, Backlog::Empty);
        assert_eq!(served, [0, 1, 2]);
        assert_eq!(ring.used_idx(), 3);
        assert_eq!(irq.count(0), 2);
    }

    /// A ring holding more than one pass' budget of one-descriptor chains.
    fn ring_over_budget(mem: &GuestMemoryMmap) -> (TestRing, Queue, u16) {
        let mut ring = TestRing::new(mem, 0, 512);
        let queue = ring.queue();
        let chains = CHAINS_PER_PASS as u16 + 10;
        for i in 0..chains {
            ring.add_chain(&[Desc::w(0x20_0000 + 0x10 * u64::from(i), 16)]);
        }
        (ring, queue, chains)
    }

    #[test]
    fn serve_chains_stops_at_its_budget_and_resumes() {
        let mem = guest_memory();
        let (ring, mut queue, chains) = ring_over_budget(&mem);
        let irq = RecordingInterrupt::default();
        let backlog = serve_chains(&mut queue, &mem, &irq, 0, |_| Some(0));
        assert_eq!(backlog, Backlog::Remaining);
        assert_eq!(usize::from(ring.used_idx()), CHAINS_PER_PASS);
        let backlog = serve_chains(&mut queue, &mem, &irq, 0, |_| Some(0));
        assert_eq!(backlog, Backlog::Empty);
        assert_eq!(ring.used_idx(), chains);
    }

    #[test]
    fn drain_queue_stops_at_its_budget_and_resumes() {
        let mem = guest_memory();
        let (ring, mut queue, chains) = ring_over_budget(&mem);
        let outcome = drain_queue(&mut queue, &mem, |_| 0);
        assert!(outcome.pending);
        assert_eq!(outcome.completed, CHAINS_PER_PASS);
        assert!(outcome.error.is_none());
        let outcome = drain_queue(&mut queue, &mem, |_| 0);
        assert!(!outcome.pending);
        assert_eq!(ring.used_idx(), chains);
    }
}
