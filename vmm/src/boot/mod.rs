//! Putting a kernel, its command line and initramfs into guest memory, and
//! the boot protocol structures that describe them.
//!
//! Supported images:
//! - bzImage: loaded at its `code32_start` (1 MiB), entered through the
//!   64-bit boot protocol with a zero page;
//! - ELF vmlinux with a PVH note: entered at the note's 32-bit entry with
//!   `hvm_start_info` (PVH is preferred when the note is there);
//! - ELF vmlinux without one: entered at `e_entry` through the 64-bit boot
//!   protocol with a zero page.
//!
//! The initramfs goes as high as the kernel allows (below
//! `initrd_addr_max` for a bzImage, below the 32-bit hole otherwise),
//! 4 KiB aligned, and above everything the kernel occupies.

pub mod e820;
mod loader;
pub mod params;

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::load_cmdline;
use log::info;
use thiserror::Error;
use vm_allocator::layout::RamLayout;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, ReadVolatile};

pub use loader::{KernelKind, LoadedKernel};

use crate::arch::regs::{write_boot_tables, BootEntry, BootTablesError};
use crate::arch::{CMDLINE_MAX_SIZE, CMDLINE_START, PVH_INFO_START, ZERO_PAGE_START};
use crate::memory::{GuestMemoryMmap, PAGE_SIZE};
use params::BootArgs;

/// Boot protocol 2.03 introduced `initrd_addr_max`.
const PROTOCOL_2_03: u16 = 0x0203;
/// Boot protocol 2.06 introduced `cmdline_size`.
const PROTOCOL_2_06: u16 = 0x0206;
/// `initrd_addr_max` of kernels too old to state one.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Command line limit of kernels too old to state one (with the NUL).
const DEFAULT_CMDLINE_CAPACITY: usize = 256;

