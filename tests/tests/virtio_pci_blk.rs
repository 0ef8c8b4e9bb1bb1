//! virtio-blk behind the PCI transport, driven by the in-process guest
//! driver (`tests::virtio_driver`) only through configuration space and BAR
//! accesses: the device does real I/O on an image file, with the queue
//! addresses written either as one 8-byte access or as two 4-byte halves.
//! The rings sit above 4 GiB so that both halves of every address matter.
//!
//! Every wait is bounded by [`device_io::WAIT`]; a failure says what was
//! observed.

#[path = "support/device_io.rs"]
mod device_io;
#[path = "support/rig.rs"]
mod rig;

use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use device_io::{
    assert_bytes, check_identity, check_queue_addresses, msix_messages, rig_with, ring, wait_used,
    wait_vector, DATA, HIGH_DATA, QUEUE_SIZE,
};
use rig::Rig;
use tests::virtio_driver::transport::features;
use tests::virtio_driver::{AddrWidth, Buffer, ConfigMechanism, SplitQueue, VirtioPciDriver};
use virtio_devices::block::{Block, BlockConfig};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

/// virtio-blk feature bits, request types and status values (virtio 1.2
/// §5.2.3, §5.2.6).
mod blk {
    pub const F_SEG_MAX: u64 = 1 << 2;
    pub const F_RO: u64 = 1 << 5;
    pub const F_BLK_SIZE: u64 = 1 << 6;
    pub const F_FLUSH: u64 = 1 << 9;
    pub const T_IN: u32 = 0;
    pub const T_OUT: u32 = 1;
    pub const T_FLUSH: u32 = 4;
    pub const T_GET_ID: u32 = 8;
    pub const S_OK: u8 = 0;
    pub const S_IOERR: u8 = 1;
    pub const SECTOR: u64 = 512;
}

/// Image size in sectors.
const IMAGE_SECTORS: u64 = 2048;
/// The sector the tests write.
const TEST_SECTOR: u64 = 37;
const SERIAL: &str = "trellis-pci-blk";

/// The background byte at every image offset.
fn background(offset: u64) -> u8 {
    (offset % 251) as u8 ^ 0x5a
}

/// What the tests write at sector `sector`: every byte differs from the
/// background it replaces.
fn written_pattern(sector: u64, len: usize) -> Vec<u8> {
    let at = sector * blk::SECTOR;
    (0..len)
        .map(|i| !background(at + i as u64) ^ (i as u8 & 0x3c))
        .collect()
}

/// A temporary image of [`IMAGE_SECTORS`] filled with [`background`].
fn blk_image() -> TempFile {
    let file = TempFile::new_in(&std::env::temp_dir()).expect("temp file");
    let bytes: Vec<u8> = (0..IMAGE_SECTORS * blk::SECTOR).map(background).collect();
    file.as_file().write_all_at(&bytes, 0).expect("fill image");
    file
}

fn blk_device(path: PathBuf, read_only: bool) -> Block {
    let mut config = BlockConfig::new(path);
    config.read_only = read_only;
    config.serial = Some(SERIAL.into());
    config.queue_size = QUEUE_SIZE;
    Block::new(config).expect("block device")
}

/// `len` bytes of the image at byte `offset`, read on the host.
fn host_read(image: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    image
        .as_file()
        .read_exact_at(&mut buf, offset)
        .expect("read image");
    buf
}

/// A completed virtio-blk request.
#[derive(Debug)]
struct BlkDone {
    status: u8,
    used_len: u32,
    /// The device-writable data buffers, concatenated.
    data: Vec<u8>,
}

/// A virtio-blk driver on top of the transport driver: one request queue
/// on MSI-X vector 0, configuration changes on vector 1.
struct BlkDriver<'r> {
    rig: &'r Rig,
    driver: VirtioPciDriver<'r>,
    queue: SplitQueue,
}

impl<'r> BlkDriver<'r> {
    /// Probes, negotiates `wanted`, reads the configuration and brings the
    /// queue up at ring slot `slot`; returns the driver and the capacity.
    fn bring_up(
        rig: &'r Rig,
        driver: VirtioPciDriver<'r>,
        wanted: u64,
        width: AddrWidth,
        slot: u64,
    ) -> (Self, u64) {
        let queue = blk_init(rig, &driver, wanted, width, slot);
        let capacity = blk_check_config(&driver);
        (Self { rig, driver, queue }, capacity)
    }

