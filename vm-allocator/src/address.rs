// Copyright 2025 The Trellis Authors
// SPDX-License-Identifier: Apache-2.0

//! Address spaces, ranges and the allocator for a single window.

use std::collections::BTreeMap;
use std::fmt;

use log::debug;
use rust_vmm_allocator::{AddressAllocator, AllocPolicy, RangeInclusive};

use crate::error::{EngineError, Error, Result};

/// Every allocation is carved out of the engine in multiples of this many
/// bytes, starting at a multiple of it.
///
/// Why: the rust-vmm engine (0.1.4) only merges a freed range with a free
/// neighbour it can find by probing the two bytes next to it, cannot place an
/// exact-address request on the last byte of a free node, and corrupts its
/// tree when freeing a range that starts at address 1. With no piece shorter
/// than 4 bytes and every boundary a multiple of 4, none of that can happen.
/// PCI BARs are at least 4 (I/O) or 16 (memory) bytes, so nothing is lost.
pub const GRANULE: u64 = 4;

/// One of the guest address windows devices are allocated from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddressSpace {
    /// x86 I/O port space (16-bit).
    Io,
    /// MMIO window below 4 GiB, for 32-bit BARs.
    Mmio32,
    /// MMIO window above RAM, for 64-bit BARs.
    Mmio64,
}

impl AddressSpace {
    /// All spaces, in a fixed order.
    pub const ALL: [AddressSpace; 3] =
        [AddressSpace::Io, AddressSpace::Mmio32, AddressSpace::Mmio64];
}

impl fmt::Display for AddressSpace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AddressSpace::Io => "I/O port",
            AddressSpace::Mmio32 => "32-bit MMIO",
            AddressSpace::Mmio64 => "64-bit MMIO",
        })
    }
}

/// Bounds of a window as configured: `[base, base + size)`.
///
/// Not validated on construction; [`SystemAllocator::new`] checks it.
///
/// [`SystemAllocator::new`]: crate::SystemAllocator::new
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AddressWindow {
    /// First address of the window.
    pub base: u64,
    /// Size of the window in bytes.
    pub size: u64,
}

impl AddressWindow {
    /// A window from its base and size.
    pub const fn new(base: u64, size: u64) -> Self {
        AddressWindow { base, size }
    }

    /// A window from its first and last (inclusive) addresses.
    pub fn from_inclusive(first: u64, last: u64) -> Result<Self> {
        let size = last
            .checked_sub(first)
            .and_then(|d| d.checked_add(1))
            .ok_or(Error::InvalidInclusiveRange { first, last })?;
        Ok(AddressWindow { base: first, size })
    }

    /// Exclusive end, `None` if it does not fit in 64 bits.
    pub fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }
}

impl fmt::Display for AddressWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end() {
            Some(end) => write!(f, "[{:#x}, {:#x})", self.base, end),
            None => write!(f, "[{:#x}, +{:#x})", self.base, self.size),
        }
    }
}

/// A non-empty range `[base, base + size)` in one address space.
///
/// The exclusive end always fits in 64 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GuestRange {
    space: AddressSpace,
    base: u64,
    size: u64,
}

impl GuestRange {
    /// A range; fails if `size` is zero or `base + size` overflows.
    pub fn new(space: AddressSpace, base: u64, size: u64) -> Result<Self> {
        if size == 0 || base.checked_add(size).is_none() {
            return Err(Error::InvalidRange { space, base, size });
        }
        Ok(GuestRange { space, base, size })
    }

    /// Address space of the range.
    pub fn space(&self) -> AddressSpace {
        self.space
    }

    /// First address.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size in bytes (as requested, not rounded to [`GRANULE`]).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Exclusive end, `base + size`.
    pub fn end(&self) -> u64 {
        // Cannot overflow: checked in `new`, the only constructor.
        self.base.saturating_add(self.size)
    }

    /// Last address, inclusive.
    pub fn last(&self) -> u64 {
        self.end().saturating_sub(1)
    }

