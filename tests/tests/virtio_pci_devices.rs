//! virtio-blk, virtio-rng and virtio-net (and virtio-console with rings
//! above 4 GiB; its main test is virtio_pci_console.rs) behind the PCI
//! transport, driven by the in-process guest driver
//! (`tests::virtio_driver`) only through configuration space and BAR
//! accesses: each device does real I/O, with the queue addresses written
//! either as one 8-byte access or as two 4-byte halves. The rings sit above
//! 4 GiB so that both halves of every address matter.
//!
//! Every wait is bounded by [`WAIT`]; a failure says what was observed.

#[path = "support/rig.rs"]
mod rig;

use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rig::{bdf, Rig};
use tests::virtio_driver::transport::{common, features};
use tests::virtio_driver::{
    pci as guest_pci, AddrWidth, Buffer, ConfigMechanism, SplitQueue, VirtioPciDriver,
};
use virtio_devices::block::{Block, BlockConfig};
use virtio_devices::net::{MacAddr, Net, NetBackend};
use virtio_devices::rng::Rng;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

/// Longest the test waits for anything the device does.
const WAIT: Duration = Duration::from_secs(5);
/// Entries per virtqueue.
const QUEUE_SIZE: u16 = 64;
/// Guest RAM above 4 GiB, where the rings go, so that both halves of
/// every queue address matter.
const HIGH_RAM: u64 = 0x3_8000_0000;
const HIGH_RAM_SIZE: usize = 1 << 20;
/// Data buffers in low RAM.
const DATA: u64 = 0x10_0000;
/// Data buffers in high RAM, above the rings.
const HIGH_DATA: u64 = HIGH_RAM + 0x8_0000;

/// MSI-X messages (address, data) for vectors `0..count`, distinct per
/// vector.
fn msix_messages(count: u16) -> Vec<(u64, u32)> {
    (0..count)
        .map(|v| (0xfee0_0000 + (u64::from(v) << 12), 0x4100 + u32::from(v)))
        .collect()
}

/// Guest address of ring slot `n` (64 KiB each, in high RAM).
fn ring(n: u64) -> u64 {
    HIGH_RAM + 0x1_0000 * n
}

/// The transport rig with `device`, and RAM below and above 4 GiB.
fn rig_with<D: virtio_devices::VirtioDevice + 'static>(device: D) -> Rig {
    Rig::with_memory(
        device,
        &[
            (GuestAddress(0), rig::MEM_SIZE),
            (GuestAddress(HIGH_RAM), HIGH_RAM_SIZE),
        ],
    )
}

/// Waits for the next used element of `queue`; on timeout, panics with the
/// device status, the used index and the interrupts seen.
fn wait_used(
    rig: &Rig,
    driver: &VirtioPciDriver,
    queue: &mut SplitQueue,
    what: &str,
) -> (u32, u32) {
    queue.wait_used(WAIT).unwrap_or_else(|e| {
        panic!(
            "{what}: {e} within {WAIT:?}; queue {} used idx {:?}, device status {:#04x}, \
             interrupt calls {:?}, INTx {}",
            queue.index,
            queue.used_idx(),
            driver.status(),
            rig.msix.take_events(),
            rig.intx()
        )
    })
}

