use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pci::{InterruptError, IntxInterrupt, MsiInterruptGroup, MsiMessage};
use vm_allocator::{layout, GsiLayout, SystemAllocator, SystemAllocatorConfig};
use vmm_sys_util::eventfd::EventFd;

use super::*;

/// One call made on the fake backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    SetRouting(Vec<RouteEntry>),
    Register {
        fd: RawFd,
        gsi: u32,
    },
    RegisterResample {
        fd: RawFd,
        resample: RawFd,
        gsi: u32,
    },
    Unregister {
        fd: RawFd,
        gsi: u32,
    },
}

/// An [`IrqBackend`] that records calls and fails on demand.
#[derive(Default)]
pub(crate) struct FakeBackend {
    ops: Mutex<Vec<Op>>,
    pub(crate) fail_routing: AtomicBool,
    pub(crate) fail_register: AtomicBool,
}

impl FakeBackend {
    pub(crate) fn take(&self) -> Vec<Op> {
        std::mem::take(&mut *self.ops.lock().unwrap())
    }

    fn record(&self, op: Op, fail: &AtomicBool) -> io::Result<()> {
        if fail.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.ops.lock().unwrap().push(op);
        Ok(())
    }
}

impl IrqBackend for FakeBackend {
    fn set_gsi_routing(&self, entries: &[RouteEntry]) -> io::Result<()> {
        self.record(Op::SetRouting(entries.to_vec()), &self.fail_routing)
    }
    fn register_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        let op = Op::Register {
            fd: fd.as_raw_fd(),
            gsi,
        };
        self.record(op, &self.fail_register)
    }
    fn register_irqfd_with_resample(
        &self,
        fd: &EventFd,
        resample: &EventFd,
        gsi: u32,
    ) -> io::Result<()> {
        let op = Op::RegisterResample {
            fd: fd.as_raw_fd(),
            resample: resample.as_raw_fd(),
            gsi,
        };
        self.record(op, &self.fail_register)
    }
    fn unregister_irqfd(&self, fd: &EventFd, gsi: u32) -> io::Result<()> {
        let op = Op::Unregister {
            fd: fd.as_raw_fd(),
            gsi,
        };
        self.record(op, &AtomicBool::new(false))
    }
}

struct Rig {
    backend: Arc<FakeBackend>,
    table: Arc<GsiRoutingTable>,
    allocator: Arc<Mutex<SystemAllocator>>,
}

fn rig() -> Rig {
    rig_with_msi_limit(layout::MSI_GSI_LIMIT)
}

fn rig_with_msi_limit(msi_gsi_limit: u32) -> Rig {
    let mut config = SystemAllocatorConfig::for_x86_64_ram_size(1 << 30).unwrap();
    config.gsi = GsiLayout {
        msi_gsi_limit,
        ..layout::default_gsi_layout()
    };
    let allocator = SystemAllocator::new(&config).unwrap();
    let backend = Arc::new(FakeBackend::default());
    let table = Arc::new(GsiRoutingTable::new(backend.clone(), allocator.msi_gsis()));
    Rig {
        backend,
        table,
        allocator: Arc::new(Mutex::new(allocator)),
    }
}

impl Rig {
    fn group(&self, vectors: usize) -> KvmMsiInterruptGroup {
        KvmMsiInterruptGroup::new(self.table.clone(), self.allocator.clone(), vectors).unwrap()
    }
}

fn msg(n: u32) -> MsiMessage {
    MsiMessage {
        address: 0xfee0_0000 | u64::from(n) << 12,
        data: 0x40 + n,
    }
}

fn msi_entry(gsi: u32, m: MsiMessage) -> RouteEntry {
    RouteEntry {
        gsi,
        target: RouteTarget::Msi(m),
    }
}

/// The table KVM would get with `msi` routes besides the defaults.
fn table_with(msi: &[(u32, MsiMessage)]) -> Vec<RouteEntry> {
    let mut t = default_irqchip_routes();
    t.extend(msi.iter().map(|&(g, m)| msi_entry(g, m)));
    t
}

fn fd(group: &KvmMsiInterruptGroup, index: u16) -> RawFd {
    group.notifier(index).unwrap().as_raw_fd()
}

