//! Loader tests with synthetic images (no KVM needed).

use std::io::Cursor;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::hvm_start_info;
use vm_allocator::layout::{ram_layout, MIB};
use vm_memory::Bytes;

use super::*;
use crate::arch::regs::BootEntry;

#[path = "../../tests/common/elf.rs"]
mod elf;
use elf::{bzimage, ElfBuilder};

const RAM: u64 = 64 * MIB;

fn setup() -> (GuestMemoryMmap, RamLayout) {
    crate::memory::create_guest_memory(RAM).unwrap()
}

fn boot(image: Vec<u8>, initramfs: Option<Vec<u8>>, cmdline: &str) -> Result<BootInfo, BootError> {
    let (mem, layout) = setup();
    boot_in(&mem, &layout, image, initramfs, cmdline)
}

fn boot_in(
    mem: &GuestMemoryMmap,
    layout: &RamLayout,
    image: Vec<u8>,
    initramfs: Option<Vec<u8>>,
    cmdline: &str,
) -> Result<BootInfo, BootError> {
    let mut k = Cursor::new(image);
    let mut i = initramfs.map(Cursor::new);
    load(mem, layout, &mut k, i.as_mut(), cmdline, Some(0xe0000))
}

const CODE: &[u8] = &[0xf4, 0xeb, 0xfd]; // hlt; jmp $-1

#[test]
fn empty_file() {
    assert!(matches!(
        boot(vec![], None, ""),
        Err(BootError::EmptyKernel)
    ));
}

#[test]
fn garbage_is_not_a_kernel() {
    for image in [
        vec![0x42],
        vec![0u8; 3],
        vec![0xa5; 4096],
        b"MZ\x90\0".to_vec(),
    ] {
        let e = boot(image, None, "").unwrap_err();
        assert!(matches!(e, BootError::NotAKernel), "{e}");
        assert_eq!(
            e.to_string(),
            "the kernel image is neither an ELF vmlinux nor a bzImage"
        );
    }
}

#[test]
fn elf_magic_alone_is_rejected() {
    let e = boot(b"\x7fELF\x02\x01".to_vec(), None, "").unwrap_err();
    assert!(matches!(e, BootError::UnsupportedElf(_)), "{e}");
}

#[test]
fn elf_for_wrong_machine_or_class() {
    let mut b = ElfBuilder::new(0x10_0000).segment(0x10_0000, CODE);
    b.class = 1;
    let e = boot(b.build(), None, "").unwrap_err();
    assert_eq!(e.to_string(), "unsupported ELF kernel: not a 64-bit ELF");
    b.class = 2;
    b.machine = 183; // aarch64
    let e = boot(b.build(), None, "").unwrap_err();
    assert_eq!(e.to_string(), "unsupported ELF kernel: not an x86-64 ELF");
}

