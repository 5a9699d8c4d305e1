//! End-to-end tests of per-flow UDP rules: redirect, interface, drop,
//! SOCKS5, per-rule timeouts, NAT behaviour as a STUN client sees it, and
//! DSCP/ECN transparency.

mod lab;

use lab::socks::{SOCKS_PASSWORD, SOCKS_USER};
use lab::udp::{Echo, exchange, mark_tos, recv, recv_tos, send_raw_udp6, socket};
use lab::{CLIENT4, CLIENT6, Lab, gateway_wan4, sa, server4, server6};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn client4(port: u16) -> SocketAddr {
    sa(ip(CLIENT4), port)
}

fn config(relay_extra: &str) -> String {
    format!("mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\", \"[::]:15353\"]\n{relay_extra}\n")
}

#[test]
fn redirect_serves_one_address_from_another_and_replies_stay_spoofed() {
    let lab = Lab::with_servers(2);
    lab.install_rules("nft", "LAN_IF=lan0");
    let target = sa(server4(1), 7000);
    let daemon = lab.start_tproxyd(&config(&format!(
        "[[relay.rules]]\ndestinations = [\"198.51.100.7/32\"]\nports = [50080]\naction = \"redirect\"\nto = \"{target}\"\n"
    )));
    let other = Echo::start(&lab.servers[1], target);
    let nobody_home = Echo::start(&lab.servers[0], sa(server4(0), 50080));
    let sock = socket(&lab.client, client4(40000));
    let asked = sa(server4(0), 50080);
    let (from, reply) = exchange(&sock, asked, b"to 50080");
    assert_eq!(reply, b"to 50080");
    assert_eq!(from, asked, "the reply must come from the address the client asked");
    assert_eq!(
        other.last_peer().ip(),
        gateway_wan4(1),
        "the other server saw the gateway"
    );
    assert!(
        nobody_home.received().is_empty(),
        "the original destination must not be contacted"
    );
    assert_eq!(daemon.stop().counter("sessions_opened"), 1);
}

#[test]
fn interface_rules_leave_through_the_named_device_or_by_mark() {
    // 203.0.113.99 exists behind both WAN links; the main table says wan0.
    let lab = Lab::with_servers(2);
    let anycast = ip("203.0.113.99");
    lab.add_server_address(1, anycast);
    lab.add_server_address(0, anycast); // last: the gateway's route points at server 0
    // Policy routing for marked traffic: fwmark 0x200 → table 200 → wan1.
    lab.gateway.sh(&format!(
        "ip rule add fwmark 0x200/0x200 lookup 200 && ip route add {anycast} via {} dev wan1 table 200",
        server4(1)
    ));
    lab.install_rules("nft", "LAN_IF=lan0");
    let _daemon = lab.start_tproxyd(&config(
        "[[relay.rules]]\nports = [7001]\naction = \"interface\"\ninterface = \"wan1\"\n\
         [[relay.rules]]\nports = [7002]\naction = \"interface\"\nmark = 0x200\n",
    ));
    let via0: Vec<Echo> = (7000..=7002)
        .map(|p| Echo::start(&lab.servers[0], sa(anycast, p)))
        .collect();
    let via1: Vec<Echo> = (7000..=7002)
        .map(|p| Echo::start(&lab.servers[1], sa(anycast, p)))
        .collect();
    let sock = socket(&lab.client, client4(40000));
    for port in 7000..=7002 {
        let (from, _) = exchange(&sock, sa(anycast, port), b"which way?");
        assert_eq!(from, sa(anycast, port));
    }
    // Port 7000 (no rule) took the main table's wan0; 7001 was bound to
    // wan1; 7002 was routed to wan1 by its mark.
    assert_eq!(via0[0].received().len(), 1, "direct flow should use wan0");
    assert!(via1[0].received().is_empty());
    for k in [1, 2] {
        assert!(via0[k].received().is_empty(), "port {} leaked out of wan0", 7000 + k);
        assert_eq!(
            via1[k].received().len(),
            1,
            "port {} should leave through wan1",
            7000 + k
        );
        assert_eq!(via1[k].last_peer().ip(), gateway_wan4(1));
    }
}

