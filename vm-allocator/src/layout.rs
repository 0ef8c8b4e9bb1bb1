// Copyright 2025 The Trellis Authors
// SPDX-License-Identifier: Apache-2.0

//! Default guest physical layout of our x86_64 machine.
//!
//! ```text
//! 0x0000_0000 .. 0xC000_0000   RAM (the first 3 GiB of it)
//! 0xC000_0000 .. 0xE000_0000   32-bit MMIO window (allocatable, 512 MiB)
//! 0xE000_0000 .. 0xF000_0000   PCI ECAM (256 buses x 1 MiB), fixed
//! 0xF000_0000 .. 0xFEC0_0000   unused, kept for fixed platform devices
//! 0xFEC0_0000                  IOAPIC
//! 0xFEE0_0000                  local APIC (and MSI doorbell addresses)
//! 4 GiB .. ram end             the rest of RAM, relocated above the hole
//! [1 GiB aligned] + 64 GiB     64-bit MMIO window
//! ```
//!
//! Ports: `0x0..0x1000` hold the legacy devices (PIC, PIT, RTC, serial,
//! i8042, PCI config at 0xCF8); `0x1000..0x10000` is the I/O BAR window.

use crate::address::AddressWindow;
use crate::error::{Error, Result};
use crate::gsi::GsiLayout;
use crate::system::{SystemAllocatorConfig, FOUR_GIB};

/// One KiB.
pub const KIB: u64 = 1 << 10;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// One GiB.
pub const GIB: u64 = 1 << 30;

/// Start of the I/O BAR window; ports below are for legacy devices.
pub const IO_WINDOW_START: u64 = 0x1000;
/// Exclusive end of the I/O BAR window (the whole 16-bit port space).
pub const IO_WINDOW_END: u64 = 0x1_0000;

/// Start of the hole below 4 GiB where RAM is not mapped.
pub const MEM_32BIT_HOLE_START: u64 = 0xC000_0000;
/// Exclusive end of the hole; RAM that did not fit below resumes here.
pub const MEM_32BIT_HOLE_END: u64 = FOUR_GIB;

/// Start of the 32-bit MMIO window.
pub const MMIO32_WINDOW_START: u64 = MEM_32BIT_HOLE_START;
/// Exclusive end of the 32-bit MMIO window: stops where ECAM begins.
pub const MMIO32_WINDOW_END: u64 = PCI_ECAM_START;

/// PCI Express ECAM (MMCONFIG) base, outside the allocatable window.
pub const PCI_ECAM_START: u64 = 0xE000_0000;
/// ECAM size: 1 MiB per bus, 256 buses.
pub const PCI_ECAM_SIZE: u64 = 256 * MIB;

/// Start of the unused gap between ECAM and the IOAPIC.
pub const PLATFORM_MMIO_START: u64 = PCI_ECAM_START + PCI_ECAM_SIZE;
/// Exclusive end of that gap.
pub const PLATFORM_MMIO_END: u64 = IOAPIC_START;

/// IOAPIC registers.
pub const IOAPIC_START: u64 = 0xFEC0_0000;
/// Size of the IOAPIC register page.
pub const IOAPIC_SIZE: u64 = 0x1000;
/// Local APIC registers; MSI writes also target 0xFEEx_xxxx.
pub const LAPIC_START: u64 = 0xFEE0_0000;
/// Size of the local APIC register page.
pub const LAPIC_SIZE: u64 = 0x1000;

/// The 64-bit MMIO window starts on this boundary, which keeps large BARs
/// (up to 1 GiB) naturally aligned at its base.
pub const MMIO64_ALIGNMENT: u64 = GIB;
/// Default size of the 64-bit MMIO window.
pub const DEFAULT_MMIO64_SIZE: u64 = 64 * GIB;

/// Pins of KVM's in-kernel IOAPIC.
pub const IOAPIC_PINS: u32 = 24;
/// KVM's GSI routing table size (`KVM_MAX_IRQ_ROUTES`).
pub const MSI_GSI_LIMIT: u32 = 4096;

/// COM1 serial port IRQ.
pub const COM1_IRQ: u32 = 4;
/// COM2 serial port IRQ.
pub const COM2_IRQ: u32 = 3;
/// CMOS RTC IRQ.
pub const RTC_IRQ: u32 = 8;
/// ACPI SCI IRQ.
pub const ACPI_SCI_IRQ: u32 = 9;

