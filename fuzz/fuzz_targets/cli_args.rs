//! Fuzzes the command line parser. See `trellis_fuzz::cli_args`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_fuzz::cli_args::{run, Arg};

fuzz_target!(|args: Vec<Arg>| run(&args));
