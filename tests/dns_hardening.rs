//! The DNS engine under attack from the LAN side and from a lying upstream,
//! in the namespace lab: cache-key collisions, injected records, huge TTLs
//! and answers, strangers, floods, slow TCP readers, zone transfers and
//! CHAOS queries, and a reload that must keep the cache.

mod lab;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, CSYNC, NS, SOA, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use lab::dns::{Dig, dig};
use lab::fake_dns::FakeDns;
use lab::{Daemon, Lab};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// The "public resolver" a device has hard-coded: hijacked by the gateway.
const PUBLIC: &str = "203.0.113.53";
const UPSTREAM: &str = "198.51.100.53";
/// tproxyd's plain listener on the LAN.
const LISTEN: &str = "192.0.2.1";
/// A second LAN address of the client namespace, used as an attacker.
const STRANGER: &str = "192.0.2.66";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

/// The lab with the UDP+TCP DNS redirect, the upstream and public
/// addresses on server 0, and a second client address.
fn dns_lab() -> Lab {
    let lab = Lab::with_servers(1);
    lab.add_server_address(0, ip(UPSTREAM));
    lab.add_server_address(0, ip(PUBLIC));
    lab.add_client_address(ip(STRANGER));
    lab.install_rules("nft", "LAN_IF=lan0 DNS_TCP_PORT=15354");
    lab
}

/// An upstream that never answers, on its own address of server 0, and
/// the config tail that sends `*.silent.test` to it (`upstream_keys` go
/// into its `[dns.upstreams.silent]` table, one `key = value` per line):
/// for questions that can only end at the client's deadline.
fn silent_upstream(lab: &Lab, upstream_keys: &str) -> (FakeDns, String) {
    const SILENT: &str = "198.51.100.54";
    lab.add_server_address(0, ip(SILENT));
    let silent = FakeDns::start(
        &lab.servers[0],
        SocketAddr::new(ip(SILENT), 53),
        lab::fake_dns::Behaviour::silent(),
    );
    let tail = format!(
        r#"[dns.upstreams.silent]
servers = ["{SILENT}"]
{upstream_keys}[[dns.rules]]
domains = ["*.silent.test"]
action = "forward"
upstream = "silent"
"#
    );
    (silent, tail)
}

/// `dns_keys` go into `[dns]` (one `key = value` per line); `tail` after
/// everything (other tables).
fn config(dns_keys: &str, tail: &str) -> String {
    format!(
        r#"
mark = 255
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[dns]
ports = [53]
listen = ["{LISTEN}:53"]
tcp_listen = ["0.0.0.0:15354", "[::]:15354"]
timeout = "1500ms"
{dns_keys}
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
server_timeout = "700ms"
{tail}
"#
    )
}

/// Only the lab's main client address: the lab's LAN uses documentation
/// addresses, which the default allow list (private ranges) leaves out.
const ALLOW_CLIENT: &str = r#"allow = ["192.0.2.10/32", "2001:db8:1::/64"]"#;
const ALLOW_LAN: &str = r#"allow = ["192.0.2.0/24", "2001:db8:1::/64"]"#;

fn q(lab: &Lab, args: &str) -> Dig {
    dig(&lab.client, args)
}

/// An answer from the fake upstream.
fn response(rcode: ResponseCode, answers: Vec<Record>, authority: Vec<Record>, additional: Vec<Record>) -> Message {
    let mut m = Message::new(0, MessageType::Response, OpCode::Query);
    m.metadata.response_code = rcode;
    m.answers = answers;
    m.authorities = authority;
    m.additionals = additional;
    m
}

fn a(owner: &str, ttl: u32, addr: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A::from(std::net::Ipv4Addr::from(addr))))
}

fn soa(zone: &str) -> Record {
    let soa = SOA::new(name(zone), name("hostmaster.test."), 1, 3600, 600, 86400, 3600);
    Record::from_rdata(name(zone), 3600, RData::SOA(soa))
}

/// dnsmasq on the upstream address, authoritative for `example.test`
/// with `www.example.test A 203.0.113.80`, plus `extra` options.
fn example_upstream(lab: &Lab, extra: &[&str]) -> lab::dns::Dnsmasq {
    let mut options = vec!["--host-record=www.example.test,203.0.113.80"];
    options.extend_from_slice(extra);
    lab.dnsmasq(0, ip(UPSTREAM), "example.test", &options)
}

/// Polls until `f` holds (or panics after 5 s with `what`).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_escaped_dot_never_shares_a_cache_entry_with_a_label_boundary() {
    let lab = dns_lab();
    // dnsmasq, authoritative for test: `www\.bank.test` is the one-label
    // name "www.bank" under test, which does not exist (NXDOMAIN + SOA).
    let upstream = lab.dnsmasq(
        0,
        ip(UPSTREAM),
        "test",
        &[
            "--host-record=bank.test,198.51.100.80",
            "--host-record=www.bank.test,198.51.100.81",
        ],
    );
    let _daemon = lab.start_tproxyd(&config(ALLOW_CLIENT, ""));
    for server in [LISTEN, PUBLIC] {
        let d = q(&lab, &format!("@{server} 'www\\.bank.test' A"));
        assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);
        let d = q(&lab, &format!("@{server} www.bank.test A"));
        assert_eq!(d.status, "NOERROR", "the escaped name poisoned the real one: {}", d.raw);
        assert_eq!(d.answer_data(), ["198.51.100.81"]);
    }
    assert!(upstream.was_asked("www.bank.test"));

    // `bank\.test` is a one-label name, which dnsmasq refuses; this
    // upstream answers it NXDOMAIN with the root's SOA, as a public
    // resolver would.
    drop(_daemon);
    let fake_addr = ip("198.51.100.54");
    lab.add_server_address(0, fake_addr);
    let fake = FakeDns::scripted(&lab.servers[0], fake_addr, |q| {
        if q.name().num_labels() == 1 {
            response(ResponseCode::NXDomain, vec![], vec![soa(".")], vec![])
        } else {
            response(
                ResponseCode::NoError,
                vec![a("bank.test.", 300, [198, 51, 100, 80])],
                vec![],
                vec![],
            )
        }
    });
    let _daemon = lab.start_tproxyd(&config(ALLOW_CLIENT, "").replace(UPSTREAM, "198.51.100.54"));
    let d = q(&lab, &format!("@{LISTEN} 'bank\\.test' A"));
    assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);
    let d = q(&lab, &format!("@{PUBLIC} BANK.test A"));
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.answer_data(), ["198.51.100.80"]);
    assert_eq!(fake.asked("bank.test."), 1, "{:?}", fake.names());
    assert_eq!(fake.asked("bank\\.test."), 1, "{:?}", fake.names());
}

