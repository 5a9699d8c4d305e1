//! Answers to forged LAN source addresses and the reply socket's buffer.
//!
//! An answer to a LAN address nobody holds waits in the kernel's neighbour
//! queue for seconds while the kernel asks who holds it, and all that time
//! it counts against the listener socket's send buffer. A device forging
//! its source address from a hundred LAN addresses filled the buffer, and
//! the real device's answers failed until the kernel gave up on the forged
//! ones (the cache test in `dns_cache_share.rs` failed so, now and then).
//! IPv6 alike: an answer to a forged address of the LAN's /64 waits for
//! neighbour solicitations nobody answers.

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
/// tproxyd's plain listener on the LAN, IPv6.
const LISTEN6: &str = "2001:db8:1::1";
/// [`PUBLIC`]'s IPv6 counterpart: hijacked, answered from this address.
const PUBLIC6: &str = "2001:db8:53::53";
/// The real device's IPv6 address.
const DEVICE6: &str = "2001:db8:1::10";
/// What the fake upstream answers for every name.
const ANSWER: [u8; 4] = [203, 0, 113, 80];

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
/// [`ROUTED`]'s IPv6 counterpart (the device routes 2001:db8:cc::/64).
const ROUTED6: &str = "2001:db8:cc::200";

/// Asks `names` from `from` (a real client), all sent before any answer is
/// read; returns how many were answered, from `to` (the address asked),
/// with the address the upstream gave.
fn ask_from(lab: &Lab, from: &str, to: SocketAddr, names: &[String]) -> usize {
    let sock = lab::udp::socket(&lab.client, SocketAddr::new(ip(from), 0));
    sock.set_read_timeout(Some(Duration::from_millis(2000))).unwrap();
    for (i, n) in names.iter().enumerate() {
        sock.send_to(&query(u16::try_from(i).unwrap(), n), to).unwrap();
    }
    let mut answered = 0;
    for _ in names {
        let Some((sender, bytes)) = lab::udp::recv(&sock) else {
            break;
        };
        if sender == to && Message::from_vec(&bytes).is_ok_and(|m| answers_the_address(&m)) {
            answered += 1;
        }
    }
    answered
}

/// Whether `m` is an answer carrying [`ANSWER`].
fn answers_the_address(m: &Message) -> bool {
    m.metadata.message_type == MessageType::Response
        && m.answers
            .iter()
            .any(|r| matches!(r.data, RData::A(a) if a.0.octets() == ANSWER))
}

/// [`ask_from`] the real device, from its address of `to`'s family.
fn ask(lab: &Lab, to: SocketAddr, names: &[String]) -> usize {
    ask_from(lab, device_for(to), to, names)
}

/// The real device's address of `to`'s family.
fn device_for(to: SocketAddr) -> &'static str {
    if to.is_ipv4() { DEVICE } else { DEVICE6 }
}

/// Sends one query for each of `names` from `from`, a LAN address no
/// device holds: a forged source. Its answers go to that address.
fn forge(lab: &Lab, from: IpAddr, to: SocketAddr, names: &[String]) {
    send_all(&forged_socket(lab, from), to, names);
}

/// A socket in the client namespace bound to `from`, an address it does
/// not hold (`IP_TRANSPARENT`).
fn forged_socket(lab: &Lab, from: IpAddr) -> std::net::UdpSocket {
    lab.client.enter(move || {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(SocketAddr::new(from, 0)),
            socket2::Type::DGRAM,
            None,
        )
        .unwrap();
        if from.is_ipv4() {
            s.set_freebind_v4(true).unwrap();
            s.set_ip_transparent_v4(true).unwrap();
        } else {
            s.set_freebind_v6(true).unwrap();
        }
        s.bind(&SocketAddr::new(from, 0).into()).unwrap();
        std::net::UdpSocket::from(s)
    })
}

/// One query for each of `names` on `sock` to `to`.
fn send_all(sock: &std::net::UdpSocket, to: SocketAddr, names: &[String]) {
    for (i, n) in names.iter().enumerate() {
        sock.send_to(&query(u16::try_from(i).unwrap(), n), to).unwrap();
    }
}

