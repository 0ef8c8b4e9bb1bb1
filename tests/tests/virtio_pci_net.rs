//! virtio-net behind the PCI transport, driven by the in-process guest
//! driver (`tests::virtio_driver`) only through configuration space and BAR
//! accesses: frames cross between the guest and a datagram socket standing
//! in for the wire, with the queue addresses written either as one 8-byte
//! access or as two 4-byte halves. The rings sit above 4 GiB so that both
//! halves of every address matter.
//!
//! Every wait is bounded by [`WAIT`]; a failure says what was observed.

#[path = "support/device_io.rs"]
mod device_io;
#[path = "support/rig.rs"]
mod rig;

use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use device_io::{
    assert_bytes, check_identity, check_queue_addresses, msix_messages, rig_with, ring, wait_used,
    wait_vector, DATA, HIGH_DATA, QUEUE_SIZE, WAIT,
};
use tests::virtio_driver::transport::features;
use tests::virtio_driver::{AddrWidth, Buffer, ConfigMechanism};
use virtio_devices::net::{MacAddr, Net, NetBackend};
use vm_memory::{Bytes, GuestAddress};

/// virtio-net feature bits, status and header (virtio 1.2 §5.1.3-§5.1.6).
mod net {
    pub const F_MAC: u64 = 1 << 5;
    pub const F_MRG_RXBUF: u64 = 1 << 15;
    pub const F_STATUS: u64 = 1 << 16;
    pub const F_CTRL_VQ: u64 = 1 << 17;
    pub const F_MQ: u64 = 1 << 22;
    pub const S_LINK_UP: u16 = 1;
    /// `virtio_net_hdr_v1`.
    pub const HDR_LEN: usize = 12;
    pub const HDR_F_DATA_VALID: u8 = 2;
}

const MAC: [u8; 6] = [0x02, 0x54, 0x52, 0x4c, 0x53, 0x01];

/// The device's end of the wire: one end of a datagram socket pair, so
/// every frame keeps its boundaries. The test holds the other end.
struct WireBackend {
    sock: UnixDatagram,
    offloads: Mutex<Vec<u32>>,
}

impl NetBackend for WireBackend {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.sock.send(frame)
    }
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// An Ethernet frame of `len` bytes (at least 14) from `src` to `dst`,
/// EtherType 0x88b5 (local experimental), payload numbered by `seed`.
fn ether_frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7) ^ seed));
    frame
}

/// A `virtio_net_hdr_v1` with `flags` and `num_buffers`, the rest zero
/// (no checksum or segmentation offload).
fn net_header(flags: u8, num_buffers: u16) -> [u8; net::HDR_LEN] {
    let mut hdr = [0u8; net::HDR_LEN];
    hdr[0] = flags;
    hdr[10..].copy_from_slice(&num_buffers.to_le_bytes());
    hdr
}

/// Receives one frame from the wire within [`WAIT`].
fn wire_recv(wire: &UnixDatagram, what: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    match wire.recv(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            buf
        }
        Err(e) => panic!("{what}: nothing on the wire within {WAIT:?}: {e}"),
    }
}

