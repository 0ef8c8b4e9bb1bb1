//! The request-path targets: one virtio device driven directly (no PCI
//! transport) through rings the fuzzer fills, each round of processing
//! checked as a [`Batch`]: the generic ring checks, interrupts, worker
//! threads, then the device's own checks.
//!
//! Devices that process on their worker thread are kicked through their
//! queue notifiers and waited for with [`Baseline::wait_idle`]; virtio-blk
//! is driven synchronously through its public `BlockRequestProcessor`.

pub mod blk;
pub(crate) mod blk_model;
pub mod console;
pub mod net;
pub mod rng;

use std::fmt::{self, Debug, Display};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use virtio_devices::{QueueActivation, VirtioInterrupt, VirtioInterruptType};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::encode::{variant, Encode};
use crate::threads::Baseline;
use crate::virtq::batch::{Batch, Buffers, Completion, Totals};
use crate::virtq::{guest_memory, DriverQueue, RingOp, MAX_QUEUE_SIZE, MEM_SIZE};

/// Steps per input.
pub const MAX_OPS: usize = 256;

/// Where a failure happened, formatted only when a check fails.
pub struct Ctx<'a>(pub usize, pub &'a dyn Debug);

impl Display for Ctx<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "after step {} ({:x?})", self.0, self.1)
    }
}

/// Where no op was applied yet.
pub const START: Ctx<'static> = Ctx(usize::MAX, &"setup");

/// One step: a ring op (shared) or a device op.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Step<D> {
    /// Driver action on the rings.
    Ring(RingOp),
    /// Device-specific action.
    Dev(D),
}

impl<D: Encode> Encode for Step<D> {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Step::Ring(op) => {
                variant(out, 0, 2);
                op.encode(out);
            }
            Step::Dev(op) => {
                variant(out, 1, 2);
                op.encode(out);
            }
        }
    }
}

/// Records the interrupts a device raises.
#[derive(Debug, Default)]
pub struct Recorder {
    fired: Mutex<Vec<VirtioInterruptType>>,
    needs_reset: AtomicUsize,
}

impl Recorder {
    /// Interrupts raised since the last call.
    pub fn take(&self) -> Vec<VirtioInterruptType> {
        std::mem::take(&mut *self.fired.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How often the device asked to be reset.
    pub fn needs_reset(&self) -> usize {
        self.needs_reset.load(Ordering::Acquire)
    }
}

impl VirtioInterrupt for Recorder {
    fn trigger(&self, int_type: VirtioInterruptType) -> std::io::Result<()> {
        self.fired
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(int_type);
        Ok(())
    }

    fn set_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::AcqRel);
    }
}

/// Ring sizes the fuzzer picks from (powers of two up to
/// [`MAX_QUEUE_SIZE`]).
pub fn ring_size(log2: u8) -> u16 {
    1 << (log2 % (MAX_QUEUE_SIZE.trailing_zeros() as u8 + 1))
}

/// The driver side of a target: guest memory, the rings, and what the
/// checks of every batch need.
pub struct Rings {
    /// Guest RAM.
    pub mem: GuestMemoryMmap,
    /// The queues set up, with their device queue index, and counters.
    pub queues: Vec<(DriverQueue, Totals)>,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// The interrupts.
    pub irq: Arc<Recorder>,
    /// Threads alive before the device existed.
    pub threads: Baseline,
    /// Interrupts seen in batches.
    pub interrupts: usize,
    /// Snapshot buffers, reused.
    bufs: Option<Buffers>,
}

impl Rings {
    /// Fresh memory and no queues.
    pub fn new(event_idx: bool) -> Self {
        Rings {
            mem: guest_memory(MEM_SIZE),
            queues: Vec::new(),
            event_idx,
            irq: Arc::new(Recorder::default()),
            threads: Baseline::take(),
            interrupts: 0,
            bufs: Some(Buffers::default()),
        }
    }

    /// Replaces the queues with fresh rings: device queue `index` of
    /// `size` entries for each pair.
    pub fn set_queues(&mut self, queues: &[(u16, u16)]) {
        self.queues = queues
            .iter()
            .enumerate()
            .map(|(pos, &(index, size))| {
                let mut q = DriverQueue::new(&self.mem, pos as u16, size);
                q.index = index;
                (q, Totals::default())
            })
            .collect();
    }

    /// Activations for every queue (device queue `max` sizes given by
    /// `max_size`), and the eventfds that kick them.
    pub fn activations(&self, max_size: u16) -> (Vec<QueueActivation>, Vec<EventFd>) {
        self.queues
            .iter()
            .map(|(q, _)| {
                let notifier = EventFd::new(EFD_NONBLOCK).expect("eventfd");
                let kick = notifier.try_clone().expect("eventfd clone");
                let activation = QueueActivation {
                    index: q.index,
                    queue: q.device_queue(max_size, self.event_idx),
                    notifier,
                };
                (activation, kick)
            })
            .unzip()
    }