#[test]
fn records_injected_by_the_upstream_reach_neither_the_client_nor_the_cache() {
    let lab = dns_lab();
    let fake = FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), |q| {
        if q.name() == &name("a.test.") {
            // The real answer with a huge TTL, plus a forged record for
            // another name in every section.
            response(
                ResponseCode::NoError,
                vec![
                    a("a.test.", 1_000_000, [198, 51, 100, 10]),
                    a("bank.test.", 1_000_000, [203, 0, 113, 66]),
                ],
                vec![Record::from_rdata(
                    name("bank.test."),
                    86400,
                    RData::NS(NS(name("ns.evil.example."))),
                )],
                vec![a("ns.evil.example.", 86400, [203, 0, 113, 66])],
            )
        } else {
            response(
                ResponseCode::NoError,
                vec![a("bank.test.", 300, [198, 51, 100, 80])],
                vec![],
                vec![],
            )
        }
    });
    let daemon = lab.start_tproxyd(&config(&format!("{ALLOW_CLIENT}\ncache = {{ max_ttl = \"1h\" }}"), ""));
    for _ in 0..2 {
        // A miss, then a cache hit: the same scrubbed, clamped answer.
        let d = q(&lab, &format!("@{PUBLIC} a.test A"));
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert_eq!(d.answer_data(), ["198.51.100.10"], "{}", d.raw);
        assert!(d.authority.is_empty(), "{}", d.raw);
        assert!(!d.raw.contains("203.0.113.66") && !d.raw.contains("evil"), "{}", d.raw);
        assert!(
            d.answers[0].1 <= 3600,
            "TTL {} passed unclamped: {}",
            d.answers[0].1,
            d.raw
        );
    }
    assert_eq!(fake.asked("a.test."), 1);
    // The cache never learnt the forged bank.test: it is asked upstream.
    let d = q(&lab, &format!("@{LISTEN} bank.test A"));
    assert_eq!(d.answer_data(), ["198.51.100.80"], "{}", d.raw);
    assert_eq!(fake.asked("bank.test."), 1, "{:?}", fake.names());
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_scrubbed_records"), 3);
}

/// `n` CNAME links from `c0.<zone>` to `c<n>.<zone>`, which has an A.
fn cname_chain(zone: &str, n: usize) -> Vec<Record> {
    let mut records: Vec<Record> = (0..n)
        .map(|i| {
            Record::from_rdata(
                name(&format!("c{i}.{zone}")),
                300,
                RData::CNAME(hickory_proto::rr::rdata::CNAME(name(&format!("c{}.{zone}", i + 1)))),
            )
        })
        .collect();
    records.push(a(&format!("c{n}.{zone}"), 300, [198, 51, 100, 77]));
    records
}

#[test]
fn cname_loops_and_chains_over_sixteen_links_get_servfail_and_are_not_cached() {
    let lab = dns_lab();
    let fake = FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), |q| {
        let asked = q.name().to_ascii().to_ascii_lowercase();
        let answers = if asked.ends_with("loop.test.") {
            let mut chain = cname_chain("loop.test.", 3);
            chain.pop();
            chain.push(Record::from_rdata(
                name("c3.loop.test."),
                300,
                RData::CNAME(hickory_proto::rr::rdata::CNAME(name("c1.loop.test."))),
            ));
            chain
        } else if asked.ends_with("long.test.") {
            cname_chain("long.test.", 17)
        } else {
            cname_chain("ok.test.", 16)
        };
        response(ResponseCode::NoError, answers, vec![], vec![])
    });
    let admin: SocketAddr = "127.0.0.1:9153".parse().unwrap();
    let daemon = lab.start_tproxyd(&config(ALLOW_CLIENT, &format!("[admin]\nlisten = \"{admin}\"")));
    for _ in 0..2 {
        for broken in ["c0.loop.test", "c0.long.test"] {
            let d = q(&lab, &format!("@{PUBLIC} {broken} A"));
            assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
            assert!(d.answers.is_empty(), "{}", d.raw);
        }
        // Sixteen links are still an answer, and it is cached.
        let d = q(&lab, &format!("@{PUBLIC} c0.ok.test A"));
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert_eq!(d.answers.len(), 17, "{}", d.raw);
        assert_eq!(
            d.answer_data().last().map(String::as_str),
            Some("198.51.100.77"),
            "{}",
            d.raw
        );
    }
    // Nothing of the broken chains was cached: each query went upstream.
    assert_eq!(fake.asked("c0.loop.test."), 2, "{:?}", fake.names());
    assert_eq!(fake.asked("c0.long.test."), 2, "{:?}", fake.names());
    assert_eq!(fake.asked("c0.ok.test."), 1, "{:?}", fake.names());
    // Each of the four SERVFAILs is counted as an upstream failure.
    let metrics = lab::metrics::fetch(&lab.gateway, admin);
    let failures = lab::metrics::find(&metrics, "tproxyd_dns_upstream_failures_total");
    assert_eq!(failures, Some(4), "{metrics}");
    daemon.stop();
}

#[test]
fn huge_answers_cannot_grow_the_cache_past_max_bytes() {
    let lab = dns_lab();
    // 60 KB of TXT per name: over UDP the fake upstream truncates, so
    // tproxyd fetches it over TCP, as it would from a real server.
    let fake = FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), |q| {
        let strings = vec!["x".repeat(250); 240];
        let rec = Record::from_rdata(q.name().clone(), 3600, RData::TXT(TXT::new(strings)));
        response(ResponseCode::NoError, vec![rec], vec![], vec![])
    });
    let admin: SocketAddr = "127.0.0.1:9153".parse().unwrap();
    let _daemon = lab.start_tproxyd(&config(
        &format!("{ALLOW_CLIENT}\ncache = {{ max_bytes = \"1MiB\" }}"),
        &format!("[admin]\nlisten = \"{admin}\""),
    ));
    let out = lab.client.sh(&format!(
        "for i in $(seq 0 99); do dig +tcp +tries=1 +time=5 @{LISTEN} big$i.test TXT | grep -c 'status: NOERROR'; done"
    ));
    assert_eq!(out.lines().filter(|l| l.trim() == "1").count(), 100, "{out}");
    let metrics = lab::metrics::fetch(&lab.gateway, admin);
    let metric = |series: &str| lab::metrics::value(&metrics, series);
    let bytes = metric("tproxyd_dns_cache_bytes");
    let entries = metric("tproxyd_dns_cache_entries");
    assert!(bytes <= 1 << 20, "cache holds {bytes} bytes");
    assert!((5..=20).contains(&entries), "{entries} entries of 60 KB in 1 MiB");
    // The newest answer is still cached; the oldest was evicted. (Each miss
    // asks twice: over UDP, truncated, then over TCP.)
    let (newest, oldest) = (fake.asked("big99.test."), fake.asked("big0.test."));
    for n in ["big99.test", "big0.test"] {
        assert_eq!(q(&lab, &format!("+tcp @{LISTEN} {n} TXT")).status, "NOERROR");
    }
    assert_eq!(fake.asked("big99.test."), newest, "the newest answer was evicted");
    assert!(fake.asked("big0.test.") > oldest, "the oldest answer is still cached");
    // Memory stays near the budget: 100 answers of 60 KB are 6 MB.
    let pid = _daemon.pid();
    let rss_kb: u64 = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    eprintln!("tproxyd RSS after 100 answers of 60 KB: {rss_kb} kB; cache {bytes} bytes in {entries} entries");
}

/// A LAN device asks for names whose answers it writes itself: TXT
/// records of one-byte strings, 20 kB on the wire each. Every string is an
/// allocation of its own once parsed (about 48 bytes of heap for two on
/// the wire), so counted by wire size 100 of them fitted in a 2 MiB cache
/// and held about 48 MB. Counted with their pieces they are too big to
/// keep, and memory stays near where it was.
#[test]
fn answers_of_many_tiny_strings_cannot_grow_the_cache_past_max_bytes() {
    answers_of_one_shape_cannot_grow_the_cache_past_max_bytes("TXT", |_| {
        RData::TXT(TXT::new(vec!["x".to_string(); 10_000]))
    });
}

/// The same with CSYNC records whose type bitmap has every window full:
/// 8,710 bytes on the wire, which hickory reads into a set of 65,535
/// record types, about 850 kB of heap. Counted by wire size, 100 of them
/// fitted in a 2 MiB cache and held about 85 MB.
#[test]
fn answers_of_full_type_bitmaps_cannot_grow_the_cache_past_max_bytes() {
    answers_of_one_shape_cannot_grow_the_cache_past_max_bytes("TYPE62", |_| {
        RData::CSYNC(CSYNC::new(1, false, false, (1..=u16::MAX).map(RecordType::from)))
    });
}