/// Waits until MSI-X `vector` fires; returns every vector fired meanwhile
/// (including ones fired before the call and not yet collected).
fn wait_vector(rig: &Rig, vector: u16, what: &str) -> Vec<u16> {
    let deadline = Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        seen.extend(rig.msix.take_triggered());
        if seen.contains(&vector) {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: MSI-X vector {vector} not triggered within {WAIT:?}; \
             vectors triggered: {seen:?}, INTx {}",
            rig.intx()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Asserts `got == want`, reporting the lengths and the first difference
/// rather than two long dumps.
fn assert_bytes(got: &[u8], want: &[u8], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let show = |v: &[u8]| v[at.min(v.len())..(at + 16).min(v.len())].to_vec();
    panic!(
        "{what}: {} bytes, expected {}; first difference at {at}: got {:02x?}, expected {:02x?}",
        got.len(),
        want.len(),
        show(got),
        show(want)
    );
}

/// Checks the identity registers in configuration space.
fn check_identity(driver: &VirtioPciDriver, device_id: u16, class: (u8, u8)) {
    let cfg = driver.cfg();
    assert_eq!(cfg.read16(bdf(), guest_pci::VENDOR_ID), 0x1af4, "vendor");
    assert_eq!(cfg.read16(bdf(), guest_pci::DEVICE_ID), device_id, "device");
    assert_eq!(
        (
            cfg.read8(bdf(), guest_pci::CLASS + 2),
            cfg.read8(bdf(), guest_pci::CLASS + 1)
        ),
        class,
        "class, subclass"
    );
    assert!(
        cfg.read8(bdf(), guest_pci::REVISION) >= 1,
        "modern revision"
    );
}

/// Reads the selected queue's three ring addresses back in 4-byte halves
/// (what the spec guarantees) and, with `width` Qword, as 8-byte reads too.
fn check_queue_addresses(driver: &VirtioPciDriver, queue: &SplitQueue, width: AddrWidth) {
    driver.select_queue(queue.index);
    for (field, want, name) in [
        (common::QUEUE_DESC, queue.desc, "queue_desc"),
        (common::QUEUE_DRIVER, queue.avail, "queue_driver"),
        (common::QUEUE_DEVICE, queue.used, "queue_device"),
    ] {
        let halves = driver.read_common(field, 4) | driver.read_common(field + 4, 4) << 32;
        assert_eq!(
            halves, want,
            "queue {} {name} read back in halves after {width:?} writes",
            queue.index
        );
        if width == AddrWidth::Qword {
            assert_eq!(
                driver.read_common(field, 8),
                want,
                "queue {} {name} read back as a qword",
                queue.index
            );
        }
    }
}

// ---------------------------------------------------------------- virtio-blk

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

// ---------------------------------------------------------------- virtio-rng

/// Two entropy requests: one 64-byte buffer, then 64 bytes as two 32-byte
/// descriptors.
fn rng_session(mechanism: ConfigMechanism, width: AddrWidth, event_idx: bool) {
    let rig = rig_with(Rng::new("/dev/urandom".into()).expect("rng"));
    let driver = rig.probe(mechanism);
    check_identity(&driver, 0x1044, (0xff, 0x00));
    assert!(
        driver.device_cfg.is_none(),
        "virtio-rng has no device configuration, found {:?}",
        driver.device_cfg
    );
    let mut wanted = features::VERSION_1;
    if event_idx {
        wanted |= features::RING_EVENT_IDX;
    }
    assert_eq!(driver.negotiate(wanted).expect("negotiation"), wanted);
    assert_eq!(driver.num_queues(), 1, "num_queues");
    driver.enable_msix(&msix_messages(2)).expect("MSI-X");
    driver.set_config_vector(1).expect("config vector");
    let mut queue = driver
        .setup_queue(&rig.mem, 0, QUEUE_SIZE, ring(0), width, Some(0), event_idx)
        .expect("queue 0");
    check_queue_addresses(&driver, &queue, width);
    driver.driver_ok();
    assert_eq!(driver.status(), 0x0f, "status after DRIVER_OK");

    // A guard after the buffer shows the device keeps to its length.
    let buf = DATA;
    rig.mem.write_slice(&[0u8; 64], GuestAddress(buf)).unwrap();
    rig.mem
        .write_slice(&[0xee; 64], GuestAddress(buf + 64))
        .unwrap();
    let head = queue.add_chain(&[Buffer::writable(buf, 64)]).unwrap();
    driver.notify(0);
    let (id, len) = wait_used(&rig, &driver, &mut queue, "entropy");
    assert_eq!((id, len), (u32::from(head), 64), "used element");
    assert_eq!(wait_vector(&rig, 0, "entropy"), [0], "interrupts");
    let mut first = [0u8; 128];
    rig.mem.read_slice(&mut first, GuestAddress(buf)).unwrap();
    assert!(
        first[..64].iter().any(|&b| b != 0),
        "64 bytes of entropy all zero"
    );
    assert!(
        first[64..].iter().all(|&b| b == 0xee),
        "device wrote past the buffer: {:02x?}",
        &first[64..]
    );

    let (a, b) = (DATA + 0x1000, HIGH_DATA);
    rig.mem.write_slice(&[0u8; 32], GuestAddress(a)).unwrap();
    rig.mem.write_slice(&[0u8; 32], GuestAddress(b)).unwrap();
    let head = queue
        .add_chain(&[Buffer::writable(a, 32), Buffer::writable(b, 32)])
        .unwrap();
    driver.notify(0);
    let (id, len) = wait_used(&rig, &driver, &mut queue, "entropy in two buffers");
    assert_eq!((id, len), (u32::from(head), 64), "used element");
    assert_eq!(wait_vector(&rig, 0, "entropy in two buffers"), [0]);
    let mut second = [0u8; 64];
    rig.mem
        .read_slice(&mut second[..32], GuestAddress(a))
        .unwrap();
    rig.mem
        .read_slice(&mut second[32..], GuestAddress(b))
        .unwrap();
    assert!(
        second[..32].iter().any(|&b| b != 0) && second[32..].iter().any(|&b| b != 0),
        "a 32-byte buffer stayed zero: {second:02x?}"
    );
    assert_ne!(first[..64], second, "the same 64 bytes twice");
}

#[test]
fn rng_fills_buffers_with_qword_queue_addresses() {
    rng_session(ConfigMechanism::Ecam, AddrWidth::Qword, false);
}

#[test]
fn rng_fills_buffers_with_dword_queue_addresses_and_event_idx() {
    rng_session(ConfigMechanism::PortIo, AddrWidth::DwordHalves, true);
}

// ---------------------------------------------------------------- virtio-net

/// virtio-net feature bits, status and header (virtio 1.2 §5.1.3-§5.1.6).
mod net {
    pub const F_MAC: u64 = 1 << 5;
    pub const F_MRG_RXBUF: u64 = 1 << 15;
    pub const F_STATUS: u64 = 1 << 16;
    pub const F_CTRL_VQ: u64 = 1 << 17;
    pub const F_MQ: u64 = 1 << 22;
    pub const S_LINK_UP: u16 = 1;
    /// `virtio_net_hdr_v1`.
    pub const HDR_LEN: usize = 12;
    pub const HDR_F_DATA_VALID: u8 = 2;
}

const MAC: [u8; 6] = [0x02, 0x54, 0x52, 0x4c, 0x53, 0x01];

/// The device's end of the wire: one end of a datagram socket pair, so
/// every frame keeps its boundaries. The test holds the other end.
struct WireBackend {
    sock: UnixDatagram,
    offloads: Mutex<Vec<u32>>,
}

impl NetBackend for WireBackend {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.sock.recv(buf)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        self.sock.send(frame)
    }
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
    fn set_offload(&self, flags: u32) -> std::io::Result<()> {
        self.offloads.lock().unwrap().push(flags);
        Ok(())
    }
}

/// An Ethernet frame of `len` bytes (at least 14) from `src` to `dst`,
/// EtherType 0x88b5 (local experimental), payload numbered by `seed`.
fn ether_frame(dst: [u8; 6], src: [u8; 6], len: usize, seed: u8) -> Vec<u8> {
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&[0x88, 0xb5]);
    frame.extend((0..len - 14).map(|i| (i as u8).wrapping_mul(7) ^ seed));
    frame
}