#[test]
fn default_routes_match_kvm() {
    let routes = default_irqchip_routes();
    assert_eq!(routes.len(), 40);
    let chip_pin = |gsi: u32| -> Vec<(u32, u32)> {
        routes
            .iter()
            .filter(|r| r.gsi == gsi)
            .map(|r| match r.target {
                RouteTarget::Irqchip { chip, pin } => (chip, pin),
                RouteTarget::Msi(_) => panic!("MSI in the defaults"),
            })
            .collect()
    };
    assert_eq!(chip_pin(0), vec![(2, 0), (0, 0)]);
    assert_eq!(chip_pin(4), vec![(2, 4), (0, 4)]);
    assert_eq!(chip_pin(9), vec![(2, 9), (1, 1)]);
    assert_eq!(chip_pin(15), vec![(2, 15), (1, 7)]);
    assert_eq!(chip_pin(16), vec![(2, 16)]);
    assert_eq!(chip_pin(23), vec![(2, 23)]);
    assert!(chip_pin(24).is_empty());
}

#[test]
fn kvm_entry_encoding() {
    let e = msi_entry(
        30,
        MsiMessage {
            address: 0x1_fee0_1000,
            data: 0x4041,
        },
    )
    .to_kvm();
    assert_eq!((e.gsi, e.type_, e.flags), (30, 2, 0));
    // SAFETY: the entry was built as an MSI entry, so `msi` is the live field.
    let m = unsafe { e.u.msi };
    assert_eq!(
        (m.address_lo, m.address_hi, m.data),
        (0xfee0_1000, 1, 0x4041)
    );
    for entry in [default_irqchip_routes()[5], msi_entry(4095, msg(3))] {
        assert_eq!(RouteEntry::from_kvm(&entry.to_kvm()), Some(entry));
    }
    let e = default_irqchip_routes()[1].to_kvm();
    // SAFETY: default routes are irqchip entries.
    let c = unsafe { e.u.irqchip };
    assert_eq!((e.gsi, e.type_, c.irqchip, c.pin), (0, 1, 0, 0));
}

#[test]
fn new_group_is_masked_and_silent() {
    let r = rig();
    let g = r.group(3);
    assert_eq!(g.gsis(), &[24, 25, 26]);
    assert_eq!(g.len(), 3);
    assert!(!g.is_active(0));
    assert!(r.backend.take().is_empty(), "no KVM call before an unmask");
    assert!(matches!(
        KvmMsiInterruptGroup::new(r.table.clone(), r.allocator.clone(), 0),
        Err(IrqError::InvalidVectorCount(0))
    ));
    assert!(matches!(
        KvmMsiInterruptGroup::new(r.table.clone(), r.allocator.clone(), 2049),
        Err(IrqError::InvalidVectorCount(2049))
    ));
}

#[test]
fn unmask_installs_the_route_before_the_irqfd() {
    let r = rig();
    let g = r.group(2);
    g.update(1, msg(1), false).unwrap();
    assert_eq!(
        r.backend.take(),
        vec![
            Op::SetRouting(table_with(&[(25, msg(1))])),
            Op::Register {
                fd: fd(&g, 1),
                gsi: 25
            },
        ]
    );
    assert!(g.is_active(1) && !g.is_active(0));
}

#[test]
fn mask_unregisters_the_irqfd_before_removing_the_route() {
    let r = rig();
    let g = r.group(2);
    g.update(0, msg(0), false).unwrap();
    g.update(1, msg(1), false).unwrap();
    r.backend.take();
    g.update(0, msg(0), true).unwrap();
    assert_eq!(
        r.backend.take(),
        vec![
            Op::Unregister {
                fd: fd(&g, 0),
                gsi: 24
            },
            Op::SetRouting(table_with(&[(25, msg(1))])),
        ]
    );
    // Masking again, or changing a masked vector's message: nothing to do.
    g.update(0, msg(7), true).unwrap();
    assert!(r.backend.take().is_empty());
    assert!(r.table.msi_routes().keys().eq([25].iter()));
}

