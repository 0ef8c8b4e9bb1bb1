//! Building the transport around a device, and applying ops the way a
//! driver, a root complex and a VMM would.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pci::interrupt::RecordingInterruptGroup;
use pci::{BarReprogrammingParams, InterruptError, IntxInterrupt, PciDevice};
use virtio_devices::block::{Block, BlockConfig};
use virtio_devices::console::Console;
use virtio_devices::net::{MacAddr, Net, NetBackend};
use virtio_devices::rng::Rng;
use virtio_devices::transport::{
    msix_vector_count, VirtioPciDevice, MSIX_TABLE_OFFSET, NOTIFY_OFFSET, NOTIFY_OFF_MULTIPLIER,
    VIRTIO_PCI_BAR_SIZE,
};
use virtio_devices::VirtioDevice;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{DeviceKind, Op};
use crate::requests::blk_model::Image;
use crate::requests::net::Fake;
use crate::threads::Baseline;
use crate::virtq::{atomic, guest_memory, DriverQueue, Link};

/// Guest RAM.
pub const MEM_SIZE: u64 = 0x10_0000;
/// Where BAR 0 starts.
pub const BAR_BASE: u64 = 0x1_0000_0000;
/// Addresses the VMM refuses to move BAR 0 to: RAM and the 32-bit hole
/// below 4 GiB, and anything beyond a 48-bit physical address space.
pub const REFUSED_BELOW: u64 = 0x1_0000_0000;
/// See [`REFUSED_BELOW`].
pub const REFUSED_FROM: u64 = 1 << 48;
/// Spare vectors in the interrupt group, so that a trigger beyond the
/// table is recorded (and caught) rather than refused.
pub const SPARE_VECTORS: u16 = 8;

/// Common configuration fields: (offset, size).
pub const FIELDS: [(u64, usize); 18] = [
    (0x00, 4),
    (0x04, 4),
    (0x08, 4),
    (0x0c, 4),
    (0x10, 2),
    (0x12, 2),
    (0x14, 1),
    (0x15, 1),
    (0x16, 2),
    (0x18, 2),
    (0x1a, 2),
    (0x1c, 2),
    (0x1e, 2),
    (0x20, 8),
    (0x28, 8),
    (0x30, 8),
    (0x38, 2),
    (0x3a, 2),
];
pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0c;
pub const MSIX_CONFIG: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub const QUEUE_ENABLE: u64 = 0x1c;
pub const QUEUE_DESC: u64 = 0x20;
pub const QUEUE_DRIVER: u64 = 0x28;
pub const QUEUE_DEVICE: u64 = 0x30;

/// The INTx line, recording its level and any redundant edge.
#[derive(Debug, Default)]
pub struct Intx {
    pub asserted: AtomicBool,
    pub redundant: AtomicBool,
    pub count: std::sync::atomic::AtomicUsize,
}

impl IntxInterrupt for Intx {
    fn assert(&self) -> Result<(), InterruptError> {
        self.count.fetch_add(1, Ordering::AcqRel);
        if self.asserted.swap(true, Ordering::AcqRel) {
            self.redundant.store(true, Ordering::Release);
        }
        Ok(())
    }

    fn deassert(&self) -> Result<(), InterruptError> {
        if !self.asserted.swap(false, Ordering::AcqRel) {
            self.redundant.store(true, Ordering::Release);
        }
        Ok(())
    }
}

/// Names the step for failure messages.
pub struct Describe<'a>(pub &'a Option<(usize, Op)>);

impl std::fmt::Display for Describe<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some((i, op)) => write!(f, "after step {i} ({op:x?})"),
            None => write!(f, "in the initial state"),
        }
    }
}