#[test]
fn truncated_elf() {
    let full = ElfBuilder::new(0x10_0000)
        .segment(0x10_0000, &[0x90; 4096])
        .build();
    // Cut inside the program headers, then inside the segment data.
    for cut in [80, full.len() - 100] {
        let e = boot(full[..cut].to_vec(), None, "").unwrap_err();
        assert!(matches!(e, BootError::TruncatedKernel(_)), "cut {cut}: {e}");
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}

#[test]
fn elf_segments_must_be_in_usable_ram() {
    for addr in [0x7000, RAM - 2, 0xc000_0000, u64::MAX - 1] {
        let image = ElfBuilder::new(0x10_0000).segment(addr, CODE).build();
        let e = boot(image, None, "").unwrap_err();
        assert!(
            matches!(e, BootError::SegmentOutsideRam { .. }),
            "{addr:#x}: {e}"
        );
    }
    let image = ElfBuilder::new(0x10_0000).build();
    assert!(matches!(
        boot(image, None, ""),
        Err(BootError::UnsupportedElf("no loadable segment"))
    ));
}

#[test]
fn elf_entry_must_be_in_ram() {
    let image = ElfBuilder::new(0x50_0000_0000)
        .segment(0x10_0000, CODE)
        .build();
    assert!(matches!(
        boot(image, None, ""),
        Err(BootError::EntryOutsideRam(0x50_0000_0000))
    ));
}

#[test]
fn elf_vmlinux_uses_the_64bit_protocol() {
    let (mem, layout) = setup();
    let image = ElfBuilder::new(0x20_0010)
        .segment(0x20_0000, &[0xab; 0x20])
        .build();
    let info = boot_in(&mem, &layout, image, None, "console=ttyS0 quiet").unwrap();
    assert_eq!(
        info.entry,
        BootEntry::Linux64 {
            entry: 0x20_0010,
            boot_params: ZERO_PAGE_START
        }
    );
    assert_eq!(
        info.kernel.kind,
        KernelKind::ElfLinux64 { entry: 0x20_0010 }
    );
    assert_eq!((info.kernel.start, info.kernel.end), (0x20_0000, 0x20_0020));
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_001f)).unwrap(), 0xab);
    let mut cmdline = [0u8; 20];
    mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_START))
        .unwrap();
    assert_eq!(&cmdline, b"console=ttyS0 quiet\0");
    let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_START as u32);
    assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
    assert!(p.e820_entries > 3);
}

#[test]
fn elf_with_pvh_note_uses_pvh() {
    let (mem, layout) = setup();
    let image = ElfBuilder::new(0x100_0000)
        .segment(0x10_0000, CODE)
        .pvh(0x10_0000)
        .build();
    let info = boot_in(&mem, &layout, image, Some(vec![7; 5000]), "x").unwrap();
    assert_eq!(
        info.entry,
        BootEntry::Pvh {
            entry: 0x10_0000,
            start_info: PVH_INFO_START as u32
        }
    );
    let start: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!(start.magic, params::XEN_HVM_START_MAGIC_VALUE);
    assert_eq!(start.nr_modules, 1);
    // The initramfs sits at the top of RAM, page aligned.
    let (addr, size) = info.initramfs.unwrap();
    assert_eq!(size, 5000);
    assert_eq!(addr, (RAM - 5000) / 4096 * 4096);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(addr + 4999)).unwrap(), 7);
}

#[test]
fn bzimage_uses_its_64bit_entry() {
    let (mem, layout) = setup();
    let image = bzimage(0x020f, 1, 0x40_0000, &[0xcc; 0x1000]);
    let info = boot_in(&mem, &layout, image, Some(vec![1; 100]), "root=/dev/vda").unwrap();
    assert_eq!(
        info.entry,
        BootEntry::Linux64 {
            entry: 0x10_0200,
            boot_params: ZERO_PAGE_START
        }
    );
    // init_size covers more than the file: the kernel ends there.
    assert_eq!((info.kernel.start, info.kernel.end), (0x10_0000, 0x50_0000));
    let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
    assert_eq!({ p.hdr.version }, 0x020f);
    assert_eq!(p.hdr.type_of_loader, 0xff);
    assert_eq!({ p.hdr.cmdline_size }, 2047);
    let (addr, size) = info.initramfs.unwrap();
    assert_eq!(
        ({ p.hdr.ramdisk_image }, { p.hdr.ramdisk_size }),
        (addr as u32, 100)
    );
    assert_eq!(size, 100);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0fff)).unwrap(), 0xcc);
}

