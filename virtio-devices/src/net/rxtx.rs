//! The virtio-net worker: moves frames between the virtqueues and the
//! backends, and answers the control queue.
//!
//! Queue layout (virtio 1.2 §5.1.2): receiveq N = 2N, transmitq N = 2N+1,
//! then the control queue (at 2 × max pairs with MQ, else at 2).
//! Backend `i` serves transmitq `i`; frames it receives go to receiveq
//! `i mod active pairs`, so that a multiqueue tap steering flows to a
//! queue the driver has not enabled (yet) never strands them.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use event_manager::EventSet;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR, VIRTIO_NET_OK,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::tap::{NetBackend, VNET_HDR_LEN};
use crate::queue::{
    add_used, collect_bufs, collect_split, read_from_bufs, rearm, serve_chains, signal_used,
    write_to_bufs, ChainBufs,
};
use crate::worker::{Backlog, WorkerHandler};
use crate::{GuestMemoryMmapAtomic, VirtioInterrupt};

/// Largest frame, header included, in either direction: a 64 KiB GSO frame
/// plus Ethernet/VLAN headers and the vnet header.
pub const MAX_FRAME_LEN: usize = 65562;
/// Most bytes a control command may carry (ours need a handful).
const MAX_CTRL_LEN: usize = 4096;
/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Most frames one receive pass reads from a backend before letting the
/// worker serve its other events (vhost-net's packet weight): a flood,
/// even of frames that are all dropped, cannot monopolise the worker.
pub(crate) const RX_FRAMES_PER_CALL: usize = 256;

/// One backend and the frame it read that no receive buffer took yet.
pub(crate) struct BackendState {
    backend: Arc<dyn NetBackend>,
    rx_buf: Vec<u8>,
    /// Length of the frame waiting in `rx_buf`.
    pending: Option<usize>,
    /// A write returned WouldBlock; retry transmit when writable.
    tx_blocked: bool,
    /// Receive stopped at its per-call limit with frames perhaps left.
    rx_more: bool,
    /// Transmit, resumed by a writable backend, stopped at its per-pass
    /// budget with chains left.
    tx_more: bool,
}

impl BackendState {
    pub(crate) fn new(backend: Arc<dyn NetBackend>) -> Self {
        BackendState {
            backend,
            rx_buf: vec![0; MAX_FRAME_LEN],
            pending: None,
            tx_blocked: false,
            rx_more: false,
            tx_more: false,
        }
    }
}

/// What became of a received frame.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// In the guest's buffers.
    Done,
    /// Dropped; `used` says whether chains were returned to the driver.
    Dropped { used: bool },
    /// Not enough receive buffers; the driver had made available up to
    /// index `seen`.
    NoBuffers { seen: u16 },
}

/// Everything the worker thread owns.
pub(crate) struct NetHandler {
    pub(crate) mem: GuestMemoryMmapAtomic,
    pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
    pub(crate) backends: Vec<BackendState>,
    /// Receive and transmit queues of the pairs the driver can use (one
    /// without MQ); `None` if it did not enable that queue.
    pub(crate) rx: Vec<Option<Queue>>,
    pub(crate) tx: Vec<Option<Queue>>,
    /// The control queue and its index.
    pub(crate) ctrl: Option<(u16, Queue)>,
    pub(crate) mrg_rxbuf: bool,
    /// Without GUEST_CSUM the header's flags must reach the driver as zero
    /// (§5.1.6.4.1); the tap may still mark checksums DATA_VALID.
    pub(crate) guest_csum: bool,
    pub(crate) mq: bool,
    /// Pairs in use: 1 until the driver sets more with VQ_PAIRS_SET.
    pub(crate) active_pairs: usize,
    pub(crate) tx_buf: Vec<u8>,
    /// Level-triggered wakeup for backend work cut short by its per-call
    /// limit: receive ([`RX_FRAMES_PER_CALL`]) or transmit resumed by a
    /// writable backend (the queue's chain budget).
    pub(crate) resume: EventFd,
}

