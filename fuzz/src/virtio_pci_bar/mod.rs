//! The `virtio_pci_bar` target: a `VirtioPciDevice` around a real device
//! (rng, blk, console or net, per input), driven through BAR 0 (common
//! configuration, ISR, device configuration, notifications, MSI-X table and
//! PBA) at any width and offset, through configuration space (BAR moves as
//! a root complex and VMM would handle them, MSI-X and INTx controls, the
//! PCI configuration access capability), and through guest memory (rings
//! with garbage in them). Invariants are checked after every step, with the
//! device's worker idle (`invariants.rs`).

mod harness;
mod invariants;

use arbitrary::Arbitrary;

pub use harness::Harness;

use crate::encode::{variant, Encode};
use crate::encode_struct;
use crate::pci_config::ops::Width;
use crate::virtq::Seg;

/// Steps per input.
pub const MAX_OPS: usize = 256;

/// The device behind the transport.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// virtio-rng on /dev/urandom: one queue, no configuration space.
    Rng,
    /// virtio-blk on a small image, 1 to 3 queues.
    Blk {
        /// Queues (mod 3, plus 1).
        queues: u8,
    },
    /// virtio-console without input: two queues, a configuration space.
    Console,
    /// virtio-net on an in-memory backend: two queues.
    Net,
}

/// Width of a configuration space access.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CfgWidth {
    /// Byte.
    One,
    /// Word.
    Two,
    /// Dword.
    Four,
}

impl CfgWidth {
    /// Bytes.
    pub fn bytes(self) -> usize {
        match self {
            CfgWidth::One => 1,
            CfgWidth::Two => 2,
            CfgWidth::Four => 4,
        }
    }
}

/// One step.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// BAR 0 read anywhere.
    Read {
        /// Offset in the BAR.
        offset: u16,
        /// Width.
        width: Width,
    },
    /// BAR 0 write anywhere.
    Write {
        /// Offset in the BAR.
        offset: u16,
        /// Width.
        width: Width,
        /// Value (little endian, truncated to the width).
        value: u64,
    },
    /// Write of a whole common configuration field (`field` indexes the
    /// field table), the way drivers access them.
    Common {
        /// Field index.
        field: u8,
        /// Value.
        value: u64,
    },
    /// Notification of a queue through the notify region.
    Notify {
        /// Queue (any value).
        queue: u8,
    },
    /// Programs an MSI-X table entry.
    Vector {
        /// Entry (any value).
        entry: u8,
        /// Message data.
        data: u32,
        /// Mask bit.
        masked: bool,
    },
    /// Configuration dword read.
    ConfigRead {
        /// Dword index (mod 64).
        reg: u8,
    },
    /// Configuration write at any offset and width (may cross a dword).
    ConfigWrite {
        /// Byte offset.
        offset: u8,
        /// Width.
        width: CfgWidth,
        /// Value.
        value: u32,
    },
    /// Moves BAR 0 like an OS would: decoding off, size, program, on.
    MoveBar {
        /// New address in 64 KiB units.
        page: u32,
        /// Leave memory decoding on while writing (the moves happen one
        /// dword at a time).
        live: bool,
    },
    /// Writes the command register.
    Command(u16),
    /// Sets MSI-X enable and function mask in message control.
    MsixControl {
        /// Enable.
        enable: bool,
        /// Function mask.
        mask: bool,
    },
    /// The PCI configuration access capability: program the window, then
    /// read or write `pci_cfg_data`.
    CfgWindow {
        /// BAR offset.
        offset: u32,
        /// Access length (valid: 1, 2, 4).
        len: u8,
        /// Write this, or read.
        write: Option<u32>,
    },
    /// The whole driver initialization sequence.
    Init {
        /// Features accepted (masked with the offered ones).
        features: u64,
        /// Queues set up.
        queues: u8,
        /// Ring size, log2.
        ring: u8,
        /// Assign MSI-X vectors (else NO_VECTOR).
        vectors: bool,
        /// Enable MSI-X with unmasked entries (else disable it).
        msix: bool,
    },
    /// Writes a chain into a queue's rings and makes it available.
    Chain {
        /// Queue.
        queue: u8,
        /// Buffers.
        segs: Vec<Seg>,
    },
    /// Writes guest memory anywhere.
    Poke {
        /// Address (mod the memory size).
        addr: u32,
        /// Bytes.
        data: Vec<u8>,
    },
    /// A VMM-initiated reset (`VirtioPciDevice::reset`).
    VmmReset,
}

