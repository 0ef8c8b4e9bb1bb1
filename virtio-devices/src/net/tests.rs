//! virtio-net tests over datagram socket pairs standing in for a tap, and
//! one over a real tap.

use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use std::time::Duration;

use event_manager::EventSet;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::test_ring::{
    atomic, guest_memory, wait_until, Desc, RecordingInterrupt, TestRing, F_INDIRECT, F_NEXT,
    MEM_SIZE,
};
use crate::worker::{Backlog, WorkerHandler};

/// A frame-preserving fake tap: one end of a datagram socket pair.
struct DgramBackend {
    sock: UnixDatagram,
    offloads: Mutex<Vec<u32>>,
}

impl NetBackend for DgramBackend {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.sock.send(frame)
    }
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        std::os::unix::io::AsRawFd::as_raw_fd(&self.sock)
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

const RING_SIZE: u16 = 16;
const BUFS: u64 = 0x10_0000;

struct Harness {
    mem: GuestMemoryMmap,
    net: Net,
    /// The host's end of each backend.
    peers: Vec<UnixDatagram>,
    backends: Vec<Arc<DgramBackend>>,
    rings: Vec<TestRing>,
    kicks: Vec<EventFd>,
    irq: Arc<RecordingInterrupt>,
}

fn bit(f: u32) -> u64 {
    1 << f
}

impl Harness {
    fn new(pairs: usize, acked: u64) -> Self {
        Self::with_queues(pairs, acked, None)
    }

    /// Activates only the first `queues` queues if given, else all.
    fn with_queues(pairs: usize, acked: u64, queues: Option<usize>) -> Self {
        let mem = guest_memory();
        let mut peers = Vec::new();
        let mut backends = Vec::new();
        for _ in 0..pairs {
            let (ours, theirs) = UnixDatagram::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            theirs
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            backends.push(Arc::new(DgramBackend {
                sock: ours,
                offloads: Mutex::new(Vec::new()),
            }));
            peers.push(theirs);
        }
        let dyn_backends = backends
            .iter()
            .map(|b| Arc::clone(b) as Arc<dyn NetBackend>)
            .collect();
        let mac = Some(MacAddr::new([0x02, 0, 0, 0, 0, 0x42]));
        let mut net = Net::with_backends(dyn_backends, mac, RING_SIZE).unwrap();
        net.ack_features(acked);
        let mut h = Harness {
            mem,
            net,
            peers,
            backends,
            rings: Vec::new(),
            kicks: Vec::new(),
            irq: Arc::new(RecordingInterrupt::default()),
        };
        h.activate(queues);
        h
    }

    /// Activates with fresh rings for the first `queues` queues (default:
    /// all the device has).
    fn activate(&mut self, queues: Option<usize>) {
        let count = queues.unwrap_or(self.net.queue_max_sizes().len());
        self.rings = (0..count)
            .map(|q| TestRing::new(&self.mem, 0x1000 * (q as u64 + 1), RING_SIZE))
            .collect();
        let mut activations = Vec::new();
        self.kicks.clear();
        for (q, ring) in self.rings.iter().enumerate() {
            let (activation, kick) = ring.activation(q as u16);
            activations.push(activation);
            self.kicks.push(kick);
        }
        self.net
            .activate(atomic(&self.mem), self.irq.clone(), activations)
            .unwrap();
    }

    fn kick(&self, q: usize) {
        self.kicks[q].write(1).unwrap();
    }

    /// The guest transmits `data` as one chain of readable buffers split at
    /// `splits`, and kicks the transmit queue of `pair`.
    fn transmit(&mut self, pair: usize, data: &[u8], at: u64) {
        self.mem.write_slice(data, GuestAddress(at)).unwrap();
        let half = data.len() as u32 / 2;
        let q = 2 * pair + 1;
        self.rings[q].add_chain(&[
            Desc::r(at, half),
            Desc::r(at + u64::from(half), data.len() as u32 - half),
        ]);
        self.kick(q);
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// A frame with a zero vnet header and `len` payload bytes.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend((0..len).map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed)));
    f
}

fn assert_no_datagram(peer: &UnixDatagram) {
    peer.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 16];
    assert!(
        peer.recv(&mut buf).is_err(),
        "unexpected frame on the backend"
    );
    peer.set_nonblocking(false).unwrap();
}