#[test]
fn drop_rules_drop_and_count() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(
        "[[relay.rules]]\nclients = [\"192.0.2.10/32\"]\nports = [\"9990-9999\"]\naction = \"drop\"\n",
    ));
    let blocked = Echo::start(&lab.servers[0], sa(server4(0), 9995));
    let open = Echo::start(&lab.servers[0], sa(server4(0), 9989));
    let sock = socket(&lab.client, client4(40000));
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    for _ in 0..3 {
        sock.send_to(b"x", blocked.addr).unwrap();
    }
    assert!(recv(&sock).is_none());
    // The short timeout only bounds the wait for nothing; a reply may take
    // longer than that on a loaded machine.
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    exchange(&sock, open.addr, b"fine");
    assert!(blocked.received().is_empty());
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("drop_by_rule"), 3);
    assert_eq!(stopped.counter("sessions_opened"), 1);
}

/// A drop rule that a reload adds ends the live flows it matches: their
/// client's datagrams are dropped from then on, and the server must not
/// go on reaching the client through the flow (each datagram it sent
/// also kept the flow from ever going idle). A flow the rule does not
/// match lives on.
#[test]
fn a_drop_rule_added_by_a_reload_ends_the_flows_it_matches() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let mut daemon = lab.start_tproxyd(&config(""));
    let blocked = Echo::start(&lab.servers[0], sa(server4(0), 9995));
    let open = Echo::start(&lab.servers[0], sa(server4(0), 9989));
    let sock = socket(&lab.client, client4(40000));
    exchange(&sock, blocked.addr, b"before");
    exchange(&sock, open.addr, b"before");
    let (blocked_mapping, open_mapping) = (blocked.last_peer(), open.last_peer());
    std::fs::write(
        &daemon.config,
        config("[[relay.rules]]\nports = [\"9990-9999\"]\naction = \"drop\"\n"),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(5));
    for i in 0..3 {
        blocked.send_to(format!("pushed {i}").as_bytes(), blocked_mapping);
    }
    sock.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    let mut reached = Vec::new();
    while let Some((from, data)) = recv(&sock) {
        reached.push((from, String::from_utf8_lossy(&data).into_owned()));
    }
    assert!(
        reached.is_empty(),
        "the dropped destination still reached the client: {reached:?}"
    );
    // The other flow is untouched: same mapping, and its server still
    // reaches the client unasked.
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    open.send_to(b"unasked", open_mapping);
    let (from, data) = recv(&sock).expect("the open flow lives on");
    assert_eq!((from, data.as_slice()), (open.addr, &b"unasked"[..]));
    exchange(&sock, open.addr, b"after");
    assert_eq!(open.last_peer(), open_mapping);
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("drop_unsolicited"), 3, "{}", stopped.log);
}

/// A full-cone flow has no one destination for a reload's drop rule to
/// end it by; what a remote the rule drops sends to the flow's mapping
/// must not reach the client all the same (nor keep the flow alive),
/// while the flow's other remotes still do.
#[test]
fn a_drop_rule_added_by_a_reload_keeps_its_remote_out_of_full_cone_flows() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let mut daemon = lab.start_tproxyd(&config("nat = \"full-cone\""));
    let server = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let blocked_addr = sa(ip("198.51.100.9"), 9000);
    lab.add_server_address(0, blocked_addr.ip());
    let blocked = socket(&lab.servers[0], blocked_addr);
    let sock = socket(&lab.client, client4(40000));
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    exchange(&sock, server.addr, b"hello");
    let mapping = server.last_peer();
    blocked.send_to(b"before", mapping).unwrap();
    let (from, data) = recv(&sock).expect("before the reload the full cone lets it through");
    assert_eq!((from, data.as_slice()), (blocked_addr, &b"before"[..]));
    std::fs::write(
        &daemon.config,
        config("nat = \"full-cone\"\n[[relay.rules]]\ndestinations = [\"198.51.100.9/32\"]\naction = \"drop\"\n"),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(5));
    for i in 0..3 {
        blocked.send_to(format!("pushed {i}").as_bytes(), mapping).unwrap();
    }
    sock.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    let mut reached = Vec::new();
    while let Some((from, data)) = recv(&sock) {
        reached.push((from, String::from_utf8_lossy(&data).into_owned()));
    }
    assert!(
        reached.is_empty(),
        "the dropped remote still reached the client: {reached:?}"
    );
    // The flow lives on for the remotes the rules let through.
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    server.send_to(b"unasked", mapping);
    let (from, data) = recv(&sock).expect("the flow's other remote still reaches the client");
    assert_eq!((from, data.as_slice()), (server.addr, &b"unasked"[..]));
    exchange(&sock, server.addr, b"after");
    assert_eq!(server.last_peer(), mapping, "the flow kept its mapping");
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("drop_unsolicited"), 3, "{}", stopped.log);
}

