//! Guest RAM and the KVM memory slots that map it (and, later, other host
//! memory such as VFIO BARs) into the guest physical address space.
//!
//! RAM is anonymous `MAP_NORESERVE` memory split around the 32-bit MMIO
//! hole by [`vm_allocator::layout::ram_layout`]: host memory is only
//! committed when the guest touches it, so large guests cost nothing up
//! front. Each RAM region gets one KVM slot; [`MemoryManager::add_slot`]
//! hands out further slots for device memory.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use log::debug;
use thiserror::Error;
use vm_allocator::layout::{ram_layout, RamLayout};
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    GuestAddress, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::MIN_RAM_SIZE;

/// Guest memory as used throughout the VMM.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
/// Guest memory shared with device threads, swappable as a whole.
pub type GuestMemoryAtomicMmap = GuestMemoryAtomic<GuestMemoryMmap>;

/// Page size slots and RAM are aligned to.
pub const PAGE_SIZE: u64 = 0x1000;

/// Errors creating guest memory or managing KVM memory slots.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The RAM size is unusable.
    #[error("invalid guest RAM size {size:#x}: {reason}")]
    InvalidRamSize {
        /// Requested size in bytes.
        size: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Splitting RAM around the MMIO hole failed.
    #[error("cannot lay out {size:#x} bytes of guest RAM: {source}")]
    Layout {
        /// Requested size in bytes.
        size: u64,
        /// The layout error.
        #[source]
        source: vm_allocator::Error,
    },
    /// Mapping host memory for a RAM region failed.
    #[error("failed to map {size:#x} bytes of host memory for guest RAM at {base:#x}: {source}")]
    Mmap {
        /// Guest physical base of the region.
        base: u64,
        /// Size of the region.
        size: u64,
        /// The mmap error.
        #[source]
        source: MmapRegionError,
    },
    /// The RAM regions could not be assembled into guest memory.
    #[error("invalid guest memory regions: {0}")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// Every KVM memory slot is in use.
    #[error("no free KVM memory slot (KVM supports {max})")]
    NoFreeSlot {
        /// Number of slots KVM supports.
        max: u32,
    },
    /// A slot range is empty, unaligned or wraps.
    #[error("invalid memory slot range {base:#x}+{size:#x}: must be non-empty, page-aligned and below 2^64")]
    InvalidSlotRange {
        /// Guest physical base.
        base: u64,
        /// Size in bytes.
        size: u64,
    },
    /// A slot range overlaps an existing slot.
    #[error("memory slot range {base:#x}+{size:#x} overlaps slot {slot} at {slot_base:#x}+{slot_size:#x}")]
    SlotOverlap {
        /// Guest physical base requested.
        base: u64,
        /// Size requested.
        size: u64,
        /// The existing slot.
        slot: u32,
        /// Its base.
        slot_base: u64,
        /// Its size.
        slot_size: u64,
    },
    /// KVM refused the memory region.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} ({base:#x}+{size:#x}) failed: {source}")]
    SetUserMemoryRegion {
        /// Slot number.
        slot: u32,
        /// Guest physical base.
        base: u64,
        /// Size in bytes.
        size: u64,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No slot with that number exists.
    #[error("memory slot {0} is not in use")]
    UnknownSlot(u32),
    /// RAM slots stay for the life of the VM.
    #[error("memory slot {0} maps guest RAM and cannot be removed")]
    RamSlot(u32),
}

/// One KVM memory slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest physical base.
    pub guest_phys_addr: u64,
    /// Size in bytes.
    pub memory_size: u64,
    /// Host virtual address backing the slot.
    pub userspace_addr: u64,
    /// `KVM_MEM_*` flags.
    pub flags: u32,
    /// Whether this slot maps guest RAM (owned by the manager).
    pub is_ram: bool,
}

impl MemorySlot {
    fn end(&self) -> u64 {
        self.guest_phys_addr.saturating_add(self.memory_size)
    }
}

