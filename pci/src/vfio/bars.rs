//! The BARs of a host function: what the guest is shown (sized from the
//! VFIO regions, typed from the host's BAR registers) and which parts of
//! each can be mmapped into the guest around the MSI-X table and PBA.

use log::warn;

use super::{MmapArea, VfioBackend, VfioPciError, VFIO_PCI_CONFIG_REGION_INDEX};
use super::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_ROM_REGION_INDEX};
use crate::configuration::{PciBarPrefetchable, PciBarRegionType, BAR_COUNT, ROM_BAR_INDEX};

/// Offset of BAR 0 in configuration space.
const BAR0_OFFSET: u64 = 0x10;
const BAR_IO_BIT: u32 = 0x1;
const BAR_MEM_TYPE_MASK: u32 = 0x6;
const BAR_MEM_TYPE_64BIT: u32 = 0x4;
const BAR_MEM_PREFETCHABLE: u32 = 0x8;
/// Largest I/O BAR a type-0 header can describe on x86 (and that
/// [`crate::PciConfiguration::add_bar`] takes).
const MAX_IO_BAR_SIZE: u64 = 256;
/// Smallest BARs: 16 bytes of memory, 4 ports, 2 KiB of ROM.
const MIN_MEM_BAR_SIZE: u64 = 16;
const MIN_IO_BAR_SIZE: u64 = 4;
const MIN_ROM_SIZE: u64 = 2048;
/// Largest ROM we present (the ROM BAR is 32-bit; firmware images are far
/// smaller).
const MAX_ROM_SIZE: u64 = 1 << 24;

/// One BAR of the host function as the guest sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// BAR index 0..=5, or [`ROM_BAR_INDEX`] for the expansion ROM.
    pub index: usize,
    /// Address space (a 64-bit BAR also takes register `index + 1`).
    pub region_type: PciBarRegionType,
    /// Prefetchable flag as the host BAR has it.
    pub prefetchable: PciBarPrefetchable,
    /// Size the guest sees: the region size rounded up to a power of two.
    pub size: u64,
    /// Size of the VFIO region behind it; accesses beyond read as ones.
    pub region_size: u64,
}

impl BarInfo {
    /// The VFIO region index of this BAR.
    pub fn region_index(&self) -> u32 {
        if self.index == ROM_BAR_INDEX {
            VFIO_PCI_ROM_REGION_INDEX
        } else {
            // At most 5.
            VFIO_PCI_BAR0_REGION_INDEX + self.index as u32
        }
    }

    /// Whether the BAR decodes memory (as opposed to I/O ports).
    pub fn is_memory(&self) -> bool {
        self.region_type != PciBarRegionType::IoRegion
    }
}

/// Reads a little-endian dword of the host's configuration space.
pub(crate) fn read_config_u32(backend: &dyn VfioBackend, offset: u64) -> Result<u32, VfioPciError> {
    let mut bytes = [0u8; 4];
    backend
        .read_region(VFIO_PCI_CONFIG_REGION_INDEX, offset, &mut bytes)
        .map_err(|source| VfioPciError::ConfigRead { offset, source })?;
    Ok(u32::from_le_bytes(bytes))
}

/// A BAR size from a region size: a power of two, at least `min`.
fn bar_size(region_size: u64, min: u64) -> Option<u64> {
    let size = region_size.checked_next_power_of_two()?.max(min);
    if size != region_size {
        warn!("VFIO region of {region_size:#x} bytes presented as a {size:#x}-byte BAR");
    }
    Some(size)
}

