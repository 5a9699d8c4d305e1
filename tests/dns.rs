//! End-to-end tests of the DNS hijack, with dig as the client and dnsmasq
//! as the upstream, in the namespace lab.

mod lab;

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use lab::dns::{Dig, Dnsmasq, dig};
use lab::fake_dns::{Behaviour, FakeDns, query_bytes};
use lab::udp::{Echo, recv, socket};
use lab::{Daemon, Lab, sa, server4};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The "public resolver" devices have hard-coded: routed through the
/// gateway, where tproxyd answers in its name.
const PUBLIC: &str = "203.0.113.53";
const PUBLIC6: &str = "2001:db8:53::53";
const UPSTREAM: &str = "198.51.100.53";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A lab with the redirect (UDP and TCP DNS) installed, a dnsmasq
/// upstream authoritative for example.test, a second one (the office
/// resolver, in its own namespace) for corp.example, and sinks on the
/// public resolver's addresses that record anything that leaks past tproxyd.
struct DnsLab {
    lab: Lab,
    upstream: Dnsmasq,
    office: Dnsmasq,
    leak4: Echo,
    leak6: Echo,
}

impl DnsLab {
    fn new() -> DnsLab {
        let lab = Lab::with_servers(2);
        for addr in [UPSTREAM, PUBLIC, PUBLIC6] {
            lab.add_server_address(0, ip(addr));
        }
        lab.install_rules("nft", "LAN_IF=lan0 DNS_TCP_PORT=15354");
        let upstream = lab.dnsmasq(
            0,
            ip(UPSTREAM),
            "example.test",
            &[
                "--host-record=www.example.test,203.0.113.80,2001:db8::80",
                // Outside its zone: the authoritative dnsmasq refuses it,
                // so only an override can answer printer.lan.
                "--host-record=printer.lan,198.51.100.99",
            ],
        );
        let office = lab.dnsmasq(
            1,
            server4(1),
            "corp.example",
            &["--host-record=wiki.corp.example,198.51.100.200"],
        );
        let leak4 = Echo::start(&lab.servers[0], sa(ip(PUBLIC), 53));
        let leak6 = Echo::start(&lab.servers[0], sa(ip(PUBLIC6), 53));
        DnsLab {
            lab,
            upstream,
            office,
            leak4,
            leak6,
        }
    }

    fn start(&self, rules: &str) -> Daemon {
        self.lab.start_tproxyd(&config(rules))
    }

    /// Starts the daemon with the relay's overload shedding off, for the
    /// tests that send one burst from an IPv4 and an IPv6 address at once.
    /// The two addresses are two clients to the shedder, each family has a
    /// listener of its own, and on a loaded machine the listener read first
    /// makes its client look like the heaviest while the other family's
    /// queue waits: part of its burst is then shed
    /// (`drops_total{reason="overload"}`), as `relay.shed_after_ms` says.
    /// tests/abuse.rs tests the shedding; these test the answers.
    fn start_unshed(&self, rules: &str) -> Daemon {
        let config = config(rules);
        let unshed = config.replacen("[relay]\n", "[relay]\nshed_after_ms = 0\n", 1);
        assert_ne!(unshed, config, "the lab config has no [relay] table");
        self.lab.start_tproxyd(&unshed)
    }

    fn dig(&self, args: &str) -> Dig {
        dig(&self.lab.client, args)
    }

    fn assert_nothing_leaked(&self) {
        assert!(self.leak4.received().is_empty(), "a query reached the real {PUBLIC}");
        assert!(self.leak6.received().is_empty(), "a query reached the real {PUBLIC6}");
    }
}

fn config(rules: &str) -> String {
    format!(
        r#"
mark = 255
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[dns]
ports = [53]
listen = ["192.0.2.1:53"]
# The lab's LAN uses documentation addresses, outside the default allow list.
allow = ["192.0.2.0/24", "2001:db8:1::/64"]
tcp_listen = ["0.0.0.0:15354", "[::]:15354"]
timeout = "1500ms"
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
server_timeout = "700ms"
[dns.upstreams.office]
servers = ["{office}"]
{rules}
"#,
        office = server4(1)
    )
}

const OVERRIDES: &str = r#"
[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["192.0.2.50"]
ttl = "2m"
[[dns.rules]]
domains = ["*.corp.example"]
action = "forward"
upstream = "office"
"#;

#[test]
fn hijacked_query_is_answered_from_the_address_the_client_asked() {
    let t = DnsLab::new();
    let daemon = t.start(OVERRIDES);
    let d = t.dig(&format!("@{PUBLIC} www.example.test A"));
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.answer_data(), ["203.0.113.80"]);
    // dig only accepts a reply whose source is the server it asked.
    assert_eq!(d.server, format!("{PUBLIC}#53"));
    assert!(t.upstream.was_asked("www.example.test"));
    let asked_from: Vec<String> = t.upstream.queries().into_iter().map(|(_, from)| from).collect();
    assert_eq!(asked_from, ["198.51.100.1"], "the upstream must see the gateway");
    t.assert_nothing_leaked();
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_forwarded"), 1);
    assert_eq!(stopped.counter("sessions_opened"), 0, "DNS is answered, not relayed");
}

