//! The common configuration structure, field by field, and the device
//! lifecycle behind it.

use super::*;
use crate::{VirtioInterruptType, DEVICE_FAILED, DEVICE_NEEDS_RESET};

#[test]
fn device_features_are_windowed_and_include_version_1() {
    let mut h = Harness::new();
    h.w32(DEVICE_FEATURE_SELECT, 0);
    assert_eq!(h.r32(DEVICE_FEATURE), (1 << 5 | F_EVENT_IDX) as u32);
    h.w32(DEVICE_FEATURE_SELECT, 1);
    assert_eq!(h.r32(DEVICE_FEATURE), 1, "VIRTIO_F_VERSION_1");
    assert_eq!(h.r32(DEVICE_FEATURE_SELECT), 1);
    for select in [2, 3, 0xffff_ffff] {
        h.w32(DEVICE_FEATURE_SELECT, select);
        assert_eq!(h.r32(DEVICE_FEATURE), 0, "select {select}");
    }
    // Read-only.
    h.w32(DEVICE_FEATURE_SELECT, 0);
    h.w32(DEVICE_FEATURE, 0);
    assert_eq!(h.r32(DEVICE_FEATURE), (1 << 5 | F_EVENT_IDX) as u32);
}

#[test]
fn unsupported_transport_features_are_masked_and_ring_reset_follows_the_device() {
    let mut device = MockDevice::new(1, &[64], F_ACCESS_PLATFORM | F_RING_RESET | 1);
    device.queue_reset = false;
    let mut h = Harness::with_device(device);
    h.w32(DEVICE_FEATURE_SELECT, 1);
    assert_eq!(h.r32(DEVICE_FEATURE), 1, "only VERSION_1 in the upper half");

    let mut device = MockDevice::new(1, &[64], 1);
    device.queue_reset = true;
    let mut h = Harness::with_device(device);
    h.w32(DEVICE_FEATURE_SELECT, 1);
    assert_eq!(h.r32(DEVICE_FEATURE), 1 | (1 << 8));
}

#[test]
fn only_known_transport_features_pass_through() {
    let legacy = 1 << 24 | 1 << 27 | 1 << 30;
    let ring = 1 << 28 | F_EVENT_IDX | 1 << 35 | 1 << 36;
    let reserved = 1 << 34 | 1 << 37 | 1 << 38 | 1 << 39 | 1 << 41 | 1 << 45 | 1 << 49;
    let device_bits = 0x00ff_ffff | 1 << 50 | 1 << 63;
    let mut h = Harness::with_device(MockDevice::new(
        1,
        &[64],
        legacy | ring | reserved | device_bits,
    ));
    let offered = u64::from(h.r32(DEVICE_FEATURE)) | {
        h.w32(DEVICE_FEATURE_SELECT, 1);
        u64::from(h.r32(DEVICE_FEATURE)) << 32
    };
    assert_eq!(offered, ring | device_bits | F_VERSION_1);
}

#[test]
fn driver_features_are_written_in_halves_and_read_back() {
    let mut h = Harness::new();
    h.w32(DRIVER_FEATURE_SELECT, 0);
    h.w32(DRIVER_FEATURE, 0x20);
    h.w32(DRIVER_FEATURE_SELECT, 1);
    h.w32(DRIVER_FEATURE, 1);
    assert_eq!(h.r32(DRIVER_FEATURE), 1);
    h.w32(DRIVER_FEATURE_SELECT, 0);
    assert_eq!(h.r32(DRIVER_FEATURE), 0x20);
    assert_eq!(h.dev.driver_features(), F_VERSION_1 | 0x20);
    // Selects past 1 read zero and drop writes.
    h.w32(DRIVER_FEATURE_SELECT, 2);
    h.w32(DRIVER_FEATURE, 0xffff_ffff);
    assert_eq!(h.r32(DRIVER_FEATURE), 0);
    assert_eq!(h.dev.driver_features(), F_VERSION_1 | 0x20);
}