/// The lab with tproxyd answering DNS on the LAN ([`LISTEN`], [`LISTEN6`])
/// and for hijacked port-53 traffic ([`PUBLIC`], [`PUBLIC6`]), every name
/// answered by a fake upstream, and the device routing [`ROUTED`] and
/// [`ROUTED6`] for the gateway.
struct Gateway {
    lab: Lab,
    _fake: FakeDns,
    daemon: lab::Daemon,
    /// A local process's socket on the wildcard of port 53, when the
    /// gateway has one ([`Gateway::start_over_raw`]).
    _holder: Option<std::net::UdpSocket>,
}

impl Gateway {
    fn start() -> Gateway {
        Gateway::start_with("rate_limit = { qps = 0 }")
    }

    /// [`Gateway::start`] with `dns` added to the `[dns]` table.
    fn start_with(dns: &str) -> Gateway {
        Gateway::start_in(
            Lab::with_servers(1),
            None,
            &format!("listen = [\"{LISTEN}:53\", \"[{LISTEN6}]:53\"]\n{dns}"),
        )
    }

    /// The gateway with a local process holding the wildcard of port 53
    /// (a DNS server of its own, say), without `SO_REUSEADDR`: the relay
    /// cannot bind a reply socket to [`PUBLIC`]`:53` nor [`PUBLIC6`]`:53`,
    /// and sends its hijacked answers over raw IP. tproxyd has no plain
    /// listener here (it could not bind one either); the rate limit is off.
    fn start_over_raw() -> Gateway {
        let lab = Lab::with_servers(1);
        // Dual-stack: holds the port for IPv4 and IPv6.
        let holder = lab::udp::socket(&lab.gateway, "[::]:53".parse().unwrap());
        Gateway::start_in(lab, Some(holder), "rate_limit = { qps = 0 }")
    }

    /// Starts tproxyd in `lab` with `dns` (its listeners among it) added
    /// to the `[dns]` table.
    fn start_in(lab: Lab, holder: Option<std::net::UdpSocket>, dns: &str) -> Gateway {
        // The device announces its LAN address in its ARP requests, as a
        // router does, not the routed client's (which the gateway would
        // then learn as a neighbour).
        lab.client.sh(&format!(
            "sysctl -qw net.ipv4.conf.all.arp_announce=2 net.ipv4.conf.lan0.arp_announce=2; ip addr add {ROUTED}/32 dev lo
             ip addr add {ROUTED6}/128 dev lo nodad"
        ));
        lab.gateway.sh(&format!(
            "ip route add 203.0.113.192/26 via {DEVICE}; ip -6 route add 2001:db8:cc::/64 via {DEVICE6}"
        ));
        // The device asks for the gateway's address from its link-local
        // address when the query's source is not on the link (the routed
        // client's): it must be past duplicate address detection, or the
        // first queries are lost before they leave the device.
        lab.client
            .sh("for _ in $(seq 100); do [ -z \"$(ip -6 addr show dev lan0 tentative)\" ] && break; sleep 0.05; done");
        lab.add_server_address(0, ip(UPSTREAM));
        lab.install_rules("nft", "LAN_IF=lan0");
        let fake = FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), |q| {
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
allow = ["192.0.2.0/24", "203.0.113.192/26", "2001:db8:1::/64", "2001:db8:cc::/64"]
timeout = "1500ms"
{dns}
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
"#
        );
        let daemon = lab.start_tproxyd(&config);
        Gateway {
            lab,
            _fake: fake,
            daemon,
            _holder: holder,
        }
    }

    /// Answers to forged addresses held back so far.
    fn held_back(&self) -> u64 {
        self.counter("tproxyd_drops_total{reason=\"neighbour_unresolved\"}")
    }

    /// The value of the metrics `series`.
    fn counter(&self, series: &str) -> u64 {
        let metrics = lab::metrics::fetch(&self.lab.gateway, ADMIN.parse().unwrap());
        lab::metrics::value(&metrics, series)
    }
}

/// 40 names of 40 lengths, whose answers (one datagram each: answers of
/// one size to one client would leave as one GSO train) the forged
/// sources ask for.
fn forged_names() -> Vec<String> {
    (1..=40).map(|n| format!("{}.forged.test.", "x".repeat(n))).collect()
}

