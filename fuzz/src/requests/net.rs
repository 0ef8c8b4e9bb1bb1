//! `net_request`: virtio-net over in-memory backends (one per queue pair),
//! through its worker thread: transmit chains, receive buffers for frames
//! the fuzzer injects, a backend that pushes back, the control queue.
//!
//! Checks beyond the generic ones: every frame handed to a backend is
//! between a vnet header and the maximum frame length; transmit chains are
//! used with length 0; in clean batches the frames sent are exactly the
//! well-formed transmit chains used, in order, and each frame assembled
//! from receive buffers (with `num_buffers` chains under MRG_RXBUF) is the
//! next injected frame of some backend, header adjusted, later than the
//! last one delivered; control acks are one byte, OK or ERR; offloads
//! passed to the backend are a combination the tun driver accepts.

use std::collections::VecDeque;
use std::fmt::Display;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use virtio_devices::net::{MacAddr, Net, NetBackend, MAX_FRAME_LEN, VNET_HDR_LEN};
use virtio_devices::VirtioDevice;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ring_size, Device, Rings, Step};
use crate::encode::{variant, Encode};
use crate::encode_struct;
use crate::threads;
use crate::virtq::batch::{Batch, Completion};
use crate::virtq::walk::read_stream;
use crate::virtq::{atomic, Addr, Len, Link, Seg};

/// Feature bits the fuzzer picks from, in the order of `Config::features`.
const FEATURES: [u32; 10] = [1, 7, 8, 9, 10, 15, 17, 22, 28, 29];
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MRG_RXBUF: u64 = 1 << 15;
const F_MQ: u64 = 1 << 22;
const F_CTRL_VQ: u64 = 1 << 17;
const F_EVENT_IDX: u64 = 1 << 29;
/// TUN_F_* offload flags.
const TUN_F_CSUM: u32 = 1;
const TUN_F_TSO4: u32 = 2;
const TUN_F_TSO6: u32 = 4;
const TUN_F_TSO_ECN: u32 = 8;
const TUN_F_UFO: u32 = 16;

/// An in-memory backend with an eventfd to poll.
pub(crate) struct Fake {
    rx: Mutex<VecDeque<Vec<u8>>>,
    tx: Mutex<Vec<Vec<u8>>>,
    evt: EventFd,
    blocked: AtomicBool,
    offloads: Mutex<Vec<u32>>,
}

impl Fake {
    pub(crate) fn new() -> Self {
        Fake {
            rx: Mutex::default(),
            tx: Mutex::default(),
            evt: EventFd::new(EFD_NONBLOCK).expect("eventfd"),
            blocked: AtomicBool::new(false),
            offloads: Mutex::default(),
        }
    }

    /// Wakes the worker (an edge on the polled fd).
    fn signal(&self) {
        self.evt.write(1).expect("eventfd write");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NetBackend for Fake {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        let frame = lock(&self.rx)
            .pop_front()
            .ok_or(io::ErrorKind::WouldBlock)?;
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }

    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        if self.blocked.load(Ordering::Acquire) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        lock(&self.tx).push(frame.to_vec());
        Ok(frame.len())
    }

    fn as_raw_fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    fn set_offload(&self, flags: u32) -> io::Result<()> {
        lock(&self.offloads).push(flags);
        Ok(())
    }
}

/// How the device is set up.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Two queue pairs (MQ and a control queue offered) instead of one.
    pub two_pairs: bool,
    /// Ring size, log2.
    pub ring: u8,
    /// Bit i accepts `FEATURES[i]`.
    pub features: u16,
    /// Bit i enables queue i.
    pub queues: u8,
}

/// Length of an injected frame.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameLen {
    /// A few bytes (maybe less than a header).
    Small(u8),
    /// Up to about an MTU.
    Mtu(u16),
    /// The largest frame.
    Max,
    /// Longer than the largest frame (the backend truncates it).
    Huge,
}

