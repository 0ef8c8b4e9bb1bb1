// Copyright 2025 The Trellis Authors
// SPDX-License-Identifier: Apache-2.0

//! The VM-wide allocator: address windows plus GSIs.

use log::debug;

use crate::address::{AddressSpace, AddressWindow, GuestRange, WindowAllocator};
use crate::error::{Error, Result};
use crate::gsi::{GsiAllocator, GsiLayout};

/// Exclusive end of x86 port I/O space.
pub const IO_SPACE_END: u64 = 0x1_0000;
/// Exclusive end of the 32-bit address space.
pub const FOUR_GIB: u64 = 0x1_0000_0000;

/// Everything a [`SystemAllocator`] is built from.
///
/// See [`SystemAllocatorConfig::for_x86_64`] for the defaults of our machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemAllocatorConfig {
    /// I/O port window; must end at or below [`IO_SPACE_END`].
    pub io: AddressWindow,
    /// 32-bit MMIO window; must end at or below [`FOUR_GIB`].
    pub mmio32: AddressWindow,
    /// 64-bit MMIO window; must not overlap `mmio32`.
    pub mmio64: AddressWindow,
    /// GSI split between IOAPIC pins and MSI routes.
    pub gsi: GsiLayout,
}

/// Allocates guest address ranges and GSIs for devices.
///
/// Not internally synchronised: share it behind a mutex.
#[derive(Clone, Debug)]
pub struct SystemAllocator {
    io: WindowAllocator,
    mmio32: WindowAllocator,
    mmio64: WindowAllocator,
    gsi: GsiAllocator,
}

impl SystemAllocator {
    /// Validates `config` and builds the allocator.
    ///
    /// Each window must be non-empty, must not wrap past 2^64, must have base
    /// and size multiple of [`GRANULE`](crate::GRANULE) and must fit its space;
    /// the two MMIO windows must not overlap. The I/O window is a separate
    /// space, so it may share numbers with MMIO.
    pub fn new(config: &SystemAllocatorConfig) -> Result<Self> {
        let io = WindowAllocator::new(AddressSpace::Io, config.io, Some(IO_SPACE_END))?;
        let mmio32 = WindowAllocator::new(AddressSpace::Mmio32, config.mmio32, Some(FOUR_GIB))?;
        let mmio64 = WindowAllocator::new(AddressSpace::Mmio64, config.mmio64, None)?;
        // Both ends are known to fit: checked by WindowAllocator::new.
        let (a, b) = (config.mmio32, config.mmio64);
        let (a_end, b_end) = (a.end().unwrap_or(u64::MAX), b.end().unwrap_or(u64::MAX));
        if a.base < b_end && b.base < a_end {
            return Err(Error::WindowsOverlap {
                mmio32: a,
                mmio64: b,
            });
        }
        let gsi = GsiAllocator::new(&config.gsi)?;
        debug!(
            "system allocator: I/O {}, MMIO32 {}, MMIO64 {}, GSIs {:?}",
            config.io, config.mmio32, config.mmio64, config.gsi
        );
        Ok(SystemAllocator {
            io,
            mmio32,
            mmio64,
            gsi,
        })
    }

    fn window_mut(&mut self, space: AddressSpace) -> &mut WindowAllocator {
        match space {
            AddressSpace::Io => &mut self.io,
            AddressSpace::Mmio32 => &mut self.mmio32,
            AddressSpace::Mmio64 => &mut self.mmio64,
        }
    }

    fn window_ref(&self, space: AddressSpace) -> &WindowAllocator {
        match space {
            AddressSpace::Io => &self.io,
            AddressSpace::Mmio32 => &self.mmio32,
            AddressSpace::Mmio64 => &self.mmio64,
        }
    }

    /// Bounds of the window of `space`.
    pub fn window(&self, space: AddressSpace) -> AddressWindow {
        self.window_ref(space).window()
    }

