//! TSS with IST stacks, the IDT, the legacy PIC (masked) and the local APIC.
//!
//! Every vector has a 16-byte stub (see the assembly below) that pushes a
//! dummy error code where the CPU does not push one, then the vector number,
//! and jumps to a common path that saves the caller-saved general registers
//! and calls `isr_dispatch` (no SSE state: the guest is built without SSE). Exceptions run on IST1 and print and
//! fail the run; all other vectors run on IST2, are counted per vector and
//! acknowledged at the local APIC.

use crate::arch::{self, cpuid, rdmsr, wrmsr};
use crate::boot::{self, KERNEL_CS, TSS_SEL};
use crate::serial::{Dec, Hex};
use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering};

/// First vector handed to devices (MSI-X).
pub const FIRST_DEVICE_VECTOR: u8 = 0x40;
/// Last usable device vector.
pub const LAST_DEVICE_VECTOR: u8 = 0xef;
/// The APIC spurious-interrupt vector.
const SPURIOUS_VECTOR: u8 = 0xff;

const IA32_APIC_BASE: u32 = 0x1b;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const X2APIC_MSR_BASE: u32 = 0x800;
const XAPIC_DEFAULT_BASE: u64 = 0xfee0_0000;
const REG_ID: u32 = 0x20;
const REG_TPR: u32 = 0x80;
const REG_EOI: u32 = 0xb0;
const REG_SVR: u32 = 0xf0;
const REG_LVT_LINT0: u32 = 0x350;

/// Interrupts seen per vector.
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// 0 until the LAPIC is set up; then 1 for xAPIC, 2 for x2APIC.
static APIC_MODE: AtomicU64 = AtomicU64::new(0);
static APIC_BASE: AtomicU64 = AtomicU64::new(XAPIC_DEFAULT_BASE);

#[repr(C, packed)]
struct Tss {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct Stack([u8; 64 * 1024]);

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_hi: u32,
    reserved: u32,
}

#[repr(C, align(16))]
struct Idt([Gate; 256]);

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

static mut TSS: Tss = Tss {
    reserved0: 0,
    rsp: [0; 3],
    reserved1: 0,
    ist: [0; 7],
    reserved2: 0,
    reserved3: 0,
    iomap_base: core::mem::size_of::<Tss>() as u16,
};
static mut IST1_STACK: Stack = Stack([0; 64 * 1024]);
static mut IST2_STACK: Stack = Stack([0; 64 * 1024]);
static mut IDT: Idt = Idt([Gate {
    offset_lo: 0,
    selector: 0,
    ist: 0,
    type_attr: 0,
    offset_mid: 0,
    offset_hi: 0,
    reserved: 0,
}; 256]);

extern "C" {
    /// 256 stubs of 16 bytes each, vector `v` at `isr_stubs + 16 * v`.
    static isr_stubs: u8;
}

/// What the common stub leaves on the stack, lowest address first.
#[repr(C)]
struct Frame {
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

global_asm!(
    r#"
    .section .text.isr, "ax"
    .balign 16
    .global isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

isr_common:
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    movq %rsp, %rdi
    cld
    call isr_dispatch
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $16, %rsp
    iretq
"#,
    options(att_syntax)
);

#[no_mangle]
extern "C" fn isr_dispatch(frame: &Frame) {
    let vector = frame.vector as usize;
    if vector < 32 {
        let cr2 = if vector == 14 { arch::cr2() } else { 0 };
        crate::serial::print_unlocked(format_args!(
            "\nEXCEPTION vector={} error={} rip={} rsp={} rflags={} cr2={} \
             rax={} rcx={} rdx={} rsi={} rdi={} cs={} ss={}\n",
            Dec(vector as u64),
            Hex(frame.error),
            Hex(frame.rip),
            Hex(frame.rsp),
            Hex(frame.rflags),
            Hex(cr2),
            Hex(frame.rax),
            Hex(frame.rcx),
            Hex(frame.rdx),
            Hex(frame.rsi),
            Hex(frame.rdi),
            Hex(frame.cs),
            Hex(frame.ss),
        ));
        crate::serial::print_unlocked(format_args!(
            "RESULT pass=0 fail=1 exception={}\n",
            Dec(vector as u64)
        ));
        crate::exit(false);
    }
    COUNTS[vector].fetch_add(1, Ordering::Relaxed);
    if vector != usize::from(SPURIOUS_VECTOR) {
        eoi();
    }
}

/// Interrupts counted so far on `vector`.
pub fn count(vector: u8) -> u64 {
    COUNTS[usize::from(vector)].load(Ordering::Relaxed)
}

fn set_gate(idt: &mut Idt, vector: usize, handler: u64, ist: u8) {
    idt.0[vector] = Gate {
        offset_lo: handler as u16,
        selector: KERNEL_CS,
        ist,
        type_attr: 0x8e, // present, DPL 0, 64-bit interrupt gate
        offset_mid: (handler >> 16) as u16,
        offset_hi: (handler >> 32) as u32,
        reserved: 0,
    };
}

/// Loads the TSS (IST1 for exceptions, IST2 for interrupts) and the IDT.
pub fn init() {
    // SAFETY: runs once, single-threaded, before interrupts are enabled, so
    // nothing else touches the TSS, the IST stacks, the GDT or the IDT.
    unsafe {
        let tss = &mut *core::ptr::addr_of_mut!(TSS);
        let ist1 = core::ptr::addr_of!(IST1_STACK) as u64 + core::mem::size_of::<Stack>() as u64;
        let ist2 = core::ptr::addr_of!(IST2_STACK) as u64 + core::mem::size_of::<Stack>() as u64;
        tss.ist[0] = ist1;
        tss.ist[1] = ist2;

        let base = core::ptr::addr_of!(TSS) as u64;
        let limit = core::mem::size_of::<Tss>() as u64 - 1;
        let low = (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (0x89 << 40) // present, 64-bit TSS (available)
            | (((limit >> 16) & 0xf) << 48)
            | (((base >> 24) & 0xff) << 56);
        let gdt = &mut *core::ptr::addr_of_mut!(boot::boot_gdt);
        gdt[4] = low;
        gdt[5] = base >> 32;
        let gdtr = DescriptorPointer {
            limit: (core::mem::size_of::<[u64; 7]>() - 1) as u16,
            base: gdt.as_ptr() as u64,
        };
        asm!("lgdt [{}]", in(reg) &gdtr, options(readonly, nostack, preserves_flags));
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack, preserves_flags));

        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        let stubs = core::ptr::addr_of!(isr_stubs) as u64;
        for vector in 0..256 {
            let ist = if vector < 32 { 1 } else { 2 };
            set_gate(idt, vector, stubs + 16 * vector as u64, ist);
        }
        let idtr = DescriptorPointer {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: idt as *const Idt as u64,
        };
        asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
    }
}

