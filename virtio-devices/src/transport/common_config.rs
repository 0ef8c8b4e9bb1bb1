//! The common configuration structure (virtio 1.2 §4.1.4.3) and the device
//! lifecycle it drives: feature negotiation, the status state machine,
//! queue setup, activation, device reset and queue reset.
//!
//! Accesses of any width and alignment are accepted: a read returns the
//! bytes of every field it overlaps, and a write is merged into each field
//! it overlaps (the rest of the field keeps its value) before that field's
//! write semantics apply. So byte accesses to 16-bit fields, dword halves
//! of 64-bit fields and whole qwords all work, and odd accesses cannot
//! panic. Bytes past the structure read as zero and ignore writes.
//!
//! Invalid guest writes are ignored (logged at debug level), so the driver
//! reads back the previous value:
//! - writes to read-only fields (`device_feature`, `num_queues`,
//!   `config_generation`, `queue_notify_off`, `queue_notif_config_data`);
//! - `driver_feature` once FEATURES_OK is set, or with a select of 2 or more;
//! - a `queue_size` that is zero, not a power of two or above the maximum;
//! - queue addresses that break the ring alignment rules (16, 2 and 4);
//! - any queue configuration of an enabled queue, and queue fields while
//!   `queue_select` names no queue (those also read as zero);
//! - `queue_enable` 0, and `queue_enable` 1 for a queue whose rings are not
//!   inside guest memory (it stays disabled);
//! - status bits that skip a step (DRIVER before ACKNOWLEDGE, FEATURES_OK
//!   before DRIVER, DRIVER_OK before FEATURES_OK), attempts to clear bits
//!   other than by writing 0, and NEEDS_RESET (set by the device only);
//! - `queue_reset` unless VIRTIO_F_RING_RESET was negotiated.
//!
//! MSI-X vectors outside the table read back as NO_VECTOR, which is how
//! drivers detect that a vector could not be assigned.
//!
//! NEEDS_RESET is set, with a configuration interrupt, when activation or a
//! queue restart fails, and when the running device stops a queue the
//! driver broke (`VirtioInterrupt::set_needs_reset`).

use std::sync::{Arc, Mutex};

use log::{debug, warn};
use virtio_bindings::virtio_config::{
    VIRTIO_F_IN_ORDER, VIRTIO_F_ORDER_PLATFORM, VIRTIO_F_RING_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::EventFd;

use super::interrupt::{lock, VirtioPciInterrupt};
use super::VIRTIO_MSI_NO_VECTOR;
use crate::{
    GuestMemoryMmapAtomic, QueueActivation, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
    DEVICE_ACKNOWLEDGE, DEVICE_DRIVER, DEVICE_DRIVER_OK, DEVICE_FAILED, DEVICE_FEATURES_OK,
    DEVICE_NEEDS_RESET,
};

const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// Feature bits 24..=49 belong to the transport and to future extensions
/// (virtio 1.2 §6); the device's own bits are 0..=23 and 50 and up.
const TRANSPORT_FEATURES: u64 = ((1 << 50) - 1) & !((1 << 24) - 1);

/// The transport features passed through when the device offers them:
/// ring layout options the device's queue handling implements. Everything
/// else in the transport range is dropped: legacy-only bits, IOMMU
/// (ACCESS_PLATFORM), packed rings, notification data, SR-IOV, admin
/// queues. VIRTIO_F_RING_RESET is offered when the device can reset single
/// queues, and VIRTIO_F_VERSION_1 always.
const DEVICE_TRANSPORT_FEATURES: u64 = bit(VIRTIO_RING_F_INDIRECT_DESC)
    | bit(VIRTIO_RING_F_EVENT_IDX)
    | bit(VIRTIO_F_IN_ORDER)
    | bit(VIRTIO_F_ORDER_PLATFORM);

/// The features offered to the driver for `device`.
pub(crate) fn offered_features(device: &dyn VirtioDevice) -> u64 {
    let device_features = device.features();
    let mut features = (device_features & !TRANSPORT_FEATURES)
        | (device_features & DEVICE_TRANSPORT_FEATURES)
        | bit(VIRTIO_F_VERSION_1);
    if device.supports_queue_reset() {
        features |= bit(VIRTIO_F_RING_RESET);
    }
    features
}

/// The fields of `struct virtio_pci_common_cfg`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    DeviceFeatureSelect,
    DeviceFeature,
    DriverFeatureSelect,
    DriverFeature,
    MsixConfig,
    NumQueues,
    DeviceStatus,
    ConfigGeneration,
    QueueSelect,
    QueueSize,
    QueueMsixVector,
    QueueEnable,
    QueueNotifyOff,
    QueueDesc,
    QueueDriver,
    QueueDevice,
    QueueNotifConfigData,
    QueueReset,
}