#[test]
fn features_queues_and_config_space() {
    let h = Harness::new(1, 0);
    let f = h.net.features();
    for feature in [
        VIRTIO_NET_F_MAC,
        VIRTIO_NET_F_STATUS,
        VIRTIO_NET_F_MTU,
        VIRTIO_NET_F_MRG_RXBUF,
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_UFO,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert_ne!(f & bit(feature), 0, "feature {feature} missing");
    }
    assert_eq!(f & (bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ)), 0);
    assert_eq!(h.net.device_type(), crate::device_type::NET);
    assert_eq!(h.net.queue_max_sizes(), &[RING_SIZE, RING_SIZE]);
    assert_eq!(h.net.config_generation(), 0);

    assert_eq!(h.net.config_size(), 12);
    let mut config = [0xffu8; 16];
    h.net.read_config(0, &mut config);
    assert_eq!(&config[..6], &[0x02, 0, 0, 0, 0, 0x42]);
    assert_eq!(u16::from_le_bytes([config[6], config[7]]), 1, "link up");
    assert_eq!(u16::from_le_bytes([config[8], config[9]]), 1);
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1500);
    assert_eq!(&config[12..], &[0; 4], "past the end reads as zero");
    let mut status = [0u8; 2];
    h.net.read_config(6, &mut status);
    assert_eq!(status, [1, 0]);

    let mq = Harness::with_queues(3, 0, Some(2));
    assert_ne!(mq.net.features() & bit(VIRTIO_NET_F_MQ), 0);
    assert_ne!(mq.net.features() & bit(VIRTIO_NET_F_CTRL_VQ), 0);
    assert_eq!(mq.net.queue_max_sizes().len(), 7);
    let mut pairs = [0u8; 2];
    mq.net.read_config(8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 3);
}

#[test]
fn constructor_rejects_bad_configurations() {
    let (a, _b) = UnixDatagram::pair().unwrap();
    let backend: Arc<dyn NetBackend> = Arc::new(DgramBackend {
        sock: a,
        offloads: Mutex::new(Vec::new()),
    });
    let multicast = Some(MacAddr::new([0x01, 0, 0x5e, 0, 0, 1]));
    assert!(matches!(
        Net::with_backends(vec![backend.clone()], multicast, 256),
        Err(NetError::MulticastMac(_))
    ));
    assert!(matches!(
        Net::with_backends(vec![backend.clone()], None, 100),
        Err(NetError::InvalidConfig(_))
    ));
    assert!(matches!(
        Net::with_backends(Vec::new(), None, 256),
        Err(NetError::InvalidConfig(_))
    ));
    let random = Net::with_backends(vec![backend], None, 256).unwrap();
    assert_eq!(random.mac().bytes()[0], 0x02);
    let bad = NetConfig {
        queue_pairs: 0,
        ..NetConfig::default()
    };
    assert!(matches!(Net::new(bad), Err(NetError::InvalidConfig(_))));
}

#[test]
fn offloads_follow_the_guest_receive_features() {
    assert_eq!(tun_offload_flags(bit(VIRTIO_NET_F_GUEST_TSO4)), 0);
    assert_eq!(
        tun_offload_flags(bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_ECN)),
        libc::TUN_F_CSUM
    );
    let all = bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_GUEST_TSO6)
        | bit(VIRTIO_NET_F_GUEST_ECN)
        | bit(VIRTIO_NET_F_GUEST_UFO);
    assert_eq!(
        tun_offload_flags(all),
        libc::TUN_F_CSUM
            | libc::TUN_F_TSO4
            | libc::TUN_F_TSO6
            | libc::TUN_F_TSO_ECN
            | libc::TUN_F_UFO
    );
    let h = Harness::new(
        1,
        bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4),
    );
    assert_eq!(
        *h.backends[0].offloads.lock().unwrap(),
        vec![libc::TUN_F_CSUM | libc::TUN_F_TSO4]
    );
}

#[test]
fn transmitted_frame_reaches_the_backend_with_its_header() {
    let mut h = Harness::new(1, 0);
    let mut data = frame(100, 1);
    data[0] = 1; // NEEDS_CSUM: passed through untouched.
    h.transmit(0, &data, BUFS);
    let mut buf = vec![0u8; 4096];
    let n = h.peers[0].recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &data[..]);
    assert!(h.rings[1].wait_used(1));
    assert_eq!(h.rings[1].used_elem(0), (0, 0));
    assert!(h.irq.count(1) >= 1);
}

#[test]
fn transmit_through_an_indirect_table() {
    let h = Harness::new(1, bit(VIRTIO_RING_F_INDIRECT_DESC));
    let data = frame(64, 9);
    h.mem.write_slice(&data, GuestAddress(BUFS)).unwrap();
    // Two-entry indirect table at BUFS + 0x1000.
    let table = BUFS + 0x1000;
    h.rings[1].write_indirect_table(
        table,
        &[
            Desc {
                flags: F_NEXT,
                next: 1,
                ..Desc::r(BUFS, 12)
            },
            Desc::r(BUFS + 12, data.len() as u32 - 12),
        ],
    );
    h.rings[1].set_desc(
        0,
        Desc {
            flags: F_INDIRECT,
            ..Desc::r(table, 32)
        },
    );
    h.rings[1].publish(0);
    h.kick(1);
    let mut buf = vec![0u8; 4096];
    let n = h.peers[0].recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &data[..]);
}