/// ISA IRQs with fixed PC assignments, kept out of dynamic allocation:
/// 0 and 2 (PIT: ISA IRQ 0 is overridden to GSI 2 in the MADT), 1 and 12
/// (i8042 keyboard and mouse), 3 and 4 (COM2, COM1), 8 (RTC), 9 (ACPI SCI).
/// The device models claim theirs with `reserve_legacy_irq`.
pub const RESERVED_LEGACY_IRQS: [u32; 8] = [0, 1, 2, COM2_IRQ, COM1_IRQ, RTC_IRQ, ACPI_SCI_IRQ, 12];

// The fixed regions must stay clear of the allocatable window and each other.
const _: () = assert!(MMIO32_WINDOW_START < MMIO32_WINDOW_END);
const _: () = assert!(MMIO32_WINDOW_END <= PCI_ECAM_START);
const _: () = assert!(PLATFORM_MMIO_START <= PLATFORM_MMIO_END);
const _: () = assert!(IOAPIC_START + IOAPIC_SIZE <= LAPIC_START);
const _: () = assert!(LAPIC_START + LAPIC_SIZE <= FOUR_GIB);
const _: () = assert!(IO_WINDOW_END <= crate::system::IO_SPACE_END);

/// A contiguous region of guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical base.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
}

impl RamRegion {
    /// Exclusive end. Regions from [`ram_layout`] never overflow.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.size)
    }
}

/// Guest RAM split around the 32-bit hole.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamLayout {
    /// RAM from address 0, at most up to [`MEM_32BIT_HOLE_START`].
    pub below_hole: RamRegion,
    /// RAM relocated to 4 GiB, if it did not all fit below the hole.
    pub above_4g: Option<RamRegion>,
}

impl RamLayout {
    /// Exclusive end of the highest RAM region.
    pub fn end(&self) -> u64 {
        self.above_4g.unwrap_or(self.below_hole).end()
    }

    /// The regions, in address order.
    pub fn regions(&self) -> impl Iterator<Item = RamRegion> {
        std::iter::once(self.below_hole).chain(self.above_4g)
    }
}

/// Splits `ram_size` bytes of guest RAM around the 32-bit hole.
///
/// The first 3 GiB go at address 0; anything beyond is placed at 4 GiB.
pub fn ram_layout(ram_size: u64) -> Result<RamLayout> {
    if ram_size == 0 {
        return Err(Error::ZeroRamSize);
    }
    let low = ram_size.min(MEM_32BIT_HOLE_START);
    let high = ram_size - low;
    let above_4g = if high == 0 {
        None
    } else {
        MEM_32BIT_HOLE_END
            .checked_add(high)
            .ok_or(Error::RamLayoutOverflow {
                reason: "RAM relocated above 4 GiB passes 2^64",
            })?;
        Some(RamRegion {
            base: MEM_32BIT_HOLE_END,
            size: high,
        })
    };
    Ok(RamLayout {
        below_hole: RamRegion { base: 0, size: low },
        above_4g,
    })
}

/// Base of the 64-bit MMIO window: the first 1 GiB boundary at or above
/// both `ram_end` (exclusive end of RAM) and 4 GiB.
pub fn mmio64_base(ram_end: u64) -> Result<u64> {
    ram_end
        .max(FOUR_GIB)
        .checked_next_multiple_of(MMIO64_ALIGNMENT)
        .ok_or(Error::RamLayoutOverflow {
            reason: "no 1 GiB boundary above the end of RAM",
        })
}

/// Default GSI layout: 24 IOAPIC pins with the ISA ones reserved, MSI GSIs
/// up to KVM's routing table size.
pub fn default_gsi_layout() -> GsiLayout {
    GsiLayout {
        ioapic_pins: IOAPIC_PINS,
        msi_gsi_limit: MSI_GSI_LIMIT,
        reserved_legacy_irqs: RESERVED_LEGACY_IRQS.to_vec(),
    }
}

impl SystemAllocatorConfig {
    /// Our x86_64 layout, with a [`DEFAULT_MMIO64_SIZE`] 64-bit window.
    ///
    /// `ram_end` is the exclusive end of guest RAM after the split around
    /// the hole (see [`ram_layout`] and [`RamLayout::end`]), not the RAM size.
    pub fn for_x86_64(ram_end: u64) -> Result<Self> {
        Self::for_x86_64_with_mmio64_size(ram_end, DEFAULT_MMIO64_SIZE)
    }

