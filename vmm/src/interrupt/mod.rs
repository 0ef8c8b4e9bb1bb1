//! Interrupt delivery on KVM: the GSI routing table, MSI/MSI-X vector
//! groups and level-triggered INTx lines.
//!
//! # Who owns what
//!
//! `KVM_SET_GSI_ROUTING` replaces the VM's whole routing table on every
//! call, so exactly one object may build that table: [`GsiRoutingTable`].
//! Everything that needs a route (each [`KvmMsiInterruptGroup`]) changes it
//! through the table, which always pushes the in-kernel irqchip defaults
//! (PIC pins on GSIs 0-15, IOAPIC pins on GSIs 0-23) plus one MSI route per
//! unmasked vector. Leaving the defaults out would silently disconnect the
//! serial port, the ACPI SCI and every INTx line.
//!
//! # Delivery paths
//!
//! - MSI/MSI-X: one eventfd per vector, registered as a KVM irqfd on the
//!   vector's GSI while the vector is unmasked; a write to the eventfd makes
//!   KVM inject the message from the GSI's route.
//! - INTx ([`KvmIntx`]): an irqfd with a resample eventfd on an IOAPIC pin,
//!   which gives level-triggered semantics (see `intx.rs`).
//!
//! Every KVM call goes through [`IrqBackend`], implemented for
//! [`kvm_ioctls::VmFd`]; tests use a recording backend instead.

mod intx;
mod msi;
mod routing;

#[cfg(test)]
pub(crate) mod tests;

use std::io;

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use pci::MsiMessage;
use vmm_sys_util::eventfd::EventFd;

pub use intx::KvmIntx;
pub use msi::KvmMsiInterruptGroup;
pub use pci::VectorUpdate;
pub use routing::{GsiRoutingTable, RouteChange};

use vm_allocator::layout::IOAPIC_PINS;

/// Which interrupt controller input a route drives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RouteTarget {
    /// Pin `pin` of in-kernel irqchip `chip` (0: master PIC, 1: slave PIC,
    /// 2: IOAPIC).
    Irqchip {
        /// `KVM_IRQCHIP_*` number.
        chip: u32,
        /// Pin on that chip.
        pin: u32,
    },
    /// An MSI write of `MsiMessage`.
    Msi(MsiMessage),
}

/// One entry of the GSI routing table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RouteEntry {
    /// The GSI the entry routes.
    pub gsi: u32,
    /// Where it goes.
    pub target: RouteTarget,
}

impl RouteEntry {
    /// Reads an irqchip or MSI entry of KVM's table; `None` for other kinds.
    pub fn from_kvm(e: &kvm_irq_routing_entry) -> Option<Self> {
        let target = match e.type_ {
            KVM_IRQ_ROUTING_IRQCHIP => {
                // SAFETY: `type_` says `irqchip` is the member in use; the
                // union is plain u32s, so any bit pattern is a valid value.
                let c = unsafe { e.u.irqchip };
                RouteTarget::Irqchip {
                    chip: c.irqchip,
                    pin: c.pin,
                }
            }
            KVM_IRQ_ROUTING_MSI => {
                // SAFETY: as above, with `msi` the member in use.
                let m = unsafe { e.u.msi };
                RouteTarget::Msi(MsiMessage {
                    address: u64::from(m.address_hi) << 32 | u64::from(m.address_lo),
                    data: m.data,
                })
            }
            _ => return None,
        };
        Some(RouteEntry { gsi: e.gsi, target })
    }

    /// The KVM representation of the entry.
    pub fn to_kvm(&self) -> kvm_irq_routing_entry {
        let (type_, u) = match self.target {
            RouteTarget::Irqchip { chip, pin } => (
                KVM_IRQ_ROUTING_IRQCHIP,
                kvm_irq_routing_entry__bindgen_ty_1 {
                    irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
                },
            ),
            RouteTarget::Msi(msg) => (
                KVM_IRQ_ROUTING_MSI,
                kvm_irq_routing_entry__bindgen_ty_1 {
                    // No KVM_MSI_VALID_DEVID: x86 KVM has no use for a
                    // device ID (KVM_CAP_MSI_DEVID is 0 here).
                    msi: kvm_irq_routing_msi {
                        address_lo: msg.address as u32,
                        address_hi: (msg.address >> 32) as u32,
                        data: msg.data,
                        ..Default::default()
                    },
                },
            ),
        };
        kvm_irq_routing_entry {
            gsi: self.gsi,
            type_,
            u,
            ..Default::default()
        }
    }
}

