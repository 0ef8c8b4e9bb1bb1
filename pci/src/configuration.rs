//! Type-0 configuration space: the registers every PCI function has, with a
//! per-bit writable mask so that guest writes behave as on hardware, BARs
//! with their sizing protocol and move detection, and capability chains.

use crate::capability::{PciCapability, PciCapabilityId};
use crate::device::{BarReprogrammingParams, PciError};

/// Size of a conventional PCI configuration space.
pub const LEGACY_CONFIG_SPACE_SIZE: usize = 256;
/// Size of a PCI Express configuration space.
pub const EXTENDED_CONFIG_SPACE_SIZE: usize = 4096;
/// Number of BAR registers in a type-0 header.
pub const BAR_COUNT: usize = 6;
/// Where the first capability goes: right after the type-0 header.
pub const CAPABILITY_LIST_START: usize = 0x40;
/// Index used in [`BarReprogrammingParams`] for the expansion ROM BAR.
pub const ROM_BAR_INDEX: usize = 6;

const NUM_REGISTERS: usize = EXTENDED_CONFIG_SPACE_SIZE / 4;
const EXTENDED_CAPABILITY_START: usize = 0x100;

const ID_REG: usize = 0;
const COMMAND_REG: usize = 1;
const CLASS_REG: usize = 2;
const HEADER_REG: usize = 3;
const BAR0_REG: usize = 4;
const SUBSYSTEM_REG: usize = 11;
const ROM_BAR_REG: usize = 12;
const CAPABILITY_POINTER_REG: usize = 13;
const INTERRUPT_REG: usize = 15;

/// Command register bits a guest may change: I/O space, memory space, bus
/// master, parity error response, SERR# enable, interrupt disable.
const COMMAND_WRITABLE: u32 = 0x0547;
/// Command bit: decode I/O BARs.
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
/// Command bit: decode memory BARs.
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
/// Command bit: INTx disabled.
pub const COMMAND_INTERRUPT_DISABLE: u16 = 1 << 10;
/// Status bits that are cleared by writing 1: master data parity error,
/// signaled/received target abort, received master abort, signaled system
/// error, detected parity error.
const STATUS_RW1C: u32 = 0xf900 << 16;
const STATUS_INTERRUPT: u32 = 1 << (16 + 3);
const STATUS_CAPABILITIES_LIST: u32 = 1 << (16 + 4);

const BAR_IO_BIT: u32 = 0x1;
const BAR_MEM_64BIT: u32 = 0x4;
const BAR_MEM_PREFETCHABLE: u32 = 0x8;
const BAR_MEM_ADDRESS_MASK: u32 = !0xf;
/// x86 has a 64 KiB port space, so I/O BARs decode 16 address bits.
const BAR_IO_ADDRESS_MASK: u32 = 0xfffc;
const ROM_ENABLE: u32 = 0x1;
const ROM_ADDRESS_MASK: u32 = 0xffff_f800;

/// The address space a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PciBarRegionType {
    /// Memory below 4 GiB.
    Memory32BitRegion,
    /// Port I/O.
    IoRegion,
    /// Memory anywhere in the 64-bit space (uses two BAR registers).
    Memory64BitRegion,
}

/// Whether a memory BAR may be prefetched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PciBarPrefetchable {
    /// Reads have side effects.
    #[default]
    NotPrefetchable,
    /// Reads have no side effects.
    Prefetchable,
}

/// Layout of the header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PciHeaderType {
    /// A type-0 (endpoint) header.
    #[default]
    Device,
    /// A type-1 (PCI-to-PCI bridge) header.
    Bridge,
}

