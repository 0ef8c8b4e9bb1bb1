//! The functional checks, one group per device type. Each prints `TEST` lines
//! through `Report`; a missing device is a failure only if `expect=` named it.

use crate::hal::GuestHal;
use crate::interrupts;
use crate::serial::{Dec, Hex, HexN, Mac};
use crate::virtio::Bdf;
use crate::virtio::{self, IrqTransport};
use crate::{println, Ctx};
use virtio_drivers::device::blk::{VirtIOBlk, SECTOR_SIZE};
use virtio_drivers::device::console::VirtIOConsole;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::device::rng::VirtIORng;
use virtio_drivers::transport::{DeviceType, Transport};

/// VIRTIO_BLK_F_FLUSH.
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

/// Sector 0 of the test disk starts with this (see README.md).
pub const DISK_MAGIC: &[u8] = b"TRELLIS-DISK";
/// Sectors 1..DISK_FILL_SECTORS are filled with their own number.
pub const DISK_FILL_SECTORS: usize = 8;
/// First sector the guest writes to (8 sectors, 4 KiB).
pub const WRITE_SECTOR: usize = 64;
/// The written block starts with this line; the host can check it afterwards.
pub const WRITE_MAGIC: &[u8] = b"TRELLIS-GUEST-WROTE-THIS\n";
/// Line the guest sends on the virtio console.
pub const CONSOLE_LINE: &[u8] = b"TRELLIS-CONSOLE-OK\n";
/// EtherType of the test frame (IEEE 802 local experimental).
pub const NET_ETHERTYPE: u16 = 0x88b5;
/// Payload of the test frame, right after the EtherType.
pub const NET_PAYLOAD: &[u8] = b"TRELLIS-NET-TX";

/// Byte `i` of the block the guest writes at `WRITE_SECTOR`.
pub fn write_pattern(i: usize) -> u8 {
    if i < WRITE_MAGIC.len() {
        WRITE_MAGIC[i]
    } else {
        (i % 251) as u8
    }
}

/// Runs every group.
pub fn run(ctx: &mut Ctx) {
    blk(ctx);
    rng(ctx);
    console(ctx);
    net(ctx);
}

/// Opens the first device of `kind`, or reports why not. `None` means the
/// group is skipped (absent and not expected) or failed already.
fn open(
    ctx: &mut Ctx,
    name: &str,
    kind: DeviceType,
    queues: usize,
    expected: bool,
) -> Option<IrqTransport> {
    let Some(f) = ctx.find(kind) else {
        if expected {
            ctx.report.fail(&format_name(name, "present"), "not-found");
        } else {
            println!("SKIP {name} not-present");
        }
        return None;
    };
    let reassign = ctx.cfg.reassign_bars;
    match virtio::open(&mut ctx.pci, &f, queues, reassign, ctx.apic_id) {
        Ok(t) => {
            println!(
                "INFO {name} at {} id={} vectors={}..{}",
                Bdf(f.df),
                Hex(f.device_id.into()),
                Hex(t.vector(0).into()),
                Hex(t.vector(queues - 1).into())
            );
            Some(t)
        }
        Err(e) => {
            ctx.report.fail(&format_name(name, "init"), e);
            None
        }
    }
}

/// `<dev>-<check>` in a stack buffer (no allocation needed for names).
fn format_name(dev: &str, check: &str) -> NameBuf {
    let mut n = NameBuf {
        buf: [0; 48],
        len: 0,
    };
    for b in dev.bytes().chain(b"-".iter().copied()).chain(check.bytes()) {
        if n.len < n.buf.len() {
            n.buf[n.len] = b;
            n.len += 1;
        }
    }
    n
}

struct NameBuf {
    buf: [u8; 48],
    len: usize,
}