#[test]
fn changing_an_unmasked_message_only_pushes_the_table() {
    let r = rig();
    let g = r.group(1);
    g.update(0, msg(0), false).unwrap();
    r.backend.take();
    g.update(0, msg(0), false).unwrap();
    assert!(r.backend.take().is_empty(), "redundant update");
    g.update(0, msg(5), false).unwrap();
    assert_eq!(
        r.backend.take(),
        vec![Op::SetRouting(table_with(&[(24, msg(5))]))]
    );
}

#[test]
fn every_push_keeps_the_defaults_and_other_groups_routes() {
    let r = rig();
    let a = r.group(1);
    let b = r.group(2);
    a.update(0, msg(0), false).unwrap();
    b.update(1, msg(2), false).unwrap();
    b.update(1, msg(2), true).unwrap();
    for op in r.backend.take() {
        if let Op::SetRouting(t) = op {
            assert_eq!(t[..40], default_irqchip_routes()[..]);
            assert!(t.contains(&msi_entry(24, msg(0))), "group a's route kept");
        }
    }
    assert_eq!(r.table.entries(), table_with(&[(24, msg(0))]));
}

#[test]
fn batched_updates_push_once() {
    let r = rig();
    let g = r.group(4);
    let updates: Vec<VectorUpdate> = (0..4)
        .map(|i| VectorUpdate {
            index: i,
            msg: msg(u32::from(i)),
            masked: i == 3,
        })
        .collect();
    g.update_vectors(&updates).unwrap();
    let ops = r.backend.take();
    assert_eq!(
        ops[0],
        Op::SetRouting(table_with(&[(24, msg(0)), (25, msg(1)), (26, msg(2))]))
    );
    assert_eq!(ops.len(), 4, "one push, three irqfds: {ops:?}");
    // Function mask: everything masked in one go.
    let masked: Vec<VectorUpdate> = updates
        .iter()
        .map(|u| VectorUpdate { masked: true, ..*u })
        .collect();
    g.update_vectors(&masked).unwrap();
    let ops = r.backend.take();
    assert_eq!(ops.len(), 4);
    assert!(ops[..3].iter().all(|o| matches!(o, Op::Unregister { .. })));
    assert_eq!(ops[3], Op::SetRouting(table_with(&[])));
    assert!(matches!(
        g.update_vectors(&[VectorUpdate {
            index: 4,
            msg: msg(0),
            masked: false
        }]),
        Err(InterruptError::InvalidVector(4))
    ));
}

/// The guest side of the batch: an MSI-X function mask toggle over eight
/// live vectors reaches KVM as one table push each way, not eight.
#[test]
fn msix_function_mask_toggle_pushes_the_table_once() {
    const CTL_ENABLE: u16 = 1 << 15;
    const CTL_FUNCTION_MASK: u16 = 1 << 14;
    let r = rig();
    let group = Arc::new(r.group(8));
    let mut msix = pci::MsixConfig::new(8, group.clone()).unwrap();
    for v in 0..8u16 {
        let at = u64::from(v) * 16;
        let m = msg(u32::from(v));
        msix.write_table(at, &m.address.to_le_bytes());
        msix.write_table(at + 8, &m.data.to_le_bytes());
        msix.write_table(at + 12, &0u32.to_le_bytes());
    }
    msix.set_message_control(CTL_ENABLE);
    let pushes = |ops: &[Op]| {
        ops.iter()
            .filter(|o| matches!(o, Op::SetRouting(_)))
            .count()
    };
    let ops = r.backend.take();
    assert_eq!(
        pushes(&ops),
        1,
        "enabling installs all eight routes at once"
    );
    let all: Vec<(u32, MsiMessage)> = (0..8).map(|v| (24 + v, msg(v))).collect();
    assert_eq!(
        ops.last(),
        Some(&Op::Register {
            fd: fd(&group, 7),
            gsi: 31
        })
    );
    assert!(ops.contains(&Op::SetRouting(table_with(&all))));

    msix.set_message_control(CTL_ENABLE | CTL_FUNCTION_MASK);
    let ops = r.backend.take();
    assert_eq!(pushes(&ops), 1, "{ops:?}");
    assert_eq!(ops.last(), Some(&Op::SetRouting(table_with(&[]))));
    msix.set_message_control(CTL_ENABLE);
    let ops = r.backend.take();
    assert_eq!(pushes(&ops), 1, "{ops:?}");
    assert_eq!(ops[0], Op::SetRouting(table_with(&all)));
}

