use super::*;
use crate::pcie::PciExpressCapability;

fn params() -> PciConfigurationParams {
    PciConfigurationParams {
        vendor_id: 0x1af4,
        device_id: 0x1042,
        revision_id: 1,
        class_code: PciClassCode::MassStorage,
        subclass: 0x80,
        prog_if: 0x00,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x0002,
        interrupt_pin: 1,
        ..Default::default()
    }
}

/// Guest-style write of `width` bytes of `value` at byte offset `at`.
fn write(
    config: &mut PciConfiguration,
    at: usize,
    width: usize,
    value: u32,
) -> Vec<BarReprogrammingParams> {
    let bytes = value.to_le_bytes();
    config.write_reg(at / 4, (at % 4) as u64, &bytes[..width])
}

fn read32(config: &PciConfiguration, at: usize) -> u32 {
    config.read_reg(at / 4)
}

struct VendorCap(Vec<u8>, Vec<u8>);

impl PciCapability for VendorCap {
    fn id(&self) -> PciCapabilityId {
        PciCapabilityId::VendorSpecific
    }
    fn body(&self) -> Vec<u8> {
        self.0.clone()
    }
    fn writable_mask(&self) -> Vec<u8> {
        self.1.clone()
    }
}

fn vendor_cap(len: usize) -> VendorCap {
    VendorCap(vec![0xab; len], vec![0; len])
}

#[test]
fn identity_registers_are_read_only() {
    let mut config = PciConfiguration::new(&params());
    let before: Vec<u32> = [0x00, 0x08, 0x2c, 0x34]
        .iter()
        .map(|&r| read32(&config, r))
        .collect();
    for reg in [0x00, 0x08, 0x2c, 0x34] {
        for width in [1, 2, 4] {
            for lane in 0..=(4 - width) {
                write(&mut config, reg + lane, width, 0xffff_ffff);
                write(&mut config, reg + lane, width, 0);
            }
        }
    }
    let after: Vec<u32> = [0x00, 0x08, 0x2c, 0x34]
        .iter()
        .map(|&r| read32(&config, r))
        .collect();
    assert_eq!(before, after);
    assert_eq!(read32(&config, 0x00), 0x1042_1af4);
    assert_eq!(read32(&config, 0x08), 0x0180_0001);
    assert_eq!(read32(&config, 0x2c), 0x0002_1af4);
}

#[test]
fn header_type_and_multifunction_bit() {
    let config = PciConfiguration::new(&params());
    assert_eq!((read32(&config, 0x0c) >> 16) & 0xff, 0x00);
    let multi = PciConfiguration::new(&PciConfigurationParams {
        multifunction: true,
        ..params()
    });
    assert_eq!((read32(&multi, 0x0c) >> 16) & 0xff, 0x80);
}

#[test]
fn command_register_keeps_only_defined_bits() {
    let mut config = PciConfiguration::new(&params());
    write(&mut config, 0x04, 2, 0xffff);
    assert_eq!(config.command(), 0x0547);
    assert!(config.bus_master_enabled());
    assert!(config.intx_disabled());
    write(&mut config, 0x04, 2, 0);
    assert_eq!(config.command(), 0);
}

#[test]
fn status_error_bits_are_write_one_to_clear() {
    let mut config = PciConfiguration::new(&params());
    // The device raises every error bit and the interrupt status.
    config.write_bytes(0x06, &0xf908u16.to_le_bytes());
    // Writing zeros changes nothing.
    write(&mut config, 0x06, 2, 0);
    assert_eq!(config.read_u16(0x06), 0xf908);
    // Writing ones clears only the RW1C bits, one at a time.
    write(&mut config, 0x06, 2, 0x8000);
    assert_eq!(config.read_u16(0x06), 0x7908);
    // A dword write to the command register with status bits set clears them too.
    write(&mut config, 0x04, 4, 0xffff_0002);
    assert_eq!(
        config.read_u16(0x06),
        0x0008,
        "interrupt status is read-only"
    );
    assert_eq!(config.command(), 0x0002);
}

