//! virtio-console tests: output to an in-memory writer, input from a
//! socket pair.

use std::os::unix::net::UnixStream;
use std::time::Duration;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::test_ring::{
    atomic, guest_memory, wait_until, Desc, RecordingInterrupt, TestRing, MEM_SIZE,
};

const RING_SIZE: u16 = 16;
const BUFS: u64 = 0x10_0000;

/// A writer tests can look into.
#[derive(Clone, Default)]
struct SharedBuf(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuf {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn contents(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// A writer that always fails.
struct Broken;

impl Write for Broken {
    fn write(&mut self, _: &[u8]) -> io::Result<usize> {
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }
    fn flush(&mut self) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::BrokenPipe))
    }
}

struct Harness {
    mem: GuestMemoryMmap,
    console: Console,
    rings: Vec<TestRing>,
    kicks: Vec<EventFd>,
    irq: Arc<RecordingInterrupt>,
}

impl Harness {
    fn new(console: Console, acked: u64) -> Self {
        let mem = guest_memory();
        let mut console = console;
        console.ack_features(acked);
        let rings: Vec<TestRing> = (0..2)
            .map(|q| TestRing::new(&mem, 0x1000 * (q + 1), RING_SIZE))
            .collect();
        let (activations, kicks): (Vec<_>, Vec<_>) = rings
            .iter()
            .enumerate()
            .map(|(q, r)| r.activation(q as u16))
            .unzip();
        let irq = Arc::new(RecordingInterrupt::default());
        console
            .activate(atomic(&mem), irq.clone(), activations)
            .unwrap();
        Harness {
            mem,
            console,
            rings,
            kicks,
            irq,
        }
    }

    fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }
}

/// A console reading from a socket; returns the test's end too.
fn with_input(output: Box<dyn Write + Send>) -> (Console, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let input = ConsoleInput::new(OwnedFd::from(ours)).unwrap();
    (Console::new(output, Some(input)), theirs)
}

#[test]
fn features_and_config_space() {
    let plain = Console::new(Box::new(io::sink()), None);
    assert_eq!(plain.device_type(), crate::device_type::CONSOLE);
    assert_eq!(plain.queue_max_sizes(), &[QUEUE_SIZE, QUEUE_SIZE]);
    assert_eq!(plain.features() & (1 << VIRTIO_CONSOLE_F_SIZE), 0);
    assert_ne!(plain.features() & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
    assert_ne!(plain.features() & (1 << VIRTIO_RING_F_INDIRECT_DESC), 0);
    assert_eq!(plain.config_size(), 12);
    let mut config = [0xffu8; 16];
    plain.read_config(0, &mut config);
    assert_eq!(config, [0; 16]);

    let sized = Console::new(Box::new(io::sink()), None).with_size(132, 43);
    assert_ne!(sized.features() & (1 << VIRTIO_CONSOLE_F_SIZE), 0);
    sized.read_config(0, &mut config);
    assert_eq!(&config[..4], &[132, 0, 43, 0]);
    assert_eq!(&config[4..], &[0; 12], "one port, no emergency write");
    let mut rows = [0u8; 2];
    sized.read_config(2, &mut rows);
    assert_eq!(rows, [43, 0]);
}

#[test]
fn guest_output_reaches_the_writer() {
    let out = SharedBuf::default();
    let mut h = Harness::new(Console::new(Box::new(out.clone()), None), 0);
    h.mem
        .write_slice(b"hello, world\n", GuestAddress(BUFS))
        .unwrap();
    h.rings[1].add_chain(&[Desc::r(BUFS, 7), Desc::r(BUFS + 7, 6)]);
    h.kicks[1].write(1).unwrap();
    assert!(h.rings[1].wait_used(1));
    assert_eq!(out.contents(), b"hello, world\n");
    assert_eq!(h.rings[1].used_elem(0), (0, 0));
    assert!(h.irq.count(1) >= 1);
}

#[test]
fn hostile_transmit_chains_write_nothing() {
    let out = SharedBuf::default();
    let mut h = Harness::new(Console::new(Box::new(out.clone()), None), 0);
    h.mem.write_slice(b"secret", GuestAddress(BUFS)).unwrap();
    h.rings[1].add_chain(&[Desc::r(BUFS, 3), Desc::w(BUFS + 3, 3)]);
    h.rings[1].add_chain(&[Desc::r(BUFS, 3), Desc::r(u64::MAX - 1, 3)]);
    h.rings[1].add_chain(&[Desc::r(MEM_SIZE as u64 - 2, 4)]);
    h.rings[1].publish(RING_SIZE);
    h.kicks[1].write(1).unwrap();
    assert!(h.rings[1].wait_used(3));
    std::thread::sleep(Duration::from_millis(20));
    assert!(out.contents().is_empty());
    // Still working afterwards.
    h.rings[1].add_chain(&[Desc::r(BUFS, 6)]);
    h.kicks[1].write(1).unwrap();
    assert!(h.rings[1].wait_used(4));
    assert_eq!(out.contents(), b"secret");
}

#[test]
fn output_errors_are_survived() {
    let mut h = Harness::new(Console::new(Box::new(Broken), None), 0);
    for _ in 0..3 {
        h.rings[1].add_chain(&[Desc::r(BUFS, 16)]);
    }
    h.kicks[1].write(1).unwrap();
    assert!(h.rings[1].wait_used(3));
}

#[test]
fn input_fills_receive_buffers() {
    let (console, mut peer) = with_input(Box::new(io::sink()));
    let mut h = Harness::new(console, 0);
    h.rings[0].add_chain(&[Desc::w(BUFS, 2)]);
    h.rings[0].add_chain(&[Desc::w(BUFS + 0x100, 4), Desc::w(BUFS + 0x200, 4)]);
    h.kicks[0].write(1).unwrap();
    peer.write_all(b"abcdefg").unwrap();
    assert!(h.rings[0].wait_used(2));
    assert_eq!(h.rings[0].used_elem(0), (0, 2));
    assert_eq!(h.rings[0].used_elem(1), (1, 5));
    assert_eq!(h.read(BUFS, 2), b"ab");
    assert_eq!(h.read(BUFS + 0x100, 4), b"cdef");
    assert_eq!(h.read(BUFS + 0x200, 1), b"g");
    assert!(h.irq.count(0) >= 1);
}

#[test]
fn input_waits_for_buffers_then_hostile_chains_are_skipped() {
    let (console, mut peer) = with_input(Box::new(io::sink()));
    let mut h = Harness::new(console, 1 << VIRTIO_RING_F_EVENT_IDX);
    peer.write_all(b"typed early").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.rings[0].used_idx(), 0);
    // A readable buffer and one outside RAM are returned empty; the input
    // lands in the next good buffer.
    h.rings[0].add_chain(&[Desc::r(BUFS, 64)]);
    h.rings[0].add_chain(&[Desc::w(1 << 40, 64)]);
    h.rings[0].add_chain(&[Desc::w(BUFS + 0x100, 64)]);
    h.kicks[0].write(1).unwrap();
    assert!(h.rings[0].wait_used(3));
    assert_eq!(h.rings[0].used_elem(0).1, 0);
    assert_eq!(h.rings[0].used_elem(1).1, 0);
    assert_eq!(h.rings[0].used_elem(2), (2, 11));
    assert_eq!(h.read(BUFS + 0x100, 11), b"typed early");
    // Out of buffers again: with EVENT_IDX the device asks to hear about
    // the next one.
    peer.write_all(b"more").unwrap();
    assert!(wait_until(|| h.rings[0].avail_event() == 3));
    h.rings[0].add_chain(&[Desc::w(BUFS + 0x200, 64)]);
    h.kicks[0].write(1).unwrap();
    assert!(h.rings[0].wait_used(4));
    assert_eq!(h.read(BUFS + 0x200, 4), b"more");
}

