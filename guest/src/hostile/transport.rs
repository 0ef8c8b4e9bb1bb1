//! Hostile use of the common configuration and the notify region, against
//! virtio-blk.
//!
//! What trellis documents (virtio-devices/src/transport/common_config.rs):
//! invalid writes are ignored and the driver reads back the previous value
//! (read-only fields, queue sizes that are zero, not a power of two or above
//! the maximum, misaligned ring addresses, any queue configuration of an
//! enabled queue, fields of a queue that does not exist, driver features
//! after FEATURES_OK, status bits that skip a step or clear others,
//! NEEDS_RESET); `queue_enable` of rings outside RAM leaves the queue
//! disabled; FEATURES_OK is refused for features not offered or without
//! VERSION_1; MSI-X vectors outside the table read back as 0xffff; a failed
//! activation sets NEEDS_RESET and raises the configuration interrupt;
//! notifications for absent or disabled queues are ignored.

use super::blk::HOLE;
use super::dev::*;
use super::{fmt, spin_ms, wait_ms, Action, Hx, Res};
use crate::interrupts;
use crate::serial::{Dec, Hex};
use alloc::string::String;

/// Fails with `what` unless `got == want`.
fn same<T: PartialEq + Into<u64> + Copy>(what: &str, got: T, want: T) -> Res {
    if got == want {
        Ok(String::new())
    } else {
        Err(fmt!(
            "{what}: read {} want {}",
            Hex(got.into()),
            Hex(want.into())
        ))
    }
}

fn queue_size_not_pow2(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    dev.w16(cc::Q_SELECT, 0);
    let max = dev.r16(cc::Q_SIZE);
    for bad in [100, 0, max + 1, 3, max.wrapping_mul(2), 0xffff] {
        dev.w16(cc::Q_SIZE, bad);
        same(&fmt!("size {}", Dec(bad.into())), dev.r16(cc::Q_SIZE), max)?;
    }
    dev.w16(cc::Q_SIZE, QSIZE);
    same("size 16", dev.r16(cc::Q_SIZE), QSIZE)?;
    dev.setup_queue(0, QSIZE)?;
    dev.driver_ok()?;
    dev.good_request()?;
    Ok(fmt!("refused, max={}", Dec(max.into())))
}

fn queue_enable_zero_addr(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    dev.w16(cc::Q_SELECT, 0);
    dev.w16(cc::Q_SIZE, QSIZE);
    for off in [cc::Q_DESC, cc::Q_DRIVER, cc::Q_DEVICE] {
        same("address after reset", dev.r64(off), 0)?;
    }
    dev.w16(cc::Q_ENABLE, 1);
    // Guest-physical 0 is RAM: the rings fit there, so enabling may be
    // accepted; it must not be anything but 0 or 1.
    let enabled = dev.r16(cc::Q_ENABLE);
    if enabled > 1 {
        return Err(fmt!("queue_enable reads {}", Hex(enabled.into())));
    }
    Ok(fmt!("queue_enable={}", Dec(enabled.into())))
}

fn queue_enable_outside_ram(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    dev.w16(cc::Q_SELECT, 0);
    dev.w16(cc::Q_SIZE, QSIZE);
    let (d, a, u) = dev.rings(0);
    let straddle = hx.ram_end - 128;
    for (what, desc, avail, used) in [
        ("desc-in-hole", HOLE, a, u),
        ("avail-in-hole", d, HOLE, u),
        ("used-in-hole", d, a, HOLE),
        ("desc-straddles-ram-end", straddle, a, u),
        ("used-beyond-ram", d, a, hx.ram_end),
    ] {
        dev.w64(cc::Q_DESC, desc);
        dev.w64(cc::Q_DRIVER, avail);
        dev.w64(cc::Q_DEVICE, used);
        dev.w16(cc::Q_ENABLE, 1);
        same(what, dev.r16(cc::Q_ENABLE), 0)?;
    }
    // Misaligned addresses are ignored: the previous value stays.
    dev.w64(cc::Q_DESC, d);
    dev.w64(cc::Q_DESC, d + 8);
    same("desc misaligned", dev.r64(cc::Q_DESC), d)?;
    dev.w64(cc::Q_DRIVER, a);
    dev.w64(cc::Q_DRIVER, a + 1);
    same("avail misaligned", dev.r64(cc::Q_DRIVER), a)?;
    dev.w64(cc::Q_DEVICE, u);
    dev.w64(cc::Q_DEVICE, u + 2);
    same("used misaligned", dev.r64(cc::Q_DEVICE), u)?;
    dev.setup_queue(0, QSIZE)?;
    dev.driver_ok()?;
    dev.good_request()?;
    Ok("refused x5, misaligned ignored".into())
}

