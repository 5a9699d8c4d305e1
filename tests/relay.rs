//! End-to-end tests of the transparent UDP relay, in the namespace lab.

mod lab;

use lab::udp::{Echo, exchange, recv, socket};
use lab::{CLIENT4, CLIENT6, Lab, gateway_wan4, gateway_wan6, sa, server4, server6};
use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

fn config(relay_extra: &str) -> String {
    format!("mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\", \"[::]:15353\"]\n{relay_extra}\n")
}

fn client4(port: u16) -> SocketAddr {
    sa(CLIENT4.parse().unwrap(), port)
}

fn client6(port: u16) -> SocketAddr {
    sa(CLIENT6.parse().unwrap(), port)
}

/// Client → gateway → server and back; checks what a user would check.
fn assert_echo_is_transparent(lab: &Lab, client: SocketAddr, server: SocketAddr, gateway_wan: IpAddr) {
    let echo = Echo::start(&lab.servers[0], server);
    let sock = socket(&lab.client, client);
    let (from, reply) = exchange(&sock, server, b"ping through tproxyd");
    assert_eq!(reply, b"ping through tproxyd");
    assert_eq!(from, server, "the reply must come from the original destination");
    let seen = echo.last_peer();
    assert_eq!(
        seen.ip(),
        gateway_wan,
        "the server must see the gateway, not the client"
    );
    assert_ne!(
        seen.port(),
        client.port(),
        "the gateway's upstream socket has its own port"
    );
}

#[test]
fn ipv4_echo_reply_comes_from_the_original_destination() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(""));
    assert_echo_is_transparent(&lab, client4(40000), sa(server4(0), 7000), gateway_wan4(0));
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert_eq!(stopped.counter("sessions_opened"), 1);
    assert_eq!(stopped.counter("upstream_datagrams"), 1);
    assert_eq!(stopped.counter("reply_datagrams"), 1);
}

#[test]
fn ipv6_echo_reply_comes_from_the_original_destination() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let _daemon = lab.start_tproxyd(&config(""));
    assert_echo_is_transparent(&lab, client6(40000), sa(server6(0), 7000), gateway_wan6(0));
}

#[test]
fn iptables_script_redirects_both_families_too() {
    let lab = Lab::new();
    lab.install_rules("iptables", "LAN_IF=lan0");
    let _daemon = lab.start_tproxyd(&config(""));
    assert_echo_is_transparent(&lab, client4(40001), sa(server4(0), 7001), gateway_wan4(0));
    assert_echo_is_transparent(&lab, client6(40001), sa(server6(0), 7001), gateway_wan6(0));
}

#[test]
fn without_tproxyd_captured_traffic_fails_closed() {
    // The control experiment: rules installed but no daemon. Captured UDP
    // must not leak past the proxy (a DNS hijack that fails open is no
    // hijack), and no reply can come back. Both rule flavours behave alike.
    for flavour in ["nft", "iptables"] {
        let lab = Lab::new();
        lab.install_rules(flavour, "LAN_IF=lan0");
        let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
        let sock = socket(&lab.client, client4(40000));
        sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
        sock.send_to(b"x", sa(server4(0), 7000)).unwrap();
        assert!(recv(&sock).is_none(), "{flavour}");
        assert!(
            echo.received().is_empty(),
            "{flavour}: the datagram leaked past the proxy"
        );
    }
}

