//! Which bytes of a passed-through function's configuration space the
//! guest reaches on the device, and which the VMM answers itself.
//!
//! The layout is worked out once, from a snapshot of the host's
//! configuration space, as one [`ByteOwner`] per byte:
//!
//! - the BARs, the ROM BAR and the interrupt line belong to the shadow
//!   configuration (the addresses are ours, not the host's);
//! - the command register goes to the device and is mirrored in the shadow,
//!   whose decode bits gate the BARs;
//! - the MSI and MSI-X capabilities are emulated;
//! - capabilities outside [`KEPT_CAPABILITIES`] (and extended ones outside
//!   [`KEPT_EXTENDED_CAPABILITIES`]) are unlinked from their chain and their
//!   bytes read as zero; the header type, interrupt pin and every
//!   capability pointer are fixed values computed here;
//! - everything else (IDs, status, class, kept capabilities' bodies,
//!   device-specific registers) is the device's.

use std::collections::BTreeSet;

use log::{debug, info};

use super::bars::read_config_u32;
use super::{VfioBackend, VfioIrqIndex, VfioPciError, VFIO_PCI_CONFIG_REGION_INDEX};
use crate::configuration::{EXTENDED_CONFIG_SPACE_SIZE, LEGACY_CONFIG_SPACE_SIZE};
use crate::msi::{MsiCapability, MSI_CTL_64BIT, MSI_CTL_MMC_SHIFT, MSI_CTL_PER_VECTOR_MASK};
use crate::msi::{MAX_MSI_VECTORS_LOG2, MSI_CTL_MULTIPLE_MESSAGE_MASK};
use crate::msix::{MsixCapability, MSIX_CAP_SIZE, MSIX_MSG_CTL_TABLE_SIZE};

/// Standard capabilities the guest may see: power management, MSI, vendor
/// specific (virtio's), PCI Express and MSI-X. Anything else (PCI-X, AF,
/// Enhanced Allocation with its fixed addresses, ...) is hidden.
pub const KEPT_CAPABILITIES: [u8; 5] = [0x01, 0x05, 0x09, 0x10, 0x11];
/// Extended capabilities the guest may see: AER, device serial number,
/// vendor specific. Hidden, among others: SR-IOV, ARI, resizable BAR, ATS,
/// PASID, ACS, which need platform support we do not emulate.
pub const KEPT_EXTENDED_CAPABILITIES: [u16; 3] = [0x0001, 0x0003, 0x000b];

const CAP_ID_MSI: u8 = 0x05;
const CAP_ID_MSIX: u8 = 0x11;
const COMMAND: usize = 0x04;
const STATUS: usize = 0x06;
const STATUS_CAPABILITIES_LIST: u8 = 1 << 4;
const HEADER_TYPE: usize = 0x0e;
const HEADER_TYPE_MULTIFUNCTION: u8 = 0x80;
const BARS: std::ops::Range<usize> = 0x10..0x28;
const ROM_BAR: std::ops::Range<usize> = 0x30..0x34;
const CAPABILITY_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const INTERRUPT_PIN: usize = 0x3d;
const FIRST_CAPABILITY: usize = 0x40;
/// More capabilities than fit in 192 bytes means a loop.
const MAX_CAPABILITIES: usize = 48;
const MAX_EXTENDED_CAPABILITIES: usize = (EXTENDED_CONFIG_SPACE_SIZE - 0x100) / 4;

/// Who answers for one byte of configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ByteOwner {
    /// The host function, through VFIO.
    Device,
    /// The host function, mirrored into the shadow (the command register).
    DeviceAndShadow,
    /// The shadow configuration: BARs, ROM BAR, interrupt line.
    Shadow,
    /// The emulated MSI capability (its body; the header is `Virtual`).
    Msi,
    /// The emulated MSI-X capability (its body; the header is `Virtual`).
    Msix,
    /// A value fixed here; guest writes are dropped.
    Virtual,
    /// Part of a hidden capability: reads zero, writes are dropped.
    Hidden,
}

/// One capability found in a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FoundCapability {
    /// Offset in configuration space.
    pub offset: usize,
    /// Capability ID (16 bits for extended capabilities).
    pub id: u16,
    /// Whether the guest sees it.
    pub kept: bool,
}

/// The configuration space map of a passed-through function; see the
/// module documentation.
#[derive(Clone, Debug)]
pub struct ConfigLayout {
    owners: Vec<ByteOwner>,
    values: Vec<u8>,
    capabilities: Vec<FoundCapability>,
    extended_capabilities: Vec<FoundCapability>,
    msi: Option<(usize, MsiCapability)>,
    msix: Option<(usize, MsixCapability)>,
    interrupt_pin: u8,
}