#[test]
fn hostile_transmit_chains_are_dropped() {
    let mut h = Harness::new(1, 0);
    let ring = &mut h.rings[1];
    // A device-writable buffer in a transmit chain.
    ring.add_chain(&[Desc::r(BUFS, 12), Desc::w(BUFS + 12, 60)]);
    // Outside guest RAM, and straddling its end.
    ring.add_chain(&[Desc::r(1 << 40, 100)]);
    ring.add_chain(&[Desc::r(MEM_SIZE as u64 - 10, 100)]);
    // Larger than any frame.
    ring.add_chain(&[Desc::r(BUFS, MAX_FRAME_LEN as u32 + 1)]);
    // Shorter than the header.
    ring.add_chain(&[Desc::r(BUFS, 11)]);
    // A head past the end of the descriptor table: consumed, but it cannot
    // be put in the used ring.
    ring.publish(RING_SIZE + 3);
    h.kick(1);
    assert!(h.rings[1].wait_used(5));
    for n in 0..5 {
        assert_eq!(h.rings[1].used_elem(n).1, 0);
    }
    assert_no_datagram(&h.peers[0]);

    // The queue still works.
    let data = frame(40, 3);
    h.transmit(0, &data, BUFS + 0x2000);
    let mut buf = vec![0u8; 4096];
    let n = h.peers[0].recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &data[..]);
}

#[test]
fn received_frame_fills_one_buffer_with_num_buffers_one() {
    let mut h = Harness::new(1, 0);
    h.rings[0].add_chain(&[Desc::w(BUFS, 8), Desc::w(BUFS + 8, 2040)]);
    h.kick(0);
    let mut data = frame(300, 5);
    data[0] = 2; // DATA_VALID, which the driver did not negotiate.
    h.peers[0].send(&data).unwrap();
    assert!(h.rings[0].wait_used(1));
    assert_eq!(h.rings[0].used_elem(0), (0, data.len() as u32));
    let got = h.read(BUFS, data.len());
    assert_eq!(got[0], 0, "flags cleared without GUEST_CSUM");
    assert_eq!(&got[10..12], &[1, 0], "num_buffers");
    assert_eq!(&got[12..], &data[12..]);
    assert!(h.irq.count(0) >= 1);
}

#[test]
fn mergeable_buffers_span_a_large_frame() {
    let mut h = Harness::new(
        1,
        bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_GUEST_CSUM),
    );
    for i in 0..4u64 {
        h.rings[0].add_chain(&[Desc::w(BUFS + i * 0x1000, 1000)]);
    }
    h.kick(0);
    let mut data = frame(2488, 7); // 2500 bytes with the header.
    data[0] = 1; // NEEDS_CSUM
    h.peers[0].send(&data).unwrap();
    assert!(h.rings[0].wait_used(3));
    let lens: Vec<u32> = (0..3).map(|n| h.rings[0].used_elem(n).1).collect();
    assert_eq!(lens, vec![1000, 1000, 500]);
    let mut got = Vec::new();
    for (i, len) in lens.iter().enumerate() {
        got.extend(h.read(BUFS + i as u64 * 0x1000, *len as usize));
    }
    assert_eq!(&got[10..12], &[3, 0], "num_buffers");
    assert_eq!(got[0], 1, "flags kept with GUEST_CSUM");
    assert_eq!(&got[12..], &data[12..]);

    // The fourth buffer takes the next small frame alone.
    let small = frame(20, 1);
    h.peers[0].send(&small).unwrap();
    assert!(h.rings[0].wait_used(4));
    assert_eq!(h.rings[0].used_elem(3), (3, 32));
    assert_eq!(&h.read(BUFS + 0x3000, 12)[10..12], &[1, 0]);
}

#[test]
fn frame_waits_for_buffers_until_the_driver_notifies() {
    let mut h = Harness::new(1, bit(VIRTIO_NET_F_MRG_RXBUF));
    let first = frame(1500, 1);
    let second = frame(60, 2);
    h.peers[0].send(&first).unwrap();
    h.peers[0].send(&second).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.rings[0].used_idx(), 0);

    // One buffer is not enough for the first frame under MRG_RXBUF.
    h.rings[0].add_chain(&[Desc::w(BUFS, 1024)]);
    h.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.rings[0].used_idx(), 0, "partial delivery");

    h.rings[0].add_chain(&[Desc::w(BUFS + 0x1000, 1024)]);
    h.rings[0].add_chain(&[Desc::w(BUFS + 0x2000, 1024)]);
    h.kick(0);
    assert!(h.rings[0].wait_used(3));
    assert_eq!(h.rings[0].used_elem(0).1, 1024);
    assert_eq!(h.rings[0].used_elem(1).1, first.len() as u32 - 1024);
    assert_eq!(h.rings[0].used_elem(2).1, second.len() as u32);
    assert_eq!(&h.read(BUFS + 0x2000 + 12, 60), &second[12..]);
}

