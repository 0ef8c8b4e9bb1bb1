//! A driver-side view of a split virtqueue laid out by hand in guest
//! memory, for unit tests and benchmarks.
//!
//! Self-contained (only vm-memory and virtio-queue) so that the benchmark
//! can include it with `#[path]`.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Descriptor flags (virtio 1.2 §2.7.5).
pub const F_NEXT: u16 = 1;
/// The buffer is device-writable.
pub const F_WRITE: u16 = 2;
/// The buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// One descriptor as the driver writes it.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

impl Desc {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }

    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Desc {
        Desc {
            addr,
            len,
            flags: F_WRITE,
            next: 0,
        }
    }

    fn to_bytes(self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// A split ring at a fixed place in guest memory.
pub struct TestRing<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub size: u16,
    pub desc_table: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    next_desc: u16,
}

impl<'a> TestRing<'a> {
    /// Lays out a ring of `size` entries at `base` (16-byte aligned).
    pub fn new(mem: &'a GuestMemoryMmap, base: GuestAddress, size: u16) -> TestRing<'a> {
        let desc_table = base;
        let avail = desc_table.unchecked_add(16 * u64::from(size));
        // flags, idx, ring[size], used_event; the used ring is 4-aligned.
        let avail_end = avail.unchecked_add(6 + 2 * u64::from(size));
        let used = GuestAddress((avail_end.raw_value() + 3) & !3);
        let ring = TestRing {
            mem,
            size,
            desc_table,
            avail,
            used,
            next_desc: 0,
        };
        // Zero flags and indices.
        let used_len = 6 + 8 * usize::from(size);
        let zeroes = vec![0u8; used_len];
        mem.write_slice(&zeroes[..6 + 2 * usize::from(size)], avail)
            .expect("avail ring in memory");
        mem.write_slice(&zeroes, used).expect("used ring in memory");
        ring
    }

    /// A queue configured like a driver would, ready for use.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("valid queue size");
        q.set_size(self.size);
        q.set_desc_table_address(
            Some(self.desc_table.raw_value() as u32),
            Some((self.desc_table.raw_value() >> 32) as u32),
        );
        q.set_avail_ring_address(
            Some(self.avail.raw_value() as u32),
            Some((self.avail.raw_value() >> 32) as u32),
        );
        q.set_used_ring_address(
            Some(self.used.raw_value() as u32),
            Some((self.used.raw_value() >> 32) as u32),
        );
        q.set_ready(true);
        q
    }

    /// Writes descriptor `index` verbatim.
    pub fn set_desc(&self, index: u16, desc: Desc) {
        let addr = self.desc_table.unchecked_add(16 * u64::from(index));
        self.mem
            .write_slice(&desc.to_bytes(), addr)
            .expect("descriptor table in memory");
    }

    /// Writes `descs` as a chain into consecutive free descriptors (setting
    /// NEXT links) and returns the head index, without publishing it.
    pub fn write_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let mut d = *d;
            if i + 1 < descs.len() {
                d.flags |= F_NEXT;
                d.next = (index + 1) % self.size;
            }
            self.set_desc(index, d);
        }
        self.next_desc = (head + descs.len() as u16) % self.size;
        head
    }

    /// Makes `head` available (without a notification).
    pub fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail.unchecked_add(4 + 2 * u64::from(idx % self.size));
        self.mem
            .write_obj(head.to_le(), slot)
            .expect("avail ring in memory");
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Writes and publishes a chain; returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.write_chain(descs);
        self.publish(head);
        head
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.avail.unchecked_add(2))
            .expect("avail ring in memory")
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, self.avail.unchecked_add(2))
            .expect("avail ring in memory");
    }

    /// Sets `used_event` (VIRTIO_RING_F_EVENT_IDX).
    pub fn set_used_event(&self, value: u16) {
        self.mem
            .write_obj(
                value,
                self.avail.unchecked_add(4 + 2 * u64::from(self.size)),
            )
            .expect("avail ring in memory");
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj::<u16>(self.used.unchecked_add(2))
            .expect("used ring in memory")
    }

    /// The used element at ring position `pos`: (descriptor id, length).
    pub fn used_elem(&self, pos: u16) -> (u32, u32) {
        let at = self.used.unchecked_add(4 + 8 * u64::from(pos % self.size));
        let id = self.mem.read_obj::<u32>(at).expect("used ring in memory");
        let len = self
            .mem
            .read_obj::<u32>(at.unchecked_add(4))
            .expect("used ring in memory");
        (id, len)
    }
}
