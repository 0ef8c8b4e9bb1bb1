//! Test support: the driver's side of a split virtqueue laid out by hand in
//! guest memory ([`TestRing`]), and what device tests need around it
//! (activation, an interrupt recorder, waiting for a device thread).
//!
//! The block benchmark includes this file with `#[path]`. It therefore uses
//! only vm-memory, virtio-queue, vmm-sys-util and, through `crate::`, the
//! names the crate root exports, which the benchmark imports at its root.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{GuestMemoryMmapAtomic, QueueActivation, VirtioInterrupt, VirtioInterruptType};

/// Descriptor flags (virtio 1.2 §2.7.5): the chain continues in `next`.
pub const F_NEXT: u16 = 1;
/// The buffer is device-writable.
pub const F_WRITE: u16 = 2;
/// The buffer is an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// Size of the guest RAM of [`guest_memory`].
pub const MEM_SIZE: usize = 4 << 20;

/// 4 MiB of guest RAM at guest-physical 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// The same memory as devices take it.
pub fn atomic(mem: &GuestMemoryMmap) -> GuestMemoryMmapAtomic {
    GuestMemoryAtomic::new(mem.clone())
}

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

/// A split ring at a fixed place in guest memory, played by the test.
pub struct TestRing {
    mem: GuestMemoryMmap,
    size: u16,
    desc_table: u64,
    avail: u64,
    used: u64,
    next_desc: u16,
}

impl TestRing {
    /// Lays out a ring of `size` entries at `base` (16-byte aligned), with
    /// the available and used rings zeroed.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> TestRing {
        let desc_table = base;
        let avail = desc_table + 16 * u64::from(size);
        // flags, idx, ring[size], used_event; the used ring is 4-aligned.
        let avail_len = 6 + 2 * usize::from(size);
        let used = (avail + avail_len as u64 + 3) & !3;
        let used_len = 6 + 8 * usize::from(size);
        let zeroes = vec![0u8; used_len];
        mem.write_slice(&zeroes[..avail_len], GuestAddress(avail))
            .expect("avail ring in memory");
        mem.write_slice(&zeroes, GuestAddress(used))
            .expect("used ring in memory");
        TestRing {
            mem: mem.clone(),
            size,
            desc_table,
            avail,
            used,
            next_desc: 0,
        }
    }

    /// A device-side queue configured as a driver would, ready for use.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("valid queue size");
        q.set_size(self.size);
        let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
        let (lo, hi) = split(self.desc_table);
        q.set_desc_table_address(lo, hi);
        let (lo, hi) = split(self.avail);
        q.set_avail_ring_address(lo, hi);
        let (lo, hi) = split(self.used);
        q.set_used_ring_address(lo, hi);
        q.set_ready(true);
        q
    }

    /// The queue as handed to `activate` as queue `index`, and the eventfd
    /// that kicks it.
    pub fn activation(&self, index: u16) -> (QueueActivation, EventFd) {
        let notifier = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = notifier.try_clone().unwrap();
        (
            QueueActivation {
                index,
                queue: self.queue(),
                notifier,
            },
            kick,
        )
    }

    /// Writes descriptor `index` of the ring verbatim.
    pub fn set_desc(&self, index: u16, desc: Desc) {
        self.write_indirect_table(self.desc_table + 16 * u64::from(index), &[desc]);
    }

    /// Writes `descs` verbatim as consecutive descriptors at `addr`, e.g.
    /// an indirect table.
    pub fn write_indirect_table(&self, addr: u64, descs: &[Desc]) {
        for (at, desc) in (addr..).step_by(16).zip(descs) {
            self.mem
                .write_slice(&desc.to_bytes(), GuestAddress(at))
                .expect("descriptor table in memory");
        }
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
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(slot))
            .expect("avail ring in memory");
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// Writes and publishes a chain; returns its head.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.write_chain(descs);
        self.publish(head);
        head
    }

    /// The driver's available index.
    pub fn avail_idx(&self) -> u16 {
        u16::from_le(self.read(self.avail + 2))
    }

    /// Overwrites the available index (hostile drivers do).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .expect("avail ring in memory");
    }

    /// Sets `used_event` (VIRTIO_RING_F_EVENT_IDX interrupt suppression).
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem
            .write_obj(idx.to_le(), GuestAddress(at))
            .expect("avail ring in memory");
    }

    /// The `avail_event` the device published.
    pub fn avail_event(&self) -> u16 {
        u16::from_le(self.read(self.used + 4 + 8 * u64::from(self.size)))
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.read(self.used + 2))
    }

    /// The used element at ring position `pos`: (descriptor id, length).
    pub fn used_elem(&self, pos: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(pos % self.size);
        let id: u32 = self.read(at);
        let len: u32 = self.read(at + 4);
        (u32::from_le(id), u32::from_le(len))
    }

    /// Waits until the used index reaches `n` (device on another thread).
    pub fn wait_used(&self, n: u16) -> bool {
        wait_until(|| self.used_idx() == n)
    }

    fn read<T: vm_memory::ByteValued>(&self, at: u64) -> T {
        self.mem.read_obj(GuestAddress(at)).expect("ring in memory")
    }
}

/// Polls `cond` for up to ten seconds; returns whether it became true.
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Records every interrupt a device raises.
#[derive(Default)]
pub struct RecordingInterrupt {
    /// Interrupts in the order raised.
    pub fired: Mutex<Vec<VirtioInterruptType>>,
    /// How many times the device asked for a reset.
    pub needs_reset: Mutex<usize>,
}

impl RecordingInterrupt {
    /// How many times queue `index` was signalled.
    pub fn count(&self, index: u16) -> usize {
        self.fired
            .lock()
            .unwrap()
            .iter()
            .filter(|t| **t == VirtioInterruptType::Queue(index))
            .count()
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> std::io::Result<()> {
        self.fired.lock().unwrap().push(int_type);
        Ok(())
    }

    fn set_needs_reset(&self) {
        *self.needs_reset.lock().unwrap() += 1;
    }
}