#[test]
fn interrupt_line_writable_pin_read_only() {
    let mut config = PciConfiguration::new(&params());
    write(&mut config, 0x3c, 4, 0xffff_ffff);
    assert_eq!(read32(&config, 0x3c), 0x0000_01ff);
    assert_eq!(config.interrupt_pin(), 1);
}

#[test]
fn cache_line_size_writable_rest_of_dword_read_only() {
    let mut config = PciConfiguration::new(&params());
    write(&mut config, 0x0c, 4, 0xffff_ffff);
    assert_eq!(read32(&config, 0x0c), 0x0000_00ff);
}

#[test]
fn out_of_range_and_overlong_accesses_are_harmless() {
    let mut config = PciConfiguration::new(&params());
    assert_eq!(config.read_reg(64), u32::MAX, "past the legacy space");
    assert_eq!(config.read_reg(usize::MAX), u32::MAX);
    assert!(config.write_reg(64, 0, &[1, 2, 3, 4]).is_empty());
    assert!(
        config.write_reg(1, 3, &[1, 2]).is_empty(),
        "crosses a dword"
    );
    assert!(config.write_reg(1, 0, &[1, 2, 3, 4, 5]).is_empty());
    assert!(config.write_reg(1, 0, &[]).is_empty());
    assert!(config.write_reg(1, u64::MAX, &[1]).is_empty());
    assert!(config.write_reg(1, u64::MAX - 1, &[1, 2, 3]).is_empty());
    assert_eq!(config.command(), 0);
    let mut bytes = [0u8; 4];
    config.read_bytes(254, &mut bytes);
    assert_eq!(bytes[2..], [0xff, 0xff]);
    config.read_bytes(usize::MAX, &mut bytes);
    assert_eq!(bytes, [0xff; 4]);
    config.write_bytes(usize::MAX - 1, &[1, 2, 3]);
}

#[test]
fn extended_space_is_4k() {
    let config = PciConfiguration::new(&PciConfigurationParams {
        extended_config_space: true,
        ..params()
    });
    assert_eq!(config.size(), 4096);
    assert_eq!(config.read_reg(64), 0);
    assert_eq!(config.read_reg(1023), 0);
    assert_eq!(config.read_reg(1024), u32::MAX);
}

#[test]
fn bar_32bit_sizing_protocol() {
    let mut config = PciConfiguration::new(&params());
    config
        .add_bar(
            0,
            0xc000_0000,
            0x4000,
            PciBarRegionType::Memory32BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        )
        .unwrap();
    assert_eq!(read32(&config, 0x10), 0xc000_0000);
    write(&mut config, 0x10, 4, 0xffff_ffff);
    assert_eq!(
        read32(&config, 0x10),
        0xffff_c000,
        "size mask with type bits"
    );
    write(&mut config, 0x10, 4, 0xc000_0000);
    assert_eq!(read32(&config, 0x10), 0xc000_0000);
    // Unused BARs read zero and stay zero.
    write(&mut config, 0x14, 4, 0xffff_ffff);
    assert_eq!(read32(&config, 0x14), 0);
}

#[test]
fn bar_prefetchable_and_io_type_bits() {
    let mut config = PciConfiguration::new(&params());
    config
        .add_bar(
            0,
            0xc000_0000,
            0x1000,
            PciBarRegionType::Memory32BitRegion,
            PciBarPrefetchable::Prefetchable,
        )
        .unwrap();
    config
        .add_bar(
            1,
            0x1000,
            0x20,
            PciBarRegionType::IoRegion,
            PciBarPrefetchable::NotPrefetchable,
        )
        .unwrap();
    assert_eq!(read32(&config, 0x10), 0xc000_0008);
    assert_eq!(read32(&config, 0x14), 0x0000_1001);
    write(&mut config, 0x14, 4, 0xffff_ffff);
    assert_eq!(read32(&config, 0x14), 0x0000_ffe1);
    assert_eq!(config.bar_address(1), Some(0xffe0));
}