/// Asks 100 names of `qtype` that an upstream answers with one record of
/// `rdata`, through a 2 MiB cache: the cache's count stays within it and
/// tproxyd's memory grows by less than 16 MB.
fn answers_of_one_shape_cannot_grow_the_cache_past_max_bytes(qtype: &str, rdata: fn(&Name) -> RData) {
    let lab = dns_lab();
    let _fake = FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), move |q| {
        let rec = Record::from_rdata(q.name().clone(), 3600, rdata(q.name()));
        response(ResponseCode::NoError, vec![rec], vec![], vec![])
    });
    let admin: SocketAddr = "127.0.0.1:9153".parse().unwrap();
    // The test is about memory, not time: a debug build parses a full
    // type bitmap slowly, and on a busy machine the usual 700 ms / 1.5 s
    // deadlines turned an answer into SERVFAIL before it could be cached.
    let conf = config(
        &format!("{ALLOW_CLIENT}\ncache = {{ max_bytes = \"2MiB\" }}"),
        &format!("[admin]\nlisten = \"{admin}\""),
    )
    .replace("timeout = \"1500ms\"", "timeout = \"10s\"")
    .replace("server_timeout = \"700ms\"", "server_timeout = \"8s\"");
    assert!(conf.contains("server_timeout = \"8s\""), "{conf}");
    let daemon = lab.start_tproxyd(&conf);
    let ask = |from: usize, to: usize| {
        lab.client.sh(&format!(
            "for i in $(seq {from} {to}); do dig +tcp +tries=1 +time=15 @{LISTEN} tiny$i.test {qtype} | grep -c 'status: NOERROR'; done"
        ))
    };
    // The first answers warm up the allocator and the TCP paths.
    let out = ask(0, 4);
    assert_eq!(out.lines().filter(|l| l.trim() == "1").count(), 5, "{out}");
    let before = lab::flood::rss(daemon.pid());
    let out = ask(5, 104);
    assert_eq!(out.lines().filter(|l| l.trim() == "1").count(), 100, "{out}");
    let after = lab::flood::rss(daemon.pid());
    let metrics = lab::metrics::fetch(&lab.gateway, admin);
    let bytes = lab::metrics::value(&metrics, "tproxyd_dns_cache_bytes");
    let entries = lab::metrics::value(&metrics, "tproxyd_dns_cache_entries");
    eprintln!("{qtype}: tproxyd RSS {before} -> {after} bytes; cache {bytes} bytes in {entries} entries");
    assert!(bytes <= 2 << 20, "cache counts {bytes} bytes");
    assert!(
        after.saturating_sub(before) < 16 << 20,
        "{qtype}: RSS grew from {before} to {after} bytes for a 2 MiB cache ({entries} entries)"
    );
}