#[test]
fn features_ok_is_accepted_and_acked_to_the_device() {
    let mut h = Harness::new();
    let status = h.negotiate(F_VERSION_1 | F_EVENT_IDX);
    assert_eq!(
        status,
        DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK
    );
    assert_eq!(h.state().acked, vec![F_VERSION_1 | F_EVENT_IDX]);
    // Frozen afterwards.
    h.w32(DRIVER_FEATURE_SELECT, 0);
    h.w32(DRIVER_FEATURE, 0);
    assert_eq!(h.dev.driver_features(), F_VERSION_1 | F_EVENT_IDX);
}

#[test]
fn features_ok_is_refused_for_unoffered_features_or_without_version_1() {
    let mut h = Harness::new();
    let status = h.negotiate(F_VERSION_1 | F_ACCESS_PLATFORM);
    assert_eq!(status, DEVICE_ACKNOWLEDGE | DEVICE_DRIVER, "not latched");
    assert!(h.state().acked.is_empty());
    // DRIVER_OK cannot follow either.
    h.w8(DEVICE_STATUS, 0x0f);
    assert_eq!(h.r8(DEVICE_STATUS), DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    assert!(h.state().interrupt.is_none());

    let mut h = Harness::new();
    let status = h.negotiate(F_EVENT_IDX);
    assert_eq!(status, DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    // The driver may retry with a correct set.
    let status = h.negotiate(F_VERSION_1);
    assert_eq!(status & DEVICE_FEATURES_OK, DEVICE_FEATURES_OK);
}

#[test]
fn status_bits_follow_the_initialization_order_and_cannot_be_cleared() {
    let mut h = Harness::new();
    h.w8(DEVICE_STATUS, DEVICE_DRIVER);
    assert_eq!(h.r8(DEVICE_STATUS), 0, "DRIVER before ACKNOWLEDGE");
    h.w8(DEVICE_STATUS, DEVICE_ACKNOWLEDGE | DEVICE_FEATURES_OK);
    assert_eq!(h.r8(DEVICE_STATUS), DEVICE_ACKNOWLEDGE, "FEATURES_OK early");
    h.w8(
        DEVICE_STATUS,
        DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_NEEDS_RESET,
    );
    assert_eq!(h.r8(DEVICE_STATUS), DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
    h.w8(DEVICE_STATUS, DEVICE_DRIVER);
    assert_eq!(
        h.r8(DEVICE_STATUS),
        DEVICE_ACKNOWLEDGE | DEVICE_DRIVER,
        "bits only go away with a reset"
    );
    h.w8(
        DEVICE_STATUS,
        DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FAILED,
    );
    assert_eq!(h.r8(DEVICE_STATUS) & DEVICE_FAILED, DEVICE_FAILED);
}

#[test]
fn all_status_bits_in_one_write_activate() {
    let mut h = Harness::new();
    h.w32(DRIVER_FEATURE_SELECT, 1);
    h.w32(DRIVER_FEATURE, 1);
    h.setup_queue(0, 256, 0x1000);
    h.w8(DEVICE_STATUS, 0x0f);
    assert_eq!(h.r8(DEVICE_STATUS), 0x0f);
    assert_eq!(h.state().activated.len(), 1);
}

#[test]
fn reset_reads_back_zero_and_clears_everything() {
    let mut h = Harness::new();
    h.enable_msix(4);
    h.w16(MSIX_CONFIG, 3);
    h.negotiate(F_VERSION_1 | F_EVENT_IDX);
    h.setup_queue(0, 128, 0x1000);
    h.w16(QUEUE_MSIX_VECTOR, 1);
    h.driver_ok();
    assert_eq!(h.state().resets, 0);
    h.dev
        .interrupt()
        .trigger(VirtioInterruptType::Queue(0))
        .unwrap();
    assert_ne!(h.dev.interrupt().isr(), 0);

    h.w8(DEVICE_STATUS, 0);
    assert_eq!(h.r8(DEVICE_STATUS), 0);
    assert_eq!(h.state().resets, 1);
    assert!(h.state().interrupt.is_none(), "worker stopped");
    assert_eq!(h.dev.driver_features(), 0);
    assert_eq!(h.r16(MSIX_CONFIG), VIRTIO_MSI_NO_VECTOR);
    assert_eq!(h.r16(QUEUE_SELECT), 0);
    assert_eq!(h.r16(QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
    assert_eq!(h.r16(QUEUE_ENABLE), 0);
    assert_eq!(h.r16(QUEUE_SIZE), 256, "back to the maximum");
    assert_eq!(h.r64(QUEUE_DESC), 0);
    assert_eq!(h.dev.interrupt().isr(), 0);
    // MSI-X itself is PCI state and survives a virtio reset.
    assert!(h.dev.msix_config().lock().unwrap().enabled());

    // And the device starts again.
    h.negotiate(F_VERSION_1);
    h.setup_queue(1, 64, 0x8000);
    h.driver_ok();
    assert_eq!(h.r8(DEVICE_STATUS), 0x0f);
    assert_eq!(h.state().activated[0].0, 1);
}

#[test]
fn msix_vectors_out_of_range_read_no_vector() {
    let mut h = Harness::new();
    // Three queues: four vectors, 0..=3.
    assert_eq!(h.dev.msix_vectors(), 4);
    assert_eq!(h.r16(MSIX_CONFIG), VIRTIO_MSI_NO_VECTOR);
    h.w16(MSIX_CONFIG, 3);
    assert_eq!(h.r16(MSIX_CONFIG), 3);
    h.w16(MSIX_CONFIG, 4);
    assert_eq!(h.r16(MSIX_CONFIG), VIRTIO_MSI_NO_VECTOR);
    h.w16(QUEUE_SELECT, 2);
    h.w16(QUEUE_MSIX_VECTOR, 0);
    assert_eq!(h.r16(QUEUE_MSIX_VECTOR), 0);
    h.w16(QUEUE_MSIX_VECTOR, 0x7ff);
    assert_eq!(h.r16(QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
    h.w16(QUEUE_MSIX_VECTOR, 2);
    h.w16(QUEUE_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);
    assert_eq!(h.r16(QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
}

#[test]
fn num_queues_and_notify_off_are_read_only() {
    let mut h = Harness::new();
    assert_eq!(h.r16(NUM_QUEUES), 3);
    h.w16(NUM_QUEUES, 9);
    assert_eq!(h.r16(NUM_QUEUES), 3);
    for q in 0..3 {
        h.w16(QUEUE_SELECT, q);
        assert_eq!(h.r16(QUEUE_NOTIFY_OFF), q);
        h.w16(QUEUE_NOTIFY_OFF, 7);
        assert_eq!(h.r16(QUEUE_NOTIFY_OFF), q);
        assert_eq!(h.r16(QUEUE_NOTIF_CONFIG_DATA), 0);
    }
}

#[test]
fn out_of_range_queue_select_reads_zero_and_ignores_writes() {
    let mut h = Harness::new();
    h.w16(QUEUE_SELECT, 3);
    assert_eq!(h.r16(QUEUE_SELECT), 3);
    for (off, len) in [
        (QUEUE_SIZE, 2),
        (QUEUE_MSIX_VECTOR, 2),
        (QUEUE_ENABLE, 2),
        (QUEUE_NOTIFY_OFF, 2),
        (QUEUE_DESC, 8),
        (QUEUE_DRIVER, 8),
        (QUEUE_DEVICE, 8),
        (QUEUE_RESET, 2),
    ] {
        h.write(off, len, 0x1000);
        assert_eq!(h.read(off, len), 0, "offset {off:#x}");
    }
    h.w16(QUEUE_ENABLE, 1);
    h.w16(QUEUE_SELECT, 0xffff);
    h.w16(QUEUE_ENABLE, 1);
    assert_eq!(h.r16(QUEUE_SIZE), 0);
}

#[test]
fn queue_size_accepts_powers_of_two_up_to_the_maximum() {
    let mut h = Harness::new();
    h.w16(QUEUE_SELECT, 2);
    assert_eq!(h.r16(QUEUE_SIZE), 16);
    h.w16(QUEUE_SIZE, 8);
    assert_eq!(h.r16(QUEUE_SIZE), 8);
    for bad in [0, 3, 12, 32, 0x8000, 0xffff] {
        h.w16(QUEUE_SIZE, bad);
        assert_eq!(h.r16(QUEUE_SIZE), 8, "size {bad} ignored");
    }
}

#[test]
fn queue_addresses_work_as_qwords_and_dword_halves() {
    let mut h = Harness::new();
    h.w16(QUEUE_SELECT, 1);
    h.w64(QUEUE_DESC, 0x1234_5678_9abc_def0);
    assert_eq!(h.r64(QUEUE_DESC), 0x1234_5678_9abc_def0);
    assert_eq!(h.r32(QUEUE_DESC), 0x9abc_def0);
    assert_eq!(h.r32(QUEUE_DESC + 4), 0x1234_5678);

    h.w32(QUEUE_DRIVER, 0xaaaa_0002);
    h.w32(QUEUE_DRIVER + 4, 0x5);
    assert_eq!(h.r64(QUEUE_DRIVER), 0x5_aaaa_0002);
    h.w32(QUEUE_DEVICE + 4, 0x7);
    h.w32(QUEUE_DEVICE, 0x4000);
    assert_eq!(h.r64(QUEUE_DEVICE), 0x7_0000_4000);
    assert_eq!(h.r32(QUEUE_DEVICE + 4), 7);

    // Misaligned rings are refused, keeping the old value.
    h.w64(QUEUE_DESC, 0x1008);
    assert_eq!(h.r64(QUEUE_DESC), 0x1234_5678_9abc_def0);
    h.w64(QUEUE_DRIVER, 0x1001);
    assert_eq!(h.r64(QUEUE_DRIVER), 0x5_aaaa_0002);
    h.w64(QUEUE_DEVICE, 0x1002);
    assert_eq!(h.r64(QUEUE_DEVICE), 0x7_0000_4000);
}

#[test]
fn queue_enable_validates_and_freezes_the_configuration() {
    let mut h = Harness::new();
    // Rings outside guest memory: refused.
    h.w16(QUEUE_SELECT, 0);
    h.w64(QUEUE_DESC, MEM_SIZE as u64 - 0x800);
    h.w16(QUEUE_ENABLE, 1);
    assert_eq!(h.r16(QUEUE_ENABLE), 0);

    h.setup_queue(0, 64, 0x2000);
    assert_eq!(h.r16(QUEUE_ENABLE), 1);
    let (desc, avail, used) = rings(64, 0x2000);
    h.w16(QUEUE_SIZE, 32);
    h.w64(QUEUE_DESC, 0x8000);
    h.w32(QUEUE_DRIVER, 0x8000);
    h.w32(QUEUE_DEVICE + 4, 1);
    assert_eq!(h.r16(QUEUE_SIZE), 64);
    assert_eq!(h.r64(QUEUE_DESC), desc);
    assert_eq!(h.r64(QUEUE_DRIVER), avail);
    assert_eq!(h.r64(QUEUE_DEVICE), used);
    // 0 is not a way to disable a queue.
    h.w16(QUEUE_ENABLE, 0);
    assert_eq!(h.r16(QUEUE_ENABLE), 1);
}

#[test]
fn driver_ok_activates_the_enabled_queues_with_event_idx() {
    let mut h = Harness::new();
    h.negotiate(F_VERSION_1 | F_EVENT_IDX);
    h.setup_queue(0, 128, 0x1000);
    h.setup_queue(2, 16, 0x9000);
    h.driver_ok();
    assert_eq!(h.r8(DEVICE_STATUS), 0x0f);
    let state = h.state();
    let (d0, a0, u0) = rings(128, 0x1000);
    let (d2, a2, u2) = rings(16, 0x9000);
    assert_eq!(
        state.activated,
        vec![(0, 128, d0, a0, u0, true), (2, 16, d2, a2, u2, true)]
    );
}

#[test]
fn failed_activation_sets_needs_reset_and_raises_a_config_interrupt() {
    let mut h = Harness::new();
    h.state().fail_activate = true;
    h.enable_msix(4);
    h.w16(MSIX_CONFIG, 3);
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 64, 0x1000);
    h.group.take_events();
    h.driver_ok();
    let status = h.r8(DEVICE_STATUS);
    assert_eq!(status & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);
    assert_eq!(h.group.take_triggered(), vec![3]);
    h.w8(DEVICE_STATUS, 0);
    assert_eq!(h.r8(DEVICE_STATUS), 0);
}

#[test]
fn a_device_asking_for_a_reset_shows_needs_reset_until_the_reset() {
    let mut h = Harness::new();
    h.enable_msix(4);
    h.w16(MSIX_CONFIG, 3);
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 64, 0x1000);
    h.driver_ok();
    h.group.take_events();
    let interrupt = h.state().interrupt.clone().expect("device activated");
    // Asked twice (e.g. by two broken queues): one configuration interrupt.
    interrupt.set_needs_reset();
    interrupt.set_needs_reset();
    assert_eq!(h.r8(DEVICE_STATUS), 0x0f | DEVICE_NEEDS_RESET);
    assert_eq!(h.group.take_triggered(), vec![3]);
    h.w8(DEVICE_STATUS, 0);
    assert_eq!(h.r8(DEVICE_STATUS), 0);
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 64, 0x1000);
    h.driver_ok();
    assert_eq!(h.r8(DEVICE_STATUS), 0x0f);
}

#[test]
fn sixteen_bit_fields_take_byte_accesses() {
    let mut h = Harness::new();
    h.w8(QUEUE_SELECT, 2);
    assert_eq!(h.r16(QUEUE_SELECT), 2);
    h.w8(QUEUE_SELECT + 1, 1);
    assert_eq!(h.r16(QUEUE_SELECT), 0x102);
    assert_eq!(h.r8(QUEUE_SELECT + 1), 1);
    h.w8(QUEUE_SELECT + 1, 0);
    // Low byte of the maximum size 16, high byte 0.
    assert_eq!(h.r8(QUEUE_SIZE), 16);
    assert_eq!(h.r8(QUEUE_SIZE + 1), 0);
    h.w8(QUEUE_SIZE, 4);
    assert_eq!(h.r16(QUEUE_SIZE), 4);
    h.w8(MSIX_CONFIG, 1);
    h.w8(MSIX_CONFIG + 1, 0);
    assert_eq!(
        h.r16(MSIX_CONFIG),
        VIRTIO_MSI_NO_VECTOR,
        "0xff01 is out of range"
    );
    h.w16(MSIX_CONFIG, 2);
    assert_eq!(h.r8(MSIX_CONFIG), 2);
    assert_eq!(h.r8(NUM_QUEUES), 3);
}

#[test]
fn wide_and_straddling_accesses_cover_each_field() {
    let mut h = Harness::new();
    // One qword over device_status, config_generation, queue_select and
    // queue_size: each field takes its bytes.
    h.w64(DEVICE_STATUS, 0x0000_0008_0001_0001);
    assert_eq!(h.r8(DEVICE_STATUS), DEVICE_ACKNOWLEDGE);
    assert_eq!(h.r16(QUEUE_SELECT), 1);
    assert_eq!(h.r16(QUEUE_SIZE), 8);
    let qword = h.r64(DEVICE_STATUS);
    assert_eq!(qword & 0xff, 1);
    assert_eq!((qword >> 16) & 0xffff, 1);
    // Past the end of the structure.
    h.w32(COMMON_CONFIG_SIZE, 0xffff_ffff);
    assert_eq!(h.r32(COMMON_CONFIG_SIZE), 0);
    assert_eq!(h.r64(0xff8), 0);
    h.w64(0xffc, u64::MAX);
    assert_eq!(h.r16(QUEUE_RESET), 0);
}

#[test]
fn config_generation_follows_device_and_driver_changes() {
    let mut h = Harness::new();
    let g0 = h.r8(CONFIG_GENERATION);
    h.w8(CONFIG_GENERATION, g0.wrapping_add(5));
    assert_eq!(h.r8(CONFIG_GENERATION), g0, "read-only");
    h.state().generation += 1;
    let g1 = h.r8(CONFIG_GENERATION);
    assert_ne!(g1, g0);
    h.dev
        .interrupt()
        .trigger(VirtioInterruptType::Config)
        .unwrap();
    let g2 = h.r8(CONFIG_GENERATION);
    assert_ne!(g2, g1);
    h.w8(DEVICE_CONFIG_OFFSET, 1);
    assert_ne!(h.r8(CONFIG_GENERATION), g2);
}

fn ring_reset_harness() -> Harness {
    let mut device = MockDevice::new(1, &[64, 64], 0);
    device.queue_reset = true;
    let mut h = Harness::with_device(device);
    h.enable_msix(3);
    h.negotiate(F_VERSION_1 | F_RING_RESET);
    h.setup_queue(0, 64, 0x1000);
    h.w16(QUEUE_MSIX_VECTOR, 0);
    h.setup_queue(1, 64, 0x4000);
    h.w16(QUEUE_MSIX_VECTOR, 1);
    h.driver_ok();
    h
}

#[test]
fn queue_reset_returns_the_queue_and_it_can_be_set_up_again() {
    let mut h = ring_reset_harness();
    h.w16(QUEUE_SELECT, 1);
    h.w16(QUEUE_RESET, 1);
    assert_eq!(h.r16(QUEUE_RESET), 0, "reset is complete");
    assert_eq!(h.state().queue_resets, vec![1]);
    assert_eq!(h.r16(QUEUE_ENABLE), 0);
    assert_eq!(h.r16(QUEUE_SIZE), 64);
    assert_eq!(h.r64(QUEUE_DESC), 0);
    assert_eq!(h.r16(QUEUE_MSIX_VECTOR), VIRTIO_MSI_NO_VECTOR);
    assert_eq!(h.state().queues.len(), 1, "queue 0 still runs");
    assert_eq!(h.r8(DEVICE_STATUS), 0x0f);

    h.setup_queue(1, 32, 0x8000);
    h.w16(QUEUE_MSIX_VECTOR, 1);
    assert_eq!(h.r16(QUEUE_ENABLE), 1);
    assert_eq!(h.state().reenabled, vec![1]);
    let state = h.state();
    let q = state.queues.iter().find(|q| q.index == 1).unwrap();
    assert_eq!(q.queue.size(), 32);
    assert_eq!(q.queue.desc_table(), 0x8000);
}

#[test]
fn queue_reset_is_ignored_without_the_feature() {
    let mut h = Harness::new();
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 64, 0x1000);
    h.driver_ok();
    h.w16(QUEUE_RESET, 1);
    assert!(h.state().queue_resets.is_empty());
    assert_eq!(h.r16(QUEUE_ENABLE), 1);
}

#[test]
fn refused_queue_restart_sets_needs_reset() {
    let mut h = ring_reset_harness();
    h.w16(QUEUE_SELECT, 0);
    h.w16(QUEUE_RESET, 1);
    h.state().fail_enable_queue = true;
    h.setup_queue(0, 64, 0x1000);
    assert_eq!(h.r16(QUEUE_ENABLE), 0);
    assert_eq!(h.r8(DEVICE_STATUS) & DEVICE_NEEDS_RESET, DEVICE_NEEDS_RESET);
}

#[test]
fn enabling_a_new_queue_after_driver_ok_needs_the_device_to_agree() {
    let mut h = Harness::new();
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 64, 0x1000);
    h.driver_ok();
    // The mock accepts late queues through enable_queue.
    h.setup_queue(1, 64, 0x4000);
    assert_eq!(h.state().reenabled, vec![1]);
}
