//! Helpers shared by the platform integration tests: temporary kernel
//! files, a VM with COM1 and the i8042 wired the way the device manager
//! does it, and a run with a timeout.

#![allow(dead_code)]

pub mod elf;
pub mod guests;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use devices::i8042::{I8042Device, I8042_BASE, I8042_LEN};
use devices::serial::{Serial, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use devices::Bus;
use vm_allocator::layout::COM1_IRQ;
use vm_allocator::SystemAllocatorConfig;
use vmm::vm::{PciHostInfo, PlatformConfig, Vm, VmDevices, VmError, VmExitStatus};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use elf::ElfBuilder;
use guests::{LONG_MODE_KERNEL, LONG_MODE_KERNEL_ADDR, PVH_KERNEL, PVH_KERNEL_ADDR};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Fails the test loudly when KVM is missing: these tests must run.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: the platform tests need KVM"
    );
}

/// A file removed when dropped.
pub struct TempFile(pub PathBuf);

impl TempFile {
    pub fn new(bytes: &[u8]) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "trellis-platform-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, bytes).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Collects what the guest writes to the serial port.
#[derive(Clone, Default)]
pub struct SerialOutput(Arc<Mutex<Vec<u8>>>);

impl SerialOutput {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for SerialOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The PVH test kernel as an ELF with the PVH note.
pub fn pvh_image() -> Vec<u8> {
    ElfBuilder::new(PVH_KERNEL_ADDR)
        .segment(PVH_KERNEL_ADDR, PVH_KERNEL)
        .pvh(PVH_KERNEL_ADDR as u32)
        .build()
}

/// The long-mode test kernel as an ELF vmlinux (no PVH note).
pub fn long_mode_image() -> Vec<u8> {
    ElfBuilder::new(LONG_MODE_KERNEL_ADDR)
        .segment(LONG_MODE_KERNEL_ADDR, LONG_MODE_KERNEL)
        .build()
}

/// A VM ready for `setup`, with COM1 and the i8042 on its I/O bus.
pub struct TestVm {
    pub vm: Vm,
    pub devices: VmDevices,
    pub serial: SerialOutput,
    _kernel: TempFile,
}

pub fn config(kernel: &Path, mem_size: u64, vcpus: u8, cmdline: &str) -> PlatformConfig {
    PlatformConfig {
        kernel: kernel.to_path_buf(),
        initramfs: None,
        cmdline: cmdline.to_string(),
        mem_size,
        vcpus,
    }
}

/// Builds a VM for `image` the way the device manager would: serial on
/// COM1 with its interrupt as an irqfd on GSI 4, i8042 on the VM's reset
/// eventfd, empty MMIO bus.
pub fn build_vm(image: &[u8], mem_size: u64, vcpus: u8, cmdline: &str) -> TestVm {
    require_kvm();
    let kernel = TempFile::new(image);
    let vm = Vm::new(config(&kernel.0, mem_size, vcpus, cmdline)).unwrap();
    let io_bus = Arc::new(Bus::new());
    let serial = SerialOutput::default();
    let evt = EventFd::new(EFD_NONBLOCK).unwrap();
    vm.vm_fd().register_irqfd(&evt, COM1_IRQ).unwrap();
    io_bus
        .insert(
            Arc::new(Mutex::new(Serial::new(evt, serial.clone()))),
            SERIAL_PORT_BASE,
            SERIAL_PORT_LEN,
        )
        .unwrap();
    io_bus
        .insert(
            Arc::new(Mutex::new(I8042Device::new(vm.reset_evt().unwrap()))),
            I8042_BASE,
            I8042_LEN,
        )
        .unwrap();
    let allocator = SystemAllocatorConfig::for_x86_64(vm.ram_end()).unwrap();
    let devices = VmDevices {
        io_bus,
        mmio_bus: Arc::new(Bus::new()),
        pci_host: PciHostInfo::new(&allocator),
    };
    TestVm {
        vm,
        devices,
        serial,
        _kernel: kernel,
    }
}

impl TestVm {
    /// `setup` then `run`, stopping the VM after `timeout` if the guest has
    /// not ended it by then (the status is then `Stopped`).
    pub fn run(&mut self, timeout: Duration) -> Result<VmExitStatus, VmError> {
        self.vm.setup(&self.devices)?;
        let stop = self.vm.stop_handle();
        let (tx, rx) = mpsc::channel::<()>();
        let timer = std::thread::spawn(move || {
            if rx.recv_timeout(timeout) == Err(mpsc::RecvTimeoutError::Timeout) {
                stop.stop();
            }
        });
        let result = self.vm.run();
        drop(tx);
        timer.join().unwrap();
        result
    }
}

/// Empty buses and the default PCI windows, for VMs that are only set up.
pub fn bare_devices() -> VmDevices {
    VmDevices {
        io_bus: Arc::new(Bus::new()),
        mmio_bus: Arc::new(Bus::new()),
        pci_host: PciHostInfo::default(),
    }
}

/// Generous: the guests take milliseconds, but CI machines can be slow.
pub const TIMEOUT: Duration = Duration::from_secs(20);
