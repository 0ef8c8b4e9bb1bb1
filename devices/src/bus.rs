//! An address bus that routes guest accesses to the device owning the address.
//!
//! The same type serves the port I/O bus (16-bit addresses) and the MMIO bus
//! (64-bit addresses). It is shared by every vCPU thread as `Arc<Bus>`, so all
//! methods take `&self`; the range map sits behind an `RwLock` that is only
//! held while looking a device up, never while a device runs.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use log::warn;
use thiserror::Error;

use crate::BusDevice;

/// A half-open address range `[base, base + len)` claimed by one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BusRange {
    /// First address of the range.
    pub base: u64,
    /// Number of addresses in the range.
    pub len: u64,
}

impl BusRange {
    /// Builds a range, rejecting an empty one and one that would run past
    /// the end of the 64-bit address space.
    pub fn new(base: u64, len: u64) -> Result<Self, BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        if base.checked_add(len).is_none() {
            return Err(BusError::Overflow { base, len });
        }
        Ok(BusRange { base, len })
    }

    /// One past the last address of the range.
    ///
    /// Saturates rather than wrapping, so a hand-built range that was never
    /// validated by [`BusRange::new`] cannot make this panic.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }

    /// Last address inside the range (`base` for an empty range).
    fn last(&self) -> u64 {
        self.base.saturating_add(self.len.saturating_sub(1))
    }

    /// Whether `addr` lies inside the range.
    pub fn contains(&self, addr: u64) -> bool {
        // Subtracting avoids computing `base + len`, which may not fit.
        addr >= self.base && addr - self.base < self.len
    }

    /// Whether the two ranges share at least one address. Empty ranges
    /// overlap nothing; touching ranges (`a.end() == b.base`) do not overlap.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.len != 0 && other.len != 0 && self.base <= other.last() && other.base <= self.last()
    }
}

impl fmt::Display for BusRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{:#x}, {:#x})", self.base, self.end())
    }
}

/// Errors from inserting, moving or accessing devices on a [`Bus`].
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BusError {
    /// The requested range collides with a range already on the bus.
    #[error("bus range {new} overlaps existing range {existing}")]
    Overlap {
        /// The range that was being inserted or moved to.
        new: BusRange,
        /// The range already on the bus that it collides with.
        existing: BusRange,
    },
    /// A range of length zero was requested.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Base of the rejected range.
        base: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("bus range at {base:#x} with length {len:#x} overflows the address space")]
    Overflow {
        /// Base of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// No device claims the accessed address.
    #[error("no device at address {0:#x}")]
    NoDevice(u64),
    /// The access starts inside a device's range but runs past its end.
    #[error("access of {len} bytes at {addr:#x} runs past the end of device range {range}")]
    AccessOutOfRange {
        /// First address of the access.
        addr: u64,
        /// Width of the access in bytes.
        len: usize,
        /// The range of the device that owns `addr`.
        range: BusRange,
    },
    /// The access width is not 1, 2, 4 or 8 bytes.
    #[error("invalid access size {0}: must be 1, 2, 4 or 8 bytes")]
    InvalidAccessSize(usize),
    /// No range starts at the given base (for `remove` / `update_range`).
    #[error("no device range starts at {0:#x}")]
    NotFound(u64),
}

/// A device as stored in the map; the key is the range base.
struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of non-overlapping address ranges, each routed to one device.
#[derive(Default)]
pub struct Bus {
    // Keyed by range base: ranges never overlap, so the owner of an address
    // is the entry with the greatest base not above it.
    devices: RwLock<BTreeMap<u64, Entry>>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.read_map();
        f.debug_list()
            .entries(map.iter().map(|(&base, e)| BusRange { base, len: e.len }))
            .finish()
    }
}

