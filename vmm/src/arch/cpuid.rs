//! Per-vCPU CPUID, derived from what KVM supports on this host.
//!
//! The guest sees one package with N cores of one thread each; every vCPU's
//! APIC ID equals its index. Leaves describing topology are rewritten to say
//! so, the hypervisor bit is set, and a few host features that make no sense
//! in a guest are cleared.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use thiserror::Error;

/// Errors building a vCPU's CPUID.
#[derive(Debug, Error)]
pub enum CpuidError {
    /// The adjusted entry list does not fit KVM's CPUID array.
    #[error("CPUID table has {count} entries, more than KVM accepts")]
    TooManyEntries {
        /// Number of entries we tried to hand over.
        count: usize,
    },
}

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: EBX[23:16] holds the logical processor count.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 6 ECX: energy/performance bias MSR, which KVM does not emulate.
const LEAF6_ECX_EPB: u32 = 1 << 3;

/// Extended topology levels (leaf 0xb / 0x1f ECX[15:8]).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits of APIC ID needed to number `count` cores.
fn id_bits(count: u8) -> u32 {
    let count = u32::from(count.max(1));
    // ceil(log2(count)); 0 for one core.
    u32::BITS - (count - 1).leading_zeros()
}

/// Builds the CPUID of vCPU `vcpu_id` out of `vcpu_count` from KVM's
/// supported CPUID (`Kvm::get_supported_cpuid`).
pub fn vcpu_cpuid(supported: &CpuId, vcpu_id: u8, vcpu_count: u8) -> Result<CpuId, CpuidError> {
    let vcpu_count = vcpu_count.max(1);
    let apic_id = u32::from(vcpu_id);
    let core_bits = id_bits(vcpu_count);
    // Addressable IDs in the package: a power of two, capped to 8 bits.
    let addressable = (1u32 << core_bits).min(0xff);

    let mut entries: Vec<kvm_cpuid_entry2> = supported.as_slice().to_vec();
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    let had_0x1f = entries.iter().any(|e| e.function == 0x1f);
    // Extended topology leaves are rebuilt from scratch below.
    entries.retain(|e| e.function != 0xb && e.function != 0x1f);

    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (addressable << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if vcpu_count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters (Intel): cores per package
                // in EAX[31:26]; L3 is shared by all cores, L1/L2 by one.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { addressable - 1 } else { 0 };
                let cores = (addressable - 1).min(0x3f);
                e.eax = (e.eax & 0x3fff) | (cores << 26) | ((sharing & 0xfff) << 14);
            }
            0x6 => e.ecx &= !LEAF6_ECX_EPB,
            0x8000_0008 => {
                // AMD: number of cores - 1, and APIC ID bits for the core ID.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (u32::from(vcpu_count) - 1);
            }
            0x8000_001e => {
                // AMD extended APIC ID; one thread per compute unit, whose
                // ID is the core's; a single node.
                e.eax = apic_id;
                e.ebx = (e.ebx & !0xffff) | (apic_id & 0xff);
                e.ecx = 0;
            }
            _ => {}
        }
    }

    let mut topology_leaves = Vec::new();
    if max_basic >= 0xb {
        topology_leaves.push(0xb);
    }
    if had_0x1f && max_basic >= 0x1f {
        topology_leaves.push(0x1f);
    }
    for function in topology_leaves {
        let leaf = |index: u32, eax: u32, ebx: u32, ecx: u32| kvm_cpuid_entry2 {
            function,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            eax,
            ebx,
            ecx,
            edx: apic_id,
            ..Default::default()
        };
        // Threads: one per core, no ID bits. Cores: all vCPUs. Then the
        // terminating invalid level.
        entries.push(leaf(0, 0, 1, LEVEL_TYPE_SMT << 8));
        entries.push(leaf(
            1,
            core_bits,
            u32::from(vcpu_count),
            (LEVEL_TYPE_CORE << 8) | 1,
        ));
        entries.push(leaf(2, 0, 0, 2));
    }

    CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries {
        count: entries.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn host_like() -> CpuId {
        let mut leaf0 = entry(0, 0);
        leaf0.eax = 0x1f;
        let mut leaf1 = entry(1, 0);
        leaf1.ebx = 0x0010_0800; // CLFLUSH size 8, 16 logical, APIC ID 0
        leaf1.edx = LEAF1_EDX_HTT;
        let mut leaf6 = entry(6, 0);
        leaf6.ecx = 0xf;
        let mut l3 = entry(4, 3);
        l3.eax = (3 << 5) | 0x1;
        CpuId::from_entries(&[
            leaf0,
            leaf1,
            leaf6,
            l3,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0x1f, 0),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap()
    }

    #[test]
    fn core_id_bits() {
        assert_eq!(id_bits(0), 0);
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(254), 8);
    }

    #[test]
    fn leaf1_apic_id_and_hypervisor() {
        let c = vcpu_cpuid(&host_like(), 3, 4).unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);

        let single = vcpu_cpuid(&host_like(), 0, 1).unwrap();
        assert_eq!(find(&single, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!((find(&single, 1, 0).ebx >> 16) & 0xff, 1);
        // 254 vCPUs: the count saturates at 8 bits.
        let big = vcpu_cpuid(&host_like(), 253, 254).unwrap();
        assert_eq!(find(&big, 1, 0).ebx >> 24, 253);
        assert_eq!((find(&big, 1, 0).ebx >> 16) & 0xff, 0xff);
    }

    #[test]
    fn extended_topology_rebuilt() {
        let c = vcpu_cpuid(&host_like(), 2, 3).unwrap();
        for function in [0xb, 0x1f] {
            let smt = find(&c, function, 0);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
            let core = find(&c, function, 1);
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
            let end = find(&c, function, 2);
            assert_eq!((end.ecx >> 8) & 0xff, 0);
            assert_eq!(smt.flags, KVM_CPUID_FLAG_SIGNIFCANT_INDEX);
        }
        // Exactly three subleaves each, the host's ones dropped.
        assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
    }

    #[test]
    fn no_topology_leaf_beyond_max_basic() {
        let mut leaf0 = entry(0, 0);
        leaf0.eax = 0xa;
        let c = vcpu_cpuid(&CpuId::from_entries(&[leaf0, entry(1, 0)]).unwrap(), 0, 2).unwrap();
        assert!(c.as_slice().iter().all(|e| e.function != 0xb));
    }

    #[test]
    fn other_fixups() {
        let c = vcpu_cpuid(&host_like(), 1, 4).unwrap();
        assert_eq!(find(&c, 6, 0).ecx, 0xf & !LEAF6_ECX_EPB);
        let l3 = find(&c, 4, 3);
        assert_eq!(l3.eax >> 26, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        assert_eq!(l3.eax & 0x3fff, (3 << 5) | 1);
        let amd = find(&c, 0x8000_0008, 0);
        assert_eq!(amd.ecx & 0xff, 3);
        assert_eq!((amd.ecx >> 12) & 0xf, 2);
        assert_eq!(find(&c, 0x8000_001e, 0).eax, 1);
    }
}
