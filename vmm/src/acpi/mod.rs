//! ACPI tables for a hardware-reduced x86 platform: RSDP → XSDT → FADT
//! (with X_DSDT), MADT, MCFG.
//!
//! The RSDP sits at [`ACPI_START`] (0xe0000), where guests that are not
//! told its address find it by scanning; the other tables follow it in the
//! e820-reserved area up to 1 MiB.
//!
//! Power-off and reset go through the ACPI PM device
//! (`devices::acpi_pm`) the FADT points at: its sleep control register
//! (with the DSDT's `\_S5` sleep type) and its reset register.

mod dsdt;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use devices::acpi_pm::{
    ACPI_PM_BASE, RESET_OFFSET, RESET_VALUE, SLEEP_CONTROL_OFFSET, SLEEP_STATUS_OFFSET,
};
use log::debug;
use thiserror::Error;
use vm_allocator::layout::{
    IOAPIC_START, LAPIC_START, MMIO32_WINDOW_END, PCI_ECAM_SIZE, PCI_ECAM_START,
};
use vm_allocator::{AddressWindow, SystemAllocatorConfig, FOUR_GIB};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

pub use dsdt::prt_entries;

use crate::arch::{ACPI_START, RESET_STUB_START};
use crate::memory::GuestMemoryMmap;

/// OEM ID in every table.
pub const OEM_ID: [u8; 6] = *b"TRELIS";
/// OEM revision in every table.
pub const OEM_REVISION: u32 = 1;

/// MADT flags: PCAT_COMPAT, there is a dual 8259 PIC (KVM's).
const MADT_PCAT_COMPAT: u32 = 1;
/// FADT IA-PC boot architecture flags: no VGA, no CMOS RTC.
const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Bytes of ECAM per bus.
const ECAM_BUS_SIZE: u64 = 1 << 20;

/// Errors building or writing the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    /// The PCI host description is inconsistent.
    #[error("invalid PCI host description for ACPI: {0}")]
    InvalidPciHost(&'static str),
    /// The vCPU count cannot be described.
    #[error("cannot describe {0} vCPUs in the MADT (1..=254)")]
    InvalidVcpuCount(u8),
    /// The tables do not fit the reserved area.
    #[error("ACPI tables need {needed:#x} bytes, only {available:#x} are reserved")]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        available: u64,
    },
    /// Writing to guest memory failed.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(#[source] GuestMemoryError),
}

/// What the DSDT and MCFG say about the PCI host bridge (segment 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciHostInfo {
    /// ECAM base address.
    pub ecam_base: u64,
    /// Buses `0..=last_bus` sit below the host bridge and in the MCFG.
    pub last_bus: u8,
    /// 32-bit MMIO window for BARs (must end at or below 4 GiB).
    pub mmio32: AddressWindow,
    /// 64-bit MMIO window for BARs.
    pub mmio64: AddressWindow,
}

impl PciHostInfo {
    /// Bus 0 only, ECAM at [`PCI_ECAM_START`], the allocator's windows.
    pub fn new(allocator: &SystemAllocatorConfig) -> Self {
        PciHostInfo {
            ecam_base: PCI_ECAM_START,
            last_bus: 0,
            mmio32: allocator.mmio32,
            mmio64: allocator.mmio64,
        }
    }

    /// Size of the ECAM area for `0..=last_bus`.
    pub fn ecam_size(&self) -> u64 {
        (u64::from(self.last_bus) + 1) * ECAM_BUS_SIZE
    }

    fn validate(&self) -> Result<(), AcpiError> {
        let end = |w: &AddressWindow| w.base.checked_add(w.size);
        if self.mmio32.size == 0 || end(&self.mmio32).is_none_or(|e| e > FOUR_GIB) {
            return Err(AcpiError::InvalidPciHost(
                "32-bit MMIO window is empty or crosses 4 GiB",
            ));
        }
        if self.mmio64.size == 0 || end(&self.mmio64).is_none() {
            return Err(AcpiError::InvalidPciHost(
                "64-bit MMIO window is empty or wraps",
            ));
        }
        if self.ecam_base % ECAM_BUS_SIZE != 0
            || self.ecam_base.saturating_add(self.ecam_size()) > FOUR_GIB
        {
            return Err(AcpiError::InvalidPciHost(
                "ECAM must be 1 MiB aligned and below 4 GiB",
            ));
        }
        Ok(())
    }
}

