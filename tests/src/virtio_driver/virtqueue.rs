//! The driver's side of a split virtqueue (virtio 1.2 §2.7), laid out by
//! the driver in guest memory: descriptor table, available ring, used ring.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::DriverError;

/// Descriptor flag: the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;

const DESC_SIZE: u64 = 16;

/// Where the three parts of a queue of `size` entries go when packed from
/// `base` (which must be 16-byte aligned): (descriptor table, available
/// ring, used ring, total bytes). The used ring is 4-byte aligned.
pub fn layout(size: u16, base: u64) -> (u64, u64, u64, u64) {
    let n = u64::from(size);
    let desc = base;
    let avail = desc + DESC_SIZE * n;
    // flags, idx, ring[n], used_event
    let avail_len = 2 + 2 + 2 * n + 2;
    let used = (avail + avail_len + 3) & !3;
    // flags, idx, ring[n] of (id u32, len u32), avail_event
    let used_len = 2 + 2 + 8 * n + 2;
    (desc, avail, used, used + used_len - base)
}

/// One buffer of a chain: guest address, length, device-writable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Whether the device writes it.
    pub writable: bool,
}

impl Buffer {
    /// A buffer the device reads.
    pub fn readable(addr: u64, len: u32) -> Self {
        Buffer {
            addr,
            len,
            writable: false,
        }
    }

    /// A buffer the device writes.
    pub fn writable(addr: u64, len: u32) -> Self {
        Buffer {
            addr,
            len,
            writable: true,
        }
    }
}

/// A split virtqueue as the driver keeps it.
pub struct SplitQueue {
    mem: GuestMemoryMmap,
    /// Queue index.
    pub index: u16,
    /// Number of entries.
    pub size: u16,
    /// Guest address of the descriptor table.
    pub desc: u64,
    /// Guest address of the available ring.
    pub avail: u64,
    /// Guest address of the used ring.
    pub used: u64,
    free: Vec<u16>,
    /// Descriptors of each in-flight chain, by head.
    in_flight: Vec<Vec<u16>>,
    next_avail: u16,
    last_used: u16,
    event_idx: bool,
}

impl SplitQueue {
    /// A queue of `size` entries (a power of two) laid out from `base`,
    /// zeroed. With `event_idx`, the driver asks for an interrupt after
    /// every used buffer through `used_event`.
    pub fn new(
        mem: &GuestMemoryMmap,
        index: u16,
        size: u16,
        base: u64,
        event_idx: bool,
    ) -> Result<Self, DriverError> {
        let (desc, avail, used, total) = layout(size, base);
        let zeros = vec![0u8; total as usize];
        mem.write_slice(&zeros, GuestAddress(base))
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        Ok(SplitQueue {
            mem: mem.clone(),
            index,
            size,
            desc,
            avail,
            used,
            free: (0..size).rev().collect(),
            in_flight: vec![Vec::new(); usize::from(size)],
            next_avail: 0,
            last_used: 0,
            event_idx,
        })
    }

    fn write<T: vm_memory::ByteValued>(&self, val: T, addr: u64) -> Result<(), DriverError> {
        self.mem
            .write_obj(val, GuestAddress(addr))
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    fn read<T: vm_memory::ByteValued>(&self, addr: u64) -> Result<T, DriverError> {
        self.mem
            .read_obj(GuestAddress(addr))
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    /// Writes descriptor `index` of the table directly (for tests that
    /// build hostile chains).
    pub fn write_descriptor(
        &self,
        index: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), DriverError> {
        let at = self.desc + DESC_SIZE * u64::from(index);
        self.write(addr, at)?;
        self.write(len, at + 8)?;
        self.write(flags, at + 12)?;
        self.write(next, at + 14)
    }

    /// Makes the chain starting at `head` available and returns its
    /// position in the available ring.
    pub fn publish(&mut self, head: u16) -> Result<u16, DriverError> {
        let slot = self.next_avail % self.size;
        self.write(head, self.avail + 4 + 2 * u64::from(slot))?;
        if self.event_idx {
            // used_event: interrupt once the device uses the next entry.
            let used_event = self.avail + 4 + 2 * u64::from(self.size);
            self.write(self.last_used, used_event)?;
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        // The ring entry and descriptors must be visible before the index.
        fence(Ordering::Release);
        self.mem
            .store(
                self.next_avail,
                GuestAddress(self.avail + 2),
                Ordering::Release,
            )
            .map_err(|e| DriverError::Memory(e.to_string()))?;
        Ok(slot)
    }

    /// Builds a chain of `buffers` from free descriptors and makes it
    /// available; returns the head descriptor index.
    pub fn add_chain(&mut self, buffers: &[Buffer]) -> Result<u16, DriverError> {
        if buffers.is_empty() || buffers.len() > self.free.len() {
            return Err(DriverError::QueueFull);
        }
        let split = self.free.len() - buffers.len();
        let descs: Vec<u16> = self.free.split_off(split).into_iter().rev().collect();
        for (i, (buffer, &d)) in buffers.iter().zip(descs.iter()).enumerate() {
            let mut flags = if buffer.writable {
                VIRTQ_DESC_F_WRITE
            } else {
                0
            };
            let next = descs.get(i + 1).copied();
            if next.is_some() {
                flags |= VIRTQ_DESC_F_NEXT;
            }
            self.write_descriptor(d, buffer.addr, buffer.len, flags, next.unwrap_or(0))?;
        }
        let head = descs[0];
        self.in_flight[usize::from(head)] = descs;
        self.publish(head)?;
        Ok(head)
    }

    /// The device's used index.
    pub fn used_idx(&self) -> Result<u16, DriverError> {
        self.mem
            .load(GuestAddress(self.used + 2), Ordering::Acquire)
            .map_err(|e| DriverError::Memory(e.to_string()))
    }

    /// The next used element, `(head id, bytes written)`, if any; its
    /// descriptors go back to the free list.
    pub fn pop_used(&mut self) -> Result<Option<(u32, u32)>, DriverError> {
        if self.used_idx()? == self.last_used {
            return Ok(None);
        }
        let slot = u64::from(self.last_used % self.size);
        let elem = self.used + 4 + 8 * slot;
        let id: u32 = self.read(elem)?;
        let len: u32 = self.read(elem + 4)?;
        self.last_used = self.last_used.wrapping_add(1);
        if let Some(descs) = usize::try_from(id)
            .ok()
            .and_then(|i| self.in_flight.get_mut(i))
        {
            self.free.append(descs);
        }
        Ok(Some((id, len)))
    }

    /// Polls the used ring until an element arrives or `timeout` passes.
    pub fn wait_used(&mut self, timeout: Duration) -> Result<(u32, u32), DriverError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(used) = self.pop_used()? {
                return Ok(used);
            }
            if Instant::now() >= deadline {
                return Err(DriverError::Timeout("used buffer"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Asks for an interrupt when the device uses the next buffer, as a
    /// driver re-enabling callbacks does. With `event_idx` this moves
    /// `used_event` up to the used entries popped so far (otherwise only
    /// [`publish`](Self::publish) moves it, so buffers made available in a
    /// batch interrupt once); without it there is nothing to do, since this
    /// driver never sets VIRTQ_AVAIL_F_NO_INTERRUPT.
    pub fn enable_interrupts(&self) -> Result<(), DriverError> {
        if self.event_idx {
            let used_event = self.avail + 4 + 2 * u64::from(self.size);
            self.write(self.last_used, used_event)?;
            // The device must see the new used_event before the driver
            // looks at the used ring again.
            fence(Ordering::SeqCst);
        }
        Ok(())
    }

    /// Number of free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }
}