#[test]
fn per_rule_idle_timeouts() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config(
        "idle_timeout = \"1m\"\n[[relay.rules]]\nports = [7001]\naction = \"direct\"\nidle_timeout = \"1s\"\n",
    ));
    let long = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let short = Echo::start(&lab.servers[0], sa(server4(0), 7001));
    let sock = socket(&lab.client, client4(40000));
    exchange(&sock, long.addr, b"a");
    exchange(&sock, short.addr, b"a");
    std::thread::sleep(Duration::from_millis(2_200));
    // After 2 s of silence each server writes to the mapping it knows. The
    // 1-minute flow is still there and delivers; the 1-second flow is gone,
    // so its server's datagram is dropped as unsolicited.
    long.send_to(b"still there?", long.last_peer());
    let (from, data) = recv(&sock).expect("the default 1-minute flow must survive 2 s idle");
    assert_eq!((from, data.as_slice()), (long.addr, &b"still there?"[..]));
    short.send_to(b"still there?", short.last_peer());
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    assert!(recv(&sock).is_none(), "the 1-second flow must have expired");
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("sessions_expired"), 1);
    // Relayed: the two first answers and the long flow's late one, not the
    // short flow's. That one is either counted as unsolicited or, when the
    // idle pool socket's own 1-second grace ran out first, refused by the
    // kernel (the sweep's timing decides which; both mean it was not
    // delivered).
    assert_eq!(stopped.counter("reply_datagrams"), 3, "{}", stopped.log);
    assert!(stopped.counter("drop_unsolicited") <= 1, "{}", stopped.log);
}

/// The NAT type a STUN client behind the gateway reports.
fn nat_type(nat: &str) -> lab::stun::NatReport {
    let lab = Lab::new();
    let alternate = ip("198.51.100.8");
    lab.add_server_address(0, alternate);
    lab.install_rules("nft", "LAN_IF=lan0");
    let _daemon = lab.start_tproxyd(&config(&format!("nat = \"{nat}\"")));
    lab.stun_server(0, server4(0), alternate);
    lab.nat_discovery(server4(0))
}

#[test]
fn symmetric_nat_as_seen_by_rfc5780_stun() {
    let r = nat_type("symmetric");
    assert!(r.mapping.contains("Address and Port Dependent Mapping"), "{}", r.raw);
    assert!(
        r.filtering.contains("Address and Port Dependent Filtering"),
        "{}",
        r.raw
    );
}

#[test]
fn full_cone_nat_as_seen_by_rfc5780_stun() {
    let r = nat_type("full-cone");
    assert!(r.mapping.contains("Endpoint Independent Mapping"), "{}", r.raw);
    assert!(r.filtering.contains("Endpoint Independent Filtering"), "{}", r.raw);
}

#[test]
fn full_cone_replies_from_a_stranger_reach_the_client_from_the_strangers_address() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let _daemon = lab.start_tproxyd(&config("nat = \"full-cone\""));
    let server = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let stranger_addr = sa(ip("198.51.100.9"), 9000);
    lab.add_server_address(0, stranger_addr.ip());
    let stranger = socket(&lab.servers[0], stranger_addr);
    let sock = socket(&lab.client, client4(40000));
    exchange(&sock, server.addr, b"hello");
    let mapping = server.last_peer();
    // Someone the client never wrote to sends to the mapping...
    stranger.send_to(b"unsolicited", mapping).unwrap();
    let (from, data) = recv(&sock).expect("a full cone lets any remote through");
    assert_eq!((from, data.as_slice()), (stranger_addr, &b"unsolicited"[..]));
}

