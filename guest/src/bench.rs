//! `mode=bench`: 4 KiB virtio-blk read IOPS at queue depth 1 and 32 (polled,
//! device interrupts suppressed) and the kick-to-interrupt round trip (one
//! request, time from just before the notify until the MSI-X handler has
//! counted the interrupt). Times are TSC cycles; rates and nanoseconds are
//! added when the TSC frequency is known.
//!
//! virtio-drivers' `VirtIOBlk` has a fixed 16-entry queue, too small for 32
//! requests in flight, so the benchmark drives the block device through the
//! crate's `VirtQueue` directly with 128 entries (3 descriptors a request).

use crate::arch::{self, rdtsc};
use crate::hal::GuestHal;
use crate::interrupts;
use crate::serial::Dec;
use crate::virtio::{self, IrqTransport};
use crate::{println, Ctx};
use virtio_drivers::device::common::Feature;
use virtio_drivers::queue::VirtQueue;
use virtio_drivers::transport::{DeviceType, Transport};

const QUEUE_SIZE: usize = 128;
const MAX_DEPTH: usize = 32;
const BLOCK: usize = 4096;
/// Reads cover this span from `FIRST_SECTOR` (clamped to the disk).
const SPAN_SECTORS: u64 = (64 << 20) / 512;
const FIRST_SECTOR: u64 = 2048;
const VIRTIO_BLK_T_IN: u32 = 0;

#[repr(C, align(4096))]
struct Buffers {
    data: [[u8; BLOCK]; MAX_DEPTH],
    header: [[u8; 16]; MAX_DEPTH],
    status: [[u8; 1]; MAX_DEPTH],
}

static mut BUFFERS: Buffers = Buffers {
    data: [[0; BLOCK]; MAX_DEPTH],
    header: [[0; 16]; MAX_DEPTH],
    status: [[0; 1]; MAX_DEPTH],
};

/// How a benchmark waits for completions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Spin on the used ring, device interrupts suppressed.
    Poll,
    /// Sleep in HLT until the queue's MSI-X interrupt.
    Interrupt,
}

struct BenchBlk {
    transport: IrqTransport,
    queue: VirtQueue<GuestHal, QUEUE_SIZE>,
    capacity: u64,
    /// Slot of each in-flight descriptor chain, by head index (token).
    slot_of: [u8; QUEUE_SIZE],
}

/// One slot's buffers as the slices `VirtQueue` wants.
///
/// # Safety
/// Only one set of slices per slot may exist at a time; the benchmark keeps
/// them short-lived and never touches a slot's buffers otherwise.
unsafe fn slot_slices(slot: usize) -> (&'static [u8], &'static mut [u8], &'static mut [u8]) {
    let b = core::ptr::addr_of_mut!(BUFFERS);
    // SAFETY: distinct fields of one static; exclusivity per the contract.
    unsafe {
        (
            &(&(*b).header)[slot][..],
            &mut (&mut (*b).data)[slot][..],
            &mut (&mut (*b).status)[slot][..],
        )
    }
}

