//! 16550A UART (COM1) on the port I/O bus.
//!
//! The register model comes from `vm_superio::Serial`; this module adapts it
//! to [`BusDevice`], raises its interrupt through an `EventFd` (which the VMM
//! registers as a KVM irqfd for IOAPIC pin 4) and lets the host feed console
//! input into the receive FIFO.

use std::io::{self, Write};

use log::{debug, error, warn};
use thiserror::Error;
use vm_superio::serial::Error as UartError;
use vm_superio::{Serial as Uart, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// First I/O port of COM1.
pub const SERIAL_PORT_BASE: u64 = 0x3f8;
/// Number of I/O ports (registers) a 16550 occupies.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Errors from feeding input to the UART.
#[derive(Debug, Error)]
pub enum SerialError {
    /// The bytes were queued but the guest could not be interrupted.
    #[error("failed to signal the serial interrupt: {0}")]
    Interrupt(#[source] io::Error),
}

/// An `EventFd` that `vm_superio` can raise as the UART's interrupt line.
///
/// A newtype because `Trigger` and `EventFd` both live in other crates.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Wraps `evt`; each trigger adds 1 to its counter.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }

    /// The wrapped eventfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550A UART that writes guest output to `W`.
pub struct Serial<W: Write + Send> {
    uart: Uart<EventFdTrigger, vm_superio::serial::NoEvents, W>,
    // A dead output (say, a closed pipe) fails on every byte the guest
    // prints; warn once, then drop to debug so the log is not flooded.
    output_failed: bool,
}

impl<W: Write + Send> Serial<W> {
    /// Creates a UART in its power-on state that signals `interrupt_evt`
    /// when it raises its interrupt and writes transmitted bytes to `out`.
    pub fn new(interrupt_evt: EventFd, out: W) -> Self {
        Serial {
            uart: Uart::new(EventFdTrigger::new(interrupt_evt), out),
            output_failed: false,
        }
    }

    /// The eventfd the UART signals to interrupt the guest.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.uart.interrupt_evt().eventfd()
    }

    /// Free space, in bytes, left in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues host input (e.g. from stdin) for the guest to read from RBR,
    /// raising the receive interrupt if the guest enabled it.
    ///
    /// Returns how many bytes were accepted: fewer than `bytes.len()` (maybe
    /// zero) when the FIFO fills up, so the caller should keep the rest and
    /// retry once the guest drained it. Bytes are dropped, and 0 returned,
    /// while the guest has the UART in loopback mode, as on real hardware.
    /// On [`SerialError::Interrupt`] the bytes were still queued.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> Result<usize, SerialError> {
        // The library treats a full FIFO as an error; for a caller that
        // simply retries later "nothing accepted" says the same thing.
        if bytes.is_empty() || self.uart.fifo_capacity() == 0 {
            return Ok(0);
        }
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => Ok(n),
            Err(UartError::Trigger(e)) => Err(SerialError::Interrupt(e)),
            Err(UartError::FullFifo) => Ok(0),
            // Not produced by enqueueing, which never touches the output.
            Err(UartError::IOError(e)) => {
                debug!("serial: unexpected output error while enqueueing input: {e}");
                Ok(0)
            }
        }
    }

    /// Maps a bus offset to a register index if the access is a byte access
    /// inside the UART, the only kind a 16550 decodes.
    fn register(offset: u64, len: usize) -> Option<u8> {
        if len != 1 || offset >= SERIAL_PORT_LEN {
            return None;
        }
        u8::try_from(offset).ok()
    }
}