#[test]
fn hostile_receive_chains_cost_only_their_frame() {
    let mut h = Harness::new(1, 0);
    // Readable buffer in a receive chain, then one outside RAM, then one
    // too small for the frame (kept), then a good one.
    h.rings[0].add_chain(&[Desc::r(BUFS, 2048)]);
    h.rings[0].add_chain(&[Desc::w(1 << 40, 2048)]);
    h.kick(0);
    h.peers[0].send(&frame(100, 1)).unwrap();
    h.peers[0].send(&frame(100, 2)).unwrap();
    assert!(h.rings[0].wait_used(2));
    assert_eq!(h.rings[0].used_elem(0), (0, 0));
    assert_eq!(h.rings[0].used_elem(1), (1, 0));

    h.rings[0].add_chain(&[Desc::w(BUFS, 64)]);
    h.kick(0);
    h.peers[0].send(&frame(100, 3)).unwrap(); // too big: dropped
    let small = frame(40, 4);
    h.peers[0].send(&small).unwrap(); // fits the kept chain
    assert!(h.rings[0].wait_used(3));
    assert_eq!(h.rings[0].used_elem(2), (2, small.len() as u32));
    assert_eq!(&h.read(BUFS + 12, 40), &small[12..]);

    // A head past the table yields an empty chain: returned, frame lost.
    h.rings[0].publish(RING_SIZE + 1);
    h.kick(0);
    h.peers[0].send(&frame(10, 5)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // A frame shorter than a vnet header never reaches the guest.
    h.peers[0].send(&[0u8; 5]).unwrap();
    h.rings[0].add_chain(&[Desc::w(BUFS + 0x1000, 2048)]);
    h.kick(0);
    let last = frame(30, 6);
    h.peers[0].send(&last).unwrap();
    assert!(h.rings[0].wait_used(4));
    assert_eq!(&h.read(BUFS + 0x1000 + 12, 30), &last[12..]);
}

/// Sends a control command; returns the ack byte and used length.
fn control(h: &mut Harness, ctrl: usize, command: &[u8], at: u64) -> (u8, u32) {
    h.mem.write_slice(command, GuestAddress(at)).unwrap();
    h.mem.write_obj(0xeeu8, GuestAddress(at + 0x100)).unwrap();
    let before = h.rings[ctrl].used_idx();
    h.rings[ctrl].add_chain(&[
        Desc::r(at, 2),
        Desc::r(at + 2, command.len() as u32 - 2),
        Desc::w(at + 0x100, 1),
    ]);
    h.kick(ctrl);
    assert!(h.rings[ctrl].wait_used(before.wrapping_add(1)));
    let ack: u8 = h.mem.read_obj(GuestAddress(at + 0x100)).unwrap();
    (ack, h.rings[ctrl].used_elem(before).1)
}

#[test]
fn control_queue_sets_queue_pairs_and_routes_frames() {
    let acked = bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
    let mut h = Harness::new(2, acked);
    let ctrl = 4;
    for rx in [0, 2] {
        h.rings[rx].add_chain(&[Desc::w(BUFS + rx as u64 * 0x1000, 2048)]);
        h.kick(rx);
    }
    // One pair active after reset: backend 1's frames go to receiveq 0.
    let early = frame(20, 1);
    h.peers[1].send(&early).unwrap();
    assert!(h.rings[0].wait_used(1));
    assert_eq!(&h.read(BUFS + 12, 20), &early[12..]);

    let ok = VIRTIO_NET_OK as u8;
    let err = VIRTIO_NET_ERR as u8;
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    assert_eq!(
        control(&mut h, ctrl, &[mq, 0, 2, 0], BUFS + 0x8000),
        (ok, 1)
    );
    assert_eq!(
        control(&mut h, ctrl, &[mq, 0, 3, 0], BUFS + 0x8000),
        (err, 1)
    );
    assert_eq!(
        control(&mut h, ctrl, &[mq, 0, 0, 0], BUFS + 0x8000),
        (err, 1)
    );
    assert_eq!(control(&mut h, ctrl, &[mq, 0, 2], BUFS + 0x8000), (err, 1));
    assert_eq!(
        control(&mut h, ctrl, &[0, 0, 1, 0], BUFS + 0x8000),
        (err, 1)
    );
    assert_eq!(
        control(&mut h, ctrl, &[99, 7, 0, 0], BUFS + 0x8000),
        (err, 1)
    );

    let late = frame(20, 2);
    h.peers[1].send(&late).unwrap();
    assert!(h.rings[2].wait_used(1));
    assert_eq!(&h.read(BUFS + 0x2000 + 12, 20), &late[12..]);

    // A command with no room for the ack is returned with nothing written.
    h.rings[ctrl].add_chain(&[Desc::r(BUFS, 4)]);
    // And one whose ack buffer comes before the command.
    h.rings[ctrl].add_chain(&[Desc::w(BUFS + 4, 1), Desc::r(BUFS, 4)]);
    h.kick(ctrl);
    assert!(h.rings[ctrl].wait_used(8));
    assert_eq!(h.rings[ctrl].used_elem(6).1, 0);
    assert_eq!(h.rings[ctrl].used_elem(7).1, 0);
}

#[test]
fn without_mq_the_control_queue_is_queue_two() {
    // Two pairs offered, but the driver only took CTRL_VQ: it sets up
    // receiveq 0, transmitq 1 and the control queue at index 2.
    let mut h = Harness::with_queues(2, bit(VIRTIO_NET_F_CTRL_VQ), Some(3));
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    // MQ not negotiated: even a valid pair count is refused.
    let err = VIRTIO_NET_ERR as u8;
    assert_eq!(control(&mut h, 2, &[mq, 0, 1, 0], BUFS), (err, 1));
    // Frames from the second tap queue still reach receiveq 0.
    h.rings[0].add_chain(&[Desc::w(BUFS + 0x1000, 2048)]);
    h.kick(0);
    h.peers[1].send(&frame(20, 1)).unwrap();
    assert!(h.rings[0].wait_used(1));
    // A queue past the control queue is refused at activation.
    h.net.reset();
    h.net.ack_features(bit(VIRTIO_NET_F_CTRL_VQ));
    let (q3, _) = h.rings[0].activation(3);
    assert!(h
        .net
        .activate(atomic(&h.mem), h.irq.clone(), vec![q3])
        .is_err());
}

#[test]
fn activation_errors() {
    let mut h = Harness::new(1, 0);
    let (again, _) = h.rings[0].activation(0);
    assert!(h
        .net
        .activate(atomic(&h.mem), h.irq.clone(), vec![again])
        .is_err());
    h.net.reset();
    let (extra, _) = h.rings[0].activation(2);
    assert!(matches!(
        h.net.activate(atomic(&h.mem), h.irq.clone(), vec![extra]),
        Err(ActivateError::BadQueues(_))
    ));
    let mut outside = TestRing::new(&h.mem, 0, RING_SIZE).queue();
    outside.set_desc_table_address(Some(0), Some(0x100));
    let bad = QueueActivation {
        index: 0,
        queue: outside,
        notifier: EventFd::new(0).unwrap(),
    };
    assert!(matches!(
        h.net.activate(atomic(&h.mem), h.irq.clone(), vec![bad]),
        Err(ActivateError::BadQueues(_))
    ));
}

#[test]
fn reset_and_reactivate() {
    let mut h = Harness::new(1, 0);
    h.transmit(0, &frame(10, 1), BUFS);
    let mut buf = [0u8; 256];
    h.peers[0].recv(&mut buf).unwrap();
    h.net.reset();
    h.net.ack_features(0);
    h.activate(None);
    let data = frame(10, 2);
    h.transmit(0, &data, BUFS);
    let n = h.peers[0].recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &data[..]);
}

