//! virtio-rng, and virtio-console with rings above 4 GiB (its main test
//! is virtio_pci_console.rs), behind the PCI transport, driven by the
//! in-process guest driver (`tests::virtio_driver`) only through
//! configuration space and BAR accesses: each device does real I/O, with
//! the queue addresses written either as one 8-byte access or as two
//! 4-byte halves. The rings sit above 4 GiB so that both halves of every
//! address matter.
//!
//! Every wait is bounded by [`WAIT`]; a failure says what was observed.

#[path = "support/device_io.rs"]
mod device_io;
#[path = "support/rig.rs"]
mod rig;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use device_io::{
    check_identity, check_queue_addresses, msix_messages, rig_with, ring, wait_used, wait_vector,
    DATA, HIGH_DATA, QUEUE_SIZE, WAIT,
};
use tests::virtio_driver::transport::features;
use tests::virtio_driver::{AddrWidth, Buffer, ConfigMechanism};
use virtio_devices::rng::Rng;
use vm_memory::{Bytes, GuestAddress};

// ---------------------------------------------------------------- virtio-rng

/// Two entropy requests: one 64-byte buffer, then 64 bytes as two 32-byte
/// descriptors.
fn rng_session(mechanism: ConfigMechanism, width: AddrWidth, event_idx: bool) {
    let rig = rig_with(Rng::new("/dev/urandom".into()).expect("rng"));
    let driver = rig.probe(mechanism);
    check_identity(&driver, 0x1044, (0xff, 0x00));
    assert!(
        driver.device_cfg.is_none(),
        "virtio-rng has no device configuration, found {:?}",
        driver.device_cfg
    );
    let mut wanted = features::VERSION_1;
    if event_idx {
        wanted |= features::RING_EVENT_IDX;
    }
    assert_eq!(driver.negotiate(wanted).expect("negotiation"), wanted);
    assert_eq!(driver.num_queues(), 1, "num_queues");
    driver.enable_msix(&msix_messages(2)).expect("MSI-X");
    driver.set_config_vector(1).expect("config vector");
    let mut queue = driver
        .setup_queue(&rig.mem, 0, QUEUE_SIZE, ring(0), width, Some(0), event_idx)
        .expect("queue 0");
    check_queue_addresses(&driver, &queue, width);
    driver.driver_ok();
    assert_eq!(driver.status(), 0x0f, "status after DRIVER_OK");

    // A guard after the buffer shows the device keeps to its length.
    let buf = DATA;
    rig.mem.write_slice(&[0u8; 64], GuestAddress(buf)).unwrap();
    rig.mem
        .write_slice(&[0xee; 64], GuestAddress(buf + 64))
        .unwrap();
    let head = queue.add_chain(&[Buffer::writable(buf, 64)]).unwrap();
    driver.notify(0);
    let (id, len) = wait_used(&rig, &driver, &mut queue, "entropy");
    assert_eq!((id, len), (u32::from(head), 64), "used element");
    assert_eq!(wait_vector(&rig, 0, "entropy"), [0], "interrupts");
    let mut first = [0u8; 128];
    rig.mem.read_slice(&mut first, GuestAddress(buf)).unwrap();
    assert!(
        first[..64].iter().any(|&b| b != 0),
        "64 bytes of entropy all zero"
    );
    assert!(
        first[64..].iter().all(|&b| b == 0xee),
        "device wrote past the buffer: {:02x?}",
        &first[64..]
    );

    let (a, b) = (DATA + 0x1000, HIGH_DATA);
    rig.mem.write_slice(&[0u8; 32], GuestAddress(a)).unwrap();
    rig.mem.write_slice(&[0u8; 32], GuestAddress(b)).unwrap();
    let head = queue
        .add_chain(&[Buffer::writable(a, 32), Buffer::writable(b, 32)])
        .unwrap();
    driver.notify(0);
    let (id, len) = wait_used(&rig, &driver, &mut queue, "entropy in two buffers");
    assert_eq!((id, len), (u32::from(head), 64), "used element");
    assert_eq!(wait_vector(&rig, 0, "entropy in two buffers"), [0]);
    let mut second = [0u8; 64];
    rig.mem
        .read_slice(&mut second[..32], GuestAddress(a))
        .unwrap();
    rig.mem
        .read_slice(&mut second[32..], GuestAddress(b))
        .unwrap();
    assert!(
        second[..32].iter().any(|&b| b != 0) && second[32..].iter().any(|&b| b != 0),
        "a 32-byte buffer stayed zero: {second:02x?}"
    );
    assert_ne!(first[..64], second, "the same 64 bytes twice");
}