    /// Whether `addr` lies in the range.
    pub fn contains(&self, addr: u64) -> bool {
        self.base <= addr && addr < self.end()
    }

    /// Whether both ranges are in the same space and share an address.
    pub fn overlaps(&self, other: &GuestRange) -> bool {
        self.space == other.space && self.base < other.end() && other.base < self.end()
    }
}

impl fmt::Display for GuestRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} range [{:#x}, {:#x})",
            self.space,
            self.base,
            self.end()
        )
    }
}

/// `size` rounded up to a whole number of granules.
fn granules(size: u64) -> Option<u64> {
    size.checked_add(GRANULE - 1).map(|s| s & !(GRANULE - 1))
}

/// Allocator for one window: the engine plus our own record of live
/// allocations.
///
/// Why the record: the engine's `free` accepts any node, free or not, and its
/// exact-address allocation does not check that the target node is free, so
/// we must decide ourselves what is allocated.
#[derive(Clone, Debug)]
pub(crate) struct WindowAllocator {
    space: AddressSpace,
    window: AddressWindow,
    engine: AddressAllocator,
    /// Live allocations: base -> requested size.
    live: BTreeMap<u64, u64>,
}

impl WindowAllocator {
    /// Validates the window's own shape (non-empty, no overflow, granule
    /// aligned, below `limit` if any) and builds its allocator.
    pub(crate) fn new(
        space: AddressSpace,
        window: AddressWindow,
        limit: Option<u64>,
    ) -> Result<Self> {
        if window.size == 0 {
            return Err(Error::EmptyWindow { space });
        }
        let end = window
            .end()
            .ok_or(Error::WindowOverflow { space, window })?;
        if window.base % GRANULE != 0 || window.size % GRANULE != 0 {
            return Err(Error::UnalignedWindow { space, window });
        }
        if let Some(limit) = limit {
            if end > limit {
                return Err(Error::WindowOutOfBounds {
                    space,
                    window,
                    limit,
                });
            }
        }
        let engine =
            AddressAllocator::new(window.base, window.size).map_err(|source| Error::Engine {
                space,
                op: "creating the allocator",
                source,
            })?;
        Ok(WindowAllocator {
            space,
            window,
            engine,
            live: BTreeMap::new(),
        })
    }

    pub(crate) fn window(&self) -> AddressWindow {
        self.window
    }

