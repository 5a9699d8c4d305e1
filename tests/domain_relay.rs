//! Domain relay rules, end to end: a flow is routed by the name tproxyd's
//! own DNS answered *that client*, and the nftables set fed by the same
//! answer already holds the address when the client's first datagram
//! arrives.

mod lab;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use lab::dns::{Dnsmasq, dig};
use lab::udp::{Echo, recv, socket};
use lab::{CLIENT4, CLIENT6, Lab, sa, server4, server6};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::str::FromStr;

const PUBLIC: &str = "203.0.113.53";
const PUBLIC6: &str = "2001:db8:53::53";
const UPSTREAM: &str = "198.51.100.53";
const ADMIN: &str = "127.0.0.1:9153";
/// The other client on the LAN, with no DNS history.
const OTHER4: &str = "192.0.2.11";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn start_upstream(lab: &Lab, extra: &[String]) -> Dnsmasq {
    let mut records = vec![
        "--host-record=eu.game.example,203.0.113.80".to_string(),
        "--cname=play.game.example,eu.game.example".to_string(),
        "--host-record=www.other.example,203.0.113.80".to_string(),
    ];
    records.extend_from_slice(extra);
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    lab.dnsmasq(0, ip(UPSTREAM), "game.example", &records)
}

fn lab() -> Lab {
    let lab = Lab::new();
    for addr in [UPSTREAM, PUBLIC, PUBLIC6] {
        lab.add_server_address(0, ip(addr));
    }
    lab.add_client_address(ip(OTHER4));
    lab.install_rules("nft", "LAN_IF=lan0");
    lab
}

fn config(echo: SocketAddr, extra: &str) -> String {
    format!(
        r#"
mark = 255
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[admin]
listen = "{ADMIN}"
[dns]
ports = [53]
allow = ["192.0.2.0/24", "2001:db8:1::/64"]
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
{extra}
[[relay.rules]]
domains = ["*.game.example"]
action = "redirect"
to = "{echo}"
"#
    )
}

fn metrics(lab: &Lab) -> String {
    lab::metrics::fetch(&lab.gateway, ADMIN.parse().unwrap())
}

use lab::metrics::value as metric;

/// `tproxyd explain` against the running daemon's config (it asks the
/// daemon for the names through the admin endpoint).
fn explain(lab: &Lab, client: &str, dst: &str) -> String {
    let config = lab.path("tproxyd0.toml");
    let out = lab.tproxyd_command(&[
        "explain",
        "--config",
        config.to_str().unwrap(),
        "--client",
        client,
        "--dst",
        dst,
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_domain_rule_routes_the_flow_of_the_client_that_asked_and_no_other() {
    let lab = lab();
    let _upstream = start_upstream(&lab, &[]);
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let _daemon = lab.start_tproxyd(&config(echo.addr, ""));
    let game = sa(ip("203.0.113.80"), 9999);

    // Nobody asked yet: the flow goes direct, to nowhere.
    let asker = socket(&lab.client, sa(ip(CLIENT4), 40000));
    asker.send_to(b"early", game).unwrap();
    assert!(recv(&asker).is_none(), "routed by name before any answer");

    let d = dig(&lab.client, &format!("-b {CLIENT4} @{PUBLIC} play.game.example A"));
    assert!(d.answer_data().contains(&"203.0.113.80".to_string()), "{}", d.raw);
    // A new flow of the client that asked (a fresh port: the early flow
    // keeps the route it was opened with).
    let asker = socket(&lab.client, sa(ip(CLIENT4), 40001));
    asker.send_to(b"hello", game).unwrap();
    let (from, payload) = recv(&asker).expect("the domain rule redirected the flow to the echo server");
    assert_eq!((from, payload.as_slice()), (game, &b"hello"[..]));

    // Another client, same address, no DNS history: not matched.
    let other = socket(&lab.client, sa(ip(OTHER4), 40000));
    other.send_to(b"me too", game).unwrap();
    assert!(
        recv(&other).is_none(),
        "another client's flow was routed by the asker's answer"
    );
    assert_eq!(
        echo.received()
            .iter()
            .filter(|(_, p)| p.as_slice() == b"me too")
            .count(),
        0
    );
    assert_eq!(metric(&metrics(&lab), "tproxyd_relay_domain_matches_total"), 1);

    // explain asks the running daemon what the client resolved.
    let text = explain(&lab, CLIENT4, "203.0.113.80:9999");
    assert!(
        text.contains("names: 192.0.2.10 resolved 203.0.113.80 as play.game.example., eu.game.example."),
        "{text}"
    );
    assert!(
        text.contains("rule 1 (") && text.contains(", by domain) matches"),
        "{text}"
    );
    let text = explain(&lab, OTHER4, "203.0.113.80:9999");
    assert!(text.contains("names: none"), "{text}");
    assert!(text.contains("no rule matches"), "{text}");
}

/// One AAAA query over UDP, answered by tproxyd (hijacked); the answer's
/// first address.
fn resolve(sock: &UdpSocket, name: &str, id: u16) -> Option<IpAddr> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_str(name).ok()?, RecordType::AAAA));
    sock.send_to(&q.to_vec().ok()?, sa(ip(PUBLIC6), 53)).ok()?;
    let (_, bytes) = recv(sock)?;
    let answer = Message::from_vec(&bytes).ok()?;
    answer.answers.iter().find_map(|r| match &r.data {
        RData::AAAA(a) => Some(IpAddr::V6(a.0)),
        _ => None,
    })
}