#[test]
fn an_override_answers_its_address_and_only_for_its_type() {
    let t = DnsLab::new();
    let _daemon = t.start(OVERRIDES);
    let a = t.dig(&format!("@{PUBLIC} printer.lan A"));
    assert_eq!(a.status, "NOERROR");
    assert_eq!(
        a.answers,
        [(
            "printer.lan.".to_string(),
            120,
            "A".to_string(),
            "192.0.2.50".to_string()
        )]
    );
    assert!(a.flags.contains(&"aa".to_string()), "{:?}", a.flags);
    let aaaa = t.dig(&format!("@{PUBLIC} printer.lan AAAA"));
    assert_eq!(aaaa.status, "NOERROR");
    assert!(aaaa.answers.is_empty(), "{}", aaaa.raw);
    // An override is answered locally: the upstream never sees the name.
    assert!(!t.upstream.was_asked("printer.lan"));
    // The plain server on the gateway's LAN address follows the same rules.
    let plain = t.dig("@192.0.2.1 printer.lan A");
    assert_eq!(plain.answer_data(), ["192.0.2.50"]);
    t.assert_nothing_leaked();
}

#[test]
fn each_block_mode_returns_its_configured_answer() {
    let t = DnsLab::new();
    let _daemon = t.start(
        r#"
[[dns.rules]]
domains = ["*.nx.test"]
action = "block"
[[dns.rules]]
domains = ["*.nodata.test"]
action = "block"
block = "nodata"
[[dns.rules]]
domains = ["*.null.test"]
action = "block"
block = "null"
[[dns.rules]]
domains = ["*.refused.test"]
action = "block"
block = "refused"
"#,
    );
    assert_eq!(t.dig(&format!("@{PUBLIC} ads.nx.test A")).status, "NXDOMAIN");
    let nodata = t.dig(&format!("@{PUBLIC} nodata.test A"));
    assert_eq!((nodata.status.as_str(), nodata.answers.len()), ("NOERROR", 0));
    assert_eq!(t.dig(&format!("@{PUBLIC} x.null.test A")).answer_data(), ["0.0.0.0"]);
    assert_eq!(t.dig(&format!("@{PUBLIC} x.null.test AAAA")).answer_data(), ["::"]);
    let null_mx = t.dig(&format!("@{PUBLIC} x.null.test MX"));
    assert_eq!((null_mx.status.as_str(), null_mx.answers.len()), ("NOERROR", 0));
    assert_eq!(t.dig(&format!("@{PUBLIC} a.b.refused.test A")).status, "REFUSED");
    assert!(t.upstream.queries().is_empty(), "blocked names must not be forwarded");
    t.assert_nothing_leaked();
}

#[test]
fn a_per_client_rule_applies_only_to_its_network() {
    let t = DnsLab::new();
    t.lab.add_client_address(ip("192.0.2.70"));
    let _daemon = t.start(
        r#"
[[dns.rules]]
clients = ["192.0.2.64/26"]
domains = ["*.example.test"]
action = "block"
"#,
    );
    let kid = t.dig(&format!("-b 192.0.2.70 @{PUBLIC} www.example.test A"));
    assert_eq!(kid.status, "NXDOMAIN", "{}", kid.raw);
    let parent = t.dig(&format!("-b 192.0.2.10 @{PUBLIC} www.example.test A"));
    assert_eq!(parent.answer_data(), ["203.0.113.80"]);
}

#[test]
fn split_forwarding_reaches_the_named_upstream_and_only_it() {
    let t = DnsLab::new();
    let _daemon = t.start(OVERRIDES);
    let d = t.dig(&format!("@{PUBLIC} wiki.corp.example A"));
    assert_eq!(d.answer_data(), ["198.51.100.200"], "{}", d.raw);
    assert!(t.office.was_asked("wiki.corp.example"));
    assert!(
        !t.upstream.was_asked("wiki.corp.example"),
        "the default upstream must not see corp names"
    );
    let d = t.dig(&format!("@{PUBLIC} www.example.test A"));
    assert_eq!(d.answer_data(), ["203.0.113.80"]);
    assert!(!t.office.was_asked("www.example.test"));
}

#[test]
fn answers_are_cached_with_counting_down_ttls_positive_and_negative() {
    let t = DnsLab::new();
    let daemon = t.start("");
    let first = t.dig(&format!("@{PUBLIC} www.example.test A"));
    assert_eq!(first.answers[0].1, 300);
    let nx = t.dig(&format!("@{PUBLIC} nope.example.test A"));
    assert_eq!(nx.status, "NXDOMAIN");
    assert_eq!(nx.authority[0].2, "SOA", "{}", nx.raw);
    // The upstream goes away; cached answers keep coming, older.
    t.lab.kill(t.upstream.pid);
    std::thread::sleep(Duration::from_millis(2_100));
    let again = t.dig(&format!("@{PUBLIC} www.example.test A"));
    assert_eq!(again.answer_data(), ["203.0.113.80"], "{}", again.raw);
    assert!((290..=298).contains(&again.answers[0].1), "TTL {}", again.answers[0].1);
    let nx_again = t.dig(&format!("@{PUBLIC} nope.example.test A"));
    assert_eq!(nx_again.status, "NXDOMAIN");
    assert!(nx_again.authority[0].1 <= 298, "negative TTL must count down too");
    // A name never asked before cannot be answered now.
    let miss = t.dig(&format!("@{PUBLIC} other.example.test A"));
    assert_eq!(miss.status, "SERVFAIL");
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_hits"), 2);
    assert_eq!(stopped.counter("dns_servfail"), 1);
}