fn queue_reconfig_after_enable(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    dev.setup_queue(0, QSIZE)?;
    let (d, a, u) = dev.rings(0);
    let (d2, a2, u2) = dev.rings(1);
    dev.w16(cc::Q_SIZE, 32);
    dev.w64(cc::Q_DESC, d2);
    dev.w64(cc::Q_DRIVER, a2);
    dev.w64(cc::Q_DEVICE, u2);
    dev.w16(cc::Q_ENABLE, 0);
    same("size", dev.r16(cc::Q_SIZE), QSIZE)?;
    same("desc", dev.r64(cc::Q_DESC), d)?;
    same("avail", dev.r64(cc::Q_DRIVER), a)?;
    same("used", dev.r64(cc::Q_DEVICE), u)?;
    same("enable", dev.r16(cc::Q_ENABLE), 1)?;
    dev.driver_ok()?;
    // The same writes on the running queue, then a request on the rings
    // set up first.
    dev.w64(cc::Q_DESC, d2);
    dev.w16(cc::Q_SIZE, 32);
    dev.good_request()?;
    Ok("ignored".into())
}

fn notify_absent_queue(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let base = dev.notify_addr(0);
    // Queue 7 and the last notify address of the region (queue 2047); the
    // value written names queue 0xffff; then odd widths.
    super::mem::poke::<u16>(dev.notify_addr(7), 7);
    super::mem::poke::<u16>(base + 0x1ffc, 0xffff);
    super::mem::poke::<u16>(base, 0xffff);
    super::mem::poke::<u8>(base + 1, 0xff);
    super::mem::poke::<u64>(base + 8, u64::MAX);
    spin_ms(50);
    if dev.pending_used(0) != 0 {
        return Err("used elements without requests".into());
    }
    // Requests on queue 0 are still noticed.
    dev.good_request()?;
    Ok("ignored".into())
}

fn notify_before_driver_ok(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    dev.setup_queue(0, QSIZE)?;
    dev.queue_good();
    dev.kick(0);
    spin_ms(100);
    if dev.pending_used(0) != 0 {
        return Err("request completed before DRIVER_OK".into());
    }
    dev.driver_ok()?;
    dev.kick(0);
    dev.check_good()?;
    Ok("deferred until DRIVER_OK".into())
}

fn features_unoffered(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.w8(cc::STATUS, ACK);
    dev.w8(cc::STATUS, ACK | DRIVER);
    let offered = dev.device_features();
    let unoffered = !offered & (!offered).wrapping_neg();
    for (what, features) in [
        ("unoffered-bit", offered | unoffered),
        ("all-ones", u64::MAX),
        ("no-version-1", offered & !VERSION_1),
    ] {
        dev.set_driver_features(features);
        dev.w8(cc::STATUS, ACK | DRIVER | FEATURES_OK);
        same(what, dev.status(), ACK | DRIVER)?;
    }
    // Select 2 names no feature word: ignored.
    dev.w32(cc::GFSELECT, 2);
    dev.w32(cc::GF, u32::MAX);
    same("driver_feature select 2", dev.r32(cc::GF), 0)?;
    // The driver gives up: FAILED sticks, DRIVER_OK is refused.
    dev.w8(cc::STATUS, ACK | DRIVER | FAILED);
    dev.w8(cc::STATUS, ACK | DRIVER | FAILED | DRIVER_OK);
    same("after FAILED", dev.status(), ACK | DRIVER | FAILED)?;
    Ok(fmt!("refused, unoffered bit {}", Hex(unoffered)))
}