/// Base class codes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub enum PciClassCode {
    /// Mass storage controller.
    MassStorage = 0x01,
    /// Network controller.
    NetworkController = 0x02,
    /// Display controller.
    DisplayController = 0x03,
    /// Multimedia device.
    MultimediaController = 0x04,
    /// Memory controller.
    MemoryController = 0x05,
    /// Bridge device (host bridges too).
    BridgeDevice = 0x06,
    /// Simple communication controller (serial ports, virtio-console).
    SimpleCommunicationController = 0x07,
    /// Base system peripheral.
    BaseSystemPeripheral = 0x08,
    /// Unassigned class.
    #[default]
    Other = 0xff,
}

/// The read-only identity of a function, fixed when it is created.
#[derive(Clone, Copy, Debug, Default)]
pub struct PciConfigurationParams {
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Revision ID.
    pub revision_id: u8,
    /// Base class.
    pub class_code: PciClassCode,
    /// Subclass.
    pub subclass: u8,
    /// Programming interface.
    pub prog_if: u8,
    /// Subsystem vendor ID.
    pub subsystem_vendor_id: u16,
    /// Subsystem ID.
    pub subsystem_id: u16,
    /// Header layout.
    pub header_type: PciHeaderType,
    /// Whether the function is one of several in its device.
    pub multifunction: bool,
    /// INTx pin: 0 for none, 1..=4 for INTA#..INTD#.
    pub interrupt_pin: u8,
    /// Expose the 4 KiB PCI Express configuration space.
    pub extended_config_space: bool,
}

/// What backs one BAR register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum BarSlot {
    #[default]
    Unused,
    /// A BAR of `size` bytes, decoded at `mapped` as far as the owner knows.
    Bar {
        region: PciBarRegionType,
        size: u64,
        mapped: u64,
    },
    /// The upper dword of the 64-bit BAR in the register below.
    Upper,
}

/// A PCI function's configuration space.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    registers: Box<[u32; NUM_REGISTERS]>,
    writable: Box<[u32; NUM_REGISTERS]>,
    write_one_to_clear: Box<[u32; NUM_REGISTERS]>,
    size: usize,
    bars: [BarSlot; BAR_COUNT],
    rom: BarSlot,
    /// Offset and length of each capability, in chain order.
    capabilities: Vec<(usize, usize)>,
    next_capability: usize,
    extended_capabilities: Vec<(usize, usize)>,
    next_extended_capability: usize,
}

fn align_up(value: usize, align: usize) -> usize {
    value.div_ceil(align) * align
}

/// Mask of the bits covered by `len` bytes starting at byte `offset` of a dword.
fn byte_lane_mask(offset: usize, len: usize) -> u32 {
    let bits = if len >= 4 {
        u32::MAX
    } else {
        (1u32 << (len * 8)) - 1
    };
    bits << (offset * 8)
}

impl PciConfiguration {
    /// A configuration space with the given identity, no BARs and no
    /// capabilities.
    pub fn new(params: &PciConfigurationParams) -> Self {
        let mut config = PciConfiguration {
            registers: Box::new([0; NUM_REGISTERS]),
            writable: Box::new([0; NUM_REGISTERS]),
            write_one_to_clear: Box::new([0; NUM_REGISTERS]),
            size: if params.extended_config_space {
                EXTENDED_CONFIG_SPACE_SIZE
            } else {
                LEGACY_CONFIG_SPACE_SIZE
            },
            bars: [BarSlot::Unused; BAR_COUNT],
            rom: BarSlot::Unused,
            capabilities: Vec::new(),
            next_capability: CAPABILITY_LIST_START,
            extended_capabilities: Vec::new(),
            next_extended_capability: EXTENDED_CAPABILITY_START,
        };
        config.registers[ID_REG] = u32::from(params.device_id) << 16 | u32::from(params.vendor_id);
        config.writable[COMMAND_REG] = COMMAND_WRITABLE;
        config.write_one_to_clear[COMMAND_REG] = STATUS_RW1C;
        config.registers[CLASS_REG] = u32::from(params.class_code as u8) << 24
            | u32::from(params.subclass) << 16
            | u32::from(params.prog_if) << 8
            | u32::from(params.revision_id);
        let header_type: u8 = match params.header_type {
            PciHeaderType::Device => 0x00,
            PciHeaderType::Bridge => 0x01,
        } | if params.multifunction { 0x80 } else { 0 };
        config.registers[HEADER_REG] = u32::from(header_type) << 16;
        // Cache line size is read-write on hardware and Linux programs it.
        config.writable[HEADER_REG] = 0xff;
        config.registers[SUBSYSTEM_REG] =
            u32::from(params.subsystem_id) << 16 | u32::from(params.subsystem_vendor_id);
        config.registers[INTERRUPT_REG] = u32::from(params.interrupt_pin.min(4)) << 8;
        // The interrupt line is a scratch register for the OS.
        config.writable[INTERRUPT_REG] = 0xff;
        config
    }