#[test]
fn clients_outside_dns_allow_are_refused_on_every_path_and_counted() {
    let lab = dns_lab();
    let upstream = example_upstream(&lab, &[]);
    let daemon = lab.start_tproxyd(&config(ALLOW_CLIENT, ""));
    for server in [LISTEN, PUBLIC] {
        for transport in ["+notcp", "+tcp"] {
            let d = q(&lab, &format!("-b {STRANGER} {transport} @{server} www.example.test A"));
            assert_eq!(d.status, "REFUSED", "{server} {transport}: {}", d.raw);
            assert!(d.answers.is_empty());
        }
    }
    assert!(upstream.queries().is_empty(), "a stranger's query was forwarded");
    // The allowed client is answered on the same paths.
    for server in [LISTEN, PUBLIC] {
        for transport in ["+notcp", "+tcp"] {
            let d = q(&lab, &format!("{transport} @{server} www.example.test A"));
            assert_eq!(d.answer_data(), ["203.0.113.80"], "{server} {transport}: {}", d.raw);
        }
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_refused_acl"), 4);
}

#[test]
fn zone_transfers_and_chaos_queries_are_refused_locally_never_forwarded() {
    let lab = dns_lab();
    let upstream = example_upstream(&lab, &[]);
    let daemon = lab.start_tproxyd(&config(ALLOW_CLIENT, ""));
    for server in [LISTEN, PUBLIC] {
        for (query, status) in [
            ("version.bind CH TXT", "REFUSED"),
            ("hostname.bind CH TXT", "REFUSED"),
            ("+tcp id.server CH TXT", "REFUSED"),
        ] {
            let d = q(&lab, &format!("@{server} {query}"));
            assert_eq!(d.status, status, "{query}: {}", d.raw);
        }
        // Over TCP, dig's transfer mode reports the refusal as a failure.
        for xfr in ["AXFR", "IXFR=1"] {
            let out = lab
                .client
                .sh(&format!("dig +tries=1 +time=3 @{server} example.test {xfr} || true"));
            assert!(out.contains("Transfer failed"), "{out}");
            assert!(!out.contains("203.0.113.80"), "{out}");
        }
        // Over UDP (dig only sends IXFR there): NOTIMP.
        for qtype in [RecordType::AXFR, RecordType::IXFR] {
            let sock = lab::udp::socket(&lab.client, SocketAddr::new(ip("192.0.2.10"), 0));
            let mut m = Message::query();
            m.add_query(Query::query(name("example.test."), qtype));
            let to = SocketAddr::new(ip(server), 53);
            let (_, reply) = lab::udp::exchange(&sock, to, &m.to_vec().unwrap());
            let reply = Message::from_vec(&reply).unwrap();
            assert_eq!(reply.metadata.response_code, ResponseCode::NotImp, "{qtype} over UDP");
            assert!(reply.answers.is_empty());
        }
    }
    assert!(upstream.queries().is_empty(), "forwarded: {:?}", upstream.queries());
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_refused_local"), 14);
}

/// Sends `n` queries for `qname` from `from` as fast as possible and
/// returns the replies received within a second of the last one.
fn flood(lab: &Lab, from: IpAddr, n: u16, qname: &str) -> Vec<Message> {
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let sock = lab::udp::socket(&lab.client, SocketAddr::new(from, 0));
    sock.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
    for id in 0..n {
        let mut m = Message::query();
        m.metadata.id = id;
        m.add_query(Query::query(name(qname), RecordType::A));
        sock.send_to(&m.to_vec().unwrap(), to).unwrap();
    }
    let mut replies = Vec::new();
    while let Some((_, bytes)) = lab::udp::recv(&sock) {
        replies.push(Message::from_vec(&bytes).unwrap());
    }
    replies
}

#[test]
fn a_flood_from_one_client_is_rate_limited_and_the_others_are_not() {
    let lab = dns_lab();
    let printer = "[[dns.rules]]\ndomains = [\"printer.lan\"]\naction = \"answer\"\na = [\"192.0.2.50\"]\n";
    for (action, check) in [("truncate", true), ("drop", false)] {
        let daemon = lab.start_tproxyd(&config(
            &format!("{ALLOW_LAN}\nrate_limit = {{ qps = 20, burst = 20, action = \"{action}\" }}"),
            printer,
        ));
        // 150 queries: few enough that none is lost in socket buffers.
        let replies = flood(&lab, ip(STRANGER), 150, "printer.lan.");
        let answered = replies.iter().filter(|m| !m.metadata.truncation).count();
        // The burst plus what the rate refills during the flood.
        assert!((20..=40).contains(&answered), "{action}: {answered} answered");
        if check {
            assert_eq!(replies.len(), 150, "truncate answers every query");
            assert!(
                replies
                    .iter()
                    .filter(|m| m.metadata.truncation)
                    .all(|m| m.answers.is_empty())
            );
        } else {
            assert_eq!(replies.len(), answered, "drop sends nothing over the limit");
        }
        // Another client is unaffected while the flooder is still limited.
        let d = q(&lab, &format!("@{LISTEN} printer.lan A"));
        assert_eq!(d.answer_data(), ["192.0.2.50"], "{}", d.raw);
        let stopped = daemon.stop();
        let limited = stopped.counter("dns_rate_limited");
        assert_eq!(limited, 150 - answered as u64, "{action}: every limited query counted");
    }
}

/// A third LAN address of the client namespace: allowed, but flooding.
const FLOODER: &str = "192.0.2.67";

/// Queries from three clients, interleaved and sent without waiting, so
/// that they arrive in the same receive batches and their answers leave
/// together: the allowed client's are answered (its ID, its question's
/// letter case), the stranger's refused, the flooder's past its burst
/// truncated, each to the socket that asked, each ID exactly once.
#[test]
fn one_batch_of_allowed_refused_and_rate_limited_clients_answers_each_as_alone() {
    let lab = dns_lab();
    lab.add_client_address(ip(FLOODER));
    let printer = "[[dns.rules]]\ndomains = [\"printer.lan\"]\naction = \"answer\"\na = [\"192.0.2.50\"]\n";
    let allow = format!(r#"allow = ["192.0.2.10/32", "{FLOODER}/32"]"#);
    // The relay's overload shedding off: on a loaded machine a listener
    // round that starts late finds the flooder's 60 queries queued beside
    // the others' 4 and sheds 13 of them as the heaviest client's
    // (`drop_overload`), before the DNS rate limit this test is about sees
    // them. tests/abuse.rs tests the shedding.
    let config = config(
        &format!("{allow}\nrate_limit = {{ qps = 1, burst = 8, action = \"truncate\" }}"),
        printer,
    );
    let unshed = config.replacen("[relay]\n", "[relay]\nshed_after_ms = 0\n", 1);
    assert_ne!(unshed, config, "the config has no [relay] table");
    let daemon = lab.start_tproxyd(&unshed);
    let query = |id: u16| {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii("PrInTeR.lAn.").unwrap(), RecordType::A));
        m.to_vec().unwrap()
    };
    for (round, server) in [LISTEN, PUBLIC].into_iter().enumerate() {
        let to: SocketAddr = format!("{server}:53").parse().unwrap();
        let allowed = lab::udp::socket(&lab.client, SocketAddr::new(ip("192.0.2.10"), 0));
        let stranger = lab::udp::socket(&lab.client, SocketAddr::new(ip(STRANGER), 0));
        let flooder = lab::udp::socket(&lab.client, SocketAddr::new(ip(FLOODER), 0));
        // Every bucket is per address and outlives the round: the two
        // rounds together stay within the others' burst of 8, and the
        // flooder starts the second round with what the first left.
        let base = 1000 * round as u16;
        for i in 0..60u16 {
            flooder.send_to(&query(base + i), to).unwrap();
            if i < 4 {
                allowed.send_to(&query(base + 100 + i), to).unwrap();
                stranger.send_to(&query(base + 200 + i), to).unwrap();
            }
        }
        let replies = |sock: &std::net::UdpSocket, n: usize| {
            sock.set_read_timeout(Some(Duration::from_millis(1500))).unwrap();
            let mut out = Vec::new();
            while let Some((from, bytes)) = lab::udp::recv(sock) {
                assert_eq!(from, to, "an answer must come from the address asked");
                out.push(Message::from_vec(&bytes).unwrap());
                if out.len() == n {
                    break;
                }
            }
            let mut ids: Vec<u16> = out.iter().map(|m| m.metadata.id).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), out.len(), "an ID answered twice");
            out
        };
        for m in replies(&allowed, 4) {
            assert!((base + 100..base + 104).contains(&m.metadata.id), "{m:?}");
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert!(!m.metadata.truncation);
            assert_eq!(m.queries[0].name().to_ascii(), "PrInTeR.lAn.");
            let data: Vec<String> = m.answers.iter().map(|r| r.data.to_string()).collect();
            assert_eq!(data, ["192.0.2.50"]);
        }
        for m in replies(&stranger, 4) {
            assert!((base + 200..base + 204).contains(&m.metadata.id), "{m:?}");
            assert_eq!(m.metadata.response_code, ResponseCode::Refused);
            assert!(m.answers.is_empty());
        }
        let flood = replies(&flooder, 60);
        if flood.len() != 60 {
            let stopped = daemon.stop();
            let last = stopped.log.lines().rfind(|l| l.contains("final counters"));
            panic!(
                "{server}: truncate answers every query, got {} of 60: {last:?}",
                flood.len()
            );
        }
        let answered = flood.iter().filter(|m| !m.metadata.truncation).count();
        assert!(answered <= 10, "{server}: the flooder got {answered} answers");
        for m in &flood {
            assert!((base..base + 60).contains(&m.metadata.id), "{m:?}");
            if m.metadata.truncation {
                assert!(m.answers.is_empty());
            } else {
                assert_eq!(m.answers.len(), 1);
            }
        }
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_refused_acl"), 8);
    assert!(stopped.counter("dns_rate_limited") >= 100);
}

#[test]
fn slow_tcp_readers_from_one_client_cannot_starve_the_others() {
    let lab = dns_lab();
    let txt = format!("--txt-record=big.example.test,{}", vec!["y".repeat(240); 4].join(","));
    let _upstream = example_upstream(&lab, &[&txt]);
    let daemon = lab.start_tproxyd(&config(
        &format!("{ALLOW_LAN}\nrate_limit = {{ qps = 0 }}\ntcp = {{ max_per_client = 8, write_timeout = \"1s\" }}"),
        "",
    ));
    // Warm the cache so the attack needs no upstream.
    assert_eq!(q(&lab, &format!("@{LISTEN} big.example.test TXT")).status, "NOERROR");

    // 600 connections from one address (above the old global limit of
    // 512), each sending 300 pipelined queries for a 1 KB answer and never
    // reading, with a tiny receive buffer.
    let attackers: Vec<TcpStream> = lab.client.enter(|| {
        let mut query = Message::query();
        query.add_query(Query::query(name("big.example.test."), RecordType::TXT));
        let wire = query.to_vec().unwrap();
        let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&wire);
        let burst = framed.repeat(300);
        let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
        let from = SocketAddr::new(ip(STRANGER), 0);
        (0..600)
            .filter_map(|_| {
                let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
                s.set_recv_buffer_size(1024).ok()?;
                s.bind(&from.into()).ok()?;
                s.connect_timeout(&to.into(), Duration::from_secs(2)).ok()?;
                let mut s = TcpStream::from(s);
                s.set_nonblocking(true).ok()?;
                let _ = s.write(&burst); // as much as fits; never read
                Some(s)
            })
            .collect()
    });
    assert!(attackers.len() > 500, "only {} attacking connections", attackers.len());

    // A legitimate client, over UDP and TCP, is answered every time.
    let out = lab.client.sh(&format!(
        "for i in $(seq 1 25); do \
           dig +tries=1 +time=3 @{LISTEN} www.example.test A | grep -c 'status: NOERROR'; \
           dig +tcp +tries=1 +time=3 @{LISTEN} www.example.test A | grep -c 'status: NOERROR'; \
           dig +tcp +tries=1 +time=3 @{PUBLIC} www.example.test A | grep -c 'status: NOERROR'; \
         done"
    ));
    assert_eq!(out.lines().filter(|l| l.trim() == "1").count(), 75, "{out}");
    // Readers that never read are dropped after the write timeout.
    eventually("slow readers still connected", || {
        lab.gateway
            .sh("ss -tnH state established '( sport = :53 )' | wc -l")
            .trim()
            == "0"
    });
    drop(attackers);
    let stopped = daemon.stop();
    assert!(stopped.counter("dns_tcp_refused_per_client") >= 550, "{}", stopped.log);
    assert!(stopped.counter("dns_tcp_write_timeouts") >= 1, "{}", stopped.log);
}

