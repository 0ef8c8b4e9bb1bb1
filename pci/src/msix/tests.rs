use std::sync::Arc;

use super::*;
use crate::interrupt::{InterruptEvent, RecordingInterruptGroup};

fn setup(vectors: u16) -> (Arc<RecordingInterruptGroup>, MsixConfig) {
    let group = Arc::new(RecordingInterruptGroup::new(vectors));
    let config = MsixConfig::new(vectors, group.clone()).unwrap();
    (group, config)
}

/// Byte offset of dword `dword` of entry `vector` in the table.
fn off(vector: u16, dword: u64) -> u64 {
    u64::from(vector) * MSIX_TABLE_ENTRY_SIZE as u64 + dword * 4
}

fn write32(config: &mut MsixConfig, offset: u64, value: u32) {
    config.write_table(offset, &value.to_le_bytes());
}

fn read32(config: &MsixConfig, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    config.read_table(offset, &mut data);
    u32::from_le_bytes(data)
}

fn read_pba64(config: &MsixConfig, offset: u64) -> u64 {
    let mut data = [0u8; 8];
    config.read_pba(offset, &mut data);
    u64::from_le_bytes(data)
}

/// Programs entry `vector` with one 8-byte address write, then data, then
/// vector control.
fn program(config: &mut MsixConfig, vector: u16, address: u64, data: u32, masked: bool) {
    config.write_table(off(vector, 0), &address.to_le_bytes());
    write32(config, off(vector, 2), data);
    write32(config, off(vector, 3), u32::from(masked));
}

fn updated(index: u16, address: u64, data: u32, masked: bool) -> InterruptEvent {
    InterruptEvent::Updated {
        index,
        msg: MsiMessage { address, data },
        masked,
    }
}

#[test]
fn vector_count_bounds() {
    let group = Arc::new(RecordingInterruptGroup::new(4096));
    for bad in [0u16, 2049, u16::MAX] {
        match MsixConfig::new(bad, group.clone()) {
            Err(PciError::InvalidMsixVectorCount(n)) => assert_eq!(n, usize::from(bad)),
            other => panic!("{bad} vectors: unexpected {other:?}"),
        }
    }
    for good in [1u16, 64, 2048] {
        let config = MsixConfig::new(good, group.clone()).unwrap();
        assert_eq!(config.vector_count(), good);
    }
}

#[test]
fn table_and_pba_sizes() {
    for (vectors, table, pba) in [
        (1u16, 16u64, 8u64),
        (64, 1024, 8),
        (65, 1040, 16),
        (2048, 32768, 256),
    ] {
        let (_, config) = setup(vectors);
        assert_eq!(config.table_size_bytes(), table, "{vectors} vectors");
        assert_eq!(config.pba_size_bytes(), pba, "{vectors} vectors");
    }
}

#[test]
fn reset_state_is_masked_and_zero() {
    let (group, config) = setup(3);
    assert!(!config.enabled());
    assert!(!config.function_masked());
    for v in 0..3 {
        assert_eq!(config.entry(v), Some(MsixTableEntry::default()));
        assert!(config.entry(v).unwrap().masked());
        assert!(config.is_vector_masked(v));
        assert!(!config.pending(v));
    }
    let mut bytes = [0xaau8; 48];
    config.read_table(0, &mut bytes);
    for entry in bytes.chunks(16) {
        assert_eq!(entry, &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0]);
    }
    assert_eq!(config.entry(3), None);
    assert!(config.is_vector_masked(3));
    assert!(!config.pending(3));
    assert!(group.take_events().is_empty());
}

