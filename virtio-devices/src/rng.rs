//! virtio-rng (virtio 1.2 §5.4): an entropy device that fills the driver's
//! device-writable buffers with bytes read from a host source such as
//! `/dev/urandom`.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};

use crate::device::{
    ActivateError, GuestMemoryMmapAtomic, QueueActivation, VirtioDevice, VirtioInterrupt,
};
use crate::queue::{drain_queue, interrupt_queue, QueueOutcome};
use crate::worker::{Backlog, DeviceWorker, WorkerHandler};

/// Size of the single request queue.
pub const RNG_QUEUE_SIZE: u16 = 256;
/// Most bytes supplied per request, however large the driver's buffers:
/// bounds the work one (possibly hostile) chain can cause.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

/// Why an entropy device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The entropy source could not be opened.
    #[error("cannot open entropy source {}: {source}", path.display())]
    Open {
        /// The source.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
}

/// A virtio-rng device.
pub struct Rng {
    path: PathBuf,
    source: Arc<File>,
    acked_features: u64,
    state: State,
}

/// Where the device's queue is.
enum State {
    /// Not activated (or reset).
    Idle,
    /// The worker serves the queue.
    Running(DeviceWorker<RngHandler>),
    /// The driver reset the queue; the handler waits for it to come back.
    Parked(RngHandler),
}

const FEATURES: u64 = (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC);
const QUEUE_SIZES: [u16; 1] = [RNG_QUEUE_SIZE];

impl Rng {
    /// Opens `source` (e.g. `/dev/urandom`) and builds the device.
    ///
    /// The source is opened non-blocking so that a source with no data
    /// ready (`/dev/random` before the pool is initialised, a FIFO) yields
    /// short answers instead of stalling the device thread.
    pub fn new(source: PathBuf) -> Result<Rng, RngError> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&source)
            .map_err(|e| RngError::Open {
                path: source.clone(),
                source: e,
            })?;
        Ok(Rng {
            path: source,
            source: Arc::new(file),
            acked_features: 0,
            state: State::Idle,
        })
    }

    /// The entropy source.
    pub fn source_path(&self) -> &Path {
        &self.path
    }

    fn stop(&mut self) {
        if let State::Running(worker) = std::mem::replace(&mut self.state, State::Idle) {
            if worker.stop().is_none() {
                log::error!("virtio-rng: worker thread had died");
            }
        }
    }

    fn event_idx(&self) -> bool {
        self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        crate::device_type::RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        FEATURES
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & FEATURES;
    }

    fn config_size(&self) -> usize {
        // virtio-rng has no configuration space.
        0
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmapAtomic,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueActivation>,
    ) -> Result<(), ActivateError> {
        self.stop();
        let mut queues = queues.into_iter();
        let (Some(qa), None) = (queues.next(), queues.next()) else {
            return Err(ActivateError::BadQueues(
                "virtio-rng needs exactly its one queue".into(),
            ));
        };
        if qa.index != 0 {
            return Err(ActivateError::BadQueues(format!(
                "virtio-rng has no queue {}",
                qa.index
            )));
        }
        let mut handler = RngHandler {
            filler: RngFiller::new(Arc::clone(&self.source)),
            queue: None,
            mem,
            interrupt,
        };
        let notifier = handler.attach(qa, self.event_idx());
        let worker = DeviceWorker::spawn("virtio-rng", handler, vec![notifier])
            .map_err(ActivateError::Worker)?;
        self.state = State::Running(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
        self.state = State::Idle;
        self.acked_features = 0;
    }

    fn supports_queue_reset(&self) -> bool {
        true
    }

    fn reset_queue(&mut self, index: u16) -> Option<QueueActivation> {
        if index != 0 || !matches!(self.state, State::Running(_)) {
            return None;
        }
        let State::Running(worker) = std::mem::replace(&mut self.state, State::Idle) else {
            return None;
        };
        let Some((mut handler, mut notifiers)) = worker.stop() else {
            log::error!("virtio-rng: worker thread was gone; device stopped");
            return None;
        };
        let queue = handler.queue.take()?.queue;
        let (_, notifier) = notifiers.pop()?;
        self.state = State::Parked(handler);
        Some(QueueActivation {
            index,
            queue,
            notifier,
        })
    }

    fn enable_queue(&mut self, qa: QueueActivation) -> Result<(), ActivateError> {
        if qa.index != 0 {
            return Err(ActivateError::BadQueues(format!(
                "virtio-rng has no queue {}",
                qa.index
            )));
        }
        if !matches!(self.state, State::Parked(_)) {
            return Err(ActivateError::BadQueues(
                "virtio-rng queue 0 was not reset".into(),
            ));
        }
        let State::Parked(mut handler) = std::mem::replace(&mut self.state, State::Idle) else {
            return Err(ActivateError::BadQueues("virtio-rng is not active".into()));
        };
        let notifier = handler.attach(qa, self.event_idx());
        let worker = DeviceWorker::spawn("virtio-rng", handler, vec![notifier])
            .map_err(ActivateError::Worker)?;
        self.state = State::Running(worker);
        Ok(())
    }
}