/// The BARs (0..=5) and the expansion ROM of the host function. BARs VFIO
/// reports as empty are absent; BARs we cannot present (an I/O BAR above
/// 256 ports, a 64-bit BAR in register 5) are left out with a warning.
pub fn discover_bars(
    backend: &dyn VfioBackend,
) -> Result<(Vec<BarInfo>, Option<BarInfo>), VfioPciError> {
    let mut bars = Vec::new();
    let mut index = 0;
    while index < BAR_COUNT {
        let reg = read_config_u32(backend, BAR0_OFFSET + 4 * index as u64)?;
        let region_size = backend
            .region_info(VFIO_PCI_BAR0_REGION_INDEX + index as u32)
            .map_or(0, |r| r.size);
        let is_io = reg & BAR_IO_BIT != 0;
        let is_64bit = !is_io && reg & BAR_MEM_TYPE_MASK == BAR_MEM_TYPE_64BIT;
        let this = index;
        index += if is_64bit { 2 } else { 1 };
        if region_size == 0 {
            continue;
        }
        let (region_type, min) = match (is_io, is_64bit) {
            (true, _) => (PciBarRegionType::IoRegion, MIN_IO_BAR_SIZE),
            (false, true) => (PciBarRegionType::Memory64BitRegion, MIN_MEM_BAR_SIZE),
            (false, false) => (PciBarRegionType::Memory32BitRegion, MIN_MEM_BAR_SIZE),
        };
        if is_64bit && this + 1 >= BAR_COUNT {
            warn!("VFIO BAR {this} is 64-bit but has no upper register; left out");
            continue;
        }
        let Some(size) = bar_size(region_size, min) else {
            warn!("VFIO BAR {this} of {region_size:#x} bytes is too large; left out");
            continue;
        };
        if is_io && size > MAX_IO_BAR_SIZE {
            warn!("VFIO I/O BAR {this} of {size:#x} ports is too large to present; left out");
            continue;
        }
        let prefetchable = if !is_io && reg & BAR_MEM_PREFETCHABLE != 0 {
            PciBarPrefetchable::Prefetchable
        } else {
            PciBarPrefetchable::NotPrefetchable
        };
        bars.push(BarInfo {
            index: this,
            region_type,
            prefetchable,
            size,
            region_size,
        });
    }
    let rom = backend
        .region_info(VFIO_PCI_ROM_REGION_INDEX)
        .filter(|r| r.size > 0)
        .and_then(|r| match bar_size(r.size, MIN_ROM_SIZE) {
            Some(size) if size <= MAX_ROM_SIZE => Some(BarInfo {
                index: ROM_BAR_INDEX,
                region_type: PciBarRegionType::Memory32BitRegion,
                prefetchable: PciBarPrefetchable::NotPrefetchable,
                size,
                region_size: r.size,
            }),
            _ => {
                warn!(
                    "VFIO expansion ROM of {:#x} bytes is too large; left out",
                    r.size
                );
                None
            }
        });
    Ok((bars, rom))
}

/// A page-aligned part of a BAR that can be mmapped into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapChunk {
    /// Offset in the BAR.
    pub offset: u64,
    /// Size in bytes.
    pub size: u64,
}

fn align_down(value: u64, align: u64) -> u64 {
    value - value % align
}

fn align_up(value: u64, align: u64) -> Option<u64> {
    match value % align {
        0 => Some(value),
        r => value.checked_add(align - r),
    }
}

/// The parts of a region of `region_size` bytes to mmap: the mmap-able
/// `areas` VFIO reported, shrunk to whole pages of `page_size` bytes, minus
/// every page that holds any byte of the `trapped` ranges (the MSI-X table
/// and PBA, as (offset, size)). What is left is in offset order, page
/// aligned, non-empty and non-overlapping.
///
/// A table that is not page aligned costs the pages around it, never the
/// mmap (mmap offsets must be page aligned); a region smaller than a page
/// gets no chunk at all.
pub fn mmap_chunks(
    region_size: u64,
    areas: &[MmapArea],
    trapped: &[(u64, u64)],
    page_size: u64,
) -> Vec<MmapChunk> {
    if page_size == 0 || !page_size.is_power_of_two() {
        return Vec::new();
    }
    // Trapped ranges grown to whole pages, as [start, end).
    let holes: Vec<(u64, u64)> = trapped
        .iter()
        .filter(|(_, size)| *size > 0)
        .map(|&(offset, size)| {
            let end = offset.saturating_add(size);
            (
                align_down(offset, page_size),
                align_up(end, page_size).unwrap_or(u64::MAX),
            )
        })
        .collect();
    let mut pieces: Vec<(u64, u64)> = areas
        .iter()
        .filter_map(|a| {
            let end = a.offset.saturating_add(a.size).min(region_size);
            let start = align_up(a.offset, page_size)?;
            let end = align_down(end, page_size);
            (start < end).then_some((start, end))
        })
        .collect();
    for &(hole_start, hole_end) in &holes {
        pieces = pieces
            .into_iter()
            .flat_map(|(start, end)| {
                if hole_end <= start || end <= hole_start {
                    return vec![(start, end)];
                }
                [(start, hole_start.max(start)), (hole_end.min(end), end)]
                    .into_iter()
                    .filter(|(s, e)| s < e)
                    .collect()
            })
            .collect();
    }
    pieces.sort_unstable();
    // Overlapping areas (VFIO never reports them, but be safe) are merged
    // so no page is mapped twice.
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in pieces {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
        .into_iter()
        .map(|(start, end)| MmapChunk {
            offset: start,
            size: end - start,
        })
        .collect()
}
