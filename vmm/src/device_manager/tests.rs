use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use devices::{Bus, BusDevice, BusError};
use kvm_ioctls::IoEventAddress;
use pci::{
    ConfigSpaceFunction, IntxInterrupt, PciBarPrefetchable, PciBarRegionType, PciBdf, PciClassCode,
    PciConfiguration, PciConfigurationParams,
};
use virtio_devices::{ActivateError, GuestMemoryMmapAtomic, QueueActivation, VirtioDevice};
use vm_allocator::{layout, AddressSpace, GuestRange, SystemAllocator, SystemAllocatorConfig};
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::arch::{legacy_irq_for, IntxPin};
use crate::config::VmConfig;
use crate::interrupt::tests::{kvm_vm, FakeBackend, Op};

const BAR_SIZE: u64 = 0x4000;

/// An ioeventfd call: (registered?, fd, MMIO?, address).
type IoOp = (bool, RawFd, bool, u64);

#[derive(Default)]
struct FakeIoEvents {
    ops: Mutex<Vec<IoOp>>,
    fail_at: Mutex<Option<u64>>,
}

impl FakeIoEvents {
    fn take(&self) -> Vec<IoOp> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }
}

fn split(addr: IoEventAddress) -> (bool, u64) {
    match addr {
        IoEventAddress::Mmio(a) => (true, a),
        IoEventAddress::Pio(a) => (false, a),
    }
}

impl IoEventBackend for FakeIoEvents {
    fn register_ioevent(&self, fd: &EventFd, addr: IoEventAddress) -> io::Result<()> {
        let (mmio, addr) = split(addr);
        if *self.fail_at.lock().unwrap() == Some(addr) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        self.ops
            .lock()
            .unwrap()
            .push((true, fd.as_raw_fd(), mmio, addr));
        Ok(())
    }
    fn unregister_ioevent(&self, fd: &EventFd, addr: IoEventAddress) -> io::Result<()> {
        let (mmio, addr) = split(addr);
        self.ops
            .lock()
            .unwrap()
            .push((false, fd.as_raw_fd(), mmio, addr));
        Ok(())
    }
}

/// A function with one 64-bit BAR whose bytes read 0x5a.
struct FakeFunction {
    config: PciConfiguration,
}

impl FakeFunction {
    fn new(bar: u64) -> Self {
        let mut config = PciConfiguration::new(&PciConfigurationParams {
            vendor_id: 0x1234,
            device_id: 0x5678,
            class_code: PciClassCode::Other,
            interrupt_pin: 1,
            ..Default::default()
        });
        config
            .add_bar(
                0,
                bar,
                BAR_SIZE,
                PciBarRegionType::Memory64BitRegion,
                PciBarPrefetchable::NotPrefetchable,
            )
            .unwrap();
        FakeFunction { config }
    }
}

impl ConfigSpaceFunction for FakeFunction {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
}

impl BusDevice for FakeFunction {
    fn read(&mut self, _base: u64, _offset: u64, data: &mut [u8]) {
        data.fill(0x5a);
    }
    fn write(&mut self, _base: u64, _offset: u64, _data: &[u8]) {}
}

struct Rig {
    dm: DeviceManager,
    irq: Arc<FakeBackend>,
    io: Arc<FakeIoEvents>,
}

fn rig() -> Rig {
    let config = SystemAllocatorConfig::for_x86_64_ram_size(1 << 30).unwrap();
    let irq = Arc::new(FakeBackend::default());
    let io = Arc::new(FakeIoEvents::default());
    let dm = DeviceManager::with_backends(
        irq.clone(),
        io.clone(),
        SystemAllocator::new(&config).unwrap(),
    )
    .unwrap();
    Rig { dm, irq, io }
}

/// The fake function, added the way the virtio path does it.
struct Added {
    bdf: PciBdf,
    bar: GuestRange,
    fds: Vec<RawFd>,
}

fn add_fake(dm: &mut DeviceManager, id: &str) -> Result<Added, DeviceManagerError> {
    let bdf = dm.next_free_slot()?;
    add_fake_at(dm, id, bdf)
}

