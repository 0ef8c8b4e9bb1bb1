//! Building the root bus, applying ops, and what each op leads the
//! invariant checks to expect.

use std::sync::{Arc, Mutex};

use devices::BusDevice;
use pci::interrupt::RecordingInterruptGroup;
use pci::{
    MsiMessage, MsixCapability, PciBarRegionType, PciBdf, PciCapability, PciConfigIo,
    PciConfigMmio, PciRoot, ECAM_FUNCTION_SIZE, LEGACY_CONFIG_SPACE_SIZE, PCI_CONFIG_IO_PORT,
    ROM_BAR_INDEX,
};

use super::device::{
    BarSpec, CapOffsets, TestDevice, VendorCapability, BARS, GROUP_VECTORS, MSIX_BAR,
    MSIX_PBA_OFFSET, MSIX_TABLE_OFFSET, MSIX_VECTORS, PCIE_CAP,
};
use super::ops::{config_address, ecam_offset, Op};
use super::vmm::{lock, Vmm};
use super::{ECAM_BUSES, ECAM_WINDOW_SIZE};

/// The test function's address.
pub fn dev() -> PciBdf {
    PciBdf::new(0, 1, 0)
}

/// Configuration space of the first 256 bytes, as read by the guest.
pub type Snapshot = [u8; LEGACY_CONFIG_SPACE_SIZE];

/// Bits of mechanism #1's address register that are kept.
pub const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// What happens to an interrupt raised by the device, judged beforehand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Sent to the group now.
    Deliverable,
    /// Masked: its pending bit gets set.
    Masked,
    /// MSI(-X) disabled or vector not enabled: dropped.
    Dropped,
    /// Not a vector of the function: an error.
    Invalid,
}

/// What the step's op should have done, for the checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing observable in the test function's configuration space.
    None,
    /// A configuration write to the test function of `data` at `start`;
    /// `beyond` holds what the bytes past 256 it covered read before.
    ConfigWrite {
        start: usize,
        data: Vec<u8>,
        beyond: Vec<u8>,
    },
    /// The device raised an MSI-X vector.
    MsixTrigger { vector: u16, delivery: Delivery },
    /// The device raised an MSI vector.
    MsiTrigger { vector: u16, delivery: Delivery },
}

/// Per-byte masks of the test function's first 256 bytes.
pub struct Masks {
    /// Bits a guest write stores as written.
    pub writable: Snapshot,
    /// Bits that change by other rules: BAR address bits (sizing, moves
    /// and rollbacks) and the device-owned MSI pending bits.
    pub special: Snapshot,
}

/// The root bus under test and the harness's model of it.
pub struct Harness {
    pub(super) root: Arc<Mutex<PciRoot>>,
    pub(super) device: Arc<Mutex<TestDevice>>,
    pub(super) vmm: Arc<Vmm>,
    /// The guest's mechanism #1 ports.
    pub(super) io: PciConfigIo,
    /// The ECAM window (stateless, so the checks use it too).
    pub(super) ecam: PciConfigMmio,
    /// Mechanism #1 ports of the checks, so they never move the guest's
    /// address register.
    pub(super) probe_io: PciConfigIo,
    pub(super) msix_group: Arc<RecordingInterruptGroup>,
    pub(super) msi_group: Arc<RecordingInterruptGroup>,
    pub(super) caps: CapOffsets,
    pub(super) masks: Masks,
    pub(super) initial: Snapshot,
    pub(super) host_initial: Snapshot,
    pub(super) prev: Snapshot,
    /// What the guest last put in 0xCF8.
    pub(super) io_address: u32,
    /// What the groups were last told about each vector.
    pub(super) msix_routes: Vec<(MsiMessage, bool)>,
    pub(super) msi_routes: Vec<(MsiMessage, bool)>,
    pub(super) msix_pending: Vec<bool>,
    pub(super) msi_pending: u32,
    /// Current step and op, for messages.
    pub(super) step: Option<(usize, Op)>,
}

fn set_mask(mask: &mut Snapshot, at: usize, bits: &[u8]) {
    for (i, b) in bits.iter().enumerate() {
        mask[at + i] |= b;
    }
}

