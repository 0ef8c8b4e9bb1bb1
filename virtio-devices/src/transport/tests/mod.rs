//! Unit tests of the transport: a mock device that records what the
//! transport asks of it, and helpers that play the driver's side of BAR and
//! configuration space accesses.

mod common_config;
mod pci;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ::pci::interrupt::RecordingInterruptGroup;
use ::pci::{InterruptError, IntxInterrupt, PciDevice};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::*;
use crate::{
    ActivateError, GuestMemoryMmapAtomic, QueueActivation, VirtioDevice, VirtioInterrupt,
    DEVICE_ACKNOWLEDGE, DEVICE_DRIVER, DEVICE_DRIVER_OK, DEVICE_FEATURES_OK,
};

pub(super) const MEM_SIZE: usize = 0x10_0000;
pub(super) const BAR: u64 = 0x1_0000_0000;

// Common configuration offsets.
pub(super) const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub(super) const DEVICE_FEATURE: u64 = 0x04;
pub(super) const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub(super) const DRIVER_FEATURE: u64 = 0x0c;
pub(super) const MSIX_CONFIG: u64 = 0x10;
pub(super) const NUM_QUEUES: u64 = 0x12;
pub(super) const DEVICE_STATUS: u64 = 0x14;
pub(super) const CONFIG_GENERATION: u64 = 0x15;
pub(super) const QUEUE_SELECT: u64 = 0x16;
pub(super) const QUEUE_SIZE: u64 = 0x18;
pub(super) const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub(super) const QUEUE_ENABLE: u64 = 0x1c;
pub(super) const QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub(super) const QUEUE_DESC: u64 = 0x20;
pub(super) const QUEUE_DRIVER: u64 = 0x28;
pub(super) const QUEUE_DEVICE: u64 = 0x30;
pub(super) const QUEUE_NOTIF_CONFIG_DATA: u64 = 0x38;
pub(super) const QUEUE_RESET: u64 = 0x3a;

pub(super) const F_VERSION_1: u64 = 1 << 32;
pub(super) const F_EVENT_IDX: u64 = 1 << 29;
pub(super) const F_RING_RESET: u64 = 1 << 40;
pub(super) const F_ACCESS_PLATFORM: u64 = 1 << 33;

/// What the mock device was asked to do.
#[derive(Default)]
pub(super) struct MockState {
    pub acked: Vec<u64>,
    pub resets: usize,
    /// (index, size, desc, avail, used, event_idx) of each activated queue.
    pub activated: Vec<(u16, u16, u64, u64, u64, bool)>,
    pub queues: Vec<QueueActivation>,
    pub interrupt: Option<Arc<dyn VirtioInterrupt>>,
    pub fail_activate: bool,
    pub fail_enable_queue: bool,
    pub queue_resets: Vec<u16>,
    pub reenabled: Vec<u16>,
    pub config: Vec<u8>,
    pub config_writes: Vec<(u64, Vec<u8>)>,
    pub generation: u32,
}

pub(super) struct MockDevice {
    pub device_type: u32,
    pub sizes: Vec<u16>,
    /// Bytes of configuration space the device claims (its contents, in
    /// [`MockState::config`], may be shorter or longer).
    pub config_size: usize,
    pub features: u64,
    pub queue_reset: bool,
    pub state: Arc<Mutex<MockState>>,
}

