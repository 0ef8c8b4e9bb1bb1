//! virtio-net (virtio 1.2 §5.1) backed by a Linux tap, or any
//! [`NetBackend`].
//!
//! Frames cross the device unchanged, `virtio_net_hdr_v1` included: the tap
//! is opened with `IFF_VNET_HDR` and a 12-byte header, so checksum and
//! segmentation offloads work end to end and the kernel does the work
//! the guest left undone. The link is always up and the configuration space
//! never changes after creation.

mod config;
mod rxtx;
mod tap;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use virtio_bindings::virtio_net::*;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub use config::{
    MacAddr, MacParseError, NetConfig, DEFAULT_MTU, DEFAULT_QUEUE_PAIRS, DEFAULT_QUEUE_SIZE,
    MAX_QUEUE_PAIRS,
};
pub use rxtx::MAX_FRAME_LEN;
pub use tap::{NetBackend, Tap, TapError, VNET_HDR_LEN};

use crate::device::read_config_bytes;
use crate::worker::DeviceWorker;
use crate::{
    device_type, ActivateError, GuestMemoryMmapAtomic, QueueActivation, VirtioDevice,
    VirtioInterrupt,
};
use rxtx::{BackendState, NetHandler};

/// Why a network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening the tap failed.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The configuration is out of range.
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    /// A NIC's address cannot be a group address.
    #[error("{0} is a multicast address")]
    MulticastMac(MacAddr),
}

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Features offered whatever the configuration. All offloads are offered
/// because a vnet-header tap passes partial checksums and GSO frames both
/// ways (what the guest accepts is set with TUNSETOFFLOAD at activation).
const BASE_FEATURES: u64 = bit(VIRTIO_NET_F_MAC)
    | bit(VIRTIO_NET_F_STATUS)
    | bit(VIRTIO_NET_F_MTU)
    | bit(VIRTIO_NET_F_MRG_RXBUF)
    | bit(VIRTIO_NET_F_CSUM)
    | bit(VIRTIO_NET_F_GUEST_CSUM)
    | bit(VIRTIO_NET_F_GUEST_TSO4)
    | bit(VIRTIO_NET_F_GUEST_TSO6)
    | bit(VIRTIO_NET_F_GUEST_ECN)
    | bit(VIRTIO_NET_F_GUEST_UFO)
    | bit(VIRTIO_NET_F_HOST_TSO4)
    | bit(VIRTIO_NET_F_HOST_TSO6)
    | bit(VIRTIO_NET_F_HOST_ECN)
    | bit(VIRTIO_NET_F_HOST_UFO)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_RING_F_INDIRECT_DESC);

/// The `TUN_F_*` offloads matching the guest's receive features. The tun
/// driver refuses segmentation without checksum offload, and ECN without
/// TSO, so those are only passed together.
pub(crate) fn tun_offload_flags(acked: u64) -> u32 {
    let has = |f: u32| acked & bit(f) != 0;
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if has(VIRTIO_NET_F_GUEST_TSO4) {
        flags |= libc::TUN_F_TSO4;
    }
    if has(VIRTIO_NET_F_GUEST_TSO6) {
        flags |= libc::TUN_F_TSO6;
    }
    if has(VIRTIO_NET_F_GUEST_ECN) && flags & (libc::TUN_F_TSO4 | libc::TUN_F_TSO6) != 0 {
        flags |= libc::TUN_F_TSO_ECN;
    }
    if has(VIRTIO_NET_F_GUEST_UFO) {
        flags |= libc::TUN_F_UFO;
    }
    flags
}

/// A virtio network device.
pub struct Net {
    backends: Vec<Arc<dyn NetBackend>>,
    mac: MacAddr,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    acked_features: u64,
    worker: Option<DeviceWorker<NetHandler>>,
}

impl Net {
    /// Opens (creating if needed) the tap `config.tap_name`, with one queue
    /// per queue pair.
    pub fn new(config: NetConfig) -> Result<Net, NetError> {
        config::validate_queue_pairs(usize::from(config.queue_pairs))
            .map_err(NetError::InvalidConfig)?;
        config::validate_queue_size(config.queue_size).map_err(NetError::InvalidConfig)?;
        let taps = if config.queue_pairs > 1 {
            Tap::open_multiqueue(&config.tap_name, usize::from(config.queue_pairs))?
        } else {
            vec![Tap::open_named(&config.tap_name)?]
        };
        if let Some(tap) = taps.first() {
            log::info!("virtio-net: using tap {}", tap.name());
        }
        let backends = taps
            .into_iter()
            .map(|t| Arc::new(t) as Arc<dyn NetBackend>)
            .collect();
        Self::with_backends(backends, config.mac, config.queue_size)
    }

