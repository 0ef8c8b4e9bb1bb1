//! Receive through the worker thread: single and mergeable buffers,
//! frames waiting for buffers, and hostile receive chains.

use super::*;

#[test]
fn received_frame_fills_one_buffer_with_num_buffers_one() {
    let mut h = Harness::new(1, 0);
    h.rings[0].add_chain(&[Desc::w(BUFS, 8), Desc::w(BUFS + 8, 2040)]);
    h.kick(0);
    let mut data = frame(300, 5);
    data[0] = 2; // DATA_VALID, which the driver did not negotiate.
    h.peers[0].send(&data).unwrap();
    assert!(h.rings[0].wait_used(1));
    assert_eq!(h.rings[0].used_elem(0), (0, data.len() as u32));
    let got = h.read(BUFS, data.len());
    assert_eq!(got[0], 0, "flags cleared without GUEST_CSUM");
    assert_eq!(&got[10..12], &[1, 0], "num_buffers");
    assert_eq!(&got[12..], &data[12..]);
    assert!(h.irq.count(0) >= 1);
}

#[test]
fn mergeable_buffers_span_a_large_frame() {
    let mut h = Harness::new(
        1,
        bit(VIRTIO_NET_F_MRG_RXBUF) | bit(VIRTIO_NET_F_GUEST_CSUM),
    );
    for i in 0..4u64 {
        h.rings[0].add_chain(&[Desc::w(BUFS + i * 0x1000, 1000)]);
    }
    h.kick(0);
    let mut data = frame(2488, 7); // 2500 bytes with the header.
    data[0] = 1; // NEEDS_CSUM
    h.peers[0].send(&data).unwrap();
    assert!(h.rings[0].wait_used(3));
    let lens: Vec<u32> = (0..3).map(|n| h.rings[0].used_elem(n).1).collect();
    assert_eq!(lens, vec![1000, 1000, 500]);
    let mut got = Vec::new();
    for (i, len) in lens.iter().enumerate() {
        got.extend(h.read(BUFS + i as u64 * 0x1000, *len as usize));
    }
    assert_eq!(&got[10..12], &[3, 0], "num_buffers");
    assert_eq!(got[0], 1, "flags kept with GUEST_CSUM");
    assert_eq!(&got[12..], &data[12..]);

    // The fourth buffer takes the next small frame alone.
    let small = frame(20, 1);
    h.peers[0].send(&small).unwrap();
    assert!(h.rings[0].wait_used(4));
    assert_eq!(h.rings[0].used_elem(3), (3, 32));
    assert_eq!(&h.read(BUFS + 0x3000, 12)[10..12], &[1, 0]);
}

#[test]
fn frame_waits_for_buffers_until_the_driver_notifies() {
    let mut h = Harness::new(1, bit(VIRTIO_NET_F_MRG_RXBUF));
    let first = frame(1500, 1);
    let second = frame(60, 2);
    h.peers[0].send(&first).unwrap();
    h.peers[0].send(&second).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.rings[0].used_idx(), 0);

    // One buffer is not enough for the first frame under MRG_RXBUF.
    h.rings[0].add_chain(&[Desc::w(BUFS, 1024)]);
    h.kick(0);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(h.rings[0].used_idx(), 0, "partial delivery");

    h.rings[0].add_chain(&[Desc::w(BUFS + 0x1000, 1024)]);
    h.rings[0].add_chain(&[Desc::w(BUFS + 0x2000, 1024)]);
    h.kick(0);
    assert!(h.rings[0].wait_used(3));
    assert_eq!(h.rings[0].used_elem(0).1, 1024);
    assert_eq!(h.rings[0].used_elem(1).1, first.len() as u32 - 1024);
    assert_eq!(h.rings[0].used_elem(2).1, second.len() as u32);
    assert_eq!(&h.read(BUFS + 0x2000 + 12, 60), &second[12..]);
}

#[test]
fn hostile_receive_chains_cost_only_their_frame() {
    let mut h = Harness::new(1, 0);
    // Readable buffer in a receive chain, then one outside RAM, then one
    // too small for the frame (kept), then a good one.
    h.rings[0].add_chain(&[Desc::r(BUFS, 2048)]);
    h.rings[0].add_chain(&[Desc::w(1 << 40, 2048)]);
    h.kick(0);
    h.peers[0].send(&frame(100, 1)).unwrap();
    h.peers[0].send(&frame(100, 2)).unwrap();
    assert!(h.rings[0].wait_used(2));
    assert_eq!(h.rings[0].used_elem(0), (0, 0));
    assert_eq!(h.rings[0].used_elem(1), (1, 0));

    h.rings[0].add_chain(&[Desc::w(BUFS, 64)]);
    h.kick(0);
    h.peers[0].send(&frame(100, 3)).unwrap(); // too big: dropped
    let small = frame(40, 4);
    h.peers[0].send(&small).unwrap(); // fits the kept chain
    assert!(h.rings[0].wait_used(3));
    assert_eq!(h.rings[0].used_elem(2), (2, small.len() as u32));
    assert_eq!(&h.read(BUFS + 12, 40), &small[12..]);

    // A head past the table yields an empty chain: returned, frame lost.
    h.rings[0].publish(RING_SIZE + 1);
    h.kick(0);
    h.peers[0].send(&frame(10, 5)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    // A frame shorter than a vnet header never reaches the guest.
    h.peers[0].send(&[0u8; 5]).unwrap();
    h.rings[0].add_chain(&[Desc::w(BUFS + 0x1000, 2048)]);
    h.kick(0);
    let last = frame(30, 6);
    h.peers[0].send(&last).unwrap();
    assert!(h.rings[0].wait_used(4));
    assert_eq!(&h.read(BUFS + 0x1000 + 12, 30), &last[12..]);
}