fn status_order(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    for (value, want) in [
        (DRIVER, 0),
        (FEATURES_OK, 0),
        (DRIVER_OK, 0),
        (NEEDS_RESET, 0),
        (ACK, ACK),
        (ACK | DRIVER_OK, ACK),
        (ACK | FEATURES_OK, ACK),
        (ACK | DRIVER, ACK | DRIVER),
        (ACK, ACK | DRIVER),
        (ACK | DRIVER | NEEDS_RESET, ACK | DRIVER),
    ] {
        dev.w8(cc::STATUS, value);
        same(&fmt!("write {}", Hex(value.into())), dev.status(), want)?;
    }
    dev.reset()?;
    // Everything at once: FEATURES_OK fails (no VERSION_1 accepted), so
    // DRIVER_OK fails too.
    dev.w8(cc::STATUS, 0xff);
    same("write 0xff", dev.status(), ACK | DRIVER | FAILED)?;
    Ok("refused".into())
}

fn common_ro_fields(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    dev.w32(cc::DFSELECT, 0);
    let features = dev.r32(cc::DF);
    let generation = dev.r8(cc::CONFIG_GEN);
    dev.w32(cc::DF, !features);
    same("device_feature", dev.r32(cc::DF), features)?;
    dev.w16(cc::NUM_QUEUES, 0x55);
    same("num_queues", dev.r16(cc::NUM_QUEUES), dev.num_queues)?;
    dev.w8(cc::CONFIG_GEN, generation.wrapping_add(1));
    same("config_generation", dev.r8(cc::CONFIG_GEN), generation)?;
    dev.w16(cc::Q_SELECT, 0);
    let notify_off = dev.r16(cc::Q_NOTIFY_OFF);
    dev.w16(cc::Q_NOTIFY_OFF, 0x1234);
    same("queue_notify_off", dev.r16(cc::Q_NOTIFY_OFF), notify_off)?;
    // Past the structure: writes ignored, reads zero.
    for off in [0x3c, 0x40, 0x100, 0xffc] {
        dev.w32(off, u32::MAX);
        same(&fmt!("offset {}", Hex(off)), dev.r32(off), 0)?;
    }
    // The ISR is read-only; device configuration (capacity) too.
    super::mem::poke::<u8>(dev.bar + dev.isr, 0xff);
    let cap_at = dev.bar + dev.devcfg;
    super::mem::poke::<u64>(cap_at, 1);
    same("capacity", super::mem::peek::<u64>(cap_at), dev.capacity)?;
    dev.good_request()?;
    Ok("ignored".into())
}

fn queue_select_absent(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    for q in [dev.num_queues, 7, 0xffff] {
        dev.w16(cc::Q_SELECT, q);
        same("queue_select", dev.r16(cc::Q_SELECT), q)?;
        dev.w16(cc::Q_SIZE, QSIZE);
        dev.w64(cc::Q_DESC, dev.rings(0).0);
        dev.w16(cc::Q_MSIX, 0);
        dev.w16(cc::Q_ENABLE, 1);
        let what = fmt!("queue {}", Hex(q.into()));
        same(&what, dev.r16(cc::Q_SIZE), 0)?;
        same(&what, dev.r64(cc::Q_DESC), 0)?;
        same(&what, dev.r16(cc::Q_ENABLE), 0)?;
        // Documented: every queue field of an absent queue reads 0.
        same(&what, dev.r16(cc::Q_MSIX), 0)?;
    }
    dev.setup_queue(0, QSIZE)?;
    dev.driver_ok()?;
    dev.good_request()?;
    Ok("fields read 0, writes ignored".into())
}