    /// Size of this configuration space in bytes (256 or 4096).
    pub fn size(&self) -> usize {
        self.size
    }

    /// Reads dword `reg_idx`; registers outside the space read as all ones.
    pub fn read_reg(&self, reg_idx: usize) -> u32 {
        if reg_idx >= self.size / 4 {
            return u32::MAX;
        }
        self.registers[reg_idx]
    }

    /// Applies a guest write of `data` at byte `offset` of dword `reg_idx`,
    /// honouring read-only and write-one-to-clear bits. Returns the BARs
    /// whose decoded address changed.
    pub fn write_reg(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogrammingParams> {
        let in_dword = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data.len()))
            .is_some_and(|end| end <= 4);
        if reg_idx >= self.size / 4 || data.is_empty() || !in_dword {
            log::debug!(
                "ignoring config write of {} bytes at register {reg_idx} offset {offset}",
                data.len()
            );
            return Vec::new();
        }
        // In range: checked above.
        let offset = offset as usize;
        let lanes = byte_lane_mask(offset, data.len());
        let mut value = 0u32;
        for (i, byte) in data.iter().enumerate() {
            value |= u32::from(*byte) << ((offset + i) * 8);
        }
        let old = self.registers[reg_idx];
        let writable = self.writable[reg_idx] & lanes;
        let clear = self.write_one_to_clear[reg_idx] & lanes & value;
        self.registers[reg_idx] = ((old & !writable) | (value & writable)) & !clear;

        let touches_bar = (BAR0_REG..BAR0_REG + BAR_COUNT).contains(&reg_idx);
        if reg_idx == COMMAND_REG || reg_idx == ROM_BAR_REG || touches_bar {
            self.detect_bar_moves(reg_idx)
        } else {
            Vec::new()
        }
    }

    /// Reads `data.len()` bytes at `offset`, device side (no masks).
    /// Bytes outside the space read as all ones.
    pub fn read_bytes(&self, offset: usize, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = match offset.checked_add(i) {
                Some(at) if at < self.size => (self.registers[at / 4] >> ((at % 4) * 8)) as u8,
                _ => 0xff,
            };
        }
    }

    /// Writes bytes at `offset`, device side: ignores the writable masks, so
    /// a device can update registers that are read-only to the guest (MSI
    /// pending bits, interrupt status). Bytes outside the space are dropped.
    pub fn write_bytes(&mut self, offset: usize, data: &[u8]) {
        for (i, byte) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i).filter(|at| *at < self.size) else {
                return;
            };
            let shift = (at % 4) * 8;
            let reg = &mut self.registers[at / 4];
            *reg = (*reg & !(0xff << shift)) | (u32::from(*byte) << shift);
        }
    }

    /// Reads a little-endian u16 at `offset`, device side.
    pub fn read_u16(&self, offset: usize) -> u16 {
        let mut bytes = [0; 2];
        self.read_bytes(offset, &mut bytes);
        u16::from_le_bytes(bytes)
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.registers[COMMAND_REG] as u16
    }

    /// Whether the guest enabled bus mastering (DMA).
    pub fn bus_master_enabled(&self) -> bool {
        self.command() & (1 << 2) != 0
    }

    /// Whether the guest disabled INTx through the command register.
    pub fn intx_disabled(&self) -> bool {
        self.command() & COMMAND_INTERRUPT_DISABLE != 0
    }

    /// Sets or clears the status register's interrupt status bit, which
    /// reflects a pending INTx.
    pub fn set_interrupt_status(&mut self, pending: bool) {
        if pending {
            self.registers[COMMAND_REG] |= STATUS_INTERRUPT;
        } else {
            self.registers[COMMAND_REG] &= !STATUS_INTERRUPT;
        }
    }

    /// The INTx pin (0 for none, 1..=4).
    pub fn interrupt_pin(&self) -> u8 {
        (self.registers[INTERRUPT_REG] >> 8) as u8
    }

    /// Sets the interrupt line register, as firmware would.
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.registers[INTERRUPT_REG] = (self.registers[INTERRUPT_REG] & !0xff) | u32::from(line);
    }
}

