//! Recognising and loading a kernel image: a bzImage, or an ELF vmlinux
//! (with or without a PVH entry note). `linux-loader` does the copying;
//! this module adds the checks that turn a wrong or damaged file into a
//! clear error instead of a guest that dies mysteriously.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{
    bzimage::Error as BzError, elf::Error as ElfError, BzImage, Elf, Error as LoaderError,
    KernelLoader, PvhBootCapability,
};
use vm_memory::{GuestAddress, GuestMemoryBackend, ReadVolatile};

use super::BootError;
use crate::arch::HIGH_RAM_START;
use crate::memory::GuestMemoryMmap;

/// bzImage setup header magic "HdrS" at file offset 0x202.
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
/// The 64-bit entry point is this far into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// xloadflags bit 0: the kernel has the 64-bit entry point.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Boot protocol 2.12 introduced xloadflags.
const PROTOCOL_2_12: u16 = 0x020c;
/// Boot protocol 2.10 introduced init_size.
const PROTOCOL_2_10: u16 = 0x020a;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELF_HEADER_SIZE: usize = 64;
const ELF_PHDR_SIZE: usize = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;

/// What kind of kernel was loaded, with what the boot protocols need.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelKind {
    /// A bzImage, entered through its 64-bit entry point.
    BzImage {
        /// The setup header from the image (code32_start already adjusted).
        header: setup_header,
        /// 64-bit entry point.
        entry: u64,
    },
    /// An ELF vmlinux without a PVH note: 64-bit boot protocol.
    ElfLinux64 {
        /// The ELF entry point (physical address of `startup_64`).
        entry: u64,
    },
    /// An ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note: PVH boot.
    ElfPvh {
        /// The 32-bit PVH entry point.
        entry: u32,
    },
}

/// A kernel in guest memory.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoadedKernel {
    /// Format and entry.
    pub kind: KernelKind,
    /// Lowest guest address the kernel occupies.
    pub start: u64,
    /// Exclusive end of what the kernel needs, including a bzImage's
    /// in-place decompression area (`init_size`).
    pub end: u64,
}

