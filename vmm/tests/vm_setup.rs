//! `Vm` construction and `setup` against the host's /dev/kvm: bad kernels
//! and configurations, the ACPI tables and boot structures as the guest
//! finds them, and KVM memory slots.

mod common;

use std::sync::{Arc, Mutex};

use common::elf::ElfBuilder;
use common::*;
use devices::acpi_pm::AcpiPmDevice;
use linux_loader::loader::elf::start_info::hvm_start_info;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm::boot::BootError;
use vmm::memory::MemoryError;
use vmm::vm::{Vm, VmError, VmExitStatus};
use vmm_sys_util::eventfd::EventFd;

fn setup_error(image: &[u8]) -> VmError {
    let mut t = build_vm(image, 32 * MIB, 1, "");
    t.vm.setup(&t.devices).unwrap_err()
}

#[test]
fn garbage_kernels_are_clear_errors() {
    let e = setup_error(&[]);
    assert!(matches!(e, VmError::Boot(BootError::EmptyKernel)), "{e}");
    assert_eq!(e.to_string(), "the kernel image is empty");

    let e = setup_error(&[0x5a; 8192]);
    assert!(matches!(e, VmError::Boot(BootError::NotAKernel)), "{e}");

    let image = pvh_image();
    let e = setup_error(&image[..100]);
    assert!(
        matches!(e, VmError::Boot(BootError::TruncatedKernel(_))),
        "{e}"
    );
    assert!(
        e.to_string().starts_with("the kernel image is truncated"),
        "{e}"
    );
}

#[test]
fn missing_kernel_file_names_the_path() {
    require_kvm();
    let mut vm = Vm::new(config(
        std::path::Path::new("/nonexistent/bzImage"),
        32 * MIB,
        1,
        "",
    ))
    .unwrap();
    let e = vm.setup(&bare_devices()).unwrap_err();
    assert!(e.to_string().contains("/nonexistent/bzImage"), "{e}");
}

#[test]
fn invalid_configurations() {
    require_kvm();
    let kernel = TempFile::new(&pvh_image());
    for vcpus in [0, 255] {
        let e = Vm::new(config(&kernel.0, 32 * MIB, vcpus, "")).unwrap_err();
        assert!(matches!(e, VmError::InvalidVcpuCount { .. }), "{e}");
    }
    let e = Vm::new(config(&kernel.0, MIB, 1, "")).unwrap_err();
    assert!(
        matches!(e, VmError::Memory(MemoryError::InvalidRamSize { .. })),
        "{e}"
    );
}

#[test]
fn acpi_pm_port_must_be_free() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 1, "p");
    let dummy = AcpiPmDevice::new(EventFd::new(0).unwrap(), EventFd::new(0).unwrap());
    t.devices
        .io_bus
        .insert(Arc::new(Mutex::new(dummy)), 0x602, 1)
        .unwrap();
    let e = t.vm.setup(&t.devices).unwrap_err();
    assert!(matches!(e, VmError::AcpiPmDevice(_)), "{e}");
}

