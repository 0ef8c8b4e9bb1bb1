//! Buses that route guest port I/O and MMIO accesses to emulated devices,
//! and the legacy devices a PC guest expects (8250 UART, i8042 reset line,
//! ACPI power management), plus a debug exit port for test guests.

pub mod acpi_pm;
mod bus;
pub mod debug_exit;
pub mod i8042;
pub mod serial;

pub use bus::{Bus, BusError, BusRange};

/// A device that sits on a [`Bus`] and answers accesses inside its range.
///
/// `base` is the start of the range the device was inserted at and
/// `offset` is the access address relative to it, so a device that the guest
/// moves (a PCI BAR) does not need to track its own base. `data.len()` is the
/// access width: 1, 2, 4 or 8 bytes.
pub trait BusDevice: Send {
    /// Fills `data` for a guest read. Unclaimed bytes should read as all ones.
    fn read(&mut self, base: u64, offset: u64, data: &mut [u8]);
    /// Handles a guest write.
    fn write(&mut self, base: u64, offset: u64, data: &[u8]);
}
