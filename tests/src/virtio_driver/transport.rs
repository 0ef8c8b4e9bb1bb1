//! The virtio-pci driver: finds the virtio structures through the vendor
//! capabilities, then initializes the device as virtio 1.2 §3.1.1 says:
//! reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (checked), queues,
//! DRIVER_OK.

use std::time::{Duration, Instant};

use ::pci::PciBdf;
use vm_memory::GuestMemoryMmap;

use super::machine::{ConfigAccess, ConfigMechanism, Machine};
use super::pci::{self as pcidev, COMMAND_BUS_MASTER, COMMAND_MEMORY};
use super::virtqueue::SplitQueue;
use super::DriverError;

/// Offsets in the common configuration structure.
pub mod common {
    /// Device feature window select (u32).
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// Device feature window (u32).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// Driver feature window select (u32).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// Driver feature window (u32).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// Configuration change MSI-X vector (u16).
    pub const MSIX_CONFIG: u64 = 0x10;
    /// Number of queues (u16).
    pub const NUM_QUEUES: u64 = 0x12;
    /// Device status (u8).
    pub const DEVICE_STATUS: u64 = 0x14;
    /// Configuration generation (u8).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// Queue select (u16).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// Queue size (u16).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// Queue MSI-X vector (u16).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// Queue enable (u16).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// Queue notification offset (u16).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
    /// Descriptor table address (u64).
    pub const QUEUE_DESC: u64 = 0x20;
    /// Driver area (available ring) address (u64).
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// Device area (used ring) address (u64).
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// Queue reset (u16), with VIRTIO_F_RING_RESET.
    pub const QUEUE_RESET: u64 = 0x3a;
}

/// Device status bits.
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u8 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device needs a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The driver gave up.
    pub const FAILED: u8 = 0x80;
}

/// Feature bits the driver knows about.
pub mod features {
    /// Indirect descriptors.
    pub const RING_INDIRECT_DESC: u64 = 1 << 28;
    /// used_event / avail_event.
    pub const RING_EVENT_IDX: u64 = 1 << 29;
    /// virtio 1.x.
    pub const VERSION_1: u64 = 1 << 32;
    /// IOMMU translation.
    pub const ACCESS_PLATFORM: u64 = 1 << 33;
    /// Per-queue reset.
    pub const RING_RESET: u64 = 1 << 40;
}

/// "No vector".
pub const NO_VECTOR: u16 = 0xffff;
/// Vendor-specific capability ID.
const CAP_VENDOR: u8 = 0x09;
/// MSI-X capability ID.
const CAP_MSIX: u8 = 0x11;
/// `cfg_type` values.
pub const CAP_COMMON: u8 = 1;
/// Notification structure.
pub const CAP_NOTIFY: u8 = 2;
/// ISR status.
pub const CAP_ISR: u8 = 3;
/// Device configuration.
pub const CAP_DEVICE: u8 = 4;
/// PCI configuration access.
pub const CAP_PCI_CFG: u8 = 5;

/// How a driver writes the 64-bit queue address fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrWidth {
    /// One 8-byte access.
    Qword,
    /// Low dword, then high dword.
    DwordHalves,
}

/// A virtio vendor capability as parsed from configuration space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioCap {
    /// Where it is in configuration space.
    pub cap_offset: u16,
    /// Structure type.
    pub cfg_type: u8,
    /// BAR holding the structure.
    pub bar: u8,
    /// Offset of the structure in the BAR.
    pub offset: u32,
    /// Length of the structure.
    pub length: u32,
    /// `notify_off_multiplier` for the notify capability.
    pub notify_off_multiplier: u32,
}

/// A probed virtio-pci function.
pub struct VirtioPciDriver<'m> {
    machine: &'m Machine,
    mechanism: ConfigMechanism,
    /// The function's address.
    pub bdf: PciBdf,
    /// Where BAR 0 was assigned.
    pub bar: u64,
    /// Size of BAR 0.
    pub bar_size: u64,
    /// Common configuration.
    pub common: VirtioCap,
    /// Notifications.
    pub notify: VirtioCap,
    /// ISR status.
    pub isr: VirtioCap,
    /// Device configuration, if any.
    pub device_cfg: Option<VirtioCap>,
    /// PCI configuration access.
    pub pci_cfg: VirtioCap,
    /// The MSI-X capability: (offset, table size, table offset, PBA offset).
    pub msix: Option<(u16, u16, u32, u32)>,
}