/// BAR registration, sizing and move detection.
impl PciConfiguration {
    /// Adds BAR `index` of `size` bytes at `addr` (already allocated by the
    /// VMM). A 64-bit BAR also takes register `index + 1`.
    pub fn add_bar(
        &mut self,
        index: usize,
        addr: u64,
        size: u64,
        region: PciBarRegionType,
        prefetchable: PciBarPrefetchable,
    ) -> Result<(), PciError> {
        let is_64bit = region == PciBarRegionType::Memory64BitRegion;
        if index >= BAR_COUNT || (is_64bit && index + 1 >= BAR_COUNT) {
            return Err(PciError::InvalidBarIndex(index));
        }
        if self.bars[index] != BarSlot::Unused
            || (is_64bit && self.bars[index + 1] != BarSlot::Unused)
        {
            return Err(PciError::BarInUse(index));
        }
        let (min_size, max_size) = match region {
            PciBarRegionType::IoRegion => (4, 256),
            PciBarRegionType::Memory32BitRegion => (16, 1 << 31),
            PciBarRegionType::Memory64BitRegion => (16, 1 << 63),
        };
        if !size.is_power_of_two() || size < min_size || size > max_size {
            return Err(PciError::InvalidBarSize { index, size });
        }
        let limit = match region {
            PciBarRegionType::IoRegion => 1 << 16,
            PciBarRegionType::Memory32BitRegion => 1 << 32,
            PciBarRegionType::Memory64BitRegion => u64::MAX,
        };
        if addr % size != 0 || addr > limit - size {
            return Err(PciError::InvalidBarAddress { index, addr });
        }

        let reg = BAR0_REG + index;
        let size_mask = !(size - 1);
        match region {
            PciBarRegionType::IoRegion => {
                self.writable[reg] = size_mask as u32 & BAR_IO_ADDRESS_MASK;
                self.registers[reg] = addr as u32 | BAR_IO_BIT;
            }
            PciBarRegionType::Memory32BitRegion | PciBarRegionType::Memory64BitRegion => {
                let mut type_bits = 0;
                if is_64bit {
                    type_bits |= BAR_MEM_64BIT;
                }
                if prefetchable == PciBarPrefetchable::Prefetchable {
                    type_bits |= BAR_MEM_PREFETCHABLE;
                }
                self.writable[reg] = size_mask as u32 & BAR_MEM_ADDRESS_MASK;
                self.registers[reg] = (addr as u32 & BAR_MEM_ADDRESS_MASK) | type_bits;
                if is_64bit {
                    self.writable[reg + 1] = (size_mask >> 32) as u32;
                    self.registers[reg + 1] = (addr >> 32) as u32;
                    self.bars[index + 1] = BarSlot::Upper;
                }
            }
        }
        self.bars[index] = BarSlot::Bar {
            region,
            size,
            mapped: addr,
        };
        Ok(())
    }