/// Device ops.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum NetOp {
    /// A frame arrives on a backend.
    Frame {
        /// Which backend.
        backend: u8,
        /// Length.
        len: FrameLen,
        /// First header byte (flags).
        flags: u8,
        /// Content pattern.
        fill: u8,
    },
    /// The backends refuse (`true`) or accept frames from now on.
    Block(bool),
    /// A control command chain on the control queue (if any), notified.
    Ctrl {
        /// Class.
        class: u8,
        /// Command.
        command: u8,
        /// Argument (queue pairs for VQ_PAIRS_SET).
        pairs: u16,
        /// Bytes for the ack.
        ack: u8,
    },
    /// Device reset, then activation with fresh rings.
    Reset,
}

/// A whole input.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The device.
    pub config: Config,
    /// What happens.
    pub steps: Vec<Step<NetOp>>,
}

struct Target {
    device: Net,
    backends: Vec<Arc<Fake>>,
    config: Config,
    acked: u64,
    kicks: Vec<(u16, EventFd)>,
    running: bool,
    /// Frames injected per backend, not yet seen delivered.
    injected: Vec<VecDeque<Vec<u8>>>,
    /// Frames already checked, per backend.
    sent_seen: Vec<usize>,
    ctrl_index: Option<u16>,
    /// Next data area offset for control chains.
    ctrl_slot: u16,
}

impl Target {
    fn activate(&mut self, rings: &mut Rings) {
        let count = if self.config.two_pairs { 5 } else { 2 };
        let size = ring_size(self.config.ring).max(2);
        let queues: Vec<(u16, u16)> = (0..count)
            .filter(|i| self.config.queues & (1 << i) != 0)
            .map(|i| (i, size))
            .collect();
        rings.set_queues(&queues);
        self.device.ack_features(self.acked);
        let (activations, kicks) = rings.activations(size);
        let irq = rings.irq.clone();
        self.running = self
            .device
            .activate(atomic(&rings.mem), irq, activations)
            .is_ok();
        self.kicks = if self.running {
            queues.iter().map(|q| q.0).zip(kicks).collect()
        } else {
            Vec::new()
        };
        let mq = self.acked & F_MQ != 0;
        self.ctrl_index = (self.acked & F_CTRL_VQ != 0).then_some(if mq { 4 } else { 2 });
    }

    fn frame(len: FrameLen, flags: u8, fill: u8) -> Vec<u8> {
        let n = match len {
            FrameLen::Small(n) => usize::from(n % 32),
            FrameLen::Mtu(n) => usize::from(n % 1600),
            FrameLen::Max => MAX_FRAME_LEN,
            FrameLen::Huge => MAX_FRAME_LEN + 1000,
        };
        let mut f: Vec<u8> = (0..n).map(|i| fill ^ (i as u8)).collect();
        if let Some(first) = f.first_mut() {
            *first = flags;
        }
        f
    }

    /// What the driver should find of injected `frame` in `chains`
    /// receive chains.
    fn delivered(&self, frame: &[u8], chains: u16) -> Vec<u8> {
        let mut f = frame[..frame.len().min(MAX_FRAME_LEN)].to_vec();
        if self.acked & F_GUEST_CSUM == 0 {
            f[0] = 0;
        }
        f[10..12].copy_from_slice(&chains.to_le_bytes());
        f
    }

    /// Matches a frame assembled from receive buffers (from `chains`
    /// chains) with the injected ones.
    fn match_rx(&mut self, got: &[u8], chains: u16, ctx: &dyn Display) {
        for b in 0..self.injected.len() {
            let pos = self.injected[b]
                .iter()
                .position(|f| f.len() >= VNET_HDR_LEN && self.delivered(f, chains) == got);
            if let Some(pos) = pos {
                self.injected[b].drain(..=pos);
                return;
            }
        }
        panic!(
            "{ctx}: a receive frame of {} bytes in {chains} buffers matches no injected frame \
             still to come: {:x?}",
            got.len(),
            &got[..got.len().min(64)]
        );
    }
}

impl Device for Target {
    type Op = NetOp;

    fn kick(&mut self, rings: &mut Rings, pos: usize) {
        let index = rings.queues[pos].0.index;
        if let Some((_, k)) = self.kicks.iter().find(|(i, _)| *i == index) {
            k.write(1).expect("notify");
        }
    }

