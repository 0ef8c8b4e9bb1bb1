//! The virtio-pci transport driven by the in-process guest driver
//! (`tests::virtio_driver`) through configuration space and BAR accesses,
//! with an echo device behind it doing real work on its worker thread.

#[path = "support/echo.rs"]
mod echo;
#[path = "support/rig.rs"]
mod rig;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use echo::{EchoConfig, EchoDevice, EchoStats};
use pci::interrupt::InterruptEvent;
use pci::MsiMessage;
use rig::{bdf, wait_for, GUEST_BAR, MEM_SIZE, TIMEOUT, VMM_BAR};
use tests::virtio_driver::transport::{common, features, status, NO_VECTOR};
use tests::virtio_driver::virtqueue::VIRTQ_DESC_F_NEXT;
use tests::virtio_driver::{
    pci as guest_pci, AddrWidth, Buffer, ConfigMechanism, DriverError, SplitQueue, VirtioPciDriver,
};
use virtio_devices::transport::VIRTIO_PCI_BAR_SIZE;
use vm_memory::{Bytes, GuestAddress};

/// Data buffers live above the rings.
const DATA: u64 = 0x10_0000;

/// The transport rig with the echo device's handles.
struct Rig {
    inner: rig::Rig,
    config: Arc<Mutex<EchoConfig>>,
    stats: Arc<EchoStats>,
}

impl std::ops::Deref for Rig {
    type Target = rig::Rig;
    fn deref(&self) -> &rig::Rig {
        &self.inner
    }
}

impl Rig {
    fn new(queues: &[u16], device_features: u64, queue_reset: bool) -> Self {
        let device = EchoDevice::new(queues, device_features, queue_reset);
        let config = device.config.clone();
        let stats = device.stats.clone();
        Rig {
            inner: rig::Rig::new(device),
            config,
            stats,
        }
    }

    fn echo(queues: &[u16]) -> Self {
        Self::new(
            queues,
            features::RING_EVENT_IDX | features::RING_INDIRECT_DESC,
            true,
        )
    }
}

/// Sends `payload` through `queue` and returns what came back.
fn roundtrip(
    rig: &Rig,
    driver: &VirtioPciDriver,
    queue: &mut SplitQueue,
    payload: &[u8],
    slot: u64,
) -> Vec<u8> {
    let out = DATA + slot * 0x2000;
    let back = out + 0x1000;
    rig.mem.write_slice(payload, GuestAddress(out)).unwrap();
    rig.mem
        .write_slice(&[0u8; 0x1000], GuestAddress(back))
        .unwrap();
    let len = payload.len() as u32;
    let head = queue
        .add_chain(&[Buffer::readable(out, len), Buffer::writable(back, len)])
        .unwrap();
    driver.notify(queue.index);
    let (id, written) = queue.wait_used(TIMEOUT).unwrap();
    assert_eq!(id, u32::from(head));
    let mut result = vec![0u8; written as usize];
    rig.mem.read_slice(&mut result, GuestAddress(back)).unwrap();
    result
}

/// Brings the echo device up with MSI-X: vector i for queue i, the last
/// for configuration changes.
fn bring_up(rig: &Rig, driver: &VirtioPciDriver, width: AddrWidth) -> Vec<SplitQueue> {
    let wanted = features::VERSION_1 | features::RING_EVENT_IDX;
    let accepted = driver.negotiate(wanted).unwrap();
    assert_eq!(accepted, wanted);
    let n = driver.num_queues();
    let messages: Vec<(u64, u32)> = (0..=u64::from(n))
        .map(|v| (0xfee0_0000 + (v << 12), 0x4000 + v as u32))
        .collect();
    driver.enable_msix(&messages).unwrap();
    driver.set_config_vector(n).unwrap();
    let queues = (0..n)
        .map(|i| {
            let base = 0x1_0000 * u64::from(i + 1);
            driver
                .setup_queue(&rig.mem, i, 64, base, width, Some(i), true)
                .unwrap()
        })
        .collect();
    driver.driver_ok();
    assert_eq!(driver.status(), 0x0f);
    queues
}

