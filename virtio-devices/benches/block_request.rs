//! The virtio-blk request path, without the worker thread: 4 KiB reads
//! from an image on tmpfs (`/dev/shm`, else the temp dir) at queue depth 1
//! and 32. Each iteration makes the chains available and runs one
//! processing pass, as a notification would.
//!
//! Run: `cargo bench -p virtio-devices --bench block_request -- --quick`

use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
use virtio_devices::block::{Block, BlockConfig};
// The crate-root names test_ring.rs takes through `crate::`.
use virtio_devices::{
    GuestMemoryMmapAtomic, QueueActivation, VirtioInterrupt, VirtioInterruptType,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::tempfile::TempFile;

#[allow(dead_code)]
#[path = "../src/test_ring.rs"]
mod test_ring;

use test_ring::{Desc, TestRing};

const IMAGE_SIZE: u64 = 16 << 20;
const MEM_SIZE: usize = 4 << 20;
const QUEUE_SIZE: u16 = 256;
const HDR: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
const BLOCK: u32 = 4096;
const MAX_DEPTH: u16 = 32;

fn image() -> TempFile {
    let shm = Path::new("/dev/shm");
    let file = if shm.is_dir() {
        TempFile::new_in(shm)
    } else {
        TempFile::new()
    }
    .expect("temp image");
    let chunk = vec![0x5au8; 1 << 20];
    for i in 0..IMAGE_SIZE / chunk.len() as u64 {
        file.as_file()
            .write_all_at(&chunk, i * chunk.len() as u64)
            .expect("fill image");
    }
    file
}

fn bench_reads(c: &mut Criterion) {
    let file = image();
    let block = Block::new(BlockConfig::new(file.as_path())).expect("block device");
    let mut processor = block.request_processor();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");

    // 32 read chains, each with its own header, 4 KiB buffer and status,
    // at sectors spread over the image.
    let mut ring = TestRing::new(&mem, 0, QUEUE_SIZE);
    let mut heads = Vec::new();
    for i in 0..u64::from(MAX_DEPTH) {
        let sector = i * 64 * 8;
        let mut header = [0u8; 16];
        header[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        header[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HDR + 16 * i))
            .expect("header");
        heads.push(ring.write_chain(&[
            Desc::r(HDR + 16 * i, 16),
            Desc::w(DATA + u64::from(BLOCK) * i, BLOCK),
            Desc::w(STATUS + i, 1),
        ]));
    }
    let mut queue = ring.queue();

    let mut group = c.benchmark_group("block_request");
    for depth in [1u16, MAX_DEPTH] {
        group.throughput(Throughput::Elements(u64::from(depth)));
        group.bench_function(format!("read_4k_qd{depth}"), |b| {
            b.iter(|| {
                for head in &heads[..usize::from(depth)] {
                    ring.publish(*head);
                }
                let outcome = processor.process_queue(&mem, &mut queue);
                debug_assert_eq!(outcome.completed, usize::from(depth));
                black_box(outcome)
            })
        });
    }
    group.finish();

    let status: u8 = mem.read_obj(GuestAddress(STATUS)).expect("status");
    assert_eq!(u32::from(status), VIRTIO_BLK_S_OK, "reads must succeed");
}

criterion_group!(benches, bench_reads);
criterion_main!(benches);
