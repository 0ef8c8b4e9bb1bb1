//! MSI, MSI-X and INTx: the emulated capabilities, the routes the group
//! hears about, and what VFIO is told to deliver.

use super::device::{standard_config, standard_fake, Fixture, BAR0};
use super::fake::*;
use crate::device::PciDevice;
use crate::interrupt::{InterruptEvent, MsiInterruptGroup, MsiMessage};
use crate::vfio::*;

const MSI: usize = 0x60;
const MSIX: usize = 0x90;

fn irq_calls(f: &Fixture) -> Vec<Call> {
    f.fake
        .take_calls()
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Call::Enable(..) | Call::Disable(..) | Call::IntxUnmask | Call::Reset
            )
        })
        .collect()
}

#[test]
fn intx_is_delivered_until_the_guest_enables_msi() {
    let mut f = Fixture::standard();
    assert_eq!(
        irq_calls(&f),
        [Call::Enable(VfioIrqIndex::Intx, 1), Call::IntxUnmask]
    );
    // 64-bit address, data, then enable with 2 vectors (MME = 1).
    f.write(MSI + 4, &0xfee0_1000u32.to_le_bytes());
    f.write(MSI + 8, &0u32.to_le_bytes());
    f.write(MSI + 12, &0x4020u16.to_le_bytes());
    assert!(irq_calls(&f).is_empty(), "not enabled yet");
    f.write(MSI + 2, &(1u16 | 1 << 4).to_le_bytes());
    assert_eq!(
        irq_calls(&f),
        [
            Call::Disable(VfioIrqIndex::Intx),
            Call::Enable(VfioIrqIndex::Msi, 2)
        ]
    );
    let updates: Vec<_> = f
        .msi
        .record
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, InterruptEvent::Updated { masked: false, .. }))
        .collect();
    let msg = |data| MsiMessage {
        address: 0xfee0_1000,
        data,
    };
    assert_eq!(
        updates,
        [
            InterruptEvent::Updated {
                index: 0,
                msg: msg(0x4020),
                masked: false
            },
            InterruptEvent::Updated {
                index: 1,
                msg: msg(0x4021),
                masked: false
            }
        ]
    );
    // The guest reads back what it wrote; the MSI capability never reaches
    // the device.
    assert_eq!(f.read32(MSI) >> 16, 0x80 | 1 << 1 | 1 << 4 | 1);
    assert_eq!(f.read32(MSI + 4), 0xfee0_1000);
    assert_eq!(f.fake.config_byte(MSI + 2) & 1, 0);
    // Disable: back to INTx.
    f.write(MSI + 2, &0u16.to_le_bytes());
    assert_eq!(
        irq_calls(&f),
        [
            Call::Disable(VfioIrqIndex::Msi),
            Call::Enable(VfioIrqIndex::Intx, 1),
            Call::IntxUnmask
        ]
    );
    assert!(f
        .msi
        .record
        .take_events()
        .iter()
        .all(|e| matches!(e, InterruptEvent::Updated { masked: true, .. })));
}

#[test]
fn msix_enable_with_a_dword_write_at_the_capability() {
    let mut f = Fixture::standard();
    f.fake.take_calls();
    // Windows and some drivers write message control as part of a dword at
    // the capability start; ID and next pointer are read-only.
    let ctl = (1u32 << 15 | 1 << 14) << 16;
    f.write(MSIX, &(ctl | 0xffff).to_le_bytes());
    assert_eq!(
        irq_calls(&f),
        [
            Call::Disable(VfioIrqIndex::Intx),
            Call::Enable(VfioIrqIndex::Msix, 4)
        ]
    );
    assert_eq!(
        f.read32(MSIX) & 0xffff,
        0x0011,
        "ID 0x11, last in the chain"
    );
    assert_eq!(f.read32(MSIX) >> 16, 0xc003, "enabled, masked, 4 vectors");
    assert_eq!(f.read32(MSIX + 4), 0x2000);
    assert_eq!(f.read32(MSIX + 8), 0x3000);
}

