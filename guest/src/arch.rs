//! Thin wrappers over x86 instructions: port I/O, CPUID, MSRs, TSC.

use core::arch::asm;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the ports we use
    // (COM1, PCI config, PIC, exit port) are harmless to poke.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Writes a 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a 32-bit value from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Result of CPUID.
#[derive(Clone, Copy, Debug)]
pub struct Cpuid {
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// Executes CPUID for `leaf`/`subleaf`.
pub fn cpuid(leaf: u32, subleaf: u32) -> Cpuid {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    Cpuid {
        eax: r.eax,
        ebx: r.ebx,
        ecx: r.ecx,
        edx: r.edx,
    }
}

/// Reads a model-specific register.
///
/// # Safety
/// The MSR must exist, or the read faults.
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// The MSR must exist and the value must not break the running system.
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the write is valid.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// Reads the time stamp counter. `lfence` keeps earlier loads (e.g. a poll of
/// a used ring) from drifting past the read.
#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: LFENCE and RDTSC only read CPU state.
    unsafe {
        core::arch::x86_64::_mm_lfence();
        core::arch::x86_64::_rdtsc()
    }
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn cr2() -> u64 {
    let value: u64;
    // SAFETY: reading CR2 has no side effects at CPL 0.
    unsafe { asm!("mov {}, cr2", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

/// Enables maskable interrupts.
pub fn sti() {
    // SAFETY: the IDT and LAPIC are set up before anything calls this.
    unsafe { asm!("sti", options(nomem, nostack)) }
}

/// Disables maskable interrupts.
pub fn cli() {
    // SAFETY: masking interrupts cannot break memory safety.
    unsafe { asm!("cli", options(nomem, nostack)) }
}

/// Sleeps until the next interrupt unless `ready()` already holds. The check
/// runs with interrupts masked and `sti; hlt` re-enables them atomically with
/// the halt, so an interrupt arriving after the check still wakes us.
pub fn halt_unless(ready: impl Fn() -> bool) {
    cli();
    if ready() {
        sti();
    } else {
        // SAFETY: the IDT and LAPIC are set up; an interrupt ends the halt.
        unsafe { asm!("sti", "hlt", options(nomem, nostack)) }
    }
}

/// Halts forever with interrupts off.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stopping the CPU is what we want here.
        unsafe { asm!("cli; hlt", options(nomem, nostack)) }
    }
}
