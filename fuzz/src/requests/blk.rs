//! `blk_request`: virtio-blk's request path (`BlockRequestProcessor`,
//! synchronous) on a temporary image, with well-formed requests built from
//! fuzzed fields next to arbitrary chains.
//!
//! Checks beyond the generic ones: the image never changes size, bytes
//! past the capacity never change, a read-only image never changes; in
//! clean batches every successful request is replayed on a shadow of the
//! image (reads must return its bytes, writes and write-zeroes update it,
//! nothing succeeds past the capacity, GET_ID returns the serial), the
//! status byte of a well-formed chain is OK, IOERR or UNSUPP with a
//! matching used length, and the image equals the shadow afterwards.

use std::fmt::Display;

use arbitrary::Arbitrary;
use virtio_devices::block::{Block, BlockConfig, BlockRequestProcessor};
use virtio_devices::VirtioInterrupt;
use virtio_devices::VirtioInterruptType;
use vm_memory::{Bytes, GuestAddress};

use super::blk_model::{Image, ID_BYTES, T_DISCARD, T_FLUSH, T_GET_ID};
use super::blk_model::{T_IN, T_OUT, T_WRITE_ZEROES};
use super::{ring_size, Device, Rings, Step};
use crate::encode::{variant, Encode};
use crate::encode_struct;
use crate::threads;
use crate::virtq::batch::{Batch, Completion};
use crate::virtq::{Addr, Len, Link, Seg, DATA_BASE, MAX_QUEUE_SIZE, MEM_SIZE};

/// Image sizes: empty, below one sector, one sector, with a partial last
/// sector, 64 KiB.
const IMAGE_SIZES: [usize; 5] = [0, 100, 512, 8192 + 300, 64 << 10];
/// The serial given to the device (GET_ID answers its first 20 bytes).
const SERIAL: &str = "trellis-fuzz-disk-serial";

/// How the device is built.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Picks from `IMAGE_SIZES`.
    pub image: u8,
    /// Read-only device.
    pub read_only: bool,
    /// Ring size, log2.
    pub ring: u8,
    /// VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
}

/// One discard / write-zeroes segment.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// First sector.
    pub sector: u16,
    /// Number of sectors.
    pub sectors: u16,
    /// Flags (1 = unmap).
    pub flags: u8,
}

/// The request type.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Read.
    In,
    /// Write.
    Out,
    /// Flush.
    Flush,
    /// The serial.
    GetId,
    /// Discard extents.
    Discard(Vec<Extent>),
    /// Zero extents.
    WriteZeroes(Vec<Extent>),
    /// Any type number.
    Other(u32),
}

/// A request as a driver builds it, with knobs to get it wrong.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Type.
    pub kind: Kind,
    /// Sector, near the image; `far` puts it near 2^64.
    pub sector: u16,
    /// Sector counted from the top of the u64 range.
    pub far: bool,
    /// Data buffers: whole sectors (`n % 9`) or, with bit 15, odd lengths.
    pub data: Vec<u16>,
    /// Length of the status buffer (1 when well formed).
    pub status: u8,
    /// The header in two buffers.
    pub split_header: bool,
    /// Through an indirect table.
    pub indirect: bool,
    /// Notify after publishing.
    pub kick: bool,
    /// Pattern of written data.
    pub fill: u8,
}

/// Device ops.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum BlkOp {
    /// Publish (and maybe process) a request.
    Request(Request),
    /// Give the queue back and set it up afresh (a queue reset).
    ResetQueue,
}

/// A whole input.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The device.
    pub config: Config,
    /// What happens.
    pub steps: Vec<Step<BlkOp>>,
}

struct Target {
    image: Image,
    _device: Block,
    processor: BlockRequestProcessor,
    queue: virtio_queue::Queue,
    broken: bool,
    ring: u16,
    /// Next free byte of the data area for request buffers.
    cursor: u64,
    serial: [u8; ID_BYTES],
    /// Completions process_queue reported in the current batch.
    last_completed: Option<usize>,
}

fn data_len(n: u16) -> u32 {
    if n & 0x8000 == 0 {
        u32::from(n % 9) * 512
    } else {
        u32::from(n & 0x7fff)
    }
}

