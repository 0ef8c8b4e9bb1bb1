//! The one owner of the VM's GSI routing table.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use log::debug;
use pci::MsiMessage;

use super::{default_irqchip_routes, IrqBackend, IrqError, RouteEntry, RouteTarget};

/// One change to the MSI part of the routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteChange {
    /// Route `gsi` to `msg`, replacing any previous route of `gsi`.
    SetMsi {
        /// The MSI GSI.
        gsi: u32,
        /// The message KVM sends when the GSI fires.
        msg: MsiMessage,
    },
    /// Remove the route of `gsi`, if any.
    Remove {
        /// The MSI GSI.
        gsi: u32,
    },
}

/// The VM's GSI routing table: the irqchip defaults plus the MSI routes of
/// every unmasked vector, pushed whole to KVM on each change.
///
/// Shared as `Arc<GsiRoutingTable>`; the internal lock is held across the
/// ioctl so that concurrent updates are pushed in the order they were made
/// and the last push always holds every route.
pub struct GsiRoutingTable {
    backend: Arc<dyn IrqBackend>,
    msi_gsis: Range<u32>,
    defaults: Vec<RouteEntry>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

impl GsiRoutingTable {
    /// A table for a VM with an in-kernel irqchip, accepting MSI routes for
    /// GSIs in `msi_gsis` (which must not overlap the irqchip pins: KVM
    /// refuses a GSI with both an irqchip and an MSI route).
    ///
    /// Nothing is pushed until the first change: until then KVM's own
    /// defaults are in place, which are the same routes.
    pub fn new(backend: Arc<dyn IrqBackend>, msi_gsis: Range<u32>) -> Self {
        let start = msi_gsis.start.max(super::IOAPIC_PINS);
        GsiRoutingTable {
            backend,
            msi_gsis: start..msi_gsis.end.max(start),
            defaults: default_irqchip_routes(),
            msi: Mutex::new(BTreeMap::new()),
        }
    }

    /// The backend the table pushes to (irqfds are registered there too).
    pub fn backend(&self) -> &Arc<dyn IrqBackend> {
        &self.backend
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u32, MsiMessage>> {
        // Every mutation commits only after a successful push, so the map
        // is consistent even if a holder panicked.
        self.msi.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_gsi(&self, gsi: u32) -> Result<(), IrqError> {
        if self.msi_gsis.contains(&gsi) {
            Ok(())
        } else {
            Err(IrqError::NotAnMsiGsi {
                gsi,
                start: self.msi_gsis.start,
                end: self.msi_gsis.end,
            })
        }
    }

    /// Applies `changes` in order with a single `KVM_SET_GSI_ROUTING`.
    /// All or nothing: if a GSI is invalid or the push fails, the table is
    /// left as it was. Changes that leave the table as it is push nothing.
    pub fn apply(&self, changes: &[RouteChange]) -> Result<(), IrqError> {
        for change in changes {
            let (RouteChange::SetMsi { gsi, .. } | RouteChange::Remove { gsi }) = *change;
            self.check_gsi(gsi)?;
        }
        let mut current = self.lock();
        let mut next = current.clone();
        for change in changes {
            match *change {
                RouteChange::SetMsi { gsi, msg } => {
                    next.insert(gsi, msg);
                }
                RouteChange::Remove { gsi } => {
                    next.remove(&gsi);
                }
            }
        }
        if next == *current {
            return Ok(());
        }
        self.push(&next)?;
        *current = next;
        Ok(())
    }

    /// Routes `gsi` to `msg`.
    pub fn set_msi_route(&self, gsi: u32, msg: MsiMessage) -> Result<(), IrqError> {
        self.apply(&[RouteChange::SetMsi { gsi, msg }])
    }

    /// Removes the route of `gsi`.
    pub fn remove_msi_route(&self, gsi: u32) -> Result<(), IrqError> {
        self.apply(&[RouteChange::Remove { gsi }])
    }

    /// Pushes the current table again, e.g. once at VM setup to check that
    /// KVM accepts it.
    pub fn sync(&self) -> Result<(), IrqError> {
        let current = self.lock();
        self.push(&current)
    }

    /// The MSI routes, by GSI.
    pub fn msi_routes(&self) -> BTreeMap<u32, MsiMessage> {
        self.lock().clone()
    }

    /// The whole table as it is pushed to KVM.
    pub fn entries(&self) -> Vec<RouteEntry> {
        self.build(&self.lock())
    }

    fn build(&self, msi: &BTreeMap<u32, MsiMessage>) -> Vec<RouteEntry> {
        let mut entries = self.defaults.clone();
        entries.extend(msi.iter().map(|(&gsi, &msg)| RouteEntry {
            gsi,
            target: RouteTarget::Msi(msg),
        }));
        entries
    }

    fn push(&self, msi: &BTreeMap<u32, MsiMessage>) -> Result<(), IrqError> {
        let entries = self.build(msi);
        debug!("pushing GSI routing table: {} MSI routes", msi.len());
        self.backend
            .set_gsi_routing(&entries)
            .map_err(|source| IrqError::SetRouting {
                routes: entries.len(),
                source,
            })
    }
}