#[test]
fn a_dead_upstream_gives_servfail_within_the_timeout() {
    let t = DnsLab::new();
    t.lab.kill(t.upstream.pid);
    let daemon = t.start("");
    let started = Instant::now();
    let d = t.dig(&format!("@{PUBLIC} www.example.test A"));
    let took = started.elapsed();
    assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
    // dns.timeout is 1.5 s; dig itself would give up at 3 s.
    assert!(took < Duration::from_millis(2_900), "took {took:?}");
    assert!(
        d.query_ms >= 600,
        "SERVFAIL came before the upstream was given its time: {d:?}"
    );
    assert_eq!(daemon.stop().counter("dns_servfail"), 1);
}

#[test]
fn failover_to_the_second_server_of_a_group() {
    let t = DnsLab::new();
    // The first server is a black hole; the second is the real upstream.
    let text = config("").replace(
        &format!("servers = [\"{UPSTREAM}\"]"),
        &format!("servers = [\"198.51.100.66\", \"{UPSTREAM}\"]"),
    );
    let _daemon = t.lab.start_tproxyd(&text);
    let d = t.dig(&format!("@{PUBLIC} www.example.test A"));
    assert_eq!(d.answer_data(), ["203.0.113.80"], "{}", d.raw);
    // The next query (not cached: another type) goes straight to the
    // server that answered.
    let d = t.dig(&format!("@{PUBLIC} www.example.test AAAA"));
    assert_eq!(d.answer_data(), ["2001:db8::80"]);
    assert!(d.query_ms < 500, "the dead server was tried again: {} ms", d.query_ms);
}

