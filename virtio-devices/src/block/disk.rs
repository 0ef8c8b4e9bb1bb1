//! The raw disk image behind a virtio-blk device: positioned I/O between
//! the image file and guest memory, flush, discard and write-zeroes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use super::lock::{lock_image, warn_unlocked, LockError};
use super::{BlockConfig, BlockError, SECTOR_SIZE};
use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

/// Length of the GET_ID answer.
pub(crate) const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// Chunk size of the write-zeroes fallback.
const ZERO_CHUNK: usize = 64 << 10;

/// An opened raw image.
#[derive(Debug)]
pub(crate) struct Disk {
    /// The only descriptor of its open file description, which holds the
    /// image lock (see `super::lock`): never duplicated, so the lock goes
    /// when the last `Arc<Disk>` (device, worker, request processors)
    /// drops.
    file: File,
    /// Size in 512-byte sectors; bytes past `capacity * 512` are never
    /// touched.
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    /// The host's preferred I/O size for the image (`st_blksize`).
    host_block_size: u64,
}

impl Disk {
    /// Opens the image described by `config`.
    pub(crate) fn open(config: &BlockConfig) -> Result<Disk, BlockError> {
        let path = &config.path;
        let open_err = |source| BlockError::Open {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(!config.read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(BlockError::InvalidConfig(format!(
                "{} is neither a regular file nor a block device",
                path.display()
            )));
        }
        // Lock before trusting anything about the image (its size): another
        // writer could be changing it.
        if config.lock {
            match lock_image(&file, config.read_only) {
                Ok(()) => {}
                Err(LockError::Conflict(conflict)) => {
                    return Err(BlockError::Locked {
                        path: path.clone(),
                        conflict,
                    })
                }
                Err(LockError::Unsupported(e)) => warn_unlocked(path, &e),
                Err(LockError::Failed(source)) => {
                    return Err(BlockError::Lock {
                        path: path.clone(),
                        source,
                    })
                }
            }
        } else {
            log::info!("disk image {}: not locked (locking is off)", path.display());
        }
        // Seeking to the end gives the size of block devices too, whose
        // metadata length is zero.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image {} is {size} bytes, not a multiple of {SECTOR_SIZE}: \
                 the last {} bytes are not visible to the guest",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let id = match &config.serial {
            Some(serial) => {
                if serial.len() > ID_BYTES {
                    log::warn!("block serial {serial:?} truncated to {ID_BYTES} bytes");
                }
                id_bytes(serial.as_bytes())
            }
            None => default_id(path, meta.dev(), meta.ino()),
        };
        Ok(Disk {
            file,
            capacity: size / SECTOR_SIZE,
            read_only: config.read_only,
            id,
            host_block_size: meta.blksize(),
        })
    }

    /// Capacity in sectors.
    pub(crate) fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the image was opened read-only.
    pub(crate) fn read_only(&self) -> bool {
        self.read_only
    }

    /// The 20-byte GET_ID answer (NUL-padded).
    pub(crate) fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// The host's preferred I/O size in bytes.
    pub(crate) fn host_block_size(&self) -> u64 {
        self.host_block_size
    }

    /// The byte offset of `sector` if `len` bytes from there lie within the
    /// capacity; `None` on overflow or when the range runs past the end.
    pub(crate) fn byte_range(&self, sector: u64, len: u64) -> Option<u64> {
        let sectors = len.div_ceil(SECTOR_SIZE);
        let end = sector.checked_add(sectors)?;
        if end > self.capacity {
            return None;
        }
        // Cannot overflow: sector < capacity <= u64::MAX / 512.
        sector.checked_mul(SECTOR_SIZE)
    }

    /// Fills `slice` (guest memory) from the image at byte `offset`.
    pub(crate) fn read_to_guest<B: BitmapSlice>(
        &self,
        slice: &VolatileSlice<B>,
        offset: u64,
    ) -> io::Result<()> {
        let len = slice.len();
        let guard = slice.ptr_guard_mut();
        let base = guard.as_ptr();
        // The image shrinking underneath us shows as a zero-length read.
        let result = transfer_all(len, offset, io::ErrorKind::UnexpectedEof, |done, pos| {
            // SAFETY: `base` points to `len` bytes of mapped guest memory
            // that stay mapped while `guard` lives (VolatileSlice
            // invariant); `done < len`, so the kernel writes at most the
            // remaining `len - done` bytes of that range. The fd is owned
            // by `self.file`.
            unsafe {
                libc::pread(
                    self.file.as_raw_fd(),
                    base.wrapping_add(done).cast(),
                    len - done,
                    pos,
                )
            }
        });
        // Even a failed read may have written part of the range.
        slice.bitmap().mark_dirty(0, len);
        result
    }