    /// Live allocations of `space`, in address order.
    pub fn allocations(&self, space: AddressSpace) -> impl Iterator<Item = GuestRange> + '_ {
        self.window_ref(space).allocations()
    }

    /// Allocates `size` bytes aligned to `align` at the lowest free address of
    /// the window.
    ///
    /// `size` must be non-zero and `align` a power of two (a BAR passes its
    /// size: BARs are naturally aligned). Small allocations occupy whole
    /// [`GRANULE`](crate::GRANULE)s, so the returned base is always at least
    /// granule aligned.
    pub fn allocate(&mut self, space: AddressSpace, size: u64, align: u64) -> Result<GuestRange> {
        self.window_mut(space).allocate(size, align)
    }

    /// Allocates `[addr, addr + size)` exactly, e.g. where a guest moved a BAR.
    ///
    /// Fails if the range leaves the window, overlaps a live allocation, or
    /// `addr` is not a multiple of [`GRANULE`](crate::GRANULE). To move an
    /// allocation, free the old range first and re-allocate it if this fails.
    pub fn allocate_at(&mut self, space: AddressSpace, addr: u64, size: u64) -> Result<GuestRange> {
        self.window_mut(space).allocate_at(addr, size)
    }

    /// Frees a range returned by [`allocate`](Self::allocate),
    /// [`allocate_at`](Self::allocate_at) or [`allocate_mmio`](Self::allocate_mmio).
    ///
    /// `range` must be exactly a live allocation (same base and size);
    /// anything else is [`Error::NotAllocated`] and changes nothing.
    pub fn free(&mut self, range: &GuestRange) -> Result<()> {
        self.window_mut(range.space()).free(range)
    }

    /// [`free`](Self::free) for callers that kept the parts, not the range.
    pub fn free_at(&mut self, space: AddressSpace, base: u64, size: u64) -> Result<()> {
        self.free(&GuestRange::new(space, base, size)?)
    }

    /// Allocates MMIO for a 64-bit BAR, which may live in either window.
    ///
    /// `prefer_64bit` picks the window tried first; the other one is the
    /// fallback when the first is full. A 32-bit BAR must not use this: it
    /// belongs in [`AddressSpace::Mmio32`] only.
    pub fn allocate_mmio(
        &mut self,
        size: u64,
        align: u64,
        prefer_64bit: bool,
    ) -> Result<GuestRange> {
        let (first, second) = if prefer_64bit {
            (AddressSpace::Mmio64, AddressSpace::Mmio32)
        } else {
            (AddressSpace::Mmio32, AddressSpace::Mmio64)
        };
        match self.allocate(first, size, align) {
            Err(Error::Exhausted { .. }) => {
                debug!("{first} window full for {size:#x} bytes, trying the {second} window");
            }
            other => return other,
        }
        match self.allocate(second, size, align) {
            Err(Error::Exhausted { .. }) => Err(Error::MmioExhausted { size, align }),
            other => other,
        }
    }

    /// Number of IOAPIC pins, i.e. legacy IRQs are `0..ioapic_pins()`.
    pub fn ioapic_pins(&self) -> u32 {
        self.gsi.ioapic_pins()
    }

    /// The GSIs reserved for MSI routes.
    pub fn msi_gsis(&self) -> std::ops::Range<u32> {
        self.gsi.msi_gsis()
    }

    /// Allocates the lowest free IOAPIC pin that is not reserved.
    pub fn allocate_legacy_irq(&mut self) -> Result<u32> {
        self.gsi.allocate_legacy_irq()
    }

    /// Claims IOAPIC pin `irq`, reserved or not, e.g. 4 for the serial port.
    pub fn reserve_legacy_irq(&mut self, irq: u32) -> Result<()> {
        self.gsi.reserve_legacy_irq(irq)
    }

    /// Whether IOAPIC pin `irq` is in use (allocated or claimed).
    pub fn is_legacy_irq_allocated(&self, irq: u32) -> bool {
        self.gsi.is_legacy_irq_allocated(irq)
    }

    /// Releases an IOAPIC pin; a reserved pin becomes claimable again but
    /// is still never handed out by [`allocate_legacy_irq`](Self::allocate_legacy_irq).
    pub fn free_legacy_irq(&mut self, irq: u32) -> Result<()> {
        self.gsi.free_legacy_irq(irq)
    }

    /// Allocates the lowest free MSI GSI.
    pub fn allocate_msi_gsi(&mut self) -> Result<u32> {
        self.gsi.allocate_msi_gsi()
    }

    /// Allocates `count` MSI GSIs (ascending, not necessarily contiguous).
    /// All or nothing: on error no GSI stays allocated by this call.
    pub fn allocate_msi_gsis(&mut self, count: u32) -> Result<Vec<u32>> {
        self.gsi.allocate_msi_gsis(count)
    }

    /// Whether MSI GSI `gsi` is allocated.
    pub fn is_msi_gsi_allocated(&self, gsi: u32) -> bool {
        self.gsi.is_msi_gsi_allocated(gsi)
    }

    /// Releases an MSI GSI.
    pub fn free_msi_gsi(&mut self, gsi: u32) -> Result<()> {
        self.gsi.free_msi_gsi(gsi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AddressSpace::{Io, Mmio32, Mmio64};

    fn config() -> SystemAllocatorConfig {
        SystemAllocatorConfig {
            io: AddressWindow::new(0x1000, 0xf000),
            mmio32: AddressWindow::new(0xc000_0000, 0x10000),
            mmio64: AddressWindow::new(0x1_0000_0000, 0x10000),
            gsi: GsiLayout {
                ioapic_pins: 24,
                msi_gsi_limit: 4096,
                reserved_legacy_irqs: vec![4],
            },
        }
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<SystemAllocator>();
        check::<Error>();
    }

    #[test]
    fn windows_are_validated() {
        let with = |f: &dyn Fn(&mut SystemAllocatorConfig)| {
            let mut c = config();
            f(&mut c);
            SystemAllocator::new(&c)
        };
        assert!(with(&|_| {}).is_ok());
        assert_eq!(
            with(&|c| c.io.size = 0).unwrap_err(),
            Error::EmptyWindow { space: Io }
        );
        assert!(matches!(
            with(&|c| c.mmio64 = AddressWindow::new(u64::MAX - 0xfff, 0x2000)),
            Err(Error::WindowOverflow { space: Mmio64, .. })
        ));
        assert!(matches!(
            with(&|c| c.io = AddressWindow::new(0x1000, 0xf004)),
            Err(Error::WindowOutOfBounds {
                space: Io,
                limit: IO_SPACE_END,
                ..
            })
        ));
        assert!(matches!(
            with(&|c| c.mmio32 = AddressWindow::new(0xf000_0000, 0x1000_1000)),
            Err(Error::WindowOutOfBounds {
                space: Mmio32,
                limit: FOUR_GIB,
                ..
            })
        ));
        assert!(matches!(
            with(&|c| c.mmio32.base = 0xc000_0001),
            Err(Error::UnalignedWindow { space: Mmio32, .. })
        ));
        // Overlaps in every arrangement.
        for (base, size) in [
            (0xc000_0000, 0x10000),
            (0xbfff_f000, 0x2000),
            (0xc000_fffc, 4),
            (0xb000_0000, 0x2000_0000),
        ] {
            assert!(
                matches!(
                    with(&|c| c.mmio64 = AddressWindow::new(base, size)),
                    Err(Error::WindowsOverlap { .. })
                ),
                "{base:#x}+{size:#x}"
            );
        }
        // Touching is not overlapping.
        assert!(with(&|c| c.mmio64 = AddressWindow::new(0xc001_0000, 0x1000)).is_ok());
        assert!(with(&|c| c.mmio64 = AddressWindow::new(0xbfff_0000, 0x10000)).is_ok());
        // I/O is its own space: same numbers as MMIO are fine.
        assert!(with(&|c| c.mmio32 = AddressWindow::new(0x1000, 0xf000)).is_ok());
        // GSI layout errors surface too.
        assert!(matches!(
            with(&|c| c.gsi.msi_gsi_limit = 24),
            Err(Error::InvalidGsiLayout { .. })
        ));
        let err = with(&|c| c.mmio32.size = 0x1000_0000 * 5).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the 32-bit MMIO window [0xc0000000, 0x110000000) extends past 0x100000000"
        );
    }

    #[test]
    fn spaces_are_independent() {
        let mut sa = SystemAllocator::new(&config()).unwrap();
        let io = sa.allocate(Io, 0x100, 0x100).unwrap();
        let m32 = sa.allocate(Mmio32, 0x100, 0x100).unwrap();
        let m64 = sa.allocate(Mmio64, 0x100, 0x100).unwrap();
        assert_eq!((io.space(), io.base()), (Io, 0x1000));
        assert_eq!((m32.space(), m32.base()), (Mmio32, 0xc000_0000));
        assert_eq!((m64.space(), m64.base()), (Mmio64, 0x1_0000_0000));
        assert_eq!(sa.allocations(Io).collect::<Vec<_>>(), vec![io]);
        assert_eq!(
            sa.window(Mmio64),
            AddressWindow::new(0x1_0000_0000, 0x10000)
        );
        // A range freed in the wrong space is rejected.
        let wrong = GuestRange::new(Mmio64, m32.base(), m32.size()).unwrap();
        assert_eq!(
            sa.free(&wrong).unwrap_err(),
            Error::NotAllocated { range: wrong }
        );
        sa.free(&m32).unwrap();
        sa.free_at(Io, 0x1000, 0x100).unwrap();
        assert!(sa.free_at(Io, 0x1000, 0x100).is_err());
        assert!(matches!(
            sa.free_at(Io, 0x1000, 0),
            Err(Error::InvalidRange { .. })
        ));
        assert_eq!(sa.allocations(Mmio64).count(), 1);
    }

    #[test]
    fn moving_a_bar() {
        let mut sa = SystemAllocator::new(&config()).unwrap();
        let a = sa.allocate(Mmio32, 0x1000, 0x1000).unwrap();
        let b = sa.allocate(Mmio32, 0x1000, 0x1000).unwrap();
        // The guest moves `a` onto `b`: refused, `a` restored.
        sa.free(&a).unwrap();
        let err = sa.allocate_at(Mmio32, b.base(), 0x1000).unwrap_err();
        assert_eq!(
            err,
            Error::AddressInUse {
                requested: b,
                existing: b
            }
        );
        assert_eq!(sa.allocate_at(Mmio32, a.base(), a.size()).unwrap(), a);
        // Then to a free spot.
        sa.free(&a).unwrap();
        let moved = sa.allocate_at(Mmio32, 0xc000_8000, 0x1000).unwrap();
        assert_eq!(
            sa.allocate(Mmio32, 0x1000, 0x1000).unwrap().base(),
            a.base()
        );
        assert!(matches!(
            sa.allocate_at(Mmio32, 0xd000_0000, 0x1000),
            Err(Error::OutsideWindow { space: Mmio32, .. })
        ));
        sa.free(&moved).unwrap();
    }

    #[test]
    fn allocate_mmio_falls_back() {
        let mut sa = SystemAllocator::new(&config()).unwrap();
        let r = sa.allocate_mmio(0x8000, 0x8000, true).unwrap();
        assert_eq!(r.space(), Mmio64);
        let r = sa.allocate_mmio(0x8000, 0x8000, false).unwrap();
        assert_eq!(r.space(), Mmio32);
        // Each window has 0x8000 left; the second 64-bit request spills over.
        assert_eq!(
            sa.allocate_mmio(0x8000, 0x8000, true).unwrap().space(),
            Mmio64
        );
        assert_eq!(
            sa.allocate_mmio(0x8000, 0x8000, true).unwrap().space(),
            Mmio32
        );
        let err = sa.allocate_mmio(0x10, 0x10, false).unwrap_err();
        assert_eq!(
            err,
            Error::MmioExhausted {
                size: 0x10,
                align: 0x10
            }
        );
        assert_eq!(
            err.to_string(),
            "no room for 0x10 bytes aligned to 0x10 in either MMIO window"
        );
        // Bad arguments are reported as such, not as exhaustion.
        assert_eq!(
            sa.allocate_mmio(0x10, 3, true).unwrap_err(),
            Error::InvalidAlignment {
                space: Mmio64,
                align: 3
            }
        );
        assert_eq!(
            sa.allocate_mmio(0, 4, false).unwrap_err(),
            Error::ZeroSize { space: Mmio32 }
        );
    }

    #[test]
    fn allocate_mmio_prefer_32_spills_to_64() {
        let mut c = config();
        c.mmio64.size = 0x20000;
        let mut sa = SystemAllocator::new(&c).unwrap();
        let r = sa.allocate_mmio(0x20000, 0x1000, false).unwrap();
        assert_eq!(r.space(), Mmio64, "too big for the 32-bit window");
        assert!(matches!(
            sa.allocate_mmio(0x20000, 0x1000, false),
            Err(Error::MmioExhausted { .. })
        ));
    }

    #[test]
    fn gsis_through_the_system_allocator() {
        let mut sa = SystemAllocator::new(&config()).unwrap();
        assert_eq!((sa.ioapic_pins(), sa.msi_gsis()), (24, 24..4096));
        sa.reserve_legacy_irq(4).unwrap();
        assert!(sa.is_legacy_irq_allocated(4));
        let irqs: Vec<u32> = std::iter::from_fn(|| sa.allocate_legacy_irq().ok()).collect();
        assert_eq!(irqs.len(), 23);
        assert!(irqs.iter().all(|&i| i < 24 && i != 4));
        let batch = sa.allocate_msi_gsis(3).unwrap();
        assert_eq!(batch, vec![24, 25, 26]);
        assert!(sa.is_msi_gsi_allocated(25));
        sa.free_msi_gsi(25).unwrap();
        assert_eq!(sa.allocate_msi_gsi().unwrap(), 25);
        sa.free_legacy_irq(4).unwrap();
        assert!(!sa.is_legacy_irq_allocated(4));
    }
}