impl MockDevice {
    pub fn new(device_type: u32, sizes: &[u16], features: u64) -> Self {
        MockDevice {
            device_type,
            sizes: sizes.to_vec(),
            // As large as a virtio-net configuration.
            config_size: 24,
            features,
            queue_reset: false,
            state: Arc::new(Mutex::new(MockState {
                config: (0u8..16).collect(),
                ..Default::default()
            })),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, MockState> {
        self.state.lock().unwrap()
    }
}

impl VirtioDevice for MockDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        self.features
    }
    fn ack_features(&mut self, features: u64) {
        self.state().acked.push(features);
    }
    fn config_size(&self) -> usize {
        self.config_size
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let state = self.state();
        for (i, b) in data.iter_mut().enumerate() {
            *b = state
                .config
                .get(offset as usize + i)
                .copied()
                .unwrap_or_default();
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.state().config_writes.push((offset, data.to_vec()));
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmapAtomic,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueActivation>,
    ) -> Result<(), ActivateError> {
        let mut state = self.state();
        if state.fail_activate {
            return Err(ActivateError::BadQueues("mock refuses".into()));
        }
        state.activated = queues
            .iter()
            .map(|a| {
                let q = &a.queue;
                let e = q.event_idx_enabled();
                (
                    a.index,
                    q.size(),
                    q.desc_table(),
                    q.avail_ring(),
                    q.used_ring(),
                    e,
                )
            })
            .collect();
        state.queues = queues;
        state.interrupt = Some(interrupt);
        Ok(())
    }
    fn reset(&mut self) {
        let mut state = self.state();
        state.resets += 1;
        state.queues.clear();
        state.interrupt = None;
    }
    fn supports_queue_reset(&self) -> bool {
        self.queue_reset
    }
    fn reset_queue(&mut self, index: u16) -> Option<QueueActivation> {
        let mut state = self.state();
        state.queue_resets.push(index);
        let pos = state.queues.iter().position(|q| q.index == index)?;
        Some(state.queues.remove(pos))
    }
    fn enable_queue(&mut self, queue: QueueActivation) -> Result<(), ActivateError> {
        let mut state = self.state();
        if state.fail_enable_queue {
            return Err(ActivateError::BadQueues("mock refuses".into()));
        }
        state.reenabled.push(queue.index);
        state.queues.push(queue);
        Ok(())
    }
    fn config_generation(&self) -> u32 {
        self.state().generation
    }
}

/// An INTx line that remembers its level and every change.
#[derive(Default)]
pub(super) struct RecordingIntx {
    pub level: AtomicBool,
    pub changes: Mutex<Vec<bool>>,
}

impl IntxInterrupt for RecordingIntx {
    fn assert(&self) -> Result<(), InterruptError> {
        self.level.store(true, Ordering::SeqCst);
        self.changes.lock().unwrap().push(true);
        Ok(())
    }
    fn deassert(&self) -> Result<(), InterruptError> {
        self.level.store(false, Ordering::SeqCst);
        self.changes.lock().unwrap().push(false);
        Ok(())
    }
}

impl RecordingIntx {
    pub fn asserted(&self) -> bool {
        self.level.load(Ordering::SeqCst)
    }
}

/// A transport around a mock device, with the test playing the driver.
pub(super) struct Harness {
    pub dev: VirtioPciDevice,
    pub state: Arc<Mutex<MockState>>,
    pub group: Arc<RecordingInterruptGroup>,
    pub intx: Arc<RecordingIntx>,
}

impl Harness {
    /// A network-type mock with three queues of 256 (and one of 16).
    pub fn new() -> Self {
        Self::with_device(MockDevice::new(1, &[256, 256, 16], 1 << 5 | F_EVENT_IDX))
    }

