//! Hostile descriptor chains against virtio-blk.
//!
//! What trellis documents (virtio-devices/src/block/request.rs): a chain is
//! split into a readable and a writable stream; the status byte is the last
//! byte of the writable stream. A chain cut short (loop, next index out of
//! range, unreadable descriptor or indirect table, lengths overflowing u32)
//! or without a status byte in RAM is "dropped": put on the used ring with
//! length 0 and nothing performed. Any other malformed request completes
//! with IOERR (length 1) and touches no data; unknown types with UNSUPP.
//! A queue whose available index is impossible is stopped until reset.

use super::dev::*;
use super::mem::{self, DATA, HDR, IND, STATUS};
use super::{fmt, spin_ms, wait_ms, Action, Hx, Res};
use crate::interrupts;
use crate::serial::{Dec, Hex};
use alloc::string::String;

/// In the 32-bit MMIO window of trellis' layout, where nothing is mapped.
pub const HOLE: u64 = 0xd000_0000;
pub const LAPIC: u64 = 0xfee0_0000;
pub const ECAM: u64 = 0xe000_0000;

/// A descriptor: (address, length, flags, next).
pub type D = (u64, u32, u16, u16);

/// What a hostile chain must lead to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// On the used ring with length 0, status byte and data untouched.
    Dropped,
    /// Status byte `.0` in slot 0, used length `.1`.
    Status(u8, u32),
}

fn hdr() -> u64 {
    mem::slot(HDR, 0)
}
fn data() -> u64 {
    mem::slot(DATA, 0)
}
fn status() -> u64 {
    mem::slot(STATUS, 0)
}

/// A read of sector 0 into slot 0 whose data descriptor is `data`.
fn read_with(data: (u64, u32)) -> [D; 3] {
    [
        (hdr(), 16, F_NEXT, 1),
        (data.0, data.1, F_WRITE | F_NEXT, 2),
        (status(), 1, F_WRITE, 0),
    ]
}

/// Sentinels into the data and status bytes of slots 0-3.
fn prepare() {
    mem::fill(data(), 4 * 512, SENTINEL);
    mem::fill(status(), 8, SENTINEL);
}

/// `prepare`, then the chain at descriptors 0.., made available and
/// notified; returns the used element (which must name head 0).
fn submit(dev: &mut Dev, chain: &[D]) -> Result<(u32, u32), String> {
    prepare();
    submit_as_is(dev, chain)
}

fn submit_as_is(dev: &mut Dev, chain: &[D]) -> Result<(u32, u32), String> {
    for (i, &(addr, len, flags, next)) in chain.iter().enumerate() {
        dev.desc(0, i as u16, addr, len, flags, next);
    }
    dev.push(0, 0);
    dev.kick(0);
    let (id, len) = dev.expect_used(0, 2000)?;
    if id != 0 {
        return Err(fmt!("used id {} for head 0", Dec(id.into())));
    }
    Ok((id, len))
}

fn data_untouched() -> bool {
    mem::hash(data(), 4 * 512) == mem::hash_of_fill(4 * 512, SENTINEL)
}

/// Submits `chain` and checks the outcome against `want` and that the
/// data buffers stayed untouched, then sends a good request behind it.
fn expect(dev: &mut Dev, what: &str, chain: &[D], want: Want) -> Res {
    let (_, len) = submit(dev, chain).map_err(|e| fmt!("{what}: {e}"))?;
    let st = mem::peek::<u8>(status());
    let ok = match want {
        Want::Dropped => len == 0 && st == SENTINEL,
        Want::Status(s, l) => len == l && st == s,
    };
    if !ok {
        return Err(fmt!(
            "{what}: used len {} status {}",
            Dec(len.into()),
            Hex(st.into())
        ));
    }
    if !data_untouched() {
        return Err(fmt!("{what}: device wrote into the data buffer"));
    }
    dev.good_request().map_err(|e| fmt!("{what}: then {e}"))
}

