//! Fuzzes virtio-net's request path with rings the fuzzer fills. See
//! `trellis_fuzz::requests::net`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_fuzz::requests::net::{run, Input};

fuzz_target!(|input: Input| {
    run(&input);
});
