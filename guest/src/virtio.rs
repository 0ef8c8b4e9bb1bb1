//! Finding virtio-pci functions and wiring their queues to MSI-X vectors.
//!
//! virtio-drivers' `PciTransport` has no MSI-X support, so `IrqTransport`
//! wraps it: when a queue is set up it first writes `queue_msix_vector` in the
//! common configuration (virtio 1.x, 4.1.4.3), as a Linux driver would, before
//! the queue is enabled. Queue `q` uses MSI-X table entry `q`, and table entry
//! `q` is programmed to deliver IDT vector `vectors[q]`.

use crate::hal::GuestHal;
use crate::interrupts::{FIRST_DEVICE_VECTOR, LAST_DEVICE_VECTOR};
use crate::pci::Pci;
use crate::serial::{Dec, Hex, HexN};
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use virtio_drivers::transport::pci::bus::DeviceFunction;
use virtio_drivers::transport::pci::{virtio_device_type, PciTransport, VirtioPciError};
use virtio_drivers::transport::{DeviceStatus, DeviceType, InterruptStatus, Transport};
use virtio_drivers::{PhysAddr, Result};

/// Common configuration offsets (virtio 1.x, 4.1.4.3).
const COMMON_MSIX_CONFIG: u64 = 0x10;
const COMMON_QUEUE_SELECT: u64 = 0x16;
const COMMON_QUEUE_MSIX_VECTOR: u64 = 0x1a;
/// "No vector" in `msix_config` / `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
/// Most queues we wire per device.
pub const MAX_QUEUES: usize = 4;

static NEXT_VECTOR: AtomicU8 = AtomicU8::new(FIRST_DEVICE_VECTOR);
/// IDT vectors whose `queue_msix_vector` write the device refused.
static REJECTED: [AtomicBool; 256] = [const { AtomicBool::new(false) }; 256];

/// Whether the device refused the MSI-X entry that maps to `vector`.
pub fn vector_rejected(vector: u8) -> bool {
    REJECTED[usize::from(vector)].load(Ordering::Relaxed)
}

/// Formats a bus/device/function as `bb:dd.f` (without core's padding).
pub struct Bdf(pub DeviceFunction);

impl fmt::Display for Bdf {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let df = self.0;
        write!(
            f,
            "{}:{}.{}",
            HexN(df.bus.into(), 2),
            HexN(df.device.into(), 2),
            Dec(df.function.into())
        )
    }
}

/// A virtio function on bus 0.
#[derive(Clone, Copy, Debug)]
pub struct Function {
    pub df: DeviceFunction,
    pub kind: DeviceType,
    pub device_id: u16,
}

/// Lists virtio functions on bus 0.
pub fn scan(pci: &Pci) -> ([Option<Function>; 32], usize) {
    let mut out = [None; 32];
    let mut n = 0;
    for (df, info) in pci.root.enumerate_bus(0) {
        crate::println!(
            "PCI {} vendor={} device={} class={}",
            Bdf(df),
            HexN(info.vendor_id.into(), 4),
            HexN(info.device_id.into(), 4),
            HexN((u64::from(info.class) << 8) | u64::from(info.subclass), 4)
        );
        if let Some(kind) = virtio_device_type(&info) {
            if n < out.len() {
                out[n] = Some(Function {
                    df,
                    kind,
                    device_id: info.device_id,
                });
                n += 1;
            }
        }
    }
    (out, n)
}

/// A `PciTransport` that also routes its queues to MSI-X vectors.
pub struct IrqTransport {
    inner: PciTransport,
    common: u64,
    /// IDT vector for queue q (MSI-X table entry q).
    vectors: [u8; MAX_QUEUES],
    queues: usize,
}

impl IrqTransport {
    /// IDT vector of `queue`.
    pub fn vector(&self, queue: usize) -> u8 {
        self.vectors[queue]
    }

    fn write16(&mut self, offset: u64, value: u16) {
        // SAFETY: `common` is the device's common configuration structure in
        // a BAR (found through its capability), mapped uncached; the offset
        // is a field inside it.
        unsafe { ((self.common + offset) as *mut u16).write_volatile(value) }
    }

    fn read16(&self, offset: u64) -> u16 {
        // SAFETY: as in `write16`.
        unsafe { ((self.common + offset) as *const u16).read_volatile() }
    }
}

