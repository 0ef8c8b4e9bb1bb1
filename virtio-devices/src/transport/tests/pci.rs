//! Configuration space, capabilities, the BAR regions, interrupts and
//! notifications.

use ::pci::interrupt::InterruptEvent;
use ::pci::{MsiMessage, PciBarRegionType};
use devices::BusDevice;

use super::*;
use crate::VirtioInterruptType;

#[test]
fn identity_registers() {
    let mut h = Harness::new();
    assert_eq!(h.cfg_read(0, 2), 0x1af4);
    assert_eq!(h.cfg_read(2, 2), 0x1041, "0x1040 + net");
    assert_eq!(h.cfg_read(8, 1), 1, "revision");
    assert_eq!(h.cfg_read(0x0b, 1), 0x02, "network controller");
    assert_eq!(h.cfg_read(0x0a, 1), 0x00);
    assert_eq!(h.cfg_read(0x2c, 2), 0x1af4);
    assert_eq!(h.cfg_read(0x2e, 2), 0x40);
    assert_eq!(h.cfg_read(0x3d, 1), 1, "INTA#");
    assert_eq!(h.cfg_read(0x06, 2) & 0x10, 0x10, "capability list");

    for (ty, class, subclass) in [(2, 0x01, 0x00), (3, 0x07, 0x80), (4, 0xff, 0x00)] {
        let mut h = Harness::with_device(MockDevice::new(ty, &[8], 0));
        assert_eq!(h.cfg_read(2, 2), 0x1040 + ty);
        assert_eq!(h.cfg_read(0x0b, 1), class);
        assert_eq!(h.cfg_read(0x0a, 1), subclass);
    }
}

#[test]
fn bar0_is_a_64bit_memory_bar_of_the_advertised_size() {
    let mut h = Harness::new();
    let lo = h.cfg_read(0x10, 4);
    assert_eq!(lo & 0xf, 0x4, "64-bit, not prefetchable, memory");
    assert_eq!(
        u64::from(lo & !0xf) | u64::from(h.cfg_read(0x14, 4)) << 32,
        BAR
    );
    h.cfg_write(0x10, 4, 0xffff_ffff);
    h.cfg_write(0x14, 4, 0xffff_ffff);
    let mask = u64::from(h.cfg_read(0x14, 4)) << 32 | u64::from(h.cfg_read(0x10, 4) & !0xf);
    assert_eq!(!mask + 1, VIRTIO_PCI_BAR_SIZE);
    for reg in (0x18..0x28).step_by(4) {
        assert_eq!(h.cfg_read(reg, 4), 0, "BAR at {reg:#x} unused");
    }
}

#[test]
fn bar_moves_are_reported_and_ioeventfds_follow() {
    let mut h = Harness::new();
    h.cfg_write(0x04, 2, 0x0006);
    let new = BAR + 0x10_0000;
    h.cfg_write(0x10, 4, new as u32);
    let moves = h
        .dev
        .write_config_register(5, 0, &((new >> 32) as u32).to_le_bytes());
    // The lower half alone already moved it (upper half unchanged).
    assert!(moves.is_empty());
    assert_eq!(h.dev.bar_address(), new);
    let fds = h.dev.ioeventfds(new);
    assert_eq!(fds.len(), 3);
    for (i, (addr, _, q)) in fds.iter().enumerate() {
        assert_eq!(*q, i as u16);
        assert_eq!(*addr, new + NOTIFY_OFFSET + 4 * i as u64);
    }
    let params = ::pci::BarReprogrammingParams {
        bar_index: 0,
        old_base: BAR,
        new_base: new,
        len: VIRTIO_PCI_BAR_SIZE,
        region_type: PciBarRegionType::Memory64BitRegion,
    };
    h.dev.restore_bar(&params);
    assert_eq!(h.dev.bar_address(), BAR);
}