#[test]
fn bar_64bit_sizing_through_both_halves() {
    let mut config = PciConfiguration::new(&params());
    let size = 0x2_0000_0000u64; // 8 GiB: the size reaches into the upper dword
    config
        .add_bar(
            2,
            0x40_0000_0000,
            size,
            PciBarRegionType::Memory64BitRegion,
            PciBarPrefetchable::Prefetchable,
        )
        .unwrap();
    assert_eq!(read32(&config, 0x18), 0x0000_000c);
    assert_eq!(read32(&config, 0x1c), 0x0000_0040);
    write(&mut config, 0x18, 4, 0xffff_ffff);
    write(&mut config, 0x1c, 4, 0xffff_ffff);
    let lo = read32(&config, 0x18);
    let hi = read32(&config, 0x1c);
    assert_eq!(lo, 0x0000_000c);
    assert_eq!(hi, 0xffff_fffe);
    let mask = u64::from(hi) << 32 | u64::from(lo & !0xf);
    assert_eq!(
        !mask + 1,
        size,
        "the guest computes the size from both halves"
    );

    let mut small = PciConfiguration::new(&params());
    small
        .add_bar(
            0,
            0x1_0000_0000,
            0x1000,
            PciBarRegionType::Memory64BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        )
        .unwrap();
    write(&mut small, 0x10, 4, 0xffff_ffff);
    write(&mut small, 0x14, 4, 0xffff_ffff);
    assert_eq!(read32(&small, 0x10), 0xffff_f004);
    assert_eq!(read32(&small, 0x14), 0xffff_ffff);
    // The upper half of a 64-bit BAR cannot be reused.
    assert!(matches!(
        small.add_bar(
            1,
            0,
            0x1000,
            PciBarRegionType::Memory32BitRegion,
            PciBarPrefetchable::NotPrefetchable
        ),
        Err(PciError::BarInUse(1))
    ));
}

#[test]
fn bar_validation() {
    let mut config = PciConfiguration::new(&params());
    let mem32 = PciBarRegionType::Memory32BitRegion;
    let np = PciBarPrefetchable::NotPrefetchable;
    assert!(matches!(
        config.add_bar(6, 0, 0x1000, mem32, np),
        Err(PciError::InvalidBarIndex(6))
    ));
    assert!(matches!(
        config.add_bar(5, 0, 0x1000, PciBarRegionType::Memory64BitRegion, np),
        Err(PciError::InvalidBarIndex(5))
    ));
    assert!(matches!(
        config.add_bar(0, 0, 0x1800, mem32, np),
        Err(PciError::InvalidBarSize { .. })
    ));
    assert!(matches!(
        config.add_bar(0, 0, 8, mem32, np),
        Err(PciError::InvalidBarSize { .. })
    ));
    assert!(matches!(
        config.add_bar(0, 0x800, 0x1000, mem32, np),
        Err(PciError::InvalidBarAddress { .. })
    ));
    assert!(matches!(
        config.add_bar(0, 0x1_0000_0000, 0x1000, mem32, np),
        Err(PciError::InvalidBarAddress { .. })
    ));
    assert!(matches!(
        config.add_bar(0, 0x1_0000, 0x100, PciBarRegionType::IoRegion, np),
        Err(PciError::InvalidBarAddress { .. })
    ));
    config.add_bar(0, 0x1000, 0x1000, mem32, np).unwrap();
    assert!(matches!(
        config.add_bar(0, 0x2000, 0x1000, mem32, np),
        Err(PciError::BarInUse(0))
    ));
}