    fn prepare(&mut self, rings: &mut Rings, op: &NetOp) {
        let NetOp::Ctrl {
            class,
            command,
            pairs,
            ack,
        } = *op
        else {
            return;
        };
        let Some(pos) = rings
            .queues
            .iter()
            .position(|(q, _)| Some(q.index) == self.ctrl_index)
        else {
            return;
        };
        let slot = u64::from(self.ctrl_slot % 1024) * 16;
        self.ctrl_slot = self.ctrl_slot.wrapping_add(1);
        let at = crate::virtq::DATA_BASE + slot;
        let mut cmd = vec![class, command];
        cmd.extend_from_slice(&pairs.to_le_bytes());
        let _ = vm_memory::Bytes::write_slice(&rings.mem, &cmd, vm_memory::GuestAddress(at));
        let segs = [
            Seg {
                addr: Addr::Raw(at),
                len: Len::Raw(4),
                write: false,
            },
            Seg {
                addr: Addr::Raw(at + 8),
                len: Len::Raw(u32::from(ack % 4)),
                write: true,
            },
        ];
        rings.queues[pos]
            .0
            .add_chain(&rings.mem, &segs, Link::Direct);
    }

    fn apply(&mut self, rings: &mut Rings, op: &NetOp, ctx: &dyn Display) -> bool {
        match *op {
            NetOp::Frame {
                backend,
                len,
                flags,
                fill,
            } => {
                let b = usize::from(backend) % self.backends.len();
                let frame = Self::frame(len, flags, fill);
                self.injected[b].push_back(frame.clone());
                lock(&self.backends[b].rx).push_back(frame);
                self.backends[b].signal();
            }
            NetOp::Block(on) => {
                for b in &self.backends {
                    b.blocked.store(on, Ordering::Release);
                    if !on {
                        b.signal();
                    }
                }
            }
            NetOp::Ctrl { .. } => {
                let pos = rings
                    .queues
                    .iter()
                    .position(|(q, _)| Some(q.index) == self.ctrl_index);
                if let Some(pos) = pos {
                    self.kick(rings, pos);
                }
            }
            NetOp::Reset => {
                self.device.reset();
                rings.threads.assert_count(0, ctx);
                self.activate(rings);
                return true;
            }
        }
        false
    }

    fn active(&self) -> Vec<u16> {
        self.kicks.iter().map(|(i, _)| *i).collect()
    }

    fn threads(&self) -> usize {
        usize::from(self.running)
    }

    fn check(&mut self, rings: &Rings, batch: &Batch, done: &[Completion], ctx: &dyn Display) {
        let mut expected: Vec<Vec<Vec<u8>>> = vec![Vec::new(); self.backends.len()];
        let mrg = self.acked & F_MRG_RXBUF != 0;
        let mut group: Option<(usize, u16, Vec<u8>, u16)> = None;
        for c in done {
            let index = rings.queues[c.queue].0.index;
            let split = batch.walk(c.queue, c.id).and_then(|w| w.split(&rings.mem));
            if Some(index) == self.ctrl_index {
                assert!(c.len <= 1, "{ctx}: control ack of {} bytes", c.len);
                if let Some((_, w)) = split.filter(|_| batch.clean && c.len == 1) {
                    let ack = read_stream(&rings.mem, &w, 1);
                    assert!(ack[0] <= 1, "{ctx}: control ack {:#x}", ack[0]);
                }
            } else if index % 2 == 1 {
                assert_eq!(
                    c.len, 0,
                    "{ctx}: transmit chain {} used with length {}",
                    c.id, c.len
                );
                let pair = usize::from(index / 2);
                let frame = split.filter(|(_, w)| w.is_empty()).map(|(r, _)| r);
                if let Some(r) = frame {
                    let bytes = read_stream(&rings.mem, &r, MAX_FRAME_LEN + 1);
                    if (VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&bytes.len()) {
                        expected[pair].push(bytes);
                    }
                }
            } else {
                let valid = split.as_ref().is_some_and(|(r, _)| r.is_empty());
                if batch.stable && !valid {
                    assert_eq!(c.len, 0, "{ctx}: malformed receive chain {} used", c.id);
                }
                let Some((_, w)) = split.filter(|_| batch.clean && c.len > 0) else {
                    continue;
                };
                let part = read_stream(&rings.mem, &w, c.len as usize);
                let (q, need, mut bytes, have) = match group.take() {
                    Some(g) if g.0 == c.queue => g,
                    _ => {
                        let need = if mrg && part.len() >= VNET_HDR_LEN {
                            u16::from_le_bytes([part[10], part[11]])
                        } else {
                            1
                        };
                        (c.queue, need, Vec::new(), 0)
                    }
                };
                bytes.extend_from_slice(&part);
                if have + 1 >= need {
                    self.match_rx(&bytes, need, ctx);
                } else {
                    group = Some((q, need, bytes, have + 1));
                }
            }
        }
        for (b, backend) in self.backends.iter().enumerate() {
            let sent = lock(&backend.tx).clone();
            let new = &sent[self.sent_seen[b]..];
            for f in new {
                assert!(
                    (VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&f.len()),
                    "{ctx}: backend {b} got a frame of {} bytes",
                    f.len()
                );
            }
            if batch.clean {
                assert!(
                    new == expected[b].as_slice(),
                    "{ctx}: backend {b} got {} frames, the transmit chains used hold {}",
                    new.len(),
                    expected[b].len()
                );
            }
            self.sent_seen[b] = sent.len();
            for &flags in lock(&backend.offloads).iter() {
                let segmentation = TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;
                assert!(
                    flags & segmentation == 0 || flags & TUN_F_CSUM != 0,
                    "{ctx}: offloads {flags:#x} without checksum offload"
                );
                assert!(
                    flags & TUN_F_TSO_ECN == 0 || flags & (TUN_F_TSO4 | TUN_F_TSO6) != 0,
                    "{ctx}: offloads {flags:#x}: ECN without TSO"
                );
            }
        }
    }
}

