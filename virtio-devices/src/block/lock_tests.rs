//! Image locking: which combinations of users conflict, who is named as
//! the holder, and when the lock goes away.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use super::lock::{LockConflict, LockHolder};
use super::tests::{image, memory};
use super::{Block, BlockConfig, BlockError};
use crate::device::VirtioDevice;
use crate::test_ring::{atomic, RecordingInterrupt, TestRing};

fn open(path: &Path, read_only: bool) -> Result<Block, BlockError> {
    let mut config = BlockConfig::new(path);
    config.read_only = read_only;
    Block::new(config)
}

/// The conflict `open` failed with; panics if it did not fail that way.
fn conflict(path: &Path, read_only: bool) -> LockConflict {
    match open(path, read_only) {
        Err(BlockError::Locked { path: p, conflict }) => {
            assert_eq!(p, path);
            conflict
        }
        Err(e) => panic!("expected a lock conflict, got {e}"),
        Ok(_) => panic!("{} opened despite the lock", path.display()),
    }
}

fn in_this_process(write: bool) -> LockConflict {
    LockConflict {
        write: Some(write),
        holder: LockHolder::ThisProcess,
    }
}

#[test]
fn two_writers_conflict_in_one_process() {
    let file = image(4 * 512);
    let _first = open(file.as_path(), false).unwrap();
    assert_eq!(conflict(file.as_path(), false), in_this_process(true));
    let message = open(file.as_path(), false).err().unwrap().to_string();
    assert_eq!(
        message,
        format!(
            "disk image {} is locked for writing by this process (the same image given twice?)",
            file.as_path().display()
        )
    );
}

#[test]
fn a_writer_and_a_reader_conflict_either_way() {
    let file = image(4 * 512);
    let writer = open(file.as_path(), false).unwrap();
    assert_eq!(conflict(file.as_path(), true), in_this_process(true));
    drop(writer);

    let _reader = open(file.as_path(), true).unwrap();
    assert_eq!(conflict(file.as_path(), false), in_this_process(false));
}

#[test]
fn readers_share_an_image() {
    let file = image(4 * 512);
    let readers: Vec<Block> = (0..3)
        .map(|_| open(file.as_path(), true).unwrap())
        .collect();
    assert_eq!(readers.len(), 3);
    assert_eq!(conflict(file.as_path(), false), in_this_process(false));
}

#[test]
fn another_name_for_the_image_is_the_same_image() {
    let file = image(4 * 512);
    let dir = file.as_path().parent().unwrap();
    let name = file.as_path().file_name().unwrap().to_str().unwrap();
    let hard = dir.join(format!("{name}.hardlink"));
    let soft = dir.join(format!("{name}.symlink"));
    std::fs::hard_link(file.as_path(), &hard).unwrap();
    std::os::unix::fs::symlink(file.as_path(), &soft).unwrap();
    let _writer = open(file.as_path(), false).unwrap();
    let results = [&hard, &soft].map(|alias| conflict(alias, true));
    let _ = std::fs::remove_file(&hard);
    let _ = std::fs::remove_file(&soft);
    assert_eq!(results, [in_this_process(true), in_this_process(true)]);
}

#[test]
fn the_lock_goes_with_the_device_and_its_worker() {
    let file = image(16 * 512);
    let mut block = open(file.as_path(), false).unwrap();
    // A running worker holds the disk too.
    let mem = memory();
    let ring = TestRing::new(&mem, 0, 16);
    let (qa, _kick) = ring.activation(0);
    let irq = Arc::new(RecordingInterrupt::default());
    block.activate(atomic(&mem), irq, vec![qa]).unwrap();
    assert!(open(file.as_path(), true).is_err());
    // Dropping the device stops the worker before returning: the lock is
    // gone at once.
    drop(block);
    let again = open(file.as_path(), false).expect("lock released by the drop");

    // A request processor keeps the image open, so it keeps the lock.
    let processor = again.request_processor();
    drop(again);
    assert_eq!(conflict(file.as_path(), false), in_this_process(true));
    drop(processor);
    open(file.as_path(), false).expect("lock released with the last processor");
}

#[test]
fn a_failed_open_takes_no_lock() {
    let file = image(4 * 512);
    let mut bad = BlockConfig::new(file.as_path());
    bad.queues = 0;
    assert!(matches!(Block::new(bad), Err(BlockError::InvalidConfig(_))));
    let first = open(file.as_path(), false).unwrap();
    assert!(open(file.as_path(), false).is_err());
    drop(first);
    open(file.as_path(), false).unwrap();
}

#[test]
fn lock_off_neither_takes_nor_checks_the_lock() {
    let file = image(4 * 512);
    let unlocked = || {
        let mut config = BlockConfig::new(file.as_path());
        config.lock = false;
        Block::new(config)
    };
    let _a = unlocked().unwrap();
    let _b = unlocked().unwrap();
    let locked = open(file.as_path(), false).unwrap();
    unlocked().expect("lock=off ignores the lock of others");
    drop(locked);
}