#[test]
fn udp_ports_captures_the_listed_ports_and_forwards_the_others_untouched() {
    // Both scripts check the port first and return at once for a port
    // they do not capture; that order must not change what is captured:
    // a listed port and one inside a listed range go through tproxyd,
    // another port is forwarded by the kernel as if tproxyd were not
    // there.
    for flavour in ["nft", "iptables"] {
        let lab = Lab::new();
        // A route back to the client for the forwarded datagram's echo.
        lab.servers[0].sh(&format!("ip route replace default via {}", gateway_wan4(0)));
        lab.install_rules(flavour, "LAN_IF=lan0 FAMILIES=4 UDP_PORTS=7000,7100-7110");
        let daemon = lab.start_tproxyd(&config(""));
        assert_echo_is_transparent(&lab, client4(40000), sa(server4(0), 7000), gateway_wan4(0));
        assert_echo_is_transparent(&lab, client4(40001), sa(server4(0), 7105), gateway_wan4(0));
        let server = sa(server4(0), 7200);
        let echo = Echo::start(&lab.servers[0], server);
        let sock = socket(&lab.client, client4(40002));
        let (from, reply) = exchange(&sock, server, b"not captured");
        assert_eq!((from, reply.as_slice()), (server, &b"not captured"[..]), "{flavour}");
        assert_eq!(
            echo.last_peer(),
            client4(40002),
            "{flavour}: a port outside UDP_PORTS is forwarded with the client's own address"
        );
        let stopped = daemon.stop();
        assert!(stopped.status.success(), "{flavour}: {}", stopped.log);
        assert_eq!(stopped.counter("sessions_opened"), 2, "{flavour}: {}", stopped.log);
    }
}

/// The IPv6 side of the port-first check, at the edges of a listed
/// range: the range's first and last ports are captured, the ports just
/// outside it and an unlisted one are forwarded by the kernel with the
/// client's own address; IPv4 and IPv6 share the one port set.
#[test]
fn udp_ports_on_ipv6_captures_a_ranges_edges_and_forwards_the_ports_beside_it() {
    let lab = Lab::new();
    lab.servers[0].sh(&format!(
        "ip route replace default via {} && ip -6 route replace default via {}",
        gateway_wan4(0),
        gateway_wan6(0)
    ));
    lab.install_rules("nft", "LAN_IF=lan0 UDP_PORTS=7000,7100-7110");
    let daemon = lab.start_tproxyd(&config(""));
    for (i, port) in [7100u16, 7110].into_iter().enumerate() {
        assert_echo_is_transparent(&lab, client6(41000 + i as u16), sa(server6(0), port), gateway_wan6(0));
    }
    for (i, port) in [7099u16, 7111, 7200].into_iter().enumerate() {
        let server = sa(server6(0), port);
        let echo = Echo::start(&lab.servers[0], server);
        let client = client6(42000 + i as u16);
        let sock = socket(&lab.client, client);
        let (from, reply) = exchange(&sock, server, b"not captured");
        assert_eq!((from, reply.as_slice()), (server, &b"not captured"[..]));
        assert_eq!(
            echo.last_peer(),
            client,
            "port {port}, outside UDP_PORTS, must be forwarded with the client's own address"
        );
    }
    // The same set holds for IPv4 in the same table.
    assert_echo_is_transparent(&lab, client4(43000), sa(server4(0), 7000), gateway_wan4(0));
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert_eq!(stopped.counter("sessions_opened"), 3, "{}", stopped.log);
}

#[test]
fn two_hundred_concurrent_flows_stay_apart() {
    let lab = Lab::new();
    let extra: Vec<IpAddr> = vec!["203.0.113.20".parse().unwrap(), "203.0.113.21".parse().unwrap()];
    for ip in &extra {
        lab.add_server_address(0, *ip);
    }
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(""));
    let servers = [
        sa(server4(0), 7000),
        sa(server4(0), 7001),
        sa(extra[0], 5000),
        sa(extra[1], 27015),
    ];
    let echoes: Vec<Echo> = servers.iter().map(|s| Echo::start(&lab.servers[0], *s)).collect();
    let clients: Vec<_> = (0..200u16).map(|i| socket(&lab.client, client4(41000 + i))).collect();
    // Send everything first so the flows really are concurrent.
    for (i, c) in clients.iter().enumerate() {
        let payload = format!("flow {i}");
        c.send_to(payload.as_bytes(), servers[i % servers.len()]).unwrap();
    }
    for (i, c) in clients.iter().enumerate() {
        let (from, reply) = recv(c).unwrap_or_else(|| panic!("flow {i} got no reply"));
        assert_eq!(from, servers[i % servers.len()], "flow {i}: wrong source");
        assert_eq!(reply, format!("flow {i}").as_bytes(), "flow {i}: someone else's reply");
        c.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        assert!(recv(c).is_none(), "flow {i} received a second datagram");
    }
    // Each server saw 50 distinct gateway ports, one per flow.
    for e in &echoes {
        let ports: HashSet<u16> = e.received().iter().map(|(p, _)| p.port()).collect();
        assert_eq!(e.received().len(), 50, "{}", e.addr);
        assert_eq!(ports.len(), 50, "{}: flows shared an upstream socket", e.addr);
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("sessions_opened"), 200);
    assert_eq!(stopped.counter("sessions_evicted"), 0);
}

