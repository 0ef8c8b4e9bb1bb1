//! Interrupt delivery for the transport: the ISR status register, the
//! MSI-X vector of each queue and of configuration changes, and the INTx
//! line used while MSI-X is disabled (virtio 1.2 §4.1.4.5, §4.1.5.3).
//!
//! This is shared between the BAR emulation (vCPU threads, under the PCI
//! device's lock) and the device's worker thread, so it never takes the PCI
//! device's lock: a worker blocked on it while the vCPU resets the device
//! (and joins the worker) would deadlock. Lock order: MSI-X, then the line.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use pci::{IntxInterrupt, MsixConfig};

use super::VIRTIO_MSI_NO_VECTOR;
use crate::{VirtioInterrupt, VirtioInterruptType};

/// ISR bit: a queue has used buffers.
pub const ISR_QUEUE: u8 = 0x1;
/// ISR bit: the device configuration changed.
pub const ISR_CONFIG_CHANGED: u8 = 0x2;

pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere must not turn every later guest access into one.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The INTx side, under one lock so that an ISR read racing a trigger can
/// never leave the line low with a bit pending.
#[derive(Debug, Default)]
struct Line {
    isr: u8,
    asserted: bool,
    /// The command register's interrupt disable bit.
    intx_disabled: bool,
    /// INTx is not used while MSI-X is enabled.
    msix_enabled: bool,
}

/// The transport's [`VirtioInterrupt`]: handed to the device at activation.
pub struct VirtioPciInterrupt {
    msix: Arc<Mutex<MsixConfig>>,
    intx: Option<Arc<dyn IntxInterrupt>>,
    config_vector: AtomicU16,
    queue_vectors: Box<[AtomicU16]>,
    line: Mutex<Line>,
    /// Bumped on every configuration change interrupt; folded into
    /// `config_generation`.
    config_changes: AtomicU8,
    /// Set by the device's worker ([`VirtioInterrupt::set_needs_reset`]);
    /// reads as DEVICE_NEEDS_RESET in device_status until the reset.
    needs_reset: AtomicBool,
}

impl VirtioPciInterrupt {
    /// Interrupts for `queues` queues, delivered through `msix` or `intx`.
    pub(crate) fn new(
        msix: Arc<Mutex<MsixConfig>>,
        intx: Option<Arc<dyn IntxInterrupt>>,
        queues: usize,
    ) -> Self {
        VirtioPciInterrupt {
            msix,
            intx,
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
            line: Mutex::new(Line::default()),
            config_changes: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// The MSI-X vector for configuration changes.
    pub fn config_vector(&self) -> u16 {
        self.config_vector.load(Ordering::Acquire)
    }

    /// The MSI-X vector of queue `index` (NO_VECTOR for unknown queues).
    pub fn queue_vector(&self, index: u16) -> u16 {
        self.queue_vectors
            .get(usize::from(index))
            .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
    }

    pub(crate) fn set_config_vector(&self, vector: u16) {
        self.config_vector.store(vector, Ordering::Release);
    }

    pub(crate) fn set_queue_vector(&self, index: u16, vector: u16) {
        if let Some(v) = self.queue_vectors.get(usize::from(index)) {
            v.store(vector, Ordering::Release);
        }
    }

    /// How many configuration change interrupts were raised (wrapping).
    pub(crate) fn config_changes(&self) -> u8 {
        self.config_changes.load(Ordering::Acquire)
    }

    /// Counts a configuration change that raises no interrupt (a driver
    /// write to device configuration).
    pub(crate) fn note_config_change(&self) {
        self.config_changes.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the device asked for a reset since the last one.
    pub(crate) fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The ISR status without side effects.
    pub fn isr(&self) -> u8 {
        lock(&self.line).isr
    }

    /// Whether the INTx line is asserted.
    pub fn intx_asserted(&self) -> bool {
        lock(&self.line).asserted
    }

    /// The PCI status register's interrupt status bit: the OR of the ISR
    /// bits while MSI-X is disabled.
    pub(crate) fn intx_pending(&self) -> bool {
        let line = lock(&self.line);
        line.isr != 0 && !line.msix_enabled
    }

    /// Guest read of the ISR: returns and clears it, lowering INTx.
    pub(crate) fn read_isr(&self) -> u8 {
        let mut line = lock(&self.line);
        let isr = std::mem::take(&mut line.isr);
        self.update_line(&mut line);
        isr
    }

    /// The guest changed the command register or the MSI-X enable bit.
    pub(crate) fn set_intx_blocked(&self, intx_disabled: bool, msix_enabled: bool) {
        let mut line = lock(&self.line);
        line.intx_disabled = intx_disabled;
        line.msix_enabled = msix_enabled;
        self.update_line(&mut line);
    }

    /// Device reset: no vectors, ISR clear, line low, no reset needed.
    /// Called once the device's worker has stopped, so nothing sets
    /// `needs_reset` again behind it.
    pub(crate) fn reset(&self) {
        self.needs_reset.store(false, Ordering::Release);
        self.set_config_vector(VIRTIO_MSI_NO_VECTOR);
        for v in self.queue_vectors.iter() {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
        let mut line = lock(&self.line);
        line.isr = 0;
        self.update_line(&mut line);
    }

    /// Drives the line to match the ISR, the disable bit and MSI-X.
    fn update_line(&self, line: &mut Line) {
        let want = line.isr != 0 && !line.intx_disabled && !line.msix_enabled;
        if want == line.asserted {
            return;
        }
        let Some(intx) = &self.intx else {
            return;
        };
        let result = if want { intx.assert() } else { intx.deassert() };
        match result {
            Ok(()) => line.asserted = want,
            Err(e) => log::error!("virtio-pci: cannot drive INTx: {e}"),
        }
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, int_type: VirtioInterruptType) -> io::Result<()> {
        let (bit, vector) = match int_type {
            VirtioInterruptType::Config => {
                self.config_changes.fetch_add(1, Ordering::AcqRel);
                (ISR_CONFIG_CHANGED, self.config_vector())
            }
            VirtioInterruptType::Queue(index) => {
                if usize::from(index) >= self.queue_vectors.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("no queue {index}"),
                    ));
                }
                (ISR_QUEUE, self.queue_vector(index))
            }
        };
        // Held across the ISR update so MSI-X cannot be switched on or off
        // between choosing the path and taking it.
        let mut msix = lock(&self.msix);
        let mut line = lock(&self.line);
        // Set even when MSI-X delivers the interrupt: a driver polling the
        // ISR still sees it, and it costs nothing.
        line.isr |= bit;
        if msix.enabled() {
            drop(line);
            if vector == VIRTIO_MSI_NO_VECTOR {
                return Ok(());
            }
            return msix.trigger(vector).map_err(io::Error::other);
        }
        drop(msix);
        self.update_line(&mut line);
        Ok(())
    }

    fn set_needs_reset(&self) {
        // One configuration interrupt per reset, however often it is asked.
        if !self.needs_reset.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.trigger(VirtioInterruptType::Config) {
                log::warn!("virtio-pci: cannot raise the configuration interrupt: {e}");
            }
        }
    }
}
