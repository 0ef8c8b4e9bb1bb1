//! The VM as `trellis` runs it: built from the configuration, run until
//! the guest ends it, and torn down completely; and the loop that builds it
//! again from scratch when the guest resets it, as a reset restarts a real
//! machine.
//!
//! A reboot is a new [`Machine`]: new KVM VM, zeroed RAM, the kernel loaded
//! afresh, new devices, workers and interrupt routes. Nothing of the old
//! one is reused except what outlives a real machine's reset: the disk
//! images (reopened) and the serial and console outputs (one [`Outputs`]
//! for the whole process, so later boots append to what earlier ones
//! wrote). The old VM is dropped before the new one is built, so what can
//! only be held once (an attached tap, a VFIO group) is free again. What
//! the configuration leaves to chance is chosen once ([`with_fixed_macs`]),
//! so the guest finds the same machine on every boot.
//!
//! How a boot ends decides what happens next ([`next_step`]): a power-off
//! or a verdict on the debug exit port ends `trellis`, a reset reboots, a
//! triple fault (a crashed guest) is an error, so a crashing guest cannot
//! reboot forever.

use devices::debug_exit::DebugExitStatus;
use log::info;
use thiserror::Error;

use crate::config::{MacAddr, VmConfig};
use crate::device_manager::{DeviceManager, DeviceManagerError, Outputs};
use crate::vm::{PlatformConfig, Vm, VmDevices, VmError, VmExitStatus, VmStopHandle};

/// `log` target of the line announcing each reboot (shown by the default
/// log filter, like the topology).
pub const REBOOT_LOG_TARGET: &str = "trellis::reboot";

/// How one boot ended, once its VM was torn down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEnd {
    /// The guest powered off, with the status it wrote to the debug exit
    /// port, if it did.
    PowerOff(Option<u8>),
    /// The guest reset the machine: build it again.
    Reset,
}

/// Why the VM could not be built, failed, or ended in a way that is a
/// failure.
#[derive(Debug, Error)]
pub enum MachineError {
    /// The platform (KVM, memory, kernel, vCPUs) failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The devices could not be built.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// A vCPU triple-faulted.
    #[error("vCPU {vcpu} triple-faulted (the guest crashed)")]
    TripleFault {
        /// The vCPU.
        vcpu: u8,
    },
    /// The stop handle ended the VM.
    #[error("the VM was stopped")]
    Stopped,
    /// The guest reset the VM but some vCPU threads could not be stopped:
    /// they still hold the old VM's devices, so a new one cannot be built.
    #[error(
        "the guest reset the VM, but {0} vCPU thread(s) did not stop, so it cannot be rebuilt"
    )]
    VcpusLeft(usize),
    /// The VM could not be built again after a guest reset.
    #[error("cannot rebuild the VM for boot {boot} after the guest reset it")]
    Rebuild {
        /// The boot that could not be built (2 for the first reboot).
        boot: u64,
        /// Why.
        #[source]
        source: Box<MachineError>,
    },
}

/// A VM with its devices, built and ready to run once.
pub struct Machine {
    // Fields drop in order: the devices (which use the VM's fd and RAM)
    // before the VM.
    devices: DeviceManager,
    debug_exit: DebugExitStatus,
    vm: Vm,
}

impl Machine {
    /// Builds the VM `config` describes, its devices writing to `outputs`,
    /// and loads the kernel: ready to [`run`](Self::run).
    pub fn build(config: &VmConfig, outputs: &Outputs) -> Result<Self, MachineError> {
        let mut vm = Vm::new(PlatformConfig {
            kernel: config.kernel.clone(),
            initramfs: config.initramfs.clone(),
            cmdline: config.cmdline.clone(),
            mem_size: config.memory_size,
            vcpus: config.vcpus,
        })?;
        let mut devices = DeviceManager::new(vm.vm_fd(), vm.ram_end())?;
        devices.add_legacy_devices(&outputs.serial, vm.reset_evt()?)?;
        let debug_exit = devices.add_debug_exit(vm.poweroff_evt()?)?;
        devices.create_devices(config, &outputs.console, vm.guest_memory())?;
        devices.add_vfio_devices(config, &vm.vm_fd(), vm.memory())?;
        vm.setup(&VmDevices {
            io_bus: devices.io_bus().clone(),
            mmio_bus: devices.mmio_bus().clone(),
            pci_host: devices.pci_host_info(),
        })?;
        devices.start_event_loop()?;
        Ok(Machine {
            devices,
            debug_exit,
            vm,
        })
    }