    /// Adds an expansion ROM BAR of `size` bytes at `addr`.
    pub fn add_rom_bar(&mut self, addr: u32, size: u32) -> Result<(), PciError> {
        if self.rom != BarSlot::Unused {
            return Err(PciError::BarInUse(ROM_BAR_INDEX));
        }
        if !size.is_power_of_two() || size < 2048 {
            return Err(PciError::InvalidBarSize {
                index: ROM_BAR_INDEX,
                size: size.into(),
            });
        }
        if addr % size != 0 {
            return Err(PciError::InvalidBarAddress {
                index: ROM_BAR_INDEX,
                addr: addr.into(),
            });
        }
        self.writable[ROM_BAR_REG] = (!(size - 1) & ROM_ADDRESS_MASK) | ROM_ENABLE;
        self.registers[ROM_BAR_REG] = addr;
        self.rom = BarSlot::Bar {
            region: PciBarRegionType::Memory32BitRegion,
            size: size.into(),
            mapped: addr.into(),
        };
        Ok(())
    }

    /// The address currently programmed in BAR `index` (or the ROM BAR for
    /// [`ROM_BAR_INDEX`]), or `None` if that BAR does not exist.
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let (slot, reg) = self.bar_slot(index)?;
        match slot {
            BarSlot::Bar {
                region: PciBarRegionType::IoRegion,
                ..
            } => Some(u64::from(self.registers[reg] & BAR_IO_ADDRESS_MASK)),
            BarSlot::Bar {
                region: PciBarRegionType::Memory64BitRegion,
                ..
            } => Some(
                u64::from(self.registers[reg + 1]) << 32
                    | u64::from(self.registers[reg] & BAR_MEM_ADDRESS_MASK),
            ),
            BarSlot::Bar { .. } if index == ROM_BAR_INDEX => {
                Some(u64::from(self.registers[reg] & ROM_ADDRESS_MASK))
            }
            BarSlot::Bar { .. } => Some(u64::from(self.registers[reg] & BAR_MEM_ADDRESS_MASK)),
            BarSlot::Unused | BarSlot::Upper => None,
        }
    }

    /// Size of BAR `index` (or the ROM BAR), or `None` if it does not exist.
    pub fn bar_size(&self, index: usize) -> Option<u64> {
        match self.bar_slot(index)?.0 {
            BarSlot::Bar { size, .. } => Some(size),
            BarSlot::Unused | BarSlot::Upper => None,
        }
    }

    /// The address space of BAR `index`, or `None` if it does not exist.
    pub fn bar_region_type(&self, index: usize) -> Option<PciBarRegionType> {
        match self.bar_slot(index)?.0 {
            BarSlot::Bar { region, .. } => Some(region),
            BarSlot::Unused | BarSlot::Upper => None,
        }
    }

    /// Where the owner has BAR `index` mapped: the address reported by the
    /// last move, which differs from [`bar_address`](Self::bar_address)
    /// while the guest is sizing or decoding is off.
    pub fn bar_mapped_address(&self, index: usize) -> Option<u64> {
        match self.bar_slot(index)?.0 {
            BarSlot::Bar { mapped, .. } => Some(mapped),
            BarSlot::Unused | BarSlot::Upper => None,
        }
    }

    /// Whether the expansion ROM is enabled and decoded.
    pub fn rom_enabled(&self) -> bool {
        self.rom != BarSlot::Unused
            && self.registers[ROM_BAR_REG] & ROM_ENABLE != 0
            && self.command() & COMMAND_MEMORY_SPACE != 0
    }

    /// Puts a BAR back where it was mapped before a move the owner could not
    /// apply.
    pub fn restore_bar(&mut self, params: &BarReprogrammingParams) {
        let Some((slot, reg)) = self.bar_slot(params.bar_index) else {
            return;
        };
        let BarSlot::Bar { region, .. } = slot else {
            return;
        };
        let old = params.old_base;
        match region {
            PciBarRegionType::IoRegion => {
                self.registers[reg] = (self.registers[reg] & !BAR_IO_ADDRESS_MASK)
                    | (old as u32 & BAR_IO_ADDRESS_MASK);
            }
            _ if params.bar_index == ROM_BAR_INDEX => {
                self.registers[reg] =
                    (self.registers[reg] & !ROM_ADDRESS_MASK) | (old as u32 & ROM_ADDRESS_MASK);
            }
            PciBarRegionType::Memory32BitRegion | PciBarRegionType::Memory64BitRegion => {
                self.registers[reg] = (self.registers[reg] & !BAR_MEM_ADDRESS_MASK)
                    | (old as u32 & BAR_MEM_ADDRESS_MASK);
                if region == PciBarRegionType::Memory64BitRegion {
                    self.registers[reg + 1] = (old >> 32) as u32;
                }
            }
        }
        self.set_mapped(params.bar_index, old);
    }

    fn bar_slot(&self, index: usize) -> Option<(BarSlot, usize)> {
        if index == ROM_BAR_INDEX {
            Some((self.rom, ROM_BAR_REG))
        } else {
            Some((*self.bars.get(index)?, BAR0_REG + index))
        }
    }

    fn set_mapped(&mut self, index: usize, addr: u64) {
        let slot = if index == ROM_BAR_INDEX {
            &mut self.rom
        } else if let Some(slot) = self.bars.get_mut(index) {
            slot
        } else {
            return;
        };
        if let BarSlot::Bar { mapped, .. } = slot {
            *mapped = addr;
        }
    }

    /// True while the guest has all ones in a BAR's address bits: it is
    /// sizing the BAR, and the value is not an address to move to.
    fn bar_is_sizing(&self, index: usize) -> bool {
        let Some((_, reg)) = self.bar_slot(index) else {
            return false;
        };
        // The ROM BAR's writable bit 0 is its enable, not an address bit; in
        // the upper dword of a 64-bit BAR bit 0 is address bit 32.
        let all_ones = |r: usize| {
            let enable = if r == ROM_BAR_REG { ROM_ENABLE } else { 0 };
            let address_bits = self.writable[r] & !enable;
            address_bits != 0 && self.registers[r] & address_bits == address_bits
        };
        let upper = self.bars.get(index + 1) == Some(&BarSlot::Upper) && index != ROM_BAR_INDEX;
        all_ones(reg) || (upper && all_ones(reg + 1))
    }

    /// Compares each decoded BAR with where its owner has it mapped, after
    /// a write to register `written`. A BAR only moves while its decoding
    /// is enabled, so the transient values of a 64-bit BAR rewritten half by
    /// half with decoding off never reach the owner. A write of all ones to
    /// a decoding BAR's own registers is sizing, not a move; but when
    /// decoding is turned on, whatever the BARs hold is where they decode,
    /// so an all-ones value left there is a move like any other.
    fn detect_bar_moves(&mut self, written: usize) -> Vec<BarReprogrammingParams> {
        let command = self.command();
        let mut moves = Vec::new();
        for index in (0..BAR_COUNT).chain([ROM_BAR_INDEX]) {
            let Some((
                BarSlot::Bar {
                    region,
                    size,
                    mapped,
                },
                _,
            )) = self.bar_slot(index)
            else {
                continue;
            };
            let decoding = match region {
                PciBarRegionType::IoRegion => command & COMMAND_IO_SPACE != 0,
                _ => command & COMMAND_MEMORY_SPACE != 0,
            };
            let rom_off = index == ROM_BAR_INDEX && self.registers[ROM_BAR_REG] & ROM_ENABLE == 0;
            let own_register = match self.bar_slot(index) {
                Some((_, reg)) if region == PciBarRegionType::Memory64BitRegion => {
                    written == reg || written == reg + 1
                }
                Some((_, reg)) => written == reg,
                None => false,
            };
            if !decoding || rom_off || (own_register && self.bar_is_sizing(index)) {
                continue;
            }
            let Some(addr) = self.bar_address(index) else {
                continue;
            };
            if addr != mapped {
                log::debug!("BAR {index} moved from {mapped:#x} to {addr:#x}");
                moves.push(BarReprogrammingParams {
                    bar_index: index,
                    old_base: mapped,
                    new_base: addr,
                    len: size,
                    region_type: region,
                });
                self.set_mapped(index, addr);
            }
        }
        moves
    }
}