fn raw_query(t: &DnsLab, bytes: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
    let sock = socket(&t.lab.client, "192.0.2.10:0".parse().unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    sock.send_to(bytes, sa(ip(PUBLIC), 53)).unwrap();
    recv(&sock)
}

#[test]
fn malformed_queries_get_formerr_or_are_dropped_and_counted() {
    let t = DnsLab::new();
    let daemon = t.start(OVERRIDES);
    // A header announcing one question, followed by garbage.
    let mut bad = vec![0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0];
    bad.extend_from_slice(&[0x3f, b'x', 0xff]);
    let (from, reply) = raw_query(&t, &bad).expect("FORMERR expected");
    assert_eq!(from, sa(ip(PUBLIC), 53));
    assert_eq!(&reply[..2], &[0xbe, 0xef], "the reply keeps the query ID");
    assert_eq!(reply[3] & 0x0f, 1, "RCODE must be FORMERR");
    assert_eq!(reply[2] & 0x80, 0x80, "QR set");
    // Too short to be a header: silence.
    assert!(raw_query(&t, &[1, 2, 3]).is_none());
    // Still healthy afterwards.
    assert_eq!(t.dig(&format!("@{PUBLIC} printer.lan A")).answer_data(), ["192.0.2.50"]);
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_formerr"), 1);
    assert_eq!(stopped.counter("dns_dropped_malformed"), 1);
    t.assert_nothing_leaked();
}

#[test]
fn tcp_queries_are_hijacked_too_and_truncated_answers_fall_back_to_tcp() {
    let t = DnsLab::new();
    let many: Vec<String> = (1..=60).map(|i| format!("\"192.0.2.{i}\"")).collect();
    let daemon = t.start(&format!(
        "{OVERRIDES}\n[[dns.rules]]\ndomains = [\"many.lan\"]\naction = \"answer\"\na = [{}]\n",
        many.join(", ")
    ));
    let tcp = t.dig(&format!("+tcp @{PUBLIC} printer.lan A"));
    assert_eq!(tcp.answer_data(), ["192.0.2.50"], "{}", tcp.raw);
    assert!(tcp.raw.contains("(TCP)"), "{}", tcp.raw);
    // 60 A records do not fit 512 bytes: UDP without EDNS gets TC=1 ...
    let udp = t.dig(&format!("+noedns +ignore @{PUBLIC} many.lan A"));
    assert!(udp.flags.contains(&"tc".to_string()), "{}", udp.raw);
    assert!(udp.answers.is_empty());
    // ... and dig's automatic retry over TCP is answered by tproxyd in full.
    let retried = t.dig(&format!("+noedns @{PUBLIC} many.lan A"));
    assert_eq!(retried.answers.len(), 60, "{}", retried.raw);
    // With EDNS (1232 bytes) it fits in one datagram.
    let edns = t.dig(&format!("+bufsize=1232 +ignore @{PUBLIC} many.lan A"));
    assert_eq!(edns.answers.len(), 60);
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_tcp_queries"), 2);
    assert_eq!(stopped.counter("dns_truncated"), 2);
    t.assert_nothing_leaked();
}

#[test]
fn aaaa_and_ipv6_transport() {
    let t = DnsLab::new();
    let _daemon = t.start(OVERRIDES);
    let d = t.dig(&format!("@{PUBLIC6} www.example.test AAAA"));
    assert_eq!(d.answer_data(), ["2001:db8::80"], "{}", d.raw);
    assert_eq!(d.server, format!("{PUBLIC6}#53"));
    let tcp6 = t.dig(&format!("+tcp @{PUBLIC6} printer.lan A"));
    assert_eq!(tcp6.answer_data(), ["192.0.2.50"], "{}", tcp6.raw);
    t.assert_nothing_leaked();
}

#[test]
fn question_case_is_echoed_verbatim() {
    let t = DnsLab::new();
    let _daemon = t.start(OVERRIDES);
    let d = t.dig(&format!("@{PUBLIC} PrInTeR.LaN A"));
    assert_eq!(d.question, "PrInTeR.LaN.", "{}", d.raw);
    assert_eq!(d.answer_data(), ["192.0.2.50"]);
}

#[test]
fn a_one_million_line_block_list_loads_and_matches() {
    let t = DnsLab::new();
    let list = t.lab.path("million.txt");
    let mut text = String::with_capacity(30_000_000);
    for i in 0..1_000_000u32 {
        // A realistic mix of the formats found in published lists.
        match i % 4 {
            0 => text.push_str(&format!("tracker{i}.ads.test\n")),
            1 => text.push_str(&format!("0.0.0.0 pixel{i}.ads.test\n")),
            2 => text.push_str(&format!("||cdn{i}.ads.test^\n")),
            _ => text.push_str(&format!("*.wild{i}.ads.test\n")),
        }
    }
    std::fs::write(&list, text).unwrap();
    let rules = format!("[[dns.rules]]\nlists = [\"{}\"]\naction = \"block\"\n", list.display());
    let daemon = t.lab.start_tproxyd_within(&config(&rules), Duration::from_secs(120));
    let loaded = daemon.log_text();
    assert!(loaded.contains("names=1000000"), "{loaded}");
    for blocked in [
        "tracker0.ads.test",
        "pixel999997.ads.test",
        "x.cdn2.ads.test",
        "a.b.wild999999.ads.test",
    ] {
        assert_eq!(t.dig(&format!("@{PUBLIC} {blocked} A")).status, "NXDOMAIN", "{blocked}");
    }
    // Exact entries do not cover subdomains; unlisted names resolve.
    assert_eq!(
        t.dig(&format!("@{PUBLIC} www.example.test A")).answer_data(),
        ["203.0.113.80"]
    );
    assert_eq!(t.dig(&format!("@{PUBLIC} sub.tracker0.ads.test A")).status, "SERVFAIL");
    assert!(t.upstream.was_asked("sub.tracker0.ads.test"));
}

#[test]
fn encrypted_upstreams_dns_over_tls_and_https() {
    let t = DnsLab::new();
    let pki = t.lab.pki("dns.lab.test");
    // dnsdist terminates DoT and DoH and asks the dnsmasq behind it, so
    // dnsmasq sees dnsdist (198.51.100.53), never the gateway, when the
    // encrypted path is taken.
    t.lab.dnsdist(
        0,
        &format!(
            r#"setACL({{"0.0.0.0/0", "::/0"}})
newServer({{address="{UPSTREAM}:53"}})
addTLSLocal("{UPSTREAM}:853", "{cert}", "{key}")
addDOHLocal("{UPSTREAM}:443", "{cert}", "{key}", "/dns-query")"#,
            cert = pki.cert.display(),
            key = pki.key.display()
        ),
        "for DoH",
    );
    let group = |servers: &str, name: &str| {
        format!(
            "[dns.upstreams.default]\nservers = [{servers}]\ntls_name = \"{name}\"\nca_file = \"{}\"\nserver_timeout = \"1s\"",
            pki.ca.display()
        )
    };
    let base = config("");
    let default_group = format!("[dns.upstreams.default]\nservers = [\"{UPSTREAM}\"]\nserver_timeout = \"700ms\"");
    for (servers, qname) in [
        (format!("\"tls://{UPSTREAM}\""), "www.example.test"),
        (format!("\"https://{UPSTREAM}/dns-query\""), "www.example.test"),
    ] {
        let text = base.replace(&default_group, &group(&servers, "dns.lab.test"));
        let daemon = t.lab.start_tproxyd(&text);
        let d = t.dig(&format!("@{PUBLIC} {qname} A"));
        assert_eq!(d.answer_data(), ["203.0.113.80"], "{servers}: {}", d.raw);
        let stopped = daemon.stop();
        assert_eq!(stopped.counter("dns_servfail"), 0, "{servers}");
    }
    // (dnsdist's own health checks ask for a.root-servers.net.)
    let ours = || -> Vec<String> {
        t.upstream
            .queries()
            .into_iter()
            .filter(|(n, _)| n == "www.example.test")
            .map(|(_, f)| f)
            .collect()
    };
    let froms = ours();
    assert_eq!(froms.len(), 2, "{froms:?}");
    assert!(
        froms.iter().all(|f| f == UPSTREAM),
        "queries must arrive through dnsdist: {froms:?}"
    );
    // A certificate for another name is refused: SERVFAIL, nothing asked.
    let text = base.replace(
        &default_group,
        &group(&format!("\"tls://{UPSTREAM}\""), "other.lab.test"),
    );
    let _daemon = t.lab.start_tproxyd(&text);
    assert_eq!(t.dig(&format!("@{PUBLIC} www.example.test AAAA")).status, "SERVFAIL");
    assert_eq!(ours().len(), 2, "a query went out over an unverified connection");
}

#[test]
fn an_upstream_answer_truncated_over_udp_is_fetched_again_over_tcp() {
    let lab = Lab::new();
    lab.add_server_address(0, ip(UPSTREAM));
    lab.install_rules("nft", "LAN_IF=lan0 DNS_TCP_PORT=15354");
    // 100 addresses for one name: more than a 1,232-byte UDP answer holds.
    let records: Vec<String> = (1..=100)
        .map(|i| format!("--host-record=big.example.test,203.0.113.{i}"))
        .collect();
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let upstream = lab.dnsmasq(0, ip(UPSTREAM), "example.test", &records);
    let daemon = lab.start_tproxyd(&config(""));
    let d = dig(&lab.client, &format!("+tcp @{PUBLIC} big.example.test A"));
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.answers.len(), 100, "{}", d.raw);
    // Asked twice: over UDP (truncated), then over TCP.
    let asked = upstream
        .queries()
        .iter()
        .filter(|(n, _)| n == "big.example.test")
        .count();
    assert_eq!(asked, 2, "{:?}", upstream.queries());
    assert_eq!(daemon.stop().counter("dns_servfail"), 0);
}