#[test]
fn relocatable_bzimage_reserves_its_decompression_area() {
    let mut image = bzimage(0x020f, 1, 0x200_0000, &[0xcc; 0x1000]);
    image[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes()); // kernel_alignment
    image[0x234] = 1; // relocatable_kernel
    image[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
    let info = boot(image.clone(), Some(vec![1; 100]), "").unwrap();
    // Decompression happens at pref_address (16 MiB), for init_size bytes.
    assert_eq!(
        (info.kernel.start, info.kernel.end),
        (0x10_0000, 0x300_0000)
    );
    assert!(info.initramfs.unwrap().0 >= 0x300_0000);
    // Loaded at 1 MiB it would fit in 40 MiB; at 16 MiB it does not.
    let (mem, layout) = crate::memory::create_guest_memory(40 * MIB).unwrap();
    let e = boot_in(&mem, &layout, image, None, "").unwrap_err();
    assert!(
        matches!(
            e,
            BootError::KernelTooLarge {
                end: 0x300_0000,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn bzimage_without_64bit_entry_is_rejected() {
    for (version, xlf) in [(0x020f, 0), (0x0208, 1)] {
        let e = boot(bzimage(version, xlf, 0, &[0; 512]), None, "").unwrap_err();
        assert!(matches!(e, BootError::BzImageNot64Bit { .. }), "{e}");
    }
}

#[test]
fn bzimage_too_large_for_ram() {
    let e = boot(bzimage(0x020f, 1, 0x1000_0000, &[0; 512]), None, "").unwrap_err();
    assert!(matches!(e, BootError::KernelTooLarge { .. }), "{e}");
}

#[test]
fn truncated_bzimage() {
    let image = bzimage(0x020f, 1, 0, &[]);
    // Shorter than its own setup sectors.
    let e = boot(image[..0x300].to_vec(), None, "").unwrap_err();
    assert!(matches!(e, BootError::TruncatedKernel(_)), "{e}");
}

#[test]
fn cmdline_limits() {
    let image = || bzimage(0x020f, 1, 0, &[0; 512]);
    let long = "a".repeat(2047);
    assert!(boot(image(), None, &long).is_ok());
    let e = boot(image(), None, &"a".repeat(2048)).unwrap_err();
    assert!(
        matches!(e, BootError::Cmdline { capacity: 2048, .. }),
        "{e}"
    );
    let e = boot(image(), None, "bad\0arg").unwrap_err();
    assert!(matches!(e, BootError::Cmdline { .. }), "{e}");
}

#[test]
fn initramfs_errors() {
    let image = || ElfBuilder::new(0x10_0000).segment(0x10_0000, CODE).build();
    assert!(matches!(
        boot(image(), Some(vec![]), ""),
        Err(BootError::EmptyInitramfs)
    ));
    let e = boot(image(), Some(vec![0; RAM as usize]), "").unwrap_err();
    assert!(matches!(e, BootError::InitramfsTooLarge { .. }), "{e}");
}

#[test]
fn initramfs_placement() {
    // Highest page-aligned spot under the limit.
    assert_eq!(
        place_initramfs(0x1000, 0x20_0000, 0x100_0000).unwrap(),
        0xff_f000
    );
    assert_eq!(
        place_initramfs(0x1001, 0x20_0000, 0x100_0000).unwrap(),
        0xff_e000
    );
    // Exactly fills the space above the (rounded-up) kernel end.
    assert_eq!(
        place_initramfs(0x1000, 0x20_0001, 0x20_2000).unwrap(),
        0x20_1000
    );
    assert!(place_initramfs(0x1001, 0x20_0001, 0x20_2000).is_err());
    assert!(place_initramfs(u64::MAX, 0, 0x1000).is_err());
    assert!(place_initramfs(1, u64::MAX, u64::MAX).is_err());
}

#[test]
fn missing_files_name_the_path() {
    let (mem, layout) = setup();
    let e = load_from_files(
        &mem,
        &layout,
        Path::new("/nonexistent/vmlinux"),
        None,
        "",
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
}

#[test]
fn kernel_in_a_tiny_guest_still_fits_its_tables() {
    let layout = ram_layout(4 * MIB).unwrap();
    let (mem, _) = crate::memory::create_guest_memory(4 * MIB).unwrap();
    let image = ElfBuilder::new(0x10_0000).segment(0x10_0000, CODE).build();
    boot_in(&mem, &layout, image, None, "").unwrap();
}