/// The address bits of a BAR register (and of its upper half for 64-bit
/// BARs): what the sizing protocol sets to ones.
pub fn bar_address_bits(spec: &BarSpec) -> (u32, Option<u32>) {
    let size_mask = !(spec.size - 1);
    match spec.region {
        _ if spec.index == ROM_BAR_INDEX => (size_mask as u32 & 0xffff_f800, None),
        PciBarRegionType::IoRegion => (size_mask as u32 & 0xfffc, None),
        PciBarRegionType::Memory32BitRegion => (size_mask as u32 & !0xf, None),
        PciBarRegionType::Memory64BitRegion => {
            (size_mask as u32 & !0xf, Some((size_mask >> 32) as u32))
        }
    }
}

/// Configuration offset of BAR register `index`.
pub fn bar_reg(index: usize) -> usize {
    if index == ROM_BAR_INDEX {
        0x30
    } else {
        0x10 + 4 * index
    }
}

/// The MSI-X capability the device builds.
pub fn msix_capability() -> MsixCapability {
    MsixCapability::new(
        MSIX_VECTORS,
        MSIX_BAR as u8,
        MSIX_TABLE_OFFSET,
        MSIX_BAR as u8,
        MSIX_PBA_OFFSET,
    )
}

/// Which function and register an ECAM access at `offset` of `len` bytes
/// reaches, by the spec's decoding: bus, device, function, 4 KiB register
/// page; accesses crossing a page or outside the window reach nothing.
pub fn ecam_decode(offset: u64, len: usize) -> Option<(PciBdf, u64)> {
    let reg = offset % ECAM_FUNCTION_SIZE;
    if offset >= ECAM_WINDOW_SIZE || reg + len as u64 > ECAM_FUNCTION_SIZE {
        return None;
    }
    let bdf = PciBdf::new(
        (offset >> 20) as u8,
        ((offset >> 15) & 0x1f) as u8,
        ((offset >> 12) & 0x7) as u8,
    );
    Some((bdf, reg))
}

/// The function and register mechanism #1 reaches through data port byte
/// `lane` with `address` in 0xCF8, if the enable bit is set.
pub fn io_decode(address: u32, lane: u64) -> Option<(PciBdf, u64)> {
    if address & 0x8000_0000 == 0 {
        return None;
    }
    let bdf = PciBdf::new(
        (address >> 16) as u8,
        ((address >> 11) & 0x1f) as u8,
        ((address >> 8) & 0x7) as u8,
    );
    Some((bdf, u64::from(address & 0xfc) + lane))
}

/// Where in the input a failure happened, for messages.
pub fn describe(step: &Option<(usize, Op)>) -> String {
    match step {
        Some((i, op)) => format!("after step {i} ({op:x?})"),
        None => "in the initial state".to_string(),
    }
}

