//! The VMM side of VFIO without a VFIO device: BAR allocation, the INTx
//! line handed to VFIO, and BAR memory as KVM slots.

use std::io;
use std::sync::Arc;

use kvm_ioctls::IoEventAddress;
use pci::vfio::{BarInfo, GuestMemoryMapper};
use pci::{PciBarPrefetchable, PciBarRegionType, ROM_BAR_INDEX};
use vm_allocator::{layout, AddressSpace, SystemAllocator, SystemAllocatorConfig};
use vmm_sys_util::eventfd::EventFd;

use super::host::{check_host_function_in, HostRoots};
use super::{SlotMapper, VfioIntxLine, VfioSetupError};
use crate::device_manager::{DeviceManager, IoEventBackend};
use crate::interrupt::tests::{FakeBackend, Op};
use crate::memory::MemoryManager;

struct NoIoEvents;

impl IoEventBackend for NoIoEvents {
    fn register_ioevent(&self, _fd: &EventFd, _addr: IoEventAddress) -> io::Result<()> {
        Ok(())
    }
    fn unregister_ioevent(&self, _fd: &EventFd, _addr: IoEventAddress) -> io::Result<()> {
        Ok(())
    }
}

fn manager() -> DeviceManager {
    let config = SystemAllocatorConfig::for_x86_64_ram_size(1 << 30).unwrap();
    DeviceManager::with_backends(
        Arc::new(FakeBackend::default()),
        Arc::new(NoIoEvents),
        SystemAllocator::new(&config).unwrap(),
    )
    .unwrap()
}

fn bar(index: usize, region_type: PciBarRegionType, size: u64) -> BarInfo {
    BarInfo {
        index,
        region_type,
        prefetchable: PciBarPrefetchable::NotPrefetchable,
        size,
        region_size: size,
    }
}

#[test]
fn bars_go_to_their_windows_page_aligned() {
    let dm = manager();
    let bars = [
        bar(0, PciBarRegionType::Memory32BitRegion, 0x100),
        bar(2, PciBarRegionType::Memory64BitRegion, 0x4000),
        bar(4, PciBarRegionType::IoRegion, 0x20),
        bar(ROM_BAR_INDEX, PciBarRegionType::Memory32BitRegion, 0x800),
    ];
    let ranges = dm.allocate_vfio_bars("vfio0", bars.iter()).unwrap();
    let spaces: Vec<_> = ranges.iter().map(|(i, r)| (*i, r.space())).collect();
    assert_eq!(
        spaces,
        [
            (0, AddressSpace::Mmio32),
            (2, AddressSpace::Mmio64),
            (4, AddressSpace::Io),
            (ROM_BAR_INDEX, AddressSpace::Mmio32)
        ]
    );
    for (i, r) in &ranges {
        let align = if r.space() == AddressSpace::Io {
            0x20
        } else {
            0x1000
        };
        assert_eq!(r.base() % align, 0, "BAR {i} at {r}");
        assert!(r.base() >= layout::IO_WINDOW_START);
    }
}

#[test]
fn bar_allocation_is_all_or_nothing() {
    let dm = manager();
    let bars = [
        bar(0, PciBarRegionType::Memory32BitRegion, 0x1000),
        // Larger than the whole 32-bit window.
        bar(1, PciBarRegionType::Memory32BitRegion, 1 << 31),
    ];
    let err = dm.allocate_vfio_bars("gpu", bars.iter()).unwrap_err();
    assert!(err.to_string().contains("BAR 1"), "{err}");
    // BAR 0's range was given back: the same request succeeds again.
    let again = dm.allocate_vfio_bars("gpu", bars[..1].iter()).unwrap();
    assert_eq!(again[0].1.base(), layout::MMIO32_WINDOW_START);
}

#[test]
fn the_intx_line_is_a_resampling_irqfd_whose_fds_go_to_vfio() {
    let backend = Arc::new(FakeBackend::default());
    let line = VfioIntxLine::new(backend.clone(), 19).unwrap();
    let ops = backend.take();
    assert!(matches!(ops[..], [Op::RegisterResample { gsi: 19, .. }]));
    // VFIO gets duplicates: what it writes is what KVM reads.
    let fds = line.fds().unwrap();
    fds.trigger.write(1).unwrap();
    assert_eq!(line.trigger.read().unwrap(), 1);
    line.resample.write(2).unwrap();
    assert_eq!(fds.resample.read().unwrap(), 2);
    drop(line);
    assert!(matches!(
        backend.take()[..],
        [Op::Unregister { gsi: 19, .. }]
    ));
}