    /// A device over `backends`, one per queue pair (tests use socket
    /// pairs; other VMM parts could use anything frame-oriented).
    pub fn with_backends(
        backends: Vec<Arc<dyn NetBackend>>,
        mac: Option<MacAddr>,
        queue_size: u16,
    ) -> Result<Net, NetError> {
        config::validate_queue_pairs(backends.len()).map_err(NetError::InvalidConfig)?;
        config::validate_queue_size(queue_size).map_err(NetError::InvalidConfig)?;
        let mac = mac.unwrap_or_else(MacAddr::random_local);
        if mac.is_multicast() {
            return Err(NetError::MulticastMac(mac));
        }
        let mut avail_features = BASE_FEATURES;
        let mut queues = 2 * backends.len();
        if backends.len() > 1 {
            // Multiqueue needs the control queue to pick the pair count.
            avail_features |= bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
            queues += 1;
        }
        Ok(Net {
            backends,
            mac,
            queue_sizes: vec![queue_size; queues],
            avail_features,
            acked_features: 0,
            worker: None,
        })
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    /// Number of receive/transmit queue pairs offered.
    pub fn queue_pairs(&self) -> u16 {
        // validate_queue_pairs bounds this by MAX_QUEUE_PAIRS.
        u16::try_from(self.backends.len()).unwrap_or(MAX_QUEUE_PAIRS)
    }

    fn acked(&self, feature: u32) -> bool {
        self.acked_features & bit(feature) != 0
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        device_type::NET
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
        config::CONFIG_SPACE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = config::config_space(self.mac, self.queue_pairs(), DEFAULT_MTU);
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // The MAC is only writable for legacy drivers; everything else is
        // read-only.
        log::debug!(
            "virtio-net: ignored {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmapAtomic,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueActivation>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::BadQueues("device already active".into()));
        }
        let mq = self.acked(VIRTIO_NET_F_MQ);
        let pairs = if mq { self.backends.len() } else { 1 };
        let ctrl_index = self
            .acked(VIRTIO_NET_F_CTRL_VQ)
            .then_some(if mq { 2 * pairs } else { 2 });
        let event_idx = self.acked(VIRTIO_RING_F_EVENT_IDX);

        let mut rx: Vec<Option<Queue>> = (0..pairs).map(|_| None).collect();
        let mut tx: Vec<Option<Queue>> = (0..pairs).map(|_| None).collect();
        let mut ctrl = None;
        let mut notifiers = Vec::with_capacity(queues.len());
        {
            let guard = mem.memory();
            for QueueActivation {
                index,
                mut queue,
                notifier,
            } in queues
            {
                let i = usize::from(index);
                if !queue.is_valid(&*guard) {
                    return Err(ActivateError::BadQueues(format!(
                        "queue {index} does not fit in guest memory"
                    )));
                }
                queue.set_event_idx(event_idx);
                if Some(i) == ctrl_index {
                    ctrl = Some((index, queue));
                } else if i < 2 * pairs {
                    let slot = if i % 2 == 0 {
                        &mut rx[i / 2]
                    } else {
                        &mut tx[i / 2]
                    };
                    *slot = Some(queue);
                } else {
                    return Err(ActivateError::BadQueues(format!(
                        "virtio-net has no queue {index} with the negotiated features"
                    )));
                }
                notifiers.push((index, notifier));
            }
        }

        let offload = tun_offload_flags(self.acked_features);
        for backend in &self.backends {
            backend
                .set_offload(offload)
                .map_err(ActivateError::Worker)?;
        }

        let handler = NetHandler {
            mem,
            interrupt,
            backends: self
                .backends
                .iter()
                .map(|b| BackendState::new(Arc::clone(b)))
                .collect(),
            rx,
            tx,
            ctrl,
            mrg_rxbuf: self.acked(VIRTIO_NET_F_MRG_RXBUF),
            guest_csum: self.acked(VIRTIO_NET_F_GUEST_CSUM),
            mq,
            active_pairs: 1,
            tx_buf: Vec::with_capacity(MAX_FRAME_LEN),
            resume: EventFd::new(EFD_NONBLOCK).map_err(ActivateError::Worker)?,
        };
        let worker =
            DeviceWorker::spawn("virtio-net", handler, notifiers).map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            // The backends are shared with the device, so nothing is lost
            // even if the worker died; frames still pending in it are
            // dropped, as a NIC reset would.
            let _ = worker.stop();
        }
        self.acked_features = 0;
    }
}
