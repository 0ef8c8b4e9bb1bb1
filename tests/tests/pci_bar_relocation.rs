//! The PCI core as the VMM will assemble it: config mechanisms on the I/O
//! and MMIO buses, BARs allocated from the VM's address windows, and a
//! guest moving a BAR, with the bus range and the allocation following.

use std::sync::{Arc, Mutex};

use devices::{Bus, BusDevice, BusError};
use pci::{
    BarReprogrammingParams, ConfigSpaceFunction, DeviceRelocation, PciBarPrefetchable,
    PciBarRegionType, PciBdf, PciClassCode, PciConfigIo, PciConfigMmio, PciConfiguration,
    PciConfigurationParams, PciDevice, PciError, PciRoot, PCI_CONFIG_IO_PORT,
    PCI_CONFIG_IO_PORT_SIZE,
};
use vm_allocator::{layout, AddressSpace, SystemAllocator, SystemAllocatorConfig};

const BAR_SIZE: u64 = 0x4000;

/// A function with one 64-bit BAR that records the BAR accesses it gets.
struct RecordingFunction {
    config: PciConfiguration,
    accesses: Vec<(u64, u64, usize)>,
}

impl ConfigSpaceFunction for RecordingFunction {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn on_bar_read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.accesses.push((base, offset, data.len()));
        data.fill(0x5a);
    }
}

/// Puts a function's BAR on the MMIO bus.
struct BarOnBus(Arc<Mutex<RecordingFunction>>);

impl BusDevice for BarOnBus {
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]) {
        self.0.lock().unwrap().read_bar(base, offset, data);
    }
    fn write(&mut self, base: u64, offset: u64, data: &[u8]) {
        self.0.lock().unwrap().write_bar(base, offset, data);
    }
}

/// What the VMM does on a BAR move: claim the new range in the allocator,
/// move the bus range, release the old range; refuse without side effects
/// when any step fails.
struct VmmRelocation {
    mmio_bus: Arc<Bus>,
    allocator: Arc<Mutex<SystemAllocator>>,
}

impl DeviceRelocation for VmmRelocation {
    fn move_bar(
        &self,
        params: &BarReprogrammingParams,
        _device: &mut dyn PciDevice,
    ) -> Result<(), PciError> {
        let refuse = |reason: String| PciError::BarRelocation {
            index: params.bar_index,
            old_base: params.old_base,
            new_base: params.new_base,
            reason,
        };
        let space = match params.region_type {
            PciBarRegionType::Memory64BitRegion => AddressSpace::Mmio64,
            PciBarRegionType::Memory32BitRegion => AddressSpace::Mmio32,
            PciBarRegionType::IoRegion => AddressSpace::Io,
        };
        let mut allocator = self.allocator.lock().unwrap();
        let new = allocator
            .allocate_at(space, params.new_base, params.len)
            .map_err(|e| refuse(e.to_string()))?;
        if let Err(e) = self
            .mmio_bus
            .update_range(params.old_base, params.new_base, params.len)
        {
            let _ = allocator.free(&new);
            return Err(refuse(e.to_string()));
        }
        allocator
            .free_at(space, params.old_base, params.len)
            .map_err(|e| refuse(e.to_string()))
    }
}

struct Machine {
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    allocator: Arc<Mutex<SystemAllocator>>,
    function: Arc<Mutex<RecordingFunction>>,
    bar: u64,
}

const BDF: u32 = 1 << 11; // 00:01.0 in the CF8 address format

impl Machine {
    fn new() -> Self {
        let config = SystemAllocatorConfig::for_x86_64_ram_size(1 << 30).unwrap();
        let allocator = Arc::new(Mutex::new(SystemAllocator::new(&config).unwrap()));
        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());

        let bar = allocator
            .lock()
            .unwrap()
            .allocate(AddressSpace::Mmio64, BAR_SIZE, BAR_SIZE)
            .unwrap();
        let mut config = PciConfiguration::new(&PciConfigurationParams {
            vendor_id: 0x1af4,
            device_id: 0x1044,
            class_code: PciClassCode::Other,
            ..Default::default()
        });
        config
            .add_bar(
                0,
                bar.base(),
                BAR_SIZE,
                PciBarRegionType::Memory64BitRegion,
                PciBarPrefetchable::NotPrefetchable,
            )
            .unwrap();
        let function = Arc::new(Mutex::new(RecordingFunction {
            config,
            accesses: Vec::new(),
        }));
        mmio_bus
            .insert(
                Arc::new(Mutex::new(BarOnBus(function.clone()))),
                bar.base(),
                BAR_SIZE,
            )
            .unwrap();

