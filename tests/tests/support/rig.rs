//! A machine with one virtio device behind the PCI transport at 00:03.0,
//! wired the way the VMM does it: the same `VirtioPciDevice` on the PCI
//! root and, for its BAR, on the MMIO bus; MSI-X into a recording group;
//! an INTx line that remembers its level.

// Each test crate uses a different part of this module.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pci::interrupt::RecordingInterruptGroup;
use pci::{InterruptError, IntxInterrupt, PciBdf};
use tests::virtio_driver::{ConfigMechanism, Machine, VirtioPciDriver};
use virtio_devices::transport::{msix_vector_count, VirtioPciDevice, VIRTIO_PCI_BAR_SIZE};
use virtio_devices::VirtioDevice;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Guest RAM size.
pub const MEM_SIZE: usize = 16 << 20;
/// Where the VMM first maps the BAR.
pub const VMM_BAR: u64 = 0x40_0000_0000;
/// Where the guest assigns it.
pub const GUEST_BAR: u64 = 0x80_0000_0000;
/// How long to wait for the device's worker.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// The device's address.
pub fn bdf() -> PciBdf {
    PciBdf::new(0, 3, 0)
}

/// An INTx line recording its level.
#[derive(Default)]
pub struct Line(AtomicBool);

impl IntxInterrupt for Line {
    fn assert(&self) -> Result<(), InterruptError> {
        self.0.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn deassert(&self) -> Result<(), InterruptError> {
        self.0.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// The machine, guest memory and the transport.
pub struct Rig {
    pub machine: Machine,
    pub mem: GuestMemoryMmap,
    pub dev: Arc<Mutex<VirtioPciDevice>>,
    pub msix: Arc<RecordingInterruptGroup>,
    pub intx: Arc<Line>,
}

impl Rig {
    /// Plugs `device` in behind the transport, with [`MEM_SIZE`] bytes of
    /// guest RAM at 0.
    pub fn new<D: VirtioDevice + 'static>(device: D) -> Self {
        Self::with_memory(device, &[(GuestAddress(0), MEM_SIZE)])
    }

    /// Plugs `device` in behind the transport, with guest RAM at `ranges`
    /// (e.g. some above 4 GiB, so that the high half of a queue address
    /// matters).
    pub fn with_memory<D: VirtioDevice + 'static>(
        device: D,
        ranges: &[(GuestAddress, usize)],
    ) -> Self {
        let msix = Arc::new(RecordingInterruptGroup::new(msix_vector_count(&device)));
        let intx = Arc::new(Line::default());
        let mem = GuestMemoryMmap::from_ranges(ranges).unwrap();
        let dev = VirtioPciDevice::new(
            "dev0".into(),
            Arc::new(Mutex::new(device)),
            GuestMemoryAtomic::new(mem.clone()),
            msix.clone(),
            Some(intx.clone()),
            VMM_BAR,
        )
        .unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let machine = Machine::new();
        machine
            .add_function(
                bdf(),
                dev.clone(),
                dev.clone(),
                VMM_BAR,
                VIRTIO_PCI_BAR_SIZE,
            )
            .unwrap();
        Rig {
            machine,
            mem,
            dev,
            msix,
            intx,
        }
    }

    /// Probes the device, assigning its BAR at [`GUEST_BAR`].
    pub fn probe(&self, mechanism: ConfigMechanism) -> VirtioPciDriver<'_> {
        VirtioPciDriver::probe(&self.machine, mechanism, bdf(), GUEST_BAR).unwrap()
    }

    /// The INTx level.
    pub fn intx(&self) -> bool {
        self.intx.0.load(Ordering::SeqCst)
    }

    /// Waits until the MSI-X vectors triggered so far include `expect`.
    pub fn wait_triggered(&self, expect: &[u16]) -> Vec<u16> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            seen.extend(self.msix.take_triggered());
            if expect.iter().all(|v| seen.contains(v)) {
                return seen;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        panic!("vectors {expect:?} not triggered, saw {seen:?}");
    }
}

/// Polls `cond` until it holds, failing the test after [`TIMEOUT`].
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}
