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
    fold(add_bytes(sum_start, bytes)) == 0
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