impl Target {
    /// `len` bytes of the data area, 8-aligned, wrapping.
    fn alloc(&mut self, len: u32) -> u64 {
        let len = u64::from(len).next_multiple_of(8);
        if self.cursor + len > MEM_SIZE {
            self.cursor = DATA_BASE;
        }
        let at = self.cursor;
        self.cursor += len;
        at
    }

    fn seg(&mut self, rings: &Rings, bytes: &[u8], write: bool) -> Seg {
        let at = self.alloc(bytes.len() as u32);
        let _ = rings.mem.write_slice(bytes, GuestAddress(at));
        Seg {
            addr: Addr::Raw(at),
            len: Len::Raw(bytes.len() as u32),
            write,
        }
    }

    fn request(&mut self, rings: &mut Rings, r: &Request) {
        let (kind, writes, payload) = match &r.kind {
            Kind::In => (T_IN, true, Vec::new()),
            Kind::Out => (T_OUT, false, Vec::new()),
            Kind::Flush => (T_FLUSH, false, Vec::new()),
            Kind::GetId => (T_GET_ID, true, Vec::new()),
            Kind::Discard(e) => (T_DISCARD, false, extents(e)),
            Kind::WriteZeroes(e) => (T_WRITE_ZEROES, false, extents(e)),
            Kind::Other(t) => (*t, false, Vec::new()),
        };
        let sector = if r.far {
            u64::MAX - u64::from(r.sector)
        } else {
            u64::from(r.sector)
        };
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&kind.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        let mut segs = Vec::new();
        if r.split_header {
            segs.push(self.seg(rings, &header[..8], false));
            segs.push(self.seg(rings, &header[8..], false));
        } else {
            segs.push(self.seg(rings, &header, false));
        }
        if !payload.is_empty() {
            segs.push(self.seg(rings, &payload, false));
        }
        for (i, &n) in r.data.iter().enumerate().take(8) {
            let bytes: Vec<u8> = (0..data_len(n))
                .map(|b| r.fill ^ (b as u8).wrapping_add(i as u8))
                .collect();
            segs.push(self.seg(rings, &bytes, writes));
        }
        // Poisoned, so a status the device forgot to write shows.
        segs.push(self.seg(rings, &vec![0xff; usize::from(r.status)], true));
        let link = if r.indirect {
            Link::Indirect { table_len: None }
        } else {
            Link::Direct
        };
        if let Some((q, _)) = rings.queues.first_mut() {
            q.add_chain(&rings.mem, &segs, link);
        }
    }
}

fn extents(e: &[Extent]) -> Vec<u8> {
    e.iter()
        .take(8)
        .flat_map(|x| {
            let mut b = [0u8; 16];
            b[..8].copy_from_slice(&u64::from(x.sector).to_le_bytes());
            b[8..12].copy_from_slice(&u32::from(x.sectors).to_le_bytes());
            b[12..].copy_from_slice(&u32::from(x.flags).to_le_bytes());
            b
        })
        .collect()
}

impl Device for Target {
    type Op = BlkOp;

    fn kick(&mut self, rings: &mut Rings, _pos: usize) {
        if self.broken {
            return;
        }
        let outcome = self.processor.process_queue(&rings.mem, &mut self.queue);
        // What the device's worker does with the outcome.
        if outcome.notify {
            let _ = rings.irq.trigger(VirtioInterruptType::Queue(0));
        }
        if outcome.error.is_some() {
            self.broken = true;
            rings.irq.set_needs_reset();
        }
        self.last_completed = Some(outcome.completed);
    }

    fn prepare(&mut self, rings: &mut Rings, op: &BlkOp) {
        if let BlkOp::Request(r) = op {
            self.request(rings, r);
        }
    }

    fn apply(&mut self, rings: &mut Rings, op: &BlkOp, _ctx: &dyn Display) -> bool {
        match op {
            BlkOp::Request(r) => {
                if r.kick {
                    self.kick(rings, 0);
                }
                false
            }
            BlkOp::ResetQueue => {
                rings.set_queues(&[(0, self.ring)]);
                self.queue = rings.queues[0]
                    .0
                    .device_queue(MAX_QUEUE_SIZE, rings.event_idx);
                self.broken = false;
                true
            }
        }
    }