#[test]
fn event_idx_suppresses_interrupts_and_publishes_avail_event() {
    let mut h = Harness::new(1, bit(VIRTIO_RING_F_EVENT_IDX));
    // Interrupt only once the second used entry is written.
    h.rings[1].set_used_event(1);
    h.transmit(0, &frame(10, 1), BUFS);
    assert!(h.rings[1].wait_used(1));
    // avail_event is published after the used entry: wait for it.
    assert!(wait_until(|| h.rings[1].avail_event() == 1));
    h.transmit(0, &frame(10, 2), BUFS);
    assert!(h.rings[1].wait_used(2));
    assert!(wait_until(|| h.rings[1].avail_event() == 2));
    // Both chains were handled by now, and only the second interrupted.
    assert!(wait_until(|| h.irq.count(1) == 1));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.irq.count(1), 1);
}

/// A fake tap holding a queue of frames. Its fd is an eventfd that the
/// test writes to announce frames: the worker watches it edge-triggered,
/// as it does a tap.
struct QueueBackend {
    frames: Mutex<std::collections::VecDeque<Vec<u8>>>,
    ready: EventFd,
}

impl QueueBackend {
    fn new() -> Arc<Self> {
        Arc::new(QueueBackend {
            frames: Mutex::new(Default::default()),
            ready: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
        })
    }

    fn push(&self, frame: Vec<u8>) {
        self.frames.lock().unwrap().push_back(frame);
    }