fn assert_big_datagram_round_trip(lab: &Lab, client: SocketAddr, server: SocketAddr) {
    let echo = Echo::start(&lab.servers[0], server);
    let sock = socket(&lab.client, client);
    let payload: Vec<u8> = (0..65_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let (from, reply) = exchange(&sock, server, &payload);
    assert_eq!(from, server);
    assert_eq!(reply.len(), payload.len());
    assert!(reply == payload, "the 65,000-byte reply was altered");
    let (_, upstream_copy) = echo.received().pop().unwrap();
    assert!(
        upstream_copy == payload,
        "the 65,000-byte datagram was altered on the way up"
    );
}

#[test]
fn a_65000_byte_datagram_is_relayed_intact_both_ways() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let _daemon = lab.start_tproxyd(&config(""));
    assert_big_datagram_round_trip(&lab, client4(40002), sa(server4(0), 7002));
    assert_big_datagram_round_trip(&lab, client6(40002), sa(server6(0), 7002));
}

#[test]
fn replies_are_spoofed_even_when_a_local_process_holds_the_wildcard_port() {
    // A local service on the gateway (think dnsmasq on 0.0.0.0:53) holds the
    // port without SO_REUSEADDR, so tproxyd cannot bind the reply socket and
    // must fall back to raw IP, including for datagrams that need fragmenting.
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    // A dual-stack wildcard socket: holds the port for IPv4 and IPv6.
    let _holder = socket(&lab.gateway, "[::]:7003".parse().unwrap());
    let daemon = lab.start_tproxyd(&config(""));
    assert_echo_is_transparent(&lab, client4(40003), sa(server4(0), 7003), gateway_wan4(0));
    assert_echo_is_transparent(&lab, client6(40003), sa(server6(0), 7003), gateway_wan6(0));
    assert_big_datagram_round_trip(&lab, client4(40004), sa(server4(0), 7003));
    assert_big_datagram_round_trip(&lab, client6(40004), sa(server6(0), 7003));
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("reply_raw_fallbacks"), 2, "{}", stopped.log);
    assert_eq!(stopped.counter("reply_send_errors"), 0);
}

#[test]
fn a_full_table_evicts_the_least_recently_used_flow() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config("session_capacity = 4\nmax_sessions_per_client = 4"));
    let server = sa(server4(0), 7000);
    let echo = Echo::start(&lab.servers[0], server);
    let clients: Vec<_> = (0..6u16).map(|i| socket(&lab.client, client4(42000 + i))).collect();
    let mut upstream_port = Vec::new();
    let talk = |i: usize| -> u16 {
        let (from, _) = exchange(&clients[i], server, format!("c{i}").as_bytes());
        assert_eq!(from, server);
        echo.last_peer().port()
    };
    // Flows 0-3 fill the table; touching 0 makes 1 the least recently used.
    for i in 0..4 {
        upstream_port.push(talk(i));
    }
    assert_eq!(talk(0), upstream_port[0], "flow 0 is still live");
    // Flows 4 and 5 evict the two least recently used: 1 and 2.
    upstream_port.push(talk(4));
    upstream_port.push(talk(5));
    // Survivors keep their upstream socket (same port at the server)...
    for i in [0, 3, 4, 5] {
        assert_eq!(talk(i), upstream_port[i], "flow {i} should have survived");
    }
    // ...evicted flows get a new one.
    for i in [1, 2] {
        assert_ne!(talk(i), upstream_port[i], "flow {i} should have been evicted");
    }
    let stopped = daemon.stop();
    // 2 evictions for flows 4-5, then 2 more when flows 1-2 came back.
    assert_eq!(stopped.counter("sessions_evicted"), 4);
    assert_eq!(stopped.counter("sessions_opened"), 8);
}