/// 1,000 fresh names; each client sends its first datagram the instant its
/// answer arrives. Every flow must be routed by the domain rule (the echo
/// server behind the redirect answers) and its first datagram must already
/// meet the set (an nft rule ahead of the redirect records each address it
/// sees in the set).
#[test]
fn race_every_first_datagram_meets_the_rule_and_the_set() {
    const NAMES: usize = 1_000;
    const CLIENTS: usize = 4;
    let lab = lab();
    let records: Vec<String> = (0..NAMES)
        .map(|i| format!("--host-record=r{i}.race.game.example,2001:db8:100::{:x}", i + 1))
        .collect();
    let _upstream = start_upstream(&lab, &records);
    // The operator's table: the set tproxyd fills, and a rule before the
    // redirect (priority mangle - 10) noting every destination it matched.
    lab.gateway.sh("nft -f - <<'EOF'
table inet tproxyd_dns {
    set race6 { type ipv6_addr; flags timeout; }
    set hit6 { type ipv6_addr; flags dynamic; size 65535; }
    chain steer {
        type filter hook prerouting priority mangle - 10; policy accept;
        ip6 daddr @race6 udp dport 9999 add @hit6 { ip6 daddr }
    }
}
EOF");
    let echo = Echo::start(&lab.servers[0], sa(server6(0), 7000));
    let daemon = lab.start_tproxyd(&config(
        echo.addr,
        // One client asking a thousand names in a burst is the point here,
        // not something to rate-limit.
        "[dns.rate_limit]\nqps = 0\n[[dns.rules]]\ndomains = [\"*.race.game.example\"]\naction = \"forward\"\nnft_set = \"race\"\n",
    ));

    let client = lab.client.name.clone();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let ns = lab::Netns { name: client.clone() };
            std::thread::spawn(move || {
                let dns = socket(&ns, sa(ip(CLIENT6), 0));
                let mut missed = Vec::new();
                for i in (w..NAMES).step_by(CLIENTS) {
                    let Some(addr) = resolve(&dns, &format!("r{i}.race.game.example."), i as u16) else {
                        missed.push(format!("r{i}: no answer"));
                        continue;
                    };
                    // At once, from a fresh port: a new flow.
                    let flow = socket(&ns, sa(ip(CLIENT6), 0));
                    let dst = sa(addr, 9999);
                    flow.send_to(b"first", dst).unwrap();
                    match recv(&flow) {
                        Some((from, p)) if from == dst && p == b"first" => {}
                        other => missed.push(format!("r{i} {dst}: {other:?}")),
                    }
                }
                missed
            })
        })
        .collect();
    let missed: Vec<String> = workers.into_iter().flat_map(|w| w.join().unwrap()).collect();
    assert!(
        missed.is_empty(),
        "{} of {NAMES} flows not routed by the rule: {:?}",
        missed.len(),
        &missed[..missed.len().min(10)]
    );

    let hits = lab::nft::elements(&lab, "tproxyd_dns", "hit6");
    assert_eq!(hits.len(), NAMES, "first datagrams that met the set");
    let page = metrics(&lab);
    assert_eq!(metric(&page, "tproxyd_relay_domain_matches_total"), NAMES as u64);
    assert_eq!(metric(&page, "tproxyd_errors_total{kind=\"netlink\"}"), 0);
    drop(daemon);
}

