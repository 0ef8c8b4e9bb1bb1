//! virtio-blk (virtio 1.2 §5.2) backed by a raw disk image.
//!
//! The image is accessed with positioned reads and writes straight between
//! guest memory and the file (no userspace cache), so FLUSH (fdatasync)
//! makes every completed write durable. Capacity is the image size in
//! 512-byte sectors, rounded down: a trailing partial sector is invisible
//! to the guest and never written.
//!
//! The image is locked against other users while the device exists
//! (`lock.rs`): exclusively when read-write, shared when read-only.
//!
//! All queues of a device are served by one worker thread
//! ([`DeviceWorker`]); the request path itself is
//! [`BlockRequestProcessor`].

mod config;
#[cfg(test)]
mod device_tests;
mod disk;
mod lock;
#[cfg(test)]
mod lock_tests;
mod request;
#[cfg(test)]
mod tests;

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{
    read_config_bytes, ActivateError, GuestMemoryMmapAtomic, QueueActivation, VirtioDevice,
    VirtioInterrupt,
};
use crate::queue::interrupt_queue;
use crate::worker::{Backlog, DeviceWorker, WorkerHandler};
use config::{BlockConfigSpace, Topology};
use disk::Disk;

pub use crate::queue::{QueueError, QueueOutcome};
pub use lock::{LockConflict, LockHolder};
pub use request::BlockRequestProcessor;

/// The virtio-blk logical block size; request sectors are always in these
/// units.
pub const SECTOR_SIZE: u64 = 512;
/// Default number of request queues.
pub const DEFAULT_QUEUES: u16 = 1;
/// Default size of each request queue.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Upper bound on request queues (one per vCPU is the usual choice).
pub const MAX_QUEUES: u16 = 256;

/// How to build a [`Block`] device.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// Raw disk image (a regular file or a block device).
    pub path: PathBuf,
    /// Open the image read-only and offer VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Serial number returned by GET_ID (at most 20 bytes are used). When
    /// absent, an id derived from the image's device and inode numbers.
    pub serial: Option<String>,
    /// Number of request queues; more than one offers VIRTIO_BLK_F_MQ.
    pub queues: u16,
    /// Size of each queue: a power of two, at most 32768.
    pub queue_size: u16,
    /// Lock the image while the device exists (shared when read-only,
    /// exclusive otherwise), failing with [`BlockError::Locked`] if
    /// another user holds a conflicting lock. Off only for users who
    /// know nobody else writes the image.
    pub lock: bool,
}

impl BlockConfig {
    /// A read-write, single-queue device for the image at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        BlockConfig {
            path: path.into(),
            read_only: false,
            serial: None,
            queues: DEFAULT_QUEUES,
            queue_size: DEFAULT_QUEUE_SIZE,
            lock: true,
        }
    }
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened (or inspected).
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The image size could not be determined.
    #[error("cannot determine the size of disk image {}: {source}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// Another open of the image holds a conflicting lock.
    #[error("disk image {} is {conflict}", path.display())]
    Locked {
        /// The image.
        path: PathBuf,
        /// The lock in the way.
        conflict: LockConflict,
    },
    /// The image could not be locked for another reason.
    #[error("cannot lock disk image {}: {source}", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The configuration is unusable.
    #[error("invalid block device configuration: {0}")]
    InvalidConfig(String),
}

/// A virtio-blk device.
pub struct Block {
    disk: Arc<Disk>,
    config_space: [u8; config::CONFIG_SPACE_SIZE],
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    active: Option<Active>,
}

/// State while the driver is using the device.
struct Active {
    /// `None` only if restarting the worker failed (logged).
    worker: Option<DeviceWorker<BlockHandler>>,
}

