//! MSI (PCI Local Bus spec 3.0, section 6.8.1): the capability structure
//! placed in configuration space, and the device-side state that turns what
//! the guest programmed into per-vector messages.
//!
//! Unlike MSI-X, all MSI state lives in configuration space. The
//! configuration space stores the capability bytes and applies
//! [`MsiCapability::writable_mask`] to guest writes; after a guest write
//! touching the capability the device passes the whole capability, as now
//! stored, to [`MsiConfig::update_from_config`]. Pending bits are set by the
//! device, not the guest, so the device mirrors [`MsiConfig::pending_bits`]
//! into configuration space after `trigger`, `update_from_config` and
//! `reset`.
//!
//! Design decisions:
//! - A multiple message enable value above multiple message capable (which
//!   the spec forbids software to write) is clamped to the capable value.
//! - Vectors outside the enabled set (MSI disabled, or index at or above the
//!   number of enabled vectors) are reported to the group as masked with a
//!   zero message; raising one drops the interrupt and their pending bits
//!   are cleared.
//! - The interrupt group is assumed to start with every vector masked and a
//!   zero message; `update` is only called when that state changes.

use std::fmt;
use std::sync::Arc;

use log::{debug, error, warn};

use crate::capability::{PciCapability, PciCapabilityId};
use crate::device::PciError;
use crate::interrupt::{InterruptError, MsiInterruptGroup, MsiMessage, ToldRoutes, VectorUpdate};

/// Largest multiple message capable value: 2^5 = 32 vectors.
pub const MAX_MSI_VECTORS_LOG2: u8 = 5;
/// Largest number of MSI vectors a function can have.
pub const MAX_MSI_VECTORS: usize = 1 << MAX_MSI_VECTORS_LOG2;

/// Message control: MSI enable (read-write).
pub const MSI_CTL_ENABLE: u16 = 1;
/// Message control: shift of the multiple message capable field (bits 3:1).
pub const MSI_CTL_MMC_SHIFT: u16 = 1;
/// Message control: shift of the multiple message enable field (bits 6:4).
pub const MSI_CTL_MME_SHIFT: u16 = 4;
/// Message control: mask of a multiple message field once shifted down.
pub const MSI_CTL_MULTIPLE_MESSAGE_MASK: u16 = 0x7;
/// Message control: 64-bit address capable.
pub const MSI_CTL_64BIT: u16 = 1 << 7;
/// Message control: per-vector masking capable.
pub const MSI_CTL_PER_VECTOR_MASK: u16 = 1 << 8;

/// The ID and next pointer precede the body of every capability.
const CAP_HEADER_SIZE: usize = 2;

/// Where each field of an MSI capability lives, as byte offsets from the
/// start of the capability (the ID byte).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiLayout {
    /// Message control (u16).
    pub message_control: usize,
    /// Message address (u32, or its low half when 64-bit capable).
    pub address_lo: usize,
    /// Message upper address (u32), when 64-bit capable.
    pub address_hi: Option<usize>,
    /// Message data (u16).
    pub data: usize,
    /// Mask bits (u32), when per-vector masking capable.
    pub mask_bits: Option<usize>,
    /// Pending bits (u32), when per-vector masking capable.
    pub pending_bits: Option<usize>,
    /// Size of the whole capability, including the ID and next pointer.
    pub size: usize,
}

impl MsiLayout {
    /// The layout of the capability variant with the given features.
    /// Sizes: 10 bytes (32-bit), 14 (64-bit), 20 (32-bit with per-vector
    /// masking), 24 (64-bit with per-vector masking).
    pub const fn new(is_64bit: bool, per_vector_mask: bool) -> Self {
        let (address_hi, data) = if is_64bit { (Some(8), 12) } else { (None, 8) };
        // With masking, two reserved bytes after the data keep the mask
        // bits dword aligned.
        let (mask_bits, pending_bits, size) = if per_vector_mask {
            (Some(data + 4), Some(data + 8), data + 12)
        } else {
            (None, None, data + 2)
        };
        MsiLayout {
            message_control: 2,
            address_lo: 4,
            address_hi,
            data,
            mask_bits,
            pending_bits,
            size,
        }
    }
}

