//! The DSDT: the PCI host bridge with its windows and INTx routing, COM1,
//! the motherboard resources (ECAM, ACPI PM ports) and the S5 sleep state.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Name,
    Package, PackageBuilder, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;
use devices::acpi_pm::{ACPI_PM_BASE, ACPI_PM_LEN, S5_SLEEP_TYPE};
use devices::serial::{SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use vm_allocator::layout::COM1_IRQ;

use super::{PciHostInfo, OEM_ID, OEM_REVISION};
use crate::arch::{legacy_irq_for, IntxPin};

/// Device slots on bus 0 (every one gets `_PRT` entries, so the table does
/// not depend on which slots are populated).
const PCI_SLOTS: u8 = 32;
/// The configuration mechanism #1 ports, which the host bridge consumes.
const PCI_CONFIG_PORT: u16 = 0xcf8;
const PCI_CONFIG_PORT_LEN: u8 = 8;

/// `_PRT` entries: (address = slot << 16 | 0xffff, pin 0..=3, GSI).
pub fn prt_entries() -> Vec<(u32, u8, u32)> {
    (0..PCI_SLOTS)
        .flat_map(|slot| {
            IntxPin::ALL.into_iter().map(move |pin| {
                (
                    (u32::from(slot) << 16) | 0xffff,
                    pin.acpi_index(),
                    legacy_irq_for(slot, pin),
                )
            })
        })
        .collect()
}

fn pci_host_bridge(pci: &PciHostInfo) -> Vec<u8> {
    let bus_range = AddressSpace::<u16>::new_bus_number(0, u16::from(pci.last_bus));
    // All ports but the configuration mechanism's own.
    let io_low = AddressSpace::<u16>::new_io(0, PCI_CONFIG_PORT - 1, None);
    let config_ports = IO::new(PCI_CONFIG_PORT, PCI_CONFIG_PORT, 1, PCI_CONFIG_PORT_LEN);
    let io_high = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    // Window bounds are validated by `PciHostInfo::validate`.
    let mmio32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio32.base as u32,
        (pci.mmio32.base + pci.mmio32.size - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        pci.mmio64.base,
        pci.mmio64.base + pci.mmio64.size - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![
        &bus_range,
        &io_low,
        &config_ports,
        &io_high,
        &mmio32,
        &mmio64,
    ]);

    let entries = prt_entries();
    let packages: Vec<Package> = entries
        .iter()
        .map(|(addr, pin, gsi)| Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let mut prt = PackageBuilder::new();
    for p in &packages {
        prt.add_element(p);
    }

    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let mut bytes = Vec::new();
    Device::new(
        Path::new("PC00"),
        vec![
            &Name::new(Path::new("_HID"), &hid),
            &Name::new(Path::new("_CID"), &cid),
            &Name::new(Path::new("_ADR"), &aml::ZERO),
            &Name::new(Path::new("_SEG"), &aml::ZERO),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_BBN"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &crs),
            &Name::new(Path::new("_PRT"), &prt),
        ],
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

fn com1() -> Vec<u8> {
    let hid = EISAName::new("PNP0501");
    let ports = IO::new(
        SERIAL_PORT_BASE as u16,
        SERIAL_PORT_BASE as u16,
        1,
        SERIAL_PORT_LEN as u8,
    );
    // ISA interrupt: edge-triggered, active high, not shared.
    let irq = Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs = ResourceTemplate::new(vec![&ports, &irq]);
    let mut bytes = Vec::new();
    Device::new(
        Path::new("COM1"),
        vec![
            &Name::new(Path::new("_HID"), &hid),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

/// Motherboard resources: tells the OS the ECAM window and the ACPI PM
/// ports are taken (Linux also checks that MCFG's window is reserved).
fn motherboard_resources(pci: &PciHostInfo) -> Vec<u8> {
    let hid = EISAName::new("PNP0C02");
    let ecam = Memory32Fixed::new(true, pci.ecam_base as u32, pci.ecam_size() as u32);
    let pm = IO::new(
        ACPI_PM_BASE as u16,
        ACPI_PM_BASE as u16,
        1,
        ACPI_PM_LEN as u8,
    );
    let crs = ResourceTemplate::new(vec![&ecam, &pm]);
    let mut bytes = Vec::new();
    Device::new(
        Path::new("MRES"),
        vec![
            &Name::new(Path::new("_HID"), &hid),
            &Name::new(Path::new("_UID"), &aml::ZERO),
            &Name::new(Path::new("_CRS"), &crs),
        ],
    )
    .to_aml_bytes(&mut bytes);
    bytes
}

/// Builds the DSDT.
pub fn dsdt(pci: &PciHostInfo) -> Sdt {
    let mut sb_children = pci_host_bridge(pci);
    sb_children.extend(com1());
    sb_children.extend(motherboard_resources(pci));
    let sb = Scope::raw(Path::new("\\_SB_"), sb_children);

    // \_S5: SLP_TYPa, SLP_TYPb, reserved, reserved. Only SLP_TYPa is used
    // on a hardware-reduced platform.
    let s5_type = S5_SLEEP_TYPE;
    let s5 = Name::new(
        Path::new("_S5_"),
        &Package::new(vec![&s5_type, &aml::ZERO, &aml::ZERO, &aml::ZERO]),
    );

    let mut table = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"TRLSDSDT", OEM_REVISION);
    table.append_slice(&sb);
    let mut s5_bytes = Vec::new();
    s5.to_aml_bytes(&mut s5_bytes);
    table.append_slice(&s5_bytes);
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_allocator::SystemAllocatorConfig;

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn prt_covers_every_slot_and_pin() {
        let prt = prt_entries();
        assert_eq!(prt.len(), 128);
        assert_eq!(prt[0], (0x0000_ffff, 0, 16));
        assert_eq!(prt[5], (0x0001_ffff, 1, 18));
        assert_eq!(prt[127], (0x001f_ffff, 3, 16 + (31 + 3) % 8));
    }

    #[test]
    fn dsdt_names_and_checksum() {
        let pci = PciHostInfo::new(&SystemAllocatorConfig::for_x86_64_ram_size(1 << 30).unwrap());
        let t = dsdt(&pci);
        let b = t.as_slice();
        assert_eq!(&b[..4], b"DSDT");
        assert_eq!(
            u32::from_le_bytes(b[4..8].try_into().unwrap()) as usize,
            b.len()
        );
        assert_eq!(b.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        for name in [
            &b"_SB_"[..],
            b"PC00",
            b"_PRT",
            b"_CRS",
            b"_BBN",
            b"_SEG",
            b"COM1",
            b"MRES",
            b"_S5_",
        ] {
            assert!(contains(b, name), "{}", String::from_utf8_lossy(name));
        }
        // EISA IDs as AML DWords: PNP0A08, PNP0A03, PNP0501.
        for id in [0x080a_d041u32, 0x030a_d041, 0x0105_d041] {
            let mut enc = vec![0x0c];
            enc.extend_from_slice(&id.to_le_bytes());
            assert!(contains(b, &enc), "{id:#x}");
        }
        // The 32-bit window as a DWord address space descriptor: min, max.
        let mut mmio32 = Vec::new();
        mmio32.extend_from_slice(&0xc000_0000u32.to_le_bytes());
        mmio32.extend_from_slice(&0xdfff_ffffu32.to_le_bytes());
        assert!(contains(b, &mmio32));
        // The 64-bit window's base (1 GiB RAM: at 4 GiB) as a QWord.
        let mut mmio64 = vec![0, 0, 0, 0, 0, 0, 0, 0];
        mmio64.extend_from_slice(&(4u64 << 30).to_le_bytes());
        assert!(contains(b, &mmio64));
    }
}