/// Maps guest RAM with `MAP_NORESERVE` anonymous memory split around the
/// 32-bit hole. Needs no KVM, so layouts can be checked anywhere.
pub fn create_guest_memory(ram_size: u64) -> Result<(GuestMemoryMmap, RamLayout), MemoryError> {
    if ram_size < MIN_RAM_SIZE {
        return Err(MemoryError::InvalidRamSize {
            size: ram_size,
            reason: "below the 4 MiB minimum",
        });
    }
    if ram_size % PAGE_SIZE != 0 {
        return Err(MemoryError::InvalidRamSize {
            size: ram_size,
            reason: "not a multiple of 4 KiB",
        });
    }
    let layout = ram_layout(ram_size).map_err(|source| MemoryError::Layout {
        size: ram_size,
        source,
    })?;
    let mut regions = Vec::new();
    for r in layout.regions() {
        let size = usize::try_from(r.size).map_err(|_| MemoryError::InvalidRamSize {
            size: ram_size,
            reason: "larger than the host address space",
        })?;
        let mapping = MmapRegionBuilder::new(size)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Mmap {
                base: r.base,
                size: r.size,
                source,
            })?;
        // ram_layout never returns a region that wraps.
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.base)).ok_or(
            MemoryError::InvalidRamSize {
                size: ram_size,
                reason: "RAM would extend past 2^64",
            },
        )?;
        regions.push(region);
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)?;
    Ok((mem, layout))
}

/// Guest RAM plus the VM's KVM memory slots.
pub struct MemoryManager {
    vm: Arc<VmFd>,
    guest_memory: GuestMemoryAtomicMmap,
    layout: RamLayout,
    slots: Mutex<BTreeMap<u32, MemorySlot>>,
    max_slots: u32,
}

impl std::fmt::Debug for MemoryManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryManager")
            .field("layout", &self.layout)
            .field("slots", &*self.lock_slots())
            .field("max_slots", &self.max_slots)
            .finish()
    }
}

impl MemoryManager {
    /// Creates `ram_size` bytes of guest RAM and registers it with `vm`.
    /// `max_slots` is what KVM supports (`Kvm::get_nr_memslots`).
    pub fn new(vm: Arc<VmFd>, ram_size: u64, max_slots: u32) -> Result<Self, MemoryError> {
        let (mem, layout) = create_guest_memory(ram_size)?;
        let manager = MemoryManager {
            vm,
            guest_memory: GuestMemoryAtomic::new(mem.clone()),
            layout,
            slots: Mutex::new(BTreeMap::new()),
            max_slots,
        };
        for region in mem.iter() {
            let host = region.as_ptr() as u64;
            // SAFETY: the mapping belongs to `mem`, whose regions are kept
            // alive by `guest_memory` for as long as the manager (and thus
            // the slot) exists; RAM slots are never removed.
            unsafe {
                manager.insert_slot(region.start_addr().0, region.len(), host, 0, true)?;
            }
        }
        Ok(manager)
    }

    /// Guest RAM, for devices and the boot loader.
    pub fn guest_memory(&self) -> GuestMemoryAtomicMmap {
        self.guest_memory.clone()
    }

    /// How RAM is split around the hole.
    pub fn ram_layout(&self) -> RamLayout {
        self.layout
    }

    /// The slots in use, by slot number.
    pub fn slots(&self) -> Vec<MemorySlot> {
        self.lock_slots().values().copied().collect()
    }

    fn lock_slots(&self) -> MutexGuard<'_, BTreeMap<u32, MemorySlot>> {
        // The map is only changed by single insert/remove calls, so it is
        // consistent even if a holder panicked.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Maps `size` bytes of host memory at `userspace_addr` into the guest
    /// at `guest_phys_addr` with `KVM_MEM_*` `flags`; returns the slot.
    ///
    /// # Safety
    ///
    /// `userspace_addr..userspace_addr + size` must be a mapping in this
    /// process that stays valid (not unmapped or remapped) until the slot is
    /// removed with [`remove_slot`](Self::remove_slot) or the VM is dropped:
    /// the guest reads and writes it directly.
    pub unsafe fn add_slot(
        &self,
        guest_phys_addr: u64,
        size: u64,
        userspace_addr: u64,
        flags: u32,
    ) -> Result<u32, MemoryError> {
        // SAFETY: forwarded from our caller's contract.
        unsafe { self.insert_slot(guest_phys_addr, size, userspace_addr, flags, false) }
    }

