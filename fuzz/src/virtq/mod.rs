//! The driver's side of split virtqueues, shared by the device targets:
//! guest memory with a fixed layout, rings the harness fills with chains
//! the fuzzer describes (well formed or not), and the checks of what the
//! device did to them ([`batch`]).
//!
//! Layout of the [`MEM_SIZE`] bytes of guest RAM:
//!
//! | range                  | what                                          |
//! |------------------------|-----------------------------------------------|
//! | `q * 0x3000`           | queue `q`: descriptors, avail (+0x1000), used (+0x2000) |
//! | `0x1_0000..0x1_8000`   | indirect tables, [`INDIRECT_SLOT`] bytes each |
//! | `0x1_8000..`           | data buffers                                  |

pub mod batch;
mod ops;
pub mod walk;

use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

pub use ops::{Addr, Len, Link, RingOp, Seg};
use walk::{Desc, F_INDIRECT, F_NEXT, F_WRITE};

/// Guest RAM of the device targets.
pub const MEM_SIZE: u64 = 0x4_0000;
/// Bytes of ring space per queue.
pub const QUEUE_STRIDE: u64 = 0x3000;
/// Most queues a target sets up.
pub const MAX_QUEUES: usize = 5;
/// Start of the indirect table area.
pub const INDIRECT_BASE: u64 = 0x1_0000;
/// Bytes per indirect table slot (64 descriptors).
pub const INDIRECT_SLOT: u64 = 0x400;
/// Number of indirect table slots.
pub const INDIRECT_SLOTS: u64 = 32;
/// Start of the data area.
pub const DATA_BASE: u64 = INDIRECT_BASE + INDIRECT_SLOTS * INDIRECT_SLOT;
/// Largest queue the targets use: bounds the work of walking every ring
/// slot's chain before each batch.
pub const MAX_QUEUE_SIZE: u16 = 64;

/// Guest RAM for one input, zeroed.
pub fn guest_memory(size: u64) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)])
        .expect("guest memory can be mapped")
}

/// The same memory as devices take it.
pub fn atomic(mem: &GuestMemoryMmap) -> GuestMemoryAtomic<GuestMemoryMmap> {
    GuestMemoryAtomic::new(mem.clone())
}

/// One queue's rings in guest memory, and the driver's bookkeeping.
#[derive(Debug)]
pub struct DriverQueue {
    /// Queue index.
    pub index: u16,
    /// Number of entries.
    pub size: u16,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// Descriptors not in any published chain.
    free: Vec<u16>,
    /// Descriptors of each published chain, by head, to free on completion.
    chains: Vec<(u16, Vec<u16>)>,
    /// Indirect slot to use next.
    next_slot: u64,
}

impl DriverQueue {
    /// Queue `index` of `size` entries at its place in the layout, rings
    /// zeroed.
    pub fn new(mem: &GuestMemoryMmap, index: u16, size: u16) -> Self {
        let base = u64::from(index) * QUEUE_STRIDE;
        let q = DriverQueue {
            index,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            free: (0..size).rev().collect(),
            chains: Vec::new(),
            next_slot: 0,
        };
        let zeroes = vec![0u8; 0x2000];
        mem.write_slice(&zeroes, GuestAddress(q.avail))
            .expect("rings in memory");
        q
    }

    /// A `virtio_queue::Queue` set up as the driver configured this one.
    pub fn device_queue(&self, max_size: u16, event_idx: bool) -> virtio_queue::Queue {
        use virtio_queue::QueueT;
        let mut q = virtio_queue::Queue::new(max_size).expect("valid maximum size");
        q.set_size(self.size);
        let split = |a: u64| (Some(a as u32), Some((a >> 32) as u32));
        let (lo, hi) = split(self.desc);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// The ring areas: descriptor table, available ring (with used_event)
    /// and used ring (with avail_event).
    pub fn areas(&self) -> [std::ops::Range<u64>; 3] {
        let n = u64::from(self.size);
        [
            self.desc..self.desc + 16 * n,
            self.avail..self.avail + 6 + 2 * n,
            self.used..self.used + 6 + 8 * n,
        ]
    }

    fn read_u16(mem: &GuestMemoryMmap, at: u64) -> u16 {
        mem.read_obj::<u16>(GuestAddress(at))
            .map(u16::from_le)
            .unwrap_or(0)
    }

    fn write_u16(mem: &GuestMemoryMmap, at: u64, v: u16) {
        let _ = mem.write_obj(v.to_le(), GuestAddress(at));
    }

    /// The driver's available index, as in memory.
    pub fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        Self::read_u16(mem, self.avail + 2)
    }