#[test]
fn virtio_capabilities_describe_the_bar_layout() {
    let mut h = Harness::new();
    let ids: Vec<u8> = h.caps().iter().map(|(_, id)| *id).collect();
    assert_eq!(ids, vec![9, 9, 9, 9, 9, 0x11]);
    let expect = [
        (VIRTIO_PCI_CAP_COMMON_CFG, 16, COMMON_CONFIG_OFFSET, 0x3c),
        (VIRTIO_PCI_CAP_NOTIFY_CFG, 20, NOTIFY_OFFSET, 12),
        (VIRTIO_PCI_CAP_ISR_CFG, 16, ISR_OFFSET, 1),
        (VIRTIO_PCI_CAP_DEVICE_CFG, 16, DEVICE_CONFIG_OFFSET, 24),
        (VIRTIO_PCI_CAP_PCI_CFG, 20, 0, 0),
    ];
    for (cfg_type, cap_len, offset, length) in expect {
        let cap = h.virtio_cap(cfg_type).expect("capability present");
        assert_eq!(cap % 4, 0);
        assert_eq!(h.cfg_read(cap + 2, 1), cap_len, "cap_len of {cfg_type}");
        assert_eq!(h.cfg_read(cap + 4, 1), 0, "BAR 0");
        assert_eq!(h.cfg_read(cap + 6, 2), 0, "padding");
        assert_eq!(u64::from(h.cfg_read(cap + 8, 4)), offset);
        assert_eq!(u64::from(h.cfg_read(cap + 12, 4)), length);
        // Read-only everywhere except the type 5 window.
        h.cfg_write(cap + 2, 2, 0xffff);
        assert_eq!(h.cfg_read(cap + 2, 1), cap_len);
        assert_eq!(h.cfg_read(cap + 3, 1), u32::from(cfg_type));
    }
    let notify = h.virtio_cap(VIRTIO_PCI_CAP_NOTIFY_CFG).unwrap();
    assert_eq!(h.cfg_read(notify + 16, 4), NOTIFY_OFF_MULTIPLIER);
    h.cfg_write(notify + 8, 4, 0x1234);
    assert_eq!(u64::from(h.cfg_read(notify + 8, 4)), NOTIFY_OFFSET);

    let msix = h.find_cap(0x11).unwrap();
    assert_eq!(h.cfg_read(msix + 2, 2), 3, "table size 4, encoded as 3");
    assert_eq!(u64::from(h.cfg_read(msix + 4, 4)), MSIX_TABLE_OFFSET);
    assert_eq!(u64::from(h.cfg_read(msix + 8, 4)), MSIX_PBA_OFFSET);
}

#[test]
fn rng_has_no_device_config_capability() {
    let mut rng = MockDevice::new(4, &[64], 0);
    rng.config_size = 0;
    let mut h = Harness::with_device(rng);
    assert!(h.virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG).is_none());
    assert!(h.virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG).is_some());
    assert_eq!(h.r32(DEVICE_CONFIG_OFFSET), 0);
}

#[test]
fn pci_cfg_window_reads_and_writes_the_bar() {
    let mut h = Harness::new();
    let cap = h.virtio_cap(VIRTIO_PCI_CAP_PCI_CFG).unwrap();
    // Window writes: bar, offset, length, data are writable; the rest not.
    h.cfg_write(cap + 5, 1, 0x77);
    assert_eq!(h.cfg_read(cap + 5, 1), 0);

    // Read num_queues (2 bytes) through the window.
    h.cfg_write(cap + 8, 4, NUM_QUEUES as u32);
    h.cfg_write(cap + 12, 4, 2);
    assert_eq!(h.cfg_read(cap + 16, 2), 3);

    // Write device_status (1 byte) through it.
    h.cfg_write(cap + 8, 4, DEVICE_STATUS as u32);
    h.cfg_write(cap + 12, 4, 1);
    h.cfg_write(cap + 16, 1, u32::from(DEVICE_ACKNOWLEDGE));
    assert_eq!(h.r8(DEVICE_STATUS), DEVICE_ACKNOWLEDGE);
    assert_eq!(h.cfg_read(cap + 16, 1), u32::from(DEVICE_ACKNOWLEDGE));

    // A 4-byte access to the MSI-X table.
    h.cfg_write(cap + 8, 4, MSIX_TABLE_OFFSET as u32 + 8);
    h.cfg_write(cap + 12, 4, 4);
    h.cfg_write(cap + 16, 4, 0xdead_beef);
    assert_eq!(h.r32(MSIX_TABLE_OFFSET + 8), 0xdead_beef);
    h.w32(MSIX_TABLE_OFFSET + 8, 0x1234);
    assert_eq!(h.cfg_read(cap + 16, 4), 0x1234);
}

