//! `mode=reboot`: a guest reset must reboot the machine, with what the
//! guest wrote to its disk still there.
//!
//! The disk tells the boots apart. Without the marker at [`MARK_SECTOR`]
//! (the first boot) the guest writes it, flushes, sends a console line if
//! there is a console, prints the NIC's MAC if there is a NIC (it must not
//! change across the reboot), and resets the machine: the i8042 reset line
//! (`reset=kbd`, the default) or the FADT's reset register (`reset=acpi`).
//! It never returns then. With the marker (the boot after the reset) it
//! reports `TEST reboot-marker ok` and returns, and the normal checks run,
//! so the rebuilt devices are checked too.

use crate::hal::GuestHal;
use crate::serial::{Dec, Hex, Mac};
use crate::virtio::{self, IrqTransport};
use crate::{acpi, arch, exit, println, Ctx};
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::DeviceType;

/// Where the marker goes: after the sectors the checks write (64..71).
pub const MARK_SECTOR: usize = 128;
/// The marker starts with this, followed by the reset method and `\n`.
pub const MARK: &[u8] = b"TRELLIS-REBOOT-MARK ";
/// Sent on the virtio console by the first boot.
pub const CONSOLE_LINE: &[u8] = b"TRELLIS-REBOOT-FIRST-BOOT\n";
/// TSC cycles to wait for the reset to take effect before calling it a
/// failure (~13 s at 2.6 GHz). The VMM stops this vCPU asynchronously, and
/// a loaded host can take well over a second to get to it.
const RESET_WAIT_CYCLES: u64 = 1 << 35;

/// How the first boot resets the machine.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ResetMethod {
    /// 0xfe to port 0x64: pulse the reset line (Linux's `reboot=k`).
    Kbd,
    /// The FADT's RESET_REG (Linux's `reboot=a`).
    Acpi,
}

impl ResetMethod {
    pub fn parse(value: &str) -> Self {
        match value {
            "acpi" => ResetMethod::Acpi,
            _ => ResetMethod::Kbd,
        }
    }

    fn name(self) -> &'static str {
        match self {
            ResetMethod::Kbd => "kbd",
            ResetMethod::Acpi => "acpi",
        }
    }
}

/// Fails the run with `TEST <name> FAIL <reason>`: there is nothing to
/// go on with.
fn fail(ctx: &mut Ctx, name: &str, reason: impl core::fmt::Display) -> ! {
    ctx.report.fail(name, reason);
    arch::cli();
    println!(
        "RESULT pass={} fail={}",
        Dec(ctx.report.pass.into()),
        Dec(ctx.report.fail.into())
    );
    exit(false)
}

/// See the module documentation: returns on the second boot only.
pub fn run(ctx: &mut Ctx) {
    let method = ctx.cfg.reset;
    let Some(f) = ctx.find(DeviceType::Block) else {
        fail(ctx, "reboot-marker", "no virtio-blk device");
    };
    let transport = match virtio::open(&mut ctx.pci, &f, 1, false, ctx.apic_id) {
        Ok(t) => t,
        Err(e) => fail(ctx, "reboot-marker", e),
    };
    let mut dev = match VirtIOBlk::<GuestHal, IrqTransport>::new(transport) {
        Ok(dev) => dev,
        Err(e) => fail(ctx, "reboot-marker", e),
    };
    let mut sector = [0u8; SECTOR_SIZE];
    if let Err(e) = dev.read_blocks(MARK_SECTOR, &mut sector) {
        fail(ctx, "reboot-marker", e);
    }
    if let Some(rest) = sector.strip_prefix(MARK) {
        let found = rest.split(|&b| b == b'\n').next().unwrap_or_default();
        let found = core::str::from_utf8(found).unwrap_or("?");
        ctx.report.check(
            "reboot-marker",
            found == method.name(),
            format_args!("sector={} reset={found}", Dec(MARK_SECTOR as u64)),
        );
        // The checks open the disk again.
        drop(dev);
        return;
    }

    // First boot: leave the marker on the disk, and a line on the console.
    sector.fill(0);
    sector[..MARK.len()].copy_from_slice(MARK);
    let name = method.name().as_bytes();
    sector[MARK.len()..MARK.len() + name.len()].copy_from_slice(name);
    sector[MARK.len() + name.len()] = b'\n';
    if let Err(e) = dev.write_blocks(MARK_SECTOR, &sector) {
        fail(ctx, "reboot-write", e);
    }
    if let Err(e) = dev.flush() {
        fail(ctx, "reboot-flush", e);
    }
    let mut back = [0u8; SECTOR_SIZE];
    if dev.read_blocks(MARK_SECTOR, &mut back).is_err() || back != sector {
        fail(ctx, "reboot-write", "the marker did not read back");
    }
    println!(
        "REBOOT marker written at sector {}",
        Dec(MARK_SECTOR as u64)
    );
    console_line(ctx);
    print_mac(ctx);

    arch::cli();
    match method {
        ResetMethod::Kbd => {
            println!("REBOOT resetting through the i8042");
            arch::outb(0x64, 0xfe);
        }
        ResetMethod::Acpi => {
            let Some((port, value)) = ctx.rsdp.as_ref().and_then(acpi::find_reset_port) else {
                fail(ctx, "reboot-reset", "no FADT reset register in I/O space");
            };
            println!(
                "REBOOT resetting through the FADT reset register (port {}, value {})",
                Hex(port.into()),
                Hex(value.into())
            );
            arch::outb(port, value);
        }
    }
    // Still running long after means the machine did not reset. The
    // iteration cap covers a TSC that does not advance.
    let start = arch::rdtsc();
    for _ in 0..1_000_000_000u32 {
        if arch::rdtsc().wrapping_sub(start) > RESET_WAIT_CYCLES {
            break;
        }
        core::hint::spin_loop();
    }
    fail(ctx, "reboot-reset", "the machine did not reset")
}

/// Sends [`CONSOLE_LINE`] if there is a console: the host checks it is
/// still in the console file after the reboot.
fn console_line(ctx: &mut Ctx) {
    let Some(f) = ctx.find(DeviceType::Console) else {
        return;
    };
    let Ok(t) = virtio::open(&mut ctx.pci, &f, 2, false, ctx.apic_id) else {
        println!("REBOOT console unavailable");
        return;
    };
    match VirtIOConsole::<GuestHal, IrqTransport>::new(t) {
        Ok(mut dev) => {
            match dev.send_bytes(CONSOLE_LINE) {
                Ok(()) => println!("REBOOT console line sent"),
                Err(e) => println!("REBOOT console line not sent: {e}"),
            }
            // Not reset: the machine's reset is the next thing to happen.
            core::mem::forget(dev);
        }
        Err(e) => println!("REBOOT console unavailable: {e}"),
    }
}

/// Prints `REBOOT net mac=...` if there is a NIC: the host compares it with
/// what the second boot's `net-init` reports.
fn print_mac(ctx: &mut Ctx) {
    let Some(f) = ctx.find(DeviceType::Network) else {
        return;
    };
    let Ok(t) = virtio::open(&mut ctx.pci, &f, 2, false, ctx.apic_id) else {
        println!("REBOOT net unavailable");
        return;
    };
    match VirtIONetRaw::<GuestHal, IrqTransport, 16>::new(t) {
        Ok(dev) => {
            let mac = dev.mac_address();
            println!("REBOOT net mac={}", Mac(mac));
            core::mem::forget(dev);
        }
        Err(e) => println!("REBOOT net unavailable: {e}"),
    }
}
