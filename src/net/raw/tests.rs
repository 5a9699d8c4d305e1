use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

fn v4(a: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), port)
}

fn v6(s: &str, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(s.parse::<Ipv6Addr>().unwrap()), port)
}

/// A correct one's-complement checksum sums (with itself) to zero.
fn verifies(sum_start: u32, bytes: &[u8]) -> bool {
    fold(reference_sum(sum_start, bytes)) == 0
}

#[test]
fn udp_checksum_verifies_v4_and_v6() {
    for (src, dst) in [
        (v4([203, 0, 113, 53], 53), v4([192, 0, 2, 10], 40000)),
        (v6("2001:db8::53", 53), v6("2001:db8:1::10", 40000)),
    ] {
        for payload in [&b""[..], b"x", b"hello world", &[0xffu8; 1001][..]] {
            let d = udp_datagram(src, dst, payload).unwrap();
            assert_eq!(d.len(), 8 + payload.len());
            assert_eq!(&d[8..], payload);
            let pseudo = pseudo_header_sum(src.ip(), dst.ip(), d.len() as u32);
            assert!(verifies(pseudo, &d), "{src} -> {dst} len {}", payload.len());
        }
    }
}

/// The one's-complement sum as RFC 1071 spells it: 16-bit words, end-around
/// carry at each step.
fn reference_sum(mut sum: u32, bytes: &[u8]) -> u32 {
    let mut words = bytes.chunks(2);
    for w in &mut words {
        let word = u32::from(w[0]) << 8 | u32::from(w.get(1).copied().unwrap_or(0));
        sum += word;
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
    }
    sum
}

/// The sum four bytes at a time, and the pseudo-header summed without
/// laying it out, agree with the word-by-word sum for every length up to
/// a few words past a multiple of four, odd ones included, for bytes that
/// carry (all ones) and that do not, and from any starting sum.
#[test]
fn the_fast_sums_agree_with_the_word_by_word_sum() {
    let mut bytes = vec![0u8; 1500];
    let mut x = 0x9e37_79b9u32;
    for b in &mut bytes {
        x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        *b = (x >> 24) as u8;
    }
    let ones = vec![0xffu8; 1500];
    for data in [&bytes, &ones] {
        for len in (0..40).chain([1471, 1472, 1473, 1499, 1500]) {
            for start in [0, 1, 0xfffe, 0xffff, 0x1_2345] {
                let fast = add_bytes(start, &data[..len]);
                assert_eq!(
                    fold(fast),
                    fold(reference_sum(start, &data[..len])),
                    "len {len} start {start}"
                );
                assert!(fast <= 0xffff);
            }
        }
    }
    for (src, dst) in [
        (v4([203, 0, 113, 53], 53), v4([192, 0, 2, 10], 40000)),
        (v4([255, 255, 255, 255], 53), v4([255, 255, 255, 254], 40000)),
        (v6("2001:db8::53", 53), v6("2001:db8:1::10", 40000)),
        (
            v6("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 53),
            v6("2001:db8:ffff::ffff", 1),
        ),
        (v6("::ffff:203.0.113.9", 53), v4([192, 0, 2, 10], 40000)),
    ] {
        for len in [8u32, 9, 1480, 65_535] {
            let mut laid = Vec::new();
            for ip in [src.ip(), dst.ip()] {
                match (src.ip(), dst.ip()) {
                    (IpAddr::V4(_), IpAddr::V4(_)) => laid.extend_from_slice(&match ip {
                        IpAddr::V4(a) => a.octets(),
                        IpAddr::V6(_) => unreachable!(),
                    }),
                    _ => laid.extend_from_slice(&to_v6(ip).octets()),
                }
            }
            laid.extend_from_slice(&len.to_be_bytes());
            laid.extend_from_slice(&[0, 0, 0, PROTO_UDP]);
            assert_eq!(
                fold(pseudo_header_sum(src.ip(), dst.ip(), len)),
                fold(reference_sum(0, &laid)),
                "{src} -> {dst} len {len}"
            );
        }
    }
}

#[test]
fn known_ipv4_header_checksum() {
    // Classic example header: 4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7
    let mut out = Vec::new();
    let frag = Fragment {
        id: 0,
        offset: 0,
        more: false,
    };
    ip_header(
        &mut out,
        IpAddr::V4(Ipv4Addr::new(192, 168, 0, 1)),
        IpAddr::V4(Ipv4Addr::new(192, 168, 0, 199)),
        0,
        0x73 - 20,
        Some(frag),
    );
    assert_eq!(out.len(), 20);
    assert!(verifies(0, &out));
}

#[test]
fn oversize_datagram_is_refused() {
    let src = v4([203, 0, 113, 1], 1);
    let dst = v4([192, 0, 2, 1], 2);
    assert!(udp_datagram(src, dst, &vec![0; 65_507]).is_ok());
    assert!(udp_datagram(src, dst, &vec![0; 65_508]).is_err());
}

/// Reassembles fragments the way a receiver would and compares.
fn reassemble(packets: &[Vec<u8>], v6: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, p) in packets.iter().enumerate() {
        let (offset, more, data) = if v6 {
            assert_eq!(p[6], PROTO_FRAGMENT);
            let plen = u16::from_be_bytes([p[4], p[5]]) as usize;
            assert_eq!(plen, p.len() - IPV6_HEADER);
            let fh = &p[IPV6_HEADER..IPV6_HEADER + 8];
            assert_eq!(fh[0], PROTO_UDP);
            let off = u16::from_be_bytes([fh[2], fh[3]]);
            ((off & !7) as usize, off & 1 == 1, &p[IPV6_HEADER + 8..])
        } else {
            assert!(verifies(0, &p[..20]), "header checksum of fragment {i}");
            let total = u16::from_be_bytes([p[2], p[3]]) as usize;
            assert_eq!(total, p.len());
            let fo = u16::from_be_bytes([p[6], p[7]]);
            (((fo & 0x1fff) as usize) * 8, fo & 0x2000 != 0, &p[20..])
        };
        assert_eq!(offset, out.len(), "fragment {i} offset");
        assert_eq!(more, i + 1 < packets.len(), "fragment {i} MF flag");
        out.extend_from_slice(data);
    }
    out
}

