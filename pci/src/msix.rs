//! MSI-X (PCI Local Bus spec 3.0, section 6.8.2): the capability structure
//! placed in configuration space, and the device-side state behind it, i.e.
//! the vector table and the pending bit array (PBA) that live in a BAR.
//!
//! Division of labour: the configuration space stores the capability bytes
//! and applies [`MsixCapability::writable_mask`] to guest writes; after such
//! a write the device hands the message control value now in configuration
//! space to [`MsixConfig::set_message_control`]. BAR accesses that hit the
//! table or the PBA go to [`MsixConfig::read_table`] and friends.
//!
//! Design decisions (see the individual methods for details):
//! - Table and PBA accesses of any width and alignment are handled byte by
//!   byte, so guest accesses the spec calls undefined cannot panic.
//! - Bytes outside the table or PBA read as zero; writes there are dropped.
//! - Bits 1:0 of the message address and bits 31:1 of vector control are
//!   read-only zero (the spec allows the former, requires the latter).
//! - A vector raised while MSI-X is disabled is dropped: the transport is
//!   expected to use INTx instead. A vector raised while masked (vector or
//!   function mask) sets its pending bit and fires once it is unmasked.
//! - The interrupt group is assumed to start with every vector masked and a
//!   zero message; `update` is only called when that state changes.

use std::fmt;
use std::sync::Arc;

use log::{debug, error, warn};

use crate::capability::{PciCapability, PciCapabilityId};
use crate::device::PciError;
use crate::interrupt::{InterruptError, MsiInterruptGroup, MsiMessage, ToldRoutes, VectorUpdate};

/// Largest table an MSI-X capability can describe (11-bit table size field).
pub const MAX_MSIX_VECTORS: usize = 2048;
/// Size of one MSI-X table entry in bytes.
pub const MSIX_TABLE_ENTRY_SIZE: usize = 16;

/// Offset of message control from the start of the capability.
pub const MSIX_CAP_MSG_CTL_OFFSET: usize = 2;
/// Offset of the table offset/BIR dword from the start of the capability.
pub const MSIX_CAP_TABLE_OFFSET: usize = 4;
/// Offset of the PBA offset/BIR dword from the start of the capability.
pub const MSIX_CAP_PBA_OFFSET: usize = 8;
/// Size of the whole capability, including the ID and next pointer.
pub const MSIX_CAP_SIZE: usize = 12;

/// Message control: table size minus one (read-only).
pub const MSIX_MSG_CTL_TABLE_SIZE: u16 = 0x07ff;
/// Message control: function mask.
pub const MSIX_MSG_CTL_FUNCTION_MASK: u16 = 1 << 14;
/// Message control: MSI-X enable.
pub const MSIX_MSG_CTL_ENABLE: u16 = 1 << 15;
/// Table/PBA dword: BAR indicator bits; the rest is the 8-byte aligned offset.
pub const MSIX_BIR_MASK: u32 = 0x7;
/// Vector control: the mask bit, the only defined bit.
pub const MSIX_VECTOR_CTL_MASKED: u32 = 1;

/// The ID and next pointer precede the body of every capability.
const CAP_HEADER_SIZE: usize = 2;
/// The PBA is an array of qwords, one bit per vector.
const PBA_ENTRY_SIZE: usize = 8;
const VECTORS_PER_PBA_ENTRY: u16 = 64;

/// One entry of the MSI-X table, as the guest programmed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixTableEntry {
    /// Message address bits 31:0 (bits 1:0 always zero).
    pub msg_addr_lo: u32,
    /// Message address bits 63:32.
    pub msg_addr_hi: u32,
    /// Message data.
    pub msg_data: u32,
    /// Vector control; bit 0 is the per-vector mask.
    pub vector_ctl: u32,
}

impl Default for MsixTableEntry {
    /// The reset state: masked, everything else zero.
    fn default() -> Self {
        MsixTableEntry {
            msg_addr_lo: 0,
            msg_addr_hi: 0,
            msg_data: 0,
            vector_ctl: MSIX_VECTOR_CTL_MASKED,
        }
    }
}

