//! The root bus: functions by bus/device/function, a host bridge at
//! 00:00.0, and the two ways a guest reaches configuration space:
//! mechanism #1 through ports 0xCF8/0xCFC, and an ECAM window in MMIO.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::BusDevice;

use crate::configuration::{PciClassCode, PciConfiguration, PciConfigurationParams, PciHeaderType};
use crate::device::{ConfigSpaceFunction, DeviceRelocation, PciDevice, PciError};

/// Bytes of ECAM window per function.
pub const ECAM_FUNCTION_SIZE: u64 = 4096;
/// Bytes of ECAM window per bus: 32 devices of 8 functions.
pub const ECAM_BUS_SIZE: u64 = ECAM_FUNCTION_SIZE * 8 * 32;
/// First port of configuration mechanism #1 (the address register).
pub const PCI_CONFIG_IO_PORT: u64 = 0xcf8;
/// Ports used by configuration mechanism #1: address at 0xCF8, data at 0xCFC.
pub const PCI_CONFIG_IO_PORT_SIZE: u64 = 8;

const CONFIG_ADDRESS_ENABLE: u32 = 1 << 31;
/// Bits of the address register that are kept: enable, bus, device,
/// function and dword-aligned register. Bits 30:24 are reserved and bits 1:0
/// read as zero.
const CONFIG_ADDRESS_MASK: u32 = CONFIG_ADDRESS_ENABLE | 0x00ff_fffc;

/// A PCI bus/device/function address on segment 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBdf {
    bus: u8,
    device: u8,
    function: u8,
}

impl PciBdf {
    /// The address of `function` of `device` on `bus`. Device numbers wrap
    /// at 32 and function numbers at 8, as the bits of the address do.
    pub fn new(bus: u8, device: u8, function: u8) -> Self {
        PciBdf {
            bus,
            device: device & 0x1f,
            function: function & 0x7,
        }
    }

    /// The bus number.
    pub fn bus(&self) -> u8 {
        self.bus
    }

    /// The device number (0..32).
    pub fn device(&self) -> u8 {
        self.device
    }

    /// The function number (0..8).
    pub fn function(&self) -> u8 {
        self.function
    }