/// A query for `qname` `qtype` with ID `id`, length-prefixed for TCP.
fn tcp_framed(id: u16, qname: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    // `from_ascii` keeps the letter case (`from_str` lowercases).
    m.add_query(Query::query(Name::from_ascii(qname).unwrap(), qtype));
    let wire = m.to_vec().unwrap();
    let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&wire);
    framed
}

/// Reads length-prefixed answers from `s` until it closes or `n` came (or
/// 20 s passed), in the order they arrived.
fn tcp_answers(s: &mut TcpStream, n: usize) -> Vec<Message> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut out = Vec::new();
    let mut len = [0u8; 2];
    while out.len() < n && s.read_exact(&mut len).is_ok() {
        let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if s.read_exact(&mut body).is_err() {
            break; // closed in the middle of an answer
        }
        out.push(Message::from_vec(&body).expect("a well-formed answer"));
    }
    out
}

/// A device sends its queries on one TCP connection without waiting for
/// the answers (RFC 7766 6.2.1), the first for a name whose upstream never
/// answers. The names tproxyd has cached are answered at once, ahead of it,
/// instead of after it gives up on the first (`dns.timeout`); every query
/// is answered exactly once with its own ID and question, also when the
/// client sends more at once than tproxyd answers at once per connection.
#[test]
fn pipelined_tcp_queries_are_answered_as_each_is_ready_each_once() {
    let lab = dns_lab();
    let _upstream = example_upstream(&lab, &[]);
    let (_silent, tail) = silent_upstream(&lab, "");
    let daemon = lab.start_tproxyd(&config(&format!("{ALLOW_LAN}\nrate_limit = {{ qps = 0 }}"), &tail));
    // Cached: answered without an upstream from now on.
    assert_eq!(q(&lab, &format!("@{LISTEN} www.example.test A")).status, "NOERROR");
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let connect = move || TcpStream::connect_timeout(&to, Duration::from_secs(3)).unwrap();

    // One miss that can only end in SERVFAIL, then nine cache hits.
    let mut s = lab.client.enter(connect);
    let mut burst = tcp_framed(100, "never.silent.test.", RecordType::A);
    for id in 101..110 {
        burst.extend(tcp_framed(id, "WwW.example.test.", RecordType::A));
    }
    s.write_all(&burst).unwrap();
    let got = tcp_answers(&mut s, 10);
    let ids: Vec<u16> = got.iter().map(|m| m.metadata.id).collect();
    assert_eq!(got.len(), 10, "answers {ids:?}");
    assert_eq!(ids.last(), Some(&100), "the cached names waited for the miss: {ids:?}");
    for m in &got {
        let rcode = if m.metadata.id == 100 {
            ResponseCode::ServFail
        } else {
            ResponseCode::NoError
        };
        assert_eq!(m.metadata.response_code, rcode, "{m:?}");
        let asked = if m.metadata.id == 100 {
            "never.silent.test."
        } else {
            "WwW.example.test."
        };
        assert_eq!(
            m.queries[0].name().to_string(),
            asked,
            "the question as asked: {ids:?} {m:?}"
        );
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (100..110).collect::<Vec<u16>>(), "each once");

    // More misses at once than one connection is answered at once, with
    // hits between them: every one is answered, once.
    let mut s = lab.client.enter(connect);
    let mut burst = Vec::new();
    for id in 0..40u16 {
        if id % 4 == 0 {
            burst.extend(tcp_framed(id, "www.example.test.", RecordType::A));
        } else {
            burst.extend(tcp_framed(id, &format!("n{id}.silent.test."), RecordType::A));
        }
    }
    s.write_all(&burst).unwrap();
    let mut ids: Vec<u16> = tcp_answers(&mut s, 40).iter().map(|m| m.metadata.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..40).collect::<Vec<u16>>(), "each answered once");
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_tcp_queries"), 50, "{}", stopped.log);
}

/// A LAN device asks, over TCP, for a name others will ask for too (its
/// query leads the single flight, so theirs wait for its answer), then
/// makes tproxyd's writes to it block: pipelined queries for a cached
/// 1 KB answer, never read, behind a tiny receive buffer. While one of
/// its answers waits to be written, its connection's other queries must
/// still move on: the late upstream's answer to the shared name reaches
/// the other client, instead of that client getting SERVFAIL at
/// `dns.timeout` because the leader was not looked at until the blocked
/// write gave up (`write_timeout`, 30 s here).
#[test]
fn a_tcp_client_that_does_not_read_cannot_stall_a_shared_question() {
    const LATE: &str = "198.51.100.55";
    let lab = dns_lab();
    lab.add_server_address(0, ip(LATE));
    let txt = format!("--txt-record=big.example.test,{}", vec!["y".repeat(240); 4].join(","));
    let _upstream = example_upstream(&lab, &[&txt]);
    let late = FakeDns::start(
        &lab.servers[0],
        SocketAddr::new(ip(LATE), 53),
        lab::fake_dns::Behaviour::late("203.0.113.77".parse().unwrap(), Duration::from_millis(500)),
    );
    let daemon = lab.start_tproxyd(&config(
        &format!("{ALLOW_LAN}\nrate_limit = {{ qps = 0 }}\ntcp = {{ write_timeout = \"30s\" }}"),
        &format!(
            r#"[dns.upstreams.late]
servers = ["{LATE}"]
[[dns.rules]]
domains = ["*.late.test"]
action = "forward"
upstream = "late"
"#
        ),
    ));
    assert_eq!(q(&lab, &format!("@{LISTEN} big.example.test TXT")).status, "NOERROR");

    let _attacker: TcpStream = lab.client.enter(|| {
        let mut burst = tcp_framed(1, "shared.late.test.", RecordType::A);
        for id in 2..600 {
            burst.extend(tcp_framed(id, "big.example.test.", RecordType::TXT));
        }
        let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(1024).unwrap();
        s.bind(&SocketAddr::new(ip(STRANGER), 0).into()).unwrap();
        s.connect_timeout(&to.into(), Duration::from_secs(2)).unwrap();
        let mut s = TcpStream::from(s);
        s.write_all(&burst).unwrap(); // never read
        s
    });
    // The device's question is on its way upstream (answered in 500 ms).
    std::thread::sleep(Duration::from_millis(150));
    let other = q(&lab, &format!("@{LISTEN} shared.late.test A"));
    assert_eq!(other.status, "NOERROR", "{}", other.raw);
    assert_eq!(other.answer_data(), ["203.0.113.77"]);
    assert_eq!(late.asked("shared.late.test."), 1, "one flight: {:?}", late.names());
    drop(daemon.stop());
}