/// Receive queue 0 on vector 0, transmit queue 1 on vector 1,
/// configuration changes on vector 2. With `mrg`, 8 receive buffers of 256
/// bytes; without, 4 of 1526 (a full frame and its header, as the spec
/// asks of a driver without MRG_RXBUF).
fn net_session(mechanism: ConfigMechanism, width: AddrWidth, event_idx: bool, mrg: bool) {
    let (device_end, wire) = UnixDatagram::pair().unwrap();
    device_end.set_nonblocking(true).unwrap();
    wire.set_read_timeout(Some(WAIT)).unwrap();
    let backend = Arc::new(WireBackend {
        sock: device_end,
        offloads: Mutex::new(Vec::new()),
    });
    let device = Net::with_backends(
        vec![backend.clone() as Arc<dyn NetBackend>],
        Some(MacAddr::new(MAC)),
        QUEUE_SIZE,
    )
    .expect("net device");
    let rig = rig_with(device);
    let driver = rig.probe(mechanism);
    check_identity(&driver, 0x1041, (0x02, 0x00));

    let offered = driver.device_features();
    for (bit, name) in [
        (features::VERSION_1, "VERSION_1"),
        (net::F_MAC, "MAC"),
        (net::F_STATUS, "STATUS"),
        (net::F_MRG_RXBUF, "MRG_RXBUF"),
    ] {
        assert_ne!(offered & bit, 0, "{name} not offered: {offered:#x}");
    }
    assert_eq!(
        offered & (net::F_MQ | net::F_CTRL_VQ),
        0,
        "one queue pair offers MQ/CTRL_VQ: {offered:#x}"
    );
    let mut wanted = features::VERSION_1 | net::F_MAC | net::F_STATUS;
    if mrg {
        wanted |= net::F_MRG_RXBUF;
    }
    if event_idx {
        wanted |= features::RING_EVENT_IDX;
    }
    assert_eq!(driver.negotiate(wanted).expect("negotiation"), wanted);

    let mut config = [0u8; 8];
    driver.read_config(0, &mut config).expect("config read");
    assert_eq!(config[..6], MAC, "mac in config {config:02x?}");
    let status = u16::from_le_bytes([config[6], config[7]]);
    assert_eq!(status & net::S_LINK_UP, net::S_LINK_UP, "link status");

    assert_eq!(driver.num_queues(), 2, "receiveq and transmitq");
    driver.enable_msix(&msix_messages(3)).expect("MSI-X");
    driver.set_config_vector(2).expect("config vector");
    let mut rx = driver
        .setup_queue(&rig.mem, 0, QUEUE_SIZE, ring(0), width, Some(0), event_idx)
        .expect("receiveq");
    let mut tx = driver
        .setup_queue(&rig.mem, 1, QUEUE_SIZE, ring(1), width, Some(1), event_idx)
        .expect("transmitq");
    check_queue_addresses(&driver, &rx, width);
    check_queue_addresses(&driver, &tx, width);
    driver.driver_ok();
    assert_eq!(driver.status(), 0x0f, "status after DRIVER_OK");
    assert_eq!(
        *backend.offloads.lock().unwrap(),
        [0],
        "offloads set without GUEST_CSUM"
    );

    // --- Transmit: a header and a 60-byte frame in two descriptors, then
    // both in one; they reach the wire whole and in order.
    let frame1 = ether_frame([0xff; 6], MAC, 60, 1);
    let frame2 = ether_frame([0x02, 0, 0, 0, 0, 9], MAC, 60, 2);
    let hdr = net_header(0, 0);
    let t = DATA;
    rig.mem.write_slice(&hdr, GuestAddress(t)).unwrap();
    rig.mem
        .write_slice(&frame1, GuestAddress(t + 0x100))
        .unwrap();
    let one_piece = [&hdr[..], &frame2[..]].concat();
    rig.mem
        .write_slice(&one_piece, GuestAddress(t + 0x1000))
        .unwrap();
    let head1 = tx
        .add_chain(&[
            Buffer::readable(t, net::HDR_LEN as u32),
            Buffer::readable(t + 0x100, 60),
        ])
        .unwrap();
    let head2 = tx
        .add_chain(&[Buffer::readable(t + 0x1000, one_piece.len() as u32)])
        .unwrap();
    driver.notify(1);
    let sent1 = wire_recv(&wire, "first transmitted frame");
    let sent2 = wire_recv(&wire, "second transmitted frame");
    assert_eq!(sent1.len(), net::HDR_LEN + 60, "first frame on the wire");
    assert_bytes(&sent1, &[&hdr[..], &frame1[..]].concat(), "first frame");
    assert_bytes(&sent2, &one_piece, "second frame");
    let used1 = wait_used(&rig, &driver, &mut tx, "transmit 1");
    let used2 = wait_used(&rig, &driver, &mut tx, "transmit 2");
    assert_eq!(
        [used1, used2],
        [(u32::from(head1), 0), (u32::from(head2), 0)],
        "transmit used elements (id, len)"
    );
    let vectors = wait_vector(&rig, 1, "transmit");
    assert!(
        vectors.iter().all(|&v| v == 1),
        "transmit raised {vectors:?}"
    );

    // --- Receive. Frame A reaches the device before any receive buffer
    // exists and must wait for one; frame B arrives with buffers waiting.
    // The header's flags come through as 0 (no GUEST_CSUM) and
    // num_buffers says how many buffers the frame took.
    let frame_a = ether_frame(MAC, [0x02, 0, 0, 0, 0, 7], 60, 0xa);
    let frame_b = ether_frame(MAC, [0x02, 0, 0, 0, 0, 7], 588, 0xb);
    let wire_hdr = net_header(net::HDR_F_DATA_VALID, 0xbeef);
    wire.send(&[&wire_hdr[..], &frame_a[..]].concat()).unwrap();
    // Let the device find frame A with nowhere to put it.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rx.used_idx().unwrap(), 0, "receive with no buffers");

    let (count, buf_len) = if mrg { (8u64, 256u32) } else { (4, 1526) };
    let bufs: Vec<u64> = (0..count).map(|i| HIGH_DATA + i * 0x1000).collect();
    let mut heads = Vec::new();
    for &addr in &bufs {
        rig.mem
            .write_slice(&vec![0xdd; buf_len as usize], GuestAddress(addr))
            .unwrap();
        heads.push(rx.add_chain(&[Buffer::writable(addr, buf_len)]).unwrap());
    }
    driver.notify(0);

    let read_buf = |addr: u64, len: u32| {
        let mut v = vec![0u8; len as usize];
        rig.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    };
    let (id, len) = wait_used(&rig, &driver, &mut rx, "frame A");
    assert_eq!(
        (id, len as usize),
        (u32::from(heads[0]), net::HDR_LEN + 60),
        "frame A used element"
    );
    let got = read_buf(bufs[0], len);
    assert_eq!(got[..net::HDR_LEN], net_header(0, 1), "frame A header");
    assert_bytes(&got[net::HDR_LEN..], &frame_a, "frame A");
    assert_eq!(wait_vector(&rig, 0, "frame A"), [0], "frame A interrupts");

    rx.enable_interrupts().unwrap();
    wire.send(&[&wire_hdr[..], &frame_b[..]].concat()).unwrap();
    let total = net::HDR_LEN + frame_b.len();
    let mut got = Vec::new();
    let mut taken = 0;
    while got.len() < total {
        let (id, len) = wait_used(&rig, &driver, &mut rx, "frame B");
        let slot = 1 + taken;
        assert!(
            slot < heads.len(),
            "frame B took more than the buffers posted"
        );
        assert_eq!(id, u32::from(heads[slot]), "frame B buffer {taken} id");
        let full = buf_len.min((total - got.len()) as u32);
        assert_eq!(len, full, "frame B buffer {taken} used len");
        got.extend(read_buf(bufs[slot], len));
        taken += 1;
    }
    let expect_buffers = if mrg { total.div_ceil(256) } else { 1 };
    assert_eq!(taken, expect_buffers, "frame B buffers");
    assert_eq!(
        got[..net::HDR_LEN],
        net_header(0, expect_buffers as u16),
        "frame B header"
    );
    assert_bytes(&got[net::HDR_LEN..], &frame_b, "frame B");
    assert_eq!(wait_vector(&rig, 0, "frame B"), [0], "frame B interrupts");
    assert!(
        rx.pop_used().unwrap().is_none(),
        "extra receive completions"
    );
    assert!(!rig.intx(), "INTx asserted with MSI-X on");
}

#[test]
fn net_moves_frames_with_qword_queue_addresses() {
    net_session(ConfigMechanism::PortIo, AddrWidth::Qword, false, false);
}

#[test]
fn net_moves_frames_with_dword_queue_addresses_mrg_rxbuf_and_event_idx() {
    net_session(ConfigMechanism::Ecam, AddrWidth::DwordHalves, true, true);
}