#[test]
fn pending_input_is_bounded_and_keeps_the_newest_bytes() {
    let (ours, mut theirs) = UnixStream::pair().unwrap();
    let input = Arc::new(ConsoleInput::new(OwnedFd::from(ours)).unwrap());
    let mem = guest_memory();
    let mut handler = ConsoleHandler {
        mem: atomic(&mem),
        interrupt: Arc::new(RecordingInterrupt::default()),
        rx: None,
        tx: None,
        output: Arc::new(Mutex::new(Box::new(io::sink()))),
        input: Some(input),
        input_open: true,
        pending: VecDeque::new(),
        output_failing: false,
    };
    let data: Vec<u8> = (0..MAX_PENDING_INPUT + 1000)
        .map(|i| (i % 251) as u8)
        .collect();
    let writer = std::thread::spawn(move || {
        theirs.write_all(&data).unwrap();
        drop(theirs);
        data
    });
    while handler.input_open {
        handler.read_input();
        std::thread::sleep(Duration::from_millis(1));
    }
    let data = writer.join().unwrap();
    assert_eq!(handler.pending.len(), MAX_PENDING_INPUT);
    let newest = &data[data.len() - MAX_PENDING_INPUT..];
    assert!(handler.pending.iter().eq(newest.iter()));
    // End of file stops reading for good.
    handler.read_input();
    assert!(!handler.input_open);
}

#[test]
fn file_output_constructor() {
    let path = std::env::temp_dir().join(format!("trellis-console-{}", std::process::id()));
    let console = Console::with_file_output(&path, None).unwrap();
    assert_eq!(console.features() & (1 << VIRTIO_CONSOLE_F_SIZE), 0);
    let mut h = Harness::new(console, 0);
    h.mem
        .write_slice(b"to the file", GuestAddress(BUFS))
        .unwrap();
    h.rings[1].add_chain(&[Desc::r(BUFS, 11)]);
    h.kicks[1].write(1).unwrap();
    assert!(h.rings[1].wait_used(1));
    h.console.reset();
    assert_eq!(std::fs::read(&path).unwrap(), b"to the file");
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(
        Console::with_file_output(Path::new("/nonexistent/dir/file"), None),
        Err(ConsoleError::OpenOutput { .. })
    ));
}

#[test]
fn activation_rules_and_reset() {
    let out = SharedBuf::default();
    let mut h = Harness::new(Console::new(Box::new(out.clone()), None), 0);
    let (again, _) = h.rings[0].activation(0);
    assert!(h
        .console
        .activate(atomic(&h.mem), h.irq.clone(), vec![again])
        .is_err());
    h.console.reset();
    let (third, _) = h.rings[0].activation(2);
    assert!(matches!(
        h.console
            .activate(atomic(&h.mem), h.irq.clone(), vec![third]),
        Err(ActivateError::BadQueues(_))
    ));
    // After a reset the device starts over on new rings; output survives.
    let tx = TestRing::new(&h.mem, 0x8000, RING_SIZE);
    let (activation, kick) = tx.activation(1);
    h.console
        .activate(atomic(&h.mem), h.irq.clone(), vec![activation])
        .unwrap();
    let mut tx = tx;
    h.mem.write_slice(b"again", GuestAddress(BUFS)).unwrap();
    tx.add_chain(&[Desc::r(BUFS, 5)]);
    kick.write(1).unwrap();
    assert!(tx.wait_used(1));
    assert_eq!(out.contents(), b"again");
}
