//! Block rules apply to the names an answer's CNAME chain leads to
//! ("CNAME cloaking": a tracker behind a first-party alias), in the
//! namespace lab with dnsmasq as the upstream and dig as the client:
//! from upstream and from the cache, over UDP and TCP, for A and AAAA,
//! across a reload, and not with `dns.block_cname_targets = false`.

mod lab;

use lab::dns::{Dig, Dnsmasq, dig};
use lab::{Daemon, Lab};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The "public resolver" a device has hard-coded: hijacked by the gateway.
const PUBLIC: &str = "203.0.113.53";
const UPSTREAM: &str = "198.51.100.53";
const ADMIN: &str = "127.0.0.1:9153";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// The lab with the UDP+TCP DNS redirect and a dnsmasq upstream,
/// authoritative for `example.test` and `adnet.test`, where
/// `metrics.example.test` is an alias of `Tracker.AdNet.test` (odd case
/// kept as dnsmasq sends it), `pixel.example.test` one of
/// `px.nulltrack.test`, and `www.example.test` a plain name.
fn lab() -> (Lab, Dnsmasq) {
    let lab = Lab::with_servers(1);
    lab.add_server_address(0, ip(UPSTREAM));
    lab.add_server_address(0, ip(PUBLIC));
    lab.install_rules("nft", "LAN_IF=lan0 DNS_TCP_PORT=15354");
    let upstream = lab.dnsmasq(
        0,
        ip(UPSTREAM),
        "example.test",
        &[
            "--auth-zone=adnet.test",
            "--auth-zone=nulltrack.test",
            "--host-record=www.example.test,203.0.113.80,2001:db8::80",
            "--host-record=Tracker.AdNet.test,203.0.113.99,2001:db8::99",
            "--host-record=px.nulltrack.test,203.0.113.98,2001:db8::98",
            "--cname=metrics.example.test,Tracker.AdNet.test",
            "--cname=pixel.example.test,px.nulltrack.test",
        ],
    );
    (lab, upstream)
}

/// `dns_keys` go into `[dns]`; `rules` after the upstream group.
fn config(dns_keys: &str, rules: &str) -> String {
    format!(
        r#"
mark = 255
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[admin]
listen = "{ADMIN}"
[dns]
ports = [53]
tcp_listen = ["0.0.0.0:15354", "[::]:15354"]
timeout = "1500ms"
allow = ["192.0.2.0/24", "2001:db8:1::/64"]
{dns_keys}
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
server_timeout = "700ms"
{rules}
"#
    )
}

/// The block list (adblock syntax: the name and everything below it) and
/// an exact-name rule with the `null` mode.
fn block_rules(lab: &Lab) -> String {
    let list = lab.path("trackers.txt");
    std::fs::write(&list, "# trackers\n||adnet.test^\n").unwrap();
    format!(
        r#"[[dns.rules]]
lists = ["{}"]
action = "block"
[[dns.rules]]
domains = ["px.nulltrack.test"]
action = "block"
block = "null"
"#,
        list.display()
    )
}

fn q(lab: &Lab, args: &str) -> Dig {
    dig(&lab.client, &format!("@{PUBLIC} {args}"))
}

/// Times dnsmasq was asked `name`.
fn asked(upstream: &Dnsmasq, name: &str) -> usize {
    upstream
        .queries()
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .count()
}

fn cname_blocks(lab: &Lab) -> u64 {
    let metrics = lab::metrics::fetch(&lab.gateway, ADMIN.parse::<SocketAddr>().unwrap());
    lab::metrics::value(&metrics, "tproxyd_dns_queries_by_action_total{action=\"block_cname\"}")
}

fn assert_nxdomain(d: &Dig) {
    assert_eq!(d.status, "NXDOMAIN", "{}", d.raw);
    assert!(d.answers.is_empty(), "{}", d.raw);
}