/// Errors loading a kernel and preparing its boot.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file could not be opened.
    #[error("cannot open kernel {path}: {source}")]
    OpenKernel {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the kernel file failed.
    #[error("cannot read the kernel image: {0}")]
    ReadKernel(#[source] std::io::Error),
    /// The kernel file is empty.
    #[error("the kernel image is empty")]
    EmptyKernel,
    /// Neither an ELF nor a bzImage.
    #[error("the kernel image is neither an ELF vmlinux nor a bzImage")]
    NotAKernel,
    /// An ELF we cannot boot.
    #[error("unsupported ELF kernel: {0}")]
    UnsupportedElf(&'static str),
    /// The image ends early or a header points past its end.
    #[error("the kernel image is truncated or corrupt: {0}")]
    TruncatedKernel(#[source] linux_loader::loader::Error),
    /// linux-loader rejected the image.
    #[error("cannot load the kernel image: {0}")]
    Loader(#[source] linux_loader::loader::Error),
    /// An ELF segment lies outside the RAM a kernel may use.
    #[error(
        "kernel segment {addr:#x}+{size:#x} is outside usable RAM {ram_start:#x}..{ram_end:#x}"
    )]
    SegmentOutsideRam {
        /// Segment physical address.
        addr: u64,
        /// Segment size in memory.
        size: u64,
        /// Lowest address a kernel may use.
        ram_start: u64,
        /// End of RAM below the 32-bit hole.
        ram_end: u64,
    },
    /// The entry point is not in guest RAM.
    #[error("kernel entry point {0:#x} is not in usable guest RAM")]
    EntryOutsideRam(u64),
    /// A bzImage without the 64-bit entry point.
    #[error("bzImage (boot protocol {version:#x}) has no 64-bit entry point; protocol 2.12+ with XLF_KERNEL_64 is required")]
    BzImageNot64Bit {
        /// Boot protocol version of the image.
        version: u16,
    },
    /// The kernel (with its decompression area) does not fit.
    #[error(
        "the kernel needs memory up to {end:#x} but RAM below the 32-bit hole ends at {ram_end:#x}"
    )]
    KernelTooLarge {
        /// End of what the kernel needs.
        end: u64,
        /// End of low RAM.
        ram_end: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line (at most {capacity} bytes including the NUL): {source}")]
    Cmdline {
        /// The limit that applied.
        capacity: usize,
        /// The parse error.
        #[source]
        source: linux_loader::cmdline::Error,
    },
    /// Writing the command line to guest memory failed.
    #[error("cannot write the kernel command line: {0}")]
    LoadCmdline(#[source] linux_loader::loader::Error),
    /// The initramfs file could not be opened.
    #[error("cannot open initramfs {path}: {source}")]
    OpenInitramfs {
        /// The path given.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// Reading the initramfs failed.
    #[error("cannot read the initramfs: {0}")]
    ReadInitramfs(#[source] std::io::Error),
    /// The initramfs is empty.
    #[error("the initramfs is empty")]
    EmptyInitramfs,
    /// No room for the initramfs between the kernel and its limit.
    #[error("initramfs of {size:#x} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitramfsTooLarge {
        /// Initramfs size.
        size: u64,
        /// End of the kernel.
        kernel_end: u64,
        /// Highest address (exclusive) it may reach.
        limit: u64,
    },
    /// Copying the initramfs into guest memory failed.
    #[error("cannot copy the initramfs into guest memory: {0}")]
    LoadInitramfs(#[source] GuestMemoryError),
    /// Too many memory map entries for the boot protocol.
    #[error("{0} memory map entries do not fit the boot protocol's table")]
    TooManyMemoryMapEntries(usize),
    /// Writing the zero page or start info failed.
    #[error("cannot write the boot parameters: {0}")]
    BootParams(#[source] linux_loader::configurator::Error),
    /// Writing GDT/IDT/page tables failed.
    #[error(transparent)]
    BootTables(#[from] BootTablesError),
}

/// Everything that was placed in guest memory, and how to enter it.
#[derive(Clone, Debug, PartialEq)]
pub struct BootInfo {
    /// Register state to start the boot vCPU with.
    pub entry: BootEntry,
    /// The kernel.
    pub kernel: LoadedKernel,
    /// Initramfs address and size, if any.
    pub initramfs: Option<(u64, u64)>,
    /// The command line as written (at [`CMDLINE_START`]).
    pub cmdline: CString,
}

/// Opens the files and calls [`load`].
pub fn load_from_files(
    mem: &GuestMemoryMmap,
    layout: &RamLayout,
    kernel: &Path,
    initramfs: Option<&Path>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<BootInfo, BootError> {
    let mut kernel_file = File::open(kernel).map_err(|source| BootError::OpenKernel {
        path: kernel.to_path_buf(),
        source,
    })?;
    let mut initramfs_file = initramfs
        .map(|path| {
            File::open(path).map_err(|source| BootError::OpenInitramfs {
                path: path.to_path_buf(),
                source,
            })
        })
        .transpose()?;
    load(
        mem,
        layout,
        &mut kernel_file,
        initramfs_file.as_mut(),
        cmdline,
        rsdp,
    )
}

/// Loads `kernel` (and `initramfs`) into `mem`, writes the command line,
/// the boot protocol structures with the memory map of `layout`, and the
/// boot GDT/page tables. `rsdp` is passed to the guest if ACPI tables were
/// (or will be) written.
pub fn load<K, I>(
    mem: &GuestMemoryMmap,
    layout: &RamLayout,
    kernel: &mut K,
    initramfs: Option<&mut I>,
    cmdline: &str,
    rsdp: Option<u64>,
) -> Result<BootInfo, BootError>
where
    K: Read + Seek + ReadVolatile,
    I: Read + Seek + ReadVolatile,
{
    let low_ram_end = layout.below_hole.end();
    let loaded = loader::load_kernel(mem, kernel, low_ram_end)?;
    info!(
        "kernel loaded at {:#x}..{:#x} ({:?})",
        loaded.start, loaded.end, loaded.kind
    );

    let (capacity, initramfs_limit) = match &loaded.kind {
        KernelKind::BzImage { header, .. } => {
            let version = header.version;
            let capacity = if version >= PROTOCOL_2_06 {
                (header.cmdline_size as usize).saturating_add(1)
            } else {
                DEFAULT_CMDLINE_CAPACITY
            };
            let addr_max = if version >= PROTOCOL_2_03 {
                u64::from(header.initrd_addr_max)
            } else {
                DEFAULT_INITRD_ADDR_MAX
            };
            (
                capacity.min(CMDLINE_MAX_SIZE),
                (addr_max + 1).min(low_ram_end),
            )
        }
        _ => (CMDLINE_MAX_SIZE, low_ram_end),
    };
    let cmdline = write_cmdline(mem, cmdline, capacity)?;

    let initramfs = match initramfs {
        Some(file) => Some(load_initramfs(mem, file, loaded.end, initramfs_limit)?),
        None => None,
    };

    let args = BootArgs {
        cmdline_len: cmdline.as_bytes().len(),
        initramfs,
        rsdp,
    };
    let map = e820::memory_map(layout);
    let entry = match loaded.kind {
        KernelKind::BzImage { header, entry } => {
            params::write_zero_page(mem, Some(header), &args, &map)?;
            BootEntry::Linux64 {
                entry,
                boot_params: ZERO_PAGE_START,
            }
        }
        KernelKind::ElfLinux64 { entry } => {
            params::write_zero_page(mem, None, &args, &map)?;
            BootEntry::Linux64 {
                entry,
                boot_params: ZERO_PAGE_START,
            }
        }
        KernelKind::ElfPvh { entry } => {
            params::write_pvh_start_info(mem, &args, &map)?;
            BootEntry::Pvh {
                entry,
                start_info: PVH_INFO_START as u32,
            }
        }
    };
    write_boot_tables(mem, &entry)?;
    Ok(BootInfo {
        entry,
        kernel: loaded,
        initramfs,
        cmdline,
    })
}

fn write_cmdline(
    mem: &GuestMemoryMmap,
    cmdline: &str,
    capacity: usize,
) -> Result<CString, BootError> {
    let cl = Cmdline::try_from(cmdline, capacity)
        .map_err(|source| BootError::Cmdline { capacity, source })?;
    let cstring = cl
        .as_cstring()
        .map_err(|source| BootError::Cmdline { capacity, source })?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).map_err(BootError::LoadCmdline)?;
    Ok(cstring)
}

/// Where an initramfs of `size` bytes goes: the highest page-aligned
/// address whose end is at most `limit`, if that is at or above the
/// page-aligned `kernel_end`.
fn place_initramfs(size: u64, kernel_end: u64, limit: u64) -> Result<u64, BootError> {
    let lowest = kernel_end.checked_next_multiple_of(PAGE_SIZE);
    let highest = limit
        .checked_sub(size)
        .map(|top| top / PAGE_SIZE * PAGE_SIZE);
    match (lowest, highest) {
        (Some(lo), Some(hi)) if hi >= lo => Ok(hi),
        _ => Err(BootError::InitramfsTooLarge {
            size,
            kernel_end,
            limit,
        }),
    }
}

fn load_initramfs<I>(
    mem: &GuestMemoryMmap,
    file: &mut I,
    kernel_end: u64,
    limit: u64,
) -> Result<(u64, u64), BootError>
where
    I: Read + Seek + ReadVolatile,
{
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(BootError::ReadInitramfs)?;
    if size == 0 {
        return Err(BootError::EmptyInitramfs);
    }
    file.seek(SeekFrom::Start(0))
        .map_err(BootError::ReadInitramfs)?;
    let addr = place_initramfs(size, kernel_end, limit)?;
    let len = usize::try_from(size).map_err(|_| BootError::InitramfsTooLarge {
        size,
        kernel_end,
        limit,
    })?;
    mem.read_exact_volatile_from(GuestAddress(addr), file, len)
        .map_err(BootError::LoadInitramfs)?;
    info!("initramfs loaded at {addr:#x}+{size:#x}");
    Ok((addr, size))
}

#[cfg(test)]
mod tests;
