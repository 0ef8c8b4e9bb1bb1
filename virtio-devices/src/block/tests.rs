//! Request-path tests: hand-built rings in guest memory against a temporary
//! image file.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_bindings::virtio_blk::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

use super::{Block, BlockConfig, BlockRequestProcessor};
use crate::test_ring::{Desc, TestRing, F_INDIRECT, F_NEXT, F_WRITE};

pub(super) const MEM_SIZE: u64 = 0x10_0000;
pub(super) const HDR: u64 = 0x1_0000;
pub(super) const DATA: u64 = 0x2_0000;
pub(super) const STATUS: u64 = 0x8_0000;
/// Well outside guest memory.
pub(super) const FAR: u64 = 0x4000_0000;
const UNTOUCHED: u8 = 0xaa;

pub(super) const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
pub(super) const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
pub(super) const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// A recognisable byte for every image offset.
pub(super) fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8 ^ 0x5a
}

/// A temporary image of `len` bytes filled with [`pattern`], in `dir`.
pub(super) fn image_in(dir: &Path, len: u64) -> TempFile {
    let file = TempFile::new_in(dir).expect("temp file");
    let bytes: Vec<u8> = (0..len).map(pattern).collect();
    file.as_file().write_all_at(&bytes, 0).expect("fill image");
    file
}

pub(super) fn image(len: u64) -> TempFile {
    image_in(&std::env::temp_dir(), len)
}

pub(super) fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("guest memory")
}

/// An image, its device, a processor, guest memory and a ring.
pub(super) struct Rig {
    pub file: TempFile,
    pub block: Block,
    pub processor: BlockRequestProcessor,
    pub mem: GuestMemoryMmap,
}

impl Rig {
    pub fn with_config(len: u64, edit: impl FnOnce(&mut BlockConfig)) -> Rig {
        Rig::from_file(image(len), edit)
    }

    pub fn from_file(file: TempFile, edit: impl FnOnce(&mut BlockConfig)) -> Rig {
        let mut config = BlockConfig::new(file.as_path());
        edit(&mut config);
        let block = Block::new(config).expect("block device");
        let processor = block.request_processor();
        let mem = memory();
        // Poison the data and status areas to see what the device wrote.
        let poison = vec![UNTOUCHED; (MEM_SIZE - DATA) as usize];
        mem.write_slice(&poison, GuestAddress(DATA)).unwrap();
        Rig {
            file,
            block,
            processor,
            mem,
        }
    }

    pub fn new(len: u64) -> Rig {
        Rig::with_config(len, |_| {})
    }

    pub fn header(&self, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Submits one chain; returns (used len, status byte at STATUS).
    pub fn submit(&mut self, descs: &[Desc]) -> (u32, u8) {
        let ring = TestRing::new(&self.mem, 0, 16);
        let mut queue: Queue = ring.queue();
        let mut ring = ring;
        let head = ring.add_chain(descs);
        let outcome = self.processor.process_queue(&self.mem, &mut queue);
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        assert_eq!(ring.used_idx(), 1);
        let (id, len) = ring.used_elem(0);
        assert_eq!(id, u32::from(head));
        (len, self.status())
    }

    pub fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    pub fn guest(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    pub fn file_bytes(&self) -> Vec<u8> {
        fs::read(self.file.as_path()).unwrap()
    }
}

fn hdr() -> Desc {
    Desc::r(HDR, 16)
}

fn status() -> Desc {
    Desc::w(STATUS, 1)
}

fn expected_image(len: u64) -> Vec<u8> {
    (0..len).map(pattern).collect()
}

#[test]
fn read_returns_file_bytes() {
    let mut rig = Rig::new(8 * 512);
    rig.header(VIRTIO_BLK_T_IN, 1);
    let (len, st) = rig.submit(&[hdr(), Desc::w(DATA, 1024), status()]);
    assert_eq!((len, st), (1025, S_OK));
    assert_eq!(rig.guest(DATA, 1024), expected_image(1536)[512..]);
    // Nothing past the buffer was touched.
    assert_eq!(rig.guest(DATA + 1024, 1), [UNTOUCHED]);
}

#[test]
fn read_across_descriptors_and_memory_regions() {
    let file = image(16 * 512);
    let mut rig = Rig::from_file(file, |_| {});
    // Two adjacent regions: a buffer may straddle them.
    rig.mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x3_0000),
        (GuestAddress(0x3_0000), (MEM_SIZE - 0x3_0000) as usize),
    ])
    .unwrap();
    rig.header(VIRTIO_BLK_T_IN, 2);
    let (len, st) = rig.submit(&[
        hdr(),
        Desc::w(0x2_fe00, 1024), // crosses 0x3_0000
        Desc::w(0x4_0000, 0),    // empty buffers are fine
        Desc::w(0x4_0000, 2048),
        status(),
    ]);
    assert_eq!((len, st), (3073, S_OK));
    let want = expected_image(8 * 512);
    assert!(rig.guest(0x2_fe00, 1024) == want[1024..2048]);
    assert!(rig.guest(0x4_0000, 2048) == want[2048..]);
}

