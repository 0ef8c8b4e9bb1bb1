//! Receive backlog on a queue-backed fake tap: frames pending until the
//! driver adds buffers (EVENT_IDX races included), and floods read a
//! bounded number of frames per wakeup.

use event_manager::EventSet;

use super::*;
use crate::worker::{Backlog, WorkerHandler};

/// A fake tap holding a queue of frames. Its fd is an eventfd that the
/// test writes to announce frames: the worker watches it edge-triggered,
/// as it does a tap.
struct QueueBackend {
    frames: Mutex<std::collections::VecDeque<Vec<u8>>>,
    ready: EventFd,
}

impl QueueBackend {
    fn new() -> Arc<Self> {
        Arc::new(QueueBackend {
            frames: Mutex::new(Default::default()),
            ready: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
        })
    }

    fn push(&self, frame: Vec<u8>) {
        self.frames.lock().unwrap().push_back(frame);
    }

    /// Frames not read yet.
    fn left(&self) -> usize {
        self.frames.lock().unwrap().len()
    }

    /// Makes the fd readable, an edge for the worker.
    fn announce(&self) {
        self.ready.write(1).unwrap();
    }
}

impl NetBackend for QueueBackend {
    fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(frame) = self.frames.lock().unwrap().pop_front() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let n = frame.len().min(buf.len());
        buf[..n].copy_from_slice(&frame[..n]);
        Ok(n)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        Ok(frame.len())
    }
    fn as_raw_fd(&self) -> std::os::unix::io::RawFd {
        std::os::unix::io::AsRawFd::as_raw_fd(&self.ready)
    }
    fn set_offload(&self, _flags: u32) -> std::io::Result<()> {
        Ok(())
    }
}

/// The worker's handler over one backend and receive queue `ring`, called
/// directly on the test's thread (no worker thread, so every step is
/// deterministic). `acked` is the negotiated feature set.
fn direct_handler(
    mem: &GuestMemoryMmap,
    backend: Arc<dyn NetBackend>,
    ring: &TestRing,
    acked: u64,
) -> NetHandler {
    let mut rx = ring.queue();
    rx.set_event_idx(acked & bit(VIRTIO_RING_F_EVENT_IDX) != 0);
    NetHandler {
        mem: atomic(mem),
        interrupt: Arc::new(RecordingInterrupt::default()),
        backends: vec![BackendState::new(backend)],
        rx: vec![Some(rx)],
        tx: vec![None],
        ctrl: None,
        mrg_rxbuf: acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0,
        guest_csum: true,
        mq: false,
        active_pairs: 1,
        tx_buf: Vec::new(),
        resume: EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap(),
    }
}

