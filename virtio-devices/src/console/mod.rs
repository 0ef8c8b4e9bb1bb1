//! virtio-console (virtio 1.2 §5.3) with a single port: no
//! VIRTIO_CONSOLE_F_MULTIPORT, so there are exactly two queues, receiveq 0
//! (host to guest) and transmitq 1 (guest to host).
//!
//! What the guest writes goes to any [`Write`] (stdout, a file, a test
//! buffer), flushed after every chain. What arrives on the optional input
//! fd is placed in receive buffers; while the guest has none, up to
//! [`MAX_PENDING_INPUT`] bytes wait in the device and older bytes are
//! dropped beyond that.

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::io::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use event_manager::EventSet;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddressSpace, GuestMemoryMmap};

use crate::device::read_config_bytes;
use crate::queue::{
    add_used, collect_bufs, rearm, serve_chains, signal_used, write_to_bufs, GuestBuf,
};
use crate::worker::{Backlog, DeviceWorker, WorkerHandler};
use crate::{
    device_type, ActivateError, GuestMemoryMmapAtomic, QueueActivation, VirtioDevice,
    VirtioInterrupt,
};

/// Feature bit: `cols` and `rows` in the configuration space are valid.
pub const VIRTIO_CONSOLE_F_SIZE: u32 = 0;
/// Input bytes kept while the guest offers no receive buffer.
pub const MAX_PENDING_INPUT: usize = 64 * 1024;
/// Size of both queues.
pub const QUEUE_SIZE: u16 = 256;

const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// cols, rows, max_nr_ports, emerg_wr.
const CONFIG_SPACE_SIZE: usize = 12;
/// Bytes copied per step between guest memory and the host.
const CHUNK: usize = 4096;

/// Why a console could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The output file could not be created.
    #[error("cannot create console output {path}: {source}")]
    OpenOutput {
        /// The file's path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The input fd could not be duplicated or made non-blocking.
    #[error("cannot set up console input: {0}")]
    Input(#[source] io::Error),
}

/// The console's input: a pollable file descriptor (terminal, pipe,
/// socket; not a regular file, which epoll refuses).
#[derive(Debug)]
pub struct ConsoleInput {
    file: File,
}

impl ConsoleInput {
    /// Takes `fd` and makes it non-blocking. O_NONBLOCK belongs to the open
    /// file description, so every descriptor sharing it (a terminal's
    /// stdin the fd was duplicated from, say) becomes non-blocking too.
    pub fn new(fd: OwnedFd) -> Result<Self, ConsoleError> {
        let raw = fd.as_raw_fd();
        // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
        let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
        if flags < 0 {
            return Err(ConsoleError::Input(io::Error::last_os_error()));
        }
        // SAFETY: F_SETFL on a descriptor we own, with an integer argument.
        let ret = unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) };
        if ret < 0 {
            return Err(ConsoleError::Input(io::Error::last_os_error()));
        }
        Ok(ConsoleInput {
            file: File::from(fd),
        })
    }

    /// A duplicate of the process's stdin (made non-blocking, see
    /// [`new`](Self::new)). Putting a terminal in raw mode, so that
    /// keystrokes reach the guest unprocessed, is the VMM's business.
    pub fn stdin() -> Result<Self, ConsoleError> {
        let fd = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(ConsoleError::Input)?;
        Self::new(fd)
    }
}

impl AsRawFd for ConsoleInput {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

type SharedOutput = Arc<Mutex<Box<dyn Write + Send>>>;

/// The terminal size (cols, rows) of `fd`, if it is a terminal.
fn tty_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `struct winsize` through the pointer,
    // which points to a live local of that type; on a non-terminal it
    // fails with ENOTTY and writes nothing.
    let ret = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (ret == 0 && ws.ws_col != 0 && ws.ws_row != 0).then_some((ws.ws_col, ws.ws_row))
}

/// A virtio console device.
pub struct Console {
    output: SharedOutput,
    input: Option<Arc<ConsoleInput>>,
    size: Option<(u16, u16)>,
    acked_features: u64,
    worker: Option<DeviceWorker<ConsoleHandler>>,
}

impl Console {
    /// A console writing guest output to `output` and feeding `input`, if
    /// any, to the guest. VIRTIO_CONSOLE_F_SIZE is not offered unless
    /// [`with_size`](Self::with_size) says otherwise.
    pub fn new(output: Box<dyn Write + Send>, input: Option<ConsoleInput>) -> Self {
        Console {
            output: Arc::new(Mutex::new(output)),
            input: input.map(Arc::new),
            size: None,
            acked_features: 0,
            worker: None,
        }
    }

    /// A console whose output goes to the process's stdout; offers its
    /// size when stdout is a terminal.
    pub fn with_stdout(input: Option<ConsoleInput>) -> Self {
        let size = tty_size(io::stdout().as_raw_fd());
        let console = Self::new(Box::new(io::stdout()), input);
        match size {
            Some((cols, rows)) => console.with_size(cols, rows),
            None => console,
        }
    }