#[test]
fn framing_independent_header_and_status() {
    let mut rig = Rig::new(4 * 512);
    rig.header(VIRTIO_BLK_T_IN, 0);
    // Header split in two; status is the last byte of the data buffer.
    let (len, st) = rig.submit(&[
        Desc::r(HDR, 10),
        Desc::r(HDR + 10, 6),
        Desc::w(STATUS - 512, 513),
    ]);
    assert_eq!((len, st), (513, S_OK));
    assert_eq!(rig.guest(STATUS - 512, 512), expected_image(512));
}

#[test]
fn write_changes_exactly_the_range() {
    let mut rig = Rig::new(8 * 512);
    let data: Vec<u8> = (0..1024).map(|i| (i * 7 % 256) as u8).collect();
    rig.mem.write_slice(&data, GuestAddress(DATA)).unwrap();
    rig.header(VIRTIO_BLK_T_OUT, 3);
    let (len, st) = rig.submit(&[hdr(), Desc::r(DATA, 1024), status()]);
    assert_eq!((len, st), (1, S_OK));
    let mut want = expected_image(8 * 512);
    want[3 * 512..5 * 512].copy_from_slice(&data);
    assert_eq!(rig.file_bytes(), want);
}

#[test]
fn flush_succeeds() {
    let mut rig = Rig::new(4 * 512);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.submit(&[hdr(), status()]), (1, S_OK));
}

#[test]
fn get_id_returns_the_serial() {
    let mut rig = Rig::with_config(4 * 512, |c| c.serial = Some("trellis-disk-0".into()));
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    let (len, st) = rig.submit(&[hdr(), Desc::w(DATA, 20), status()]);
    assert_eq!((len, st), (21, S_OK));
    let mut want = [0u8; 20];
    want[..14].copy_from_slice(b"trellis-disk-0");
    assert_eq!(rig.guest(DATA, 20), want);

    // A longer buffer gets 20 bytes; a shorter one a truncated id.
    let (len, _) = rig.submit(&[hdr(), Desc::w(DATA, 64), status()]);
    assert_eq!(len, 21);
    assert_eq!(rig.guest(DATA + 20, 1), [UNTOUCHED]);
    let (len, st) = rig.submit(&[hdr(), Desc::w(DATA + 0x100, 4), status()]);
    assert_eq!((len, st), (5, S_OK));
    assert_eq!(rig.guest(DATA + 0x100, 4), *b"trel");
}

#[test]
fn long_serial_is_truncated_and_default_id_is_nonempty() {
    let mut rig = Rig::with_config(512, |c| c.serial = Some("x".repeat(30)));
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    rig.submit(&[hdr(), Desc::w(DATA, 20), status()]);
    assert_eq!(rig.guest(DATA, 20), vec![b'x'; 20]);

    let mut rig = Rig::new(512);
    rig.header(VIRTIO_BLK_T_GET_ID, 0);
    assert_eq!(
        rig.submit(&[hdr(), Desc::w(DATA, 20), status()]),
        (21, S_OK)
    );
    assert_ne!(rig.guest(DATA, 1), [0]);
}

/// A discard/write-zeroes segment: sector, sectors, flags.
type Segment = (u64, u32, u32);

