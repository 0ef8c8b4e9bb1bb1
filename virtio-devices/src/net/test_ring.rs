//! Test support: a tiny split-ring "driver" that lays out a descriptor
//! table, available ring and used ring in guest memory and plays the
//! guest's part, plus an interrupt recorder.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{GuestMemoryMmapAtomic, QueueActivation, VirtioInterrupt, VirtioInterruptType};

/// Descriptor continues in `next`.
pub const F_NEXT: u16 = 1;
/// Device-writable buffer.
pub const F_WRITE: u16 = 2;
/// Buffer holds an indirect descriptor table.
pub const F_INDIRECT: u16 = 4;

/// Size of the test guest's RAM.
pub const MEM_SIZE: usize = 4 << 20;

/// 4 MiB of guest RAM at guest-physical 0.
pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// The same memory as devices take it.
pub fn atomic(mem: &GuestMemoryMmap) -> GuestMemoryMmapAtomic {
    GuestMemoryAtomic::new(mem.clone())
}

/// Records every interrupt a device raises.
#[derive(Default)]
pub struct RecordingInterrupt {
    /// Interrupts in the order raised.
    pub fired: Mutex<Vec<VirtioInterruptType>>,
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
}

/// The guest side of one split virtqueue.
pub struct TestRing {
    mem: GuestMemoryMmap,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    next_free: u16,
    avail_idx: u16,
}

impl TestRing {
    /// A ring of `size` entries whose structures start at `base`.
    pub fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let desc = base;
        let avail = desc + 16 * u64::from(size);
        // used_event follows the available ring; the used ring is 4-aligned.
        let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
        TestRing {
            mem: mem.clone(),
            size,
            desc,
            avail,
            used,
            next_free: 0,
            avail_idx: 0,
        }
    }

    /// A device-side queue configured as a transport would.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(Some(self.desc as u32), Some((self.desc >> 32) as u32));
        q.set_avail_ring_address(Some(self.avail as u32), Some((self.avail >> 32) as u32));
        q.set_used_ring_address(Some(self.used as u32), Some((self.used >> 32) as u32));
        q.set_ready(true);
        q
    }

    /// The queue as handed to `activate`, and the eventfd that kicks it.
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

    /// Writes descriptor `i` verbatim.
    pub fn write_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        self.mem.write_obj(addr.to_le(), at).unwrap();
        self.mem
            .write_obj(len.to_le(), GuestAddress(at.0 + 8))
            .unwrap();
        self.mem
            .write_obj(flags.to_le(), GuestAddress(at.0 + 12))
            .unwrap();
        self.mem
            .write_obj(next.to_le(), GuestAddress(at.0 + 14))
            .unwrap();
    }

    /// Builds a chain of `(addr, len, device-writable)` buffers in free
    /// descriptors and makes it available; returns its head.
    pub fn add_chain(&mut self, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_free;
        for (n, (addr, len, writable)) in bufs.iter().enumerate() {
            let i = self.next_free;
            self.next_free = (self.next_free + 1) % self.size;
            let mut flags = if *writable { F_WRITE } else { 0 };
            if n + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            self.write_desc(i, *addr, *len, flags, self.next_free);
        }
        self.publish(head);
        head
    }

    /// Puts `head` in the available ring without touching descriptors.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head.to_le(), GuestAddress(self.avail + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.set_avail_idx(self.avail_idx);
    }

    /// Overwrites the available index (hostile drivers do).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx.to_le(), GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Sets `used_event` (EVENT_IDX interrupt suppression).
    pub fn set_used_event(&self, idx: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(idx.to_le(), GuestAddress(at)).unwrap();
    }

    /// The `avail_event` the device published.
    pub fn avail_event(&self) -> u16 {
        let at = self.used + 4 + 8 * u64::from(self.size);
        u16::from_le(self.mem.read_obj(GuestAddress(at)).unwrap())
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        u16::from_le(self.mem.read_obj(GuestAddress(self.used + 2)).unwrap())
    }

    /// Used ring entry `n`: (descriptor head, bytes written).
    pub fn used_elem(&self, n: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(n % self.size);
        let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
        (u32::from_le(id), u32::from_le(len))
    }

    /// Waits until the used index reaches `n` (device on another thread).
    pub fn wait_used(&self, n: u16) -> bool {
        wait_until(|| self.used_idx() == n)
    }
}

/// Polls `cond` for up to five seconds.
pub fn wait_until(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}