fn add_fake_at(dm: &mut DeviceManager, id: &str, bdf: PciBdf) -> Result<Added, DeviceManagerError> {
    let bar = dm.allocate_bar(id, BAR_SIZE)?;
    let msix = dm.create_msix_group(id, 2)?;
    let intx = dm.create_intx(id, bdf.device())?;
    let evts: Vec<EventFd> = (0..2)
        .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
        .collect();
    let fds = evts.iter().map(|e| e.as_raw_fd()).collect();
    let ioevents = evts
        .into_iter()
        .enumerate()
        .map(|(i, e)| (0x3000 + 4 * i as u64, e))
        .collect();
    let bars = vec![BarSetup {
        index: 0,
        range: bar,
        ioevents,
    }];
    let device = Arc::new(Mutex::new(FakeFunction::new(bar.base())));
    let interrupts = PciInterrupts {
        msix: Some(msix),
        intx: Some(intx),
    };
    dm.add_pci_device(id, bdf, device, bars, interrupts, None)?;
    Ok(Added { bdf, bar, fds })
}

fn cfg_addr(bdf: PciBdf, reg: u32) -> [u8; 4] {
    (0x8000_0000 | u32::from(bdf.routing_id()) << 8 | reg).to_le_bytes()
}

fn cfg_read(bus: &Bus, bdf: PciBdf, reg: u32) -> u32 {
    bus.write(0xcf8, &cfg_addr(bdf, reg)).unwrap();
    let mut data = [0; 4];
    bus.read(0xcfc, &mut data).unwrap();
    u32::from_le_bytes(data)
}

fn cfg_write(bus: &Bus, bdf: PciBdf, reg: u32, value: u32) {
    bus.write(0xcf8, &cfg_addr(bdf, reg)).unwrap();
    bus.write(0xcfc, &value.to_le_bytes()).unwrap();
}

/// The guest moves BAR 0 of `bdf` to `new` the way Linux does: decoding
/// off, both halves written, decoding on (the move happens then).
fn move_bar(dm: &DeviceManager, bdf: PciBdf, new: u64) {
    let io = dm.io_bus();
    cfg_write(io, bdf, 0x04, 0);
    cfg_write(io, bdf, 0x10, new as u32 | 0x4);
    cfg_write(io, bdf, 0x14, (new >> 32) as u32);
    cfg_write(io, bdf, 0x04, 0x2);
}

fn bar_of(dm: &DeviceManager, bdf: PciBdf) -> u64 {
    let io = dm.io_bus();
    u64::from(cfg_read(io, bdf, 0x14)) << 32 | u64::from(cfg_read(io, bdf, 0x10) & !0xf)
}

fn read_byte(bus: &Bus, addr: u64) -> Result<u8, BusError> {
    let mut b = [0];
    bus.read(addr, &mut b).map(|()| b[0])
}

#[test]
fn pci_root_answers_on_both_mechanisms() {
    let r = rig();
    let host = PciBdf::new(0, 0, 0);
    assert_eq!(cfg_read(r.dm.io_bus(), host, 0), 0x0008_1b36);
    let mut data = [0; 4];
    r.dm.mmio_bus()
        .read(layout::PCI_ECAM_START, &mut data)
        .unwrap();
    assert_eq!(u32::from_le_bytes(data), 0x0008_1b36);
    assert_eq!(cfg_read(r.dm.io_bus(), PciBdf::new(0, 3, 0), 0), u32::MAX);
    // The whole ECAM window is claimed, up to bus 255.
    let last = layout::PCI_ECAM_START + layout::PCI_ECAM_SIZE - 4;
    r.dm.mmio_bus().read(last, &mut data).unwrap();
    assert_eq!(u32::from_le_bytes(data), u32::MAX);
    let host = r.dm.pci_host_info();
    assert_eq!((host.ecam_base, host.last_bus), (layout::PCI_ECAM_START, 0));
    assert_eq!(host.mmio32.base, layout::MMIO32_WINDOW_START);
    assert_eq!(host.mmio64.base, 1 << 32, "above RAM, 1 GiB aligned");
    // INTx pins are kept from exclusive use.
    let mut a = r.dm.allocator().lock().unwrap();
    assert!((16..24).all(|gsi| a.is_legacy_irq_allocated(gsi)));
    assert!(a.allocate_legacy_irq().unwrap() < 16);
}

