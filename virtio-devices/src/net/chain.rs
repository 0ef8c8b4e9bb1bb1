//! Descriptor-chain helpers shared by the network and console devices.
//!
//! Every chain is validated as a whole before the device acts on it, so that
//! a hostile chain is rejected without side effects (no half-written frame
//! on the tap, no half-consumed console input).

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

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
/// and within its byte limit. Empty descriptors are skipped.
pub(crate) fn collect_split(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    max_readable: usize,
    max_writable: usize,
) -> Result<(ChainBufs, ChainBufs), ChainError> {
    let mut readable = ChainBufs::default();
    let mut writable = ChainBufs::default();
    for desc in chain {
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

/// Puts `head` in the used ring with `len` bytes written; a failure (bad
/// head index from the driver, used ring outside memory) is only logged.
pub(crate) fn add_used(queue: &mut Queue, mem: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("cannot add descriptor {head} to the used ring: {e}");
            false
        }
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
    let needed = queue.needs_notification(mem).unwrap_or_else(|e| {
        // Interrupting too often is harmless; not at all could hang the guest.
        log::warn!("cannot read used_event of queue {index}: {e}");
        true
    });
    if needed {
        if let Err(e) = interrupt.trigger(VirtioInterruptType::Queue(index)) {
            log::error!("cannot raise the interrupt of queue {index}: {e}");
        }
    }
}

/// Copies `config[offset..]` into `data`; bytes past the end read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
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
