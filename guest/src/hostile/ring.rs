//! Hostile use of the queue lifecycle: a queue reset (VIRTIO_F_RING_RESET)
//! with requests in flight, event-index fields full of garbage, used and
//! available rings on top of each other, notification storms, status
//! writes after DRIVER_OK, and a queue enabled after DRIVER_OK.
//!
//! What trellis documents (transport/common_config.rs, queue.rs): a queue
//! reset completes before the write returns (`queue_reset` reads 0), leaves
//! the queue disabled with its vector cleared, and is ignored without the
//! feature; a queue enabled after DRIVER_OK is handed to the device, and if
//! the device cannot take it (console has no queue restart) NEEDS_RESET is
//! set with a configuration interrupt; used_event is honoured exactly
//! (virtio 1.2 2.7.10).

use super::blk::{quiet_after_reset, submit_reads, HOLE};
use super::dev::*;
use super::mem::peek;
use super::{fmt, spin_ms, wait_ms, Action, Hx, Res};
use crate::interrupts;
use crate::serial::{Dec, Hex};
use alloc::string::String;

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

fn queue_reset_in_flight(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    let features = dev.negotiate(INDIRECT_DESC | RING_RESET)?;
    if features & RING_RESET == 0 {
        return Err("VIRTIO_F_RING_RESET not offered".into());
    }
    dev.setup_queue(0, 128)?;
    dev.driver_ok()?;
    submit_reads(dev);
    dev.w16(cc::Q_SELECT, 0);
    let start = crate::arch::rdtsc();
    dev.w16(cc::Q_RESET, 1);
    let took = super::ms_since(start);
    if !wait_ms(500, || dev.r16(cc::Q_RESET) == 0) {
        return Err("queue_reset does not read back 0".into());
    }
    same("queue_enable after queue reset", dev.r16(cc::Q_ENABLE), 0)?;
    same("vector after queue reset", dev.r16(cc::Q_MSIX), NO_VECTOR)?;
    let done = quiet_after_reset(dev)?;
    // Re-enabled with rings outside RAM: refused, the device runs on.
    dev.w16(cc::Q_SIZE, QSIZE);
    dev.w64(cc::Q_DESC, HOLE);
    dev.w16(cc::Q_ENABLE, 1);
    same("enable with rings in the hole", dev.r16(cc::Q_ENABLE), 0)?;
    same(
        "status",
        dev.status(),
        ACK | DRIVER | FEATURES_OK | DRIVER_OK,
    )?;
    // Set up again properly, while the device runs.
    dev.setup_queue(0, QSIZE)?;
    dev.good_request()?;
    Ok(fmt!(
        "completed-before-reset={} reset-ms={}",
        Dec(done.into()),
        Dec(took)
    ))
}

fn queue_reset_without_feature(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    dev.w16(cc::Q_SELECT, 0);
    dev.w16(cc::Q_RESET, 1);
    same("queue_enable", dev.r16(cc::Q_ENABLE), 1)?;
    same("vector", dev.r16(cc::Q_MSIX), 0)?;
    dev.good_request()?;
    Ok("ignored".into())
}

fn event_idx_garbage(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    if dev.negotiate(INDIRECT_DESC | EVENT_IDX)? & EVENT_IDX == 0 {
        return Err("VIRTIO_F_EVENT_IDX not offered".into());
    }
    dev.setup_queue(0, QSIZE)?;
    dev.driver_ok()?;
    let vector = dev.vector(0);
    // used_event far away and every avail flag set: completions must still
    // land (we poll); interrupts may be suppressed.
    dev.set_used_event(0, 0x7fff);
    dev.set_avail_flags(0, 0xffff);
    let before = interrupts::count(vector);
    for _ in 0..3 {
        dev.good_request()?;
    }
    spin_ms(20);
    let suppressed = interrupts::count(vector) - before;
    let (_, _, used) = dev.rings(0);
    let avail_event: u16 = peek(used + 4 + 8 * u64::from(QSIZE));
    // Asking properly for the next completion must interrupt.
    dev.set_used_event(0, dev.last_used(0));
    let before = interrupts::count(vector);
    dev.good_request()?;
    if !wait_ms(500, || interrupts::count(vector) != before) {
        return Err("no interrupt although used_event asked for it".into());
    }
    Ok(fmt!(
        "irqs-while-garbage={} avail_event={}",
        Dec(suppressed),
        Dec(avail_event.into())
    ))
}

