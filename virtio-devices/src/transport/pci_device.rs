//! The PCI function: configuration space with the virtio and MSI-X
//! capabilities, and the emulation of BAR 0.

use std::any::Any;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use devices::BusDevice;
use log::debug;
use pci::{
    BarReprogrammingParams, IntxInterrupt, MsiInterruptGroup, MsixCapability, MsixConfig,
    PciBarPrefetchable, PciBarRegionType, PciClassCode, PciConfiguration, PciConfigurationParams,
    PciDevice,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::capabilities::{
    VirtioPciCap, CAP_BAR, CAP_EXTRA, CAP_LENGTH, CAP_OFFSET, VIRTIO_PCI_CAP_COMMON_CFG,
    VIRTIO_PCI_CAP_DEVICE_CFG, VIRTIO_PCI_CAP_ISR_CFG,
};
use super::common_config::CommonConfig;
use super::interrupt::{lock, VirtioPciInterrupt};
use super::*;
use crate::{device_type, GuestMemoryMmapAtomic, VirtioDevice};

/// Offset of message control in the MSI-X capability.
const MSIX_MSG_CTL: usize = 2;
/// The command register is configuration dword 1.
const COMMAND_REG: usize = 1;

/// Number of MSI-X vectors a transport for `device` uses: one per queue
/// and one for configuration changes. The VMM sizes the interrupt group
/// with this before building the [`VirtioPciDevice`].
pub fn msix_vector_count(device: &dyn VirtioDevice) -> u16 {
    let queues = device.queue_max_sizes().len().min(MAX_QUEUES);
    // MAX_QUEUES + 1 fits in u16.
    (queues + 1) as u16
}

fn class_code(device_type: u32) -> (PciClassCode, u8) {
    match device_type {
        device_type::NET => (PciClassCode::NetworkController, 0x00),
        device_type::BLOCK => (PciClassCode::MassStorage, 0x00),
        device_type::CONSOLE => (PciClassCode::SimpleCommunicationController, 0x80),
        _ => (PciClassCode::Other, 0x00),
    }
}

/// Which part of BAR 0 an access lands in, with the offset inside it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Region {
    Common(u64),
    Isr(u64),
    DeviceConfig(u64),
    Notify(u64),
    MsixTable(u64),
    MsixPba(u64),
    Reserved,
}

/// Builds a [`Region`] from the offset inside it.
type RegionAt = fn(u64) -> Region;

const REGIONS: [(Range<u64>, RegionAt); 6] = [
    (COMMON_CONFIG_OFFSET..ISR_OFFSET, Region::Common),
    (ISR_OFFSET..DEVICE_CONFIG_OFFSET, Region::Isr),
    (DEVICE_CONFIG_OFFSET..NOTIFY_OFFSET, Region::DeviceConfig),
    (NOTIFY_OFFSET..MSIX_TABLE_OFFSET, Region::Notify),
    (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET, Region::MsixTable),
    (
        MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + MSIX_PBA_MAX_SIZE,
        Region::MsixPba,
    ),
];

/// The region holding all of `[offset, offset + len)`, or `None` if the
/// access straddles two regions.
fn region(offset: u64, len: usize) -> Option<Region> {
    let last = offset.checked_add(len.max(1) as u64 - 1)?;
    for (range, make) in REGIONS.iter() {
        if range.contains(&offset) {
            return range.contains(&last).then(|| make(offset - range.start));
        }
    }
    let reserved_start = MSIX_PBA_OFFSET + MSIX_PBA_MAX_SIZE;
    (offset >= reserved_start).then_some(Region::Reserved)
}

/// A virtio device as a PCI function.
pub struct VirtioPciDevice {
    id: String,
    device: Arc<Mutex<dyn VirtioDevice>>,
    config: PciConfiguration,
    common: CommonConfig,
    msix: Arc<Mutex<MsixConfig>>,
    interrupt: Arc<VirtioPciInterrupt>,
    msix_cap: usize,
    cfg_cap: usize,
    device_config_len: u64,
}