/// The MSI capability structure as it appears in configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiCapability {
    vectors_log2: u8,
    is_64bit: bool,
    per_vector_mask: bool,
}

impl MsiCapability {
    /// A capability for `2^vectors_log2` vectors (`vectors_log2` in
    /// 0..=5), optionally with a 64-bit address and per-vector masking.
    ///
    /// This comes from the VMM, not the guest, so a `vectors_log2` above 5
    /// is logged and clamped; [`MsiConfig::new`] rejects it instead.
    pub fn new(vectors_log2: u8, is_64bit: bool, per_vector_mask: bool) -> Self {
        if vectors_log2 > MAX_MSI_VECTORS_LOG2 {
            warn!("MSI capability with 2^{vectors_log2} vectors, clamping to {MAX_MSI_VECTORS}");
        }
        MsiCapability {
            vectors_log2: vectors_log2.min(MAX_MSI_VECTORS_LOG2),
            is_64bit,
            per_vector_mask,
        }
    }

    /// Where the fields of this capability live.
    pub fn layout(&self) -> MsiLayout {
        MsiLayout::new(self.is_64bit, self.per_vector_mask)
    }

    /// Number of vectors the function is capable of (1..=32).
    pub fn capable_vectors(&self) -> u16 {
        1 << self.vectors_log2
    }

    /// log2 of [`capable_vectors`](Self::capable_vectors).
    pub fn vectors_log2(&self) -> u8 {
        self.vectors_log2
    }

    /// Whether the capability has a 64-bit message address.
    pub fn is_64bit(&self) -> bool {
        self.is_64bit
    }

    /// Whether the capability has mask and pending bits.
    pub fn per_vector_mask(&self) -> bool {
        self.per_vector_mask
    }

    /// Initial message control value (capabilities; disabled).
    pub fn message_control(&self) -> u16 {
        let mut ctl = u16::from(self.vectors_log2) << MSI_CTL_MMC_SHIFT;
        if self.is_64bit {
            ctl |= MSI_CTL_64BIT;
        }
        if self.per_vector_mask {
            ctl |= MSI_CTL_PER_VECTOR_MASK;
        }
        ctl
    }

    /// The mask bits that correspond to existing vectors.
    fn valid_vector_bits(&self) -> u32 {
        low_bits(self.capable_vectors())
    }
}

impl PciCapability for MsiCapability {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::Msi
    }

    fn body(&self) -> Vec<u8> {
        let layout = self.layout();
        let mut body = vec![0; layout.size - CAP_HEADER_SIZE];
        put(
            &mut body,
            layout.message_control,
            &self.message_control().to_le_bytes(),
        );
        body
    }

    fn writable_mask(&self) -> Vec<u8> {
        let layout = self.layout();
        let mut mask = vec![0; layout.size - CAP_HEADER_SIZE];
        let ctl = MSI_CTL_ENABLE | (MSI_CTL_MULTIPLE_MESSAGE_MASK << MSI_CTL_MME_SHIFT);
        put(&mut mask, layout.message_control, &ctl.to_le_bytes());
        // Address bits 1:0 are read-only zero: it must be dword aligned.
        put(&mut mask, layout.address_lo, &0xffff_fffcu32.to_le_bytes());
        if let Some(hi) = layout.address_hi {
            put(&mut mask, hi, &[0xff; 4]);
        }
        put(&mut mask, layout.data, &[0xff; 2]);
        if let Some(bits) = layout.mask_bits {
            put(&mut mask, bits, &self.valid_vector_bits().to_le_bytes());
        }
        mask
    }
}

/// Copies `bytes` into a capability body at capability offset `cap_offset`.
/// Offsets come from [`MsiLayout`], so they always fit the body.
fn put(body: &mut [u8], cap_offset: usize, bytes: &[u8]) {
    let start = cap_offset - CAP_HEADER_SIZE;
    body[start..start + bytes.len()].copy_from_slice(bytes);
}

/// A mask of the low `n` bits, `n` at most 32.
fn low_bits(n: u16) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

