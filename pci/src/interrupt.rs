//! The seam between PCI interrupt emulation and whatever delivers
//! interrupts: KVM irqfds and GSI routes in the VMM, a recorder in tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// An MSI message as the guest programmed it into an MSI capability or an
/// MSI-X table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// Full 64-bit message address (upper half zero for 32-bit MSI).
    pub address: u64,
    /// Message data.
    pub data: u32,
}

/// Errors from delivering or routing an interrupt.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// The vector index is not part of the group.
    #[error("interrupt vector {0} is out of range")]
    InvalidVector(u16),
    /// Signalling the interrupt failed.
    #[error("failed to signal interrupt vector {vector}: {source}")]
    Trigger {
        /// The vector that was being raised.
        vector: u16,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
    /// Installing or changing the route for a vector failed.
    #[error("failed to update the route of interrupt vector {vector}: {source}")]
    Route {
        /// The vector whose route was being changed.
        vector: u16,
        /// The underlying failure.
        #[source]
        source: std::io::Error,
    },
}

/// A new state for one vector, as [`MsiInterruptGroup::update_batch`]
/// takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VectorUpdate {
    /// Vector index in the group.
    pub index: u16,
    /// The message the guest programmed.
    pub msg: MsiMessage,
    /// Whether the vector is masked (vector or function mask, or disabled).
    pub masked: bool,
}

/// The message-signalled vectors of one device function (its MSI or MSI-X
/// vectors), as seen by the emulation that owns the guest-visible state.
///
/// Masking and pending bits are the emulation's business: `trigger` is only
/// called for a vector the guest has enabled and unmasked. `update` is called
/// whenever a vector's message or effective mask changes, so the delivery side
/// can install, change or remove a route (for KVM: a GSI route plus an irqfd).
pub trait MsiInterruptGroup: Send + Sync {
    /// Delivers vector `index` to the guest now.
    fn trigger(&self, index: u16) -> Result<(), InterruptError>;

    /// The guest changed vector `index`: its message is now `msg` and it is
    /// `masked` (vector mask, function mask or capability disabled).
    fn update(&self, index: u16, msg: MsiMessage, masked: bool) -> Result<(), InterruptError>;

    /// Several vectors changed at once (MSI-X enable or function mask, MSI
    /// enable, reset). A delivery side whose route changes are costly (KVM
    /// replaces its whole routing table per change) applies them together;
    /// the default goes vector by vector and stops at the first failure.
    fn update_batch(&self, updates: &[VectorUpdate]) -> Result<(), InterruptError> {
        updates
            .iter()
            .try_for_each(|u| self.update(u.index, u.msg, u.masked))
    }

    /// An eventfd that raises vector `index` when written, if the delivery
    /// side has one (an irqfd); lets producers such as VFIO bypass the VMM.
    fn notifier(&self, _index: u16) -> Option<&EventFd> {
        None
    }
}

/// What a group was last told about each of its vectors (message, masked),
/// `None` where telling it failed, so that only changes reach it and a
/// failed change is retried on the next sync.
#[derive(Clone, Debug)]
pub(crate) struct ToldRoutes(Vec<Option<(MsiMessage, bool)>>);

impl ToldRoutes {
    /// `vectors` vectors in the state a group starts in: masked, with a
    /// zero message.
    pub(crate) fn new(vectors: usize) -> Self {
        ToldRoutes(vec![Some((MsiMessage::default(), true)); vectors])
    }

    /// Tells `group`, in one batch, about every vector of `wanted` whose
    /// state differs from what it was last told; `what` names the vectors
    /// in the error log line.
    pub(crate) fn sync(
        &mut self,
        group: &dyn MsiInterruptGroup,
        wanted: impl IntoIterator<Item = VectorUpdate>,
        what: &dyn std::fmt::Display,
    ) {
        let updates: Vec<VectorUpdate> = wanted
            .into_iter()
            .filter(|u| {
                self.0
                    .get(usize::from(u.index))
                    .is_some_and(|told| *told != Some((u.msg, u.masked)))
            })
            .collect();
        if updates.is_empty() {
            return;
        }
        let ok = match group.update_batch(&updates) {
            Ok(()) => true,
            Err(e) => {
                log::error!("failed to update {what}: {e}");
                false
            }
        };
        for u in &updates {
            if let Some(told) = self.0.get_mut(usize::from(u.index)) {
                *told = ok.then_some((u.msg, u.masked));
            }
        }
    }
}

/// A level-triggered INTx line (an IOAPIC pin), for functions whose driver
/// does not enable MSI or MSI-X.
pub trait IntxInterrupt: Send + Sync {
    /// Raises the line; it stays raised until `deassert`.
    fn assert(&self) -> Result<(), InterruptError>;
    /// Lowers the line.
    fn deassert(&self) -> Result<(), InterruptError>;
}

/// One call made on a [`RecordingInterruptGroup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptEvent {
    /// `trigger(index)` was called.
    Triggered(u16),
    /// `update(index, msg, masked)` was called.
    Updated {
        /// Vector index.
        index: u16,
        /// The message passed.
        msg: MsiMessage,
        /// The mask state passed.
        masked: bool,
    },
}

/// An [`MsiInterruptGroup`] that records every call, for tests and fuzzing.
/// A batch is recorded as its updates, in order, and counted.
#[derive(Debug, Default)]
pub struct RecordingInterruptGroup {
    vectors: u16,
    events: Mutex<Vec<InterruptEvent>>,
    batches: AtomicUsize,
}

impl RecordingInterruptGroup {
    /// A group of `vectors` vectors; calls for other indices fail.
    pub fn new(vectors: u16) -> Self {
        RecordingInterruptGroup {
            vectors,
            events: Mutex::new(Vec::new()),
            batches: AtomicUsize::new(0),
        }
    }

    /// How many times `update_batch` was called.
    pub fn batches(&self) -> usize {
        self.batches.load(Ordering::SeqCst)
    }

    /// Returns and forgets the calls recorded so far.
    pub fn take_events(&self) -> Vec<InterruptEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Indices passed to `trigger`, in order, forgetting all recorded calls.
    pub fn take_triggered(&self) -> Vec<u16> {
        self.take_events()
            .into_iter()
            .filter_map(|e| match e {
                InterruptEvent::Triggered(i) => Some(i),
                InterruptEvent::Updated { .. } => None,
            })
            .collect()
    }

    fn record(&self, index: u16, event: InterruptEvent) -> Result<(), InterruptError> {
        if index >= self.vectors {
            return Err(InterruptError::InvalidVector(index));
        }
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
        Ok(())
    }
}

impl MsiInterruptGroup for RecordingInterruptGroup {
    fn trigger(&self, index: u16) -> Result<(), InterruptError> {
        self.record(index, InterruptEvent::Triggered(index))
    }

    fn update(&self, index: u16, msg: MsiMessage, masked: bool) -> Result<(), InterruptError> {
        self.record(index, InterruptEvent::Updated { index, msg, masked })
    }

    fn update_batch(&self, updates: &[VectorUpdate]) -> Result<(), InterruptError> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        // All or nothing, as the KVM group checks every index first.
        if let Some(bad) = updates.iter().find(|u| u.index >= self.vectors) {
            return Err(InterruptError::InvalidVector(bad.index));
        }
        updates
            .iter()
            .try_for_each(|u| self.update(u.index, u.msg, u.masked))
    }
}
