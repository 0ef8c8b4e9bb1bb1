//! Hostile chains against virtio-rng, virtio-net and virtio-console.
//!
//! What trellis documents: rng fills the device-writable buffers of a chain
//! with at most 64 KiB (`MAX_BYTES_PER_REQUEST`), stops at a buffer outside
//! RAM and reports the bytes written; net and console validate a chain as a
//! whole before acting on it, so a chain outside RAM, of the wrong
//! direction or too long is completed with length 0 and nothing sent (no
//! half-written frame or console line); transmit chains always complete
//! with length 0; a receive buffer must hold at least the 12-byte header.
//!
//! The console markers below must never reach the console output; the host
//! test (tests/tests/guest_hostile.rs) checks that.

use super::blk::{D, HOLE};
use super::dev::*;
use super::mem::{self, BIG, DATA};
use super::{fmt, spin_ms, wait_ms, Action, Hx, Res};
use crate::serial::{Dec, Hex};
use alloc::string::String;

fn data(slot: u64) -> u64 {
    mem::slot(DATA, slot)
}

/// Puts `chain` at descriptors 0.. of queue `q`, notifies, and returns the
/// used length (the used element must name head 0).
fn submit(dev: &mut Dev, q: u16, chain: &[D]) -> Result<u32, String> {
    for (i, &(addr, len, flags, next)) in chain.iter().enumerate() {
        dev.desc(q, i as u16, addr, len, flags, next);
    }
    dev.push(q, 0);
    dev.kick(q);
    let (id, len) = dev.expect_used(q, 2000)?;
    if id != 0 {
        return Err(fmt!("used id {} for head 0", Dec(id.into())));
    }
    Ok(len)
}

/// Submits each chain, requires used length `want`, then a good request.
fn each_len(dev: &mut Dev, q: u16, chains: &[(&str, &[D])], want: u32) -> Res {
    for &(what, chain) in chains {
        let len = submit(dev, q, chain).map_err(|e| fmt!("{what}: {e}"))?;
        if len != want {
            return Err(fmt!(
                "{what}: used len {} (want {})",
                Dec(len.into()),
                Dec(want.into())
            ));
        }
        dev.good_request().map_err(|e| fmt!("{what}: then {e}"))?;
    }
    Ok(fmt!(
        "len {} x{}",
        Dec(want.into()),
        Dec(chains.len() as u64)
    ))
}

fn rng_mmio(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let own = dev.bar + dev.common;
    each_len(
        dev,
        0,
        &[
            ("hole", &[(HOLE, 64, F_WRITE, 0)]),
            ("beyond-ram", &[(hx.ram_end, 64, F_WRITE, 0)]),
            ("own-bar", &[(own, 64, F_WRITE, 0)]),
        ],
        0,
    )
}

fn rng_huge(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let big = mem::arena(BIG);
    let mut lens = [0u32; 2];
    for (i, chain) in [
        &[(big, u32::MAX, F_WRITE, 0)][..],
        &[
            (big, u32::MAX, F_WRITE | F_NEXT, 1),
            (big, u32::MAX, F_WRITE, 0),
        ][..],
    ]
    .iter()
    .enumerate()
    {
        // Only the 4 KiB past 64 KiB are checked (fills cost time here).
        mem::fill(big + 0x10000, 0x1000, SENTINEL);
        let len = submit(dev, 0, chain)?;
        // Whatever it reports, the device must have stopped at 64 KiB.
        if mem::hash(big + 0x10000, 0x1000) != mem::hash_of_fill(0x1000, SENTINEL) {
            return Err("device wrote past 64 KiB".into());
        }
        if len > 0x10000 {
            return Err(fmt!("used len {}", Hex(len.into())));
        }
        lens[i] = len;
        dev.good_request()?;
    }
    Ok(fmt!(
        "used len {} {}",
        Hex(lens[0].into()),
        Hex(lens[1].into())
    ))
}

fn rng_readable(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    mem::fill(data(0), 512, SENTINEL);
    let r = each_len(dev, 0, &[("readable", &[(data(0), 64, 0, 0)])], 0)?;
    if mem::hash(data(0), 512) != mem::hash_of_fill(512, SENTINEL) {
        return Err("device wrote into a device-readable buffer".into());
    }
    Ok(r)
}

fn rng_loop(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let len = submit(dev, 0, &[(data(0), 64, F_WRITE | F_NEXT, 0)])?;
    // The buffer holds 64 bytes, whatever the chain pretends.
    if len > 64 {
        return Err(fmt!(
            "used len {} for a 64-byte buffer in a loop",
            Dec(len.into())
        ));
    }
    dev.good_request()?;
    Ok(fmt!("used len {}", Dec(len.into())))
}