impl core::ops::Deref for NameBuf {
    type Target = str;
    fn deref(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

/// Reports `<dev>-msix`: the queue's vector was accepted and fired.
fn check_msix(ctx: &mut Ctx, name: &str, vector: u8) {
    // The message may still be in flight right after the used ring moved.
    for _ in 0..1_000_000 {
        if interrupts::count(vector) > 0 {
            break;
        }
        core::hint::spin_loop();
    }
    let n = interrupts::count(vector);
    let rejected = virtio::vector_rejected(vector);
    let check = format_name(name, "msix");
    if rejected {
        ctx.report.fail(
            &check,
            format_args!("device refused MSI-X vector {}", Hex(vector.into())),
        );
    } else {
        ctx.report.check(
            &check,
            n > 0,
            format_args!("vector={} irqs={}", Hex(vector.into()), Dec(n)),
        );
    }
}

fn blk(ctx: &mut Ctx) {
    let expected = ctx.cfg.expect.blk;
    let Some(t) = open(ctx, "blk", DeviceType::Block, 1, expected) else {
        return;
    };
    let vector = t.vector(0);
    let mut t = t;
    let has_flush = t.read_device_features() & VIRTIO_BLK_F_FLUSH != 0;
    let mut dev = match VirtIOBlk::<GuestHal, IrqTransport>::new(t) {
        Ok(dev) => dev,
        Err(e) => return ctx.report.fail("blk-init", e),
    };
    let capacity = dev.capacity();
    ctx.report.check(
        "blk-init",
        capacity as usize > WRITE_SECTOR + 8,
        format_args!("capacity={} readonly={}", Dec(capacity), dev.readonly()),
    );

    let mut id = [0u8; 20];
    match dev.device_id(&mut id) {
        Ok(len) => println!(
            "INFO blk id=\"{}\"",
            core::str::from_utf8(&id[..len]).unwrap_or("?")
        ),
        Err(e) => println!("INFO blk id unavailable: {e}"),
    }

    // The host-prepared pattern.
    let mut buf = [0u8; DISK_FILL_SECTORS * SECTOR_SIZE];
    match dev.read_blocks(0, &mut buf) {
        Err(e) => ctx.report.fail("blk-read", e),
        Ok(()) => {
            let magic_ok = buf.starts_with(DISK_MAGIC);
            let bad = (1..DISK_FILL_SECTORS).find(|&s| {
                buf[s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE]
                    .iter()
                    .any(|&b| usize::from(b) != s)
            });
            match (magic_ok, bad) {
                (false, _) => ctx.report.fail("blk-read", "sector 0 lacks TRELLIS-DISK"),
                (true, Some(s)) => ctx.report.fail(
                    "blk-read",
                    format_args!("sector {} not filled with its number", Dec(s as u64)),
                ),
                (true, None) => ctx.report.ok(
                    "blk-read",
                    format_args!("sectors=0-{}", Dec(DISK_FILL_SECTORS as u64 - 1)),
                ),
            }
        }
    }

    // Write, flush, read back.
    if ctx.cfg.expect_ro {
        blk_readonly(ctx, &mut dev);
    } else if dev.readonly() {
        println!("SKIP blk-write read-only");
    } else {
        let mut pattern = [0u8; 8 * SECTOR_SIZE];
        for (i, b) in pattern.iter_mut().enumerate() {
            *b = write_pattern(i);
        }
        match dev.write_blocks(WRITE_SECTOR, &pattern) {
            Err(e) => ctx.report.fail("blk-write", e),
            Ok(()) => {
                match dev.flush() {
                    Ok(()) if has_flush => ctx.report.ok("blk-flush", format_args!("")),
                    // virtio-drivers skips the request without the feature.
                    Ok(()) => ctx.report.ok("blk-flush", format_args!("not-offered")),
                    Err(e) => ctx.report.fail("blk-flush", e),
                }
                let mut back = [0u8; 8 * SECTOR_SIZE];
                match dev.read_blocks(WRITE_SECTOR, &mut back) {
                    Err(e) => ctx.report.fail("blk-write", format_args!("read back: {e}")),
                    Ok(()) => match back.iter().zip(pattern.iter()).position(|(a, b)| a != b) {
                        Some(at) => ctx.report.fail(
                            "blk-write",
                            format_args!("mismatch at byte {}", Dec(at as u64)),
                        ),
                        None => ctx.report.ok(
                            "blk-write",
                            format_args!(
                                "sector={} bytes={}",
                                Dec(WRITE_SECTOR as u64),
                                Dec(back.len() as u64)
                            ),
                        ),
                    },
                }
            }
        }
    }

    // Out of range reads must fail, not hang.
    let mut one = [0u8; SECTOR_SIZE];
    match dev.read_blocks(capacity as usize, &mut one) {
        Err(_) => ctx.report.ok("blk-read-past-end", format_args!("rejected")),
        Ok(()) => ctx
            .report
            .fail("blk-read-past-end", "read beyond capacity succeeded"),
    }

    check_msix(ctx, "blk", vector);
}

/// `blk-readonly` (`expect_ro=1`): the device offers VIRTIO_BLK_F_RO, a
/// write fails with IOERR and leaves the sectors as they were. The write is
/// tried even without the feature so a device that ignores read-only shows.
fn blk_readonly(ctx: &mut Ctx, dev: &mut VirtIOBlk<GuestHal, IrqTransport>) {
    let offered = dev.readonly();
    let mut pattern = [0u8; 8 * SECTOR_SIZE];
    for (i, b) in pattern.iter_mut().enumerate() {
        *b = write_pattern(i);
    }
    let write = dev.write_blocks(WRITE_SECTOR, &pattern);
    let mut back = [0u8; 8 * SECTOR_SIZE];
    let unchanged = match dev.read_blocks(WRITE_SECTOR, &mut back) {
        Ok(()) => back != pattern,
        Err(_) => false,
    };
    let refused = matches!(write, Err(virtio_drivers::Error::IoError));
    let write = match write {
        Ok(()) => "accepted",
        Err(virtio_drivers::Error::IoError) => "ioerr",
        Err(_) => "other-error",
    };
    ctx.report.check(
        "blk-readonly",
        offered && refused && unchanged,
        format_args!("offered={offered} write={write} unchanged={unchanged}"),
    );
}

fn rng(ctx: &mut Ctx) {
    let expected = ctx.cfg.expect.rng;
    let Some(t) = open(ctx, "rng", DeviceType::EntropySource, 1, expected) else {
        return;
    };
    let vector = t.vector(0);
    let mut dev = match VirtIORng::<GuestHal, IrqTransport>::new(t) {
        Ok(dev) => dev,
        Err(e) => return ctx.report.fail("rng-init", e),
    };
    let mut buf = [0u8; 64];
    let mut got = 0;
    // A device may return fewer bytes than asked; collect 64.
    for _ in 0..16 {
        match dev.request_entropy(&mut buf[got..]) {
            Ok(n) => got += n,
            Err(e) => return ctx.report.fail("rng-read", e),
        }
        if got >= buf.len() {
            break;
        }
    }
    let nonzero = buf.iter().any(|&b| b != 0);
    ctx.report.check(
        "rng-read",
        got == buf.len() && nonzero,
        format_args!(
            "bytes={} nonzero={nonzero} first={}",
            Dec(got as u64),
            HexN(
                u64::from(u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]])),
                8
            )
        ),
    );
    check_msix(ctx, "rng", vector);
}

