//! ACPI power management for a hardware-reduced ACPI platform: the FADT's
//! sleep control, sleep status and reset registers, as three byte-wide I/O
//! ports.
//!
//! A guest powers off by writing SLP_EN together with the S5 sleep type
//! (from the DSDT's `\_S5` package) to the sleep control register, and
//! resets by writing the FADT's reset value to the reset register. Both end
//! up as writes to eventfds the VMM waits on.

use log::{error, info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// First I/O port of the device.
pub const ACPI_PM_BASE: u64 = 0x600;
/// Ports claimed: sleep control, sleep status, reset, and one spare so the
/// range is naturally aligned.
pub const ACPI_PM_LEN: u64 = 4;

/// Offset of the sleep control register (FADT `SLEEP_CONTROL_REG`).
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register (FADT `SLEEP_STATUS_REG`).
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register (FADT `RESET_REG`).
pub const RESET_OFFSET: u64 = 2;

/// Value the guest writes to the reset register (FADT `RESET_VALUE`); the
/// traditional "hard reset" value of port 0xCF9.
pub const RESET_VALUE: u8 = 0x06;
/// Sleep type of S5 (soft off), as listed in the DSDT's `\_S5` package.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Sleep control: SLP_EN, "enter the sleep state now".
const SLP_EN: u8 = 1 << 5;
/// Sleep control: SLP_TYPx field, bits 4:2.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// The ACPI power-management register block.
#[derive(Debug)]
pub struct AcpiPmDevice {
    poweroff_evt: EventFd,
    reset_evt: EventFd,
}

impl AcpiPmDevice {
    /// Creates the device; a power-off request writes 1 to `poweroff_evt`,
    /// a reset request writes 1 to `reset_evt`.
    pub fn new(poweroff_evt: EventFd, reset_evt: EventFd) -> Self {
        AcpiPmDevice {
            poweroff_evt,
            reset_evt,
        }
    }

    /// The eventfd signalled when the guest enters S5.
    pub fn poweroff_evt(&self) -> &EventFd {
        &self.poweroff_evt
    }

    /// The eventfd signalled when the guest writes the reset value.
    pub fn reset_evt(&self) -> &EventFd {
        &self.reset_evt
    }

    fn write_sleep_control(&mut self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == S5_SLEEP_TYPE {
            info!("acpi: guest entered S5, powering off");
            if let Err(e) = self.poweroff_evt.write(1) {
                error!("acpi: failed to signal power-off: {e}");
            }
        } else {
            // Only \_S5 is advertised; other states are not implemented.
            warn!("acpi: guest requested unsupported sleep type {sleep_type}; ignored");
        }
    }

    fn write_reset(&mut self, value: u8) {
        if value == RESET_VALUE {
            info!("acpi: guest requested reset");
            if let Err(e) = self.reset_evt.write(1) {
                error!("acpi: failed to signal reset: {e}");
            }
        } else {
            warn!("acpi: write of {value:#x} to the reset register ignored");
        }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _base: u64, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (SLEEP_CONTROL_OFFSET, 1) => 0,
            // No sleep state is ever entered and left, so WAK_STS and
            // everything else in the status register stay clear.
            (SLEEP_STATUS_OFFSET, 1) => 0,
            // The reset register is write-only; reads return zero.
            (RESET_OFFSET, 1) => 0,
            _ => 0xff,
        };
        data.fill(value);
    }

    fn write(&mut self, _base: u64, offset: u64, data: &[u8]) {
        // The registers are byte-wide (the FADT says so); treat a wider
        // access as a write of its first byte to the register it starts at.
        let Some(&value) = data.first() else {
            return;
        };
        match offset {
            SLEEP_CONTROL_OFFSET => self.write_sleep_control(value),
            RESET_OFFSET => self.write_reset(value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Bus;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn setup() -> (Bus, EventFd, EventFd) {
        let off = EventFd::new(EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(EFD_NONBLOCK).unwrap();
        let dev = AcpiPmDevice::new(off.try_clone().unwrap(), reset.try_clone().unwrap());
        let bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(dev)), ACPI_PM_BASE, ACPI_PM_LEN)
            .unwrap();
        (bus, off, reset)
    }

    #[test]
    fn s5_powers_off() {
        let (bus, off, reset) = setup();
        bus.write(ACPI_PM_BASE, &[(S5_SLEEP_TYPE << 2) | SLP_EN])
            .unwrap();
        assert_eq!(off.read().unwrap(), 1);
        assert!(reset.read().is_err());
    }

    #[test]
    fn other_sleep_writes_do_nothing() {
        let (bus, off, _) = setup();
        // S5 type without SLP_EN, and SLP_EN with S3.
        bus.write(ACPI_PM_BASE, &[S5_SLEEP_TYPE << 2]).unwrap();
        bus.write(ACPI_PM_BASE, &[(3 << 2) | SLP_EN]).unwrap();
        assert!(off.read().is_err());
    }

    #[test]
    fn reset_value_resets() {
        let (bus, off, reset) = setup();
        bus.write(ACPI_PM_BASE + RESET_OFFSET, &[1]).unwrap();
        assert!(reset.read().is_err());
        bus.write(ACPI_PM_BASE + RESET_OFFSET, &[RESET_VALUE])
            .unwrap();
        assert_eq!(reset.read().unwrap(), 1);
        assert!(off.read().is_err());
    }

    #[test]
    fn reads() {
        let (bus, _, _) = setup();
        let mut b = [0xaau8];
        bus.read(ACPI_PM_BASE + SLEEP_STATUS_OFFSET, &mut b)
            .unwrap();
        assert_eq!(b, [0]);
        let mut w = [0u8; 2];
        bus.read(ACPI_PM_BASE, &mut w).unwrap();
        assert_eq!(w, [0xff, 0xff]);
        let mut spare = [0u8];
        bus.read(ACPI_PM_BASE + 3, &mut spare).unwrap();
        assert_eq!(spare, [0xff]);
        // Wide writes and writes to the spare port are harmless.
        bus.write(ACPI_PM_BASE + 3, &[0xff]).unwrap();
        bus.write(ACPI_PM_BASE, &[0, 0, 0, 0]).unwrap();
    }
}