/// The transport under test and the harness's model of its surroundings.
pub struct Harness {
    pub(super) dev: VirtioPciDevice,
    pub(super) mem: GuestMemoryMmap,
    pub(super) group: Arc<RecordingInterruptGroup>,
    pub(super) intx: Arc<Intx>,
    pub(super) threads: Baseline,
    pub(super) vectors: u16,
    pub(super) num_queues: u16,
    /// Where the VMM has BAR 0 mapped.
    pub(super) mapped: u64,
    pub(super) msix_cap: usize,
    pub(super) cfg_cap: usize,
    /// Driver-side rings, once `Init` set queues up.
    pub(super) rings: Vec<DriverQueue>,
    pub(super) step: Option<(usize, Op)>,
    /// The step's last write to device_status was 0 (or it reset the
    /// device).
    pub(super) reset: bool,
    pub(super) stats: super::Stats,
    _image: Option<Image>,
}

fn build(kind: DeviceKind) -> (Arc<Mutex<dyn VirtioDevice>>, Option<Image>) {
    match kind {
        DeviceKind::Rng => {
            let rng = Rng::new(PathBuf::from("/dev/urandom")).expect("/dev/urandom opens");
            (Arc::new(Mutex::new(rng)), None)
        }
        DeviceKind::Blk { queues } => {
            let image = Image::create(8192, false);
            let blk = Block::new(BlockConfig {
                path: image.path.clone(),
                read_only: false,
                serial: None,
                queues: u16::from(queues % 3) + 1,
                queue_size: 64,
                lock: true,
            })
            .expect("the image opens");
            image.opened();
            (Arc::new(Mutex::new(blk)), Some(image))
        }
        DeviceKind::Console => {
            let console = Console::new(Box::new(std::io::sink()), None);
            (Arc::new(Mutex::new(console)), None)
        }
        DeviceKind::Net => {
            let backend: Arc<dyn NetBackend> = Arc::new(Fake::new());
            let mac = MacAddr::new([0x02, 0, 0, 0, 0, 2]);
            let net = Net::with_backends(vec![backend], Some(mac), 64).expect("valid device");
            (Arc::new(Mutex::new(net)), None)
        }
    }
}

impl Harness {
    /// The transport around a `kind` device, BAR 0 at [`BAR_BASE`].
    pub fn new(kind: DeviceKind) -> Self {
        let threads = Baseline::take();
        let (device, image) = build(kind);
        let (vectors, num_queues) = {
            let d = device.lock().unwrap_or_else(|e| e.into_inner());
            (msix_vector_count(&*d), d.queue_max_sizes().len() as u16)
        };
        let group = Arc::new(RecordingInterruptGroup::new(vectors + SPARE_VECTORS));
        let intx = Arc::new(Intx::default());
        let mem = guest_memory(MEM_SIZE);
        let dev = VirtioPciDevice::new(
            "fuzz".into(),
            device,
            atomic(&mem),
            group.clone(),
            Some(intx.clone()),
            BAR_BASE,
        )
        .expect("the transport builds");
        let mut h = Harness {
            dev,
            mem,
            group,
            intx,
            threads,
            vectors,
            num_queues,
            mapped: BAR_BASE,
            msix_cap: 0,
            cfg_cap: 0,
            rings: Vec::new(),
            step: None,
            reset: false,
            stats: super::Stats::default(),
            _image: image,
        };
        h.msix_cap = h.find_cap(0x11, None).expect("an MSI-X capability");
        h.cfg_cap = h
            .find_cap(0x09, Some(5))
            .expect("a PCI cfg access capability");
        h
    }

    /// Offset of the capability with `id` (and vendor `cfg_type`).
    fn find_cap(&mut self, id: u8, cfg_type: Option<u8>) -> Option<usize> {
        let mut at = self.cfg_read(0x34, 1) as usize & !3;
        for _ in 0..48 {
            if at < 0x40 {
                return None;
            }
            let header = self.cfg_read(at, 4);
            let matches = header as u8 == id && cfg_type.is_none_or(|t| (header >> 24) as u8 == t);
            if matches {
                return Some(at);
            }
            at = (header >> 8) as usize & 0xfc;
        }
        None
    }