impl VirtioPciDevice {
    /// Builds the function for `device`, with BAR 0 at `bar_addr` (a
    /// [`VIRTIO_PCI_BAR_SIZE`]-byte range aligned to
    /// [`VIRTIO_PCI_BAR_ALIGNMENT`] in 64-bit MMIO space). `msix_group`
    /// must accept [`msix_vector_count`] vectors; `intx` is the function's
    /// INTA# line, if it has one (without it, the interrupt pin reads 0).
    pub fn new(
        id: String,
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmapAtomic,
        msix_group: Arc<dyn MsiInterruptGroup>,
        intx: Option<Arc<dyn IntxInterrupt>>,
        bar_addr: u64,
    ) -> Result<Self, VirtioPciError> {
        let (dev_type, max_sizes, config_size) = {
            let d = lock(&device);
            (
                d.device_type(),
                d.queue_max_sizes().to_vec(),
                d.config_size(),
            )
        };
        if max_sizes.len() > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(max_sizes.len()));
        }
        let device_config_len = u64::try_from(config_size)
            .ok()
            .filter(|len| *len <= DEVICE_CONFIG_MAX_SIZE)
            .ok_or(VirtioPciError::ConfigSpaceTooLarge(config_size))?;
        let mut queues = Vec::with_capacity(max_sizes.len());
        for (index, &size) in max_sizes.iter().enumerate() {
            let queue =
                Queue::new(size).map_err(|_| VirtioPciError::InvalidQueueSize { index, size })?;
            let notifier = EventFd::new(EFD_NONBLOCK)
                .map_err(|source| VirtioPciError::Notifier { index, source })?;
            queues.push((queue, notifier));
        }
        let device_id = u16::try_from(dev_type)
            .ok()
            .and_then(|t| VIRTIO_PCI_DEVICE_ID_BASE.checked_add(t))
            .ok_or(VirtioPciError::InvalidDeviceType(dev_type))?;

        // Checked against MAX_QUEUES above.
        let vectors = (max_sizes.len() + 1) as u16;
        let msix = Arc::new(Mutex::new(MsixConfig::new(vectors, msix_group)?));
        let interrupt = Arc::new(VirtioPciInterrupt::new(
            msix.clone(),
            intx.clone(),
            max_sizes.len(),
        ));

        let (class_code, subclass) = class_code(dev_type);
        let mut config = PciConfiguration::new(&PciConfigurationParams {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id,
            revision_id: VIRTIO_PCI_REVISION,
            class_code,
            subclass,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: VIRTIO_PCI_SUBSYSTEM_ID,
            interrupt_pin: if intx.is_some() { 1 } else { 0 },
            ..Default::default()
        });
        config.add_bar(
            0,
            bar_addr,
            VIRTIO_PCI_BAR_SIZE,
            PciBarRegionType::Memory64BitRegion,
            PciBarPrefetchable::NotPrefetchable,
        )?;

        // Offsets and sizes are constants well below 4 GiB.
        let cap = |cfg_type, offset: u64, len: u64| {
            VirtioPciCap::new(cfg_type, 0, offset as u32, len as u32)
        };
        config.add_capability(&cap(
            VIRTIO_PCI_CAP_COMMON_CFG,
            COMMON_CONFIG_OFFSET,
            COMMON_CONFIG_SIZE,
        ))?;
        let notify_len = max_sizes.len() as u64 * u64::from(NOTIFY_OFF_MULTIPLIER);
        config.add_capability(&VirtioPciCap::notify(
            0,
            NOTIFY_OFFSET as u32,
            // A device without queues still gets a well-formed region.
            notify_len.max(u64::from(NOTIFY_OFF_MULTIPLIER)) as u32,
            NOTIFY_OFF_MULTIPLIER,
        ))?;
        config.add_capability(&cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_SIZE))?;
        if device_config_len > 0 {
            config.add_capability(&cap(
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CONFIG_OFFSET,
                device_config_len,
            ))?;
        }
        let cfg_cap = config.add_capability(&VirtioPciCap::pci_cfg())?;
        let msix_cap = config.add_capability(&MsixCapability::new(
            vectors,
            0,
            MSIX_TABLE_OFFSET as u32,
            0,
            MSIX_PBA_OFFSET as u32,
        ))?;

        let common = CommonConfig::new(device.clone(), interrupt.clone(), mem, queues, vectors);
        Ok(VirtioPciDevice {
            id,
            device,
            config,
            common,
            msix,
            interrupt,
            msix_cap,
            cfg_cap,
            device_config_len,
        })
    }

    /// The name given at construction.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The device behind the transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// Number of MSI-X vectors (table entries): queues + 1.
    pub fn msix_vectors(&self) -> u16 {
        lock(&self.msix).vector_count()
    }

    /// The interrupt state shared with the device's worker.
    pub fn interrupt(&self) -> &Arc<VirtioPciInterrupt> {
        &self.interrupt
    }

    /// The MSI-X table and PBA state.
    pub fn msix_config(&self) -> &Arc<Mutex<MsixConfig>> {
        &self.msix
    }

    /// The device status register.
    pub fn device_status(&self) -> u8 {
        self.common.status()
    }

    /// The features the driver wrote.
    pub fn driver_features(&self) -> u64 {
        self.common.driver_features()
    }

    /// Where BAR 0 is currently mapped.
    pub fn bar_address(&self) -> u64 {
        // BAR 0 always exists: new() fails otherwise.
        self.config.bar_mapped_address(0).unwrap_or_default()
    }

    /// The guest address of queue `queue`'s notification register with
    /// BAR 0 at `bar_base`.
    pub fn notify_address(bar_base: u64, queue: u16) -> u64 {
        // Wrapping: the base comes from the VMM and is never near the top.
        bar_base
            .wrapping_add(NOTIFY_OFFSET)
            .wrapping_add(u64::from(queue) * u64::from(NOTIFY_OFF_MULTIPLIER))
    }

    /// For each queue: the address a driver writes to notify it (with BAR 0
    /// at `bar_base`), the eventfd that notification signals, and the queue
    /// index. The VMM registers these as ioeventfds (any access width, no
    /// data match) and moves them when the BAR moves.
    pub fn ioeventfds(&self, bar_base: u64) -> Vec<(u64, &EventFd, u16)> {
        (0u16..)
            .zip(0..self.common.num_queues())
            .filter_map(|(q, i)| {
                let fd = self.common.notifier(i)?;
                Some((Self::notify_address(bar_base, q), fd, q))
            })
            .collect()
    }

    /// Resets the virtio device as if the driver wrote 0 to device_status
    /// (e.g. on VM reset).
    pub fn reset(&mut self) {
        self.common.reset();
    }

    /// Guest read at `offset` in BAR 0.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match region(offset, data.len()) {
            Some(r) => self.read_region(r, data),
            None => {
                // Straddles two regions: byte by byte, each to its owner.
                for (pos, byte) in (0u64..).zip(data.iter_mut()) {
                    let mut b = [0u8];
                    if let Some(r) = offset.checked_add(pos).and_then(|o| region(o, 1)) {
                        self.read_region(r, &mut b);
                    }
                    *byte = b[0];
                }
            }
        }
    }

    /// Guest write at `offset` in BAR 0.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match region(offset, data.len()) {
            Some(r) => self.write_region(r, data),
            None => {
                for (pos, byte) in (0u64..).zip(data.iter()) {
                    if let Some(r) = offset.checked_add(pos).and_then(|o| region(o, 1)) {
                        self.write_region(r, std::slice::from_ref(byte));
                    }
                }
            }
        }
    }

    fn read_region(&mut self, region: Region, data: &mut [u8]) {
        data.fill(0);
        match region {
            Region::Common(off) => self.common.read(off, data),
            Region::Isr(0) => {
                if let Some(first) = data.first_mut() {
                    *first = self.interrupt.read_isr();
                }
            }
            Region::DeviceConfig(off) => {
                let end = self.device_config_len;
                if let Some(part) = in_bounds(off, data.len(), end).and_then(|n| data.get_mut(..n))
                {
                    lock(&self.device).read_config(off, part);
                }
            }
            Region::MsixTable(off) => lock(&self.msix).read_table(off, data),
            Region::MsixPba(off) => lock(&self.msix).read_pba(off, data),
            Region::Isr(_) | Region::Notify(_) | Region::Reserved => {}
        }
    }

    fn write_region(&mut self, region: Region, data: &[u8]) {
        match region {
            Region::Common(off) => self.common.write(off, data),
            Region::DeviceConfig(off) => {
                let end = self.device_config_len;
                if let Some(part) = in_bounds(off, data.len(), end).and_then(|n| data.get(..n)) {
                    lock(&self.device).write_config(off, part);
                    self.interrupt.note_config_change();
                }
            }
            // Any width: the value (queue index or notification data) adds
            // nothing, the address names the queue.
            Region::Notify(off) => self.common.notify(off / u64::from(NOTIFY_OFF_MULTIPLIER)),
            Region::MsixTable(off) => lock(&self.msix).write_table(off, data),
            Region::MsixPba(off) => lock(&self.msix).write_pba(off, data),
            Region::Isr(_) | Region::Reserved => {
                debug!("virtio-pci: ignoring write to read-only BAR region {region:?}")
            }
        }
    }

    /// Fields of the PCI configuration access capability.
    fn cfg_window(&self) -> Option<(u64, usize)> {
        let mut bar = [0u8];
        self.config.read_bytes(self.cfg_cap + CAP_BAR, &mut bar);
        let mut word = [0u8; 4];
        self.config.read_bytes(self.cfg_cap + CAP_OFFSET, &mut word);
        let offset = u64::from(u32::from_le_bytes(word));
        self.config.read_bytes(self.cfg_cap + CAP_LENGTH, &mut word);
        let length = u32::from_le_bytes(word);
        let len = match length {
            1 | 2 | 4 => length as usize,
            _ => return None,
        };
        let fits = offset + len as u64 <= VIRTIO_PCI_BAR_SIZE;
        (bar[0] == 0 && fits).then_some((offset, len))
    }

    /// A guest read of `pci_cfg_data`: fetch from the BAR first.
    fn cfg_window_read(&mut self) {
        let Some((offset, len)) = self.cfg_window() else {
            debug!("virtio-pci: PCI cfg capability read with an invalid window");
            return;
        };
        let mut buf = [0u8; 4];
        self.bar_read(offset, &mut buf[..len]);
        self.config
            .write_bytes(self.cfg_cap + CAP_EXTRA, &buf[..len]);
    }

    /// A guest write of `pci_cfg_data`: store into the BAR.
    fn cfg_window_write(&mut self) {
        let Some((offset, len)) = self.cfg_window() else {
            debug!("virtio-pci: PCI cfg capability write with an invalid window");
            return;
        };
        let mut buf = [0u8; 4];
        self.config.read_bytes(self.cfg_cap + CAP_EXTRA, &mut buf);
        self.bar_write(offset, &buf[..len]);
    }

    /// Brings MSI-X and INTx state up to date after a configuration write.
    fn sync_interrupt_controls(&mut self) {
        let ctl = self.config.read_u16(self.msix_cap + MSIX_MSG_CTL);
        let msix_enabled = {
            let mut msix = lock(&self.msix);
            msix.set_message_control(ctl);
            msix.enabled()
        };
        self.interrupt
            .set_intx_blocked(self.config.intx_disabled(), msix_enabled);
    }
}