impl ConfigLayout {
    /// Reads the host function's configuration space through `backend` and
    /// lays it out. Fails if the space cannot be read or the function is
    /// not an endpoint.
    pub fn probe(backend: &dyn VfioBackend) -> Result<Self, VfioPciError> {
        let region = backend
            .region_info(VFIO_PCI_CONFIG_REGION_INDEX)
            .map_or(0, |r| r.size);
        if region < LEGACY_CONFIG_SPACE_SIZE as u64 {
            return Err(VfioPciError::NoConfigRegion(region));
        }
        let size = if region >= EXTENDED_CONFIG_SPACE_SIZE as u64 {
            EXTENDED_CONFIG_SPACE_SIZE
        } else {
            LEGACY_CONFIG_SPACE_SIZE
        };
        let mut raw = vec![0u8; size];
        for (i, chunk) in raw.chunks_exact_mut(4).enumerate() {
            let value = read_config_u32(backend, 4 * i as u64)?;
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        let has_intx = raw[INTERRUPT_PIN] != 0 && backend.irq_count(VfioIrqIndex::Intx) > 0;
        Self::from_raw(&raw, has_intx)
    }

    /// Lays out the configuration space `raw` (256 or 4096 bytes);
    /// `has_intx` says whether INTx can be offered (pin and VFIO support).
    pub fn from_raw(raw: &[u8], has_intx: bool) -> Result<Self, VfioPciError> {
        let size = if raw.len() >= EXTENDED_CONFIG_SPACE_SIZE {
            EXTENDED_CONFIG_SPACE_SIZE
        } else if raw.len() >= LEGACY_CONFIG_SPACE_SIZE {
            LEGACY_CONFIG_SPACE_SIZE
        } else {
            return Err(VfioPciError::NoConfigRegion(raw.len() as u64));
        };
        let header_type = raw[HEADER_TYPE] & !HEADER_TYPE_MULTIFUNCTION;
        if header_type != 0 {
            return Err(VfioPciError::NotAnEndpoint(header_type));
        }
        let mut layout = ConfigLayout {
            owners: vec![ByteOwner::Device; size],
            values: vec![0; size],
            capabilities: Vec::new(),
            extended_capabilities: Vec::new(),
            msi: None,
            msix: None,
            interrupt_pin: 0,
        };
        layout.set_range(COMMAND..COMMAND + 2, ByteOwner::DeviceAndShadow);
        layout.set_range(BARS, ByteOwner::Shadow);
        layout.set_range(ROM_BAR, ByteOwner::Shadow);
        layout.set_range(INTERRUPT_LINE..INTERRUPT_LINE + 1, ByteOwner::Shadow);
        // The guest sees a single-function device in a slot of its own.
        layout.set_virtual(HEADER_TYPE, header_type);
        // Whatever pin the host uses, ours is INTA#: the VMM wires INTx to
        // the IOAPIC pin the platform's swizzle gives INTA# of the slot.
        layout.interrupt_pin = u8::from(has_intx);
        layout.set_virtual(INTERRUPT_PIN, layout.interrupt_pin);
        layout.lay_out_capabilities(raw);
        if size == EXTENDED_CONFIG_SPACE_SIZE {
            layout.lay_out_extended_capabilities(raw);
        }
        Ok(layout)
    }

    /// Size of the configuration space the guest sees (256 or 4096).
    pub fn size(&self) -> usize {
        self.owners.len()
    }

    /// Who answers for byte `offset` (`Hidden` beyond the space).
    pub fn owner(&self, offset: usize) -> ByteOwner {
        self.owners
            .get(offset)
            .copied()
            .unwrap_or(ByteOwner::Hidden)
    }

    /// The fixed value of a `Virtual` byte (zero for other bytes).
    pub fn value(&self, offset: usize) -> u8 {
        self.values.get(offset).copied().unwrap_or(0)
    }

    /// Standard capabilities in chain order, kept or not.
    pub fn capabilities(&self) -> &[FoundCapability] {
        &self.capabilities
    }

    /// Extended capabilities in chain order, kept or not.
    pub fn extended_capabilities(&self) -> &[FoundCapability] {
        &self.extended_capabilities
    }

    /// The MSI capability to emulate, with its offset.
    pub fn msi(&self) -> Option<(usize, MsiCapability)> {
        self.msi
    }

    /// The MSI-X capability to emulate, with its offset.
    pub fn msix(&self) -> Option<(usize, MsixCapability)> {
        self.msix
    }

    /// The interrupt pin the guest sees (0 or 1).
    pub fn interrupt_pin(&self) -> u8 {
        self.interrupt_pin
    }

    /// Removes INTx: the pin reads 0 (the VMM could not wire it).
    pub fn drop_intx(&mut self) {
        self.interrupt_pin = 0;
        self.set_virtual(INTERRUPT_PIN, 0);
    }

    /// Hides the MSI-X capability (the VMM cannot present its table).
    pub fn hide_msix(&mut self) {
        if let Some((offset, _)) = self.msix.take() {
            info!("VFIO: hiding the MSI-X capability at {offset:#x} from the guest");
            self.hide_capability(offset);
        }
    }

    /// Hides the MSI capability (the VMM has no vectors for it).
    pub fn hide_msi(&mut self) {
        if let Some((offset, _)) = self.msi.take() {
            info!("VFIO: hiding the MSI capability at {offset:#x} from the guest");
            self.hide_capability(offset);
        }
    }

    fn set_range(&mut self, range: std::ops::Range<usize>, owner: ByteOwner) {
        let end = range.end.min(self.owners.len());
        for at in range.start.min(end)..end {
            self.owners[at] = owner;
        }
    }

    fn set_virtual(&mut self, offset: usize, value: u8) {
        if offset < self.owners.len() {
            self.owners[offset] = ByteOwner::Virtual;
            self.values[offset] = value;
        }
    }

    /// Walks the standard chain, picks what to keep and relinks it.
    fn lay_out_capabilities(&mut self, raw: &[u8]) {
        if raw[STATUS] & STATUS_CAPABILITIES_LIST == 0 {
            self.set_virtual(CAPABILITY_POINTER, 0);
            return;
        }
        let mut seen = BTreeSet::new();
        let mut ptr = usize::from(raw[CAPABILITY_POINTER] & 0xfc);
        while ptr >= FIRST_CAPABILITY && seen.len() < MAX_CAPABILITIES && seen.insert(ptr) {
            let id = raw[ptr];
            let kept = KEPT_CAPABILITIES.contains(&id)
                && match id {
                    CAP_ID_MSI => self.msi.is_none(),
                    CAP_ID_MSIX => self.msix.is_none(),
                    _ => true,
                };
            if kept && id == CAP_ID_MSI {
                self.msi = Some((ptr, msi_capability(raw, ptr)));
            }
            if kept && id == CAP_ID_MSIX {
                self.msix = Some((ptr, msix_capability(raw, ptr)));
            }
            self.capabilities.push(FoundCapability {
                offset: ptr,
                id: u16::from(id),
                kept,
            });
            // The pointer is one byte; 0xff would run past the space.
            ptr = usize::from(raw[(ptr + 1).min(LEGACY_CONFIG_SPACE_SIZE - 1)] & 0xfc);
        }
        let offsets: Vec<usize> = self.capabilities.iter().map(|c| c.offset).collect();
        for cap in self.capabilities.clone() {
            // A capability runs at most to the next one up (or the end of
            // the legacy space); emulated ones have their exact size.
            let next_up = offsets
                .iter()
                .copied()
                .filter(|&o| o > cap.offset)
                .min()
                .unwrap_or(LEGACY_CONFIG_SPACE_SIZE);
            if !cap.kept {
                self.set_range(cap.offset..next_up, ByteOwner::Hidden);
                continue;
            }
            let body_end = match cap.id as u8 {
                CAP_ID_MSI => self.msi.map(|(_, c)| cap.offset + c.layout().size),
                CAP_ID_MSIX => Some(cap.offset + MSIX_CAP_SIZE),
                _ => None,
            };
            match (cap.id as u8, body_end.map(|e| e.min(next_up))) {
                (CAP_ID_MSI, Some(end)) => self.set_range(cap.offset + 2..end, ByteOwner::Msi),
                (CAP_ID_MSIX, Some(end)) => self.set_range(cap.offset + 2..end, ByteOwner::Msix),
                _ => {}
            }
        }
        for cap in self.capabilities.iter().filter(|c| !c.kept) {
            info!(
                "VFIO: hiding capability {:#04x} at {:#x} from the guest",
                cap.id, cap.offset
            );
        }
        self.relink();
    }

    /// Rewrites the capability pointer and every kept header so the chain
    /// runs through the kept capabilities only.
    fn relink(&mut self) {
        let kept: Vec<FoundCapability> = self
            .capabilities
            .iter()
            .copied()
            .filter(|c| c.kept)
            .collect();
        self.set_virtual(
            CAPABILITY_POINTER,
            kept.first().map_or(0, |c| c.offset as u8),
        );
        for (i, cap) in kept.iter().enumerate() {
            let next = kept.get(i + 1).map_or(0, |c| c.offset as u8);
            self.set_virtual(cap.offset, cap.id as u8);
            self.set_virtual(cap.offset + 1, next);
        }
    }

    /// Walks the extended chain from 0x100 and relinks the kept entries.
    fn lay_out_extended_capabilities(&mut self, raw: &[u8]) {
        let dword = |at: usize| {
            raw.get(at..at + 4)
                .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        };
        let mut seen = BTreeSet::new();
        let mut ptr = LEGACY_CONFIG_SPACE_SIZE;
        loop {
            let header = dword(ptr);
            if header == 0 || header == u32::MAX || seen.len() >= MAX_EXTENDED_CAPABILITIES {
                break;
            }
            if !seen.insert(ptr) {
                break;
            }
            let id = header as u16;
            self.extended_capabilities.push(FoundCapability {
                offset: ptr,
                id,
                kept: KEPT_EXTENDED_CAPABILITIES.contains(&id),
            });
            ptr = (header >> 20) as usize & 0xffc;
            if ptr < LEGACY_CONFIG_SPACE_SIZE {
                break;
            }
        }
        if self.extended_capabilities.is_empty() {
            return;
        }
        let offsets: Vec<usize> = self
            .extended_capabilities
            .iter()
            .map(|c| c.offset)
            .collect();
        for cap in self.extended_capabilities.iter().filter(|c| !c.kept) {
            let next_up = offsets
                .iter()
                .copied()
                .filter(|&o| o > cap.offset)
                .min()
                .unwrap_or(EXTENDED_CONFIG_SPACE_SIZE);
            let end = next_up.min(self.owners.len());
            for at in cap.offset..end {
                self.owners[at] = ByteOwner::Hidden;
            }
            info!(
                "VFIO: hiding extended capability {:#06x} at {:#x} from the guest",
                cap.id, cap.offset
            );
        }
        let kept: Vec<FoundCapability> = self
            .extended_capabilities
            .iter()
            .copied()
            .filter(|c| c.kept)
            .collect();
        for (i, cap) in kept.iter().enumerate() {
            let next = kept.get(i + 1).map_or(0, |c| c.offset as u32);
            let version = dword(cap.offset) >> 16 & 0xf;
            let header = u32::from(cap.id) | version << 16 | next << 20;
            for (j, byte) in header.to_le_bytes().into_iter().enumerate() {
                self.set_virtual(cap.offset + j, byte);
            }
        }
        // The chain must start at 0x100: if that capability is hidden, a
        // null capability (ID 0) there points on to the first kept one.
        if self.extended_capabilities.first().is_some_and(|c| !c.kept) {
            let next = kept.first().map_or(0, |c| c.offset as u32);
            for (j, byte) in (next << 20).to_le_bytes().into_iter().enumerate() {
                self.set_virtual(LEGACY_CONFIG_SPACE_SIZE + j, byte);
            }
        }
        debug!(
            "VFIO: extended capabilities {:?}",
            self.extended_capabilities
        );
    }

    fn hide_capability(&mut self, offset: usize) {
        if let Some(cap) = self.capabilities.iter_mut().find(|c| c.offset == offset) {
            cap.kept = false;
        }
        let offsets: Vec<usize> = self.capabilities.iter().map(|c| c.offset).collect();
        let next_up = offsets
            .iter()
            .copied()
            .filter(|&o| o > offset)
            .min()
            .unwrap_or(LEGACY_CONFIG_SPACE_SIZE);
        self.set_range(offset..next_up, ByteOwner::Hidden);
        self.relink();
    }
}

fn read_u16(raw: &[u8], at: usize) -> u16 {
    raw.get(at..at + 2)
        .map_or(0, |b| u16::from_le_bytes([b[0], b[1]]))
}

fn read_u32(raw: &[u8], at: usize) -> u32 {
    raw.get(at..at + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The MSI capability we emulate for the host's, from its message control.
fn msi_capability(raw: &[u8], offset: usize) -> MsiCapability {
    let ctl = read_u16(raw, offset + 2);
    // Masked to 3 bits; MsiCapability clamps anything above 5.
    let log2 = ((ctl >> MSI_CTL_MMC_SHIFT) & MSI_CTL_MULTIPLE_MESSAGE_MASK) as u8;
    MsiCapability::new(
        log2.min(MAX_MSI_VECTORS_LOG2),
        ctl & MSI_CTL_64BIT != 0,
        ctl & MSI_CTL_PER_VECTOR_MASK != 0,
    )
}

/// The MSI-X capability we emulate for the host's: same table size and
/// table/PBA locations.
fn msix_capability(raw: &[u8], offset: usize) -> MsixCapability {
    let ctl = read_u16(raw, offset + 2);
    let table = read_u32(raw, offset + 4);
    let pba = read_u32(raw, offset + 8);
    MsixCapability::new(
        (ctl & MSIX_MSG_CTL_TABLE_SIZE) + 1,
        (table & 0x7) as u8,
        table & !0x7,
        (pba & 0x7) as u8,
        pba & !0x7,
    )
}