fn read_u16(bytes: &[u8], offset: usize) -> Option<u16> {
    let end = offset.checked_add(2)?;
    Some(u16::from_le_bytes(bytes.get(offset..end)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], offset: usize) -> Option<u32> {
    let end = offset.checked_add(4)?;
    Some(u32::from_le_bytes(bytes.get(offset..end)?.try_into().ok()?))
}

/// Device-side MSI state, mirrored from the capability in configuration
/// space, plus the pending bits the device owns.
pub struct MsiConfig {
    cap: MsiCapability,
    enabled: bool,
    /// Multiple message enable, clamped to the capable value.
    enabled_log2: u8,
    address: u64,
    data: u16,
    mask: u32,
    pending: u32,
    /// What the group was last told for each capable vector.
    routes: ToldRoutes,
    group: Arc<dyn MsiInterruptGroup>,
}

impl fmt::Debug for MsiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MsiConfig")
            .field("cap", &self.cap)
            .field("enabled", &self.enabled)
            .field("enabled_log2", &self.enabled_log2)
            .field("address", &self.address)
            .field("data", &self.data)
            .field("mask", &self.mask)
            .field("pending", &self.pending)
            .finish_non_exhaustive()
    }
}

impl MsiConfig {
    /// State for an MSI capability with `2^vectors_log2` vectors
    /// (`vectors_log2` in 0..=5) delivered through `group`, which must
    /// accept indices below that count and is assumed to start with every
    /// vector masked and a zero message.
    pub fn new(
        vectors_log2: u8,
        is_64bit: bool,
        per_vector_mask: bool,
        group: Arc<dyn MsiInterruptGroup>,
    ) -> Result<Self, PciError> {
        if vectors_log2 > MAX_MSI_VECTORS_LOG2 {
            let count = 1usize
                .checked_shl(u32::from(vectors_log2))
                .unwrap_or(usize::MAX);
            return Err(PciError::InvalidMsiVectorCount(count));
        }
        Ok(MsiConfig {
            cap: MsiCapability::new(vectors_log2, is_64bit, per_vector_mask),
            enabled: false,
            enabled_log2: 0,
            address: 0,
            data: 0,
            mask: 0,
            pending: 0,
            routes: ToldRoutes::new(MAX_MSI_VECTORS),
            group,
        })
    }

    /// The capability to place in configuration space for this state.
    pub fn capability(&self) -> MsiCapability {
        self.cap
    }

    /// Where the fields of the capability live.
    pub fn layout(&self) -> MsiLayout {
        self.cap.layout()
    }

    /// The interrupt group vectors are delivered through.
    pub fn group(&self) -> &Arc<dyn MsiInterruptGroup> {
        &self.group
    }

    /// Whether the guest set MSI enable.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Number of vectors the guest enabled: 2^(multiple message enable),
    /// clamped to the capable count, or 0 while MSI is disabled.
    pub fn num_enabled_vectors(&self) -> u16 {
        if self.enabled {
            1 << self.enabled_log2
        } else {
            0
        }
    }

    /// The mask bits as the guest last wrote them (0 without per-vector
    /// masking).
    pub fn mask_bits(&self) -> u32 {
        self.mask
    }

    /// The pending bits, for the device to mirror into configuration space
    /// at the `pending_bits` offset of [`layout`](Self::layout).
    pub fn pending_bits(&self) -> u32 {
        self.pending
    }

    /// The message vector `vector` sends, if it is enabled: the programmed
    /// data with its low log2(enabled vectors) bits replaced by `vector`.
    pub fn message(&self, vector: u16) -> Option<MsiMessage> {
        let count = self.num_enabled_vectors();
        if vector >= count {
            return None;
        }
        let data = (u32::from(self.data) & !(u32::from(count) - 1)) | u32::from(vector);
        Some(MsiMessage {
            address: self.address,
            data,
        })
    }

    /// Whether `vector` cannot be delivered now: MSI disabled, vector not
    /// enabled, or its mask bit set.
    pub fn is_vector_masked(&self, vector: u16) -> bool {
        self.vector_state(vector).1
    }

