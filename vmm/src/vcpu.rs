//! vCPUs: creation and boot-time state, the run loop that turns KVM exits
//! into bus accesses, and the thread each vCPU runs on.
//!
//! Nothing the guest does can make the loop panic: unclaimed port and MMIO
//! accesses read as all ones and are dropped (logged at debug level, rate
//! limited), and every exit that ends the vCPU becomes a
//! [`VcpuStopReason`] reported to the VM.
//!
//! Stopping: the VM sets a shared stop flag and sends each vCPU thread the
//! [`kick_signal`]. Its handler sets `immediate_exit` in the thread's
//! `kvm_run`, so a thread about to enter `KVM_RUN` returns at once instead
//! of sleeping in a halted guest; a thread already inside returns with
//! `EINTR`. Either way it then sees the flag and leaves.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;

use devices::{Bus, BusError};
use kvm_bindings::{
    CpuId, Msrs, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use log::{debug, error, warn};
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, unblock_signal, SIGRTMIN};

use crate::arch::cpuid::{vcpu_cpuid, CpuidError};
use crate::arch::regs::{
    boot_msrs, configure_lapic_lints, initial_fpu, initial_regs, initial_sregs, BootEntry,
};

/// Offset from `SIGRTMIN` of the signal that kicks vCPUs out of `KVM_RUN`.
pub const KICK_SIGNAL_OFFSET: libc::c_int = 0;