    /// Configuration read of `len` bytes at `offset` (within a dword).
    pub(super) fn cfg_read(&mut self, offset: usize, len: usize) -> u32 {
        let dword = self.dev.read_config_register(offset / 4);
        let v = dword >> (offset % 4 * 8);
        if len >= 4 {
            v
        } else {
            v & ((1 << (len * 8)) - 1)
        }
    }

    /// Configuration write, as the root bus passes it on; BAR moves go to
    /// the VMM model.
    pub(super) fn cfg_write(&mut self, offset: usize, data: &[u8]) {
        let moves = self
            .dev
            .write_config_register(offset / 4, (offset % 4) as u64, data);
        for m in moves {
            self.vmm_move(&m);
        }
    }

    /// The VMM's side of a BAR move: applies it, or refuses and restores.
    fn vmm_move(&mut self, m: &BarReprogrammingParams) {
        let ctx = Describe(&self.step);
        assert_eq!(m.bar_index, 0, "{ctx}: move of BAR {}", m.bar_index);
        assert_eq!(
            m.old_base, self.mapped,
            "{ctx}: move reported from {:#x}, the VMM has BAR 0 at {:#x}",
            m.old_base, self.mapped
        );
        assert_eq!(
            m.len, VIRTIO_PCI_BAR_SIZE,
            "{ctx}: move of {:#x} bytes",
            m.len
        );
        let end = m.new_base.checked_add(m.len);
        if m.new_base >= REFUSED_BELOW && end.is_some_and(|e| e <= REFUSED_FROM) {
            self.mapped = m.new_base;
            self.stats.moves += 1;
        } else {
            self.dev.restore_bar(m);
        }
    }

    /// BAR 0 write of `value`'s first `len` bytes.
    pub(super) fn bar_write(&mut self, offset: u64, len: usize, value: u64) {
        if offset == DEVICE_STATUS
            || (offset < DEVICE_STATUS && offset + len as u64 > DEVICE_STATUS)
        {
            let byte = (value >> ((DEVICE_STATUS - offset) * 8)) as u8;
            self.reset = byte == 0;
        }
        self.dev.bar_write(offset, &value.to_le_bytes()[..len]);
    }

    /// BAR 0 read of `len` bytes.
    pub(super) fn bar_read(&mut self, offset: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.dev.bar_read(offset, &mut b[..len]);
        u64::from_le_bytes(b)
    }

    /// A common configuration field.
    pub(super) fn common(&mut self, offset: u64) -> u64 {
        let size = FIELDS.iter().find(|f| f.0 == offset).map_or(4, |f| f.1);
        self.bar_read(offset, size)
    }

    pub(super) fn set_common(&mut self, offset: u64, value: u64) {
        let size = FIELDS.iter().find(|f| f.0 == offset).map_or(4, |f| f.1);
        self.bar_write(offset, size, value);
    }

