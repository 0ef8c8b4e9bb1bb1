//! x86_64 platform details: where boot structures live in low guest memory,
//! descriptor tables and initial register state, CPUID and MSR set-up, and
//! the legacy interrupt wiring (default KVM routes, PCI INTx swizzle).
//!
//! Low memory map used at boot (all below 1 MiB, all reported as RAM except
//! the ACPI area, which is reserved in the e820 map):
//!
//! ```text
//! 0x0000_0500  boot GDT (5 entries)
//! 0x0000_0520  boot IDT (empty)
//! 0x0000_6000  PVH hvm_start_info, module list, memory map
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  initial stack pointer (Linux 64-bit entry)
//! 0x0000_9000  PML4, 0xa000 PDPT, 0xb000..0xf000 four page directories
//! 0x0002_0000  kernel command line (up to 64 KiB)
//! 0x000e_0000  ACPI tables: RSDP first, then DSDT, FADT, MADT, MCFG, XSDT
//! 0x000f_fff0  reset stub (the real-mode reset vector): i8042 reset
//! 0x0010_0000  kernel (bzImage protected-mode part / ELF segments) and up
//! ```

pub mod cpuid;
pub mod gdt;
pub mod irq;
pub mod regs;

pub use irq::{default_irqchip_routes, legacy_irq_for, IntxPin, PCI_INTX_GSIS, PCI_INTX_GSI_BASE};

/// Boot GDT location.
pub const BOOT_GDT_START: u64 = 0x500;
/// Boot IDT location (an empty IDT: the guest installs its own).
pub const BOOT_IDT_START: u64 = 0x520;

/// PVH `hvm_start_info` location.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initramfs), right after the 56-byte start info.
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map, after the single 32-byte module entry.
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// End of the area for the PVH structures: room for 0xf80 / 24 = 165
/// memory map entries, far more than we ever emit.
pub const PVH_AREA_END: u64 = 0x7000;

/// Linux zero page (`boot_params`), one page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial RSP/RBP for the Linux 64-bit entry. The kernel switches to its
/// own stack at once, but a valid one costs nothing.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;

/// Page map level 4 of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// First of [`BOOT_PD_COUNT`] page directories (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Page directories: each maps 1 GiB, so the boot mapping covers 4 GiB.
pub const BOOT_PD_COUNT: u64 = 4;

/// Kernel command line location.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line we place (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 0x1_0000;

/// Start of the Extended BIOS Data Area: conventional RAM ends here.
pub const EBDA_START: u64 = 0x9_fc00;

/// Start of the area the ACPI tables are written to (the RSDP must be in
/// 0xe0000..0x100000 for guests that scan for it).
pub const ACPI_START: u64 = 0xe_0000;
/// Exclusive end of the area reserved in the e820 map for the ACPI tables
/// and the reset stub.
pub const ACPI_END: u64 = 0x10_0000;
/// Where the real-mode reset vector F000:FFF0 points. Linux's "BIOS"
/// restart jumps there, and on trellis' hardware-reduced ACPI platform
/// without EFI that is its default reboot method (reboot_init() picks EFI,
/// which falls back to BIOS). With no firmware the vCPU would run through
/// zeroed memory forever; [`RESET_STUB`] turns the jump into a reset.
pub const RESET_STUB_START: u64 = 0xf_fff0;
/// 16-bit code at the reset vector: pulse the reset line through the i8042
/// (`mov al, 0xfe; out 0x64, al`), then `cli; hlt` in a loop.
pub const RESET_STUB: [u8; 8] = [0xb0, 0xfe, 0xe6, 0x64, 0xfa, 0xf4, 0xeb, 0xfd];

/// First byte of "high" memory: kernels and initramfs go at or above it.
pub const HIGH_RAM_START: u64 = 0x10_0000;

/// One page KVM needs for its real-mode identity map on Intel hosts.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
/// Three pages KVM needs for the real-mode TSS on Intel hosts, right after
/// the identity map page. Both sit in the unused top of the 32-bit hole and
/// are reserved in the e820 map.
pub const KVM_TSS_START: u64 = 0xfeff_d000;
/// Size of the KVM TSS area.
pub const KVM_TSS_SIZE: u64 = 0x3000;

/// Smallest guest RAM we accept: low memory plus room for a kernel.
pub const MIN_RAM_SIZE: u64 = 4 << 20;

/// Largest vCPU count: APIC IDs must fit the 8-bit xAPIC ID (0xff is the
/// broadcast ID) used in CPUID leaf 1 and the MADT's local APIC entries.
pub const MAX_VCPUS: u8 = 254;

// The fixed areas must not overlap each other.
const _: () = assert!(BOOT_IDT_START + 8 <= PVH_INFO_START);
const _: () = assert!(PVH_AREA_END <= ZERO_PAGE_START);
const _: () = assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
const _: () = assert!(BOOT_STACK_POINTER < PML4_START);
const _: () = assert!(PDE_START + BOOT_PD_COUNT * 0x1000 <= CMDLINE_START);
const _: () = assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
const _: () = assert!(EBDA_START <= ACPI_START);
const _: () = assert!(ACPI_END <= HIGH_RAM_START);
const _: () = assert!(ACPI_START < RESET_STUB_START);
const _: () = assert!(RESET_STUB_START + RESET_STUB.len() as u64 <= ACPI_END);
const _: () = assert!(vm_allocator::layout::LAPIC_START + 0x1000 <= KVM_IDENTITY_MAP_START);
