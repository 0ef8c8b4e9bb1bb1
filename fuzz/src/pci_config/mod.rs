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
