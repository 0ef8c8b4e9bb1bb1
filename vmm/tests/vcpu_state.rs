//! vCPUs below the `Vm` level, on the host's /dev/kvm: the state
//! `Vcpu::configure` leaves in KVM, and a real-mode guest on a bare vCPU
//! thread stopped with the kick signal.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{require_kvm, SerialOutput, MIB};
use devices::acpi_pm::{AcpiPmDevice, ACPI_PM_BASE, ACPI_PM_LEN};
use devices::i8042::{I8042Device, I8042_BASE, I8042_LEN};
use devices::serial::{Serial, SERIAL_PORT_BASE, SERIAL_PORT_LEN};
use devices::Bus;
use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};
use vmm::arch::regs::{msr_index, write_boot_tables, BootEntry};
use vmm::memory::MemoryManager;
use vmm::vcpu::{install_kick_handler, kick_signal, spawn_vcpu, Vcpu, VcpuRunState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::Killable;

struct Machine {
    kvm: Kvm,
    vm: Arc<VmFd>,
    memory: MemoryManager,
}

fn machine() -> Machine {
    require_kvm();
    let kvm = Kvm::new().unwrap();
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.create_irq_chip().unwrap();
    let memory = MemoryManager::new(vm.clone(), 16 * MIB, 32).unwrap();
    Machine { kvm, vm, memory }
}

fn buses() -> (Arc<Bus>, Arc<Bus>) {
    (Arc::new(Bus::new()), Arc::new(Bus::new()))
}

/// Starts vCPU 0 of `m` on its own thread in real mode at `cs:ip` (CS base
/// `cs << 4`).
fn start_real_mode_vcpu(
    m: &Machine,
    io: Arc<Bus>,
    mmio: Arc<Bus>,
    cs: u16,
    ip: u64,
) -> (Arc<VcpuRunState>, std::thread::JoinHandle<()>) {
    let vcpu = Vcpu::new(&m.vm, 0, io, mmio).unwrap();
    let mut sregs = vcpu.fd().get_sregs().unwrap();
    sregs.cs.selector = cs;
    sregs.cs.base = u64::from(cs) << 4;
    vcpu.fd().set_sregs(&sregs).unwrap();
    let mut regs = vcpu.fd().get_regs().unwrap();
    regs.rip = ip;
    vcpu.fd().set_regs(&regs).unwrap();
    install_kick_handler().unwrap();
    let state = Arc::new(VcpuRunState::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let thread = spawn_vcpu(vcpu, state.clone()).unwrap();
    (state, thread)
}

/// Stops a vCPU thread that may be asleep in KVM on `hlt` with interrupts
/// off: only kicks get it out.
fn stop_vcpu_thread(state: &VcpuRunState, thread: std::thread::JoinHandle<()>) {
    state.request_stop();
    let start = Instant::now();
    while !thread.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "vCPU did not stop"
        );
        thread.kill(kick_signal()).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    thread.join().unwrap();
}

#[test]
fn configure_leaves_the_boot_state_in_kvm() {
    let m = machine();
    let supported = m.kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let (io, mmio) = buses();
    let entry = BootEntry::Linux64 {
        entry: 0x100_0000,
        boot_params: 0x7000,
    };
    let bsp = Vcpu::new(&m.vm, 0, io.clone(), mmio.clone()).unwrap();
    bsp.configure(&supported, 2, Some(&entry)).unwrap();
    let ap = Vcpu::new(&m.vm, 1, io, mmio).unwrap();
    ap.configure(&supported, 2, None).unwrap();

    for (vcpu, id) in [(&bsp, 0u32), (&ap, 1)] {
        let cpuid = vcpu.fd().get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, id, "initial APIC ID");
        assert_ne!(leaf1.ecx & (1 << 31), 0, "hypervisor bit");

        let mut msrs = Msrs::from_entries(&[
            kvm_msr_entry {
                index: msr_index::MISC_ENABLE,
                ..Default::default()
            },
            kvm_msr_entry {
                index: msr_index::MTRR_DEF_TYPE,
                ..Default::default()
            },
        ])
        .unwrap();
        assert_eq!(vcpu.fd().get_msrs(&mut msrs).unwrap(), 2);
        assert_eq!(msrs.as_slice()[0].data & 1, 1, "fast strings");
        assert_eq!(msrs.as_slice()[1].data, 0x806, "MTRRs on, write-back");

        // MXCSR is read from the XSAVE area: KVM_GET_FPU reports 0 for it
        // on some hosts (this project's CI host among them) even though
        // the register holds what KVM_SET_FPU wrote.
        let fpu = vcpu.fd().get_fpu().unwrap();
        assert_eq!(fpu.fcw, 0x37f);
        let xsave = vcpu.fd().get_xsave().unwrap();
        assert_eq!(xsave.region[6], 0x1f80, "MXCSR");

        let lapic = vcpu.fd().get_lapic().unwrap();
        let reg =
            |off: usize| u32::from_le_bytes(std::array::from_fn(|i| lapic.regs[off + i] as u8));
        assert_eq!((reg(0x350) >> 8) & 7, 7, "LINT0 ExtINT");
        assert_eq!((reg(0x360) >> 8) & 7, 4, "LINT1 NMI");
    }

    let sregs = bsp.fd().get_sregs().unwrap();
    assert_eq!(sregs.efer & 0x500, 0x500, "long mode active");
    assert_eq!((sregs.cs.l, sregs.cs.selector), (1, 0x10));
    assert_eq!(sregs.cr3, 0x9000);
    let regs = bsp.fd().get_regs().unwrap();
    assert_eq!((regs.rip, regs.rsi), (0x100_0000, 0x7000));
    // The AP keeps its reset state until INIT/SIPI.
    let ap_sregs = ap.fd().get_sregs().unwrap();
    assert_eq!(ap_sregs.efer & 0x400, 0);
    assert_eq!(ap_sregs.cs.base, 0xffff_0000);
}

