// Copyright 2025 The Trellis Authors
// SPDX-License-Identifier: Apache-2.0

//! Error type of the crate.

use thiserror::Error;

use crate::address::{AddressSpace, AddressWindow, GuestRange, GRANULE};

/// Engine (rust-vmm `vm-allocator`) error, re-exported so callers can match
/// on the `source` of [`Error::Engine`] and [`Error::GsiEngine`].
pub use rust_vmm_allocator::Error as EngineError;

/// Errors returned by this crate.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Error {
    /// A window was configured with size zero.
    #[error("the {space} window is empty")]
    EmptyWindow {
        /// Window concerned.
        space: AddressSpace,
    },

    /// `base + size` of a window does not fit in 64 bits.
    #[error("the {space} window {window} overflows the 64-bit address space")]
    WindowOverflow {
        /// Window concerned.
        space: AddressSpace,
        /// Configured window.
        window: AddressWindow,
    },

    /// A window's base or size is not a multiple of [`GRANULE`].
    #[error("the {space} window {window} is not aligned to the {GRANULE}-byte allocation granule")]
    UnalignedWindow {
        /// Window concerned.
        space: AddressSpace,
        /// Configured window.
        window: AddressWindow,
    },

    /// A window goes past the limit of its space (64 KiB of ports, 4 GiB for
    /// the 32-bit MMIO window).
    #[error("the {space} window {window} extends past {limit:#x}")]
    WindowOutOfBounds {
        /// Window concerned.
        space: AddressSpace,
        /// Configured window.
        window: AddressWindow,
        /// Exclusive upper bound the window must stay below.
        limit: u64,
    },

    /// Two MMIO windows share addresses.
    #[error("the 32-bit MMIO window {mmio32} overlaps the 64-bit MMIO window {mmio64}")]
    WindowsOverlap {
        /// 32-bit window.
        mmio32: AddressWindow,
        /// 64-bit window.
        mmio64: AddressWindow,
    },

    /// An inclusive range with `last < first`, or covering all 2^64 addresses.
    #[error("invalid inclusive range {first:#x}..={last:#x}")]
    InvalidInclusiveRange {
        /// First address.
        first: u64,
        /// Last address.
        last: u64,
    },

    /// A range of size zero or whose end does not fit in 64 bits.
    #[error("invalid {space} range: base {base:#x}, size {size:#x}")]
    InvalidRange {
        /// Space of the range.
        space: AddressSpace,
        /// Base address.
        base: u64,
        /// Size in bytes.
        size: u64,
    },

    /// An allocation of zero bytes was requested.
    #[error("cannot allocate 0 bytes in the {space} window")]
    ZeroSize {
        /// Window concerned.
        space: AddressSpace,
    },

    /// The alignment is zero or not a power of two.
    #[error(
        "invalid alignment {align:#x} for the {space} window: must be a non-zero power of two"
    )]
    InvalidAlignment {
        /// Window concerned.
        space: AddressSpace,
        /// Rejected alignment.
        align: u64,
    },

    /// No free, suitably aligned hole is large enough.
    #[error("no room for {size:#x} bytes aligned to {align:#x} in the {space} window")]
    Exhausted {
        /// Window concerned.
        space: AddressSpace,
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
    },

    /// Neither MMIO window could satisfy an [`allocate_mmio`] request.
    ///
    /// [`allocate_mmio`]: crate::SystemAllocator::allocate_mmio
    #[error("no room for {size:#x} bytes aligned to {align:#x} in either MMIO window")]
    MmioExhausted {
        /// Requested size.
        size: u64,
        /// Requested alignment.
        align: u64,
    },

    /// An exact-address request does not lie entirely inside its window.
    #[error("{range} is outside the {space} window {window}")]
    OutsideWindow {
        /// Window concerned.
        space: AddressSpace,
        /// The window's bounds.
        window: AddressWindow,
        /// Requested range.
        range: GuestRange,
    },

    /// An exact-address request is not a multiple of [`GRANULE`].
    #[error(
        "{space} address {addr:#x} is not a multiple of the {GRANULE}-byte allocation granule"
    )]
    UnalignedAddress {
        /// Window concerned.
        space: AddressSpace,
        /// Rejected address.
        addr: u64,
    },

    /// An exact-address request collides with a live allocation.
    #[error("cannot allocate {requested}: it overlaps the allocated {existing}")]
    AddressInUse {
        /// Requested range.
        requested: GuestRange,
        /// Live allocation it collides with.
        existing: GuestRange,
    },

    /// `free` was given a range that is not exactly a live allocation.
    #[error("{range} is not an allocated range")]
    NotAllocated {
        /// Range passed to `free`.
        range: GuestRange,
    },

    /// The address engine failed in an unexpected way.
    #[error("{op} in the {space} window failed")]
    Engine {
        /// Window concerned.
        space: AddressSpace,
        /// What was being done.
        op: &'static str,
        /// Engine error.
        #[source]
        source: EngineError,
    },

    /// The GSI layout is unusable.
    #[error("invalid GSI layout: {reason}")]
    InvalidGsiLayout {
        /// What is wrong.
        reason: String,
    },

    /// A legacy IRQ outside the IOAPIC pins.
    #[error("legacy IRQ {irq} is not an IOAPIC pin (0..{pins})")]
    LegacyIrqOutOfRange {
        /// Rejected IRQ.
        irq: u32,
        /// Number of IOAPIC pins.
        pins: u32,
    },

    /// The legacy IRQ is already claimed.
    #[error("legacy IRQ {irq} is already in use")]
    LegacyIrqInUse {
        /// Requested IRQ.
        irq: u32,
    },

    /// `free_legacy_irq` on a pin that is not allocated.
    #[error("legacy IRQ {irq} is not allocated")]
    LegacyIrqNotAllocated {
        /// IRQ passed to `free_legacy_irq`.
        irq: u32,
    },

    /// Every dynamically allocatable IOAPIC pin is taken.
    #[error("no free legacy IRQ among IOAPIC pins 0..{pins}")]
    LegacyIrqsExhausted {
        /// Number of IOAPIC pins.
        pins: u32,
    },

    /// A GSI outside the MSI range.
    #[error("GSI {gsi} is not an MSI GSI ({base}..{limit})")]
    MsiGsiOutOfRange {
        /// Rejected GSI.
        gsi: u32,
        /// First MSI GSI.
        base: u32,
        /// Exclusive end of the MSI GSIs.
        limit: u32,
    },

    /// `free_msi_gsi` on a GSI that is not allocated.
    #[error("MSI GSI {gsi} is not allocated")]
    MsiGsiNotAllocated {
        /// GSI passed to `free_msi_gsi`.
        gsi: u32,
    },

    /// Not enough free MSI GSIs.
    #[error("no room for {count} MSI GSI(s) in {base}..{limit}")]
    MsiGsisExhausted {
        /// Number requested.
        count: u32,
        /// First MSI GSI.
        base: u32,
        /// Exclusive end of the MSI GSIs.
        limit: u32,
    },

    /// `allocate_msi_gsis(0)`.
    #[error("cannot allocate 0 MSI GSIs")]
    ZeroGsiCount,

    /// The id engine failed in an unexpected way.
    #[error("{op} failed")]
    GsiEngine {
        /// What was being done.
        op: &'static str,
        /// Engine error.
        #[source]
        source: EngineError,
    },

    /// A guest RAM size of zero.
    #[error("guest RAM size must be non-zero")]
    ZeroRamSize,

    /// A RAM size or end that cannot be laid out.
    #[error("guest RAM layout overflows: {reason}")]
    RamLayoutOverflow {
        /// What overflowed.
        reason: &'static str,
    },

    /// A RAM end inside the 32-bit MMIO hole: RAM there must be relocated.
    #[error(
        "end of RAM {ram_end:#x} lies inside the 32-bit MMIO hole [{hole_start:#x}, {hole_end:#x})"
    )]
    RamEndInHole {
        /// Rejected end of RAM.
        ram_end: u64,
        /// Start of the hole.
        hole_start: u64,
        /// End of the hole.
        hole_end: u64,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