    pub fn with_device(device: MockDevice) -> Self {
        let state = device.state.clone();
        let vectors = msix_vector_count(&device);
        let group = Arc::new(RecordingInterruptGroup::new(vectors));
        let intx = Arc::new(RecordingIntx::default());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let dev = VirtioPciDevice::new(
            "test".into(),
            Arc::new(Mutex::new(device)),
            GuestMemoryAtomic::new(mem),
            group.clone(),
            Some(intx.clone()),
            BAR,
        )
        .unwrap();
        Harness {
            dev,
            state,
            group,
            intx,
        }
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, MockState> {
        self.state.lock().unwrap()
    }

    pub fn read(&mut self, offset: u64, len: usize) -> u64 {
        let mut data = [0u8; 8];
        self.dev.read_bar(BAR, offset, &mut data[..len]);
        u64::from_le_bytes(data)
    }

    pub fn write(&mut self, offset: u64, len: usize, value: u64) {
        self.dev.write_bar(BAR, offset, &value.to_le_bytes()[..len]);
    }

    pub fn r8(&mut self, offset: u64) -> u8 {
        self.read(offset, 1) as u8
    }
    pub fn r16(&mut self, offset: u64) -> u16 {
        self.read(offset, 2) as u16
    }
    pub fn r32(&mut self, offset: u64) -> u32 {
        self.read(offset, 4) as u32
    }
    pub fn r64(&mut self, offset: u64) -> u64 {
        self.read(offset, 8)
    }
    pub fn w8(&mut self, offset: u64, v: u8) {
        self.write(offset, 1, v.into());
    }
    pub fn w16(&mut self, offset: u64, v: u16) {
        self.write(offset, 2, v.into());
    }
    pub fn w32(&mut self, offset: u64, v: u32) {
        self.write(offset, 4, v.into());
    }
    pub fn w64(&mut self, offset: u64, v: u64) {
        self.write(offset, 8, v);
    }

    /// Configuration space read, split into dword pieces as the root does.
    pub fn cfg_read(&mut self, offset: usize, len: usize) -> u32 {
        let mut value = 0u32;
        for i in 0..len {
            let at = offset + i;
            let reg = self.dev.read_config_register(at / 4);
            value |= ((reg >> ((at % 4) * 8)) & 0xff) << (i * 8);
        }
        value
    }

    /// Configuration space write of `len` bytes inside one dword.
    pub fn cfg_write(&mut self, offset: usize, len: usize, value: u32) {
        let bytes = value.to_le_bytes();
        self.dev
            .write_config_register(offset / 4, (offset % 4) as u64, &bytes[..len]);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns the status.
    pub fn negotiate(&mut self, features: u64) -> u8 {
        self.w8(DEVICE_STATUS, DEVICE_ACKNOWLEDGE);
        self.w8(DEVICE_STATUS, DEVICE_ACKNOWLEDGE | DEVICE_DRIVER);
        self.w32(DRIVER_FEATURE_SELECT, 0);
        self.w32(DRIVER_FEATURE, features as u32);
        self.w32(DRIVER_FEATURE_SELECT, 1);
        self.w32(DRIVER_FEATURE, (features >> 32) as u32);
        self.w8(
            DEVICE_STATUS,
            DEVICE_ACKNOWLEDGE | DEVICE_DRIVER | DEVICE_FEATURES_OK,
        );
        self.r8(DEVICE_STATUS)
    }

    /// Sets up queue `index` with `size` entries at `base` (rings packed
    /// one after the other, all in guest memory) and enables it.
    pub fn setup_queue(&mut self, index: u16, size: u16, base: u64) {
        let (desc, avail, used) = rings(size, base);
        self.w16(QUEUE_SELECT, index);
        self.w16(QUEUE_SIZE, size);
        self.w64(QUEUE_DESC, desc);
        self.w64(QUEUE_DRIVER, avail);
        self.w64(QUEUE_DEVICE, used);
        self.w16(QUEUE_ENABLE, 1);
    }

    pub fn driver_ok(&mut self) {
        let status = self.r8(DEVICE_STATUS);
        self.w8(DEVICE_STATUS, status | DEVICE_DRIVER_OK);
    }

    /// Enables MSI-X through the capability and unmasks `vectors` entries
    /// with distinct messages.
    pub fn enable_msix(&mut self, vectors: u16) {
        let cap = self.find_cap(0x11).expect("MSI-X capability");
        self.cfg_write(cap + 2, 2, 0x8000);
        for v in 0..u64::from(vectors) {
            let entry = MSIX_TABLE_OFFSET + v * 16;
            self.w32(entry, 0xfee0_0000 + (v as u32) * 0x10);
            self.w32(entry + 4, 0);
            self.w32(entry + 8, 0x40 + v as u32);
            self.w32(entry + 12, 0);
        }
    }

    /// Offset of the first capability with `id`.
    pub fn find_cap(&mut self, id: u8) -> Option<usize> {
        self.caps()
            .into_iter()
            .find(|(_, i)| *i == id)
            .map(|(o, _)| o)
    }

    /// (offset, id) of each capability, walking the chain.
    pub fn caps(&mut self) -> Vec<(usize, u8)> {
        let mut caps = Vec::new();
        let mut next = self.cfg_read(0x34, 1) as usize;
        while next != 0 && caps.len() < 48 {
            caps.push((next, self.cfg_read(next, 1) as u8));
            next = self.cfg_read(next + 1, 1) as usize;
        }
        caps
    }

    /// Offset of the virtio capability of `cfg_type`.
    pub fn virtio_cap(&mut self, cfg_type: u8) -> Option<usize> {
        let caps = self.caps();
        caps.into_iter()
            .filter(|(_, id)| *id == 0x09)
            .map(|(o, _)| o)
            .find(|&o| self.cfg_read(o + 3, 1) as u8 == cfg_type)
    }
}

/// Ring addresses for a queue of `size` at `base`: descriptor table, then
/// the available ring, then the used ring at the next 4-byte boundary.
pub(super) fn rings(size: u16, base: u64) -> (u64, u64, u64) {
    let desc = base;
    let avail = desc + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    (desc, avail, used)
}