    /// Frames not read yet.
    fn left(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    /// Makes the fd readable, an edge for the worker.
    fn announce(&self) {
        self.ready.write(1).unwrap();
    }
}

impl NetBackend for QueueBackend {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(frame) = self.frames.lock().unwrap().pop_front() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        Ok(frame.len())
    }
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        std::os::unix::io::AsRawFd::as_raw_fd(&self.ready)
    }
    fn set_offload(&self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// The worker's handler over one backend and receive queue `ring`, called
/// directly on the test's thread (no worker thread, so every step is
/// deterministic). `acked` is the negotiated feature set.
fn direct_handler(
    mem: &GuestMemoryMmap,
    backend: Arc<dyn NetBackend>,
    ring: &TestRing,
    acked: u64,
) -> NetHandler {
    let mut rx = ring.queue();
    rx.set_event_idx(acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0);
    NetHandler {
        mem: atomic(mem),
        interrupt: Arc::new(RecordingInterrupt::default()),
        backends: vec![BackendState::new(backend)],
        rx: vec![Some(rx)],
        tx: vec![None],
        ctrl: None,
        mrg_rxbuf: acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
        guest_csum: true,
        mq: false,
        active_pairs: 1,
        tx_buf: Vec::new(),
        resume: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
    }
}

/// The driver makes one more receive buffer available and says whether it
/// must notify the device, as Linux's `virtqueue_kick_prepare` decides
/// under VIRTIO_RING_F_EVENT_IDX: only if the index moved past the
/// device's `avail_event`.
fn driver_adds_buffer(ring: &mut TestRing, desc: Desc) -> bool {
    let old = ring.avail_idx();
    ring.add_chain(&[desc]);
    let new = ring.avail_idx();
    let event = ring.avail_event();
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

const MRG_EVENT_IDX: u64 = (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_RING_F_EVENT_IDX);

#[test]
fn pending_frame_is_delivered_when_an_event_idx_driver_adds_the_missing_buffer() {
    let mem = guest_memory();
    let mut ring = TestRing::new(&mem, 0x1000, RING_SIZE);
    let backend = QueueBackend::new();
    let mut h = direct_handler(&mem, backend.clone(), &ring, MRG_EVENT_IDX);
    for i in 0..2 {
        if driver_adds_buffer(&mut ring, Desc::w(BUFS + i * 0x1000, 1000)) {
            assert_eq!(h.queue_notified(0), Backlog::Empty);
        }
    }
    // A frame of three buffers' worth arrives; two are there.
    let data = frame(2488, 3);
    backend.push(data.clone());
    h.backend_event(backend.as_raw_fd(), EventSet::IN);
    assert_eq!(ring.used_idx(), 0);
    assert_eq!(ring.avail_event(), 2, "device asks to hear of the third");

    assert!(driver_adds_buffer(&mut ring, Desc::w(BUFS + 0x2000, 1000)));
    assert_eq!(h.queue_notified(0), Backlog::Empty);
    assert_eq!(ring.used_idx(), 3);
    assert_eq!(&h_read(&mem, BUFS, 12)[10..12], &[3, 0], "num_buffers");
    assert_eq!(ring.used_elem(2), (2, 500));
}

fn h_read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// The driver adds a buffer just after the device found the ring short and
/// before it publishes `avail_event`: the driver still sees the old
/// `avail_event` and does not notify, and the device, re-checking after
/// re-arming, takes that buffer too but still lacks one. It must then
/// publish an `avail_event` covering the buffer it took, or the driver's
/// next addition will not notify either and the frame waits for ever.
#[test]
fn racing_buffer_addition_does_not_stall_the_pending_frame() {
    let mem = guest_memory();
    let ring = std::rc::Rc::new(std::cell::RefCell::new(TestRing::new(
        &mem, 0x1000, RING_SIZE,
    )));
    let backend = QueueBackend::new();
    let mut h = direct_handler(&mem, backend.clone(), &ring.borrow(), MRG_EVENT_IDX);
    for i in 0..2 {
        if driver_adds_buffer(&mut ring.borrow_mut(), Desc::w(BUFS + i * 0x1000, 1000)) {
            assert_eq!(h.queue_notified(0), Backlog::Empty);
        }
    }
    // Kicks the driver sent while the device was busy; the worker handles
    // them once it is done.
    let kicks = std::rc::Rc::new(std::cell::Cell::new(0));
    let (hook_ring, hook_kicks) = (ring.clone(), kicks.clone());
    let mut raced = false;
    super::rxtx::seam::set_before_rearm(Some(Box::new(move || {
        if !std::mem::replace(&mut raced, true) {
            let mut ring = hook_ring.borrow_mut();
            if driver_adds_buffer(&mut ring, Desc::w(BUFS + 0x2000, 1000)) {
                hook_kicks.set(hook_kicks.get() + 1);
            }
        }
    })));
    // Four buffers' worth.
    let data = frame(3488, 4);
    backend.push(data.clone());
    h.backend_event(backend.as_raw_fd(), EventSet::IN);
    super::rxtx::seam::set_before_rearm(None);
    assert_eq!(kicks.get(), 0, "the racing driver saw the old avail_event");
    for _ in 0..kicks.get() {
        assert_eq!(h.queue_notified(0), Backlog::Empty);
    }
    let mut ring = ring.borrow_mut();
    assert_eq!(ring.used_idx(), 0);
    assert_eq!(ring.avail_event(), 3, "device asks to hear of the fourth");

    if driver_adds_buffer(&mut ring, Desc::w(BUFS + 0x3000, 1000)) {
        assert_eq!(h.queue_notified(0), Backlog::Empty);
    }
    assert_eq!(ring.used_idx(), 4, "the frame is still pending");
    let lens: Vec<u32> = (0..4).map(|n| ring.used_elem(n).1).collect();
    assert_eq!(lens, vec![1000, 1000, 1000, 500]);
    let mut got = Vec::new();
    for (i, len) in lens.iter().enumerate() {
        got.extend(h_read(&mem, BUFS + i as u64 * 0x1000, *len as usize));
    }
    assert_eq!(&got[10..12], &[4, 0], "num_buffers");
    assert_eq!(&got[12..], &data[12..]);
}

/// A driver that moves its index back and forth while the device looks
/// (only a hostile one would) must not keep the worker going round.
#[test]
fn flapping_avail_index_does_not_spin_the_receive_path() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    // On a thread of its own, so that a regression fails instead of
    // hanging the test run.
    std::thread::spawn(move || {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, 0x1000, RING_SIZE);
        let backend = QueueBackend::new();
        let mut h = direct_handler(&mem, backend.clone(), &ring, MRG_EVENT_IDX);
        for i in 0..3 {
            ring.add_chain(&[Desc::w(BUFS + i * 0x1000, 1000)]);
        }
        ring.set_avail_idx(2);
        let calls = std::rc::Rc::new(std::cell::Cell::new(0u32));
        let hook_calls = calls.clone();
        super::rxtx::seam::set_before_rearm(Some(Box::new(move || {
            hook_calls.set(hook_calls.get() + 1);
            ring.set_avail_idx(5 - ring.avail_idx());
        })));
        backend.push(frame(3488, 1));
        h.backend_event(backend.as_raw_fd(), EventSet::IN);
        super::rxtx::seam::set_before_rearm(None);
        let _ = done_tx.send(calls.get());
    });
    let rounds = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the receive path keeps going round");
    assert!(rounds <= 3, "{rounds} rounds");
}