    /// [`for_x86_64`](Self::for_x86_64) with a chosen 64-bit window size.
    pub fn for_x86_64_with_mmio64_size(ram_end: u64, mmio64_size: u64) -> Result<Self> {
        // RAM ending inside the hole means it was not relocated: it would
        // overlap the MMIO window.
        if ram_end > MEM_32BIT_HOLE_START && ram_end <= MEM_32BIT_HOLE_END {
            return Err(Error::RamEndInHole {
                ram_end,
                hole_start: MEM_32BIT_HOLE_START,
                hole_end: MEM_32BIT_HOLE_END,
            });
        }
        Ok(SystemAllocatorConfig {
            io: AddressWindow::new(IO_WINDOW_START, IO_WINDOW_END - IO_WINDOW_START),
            mmio32: AddressWindow::new(
                MMIO32_WINDOW_START,
                MMIO32_WINDOW_END - MMIO32_WINDOW_START,
            ),
            mmio64: AddressWindow::new(mmio64_base(ram_end)?, mmio64_size),
            gsi: default_gsi_layout(),
        })
    }

    /// [`for_x86_64`](Self::for_x86_64) from the RAM size instead of its end.
    pub fn for_x86_64_ram_size(ram_size: u64) -> Result<Self> {
        Self::for_x86_64(ram_layout(ram_size)?.end())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AddressSpace, SystemAllocator};

    #[test]
    fn ram_below_the_hole() {
        let l = ram_layout(GIB).unwrap();
        assert_eq!(l.below_hole, RamRegion { base: 0, size: GIB });
        assert_eq!(l.above_4g, None);
        assert_eq!(l.end(), GIB);
        assert_eq!(ram_layout(1).unwrap().end(), 1);
        assert_eq!(
            ram_layout(MEM_32BIT_HOLE_START - 1).unwrap().end(),
            MEM_32BIT_HOLE_START - 1
        );
    }

    #[test]
    fn ram_exactly_at_the_hole() {
        let l = ram_layout(3 * GIB).unwrap();
        assert_eq!(l.below_hole.size, 3 * GIB);
        assert_eq!(l.above_4g, None);
        assert_eq!(l.end(), MEM_32BIT_HOLE_START);
        assert_eq!(l.regions().count(), 1);
    }

    #[test]
    fn ram_above_the_hole_is_relocated() {
        let l = ram_layout(3 * GIB + 1).unwrap();
        assert_eq!(
            l.above_4g,
            Some(RamRegion {
                base: FOUR_GIB,
                size: 1
            })
        );
        assert_eq!(l.end(), FOUR_GIB + 1);

        let l = ram_layout(16 * GIB).unwrap();
        let regions: Vec<_> = l.regions().collect();
        assert_eq!(
            regions,
            vec![
                RamRegion {
                    base: 0,
                    size: 3 * GIB
                },
                RamRegion {
                    base: FOUR_GIB,
                    size: 13 * GIB
                }
            ]
        );
        assert_eq!(l.end(), 17 * GIB);
        assert_eq!(regions.iter().map(|r| r.size).sum::<u64>(), 16 * GIB);
    }

    #[test]
    fn ram_layout_errors() {
        assert_eq!(ram_layout(0).unwrap_err(), Error::ZeroRamSize);
        assert!(matches!(
            ram_layout(u64::MAX),
            Err(Error::RamLayoutOverflow { .. })
        ));
        // Largest size that still fits.
        let max = u64::MAX - GIB;
        assert_eq!(ram_layout(max).unwrap().end(), u64::MAX);
    }

    #[test]
    fn mmio64_base_is_aligned_above_ram_and_4g() {
        assert_eq!(mmio64_base(0).unwrap(), FOUR_GIB);
        assert_eq!(mmio64_base(GIB).unwrap(), FOUR_GIB);
        assert_eq!(mmio64_base(FOUR_GIB).unwrap(), FOUR_GIB);
        assert_eq!(mmio64_base(FOUR_GIB + 1).unwrap(), 5 * GIB);
        assert_eq!(mmio64_base(17 * GIB).unwrap(), 17 * GIB);
        assert_eq!(mmio64_base(17 * GIB + 4096).unwrap(), 18 * GIB);
        assert!(mmio64_base(u64::MAX).is_err());
    }

