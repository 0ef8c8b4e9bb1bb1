//! Log floods: the same bad request, repeated hundreds or thousands of
//! times, on paths where trellis logs once per request. Each action counts
//! what it did in its detail (`bad-heads=N`, `refused-moves=N`, `moves=N`)
//! so the host can check that its log stayed bounded and that the
//! suppressed-message counts it printed add up to exactly these numbers
//! (tests/tests/guest_log_flood.rs).
//!
//! What trellis documents: an available ring entry naming no descriptor is
//! skipped (virtio-devices/src/queue.rs); a BAR move the VMM cannot claim
//! is rolled back (pcifn.rs); a BAR move it can claim is applied.

use super::dev::*;
use super::pcifn::move_bar;
use super::{fmt, Action, Hx, Res};
use crate::serial::{Dec, Hex};

/// Rounds of `avail_heads`; each makes QSIZE - 1 bad entries available.
const HEAD_ROUNDS: u64 = 100;
/// Refused BAR moves in `bar_refused`.
const REFUSED_MOVES: u64 = 1000;
/// Round trips in `bar_moves` (two moves each).
const ROUND_TRIPS: u64 = 100;

/// Fills the available ring with heads beyond the queue, then a good
/// request, and kicks once per round: each bad head is logged by trellis
/// and by the virtio-queue crate.
fn avail_heads(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let mut bad = 0u64;
    for round in 0..HEAD_ROUNDS {
        for i in 0..QSIZE - 1 {
            // Different indices each time: "similar" means the same call
            // site, not the same text.
            dev.push(0, QSIZE + i + (round % 64) as u16);
            bad += 1;
        }
        dev.good_request()
            .map_err(|e| fmt!("round {}: {e}", Dec(round)))?;
        if dev.pending_used(0) != 0 {
            return Err(fmt!("round {}: extra used elements", Dec(round)));
        }
    }
    Ok(fmt!("bad-heads={}", Dec(bad)))
}

/// Moves BAR 0 onto guest RAM over and over; every move is refused.
fn bar_refused(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let old = dev.bar;
    for i in 0..REFUSED_MOVES {
        let got = move_bar(hx.pci, dev.df, 0x10_0000);
        if got != old {
            dev.bar = move_bar(hx.pci, dev.df, old);
            return Err(fmt!("move {}: BAR reads {}", Dec(i), Hex(got)));
        }
    }
    dev.good_request()?;
    Ok(fmt!("refused-moves={}", Dec(REFUSED_MOVES)))
}

/// Moves BAR 0 to a free address and back, over and over; each move is
/// applied (and logged at info level).
fn bar_moves(hx: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let old = dev.bar;
    let to = 0xc800_0000;
    for i in 0..ROUND_TRIPS {
        for target in [to, old] {
            let got = move_bar(hx.pci, dev.df, target);
            if got != target {
                dev.bar = move_bar(hx.pci, dev.df, old);
                return Err(fmt!(
                    "round trip {}: move to {} reads {}",
                    Dec(i),
                    Hex(target),
                    Hex(got)
                ));
            }
        }
    }
    dev.good_request()?;
    Ok(fmt!("moves={}", Dec(2 * ROUND_TRIPS)))
}

pub const ACTIONS: &[Action] = &[
    Action {
        name: "flood-avail-heads",
        kind: Kind::Blk,
        run: avail_heads,
    },
    Action {
        name: "flood-bar-refused",
        kind: Kind::Blk,
        run: bar_refused,
    },
    Action {
        name: "flood-bar-moves",
        kind: Kind::Blk,
        run: bar_moves,
    },
];