#[test]
fn dscp_and_ecn_marks_survive_both_ways() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let _daemon = lab.start_tproxyd(&config(""));
    // EF (DSCP 46) with ECT(0): 0xb8 | 0x02.
    const EF_ECT0: u8 = 0xba;
    for (client, server) in [
        (client4(40000), sa(server4(0), 7000)),
        (sa(ip(CLIENT6), 40000), sa(server6(0), 7000)),
    ] {
        let srv = socket(&lab.servers[0], server);
        mark_tos(&srv, EF_ECT0);
        let cli = socket(&lab.client, client);
        mark_tos(&cli, EF_ECT0);
        cli.send_to(b"voice", server).unwrap();
        let (peer, _, tos) = recv_tos(&srv).expect("server got nothing");
        assert_eq!(tos, EF_ECT0, "{server}: the server must see the client's mark");
        srv.send_to(b"voice back", peer).unwrap();
        let (from, _, tos) = recv_tos(&cli).expect("client got nothing");
        assert_eq!(from, server);
        assert_eq!(tos, EF_ECT0, "{server}: the client must see the server's mark");
        // Unmarked traffic stays unmarked (no mark leaks between datagrams).
        mark_tos(&cli, 0);
        cli.send_to(b"plain", server).unwrap();
        assert_eq!(recv_tos(&srv).unwrap().2, 0);
    }
}

/// A lab with danted on server 1 relaying to echo servers on server 0.
fn socks_lab(auth: bool) -> (Lab, SocketAddr, u32) {
    let lab = Lab::with_servers(2);
    lab.route_between_servers();
    lab.install_rules("nft", "LAN_IF=lan0");
    let proxy = sa(server4(1), 1080);
    let pid = lab.danted(1, proxy, auth);
    (lab, proxy, pid)
}

fn socks_config(proxy: SocketAddr, auth: bool, nat: &str) -> String {
    let creds = if auth {
        format!("username = \"{SOCKS_USER}\"\npassword = \"{SOCKS_PASSWORD}\"\n")
    } else {
        String::new()
    };
    config(&format!(
        "[[relay.rules]]\ndestinations = [\"198.51.100.0/25\"]\naction = \"socks5\"\nsocks5 = \"{proxy}\"\nnat = \"{nat}\"\n{creds}"
    ))
}

fn assert_socks_relays(auth: bool) {
    let (lab, proxy, _) = socks_lab(auth);
    let daemon = lab.start_tproxyd(&socks_config(proxy, auth, "symmetric"));
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let sock = socket(&lab.client, client4(40000));
    for i in 0..3 {
        let msg = format!("via socks {i}");
        let (from, reply) = exchange(&sock, echo.addr, msg.as_bytes());
        assert_eq!((from, reply), (echo.addr, msg.into_bytes()));
    }
    assert_eq!(
        echo.last_peer().ip(),
        proxy.ip(),
        "the server must see the SOCKS5 relay"
    );
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("socks5_associations"), 1, "{}", stopped.log);
    assert_eq!(stopped.counter("socks5_failures"), 0);
}

#[test]
fn socks5_without_authentication() {
    assert_socks_relays(false);
}

#[test]
fn socks5_with_username_and_password() {
    assert_socks_relays(true);
}

#[test]
fn socks5_with_a_wrong_password_fails_cleanly() {
    let (lab, proxy, _) = socks_lab(true);
    let text = socks_config(proxy, true, "symmetric").replace(SOCKS_PASSWORD, "wrong");
    let daemon = lab.start_tproxyd(&text);
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let sock = socket(&lab.client, client4(40000));
    sock.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    sock.send_to(b"x", echo.addr).unwrap();
    assert!(recv(&sock).is_none());
    assert!(echo.received().is_empty());
    let stopped = daemon.stop();
    assert!(stopped.status.success());
    assert_eq!(stopped.counter("socks5_failures"), 1, "{}", stopped.log);
}

#[test]
fn socks5_associations_follow_the_nat_mode() {
    // Symmetric: one association (one relay port) per destination; full
    // cone: one per client endpoint, shared by every destination.
    for (nat, expect_same) in [("symmetric", false), ("full-cone", true)] {
        let (lab, proxy, _) = socks_lab(false);
        let daemon = lab.start_tproxyd(&socks_config(proxy, false, nat));
        let a = Echo::start(&lab.servers[0], sa(server4(0), 7000));
        let b = Echo::start(&lab.servers[0], sa(server4(0), 7001));
        let sock = socket(&lab.client, client4(40000));
        assert_eq!(exchange(&sock, a.addr, b"a").0, a.addr);
        assert_eq!(exchange(&sock, b.addr, b"b").0, b.addr);
        assert_eq!(
            a.last_peer() == b.last_peer(),
            expect_same,
            "{nat}: {} vs {}",
            a.last_peer(),
            b.last_peer()
        );
        let stopped = daemon.stop();
        assert_eq!(
            stopped.counter("socks5_associations"),
            if expect_same { 1 } else { 2 },
            "{nat}"
        );
    }
}