#[test]
fn entry_layout_is_little_endian() {
    let (_, mut config) = setup(2);
    write32(&mut config, off(1, 0), 0xfee0_1004);
    write32(&mut config, off(1, 1), 0x0000_0001);
    write32(&mut config, off(1, 2), 0x1234_5678);
    write32(&mut config, off(1, 3), 0);
    let mut bytes = [0u8; 16];
    config.read_table(off(1, 0), &mut bytes);
    assert_eq!(
        bytes,
        [0x04, 0x10, 0xe0, 0xfe, 1, 0, 0, 0, 0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0]
    );
    let entry = config.entry(1).unwrap();
    assert_eq!(entry.msg_addr_lo, 0xfee0_1004);
    assert_eq!(entry.msg_addr_hi, 1);
    assert_eq!(entry.msg_data, 0x1234_5678);
    assert!(!entry.masked());
    assert_eq!(
        entry.message(),
        MsiMessage {
            address: 0x1_fee0_1004,
            data: 0x1234_5678
        }
    );
    // Entry 0 untouched.
    assert_eq!(config.entry(0), Some(MsixTableEntry::default()));
}

#[test]
fn byte_and_word_accesses() {
    let (_, mut config) = setup(1);
    // Build the data dword one byte at a time, then overwrite a word.
    for (i, b) in [0x11u8, 0x22, 0x33, 0x44].into_iter().enumerate() {
        config.write_table(off(0, 2) + i as u64, &[b]);
    }
    assert_eq!(read32(&config, off(0, 2)), 0x4433_2211);
    config.write_table(off(0, 2) + 2, &0xbeefu16.to_le_bytes());
    assert_eq!(config.entry(0).unwrap().msg_data, 0xbeef_2211);

    let mut byte = [0u8; 1];
    config.read_table(off(0, 2) + 3, &mut byte);
    assert_eq!(byte, [0xbe]);
    let mut word = [0u8; 2];
    config.read_table(off(0, 2) + 1, &mut word);
    assert_eq!(u16::from_le_bytes(word), 0xef22);

    // Byte write to vector control unmasks.
    config.write_table(off(0, 3), &[0]);
    assert!(!config.entry(0).unwrap().masked());
    config.write_table(off(0, 3), &[1]);
    assert!(config.entry(0).unwrap().masked());
}

#[test]
fn qword_accesses_cover_two_dwords() {
    let (group, mut config) = setup(2);
    config.write_table(off(1, 0), &0x0000_0002_fee0_0000u64.to_le_bytes());
    let entry = config.entry(1).unwrap();
    assert_eq!(entry.msg_addr_lo, 0xfee0_0000);
    assert_eq!(entry.msg_addr_hi, 2);
    // One update for the whole 8-byte write, not one per dword.
    assert_eq!(
        group.take_events(),
        vec![updated(1, 0x2_fee0_0000, 0, true)]
    );

    // Data and vector control in one access.
    config.write_table(off(1, 2), &0x0000_0000_0000_0041u64.to_le_bytes());
    let entry = config.entry(1).unwrap();
    assert_eq!(entry.msg_data, 0x41);
    assert!(!entry.masked());
    assert_eq!(
        group.take_events(),
        vec![updated(1, 0x2_fee0_0000, 0x41, true)],
        "still masked: MSI-X disabled"
    );

    let mut data = [0u8; 8];
    config.read_table(off(1, 0), &mut data);
    assert_eq!(u64::from_le_bytes(data), 0x0000_0002_fee0_0000);
    config.read_table(off(1, 2), &mut data);
    assert_eq!(u64::from_le_bytes(data), 0x41);
}

#[test]
fn read_only_bits() {
    let (_, mut config) = setup(1);
    write32(&mut config, off(0, 0), 0xffff_ffff);
    assert_eq!(read32(&config, off(0, 0)), 0xffff_fffc);
    write32(&mut config, off(0, 3), 0xffff_fffe);
    assert_eq!(read32(&config, off(0, 3)), 0);
    write32(&mut config, off(0, 3), 0xffff_ffff);
    assert_eq!(read32(&config, off(0, 3)), 1);
    assert_eq!(config.entry(0).unwrap().vector_ctl, 1);
}