    /// Writes `slice` (guest memory) to the image at byte `offset`.
    pub(crate) fn write_from_guest<B: BitmapSlice>(
        &self,
        slice: &VolatileSlice<B>,
        offset: u64,
    ) -> io::Result<()> {
        let len = slice.len();
        let guard = slice.ptr_guard();
        let base = guard.as_ptr();
        transfer_all(len, offset, io::ErrorKind::WriteZero, |done, pos| {
            // SAFETY: `base` points to `len` readable bytes of mapped guest
            // memory that stay mapped while `guard` lives; `done < len`, so
            // the kernel reads only within that range. The fd is owned by
            // `self.file`.
            unsafe {
                libc::pwrite(
                    self.file.as_raw_fd(),
                    base.wrapping_add(done).cast(),
                    len - done,
                    pos,
                )
            }
        })
    }

    /// Makes every completed write durable (fdatasync).
    pub(crate) fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    /// Deallocates `len` bytes at `offset`. Discard is a hint (the guest may
    /// not rely on the contents afterwards), so a backend that cannot punch
    /// holes simply keeps the data.
    pub(crate) fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        match self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => {
                log::debug!("discard not supported by the backend: {e}");
                Ok(())
            }
            r => r,
        }
    }

    /// Makes `len` bytes at `offset` read back as zeroes: punching a hole
    /// if `unmap`, else zeroing the range in place, falling back to
    /// writing zeroes when the filesystem supports neither.
    pub(crate) fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        if unmap {
            match self.fallocate(
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                len,
            ) {
                Err(e) if unsupported(&e) => {}
                r => return r,
            }
        }
        match self.fallocate(
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            len,
        ) {
            Err(e) if unsupported(&e) => {}
            r => return r,
        }
        let zeroes = vec![0u8; ZERO_CHUNK];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK as u64);
            let pos = offset
                .checked_add(done)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            self.file.write_all_at(&zeroes[..n as usize], pos)?;
            done += n;
        }
        Ok(())
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let invalid = || io::Error::from(io::ErrorKind::InvalidInput);
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid())?;
        let len = libc::off_t::try_from(len).map_err(|_| invalid())?;
        loop {
            // SAFETY: plain syscall on a file descriptor owned by
            // `self.file`; no memory is passed.
            let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// Errors that mean "this filesystem cannot do that fallocate mode".
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV)
    )
}

/// Repeats the positional transfer `transfer(done, file position)` (a pread or
/// pwrite of the remaining bytes) until `len` bytes from file offset
/// `offset` are done, retrying on EINTR; a transfer of zero bytes fails
/// with `on_zero`.
fn transfer_all(
    len: usize,
    offset: u64,
    on_zero: io::ErrorKind,
    mut transfer: impl FnMut(usize, libc::off_t) -> isize,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < len {
        match transfer(done, file_offset(offset, done)?) {
            n if n < 0 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => return Err(on_zero.into()),
            n => done += n as usize,
        }
    }
    Ok(())
}

fn file_offset(base: u64, done: usize) -> io::Result<libc::off_t> {
    base.checked_add(done as u64)
        .and_then(|p| libc::off_t::try_from(p).ok())
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

/// NUL-pads (or truncates) `bytes` to the GET_ID length.
fn id_bytes(bytes: &[u8]) -> [u8; ID_BYTES] {
    let mut id = [0u8; ID_BYTES];
    let n = bytes.len().min(ID_BYTES);
    id[..n].copy_from_slice(&bytes[..n]);
    id
}

/// Without a configured serial, the image's device and inode numbers give
/// an id that is stable for as long as the image file exists.
fn default_id(path: &Path, dev: u64, ino: u64) -> [u8; ID_BYTES] {
    let id = format!("{dev:x}-{ino:x}");
    log::debug!("disk image {} gets default id {id}", path.display());
    id_bytes(id.as_bytes())
}