/// The config of a test with one extra upstream, `upstream` at `addr`,
/// that answers every name under `*.{upstream}.test`.
fn forward_zone(upstream: &str, addr: IpAddr) -> String {
    format!(
        r#"
[dns.upstreams.{upstream}]
servers = ["{addr}"]
[[dns.rules]]
domains = ["*.{upstream}.test"]
action = "forward"
upstream = "{upstream}"
"#
    )
}

/// A client socket for a burst of misses, bound to `bind` in the lab's
/// client namespace, waiting up to 3 s for each answer.
fn burst_socket(t: &DnsLab, bind: &str) -> std::net::UdpSocket {
    let sock = socket(&t.lab.client, bind.parse().unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(3_000))).unwrap();
    sock
}

/// Asks a burst of misses and reads their answers, as the outbox tests do:
/// every socket sends all its queries first (query `i` of socket `c` has
/// the ID `0x1000 * (c + 1) + i`, the name `name(c, i)`, the bytes
/// `query(id, name)`, and goes to `server(c, i)`), then every answer is
/// read. Each must be one of that socket's own queries, answered once,
/// from the address that query went to, for the name asked;
/// `check(c, i, message, bytes)` looks at the rest. Nothing more may
/// arrive after the last one.
fn ask_a_burst_of_misses(
    socks: &[std::net::UdpSocket],
    per_socket: u16,
    name: impl Fn(usize, u16) -> String,
    server: impl Fn(usize, u16) -> SocketAddr,
    query: impl Fn(u16, &str) -> Vec<u8>,
    mut check: impl FnMut(usize, u16, &Message, &[u8]),
) {
    let id = |c: usize, i: u16| 0x1000 * (c as u16 + 1) + i;
    for i in 0..per_socket {
        for (c, sock) in socks.iter().enumerate() {
            sock.send_to(&query(id(c, i), &name(c, i)), server(c, i)).unwrap();
        }
    }
    for (c, sock) in socks.iter().enumerate() {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..per_socket {
            let (from, bytes) = recv(sock).unwrap_or_else(|| panic!("socket {c}: only {} answers", seen.len()));
            let msg = Message::from_vec(&bytes).unwrap();
            let i = msg.metadata.id.wrapping_sub(id(c, 0));
            assert!(
                i < per_socket && msg.metadata.id == id(c, i),
                "socket {c}: ID {:#x} is not one of its own",
                msg.metadata.id
            );
            assert!(seen.insert(i), "socket {c}: query {i} answered twice");
            assert_eq!(from, server(c, i), "socket {c}, query {i}: from another address");
            assert_eq!(
                msg.queries[0].name().to_string(),
                name(c, i),
                "socket {c}: another query's answer"
            );
            check(c, i, &msg, &bytes);
        }
        // Nothing more: no duplicate arrives late.
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        assert!(recv(sock).is_none(), "socket {c}: an extra answer");
    }
}

