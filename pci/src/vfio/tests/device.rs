//! The device as the guest sees it: configuration reads and writes, BAR
//! accesses, and memory slots following the BARs.

use std::sync::Arc;

use super::fake::*;
use crate::configuration::ROM_BAR_INDEX;
use crate::device::PciDevice;
use crate::interrupt::MsiInterruptGroup;
use crate::vfio::*;

pub const BAR0: u64 = 0xc000_0000;
pub const BAR2: u64 = 0x1_0000_0000;
pub const BAR4: u64 = 0x1000;
pub const ROM: u64 = 0xc010_0000;
pub const LINE: u8 = 10;

/// PM at 0x40, PCI-X (hidden) at 0x48, MSI (2 vectors, 64-bit) at 0x60,
/// vendor at 0x70, MSI-X (4 vectors, table 0x2000 and PBA 0x3000 in BAR0)
/// at 0x90. BAR0: 64 KiB 32-bit; BAR2: 64-bit prefetchable, 12 KiB region;
/// BAR4: 32 ports; an 8 KiB ROM.
pub fn standard_config() -> Vec<u8> {
    ConfigBuilder::new(256)
        .bar(0, 0x0)
        .bar(2, 0xc)
        .bar(4, 0x1)
        .cap(0x40, 0x01, &[0x03, 0x00, 0, 0, 0, 0])
        .cap(0x48, 0x07, &[0xaa; 6])
        .cap(0x60, 0x05, &msi_body(1, true, false))
        .cap(
            0x70,
            0x09,
            &[0x10, 0x01, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        )
        .cap(0x90, 0x11, &msix_body(4, (0, 0x2000), (0, 0x3000)))
        .build()
}

pub fn standard_fake(config: Vec<u8>) -> FakeVfio {
    let mut fake = FakeVfio::new(config);
    fake.irqs = [1, 2, 4];
    fake.with_region(0, 0x1_0000, true)
        .with_region(2, 0x3000, true)
        .with_region(4, 0x20, false)
        .with_region(VFIO_PCI_ROM_REGION_INDEX, 0x2000, false)
}

pub struct Fixture {
    pub fake: Arc<FakeVfio>,
    pub mapper: Arc<FakeMapper>,
    pub msi: Arc<FdGroup>,
    pub msix: Arc<FdGroup>,
    pub dev: VfioPciDevice,
}

impl Fixture {
    pub fn new(fake: FakeVfio) -> Self {
        let fake = Arc::new(fake);
        let info = VfioPciDevice::probe(&*fake).unwrap();
        let mapper = Arc::new(FakeMapper::default());
        let msi = FdGroup::new(info.msi_vectors.unwrap_or(1));
        let msix = FdGroup::new(info.msix_vectors.unwrap_or(1));
        let mut bar_addresses: Vec<(usize, u64)> = info
            .bars
            .iter()
            .map(|b| (b.index, [BAR0, 0, BAR2, 0, BAR4, 0][b.index]))
            .collect();
        if info.rom.is_some() {
            bar_addresses.push((ROM_BAR_INDEX, ROM));
        }
        let intx = info.has_intx.then(|| IntxEventFds {
            trigger: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
            resample: vmm_sys_util::eventfd::EventFd::new(0).unwrap(),
        });
        let res = VfioResources {
            bar_addresses,
            msi_group: info
                .msi_vectors
                .map(|_| msi.clone() as Arc<dyn MsiInterruptGroup>),
            msix_group: info
                .msix_vectors
                .map(|_| msix.clone() as Arc<dyn MsiInterruptGroup>),
            intx,
            intx_line: LINE,
            mapper: mapper.clone(),
            mmio_windows: vec![(0xc000_0000, 0xe000_0000), (1 << 32, 1 << 36)],
            page_size: PAGE,
        };
        let dev = VfioPciDevice::new("vfio0", fake.clone(), info, res).unwrap();
        Fixture {
            fake,
            mapper,
            msi,
            msix,
            dev,
        }
    }

    pub fn standard() -> Self {
        Self::new(standard_fake(standard_config()))
    }

    pub fn read32(&mut self, at: usize) -> u32 {
        self.dev.read_config_register(at / 4)
    }

    pub fn write(&mut self, at: usize, bytes: &[u8]) -> Vec<crate::BarReprogrammingParams> {
        self.dev
            .write_config_register(at / 4, (at % 4) as u64, bytes)
    }

    pub fn command(&mut self, value: u16) {
        self.write(4, &value.to_le_bytes());
    }

    pub fn bar_read(&mut self, base: u64, offset: u64, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.dev.read_bar(base, offset, &mut data);
        data
    }

    pub fn mapped_guest(&self) -> Vec<(u64, u64)> {
        self.mapper
            .mapped()
            .iter()
            .map(|&(g, s, _)| (g, s))
            .collect()
    }
}

#[test]
fn bars_read_the_guest_addresses_and_size_like_hardware() {
    let mut f = Fixture::standard();
    assert_eq!(f.read32(0x10), BAR0 as u32);
    assert_eq!(f.read32(0x14), 0, "BAR1 absent");
    assert_eq!(f.read32(0x18), 0xc, "64-bit prefetchable, low half");
    assert_eq!(f.read32(0x1c), 1, "high half");
    assert_eq!(f.read32(0x20), BAR4 as u32 | 1);
    assert_eq!(f.read32(0x30), ROM as u32, "ROM, disabled");
    // Sizing: all ones, read back the size mask.
    f.write(0x10, &[0xff; 4]);
    assert_eq!(f.read32(0x10), 0xffff_0000);
    f.write(0x18, &[0xff; 4]);
    f.write(0x1c, &[0xff; 4]);
    assert_eq!((f.read32(0x18), f.read32(0x1c)), (0xffff_c00c, 0xffff_ffff));
    f.write(0x30, &[0xff; 4]);
    assert_eq!(f.read32(0x30), 0xffff_e001);
    // BAR writes never reach the device.
    assert!(f
        .fake
        .take_calls()
        .iter()
        .all(|c| !matches!(c, Call::Write(VFIO_PCI_CONFIG_REGION_INDEX, 0x10..=0x33, _))));
}

#[test]
fn identity_comes_from_the_device_and_the_rest_is_virtualised() {
    let mut f = Fixture::standard();
    assert_eq!(f.read32(0), 0x11e8_1234);
    assert_eq!(
        f.read32(0x3c) & 0xffff,
        u32::from(LINE) | 1 << 8,
        "line, INTA#"
    );
    assert_eq!(f.read32(0x34) & 0xff, 0x40);
    assert_eq!(
        f.read32(0x40) & 0xffff,
        0x6001,
        "PM, next skips PCI-X at 0x48"
    );
    assert_eq!(f.read32(0x48), 0, "hidden");
    // The line is the VMM's: the device never hears of it.
    f.write(0x3c, &[7]);
    assert_eq!(f.read32(0x3c) & 0xff, 7);
    assert_eq!(f.fake.config_byte(0x3c), 0);
}

#[test]
fn writes_go_where_the_byte_belongs() {
    let mut f = Fixture::standard();
    f.fake.take_calls();
    f.write(0x48, &[1, 2, 3, 4]); // hidden
    f.write(0x40, &[0xee, 0xee]); // PM header: virtual
    f.write(0x72, &[0x55]); // vendor body: device
    f.write(0x44, &[0x03, 0x00]); // PMCSR: device
    assert_eq!(
        f.fake.take_calls(),
        [
            Call::Write(VFIO_PCI_CONFIG_REGION_INDEX, 0x72, vec![0x55]),
            Call::Write(VFIO_PCI_CONFIG_REGION_INDEX, 0x44, vec![0x03, 0x00]),
        ]
    );
    assert_eq!(f.fake.config_byte(0x4a), 0xaa, "hidden bytes untouched");
    // A dword write across the command and status registers: both to the
    // device, the command mirrored.
    f.write(0x04, &[0x06, 0x00, 0x00, 0xf9]);
    assert_eq!(
        f.fake.take_calls(),
        [
            Call::Write(VFIO_PCI_CONFIG_REGION_INDEX, 0x04, vec![0x06, 0x00]),
            Call::Write(VFIO_PCI_CONFIG_REGION_INDEX, 0x06, vec![0x00, 0xf9]),
        ]
    );
    // Out of range and misaligned accesses are ignored.
    assert!(f.dev.write_config_register(64, 0, &[1]).is_empty());
    assert!(f.dev.write_config_register(1, 3, &[1, 2]).is_empty());
    assert!(f.dev.write_config_register(usize::MAX, 0, &[1]).is_empty());
    assert_eq!(f.dev.read_config_register(64), u32::MAX);
    assert_eq!(f.dev.read_config_register(usize::MAX), u32::MAX);
    assert!(f.fake.take_calls().is_empty());
}

#[test]
fn memory_decoding_maps_everything_but_the_msix_pages() {
    let mut f = Fixture::standard();
    assert!(f.mapped_guest().is_empty(), "decoding is off at reset");
    let mmaps: Vec<_> = f
        .fake
        .take_calls()
        .into_iter()
        .filter(|c| matches!(c, Call::Mmap(..)))
        .collect();
    assert_eq!(
        mmaps,
        [
            Call::Mmap(0, 0, 0x2000),
            Call::Mmap(0, 0x4000, 0xc000),
            Call::Mmap(2, 0, 0x3000),
        ],
        "table page 0x2000 and PBA page 0x3000 stay trapped"
    );
    f.command(0x2);
    assert_eq!(
        f.mapped_guest(),
        [(BAR0, 0x2000), (BAR0 + 0x4000, 0xc000), (BAR2, 0x3000)]
    );
    assert_eq!(f.dev.mapped_ranges().len(), 3);
    f.command(0x0);
    assert!(f.mapped_guest().is_empty());
}

#[test]
fn sparse_areas_and_msix_mappable_regions_give_the_same_slots() {
    // Table and PBA share page 1; older kernels leave that page out of
    // the region's sparse areas, newer ones let us mmap it all.
    for sparse in [true, false] {
        let config = ConfigBuilder::new(256)
            .bar(0, 0)
            .cap(0x40, 0x11, &msix_body(2, (0, 0x1000), (0, 0x1800)))
            .build();
        let mut fake = FakeVfio::new(config).with_region(0, 0x4000, true);
        if sparse {
            fake = fake.with_areas(0, &[(0, 0x1000), (0x2000, 0x2000)]);
        }
        let mut f = Fixture::new(fake);
        f.command(2);
        assert_eq!(f.mapped_guest(), [(BAR0, 0x1000), (BAR0 + 0x2000, 0x2000)]);
        assert_eq!(
            f.bar_read(BAR0, 0x1ffe, 2),
            [0xfe, 0xff],
            "trapped rest of page 1"
        );
        assert_eq!(f.fake.region_bytes(0, 0x1ffe, 2), [0xfe, 0xff]);
    }
}

#[test]
fn slots_follow_bar_moves_and_their_rollback() {
    let mut f = Fixture::standard();
    f.command(0x2);
    let new = BAR0 + 0x10_0000;
    let moves = f.write(0x10, &(new as u32).to_le_bytes());
    assert_eq!(moves.len(), 1);
    assert_eq!((moves[0].old_base, moves[0].new_base), (BAR0, new));
    assert_eq!(
        f.mapped_guest(),
        [(new, 0x2000), (new + 0x4000, 0xc000), (BAR2, 0x3000)]
    );
    // The VMM could not apply the move: back where it was.
    f.dev.restore_bar(&moves[0]);
    assert_eq!(f.read32(0x10), BAR0 as u32);
    assert_eq!(
        f.mapped_guest(),
        [(BAR0, 0x2000), (BAR0 + 0x4000, 0xc000), (BAR2, 0x3000)]
    );
    // A 64-bit BAR moved below 4 GiB, high half first with decoding off.
    f.command(0);
    f.write(0x1c, &[0; 4]);
    f.write(0x18, &0xd000_0000u32.to_le_bytes());
    f.command(2);
    assert!(f.mapped_guest().contains(&(0xd000_0000, 0x3000)));
    // Outside every MMIO window (over RAM, say): decoded there, never mapped.
    let moves = f.write(0x10, &0x1000_0000u32.to_le_bytes());
    assert_eq!(moves.len(), 1);
    assert!(f.mapped_guest().iter().all(|&(g, _)| g >= 0xc000_0000));
}

#[test]
fn swapping_two_bars_never_overlaps_slots() {
    let mut config = standard_config();
    config[0x14..0x18].copy_from_slice(&0u32.to_le_bytes());
    let fake = standard_fake(config).with_region(1, 0x1_0000, true);
    let mut f = Fixture::new(fake);
    // BAR1 got address 0 from the fixture table: put it somewhere sane.
    f.write(0x14, &((BAR0 + 0x1_0000) as u32).to_le_bytes());
    f.command(2);
    f.write(0x14, &(BAR0 as u32).to_le_bytes());
    f.write(0x10, &((BAR0 + 0x1_0000) as u32).to_le_bytes());
    let mapped = f.mapped_guest();
    for w in mapped.windows(2) {
        assert!(w[0].0 + w[0].1 <= w[1].0, "{mapped:x?}");
    }
}

#[test]
fn trapped_bar_accesses_are_forwarded_or_emulated() {
    let mut f = Fixture::standard();
    f.command(0x3);
    // Region bytes read as their offset's low byte (see FakeVfio).
    assert_eq!(f.bar_read(BAR0, 0x1004, 4), [4, 5, 6, 7]);
    // The table: entry 0's vector control reads masked.
    assert_eq!(f.bar_read(BAR0, 0x200c, 4), [1, 0, 0, 0]);
    // Straddling into the table: device bytes, then table bytes.
    assert_eq!(
        f.bar_read(BAR0, 0x1ffc, 8),
        [0xfc, 0xfd, 0xfe, 0xff, 0, 0, 0, 0]
    );
    // The PBA reads as nothing pending; writes to it go nowhere.
    assert_eq!(f.bar_read(BAR0, 0x3000, 8), [0; 8]);
    f.fake.take_calls();
    f.dev.write_bar(BAR0, 0x3000, &[0xff; 8]);
    f.dev.write_bar(BAR0, 0x2000, &0xfee0_0000u32.to_le_bytes());
    assert!(
        f.fake.take_calls().is_empty(),
        "table and PBA are never forwarded"
    );
    assert_eq!(f.bar_read(BAR0, 0x2000, 4), 0xfee0_0000u32.to_le_bytes());
    f.dev.write_bar(BAR0, 0x10, &[9, 9]);
    assert_eq!(f.fake.take_calls(), [Call::Write(0, 0x10, vec![9, 9])]);
    // I/O BAR.
    assert_eq!(f.bar_read(BAR4, 4, 2), [4, 5]);
    // Past the 12 KiB region of the 16 KiB BAR2: all ones.
    assert_eq!(f.bar_read(BAR2, 0x3800, 4), [0xff; 4]);
    assert_eq!(f.bar_read(BAR2, 0x2ffe, 4), [0xfe, 0xff, 0xff, 0xff]);
    // Nothing decoded at an unknown base.
    assert_eq!(f.bar_read(0xdead_0000, 0, 4), [0xff; 4]);
    // Five accesses reached the device's regions (the straddling one
    // counts for both kinds; bytes past a region reach nothing), six the
    // table or PBA.
    let stats = f.dev.access_stats();
    assert_eq!((stats.forwarded, stats.msix), (5, 6));
}

#[test]
fn decoding_off_hides_trapped_bars() {
    let mut f = Fixture::standard();
    assert_eq!(f.bar_read(BAR4, 0, 2), [0xff, 0xff], "I/O decoding off");
    assert_eq!(
        f.bar_read(BAR0, 0x2000, 4),
        [0xff; 4],
        "memory decoding off"
    );
    f.fake.take_calls();
    f.dev.write_bar(BAR0, 0x10, &[1]);
    assert!(f.fake.take_calls().is_empty());
}

#[test]
fn the_rom_reads_through_vfio_when_enabled() {
    let mut f = Fixture::standard();
    f.command(0x2);
    assert_eq!(f.bar_read(ROM, 0x10, 2), [0xff, 0xff], "ROM disabled");
    f.write(0x30, &(ROM as u32 | 1).to_le_bytes());
    assert_eq!(f.bar_read(ROM, 0x10, 2), [0x10, 0x11]);
    f.fake.take_calls();
    f.dev.write_bar(ROM, 0, &[1, 2]);
    assert!(f.fake.take_calls().is_empty(), "ROM writes are dropped");
}

#[test]
fn shutdown_stops_interrupts_removes_slots_and_resets() {
    let mut f = Fixture::standard();
    f.command(0x2);
    assert!(!f.mapped_guest().is_empty());
    f.fake.take_calls();
    f.dev.shutdown();
    assert_eq!(
        f.fake.take_calls(),
        [Call::Disable(VfioIrqIndex::Intx), Call::Reset]
    );
    assert!(f.mapped_guest().is_empty());
    // Dropping afterwards does nothing more.
    drop(f.dev);
    assert!(f.fake.take_calls().is_empty());
}

#[test]
fn dropping_removes_slots() {
    let mut f = Fixture::standard();
    f.command(0x2);
    let mapper = f.mapper.clone();
    drop(f.dev);
    assert!(mapper.mapped().is_empty());
}

/// xorshift64*: deterministic noise for the hostile-guest test.
fn next(state: &mut u64) -> u64 {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    state.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

#[test]
fn a_hostile_guest_cannot_panic_it() {
    let mut f = Fixture::standard();
    let mut s = 0x1234_5678_9abc_def0u64;
    let bases = [BAR0, BAR2, BAR4, ROM, 0, u64::MAX];
    for _ in 0..20_000 {
        let r = next(&mut s);
        let width = [1usize, 2, 4, 8][(r & 3) as usize];
        match (r >> 2) % 4 {
            0 => {
                let reg = ((r >> 8) % 80) as usize;
                let offset = (r >> 16) % 5;
                let data = (next(&mut s)).to_le_bytes();
                let moves = f
                    .dev
                    .write_config_register(reg, offset, &data[..width.min(4)]);
                for m in moves.iter().filter(|_| r & 1 << 40 != 0) {
                    f.dev.restore_bar(m);
                }
            }
            1 => {
                let _ = f.dev.read_config_register(((r >> 8) % 80) as usize);
            }
            2 => {
                let base = bases[((r >> 8) % 6) as usize];
                let offset = next(&mut s) % 0x2_0000;
                let mut data = vec![0u8; width];
                f.dev.read_bar(base, offset, &mut data);
            }
            _ => {
                let base = bases[((r >> 8) % 6) as usize];
                let offset = next(&mut s) % 0x2_0000;
                let data = next(&mut s).to_le_bytes();
                f.dev.write_bar(base, offset, &data[..width]);
            }
        }
        // The slots never overlap and stay inside the windows.
        let mapped = f.mapped_guest();
        for w in mapped.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
    }
    f.dev.shutdown();
}
