//! virtio-net tests over datagram socket pairs standing in for a tap, and
//! one over a real tap.
//!
//! This module holds the shared harness and the device-level tests
//! (features, configuration space, construction, activation, reset); the
//! submodules group the rest by what they exercise.

mod ctrl;
mod rx;
mod rx_backlog;
mod tap;
mod tx;

use std::os::unix::net::UnixDatagram;
use std::sync::Mutex;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::test_ring::{atomic, guest_memory, Desc, RecordingInterrupt, TestRing};

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
