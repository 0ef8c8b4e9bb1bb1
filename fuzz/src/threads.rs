//! Device worker threads, seen from outside: which threads a harness
//! started (everything not in the baseline taken when it was built), and
//! waiting until they are all idle.
//!
//! A worker is idle when it is blocked in `epoll_wait` (its
//! `/proc/self/task/TID/syscall` names it). Writing an eventfd or a socket
//! a worker polls wakes it synchronously, before the write returns; it
//! blocks in `epoll_wait` again only once the ready list is empty, i.e.
//! after it has handled every event. So "all idle" after a notification
//! means the notification was fully processed: device processing becomes
//! deterministic without any hook in the device code.
//!
//! Threads other harnesses start concurrently would look like ours, so
//! harness runs take [`exclusive`] and the unit tests run one at a time
//! (`fuzz/.cargo/config.toml`).

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a worker may stay busy after a notification before the harness
/// calls it a hang.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Syscall numbers of `epoll_wait`, `epoll_pwait` and `epoll_pwait2`.
#[cfg(target_arch = "x86_64")]
const EPOLL_WAITS: [u64; 3] = [232, 281, 441];
#[cfg(target_arch = "aarch64")]
const EPOLL_WAITS: [u64; 3] = [22, 22, 441];

static EXCLUSIVE: Mutex<()> = Mutex::new(());

/// Serializes harnesses that start threads (unit tests run in parallel).
pub fn exclusive() -> MutexGuard<'static, ()> {
    EXCLUSIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The threads of this process.
pub fn all() -> BTreeSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task is readable")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// What a thread is doing, from `/proc/self/task/TID/syscall`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Blocked in `epoll_wait`.
    Idle,
    /// Running, or blocked in another system call.
    Busy,
    /// Exited.
    Gone,
}

fn state(tid: u32) -> State {
    let task = format!("/proc/self/task/{tid}");
    let Ok(text) = std::fs::read_to_string(format!("{task}/syscall")) else {
        // An unreadable file of a live thread must not pass for idle.
        return if std::path::Path::new(&task).exists() {
            State::Busy
        } else {
            State::Gone
        };
    };
    match text.split_whitespace().next().map(str::parse::<u64>) {
        Some(Ok(nr)) if EPOLL_WAITS.contains(&nr) => State::Idle,
        _ => State::Busy,
    }
}

/// The threads that existed when a harness was built.
#[derive(Debug)]
pub struct Baseline(BTreeSet<u32>);

impl Baseline {
    /// Takes the current set of threads as the baseline.
    pub fn take() -> Self {
        let syscall = std::fs::read_to_string("/proc/thread-self/syscall");
        assert!(
            syscall.is_ok_and(|t| t.split_whitespace().next().is_some()),
            "the device harnesses need /proc/PID/task/TID/syscall to tell idle workers"
        );
        Baseline(all())
    }

    /// Threads started since the baseline (and still alive).
    pub fn extra(&self) -> Vec<u32> {
        all().difference(&self.0).copied().collect()
    }

    /// Waits until every thread started since the baseline is idle (or
    /// gone); panics after [`IDLE_TIMEOUT`], naming `what` was waited for.
    pub fn wait_idle(&self, what: &dyn std::fmt::Display) {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let busy: Vec<u32> = self
                .extra()
                .into_iter()
                .filter(|&tid| state(tid) == State::Busy)
                .collect();
            if busy.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < IDLE_TIMEOUT,
                "{what}: device threads {busy:?} still busy after {IDLE_TIMEOUT:?} \
                 (a worker that never goes back to waiting for events)"
            );
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }

    /// Checks that exactly `expected` threads started since the baseline
    /// are alive. A joined thread can linger in `/proc` for a moment while
    /// the kernel finishes its exit, so extra threads get a second to go.
    pub fn assert_count(&self, expected: usize, what: &dyn std::fmt::Display) {
        let start = Instant::now();
        loop {
            let extra = self.extra();
            if extra.len() == expected {
                return;
            }
            assert!(
                extra.len() > expected && start.elapsed() < Duration::from_secs(1),
                "{what}: {} device threads alive ({extra:?}), expected {expected}",
                extra.len()
            );
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}
