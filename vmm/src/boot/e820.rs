//! The guest's physical memory map as both boot protocols report it (the
//! zero page's e820 table, PVH's `hvm_memmap_table_entry` list).
//!
//! RAM is reported where it is mapped, minus the legacy area between the
//! EBDA and 1 MiB. Reserved: the ACPI tables' area, the PCI ECAM window,
//! the IOAPIC and local APIC pages, and the pages KVM uses for its TSS and
//! identity map. The 32-bit and 64-bit PCI MMIO windows are deliberately
//! *not* reserved: Linux clips e820-reserved ranges out of the host
//! bridge's `_CRS` windows (when the firmware has no 2023+ DMI date, which
//! we never provide), which would leave it nowhere to put BARs.

use vm_allocator::layout::{
    RamLayout, IOAPIC_SIZE, IOAPIC_START, LAPIC_SIZE, LAPIC_START, PCI_ECAM_SIZE, PCI_ECAM_START,
};

use crate::arch::{
    ACPI_END, ACPI_START, EBDA_START, HIGH_RAM_START, KVM_IDENTITY_MAP_START, KVM_TSS_SIZE,
    KVM_TSS_START,
};

/// Kind of an e820 range, with the numeric values both protocols use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved: not RAM, not to be used by the OS for anything else.
    Reserved = 2,
}

/// One range of the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Guest physical base.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

impl E820Entry {
    fn new(addr: u64, size: u64, kind: E820Type) -> Self {
        E820Entry { addr, size, kind }
    }

    /// Exclusive end.
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// The memory map of a guest whose RAM is laid out as `layout`, in address
/// order. `layout` must come from `ram_layout` with at least the minimum
/// RAM size, so low RAM extends past 1 MiB.
pub fn memory_map(layout: &RamLayout) -> Vec<E820Entry> {
    let low_end = layout.below_hole.end();
    let mut map = vec![
        E820Entry::new(0, EBDA_START.min(low_end), E820Type::Ram),
        E820Entry::new(ACPI_START, ACPI_END - ACPI_START, E820Type::Reserved),
    ];
    if low_end > HIGH_RAM_START {
        map.push(E820Entry::new(
            HIGH_RAM_START,
            low_end - HIGH_RAM_START,
            E820Type::Ram,
        ));
    }
    map.extend([
        E820Entry::new(PCI_ECAM_START, PCI_ECAM_SIZE, E820Type::Reserved),
        E820Entry::new(IOAPIC_START, IOAPIC_SIZE, E820Type::Reserved),
        E820Entry::new(LAPIC_START, LAPIC_SIZE, E820Type::Reserved),
        E820Entry::new(
            KVM_IDENTITY_MAP_START,
            KVM_TSS_START + KVM_TSS_SIZE - KVM_IDENTITY_MAP_START,
            E820Type::Reserved,
        ),
    ]);
    if let Some(high) = layout.above_4g {
        map.push(E820Entry::new(high.base, high.size, E820Type::Ram));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_allocator::layout::{
        ram_layout, GIB, MEM_32BIT_HOLE_START, MIB, MMIO32_WINDOW_END, MMIO32_WINDOW_START,
    };

    fn assert_sorted_disjoint(map: &[E820Entry]) {
        for w in map.windows(2) {
            assert!(w[0].end() <= w[1].addr, "{:x?} overlaps {:x?}", w[0], w[1]);
        }
    }

    #[test]
    fn small_guest() {
        let map = memory_map(&ram_layout(512 * MIB).unwrap());
        assert_sorted_disjoint(&map);
        assert_eq!(map[0], E820Entry::new(0, 0x9fc00, E820Type::Ram));
        assert_eq!(map[1], E820Entry::new(0xe0000, 0x20000, E820Type::Reserved));
        assert_eq!(map[2], E820Entry::new(0x10_0000, 511 * MIB, E820Type::Ram));
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 512 * MIB - (0x10_0000 - 0x9fc00));
        assert!(map
            .iter()
            .any(|e| e.addr == PCI_ECAM_START && e.kind == E820Type::Reserved));
        assert!(map.iter().all(|e| e.addr < 4 * GIB));
    }

    #[test]
    fn large_guest_has_ram_above_4g() {
        let map = memory_map(&ram_layout(8 * GIB).unwrap());
        assert_sorted_disjoint(&map);
        assert_eq!(
            map[2],
            E820Entry::new(0x10_0000, MEM_32BIT_HOLE_START - 0x10_0000, E820Type::Ram)
        );
        assert_eq!(
            *map.last().unwrap(),
            E820Entry::new(4 * GIB, 5 * GIB, E820Type::Ram)
        );
    }

    #[test]
    fn pci_mmio_window_is_not_reserved() {
        let map = memory_map(&ram_layout(8 * GIB).unwrap());
        assert!(map
            .iter()
            .all(|e| e.end() <= MMIO32_WINDOW_START || e.addr >= MMIO32_WINDOW_END));
    }
}
