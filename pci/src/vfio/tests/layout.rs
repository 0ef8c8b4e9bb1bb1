//! Configuration space layout: what is passed through, shadowed,
//! emulated and hidden, and the relinked capability chains.

use super::fake::*;
use crate::vfio::config::{ByteOwner, ConfigLayout};

/// PM at 0x40, PCI-X (hidden) at 0x48, MSI at 0x60, vendor at 0x70,
/// AF (hidden) at 0x80, MSI-X at 0x90.
fn chain() -> Vec<u8> {
    ConfigBuilder::new(256)
        .cap(0x40, 0x01, &[0x03, 0x00, 0, 0, 0, 0])
        .cap(0x48, 0x07, &[0xaa; 6])
        .cap(0x60, 0x05, &msi_body(2, true, false))
        .cap(
            0x70,
            0x09,
            &[0x10, 0x01, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        )
        .cap(0x80, 0x13, &[0x06, 0x03])
        .cap(0x90, 0x11, &msix_body(4, (0, 0x2000), (0, 0x3000)))
        .put(0x0e, &[0x80]) // multifunction
        .build()
}

fn owners(layout: &ConfigLayout, range: std::ops::Range<usize>) -> Vec<ByteOwner> {
    range.map(|at| layout.owner(at)).collect()
}

#[test]
fn unsupported_capabilities_are_unlinked_and_hidden() {
    let layout = ConfigLayout::from_raw(&chain(), true).unwrap();
    let ids: Vec<_> = layout
        .capabilities()
        .iter()
        .map(|c| (c.offset, c.id, c.kept))
        .collect();
    assert_eq!(
        ids,
        [
            (0x40, 0x01, true),
            (0x48, 0x07, false),
            (0x60, 0x05, true),
            (0x70, 0x09, true),
            (0x80, 0x13, false),
            (0x90, 0x11, true)
        ]
    );
    // The chain the guest walks: 0x34 -> 0x40 -> 0x60 -> 0x70 -> 0x90 -> 0.
    let mut walk = vec![];
    let mut p = layout.value(0x34) as usize;
    while p != 0 {
        assert_eq!(layout.owner(p), ByteOwner::Virtual);
        walk.push((p, layout.value(p)));
        p = layout.value(p + 1) as usize;
    }
    assert_eq!(
        walk,
        [(0x40, 0x01), (0x60, 0x05), (0x70, 0x09), (0x90, 0x11)]
    );
    // Hidden capabilities are hidden up to the next one.
    assert!(owners(&layout, 0x48..0x60)
        .iter()
        .all(|o| *o == ByteOwner::Hidden));
    assert!(owners(&layout, 0x80..0x90)
        .iter()
        .all(|o| *o == ByteOwner::Hidden));
    // Kept bodies are the device's; MSI/MSI-X bodies are emulated, exactly.
    assert_eq!(layout.owner(0x42), ByteOwner::Device);
    assert_eq!(layout.owner(0x72), ByteOwner::Device);
    assert!(owners(&layout, 0x62..0x6e)
        .iter()
        .all(|o| *o == ByteOwner::Msi));
    assert_eq!(
        layout.owner(0x6e),
        ByteOwner::Device,
        "past the 14-byte MSI cap"
    );
    assert!(owners(&layout, 0x92..0x9c)
        .iter()
        .all(|o| *o == ByteOwner::Msix));
    let (_, msi) = layout.msi().unwrap();
    assert_eq!((msi.capable_vectors(), msi.is_64bit()), (4, true));
    let (_, msix) = layout.msix().unwrap();
    assert_eq!(
        (msix.table_size(), msix.table_offset(), msix.pba_offset()),
        (4, 0x2000, 0x3000)
    );
}

#[test]
fn header_registers_are_split_between_device_shadow_and_virtual() {
    let layout = ConfigLayout::from_raw(&chain(), true).unwrap();
    assert_eq!(owners(&layout, 0..4), [ByteOwner::Device; 4]);
    assert_eq!(owners(&layout, 4..6), [ByteOwner::DeviceAndShadow; 2]);
    assert_eq!(owners(&layout, 6..8), [ByteOwner::Device; 2], "status");
    assert!(owners(&layout, 0x10..0x28)
        .iter()
        .all(|o| *o == ByteOwner::Shadow));
    assert!(owners(&layout, 0x30..0x34)
        .iter()
        .all(|o| *o == ByteOwner::Shadow));
    assert_eq!(layout.owner(0x2c), ByteOwner::Device, "subsystem IDs");
    assert_eq!(layout.owner(0x3c), ByteOwner::Shadow);
    assert_eq!(
        (layout.owner(0x3d), layout.value(0x3d)),
        (ByteOwner::Virtual, 1)
    );
    assert_eq!(
        (layout.owner(0x0e), layout.value(0x0e)),
        (ByteOwner::Virtual, 0),
        "single function"
    );
    assert_eq!(layout.size(), 256);
    assert_eq!(layout.owner(256), ByteOwner::Hidden);

    let no_intx = ConfigLayout::from_raw(&chain(), false).unwrap();
    assert_eq!((no_intx.value(0x3d), no_intx.interrupt_pin()), (0, 0));
}

#[test]
fn bridges_are_refused() {
    let config = ConfigBuilder::new(256).put(0x0e, &[0x81]).build();
    assert!(ConfigLayout::from_raw(&config, false).is_err());
    assert!(ConfigLayout::from_raw(&[0u8; 64], false).is_err());
}

#[test]
fn looping_and_wild_chains_end() {
    // 0x40 -> 0x50 -> 0x40 ...
    let mut config = ConfigBuilder::new(256)
        .cap(0x40, 0x09, &[4, 0])
        .cap(0x50, 0x01, &[0; 6])
        .build();
    config[0x51] = 0x40;
    let layout = ConfigLayout::from_raw(&config, false).unwrap();
    assert_eq!(layout.capabilities().len(), 2);
    // A pointer into the header ends the walk; 0xff is masked, not followed.
    let mut config = ConfigBuilder::new(256).cap(0xfc, 0x01, &[0, 0]).build();
    config[0xfd] = 0xff;
    let layout = ConfigLayout::from_raw(&config, false).unwrap();
    assert_eq!(layout.capabilities().len(), 1);
    let config = ConfigBuilder::new(256)
        .cap(0x40, 0x09, &[4, 0])
        .put(0x41, &[0x10])
        .build();
    assert_eq!(
        ConfigLayout::from_raw(&config, false)
            .unwrap()
            .capabilities()
            .len(),
        1
    );
}

#[test]
fn no_capability_list_means_no_chain() {
    let mut config = chain();
    config[6] &= !0x10;
    let layout = ConfigLayout::from_raw(&config, false).unwrap();
    assert!(layout.capabilities().is_empty());
    assert_eq!(layout.value(0x34), 0);
    assert!(layout.msi().is_none() && layout.msix().is_none());
}

#[test]
fn extended_chain_is_relinked_through_kept_entries() {
    // SR-IOV (hidden) at 0x100, AER at 0x140, ARI (hidden) at 0x180, DSN at 0x1c0.
    let config = ConfigBuilder::new(4096)
        .cap(0x40, 0x10, &[0x02, 0x00])
        .ext_cap(0x100, 0x0010, None)
        .ext_cap(0x140, 0x0001, Some(0x100))
        .ext_cap(0x180, 0x000e, Some(0x140))
        .ext_cap(0x1c0, 0x0003, Some(0x180))
        .build();
    let layout = ConfigLayout::from_raw(&config, false).unwrap();
    assert_eq!(layout.size(), 4096);
    let header = |at: usize| u32::from_le_bytes([0, 1, 2, 3].map(|i| layout.value(at + i)));
    // A null capability at 0x100 points on to AER, AER to DSN, DSN ends it.
    assert_eq!(header(0x100), 0x140 << 20);
    assert_eq!(header(0x140), 0x0001 | 1 << 16 | 0x1c0 << 20);
    assert_eq!(header(0x1c0), 0x0003 | 1 << 16);
    assert!(owners(&layout, 0x104..0x140)
        .iter()
        .all(|o| *o == ByteOwner::Hidden));
    assert!(owners(&layout, 0x180..0x1c0)
        .iter()
        .all(|o| *o == ByteOwner::Hidden));
    assert_eq!(layout.owner(0x144), ByteOwner::Device);
    assert_eq!(layout.owner(0x1c4), ByteOwner::Device);
    let kept: Vec<_> = layout
        .extended_capabilities()
        .iter()
        .filter(|c| c.kept)
        .map(|c| c.id)
        .collect();
    assert_eq!(kept, [0x0001, 0x0003]);
}

#[test]
fn extended_chain_with_nothing_kept_reads_empty() {
    let config = ConfigBuilder::new(4096)
        .ext_cap(0x100, 0x0010, None)
        .ext_cap(0x200, 0x0015, Some(0x100))
        .build();
    let layout = ConfigLayout::from_raw(&config, false).unwrap();
    for at in 0x100..0x104 {
        assert_eq!(
            (layout.owner(at), layout.value(at)),
            (ByteOwner::Virtual, 0)
        );
    }
    // A self-loop ends the walk.
    let mut config = ConfigBuilder::new(4096)
        .ext_cap(0x100, 0x0001, None)
        .build();
    config[0x102] |= 0x00;
    config[0x103] = 0x10; // next = 0x100
    let layout = ConfigLayout::from_raw(&config, false).unwrap();
    assert_eq!(layout.extended_capabilities().len(), 1);
}

#[test]
fn hiding_msix_later_relinks() {
    let mut layout = ConfigLayout::from_raw(&chain(), true).unwrap();
    layout.hide_msix();
    assert!(layout.msix().is_none());
    assert_eq!(layout.value(0x71), 0, "vendor cap is now last");
    assert_eq!(layout.owner(0x92), ByteOwner::Hidden);
    layout.hide_msi();
    assert_eq!(layout.value(0x41), 0x70);
}