/// A LAN device keeps a shared question's leadership among its own TCP
/// connections: each asks a name whose upstream never answers, and each
/// is reset (RST) just before its query's `dns.timeout` runs out, while
/// the next one already waits on the same flight. Each reset abandons
/// the flight, and a waiter that asked later takes it over with a later
/// deadline. Another client asking the same name over UDP must still get
/// its SERVFAIL within its own `dns.timeout` (1.5 s here; dig waits 3 s),
/// not be carried along for as long as the device keeps it up (about 7 s).
#[test]
fn a_waiter_on_a_shared_question_is_answered_by_its_own_deadline() {
    let lab = dns_lab();
    let (_silent, tail) = silent_upstream(&lab, "server_timeout = \"10s\"\n");
    let admin: SocketAddr = "127.0.0.1:9153".parse().unwrap();
    let daemon = lab.start_tproxyd(&config(
        &format!("{ALLOW_LAN}\nrate_limit = {{ qps = 0 }}"),
        &format!("{tail}[admin]\nlisten = \"{admin}\"\n"),
    ));
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let client = lab.client.name.clone();
    let honest = std::thread::spawn(move || {
        // Asks once the device's first query leads the flight.
        std::thread::sleep(Duration::from_millis(100));
        let asked = Instant::now();
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &client, "dig", "+tries=1", "+time=3"])
            .arg(format!("@{LISTEN}"))
            .args(["held.silent.test", "A"])
            .output()
            .expect("running dig");
        (String::from_utf8_lossy(&out.stdout).into_owned(), asked.elapsed())
    });
    let resets = lab.client.enter(move || {
        let start = Instant::now();
        let mut open: std::collections::VecDeque<(Instant, socket2::Socket)> = Default::default();
        let mut resets = 0;
        for i in 0..14u32 {
            let ask_at = start + Duration::from_millis(400) * i;
            while let Some((reset_at, _)) = open.front() {
                if *reset_at > ask_at {
                    break;
                }
                std::thread::sleep(reset_at.saturating_duration_since(Instant::now()));
                // SO_LINGER 0: the close is a reset, and the daemon drops
                // the connection's query (and the flight it leads) at once.
                let (_, s) = open.pop_front().unwrap();
                s.set_linger(Some(Duration::ZERO)).unwrap();
                drop(s);
                resets += 1;
            }
            std::thread::sleep(ask_at.saturating_duration_since(Instant::now()));
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.bind(&SocketAddr::new(ip(STRANGER), 0).into()).unwrap();
            s.connect_timeout(&to.into(), Duration::from_secs(2)).unwrap();
            (&s).write_all(&tcp_framed(i as u16, "held.silent.test.", RecordType::A))
                .unwrap();
            open.push_back((Instant::now() + Duration::from_millis(1300), s));
        }
        for (reset_at, s) in open {
            std::thread::sleep(reset_at.saturating_duration_since(Instant::now()));
            s.set_linger(Some(Duration::ZERO)).unwrap();
            drop(s);
            resets += 1;
        }
        resets
    });
    let (raw, took) = honest.join().unwrap();
    assert_eq!(resets, 14);
    let honest = lab::dns::parse_dig(&raw);
    assert_eq!(honest.status, "SERVFAIL", "after {took:?}: {raw}");
    eprintln!("the honest client was answered after {took:?}");
    // Counted as a waiter that gave up at its own deadline.
    let metrics = lab::metrics::fetch(&lab.gateway, admin);
    assert!(lab::metrics::value(&metrics, "tproxyd_dns_coalesced_late_total") >= 1);
    drop(daemon.stop());
}

#[test]
fn the_cache_survives_a_reload_that_keeps_the_cache_settings() {
    let lab = dns_lab();
    let upstream = example_upstream(&lab, &[]);
    let mut daemon = lab.start_tproxyd(&config(ALLOW_CLIENT, ""));
    let asked = || {
        upstream
            .queries()
            .iter()
            .filter(|(n, _)| n == "www.example.test")
            .count()
    };
    let reloads = |d: &Daemon| d.log_text().matches("configuration reloaded").count();
    assert_eq!(
        q(&lab, &format!("@{PUBLIC} www.example.test A")).answer_data(),
        ["203.0.113.80"]
    );
    assert_eq!(asked(), 1);
    // A reload that changes rules but not the cache.
    let rule = "[[dns.rules]]\ndomains = [\"printer.lan\"]\naction = \"answer\"\na = [\"192.0.2.50\"]\n";
    std::fs::write(&daemon.config, config(ALLOW_CLIENT, rule)).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("first reload", || reloads(&daemon) == 1);
    assert_eq!(
        q(&lab, &format!("@{PUBLIC} printer.lan A")).answer_data(),
        ["192.0.2.50"]
    );
    assert_eq!(
        q(&lab, &format!("@{PUBLIC} www.example.test A")).answer_data(),
        ["203.0.113.80"]
    );
    assert_eq!(asked(), 1, "the reload emptied the cache");
    // Changing a cache setting starts afresh.
    std::fs::write(
        &daemon.config,
        config(&format!("{ALLOW_CLIENT}\ncache = {{ max_ttl = \"1h\" }}"), rule),
    )
    .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    eventually("second reload", || reloads(&daemon) == 2);
    assert_eq!(
        q(&lab, &format!("@{PUBLIC} www.example.test A")).answer_data(),
        ["203.0.113.80"]
    );
    assert_eq!(asked(), 2);
    daemon.wait_for_log("starting with an empty cache", Duration::from_secs(1));
}

#[test]
fn with_every_upstream_dead_known_names_are_answered_stale_within_two_seconds() {
    let lab = dns_lab();
    let upstream = example_upstream(&lab, &["--host-record=private.example.test,203.0.113.81"]);
    // Answers expire after a second; private.example.test opts out.
    let opt_out = "[[dns.rules]]\ndomains = [\"private.example.test\"]\naction = \"forward\"\nstale = false\n";
    // With the upstream pending for 6 s, a stale answer can only come from
    // answer_after (an upstream that fails outright is answered stale at once).
    let daemon = lab.start_tproxyd(
        &config(&format!("{ALLOW_CLIENT}\ncache = {{ max_ttl = \"1s\" }}"), opt_out)
            .replace("timeout = \"1500ms\"", "timeout = \"6s\"")
            .replace("server_timeout = \"700ms\"", "server_timeout = \"6s\""),
    );
    for n in ["www.example.test", "private.example.test"] {
        assert_eq!(q(&lab, &format!("@{PUBLIC} {n} A")).status, "NOERROR");
    }
    lab.kill(upstream.pid);
    std::thread::sleep(Duration::from_millis(1_500));
    let mut first = true;
    for server in [LISTEN, PUBLIC] {
        for transport in ["+notcp", "+tcp"] {
            let started = Instant::now();
            let d = q(&lab, &format!("+time=9 {transport} @{server} www.example.test A"));
            let took = started.elapsed();
            assert_eq!(d.status, "NOERROR", "{server} {transport}: {}", d.raw);
            assert_eq!(d.answer_data(), ["203.0.113.80"]);
            assert!(d.answers[0].1 <= 30, "stale TTL {}", d.answers[0].1);
            // dns.stale.answer_after is 1.8 s; at dns.timeout (6 s) it would
            // be SERVFAIL. The bound leaves room for a loaded machine, where
            // starting dig alone can take a second.
            eprintln!("stale answer {server} {transport}: {took:?}");
            assert!(took < Duration::from_millis(5_500), "took {took:?}");
            // The first asker waits answer_after; later ones may share its
            // upstream query, and get stale as soon as that one fails.
            if first {
                assert!(
                    took >= Duration::from_millis(1_700),
                    "took {took:?}: stale before answer_after"
                );
                first = false;
            }
        }
    }
    // The opted-out name is not served stale: SERVFAIL after dns.timeout.
    let d = q(&lab, &format!("+time=9 @{PUBLIC} private.example.test A"));
    assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
    // A name never seen has nothing stale either.
    assert_eq!(
        q(&lab, &format!("+time=9 @{PUBLIC} new.example.test A")).status,
        "SERVFAIL"
    );
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_stale_served"), 4);
}