    /// The 16-bit routing ID: bus, device, function.
    pub fn routing_id(&self) -> u16 {
        u16::from(self.bus) << 8 | u16::from(self.device) << 3 | u16::from(self.function)
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "0000:{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// The host bridge at 00:00.0: a function with no BARs whose presence tells
/// the guest this is a PCI root bus.
pub struct PciHostBridge {
    config: PciConfiguration,
}

impl PciHostBridge {
    /// Vendor ID: Red Hat, Inc. (the same IDs QEMU's generic PCIe host uses).
    pub const VENDOR_ID: u16 = 0x1b36;
    /// Device ID: PCIe host bridge.
    pub const DEVICE_ID: u16 = 0x0008;

    /// A host bridge.
    pub fn new() -> Self {
        PciHostBridge {
            config: PciConfiguration::new(&PciConfigurationParams {
                vendor_id: Self::VENDOR_ID,
                device_id: Self::DEVICE_ID,
                class_code: PciClassCode::BridgeDevice,
                subclass: 0x00,
                subsystem_vendor_id: Self::VENDOR_ID,
                subsystem_id: 0x1100,
                header_type: PciHeaderType::Device,
                ..Default::default()
            }),
        }
    }
}

impl Default for PciHostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl ConfigSpaceFunction for PciHostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

/// Functions on the root bus (bus 0), and the dispatch of configuration
/// accesses to them.
pub struct PciRoot {
    devices: BTreeMap<PciBdf, Arc<Mutex<dyn PciDevice>>>,
    relocation: Option<Arc<dyn DeviceRelocation>>,
}

fn lock(device: &Mutex<dyn PciDevice>) -> MutexGuard<'_, dyn PciDevice + 'static> {
    // A device whose lock was poisoned by a panic elsewhere still answers:
    // the guest must not be able to turn one failure into a VMM-wide one.
    device.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciRoot {
    /// A root bus holding a host bridge at 00:00.0. BAR moves are handed to
    /// `relocation`; without one they are accepted as they are.
    pub fn new(relocation: Option<Arc<dyn DeviceRelocation>>) -> Self {
        let mut devices: BTreeMap<PciBdf, Arc<Mutex<dyn PciDevice>>> = BTreeMap::new();
        devices.insert(
            PciBdf::new(0, 0, 0),
            Arc::new(Mutex::new(PciHostBridge::new())),
        );
        PciRoot {
            devices,
            relocation,
        }
    }

    /// Sets the handler for BAR moves.
    pub fn set_relocation(&mut self, relocation: Arc<dyn DeviceRelocation>) {
        self.relocation = Some(relocation);
    }

    /// Places `device` at `bdf` (bus 0 only).
    pub fn add_device(
        &mut self,
        bdf: PciBdf,
        device: Arc<Mutex<dyn PciDevice>>,
    ) -> Result<(), PciError> {
        if bdf.bus != 0 || self.devices.contains_key(&bdf) {
            return Err(PciError::SlotInUse(bdf.to_string()));
        }
        self.devices.insert(bdf, device);
        Ok(())
    }

    /// Removes and returns the function at `bdf`.
    pub fn remove_device(&mut self, bdf: PciBdf) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.devices.remove(&bdf)
    }

    /// Function 0 of the lowest device number with no function in use.
    pub fn next_free_slot(&self) -> Result<PciBdf, PciError> {
        (0..32)
            .map(|device| PciBdf::new(0, device, 0))
            .find(|bdf| {
                !self
                    .devices
                    .keys()
                    .any(|used| used.bus == 0 && used.device == bdf.device)
            })
            .ok_or(PciError::NoFreeSlot)
    }

    /// The function at `bdf`.
    pub fn device(&self, bdf: PciBdf) -> Option<Arc<Mutex<dyn PciDevice>>> {
        self.devices.get(&bdf).cloned()
    }

    /// Addresses of the functions present, in order.
    pub fn bdfs(&self) -> Vec<PciBdf> {
        self.devices.keys().copied().collect()
    }

    /// Reads `data.len()` bytes of `bdf`'s configuration space at `offset`.
    /// Absent functions and bytes past the function's space read all ones.
    pub fn config_read(&self, bdf: PciBdf, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        let Some(device) = self.devices.get(&bdf) else {
            return;
        };
        let mut device = lock(device);
        let size = device.config_space_size() as u64;
        for_each_dword_piece(offset, data.len(), |at, start, len| {
            if at >= size {
                return;
            }
            let value = device.read_config_register((at / 4) as usize).to_le_bytes();
            let lane = (at % 4) as usize;
            data[start..start + len].copy_from_slice(&value[lane..lane + len]);
        });
    }

    /// Writes `data` into `bdf`'s configuration space at `offset`, then
    /// applies any BAR move the write caused. A move the VMM cannot apply is
    /// rolled back, so the guest reads the BAR where it still is.
    pub fn config_write(&self, bdf: PciBdf, offset: u64, data: &[u8]) {
        let Some(device) = self.devices.get(&bdf) else {
            log::debug!("config write to absent function {bdf}");
            return;
        };
        let mut device = lock(device);
        let size = device.config_space_size() as u64;
        // Each dword piece's moves are applied (or rolled back) before the
        // next piece is written: a qword write over both halves of a 64-bit
        // BAR must see the BAR where the first half left it.
        for_each_dword_piece(offset, data.len(), |at, start, len| {
            if at >= size {
                return;
            }
            let moves =
                device.write_config_register((at / 4) as usize, at % 4, &data[start..start + len]);
            for params in moves {
                let Some(relocation) = &self.relocation else {
                    continue;
                };
                if let Err(e) = relocation.move_bar(&params, &mut *device) {
                    log::warn!("{bdf}: {e}; BAR {} left in place", params.bar_index);
                    device.restore_bar(&params);
                }
            }
        });
    }
}

/// Splits an access of `len` bytes at `offset` into pieces that stay inside
/// one dword: `f(address, index into the access, piece length)`.
fn for_each_dword_piece(offset: u64, len: usize, mut f: impl FnMut(u64, usize, usize)) {
    let mut done = 0;
    while done < len {
        let Some(at) = offset.checked_add(done as u64) else {
            return;
        };
        let piece = (4 - (at % 4) as usize).min(len - done);
        f(at, done, piece);
        done += piece;
    }
}

/// Configuration mechanism #1: a dword address register at 0xCF8 and a
/// data window at 0xCFC..0xD00. Insert it on the I/O bus at
/// [`PCI_CONFIG_IO_PORT`] with length [`PCI_CONFIG_IO_PORT_SIZE`].
pub struct PciConfigIo {
    root: Arc<Mutex<PciRoot>>,
    address: u32,
}

impl PciConfigIo {
    /// Mechanism #1 access to `root`.
    pub fn new(root: Arc<Mutex<PciRoot>>) -> Self {
        PciConfigIo { root, address: 0 }
    }

    /// The function and configuration offset the address register selects
    /// for data port byte `lane`, or `None` while the enable bit is clear.
    fn target(&self, lane: u64) -> Option<(PciBdf, u64)> {
        if self.address & CONFIG_ADDRESS_ENABLE == 0 {
            return None;
        }
        let bdf = PciBdf::new(
            (self.address >> 16) as u8,
            (self.address >> 11) as u8,
            (self.address >> 8) as u8,
        );
        Some((bdf, u64::from(self.address & 0xfc) + lane))
    }

    fn root(&self) -> MutexGuard<'_, PciRoot> {
        self.root.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        match offset {
            // Only whole-dword accesses reach the address register; byte
            // accesses to 0xCF8..0xCFB belong to other chipset registers.
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 if offset - 4 + data.len() as u64 <= 4 => {
                if let Some((bdf, reg)) = self.target(offset - 4) {
                    self.root().config_read(bdf, reg, data);
                }
            }
            _ => {}
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                let mut value = [0; 4];
                value.copy_from_slice(data);
                self.address = u32::from_le_bytes(value) & CONFIG_ADDRESS_MASK;
            }
            4..=7 if offset - 4 + data.len() as u64 <= 4 => {
                if let Some((bdf, reg)) = self.target(offset - 4) {
                    self.root().config_write(bdf, reg, data);
                }
            }
            _ => log::debug!(
                "ignoring {}-byte write to port {:#x}",
                data.len(),
                PCI_CONFIG_IO_PORT + offset
            ),
        }
    }
}