    /// Resets the device and initializes it again from scratch.
    fn reinit(&mut self, wanted: u64, width: AddrWidth, slot: u64) {
        self.driver.reset().expect("reset");
        assert_eq!(self.driver.status(), 0, "status after reset");
        self.queue = blk_init(self.rig, &self.driver, wanted, width, slot);
        assert_eq!(blk_check_config(&self.driver), IMAGE_SECTORS);
    }

    /// Performs one request: a header, `out` (device-readable data
    /// buffers), `ins` (lengths of device-writable data buffers) and the
    /// status byte, each in its own descriptor. Checks that the chain came
    /// back under its head and that it raised exactly one interrupt, on
    /// vector 0.
    fn request(&mut self, kind: u32, sector: u64, out: &[&[u8]], ins: &[u32]) -> BlkDone {
        let mem = &self.rig.mem;
        let header = DATA;
        let status = DATA + 0x100;
        let mut at = DATA + 0x1000;
        let mut header_bytes = [0u8; 16];
        header_bytes[..4].copy_from_slice(&kind.to_le_bytes());
        header_bytes[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header_bytes, GuestAddress(header))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(status)).unwrap();

        let mut chain = vec![Buffer::readable(header, 16)];
        for data in out {
            mem.write_slice(data, GuestAddress(at)).unwrap();
            chain.push(Buffer::readable(at, data.len() as u32));
            at += (data.len() as u64).next_multiple_of(0x1000);
        }
        // What the device writes goes to high RAM.
        let mut at = HIGH_DATA;
        let mut in_bufs = Vec::new();
        for &len in ins {
            mem.write_slice(&vec![0xcc; len as usize], GuestAddress(at))
                .unwrap();
            chain.push(Buffer::writable(at, len));
            in_bufs.push((at, len));
            at += u64::from(len).next_multiple_of(0x1000);
        }
        chain.push(Buffer::writable(status, 1));

        let head = self.queue.add_chain(&chain).unwrap();
        self.driver.notify(0);
        let what = format!("blk request type {kind} at sector {sector}");
        let (id, used_len) = wait_used(self.rig, &self.driver, &mut self.queue, &what);
        assert_eq!(id, u32::from(head), "{what}: used id");
        let vectors = wait_vector(self.rig, 0, &what);
        assert_eq!(vectors, [0], "{what}: interrupts raised");
        assert!(!self.rig.intx(), "{what}: INTx asserted with MSI-X on");

        let mut data = Vec::new();
        for (addr, len) in in_bufs {
            let mut buf = vec![0u8; len as usize];
            mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            data.extend_from_slice(&buf);
        }
        BlkDone {
            status: mem.read_obj(GuestAddress(status)).unwrap(),
            used_len,
            data,
        }
    }

    fn read(&mut self, sector: u64, ins: &[u32]) -> BlkDone {
        self.request(blk::T_IN, sector, &[], ins)
    }
}

/// Negotiates `wanted` (all of which the device must offer), routes
/// configuration changes to vector 1 and queue 0 to vector 0, sets the
/// queue up and sets DRIVER_OK.
fn blk_init(
    rig: &Rig,
    driver: &VirtioPciDriver,
    wanted: u64,
    width: AddrWidth,
    slot: u64,
) -> SplitQueue {
    let accepted = driver.negotiate(wanted).expect("negotiation");
    assert_eq!(
        accepted,
        wanted,
        "features missing from the offer: {:#x}",
        wanted & !accepted
    );
    assert_eq!(driver.num_queues(), 1, "num_queues");
    driver.enable_msix(&msix_messages(2)).expect("MSI-X");
    driver.set_config_vector(1).expect("config vector");
    let event_idx = wanted & features::RING_EVENT_IDX != 0;
    let queue = driver
        .setup_queue(
            &rig.mem,
            0,
            QUEUE_SIZE,
            ring(slot),
            width,
            Some(0),
            event_idx,
        )
        .expect("queue 0");
    check_queue_addresses(driver, &queue, width);
    driver.driver_ok();
    assert_eq!(driver.status(), 0x0f, "status after DRIVER_OK");
    queue
}