    /// A console whose output goes to the file at `path`, created or
    /// truncated; offers its size when that file is a terminal.
    pub fn with_file_output(
        path: &Path,
        input: Option<ConsoleInput>,
    ) -> Result<Self, ConsoleError> {
        let file = File::create(path).map_err(|source| ConsoleError::OpenOutput {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self::with_file(file, input))
    }

    /// A console whose output goes to `file`, already open (the VMM opens
    /// it once and hands a duplicate to each VM it builds, so output
    /// continues where it was); offers its size when it is a terminal.
    pub fn with_file(file: File, input: Option<ConsoleInput>) -> Self {
        let size = tty_size(file.as_raw_fd());
        let console = Self::new(Box::new(file), input);
        match size {
            Some((cols, rows)) => console.with_size(cols, rows),
            None => console,
        }
    }

    /// Offers VIRTIO_CONSOLE_F_SIZE with this terminal size.
    pub fn with_size(mut self, cols: u16, rows: u16) -> Self {
        self.size = Some((cols, rows));
        self
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = 1 << VIRTIO_RING_F_EVENT_IDX | 1 << VIRTIO_RING_F_INDIRECT_DESC;
        if self.size.is_some() {
            features |= 1 << VIRTIO_CONSOLE_F_SIZE;
        }
        features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.features();
    }

    fn config_size(&self) -> usize {
        CONFIG_SPACE_SIZE
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SPACE_SIZE];
        if let Some((cols, rows)) = self.size {
            config[0..2].copy_from_slice(&cols.to_le_bytes());
            config[2..4].copy_from_slice(&rows.to_le_bytes());
        }
        read_config_bytes(&config, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmapAtomic,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<QueueActivation>,
    ) -> Result<(), ActivateError> {
        if self.worker.is_some() {
            return Err(ActivateError::BadQueues("device already active".into()));
        }
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut rx = None;
        let mut tx = None;
        let mut notifiers = Vec::with_capacity(queues.len());
        {
            let guard = mem.memory();
            for activation in queues {
                let mut queue = activation.queue;
                if !queue.is_valid(&*guard) {
                    return Err(ActivateError::BadQueues(format!(
                        "queue {} does not fit in guest memory",
                        activation.index
                    )));
                }
                queue.set_event_idx(event_idx);
                match activation.index {
                    RX_QUEUE => rx = Some(queue),
                    TX_QUEUE => tx = Some(queue),
                    index => {
                        return Err(ActivateError::BadQueues(format!(
                            "virtio-console has no queue {index}"
                        )))
                    }
                }
                notifiers.push((activation.index, activation.notifier));
            }
        }
        let handler = ConsoleHandler {
            mem,
            interrupt,
            rx,
            tx,
            output: Arc::clone(&self.output),
            input: self.input.clone(),
            input_open: self.input.is_some(),
            pending: VecDeque::new(),
            output_failing: false,
        };
        let worker = DeviceWorker::spawn("virtio-console", handler, notifiers)
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(worker) = self.worker.take() {
            // Input and output are shared with the device; only input not
            // yet delivered is lost.
            let _ = worker.stop();
        }
        self.acked_features = 0;
    }
}

/// The console's worker-thread state.
struct ConsoleHandler {
    mem: GuestMemoryMmapAtomic,
    interrupt: Arc<dyn VirtioInterrupt>,
    rx: Option<Queue>,
    tx: Option<Queue>,
    output: SharedOutput,
    input: Option<Arc<ConsoleInput>>,
    /// False once the input reached end of file or failed.
    input_open: bool,
    /// Input read but not yet in a receive buffer.
    pending: VecDeque<u8>,
    /// The last output write failed (to log a broken output once, not for
    /// every chain).
    output_failing: bool,
}

impl ConsoleHandler {
    /// Reads what the input has (at most [`MAX_PENDING_INPUT`] bytes per
    /// call, so that an endless writer cannot monopolise the worker).
    fn read_input(&mut self) {
        let Some(input) = self.input.as_ref().filter(|_| self.input_open) else {
            return;
        };
        let mut buf = [0u8; CHUNK];
        let mut total = 0;
        let mut dropped = 0;
        while total < MAX_PENDING_INPUT {
            match (&input.file).read(&mut buf) {
                Ok(0) => {
                    log::info!("virtio-console: input closed");
                    self.input_open = false;
                    break;
                }
                Ok(n) => {
                    total += n;
                    self.pending.extend(&buf[..n]);
                    let excess = self.pending.len().saturating_sub(MAX_PENDING_INPUT);
                    if excess > 0 {
                        self.pending.drain(..excess);
                        dropped += excess;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("virtio-console: input failed, ignoring it from now on: {e}");
                    self.input_open = false;
                    break;
                }
            }
        }
        if dropped > 0 {
            log::warn!("virtio-console: guest not reading input, dropped {dropped} bytes");
        }
    }

    /// Moves pending input into receive buffers.
    fn fill_rx(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let Some(queue) = self.rx.as_mut() else {
            return;
        };
        let mem = self.mem.memory();
        let mut used = false;
        let mut fruitless = 0;
        loop {
            let mut progress = false;
            while !self.pending.is_empty() {
                let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                    break;
                };
                progress = true;
                let head = chain.head_index();
                let len = match collect_bufs(&mem, chain, true, usize::MAX) {
                    Ok(bufs) => fill_buffers(&mem, &bufs.bufs, &mut self.pending),
                    Err(e) => {
                        log::debug!("virtio-console: rx chain {head} dropped: {e}");
                        0
                    }
                };
                used |= add_used(queue, &mem, head, len);
            }
            if self.pending.is_empty() {
                break;
            }
            if !progress {
                fruitless += 1;
            }
            // Out of buffers: ask for a notification when more come.
            if !rearm(queue, &mem, queue.next_avail(), fruitless) {
                break;
            }
        }
        if used {
            signal_used(queue, &mem, self.interrupt.as_ref(), RX_QUEUE);
        }
    }

