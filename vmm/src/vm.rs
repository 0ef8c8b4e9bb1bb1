//! The VM as the platform sees it: KVM, guest memory, the kernel and its
//! boot structures, ACPI tables, vCPU threads, and waiting for the guest to
//! end.
//!
//! The seam with the device manager:
//!
//! 1. [`Vm::new`] opens KVM, creates the VM with its in-kernel irqchip
//!    (PIC, IOAPIC, LAPICs) and PIT, and maps guest RAM.
//! 2. The device manager builds its devices against [`Vm::vm_fd`],
//!    [`Vm::guest_memory`] / [`Vm::memory`] and an allocator from
//!    [`Vm::ram_end`]; the i8042 gets [`Vm::reset_evt`]. Serial and i8042
//!    are the device manager's (see `device_manager::add_legacy_devices`);
//!    the GSI routing table is the interrupt manager's, and must start from
//!    [`crate::arch::default_irqchip_routes`].
//! 3. [`Vm::setup`] takes the buses and the PCI host description
//!    ([`VmDevices`]), adds the ACPI PM device (power-off/reset registers at
//!    port 0x600, which the FADT points at) to the I/O bus, writes the ACPI
//!    tables, loads the kernel, and creates and configures the vCPUs.
//! 4. [`Vm::run`] starts one thread per vCPU and blocks until the guest
//!    powers off or resets, a vCPU fails, or [`VmStopHandle::stop`] is
//!    called; then it stops every vCPU and returns.
//!
//! A `Vm` runs once. A guest reset ends the run like a power-off, with
//! [`VmExitStatus::Reset`] (or [`VmExitStatus::TripleFault`]) so the caller
//! can tell them apart; rebooting is the caller's business: `trellis`
//! tears the whole VM down and builds a new one from the same
//! configuration (see [`crate::machine`]), as a reset would start a real
//! machine from scratch. All guest-initiated ends are `Ok`; `Err` means
//! the VM failed.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use devices::acpi_pm::{AcpiPmDevice, ACPI_PM_BASE, ACPI_PM_LEN};
use devices::{Bus, BusError};
use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, Kvm, VmFd};
use log::{error, info, warn};
use thiserror::Error;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

pub use crate::acpi::PciHostInfo;
use crate::acpi::{create_acpi_tables, AcpiError};
use crate::arch::{KVM_IDENTITY_MAP_START, KVM_TSS_START, MAX_VCPUS};
use crate::boot::{load_from_files, BootError, BootInfo};
use crate::memory::{GuestMemoryAtomicMmap, MemoryError, MemoryManager};
use crate::vcpu::{
    install_kick_handler, kick_signal, spawn_vcpu, Vcpu, VcpuError, VcpuRunState, VcpuStopReason,
};

/// epoll tokens of the VM's exit sources, lowest precedence first.
const TOKEN_POWEROFF: u64 = 0;
const TOKEN_RESET: u64 = 1;
const TOKEN_STOP: u64 = 2;
const TOKEN_VCPU_EXIT: u64 = 3;

/// The KVM API version every KVM since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// How long stopping vCPUs may take before we give up on a stuck thread.
const VCPU_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a vCPU that has not stopped yet is kicked again.
const VCPU_KICK_INTERVAL: Duration = Duration::from_millis(10);

/// What the platform needs to know to build a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformConfig {
    /// Kernel image: bzImage or ELF vmlinux (PVH or 64-bit entry).
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes (at least 4 MiB, a multiple of 4 KiB).
    pub mem_size: u64,
    /// Number of vCPUs (1..=254).
    pub vcpus: u8,
}

/// The devices side of the VM, as built by the device manager.
#[derive(Clone, Debug)]
pub struct VmDevices {
    /// Port I/O bus: vCPU `IoIn`/`IoOut` exits go here.
    pub io_bus: Arc<Bus>,
    /// MMIO bus: vCPU `MmioRead`/`MmioWrite` exits go here.
    pub mmio_bus: Arc<Bus>,
    /// The PCI host bridge for the DSDT and MCFG.
    pub pci_host: PciHostInfo,
}