impl MsixTableEntry {
    /// Whether the per-vector mask bit is set.
    pub fn masked(&self) -> bool {
        self.vector_ctl & MSIX_VECTOR_CTL_MASKED != 0
    }

    /// The message this entry describes.
    pub fn message(&self) -> MsiMessage {
        MsiMessage {
            address: (u64::from(self.msg_addr_hi) << 32) | u64::from(self.msg_addr_lo),
            data: self.msg_data,
        }
    }

    /// Dword `index` (0..=3) as the guest reads it.
    fn read_dword(&self, index: usize) -> u32 {
        match index {
            0 => self.msg_addr_lo,
            1 => self.msg_addr_hi,
            2 => self.msg_data,
            // Reserved vector control bits read as zero.
            _ => self.vector_ctl & MSIX_VECTOR_CTL_MASKED,
        }
    }

    /// Stores a guest write to dword `index` (0..=3), dropping read-only bits.
    fn write_dword(&mut self, index: usize, value: u32) {
        match index {
            // Address bits 1:0 are read-only zero: it must be dword aligned.
            0 => self.msg_addr_lo = value & !0x3,
            1 => self.msg_addr_hi = value,
            2 => self.msg_data = value,
            _ => self.vector_ctl = value & MSIX_VECTOR_CTL_MASKED,
        }
    }
}

/// The MSI-X capability structure as it appears in configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixCapability {
    msg_ctl: u16,
    table: u32,
    pba: u32,
}

impl MsixCapability {
    /// A capability for a table of `vectors` entries at `table_offset` in
    /// BAR `table_bir` and a PBA at `pba_offset` in BAR `pba_bir`.
    ///
    /// These come from the VMM, not the guest, so invalid values are logged
    /// and coerced rather than rejected: `vectors` is clamped to
    /// 1..=[`MAX_MSIX_VECTORS`], BIRs keep their low 3 bits, and offsets
    /// lose their low 3 bits (they must be 8-byte aligned).
    pub fn new(
        vectors: u16,
        table_bir: u8,
        table_offset: u32,
        pba_bir: u8,
        pba_offset: u32,
    ) -> Self {
        if vectors == 0 || usize::from(vectors) > MAX_MSIX_VECTORS {
            warn!("MSI-X capability with {vectors} vectors, clamping to 1..={MAX_MSIX_VECTORS}");
        }
        if table_bir > 5 || pba_bir > 5 {
            warn!("MSI-X capability with invalid BIR (table {table_bir}, PBA {pba_bir})");
        }
        if (table_offset | pba_offset) & MSIX_BIR_MASK != 0 {
            warn!(
                "MSI-X table offset {table_offset:#x} or PBA offset {pba_offset:#x} \
                 is not 8-byte aligned"
            );
        }
        // The field holds size - 1; 2048 - 1 is exactly the 11-bit maximum.
        let size_field = vectors.clamp(1, MSIX_MSG_CTL_TABLE_SIZE + 1) - 1;
        MsixCapability {
            msg_ctl: size_field,
            table: (table_offset & !MSIX_BIR_MASK) | (u32::from(table_bir) & MSIX_BIR_MASK),
            pba: (pba_offset & !MSIX_BIR_MASK) | (u32::from(pba_bir) & MSIX_BIR_MASK),
        }
    }

    /// Initial message control value (table size; disabled, not masked).
    pub fn message_control(&self) -> u16 {
        self.msg_ctl
    }

    /// Number of table entries.
    pub fn table_size(&self) -> u16 {
        (self.msg_ctl & MSIX_MSG_CTL_TABLE_SIZE) + 1
    }

    /// BAR holding the table.
    pub fn table_bir(&self) -> u8 {
        // Masked to 3 bits, so the cast cannot truncate.
        (self.table & MSIX_BIR_MASK) as u8
    }

    /// Offset of the table in its BAR.
    pub fn table_offset(&self) -> u32 {
        self.table & !MSIX_BIR_MASK
    }