impl<'m> VirtioPciDriver<'m> {
    /// Probes `bdf`: checks the IDs, assigns BAR 0 at `bar_addr`, enables
    /// memory decoding and bus mastering, and finds the capabilities.
    pub fn probe(
        machine: &'m Machine,
        mechanism: ConfigMechanism,
        bdf: PciBdf,
        bar_addr: u64,
    ) -> Result<Self, DriverError> {
        let cfg = machine.config(mechanism);
        let vendor = cfg.read16(bdf, pcidev::VENDOR_ID);
        let device = cfg.read16(bdf, pcidev::DEVICE_ID);
        if vendor != 0x1af4 || !(0x1040..=0x107f).contains(&device) {
            return Err(DriverError::NotVirtio { vendor, device });
        }
        let info = pcidev::size_bar(&cfg, bdf, 0)?;
        if !info.is_64bit || info.size == 0 || bar_addr % info.size != 0 {
            return Err(DriverError::Bar(
                "BAR 0 must be 64-bit and naturally aligned",
            ));
        }
        pcidev::program_bar(&cfg, bdf, 0, &info, bar_addr);
        pcidev::set_command_bits(&cfg, bdf, COMMAND_MEMORY | COMMAND_BUS_MASTER);

        let mut found: [Option<VirtioCap>; 6] = [None; 6];
        let mut msix = None;
        for cap in pcidev::capabilities(&cfg, bdf)? {
            match cap.id {
                CAP_VENDOR => {
                    let v = read_virtio_cap(&cfg, bdf, cap.offset)?;
                    if v.bar != 0 || u64::from(v.offset) + u64::from(v.length) > info.size {
                        return Err(DriverError::Capability("structure outside BAR 0"));
                    }
                    if let Some(slot) = found.get_mut(usize::from(v.cfg_type)) {
                        // The first capability of each type is the preferred one.
                        slot.get_or_insert(v);
                    }
                }
                CAP_MSIX => {
                    let ctl = cfg.read16(bdf, cap.offset + 2);
                    let table = cfg.read32(bdf, cap.offset + 4);
                    let pba = cfg.read32(bdf, cap.offset + 8);
                    if table & 7 != 0 || pba & 7 != 0 {
                        return Err(DriverError::Capability("MSI-X structures not in BAR 0"));
                    }
                    msix = Some((cap.offset, (ctl & 0x7ff) + 1, table, pba));
                }
                _ => {}
            }
        }
        let need = |t: u8| found[usize::from(t)].ok_or(DriverError::MissingCapability(t));
        Ok(VirtioPciDriver {
            machine,
            mechanism,
            bdf,
            bar: bar_addr,
            bar_size: info.size,
            common: need(CAP_COMMON)?,
            notify: need(CAP_NOTIFY)?,
            isr: need(CAP_ISR)?,
            device_cfg: found[usize::from(CAP_DEVICE)],
            pci_cfg: need(CAP_PCI_CFG)?,
            msix,
        })
    }