    fn active(&self) -> Vec<u16> {
        vec![0]
    }

    fn threads(&self) -> usize {
        0
    }

    fn check(&mut self, rings: &Rings, batch: &Batch, done: &[Completion], ctx: &dyn Display) {
        if let Some(completed) = self.last_completed.take() {
            if batch.stable && !batch.queues[0].used_poked {
                assert_eq!(
                    completed,
                    done.len(),
                    "{ctx}: process_queue reports {completed} completions, the used ring {}",
                    done.len()
                );
            }
        }
        if batch.stable {
            for c in done {
                let usable = batch.walk(0, c.id).is_some_and(|w| status_usable(w, rings));
                if !usable {
                    assert_eq!(
                        c.len, 0,
                        "{ctx}: chain {} without a usable status byte has used length {}",
                        c.id, c.len
                    );
                }
            }
        }
        self.image
            .check(&rings.mem, batch, done, Some(&self.serial), ctx);
    }
}

/// Whether the device can write a status for the chain: whole, with a
/// non-empty writable buffer whose last byte is in memory.
fn status_usable(w: &crate::virtq::walk::Walk, rings: &Rings) -> bool {
    let last = w
        .descs
        .iter()
        .rev()
        .find(|(d, _)| d.writable() && d.len > 0);
    w.whole
        && last.is_some_and(|(d, _)| {
            d.addr
                .checked_add(u64::from(d.len) - 1)
                .is_some_and(|a| crate::virtq::walk::in_memory(&rings.mem, a, 1))
        })
}

/// Runs one input.
pub fn run(input: &Input) -> super::Stats {
    let _guard = threads::exclusive();
    let c = input.config;
    let size = IMAGE_SIZES[usize::from(c.image) % IMAGE_SIZES.len()];
    let image = Image::create(size, c.read_only);
    let device = Block::new(BlockConfig {
        path: image.path.clone(),
        read_only: c.read_only,
        serial: Some(SERIAL.to_string()),
        queues: 1,
        queue_size: MAX_QUEUE_SIZE,
        lock: true,
    })
    .expect("the image opens");
    image.opened();
    let mut rings = super::Rings::new(c.event_idx);
    let ring = ring_size(c.ring);
    rings.set_queues(&[(0, ring)]);
    let mut serial = [0u8; ID_BYTES];
    serial.copy_from_slice(&SERIAL.as_bytes()[..ID_BYTES]);
    let mut target = Target {
        processor: device.request_processor(),
        queue: rings.queues[0].0.device_queue(MAX_QUEUE_SIZE, c.event_idx),
        _device: device,
        image,
        broken: false,
        ring,
        cursor: DATA_BASE,
        serial,
        last_completed: None,
    };
    let mut stats = super::run(&mut target, &mut rings, &input.steps);
    stats.interrupts = rings.interrupts;
    stats
}

encode_struct!(Config {
    image,
    read_only,
    ring,
    event_idx
});
encode_struct!(Extent {
    sector,
    sectors,
    flags
});
encode_struct!(Request {
    kind,
    sector,
    far,
    data,
    status,
    split_header,
    indirect,
    kick,
    fill
});
encode_struct!(Input { config, steps });

impl Encode for Kind {
    fn encode(&self, out: &mut Vec<u8>) {
        const N: u32 = 7;
        match self {
            Kind::In => variant(out, 0, N),
            Kind::Out => variant(out, 1, N),
            Kind::Flush => variant(out, 2, N),
            Kind::GetId => variant(out, 3, N),
            Kind::Discard(e) => {
                variant(out, 4, N);
                e.encode(out);
            }
            Kind::WriteZeroes(e) => {
                variant(out, 5, N);
                e.encode(out);
            }
            Kind::Other(t) => {
                variant(out, 6, N);
                t.encode(out);
            }
        }
    }
}

impl Encode for BlkOp {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            BlkOp::Request(r) => {
                variant(out, 0, 2);
                r.encode(out);
            }
            BlkOp::ResetQueue => variant(out, 1, 2),
        }
    }
}