/// The forged sources of `to`'s family: 120 LAN addresses nobody holds
/// (192.0.2.100 to 192.0.2.219, or 2001:db8:1::100 to 2001:db8:1::177,
/// whose neighbour solicitations nobody answers).
fn forged_sources(to: SocketAddr) -> impl Iterator<Item = IpAddr> {
    (0..120u8).map(move |s| {
        if to.is_ipv4() {
            IpAddr::from([192, 0, 2, 100 + s])
        } else {
            IpAddr::from([0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100 + u16::from(s)])
        }
    })
}

/// A device forges queries from [`forged_sources`], each for the
/// [`forged_names`], all cached and well within its rate limit, to `to`.
/// Their answers wait for neighbours that never answer, far more of them
/// than a send buffer holds. Right after, the real device asks its 20
/// cached names there (`asker`: the device itself, or a client behind it
/// as a router): every one must be answered, and the answers held back
/// must be counted.
fn forged_neighbours_against(to: SocketAddr, asker: &str) {
    forged_neighbours_in(&Gateway::start(), to, asker);
}

/// [`forged_neighbours_against`] on a gateway already started.
fn forged_neighbours_in(gw: &Gateway, to: SocketAddr, asker: &str) {
    forged_then_asked(gw, to, asker, |gw, lengths| {
        for source in forged_sources(to) {
            forge(&gw.lab, source, to, lengths);
        }
    });
}

/// [`forged_neighbours_in`], the forged queries answered in one burst.
/// Five sources' answers go first; then tproxyd is stopped while the
/// other sources' queries queue up, and goes on with hundreds of answers
/// to send at once. The relay sent all it had gathered (up to 320) after
/// one look at the buffer: on that build the buffer was full after the
/// burst (`send_buffer_full` counted 36 to 42 answers, the routed
/// client's among them), and every answer to the real device failed until
/// the kernel gave up on the forged neighbours (0 of 20 answered, as in a
/// CI run of
/// `ipv6_hijacked_answers_to_a_client_behind_a_router_are_not_held_back`).
fn forged_burst_in(gw: &Gateway, to: SocketAddr, asker: &str) {
    forged_burst_after(gw, to, asker, 5);
}

/// [`forged_burst_in`] with `before` sources' answers sent before the
/// burst: as many as leave the buffer just under half, for the relay
/// to find it so at its look.
fn forged_burst_after(gw: &Gateway, to: SocketAddr, asker: &str, before: usize) {
    forged_then_asked(gw, to, asker, |gw, lengths| {
        let sources: Vec<IpAddr> = forged_sources(to).collect();
        let (first, rest) = sources.split_at(before);
        for &source in first {
            forge(&gw.lab, source, to, lengths);
        }
        std::thread::sleep(Duration::from_millis(300));
        gw.daemon.signal(nix::sys::signal::Signal::SIGSTOP);
        for &source in rest {
            forge(&gw.lab, source, to, lengths);
        }
        gw.daemon.signal(nix::sys::signal::Signal::SIGCONT);
        // Past the burst: the forged answers hold the buffer for seconds.
        std::thread::sleep(Duration::from_millis(300));
    });
}

/// The device and `asker` have their names cached, `forge_all` sends the
/// forged queries for the [`forged_names`] (cached too), and right after,
/// with the forged addresses' neighbours still being resolved (seconds)
/// and their answers holding the reply socket's buffer, `asker` asks its
/// 20 names again: every one must be answered, and answers to forged
/// addresses must have been held back.
fn forged_then_asked(gw: &Gateway, to: SocketAddr, asker: &str, forge_all: impl FnOnce(&Gateway, &[String])) {
    let lab = &gw.lab;
    let hot: Vec<String> = (0..20).map(|i| format!("hot{i}.device.test.")).collect();
    let lengths = forged_names();
    // Everything cached first: from here on every answer is given at once.
    assert_eq!(ask_from(lab, asker, to, &hot), 20);
    assert_eq!(ask(lab, to, &lengths), 40);
    forge_all(gw, &lengths);
    let answered = ask_from(lab, asker, to, &hot);
    assert_eq!(
        answered,
        20,
        "{asker} was starved of its answers (send_buffer_full: {})",
        gw.counter("tproxyd_drops_total{reason=\"send_buffer_full\"}")
    );
    assert!(gw.held_back() > 0, "no answer to a forged address was held back");
}