/// Why the device uses OFD locks: classic POSIX locks (F_SETLK) are owned
/// by the process, so two opens in one process never conflict, and they
/// would not catch an image given twice. They do conflict with our OFD
/// locks, and name their process.
#[test]
fn classic_posix_locks_do_not_conflict_within_a_process() {
    let file = image(4 * 512);
    let classic = |f: &std::fs::File| {
        let mut lock = libc::flock {
            l_type: libc::F_WRLCK as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        // SAFETY: F_SETLK reads one `struct flock`, which `lock` is; the fd
        // is owned by `f`.
        unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &mut lock as *mut libc::flock) }
    };
    let rw = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(file.as_path())
            .unwrap()
    };
    let (one, two) = (rw(), rw());
    assert_eq!(classic(&one), 0);
    assert_eq!(classic(&two), 0, "classic locks do not see each other");
    // Our OFD lock conflicts with the classic one, whose pid is ours.
    // (Opening and closing the image for the attempt drops the classic
    // locks: that is how they work.)
    assert_eq!(conflict(file.as_path(), true), in_this_process(true));
}

/// Environment variable that turns [`lock_holder_child`] into the child.
const CHILD_ENV: &str = "TRELLIS_BLK_LOCK_IMAGE";
/// What the child prints once it holds the lock.
const CHILD_READY: &str = "trellis-lock-child: locked";

/// Opens the image read-write, says so, and holds it until stdin closes.
#[test]
fn lock_holder_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return; // Only meaningful when run by `another_process_holds_the_lock`.
    };
    let _block = open(Path::new(&path), false).unwrap();
    println!("{CHILD_READY}");
    let _ = std::io::stdin().read_to_end(&mut Vec::new());
}

#[test]
fn another_process_holds_the_lock() {
    let file = image(4 * 512);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "block::lock_tests::lock_holder_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, file.as_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // libtest may print "test NAME ... " ahead of it on the same line.
    let ready = (&mut stdout)
        .lines()
        .map_while(Result::ok)
        .any(|line| line.ends_with(CHILD_READY));
    assert!(ready, "the child did not lock the image");

    for read_only in [false, true] {
        let c = conflict(file.as_path(), read_only);
        assert_eq!(c.write, Some(true));
        match c.holder {
            LockHolder::Process { pid, .. } => assert_eq!(pid, child.id()),
            other => panic!("holder {other:?}, expected pid {}", child.id()),
        }
    }
    let message = open(file.as_path(), false).err().unwrap().to_string();
    assert!(
        message.contains(&format!(", pid {} (another VM using it?)", child.id())),
        "{message}"
    );

    // The child's exit releases its lock.
    drop(child.stdin.take());
    // Drain its report: a closed pipe would fail the child.
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success(), "child: {rest}");
    open(file.as_path(), false).expect("lock released by the child's exit");
}

#[test]
fn conflicts_read_as_one_line() {
    let cases = [
        (
            LockConflict {
                write: Some(false),
                holder: LockHolder::Process {
                    pid: 42,
                    name: "trellis".into(),
                },
            },
            "locked for reading by trellis, pid 42 (another VM using it?)",
        ),
        (
            LockConflict {
                write: None,
                holder: LockHolder::Unknown,
            },
            "locked by another process (another VM using it?)",
        ),
    ];
    for (conflict, text) in cases {
        assert_eq!(conflict.to_string(), text);
    }
}

#[test]
fn fdinfo_lock_lines() {
    use super::lock::{lock_id, lock_line};
    let id = lock_id(libc::makedev(0xfe, 0), 10010787);
    assert_eq!(id, "fe:00:10010787");
    for (line, held) in [
        (
            "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10010787 0 EOF",
            true,
        ),
        (
            "lock:\t1: POSIX  ADVISORY  READ 4242 fe:00:10010787 0 EOF",
            true,
        ),
        // Another file, a flock(2) lock, a waiter, another field.
        (
            "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:10010788 0 EOF",
            false,
        ),
        (
            "lock:\t1: FLOCK  ADVISORY  WRITE 4242 fe:00:10010787 0 EOF",
            false,
        ),
        (
            "lock:\t1: -> OFDLCK ADVISORY  WRITE -1 fe:00:10010787 0 EOF",
            false,
        ),
        ("ino:\t10010787", false),
    ] {
        assert_eq!(lock_line(line, &id), held, "{line}");
    }
}

#[test]
fn lock_errors_are_classified() {
    use super::lock::{is_conflict, lacks_lock_support};
    use std::io::Error;
    for errno in [libc::EAGAIN, libc::EACCES] {
        let e = Error::from_raw_os_error(errno);
        assert!(is_conflict(&e) && !lacks_lock_support(&e), "{e}");
    }
    // Used unlocked, with a warning.
    for errno in [libc::ENOLCK, libc::EOPNOTSUPP, libc::EINVAL] {
        let e = Error::from_raw_os_error(errno);
        assert!(lacks_lock_support(&e) && !is_conflict(&e), "{e}");
    }
    // Anything else fails the open.
    for errno in [libc::EBADF, libc::EIO, libc::ENOMEM] {
        let e = Error::from_raw_os_error(errno);
        assert!(!lacks_lock_support(&e) && !is_conflict(&e), "{e}");
    }
}
