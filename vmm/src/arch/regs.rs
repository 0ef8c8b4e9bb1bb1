//! Initial vCPU state for the two boot entries we support, and the guest
//! memory structures (GDT, IDT, identity page tables) that state refers to.
//!
//! The state is computed by pure functions so it can be checked without
//! KVM; `vcpu.rs` applies it with the KVM ioctls.

use kvm_bindings::{kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::gdt::{
    boot_gdt, kvm_segment_from_descriptor, DescriptorFlags, BOOT_CS_SELECTOR, BOOT_DS_SELECTOR,
    BOOT_TSS_SELECTOR, CODE32, CODE64,
};
use super::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_PD_COUNT, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, RESET_STUB, RESET_STUB_START,
};

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// Linux x86 64-bit boot protocol: long mode with the boot identity
    /// mapping, flat `__BOOT_CS`/`__BOOT_DS`, RSI = zero page address.
    Linux64 {
        /// Guest physical address of the 64-bit entry point.
        entry: u64,
        /// Guest physical address of `boot_params` (the zero page).
        boot_params: u64,
    },
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh {
        /// Guest physical address of the 32-bit entry point.
        entry: u32,
        /// Guest physical address of `hvm_start_info`.
        start_info: u32,
    },
}

/// Errors writing the boot descriptor tables and page tables.
#[derive(Debug, Error)]
pub enum BootTablesError {
    /// Writing the GDT or IDT to guest memory failed.
    #[error("failed to write the boot GDT/IDT to guest memory: {0}")]
    DescriptorTables(#[source] GuestMemoryError),
    /// Writing the identity page tables to guest memory failed.
    #[error("failed to write the boot page tables to guest memory: {0}")]
    PageTables(#[source] GuestMemoryError),
    /// Writing the reset stub to guest memory failed.
    #[error("failed to write the reset stub to guest memory: {0}")]
    ResetStub(#[source] GuestMemoryError),
}

const CR0_PE: u64 = 1 << 0;
const CR0_ET: u64 = 1 << 4;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
/// RFLAGS bit 1 is reserved and always reads as one.
const RFLAGS_RESERVED: u64 = 1 << 1;

const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITABLE: u64 = 1 << 1;
const PDE_PAGE_SIZE: u64 = 1 << 7;

fn code_flags(entry: &BootEntry) -> DescriptorFlags {
    match entry {
        BootEntry::Linux64 { .. } => CODE64,
        BootEntry::Pvh { .. } => CODE32,
    }
}

/// Writes the GDT and IDT the entry needs, the reset stub at the real-mode
/// reset vector ([`RESET_STUB`]) and, for the 64-bit entry, page tables
/// identity-mapping the first 4 GiB with 2 MiB pages.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: &BootEntry) -> Result<(), BootTablesError> {
    mem.write_slice(&RESET_STUB, GuestAddress(RESET_STUB_START))
        .map_err(BootTablesError::ResetStub)?;
    let gdt: Vec<u8> = boot_gdt(code_flags(entry))
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    mem.write_slice(&gdt, GuestAddress(BOOT_GDT_START))
        .map_err(BootTablesError::DescriptorTables)?;
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(BootTablesError::DescriptorTables)?;

    if let BootEntry::Linux64 { .. } = entry {
        mem.write_obj(
            PDPTE_START | PTE_PRESENT | PTE_WRITABLE,
            GuestAddress(PML4_START),
        )
        .map_err(BootTablesError::PageTables)?;
        let pdpt: Vec<u8> = (0..BOOT_PD_COUNT)
            .flat_map(|i| ((PDE_START + i * 0x1000) | PTE_PRESENT | PTE_WRITABLE).to_le_bytes())
            .collect();
        mem.write_slice(&pdpt, GuestAddress(PDPTE_START))
            .map_err(BootTablesError::PageTables)?;
        let pds: Vec<u8> = (0..BOOT_PD_COUNT * 512)
            .flat_map(|i| ((i << 21) | PTE_PRESENT | PTE_WRITABLE | PDE_PAGE_SIZE).to_le_bytes())
            .collect();
        mem.write_slice(&pds, GuestAddress(PDE_START))
            .map_err(BootTablesError::PageTables)?;
    }
    Ok(())
}

/// General-purpose registers at the entry point.
pub fn initial_regs(entry: &BootEntry) -> kvm_regs {
    match *entry {
        BootEntry::Linux64 { entry, boot_params } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry,
            rsp: BOOT_STACK_POINTER,
            rbp: BOOT_STACK_POINTER,
            rsi: boot_params,
            ..Default::default()
        },
        BootEntry::Pvh { entry, start_info } => kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: u64::from(entry),
            rbx: u64::from(start_info),
            ..Default::default()
        },
    }
}