#[test]
fn hijacked_answers_to_forged_sources_in_one_burst_leave_room_for_a_routed_client() {
    forged_burst_in(&Gateway::start(), format!("{PUBLIC}:53").parse().unwrap(), ROUTED);
}

#[test]
fn ipv6_hijacked_answers_to_forged_sources_in_one_burst_leave_room_for_a_routed_client() {
    forged_burst_in(&ipv6_gateway(), format!("[{PUBLIC6}]:53").parse().unwrap(), ROUTED6);
}

/// [`forged_burst_in`] with the hijacked answers sent over raw IP
/// ([`Gateway::start_over_raw`]), one source's answers before the burst.
/// The raw socket's buffer is shared by every address answered so. When
/// the replies gathered for one call were sent after one look at it, the
/// burst filled it: the asker got 0 of 20 answers, with `send_buffer_full`
/// at 60 (IPv4 device, IPv4 and IPv6 routed client, 3 runs each).
fn forged_burst_over_raw(to: SocketAddr, asker: &str) {
    let gw = Gateway::start_over_raw();
    forged_burst_after(&gw, to, asker, 1);
    assert_eq!(
        gw.counter("tproxyd_reply_raw_fallbacks_total"),
        1,
        "{to} was not answered over raw IP"
    );
}

#[test]
fn hijacked_answers_over_raw_ip_to_forged_sources_in_one_burst_leave_room_for_a_routed_client() {
    forged_burst_over_raw(format!("{PUBLIC}:53").parse().unwrap(), ROUTED);
}

#[test]
fn ipv6_hijacked_answers_over_raw_ip_to_forged_sources_in_one_burst_leave_room_for_a_routed_client() {
    forged_burst_over_raw(format!("[{PUBLIC6}]:53").parse().unwrap(), ROUTED6);
}

#[test]
fn hijacked_answers_over_raw_ip_to_forged_sources_in_one_burst_leave_room_for_a_device() {
    forged_burst_over_raw(format!("{PUBLIC}:53").parse().unwrap(), DEVICE);
}

#[test]
fn ipv6_answers_to_forged_sources_in_one_burst_leave_room_for_a_device() {
    forged_burst_in(&ipv6_gateway(), format!("[{LISTEN6}]:53").parse().unwrap(), DEVICE6);
}

/// When the kernel drops the real device's neighbour entry, in
/// [`forgotten_device_against`].
#[derive(Clone, Copy, PartialEq, Debug)]
enum Dropped {
    /// Before the forging starts: forged entries that came slowly, before
    /// any send buffer filled, pushed it out.
    BeforeTheFlood,
    /// While the forging fills the reply socket's buffer.
    DuringTheFlood,
}

