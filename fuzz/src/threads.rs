//! Device worker threads, seen from outside: which threads a harness
//! started (everything not in the baseline taken when it was built), and
//! waiting until they are all idle.
//!
//! A worker is idle when it is asleep in `epoll_wait`: off the run queue,
//! with `/proc/self/task/TID/wchan` naming the kernel's epoll wait. Writing
//! an eventfd or a socket a worker polls makes it runnable before the write
//! returns, and a runnable thread has no wait channel (the kernel reports
//! `0`), even while it has not yet left `epoll_wait`. It sleeps there again
//! only once the ready list is empty, i.e. after it has handled every event.
//! So "all idle" after a notification means the notification was fully
//! processed: device processing becomes deterministic without any hook in
//! the device code.
//!
//! The syscall number in `/proc/self/task/TID/syscall` is not enough: a
//! thread being woken on an idle CPU is marked "waking" until that CPU
//! takes it, and meanwhile still shows `epoll_wait` there. Taking that for
//! idle let a harness look at a ring while the worker was filling it (a CI
//! smoke run caught used elements without their interrupt that way; the
//! unit test below saw it on 789 of 2000 kicks).
//!
//! Threads other harnesses start concurrently would look like ours, so
//! harness runs take [`exclusive`] and the unit tests run one at a time
//! (`fuzz/.cargo/config.toml`).

use std::collections::BTreeSet;
use std::os::fd::AsRawFd;
use std::sync::{Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// How long a worker may stay busy after a notification before the harness
/// calls it a hang.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// What a thread is doing, from `/proc/self/task/TID/wchan`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Asleep in `epoll_wait`.
    Idle,
    /// Runnable, running, or asleep somewhere else.
    Busy,
    /// Exited.
    Gone,
}

/// The wait channel of a thread: the kernel function it sleeps in, `0`
/// while it is runnable.
fn wchan(tid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/self/task/{tid}/wchan")).ok()
}

/// Whether a wait channel is the kernel's epoll wait (`do_epoll_wait` or
/// `ep_poll`, depending on the kernel's inlining).
fn is_epoll_wait(wchan: &str) -> bool {
    wchan.contains("epoll") || wchan.contains("ep_poll")
}

fn state(tid: u32) -> State {
    match wchan(tid) {
        Some(w) if is_epoll_wait(&w) => State::Idle,
        Some(_) => State::Busy,
        // An unreadable file of a live thread must not pass for idle.
        None if std::path::Path::new(&format!("/proc/self/task/{tid}")).exists() => State::Busy,
        None => State::Gone,
    }
}

