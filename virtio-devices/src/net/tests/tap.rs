//! virtio-net over a real tap device (skipped without /dev/net/tun).

use super::*;

/// Runs `ip` with `args`; false if it is missing or fails.
fn ip(args: &[&str]) -> bool {
    std::process::Command::new("ip")
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn real_tap_carries_frames_both_ways() {
    if !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("skipping real_tap_carries_frames_both_ways: no /dev/net/tun");
        return;
    }
    let name = format!("trlnet{}", std::process::id() % 100_000);
    let config = NetConfig {
        tap_name: name.clone(),
        queue_pairs: 2,
        ..NetConfig::default()
    };
    let mut net = Net::new(config).expect("/dev/net/tun exists but the tap cannot be opened");
    assert!(std::path::Path::new("/sys/class/net").join(&name).exists());
    assert_eq!(net.queue_pairs(), 2);

    let mem = guest_memory();
    let irq = Arc::new(RecordingInterrupt::default());
    let mut rings: Vec<TestRing> = (0..5)
        .map(|q| TestRing::new(&mem, 0x1000 * (q + 1), RING_SIZE))
        .collect();
    let (activations, kicks): (Vec<_>, Vec<_>) = rings
        .iter()
        .enumerate()
        .map(|(q, r)| r.activation(q as u16))
        .unzip();
    net.ack_features(
        bit(VIRTIO_NET_F_GUEST_CSUM)
            | bit(VIRTIO_NET_F_GUEST_TSO4)
            | bit(VIRTIO_NET_F_MQ)
            | bit(VIRTIO_NET_F_CTRL_VQ),
    );
    net.activate(atomic(&mem), irq, activations).unwrap();

    // Bring the link up and give the host a link-local address (the only
    // kind this test may use), so that sending to a neighbour makes the
    // kernel ARP for it out of the tap.
    let subnet = 100 + std::process::id() % 100;
    let host_ip = format!("169.254.{subnet}.1/24");
    if !(ip(&["link", "set", "dev", &name, "up"]) && ip(&["addr", "add", &host_ip, "dev", &name])) {
        eprintln!("`ip` unavailable: checked the tap opens, not its traffic");
        return;
    }

    // Guest to host: a broadcast frame counts as received by the host.
    let stats = format!("/sys/class/net/{name}/statistics/rx_packets");
    let count = || -> u64 {
        std::fs::read_to_string(&stats)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = count();
    let mut eth = vec![0u8; VNET_HDR_LEN];
    eth.extend([0xff; 6]);
    eth.extend([0x02, 0, 0, 0, 0, 0x99]);
    eth.extend([0x88, 0xb5]); // local experimental ethertype
    eth.extend([0u8; 46]);
    mem.write_slice(&eth, GuestAddress(BUFS)).unwrap();
    rings[1].add_chain(&[Desc::r(BUFS, eth.len() as u32)]);
    kicks[1].write(1).unwrap();
    assert!(rings[1].wait_used(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while count() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(count() > before, "the host never saw the guest's frame");

    // Host to guest: any frame (ARP, IPv6 neighbour discovery) will do.
    for (rx, ring) in [(0usize, 0u64), (2, 1)] {
        for i in 0..4 {
            let at = BUFS + 0x10000 * (ring + 1) + 0x1000 * i;
            rings[rx].add_chain(&[Desc::w(at, 2048)]);
        }
        kicks[rx].write(1).unwrap();
    }
    let sock = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
    let target = format!("169.254.{subnet}.2:9");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rings[0].used_idx() == 0 && rings[2].used_idx() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "no frame reached the guest"
        );
        let _ = sock.send_to(b"ping", &target);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (rx, base) = if rings[0].used_idx() > 0 {
        (0, 0x10000)
    } else {
        (2, 0x20000)
    };
    let (_, len) = rings[rx].used_elem(0);
    assert!(len as usize >= VNET_HDR_LEN + 14, "used len {len}");
    let mut hdr = [0u8; VNET_HDR_LEN];
    mem.read_slice(&mut hdr, GuestAddress(BUFS + base)).unwrap();
    assert_eq!(&hdr[10..12], &[1, 0], "num_buffers");
    net.reset();
}