#[test]
fn failed_push_changes_nothing_and_is_retried() {
    let r = rig();
    let g = r.group(1);
    r.backend.fail_routing.store(true, Ordering::SeqCst);
    let err = g.update(0, msg(0), false).unwrap_err();
    assert!(matches!(err, InterruptError::Route { vector: 0, .. }));
    let cause = std::error::Error::source(&err).unwrap();
    assert_eq!(
        cause.to_string(),
        "failed to set the GSI routing table (41 routes)"
    );
    assert!(
        cause.source().is_some(),
        "the ioctl error stays in the chain"
    );
    assert!(r.backend.take().is_empty(), "no irqfd without a route");
    assert!(r.table.msi_routes().is_empty());
    r.backend.fail_routing.store(false, Ordering::SeqCst);
    g.update(0, msg(0), false).unwrap();
    assert_eq!(r.backend.take().len(), 2);
    assert!(g.is_active(0));
}

#[test]
fn failed_irqfd_registration_is_retried() {
    let r = rig();
    let g = r.group(1);
    r.backend.fail_register.store(true, Ordering::SeqCst);
    assert!(g.update(0, msg(0), false).is_err());
    assert!(!g.is_active(0));
    r.backend.fail_register.store(false, Ordering::SeqCst);
    r.backend.take();
    g.update(0, msg(0), false).unwrap();
    assert_eq!(
        r.backend.take(),
        vec![Op::Register {
            fd: fd(&g, 0),
            gsi: 24
        }],
        "route already there, irqfd retried"
    );
}

#[test]
fn trigger_writes_the_eventfd_and_accumulates_while_masked() {
    let r = rig();
    let g = r.group(2);
    g.trigger(1).unwrap();
    g.trigger(1).unwrap();
    assert_eq!(g.notifier(1).unwrap().read().unwrap(), 2);
    assert!(matches!(
        g.trigger(2),
        Err(InterruptError::InvalidVector(2))
    ));
    assert!(g.notifier(2).is_none());
}

#[test]
fn drop_unregisters_removes_routes_and_frees_gsis() {
    let r = rig();
    let keep = r.group(1);
    keep.update(0, msg(9), false).unwrap();
    let g = r.group(3);
    g.update(0, msg(0), false).unwrap();
    g.update(2, msg(2), false).unwrap();
    let (fd0, fd2) = (fd(&g, 0), fd(&g, 2));
    r.backend.take();
    drop(g);
    assert_eq!(
        r.backend.take(),
        vec![
            Op::Unregister { fd: fd0, gsi: 25 },
            Op::Unregister { fd: fd2, gsi: 27 },
            Op::SetRouting(table_with(&[(24, msg(9))])),
        ]
    );
    let a = r.allocator.lock().unwrap();
    assert!(a.is_msi_gsi_allocated(24));
    assert!((25..28).all(|gsi| !a.is_msi_gsi_allocated(gsi)));
}

#[test]
fn gsi_allocation_is_all_or_nothing() {
    // Four MSI GSIs: 24..28.
    let r = rig_with_msi_limit(28);
    let err = KvmMsiInterruptGroup::new(r.table.clone(), r.allocator.clone(), 5).unwrap_err();
    assert!(matches!(err, IrqError::GsiAllocation { count: 5, .. }));
    assert!(!r.allocator.lock().unwrap().is_msi_gsi_allocated(24));
    let g = r.group(4);
    assert_eq!(g.gsis(), &[24, 25, 26, 27]);
    drop(g);
    assert_eq!(r.group(4).gsis(), &[24, 25, 26, 27], "freed on drop");
}

#[test]
fn table_refuses_non_msi_gsis() {
    let r = rig();
    for gsi in [0, 23, 4096] {
        assert!(matches!(
            r.table.set_msi_route(gsi, msg(0)),
            Err(IrqError::NotAnMsiGsi { .. })
        ));
    }
    // A bad GSI anywhere in a batch rejects the whole batch.
    let err = r.table.apply(&[
        RouteChange::SetMsi {
            gsi: 30,
            msg: msg(0),
        },
        RouteChange::Remove { gsi: 5 },
    ]);
    assert!(err.is_err());
    assert!(r.table.msi_routes().is_empty());
    assert!(r.backend.take().is_empty());
    r.table.sync().unwrap();
    assert_eq!(r.backend.take(), vec![Op::SetRouting(table_with(&[]))]);
}

