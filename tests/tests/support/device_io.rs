//! Shared by the per-device PCI tests (virtio_pci_blk.rs,
//! virtio_pci_net.rs, virtio_pci_rng_console.rs): the memory layout with
//! the rings above 4 GiB, so that both halves of every queue address
//! matter, the rig built on it, bounded waits that say what they observed,
//! and checks of the identity and queue address registers.
//!
//! A test crate including this module must include `support/rig.rs` as
//! `mod rig` too.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use crate::rig::{self, bdf, Rig};
use tests::virtio_driver::transport::common;
use tests::virtio_driver::{pci as guest_pci, AddrWidth, SplitQueue, VirtioPciDriver};
use vm_memory::GuestAddress;

/// Longest the test waits for anything the device does.
pub const WAIT: Duration = Duration::from_secs(5);
/// Entries per virtqueue.
pub const QUEUE_SIZE: u16 = 64;
/// Guest RAM above 4 GiB, where the rings go, so that both halves of
/// every queue address matter.
pub const HIGH_RAM: u64 = 0x3_8000_0000;
pub const HIGH_RAM_SIZE: usize = 1 << 20;
/// Data buffers in low RAM.
pub const DATA: u64 = 0x10_0000;
/// Data buffers in high RAM, above the rings.
pub const HIGH_DATA: u64 = HIGH_RAM + 0x8_0000;

/// MSI-X messages (address, data) for vectors `0..count`, distinct per
/// vector.
pub fn msix_messages(count: u16) -> Vec<(u64, u32)> {
    (0..count)
        .map(|v| (0xfee0_0000 + (u64::from(v) << 12), 0x4100 + u32::from(v)))
        .collect()
}

/// Guest address of ring slot `n` (64 KiB each, in high RAM).
pub fn ring(n: u64) -> u64 {
    HIGH_RAM + 0x1_0000 * n
}

/// The transport rig with `device`, and RAM below and above 4 GiB.
pub fn rig_with<D: virtio_devices::VirtioDevice + 'static>(device: D) -> Rig {
    Rig::with_memory(
        device,
        &[
            (GuestAddress(0), rig::MEM_SIZE),
            (GuestAddress(HIGH_RAM), HIGH_RAM_SIZE),
        ],
    )
}

/// Waits for the next used element of `queue`; on timeout, panics with the
/// device status, the used index and the interrupts seen.
pub fn wait_used(
    rig: &Rig,
    driver: &VirtioPciDriver,
    queue: &mut SplitQueue,
    what: &str,
) -> (u32, u32) {
    queue.wait_used(WAIT).unwrap_or_else(|e| {
        panic!(
            "{what}: {e} within {WAIT:?}; queue {} used idx {:?}, device status {:#04x}, \
             interrupt calls {:?}, INTx {}",
            queue.index,
            queue.used_idx(),
            driver.status(),
            rig.msix.take_events(),
            rig.intx()
        )
    })
}

/// Waits until MSI-X `vector` fires; returns every vector fired meanwhile
/// (including ones fired before the call and not yet collected).
pub fn wait_vector(rig: &Rig, vector: u16, what: &str) -> Vec<u16> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        seen.extend(rig.msix.take_triggered());
        if seen.contains(&vector) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: MSI-X vector {vector} not triggered within {WAIT:?}; \
             vectors triggered: {seen:?}, INTx {}",
            rig.intx()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Asserts `got == want`, reporting the lengths and the first difference
/// rather than two long dumps.
pub fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let show = |v: &[u8]| v[at.min(v.len())..(at + 16).min(v.len())].to_vec();
    panic!(
        "{what}: {} bytes, expected {}; first difference at {at}: got {:02x?}, expected {:02x?}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    );
}

/// Checks the identity registers in configuration space.
pub fn check_identity(driver: &VirtioPciDriver, device_id: u16, class: (u8, u8)) {
    let cfg = driver.cfg();
    assert_eq!(cfg.read16(bdf(), guest_pci::VENDOR_ID), 0x1af4, "vendor");
    assert_eq!(cfg.read16(bdf(), guest_pci::DEVICE_ID), device_id, "device");
    assert_eq!(
        (
            cfg.read8(bdf(), guest_pci::CLASS + 2),
            cfg.read8(bdf(), guest_pci::CLASS + 1)
        ),
        class,
        "class, subclass"
    );
    assert!(
        cfg.read8(bdf(), guest_pci::REVISION) >= 1,
        "modern revision"
    );
}

/// Reads the selected queue's three ring addresses back in 4-byte halves
/// (what the spec guarantees) and, with `width` Qword, as 8-byte reads too.
pub fn check_queue_addresses(driver: &VirtioPciDriver, queue: &SplitQueue, width: AddrWidth) {
    driver.select_queue(queue.index);
    for (field, want, name) in [
        (common::QUEUE_DESC, queue.desc, "queue_desc"),
        (common::QUEUE_DRIVER, queue.avail, "queue_driver"),
        (common::QUEUE_DEVICE, queue.used, "queue_device"),
    ] {
        let halves = driver.read_common(field, 4) | driver.read_common(field + 4, 4) << 32;
        assert_eq!(
            halves, want,
            "queue {} {name} read back in halves after {width:?} writes",
            queue.index
        );
        if width == AddrWidth::Qword {
            assert_eq!(
                driver.read_common(field, 8),
                want,
                "queue {} {name} read back as a qword",
                queue.index
            );
        }
    }
}