/// A `virtio_net_hdr_v1` with `flags` and `num_buffers`, the rest zero
/// (no checksum or segmentation offload).
fn net_header(flags: u8, num_buffers: u16) -> [u8; net::HDR_LEN] {
    let mut hdr = [0u8; net::HDR_LEN];
    hdr[0] = flags;
    hdr[10..].copy_from_slice(&num_buffers.to_le_bytes());
    hdr
}

/// Receives one frame from the wire within [`WAIT`].
fn wire_recv(wire: &UnixDatagram, what: &str) -> Vec<u8> {
    let mut buf = vec![0u8; 65536];
    match wire.recv(&mut buf) {
        Ok(n) => {
            buf.truncate(n);
            buf
        }
        Err(e) => panic!("{what}: nothing on the wire within {WAIT:?}: {e}"),
    }
}

/// Receive queue 0 on vector 0, transmit queue 1 on vector 1,
/// configuration changes on vector 2. With `mrg`, 8 receive buffers of 256
/// bytes; without, 4 of 1526 (a full frame and its header, as the spec
/// asks of a driver without MRG_RXBUF).
fn net_session(mechanism: ConfigMechanism, width: AddrWidth, event_idx: bool, mrg: bool) {
    let (device_end, wire) = UnixDatagram::pair().unwrap();
    device_end.set_nonblocking(true).unwrap();
    wire.set_read_timeout(Some(WAIT)).unwrap();
    let backend = Arc::new(WireBackend {
        sock: device_end,
        offloads: Mutex::new(Vec::new()),
    });
    let device = Net::with_backends(
        vec![backend.clone() as Arc<dyn NetBackend>],
        Some(MacAddr::new(MAC)),
        QUEUE_SIZE,
    )
    .expect("net device");
    let rig = rig_with(device);
    let driver = rig.probe(mechanism);
    check_identity(&driver, 0x1041, (0x02, 0x00));

    let offered = driver.device_features();
    for (bit, name) in [
        (features::VERSION_1, "VERSION_1"),
        (net::F_MAC, "MAC"),
        (net::F_STATUS, "STATUS"),
        (net::F_MRG_RXBUF, "MRG_RXBUF"),
    ] {
        assert_ne!(offered & bit, 0, "{name} not offered: {offered:#x}");
    }
    assert_eq!(
        offered & (net::F_MQ | net::F_CTRL_VQ),
        0,
        "one queue pair offers MQ/CTRL_VQ: {offered:#x}"
    );
    let mut wanted = features::VERSION_1 | net::F_MAC | net::F_STATUS;
    if mrg {
        wanted |= net::F_MRG_RXBUF;
    }
    if event_idx {
        wanted |= features::RING_EVENT_IDX;
    }
    assert_eq!(driver.negotiate(wanted).expect("negotiation"), wanted);

    let mut config = [0u8; 8];
    driver.read_config(0, &mut config).expect("config read");
    assert_eq!(config[..6], MAC, "mac in config {config:02x?}");
    let status = u16::from_le_bytes([config[6], config[7]]);
    assert_eq!(status & net::S_LINK_UP, net::S_LINK_UP, "link status");

    assert_eq!(driver.num_queues(), 2, "receiveq and transmitq");
    driver.enable_msix(&msix_messages(3)).expect("MSI-X");
    driver.set_config_vector(2).expect("config vector");
    let mut rx = driver
        .setup_queue(&rig.mem, 0, QUEUE_SIZE, ring(0), width, Some(0), event_idx)
        .expect("receiveq");
    let mut tx = driver
        .setup_queue(&rig.mem, 1, QUEUE_SIZE, ring(1), width, Some(1), event_idx)
        .expect("transmitq");
    check_queue_addresses(&driver, &rx, width);
    check_queue_addresses(&driver, &tx, width);
    driver.driver_ok();
    assert_eq!(driver.status(), 0x0f, "status after DRIVER_OK");
    assert_eq!(
        *backend.offloads.lock().unwrap(),
        [0],
        "offloads set without GUEST_CSUM"
    );

    // --- Transmit: a header and a 60-byte frame in two descriptors, then
    // both in one; they reach the wire whole and in order.
    let frame1 = ether_frame([0xff; 6], MAC, 60, 1);
    let frame2 = ether_frame([0x02, 0, 0, 0, 0, 9], MAC, 60, 2);
    let hdr = net_header(0, 0);
    let t = DATA;
    rig.mem.write_slice(&hdr, GuestAddress(t)).unwrap();
    rig.mem
        .write_slice(&frame1, GuestAddress(t + 0x100))
        .unwrap();
    let one_piece = [&hdr[..], &frame2[..]].concat();
    rig.mem
        .write_slice(&one_piece, GuestAddress(t + 0x1000))
        .unwrap();
    let head1 = tx
        .add_chain(&[
            Buffer::readable(t, net::HDR_LEN as u32),
            Buffer::readable(t + 0x100, 60),
        ])
        .unwrap();
    let head2 = tx
        .add_chain(&[Buffer::readable(t + 0x1000, one_piece.len() as u32)])
        .unwrap();
    driver.notify(1);
    let sent1 = wire_recv(&wire, "first transmitted frame");
    let sent2 = wire_recv(&wire, "second transmitted frame");
    assert_eq!(sent1.len(), net::HDR_LEN + 60, "first frame on the wire");
    assert_bytes(&sent1, &[&hdr[..], &frame1[..]].concat(), "first frame");
    assert_bytes(&sent2, &one_piece, "second frame");
    let used1 = wait_used(&rig, &driver, &mut tx, "transmit 1");
    let used2 = wait_used(&rig, &driver, &mut tx, "transmit 2");
    assert_eq!(
        [used1, used2],
        [(u32::from(head1), 0), (u32::from(head2), 0)],
        "transmit used elements (id, len)"
    );
    let vectors = wait_vector(&rig, 1, "transmit");
    assert!(
        vectors.iter().all(|&v| v == 1),
        "transmit raised {vectors:?}"
    );

    // --- Receive. Frame A reaches the device before any receive buffer
    // exists and must wait for one; frame B arrives with buffers waiting.
    // The header's flags come through as 0 (no GUEST_CSUM) and
    // num_buffers says how many buffers the frame took.
    let frame_a = ether_frame(MAC, [0x02, 0, 0, 0, 0, 7], 60, 0xa);
    let frame_b = ether_frame(MAC, [0x02, 0, 0, 0, 0, 7], 588, 0xb);
    let wire_hdr = net_header(net::HDR_F_DATA_VALID, 0xbeef);
    wire.send(&[&wire_hdr[..], &frame_a[..]].concat()).unwrap();
    // Let the device find frame A with nowhere to put it.
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(rx.used_idx().unwrap(), 0, "receive with no buffers");

    let (count, buf_len) = if mrg { (8u64, 256u32) } else { (4, 1526) };
    let bufs: Vec<u64> = (0..count).map(|i| HIGH_DATA + i * 0x1000).collect();
    let mut heads = Vec::new();
    for &addr in &bufs {
        rig.mem
            .write_slice(&vec![0xdd; buf_len as usize], GuestAddress(addr))
            .unwrap();
        heads.push(rx.add_chain(&[Buffer::writable(addr, buf_len)]).unwrap());
    }
    driver.notify(0);

    let read_buf = |addr: u64, len: u32| {
        let mut v = vec![0u8; len as usize];
        rig.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    };
    let (id, len) = wait_used(&rig, &driver, &mut rx, "frame A");
    assert_eq!(
        (id, len as usize),
        (u32::from(heads[0]), net::HDR_LEN + 60),
        "frame A used element"
    );
    let got = read_buf(bufs[0], len);
    assert_eq!(got[..net::HDR_LEN], net_header(0, 1), "frame A header");
    assert_bytes(&got[net::HDR_LEN..], &frame_a, "frame A");
    assert_eq!(wait_vector(&rig, 0, "frame A"), [0], "frame A interrupts");

    rx.enable_interrupts().unwrap();
    wire.send(&[&wire_hdr[..], &frame_b[..]].concat()).unwrap();
    let total = net::HDR_LEN + frame_b.len();
    let mut got = Vec::new();
    let mut taken = 0;
    while got.len() < total {
        let (id, len) = wait_used(&rig, &driver, &mut rx, "frame B");
        let slot = 1 + taken;
        assert!(
            slot < heads.len(),
            "frame B took more than the buffers posted"
        );
        assert_eq!(id, u32::from(heads[slot]), "frame B buffer {taken} id");
        let full = buf_len.min((total - got.len()) as u32);
        assert_eq!(len, full, "frame B buffer {taken} used len");
        got.extend(read_buf(bufs[slot], len));
        taken += 1;
    }
    let expect_buffers = if mrg { total.div_ceil(256) } else { 1 };
    assert_eq!(taken, expect_buffers, "frame B buffers");
    assert_eq!(
        got[..net::HDR_LEN],
        net_header(0, expect_buffers as u16),
        "frame B header"
    );
    assert_bytes(&got[net::HDR_LEN..], &frame_b, "frame B");
    assert_eq!(wait_vector(&rig, 0, "frame B"), [0], "frame B interrupts");
    assert!(
        rx.pop_used().unwrap().is_none(),
        "extra receive completions"
    );
    assert!(!rig.intx(), "INTx asserted with MSI-X on");
}