/// A flood of frames the guest cannot take (here: too short to carry a
/// vnet header) is read at most `RX_FRAMES_PER_CALL` at a time; the rest
/// waits for the wakeup the handler schedules for itself, as the
/// edge-triggered backend will not fire again.
#[test]
fn receive_reads_a_bounded_number_of_frames_per_wakeup() {
    use super::rxtx::RX_FRAMES_PER_CALL;
    let mem = guest_memory();
    let mut ring = TestRing::new(&mem, 0x1000, RING_SIZE);
    let backend = QueueBackend::new();
    let mut h = direct_handler(&mem, backend.clone(), &ring, 0);
    ring.add_chain(&[Desc::w(BUFS, 2048)]);
    let flood = 2 * RX_FRAMES_PER_CALL + 10;
    for _ in 0..flood {
        backend.push(vec![0; 5]);
    }
    let last = frame(40, 9);
    backend.push(last.clone());
    let fds = h.backend_fds();
    let resume = fds
        .iter()
        .map(|(fd, _)| *fd)
        .find(|fd| *fd != backend.as_raw_fd())
        .expect("a resume fd");

    h.backend_event(backend.as_raw_fd(), EventSet::IN);
    assert_eq!(backend.left(), flood + 1 - RX_FRAMES_PER_CALL);
    assert_eq!(h.resume.read().unwrap(), 1, "wakeup scheduled");
    // Other events in between do not lose the wakeup's work.
    h.resume.write(1).unwrap();
    assert_eq!(h.queue_notified(0), Backlog::Empty);
    assert_eq!(backend.left(), flood + 1 - 2 * RX_FRAMES_PER_CALL);
    h.backend_event(resume, EventSet::IN);
    assert_eq!(backend.left(), 0);
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(&h_read(&mem, BUFS + 12, 40), &last[12..]);
    // Dry: a stale wakeup does nothing, and schedules none.
    h.backend_event(resume, EventSet::IN);
    assert!(h.resume.read().is_err());
}