impl Drop for Rng {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The queue and whether the driver broke it.
struct RngQueue {
    queue: Queue,
    broken: bool,
}

/// The worker-thread side of the device.
struct RngHandler {
    filler: RngFiller,
    queue: Option<RngQueue>,
    mem: GuestMemoryMmapAtomic,
    interrupt: Arc<dyn VirtioInterrupt>,
}

impl RngHandler {
    /// Takes over `qa`'s queue; returns its notifier for the worker.
    fn attach(
        &mut self,
        qa: QueueActivation,
        event_idx: bool,
    ) -> (u16, vmm_sys_util::eventfd::EventFd) {
        let mut queue = qa.queue;
        queue.set_event_idx(event_idx);
        self.queue = Some(RngQueue {
            queue,
            broken: false,
        });
        (qa.index, qa.notifier)
    }
}

impl WorkerHandler for RngHandler {
    fn queue_notified(&mut self, index: u16) -> Backlog {
        let Some(q) = self.queue.as_mut().filter(|q| !q.broken) else {
            return Backlog::Empty;
        };
        let mem = self.mem.memory();
        let outcome = self.filler.process_queue(&mem, &mut q.queue);
        if outcome.notify {
            interrupt_queue(self.interrupt.as_ref(), index);
        }
        if let Some(e) = outcome.error {
            log::error!("virtio-rng: queue stopped until reset: {e}");
            q.broken = true;
            self.interrupt.set_needs_reset();
            return Backlog::Empty;
        }
        if outcome.pending {
            Backlog::Remaining
        } else {
            Backlog::Empty
        }
    }
}

/// The request path: fills chains from the source.
struct RngFiller {
    source: Arc<File>,
    buf: Vec<u8>,
    /// A failing source is reported once, not per request.
    error_logged: bool,
}

impl RngFiller {
    fn new(source: Arc<File>) -> Self {
        RngFiller {
            source,
            buf: vec![0; MAX_BYTES_PER_REQUEST],
            error_logged: false,
        }
    }