/// The driver makes one more receive buffer available and says whether it
/// must notify the device, as Linux's `virtqueue_kick_prepare` decides
/// under VIRTIO_RING_F_EVENT_IDX: only if the index moved past the
/// device's `avail_event`.
fn driver_adds_buffer(ring: &mut TestRing, desc: Desc) -> bool {
    let old = ring.avail_idx();
    ring.add_chain(&[desc]);
    let new = ring.avail_idx();
    let event = ring.avail_event();
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

const MRG_EVENT_IDX: u64 = (1 << VIRTIO_NET_F_MRG_RXBUF) | (1 << VIRTIO_RING_F_EVENT_IDX);

#[test]
fn pending_frame_is_delivered_when_an_event_idx_driver_adds_the_missing_buffer() {
    let mem = guest_memory();
    let mut ring = TestRing::new(&mem, 0x1000, RING_SIZE);
    let backend = QueueBackend::new();
    let mut h = direct_handler(&mem, backend.clone(), &ring, MRG_EVENT_IDX);
    for i in 0..2 {
        if driver_adds_buffer(&mut ring, Desc::w(BUFS + i * 0x1000, 1000)) {
            assert_eq!(h.queue_notified(0), Backlog::Empty);
        }
    }
    // A frame of three buffers' worth arrives; two are there.
    let data = frame(2488, 3);
    backend.push(data.clone());
    h.backend_event(backend.as_raw_fd(), EventSet::IN);
    assert_eq!(ring.used_idx(), 0);
    assert_eq!(ring.avail_event(), 2, "device asks to hear of the third");

    assert!(driver_adds_buffer(&mut ring, Desc::w(BUFS + 0x2000, 1000)));
    assert_eq!(h.queue_notified(0), Backlog::Empty);
    assert_eq!(ring.used_idx(), 3);
    assert_eq!(&h_read(&mem, BUFS, 12)[10..12], &[3, 0], "num_buffers");
    assert_eq!(ring.used_elem(2), (2, 500));
}

fn h_read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// The driver adds a buffer just after the device found the ring short and
/// before it publishes `avail_event`: the driver still sees the old
/// `avail_event` and does not notify, and the device, re-checking after
/// re-arming, takes that buffer too but still lacks one. It must then
/// publish an `avail_event` covering the buffer it took, or the driver's
/// next addition will not notify either and the frame waits for ever.
#[test]
fn racing_buffer_addition_does_not_stall_the_pending_frame() {
    let mem = guest_memory();
    let ring = std::rc::Rc::new(std::cell::RefCell::new(TestRing::new(
        &mem, 0x1000, RING_SIZE,
    )));
    let backend = QueueBackend::new();
    let mut h = direct_handler(&mem, backend.clone(), &ring.borrow(), MRG_EVENT_IDX);
    for i in 0..2 {
        if driver_adds_buffer(&mut ring.borrow_mut(), Desc::w(BUFS + i * 0x1000, 1000)) {
            assert_eq!(h.queue_notified(0), Backlog::Empty);
        }
    }
    // Kicks the driver sent while the device was busy; the worker handles
    // them once it is done.
    let kicks = std::rc::Rc::new(std::cell::Cell::new(0));
    let (hook_ring, hook_kicks) = (ring.clone(), kicks.clone());
    let mut raced = false;
    crate::net::rxtx::seam::set_before_rearm(Some(Box::new(move || {
        if !std::mem::replace(&mut raced, true) {
            let mut ring = hook_ring.borrow_mut();
            if driver_adds_buffer(&mut ring, Desc::w(BUFS + 0x2000, 1000)) {
                hook_kicks.set(hook_kicks.get() + 1);
            }
        }
    })));
    // Four buffers' worth.
    let data = frame(3488, 4);
    backend.push(data.clone());
    h.backend_event(backend.as_raw_fd(), EventSet::IN);
    crate::net::rxtx::seam::set_before_rearm(None);
    assert_eq!(kicks.get(), 0, "the racing driver saw the old avail_event");
    for _ in 0..kicks.get() {
        assert_eq!(h.queue_notified(0), Backlog::Empty);
    }
    let mut ring = ring.borrow_mut();
    assert_eq!(ring.used_idx(), 0);
    assert_eq!(ring.avail_event(), 3, "device asks to hear of the fourth");

    if driver_adds_buffer(&mut ring, Desc::w(BUFS + 0x3000, 1000)) {
        assert_eq!(h.queue_notified(0), Backlog::Empty);
    }
    assert_eq!(ring.used_idx(), 4, "the frame is still pending");
    let lens: Vec<u32> = (0..4).map(|n| ring.used_elem(n).1).collect();
    assert_eq!(lens, vec![1000, 1000, 1000, 500]);
    let mut got = Vec::new();
    for (i, len) in lens.iter().enumerate() {
        got.extend(h_read(&mem, BUFS + i as u64 * 0x1000, *len as usize));
    }
    assert_eq!(&got[10..12], &[4, 0], "num_buffers");
    assert_eq!(&got[12..], &data[12..]);
}

/// A driver that moves its index back and forth while the device looks
/// (only a hostile one would) must not keep the worker going round.
#[test]
fn flapping_avail_index_does_not_spin_the_receive_path() {
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    // On a thread of its own, so that a regression fails instead of
    // hanging the test run.
    std::thread::spawn(move || {
        let mem = guest_memory();
        let mut ring = TestRing::new(&mem, 0x1000, RING_SIZE);
        let backend = QueueBackend::new();
        let mut h = direct_handler(&mem, backend.clone(), &ring, MRG_EVENT_IDX);
        for i in 0..3 {
            ring.add_chain(&[Desc::w(BUFS + i * 0x1000, 1000)]);
        }
        ring.set_avail_idx(2);
        let calls = std::rc::Rc::new(std::cell::Cell::new(0u32));
        let hook_calls = calls.clone();
        crate::net::rxtx::seam::set_before_rearm(Some(Box::new(move || {
            hook_calls.set(hook_calls.get() + 1);
            ring.set_avail_idx(5 - ring.avail_idx());
        })));
        backend.push(frame(3488, 1));
        h.backend_event(backend.as_raw_fd(), EventSet::IN);
        crate::net::rxtx::seam::set_before_rearm(None);
        let _ = done_tx.send(calls.get());
    });
    let rounds = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the receive path keeps going round");
    assert!(rounds <= 3, "{rounds} rounds");
}

/// A flood of frames the guest cannot take (here: too short to carry a
/// vnet header) is read at most `RX_FRAMES_PER_CALL` at a time; the rest
/// waits for the wakeup the handler schedules for itself, as the
/// edge-triggered backend will not fire again.
#[test]
fn receive_reads_a_bounded_number_of_frames_per_wakeup() {
    use crate::net::rxtx::RX_FRAMES_PER_CALL;
    let mem = guest_memory();
    let mut ring = TestRing::new(&mem, 0x1000, RING_SIZE);
    let backend = QueueBackend::new();
    let mut h = direct_handler(&mem, backend.clone(), &ring, 0);
    ring.add_chain(&[Desc::w(BUFS, 2048)]);
    let flood = 2 * RX_FRAMES_PER_CALL + 10;
    for _ in 0..flood {
        backend.push(vec![0; 5]);
    }
    let last = frame(40, 9);
    backend.push(last.clone());
    let fds = h.backend_fds();
    let resume = fds
        .iter()
        .map(|(fd, _)| *fd)
        .find(|fd| *fd != backend.as_raw_fd())
        .expect("a resume fd");

    h.backend_event(backend.as_raw_fd(), EventSet::IN);
    assert_eq!(backend.left(), flood + 1 - RX_FRAMES_PER_CALL);
    assert_eq!(h.resume.read().unwrap(), 1, "wakeup scheduled");
    // Other events in between do not lose the wakeup's work.
    h.resume.write(1).unwrap();
    assert_eq!(h.queue_notified(0), Backlog::Empty);
    assert_eq!(backend.left(), flood + 1 - 2 * RX_FRAMES_PER_CALL);
    h.backend_event(resume, EventSet::IN);
    assert_eq!(backend.left(), 0);
    assert_eq!(ring.used_idx(), 1);
    assert_eq!(&h_read(&mem, BUFS + 12, 40), &last[12..]);
    // Dry: a stale wakeup does nothing, and schedules none.
    h.backend_event(resume, EventSet::IN);
    assert!(h.resume.read().is_err());
}

/// The same through the worker thread: one edge from the backend, and every
/// frame behind the flood still arrives.
#[test]
fn frames_behind_a_flood_arrive_after_one_backend_edge() {
    let mem = guest_memory();
    let backend = QueueBackend::new();
    let mut net = Net::with_backends(vec![backend.clone()], None, RING_SIZE).unwrap();
    net.ack_features(0);
    let mut rings: Vec<TestRing> = (0..2)
        .map(|q| TestRing::new(&mem, 0x1000 * (q + 1), RING_SIZE))
        .collect();
    let (activations, kicks): (Vec<_>, Vec<_>) = rings
        .iter()
        .enumerate()
        .map(|(q, r)| r.activation(q as u16))
        .unzip();
    rings[0].add_chain(&[Desc::w(BUFS, 2048)]);
    let irq = Arc::new(RecordingInterrupt::default());
    net.activate(atomic(&mem), irq, activations).unwrap();
    kicks[0].write(1).unwrap();
    for _ in 0..1000 {
        backend.push(vec![0; 5]);
    }
    let last = frame(40, 7);
    backend.push(last.clone());
    backend.announce();
    assert!(rings[0].wait_used(1));
    assert_eq!(backend.left(), 0);
    let mut got = vec![0u8; 40];
    mem.read_slice(&mut got, GuestAddress(BUFS + 12)).unwrap();
    assert_eq!(&got[..], &last[12..]);
    net.reset();
}