/// Writes discard/write-zeroes segments at DATA.
fn segments(rig: &Rig, segs: &[Segment]) -> u32 {
    let mut bytes = Vec::new();
    for (sector, n, flags) in segs {
        bytes.extend_from_slice(&sector.to_le_bytes());
        bytes.extend_from_slice(&n.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
    }
    rig.mem.write_slice(&bytes, GuestAddress(DATA)).unwrap();
    bytes.len() as u32
}

fn zeroed(len: u64, ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut want = expected_image(len);
    for (sector, n) in ranges {
        want[(*sector * 512) as usize..((*sector + *n) * 512) as usize].fill(0);
    }
    want
}

fn check_zeroing(dir: &Path) {
    let len = 64 * 512;
    for (request_type, flags) in [
        (VIRTIO_BLK_T_DISCARD, 0),
        (VIRTIO_BLK_T_WRITE_ZEROES, 0),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        ),
    ] {
        let mut rig = Rig::from_file(image_in(dir, len), |_| {});
        let n = segments(&rig, &[(8, 8, flags), (33, 3, flags)]);
        rig.header(request_type, 0);
        let (used, st) = rig.submit(&[hdr(), Desc::r(DATA, n), status()]);
        assert_eq!((used, st), (1, S_OK), "type {request_type} flags {flags}");
        assert_eq!(
            rig.file_bytes(),
            zeroed(len, &[(8, 8), (33, 3)]),
            "type {request_type} flags {flags} in {}",
            dir.display()
        );
    }
}

#[test]
fn discard_and_write_zeroes_zero_the_range() {
    check_zeroing(&std::env::temp_dir());
    // tmpfs lacks FALLOC_FL_ZERO_RANGE: exercises the fallbacks.
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        check_zeroing(shm);
    }
}

#[test]
fn discard_and_write_zeroes_refuse_bad_segments() {
    let len = 32 * 512;
    let cases: &[(u32, &[Segment], u8)] = &[
        // Unmap makes no sense on a discard; unknown flags are unsupported.
        (
            VIRTIO_BLK_T_DISCARD,
            &[(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
            S_UNSUPP,
        ),
        (VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 1, 0x8)], S_UNSUPP),
        // One bad segment fails the request before anything is done.
        (VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 4, 0), (30, 4, 0)], S_IOERR),
        (
            VIRTIO_BLK_T_DISCARD,
            &[(0, 4, 0), (u64::MAX, 2, 0)],
            S_IOERR,
        ),
        (VIRTIO_BLK_T_WRITE_ZEROES, &[(0, u32::MAX, 0)], S_IOERR),
    ];
    for (request_type, segs, want) in cases {
        let mut rig = Rig::new(len);
        let n = segments(&rig, segs);
        rig.header(*request_type, 0);
        let got = rig.submit(&[hdr(), Desc::r(DATA, n), status()]);
        assert_eq!(got, (1, *want), "{request_type} {segs:?}");
        assert_eq!(rig.file_bytes(), expected_image(len));
    }
    // Payload not a whole number of segments, or none at all.
    let mut rig = Rig::new(len);
    rig.header(VIRTIO_BLK_T_DISCARD, 0);
    assert_eq!(
        rig.submit(&[hdr(), Desc::r(DATA, 15), status()]),
        (1, S_IOERR)
    );
    assert_eq!(rig.submit(&[hdr(), status()]), (1, S_IOERR));
    // More segments than advertised.
    let many = vec![(0u64, 1u32, 0u32); 33];
    let n = segments(&rig, &many);
    assert_eq!(
        rig.submit(&[hdr(), Desc::r(DATA, n), status()]),
        (1, S_IOERR)
    );
}

#[test]
fn read_only_device_refuses_modifications() {
    let len = 8 * 512;
    let mut rig = Rig::with_config(len, |c| c.read_only = true);
    rig.mem
        .write_slice(&[1u8; 512], GuestAddress(DATA))
        .unwrap();
    rig.header(VIRTIO_BLK_T_OUT, 0);
    assert_eq!(
        rig.submit(&[hdr(), Desc::r(DATA, 512), status()]),
        (1, S_IOERR)
    );
    for t in [VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_WRITE_ZEROES] {
        let n = segments(&rig, &[(0, 2, 0)]);
        rig.header(t, 0);
        assert_eq!(
            rig.submit(&[hdr(), Desc::r(DATA, n), status()]),
            (1, S_IOERR)
        );
    }
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    assert_eq!(rig.submit(&[hdr(), status()]), (1, S_OK));
    rig.header(VIRTIO_BLK_T_IN, 0);
    assert_eq!(
        rig.submit(&[hdr(), Desc::w(DATA, 512), status()]),
        (513, S_OK)
    );
    assert_eq!(rig.file_bytes(), expected_image(len));
}