    /// BAR holding the PBA.
    pub fn pba_bir(&self) -> u8 {
        (self.pba & MSIX_BIR_MASK) as u8
    }

    /// Offset of the PBA in its BAR.
    pub fn pba_offset(&self) -> u32 {
        self.pba & !MSIX_BIR_MASK
    }
}

impl PciCapability for MsixCapability {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::MsiX
    }

    fn body(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(MSIX_CAP_SIZE - CAP_HEADER_SIZE);
        body.extend_from_slice(&self.msg_ctl.to_le_bytes());
        body.extend_from_slice(&self.table.to_le_bytes());
        body.extend_from_slice(&self.pba.to_le_bytes());
        body
    }

    fn writable_mask(&self) -> Vec<u8> {
        let mut mask = vec![0; MSIX_CAP_SIZE - CAP_HEADER_SIZE];
        // Only the function mask and enable bits of message control.
        let ctl = (MSIX_MSG_CTL_FUNCTION_MASK | MSIX_MSG_CTL_ENABLE).to_le_bytes();
        let start = MSIX_CAP_MSG_CTL_OFFSET - CAP_HEADER_SIZE;
        mask[start..start + 2].copy_from_slice(&ctl);
        mask
    }
}

/// Device-side MSI-X state: the table, the PBA, and the enable and function
/// mask bits mirrored from message control.
pub struct MsixConfig {
    table: Vec<MsixTableEntry>,
    pba: Vec<u64>,
    enabled: bool,
    function_masked: bool,
    /// What the group was last told for each vector.
    routes: ToldRoutes,
    group: Arc<dyn MsiInterruptGroup>,
}

impl fmt::Debug for MsixConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsixConfig")
            .field("vectors", &self.table.len())
            .field("enabled", &self.enabled)
            .field("function_masked", &self.function_masked)
            .field("pba", &self.pba)
            .finish_non_exhaustive()
    }
}

impl MsixConfig {
    /// State for `vectors` vectors (1..=[`MAX_MSIX_VECTORS`]) delivered
    /// through `group`, which must accept indices `0..vectors` and is
    /// assumed to start with every vector masked and a zero message.
    pub fn new(vectors: u16, group: Arc<dyn MsiInterruptGroup>) -> Result<Self, PciError> {
        let count = usize::from(vectors);
        if count == 0 || count > MAX_MSIX_VECTORS {
            return Err(PciError::InvalidMsixVectorCount(count));
        }
        let entry = MsixTableEntry::default();
        Ok(MsixConfig {
            table: vec![entry; count],
            pba: vec![0; count.div_ceil(usize::from(VECTORS_PER_PBA_ENTRY))],
            enabled: false,
            function_masked: false,
            routes: ToldRoutes::new(count),
            group,
        })
    }

    /// Number of vectors (table entries).
    pub fn vector_count(&self) -> u16 {
        // Bounded by MAX_MSIX_VECTORS in new().
        self.table.len() as u16
    }

    /// Whether the guest set MSI-X enable.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether the guest set the function mask.
    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Size of the table in bytes, for laying out the BAR.
    pub fn table_size_bytes(&self) -> u64 {
        (self.table.len() * MSIX_TABLE_ENTRY_SIZE) as u64
    }

    /// Size of the PBA in bytes (one bit per vector, in whole qwords).
    pub fn pba_size_bytes(&self) -> u64 {
        (self.pba.len() * PBA_ENTRY_SIZE) as u64
    }

    /// The interrupt group vectors are delivered through.
    pub fn group(&self) -> &Arc<dyn MsiInterruptGroup> {
        &self.group
    }

    /// A copy of table entry `vector`, if it exists.
    pub fn entry(&self, vector: u16) -> Option<MsixTableEntry> {
        self.table.get(usize::from(vector)).copied()
    }