    fn process_queue(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> QueueOutcome {
        drain_queue(queue, mem, |chain| self.fill_chain(mem, chain))
    }

    /// Fills the chain's device-writable buffers in order, up to
    /// [`MAX_BYTES_PER_REQUEST`]; returns the number of bytes written.
    /// Stops at the first buffer outside guest memory or when the source
    /// runs dry, so the bytes counted are always a prefix of the writable
    /// part of the chain. A chain cut short counts as empty.
    fn fill_chain(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> u32 {
        let head = chain.head_index();
        let mut written = 0usize;
        let mut filling = true;
        // Walked to the end even once filling stopped: only a last
        // descriptor without NEXT shows the chain is whole (see below).
        let mut whole = false;
        for desc in chain {
            whole = !desc.has_next();
            if !filling || !desc.is_write_only() {
                continue;
            }
            let want = (desc.len() as usize).min(MAX_BYTES_PER_REQUEST - written);
            if want == 0 {
                filling = written < MAX_BYTES_PER_REQUEST;
                continue;
            }
            let got = self.read_source(want);
            let Some(bytes) = self.buf.get(..got) else {
                filling = false;
                continue;
            };
            if let Err(e) = mem.write_slice(bytes, desc.addr()) {
                log::debug!("virtio-rng: buffer outside guest memory: {e}");
                filling = false;
                continue;
            }
            written += got;
            filling = got == want;
        }
        // A chain cut short (a loop, a bad next index, an unreadable
        // descriptor) may name one buffer many times: a loop over 64 bytes
        // would be reported as a queue size times 64. Report nothing for
        // it, as virtio-blk does; the bytes written are only entropy.
        if !whole {
            log::debug!("virtio-rng: chain {head} is cut short; reported empty");
            return 0;
        }
        // written <= MAX_BYTES_PER_REQUEST.
        written as u32
    }

    fn read_source(&mut self, want: usize) -> usize {
        let want = want.min(self.buf.len());
        let mut got = 0;
        while got < want {
            match (&*self.source).read(&mut self.buf[got..want]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    if !self.error_logged {
                        log::warn!("virtio-rng: entropy source read failed: {e}");
                        self.error_logged = true;
                    }
                    break;
                }
            }
        }
        got
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::GuestAddress;
    use vmm_sys_util::tempfile::TempFile;

    use super::*;
    use crate::test_ring::{
        atomic, wait_until, Desc, RecordingInterrupt, TestRing, F_INDIRECT, F_NEXT, F_WRITE,
    };
    use crate::VirtioInterruptType;

    const MEM_SIZE: usize = 0x10_0000;
    const BUF: u64 = 0x1_0000;
    const FAR: u64 = 0x4000_0000;
    const POISON: u8 = 0xaa;

    fn memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        let poison = vec![POISON; MEM_SIZE - BUF as usize];
        mem.write_slice(&poison, GuestAddress(BUF)).unwrap();
        mem
    }

    fn filler(path: &Path) -> RngFiller {
        let rng = Rng::new(path.to_path_buf()).unwrap();
        RngFiller::new(Arc::clone(&rng.source))
    }

    /// A source file whose byte `i` is `i % 256`.
    fn counting_source() -> TempFile {
        let f = TempFile::new().unwrap();
        let bytes: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        f.as_file().write_all_at(&bytes, 0).unwrap();
        f
    }

    fn guest(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Submits each chain in turn; returns the used lengths.
    fn run(mem: &GuestMemoryMmap, filler: &mut RngFiller, chains: &[&[Desc]]) -> Vec<u32> {
        let mut ring = TestRing::new(mem, 0, 16);
        let mut queue = ring.queue();
        for chain in chains {
            ring.add_chain(chain);
        }
        let outcome = filler.process_queue(mem, &mut queue);
        assert!(outcome.error.is_none());
        assert!(outcome.notify);
        assert_eq!(usize::from(ring.used_idx()), chains.len());
        (0..chains.len() as u16)
            .map(|i| ring.used_elem(i).1)
            .collect()
    }

    #[test]
    fn missing_source_is_a_clear_error() {
        let err = Rng::new("/nonexistent/entropy".into()).err().unwrap();
        assert!(err.to_string().contains("/nonexistent/entropy"), "{err}");
    }

    #[test]
    fn device_basics() {
        let mut rng = Rng::new("/dev/urandom".into()).unwrap();
        assert_eq!(rng.device_type(), crate::device_type::RNG);
        assert_eq!(rng.queue_max_sizes(), [256]);
        assert_eq!(rng.features(), FEATURES);
        rng.ack_features(u64::MAX);
        assert!(rng.event_idx());
        assert_eq!(rng.config_size(), 0);
        let mut config = [0xffu8; 8];
        rng.read_config(0, &mut config);
        assert_eq!(config, [0; 8]);
        assert_eq!(rng.source_path(), Path::new("/dev/urandom"));
    }

    #[test]
    fn fills_writable_buffers_in_order() {
        let source = counting_source();
        let mut filler = filler(source.as_path());
        let mem = memory();
        let used = run(
            &mem,
            &mut filler,
            &[
                &[
                    Desc::r(BUF + 0x1000, 64),
                    Desc::w(BUF, 10),
                    Desc::w(BUF + 0x100, 20),
                ],
                &[Desc::w(BUF + 0x200, 5)],
            ],
        );
        assert_eq!(used, [30, 5]);
        assert_eq!(guest(&mem, BUF, 10), (0..10).collect::<Vec<u8>>());
        assert_eq!(guest(&mem, BUF + 0x100, 20), (10..30).collect::<Vec<u8>>());
        assert_eq!(guest(&mem, BUF + 0x200, 5), (30..35).collect::<Vec<u8>>());
        // Readable buffers are not written, nor bytes past each buffer.
        assert_eq!(guest(&mem, BUF + 0x1000, 64), [POISON; 64]);
        assert_eq!(guest(&mem, BUF + 10, 1), [POISON]);
    }

    #[test]
    fn urandom_fills_buffers() {
        let mut filler = filler(Path::new("/dev/urandom"));
        let mem = memory();
        assert_eq!(run(&mem, &mut filler, &[&[Desc::w(BUF, 4096)]]), [4096]);
        assert!(guest(&mem, BUF, 4096).iter().any(|b| *b != POISON));
    }

    #[test]
    fn requests_are_capped() {
        let source = counting_source();
        let mut filler = filler(source.as_path());
        let mem = memory();
        let used = run(
            &mem,
            &mut filler,
            &[&[Desc::w(BUF, 40_000), Desc::w(BUF + 0x1_0000, 40_000)]],
        );
        assert_eq!(used, [MAX_BYTES_PER_REQUEST as u32]);
        let past = BUF + 0x1_0000 + (MAX_BYTES_PER_REQUEST - 40_000) as u64;
        assert_eq!(guest(&mem, past, 1), [POISON]);
    }

    #[test]
    fn empty_and_readable_only_chains_get_nothing() {
        let mut filler = filler(Path::new("/dev/urandom"));
        let mem = memory();
        let used = run(
            &mem,
            &mut filler,
            &[
                &[Desc::r(BUF, 100)],
                &[Desc::w(BUF, 0)],
                &[
                    Desc::r(BUF, 10),
                    Desc::w(BUF + 0x100, 0),
                    Desc::r(BUF + 0x200, 10),
                ],
            ],
        );
        assert_eq!(used, [0, 0, 0]);
        assert_eq!(guest(&mem, BUF, 0x300), vec![POISON; 0x300]);
    }

    #[test]
    fn hostile_chains_do_not_panic() {
        let source = counting_source();
        let mut filler = filler(source.as_path());
        let mem = memory();
        let used = run(
            &mem,
            &mut filler,
            &[
                &[Desc::w(FAR, 100)],
                &[Desc::w(u64::MAX - 10, 100)],
                &[
                    Desc::w(BUF, 16),
                    Desc::w(FAR, 100),
                    Desc::w(BUF + 0x100, 16),
                ],
                &[Desc::w(MEM_SIZE as u64 - 8, 64)],
                &[Desc::w(BUF + 0x200, u32::MAX)],
            ],
        );
        // Counting stops at the first unusable buffer.
        assert_eq!(used[..3], [0, 0, 16]);
        assert_eq!(guest(&mem, BUF + 0x100, 1), [POISON]);
        assert_eq!(used[3], 0);
        assert!(used[4] as usize <= MAX_BYTES_PER_REQUEST);

        // Loops and bad indirect tables.
        let ring = TestRing::new(&mem, 0, 16);
        let mut queue = ring.queue();
        ring.set_desc(
            0,
            Desc {
                flags: F_WRITE | F_NEXT,
                next: 0,
                ..Desc::w(BUF, 4096)
            },
        );
        ring.publish(0);
        ring.set_desc(
            1,
            Desc {
                flags: F_INDIRECT,
                ..Desc::r(BUF, 7)
            },
        );
        ring.publish(1);
        ring.publish(99);
        let outcome = filler.process_queue(&mem, &mut queue);
        assert!(outcome.error.is_none());
        assert_eq!(ring.used_idx(), 2);
        // A loop is reported empty, not as 16 times its 4 KiB buffer.
        assert_eq!(ring.used_elem(0).1, 0);
        assert_eq!(ring.used_elem(1).1, 0);
    }

    #[test]
    fn chains_cut_short_are_reported_empty() {
        let source = counting_source();
        let mut filler = filler(source.as_path());
        let mem = memory();
        let ring = TestRing::new(&mem, 0, 16);
        let mut queue = ring.queue();
        let next = |next| Desc {
            flags: F_WRITE | F_NEXT,
            next,
            ..Desc::w(BUF, 64)
        };
        // A 64-byte buffer in a loop, a next index beyond the table, and a
        // whole chain whose cap is reached before its end.
        ring.set_desc(0, next(0));
        ring.publish(0);
        ring.set_desc(1, next(300));
        ring.publish(1);
        ring.set_desc(
            2,
            Desc {
                flags: F_WRITE | F_NEXT,
                next: 3,
                ..Desc::w(BUF, MAX_BYTES_PER_REQUEST as u32)
            },
        );
        ring.set_desc(3, Desc::w(BUF + 0x1000, 64));
        ring.publish(2);
        filler.process_queue(&mem, &mut queue);
        assert_eq!(ring.used_idx(), 3);
        assert_eq!(ring.used_elem(0).1, 0);
        assert_eq!(ring.used_elem(1).1, 0);
        assert_eq!(ring.used_elem(2).1, MAX_BYTES_PER_REQUEST as u32);
    }

    #[test]
    fn source_errors_and_exhaustion_do_not_panic() {
        let mem = memory();
        // Reading a directory fails with EISDIR.
        let mut broken = filler(Path::new("/"));
        let chain: &[Desc] = &[Desc::w(BUF, 64)];
        assert_eq!(run(&mem, &mut broken, &[chain, chain]), [0, 0]);
        // /dev/null is always at end of file.
        let mut empty = filler(Path::new("/dev/null"));
        assert_eq!(run(&mem, &mut empty, &[&[Desc::w(BUF, 64)]]), [0]);
        // A short source yields what it has.
        let short = TempFile::new().unwrap();
        short.as_file().write_all_at(&[7; 10], 0).unwrap();
        let mut short_filler = filler(short.as_path());
        let used = run(
            &mem,
            &mut short_filler,
            &[&[Desc::w(BUF, 64), Desc::w(BUF + 0x100, 64)]],
        );
        assert_eq!(used, [10]);
        assert_eq!(guest(&mem, BUF + 0x100, 1), [POISON]);
    }

    #[test]
    fn worker_serves_the_queue_and_queue_reset_works() {
        let mut rng = Rng::new("/dev/urandom".into()).unwrap();
        rng.ack_features(rng.features());
        let mem = memory();
        let mut ring = TestRing::new(&mem, 0, 16);
        let irq = Arc::new(RecordingInterrupt::default());
        let (qa, kick) = ring.activation(0);
        rng.activate(atomic(&mem), irq.clone(), vec![qa]).unwrap();
        ring.add_chain(&[Desc::w(BUF, 32)]);
        kick.write(1).unwrap();
        assert!(ring.wait_used(1));
        assert_eq!(ring.used_elem(0).1, 32);
        assert!(wait_until(
            || *irq.fired.lock().unwrap() == [VirtioInterruptType::Queue(0)]
        ));

        let qa = rng.reset_queue(0).expect("queue handed back");
        assert!(rng.reset_queue(0).is_none());
        let mut ring = TestRing::new(&mem, 0x2000, 16);
        let qa = QueueActivation {
            queue: ring.queue(),
            ..qa
        };
        rng.enable_queue(qa).unwrap();
        ring.add_chain(&[Desc::w(BUF, 8)]);
        kick.write(1).unwrap();
        assert!(ring.wait_used(1));

        rng.reset();
        let (bad, _) = ring.activation(1);
        assert!(rng.activate(atomic(&mem), irq, vec![bad]).is_err());
    }
}