#[test]
fn a_function_is_wired_to_bus_interrupts_and_ioeventfds() {
    let mut r = rig();
    let f = add_fake(&mut r.dm, "fake0").unwrap();
    assert_eq!(f.bdf, PciBdf::new(0, 1, 0));
    let io = r.dm.io_bus();
    assert_eq!(cfg_read(io, f.bdf, 0), 0x5678_1234);
    let gsi = legacy_irq_for(1, IntxPin::IntA);
    assert_eq!(
        cfg_read(io, f.bdf, 0x3c) & 0xffff,
        0x0100 | gsi,
        "pin A, line = GSI"
    );
    assert_eq!(f.bar.space(), AddressSpace::Mmio64);
    assert_eq!(f.bar.base() % BAR_SIZE, 0, "naturally aligned");
    assert_eq!(read_byte(r.dm.mmio_bus(), f.bar.base() + 0x10), Ok(0x5a));
    assert_eq!(
        r.io.take(),
        vec![
            (true, f.fds[0], true, f.bar.base() + 0x3000),
            (true, f.fds[1], true, f.bar.base() + 0x3004),
        ]
    );
    assert!(r
        .irq
        .take()
        .iter()
        .any(|op| matches!(op, Op::RegisterResample { gsi: g, .. } if *g == gsi)));

    let topology = r.dm.topology();
    assert_eq!(topology.len(), 2);
    assert_eq!(topology[0].id, "host bridge");
    let info = &topology[1];
    assert_eq!((info.vendor_id, info.device_id), (0x1234, 0x5678));
    assert_eq!(info.bars, vec![(0, f.bar)]);
    assert_eq!(info.msix_gsis, vec![24, 25]);
    assert_eq!(info.intx_gsi, Some(gsi));
    let line = info.to_string();
    assert!(
        line.starts_with("0000:00:01.0 fake0 [1234:5678], BAR0 ")
            && line.ends_with(&format!("MSI-X 2 vectors on GSI 24-25, INTA# on GSI {gsi}")),
        "{line}"
    );
}

#[test]
fn a_guest_bar_move_takes_bus_allocation_and_ioeventfds_along() {
    let mut r = rig();
    let f = add_fake(&mut r.dm, "fake0").unwrap();
    r.io.take();
    let new = f.bar.base() + 0x10_0000;
    move_bar(&r.dm, f.bdf, new);
    assert_eq!(bar_of(&r.dm, f.bdf), new);
    assert_eq!(
        r.io.take(),
        vec![
            (false, f.fds[0], true, f.bar.base() + 0x3000),
            (false, f.fds[1], true, f.bar.base() + 0x3004),
            (true, f.fds[0], true, new + 0x3000),
            (true, f.fds[1], true, new + 0x3004),
        ]
    );
    let mmio = r.dm.mmio_bus();
    assert_eq!(read_byte(mmio, new), Ok(0x5a));
    assert_eq!(
        read_byte(mmio, f.bar.base()),
        Err(BusError::NoDevice(f.bar.base()))
    );
    assert_eq!(r.dm.topology()[1].bars[0].1.base(), new);
    let mut a = r.dm.allocator().lock().unwrap();
    assert!(a.allocate_at(AddressSpace::Mmio64, new, BAR_SIZE).is_err());
    a.allocate_at(AddressSpace::Mmio64, f.bar.base(), BAR_SIZE)
        .unwrap();
}