fn config_with_bars() -> PciConfiguration {
    let mut config = PciConfiguration::new(&params());
    config
        .add_bar(
            0,
            0xc000_0000,
            0x1000,
            PciBarRegionType::Memory32BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        )
        .unwrap();
    config
        .add_bar(
            2,
            0x1_0000_0000,
            0x10_0000,
            PciBarRegionType::Memory64BitRegion,
            PciBarPrefetchable::Prefetchable,
        )
        .unwrap();
    config
        .add_bar(
            4,
            0x1000,
            0x40,
            PciBarRegionType::IoRegion,
            PciBarPrefetchable::NotPrefetchable,
        )
        .unwrap();
    config
}

#[test]
fn bar_moves_are_reported_only_with_decoding_enabled() {
    let mut config = config_with_bars();
    // Decoding off: sizing and reprogramming are silent.
    assert!(write(&mut config, 0x10, 4, 0xffff_ffff).is_empty());
    assert!(write(&mut config, 0x10, 4, 0xd000_0000).is_empty());
    assert!(write(&mut config, 0x18, 4, 0x0020_0000).is_empty());
    assert!(write(&mut config, 0x1c, 4, 0x2).is_empty());
    assert_eq!(config.bar_mapped_address(0), Some(0xc000_0000));
    // Enabling memory decoding reports both memory BARs, not the I/O one.
    let moves = write(&mut config, 0x04, 2, u32::from(COMMAND_MEMORY_SPACE));
    assert_eq!(
        moves,
        vec![
            BarReprogrammingParams {
                bar_index: 0,
                old_base: 0xc000_0000,
                new_base: 0xd000_0000,
                len: 0x1000,
                region_type: PciBarRegionType::Memory32BitRegion,
            },
            BarReprogrammingParams {
                bar_index: 2,
                old_base: 0x1_0000_0000,
                new_base: 0x2_0020_0000,
                len: 0x10_0000,
                region_type: PciBarRegionType::Memory64BitRegion,
            },
        ]
    );
    assert_eq!(config.bar_mapped_address(2), Some(0x2_0020_0000));
    // Once reported, re-enabling is silent.
    assert!(write(&mut config, 0x04, 2, u32::from(COMMAND_MEMORY_SPACE)).is_empty());
    // With decoding on, a 32-bit BAR write moves at once.
    let moves = write(&mut config, 0x10, 4, 0xe000_0000);
    assert_eq!(moves.len(), 1);
    assert_eq!(moves[0].new_base, 0xe000_0000);
    // Sizing with decoding on is not a move, and restoring the value is none either.
    assert!(write(&mut config, 0x10, 4, 0xffff_ffff).is_empty());
    assert!(write(&mut config, 0x10, 4, 0xe000_0000).is_empty());
    // The I/O BAR follows the I/O space bit.
    write(&mut config, 0x20, 4, 0x2000);
    let moves = write(
        &mut config,
        0x04,
        2,
        u32::from(COMMAND_MEMORY_SPACE | COMMAND_IO_SPACE),
    );
    assert_eq!(moves.len(), 1);
    assert_eq!((moves[0].old_base, moves[0].new_base), (0x1000, 0x2000));
    assert_eq!(moves[0].region_type, PciBarRegionType::IoRegion);
}

#[test]
fn byte_writes_to_a_bar_assemble_an_address() {
    let mut config = config_with_bars();
    write(&mut config, 0x04, 2, u32::from(COMMAND_MEMORY_SPACE));
    let mut moves = Vec::new();
    for (i, byte) in 0xc010_0000u32.to_le_bytes().iter().enumerate() {
        moves.extend(write(&mut config, 0x10 + i, 1, u32::from(*byte)));
    }
    assert_eq!(moves.last().map(|m| m.new_base), Some(0xc010_0000));
    assert_eq!(config.bar_address(0), Some(0xc010_0000));
    assert_eq!(read32(&config, 0x10) & 0xfff, 0, "low bits are read-only");
}