#[test]
fn fragments_fit_the_mtu_and_reassemble() {
    let payload: Vec<u8> = (0..65_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for (src, dst, is_v6) in [
        (v4([198, 51, 100, 7], 9), v4([192, 0, 2, 10], 4000), false),
        (v6("2001:db8:2::7", 9), v6("2001:db8:1::10", 4000), true),
    ] {
        let udp = udp_datagram(src, dst, &payload).unwrap();
        for mtu in [1280, 1500, 9000] {
            let frags = fragments(src.ip(), dst.ip(), 0xb8, &udp, mtu, 77).unwrap();
            assert!(frags.len() > 1);
            assert!(frags.iter().all(|p| p.len() <= mtu), "mtu {mtu}");
            assert_eq!(reassemble(&frags, is_v6), udp);
        }
    }
}

#[test]
fn tos_lands_in_the_header() {
    let mut out = Vec::new();
    ip_header(
        &mut out,
        "2001:db8::1".parse().unwrap(),
        "2001:db8::2".parse().unwrap(),
        0xb8,
        10,
        None,
    );
    let tclass = ((u32::from_be_bytes([out[0], out[1], out[2], out[3]]) >> 20) & 0xff) as u8;
    assert_eq!(tclass, 0xb8);
    let mut out = Vec::new();
    ip_header(
        &mut out,
        "192.0.2.1".parse().unwrap(),
        "192.0.2.2".parse().unwrap(),
        0xb8,
        10,
        None,
    );
    assert_eq!(out[1], 0xb8);
}

/// Packets a batch builds carry valid IP and UDP checksums, their
/// addresses, ports, TOS and payload, back to back in the order pushed.
#[test]
fn a_batch_builds_valid_packets_in_order() {
    let mut batch = RawBatch::default();
    let v4_src = v4([203, 0, 113, 53], 53);
    let v4_dst = v4([192, 0, 2, 10], 40000);
    let v6_src = v6("2001:db8::53", 53);
    let v6_dst = v6("2001:db8:1::10", 40001);
    assert!(batch.push(v4_src, v4_dst, b"first", 0x10));
    assert!(batch.push(v6_src, v6_dst, b"second", 0));
    assert!(batch.push(v4_src, v4_dst, b"", 0));
    let packets: Vec<&[u8]> = batch.packets().collect();
    assert_eq!(packets.len(), 3);

    let p = packets[0];
    assert_eq!(p.len(), 20 + 8 + 5);
    assert_eq!(p[1], 0x10, "TOS");
    assert!(verifies(0, &p[..20]), "IPv4 header checksum");
    assert_eq!(&p[12..16], &[203, 0, 113, 53]);
    assert_eq!(&p[16..20], &[192, 0, 2, 10]);
    let udp = &p[20..];
    assert_eq!(u16::from_be_bytes([udp[0], udp[1]]), 53);
    assert_eq!(u16::from_be_bytes([udp[2], udp[3]]), 40000);
    assert_eq!(&udp[8..], b"first");
    assert!(verifies(
        pseudo_header_sum(v4_src.ip(), v4_dst.ip(), udp.len() as u32),
        udp
    ));

    let p = packets[1];
    assert_eq!(p.len(), 40 + 8 + 6);
    assert_eq!(p[6], PROTO_UDP);
    let udp = &p[40..];
    assert_eq!(&udp[8..], b"second");
    assert!(verifies(
        pseudo_header_sum(v6_src.ip(), v6_dst.ip(), udp.len() as u32),
        udp
    ));

    assert_eq!(packets[2].len(), 28);
}

/// What a batch cannot carry is refused and leaves it as it was: mixed
/// families, and packets larger than every path is sure to take
/// unfragmented (those go alone, fragmented by the route's MTU).
#[test]
fn a_batch_refuses_what_it_cannot_carry() {
    let mut batch = RawBatch::default();
    let v4_src = v4([203, 0, 113, 53], 53);
    let v4_dst = v4([192, 0, 2, 10], 40000);
    assert!(!batch.push(v4_src, v6("2001:db8::1", 1), b"x", 0));
    assert!(batch.push(v4_src, v4_dst, &[0; 576 - 28], 0));
    assert!(!batch.push(v4_src, v4_dst, &[0; 576 - 27], 0));
    let v6_src = v6("2001:db8::53", 53);
    assert!(batch.push(v6_src, v6("2001:db8::1", 1), &[0; 1_280 - 48], 0));
    assert!(!batch.push(v6_src, v6("2001:db8::1", 1), &[0; 1_280 - 47], 0));
    assert_eq!(batch.packets().count(), 2);
}

/// A batch reaches a UDP socket as ordinary datagrams from the spoofed
/// source, and is empty after sending. Needs root (raw IP), as the lab
/// tests do.
#[test]
fn a_sent_batch_arrives_from_the_spoofed_sources() {
    let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    rx.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
    let to = rx.local_addr().unwrap();
    let sender = RawSender::new(0);
    let mut batch = RawBatch::default();
    for i in 0..5u8 {
        assert!(batch.push(v4([127, 0, 0, 2 + i], 7000 + u16::from(i)), to, &[i; 3], 0));
    }
    let sent = sender.send_batch(&mut batch);
    assert_eq!(sent.datagrams, 5, "{:?}", sent.first_error);
    assert_eq!(sent.bytes, 15);
    assert!(batch.is_empty());
    let mut buf = [0u8; 16];
    for i in 0..5u8 {
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[i; 3]);
        assert_eq!(from, v4([127, 0, 0, 2 + i], 7000 + u16::from(i)));
    }
}

