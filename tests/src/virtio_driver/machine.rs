//! The hardware a guest driver talks to: a port I/O bus with configuration
//! mechanism #1 at 0xCF8, an MMIO bus with an ECAM window and the BARs of
//! the functions, and a root bus that moves a BAR's bus range when the
//! guest reprograms it (what the VMM does).

use std::sync::{Arc, Mutex};

use devices::{Bus, BusDevice};
use pci::{
    BarReprogrammingParams, DeviceRelocation, PciBarRegionType, PciBdf, PciConfigIo, PciConfigMmio,
    PciDevice, PciError, PciRoot, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};

/// Where the ECAM window sits on the MMIO bus.
pub const ECAM_BASE: u64 = 0xe000_0000;

/// The VMM's side of a BAR move: the bus range follows the BAR.
struct FollowBars {
    mmio_bus: Arc<Bus>,
    io_bus: Arc<Bus>,
    moves: Arc<Mutex<Vec<BarReprogrammingParams>>>,
}

impl DeviceRelocation for FollowBars {
    fn move_bar(
        &self,
        params: &BarReprogrammingParams,
        _device: &mut dyn PciDevice,
    ) -> Result<(), PciError> {
        let bus = match params.region_type {
            PciBarRegionType::IoRegion => &self.io_bus,
            _ => &self.mmio_bus,
        };
        bus.update_range(params.old_base, params.new_base, params.len)
            .map_err(|e| PciError::BarRelocation {
                index: params.bar_index,
                old_base: params.old_base,
                new_base: params.new_base,
                reason: e.to_string(),
            })?;
        self.moves
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(*params);
        Ok(())
    }
}

/// How configuration space is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigMechanism {
    /// Ports 0xCF8 (address) and 0xCFC (data).
    PortIo,
    /// The memory-mapped ECAM window.
    Ecam,
}

/// Buses, a PCI root and its configuration mechanisms.
pub struct Machine {
    /// Port I/O bus.
    pub io_bus: Arc<Bus>,
    /// MMIO bus: ECAM window and BARs.
    pub mmio_bus: Arc<Bus>,
    /// The root bus.
    pub root: Arc<Mutex<PciRoot>>,
    moves: Arc<Mutex<Vec<BarReprogrammingParams>>>,
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    /// A machine with a host bridge and both configuration mechanisms.
    pub fn new() -> Self {
        let io_bus = Arc::new(Bus::new());
        let mmio_bus = Arc::new(Bus::new());
        let moves = Arc::new(Mutex::new(Vec::new()));
        let relocation = Arc::new(FollowBars {
            mmio_bus: mmio_bus.clone(),
            io_bus: io_bus.clone(),
            moves: moves.clone(),
        });
        let root = Arc::new(Mutex::new(PciRoot::new(Some(relocation))));
        io_bus
            .insert(
                Arc::new(Mutex::new(PciConfigIo::new(root.clone()))),
                PCI_CONFIG_IO_PORT,
                PCI_CONFIG_IO_PORT_SIZE,
            )
            .expect("empty I/O bus");
        let ecam = PciConfigMmio::new(root.clone(), 1);
        let size = ecam.window_size();
        mmio_bus
            .insert(Arc::new(Mutex::new(ecam)), ECAM_BASE, size)
            .expect("empty MMIO bus");
        Machine {
            io_bus,
            mmio_bus,
            root,
            moves,
        }
    }

    /// Plugs `function` in at `bdf`, with its memory BAR (`bar_device`)
    /// decoded at `bar_base` for `bar_len` bytes, as the VMM allocated it.
    pub fn add_function(
        &self,
        bdf: PciBdf,
        function: Arc<Mutex<dyn PciDevice>>,
        bar_device: Arc<Mutex<dyn BusDevice>>,
        bar_base: u64,
        bar_len: u64,
    ) -> Result<(), String> {
        self.mmio_bus
            .insert(bar_device, bar_base, bar_len)
            .map_err(|e| e.to_string())?;
        self.root
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(bdf, function)
            .map_err(|e| e.to_string())
    }