impl Harness {
    /// A root bus with the host bridge and the test function at 00:01.0.
    pub fn new() -> Self {
        let msix_group = Arc::new(RecordingInterruptGroup::new(GROUP_VECTORS));
        let msi_group = Arc::new(RecordingInterruptGroup::new(GROUP_VECTORS));
        let device = TestDevice::new(msix_group.clone(), msi_group.clone())
            .expect("the test function is valid");
        let caps = device.caps();
        let msi_cap = device.msi().capability();
        let device = Arc::new(Mutex::new(device));
        let vmm = Arc::new(Vmm::new(&device));
        let mut root = PciRoot::new(Some(vmm.clone()));
        root.add_device(dev(), device.clone())
            .expect("00:01.0 is free");
        let root = Arc::new(Mutex::new(root));

        let mut masks = Masks {
            writable: [0; LEGACY_CONFIG_SPACE_SIZE],
            special: [0; LEGACY_CONFIG_SPACE_SIZE],
        };
        // Command (I/O, memory, bus master, parity, SERR#, INTx disable),
        // cache line size, interrupt line, ROM enable.
        set_mask(&mut masks.writable, 0x04, &[0x47, 0x05]);
        set_mask(&mut masks.writable, 0x0c, &[0xff]);
        set_mask(&mut masks.writable, 0x3c, &[0xff]);
        set_mask(&mut masks.writable, 0x30, &[0x01]);
        // Capabilities: what each declares writable after its 2-byte header.
        let cap_masks: [(usize, Vec<u8>); 4] = [
            (caps.pcie, PCIE_CAP.writable_mask()),
            (caps.msi, msi_cap.writable_mask()),
            (caps.msix, msix_capability().writable_mask()),
            (caps.vendor, VendorCapability.writable_mask()),
        ];
        for (at, mask) in cap_masks {
            set_mask(&mut masks.writable, at + 2, &mask);
        }
        for spec in BARS {
            let (lo, hi) = bar_address_bits(&spec);
            let reg = bar_reg(spec.index);
            set_mask(&mut masks.special, reg, &lo.to_le_bytes());
            if let Some(hi) = hi {
                set_mask(&mut masks.special, reg + 4, &hi.to_le_bytes());
            }
        }
        let pending = msi_cap.layout().pending_bits.expect("per-vector masking");
        let valid = (1u32 << msi_cap.capable_vectors()) - 1;
        set_mask(&mut masks.special, caps.msi + pending, &valid.to_le_bytes());

        let ecam = PciConfigMmio::new(root.clone(), ECAM_BUSES);
        let mut harness = Harness {
            io: PciConfigIo::new(root.clone()),
            probe_io: PciConfigIo::new(root.clone()),
            ecam,
            root,
            device,
            vmm,
            msix_group,
            msi_group,
            caps,
            masks,
            initial: [0; LEGACY_CONFIG_SPACE_SIZE],
            host_initial: [0; LEGACY_CONFIG_SPACE_SIZE],
            prev: [0; LEGACY_CONFIG_SPACE_SIZE],
            io_address: 0,
            msix_routes: vec![(MsiMessage::default(), true); usize::from(GROUP_VECTORS)],
            msi_routes: vec![(MsiMessage::default(), true); usize::from(GROUP_VECTORS)],
            msix_pending: vec![false; usize::from(MSIX_VECTORS)],
            msi_pending: 0,
            step: None,
        };
        harness.initial = harness.snapshot(dev());
        harness.host_initial = harness.snapshot(PciBdf::new(0, 0, 0));
        harness.prev = harness.initial;
        harness
    }

    /// Location of a failure, for messages.
    pub(super) fn ctx(&self) -> String {
        describe(&self.step)
    }