/// Capability chains.
impl PciConfiguration {
    /// Appends `cap` to the capability list and returns its offset. The
    /// chain stays well formed: dword aligned, inside the first 256 bytes,
    /// next pointers and IDs read-only, status capability bit set.
    pub fn add_capability(&mut self, cap: &dyn PciCapability) -> Result<usize, PciError> {
        let body = cap.body();
        let mask = cap.writable_mask();
        if mask.len() != body.len() {
            return Err(PciError::InvalidCapability(
                "writable mask length differs from body length",
            ));
        }
        let len = body.len() + 2;
        let offset = self.next_capability;
        if offset + len > LEGACY_CONFIG_SPACE_SIZE {
            return Err(PciError::CapabilitySpaceFull { size: len });
        }
        self.write_bytes(offset, &[cap.id() as u8, 0]);
        self.write_bytes(offset + 2, &body);
        self.set_writable_bytes(offset + 2, &mask);
        match self.capabilities.last() {
            Some(&(last, _)) => self.write_bytes(last + 1, &[offset as u8]),
            None => self.write_bytes(CAPABILITY_POINTER_REG * 4, &[offset as u8]),
        }
        self.registers[COMMAND_REG] |= STATUS_CAPABILITIES_LIST;
        self.capabilities.push((offset, len));
        self.next_capability = align_up(offset + len, 4);
        Ok(offset)
    }

