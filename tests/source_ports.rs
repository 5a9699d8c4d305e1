//! Source ports of relayed flows, in the namespace lab (README, "Security
//! notes", "Source ports of relayed flows").
//!
//! Symmetric flows share pool sockets, and a remote's first flow takes the
//! pool's first socket: a LAN device that sends one datagram to a server of
//! its own learns the port the next flow to any other remote leaves from.
//! A LAN resolver asking authoritative servers through the relay counts on
//! its query's source port (RFC 5452), so flows to `relay.own_socket_ports`
//! (default `[53]`) each leave from a socket of their own, on a port the
//! kernel picks, that only their destination can answer. No `[dns]`
//! section here: the relay carries port 53 like any UDP.

mod lab;

use hickory_proto::rr::RecordType;
use lab::fake_dns::query_bytes;
use lab::flood::{metric, scrape};
use lab::udp::{Echo, exchange, recv, socket};
use lab::{CLIENT4, CLIENT6, Lab, gateway_wan4, gateway_wan6, sa, server4, server6};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

/// Queries from as many client ports to one name server.
const QUERIES: u16 = 40;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn admin() -> SocketAddr {
    "127.0.0.1:9153".parse().unwrap()
}

fn config(relay_extra: &str) -> String {
    format!(
        "mark = 255\n[admin]\nlisten = \"{}\"\n[relay]\nlisten = [\"0.0.0.0:15353\", \"[::]:15353\"]\n{relay_extra}\n",
        admin()
    )
}

fn gauge(lab: &Lab, name: &str) -> u64 {
    scrape(&lab.gateway, admin(), Duration::from_secs(5))
        .and_then(|page| metric(&page, &format!("tproxyd_{name}")))
        .unwrap_or_else(|| panic!("no {name} on /metrics"))
}

/// The lab's addresses of one family: (client, name server, stranger,
/// the gateway's WAN address).
fn family(v6: bool) -> (IpAddr, IpAddr, IpAddr, IpAddr) {
    if v6 {
        (ip(CLIENT6), server6(0), ip("2001:db8:66::66"), gateway_wan6(0))
    } else {
        (ip(CLIENT4), server4(0), ip("203.0.113.66"), gateway_wan4(0))
    }
}

/// A query for a name of its own, as a resolver would send it.
fn query(i: u16) -> Vec<u8> {
    query_bytes(0x1000 + i, &format!("q{i}.rarely-asked.example."), RecordType::A)
}

/// The client sends one datagram to a stranger of its own, who notes the
/// gateway's source port; then [`QUERIES`] queries from as many client
/// ports to the name server, each answered from the address it was sent
/// to. Returns the learnt port and each query's source port at the name
/// server.
fn learn_then_query(lab: &Lab, v6: bool, client_port: u16) -> (u16, Vec<u16>) {
    let (client, ns_ip, stranger_ip, wan) = family(v6);
    lab.add_server_address(0, stranger_ip);
    let stranger = Echo::start(&lab.servers[0], sa(stranger_ip, 9999));
    let ns = Echo::start(&lab.servers[0], sa(ns_ip, 53));
    let sock = socket(&lab.client, sa(client, client_port));
    exchange(&sock, stranger.addr, b"what is my port?");
    let learnt = stranger.last_peer();
    assert_eq!(learnt.ip(), wan, "the stranger saw the gateway");
    for i in 0..QUERIES {
        let s = socket(&lab.client, sa(client, client_port + 1 + i));
        let q = query(i);
        let (from, answer) = exchange(&s, ns.addr, &q);
        assert_eq!(from, ns.addr, "the answer comes from the address asked");
        assert_eq!(answer, q);
    }
    let ports = ns.received().iter().map(|(from, _)| from.port()).collect();
    (learnt.port(), ports)
}

/// The README's measurement, as a test: none of 40 queries leaves from the
/// port a stranger learnt, and no two leave from the same port.
#[test]
fn no_query_leaves_from_a_port_a_stranger_learnt() {
    for v6 in [false, true] {
        let lab = Lab::new();
        lab.install_rules("nft", "LAN_IF=lan0");
        let daemon = lab.start_tproxyd(&config(""));
        let (learnt, ports) = learn_then_query(&lab, v6, 40_000);
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        let from_learnt = ports.iter().filter(|&&p| p == learnt).count();
        let family = if v6 { "IPv6" } else { "IPv4" };
        eprintln!(
            "{family}: {} queries, {} distinct source ports, {from_learnt} from the learnt port {learnt}",
            ports.len(),
            distinct.len()
        );
        assert_eq!(ports.len(), usize::from(QUERIES), "{family}");
        assert_eq!(
            from_learnt, 0,
            "{family}: {from_learnt} of {QUERIES} queries left from the port the stranger learnt ({learnt})"
        );
        assert_eq!(
            distinct.len(),
            usize::from(QUERIES),
            "{family}: queries shared source ports"
        );
        let stopped = daemon.stop();
        assert_eq!(stopped.counter("sessions_opened"), 1 + u64::from(QUERIES), "{family}");
    }
}