#[test]
fn a_64bit_bar_may_move_below_4g() {
    let mut r = rig();
    let f = add_fake(&mut r.dm, "fake0").unwrap();
    move_bar(&r.dm, f.bdf, layout::MMIO32_WINDOW_START);
    assert_eq!(bar_of(&r.dm, f.bdf), layout::MMIO32_WINDOW_START);
    let bar = r.dm.relocator().bar(f.bdf, 0).unwrap();
    assert_eq!(bar.space(), AddressSpace::Mmio32);
    // And back up again.
    move_bar(&r.dm, f.bdf, f.bar.base());
    assert_eq!(r.dm.relocator().bar(f.bdf, 0), Some(f.bar));
}

#[test]
fn a_failed_ioeventfd_registration_rolls_the_move_back() {
    let mut r = rig();
    let f = add_fake(&mut r.dm, "fake0").unwrap();
    r.io.take();
    let (old, new) = (f.bar.base(), f.bar.base() + 0x10_0000);
    *r.io.fail_at.lock().unwrap() = Some(new + 0x3004);
    move_bar(&r.dm, f.bdf, new);
    assert_eq!(bar_of(&r.dm, f.bdf), old, "the root restored the BAR");
    assert_eq!(
        r.io.take(),
        vec![
            (false, f.fds[0], true, old + 0x3000),
            (false, f.fds[1], true, old + 0x3004),
            (true, f.fds[0], true, new + 0x3000),
            (false, f.fds[0], true, new + 0x3000),
            (true, f.fds[0], true, old + 0x3000),
            (true, f.fds[1], true, old + 0x3004),
        ]
    );
    let mmio = r.dm.mmio_bus();
    assert_eq!(read_byte(mmio, old), Ok(0x5a));
    assert!(read_byte(mmio, new).is_err());
    let mut a = r.dm.allocator().lock().unwrap();
    a.allocate_at(AddressSpace::Mmio64, new, BAR_SIZE).unwrap();
    assert!(a.allocate_at(AddressSpace::Mmio64, old, BAR_SIZE).is_err());
}

#[test]
fn moves_onto_taken_or_foreign_ranges_are_refused() {
    let mut r = rig();
    let a = add_fake(&mut r.dm, "a").unwrap();
    let b = add_fake(&mut r.dm, "b").unwrap();
    r.io.take();
    move_bar(&r.dm, a.bdf, b.bar.base());
    assert_eq!(bar_of(&r.dm, a.bdf), a.bar.base());
    // Onto the ECAM window, outside every allocatable window.
    move_bar(&r.dm, a.bdf, layout::PCI_ECAM_START);
    assert_eq!(bar_of(&r.dm, a.bdf), a.bar.base());
    assert!(r.io.take().is_empty(), "no ioeventfd touched");
    assert_eq!(read_byte(r.dm.mmio_bus(), a.bar.base()), Ok(0x5a));
}

#[test]
fn a_failed_add_releases_everything() {
    let mut r = rig();
    // 00:00.0 is the host bridge: refused before anything is touched.
    let err = add_fake_at(&mut r.dm, "dup", PciBdf::new(0, 0, 0))
        .err()
        .unwrap();
    assert!(matches!(err, DeviceManagerError::Pci { .. }), "{err}");
    assert!(r.io.take().is_empty());
    let ops = r.irq.take();
    assert!(
        matches!(ops.last(), Some(Op::Unregister { .. })),
        "the INTx irqfd is gone: {ops:?}"
    );
    assert!(r.dm.subscribers.is_empty(), "and out of the event loop");
    let bar = r.dm.allocate_bar("again", BAR_SIZE).unwrap();
    assert!(r.dm.mmio_bus().range_of(bar.base()).is_none());
    r.dm.lock_allocator().free(&bar).unwrap();

    // An ioeventfd KVM refuses: the BAR was on the bus already.
    let next = bar.base() + 0x3004;
    *r.io.fail_at.lock().unwrap() = Some(next);
    let err = add_fake(&mut r.dm, "noio").err().unwrap();
    assert!(matches!(err, DeviceManagerError::BarMap { .. }), "{err}");
    assert_eq!(r.io.take().len(), 2, "one registered, then unregistered");
    assert!(r.dm.mmio_bus().range_of(bar.base()).is_none());
    assert_eq!(r.dm.allocate_bar("again", BAR_SIZE).unwrap(), bar);
    assert_eq!(r.dm.topology().len(), 1);
    assert!(r.dm.relocator().bars_of(PciBdf::new(0, 1, 0)).is_empty());
}