/// While forged sources fill the kernel's neighbour table, the kernel
/// drops the idle entries, a real device's among them (its forced garbage
/// collection; here the device's entry is deleted by hand, `when`, as it
/// does). The device still knows the gateway and does not ask for it
/// again: it is answered only if tproxyd sends it an answer to wait while
/// the kernel asks for it. It asks its 20 names one by one, each up to
/// three times a second apart, as a stub resolver does, while the forging
/// goes on: every one must be answered.
fn forgotten_device_against(to: SocketAddr, when: Dropped) {
    let gw = Gateway::start();
    let lab = &gw.lab;
    let hot: Vec<String> = (0..20).map(|i| format!("hot{i}.device.test.")).collect();
    // Ten names of ten lengths from 40 addresses, four times a second:
    // their answers to neighbours that never answer wait three seconds
    // each, many times what half the socket's buffer holds, while the
    // listener keeps up with the queries (the device's must not be lost
    // in a full receive queue: that is another flood).
    let lengths: Vec<String> = forged_names().into_iter().take(10).collect();
    assert_eq!(ask(lab, to, &hot), 20);
    assert_eq!(ask(lab, to, &lengths), 10);
    let drop_device = || {
        lab.gateway.sh(&format!("ip neigh del {} dev lan0", device_for(to)));
        // Past the reading tproxyd took of the table before (100 ms),
        // which still had the device.
        std::thread::sleep(Duration::from_millis(500));
    };
    if when == Dropped::BeforeTheFlood {
        drop_device();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let forger = {
        let socks: Vec<_> = forged_sources(to)
            .take(40)
            .map(|from| forged_socket(lab, from))
            .collect();
        let (stop, lengths) = (stop.clone(), lengths.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for sock in &socks {
                    send_all(sock, to, &lengths);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let first = if when == Dropped::DuringTheFlood {
        // While the buffer fills, the device is seen resolved: it asks now.
        let first = hot.iter().filter(|name| ask_retrying(lab, to, name)).count();
        drop_device();
        first
    } else {
        20
    };
    let answered = hot.iter().filter(|name| ask_retrying(lab, to, name)).count();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = forger.join();
    assert_eq!(
        first, 20,
        "the device was starved of its answers before its entry was dropped"
    );
    assert!(gw.held_back() > 0, "no answer to a forged address was held back");
    assert_eq!(
        answered, 20,
        "the device, dropped from the neighbour table {when:?}, was answered {answered} of 20"
    );
}

/// Asks `name` from the device, up to three times a second apart, as a
/// stub resolver does; whether an answer with an address came.
fn ask_retrying(lab: &Lab, to: SocketAddr, name: &str) -> bool {
    let sock = lab::udp::socket(&lab.client, SocketAddr::new(ip(device_for(to)), 0));
    sock.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
    (0..3u16).any(|attempt| {
        sock.send_to(&query(attempt, name), to).unwrap();
        lab::udp::recv(&sock).is_some_and(|(sender, bytes)| {
            sender == to && Message::from_vec(&bytes).is_ok_and(|m| answers_the_address(&m))
        })
    })
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

#[test]
fn a_device_the_kernel_forgot_during_forging_is_still_answered() {
    forgotten_device_against(format!("{LISTEN}:53").parse().unwrap(), Dropped::DuringTheFlood);
}

#[test]
fn a_device_the_kernel_forgot_during_forging_still_gets_hijacked_answers() {
    forgotten_device_against(format!("{PUBLIC}:53").parse().unwrap(), Dropped::DuringTheFlood);
}

#[test]
fn a_device_the_kernel_forgot_before_forging_is_still_answered() {
    forgotten_device_against(format!("{LISTEN}:53").parse().unwrap(), Dropped::BeforeTheFlood);
}

#[test]
fn a_device_the_kernel_forgot_before_forging_still_gets_hijacked_answers() {
    forgotten_device_against(format!("{PUBLIC}:53").parse().unwrap(), Dropped::BeforeTheFlood);
}

/// The IPv6 lab: the rate limit off. The forged sources of the device's
/// /64 share one count, and are limited as one client
/// (`tests/dns_ipv6_devices.rs` tests that); here only the neighbour
/// queue is under test, as in the IPv4 tests (whose forged queries stay
/// within each address's limit).
fn ipv6_gateway() -> Gateway {
    Gateway::start_with("rate_limit = { qps = 0 }")
}

/// NDP as ARP: answers to forged IPv6 LAN sources wait for neighbour
/// solicitations nobody answers, and hold the buffer as long.
#[test]
fn ipv6_answers_waiting_for_forged_neighbours_cannot_starve_a_real_device() {
    forged_neighbours_in(&ipv6_gateway(), format!("[{LISTEN6}]:53").parse().unwrap(), DEVICE6);
}

#[test]
fn ipv6_hijacked_answers_waiting_for_forged_neighbours_cannot_starve_a_real_device() {
    forged_neighbours_in(&ipv6_gateway(), format!("[{PUBLIC6}]:53").parse().unwrap(), DEVICE6);
}

#[test]
fn ipv6_answers_to_a_client_behind_a_router_are_not_held_back() {
    forged_neighbours_in(&ipv6_gateway(), format!("[{LISTEN6}]:53").parse().unwrap(), ROUTED6);
}

#[test]
fn ipv6_hijacked_answers_to_a_client_behind_a_router_are_not_held_back() {
    forged_neighbours_in(&ipv6_gateway(), format!("[{PUBLIC6}]:53").parse().unwrap(), ROUTED6);
}

/// Addresses a hostile device held long enough for tproxyd to remember
/// them as devices, and then left: the first 40 [`forged_sources`] of
/// `to`'s family. The device holds them (answers ARP and NDP for them) and
/// asks from them for 16 s, past tproxyd's idle reading of the neighbour
/// table; then it gives them up, and their entries are dropped (as the
/// kernel's forced garbage collection does; here by hand). Answers to
/// them go, while a buffer is past half, at the slow pace kept for
/// devices the kernel has dropped.
fn departed_devices(lab: &Lab, to: SocketAddr) -> Vec<IpAddr> {
    let addrs: Vec<IpAddr> = forged_sources(to).take(40).collect();
    let family = if to.is_ipv4() { "-4" } else { "-6" };
    for a in &addrs {
        let nodad = if a.is_ipv6() { "nodad" } else { "" };
        lab.client.sh(&format!(
            "ip {family} addr add {a}/{} dev lan0 {nodad}",
            if a.is_ipv4() { 32 } else { 128 }
        ));
    }
    let few: Vec<String> = forged_names().into_iter().take(2).collect();
    let held: Vec<_> = addrs
        .iter()
        .map(|&a| lab::udp::socket(&lab.client, SocketAddr::new(a, 0)))
        .collect();
    let until = std::time::Instant::now() + Duration::from_secs(16);
    while std::time::Instant::now() < until {
        for s in &held {
            send_all(s, to, &few);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for a in &addrs {
        let len = if a.is_ipv4() { 32 } else { 128 };
        lab.client.sh(&format!("ip {family} addr del {a}/{len} dev lan0"));
        lab.gateway.sh(&format!("ip {family} neigh del {a} dev lan0 || true"));
    }
    std::thread::sleep(Duration::from_millis(500));
    addrs
}

/// [`departed_devices`] ask, in one burst (tproxyd stopped while the
/// queries queue), 20 times each for `names`: the answers to one address
/// are one run in the relay's batch. Right after, the real device asks
/// its 20 names: all must be answered. When the pace of answers to
/// dropped devices counted answers, and one count let a whole run go (a
/// GSO train among it), the bursts filled the reply socket's buffer: the
/// device got 0 of 20 answers, `send_buffer_full` 262 to 412 (IPv4, 3 of
/// 3 runs) and 163 (IPv6 with answers of some 450 bytes, 2 of 2).
fn departed_burst(to: SocketAddr, names: Vec<String>) {
    let gw = Gateway::start();
    let departed = departed_devices(&gw.lab, to);
    assert_eq!(ask(&gw.lab, to, &names), names.len());
    let socks: Vec<_> = departed.iter().map(|&a| forged_socket(&gw.lab, a)).collect();
    forged_then_asked(&gw, to, device_for(to), |gw, _| {
        gw.daemon.signal(nix::sys::signal::Signal::SIGSTOP);
        for s in &socks {
            for _ in 0..20 {
                send_all(s, to, &names);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
        gw.daemon.signal(nix::sys::signal::Signal::SIGCONT);
        std::thread::sleep(Duration::from_millis(300));
    });
}

#[test]
fn hijacked_answers_to_departed_devices_in_one_burst_cannot_starve_a_real_device() {
    departed_burst(format!("{PUBLIC}:53").parse().unwrap(), forged_names());
}

#[test]
fn ipv6_hijacked_answers_to_departed_devices_in_one_burst_cannot_starve_a_real_device() {
    // 16 names of some 200 characters: answers of some 450 bytes.
    let long = (0..16)
        .map(|i| {
            format!(
                "{}.{}.{}.l{i}.forged.test.",
                "a".repeat(60),
                "b".repeat(60),
                "c".repeat(60)
            )
        })
        .collect();
    departed_burst(format!("[{PUBLIC6}]:53").parse().unwrap(), long);
}
