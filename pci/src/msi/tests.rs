use std::sync::Arc;

use super::*;
use crate::interrupt::{InterruptEvent, RecordingInterruptGroup};

/// The capability bytes in configuration space, with the header, plus the
/// writable mask the configuration space applies to guest writes.
struct ConfigSpace {
    bytes: Vec<u8>,
    mask: Vec<u8>,
}

impl ConfigSpace {
    fn new(cap: &MsiCapability) -> Self {
        let mut bytes = vec![PciCapabilityId::Msi as u8, 0];
        bytes.extend(cap.body());
        let mut mask = vec![0, 0];
        mask.extend(cap.writable_mask());
        ConfigSpace { bytes, mask }
    }

    /// A guest write at capability offset `offset`, through the mask.
    fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &b) in data.iter().enumerate() {
            let m = self.mask[offset + i];
            let old = &mut self.bytes[offset + i];
            *old = (*old & !m) | (b & m);
        }
    }

    fn read_u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes[offset..offset + 4].try_into().unwrap())
    }
}

struct Fixture {
    group: Arc<RecordingInterruptGroup>,
    config: MsiConfig,
    space: ConfigSpace,
}

impl Fixture {
    fn new(vectors_log2: u8, is_64bit: bool, per_vector_mask: bool) -> Self {
        let group = Arc::new(RecordingInterruptGroup::new(1 << vectors_log2));
        let config =
            MsiConfig::new(vectors_log2, is_64bit, per_vector_mask, group.clone()).unwrap();
        let space = ConfigSpace::new(&config.capability());
        Fixture {
            group,
            config,
            space,
        }
    }

    /// A guest write followed by the device notifying the config.
    fn write(&mut self, offset: usize, data: &[u8]) {
        self.space.write(offset, data);
        self.config.update_from_config(&self.space.bytes);
    }

    fn layout(&self) -> MsiLayout {
        self.config.layout()
    }

    fn set_ctl(&mut self, enable: bool, mme: u16) {
        let ctl = u16::from(enable) | (mme << MSI_CTL_MME_SHIFT);
        self.write(2, &ctl.to_le_bytes());
    }

    fn set_address(&mut self, address: u64) {
        self.write(4, &(address as u32).to_le_bytes());
        if let Some(hi) = self.layout().address_hi {
            self.write(hi, &((address >> 32) as u32).to_le_bytes());
        }
    }

    fn set_data(&mut self, data: u16) {
        let offset = self.layout().data;
        self.write(offset, &data.to_le_bytes());
    }

    fn set_mask(&mut self, mask: u32) {
        let offset = self.layout().mask_bits.unwrap();
        self.write(offset, &mask.to_le_bytes());
    }
}

fn updated(index: u16, address: u64, data: u32, masked: bool) -> InterruptEvent {
    InterruptEvent::Updated {
        index,
        msg: MsiMessage { address, data },
        masked,
    }
}

#[test]
fn layouts_of_the_four_variants() {
    let cases = [
        (false, false, None, 8, None, None, 10),
        (true, false, Some(8), 12, None, None, 14),
        (false, true, None, 8, Some(12), Some(16), 20),
        (true, true, Some(8), 12, Some(16), Some(20), 24),
    ];
    for (is_64bit, pvm, hi, data, mask, pending, size) in cases {
        let layout = MsiLayout::new(is_64bit, pvm);
        assert_eq!(layout.message_control, 2);
        assert_eq!(layout.address_lo, 4);
        assert_eq!(layout.address_hi, hi);
        assert_eq!(layout.data, data);
        assert_eq!(layout.mask_bits, mask);
        assert_eq!(layout.pending_bits, pending);
        assert_eq!(layout.size, size);
        let cap = MsiCapability::new(3, is_64bit, pvm);
        assert_eq!(cap.layout(), layout);
        assert_eq!(cap.id(), PciCapabilityId::Msi);
        assert_eq!(cap.body().len(), size - 2);
        assert_eq!(cap.writable_mask().len(), size - 2);
    }
}