/// Returns the entry whose range contains `addr`, if any.
fn lookup(map: &BTreeMap<u64, Entry>, addr: u64) -> Option<(BusRange, &Entry)> {
    let (&base, entry) = map.range(..=addr).next_back()?;
    let range = BusRange {
        base,
        len: entry.len,
    };
    range.contains(addr).then_some((range, entry))
}

/// Finds a range in `map`, other than the one based at `skip`, that overlaps
/// `new`.
fn find_overlap(map: &BTreeMap<u64, Entry>, new: &BusRange, skip: Option<u64>) -> Option<BusRange> {
    // Ranges are disjoint and sorted, so if any range overlaps `new`, the one
    // with the greatest base not above `new`'s last address does: any range
    // overlapping `new` ends after `new.base`, and every later range starts
    // after it ends. Skipping one entry keeps that argument intact.
    map.range(..=new.last())
        .rev()
        .find(|(&base, _)| Some(base) != skip)
        .map(|(&base, e)| BusRange { base, len: e.len })
        .filter(|existing| existing.overlaps(new))
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    // A poisoned lock only means some thread panicked while holding it; the
    // map itself is never left half-updated (every mutation is a single
    // BTreeMap call), so keep serving the guest instead of panicking too.
    fn read_map(&self) -> RwLockReadGuard<'_, BTreeMap<u64, Entry>> {
        self.devices.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_map(&self) -> RwLockWriteGuard<'_, BTreeMap<u64, Entry>> {
        self.devices.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Places `device` at `[base, base + len)`.
    ///
    /// Fails if the range is empty, overflows, or overlaps a range already on
    /// the bus; adjacent ranges are fine.
    pub fn insert(
        &self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        let new = BusRange::new(base, len)?;
        let mut map = self.write_map();
        if let Some(existing) = find_overlap(&map, &new, None) {
            return Err(BusError::Overlap { new, existing });
        }
        map.insert(base, Entry { len, device });
        Ok(())
    }

    /// Removes the device whose range starts exactly at `base` and returns it.
    pub fn remove(&self, base: u64) -> Result<Arc<Mutex<dyn BusDevice>>, BusError> {
        self.write_map()
            .remove(&base)
            .map(|e| e.device)
            .ok_or(BusError::NotFound(base))
    }

    /// Removes every device, e.g. when the VM is torn down: a device that
    /// holds the bus it sits on (the PCI root, through its BAR relocation)
    /// would otherwise keep itself and the bus alive. The devices are
    /// dropped after the map lock is released, so their `Drop` may use the
    /// bus.
    pub fn clear(&self) {
        let devices = std::mem::take(&mut *self.write_map());
        drop(devices);
    }

    /// Moves the device whose range starts at `old_base` to
    /// `[new_base, new_base + new_len)`, e.g. after the guest reprogrammed a
    /// PCI BAR.
    ///
    /// The move is atomic: if the new range is invalid or overlaps another
    /// device, the bus is left unchanged. The new range may overlap the
    /// device's own old range.
    pub fn update_range(&self, old_base: u64, new_base: u64, new_len: u64) -> Result<(), BusError> {
        let new = BusRange::new(new_base, new_len)?;
        let mut map = self.write_map();
        if !map.contains_key(&old_base) {
            return Err(BusError::NotFound(old_base));
        }
        if let Some(existing) = find_overlap(&map, &new, Some(old_base)) {
            return Err(BusError::Overlap { new, existing });
        }
        // Checked above, and the write lock is still held.
        if let Some(mut entry) = map.remove(&old_base) {
            entry.len = new_len;
            map.insert(new_base, entry);
        }
        Ok(())
    }

    /// Returns the range that contains `addr`, if any.
    pub fn range_of(&self, addr: u64) -> Option<BusRange> {
        lookup(&self.read_map(), addr).map(|(range, _)| range)
    }

    /// Returns the range containing `addr` and the device that owns it.
    pub fn device_at(&self, addr: u64) -> Option<(BusRange, Arc<Mutex<dyn BusDevice>>)> {
        lookup(&self.read_map(), addr).map(|(range, e)| (range, Arc::clone(&e.device)))
    }

    /// Validates an access of `len` bytes at `addr` and returns the owning
    /// device with its range. The map lock is released on return, so the
    /// device can be called without it (and may itself reconfigure the bus).
    fn resolve(
        &self,
        addr: u64,
        len: usize,
    ) -> Result<(BusRange, Arc<Mutex<dyn BusDevice>>), BusError> {
        if !matches!(len, 1 | 2 | 4 | 8) {
            return Err(BusError::InvalidAccessSize(len));
        }
        let (range, device) = self.device_at(addr).ok_or(BusError::NoDevice(addr))?;
        // `contains` guarantees addr >= base; the access must also end inside
        // the range. Never truncate: a partial access would hide guest bugs.
        let fits = (addr - range.base)
            .checked_add(len as u64)
            .is_some_and(|end| end <= range.len);
        if !fits {
            return Err(BusError::AccessOutOfRange { addr, len, range });
        }
        Ok((range, device))
    }

    /// Reads `data.len()` bytes at `addr` from the device that owns it.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> Result<(), BusError> {
        let (range, device) = self.resolve(addr, data.len())?;
        lock_device(&device, range).read(range.base, addr - range.base, data);
        Ok(())
    }

    /// Writes `data` at `addr` to the device that owns it.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), BusError> {
        let (range, device) = self.resolve(addr, data.len())?;
        lock_device(&device, range).write(range.base, addr - range.base, data);
        Ok(())
    }
}