#[test]
fn requests_beyond_capacity_fail_without_touching_the_file() {
    let len = 8 * 512;
    let mut rig = Rig::new(len);
    for sector in [7, 8, u64::MAX, u64::MAX / 512, 1 << 60] {
        rig.header(VIRTIO_BLK_T_OUT, sector);
        let got = rig.submit(&[hdr(), Desc::r(DATA, 1024), status()]);
        assert_eq!(got, (1, S_IOERR), "write at {sector}");
        rig.header(VIRTIO_BLK_T_IN, sector);
        let got = rig.submit(&[hdr(), Desc::w(DATA, 1024), status()]);
        assert_eq!(got, (1, S_IOERR), "read at {sector}");
    }
    // The last sector itself is fine.
    rig.header(VIRTIO_BLK_T_OUT, 7);
    assert_eq!(
        rig.submit(&[hdr(), Desc::r(DATA, 512), status()]),
        (1, S_OK)
    );
    let mut want = expected_image(len);
    want[7 * 512..].fill(UNTOUCHED);
    assert_eq!(rig.file_bytes(), want);
}

#[test]
fn partial_trailing_sector_is_invisible() {
    let len = 4 * 512 + 100;
    let mut rig = Rig::new(len);
    assert_eq!(rig.block.capacity(), 4);
    rig.header(VIRTIO_BLK_T_OUT, 4);
    assert_eq!(
        rig.submit(&[hdr(), Desc::r(DATA, 512), status()]),
        (1, S_IOERR)
    );
    rig.header(VIRTIO_BLK_T_OUT, 3);
    assert_eq!(
        rig.submit(&[hdr(), Desc::r(DATA, 512), status()]),
        (1, S_OK)
    );
    let bytes = rig.file_bytes();
    assert_eq!(bytes.len() as u64, len);
    assert_eq!(bytes[4 * 512..], expected_image(len)[4 * 512..]);
}

#[test]
fn malformed_requests_get_ioerr() {
    let len = 8 * 512;
    let mut rig = Rig::new(len);
    let cases: Vec<(&str, u32, Vec<Desc>)> = vec![
        (
            "short header",
            VIRTIO_BLK_T_IN,
            vec![Desc::r(HDR, 8), Desc::w(DATA, 512), status()],
        ),
        (
            "read into readable",
            VIRTIO_BLK_T_IN,
            vec![hdr(), Desc::r(DATA, 512), status()],
        ),
        (
            "write from writable",
            VIRTIO_BLK_T_OUT,
            vec![hdr(), Desc::w(DATA, 512), status()],
        ),
        (
            "read not sector multiple",
            VIRTIO_BLK_T_IN,
            vec![hdr(), Desc::w(DATA, 100), status()],
        ),
        (
            "write not sector multiple",
            VIRTIO_BLK_T_OUT,
            vec![hdr(), Desc::r(DATA, 700), status()],
        ),
        (
            "read buffer outside memory",
            VIRTIO_BLK_T_IN,
            vec![hdr(), Desc::w(FAR, 512), status()],
        ),
        (
            "write buffer outside memory",
            VIRTIO_BLK_T_OUT,
            vec![hdr(), Desc::r(FAR, 512), status()],
        ),
        (
            "read huge",
            VIRTIO_BLK_T_IN,
            vec![hdr(), Desc::w(DATA, 0xffff_fe00), status()],
        ),
        (
            "write huge",
            VIRTIO_BLK_T_OUT,
            vec![hdr(), Desc::r(DATA, 0xffff_fe00), status()],
        ),
        (
            "address wraps",
            VIRTIO_BLK_T_IN,
            vec![hdr(), Desc::w(u64::MAX - 100, 512), status()],
        ),
        (
            "header outside memory",
            VIRTIO_BLK_T_IN,
            vec![Desc::r(FAR, 16), Desc::w(DATA, 512), status()],
        ),
        (
            "readable after writable",
            VIRTIO_BLK_T_IN,
            vec![hdr(), Desc::w(DATA, 512), Desc::r(DATA, 16), status()],
        ),
        (
            "get id without room",
            VIRTIO_BLK_T_GET_ID,
            vec![hdr(), status()],
        ),
    ];
    for (name, t, descs) in cases {
        rig.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
        rig.header(t, 0);
        assert_eq!(rig.submit(&descs), (1, S_IOERR), "{name}");
    }
    rig.header(0xdead, 0);
    assert_eq!(rig.submit(&[hdr(), status()]), (1, S_UNSUPP));
    assert_eq!(rig.file_bytes(), expected_image(len));
}

