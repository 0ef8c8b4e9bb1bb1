//! A debug exit port: a guest write ends the VM with a status of the
//! guest's choosing, so test guests can report pass or fail through the
//! VMM's exit status. Port 0xf4 is where QEMU's isa-debug-exit usually sits,
//! so the same guest runs under both VMMs.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// The conventional port.
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
/// One dword wide, so any access width at the port lands here.
pub const DEBUG_EXIT_LEN: u64 = 4;

/// No status written yet.
const NO_STATUS: u16 = u16::MAX;

/// The status a guest wrote, shared with whoever reports the VM's end.
#[derive(Clone, Debug)]
pub struct DebugExitStatus(Arc<AtomicU16>);

impl DebugExitStatus {
    /// The low byte of the guest's first write, if it wrote.
    pub fn get(&self) -> Option<u8> {
        match self.0.load(Ordering::Acquire) {
            NO_STATUS => None,
            status => Some(status as u8),
        }
    }
}

/// The device: records the status and signals `exit_evt`.
pub struct DebugExit {
    status: DebugExitStatus,
    exit_evt: EventFd,
}

impl DebugExit {
    /// A debug exit port that writes `exit_evt` (the VM's power-off event)
    /// when the guest writes to it.
    pub fn new(exit_evt: EventFd) -> Self {
        DebugExit {
            status: DebugExitStatus(Arc::new(AtomicU16::new(NO_STATUS))),
            exit_evt,
        }
    }

    /// The shared status cell.
    pub fn status(&self) -> DebugExitStatus {
        self.status.clone()
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        let Some(&status) = data.first().filter(|_| offset == 0) else {
            return;
        };
        // The first status wins: a guest racing several writes cannot turn
        // a failure into a success.
        let _ = self.status.0.compare_exchange(
            NO_STATUS,
            u16::from(status),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        log::info!("guest wrote {status:#x} to the debug exit port");
        if let Err(e) = self.exit_evt.write(1) {
            log::error!("debug exit: cannot signal the VM to stop: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    #[test]
    fn first_write_sets_the_status_and_ends_the_vm() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut port = DebugExit::new(evt.try_clone().unwrap());
        let status = port.status();
        assert_eq!(status.get(), None);
        port.write(DEBUG_EXIT_PORT, 0, &0x0000_0011u32.to_le_bytes());
        assert_eq!(status.get(), Some(0x11));
        assert_eq!(evt.read().unwrap(), 1);
        port.write(DEBUG_EXIT_PORT, 0, &[0]);
        assert_eq!(status.get(), Some(0x11), "the first status wins");
    }

    #[test]
    fn writes_at_other_offsets_and_reads_do_nothing() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let mut port = DebugExit::new(evt.try_clone().unwrap());
        port.write(DEBUG_EXIT_PORT, 1, &[0]);
        port.write(DEBUG_EXIT_PORT, 0, &[]);
        assert_eq!(port.status().get(), None);
        assert!(evt.read().is_err(), "no exit signalled");
        let mut data = [0; 4];
        port.read(DEBUG_EXIT_PORT, 0, &mut data);
        assert_eq!(data, [0xff; 4]);
    }
}