impl Default for PciHostInfo {
    /// The default layout's windows for a guest with RAM below the hole.
    fn default() -> Self {
        PciHostInfo {
            ecam_base: PCI_ECAM_START,
            last_bus: 0,
            mmio32: AddressWindow::new(
                vm_allocator::layout::MMIO32_WINDOW_START,
                MMIO32_WINDOW_END - vm_allocator::layout::MMIO32_WINDOW_START,
            ),
            mmio64: AddressWindow::new(FOUR_GIB, vm_allocator::layout::DEFAULT_MMIO64_SIZE),
        }
    }
}

const _: () = assert!(PCI_ECAM_SIZE >= 256 * ECAM_BUS_SIZE);

fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// Appends tables to the ACPI area, 16-byte aligned.
struct TableWriter {
    next: u64,
    tables: Vec<(u64, Vec<u8>)>,
}

impl TableWriter {
    fn place(&mut self, bytes: Vec<u8>) -> u64 {
        let addr = self.next;
        self.next = (addr + bytes.len() as u64).next_multiple_of(16);
        self.tables.push((addr, bytes));
        addr
    }
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let pm_register = |offset: u64| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            ACPI_PM_BASE + offset,
        )
    };
    let mut fadt = FADTBuilder::new(OEM_ID, *b"TRLSFACP", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt_addr);
    fadt.sleep_control_reg = pm_register(SLEEP_CONTROL_OFFSET);
    fadt.sleep_status_reg = pm_register(SLEEP_STATUS_OFFSET);
    fadt.reset_reg = pm_register(RESET_OFFSET);
    fadt.reset_value = RESET_VALUE;
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    to_bytes(&fadt.finalize())
}

/// The MADT: one local APIC per vCPU (APIC ID = index), the IOAPIC with
/// GSI base 0, ISA IRQ 0 overridden to GSI 2, LINT1 as NMI on all CPUs.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, *b"TRLSMADT", OEM_REVISION);
    t.write_u32(36, LAPIC_START as u32);
    t.write_u32(40, MADT_PCAT_COMPAT);
    let mut entries = Vec::new();
    for id in 0..vcpus {
        // Processor local APIC: type 0, length 8, UID, APIC ID, enabled.
        entries.extend_from_slice(&[0, 8, id, id]);
        entries.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, ID 0 (KVM's reset value), address, GSI base.
    entries.extend_from_slice(&[1, 12, 0, 0]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: type 2, length 10, ISA bus, IRQ 0 -> GSI 2,
    // polarity/trigger "conforms to the bus" (edge, active high).
    entries.extend_from_slice(&[2, 10, 0, 0]);
    entries.extend_from_slice(&2u32.to_le_bytes());
    entries.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI: type 4, length 6, all processors, flags, LINT1.
    entries.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    t.append_slice(&entries);
    t.as_slice().to_vec()
}

fn mcfg(pci: &PciHostInfo) -> Vec<u8> {
    let mut t = MCFG::new(OEM_ID, *b"TRLSMCFG", OEM_REVISION);
    t.add_ecam(pci.ecam_base, 0, 0, pci.last_bus);
    to_bytes(&t)
}

/// Writes the tables for `vcpus` vCPUs and the host bridge `pci` into
/// `mem`; returns the RSDP's address.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    pci: &PciHostInfo,
) -> Result<u64, AcpiError> {
    if !(1..=crate::arch::MAX_VCPUS).contains(&vcpus) {
        return Err(AcpiError::InvalidVcpuCount(vcpus));
    }
    pci.validate()?;

    let rsdp_addr = ACPI_START;
    let mut w = TableWriter {
        next: (ACPI_START + Rsdp::len() as u64).next_multiple_of(16),
        tables: Vec::new(),
    };
    let dsdt_addr = w.place(dsdt::dsdt(pci).as_slice().to_vec());
    let fadt_addr = w.place(fadt(dsdt_addr));
    let madt_addr = w.place(madt(vcpus));
    let mcfg_addr = w.place(mcfg(pci));
    let mut xsdt = XSDT::new(OEM_ID, *b"TRLSXSDT", OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = w.place(to_bytes(&xsdt));

    let end = w.tables.last().map_or(w.next, |(a, b)| a + b.len() as u64);
    // The reset stub has the top of the area.
    if end > RESET_STUB_START {
        return Err(AcpiError::TooLarge {
            needed: end - ACPI_START,
            available: RESET_STUB_START - ACPI_START,
        });
    }
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))
        .map_err(AcpiError::Write)?;
    for (addr, bytes) in &w.tables {
        mem.write_slice(bytes, GuestAddress(*addr))
            .map_err(AcpiError::Write)?;
    }
    debug!(
        "ACPI: RSDP {rsdp_addr:#x}, XSDT {xsdt_addr:#x}, DSDT {dsdt_addr:#x}, FADT {fadt_addr:#x}, \
         MADT {madt_addr:#x}, MCFG {mcfg_addr:#x}"
    );
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests;