/// (offset, size, field), in offset order, covering 0..0x3c without gaps.
const FIELDS: [(u64, u64, Field); 18] = [
    (0x00, 4, Field::DeviceFeatureSelect),
    (0x04, 4, Field::DeviceFeature),
    (0x08, 4, Field::DriverFeatureSelect),
    (0x0c, 4, Field::DriverFeature),
    (0x10, 2, Field::MsixConfig),
    (0x12, 2, Field::NumQueues),
    (0x14, 1, Field::DeviceStatus),
    (0x15, 1, Field::ConfigGeneration),
    (0x16, 2, Field::QueueSelect),
    (0x18, 2, Field::QueueSize),
    (0x1a, 2, Field::QueueMsixVector),
    (0x1c, 2, Field::QueueEnable),
    (0x1e, 2, Field::QueueNotifyOff),
    (0x20, 8, Field::QueueDesc),
    (0x28, 8, Field::QueueDriver),
    (0x30, 8, Field::QueueDevice),
    (0x38, 2, Field::QueueNotifConfigData),
    (0x3a, 2, Field::QueueReset),
];

/// One queue as the driver configures it.
pub(crate) struct QueueSlot {
    /// Size, ring addresses and enable bit; the device gets a copy.
    queue: Queue,
    /// Signalled on notification; the device gets a clone, the VMM may
    /// register it as an ioeventfd.
    notifier: EventFd,
}

/// The common configuration state and the device it drives.
pub(crate) struct CommonConfig {
    device: Arc<Mutex<dyn VirtioDevice>>,
    interrupt: Arc<VirtioPciInterrupt>,
    mem: GuestMemoryMmapAtomic,
    queues: Vec<QueueSlot>,
    msix_vectors: u16,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    /// Whether `activate` succeeded and the device has not been reset since.
    active: bool,
}