#[test]
fn unaligned_access_straddling_dwords() {
    let (_, mut config) = setup(2);
    // A 4-byte write at byte 14 of entry 0 hits vector control of entry 0
    // and the address of entry 1.
    config.write_table(14, &[0xaa, 0xbb, 0x00, 0x10]);
    assert_eq!(config.entry(0).unwrap().vector_ctl, 1);
    assert_eq!(config.entry(1).unwrap().msg_addr_lo, 0x1000);
    let mut data = [0u8; 4];
    config.read_table(15, &mut data);
    assert_eq!(data, [0, 0x00, 0x10, 0]);
}

#[test]
fn accesses_beyond_the_table() {
    let (group, mut config) = setup(2);
    let end = config.table_size_bytes();
    let before: Vec<_> = (0..2).map(|v| config.entry(v)).collect();

    write32(&mut config, end, 0x1234_5678);
    config.write_table(end + 0x1000, &[0xff; 8]);
    config.write_table(u64::MAX - 3, &[0xff; 8]);
    config.write_table(u64::MAX, &[0xff]);
    assert_eq!(before, (0..2).map(|v| config.entry(v)).collect::<Vec<_>>());
    assert!(group.take_events().is_empty());

    let mut data = [0xaau8; 8];
    config.read_table(end, &mut data);
    assert_eq!(data, [0; 8]);
    data.fill(0xaa);
    config.read_table(u64::MAX - 3, &mut data);
    assert_eq!(data, [0; 8]);

    // An 8-byte write straddling the end writes only the in-table half.
    config.write_table(end - 4, &0xdead_beef_0000_0000u64.to_le_bytes());
    assert!(!config.entry(1).unwrap().masked());
    assert!(
        group.take_events().is_empty(),
        "still effectively masked: MSI-X disabled"
    );
    data.fill(0xaa);
    write32(&mut config, off(1, 3), 1);
    config.read_table(end - 4, &mut data);
    assert_eq!(data, [1, 0, 0, 0, 0, 0, 0, 0]);
}

#[test]
fn pba_is_read_only_and_reads_beyond_are_zero() {
    let (group, mut config) = setup(70);
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    config.trigger(3).unwrap();
    config.trigger(65).unwrap();
    let pba = [read_pba64(&config, 0), read_pba64(&config, 8)];
    assert_eq!(pba, [1 << 3, 1 << 1]);

    config.write_pba(0, &[0; 8]);
    config.write_pba(8, &u64::MAX.to_le_bytes());
    config.write_pba(u64::MAX, &[0xff]);
    assert_eq!([read_pba64(&config, 0), read_pba64(&config, 8)], pba);
    assert!(config.pending(3) && config.pending(65));
    assert!(!config.pending(64));

    assert_eq!(read_pba64(&config, 16), 0);
    assert_eq!(read_pba64(&config, u64::MAX - 1), 0);
    // Straddling the end: the last byte of word 1, then zeros.
    let mut data = [0xaau8; 4];
    config.read_pba(15, &mut data);
    assert_eq!(data, [0; 4]);
    let mut data = [0xaau8; 4];
    config.read_pba(7, &mut data);
    assert_eq!(data, [0, 2, 0, 0]);
    assert!(group.take_triggered().is_empty());
}

#[test]
fn pending_bits_use_64_bit_math() {
    let (group, mut config) = setup(2048);
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    group.take_events();
    for v in [0u16, 31, 32, 63, 64, 2047] {
        config.trigger(v).unwrap();
        assert!(config.pending(v), "vector {v}");
    }
    assert_eq!(
        read_pba64(&config, 0),
        1 | (1 << 31) | (1 << 32) | (1 << 63)
    );
    assert_eq!(read_pba64(&config, 8), 1);
    assert_eq!(read_pba64(&config, 31 * 8), 1 << 63);
    let set = (0..2048).filter(|&v| config.pending(v)).count();
    assert_eq!(set, 6);
    assert!(group.take_triggered().is_empty());

    // Unmasking each delivers exactly that vector and clears only its bit.
    for v in [0u16, 31, 32, 63, 64, 2047] {
        write32(&mut config, off(v, 3), 0);
        assert_eq!(group.take_triggered(), vec![v]);
        assert!(!config.pending(v));
    }
    assert_eq!(read_pba64(&config, 0), 0);
    assert_eq!(read_pba64(&config, 31 * 8), 0);
}