/// Remaps the 8259 pair away from the exception vectors (0x20-0x2f) and masks
/// every line: firmware may have left the PIT unmasked on vector 8.
pub fn disable_pic() {
    use crate::arch::outb;
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x20);
    outb(0xa1, 0x28);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

fn apic_write(reg: u32, value: u32) {
    if APIC_MODE.load(Ordering::Relaxed) == 2 {
        // SAFETY: x2APIC is enabled, so its MSR range exists.
        unsafe { wrmsr(X2APIC_MSR_BASE + (reg >> 4), u64::from(value)) }
    } else {
        let addr = APIC_BASE.load(Ordering::Relaxed) + u64::from(reg);
        // SAFETY: the xAPIC page is identity-mapped uncached; `reg` is a
        // register offset inside it.
        unsafe { (addr as *mut u32).write_volatile(value) }
    }
}

fn apic_read(reg: u32) -> u32 {
    if APIC_MODE.load(Ordering::Relaxed) == 2 {
        // SAFETY: x2APIC is enabled, so its MSR range exists.
        unsafe { rdmsr(X2APIC_MSR_BASE + (reg >> 4)) as u32 }
    } else {
        let addr = APIC_BASE.load(Ordering::Relaxed) + u64::from(reg);
        // SAFETY: as in `apic_write`.
        unsafe { (addr as *const u32).read_volatile() }
    }
}

fn eoi() {
    apic_write(REG_EOI, 0);
}

/// Enables the local APIC (x2APIC when CPUID offers it) with the spurious
/// vector 0xff and returns (mode name, APIC ID).
pub fn init_lapic(allow_x2apic: bool) -> (&'static str, u32) {
    let x2 = allow_x2apic && cpuid(1, 0).ecx & (1 << 21) != 0;
    // SAFETY: IA32_APIC_BASE exists on every CPU with a local APIC, which
    // CPUID.1:EDX[9] would deny; KVM always provides one.
    let base = unsafe { rdmsr(IA32_APIC_BASE) };
    APIC_BASE.store(base & 0x000f_ffff_ffff_f000, Ordering::Relaxed);
    let mut new = base | APIC_BASE_ENABLE;
    if x2 {
        new |= APIC_BASE_X2APIC;
    }
    // SAFETY: enabling the APIC (and x2APIC mode, when supported) is the
    // documented way to use it; nothing depends on the old mode.
    unsafe { wrmsr(IA32_APIC_BASE, new) };
    APIC_MODE.store(if x2 { 2 } else { 1 }, Ordering::Relaxed);
    apic_write(REG_TPR, 0);
    apic_write(REG_LVT_LINT0, 1 << 16); // masked: the PIC is not used
    apic_write(REG_SVR, (1 << 8) | u32::from(SPURIOUS_VECTOR));
    let id = if x2 {
        apic_read(REG_ID)
    } else {
        apic_read(REG_ID) >> 24
    };
    (if x2 { "x2apic" } else { "xapic" }, id)
}
