//! The one part of the i8042 keyboard controller a VM needs: its CPU reset
//! line.
//!
//! Linux (`reboot=k`, the default fallback on x86) reboots by waiting for
//! the controller's input buffer to drain and then writing command 0xFE
//! ("pulse output line 0") to port 0x64. This device turns that into a
//! write to an eventfd the VMM watches to end or restart the VM. There is
//! no keyboard behind it: the status always reads "nothing to read, ready
//! for a command", so drivers find no data and never wait.

use log::{debug, error, info};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// First I/O port claimed by the controller (the data port).
pub const I8042_BASE: u64 = 0x60;
/// Ports 0x60..=0x64: data port through command/status port.
pub const I8042_LEN: u64 = 5;

/// Offset of the data port (0x60) from [`I8042_BASE`].
const DATA_OFFSET: u64 = 0;
/// Offset of the command (write) / status (read) port (0x64).
const COMMAND_OFFSET: u64 = 4;

/// Command that pulses the CPU reset line low.
pub const CMD_RESET_CPU: u8 = 0xfe;

/// Status bit 2, "system flag": set once the controller passed its
/// self-test, which firmware would have done before the guest runs. The
/// output-buffer-full (bit 0) and input-buffer-full (bit 1) bits stay
/// clear, so nobody waits on the controller.
const STATUS_SYSTEM_FLAG: u8 = 0x04;

/// i8042 controller exposing only the reset line.
#[derive(Debug)]
pub struct I8042Device {
    reset_evt: EventFd,
}

impl I8042Device {
    /// Creates the controller; a guest reset request writes 1 to `reset_evt`.
    pub fn new(reset_evt: EventFd) -> Self {
        I8042Device { reset_evt }
    }

    /// The eventfd signalled when the guest asks for a CPU reset.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset_evt
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (COMMAND_OFFSET, 1) => STATUS_SYSTEM_FLAG,
            // No keyboard, so never any data; the status says so too.
            (DATA_OFFSET, 1) => 0,
            // Ports 0x61-0x63 are not the controller's, and registers are
            // byte-wide: read as an absent device would.
            _ => {
                debug!(
                    "i8042: {}-byte read at offset {offset:#x} not decoded",
                    data.len()
                );
                0xff
            }
        };
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        match (offset, data) {
            (COMMAND_OFFSET, &[CMD_RESET_CPU]) => {
                info!("i8042: guest requested CPU reset");
                // The VM cannot be reset some other way from here; if this
                // fails the guest will typically spin or try another method.
                if let Err(e) = self.reset_evt.write(1) {
                    error!("i8042: failed to signal reset event: {e}");
                }
            }
            (COMMAND_OFFSET, &[cmd]) => debug!("i8042: ignoring command {cmd:#04x}"),
            _ => debug!(
                "i8042: ignoring {}-byte write {data:02x?} at offset {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::Bus;

    fn setup() -> (I8042Device, EventFd) {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        (I8042Device::new(evt.try_clone().unwrap()), evt)
    }

    /// How often the reset eventfd was signalled since the last call.
    fn reset_count(evt: &EventFd) -> u64 {
        // A non-blocking eventfd with a zero count fails with EAGAIN.
        evt.read().unwrap_or(0)
    }

    #[test]
    fn reset_command_signals_eventfd() {
        let (mut dev, evt) = setup();
        dev.write(I8042_BASE, COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(reset_count(&evt), 1);
        dev.write(I8042_BASE, COMMAND_OFFSET, &[CMD_RESET_CPU]);
        dev.write(I8042_BASE, COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(reset_count(&evt), 2);
    }

    #[test]
    fn other_commands_do_not_reset() {
        let (mut dev, evt) = setup();
        for cmd in (0u8..=0xff).filter(|&c| c != CMD_RESET_CPU) {
            dev.write(I8042_BASE, COMMAND_OFFSET, &[cmd]);
        }
        assert_eq!(reset_count(&evt), 0);
    }

    #[test]
    fn reset_value_elsewhere_does_not_reset() {
        let (mut dev, evt) = setup();
        for offset in 0..COMMAND_OFFSET {
            dev.write(I8042_BASE, offset, &[CMD_RESET_CPU]);
        }
        // Wide writes are not a byte command, even if the low byte matches.
        dev.write(I8042_BASE, COMMAND_OFFSET, &[CMD_RESET_CPU, 0]);
        dev.write(I8042_BASE, COMMAND_OFFSET, &[]);
        dev.write(I8042_BASE, 0x100, &[CMD_RESET_CPU]);
        assert_eq!(reset_count(&evt), 0);
    }

    #[test]
    fn status_and_data_reads() {
        let (mut dev, _evt) = setup();
        let mut b = [0xaau8];
        dev.read(I8042_BASE, COMMAND_OFFSET, &mut b);
        // Input buffer empty (Linux's reboot loop proceeds), output empty.
        assert_eq!(b[0] & 0x03, 0);
        let mut b = [0xaau8];
        dev.read(I8042_BASE, DATA_OFFSET, &mut b);
        assert_eq!(b[0], 0);
        let mut b = [0u8];
        dev.read(I8042_BASE, 1, &mut b);
        assert_eq!(b[0], 0xff);
        let mut w = [0u8; 2];
        dev.read(I8042_BASE, DATA_OFFSET, &mut w);
        assert_eq!(w, [0xff; 2]);
        dev.read(I8042_BASE, u64::MAX, &mut w);
        assert_eq!(w, [0xff; 2]);
    }

    #[test]
    fn linux_reboot_sequence_through_the_bus() {
        let bus = Bus::new();
        let (dev, evt) = setup();
        bus.insert(Arc::new(Mutex::new(dev)), I8042_BASE, I8042_LEN)
            .unwrap();
        // Wait for the input buffer to drain, then pulse reset.
        let mut status = [0xffu8];
        for _ in 0..10 {
            bus.read(0x64, &mut status).unwrap();
            if status[0] & 0x02 == 0 {
                break;
            }
        }
        assert_eq!(status[0] & 0x02, 0);
        bus.write(0x64, &[0xfe]).unwrap();
        assert_eq!(reset_count(&evt), 1);
        // 0x65 is outside the controller.
        assert!(bus.write(0x65, &[0xfe]).is_err());
    }

    #[test]
    fn failed_reset_signal_does_not_panic() {
        let (mut dev, evt) = setup();
        // An eventfd counter at its maximum makes a non-blocking write fail
        // with EAGAIN.
        evt.write(u64::MAX - 1).unwrap();
        dev.write(I8042_BASE, COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(reset_count(&evt), u64::MAX - 1);
    }

    #[test]
    fn reset_evt_accessor() {
        let (dev, evt) = setup();
        dev.reset_evt().write(1).unwrap();
        assert_eq!(reset_count(&evt), 1);
    }
}
