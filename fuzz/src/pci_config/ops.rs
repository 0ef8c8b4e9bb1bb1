//! What the fuzzer drives: guest configuration accesses through both
//! mechanisms, MSI-X table/PBA accesses through the BARs, and device-side
//! interrupts.

use arbitrary::Arbitrary;
use pci::{PciBdf, ECAM_BUS_SIZE, ECAM_FUNCTION_SIZE};

/// Width of a port access (the data port takes 1, 2 or 4 bytes).
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoWidth {
    /// Byte.
    One,
    /// Word.
    Two,
    /// Dword.
    Four,
}

impl IoWidth {
    /// Bytes.
    pub fn bytes(self) -> usize {
        match self {
            IoWidth::One => 1,
            IoWidth::Two => 2,
            IoWidth::Four => 4,
        }
    }
}

/// Width of an MMIO access.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// Byte.
    One,
    /// Word.
    Two,
    /// Dword.
    Four,
    /// Qword.
    Eight,
}

impl Width {
    /// Bytes.
    pub fn bytes(self) -> usize {
        match self {
            Width::One => 1,
            Width::Two => 2,
            Width::Four => 4,
            Width::Eight => 8,
        }
    }
}

/// A configuration-space function to aim at. Named ones keep the fuzzer on
/// interesting targets; `Raw` reaches anything the address can encode.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Func {
    /// The test function at 00:01.0.
    Device,
    /// The host bridge at 00:00.0.
    HostBridge,
    /// 00:01.1: a function of a present device that does not exist.
    DeviceFn1,
    /// 00:02.0: an empty slot.
    EmptySlot,
    /// 01:00.0: a bus inside the ECAM window with nothing on it.
    Bus1,
    /// Any address.
    Raw {
        /// Bus number.
        bus: u8,
        /// Device number (wraps at 32).
        device: u8,
        /// Function number (wraps at 8).
        function: u8,
    },
}

impl Func {
    /// The address this names.
    pub fn bdf(self) -> PciBdf {
        match self {
            Func::Device => PciBdf::new(0, 1, 0),
            Func::HostBridge => PciBdf::new(0, 0, 0),
            Func::DeviceFn1 => PciBdf::new(0, 1, 1),
            Func::EmptySlot => PciBdf::new(0, 2, 0),
            Func::Bus1 => PciBdf::new(1, 0, 0),
            Func::Raw {
                bus,
                device,
                function,
            } => PciBdf::new(bus, device, function),
        }
    }
}

/// The 0xCF8 value selecting dword `reg` of `bdf`, enable bit set.
pub fn config_address(bdf: PciBdf, reg: u8) -> u32 {
    0x8000_0000 | u32::from(bdf.routing_id()) << 8 | u32::from(reg & 0xfc)
}

/// The ECAM window offset of byte `reg` of `bdf`.
pub fn ecam_offset(bdf: PciBdf, reg: u64) -> u64 {
    u64::from(bdf.bus()) * ECAM_BUS_SIZE
        + u64::from(bdf.device()) * 8 * ECAM_FUNCTION_SIZE
        + u64::from(bdf.function()) * ECAM_FUNCTION_SIZE
        + reg
}

/// One step of the guest (or the device).
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Write to port 0xCF8 + `port % 8`: the address register or the data
    /// window, at any width and lane.
    IoWrite {
        /// Port offset (mod 8).
        port: u8,
        /// Access width.
        width: IoWidth,
        /// Value, little endian, truncated to the width.
        value: u32,
    },
    /// Read from port 0xCF8 + `port % 8`.
    IoRead {
        /// Port offset (mod 8).
        port: u8,
        /// Access width.
        width: IoWidth,
    },
    /// A dword write of a well-formed address to 0xCF8.
    IoSelect {
        /// Function.
        func: Func,
        /// Register (low two bits are dropped by the hardware).
        reg: u8,
    },
    /// ECAM read of byte `offset % 4096` of `func`.
    EcamRead {
        /// Function.
        func: Func,
        /// Register offset (mod 4096).
        offset: u16,
        /// Access width.
        width: Width,
    },
    /// ECAM write to byte `offset % 4096` of `func`.
    EcamWrite {
        /// Function.
        func: Func,
        /// Register offset (mod 4096).
        offset: u16,
        /// Access width.
        width: Width,
        /// Value, little endian, truncated to the width.
        value: u64,
    },
    /// ECAM read anywhere in (or just past) the window.
    EcamRawRead {
        /// Window offset.
        offset: u32,
        /// Access width.
        width: Width,
    },
    /// ECAM write anywhere in (or just past) the window.
    EcamRawWrite {
        /// Window offset.
        offset: u32,
        /// Access width.
        width: Width,
        /// Value, little endian, truncated to the width.
        value: u64,
    },
    /// Read through the bus at `offset` into BAR `bar` (see `BARS`).
    BarRead {
        /// Which BAR (mod the number of BARs).
        bar: u8,
        /// Offset into the BAR (mod its size).
        offset: u16,
        /// Access width.
        width: Width,
    },
    /// Write through the bus at `offset` into BAR `bar`.
    BarWrite {
        /// Which BAR (mod the number of BARs).
        bar: u8,
        /// Offset into the BAR (mod its size).
        offset: u16,
        /// Access width.
        width: Width,
        /// Value, little endian, truncated to the width.
        value: u64,
    },
    /// The device raises MSI-X vector `vector` (any value, even invalid).
    MsixTrigger {
        /// Vector.
        vector: u16,
    },
    /// The device raises MSI vector `vector`.
    MsiTrigger {
        /// Vector.
        vector: u16,
    },
}