    /// # Safety
    ///
    /// As for [`add_slot`](Self::add_slot).
    unsafe fn insert_slot(
        &self,
        base: u64,
        size: u64,
        userspace_addr: u64,
        flags: u32,
        is_ram: bool,
    ) -> Result<u32, MemoryError> {
        if size == 0
            || base % PAGE_SIZE != 0
            || size % PAGE_SIZE != 0
            || userspace_addr % PAGE_SIZE != 0
            || base.checked_add(size).is_none()
        {
            return Err(MemoryError::InvalidSlotRange { base, size });
        }
        let mut slots = self.lock_slots();
        if let Some(s) = slots
            .values()
            .find(|s| base < s.end() && s.guest_phys_addr < base + size)
        {
            return Err(MemoryError::SlotOverlap {
                base,
                size,
                slot: s.slot,
                slot_base: s.guest_phys_addr,
                slot_size: s.memory_size,
            });
        }
        // Lowest free number: slots are few and numbers get reused.
        let slot = (0..self.max_slots).find(|n| !slots.contains_key(n)).ok_or(
            MemoryError::NoFreeSlot {
                max: self.max_slots,
            },
        )?;
        let region = kvm_userspace_memory_region {
            slot,
            flags,
            guest_phys_addr: base,
            memory_size: size,
            userspace_addr,
        };
        // SAFETY: the caller guarantees the host range stays mapped while
        // the slot exists; the range was checked not to overlap other slots.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| {
            MemoryError::SetUserMemoryRegion {
                slot,
                base,
                size,
                source,
            }
        })?;
        debug!("memory slot {slot}: guest {base:#x}+{size:#x} -> host {userspace_addr:#x}");
        slots.insert(
            slot,
            MemorySlot {
                slot,
                guest_phys_addr: base,
                memory_size: size,
                userspace_addr,
                flags,
                is_ram,
            },
        );
        Ok(slot)
    }

    /// Unmaps a slot added with [`add_slot`](Self::add_slot).
    pub fn remove_slot(&self, slot: u32) -> Result<(), MemoryError> {
        let mut slots = self.lock_slots();
        let s = *slots.get(&slot).ok_or(MemoryError::UnknownSlot(slot))?;
        if s.is_ram {
            return Err(MemoryError::RamSlot(slot));
        }
        let region = kvm_userspace_memory_region {
            slot,
            flags: s.flags,
            guest_phys_addr: s.guest_phys_addr,
            // Size zero deletes the slot.
            memory_size: 0,
            userspace_addr: s.userspace_addr,
        };
        // SAFETY: deleting a slot only stops the guest from using the host
        // range; no new host memory is handed to KVM.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| {
            MemoryError::SetUserMemoryRegion {
                slot,
                base: s.guest_phys_addr,
                size: 0,
                source,
            }
        })?;
        slots.remove(&slot);
        debug!("memory slot {slot} removed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_allocator::layout::{GIB, MEM_32BIT_HOLE_START, MIB};
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_ram_is_one_region() {
        let (mem, layout) = create_guest_memory(64 * MIB).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(layout.above_4g, None);
        assert_eq!(mem.last_addr(), GuestAddress(64 * MIB - 1));
        mem.write_obj(0x1234u32, GuestAddress(64 * MIB - 4))
            .unwrap();
        assert!(mem.write_obj(0u8, GuestAddress(64 * MIB)).is_err());
    }

    #[test]
    fn ram_up_to_the_hole_stays_below() {
        let (mem, layout) = create_guest_memory(3 * GIB).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(layout.end(), MEM_32BIT_HOLE_START);
    }

    #[test]
    fn large_ram_is_split_around_the_hole() {
        // MAP_NORESERVE: nothing is committed until touched.
        let (mem, layout) = create_guest_memory(4 * GIB).unwrap();
        assert_eq!(mem.num_regions(), 2);
        let regions: Vec<_> = mem.iter().map(|r| (r.start_addr().0, r.len())).collect();
        assert_eq!(regions, vec![(0, 3 * GIB), (4 * GIB, GIB)]);
        assert_eq!(layout.end(), 5 * GIB);
        // The hole is not memory.
        assert!(mem
            .write_obj(0u8, GuestAddress(MEM_32BIT_HOLE_START))
            .is_err());
        mem.write_obj(7u8, GuestAddress(4 * GIB)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(4 * GIB)).unwrap(), 7);
    }

    #[test]
    fn bad_sizes_are_errors() {
        for (size, reason) in [(0, "below"), (MIB, "below"), (64 * MIB + 1, "multiple")] {
            let e = create_guest_memory(size).unwrap_err();
            assert!(e.to_string().contains(reason), "{e}");
        }
        assert!(matches!(
            create_guest_memory(u64::MAX - 0xfff),
            Err(MemoryError::Layout { .. })
        ));
    }
}