    /// The first 256 bytes of `bdf`, read dword by dword through ECAM.
    pub(super) fn snapshot(&mut self, bdf: PciBdf) -> Snapshot {
        let mut out = [0u8; LEGACY_CONFIG_SPACE_SIZE];
        for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
            self.ecam.read(0, ecam_offset(bdf, 4 * i as u64), chunk);
        }
        out
    }

    /// `len` bytes of `bdf` at `reg`, read one byte at a time straight from
    /// the root bus: the reference for wider accesses.
    pub(super) fn bytewise(&self, bdf: PciBdf, reg: u64, len: usize) -> Vec<u8> {
        let root = lock(&self.root);
        (0..len as u64)
            .map(|i| {
                let mut b = [0u8];
                root.config_read(bdf, reg + i, &mut b);
                b[0]
            })
            .collect()
    }

    /// Applies `op`, then checks every invariant.
    pub fn step(&mut self, index: usize, op: &Op) {
        self.step = Some((index, *op));
        let effect = self.apply(op);
        self.check(&effect);
    }

    /// How a configuration write of `len` bytes at `reg` of `bdf` affects
    /// the test function.
    fn config_write_effect(&self, target: Option<(PciBdf, u64)>, data: &[u8]) -> Effect {
        match target {
            Some((bdf, reg)) if bdf == dev() => {
                let start = reg as usize;
                let end = start + data.len();
                let beyond = if end > LEGACY_CONFIG_SPACE_SIZE {
                    let from = start.max(LEGACY_CONFIG_SPACE_SIZE);
                    self.bytewise(dev(), from as u64, end - from)
                } else {
                    Vec::new()
                };
                Effect::ConfigWrite {
                    start,
                    data: data.to_vec(),
                    beyond,
                }
            }
            _ => Effect::None,
        }
    }

    fn apply(&mut self, op: &Op) -> Effect {
        match *op {
            Op::IoWrite { port, width, value } => {
                let port = u64::from(port % 8);
                let data = &value.to_le_bytes()[..width.bytes()];
                let target = match port {
                    4..=7 if port - 4 + data.len() as u64 <= 4 => {
                        io_decode(self.io_address, port - 4)
                    }
                    _ => None,
                };
                let effect = self.config_write_effect(target, data);
                self.io.write(PCI_CONFIG_IO_PORT, port, data);
                if port == 0 && data.len() == 4 {
                    self.io_address = value & CONFIG_ADDRESS_MASK;
                }
                effect
            }
            Op::IoRead { port, width } => {
                let port = u64::from(port % 8);
                let mut data = vec![0u8; width.bytes()];
                self.io.read(PCI_CONFIG_IO_PORT, port, &mut data);
                let expected = match port {
                    0 if data.len() == 4 => self.io_address.to_le_bytes().to_vec(),
                    4..=7 if port - 4 + data.len() as u64 <= 4 => {
                        match io_decode(self.io_address, port - 4) {
                            Some((bdf, reg)) => self.bytewise(bdf, reg, data.len()),
                            None => vec![0xff; data.len()],
                        }
                    }
                    _ => vec![0xff; data.len()],
                };
                assert_eq!(
                    data,
                    expected,
                    "{}: mechanism #1 read with {:#x} in 0xCF8 differs from byte-wise reads",
                    self.ctx(),
                    self.io_address
                );
                Effect::None
            }
            Op::IoSelect { func, reg } => {
                let value = config_address(func.bdf(), reg);
                self.io.write(PCI_CONFIG_IO_PORT, 0, &value.to_le_bytes());
                self.io_address = value & CONFIG_ADDRESS_MASK;
                Effect::None
            }
            Op::EcamRead {
                func,
                offset,
                width,
            } => {
                let reg = u64::from(offset) % ECAM_FUNCTION_SIZE;
                self.ecam_read(ecam_offset(func.bdf(), reg), width.bytes())
            }
            Op::EcamWrite {
                func,
                offset,
                width,
                value,
            } => {
                let reg = u64::from(offset) % ECAM_FUNCTION_SIZE;
                self.ecam_write(
                    ecam_offset(func.bdf(), reg),
                    &value.to_le_bytes()[..width.bytes()],
                )
            }
            Op::EcamRawRead { offset, width } => {
                // Reach a little past the window, where nothing decodes.
                let offset = u64::from(offset) % (ECAM_WINDOW_SIZE + 2 * ECAM_FUNCTION_SIZE);
                self.ecam_read(offset, width.bytes())
            }
            Op::EcamRawWrite {
                offset,
                width,
                value,
            } => {
                let offset = u64::from(offset) % (ECAM_WINDOW_SIZE + 2 * ECAM_FUNCTION_SIZE);
                self.ecam_write(offset, &value.to_le_bytes()[..width.bytes()])
            }
            Op::BarRead { bar, offset, width } => {
                self.bar_access(bar, offset, &mut vec![0u8; width.bytes()], false);
                Effect::None
            }
            Op::BarWrite {
                bar,
                offset,
                width,
                value,
            } => {
                let data = value.to_le_bytes();
                self.bar_access(bar, offset, &mut data[..width.bytes()].to_vec(), true);
                Effect::None
            }
            Op::MsixTrigger { vector } => {
                let mut device = lock(&self.device);
                let delivery = match device.msix().entry(vector) {
                    None => Delivery::Invalid,
                    Some(_) if !device.msix().enabled() => Delivery::Dropped,
                    Some(e) if e.masked() || device.msix().function_masked() => Delivery::Masked,
                    Some(_) => Delivery::Deliverable,
                };
                let result = device.trigger_msix(vector);
                assert_eq!(
                    result.is_ok(),
                    delivery != Delivery::Invalid,
                    "{}: MSI-X trigger result {result:?} for {delivery:?} vector",
                    self.ctx()
                );
                Effect::MsixTrigger { vector, delivery }
            }
            Op::MsiTrigger { vector } => {
                let mut device = lock(&self.device);
                let msi = device.msi();
                let delivery = if vector >= msi.capability().capable_vectors() {
                    Delivery::Invalid
                } else if vector >= msi.num_enabled_vectors() {
                    Delivery::Dropped
                } else if msi.mask_bits() & (1 << vector) != 0 {
                    Delivery::Masked
                } else {
                    Delivery::Deliverable
                };
                let result = device.trigger_msi(vector);
                assert_eq!(
                    result.is_ok(),
                    delivery != Delivery::Invalid,
                    "{}: MSI trigger result {result:?} for {delivery:?} vector",
                    self.ctx()
                );
                Effect::MsiTrigger { vector, delivery }
            }
        }
    }

    fn ecam_read(&mut self, offset: u64, len: usize) -> Effect {
        let mut data = vec![0u8; len];
        self.ecam.read(0, offset, &mut data);
        let expected = match ecam_decode(offset, len) {
            Some((bdf, reg)) => self.bytewise(bdf, reg, len),
            None => vec![0xff; len],
        };
        assert_eq!(
            data,
            expected,
            "{}: ECAM read at window offset {offset:#x} differs from byte-wise reads",
            self.ctx()
        );
        Effect::None
    }

    fn ecam_write(&mut self, offset: u64, data: &[u8]) -> Effect {
        let target = ecam_decode(offset, data.len());
        let effect = self.config_write_effect(target, data);
        self.ecam.write(0, offset, data);
        effect
    }

    /// A guest access through the bus to BAR `bar % BARS.len()` at `offset`
    /// (mod its size).
    fn bar_access(&mut self, bar: u8, offset: u16, data: &mut [u8], write: bool) {
        let spec = BARS[usize::from(bar) % BARS.len()];
        let mapping = self.vmm.mapping(spec.index).expect("every BAR is mapped");
        let offset = u64::from(offset) % mapping.len;
        let addr = mapping.base + offset;
        let bus = self.vmm.bus(spec.region);
        let result = if write {
            bus.write(addr, data)
        } else {
            bus.read(addr, data)
        };
        let fits = offset + data.len() as u64 <= mapping.len;
        assert_eq!(
            result.is_ok(),
            fits,
            "{}: bus access of {} bytes at {addr:#x} (BAR {} at {mapping:x?}): {result:?}",
            self.ctx(),
            data.len(),
            spec.index
        );
        if write || !fits {
            return;
        }
        let expected: Vec<u8> = (0..data.len() as u64)
            .map(|i| self.expected_bar_byte(spec.index, offset, i))
            .collect();
        assert_eq!(
            data,
            expected,
            "{}: BAR {} read at offset {offset:#x}",
            self.ctx(),
            spec.index
        );
    }

    /// What byte `i` of a read at `start` of BAR `index` returns: the MSI-X
    /// table and PBA in BAR 0 (zero past their ends), all ones elsewhere.
    /// The device picks table or PBA by where the access starts, so an
    /// access straddling the two reads zeros past the table.
    fn expected_bar_byte(&self, index: usize, start: u64, i: u64) -> u8 {
        if index != MSIX_BAR {
            return 0xff;
        }
        let offset = start + i;
        let device = lock(&self.device);
        let msix = device.msix();
        if start >= u64::from(MSIX_PBA_OFFSET) {
            let at = offset - u64::from(MSIX_PBA_OFFSET);
            let first = (at / 8 * 64) as u16;
            let bit = (at % 8 * 8) as u16;
            // Bits of this byte, vector by vector (none past the end).
            (0..8u16).fold(0u8, |byte, b| {
                let vector = first.saturating_add(bit + b);
                byte | (u8::from(msix.pending(vector)) << b)
            })
        } else {
            let at = offset - u64::from(MSIX_TABLE_OFFSET);
            let Some(entry) = u16::try_from(at / 16).ok().and_then(|v| msix.entry(v)) else {
                return 0;
            };
            let dword = match at % 16 / 4 {
                0 => entry.msg_addr_lo,
                1 => entry.msg_addr_hi,
                2 => entry.msg_data,
                _ => entry.vector_ctl & 1,
            };
            (dword >> (at % 4 * 8)) as u8
        }
    }
}

impl Default for Harness {
    fn default() -> Self {
        Self::new()
    }
}