impl Block {
    /// Opens the image and builds the device.
    pub fn new(config: BlockConfig) -> Result<Block, BlockError> {
        if config.queues == 0 || config.queues > MAX_QUEUES {
            return Err(BlockError::InvalidConfig(format!(
                "{} queues (must be 1 to {MAX_QUEUES})",
                config.queues
            )));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size > 32768 {
            return Err(BlockError::InvalidConfig(format!(
                "queue size {} (must be a power of two up to 32768)",
                config.queue_size
            )));
        }
        let disk = Disk::open(&config)?;
        let topology = Topology::from_host_block_size(disk.host_block_size());
        let space = BlockConfigSpace {
            capacity: disk.capacity(),
            // Header and status take one descriptor each.
            seg_max: u32::from(config.queue_size).saturating_sub(2).max(1),
            blk_size: SECTOR_SIZE as u32,
            topology,
            num_queues: config.queues,
        };
        let mut features = (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_TOPOLOGY)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC);
        if config.queues > 1 {
            features |= 1 << VIRTIO_BLK_F_MQ;
        }
        if config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        log::info!(
            "virtio-blk: {} ({} sectors{}, {} queue(s) of {})",
            config.path.display(),
            disk.capacity(),
            if config.read_only { ", read-only" } else { "" },
            config.queues,
            config.queue_size
        );
        Ok(Block {
            disk: Arc::new(disk),
            config_space: space.to_bytes(),
            avail_features: features,
            acked_features: 0,
            queue_sizes: vec![config.queue_size; usize::from(config.queues)],
            active: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    /// A request processor for this device's image, to drive the request
    /// path without the worker thread (benchmarks, tests).
    pub fn request_processor(&self) -> BlockRequestProcessor {
        BlockRequestProcessor::new(Arc::clone(&self.disk))
    }

    fn event_idx(&self) -> bool {
        self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    /// Stops the worker (if running) and forgets its queues.
    fn stop_worker(&mut self) {
        if let Some(worker) = self.active.take().and_then(|a| a.worker) {
            if worker.stop().is_none() {
                log::error!("virtio-blk: worker thread had died");
            }
        }
    }

    /// Stops the worker, lets `change` edit its queues, and restarts it.
    fn with_stopped_worker<T>(
        &mut self,
        change: impl FnOnce(&mut BlockHandler, &mut Vec<(u16, EventFd)>) -> T,
    ) -> Option<T> {
        let active = self.active.as_mut()?;
        let worker = active.worker.take()?;
        let Some((mut handler, mut notifiers)) = worker.stop() else {
            log::error!("virtio-blk: worker thread was gone; device stopped");
            return None;
        };
        let result = change(&mut handler, &mut notifiers);
        match DeviceWorker::spawn("virtio-blk", handler, notifiers) {
            Ok(worker) => active.worker = Some(worker),
            Err(e) => log::error!("virtio-blk: cannot restart the worker: {e}"),
        }
        Some(result)
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        crate::device_type::BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn config_size(&self) -> usize {
        self.config_space.len()
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE, which is
        // not offered.
        log::debug!(
            "virtio-blk: ignoring {}-byte config write at {offset}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmapAtomic,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueActivation>,
    ) -> Result<(), ActivateError> {
        if queues.is_empty() {
            return Err(ActivateError::BadQueues("no queue enabled".into()));
        }
        self.stop_worker();
        let event_idx = self.event_idx();
        let mut slots = Vec::with_capacity(queues.len());
        let mut notifiers = Vec::with_capacity(queues.len());
        for qa in queues {
            check_queue(&self.queue_sizes, &slots, qa.index)?;
            let mut queue = qa.queue;
            queue.set_event_idx(event_idx);
            slots.push(QueueSlot {
                index: qa.index,
                queue,
                broken: false,
            });
            notifiers.push((qa.index, qa.notifier));
        }
        let handler = BlockHandler {
            processor: self.request_processor(),
            slots,
            mem,
            interrupt,
        };
        let worker =
            DeviceWorker::spawn("virtio-blk", handler, notifiers).map_err(ActivateError::Worker)?;
        self.active = Some(Active {
            worker: Some(worker),
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.acked_features = 0;
    }

    fn supports_queue_reset(&self) -> bool {
        true
    }

    fn reset_queue(&mut self, index: u16) -> Option<QueueActivation> {
        self.with_stopped_worker(|handler, notifiers| {
            let slot = handler.slots.iter().position(|s| s.index == index)?;
            let notifier = notifiers.iter().position(|(i, _)| *i == index)?;
            let slot = handler.slots.remove(slot);
            let (_, notifier) = notifiers.remove(notifier);
            Some(QueueActivation {
                index,
                queue: slot.queue,
                notifier,
            })
        })
        .flatten()
    }

    fn enable_queue(&mut self, qa: QueueActivation) -> Result<(), ActivateError> {
        if self.active.is_none() {
            return Err(ActivateError::BadQueues(format!(
                "queue {} enabled on an inactive device",
                qa.index
            )));
        }
        let event_idx = self.event_idx();
        let sizes = self.queue_sizes.clone();
        let index = qa.index;
        self.with_stopped_worker(move |handler, notifiers| {
            check_queue(&sizes, &handler.slots, qa.index)?;
            let mut queue = qa.queue;
            queue.set_event_idx(event_idx);
            handler.slots.push(QueueSlot {
                index: qa.index,
                queue,
                broken: false,
            });
            notifiers.push((qa.index, qa.notifier));
            Ok(())
        })
        .unwrap_or_else(|| {
            Err(ActivateError::BadQueues(format!(
                "queue {index}: the device worker is not running"
            )))
        })
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.reset();
    }
}

/// Rejects unknown or duplicate queue indices.
fn check_queue(sizes: &[u16], slots: &[QueueSlot], index: u16) -> Result<(), ActivateError> {
    if usize::from(index) >= sizes.len() {
        return Err(ActivateError::BadQueues(format!(
            "queue {index} does not exist ({} queues)",
            sizes.len()
        )));
    }
    if slots.iter().any(|s| s.index == index) {
        return Err(ActivateError::BadQueues(format!(
            "queue {index} enabled twice"
        )));
    }
    Ok(())
}

/// One queue the worker serves.
struct QueueSlot {
    index: u16,
    queue: Queue,
    /// The driver broke the ring; ignored until the queue is reset.
    broken: bool,
}

/// The worker-thread side of a block device.
struct BlockHandler {
    processor: BlockRequestProcessor,
    slots: Vec<QueueSlot>,
    mem: GuestMemoryMmapAtomic,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl BlockHandler {
    fn process(&mut self, mem: &GuestMemoryMmap, index: u16) -> Backlog {
        let Some(slot) = self.slots.iter_mut().find(|s| s.index == index) else {
            return Backlog::Empty;
        };
        if slot.broken {
            return Backlog::Empty;
        }
        let outcome = self.processor.process_queue(mem, &mut slot.queue);
        if outcome.notify {
            interrupt_queue(self.interrupt.as_ref(), index);
        }
        if let Some(e) = outcome.error {
            log::error!("virtio-blk: queue {index} stopped until reset: {e}");
            slot.broken = true;
            self.interrupt.set_needs_reset();
            return Backlog::Empty;
        }
        if outcome.pending {
            Backlog::Remaining
        } else {
            Backlog::Empty
        }
    }
}

impl WorkerHandler for BlockHandler {
    fn queue_notified(&mut self, index: u16) -> Backlog {
        let mem = self.mem.memory();
        self.process(&mem, index)
    }
}