fn frame(slot: u64) -> u64 {
    let at = data(slot);
    mem::fill(at, 512, 0);
    mem::write_bytes(at + 12, &[0xff; 6]);
    mem::write_bytes(at + 18, &[0x02, 0, 0, 0, 0, 0x01, 0x88, 0xb5]);
    mem::write_bytes(at + 26, b"TRELLIS-HOSTILE-BAD");
    at
}

fn net_tx_huge_header(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(0, QSIZE)?;
    let f = frame(0);
    each_len(
        dev,
        1,
        &[
            ("4GiB", &[(f, u32::MAX, 0, 0)]),
            ("1MiB", &[(f, 1 << 20, 0, 0)]),
            (
                "header-4GiB+frame",
                &[(f, u32::MAX, F_NEXT, 1), (f + 12, 60, 0, 0)],
            ),
        ],
        0,
    )
}

fn net_tx_header_only(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(0, QSIZE)?;
    let f = frame(0);
    each_len(
        dev,
        1,
        &[
            ("header", &[(f, VNET_HDR_LEN, 0, 0)]),
            ("short-header", &[(f, 4, 0, 0)]),
            ("empty", &[(f, 0, 0, 0)]),
            ("writable", &[(f, 72, F_WRITE, 0)]),
        ],
        0,
    )
}

fn net_tx_loop(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(0, QSIZE)?;
    let f = frame(0);
    each_len(dev, 1, &[("loop", &[(f, 72, F_NEXT, 0)])], 0)
}

fn net_rx_short(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(0, QSIZE)?;
    mem::fill(data(0), 8 * 512, SENTINEL);
    for i in 0..8u16 {
        dev.desc(0, i, data(i.into()), 4, F_WRITE, 0);
        dev.push(0, i);
    }
    dev.kick(0);
    // Frames arrive only if the host sends some (the host test does, every
    // few ms); none may be written into buffers that cannot hold the header.
    wait_ms(1000, || dev.pending_used(0) != 0);
    spin_ms(50);
    let mut used = 0;
    while let Some((id, len)) = dev.wait_used(0, 0) {
        used += 1;
        if len != 0 {
            return Err(fmt!(
                "rx chain {} used with len {}",
                Dec(id.into()),
                Dec(len.into())
            ));
        }
    }
    for i in 0..8 {
        if mem::hash(data(i) + 8, 504) != mem::hash_of_fill(504, SENTINEL) {
            return Err(fmt!("rx buffer {} written past its end", Dec(i)));
        }
    }
    dev.good_request()?;
    Ok(fmt!("rx used={}", Dec(used)))
}

/// Console markers: none of these lines may appear in the console output.
const LOOP: &[u8] = b"HOSTILE-CONSOLE-LOOP\n";
const TRUNC: &[u8] = b"HOSTILE-CONSOLE-TRUNC\n";
const HALF: &[u8] = b"HOSTILE-CONSOLE-HALF\n";
const WRONGDIR: &[u8] = b"HOSTILE-CONSOLE-WRONGDIR\n";

fn line(slot: u64, text: &[u8]) -> (u64, u32) {
    let at = data(slot);
    mem::write_bytes(at, text);
    (at, text.len() as u32)
}

fn console_tx_loop(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let (at, len) = line(0, LOOP);
    each_len(dev, 1, &[("loop", &[(at, len, F_NEXT, 0)])], 0)
}

fn console_tx_truncated(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let (at, len) = line(0, TRUNC);
    each_len(dev, 1, &[("next=0x8000", &[(at, len, F_NEXT, 0x8000)])], 0)
}

fn console_tx_mmio(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let (at, len) = line(0, HALF);
    each_len(
        dev,
        1,
        &[
            ("hole", &[(HOLE, 64, 0, 0)]),
            ("line+hole", &[(at, len, F_NEXT, 1), (HOLE, 64, 0, 0)]),
        ],
        0,
    )
}

fn console_tx_writable(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let (at, len) = line(0, WRONGDIR);
    each_len(dev, 1, &[("writable", &[(at, len, F_WRITE, 0)])], 0)
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
    act!("rng-mmio", Rng, rng_mmio),
    act!("rng-huge", Rng, rng_huge),
    act!("rng-readable", Rng, rng_readable),
    act!("rng-loop", Rng, rng_loop),
    act!("rng-avail-idx-jump", Rng, super::blk::avail_idx_jump),
    act!("net-tx-huge-header", Net, net_tx_huge_header),
    act!("net-tx-header-only", Net, net_tx_header_only),
    act!("net-tx-loop", Net, net_tx_loop),
    act!("net-rx-short", Net, net_rx_short),
    act!("console-tx-loop", Console, console_tx_loop),
    act!("console-tx-truncated", Console, console_tx_truncated),
    act!("console-tx-mmio", Console, console_tx_mmio),
    act!("console-tx-writable", Console, console_tx_writable),
];