    /// Logs the PCI topology (see [`DeviceManager::log_topology`]).
    pub fn log_topology(&self) {
        self.devices.log_topology();
    }

    /// Stops [`run`](Self::run) from another thread.
    pub fn stop_handle(&self) -> VmStopHandle {
        self.vm.stop_handle()
    }

    /// Runs the guest until it ends the VM, then tears everything down
    /// (vCPUs, device workers, the event loop, VFIO, taps, the KVM VM and
    /// its RAM) before saying how it ended.
    pub fn run(self) -> Result<BootEnd, MachineError> {
        let Machine {
            mut devices,
            debug_exit,
            mut vm,
        } = self;
        let status = vm.run();
        devices.shutdown();
        let left = vm.vcpu_threads_left();
        drop(devices);
        drop(vm);
        next_step(status?, debug_exit.get(), left)
    }
}

/// What a boot's end means: `status` is how the VM ended, `verdict` what
/// the guest wrote to the debug exit port (if it did), `vcpus_left` how
/// many vCPU threads could not be stopped.
pub fn next_step(
    status: VmExitStatus,
    verdict: Option<u8>,
    vcpus_left: usize,
) -> Result<BootEnd, MachineError> {
    // A verdict on the debug exit port is final: the vCPU runs on until the
    // exit is noticed, and a reset it issues meanwhile (the test guest's
    // fallback for VMMs without the port) must not override it.
    if let Some(verdict) = verdict {
        return Ok(BootEnd::PowerOff(Some(verdict)));
    }
    match status {
        VmExitStatus::PowerOff => Ok(BootEnd::PowerOff(None)),
        VmExitStatus::Reset if vcpus_left > 0 => Err(MachineError::VcpusLeft(vcpus_left)),
        VmExitStatus::Reset => Ok(BootEnd::Reset),
        // A real machine resets on a triple fault too, but here it means
        // the guest crashed: rebooting would hide that, and a guest that
        // crashes on every boot would loop.
        VmExitStatus::TripleFault { vcpu } => Err(MachineError::TripleFault { vcpu }),
        VmExitStatus::Stopped => Err(MachineError::Stopped),
    }
}

/// Builds and runs the VM of `config` until the guest powers it off,
/// rebuilding it after every guest reset; returns the debug exit port's
/// status if the guest used it. The topology is logged on the first boot,
/// one line per reboot. `guest_starts` is called once, when the first VM
/// is built and about to run (the logger starts rate limiting there).
pub fn run_until_end(
    config: &VmConfig,
    outputs: &Outputs,
    guest_starts: &dyn Fn(),
) -> Result<Option<u8>, MachineError> {
    let config = with_fixed_macs(config);
    boot_loop(|boot| {
        let machine = Machine::build(&config, outputs).map_err(|e| match boot {
            1 => e,
            _ => MachineError::Rebuild {
                boot,
                source: Box::new(e),
            },
        })?;
        if boot == 1 {
            machine.log_topology();
            guest_starts();
        }
        machine.run()
    })
}

/// `config` with a MAC address chosen now for every NIC without `mac=`:
/// a NIC keeps its address across reboots, as on a real machine (left to
/// itself, the device picks a new random one each time it is built).
pub fn with_fixed_macs(config: &VmConfig) -> VmConfig {
    let mut config = config.clone();
    for net in &mut config.nets {
        net.mac.get_or_insert_with(MacAddr::random_local);
    }
    config
}

