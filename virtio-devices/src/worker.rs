//! The thread on which a device processes its queues: an `event-manager`
//! loop over the queue notifiers, the device's backend file descriptors and
//! a kill eventfd, so that no request is ever handled on a vCPU thread.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What a handler left of the work a notification asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Backlog {
    /// Everything the driver made available was processed.
    Empty,
    /// The handler stopped at its per-pass budget with chains left; the
    /// worker calls it again after serving its other events, so a driver
    /// that keeps its ring full cannot keep the worker from its kill event
    /// (device reset, VM shutdown).
    Remaining,
}

/// What a device does on its worker thread.
pub trait WorkerHandler: Send + 'static {
    /// The driver notified queue `index` (the notifier is already drained).
    fn queue_notified(&mut self, index: u16) -> Backlog;

    /// Backend file descriptors to watch (a tap device, stdin) and for which
    /// events; registered once when the worker starts.
    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }

    /// A backend file descriptor from [`backend_fds`](Self::backend_fds)
    /// is ready.
    fn backend_event(&mut self, _fd: RawFd, _events: EventSet) {}
}

/// Event data tags: queue notifiers use their position in `notifiers`.
const KILL_TAG: u32 = u32::MAX;
const BACKEND_TAG: u32 = u32::MAX - 1;

struct Subscriber<H> {
    handler: H,
    notifiers: Vec<(u16, EventFd)>,
    kill: EventFd,
    stopped: bool,
}

impl<H: WorkerHandler> MutEventSubscriber for Subscriber<H> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(&self.kill, KILL_TAG, EventSet::IN)) {
            log::error!("worker: cannot watch the kill eventfd: {e}");
            self.stopped = true;
        }
        for (position, (index, evt)) in self.notifiers.iter().enumerate() {
            let tag = position as u32;
            if let Err(e) = ops.add(Events::with_data(evt, tag, EventSet::IN)) {
                log::error!("worker: cannot watch the notifier of queue {index}: {e}");
            }
        }
        for (fd, events) in self.handler.backend_fds() {
            if let Err(e) = ops.add(Events::with_data_raw(fd, BACKEND_TAG, events)) {
                log::error!("worker: cannot watch backend fd {fd}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            KILL_TAG => {
                let _ = self.kill.read();
                self.stopped = true;
            }
            BACKEND_TAG => self.handler.backend_event(events.fd(), events.event_set()),
            position => {
                let Some((index, evt)) = self.notifiers.get(position as usize) else {
                    return;
                };
                // A failed read means the counter was already zero: nothing
                // new, but processing anyway is harmless.
                let _ = evt.read();
                if self.handler.queue_notified(*index) == Backlog::Remaining {
                    // Come back on the next loop turn, after the events
                    // already ready (the kill eventfd among them).
                    if let Err(e) = evt.write(1) {
                        log::error!("worker: cannot requeue queue {index}: {e}");
                    }
                }
            }
        }
    }
}

/// What a stopped worker gives back: its handler and the queue notifiers.
pub type StoppedWorker<H> = (H, Vec<(u16, EventFd)>);

/// A running worker thread; [`stop`](DeviceWorker::stop) ends it and gives
/// back the handler and the notifiers.
pub struct DeviceWorker<H> {
    kill: EventFd,
    thread: Option<JoinHandle<Option<StoppedWorker<H>>>>,
}

impl<H: WorkerHandler> DeviceWorker<H> {
    /// Starts a thread called `name` that calls `handler` whenever one of
    /// the `(queue index, notifier)` pairs fires.
    pub fn spawn(name: &str, handler: H, notifiers: Vec<(u16, EventFd)>) -> io::Result<Self> {
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let subscriber = Subscriber {
            handler,
            notifiers,
            kill: kill.try_clone()?,
            stopped: false,
        };
        let mut manager = EventManager::<Box<Subscriber<H>>>::new()
            .map_err(|e| io::Error::other(format!("cannot create event manager: {e}")))?;
        let thread = std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let id = manager.add_subscriber(Box::new(subscriber));
                loop {
                    if let Err(e) = manager.run() {
                        log::error!("worker event loop failed: {e}");
                        break;
                    }
                    match manager.subscriber_mut(id) {
                        Ok(s) if s.stopped => break,
                        Ok(_) => {}
                        Err(_) => return None,
                    }
                }
                let subscriber = manager.remove_subscriber(id).ok()?;
                Some((subscriber.handler, subscriber.notifiers))
            })?;
        Ok(DeviceWorker {
            kill,
            thread: Some(thread),
        })
    }

    /// Stops the thread and returns the handler and notifiers, or `None` if
    /// the thread died (a bug: it is logged).
    pub fn stop(mut self) -> Option<StoppedWorker<H>> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Option<StoppedWorker<H>> {
        let thread = self.thread.take()?;
        if let Err(e) = self.kill.write(1) {
            log::error!("cannot signal worker to stop: {e}");
        }
        match thread.join() {
            Ok(result) => result,
            Err(_) => {
                log::error!("device worker thread panicked");
                None
            }
        }
    }
}

impl<H> AsRawFd for DeviceWorker<H> {
    fn as_raw_fd(&self) -> RawFd {
        self.kill.as_raw_fd()
    }
}

impl<H> Drop for DeviceWorker<H> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.kill.write(1);
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};

    struct Recorder(mpsc::Sender<u16>);

    impl WorkerHandler for Recorder {
        fn queue_notified(&mut self, index: u16) -> Backlog {
            let _ = self.0.send(index);
            Backlog::Empty
        }
    }

    /// Always has more to do, as with a driver that keeps its ring full.
    struct Endless(Arc<AtomicUsize>);

    impl WorkerHandler for Endless {
        fn queue_notified(&mut self, _index: u16) -> Backlog {
            self.0.fetch_add(1, Ordering::SeqCst);
            Backlog::Remaining
        }
    }

    #[test]
    fn a_handler_with_backlog_is_called_again_and_still_stops() {
        let calls = Arc::new(AtomicUsize::new(0));
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let worker =
            DeviceWorker::spawn("test-endless", Endless(calls.clone()), vec![(0, evt)]).unwrap();
        kick.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while calls.load(Ordering::SeqCst) < 10 {
            assert!(std::time::Instant::now() < deadline, "backlog not resumed");
            std::thread::yield_now();
        }
        // The kill event is served between passes: stop returns.
        assert!(worker.stop().is_some());
    }

    #[test]
    fn notifications_reach_the_handler_and_stop_returns_it() {
        let (tx, rx) = mpsc::channel();
        let notifiers = vec![
            (0, EventFd::new(EFD_NONBLOCK).unwrap()),
            (3, EventFd::new(EFD_NONBLOCK).unwrap()),
        ];
        let kicks: Vec<EventFd> = notifiers
            .iter()
            .map(|(_, e)| e.try_clone().unwrap())
            .collect();
        let worker = DeviceWorker::spawn("test-worker", Recorder(tx), notifiers).unwrap();
        kicks[1].write(1).unwrap();
        let timeout = std::time::Duration::from_secs(5);
        assert_eq!(rx.recv_timeout(timeout), Ok(3));
        kicks[0].write(1).unwrap();
        assert_eq!(rx.recv_timeout(timeout), Ok(0));
        let (_, notifiers) = worker.stop().expect("worker returns its state");
        assert_eq!(
            notifiers.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            vec![0, 3]
        );
    }
}