fn start(dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    super::dev::blk_header(0, T_IN, 0);
    Ok(String::new())
}

fn loop_self(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    expect(dev, "self-loop", &[(hdr(), 16, F_NEXT, 0)], Want::Dropped)?;
    Ok("dropped".into())
}

fn loop_2cycle(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let chain = [(hdr(), 16, F_NEXT, 1), (data(), 512, F_WRITE | F_NEXT, 0)];
    expect(dev, "2-cycle", &chain, Want::Dropped)?;
    Ok("dropped".into())
}

fn next_out_of_range(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let chain = [
        (hdr(), 16, F_NEXT, 1),
        (data(), 512, F_WRITE | F_NEXT, 0x8000),
    ];
    expect(dev, "next=0x8000", &chain, Want::Dropped)?;
    expect(
        dev,
        "next=qsize",
        &[(hdr(), 16, F_NEXT, QSIZE)],
        Want::Dropped,
    )?;
    Ok("dropped".into())
}

fn data_in_mmio(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let own_bar = dev.bar + dev.common;
    for (what, addr) in [
        ("hole", HOLE),
        ("lapic", LAPIC),
        ("ecam", ECAM),
        ("own-bar", own_bar),
    ] {
        expect(dev, what, &read_with((addr, 512)), Want::Status(S_IOERR, 1))?;
    }
    // Nothing of the device's own BAR was overwritten by a DMA.
    if dev.r16(cc::NUM_QUEUES) != dev.num_queues {
        return Err("own common config changed".into());
    }
    Ok("ioerr x4".into())
}

fn header_in_mmio(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let mut chain = read_with((data(), 512));
    chain[0].0 = HOLE;
    expect(dev, "header", &chain, Want::Status(S_IOERR, 1))?;
    Ok("ioerr".into())
}

fn status_in_mmio(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let mut chain = read_with((data(), 512));
    chain[2].0 = HOLE;
    expect(dev, "status", &chain, Want::Dropped)?;
    Ok("dropped".into())
}

fn data_beyond_ram(hx: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let end = hx.ram_end;
    // The straddling buffer's part in RAM must stay as it was.
    let below = end - 256;
    mem::fill(below, 256, SENTINEL);
    for (what, addr) in [
        ("at-end", end),
        ("straddling", below),
        ("1TiB", 1 << 40),
        ("wrapping", u64::MAX - 255),
    ] {
        expect(dev, what, &read_with((addr, 512)), Want::Status(S_IOERR, 1))?;
    }
    if mem::hash(below, 256) != mem::hash_of_fill(256, SENTINEL) {
        return Err("RAM below the end was written".into());
    }
    Ok("ioerr x4".into())
}

fn zero_length(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    expect(dev, "data", &read_with((data(), 0)), Want::Status(S_OK, 1))?;
    let mut chain = read_with((data(), 512));
    chain[0].1 = 0;
    expect(dev, "header", &chain, Want::Status(S_IOERR, 1))?;
    // A zero-length status descriptor: the last writable byte is the end
    // of the data buffer, and a 511-byte read is malformed.
    chain = read_with((data(), 512));
    chain[2].1 = 0;
    let (_, len) = submit(dev, &chain)?;
    let last = mem::peek::<u8>(data() + 511);
    if len != 1 || last != S_IOERR || mem::peek::<u8>(status()) != SENTINEL {
        return Err(fmt!(
            "zero-length status: len {} last data byte {}",
            Dec(len.into()),
            Hex(last.into())
        ));
    }
    dev.good_request()?;
    Ok("ok/ioerr/ioerr".into())
}

