//! Fuzzes the virtio-pci transport: BAR 0, configuration space and guest
//! memory around a real device. See `trellis_fuzz::virtio_pci_bar`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_fuzz::virtio_pci_bar::{run, Input};

fuzz_target!(|input: Input| {
    run(&input);
});
