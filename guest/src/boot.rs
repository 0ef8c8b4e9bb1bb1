//! PVH entry: 32-bit protected mode with paging off, `%ebx` = physical address
//! of `hvm_start_info`. Zeroes .bss, builds identity page tables, enables PAE,
//! long mode and paging, then calls `guest_main(start_info)` in 64-bit mode on
//! the boot stack. CR4.OSFXSR/OSXMMEXCPT are set although our code has no SSE:
//! the precompiled `core` has a few SSE paths (see serial.rs).
//!
//! Page tables: the first 512 GiB with 1 GiB pages when the CPU has them
//! (CPUID 0x80000001 EDX bit 26), else the first 64 GiB with 2 MiB pages.
//! The first GiB (our RAM) is write-back; everything above it is mapped
//! uncached (PCD|PWT) since it is MMIO for us (BARs, ECAM, APIC).

use core::arch::global_asm;

/// Bytes mapped by the boot page tables without 1 GiB pages.
pub const MAPPED_2M: u64 = 64 << 30;
/// Bytes mapped by the boot page tables with 1 GiB pages.
pub const MAPPED_1G: u64 = 512 << 30;

/// GDT selectors (see `boot_gdt` below).
pub const KERNEL_CS: u16 = 0x08;
/// The TSS descriptor (16 bytes), filled in by `interrupts::init`.
pub const TSS_SEL: u16 = 0x20;

extern "C" {
    /// The GDT (7 entries of 8 bytes; entries 4-5 are the TSS descriptor).
    pub static mut boot_gdt: [u64; 7];
    /// Set by the boot code: 1 when 1 GiB pages were used.
    pub static boot_huge_pages: u32;
}

/// Bytes of physical address space identity-mapped by the boot code.
pub fn mapped_limit() -> u64 {
    // SAFETY: written once by the boot code before Rust runs, read-only after.
    if unsafe { core::ptr::addr_of!(boot_huge_pages).read_volatile() } != 0 {
        MAPPED_1G
    } else {
        MAPPED_2M
    }
}

global_asm!(
    r#"
    .section .note.Xen, "a"
    .balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 8                 /* descsz */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .balign 4

    .section .data.boot, "aw"
    .balign 16
    .global boot_gdt
boot_gdt:
    .quad 0                     /* 0x00 null */
    .quad 0x00af9a000000ffff    /* 0x08 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10 data */
    .quad 0x00cf9a000000ffff    /* 0x18 32-bit code */
    .quad 0                     /* 0x20 TSS (low) */
    .quad 0                     /* 0x28 TSS (high) */
    .quad 0
boot_gdt_end:
    .balign 16
boot_gdt_ptr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt
    .global boot_huge_pages
boot_huge_pages:
    .long 0

    .section .bss.boot, "aw", @nobits
    .balign 4096
boot_pml4:
    .skip 4096
boot_pdpt:
    .skip 4096
boot_pd:
    .skip 4096 * 64
    .global boot_stack_top
boot_stack:
    .skip 256 * 1024
boot_stack_top:

    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi             /* hvm_start_info, kept until main */

    /* Zero .bss (page tables and stack live there). */
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl

    movl $boot_stack_top, %esp
    lgdt boot_gdt_ptr
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    ljmp $0x18, $8f
8:
    /* PML4[0] -> PDPT */
    movl $boot_pdpt, %eax
    orl $0x3, %eax
    movl %eax, boot_pml4

    /* 1 GiB pages? */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 3f
    movl $0x80000001, %eax
    cpuid
    btl $26, %edx
    jnc 3f

    movl $1, boot_huge_pages
    xorl %ecx, %ecx             /* ecx = GiB index */
2:
    movl %ecx, %eax
    shll $30, %eax
    orl $0x83, %eax             /* present, writable, page size */
    testl %ecx, %ecx
    jz 21f
    orl $0x18, %eax             /* PWT|PCD above the first GiB */
21:
    movl %eax, boot_pdpt(,%ecx,8)
    movl %ecx, %eax
    shrl $2, %eax
    movl %eax, boot_pdpt+4(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jb 2b
    jmp 5f

3:  /* 2 MiB pages: 64 page directories */
    xorl %ecx, %ecx
31:
    movl %ecx, %eax
    shll $12, %eax
    addl $boot_pd, %eax
    orl $0x3, %eax
    movl %eax, boot_pdpt(,%ecx,8)
    incl %ecx
    cmpl $64, %ecx
    jb 31b
    xorl %ecx, %ecx             /* ecx = 2 MiB page index */
4:
    movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    cmpl $512, %ecx
    jb 41f
    orl $0x18, %eax
41:
    movl %eax, boot_pd(,%ecx,8)
    movl %ecx, %eax
    shrl $11, %eax
    movl %eax, boot_pd+4(,%ecx,8)
    incl %ecx
    cmpl $64*512, %ecx
    jb 4b

5:
    /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl %cr4, %eax
    orl $((1 << 5) | (1 << 9) | (1 << 10)), %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    /* EFER.LME */
    movl $0xc0000080, %ecx
    rdmsr
    orl $(1 << 8), %eax
    wrmsr
    /* CR0: PG | NE | MP | PE, clear EM, CD, NW */
    movl %cr0, %eax
    andl $~((1 << 2) | (1 << 29) | (1 << 30)), %eax
    orl $((1 << 31) | (1 << 5) | (1 << 1) | 1), %eax
    movl %eax, %cr0
    ljmp $0x08, $6f

    .code64
6:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movq $boot_stack_top, %rsp
    movl %esi, %edi
    call guest_main
7:
    cli
    hlt
    jmp 7b
"#,
    options(att_syntax)
);
