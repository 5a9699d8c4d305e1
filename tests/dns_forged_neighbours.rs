//! Answers to forged LAN source addresses and the reply socket's buffer.
//!
//! An answer to a LAN address nobody holds waits in the kernel's neighbour
//! queue for seconds while the kernel asks who holds it, and all that time
//! it counts against the listener socket's send buffer. A device forging
//! its source address from a hundred LAN addresses filled the buffer, and
//! the real device's answers failed until the kernel gave up on the forged
//! ones (the cache test in `dns_cache_share.rs` failed so, now and then).

mod lab;

use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use lab::Lab;
use lab::fake_dns::FakeDns;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

const UPSTREAM: &str = "198.51.100.53";
/// tproxyd's plain listener on the LAN.
const LISTEN: &str = "192.0.2.1";
/// An address off the LAN whose port 53 is hijacked: answered by the relay
/// from this address, through its reply sockets.
const PUBLIC: &str = "203.0.113.53";
/// The real device.
const DEVICE: &str = "192.0.2.10";
const ADMIN: &str = "127.0.0.1:9153";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn query(id: u16, name: &str) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// A client behind a router (the device, which routes 203.0.113.192/26
/// for the gateway): never in the gateway's neighbour table.
const ROUTED: &str = "203.0.113.200";

/// Asks `names` from `from` (a real client), all sent before any answer is
/// read; returns how many were answered with an address.
fn ask_from(lab: &Lab, from: &str, to: SocketAddr, names: &[String]) -> usize {
    let sock = lab::udp::socket(&lab.client, SocketAddr::new(ip(from), 0));
    sock.set_read_timeout(Some(Duration::from_millis(2000))).unwrap();
    for (i, n) in names.iter().enumerate() {
        sock.send_to(&query(u16::try_from(i).unwrap(), n), to).unwrap();
    }
    let mut answered = 0;
    for _ in names {
        let Some((_, bytes)) = lab::udp::recv(&sock) else { break };
        if Message::from_vec(&bytes).is_ok_and(|m| !m.answers.is_empty()) {
            answered += 1;
        }
    }
    answered
}

/// [`ask_from`] the real device.
fn ask(lab: &Lab, to: SocketAddr, names: &[String]) -> usize {
    ask_from(lab, DEVICE, to, names)
}

/// Sends one query for each of `names` from `from`, a LAN address no
/// device holds (`IP_TRANSPARENT` in the client namespace): a forged
/// source. Its answers go to that address.
fn forge(lab: &Lab, from: IpAddr, to: SocketAddr, names: &[String]) {
    let sock = lab.client.enter(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_freebind_v4(true).unwrap();
        s.set_ip_transparent_v4(true).unwrap();
        s.bind(&SocketAddr::new(from, 0).into()).unwrap();
        std::net::UdpSocket::from(s)
    });
    for (i, n) in names.iter().enumerate() {
        sock.send_to(&query(u16::try_from(i).unwrap(), n), to).unwrap();
    }
}

/// A device forges queries from 120 LAN addresses nobody holds
/// (192.0.2.100 to 192.0.2.219), each for 40 cached names of 40 lengths
/// (one datagram each: answers of one size to one client would leave as
/// one GSO train), all well within its rate limit, to `to`. Their answers
/// wait for neighbours that never answer, far more of them than a send
/// buffer holds. Right after, the real device asks its 20 cached names
/// there (`asker`: the device itself, or a client behind it as a router):
/// every one must be answered, and the answers held back must be counted.
fn forged_neighbours_against(to: SocketAddr, asker: &str) {
    let lab = Lab::with_servers(1);
    // The device announces its LAN address in its ARP requests, as a
    // router does, not the routed client's (which the gateway would then
    // learn as a neighbour).
    lab.client.sh(&format!(
        "sysctl -qw net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.lan0.arp_announce=2; ip addr add {ROUTED}/32 dev lo"
    ));
    lab.gateway.sh(&format!("ip route add 203.0.113.192/26 via {DEVICE}"));
    lab.add_server_address(0, ip(UPSTREAM));
    lab.install_rules("nft", "LAN_IF=lan0");
    let _fake = FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), |q| {
        let mut m = Message::query();
        m.metadata.message_type = MessageType::Response;
        let a = RData::A(A::new(203, 0, 113, 80));
        m.answers = vec![Record::from_rdata(q.name().clone(), 3600, a)];
        m
    });
    let config = format!(
        r#"
mark = 255
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[admin]
listen = "{ADMIN}"
[dns]
ports = [53]
listen = ["{LISTEN}:53"]
allow = ["192.0.2.0/24", "203.0.113.192/26"]
timeout = "1500ms"
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
"#
    );
    let _daemon = lab.start_tproxyd(&config);
    let hot: Vec<String> = (0..20).map(|i| format!("hot{i}.device.test.")).collect();
    let lengths: Vec<String> = (1..=40).map(|n| format!("{}.forged.test.", "x".repeat(n))).collect();
    // Everything cached first: from here on every answer is given at once.
    assert_eq!(ask_from(&lab, asker, to, &hot), 20);
    assert_eq!(ask(&lab, to, &lengths), 40);
    for source in 0..120u8 {
        forge(&lab, IpAddr::from([192, 0, 2, 100 + source]), to, &lengths);
    }
    // The forged addresses' neighbours are still being resolved (seconds):
    // their answers hold the reply socket's buffer now.
    assert_eq!(
        ask_from(&lab, asker, to, &hot),
        20,
        "{asker} was starved of its answers"
    );
    let metrics = lab::metrics::fetch(&lab.gateway, ADMIN.parse().unwrap());
    let held_back = lab::metrics::value(&metrics, "tproxyd_drops_total{reason=\"neighbour_unresolved\"}");
    assert!(held_back > 0, "no answer to a forged address was held back");
}

#[test]
fn answers_waiting_for_forged_neighbours_cannot_starve_a_real_device() {
    forged_neighbours_against(format!("{LISTEN}:53").parse().unwrap(), DEVICE);
}

#[test]
fn hijacked_answers_waiting_for_forged_neighbours_cannot_starve_a_real_device() {
    forged_neighbours_against(format!("{PUBLIC}:53").parse().unwrap(), DEVICE);
}

/// A client behind a router is never in the neighbour table, but its
/// answers leave at once (to the router): they must not be held back with
/// the forged ones.
#[test]
fn answers_to_a_client_behind_a_router_are_not_held_back() {
    forged_neighbours_against(format!("{LISTEN}:53").parse().unwrap(), ROUTED);
}

#[test]
fn hijacked_answers_to_a_client_behind_a_router_are_not_held_back() {
    forged_neighbours_against(format!("{PUBLIC}:53").parse().unwrap(), ROUTED);
}