    /// Configuration space of the function.
    pub fn cfg(&self) -> ConfigAccess<'m> {
        self.machine.config(self.mechanism)
    }

    /// Moves BAR 0 to `addr` (decoding stays on, so the move is immediate).
    pub fn move_bar(&mut self, addr: u64) {
        let cfg = self.cfg();
        let info = pcidev::BarInfo {
            size: self.bar_size,
            is_64bit: true,
            prefetchable: false,
        };
        pcidev::program_bar(&cfg, self.bdf, 0, &info, addr);
        self.bar = pcidev::bar_address(&cfg, self.bdf, 0);
    }

    fn read_bar(&self, offset: u64, len: usize) -> u64 {
        let addr = self.bar + offset;
        let mut bytes = [0u8; 8];
        match len {
            1 => bytes[..1].copy_from_slice(&self.machine.mmio_read::<1>(addr)),
            2 => bytes[..2].copy_from_slice(&self.machine.mmio_read::<2>(addr)),
            4 => bytes[..4].copy_from_slice(&self.machine.mmio_read::<4>(addr)),
            _ => bytes = self.machine.mmio_read::<8>(addr),
        }
        u64::from_le_bytes(bytes)
    }

    fn write_bar(&self, offset: u64, len: usize, value: u64) {
        self.machine
            .mmio_write(self.bar + offset, &value.to_le_bytes()[..len]);
    }

    /// Reads a common configuration field of `len` bytes.
    pub fn read_common(&self, field: u64, len: usize) -> u64 {
        self.read_bar(u64::from(self.common.offset) + field, len)
    }

    /// Writes a common configuration field of `len` bytes.
    pub fn write_common(&self, field: u64, len: usize, value: u64) {
        self.write_bar(u64::from(self.common.offset) + field, len, value);
    }

    /// The device status.
    pub fn status(&self) -> u8 {
        self.read_common(common::DEVICE_STATUS, 1) as u8
    }

    /// Writes the device status.
    pub fn set_status(&self, value: u8) {
        self.write_common(common::DEVICE_STATUS, 1, value.into());
    }

    /// Adds `bits` to the status, as drivers do (read, or, write).
    pub fn add_status(&self, bits: u8) {
        self.set_status(self.status() | bits);
    }

    /// Writes 0 and waits until the device reads back 0.
    pub fn reset(&self) -> Result<(), DriverError> {
        self.set_status(0);
        let deadline = Instant::now() + Duration::from_secs(1);
        while self.status() != 0 {
            if Instant::now() > deadline {
                return Err(DriverError::ResetTimeout);
            }
            std::thread::yield_now();
        }
        Ok(())
    }

    /// The device's features, both windows.
    pub fn device_features(&self) -> u64 {
        self.write_common(common::DEVICE_FEATURE_SELECT, 4, 0);
        let low = self.read_common(common::DEVICE_FEATURE, 4);
        self.write_common(common::DEVICE_FEATURE_SELECT, 4, 1);
        let high = self.read_common(common::DEVICE_FEATURE, 4);
        high << 32 | low
    }

    /// Writes the driver features, both windows.
    pub fn write_driver_features(&self, value: u64) {
        self.write_common(common::DRIVER_FEATURE_SELECT, 4, 0);
        self.write_common(common::DRIVER_FEATURE, 4, value & 0xffff_ffff);
        self.write_common(common::DRIVER_FEATURE_SELECT, 4, 1);
        self.write_common(common::DRIVER_FEATURE, 4, value >> 32);
    }

    /// Reset, ACKNOWLEDGE, DRIVER, then accepts `wanted & offered` and sets
    /// FEATURES_OK, checking that it stuck. Returns the accepted features.
    pub fn negotiate(&self, wanted: u64) -> Result<u64, DriverError> {
        self.reset()?;
        self.add_status(status::ACKNOWLEDGE);
        self.add_status(status::DRIVER);
        let accepted = self.device_features() & wanted;
        self.accept_features(accepted)?;
        Ok(accepted)
    }

    /// Writes exactly `features` and sets FEATURES_OK, which the device
    /// may refuse.
    pub fn accept_features(&self, features: u64) -> Result<(), DriverError> {
        self.write_driver_features(features);
        self.add_status(status::FEATURES_OK);
        if self.status() & status::FEATURES_OK == 0 {
            return Err(DriverError::FeaturesRefused(features));
        }
        Ok(())
    }

    /// num_queues.
    pub fn num_queues(&self) -> u16 {
        self.read_common(common::NUM_QUEUES, 2) as u16
    }

    /// Selects queue `index`.
    pub fn select_queue(&self, index: u16) {
        self.write_common(common::QUEUE_SELECT, 2, index.into());
    }

    /// The size queue `index` offers (its maximum until changed).
    pub fn queue_size(&self, index: u16) -> u16 {
        self.select_queue(index);
        self.read_common(common::QUEUE_SIZE, 2) as u16
    }

    fn write_addr(&self, field: u64, value: u64, width: AddrWidth) {
        match width {
            AddrWidth::Qword => self.write_common(field, 8, value),
            AddrWidth::DwordHalves => {
                self.write_common(field, 4, value & 0xffff_ffff);
                self.write_common(field + 4, 4, value >> 32);
            }
        }
    }

    /// Sets up and enables queue `index` with `size` entries laid out at
    /// `base` in `mem`, writing the addresses with `width` and routing it
    /// to MSI-X `vector` (if given, checked by reading it back).
    #[allow(clippy::too_many_arguments)]
    pub fn setup_queue(
        &self,
        mem: &GuestMemoryMmap,
        index: u16,
        size: u16,
        base: u64,
        width: AddrWidth,
        vector: Option<u16>,
        event_idx: bool,
    ) -> Result<SplitQueue, DriverError> {
        let max = self.queue_size(index);
        if max == 0 {
            return Err(DriverError::QueueUnavailable(index));
        }
        if size > max {
            return Err(DriverError::QueueTooLarge { index, size, max });
        }
        let queue = SplitQueue::new(mem, index, size, base, event_idx)?;
        self.write_common(common::QUEUE_SIZE, 2, size.into());
        self.write_addr(common::QUEUE_DESC, queue.desc, width);
        self.write_addr(common::QUEUE_DRIVER, queue.avail, width);
        self.write_addr(common::QUEUE_DEVICE, queue.used, width);
        if let Some(vector) = vector {
            self.set_queue_vector(vector)?;
        }
        self.write_common(common::QUEUE_ENABLE, 2, 1);
        if self.read_common(common::QUEUE_ENABLE, 2) != 1 {
            return Err(DriverError::QueueNotEnabled(index));
        }
        Ok(queue)
    }

    /// Routes the selected queue to `vector`, checking the read-back.
    pub fn set_queue_vector(&self, vector: u16) -> Result<(), DriverError> {
        self.write_common(common::QUEUE_MSIX_VECTOR, 2, vector.into());
        let got = self.read_common(common::QUEUE_MSIX_VECTOR, 2) as u16;
        if got != vector {
            return Err(DriverError::VectorRefused {
                wanted: vector,
                got,
            });
        }
        Ok(())
    }

    /// Routes configuration changes to `vector`, checking the read-back.
    pub fn set_config_vector(&self, vector: u16) -> Result<(), DriverError> {
        self.write_common(common::MSIX_CONFIG, 2, vector.into());
        let got = self.read_common(common::MSIX_CONFIG, 2) as u16;
        if got != vector {
            return Err(DriverError::VectorRefused {
                wanted: vector,
                got,
            });
        }
        Ok(())
    }

    /// Sets DRIVER_OK.
    pub fn driver_ok(&self) {
        self.add_status(status::DRIVER_OK);
    }

    /// Guest address of queue `index`'s notification register.
    pub fn notify_address(&self, index: u16) -> u64 {
        self.select_queue(index);
        let off = self.read_common(common::QUEUE_NOTIFY_OFF, 2);
        self.bar
            + u64::from(self.notify.offset)
            + off * u64::from(self.notify.notify_off_multiplier)
    }

    /// Notifies queue `index` with a 16-bit write of its index.
    pub fn notify(&self, index: u16) {
        let addr = self.notify_address(index);
        self.machine.mmio_write(addr, &index.to_le_bytes());
    }

    /// Reads (and so clears) the ISR status.
    pub fn read_isr(&self) -> u8 {
        self.read_bar(u64::from(self.isr.offset), 1) as u8
    }

    /// Enables MSI-X with entry `i` sending `messages[i]` (address, data):
    /// function masked while the table is written, then unmasked.
    pub fn enable_msix(&self, messages: &[(u64, u32)]) -> Result<(), DriverError> {
        let (cap, size, table, _) = self
            .msix
            .ok_or(DriverError::Capability("no MSI-X capability"))?;
        if messages.len() > usize::from(size) {
            return Err(DriverError::Capability("MSI-X table too small"));
        }
        let cfg = self.cfg();
        cfg.write16(self.bdf, cap + 2, 0xc000);
        for (i, (address, data)) in (0u64..).zip(messages.iter()) {
            let entry = u64::from(table) + 16 * i;
            self.write_bar(entry, 4, address & 0xffff_ffff);
            self.write_bar(entry + 4, 4, address >> 32);
            self.write_bar(entry + 8, 4, (*data).into());
            self.write_bar(entry + 12, 4, 0);
        }
        cfg.write16(self.bdf, cap + 2, 0x8000);
        Ok(())
    }

    /// Disables MSI-X.
    pub fn disable_msix(&self) {
        if let Some((cap, ..)) = self.msix {
            self.cfg().write16(self.bdf, cap + 2, 0);
        }
    }

    /// config_generation.
    pub fn config_generation(&self) -> u8 {
        self.read_common(common::CONFIG_GENERATION, 1) as u8
    }

    /// Reads device configuration into `buf` from `offset`, in naturally
    /// aligned 4-, 2- and 1-byte accesses, repeating until
    /// config_generation is the same before and after.
    pub fn read_config(&self, offset: u32, buf: &mut [u8]) -> Result<(), DriverError> {
        let cap = self
            .device_cfg
            .ok_or(DriverError::MissingCapability(CAP_DEVICE))?;
        if u64::from(offset) + buf.len() as u64 > u64::from(cap.length) {
            return Err(DriverError::Capability("read past device configuration"));
        }
        for _ in 0..100 {
            let before = self.config_generation();
            let mut done = 0usize;
            while done < buf.len() {
                let at = u64::from(cap.offset) + u64::from(offset) + done as u64;
                let left = buf.len() - done;
                let width = if at % 4 == 0 && left >= 4 {
                    4
                } else if at % 2 == 0 && left >= 2 {
                    2
                } else {
                    1
                };
                let value = self.read_bar(at, width).to_le_bytes();
                buf[done..done + width].copy_from_slice(&value[..width]);
                done += width;
            }
            if self.config_generation() == before {
                return Ok(());
            }
        }
        Err(DriverError::ConfigUnstable)
    }

    /// Writes device configuration at `offset` with one access.
    pub fn write_config(&self, offset: u32, data: &[u8]) -> Result<(), DriverError> {
        let cap = self
            .device_cfg
            .ok_or(DriverError::MissingCapability(CAP_DEVICE))?;
        self.machine
            .mmio_write(self.bar + u64::from(cap.offset) + u64::from(offset), data);
        Ok(())
    }

    fn set_cfg_window(&self, bar_offset: u32, len: u8) {
        let cfg = self.cfg();
        let cap = self.pci_cfg.cap_offset;
        cfg.write8(self.bdf, cap + 4, 0);
        cfg.write32(self.bdf, cap + 8, bar_offset);
        cfg.write32(self.bdf, cap + 12, len.into());
    }

    /// Reads `len` (1, 2 or 4) bytes of BAR 0 at `bar_offset` through the
    /// PCI configuration access capability.
    pub fn cfg_window_read(&self, bar_offset: u32, len: u8) -> u32 {
        self.set_cfg_window(bar_offset, len);
        let cfg = self.cfg();
        let data = self.pci_cfg.cap_offset + 16;
        match len {
            1 => cfg.read8(self.bdf, data).into(),
            2 => cfg.read16(self.bdf, data).into(),
            _ => cfg.read32(self.bdf, data),
        }
    }

    /// Writes `len` (1, 2 or 4) bytes of BAR 0 at `bar_offset` through the
    /// PCI configuration access capability.
    pub fn cfg_window_write(&self, bar_offset: u32, len: u8, value: u32) {
        self.set_cfg_window(bar_offset, len);
        let cfg = self.cfg();
        let data = self.pci_cfg.cap_offset + 16;
        match len {
            1 => cfg.write8(self.bdf, data, value as u8),
            2 => cfg.write16(self.bdf, data, value as u16),
            _ => cfg.write32(self.bdf, data, value),
        }
    }
}

fn read_virtio_cap(cfg: &ConfigAccess, bdf: PciBdf, at: u16) -> Result<VirtioCap, DriverError> {
    let cap_len = cfg.read8(bdf, at + 2);
    if cap_len < 16 {
        return Err(DriverError::Capability(
            "virtio capability shorter than 16 bytes",
        ));
    }
    let cfg_type = cfg.read8(bdf, at + 3);
    let notify_off_multiplier = if cfg_type == CAP_NOTIFY {
        if cap_len < 20 {
            return Err(DriverError::Capability("notify capability too short"));
        }
        cfg.read32(bdf, at + 16)
    } else {
        0
    };
    Ok(VirtioCap {
        cap_offset: at,
        cfg_type,
        bar: cfg.read8(bdf, at + 4),
        offset: cfg.read32(bdf, at + 8),
        length: cfg.read32(bdf, at + 12),
        notify_off_multiplier,
    })
}
