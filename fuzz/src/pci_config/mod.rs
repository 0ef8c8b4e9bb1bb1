//! The `pci_config` fuzz target: a root bus with a host bridge and one
//! feature-complete PCI Express function, driven through configuration
//! mechanism #1, ECAM, the function's BARs and its interrupt sources, with
//! invariants checked after every step.

pub mod device;
mod harness;
mod invariants;
pub mod ops;
pub mod vmm;

use pci::ECAM_BUS_SIZE;

pub use harness::Harness;
pub use ops::Op;

/// Steps per input; more only slows the fuzzer down.
pub const MAX_OPS: usize = 512;
/// Buses the ECAM window decodes: bus 1 is decoded but empty.
pub const ECAM_BUSES: u16 = 2;
/// Size of the ECAM window.
pub const ECAM_WINDOW_SIZE: u64 = ECAM_BUSES as u64 * ECAM_BUS_SIZE;

/// Bugs of the `pci` crate the fuzzer found, which the harness steps
/// around so that fuzzing can go on until they are fixed in `pci` (the fuzz
/// target never changes the code under test). Each has an ignored
/// regression test in `src/seeds.rs`: once a bug is fixed, clear its flag
/// in [`KNOWN_BUGS`] and un-ignore its test.
#[derive(Clone, Copy, Debug)]
pub struct KnownBugs {
    /// `PciRoot::config_write` splits a write into dword pieces, collects
    /// the BAR moves of every piece and applies them after the last one. An
    /// ECAM qword write covering both halves of a 64-bit BAR can yield two
    /// moves of that BAR; when the VMM refuses the first (the intermediate
    /// address) and it is rolled back, the second still reaches the VMM
    /// with the intermediate address as `old_base`, and if that is refused
    /// too, `restore_bar` leaves the BAR decoded at the intermediate
    /// address (e.g. in guest RAM) while the VMM keeps it where it was.
    /// The harness issues such writes one dword at a time.
    pub multi_dword_bar_moves: bool,
    /// `PciConfiguration::bar_is_sizing` ignores bit 0 of every BAR
    /// register (meant for the ROM enable bit), but in the upper dword of a
    /// 64-bit BAR bit 0 is address bit 32: an upper dword of 0xFFFF_FFFE
    /// counts as sizing, so a move there is never reported and the BAR
    /// reads back at an address the VMM never mapped. The harness counts
    /// that value as sizing too.
    pub upper_bar_bit0_sizing: bool,
}

/// The known bugs stepped around: all of them, until fixed.
pub const KNOWN_BUGS: KnownBugs = KnownBugs {
    multi_dword_bar_moves: true,
    upper_bar_bit0_sizing: true,
};

/// Runs `ops` (at most [`MAX_OPS`]) against a fresh root bus, panicking
/// with a description of the first invariant that breaks.
pub fn run(ops: &[Op]) {
    run_with(Harness::new(), ops);
}

/// Runs `ops` (at most [`MAX_OPS`]) on `harness`.
pub fn run_with(mut harness: Harness, ops: &[Op]) {
    harness.check_initial();
    for (index, op) in ops.iter().take(MAX_OPS).enumerate() {
        harness.step(index, op);
    }
    harness.check_final();
}