#[test]
fn probe_finds_the_device_through_both_config_mechanisms() {
    let rig = Rig::echo(&[64, 64]);
    for mechanism in [ConfigMechanism::PortIo, ConfigMechanism::Ecam] {
        let cfg = rig.machine.config(mechanism);
        let functions = guest_pci::enumerate(&cfg);
        assert_eq!(functions.len(), 2, "host bridge and the echo device");
        let echo = functions.iter().find(|f| f.bdf == bdf()).unwrap();
        assert_eq!((echo.vendor_id, echo.device_id), (0x1af4, 0x1040 + 63));
        assert_eq!(echo.class, (0xff, 0, 0));
        assert_eq!(cfg.read8(bdf(), guest_pci::REVISION), 1);
        assert!(cfg.read16(bdf(), guest_pci::SUBSYSTEM_ID) >= 0x40);
        assert_eq!(cfg.read8(bdf(), guest_pci::INTERRUPT_PIN), 1);
    }

    let driver = rig.probe(ConfigMechanism::Ecam);
    assert_eq!(driver.bar_size, VIRTIO_PCI_BAR_SIZE);
    let moves = rig.machine.bar_moves();
    assert_eq!(moves.len(), 1);
    assert_eq!((moves[0].old_base, moves[0].new_base), (VMM_BAR, GUEST_BAR));
    assert_eq!(rig.dev.lock().unwrap().bar_address(), GUEST_BAR);
    assert_eq!(driver.notify.notify_off_multiplier, 4);
    assert_eq!(driver.common.length, 0x3c);
    assert_eq!(driver.msix.unwrap().1, 3, "two queues plus config");
    assert!(driver.device_cfg.is_some());
    assert_eq!(driver.device_cfg.unwrap().length, 8, "the echo device's");
    assert_eq!(driver.num_queues(), 2);
    assert_eq!(driver.queue_size(1), 64);
    let offered = driver.device_features();
    assert_eq!(
        offered,
        features::VERSION_1
            | features::RING_EVENT_IDX
            | features::RING_INDIRECT_DESC
            | features::RING_RESET
    );
}

#[test]
fn requests_complete_with_msix_using_qword_addresses() {
    let rig = Rig::echo(&[64, 64]);
    let driver = rig.probe(ConfigMechanism::Ecam);
    let mut queues = bring_up(&rig, &driver, AddrWidth::Qword);
    // The vectors were routed where the driver pointed them.
    let routed: Vec<_> = rig
        .msix
        .take_events()
        .into_iter()
        .filter_map(|e| match e {
            InterruptEvent::Updated {
                index,
                msg,
                masked: false,
            } => Some((index, msg)),
            _ => None,
        })
        .collect();
    for v in 0..3u16 {
        let msg = MsiMessage {
            address: 0xfee0_0000 + (u64::from(v) << 12),
            data: 0x4000 + u32::from(v),
        };
        assert!(routed.contains(&(v, msg)), "vector {v}: {routed:?}");
    }

    for round in 0..20u64 {
        let q = (round % 2) as usize;
        let payload = format!("hello {round} on queue {q}");
        let back = roundtrip(&rig, &driver, &mut queues[q], payload.as_bytes(), round);
        assert_eq!(back, payload.as_bytes());
        rig.wait_triggered(&[q as u16]);
    }
    assert!(!rig.intx(), "no INTx with MSI-X on");
    assert_eq!(rig.config.lock().unwrap().completed, 20);
}

#[test]
fn requests_complete_using_dword_half_addresses_above_4g_style_layout() {
    let rig = Rig::echo(&[128]);
    let driver = rig.probe(ConfigMechanism::PortIo);
    let mut queues = bring_up(&rig, &driver, AddrWidth::DwordHalves);
    driver.select_queue(0);
    assert_eq!(
        driver.read_common(common::QUEUE_DESC, 8),
        queues[0].desc,
        "qword read of what was written in halves"
    );
    assert_eq!(driver.read_common(common::QUEUE_DEVICE, 4), queues[0].used);
    assert_eq!(driver.read_common(common::QUEUE_DEVICE + 4, 4), 0);
    let back = roundtrip(&rig, &driver, &mut queues[0], b"halves", 0);
    assert_eq!(back, b"halves");
    rig.wait_triggered(&[0]);
}