/// A batched packet larger than the outgoing link's MTU (an IPv4 link
/// below 576 bytes: the kernel refuses a raw packet over the device's MTU
/// with `EMSGSIZE`) still arrives whole, fragmented as a packet sent alone
/// is, and the packets around it keep their order. In a network namespace
/// of this thread's own, whose loopback takes 400 bytes; needs root.
#[test]
fn a_batched_packet_over_a_small_links_mtu_arrives_fragmented() {
    on_own_loopback(400, || {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let to = rx.local_addr().unwrap();
        let sender = RawSender::new(0);
        let mut batch = RawBatch::default();
        let payloads: [Vec<u8>; 3] = [vec![1; 100], (0..500u32).map(|i| i as u8).collect(), vec![3; 50]];
        for (i, p) in payloads.iter().enumerate() {
            assert!(batch.push(v4([127, 0, 0, 2 + i as u8], 7000), to, p, 0));
        }
        let sent = sender.send_batch(&mut batch);
        assert_eq!(sent.datagrams, 3, "{:?}", sent.first_error);
        assert_eq!(sent.bytes, 650);
        let mut buf = [0u8; 1024];
        for (i, p) in payloads.iter().enumerate() {
            let (n, from) = rx.recv_from(&mut buf).unwrap_or_else(|e| panic!("datagram {i}: {e}"));
            assert_eq!(&buf[..n], p.as_slice(), "datagram {i}");
            assert_eq!(from, v4([127, 0, 0, 2 + i as u8], 7000));
        }
    });
}

/// Runs `f` on a thread of its own in a new network namespace whose
/// loopback is up with an MTU of `mtu` bytes; needs root.
fn on_own_loopback<T: Send + 'static>(mtu: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(move || {
        // SAFETY: moves this thread alone into a new network namespace.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare");
        let mtu = mtu.to_string();
        let up = std::process::Command::new("ip")
            .args(["link", "set", "lo", "mtu", &mtu, "up"])
            .status()
            .unwrap();
        assert!(up.success());
        f()
    })
    .join()
    .unwrap()
}

