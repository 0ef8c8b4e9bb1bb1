//! TSC frequency, from whichever source the hypervisor offers:
//! CPUID 0x40000010 (hypervisor timing leaf, kHz), CPUID 0x15 (crystal ratio),
//! KVM's pvclock (the TSC-to-nanoseconds scale it publishes), or the PIT.

use crate::arch::{cpuid, inb, outb, rdtsc, wrmsr};

const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// `pvclock_vcpu_time_info`.
#[repr(C, align(64))]
struct PvClock {
    version: u32,
    pad0: u32,
    tsc_timestamp: u64,
    system_time: u64,
    tsc_to_system_mul: u32,
    tsc_shift: i8,
    flags: u8,
    pad: [u8; 2],
}

static mut PVCLOCK: PvClock = PvClock {
    version: 0,
    pad0: 0,
    tsc_timestamp: 0,
    system_time: 0,
    tsc_to_system_mul: 0,
    tsc_shift: 0,
    flags: 0,
    pad: [0; 2],
};

fn hypervisor_max_leaf() -> Option<(u32, [u8; 12])> {
    if cpuid(1, 0).ecx & (1 << 31) == 0 {
        return None;
    }
    let r = cpuid(0x4000_0000, 0);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&r.ebx.to_le_bytes());
    sig[4..8].copy_from_slice(&r.ecx.to_le_bytes());
    sig[8..].copy_from_slice(&r.edx.to_le_bytes());
    Some((r.eax, sig))
}

fn from_pvclock() -> Option<u64> {
    let (max, sig) = hypervisor_max_leaf()?;
    if &sig != b"KVMKVMKVM\0\0\0" || max < 0x4000_0001 {
        return None;
    }
    if cpuid(0x4000_0001, 0).eax & KVM_FEATURE_CLOCKSOURCE2 == 0 {
        return None;
    }
    let addr = core::ptr::addr_of_mut!(PVCLOCK);
    // SAFETY: the MSR exists (CPUID says so); the hypervisor writes the
    // structure, which is ours, identity-mapped and 64-byte aligned; we turn
    // the clock off again before returning.
    let (mul, shift) = unsafe {
        wrmsr(MSR_KVM_SYSTEM_TIME_NEW, addr as u64 | 1);
        let mut result = (0, 0);
        for _ in 0..1000 {
            let v1 = core::ptr::addr_of!((*addr).version).read_volatile();
            let mul = core::ptr::addr_of!((*addr).tsc_to_system_mul).read_volatile();
            let shift = core::ptr::addr_of!((*addr).tsc_shift).read_volatile();
            let v2 = core::ptr::addr_of!((*addr).version).read_volatile();
            if v1 == v2 && v1 & 1 == 0 && mul != 0 {
                result = (mul, shift);
                break;
            }
        }
        wrmsr(MSR_KVM_SYSTEM_TIME_NEW, 0);
        result
    };
    if mul == 0 {
        return None;
    }
    // ns = (tsc << shift) * mul >> 32, so Hz = 1e9 * 2^32 / (mul * 2^shift).
    let num: u128 = 1_000_000_000u128 << 32;
    let den: u128 = if shift >= 0 {
        u128::from(mul) << shift
    } else {
        u128::from(mul) >> (-shift)
    };
    (den != 0).then(|| (num / den) as u64)
}

/// Counts TSC ticks across 10 ms of PIT channel 2 (one-shot, mode 0), the
/// classic PC calibration. `None` if no PIT answers.
fn from_pit() -> Option<u64> {
    const PIT_HZ: u64 = 1_193_182;
    const LATCH: u64 = PIT_HZ / 100;
    // Gate on, speaker off; channel 2, lobyte/hibyte, mode 0.
    outb(0x61, (inb(0x61) & !0x02) | 0x01);
    outb(0x43, 0xb0);
    outb(0x42, LATCH as u8);
    outb(0x42, (LATCH >> 8) as u8);
    let start = rdtsc();
    let mut polls = 0u64;
    while inb(0x61) & 0x20 == 0 {
        polls += 1;
        if polls > 50_000_000 {
            return None;
        }
    }
    let ticks = rdtsc().wrapping_sub(start);
    // OUT2 high at once means no PIT (or a bogus one).
    (polls > 10 && ticks > 1000).then(|| ticks * 100)
}

/// TSC frequency in Hz and where it came from, if any source is available.
pub fn tsc_hz() -> Option<(u64, &'static str)> {
    if let Some((max, _)) = hypervisor_max_leaf() {
        if max >= 0x4000_0010 {
            let khz = cpuid(0x4000_0010, 0).eax;
            if khz != 0 {
                return Some((u64::from(khz) * 1000, "cpuid-0x40000010"));
            }
        }
    }
    if cpuid(0, 0).eax >= 0x15 {
        let r = cpuid(0x15, 0);
        if r.eax != 0 && r.ebx != 0 && r.ecx != 0 {
            return Some((
                u64::from(r.ecx) * u64::from(r.ebx) / u64::from(r.eax),
                "cpuid-0x15",
            ));
        }
    }
    if let Some(hz) = from_pvclock() {
        return Some((hz, "kvm-pvclock"));
    }
    from_pit().map(|hz| (hz, "pit"))
}
