//! Fuzzes PCI configuration space: a root bus with a host bridge and a PCI
//! Express function with every BAR kind, PCIe, MSI, MSI-X and vendor
//! capabilities, reached through mechanism #1, ECAM and its BARs. See
//! `trellis_fuzz::pci_config` for the model and the invariants.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_fuzz::pci_config::{run, Op};

fuzz_target!(|ops: Vec<Op>| run(&ops));