/// How the guest ended the VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmExitStatus {
    /// The guest powered off (ACPI S5, or a KVM shutdown system event).
    PowerOff,
    /// The guest asked for a reset (ACPI reset register, i8042, or a KVM
    /// reset system event). The VM is not restarted here; see the module
    /// documentation.
    Reset,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`), which resets a real
    /// machine; also a last-resort reboot method of Linux.
    TripleFault {
        /// The vCPU that faulted.
        vcpu: u8,
    },
    /// [`VmStopHandle::stop`] was called.
    Stopped,
}

/// Errors building or running the VM.
#[derive(Debug, Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?): {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// Unexpected KVM API version.
    #[error("KVM API version {0} is not supported (expected {KVM_API_VERSION})")]
    KvmApiVersion(i32),
    /// A required KVM capability is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    /// A VM-level KVM call failed.
    #[error("{what} failed: {source}")]
    Kvm {
        /// The call.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU count is out of range.
    #[error("invalid vCPU count {requested}: must be 1..={max}")]
    InvalidVcpuCount {
        /// Requested.
        requested: u8,
        /// Largest allowed on this host.
        max: usize,
    },
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel could not be loaded.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The ACPI tables could not be written.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// A vCPU could not be set up, or failed while running.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The ACPI PM device could not be placed on the I/O bus.
    #[error("cannot place the ACPI PM device at port {ACPI_PM_BASE:#x}: {0}")]
    AcpiPmDevice(#[source] BusError),
    /// An eventfd or epoll call failed.
    #[error("{what} failed: {source}")]
    Io {
        /// The call.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `run` before `setup`, or a second `run`.
    #[error("the VM has no vCPUs to run: call setup() once before run()")]
    NotSetUp,
}

fn io_err(what: &'static str) -> impl FnOnce(std::io::Error) -> VmError {
    move |source| VmError::Io { what, source }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Stops a running VM from another thread (e.g. on SIGTERM).
#[derive(Clone, Debug)]
pub struct VmStopHandle(Arc<EventFd>);

impl VmStopHandle {
    /// Makes [`Vm::run`] stop the vCPUs and return [`VmExitStatus::Stopped`].
    pub fn stop(&self) {
        if let Err(e) = self.0.write(1) {
            error!("cannot signal the VM to stop: {e}");
        }
    }
}

/// A KVM virtual machine with its memory, kernel and vCPUs.
pub struct Vm {
    config: PlatformConfig,
    vm_fd: Arc<VmFd>,
    memory: Arc<MemoryManager>,
    supported_cpuid: CpuId,
    poweroff_evt: EventFd,
    reset_evt: EventFd,
    stop_evt: Arc<EventFd>,
    vcpus: Vec<Vcpu>,
    boot: Option<BootInfo>,
    /// vCPU threads [`run`](Self::run) had to leave running.
    vcpu_threads_left: usize,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("memory", &self.memory)
            .field("vcpus", &self.vcpus.len())
            .field("boot", &self.boot)
            .finish()
    }
}

impl Vm {
    /// Opens KVM and creates the VM, its irqchip and PIT, and guest RAM.
    pub fn new(config: PlatformConfig) -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::KvmApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
            (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
            (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
            (Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR"),
            (Cap::Pit2, "KVM_CAP_PIT2"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        if !kvm.check_extension(Cap::ImmediateExit) {
            // Stopping still works, by kicking until the vCPU notices.
            warn!("KVM lacks KVM_CAP_IMMEDIATE_EXIT; vCPU stops may be slower");
        }
        let max_vcpus = kvm.get_max_vcpus().min(usize::from(MAX_VCPUS));
        if config.vcpus == 0 || usize::from(config.vcpus) > max_vcpus {
            return Err(VmError::InvalidVcpuCount {
                requested: config.vcpus,
                max: max_vcpus,
            });
        }

        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?);
        // Both are only used by KVM on Intel hosts, for real-mode guests;
        // they must be set before any vCPU exists.
        vm_fd
            .set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        vm_fd
            .set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            // Port 0x61 reads the speaker state without a speaker model.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX);
        let memory = Arc::new(MemoryManager::new(vm_fd.clone(), config.mem_size, slots)?);
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;

        let new_evt = || EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"));
        Ok(Vm {
            config,
            vm_fd,
            memory,
            supported_cpuid,
            poweroff_evt: new_evt()?,
            reset_evt: new_evt()?,
            stop_evt: Arc::new(new_evt()?),
            vcpus: Vec::new(),
            boot: None,
            vcpu_threads_left: 0,
        })
    }

    /// The KVM VM, for irqfds, ioeventfds and GSI routing.
    pub fn vm_fd(&self) -> Arc<VmFd> {
        self.vm_fd.clone()
    }

    /// Guest RAM and the KVM memory slots (for device memory such as VFIO BARs).
    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }

    /// Guest RAM, for devices.
    pub fn guest_memory(&self) -> GuestMemoryAtomicMmap {
        self.memory.guest_memory()
    }

    /// Exclusive end of guest RAM after the split around the 32-bit hole:
    /// what `SystemAllocatorConfig::for_x86_64` wants.
    pub fn ram_end(&self) -> u64 {
        self.memory.ram_layout().end()
    }

    /// The configuration the VM was built from.
    pub fn config(&self) -> &PlatformConfig {
        &self.config
    }

    /// An eventfd that ends the VM with [`VmExitStatus::Reset`] when
    /// written (for the i8042's reset line).
    pub fn reset_evt(&self) -> Result<EventFd, VmError> {
        self.reset_evt.try_clone().map_err(io_err("eventfd dup"))
    }

    /// An eventfd that ends the VM with [`VmExitStatus::PowerOff`] when
    /// written.
    pub fn poweroff_evt(&self) -> Result<EventFd, VmError> {
        self.poweroff_evt.try_clone().map_err(io_err("eventfd dup"))
    }

    /// A handle that stops [`run`](Self::run) from another thread.
    pub fn stop_handle(&self) -> VmStopHandle {
        VmStopHandle(self.stop_evt.clone())
    }

    /// How many vCPU threads did not stop when [`run`](Self::run) ended
    /// (each is logged); they still hold their vCPU and the buses, so the
    /// VM's resources are not all released.
    pub fn vcpu_threads_left(&self) -> usize {
        self.vcpu_threads_left
    }

    /// What was loaded, once [`setup`](Self::setup) succeeded.
    pub fn boot_info(&self) -> Option<&BootInfo> {
        self.boot.as_ref()
    }

    /// Adds the ACPI PM device to `devices.io_bus`, writes the ACPI tables,
    /// loads kernel, initramfs and command line, and creates the vCPUs with
    /// their boot state.
    pub fn setup(&mut self, devices: &VmDevices) -> Result<&BootInfo, VmError> {
        let pm = AcpiPmDevice::new(self.poweroff_evt()?, self.reset_evt()?);
        devices
            .io_bus
            .insert(Arc::new(Mutex::new(pm)), ACPI_PM_BASE, ACPI_PM_LEN)
            .map_err(VmError::AcpiPmDevice)?;

        let mem = self.memory.guest_memory().memory();
        let rsdp = create_acpi_tables(&mem, self.config.vcpus, &devices.pci_host)?;
        let boot = load_from_files(
            &mem,
            &self.memory.ram_layout(),
            &self.config.kernel,
            self.config.initramfs.as_deref(),
            &self.config.cmdline,
            Some(rsdp),
        )?;

        let mut vcpus = Vec::with_capacity(usize::from(self.config.vcpus));
        for id in 0..self.config.vcpus {
            let vcpu = Vcpu::new(
                &self.vm_fd,
                id,
                devices.io_bus.clone(),
                devices.mmio_bus.clone(),
            )?;
            let entry = (id == 0).then_some(&boot.entry);
            vcpu.configure(&self.supported_cpuid, self.config.vcpus, entry)?;
            vcpus.push(vcpu);
        }
        info!(
            "VM set up: {} vCPU(s), {:#x} bytes of RAM, entry {:x?}",
            self.config.vcpus, self.config.mem_size, boot.entry
        );
        self.vcpus = vcpus;
        Ok(self.boot.insert(boot))
    }

    /// Runs the vCPUs until the guest ends the VM, a vCPU fails, or the
    /// stop handle is used; every vCPU thread has stopped when this returns.
    pub fn run(&mut self) -> Result<VmExitStatus, VmError> {
        if self.vcpus.is_empty() {
            return Err(VmError::NotSetUp);
        }
        install_kick_handler()?;
        let vcpu_exit_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("eventfd"))?;
        let epoll = Epoll::new().map_err(io_err("epoll_create"))?;
        for (fd, token) in [
            (self.poweroff_evt.as_raw_fd(), TOKEN_POWEROFF),
            (self.reset_evt.as_raw_fd(), TOKEN_RESET),
            (self.stop_evt.as_raw_fd(), TOKEN_STOP),
            (vcpu_exit_evt.as_raw_fd(), TOKEN_VCPU_EXIT),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(io_err("epoll_ctl"))?;
        }

        let state = Arc::new(VcpuRunState::new(
            vcpu_exit_evt.try_clone().map_err(io_err("eventfd dup"))?,
        ));
        let mut threads = Vec::new();
        for vcpu in self.vcpus.drain(..) {
            match spawn_vcpu(vcpu, state.clone()) {
                Ok(t) => threads.push(t),
                Err(e) => {
                    self.vcpu_threads_left = stop_vcpus(&state, threads);
                    return Err(e.into());
                }
            }
        }

        let result = wait_for_exit(&epoll, &state, &vcpu_exit_evt);
        self.vcpu_threads_left = stop_vcpus(&state, threads);
        match &result {
            Ok(status) => info!("VM ended: {status:?}"),
            Err(e) => error!("VM failed: {e}"),
        }
        result
    }
}

/// Blocks until one of the exit sources fires and turns it into a status.
fn wait_for_exit(
    epoll: &Epoll,
    state: &VcpuRunState,
    vcpu_exit_evt: &EventFd,
) -> Result<VmExitStatus, VmError> {
    let mut events = vec![EpollEvent::default(); 4];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(VmError::Io {
                    what: "epoll_wait",
                    source: e,
                })
            }
        };
        // A vCPU's report (possibly a failure) wins over a simultaneous
        // guest request; tokens are numbered in that order of precedence.
        if let Some(token) = events[..n].iter().map(|e| e.data()).max() {
            return match token {
                TOKEN_POWEROFF => Ok(VmExitStatus::PowerOff),
                TOKEN_RESET => Ok(VmExitStatus::Reset),
                TOKEN_STOP => Ok(VmExitStatus::Stopped),
                _ => {
                    // Drained so a spurious wake-up cannot make epoll spin.
                    let _ = vcpu_exit_evt.read();
                    match state.take_exit() {
                        Some((_, VcpuStopReason::PowerOff)) => Ok(VmExitStatus::PowerOff),
                        Some((_, VcpuStopReason::Reset)) => Ok(VmExitStatus::Reset),
                        Some((vcpu, VcpuStopReason::TripleFault)) => {
                            warn!("vCPU {vcpu} triple-faulted");
                            Ok(VmExitStatus::TripleFault { vcpu })
                        }
                        Some((_, VcpuStopReason::Failed(e))) => Err(e.into()),
                        // Not reported by threads; nothing to do but go on.
                        Some((_, VcpuStopReason::Stopped)) | None => continue,
                    }
                }
            };
        }
    }
}

/// Sets the stop flag and kicks every vCPU thread until it has ended;
/// returns how many did not within [`VCPU_STOP_TIMEOUT`].
fn stop_vcpus(state: &VcpuRunState, mut threads: Vec<JoinHandle<()>>) -> usize {
    state.request_stop();
    let deadline = Instant::now() + VCPU_STOP_TIMEOUT;
    loop {
        // Kick again and again: a kick that lands just before KVM_RUN is
        // caught by immediate_exit, but re-kicking makes that not matter.
        for t in threads.iter().filter(|t| !t.is_finished()) {
            if let Err(e) = t.kill(kick_signal()) {
                warn!("cannot kick a vCPU thread: {e}");
            }
        }
        let (done, running): (Vec<_>, Vec<_>) = threads.into_iter().partition(|t| t.is_finished());
        for t in done {
            if t.join().is_err() {
                error!("a vCPU thread panicked");
            }
        }
        threads = running;
        if threads.is_empty() {
            return 0;
        }
        if Instant::now() >= deadline {
            error!(
                "{} vCPU thread(s) did not stop within {VCPU_STOP_TIMEOUT:?}; leaving them",
                threads.len()
            );
            return threads.len();
        }
        std::thread::sleep(VCPU_KICK_INTERVAL);
    }
}
