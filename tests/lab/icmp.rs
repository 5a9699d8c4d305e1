//! Forged and real ICMP errors in the lab: the messages an off-path host
//! forges from a server namespace with a raw socket, the thread that
//! sprays them at one port of the gateway, and the counters that say how
//! many real ones a namespace sent.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use super::Netns;

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP message of `kind` and `code` (with `rest`, its second word),
/// quoting a UDP datagram `quoted_src:quoted_port → quoted_dst:quoted_dport`
/// of `quoted_len` bytes (IP header included): what a router, or a spoofer,
/// would send back about it.
pub fn icmp_error(
    kind: u8,
    code: u8,
    rest: [u8; 4],
    (quoted_src, quoted_port): (Ipv4Addr, u16),
    (quoted_dst, quoted_dport): (Ipv4Addr, u16),
    quoted_len: u16,
) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&quoted_len.to_be_bytes());
    ip.extend_from_slice(&quoted_src.octets());
    ip.extend_from_slice(&quoted_dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut udp = Vec::new();
    udp.extend_from_slice(&quoted_port.to_be_bytes());
    udp.extend_from_slice(&quoted_dport.to_be_bytes());
    udp.extend_from_slice(&quoted_len.saturating_sub(20).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&[0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend_from_slice(&rest);
    icmp.extend_from_slice(&ip);
    icmp.extend_from_slice(&udp);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    icmp
}

/// An ICMP destination-unreachable with `code`, quoting a 40-byte UDP
/// datagram `quoted_src:quoted_port → quoted_dst:53`.
pub fn icmp_unreachable(code: u8, quoted_src: Ipv4Addr, quoted_port: u16, quoted_dst: Ipv4Addr) -> Vec<u8> {
    // "Fragmentation needed" carries a next-hop MTU: a plausible one.
    let rest = if code == 4 { [0, 0, 0x05, 0x78] } else { [0; 4] };
    icmp_error(3, code, rest, (quoted_src, quoted_port), (quoted_dst, 53), 40)
}

/// An ICMP "fragmentation needed" naming a next-hop `mtu`, about a
/// datagram of 1,400 bytes `quoted_src:quoted_port → quoted_dst:quoted_dport`.
pub fn frag_needed(mtu: u16, quoted_src: (Ipv4Addr, u16), quoted_dst: (Ipv4Addr, u16)) -> Vec<u8> {
    let m = mtu.to_be_bytes();
    icmp_error(3, 4, [0, 0, m[0], m[1]], quoted_src, quoted_dst, 1_400)
}

/// A raw ICMP socket in `ns`, for forging ICMP errors.
pub fn raw_icmp_socket(ns: &Netns) -> socket2::Socket {
    ns.enter(|| {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::ICMPV4),
        )
        .expect("raw ICMP socket")
    })
}

/// Sends `message` from `ns`'s raw socket to `to`; true if it left.
pub fn forge(raw: &socket2::Socket, message: &[u8], to: Ipv4Addr) -> bool {
    let to: socket2::SockAddr = std::net::SocketAddr::new(IpAddr::V4(to), 0).into();
    raw.send_to(message, &to).is_ok()
}

/// Has `ns` answer every datagram to a closed port with its ICMP error:
/// no rate limit, so that the errors a test counts are all sent.
pub fn every_icmp_error_sent(ns: &Netns) {
    ns.sh("sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv4.icmp_msgs_per_sec=100000 net.ipv4.icmp_msgs_burst=100000");
}

/// ICMP destination-unreachable messages `ns` has sent (from /proc/net/snmp).
pub fn icmp_unreachables_sent(ns: &Netns) -> u64 {
    let snmp = ns.sh("cat /proc/net/snmp");
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (Some(names), Some(values)) = (icmp.next(), icmp.next()) else {
        panic!("no Icmp lines in:\n{snmp}");
    };
    let at = names
        .split_whitespace()
        .position(|n| n == "OutDestUnreachs")
        .expect("OutDestUnreachs");
    values
        .split_whitespace()
        .nth(at)
        .and_then(|v| v.parse().ok())
        .expect("a count")
}

/// A thread in `ns` forging ICMP errors at `to`, the `n`th made by
/// `message(n)`, about `per_ms` a millisecond (as far as one thread can),
/// until [`Sprayer::finish`].
pub struct Sprayer {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<u64>,
}

impl Sprayer {
    pub fn start(ns: &Netns, to: Ipv4Addr, per_ms: u64, message: impl Fn(u64) -> Vec<u8> + Send + 'static) -> Sprayer {
        let raw = raw_icmp_socket(ns);
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut sent, mut tried) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    if forge(&raw, &message(tried), to) {
                        sent += 1;
                    }
                    tried += 1;
                    if sent % per_ms == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                sent
            })
        };
        Sprayer { stop, thread }
    }

    /// Stops the spray; how many errors were sent.
    pub fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}
