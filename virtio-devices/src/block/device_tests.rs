//! Device-level tests: features, configuration space, the worker thread,
//! queue reset, construction errors and durability.

use std::mem::offset_of;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use vm_memory::{Bytes, GuestAddress};

use super::config::offset;
use super::tests::{image, memory, pattern, Rig, DATA, HDR, STATUS, S_OK};
use super::{Block, BlockConfig, BlockError};
use crate::device::{QueueActivation, VirtioDevice};
use crate::test_ring::{atomic, wait_until, Desc, RecordingInterrupt, TestRing};

fn bit(b: u32) -> u64 {
    1 << b
}

#[test]
fn features_follow_the_configuration() {
    let rig = Rig::new(4 * 512);
    let f = rig.block.features();
    for b in [
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
    ] {
        assert_ne!(f & bit(b), 0, "feature {b}");
    }
    assert_eq!(f & (bit(VIRTIO_BLK_F_MQ) | bit(VIRTIO_BLK_F_RO)), 0);
    assert_eq!(rig.block.device_type(), crate::device_type::BLOCK);
    assert_eq!(rig.block.queue_max_sizes(), [256]);

    let rig = Rig::with_config(4 * 512, |c| {
        c.read_only = true;
        c.queues = 4;
        c.queue_size = 64;
    });
    let f = rig.block.features();
    assert_ne!(f & bit(VIRTIO_BLK_F_MQ), 0);
    assert_ne!(f & bit(VIRTIO_BLK_F_RO), 0);
    assert_eq!(rig.block.queue_max_sizes(), [64; 4]);
}

#[test]
fn config_space_layout() {
    // Our offsets agree with the kernel's structure.
    assert_eq!(offset_of!(virtio_blk_config, capacity), offset::CAPACITY);
    assert_eq!(offset_of!(virtio_blk_config, seg_max), offset::SEG_MAX);
    assert_eq!(offset_of!(virtio_blk_config, blk_size), offset::BLK_SIZE);
    assert_eq!(
        offset_of!(virtio_blk_config, physical_block_exp),
        offset::PHYSICAL_BLOCK_EXP
    );
    assert_eq!(
        offset_of!(virtio_blk_config, opt_io_size),
        offset::OPT_IO_SIZE
    );
    assert_eq!(offset_of!(virtio_blk_config, wce), offset::WRITEBACK);
    assert_eq!(
        offset_of!(virtio_blk_config, num_queues),
        offset::NUM_QUEUES
    );
    assert_eq!(
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
        offset::MAX_WRITE_ZEROES_SEG
    );
    assert_eq!(
        offset_of!(virtio_blk_config, write_zeroes_may_unmap),
        offset::WRITE_ZEROES_MAY_UNMAP
    );

    let rig = Rig::with_config(1000 * 512 + 3, |c| c.queues = 3);
    let read = |at: u64, n: usize| {
        let mut b = vec![0xffu8; n];
        rig.block.read_config(at, &mut b);
        b
    };
    assert_eq!(rig.block.config_size(), 60);
    assert_eq!(read(0, 8), 1000u64.to_le_bytes());
    assert_eq!(read(12, 4), 254u32.to_le_bytes());
    assert_eq!(read(20, 4), 512u32.to_le_bytes());
    assert_eq!(read(34, 2), 3u16.to_le_bytes());
    let exp = read(24, 1)[0];
    assert!(exp <= 3);
    assert_eq!(read(26, 2), (1u16 << exp).to_le_bytes());
    assert_eq!(read(44, 4), (1u32 << exp).to_le_bytes());
    assert_eq!(read(56, 1), [1]);
    // Past the end, straddling it, and absurd offsets read as zero.
    assert_eq!(read(58, 4), [0; 4]);
    assert_eq!(read(200, 4), [0; 4]);
    assert_eq!(read(u64::MAX, 4), [0; 4]);
    // Writes (e.g. writeback) are ignored.
    let mut rig = rig;
    rig.block.write_config(32, &[1]);
    rig.block.write_config(u64::MAX, &[1; 8]);
    let mut b = [0xff];
    rig.block.read_config(32, &mut b);
    assert_eq!(b, [0]);
}

#[test]
fn construction_errors() {
    let missing = BlockConfig::new("/nonexistent/trellis-disk.img");
    assert!(matches!(Block::new(missing), Err(BlockError::Open { .. })));
    let mut dir = BlockConfig::new(std::env::temp_dir());
    dir.read_only = true;
    assert!(matches!(Block::new(dir), Err(BlockError::InvalidConfig(_))));
    let file = image(512);
    for (queues, size) in [(0, 256), (1, 100), (1, 0), (300, 256)] {
        let mut c = BlockConfig::new(file.as_path());
        c.queues = queues;
        c.queue_size = size;
        assert!(
            matches!(Block::new(c), Err(BlockError::InvalidConfig(_))),
            "{queues} x {size}"
        );
    }
}

