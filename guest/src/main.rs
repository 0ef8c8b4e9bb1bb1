//! Trellis test guest: a freestanding PVH kernel that finds virtio-pci devices
//! through ACPI/PCI, drives them with the virtio-drivers crate, checks that
//! their MSI-X interrupts arrive, prints one line per check on COM1 and
//! reports the result on the exit port. See README.md for the conventions.

#![no_std]
#![no_main]

extern crate alloc;

mod acpi;
mod arch;
mod bench;
mod boot;
mod hal;
mod hostile;
mod interrupts;
mod mem;
mod pci;
mod reboot;
mod serial;
mod tests;
mod timer;
mod virtio;

use core::fmt::{self, Display};
use core::panic::PanicInfo;
use serial::{Dec, Hex};

/// Port the result is written to (QEMU's isa-debug-exit at iobase 0xf4).
pub const EXIT_PORT: u16 = 0xf4;
/// Written to the exit port when every check passed: trellis exits with
/// status 0, QEMU with (0 << 1) | 1 = 1.
pub const EXIT_PASS: u32 = 0;
/// Written when any check failed: trellis exits with 1, QEMU with 3.
pub const EXIT_FAIL: u32 = 1;

const START_INFO_MAGIC: u32 = 0x336e_c578;

/// TSC cycles to wait after the exit port write before the reset fallback
/// (~0.4 s at 2.6 GHz).
const EXIT_GRACE_CYCLES: u64 = 1 << 30;

/// Writes the verdict to the exit port. A VMM without one lets us run on:
/// then pulse the i8042 reset line so it stops rather than hanging, and halt.
pub fn exit(pass: bool) -> ! {
    arch::outl(EXIT_PORT, if pass { EXIT_PASS } else { EXIT_FAIL });
    // trellis' port only signals an eventfd; the vCPU runs on until the VMM
    // stops it. An immediate reset would race with (and can beat) the
    // verdict, so give the VMM time first. The iteration cap covers a TSC
    // that does not advance.
    let start = arch::rdtsc();
    for _ in 0..100_000_000u32 {
        if arch::rdtsc().wrapping_sub(start) > EXIT_GRACE_CYCLES {
            break;
        }
        core::hint::spin_loop();
    }
    arch::outb(0x64, 0xfe);
    arch::halt_forever()
}

#[panic_handler]
fn panic(info: &PanicInfo) -> ! {
    arch::cli();
    // Only the literal message and the location: formatting arguments may
    // need core's SSE number code (see serial.rs).
    let message = info
        .message()
        .as_str()
        .unwrap_or("(message with arguments)");
    match info.location() {
        Some(loc) => serial::print_unlocked(format_args!(
            "\nPANIC at {}:{}: {}\n",
            loc.file(),
            Dec(u64::from(loc.line())),
            message
        )),
        None => serial::print_unlocked(format_args!("\nPANIC {message}\n")),
    }
    serial::print_unlocked(format_args!("RESULT pass=0 fail=1 panic\n"));
    exit(false)
}

/// The prebuilt `alloc` of the host target was compiled for unwinding and
/// references this symbol; with panic=abort nothing ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

/// What the kernel command line asked for.
pub struct Config {
    pub bench: bool,
    /// Devices that must be present (`expect=blk,rng,console,net`).
    pub expect: Expect,
    /// Reassign every virtio BAR from our own window (`bars=reassign`).
    pub reassign_bars: bool,
    /// Use xAPIC MMIO even if x2APIC is available (`apic=xapic`).
    pub xapic: bool,
    /// Use ports 0xCF8/0xCFC even if ACPI has an MCFG (`pci=port`).
    pub port_io: bool,
    /// Requests per benchmark (`bench_ops=N`).
    pub bench_ops: u32,
    /// Upper bound on each benchmark's run time in ms (`bench_ms=N`).
    pub bench_ms: u32,
    /// `selftest=fault` / `selftest=panic`: check the failure paths.
    pub selftest: &'static str,
    /// `expect_ro=1`: the disk is read-only; check that writes are refused.
    pub expect_ro: bool,
    /// `mode=hostile`: the hostile-driver survival suite instead of the checks.
    pub hostile: bool,
    /// `hostile_only=<prefix>`: only the hostile actions named so.
    pub hostile_only: &'static str,
    /// `mode=reboot`: reset the machine on the first boot (see reboot.rs).
    pub reboot: bool,
    /// `reset=kbd|acpi`: how `mode=reboot` resets the machine.
    pub reset: reboot::ResetMethod,
}