/// How many bytes of an access of `len` at `offset` lie below `end`, if any.
fn in_bounds(offset: u64, len: usize, end: u64) -> Option<usize> {
    let available = end.checked_sub(offset).filter(|n| *n > 0)?;
    Some(len.min(usize::try_from(available).unwrap_or(usize::MAX)))
}

/// Whether `[start, start + len)` and `[other, other + other_len)` overlap.
fn overlaps(start: usize, len: usize, other: usize, other_len: usize) -> bool {
    start < other + other_len && other < start + len
}

impl PciDevice for VirtioPciDevice {
    fn read_config_register(&mut self, reg_idx: usize) -> u32 {
        if reg_idx == (self.cfg_cap + CAP_EXTRA) / 4 {
            self.cfg_window_read();
        }
        if reg_idx == COMMAND_REG {
            self.config
                .set_interrupt_status(self.interrupt.intx_pending());
        }
        self.config.read_reg(reg_idx)
    }

    fn write_config_register(
        &mut self,
        reg_idx: usize,
        offset: u64,
        data: &[u8],
    ) -> Vec<BarReprogrammingParams> {
        // The root never splits accesses across dwords; anything else is
        // dropped here rather than trusted to every layer below.
        let in_dword = usize::try_from(offset)
            .ok()
            .filter(|o| data.len() <= 4 && *o <= 4 - data.len());
        let Some(start) = in_dword.and_then(|o| reg_idx.checked_mul(4)?.checked_add(o)) else {
            debug!("virtio-pci: ignoring config write at register {reg_idx} offset {offset}");
            return Vec::new();
        };
        let moves = self.config.write_reg(reg_idx, offset, data);
        if reg_idx == COMMAND_REG || overlaps(start, data.len(), self.msix_cap + MSIX_MSG_CTL, 2) {
            self.sync_interrupt_controls();
        }
        if overlaps(start, data.len(), self.cfg_cap + CAP_EXTRA, 4) {
            self.cfg_window_write();
        }
        moves
    }

    fn restore_bar(&mut self, params: &BarReprogrammingParams) {
        self.config.restore_bar(params);
    }

    fn read_bar(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data);
    }

    fn write_bar(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.bar_write(offset, data);
    }

    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// BAR 0 on the VMM's MMIO bus, inserted at the BAR address with length
/// [`VIRTIO_PCI_BAR_SIZE`].
impl BusDevice for VirtioPciDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        self.bar_read(offset, data);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        self.bar_write(offset, data);
    }
}