/// A whole input.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The device.
    pub device: DeviceKind,
    /// What happens.
    pub ops: Vec<Op>,
}

/// What an input exercised (for tests of the harness itself).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// MSI-X vectors delivered.
    pub msix: usize,
    /// INTx assertions.
    pub intx: usize,
    /// BAR moves the VMM applied.
    pub moves: usize,
    /// Steps after which a worker thread was running.
    pub worker_steps: usize,
}

/// Runs one input, panicking at the first broken invariant.
pub fn run(input: &Input) -> Stats {
    let _guard = crate::threads::exclusive();
    let mut harness = Harness::new(input.device);
    harness.check_all();
    for (index, op) in input.ops.iter().take(MAX_OPS).enumerate() {
        harness.step(index, op);
    }
    harness.finish()
}

impl Encode for DeviceKind {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            DeviceKind::Rng => variant(out, 0, 4),
            DeviceKind::Blk { queues } => {
                variant(out, 1, 4);
                queues.encode(out);
            }
            DeviceKind::Console => variant(out, 2, 4),
            DeviceKind::Net => variant(out, 3, 4),
        }
    }
}

impl Encode for Width {
    fn encode(&self, out: &mut Vec<u8>) {
        variant(out, self.bytes().trailing_zeros(), 4);
    }
}

impl Encode for CfgWidth {
    fn encode(&self, out: &mut Vec<u8>) {
        variant(out, self.bytes().trailing_zeros(), 3);
    }
}

encode_struct!(Input { device, ops });

impl Encode for Op {
    fn encode(&self, out: &mut Vec<u8>) {
        const N: u32 = 15;
        match self {
            Op::Read { offset, width } => {
                variant(out, 0, N);
                offset.encode(out);
                width.encode(out);
            }
            Op::Write {
                offset,
                width,
                value,
            } => {
                variant(out, 1, N);
                offset.encode(out);
                width.encode(out);
                value.encode(out);
            }
            Op::Common { field, value } => {
                variant(out, 2, N);
                field.encode(out);
                value.encode(out);
            }
            Op::Notify { queue } => {
                variant(out, 3, N);
                queue.encode(out);
            }
            Op::Vector {
                entry,
                data,
                masked,
            } => {
                variant(out, 4, N);
                entry.encode(out);
                data.encode(out);
                masked.encode(out);
            }
            Op::ConfigRead { reg } => {
                variant(out, 5, N);
                reg.encode(out);
            }
            Op::ConfigWrite {
                offset,
                width,
                value,
            } => {
                variant(out, 6, N);
                offset.encode(out);
                width.encode(out);
                value.encode(out);
            }
            Op::MoveBar { page, live } => {
                variant(out, 7, N);
                page.encode(out);
                live.encode(out);
            }
            Op::Command(v) => {
                variant(out, 8, N);
                v.encode(out);
            }
            Op::MsixControl { enable, mask } => {
                variant(out, 9, N);
                enable.encode(out);
                mask.encode(out);
            }
            Op::CfgWindow { offset, len, write } => {
                variant(out, 10, N);
                offset.encode(out);
                len.encode(out);
                write.encode(out);
            }
            Op::Init {
                features,
                queues,
                ring,
                vectors,
                msix,
            } => {
                variant(out, 11, N);
                features.encode(out);
                queues.encode(out);
                ring.encode(out);
                vectors.encode(out);
                msix.encode(out);
            }
            Op::Chain { queue, segs } => {
                variant(out, 12, N);
                queue.encode(out);
                segs.encode(out);
            }
            Op::Poke { addr, data } => {
                variant(out, 13, N);
                addr.encode(out);
                data.encode(out);
            }
            Op::VmmReset => variant(out, 14, N),
        }
    }
}