/// Locks a device, recovering from poisoning: a device that panicked once
/// should not take every later guest access (and thus the VMM) down with it.
fn lock_device<'a>(
    device: &'a Mutex<dyn BusDevice + 'static>,
    range: BusRange,
) -> MutexGuard<'a, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|e| {
        warn!("device at {range} panicked earlier; continuing with its state as is");
        // Warn once per panic rather than on every later access.
        device.clear_poison();
        e.into_inner()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One access as seen by the device.
    #[derive(Debug, PartialEq, Eq)]
    struct Access {
        write: bool,
        base: u64,
        offset: u64,
        data: Vec<u8>,
    }

    type Log = Arc<Mutex<Vec<Access>>>;

    /// Records accesses into a shared log; reads return `offset + i` per byte
    /// so tests can check which bytes came from where.
    struct Recorder {
        log: Log,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(i as u8);
            }
            self.log.lock().unwrap().push(Access {
                write: false,
                base,
                offset,
                data: data.to_vec(),
            });
        }

        fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
            self.log.lock().unwrap().push(Access {
                write: true,
                base,
                offset,
                data: data.to_vec(),
            });
        }
    }

    fn recorder() -> (Arc<Mutex<dyn BusDevice>>, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let dev = Arc::new(Mutex::new(Recorder {
            log: Arc::clone(&log),
        }));
        (dev, log)
    }

    fn dummy() -> Arc<Mutex<dyn BusDevice>> {
        recorder().0
    }

    fn r(base: u64, len: u64) -> BusRange {
        BusRange { base, len }
    }

    #[test]
    fn range_helpers() {
        let a = r(0x10, 0x10);
        assert_eq!(a.end(), 0x20);
        assert!(!a.contains(0xf));
        assert!(a.contains(0x10));
        assert!(a.contains(0x1f));
        assert!(!a.contains(0x20));
        assert!(a.overlaps(&r(0x1f, 1)));
        assert!(a.overlaps(&r(0, 0x11)));
        assert!(!a.overlaps(&r(0x20, 1)));
        assert!(!a.overlaps(&r(0, 0x10)));
        assert!(!a.overlaps(&r(0x15, 0)));
        // A range covering the top of the address space does not panic.
        let top = r(u64::MAX, 1);
        assert!(top.contains(u64::MAX));
        assert_eq!(top.end(), u64::MAX);
        assert!(top.overlaps(&r(u64::MAX - 1, 2)));
        assert_eq!(a.to_string(), "[0x10, 0x20)");
    }

    #[test]
    fn insert_rejects_zero_length_and_overflow() {
        let bus = Bus::new();
        assert_eq!(
            bus.insert(dummy(), 0x10, 0),
            Err(BusError::ZeroLength { base: 0x10 })
        );
        assert_eq!(
            bus.insert(dummy(), u64::MAX - 3, 8),
            Err(BusError::Overflow {
                base: u64::MAX - 3,
                len: 8
            })
        );
        assert!(bus.insert(dummy(), u64::MAX - 8, 8).is_ok());
        assert!(bus.range_of(0x10).is_none());
    }

    #[test]
    fn insert_rejects_every_overlap_shape() {
        let bus = Bus::new();
        bus.insert(dummy(), 0x100, 0x10).unwrap();
        let existing = r(0x100, 0x10);
        let cases = [
            (0x100, 0x10), // identical
            (0xf8, 0x10),  // partial, from the left
            (0x108, 0x10), // partial, to the right
            (0xf0, 0x40),  // containing
            (0x104, 0x4),  // contained
            (0x10f, 1),    // last byte only
            (0xff, 2),     // first byte only
        ];
        for (base, len) in cases {
            let err = bus.insert(dummy(), base, len).unwrap_err();
            assert_eq!(
                err,
                BusError::Overlap {
                    new: r(base, len),
                    existing
                },
                "case {base:#x}+{len:#x}"
            );
        }
        // Adjacent on both sides is fine.
        bus.insert(dummy(), 0xf0, 0x10).unwrap();
        bus.insert(dummy(), 0x110, 0x10).unwrap();
        assert_eq!(bus.range_of(0xff), Some(r(0xf0, 0x10)));
        assert_eq!(bus.range_of(0x110), Some(r(0x110, 0x10)));
    }

    #[test]
    fn overlap_found_behind_an_intermediate_range() {
        // A new range spanning a gap and then a device further right must
        // still be rejected, naming the colliding device.
        let bus = Bus::new();
        bus.insert(dummy(), 0x0, 0x10).unwrap();
        bus.insert(dummy(), 0x40, 0x10).unwrap();
        let err = bus.insert(dummy(), 0x20, 0x30).unwrap_err();
        assert_eq!(
            err,
            BusError::Overlap {
                new: r(0x20, 0x30),
                existing: r(0x40, 0x10)
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("[0x20, 0x50)") && msg.contains("[0x40, 0x50)"));
    }

    #[test]
    fn lookup_first_and_last_byte() {
        let bus = Bus::new();
        bus.insert(dummy(), 0x3f8, 8).unwrap();
        assert_eq!(bus.range_of(0x3f7), None);
        assert_eq!(bus.range_of(0x3f8), Some(r(0x3f8, 8)));
        assert_eq!(bus.range_of(0x3ff), Some(r(0x3f8, 8)));
        assert_eq!(bus.range_of(0x400), None);
        assert!(bus.device_at(0x3ff).is_some());
        assert!(bus.device_at(0x400).is_none());
        assert_eq!(bus.read(0x400, &mut [0]), Err(BusError::NoDevice(0x400)));
        assert_eq!(bus.write(0x3f7, &[0]), Err(BusError::NoDevice(0x3f7)));
    }

    #[test]
    fn device_at_returns_the_inserted_device() {
        let bus = Bus::new();
        let (dev, log) = recorder();
        bus.insert(Arc::clone(&dev), 0x1000, 0x100).unwrap();
        let (range, found) = bus.device_at(0x10ff).unwrap();
        assert_eq!(range, r(0x1000, 0x100));
        assert!(Arc::ptr_eq(&found, &dev));
        found.lock().unwrap().write(range.base, 3, &[7]);
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[test]
    fn widths_pass_base_offset_and_len() {
        let bus = Bus::new();
        let (dev, log) = recorder();
        bus.insert(dev, 0xd000_0000, 0x1000).unwrap();
        for (i, width) in [1usize, 2, 4, 8].into_iter().enumerate() {
            let addr = 0xd000_0000 + 0x10 * i as u64 + 8;
            let mut buf = vec![0u8; width];
            bus.read(addr, &mut buf).unwrap();
            let expected: Vec<u8> = (0..width as u8).map(|b| b + 0x10 * i as u8 + 8).collect();
            assert_eq!(buf, expected);
            let payload: Vec<u8> = (0..width as u8).map(|b| 0xa0 | b).collect();
            bus.write(addr, &payload).unwrap();
            let log = log.lock().unwrap();
            let n = log.len();
            assert_eq!(
                log[n - 2],
                Access {
                    write: false,
                    base: 0xd000_0000,
                    offset: addr - 0xd000_0000,
                    data: expected
                }
            );
            assert_eq!(
                log[n - 1],
                Access {
                    write: true,
                    base: 0xd000_0000,
                    offset: addr - 0xd000_0000,
                    data: payload
                }
            );
        }
    }

    #[test]
    fn invalid_widths_rejected() {
        let bus = Bus::new();
        let (dev, log) = recorder();
        bus.insert(dev, 0, 0x100).unwrap();
        for width in [0usize, 3, 5, 6, 7, 9, 16] {
            let mut buf = vec![0u8; width];
            assert_eq!(
                bus.read(0x10, &mut buf),
                Err(BusError::InvalidAccessSize(width))
            );
            assert_eq!(
                bus.write(0x10, &buf),
                Err(BusError::InvalidAccessSize(width))
            );
        }
        assert!(log.lock().unwrap().is_empty());
    }

    #[test]
    fn access_crossing_end_rejected() {
        let bus = Bus::new();
        let (dev, log) = recorder();
        bus.insert(dev, 0x60, 5).unwrap();
        // The device right after must not receive the tail either.
        let (next, next_log) = recorder();
        bus.insert(next, 0x65, 4).unwrap();

        // Ends exactly on the last byte: fine.
        bus.read(0x63, &mut [0; 2]).unwrap();
        bus.write(0x61, &[0; 4]).unwrap();
        assert_eq!(log.lock().unwrap().len(), 2);

        for (addr, width) in [(0x64u64, 2usize), (0x62, 4), (0x60, 8)] {
            let err = bus.read(addr, &mut vec![0; width]).unwrap_err();
            assert_eq!(
                err,
                BusError::AccessOutOfRange {
                    addr,
                    len: width,
                    range: r(0x60, 5)
                }
            );
            assert!(bus.write(addr, &vec![0; width]).is_err());
        }
        assert_eq!(log.lock().unwrap().len(), 2);
        assert!(next_log.lock().unwrap().is_empty());
    }

    #[test]
    fn access_at_top_of_address_space_does_not_overflow() {
        let bus = Bus::new();
        let (dev, log) = recorder();
        bus.insert(dev, u64::MAX - 7, 7).unwrap();
        bus.read(u64::MAX - 1, &mut [0]).unwrap();
        assert!(matches!(
            bus.read(u64::MAX - 1, &mut [0; 8]),
            Err(BusError::AccessOutOfRange { .. })
        ));
        assert_eq!(
            bus.read(u64::MAX, &mut [0]),
            Err(BusError::NoDevice(u64::MAX))
        );
        assert_eq!(log.lock().unwrap().len(), 1);
    }

    #[test]
    fn update_range_moves_device() {
        let bus = Bus::new();
        let (dev, log) = recorder();
        bus.insert(dev, 0xe000_0000, 0x1000).unwrap();
        bus.update_range(0xe000_0000, 0xf000_0000, 0x2000).unwrap();
        assert_eq!(bus.range_of(0xe000_0000), None);
        assert_eq!(bus.range_of(0xf000_1fff), Some(r(0xf000_0000, 0x2000)));
        bus.write(0xf000_1ff8, &[1; 8]).unwrap();
        let log = log.lock().unwrap();
        assert_eq!(log[0].base, 0xf000_0000);
        assert_eq!(log[0].offset, 0x1ff8);
    }

    #[test]
    fn update_range_is_atomic_on_failure() {
        let bus = Bus::new();
        let (a, a_log) = recorder();
        bus.insert(a, 0x1000, 0x100).unwrap();
        bus.insert(dummy(), 0x2000, 0x100).unwrap();

        let err = bus.update_range(0x1000, 0x1f80, 0x100).unwrap_err();
        assert_eq!(
            err,
            BusError::Overlap {
                new: r(0x1f80, 0x100),
                existing: r(0x2000, 0x100)
            }
        );
        assert_eq!(
            bus.update_range(0x1000, 0x3000, 0),
            Err(BusError::ZeroLength { base: 0x3000 })
        );
        assert_eq!(
            bus.update_range(0x1000, u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        // Still where it was, still reachable, nothing else moved.
        assert_eq!(bus.range_of(0x1000), Some(r(0x1000, 0x100)));
        assert_eq!(bus.range_of(0x1f80), None);
        assert_eq!(bus.range_of(0x2000), Some(r(0x2000, 0x100)));
        bus.read(0x1004, &mut [0; 4]).unwrap();
        assert_eq!(a_log.lock().unwrap()[0].base, 0x1000);
    }

    #[test]
    fn update_range_onto_own_old_range() {
        let bus = Bus::new();
        bus.insert(dummy(), 0x1000, 0x100).unwrap();
        // Neighbours on both sides, touching the moved range's new bounds.
        bus.insert(dummy(), 0xf00, 0x80).unwrap();
        bus.insert(dummy(), 0x1200, 0x100).unwrap();
        // Shift right, overlapping its old range.
        bus.update_range(0x1000, 0x1080, 0x100).unwrap();
        assert_eq!(bus.range_of(0x107f), None);
        assert_eq!(bus.range_of(0x1080), Some(r(0x1080, 0x100)));
        // Grow to the left over its old place up to the left neighbour.
        bus.update_range(0x1080, 0xf80, 0x280).unwrap();
        assert_eq!(bus.range_of(0xf80), Some(r(0xf80, 0x280)));
        assert_eq!(bus.range_of(0x11ff), Some(r(0xf80, 0x280)));
        assert_eq!(bus.range_of(0x1200), Some(r(0x1200, 0x100)));
        // Same base, only resized.
        bus.update_range(0xf80, 0xf80, 0x10).unwrap();
        assert_eq!(bus.range_of(0xf90), None);
        // But not over a neighbour.
        assert!(matches!(
            bus.update_range(0xf80, 0xf7f, 0x10),
            Err(BusError::Overlap { existing, .. }) if existing == r(0xf00, 0x80)
        ));
    }

    #[test]
    fn update_range_unknown_base() {
        let bus = Bus::new();
        bus.insert(dummy(), 0x1000, 0x100).unwrap();
        // Inside the range but not its base.
        assert_eq!(
            bus.update_range(0x1010, 0x5000, 0x10),
            Err(BusError::NotFound(0x1010))
        );
        assert_eq!(bus.range_of(0x1000), Some(r(0x1000, 0x100)));
    }

    #[test]
    fn remove_by_exact_base() {
        let bus = Bus::new();
        let (dev, _) = recorder();
        bus.insert(Arc::clone(&dev), 0x3f8, 8).unwrap();
        assert_eq!(bus.remove(0x3f9).err(), Some(BusError::NotFound(0x3f9)));
        let removed = bus.remove(0x3f8).unwrap();
        assert!(Arc::ptr_eq(&removed, &dev));
        assert_eq!(bus.range_of(0x3f8), None);
        assert_eq!(bus.read(0x3f8, &mut [0]), Err(BusError::NoDevice(0x3f8)));
        assert_eq!(bus.remove(0x3f8).err(), Some(BusError::NotFound(0x3f8)));
        // The space is free again.
        bus.insert(dev, 0x3f8, 8).unwrap();
    }

    /// A device that moves itself on the bus when written, like a BAR whose
    /// reprogramming is handled by the device that owns it.
    struct SelfMover {
        bus: Arc<Bus>,
    }

    impl BusDevice for SelfMover {
        fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }

        fn write(&mut self, base: u64, _offset: u64, data: &[u8]) {
            let mut new_base = [0u8; 8];
            new_base[..data.len()].copy_from_slice(data);
            self.bus
                .update_range(base, u64::from_le_bytes(new_base), 0x10)
                .unwrap();
        }
    }

    #[test]
    fn device_can_update_bus_from_inside_an_access() {
        let bus = Arc::new(Bus::new());
        let dev = Arc::new(Mutex::new(SelfMover {
            bus: Arc::clone(&bus),
        }));
        bus.insert(dev, 0x100, 0x10).unwrap();
        // Would deadlock if the map lock were held while calling the device.
        bus.write(0x100, &0x200u32.to_le_bytes()).unwrap();
        assert_eq!(bus.range_of(0x100), None);
        let mut buf = [0u8; 4];
        bus.read(0x20c, &mut buf).unwrap();
        assert_eq!(buf, [0x5a; 4]);
    }

    #[test]
    fn clear_drops_devices_that_hold_the_bus() {
        let bus = Arc::new(Bus::new());
        let dev = Arc::new(Mutex::new(SelfMover {
            bus: Arc::clone(&bus),
        }));
        let weak = Arc::downgrade(&dev);
        bus.insert(dev, 0x100, 0x10).unwrap();
        bus.insert(dummy(), 0x60, 5).unwrap();
        bus.clear();
        assert!(weak.upgrade().is_none());
        assert_eq!(Arc::strong_count(&bus), 1);
        assert_eq!(bus.read(0x60, &mut [0]), Err(BusError::NoDevice(0x60)));
    }

    struct Panicky;

    impl BusDevice for Panicky {
        fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
            if offset == 0 {
                panic!("device bug");
            }
            data.fill(1);
        }

        fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn poisoned_device_lock_is_recovered() {
        let bus = Bus::new();
        let dev: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Panicky));
        bus.insert(Arc::clone(&dev), 0, 4).unwrap();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = bus.read(0, &mut [0]);
        }));
        assert!(res.is_err());
        assert!(dev.is_poisoned());
        let mut buf = [0u8; 2];
        bus.read(2, &mut buf).unwrap();
        assert_eq!(buf, [1, 1]);
        assert!(!dev.is_poisoned());
        bus.write(1, &[0]).unwrap();
    }

    #[test]
    fn concurrent_access_from_many_threads() {
        let bus = Arc::new(Bus::new());
        let (dev, log) = recorder();
        bus.insert(dev, 0x1000, 0x10).unwrap();
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let bus = Arc::clone(&bus);
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        bus.write(0x1000 + i * 4, &[i as u8; 4]).unwrap();
                        // Churn the map while others access it.
                        bus.insert(dummy(), 0x8000 + i * 0x10, 0x10).unwrap();
                        bus.remove(0x8000 + i * 0x10).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(log.lock().unwrap().len(), 400);
    }

    #[test]
    fn debug_lists_ranges() {
        let bus = Bus::new();
        bus.insert(dummy(), 0x60, 5).unwrap();
        bus.insert(dummy(), 0x3f8, 8).unwrap();
        assert_eq!(
            format!("{bus:?}"),
            "[BusRange { base: 96, len: 5 }, BusRange { base: 1016, len: 8 }]"
        );
    }
}
