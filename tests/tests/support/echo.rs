//! A tiny virtio device for transport tests: every descriptor chain's
//! readable bytes are copied into its writable buffers, and the chain
//! completes with the number of bytes written. It runs on a
//! `DeviceWorker` like the real devices, and can reset single queues.
//!
//! Device configuration (8 bytes): `completed` (u32) and `!completed`
//! (u32), updated together after every chain with a generation bump, so a
//! torn read is detectable. A request starting with `!` also raises a
//! configuration change interrupt.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use virtio_devices::worker::{Backlog, DeviceWorker, WorkerHandler};
use virtio_devices::{
    read_config_bytes, ActivateError, GuestMemoryMmapAtomic, QueueActivation, VirtioDevice,
    VirtioInterrupt, VirtioInterruptType,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemory};
use vmm_sys_util::eventfd::EventFd;

/// A device type no real device uses here.
pub const ECHO_DEVICE_TYPE: u32 = 63;
/// Bytes of configuration space: `completed` and `!completed`.
const CONFIG_SIZE: usize = 8;
/// Most bytes echoed per chain.
const MAX_ECHO: usize = 64 * 1024;

/// The configuration space and its generation counter.
#[derive(Debug, Default)]
pub struct EchoConfig {
    pub completed: u32,
    pub generation: u32,
}

/// Counters the tests look at.
#[derive(Debug, Default)]
pub struct EchoStats {
    pub activations: AtomicUsize,
    pub resets: AtomicUsize,
    pub queue_resets: AtomicUsize,
    pub acked: Mutex<Vec<u64>>,
}

struct EchoHandler {
    mem: GuestMemoryMmapAtomic,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: BTreeMap<u16, Queue>,
    config: Arc<Mutex<EchoConfig>>,
}

impl EchoHandler {
    /// Copies the chain's readable bytes into its writable buffers.
    /// Buffers outside guest memory end the copy; the chain still
    /// completes, with what was written so far.
    fn echo<M: GuestMemory>(mem: &M, chain: virtio_queue::DescriptorChain<&M>) -> (u32, bool) {
        let mut data = Vec::new();
        let mut bang = false;
        for desc in chain.clone().readable() {
            let room = MAX_ECHO - data.len();
            let mut buf = vec![0u8; (desc.len() as usize).min(room)];
            if mem.read_slice(&mut buf, desc.addr()).is_err() {
                break;
            }
            bang |= data.is_empty() && buf.first() == Some(&b'!');
            data.extend_from_slice(&buf);
        }
        let mut written = 0usize;
        for desc in chain.writable() {
            let n = (desc.len() as usize).min(data.len() - written);
            if n == 0
                || mem
                    .write_slice(&data[written..written + n], desc.addr())
                    .is_err()
            {
                break;
            }
            written += n;
        }
        // At most MAX_ECHO.
        (written as u32, bang)
    }