#[test]
fn legacy_devices() {
    let mut r = rig();
    let path = std::env::temp_dir().join(format!("trellis-serial-{}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let reset = EventFd::new(EFD_NONBLOCK).unwrap();
    let serial = Output::appending(OutputMode::File(path.clone()));
    r.dm.add_legacy_devices(&serial, reset.try_clone().unwrap())
        .unwrap();
    let io = r.dm.io_bus();
    io.write(0x3f8, b"A").unwrap();
    io.write(0x3f8, b"\n").unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"A\n");
    assert!(r
        .irq
        .take()
        .iter()
        .any(|op| matches!(op, Op::Register { gsi: 4, .. })));
    assert!(r.dm.allocator().lock().unwrap().is_legacy_irq_allocated(4));
    io.write(0x64, &[0xfe]).unwrap();
    assert_eq!(reset.read().unwrap(), 1, "i8042 reset");
    std::fs::remove_file(&path).unwrap();

    let mut r = rig();
    r.dm.add_legacy_devices(&Output::appending(OutputMode::Off), reset)
        .unwrap();
    assert!(r.dm.serial().is_none());
    assert_eq!(
        read_byte(r.dm.io_bus(), 0x3f8),
        Err(BusError::NoDevice(0x3f8))
    );
    assert!(read_byte(r.dm.io_bus(), 0x64).is_ok());
}

#[test]
fn a_missing_vfio_function_is_named() {
    let r = rig();
    let args: Vec<String> = [
        "trellis",
        "--kernel",
        "/k",
        "--device",
        "path=/sys/bus/pci/devices/0000:ff:1f.7,id=gpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let config = VmConfig::parse(&args).unwrap();
    let err = r.dm.check_vfio(&config).unwrap_err();
    assert_eq!(err.to_string(), "cannot pass gpu through");
    assert_eq!(
        std::error::Error::source(&err).unwrap().to_string(),
        "/sys/bus/pci/devices/0000:ff:1f.7: no such PCI function on this host"
    );
}

fn parse(args: &[&str]) -> VmConfig {
    let mut all = vec![
        "trellis".to_string(),
        "--kernel".to_string(),
        "/k".to_string(),
    ];
    all.extend(args.iter().map(|s| s.to_string()));
    VmConfig::parse(&all).unwrap()
}

#[test]
fn devices_from_the_configuration() {
    let mut r = rig();
    let path = std::env::temp_dir().join(format!("trellis-console-{}", std::process::id()));
    let image = std::env::temp_dir().join(format!("trellis-disk-{}", std::process::id()));
    std::fs::write(&image, [0u8; 4096]).unwrap();
    let console = format!("file={}", path.display());
    let disk = format!("path={},readonly=on", image.display());
    let config = parse(&["--disk", &disk, "--rng", "--console", &console]);
    let outputs = Outputs::new(&config.serial, &config.console);
    r.dm.create_devices(&config, &outputs.console, guest_memory())
        .unwrap();
    let found: Vec<(String, u16, u8)> =
        r.dm.topology()
            .iter()
            .map(|f| (f.id.clone(), f.device_id, f.bdf.device()))
            .collect();
    let expected = [
        ("host bridge", 0x0008, 0),
        ("disk0", 0x1042, 1),
        ("rng", 0x1044, 2),
        ("console", 0x1043, 3),
    ];
    assert_eq!(
        found,
        expected.map(|(id, dev, slot)| (id.to_string(), dev, slot))
    );
    assert!(path.exists());
    std::fs::remove_file(&path).unwrap();
    std::fs::remove_file(&image).unwrap();

    // A VFIO function that cannot be passed through stops everything
    // before anything is created.
    let mut r = rig();
    let config = parse(&[
        "--console",
        &console,
        "--device",
        "path=/sys/bus/pci/devices/0000:ff:1f.7",
    ]);
    let outputs = Outputs::new(&config.serial, &config.console);
    assert!(matches!(
        r.dm.create_devices(&config, &outputs.console, guest_memory()),
        Err(DeviceManagerError::Vfio {
            source: super::VfioSetupError::NoSuchDevice(_),
            ..
        })
    ));
    assert_eq!(r.dm.topology().len(), 1);
    assert!(!path.exists());
}

/// Waits until `fd` (an eventfd) has a count, for at most two seconds.
fn wait_for(fd: RawFd) -> u64 {
    // SAFETY: `fd` stays open for the caller's whole test; the borrowed
    // handle is forgotten, never closed.
    let evt = std::mem::ManuallyDrop::new(unsafe {
        <EventFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
    });
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(n) = evt.read() {
            return n;
        }
        assert!(Instant::now() < deadline, "timed out");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn the_event_loop_reasserts_pending_intx() {
    let mut r = rig();
    let intx = r.dm.create_intx("x", 2).unwrap();
    let Some(Op::RegisterResample { fd, .. }) = r.irq.take().pop() else {
        panic!("no resampling irqfd")
    };
    r.dm.start_event_loop().unwrap();
    intx.assert().unwrap();
    assert_eq!(wait_for(fd), 1);
    // The guest EOIs while the device still has it pending.
    intx.resample_fd().write(1).unwrap();
    assert_eq!(wait_for(fd), 1, "raised again by the vmm events thread");
    r.dm.shutdown();
}

/// A minimal virtio device (an entropy source that never activates).
struct FakeVirtio {
    sizes: Vec<u16>,
}

impl VirtioDevice for FakeVirtio {
    fn device_type(&self) -> u32 {
        virtio_devices::device_type::RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.sizes
    }
    fn features(&self) -> u64 {
        1 << 32
    }
    fn ack_features(&mut self, _features: u64) {}
    fn config_size(&self) -> usize {
        0
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmapAtomic,
        _interrupt: Arc<dyn virtio_devices::VirtioInterrupt>,
        _queues: Vec<QueueActivation>,
    ) -> Result<(), ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

fn guest_memory() -> GuestMemoryMmapAtomic {
    GuestMemoryAtomic::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

#[test]
fn a_virtio_device_gets_one_ioeventfd_per_queue() {
    let mut r = rig();
    let device = Arc::new(Mutex::new(FakeVirtio {
        sizes: vec![16, 16, 16],
    }));
    let bdf =
        r.dm.add_virtio_device("rng0", device, guest_memory())
            .unwrap();
    let info = &r.dm.topology()[1];
    assert_eq!(
        (info.bdf, info.vendor_id, info.device_id),
        (bdf, 0x1af4, 0x1044)
    );
    assert_eq!(info.msix_gsis.len(), 4, "queues + 1");
    let bar = info.bars[0].1;
    assert_eq!(bar.size(), virtio_devices::transport::VIRTIO_PCI_BAR_SIZE);
    let addrs: Vec<u64> = r.io.take().iter().map(|op| op.3).collect();
    let notify = virtio_devices::transport::NOTIFY_OFFSET;
    assert_eq!(
        addrs,
        vec![
            bar.base() + notify,
            bar.base() + notify + 4,
            bar.base() + notify + 8
        ]
    );
}

#[test]
fn virtio_devices_on_the_host_kvm() {
    let Some(vm) = kvm_vm() else { return };
    let mut dm = DeviceManager::new(vm, 1 << 30).unwrap();
    dm.routing_table().sync().unwrap();
    let mut bdfs = Vec::new();
    for i in 0..3 {
        let device = Arc::new(Mutex::new(FakeVirtio {
            sizes: vec![8; i + 1],
        }));
        bdfs.push(
            dm.add_virtio_device(&format!("v{i}"), device, guest_memory())
                .unwrap(),
        );
    }
    dm.start_event_loop().unwrap();
    let before = dm.relocator().bar(bdfs[1], 0).unwrap();
    // Real KVM_IOEVENTFD deassign + assign on the move.
    let new = before.base() + 0x100_0000;
    move_bar(&dm, bdfs[1], new);
    assert_eq!(bar_of(&dm, bdfs[1]), new);
    assert_eq!(dm.relocator().bar(bdfs[1], 0).unwrap().base(), new);
    // Moving onto a neighbour is refused and rolled back.
    let neighbour = dm.relocator().bar(bdfs[2], 0).unwrap().base();
    move_bar(&dm, bdfs[1], neighbour);
    assert_eq!(bar_of(&dm, bdfs[1]), new);
    // The guest enables MSI-X and unmasks a vector through the BAR: a real
    // route and irqfd appear.
    let mmio = dm.mmio_bus();
    let table = new + virtio_devices::transport::MSIX_TABLE_OFFSET;
    mmio.write(table, &0xfee0_0000u32.to_le_bytes()).unwrap();
    mmio.write(table + 8, &0x41u32.to_le_bytes()).unwrap();
    mmio.write(table + 12, &0u32.to_le_bytes()).unwrap();
    let io = dm.io_bus();
    // MSI-X message control: enable (bit 15 of the upper half of the cap's
    // first dword); find the capability by walking the list.
    let mut cap = cfg_read(io, bdfs[1], 0x34) & 0xfc;
    while cap != 0 && cfg_read(io, bdfs[1], cap) & 0xff != 0x11 {
        cap = (cfg_read(io, bdfs[1], cap) >> 8) & 0xfc;
    }
    assert_ne!(cap, 0, "MSI-X capability present");
    let dword = cfg_read(io, bdfs[1], cap);
    cfg_write(io, bdfs[1], cap, dword | 1 << 31);
    let gsi = dm.topology()[2].msix_gsis[0];
    assert!(dm.routing_table().msi_routes().contains_key(&gsi));
    dm.log_topology();
    dm.shutdown();
}

static CAPTURE: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        let entry = (record.target().to_string(), record.args().to_string());
        CAPTURE.lock().unwrap().push(entry);
    }
    fn flush(&self) {}
}

#[test]
fn the_topology_is_logged_under_its_target() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        log::set_logger(&Capture).unwrap();
        log::set_max_level(log::LevelFilter::Info);
    });
    let mut r = rig();
    add_fake(&mut r.dm, "logged0").unwrap();
    r.dm.log_topology();
    let lines: Vec<String> = CAPTURE
        .lock()
        .unwrap()
        .iter()
        .filter(|(target, _)| target == TOPOLOGY_LOG_TARGET)
        .map(|(_, line)| line.clone())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("0000:00:00.0 host bridge [1b36:0008]")),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("0000:00:01.0 logged0 [1234:5678], BAR0 ")),
        "{lines:?}"
    );
}

