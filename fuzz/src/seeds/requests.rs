//! Seeds of the request-path targets.

use crate::requests::blk::{self, BlkOp, Extent, Kind, Request};
use crate::requests::console::{self, ConsoleOp};
use crate::requests::net::{self, FrameLen, NetOp};
use crate::requests::rng::{self, RngOp};
use crate::requests::Step;
use crate::virtq::{Addr, Len, Link, RingOp, Seg};

fn seg(at: u16, len: Len, write: bool) -> Seg {
    Seg {
        addr: Addr::Data(at),
        len,
        write,
    }
}

fn chain<D>(queue: u8, segs: Vec<Seg>, link: Link) -> Step<D> {
    Step::Ring(RingOp::Chain { queue, segs, link })
}

fn kick<D>(queue: u8) -> Step<D> {
    Step::Ring(RingOp::Kick { queue })
}

/// Chains of every shape, a queue reset and a device reset.
fn rng_shapes() -> rng::Input {
    let w = |at, n| seg(at, Len::Bytes(n), true);
    rng::Input {
        config: rng::Config {
            ring: 3,
            event_idx: false,
        },
        steps: vec![
            chain(0, vec![w(0, 64)], Link::Direct),
            chain(
                0,
                vec![w(16, 100), seg(64, Len::Sectors(8), true)],
                Link::Direct,
            ),
            kick(0),
            chain(0, vec![w(0, 32), w(8, 32)], Link::Loop { to: 0 }),
            chain(0, vec![w(0, 32)], Link::BadNext { next: 300 }),
            chain(
                0,
                vec![w(0, 16), w(100, 16)],
                Link::Indirect { table_len: None },
            ),
            chain(
                0,
                vec![w(0, 16)],
                Link::Indirect {
                    table_len: Some(17),
                },
            ),
            chain(0, vec![seg(0, Len::Bytes(8), false), w(4, 8)], Link::Direct),
            kick(0),
            Step::Dev(RngOp::ResetQueue),
            chain(
                0,
                vec![seg(0, Len::Raw(0x1_0000), true), w(0, 8)],
                Link::Direct,
            ),
            kick(0),
            Step::Dev(RngOp::Reset),
            chain(0, vec![w(0, 1)], Link::Direct),
            kick(0),
        ],
    }
}

/// EVENT_IDX suppression, then a driver that breaks the ring.
fn rng_event_idx() -> rng::Input {
    let w = |at, n| seg(at, Len::Bytes(n), true);
    rng::Input {
        config: rng::Config {
            ring: 2,
            event_idx: true,
        },
        steps: vec![
            chain(0, vec![w(0, 8)], Link::Direct),
            kick(0),
            Step::Ring(RingOp::UsedEvent { queue: 0, value: 5 }),
            chain(0, vec![w(0, 8)], Link::Direct),
            kick(0),
            Step::Ring(RingOp::Publish { queue: 0, head: 9 }),
            kick(0),
            Step::Ring(RingOp::BumpAvail {
                queue: 0,
                delta: 100,
            }),
            kick(0),
            kick(0),
            Step::Dev(RngOp::Reset),
            chain(0, vec![w(0, 8)], Link::Direct),
            kick(0),
        ],
    }
}

fn request(kind: Kind, sector: u16, data: Vec<u16>) -> Step<BlkOp> {
    Step::Dev(BlkOp::Request(Request {
        kind,
        sector,
        far: false,
        data,
        status: 1,
        split_header: false,
        indirect: false,
        kick: true,
        fill: 0x5a,
    }))
}