#[test]
fn a_name_whose_cname_target_is_blocked_gets_the_block_answer_from_upstream_and_from_the_cache() {
    let (lab, upstream) = lab();
    let _daemon = lab.start_tproxyd(&config("", &block_rules(&lab)));
    // First from upstream, then from the cache: the same block answer.
    for _ in 0..2 {
        assert_nxdomain(&q(&lab, "metrics.example.test A"));
        assert_nxdomain(&q(&lab, "METRICS.Example.Test. AAAA"));
        assert_nxdomain(&q(&lab, "+tcp metrics.example.test A"));
    }
    assert_eq!(asked(&upstream, "metrics.example.test"), 2, "{:?}", upstream.queries());
    // The `null` rule's answer, for the name asked.
    for _ in 0..2 {
        let d = q(&lab, "pixel.example.test A");
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert_eq!(d.answers.len(), 1, "{}", d.raw);
        assert_eq!(d.answers[0].0, "pixel.example.test.", "{}", d.raw);
        assert_eq!(d.answer_data(), ["0.0.0.0"], "{}", d.raw);
        assert_eq!(q(&lab, "+tcp pixel.example.test AAAA").answer_data(), ["::"]);
    }
    // 3 × 2 for metrics, 2 × 2 for pixel.
    assert_eq!(cname_blocks(&lab), 10);
    // A name without a blocked alias, and the blocked name asked directly.
    assert_eq!(q(&lab, "www.example.test A").answer_data(), ["203.0.113.80"]);
    assert_nxdomain(&q(&lab, "tracker.adnet.test A"));
    assert_eq!(cname_blocks(&lab), 10, "a direct block is not a CNAME block");
}

#[test]
fn with_block_cname_targets_off_the_chain_resolves() {
    let (lab, _upstream) = lab();
    let _daemon = lab.start_tproxyd(&config("block_cname_targets = false", &block_rules(&lab)));
    for _ in 0..2 {
        let d = q(&lab, "metrics.example.test A");
        assert_eq!(d.status, "NOERROR", "{}", d.raw);
        assert_eq!(
            d.answer_data().last().map(String::as_str),
            Some("203.0.113.99"),
            "{}",
            d.raw
        );
        let d = q(&lab, "+tcp metrics.example.test AAAA");
        assert_eq!(
            d.answer_data().last().map(String::as_str),
            Some("2001:db8::99"),
            "{}",
            d.raw
        );
    }
    assert_nxdomain(&q(&lab, "tracker.adnet.test A"));
    assert_eq!(cname_blocks(&lab), 0);
}