    /// Live allocations in address order.
    pub(crate) fn allocations(&self) -> impl Iterator<Item = GuestRange> + '_ {
        self.live.iter().map(|(&base, &size)| GuestRange {
            space: self.space,
            base,
            size,
        })
    }

    /// The engine's view of an allocation of `size` bytes at `base`.
    fn engine_range(&self, base: u64, size: u64) -> Result<RangeInclusive> {
        let overflow = |source| Error::Engine {
            space: self.space,
            op: "computing a range",
            source,
        };
        let len = granules(size).ok_or(overflow(EngineError::Overflow))?;
        let last = base
            .checked_add(len - 1)
            .ok_or(overflow(EngineError::Overflow))?;
        RangeInclusive::new(base, last).map_err(overflow)
    }

    /// First fit from the bottom of the window.
    pub(crate) fn allocate(&mut self, size: u64, align: u64) -> Result<GuestRange> {
        let space = self.space;
        if size == 0 {
            return Err(Error::ZeroSize { space });
        }
        if !align.is_power_of_two() {
            return Err(Error::InvalidAlignment { space, align });
        }
        let exhausted = Error::Exhausted { space, size, align };
        // A size that rounds past u64::MAX can never fit.
        let len = granules(size).ok_or(exhausted.clone())?;
        let r = self
            .engine
            .allocate(len, align.max(GRANULE), AllocPolicy::FirstMatch)
            .map_err(|source| match source {
                EngineError::ResourceNotAvailable => exhausted.clone(),
                source => Error::Engine {
                    space,
                    op: "first-fit allocation",
                    source,
                },
            })?;
        let range = GuestRange::new(space, r.start(), size)?;
        self.live.insert(range.base, size);
        debug!("allocated {range} (align {align:#x})");
        Ok(range)
    }

    /// Allocation at a fixed address.
    pub(crate) fn allocate_at(&mut self, addr: u64, size: u64) -> Result<GuestRange> {
        let space = self.space;
        if size == 0 {
            return Err(Error::ZeroSize { space });
        }
        let requested = GuestRange::new(space, addr, size)?;
        let window_end = self.window.end().unwrap_or(u64::MAX);
        if addr < self.window.base || requested.end() > window_end {
            return Err(Error::OutsideWindow {
                space,
                window: self.window,
                range: requested,
            });
        }
        if addr % GRANULE != 0 {
            return Err(Error::UnalignedAddress { space, addr });
        }
        let key = self.engine_range(addr, size)?;
        // Only the nearest allocation starting below our end can overlap:
        // live allocations never overlap each other.
        if let Some((&base, &len)) = self.live.range(..=key.end()).next_back() {
            let existing = self.engine_range(base, len)?;
            if existing.end() >= key.start() {
                return Err(Error::AddressInUse {
                    requested,
                    existing: GuestRange::new(space, base, len)?,
                });
            }
        }
        self.engine
            .allocate(key.len(), GRANULE, AllocPolicy::ExactMatch(addr))
            .map_err(|source| Error::Engine {
                space,
                op: "exact-address allocation",
                source,
            })?;
        self.live.insert(addr, size);
        debug!("allocated {requested} at a fixed address");
        Ok(requested)
    }

    /// Frees exactly one live allocation.
    pub(crate) fn free(&mut self, range: &GuestRange) -> Result<()> {
        if range.space != self.space || self.live.get(&range.base) != Some(&range.size) {
            return Err(Error::NotAllocated { range: *range });
        }
        let key = self.engine_range(range.base, range.size)?;
        self.engine.free(&key).map_err(|source| Error::Engine {
            space: self.space,
            op: "freeing a range",
            source,
        })?;
        self.live.remove(&range.base);
        debug!("freed {range}");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MMIO32: AddressSpace = AddressSpace::Mmio32;

    fn window(base: u64, size: u64) -> WindowAllocator {
        WindowAllocator::new(MMIO32, AddressWindow::new(base, size), None).unwrap()
    }

    /// xorshift64*: deterministic, good enough to shuffle test inputs.
    struct Prng(u64);

    impl Prng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn assert_disjoint(ranges: &[GuestRange]) {
        let mut sorted = ranges.to_vec();
        sorted.sort();
        for pair in sorted.windows(2) {
            assert!(
                pair[0].end() <= pair[1].base(),
                "{} overlaps {}",
                pair[0],
                pair[1]
            );
        }
    }

    #[test]
    fn display_names_the_space() {
        assert_eq!(AddressSpace::Io.to_string(), "I/O port");
        assert_eq!(AddressSpace::Mmio32.to_string(), "32-bit MMIO");
        assert_eq!(AddressSpace::Mmio64.to_string(), "64-bit MMIO");
        let r = GuestRange::new(MMIO32, 0x1000, 0x100).unwrap();
        assert_eq!(r.to_string(), "32-bit MMIO range [0x1000, 0x1100)");
        assert_eq!(AddressWindow::new(0x10, 0x10).to_string(), "[0x10, 0x20)");
        assert_eq!(
            AddressWindow::new(u64::MAX, 2).to_string(),
            "[0xffffffffffffffff, +0x2)"
        );
    }

    #[test]
    fn guest_range_accessors_and_validation() {
        let r = GuestRange::new(MMIO32, 0x1000, 0x100).unwrap();
        assert_eq!((r.space(), r.base(), r.size()), (MMIO32, 0x1000, 0x100));
        assert_eq!((r.end(), r.last()), (0x1100, 0x10ff));
        assert!(r.contains(0x1000) && r.contains(0x10ff));
        assert!(!r.contains(0xfff) && !r.contains(0x1100));
        let next = GuestRange::new(MMIO32, 0x1100, 1).unwrap();
        assert!(!r.overlaps(&next) && !next.overlaps(&r));
        let straddle = GuestRange::new(MMIO32, 0x10ff, 2).unwrap();
        assert!(r.overlaps(&straddle) && straddle.overlaps(&r));
        let other_space = GuestRange::new(AddressSpace::Io, 0x1000, 0x100).unwrap();
        assert!(!r.overlaps(&other_space));

        assert!(GuestRange::new(MMIO32, 0, 0).is_err());
        assert!(GuestRange::new(MMIO32, u64::MAX, 1).is_err());
        let top = GuestRange::new(MMIO32, u64::MAX - 1, 1).unwrap();
        assert_eq!((top.end(), top.last()), (u64::MAX, u64::MAX - 1));
    }

    #[test]
    fn window_from_inclusive() {
        assert_eq!(
            AddressWindow::from_inclusive(0x1000, 0xffff).unwrap(),
            AddressWindow::new(0x1000, 0xf000)
        );
        assert_eq!(AddressWindow::from_inclusive(5, 5).unwrap().size, 1);
        assert!(matches!(
            AddressWindow::from_inclusive(2, 1),
            Err(Error::InvalidInclusiveRange { first: 2, last: 1 })
        ));
        assert!(AddressWindow::from_inclusive(0, u64::MAX).is_err());
        assert_eq!(
            AddressWindow::from_inclusive(1, u64::MAX).unwrap().end(),
            None
        );
    }

    #[test]
    fn window_shape_is_validated() {
        let new = |b, s, l| WindowAllocator::new(MMIO32, AddressWindow::new(b, s), l);
        assert_eq!(
            new(0x1000, 0, None).unwrap_err(),
            Error::EmptyWindow { space: MMIO32 }
        );
        assert!(matches!(
            new(u64::MAX - 3, 8, None),
            Err(Error::WindowOverflow { .. })
        ));
        assert!(matches!(
            new(0x1002, 0x100, None),
            Err(Error::UnalignedWindow { .. })
        ));
        assert!(matches!(
            new(0x1000, 0x101, None),
            Err(Error::UnalignedWindow { .. })
        ));
        assert!(matches!(
            new(0x1000, 0x1000, Some(0x1fff)),
            Err(Error::WindowOutOfBounds { limit: 0x1fff, .. })
        ));
        assert!(new(0x1000, 0x1000, Some(0x2000)).is_ok());
        // Largest representable window that keeps its exclusive end in range.
        assert!(new(0, u64::MAX - 3, None).is_ok());
    }

    #[test]
    fn alignment_is_respected_for_many_sizes_and_alignments() {
        let sizes = [
            1, 2, 3, 4, 5, 0x10, 0x80, 0x100, 0x1000, 0x1234, 0x10000, 0x100000,
        ];
        for align_shift in 0..=20 {
            let align = 1u64 << align_shift;
            let mut w = window(0x1000_0004, 0x4000_0000);
            let mut got = Vec::new();
            // Push one unaligned allocation first so later ones have to skip.
            got.push(w.allocate(4, 1).unwrap());
            for &size in &sizes {
                let r = w.allocate(size, align).unwrap();
                assert_eq!(r.base() % align, 0, "size {size:#x} align {align:#x}");
                assert_eq!(r.size(), size);
                assert!(r.base() >= 0x1000_0004 && r.end() <= 0x5000_0004);
                got.push(r);
            }
            assert_disjoint(&got);
        }
        // Natural alignment, as BARs need.
        let mut w = window(0xc000_0000, 0x2000_0000);
        let mut got = Vec::new();
        for shift in 4..=24 {
            let r = w.allocate(1 << shift, 1 << shift).unwrap();
            assert_eq!(r.base() % (1 << shift), 0);
            got.push(r);
        }
        assert_disjoint(&got);
    }

    #[test]
    fn first_fit_from_the_bottom() {
        let mut w = window(0x1000, 0x10000);
        assert_eq!(w.allocate(0x100, 0x100).unwrap().base(), 0x1000);
        assert_eq!(w.allocate(0x100, 0x1000).unwrap().base(), 0x2000);
        // The hole left between 0x1100 and 0x2000 is used first.
        assert_eq!(w.allocate(0x100, 0x100).unwrap().base(), 0x1100);
    }

    #[test]
    fn small_sizes_use_whole_granules() {
        let mut w = window(0, 0x100);
        let a = w.allocate(1, 1).unwrap();
        let b = w.allocate(3, 1).unwrap();
        let c = w.allocate(5, 1).unwrap();
        assert_eq!((a.base(), a.size()), (0, 1));
        assert_eq!((b.base(), b.size()), (4, 3));
        assert_eq!((c.base(), c.size()), (8, 5));
        assert_eq!(w.allocate(1, 1).unwrap().base(), 0x10);
        // A window starting at 0 frees cleanly (the engine special-cases 0).
        w.free(&a).unwrap();
        assert_eq!(w.allocate_at(0, 4).unwrap().base(), 0);
    }

    #[test]
    fn invalid_size_and_alignment() {
        let mut w = window(0x1000, 0x1000);
        assert_eq!(
            w.allocate(0, 4).unwrap_err(),
            Error::ZeroSize { space: MMIO32 }
        );
        for align in [0, 3, 6, 0x1001, u64::MAX] {
            assert_eq!(
                w.allocate(4, align).unwrap_err(),
                Error::InvalidAlignment {
                    space: MMIO32,
                    align
                }
            );
        }
        assert_eq!(
            w.allocate_at(0x1000, 0).unwrap_err(),
            Error::ZeroSize { space: MMIO32 }
        );
        assert!(matches!(
            w.allocate(u64::MAX, 1),
            Err(Error::Exhausted { .. })
        ));
        assert!(matches!(
            w.allocate_at(0x1000, u64::MAX),
            Err(Error::InvalidRange { .. })
        ));
        assert_eq!(w.allocations().count(), 0);
    }

    #[test]
    fn exhaustion_names_the_window_and_freeing_makes_room() {
        let mut w = window(0xc000_0000, 0x10000);
        let all: Vec<_> = (0..16)
            .map(|_| w.allocate(0x1000, 0x1000).unwrap())
            .collect();
        let err = w.allocate(0x1000, 0x1000).unwrap_err();
        assert_eq!(
            err.to_string(),
            "no room for 0x1000 bytes aligned to 0x1000 in the 32-bit MMIO window"
        );
        assert_eq!(
            w.allocate(4, 4).unwrap_err(),
            Error::Exhausted {
                space: MMIO32,
                size: 4,
                align: 4
            }
        );
        w.free(&all[5]).unwrap();
        assert_eq!(w.allocate(0x1000, 0x1000).unwrap(), all[5]);

        // Free bytes exist, but no address with the required alignment.
        let mut w = window(0x1000, 0x2000);
        assert!(matches!(
            w.allocate(0x1000, 0x4000),
            Err(Error::Exhausted { .. })
        ));
        assert_eq!(w.allocate(0x1000, 0x2000).unwrap().base(), 0x2000);
    }

    #[test]
    fn freeing_everything_merges_back_into_one_hole() {
        let mut w = window(0x1000, 0x8000);
        let ranges: Vec<_> = (0..8).map(|_| w.allocate(0x1000, 1).unwrap()).collect();
        // Free in an order that exercises merging on both sides.
        for i in [1, 3, 0, 2, 6, 4, 7, 5] {
            w.free(&ranges[i]).unwrap();
        }
        assert_eq!(w.allocate(0x8000, 0x1000).unwrap().base(), 0x1000);
    }

    #[test]
    fn allocate_at_places_exactly_and_detects_conflicts() {
        let mut w = window(0x1000, 0x10000);
        let a = w.allocate_at(0x4000, 0x1000).unwrap();
        assert_eq!((a.base(), a.size()), (0x4000, 0x1000));
        for (addr, size) in [
            (0x4000, 0x1000),
            (0x3800, 0x1000),
            (0x4800, 0x1000),
            (0x3000, 0x3000),
            (0x4ffc, 4),
        ] {
            assert_eq!(
                w.allocate_at(addr, size).unwrap_err(),
                Error::AddressInUse {
                    requested: GuestRange::new(MMIO32, addr, size).unwrap(),
                    existing: a,
                },
                "{addr:#x}+{size:#x}"
            );
        }
        // Adjacent on both sides is fine.
        w.allocate_at(0x3000, 0x1000).unwrap();
        w.allocate_at(0x5000, 0x1000).unwrap();
        // A tail shorter than a granule still occupies the granule.
        w.allocate_at(0x6000, 2).unwrap();
        assert!(matches!(
            w.allocate_at(0x6000, 4),
            Err(Error::AddressInUse { .. })
        ));
        w.allocate_at(0x6004, 4).unwrap();
        // First fit skips all of those.
        assert_eq!(w.allocate(0x1000, 0x1000).unwrap().base(), 0x1000);
        assert_eq!(w.allocate(0x1000, 0x1000).unwrap().base(), 0x2000);
        assert_eq!(w.allocate(0x1000, 0x1000).unwrap().base(), 0x7000);
    }

    #[test]
    fn allocate_at_outside_or_unaligned() {
        let mut w = window(0x1000, 0x1000);
        for (addr, size) in [
            (0, 0x100),
            (0xf00, 0x200),
            (0x1f00, 0x200),
            (0x2000, 4),
            (u64::MAX - 4, 4),
        ] {
            assert!(
                matches!(w.allocate_at(addr, size), Err(Error::OutsideWindow { .. })),
                "{addr:#x}+{size:#x}"
            );
        }
        assert_eq!(
            w.allocate_at(0x1002, 2).unwrap_err(),
            Error::UnalignedAddress {
                space: MMIO32,
                addr: 0x1002
            }
        );
        let whole = w.allocate_at(0x1000, 0x1000).unwrap();
        w.free(&whole).unwrap();
        assert_eq!(w.allocate_at(0x1ffc, 4).unwrap().last(), 0x1fff);
    }

    #[test]
    fn allocate_at_inside_a_live_allocation_leaves_it_intact() {
        // The engine alone would split the live node and hand out its head.
        let mut w = window(0x1000, 0x2000);
        let a = w.allocate(0x1000, 0x1000).unwrap();
        assert!(matches!(
            w.allocate_at(a.base(), 0x800),
            Err(Error::AddressInUse { .. })
        ));
        assert!(matches!(
            w.allocate_at(a.base() + 0x800, 0x800),
            Err(Error::AddressInUse { .. })
        ));
        w.free(&a).unwrap();
        assert_eq!(w.allocate(0x2000, 1).unwrap().base(), 0x1000);
    }

    #[test]
    fn free_requires_an_exact_live_allocation() {
        let mut w = window(0x1000, 0x4000);
        let a = w.allocate(0x1000, 0x1000).unwrap();
        let not = |base, size| Error::NotAllocated {
            range: GuestRange::new(MMIO32, base, size).unwrap(),
        };
        // The whole window is a free engine node; the engine would accept it.
        assert_eq!(
            w.free(&GuestRange::new(MMIO32, 0x1000, 0x4000).unwrap()),
            Err(not(0x1000, 0x4000))
        );
        // So is the free remainder after `a`.
        assert_eq!(
            w.free(&GuestRange::new(MMIO32, 0x2000, 0x3000).unwrap()),
            Err(not(0x2000, 0x3000))
        );
        assert_eq!(
            w.free(&GuestRange::new(MMIO32, 0x1000, 0x800).unwrap()),
            Err(not(0x1000, 0x800))
        );
        assert_eq!(
            w.free(&GuestRange::new(MMIO32, 0x1000, 0x2000).unwrap()),
            Err(not(0x1000, 0x2000))
        );
        let io = GuestRange::new(AddressSpace::Io, 0x1000, 0x1000).unwrap();
        assert_eq!(w.free(&io), Err(Error::NotAllocated { range: io }));
        w.free(&a).unwrap();
        assert_eq!(w.free(&a), Err(Error::NotAllocated { range: a }));
        assert_eq!(w.allocate(0x4000, 1).unwrap().base(), 0x1000);
    }

    #[test]
    fn window_at_the_top_of_the_address_space() {
        let base = 0xffff_ffff_0000_0000;
        let size = u64::MAX - 3 - base;
        let mut w = window(base, size);
        let last = w.allocate_at(u64::MAX - 7, 4).unwrap();
        assert_eq!(last.end(), u64::MAX - 3);
        w.free(&last).unwrap();
        let big = w.allocate(0x8000_0000, 0x8000_0000).unwrap();
        assert_eq!(big.base(), base);
        assert!(matches!(
            w.allocate(0x1_0000_0000, 1),
            Err(Error::Exhausted { .. })
        ));
        assert!(matches!(
            w.allocate(4, 1 << 63),
            Err(Error::Exhausted { .. })
        ));
        w.free(&big).unwrap();
        assert_eq!(w.allocate(size, 1).unwrap().base(), base);
    }

    #[test]
    fn random_allocations_never_overlap() {
        let (wbase, wsize) = (0x10_0000u64, 0x100_0000u64);
        let mut w = window(wbase, wsize);
        let mut rng = Prng(0x9e37_79b9_7f4a_7c15);
        let mut live: Vec<GuestRange> = Vec::new();
        let mut failures = 0;
        for step in 0..4000 {
            let action = rng.below(10);
            if action < 3 && !live.is_empty() {
                let victim = live.swap_remove(rng.below(live.len() as u64) as usize);
                w.free(&victim).unwrap();
            } else if action < 5 {
                // Exact placement at a random granule-aligned spot.
                let size = 1 + rng.below(0x4000);
                let addr = wbase + rng.below(wsize / GRANULE) * GRANULE;
                let want = GuestRange::new(MMIO32, addr, size).unwrap();
                match w.allocate_at(addr, size) {
                    Ok(r) => {
                        assert_eq!(r, want);
                        assert!(!live.iter().any(|l| l.overlaps(&r)), "step {step}: {r}");
                        live.push(r);
                    }
                    Err(Error::AddressInUse { existing, .. }) => {
                        assert!(live.contains(&existing), "step {step}: {existing}");
                        // Overlap is decided on whole granules.
                        let grown = GuestRange::new(MMIO32, addr, granules(size).unwrap()).unwrap();
                        assert!(existing.overlaps(&grown) || grown.overlaps(&existing));
                    }
                    Err(Error::OutsideWindow { .. }) => assert!(want.end() > wbase + wsize),
                    Err(e) => panic!("step {step}: {e}"),
                }
            } else {
                let size = 1 + rng.below(0x10000);
                let align = 1 << rng.below(17);
                match w.allocate(size, align) {
                    Ok(r) => {
                        assert_eq!(r.base() % align, 0);
                        assert_eq!(r.size(), size);
                        assert!(r.base() >= wbase && r.end() <= wbase + wsize);
                        assert!(!live.iter().any(|l| l.overlaps(&r)), "step {step}: {r}");
                        live.push(r);
                    }
                    Err(Error::Exhausted { .. }) => failures += 1,
                    Err(e) => panic!("step {step}: {e}"),
                }
            }
            assert_disjoint(&live);
        }
        assert!(
            failures > 0,
            "the loop should have filled the window at some point"
        );
        let mut recorded: Vec<_> = w.allocations().collect();
        recorded.sort();
        live.sort();
        assert_eq!(recorded, live);
        for r in live {
            w.free(&r).unwrap();
        }
        assert_eq!(w.allocate(wsize, 1).unwrap().base(), wbase);
    }
}