/// Every request type on a writable image with a partial last sector.
fn blk_rw() -> blk::Input {
    let extent = |sector, sectors, flags| Extent {
        sector,
        sectors,
        flags,
    };
    blk::Input {
        config: blk::Config {
            image: 3,
            read_only: false,
            ring: 4,
            event_idx: false,
        },
        steps: vec![
            request(Kind::Out, 2, vec![2, 1]),
            request(Kind::In, 1, vec![4]),
            request(Kind::GetId, 0, vec![0x8000 | 8]),
            request(Kind::Flush, 0, vec![]),
            request(
                Kind::WriteZeroes(vec![extent(3, 2, 0), extent(0, 1, 1)]),
                0,
                vec![],
            ),
            request(Kind::Discard(vec![extent(5, 1, 0)]), 0, vec![]),
            request(Kind::Discard(vec![extent(5, 1, 1)]), 0, vec![]),
            request(Kind::In, 0, vec![8, 8]),
            request(Kind::In, 15, vec![2]),
            request(Kind::Out, 16, vec![1]),
            request(Kind::Other(99), 0, vec![]),
            Step::Dev(BlkOp::Request(Request {
                kind: Kind::In,
                sector: 1,
                far: true,
                data: vec![1],
                status: 1,
                split_header: true,
                indirect: true,
                kick: true,
                fill: 0,
            })),
            Step::Dev(BlkOp::ResetQueue),
            request(Kind::In, 0, vec![1]),
        ],
    }
}

/// A read-only image, and malformed requests: no status, a long status,
/// odd data lengths, misordered buffers.
fn blk_malformed() -> blk::Input {
    let bad = |status, data: Vec<u16>| {
        Step::Dev(BlkOp::Request(Request {
            kind: Kind::Out,
            sector: 0,
            far: false,
            data,
            status,
            split_header: true,
            indirect: false,
            kick: false,
            fill: 1,
        }))
    };
    blk::Input {
        config: blk::Config {
            image: 4,
            read_only: true,
            ring: 3,
            event_idx: true,
        },
        steps: vec![
            request(Kind::Out, 0, vec![1]),
            request(Kind::Discard(vec![]), 0, vec![]),
            bad(0, vec![1]),
            bad(3, vec![1]),
            bad(1, vec![0x8000 | 511]),
            chain(
                0,
                vec![
                    seg(0, Len::Bytes(16), true),
                    seg(8, Len::Bytes(16), false),
                    seg(16, Len::Bytes(1), true),
                ],
                Link::Direct,
            ),
            kick(0),
            request(Kind::In, 0, vec![1]),
        ],
    }
}

fn net_config(two_pairs: bool, features: u16, queues: u8) -> net::Config {
    net::Config {
        two_pairs,
        ring: 3,
        features,
        queues,
    }
}

/// One pair: transmit, receive with MRG_RXBUF, a backend that pushes back.
fn net_tx_rx() -> net::Input {
    let r = |at, n| seg(at, Len::Raw(n), false);
    let w = |at, n| seg(at, Len::Raw(n), true);
    net::Input {
        // GUEST_CSUM, MRG_RXBUF.
        config: net_config(false, 0b10_0001, 0b11),
        steps: vec![
            chain(1, vec![r(0, 12), r(4, 60)], Link::Direct),
            chain(1, vec![r(0, 8)], Link::Direct),
            kick(1),
            chain(0, vec![w(1000, 1526)], Link::Direct),
            chain(0, vec![w(2000, 1526)], Link::Direct),
            kick(0),
            Step::Dev(NetOp::Frame {
                backend: 0,
                len: FrameLen::Mtu(1514),
                flags: 1,
                fill: 7,
            }),
            Step::Dev(NetOp::Frame {
                backend: 0,
                len: FrameLen::Mtu(3000),
                flags: 0,
                fill: 9,
            }),
            Step::Dev(NetOp::Frame {
                backend: 0,
                len: FrameLen::Small(4),
                flags: 0,
                fill: 0,
            }),
            Step::Dev(NetOp::Block(true)),
            chain(1, vec![r(0, 40)], Link::Direct),
            kick(1),
            Step::Dev(NetOp::Block(false)),
            chain(0, vec![w(3000, 8)], Link::Direct),
            kick(0),
            Step::Dev(NetOp::Reset),
        ],
    }
}

