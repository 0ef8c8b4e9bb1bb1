//! A VM torn down after a guest reset lets go of everything it held, so
//! the next boot can be built and reboots do not leak: file descriptors
//! (KVM, eventfds, the disk, the tap), threads (vCPUs, device workers, the
//! event loop), guest RAM, and the tap it created.
//!
//! One test in its own binary: it counts the process's descriptors and
//! threads, which tests running beside it would disturb.

mod common;

use std::path::Path;

use common::{pvh_image, require_kvm, TempFile};
use vmm::config::VmConfig;
use vmm::device_manager::Outputs;
use vmm::machine::{BootEnd, Machine};

/// Guest RAM: large, so a leaked copy shows in the address space (it is
/// mapped without reserving, so it costs nothing).
const GUEST_RAM_MIB: u64 = 1024;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// VmSize in MiB.
fn address_space_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmSize:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmSize in /proc/self/status");
    kib >> 10
}

fn tap_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

#[test]
fn every_boot_releases_what_it_held() {
    require_kvm();
    let kernel = TempFile::new(&pvh_image());
    let disk = TempFile::new(&[0u8; 8192]);
    let serial = TempFile::new(b"");
    let console = TempFile::new(b"");
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let tap = (root && Path::new("/dev/net/tun").exists())
        .then(|| format!("trltd{}", std::process::id() % 1_000_000));
    let mut args: Vec<String> = [
        "trellis",
        "--kernel",
        kernel.0.to_str().unwrap(),
        "--cmdline",
        "k",
        "--cpus",
        "boot=2",
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "--memory".into(),
        format!("size={GUEST_RAM_MIB}M"),
        "--serial".into(),
        format!("file={}", serial.0.display()),
        "--console".into(),
        format!("file={}", console.0.display()),
        "--disk".into(),
        format!("path={}", disk.0.display()),
        "--rng".into(),
    ]);
    if let Some(tap) = &tap {
        args.extend(["--net".into(), format!("tap={tap}")]);
    } else {
        eprintln!("not root or no /dev/net/tun: no tap in this test");
    }
    let config = VmConfig::parse(&args).unwrap();
    let outputs = Outputs::new(&config.serial, &config.console);

    let (fds_before, threads_before) = (open_fds(), threads());
    let mut after = Vec::new();
    for boot in 1..=3 {
        let machine = Machine::build(&config, &outputs).unwrap();
        if let Some(tap) = &tap {
            assert!(tap_exists(tap), "boot {boot}: trellis did not create {tap}");
        }
        // The test kernel pulses the i8042 reset line on every boot.
        assert_eq!(machine.run().unwrap(), BootEnd::Reset, "boot {boot}");
        if let Some(tap) = &tap {
            assert!(!tap_exists(tap), "boot {boot}: {tap} outlived its VM");
        }
        after.push((open_fds(), threads(), address_space_mib()));
    }

    // The output files are opened by the first boot and kept for the
    // process's lifetime; nothing else may stay.
    let (fds, threads, space) = after[0];
    assert_eq!(fds, fds_before + 2, "descriptors left by boot 1");
    assert_eq!(threads, threads_before, "threads left by boot 1");
    for (boot, &(f, t, s)) in after.iter().enumerate().skip(1) {
        let boot = boot + 1;
        assert_eq!(f, fds, "descriptors left by boot {boot}");
        assert_eq!(t, threads, "threads left by boot {boot}");
        assert!(
            s < space + GUEST_RAM_MIB / 2,
            "boot {boot}: address space grew from {space} to {s} MiB: guest RAM leaked?"
        );
    }
    assert_eq!(
        std::fs::read_to_string(&serial.0).unwrap(),
        "PVH OK k\n".repeat(3)
    );
}
