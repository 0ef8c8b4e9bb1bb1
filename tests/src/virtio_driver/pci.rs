//! Generic PCI work a guest does before any virtio driver runs:
//! enumeration, BAR sizing and assignment, enabling decoding and bus
//! mastering, and walking the capability list.

use pci::PciBdf;

use super::machine::ConfigAccess;
use super::DriverError;

/// Configuration space offsets of a type-0 header.
pub const VENDOR_ID: u16 = 0x00;
/// Device ID.
pub const DEVICE_ID: u16 = 0x02;
/// Command register.
pub const COMMAND: u16 = 0x04;
/// Status register.
pub const STATUS: u16 = 0x06;
/// Revision ID.
pub const REVISION: u16 = 0x08;
/// Class code: programming interface, subclass, base class.
pub const CLASS: u16 = 0x09;
/// Header type.
pub const HEADER_TYPE: u16 = 0x0e;
/// First BAR.
pub const BAR0: u16 = 0x10;
/// Subsystem vendor ID.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0x2c;
/// Subsystem ID.
pub const SUBSYSTEM_ID: u16 = 0x2e;
/// Capability pointer.
pub const CAPABILITIES_POINTER: u16 = 0x34;
/// Interrupt pin.
pub const INTERRUPT_PIN: u16 = 0x3d;

/// Command: decode memory BARs.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command: the function may master the bus (DMA).
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command: INTx disabled.
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status: INTx pending.
pub const STATUS_INTERRUPT: u16 = 1 << 3;
/// Status: the capability list is valid.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;

/// A function found on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciFunction {
    /// Its address.
    pub bdf: PciBdf,
    /// Vendor ID.
    pub vendor_id: u16,
    /// Device ID.
    pub device_id: u16,
    /// Base class, subclass, programming interface.
    pub class: (u8, u8, u8),
}

/// Every function on bus 0: function 0 of each device, and functions 1..8
/// of multi-function devices. Absent functions read all ones.
pub fn enumerate(cfg: &ConfigAccess) -> Vec<PciFunction> {
    let mut found = Vec::new();
    for device in 0..32 {
        for function in 0..8 {
            let bdf = PciBdf::new(0, device, function);
            let vendor_id = cfg.read16(bdf, VENDOR_ID);
            if vendor_id == 0xffff {
                if function == 0 {
                    break;
                }
                continue;
            }
            found.push(PciFunction {
                bdf,
                vendor_id,
                device_id: cfg.read16(bdf, DEVICE_ID),
                class: (
                    cfg.read8(bdf, CLASS + 2),
                    cfg.read8(bdf, CLASS + 1),
                    cfg.read8(bdf, CLASS),
                ),
            });
            if function == 0 && cfg.read8(bdf, HEADER_TYPE) & 0x80 == 0 {
                break;
            }
        }
    }
    found
}

/// What a BAR register pair says about the BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarInfo {
    /// Size in bytes.
    pub size: u64,
    /// Whether it takes two registers.
    pub is_64bit: bool,
    /// Whether it is prefetchable.
    pub prefetchable: bool,
}

/// Sizes memory BAR `index` with decoding off, restoring its address.
pub fn size_bar(cfg: &ConfigAccess, bdf: PciBdf, index: u16) -> Result<BarInfo, DriverError> {
    let reg = BAR0 + 4 * index;
    let command = cfg.read16(bdf, COMMAND);
    cfg.write16(bdf, COMMAND, command & !COMMAND_MEMORY);
    let low = cfg.read32(bdf, reg);
    if low & 1 != 0 {
        cfg.write16(bdf, COMMAND, command);
        return Err(DriverError::Bar("BAR is an I/O BAR"));
    }
    let is_64bit = (low >> 1) & 3 == 2;
    cfg.write32(bdf, reg, u32::MAX);
    let mut mask = u64::from(cfg.read32(bdf, reg) & !0xf);
    cfg.write32(bdf, reg, low);
    if is_64bit {
        let high = cfg.read32(bdf, reg + 4);
        cfg.write32(bdf, reg + 4, u32::MAX);
        mask |= u64::from(cfg.read32(bdf, reg + 4)) << 32;
        cfg.write32(bdf, reg + 4, high);
    } else {
        mask |= 0xffff_ffff_0000_0000;
    }
    cfg.write16(bdf, COMMAND, command);
    if mask == 0 || mask == 0xffff_ffff_0000_0000 {
        return Err(DriverError::Bar("BAR is not implemented"));
    }
    Ok(BarInfo {
        size: (!mask).wrapping_add(1),
        is_64bit,
        prefetchable: low & 0x8 != 0,
    })
}

/// Reads the address memory BAR `index` decodes.
pub fn bar_address(cfg: &ConfigAccess, bdf: PciBdf, index: u16) -> u64 {
    let reg = BAR0 + 4 * index;
    let low = cfg.read32(bdf, reg);
    let mut addr = u64::from(low & !0xf);
    if (low >> 1) & 3 == 2 {
        addr |= u64::from(cfg.read32(bdf, reg + 4)) << 32;
    }
    addr
}

/// Programs memory BAR `index` to `addr` with decoding off, the way
/// firmware assigns resources; the caller enables decoding afterwards.
pub fn program_bar(cfg: &ConfigAccess, bdf: PciBdf, index: u16, info: &BarInfo, addr: u64) {
    let reg = BAR0 + 4 * index;
    let command = cfg.read16(bdf, COMMAND);
    cfg.write16(bdf, COMMAND, command & !COMMAND_MEMORY);
    cfg.write32(bdf, reg, addr as u32);
    if info.is_64bit {
        cfg.write32(bdf, reg + 4, (addr >> 32) as u32);
    }
    cfg.write16(bdf, COMMAND, command);
}

/// Sets `bits` in the command register.
pub fn set_command_bits(cfg: &ConfigAccess, bdf: PciBdf, bits: u16) {
    let command = cfg.read16(bdf, COMMAND);
    cfg.write16(bdf, COMMAND, command | bits);
}

/// Clears `bits` in the command register.
pub fn clear_command_bits(cfg: &ConfigAccess, bdf: PciBdf, bits: u16) {
    let command = cfg.read16(bdf, COMMAND);
    cfg.write16(bdf, COMMAND, command & !bits);
}

/// A capability in the list: its offset and ID.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    /// Offset in configuration space.
    pub offset: u16,
    /// Capability ID.
    pub id: u8,
}

/// The capability list, guarding against loops and bad pointers.
pub fn capabilities(cfg: &ConfigAccess, bdf: PciBdf) -> Result<Vec<Capability>, DriverError> {
    if cfg.read16(bdf, STATUS) & STATUS_CAPABILITIES == 0 {
        return Ok(Vec::new());
    }
    let mut caps = Vec::new();
    let mut next = u16::from(cfg.read8(bdf, CAPABILITIES_POINTER) & !3);
    while next != 0 {
        if next < 0x40 || caps.len() >= 48 {
            return Err(DriverError::Capability("malformed capability list"));
        }
        caps.push(Capability {
            offset: next,
            id: cfg.read8(bdf, next),
        });
        next = u16::from(cfg.read8(bdf, next + 1) & !3);
    }
    Ok(caps)
}