#[test]
fn an_idle_flow_expires_and_inbound_traffic_keeps_a_flow_alive() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config("idle_timeout = \"1s\""));
    let server = sa(server4(0), 7000);
    let echo = Echo::start(&lab.servers[0], server);

    // A flow that goes quiet in both directions is closed...
    let quiet = socket(&lab.client, client4(43000));
    exchange(&quiet, server, b"hello");
    // ...while one whose server keeps talking (a game server streaming
    // state to a silent player) is not.
    let listener = socket(&lab.client, client4(43001));
    exchange(&listener, server, b"subscribe");
    let streaming = echo.last_peer();
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(250));
        echo.send_to(b"state", streaming);
        let (from, data) = recv(&listener).expect("server push should reach the client");
        assert_eq!((from, data.as_slice()), (server, &b"state"[..]));
    }
    // 2 s have passed: the quiet flow is gone (its next datagram opens a
    // new session), the streaming one is not.
    exchange(&quiet, server, b"hello again");
    exchange(&listener, server, b"still there");
    assert_eq!(echo.last_peer(), streaming, "inbound traffic must keep the flow alive");

    let stopped = daemon.stop();
    // Exactly one expiry (the quiet flow) and three openings (quiet,
    // streaming, quiet again): had the streaming flow expired, both
    // counts would be one higher.
    assert_eq!(stopped.counter("sessions_expired"), 1, "{}", stopped.log);
    assert_eq!(stopped.counter("sessions_opened"), 3);
}

#[test]
fn local_mode_does_not_loop_thanks_to_the_mark() {
    // The gateway's own traffic (local mode: OUTPUT rerouted through lo) is
    // the case where an unmarked upstream socket would be captured again and
    // again. The server must see exactly one copy of each datagram.
    let lab = Lab::new();
    lab.install_rules("nft", "LOCAL=1");
    let daemon = lab.start_tproxyd(&config(""));
    let server = sa(server4(0), 7000);
    let echo = Echo::start(&lab.servers[0], server);
    let local_client = socket(&lab.gateway, sa(gateway_wan4(0), 44000));
    for i in 0..5 {
        let msg = format!("local {i}");
        let (from, reply) = exchange(&local_client, server, msg.as_bytes());
        assert_eq!((from, reply), (server, msg.clone().into_bytes()));
    }
    std::thread::sleep(Duration::from_millis(200));
    let got = echo.received();
    assert_eq!(
        got.len(),
        5,
        "the server must receive each datagram exactly once: {got:?}"
    );
    assert!(
        got.iter().all(|(p, _)| p.port() != 44000),
        "the datagrams went through tproxyd"
    );
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("sessions_opened"), 1, "{}", stopped.log);
    assert_eq!(stopped.counter("upstream_datagrams"), 5);
}

#[test]
fn unreachable_servers_are_counted_and_do_not_stop_the_daemon() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(""));
    // Nobody listens on port 9: the server's kernel answers ICMP port
    // unreachable to the gateway's upstream socket.
    let sock = socket(&lab.client, client4(45000));
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    for _ in 0..3 {
        sock.send_to(b"anyone?", sa(server4(0), 9)).unwrap();
        assert!(recv(&sock).is_none());
    }
    // An unroutable destination (no route from the gateway): the send fails.
    sock.send_to(b"lost", "203.0.113.99:9".parse::<SocketAddr>().unwrap())
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // The daemon still relays.
    assert_echo_is_transparent(&lab, client4(45001), sa(server4(0), 7000), gateway_wan4(0));
    let stopped = daemon.stop();
    assert!(stopped.status.success());
    // ICMP port unreachable, three times (read from the error queue).
    assert_eq!(stopped.counter("upstream_unreachable"), 3, "{}", stopped.log);
    assert_eq!(stopped.counter("upstream_send_errors"), 1, "{}", stopped.log);
}

