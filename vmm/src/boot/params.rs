//! The structures a kernel reads at entry: the Linux zero page
//! (`boot_params`) or PVH's `hvm_start_info` with its memory map and
//! module list.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::e820::E820Entry;
use super::BootError;
use crate::arch::{
    CMDLINE_START, PVH_AREA_END, PVH_INFO_START, PVH_MEMMAP_START, PVH_MODLIST_START,
    ZERO_PAGE_START,
};
use crate::memory::GuestMemoryMmap;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Setup header `boot_flag`.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// Setup header `header`: "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a boot loader without an assigned ID.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Physical alignment a relocatable vmlinux is built for.
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;

/// What both protocols pass besides the memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootArgs {
    /// Length of the command line at [`CMDLINE_START`], without the NUL.
    pub cmdline_len: usize,
    /// Initramfs location and size, if any.
    pub initramfs: Option<(u64, u64)>,
    /// Guest address of the ACPI RSDP, if the tables were written.
    pub rsdp: Option<u64>,
}

/// Writes the zero page at [`ZERO_PAGE_START`]. `header` is the bzImage's
/// setup header, or `None` for an ELF vmlinux (which has none, so a
/// minimal one is made up).
pub fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    args: &BootArgs,
    map: &[E820Entry],
) -> Result<(), BootError> {
    let mut params = boot_params {
        hdr: header.unwrap_or_else(|| setup_header {
            boot_flag: KERNEL_BOOT_FLAG_MAGIC,
            header: KERNEL_HDR_MAGIC,
            kernel_alignment: KERNEL_MIN_ALIGNMENT_BYTES,
            ..Default::default()
        }),
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    if header.is_none() {
        // Only ours to fill in for a made-up header; a bzImage states its
        // own limit here.
        params.hdr.cmdline_size = args.cmdline_len as u32;
    }
    if let Some((addr, size)) = args.initramfs {
        // Placed below the 32-bit hole, so both fit in 32 bits.
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    params.acpi_rsdp_addr = args.rsdp.unwrap_or(0);
    if map.len() > params.e820_table.len() {
        return Err(BootError::TooManyMemoryMapEntries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::BootParams)
}

/// Writes `hvm_start_info` at [`PVH_INFO_START`] with the memory map and
/// the initramfs as module 0.
pub fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    args: &BootArgs,
    map: &[E820Entry],
) -> Result<(), BootError> {
    let max_entries =
        (PVH_AREA_END - PVH_MEMMAP_START) as usize / std::mem::size_of::<hvm_memmap_table_entry>();
    if map.len() > max_entries {
        return Err(BootError::TooManyMemoryMapEntries(map.len()));
    }
    let memmap: Vec<hvm_memmap_table_entry> = map
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: args.rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    if args.initramfs.is_some() {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    if let Some((paddr, size)) = args.initramfs {
        let module = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::BootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::e820::memory_map;
    use vm_allocator::layout::{ram_layout, MIB};
    use vm_memory::Bytes;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    #[test]
    fn zero_page_for_elf() {
        let m = mem();
        let map = memory_map(&ram_layout(16 * MIB).unwrap());
        let args = BootArgs {
            cmdline_len: 11,
            initramfs: Some((0x80_0000, 0x1234)),
            rsdp: Some(0xe0000),
        };
        write_zero_page(&m, None, &args, &map).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ hdr.cmdline_size }, 11);
        assert_eq!({ hdr.ramdisk_image }, 0x80_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(usize::from(p.e820_entries), map.len());
        let first = p.e820_table[0];
        assert_eq!(
            ({ first.addr }, { first.size }, { first.r#type }),
            (0, 0x9fc00, 1)
        );
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let m = mem();
        let map = memory_map(&ram_layout(16 * MIB).unwrap());
        let header = setup_header {
            version: 0x020f,
            cmdline_size: 2047,
            ..Default::default()
        };
        let args = BootArgs {
            cmdline_len: 4,
            initramfs: None,
            rsdp: None,
        };
        write_zero_page(&m, Some(header), &args, &map).unwrap();
        let p: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.version }, 0x020f);
        assert_eq!({ p.hdr.cmdline_size }, 2047);
        assert_eq!({ p.hdr.ramdisk_image }, 0);
        assert_eq!(p.hdr.type_of_loader, 0xff);
    }

    #[test]
    fn pvh_start_info() {
        let m = mem();
        let map = memory_map(&ram_layout(16 * MIB).unwrap());
        let args = BootArgs {
            cmdline_len: 3,
            initramfs: Some((0x90_0000, 0x2000)),
            rsdp: Some(0xe0000),
        };
        write_pvh_start_info(&m, &args, &map).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.nr_modules, 1);
        assert_eq!(info.modlist_paddr, PVH_MODLIST_START);
        assert_eq!(info.cmdline_paddr, CMDLINE_START);
        assert_eq!(info.rsdp_paddr, 0xe0000);
        assert_eq!(info.memmap_entries as usize, map.len());
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (0x90_0000, 0x2000));
        let e: hvm_memmap_table_entry = m.read_obj(GuestAddress(PVH_MEMMAP_START + 24)).unwrap();
        assert_eq!((e.addr, e.type_), (0xe0000, 2));
    }

    #[test]
    fn pvh_without_initramfs_has_no_modules() {
        let m = mem();
        let map = memory_map(&ram_layout(16 * MIB).unwrap());
        let args = BootArgs {
            cmdline_len: 0,
            initramfs: None,
            rsdp: None,
        };
        write_pvh_start_info(&m, &args, &map).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!((info.nr_modules, info.modlist_paddr), (0, 0));
    }
}