/// An ECAM (enhanced configuration access mechanism) window: one 4 KiB
/// page of MMIO per function, bus by bus. Insert it on the MMIO bus with
/// length [`PciConfigMmio::window_size`].
pub struct PciConfigMmio {
    root: Arc<Mutex<PciRoot>>,
    buses: u16,
}

impl PciConfigMmio {
    /// ECAM access to `root`, decoding `buses` buses (1..=256).
    pub fn new(root: Arc<Mutex<PciRoot>>, buses: u16) -> Self {
        PciConfigMmio {
            root,
            buses: buses.clamp(1, 256),
        }
    }

    /// Size of the MMIO window for the configured number of buses.
    pub fn window_size(&self) -> u64 {
        u64::from(self.buses) * ECAM_BUS_SIZE
    }

    /// Function and register offset for a window offset.
    fn decode(&self, offset: u64, len: usize) -> Option<(PciBdf, u64)> {
        let reg = offset % ECAM_FUNCTION_SIZE;
        if offset >= self.window_size() || reg + len as u64 > ECAM_FUNCTION_SIZE {
            return None;
        }
        let bdf = PciBdf::new(
            (offset / ECAM_BUS_SIZE) as u8,
            (offset >> 15) as u8,
            (offset >> 12) as u8,
        );
        Some((bdf, reg))
    }

    fn root(&self) -> MutexGuard<'_, PciRoot> {
        self.root.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BusDevice for PciConfigMmio {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match self.decode(offset, data.len()) {
            Some((bdf, reg)) => self.root().config_read(bdf, reg, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        if let Some((bdf, reg)) = self.decode(offset, data.len()) {
            self.root().config_write(bdf, reg, data);
        }
    }
}

#[cfg(test)]
#[path = "bus_tests.rs"]
mod tests;