#[test]
fn worker_serves_queues_and_queue_reset_works() {
    let file = image(16 * 512);
    let mut config = BlockConfig::new(file.as_path());
    config.queues = 2;
    config.queue_size = 16;
    let mut block = Block::new(config).unwrap();
    block.ack_features(block.features());
    let mem = memory();
    let mut rings = [TestRing::new(&mem, 0, 16), TestRing::new(&mem, 0x1000, 16)];
    let (activations, kicks): (Vec<_>, Vec<_>) =
        (0..2).zip(&rings).map(|(i, r)| r.activation(i)).unzip();
    let irq = Arc::new(RecordingInterrupt::default());
    block
        .activate(atomic(&mem), irq.clone(), activations)
        .unwrap();

    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
    header[8..].copy_from_slice(&3u64.to_le_bytes());
    mem.write_slice(&header, GuestAddress(HDR)).unwrap();
    let chain = [Desc::r(HDR, 16), Desc::w(DATA, 512), Desc::w(STATUS, 1)];

    // Queue 1 is served and interrupts.
    rings[1].add_chain(&chain);
    kicks[1].write(1).unwrap();
    assert!(rings[1].wait_used(1), "queue 1");
    assert_eq!(rings[1].used_elem(0).1, 513);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    let mut data = [0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    assert!(data
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(3 * 512 + i as u64)));
    assert!(wait_until(|| irq.count(1) > 0), "interrupt");

    // Reset queue 0: queue 1 keeps working, queue 0 is not served.
    let qa = block.reset_queue(0).expect("queue 0 handed back");
    assert_eq!(qa.index, 0);
    assert!(block.reset_queue(0).is_none());
    rings[0].add_chain(&chain);
    kicks[0].write(1).unwrap();
    rings[1].add_chain(&chain);
    kicks[1].write(1).unwrap();
    assert!(rings[1].wait_used(2), "queue 1 again");
    assert_eq!(rings[0].used_idx(), 0);

    // Re-enable it (as the driver would, with a fresh ring) and use it.
    rings[0] = TestRing::new(&mem, 0, 16);
    let again = QueueActivation {
        index: 0,
        queue: rings[0].queue(),
        notifier: qa.notifier,
    };
    block.enable_queue(again).unwrap();
    rings[0].add_chain(&chain);
    kicks[0].write(1).unwrap();
    assert!(rings[0].wait_used(1), "queue 0");

    // Enabling a queue twice or one that does not exist fails.
    let (dup, _) = rings[0].activation(0);
    assert!(block.enable_queue(dup).is_err());
    rings[0].add_chain(&chain);
    kicks[0].write(1).unwrap();
    assert!(rings[0].wait_used(2), "worker restarted");

    block.reset();
    assert!(block.reset_queue(1).is_none());
}

#[test]
fn a_broken_queue_asks_for_a_reset() {
    let file = image(16 * 512);
    let mut block = Block::new(BlockConfig::new(file.as_path())).unwrap();
    let mem = memory();
    let ring = TestRing::new(&mem, 0, 16);
    let (qa, kick) = ring.activation(0);
    let irq = Arc::new(RecordingInterrupt::default());
    block.activate(atomic(&mem), irq.clone(), vec![qa]).unwrap();
    // An available index 1000 ahead of a 16-entry ring.
    ring.set_avail_idx(1000);
    kick.write(1).unwrap();
    assert!(wait_until(|| *irq.needs_reset.lock().unwrap() == 1));
    // Stopped: later notifications neither complete nor ask again.
    kick.write(1).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(ring.used_idx(), 0);
    assert_eq!(*irq.needs_reset.lock().unwrap(), 1);
    block.reset();
}

#[test]
fn activation_rejects_bad_queue_sets() {
    let rig = Rig::new(512);
    let mut block = rig.block;
    let mem = atomic(&memory());
    let irq = Arc::new(RecordingInterrupt::default());
    assert!(block
        .activate(mem.clone(), irq.clone(), Vec::new())
        .is_err());
    let ring = TestRing::new(&rig.mem, 0, 16);
    let (bad, _) = ring.activation(1);
    assert!(block.activate(mem, irq, vec![bad]).is_err());
}

/// Environment variable that turns [`durability_child`] into the child.
const CHILD_ENV: &str = "TRELLIS_BLK_DURABILITY_IMAGE";

/// Writes a sector through the device, flushes, reports and is SIGKILLed
/// while still holding the image: nothing can be left in our buffers.
#[test]
fn durability_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return; // Only meaningful when run by `flushed_writes_survive_sigkill`.
    };
    let block = Block::new(BlockConfig::new(&path)).unwrap();
    let mut processor = block.request_processor();
    let mem = memory();
    let mut ring = TestRing::new(&mem, 0, 16);
    let mut queue = ring.queue();
    mem.write_slice(&[0x42u8; 512], GuestAddress(DATA)).unwrap();
    for (request_type, data) in [
        (VIRTIO_BLK_T_OUT, Some(Desc::r(DATA, 512))),
        (VIRTIO_BLK_T_FLUSH, None),
    ] {
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..].copy_from_slice(&5u64.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HDR)).unwrap();
        let descs: Vec<Desc> = [Some(Desc::r(HDR, 16)), data, Some(Desc::w(STATUS, 1))]
            .into_iter()
            .flatten()
            .collect();
        ring.add_chain(&descs);
        assert_eq!(processor.process_queue(&mem, &mut queue).completed, 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), S_OK);
    }
    // SAFETY: raising a signal on ourselves has no memory-safety impact.
    unsafe { libc::raise(libc::SIGKILL) };
    unreachable!("SIGKILL is not catchable");
}

#[test]
fn flushed_writes_survive_sigkill() {
    use std::os::unix::process::ExitStatusExt;
    let file = image(16 * 512);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "block::device_tests::durability_child",
            "--nocapture",
        ])
        .env(CHILD_ENV, file.as_path())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "child: {status:?}");
    let fresh = std::fs::File::open(file.as_path()).unwrap();
    let mut sector = [0u8; 512];
    fresh.read_exact_at(&mut sector, 5 * 512).unwrap();
    assert_eq!(sector, [0x42; 512]);
    let mut before = [0u8; 512];
    fresh.read_exact_at(&mut before, 4 * 512).unwrap();
    assert!(before
        .iter()
        .enumerate()
        .all(|(i, b)| *b == pattern(4 * 512 + i as u64)));
}