    fn process(&mut self, index: u16) {
        let mem = self.mem.memory();
        let Some(queue) = self.queues.get_mut(&index) else {
            return;
        };
        let event_idx = queue.event_idx_enabled();
        let mut config_changed = false;
        loop {
            if event_idx && queue.disable_notification(&*mem).is_err() {
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(&*mem) {
                let head = chain.head_index();
                let (written, bang) = Self::echo(&*mem, chain);
                if queue.add_used(&*mem, head, written).is_err() {
                    // A used ring outside memory: the queue is broken.
                    return;
                }
                let mut config = self.config.lock().unwrap();
                config.completed += 1;
                config.generation += 1;
                config_changed |= bang;
            }
            if !event_idx || !matches!(queue.enable_notification(&*mem), Ok(true)) {
                break;
            }
        }
        if queue.needs_notification(&*mem).unwrap_or(true) {
            let _ = self.interrupt.trigger(VirtioInterruptType::Queue(index));
        }
        if config_changed {
            let _ = self.interrupt.trigger(VirtioInterruptType::Config);
        }
    }
}

impl WorkerHandler for EchoHandler {
    fn queue_notified(&mut self, index: u16) -> Backlog {
        // A test device: it drains the whole ring in one go.
        self.process(index);
        Backlog::Empty
    }
}

type Parked = (EchoHandler, Vec<(u16, EventFd)>);

/// The echo device.
pub struct EchoDevice {
    sizes: Vec<u16>,
    features: u64,
    queue_reset: bool,
    pub config: Arc<Mutex<EchoConfig>>,
    pub stats: Arc<EchoStats>,
    worker: Option<DeviceWorker<EchoHandler>>,
    /// A handler with no queues left after queue resets.
    parked: Option<Parked>,
}

impl EchoDevice {
    /// A device with queues of `sizes`, offering `features`.
    pub fn new(sizes: &[u16], features: u64, queue_reset: bool) -> Self {
        EchoDevice {
            sizes: sizes.to_vec(),
            features,
            queue_reset,
            config: Arc::default(),
            stats: Arc::default(),
            worker: None,
            parked: None,
        }
    }

    fn stop(&mut self) -> Option<Parked> {
        match self.worker.take() {
            Some(w) => w.stop(),
            None => self.parked.take(),
        }
    }

    fn start(
        &mut self,
        handler: EchoHandler,
        notifiers: Vec<(u16, EventFd)>,
    ) -> Result<(), ActivateError> {
        if notifiers.is_empty() {
            self.parked = Some((handler, notifiers));
            return Ok(());
        }
        let worker =
            DeviceWorker::spawn("echo", handler, notifiers).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }
}

impl VirtioDevice for EchoDevice {
    fn device_type(&self) -> u32 {
        ECHO_DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn ack_features(&mut self, features: u64) {
        self.stats.acked.lock().unwrap().push(features);
    }

    fn config_size(&self) -> usize {
        CONFIG_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.lock().unwrap();
        let mut bytes = [0u8; CONFIG_SIZE];
        bytes[..4].copy_from_slice(&config.completed.to_le_bytes());
        bytes[4..].copy_from_slice(&(!config.completed).to_le_bytes());
        read_config_bytes(&bytes, offset, data);
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
        let mut map = BTreeMap::new();
        let mut notifiers = Vec::new();
        for q in queues {
            map.insert(q.index, q.queue);
            notifiers.push((q.index, q.notifier));
        }
        let handler = EchoHandler {
            mem,
            interrupt,
            queues: map,
            config: self.config.clone(),
        };
        self.start(handler, notifiers)?;
        self.stats.activations.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
        self.stats.resets.fetch_add(1, Ordering::SeqCst);
    }

    fn supports_queue_reset(&self) -> bool {
        self.queue_reset
    }

    fn reset_queue(&mut self, index: u16) -> Option<QueueActivation> {
        let (mut handler, mut notifiers) = self.stop()?;
        let queue = handler.queues.remove(&index);
        let position = notifiers.iter().position(|(i, _)| *i == index);
        let notifier = position.map(|p| notifiers.remove(p).1);
        let restarted = self.start(handler, notifiers);
        self.stats.queue_resets.fetch_add(1, Ordering::SeqCst);
        match (queue, notifier, restarted) {
            (Some(queue), Some(notifier), Ok(())) => Some(QueueActivation {
                index,
                queue,
                notifier,
            }),
            _ => None,
        }
    }

    fn enable_queue(&mut self, queue: QueueActivation) -> Result<(), ActivateError> {
        let (mut handler, mut notifiers) = self
            .stop()
            .ok_or_else(|| ActivateError::BadQueues("device is not running".into()))?;
        handler.queues.insert(queue.index, queue.queue);
        notifiers.push((queue.index, queue.notifier));
        self.start(handler, notifiers)
    }

    fn config_generation(&self) -> u32 {
        self.config.lock().unwrap().generation
    }
}