/// Calls `boot(1)`, `boot(2)`... while each ends with a reset.
fn boot_loop(
    mut boot: impl FnMut(u64) -> Result<BootEnd, MachineError>,
) -> Result<Option<u8>, MachineError> {
    let mut n = 1;
    loop {
        match boot(n)? {
            BootEnd::PowerOff(verdict) => return Ok(verdict),
            BootEnd::Reset => {
                n += 1;
                info!(target: REBOOT_LOG_TARGET, "the guest reset the VM: rebuilding it for boot {n}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resets_reboot_and_everything_else_ends() {
        use VmExitStatus::*;
        let step = |status, verdict, left| next_step(status, verdict, left);
        assert_eq!(step(PowerOff, None, 0).unwrap(), BootEnd::PowerOff(None));
        assert_eq!(step(Reset, None, 0).unwrap(), BootEnd::Reset);
        // The debug exit port's verdict wins over whatever followed it.
        for status in [PowerOff, Reset, TripleFault { vcpu: 1 }, Stopped] {
            assert_eq!(
                step(status, Some(3), 0).unwrap(),
                BootEnd::PowerOff(Some(3))
            );
        }
        let err = step(TripleFault { vcpu: 2 }, None, 0).unwrap_err();
        assert_eq!(err.to_string(), "vCPU 2 triple-faulted (the guest crashed)");
        assert!(matches!(step(Stopped, None, 0), Err(MachineError::Stopped)));
        // A stuck vCPU still holds the old devices: no rebuild.
        assert!(matches!(
            step(Reset, None, 1),
            Err(MachineError::VcpusLeft(1))
        ));
        assert_eq!(step(PowerOff, None, 1).unwrap(), BootEnd::PowerOff(None));
    }

    #[test]
    fn the_loop_boots_again_after_each_reset() {
        let mut boots = Vec::new();
        let ends = [BootEnd::Reset, BootEnd::Reset, BootEnd::PowerOff(Some(7))];
        let result = boot_loop(|n| {
            boots.push(n);
            Ok(ends[boots.len() - 1])
        });
        assert_eq!(result.unwrap(), Some(7));
        assert_eq!(boots, [1, 2, 3]);
    }

    #[test]
    fn the_loop_stops_at_the_first_error() {
        let mut boots = 0;
        let result = boot_loop(|n| {
            boots += 1;
            match n {
                1 => Ok(BootEnd::Reset),
                _ => Err(MachineError::TripleFault { vcpu: 0 }),
            }
        });
        assert!(matches!(result, Err(MachineError::TripleFault { vcpu: 0 })));
        assert_eq!(boots, 2);
    }

    #[test]
    fn every_nic_keeps_one_address() {
        let args = [
            "trellis",
            "--kernel",
            "/k",
            "--net",
            "tap=a",
            "--net",
            "tap=b,mac=52:54:00:12:34:56",
        ]
        .map(String::from);
        let config = VmConfig::parse(&args).unwrap();
        let fixed = with_fixed_macs(&config);
        let given: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        assert_eq!(fixed.nets[1].mac, Some(given));
        let chosen = fixed.nets[0].mac.expect("a MAC for tap=a");
        assert_eq!(chosen.bytes()[0], 0x02, "locally administered, unicast");
        // Only the MAC changed.
        let mut back = fixed.clone();
        back.nets[0].mac = None;
        assert_eq!(back, config);
    }

    #[test]
    fn a_failed_rebuild_names_the_boot() {
        let err = MachineError::Rebuild {
            boot: 2,
            source: Box::new(MachineError::Stopped),
        };
        assert_eq!(
            err.to_string(),
            "cannot rebuild the VM for boot 2 after the guest reset it"
        );
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("the VM was stopped"));
    }
}
