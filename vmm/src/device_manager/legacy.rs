//! The legacy PC devices: the 8250 serial port on COM1 (with host
//! terminal input) and the i8042 reset line.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex, MutexGuard};

use devices::debug_exit::{DebugExit, DebugExitStatus, DEBUG_EXIT_LEN, DEBUG_EXIT_PORT};
use devices::i8042::{I8042Device, I8042_BASE, I8042_LEN};
use devices::serial::{Serial, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use devices::Bus;
use event_manager::{EventOps, EventSet, EventSubscriber, Events};
use log::{debug, warn};
use vm_allocator::layout::COM1_IRQ;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceManagerError, Output};
use crate::interrupt::IrqBackend;

/// The serial port as the device manager holds it.
pub type SerialDevice = Serial<Box<dyn Write + Send>>;

/// Puts a 16550A on COM1 (ports 0x3f8-0x3ff, IRQ 4 through an irqfd).
pub(crate) fn add_serial(
    io_bus: &Bus,
    irq: &dyn IrqBackend,
    output: &Output,
) -> Result<Option<Arc<Mutex<SerialDevice>>>, DeviceManagerError> {
    let out = output
        .writer()
        .map_err(|source| DeviceManagerError::Output {
            what: "serial port",
            source,
        })?;
    let Some(out) = out else {
        return Ok(None);
    };
    let evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceManagerError::EventFd)?;
    // An ISA line is edge-triggered: a plain irqfd pulse is the right shape.
    irq.register_irqfd(&evt, COM1_IRQ)
        .map_err(|source| DeviceManagerError::LegacyIrq {
            what: "serial port",
            gsi: COM1_IRQ,
            source,
        })?;
    let serial = Arc::new(Mutex::new(Serial::new(evt, out)));
    io_bus
        .insert(serial.clone(), SERIAL_PORT_BASE, SERIAL_PORT_LEN)
        .map_err(|source| DeviceManagerError::Bus {
            what: "serial port".to_string(),
            source,
        })?;
    Ok(Some(serial))
}

/// Puts the i8042 on ports 0x60-0x64; a guest reset request (`reboot=k`)
/// writes `reset_evt`.
pub(crate) fn add_i8042(io_bus: &Bus, reset_evt: EventFd) -> Result<(), DeviceManagerError> {
    io_bus
        .insert(
            Arc::new(Mutex::new(I8042Device::new(reset_evt))),
            I8042_BASE,
            I8042_LEN,
        )
        .map_err(|source| DeviceManagerError::Bus {
            what: "i8042".to_string(),
            source,
        })
}

/// Feeds the host's stdin to the serial port. The terminal is left in its
/// normal (cooked) mode: input arrives line by line and Ctrl-C still stops
/// the VMM.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    stdin: File,
    /// Bytes read from stdin that did not fit in the receive FIFO yet;
    /// offered again before new input.
    pending: Mutex<Vec<u8>>,
}

impl SerialInput {
    /// Input from this process' stdin (a duplicate of fd 0, read without
    /// buffering so epoll's view matches ours).
    pub fn new(serial: Arc<Mutex<SerialDevice>>) -> io::Result<Self> {
        let stdin = File::from(io::stdin().as_fd().try_clone_to_owned()?);
        Ok(SerialInput {
            serial,
            stdin,
            pending: Mutex::new(Vec::new()),
        })
    }

    fn lock_serial(&self) -> MutexGuard<'_, SerialDevice> {
        self.serial.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers `pending` to the FIFO and keeps what it did not take.
    fn flush(&self, pending: &mut Vec<u8>) {
        if pending.is_empty() {
            return;
        }
        match self.lock_serial().enqueue_input(pending) {
            Ok(n) => {
                pending.drain(..n);
            }
            Err(e) => {
                // The bytes were queued; only the interrupt was lost.
                warn!("serial input: {e}");
                pending.clear();
            }
        }
        if !pending.is_empty() {
            debug!("serial input: FIFO full, {} bytes wait", pending.len());
        }
    }
}

impl EventSubscriber for SerialInput {
    fn process(&self, events: Events, ops: &mut EventOps) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        self.flush(&mut pending);
        let mut buf = [0u8; 64];
        let n = if events.event_set().contains(EventSet::IN) {
            match (&self.stdin).read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    warn!("serial input: reading stdin failed, input stops: {e}");
                    0
                }
            }
        } else {
            0
        };
        if n == 0 {
            // EOF or hang-up: stop watching, or the loop would spin.
            if let Err(e) = ops.remove(Events::new(&self.stdin, EventSet::IN)) {
                warn!("serial input: cannot stop watching stdin: {e}");
            }
            return;
        }
        pending.extend_from_slice(&buf[..n]);
        self.flush(&mut pending);
    }

    fn init(&self, ops: &mut EventOps) {
        // Regular files and /dev/null cannot be polled: no input then.
        if let Err(e) = ops.add(Events::new(&self.stdin, EventSet::IN)) {
            debug!("serial input: stdin cannot be watched, no guest input: {e}");
        }
    }
}

/// Puts the debug exit port on 0xf4: a guest write ends the VM (through
/// `exit_evt`) with the status the guest wrote.
pub(crate) fn add_debug_exit(
    io_bus: &Bus,
    exit_evt: EventFd,
) -> Result<DebugExitStatus, DeviceManagerError> {
    let port = DebugExit::new(exit_evt);
    let status = port.status();
    io_bus
        .insert(Arc::new(Mutex::new(port)), DEBUG_EXIT_PORT, DEBUG_EXIT_LEN)
        .map_err(|source| DeviceManagerError::Bus {
            what: "debug exit port".to_string(),
            source,
        })?;
    Ok(status)
}
