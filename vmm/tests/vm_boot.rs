//! Boots tiny guests on the host's /dev/kvm through `Vm`: both boot
//! entries, every way a guest can end the VM, stopping a halted guest, and
//! what unclaimed accesses read.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmm::vcpu::VcpuError;
use vmm::vm::{VmError, VmExitStatus};

#[test]
fn pvh_guest_sees_start_info_prints_and_powers_off() {
    let mut t = build_vm(&pvh_image(), 64 * MIB, 1, "p console=ttyS0");
    assert_eq!(t.run(TIMEOUT).unwrap(), VmExitStatus::PowerOff);
    assert_eq!(t.serial.text(), "PVH OK p console=ttyS0\n");
}

#[test]
fn long_mode_vmlinux_gets_boot_params_in_rsi() {
    // 2 GiB so the guest can check the identity map past the first GiB;
    // MAP_NORESERVE keeps that cheap.
    let mut t = build_vm(&long_mode_image(), 2 * GIB, 1, "lm root=/dev/vda");
    assert_eq!(t.run(TIMEOUT).unwrap(), VmExitStatus::PowerOff);
    assert_eq!(t.serial.text(), "LM OK lm root=/dev/vda\nHIGH OK\n");
}

#[test]
fn acpi_reset_register_ends_with_reset() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 1, "r");
    assert_eq!(t.run(TIMEOUT).unwrap(), VmExitStatus::Reset);
    assert_eq!(t.serial.text(), "PVH OK r\n");
}

#[test]
fn i8042_reset_line_ends_with_reset() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 1, "k");
    assert_eq!(t.run(TIMEOUT).unwrap(), VmExitStatus::Reset);
}

#[test]
fn triple_fault_ends_the_vm() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 1, "t");
    assert_eq!(
        t.run(TIMEOUT).unwrap(),
        VmExitStatus::TripleFault { vcpu: 0 }
    );
}

#[test]
fn stop_handle_kicks_halted_vcpus() {
    // The boot vCPU halts with interrupts off inside KVM; the others never
    // got a SIPI and wait inside KVM_RUN too. All must be kicked out.
    let mut t = build_vm(&pvh_image(), 32 * MIB, 3, "h");
    let start = Instant::now();
    assert_eq!(
        t.run(Duration::from_millis(300)).unwrap(),
        VmExitStatus::Stopped
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(t.serial.text(), "PVH OK h\n");
}

#[test]
fn power_off_with_several_vcpus_stops_them_all() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 4, "p");
    let start = Instant::now();
    assert_eq!(t.run(TIMEOUT).unwrap(), VmExitStatus::PowerOff);
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn unclaimed_port_and_mmio_read_all_ones() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 1, "u");
    assert_eq!(t.run(TIMEOUT).unwrap(), VmExitStatus::PowerOff);
    assert_eq!(t.serial.text(), "PVH OK u\nffffffffffffffffff\n");
}

#[test]
fn executing_from_unbacked_memory_is_a_vm_error() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 1, "x");
    let e = t.run(TIMEOUT).unwrap_err();
    // KVM cannot fetch instructions from MMIO: an emulation failure (or,
    // on some hosts, an MMIO exit for the fetch that we then cannot run).
    assert!(
        matches!(
            e,
            VmError::Vcpu(VcpuError::InternalError { .. } | VcpuError::UnexpectedExit { .. })
        ),
        "{e}"
    );
    assert!(e.to_string().contains("vCPU 0"), "{e}");
}

#[test]
fn run_needs_setup_and_runs_once() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 1, "p");
    assert!(matches!(t.vm.run(), Err(VmError::NotSetUp)));
    assert_eq!(t.run(TIMEOUT).unwrap(), VmExitStatus::PowerOff);
    assert!(matches!(t.vm.run(), Err(VmError::NotSetUp)));
}

/// A device model with a bug the guest can reach.
struct PanickingDevice;

impl devices::BusDevice for PanickingDevice {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {
        panic!("device model bug");
    }
}

#[test]
fn a_panicking_device_fails_the_vm_instead_of_hanging_it() {
    let mut t = build_vm(&pvh_image(), 32 * MIB, 2, "p");
    t.devices.io_bus.remove(0x3f8).unwrap();
    t.devices
        .io_bus
        .insert(
            std::sync::Arc::new(std::sync::Mutex::new(PanickingDevice)),
            0x3f8,
            8,
        )
        .unwrap();
    let e = t.run(TIMEOUT).unwrap_err();
    assert!(
        matches!(&e, VmError::Vcpu(VcpuError::Panicked { id: 0, message }) if message == "device model bug"),
        "{e}"
    );
}