/// A flow on a socket of its own is still symmetric: whoever learns its
/// port (the name server's operator, or anyone on the path) cannot reach
/// the client through it, neither from another address nor from another
/// port of the same one; only its destination answers, spoofed as the
/// address the client asked.
#[test]
fn only_its_destination_reaches_a_flow_on_a_socket_of_its_own() {
    for v6 in [false, true] {
        let lab = Lab::new();
        lab.install_rules("nft", "LAN_IF=lan0");
        let daemon = lab.start_tproxyd(&config(""));
        let (client, ns_ip, stranger_ip, _) = family(v6);
        lab.add_server_address(0, stranger_ip);
        let ns = Echo::start(&lab.servers[0], sa(ns_ip, 53));
        let sock = socket(&lab.client, sa(client, 40_000));
        exchange(&sock, ns.addr, &query(1));
        let mapping = ns.last_peer();
        assert_eq!(gauge(&lab, "own_sockets"), 1, "the query has a socket of its own");
        let stranger = socket(&lab.servers[0], sa(stranger_ip, 53));
        let next_door = socket(&lab.servers[0], sa(ns_ip, 54));
        for i in 0..3 {
            stranger.send_to(format!("forged {i}").as_bytes(), mapping).unwrap();
            next_door.send_to(format!("next door {i}").as_bytes(), mapping).unwrap();
        }
        sock.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
        let mut reached = Vec::new();
        while let Some((from, data)) = recv(&sock) {
            reached.push((from, String::from_utf8_lossy(&data).into_owned()));
        }
        assert!(reached.is_empty(), "others reached the client: {reached:?}");
        // The destination itself still answers, on the same mapping.
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let (from, answer) = exchange(&sock, ns.addr, &query(2));
        assert_eq!((from, answer), (ns.addr, query(2)));
        assert_eq!(ns.last_peer(), mapping);
        drop(daemon);
    }
}

/// How many times the daemon's log says `needle`.
fn times_logged(daemon: &lab::Daemon, needle: &str) -> usize {
    daemon.log_text().matches(needle).count()
}

