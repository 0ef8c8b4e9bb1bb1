//! Rig 2: the freestanding test guest (guest/) drives trellis' virtio-pci
//! devices with a third-party driver (virtio-drivers) and reports on COM1 and
//! the debug exit port; these tests run it under the trellis binary and
//! check its verdict and what it left on the host.
//!
//! Needs /dev/kvm, root (for the taps) and a trellis binary built from the
//! current sources: `cargo build --workspace` before `cargo test`, or
//! TRELLIS_BIN. See tests/src/guest_rig/mod.rs for how both are found.

use std::path::Path;

use tests::guest_rig::{GuestRun, Outcome};

/// Checks the guest runs with every device attached.
const ALL_CHECKS: &[&str] = &[
    "pci-enumerate",
    "blk-init",
    "blk-read",
    "blk-flush",
    "blk-write",
    "blk-read-past-end",
    "blk-msix",
    "rng-read",
    "rng-msix",
    "console-write",
    "console-msix",
    "net-init",
    "net-tx",
    "net-msix",
];

/// Constants of the guest's conventions (guest/README.md).
const SECTOR: u64 = 512;
const DISK_MAGIC: &[u8] = b"TRELLIS-DISK";
const WRITE_SECTOR: u64 = 64;
const WRITE_LEN: usize = 4096;
const WRITE_MAGIC: &[u8] = b"TRELLIS-GUEST-WROTE-THIS\n";
const CONSOLE_LINE: &str = "TRELLIS-CONSOLE-OK";
const NET_ETHERTYPE: [u8; 2] = [0x88, 0xb5];
const NET_PAYLOAD: &[u8] = b"TRELLIS-NET-TX";
/// The window `bars=reassign` takes addresses from.
const GUEST_BAR_WINDOW: std::ops::Range<u64> = 0xc000_0000..0xe000_0000;

fn base() -> &'static Path {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
}

/// Every device, net on a fresh tap, plus extra guest options.
fn all_devices(name: &str, extra: &str) -> Outcome {
    GuestRun::new(base(), name)
        .cmdline(&format!("expect=blk,rng,console,net {extra}"))
        .disk()
        .rng()
        .console()
        .net()
        .run()
}

/// Byte `i` of the block the guest writes at sector 64.
fn write_pattern(i: usize) -> u8 {
    WRITE_MAGIC.get(i).copied().unwrap_or((i % 251) as u8)
}

/// What the guest's devices did on the host side: the block it wrote, the
/// host pattern left intact, the console line, the frame on the tap.
fn check_host_side(out: &Outcome) {
    let sector0 = out.read_disk(0, SECTOR as usize);
    out.check(
        sector0.starts_with(DISK_MAGIC),
        "sector 0 lost its TRELLIS-DISK magic",
    );
    let written = out.read_disk(WRITE_SECTOR * SECTOR, WRITE_LEN);
    if let Some(at) = (0..WRITE_LEN).find(|&i| written[i] != write_pattern(i)) {
        out.fail(format!(
            "disk image byte {at} after sector {WRITE_SECTOR} is {:#x}, the guest wrote {:#x}",
            written[at],
            write_pattern(at)
        ));
    }

    let console = out.console.as_deref().unwrap_or_default();
    out.check(
        console.lines().any(|l| l == CONSOLE_LINE),
        format!("console file lacks {CONSOLE_LINE}: {console:?}"),
    );

    // The guest's frame: broadcast, from the MAC it reported, our EtherType.
    let mac = out.test("net-init").detail;
    let mac = mac.strip_prefix("mac=").unwrap_or(&mac);
    let frame = out
        .frames
        .iter()
        .find(|f| f.len() >= 14 + NET_PAYLOAD.len() && f[12..14] == NET_ETHERTYPE);
    let Some(frame) = frame else {
        out.fail(format!(
            "no EtherType 0x88b5 frame on the tap ({} frames seen)",
            out.frames.len()
        ))
    };
    let src: Vec<String> = frame[6..12].iter().map(|b| format!("{b:02x}")).collect();
    out.check(
        frame[..6] == [0xff; 6],
        "the guest's frame is not broadcast",
    );
    out.check(
        src.join(":") == mac,
        format!(
            "frame source {} is not the device's MAC {mac}",
            src.join(":")
        ),
    );
    out.check(
        frame[14..].starts_with(NET_PAYLOAD),
        "the frame's payload lacks TRELLIS-NET-TX",
    );
    out.check(
        frame.len() == 60,
        format!("frame of {} bytes, the guest sent 60", frame.len()),
    );
}

