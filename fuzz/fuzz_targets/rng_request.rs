//! Fuzzes virtio-rng's request path with rings the fuzzer fills. See
//! `trellis_fuzz::requests::rng`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_fuzz::requests::rng::{run, Input};

fuzz_target!(|input: Input| {
    run(&input);
});