    /// Writes every transmit chain to the output.
    fn process_tx(&mut self) -> Backlog {
        let Some(queue) = self.tx.as_mut() else {
            return Backlog::Empty;
        };
        let mem = self.mem.memory();
        serve_chains(queue, &mem, self.interrupt.as_ref(), TX_QUEUE, |chain| {
            let head = chain.head_index();
            match collect_bufs(&mem, chain, false, usize::MAX) {
                Ok(bufs) => {
                    let result = match self.output.lock() {
                        Ok(mut out) => write_output(&mem, &bufs.bufs, out.as_mut()),
                        Err(_) => Err(io::Error::other("output lock poisoned")),
                    };
                    match result {
                        Ok(()) => self.output_failing = false,
                        Err(e) if !self.output_failing => {
                            log::warn!("virtio-console: output failed: {e}");
                            self.output_failing = true;
                        }
                        Err(_) => {}
                    }
                }
                Err(e) => log::debug!("virtio-console: tx chain {head} dropped: {e}"),
            }
            // The device writes nothing into transmit buffers.
            Some(0)
        })
    }
}

/// Moves bytes from the front of `pending` into `bufs`; returns how many.
fn fill_buffers(mem: &GuestMemoryMmap, bufs: &[GuestBuf], pending: &mut VecDeque<u8>) -> u32 {
    let mut written = 0usize;
    for buf in bufs {
        let mut offset = 0;
        while offset < buf.len && !pending.is_empty() {
            let (front, _) = pending.as_slices();
            let n = front.len().min(buf.len - offset).min(CHUNK);
            let Some(addr) = buf.addr.0.checked_add(offset as u64) else {
                return u32::try_from(written).unwrap_or(u32::MAX);
            };
            let target = [GuestBuf {
                addr: vm_memory::GuestAddress(addr),
                len: n,
            }];
            let done = write_to_bufs(mem, &target, &front[..n]);
            pending.drain(..done);
            written += done;
            offset += done;
            if done < n {
                // Memory vanished under us: stop here.
                return u32::try_from(written).unwrap_or(u32::MAX);
            }
        }
    }
    // A chain holds less than 2^32 bytes.
    u32::try_from(written).unwrap_or(u32::MAX)
}

/// Copies `bufs` to `out` a chunk at a time (a guest can describe buffers
/// as large as its RAM) and flushes.
fn write_output(mem: &GuestMemoryMmap, bufs: &[GuestBuf], out: &mut dyn Write) -> io::Result<()> {
    let mut chunk = [0u8; CHUNK];
    for buf in bufs {
        let mut offset = 0;
        while offset < buf.len {
            let n = (buf.len - offset).min(CHUNK);
            let addr = buf
                .addr
                .0
                .checked_add(offset as u64)
                .map(vm_memory::GuestAddress)
                .ok_or_else(|| io::Error::other("buffer wraps the address space"))?;
            mem.read_slice(&mut chunk[..n], addr)
                .map_err(|e| io::Error::other(format!("guest memory: {e}")))?;
            out.write_all(&chunk[..n])?;
            offset += n;
        }
    }
    out.flush()
}

impl WorkerHandler for ConsoleHandler {
    fn queue_notified(&mut self, index: u16) -> Backlog {
        match index {
            RX_QUEUE => {
                // Input may have been left unread while pending was full.
                self.read_input();
                self.fill_rx();
                Backlog::Empty
            }
            TX_QUEUE => self.process_tx(),
            _ => Backlog::Empty,
        }
    }

    fn backend_fds(&self) -> Vec<(RawFd, EventSet)> {
        // Edge-triggered, so that a closed or idle input never spins.
        self.input
            .iter()
            .map(|i| (i.as_raw_fd(), EventSet::IN | EventSet::EDGE_TRIGGERED))
            .collect()
    }

    fn backend_event(&mut self, _fd: RawFd, _events: EventSet) {
        self.read_input();
        self.fill_rx();
    }
}