/// The same through the worker thread: one edge from the backend, and every
/// frame behind the flood still arrives.
#[test]
fn frames_behind_a_flood_arrive_after_one_backend_edge() {
    let mem = guest_memory();
    let backend = QueueBackend::new();
    let mut net = Net::with_backends(vec![backend.clone()], None, RING_SIZE).unwrap();
    net.ack_features(0);
    let mut rings: Vec<TestRing> = (0..2)
        .map(|q| TestRing::new(&mem, 0x1000 * (q + 1), RING_SIZE))
        .collect();
    let (activations, kicks): (Vec<_>, Vec<_>) = rings
        .iter()
        .enumerate()
        .map(|(q, r)| r.activation(q as u16))
        .unzip();
    rings[0].add_chain(&[Desc::w(BUFS, 2048)]);
    let irq = Arc::new(RecordingInterrupt::default());
    net.activate(atomic(&mem), irq, activations).unwrap();
    kicks[0].write(1).unwrap();
    for _ in 0..1000 {
        backend.push(vec![0; 5]);
    }
    let last = frame(40, 7);
    backend.push(last.clone());
    backend.announce();
    assert!(rings[0].wait_used(1));
    assert_eq!(backend.left(), 0);
    let mut got = vec![0u8; 40];
    mem.read_slice(&mut got, GuestAddress(BUFS + 12)).unwrap();
    assert_eq!(&got[..], &last[12..]);
    net.reset();
}

/// Runs `ip` with `args`; false if it is missing or fails.
fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn real_tap_carries_frames_both_ways() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping real_tap_carries_frames_both_ways: no /dev/net/tun");
        return;
    }
    let name = format!("trlnet{}", std::process::id() % 100_000);
    let config = NetConfig {
        tap_name: name.clone(),
        queue_pairs: 2,
        ..NetConfig::default()
    };
    let mut net = Net::new(config).expect("/dev/net/tun exists but the tap cannot be opened");
    assert!(std::path::Path::new("/sys/class/net").join(&name).exists());
    assert_eq!(net.queue_pairs(), 2);

    let mem = guest_memory();
    let irq = Arc::new(RecordingInterrupt::default());
    let mut rings: Vec<TestRing> = (0..5)
        .map(|q| TestRing::new(&mem, 0x1000 * (q + 1), RING_SIZE))
        .collect();
    let (activations, kicks): (Vec<_>, Vec<_>) = rings
        .iter()
        .enumerate()
        .map(|(q, r)| r.activation(q as u16))
        .unzip();
    net.ack_features(
        bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_MQ)
            | bit(VIRTIO_NET_F_CTRL_VQ),
    );
    net.activate(atomic(&mem), irq, activations).unwrap();

    // Bring the link up and give the host a link-local address (the only
    // kind this test may use), so that sending to a neighbour makes the
    // kernel ARP for it out of the tap.
    let subnet = 100 + std::process::id() % 100;
    let host_ip = format!("169.254.{subnet}.1/24");
    if !(ip(&["link", "set", "dev", &name, "up"]) && ip(&["addr", "add", &host_ip, "dev", &name])) {
        eprintln!("`ip` unavailable: checked the tap opens, not its traffic");
        return;
    }

    // Guest to host: a broadcast frame counts as received by the host.
    let stats = format!("/sys/class/net/{name}/statistics/rx_packets");
    let count = || -> u64 {
        std::fs::read_to_string(&stats)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = count();
    let mut eth = vec![0u8; VNET_HDR_LEN];
    eth.extend([0xff; 6]);
    eth.extend([0x02, 0, 0, 0, 0, 0x99]);
    eth.extend([0x88, 0xb5]); // local experimental ethertype
    eth.extend([0u8; 46]);
    mem.write_slice(&eth, GuestAddress(BUFS)).unwrap();
    rings[1].add_chain(&[Desc::r(BUFS, eth.len() as u32)]);
    kicks[1].write(1).unwrap();
    assert!(rings[1].wait_used(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(count() > before, "the host never saw the guest's frame");

    // Host to guest: any frame (ARP, IPv6 neighbour discovery) will do.
    for (rx, ring) in [(0usize, 0u64), (2, 1)] {
        for i in 0..4 {
            let at = BUFS + 0x10000 * (ring + 1) + 0x1000 * i;
            rings[rx].add_chain(&[Desc::w(at, 2048)]);
        }
        kicks[rx].write(1).unwrap();
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let target = format!("169.254.{subnet}.2:9");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rings[0].used_idx() == 0 && rings[2].used_idx() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no frame reached the guest"
        );
        let _ = sock.send_to(b"ping", &target);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rx, base) = if rings[0].used_idx() > 0 {
        (0, 0x10000)
    } else {
        (2, 0x20000)
    };
    let (_, len) = rings[rx].used_elem(0);
    assert!(len as usize >= VNET_HDR_LEN + 14, "used len {len}");
    let mut hdr = [0u8; VNET_HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(BUFS + base)).unwrap();
    assert_eq!(&hdr[10..12], &[1, 0], "num_buffers");
    net.reset();
}
