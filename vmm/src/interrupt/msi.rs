//! MSI/MSI-X vectors of one PCI function delivered through KVM irqfds.

use std::sync::{Arc, Mutex, MutexGuard};

use log::{debug, warn};
use pci::{InterruptError, MsiInterruptGroup, MsiMessage, VectorUpdate, MAX_MSIX_VECTORS};
use vm_allocator::SystemAllocator;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{GsiRoutingTable, IrqError, RouteChange};

/// What KVM currently knows about a vector.
#[derive(Clone, Copy, Debug, Default)]
struct VectorState {
    /// The message of the installed route, if there is one.
    route: Option<MsiMessage>,
    /// Whether the eventfd is registered as an irqfd on the vector's GSI.
    irqfd: bool,
}

/// The vectors of one function: a GSI and an eventfd each.
///
/// While a vector is unmasked its GSI has an MSI route and its eventfd is a
/// KVM irqfd on that GSI, so writing the eventfd (from the VMM, or from a
/// producer such as VFIO holding [`notifier`](MsiInterruptGroup::notifier))
/// injects the interrupt without a VMM exit. While it is masked neither
/// exists: a write then stays in the eventfd counter and KVM delivers it as
/// soon as the irqfd is registered again.
pub struct KvmMsiInterruptGroup {
    table: Arc<GsiRoutingTable>,
    allocator: Arc<Mutex<SystemAllocator>>,
    gsis: Vec<u32>,
    eventfds: Vec<EventFd>,
    state: Mutex<Vec<VectorState>>,
}

impl KvmMsiInterruptGroup {
    /// A group of `vectors` vectors (1..=2048), all masked, with GSIs from
    /// `allocator` (all or nothing), which get freed when the group drops.
    pub fn new(
        table: Arc<GsiRoutingTable>,
        allocator: Arc<Mutex<SystemAllocator>>,
        vectors: usize,
    ) -> Result<Self, IrqError> {
        if vectors == 0 || vectors > MAX_MSIX_VECTORS {
            return Err(IrqError::InvalidVectorCount(vectors));
        }
        let mut eventfds = Vec::with_capacity(vectors);
        for _ in 0..vectors {
            // Non-blocking: the VMM only ever writes, and a write must never
            // stall a device thread if the counter saturates.
            eventfds.push(EventFd::new(EFD_NONBLOCK).map_err(IrqError::EventFd)?);
        }
        let count = vectors as u32;
        let gsis = lock(&allocator)
            .allocate_msi_gsis(count)
            .map_err(|source| IrqError::GsiAllocation { count, source })?;
        debug!("MSI group of {vectors} vectors on GSIs {gsis:?}");
        Ok(KvmMsiInterruptGroup {
            table,
            allocator,
            gsis,
            eventfds,
            state: Mutex::new(vec![VectorState::default(); vectors]),
        })
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.gsis.len()
    }

    /// Always false: a group has at least one vector.
    pub fn is_empty(&self) -> bool {
        self.gsis.is_empty()
    }

    /// The GSIs of the vectors, by index.
    pub fn gsis(&self) -> &[u32] {
        &self.gsis
    }

    /// The GSI of vector `index`.
    pub fn gsi(&self, index: u16) -> Option<u32> {
        self.gsis.get(usize::from(index)).copied()
    }

    /// Whether vector `index` has a route and an irqfd (is deliverable).
    pub fn is_active(&self, index: u16) -> bool {
        self.lock_state()
            .get(usize::from(index))
            .is_some_and(|s| s.irqfd && s.route.is_some())
    }

