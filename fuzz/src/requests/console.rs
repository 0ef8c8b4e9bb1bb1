//! `console_request`: virtio-console with its output in a buffer and its
//! input on a socket the fuzzer writes to, through its worker thread.
//!
//! Checks beyond the generic ones: transmit chains are used with length 0;
//! in clean batches the output is exactly the readable bytes of the
//! well-formed transmit chains the device used, in order, and the receive
//! chains hold the input stream, in order, without loss or duplication (a
//! device reset may lose input the device had read, never reorder it).

use std::collections::VecDeque;
use std::fmt::Display;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use virtio_devices::console::{Console, ConsoleInput, QUEUE_SIZE};
use virtio_devices::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;

use super::{ring_size, Device, Rings, Step};
use crate::encode::{variant, Encode};
use crate::encode_struct;
use crate::threads;
use crate::virtq::atomic;
use crate::virtq::batch::{Batch, Completion};
use crate::virtq::walk::read_stream;

/// Input bytes an input may send: below the device's 64 KiB of pending
/// input, so none is dropped for lack of room.
const MAX_INPUT: usize = 60_000;
const F_EVENT_IDX: u64 = 1 << 29;
const F_INDIRECT: u64 = 1 << 28;

/// How the device is set up.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Receive ring size, log2.
    pub rx_ring: u8,
    /// Transmit ring size, log2.
    pub tx_ring: u8,
    /// Bit 0: enable receiveq, bit 1: enable transmitq.
    pub queues: u8,
    /// Offer a terminal size.
    pub size: Option<(u16, u16)>,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
}

/// Device ops.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum ConsoleOp {
    /// Host input.
    Input(Vec<u8>),
    /// End of the input.
    CloseInput,
    /// Device reset, then activation with fresh rings.
    Reset,
}

/// A whole input.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The device.
    pub config: Config,
    /// What happens.
    pub steps: Vec<Step<ConsoleOp>>,
}

#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Target {
    device: Console,
    config: Config,
    output: Output,
    /// Output bytes already checked.
    seen: usize,
    input: Option<UnixStream>,
    sent: usize,
    /// Input sent and not yet found in receive buffers.
    pending: VecDeque<u8>,
    /// A reset may have lost a prefix of `pending`.
    resync: bool,
    kicks: Vec<EventFd>,
    active: Vec<u16>,
    /// The worker runs (even with no queue enabled).
    running: bool,
}

impl Target {
    fn activate(&mut self, rings: &mut Rings) {
        let mut queues = Vec::new();
        if self.config.queues & 1 != 0 {
            queues.push((0, ring_size(self.config.rx_ring)));
        }
        if self.config.queues & 2 != 0 {
            queues.push((1, ring_size(self.config.tx_ring)));
        }
        rings.set_queues(&queues);
        let features = F_INDIRECT
            | 1 // VIRTIO_CONSOLE_F_SIZE, offered with a size
            | if self.config.event_idx { F_EVENT_IDX } else { 0 };
        self.device.ack_features(features);
        let (activations, kicks) = rings.activations(QUEUE_SIZE);
        let irq = rings.irq.clone();
        match self.device.activate(atomic(&rings.mem), irq, activations) {
            Ok(()) => {
                self.kicks = kicks;
                self.active = queues.iter().map(|q| q.0).collect();
                self.running = true;
            }
            Err(_) => {
                self.kicks.clear();
                self.active.clear();
                self.running = false;
            }
        }
    }

    /// Takes `got` off the front of the expected input.
    fn consume(&mut self, got: &[u8], ctx: &dyn Display) {
        if got.is_empty() {
            return;
        }
        if self.resync {
            let at = (0..=self.pending.len().saturating_sub(got.len()))
                .find(|&k| self.pending.iter().skip(k).take(got.len()).eq(got.iter()));
            let Some(at) = at else {
                panic!("{ctx}: receive buffer holds {got:?}, which is not in the input sent");
            };
            self.pending.drain(..at);
            self.resync = false;
        }
        let expected: Vec<u8> = self.pending.iter().take(got.len()).copied().collect();
        assert_eq!(
            got, expected,
            "{ctx}: receive buffer contents differ from the input stream"
        );
        self.pending.drain(..got.len());
    }
}