impl NetHandler {
    /// Receives into the queues whatever backend `i` has, until it runs dry
    /// or the target receive queue runs out of buffers (then the frame
    /// stays pending and the backend is not read again before the driver
    /// adds buffers), or [`RX_FRAMES_PER_CALL`] frames were read (then the
    /// worker is woken again through `resume` to read on, after whatever
    /// else is ready).
    pub(crate) fn process_rx(&mut self, i: usize) {
        let target = i % self.active_pairs.max(1);
        let Some(state) = self.backends.get_mut(i) else {
            return;
        };
        let Some(Some(queue)) = self.rx.get_mut(target) else {
            // No receive queue: leave frames in the backend.
            return;
        };
        state.rx_more = false;
        let mem = self.mem.memory();
        let mut used = false;
        let mut frames = 0;
        // For the frame in hand: the most chains past `next_avail` that a
        // round short of buffers saw, and rounds in a row that saw no more.
        let mut furthest: Option<u16> = None;
        let mut fruitless = 0;
        loop {
            if state.pending.is_none() && frames >= RX_FRAMES_PER_CALL {
                // The edge-triggered backend will not wake us for the
                // frames it still holds.
                state.rx_more = true;
                if let Err(e) = self.resume.write(1) {
                    log::error!("virtio-net: cannot reschedule receive: {e}");
                }
                break;
            }
            let len = match state.pending {
                Some(len) => len,
                None => match state.backend.read_frame(&mut state.rx_buf) {
                    Ok(0) => break,
                    Ok(len) => {
                        frames += 1;
                        len
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        log::warn!("virtio-net: backend {i} read failed: {e}");
                        break;
                    }
                },
            };
            state.pending = Some(len);
            let frame = &mut state.rx_buf[..len.min(MAX_FRAME_LEN)];
            if !self.guest_csum {
                if let Some(flags) = frame.first_mut() {
                    *flags = 0;
                }
            }
            match deliver_frame(queue, &mem, frame, self.mrg_rxbuf) {
                Delivery::Done => {
                    state.pending = None;
                    used = true;
                    (furthest, fruitless) = (None, 0);
                }
                Delivery::Dropped { used: returned } => {
                    state.pending = None;
                    used |= returned;
                    (furthest, fruitless) = (None, 0);
                }
                Delivery::NoBuffers { seen } => {
                    #[cfg(test)]
                    seam::before_rearm();
                    // A round that took more chains than the last is
                    // progress, even though the frame still does not fit:
                    // it must publish `avail_event = seen` and look again,
                    // or a driver that added buffers meanwhile never
                    // notifies again. Only rounds that see no more (a
                    // driver whose index runs ahead of its ring or moves
                    // back) count towards giving up, and an earlier round
                    // then published an `avail_event` at or past `seen`.
                    // Rounds per frame are bounded by the queue size.
                    // (`deliver_frame` put `next_avail` back.)
                    let ahead = seen.wrapping_sub(queue.next_avail());
                    if furthest.is_some_and(|f| ahead <= f) {
                        fruitless += 1;
                    } else {
                        (furthest, fruitless) = (Some(ahead), 1);
                    }
                    if !rearm(queue, &mem, seen, fruitless) {
                        break;
                    }
                }
            }
        }
        if used {
            signal_used(queue, &mem, self.interrupt.as_ref(), rx_index(target));
        }
    }

    /// Goes on with the backends whose receive or transmit stopped at its
    /// per-call limit.
    fn resume_backends(&mut self) {
        // Nothing to read means a stale wakeup: harmless.
        let _ = self.resume.read();
        for i in 0..self.backends.len() {
            if self.backends[i].rx_more {
                self.process_rx(i);
            }
            if self.backends[i].tx_more {
                self.backends[i].tx_more = false;
                self.transmit_from_backend_event(i);
            }
        }
    }

    /// Transmit outside a queue notification (the backend became writable
    /// again): a pass that stops at its budget is resumed through `resume`.
    fn transmit_from_backend_event(&mut self, i: usize) {
        if self.process_tx(i) == Backlog::Remaining {
            if let Some(state) = self.backends.get_mut(i) {
                state.tx_more = true;
            }
            if let Err(e) = self.resume.write(1) {
                log::error!("virtio-net: cannot reschedule transmit: {e}");
            }
        }
    }

    /// Sends every available chain of transmit queue `pair` to its backend.
    pub(crate) fn process_tx(&mut self, pair: usize) -> Backlog {
        let Some(Some(queue)) = self.tx.get_mut(pair) else {
            return Backlog::Empty;
        };
        let Some(state) = self.backends.get_mut(pair) else {
            return Backlog::Empty;
        };
        state.tx_blocked = false;
        let mem = self.mem.memory();
        let tx_buf = &mut self.tx_buf;
        serve_chains(
            queue,
            &mem,
            self.interrupt.as_ref(),
            tx_index(pair),
            |chain| {
                let head = chain.head_index();
                match collect_bufs(&mem, chain, false, MAX_FRAME_LEN) {
                    Ok(bufs) if bufs.total >= VNET_HDR_LEN => {
                        tx_buf.clear();
                        if let Err(e) = read_from_bufs(&mem, &bufs.bufs, tx_buf) {
                            log::debug!("virtio-net: tx chain {head} unreadable: {e}");
                        } else if let Err(e) = send_frame(state.backend.as_ref(), tx_buf) {
                            if e.kind() == io::ErrorKind::WouldBlock {
                                // Put the chain back and wait for the backend
                                // to become writable.
                                state.tx_blocked = true;
                                return None;
                            }
                            log::debug!("virtio-net: backend {pair} dropped a frame: {e}");
                        }
                    }
                    Ok(bufs) => log::debug!("virtio-net: tx chain {head} of {} bytes", bufs.total),
                    Err(e) => log::debug!("virtio-net: tx chain {head} dropped: {e}"),
                }
                // The device writes nothing into transmit buffers.
                Some(0)
            },
        )
    }