    /// Whether `vector` cannot be delivered now: its mask bit or the
    /// function mask is set, or MSI-X is disabled. True for vectors that do
    /// not exist.
    pub fn is_vector_masked(&self, vector: u16) -> bool {
        match self.table.get(usize::from(vector)) {
            Some(entry) => entry.masked() || self.function_masked || !self.enabled,
            None => true,
        }
    }

    /// Whether `vector`'s pending bit is set. False for vectors that do not
    /// exist.
    pub fn pending(&self, vector: u16) -> bool {
        let (word, bit) = pba_position(vector);
        self.pba.get(word).is_some_and(|w| w & bit != 0)
    }

    /// Applies a new message control value (the one now in configuration
    /// space after a guest write). Reacts to enable and function mask
    /// transitions: vectors whose effective mask changed are updated in the
    /// group, and pending vectors that became deliverable fire.
    pub fn set_message_control(&mut self, ctl: u16) {
        let enabled = ctl & MSIX_MSG_CTL_ENABLE != 0;
        let function_masked = ctl & MSIX_MSG_CTL_FUNCTION_MASK != 0;
        if enabled == self.enabled && function_masked == self.function_masked {
            return;
        }
        debug!(
            "MSI-X enable {} -> {enabled}, function mask {} -> {function_masked}",
            self.enabled, self.function_masked
        );
        self.enabled = enabled;
        self.function_masked = function_masked;
        self.sync_vectors(0..self.vector_count());
    }