#[test]
fn datagrams_sent_straight_to_the_listener_are_dropped_not_looped() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(""));
    let sock = socket(&lab.client, client4(46000));
    sock.send_to(b"direct", sa(lab::GATEWAY_LAN4.parse().unwrap(), 15353))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("drop_loop"), 1, "{}", stopped.log);
    assert_eq!(stopped.counter("sessions_opened"), 0);
}

#[test]
fn sigterm_exits_zero_and_leaves_no_socket_behind() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(""));
    let pid = daemon.pid();
    assert_echo_is_transparent(&lab, client4(47000), sa(server4(0), 7000), gateway_wan4(0));
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "exit status {}", stopped.status);
    assert!(stopped.log.contains("all sessions closed"), "{}", stopped.log);
    assert!(!stopped.log.contains("panicked"), "{}", stopped.log);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    // Nothing of tproxyd's is left in the gateway: the listener port can be
    // bound again at once, and ss lists no socket on it. The IPv4 socket is
    // held while the IPv6-only one binds: a socket closed just before could
    // live on for a moment in a child that another test thread is forking
    // (until its exec closes it), which would make a dual-stack bind fail
    // for a reason that is not tproxyd's.
    let ss = lab.gateway.sh("ss -uanH");
    assert!(!ss.contains(":15353"), "{ss}");
    let _v4 = socket(&lab.gateway, "0.0.0.0:15353".parse().unwrap());
    lab.gateway.enter(|| {
        let v6 = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).expect("IPv6 socket");
        v6.set_only_v6(true).expect("IPV6_V6ONLY");
        let addr: std::net::SocketAddr = "[::]:15353".parse().unwrap();
        v6.bind(&addr.into()).unwrap_or_else(|e| panic!("bind [::]:15353: {e}"));
    });
}

#[test]
fn flows_to_different_destinations_share_local_ports() {
    // Four ephemeral ports only: without sharing, the fifth flow would fail.
    let lab = Lab::new();
    lab.gateway.sh("sysctl -qw net.ipv4.ip_local_port_range='40000 40003'");
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(""));
    let a = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let b = Echo::start(&lab.servers[0], sa(server4(0), 7001));
    let clients: Vec<_> = (0..8u16).map(|i| socket(&lab.client, client4(48000 + i))).collect();
    for (i, c) in clients.iter().enumerate() {
        let server = if i % 2 == 0 { a.addr } else { b.addr };
        let (from, reply) = exchange(c, server, format!("flow {i}").as_bytes());
        assert_eq!((from, reply), (server, format!("flow {i}").into_bytes()));
    }
    let ports = |e: &Echo| -> HashSet<u16> { e.received().iter().map(|(p, _)| p.port()).collect() };
    assert_eq!(
        ports(&a),
        (40000..=40003).collect(),
        "four flows to A use the four ports"
    );
    assert_eq!(ports(&b), ports(&a), "the flows to B reuse the same four ports");
    // Every flow keeps its own replies on a second round.
    for (i, c) in clients.iter().enumerate() {
        let server = if i % 2 == 0 { a.addr } else { b.addr };
        assert_eq!(exchange(c, server, b"again").0, server);
    }
    // A fifth flow to A has no port left.
    let extra = socket(&lab.client, client4(48100));
    extra.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    extra.send_to(b"one too many", a.addr).unwrap();
    assert!(recv(&extra).is_none());
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("sessions_opened"), 8);
    assert_eq!(stopped.counter("drop_session_open_failed"), 1);
}

/// A new flow whose very first send is a GSO train (as a client that
/// batches its sends may start one): the whole train is held while the
/// flow is opened, then leaves in order, none of it lost.
#[test]
fn a_flow_that_starts_with_a_coalesced_train_loses_none_of_it() {
    use std::os::fd::AsRawFd;
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(""));
    let train: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 800]).collect();
    let run: Vec<&[u8]> = train.iter().map(Vec::as_slice).collect();
    for (client, server) in [
        (client4(40020), sa(server4(0), 7020)),
        (client6(40020), sa(server6(0), 7020)),
    ] {
        let rx = socket(&lab.servers[0], server);
        let tx = socket(&lab.client, client);
        let sent = tproxyd::net::send::send_run(tx.as_raw_fd(), &run, Some(server), None, server.is_ipv6()).unwrap();
        assert_eq!(sent, train.len());
        for (i, want) in train.iter().enumerate() {
            let (_, got) = recv(&rx).unwrap_or_else(|| panic!("{server}: datagram {i} of the first train was lost"));
            assert!(got == *want, "{server}: datagram {i} arrived out of order or altered");
        }
        rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        assert!(recv(&rx).is_none(), "{server}: more arrived than was sent");
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("sessions_opened"), 2);
    assert_eq!(stopped.counter("upstream_datagrams"), 2 * train.len() as u64);
}

