use super::*;
use crate::configuration::{PciBarPrefetchable, PciBarRegionType, COMMAND_MEMORY_SPACE};
use crate::device::BarReprogrammingParams;

/// A function with a 64-bit memory BAR at BAR 0 and a 32-bit one at BAR 2.
struct TestDevice {
    config: PciConfiguration,
}

impl TestDevice {
    fn new(extended: bool) -> Self {
        let mut config = PciConfiguration::new(&PciConfigurationParams {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            class_code: PciClassCode::NetworkController,
            extended_config_space: extended,
            ..Default::default()
        });
        config
            .add_bar(
                0,
                0x1_0000_0000,
                0x4000,
                PciBarRegionType::Memory64BitRegion,
                PciBarPrefetchable::NotPrefetchable,
            )
            .unwrap();
        config
            .add_bar(
                2,
                0xc000_0000,
                0x1000,
                PciBarRegionType::Memory32BitRegion,
                PciBarPrefetchable::NotPrefetchable,
            )
            .unwrap();
        TestDevice { config }
    }
}

impl ConfigSpaceFunction for TestDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

/// Records moves, refusing those to addresses in `refuse_from..` or below
/// `refuse_below`.
struct Relocator {
    moves: Mutex<Vec<BarReprogrammingParams>>,
    refuse_from: u64,
    refuse_below: u64,
}

impl DeviceRelocation for Relocator {
    fn move_bar(
        &self,
        params: &BarReprogrammingParams,
        _device: &mut dyn PciDevice,
    ) -> Result<(), PciError> {
        if params.new_base >= self.refuse_from || params.new_base < self.refuse_below {
            return Err(PciError::BarRelocation {
                index: params.bar_index,
                old_base: params.old_base,
                new_base: params.new_base,
                reason: "overlaps RAM".into(),
            });
        }
        self.moves.lock().unwrap().push(*params);
        Ok(())
    }
}

fn root_with_device(extended: bool) -> (Arc<Mutex<PciRoot>>, Arc<Relocator>) {
    root_refusing(extended, 0)
}

fn root_refusing(extended: bool, refuse_below: u64) -> (Arc<Mutex<PciRoot>>, Arc<Relocator>) {
    let relocator = Arc::new(Relocator {
        moves: Mutex::new(Vec::new()),
        refuse_from: 0x10_0000_0000,
        refuse_below,
    });
    let mut root = PciRoot::new(Some(relocator.clone()));
    root.add_device(
        PciBdf::new(0, 1, 0),
        Arc::new(Mutex::new(TestDevice::new(extended))),
    )
    .unwrap();
    (Arc::new(Mutex::new(root)), relocator)
}

fn cf8(bdf: PciBdf, reg: u32) -> [u8; 4] {
    (0x8000_0000 | u32::from(bdf.routing_id()) << 8 | reg).to_le_bytes()
}

fn io_read(io: &mut PciConfigIo, bdf: PciBdf, offset: u32, len: usize) -> u32 {
    io.write(0xcf8, 0, &cf8(bdf, offset & !3));
    let mut data = [0u8; 4];
    io.read(0xcf8, 4 + u64::from(offset & 3), &mut data[..len]);
    u32::from_le_bytes(data)
}

fn io_write(io: &mut PciConfigIo, bdf: PciBdf, offset: u32, data: &[u8]) {
    io.write(0xcf8, 0, &cf8(bdf, offset & !3));
    io.write(0xcf8, 4 + u64::from(offset & 3), data);
}

fn ecam_offset(bdf: PciBdf, reg: u64) -> u64 {
    u64::from(bdf.bus()) * ECAM_BUS_SIZE
        + u64::from(bdf.device()) * 8 * ECAM_FUNCTION_SIZE
        + u64::from(bdf.function()) * ECAM_FUNCTION_SIZE
        + reg
}

fn ecam_read(mmio: &mut PciConfigMmio, bdf: PciBdf, reg: u64, len: usize) -> u32 {
    let mut data = [0u8; 4];
    mmio.read(0xe000_0000, ecam_offset(bdf, reg), &mut data[..len]);
    u32::from_le_bytes(data)
}