/// Sets up PCI function `f` (BARs, MSI-X with one vector per queue for
/// `queues` queues) and returns its transport.
pub fn open(
    pci: &mut Pci,
    f: &Function,
    queues: usize,
    reassign_bars: bool,
    apic_id: u32,
) -> core::result::Result<IrqTransport, &'static str> {
    assert!(queues <= MAX_QUEUES);
    let assigned = pci
        .setup_function(f.df, reassign_bars)
        .map_err(|_| "bar-setup-failed")?;
    if let Ok(bars) = pci.root.bars(f.df) {
        for (i, bar) in bars.iter().enumerate() {
            if let Some((addr, size)) = bar.as_ref().and_then(|b| b.memory_address_size()) {
                crate::println!(
                    "INFO {} bar{}={} size={}{}",
                    Bdf(f.df),
                    Dec(i as u64),
                    Hex(addr),
                    Hex(size),
                    if assigned > 0 {
                        " (assigned by guest)"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    let mut vectors = [0u8; MAX_QUEUES];
    for v in vectors.iter_mut().take(queues) {
        let next = NEXT_VECTOR.fetch_add(1, Ordering::Relaxed);
        if next > LAST_DEVICE_VECTOR {
            return Err("out-of-vectors");
        }
        *v = next;
    }
    pci.enable_msix(f.df, &vectors[..queues], apic_id)
        .map_err(|_| "msix-setup-failed")?;
    let common = pci.virtio_common_cfg(f.df).ok_or("no-common-cfg")?;
    let inner = PciTransport::new::<GuestHal, _>(&mut pci.root, f.df).map_err(|e| match e {
        VirtioPciError::MissingCommonConfig => "no-common-cfg",
        VirtioPciError::MissingNotifyConfig => "no-notify-cfg",
        VirtioPciError::MissingIsrConfig => "no-isr-cfg",
        VirtioPciError::BarNotAllocated(_) => "bar-not-allocated",
        VirtioPciError::BarOffsetOutOfRange => "cap-outside-bar",
        VirtioPciError::UnexpectedIoBar => "io-bar",
        VirtioPciError::InvalidNotifyOffMultiplier(_) => "bad-notify-multiplier",
        _ => "transport-error",
    })?;
    Ok(IrqTransport {
        inner,
        common,
        vectors,
        queues,
    })
}

impl Transport for IrqTransport {
    fn device_type(&self) -> DeviceType {
        self.inner.device_type()
    }

    fn read_device_features(&mut self) -> u64 {
        self.inner.read_device_features()
    }

    fn write_driver_features(&mut self, driver_features: u64) {
        self.inner.write_driver_features(driver_features)
    }

    fn max_queue_size(&mut self, queue: u16) -> u32 {
        self.inner.max_queue_size(queue)
    }

    fn notify(&mut self, queue: u16) {
        self.inner.notify(queue)
    }

    fn get_status(&self) -> DeviceStatus {
        self.inner.get_status()
    }

    fn set_status(&mut self, status: DeviceStatus) {
        self.inner.set_status(status);
        if status == DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER {
            // No configuration-change interrupts; only queue interrupts.
            self.write16(COMMON_MSIX_CONFIG, NO_VECTOR);
        }
    }

    fn set_guest_page_size(&mut self, guest_page_size: u32) {
        self.inner.set_guest_page_size(guest_page_size)
    }

    fn requires_legacy_layout(&self) -> bool {
        self.inner.requires_legacy_layout()
    }

    fn queue_set(
        &mut self,
        queue: u16,
        size: u32,
        descriptors: PhysAddr,
        driver_area: PhysAddr,
        device_area: PhysAddr,
    ) {
        let q = usize::from(queue);
        let entry = if q < self.queues { queue } else { NO_VECTOR };
        self.write16(COMMON_QUEUE_SELECT, queue);
        self.write16(COMMON_QUEUE_MSIX_VECTOR, entry);
        if entry != NO_VECTOR && self.read16(COMMON_QUEUE_MSIX_VECTOR) != entry {
            REJECTED[usize::from(self.vectors[q])].store(true, Ordering::Relaxed);
        }
        self.inner
            .queue_set(queue, size, descriptors, driver_area, device_area)
    }

    fn queue_unset(&mut self, queue: u16) {
        self.inner.queue_unset(queue)
    }

    fn queue_used(&mut self, queue: u16) -> bool {
        self.inner.queue_used(queue)
    }

    fn ack_interrupt(&mut self) -> InterruptStatus {
        self.inner.ack_interrupt()
    }

    fn read_config_generation(&self) -> u32 {
        self.inner.read_config_generation()
    }

    fn read_config_space<T: zerocopy::FromBytes + zerocopy::IntoBytes>(
        &self,
        offset: usize,
    ) -> Result<T> {
        self.inner.read_config_space(offset)
    }

    fn write_config_space<T: zerocopy::IntoBytes + zerocopy::Immutable>(
        &mut self,
        offset: usize,
        value: T,
    ) -> Result<()> {
        self.inner.write_config_space(offset, value)
    }
}
