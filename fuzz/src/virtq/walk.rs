//! Following a descriptor chain the way the device's queue library does
//! (virtio 1.2 §2.7.5), reading guest memory as it is: the model the
//! checks measure the device's answers against.

use std::collections::BTreeSet;
use std::ops::Range;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// Device-writable buffer.
pub const F_WRITE: u16 = 2;
/// Indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// One descriptor as read from guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// Flags.
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

impl Desc {
    /// The 16 bytes of the descriptor.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }

    fn from_bytes(b: [u8; 16]) -> Desc {
        let [a @ .., l0, l1, l2, l3, f0, f1, n0, n1] = b;
        Desc {
            addr: u64::from_le_bytes(a),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            flags: u16::from_le_bytes([f0, f1]),
            next: u16::from_le_bytes([n0, n1]),
        }
    }

    /// Device-writable.
    pub fn writable(&self) -> bool {
        self.flags & F_WRITE != 0
    }

    /// The guest range of the buffer (saturating at the top).
    pub fn range(&self) -> Range<u64> {
        self.addr..self.addr.saturating_add(u64::from(self.len))
    }
}

/// A chain as the device sees it.
#[derive(Clone, Debug, Default)]
pub struct Walk {
    /// The descriptors yielded, in order, with the (table, index) each
    /// came from (a loop yields some more than once).
    pub descs: Vec<(Desc, (u64, u16))>,
    /// Whether the last descriptor yielded ends the chain (no NEXT); false
    /// for chains cut short by a loop, a bad index, an unreadable
    /// descriptor or a bad indirect table.
    pub whole: bool,
    /// Indirect tables followed: (address, length).
    pub tables: Vec<Range<u64>>,
}

/// Reads descriptor `index` of the table at `table`.
pub fn read_desc(mem: &GuestMemoryMmap, table: u64, index: u16) -> Option<Desc> {
    let at = table.checked_add(u64::from(index) * 16)?;
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some(Desc::from_bytes(b))
}

/// Follows the chain starting at `head` in the `size`-entry table at
/// `table`, with virtio-queue's rules: at most `size` descriptors (the
/// size of an indirect table inside one), an indirect descriptor switches
/// to its table (its NEXT is ignored; a nested one or a length that is not
/// a multiple of 16 ends the chain), and the chain ends once it would
/// exceed 4 GiB.
pub fn walk(mem: &GuestMemoryMmap, table: u64, size: u16, head: u16) -> Walk {
    let mut out = Walk::default();
    let (mut table, mut size, mut ttl, mut next) = (table, size, size, head);
    let mut indirect = false;
    let mut yielded = 0u32;
    while ttl > 0 && next < size {
        let Some(desc) = read_desc(mem, table, next) else {
            break;
        };
        if desc.flags & F_INDIRECT != 0 {
            if indirect || desc.len % 16 != 0 || desc.len / 16 > u32::from(u16::MAX) {
                break;
            }
            out.tables.push(desc.range());
            table = desc.addr;
            size = (desc.len / 16) as u16;
            ttl = size;
            next = 0;
            indirect = true;
            continue;
        }
        let Some(total) = yielded.checked_add(desc.len) else {
            break;
        };
        yielded = total;
        out.descs.push((desc, (table, next)));
        if desc.flags & F_NEXT != 0 {
            next = desc.next;
            ttl -= 1;
        } else {
            ttl = 0;
        }
    }
    out.whole = out.descs.last().is_some_and(|(d, _)| d.flags & F_NEXT == 0);
    out
}

impl Walk {
    /// The distinct descriptors, first occurrence order.
    pub fn distinct(&self) -> Vec<Desc> {
        let mut seen = BTreeSet::new();
        self.descs
            .iter()
            .filter(|(_, key)| seen.insert(*key))
            .map(|(d, _)| *d)
            .collect()
    }

    /// Total length of the distinct device-writable descriptors: what any
    /// used length of this chain must stay within.
    pub fn writable_bound(&self) -> u64 {
        self.distinct()
            .iter()
            .filter(|d| d.writable())
            .map(|d| u64::from(d.len))
            .sum()
    }

    /// The readable and writable parts of a whole chain whose non-empty
    /// descriptors are all readable-then-writable and inside `mem`, or
    /// `None`: the chains every device must accept as well formed.
    pub fn split(&self, mem: &GuestMemoryMmap) -> Option<(Vec<Desc>, Vec<Desc>)> {
        if !self.whole {
            return None;
        }
        let (mut readable, mut writable) = (Vec::new(), Vec::new());
        for (d, _) in &self.descs {
            if d.len == 0 {
                continue;
            }
            if !in_memory(mem, d.addr, u64::from(d.len)) {
                return None;
            }
            if d.writable() {
                writable.push(*d);
            } else if writable.is_empty() {
                readable.push(*d);
            } else {
                return None;
            }
        }
        Some((readable, writable))
    }
}

/// Whether `[addr, addr + len)` lies in guest memory.
pub fn in_memory(mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
    use vm_memory::GuestMemoryBackend;
    usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len))
}

/// Total length of `descs`.
pub fn total(descs: &[Desc]) -> u64 {
    descs.iter().map(|d| u64::from(d.len)).sum()
}

/// The bytes of the buffers `descs`, concatenated (each must be in memory).
pub fn read_stream(mem: &GuestMemoryMmap, descs: &[Desc], limit: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for d in descs {
        if out.len() >= limit {
            break;
        }
        let n = (d.len as usize).min(limit - out.len());
        let start = out.len();
        out.resize(start + n, 0);
        if mem
            .read_slice(&mut out[start..], GuestAddress(d.addr))
            .is_err()
        {
            out.truncate(start);
            break;
        }
    }
    out
}