    /// Answers every available control command.
    pub(crate) fn process_ctrl(&mut self) -> Backlog {
        let Some((index, mut queue)) = self.ctrl.take() else {
            return Backlog::Empty;
        };
        let mem = self.mem.memory();
        let interrupt = Arc::clone(&self.interrupt);
        let pairs_before = self.active_pairs;
        let backlog = serve_chains(&mut queue, &mem, interrupt.as_ref(), index, |chain| {
            let head = chain.head_index();
            Some(match collect_split(&mem, chain, MAX_CTRL_LEN, usize::MAX) {
                Ok((command, reply)) => self.control_command(&mem, &command, &reply),
                Err(e) => {
                    log::debug!("virtio-net: control chain {head} dropped: {e}");
                    0
                }
            })
        });
        self.ctrl = Some((index, queue));
        if self.active_pairs != pairs_before {
            // Routing changed: pending frames may now have a queue with room.
            for i in 0..self.backends.len() {
                self.process_rx(i);
            }
        }
        backlog
    }

    /// Runs one control command and writes its ack; returns the used length.
    fn control_command(
        &mut self,
        mem: &GuestMemoryMmap,
        command: &ChainBufs,
        reply: &ChainBufs,
    ) -> u32 {
        let mut bytes = Vec::with_capacity(command.total);
        let ack = match read_from_bufs(mem, &command.bufs, &mut bytes) {
            Ok(()) => self.execute(&bytes),
            Err(e) => {
                log::debug!("virtio-net: unreadable control command: {e}");
                VIRTIO_NET_ERR as u8
            }
        };
        // The ack is the one byte the driver left writable.
        write_to_bufs(mem, &reply.bufs, &[ack]) as u32
    }

    /// Executes `class, command, data...`; returns VIRTIO_NET_OK or _ERR.
    fn execute(&mut self, bytes: &[u8]) -> u8 {
        let (Some(&class), Some(&command)) = (bytes.first(), bytes.get(1)) else {
            return VIRTIO_NET_ERR as u8;
        };
        let data = &bytes[2..];
        match (u32::from(class), u32::from(command)) {
            (VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET) if self.mq => {
                let Some(raw) = data.get(..2) else {
                    return VIRTIO_NET_ERR as u8;
                };
                let pairs = usize::from(u16::from_le_bytes([raw[0], raw[1]]));
                if pairs == 0 || pairs > self.rx.len() {
                    log::debug!("virtio-net: driver asked for {pairs} queue pairs");
                    return VIRTIO_NET_ERR as u8;
                }
                self.active_pairs = pairs;
                VIRTIO_NET_OK as u8
            }
            (class, command) => {
                log::debug!("virtio-net: unsupported control command {class}/{command}");
                VIRTIO_NET_ERR as u8
            }
        }
    }

    fn backend_by_fd(&self, fd: RawFd) -> Option<usize> {
        self.backends
            .iter()
            .position(|s| s.backend.as_raw_fd() == fd)
    }
}

/// Index of receiveq `pair`.
fn rx_index(pair: usize) -> u16 {
    u16::try_from(pair * 2).unwrap_or(u16::MAX)
}

/// Index of transmitq `pair`.
fn tx_index(pair: usize) -> u16 {
    u16::try_from(pair * 2 + 1).unwrap_or(u16::MAX)
}