impl BenchBlk {
    fn new(mut transport: IrqTransport) -> Result<Self, &'static str> {
        let features = transport.begin_init(Feature::VERSION_1);
        if !features.contains(Feature::VERSION_1) {
            return Err("no-virtio-1");
        }
        let lo: u32 = transport.read_config_space(0).map_err(|_| "config")?;
        let hi: u32 = transport.read_config_space(4).map_err(|_| "config")?;
        if transport.max_queue_size(0) < QUEUE_SIZE as u32 {
            return Err("queue-smaller-than-128");
        }
        let queue = VirtQueue::new(&mut transport, 0, false, false).map_err(|_| "queue-setup")?;
        transport.finish_init();
        Ok(BenchBlk {
            transport,
            queue,
            capacity: u64::from(lo) | (u64::from(hi) << 32),
            slot_of: [u8::MAX; QUEUE_SIZE],
        })
    }

    /// Queues a 4 KiB read of `sector` into `slot` (no notify).
    fn submit(&mut self, slot: usize, sector: u64) -> Result<(), &'static str> {
        // SAFETY: the header is only written while the slot is idle.
        let header = unsafe { &mut (*core::ptr::addr_of_mut!(BUFFERS)).header[slot] };
        header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        header[4..8].fill(0);
        header[8..].copy_from_slice(&sector.to_le_bytes());
        // SAFETY: the slot is idle, so these are the only slices to it; they
        // stay untouched until `complete` pops the same token.
        let token = unsafe {
            let (h, d, s) = slot_slices(slot);
            self.queue.add(&[h], &mut [d, s])
        }
        .map_err(|_| "queue-full")?;
        self.slot_of[usize::from(token)] = slot as u8;
        Ok(())
    }

    fn kick(&mut self) {
        if self.queue.should_notify() {
            self.transport.notify(0);
        }
    }

    /// Pops the next used chain; returns its slot.
    fn complete(&mut self) -> Option<Result<usize, &'static str>> {
        let token = self.queue.peek_used()?;
        let slot = usize::from(self.slot_of[usize::from(token)]);
        if slot >= MAX_DEPTH {
            return Some(Err("unknown-token"));
        }
        // SAFETY: these are the buffers `submit` queued under this token.
        let result = unsafe {
            let (h, d, s) = slot_slices(slot);
            self.queue.pop_used(token, &[h], &mut [d, s])
        };
        self.slot_of[usize::from(token)] = u8::MAX;
        // SAFETY: the device is done with the slot.
        let status = unsafe { (*core::ptr::addr_of!(BUFFERS)).status[slot][0] };
        Some(match (result, status) {
            (Ok(_), 0) => Ok(slot),
            (Ok(_), _) => Err("io-error"),
            (Err(_), _) => Err("pop-failed"),
        })
    }

    fn sector(&self, i: u64) -> u64 {
        let span = SPAN_SECTORS.min(self.capacity - FIRST_SECTOR) / 8 * 8;
        FIRST_SECTOR + (i * 8) % span
    }

    /// Keeps `depth` reads in flight until `ops` complete or `max_cycles`
    /// pass, either spinning on the used ring or sleeping (HLT) until the
    /// queue's MSI-X interrupt. Returns (completed, cycles).
    fn run_depth(
        &mut self,
        depth: usize,
        ops: u64,
        max_cycles: u64,
        wait: Wait,
    ) -> Result<(u64, u64), &'static str> {
        self.queue.set_dev_notify(wait == Wait::Interrupt);
        let (mut submitted, mut completed) = (0u64, 0u64);
        let start = rdtsc();
        for slot in 0..depth {
            self.submit(slot, self.sector(submitted))?;
            submitted += 1;
        }
        self.kick();
        let mut stop_submitting = false;
        let mut spins = 0u32;
        while completed < submitted {
            let mut resubmitted = false;
            while let Some(done) = self.complete() {
                let slot = done?;
                completed += 1;
                if !stop_submitting && submitted < ops {
                    self.submit(slot, self.sector(submitted))?;
                    submitted += 1;
                    resubmitted = true;
                }
            }
            if resubmitted {
                self.kick();
            }
            if completed < submitted && wait == Wait::Interrupt {
                arch::halt_unless(|| self.queue.can_pop());
            }
            // RDTSC may be costly under emulation: check the clock rarely.
            spins = spins.wrapping_add(1);
            let check = wait == Wait::Interrupt || spins.is_multiple_of(256);
            if !stop_submitting && check && rdtsc().wrapping_sub(start) > max_cycles {
                stop_submitting = true;
            }
        }
        self.queue.set_dev_notify(false);
        Ok((completed, rdtsc().wrapping_sub(start)))
    }

    /// One request at a time, waiting for its MSI-X interrupt. Returns the
    /// cycles of each round trip in `samples`.
    fn run_irq(&mut self, samples: &mut [u64], timeout: u64) -> Result<(), &'static str> {
        let vector = self.transport.vector(0);
        self.queue.set_dev_notify(true);
        for (i, sample) in samples.iter_mut().enumerate() {
            let before = interrupts::count(vector);
            self.submit(0, self.sector(i as u64))?;
            let start = rdtsc();
            self.kick();
            let mut spins = 0u32;
            while interrupts::count(vector) == before {
                spins = spins.wrapping_add(1);
                if spins.is_multiple_of(256) && rdtsc().wrapping_sub(start) > timeout {
                    return Err("no-interrupt");
                }
            }
            *sample = rdtsc().wrapping_sub(start);
            while self.queue.peek_used().is_none() {
                core::hint::spin_loop();
            }
            self.complete().ok_or("no-completion")??;
        }
        self.queue.set_dev_notify(false);
        Ok(())
    }
}

fn per_second(ops: u64, cycles: u64, hz: u64) -> u64 {
    (u128::from(ops) * u128::from(hz) / u128::from(cycles.max(1))) as u64
}