#[test]
fn pci_cfg_window_ignores_bad_lengths_offsets_and_bars() {
    let mut h = Harness::new();
    let cap = h.virtio_cap(VIRTIO_PCI_CAP_PCI_CFG).unwrap();
    h.w16(QUEUE_SELECT, 2);
    for (bar, offset, length) in [
        (0, QUEUE_SELECT as u32, 3),
        (0, QUEUE_SELECT as u32, 8),
        (0, QUEUE_SELECT as u32, 0),
        (1, QUEUE_SELECT as u32, 2),
        (0, VIRTIO_PCI_BAR_SIZE as u32 - 1, 2),
        (0, u32::MAX, 4),
    ] {
        h.cfg_write(cap + 4, 1, bar);
        h.cfg_write(cap + 8, 4, offset);
        h.cfg_write(cap + 12, 4, length);
        h.cfg_write(cap + 16, 4, 0);
        let _ = h.cfg_read(cap + 16, 4);
    }
    assert_eq!(h.r16(QUEUE_SELECT), 2);
}

#[test]
fn notify_through_the_pci_cfg_window_signals_the_queue() {
    let mut h = Harness::new();
    h.negotiate(F_VERSION_1);
    h.setup_queue(1, 64, 0x1000);
    let cap = h.virtio_cap(VIRTIO_PCI_CAP_PCI_CFG).unwrap();
    h.cfg_write(cap + 8, 4, NOTIFY_OFFSET as u32 + 4);
    h.cfg_write(cap + 12, 4, 2);
    h.cfg_write(cap + 16, 2, 1);
    let fds = h.dev.ioeventfds(BAR);
    assert_eq!(fds[1].1.read().unwrap(), 1);
}

#[test]
fn mmio_notifications_signal_enabled_queues_only() {
    let mut h = Harness::new();
    h.negotiate(F_VERSION_1);
    h.setup_queue(0, 64, 0x1000);
    h.w16(NOTIFY_OFFSET, 0);
    h.w32(NOTIFY_OFFSET, 0);
    h.w8(NOTIFY_OFFSET + 3, 0);
    h.w16(NOTIFY_OFFSET + 4, 1); // queue 1: not enabled
    h.w16(NOTIFY_OFFSET + 0x100, 64); // no such queue
    h.w64(NOTIFY_OFFSET + NOTIFY_MAX_SIZE - 8, u64::MAX);
    let fds = h.dev.ioeventfds(BAR);
    assert_eq!(fds[0].1.read().unwrap(), 3);
    assert!(fds[1].1.read().is_err(), "nothing pending");
    assert_eq!(h.r32(NOTIFY_OFFSET), 0, "notify region reads zero");
}

#[test]
fn isr_is_read_to_clear_and_drives_intx() {
    let mut h = Harness::new();
    let irq = h.dev.interrupt().clone();
    irq.trigger(VirtioInterruptType::Queue(1)).unwrap();
    assert!(h.intx.asserted());
    assert_eq!(
        h.cfg_read(0x06, 2) & 0x08,
        0x08,
        "status: interrupt pending"
    );
    irq.trigger(VirtioInterruptType::Config).unwrap();
    assert_eq!(h.r8(ISR_OFFSET), ISR_QUEUE | ISR_CONFIG_CHANGED);
    assert!(!h.intx.asserted());
    assert_eq!(h.cfg_read(0x06, 2) & 0x08, 0);
    assert_eq!(h.r8(ISR_OFFSET), 0);
    assert_eq!(*h.intx.changes.lock().unwrap(), vec![true, false]);
    // Wider reads return the ISR in the first byte; writes do nothing.
    irq.trigger(VirtioInterruptType::Queue(0)).unwrap();
    h.w8(ISR_OFFSET, 0);
    assert_eq!(h.r32(ISR_OFFSET), 1);
    assert_eq!(h.r8(ISR_OFFSET + 1), 0);
    // Unknown queues are an error for the device, not a panic.
    assert!(irq.trigger(VirtioInterruptType::Queue(3)).is_err());
}

