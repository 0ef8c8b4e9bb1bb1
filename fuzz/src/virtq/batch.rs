//! One round of device processing, checked: before it, a snapshot of guest
//! memory and of every chain the device may pop (the ring slots of chains
//! made available and not yet used; [`Batch::begin`]); after it, what
//! changed ([`Batch::finish`]).
//!
//! Checks that hold for every device:
//! - the device wrote only into the used rings and into device-writable
//!   buffers of chains it could have popped;
//! - each used element names a head the device could pop, below the
//!   queue size, with a length within the chain's distinct writable bytes;
//! - a queue never has more used elements than the driver made available.
//!
//! They need the chains to stay as they were while the device works: when
//! a writable buffer overlaps a descriptor table, an available ring or a
//! used ring, the batch is not [`stable`](Batch::stable) and only the
//! device-specific checks that do not depend on it run. Content checks
//! (what a device read or wrote) further need [`clean`](Batch::clean)
//! batches: each chain pending once, writable buffers disjoint from each
//! other, from the used rings and from every readable buffer.

use std::collections::BTreeMap;
use std::ops::Range;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::walk::{walk, Walk};
use super::{overlaps, DriverQueue};

/// A used element the device added.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Position of the queue in the target's list.
    pub queue: usize,
    /// Descriptor id.
    pub id: u32,
    /// Bytes written.
    pub len: u32,
}

/// State of one queue before the batch.
#[derive(Clone, Debug)]
pub struct QueueBefore {
    /// Used index.
    pub used_idx: u16,
    /// Available index.
    pub avail_idx: u16,
    /// `used_event`.
    pub used_event: u16,
    /// The harness wrote into the used ring (now or earlier): used-ring
    /// checks are skipped.
    pub used_poked: bool,
}

/// Counters the driver keeps across batches, per queue.
#[derive(Clone, Debug, Default)]
pub struct Totals {
    /// Chains made available (sum of available index moves).
    pub avail: u64,
    /// Used elements seen.
    pub used: u64,
    last_avail: u16,
    last_used: u16,
    /// The used ring as the last batch left it.
    used_ring: Vec<u8>,
    /// The harness wrote the used ring at some point: the counters are
    /// off, and the used-ring checks of this queue are skipped.
    untrusted: bool,
}

/// A descriptor: queue position, table address, index.
type DescKey = (usize, (u64, u16));

/// The snapshot a batch is checked against.
pub struct Batch {
    /// Memory before the batch, and room for it after.
    bufs: Buffers,
    /// Per queue.
    pub queues: Vec<QueueBefore>,
    /// Per queue: the chain of every head the device may pop.
    pub walks: Vec<BTreeMap<u16, Walk>>,
    /// Device writes cannot change descriptors or rings.
    pub stable: bool,
    /// Stable, and no buffer is written twice or both read and written.
    pub clean: bool,
    allowed: Vec<Range<u64>>,
}

fn read_range(mem: &GuestMemoryMmap, r: &Range<u64>) -> Vec<u8> {
    let mut buf = vec![0u8; (r.end - r.start) as usize];
    let _ = mem.read_slice(&mut buf, GuestAddress(r.start));
    buf
}

/// Two memory-sized buffers, reused across batches: allocating them per
/// batch costs more in page faults than the checks themselves.
#[derive(Debug, Default)]
pub struct Buffers(Vec<u8>, Vec<u8>);

fn read_into(mem: &GuestMemoryMmap, size: u64, buf: &mut Vec<u8>) {
    buf.resize(size as usize, 0);
    let _ = mem.read_slice(buf, GuestAddress(0));
}

/// Whether any two ranges of `ranges` overlap.
fn any_overlap(mut ranges: Vec<Range<u64>>) -> bool {
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    ranges.windows(2).any(|w| w[1].start < w[0].end)
}