/// Reads capacity, seg_max and blk_size with the generation loop; returns
/// the capacity.
fn blk_check_config(driver: &VirtioPciDriver) -> u64 {
    let cap = driver
        .device_cfg
        .expect("virtio-blk has device configuration");
    assert!(
        cap.length >= 24,
        "device configuration of {} bytes",
        cap.length
    );
    let mut config = [0u8; 24];
    driver.read_config(0, &mut config).expect("config read");
    let capacity = u64::from_le_bytes(config[0..8].try_into().unwrap());
    let seg_max = u32::from_le_bytes(config[12..16].try_into().unwrap());
    let blk_size = u32::from_le_bytes(config[20..24].try_into().unwrap());
    assert_eq!(capacity, IMAGE_SECTORS, "capacity in config {config:02x?}");
    assert_eq!(blk_size, 512, "blk_size in config {config:02x?}");
    assert!(seg_max >= 1, "seg_max {seg_max}");
    capacity
}

/// Full read-write virtio-blk session: probe, features, configuration,
/// write, flush, read, GET_ID, out-of-range requests, the image on the
/// host, then reset and a read after reinitialization.
fn blk_session(mechanism: ConfigMechanism, width: AddrWidth, event_idx: bool) {
    let image = blk_image();
    let rig = rig_with(blk_device(image.as_path().to_path_buf(), false));
    let driver = rig.probe(mechanism);
    check_identity(&driver, 0x1042, (0x01, 0x00));
    let offered = driver.device_features();
    for (bit, name) in [
        (features::VERSION_1, "VERSION_1"),
        (blk::F_FLUSH, "FLUSH"),
        (blk::F_BLK_SIZE, "BLK_SIZE"),
        (blk::F_SEG_MAX, "SEG_MAX"),
        (features::RING_EVENT_IDX, "EVENT_IDX"),
    ] {
        assert_ne!(offered & bit, 0, "{name} not offered: {offered:#x}");
    }
    assert_eq!(offered & blk::F_RO, 0, "a writable disk offers RO");

    let mut wanted = features::VERSION_1 | blk::F_FLUSH | blk::F_BLK_SIZE | blk::F_SEG_MAX;
    if event_idx {
        wanted |= features::RING_EVENT_IDX;
    }
    let (mut blk, capacity) = BlkDriver::bring_up(&rig, driver, wanted, width, 0);
    // Nothing happened yet: no interrupt may have fired.
    assert_eq!(
        rig.msix.take_triggered(),
        [] as [u16; 0],
        "early interrupts"
    );

    // Two sectors from two 512-byte descriptors.
    let pattern = written_pattern(TEST_SECTOR, 1024);
    let done = blk.request(
        blk::T_OUT,
        TEST_SECTOR,
        &[&pattern[..512], &pattern[512..]],
        &[],
    );
    assert_eq!(
        (done.status, done.used_len),
        (blk::S_OK, 1),
        "write {done:?}"
    );

    let done = blk.request(blk::T_FLUSH, 0, &[], &[]);
    assert_eq!(
        (done.status, done.used_len),
        (blk::S_OK, 1),
        "flush {done:?}"
    );

    // On the host: the two sectors hold the pattern, their neighbours the
    // background.
    let start = (TEST_SECTOR - 1) * blk::SECTOR;
    let host = host_read(&image, start, 4 * blk::SECTOR as usize);
    let expect_neighbour = |from: u64| -> Vec<u8> { (from..from + 512).map(background).collect() };
    assert_eq!(&host[..512], expect_neighbour(start), "sector before");
    assert_bytes(&host[512..1536], &pattern, "image at the written sectors");
    assert_eq!(
        &host[1536..],
        expect_neighbour(start + 1536),
        "sector after"
    );

    // Read back into one 1024-byte buffer.
    let done = blk.read(TEST_SECTOR, &[1024]);
    assert_eq!((done.status, done.used_len), (blk::S_OK, 1025), "read");
    assert_bytes(&done.data, &pattern, "read back");

    // Three sectors around it, split 512 + 1024 across descriptors.
    let done = blk.read(TEST_SECTOR - 1, &[512, 1024]);
    assert_eq!((done.status, done.used_len), (blk::S_OK, 1537), "read 3");
    assert_bytes(
        &done.data,
        &host[..1536],
        "three sectors around the written ones",
    );

    // The last sector is readable.
    let done = blk.read(capacity - 1, &[512]);
    assert_eq!(
        (done.status, done.used_len),
        (blk::S_OK, 513),
        "last sector"
    );
    let last = (capacity - 1) * blk::SECTOR;
    assert_bytes(
        &done.data,
        &(last..last + 512).map(background).collect::<Vec<_>>(),
        "last sector",
    );

    let done = blk.request(blk::T_GET_ID, 0, &[], &[20]);
    assert_eq!((done.status, done.used_len), (blk::S_OK, 21), "GET_ID");
    let mut id = SERIAL.as_bytes().to_vec();
    id.resize(20, 0);
    assert_eq!(
        done.data,
        id,
        "GET_ID answered {:?}",
        String::from_utf8_lossy(&done.data)
    );

    // Past the end: refused, nothing written to the buffer.
    for (sector, len) in [(capacity, 512), (capacity - 1, 1024), (u64::MAX, 512)] {
        let done = blk.read(sector, &[len]);
        assert_eq!(
            (done.status, done.used_len),
            (blk::S_IOERR, 1),
            "read of {len} bytes at sector {sector} (capacity {capacity})"
        );
        assert_bytes(
            &done.data,
            &vec![0xcc; len as usize],
            &format!("buffer of the failed read at sector {sector}"),
        );
    }
    let done = blk.request(blk::T_OUT, capacity, &[&pattern[..512]], &[]);
    assert_eq!(done.status, blk::S_IOERR, "write past the end {done:?}");
    let len = image.as_file().metadata().unwrap().len();
    assert_eq!(len, IMAGE_SECTORS * blk::SECTOR, "image grew");

    // Reset, initialize again with new rings, and read the data back.
    blk.reinit(wanted, width, 1);
    let done = blk.read(TEST_SECTOR, &[1024]);
    assert_eq!(
        (done.status, done.used_len),
        (blk::S_OK, 1025),
        "read after reset"
    );
    assert_bytes(&done.data, &pattern, "read after reset");
}

