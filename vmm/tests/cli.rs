//! The `trellis` binary as a user meets it: help, version, and one clear
//! line on stderr with a non-zero status for every mistake.

use std::path::PathBuf;
use std::process::{Command, Output};

fn trellis(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run trellis")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts the run failed with `code` and exactly one line on stderr,
/// `trellis: error: ...` containing `needle`; returns that line.
fn fails_with(args: &[&str], code: i32, needle: &str) -> String {
    let out = trellis(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert_eq!(
        err.lines().count(),
        1,
        "{args:?}: one line expected: {err:?}"
    );
    assert!(err.starts_with("trellis: error: "), "{err}");
    assert!(err.contains(needle), "{args:?}: {err} lacks {needle:?}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"));
    err
}

/// A scratch directory for this test binary.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trellis-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn help_lists_every_option() {
    let out = trellis(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for option in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--memory",
        "--cpus",
        "--disk",
        "--net",
        "--rng",
        "--console",
        "--serial",
        "--device",
        "--verbose",
        "--help",
        "--version",
    ] {
        assert!(text.contains(option), "{option} missing from --help");
    }
    assert!(text.contains("[,lock=on|off]"), "the disk lock switch");
    assert!(out.stderr.is_empty());
}

#[test]
fn version() {
    let out = trellis(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        text.trim(),
        format!("trellis {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bad_command_lines_exit_2_with_one_line() {
    fails_with(&[], 2, "--kernel");
    fails_with(&["--kernel", "/k", "--bogus"], 2, "'--bogus'");
    fails_with(
        &["--kernel", "/k", "--memory", "size=12Q"],
        2,
        "--memory: invalid size=12Q",
    );
    fails_with(
        &["--kernel", "/k", "--memory", "size=1M"],
        2,
        "the minimum is 64M",
    );
    fails_with(&["--kernel", "/k", "--cpus", "boot=0"], 2, "--cpus");
    fails_with(
        &["--kernel", "/k", "--disk", "path=/a,path=/b"],
        2,
        "more than once",
    );
    fails_with(
        &["--kernel", "/k", "--disk", "readonly=on"],
        2,
        "missing 'path=...'",
    );
    fails_with(
        &["--kernel", "/k", "--net", "tap=t0,mac=01:02:03:04:05:06"],
        2,
        "unicast",
    );
    fails_with(
        &["--kernel", "/k", "--net", "tap=t0,colour=red"],
        2,
        "unknown key 'colour'",
    );
    fails_with(
        &["--kernel", "/k", "--console", "tty"],
        2,
        "cannot both use the terminal",
    );
    fails_with(
        &["--kernel", "/k", "--device", "path=/dev/sda"],
        2,
        "--device",
    );
}

#[test]
fn missing_files_are_named() {
    let dir = scratch("missing");
    let kernel = dir.join("no-such-vmlinux");
    let kernel = kernel.to_str().unwrap();
    let line = fails_with(&["--kernel", kernel], 2, "kernel ");
    assert!(
        line.contains(kernel) && line.contains("No such file"),
        "{line}"
    );

    let real = dir.join("vmlinux");
    std::fs::write(&real, b"not a kernel").unwrap();
    let real = real.to_str().unwrap();
    fails_with(
        &["--kernel", real, "--initramfs", "/no/initrd"],
        2,
        "initramfs /no/initrd",
    );
    fails_with(
        &["--kernel", real, "--disk", "path=/no/disk.img"],
        2,
        "disk image /no/disk.img",
    );
    let dir_str = dir.to_str().unwrap();
    fails_with(&["--kernel", dir_str], 2, "not a regular file");
    std::fs::remove_dir_all(&dir).unwrap();
}