#[test]
fn msix_routes_follow_table_writes_and_masks() {
    let mut f = Fixture::standard();
    f.command(0x2);
    f.write(MSIX + 2, &(1u16 << 15 | 1 << 14).to_le_bytes());
    f.msix.record.take_events();
    f.fake.take_calls();
    // Program vector 1 while the function is masked: masked update only.
    let entry = BAR0;
    f.dev
        .write_bar(entry, 0x2010, &0xfee0_0000u32.to_le_bytes());
    f.dev.write_bar(entry, 0x2018, &0x31u32.to_le_bytes());
    f.dev.write_bar(entry, 0x201c, &0u32.to_le_bytes());
    assert!(f
        .msix
        .record
        .take_events()
        .iter()
        .all(|e| matches!(e, InterruptEvent::Updated { masked: true, .. })));
    // Clear the function mask: vector 1 is now live.
    f.write(MSIX + 2, &(1u16 << 15).to_le_bytes());
    let live: Vec<_> = f
        .msix
        .record
        .take_events()
        .into_iter()
        .filter(|e| matches!(e, InterruptEvent::Updated { masked: false, .. }))
        .collect();
    assert_eq!(
        live,
        [InterruptEvent::Updated {
            index: 1,
            msg: MsiMessage {
                address: 0xfee0_0000,
                data: 0x31
            },
            masked: false
        }]
    );
    assert!(
        irq_calls(&f).is_empty(),
        "masking is KVM's business, not VFIO's"
    );
    // Mask it again through the table.
    f.dev.write_bar(entry, 0x201c, &1u32.to_le_bytes());
    assert!(matches!(
        f.msix.record.take_events()[..],
        [InterruptEvent::Updated {
            index: 1,
            masked: true,
            ..
        }]
    ));
}

#[test]
fn msix_wins_over_msi_and_switching_is_clean() {
    let mut f = Fixture::standard();
    f.fake.take_calls();
    f.write(MSI + 2, &1u16.to_le_bytes());
    f.write(MSIX + 2, &(1u16 << 15).to_le_bytes());
    f.write(MSI + 2, &0u16.to_le_bytes());
    f.write(MSIX + 2, &0u16.to_le_bytes());
    assert_eq!(
        irq_calls(&f),
        [
            Call::Disable(VfioIrqIndex::Intx),
            Call::Enable(VfioIrqIndex::Msi, 1),
            Call::Disable(VfioIrqIndex::Msi),
            Call::Enable(VfioIrqIndex::Msix, 4),
            Call::Disable(VfioIrqIndex::Msix),
            Call::Enable(VfioIrqIndex::Intx, 1),
            Call::IntxUnmask,
        ]
    );
}

#[test]
fn an_msi_only_device_without_intx() {
    // Like QEMU's edu, minus INTx: MSI and nothing else (CH #5649 panicked).
    let config = ConfigBuilder::new(256)
        .bar(0, 0)
        .cap(0x40, 0x05, &msi_body(0, true, false))
        .put(0x3d, &[0])
        .build();
    let mut fake = FakeVfio::new(config).with_region(0, 0x10_0000, true);
    fake.irqs = [0, 1, 0];
    let mut f = Fixture::new(fake);
    assert!(irq_calls(&f).is_empty());
    assert_eq!(f.read32(0x3c) >> 8 & 0xff, 0, "no pin");
    f.write(0x44, &0xfee0_0000u32.to_le_bytes());
    f.write(0x4c, &0x41u16.to_le_bytes());
    f.write(0x42, &1u16.to_le_bytes());
    assert_eq!(irq_calls(&f), [Call::Enable(VfioIrqIndex::Msi, 1)]);
    // Mapped whole: no MSI-X table to trap.
    f.command(2);
    assert_eq!(f.mapped_guest(), [(BAR0, 0x10_0000)]);
}

#[test]
fn msix_pointing_outside_its_bar_is_hidden() {
    let config = ConfigBuilder::new(256)
        .bar(0, 0)
        .cap(0x40, 0x11, &msix_body(8, (0, 0xf000), (1, 0)))
        .build();
    let fake = FakeVfio::new(config).with_region(0, 0x1000, true);
    let info = VfioPciDevice::probe(&fake).unwrap();
    assert_eq!(info.msix_vectors, None);
    assert_eq!(info.layout().value(0x34), 0);
}