    /// The BAR moves applied so far.
    pub fn bar_moves(&self) -> Vec<BarReprogrammingParams> {
        self.moves.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Configuration space access through `mechanism`.
    pub fn config(&self, mechanism: ConfigMechanism) -> ConfigAccess<'_> {
        ConfigAccess {
            machine: self,
            mechanism,
        }
    }

    /// An MMIO read of `N` bytes; unclaimed addresses read all ones, as on
    /// a real bus.
    pub fn mmio_read<const N: usize>(&self, addr: u64) -> [u8; N] {
        let mut data = [0xff; N];
        if self.mmio_bus.read(addr, &mut data).is_err() {
            data = [0xff; N];
        }
        data
    }

    /// An MMIO write; writes to unclaimed addresses are lost.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Err(e) = self.mmio_bus.write(addr, data) {
            log::debug!("MMIO write at {addr:#x} lost: {e}");
        }
    }
}

/// Reads and writes configuration space the way a guest does.
pub struct ConfigAccess<'a> {
    machine: &'a Machine,
    mechanism: ConfigMechanism,
}

impl ConfigAccess<'_> {
    fn cf8_address(bdf: PciBdf, offset: u16) -> u32 {
        0x8000_0000
            | u32::from(bdf.bus()) << 16
            | u32::from(bdf.device()) << 11
            | u32::from(bdf.function()) << 8
            | u32::from(offset & 0xfc)
    }

    fn ecam_address(bdf: PciBdf, offset: u16) -> u64 {
        ECAM_BASE + (u64::from(bdf.routing_id()) << 12) + u64::from(offset)
    }

    /// Reads `N` (1, 2 or 4) bytes at `offset`, which must not cross a
    /// dword with port I/O.
    fn read<const N: usize>(&self, bdf: PciBdf, offset: u16) -> [u8; N] {
        let mut data = [0xff; N];
        match self.mechanism {
            ConfigMechanism::PortIo => {
                let address = Self::cf8_address(bdf, offset).to_le_bytes();
                let port = 0xcfc + u64::from(offset & 3);
                let ok = self.machine.io_bus.write(0xcf8, &address).is_ok()
                    && self.machine.io_bus.read(port, &mut data).is_ok();
                if !ok {
                    data = [0xff; N];
                }
            }
            ConfigMechanism::Ecam => {
                data = self.machine.mmio_read(Self::ecam_address(bdf, offset));
            }
        }
        data
    }

    fn write(&self, bdf: PciBdf, offset: u16, data: &[u8]) {
        match self.mechanism {
            ConfigMechanism::PortIo => {
                let address = Self::cf8_address(bdf, offset).to_le_bytes();
                let port = 0xcfc + u64::from(offset & 3);
                let ok = self.machine.io_bus.write(0xcf8, &address).is_ok()
                    && self.machine.io_bus.write(port, data).is_ok();
                if !ok {
                    log::debug!("config write to {bdf} at {offset:#x} lost");
                }
            }
            ConfigMechanism::Ecam => self
                .machine
                .mmio_write(Self::ecam_address(bdf, offset), data),
        }
    }

    /// Reads a byte.
    pub fn read8(&self, bdf: PciBdf, offset: u16) -> u8 {
        self.read::<1>(bdf, offset)[0]
    }

    /// Reads a word.
    pub fn read16(&self, bdf: PciBdf, offset: u16) -> u16 {
        u16::from_le_bytes(self.read(bdf, offset))
    }

    /// Reads a dword.
    pub fn read32(&self, bdf: PciBdf, offset: u16) -> u32 {
        u32::from_le_bytes(self.read(bdf, offset))
    }

    /// Writes a byte.
    pub fn write8(&self, bdf: PciBdf, offset: u16, value: u8) {
        self.write(bdf, offset, &[value]);
    }

    /// Writes a word.
    pub fn write16(&self, bdf: PciBdf, offset: u16, value: u16) {
        self.write(bdf, offset, &value.to_le_bytes());
    }

    /// Writes a dword.
    pub fn write32(&self, bdf: PciBdf, offset: u16, value: u32) {
        self.write(bdf, offset, &value.to_le_bytes());
    }
}
