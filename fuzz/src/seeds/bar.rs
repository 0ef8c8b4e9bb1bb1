//! Seeds of `virtio_pci_bar`.

use crate::pci_config::ops::Width;
use crate::virtio_pci_bar::{run, CfgWidth, DeviceKind, Input, Op};
use crate::virtq::{Addr, Len, Seg};

fn init(vectors: bool, msix: bool) -> Op {
    Op::Init {
        features: u64::MAX,
        queues: 4,
        ring: 4,
        vectors,
        msix,
    }
}

fn chain(queue: u8, segs: &[(u16, u8, bool)]) -> Op {
    Op::Chain {
        queue,
        segs: segs
            .iter()
            .map(|&(at, len, write)| Seg {
                addr: Addr::Data(at),
                len: Len::Bytes(len),
                write,
            })
            .collect(),
    }
}

fn status(value: u64) -> Op {
    Op::Common { field: 6, value }
}

fn read(offset: u16, width: Width) -> Op {
    Op::Read { offset, width }
}

/// virtio-rng with MSI-X: requests, masking, a reset, INTx after it.
fn rng_msix() -> Input {
    Input {
        device: DeviceKind::Rng,
        ops: vec![
            init(true, true),
            chain(0, &[(0, 64, true)]),
            Op::Notify { queue: 0 },
            read(0x1000, Width::One),
            Op::Vector {
                entry: 1,
                data: 0x41,
                masked: true,
            },
            chain(0, &[(64, 16, true), (128, 200, true)]),
            Op::Notify { queue: 0 },
            read(0xd000, Width::Eight),
            Op::Vector {
                entry: 1,
                data: 0x41,
                masked: false,
            },
            Op::MsixControl {
                enable: true,
                mask: true,
            },
            chain(0, &[(256, 8, true)]),
            Op::Notify { queue: 0 },
            Op::MsixControl {
                enable: true,
                mask: false,
            },
            status(0),
            init(false, false),
            chain(0, &[(0, 32, true)]),
            Op::Notify { queue: 0 },
            Op::ConfigRead { reg: 1 },
            read(0x1000, Width::One),
        ],
    }
}

/// virtio-blk with two queues on INTx, then INTx disabled.
fn blk_intx() -> Input {
    Input {
        device: DeviceKind::Blk { queues: 1 },
        ops: vec![
            init(false, false),
            Op::Poke {
                addr: 0x1_8000,
                data: vec![8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            },
            chain(1, &[(0, 16, false), (8, 20, true), (12, 1, true)]),
            Op::Notify { queue: 1 },
            Op::Command(0x0406),
            Op::ConfigRead { reg: 1 },
            read(0x1000, Width::Four),
            Op::Command(0x0006),
            Op::Notify { queue: 7 },
            Op::Common {
                field: 10,
                value: 3,
            },
            read(0x2000, Width::Eight),
            Op::Write {
                offset: 0x2000,
                width: Width::Four,
                value: 0,
            },
            Op::VmmReset,
        ],
    }
}

/// BAR moves: offline, refused (below 4 GiB), live one dword at a time,
/// and writes that cross a dword.
fn bar_moves() -> Input {
    Input {
        device: DeviceKind::Console,
        ops: vec![
            Op::Command(0x0006),
            Op::MoveBar {
                page: 0x2_0000,
                live: false,
            },
            Op::MoveBar {
                page: 0x10,
                live: false,
            },
            Op::MoveBar {
                page: 0x3_0001,
                live: true,
            },
            Op::ConfigWrite {
                offset: 0x12,
                width: CfgWidth::Four,
                value: 0xffff_ffff,
            },
            Op::ConfigWrite {
                offset: 0x14,
                width: CfgWidth::Two,
                value: 0x0001,
            },
            Op::ConfigRead { reg: 4 },
            Op::ConfigRead { reg: 5 },
            Op::CfgWindow {
                offset: 0x14,
                len: 1,
                write: Some(1),
            },
            Op::CfgWindow {
                offset: 0x12,
                len: 2,
                write: None,
            },
            Op::CfgWindow {
                offset: 0xfffe,
                len: 4,
                write: Some(0),
            },
            Op::CfgWindow {
                offset: 0x10,
                len: 3,
                write: None,
            },
        ],
    }
}

/// virtio-net: odd widths and offsets, regions straddled, read-only
/// fields written, queue setup against the rules.
fn net_odd() -> Input {
    let w = |offset: u16, width: Width, value: u64| Op::Write {
        offset,
        width,
        value,
    };
    Input {
        device: DeviceKind::Net,
        ops: vec![
            read(0x0ffc, Width::Eight),
            read(0x2ffd, Width::Eight),
            read(0x2005, Width::Two),
            w(0x0012, Width::Two, 9),
            w(0x0014, Width::Eight, 0x0101_0101_0101_0101),
            status(1),
            status(3),
            w(0x000c, Width::Four, 0xffff_ffff),
            status(0x0b),
            w(0x0008, Width::Four, 1),
            w(0x000c, Width::Four, 1),
            status(0x0b),
            Op::Common { field: 9, value: 3 },
            Op::Common {
                field: 13,
                value: 0x1001,
            },
            Op::Common {
                field: 11,
                value: 1,
            },
            Op::Common {
                field: 4,
                value: 77,
            },
            Op::Common {
                field: 17,
                value: 1,
            },
            w(0x1000, Width::Four, 0xff),
            w(0xd000, Width::Eight, u64::MAX),
            w(0x4ffe, Width::Four, u64::MAX),
            read(0xfff8, Width::Eight),
            Op::VmmReset,
            read(0x0014, Width::One),
        ],
    }
}

/// Garbage in the rings: an available index far ahead (NEEDS_RESET), a
/// loop, then a reset and a clean start.
fn garbage_rings() -> Input {
    Input {
        device: DeviceKind::Rng,
        ops: vec![
            init(true, true),
            Op::Poke {
                addr: 0x1002,
                data: vec![0x00, 0x80],
            },
            Op::Notify { queue: 0 },
            read(0x0014, Width::One),
            status(0),
            init(true, true),
            Op::Poke {
                addr: 0x0,
                data: vec![0, 0, 2, 0, 0, 0, 0, 0, 64, 0, 0, 0, 3, 0, 0, 0],
            },
            Op::Poke {
                addr: 0x1002,
                data: vec![1, 0],
            },
            Op::Notify { queue: 0 },
            Op::Common {
                field: 17,
                value: 1,
            },
        ],
    }
}

#[test]
fn seeds() {
    let seeds = [
        ("rng_msix", rng_msix()),
        ("blk_intx", blk_intx()),
        ("bar_moves", bar_moves()),
        ("net_odd", net_odd()),
        ("garbage_rings", garbage_rings()),
    ];
    super::check_seeds("virtio_pci_bar", &seeds, |i| {
        run(i);
    });
}

/// The seeds reach the device: interrupts both ways, BAR moves, a worker.
#[test]
fn seeds_exercise_the_transport() {
    let rng = run(&rng_msix());
    assert!(
        rng.msix > 0 && rng.intx > 0 && rng.worker_steps > 0,
        "{rng:?}"
    );
    let blk = run(&blk_intx());
    assert!(blk.intx > 0 && blk.worker_steps > 0, "{blk:?}");
    let moves = run(&bar_moves());
    assert!(moves.moves >= 2, "{moves:?}");
}