/// Cache misses answered in a burst: the upstream's answers that arrive
/// in one worker turn leave together (one send per reply address, GSO
/// trains per client), so this checks that each still reaches its own
/// client socket, exactly once, from the address that client asked, with
/// its ID and its name. Two client sockets per server; hijacked to two
/// public addresses and on the LAN listener; one query in ten is for a
/// name that does not exist (a negative answer, the full answer path)
/// mixed in with the plain ones.
#[test]
fn a_burst_of_misses_is_answered_once_each_from_the_address_each_client_asked() {
    const PER_SOCKET: u16 = 40;
    let t = DnsLab::new();
    // An upstream that answers any name (unique names: every query a miss).
    let burst_upstream = ip("198.51.100.55");
    t.lab.add_server_address(0, burst_upstream);
    let _burst = FakeDns::start(
        &t.lab.servers[0],
        sa(burst_upstream, 53),
        Behaviour::answer("203.0.113.81".parse().unwrap()),
    );
    let daemon = t.start(&forward_zone("burst", burst_upstream));
    let servers = [sa(ip(PUBLIC), 53), sa(ip("198.51.100.54"), 53), sa(ip("192.0.2.1"), 53)];
    // Two client sockets per server.
    let clients: Vec<(SocketAddr, std::net::UdpSocket)> = servers
        .iter()
        .flat_map(|&server| [server, server])
        .map(|server| (server, burst_socket(&t, "192.0.2.10:0")))
        .collect();
    let (servers, socks): (Vec<SocketAddr>, Vec<std::net::UdpSocket>) = clients.into_iter().unzip();
    let name = |c: usize, i: u16| {
        if i % 10 == 9 {
            format!("nx{c}-{i}.example.test.")
        } else {
            format!("b{c}-{i}.burst.test.")
        }
    };
    ask_a_burst_of_misses(
        &socks,
        PER_SOCKET,
        name,
        |c, _| servers[c],
        |id, name| query_bytes(id, name, RecordType::A),
        |c, i, msg, _| {
            if i % 10 == 9 {
                assert_eq!(msg.metadata.response_code, ResponseCode::NXDomain, "{msg:?}");
            } else {
                assert_eq!(msg.metadata.response_code, ResponseCode::NoError, "{msg:?}");
                let data: Vec<&RData> = msg.answers.iter().map(|r| &r.data).collect();
                assert_eq!(format!("{data:?}"), "[A(A(203.0.113.81))]", "socket {c}, query {i}");
            }
        },
    );
    let stopped = daemon.stop();
    let total = u64::from(PER_SOCKET) * socks.len() as u64;
    assert_eq!(
        stopped.counter("dns_forwarded"),
        total,
        "every query a miss, forwarded once"
    );
    assert_eq!(stopped.counter("reply_send_errors"), 0);
}

/// Answers to misses wait only for the other answers of their worker
/// turn, never for a slow upstream: a miss that a slow server answers
/// after 900 ms, asked first, must not hold back the twenty asked after
/// it of a fast one (the answers all leave through the same outbox), and
/// it must still be answered itself when its upstream answers.
#[test]
fn a_slow_upstream_answer_holds_back_no_other_answer() {
    let t = DnsLab::new();
    let (fast, slow) = (ip("198.51.100.55"), ip("198.51.100.56"));
    t.lab.add_server_address(0, fast);
    t.lab.add_server_address(0, slow);
    let _fast = FakeDns::start(
        &t.lab.servers[0],
        sa(fast, 53),
        Behaviour::answer("203.0.113.81".parse().unwrap()),
    );
    let _slow = FakeDns::start(
        &t.lab.servers[0],
        sa(slow, 53),
        Behaviour::late("203.0.113.82".parse().unwrap(), Duration::from_millis(900)),
    );
    let daemon = t.start(&(forward_zone("fast", fast) + &forward_zone("slow", slow)));
    let sock = socket(&t.lab.client, "192.0.2.10:0".parse().unwrap());
    sock.set_read_timeout(Some(Duration::from_millis(3_000))).unwrap();
    let server = sa(ip(PUBLIC), 53);
    sock.send_to(&query_bytes(1, "s.slow.test.", RecordType::A), server)
        .unwrap();
    for i in 0..20u16 {
        sock.send_to(
            &query_bytes(100 + i, &format!("f{i}.fast.test."), RecordType::A),
            server,
        )
        .unwrap();
    }
    let mut order = Vec::new();
    for _ in 0..21 {
        let (from, bytes) = recv(&sock).unwrap_or_else(|| panic!("only {} answers: {order:?}", order.len()));
        assert_eq!(from, server);
        let msg = Message::from_vec(&bytes).unwrap();
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError, "{msg:?}");
        let expected = if msg.metadata.id == 1 {
            "203.0.113.82"
        } else {
            "203.0.113.81"
        };
        let data: Vec<&RData> = msg.answers.iter().map(|r| &r.data).collect();
        assert_eq!(format!("{data:?}"), format!("[A(A({expected}))]"), "{msg:?}");
        order.push(msg.metadata.id);
    }
    assert_eq!(
        order.last(),
        Some(&1),
        "the slow answer came before a fast one: {order:?}"
    );
    let mut fast_ids = order[..20].to_vec();
    fast_ids.sort_unstable();
    assert_eq!(fast_ids, (100..120).collect::<Vec<u16>>());
    assert_eq!(daemon.stop().counter("dns_forwarded"), 21);
}

