//! BAR discovery and the mmap/trap split around the MSI-X table and PBA.

use super::fake::*;
use crate::configuration::{PciBarPrefetchable, PciBarRegionType, ROM_BAR_INDEX};
use crate::vfio::bars::discover_bars;
use crate::vfio::*;

fn chunks(region: u64, areas: &[(u64, u64)], trapped: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let areas: Vec<MmapArea> = areas
        .iter()
        .map(|&(offset, size)| MmapArea { offset, size })
        .collect();
    mmap_chunks(region, &areas, trapped, PAGE)
        .into_iter()
        .map(|c| (c.offset, c.size))
        .collect()
}

#[test]
fn whole_region_without_msix_is_one_chunk() {
    assert_eq!(chunks(0x10_0000, &[(0, 0x10_0000)], &[]), [(0, 0x10_0000)]);
}

#[test]
fn page_aligned_table_and_pba_leave_holes_of_their_pages() {
    // 64 KiB BAR, table at 0x2000 (one page), PBA at 0x8000.
    let got = chunks(0x1_0000, &[(0, 0x1_0000)], &[(0x2000, 0x400), (0x8000, 8)]);
    assert_eq!(
        got,
        [(0, 0x2000), (0x3000, 0x5000), (0x9000, 0x7000)],
        "everything but the two pages"
    );
}

#[test]
fn unaligned_table_costs_the_pages_around_it_not_the_mmap() {
    // A 0x1800-byte table at 0x1800 touches pages 1, 2 (0x1000..0x3000).
    let got = chunks(0x8000, &[(0, 0x8000)], &[(0x1800, 0x1800)]);
    assert_eq!(got, [(0, 0x1000), (0x3000, 0x5000)]);
    for (offset, size) in got {
        assert_eq!(offset % PAGE, 0);
        assert_eq!(size % PAGE, 0);
    }
}

#[test]
fn table_and_pba_in_the_same_page_make_one_hole() {
    let got = chunks(0x4000, &[(0, 0x4000)], &[(0x1000, 0x100), (0x1800, 8)]);
    assert_eq!(got, [(0, 0x1000), (0x2000, 0x2000)]);
}

#[test]
fn a_bar_smaller_than_a_page_is_never_mmapped() {
    assert!(chunks(0x100, &[(0, 0x100)], &[]).is_empty());
    assert!(chunks(0x800, &[(0, 0x800)], &[(0, 0x10)]).is_empty());
}

#[test]
fn table_filling_the_bar_leaves_nothing() {
    assert!(chunks(0x1000, &[(0, 0x1000)], &[(0, 0x100), (0x800, 8)]).is_empty());
}

#[test]
fn sparse_areas_are_kept_shrunk_to_pages_and_holed() {
    // VFIO (before MSIX_MAPPABLE) leaves the table page out of the areas.
    let got = chunks(
        0x1_0000,
        &[(0, 0x3000), (0x4000, 0xc000)],
        &[(0x3000, 0x200)],
    );
    assert_eq!(got, [(0, 0x3000), (0x4000, 0xc000)]);
    // Unaligned area edges shrink inwards; areas past the region are cut.
    let got = chunks(0x8000, &[(0x800, 0x2800), (0x6000, 0x4000)], &[]);
    assert_eq!(got, [(0x1000, 0x2000), (0x6000, 0x2000)]);
}

#[test]
fn overlapping_and_adjacent_areas_merge() {
    let got = chunks(
        0x8000,
        &[(0, 0x3000), (0x2000, 0x2000), (0x4000, 0x1000)],
        &[],
    );
    assert_eq!(got, [(0, 0x5000)]);
}

#[test]
fn hostile_numbers_do_not_overflow() {
    let got = chunks(
        u64::MAX,
        &[(u64::MAX - 0x1fff, 0x2000)],
        &[(u64::MAX - 8, 100)],
    );
    assert!(got.iter().all(|&(o, s)| o.checked_add(s).is_some()));
    assert!(mmap_chunks(
        0x4000,
        &[MmapArea {
            offset: 0,
            size: 0x4000
        }],
        &[],
        3
    )
    .is_empty());
}

#[test]
fn bars_are_sized_from_regions_and_typed_from_registers() {
    let config = ConfigBuilder::new(256)
        .bar(0, 0x0) // 32-bit memory
        .bar(1, 0x0) // absent (region size 0)
        .bar(2, 0xc) // 64-bit prefetchable, takes 2 and 3
        .bar(4, 0x1) // I/O
        .build();
    let fake = FakeVfio::new(config)
        .with_region(0, 0x10_0000, true)
        .with_region(2, 0x3000, true) // not a power of two
        .with_region(4, 0x20, false)
        .with_region(VFIO_PCI_ROM_REGION_INDEX, 0x9000, false);
    let (bars, rom) = discover_bars(&fake).unwrap();
    let summary: Vec<_> = bars
        .iter()
        .map(|b| {
            (
                b.index,
                b.region_type,
                b.prefetchable,
                b.size,
                b.region_size,
            )
        })
        .collect();
    use PciBarPrefetchable::*;
    use PciBarRegionType::*;
    assert_eq!(
        summary,
        [
            (0, Memory32BitRegion, NotPrefetchable, 0x10_0000, 0x10_0000),
            (2, Memory64BitRegion, Prefetchable, 0x4000, 0x3000),
            (4, IoRegion, NotPrefetchable, 0x20, 0x20),
        ]
    );
    let rom = rom.unwrap();
    assert_eq!(
        (rom.index, rom.size, rom.region_size),
        (ROM_BAR_INDEX, 0x1_0000, 0x9000)
    );
    assert_eq!(rom.region_index(), VFIO_PCI_ROM_REGION_INDEX);
}

#[test]
fn bars_that_cannot_be_presented_are_left_out() {
    let config = ConfigBuilder::new(256)
        .bar(0, 0x1) // I/O BAR too large
        .bar(5, 0x4) // 64-bit BAR in the last register
        .build();
    let fake = FakeVfio::new(config)
        .with_region(0, 0x1000, false)
        .with_region(5, 0x1000, true);
    let (bars, rom) = discover_bars(&fake).unwrap();
    assert!(bars.is_empty(), "{bars:?}");
    assert!(rom.is_none());
}