fn huge_length(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    // 16 + 0xffffffff bytes overflow the chain's u32 length: cut short.
    expect(
        dev,
        "data-4GiB",
        &read_with((data(), u32::MAX)),
        Want::Dropped,
    )?;
    let mut chain = read_with((data(), 512));
    chain[0].1 = u32::MAX;
    expect(dev, "header-4GiB", &chain, Want::Dropped)?;
    expect(
        dev,
        "read-2GiB",
        &read_with((data(), 1 << 31)),
        Want::Status(S_IOERR, 1),
    )?;
    super::dev::blk_header(0, T_OUT, 0);
    let write = [
        (hdr(), 16, F_NEXT, 1),
        (data(), 1 << 31, F_NEXT, 2),
        (status(), 1, F_WRITE, 0),
    ];
    expect(dev, "write-2GiB", &write, Want::Status(S_IOERR, 1))?;
    Ok("dropped x2, ioerr x2".into())
}

fn header_only(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    expect(dev, "header", &[(hdr(), 16, 0, 0)], Want::Dropped)?;
    let chain = [(hdr(), 16, F_NEXT, 1), (status(), 1, 0, 0)];
    expect(dev, "readable-status", &chain, Want::Dropped)?;
    Ok("dropped".into())
}

fn status_readonly(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let mut chain = read_with((data(), 512));
    chain[2].2 = 0;
    let (_, len) = submit(dev, &chain)?;
    // Misordered: IOERR goes to the last writable byte (end of the data).
    let last = mem::peek::<u8>(data() + 511);
    if len != 1 || last != S_IOERR || mem::peek::<u8>(status()) != SENTINEL {
        return Err(fmt!(
            "used len {} last data byte {}",
            Dec(len.into()),
            Hex(last.into())
        ));
    }
    dev.good_request()?;
    Ok("ioerr in last writable byte".into())
}

fn write_beyond_capacity(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let cap = dev.capacity;
    if cap < 2 {
        return Err("no capacity".into());
    }
    let chain = |len: u32| {
        [
            (hdr(), 16, F_NEXT, 1),
            (data(), len, F_NEXT, 2),
            (status(), 1, F_WRITE, 0),
        ]
    };
    for (what, sector, len) in [
        ("at-capacity", cap, 512),
        ("sector-max", u64::MAX, 512),
        ("straddling", cap - 1, 1024),
    ] {
        super::dev::blk_header(0, T_OUT, sector);
        prepare();
        mem::fill(data(), 1024, 0xab);
        let (_, used) = submit_as_is(dev, &chain(len))?;
        let st = mem::peek::<u8>(status());
        if used != 1 || st != S_IOERR {
            return Err(fmt!(
                "{what}: used len {} status {}",
                Dec(used.into()),
                Hex(st.into())
            ));
        }
        dev.good_request()?;
    }
    // The straddling write must not have reached the last sector.
    super::dev::blk_header(0, T_IN, cap - 1);
    let (_, used) = submit(dev, &read_with((data(), 512)))?;
    if used != 513 || mem::peek::<u8>(status()) != S_OK {
        return Err("reading the last sector failed".into());
    }
    if mem::hash(data(), 512) == mem::hash_of_fill(512, 0xab) {
        return Err("the straddling write reached the last sector".into());
    }
    Ok(fmt!("ioerr x3 capacity={}", Dec(cap)))
}

fn unknown_type(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    super::dev::blk_header(0, 0xdead, 0);
    expect(
        dev,
        "type-0xdead",
        &read_with((data(), 512)),
        Want::Status(S_UNSUPP, 1),
    )?;
    Ok("unsupp".into())
}

/// Writes a table of descriptors at `table`.
fn table(table: u64, descs: &[D]) {
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        mem::desc(table, i as u16, addr, len, flags, next);
    }
}