/// Runs one input.
pub fn run(input: &Input) -> super::Stats {
    let _guard = threads::exclusive();
    let c = input.config;
    let mut acked = 0u64;
    for (i, bit) in FEATURES.iter().enumerate() {
        if c.features & (1 << i) != 0 {
            acked |= 1 << bit;
        }
    }
    let mut rings = Rings::new(acked & F_EVENT_IDX != 0);
    let backends: Vec<Arc<Fake>> = (0..if c.two_pairs { 2 } else { 1 })
        .map(|_| Arc::new(Fake::new()))
        .collect();
    let dyn_backends = backends
        .iter()
        .map(|b| Arc::clone(b) as Arc<dyn NetBackend>)
        .collect();
    let mac = MacAddr::new([0x02, 0, 0, 0, 0, 1]);
    let size = ring_size(c.ring).max(2);
    let device = Net::with_backends(dyn_backends, Some(mac), size).expect("valid device");
    let acked = acked & device.features();
    let mut target = Target {
        device,
        injected: vec![VecDeque::new(); backends.len()],
        sent_seen: vec![0; backends.len()],
        backends,
        config: c,
        acked,
        kicks: Vec::new(),
        running: false,
        ctrl_index: None,
        ctrl_slot: 0,
    };
    target.activate(&mut rings);
    rings.threads.wait_idle(&super::START);
    let mut stats = super::run(&mut target, &mut rings, &input.steps);
    stats.interrupts = rings.interrupts;
    drop(target);
    rings.threads.assert_count(0, &"after dropping the device");
    stats
}

encode_struct!(Config {
    two_pairs,
    ring,
    features,
    queues
});
encode_struct!(Input { config, steps });

impl Encode for FrameLen {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            FrameLen::Small(n) => {
                variant(out, 0, 4);
                n.encode(out);
            }
            FrameLen::Mtu(n) => {
                variant(out, 1, 4);
                n.encode(out);
            }
            FrameLen::Max => variant(out, 2, 4),
            FrameLen::Huge => variant(out, 3, 4),
        }
    }
}

impl Encode for NetOp {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            NetOp::Frame {
                backend,
                len,
                flags,
                fill,
            } => {
                variant(out, 0, 4);
                backend.encode(out);
                len.encode(out);
                flags.encode(out);
                fill.encode(out);
            }
            NetOp::Block(on) => {
                variant(out, 1, 4);
                on.encode(out);
            }
            NetOp::Ctrl {
                class,
                command,
                pairs,
                ack,
            } => {
                variant(out, 2, 4);
                class.encode(out);
                command.encode(out);
                pairs.encode(out);
                ack.encode(out);
            }
            NetOp::Reset => variant(out, 3, 4),
        }
    }
}