#[test]
fn multi_descriptor_chains_are_gathered_and_scattered() {
    let rig = Rig::echo(&[64]);
    let driver = rig.probe(ConfigMechanism::Ecam);
    let mut queues = bring_up(&rig, &driver, AddrWidth::Qword);
    let q = &mut queues[0];
    rig.mem.write_slice(b"abc", GuestAddress(DATA)).unwrap();
    rig.mem
        .write_slice(b"defgh", GuestAddress(DATA + 0x100))
        .unwrap();
    q.add_chain(&[
        Buffer::readable(DATA, 3),
        Buffer::readable(DATA + 0x100, 5),
        Buffer::writable(DATA + 0x200, 2),
        Buffer::writable(DATA + 0x300, 16),
    ])
    .unwrap();
    driver.notify(0);
    let (_, written) = q.wait_used(TIMEOUT).unwrap();
    assert_eq!(written, 8);
    let mut a = [0u8; 2];
    let mut b = [0u8; 6];
    rig.mem
        .read_slice(&mut a, GuestAddress(DATA + 0x200))
        .unwrap();
    rig.mem
        .read_slice(&mut b, GuestAddress(DATA + 0x300))
        .unwrap();
    assert_eq!((&a, &b), (b"ab", b"cdefgh"));
    assert_eq!(q.free_descriptors(), 64);
}

#[test]
fn intx_carries_interrupts_when_msix_is_off() {
    let rig = Rig::new(&[64], 0, false);
    let driver = rig.probe(ConfigMechanism::PortIo);
    driver.negotiate(features::VERSION_1).unwrap();
    let mut q = driver
        .setup_queue(&rig.mem, 0, 64, 0x1_0000, AddrWidth::Qword, None, false)
        .unwrap();
    driver.driver_ok();
    let back = roundtrip(&rig, &driver, &mut q, b"legacy interrupt", 0);
    assert_eq!(back, b"legacy interrupt");
    wait_for("INTx", || rig.intx());
    let status_reg = driver.cfg().read16(bdf(), guest_pci::STATUS);
    assert_ne!(status_reg & guest_pci::STATUS_INTERRUPT, 0);
    assert_eq!(driver.read_isr(), 1, "queue interrupt");
    assert!(!rig.intx(), "reading the ISR lowers the line");
    assert_eq!(driver.read_isr(), 0);
    assert!(rig.msix.take_triggered().is_empty());

    // With INTx disabled in the command register, the ISR still records
    // the interrupt but the line stays low.
    guest_pci::set_command_bits(&driver.cfg(), bdf(), guest_pci::COMMAND_INTX_DISABLE);
    roundtrip(&rig, &driver, &mut q, b"quiet", 1);
    wait_for("ISR", || rig.dev.lock().unwrap().interrupt().isr() != 0);
    assert!(!rig.intx());
    assert_eq!(driver.read_isr(), 1);
}

#[test]
fn reset_stops_the_device_and_it_starts_again() {
    let rig = Rig::echo(&[64, 64]);
    let driver = rig.probe(ConfigMechanism::Ecam);
    let mut queues = bring_up(&rig, &driver, AddrWidth::Qword);
    assert_eq!(roundtrip(&rig, &driver, &mut queues[1], b"one", 0), b"one");

    driver.reset().unwrap();
    assert_eq!(driver.status(), 0);
    assert!(
        rig.stats.resets.load(Ordering::SeqCst) >= 2,
        "probe and now"
    );
    assert_eq!(driver.read_common(common::MSIX_CONFIG, 2) as u16, NO_VECTOR);
    driver.select_queue(1);
    assert_eq!(driver.read_common(common::QUEUE_ENABLE, 2), 0);
    assert_eq!(
        driver.read_common(common::QUEUE_MSIX_VECTOR, 2) as u16,
        NO_VECTOR
    );

    // A kick after reset goes nowhere.
    driver.notify(1);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(queues[1].used_idx().unwrap(), 1);

    // Second life, with different rings and half-width addresses.
    driver.negotiate(features::VERSION_1).unwrap();
    let mut q = driver
        .setup_queue(
            &rig.mem,
            1,
            32,
            0x8_0000,
            AddrWidth::DwordHalves,
            Some(0),
            false,
        )
        .unwrap();
    driver.driver_ok();
    assert_eq!(roundtrip(&rig, &driver, &mut q, b"two", 1), b"two");
    rig.wait_triggered(&[0]);
    assert_eq!(rig.stats.activations.load(Ordering::SeqCst), 2);
    assert_eq!(
        *rig.stats.acked.lock().unwrap(),
        vec![
            features::VERSION_1 | features::RING_EVENT_IDX,
            features::VERSION_1
        ]
    );
}