/// Checks that this kernel names the epoll wait in `wchan`, with a thread
/// of our own asleep in `epoll_wait`: without that every worker would
/// look busy forever.
fn probe_wchan() {
    let epoll = Epoll::new().expect("epoll_create");
    let wake = EventFd::new(EFD_NONBLOCK).expect("eventfd");
    epoll
        .ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )
        .expect("epoll_ctl");
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let sleeper = std::thread::spawn(move || {
        let me = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
        let tid: u32 = me
            .file_name()
            .and_then(|n| n.to_str()?.parse().ok())
            .expect("a thread id");
        tid_tx.send(tid).expect("send the thread id");
        let mut events = [EpollEvent::default()];
        let _ = epoll.wait(-1, &mut events);
    });
    let tid = tid_rx.recv().expect("the sleeper's thread id");
    let start = Instant::now();
    let mut seen = String::new();
    while start.elapsed() < Duration::from_secs(5) {
        seen = wchan(tid).unwrap_or_default();
        if is_epoll_wait(&seen) {
            break;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    wake.write(1).expect("wake the sleeper");
    sleeper.join().expect("the sleeper exits");
    assert!(
        is_epoll_wait(&seen),
        "the device harnesses need /proc/PID/task/TID/wchan to name the epoll wait \
         of an idle worker; a thread in epoll_wait shows {seen:?}"
    );
}

/// The threads that existed when a harness was built.
#[derive(Debug)]
pub struct Baseline(BTreeSet<u32>);

impl Baseline {
    /// Takes the current set of threads as the baseline.
    pub fn take() -> Self {
        static PROBED: Once = Once::new();
        PROBED.call_once(probe_wchan);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// Pins the calling thread to CPU 0.
    fn pin_to_cpu0() {
        pin_to(0)
    }

    /// Pins the calling thread to `cpu`.
    fn pin_to(cpu: usize) {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET and
        // sched_setaffinity only touch the set we own.
        let ret = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        assert_eq!(
            ret,
            0,
            "pinning to CPU {cpu} (this test needs two CPUs): {}",
            std::io::Error::last_os_error()
        );
    }

    /// A thread that counts eventfd wake-ups in an epoll loop, as a
    /// device worker does.
    fn spawn_worker(
        pin: Option<usize>,
    ) -> (u32, EventFd, Arc<AtomicU64>, std::thread::JoinHandle<()>) {
        let wake = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let theirs = wake.try_clone().expect("eventfd clone");
        let count = Arc::new(AtomicU64::new(0));
        let counted = count.clone();
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let handle = std::thread::spawn(move || {
            if let Some(cpu) = pin {
                pin_to(cpu);
            }
            let me = std::fs::read_link("/proc/thread-self").expect("/proc/thread-self");
            let tid: u32 = me.file_name().unwrap().to_str().unwrap().parse().unwrap();
            tid_tx.send(tid).unwrap();
            let epoll = Epoll::new().expect("epoll_create");
            epoll
                .ctl(
                    ControlOperation::Add,
                    theirs.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, 0),
                )
                .expect("epoll_ctl");
            let mut events = [EpollEvent::default()];
            loop {
                if epoll.wait(-1, &mut events).unwrap_or(0) == 0 {
                    continue;
                }
                let Ok(n) = theirs.read() else { continue };
                // Exit on a value of 1000 or more.
                if n >= 1000 {
                    return;
                }
                counted.fetch_add(n, Ordering::SeqCst);
            }
        });
        (tid_rx.recv().unwrap(), wake, count, handle)
    }

    #[test]
    fn worker_asleep_in_epoll_is_idle_and_busy_thread_is_not() {
        let _guard = exclusive();
        let baseline = Baseline::take();
        let (tid, wake, count, handle) = spawn_worker(None);
        baseline.wait_idle(&"a fresh worker");
        assert_eq!(state(tid), State::Idle);
        for i in 1..=50 {
            wake.write(1).unwrap();
            baseline.wait_idle(&"a kicked worker");
            // Idle means handled: the count is final, not on its way.
            assert_eq!(count.load(Ordering::SeqCst), i);
        }
        wake.write(1000).unwrap();
        handle.join().unwrap();
        baseline.assert_count(0, &"after the worker exits");
        // A thread that is running is busy.
        assert_eq!(state(all().into_iter().next().unwrap()), State::Busy);
    }

    /// The race a CI smoke run hit: waking a thread on an idle CPU queues
    /// the wake-up for that CPU, and until it runs the thread is marked
    /// waking but still shows `epoll_wait` in `/proc/.../syscall`. Kicks
    /// from CPU 0 to a worker on CPU 1, looking right after each one.
    #[test]
    fn worker_woken_on_another_cpu_is_busy_at_once() {
        let _guard = exclusive();
        let (tid, wake, count, handle) = spawn_worker(Some(1));
        let rounds = 2000;
        let mut early = 0;
        std::thread::scope(|s| {
            s.spawn(|| {
                pin_to_cpu0();
                for i in 1..=rounds {
                    // Not `baseline.wait_idle`: this thread is new too.
                    let start = Instant::now();
                    while state(tid) != State::Idle {
                        assert!(start.elapsed() < IDLE_TIMEOUT, "the worker never idles");
                        std::hint::spin_loop();
                    }
                    assert_eq!(count.load(Ordering::SeqCst), i - 1);
                    wake.write(1).unwrap();
                    if state(tid) == State::Idle && count.load(Ordering::SeqCst) < i {
                        early += 1;
                    }
                }
            });
        });
        wake.write(1000).unwrap();
        handle.join().unwrap();
        assert_eq!(
            early, 0,
            "{early} of {rounds} kicked workers passed for idle"
        );
    }
}