    /// Takes in the capability as now stored in configuration space, after
    /// a guest write: `cap_bytes` starts at the capability ID byte and must
    /// be at least `layout().size` bytes long (shorter input is logged and
    /// ignored). Vectors whose message or effective mask changed are
    /// updated in the group; pending vectors that became unmasked fire.
    pub fn update_from_config(&mut self, cap_bytes: &[u8]) {
        let layout = self.layout();
        if cap_bytes.len() < layout.size {
            error!(
                "MSI capability of {} bytes given, {} expected; ignored",
                cap_bytes.len(),
                layout.size
            );
            return;
        }
        let ctl = read_u16(cap_bytes, layout.message_control).unwrap_or(0);
        self.enabled = ctl & MSI_CTL_ENABLE != 0;
        // At most 7, so the cast cannot truncate.
        let requested = ((ctl >> MSI_CTL_MME_SHIFT) & MSI_CTL_MULTIPLE_MESSAGE_MASK) as u8;
        if requested > self.cap.vectors_log2 {
            debug!(
                "MSI multiple message enable {requested} above capable {}, clamped",
                self.cap.vectors_log2
            );
        }
        self.enabled_log2 = requested.min(self.cap.vectors_log2);

        let lo = read_u32(cap_bytes, layout.address_lo).unwrap_or(0) & !0x3;
        let hi = layout
            .address_hi
            .and_then(|o| read_u32(cap_bytes, o))
            .unwrap_or(0);
        self.address = (u64::from(hi) << 32) | u64::from(lo);
        self.data = read_u16(cap_bytes, layout.data).unwrap_or(0);
        self.mask = layout
            .mask_bits
            .and_then(|o| read_u32(cap_bytes, o))
            .unwrap_or(0)
            & self.cap.valid_vector_bits();
        // A vector that is no longer enabled cannot have a message pending.
        self.pending &= low_bits(self.num_enabled_vectors());
        self.sync_all();
    }

    /// Raises `vector`: delivers it if enabled and unmasked, sets its
    /// pending bit if masked, and drops it if MSI is disabled or the vector
    /// is beyond the enabled count.
    ///
    /// Fails for a vector beyond the capable count, or when the group fails
    /// to deliver.
    pub fn trigger(&mut self, vector: u16) -> Result<(), InterruptError> {
        if vector >= self.cap.capable_vectors() {
            return Err(InterruptError::InvalidVector(vector));
        }
        if vector >= self.num_enabled_vectors() {
            debug!("MSI vector {vector} raised while not enabled, dropped");
            return Ok(());
        }
        let bit = 1u32 << vector;
        if self.mask & bit != 0 {
            self.pending |= bit;
            return Ok(());
        }
        self.group.trigger(vector)
    }

    /// Device reset: MSI disabled, message, mask and pending bits cleared.
    /// The group hears about every vector whose state changed.
    pub fn reset(&mut self) {
        self.enabled = false;
        self.enabled_log2 = 0;
        self.address = 0;
        self.data = 0;
        self.mask = 0;
        self.pending = 0;
        self.sync_all();
    }

    /// The (message, masked) pair the group should have for `vector`.
    fn vector_state(&self, vector: u16) -> (MsiMessage, bool) {
        match self.message(vector) {
            Some(msg) => (msg, self.mask & (1u32 << vector) != 0),
            None => (MsiMessage::default(), true),
        }
    }

    /// Brings every capable vector up to date in the group, in one batch,
    /// updating routes before firing pending vectors so the routes exist
    /// first.
    fn sync_all(&mut self) {
        let vectors = 0..self.cap.capable_vectors();
        let wanted: Vec<VectorUpdate> = vectors
            .clone()
            .map(|vector| {
                let (msg, masked) = self.vector_state(vector);
                VectorUpdate {
                    index: vector,
                    msg,
                    masked,
                }
            })
            .collect();
        self.routes.sync(&*self.group, wanted, &"MSI vectors");
        for vector in vectors {
            let bit = 1u32 << vector;
            if !self.vector_state(vector).1 && self.pending & bit != 0 {
                self.pending &= !bit;
                if let Err(e) = self.group.trigger(vector) {
                    error!("failed to deliver pending MSI vector {vector}: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