#[test]
fn chains_without_status_complete_with_zero_length() {
    let len = 8 * 512;
    let mut rig = Rig::new(len);
    rig.header(VIRTIO_BLK_T_IN, 0);
    for (name, descs) in [
        ("only header", vec![hdr()]),
        ("readable last", vec![hdr(), Desc::r(DATA, 512)]),
        ("empty status", vec![hdr(), Desc::w(STATUS, 0)]),
        (
            "status outside memory",
            vec![hdr(), Desc::w(DATA, 512), Desc::w(FAR, 1)],
        ),
    ] {
        let (len, st) = rig.submit(&descs);
        assert_eq!((len, st), (0, UNTOUCHED), "{name}");
        assert_eq!(rig.guest(DATA, 1), [UNTOUCHED], "{name}");
    }
    assert_eq!(rig.file_bytes(), expected_image(len));
}

/// Runs `setup` against a fresh ring and returns (used idx, first used
/// element).
fn raw_ring(rig: &mut Rig, setup: impl FnOnce(&mut TestRing)) -> (u16, (u32, u32)) {
    let mut ring = TestRing::new(&rig.mem, 0, 16);
    let mut queue: Queue = ring.queue();
    setup(&mut ring);
    let _ = rig.processor.process_queue(&rig.mem, &mut queue);
    (ring.used_idx(), ring.used_elem(0))
}

#[test]
fn looping_and_dangling_chains_are_not_trusted() {
    let mut rig = Rig::new(8 * 512);
    rig.header(VIRTIO_BLK_T_IN, 0);
    // 0 -> 1 -> 2 -> 1 -> ...: the loop ends when the chain exceeds the
    // queue size; no status byte is guessed.
    let (idx, elem) = raw_ring(&mut rig, |ring| {
        ring.set_desc(
            0,
            Desc {
                flags: F_NEXT,
                next: 1,
                ..hdr()
            },
        );
        ring.set_desc(
            1,
            Desc {
                flags: F_NEXT | F_WRITE,
                next: 2,
                ..Desc::w(DATA, 512)
            },
        );
        ring.set_desc(
            2,
            Desc {
                flags: F_NEXT | F_WRITE,
                next: 1,
                ..status()
            },
        );
        ring.publish(0);
    });
    assert_eq!((idx, elem), (1, (0, 0)));
    assert_eq!(rig.status(), UNTOUCHED);
    // The next index points past the table.
    let (idx, elem) = raw_ring(&mut rig, |ring| {
        ring.set_desc(
            3,
            Desc {
                flags: F_NEXT,
                next: 200,
                ..hdr()
            },
        );
        ring.publish(3);
    });
    assert_eq!((idx, elem), (1, (3, 0)));
    assert_eq!(rig.guest(DATA, 1), [UNTOUCHED]);
}

#[test]
fn bad_head_indices_and_ring_indices_do_not_panic() {
    let mut rig = Rig::new(8 * 512);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    // A head beyond the queue is dropped; the following chain still runs.
    let (idx, elem) = raw_ring(&mut rig, |ring| {
        ring.publish(100);
        ring.add_chain(&[hdr(), status()]);
    });
    assert_eq!(idx, 1);
    assert_eq!(elem, (0, 1));
    // An available index far ahead of the device breaks the queue.
    let mut ring = TestRing::new(&rig.mem, 0, 16);
    let mut queue: Queue = ring.queue();
    ring.add_chain(&[hdr(), status()]);
    ring.set_avail_idx(1000);
    let outcome = rig.processor.process_queue(&rig.mem, &mut queue);
    assert!(outcome.error.is_some());
    assert_eq!(outcome.completed, 0);
}

