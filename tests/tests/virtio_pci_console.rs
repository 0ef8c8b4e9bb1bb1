//! The virtio console behind the PCI transport, driven by the in-process
//! guest driver: identity, configuration, output, input, reset.

#[path = "support/rig.rs"]
mod rig;

use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use rig::{bdf, wait_for, Rig, TIMEOUT};
use tests::virtio_driver::transport::features;
use tests::virtio_driver::{pci as guest_pci, AddrWidth, Buffer, ConfigMechanism};
use virtio_devices::console::{Console, ConsoleInput};
use vm_memory::{Bytes, GuestAddress};

const F_SIZE: u64 = 1;
const DATA: u64 = 0x10_0000;

/// Guest output collected in memory.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn console_talks_both_ways_through_the_transport() {
    let output = Output::default();
    let (mut host, guest_end) = UnixStream::pair().unwrap();
    let input = ConsoleInput::new(OwnedFd::from(guest_end)).unwrap();
    let console = Console::new(Box::new(output.clone()), Some(input)).with_size(80, 25);
    let rig = Rig::new(console);
    let driver = rig.probe(ConfigMechanism::PortIo);

    let cfg = driver.cfg();
    assert_eq!(cfg.read16(bdf(), guest_pci::DEVICE_ID), 0x1043);
    assert_eq!(cfg.read8(bdf(), guest_pci::CLASS + 2), 0x07);
    assert_eq!(cfg.read8(bdf(), guest_pci::CLASS + 1), 0x80);
    assert_eq!(driver.num_queues(), 2);

    let wanted = features::VERSION_1 | features::RING_EVENT_IDX | F_SIZE;
    assert_eq!(driver.negotiate(wanted).unwrap(), wanted);
    let mut size = [0u8; 4];
    driver.read_config(0, &mut size).unwrap();
    assert_eq!(size, [80, 0, 25, 0], "cols, rows");

    driver
        .enable_msix(&[
            (0xfee0_0000, 0x30),
            (0xfee0_1000, 0x31),
            (0xfee0_2000, 0x32),
        ])
        .unwrap();
    driver.set_config_vector(2).unwrap();
    let mut rx = driver
        .setup_queue(
            &rig.mem,
            0,
            64,
            0x1_0000,
            AddrWidth::DwordHalves,
            Some(0),
            true,
        )
        .unwrap();
    let mut tx = driver
        .setup_queue(&rig.mem, 1, 64, 0x2_0000, AddrWidth::Qword, Some(1), true)
        .unwrap();
    driver.driver_ok();
    assert_eq!(driver.status(), 0x0f);

    // Host to guest.
    rx.add_chain(&[Buffer::writable(DATA, 64)]).unwrap();
    driver.notify(0);
    host.write_all(b"ping").unwrap();
    let (_, len) = rx.wait_used(TIMEOUT).unwrap();
    let mut got = vec![0u8; len as usize];
    rig.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert_eq!(got, b"ping");
    rig.wait_triggered(&[0]);

    // Guest to host.
    rig.mem
        .write_slice(b"hello, host", GuestAddress(DATA + 0x1000))
        .unwrap();
    tx.add_chain(&[Buffer::readable(DATA + 0x1000, 11)])
        .unwrap();
    driver.notify(1);
    tx.wait_used(TIMEOUT).unwrap();
    wait_for("console output", || {
        output.0.lock().unwrap().as_slice() == b"hello, host"
    });
    rig.wait_triggered(&[1]);

    // Reset stops the worker; the console comes back with new rings.
    driver.reset().unwrap();
    driver.negotiate(features::VERSION_1).unwrap();
    let mut tx = driver
        .setup_queue(&rig.mem, 1, 16, 0x3_0000, AddrWidth::Qword, None, false)
        .unwrap();
    driver.disable_msix();
    driver.driver_ok();
    rig.mem.write_slice(b"!", GuestAddress(DATA)).unwrap();
    tx.add_chain(&[Buffer::readable(DATA, 1)]).unwrap();
    driver.notify(1);
    tx.wait_used(TIMEOUT).unwrap();
    wait_for("INTx", || rig.intx());
    assert_eq!(driver.read_isr() & 1, 1);
    wait_for("second output", || {
        output.0.lock().unwrap().as_slice() == b"hello, host!"
    });
}