/// Real-mode code at 0x1000: prints "RM\n", writes S5 to the ACPI PM
/// device, then `cli; hlt` (source: `.code16`, linked at 0x1000):
///
/// ```text
/// mov $0x3f8, %dx; mov $'R', %al; out %al, %dx; mov $'M', %al; out %al, %dx
/// mov $'\n', %al; out %al, %dx; mov $0x600, %dx; mov $0x34, %al; out %al, %dx
/// 1: cli; hlt; jmp 1b
/// ```
const REAL_MODE_CODE: &[u8] = &[
    0xba, 0xf8, 0x03, 0xb0, 0x52, 0xee, 0xb0, 0x4d, 0xee, 0xb0, 0x0a, 0xee, 0xba, 0x00, 0x06, 0xb0,
    0x34, 0xee, 0xfa, 0xf4, 0xeb, 0xfc,
];

#[test]
fn real_mode_guest_on_a_bare_vcpu_thread() {
    let m = machine();
    let mem = m.memory.guest_memory().memory();
    mem.write_slice(REAL_MODE_CODE, GuestAddress(0x1000))
        .unwrap();

    let (io, mmio) = buses();
    let serial = SerialOutput::default();
    io.insert(
        Arc::new(Mutex::new(Serial::new(
            EventFd::new(EFD_NONBLOCK).unwrap(),
            serial.clone(),
        ))),
        SERIAL_PORT_BASE,
        SERIAL_PORT_LEN,
    )
    .unwrap();
    let poweroff = EventFd::new(0).unwrap();
    let reset = EventFd::new(EFD_NONBLOCK).unwrap();
    io.insert(
        Arc::new(Mutex::new(AcpiPmDevice::new(
            poweroff.try_clone().unwrap(),
            reset.try_clone().unwrap(),
        ))),
        ACPI_PM_BASE,
        ACPI_PM_LEN,
    )
    .unwrap();

    let (state, thread) = start_real_mode_vcpu(&m, io, mmio, 0, 0x1000);
    // Blocks until the guest writes the sleep register.
    assert_eq!(poweroff.read().unwrap(), 1);
    assert_eq!(serial.text(), "RM\n");

    stop_vcpu_thread(&state, thread);
    // Asked to stop, so nothing is reported as a guest exit.
    assert!(state.take_exit().is_none());
    assert!(reset.read().is_err());
}

/// Linux's default reboot on trellis jumps to the real-mode reset vector
/// F000:FFF0 (its "BIOS" restart): the stub the boot tables put there must
/// turn that into an i8042 reset request, not an endless run through
/// zeroed memory.
#[test]
fn a_jump_to_the_reset_vector_requests_a_reset() {
    let m = machine();
    let mem = m.memory.guest_memory().memory();
    let entry = BootEntry::Pvh {
        entry: 0x100_0000,
        start_info: 0x6000,
    };
    write_boot_tables(&mem, &entry).unwrap();

    let (io, mmio) = buses();
    let reset = EventFd::new(EFD_NONBLOCK).unwrap();
    io.insert(
        Arc::new(Mutex::new(I8042Device::new(reset.try_clone().unwrap()))),
        I8042_BASE,
        I8042_LEN,
    )
    .unwrap();
    // Where Linux's machine_real_restart() lands: ljmp $0xf000, $0xfff0.
    let (state, thread) = start_real_mode_vcpu(&m, io, mmio, 0xf000, 0xfff0);
    let start = Instant::now();
    let pulsed = loop {
        match reset.read() {
            Ok(n) => break Some(n),
            Err(_) if start.elapsed() > Duration::from_secs(5) => break None,
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    stop_vcpu_thread(&state, thread);
    assert_eq!(pulsed, Some(1), "no reset request within 5 s of the jump");
}