#[test]
fn indirect_chains() {
    let mut rig = Rig::new(8 * 512);
    rig.header(VIRTIO_BLK_T_IN, 2);
    let table = 0x3_0000;
    let (idx, elem) = raw_ring(&mut rig, |ring| {
        ring.write_indirect_table(
            table,
            &[
                Desc {
                    flags: F_NEXT,
                    next: 1,
                    ..hdr()
                },
                Desc {
                    flags: F_NEXT | F_WRITE,
                    next: 2,
                    ..Desc::w(DATA, 512)
                },
                status(),
            ],
        );
        ring.set_desc(
            5,
            Desc {
                flags: F_INDIRECT,
                ..Desc::r(table, 48)
            },
        );
        ring.publish(5);
    });
    assert_eq!((idx, elem), (1, (5, 513)));
    assert_eq!(rig.status(), S_OK);
    assert_eq!(rig.guest(DATA, 512), expected_image(3 * 512)[1024..]);
    // A table far longer than the device accepts: IOERR, not buffered.
    let long = 1100u16;
    let (idx, elem) = raw_ring(&mut rig, |ring| {
        let table: Vec<Desc> = (0..long)
            .map(|i| {
                let d = match i {
                    0 => hdr(),
                    i if i == long - 1 => status(),
                    _ => Desc::w(DATA, 512),
                };
                let flags = if i == long - 1 {
                    d.flags
                } else {
                    d.flags | F_NEXT
                };
                Desc {
                    flags,
                    next: i + 1,
                    ..d
                }
            })
            .collect();
        ring.write_indirect_table(0x5_0000, &table);
        let len = 16 * u32::from(long);
        ring.set_desc(
            5,
            Desc {
                flags: F_INDIRECT,
                ..Desc::r(0x5_0000, len)
            },
        );
        ring.publish(5);
    });
    assert_eq!((idx, elem), (1, (5, 1)));
    assert_eq!(rig.status(), S_IOERR);
    // A table length that is not a whole number of descriptors.
    let (idx, elem) = raw_ring(&mut rig, |ring| {
        ring.set_desc(
            5,
            Desc {
                flags: F_INDIRECT,
                ..Desc::r(table, 40)
            },
        );
        ring.publish(5);
    });
    assert_eq!((idx, elem), (1, (5, 0)));
}

#[test]
fn event_idx_suppresses_interrupts() {
    let mut rig = Rig::new(8 * 512);
    rig.header(VIRTIO_BLK_T_FLUSH, 0);
    let mut ring = TestRing::new(&rig.mem, 0, 16);
    let mut queue: Queue = ring.queue();
    queue.set_event_idx(true);
    // The driver wants an interrupt once used idx passes 2.
    ring.set_used_event(2);
    ring.add_chain(&[hdr(), status()]);
    let outcome = rig.processor.process_queue(&rig.mem, &mut queue);
    assert_eq!((outcome.completed, outcome.notify), (1, false));
    ring.add_chain(&[hdr(), status()]);
    ring.add_chain(&[hdr(), status()]);
    let outcome = rig.processor.process_queue(&rig.mem, &mut queue);
    assert_eq!((outcome.completed, outcome.notify), (2, true));
    assert_eq!(ring.used_idx(), 3);
}

/// xorshift64*: deterministic, good enough to scramble descriptors.
struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn random_chains_never_panic_or_escape_the_image() {
    let len = 16 * 512 + 7;
    let mut rig = Rig::new(len);
    let mut rng = Prng(0x1234_5678_9abc_def1);
    let types = [0u32, 1, 4, 8, 11, 13, 2, 99];
    for round in 0..300 {
        let ring = TestRing::new(&rig.mem, 0, 16);
        let mut queue: Queue = ring.queue();
        for i in 0..16u16 {
            let r = rng.next();
            let addr = match r % 5 {
                0 => FAR + rng.next() % 0x1000,
                1 => u64::MAX - rng.next() % 0x1000,
                2 => 0, // the ring itself
                _ => DATA + rng.next() % 0x4_0000,
            };
            let len = match (r >> 8) % 4 {
                0 => (rng.next() as u32) | 0x8000_0000,
                1 => 16,
                _ => (rng.next() % 4096) as u32,
            };
            let flags = ((r >> 16) % 8) as u16;
            let next = ((r >> 24) % 20) as u16;
            ring.set_desc(
                i,
                Desc {
                    addr,
                    len,
                    flags,
                    next,
                },
            );
        }
        let t = types[(rng.next() % types.len() as u64) as usize];
        rig.header(t, rng.next() % 24);
        for _ in 0..(rng.next() % 20) {
            ring.publish((rng.next() % 18) as u16);
        }
        let outcome = rig.processor.process_queue(&rig.mem, &mut queue);
        assert!(outcome.completed <= 20, "round {round}");
        assert_eq!(rig.file_bytes().len() as u64, len, "round {round}");
    }
    // The trailing partial sector was never written.
    assert_eq!(
        rig.file_bytes()[16 * 512..],
        expected_image(len)[16 * 512..]
    );
}
