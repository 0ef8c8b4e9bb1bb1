//! Disk image locking, so that two writers never share an image.
//!
//! An image is locked as a whole with an open file description (OFD)
//! lock: shared (read lock) for a read-only disk, exclusive (write lock)
//! for a read-write one. So any number of read-only users may share an
//! image, and a writer excludes everyone else.
//!
//! OFD locks belong to the open file description, not to the process:
//! unlike classic POSIX record locks they also conflict between two opens
//! of one image in the same process (the same image given twice to one
//! VM), and closing some other descriptor of the file does not drop them.
//! The lock lives exactly as long as the description, i.e. until the
//! last descriptor of the [`Disk`](super::disk::Disk)'s file is closed or
//! the process dies, so it must never be duplicated (`try_clone`, `dup`)
//! or inherited (std opens files close-on-exec).
//!
//! The locks are advisory: they stop lock-aware programs (another
//! trellis, QEMU and cloud-hypervisor lock images the same way), not
//! `dd`. A filesystem that cannot lock (an NFS mount without a lock
//! manager, say) gets a warning and an unlocked image, as QEMU and
//! cloud-hypervisor do: refusing would make such images unusable.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

/// Who holds a lock that conflicts with ours, as far as /proc tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LockHolder {
    /// Another open of the image in this process (another disk of this
    /// VM).
    ThisProcess,
    /// Another process.
    Process {
        /// Its process ID.
        pid: u32,
        /// Its command name (`/proc/PID/comm`).
        name: String,
    },
    /// Not found: a process we may not inspect, or another host sharing
    /// the filesystem.
    Unknown,
}

/// A lock on the image that conflicts with the one we asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockConflict {
    /// Whether the holder locked the image for writing (else for
    /// reading); `None` if its lock went away before we could look.
    pub write: Option<bool>,
    /// Who holds it.
    pub holder: LockHolder,
}

impl fmt::Display for LockConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let how = match self.write {
            Some(true) => "locked for writing",
            Some(false) => "locked for reading",
            None => "locked",
        };
        match &self.holder {
            LockHolder::ThisProcess => {
                write!(f, "{how} by this process (the same image given twice?)")
            }
            LockHolder::Process { pid, name } => {
                write!(f, "{how} by {name}, pid {pid} (another VM using it?)")
            }
            LockHolder::Unknown => write!(f, "{how} by another process (another VM using it?)"),
        }
    }
}

/// Why an image could not be locked.
#[derive(Debug)]
pub(crate) enum LockError {
    /// Someone holds a conflicting lock.
    Conflict(LockConflict),
    /// The filesystem does not support (OFD) locks.
    Unsupported(io::Error),
    /// Anything else.
    Failed(io::Error),
}

/// Locks all of `file`, now and as it grows: shared for a read-only disk,
/// exclusive otherwise. Never waits for a conflicting lock to go away.
pub(crate) fn lock_image(file: &File, read_only: bool) -> Result<(), LockError> {
    let kind = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    };
    let mut request = whole_file(kind);
    match fcntl_lock(file, libc::F_OFD_SETLK, &mut request) {
        Ok(()) => Ok(()),
        Err(e) if is_conflict(&e) => Err(LockError::Conflict(find_conflict(file, kind))),
        Err(e) if lacks_lock_support(&e) => Err(LockError::Unsupported(e)),
        Err(e) => Err(LockError::Failed(e)),
    }
}

/// Whether a lock request failed because someone holds a conflicting
/// lock. POSIX allows EACCES for that; Linux says EAGAIN.
pub(super) fn is_conflict(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES))
}

/// Whether a lock request failed because the file cannot be locked this
/// way at all: no lock manager (NFS mounted `nolock`, ENOLCK), no lock
/// support in the filesystem (EOPNOTSUPP), or no OFD locks in the kernel
/// (before 3.15: EINVAL, an unknown command).
pub(super) fn lacks_lock_support(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
    )
}