#[test]
fn the_cache_file_outlives_a_restart_and_a_corrupt_one_is_ignored() {
    let lab = dns_lab();
    let upstream = example_upstream(&lab, &[]);
    let file = lab.path("dns-cache");
    let cfg = config(
        &format!("{ALLOW_CLIENT}\ncache = {{ file = \"{}\" }}", file.display()),
        "",
    );
    let daemon = lab.start_tproxyd(&cfg);
    assert_eq!(
        q(&lab, &format!("@{PUBLIC} www.example.test A")).answer_data(),
        ["203.0.113.80"]
    );
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_file_saved"), 1, "{}", stopped.log);
    assert!(file.exists());

    // Restarted with the upstream dead: the name is still answered, from
    // the file, with its TTL aged.
    lab.kill(upstream.pid);
    let daemon = lab.start_tproxyd(&cfg);
    let d = q(&lab, &format!("@{PUBLIC} www.example.test A"));
    assert_eq!(d.answer_data(), ["203.0.113.80"], "{}", d.raw);
    assert!(d.answers[0].1 <= 300);
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_file_loaded"), 1);
    assert_eq!(stopped.counter("dns_cache_hits"), 1);

    // A corrupt file: a warning, a cold cache, a running daemon.
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes.truncate(n - 7);
    std::fs::write(&file, &bytes).unwrap();
    let mut daemon = lab.start_tproxyd(&cfg);
    daemon.wait_for_log("DNS cache file ignored", Duration::from_secs(2));
    assert_eq!(
        q(&lab, &format!("+time=5 @{PUBLIC} www.example.test A")).status,
        "SERVFAIL"
    );
    drop(daemon); // saves its (empty) cache on the way out
    std::fs::write(&file, b"\x00garbage").unwrap();
    let mut daemon = lab.start_tproxyd(&cfg);
    daemon.wait_for_log("not a tproxyd cache file", Duration::from_secs(2));
    // Serving, with a cold cache.
    assert_eq!(
        q(&lab, &format!("+time=5 @{PUBLIC} www.example.test A")).status,
        "SERVFAIL"
    );
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_file_errors"), 1);
}

/// A TCP connection to `to` from `src` (an address of the namespace the
/// calling thread is in).
fn tcp_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, socket};
    use std::os::fd::AsRawFd;
    let family = if src.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    bind(fd.as_raw_fd(), &SockaddrStorage::from(SocketAddr::new(src, 0)))?;
    connect(fd.as_raw_fd(), &SockaddrStorage::from(to))?;
    Ok(TcpStream::from(fd))
}

/// The transparent TCP listener takes connections to any local address,
/// the gateway's WAN address included, and nothing in the redirect rules
/// keeps the WAN from it. Hosts there, outside `dns.allow`, may hold a few
/// connections (each query on them is REFUSED) but not the LAN's.
#[test]
fn strangers_on_the_wan_cannot_take_the_lans_dns_tcp_connections() {
    let lab = dns_lab();
    let _upstream = example_upstream(&lab, &[]);
    let daemon = lab.start_tproxyd(&config(
        &format!("{ALLOW_CLIENT}\ntcp = {{ max_connections = 32, max_per_client = 4, idle_timeout = \"60s\" }}"),
        "",
    ));
    // Ten WAN hosts, four idle connections each: more than every slot.
    let wan: Vec<IpAddr> = (20..30).map(|i| ip(&format!("198.51.100.{i}"))).collect();
    for a in &wan {
        lab.servers[0].sh(&format!("ip addr add {a}/25 dev wan0"));
    }
    let to = SocketAddr::new(lab::gateway_wan4(0), 15354);
    let held = lab.servers[0].enter(move || {
        wan.iter()
            .flat_map(|&a| (0..4).map(move |_| tcp_from(a, to)))
            .collect::<Vec<_>>()
    });
    assert!(held.iter().all(Result::is_ok), "{held:?}");
    // Give the daemon time to take them all.
    std::thread::sleep(Duration::from_secs(1));
    for server in [PUBLIC, LISTEN] {
        let d = q(&lab, &format!("+tcp @{server} www.example.test A"));
        assert_eq!(d.answer_data(), ["203.0.113.80"], "{server}: {}", d.raw);
    }
    drop(held);
    let stopped = daemon.stop();
    // All but the four the strangers share were closed at once.
    assert!(stopped.counter("dns_refused_acl") >= 36, "{}", stopped.log);
    assert_eq!(stopped.counter("dns_dropped_overload"), 0);
}

/// The cache file is read as root at start, from a directory the daemon's
/// user writes (it saves the file there): what that user left at the path
/// must neither hold the start nor fill a root process's memory.
fn cache_file_lab() -> (Lab, lab::dns::Dnsmasq, std::path::PathBuf, String) {
    let lab = dns_lab();
    let upstream = example_upstream(&lab, &[]);
    let file = lab.path("dns-cache");
    let cfg = config(
        &format!("{ALLOW_CLIENT}\ncache = {{ file = \"{}\" }}", file.display()),
        "",
    );
    (lab, upstream, file, cfg)
}

#[test]
fn a_cache_file_that_is_a_fifo_does_not_hold_the_start() {
    let (lab, _upstream, file, cfg) = cache_file_lab();
    nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    // Waits for "tproxyd ready": a start blocked on the FIFO never gets there.
    let mut daemon = lab.start_tproxyd(&cfg);
    daemon.wait_for_log("not a regular file", Duration::from_secs(2));
    let d = q(&lab, &format!("@{PUBLIC} www.example.test A"));
    assert_eq!(d.answer_data(), ["203.0.113.80"], "{}", d.raw);
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_file_errors"), 1, "{}", stopped.log);
}

#[test]
fn a_huge_cache_file_is_not_read_into_memory() {
    let (lab, _upstream, file, cfg) = cache_file_lab();
    // 1 GiB, sparse: costs no disk, and nothing like what a 32 MiB cache writes.
    std::fs::File::create(&file).unwrap().set_len(1 << 30).unwrap();
    let mut daemon = lab.start_tproxyd(&cfg);
    let status = std::fs::read_to_string(format!("/proc/{}/status", daemon.pid())).unwrap();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    assert!(
        peak_kib < 256 * 1024,
        "peak RSS {peak_kib} kB after starting with a 1 GiB cache file"
    );
    daemon.wait_for_log("a cache of this max_bytes writes", Duration::from_secs(2));
    let d = q(&lab, &format!("@{PUBLIC} www.example.test A"));
    assert_eq!(d.answer_data(), ["203.0.113.80"], "{}", d.raw);
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_file_errors"), 1, "{}", stopped.log);
}