/// Serializes `ops` into the bytes `Vec::<Op>::arbitrary_take_rest` turns
/// back into them, for hand-written seeds. The round trip is checked by a
/// test, so a change in `arbitrary`'s encoding cannot go unnoticed.
pub fn encode(ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    for op in ops {
        // A "keep going" flag precedes each element.
        out.push(1);
        encode_op(&mut out, op);
    }
    out.push(0);
    out
}

/// The u32 that derived `Arbitrary` maps to variant `index` of `count`
/// (it picks `(x * count) >> 32`).
fn variant(out: &mut Vec<u8>, index: u64, count: u64) {
    let x = (index << 32).div_ceil(count) as u32;
    out.extend_from_slice(&x.to_le_bytes());
}

fn encode_width(out: &mut Vec<u8>, w: Width) {
    variant(out, w.bytes().trailing_zeros().into(), 4);
}

fn encode_io_width(out: &mut Vec<u8>, w: IoWidth) {
    variant(out, w.bytes().trailing_zeros().into(), 3);
}

fn encode_func(out: &mut Vec<u8>, f: Func) {
    let index = match f {
        Func::Device => 0,
        Func::HostBridge => 1,
        Func::DeviceFn1 => 2,
        Func::EmptySlot => 3,
        Func::Bus1 => 4,
        Func::Raw { .. } => 5,
    };
    variant(out, index, 6);
    if let Func::Raw {
        bus,
        device,
        function,
    } = f
    {
        out.extend_from_slice(&[bus, device, function]);
    }
}

fn encode_op(out: &mut Vec<u8>, op: &Op) {
    const COUNT: u64 = 11;
    match *op {
        Op::IoWrite { port, width, value } => {
            variant(out, 0, COUNT);
            out.push(port);
            encode_io_width(out, width);
            out.extend_from_slice(&value.to_le_bytes());
        }
        Op::IoRead { port, width } => {
            variant(out, 1, COUNT);
            out.push(port);
            encode_io_width(out, width);
        }
        Op::IoSelect { func, reg } => {
            variant(out, 2, COUNT);
            encode_func(out, func);
            out.push(reg);
        }
        Op::EcamRead {
            func,
            offset,
            width,
        } => {
            variant(out, 3, COUNT);
            encode_func(out, func);
            out.extend_from_slice(&offset.to_le_bytes());
            encode_width(out, width);
        }
        Op::EcamWrite {
            func,
            offset,
            width,
            value,
        } => {
            variant(out, 4, COUNT);
            encode_func(out, func);
            out.extend_from_slice(&offset.to_le_bytes());
            encode_width(out, width);
            out.extend_from_slice(&value.to_le_bytes());
        }
        Op::EcamRawRead { offset, width } => {
            variant(out, 5, COUNT);
            out.extend_from_slice(&offset.to_le_bytes());
            encode_width(out, width);
        }
        Op::EcamRawWrite {
            offset,
            width,
            value,
        } => {
            variant(out, 6, COUNT);
            out.extend_from_slice(&offset.to_le_bytes());
            encode_width(out, width);
            out.extend_from_slice(&value.to_le_bytes());
        }
        Op::BarRead { bar, offset, width } => {
            variant(out, 7, COUNT);
            out.push(bar);
            out.extend_from_slice(&offset.to_le_bytes());
            encode_width(out, width);
        }
        Op::BarWrite {
            bar,
            offset,
            width,
            value,
        } => {
            variant(out, 8, COUNT);
            out.push(bar);
            out.extend_from_slice(&offset.to_le_bytes());
            encode_width(out, width);
            out.extend_from_slice(&value.to_le_bytes());
        }
        Op::MsixTrigger { vector } => {
            variant(out, 9, COUNT);
            out.extend_from_slice(&vector.to_le_bytes());
        }
        Op::MsiTrigger { vector } => {
            variant(out, 10, COUNT);
            out.extend_from_slice(&vector.to_le_bytes());
        }
    }
}