impl<W: Write + Send> BusDevice for Serial<W> {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        match Self::register(offset, data.len()) {
            Some(reg) => {
                if let Some(b) = data.first_mut() {
                    *b = self.uart.read(reg);
                }
            }
            None => {
                debug!(
                    "serial: ignoring {}-byte read at offset {offset:#x}",
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let (Some(reg), Some(&value)) = (Self::register(offset, data.len()), data.first()) else {
            debug!(
                "serial: ignoring {}-byte write at offset {offset:#x}",
                data.len()
            );
            return;
        };
        match self.uart.write(reg, value) {
            // Only a data write proves the output works again.
            Ok(()) if reg == 0 => self.output_failed = false,
            Ok(()) => {}
            // The UART still raised THR-empty, so the guest keeps going; the
            // byte is lost, which is all a serial line can do.
            Err(UartError::IOError(e)) => {
                if self.output_failed {
                    debug!("serial: output still failing: {e}");
                } else {
                    warn!("serial: failed to write guest output, dropping bytes: {e}");
                    self.output_failed = true;
                }
            }
            Err(UartError::Trigger(e)) => error!("serial: failed to signal interrupt: {e}"),
            Err(UartError::FullFifo) => debug!("serial: loopback FIFO full"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    // Register offsets and bits, spelled out to check the device against
    // the 16550 datasheet rather than against itself.
    const RBR_THR: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const IIR_NO_INT: u8 = 0x01;
    const IIR_THRE: u8 = 0x02;
    const IIR_RDA: u8 = 0x04;
    const LCR_DLAB: u8 = 0x80;
    const MCR_LOOP: u8 = 0x10;
    const LSR_DR: u8 = 0x01;
    const LSR_THRE: u8 = 0x20;
    const LSR_TEMT: u8 = 0x40;

    /// Output sink whose contents the test can still see after handing it
    /// to the device.
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

    /// Output that always fails, like a closed pipe.
    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    fn setup() -> (Serial<SharedBuf>, SharedBuf, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let serial = Serial::new(evt.try_clone().unwrap(), out.clone());
        (serial, out, evt)
    }

    fn rd(s: &mut impl BusDevice, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(SERIAL_PORT_BASE, offset, &mut b);
        b[0]
    }

    fn wr(s: &mut impl BusDevice, offset: u64, v: u8) {
        s.write(SERIAL_PORT_BASE, offset, &[v]);
    }

    /// Number of times the interrupt fired since the last call.
    fn irqs(evt: &EventFd) -> u64 {
        evt.read().unwrap_or(0)
    }

    #[test]
    fn thr_writes_reach_output() {
        let (mut s, out, evt) = setup();
        for &b in b"hi\n" {
            wr(&mut s, RBR_THR, b);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // Interrupts are off at reset.
        assert_eq!(irqs(&evt), 0);
        // The transmitter is always ready.
        assert_eq!(rd(&mut s, LSR) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn enabling_thre_interrupt_signals_eventfd() {
        let (mut s, _out, evt) = setup();
        assert_eq!(rd(&mut s, IIR) & 0x0f, IIR_NO_INT);
        wr(&mut s, IER, IER_THRE);
        assert_eq!(irqs(&evt), 1);
        assert_eq!(rd(&mut s, IER), IER_THRE);
        // Pending THRE shows in IIR (with the 16550A FIFO bits) and reading
        // IIR acknowledges it.
        assert_eq!(rd(&mut s, IIR), 0xc0 | IIR_THRE);
        assert_eq!(rd(&mut s, IIR) & 0x0f, IIR_NO_INT);
        // Each transmitted byte raises THRE again.
        wr(&mut s, RBR_THR, b'x');
        assert_eq!(irqs(&evt), 1);
    }

    #[test]
    fn input_readable_from_rbr() {
        let (mut s, _out, evt) = setup();
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(s.enqueue_input(b"ab").unwrap(), 2);
        // Receive interrupt not enabled: no signal.
        assert_eq!(irqs(&evt), 0);
        assert_eq!(rd(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut s, RBR_THR), b'a');
        assert_eq!(rd(&mut s, LSR) & LSR_DR, LSR_DR);
        assert_eq!(rd(&mut s, RBR_THR), b'b');
        assert_eq!(rd(&mut s, LSR) & LSR_DR, 0);
        assert_eq!(s.enqueue_input(b"").unwrap(), 0);
    }

    #[test]
    fn input_raises_receive_interrupt_when_enabled() {
        let (mut s, _out, evt) = setup();
        wr(&mut s, IER, IER_RDA);
        assert_eq!(irqs(&evt), 0);
        s.enqueue_input(b"z").unwrap();
        assert_eq!(irqs(&evt), 1);
        assert_eq!(rd(&mut s, IIR) & 0x0f, IIR_RDA);
        assert_eq!(rd(&mut s, RBR_THR), b'z');
    }

    #[test]
    fn fifo_fills_and_reports_partial_acceptance() {
        let (mut s, _out, _evt) = setup();
        let cap = s.fifo_capacity();
        assert!(cap > 0);
        let input = vec![b'q'; cap + 10];
        assert_eq!(s.enqueue_input(&input).unwrap(), cap);
        assert_eq!(s.fifo_capacity(), 0);
        assert_eq!(s.enqueue_input(b"more").unwrap(), 0);
        rd(&mut s, RBR_THR);
        assert_eq!(s.enqueue_input(b"more").unwrap(), 1);
    }

    #[test]
    fn loopback_drops_host_input_and_echoes_thr() {
        let (mut s, out, _evt) = setup();
        wr(&mut s, MCR, MCR_LOOP);
        assert_eq!(s.enqueue_input(b"x").unwrap(), 0);
        wr(&mut s, RBR_THR, b'L');
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(rd(&mut s, RBR_THR), b'L');
    }

    #[test]
    fn divisor_latch_and_scratch() {
        let (mut s, out, _evt) = setup();
        wr(&mut s, LCR, LCR_DLAB | 0x03);
        wr(&mut s, RBR_THR, 0x01);
        wr(&mut s, IER, 0x00);
        assert_eq!(rd(&mut s, RBR_THR), 0x01);
        assert_eq!(rd(&mut s, IER), 0x00);
        wr(&mut s, LCR, 0x03);
        // With DLAB clear, offset 0 is THR again; the divisor write above
        // must not have been printed.
        assert!(out.0.lock().unwrap().is_empty());
        wr(&mut s, SCR, 0xa5);
        assert_eq!(rd(&mut s, SCR), 0xa5);
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_ignored() {
        let (mut s, out, evt) = setup();
        let mut buf = [0u8; 2];
        s.read(SERIAL_PORT_BASE, RBR_THR, &mut buf);
        assert_eq!(buf, [0xff; 2]);
        let mut buf = [0u8; 4];
        s.read(SERIAL_PORT_BASE, 4, &mut buf);
        assert_eq!(buf, [0xff; 4]);
        assert_eq!(rd(&mut s, 8), 0xff);
        assert_eq!(rd(&mut s, u64::MAX), 0xff);
        // A wide THR write prints nothing; a wide IER write enables nothing.
        s.write(SERIAL_PORT_BASE, RBR_THR, b"ab");
        s.write(SERIAL_PORT_BASE, IER, &[IER_THRE, 0]);
        wr(&mut s, 0x100 + IER, IER_THRE);
        s.write(SERIAL_PORT_BASE, IER, &[]);
        assert!(out.0.lock().unwrap().is_empty());
        assert_eq!(rd(&mut s, IER), 0);
        assert_eq!(irqs(&evt), 0);
    }

    #[test]
    fn broken_output_does_not_panic_and_still_interrupts() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut s = Serial::new(evt.try_clone().unwrap(), BrokenPipe);
        wr(&mut s, IER, IER_THRE);
        assert_eq!(irqs(&evt), 1);
        rd(&mut s, IIR);
        for &b in b"lost" {
            wr(&mut s, RBR_THR, b);
            // The guest must not stall waiting for THR-empty.
            assert_eq!(irqs(&evt), 1);
            rd(&mut s, IIR);
        }
        assert!(s.output_failed);
    }

    /// Output that fails a given number of times, then works.
    struct Flaky {
        failures_left: usize,
        out: SharedBuf,
    }

    impl Write for Flaky {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if self.failures_left > 0 {
                self.failures_left -= 1;
                return Err(io::Error::from(io::ErrorKind::WouldBlock));
            }
            self.out.write(buf)
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_recovers_after_transient_errors() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let flaky = Flaky {
            failures_left: 2,
            out: out.clone(),
        };
        let mut s = Serial::new(evt, flaky);
        for &b in b"abcd" {
            wr(&mut s, RBR_THR, b);
            if b == b'b' {
                assert!(s.output_failed);
            }
        }
        assert!(!s.output_failed);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"cd");
    }

    #[test]
    fn failed_interrupt_signal_does_not_panic() {
        let (mut s, out, evt) = setup();
        // An eventfd counter at its maximum makes a non-blocking write fail.
        evt.write(u64::MAX - 1).unwrap();
        wr(&mut s, IER, IER_THRE | IER_RDA);
        wr(&mut s, RBR_THR, b'k');
        assert_eq!(out.0.lock().unwrap().as_slice(), b"k");
        // Reset the RDA identification so enqueueing triggers again.
        rd(&mut s, IIR);
        assert!(matches!(
            s.enqueue_input(b"x"),
            Err(SerialError::Interrupt(_))
        ));
        // The byte was queued regardless.
        assert_eq!(irqs(&evt), u64::MAX - 1);
        assert_eq!(rd(&mut s, RBR_THR), b'x');
    }

    #[test]
    fn works_through_the_bus() {
        let bus = crate::Bus::new();
        let (s, out, _evt) = setup();
        bus.insert(Arc::new(Mutex::new(s)), SERIAL_PORT_BASE, SERIAL_PORT_LEN)
            .unwrap();
        bus.write(SERIAL_PORT_BASE, b"!").unwrap();
        let mut lsr = [0u8];
        bus.read(SERIAL_PORT_BASE + LSR, &mut lsr).unwrap();
        assert_eq!(lsr[0] & LSR_THRE, LSR_THRE);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"!");
    }

    #[test]
    fn interrupt_evt_is_the_given_eventfd() {
        let (s, _out, evt) = setup();
        s.interrupt_evt().write(3).unwrap();
        assert_eq!(irqs(&evt), 3);
    }
}