const DEV: PciBdf = PciBdf {
    bus: 0,
    device: 1,
    function: 0,
};
const HOST: PciBdf = PciBdf {
    bus: 0,
    device: 0,
    function: 0,
};

#[test]
fn bdf_display_and_routing_id() {
    let bdf = PciBdf::new(0, 0x1f, 7);
    assert_eq!(bdf.to_string(), "0000:00:1f.7");
    assert_eq!(bdf.routing_id(), 0x00ff);
    assert_eq!(PciBdf::new(1, 33, 9), PciBdf::new(1, 1, 1));
}

#[test]
fn host_bridge_is_at_00_00_0() {
    let (root, _) = root_with_device(false);
    let mut io = PciConfigIo::new(root.clone());
    assert_eq!(io_read(&mut io, HOST, 0, 4), 0x0008_1b36);
    assert_eq!(
        io_read(&mut io, HOST, 0x08, 4) >> 8,
        0x06_00_00,
        "host bridge class"
    );
    let mut mmio = PciConfigMmio::new(root, 1);
    assert_eq!(ecam_read(&mut mmio, HOST, 0, 4), 0x0008_1b36);
}

#[test]
fn absent_functions_read_all_ones() {
    let (root, _) = root_with_device(false);
    let mut io = PciConfigIo::new(root.clone());
    for bdf in [
        PciBdf::new(0, 2, 0),
        PciBdf::new(0, 1, 1),
        PciBdf::new(1, 0, 0),
        PciBdf::new(255, 31, 7),
    ] {
        assert_eq!(io_read(&mut io, bdf, 0, 4), u32::MAX, "{bdf}");
        assert_eq!(io_read(&mut io, bdf, 2, 2), 0xffff, "{bdf}");
        // Writes to absent functions go nowhere.
        io_write(&mut io, bdf, 4, &[0xff; 4]);
    }
    let mut mmio = PciConfigMmio::new(root, 256);
    assert_eq!(ecam_read(&mut mmio, PciBdf::new(3, 4, 5), 0, 4), u32::MAX);
}