    /// Appends a PCI Express extended capability (in the space above 256
    /// bytes) with `body` following its 4-byte header, and returns its offset.
    pub fn add_extended_capability(
        &mut self,
        id: u16,
        version: u8,
        body: &[u8],
        writable_mask: &[u8],
    ) -> Result<usize, PciError> {
        if writable_mask.len() != body.len() {
            return Err(PciError::InvalidCapability(
                "writable mask length differs from body length",
            ));
        }
        let len = body.len() + 4;
        let offset = self.next_extended_capability;
        if self.size < EXTENDED_CONFIG_SPACE_SIZE || offset + len > self.size {
            return Err(PciError::CapabilitySpaceFull { size: len });
        }
        let header = u32::from(id) | u32::from(version & 0xf) << 16;
        self.write_bytes(offset, &header.to_le_bytes());
        self.write_bytes(offset + 4, body);
        self.set_writable_bytes(offset + 4, writable_mask);
        if let Some(&(last, _)) = self.extended_capabilities.last() {
            self.registers[last / 4] |= (offset as u32) << 20;
        }
        self.extended_capabilities.push((offset, len));
        self.next_extended_capability = align_up(offset + len, 4);
        Ok(offset)
    }

    /// Offset of the first capability with `id`, if any.
    pub fn find_capability(&self, id: PciCapabilityId) -> Option<usize> {
        self.capabilities
            .iter()
            .map(|&(offset, _)| offset)
            .find(|&offset| self.registers[offset / 4] as u8 == id as u8)
    }

    /// Offsets and lengths of the capabilities, in chain order.
    pub fn capabilities(&self) -> &[(usize, usize)] {
        &self.capabilities
    }

    fn set_writable_bytes(&mut self, offset: usize, mask: &[u8]) {
        for (i, bits) in mask.iter().enumerate() {
            let at = offset + i;
            if at >= self.size {
                return;
            }
            let shift = (at % 4) * 8;
            let reg = &mut self.writable[at / 4];
            *reg = (*reg & !(0xff << shift)) | (u32::from(*bits) << shift);
        }
    }
}

#[cfg(test)]
#[path = "configuration_tests.rs"]
mod tests;