/// A hostile mix for the miss outbox: IPv4 and IPv6 client sockets, each
/// asking eight hijacked addresses of its family at once (more new reply
/// addresses than one send may open sockets for, so some answers take raw
/// IP), answers of five sizes to one client socket (GSO trains cut by
/// size), and one name in seven whose answer is over 512 bytes, asked
/// without EDNS: it must come truncated (TC=1) and within 512 bytes.
/// Every answer must reach its own socket once, from the address that
/// query went to, with its ID and its name.
#[test]
fn misses_to_many_hijacked_addresses_of_both_families_are_answered_once_each_from_the_address_asked() {
    use hickory_proto::op::{Message as Msg, OpCode};
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::A;
    const PER_SOCKET: u16 = 48;
    let t = DnsLab::new();
    let mix = ip("198.51.100.57");
    t.lab.add_server_address(0, mix);
    // bN-K.mix.test: 1 + K % 5 A records; big-K.mix.test: 40 of them.
    let _mix = FakeDns::scripted(&t.lab.servers[0], mix, |q| {
        let name = q.name().to_string();
        let count = if name.starts_with("big") {
            40
        } else {
            let k: u8 = name.split(['-', '.']).nth(1).and_then(|k| k.parse().ok()).unwrap_or(0);
            1 + k % 5
        };
        let mut m = Msg::response(0, OpCode::Query);
        for i in 0..count {
            m.add_answer(Record::from_rdata(
                q.name().clone(),
                300,
                RData::A(A::new(203, 0, 113, i)),
            ));
        }
        m
    });
    let daemon = t.start_unshed(&forward_zone("mix", mix));
    let servers4: Vec<SocketAddr> = (60..68).map(|h| sa(ip(&format!("203.0.113.{h}")), 53)).collect();
    let servers6: Vec<SocketAddr> = (60..68).map(|h| sa(ip(&format!("2001:db8:53::{h}")), 53)).collect();
    let clients: Vec<(&[SocketAddr], std::net::UdpSocket)> = [
        (&servers4[..], "192.0.2.10:0"),
        (&servers4[..], "192.0.2.10:0"),
        (&servers6[..], "[2001:db8:1::10]:0"),
        (&servers6[..], "[2001:db8:1::10]:0"),
    ]
    .into_iter()
    .map(|(servers, bind)| (servers, burst_socket(&t, bind)))
    .collect();
    let (servers, socks): (Vec<&[SocketAddr]>, Vec<std::net::UdpSocket>) = clients.into_iter().unzip();
    let name = |c: usize, i: u16| {
        if i % 7 == 6 {
            format!("big-{c}x{i}.mix.test.")
        } else {
            format!("b{c}-{i}.mix.test.")
        }
    };
    ask_a_burst_of_misses(
        &socks,
        PER_SOCKET,
        name,
        |c, i| servers[c][usize::from(i) % servers[c].len()],
        |id, name| query_bytes(id, name, RecordType::A),
        |c, i, msg, bytes| {
            assert_eq!(msg.metadata.response_code, ResponseCode::NoError, "{msg:?}");
            if i % 7 == 6 {
                assert!(
                    msg.metadata.truncation,
                    "socket {c}, query {i}: {} bytes, not TC",
                    bytes.len()
                );
                assert!(bytes.len() <= 512, "socket {c}, query {i}: {} bytes", bytes.len());
            } else {
                let k = usize::from(i as u8 % 5) + 1;
                assert!(!msg.metadata.truncation, "socket {c}, query {i}");
                assert_eq!(msg.answers.len(), k, "socket {c}, query {i}");
            }
        },
    );
    let stopped = daemon.stop();
    // How many answers took raw IP depends on how the answers fall into
    // worker turns (8 of 192 in one run), so it is not asserted.
    assert_eq!(
        stopped.counter("dns_truncated"),
        u64::from(PER_SOCKET / 7) * socks.len() as u64
    );
    assert_eq!(stopped.counter("reply_send_errors"), 0);
}

/// Answers to misses of one size leave a worker turn together, as one GSO
/// train per client; on a LAN link whose MTU is below their size (here
/// 500 bytes, answers of about 700 asked with EDNS) the kernel refuses
/// such a train, and every answer must still arrive whole (fragmented),
/// once, on the hijacked path and on the LAN listener alike.
#[test]
fn same_size_miss_answers_over_a_small_mtu_lan_link_arrive_whole() {
    use hickory_proto::op::{Edns, Message as Msg, OpCode, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, Record};
    use std::str::FromStr;
    const PER_SOCKET: u16 = 24;
    let t = DnsLab::new();
    t.lab.gateway.sh("ip link set lan0 mtu 500");
    t.lab.client.sh("ip link set lan0 mtu 500");
    let mix = ip("198.51.100.57");
    t.lab.add_server_address(0, mix);
    // 40 A records: an answer of about 700 bytes, the same size for
    // names of the same length.
    let _mix = FakeDns::scripted(&t.lab.servers[0], mix, |q| {
        let mut m = Msg::response(0, OpCode::Query);
        for i in 0..40 {
            m.add_answer(Record::from_rdata(
                q.name().clone(),
                300,
                RData::A(A::new(203, 0, 113, i)),
            ));
        }
        m
    });
    let daemon = t.start(&forward_zone("mix", mix));
    let servers = [sa(ip(PUBLIC), 53), sa(ip("192.0.2.1"), 53)];
    let socks: Vec<std::net::UdpSocket> = servers.iter().map(|_| burst_socket(&t, "192.0.2.10:0")).collect();
    let with_edns = |id: u16, name: &str| {
        let mut m = Msg::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(name).unwrap(), RecordType::A));
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
        m.to_vec().unwrap()
    };
    ask_a_burst_of_misses(
        &socks,
        PER_SOCKET,
        |c, i| format!("m{c}-{i:03}.mix.test."),
        |c, _| servers[c],
        with_edns,
        |c, i, msg, bytes| {
            assert!(bytes.len() > 500, "socket {c}: a {}-byte answer", bytes.len());
            assert!(!msg.metadata.truncation, "socket {c}, query {i}: truncated");
            assert_eq!(msg.answers.len(), 40, "socket {c}, query {i}");
        },
    );
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("reply_send_errors"), 0, "{}", stopped.log);
}

