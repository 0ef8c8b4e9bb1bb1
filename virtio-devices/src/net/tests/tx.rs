//! Transmit: frames from the guest reach the backend whole, hostile
//! chains are dropped, and EVENT_IDX suppresses interrupts.

use super::*;
use crate::test_ring::{wait_until, F_INDIRECT, F_NEXT, MEM_SIZE};

#[test]
fn transmitted_frame_reaches_the_backend_with_its_header() {
    let mut h = Harness::new(1, 0);
    let mut data = frame(100, 1);
    data[0] = 1; // NEEDS_CSUM: passed through untouched.
    h.transmit(0, &data, BUFS);
    let mut buf = vec![0u8; 4096];
    let n = h.peers[0].recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &data[..]);
    assert!(h.rings[1].wait_used(1));
    assert_eq!(h.rings[1].used_elem(0), (0, 0));
    assert!(h.irq.count(1) >= 1);
}

#[test]
fn transmit_through_an_indirect_table() {
    let h = Harness::new(1, bit(VIRTIO_RING_F_INDIRECT_DESC));
    let data = frame(64, 9);
    h.mem.write_slice(&data, GuestAddress(BUFS)).unwrap();
    // Two-entry indirect table at BUFS + 0x1000.
    let table = BUFS + 0x1000;
    h.rings[1].write_indirect_table(
        table,
        &[
            Desc {
                flags: F_NEXT,
                next: 1,
                ..Desc::r(BUFS, 12)
            },
            Desc::r(BUFS + 12, data.len() as u32 - 12),
        ],
    );
    h.rings[1].set_desc(
        0,
        Desc {
            flags: F_INDIRECT,
            ..Desc::r(table, 32)
        },
    );
    h.rings[1].publish(0);
    h.kick(1);
    let mut buf = vec![0u8; 4096];
    let n = h.peers[0].recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &data[..]);
}

#[test]
fn hostile_transmit_chains_are_dropped() {
    let mut h = Harness::new(1, 0);
    let ring = &mut h.rings[1];
    // A device-writable buffer in a transmit chain.
    ring.add_chain(&[Desc::r(BUFS, 12), Desc::w(BUFS + 12, 60)]);
    // Outside guest RAM, and straddling its end.
    ring.add_chain(&[Desc::r(1 << 40, 100)]);
    ring.add_chain(&[Desc::r(MEM_SIZE as u64 - 10, 100)]);
    // Larger than any frame.
    ring.add_chain(&[Desc::r(BUFS, MAX_FRAME_LEN as u32 + 1)]);
    // Shorter than the header.
    ring.add_chain(&[Desc::r(BUFS, 11)]);
    // A head past the end of the descriptor table: consumed, but it cannot
    // be put in the used ring.
    ring.publish(RING_SIZE + 3);
    h.kick(1);
    assert!(h.rings[1].wait_used(5));
    for n in 0..5 {
        assert_eq!(h.rings[1].used_elem(n).1, 0);
    }
    assert_no_datagram(&h.peers[0]);

    // The queue still works.
    let data = frame(40, 3);
    h.transmit(0, &data, BUFS + 0x2000);
    let mut buf = vec![0u8; 4096];
    let n = h.peers[0].recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], &data[..]);
}

#[test]
fn event_idx_suppresses_interrupts_and_publishes_avail_event() {
    let mut h = Harness::new(1, bit(VIRTIO_RING_F_EVENT_IDX));
    // Interrupt only once the second used entry is written.
    h.rings[1].set_used_event(1);
    h.transmit(0, &frame(10, 1), BUFS);
    assert!(h.rings[1].wait_used(1));
    // avail_event is published after the used entry: wait for it.
    assert!(wait_until(|| h.rings[1].avail_event() == 1));
    h.transmit(0, &frame(10, 2), BUFS);
    assert!(h.rings[1].wait_used(2));
    assert!(wait_until(|| h.rings[1].avail_event() == 2));
    // Both chains were handled by now, and only the second interrupted.
    assert!(wait_until(|| h.irq.count(1) == 1));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(h.irq.count(1), 1);
}