/// The routes KVM installs by itself when the in-kernel irqchip is
/// created (`KVM_CREATE_IRQCHIP`), which a custom table must repeat; the
/// platform's [`crate::arch::default_irqchip_routes`] is the source.
pub fn default_irqchip_routes() -> Vec<RouteEntry> {
    crate::arch::default_irqchip_routes()
        .iter()
        .filter_map(RouteEntry::from_kvm)
        .collect()
}

/// The KVM operations interrupt delivery needs. Implemented for [`VmFd`];
/// tests substitute a recorder.
pub trait IrqBackend: Send + Sync {
    /// Replaces the whole GSI routing table with `entries`.
    fn set_gsi_routing(&self, entries: &[RouteEntry]) -> io::Result<()>;
    /// Makes a write to `fd` inject GSI `gsi` (edge semantics).
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
    /// Like [`register_irqfd`](Self::register_irqfd) with level semantics:
    /// the line stays raised until the guest EOIs it, then `resample` is
    /// signalled.
    fn register_irqfd_with_resample(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> io::Result<()>;
    /// Detaches `fd` from `gsi`.
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()>;
}

impl IrqBackend for VmFd {
    fn set_gsi_routing(&self, entries: &[RouteEntry]) -> io::Result<()> {
        let kvm_entries: Vec<kvm_irq_routing_entry> = entries.iter().map(|e| e.to_kvm()).collect();
        let routing = KvmIrqRouting::from_entries(&kvm_entries).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cannot build a routing table of {} entries: {e:?}",
                    entries.len()
                ),
            )
        })?;
        VmFd::set_gsi_routing(self, &routing).map_err(io::Error::from)
    }

    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        VmFd::register_irqfd(self, fd, gsi).map_err(io::Error::from)
    }

    fn register_irqfd_with_resample(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> io::Result<()> {
        VmFd::register_irqfd_with_resample(self, fd, resample, gsi).map_err(io::Error::from)
    }

    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        VmFd::unregister_irqfd(self, fd, gsi).map_err(io::Error::from)
    }
}

/// Errors from setting up or changing interrupt routes.
#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    /// A GSI outside the range the table accepts for MSI routes.
    #[error("GSI {gsi} is not an MSI GSI (expected {start}..{end})")]
    NotAnMsiGsi {
        /// The rejected GSI.
        gsi: u32,
        /// First MSI GSI.
        start: u32,
        /// End (exclusive) of the MSI GSIs.
        end: u32,
    },
    /// `KVM_SET_GSI_ROUTING` failed.
    #[error("failed to set the GSI routing table ({routes} routes)")]
    SetRouting {
        /// Number of entries in the rejected table.
        routes: usize,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// Registering or unregistering an irqfd failed.
    #[error("failed to {op} the irqfd of GSI {gsi}")]
    Irqfd {
        /// "register" or "unregister".
        op: &'static str,
        /// The GSI.
        gsi: u32,
        /// The ioctl's error.
        #[source]
        source: io::Error,
    },
    /// Creating an eventfd failed.
    #[error("failed to create an eventfd")]
    EventFd(#[source] io::Error),
    /// The allocator had no GSIs left, or refused to free one.
    #[error("failed to allocate {count} MSI GSI(s)")]
    GsiAllocation {
        /// How many were asked for.
        count: u32,
        /// The allocator's error.
        #[source]
        source: vm_allocator::Error,
    },
    /// An MSI group must have 1..=2048 vectors.
    #[error("invalid number of MSI vectors: {0}")]
    InvalidVectorCount(usize),
    /// An INTx line must be an IOAPIC pin.
    #[error("INTx GSI {0} is not an IOAPIC pin (0..{IOAPIC_PINS})")]
    NotAnIoapicPin(u32),
}