#[test]
fn blk_io_with_qword_queue_addresses_and_event_idx_over_ecam() {
    blk_session(ConfigMechanism::Ecam, AddrWidth::Qword, true);
}

#[test]
fn blk_io_with_dword_queue_addresses_over_port_io() {
    blk_session(ConfigMechanism::PortIo, AddrWidth::DwordHalves, false);
}

#[test]
fn blk_read_only_disk_reports_ro_and_refuses_writes() {
    let image = blk_image();
    let rig = rig_with(blk_device(image.as_path().to_path_buf(), true));
    let driver = rig.probe(ConfigMechanism::PortIo);
    let offered = driver.device_features();
    assert_ne!(offered & blk::F_RO, 0, "RO not offered: {offered:#x}");
    let wanted = features::VERSION_1 | blk::F_RO | blk::F_FLUSH | blk::F_BLK_SIZE;
    let (mut blk, _) = BlkDriver::bring_up(&rig, driver, wanted, AddrWidth::DwordHalves, 0);

    let pattern = written_pattern(TEST_SECTOR, 512);
    let done = blk.request(blk::T_OUT, TEST_SECTOR, &[&pattern], &[]);
    assert_eq!(
        (done.status, done.used_len),
        (blk::S_IOERR, 1),
        "write to a read-only disk"
    );

    // Reads still work and see the untouched image.
    let done = blk.read(TEST_SECTOR, &[512]);
    assert_eq!((done.status, done.used_len), (blk::S_OK, 513), "read");
    let at = TEST_SECTOR * blk::SECTOR;
    assert_bytes(
        &done.data,
        &(at..at + 512).map(background).collect::<Vec<_>>(),
        "read from the read-only disk",
    );
    let host = host_read(&image, 0, (IMAGE_SECTORS * blk::SECTOR) as usize);
    let first_change = host
        .iter()
        .enumerate()
        .position(|(i, &b)| b != background(i as u64));
    assert_eq!(
        first_change, None,
        "read-only image modified at this offset"
    );
}