/// Entries come back from the file under the clamps of the daemon that
/// reads it, not of the one that wrote it (nor of whoever edited it).
#[test]
fn entries_from_the_cache_file_get_the_ttl_clamps_in_force() {
    let (lab, _upstream, file, cfg) = cache_file_lab();
    let daemon = lab.start_tproxyd(&cfg);
    let d = q(&lab, &format!("@{PUBLIC} www.example.test A"));
    assert!(d.answers[0].1 > 200, "{}", d.raw);
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_file_saved"), 1, "{}", stopped.log);
    // The same file, with max_ttl lowered to a minute.
    let lowered = cfg.replace("cache = {", "cache = { max_ttl = \"60s\",");
    assert_ne!(lowered, cfg);
    let daemon = lab.start_tproxyd(&lowered);
    for _ in 0..2 {
        let d = q(&lab, &format!("@{PUBLIC} www.example.test A"));
        assert_eq!(d.answer_data(), ["203.0.113.80"], "{}", d.raw);
        assert!(d.answers[0].1 <= 60, "TTL above max_ttl: {}", d.raw);
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_cache_file_loaded"), 1, "{}", stopped.log);
    assert_eq!(stopped.counter("dns_cache_hits"), 2);
    let _ = file;
}

#[test]
fn a_hot_name_is_refreshed_before_it_expires_and_never_misses_again() {
    let lab = dns_lab();
    let upstream = example_upstream(&lab, &[]);
    // Answers live 5 s: prefetch may start in the last 500 ms.
    let daemon = lab.start_tproxyd(&config(&format!("{ALLOW_CLIENT}\ncache = {{ max_ttl = \"5s\" }}"), ""));
    // About 10 queries a second for 13 s: two TTL boundaries and a half.
    // (A socket of our own: spawning dig 10 times a second is too slow on
    // a loaded machine.)
    let sock = lab::udp::socket(&lab.client, SocketAddr::new(ip("192.0.2.10"), 0));
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let (mut asked, mut answered) = (0u16, 0);
    let end = Instant::now() + Duration::from_secs(13);
    while Instant::now() < end {
        asked += 1;
        let mut m = Message::query();
        m.metadata.id = asked;
        m.add_query(Query::query(name("www.example.test."), RecordType::A));
        let (_, reply) = lab::udp::exchange(&sock, to, &m.to_vec().unwrap());
        let reply = Message::from_vec(&reply).unwrap();
        if reply.metadata.id == asked
            && reply.metadata.response_code == ResponseCode::NoError
            && reply.answers.len() == 1
        {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(answered, asked, "every query answered");
    assert!(answered > 60, "only {answered} queries");
    let stopped = daemon.stop();
    // Only the very first query waited for the upstream.
    assert_eq!(stopped.counter("dns_cache_misses"), 1, "{}", stopped.log);
    assert!(stopped.counter("dns_prefetches") >= 2);
    let asked = upstream
        .queries()
        .iter()
        .filter(|(n, _)| n == "www.example.test")
        .count();
    assert_eq!(asked as u64, 1 + stopped.counter("dns_prefetches"));
}

/// On a port above 1024 any local user may bind a UDP socket; with
/// `SO_REUSEADDR` on both sides (or `SO_REUSEPORT` for the same user) the
/// kernel would let it share the DNS listener's address and hand it the
/// queries. The listener sets neither, so the bind fails and every query
/// is still answered by tproxyd.
#[test]
fn another_user_cannot_bind_the_dns_port_and_take_its_queries() {
    lab::require_uid_65534();
    let lab = dns_lab();
    let _upstream = example_upstream(&lab, &[]);
    let listen = SocketAddr::new(ip(LISTEN), 5300);
    let daemon = lab.start_tproxyd(&config(ALLOW_CLIENT, "").replace(&format!("{LISTEN}:53"), &listen.to_string()));
    let taken = [
        lab.gateway.bind_as_nobody(listen, false),
        lab.gateway.bind_as_nobody(listen, true),
        lab.gateway.bind_as_nobody(SocketAddr::new(ip("0.0.0.0"), 5300), false),
    ];
    for i in 0..10 {
        let d = q(&lab, &format!("+notcp -p 5300 @{LISTEN} www.example.test A"));
        assert_eq!(
            d.answer_data(),
            ["203.0.113.80"],
            "query {i}; the other user's binds: {:?}; {}",
            taken
                .iter()
                .map(|t| t.as_ref().map(|_| ()).map_err(|e| e.kind()))
                .collect::<Vec<_>>(),
            d.raw
        );
    }
    assert!(
        taken.iter().all(Result::is_err),
        "another user shares the DNS port: {taken:?}"
    );
    drop(daemon.stop());
}

/// A LAN device with four addresses holds 16 DNS-over-TCP connections on
/// each, every one pipelining 16 queries and never reading: two
/// addresses ask for a 60 kB answer, almost all of the 32 MiB of unsent
/// answers all connections may hold, a third for a 12 kB one and the
/// fourth for a 1 kB one, which fills what is left to within a few kB
/// (a connection refused room is closed and gives its room back, so the
/// small answers are what leaves the budget full). Another client that
/// pipelines eight queries for the big answer on one connection and
/// reads them through a slow link must get all eight, not have its
/// connection closed (`unread_answers`) because its second answer found
/// the shared room taken by the device.
#[test]
fn a_device_that_never_reads_cannot_take_the_unsent_answer_room_of_a_reader() {
    let lab = dns_lab();
    let hogs = [
        (STRANGER, "big"),
        ("192.0.2.67", "big"),
        ("192.0.2.68", "mid"),
        ("192.0.2.69", "small"),
    ];
    for (a, _) in &hogs[1..] {
        lab.add_client_address(ip(a));
    }
    let _fake = FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), |q| {
        let n = match q.name().to_string().as_str() {
            "big.test." => 240,
            "mid.test." => 48,
            _ => 4,
        };
        let rec = Record::from_rdata(q.name().clone(), 3600, RData::TXT(TXT::new(vec!["x".repeat(250); n])));
        response(ResponseCode::NoError, vec![rec], vec![], vec![])
    });
    let daemon = lab.start_tproxyd(&config(
        &format!("{ALLOW_LAN}\nrate_limit = {{ qps = 0 }}\ntcp = {{ write_timeout = \"60s\" }}"),
        "",
    ));
    // Cached: the device's answers need no upstream.
    for (_, n) in &hogs[1..] {
        assert_eq!(q(&lab, &format!("+tcp @{LISTEN} {n}.test TXT")).status, "NOERROR");
    }
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let mut held: Vec<TcpStream> = Vec::new();
    for (a, n) in hogs {
        held.extend(lab.client.enter(move || {
            let burst: Vec<u8> = (0..16u16)
                .flat_map(|id| tcp_framed(id, &format!("{n}.test."), RecordType::TXT))
                .collect();
            (0..16)
                .map(|_| {
                    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                    s.set_recv_buffer_size(1024).unwrap();
                    s.bind(&SocketAddr::new(ip(a), 0).into()).unwrap();
                    s.connect_timeout(&to.into(), Duration::from_secs(2)).unwrap();
                    let mut s = TcpStream::from(s);
                    s.write_all(&burst).unwrap(); // never read
                    s
                })
                .collect::<Vec<_>>()
        }));
        // Bigger answers queue first, smaller ones fill what is left.
        std::thread::sleep(Duration::from_millis(700));
    }
    // UDP never needed that room.
    let udp = q(&lab, &format!("@{LISTEN} small.test TXT"));
    assert_eq!(udp.status, "NOERROR", "{}", udp.raw);
    for round in 0..3u16 {
        // A reader behind a slow link: its answers are written a part at
        // a time, so the next one is ready before the last is written.
        let mut s = lab.client.enter(move || {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_recv_buffer_size(4096).unwrap();
            s.connect_timeout(&to.into(), Duration::from_secs(3)).unwrap();
            TcpStream::from(s)
        });
        let burst: Vec<u8> = (0..8u16)
            .flat_map(|id| tcp_framed(round * 8 + id, "big.test.", RecordType::TXT))
            .collect();
        s.write_all(&burst).unwrap();
        let got = tcp_answers(&mut s, 8);
        assert_eq!(
            got.len(),
            8,
            "round {round}: {} of 8 answers before the close",
            got.len()
        );
    }
    drop(held);
    let stopped = daemon.stop();
    eprintln!("closed for unread answers: {}", stopped.counter("dns_tcp_unread"));
}