impl Batch {
    /// Snapshots memory and the chains of `queues` (whose `totals` it
    /// brings up to date with the driver's moves since the last batch).
    pub fn begin(
        mem: &GuestMemoryMmap,
        size: u64,
        queues: &mut [(DriverQueue, Totals)],
        mut bufs: Buffers,
    ) -> Batch {
        read_into(mem, size, &mut bufs.0);
        let mut states = Vec::new();
        let mut walks = Vec::new();
        let (mut meta, mut used_areas) = (Vec::new(), Vec::new());
        // Per writable descriptor: its range and how many chains reach it.
        let mut writable: BTreeMap<DescKey, (Range<u64>, usize)> = BTreeMap::new();
        let mut reads = Vec::new();
        let mut unique_heads = true;
        for (i, (q, totals)) in queues.iter_mut().enumerate() {
            let [desc, avail, used] = q.areas();
            let used_now = read_range(mem, &used);
            let avail_idx = q.avail_idx(mem);
            totals.avail += u64::from(avail_idx.wrapping_sub(totals.last_avail));
            totals.last_avail = avail_idx;
            let used_poked = !totals.used_ring.is_empty() && totals.used_ring != used_now;
            if totals.used_ring.is_empty() || used_poked {
                totals.last_used = q.used_idx(mem);
            }
            // The counters mean nothing once the driver wrote the used
            // ring; every slot may then be processed.
            totals.untrusted |= used_poked;
            states.push(QueueBefore {
                used_idx: q.used_idx(mem),
                avail_idx,
                used_event: q.used_event(mem),
                used_poked: totals.untrusted,
            });
            meta.push(desc);
            meta.push(avail);
            used_areas.push(used);
            // The device can only pop entries not yet used: at most the
            // chains made available and not used, and at most a ring.
            let pending = if totals.untrusted {
                q.size
            } else {
                totals
                    .avail
                    .saturating_sub(totals.used)
                    .min(u64::from(q.size)) as u16
            };
            let mut chains = BTreeMap::new();
            for k in 0..pending {
                let head = q.avail_slot(mem, avail_idx.wrapping_sub(pending).wrapping_add(k));
                if chains.contains_key(&head) {
                    unique_heads = false;
                    continue;
                }
                chains.insert(head, walk(mem, q.desc, q.size, head));
            }
            for w in chains.values() {
                meta.extend(w.tables.iter().cloned());
                let mut mine = std::collections::BTreeSet::new();
                for (d, key) in &w.descs {
                    if d.writable() {
                        let e = writable.entry((i, *key)).or_insert((d.range(), 0));
                        e.1 += usize::from(mine.insert(*key));
                    } else {
                        reads.push(d.range());
                    }
                }
            }
            walks.push(chains);
        }
        let writes: Vec<Range<u64>> = writable.values().map(|(r, _)| r.clone()).collect();
        let shared = writable.values().any(|(_, chains)| *chains > 1);
        let dev_writes: Vec<Range<u64>> = writes.iter().chain(&used_areas).cloned().collect();
        let stable = !dev_writes
            .iter()
            .any(|w| meta.iter().any(|m| overlaps(w, m)))
            && !writes
                .iter()
                .any(|w| used_areas.iter().any(|u| overlaps(w, u)));
        // A chain processed twice, or two chains sharing a writable
        // buffer, leave only the last answer in memory.
        let clean = stable
            && unique_heads
            && !shared
            && !any_overlap(writes.clone())
            && !dev_writes
                .iter()
                .any(|w| reads.iter().any(|r| overlaps(w, r)));
        Batch {
            bufs,
            queues: states,
            walks,
            stable,
            clean,
            allowed: dev_writes,
        }
    }

    /// Reads what the device did and checks it (see the module docs);
    /// frees the descriptors of completed chains. `ctx` names the step.
    pub fn finish(
        &mut self,
        mem: &GuestMemoryMmap,
        queues: &mut [(DriverQueue, Totals)],
        ctx: &dyn std::fmt::Display,
    ) -> Vec<Completion> {
        if self.stable {
            self.check_writes(mem, ctx);
        }
        let mut out = Vec::new();
        for (i, (q, totals)) in queues.iter_mut().enumerate() {
            let before = &self.queues[i];
            let used_now = q.used_idx(mem);
            let n = used_now.wrapping_sub(totals.last_used);
            let checked = self.stable && !before.used_poked;
            if checked {
                assert!(
                    n <= q.size,
                    "{ctx}: queue {i}: used index moved by {n}, more than the queue size {}",
                    q.size
                );
                assert!(
                    totals.used + u64::from(n) <= totals.avail,
                    "{ctx}: queue {i}: {} chains used, only {} made available",
                    totals.used + u64::from(n),
                    totals.avail
                );
            }
            for k in 0..n.min(q.size) {
                let (id, len) = q.used_elem(mem, totals.last_used.wrapping_add(k));
                if checked {
                    self.check_elem(i, q.size, id, len, ctx);
                }
                if let Ok(head) = u16::try_from(id) {
                    q.complete(head);
                }
                out.push(Completion { queue: i, id, len });
            }
            totals.used += u64::from(n);
            totals.last_used = used_now;
            totals.used_ring = read_range(mem, &q.areas()[2]);
        }
        out
    }

    fn check_elem(&self, queue: usize, size: u16, id: u32, len: u32, ctx: &dyn std::fmt::Display) {
        assert!(
            id < u32::from(size),
            "{ctx}: queue {queue}: used id {id} is not below the queue size {size}"
        );
        let walk = self.walks[queue].get(&(id as u16));
        let Some(walk) = walk else {
            panic!("{ctx}: queue {queue}: used id {id} was not available");
        };
        let bound = walk.writable_bound();
        assert!(
            u64::from(len) <= bound,
            "{ctx}: queue {queue}: used length {len} for chain {id}, which has only \
             {bound} distinct device-writable bytes ({walk:?})"
        );
    }

    fn check_writes(&mut self, mem: &GuestMemoryMmap, ctx: &dyn std::fmt::Display) {
        let Buffers(before, mut after) = std::mem::take(&mut self.bufs);
        read_into(mem, before.len() as u64, &mut after);
        self.bufs = Buffers(before, after);
        let Buffers(before, after) = &self.bufs;
        if after == before {
            return;
        }
        // Whole chunks compare with memcmp; only changed ones are looked
        // at byte by byte.
        const CHUNK: usize = 256;
        for (c, (a, b)) in after.chunks(CHUNK).zip(before.chunks(CHUNK)).enumerate() {
            if a == b {
                continue;
            }
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                let addr = (c * CHUNK + i) as u64;
                assert!(
                    x == y || self.allowed.iter().any(|r| r.contains(&addr)),
                    "{ctx}: the device wrote guest memory at {addr:#x} ({y:#04x} -> {x:#04x}), \
                     outside the used rings and the writable buffers"
                );
            }
        }
    }

    /// Gives the buffers back for the next batch.
    pub fn into_buffers(self) -> Buffers {
        self.bufs
    }

    /// The walk of chain `id` on queue `queue`, if its head was in a slot.
    pub fn walk(&self, queue: usize, id: u32) -> Option<&Walk> {
        self.walks.get(queue)?.get(&u16::try_from(id).ok()?)
    }
}