#[test]
fn masked_trigger_pends_and_unmask_fires_once() {
    let (group, mut config) = setup(4);
    program(&mut config, 2, 0xfee0_0000, 0x30, true);
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    group.take_events();

    config.trigger(2).unwrap();
    config.trigger(2).unwrap();
    assert!(config.pending(2));
    assert!(group.take_events().is_empty());

    write32(&mut config, off(2, 3), 0);
    assert_eq!(
        group.take_events(),
        vec![
            updated(2, 0xfee0_0000, 0x30, false),
            InterruptEvent::Triggered(2)
        ],
        "route first, then the pending interrupt, once"
    );
    assert!(!config.pending(2));

    // Unmasked now: triggers go straight through.
    write32(&mut config, off(2, 3), 0);
    assert!(group.take_events().is_empty());
    config.trigger(2).unwrap();
    assert_eq!(group.take_triggered(), vec![2]);
    assert!(!config.pending(2));
}

#[test]
fn function_mask_transitions() {
    let (group, mut config) = setup(4);
    program(&mut config, 0, 0xfee0_0000, 0x20, false);
    program(&mut config, 1, 0xfee0_1000, 0x21, false);
    program(&mut config, 3, 0xfee0_3000, 0x23, true);
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    group.take_events();
    let batches = group.batches();

    config.set_message_control(MSIX_MSG_CTL_ENABLE | MSIX_MSG_CTL_FUNCTION_MASK);
    assert!(config.function_masked());
    assert!(config.is_vector_masked(0));
    assert_eq!(
        group.take_events(),
        vec![
            updated(0, 0xfee0_0000, 0x20, true),
            updated(1, 0xfee0_1000, 0x21, true)
        ],
        "only vectors whose effective mask changed"
    );
    assert_eq!(group.batches(), batches + 1, "both vectors in one batch");

    config.trigger(0).unwrap();
    config.trigger(3).unwrap();
    assert!(config.pending(0) && config.pending(3));
    assert!(group.take_events().is_empty());

    // Same value again: nothing to do.
    config.set_message_control(MSIX_MSG_CTL_ENABLE | MSIX_MSG_CTL_FUNCTION_MASK);
    assert!(group.take_events().is_empty());

    // Routes first, in one batch, then the pending vector fires.
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    assert_eq!(
        group.take_events(),
        vec![
            updated(0, 0xfee0_0000, 0x20, false),
            updated(1, 0xfee0_1000, 0x21, false),
            InterruptEvent::Triggered(0),
        ]
    );
    assert_eq!(group.batches(), batches + 2);
    assert!(!config.pending(0));
    assert!(config.pending(3), "vector 3 is still masked by its own bit");
}