#[test]
fn intx_respects_the_interrupt_disable_bit() {
    let mut h = Harness::new();
    let irq = h.dev.interrupt().clone();
    h.cfg_write(0x04, 2, 0x0400);
    irq.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert!(!h.intx.asserted());
    assert_eq!(h.cfg_read(0x06, 2) & 0x08, 0x08, "still pending");
    // Re-enabling INTx with the ISR set raises the line.
    h.cfg_write(0x04, 2, 0x0000);
    assert!(h.intx.asserted());
    h.cfg_write(0x04, 2, 0x0400);
    assert!(!h.intx.asserted());
    assert_eq!(h.r8(ISR_OFFSET), 1);
}

#[test]
fn msix_delivers_each_queue_on_its_vector() {
    let mut h = Harness::new();
    h.enable_msix(4);
    let events = h.group.take_events();
    assert!(events.contains(&InterruptEvent::Updated {
        index: 2,
        msg: MsiMessage {
            address: 0xfee0_0020,
            data: 0x42
        },
        masked: false
    }));
    h.w16(MSIX_CONFIG, 3);
    for q in 0..3 {
        h.w16(QUEUE_SELECT, q);
        h.w16(QUEUE_MSIX_VECTOR, 2 - q);
    }
    let irq = h.dev.interrupt().clone();
    irq.trigger(VirtioInterruptType::Queue(0)).unwrap();
    irq.trigger(VirtioInterruptType::Queue(2)).unwrap();
    irq.trigger(VirtioInterruptType::Config).unwrap();
    assert_eq!(h.group.take_triggered(), vec![2, 0, 3]);
    assert!(!h.intx.asserted(), "no INTx while MSI-X is on");

    // NO_VECTOR: nothing at all.
    h.w16(QUEUE_SELECT, 1);
    h.w16(QUEUE_MSIX_VECTOR, VIRTIO_MSI_NO_VECTOR);
    irq.trigger(VirtioInterruptType::Queue(1)).unwrap();
    assert!(h.group.take_triggered().is_empty());
    assert!(!h.intx.asserted());

    // A masked vector is left pending in the PBA and fires on unmask.
    h.w32(MSIX_TABLE_OFFSET + 2 * 16 + 12, 1);
    irq.trigger(VirtioInterruptType::Queue(0)).unwrap();
    assert!(h.group.take_triggered().is_empty());
    assert_eq!(h.r64(MSIX_PBA_OFFSET), 1 << 2);
    h.w32(MSIX_TABLE_OFFSET + 2 * 16 + 12, 0);
    assert_eq!(h.group.take_triggered(), vec![2]);
    assert_eq!(h.r64(MSIX_PBA_OFFSET), 0);
}

#[test]
fn disabling_msix_falls_back_to_intx() {
    let mut h = Harness::new();
    h.enable_msix(4);
    let cap = h.find_cap(0x11).unwrap();
    h.cfg_write(cap + 2, 2, 0x0000);
    h.dev
        .interrupt()
        .trigger(VirtioInterruptType::Queue(0))
        .unwrap();
    assert!(h.intx.asserted());
    // Enabling MSI-X lowers the line.
    h.cfg_write(cap + 2, 2, 0x8000);
    assert!(!h.intx.asserted());
}

#[test]
fn device_config_is_bounded_by_its_capability() {
    let mut h = Harness::new();
    assert_eq!(h.r32(DEVICE_CONFIG_OFFSET), 0x0302_0100);
    assert_eq!(h.r8(DEVICE_CONFIG_OFFSET + 5), 5);
    assert_eq!(h.r64(DEVICE_CONFIG_OFFSET + 8), 0x0f0e_0d0c_0b0a_0908);
    // The mock says 24 bytes; beyond that zeros even if it had more.
    h.state().config = vec![0xaa; 64];
    assert_eq!(h.r32(DEVICE_CONFIG_OFFSET + 20), 0xaaaa_aaaa);
    assert_eq!(h.r64(DEVICE_CONFIG_OFFSET + 20), 0xaaaa_aaaa);
    assert_eq!(h.r32(DEVICE_CONFIG_OFFSET + 24), 0);
    h.w16(DEVICE_CONFIG_OFFSET + 6, 0x55aa);
    h.w64(DEVICE_CONFIG_OFFSET + 20, u64::MAX);
    h.w32(DEVICE_CONFIG_OFFSET + 0x800, 1);
    assert_eq!(
        h.state().config_writes,
        vec![(6, vec![0xaa, 0x55]), (20, vec![0xff; 4])]
    );
}