#[test]
fn restore_bar_puts_the_address_back() {
    let mut config = config_with_bars();
    write(&mut config, 0x04, 2, u32::from(COMMAND_MEMORY_SPACE));
    write(&mut config, 0x18, 4, 0);
    let moves = write(&mut config, 0x1c, 4, 0x8);
    assert_eq!(moves.len(), 1);
    config.restore_bar(&moves[0]);
    assert_eq!(config.bar_address(2), Some(0x1_0000_0000));
    assert_eq!(read32(&config, 0x18), 0x0000_000c, "type bits survive");
    assert_eq!(config.bar_mapped_address(2), Some(0x1_0000_0000));
}

#[test]
fn rom_bar_sizing_enable_and_moves() {
    let mut config = PciConfiguration::new(&params());
    config.add_rom_bar(0xfeb0_0000, 0x4_0000).unwrap();
    assert_eq!(read32(&config, 0x30), 0xfeb0_0000);
    write(&mut config, 0x30, 4, 0xffff_f7fe); // Linux's sizing value
    assert_eq!(read32(&config, 0x30), 0xfffc_0000);
    write(&mut config, 0x30, 4, 0xfea0_0001);
    assert!(!config.rom_enabled(), "memory decoding is off");
    let moves = write(&mut config, 0x04, 2, u32::from(COMMAND_MEMORY_SPACE));
    assert!(config.rom_enabled());
    assert_eq!(moves.len(), 1);
    assert_eq!(moves[0].bar_index, ROM_BAR_INDEX);
    assert_eq!(moves[0].new_base, 0xfea0_0000);
    let mut without = PciConfiguration::new(&params());
    write(&mut without, 0x30, 4, 0xffff_ffff);
    assert_eq!(read32(&without, 0x30), 0);
}

#[test]
fn capability_chain_is_well_formed_and_read_only() {
    let mut config = PciConfiguration::new(&params());
    assert_eq!(config.read_u16(0x06) & 0x10, 0, "no capabilities yet");
    let first = config.add_capability(&vendor_cap(3)).unwrap();
    let second = config
        .add_capability(&VendorCap(
            vec![1, 2, 3, 4, 5, 6],
            vec![0, 0, 0xff, 0, 0, 0x0f],
        ))
        .unwrap();
    let third = config
        .add_capability(&PciExpressCapability::default())
        .unwrap();
    assert_eq!(first, 0x40);
    assert_eq!(second, 0x48, "5 bytes rounded up to a dword");
    assert_eq!(third, 0x50);
    assert_ne!(config.read_u16(0x06) & 0x10, 0);
    assert_eq!(read32(&config, 0x34) & 0xff, 0x40);

    // The guest cannot redirect the chain or change IDs.
    write(&mut config, 0x34, 1, 0x80);
    write(&mut config, 0x40, 2, 0xffff);
    write(&mut config, 0x48, 4, 0xffff_ffff);
    assert_eq!(read32(&config, 0x34) & 0xff, 0x40);
    let mut walk = Vec::new();
    let mut next = read32(&config, 0x34) as usize & 0xff;
    while next != 0 {
        assert_eq!(next % 4, 0);
        assert!((0x40..256).contains(&next));
        assert!(walk.len() < 48, "loop in the chain");
        let header = config.read_u16(next);
        walk.push((next, header as u8));
        next = usize::from(header >> 8);
    }
    assert_eq!(walk, vec![(0x40, 0x09), (0x48, 0x09), (0x50, 0x10)]);

    // Writable bits of a body are writable, the rest is not.
    assert_eq!(read32(&config, 0x48) >> 16, 0x0201);
    write(&mut config, 0x4c, 4, 0xffff_ffff);
    assert_eq!(read32(&config, 0x4c), 0x0f05_04ff);
    assert_eq!(
        config.find_capability(PciCapabilityId::PciExpress),
        Some(0x50)
    );
    assert_eq!(config.find_capability(PciCapabilityId::MsiX), None);
}