/// Rewrites the config and reloads; waits for the reload to be done.
fn reload(daemon: &lab::Daemon, config: &str) {
    let before = times_logged(daemon, "configuration reloaded");
    std::fs::write(&daemon.config, config).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while times_logged(daemon, "configuration reloaded") == before {
        assert!(Instant::now() < deadline, "no reload:\n{}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A reload that changes `relay.own_socket_ports` leaves the flows open
/// as they are (each keeps its socket and mapping) and decides new flows
/// by the new setting.
#[test]
fn a_reload_changes_new_flows_and_leaves_open_ones_their_sockets() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(""));
    let (client, ns_ip, stranger_ip, _) = family(false);
    lab.add_server_address(0, stranger_ip);
    let stranger = Echo::start(&lab.servers[0], sa(stranger_ip, 9999));
    let ns = Echo::start(&lab.servers[0], sa(ns_ip, 53));
    let ntp = Echo::start(&lab.servers[0], sa(ns_ip, 123));
    let open = |port: u16| socket(&lab.client, sa(client, port));
    let (pooled, before, after) = (open(40_000), open(40_001), open(40_002));
    exchange(&pooled, stranger.addr, b"hello");
    let learnt = stranger.last_peer().port();
    exchange(&before, ns.addr, &query(1));
    let own_mapping = ns.last_peer();
    assert_ne!(own_mapping.port(), learnt);

    reload(&daemon, &config("own_socket_ports = [123]\n"));
    // The open flow keeps its socket and is still answered there.
    let (from, _) = exchange(&before, ns.addr, &query(2));
    assert_eq!(from, ns.addr);
    assert_eq!(ns.last_peer(), own_mapping, "the open flow kept its socket");
    // A new query takes the pool: the first socket, the learnt port.
    exchange(&after, ns.addr, &query(3));
    assert_eq!(ns.last_peer().port(), learnt, "port 53 is off the list now");
    // Port 123 is on it: its flow has a socket of its own.
    exchange(&after, ntp.addr, b"time?");
    assert_ne!(ntp.last_peer().port(), learnt);
    assert_eq!(gauge(&lab, "own_sockets"), 2, "the old query's and the new NTP flow's");
    drop(daemon);
}

/// One LAN device that opens hundreds of port-53 flows, each a descriptor,
/// stays within the descriptor budget: at the budget its own oldest flows
/// give their sockets to its new ones, another device's flows (pooled and
/// own) keep their mappings, and that device's new query still gets a
/// socket.
#[test]
fn a_device_opening_hundreds_of_queries_stays_within_the_descriptor_budget() {
    const FLOWS: u16 = 700;
    const BUDGET: u64 = 600;
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let other = ip("192.0.2.11");
    lab.add_client_address(other);
    let daemon = lab.start_tproxyd(&config(&format!(
        "fd_budget = {BUDGET}\nfd_reserve = 100\nnew_flows_per_client = 0\n"
    )));
    let limit = gauge(&lab, "flow_sockets_limit");
    assert!(limit < u64::from(FLOWS), "the flood must reach the budget: {limit}");
    let ns = Echo::start(&lab.servers[0], sa(server4(0), 53));
    let game = Echo::start(&lab.servers[0], sa(server4(0), 6000));
    // The other device's flows, before the flood.
    let quiet_query = socket(&lab.client, sa(other, 30_000));
    let quiet_game = socket(&lab.client, sa(other, 30_001));
    exchange(&quiet_query, ns.addr, &query(1));
    let query_mapping = ns.last_peer();
    exchange(&quiet_game, game.addr, b"tick");
    let game_mapping = game.last_peer();

    let busy: IpAddr = CLIENT4.parse().unwrap();
    let sockets: Vec<UdpSocket> = (0..FLOWS).map(|i| socket(&lab.client, sa(busy, 20_000 + i))).collect();
    let mut answered = 0;
    let mut fds = 0;
    for (n, chunk) in sockets.chunks(50).enumerate() {
        for (k, s) in chunk.iter().enumerate() {
            s.send_to(&query((n * 50 + k) as u16), ns.addr).unwrap();
        }
        for (k, s) in chunk.iter().enumerate() {
            // One retry: a datagram may die in a full queue on a busy machine.
            let got = recv(s).is_some() || {
                s.send_to(&query((n * 50 + k) as u16), ns.addr).unwrap();
                recv(s).is_some()
            };
            answered += usize::from(got);
        }
        fds = fds.max(gauge(&lab, "open_fds"));
    }
    let own = gauge(&lab, "own_sockets");
    let held = gauge(&lab, "flow_sockets");
    eprintln!(
        "{FLOWS} queries from one device: {answered} answered, at most {fds} descriptors open, \
         {own} own sockets and {held} flow sockets held at the end (limit {limit})"
    );
    assert!(fds <= BUDGET, "{fds} descriptors open, budget {BUDGET}");
    assert!(
        own <= limit && held <= limit,
        "{own} own sockets, {held} held, limit {limit}"
    );
    // At the budget a new flow takes an old one's descriptor, and is
    // answered: not refused until the next sweep.
    assert!(
        answered >= usize::from(FLOWS) * 95 / 100,
        "only {answered} of {FLOWS} queries answered"
    );
    // The other device's flows kept their sockets, and its new query gets one.
    exchange(&quiet_query, ns.addr, &query(2));
    assert_eq!(
        ns.last_peer(),
        query_mapping,
        "the other device's query lost its socket"
    );
    exchange(&quiet_game, game.addr, b"tock");
    assert_eq!(
        game.last_peer(),
        game_mapping,
        "the other device's game flow lost its socket"
    );
    let fresh = socket(&lab.client, sa(other, 30_002));
    let (from, _) = exchange(&fresh, ns.addr, &query(3));
    assert_eq!(from, ns.addr);
    let stopped = daemon.stop();
    assert!(stopped.counter("sessions_evicted_budget") > 0, "{}", stopped.log);
    assert_eq!(stopped.counter("drop_fd_budget"), 0, "{}", stopped.log);
}

/// Sends `payload` to `to` and waits for one datagram back, sending once
/// more if none came (a datagram may die in a full queue on a busy
/// machine); `None` if neither was answered.
fn ask(sock: &UdpSocket, to: SocketAddr, payload: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
    (0..2).find_map(|_| {
        sock.send_to(payload, to).unwrap();
        recv(sock)
    })
}

/// A LAN device whose oldest flows are pooled (they hold no descriptor of
/// their own) and whose newer ones each hold one fills the descriptor
/// budget; another device's new query (a socket of its own) and new
/// full-cone flow still open. The descriptor comes from the busy device's
/// oldest flow that holds one: ending a pooled flow would free nothing and
/// leave the other device refused.
#[test]
fn a_device_whose_oldest_flows_are_pooled_cannot_keep_another_from_a_descriptor() {
    const POOLED: u16 = 30;
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let other = ip("192.0.2.11");
    lab.add_client_address(other);
    let daemon = lab.start_tproxyd(&config(
        "fd_budget = 600\nfd_reserve = 100\nnew_flows_per_client = 0\nidle_timeout = \"5m\"\n\
         own_socket_idle_timeout = \"5m\"\n[[relay.rules]]\nclients = [\"192.0.2.11/32\"]\n\
         ports = [7100]\naction = \"direct\"\nnat = \"full-cone\"\n",
    ));
    let limit = gauge(&lab, "flow_sockets_limit");
    let ns = Echo::start(&lab.servers[0], sa(server4(0), 53));
    let cone_server = Echo::start(&lab.servers[0], sa(server4(0), 7100));
    let games: Vec<Echo> = (0..POOLED)
        .map(|i| Echo::start(&lab.servers[0], sa(server4(0), 6000 + i)))
        .collect();
    let busy: IpAddr = CLIENT4.parse().unwrap();
    // The busy device's oldest flows: pooled, one socket for them all.
    let pooled: Vec<UdpSocket> = (0..POOLED).map(|i| socket(&lab.client, sa(busy, 21_000 + i))).collect();
    for (s, game) in pooled.iter().zip(&games) {
        assert!(ask(s, game.addr, b"tick").is_some(), "pooled flow to {}", game.addr);
    }
    // Then queries, each a descriptor, until the budget is full.
    let mut queries = Vec::new();
    let mut port = 22_000;
    for _ in 0..5 {
        let held = gauge(&lab, "flow_sockets");
        if held >= limit {
            break;
        }
        for _ in held..limit {
            let s = socket(&lab.client, sa(busy, port));
            s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
            s.send_to(&query(port), ns.addr).unwrap();
            queries.push(s);
            port += 1;
        }
        // Each answered at once; a lost one costs the timeout.
        for s in &queries[queries.len() - (limit - held) as usize..] {
            recv(s);
        }
    }
    let held = gauge(&lab, "flow_sockets");
    assert_eq!(held, limit, "the busy device filled the budget");
    // The other device's new query and new full-cone flow.
    let quiet_query = socket(&lab.client, sa(other, 30_000));
    let answered = ask(&quiet_query, ns.addr, &query(1));
    let quiet_cone = socket(&lab.client, sa(other, 30_001));
    let coned = ask(&quiet_cone, cone_server.addr, b"open");
    let stopped = daemon.stop();
    eprintln!(
        "limit {limit}; other device: query answered {}, full cone answered {}; \
         {} budget evictions, {} refused at the budget",
        answered.is_some(),
        coned.is_some(),
        stopped.counter("sessions_evicted_budget"),
        stopped.counter("drop_fd_budget"),
    );
    assert_eq!(
        answered.map(|(from, _)| from),
        Some(ns.addr),
        "the other device's query was refused at the budget: {}",
        stopped.log
    );
    assert_eq!(
        coned.map(|(from, _)| from),
        Some(cone_server.addr),
        "the other device's full-cone flow was refused at the budget"
    );
    assert_eq!(stopped.counter("drop_fd_budget"), 0);
}

/// A rule that redirects port-5353 queries to a resolver's port 53: the
/// flows leave towards port 53, where a spoofer who knew their source port
/// could answer for the resolver, so each gets a socket of its own like a
/// query sent to port 53 directly (`relay.own_socket_ports` counts the
/// port a redirect sends to as well as the one the client wrote to).
#[test]
fn queries_redirected_to_port_53_each_get_a_socket_of_their_own() {
    const REDIRECTED: u16 = 10;
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let (client, ns_ip, stranger_ip, wan) = family(false);
    let resolver = sa(ns_ip, 53);
    let daemon = lab.start_tproxyd(&config(&format!(
        "[[relay.rules]]\nports = [5353]\naction = \"redirect\"\nto = \"{resolver}\"\n"
    )));
    lab.add_server_address(0, stranger_ip);
    let stranger = Echo::start(&lab.servers[0], sa(stranger_ip, 9999));
    let ns = Echo::start(&lab.servers[0], resolver);
    let sock = socket(&lab.client, sa(client, 40_000));
    exchange(&sock, stranger.addr, b"what is my port?");
    let learnt = stranger.last_peer();
    assert_eq!(learnt.ip(), wan, "the stranger saw the gateway");
    let asked = sa(ns_ip, 5353);
    let mut ports = Vec::new();
    for i in 0..REDIRECTED {
        let s = socket(&lab.client, sa(client, 40_001 + i));
        let (from, _) = exchange(&s, asked, &query(i));
        assert_eq!(from, asked, "the reply comes from the address the client asked");
        ports.push(ns.last_peer().port());
    }
    let own = gauge(&lab, "own_sockets");
    drop(daemon);
    let distinct: HashSet<u16> = ports.iter().copied().collect();
    eprintln!(
        "learnt {}; redirected queries left from {ports:?}; {own} own sockets",
        learnt.port()
    );
    assert_eq!(
        own,
        u64::from(REDIRECTED),
        "each redirected query has a socket of its own"
    );
    assert!(!ports.contains(&learnt.port()), "a query left from the learnt port");
    assert_eq!(distinct.len(), ports.len(), "two queries shared a source port");
}