#[test]
fn hostile_bar_accesses_never_panic() {
    let mut h = Harness::new();
    for offset in [
        0,
        1,
        0x3b,
        0x3f,
        0xfff,
        ISR_OFFSET - 3,
        DEVICE_CONFIG_OFFSET - 1,
        NOTIFY_OFFSET - 1,
        MSIX_TABLE_OFFSET - 2,
        MSIX_PBA_OFFSET - 5,
        MSIX_PBA_OFFSET + MSIX_PBA_MAX_SIZE - 1,
        VIRTIO_PCI_BAR_SIZE - 1,
        VIRTIO_PCI_BAR_SIZE,
        u64::MAX - 3,
        u64::MAX,
    ] {
        for len in [1usize, 2, 3, 4, 8, 16] {
            let mut data = vec![0u8; len];
            h.dev.read_bar(BAR, offset, &mut data);
            h.dev.write_bar(BAR, offset, &vec![0xff; len]);
        }
    }
    // Zero-length accesses too.
    h.dev.read_bar(BAR, 0, &mut []);
    h.dev.write_bar(BAR, 0, &[]);
    assert_eq!(h.r64(MSIX_PBA_OFFSET + MSIX_PBA_MAX_SIZE), 0, "reserved");
}

#[test]
fn hostile_config_space_accesses_never_panic() {
    let mut h = Harness::new();
    for reg in [0usize, 1, 15, 16, 63, 64, 1023, 1024, usize::MAX / 4] {
        let _ = h.dev.read_config_register(reg);
        for offset in [0u64, 1, 3, 4, u64::MAX] {
            h.dev.write_config_register(reg, offset, &[0xff; 4]);
            h.dev.write_config_register(reg, offset, &[]);
        }
    }
}

#[test]
fn the_bar_is_a_bus_device() {
    let mut h = Harness::new();
    let mut data = [0u8; 2];
    BusDevice::read(&mut h.dev, BAR, NUM_QUEUES, &mut data);
    assert_eq!(u16::from_le_bytes(data), 3);
    BusDevice::write(&mut h.dev, BAR, QUEUE_SELECT, &2u16.to_le_bytes());
    assert_eq!(h.r16(QUEUE_SELECT), 2);
}

#[test]
fn construction_rejects_bad_devices() {
    let group = Arc::new(RecordingInterruptGroup::new(4));
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let build = |device: MockDevice, bar: u64| {
        VirtioPciDevice::new(
            "bad".into(),
            Arc::new(Mutex::new(device)),
            GuestMemoryAtomic::new(mem.clone()),
            group.clone(),
            None,
            bar,
        )
    };
    assert!(matches!(
        build(MockDevice::new(1, &[100], 0), BAR),
        Err(VirtioPciError::InvalidQueueSize {
            index: 0,
            size: 100
        })
    ));
    assert!(matches!(
        build(MockDevice::new(1, &[0], 0), BAR),
        Err(VirtioPciError::InvalidQueueSize { .. })
    ));
    assert!(matches!(
        build(MockDevice::new(1, &vec![8; MAX_QUEUES + 1], 0), BAR),
        Err(VirtioPciError::TooManyQueues(_))
    ));
    assert!(matches!(
        build(MockDevice::new(0x1_0000, &[8], 0), BAR),
        Err(VirtioPciError::InvalidDeviceType(_))
    ));
    let mut huge = MockDevice::new(1, &[8], 0);
    huge.config_size = DEVICE_CONFIG_MAX_SIZE as usize + 1;
    assert!(matches!(
        build(huge, BAR),
        Err(VirtioPciError::ConfigSpaceTooLarge(_))
    ));
    assert!(matches!(
        build(MockDevice::new(1, &[8], 0), BAR + 0x1000),
        Err(VirtioPciError::Pci(_))
    ));
    // Without INTx the pin reads 0.
    let mut dev = build(MockDevice::new(1, &[8], 0), BAR).unwrap();
    assert_eq!((dev.read_config_register(15) >> 8) & 0xff, 0);
    assert_eq!(msix_vector_count(&MockDevice::new(1, &[8; 5], 0)), 6);
    assert_eq!(dev.msix_vectors(), 2);
    assert_eq!(dev.id(), "bad");
}
