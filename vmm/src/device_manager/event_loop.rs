//! The "vmm events" thread: one event-manager loop for the VMM's own
//! file descriptors (INTx resample eventfds, console input).
//!
//! Device workers have their own threads; this loop is only for the small
//! things that must not run on a vCPU thread and need no thread of their
//! own. Subscribers must not block.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, EventSubscriber, Events, SubscriberOps};
use log::{debug, error};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A subscriber as the loop holds it.
pub type Subscriber = Arc<dyn EventSubscriber + Send + Sync>;

/// Wakes the loop and tells it to finish.
struct Stop {
    evt: EventFd,
    stopped: AtomicBool,
}

impl EventSubscriber for Stop {
    fn process(&self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            error!("vmm events: cannot watch the stop eventfd: {e}");
        }
    }
}

/// The loop before it runs: collect subscribers, then [`start`](Self::start).
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop: Arc<Stop>,
}

impl EventLoop {
    /// An empty loop.
    pub fn new() -> io::Result<Self> {
        let mut manager = EventManager::<Subscriber>::new()
            .map_err(|e| io::Error::other(format!("cannot create the event loop: {e}")))?;
        let stop = Arc::new(Stop {
            evt: EventFd::new(EFD_NONBLOCK)?,
            stopped: AtomicBool::new(false),
        });
        manager.add_subscriber(stop.clone());
        Ok(EventLoop { manager, stop })
    }

    /// Adds a subscriber; its `init` registers its file descriptors now.
    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Runs one round of the loop on the calling thread, waiting at most
    /// `timeout_ms` (-1: forever); returns how many events were handled.
    pub fn run_once(&mut self, timeout_ms: i32) -> io::Result<usize> {
        self.manager
            .run_with_timeout(timeout_ms)
            .map_err(|e| io::Error::other(e.to_string()))
    }

    /// Runs the loop on a new thread named "vmm-events" until the handle
    /// is stopped or dropped.
    pub fn start(mut self) -> io::Result<EventLoopHandle> {
        let stop_evt = self.stop.evt.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("vmm-events".to_string())
            .spawn(move || {
                while !self.stop.stopped.load(Ordering::SeqCst) {
                    match self.manager.run() {
                        Ok(_) => {}
                        // A signal interrupted the wait: just wait again.
                        Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
                        // Anything else would fail again at once: stop.
                        Err(e) => {
                            error!("vmm events: event loop failed, stopping it: {e}");
                            break;
                        }
                    }
                }
                debug!("vmm events: stopped");
            })?;
        Ok(EventLoopHandle {
            stop_evt,
            thread: Some(thread),
        })
    }
}

/// The running loop; stopping or dropping it ends the thread.
pub struct EventLoopHandle {
    stop_evt: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventLoopHandle {
    /// Stops the loop and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        if let Err(e) = self.stop_evt.write(1) {
            error!("vmm events: cannot signal the loop to stop: {e}");
            return;
        }
        if thread.join().is_err() {
            error!("vmm events: the event loop thread panicked");
        }
    }
}

impl Drop for EventLoopHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}
