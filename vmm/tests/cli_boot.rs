//! The `trellis` binary booting the platform's tiny PVH test kernel on the
//! host's /dev/kvm: exit status by how the guest ends, serial output, the
//! PCI topology on stderr, and clear errors for kernels that cannot boot.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{pvh_image, require_kvm, TempFile};

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

/// Boots the PVH test kernel with `cmdline` (its first letter says how to
/// end) and the serial port in a file; returns the run and the serial text.
fn boot(cmdline: &str, extra: &[&str]) -> (Output, String) {
    require_kvm();
    let kernel = TempFile::new(&pvh_image());
    let serial = TempFile::new(b"");
    let serial_opt = format!("file={}", serial.0.display());
    let mut args = vec![
        "--kernel",
        kernel.0.to_str().unwrap(),
        "--cmdline",
        cmdline,
        "--memory",
        "size=64M",
        "--serial",
        &serial_opt,
    ];
    args.extend_from_slice(extra);
    let out = trellis(&args);
    let text = String::from_utf8_lossy(&std::fs::read(&serial.0).unwrap()).into_owned();
    (out, text)
}

#[test]
fn power_off_exits_0() {
    let (out, serial) = boot("p", &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(serial, "PVH OK p\n");
}

#[test]
fn the_topology_is_on_stderr_by_default() {
    let disk = TempFile::new(&[0u8; 4096]);
    let disk_opt = format!("path={},id=root", disk.0.display());
    let console = TempFile::new(b"");
    let console_opt = format!("file={}", console.0.display());
    let (out, serial) = boot(
        "p",
        &["--disk", &disk_opt, "--rng", "--console", &console_opt],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(serial, "PVH OK p\n");
    for line in [
        "0000:00:00.0 host bridge [1b36:0008]",
        "0000:00:01.0 root [1af4:1042], BAR0 ",
        "0000:00:02.0 rng [1af4:1044], BAR0 ",
        "0000:00:03.0 console [1af4:1043], BAR0 ",
    ] {
        assert!(err.contains(line), "{line:?} missing from:\n{err}");
    }
    assert!(
        err.contains("MSI-X 2 vectors on GSI 24-25, INTA# on GSI 17"),
        "{err}"
    );
    assert!(!err.contains("DEBUG"), "default level is info at most");
}

#[test]
fn a_triple_fault_exits_non_zero() {
    let (out, serial) = boot("t", &[]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(serial, "PVH OK t\n");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("trellis: error: ") && last.contains("vCPU 0 triple-faulted"),
        "{err}"
    );
}

/// The test kernel resets on every boot, so trellis reboots it until it is
/// killed: each reboot is a new VM (devices, tap and all) that boots the
/// kernel afresh, writing to the same serial file.
#[test]
fn resets_reboot_the_guest() {
    require_kvm();
    let kernel = TempFile::new(&pvh_image());
    let disk = TempFile::new(&[0u8; 4096]);
    for cmdline in ["r", "k"] {
        let serial = TempFile::new(b"earlier output\n");
        let log = TempFile::new(b"");
        let mut args = vec![
            "--kernel".to_string(),
            kernel.0.display().to_string(),
            "--cmdline".to_string(),
            cmdline.to_string(),
            "--memory".to_string(),
            "size=64M".to_string(),
            "--serial".to_string(),
            format!("file={}", serial.0.display()),
            "--disk".to_string(),
            format!("path={}", disk.0.display()),
            "--rng".to_string(),
        ];
        // A tap trellis creates must be let go of before the next boot
        // creates it again.
        let tap = format!("trlrb{}{cmdline}", std::process::id() % 100_000);
        if std::path::Path::new("/dev/net/tun").exists() && is_root() {
            args.extend(["--net".to_string(), format!("tap={tap}")]);
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(&args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(std::fs::File::create(&log.0).unwrap())
            .spawn()
            .expect("run trellis");
        let boots = |text: &str| text.matches(&format!("PVH OK {cmdline}\n")).count();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut text = String::new();
        while boots(&text) < 3 && Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                let err = std::fs::read_to_string(&log.0).unwrap_or_default();
                panic!("{cmdline}: trellis ended ({status}) instead of rebooting: {err}");
            }
            std::thread::sleep(Duration::from_millis(20));
            text = std::fs::read_to_string(&serial.0).unwrap_or_default();
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let err = std::fs::read_to_string(&log.0).unwrap();
        assert!(
            boots(&text) >= 3,
            "{cmdline}: serial {text:?}, stderr {err}"
        );
        assert!(text.starts_with("earlier output\nPVH OK"), "{text:?}");
        for boot in [2, 3] {
            let line = format!("the guest reset the VM: rebuilding it for boot {boot}");
            assert!(err.contains(&line), "{cmdline}: no {line:?} in {err}");
        }
        assert_eq!(
            err.matches("host bridge").count(),
            1,
            "topology once: {err}"
        );
        assert!(!err.contains("trellis: error"), "{err}");
        assert!(
            !std::path::Path::new("/sys/class/net").join(&tap).exists(),
            "tap {tap} outlived trellis"
        );
    }
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails with exactly one stderr line containing `needle`.
fn fails_once(args: &[&str], needle: &str) {
    let out = trellis(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("trellis: error: ") && err.contains(needle),
        "{err}"
    );
}

#[test]
fn kernels_that_cannot_boot_are_named() {
    require_kvm();
    let garbage: Vec<u8> = (0..8192u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let garbage = TempFile::new(&garbage);
    let path = garbage.0.to_str().unwrap();
    fails_once(
        &["--kernel", path, "--serial", "off"],
        "neither an ELF vmlinux nor a bzImage",
    );
    let empty = TempFile::new(b"");
    fails_once(
        &["--kernel", empty.0.to_str().unwrap(), "--serial", "off"],
        "empty",
    );
}

#[test]
fn vfio_setup_mistakes_are_named() {
    require_kvm();
    let kernel = TempFile::new(&pvh_image());
    let kernel = kernel.0.to_str().unwrap();
    let run = |path: &str, needle: &str| {
        fails_once(
            &[
                "--kernel",
                kernel,
                "--serial",
                "off",
                "--device",
                &format!("path={path}"),
            ],
            needle,
        )
    };
    run(
        "/sys/bus/pci/devices/0000:ff:1f.7",
        "cannot pass vfio0 through: /sys/bus/pci/devices/0000:ff:1f.7: no such PCI function",
    );
    // A host function held by a regular driver, if this host has one.
    let bound = std::fs::read_dir("/sys/bus/pci/devices")
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let driver = std::fs::read_link(e.path().join("driver")).ok()?;
            let driver = driver.file_name()?.to_string_lossy().into_owned();
            (!driver.contains("vfio")).then(|| (e.path(), driver))
        });
    if let Some((path, driver)) = bound {
        run(
            path.to_str().unwrap(),
            &format!("is bound to {driver}, not to vfio-pci"),
        );
    }
}

#[test]
fn an_image_given_twice_read_write_is_refused_before_boot() {
    let disk = TempFile::new(&[0u8; 4096]);
    let path = disk.0.to_str().unwrap();
    let rw = format!("path={path}");
    let (out, serial) = boot("p", &["--disk", &rw, "--disk", &rw]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(
        err,
        format!(
            "trellis: error: cannot create disk1: disk image {path} is locked for writing \
             by this process (the same image given twice?)\n"
        )
    );
    assert_eq!(serial, "", "the guest must not have started");

    // A writer and a reader conflict too.
    let ro = format!("path={path},readonly=on");
    let (out, serial) = boot("p", &["--disk", &rw, "--disk", &ro]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("disk image") && err.contains("is locked for writing"));
    assert_eq!(serial, "");
}

#[test]
fn readers_share_an_image_and_lock_off_skips_the_lock() {
    let disk = TempFile::new(&[0u8; 4096]);
    let path = disk.0.to_str().unwrap();
    for opt in ["readonly=on", "lock=off"] {
        let d = format!("path={path},{opt}");
        let (out, serial) = boot("p", &["--disk", &d, "--disk", &d]);
        assert_eq!(out.status.code(), Some(0), "{opt}: {}", stderr(&out));
        assert_eq!(serial, "PVH OK p\n", "{opt}");
    }
}

/// Kills the trellis it holds when dropped, even if the test fails.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_image_another_vm_writes_is_refused_with_its_pid() {
    require_kvm();
    let kernel = TempFile::new(&pvh_image());
    let kernel = kernel.0.to_str().unwrap();
    let disk = TempFile::new(&[0u8; 4096]);
    let disk_opt = format!("path={}", disk.0.display());
    let serial = TempFile::new(b"");
    let serial_opt = format!("file={}", serial.0.display());
    // The first VM halts forever once booted, holding the image.
    let mut first = Running(
        Command::new(env!("CARGO_BIN_EXE_trellis"))
            .args(["--kernel", kernel, "--cmdline", "h", "--memory", "size=64M"])
            .args(["--serial", &serial_opt, "--disk", &disk_opt])
            .env_remove("RUST_LOG")
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run trellis"),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read(&serial.0).unwrap() != b"PVH OK h\n" {
        assert!(
            first.0.try_wait().unwrap().is_none(),
            "the first VM ended early"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "the first VM did not boot"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }

    for opt in [disk_opt.clone(), format!("{disk_opt},readonly=on")] {
        let (out, serial) = boot("p", &["--disk", &opt]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{opt}: {err}");
        assert_eq!(
            err,
            format!(
                "trellis: error: cannot create disk0: disk image {} is locked for writing \
                 by trellis, pid {} (another VM using it?)\n",
                disk.0.display(),
                first.0.id()
            )
        );
        assert_eq!(serial, "", "{opt}: the guest must not have started");
    }

    // Once the first VM is gone, so is its lock.
    first.0.kill().unwrap();
    first.0.wait().unwrap();
    let (out, serial) = boot("p", &["--disk", &disk_opt]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(serial, "PVH OK p\n");
}