#[test]
fn every_device_works_from_a_third_party_driver() {
    let out = all_devices("all", "");
    out.assert_passed(ALL_CHECKS);
    out.check(
        out.test("blk-flush").detail != "not-offered",
        "trellis' virtio-blk does not offer VIRTIO_BLK_F_FLUSH",
    );
    check_host_side(&out);
}

#[test]
fn devices_work_after_the_guest_moves_every_bar() {
    let out = all_devices("bars", "bars=reassign");
    out.assert_passed(ALL_CHECKS);
    // "INFO 00:01.0 bar0=0xc0000000 size=0x10000 (assigned by guest)"
    let moved: Vec<u64> = out
        .lines("INFO ")
        .filter(|l| l.ends_with("(assigned by guest)"))
        .filter_map(|l| {
            let addr = l.split(' ').nth(2)?.split_once("=0x")?.1;
            u64::from_str_radix(addr, 16).ok()
        })
        .collect();
    out.check(
        moved.len() == 4,
        format!("expected 4 BARs moved by the guest, saw {moved:x?}"),
    );
    out.check(
        moved.iter().all(|a| GUEST_BAR_WINDOW.contains(a)),
        format!("moved BARs {moved:x?} outside the guest's window"),
    );
    check_host_side(&out);
}

#[test]
fn config_space_through_ports_cf8_cfc() {
    let out = all_devices("port", "pci=port");
    out.assert_passed(ALL_CHECKS);
    let enumerate = out.test("pci-enumerate").detail;
    out.check(
        enumerate.contains("virtio=4") && enumerate.contains("cam=port"),
        format!("pci-enumerate did not use ports 0xCF8/0xCFC: {enumerate}"),
    );
}

#[test]
fn msix_reaches_an_xapic_guest() {
    let out = all_devices("xapic", "apic=xapic");
    out.assert_passed(ALL_CHECKS);
    out.check(
        out.lines("INFO apic=xapic ").count() == 1,
        "the guest did not run in xAPIC mode",
    );
}

#[test]
fn read_only_disk_refuses_writes() {
    let out = GuestRun::new(base(), "readonly")
        .cmdline("expect=blk expect_ro=1")
        .readonly_disk()
        .run();
    out.assert_passed(&[
        "pci-enumerate",
        "blk-init",
        "blk-read",
        "blk-readonly",
        "blk-read-past-end",
        "blk-msix",
    ]);
    out.check(
        out.test("blk-init").detail.contains("readonly=true"),
        "the device does not offer VIRTIO_BLK_F_RO",
    );
    out.check(
        out.tests().iter().all(|t| t.name != "blk-write"),
        "the guest wrote to a read-only disk",
    );
    let sectors = out.read_disk(WRITE_SECTOR * SECTOR, WRITE_LEN);
    out.check(
        sectors.iter().all(|&b| b == 0),
        "the read-only disk image changed",
    );
    out.check(
        out.read_disk(0, SECTOR as usize).starts_with(DISK_MAGIC),
        "sector 0 of the read-only disk changed",
    );
}

#[test]
fn guest_panic_ends_the_vm_with_status_1() {
    let out = GuestRun::new(base(), "panic")
        .cmdline("expect=blk selftest=panic")
        .disk()
        .run();
    out.assert_guest_failed();
    out.check(
        out.lines("PANIC at ").count() == 1,
        "no PANIC line in the serial log",
    );
}

#[test]
fn guest_page_fault_ends_the_vm_with_status_1() {
    let out = GuestRun::new(base(), "fault")
        .cmdline("expect=blk selftest=fault")
        .disk()
        .run();
    out.assert_guest_failed();
    out.check(
        out.lines("EXCEPTION vector=14 ").count() == 1,
        "no page fault EXCEPTION line in the serial log",
    );
}