impl Device for Target {
    type Op = ConsoleOp;

    fn kick(&mut self, rings: &mut Rings, pos: usize) {
        let index = rings.queues[pos].0.index;
        if let Some(pos) = self.active.iter().position(|&i| i == index) {
            self.kicks[pos].write(1).expect("notify");
        }
    }

    fn apply(&mut self, rings: &mut Rings, op: &ConsoleOp, ctx: &dyn Display) -> bool {
        match op {
            ConsoleOp::Input(bytes) => {
                let n = bytes.len().min(MAX_INPUT - self.sent);
                if let Some(input) = &mut self.input {
                    input.write_all(&bytes[..n]).expect("socket has room");
                    self.sent += n;
                    self.pending.extend(&bytes[..n]);
                }
                false
            }
            ConsoleOp::CloseInput => {
                self.input = None;
                false
            }
            ConsoleOp::Reset => {
                self.device.reset();
                rings.threads.assert_count(0, ctx);
                self.resync = true;
                self.activate(rings);
                true
            }
        }
    }

    fn active(&self) -> Vec<u16> {
        self.active.clone()
    }

    fn threads(&self) -> usize {
        usize::from(self.running)
    }

    fn check(&mut self, rings: &Rings, batch: &Batch, done: &[Completion], ctx: &dyn Display) {
        let output = self
            .output
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let new_output = &output[self.seen..];
        let mut expected = Vec::new();
        for c in done {
            let index = rings.queues[c.queue].0.index;
            let walk = batch.walk(c.queue, c.id);
            let split = walk.and_then(|w| w.split(&rings.mem));
            if index == 1 {
                assert_eq!(
                    c.len, 0,
                    "{ctx}: transmit chain {} used with length {}",
                    c.id, c.len
                );
                if let Some((readable, writable)) = split.filter(|(_, w)| w.is_empty()) {
                    debug_assert!(writable.is_empty());
                    expected.extend(read_stream(&rings.mem, &readable, usize::MAX));
                }
                continue;
            }
            let valid = split.as_ref().is_some_and(|(r, _)| r.is_empty());
            if batch.stable && !valid {
                assert_eq!(
                    c.len, 0,
                    "{ctx}: malformed receive chain {} used with data",
                    c.id
                );
            }
            if batch.clean {
                if let Some((_, writable)) = &split {
                    let got = read_stream(&rings.mem, writable, c.len as usize);
                    self.consume(&got, ctx);
                }
            } else {
                self.resync = true;
                let n = (c.len as usize).min(self.pending.len());
                self.pending.drain(..n);
            }
        }
        if batch.clean {
            assert!(
                new_output == expected,
                "{ctx}: the console wrote {} bytes {new_output:?}, the transmit chains used \
                 hold {} bytes {expected:?}",
                new_output.len(),
                expected.len()
            );
        }
        self.seen = output.len();
    }
}

/// Runs one input.
pub fn run(input: &Input) -> super::Stats {
    let _guard = threads::exclusive();
    let mut rings = Rings::new(input.config.event_idx);
    let (ours, theirs) = UnixStream::pair().expect("socket pair");
    let console_input = ConsoleInput::new(OwnedFd::from(theirs)).expect("console input");
    let output = Output::default();
    let mut device = Console::new(Box::new(output.clone()), Some(console_input));
    if let Some((cols, rows)) = input.config.size {
        device = device.with_size(cols, rows);
    }
    let mut target = Target {
        device,
        config: input.config,
        output,
        seen: 0,
        input: Some(ours),
        sent: 0,
        pending: VecDeque::new(),
        resync: false,
        kicks: Vec::new(),
        active: Vec::new(),
        running: false,
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
    rx_ring,
    tx_ring,
    queues,
    size,
    event_idx
});
encode_struct!(Input { config, steps });

impl Encode for ConsoleOp {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            ConsoleOp::Input(bytes) => {
                variant(out, 0, 3);
                bytes.encode(out);
            }
            ConsoleOp::CloseInput => variant(out, 1, 3),
            ConsoleOp::Reset => variant(out, 2, 3),
        }
    }
}
