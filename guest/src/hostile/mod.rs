//! `mode=hostile`: a survival suite. One after another, each action does
//! something a broken or malicious driver could do to a real device (looping
//! or out-of-RAM descriptor chains, impossible queue setups, BAR moves onto
//! RAM, nonsense MSI-X messages, resets with requests in flight...), checks
//! that the device either completed correctly, reported an error, set
//! NEEDS_RESET or ignored the write as the spec allows (what is acceptable is
//! stated per action, strictly where trellis documents its behaviour), then
//! resets the device and checks that a good request still works and raises
//! its MSI-X interrupt. Each action prints `TEST hostile-<name> ok|FAIL`.
//!
//! `HOSTILE-BEGIN` / `HOSTILE-END` bracket the actions, each followed by a
//! pause, so that the host can sample the VMM's RSS at both points.
//! `hostile_only=<prefix>` runs only the actions whose name starts with it.

mod blk;
mod dev;
mod flood;
mod mem;
mod msix;
mod others;
mod pcifn;
mod ring;
mod transport;

use crate::arch::rdtsc;
use crate::println;
use crate::serial::{Dec, Hex};
use crate::Ctx;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};
use dev::{Dev, Kind};
use virtio_drivers::transport::DeviceType;

/// Like `alloc::format!`, which cannot be used: the prebuilt `alloc`'s
/// `format` has unwinding paths that need `_Unwind_Resume`.
macro_rules! fmt {
    ($($arg:tt)*) => {{
        let mut s = alloc::string::String::new();
        let _ = core::fmt::Write::write_fmt(&mut s, format_args!($($arg)*));
        s
    }};
}
pub(crate) use fmt;

/// What an action found: `Ok(detail)` or `Err(reason)`.
pub type Res = Result<String, String>;

/// TSC ticks per millisecond (set from the calibrated frequency).
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(2_000_000);

/// Spins until `cond` holds or `ms` milliseconds passed; returns `cond`.
pub fn wait_ms(ms: u64, cond: impl Fn() -> bool) -> bool {
    let end = rdtsc() + ms * TICKS_PER_MS.load(Ordering::Relaxed);
    loop {
        if cond() {
            return true;
        }
        if rdtsc() > end {
            return cond();
        }
        core::hint::spin_loop();
    }
}

/// Milliseconds since `start` (a TSC value).
pub fn ms_since(start: u64) -> u64 {
    (rdtsc() - start) / TICKS_PER_MS.load(Ordering::Relaxed)
}

/// Spins for `ms` milliseconds.
pub fn spin_ms(ms: u64) {
    wait_ms(ms, || false);
}

/// State shared by the actions.
pub struct Hx<'a> {
    pub pci: &'a mut crate::pci::Pci,
    pub apic_id: u32,
    /// First address above the guest RAM that holds the kernel.
    pub ram_end: u64,
    /// The ECAM from ACPI, if any.
    pub ecam: Option<u64>,
    /// The other devices (the one an action runs on is taken out).
    pub devs: [Option<Dev>; 4],
}

impl Hx<'_> {
    /// BAR 0 of every other device.
    pub fn other_bars(&self) -> impl Iterator<Item = (Kind, u64)> + '_ {
        self.devs.iter().flatten().map(|d| (d.kind, d.bar))
    }
}

/// One hostile action against a device of `kind`.
pub struct Action {
    pub name: &'static str,
    pub kind: Kind,
    pub run: fn(&mut Hx, &mut Dev) -> Res,
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Blk => 0,
        Kind::Rng => 1,
        Kind::Console => 2,
        Kind::Net => 3,
    }
}

/// End of the RAM region holding 1 MiB, from the PVH memory map
/// (`hvm_start_info` version 1), or 0 if there is none.
fn ram_end_from(start_info: u64) -> u64 {
    if start_info == 0 {
        return 0;
    }
    // SAFETY: `start_info` is the loader's hvm_start_info (checked by the
    // caller), identity-mapped; the memory map it names lies in low RAM.
    // Fields are read by offset with volatile loads, entries bounded.
    unsafe {
        let version = ((start_info + 4) as *const u32).read_volatile();
        let map = ((start_info + 40) as *const u64).read_volatile();
        let entries = ((start_info + 48) as *const u32).read_volatile();
        if version < 1 || map == 0 {
            return 0;
        }
        for i in 0..u64::from(entries.min(128)) {
            let entry = map + 24 * i;
            let addr = (entry as *const u64).read_volatile();
            let size = ((entry + 8) as *const u64).read_volatile();
            let kind = ((entry + 16) as *const u32).read_volatile();
            if kind == 1 && addr <= 0x10_0000 && addr + size > 0x10_0000 {
                return addr + size;
            }
        }
    }
    0
}