fn read(mem: &vmm::memory::GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

#[test]
fn guest_finds_acpi_tables_from_start_info() {
    let mut t = build_vm(&pvh_image(), 64 * MIB, 2, "p");
    t.vm.setup(&t.devices).unwrap();
    let mem = t.vm.guest_memory().memory();

    let start: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).unwrap();
    let rsdp = read(&mem, start.rsdp_paddr, 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(rsdp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    let xsdt_addr = u64_at(&rsdp, 24);
    let xsdt_len = u32_at(&read(&mem, xsdt_addr, 8), 4) as usize;
    let xsdt = read(&mem, xsdt_addr, xsdt_len);
    let mut sigs = Vec::new();
    let mut fadt = Vec::new();
    for i in 0..(xsdt_len - 36) / 8 {
        let addr = u64_at(&xsdt, 36 + 8 * i);
        let len = u32_at(&read(&mem, addr, 8), 4) as usize;
        let table = read(&mem, addr, len);
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        sigs.push(String::from_utf8_lossy(&table[..4]).into_owned());
        if &table[..4] == b"FACP" {
            fadt = table;
        }
    }
    assert_eq!(sigs, ["FACP", "APIC", "MCFG"]);
    let dsdt = read(&mem, u64_at(&fadt, 140), 4);
    assert_eq!(&dsdt, b"DSDT");

    // The memory map the guest gets: RAM at 0 and from 1 MiB, the ACPI
    // area reserved.
    let entries: Vec<(u64, u64, u32)> = (0..start.memmap_entries as u64)
        .map(|i| {
            let e = read(&mem, start.memmap_paddr + 24 * i, 24);
            (u64_at(&e, 0), u64_at(&e, 8), u32_at(&e, 16))
        })
        .collect();
    assert_eq!(entries[0], (0, 0x9fc00, 1));
    assert_eq!(entries[1], (0xe0000, 0x20000, 2));
    assert_eq!(entries[2], (0x10_0000, 63 * MIB, 1));
    assert!(entries.contains(&(0xe000_0000, 0x1000_0000, 2)));
}

#[test]
fn initramfs_reaches_the_guest_through_pvh_modules() {
    require_kvm();
    let kernel = TempFile::new(&pvh_image());
    let initramfs = TempFile::new(&[0xa5; 10_000]);
    let mut cfg = config(&kernel.0, 64 * MIB, 1, "p");
    cfg.initramfs = Some(initramfs.0.clone());
    let mut vm = Vm::new(cfg).unwrap();
    let boot = vm.setup(&bare_devices()).unwrap().clone();
    let (addr, size) = boot.initramfs.unwrap();
    assert_eq!(size, 10_000);
    assert_eq!(addr % 4096, 0);
    assert!(addr + size <= 64 * MIB);
    let mem = vm.guest_memory().memory();
    let start: hvm_start_info = mem.read_obj(GuestAddress(0x6000)).unwrap();
    assert_eq!(start.nr_modules, 1);
    assert_eq!(u64_at(&read(&mem, start.modlist_paddr, 8), 0), addr);
    assert_eq!(read(&mem, addr + size - 1, 1), [0xa5]);
}

/// Anonymous host memory for a device slot.
struct HostPages {
    ptr: *mut libc::c_void,
    len: usize,
}

impl HostPages {
    fn new(len: usize) -> Self {
        // SAFETY: a fresh private anonymous mapping; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        HostPages { ptr, len }
    }

    fn addr(&self) -> u64 {
        self.ptr as u64
    }

    fn u32_at(&self, offset: usize) -> u32 {
        assert!(offset + 4 <= self.len);
        // SAFETY: in bounds of our mapping; volatile as the guest writes it.
        unsafe { std::ptr::read_volatile(self.ptr.cast::<u8>().add(offset).cast::<u32>()) }
    }

    fn set_u32(&self, offset: usize, v: u32) {
        assert!(offset + 4 <= self.len);
        // SAFETY: in bounds of our mapping.
        unsafe { std::ptr::write_volatile(self.ptr.cast::<u8>().add(offset).cast::<u32>(), v) }
    }
}

/// Maps `size` bytes of `pages` from `offset` into the guest at `base`.
fn add_slot(
    mm: &vmm::memory::MemoryManager,
    base: u64,
    size: u64,
    pages: &HostPages,
    offset: u64,
) -> Result<u32, MemoryError> {
    assert!(offset + size <= pages.len as u64);
    // SAFETY: the range lies inside `pages`, and every test keeps `pages`
    // mapped until it has removed the slots made from it.
    unsafe { mm.add_slot(base, size, pages.addr() + offset, 0) }
}

impl Drop for HostPages {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

#[test]
fn extra_memory_slot_is_seen_by_the_guest() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 1, "m");
    let pages = HostPages::new(0x2000);
    pages.set_u32(0, 0x1234_5678);
    let slot = add_slot(t.vm.memory(), 0xd000_0000, 0x2000, &pages, 0).unwrap();
    assert_eq!(t.run(TIMEOUT).unwrap(), VmExitStatus::PowerOff);
    assert_eq!(t.serial.text(), "PVH OK m\n12345678\n");
    assert_eq!(pages.u32_at(4), 0xc0ff_ee00);
    t.vm.memory().remove_slot(slot).unwrap();
}

#[test]
fn memory_slots_above_and_below_the_hole() {
    require_kvm();
    let kernel = TempFile::new(&pvh_image());
    // 3.5 GiB: split into two RAM slots (reserved, not committed).
    let vm = Vm::new(config(&kernel.0, 3 * GIB + 512 * MIB, 1, "")).unwrap();
    let mm = vm.memory();
    let slots = mm.slots();
    assert_eq!(slots.len(), 2);
    assert_eq!(
        (slots[0].guest_phys_addr, slots[0].memory_size),
        (0, 3 * GIB)
    );
    assert_eq!(
        (slots[1].guest_phys_addr, slots[1].memory_size),
        (4 * GIB, 512 * MIB)
    );
    assert!(slots.iter().all(|s| s.is_ram));
    assert_eq!(vm.ram_end(), 4 * GIB + 512 * MIB);

    let pages = HostPages::new(0x4000);
    // Overlapping RAM, unaligned, empty: refused before KVM sees them.
    let e = add_slot(mm, 3 * GIB - 0x1000, 0x2000, &pages, 0).unwrap_err();
    assert!(matches!(e, MemoryError::SlotOverlap { slot: 0, .. }), "{e}");
    let e = add_slot(mm, 0xd000_0800, 0x1000, &pages, 0).unwrap_err();
    assert!(matches!(e, MemoryError::InvalidSlotRange { .. }), "{e}");
    let e = add_slot(mm, 0xd000_0000, 0, &pages, 0).unwrap_err();
    assert!(matches!(e, MemoryError::InvalidSlotRange { .. }), "{e}");

    let a = add_slot(mm, 0xd000_0000, 0x2000, &pages, 0).unwrap();
    let b = add_slot(mm, 0xd000_2000, 0x2000, &pages, 0x2000).unwrap();
    assert_eq!((a, b), (2, 3));
    assert!(matches!(mm.remove_slot(0), Err(MemoryError::RamSlot(0))));
    mm.remove_slot(a).unwrap();
    assert!(matches!(
        mm.remove_slot(a),
        Err(MemoryError::UnknownSlot(2))
    ));
    // The freed number is reused.
    let c = add_slot(mm, 0xd000_0000, 0x1000, &pages, 0).unwrap();
    assert_eq!(c, 2);
    mm.remove_slot(b).unwrap();
    mm.remove_slot(c).unwrap();
    assert_eq!(mm.slots().len(), 2);
}

#[test]
fn elf_segment_in_the_hole_is_refused() {
    let image = ElfBuilder::new(0xd000_0000)
        .segment(0xd000_0000, &[0xf4])
        .pvh(0xd000_0000)
        .build();
    let e = setup_error(&image);
    assert!(
        matches!(e, VmError::Boot(BootError::SegmentOutsideRam { .. })),
        "{e}"
    );
}