    /// The device's used index, as in memory.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        Self::read_u16(mem, self.used + 2)
    }

    /// `used_event` (at the end of the available ring).
    pub fn used_event(&self, mem: &GuestMemoryMmap) -> u16 {
        Self::read_u16(mem, self.avail + 4 + 2 * u64::from(self.size))
    }

    /// Used element at position `pos`: (id, len).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, pos: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(pos % self.size);
        let id = mem.read_obj::<u32>(GuestAddress(at)).unwrap_or(0);
        let len = mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap_or(0);
        (u32::from_le(id), u32::from_le(len))
    }

    /// The head in available ring slot `slot`.
    pub fn avail_slot(&self, mem: &GuestMemoryMmap, slot: u16) -> u16 {
        Self::read_u16(mem, self.avail + 4 + 2 * u64::from(slot % self.size))
    }

    /// Makes `head` available: next ring slot, then the index.
    pub fn publish(&self, mem: &GuestMemoryMmap, head: u16) {
        let idx = self.avail_idx(mem);
        Self::write_u16(mem, self.avail + 4 + 2 * u64::from(idx % self.size), head);
        Self::write_u16(mem, self.avail + 2, idx.wrapping_add(1));
    }

    /// Moves the available index without writing ring slots.
    pub fn bump_avail(&self, mem: &GuestMemoryMmap, delta: u16) {
        let idx = self.avail_idx(mem);
        Self::write_u16(mem, self.avail + 2, idx.wrapping_add(delta));
    }

    /// Sets `used_event`.
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, v: u16) {
        Self::write_u16(mem, self.avail + 4 + 2 * u64::from(self.size), v);
    }

    /// Sets the available ring's flags.
    pub fn set_avail_flags(&self, mem: &GuestMemoryMmap, v: u16) {
        Self::write_u16(mem, self.avail, v);
    }

    /// Writes descriptor `index` verbatim.
    pub fn set_desc(&self, mem: &GuestMemoryMmap, index: u16, d: Desc) {
        let at = self.desc + 16 * u64::from(index % self.size);
        let _ = mem.write_slice(&d.to_bytes(), GuestAddress(at));
    }

    /// The driver saw `head` completed: its descriptors are free again.
    pub fn complete(&mut self, head: u16) {
        if let Some(pos) = self.chains.iter().position(|(h, _)| *h == head) {
            let (_, descs) = self.chains.swap_remove(pos);
            self.free.extend(descs);
        }
    }

    /// `n` descriptor indices: free ones first, then (a driver that
    /// reuses descriptors still in flight) the oldest chain's.
    fn take(&mut self, n: usize) -> Vec<u16> {
        while self.free.len() < n && !self.chains.is_empty() {
            let (_, descs) = self.chains.remove(0);
            self.free.extend(descs);
        }
        let n = n.min(self.free.len());
        self.free.split_off(self.free.len() - n)
    }

    /// Writes `segs` as a chain shaped by `link` and publishes its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap, segs: &[Seg], link: Link) {
        let descs: Vec<Desc> = segs
            .iter()
            .map(|s| Desc {
                addr: s.addr.resolve(),
                len: s.len.resolve(),
                flags: if s.write { F_WRITE } else { 0 },
                next: 0,
            })
            .collect();
        let head = match link {
            Link::Direct | Link::Loop { .. } | Link::BadNext { .. } => {
                let indices = self.take(descs.len().max(1));
                let Some(&head) = indices.first() else {
                    return;
                };
                for (i, (&index, d)) in indices.iter().zip(&descs).enumerate() {
                    let mut d = *d;
                    if let Some(&next) = indices.get(i + 1) {
                        d.flags |= F_NEXT;
                        d.next = next;
                    } else {
                        match link {
                            Link::Loop { to } => {
                                d.flags |= F_NEXT;
                                d.next = indices[usize::from(to) % indices.len()];
                            }
                            Link::BadNext { next } => {
                                d.flags |= F_NEXT;
                                d.next = next;
                            }
                            _ => {}
                        }
                    }
                    self.set_desc(mem, index, d);
                }
                self.chains.push((head, indices));
                head
            }
            Link::Indirect { table_len } => {
                let indices = self.take(1);
                let Some(&head) = indices.first() else {
                    return;
                };
                let slot = INDIRECT_BASE + (self.next_slot % INDIRECT_SLOTS) * INDIRECT_SLOT;
                self.next_slot += 1;
                let entries = descs.len().min((INDIRECT_SLOT / 16) as usize);
                for (i, d) in descs.iter().take(entries).enumerate() {
                    let mut d = *d;
                    if i + 1 < entries {
                        d.flags |= F_NEXT;
                        d.next = i as u16 + 1;
                    }
                    let _ = mem.write_slice(&d.to_bytes(), GuestAddress(slot + 16 * i as u64));
                }
                // A wrong table length (not a multiple of 16, longer or
                // shorter than the table) unless the fuzzer leaves it.
                let len = table_len.map_or(16 * entries as u32, u32::from);
                let indirect = Desc {
                    addr: slot,
                    len,
                    flags: F_INDIRECT,
                    next: 0,
                };
                self.set_desc(mem, head, indirect);
                self.chains.push((head, indices));
                head
            }
        };
        self.publish(mem, head);
    }
}

/// Whether two ranges overlap.
pub fn overlaps(a: &std::ops::Range<u64>, b: &std::ops::Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}