#[test]
fn failed_vfio_enable_is_retried_on_the_next_change() {
    let mut fake = standard_fake(standard_config());
    fake.irqs = [1, 1, 2]; // fewer MSI-X vectors than the table
    let mut f = Fixture::new(fake);
    f.fake.take_calls();
    f.write(MSIX + 2, &(1u16 << 15).to_le_bytes());
    assert_eq!(irq_calls(&f), [Call::Disable(VfioIrqIndex::Intx)]);
    f.write(MSIX + 2, &0u16.to_le_bytes());
    assert_eq!(
        irq_calls(&f),
        [Call::Enable(VfioIrqIndex::Intx, 1), Call::IntxUnmask]
    );
}

#[test]
fn pba_shows_what_the_device_raised_while_a_vector_was_masked() {
    let mut f = Fixture::standard();
    f.command(0x2);
    f.write(MSIX + 2, &(1u16 << 15).to_le_bytes());
    let pba = |f: &mut Fixture| u64::from_le_bytes(f.bar_read(BAR0, 0x3000, 8).try_into().unwrap());
    // Vectors 1 and 2 programmed; 1 stays masked, 2 is live.
    for (v, masked) in [(1u64, 1u32), (2, 0)] {
        let at = 0x2000 + 16 * v;
        f.dev.write_bar(BAR0, at, &0xfee0_0000u32.to_le_bytes());
        f.dev
            .write_bar(BAR0, at + 8, &(0x30 + v as u32).to_le_bytes());
        f.dev.write_bar(BAR0, at + 12, &masked.to_le_bytes());
    }
    assert_eq!(pba(&mut f), 0, "nothing raised yet");

    // VFIO signals both eventfds, as the device raising both vectors.
    for v in [1, 2] {
        f.msix.notifier(v).unwrap().write(1).unwrap();
    }
    assert_eq!(pba(&mut f), 1 << 1, "only the masked vector is pending");
    assert_eq!(f.bar_read(BAR0, 0x3000, 1), [1 << 1], "byte reads too");
    assert_eq!(pba(&mut f), 1 << 1, "reading the PBA consumes nothing");

    // The function mask makes the live vector's waiting interrupt pending.
    f.write(MSIX + 2, &(1u16 << 15 | 1 << 14).to_le_bytes());
    assert_eq!(pba(&mut f), 1 << 1 | 1 << 2);

    // Unmasked, the count is KVM's to deliver (its irqfd takes it), and
    // the bit no longer reads as pending.
    f.write(MSIX + 2, &(1u16 << 15).to_le_bytes());
    f.dev.write_bar(BAR0, 0x2000 + 16 + 12, &0u32.to_le_bytes());
    assert_eq!(pba(&mut f), 0);
    assert_eq!(
        f.msix.notifier(1).unwrap().read().unwrap(),
        1,
        "still there for KVM"
    );
}

#[test]
fn msi_pending_bits_show_what_the_device_raised_while_masked() {
    // Two 64-bit MSI vectors with per-vector masking at 0x40: mask bits at
    // 0x50, pending bits at 0x54.
    let config = ConfigBuilder::new(256)
        .bar(0, 0)
        .cap(0x40, 0x05, &msi_body(1, true, true))
        .build();
    let mut fake = FakeVfio::new(config).with_region(0, 0x10_0000, true);
    fake.irqs = [1, 2, 0];
    let mut f = Fixture::new(fake);
    f.write(0x44, &0xfee0_0000u32.to_le_bytes());
    f.write(0x4c, &0x41u16.to_le_bytes());
    f.write(0x50, &0b10u32.to_le_bytes());
    assert_eq!(f.read32(0x54), 0, "disabled: nothing pending");
    for v in [0, 1] {
        f.msi.notifier(v).unwrap().write(1).unwrap();
    }
    assert_eq!(f.read32(0x54), 0, "MSI off: the vectors are not enabled");
    // Enable with two vectors (multiple message enable 1).
    f.write(0x42, &(1u16 | 1 << 4).to_le_bytes());
    assert_eq!(f.read32(0x54), 0b10, "only the masked vector is pending");
    assert_eq!(f.read32(0x54), 0b10, "reading consumes nothing");
    f.write(0x50, &0u32.to_le_bytes());
    assert_eq!(f.read32(0x54), 0, "unmasked: KVM's irqfd takes the count");
    assert_eq!(f.msi.notifier(1).unwrap().read().unwrap(), 1);
}