fn indirect_nested(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let (t0, t1) = (mem::arena(IND), mem::arena(IND + 0x1000));
    // Control: one level of indirection works.
    table(t0, &read_with((data(), 512)));
    let (_, len) = submit(dev, &[(t0, 48, F_INDIRECT, 0)])?;
    if len != 513 || mem::peek::<u8>(status()) != S_OK {
        return Err(fmt!("plain indirect: used len {}", Dec(len.into())));
    }
    dev.good_request()?;
    table(t0, &[(hdr(), 16, F_NEXT, 1), (t1, 32, F_INDIRECT, 0)]);
    table(
        t1,
        &[
            (data(), 512, F_WRITE | F_NEXT, 1),
            (status(), 1, F_WRITE, 0),
        ],
    );
    expect(dev, "nested", &[(t0, 32, F_INDIRECT, 0)], Want::Dropped)?;
    // INDIRECT together with NEXT is forbidden to drivers; either the
    // table is used (the next is ignored) or the chain is refused.
    table(t0, &read_with((data(), 512)));
    let (_, len) = submit(dev, &[(t0, 48, F_INDIRECT | F_NEXT, 1), (hdr(), 16, 0, 0)])?;
    let st = mem::peek::<u8>(status());
    let how = match (len, st) {
        (513, S_OK) => "indirect+next used",
        (0, SENTINEL) => "indirect+next dropped",
        _ => {
            return Err(fmt!(
                "indirect+next: used len {} status {}",
                Dec(len.into()),
                Hex(st.into())
            ))
        }
    };
    dev.good_request()?;
    Ok(fmt!("nested dropped, {how}"))
}

fn indirect_bad_len(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    let t0 = mem::arena(IND);
    table(t0, &read_with((data(), 512)));
    for len in [40, 8, 0] {
        let what = fmt!("len={}", Dec(len.into()));
        expect(dev, &what, &[(t0, len, F_INDIRECT, 0)], Want::Dropped)?;
    }
    Ok("dropped x3".into())
}

fn indirect_in_mmio(hx: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    for (what, addr) in [("hole", HOLE), ("ecam", ECAM), ("beyond-ram", hx.ram_end)] {
        expect(dev, what, &[(addr, 48, F_INDIRECT, 0)], Want::Dropped)?;
    }
    Ok("dropped x3".into())
}

fn avail_head_out_of_range(_: &mut Hx, dev: &mut Dev) -> Res {
    start(dev)?;
    // Heads naming no descriptor are skipped: the good request behind them
    // must be the first (and only) used element.
    dev.push(0, QSIZE);
    dev.push(0, 0xffff);
    dev.good_request()?;
    if dev.pending_used(0) != 0 {
        return Err("extra used elements".into());
    }
    Ok("skipped".into())
}

/// The available index 1000 ahead of a 16-entry ring: nothing may be
/// completed, and the device must say it needs a reset (NEEDS_RESET and a
/// configuration interrupt) rather than stop silently. Also used for rng.
pub fn avail_idx_jump(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, QSIZE)?;
    let q = dev.kind.good_queue();
    let config = dev.vector(dev.config_entry());
    let before = interrupts::count(config);
    dev.set_avail_idx(q, 1000);
    dev.kick(q);
    let needs_reset = wait_ms(500, || dev.status() & NEEDS_RESET != 0);
    let st = dev.status();
    let used = dev.pending_used(q);
    if used != 0 {
        return Err(fmt!(
            "{} used elements for an impossible index",
            Dec(used.into())
        ));
    }
    if !needs_reset {
        return Err(fmt!(
            "queue stopped silently: status {} without NEEDS_RESET",
            Hex(st.into())
        ));
    }
    if !wait_ms(500, || interrupts::count(config) != before) {
        return Err("NEEDS_RESET without a configuration interrupt".into());
    }
    Ok(fmt!("stopped, status={}", Hex(st.into())))
}

/// Requests in flight at once (3 descriptors each: queues of 128).
pub const IN_FLIGHT: u64 = 32;
/// Each reads 1 MiB (32 MiB in all, from a 64 MiB disk), all into the same
/// buffer: on our hosts the guest's next register write takes longer than
/// 32 short reads, which would all be over before a reset arrived.
const LONG_READ: u32 = 1 << 20;