#[test]
fn bar_memory_becomes_a_kvm_slot_and_never_covers_ram() {
    let Some(vm) = crate::interrupt::tests::kvm_vm() else {
        eprintln!("skipped: no usable /dev/kvm");
        return;
    };
    let memory = Arc::new(MemoryManager::new(vm, 64 << 20, 32).unwrap());
    let mapper = SlotMapper(memory.clone());
    // Stand-in for a device mapping: anonymous memory of two pages.
    let host = vm_memory::mmap::MmapRegion::<()>::new(0x2000).unwrap();
    let addr = host.as_ptr() as u64;
    // SAFETY: `host` outlives the slot, which is removed below.
    let slot = unsafe { mapper.map(0xc000_0000, 0x2000, addr) }.unwrap();
    assert!(memory
        .slots()
        .iter()
        .any(|s| s.slot == slot && s.guest_phys_addr == 0xc000_0000 && !s.is_ram));
    // SAFETY: as above; the call fails anyway (it overlaps RAM).
    assert!(unsafe { mapper.map(0x10_0000, 0x2000, addr) }.is_err());
    mapper.unmap(slot).unwrap();
    assert!(memory.slots().iter().all(|s| s.is_ram));
    assert!(mapper.unmap(slot).is_err());
}

/// A fake sysfs and /dev/vfio: function 0000:01:00.0 in IOMMU group 7
/// with a sibling 0000:01:00.1, drivers given per function.
struct FakeHost {
    root: std::path::PathBuf,
}

impl FakeHost {
    fn new(name: &str, drivers: [Option<&str>; 2]) -> Self {
        use std::os::unix::fs::symlink;
        let root = std::env::temp_dir().join(format!("trellis-vfio-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (i, driver) in drivers.into_iter().enumerate() {
            let dev = root.join(format!("devices/0000:01:00.{i}"));
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join("config"), [0u8; 64]).unwrap();
            if let Some(d) = driver {
                std::fs::create_dir_all(root.join("drivers").join(d)).unwrap();
                symlink(root.join("drivers").join(d), dev.join("driver")).unwrap();
            }
            let members = root.join("groups/7/devices");
            std::fs::create_dir_all(&members).unwrap();
            symlink(root.join("groups/7"), dev.join("iommu_group")).unwrap();
            symlink(&dev, members.join(format!("0000:01:00.{i}"))).unwrap();
        }
        std::fs::create_dir_all(root.join("dev/vfio")).unwrap();
        std::fs::write(root.join("dev/vfio/vfio"), b"").unwrap();
        std::fs::write(root.join("dev/vfio/7"), b"").unwrap();
        FakeHost { root }
    }

    fn check(&self, function: &str) -> Result<u32, VfioSetupError> {
        let roots = HostRoots {
            iommu_groups: self.root.join("groups"),
            dev_vfio: self.root.join("dev/vfio"),
        };
        check_host_function_in(&self.root.join("devices").join(function), &roots)
    }
}

impl Drop for FakeHost {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

#[test]
fn host_setup_mistakes_are_named() {
    let host = FakeHost::new("ok", [Some("vfio-pci"), None]);
    assert_eq!(host.check("0000:01:00.0").unwrap(), 7);
    let e = host.check("0000:01:00.7").unwrap_err();
    assert!(
        e.to_string()
            .ends_with("0000:01:00.7: no such PCI function on this host"),
        "{e}"
    );
    let e = host.check("0000:01:00.1").unwrap_err();
    assert!(
        e.to_string()
            .contains("is bound to no driver, not to vfio-pci"),
        "{e}"
    );

    let host = FakeHost::new("bound", [Some("nvme"), None]);
    let e = host.check("0000:01:00.0").unwrap_err();
    assert!(
        e.to_string()
            .contains("is bound to nvme, not to vfio-pci (unbind it"),
        "{e}"
    );

    let host = FakeHost::new("sibling", [Some("vfio-pci"), Some("e1000e")]);
    let e = host.check("0000:01:00.0").unwrap_err();
    assert_eq!(
        e.to_string(),
        "IOMMU group 7 is not viable: 0000:01:00.1 is bound to e1000e; every device in \
         the group must be bound to vfio-pci or to no driver"
    );

    let host = FakeHost::new("nodes", [Some("vfio-pci"), Some("pci-stub")]);
    std::fs::remove_file(host.root.join("dev/vfio/7")).unwrap();
    assert!(matches!(
        host.check("0000:01:00.0"),
        Err(VfioSetupError::NoGroupNode(7))
    ));
    std::fs::remove_file(host.root.join("dev/vfio/vfio")).unwrap();
    let e = host.check("0000:01:00.0").unwrap_err();
    assert!(e.to_string().contains("load the vfio-pci module"), "{e}");
    std::fs::remove_file(host.root.join("devices/0000:01:00.0/iommu_group")).unwrap();
    let e = host.check("0000:01:00.0").unwrap_err();
    assert!(
        e.to_string()
            .contains("has no IOMMU group: the host IOMMU is off"),
        "{e}"
    );
}
