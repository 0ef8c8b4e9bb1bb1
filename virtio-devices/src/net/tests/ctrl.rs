//! The control queue: setting the number of queue pairs, with and
//! without MQ.

use super::*;

/// Sends a control command; returns the ack byte and used length.
fn control(h: &mut Harness, ctrl: usize, command: &[u8], at: u64) -> (u8, u32) {
    h.mem.write_slice(command, GuestAddress(at)).unwrap();
    h.mem.write_obj(0xeeu8, GuestAddress(at + 0x100)).unwrap();
    let before = h.rings[ctrl].used_idx();
    h.rings[ctrl].add_chain(&[
        Desc::r(at, 2),
        Desc::r(at + 2, command.len() as u32 - 2),
        Desc::w(at + 0x100, 1),
    ]);
    h.kick(ctrl);
    assert!(h.rings[ctrl].wait_used(before.wrapping_add(1)));
    let ack: u8 = h.mem.read_obj(GuestAddress(at + 0x100)).unwrap();
    (ack, h.rings[ctrl].used_elem(before).1)
}

#[test]
fn control_queue_sets_queue_pairs_and_routes_frames() {
    let acked = bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
    let mut h = Harness::new(2, acked);
    let ctrl = 4;
    for rx in [0, 2] {
        h.rings[rx].add_chain(&[Desc::w(BUFS + rx as u64 * 0x1000, 2048)]);
        h.kick(rx);
    }
    // One pair active after reset: backend 1's frames go to receiveq 0.
    let early = frame(20, 1);
    h.peers[1].send(&early).unwrap();
    assert!(h.rings[0].wait_used(1));
    assert_eq!(&h.read(BUFS + 12, 20), &early[12..]);

    let ok = VIRTIO_NET_OK as u8;
    let err = VIRTIO_NET_ERR as u8;
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    assert_eq!(
        control(&mut h, ctrl, &[mq, 0, 2, 0], BUFS + 0x8000),
        (ok, 1)
    );
    assert_eq!(
        control(&mut h, ctrl, &[mq, 0, 3, 0], BUFS + 0x8000),
        (err, 1)
    );
    assert_eq!(
        control(&mut h, ctrl, &[mq, 0, 0, 0], BUFS + 0x8000),
        (err, 1)
    );
    assert_eq!(control(&mut h, ctrl, &[mq, 0, 2], BUFS + 0x8000), (err, 1));
    assert_eq!(
        control(&mut h, ctrl, &[0, 0, 1, 0], BUFS + 0x8000),
        (err, 1)
    );
    assert_eq!(
        control(&mut h, ctrl, &[99, 7, 0, 0], BUFS + 0x8000),
        (err, 1)
    );

    let late = frame(20, 2);
    h.peers[1].send(&late).unwrap();
    assert!(h.rings[2].wait_used(1));
    assert_eq!(&h.read(BUFS + 0x2000 + 12, 20), &late[12..]);

    // A command with no room for the ack is returned with nothing written.
    h.rings[ctrl].add_chain(&[Desc::r(BUFS, 4)]);
    // And one whose ack buffer comes before the command.
    h.rings[ctrl].add_chain(&[Desc::w(BUFS + 4, 1), Desc::r(BUFS, 4)]);
    h.kick(ctrl);
    assert!(h.rings[ctrl].wait_used(8));
    assert_eq!(h.rings[ctrl].used_elem(6).1, 0);
    assert_eq!(h.rings[ctrl].used_elem(7).1, 0);
}

#[test]
fn without_mq_the_control_queue_is_queue_two() {
    // Two pairs offered, but the driver only took CTRL_VQ: it sets up
    // receiveq 0, transmitq 1 and the control queue at index 2.
    let mut h = Harness::with_queues(2, bit(VIRTIO_NET_F_CTRL_VQ), Some(3));
    let mq = VIRTIO_NET_CTRL_MQ as u8;
    // MQ not negotiated: even a valid pair count is refused.
    let err = VIRTIO_NET_ERR as u8;
    assert_eq!(control(&mut h, 2, &[mq, 0, 1, 0], BUFS), (err, 1));
    // Frames from the second tap queue still reach receiveq 0.
    h.rings[0].add_chain(&[Desc::w(BUFS + 0x1000, 2048)]);
    h.kick(0);
    h.peers[1].send(&frame(20, 1)).unwrap();
    assert!(h.rings[0].wait_used(1));
    // A queue past the control queue is refused at activation.
    h.net.reset();
    h.net.ack_features(bit(VIRTIO_NET_F_CTRL_VQ));
    let (q3, _) = h.rings[0].activation(3);
    assert!(h
        .net
        .activate(atomic(&h.mem), h.irq.clone(), vec![q3])
        .is_err());
}