/// A lock request of type `kind` for the whole file: from offset 0 to the
/// end, whatever the end becomes (`l_len` 0).
fn whole_file(kind: libc::c_int) -> libc::flock {
    libc::flock {
        // F_RDLCK, F_WRLCK and F_UNLCK are 0, 1 and 2.
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        // Must be 0 for OFD requests.
        l_pid: 0,
    }
}

/// `fcntl(file, cmd, lock)` for the OFD lock commands, retrying on EINTR.
fn fcntl_lock(file: &File, cmd: libc::c_int, lock: &mut libc::flock) -> io::Result<()> {
    loop {
        // SAFETY: `cmd` is F_OFD_SETLK or F_OFD_GETLK, which read (and for
        // GETLK write) exactly one `struct flock`, and `lock` is a valid,
        // exclusively borrowed one. The fd is owned by `file`.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, lock as *mut libc::flock) };
        if r != -1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Describes the lock that kept us from locking `file` with `kind`, on a
/// best-effort basis: this is only the error path.
fn find_conflict(file: &File, kind: libc::c_int) -> LockConflict {
    let mut probe = whole_file(kind);
    let write = match fcntl_lock(file, libc::F_OFD_GETLK, &mut probe) {
        Ok(()) if i32::from(probe.l_type) == libc::F_WRLCK => Some(true),
        Ok(()) if i32::from(probe.l_type) == libc::F_RDLCK => Some(false),
        _ => None,
    };
    // A classic POSIX lock names its process; an OFD lock says -1.
    let holder = if write.is_some() && probe.l_pid > 0 {
        let pid = probe.l_pid as u32;
        if pid == std::process::id() {
            LockHolder::ThisProcess
        } else {
            process(pid)
        }
    } else {
        file.metadata()
            .map(|meta| find_ofd_holder(&lock_id(meta.dev(), meta.ino())))
            .unwrap_or(LockHolder::Unknown)
    };
    LockConflict { write, holder }
}

/// How /proc names a lock's file: `MAJOR:MINOR:INODE`, the device numbers
/// in two-digit hex. (On filesystems whose inodes report another device
/// than their superblock's, such as btrfs subvolumes, nothing matches and
/// the holder stays unknown.)
pub(super) fn lock_id(dev: u64, ino: u64) -> String {
    format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev))
}

/// Finds the process holding an OFD or POSIX lock on the file `id` from
/// `/proc/PID/fdinfo/*`, which list the locks each open holds: ours
/// first (the cheap and likely case of an image given twice), then every
/// process we may inspect.
fn find_ofd_holder(id: &str) -> LockHolder {
    let me = std::process::id();
    if holds_lock(me, id) {
        return LockHolder::ThisProcess;
    }
    let Ok(procs) = fs::read_dir("/proc") else {
        return LockHolder::Unknown;
    };
    procs
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|&pid| pid != me && holds_lock(pid, id))
        .map_or(LockHolder::Unknown, process)
}

/// Whether an open file of process `pid` holds a lock on the file `id`.
/// Processes we may not inspect, or that exit meanwhile, hold none.
fn holds_lock(pid: u32, id: &str) -> bool {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_to_string(fd.path()).is_ok_and(|info| info.lines().any(|l| lock_line(l, id)))
    })
}

/// Whether a line of fdinfo is a granted OFD or POSIX lock on `id`, e.g.
/// `lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10010787 0 EOF`.
pub(super) fn lock_line(line: &str, id: &str) -> bool {
    let Some(rest) = line.strip_prefix("lock:") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // "->" marks a request waiting for the lock, not holding it.
    !fields.contains(&"->")
        && fields.iter().any(|f| *f == "OFDLCK" || *f == "POSIX")
        && fields.contains(&id)
}

fn process(pid: u32) -> LockHolder {
    let name = fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|n| n.trim_end().to_string())
        .unwrap_or_else(|_| "process".to_string());
    LockHolder::Process { pid, name }
}

/// Logs that `path` is used without a lock because its filesystem
/// cannot lock.
pub(crate) fn warn_unlocked(path: &Path, e: &io::Error) {
    log::warn!(
        "disk image {}: the filesystem does not support locks ({e}); \
         using it unlocked, so nothing stops another VM from writing it too",
        path.display()
    );
}