fn read_at<F: Read + Seek>(image: &mut F, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
    image.seek(SeekFrom::Start(offset))?;
    image.read_exact(buf)
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Loads `image` into `mem`, below `low_ram_end` (the end of RAM under the
/// 32-bit hole).
pub fn load_kernel<F>(
    mem: &GuestMemoryMmap,
    image: &mut F,
    low_ram_end: u64,
) -> Result<LoadedKernel, BootError>
where
    F: Read + Seek + ReadVolatile,
{
    let size = image
        .seek(SeekFrom::End(0))
        .map_err(BootError::ReadKernel)?;
    if size == 0 {
        return Err(BootError::EmptyKernel);
    }
    let mut magic = [0u8; 4];
    if size >= 4 {
        read_at(image, 0, &mut magic).map_err(BootError::ReadKernel)?;
    }
    if magic == ELF_MAGIC {
        return load_elf(mem, image, size, low_ram_end);
    }
    if size >= BZIMAGE_MAGIC_OFFSET + 4 {
        read_at(image, BZIMAGE_MAGIC_OFFSET, &mut magic).map_err(BootError::ReadKernel)?;
        if magic == BZIMAGE_MAGIC {
            return load_bzimage(mem, image, low_ram_end);
        }
    }
    Err(BootError::NotAKernel)
}

/// Adds a hint to linux-loader's terse errors about file reads.
fn loader_error(e: LoaderError) -> BootError {
    let truncated = matches!(
        e,
        LoaderError::Elf(
            ElfError::ReadElfHeader
                | ElfError::ReadProgramHeader
                | ElfError::ReadKernelImage
                | ElfError::ReadNoteHeader
                | ElfError::SeekKernelStart
                | ElfError::SeekProgramHeader
                | ElfError::SeekNoteHeader
        ) | LoaderError::Bzimage(
            BzError::ReadBzImageHeader | BzError::Underflow | BzError::SeekBzImageCompressedKernel
        )
    );
    if truncated {
        BootError::TruncatedKernel(e)
    } else {
        BootError::Loader(e)
    }
}

fn load_elf<F>(
    mem: &GuestMemoryMmap,
    image: &mut F,
    size: u64,
    low_ram_end: u64,
) -> Result<LoadedKernel, BootError>
where
    F: Read + Seek + ReadVolatile,
{
    let mut ehdr = [0u8; ELF_HEADER_SIZE];
    if size < ELF_HEADER_SIZE as u64 {
        return Err(BootError::UnsupportedElf(
            "file is shorter than an ELF64 header",
        ));
    }
    read_at(image, 0, &mut ehdr).map_err(BootError::ReadKernel)?;
    if ehdr[4] != ELFCLASS64 {
        return Err(BootError::UnsupportedElf("not a 64-bit ELF"));
    }
    if ehdr[5] != ELFDATA2LSB {
        return Err(BootError::UnsupportedElf("not little-endian"));
    }
    if u16_at(&ehdr, 16) != ET_EXEC {
        return Err(BootError::UnsupportedElf("not an executable (ET_EXEC)"));
    }
    if u16_at(&ehdr, 18) != EM_X86_64 {
        return Err(BootError::UnsupportedElf("not an x86-64 ELF"));
    }
    let phoff = u64_at(&ehdr, 32);
    let phentsize = u16_at(&ehdr, 54);
    let phnum = u16_at(&ehdr, 56);
    if usize::from(phentsize) != ELF_PHDR_SIZE {
        return Err(BootError::UnsupportedElf("unexpected program header size"));
    }
    // Where the segments go, checked before anything is copied: below
    // 1 MiB they would overwrite (or be overwritten by) our boot tables.
    let mut phdr = [0u8; ELF_PHDR_SIZE];
    let mut start = u64::MAX;
    let mut loads = 0;
    for i in 0..u64::from(phnum) {
        let off = phoff
            .checked_add(i * ELF_PHDR_SIZE as u64)
            .ok_or(BootError::UnsupportedElf("program header offset overflows"))?;
        read_at(image, off, &mut phdr).map_err(|_| {
            BootError::TruncatedKernel(LoaderError::Elf(ElfError::ReadProgramHeader))
        })?;
        if u32_at(&phdr, 0) != PT_LOAD {
            continue;
        }
        loads += 1;
        let paddr = u64_at(&phdr, 24);
        let filesz = u64_at(&phdr, 32);
        let memsz = u64_at(&phdr, 40);
        let end = paddr.checked_add(memsz);
        if filesz > memsz || paddr < HIGH_RAM_START || end.is_none_or(|end| end > low_ram_end) {
            return Err(BootError::SegmentOutsideRam {
                addr: paddr,
                size: memsz,
                ram_start: HIGH_RAM_START,
                ram_end: low_ram_end,
            });
        }
        start = start.min(paddr);
    }
    if loads == 0 {
        return Err(BootError::UnsupportedElf("no loadable segment"));
    }

    let result = Elf::load(mem, None, image, None).map_err(loader_error)?;
    let (kind, entry) = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => {
            // The note holds a 32-bit value, so this always fits.
            let entry = u32::try_from(addr.0).unwrap_or(u32::MAX);
            (KernelKind::ElfPvh { entry }, addr.0)
        }
        _ => {
            let entry = result.kernel_load.0;
            (KernelKind::ElfLinux64 { entry }, entry)
        }
    };
    if !mem.address_in_range(GuestAddress(entry)) || entry < HIGH_RAM_START {
        return Err(BootError::EntryOutsideRam(entry));
    }
    Ok(LoadedKernel {
        kind,
        start,
        end: result.kernel_end,
    })
}

fn load_bzimage<F>(
    mem: &GuestMemoryMmap,
    image: &mut F,
    low_ram_end: u64,
) -> Result<LoadedKernel, BootError>
where
    F: Read + Seek + ReadVolatile,
{
    let result = BzImage::load(mem, None, image, Some(GuestAddress(HIGH_RAM_START)))
        .map_err(loader_error)?;
    let header = result
        .setup_header
        .ok_or(BootError::Loader(LoaderError::Bzimage(
            BzError::InvalidBzImage,
        )))?;
    let version = header.version;
    let xloadflags = header.xloadflags;
    if version < PROTOCOL_2_12 || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(BootError::BzImageNot64Bit { version });
    }
    let start = result.kernel_load.0;
    let mut end = result.kernel_end;
    if version >= PROTOCOL_2_10 {
        // The kernel decompresses itself into init_size bytes starting at
        // its load address or, if relocatable, at that address aligned to
        // kernel_alignment but not below pref_address (where a 64-bit
        // kernel insists on running). Nothing may live there.
        let mut base = start;
        if header.relocatable_kernel != 0 {
            let align = u64::from(header.kernel_alignment).max(1);
            base = start
                .checked_next_multiple_of(align)
                .unwrap_or(u64::MAX)
                .max(header.pref_address);
        }
        end = end.max(base.saturating_add(u64::from(header.init_size)));
    }
    if end > low_ram_end {
        return Err(BootError::KernelTooLarge {
            end,
            ram_end: low_ram_end,
        });
    }
    Ok(LoadedKernel {
        kind: KernelKind::BzImage {
            header,
            entry: start + BZIMAGE_64BIT_ENTRY_OFFSET,
        },
        start,
        end,
    })
}