/// A client's GSO train crosses the veth as one buffer and reaches the
/// listener whole (it takes coalesced datagrams, `UDP_GRO`); it must
/// still leave for the server as the datagrams that were sent, in order,
/// and a burst of mixed sizes behind it must not be merged or cut. The
/// same for a server's train to a pool socket, on its way to the client.
#[test]
fn coalesced_trains_and_mixed_bursts_arrive_as_sent_both_ways() {
    use std::os::fd::AsRawFd;
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(""));
    let train: Vec<Vec<u8>> = (0..21u8).map(|i| vec![i; if i == 20 { 300 } else { 1000 }]).collect();
    let burst: Vec<Vec<u8>> = vec![vec![101; 1000], vec![102; 20], vec![103; 1000], vec![104; 1400], vec![]];
    for (client, server) in [
        (client4(40010), sa(server4(0), 7010)),
        (client6(40010), sa(server6(0), 7010)),
    ] {
        let rx = socket(&lab.servers[0], server);
        let tx = socket(&lab.client, client);
        // Open the flow first, so the trains below meet an open flow (a
        // flow that starts with a train is tested above).
        tx.send_to(b"open", server).unwrap();
        let (gateway, opened) = recv(&rx).expect("the flow's first datagram");
        assert_eq!(opened, b"open");
        std::thread::sleep(Duration::from_millis(200));
        let run: Vec<&[u8]> = train.iter().map(Vec::as_slice).collect();
        let sent = tproxyd::net::send::send_run(tx.as_raw_fd(), &run, Some(server), None, server.is_ipv6()).unwrap();
        assert_eq!(sent, train.len());
        for p in &burst {
            tx.send_to(p, server).unwrap();
        }
        for (i, want) in train.iter().chain(&burst).enumerate() {
            let (_, got) = recv(&rx).unwrap_or_else(|| panic!("{server}: datagram {i} did not arrive"));
            assert_eq!(
                (got.len(), got.first()),
                (want.len(), want.first()),
                "{server}: datagram {i}"
            );
            assert!(got == *want, "{server}: datagram {i} was altered");
        }
        rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        assert!(recv(&rx).is_none(), "{server}: more arrived than was sent");

        // The same the other way: the server's train reaches the pool
        // socket whole, and the client gets each datagram from the server's
        // address.
        let sent = tproxyd::net::send::send_run(rx.as_raw_fd(), &run, Some(gateway), None, server.is_ipv6()).unwrap();
        assert_eq!(sent, train.len());
        for p in &burst {
            rx.send_to(p, gateway).unwrap();
        }
        for (i, want) in train.iter().chain(&burst).enumerate() {
            let (from, got) = recv(&tx).unwrap_or_else(|| panic!("{server}: reply {i} did not arrive"));
            assert_eq!(from, server, "reply {i} must come from the original destination");
            assert_eq!(
                (got.len(), got.first()),
                (want.len(), want.first()),
                "{server}: reply {i}"
            );
            assert!(got == *want, "{server}: reply {i} was altered");
        }
        tx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        assert!(recv(&tx).is_none(), "{server}: more replies arrived than were sent");
    }
    let stopped = daemon.stop();
    let each = (1 + train.len() + burst.len()) as u64 * 2;
    assert_eq!(stopped.counter("client_datagrams"), each);
    assert_eq!(stopped.counter("upstream_datagrams"), each);
    assert_eq!(stopped.counter("reply_datagrams"), each - 2);
}
