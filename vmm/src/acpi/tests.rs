//! Reads the tables back out of guest memory the way a guest would.

use std::collections::HashMap;

use vm_allocator::layout::{ram_layout, GIB, MIB};
use vm_memory::GuestMemoryBackend;

use super::*;

fn mem() -> GuestMemoryMmap {
    crate::memory::create_guest_memory(16 * MIB).unwrap().0
}

fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |a, b| a.wrapping_add(*b))
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// Reads a whole table at `addr` and checks its length and checksum.
fn table(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
    let header = read(mem, addr, 36);
    let len = u32_at(&header, 4) as usize;
    assert!(len >= 36);
    let t = read(mem, addr, len);
    assert_eq!(
        sum(&t),
        0,
        "checksum of {}",
        String::from_utf8_lossy(&t[..4])
    );
    assert_eq!(&t[10..16], b"TRELIS");
    t
}

/// RSDP -> XSDT -> tables by signature, plus the DSDT through the FADT.
fn walk(mem: &GuestMemoryMmap, rsdp_addr: u64) -> HashMap<String, (u64, Vec<u8>)> {
    let rsdp = read(mem, rsdp_addr, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0);
    assert_eq!(sum(&rsdp), 0);
    assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
    assert_eq!(u32_at(&rsdp, 20), 36);
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt = table(mem, xsdt_addr);
    assert_eq!(&xsdt[..4], b"XSDT");
    let mut out = HashMap::new();
    for i in 0..(xsdt.len() - 36) / 8 {
        let addr = u64_at(&xsdt, 36 + 8 * i);
        let t = table(mem, addr);
        out.insert(String::from_utf8_lossy(&t[..4]).into_owned(), (addr, t));
    }
    let dsdt_addr = u64_at(&out["FACP"].1, 140);
    let dsdt = table(mem, dsdt_addr);
    out.insert("DSDT".into(), (dsdt_addr, dsdt));
    out
}

#[test]
fn table_chain_and_checksums() {
    let m = mem();
    let pci = PciHostInfo::default();
    let rsdp = create_acpi_tables(&m, 2, &pci).unwrap();
    assert_eq!(rsdp, 0xe0000);
    let tables = walk(&m, rsdp);
    let mut names: Vec<_> = tables.keys().cloned().collect();
    names.sort();
    assert_eq!(names, ["APIC", "DSDT", "FACP", "MCFG"]);
    // Everything inside the reserved area, nothing overlapping.
    let mut spans: Vec<_> = tables
        .values()
        .map(|(a, t)| (*a, *a + t.len() as u64))
        .collect();
    spans.sort();
    assert!(spans[0].0 >= 0xe0000 + 36);
    assert!(spans.last().unwrap().1 <= 0x10_0000);
    for w in spans.windows(2) {
        assert!(w[0].1 <= w[1].0);
    }
}

#[test]
fn fadt_is_hw_reduced_with_pm_registers() {
    let m = mem();
    let rsdp = create_acpi_tables(&m, 1, &PciHostInfo::default()).unwrap();
    let (_, f) = &walk(&m, rsdp)["FACP"];
    assert_eq!(f.len(), 276);
    assert_eq!(f[8], 6, "FADT major version");
    let flags = u32_at(f, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_eq!(u16_at(f, 109), (1 << 2) | (1 << 5));
    // GAS: system I/O, 8 bits, offset 0, byte access, address.
    let gas = |o: usize| (f[o], f[o + 1], f[o + 2], f[o + 3], u64_at(f, o + 4));
    assert_eq!(gas(116), (1, 8, 0, 1, 0x602), "reset register");
    assert_eq!(f[128], 0x06, "reset value");
    assert_eq!(gas(244), (1, 8, 0, 1, 0x600), "sleep control");
    assert_eq!(gas(256), (1, 8, 0, 1, 0x601), "sleep status");
    assert_eq!(u32_at(f, 40), 0, "32-bit DSDT pointer unused");
}

#[test]
fn madt_lists_cpus_ioapic_and_override() {
    let m = mem();
    let rsdp = create_acpi_tables(&m, 4, &PciHostInfo::default()).unwrap();
    let (_, t) = &walk(&m, rsdp)["APIC"];
    assert_eq!(u32_at(t, 36), 0xfee0_0000);
    assert_eq!(u32_at(t, 40), 1);
    let mut off = 44;
    let mut lapics = Vec::new();
    let mut ioapics = Vec::new();
    let mut overrides = Vec::new();
    let mut nmis = 0;
    while off < t.len() {
        let (kind, len) = (t[off], usize::from(t[off + 1]));
        let e = &t[off..off + len];
        match kind {
            0 => lapics.push((e[2], e[3], u32_at(e, 4))),
            1 => ioapics.push((e[2], u32_at(e, 4), u32_at(e, 8))),
            2 => overrides.push((e[3], u32_at(e, 4), u16_at(e, 8))),
            4 => {
                assert_eq!((e[2], e[5]), (0xff, 1));
                nmis += 1;
            }
            other => panic!("unexpected MADT entry type {other}"),
        }
        off += len;
    }
    assert_eq!(off, t.len());
    assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1), (3, 3, 1)]);
    assert_eq!(ioapics, vec![(0, 0xfec0_0000, 0)]);
    assert_eq!(overrides, vec![(0, 2, 0)]);
    assert_eq!(nmis, 1);
}