    /// Starts a batch: drops interrupts raised outside one.
    pub fn begin(&mut self) -> Batch {
        self.irq.take();
        let bufs = self.bufs.take().unwrap_or_default();
        Batch::begin(&self.mem, MEM_SIZE, &mut self.queues, bufs)
    }

    /// Ends a batch: the generic checks, then the interrupt rules: only
    /// queues in `active` interrupt, and a queue with new used elements
    /// interrupts unless EVENT_IDX suppression allows silence.
    pub fn finish(
        &mut self,
        batch: &mut Batch,
        active: &[u16],
        ctx: &dyn Display,
    ) -> Vec<Completion> {
        let done = batch.finish(&self.mem, &mut self.queues, ctx);
        let fired = self.irq.take();
        self.interrupts += fired.len();
        for t in &fired {
            if let VirtioInterruptType::Queue(i) = t {
                assert!(
                    active.contains(i),
                    "{ctx}: interrupt for queue {i}, which is not active ({active:?})"
                );
            }
        }
        if !batch.stable {
            return done;
        }
        for (pos, (q, _)) in self.queues.iter().enumerate() {
            let before = &batch.queues[pos];
            let advanced = done.iter().any(|c| c.queue == pos);
            // With EVENT_IDX the driver asked for an interrupt at the
            // first new used element only if used_event equalled the used
            // index.
            let wanted = !self.event_idx || before.used_event == before.used_idx;
            if advanced && wanted && !before.used_poked && active.contains(&q.index) {
                assert!(
                    fired.contains(&VirtioInterruptType::Queue(q.index)),
                    "{ctx}: queue {} has new used elements but no interrupt was raised \
                     (event_idx {}, used_event {}, used index {} before)",
                    q.index,
                    self.event_idx,
                    before.used_event,
                    before.used_idx
                );
            }
        }
        done
    }

    /// Applies a ring op; returns the position of the queue to kick.
    pub fn apply(&mut self, op: &RingOp) -> Option<usize> {
        let mut plain: Vec<DriverQueue> = Vec::new();
        // RingOp works on bare queues; lend them out and put them back.
        let totals: Vec<Totals> = self
            .queues
            .drain(..)
            .map(|(q, t)| {
                plain.push(q);
                t
            })
            .collect();
        let kick = op.apply(&self.mem, &mut plain);
        self.queues = plain.into_iter().zip(totals).collect();
        kick
    }
}

/// A device under test.
pub trait Device {
    /// Its own ops.
    type Op: Debug;

    /// Notifies the queue at position `pos` and returns once the device
    /// has processed it.
    fn kick(&mut self, rings: &mut Rings, pos: usize);

    /// The part of a device op that plays the driver (writing chains):
    /// done before the batch's snapshot.
    fn prepare(&mut self, _rings: &mut Rings, _op: &Self::Op) {}

    /// Performs a device op and returns once the device is idle again;
    /// true if it reset the device and replaced the rings (the batch is
    /// then void).
    fn apply(&mut self, rings: &mut Rings, op: &Self::Op, ctx: &dyn Display) -> bool;

    /// Device queue indices that may raise interrupts.
    fn active(&self) -> Vec<u16>;

    /// Worker threads that should be alive.
    fn threads(&self) -> usize;

    /// The device's own checks of a batch.
    fn check(&mut self, rings: &Rings, batch: &Batch, done: &[Completion], ctx: &dyn Display);
}

/// What an input exercised, so tests can tell a harness that checks
/// nothing from one that checks a working device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Batches run.
    pub batches: usize,
    /// Of which clean (content checks ran).
    pub clean: usize,
    /// Used elements seen.
    pub completions: usize,
    /// Used elements with a non-zero length.
    pub with_data: usize,
    /// Queue interrupts.
    pub interrupts: usize,
}

/// Runs `steps` (at most [`MAX_OPS`]) against `device`.
pub fn run<D: Device>(device: &mut D, rings: &mut Rings, steps: &[Step<D::Op>]) -> Stats {
    let mut stats = Stats::default();
    rings.threads.assert_count(device.threads(), &START);
    for (i, step) in steps.iter().take(MAX_OPS).enumerate() {
        let ctx = Ctx(i, step);
        let (mut batch, reset) = match step {
            Step::Ring(op) => {
                let Some(pos) = rings.apply(op) else {
                    continue;
                };
                let batch = rings.begin();
                device.kick(rings, pos);
                (batch, false)
            }
            Step::Dev(op) => {
                device.prepare(rings, op);
                let batch = rings.begin();
                let reset = device.apply(rings, op, &ctx);
                (batch, reset)
            }
        };
        rings.threads.wait_idle(&ctx);
        if !reset {
            let done = rings.finish(&mut batch, &device.active(), &ctx);
            device.check(rings, &batch, &done, &ctx);
            stats.batches += 1;
            stats.clean += usize::from(batch.clean);
            stats.completions += done.len();
            stats.with_data += done.iter().filter(|c| c.len > 0).count();
        }
        rings.threads.assert_count(device.threads(), &ctx);
        rings.bufs = Some(batch.into_buffers());
    }
    stats
}
