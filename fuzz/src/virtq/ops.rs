//! What the fuzzer does to the rings as a driver (a correct or a hostile
//! one), common to every device target.

use arbitrary::Arbitrary;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::walk::Desc;
use super::{DriverQueue, DATA_BASE, MEM_SIZE};
use crate::encode::{variant, Encode};
use crate::encode_struct;

/// Where a buffer is.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    /// In the data area, 8-byte granular (wrapping in it).
    Data(u16),
    /// Anywhere: on the rings, across the end of memory, beyond it.
    Raw(u64),
}

impl Addr {
    /// The guest address.
    pub fn resolve(self) -> u64 {
        match self {
            Addr::Data(o) => DATA_BASE + (u64::from(o) * 8) % (MEM_SIZE - DATA_BASE),
            Addr::Raw(a) => a,
        }
    }
}

/// A buffer length.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Len {
    /// A few bytes.
    Bytes(u8),
    /// Whole 512-byte sectors.
    Sectors(u8),
    /// Any length.
    Raw(u32),
}

impl Len {
    /// The length in bytes.
    pub fn resolve(self) -> u32 {
        match self {
            Len::Bytes(n) => n.into(),
            Len::Sectors(n) => u32::from(n) * 512,
            Len::Raw(n) => n,
        }
    }
}

/// One buffer of a chain.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Where.
    pub addr: Addr,
    /// How long.
    pub len: Len,
    /// Device-writable.
    pub write: bool,
}

/// How the descriptors of a chain are linked.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Consecutive free descriptors, NEXT-linked.
    Direct,
    /// The last descriptor links back to the `to`-th (mod length).
    Loop {
        /// Target position.
        to: u8,
    },
    /// The last descriptor has NEXT set, to `next` (maybe out of range).
    BadNext {
        /// Raw next index.
        next: u16,
    },
    /// An indirect table (one head descriptor pointing at it); its length
    /// is right unless `table_len` overrides it.
    Indirect {
        /// Raw table length in bytes.
        table_len: Option<u16>,
    },
}

/// A driver action on the rings (queue numbers wrap at the number of
/// queues the target set up).
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum RingOp {
    /// Writes a chain and makes it available (no notification).
    Chain {
        /// Queue.
        queue: u8,
        /// Its buffers.
        segs: Vec<Seg>,
        /// How they are linked.
        link: Link,
    },
    /// Notifies the queue; the device processes it.
    Kick {
        /// Queue.
        queue: u8,
    },
    /// Makes any head index available, even a bad one or one in flight.
    Publish {
        /// Queue.
        queue: u8,
        /// Head index.
        head: u16,
    },
    /// Moves the available index without filling ring slots.
    BumpAvail {
        /// Queue.
        queue: u8,
        /// Added (wrapping) to the index.
        delta: u16,
    },
    /// Writes one descriptor verbatim.
    Desc {
        /// Queue.
        queue: u8,
        /// Descriptor index (mod the queue size).
        index: u16,
        /// Buffer address.
        addr: Addr,
        /// Buffer length.
        len: u32,
        /// Flags.
        flags: u16,
        /// Next index.
        next: u16,
    },
    /// Writes bytes anywhere in guest memory (rings included).
    Poke {
        /// Guest address (mod the memory size).
        addr: u32,
        /// Bytes.
        data: Vec<u8>,
    },
    /// Sets `used_event` (interrupt suppression with EVENT_IDX).
    UsedEvent {
        /// Queue.
        queue: u8,
        /// Value.
        value: u16,
    },
}

impl RingOp {
    /// Applies a ring op other than [`RingOp::Kick`] to `queues`; returns
    /// the queue to notify for a kick.
    pub fn apply(&self, mem: &GuestMemoryMmap, queues: &mut [DriverQueue]) -> Option<usize> {
        let n = queues.len();
        let pick = |q: u8| usize::from(q) % n.max(1);
        if n == 0 {
            if let RingOp::Poke { addr, data } = self {
                poke(mem, *addr, data);
            }
            return None;
        }
        match self {
            RingOp::Chain { queue, segs, link } => {
                queues[pick(*queue)].add_chain(mem, segs, *link);
            }
            RingOp::Kick { queue } => return Some(pick(*queue)),
            RingOp::Publish { queue, head } => queues[pick(*queue)].publish(mem, *head),
            RingOp::BumpAvail { queue, delta } => queues[pick(*queue)].bump_avail(mem, *delta),
            RingOp::Desc {
                queue,
                index,
                addr,
                len,
                flags,
                next,
            } => {
                let d = Desc {
                    addr: addr.resolve(),
                    len: *len,
                    flags: *flags,
                    next: *next,
                };
                queues[pick(*queue)].set_desc(mem, *index, d);
            }
            RingOp::Poke { addr, data } => poke(mem, *addr, data),
            RingOp::UsedEvent { queue, value } => queues[pick(*queue)].set_used_event(mem, *value),
        }
        None
    }
}

fn poke(mem: &GuestMemoryMmap, addr: u32, data: &[u8]) {
    let at = u64::from(addr) % MEM_SIZE;
    let n = data.len().min((MEM_SIZE - at) as usize);
    let _ = mem.write_slice(&data[..n], GuestAddress(at));
}

impl Encode for Addr {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Addr::Data(o) => {
                variant(out, 0, 2);
                o.encode(out);
            }
            Addr::Raw(a) => {
                variant(out, 1, 2);
                a.encode(out);
            }
        }
    }
}

impl Encode for Len {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Len::Bytes(n) => {
                variant(out, 0, 3);
                n.encode(out);
            }
            Len::Sectors(n) => {
                variant(out, 1, 3);
                n.encode(out);
            }
            Len::Raw(n) => {
                variant(out, 2, 3);
                n.encode(out);
            }
        }
    }
}

encode_struct!(Seg { addr, len, write });

impl Encode for Link {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Link::Direct => variant(out, 0, 4),
            Link::Loop { to } => {
                variant(out, 1, 4);
                to.encode(out);
            }
            Link::BadNext { next } => {
                variant(out, 2, 4);
                next.encode(out);
            }
            Link::Indirect { table_len } => {
                variant(out, 3, 4);
                table_len.encode(out);
            }
        }
    }
}

impl Encode for RingOp {
    fn encode(&self, out: &mut Vec<u8>) {
        const N: u32 = 7;
        match self {
            RingOp::Chain { queue, segs, link } => {
                variant(out, 0, N);
                queue.encode(out);
                segs.encode(out);
                link.encode(out);
            }
            RingOp::Kick { queue } => {
                variant(out, 1, N);
                queue.encode(out);
            }
            RingOp::Publish { queue, head } => {
                variant(out, 2, N);
                queue.encode(out);
                head.encode(out);
            }
            RingOp::BumpAvail { queue, delta } => {
                variant(out, 3, N);
                queue.encode(out);
                delta.encode(out);
            }
            RingOp::Desc {
                queue,
                index,
                addr,
                len,
                flags,
                next,
            } => {
                variant(out, 4, N);
                queue.encode(out);
                index.encode(out);
                addr.encode(out);
                len.encode(out);
                flags.encode(out);
                next.encode(out);
            }
            RingOp::Poke { addr, data } => {
                variant(out, 5, N);
                addr.encode(out);
                data.encode(out);
            }
            RingOp::UsedEvent { queue, value } => {
                variant(out, 6, N);
                queue.encode(out);
                value.encode(out);
            }
        }
    }
}