#[test]
fn dropping_the_manager_releases_every_device() {
    // A guest reset rebuilds the VM: whatever the old devices hold (taps,
    // VFIO groups, guest RAM, the VM fd) must go with their manager.
    let Rig { mut dm, irq, io } = rig();
    let device = Arc::new(Mutex::new(FakeVirtio { sizes: vec![8, 8] }));
    let virtio = Arc::downgrade(&device);
    dm.add_virtio_device("v0", device, guest_memory()).unwrap();
    add_fake(&mut dm, "f0").unwrap();
    let reset = EventFd::new(EFD_NONBLOCK).unwrap();
    dm.add_legacy_devices(&Output::appending(OutputMode::Off), reset)
        .unwrap();
    dm.start_event_loop().unwrap();
    let buses = [Arc::downgrade(dm.io_bus()), Arc::downgrade(dm.mmio_bus())];
    let root = Arc::downgrade(dm.pci_root());
    drop(dm);
    assert!(virtio.upgrade().is_none(), "the virtio device outlived it");
    assert!(
        buses.iter().all(|b| b.upgrade().is_none()),
        "a bus outlived it"
    );
    assert!(root.upgrade().is_none(), "the PCI root outlived it");
    assert_eq!(Arc::strong_count(&irq), 1, "interrupt backend still held");
    assert_eq!(Arc::strong_count(&io), 1, "ioeventfd backend still held");
}