#[test]
fn features_ok_is_refused_for_features_the_device_does_not_offer() {
    let rig = Rig::new(&[64], features::RING_EVENT_IDX, false);
    let driver = rig.probe(ConfigMechanism::Ecam);
    driver.reset().unwrap();
    driver.add_status(status::ACKNOWLEDGE | status::DRIVER);
    let err = driver
        .accept_features(features::VERSION_1 | features::RING_RESET)
        .unwrap_err();
    assert!(matches!(err, DriverError::FeaturesRefused(_)));
    assert_eq!(driver.status(), status::ACKNOWLEDGE | status::DRIVER);
    // Without VERSION_1 as well.
    assert!(driver.accept_features(features::RING_EVENT_IDX).is_err());
    // A legal set is accepted on retry.
    driver.accept_features(features::VERSION_1).unwrap();
    assert!(rig.stats.acked.lock().unwrap().len() == 1);
    // DRIVER_OK without any queue: the device refuses to start.
    driver.driver_ok();
    assert_ne!(driver.status() & status::NEEDS_RESET, 0);
    assert_eq!(rig.stats.activations.load(Ordering::SeqCst), 0);
}

#[test]
fn device_config_reads_are_consistent_under_concurrent_updates() {
    let rig = Rig::echo(&[256]);
    let driver = rig.probe(ConfigMechanism::Ecam);
    let mut queues = bring_up(&rig, &driver, AddrWidth::Qword);
    let mut cfg = [0u8; 8];
    driver.read_config(0, &mut cfg).unwrap();
    assert_eq!(cfg, [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
    let generation = driver.config_generation();

    // Keep the worker updating the configuration while reading it.
    let q = &mut queues[0];
    for i in 0..200u64 {
        let out = DATA + (i % 64) * 16;
        q.add_chain(&[Buffer::readable(out, 1)]).unwrap();
        if i % 16 == 15 {
            driver.notify(0);
            let mut cfg = [0u8; 8];
            driver.read_config(0, &mut cfg).unwrap();
            let a = u32::from_le_bytes(cfg[..4].try_into().unwrap());
            let b = u32::from_le_bytes(cfg[4..].try_into().unwrap());
            assert_eq!(b, !a, "torn read: {a:#x} {b:#x}");
            while q.pop_used().unwrap().is_some() {}
            wait_for("completions", || q.used_idx().unwrap() == (i + 1) as u16);
            while q.pop_used().unwrap().is_some() {}
        }
    }
    driver.notify(0);
    wait_for("the last completions", || q.used_idx().unwrap() == 200);
    while q.pop_used().unwrap().is_some() {}
    assert_ne!(driver.config_generation(), generation);

    // A '!' request changes the configuration and raises the config vector.
    rig.msix.take_events();
    roundtrip(&rig, &driver, q, b"!config", 100);
    rig.wait_triggered(&[1]);
}

#[test]
fn the_pci_cfg_capability_reaches_the_whole_bar() {
    let rig = Rig::echo(&[64, 64]);
    let driver = rig.probe(ConfigMechanism::PortIo);
    let common = driver.common.offset;
    assert_eq!(
        driver.cfg_window_read(common + common::NUM_QUEUES as u32, 2),
        2
    );
    // Drive the status through the window.
    driver.cfg_window_write(common + common::DEVICE_STATUS as u32, 1, 0);
    driver.cfg_window_write(common + common::DEVICE_STATUS as u32, 1, 1);
    assert_eq!(driver.status(), status::ACKNOWLEDGE);
    driver.cfg_window_write(common + common::QUEUE_SELECT as u32, 2, 1);
    assert_eq!(driver.read_common(common::QUEUE_SELECT, 2), 1);
    assert_eq!(
        driver.cfg_window_read(common + common::QUEUE_SIZE as u32, 4) & 0xffff,
        64
    );

    // Set up a queue normally, then notify it through the window.
    driver.negotiate(features::VERSION_1).unwrap();
    let mut q = driver
        .setup_queue(&rig.mem, 0, 64, 0x1_0000, AddrWidth::Qword, None, false)
        .unwrap();
    driver.driver_ok();
    rig.mem.write_slice(b"window", GuestAddress(DATA)).unwrap();
    q.add_chain(&[Buffer::readable(DATA, 6), Buffer::writable(DATA + 0x100, 6)])
        .unwrap();
    let notify = driver.notify_address(0) - driver.bar;
    driver.cfg_window_write(notify as u32, 2, 0);
    assert_eq!(q.wait_used(TIMEOUT).unwrap().1, 6);
    // The ISR through the window reads and clears.
    wait_for("ISR", || rig.intx());
    assert_eq!(driver.cfg_window_read(driver.isr.offset, 1), 1);
    assert!(!rig.intx());
}

#[test]
fn the_device_follows_a_bar_move_while_running() {
    let rig = Rig::echo(&[64]);
    let mut driver = rig.probe(ConfigMechanism::Ecam);
    let mut queues = bring_up(&rig, &driver, AddrWidth::Qword);
    assert_eq!(
        roundtrip(&rig, &driver, &mut queues[0], b"before", 0),
        b"before"
    );
    let new = GUEST_BAR + 16 * VIRTIO_PCI_BAR_SIZE;
    driver.move_bar(new);
    assert_eq!(driver.bar, new);
    assert_eq!(rig.dev.lock().unwrap().bar_address(), new);
    let fds = rig.dev.lock().unwrap().ioeventfds(new).len();
    assert_eq!(fds, 1);
    assert_eq!(driver.status(), 0x0f);
    assert_eq!(
        roundtrip(&rig, &driver, &mut queues[0], b"after", 1),
        b"after"
    );
    // Nothing answers at the old address any more.
    let old: [u8; 1] = rig.machine.mmio_read(GUEST_BAR + common::DEVICE_STATUS);
    assert_eq!(old, [0xff]);
}

#[test]
fn a_queue_can_be_reset_and_reenabled_while_others_run() {
    let rig = Rig::echo(&[64, 64]);
    let driver = rig.probe(ConfigMechanism::Ecam);
    let wanted = features::VERSION_1 | features::RING_RESET;
    assert_eq!(driver.negotiate(wanted).unwrap(), wanted);
    let mut q0 = driver
        .setup_queue(&rig.mem, 0, 64, 0x1_0000, AddrWidth::Qword, None, false)
        .unwrap();
    let mut q1 = driver
        .setup_queue(&rig.mem, 1, 64, 0x2_0000, AddrWidth::Qword, None, false)
        .unwrap();
    driver.driver_ok();
    assert_eq!(roundtrip(&rig, &driver, &mut q1, b"first", 0), b"first");

    driver.select_queue(1);
    driver.write_common(common::QUEUE_RESET, 2, 1);
    wait_for("queue reset", || {
        driver.read_common(common::QUEUE_RESET, 2) == 0
    });
    assert_eq!(driver.read_common(common::QUEUE_ENABLE, 2), 0);
    assert_eq!(rig.stats.queue_resets.load(Ordering::SeqCst), 1);
    // Queue 0 still works meanwhile.
    assert_eq!(roundtrip(&rig, &driver, &mut q0, b"zero", 1), b"zero");

    let mut q1 = driver
        .setup_queue(
            &rig.mem,
            1,
            16,
            0x3_0000,
            AddrWidth::DwordHalves,
            None,
            false,
        )
        .unwrap();
    assert_eq!(roundtrip(&rig, &driver, &mut q1, b"again", 2), b"again");
    assert_eq!(driver.status(), 0x0f);
}

#[test]
fn hostile_driver_cannot_break_the_device() {
    let rig = Rig::echo(&[64, 64]);
    let driver = rig.probe(ConfigMechanism::Ecam);
    driver.negotiate(features::VERSION_1).unwrap();

    // Non-power-of-two and oversized queue sizes are ignored.
    driver.select_queue(0);
    for size in [0u64, 3, 48, 128, 0xffff] {
        driver.write_common(common::QUEUE_SIZE, 2, size);
        assert_eq!(driver.read_common(common::QUEUE_SIZE, 2), 64);
    }
    // Read-only and reserved fields ignore writes.
    driver.write_common(common::NUM_QUEUES, 2, 77);
    driver.write_common(common::QUEUE_NOTIFY_OFF, 2, 9);
    driver.write_common(common::CONFIG_GENERATION, 1, 9);
    driver.write_common(0x3c, 4, u64::MAX);
    driver.write_common(0x800, 8, u64::MAX);
    assert_eq!(driver.num_queues(), 2);
    assert_eq!(driver.read_common(common::QUEUE_NOTIFY_OFF, 2), 0);
    assert_eq!(driver.read_common(0x3c, 4), 0);

    // A descriptor table outside guest memory: the queue stays disabled.
    driver.write_common(common::QUEUE_DESC, 8, MEM_SIZE as u64 - 0x100);
    driver.write_common(common::QUEUE_ENABLE, 2, 1);
    assert_eq!(driver.read_common(common::QUEUE_ENABLE, 2), 0);
    driver.write_common(common::QUEUE_DESC, 8, 1 << 40);
    driver.write_common(common::QUEUE_ENABLE, 2, 1);
    assert_eq!(driver.read_common(common::QUEUE_ENABLE, 2), 0);

    // Notifying disabled or absent queues before and after DRIVER_OK.
    driver.notify(0);
    let notify_base = driver.bar + u64::from(driver.notify.offset);
    rig.machine
        .mmio_write(notify_base + 7 * 4, &7u16.to_le_bytes());
    rig.machine.mmio_write(notify_base + 0x1ffe, &[0xff; 2]);
    let mut q1 = driver
        .setup_queue(&rig.mem, 1, 64, 0x2_0000, AddrWidth::Qword, None, false)
        .unwrap();
    driver.driver_ok();
    assert_eq!(driver.status(), 0x0f);
    driver.notify(0);

    // Chains that point outside memory, loop, or name descriptors past
    // the table: completed, never fatal.
    q1.write_descriptor(0, 1 << 40, 16, 0, 0).unwrap();
    q1.publish(0).unwrap();
    q1.write_descriptor(1, DATA, 16, VIRTQ_DESC_F_NEXT, 1)
        .unwrap();
    q1.publish(1).unwrap();
    q1.write_descriptor(2, DATA, 16, VIRTQ_DESC_F_NEXT, 500)
        .unwrap();
    q1.publish(2).unwrap();
    q1.write_descriptor(3, MEM_SIZE as u64 - 4, 64, 2, 0)
        .unwrap();
    q1.publish(3).unwrap();
    driver.notify(1);
    wait_for("hostile chains", || q1.used_idx().unwrap() == 4);
    while let Some((_, written)) = q1.pop_used().unwrap() {
        assert_eq!(written, 0, "nothing readable reached a writable buffer");
    }
    // The device keeps serving good requests.
    assert_eq!(
        roundtrip(&rig, &driver, &mut q1, b"still alive", 3),
        b"still alive"
    );
    // A queue enabled after DRIVER_OK is handed to the running device.
    let mut q0 = driver
        .setup_queue(&rig.mem, 0, 64, 0x4_0000, AddrWidth::Qword, None, false)
        .unwrap();
    assert_eq!(
        roundtrip(&rig, &driver, &mut q0, b"late queue", 4),
        b"late queue"
    );
    assert_eq!(driver.status() & status::NEEDS_RESET, 0);
    driver.reset().unwrap();
    assert_eq!(driver.status(), 0);
}