    #[test]
    fn x86_64_config_matches_the_documented_layout() {
        let c = SystemAllocatorConfig::for_x86_64(ram_layout(8 * GIB).unwrap().end()).unwrap();
        assert_eq!(c.io, AddressWindow::new(0x1000, 0xf000));
        assert_eq!(c.mmio32, AddressWindow::new(0xc000_0000, 0x2000_0000));
        assert_eq!(c.mmio64, AddressWindow::new(9 * GIB, 64 * GIB));
        assert_eq!(c.gsi.ioapic_pins, 24);
        assert_eq!(c.gsi.msi_gsi_limit, 4096);
        assert_eq!(
            c,
            SystemAllocatorConfig::for_x86_64_ram_size(8 * GIB).unwrap()
        );

        let sa = SystemAllocator::new(&c).unwrap();
        // The fixed regions are outside every allocatable window.
        for (base, size) in [
            (PCI_ECAM_START, PCI_ECAM_SIZE),
            (IOAPIC_START, IOAPIC_SIZE),
            (LAPIC_START, LAPIC_SIZE),
        ] {
            for space in [AddressSpace::Mmio32, AddressSpace::Mmio64] {
                let w = sa.window(space);
                assert!(
                    base + size <= w.base || w.end().unwrap() <= base,
                    "{base:#x} in {space}"
                );
            }
        }
        // RAM is outside too.
        let ram = ram_layout(8 * GIB).unwrap();
        for r in ram.regions() {
            for space in [AddressSpace::Mmio32, AddressSpace::Mmio64] {
                let w = sa.window(space);
                assert!(r.end() <= w.base || w.end().unwrap() <= r.base);
            }
        }
    }

    #[test]
    fn x86_64_config_small_ram_and_custom_size() {
        let c = SystemAllocatorConfig::for_x86_64_with_mmio64_size(512 * MIB, 4 * GIB).unwrap();
        assert_eq!(c.mmio64, AddressWindow::new(FOUR_GIB, 4 * GIB));
        assert!(SystemAllocator::new(&c).is_ok());
        let c = SystemAllocatorConfig::for_x86_64(MEM_32BIT_HOLE_START).unwrap();
        assert_eq!(c.mmio64.base, FOUR_GIB);
    }

    #[test]
    fn x86_64_config_rejects_ram_in_the_hole_and_overflow() {
        for ram_end in [MEM_32BIT_HOLE_START + 1, 0xE000_0000, FOUR_GIB] {
            assert_eq!(
                SystemAllocatorConfig::for_x86_64(ram_end).unwrap_err(),
                Error::RamEndInHole {
                    ram_end,
                    hole_start: MEM_32BIT_HOLE_START,
                    hole_end: FOUR_GIB
                }
            );
        }
        assert!(SystemAllocatorConfig::for_x86_64(u64::MAX).is_err());
        // The window itself would wrap: caught when building the allocator.
        let c = SystemAllocatorConfig::for_x86_64(u64::MAX - 2 * GIB).unwrap();
        assert!(matches!(
            SystemAllocator::new(&c),
            Err(Error::WindowOverflow { .. })
        ));
        assert!(SystemAllocatorConfig::for_x86_64_ram_size(0).is_err());
    }

    #[test]
    fn x86_64_gsis_keep_isa_pins_for_fixed_devices() {
        let c = SystemAllocatorConfig::for_x86_64_ram_size(GIB).unwrap();
        let mut sa = SystemAllocator::new(&c).unwrap();
        let dynamic: Vec<u32> = std::iter::from_fn(|| sa.allocate_legacy_irq().ok()).collect();
        assert_eq!(
            dynamic,
            vec![5, 6, 7, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
        );
        for irq in RESERVED_LEGACY_IRQS {
            sa.reserve_legacy_irq(irq).unwrap();
        }
        assert_eq!(sa.allocate_msi_gsi().unwrap(), IOAPIC_PINS);
    }

    #[test]
    fn x86_64_bars_fill_the_32bit_window() {
        let mut sa =
            SystemAllocator::new(&SystemAllocatorConfig::for_x86_64_ram_size(2 * GIB).unwrap())
                .unwrap();
        // 512 MiB window: two 256 MiB BARs fit, a third does not.
        let a = sa
            .allocate(AddressSpace::Mmio32, 256 * MIB, 256 * MIB)
            .unwrap();
        let b = sa
            .allocate(AddressSpace::Mmio32, 256 * MIB, 256 * MIB)
            .unwrap();
        assert_eq!((a.base(), b.base()), (0xC000_0000, 0xD000_0000));
        assert_eq!(b.end(), PCI_ECAM_START);
        assert_eq!(
            sa.allocate(AddressSpace::Mmio32, 0x1000, 0x1000)
                .unwrap_err()
                .to_string(),
            "no room for 0x1000 bytes aligned to 0x1000 in the 32-bit MMIO window"
        );
        let io = sa.allocate(AddressSpace::Io, 0x100, 0x100).unwrap();
        assert_eq!(io.base(), IO_WINDOW_START);
    }
}