fn rings_overlap(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    let (d, a, _) = dev.rings(0);
    // The used ring on top of the available ring.
    dev.setup_queue_at(0, QSIZE, (d, a, a))?;
    dev.driver_ok()?;
    dev.queue_good();
    dev.kick(0);
    spin_ms(100);
    let idx: u16 = peek(a + 2);
    let id: u32 = peek(a + 4);
    let how = if idx == 1 && id == u32::from(GOOD_DESC) {
        "completed over the avail ring"
    } else {
        "not completed"
    };
    Ok(fmt!(
        "{how} (idx={} id={})",
        Dec(idx.into()),
        Dec(id.into())
    ))
}

fn notify_storm(_: &mut Hx, dev: &mut Dev) -> Res {
    const KICKS: u64 = 5000;
    dev.init(INDIRECT_DESC, QSIZE)?;
    for _ in 0..KICKS {
        dev.kick(0);
    }
    spin_ms(20);
    if dev.pending_used(0) != 0 {
        return Err("used elements without requests".into());
    }
    dev.good_request()?;
    Ok(fmt!("{} notifications", Dec(KICKS)))
}

fn status_after_driver_ok(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let running = ACK | DRIVER | FEATURES_OK | DRIVER_OK;
    dev.w32(cc::GFSELECT, 0);
    let features = dev.r32(cc::GF);
    dev.w32(cc::GF, !features);
    same(
        "driver_feature after FEATURES_OK",
        dev.r32(cc::GF),
        features,
    )?;
    dev.w8(cc::STATUS, running);
    dev.w8(cc::STATUS, ACK);
    dev.w16(cc::Q_SELECT, 0);
    dev.w16(cc::Q_ENABLE, 1);
    same("status", dev.status(), running)?;
    dev.good_request()?;
    // The driver gives up while the device runs: FAILED sticks; whether
    // the device still serves the queue is its choice.
    dev.w8(cc::STATUS, running | FAILED);
    same("status with FAILED", dev.status(), running | FAILED)?;
    dev.queue_good();
    dev.kick(0);
    let served = dev.wait_used(0, 200).is_some();
    Ok(fmt!(
        "after FAILED: {}",
        if served { "still served" } else { "stopped" }
    ))
}

fn late_queue_enable(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.reset()?;
    dev.negotiate(INDIRECT_DESC)?;
    dev.setup_queue(0, QSIZE)?;
    dev.driver_ok()?;
    let config = dev.vector(dev.config_entry());
    let before = interrupts::count(config);
    // The transmit queue, set up only now.
    match dev.setup_queue(1, QSIZE) {
        Ok(_) => {
            dev.good_request()?;
            Ok("accepted, transmit works".into())
        }
        Err(_) => {
            let st = dev.status();
            if st & NEEDS_RESET == 0 {
                return Err(fmt!(
                    "refused without NEEDS_RESET: status {}",
                    Hex(st.into())
                ));
            }
            if !wait_ms(500, || interrupts::count(config) != before) {
                return Err("NEEDS_RESET without a configuration interrupt".into());
            }
            Ok(fmt!("refused, status={}", Hex(st.into())))
        }
    }
}

macro_rules! act {
    ($name:literal, $kind:ident, $f:path) => {
        Action {
            name: $name,
            kind: Kind::$kind,
            run: $f,
        }
    };
}

pub const ACTIONS: &[Action] = &[
    act!("blk-queue-reset-in-flight", Blk, queue_reset_in_flight),
    act!(
        "queue-reset-without-feature",
        Blk,
        queue_reset_without_feature
    ),
    act!("blk-event-idx-garbage", Blk, event_idx_garbage),
    act!("blk-rings-overlap", Blk, rings_overlap),
    act!("notify-storm", Blk, notify_storm),
    act!("status-after-driver-ok", Blk, status_after_driver_ok),
    act!("console-late-queue-enable", Console, late_queue_enable),
];