/// Asks `name` over UDP from `sock` through tproxyd (hijacked at `to`);
/// the addresses answered.
fn addresses(sock: &UdpSocket, to: SocketAddr, name: &str, qtype: RecordType, id: u16) -> Vec<IpAddr> {
    let mut q = Message::query();
    q.metadata.id = id;
    q.metadata.recursion_desired = true;
    q.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    let mut edns = hickory_proto::op::Edns::new();
    edns.set_max_payload(1232);
    q.set_edns(edns);
    sock.send_to(&q.to_vec().unwrap(), to).unwrap();
    let Some((_, bytes)) = recv(sock) else {
        return Vec::new();
    };
    let Ok(answer) = Message::from_vec(&bytes) else {
        return Vec::new();
    };
    answer
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// A device asks for names of a zone it serves itself, every answer
/// carrying 40 addresses, four times what the name map holds: the other
/// device's answer must stay, and its next flow to the name it resolved
/// must still take the domain rule's route.
#[test]
fn a_device_answered_thousands_of_addresses_does_not_unroute_another() {
    use hickory_proto::rr::Record;
    use hickory_proto::rr::rdata::{A, AAAA};
    use lab::fake_dns::FakeDns;
    use std::net::{Ipv4Addr, Ipv6Addr};
    const PER_ANSWER: u32 = 40;
    const ANSWERS: u32 = 100;
    let lab = lab();
    let _upstream = FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), |q| {
        let mut m = Message::query();
        let name = q.name().clone();
        if name.to_ascii().eq_ignore_ascii_case("eu.game.example.") && q.query_type() == RecordType::A {
            m.add_answer(Record::from_rdata(
                name,
                300,
                RData::A(A(Ipv4Addr::new(203, 0, 113, 80))),
            ));
        } else if q.query_type() == RecordType::AAAA {
            // n<i>.flood.test: 40 addresses of its own, for a day.
            let i: u128 = name
                .iter()
                .next()
                .and_then(|l| std::str::from_utf8(l.get(1..)?).ok()?.parse().ok())
                .unwrap_or(0);
            for k in 0..u128::from(PER_ANSWER) {
                let addr = Ipv6Addr::from(0x2001_0db8_00f0_0000_0000_0000_0000_0000u128 + i * 1000 + k);
                m.add_answer(Record::from_rdata(name.clone(), 86_400, RData::AAAA(AAAA(addr))));
            }
        }
        m
    });
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let _daemon = lab.start_tproxyd(&config(echo.addr, "[dns.names]\nmax_entries = 1000\n"));
    let game = sa(ip("203.0.113.80"), 9999);

    let victim = socket(&lab.client, sa(ip(CLIENT4), 0));
    let answered = addresses(&victim, sa(ip(PUBLIC), 53), "eu.game.example.", RecordType::A, 1);
    assert_eq!(answered, vec![ip("203.0.113.80")]);

    let attacker = socket(&lab.client, sa(ip(OTHER4), 0));
    let mut flooded = 0;
    for i in 0..ANSWERS {
        let got = addresses(
            &attacker,
            sa(ip(PUBLIC), 53),
            &format!("n{i}.flood.test."),
            RecordType::AAAA,
            i as u16,
        );
        flooded += got.len();
    }
    assert_eq!(flooded, (PER_ANSWER * ANSWERS) as usize, "the flood's answers");
    let page = metrics(&lab);
    assert!(
        metric(&page, "tproxyd_name_map_evicted") > 0,
        "the flood did not reach the map's bounds:\n{page}"
    );

    // The victim's next flow to the address it resolved.
    let flow = socket(&lab.client, sa(ip(CLIENT4), 40002));
    flow.send_to(b"after the flood", game).unwrap();
    let (from, payload) = recv(&flow).expect("the victim's flow lost its domain rule to the other device's answers");
    assert_eq!((from, payload.as_slice()), (game, &b"after the flood"[..]));
    assert_eq!(metric(&metrics(&lab), "tproxyd_relay_domain_matches_total"), 1);
}