#[test]
fn capability_space_full_and_bad_masks() {
    let mut config = PciConfiguration::new(&params());
    // 192 bytes of capability space: 0x40..0x100.
    config.add_capability(&vendor_cap(186)).unwrap();
    assert!(matches!(
        config.add_capability(&vendor_cap(3)),
        Err(PciError::CapabilitySpaceFull { size: 5 })
    ));
    let mut config = PciConfiguration::new(&params());
    assert!(matches!(
        config.add_capability(&VendorCap(vec![0; 4], vec![0; 3])),
        Err(PciError::InvalidCapability(_))
    ));
    assert_eq!(config.capabilities().len(), 0);
}

#[test]
fn pcie_capability_layout() {
    let cap = PciExpressCapability::default();
    assert_eq!(cap.body().len() + 2, PciExpressCapability::SIZE);
    assert_eq!(cap.writable_mask().len(), cap.body().len());
    let mut config = PciConfiguration::new(&PciConfigurationParams {
        extended_config_space: true,
        ..params()
    });
    let at = config.add_capability(&cap).unwrap();
    assert_eq!(
        config.read_u16(at + 2),
        0x0092,
        "version 2, integrated endpoint"
    );
    write(&mut config, at + 8, 2, 0xffff);
    assert_eq!(config.read_u16(at + 8), 0x79ff);
}

#[test]
fn extended_capabilities_chain_above_256() {
    let mut legacy = PciConfiguration::new(&params());
    assert!(legacy
        .add_extended_capability(0x1, 1, &[0; 4], &[0; 4])
        .is_err());
    let mut config = PciConfiguration::new(&PciConfigurationParams {
        extended_config_space: true,
        ..params()
    });
    let a = config
        .add_extended_capability(0x0001, 1, &[0; 0x14], &[0; 0x14])
        .unwrap();
    let b = config
        .add_extended_capability(0x000b, 1, &[1, 2, 3, 4], &[0xff, 0, 0, 0])
        .unwrap();
    assert_eq!(a, 0x100);
    assert_eq!(b, 0x118);
    assert_eq!(read32(&config, 0x100), 0x1181_0001);
    assert_eq!(read32(&config, 0x118), 0x0001_000b);
    write(&mut config, 0x100, 4, 0);
    assert_eq!(read32(&config, 0x100), 0x1181_0001, "headers are read-only");
    write(&mut config, 0x11c, 4, 0xffff_ffff);
    assert_eq!(read32(&config, 0x11c), 0x0403_02ff);
}

#[test]
fn upper_dword_bit0_of_a_64bit_bar_is_an_address_bit() {
    // Found by the config-space fuzzer: an upper dword of 0xFFFF_FFFE was
    // taken for a sizing pattern, so the move was never reported.
    let mut config = config_with_bars();
    write(&mut config, 0x04, 2, u32::from(COMMAND_MEMORY_SPACE));
    let moves = write(&mut config, 0x1c, 4, 0xffff_fffe);
    assert_eq!(moves.len(), 1);
    assert_eq!(moves[0].new_base, 0xffff_fffe_0000_0000);
    assert_eq!(config.bar_mapped_address(2), Some(0xffff_fffe_0000_0000));
}

#[test]
fn enabling_decoding_over_an_all_ones_bar_is_a_move_not_sizing() {
    // Found by the hostile guest: a BAR left holding all ones when decoding
    // is turned on read back there while the device stayed put.
    let mut config = config_with_bars();
    write(&mut config, 0x10, 4, 0xffff_ffff);
    let moves = write(&mut config, 0x04, 2, u32::from(COMMAND_MEMORY_SPACE));
    assert_eq!(moves.len(), 1);
    assert_eq!(moves[0].bar_index, 0);
    assert_eq!(moves[0].new_base, 0xffff_f000);
    // The owner refuses it: the BAR is back where it was mapped.
    config.restore_bar(&moves[0]);
    assert_eq!(config.bar_address(0), Some(0xc000_0000));
}
