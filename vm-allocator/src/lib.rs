// Copyright 2025 The Trellis Authors
// SPDX-License-Identifier: Apache-2.0

//! Guest resource allocation for Trellis VMs.
//!
//! A [`SystemAllocator`] hands out, for devices on PCI:
//! - address ranges from three windows ([`AddressSpace`]): I/O ports, 32-bit
//!   MMIO below 4 GiB and 64-bit MMIO above RAM, first fit from the bottom,
//!   or at an exact address when a guest moves a BAR;
//! - legacy IRQs (IOAPIC pins) and MSI GSIs, from disjoint ranges.
//!
//! The rust-vmm `vm-allocator` crate does the bookkeeping underneath; this
//! crate adds validation, error context and guards against that engine's
//! edge cases (see [`GRANULE`]). [`layout`] holds the default x86_64 map.
//!
//! ```
//! use vm_allocator::{AddressSpace, SystemAllocator, SystemAllocatorConfig};
//!
//! let config = SystemAllocatorConfig::for_x86_64_ram_size(8 << 30)?;
//! let mut alloc = SystemAllocator::new(&config)?;
//! let bar = alloc.allocate(AddressSpace::Mmio32, 0x4000, 0x4000)?;
//! assert_eq!(bar.base(), 0xC000_0000);
//! alloc.reserve_legacy_irq(vm_allocator::layout::COM1_IRQ)?;
//! let msix = alloc.allocate_msi_gsis(4)?;
//! assert_eq!(msix, [24, 25, 26, 27]);
//! alloc.free(&bar)?;
//! # Ok::<(), vm_allocator::Error>(())
//! ```

#![deny(missing_docs)]

mod address;
mod error;
mod gsi;
pub mod layout;
mod system;

pub use address::{AddressSpace, AddressWindow, GuestRange, GRANULE};
pub use error::{EngineError, Error, Result};
pub use gsi::GsiLayout;
pub use system::{SystemAllocator, SystemAllocatorConfig, FOUR_GIB, IO_SPACE_END};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_keep_their_source() {
        use std::error::Error as _;
        let e = Error::Engine {
            space: AddressSpace::Mmio64,
            op: "first-fit allocation",
            source: EngineError::Overflow,
        };
        assert_eq!(
            e.to_string(),
            "first-fit allocation in the 64-bit MMIO window failed"
        );
        assert_eq!(
            e.source().map(|s| s.to_string()),
            Some(EngineError::Overflow.to_string())
        );
        let e = Error::GsiEngine {
            op: "allocating an MSI GSI",
            source: EngineError::ResourceNotAvailable,
        };
        assert!(e.source().is_some());
    }

    #[test]
    fn error_messages_are_specific() {
        let w = AddressWindow::new(0x1000, 0x1000);
        let r = GuestRange::new(AddressSpace::Io, 0x1ff0, 0x20).unwrap();
        let cases: Vec<(Error, &str)> =
            vec![
            (Error::EmptyWindow { space: AddressSpace::Io }, "the I/O port window is empty"),
            (
                Error::InvalidAlignment {
                    space: AddressSpace::Mmio32,
                    align: 3,
                },
                "invalid alignment 0x3 for the 32-bit MMIO window: must be a non-zero power of two",
            ),
            (
                Error::OutsideWindow {
                    space: AddressSpace::Io,
                    window: w,
                    range: r,
                },
                "I/O port range [0x1ff0, 0x2010) is outside the I/O port window [0x1000, 0x2000)",
            ),
            (
                Error::UnalignedAddress {
                    space: AddressSpace::Io,
                    addr: 0x1001,
                },
                "I/O port address 0x1001 is not a multiple of the 4-byte allocation granule",
            ),
            (Error::LegacyIrqInUse { irq: 4 }, "legacy IRQ 4 is already in use"),
            (
                Error::MsiGsisExhausted {
                    count: 8,
                    base: 24,
                    limit: 4096,
                },
                "no room for 8 MSI GSI(s) in 24..4096",
            ),
        ];
        for (e, msg) in cases {
            assert_eq!(e.to_string(), msg);
        }
    }
}
