//! Each IPv6 device of the LAN is a client of its own for the DNS limits.
//!
//! The devices of a LAN share one /64, which the limits counted as one
//! client (an IPv6 host can use every address of its prefix): one device
//! over the rate limit, busy or forging sources in the prefix, left every
//! other IPv6 device without answers. A device the gateway has resolved
//! now counts by its link-layer address; the addresses nobody answers for
//! (forged ones) still share their /56.

mod lab;

use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use lab::Lab;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

const LISTEN6: &str = "2001:db8:1::1";
/// The busy or forging device (the lab's client, on `lan0`).
const FIRST: &str = lab::CLIENT6;
/// Another device of the LAN: its own link-layer address (a macvlan on
/// the client's link).
const SECOND: &str = "2001:db8:1::11";
/// What the override answers.
const ANSWER: [u8; 4] = [192, 0, 2, 50];

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn to() -> SocketAddr {
    format!("[{LISTEN6}]:53").parse().unwrap()
}

fn query(id: u16) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str("printer.lan.").unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// tproxyd answering `printer.lan` itself on the LAN, the rate limit at
/// its default (200 a second, a burst of 400), and [`SECOND`] on the
/// client's link with a link-layer address of its own.
fn gateway() -> (Lab, lab::Daemon) {
    let lab = Lab::new();
    lab.client.sh(&format!(
        "ip link add second link lan0 type macvlan mode bridge
         ip addr add {SECOND}/64 dev second nodad
         ip link set second up"
    ));
    let config = format!(
        r#"
mark = 255
[relay]
listen = ["[::]:15353"]
[dns]
listen = ["[{LISTEN6}]:53"]
allow = ["2001:db8:1::/64"]

# Never asked: every query is for the override.
[dns.upstreams.default]
servers = ["2001:db8:2::53"]

[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["192.0.2.50"]
"#
    );
    let daemon = lab.start_tproxyd(&config);
    (lab, daemon)
}

/// A socket of [`SECOND`], sending through its own link.
fn second_socket(lab: &Lab) -> UdpSocket {
    lab.client.enter(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        s.bind_device(Some(b"second")).unwrap();
        s.bind(&SocketAddr::new(ip(SECOND), 0).into()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
        UdpSocket::from(s)
    })
}

/// A socket sending from `from`, an address of the LAN nobody holds.
fn forged_socket(lab: &Lab, from: IpAddr) -> UdpSocket {
    lab.client.enter(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).unwrap();
        s.set_freebind_v6(true).unwrap();
        s.bind(&SocketAddr::new(from, 0).into()).unwrap();
        UdpSocket::from(s)
    })
}

/// Sends 20 queries on `sock` at once; how many were answered, from the
/// address asked, with the override's address.
fn ask_twenty(sock: &UdpSocket) -> usize {
    ask_twenty_within(sock, 1)
}

/// [`ask_twenty`] as a stub resolver asks: the queries not answered are
/// sent again, up to `rounds` times in all, each round waiting for
/// answers until none comes for the socket's read timeout.
fn ask_twenty_within(sock: &UdpSocket, rounds: usize) -> usize {
    let mut answered = [false; 20];
    for _ in 0..rounds {
        for id in 0..20u16 {
            if !answered[usize::from(id)] {
                sock.send_to(&query(id), to()).unwrap();
            }
        }
        while let Some((sender, bytes)) = lab::udp::recv(sock) {
            let Ok(m) = Message::from_vec(&bytes) else {
                continue;
            };
            let good = m.metadata.message_type == MessageType::Response
                && m.answers
                    .iter()
                    .any(|r| matches!(r.data, RData::A(a) if a.0.octets() == ANSWER));
            if sender == to()
                && good
                && let Some(seen) = answered.get_mut(usize::from(m.metadata.id))
            {
                *seen = true;
            }
            if answered.iter().all(|&a| a) {
                return 20;
            }
        }
    }
    answered.iter().filter(|&&a| a).count()
}

/// Sends queries from each of `socks` in turn, 40 every 20 ms (2,000 a
/// second, ten times the rate limit), until stopped.
fn flood(socks: Vec<UdpSocket>) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let thread = std::thread::spawn(move || {
        let mut id = 0u16;
        while !flag.load(Ordering::Relaxed) {
            for _ in 0..40 {
                let sock = &socks[usize::from(id) % socks.len()];
                let _ = sock.send_to(&query(id), to());
                id = id.wrapping_add(1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (stop, thread)
}

/// While one device asks ten times what the rate limit allows, and is
/// limited, another device of the same /64 gets all its answers.
#[test]
fn a_busy_ipv6_device_does_not_empty_another_devices_rate_limit() {
    let (lab, daemon) = gateway();
    let second = second_socket(&lab);
    assert_eq!(ask_twenty(&second), 20, "the second device before the flood");
    let busy = lab::udp::socket(&lab.client, SocketAddr::new(ip(FIRST), 0));
    busy.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    let (stop, thread) = flood(vec![busy]);
    // Past the busy device's burst (400 at 2,000 a second).
    std::thread::sleep(Duration::from_millis(600));
    let answered = ask_twenty(&second);
    stop.store(true, Ordering::Relaxed);
    let _ = thread.join();
    let stopped = daemon.stop();
    assert!(
        stopped.counter("dns_rate_limited") > 100,
        "the busy device was not limited: {}",
        stopped.log
    );
    assert_eq!(answered, 20, "the second device got {answered} of 20");
}

/// Forged sources of the LAN's /64 are no device: they share one count,
/// and are limited as one client, while the real devices keep theirs: one
/// that asked before the flood at once, and one that first asks during
/// it when it asks again, as a stub resolver does (its first queries may
/// come before the gateway reads that it has resolved it: at most every
/// 100 ms while the flood lasts).
#[test]
fn forged_ipv6_sources_share_one_rate_limit_and_the_devices_keep_theirs() {
    let (lab, daemon) = gateway();
    let second = second_socket(&lab);
    let device = lab::udp::socket(&lab.client, SocketAddr::new(ip(FIRST), 0));
    device.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
    assert_eq!(ask_twenty(&device), 20, "the device before the flood");
    // 40 sources, 50 queries a second each: within the limit, were each a
    // client of its own.
    let forged: Vec<UdpSocket> = (0..40u16)
        .map(|s| forged_socket(&lab, IpAddr::from([0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100 + s])))
        .collect();
    let (stop, thread) = flood(forged);
    std::thread::sleep(Duration::from_millis(600));
    let first = ask_twenty(&device);
    let other = ask_twenty_within(&second, 3);
    stop.store(true, Ordering::Relaxed);
    let _ = thread.join();
    let stopped = daemon.stop();
    assert!(
        stopped.counter("dns_rate_limited") > 100,
        "the forged sources were not limited as one client: {}",
        stopped.log
    );
    assert_eq!((first, other), (20, 20), "answers to the two devices, of 20 each");
}