        let relocation = Arc::new(VmmRelocation {
            mmio_bus: mmio_bus.clone(),
            allocator: allocator.clone(),
        });
        let mut root = PciRoot::new(Some(relocation));
        root.add_device(PciBdf::new(0, 1, 0), function.clone())
            .unwrap();
        let root = Arc::new(Mutex::new(root));
        io_bus
            .insert(
                Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
                PCI_CONFIG_IO_PORT,
                PCI_CONFIG_IO_PORT_SIZE,
            )
            .unwrap();
        let ecam = PciConfigMmio::new(root, 1);
        let ecam_size = ecam.window_size();
        mmio_bus
            .insert(
                Arc::new(Mutex::new(ecam)),
                layout::PCI_ECAM_START,
                ecam_size,
            )
            .unwrap();
        Machine {
            io_bus,
            mmio_bus,
            allocator,
            function,
            bar: bar.base(),
        }
    }

    fn cfg_write(&self, reg: u32, value: u32) {
        self.io_bus
            .write(0xcf8, &(0x8000_0000 | BDF | reg).to_le_bytes())
            .unwrap();
        self.io_bus.write(0xcfc, &value.to_le_bytes()).unwrap();
    }

    fn cfg_read(&self, reg: u32) -> u32 {
        self.io_bus
            .write(0xcf8, &(0x8000_0000 | BDF | reg).to_le_bytes())
            .unwrap();
        let mut data = [0; 4];
        self.io_bus.read(0xcfc, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    fn ecam_write(&self, reg: u64, value: u32) {
        let addr = layout::PCI_ECAM_START + (1 << 15) + reg;
        self.mmio_bus.write(addr, &value.to_le_bytes()).unwrap();
    }

    fn bar_read(&self, addr: u64) -> Result<u8, BusError> {
        let mut data = [0];
        self.mmio_bus.read(addr, &mut data).map(|()| data[0])
    }
}

#[test]
fn guest_sizes_and_moves_a_64bit_bar_and_the_bus_follows() {
    let m = Machine::new();
    assert_eq!(m.cfg_read(0), 0x1044_1af4);
    assert_eq!(m.bar_read(m.bar + 0x10), Ok(0x5a));

    // Size through both halves with decoding off, as Linux does.
    m.cfg_write(0x10, u32::MAX);
    m.cfg_write(0x14, u32::MAX);
    let size_mask = u64::from(m.cfg_read(0x14)) << 32 | u64::from(m.cfg_read(0x10) & !0xf);
    assert_eq!(!size_mask + 1, BAR_SIZE);

    // Program a new address, then enable decoding: only now does it move.
    let new = m.bar + 0x10_0000;
    m.cfg_write(0x10, new as u32);
    m.cfg_write(0x14, (new >> 32) as u32);
    assert_eq!(m.bar_read(m.bar), Ok(0x5a), "still at the old address");
    m.cfg_write(0x04, 0x2);
    assert_eq!(m.bar_read(new + 0x123), Ok(0x5a));
    assert_eq!(m.bar_read(m.bar), Err(BusError::NoDevice(m.bar)));
    let last = *m.function.lock().unwrap().accesses.last().unwrap();
    assert_eq!(last, (new, 0x123, 1), "the device sees the new base");

    // The allocator follows: the old range is free, the new one taken.
    let mut allocator = m.allocator.lock().unwrap();
    assert!(allocator
        .allocate_at(AddressSpace::Mmio64, new, BAR_SIZE)
        .is_err());
    allocator
        .allocate_at(AddressSpace::Mmio64, m.bar, BAR_SIZE)
        .unwrap();
}

#[test]
fn moves_onto_taken_or_foreign_ranges_are_refused_and_rolled_back() {
    let m = Machine::new();
    m.cfg_write(0x04, 0x2);
    // Onto the ECAM window (outside the 64-bit MMIO window) through ECAM itself.
    m.ecam_write(0x14, 0);
    assert_eq!(
        m.cfg_read(0x14),
        (m.bar >> 32) as u32,
        "upper half rolled back"
    );
    assert_eq!(m.bar_read(m.bar), Ok(0x5a));

    // Onto a range the allocator already handed to someone else.
    let taken = m
        .allocator
        .lock()
        .unwrap()
        .allocate(AddressSpace::Mmio64, BAR_SIZE, BAR_SIZE)
        .unwrap();
    m.cfg_write(0x10, taken.base() as u32);
    assert_eq!(u64::from(m.cfg_read(0x10) & !0xf), m.bar & 0xffff_fff0);
    assert_eq!(m.bar_read(m.bar), Ok(0x5a));
    assert!(m.bar_read(taken.base()).is_err());
}