#[test]
fn socks5_server_going_away_fails_the_flow_cleanly_and_it_recovers() {
    let (lab, proxy, pid) = socks_lab(false);
    let daemon = lab.start_tproxyd(&socks_config(proxy, false, "symmetric"));
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let sock = socket(&lab.client, client4(40000));
    exchange(&sock, echo.addr, b"before");
    // The proxy dies: the association ends with it.
    lab.kill(pid);
    std::thread::sleep(Duration::from_millis(300));
    sock.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    sock.send_to(b"while down", echo.addr).unwrap();
    assert!(recv(&sock).is_none());
    // The proxy comes back: the next datagram sets up a new association.
    lab.danted(1, proxy, false);
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let (from, reply) = exchange(&sock, echo.addr, b"after");
    assert_eq!((from, reply.as_slice()), (echo.addr, &b"after"[..]));
    let stopped = daemon.stop();
    assert!(stopped.status.success());
    assert_eq!(stopped.counter("socks5_lost"), 1, "{}", stopped.log);
    assert_eq!(stopped.counter("socks5_failures"), 1, "{}", stopped.log);
    assert_eq!(stopped.counter("socks5_associations"), 2);
}

/// A burst (a client catching up after a radio hiccup) through a SOCKS5
/// flow: the relay hands every datagram it read to the proxy, as it would
/// on a direct flow, where the socket's buffer takes the burst. Only the
/// queue to the flow's task stands between, and it once held 64.
#[test]
fn a_burst_through_a_socks5_flow_reaches_the_proxy_whole() {
    const BURST: usize = 800;
    let (lab, proxy, _) = socks_lab(false);
    let daemon = lab.start_tproxyd(&socks_config(proxy, false, "symmetric"));
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let sock = lab::flood::big_socket(&lab.client, client4(40000));
    exchange(&sock, echo.addr, b"association up");
    for i in 0..BURST {
        sock.send_to(format!("burst {i:04} {}", "x".repeat(80)).as_bytes(), echo.addr)
            .expect("the client's 4 MiB send buffer takes the burst");
    }
    std::thread::sleep(Duration::from_millis(1_500));
    let stopped = daemon.stop();
    let read = stopped.counter("client_datagrams");
    assert_eq!(read, BURST as u64 + 1, "tproxyd read {read}: {}", stopped.log);
    assert_eq!(stopped.counter("drop_send_buffer_full"), 0, "{}", stopped.log);
    assert_eq!(stopped.counter("upstream_datagrams"), read, "{}", stopped.log);
    assert_eq!(stopped.counter("socks5_associations"), 1);
}