#[test]
fn capability_body_and_mask_bytes() {
    // 64-bit, masking, 8 vectors: MMC = 3.
    let cap = MsiCapability::new(3, true, true);
    assert_eq!(cap.capable_vectors(), 8);
    assert_eq!(cap.message_control(), (3 << 1) | (1 << 7) | (1 << 8));
    let mut body = vec![0x86, 0x01];
    body.resize(22, 0);
    assert_eq!(cap.body(), body);
    #[rustfmt::skip]
    let mask = vec![
        0x71, 0x00,             // control: enable, multiple message enable
        0xfc, 0xff, 0xff, 0xff, // address
        0xff, 0xff, 0xff, 0xff, // upper address
        0xff, 0xff, 0x00, 0x00, // data, reserved
        0xff, 0x00, 0x00, 0x00, // mask bits: 8 vectors
        0x00, 0x00, 0x00, 0x00, // pending bits
    ];
    assert_eq!(cap.writable_mask(), mask);

    // 32-bit, no masking, 1 vector.
    let cap = MsiCapability::new(0, false, false);
    assert_eq!(cap.body(), vec![0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(
        cap.writable_mask(),
        vec![0x71, 0, 0xfc, 0xff, 0xff, 0xff, 0xff, 0xff]
    );

    // Mask bits writable for exactly the capable vectors.
    let mask_bits = |log2: u8| {
        let cap = MsiCapability::new(log2, false, true);
        let m = cap.writable_mask();
        u32::from_le_bytes(m[10..14].try_into().unwrap())
    };
    assert_eq!(mask_bits(0), 1);
    assert_eq!(mask_bits(4), 0xffff);
    assert_eq!(mask_bits(5), u32::MAX);
}

#[test]
fn vector_count_bounds() {
    assert_eq!(MsiCapability::new(6, false, false).capable_vectors(), 32);
    assert_eq!(MsiCapability::new(u8::MAX, false, false).vectors_log2(), 5);
    let group = Arc::new(RecordingInterruptGroup::new(32));
    for (log2, count) in [(6u8, 64usize), (200, usize::MAX)] {
        match MsiConfig::new(log2, false, false, group.clone()) {
            Err(PciError::InvalidMsiVectorCount(n)) => assert_eq!(n, count),
            other => panic!("2^{log2} vectors: unexpected {other:?}"),
        }
    }
    for log2 in 0..=5 {
        let config = MsiConfig::new(log2, true, true, group.clone()).unwrap();
        assert_eq!(config.capability().capable_vectors(), 1 << log2);
        assert_eq!(config.num_enabled_vectors(), 0);
    }
}

#[test]
fn enable_and_disable_update_routes() {
    let mut f = Fixture::new(0, false, false);
    f.set_address(0xfee0_1000);
    f.set_data(0x4031);
    assert!(
        f.group.take_events().is_empty(),
        "disabled: nothing to route"
    );
    assert!(!f.config.enabled());
    assert!(f.config.is_vector_masked(0));
    f.config.trigger(0).unwrap();
    assert!(f.group.take_events().is_empty(), "dropped while disabled");

    f.set_ctl(true, 0);
    assert!(f.config.enabled());
    assert_eq!(f.config.num_enabled_vectors(), 1);
    assert_eq!(
        f.group.take_events(),
        vec![updated(0, 0xfee0_1000, 0x4031, false)]
    );
    f.config.trigger(0).unwrap();
    assert_eq!(f.group.take_triggered(), vec![0]);

    // Rewriting the same bytes changes nothing.
    f.set_ctl(true, 0);
    f.set_data(0x4031);
    assert!(f.group.take_events().is_empty());

    f.set_data(0x4032);
    assert_eq!(
        f.group.take_events(),
        vec![updated(0, 0xfee0_1000, 0x4032, false)]
    );

    f.set_ctl(false, 0);
    assert_eq!(f.config.num_enabled_vectors(), 0);
    assert_eq!(f.group.take_events(), vec![updated(0, 0, 0, true)]);
    f.config.trigger(0).unwrap();
    assert!(f.group.take_events().is_empty());
}

#[test]
fn multiple_message_data_numbering() {
    let mut f = Fixture::new(3, false, false);
    f.set_address(0xfee0_0000);
    f.set_data(0x4043);
    f.set_ctl(true, 2);
    assert_eq!(f.config.num_enabled_vectors(), 4);
    // The low two bits of the data are the vector number.
    assert_eq!(
        f.group.take_events(),
        (0..4)
            .map(|v| updated(v, 0xfee0_0000, 0x4040 | u32::from(v), false))
            .collect::<Vec<_>>()
    );
    assert_eq!(f.config.message(3).unwrap().data, 0x4043);
    assert_eq!(f.config.message(4), None);

    for v in [0, 3] {
        f.config.trigger(v).unwrap();
    }
    assert_eq!(f.group.take_triggered(), vec![0, 3]);
    f.config.trigger(5).unwrap(); // capable but not enabled: dropped
    assert!(f.group.take_events().is_empty());
    assert!(matches!(
        f.config.trigger(8),
        Err(InterruptError::InvalidVector(8))
    ));

    // Dropping to 2 vectors masks 2 and 3, and 0 and 1 now keep bit 1 of
    // the programmed data.
    f.set_ctl(true, 1);
    assert_eq!(
        f.group.take_events(),
        vec![
            updated(0, 0xfee0_0000, 0x4042, false),
            updated(1, 0xfee0_0000, 0x4043, false),
            updated(2, 0, 0, true),
            updated(3, 0, 0, true)
        ]
    );
}

#[test]
fn multiple_message_enable_clamped_to_capable() {
    let mut f = Fixture::new(1, false, false);
    f.set_data(0x00ff);
    for mme in [1, 5, 7] {
        f.set_ctl(true, mme);
        assert_eq!(f.config.num_enabled_vectors(), 2, "mme {mme}");
        assert_eq!(f.config.message(1).unwrap().data, 0xff);
        assert_eq!(f.config.message(0).unwrap().data, 0xfe);
    }
    // The read-only capability bits cannot be changed by the guest.
    f.write(2, &[0xff, 0xff]);
    let ctl = u16::from_le_bytes([f.space.bytes[2], f.space.bytes[3]]);
    assert_eq!(ctl, 0x71 | (1 << 1));
}

#[test]
fn mask_pending_unmask_fires() {
    let mut f = Fixture::new(2, true, true);
    let pending_at = f.layout().pending_bits.unwrap();
    f.set_address(0x1_fee0_0000);
    f.set_data(0x20);
    f.set_mask(0b0010);
    f.set_ctl(true, 2);
    assert_eq!(
        f.group.take_events(),
        vec![
            updated(0, 0x1_fee0_0000, 0x20, false),
            updated(1, 0x1_fee0_0000, 0x21, true),
            updated(2, 0x1_fee0_0000, 0x22, false),
            updated(3, 0x1_fee0_0000, 0x23, false),
        ]
    );
    assert!(f.config.is_vector_masked(1));

    f.config.trigger(1).unwrap();
    f.config.trigger(1).unwrap();
    assert_eq!(f.config.pending_bits(), 0b0010);
    assert!(f.group.take_events().is_empty());
    // The guest cannot write the pending bits.
    f.write(pending_at, &[0; 4]);
    assert_eq!(f.config.pending_bits(), 0b0010);

    // Masking another vector leaves vector 1 pending.
    f.set_mask(0b0011);
    assert_eq!(
        f.group.take_events(),
        vec![updated(0, 0x1_fee0_0000, 0x20, true)]
    );
    f.set_mask(0b0001);
    assert_eq!(
        f.group.take_events(),
        vec![
            updated(1, 0x1_fee0_0000, 0x21, false),
            InterruptEvent::Triggered(1)
        ],
        "route first, then the pending interrupt, once"
    );
    assert_eq!(f.config.pending_bits(), 0);
    f.config.trigger(1).unwrap();
    assert_eq!(f.group.take_triggered(), vec![1]);
}

#[test]
fn pending_bit_of_vector_31() {
    let mut f = Fixture::new(5, false, true);
    f.set_mask(u32::MAX);
    f.set_ctl(true, 5);
    f.group.take_events();
    f.config.trigger(31).unwrap();
    assert_eq!(f.config.pending_bits(), 1 << 31);
    f.set_mask(!(1 << 31));
    assert_eq!(f.group.take_triggered(), vec![31]);
    assert_eq!(f.config.pending_bits(), 0);
}

#[test]
fn mask_bits_beyond_capable_ignored() {
    let mut f = Fixture::new(1, false, true);
    let offset = f.layout().mask_bits.unwrap();
    f.set_mask(u32::MAX);
    assert_eq!(f.space.read_u32(offset), 0b11);
    // Even if the config space held more bits, only capable ones count.
    let mut bytes = f.space.bytes.clone();
    bytes[offset..offset + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    f.config.update_from_config(&bytes);
    assert_eq!(f.config.mask_bits(), 0b11);
}

#[test]
fn addresses_32_and_64_bit() {
    let mut f = Fixture::new(0, false, false);
    f.set_address(0xdead_beef_fee0_0003);
    f.set_ctl(true, 0);
    assert_eq!(f.config.message(0).unwrap().address, 0xfee0_0000);
    // Address bits 1:0 are ignored even if config space holds them.
    let mut bytes = f.space.bytes.clone();
    bytes[4] |= 0x3;
    f.config.update_from_config(&bytes);
    assert_eq!(f.config.message(0).unwrap().address, 0xfee0_0000);

    let mut f = Fixture::new(0, true, false);
    f.set_address(0x0000_0001_fee0_0000);
    f.set_data(0x77);
    f.set_ctl(true, 0);
    assert_eq!(
        f.config.message(0),
        Some(MsiMessage {
            address: 0x1_fee0_0000,
            data: 0x77
        })
    );
    assert_eq!(
        f.group.take_events(),
        vec![updated(0, 0x1_fee0_0000, 0x77, false)]
    );
}

#[test]
fn short_or_oversized_config_input() {
    let mut f = Fixture::new(2, true, true);
    f.set_ctl(true, 2);
    f.group.take_events();
    f.config.update_from_config(&[]);
    f.config.update_from_config(&[0x05, 0, 0x21, 0]);
    assert!(f.group.take_events().is_empty());
    assert!(f.config.enabled());
    // Trailing bytes beyond the capability are ignored.
    let mut bytes = f.space.bytes.clone();
    bytes.extend([0xff; 16]);
    f.config.update_from_config(&bytes);
    assert!(f.group.take_events().is_empty());
}

#[test]
fn disable_clears_pending_and_reset() {
    let mut f = Fixture::new(2, false, true);
    f.set_address(0xfee0_0000);
    f.set_mask(0b1111);
    f.set_ctl(true, 2);
    f.config.trigger(2).unwrap();
    assert_eq!(f.config.pending_bits(), 0b0100);
    f.set_ctl(false, 2);
    assert_eq!(f.config.pending_bits(), 0);
    f.set_ctl(true, 2);
    f.set_mask(0);
    f.group.take_events();
    assert!(f.group.take_triggered().is_empty());

    f.set_mask(0b0001);
    f.config.trigger(0).unwrap();
    f.group.take_events();
    f.config.reset();
    assert!(!f.config.enabled());
    assert_eq!(f.config.num_enabled_vectors(), 0);
    assert_eq!(f.config.pending_bits(), 0);
    assert_eq!(f.config.mask_bits(), 0);
    assert_eq!(
        f.group.take_events(),
        (0..4).map(|v| updated(v, 0, 0, true)).collect::<Vec<_>>()
    );
    f.config.reset();
    assert!(f.group.take_events().is_empty());
}

#[test]
fn group_errors_are_not_fatal() {
    // The group knows one vector; the capability claims two.
    let group = Arc::new(RecordingInterruptGroup::new(1));
    let mut config = MsiConfig::new(1, false, true, group.clone()).unwrap();
    let mut space = ConfigSpace::new(&config.capability());
    space.write(2, &[0x11, 0]);
    config.update_from_config(&space.bytes);
    assert!(matches!(
        config.trigger(1),
        Err(InterruptError::InvalidVector(1))
    ));
    space.write(12, &[0b10, 0, 0, 0]);
    config.update_from_config(&space.bytes);
    config.trigger(1).unwrap();
    space.write(12, &[0, 0, 0, 0]);
    config.update_from_config(&space.bytes);
    assert_eq!(config.pending_bits(), 0);
    let events = group.take_events();
    assert!(events.iter().all(|e| match e {
        InterruptEvent::Triggered(i) | InterruptEvent::Updated { index: i, .. } => *i == 0,
    }));
}

#[test]
fn config_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MsiConfig>();
    assert_send_sync::<MsiCapability>();
}

#[test]
fn hostile_config_never_panics() {
    let mut seed = 0x0fed_cba9_8765_4321u64;
    for (log2, is_64bit, pvm) in [(0, false, false), (3, true, false), (5, false, true)] {
        let group = Arc::new(RecordingInterruptGroup::new(32));
        let mut config = MsiConfig::new(log2, is_64bit, pvm, group.clone()).unwrap();
        for len in 0..40 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            config.update_from_config(&bytes);
            for v in 0..40 {
                let _ = config.trigger(v);
            }
            assert!(config.num_enabled_vectors() <= 1 << log2);
            assert_eq!(config.pending_bits() & !low_bits(1 << log2), 0);
            if let Some(msg) = config.message(0) {
                assert_eq!(msg.address & 3, 0);
                assert!(is_64bit || msg.address >> 32 == 0);
            }
        }
    }
}