impl CommonConfig {
    /// State for a device with queues of `max_sizes`, all already checked
    /// to be valid, and `msix_vectors` table entries.
    pub(crate) fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<VirtioPciInterrupt>,
        mem: GuestMemoryMmapAtomic,
        queues: Vec<(Queue, EventFd)>,
        msix_vectors: u16,
    ) -> Self {
        CommonConfig {
            device,
            interrupt,
            mem,
            queues: queues
                .into_iter()
                .map(|(queue, notifier)| QueueSlot { queue, notifier })
                .collect(),
            msix_vectors,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            active: false,
        }
    }

    /// The device status register, with NEEDS_RESET if the device's
    /// worker asked for it.
    pub(crate) fn status(&self) -> u8 {
        if self.interrupt.needs_reset() {
            self.status | DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The features the driver wrote (accepted once FEATURES_OK is set).
    pub(crate) fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Number of queues.
    pub(crate) fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The notifier of queue `index`.
    pub(crate) fn notifier(&self, index: usize) -> Option<&EventFd> {
        self.queues.get(index).map(|s| &s.notifier)
    }

    /// A driver notification for queue `index` (a notify region write).
    /// Ignored for queues that do not exist or are not enabled.
    pub(crate) fn notify(&self, index: u64) {
        let slot = usize::try_from(index).ok().and_then(|i| self.queues.get(i));
        match slot {
            Some(slot) if slot.queue.ready() => {
                if let Err(e) = slot.notifier.write(1) {
                    warn!("virtio-pci: cannot signal queue {index}: {e}");
                }
            }
            _ => debug!("virtio-pci: notification for disabled or absent queue {index}"),
        }
    }

    /// Guest read of `data.len()` bytes at `offset`.
    pub(crate) fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return;
        };
        for &(start, size, field) in FIELDS.iter() {
            let field_end = start + size;
            if field_end <= offset || start >= end {
                continue;
            }
            let bytes = self.read_field(field).to_le_bytes();
            for addr in start.max(offset)..field_end.min(end) {
                // Both differences are below 8 and data.len() by construction.
                data[(addr - offset) as usize] = bytes[(addr - start) as usize];
            }
        }
    }

    /// Guest write of `data` at `offset`.
    pub(crate) fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return;
        };
        for &(start, size, field) in FIELDS.iter() {
            let field_end = start + size;
            if field_end <= offset || start >= end {
                continue;
            }
            let mut bytes = self.read_field(field).to_le_bytes();
            for addr in start.max(offset)..field_end.min(end) {
                bytes[(addr - start) as usize] = data[(addr - offset) as usize];
            }
            self.write_field(field, u64::from_le_bytes(bytes));
        }
    }

    fn selected(&self) -> Option<(u16, &QueueSlot)> {
        let slot = self.queues.get(usize::from(self.queue_select))?;
        Some((self.queue_select, slot))
    }

    fn read_field(&self, field: Field) -> u64 {
        let offered = || offered_features(&*lock(&self.device));
        match field {
            Field::DeviceFeatureSelect => self.device_feature_select.into(),
            Field::DeviceFeature => match self.device_feature_select {
                0 => offered() & 0xffff_ffff,
                1 => offered() >> 32,
                _ => 0,
            },
            Field::DriverFeatureSelect => self.driver_feature_select.into(),
            Field::DriverFeature => match self.driver_feature_select {
                0 => self.driver_features & 0xffff_ffff,
                1 => self.driver_features >> 32,
                _ => 0,
            },
            Field::MsixConfig => self.interrupt.config_vector().into(),
            // At most MAX_QUEUES, checked at construction.
            Field::NumQueues => self.queues.len() as u64,
            Field::DeviceStatus => self.status().into(),
            Field::ConfigGeneration => {
                // Truncation is the point: any change of either counter
                // changes the byte the driver compares.
                let device = lock(&self.device).config_generation() as u8;
                device.wrapping_add(self.interrupt.config_changes()).into()
            }
            Field::QueueSelect => self.queue_select.into(),
            _ => self
                .selected()
                .map_or(0, |(index, slot)| self.read_queue_field(field, index, slot)),
        }
    }

    fn read_queue_field(&self, field: Field, index: u16, slot: &QueueSlot) -> u64 {
        let q = &slot.queue;
        match field {
            Field::QueueSize => q.size().into(),
            Field::QueueMsixVector => self.interrupt.queue_vector(index).into(),
            Field::QueueEnable => q.ready().into(),
            // notify_off_multiplier times this is the queue's offset in the
            // notify region.
            Field::QueueNotifyOff => index.into(),
            Field::QueueDesc => q.desc_table(),
            Field::QueueDriver => q.avail_ring(),
            Field::QueueDevice => q.used_ring(),
            // Queue resets complete before the write returns.
            _ => 0,
        }
    }

    fn write_field(&mut self, field: Field, value: u64) {
        // Each field is at most `size` bytes wide, so truncating to its
        // type drops nothing the guest wrote.
        match field {
            Field::DeviceFeatureSelect => self.device_feature_select = value as u32,
            Field::DriverFeatureSelect => self.driver_feature_select = value as u32,
            Field::DriverFeature => self.write_driver_features(value as u32),
            Field::MsixConfig => {
                let vector = self.checked_vector(value as u16);
                self.interrupt.set_config_vector(vector);
            }
            Field::DeviceStatus => self.write_status(value as u8),
            Field::QueueSelect => self.queue_select = value as u16,
            Field::QueueMsixVector => {
                // Allowed even on an enabled queue: it is routing, not ring
                // configuration, and drivers clear it on teardown.
                if self.selected().is_some() {
                    let vector = self.checked_vector(value as u16);
                    self.interrupt.set_queue_vector(self.queue_select, vector);
                }
            }
            Field::QueueEnable => match value {
                1 => self.enable_queue(),
                _ => debug!("virtio-pci: ignoring queue_enable write of {value}"),
            },
            Field::QueueReset => match value {
                1 => self.reset_queue(),
                _ => debug!("virtio-pci: ignoring queue_reset write of {value}"),
            },
            Field::QueueSize | Field::QueueDesc | Field::QueueDriver | Field::QueueDevice => {
                self.write_queue_config(field, value)
            }
            Field::DeviceFeature
            | Field::NumQueues
            | Field::ConfigGeneration
            | Field::QueueNotifyOff
            | Field::QueueNotifConfigData => {
                if value != self.read_field(field) {
                    debug!("virtio-pci: ignoring write to read-only {field:?}");
                }
            }
        }
    }

    /// `vector` if it names a table entry, NO_VECTOR otherwise.
    fn checked_vector(&self, vector: u16) -> u16 {
        if vector < self.msix_vectors {
            vector
        } else {
            if vector != VIRTIO_MSI_NO_VECTOR {
                debug!("virtio-pci: MSI-X vector {vector} out of range");
            }
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        if self.status & DEVICE_FEATURES_OK != 0 {
            debug!("virtio-pci: ignoring driver_feature write after FEATURES_OK");
            return;
        }
        let value = u64::from(value);
        self.driver_features = match self.driver_feature_select {
            0 => (self.driver_features & !0xffff_ffff) | value,
            1 => (self.driver_features & 0xffff_ffff) | (value << 32),
            select => {
                debug!("virtio-pci: ignoring driver_feature write with select {select}");
                return;
            }
        };
    }

    fn write_queue_config(&mut self, field: Field, value: u64) {
        let Some(slot) = self.queues.get_mut(usize::from(self.queue_select)) else {
            debug!("virtio-pci: {field:?} write with no queue selected");
            return;
        };
        if slot.queue.ready() {
            debug!("virtio-pci: ignoring {field:?} write to enabled queue");
            return;
        }
        let q = &mut slot.queue;
        let result = match field {
            Field::QueueSize => q.try_set_size(value as u16),
            Field::QueueDesc => q.try_set_desc_table_address(GuestAddress(value)),
            Field::QueueDriver => q.try_set_avail_ring_address(GuestAddress(value)),
            Field::QueueDevice => q.try_set_used_ring_address(GuestAddress(value)),
            _ => Ok(()),
        };
        if let Err(e) = result {
            debug!("virtio-pci: ignoring {field:?} write of {value:#x}: {e}");
        }
    }

    fn features_acceptable(&self) -> bool {
        let offered = offered_features(&*lock(&self.device));
        let extra = self.driver_features & !offered;
        if extra != 0 {
            debug!("virtio-pci: driver accepted features {extra:#x} that were not offered");
            return false;
        }
        if self.driver_features & bit(VIRTIO_F_VERSION_1) == 0 {
            debug!("virtio-pci: driver did not accept VIRTIO_F_VERSION_1");
            return false;
        }
        true
    }

    /// Status bits are only added, each after the one before it in the
    /// initialization sequence (virtio 1.2 §3.1.1); 0 resets the device.
    fn write_status(&mut self, value: u8) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & self.status != self.status {
            debug!(
                "virtio-pci: ignoring attempt to clear status bits {:#x}",
                self.status & !value
            );
        }
        let add = value & !self.status;
        if add & DEVICE_ACKNOWLEDGE != 0 {
            self.status |= DEVICE_ACKNOWLEDGE;
        }
        if add & DEVICE_DRIVER != 0 {
            if self.status & DEVICE_ACKNOWLEDGE != 0 {
                self.status |= DEVICE_DRIVER;
            } else {
                debug!("virtio-pci: DRIVER before ACKNOWLEDGE");
            }
        }
        if add & DEVICE_FAILED != 0 {
            self.status |= DEVICE_FAILED;
        }
        if add & DEVICE_FEATURES_OK != 0 {
            if self.status & DEVICE_DRIVER == 0 {
                debug!("virtio-pci: FEATURES_OK before DRIVER");
            } else if self.features_acceptable() {
                self.status |= DEVICE_FEATURES_OK;
                lock(&self.device).ack_features(self.driver_features);
            }
        }
        if add & DEVICE_DRIVER_OK != 0 {
            if self.status & DEVICE_FEATURES_OK == 0 || self.status & DEVICE_FAILED != 0 {
                debug!("virtio-pci: DRIVER_OK refused in status {:#x}", self.status);
            } else {
                self.status |= DEVICE_DRIVER_OK;
                self.activate();
            }
        }
        if add & DEVICE_NEEDS_RESET != 0 {
            debug!("virtio-pci: NEEDS_RESET is set by the device only");
        }
    }

    /// A copy of queue `index` and a clone of its notifier for the device.
    fn activation(&self, index: u16, event_idx: bool) -> Option<QueueActivation> {
        let slot = self.queues.get(usize::from(index))?;
        let mut queue = match Queue::try_from(slot.queue.state()) {
            Ok(q) => q,
            Err(e) => {
                warn!("virtio-pci: cannot copy queue {index}: {e}");
                return None;
            }
        };
        queue.set_event_idx(event_idx);
        match slot.notifier.try_clone() {
            Ok(notifier) => Some(QueueActivation {
                index,
                queue,
                notifier,
            }),
            Err(e) => {
                warn!("virtio-pci: cannot clone the notifier of queue {index}: {e}");
                None
            }
        }
    }

    fn event_idx(&self) -> bool {
        self.driver_features & bit(VIRTIO_RING_F_EVENT_IDX) != 0
    }

    fn activate(&mut self) {
        let event_idx = self.event_idx();
        let mut activations = Vec::new();
        for (index, slot) in (0u16..).zip(self.queues.iter()) {
            if !slot.queue.ready() {
                continue;
            }
            match self.activation(index, event_idx) {
                Some(a) => activations.push(a),
                None => return self.set_needs_reset(),
            }
        }
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        let result = lock(&self.device).activate(self.mem.clone(), interrupt, activations);
        match result {
            Ok(()) => self.active = true,
            Err(e) => {
                warn!("virtio-pci: device activation failed: {e}");
                self.set_needs_reset();
            }
        }
    }

    /// Tells the driver the device is broken until it resets it.
    fn set_needs_reset(&mut self) {
        self.status |= DEVICE_NEEDS_RESET;
        if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Config) {
            warn!("virtio-pci: cannot raise the configuration interrupt: {e}");
        }
    }

    /// Device reset: stop the device first, so that nothing uses the
    /// queues while they are reset, then return every register to its
    /// initial value.
    pub(crate) fn reset(&mut self) {
        lock(&self.device).reset();
        for slot in self.queues.iter_mut() {
            slot.queue.reset();
            // Drop notifications meant for the old rings. An error means
            // there was none pending.
            let _ = slot.notifier.read();
        }
        self.interrupt.reset();
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.active = false;
    }

    fn enable_queue(&mut self) {
        let index = self.queue_select;
        let event_idx = self.event_idx();
        let active = self.active;
        let mem = self.mem.memory();
        let Some(slot) = self.queues.get_mut(usize::from(index)) else {
            debug!("virtio-pci: queue_enable with no queue selected");
            return;
        };
        if slot.queue.ready() {
            return;
        }
        // is_valid only accepts ready queues.
        slot.queue.set_ready(true);
        if !slot.queue.is_valid(&*mem) {
            debug!("virtio-pci: queue {index} rings are not in guest memory, not enabling");
            slot.queue.set_ready(false);
            return;
        }
        if !active {
            return;
        }
        // Enabled while the device runs: a queue coming back after a queue
        // reset.
        let Some(activation) = self.activation(index, event_idx) else {
            self.disable_queue(index);
            return self.set_needs_reset();
        };
        let result = lock(&self.device).enable_queue(activation);
        if let Err(e) = result {
            warn!("virtio-pci: device refused to restart queue {index}: {e}");
            self.disable_queue(index);
            self.set_needs_reset();
        }
    }

    fn disable_queue(&mut self, index: u16) {
        if let Some(slot) = self.queues.get_mut(usize::from(index)) {
            slot.queue.set_ready(false);
        }
    }

    /// VIRTIO_F_RING_RESET: take the queue away from the device and return
    /// its configuration to the initial values; the driver may then set it
    /// up again and re-enable it.
    fn reset_queue(&mut self) {
        if self.driver_features & bit(VIRTIO_F_RING_RESET) == 0
            || self.status & DEVICE_FEATURES_OK == 0
        {
            debug!("virtio-pci: queue_reset without VIRTIO_F_RING_RESET");
            return;
        }
        let index = self.queue_select;
        let Some(slot) = self.queues.get(usize::from(index)) else {
            debug!("virtio-pci: queue_reset with no queue selected");
            return;
        };
        if self.active && slot.queue.ready() {
            let returned = lock(&self.device).reset_queue(index);
            if returned.is_none() {
                warn!("virtio-pci: device could not reset queue {index}");
                return self.set_needs_reset();
            }
        }
        if let Some(slot) = self.queues.get_mut(usize::from(index)) {
            slot.queue.reset();
            let _ = slot.notifier.read();
        }
        self.interrupt.set_queue_vector(index, VIRTIO_MSI_NO_VECTOR);
    }
}