/// A symmetric SOCKS5 flow lets only its destination answer, as a direct
/// one does (README, "UDP rules and NAT behaviour"). Many SOCKS5 servers
/// relay UDP as a full cone: whatever reaches the association's outgoing
/// port, from anyone, comes back wrapped with its sender's address. A
/// stranger who learnt that port (every server the flow talks to sees it)
/// must not reach the client, spoofed as the flow's destination; in full
/// cone mode it reaches the client from its own address.
#[test]
fn only_the_destination_answers_a_symmetric_socks5_flow_through_a_full_cone_proxy() {
    for nat in ["symmetric", "full-cone"] {
        let lab = Lab::with_servers(2);
        lab.route_between_servers();
        lab.install_rules("nft", "LAN_IF=lan0");
        let proxy = lab.cone_socks5(1, sa(server4(1), 1080));
        let daemon = lab.start_tproxyd(&socks_config(proxy.addr, false, nat));
        let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
        let stranger_addr = sa(ip("198.51.100.9"), 9000);
        lab.add_server_address(0, stranger_addr.ip());
        let stranger = socket(&lab.servers[0], stranger_addr);
        let sock = socket(&lab.client, client4(40000));
        let (from, reply) = exchange(&sock, echo.addr, b"hello");
        assert_eq!((from, reply.as_slice()), (echo.addr, &b"hello"[..]), "{nat}");
        assert_eq!(echo.last_peer(), proxy.outgoing, "{nat}");
        for i in 0..3 {
            stranger
                .send_to(format!("stranger {i}").as_bytes(), proxy.outgoing)
                .unwrap();
        }
        sock.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
        let mut reached = Vec::new();
        while let Some((from, data)) = recv(&sock) {
            reached.push((from, String::from_utf8_lossy(&data).into_owned()));
        }
        // The destination itself still answers.
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let (from, reply) = exchange(&sock, echo.addr, b"still there");
        assert_eq!((from, reply.as_slice()), (echo.addr, &b"still there"[..]), "{nat}");
        let stopped = daemon.stop();
        if nat == "symmetric" {
            assert!(reached.is_empty(), "the stranger reached the client: {reached:?}");
            assert_eq!(stopped.counter("drop_unsolicited"), 3, "{}", stopped.log);
        } else {
            assert_eq!(reached.len(), 3, "{reached:?}");
            assert!(reached.iter().all(|(from, _)| *from == stranger_addr), "{reached:?}");
            assert_eq!(stopped.counter("drop_unsolicited"), 0, "{}", stopped.log);
        }
    }
}

/// An IPv6 packet to an IPv4-mapped address (`::ffff:198.51.100.7`) is
/// diverted to tproxyd like any other, and a SOCKS5 server (dante here)
/// relays it to the IPv4 address. A drop rule for that IPv4 address must
/// not be passed that way: such a destination is dropped before the rules.
#[test]
fn an_ipv4_mapped_destination_does_not_pass_an_ipv4_drop_rule() {
    let (lab, proxy, _) = socks_lab(false);
    let daemon = lab.start_tproxyd(&config(&format!(
        "[[relay.rules]]\ndestinations = [\"198.51.100.0/25\"]\naction = \"drop\"\n\
         [[relay.rules]]\naction = \"socks5\"\nsocks5 = \"{proxy}\"\n"
    )));
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let v6 = |s: &str| s.parse::<std::net::SocketAddrV6>().unwrap();
    for _ in 0..3 {
        send_raw_udp6(
            &lab.client,
            v6(&format!("[{CLIENT6}]:40000")),
            v6("[::ffff:198.51.100.7]:7000"),
            lab::GATEWAY_LAN6.parse().unwrap(),
            b"mapped",
        );
    }
    // The IPv4 flow the rule is about, as a check that sends get through.
    let sock = socket(&lab.client, client4(40000));
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    sock.send_to(b"direct", echo.addr).unwrap();
    assert!(recv(&sock).is_none());
    std::thread::sleep(Duration::from_millis(700));
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("client_datagrams"), 4, "{}", stopped.log);
    assert!(
        echo.received().is_empty(),
        "the drop rule was passed: {:?}",
        echo.received()
    );
    assert_eq!(stopped.counter("drop_by_rule"), 1, "{}", stopped.log);
    assert_eq!(stopped.counter("drop_no_orig_dst"), 3, "{}", stopped.log);
    assert_eq!(stopped.counter("sessions_opened"), 0, "{}", stopped.log);
}

