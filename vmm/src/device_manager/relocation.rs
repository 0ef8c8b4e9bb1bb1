//! Where PCI BARs are mapped (bus range, allocation, ioeventfds), and
//! moving all three together when the guest reprograms a BAR.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::Bus;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use log::{debug, error, info};
use pci::{
    BarReprogrammingParams, DeviceRelocation, PciBarRegionType, PciBdf, PciDevice, PciError,
};
use vm_allocator::{AddressSpace, GuestRange, SystemAllocator, FOUR_GIB};
use vmm_sys_util::eventfd::EventFd;

/// The KVM ioeventfd calls, behind a trait so tests can fail them.
/// Implemented for [`VmFd`] with no data match (any write, any width).
pub trait IoEventBackend: Send + Sync {
    /// Makes guest writes to `addr` signal `fd` without a VM exit.
    fn register_ioevent(&self, fd: &EventFd, addr: IoEventAddress) -> io::Result<()>;
    /// Undoes [`register_ioevent`](Self::register_ioevent).
    fn unregister_ioevent(&self, fd: &EventFd, addr: IoEventAddress) -> io::Result<()>;
}

impl IoEventBackend for VmFd {
    fn register_ioevent(&self, fd: &EventFd, addr: IoEventAddress) -> io::Result<()> {
        // NoDatamatch has size 0, which registers a zero-length ioeventfd:
        // any access width matches, and MMIO ones take KVM's fast path.
        VmFd::register_ioevent(self, fd, &addr, NoDatamatch).map_err(io::Error::from)
    }

    fn unregister_ioevent(&self, fd: &EventFd, addr: IoEventAddress) -> io::Result<()> {
        VmFd::unregister_ioevent(self, fd, &addr, NoDatamatch).map_err(io::Error::from)
    }
}

/// One BAR as mapped: its allocation (which gives the address space and
/// the current base) and the ioeventfds inside it, by offset.
pub(crate) struct BarMapping {
    pub(crate) bdf: PciBdf,
    pub(crate) index: usize,
    pub(crate) range: GuestRange,
    /// The eventfds by offset; usually duplicates of the device's (KVM
    /// matches ioeventfds by the eventfd itself, so a dup is the same one).
    ioevents: Vec<(u64, EventFd)>,
}

fn ioevent_address(space: AddressSpace, addr: u64) -> IoEventAddress {
    match space {
        AddressSpace::Io => IoEventAddress::Pio(addr),
        AddressSpace::Mmio32 | AddressSpace::Mmio64 => IoEventAddress::Mmio(addr),
    }
}

/// Maps BARs and moves them: the VMM's [`DeviceRelocation`].
pub struct PciBarRelocator {
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    allocator: Arc<Mutex<SystemAllocator>>,
    ioevents: Arc<dyn IoEventBackend>,
    bars: Mutex<Vec<BarMapping>>,
}

/// Why mapping a BAR failed.
#[derive(Debug, thiserror::Error)]
pub enum BarMapError {
    /// An ioeventfd offset lies outside the BAR.
    #[error("ioeventfd offset {offset:#x} is outside the {size:#x}-byte BAR")]
    OffsetOutsideBar {
        /// The offset.
        offset: u64,
        /// The BAR size.
        size: u64,
    },
    /// KVM refused an ioeventfd.
    #[error("failed to register the ioeventfd at {addr:#x}")]
    Register {
        /// Guest address of the ioeventfd.
        addr: u64,
        /// KVM's error.
        #[source]
        source: io::Error,
    },
}

impl PciBarRelocator {
    /// A relocator moving ranges on the two buses and in `allocator`.
    pub fn new(
        io_bus: Arc<Bus>,
        mmio_bus: Arc<Bus>,
        allocator: Arc<Mutex<SystemAllocator>>,
        ioevents: Arc<dyn IoEventBackend>,
    ) -> Self {
        PciBarRelocator {
            io_bus,
            mmio_bus,
            allocator,
            ioevents,
            bars: Mutex::new(Vec::new()),
        }
    }

    fn bars(&self) -> MutexGuard<'_, Vec<BarMapping>> {
        // Entries are only replaced once a move fully succeeded.
        self.bars.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bus BARs of `space` live on.
    pub(crate) fn bus(&self, space: AddressSpace) -> &Bus {
        match space {
            AddressSpace::Io => &self.io_bus,
            AddressSpace::Mmio32 | AddressSpace::Mmio64 => &self.mmio_bus,
        }
    }

    /// Records BAR `index` of `bdf` at `range` (already allocated and on
    /// its bus) and registers the ioeventfds at `range.base() + offset`.
    /// On error no ioeventfd stays registered.
    pub fn map_bar(
        &self,
        bdf: PciBdf,
        index: usize,
        range: GuestRange,
        ioevents: Vec<(u64, EventFd)>,
    ) -> Result<(), BarMapError> {
        if let Some(&(offset, _)) = ioevents.iter().find(|(o, _)| *o >= range.size()) {
            return Err(BarMapError::OffsetOutsideBar {
                offset,
                size: range.size(),
            });
        }
        register_all(&*self.ioevents, range, &ioevents)
            .map_err(|(addr, source)| BarMapError::Register { addr, source })?;
        self.bars().push(BarMapping {
            bdf,
            index,
            range,
            ioevents,
        });
        Ok(())
    }