fn nanos(cycles: u64, hz: u64) -> u64 {
    (u128::from(cycles) * 1_000_000_000 / u128::from(hz.max(1))) as u64
}

/// Cycles per iteration of a plain dependent-add loop: near 1 on hardware
/// virtualization, far more where the backend emulates guest instructions.
/// Puts the device numbers in context.
fn cpu_loop_cycles() -> u64 {
    const ITERS: u64 = 1_000_000;
    let start = rdtsc();
    let mut x = 0u64;
    for i in 0..ITERS {
        x = core::hint::black_box(x.wrapping_add(i));
    }
    core::hint::black_box(x);
    rdtsc().wrapping_sub(start) / ITERS
}

/// Runs the benchmarks on the first block device.
pub fn run(ctx: &mut Ctx) {
    println!(
        "BENCH cpu-loop-cycles {} cycles/iter",
        Dec(cpu_loop_cycles())
    );
    let Some(f) = ctx.find(DeviceType::Block) else {
        return ctx.report.fail("bench-init", "no-block-device");
    };
    let transport = match virtio::open(&mut ctx.pci, &f, 1, false, ctx.apic_id) {
        Ok(t) => t,
        Err(e) => return ctx.report.fail("bench-init", e),
    };
    let mut blk = match BenchBlk::new(transport) {
        Ok(b) => b,
        Err(e) => return ctx.report.fail("bench-init", e),
    };
    if blk.capacity < FIRST_SECTOR + 64 {
        return ctx.report.fail("bench-init", "disk-too-small");
    }
    ctx.report.ok(
        "bench-init",
        format_args!(
            "queue={} capacity={}",
            Dec(QUEUE_SIZE as u64),
            Dec(blk.capacity)
        ),
    );
    let hz = ctx.tsc_hz;
    // Without a known frequency, cap each run at ~10^10 cycles.
    let max_cycles = hz.map_or(10_000_000_000, |hz| hz / 1000 * u64::from(ctx.cfg.bench_ms));
    let ops = u64::from(ctx.cfg.bench_ops);

    let runs = [
        ("blk-read-4k-qd1", 1, Wait::Interrupt),
        ("blk-read-4k-qd32", MAX_DEPTH, Wait::Interrupt),
        ("blk-read-4k-qd1-poll", 1, Wait::Poll),
        ("blk-read-4k-qd32-poll", MAX_DEPTH, Wait::Poll),
    ];
    for (name, depth, wait) in runs {
        // Warm-up: not timed.
        if let Err(e) = blk.run_depth(depth, 64, max_cycles, wait) {
            ctx.report.fail(name, e);
            continue;
        }
        match blk.run_depth(depth, ops, max_cycles, wait) {
            Err(e) => ctx.report.fail(name, e),
            Ok((done, cycles)) => {
                println!("BENCH {name}-ops {} ops", Dec(done));
                println!(
                    "BENCH {name}-cycles {} cycles/op",
                    Dec(cycles / done.max(1))
                );
                if let Some(hz) = hz {
                    println!(
                        "BENCH {name}-iops {} iops",
                        Dec(per_second(done, cycles, hz))
                    );
                }
                ctx.report.ok(name, format_args!("ops={}", Dec(done)));
            }
        }
    }

    let mut samples = [0u64; 1000];
    let n = (ops as usize).clamp(1, samples.len());
    let timeout = hz.map_or(10_000_000_000, |hz| hz); // one second
    match blk.run_irq(&mut samples[..n], timeout) {
        Err(e) => ctx.report.fail("kick-to-irq", e),
        Ok(()) => {
            let s = &mut samples[..n];
            s.sort_unstable();
            let sum: u64 = s.iter().sum();
            let (min, p50, p99, mean) = (s[0], s[n / 2], s[(n * 99) / 100], sum / n as u64);
            println!("BENCH kick-to-irq-samples {} ops", Dec(n as u64));
            for (label, v) in [("min", min), ("p50", p50), ("p99", p99), ("mean", mean)] {
                println!("BENCH kick-to-irq-{label}-cycles {} cycles", Dec(v));
                if let Some(hz) = hz {
                    println!("BENCH kick-to-irq-{label}-ns {} ns", Dec(nanos(v, hz)));
                }
            }
            ctx.report
                .ok("kick-to-irq", format_args!("samples={}", Dec(n as u64)));
        }
    }
}