fn console(ctx: &mut Ctx) {
    let expected = ctx.cfg.expect.console;
    let Some(t) = open(ctx, "console", DeviceType::Console, 2, expected) else {
        return;
    };
    let tx_vector = t.vector(1);
    let mut dev = match VirtIOConsole::<GuestHal, IrqTransport>::new(t) {
        Ok(dev) => dev,
        Err(e) => return ctx.report.fail("console-init", e),
    };
    match dev.size() {
        Ok(Some(size)) => println!(
            "INFO console size={}x{}",
            Dec(size.columns.into()),
            Dec(size.rows.into())
        ),
        _ => println!("INFO console size unknown"),
    }
    match dev.send_bytes(CONSOLE_LINE) {
        Ok(()) => ctx.report.ok(
            "console-write",
            format_args!("bytes={}", Dec(CONSOLE_LINE.len() as u64)),
        ),
        Err(e) => ctx.report.fail("console-write", e),
    }
    check_msix(ctx, "console", tx_vector);
    // Keep the device alive (not reset) so a slow host flushes the line.
    core::mem::forget(dev);
}

fn net(ctx: &mut Ctx) {
    let expected = ctx.cfg.expect.net;
    let Some(t) = open(ctx, "net", DeviceType::Network, 2, expected) else {
        return;
    };
    let tx_vector = t.vector(1);
    let mut dev = match VirtIONetRaw::<GuestHal, IrqTransport, 16>::new(t) {
        Ok(dev) => dev,
        Err(e) => return ctx.report.fail("net-init", e),
    };
    let mac = dev.mac_address();
    ctx.report.ok("net-init", format_args!("mac={}", Mac(mac)));
    let mut frame = [0u8; 60];
    frame[..6].copy_from_slice(&[0xff; 6]);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&NET_ETHERTYPE.to_be_bytes());
    frame[14..14 + NET_PAYLOAD.len()].copy_from_slice(NET_PAYLOAD);
    match dev.send(&frame) {
        Ok(()) => ctx
            .report
            .ok("net-tx", format_args!("bytes={}", Dec(frame.len() as u64))),
        Err(e) => ctx.report.fail("net-tx", e),
    }
    check_msix(ctx, "net", tx_vector);
    core::mem::forget(dev);
}