/// Writes `frame` to `backend`, retrying if interrupted.
fn send_frame(backend: &dyn NetBackend, frame: &[u8]) -> io::Result<()> {
    loop {
        match backend.write_frame(frame) {
            Ok(n) if n == frame.len() => return Ok(()),
            Ok(n) => {
                return Err(io::Error::other(format!(
                    "short write: {n} of {} bytes",
                    frame.len()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Copies `frame` (vnet header first) into the next receive chain, or with
/// MRG_RXBUF into as many chains as it takes, recording their number in
/// the header's `num_buffers`.
fn deliver_frame(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    frame: &mut [u8],
    mrg: bool,
) -> Delivery {
    if frame.len() < VNET_HDR_LEN {
        log::debug!(
            "virtio-net: backend frame of {} bytes has no header",
            frame.len()
        );
        return Delivery::Dropped { used: false };
    }
    let start = queue.next_avail();
    let mut chains: Vec<(u16, ChainBufs)> = Vec::new();
    let mut capacity = 0usize;
    while capacity < frame.len() {
        if chains.len() >= usize::from(queue.size()) {
            // Even a full ring of these buffers cannot hold the frame.
            log::debug!(
                "virtio-net: {}-byte frame exceeds the receive ring",
                frame.len()
            );
            queue.set_next_avail(start);
            return Delivery::Dropped { used: false };
        }
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            let seen = queue.next_avail();
            queue.set_next_avail(start);
            return Delivery::NoBuffers { seen };
        };
        let head = chain.head_index();
        match collect_bufs(mem, chain, true, usize::MAX) {
            // Every buffer must hold at least a header (§5.1.6.3.1).
            Ok(bufs) if bufs.total >= VNET_HDR_LEN => {
                capacity = capacity.saturating_add(bufs.total);
                chains.push((head, bufs));
            }
            result => {
                match result {
                    Err(e) => log::debug!("virtio-net: rx chain {head} rejected: {e}"),
                    Ok(_) => log::debug!("virtio-net: rx chain {head} cannot hold a header"),
                }
                // Return everything taken so far, unused, and lose the frame.
                for (h, _) in &chains {
                    add_used(queue, mem, *h, 0);
                }
                add_used(queue, mem, head, 0);
                return Delivery::Dropped { used: true };
            }
        }
        if !mrg {
            break;
        }
    }
    if capacity < frame.len() {
        // Only reachable without MRG_RXBUF: the chain is too small for this
        // frame but is kept for a smaller one.
        log::debug!(
            "virtio-net: {}-byte frame dropped, rx buffer holds {capacity}",
            frame.len()
        );
        queue.set_next_avail(start);
        return Delivery::Dropped { used: false };
    }
    // At most the queue size, which fits in u16.
    let num_buffers = u16::try_from(chains.len()).unwrap_or(u16::MAX);
    frame[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&num_buffers.to_le_bytes());
    let mut offset = 0;
    for (head, bufs) in &chains {
        let written = write_to_bufs(mem, &bufs.bufs, &frame[offset..]);
        offset += written;
        // `written` is at most the chain's length, itself below 2^32.
        add_used(
            queue,
            mem,
            *head,
            u32::try_from(written).unwrap_or(u32::MAX),
        );
    }
    Delivery::Done
}

impl WorkerHandler for NetHandler {
    fn queue_notified(&mut self, index: u16) -> Backlog {
        let index = usize::from(index);
        if let Some((ctrl, _)) = &self.ctrl {
            if index == usize::from(*ctrl) {
                return self.process_ctrl();
            }
        }
        let pair = index / 2;
        if index % 2 == 1 {
            return self.process_tx(pair);
        }
        // New receive buffers: retry every backend that feeds this queue.
        let active = self.active_pairs.max(1);
        for i in 0..self.backends.len() {
            if i % active == pair {
                self.process_rx(i);
            }
        }
        Backlog::Empty
    }

    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        // Edge-triggered: a backend left unread for lack of receive buffers
        // must not wake the worker again and again.
        self.backends
            .iter()
            .map(|s| {
                (
                    s.backend.as_raw_fd(),
                    EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                )
            })
            .chain([(self.resume.as_raw_fd(), EventSet::IN)])
            .collect()
    }

    fn backend_event(&mut self, fd: RawFd, events: EventSet) {
        if fd == self.resume.as_raw_fd() {
            self.resume_backends();
            return;
        }
        let Some(i) = self.backend_by_fd(fd) else {
            return;
        };
        if events.contains(EventSet::OUT) && self.backends.get(i).is_some_and(|s| s.tx_blocked) {
            self.transmit_from_backend_event(i);
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            self.process_rx(i);
        }
    }
}

/// Test seam: lets a test play a driver that adds buffers at the worst
/// moment, after a receive found too few of them and before notifications
/// are re-armed.
#[cfg(test)]
pub(crate) mod seam {
    use std::cell::RefCell;

    thread_local! {
        static BEFORE_REARM: RefCell<Option<Box<dyn FnMut()>>> = const { RefCell::new(None) };
    }

    /// Runs `hook` on this thread each time the receive path is about to
    /// re-arm notifications for lack of buffers (`None` removes it).
    pub(crate) fn set_before_rearm(hook: Option<Box<dyn FnMut()>>) {
        BEFORE_REARM.with(|h| *h.borrow_mut() = hook);
    }

    pub(super) fn before_rearm() {
        BEFORE_REARM.with(|h| {
            if let Some(hook) = h.borrow_mut().as_mut() {
                hook();
            }
        });
    }
}
