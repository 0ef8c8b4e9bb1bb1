//! `rng_request`: virtio-rng on /dev/urandom, through its worker thread.
//!
//! Checks beyond the generic ones: a used length never exceeds the
//! per-request cap, a chain cut short (loop, bad index, bad indirect
//! table) is reported with length 0, and queue resets and device resets
//! stop the worker (no thread left behind) and bring it back.

use std::fmt::Display;
use std::path::PathBuf;

use arbitrary::Arbitrary;
use virtio_devices::rng::{Rng, MAX_BYTES_PER_REQUEST, RNG_QUEUE_SIZE};
use virtio_devices::{QueueActivation, VirtioDevice};
use vmm_sys_util::eventfd::EventFd;

use super::{ring_size, Device, Rings, Step};
use crate::encode::{variant, Encode};
use crate::encode_struct;
use crate::threads;
use crate::virtq::atomic;
use crate::virtq::batch::{Batch, Completion};

/// VIRTIO_RING_F_INDIRECT_DESC and VIRTIO_RING_F_EVENT_IDX.
const F_INDIRECT: u64 = 1 << 28;
const F_EVENT_IDX: u64 = 1 << 29;

/// How the device is set up.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Ring size, log2.
    pub ring: u8,
    /// Negotiate VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
}

/// Device ops.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RngOp {
    /// VIRTIO_F_RING_RESET: take the queue away, set it up afresh.
    ResetQueue,
    /// Device reset, then activation with fresh rings.
    Reset,
}

/// A whole input.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The device.
    pub config: Config,
    /// What happens.
    pub steps: Vec<Step<RngOp>>,
}

struct Target {
    device: Rng,
    config: Config,
    kick: Option<EventFd>,
}

impl Target {
    fn features(&self) -> u64 {
        F_INDIRECT
            | if self.config.event_idx {
                F_EVENT_IDX
            } else {
                0
            }
    }

    fn activate(&mut self, rings: &mut Rings) {
        rings.set_queues(&[(0, ring_size(self.config.ring))]);
        self.device.ack_features(self.features());
        let (activations, mut kicks) = rings.activations(RNG_QUEUE_SIZE);
        let irq = rings.irq.clone();
        self.kick = self
            .device
            .activate(atomic(&rings.mem), irq, activations)
            .ok()
            .and_then(|()| kicks.pop());
    }
}

impl Device for Target {
    type Op = RngOp;

    fn kick(&mut self, _rings: &mut Rings, _pos: usize) {
        if let Some(k) = &self.kick {
            k.write(1).expect("notify");
        }
    }

    fn apply(&mut self, rings: &mut Rings, op: &RngOp, ctx: &dyn Display) -> bool {
        match op {
            RngOp::ResetQueue => {
                let Some(old) = self.device.reset_queue(0) else {
                    return false;
                };
                rings.threads.assert_count(0, ctx);
                rings.set_queues(&[(0, ring_size(self.config.ring))]);
                let queue = rings.queues[0]
                    .0
                    .device_queue(RNG_QUEUE_SIZE, self.config.event_idx);
                let restarted = self.device.enable_queue(QueueActivation {
                    index: 0,
                    queue,
                    notifier: old.notifier,
                });
                if restarted.is_err() {
                    self.kick = None;
                }
            }
            RngOp::Reset => {
                self.device.reset();
                rings.threads.assert_count(0, ctx);
                self.activate(rings);
            }
        }
        true
    }

    fn active(&self) -> Vec<u16> {
        if self.kick.is_some() {
            vec![0]
        } else {
            Vec::new()
        }
    }

    fn threads(&self) -> usize {
        usize::from(self.kick.is_some())
    }

    fn check(&mut self, _rings: &Rings, batch: &Batch, done: &[Completion], ctx: &dyn Display) {
        for c in done {
            assert!(
                c.len as usize <= MAX_BYTES_PER_REQUEST,
                "{ctx}: chain {} got {} bytes, above the cap of {MAX_BYTES_PER_REQUEST}",
                c.id,
                c.len
            );
            if !batch.stable {
                continue;
            }
            if let Some(w) = batch.walk(0, c.id).filter(|w| !w.whole) {
                assert_eq!(
                    c.len, 0,
                    "{ctx}: chain {} is cut short ({w:?}) but reported {} bytes",
                    c.id, c.len
                );
            }
        }
    }
}

/// Runs one input.
pub fn run(input: &Input) -> super::Stats {
    let _guard = threads::exclusive();
    let mut rings = Rings::new(input.config.event_idx);
    let device = Rng::new(PathBuf::from("/dev/urandom")).expect("/dev/urandom opens");
    let mut target = Target {
        device,
        config: input.config,
        kick: None,
    };
    target.activate(&mut rings);
    rings.threads.wait_idle(&super::START);
    let mut stats = super::run(&mut target, &mut rings, &input.steps);
    stats.interrupts = rings.interrupts;
    drop(target);
    rings.threads.assert_count(0, &"after dropping the device");
    stats
}

encode_struct!(Config { ring, event_idx });
encode_struct!(Input { config, steps });

impl Encode for RngOp {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            RngOp::ResetQueue => variant(out, 0, 2),
            RngOp::Reset => variant(out, 1, 2),
        }
    }
}