#[test]
fn enable_transitions() {
    let (group, mut config) = setup(3);
    program(&mut config, 1, 0xfee0_0000, 0x41, false);
    assert_eq!(
        group.take_events(),
        vec![
            updated(1, 0xfee0_0000, 0, true),
            updated(1, 0xfee0_0000, 0x41, true)
        ],
        "message changes reach the group even while disabled"
    );
    assert!(config.is_vector_masked(1));

    // Disabled: dropped, not pending.
    config.trigger(1).unwrap();
    assert!(!config.pending(1));
    assert!(group.take_events().is_empty());

    // Enable and function mask at once: still masked, nothing changes.
    config.set_message_control(MSIX_MSG_CTL_ENABLE | MSIX_MSG_CTL_FUNCTION_MASK);
    assert!(config.enabled());
    assert!(group.take_events().is_empty());

    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    assert!(!config.is_vector_masked(1));
    assert!(config.is_vector_masked(0));
    assert_eq!(
        group.take_events(),
        vec![updated(1, 0xfee0_0000, 0x41, false)]
    );
    config.trigger(1).unwrap();
    assert_eq!(group.take_triggered(), vec![1]);

    // Disabling masks it again; the table size bits are ignored.
    config.set_message_control(MSIX_MSG_CTL_TABLE_SIZE);
    assert!(!config.enabled());
    assert_eq!(
        group.take_events(),
        vec![updated(1, 0xfee0_0000, 0x41, true)]
    );
}

#[test]
fn pending_survives_disable_and_fires_on_reenable() {
    let (group, mut config) = setup(1);
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    config.trigger(0).unwrap();
    config.set_message_control(0);
    write32(&mut config, off(0, 3), 0);
    assert!(config.pending(0));
    assert!(group.take_triggered().is_empty());
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    assert_eq!(group.take_triggered(), vec![0]);
    assert!(!config.pending(0));
}

#[test]
fn updates_only_on_change() {
    let (group, mut config) = setup(2);
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    write32(&mut config, off(0, 0), 0xfee0_0000);
    assert_eq!(group.take_events(), vec![updated(0, 0xfee0_0000, 0, true)]);
    write32(&mut config, off(0, 0), 0xfee0_0000);
    write32(&mut config, off(0, 0), 0xfee0_0003); // bits 1:0 are read-only
    write32(&mut config, off(0, 3), 0xffff_ffff); // still masked
    assert!(group.take_events().is_empty());

    write32(&mut config, off(0, 1), 0x1);
    assert_eq!(
        group.take_events(),
        vec![updated(0, 0x1_fee0_0000, 0, true)]
    );
    write32(&mut config, off(0, 2), 0x55);
    assert_eq!(
        group.take_events(),
        vec![updated(0, 0x1_fee0_0000, 0x55, true)]
    );
    write32(&mut config, off(0, 3), 0);
    assert_eq!(
        group.take_events(),
        vec![updated(0, 0x1_fee0_0000, 0x55, false)]
    );
    write32(&mut config, off(0, 3), 0xffff_fffe); // reserved bits only
    write32(&mut config, off(0, 2), 0x55);
    assert!(group.take_events().is_empty());

    // Reads never talk to the group.
    let mut data = [0u8; 32];
    config.read_table(0, &mut data);
    assert!(group.take_events().is_empty());
}

#[test]
fn trigger_invalid_vector() {
    let (group, mut config) = setup(4);
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    assert!(matches!(
        config.trigger(4),
        Err(InterruptError::InvalidVector(4))
    ));
    assert!(matches!(
        config.trigger(u16::MAX),
        Err(InterruptError::InvalidVector(u16::MAX))
    ));
    assert!(group.take_events().is_empty());
}

#[test]
fn group_errors_are_reported_not_fatal() {
    // The group only knows vector 0, so anything about vector 1 fails.
    let group = Arc::new(RecordingInterruptGroup::new(1));
    let mut config = MsixConfig::new(2, group.clone()).unwrap();
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    program(&mut config, 1, 0xfee0_0000, 1, false);
    assert!(!config.is_vector_masked(1));
    assert!(matches!(
        config.trigger(1),
        Err(InterruptError::InvalidVector(1))
    ));
    write32(&mut config, off(1, 3), 1);
    config.trigger(1).unwrap();
    write32(&mut config, off(1, 3), 0); // update and pending trigger both fail
    assert!(!config.pending(1));
    config.reset();
    assert!(group.take_events().is_empty());
}