/// Devices the host attached.
#[derive(Default, Clone, Copy)]
pub struct Expect {
    pub blk: bool,
    pub rng: bool,
    pub console: bool,
    pub net: bool,
}

impl Config {
    fn parse(cmdline: &'static str) -> Self {
        let mut cfg = Config {
            bench: false,
            expect: Expect::default(),
            reassign_bars: false,
            xapic: false,
            port_io: false,
            bench_ops: 20_000,
            bench_ms: 2_000,
            selftest: "",
            expect_ro: false,
            hostile: false,
            hostile_only: "",
            reboot: false,
            reset: reboot::ResetMethod::Kbd,
        };
        for word in cmdline.split_ascii_whitespace() {
            let (key, value) = word.split_once('=').unwrap_or((word, ""));
            match key {
                "mode" => {
                    cfg.bench = value == "bench";
                    cfg.hostile = value == "hostile";
                    cfg.reboot = value == "reboot";
                }
                "reset" => cfg.reset = reboot::ResetMethod::parse(value),
                "hostile_only" => cfg.hostile_only = value,
                "expect" => {
                    for dev in value.split(',') {
                        match dev {
                            "blk" => cfg.expect.blk = true,
                            "rng" => cfg.expect.rng = true,
                            "console" => cfg.expect.console = true,
                            "net" => cfg.expect.net = true,
                            _ => println!("INFO unknown device in expect=: {dev}"),
                        }
                    }
                }
                "bars" => cfg.reassign_bars = value == "reassign",
                "apic" => cfg.xapic = value == "xapic",
                "pci" => cfg.port_io = value == "port",
                "selftest" => cfg.selftest = value,
                "expect_ro" => cfg.expect_ro = value == "1",
                "bench_ops" => cfg.bench_ops = value.parse().unwrap_or(cfg.bench_ops).max(1),
                "bench_ms" => cfg.bench_ms = value.parse().unwrap_or(cfg.bench_ms).max(1),
                "log" => log::set_max_level(match value {
                    "debug" => log::LevelFilter::Debug,
                    "info" => log::LevelFilter::Info,
                    _ => log::LevelFilter::Warn,
                }),
                _ => {}
            }
        }
        cfg
    }
}

/// Counts checks and prints their `TEST` lines.
#[derive(Default)]
pub struct Report {
    pub pass: u32,
    pub fail: u32,
}

impl Report {
    /// `TEST <name> ok [detail]`.
    pub fn ok(&mut self, name: &str, detail: fmt::Arguments) {
        self.pass += 1;
        if detail.as_str() == Some("") {
            println!("TEST {name} ok");
        } else {
            println!("TEST {name} ok {detail}");
        }
    }

    /// `TEST <name> FAIL <reason>`.
    pub fn fail(&mut self, name: &str, reason: impl Display) {
        self.fail += 1;
        println!("TEST {name} FAIL {reason}");
    }

    /// `ok` when `cond`, else `FAIL reason`.
    pub fn check(&mut self, name: &str, cond: bool, detail: fmt::Arguments) {
        if cond {
            self.ok(name, detail);
        } else {
            self.fail(name, detail);
        }
    }
}

/// Shared state the tests and benchmarks work with.
pub struct Ctx {
    pub cfg: Config,
    pub pci: pci::Pci,
    pub functions: [Option<virtio::Function>; 32],
    pub apic_id: u32,
    pub tsc_hz: Option<u64>,
    pub report: Report,
    /// Where ACPI's tables are, if they were found.
    pub rsdp: Option<acpi::Rsdp>,
}

impl Ctx {
    /// The first virtio function of `kind`.
    pub fn find(&self, kind: virtio_drivers::transport::DeviceType) -> Option<virtio::Function> {
        self.functions
            .iter()
            .flatten()
            .find(|f| f.kind == kind)
            .copied()
    }
}

/// Reads the NUL-terminated command line from `hvm_start_info`.
fn read_cmdline(addr: u64) -> &'static str {
    if addr == 0 {
        return "";
    }
    let mut len = 0;
    // SAFETY: the loader put a NUL-terminated string at `addr` in low RAM,
    // identity-mapped; we stop at 4 KiB in any case.
    let bytes = unsafe {
        while len < 4096 && ((addr + len as u64) as *const u8).read_volatile() != 0 {
            len += 1;
        }
        core::slice::from_raw_parts(addr as *const u8, len)
    };
    core::str::from_utf8(bytes).unwrap_or("")
}