    /// Applies `op`, waits for the worker, checks every invariant.
    pub fn step(&mut self, index: usize, op: &Op) {
        self.step = Some((index, op.clone()));
        self.reset = false;
        let before = self.allowed_vectors();
        self.apply(op);
        self.threads.wait_idle(&Describe(&self.step));
        self.check_all();
        self.check_interrupts(&before);
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Read { offset, width } => {
                self.bar_read(u64::from(*offset), width.bytes());
            }
            Op::Write {
                offset,
                width,
                value,
            } => self.bar_write(u64::from(*offset), width.bytes(), *value),
            Op::Common { field, value } => {
                let (offset, size) = FIELDS[usize::from(*field) % FIELDS.len()];
                self.bar_write(offset, size, *value);
            }
            Op::Notify { queue } => {
                let offset = NOTIFY_OFFSET + u64::from(*queue) * u64::from(NOTIFY_OFF_MULTIPLIER);
                self.bar_write(offset, 2, u64::from(*queue));
            }
            Op::Vector {
                entry,
                data,
                masked,
            } => {
                let at = MSIX_TABLE_OFFSET + u64::from(*entry) * 16;
                self.bar_write(at, 8, 0xfee0_0000);
                self.bar_write(at + 8, 8, u64::from(*data) | u64::from(*masked) << 32);
            }
            Op::ConfigRead { reg } => {
                self.dev.read_config_register(usize::from(reg % 64));
            }
            Op::ConfigWrite {
                offset,
                width,
                value,
            } => {
                // Split at dword boundaries as the root bus does; a
                // crossing write also reaches the device whole once.
                let offset = usize::from(*offset);
                let bytes = &value.to_le_bytes()[..width.bytes()];
                if offset % 4 + bytes.len() > 4 {
                    let moves =
                        self.dev
                            .write_config_register(offset / 4, (offset % 4) as u64, bytes);
                    for m in moves {
                        self.vmm_move(&m);
                    }
                } else {
                    self.cfg_write(offset, bytes);
                }
            }
            Op::MoveBar { page, live } => self.move_bar(*page, *live),
            Op::Command(v) => self.cfg_write(0x04, &v.to_le_bytes()),
            Op::MsixControl { enable, mask } => {
                let ctl = self.cfg_read(self.msix_cap + 2, 2) as u16 & 0x3fff
                    | u16::from(*enable) << 15
                    | u16::from(*mask) << 14;
                self.cfg_write(self.msix_cap + 2, &ctl.to_le_bytes());
            }
            Op::CfgWindow { offset, len, write } => {
                let cap = self.cfg_cap;
                self.cfg_write(cap + 4, &[0]);
                self.cfg_write(cap + 8, &offset.to_le_bytes());
                self.cfg_write(cap + 12, &u32::from(*len).to_le_bytes());
                match write {
                    Some(v) => {
                        let window = u64::from(*offset);
                        let n = usize::from(*len);
                        if matches!(n, 1 | 2 | 4) && window + n as u64 <= VIRTIO_PCI_BAR_SIZE {
                            // Only the status byte matters for `reset`.
                            if window <= DEVICE_STATUS && window + n as u64 > DEVICE_STATUS {
                                let byte = (v >> ((DEVICE_STATUS - window) * 8)) as u8;
                                self.reset = byte == 0;
                            }
                        }
                        self.cfg_write(cap + 16, &v.to_le_bytes());
                    }
                    None => {
                        self.dev.read_config_register((cap + 16) / 4);
                    }
                }
            }
            Op::Init {
                features,
                queues,
                ring,
                vectors,
                msix,
            } => self.init(*features, *queues, *ring, *vectors, *msix),
            Op::Chain { queue, segs } => {
                if !self.rings.is_empty() {
                    let n = self.rings.len();
                    let ring = &mut self.rings[usize::from(*queue) % n];
                    ring.add_chain(&self.mem, segs, Link::Direct);
                    // With EVENT_IDX: interrupt me at the next used buffer.
                    ring.set_used_event(&self.mem, ring.used_idx(&self.mem));
                }
            }
            Op::Poke { addr, data } => {
                let at = u64::from(*addr) % MEM_SIZE;
                let n = data.len().min((MEM_SIZE - at) as usize);
                let _ = self.mem.write_slice(&data[..n], GuestAddress(at));
            }
            Op::VmmReset => {
                self.dev.reset();
                self.reset = true;
            }
        }
    }

    /// BAR 0 to `page` * 64 KiB, dword by dword, with sizing first.
    fn move_bar(&mut self, page: u32, live: bool) {
        let command = self.cfg_read(0x04, 2) as u16;
        if !live {
            self.cfg_write(0x04, &(command & !0x2).to_le_bytes());
        }
        self.cfg_write(0x10, &u32::MAX.to_le_bytes());
        self.cfg_write(0x14, &u32::MAX.to_le_bytes());
        let size_lo = self.cfg_read(0x10, 4);
        let size_hi = self.cfg_read(0x14, 4);
        let mask = u64::from(size_hi) << 32 | u64::from(size_lo & !0xf);
        let ctx = Describe(&self.step);
        assert_eq!(
            !mask + 1,
            VIRTIO_PCI_BAR_SIZE,
            "{ctx}: BAR 0 sizes as {mask:#x}"
        );
        let addr = u64::from(page) << 16;
        self.cfg_write(0x10, &(addr as u32).to_le_bytes());
        self.cfg_write(0x14, &((addr >> 32) as u32).to_le_bytes());
        if !live {
            self.cfg_write(0x04, &(command | 0x2).to_le_bytes());
        }
    }

    /// The driver's initialization sequence (virtio 1.2 §3.1.1).
    fn init(&mut self, features: u64, queues: u8, ring: u8, vectors: bool, msix: bool) {
        self.set_common(DEVICE_STATUS, 0);
        self.set_common(DEVICE_STATUS, 1);
        self.set_common(DEVICE_STATUS, 3);
        let offered = self.offered();
        let accept = offered & features;
        for (select, half) in [(0, accept as u32), (1, (accept >> 32) as u32)] {
            self.set_common(DRIVER_FEATURE_SELECT, select);
            self.set_common(DRIVER_FEATURE, u64::from(half));
        }
        self.set_common(DEVICE_STATUS, 0x0b);
        let count = u16::from(queues).min(self.num_queues);
        self.rings.clear();
        for q in 0..count {
            self.set_common(QUEUE_SELECT, u64::from(q));
            let max = self.common(QUEUE_SIZE) as u16;
            let size = (1u16 << (ring % 7)).min(max.max(1));
            let rings = DriverQueue::new(&self.mem, q, size);
            self.set_common(QUEUE_SIZE, u64::from(size));
            self.set_common(QUEUE_DESC, rings.desc);
            self.set_common(QUEUE_DRIVER, rings.avail);
            self.set_common(QUEUE_DEVICE, rings.used);
            let vector = if vectors { q + 1 } else { 0xffff };
            self.set_common(QUEUE_MSIX_VECTOR, u64::from(vector));
            self.set_common(QUEUE_ENABLE, 1);
            self.rings.push(rings);
        }
        self.set_common(MSIX_CONFIG, if vectors { 0 } else { 0xffff });
        // Without MSI-X the driver falls back to INTx.
        if msix {
            for v in 0..self.vectors {
                let at = MSIX_TABLE_OFFSET + u64::from(v) * 16;
                self.bar_write(at, 8, 0xfee0_0000);
                self.bar_write(at + 8, 8, 0x4000 + u64::from(v));
            }
        }
        let ctl = self.cfg_read(self.msix_cap + 2, 2) as u16 & 0x3fff | u16::from(msix) << 15;
        self.cfg_write(self.msix_cap + 2, &ctl.to_le_bytes());
        self.set_common(DEVICE_STATUS, 0x0f);
    }

    /// The features the device offers, read through the BAR (the select
    /// register is put back).
    pub(super) fn offered(&mut self) -> u64 {
        let select = self.common(DEVICE_FEATURE_SELECT);
        self.set_common(DEVICE_FEATURE_SELECT, 0);
        let lo = self.common(DEVICE_FEATURE);
        self.set_common(DEVICE_FEATURE_SELECT, 1);
        let hi = self.common(DEVICE_FEATURE);
        self.set_common(DEVICE_FEATURE_SELECT, select);
        hi << 32 | lo
    }

    /// Drops the device: its worker must go with it.
    pub fn finish(self) -> super::Stats {
        let threads = self.threads;
        drop(self.dev);
        threads.assert_count(0, &"after dropping the device");
        self.stats
    }
}