/// The IDs of the fragments of successive datagrams, as a receiver on
/// this thread's own loopback (MTU 1,280) sees them: IPv4 then IPv6.
fn fragment_ids_on_a_small_loopback(datagrams: usize) -> (Vec<u32>, Vec<u32>) {
    on_own_loopback(1280, move || {
        // SAFETY: a plain socket call; the descriptor is closed below.
        let capture = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_NONBLOCK,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        assert!(capture >= 0, "packet socket");
        let sender = RawSender::new(0);
        let payload = vec![7u8; 3000];
        for _ in 0..datagrams {
            sender
                .send(v4([127, 0, 0, 2], 7000), v4([127, 0, 0, 1], 9), &payload, 0)
                .unwrap();
            sender.send(v6("::1", 7000), v6("::1", 9), &payload, 0).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
        let (mut ids4, mut ids6) = (Vec::new(), Vec::new());
        let mut buf = [0u8; 2048];
        loop {
            // SAFETY: `buf` is valid for writes of its length.
            let n = unsafe { libc::recv(capture, buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { break };
            let p = &buf[..n];
            let id = match p.first().map(|b| b >> 4) {
                Some(4) if n >= 20 && p[9] == PROTO_UDP && u16::from_be_bytes([p[6], p[7]]) & 0x3fff != 0 => {
                    (false, u32::from(u16::from_be_bytes([p[4], p[5]])))
                }
                Some(6) if n >= 48 && p[6] == PROTO_FRAGMENT => {
                    (true, u32::from_be_bytes([p[44], p[45], p[46], p[47]]))
                }
                _ => continue,
            };
            let ids = if id.0 { &mut ids6 } else { &mut ids4 };
            if !ids.contains(&id.1) {
                ids.push(id.1);
            }
        }
        // SAFETY: ours, closed once.
        unsafe { libc::close(capture) };
        (ids4, ids6)
    })
}

/// Fragment IDs are not a counter: one who sees one datagram's (a LAN
/// client asking a server that answers big) could otherwise name the
/// next one's, and slip a forged fragment into another client's reply
/// (RFC 7739). Needs root.
#[test]
fn fragment_ids_cannot_be_guessed_from_the_last_one() {
    let (ids4, ids6) = fragment_ids_on_a_small_loopback(8);
    for (family, ids) in [("IPv4", &ids4), ("IPv6", &ids6)] {
        assert!(ids.len() >= 6, "{family}: one ID per datagram: {ids:?}");
        let steps = ids.windows(2).filter(|w| w[1].wrapping_sub(w[0]) < 16).count();
        assert!(steps < 3, "{family}: IDs follow each other: {ids:?}");
    }
}

/// A UDP checksum that computes to zero is sent as 0xFFFF: zero means "no
/// checksum", which IPv6 receivers drop (RFC 8200 8.1). A two-byte payload
/// equal to the checksum of two zero bytes makes the sum all ones, so its
/// checksum computes to zero; checked in a batch and alone.
#[test]
fn a_checksum_of_zero_is_sent_as_all_ones() {
    let (src, dst) = (v6("2001:db8::53", 53), v6("2001:db8:1::10", 40000));
    let zero = udp_datagram(src, dst, &[0, 0]).unwrap();
    let payload = [zero[6], zero[7]];
    let alone = udp_datagram(src, dst, &payload).unwrap();
    let mut batch = RawBatch::default();
    assert!(batch.push(src, dst, &payload, 0));
    let batched = batch.packets().next().unwrap()[IPV6_HEADER..].to_vec();
    assert_eq!(alone, batched);
    assert_eq!(u16::from_be_bytes([alone[6], alone[7]]), 0xffff);
    assert!(verifies(pseudo_header_sum(src.ip(), dst.ip(), 10), &alone));
}

/// A link-local client's scope (its interface) survives into the address
/// a raw packet is sent to, and a batch, which keeps addresses only, does
/// not take such a client's reply.
#[test]
fn a_link_scoped_client_keeps_its_interface() {
    let scoped: SocketAddr = "[fe80::10%3]:40000".parse().unwrap();
    match raw_destination(scoped) {
        SocketAddr::V6(d) => assert_eq!(
            (d.port(), d.scope_id(), d.ip()),
            (0, 3, &"fe80::10".parse::<Ipv6Addr>().unwrap())
        ),
        other => panic!("{other}"),
    }
    assert_eq!(raw_destination(v4([192, 0, 2, 10], 40000)), v4([192, 0, 2, 10], 0));
    let mut batch = RawBatch::default();
    assert!(!batch.push(v6("2001:db8::53", 53), scoped, b"x", 0));
    assert!(batch.push(v6("2001:db8::53", 53), v6("fe80::10", 40000), b"x", 0));
    assert_eq!(batch.packets().count(), 1);
}