/// A reload keeps the cache; the block it adds applies to the chains
/// cached before it, at once and without asking the upstream again.
#[test]
fn a_reload_that_blocks_a_cname_target_blocks_the_chain_already_cached() {
    let (lab, upstream) = lab();
    let daemon: Daemon = lab.start_tproxyd(&config("", ""));
    for _ in 0..2 {
        let d = q(&lab, "metrics.example.test A");
        assert_eq!(
            d.answer_data().last().map(String::as_str),
            Some("203.0.113.99"),
            "{}",
            d.raw
        );
        let d = q(&lab, "metrics.example.test AAAA");
        assert_eq!(
            d.answer_data().last().map(String::as_str),
            Some("2001:db8::99"),
            "{}",
            d.raw
        );
    }
    assert_eq!(asked(&upstream, "metrics.example.test"), 2);
    std::fs::write(&daemon.config, config("", &block_rules(&lab))).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !daemon.log_text().contains("configuration reloaded") {
        assert!(Instant::now() < deadline, "no reload: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..2 {
        assert_nxdomain(&q(&lab, "metrics.example.test A"));
        assert_nxdomain(&q(&lab, "metrics.example.test AAAA"));
        assert_nxdomain(&q(&lab, "+tcp metrics.example.test A"));
    }
    assert_eq!(
        asked(&upstream, "metrics.example.test"),
        2,
        "the reload emptied the cache: {:?}",
        upstream.queries()
    );
    assert_eq!(cname_blocks(&lab), 6);
    // Unblocked names are still served from the kept cache.
    assert_eq!(q(&lab, "www.example.test A").answer_data(), ["203.0.113.80"]);
}

fn name(s: &str) -> hickory_proto::rr::Name {
    hickory_proto::rr::Name::from_ascii(s).unwrap()
}

fn cname(owner: &str, target: &str) -> hickory_proto::rr::Record {
    use hickory_proto::rr::{RData, Record, rdata::CNAME};
    Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
}

/// A lying upstream hides the blocked name behind what a careless check
/// would stop at: one link repeated 30 times ahead of 15 more (past a
/// bound of 18 records), odd letter case, and a DNAME with the CNAME it
/// synthesizes. Each is blocked, from upstream and from the cache, and
/// the block answer carries nothing of the chain; a chain of 100 links and
/// a loop through the blocked name stay SERVFAIL.
#[test]
fn a_lying_upstream_cannot_hide_a_blocked_target_in_the_chain() {
    use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
    use hickory_proto::rr::rdata::{A, NULL};
    use hickory_proto::rr::{RData, Record, RecordType};
    use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
    let lab = Lab::with_servers(1);
    lab.add_server_address(0, ip(UPSTREAM));
    lab.add_server_address(0, ip(PUBLIC));
    lab.install_rules("nft", "LAN_IF=lan0 DNS_TCP_PORT=15354");
    let tracker = "TrAcKeR.AdNeT.TeSt.";
    let fake = lab::fake_dns::FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), move |q| {
        let asked = q.name().to_ascii().to_ascii_lowercase();
        let label = asked.split('.').next().unwrap_or("").to_string();
        let mut answers: Vec<Record> = Vec::new();
        let mut chain = |links: usize, end: &str| {
            let mut owner = asked.clone();
            for i in 1..links {
                let next = format!("hop{i}.{asked}");
                answers.push(cname(&owner, &next));
                owner = next;
            }
            answers.push(cname(&owner, end));
            answers.push(Record::from_rdata(name(end), 300, RData::A(A::new(203, 0, 113, 99))));
        };
        match label.as_str() {
            "padded" => {
                chain(16, tracker);
                let first = answers[0].clone();
                for _ in 0..30 {
                    answers.insert(0, first.clone());
                }
            }
            "long" => chain(100, tracker),
            "loop" => {
                chain(3, tracker);
                answers.pop();
                answers.push(cname(tracker, &asked));
            }
            "x" => {
                // x.dname.test: `dname.test DNAME adnet.test` and its CNAME.
                let mut target = Vec::new();
                name("adnet.test.").emit(&mut BinEncoder::new(&mut target)).unwrap();
                answers.push(Record::from_rdata(
                    name("dname.test."),
                    300,
                    RData::Unknown {
                        code: RecordType::DNAME,
                        rdata: NULL::with(target),
                    },
                ));
                answers.push(cname(&asked, "x.adnet.test."));
                answers.push(Record::from_rdata(
                    name("x.adnet.test."),
                    300,
                    RData::A(A::new(203, 0, 113, 99)),
                ));
            }
            _ => chain(1, "fine.cdn.test."),
        }
        let mut m = Message::new(0, MessageType::Response, OpCode::Query);
        m.metadata.response_code = ResponseCode::NoError;
        m.answers = answers;
        m
    });
    let _daemon = lab.start_tproxyd(&config("", &block_rules(&lab)));
    for _ in 0..2 {
        for blocked in ["padded.attack.test", "x.dname.test"] {
            let d = q(&lab, &format!("{blocked} A"));
            assert_nxdomain(&d);
            assert!(d.authority.is_empty(), "{}", d.raw);
        }
        for broken in ["long.attack.test", "loop.attack.test"] {
            let d = q(&lab, &format!("{broken} A"));
            assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
        }
        let d = q(&lab, "ok.attack.test A");
        assert_eq!(
            d.answer_data().last().map(String::as_str),
            Some("203.0.113.99"),
            "{}",
            d.raw
        );
    }
    // The blocked chains came from the cache the second time.
    assert_eq!(fake.asked("padded.attack.test."), 1, "{:?}", fake.names());
    assert_eq!(fake.asked("x.dname.test."), 1, "{:?}", fake.names());
    assert_eq!(cname_blocks(&lab), 4);
}