#[test]
fn mcfg_describes_ecam() {
    let m = mem();
    let pci = PciHostInfo {
        last_bus: 3,
        ..PciHostInfo::default()
    };
    let rsdp = create_acpi_tables(&m, 1, &pci).unwrap();
    let (_, t) = &walk(&m, rsdp)["MCFG"];
    assert_eq!(t.len(), 60);
    assert_eq!(u64_at(t, 44), 0xe000_0000);
    assert_eq!(u16_at(t, 52), 0);
    assert_eq!((t[54], t[55]), (0, 3));
}

#[test]
fn windows_follow_the_allocator() {
    let config = SystemAllocatorConfig::for_x86_64(ram_layout(8 * GIB).unwrap().end()).unwrap();
    let pci = PciHostInfo::new(&config);
    assert_eq!(pci.mmio64.base, 9 * GIB);
    let m = mem();
    let rsdp = create_acpi_tables(&m, 1, &pci).unwrap();
    let (_, dsdt) = &walk(&m, rsdp)["DSDT"];
    let base = (9 * GIB).to_le_bytes();
    assert!(dsdt.windows(8).any(|w| w == base));
}

#[test]
fn invalid_inputs_are_errors() {
    let m = mem();
    assert!(matches!(
        create_acpi_tables(&m, 0, &PciHostInfo::default()),
        Err(AcpiError::InvalidVcpuCount(0))
    ));
    assert!(matches!(
        create_acpi_tables(&m, 255, &PciHostInfo::default()),
        Err(AcpiError::InvalidVcpuCount(255))
    ));
    let bad = [
        PciHostInfo {
            mmio32: AddressWindow::new(0xffff_0000, 0x2_0000),
            ..PciHostInfo::default()
        },
        PciHostInfo {
            mmio64: AddressWindow::new(u64::MAX, 2),
            ..PciHostInfo::default()
        },
        PciHostInfo {
            mmio64: AddressWindow::new(FOUR_GIB, 0),
            ..PciHostInfo::default()
        },
        PciHostInfo {
            ecam_base: 0xe000_1000,
            ..PciHostInfo::default()
        },
        PciHostInfo {
            ecam_base: 0xfff0_0000,
            last_bus: 1,
            ..PciHostInfo::default()
        },
    ];
    for pci in bad {
        assert!(
            matches!(
                create_acpi_tables(&m, 1, &pci),
                Err(AcpiError::InvalidPciHost(_))
            ),
            "{pci:x?}"
        );
    }
}

#[test]
fn many_vcpus_still_fit() {
    let m = mem();
    let rsdp = create_acpi_tables(&m, 254, &PciHostInfo::default()).unwrap();
    let tables = walk(&m, rsdp);
    assert_eq!(tables["APIC"].1.len(), 44 + 254 * 8 + 12 + 10 + 6);
    assert!(m.address_in_range(GuestAddress(rsdp)));
}