/// Two pairs with the control queue: VQ_PAIRS_SET, frames on both
/// backends, big frames.
fn net_mq() -> net::Input {
    let w = |at, n| seg(at, Len::Raw(n), true);
    net::Input {
        config: net_config(true, 0x3ff, 0x1f),
        steps: vec![
            Step::Dev(NetOp::Ctrl {
                class: 4,
                command: 0,
                pairs: 2,
                ack: 1,
            }),
            chain(2, vec![w(100, 70000)], Link::Direct),
            Step::Dev(NetOp::Frame {
                backend: 1,
                len: FrameLen::Max,
                flags: 3,
                fill: 1,
            }),
            Step::Dev(NetOp::Frame {
                backend: 1,
                len: FrameLen::Huge,
                flags: 3,
                fill: 2,
            }),
            kick(2),
            Step::Dev(NetOp::Ctrl {
                class: 4,
                command: 0,
                pairs: 9,
                ack: 2,
            }),
            Step::Dev(NetOp::Ctrl {
                class: 1,
                command: 1,
                pairs: 0,
                ack: 0,
            }),
        ],
    }
}

/// Output, input before and after receive buffers, end of input, reset.
fn console_io() -> console::Input {
    let r = |at, n| seg(at, Len::Bytes(n), false);
    let w = |at, n| seg(at, Len::Bytes(n), true);
    console::Input {
        config: console::Config {
            rx_ring: 3,
            tx_ring: 3,
            queues: 3,
            size: Some((80, 25)),
            event_idx: false,
        },
        steps: vec![
            Step::Ring(RingOp::Poke {
                addr: 0x1_8000,
                data: b"hello, console\n".to_vec(),
            }),
            chain(1, vec![r(0, 7), r(1, 8)], Link::Direct),
            chain(1, vec![r(0, 4), w(8, 4)], Link::Direct),
            kick(1),
            Step::Dev(ConsoleOp::Input(b"typed ahead".to_vec())),
            chain(0, vec![w(100, 4), w(110, 4)], Link::Direct),
            kick(0),
            chain(0, vec![w(200, 64)], Link::Direct),
            kick(0),
            Step::Dev(ConsoleOp::Input(b"more".to_vec())),
            Step::Dev(ConsoleOp::Reset),
            Step::Dev(ConsoleOp::Input(b"after".to_vec())),
            chain(0, vec![w(300, 64)], Link::Direct),
            kick(0),
            Step::Dev(ConsoleOp::CloseInput),
            chain(1, vec![r(0, 15)], Link::Indirect { table_len: None }),
            kick(1),
        ],
    }
}

#[test]
fn rng_seeds() {
    let seeds = [("shapes", rng_shapes()), ("event_idx", rng_event_idx())];
    super::check_seeds("rng_request", &seeds, |i| {
        rng::run(i);
    });
}

#[test]
fn blk_seeds() {
    let seeds = [("rw", blk_rw()), ("malformed", blk_malformed())];
    super::check_seeds("blk_request", &seeds, |i| {
        blk::run(i);
    });
}

#[test]
fn net_seeds() {
    let seeds = [("tx_rx", net_tx_rx()), ("mq", net_mq())];
    super::check_seeds("net_request", &seeds, |i| {
        net::run(i);
    });
}

#[test]
fn console_seeds() {
    let seeds = [("io", console_io())];
    super::check_seeds("console_request", &seeds, |i| {
        console::run(i);
    });
}

/// The seeds reach the devices: chains complete with data, in clean
/// batches, with interrupts (a harness that checked nothing would pass
/// every other test).
#[test]
fn seeds_exercise_the_devices() {
    let all = [
        ("rng shapes", rng::run(&rng_shapes())),
        ("rng event_idx", rng::run(&rng_event_idx())),
        ("blk rw", blk::run(&blk_rw())),
        ("blk malformed", blk::run(&blk_malformed())),
        ("net tx_rx", net::run(&net_tx_rx())),
        ("net mq", net::run(&net_mq())),
        ("console io", console::run(&console_io())),
    ];
    for (name, stats) in all {
        assert!(
            stats.with_data > 0 && stats.clean > 0 && stats.interrupts > 0,
            "{name}: {stats:?}"
        );
    }
}