/// One name that two upstream groups answer differently, a per-client rule
/// sending one network to the other group: clients of each group asking
/// it in turn, every way a query reaches the cache (a plain query with and
/// without EDNS, one with a cookie option that takes the full parse, the
/// name in other letter case), each get their own group's answer, first
/// from the upstream and then from the cache. An answer crossing groups
/// would be one network's resolver speaking for another's.
#[test]
fn a_cached_answer_never_crosses_from_one_upstream_group_to_another() {
    let lab = Lab::with_servers(2);
    lab.add_server_address(0, ip(UPSTREAM));
    lab.add_client_address(ip("192.0.2.70"));
    let default = lab.dnsmasq(
        0,
        ip(UPSTREAM),
        "example.test",
        &["--host-record=shared.example.test,203.0.113.80"],
    );
    let office = lab.dnsmasq(
        1,
        server4(1),
        "example.test",
        &["--host-record=shared.example.test,198.51.100.200"],
    );
    let daemon = lab.start_tproxyd(&config(
        r#"
[[dns.rules]]
clients = ["192.0.2.64/26"]
domains = ["shared.example.test"]
action = "forward"
upstream = "office"
"#,
    ));
    let clients = [("192.0.2.70", "198.51.100.200"), ("192.0.2.10", "203.0.113.80")];
    let ways = [
        "shared.example.test A +nocookie",
        "shared.example.test A +noedns",
        "shared.example.test A",
        "SHARED.Example.TEST A +nocookie",
        "sHaReD.eXaMpLe.TeSt A +noedns",
    ];
    for round in 0..2 {
        for way in ways {
            for (from, expected) in clients {
                let d = dig(&lab.client, &format!("-b {from} @192.0.2.1 {way}"));
                assert_eq!(
                    d.answer_data(),
                    [expected],
                    "round {round}, {way} from {from}: {}",
                    d.raw
                );
            }
        }
    }
    // Each group's upstream was asked once (by its own network), and the
    // rest came from the cache.
    let asked = |d: &Dnsmasq| d.queries().iter().filter(|(n, _)| n == "shared.example.test").count();
    assert_eq!((asked(&office), asked(&default)), (1, 1));
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_hits"), 2 * 5 * 2 - 2, "{}", stopped.log);
}

/// A cached answer is served again from its kept encoding to whoever asks
/// the same question the same way. Clients asking one cached name with
/// the header flags, EDNS and letter case in every combination, each
/// asker differing from the one before in one of them only (a Gray code),
/// each get their own: CD and RD echoed as they set them, an OPT record
/// only when they sent one, the question as they spelt it, never the
/// bytes kept for the previous asker.
#[test]
fn each_asker_of_a_cached_name_gets_its_own_flags_edns_and_case_back() {
    let t = DnsLab::new();
    let daemon = t.start("");
    let first = t.dig(&format!("@{PUBLIC} www.example.test A +nocookie"));
    assert_eq!(first.answer_data(), ["203.0.113.80"], "{}", first.raw);
    let mut asked = 0;
    for i in 0..33u32 {
        let gray = i % 16;
        let bits = gray ^ (gray >> 1);
        let (cd, rd, edns, upper) = (bits & 1 != 0, bits & 2 != 0, bits & 4 != 0, bits & 8 != 0);
        let name = if upper { "WwW.ExAmPlE.TeSt" } else { "www.example.test" };
        let args = format!(
            "@{PUBLIC} {name} A +nocookie {} {} {}",
            if cd { "+cd" } else { "+nocd" },
            if rd { "+rd" } else { "+nord" },
            // A buffer of 512, as without EDNS: the same size limit.
            if edns { "+edns +bufsize=512" } else { "+noedns" },
        );
        let d = t.dig(&args);
        asked += 1;
        let what = format!("asker {i}, {args}: {}", d.raw);
        assert_eq!(d.answer_data(), ["203.0.113.80"], "{what}");
        assert_eq!(d.flags.contains(&"cd".to_string()), cd, "{what}");
        assert_eq!(d.flags.contains(&"rd".to_string()), rd, "{what}");
        assert_eq!(d.raw.contains("OPT PSEUDOSECTION"), edns, "{what}");
        assert_eq!(d.question, format!("{name}."), "{what}");
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_hits"), asked, "{}", stopped.log);
}