/// `start_info.rsdp_paddr`, or 0.
fn rsdp_from(start_info: u64) -> u64 {
    if start_info == 0 {
        return 0;
    }
    // SAFETY: as in `ram_end_from`; the field is at offset 32.
    unsafe { ((start_info + 32) as *const u64).read_volatile() }
}

/// Runs every action; `start_info` is the PVH start info address.
pub fn run(ctx: &mut Ctx, start_info: u64, only: &str) {
    if let Some(hz) = ctx.tsc_hz {
        TICKS_PER_MS.store((hz / 1000).max(1), Ordering::Relaxed);
    }
    let ram_end = match ram_end_from(start_info) {
        0 => {
            println!("INFO hostile: no PVH memory map, assuming 256 MiB of RAM");
            0x1000_0000
        }
        end => end,
    };
    mem::set_ram_top(ram_end);
    // Touch the scratch page now, so it is in the RSS before BEGIN.
    mem::fill(ram_end - 4096, 4096, 0);
    println!("INFO hostile: ram_end={}", Hex(ram_end));

    let kinds = [
        (DeviceType::Block, Kind::Blk, 0usize, 0x80u8),
        (DeviceType::EntropySource, Kind::Rng, 1, 0x88),
        (DeviceType::Console, Kind::Console, 2, 0x90),
        (DeviceType::Network, Kind::Net, 4, 0x98),
    ];
    let mut devs: [Option<Dev>; 4] = Default::default();
    for (device_type, kind, ring_set, vector_base) in kinds {
        let Some(f) = ctx.find(device_type) else {
            println!("SKIP hostile-{} not-present", kind.name());
            continue;
        };
        match Dev::open(&mut ctx.pci, f.df, kind, ring_set, vector_base, ctx.apic_id) {
            Ok(mut d) => match d.probe() {
                Ok(_) => {
                    println!(
                        "INFO hostile: {} bar0={} queues={} msix={} capacity={}",
                        kind.name(),
                        Hex(d.bar),
                        Dec(d.num_queues.into()),
                        Dec(d.msix_entries.into()),
                        Dec(d.capacity)
                    );
                    devs[kind_index(kind)] = Some(d);
                }
                Err(e) => ctx
                    .report
                    .fail(&name_of(kind.name(), "setup"), format_args!("{e}")),
            },
            Err(e) => ctx
                .report
                .fail(&name_of(kind.name(), "setup"), format_args!("{e}")),
        }
    }

    let rsdp_hint = rsdp_from(start_info);
    let ecam = crate::acpi::find_rsdp(rsdp_hint)
        .as_ref()
        .and_then(crate::acpi::find_ecam)
        .map(|e| e.base);
    let mut hx = Hx {
        pci: &mut ctx.pci,
        apic_id: ctx.apic_id,
        ram_end,
        ecam,
        devs,
    };
    println!("HOSTILE-BEGIN");
    // Give the host time to sample the VMM before the first action.
    spin_ms(500);
    let start = rdtsc();
    let mut count = 0u64;
    let lists: [&[Action]; 8] = [
        blk::ACTIONS,
        transport::ACTIONS,
        ring::ACTIONS,
        msix::ACTIONS,
        pcifn::ACTIONS,
        others::ACTIONS,
        flood::ACTIONS,
        blk::LATE_ACTIONS,
    ];
    for action in lists.iter().flat_map(|l| l.iter()) {
        if !action.name.starts_with(only) {
            continue;
        }
        let name = fmt!("hostile-{}", action.name);
        let slot = kind_index(action.kind);
        let Some(mut dev) = hx.devs[slot].take() else {
            println!("SKIP {name} {}-not-present", action.kind.name());
            continue;
        };
        count += 1;
        let result = (action.run)(&mut hx, &mut dev);
        // Whatever the action did, the device must come back.
        let after = dev.probe();
        hx.devs[slot] = Some(dev);
        match (result, after) {
            (Ok(detail), Ok(_)) if detail.is_empty() => ctx.report.ok(&name, format_args!("")),
            (Ok(detail), Ok(_)) => ctx.report.ok(&name, format_args!("{detail}")),
            (Err(reason), Ok(_)) => ctx.report.fail(&name, reason),
            (Ok(_), Err(e)) => ctx.report.fail(&name, fmt!("after-reset: {e}")),
            (Err(reason), Err(e)) => ctx.report.fail(&name, fmt!("{reason}; after-reset: {e}")),
        }
    }
    let ms = ms_since(start);
    println!("HOSTILE-END actions={} ms={}", Dec(count), Dec(ms));
    // The host samples the VMM's RSS now; stay alive meanwhile.
    spin_ms(1500);
}

fn name_of(dev: &str, what: &str) -> String {
    fmt!("hostile-{dev}-{what}")
}