#[test]
fn net_moves_frames_with_qword_queue_addresses() {
    net_session(ConfigMechanism::PortIo, AddrWidth::Qword, false, false);
}

#[test]
fn net_moves_frames_with_dword_queue_addresses_mrg_rxbuf_and_event_idx() {
    net_session(ConfigMechanism::Ecam, AddrWidth::DwordHalves, true, true);
}

// ------------------------------------------------------------ virtio-console

/// Guest output collected in memory.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// virtio_pci_console.rs covers the console with rings in low RAM, where
/// the high half of every queue address is 0. Here the rings sit above
/// 4 GiB, and each queue is set up once with each width (the widths swap
/// across a reset); input and output go through each time.
#[test]
fn console_rings_above_4g_with_each_width_on_each_queue() {
    use std::io::Write;
    use virtio_devices::console::{Console, ConsoleInput};

    let output = Output::default();
    let (mut host, guest_end) = std::os::unix::net::UnixStream::pair().unwrap();
    let input = ConsoleInput::new(std::os::fd::OwnedFd::from(guest_end)).unwrap();
    let rig = rig_with(Console::new(Box::new(output.clone()), Some(input)));
    let driver = rig.probe(ConfigMechanism::Ecam);
    check_identity(&driver, 0x1043, (0x07, 0x80));

    let mut expected_output = Vec::new();
    for (round, (rx_width, tx_width)) in [
        (AddrWidth::DwordHalves, AddrWidth::Qword),
        (AddrWidth::Qword, AddrWidth::DwordHalves),
    ]
    .into_iter()
    .enumerate()
    {
        let round = round as u64;
        let wanted = features::VERSION_1 | features::RING_EVENT_IDX;
        assert_eq!(driver.negotiate(wanted).expect("negotiation"), wanted);
        driver.enable_msix(&msix_messages(3)).expect("MSI-X");
        driver.set_config_vector(2).expect("config vector");
        let mut rx = driver
            .setup_queue(&rig.mem, 0, 16, ring(2 * round), rx_width, Some(0), true)
            .expect("receiveq");
        let mut tx = driver
            .setup_queue(
                &rig.mem,
                1,
                16,
                ring(2 * round + 1),
                tx_width,
                Some(1),
                true,
            )
            .expect("transmitq");
        check_queue_addresses(&driver, &rx, rx_width);
        check_queue_addresses(&driver, &tx, tx_width);
        driver.driver_ok();
        assert_eq!(driver.status(), 0x0f, "round {round}: status");

        // Host to guest, into a buffer in high RAM.
        let inbox = HIGH_DATA + 0x1000 * round;
        rig.mem
            .write_slice(&[0u8; 64], GuestAddress(inbox))
            .unwrap();
        let head = rx.add_chain(&[Buffer::writable(inbox, 64)]).unwrap();
        driver.notify(0);
        let typed = format!("ping {round}");
        host.write_all(typed.as_bytes()).unwrap();
        let what = format!("round {round}: console input");
        let (id, len) = wait_used(&rig, &driver, &mut rx, &what);
        assert_eq!((id, len as usize), (u32::from(head), typed.len()), "{what}");
        let mut got = vec![0u8; typed.len()];
        rig.mem.read_slice(&mut got, GuestAddress(inbox)).unwrap();
        assert_eq!(String::from_utf8_lossy(&got), typed, "{what}");
        wait_vector(&rig, 0, &what);

        // Guest to host.
        let said = format!("pong {round};");
        rig.mem
            .write_slice(said.as_bytes(), GuestAddress(DATA))
            .unwrap();
        tx.add_chain(&[Buffer::readable(DATA, said.len() as u32)])
            .unwrap();
        driver.notify(1);
        let what = format!("round {round}: console output");
        wait_used(&rig, &driver, &mut tx, &what);
        wait_vector(&rig, 1, &what);
        expected_output.extend_from_slice(said.as_bytes());
        let deadline = Instant::now() + WAIT;
        while *output.0.lock().unwrap() != expected_output {
            assert!(
                Instant::now() < deadline,
                "{what}: host saw {:?}, expected {:?}",
                String::from_utf8_lossy(&output.0.lock().unwrap()),
                String::from_utf8_lossy(&expected_output)
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        driver.reset().expect("reset");
    }
}
