//! Hostile PCI configuration: BAR moves onto RAM, onto other BARs and into
//! chipset ranges, a live BAR sizing, garbage in every register of the
//! function, and the virtio PCI configuration access window (cfg_type 5)
//! with impossible windows.
//!
//! What trellis documents (pci/src/configuration.rs, vmm's relocation.rs,
//! transport/pci_device.rs): a BAR move is applied only while decoding is
//! on and the value is not a sizing pattern; the VMM claims the new range
//! from its MMIO windows or refuses, and a refused move is rolled back, so
//! the BAR reads its old address. The configuration window is used only
//! with bar 0, length 1, 2 or 4 and the access inside BAR 0.

use super::dev::*;
use super::{fmt, Action, Hx, Res};
use crate::arch::{outb, outl};
use crate::pci::Pci;
use crate::serial::{Dec, Hex};
use alloc::string::String;
use core::arch::asm;
use virtio_drivers::transport::pci::bus::DeviceFunction;

const CMD_MEM: u32 = 1 << 1;
const CMD_MASTER: u32 = 1 << 2;
const CMD_INTX_DISABLE: u32 = 1 << 10;

fn outw(port: u16, value: u16) {
    // SAFETY: port I/O to the PCI configuration data port; no memory
    // effects visible to Rust.
    unsafe {
        asm!("out dx, ax", in("dx") port, in("ax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Selects `offset` of `df` for the 0xCF8/0xCFC mechanism.
fn cf8(df: DeviceFunction, offset: u8) {
    outl(
        0xcf8,
        0x8000_0000
            | (u32::from(df.bus) << 16)
            | (u32::from(df.device) << 11)
            | (u32::from(df.function) << 8)
            | u32::from(offset & 0xfc),
    );
}

fn cfg_write8(df: DeviceFunction, offset: u8, value: u8) {
    cf8(df, offset);
    outb(0xcfc + u16::from(offset & 3), value);
}

fn cfg_write16(df: DeviceFunction, offset: u8, value: u16) {
    cf8(df, offset);
    outw(0xcfc + u16::from(offset & 2), value);
}

/// Moves BAR 0 the way an OS does (decoding off, both halves, decoding
/// on) and returns where it reads afterwards.
pub(super) fn move_bar(pci: &mut Pci, df: DeviceFunction, to: u64) -> u64 {
    let command = pci.read(df, 4) & 0xffff;
    pci.write(df, 4, command & !CMD_MEM);
    pci.write(df, 0x10, to as u32);
    pci.write(df, 0x14, (to >> 32) as u32);
    pci.write(df, 4, command | CMD_MEM);
    read_bar0(pci, df)
}

/// Moves to each target and requires the BAR to stay where it is, with the
/// device answering there.
///
/// One exception, documented in pci/src/configuration.rs: all ones in the
/// address bits of either half is taken for BAR sizing, never for an
/// address, so a target like 0xffff_0000 is not moved to (the device stays
/// where it was) although the register keeps the value.
fn refused(hx: &mut Hx, dev: &mut Dev, targets: &[(&str, u64)]) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let old = dev.bar;
    for &(what, to) in targets {
        let got = move_bar(hx.pci, dev.df, to);
        if got == to && to as u32 == 0xffff_0000 {
            // The device never left `old`; put the register back.
            if dev.r16(cc::NUM_QUEUES) != dev.num_queues {
                return Err(fmt!("{what}: device gone from {}", Hex(old)));
            }
            if move_bar(hx.pci, dev.df, old) != old {
                return Err(fmt!("{what}: BAR cannot be put back"));
            }
        } else if got != old {
            let back = move_bar(hx.pci, dev.df, old);
            return Err(fmt!(
                "{what}: BAR moved to {} (back: {})",
                Hex(got),
                Hex(back)
            ));
        }
        if dev.r16(cc::NUM_QUEUES) != dev.num_queues {
            return Err(fmt!("{what}: device gone from {}", Hex(old)));
        }
    }
    dev.good_request()?;
    Ok(fmt!("refused x{}", Dec(targets.len() as u64)))
}

fn bar_onto_ram(hx: &mut Hx, dev: &mut Dev) -> Res {
    let top = hx.ram_end - 0x1_0000;
    refused(
        hx,
        dev,
        &[("1MiB", 0x10_0000), ("zero", 0), ("ram-top", top)],
    )
}

fn bar_onto_other(hx: &mut Hx, dev: &mut Dev) -> Res {
    let mut targets: [(&str, u64); 9] = [("none", 0); 9];
    let fixed = [
        ("ecam", 0xe000_0000),
        ("platform", 0xf000_0000),
        ("ioapic", 0xfec0_0000),
        ("lapic", 0xfee0_0000),
        ("top-4GiB", 0xffff_0000),
    ];
    let mut n = 0;
    for (kind, bar) in hx.other_bars() {
        targets[n] = (kind.name(), bar);
        n += 1;
    }
    for t in fixed {
        targets[n] = t;
        n += 1;
    }
    refused(hx, dev, &targets[..n])
}

fn bar_move_free(hx: &mut Hx, dev: &mut Dev) -> Res {
    let old = dev.bar;
    let mut out = String::new();
    for (what, to) in [("mmio32", 0xc800_0000u64), ("mmio64", old + 0x100_0000)] {
        let got = move_bar(hx.pci, dev.df, to);
        if got != to {
            move_bar(hx.pci, dev.df, old);
            return Err(fmt!(
                "{what}: move to {} refused (reads {})",
                Hex(to),
                Hex(got)
            ));
        }
        dev.bar = to;
        // Notify ioeventfds and the MSI-X table must have followed.
        let there = dev.probe();
        // The old place must no longer be the device's.
        let stale: u16 = super::mem::peek(old + dev.common + cc::NUM_QUEUES);
        let back = move_bar(hx.pci, dev.df, old);
        dev.bar = back;
        there.map_err(|e| fmt!("{what}: at {}: {e}", Hex(to)))?;
        if back != old {
            return Err(fmt!("{what}: moving back gave {}", Hex(back)));
        }
        if stale == dev.num_queues {
            return Err(fmt!("{what}: device still answers at {}", Hex(old)));
        }
        out += &fmt!("{what}={} ", Hex(to));
    }
    dev.probe()?;
    Ok(out + "and back")
}

fn bar_move_in_flight(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, 128)?;
    let old = dev.bar;
    let to = 0xc800_0000;
    super::blk::submit_reads(dev);
    let got = move_bar(hx.pci, dev.df, to);
    if got != to {
        move_bar(hx.pci, dev.df, old);
        return Err(fmt!("move to {} refused (reads {})", Hex(to), Hex(got)));
    }
    dev.bar = to;
    let n = super::blk::IN_FLIGHT as u16;
    let finished = super::wait_ms(3000, || dev.used_idx(0) == n);
    let bad = (0..u64::from(n))
        .find(|&i| super::mem::peek::<u8>(super::mem::slot(super::mem::STATUS, i)) != S_OK);
    // Requests after the move: notify and MSI-X at the new address.
    let vector = dev.vector(0);
    let before = crate::interrupts::count(vector);
    let later = (0..n).try_for_each(|_| dev.wait_used(0, 0).map(|_| ()).ok_or(()));
    let good = later
        .map_err(|_| String::from("used ring"))
        .and_then(|_| dev.good_request());
    let irq = super::wait_ms(500, || crate::interrupts::count(vector) != before);
    dev.bar = move_bar(hx.pci, dev.df, old);
    if !finished {
        return Err(fmt!(
            "{} of {} requests completed across the move",
            Dec(dev.used_idx(0).into()),
            Dec(n.into())
        ));
    }
    if let Some(i) = bad {
        return Err(fmt!("request {} failed", Dec(i)));
    }
    good.map_err(|e| fmt!("at {}: {e}", Hex(to)))?;
    if !irq {
        return Err("no interrupt after the move".into());
    }
    if dev.bar != old {
        return Err(fmt!("moving back gave {}", Hex(dev.bar)));
    }
    Ok(fmt!("{} requests across the move", Dec(n.into())))
}

fn extended_config(hx: &mut Hx, dev: &mut Dev) -> Res {
    let Some(ecam) = hx.ecam else {
        return Err("no ECAM".into());
    };
    let df = dev.df;
    let function = ecam
        + (u64::from(df.bus) << 20)
        + (u64::from(df.device) << 15)
        + (u64::from(df.function) << 12);
    // Past the 256 bytes of a conventional function: writes ignored, reads
    // all ones.
    for offset in (0x100..0x1000).step_by(0x40) {
        super::mem::poke::<u32>(function + offset, 0);
        let v = super::mem::peek::<u32>(function + offset);
        if v != u32::MAX {
            return Err(fmt!("offset {} reads {}", Hex(offset), Hex(v.into())));
        }
    }
    // A qword read across the end of the standard space, a qword write
    // across the end of the function.
    let across = super::mem::peek::<u64>(function + 0xfc);
    if across >> 32 != u64::from(u32::MAX) {
        return Err(fmt!("qword at 0xfc reads {}", Hex(across)));
    }
    super::mem::poke::<u64>(function + 0xffc, 0);
    // A function that does not exist (device 31) reads all ones.
    let absent = ecam + (u64::from(df.bus) << 20) + (31 << 15);
    super::mem::poke::<u32>(absent + 4, 0xffff_ffff);
    if super::mem::peek::<u32>(absent) != u32::MAX {
        return Err("absent function answers".into());
    }
    if hx.pci.read(df, 0) & 0xffff != 0x1af4 {
        return Err("vendor ID changed".into());
    }
    dev.init(INDIRECT_DESC, QSIZE)?;
    dev.good_request()?;
    Ok("ignored, all ones".into())
}

/// PCI says a function with Bus Master Enable clear issues no memory
/// requests; trellis does not document either way, so both outcomes pass
/// and the detail says which one happened.
fn bus_master_off(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let command = hx.pci.read(dev.df, 4) & 0xffff;
    hx.pci.write(dev.df, 4, command & !CMD_MASTER);
    dev.queue_good();
    dev.kick(0);
    let served = dev.wait_used(0, 200);
    hx.pci.write(dev.df, 4, command);
    let how = match served {
        Some(_) => "served (DMA not gated)",
        None => {
            dev.kick(0);
            dev.check_good()?;
            "held until bus mastering was back"
        }
    };
    Ok(fmt!("request with bus mastering off: {how}"))
}

fn bar_sizing_live(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let df = dev.df;
    let (lo, hi) = (hx.pci.read(df, 0x10), hx.pci.read(df, 0x14));
    // Decoding stays on, as a careless driver would leave it.
    hx.pci.write(df, 0x10, u32::MAX);
    let size_lo = hx.pci.read(df, 0x10);
    hx.pci.write(df, 0x14, u32::MAX);
    let size_hi = hx.pci.read(df, 0x14);
    hx.pci.write(df, 0x10, lo);
    hx.pci.write(df, 0x14, hi);
    let now = read_bar0(hx.pci, df);
    if now != dev.bar {
        return Err(fmt!("BAR reads {} after sizing", Hex(now)));
    }
    if size_lo != 0xffff_0004 || size_hi != u32::MAX {
        return Err(fmt!(
            "sizing read {} {}",
            Hex(size_lo.into()),
            Hex(size_hi.into())
        ));
    }
    dev.good_request()?;
    Ok("size 64KiB, no move".into())
}

fn config_garbage(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let df = dev.df;
    let pci = &mut *hx.pci;
    let (lo, hi) = (pci.read(df, 0x10), pci.read(df, 0x14));
    let id = pci.read(df, 0);
    for pattern in [u32::MAX, 0, 0xa5a5_a5a5, 0x5a5a_5a5a, CMD_MEM] {
        for offset in (0..=0xfcu8).step_by(4) {
            pci.write(df, offset, pattern);
            // Reads have side effects too (the configuration window).
            pci.read(df, offset);
        }
    }
    for offset in 0..=0xffu8 {
        cfg_write8(df, offset, 0xff);
    }
    for offset in (0..=0xfeu8).step_by(2) {
        cfg_write16(df, offset, 0x5a5a);
    }
    let moved_to = read_bar0(pci, df);
    // Restore what a driver owns: BAR, command, MSI-X control, window.
    pci.write(df, 4, 0);
    pci.write(df, 0x10, lo);
    pci.write(df, 0x14, hi);
    pci.write(df, 4, CMD_MEM | CMD_MASTER | CMD_INTX_DISABLE);
    dev.set_msix_control(pci, 1 << 15);
    if dev.cfg_cap != 0 {
        for field in [4u8, 8, 12, 16] {
            pci.write(df, dev.cfg_cap + field, 0);
        }
    }
    for entry in 0..dev.msix_entries.min(8) {
        dev.restore_msix_entry(entry, hx.apic_id);
    }
    if pci.read(df, 0) != id {
        return Err("vendor/device ID changed".into());
    }
    let now = read_bar0(pci, df);
    if now != dev.bar {
        return Err(fmt!("BAR reads {} after restoring", Hex(now)));
    }
    Ok(fmt!("BAR had moved to {}", Hex(moved_to)))
}

/// Programs the configuration access window.
fn window(pci: &mut Pci, dev: &Dev, bar: u8, offset: u32, length: u32) {
    pci.write(dev.df, dev.cfg_cap + 4, bar.into());
    pci.write(dev.df, dev.cfg_cap + 8, offset);
    pci.write(dev.df, dev.cfg_cap + 12, length);
}

fn cfg_window(hx: &mut Hx, dev: &mut Dev) -> Res {
    if dev.cfg_cap == 0 {
        return Err("no PCI configuration access capability".into());
    }
    let data = dev.cfg_cap + 16;
    let common = dev.common as u32;
    let status = common + cc::STATUS as u32;
    dev.reset()?;
    dev.w8(cc::STATUS, ACK);
    window(hx.pci, dev, 0, common + cc::NUM_QUEUES as u32, 2);
    let queues = hx.pci.read(dev.df, data) as u16;
    if queues != dev.num_queues {
        return Err(fmt!("window read num_queues={}", Dec(queues.into())));
    }
    // Each of these would reset the device if the write went through.
    for (what, bar, offset, length) in [
        ("bar=5", 5, status, 1),
        ("offset-beyond-bar", 0, status + 0x1_0000, 1),
        ("straddling-bar-end", 0, 0xffff, 2),
        ("offset-near-4GiB", 0, u32::MAX - 3, 4),
        ("length=3", 0, status, 3),
        ("length=0", 0, status, 0),
        ("length=8", 0, status, 8),
        ("length=max", 0, status, u32::MAX),
    ] {
        window(hx.pci, dev, bar, offset, length);
        hx.pci.write(dev.df, data, 0);
        hx.pci.read(dev.df, data);
        if dev.status() != ACK {
            return Err(fmt!("{what}: status {}", Hex(dev.status().into())));
        }
    }
    // A valid window works both ways: a status write resets the device...
    window(hx.pci, dev, 0, status, 1);
    hx.pci.write(dev.df, data, 0);
    if dev.status() != 0 {
        return Err("valid window write did not reach device_status".into());
    }
    // ...and a notification through configuration space is served.
    dev.init(INDIRECT_DESC, QSIZE)?;
    dev.queue_good();
    window(hx.pci, dev, 0, (dev.notify_addr(0) - dev.bar) as u32, 2);
    hx.pci.write(dev.df, data, 0);
    let served = dev.check_good();
    window(hx.pci, dev, 0, 0, 0);
    served.map_err(|e| fmt!("notify through the window: {e}"))?;
    Ok("invalid windows ignored x8, valid read/write/notify".into())
}

pub const ACTIONS: &[Action] = &[
    Action {
        name: "pci-bar-onto-ram",
        kind: Kind::Blk,
        run: bar_onto_ram,
    },
    Action {
        name: "pci-bar-onto-other-bar",
        kind: Kind::Blk,
        run: bar_onto_other,
    },
    Action {
        name: "pci-bar-move-free",
        kind: Kind::Blk,
        run: bar_move_free,
    },
    Action {
        name: "pci-bar-move-in-flight",
        kind: Kind::Blk,
        run: bar_move_in_flight,
    },
    Action {
        name: "pci-extended-config",
        kind: Kind::Blk,
        run: extended_config,
    },
    Action {
        name: "pci-bus-master-off",
        kind: Kind::Blk,
        run: bus_master_off,
    },
    Action {
        name: "pci-bar-sizing-live",
        kind: Kind::Blk,
        run: bar_sizing_live,
    },
    Action {
        name: "pci-config-garbage-blk",
        kind: Kind::Blk,
        run: config_garbage,
    },
    Action {
        name: "pci-config-garbage-rng",
        kind: Kind::Rng,
        run: config_garbage,
    },
    Action {
        name: "pci-cfg-window",
        kind: Kind::Blk,
        run: cfg_window,
    },
];