#[no_mangle]
extern "C" fn guest_main(start_info: u32) -> ! {
    serial::init();
    println!("TRELLIS-GUEST boot");
    static LOGGER: serial::Logger = serial::Logger;
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Warn);
    interrupts::init();
    interrupts::disable_pic();

    let si = u64::from(start_info);
    // SAFETY: `si` is the hvm_start_info the loader passed in %ebx: identity
    // mapped, at least 56 bytes; fields read by offset, volatile.
    let (magic, version, cmdline_paddr, rsdp_paddr) = unsafe {
        (
            (si as *const u32).read_volatile(),
            ((si + 4) as *const u32).read_volatile(),
            ((si + 24) as *const u64).read_volatile(),
            ((si + 32) as *const u64).read_volatile(),
        )
    };
    let (cmdline, rsdp_hint) = if si != 0 && magic == START_INFO_MAGIC {
        (read_cmdline(cmdline_paddr), rsdp_paddr)
    } else {
        println!(
            "INFO no hvm_start_info (ebx={} magic={})",
            Hex(start_info.into()),
            Hex(magic.into())
        );
        ("", 0)
    };
    println!(
        "INFO start_info={} version={} cmdline=\"{cmdline}\"",
        Hex(si),
        Dec(version.into())
    );
    let cfg = Config::parse(cmdline);

    let (apic_mode, apic_id) = interrupts::init_lapic(!cfg.xapic);
    let huge = boot::mapped_limit() == boot::MAPPED_1G;
    println!(
        "INFO apic={apic_mode} apic_id={} map={}GiB pages={}",
        Dec(apic_id.into()),
        Dec(boot::mapped_limit() >> 30),
        if huge { "1G" } else { "2M" }
    );
    let tsc = timer::tsc_hz();
    match tsc {
        Some((hz, source)) => println!("INFO tsc_hz={} source={source}", Dec(hz)),
        None => println!("INFO tsc_hz=unknown (benchmarks report cycles only)"),
    }

    let rsdp = acpi::find_rsdp(rsdp_hint);
    let ecam = rsdp.as_ref().and_then(acpi::find_ecam);
    match (&rsdp, &ecam) {
        (Some(r), Some(e)) => println!(
            "INFO rsdp={} rev={} ecam={} buses={}-{}",
            Hex(r.addr),
            Dec(r.revision.into()),
            Hex(e.base),
            Dec(e.start_bus.into()),
            Dec(e.end_bus.into())
        ),
        (Some(r), None) => println!(
            "INFO rsdp={} rev={} no MCFG: using ports 0xcf8/0xcfc",
            Hex(r.addr),
            Dec(r.revision.into())
        ),
        _ => println!("INFO no RSDP: using ports 0xcf8/0xcfc"),
    }
    let ecam_base = ecam
        .map(|e| e.base)
        .filter(|&base| base + (256 << 20) <= boot::mapped_limit())
        .filter(|_| !cfg.port_io);
    let mut pci = pci::Pci::new(ecam_base);
    pci.reserve_bus0();
    let (functions, n) = virtio::scan(&pci);
    println!("INFO virtio functions: {}", Dec(n as u64));

    let mut ctx = Ctx {
        cfg,
        pci,
        functions,
        apic_id,
        tsc_hz: tsc.map(|(hz, _)| hz),
        report: Report::default(),
        rsdp,
    };
    ctx.report.check(
        "pci-enumerate",
        n > 0,
        format_args!(
            "virtio={} cam={}",
            Dec(n as u64),
            if ecam_base.is_some() { "ecam" } else { "port" }
        ),
    );
    arch::sti();
    match ctx.cfg.selftest {
        // An unmapped address: above what the boot page tables cover.
        "fault" => {
            let addr = boot::MAPPED_1G as *const u64;
            // SAFETY: deliberately faults; the #PF handler ends the run.
            let _ = unsafe { addr.read_volatile() };
        }
        "panic" => panic!("selftest"),
        _ => {}
    }
    if ctx.cfg.hostile {
        let only = ctx.cfg.hostile_only;
        hostile::run(&mut ctx, si, only);
    } else {
        if ctx.cfg.reboot {
            // Returns on the boot after the reset only.
            reboot::run(&mut ctx);
        }
        tests::run(&mut ctx);
    }
    if ctx.cfg.bench {
        bench::run(&mut ctx);
    }
    arch::cli();
    println!(
        "RESULT pass={} fail={}",
        Dec(ctx.report.pass.into()),
        Dec(ctx.report.fail.into())
    );
    exit(ctx.report.fail == 0)
}