#[test]
fn intx_reasserts_on_resample_while_pending() {
    let r = rig();
    let line = KvmIntx::new(r.backend.clone(), 10).unwrap();
    let ops = r.backend.take();
    assert!(matches!(ops[..], [Op::RegisterResample { gsi: 10, .. }]));
    let Op::RegisterResample { fd: irqfd, .. } = ops[0] else {
        unreachable!()
    };
    let count = || {
        // SAFETY: `irqfd` is the line's eventfd, alive for the whole test;
        // the borrowed handle is forgotten before it could close it.
        let evt = std::mem::ManuallyDrop::new(unsafe {
            <EventFd as std::os::fd::FromRawFd>::from_raw_fd(irqfd)
        });
        evt.read().unwrap_or(0)
    };

    line.assert().unwrap();
    assert!(line.is_pending());
    assert_eq!(count(), 1);
    // EOI while the driver has not read the ISR yet: raised again.
    line.resample_fd().write(1).unwrap();
    line.handle_resample().unwrap();
    assert_eq!(count(), 1);
    assert_eq!(line.resample_fd().read().ok(), None, "resample drained");
    // The driver read the ISR, then EOIs: stays down.
    line.deassert().unwrap();
    line.resample_fd().write(1).unwrap();
    line.handle_resample().unwrap();
    assert_eq!(count(), 0);
    drop(line);
    assert_eq!(
        r.backend.take(),
        vec![Op::Unregister { fd: irqfd, gsi: 10 }]
    );
}

#[test]
fn intx_needs_an_ioapic_pin() {
    let r = rig();
    assert!(matches!(
        KvmIntx::new(r.backend.clone(), 24),
        Err(IrqError::NotAnIoapicPin(24))
    ));
    r.backend.fail_register.store(true, Ordering::SeqCst);
    assert!(matches!(
        KvmIntx::new(r.backend.clone(), 5),
        Err(IrqError::Irqfd { gsi: 5, .. })
    ));
}

/// A VM on the host's /dev/kvm with an in-kernel irqchip, or `None` (and
/// a note on stderr) where KVM is not usable.
pub(crate) fn kvm_vm() -> Option<Arc<kvm_ioctls::VmFd>> {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("skipping: /dev/kvm not usable: {e}");
            return None;
        }
    };
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    Some(Arc::new(vm))
}

#[test]
fn real_kvm_routes_irqfds_and_triggers() {
    let Some(vm) = kvm_vm() else { return };
    let config = SystemAllocatorConfig::for_x86_64_ram_size(1 << 30).unwrap();
    let allocator = SystemAllocator::new(&config).unwrap();
    let table = Arc::new(GsiRoutingTable::new(vm.clone(), allocator.msi_gsis()));
    let allocator = Arc::new(Mutex::new(allocator));
    table.sync().expect("defaults accepted");

    let g = KvmMsiInterruptGroup::new(table.clone(), allocator.clone(), 4).unwrap();
    // Vector 3 is written while masked: it must survive until the unmask.
    g.trigger(3).unwrap();
    let updates: Vec<VectorUpdate> = (0..4)
        .map(|i| VectorUpdate {
            index: i,
            msg: msg(u32::from(i)),
            masked: false,
        })
        .collect();
    g.update_vectors(&updates).unwrap();
    for i in 0..4 {
        assert!(g.is_active(i));
        g.trigger(i).unwrap();
    }
    g.update(1, msg(8), false).unwrap();
    g.update(2, msg(2), true).unwrap();
    g.trigger(2).unwrap();
    g.update(2, msg(2), false).unwrap();
    assert_eq!(table.msi_routes().len(), 4);

    // Legacy lines keep working beside MSI routes: a level INTx on pin 10.
    let line = KvmIntx::new(vm.clone(), 10).unwrap();
    line.assert().unwrap();
    line.handle_resample().unwrap();
    line.deassert().unwrap();
    drop(line);

    drop(g);
    assert!(table.msi_routes().is_empty());
    assert!(!allocator.lock().unwrap().is_msi_gsi_allocated(24));
}