/// `mode=reboot` (guest/src/reboot.rs): where the first boot leaves its
/// marker, what it starts with, and its console line.
const MARK_SECTOR: u64 = 128;
const MARK: &str = "TRELLIS-REBOOT-MARK ";
const FIRST_BOOT_CONSOLE_LINE: &str = "TRELLIS-REBOOT-FIRST-BOOT";

/// What every reboot run must show: trellis exited 0 after exactly one
/// reboot (one log line, two guest boots), the second boot passed the
/// checks in `expected` and found the marker the first one wrote with
/// `method`, and the marker is in the image.
fn check_one_reboot(out: &Outcome, method: &str, expected: &[&str]) {
    let mut checks = vec!["reboot-marker"];
    checks.extend_from_slice(expected);
    out.assert_passed(&checks);
    out.check(
        out.lines("TRELLIS-GUEST boot").count() == 2,
        "the serial log does not show two boots",
    );
    // assert_passed looked at the second boot; the first one must not have
    // failed anything either.
    out.check(
        out.lines("TEST ")
            .all(|l| l.split(' ').nth(2) == Some("ok")),
        "a TEST line of the first boot failed",
    );
    out.check(
        out.lines("REBOOT marker written").count() == 1,
        "the first boot did not write its marker exactly once",
    );
    let marker = out.test("reboot-marker").detail;
    out.check(
        marker == format!("sector={MARK_SECTOR} reset={method}"),
        format!("the second boot found {marker:?}"),
    );
    let stderr = &out.finished.stderr;
    out.check(
        stderr
            .matches("the guest reset the VM: rebuilding it for boot 2")
            .count()
            == 1
            && !stderr.contains("for boot 3"),
        "trellis did not log exactly one reboot",
    );
    // The NIC kept its (random) address across the reboot.
    if let Some(first) = out.lines("REBOOT net mac=").next() {
        let second = out.test("net-init").detail;
        out.check(
            first.strip_prefix("REBOOT net ") == Some(second.as_str()),
            format!("the MAC changed across the reboot: {first:?}, then {second:?}"),
        );
    } else if expected.contains(&"net-init") {
        out.fail("the first boot printed no REBOOT net mac= line");
    }
    let sector = out.read_disk(MARK_SECTOR * SECTOR, SECTOR as usize);
    out.check(
        sector.starts_with(format!("{MARK}{method}\n").as_bytes()),
        format!(
            "sector {MARK_SECTOR} lacks the marker: {:?}",
            String::from_utf8_lossy(&sector[..32])
        ),
    );
}

#[test]
fn a_guest_reset_reboots_the_vm() {
    // Every device, so each is torn down and built again, the watched tap
    // attached twice; the checks run on the second boot.
    let out = all_devices("reboot", "mode=reboot");
    check_one_reboot(&out, "kbd", ALL_CHECKS);
    out.check(
        out.lines("REBOOT resetting through the i8042").count() == 1,
        "the first boot did not reset through the i8042",
    );
    check_host_side(&out);
    // Both boots' console output is in the file, in order: the rebuilt
    // console did not truncate it.
    let console = out.console.as_deref().unwrap_or_default();
    let lines: Vec<&str> = console.lines().collect();
    out.check(
        lines.iter().position(|l| *l == FIRST_BOOT_CONSOLE_LINE)
            < lines.iter().position(|l| *l == CONSOLE_LINE)
            && lines.contains(&FIRST_BOOT_CONSOLE_LINE),
        format!("the console file lost the first boot's line: {console:?}"),
    );
}

#[test]
fn the_acpi_reset_register_reboots_the_vm() {
    // A tap trellis creates itself: the old VM must let go of it before
    // the new one creates it again.
    let tap = format!("trl2r-{}", std::process::id() % 1_000_000);
    let out = GuestRun::new(base(), "reboot-acpi")
        .cmdline("expect=blk,net mode=reboot reset=acpi")
        .disk()
        .args(&["--net", &format!("tap={tap}")])
        .run();
    check_one_reboot(
        &out,
        "acpi",
        &["blk-init", "blk-read", "blk-write", "net-init"],
    );
    out.check(
        out.lines("REBOOT resetting through the FADT reset register")
            .count()
            == 1,
        "the first boot did not reset through the FADT's reset register",
    );
    out.check(
        !Path::new("/sys/class/net").join(&tap).exists(),
        format!("the tap {tap} trellis created outlived it"),
    );
}