/// The realtime signal used to kick vCPU threads.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Errors setting up or running a vCPU.
#[derive(Debug, Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create vCPU {id}: {source}")]
    Create {
        /// vCPU index.
        id: u8,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// CPUID could not be built.
    #[error("cannot build the CPUID of vCPU {id}: {source}")]
    Cpuid {
        /// vCPU index.
        id: u8,
        /// What failed.
        #[source]
        source: CpuidError,
    },
    /// A set-up ioctl failed.
    #[error("cannot set up vCPU {id}: {what} failed: {source}")]
    Setup {
        /// vCPU index.
        id: u8,
        /// The ioctl.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_RUN` failed.
    #[error("vCPU {id}: KVM_RUN failed: {source}")]
    Run {
        /// vCPU index.
        id: u8,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// VM entry failed (bad guest state).
    #[error("vCPU {id}: VM entry failed, hardware reason {reason:#x} on host CPU {cpu}")]
    FailEntry {
        /// vCPU index.
        id: u8,
        /// `hardware_entry_failure_reason`.
        reason: u64,
        /// Host CPU.
        cpu: u32,
    },
    /// KVM could not handle an exit (often: an instruction it cannot emulate).
    #[error("vCPU {id}: KVM internal error {suberror}{} at RIP {rip:#x}, data {data:x?}",
        if *suberror == KVM_INTERNAL_ERROR_EMULATION { " (emulation failure)" } else { "" })]
    InternalError {
        /// vCPU index.
        id: u8,
        /// `KVM_INTERNAL_ERROR_*`.
        suberror: u32,
        /// Extra words KVM supplied.
        data: Vec<u64>,
        /// Guest RIP, if it could be read.
        rip: u64,
    },
    /// The guest reported a crash (`KVM_SYSTEM_EVENT_CRASH`).
    #[error("vCPU {id}: the guest reported a crash")]
    GuestCrash {
        /// vCPU index.
        id: u8,
    },
    /// An exit we have no handling for.
    #[error("vCPU {id}: unexpected exit {exit}")]
    UnexpectedExit {
        /// vCPU index.
        id: u8,
        /// The exit, as debug text.
        exit: String,
    },
    /// The vCPU thread panicked (a bug in a device model or in the VMM);
    /// reported so the VM ends instead of waiting for a dead thread.
    #[error("vCPU {id}: thread panicked: {message}")]
    Panicked {
        /// vCPU index.
        id: u8,
        /// The panic message.
        message: String,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Why a vCPU thread ended.
#[derive(Debug)]
pub enum VcpuStopReason {
    /// The VM asked it to stop.
    Stopped,
    /// The guest powered off (`KVM_SYSTEM_EVENT_SHUTDOWN`).
    PowerOff,
    /// The guest asked for a reset (`KVM_SYSTEM_EVENT_RESET`).
    Reset,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`): a real CPU would reset.
    TripleFault,
    /// The vCPU failed.
    Failed(VcpuError),
}

/// What one `KVM_RUN` round ended with.
#[derive(Debug, PartialEq, Eq)]
enum RunOutcome {
    /// Exit handled; run again.
    Continue,
    /// Interrupted by a signal; check whether to stop.
    Interrupted,
    PowerOff,
    Reset,
    TripleFault,
}

/// Logs unclaimed accesses: the first few, then one in every 4096.
#[derive(Debug, Default)]
struct UnclaimedLog {
    count: u64,
}

impl UnclaimedLog {
    fn note(&mut self, id: u8, space: &str, write: bool, addr: u64, len: usize, e: &BusError) {
        self.count += 1;
        if self.count <= 16 || self.count % 4096 == 0 {
            let op = if write { "write" } else { "read" };
            debug!(
                "vCPU {id}: {len}-byte {space} {op} at {addr:#x} unhandled ({e}); \
                 {} so far",
                self.count
            );
        }
    }
}

/// One vCPU and the buses its exits go to.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    unclaimed: UnclaimedLog,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("id", &self.id).finish()
    }
}

impl Vcpu {
    /// Creates vCPU `id` (its APIC ID too) in `vm`.
    pub fn new(vm: &VmFd, id: u8, io_bus: Arc<Bus>, mmio_bus: Arc<Bus>) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Vcpu {
            id,
            fd,
            io_bus,
            mmio_bus,
            unclaimed: UnclaimedLog::default(),
        })
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU, for state inspection.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn setup_err(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let id = self.id;
        move |source| VcpuError::Setup { id, what, source }
    }

    /// Sets CPUID (from KVM's `supported` CPUID, for `vcpu_count` vCPUs),
    /// MSRs, FPU and LAPIC; and, if `boot` is given (the boot vCPU), the
    /// registers for that entry. Other vCPUs wait for INIT/SIPI.
    pub fn configure(
        &self,
        supported: &CpuId,
        vcpu_count: u8,
        boot: Option<&BootEntry>,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        let cpuid = vcpu_cpuid(supported, id, vcpu_count)
            .map_err(|source| VcpuError::Cpuid { id, source })?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.setup_err("KVM_SET_CPUID2"))?;
        self.set_msrs();
        self.fd
            .set_fpu(&initial_fpu())
            .map_err(self.setup_err("KVM_SET_FPU"))?;
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(self.setup_err("KVM_GET_LAPIC"))?;
        configure_lapic_lints(&mut lapic);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.setup_err("KVM_SET_LAPIC"))?;
        if let Some(entry) = boot {
            let base = self
                .fd
                .get_sregs()
                .map_err(self.setup_err("KVM_GET_SREGS"))?;
            self.fd
                .set_sregs(&initial_sregs(&base, entry))
                .map_err(self.setup_err("KVM_SET_SREGS"))?;
            self.fd
                .set_regs(&initial_regs(entry))
                .map_err(self.setup_err("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Sets the boot MSRs. KVM stops at the first MSR it rejects, so the
    /// rest are retried one by one; an MSR this host cannot set is logged
    /// and skipped rather than failing the VM.
    fn set_msrs(&self) {
        let entries = boot_msrs();
        let set = match Msrs::from_entries(&entries) {
            Ok(msrs) => self.fd.set_msrs(&msrs).unwrap_or(0),
            Err(_) => 0,
        };
        for e in entries.iter().skip(set) {
            let ok = Msrs::from_entries(std::slice::from_ref(e))
                .ok()
                .and_then(|m| self.fd.set_msrs(&m).ok())
                == Some(1);
            if !ok {
                warn!(
                    "vCPU {}: KVM did not accept MSR {:#x} = {:#x}; left at its default",
                    self.id, e.index, e.data
                );
            }
        }
    }

    /// Runs the guest once and handles the exit.
    fn run_once(&mut self) -> Result<RunOutcome, VcpuError> {
        let id = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                return Ok(RunOutcome::Interrupted)
            }
            Err(source) => return Err(VcpuError::Run { id, source }),
        };
        match exit {
            VcpuExit::IoIn(port, data) => {
                if let Err(e) = self.io_bus.read(u64::from(port), data) {
                    data.fill(0xff);
                    self.unclaimed
                        .note(id, "port", false, port.into(), data.len(), &e);
                }
            }
            VcpuExit::IoOut(port, data) => {
                if let Err(e) = self.io_bus.write(u64::from(port), data) {
                    self.unclaimed
                        .note(id, "port", true, port.into(), data.len(), &e);
                }
            }
            VcpuExit::MmioRead(addr, data) => {
                if let Err(e) = self.mmio_bus.read(addr, data) {
                    data.fill(0xff);
                    self.unclaimed.note(id, "MMIO", false, addr, data.len(), &e);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if let Err(e) = self.mmio_bus.write(addr, data) {
                    self.unclaimed.note(id, "MMIO", true, addr, data.len(), &e);
                }
            }
            // With the in-kernel LAPIC, HLT is handled by KVM; if it does
            // come here, running again is what the guest expects.
            VcpuExit::Hlt => debug!("vCPU {id}: HLT exit"),
            VcpuExit::IoapicEoi(_) => {}
            VcpuExit::Intr => return Ok(RunOutcome::Interrupted),
            VcpuExit::Shutdown => return Ok(RunOutcome::TripleFault),
            VcpuExit::SystemEvent(kind, _) => {
                return match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => Ok(RunOutcome::PowerOff),
                    KVM_SYSTEM_EVENT_RESET => Ok(RunOutcome::Reset),
                    KVM_SYSTEM_EVENT_CRASH => Err(VcpuError::GuestCrash { id }),
                    other => Err(VcpuError::UnexpectedExit {
                        id,
                        exit: format!("system event {other}"),
                    }),
                };
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(VcpuError::FailEntry { id, reason, cpu })
            }
            VcpuExit::InternalError => return Err(self.internal_error()),
            other => {
                return Err(VcpuError::UnexpectedExit {
                    id,
                    exit: format!("{other:?}"),
                })
            }
        }
        Ok(RunOutcome::Continue)
    }

    fn internal_error(&mut self) -> VcpuError {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, for which
        // `internal` is the member KVM filled in; it is plain integers.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let rip = self.fd.get_regs().map_or(u64::MAX, |r| r.rip);
        VcpuError::InternalError {
            id: self.id,
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
            rip,
        }
    }

    /// Runs until the guest stops the vCPU or `stop` is set (checked after
    /// every exit and whenever a kick interrupts `KVM_RUN`).
    pub fn run_until_stopped(&mut self, stop: &AtomicBool) -> VcpuStopReason {
        loop {
            if stop.load(Ordering::Acquire) {
                return VcpuStopReason::Stopped;
            }
            match self.run_once() {
                Ok(RunOutcome::Continue) => {}
                Ok(RunOutcome::Interrupted) => self.fd.set_kvm_immediate_exit(0),
                Ok(RunOutcome::PowerOff) => return VcpuStopReason::PowerOff,
                Ok(RunOutcome::Reset) => return VcpuStopReason::Reset,
                Ok(RunOutcome::TripleFault) => return VcpuStopReason::TripleFault,
                Err(e) => return VcpuStopReason::Failed(e),
            }
        }
    }
}

thread_local! {
    // `immediate_exit` of the kvm_run of the vCPU running on this thread,
    // for the kick signal handler. Const-initialised without a destructor,
    // so reading it from a signal handler needs no lazy set-up.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = IMMEDIATE_EXIT.try_with(|p| {
        let p = p.get();
        if !p.is_null() {
            // SAFETY: the pointer is set by this thread's vCPU loop to the
            // `immediate_exit` byte of its mapped kvm_run, and cleared before
            // that mapping goes away; a byte store is async-signal-safe.
            unsafe { p.write_volatile(1) };
        }
    });
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALL: Once = Once::new();
    static RESULT: Mutex<Option<i32>> = Mutex::new(None);
    INSTALL.call_once(|| {
        if let Err(e) = register_signal_handler(kick_signal(), handle_kick) {
            *RESULT.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.errno());
        }
    });
    match *RESULT.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(errno) => Err(VcpuError::SignalHandler(vmm_sys_util::errno::Error::new(
            errno,
        ))),
        None => Ok(()),
    }
}

/// What the vCPU threads share with the VM.
#[derive(Debug)]
pub struct VcpuRunState {
    stop: AtomicBool,
    exit: Mutex<Option<(u8, VcpuStopReason)>>,
    exit_evt: EventFd,
}

impl VcpuRunState {
    /// `exit_evt` is written when a vCPU stops on its own.
    pub fn new(exit_evt: EventFd) -> Self {
        VcpuRunState {
            stop: AtomicBool::new(false),
            exit: Mutex::new(None),
            exit_evt,
        }
    }

    /// Asks every vCPU to stop at its next exit (kick them to make that soon).
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    /// The first vCPU exit reported, if any.
    pub fn take_exit(&self) -> Option<(u8, VcpuStopReason)> {
        self.exit.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn report(&self, id: u8, reason: VcpuStopReason) {
        let mut first = self.exit.lock().unwrap_or_else(|p| p.into_inner());
        if first.is_none() {
            *first = Some((id, reason));
        } else {
            debug!("vCPU {id} stopped too: {reason:?}");
        }
        drop(first);
        if let Err(e) = self.exit_evt.write(1) {
            error!("vCPU {id}: cannot signal its exit: {e}");
        }
    }
}

/// Starts `vcpu` on its own thread; the thread reports how the vCPU ended
/// to `state` unless it was asked to stop.
pub fn spawn_vcpu(mut vcpu: Vcpu, state: Arc<VcpuRunState>) -> Result<JoinHandle<()>, VcpuError> {
    let id = vcpu.id;
    std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            // The spawning thread may block signals; this one must not.
            if let Err(e) = unblock_signal(kick_signal()) {
                warn!("vCPU {id}: cannot unblock the kick signal: {e}");
            }
            let run = vcpu.fd.get_kvm_run();
            IMMEDIATE_EXIT.with(|p| p.set(std::ptr::addr_of_mut!(run.immediate_exit)));
            let reason =
                std::panic::catch_unwind(AssertUnwindSafe(|| vcpu.run_until_stopped(&state.stop)))
                    .unwrap_or_else(|payload| {
                        let message = payload
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| payload.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "unknown panic".to_string());
                        VcpuStopReason::Failed(VcpuError::Panicked { id, message })
                    });
            IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
            match reason {
                VcpuStopReason::Stopped => debug!("vCPU {id} stopped"),
                reason => state.report(id, reason),
            }
        })
        .map_err(|source| VcpuError::Spawn { id, source })
}