    /// Unregisters the ioeventfds of every BAR of `bdf` and forgets them;
    /// returns their ranges (still allocated and on their bus).
    pub fn unmap_device(&self, bdf: PciBdf) -> Vec<GuestRange> {
        let mut bars = self.bars();
        let (gone, kept): (Vec<_>, Vec<_>) = bars.drain(..).partition(|b| b.bdf == bdf);
        *bars = kept;
        gone.into_iter()
            .map(|b| {
                unregister_all(&*self.ioevents, b.range, &b.ioevents);
                b.range
            })
            .collect()
    }

    /// The current range of BAR `index` of `bdf`.
    pub fn bar(&self, bdf: PciBdf, index: usize) -> Option<GuestRange> {
        self.bars()
            .iter()
            .find(|b| b.bdf == bdf && b.index == index)
            .map(|b| b.range)
    }

    /// Every mapped BAR of `bdf` as (index, range), in index order.
    pub fn bars_of(&self, bdf: PciBdf) -> Vec<(usize, GuestRange)> {
        let mut bars: Vec<_> = self
            .bars()
            .iter()
            .filter(|b| b.bdf == bdf)
            .map(|b| (b.index, b.range))
            .collect();
        bars.sort_by_key(|b| b.0);
        bars
    }

    /// Moves the mapping at `old` to `new_base`, undoing every step
    /// already taken if a later one fails.
    fn relocate(&self, mapping: &BarMapping, new_base: u64) -> Result<GuestRange, String> {
        let old = mapping.range;
        // A 64-bit BAR may be put below 4 GiB; it then belongs to the
        // 32-bit window (and the allocator says so if it does not fit).
        let space = match old.space() {
            AddressSpace::Io => AddressSpace::Io,
            _ if new_base < FOUR_GIB => AddressSpace::Mmio32,
            _ => AddressSpace::Mmio64,
        };
        let mut allocator = self.allocator.lock().unwrap_or_else(|e| e.into_inner());
        let new = allocator
            .allocate_at(space, new_base, old.size())
            .map_err(|e| format!("cannot claim the new range: {e}"))?;
        let undo_alloc = |allocator: &mut SystemAllocator| {
            if let Err(e) = allocator.free(&new) {
                error!("failed to release {new} while undoing a BAR move: {e}");
            }
        };
        let bus = self.bus(space);
        if let Err(e) = bus.update_range(old.base(), new.base(), new.size()) {
            undo_alloc(&mut allocator);
            return Err(format!("cannot move the bus range: {e}"));
        }
        unregister_all(&*self.ioevents, old, &mapping.ioevents);
        if let Err((addr, e)) = register_all(&*self.ioevents, new, &mapping.ioevents) {
            if let Err((addr, e)) = register_all(&*self.ioevents, old, &mapping.ioevents) {
                error!("failed to restore the ioeventfd at {addr:#x}: {e}");
            }
            if let Err(e) = bus.update_range(new.base(), old.base(), old.size()) {
                error!("failed to move {new} back to {old} on the bus: {e}");
            }
            undo_alloc(&mut allocator);
            return Err(format!("cannot register the ioeventfd at {addr:#x}: {e}"));
        }
        if let Err(e) = allocator.free(&old) {
            // Everything moved; the old range was not ours to begin with.
            error!("failed to release {old} after a BAR move: {e}");
        }
        Ok(new)
    }
}

/// Registers every ioeventfd at `range.base() + offset`; on failure the
/// ones registered so far are unregistered and the failing address given.
fn register_all(
    backend: &dyn IoEventBackend,
    range: GuestRange,
    ioevents: &[(u64, EventFd)],
) -> Result<(), (u64, io::Error)> {
    for (done, (offset, fd)) in ioevents.iter().enumerate() {
        let addr = range.base() + offset;
        if let Err(e) = backend.register_ioevent(fd, ioevent_address(range.space(), addr)) {
            unregister_all(backend, range, &ioevents[..done]);
            return Err((addr, e));
        }
    }
    Ok(())
}

fn unregister_all(backend: &dyn IoEventBackend, range: GuestRange, ioevents: &[(u64, EventFd)]) {
    for (offset, fd) in ioevents {
        let addr = range.base() + offset;
        if let Err(e) = backend.unregister_ioevent(fd, ioevent_address(range.space(), addr)) {
            error!("failed to unregister the ioeventfd at {addr:#x}: {e}");
        }
    }
}

impl DeviceRelocation for PciBarRelocator {
    fn move_bar(
        &self,
        params: &BarReprogrammingParams,
        _device: &mut dyn PciDevice,
    ) -> Result<(), PciError> {
        let refuse = |reason: String| PciError::BarRelocation {
            index: params.bar_index,
            old_base: params.old_base,
            new_base: params.new_base,
            reason,
        };
        let is_io = params.region_type == PciBarRegionType::IoRegion;
        let mut bars = self.bars();
        let Some(mapping) = bars.iter_mut().find(|b| {
            b.range.base() == params.old_base && (b.range.space() == AddressSpace::Io) == is_io
        }) else {
            return Err(refuse("no BAR is mapped there".to_string()));
        };
        if mapping.range.size() != params.len {
            return Err(refuse(format!(
                "size {:#x} does not match the mapped {:#x}",
                params.len,
                mapping.range.size()
            )));
        }
        let new = self.relocate(mapping, params.new_base).map_err(refuse)?;
        info!(
            target: super::TOPOLOGY_LOG_TARGET,
            "{} BAR {} moved from {} to {}",
            mapping.bdf,
            mapping.index,
            mapping.range,
            new
        );
        debug!("{} ioeventfds followed", mapping.ioevents.len());
        mapping.range = new;
        Ok(())
    }
}