    fn lock_state(&self) -> MutexGuard<'_, Vec<VectorState>> {
        // The state is updated step by step right after each KVM call
        // succeeds, so it is accurate even after a panic elsewhere.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, index: u16) -> Result<usize, InterruptError> {
        let i = usize::from(index);
        if i < self.gsis.len() {
            Ok(i)
        } else {
            Err(InterruptError::InvalidVector(index))
        }
    }

    /// Applies several vector changes with at most one routing table push.
    ///
    /// The order keeps interrupts from being lost or misrouted:
    /// 1. irqfds of vectors being masked are unregistered (so nothing fires
    ///    through a route that is about to disappear);
    /// 2. routes are added, changed and removed in one push;
    /// 3. irqfds of newly unmasked vectors are registered (KVM needs the
    ///    route first; anything written meanwhile fires now).
    ///
    /// If an index repeats, its last update wins. On error the vectors done
    /// so far stay done and the error names the first vector that failed.
    pub fn update_vectors(&self, updates: &[VectorUpdate]) -> Result<(), InterruptError> {
        let mut wanted: Vec<Option<VectorUpdate>> = vec![None; self.gsis.len()];
        for u in updates {
            wanted[self.check(u.index)?] = Some(*u);
        }
        let wanted: Vec<VectorUpdate> = wanted.into_iter().flatten().collect();
        let mut state = self.lock_state();

        for u in wanted.iter().filter(|u| u.masked) {
            let i = usize::from(u.index);
            if state[i].irqfd {
                self.table
                    .backend()
                    .unregister_irqfd(&self.eventfds[i], self.gsis[i])
                    .map_err(|source| InterruptError::Route {
                        vector: u.index,
                        source,
                    })?;
                state[i].irqfd = false;
            }
        }

        let changes: Vec<RouteChange> = wanted
            .iter()
            .filter_map(|u| {
                let i = usize::from(u.index);
                let gsi = self.gsis[i];
                match (u.masked, state[i].route) {
                    (true, Some(_)) => Some(RouteChange::Remove { gsi }),
                    (false, route) if route != Some(u.msg) => {
                        Some(RouteChange::SetMsi { gsi, msg: u.msg })
                    }
                    _ => None,
                }
            })
            .collect();
        if let Err(e) = self.table.apply(&changes) {
            let vector = wanted.first().map_or(0, |u| u.index);
            return Err(InterruptError::Route {
                vector,
                // Keeps the IrqError, and its cause, as the source chain.
                source: std::io::Error::other(e),
            });
        }
        for u in &wanted {
            state[usize::from(u.index)].route = (!u.masked).then_some(u.msg);
        }

        for u in wanted.iter().filter(|u| !u.masked) {
            let i = usize::from(u.index);
            if !state[i].irqfd {
                self.table
                    .backend()
                    .register_irqfd(&self.eventfds[i], self.gsis[i])
                    .map_err(|source| InterruptError::Route {
                        vector: u.index,
                        source,
                    })?;
                state[i].irqfd = true;
            }
        }
        Ok(())
    }
}

impl std::fmt::Debug for KvmMsiInterruptGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvmMsiInterruptGroup")
            .field("gsis", &self.gsis)
            .field("state", &*self.lock_state())
            .finish_non_exhaustive()
    }
}

impl MsiInterruptGroup for KvmMsiInterruptGroup {
    fn trigger(&self, index: u16) -> Result<(), InterruptError> {
        let i = self.check(index)?;
        self.eventfds[i]
            .write(1)
            .map_err(|source| InterruptError::Trigger {
                vector: index,
                source,
            })
    }

    fn update(&self, index: u16, msg: MsiMessage, masked: bool) -> Result<(), InterruptError> {
        self.update_vectors(&[VectorUpdate { index, msg, masked }])
    }

    fn update_batch(&self, updates: &[VectorUpdate]) -> Result<(), InterruptError> {
        self.update_vectors(updates)
    }

    fn notifier(&self, index: u16) -> Option<&EventFd> {
        self.eventfds.get(usize::from(index))
    }
}

impl Drop for KvmMsiInterruptGroup {
    fn drop(&mut self) {
        let state = std::mem::take(&mut *self.lock_state());
        let mut changes = Vec::new();
        for (i, s) in state.iter().enumerate() {
            if s.irqfd {
                if let Err(e) = self
                    .table
                    .backend()
                    .unregister_irqfd(&self.eventfds[i], self.gsis[i])
                {
                    warn!(
                        "failed to unregister the irqfd of GSI {}: {e}",
                        self.gsis[i]
                    );
                }
            }
            if s.route.is_some() {
                changes.push(RouteChange::Remove { gsi: self.gsis[i] });
            }
        }
        if let Err(e) = self.table.apply(&changes) {
            warn!("failed to remove the routes of a dropped MSI group: {e}");
        }
        let mut allocator = lock(&self.allocator);
        for &gsi in &self.gsis {
            if let Err(e) = allocator.free_msi_gsi(gsi) {
                warn!("failed to free MSI GSI {gsi}: {e}");
            }
        }
    }
}

fn lock(allocator: &Mutex<SystemAllocator>) -> MutexGuard<'_, SystemAllocator> {
    allocator.lock().unwrap_or_else(|e| e.into_inner())
}
