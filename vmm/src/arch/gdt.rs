//! Segment descriptors for the boot GDT, and their translation into the
//! `kvm_segment` form KVM wants in `kvm_sregs`.
//!
//! Descriptor layout (Intel SDM vol. 3, 3.4.5): limit 15:0 in bits 0-15,
//! base 23:0 in bits 16-39, access byte in bits 40-47, limit 19:16 in bits
//! 48-51, flags (AVL, L, D/B, G) in bits 52-55, base 31:24 in bits 56-63.

use kvm_bindings::kvm_segment;

/// Access byte + flags nibble of a descriptor, packed as `0xF0AA`: flags in
/// bits 12-15, access byte in bits 0-7 (bits 8-11 are ignored; they are
/// where the limit's top nibble goes in the descriptor).
pub type DescriptorFlags = u16;

/// 64-bit code: G=1, L=1; present, DPL 0, code, execute/read, accessed.
pub const CODE64: DescriptorFlags = 0xa09b;
/// 32-bit code: G=1, D=1; present, DPL 0, code, execute/read, accessed.
pub const CODE32: DescriptorFlags = 0xc09b;
/// 32-bit data: G=1, B=1; present, DPL 0, data, read/write, accessed.
pub const DATA32: DescriptorFlags = 0xc093;
/// Busy 32-bit TSS, byte granular (a TSS limit is small).
pub const TSS32_BUSY: DescriptorFlags = 0x008b;

/// Selector of the code segment (`__BOOT_CS` in the Linux boot protocol).
pub const BOOT_CS_SELECTOR: u16 = 0x10;
/// Selector of the data segment (`__BOOT_DS` in the Linux boot protocol).
pub const BOOT_DS_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS_SELECTOR: u16 = 0x20;

/// Limit of a 32-bit TSS (104 bytes).
pub const TSS_LIMIT: u32 = 0x67;

/// Encodes one descriptor.
pub fn descriptor(flags: DescriptorFlags, base: u32, limit: u32) -> u64 {
    let base = u64::from(base);
    let limit = u64::from(limit);
    let flags = u64::from(flags);
    (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | ((flags & 0xff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The five-entry boot GDT: null, null, code, data, TSS, so that code and
/// data land on the selectors the Linux boot protocol names (0x10, 0x18).
pub fn boot_gdt(code: DescriptorFlags) -> [u64; 5] {
    [
        0,
        0,
        descriptor(code, 0, 0xf_ffff),
        descriptor(DATA32, 0, 0xf_ffff),
        descriptor(TSS32_BUSY, 0, TSS_LIMIT),
    ]
}

/// The `kvm_segment` that loading `selector` for `entry` would produce.
pub fn kvm_segment_from_descriptor(entry: u64, selector: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let granular = bit(55) == 1;
    // With G set the limit counts 4 KiB pages: the low 12 bits become ones.
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        // An absent segment must be marked unusable or VM entry fails.
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn well_known_descriptors() {
        // The flat descriptors every x86 tutorial lists.
        assert_eq!(descriptor(CODE64, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(CODE32, 0, 0xfffff), 0x00cf_9b00_0000_ffff);
        assert_eq!(descriptor(DATA32, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(TSS32_BUSY, 0, 0x67), 0x0000_8b00_0000_0067);
        assert_eq!(
            descriptor(DATA32, 0x1234_5678, 0xabcde),
            0x12ca_9334_5678_bcde
        );
    }

    #[test]
    fn segments_decode_back() {
        let code = kvm_segment_from_descriptor(descriptor(CODE64, 0, 0xfffff), 0x10);
        assert_eq!(code.base, 0);
        assert_eq!(code.limit, 0xffff_ffff);
        assert_eq!((code.type_, code.present, code.dpl), (0xb, 1, 0));
        assert_eq!((code.s, code.l, code.db, code.g), (1, 1, 0, 1));
        assert_eq!(code.unusable, 0);
        assert_eq!(code.selector, 0x10);

        let data = kvm_segment_from_descriptor(descriptor(DATA32, 0x1234_5678, 0xabcde), 0x18);
        assert_eq!(data.base, 0x1234_5678);
        assert_eq!(data.limit, 0xabcd_efff);
        assert_eq!((data.type_, data.db, data.l), (3, 1, 0));

        let tss = kvm_segment_from_descriptor(descriptor(TSS32_BUSY, 0, TSS_LIMIT), 0x20);
        assert_eq!((tss.type_, tss.s, tss.g, tss.limit), (0xb, 0, 0, 0x67));

        assert_eq!(kvm_segment_from_descriptor(0, 0).unusable, 1);
    }

    #[test]
    fn boot_gdt_selectors() {
        let gdt = boot_gdt(CODE64);
        assert_eq!(
            gdt[usize::from(BOOT_CS_SELECTOR / 8)],
            descriptor(CODE64, 0, 0xfffff)
        );
        assert_eq!(
            gdt[usize::from(BOOT_DS_SELECTOR / 8)],
            descriptor(DATA32, 0, 0xfffff)
        );
        assert_eq!(
            gdt[usize::from(BOOT_TSS_SELECTOR / 8)],
            descriptor(TSS32_BUSY, 0, 0x67)
        );
    }
}