    /// Guest read of `data.len()` bytes at byte `offset` of the table.
    /// Bytes beyond the table read as zero.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (pos, byte) in (0u64..).zip(data.iter_mut()) {
            *byte = offset
                .checked_add(pos)
                .and_then(|addr| self.table_byte_position(addr))
                .and_then(|(entry, dword, shift)| {
                    let value = self.table.get(entry)?.read_dword(dword);
                    Some((value >> shift) as u8)
                })
                .unwrap_or(0);
        }
    }

    /// Guest write of `data` at byte `offset` of the table. Bytes beyond the
    /// table are dropped. Every entry the write touched is then brought up
    /// to date in the group, and fires if it became deliverable while
    /// pending.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let mut touched: Option<(usize, usize)> = None;
        let mut dropped = 0usize;
        for (pos, &byte) in (0u64..).zip(data.iter()) {
            let position = offset
                .checked_add(pos)
                .and_then(|addr| self.table_byte_position(addr));
            let Some((entry, dword, shift)) = position else {
                dropped += 1;
                continue;
            };
            let Some(e) = self.table.get_mut(entry) else {
                dropped += 1;
                continue;
            };
            let value = (e.read_dword(dword) & !(0xff << shift)) | (u32::from(byte) << shift);
            e.write_dword(dword, value);
            touched =
                Some(touched.map_or((entry, entry), |(lo, hi)| (lo.min(entry), hi.max(entry))));
        }
        if dropped > 0 {
            // Once per access, so a hostile guest cannot multiply log lines.
            debug!(
                "MSI-X table write of {} bytes at {offset:#x}: {dropped} beyond the table dropped",
                data.len()
            );
        }
        if let Some((first, last)) = touched {
            for entry in first..=last {
                // Entries are fewer than MAX_MSIX_VECTORS, so this fits.
                self.sync_vector(entry as u16);
            }
        }
    }

    /// Guest read of `data.len()` bytes at byte `offset` of the PBA. Bytes
    /// beyond the PBA read as zero.
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (pos, byte) in (0u64..).zip(data.iter_mut()) {
            *byte = offset
                .checked_add(pos)
                .and_then(|addr| usize::try_from(addr).ok())
                .and_then(|addr| {
                    let word = self.pba.get(addr / PBA_ENTRY_SIZE)?;
                    Some((word >> ((addr % PBA_ENTRY_SIZE) * 8)) as u8)
                })
                .unwrap_or(0);
        }
    }

    /// Guest write to the PBA: it is read-only, so the write is dropped.
    pub fn write_pba(&mut self, offset: u64, data: &[u8]) {
        debug!(
            "ignoring guest write of {} bytes to the read-only MSI-X PBA at {offset:#x}",
            data.len()
        );
    }

    /// Raises `vector`: delivers it if deliverable, sets its pending bit if
    /// masked (vector or function mask), and drops it if MSI-X is disabled
    /// (the caller is expected to fall back to INTx then).
    ///
    /// Fails for a vector that does not exist, or when the group fails to
    /// deliver.
    pub fn trigger(&mut self, vector: u16) -> Result<(), InterruptError> {
        let Some(entry) = self.table.get(usize::from(vector)) else {
            return Err(InterruptError::InvalidVector(vector));
        };
        if !self.enabled {
            debug!("MSI-X vector {vector} raised while MSI-X is disabled, dropped");
            return Ok(());
        }
        if entry.masked() || self.function_masked {
            let (word, bit) = pba_position(vector);
            if let Some(w) = self.pba.get_mut(word) {
                *w |= bit;
            }
            return Ok(());
        }
        self.group.trigger(vector)
    }

    /// Device reset: every entry masked and zeroed, PBA cleared, MSI-X
    /// disabled and the function unmasked. The group hears about every
    /// vector whose message or mask changed.
    pub fn reset(&mut self) {
        self.enabled = false;
        self.function_masked = false;
        self.pba.fill(0);
        self.table.fill(MsixTableEntry::default());
        self.sync_vectors(0..self.vector_count());
    }

    /// Maps a table byte address to (entry, dword in entry, bit shift in
    /// dword), or `None` beyond the table.
    fn table_byte_position(&self, addr: u64) -> Option<(usize, usize, u32)> {
        let addr = usize::try_from(addr).ok()?;
        let entry = addr / MSIX_TABLE_ENTRY_SIZE;
        if entry >= self.table.len() {
            return None;
        }
        let dword = (addr % MSIX_TABLE_ENTRY_SIZE) / 4;
        // At most 24, a valid shift for u32.
        let shift = ((addr % 4) * 8) as u32;
        Some((entry, dword, shift))
    }

    /// Tells the group about `vector` if its message or effective mask
    /// differ from what it was last told, then fires it if it is
    /// deliverable and pending.
    fn sync_vector(&mut self, vector: u16) {
        self.sync_vectors(vector..vector.saturating_add(1));
    }

    /// [`sync_vector`](Self::sync_vector) for a range of vectors, with the
    /// group told about all changes in one batch: a function mask toggle
    /// then costs the VMM one routing table push, not one per vector.
    /// Updating first means the routes exist by the time pending
    /// interrupts are sent.
    fn sync_vectors(&mut self, vectors: std::ops::Range<u16>) {
        let wanted: Vec<VectorUpdate> = vectors
            .clone()
            .filter_map(|vector| {
                let entry = self.table.get(usize::from(vector))?;
                Some(VectorUpdate {
                    index: vector,
                    msg: entry.message(),
                    masked: entry.masked() || self.function_masked || !self.enabled,
                })
            })
            .collect();
        let what = format_args!("MSI-X vectors {vectors:?}");
        self.routes.sync(&*self.group, wanted, &what);
        for vector in vectors {
            if !self.is_vector_masked(vector) {
                self.fire_if_pending(vector);
            }
        }
    }

    /// Clears `vector`'s pending bit and delivers it, if it was set.
    fn fire_if_pending(&mut self, vector: u16) {
        let (word, bit) = pba_position(vector);
        if let Some(w) = self.pba.get_mut(word) {
            if *w & bit != 0 {
                *w &= !bit;
                if let Err(e) = self.group.trigger(vector) {
                    error!("failed to deliver pending MSI-X vector {vector}: {e}");
                }
            }
        }
    }
}

/// The PBA qword index and bit for `vector`. The bit is computed in u64 so
/// vectors at bit 31 and above land where they belong.
fn pba_position(vector: u16) -> (usize, u64) {
    (
        usize::from(vector / VECTORS_PER_PBA_ENTRY),
        1u64 << (vector % VECTORS_PER_PBA_ENTRY),
    )
}

#[cfg(test)]
mod tests;