fn msix_vector_out_of_range(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    dev.w16(cc::Q_SELECT, 0);
    let entries = dev.msix_entries;
    for v in [entries, entries + 1, 0x7ff, 0x800, 0xfffe] {
        dev.w16(cc::Q_MSIX, v);
        same(
            &fmt!("queue vector {}", Hex(v.into())),
            dev.r16(cc::Q_MSIX),
            NO_VECTOR,
        )?;
        dev.w16(cc::MSIX_CONFIG, v);
        same(
            &fmt!("config vector {}", Hex(v.into())),
            dev.r16(cc::MSIX_CONFIG),
            NO_VECTOR,
        )?;
    }
    dev.w16(cc::Q_MSIX, entries - 1);
    same("last entry", dev.r16(cc::Q_MSIX), entries - 1)?;
    dev.w16(cc::MSIX_CONFIG, dev.config_entry());
    dev.setup_queue(0, QSIZE)?;
    dev.driver_ok()?;
    dev.good_request()?;
    Ok(fmt!("0xffff for >= {}", Dec(entries.into())))
}

fn driver_ok_no_queue(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    let vector = dev.vector(dev.config_entry());
    let before = interrupts::count(vector);
    let status = dev.status();
    dev.w8(cc::STATUS, status | DRIVER_OK);
    let after = dev.status();
    if after & NEEDS_RESET == 0 {
        return Err(fmt!(
            "activation without queues: status {}",
            Hex(after.into())
        ));
    }
    if !wait_ms(500, || interrupts::count(vector) != before) {
        return Err("NEEDS_RESET without a configuration interrupt".into());
    }
    Ok(fmt!("needs-reset status={}", Hex(after.into())))
}

fn common_odd_access(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    let (d, a, u) = dev.rings(0);
    // queue_select and queue_size in one dword; byte halves of a field;
    // dword halves of a 64-bit address.
    dev.w32(cc::Q_SELECT, u32::from(QSIZE) << 16);
    same("select+size", dev.r16(cc::Q_SIZE), QSIZE)?;
    dev.w8(cc::Q_SIZE + 1, 0);
    dev.w8(cc::Q_SIZE, 8);
    same("byte-wise size", dev.r16(cc::Q_SIZE), 8)?;
    dev.w32(cc::Q_DESC, d as u32);
    dev.w32(cc::Q_DESC + 4, (d >> 32) as u32);
    same("desc halves", dev.r64(cc::Q_DESC), d)?;
    // A 2-byte read across num_queues and device_status.
    let mixed: u16 = super::mem::peek(dev.bar + dev.common + cc::NUM_QUEUES + 1);
    same("straddling read", mixed as u8, (dev.num_queues >> 8) as u8)?;
    dev.w64(cc::Q_DRIVER, a);
    dev.w64(cc::Q_DEVICE, u);
    dev.w16(cc::Q_SIZE, QSIZE);
    dev.setup_queue(0, QSIZE)?;
    dev.driver_ok()?;
    dev.good_request()?;
    Ok("merged".into())
}

macro_rules! blk {
    ($name:literal, $f:ident) => {
        Action {
            name: $name,
            kind: Kind::Blk,
            run: $f,
        }
    };
}

pub const ACTIONS: &[Action] = &[
    blk!("queue-size-not-pow2", queue_size_not_pow2),
    blk!("queue-enable-zero-addr", queue_enable_zero_addr),
    blk!("queue-enable-outside-ram", queue_enable_outside_ram),
    blk!("queue-reconfig-after-enable", queue_reconfig_after_enable),
    blk!("notify-absent-queue", notify_absent_queue),
    blk!("notify-before-driver-ok", notify_before_driver_ok),
    blk!("features-unoffered", features_unoffered),
    blk!("status-order", status_order),
    blk!("common-ro-fields", common_ro_fields),
    blk!("queue-select-absent", queue_select_absent),
    blk!("msix-vector-out-of-range", msix_vector_out_of_range),
    blk!("driver-ok-no-queue", driver_ok_no_queue),
    blk!("common-odd-access", common_odd_access),
];