/// A full-cone SOCKS5 flow through dante: the client wrote to two remotes
/// over one association, then a reload drops one of them. Dante goes on
/// relaying what that remote sends to the association (the client wrote
/// to it once), so only tproxyd's full-cone filter stands between it and
/// the LAN: nothing from it may reach the client, and the other remote
/// still does.
#[test]
fn a_remote_a_reload_drops_does_not_reach_a_full_cone_socks5_flow() {
    let (lab, proxy, _) = socks_lab(false);
    let socks_rule = |to: &str| {
        format!(
            "[[relay.rules]]\ndestinations = [{to}]\naction = \"socks5\"\nsocks5 = \"{proxy}\"\nnat = \"full-cone\"\n"
        )
    };
    let mut daemon = lab.start_tproxyd(&config(&socks_rule("\"198.51.100.7/32\", \"198.51.100.9/32\"")));
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let blocked_addr = sa(ip("198.51.100.9"), 9000);
    lab.add_server_address(0, blocked_addr.ip());
    let blocked = Echo::start(&lab.servers[0], blocked_addr);
    let sock = socket(&lab.client, client4(40000));
    assert_eq!(exchange(&sock, echo.addr, b"hello").0, echo.addr);
    assert_eq!(exchange(&sock, blocked.addr, b"hello too").0, blocked.addr);
    let association = blocked.last_peer();
    assert_eq!(echo.last_peer(), association, "one association for the flow");
    // Before the reload dante relays what the remote sends unasked.
    blocked.send_to(b"before", association);
    let (from, data) = recv(&sock).expect("before the reload the remote reaches the client");
    assert_eq!((from, data.as_slice()), (blocked_addr, &b"before"[..]));
    // The socks5 rule keeps its number: the flow's key stays the same.
    std::fs::write(
        &daemon.config,
        config(&format!(
            "{}[[relay.rules]]\ndestinations = [\"198.51.100.9/32\"]\naction = \"drop\"\n",
            socks_rule("\"198.51.100.7/32\"")
        )),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(5));
    for i in 0..3 {
        blocked.send_to(format!("pushed {i}").as_bytes(), association);
    }
    sock.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    let mut reached = Vec::new();
    while let Some((from, data)) = recv(&sock) {
        reached.push((from, String::from_utf8_lossy(&data).into_owned()));
    }
    // The other remote still reaches the client through the same flow.
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    echo.send_to(b"unasked", association);
    let other = recv(&sock);
    let stopped = daemon.stop();
    assert!(
        reached.is_empty(),
        "the dropped remote reached the client through SOCKS5: {reached:?}"
    );
    assert_eq!(
        other,
        Some((echo.addr, b"unasked".to_vec())),
        "the flow's other remote no longer reaches the client"
    );
    assert_eq!(stopped.counter("drop_unsolicited"), 3, "{}", stopped.log);
    assert_eq!(stopped.counter("socks5_associations"), 1, "{}", stopped.log);
}

/// The same through a proxy that relays UDP as a full cone, with the drop
/// rule in force from the start and for this client only: a remote the
/// client may not write to must not reach it through the association
/// either, while another client's rule would let it (the verdict is the
/// flow's client's).
#[test]
fn a_remote_the_rules_drop_for_the_client_does_not_reach_it_through_a_full_cone_proxy() {
    let lab = Lab::with_servers(2);
    lab.route_between_servers();
    lab.install_rules("nft", "LAN_IF=lan0");
    let proxy = lab.cone_socks5(1, sa(server4(1), 1080));
    let daemon = lab.start_tproxyd(&config(&format!(
        "[[relay.rules]]\nclients = [\"{CLIENT4}/32\"]\ndestinations = [\"198.51.100.9/32\"]\naction = \"drop\"\n\
         [[relay.rules]]\ndestinations = [\"198.51.100.0/25\"]\naction = \"socks5\"\nsocks5 = \"{}\"\nnat = \"full-cone\"\n",
        proxy.addr
    )));
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let blocked_addr = sa(ip("198.51.100.9"), 9000);
    let allowed_addr = sa(ip("198.51.100.10"), 9000);
    lab.add_server_address(0, blocked_addr.ip());
    lab.add_server_address(0, allowed_addr.ip());
    let blocked = socket(&lab.servers[0], blocked_addr);
    let allowed = socket(&lab.servers[0], allowed_addr);
    let sock = socket(&lab.client, client4(40000));
    assert_eq!(exchange(&sock, echo.addr, b"hello").0, echo.addr);
    assert_eq!(echo.last_peer(), proxy.outgoing);
    for i in 0..3 {
        blocked
            .send_to(format!("pushed {i}").as_bytes(), proxy.outgoing)
            .unwrap();
    }
    sock.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    let mut reached = Vec::new();
    while let Some((from, data)) = recv(&sock) {
        reached.push((from, String::from_utf8_lossy(&data).into_owned()));
    }
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    allowed.send_to(b"allowed", proxy.outgoing).unwrap();
    let other = recv(&sock);
    let stopped = daemon.stop();
    assert!(
        reached.is_empty(),
        "the dropped remote reached the client through SOCKS5: {reached:?}"
    );
    assert_eq!(
        other,
        Some((allowed_addr, b"allowed".to_vec())),
        "a remote the rules allow"
    );
    assert_eq!(stopped.counter("drop_unsolicited"), 3, "{}", stopped.log);
}