/// Makes IN_FLIGHT reads of 1 MiB each available on queue 0 (status bytes
/// in slots 0..) and notifies.
pub fn submit_reads(dev: &mut Dev) {
    let long = mem::long_buffer();
    mem::fill(long, 4096, SENTINEL);
    mem::fill(status(), IN_FLIGHT, SENTINEL);
    for i in 0..IN_FLIGHT {
        super::dev::blk_header(i, T_IN, i * u64::from(LONG_READ) / 512);
        let d = 3 * i as u16;
        dev.desc(0, d, mem::slot(HDR, i), 16, F_NEXT, d + 1);
        dev.desc(0, d + 1, long, LONG_READ, F_WRITE | F_NEXT, d + 2);
        dev.desc(0, d + 2, mem::slot(STATUS, i), 1, F_WRITE, 0);
        dev.push(0, d);
    }
    dev.kick(0);
}

/// Checks that nothing changes in the status bytes of `submit_reads`, the
/// ends of its buffer or the used index for 100 ms: the device let go of
/// the queue. Returns how many requests completed.
pub fn quiet_after_reset(dev: &Dev) -> Result<u16, String> {
    let n = IN_FLIGHT;
    let long = mem::long_buffer();
    let tail = long + mem::LONG_SIZE as u64 - 4096;
    let snapshot = || {
        (
            mem::hash(long, 4096) ^ mem::hash(tail, 4096).rotate_left(1),
            mem::hash(status(), n),
            dev.used_idx(0),
        )
    };
    let before = snapshot();
    let done = before.2;
    spin_ms(100);
    let after = snapshot();
    if before != after {
        return Err("buffers or used ring written after the reset completed".into());
    }
    if done > n as u16 {
        return Err(fmt!("used idx {}", Dec(done.into())));
    }
    Ok(done)
}

fn reset_in_flight(_: &mut Hx, dev: &mut Dev) -> Res {
    dev.init(INDIRECT_DESC, 128)?;
    submit_reads(dev);
    let start = crate::arch::rdtsc();
    dev.reset()?;
    let took = super::ms_since(start);
    let done = quiet_after_reset(dev)?;
    Ok(fmt!(
        "completed-before-reset={} reset-ms={}",
        Dec(done.into()),
        Dec(took)
    ))
}

fn reset_storm(_: &mut Hx, dev: &mut Dev) -> Res {
    const CYCLES: u64 = 20;
    for i in 0..CYCLES {
        dev.init(INDIRECT_DESC, QSIZE)?;
        dev.good_request()
            .map_err(|e| fmt!("cycle {}: {e}", Dec(i)))?;
        // Leave a request in flight for the reset every other cycle.
        if i % 2 == 1 {
            dev.queue_good();
            dev.kick(0);
        }
        dev.reset()?;
    }
    Ok(fmt!("cycles={}", Dec(CYCLES)))
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
    blk!("blk-loop-self", loop_self),
    blk!("blk-loop-2cycle", loop_2cycle),
    blk!("blk-next-out-of-range", next_out_of_range),
    blk!("blk-data-in-mmio", data_in_mmio),
    blk!("blk-header-in-mmio", header_in_mmio),
    blk!("blk-status-in-mmio", status_in_mmio),
    blk!("blk-data-beyond-ram", data_beyond_ram),
    blk!("blk-zero-length", zero_length),
    blk!("blk-huge-length", huge_length),
    blk!("blk-header-only", header_only),
    blk!("blk-status-readonly", status_readonly),
    blk!("blk-write-beyond-capacity", write_beyond_capacity),
    blk!("blk-unknown-type", unknown_type),
    blk!("blk-indirect-nested", indirect_nested),
    blk!("blk-indirect-bad-len", indirect_bad_len),
    blk!("blk-indirect-in-mmio", indirect_in_mmio),
    blk!("blk-avail-head-out-of-range", avail_head_out_of_range),
    blk!("blk-avail-idx-jump", avail_idx_jump),
    blk!("blk-reset-in-flight", reset_in_flight),
];

/// Run after everything else: many activations, to show up leaks in RSS.
pub const LATE_ACTIONS: &[Action] = &[blk!("blk-reset-storm", reset_storm)];
