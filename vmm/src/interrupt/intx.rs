//! Level-triggered INTx lines on IOAPIC pins, through resampling irqfds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, EventSubscriber, Events};
use log::{error, warn};
use pci::{InterruptError, IntxInterrupt};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{IrqBackend, IrqError, IOAPIC_PINS};

/// One PCI INTx line, wired to an IOAPIC pin.
///
/// KVM's resampling irqfd gives level semantics: a write to the irqfd
/// raises the line, which stays up until the guest EOIs the interrupt; KVM
/// then lowers it and signals the resample eventfd. The device's level is
/// kept here (`pending`): on resample, a line whose device still has the
/// interrupt pending (the driver has not read the ISR yet) is raised again.
/// Several lines may share a pin (the PCI swizzle folds 32 slots onto 4
/// pins); KVM ORs them and signals every resampler of the pin on EOI.
///
/// Someone must call [`handle_resample`](Self::handle_resample) when the
/// resample eventfd becomes readable: the type is an
/// [`EventSubscriber`] for the VMM's event loop thread.
pub struct KvmIntx {
    backend: Arc<dyn IrqBackend>,
    gsi: u32,
    irqfd: EventFd,
    resample: EventFd,
    pending: AtomicBool,
}

impl KvmIntx {
    /// Connects a line to IOAPIC pin `gsi` and leaves it deasserted.
    pub fn new(backend: Arc<dyn IrqBackend>, gsi: u32) -> Result<Self, IrqError> {
        if gsi >= IOAPIC_PINS {
            return Err(IrqError::NotAnIoapicPin(gsi));
        }
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
        let resample = EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?;
        backend
            .register_irqfd_with_resample(&irqfd, &resample, gsi)
            .map_err(|source| IrqError::Irqfd {
                op: "register",
                gsi,
                source,
            })?;
        Ok(KvmIntx {
            backend,
            gsi,
            irqfd,
            resample,
            pending: AtomicBool::new(false),
        })
    }

    /// The IOAPIC pin (GSI) of the line.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Whether the device has the interrupt asserted.
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// The eventfd KVM signals when the guest EOIs the line.
    pub fn resample_fd(&self) -> &EventFd {
        &self.resample
    }

    /// The guest EOIed the line and KVM lowered it: raise it again if the
    /// device still has the interrupt pending.
    pub fn handle_resample(&self) -> Result<(), InterruptError> {
        // Drain first: a resample that arrives after the check below must
        // leave the eventfd readable for the next round.
        if let Err(e) = self.resample.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                warn!(
                    "INTx GSI {}: failed to read the resample eventfd: {e}",
                    self.gsi
                );
            }
        }
        if self.is_pending() {
            self.raise()?;
        }
        Ok(())
    }

    fn raise(&self) -> Result<(), InterruptError> {
        self.irqfd
            .write(1)
            .map_err(|source| InterruptError::Trigger { vector: 0, source })
    }
}

impl std::fmt::Debug for KvmIntx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmIntx")
            .field("gsi", &self.gsi)
            .field("pending", &self.is_pending())
            .finish_non_exhaustive()
    }
}

impl IntxInterrupt for KvmIntx {
    fn assert(&self) -> Result<(), InterruptError> {
        self.pending.store(true, Ordering::SeqCst);
        self.raise()
    }

    fn deassert(&self) -> Result<(), InterruptError> {
        // KVM keeps the line up until the EOI; the resample that follows
        // sees `pending` clear and leaves it down.
        self.pending.store(false, Ordering::SeqCst);
        Ok(())
    }
}

impl EventSubscriber for KvmIntx {
    fn process(&self, events: Events, _ops: &mut EventOps) {
        if events.event_set().contains(EventSet::IN) {
            if let Err(e) = self.handle_resample() {
                error!("INTx GSI {}: {e}", self.gsi);
            }
        }
    }

    fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.resample, EventSet::IN)) {
            error!(
                "INTx GSI {}: cannot watch the resample eventfd, the line may stall: {e}",
                self.gsi
            );
        }
    }
}

impl Drop for KvmIntx {
    fn drop(&mut self) {
        if let Err(e) = self.backend.unregister_irqfd(&self.irqfd, self.gsi) {
            warn!(
                "failed to unregister the INTx irqfd of GSI {}: {e}",
                self.gsi
            );
        }
    }
}