#[test]
fn reset_restores_power_on_state() {
    let (group, mut config) = setup(3);
    program(&mut config, 0, 0xfee0_0000, 0x20, false);
    program(&mut config, 2, 0xfee0_2000, 0x22, true);
    config.set_message_control(MSIX_MSG_CTL_ENABLE | MSIX_MSG_CTL_FUNCTION_MASK);
    config.trigger(2).unwrap();
    config.set_message_control(MSIX_MSG_CTL_ENABLE);
    group.take_events();
    assert!(config.pending(2));

    config.reset();
    assert!(!config.enabled());
    assert!(!config.function_masked());
    for v in 0..3 {
        assert_eq!(config.entry(v), Some(MsixTableEntry::default()));
        assert!(!config.pending(v));
    }
    assert_eq!(read_pba64(&config, 0), 0);
    assert_eq!(
        group.take_events(),
        vec![updated(0, 0, 0, true), updated(2, 0, 0, true)],
        "vector 1 never changed"
    );
    config.reset();
    assert!(group.take_events().is_empty());
}

#[test]
fn capability_layout() {
    let cap = MsixCapability::new(5, 2, 0x2000, 3, 0x3000);
    assert_eq!(cap.id(), PciCapabilityId::MsiX);
    assert_eq!(cap.body(), vec![4, 0, 0x02, 0x20, 0, 0, 0x03, 0x30, 0, 0]);
    assert_eq!(cap.body().len(), MSIX_CAP_SIZE - 2);
    assert_eq!(cap.writable_mask(), vec![0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(cap.table_size(), 5);
    assert_eq!(cap.message_control(), 4);
    assert_eq!((cap.table_bir(), cap.table_offset()), (2, 0x2000));
    assert_eq!((cap.pba_bir(), cap.pba_offset()), (3, 0x3000));
    // Body offsets are capability offsets minus the 2-byte header.
    let body = cap.body();
    let dword =
        |cap_off: usize| u32::from_le_bytes(body[cap_off - 2..cap_off + 2].try_into().unwrap());
    assert_eq!(dword(MSIX_CAP_TABLE_OFFSET), 0x2002);
    assert_eq!(dword(MSIX_CAP_PBA_OFFSET), 0x3003);
}

#[test]
fn capability_coerces_invalid_parameters() {
    let cap = MsixCapability::new(2048, 0, 0, 0, 0);
    assert_eq!(cap.message_control(), 0x7ff);
    assert_eq!(cap.table_size(), 2048);
    assert_eq!(MsixCapability::new(4096, 0, 0, 0, 0).table_size(), 2048);
    assert_eq!(MsixCapability::new(0, 0, 0, 0, 0).table_size(), 1);
    let cap = MsixCapability::new(1, 9, 0x1004, 0xff, 0x2001);
    assert_eq!((cap.table_bir(), cap.table_offset()), (1, 0x1000));
    assert_eq!((cap.pba_bir(), cap.pba_offset()), (7, 0x2000));
}

#[test]
fn config_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MsixConfig>();
    assert_send_sync::<MsixCapability>();
}

#[test]
fn hostile_accesses_never_panic() {
    let (_, mut config) = setup(3);
    let end = config.table_size_bytes();
    let mut seed = 0x1234_5678_9abc_def0u64;
    for offset in (0..end + 24).chain([u64::MAX - 8, u64::MAX]) {
        for len in 0..=17 {
            // xorshift64: deterministic junk to write.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let data: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            config.write_table(offset, &data);
            config.set_message_control(seed as u16);
            for v in 0..4 {
                let _ = config.trigger(v);
            }
            let mut buf = vec![0u8; len];
            config.read_table(offset, &mut buf);
            config.read_pba(offset, &mut buf);
            config.write_pba(offset, &data);
        }
    }
    for v in 0..3 {
        assert_eq!(config.entry(v).unwrap().vector_ctl & !1, 0);
        assert_eq!(config.entry(v).unwrap().msg_addr_lo & 3, 0);
    }
}