/// Special registers at the entry point, starting from the vCPU's reset
/// state `base` (which carries the APIC base and pending interrupts).
pub fn initial_sregs(base: &kvm_sregs, entry: &BootEntry) -> kvm_sregs {
    let gdt = boot_gdt(code_flags(entry));
    let code =
        kvm_segment_from_descriptor(gdt[usize::from(BOOT_CS_SELECTOR / 8)], BOOT_CS_SELECTOR);
    let data =
        kvm_segment_from_descriptor(gdt[usize::from(BOOT_DS_SELECTOR / 8)], BOOT_DS_SELECTOR);
    let tss =
        kvm_segment_from_descriptor(gdt[usize::from(BOOT_TSS_SELECTOR / 8)], BOOT_TSS_SELECTOR);

    let mut sregs = *base;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    // The reset CR0 has caching disabled (CD, NW); both protocols want
    // everything but the bits named here clear.
    match entry {
        BootEntry::Linux64 { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
        }
        BootEntry::Pvh { .. } => {
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    sregs
}

/// x87 and SSE control state a BIOS would leave: default control word and
/// all SSE exceptions masked.
pub fn initial_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indices set at boot.
pub mod msr_index {
    /// IA32_TIME_STAMP_COUNTER
    pub const TSC: u32 = 0x10;
    /// IA32_SYSENTER_CS
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP
    pub const SYSENTER_EIP: u32 = 0x176;
    /// IA32_MISC_ENABLE
    pub const MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MTRR_DEF_TYPE
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// IA32_STAR
    pub const STAR: u32 = 0xc000_0081;
    /// IA32_LSTAR
    pub const LSTAR: u32 = 0xc000_0082;
    /// IA32_CSTAR
    pub const CSTAR: u32 = 0xc000_0083;
    /// IA32_FMASK
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// IA32_KERNEL_GS_BASE
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// IA32_MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (bit 11), default type write-back (6).
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The MSRs every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    use msr_index::*;
    [
        (SYSENTER_CS, 0),
        (SYSENTER_ESP, 0),
        (SYSENTER_EIP, 0),
        (STAR, 0),
        (LSTAR, 0),
        (CSTAR, 0),
        (SYSCALL_MASK, 0),
        (KERNEL_GS_BASE, 0),
        (TSC, 0),
        (MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Local APIC register offsets.
const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery modes (bits 10:8).
const APIC_MODE_NMI: u32 = 0b100;
const APIC_MODE_EXTINT: u32 = 0b111;

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| lapic.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        lapic.regs[offset + i] = b as _;
    }
}

fn with_delivery_mode(lvt: u32, mode: u32) -> u32 {
    (lvt & !0x700) | (mode << 8)
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as the MP spec's
/// virtual-wire mode expects.
pub fn configure_lapic_lints(lapic: &mut kvm_lapic_state) {
    let lint0 = lapic_reg(lapic, APIC_LVT_LINT0);
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = lapic_reg(lapic, APIC_LVT_LINT1);
    set_lapic_reg(
        lapic,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    #[test]
    fn long_mode_tables() {
        let m = mem();
        let entry = BootEntry::Linux64 {
            entry: 0x100_0000,
            boot_params: 0x7000,
        };
        write_boot_tables(&m, &entry).unwrap();
        let gdt2: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 0x10)).unwrap();
        assert_eq!(gdt2, 0x00af_9b00_0000_ffff);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, PDPTE_START | 3);
        let pdpt3: u64 = m.read_obj(GuestAddress(PDPTE_START + 24)).unwrap();
        assert_eq!(pdpt3, (PDE_START + 0x3000) | 3);
        let first: u64 = m.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(first, 0x83);
        // Last 2 MiB page of the 4 GiB identity map.
        let last: u64 = m
            .read_obj(GuestAddress(PDE_START + 4 * 0x1000 - 8))
            .unwrap();
        assert_eq!(last, 0xffe0_0000 | 0x83);
    }

    #[test]
    fn pvh_tables_have_32bit_code_and_no_paging() {
        let m = mem();
        let entry = BootEntry::Pvh {
            entry: 0x10_0000,
            start_info: 0x6000,
        };
        write_boot_tables(&m, &entry).unwrap();
        let gdt2: u64 = m.read_obj(GuestAddress(BOOT_GDT_START + 0x10)).unwrap();
        assert_eq!(gdt2, 0x00cf_9b00_0000_ffff);
        let pml4: u64 = m.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0);
    }

    #[test]
    fn registers_per_entry() {
        let linux = BootEntry::Linux64 {
            entry: 0x100_0200,
            boot_params: 0x7000,
        };
        let r = initial_regs(&linux);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0200, 0x7000, 0x8ff0, 2)
        );
        let s = initial_sregs(&kvm_sregs::default(), &linux);
        assert_eq!(s.cr0, 0x8000_0011);
        assert_eq!((s.cr3, s.cr4, s.efer), (PML4_START, 0x20, 0x500));
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x10, 1, 0));
        assert_eq!((s.ds.selector, s.ss.selector), (0x18, 0x18));
        assert_eq!((s.gdt.base, s.gdt.limit), (BOOT_GDT_START, 39));

        let pvh = BootEntry::Pvh {
            entry: 0x10_0000,
            start_info: 0x6000,
        };
        let r = initial_regs(&pvh);
        assert_eq!((r.rip, r.rbx, r.rflags), (0x10_0000, 0x6000, 2));
        let s = initial_sregs(&kvm_sregs::default(), &pvh);
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (0x11, 0, 0, 0));
        assert_eq!((s.cs.l, s.cs.db, s.cs.limit), (0, 1, 0xffff_ffff));
        assert_eq!((s.tr.type_, s.tr.limit), (0xb, 0x67));
    }

    #[test]
    fn msrs_and_fpu() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|m| m.index == i).unwrap().data;
        assert_eq!(get(msr_index::MISC_ENABLE), 1);
        assert_eq!(get(msr_index::MTRR_DEF_TYPE), 0x806);
        assert_eq!(get(msr_index::LSTAR), 0);
        let fpu = initial_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn lapic_lints() {
        let mut lapic = kvm_lapic_state::default();
        // Masked, with stale delivery mode bits.
        set_lapic_reg(&mut lapic, APIC_LVT_LINT0, 0x0001_0200);
        set_lapic_reg(&mut lapic, APIC_LVT_LINT1, 0x0001_0000);
        configure_lapic_lints(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT_LINT1), 0x0001_0400);
    }
}