#[test]
fn rng_fills_buffers_with_qword_queue_addresses() {
    rng_session(ConfigMechanism::Ecam, AddrWidth::Qword, false);
}

#[test]
fn rng_fills_buffers_with_dword_queue_addresses_and_event_idx() {
    rng_session(ConfigMechanism::PortIo, AddrWidth::DwordHalves, true);
}

// ------------------------------------------------------------ virtio-console

/// Guest output collected in memory.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// virtio_pci_console.rs covers the console with rings in low RAM, where
/// the high half of every queue address is 0. Here the rings sit above
/// 4 GiB, and each queue is set up once with each width (the widths swap
/// across a reset); input and output go through each time.
#[test]
fn console_rings_above_4g_with_each_width_on_each_queue() {
    use std::io::Write;
    use virtio_devices::console::{Console, ConsoleInput};

    let output = Output::default();
    let (mut host, guest_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let input = ConsoleInput::new(std::os::fd::OwnedFd::from(guest_end)).unwrap();
    let rig = rig_with(Console::new(Box::new(output.clone()), Some(input)));
    let driver = rig.probe(ConfigMechanism::Ecam);
    check_identity(&driver, 0x1043, (0x07, 0x80));

    let mut expected_output = Vec::new();
    for (round, (rx_width, tx_width)) in [
        (AddrWidth::DwordHalves, AddrWidth::Qword),
        (AddrWidth::Qword, AddrWidth::DwordHalves),
    ]
    .into_iter()
    .enumerate()
    {
        let round = round as u64;
        let wanted = features::VERSION_1 | features::RING_EVENT_IDX;
        assert_eq!(driver.negotiate(wanted).expect("negotiation"), wanted);
        driver.enable_msix(&msix_messages(3)).expect("MSI-X");
        driver.set_config_vector(2).expect("config vector");
        let mut rx = driver
            .setup_queue(&rig.mem, 0, 16, ring(2 * round), rx_width, Some(0), true)
            .expect("receiveq");
        let mut tx = driver
            .setup_queue(
                &rig.mem,
                1,
                16,
                ring(2 * round + 1),
                tx_width,
                Some(1),
                true,
            )
            .expect("transmitq");
        check_queue_addresses(&driver, &rx, rx_width);
        check_queue_addresses(&driver, &tx, tx_width);
        driver.driver_ok();
        assert_eq!(driver.status(), 0x0f, "round {round}: status");

        // Host to guest, into a buffer in high RAM.
        let inbox = HIGH_DATA + 0x1000 * round;
        rig.mem
            .write_slice(&[0u8; 64], GuestAddress(inbox))
            .unwrap();
        let head = rx.add_chain(&[Buffer::writable(inbox, 64)]).unwrap();
        driver.notify(0);
        let typed = format!("ping {round}");
        host.write_all(typed.as_bytes()).unwrap();
        let what = format!("round {round}: console input");
        let (id, len) = wait_used(&rig, &driver, &mut rx, &what);
        assert_eq!((id, len as usize), (u32::from(head), typed.len()), "{what}");
        let mut got = vec![0u8; typed.len()];
        rig.mem.read_slice(&mut got, GuestAddress(inbox)).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), typed, "{what}");
        wait_vector(&rig, 0, &what);

        // Guest to host.
        let said = format!("pong {round};");
        rig.mem
            .write_slice(said.as_bytes(), GuestAddress(DATA))
            .unwrap();
        tx.add_chain(&[Buffer::readable(DATA, said.len() as u32)])
            .unwrap();
        driver.notify(1);
        let what = format!("round {round}: console output");
        wait_used(&rig, &driver, &mut tx, &what);
        wait_vector(&rig, 1, &what);
        expected_output.extend_from_slice(said.as_bytes());
        let deadline = Instant::now() + WAIT;
        while *output.0.lock().unwrap() != expected_output {
            assert!(
                Instant::now() < deadline,
                "{what}: host saw {:?}, expected {:?}",
                String::from_utf8_lossy(&output.0.lock().unwrap()),
                String::from_utf8_lossy(&expected_output)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        driver.reset().expect("reset");
    }
}