#[test]
fn mechanism_1_address_register() {
    let (root, _) = root_with_device(false);
    let mut io = PciConfigIo::new(root);
    // Linux's probe: a byte write to 0xCFB must not change the address.
    io.write(0xcf8, 0, &0x8000_0000u32.to_le_bytes());
    io.write(0xcf8, 3, &[0x01]);
    let mut data = [0u8; 4];
    io.read(0xcf8, 0, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
    // Word writes to 0xCF8 are not address writes either.
    io.write(0xcf8, 0, &[0x34, 0x12]);
    io.write(0xcf8, 2, &[0x34, 0x12]);
    io.read(0xcf8, 0, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x8000_0000);
    // Reserved bits and the low two bits read back as zero.
    io.write(0xcf8, 0, &0xffff_ffffu32.to_le_bytes());
    io.read(0xcf8, 0, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x80ff_fffc);
    // With the enable bit clear, the data port reads all ones.
    io.write(0xcf8, 0, &0x0000_0800u32.to_le_bytes());
    io.read(0xcf8, 4, &mut data);
    assert_eq!(data, [0xff; 4]);
}

#[test]
fn data_port_byte_lanes() {
    let (root, _) = root_with_device(false);
    let mut io = PciConfigIo::new(root);
    let id = io_read(&mut io, DEV, 0, 4);
    assert_eq!(id, 0x1041_1af4);
    for lane in 0..4u32 {
        assert_eq!(io_read(&mut io, DEV, lane, 1), (id >> (lane * 8)) & 0xff);
    }
    assert_eq!(io_read(&mut io, DEV, 2, 2), 0x1041);
    // A word write in the upper lane of the command dword reaches the status register.
    io_write(&mut io, DEV, 0x04, &[0x06, 0x00]);
    assert_eq!(io_read(&mut io, DEV, 0x04, 2), 0x0006);
    // An access past the end of the data port is dropped, not wrapped.
    io.write(0xcf8, 0, &cf8(DEV, 0x3c));
    io.write(0xcf8, 7, &[0x11, 0x22]);
    assert_eq!(io_read(&mut io, DEV, 0x3c, 4) & 0xff, 0);
}

#[test]
fn ecam_reaches_extended_space_and_splits_misaligned_accesses() {
    let (root, _) = root_with_device(true);
    let mut mmio = PciConfigMmio::new(root.clone(), 1);
    assert_eq!(mmio.window_size(), ECAM_BUS_SIZE);
    assert_eq!(ecam_read(&mut mmio, DEV, 0x100, 4), 0);
    assert_eq!(ecam_read(&mut mmio, DEV, 0xffc, 4), 0);
    // A dword read at offset 2 spans the ID and command dwords.
    assert_eq!(ecam_read(&mut mmio, DEV, 2, 4), 0x0000_1041);
    // A write across a dword boundary lands byte by byte where it should.
    mmio.write(0xe000_0000, ecam_offset(DEV, 0x3b), &[0xaa, 0x0b]);
    assert_eq!(ecam_read(&mut mmio, DEV, 0x3c, 1), 0x0b);
    // An access running off the end of a function's page is dropped.
    let mut data = [0u8; 4];
    mmio.read(0xe000_0000, ecam_offset(DEV, 0xffe), &mut data);
    assert_eq!(data, [0xff; 4]);
    // Past the configured buses: all ones.
    mmio.read(0xe000_0000, ECAM_BUS_SIZE, &mut data);
    assert_eq!(data, [0xff; 4]);
    // A conventional function has no extended space.
    let (root, _) = root_with_device(false);
    let mut mmio = PciConfigMmio::new(root, 1);
    assert_eq!(ecam_read(&mut mmio, DEV, 0x100, 4), u32::MAX);
}

#[test]
fn both_mechanisms_see_the_same_registers() {
    let (root, _) = root_with_device(false);
    let mut io = PciConfigIo::new(root.clone());
    let mut mmio = PciConfigMmio::new(root, 1);
    io_write(&mut io, DEV, 0x3c, &[0x0b]);
    assert_eq!(ecam_read(&mut mmio, DEV, 0x3c, 1), 0x0b);
    mmio.write(0, ecam_offset(DEV, 0x3c), &[0x05]);
    assert_eq!(io_read(&mut io, DEV, 0x3c, 1), 0x05);
}

#[test]
fn bar_move_reaches_the_relocation_handler() {
    let (root, relocator) = root_with_device(false);
    let mut io = PciConfigIo::new(root.clone());
    // Linux-style: decoding off, size, program, decoding on.
    io_write(&mut io, DEV, 0x10, &[0xff; 4]);
    io_write(&mut io, DEV, 0x14, &[0xff; 4]);
    assert_eq!(io_read(&mut io, DEV, 0x10, 4), 0xffff_c004);
    assert_eq!(io_read(&mut io, DEV, 0x14, 4), 0xffff_ffff);
    io_write(&mut io, DEV, 0x10, &0x0004_0000u32.to_le_bytes());
    io_write(&mut io, DEV, 0x14, &0x2u32.to_le_bytes());
    assert!(relocator.moves.lock().unwrap().is_empty());
    io_write(&mut io, DEV, 0x04, &COMMAND_MEMORY_SPACE.to_le_bytes());
    let moves = relocator.moves.lock().unwrap().clone();
    assert_eq!(moves.len(), 1);
    assert_eq!(moves[0].bar_index, 0);
    assert_eq!(moves[0].old_base, 0x1_0000_0000);
    assert_eq!(moves[0].new_base, 0x2_0004_0000);
    assert_eq!(moves[0].len, 0x4000);
}

#[test]
fn refused_bar_move_is_rolled_back() {
    let (root, relocator) = root_with_device(false);
    let mut mmio = PciConfigMmio::new(root, 1);
    mmio.write(
        0,
        ecam_offset(DEV, 0x04),
        &COMMAND_MEMORY_SPACE.to_le_bytes(),
    );
    // The upper half alone moves the BAR to 0x20_0000_0000: refused.
    mmio.write(0, ecam_offset(DEV, 0x14), &0x20u32.to_le_bytes());
    assert!(relocator.moves.lock().unwrap().is_empty());
    assert_eq!(
        ecam_read(&mut mmio, DEV, 0x14, 4),
        0x1,
        "the guest reads the old address"
    );
    assert_eq!(ecam_read(&mut mmio, DEV, 0x10, 4), 0x4);
    // A later acceptable move still works.
    mmio.write(0, ecam_offset(DEV, 0x18), &0xc010_0000u32.to_le_bytes());
    assert_eq!(relocator.moves.lock().unwrap().len(), 1);
}

#[test]
fn slots_and_duplicates() {
    let mut root = PciRoot::new(None);
    assert_eq!(root.next_free_slot().unwrap(), PciBdf::new(0, 1, 0));
    root.add_device(
        PciBdf::new(0, 1, 0),
        Arc::new(Mutex::new(TestDevice::new(false))),
    )
    .unwrap();
    assert!(matches!(
        root.add_device(
            PciBdf::new(0, 1, 0),
            Arc::new(Mutex::new(TestDevice::new(false)))
        ),
        Err(PciError::SlotInUse(_))
    ));
    assert!(root
        .add_device(
            PciBdf::new(1, 0, 0),
            Arc::new(Mutex::new(TestDevice::new(false)))
        )
        .is_err());
    assert_eq!(root.next_free_slot().unwrap(), PciBdf::new(0, 2, 0));
    for device in 2..32 {
        root.add_device(
            PciBdf::new(0, device, 0),
            Arc::new(Mutex::new(TestDevice::new(false))),
        )
        .unwrap();
    }
    assert!(matches!(root.next_free_slot(), Err(PciError::NoFreeSlot)));
    assert_eq!(root.bdfs().len(), 32);
    assert!(root.remove_device(PciBdf::new(0, 5, 0)).is_some());
    assert_eq!(root.next_free_slot().unwrap(), PciBdf::new(0, 5, 0));
}

#[test]
fn poisoned_device_lock_still_answers() {
    let (root, _) = root_with_device(false);
    let device = root.lock().unwrap().device(DEV).unwrap();
    let _ = std::thread::spawn(move || {
        let _guard = device.lock().unwrap();
        panic!("poison the lock");
    })
    .join();
    let mut io = PciConfigIo::new(root);
    assert_eq!(io_read(&mut io, DEV, 0, 4), 0x1041_1af4);
}

#[test]
fn qword_write_over_a_64bit_bar_applies_each_half_in_turn() {
    // Found by the config-space fuzzer: the moves of both dwords used to be
    // applied after the whole write, so after the first was refused and
    // rolled back the second reached the VMM from an address never mapped.
    // Here everything below 4 GiB is "RAM" and refused.
    let (root, relocator) = root_refusing(false, 0x1_0000_0000);
    let mut mmio = PciConfigMmio::new(root, 1);
    mmio.write(
        0,
        ecam_offset(DEV, 0x04),
        &COMMAND_MEMORY_SPACE.to_le_bytes(),
    );
    mmio.write(0, ecam_offset(DEV, 0x10), &[0xff; 4]);
    mmio.write(0, ecam_offset(DEV, 0x14), &[0; 4]);
    // The low half alone (address 0) is refused and rolled back to
    // 0x1_0000_0000; the high half then moves the BAR from there.
    mmio.write(0, ecam_offset(DEV, 0x10), &0x2_0000_0000u64.to_le_bytes());
    let moves = relocator.moves.lock().unwrap().clone();
    assert_eq!(moves.len(), 1, "{moves:?}");
    assert_eq!(moves[0].old_base, 0x1_0000_0000);
    assert_eq!(moves[0].new_base, 0x2_0000_0000);
    assert_eq!(ecam_read(&mut mmio, DEV, 0x10, 4), 0x4);
    assert_eq!(ecam_read(&mut mmio, DEV, 0x14, 4), 0x2);
}
