//! The DNS engine attacked the way a hostile LAN device, an off-path WAN
//! spoofer and a hostile upstream would, in the namespace lab: what each
//! attack must not achieve, and that a legitimate client keeps its answers.

mod lab;

use hickory_proto::op::{Edns, Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use lab::dns::dig;
use lab::{Daemon, Lab};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const UPSTREAM: &str = "198.51.100.53";
/// tproxyd's plain listeners on the LAN.
const LISTEN: &str = "192.0.2.1";
const LISTEN6: &str = "2001:db8:1::1";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn name(s: &str) -> Name {
    Name::from_str(s).unwrap()
}

fn dns_lab() -> Lab {
    dns_lab_with("")
}

/// [`dns_lab`], with more settings for the rules script.
fn dns_lab_with(rules_env: &str) -> Lab {
    let lab = Lab::with_servers(1);
    lab.add_server_address(0, ip(UPSTREAM));
    lab.install_rules("nft", &format!("LAN_IF=lan0 DNS_TCP_PORT=15354 {rules_env}"));
    lab
}

/// `dns_keys` go into `[dns]`; `tail` after everything.
fn config(dns_keys: &str, tail: &str) -> String {
    format!(
        r#"
mark = 255
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[dns]
ports = [53]
listen = ["{LISTEN}:53", "[{LISTEN6}]:53"]
tcp_listen = ["0.0.0.0:15354", "[::]:15354"]
timeout = "1500ms"
allow = ["192.0.2.0/24", "2001:db8:1::/64"]
{dns_keys}
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
server_timeout = "700ms"

[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["192.0.2.50"]
{tail}
"#
    )
}

/// Polls until `f` holds (or panics after 5 s with `what`).
fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// DNS-over-TCP connections the gateway holds on port 53.
fn tcp_held(lab: &Lab) -> usize {
    lab.gateway
        .sh("ss -tnH state established '( sport = :53 )' | wc -l")
        .trim()
        .parse()
        .unwrap()
}

/// A legitimate client asks `n` times over UDP and TCP; how many answers
/// were right.
fn legit_answers(lab: &Lab, server: &str, n: usize) -> usize {
    let out = lab.client.sh(&format!(
        "for i in $(seq 1 {n}); do \
           dig +tries=1 +time=2 @{server} printer.lan A +short; \
           dig +tcp +tries=1 +time=2 @{server} printer.lan A +short; \
         done"
    ));
    out.lines().filter(|l| l.trim() == "192.0.2.50").count()
}

/// One IPv6 device of the LAN counts as one client whatever addresses of
/// its prefix it uses: the gateway has resolved them all to its one
/// link-layer address (see `tests/dns_ipv6_devices.rs`).
#[test]
fn tcp_connections_from_many_addresses_of_one_ipv6_device_share_one_per_client_cap() {
    let lab = dns_lab();
    let daemon = lab.start_tproxyd(&config(
        "rate_limit = { qps = 0 }\ntcp = { max_connections = 32, max_per_client = 4, idle_timeout = \"20s\" }",
        "",
    ));
    // One IPv6 host uses 12 addresses of its prefix (any host on a /64 can)
    // and opens 4 idle connections from each: 48, more than the total.
    let addrs: Vec<IpAddr> = (1..=12).map(|i| ip(&format!("2001:db8:1::a:{i}"))).collect();
    for a in &addrs {
        lab.add_client_address(*a);
    }
    // Each address has asked once, so the gateway has resolved each (a
    // device that uses an address is resolved at its first exchange).
    let udp_to: SocketAddr = format!("[{LISTEN6}]:53").parse().unwrap();
    let printer = query(1, "printer.lan.", RecordType::A, None).to_vec().unwrap();
    for a in &addrs {
        let sock = lab::udp::socket(&lab.client, SocketAddr::new(*a, 0));
        let (from, _) = lab::udp::exchange(&sock, udp_to, &printer);
        assert_eq!(from, udp_to);
    }
    let to: SocketAddr = format!("[{LISTEN6}]:53").parse().unwrap();
    let attackers: Vec<TcpStream> = lab.client.enter(move || {
        addrs
            .iter()
            .flat_map(|a| std::iter::repeat_n(*a, 4))
            .filter_map(|a| {
                let s = socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::STREAM, None).ok()?;
                s.bind(&SocketAddr::new(a, 0).into()).ok()?;
                s.connect_timeout(&to.into(), Duration::from_secs(2)).ok()?;
                Some(TcpStream::from(s))
            })
            .collect()
    });
    assert_eq!(attackers.len(), 48, "the kernel accepts every connection");
    // The daemon keeps only the prefix's share and closes the rest.
    eventually("connections beyond the device's share were kept", || {
        tcp_held(&lab) <= 4
    });
    // Everyone else still gets DNS over TCP (and UDP).
    assert_eq!(legit_answers(&lab, LISTEN, 5), 10);
    drop(attackers);
    let stopped = daemon.stop();
    assert!(
        stopped.counter("dns_tcp_refused_per_client") >= 44,
        "refusals not counted: {}",
        stopped.log
    );
}

/// Sends `queries` to `to` at once; returns the replies, the first awaited
/// for up to `wait`.
fn blast(sock: &UdpSocket, to: SocketAddr, queries: &[Vec<u8>], wait: Duration) -> Vec<Message> {
    for q in queries {
        sock.send_to(q, to).unwrap();
    }
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut buf = vec![0u8; 65_536];
    let mut replies = Vec::new();
    loop {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => {
                replies.push(Message::from_vec(&buf[..n]).expect("a well-formed reply"));
                // Anything more would follow at once.
                sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return replies;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // Any other error used to end the wait at once and read as "no
            // reply": say what it was.
            Err(e) => panic!("receiving replies from {to}: {e} (after {} replies)", replies.len()),
        }
    }
}

fn query(id: u16, qname: &str, qtype: RecordType, edns: Option<Edns>) -> Message {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name(qname), qtype));
    if let Some(e) = edns {
        m.set_edns(e);
    }
    m
}

/// The header with `f` applied to its 12 bytes.
fn patched(mut bytes: Vec<u8>, f: impl FnOnce(&mut [u8])) -> Vec<u8> {
    f(&mut bytes[..12]);
    bytes
}

/// A raw OPT record: root owner, TYPE 41, CLASS = payload, TTL 0, options.
fn opt_record(payload: u16, options: &[u8]) -> Vec<u8> {
    let mut r = vec![0, 0, 41];
    r.extend_from_slice(&payload.to_be_bytes());
    r.extend_from_slice(&[0, 0, 0, 0]);
    r.extend_from_slice(&(options.len() as u16).to_be_bytes());
    r.extend_from_slice(options);
    r
}

/// A query for printer.lan A whose additional section is `additional`
/// (raw records), ARCOUNT = `count`.
fn with_additional(id: u16, additional: &[Vec<u8>]) -> Vec<u8> {
    let mut bytes = query(id, "printer.lan.", RecordType::A, None).to_vec().unwrap();
    bytes[11] = additional.len() as u8;
    for r in additional {
        bytes.extend_from_slice(r);
    }
    bytes
}

#[test]
fn odd_queries_from_a_lan_device_get_a_clear_answer_and_nothing_else() {
    let lab = dns_lab();
    let daemon = lab.start_tproxyd(&config("rate_limit = { qps = 0 }", ""));
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let sock = lab::udp::socket(&lab.client, "192.0.2.10:0".parse().unwrap());

    let mut unknown_option = 65001u16.to_be_bytes().to_vec();
    unknown_option.extend_from_slice(&1000u16.to_be_bytes());
    unknown_option.extend(std::iter::repeat_n(0xa5, 1000));
    let mut big_edns = Edns::new();
    big_edns.set_max_payload(65_535);
    // A 255-byte name with binary bytes and an escaped dot in its labels.
    let odd_labels: Vec<Vec<u8>> = (0..4u8)
        .map(|i| {
            let mut l = vec![b'a' + i; 62];
            l[0] = 0;
            l[1] = b'.';
            l[2] = 0xff;
            l[3] = b'\\';
            l
        })
        .collect();
    let odd_name = Name::from_labels(odd_labels).unwrap();
    let mut odd = Message::query();
    odd.metadata.id = 9;
    odd.add_query(Query::query(odd_name.clone(), RecordType::A));

    let cases: Vec<(&str, Vec<u8>, Option<ResponseCode>)> = vec![
        (
            "QDCOUNT 0",
            patched(query(1, "printer.lan.", RecordType::A, None).to_vec().unwrap(), |h| {
                h[5] = 0
            })[..12]
                .to_vec(),
            Some(ResponseCode::FormErr),
        ),
        (
            "QDCOUNT 2",
            {
                let mut m = query(2, "printer.lan.", RecordType::A, None);
                m.add_query(Query::query(name("bank.test."), RecordType::A));
                m.to_vec().unwrap()
            },
            Some(ResponseCode::FormErr),
        ),
        (
            "NOTIFY",
            patched(query(3, "printer.lan.", RecordType::SOA, None).to_vec().unwrap(), |h| {
                h[2] = 4 << 3
            }),
            Some(ResponseCode::NotImp),
        ),
        (
            "UPDATE",
            patched(query(4, "printer.lan.", RecordType::SOA, None).to_vec().unwrap(), |h| {
                h[2] = 5 << 3
            }),
            Some(ResponseCode::NotImp),
        ),
        (
            "two OPT records",
            with_additional(5, &[opt_record(1232, &[]), opt_record(4096, &[])]),
            Some(ResponseCode::FormErr),
        ),
        (
            "an unknown 1000-byte EDNS option",
            with_additional(6, &[opt_record(1232, &unknown_option)]),
            Some(ResponseCode::NoError),
        ),
        (
            "EDNS payload 65535",
            query(7, "printer.lan.", RecordType::A, Some(big_edns))
                .to_vec()
                .unwrap(),
            Some(ResponseCode::NoError),
        ),
        (
            // RFC 6891 6.1.3: BADVERS (16, which hickory decodes as BADSIG,
            // the TSIG code that shares it), with our OPT.
            "EDNS version 1",
            with_additional(
                11,
                &[{
                    let mut opt = opt_record(1232, &[]);
                    opt[6] = 1; // the TTL's second byte: the version
                    opt
                }],
            ),
            Some(ResponseCode::BADSIG),
        ),
        (
            "a 255-byte binary name",
            odd.to_vec().unwrap(),
            Some(ResponseCode::ServFail),
        ),
        (
            "a response (QR=1)",
            patched(query(10, "printer.lan.", RecordType::A, None).to_vec().unwrap(), |h| {
                h[2] |= 0x80
            }),
            None,
        ),
    ];
    // Queries sent per expected RCODE: the counters must match them.
    let mut sent: std::collections::HashMap<Option<ResponseCode>, u64> = Default::default();
    for (what, bytes, expected) in &cases {
        *sent.entry(*expected).or_default() += 1;
        // The odd name goes upstream (dead here): SERVFAIL after dns.timeout.
        let mut replies = blast(&sock, to, std::slice::from_ref(bytes), Duration::from_secs(4));
        if replies.is_empty() && expected.is_some() {
            // UDP: a real client asks again (on a loaded machine).
            *sent.entry(*expected).or_default() += 1;
            replies = blast(&sock, to, std::slice::from_ref(bytes), Duration::from_secs(4));
        }
        match expected {
            None => assert!(replies.is_empty(), "{what}: answered {replies:?}"),
            Some(rcode) => {
                assert!(!replies.is_empty(), "{what}: no reply");
                let r = &replies[0];
                assert_eq!(r.metadata.response_code, *rcode, "{what}: {r:?}");
                assert_eq!(r.metadata.id, u16::from_be_bytes([bytes[0], bytes[1]]), "{what}");
                let raw_len = r.to_vec().unwrap().len();
                assert!(raw_len <= 1232, "{what}: a {raw_len}-byte reply");
                // The question comes back exactly as asked, odd bytes and all.
                if let Some(q) = r.queries.first() {
                    assert_eq!(q.name().to_string(), query_name(bytes), "{what}");
                }
                if *rcode == ResponseCode::NoError {
                    let edns = r.edns.as_ref().expect("an OPT record in reply to one");
                    assert!(edns.options().as_ref().is_empty(), "{what}: options echoed");
                }
                if *rcode == ResponseCode::BADSIG {
                    let edns = r.edns.as_ref().expect("BADVERS carries an OPT record");
                    assert_eq!(edns.version(), 0, "{what}");
                    assert_eq!(edns.max_payload(), 1232, "{what}: the OPT says what tproxyd takes");
                }
            }
        }
    }
    assert!(cases.iter().any(|(_, b, _)| query_name(b) == odd_name.to_string()));
    assert_eq!(legit_answers(&lab, LISTEN, 3), 6);
    let stopped = daemon.stop();
    let sent_for = |rcode| sent.get(&Some(rcode)).copied().unwrap_or(0);
    assert_eq!(
        stopped.counter("dns_formerr"),
        sent_for(ResponseCode::FormErr),
        "{}",
        stopped.log
    );
    assert_eq!(
        stopped.counter("dns_badvers"),
        sent_for(ResponseCode::BADSIG),
        "{}",
        stopped.log
    );
    assert_eq!(
        stopped.counter("dns_notimp"),
        sent_for(ResponseCode::NotImp),
        "{}",
        stopped.log
    );
}

/// The first question's name in a query's bytes, as text ("" if none).
fn query_name(bytes: &[u8]) -> String {
    Message::from_vec(bytes)
        .ok()
        .and_then(|m| m.queries.first().map(|q| q.name().to_string()))
        .unwrap_or_default()
}

/// A hostile upstream: answers each query with whatever `answer` makes of
/// its raw bytes, over UDP and TCP (`true`), on port 53 of `addr`.
struct RawUpstream {
    asked: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

type RawAnswer = dyn Fn(&[u8], bool) -> Option<Vec<u8>> + Send + Sync;

impl RawUpstream {
    fn start(lab: &Lab, addr: IpAddr, answer: impl Fn(&[u8], bool) -> Option<Vec<u8>> + Send + Sync + 'static) -> Self {
        let sa = SocketAddr::new(addr, 53);
        let (udp, tcp) =
            lab.servers[0].enter(move || (UdpSocket::bind(sa).unwrap(), std::net::TcpListener::bind(sa).unwrap()));
        udp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let answer: Arc<RawAnswer> = Arc::new(answer);
        let asked = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let (answer, asked, stop) = (answer.clone(), asked.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        asked.fetch_add(1, Ordering::Relaxed);
                        if let Some(reply) = answer(&buf[..n], false) {
                            let _ = udp.send_to(&reply, from);
                        }
                    }
                }
            }));
        }
        {
            let (asked, stop) = (asked.clone(), stop.clone());
            let conns: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>> = Arc::default();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    let (answer, asked) = (answer.clone(), asked.clone());
                    conns.lock().unwrap().push(std::thread::spawn(move || {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
                        let mut len = [0u8; 2];
                        while s.read_exact(&mut len).is_ok() {
                            let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
                            if s.read_exact(&mut q).is_err() {
                                return;
                            }
                            asked.fetch_add(1, Ordering::Relaxed);
                            let Some(reply) = answer(&q, true) else { return };
                            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&reply);
                            if s.write_all(&framed).is_err() {
                                return;
                            }
                        }
                    }));
                }
                for t in conns.lock().unwrap().drain(..) {
                    let _ = t.join();
                }
            }));
        }
        RawUpstream { asked, stop, threads }
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// The header and question of `query`, turned into a response with
/// `flags` OR-ed into byte 2 and the given counts.
fn reply_head(query: &[u8], tc: bool, ancount: u16) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let question = q.queries.first()?.clone();
    let mut head = Message::response(q.metadata.id, q.metadata.op_code);
    head.metadata.recursion_desired = true;
    head.metadata.recursion_available = true;
    head.metadata.truncation = tc;
    head.add_query(question);
    let mut bytes = head.to_vec().ok()?;
    bytes[6..8].copy_from_slice(&ancount.to_be_bytes());
    Some(bytes)
}

fn ask(lab: &Lab, qname: &str) -> lab::dns::Dig {
    dig(&lab.client, &format!("@{LISTEN} {qname} A"))
}

fn start(lab: &Lab) -> Daemon {
    lab.start_tproxyd(&config("rate_limit = { qps = 0 }", ""))
}

#[test]
fn an_upstream_that_truncates_over_tcp_too_gives_servfail_not_an_empty_answer() {
    let lab = dns_lab();
    // TC=1 on UDP, and on the TCP retry as well: no answer ever comes.
    let up = RawUpstream::start(&lab, ip(UPSTREAM), |q, _tcp| reply_head(q, true, 0));
    let daemon = start(&lab);
    let d = ask(&lab, "www.loop.test");
    assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
    assert!(up.asked.load(Ordering::Relaxed) >= 2, "UDP then TCP");
    // Nothing was cached: asked again, the upstream is asked again.
    let before = up.asked.load(Ordering::Relaxed);
    assert_eq!(ask(&lab, "www.loop.test").status, "SERVFAIL");
    assert!(up.asked.load(Ordering::Relaxed) > before);
    assert_eq!(legit_answers(&lab, LISTEN, 3), 6);
    drop(daemon);
}

/// An upstream that truncates over UDP and, over TCP, answers another
/// question than the one asked (as a late answer to an abandoned query
/// would, if its ID came round again on the kept connection): NXDOMAIN for
/// names starting with "nx", an address otherwise. Neither is taken as
/// the answer: the client gets SERVFAIL, not a false NXDOMAIN or an
/// empty NOERROR, and nothing is cached.
#[test]
fn a_tcp_answer_to_another_question_is_not_taken_as_the_answer() {
    let lab = dns_lab();
    let up = RawUpstream::start(&lab, ip(UPSTREAM), |q, tcp| {
        if !tcp {
            return reply_head(q, true, 0);
        }
        let asked = Message::from_vec(q).ok()?;
        let nx = asked.queries.first()?.name().to_string().starts_with("nx");
        let mut m = Message::response(asked.metadata.id, asked.metadata.op_code);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.add_query(Query::query(name("elsewhere.test."), RecordType::A));
        if nx {
            m.metadata.response_code = ResponseCode::NXDomain;
        } else {
            m.add_answer(hickory_proto::rr::Record::from_rdata(
                name("elsewhere.test."),
                300,
                hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A::new(198, 51, 100, 66)),
            ));
        }
        m.to_vec().ok()
    });
    let daemon = start(&lab);
    for qname in ["nx.other.test", "www.other.test"] {
        let d = ask(&lab, qname);
        assert_eq!(d.status, "SERVFAIL", "{qname}: {}", d.raw);
        // Not cached: asked again, the upstream is asked again.
        let before = up.asked.load(Ordering::Relaxed);
        assert_eq!(ask(&lab, qname).status, "SERVFAIL", "{qname}");
        assert!(up.asked.load(Ordering::Relaxed) > before, "{qname}");
    }
    assert_eq!(legit_answers(&lab, LISTEN, 3), 6);
    let stopped = daemon.stop();
    assert!(stopped.counter("dns_upstream_mismatched") >= 4, "{}", stopped.log);
}

/// An upstream that ignores the UDP size tproxyd advertises (1232) and
/// sends a 5 KB answer in one datagram: it is read whole and used, not
/// cut at 4 KB, dropped as unreadable and waited on until the server's
/// timeout (SERVFAIL, and the server counted as timed out).
#[test]
fn an_upstream_answer_larger_than_advertised_is_read_whole() {
    let lab = dns_lab();
    let _up = RawUpstream::start(&lab, ip(UPSTREAM), |q, _tcp| {
        let asked = Message::from_vec(q).ok()?;
        let question = asked.queries.first()?.clone();
        let mut m = Message::response(asked.metadata.id, asked.metadata.op_code);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        for i in 0..300u16 {
            m.add_answer(hickory_proto::rr::Record::from_rdata(
                question.name().clone(),
                300,
                hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A::new(198, 51, (i >> 8) as u8 + 100, i as u8)),
            ));
        }
        m.add_query(question);
        let bytes = m.to_vec().ok()?;
        assert!(bytes.len() > 4_800, "{} bytes", bytes.len());
        Some(bytes)
    });
    let daemon = start(&lab);
    let d = dig(&lab.client, &format!("+tcp @{LISTEN} big.other.test A"));
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert_eq!(d.answers.len(), 300, "{}", d.raw);
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("dns_servfail"), 0, "{}", stopped.log);
}

#[test]
fn a_compression_loop_from_the_upstream_is_dropped_and_never_answers() {
    let lab = dns_lab();
    // An answer record whose owner is a pointer to itself.
    let up = RawUpstream::start(&lab, ip(UPSTREAM), |q, _tcp| {
        let mut bytes = reply_head(q, false, 1)?;
        let at = bytes.len() as u16;
        bytes.extend_from_slice(&(0xc000 | at).to_be_bytes());
        bytes.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 198, 51, 100, 66]);
        Some(bytes)
    });
    let daemon = start(&lab);
    let d = ask(&lab, "www.ptrloop.test");
    assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
    assert!(up.asked.load(Ordering::Relaxed) >= 1);
    assert_eq!(legit_answers(&lab, LISTEN, 3), 6);
    let stopped = daemon.stop();
    assert!(stopped.counter("dns_upstream_mismatched") >= 1, "{}", stopped.log);
}

/// Floods `to` with queries from `victim`'s address, sent off-path from
/// the WAN side (server 0), until the returned flag is set.
fn spoof_flood(lab: &Lab, victim: IpAddr, to: SocketAddr) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    lab.servers[0].sh(&format!(
        "ip addr add {victim}/32 dev lo
         ip route add {}/32 via {} src {victim}",
        to.ip(),
        lab::gateway_wan4(0)
    ));
    let spoofer = lab::udp::socket(&lab.servers[0], SocketAddr::new(victim, 0));
    let forged: Vec<u8> = query(1, "printer.lan.", RecordType::A, None).to_vec().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = spoofer.send_to(&forged, to);
                sent += 1;
                if sent % 20 == 0 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            sent
        })
    };
    (stop, flood)
}

#[test]
fn a_wan_spoofer_posing_as_a_lan_client_is_dropped_before_its_rate_limit() {
    // Both rule flavours install the anti-spoofing check by default.
    for flavour in ["nft", "iptables"] {
        let lab = Lab::with_servers(1);
        lab.add_server_address(0, ip(UPSTREAM));
        lab.install_rules(flavour, "LAN_IF=lan0 DNS_TCP_PORT=15354");
        // The default action: queries over the limit get no answer at all.
        let daemon = lab.start_tproxyd(&config("rate_limit = { qps = 5, burst = 30 }", ""));
        let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
        let (stop, flood) = spoof_flood(&lab, ip(lab::CLIENT4), to);
        std::thread::sleep(Duration::from_millis(300));
        // The real client asks over UDP during the flood: 20 queries, within
        // its own burst of 30 however fast they go.
        let out = lab
            .client
            .sh("for i in $(seq 1 20); do dig +tries=1 +time=2 @192.0.2.1 printer.lan A +short || true; done");
        let answered = out.lines().filter(|l| l.trim() == "192.0.2.50").count();
        stop.store(true, Ordering::Relaxed);
        let sent = flood.join().unwrap();
        let stopped = daemon.stop();
        assert!(sent > 500, "{flavour}: flood too small: {sent}");
        assert_eq!(
            answered, 20,
            "{flavour}: the spoofer cost the client its answers: {}",
            stopped.log
        );
        assert!(
            stopped.counter("dns_rate_limited") < 10,
            "{flavour}: forged queries reached the rate limit: {}",
            stopped.log
        );
        // They died at the gateway's door, counted by the rule.
        let rules = match flavour {
            "nft" => lab.gateway.sh("nft list chain inet tproxyd prerouting"),
            _ => lab.gateway.sh("iptables -w -t mangle -L TPROXYD_PRE -v -x -n"),
        };
        let dropped: u64 = rules
            .lines()
            .find(|l| l.contains("antispoof") || l.contains("rpfilter"))
            .and_then(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                match flavour {
                    "nft" => words
                        .iter()
                        .position(|w| *w == "packets")
                        .and_then(|i| words.get(i + 1)?.parse().ok()),
                    _ => words.first()?.parse().ok(),
                }
            })
            .unwrap_or(0);
        assert!(
            dropped + 10 >= sent,
            "{flavour}: {dropped} of {sent} forged queries dropped:\n{rules}"
        );
    }
}

#[test]
fn a_spoofer_emptying_a_clients_rate_limit_cannot_deny_it_dns_over_tcp() {
    // Rules without the anti-spoofing check (ANTISPOOF=0, or a firewall of
    // one's own): the forged queries reach the listener.
    let lab = dns_lab_with("ANTISPOOF=0");
    let daemon = lab.start_tproxyd(&config(
        "rate_limit = { qps = 20, burst = 20, action = \"truncate\" }",
        "",
    ));
    // Off-path, on the WAN side: the spoofer writes the LAN client's address
    // as the source of its queries to the gateway's DNS listener, keeping
    // that address's bucket empty.
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let (stop, flood) = spoof_flood(&lab, ip(lab::CLIENT4), to);
    std::thread::sleep(Duration::from_millis(300));
    // The real client at that address asks during the flood: over UDP it is
    // told TC=1 and retries over TCP, where a spoofer cannot follow; over
    // TCP it is answered at once.
    let answered = legit_answers(&lab, LISTEN, 5);
    stop.store(true, Ordering::Relaxed);
    let sent = flood.join().unwrap();
    let stopped = daemon.stop();
    assert!(sent > 500, "flood too small: {sent}");
    assert_eq!(answered, 10, "the spoofer cost the client its answers: {}", stopped.log);
    assert!(stopped.counter("dns_rate_limited") > 400, "{}", stopped.log);
    assert!(stopped.counter("dns_tcp_queries") >= 5, "{}", stopped.log);
}

#[test]
fn a_flood_from_many_addresses_of_one_ipv6_56_is_limited_as_one_client() {
    let lab = dns_lab();
    let daemon = lab.start_tproxyd(&config("rate_limit = { qps = 20, burst = 20 }", ""));
    let addrs: Vec<IpAddr> = (1..=12).map(|i| ip(&format!("2001:db8:1::b:{i}"))).collect();
    for a in &addrs {
        lab.add_client_address(*a);
    }
    let to: SocketAddr = format!("[{LISTEN6}]:53").parse().unwrap();
    let queries: Vec<Vec<u8>> = (0..25u16)
        .map(|id| query(id, "printer.lan.", RecordType::A, None).to_vec().unwrap())
        .collect();
    // 12 addresses x 25 queries, all at once: 300 queries from one /56.
    let socks: Vec<UdpSocket> = addrs
        .iter()
        .map(|a| lab::udp::socket(&lab.client, SocketAddr::new(*a, 0)))
        .collect();
    for s in &socks {
        for q in &queries {
            s.send_to(q, to).unwrap();
        }
    }
    let answered: usize = socks
        .iter()
        .map(|s| blast(s, to, &[], Duration::from_millis(500)).len())
        .sum();
    // The /56's burst and what its rate refilled meanwhile, not 12 bursts.
    assert!((20..=40).contains(&answered), "{answered} of 300 answered");
    // Another client is not affected.
    assert_eq!(legit_answers(&lab, LISTEN, 2), 4);
    let stopped = daemon.stop();
    // Every flood query that reached the daemon was answered or counted
    // (the 2 UDP and 2 TCP legitimate ones are neither).
    let arrived = stopped.counter("dns_queries") - 4;
    assert!(arrived >= 200, "only {arrived} of 300 arrived: {}", stopped.log);
    assert_eq!(
        stopped.counter("dns_rate_limited"),
        arrived - answered as u64,
        "{}",
        stopped.log
    );
}

/// `query`'s response carrying `answers` (owner, CNAME target or A).
fn answer_with(query: &[u8], answers: &[(String, Result<String, [u8; 4]>)]) -> Option<Vec<u8>> {
    use hickory_proto::rr::rdata::{A, CNAME};
    use hickory_proto::rr::{RData, Record};
    let q = Message::from_vec(query).ok()?;
    let mut m = Message::response(q.metadata.id, q.metadata.op_code);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.add_query(q.queries.first()?.clone());
    for (owner, data) in answers {
        let rdata = match data {
            Ok(target) => RData::CNAME(CNAME(name(target))),
            Err(addr) => RData::A(A::from(std::net::Ipv4Addr::from(*addr))),
        };
        m.add_answer(Record::from_rdata(name(owner), 300, rdata));
    }
    m.to_vec().ok()
}

#[test]
fn cname_loops_and_overlong_chains_from_the_upstream_end_quickly_and_carry_nothing_else() {
    let lab = dns_lab();
    let _up = RawUpstream::start(&lab, ip(UPSTREAM), |q, _tcp| {
        let asked = Message::from_vec(q)
            .ok()?
            .queries
            .first()?
            .name()
            .to_ascii()
            .to_ascii_lowercase();
        let records: Vec<(String, Result<String, [u8; 4]>)> = if asked.starts_with("loop.") {
            vec![
                ("loop.test.".into(), Ok("loop2.test.".into())),
                ("loop2.test.".into(), Ok("loop.test.".into())),
                ("bank.test.".into(), Err([198, 51, 100, 66])),
            ]
        } else {
            // 40 links, then an address.
            let mut r: Vec<_> = (0..40)
                .map(|i| (format!("c{i}.chain.test."), Ok(format!("c{}.chain.test.", i + 1))))
                .collect();
            r[0].0 = "chain.test.".into();
            r.push(("c40.chain.test.".into(), Err([198, 51, 100, 80])));
            r.push(("bank.test.".into(), Err([198, 51, 100, 66])));
            r
        };
        answer_with(q, &records)
    });
    let daemon = start(&lab);
    // A loop, and 40 links where 16 are followed: no answer at the end,
    // so SERVFAIL with nothing in it.
    for broken in ["loop.test", "chain.test"] {
        let d = ask(&lab, broken);
        assert!(d.query_ms < 1000, "{}", d.raw);
        assert_eq!(d.status, "SERVFAIL", "{}", d.raw);
        assert!(d.answers.is_empty(), "{}", d.raw);
        assert!(
            !d.raw.contains("bank.test") && !d.raw.contains("198.51.100.80"),
            "{}",
            d.raw
        );
    }
    assert_eq!(legit_answers(&lab, LISTEN, 2), 4);
    drop(daemon);
}

/// Datagrams the gateway's kernel dropped at full socket receive queues.
fn rcvbuf_errors(lab: &Lab) -> u64 {
    lab.gateway
        .sh("nstat -az UdpRcvbufErrors Udp6RcvbufErrors | awk '/RcvbufErrors/ {s += $2} END {print s+0}'")
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn a_burst_from_one_device_does_not_cost_another_its_answers() {
    let lab = dns_lab();
    let stranger = ip("192.0.2.66");
    lab.add_client_address(stranger);
    let daemon = lab.start_tproxyd(&config("rate_limit = { qps = 20, burst = 20 }", ""));
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let flooder = lab::udp::socket(&lab.client, SocketAddr::new(stranger, 0));
    let victim = lab::udp::socket(&lab.client, "192.0.2.10:0".parse().unwrap());
    let forged = query(1, "printer.lan.", RecordType::A, None).to_vec().unwrap();
    let before = rcvbuf_errors(&lab);
    let mut asked = 0u16;
    // Bursts of 1,000 queries, each followed at once by one query from a
    // quiet device.
    for _ in 0..10 {
        for _ in 0..1000 {
            let _ = flooder.send_to(&forged, to);
        }
        victim
            .send_to(&query(asked, "printer.lan.", RecordType::A, None).to_vec().unwrap(), to)
            .unwrap();
        asked += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let replies = blast(&victim, to, &[], Duration::from_secs(2));
    let dropped = rcvbuf_errors(&lab) - before;
    let stopped = daemon.stop();
    assert_eq!(
        replies.len(),
        usize::from(asked),
        "the quiet device lost answers; {dropped} datagrams dropped at the socket: {}",
        stopped.log
    );
}

/// An upstream that never answers names containing "slow" (a
/// random-subdomain attack on a slow zone) and answers every other name
/// at once with 198.51.100.80.
fn slow_names_upstream(lab: &Lab) -> RawUpstream {
    RawUpstream::start(lab, ip(UPSTREAM), |q, _tcp| {
        let asked = Message::from_vec(q).ok()?.queries.first()?.name().to_ascii();
        if asked.contains("slow") {
            return None;
        }
        answer_with(q, &[(asked, Err([198, 51, 100, 80]))])
    })
}

#[test]
fn one_device_asking_names_that_never_resolve_cannot_take_every_pending_slot() {
    let lab = dns_lab();
    // The upstream never answers the attacker's names, and answers
    // everything else at once.
    let _up = slow_names_upstream(&lab);
    let daemon = lab.start_tproxyd(&config("rate_limit = { qps = 300, burst = 300 }", "").replace(
        "server_timeout = \"700ms\"",
        "server_timeout = \"700ms\"\nmax_pending = 64",
    ));
    let attacker = ip("192.0.2.66");
    lab.add_client_address(attacker);
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let sock = lab::udp::socket(&lab.client, SocketAddr::new(attacker, 0));
    let stop = Arc::new(AtomicBool::new(false));
    // About 200 queries a second, within its rate limit, each for a new
    // name: some 140 waiting at any time, for the 700 ms its server gets.
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let q = query(n as u16, &format!("r{n}.slow.test."), RecordType::A, None);
                let _ = sock.send_to(&q.to_vec().unwrap(), to);
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    // Another device asks for names nobody has asked yet.
    let out = lab
        .client
        .sh("for i in $(seq 1 10); do dig +tries=1 +time=2 @192.0.2.1 www$i.example.test A +short; done");
    stop.store(true, Ordering::Relaxed);
    flood.join().unwrap();
    let stopped = daemon.stop();
    let answered = out.lines().filter(|l| l.trim() == "198.51.100.80").count();
    assert_eq!(answered, 10, "{out}\n{}", stopped.log);
    assert!(stopped.counter("dns_servfail_client_share") > 0, "{}", stopped.log);
}

/// The hijacked "public resolver" the LAN devices have hard-coded.
const HIJACKED: &str = "203.0.113.53";

/// Sends one hijacked query for `qname` from `sock` and waits (up to its
/// read timeout) for the answer with its ID; the answer's source and how
/// long it took.
fn hijacked_answer(sock: &UdpSocket, id: u16, qname: &str) -> Option<(SocketAddr, Message, Duration)> {
    let to: SocketAddr = format!("{HIJACKED}:53").parse().unwrap();
    let asked = Instant::now();
    sock.send_to(&query(id, qname, RecordType::A, None).to_vec().unwrap(), to)
        .unwrap();
    loop {
        let (from, bytes) = lab::udp::recv(sock)?;
        let Ok(m) = Message::from_vec(&bytes) else { continue };
        if m.metadata.id == id {
            return Some((from, m, asked.elapsed()));
        }
    }
}

/// The first A record of `m`, as text.
fn first_a(m: &Message) -> String {
    m.answers.first().map(|r| r.data.to_string()).unwrap_or_default()
}

/// A device floods hijacked queries for names its upstream never answers,
/// from many source ports (each miss now waits in the relay listener's own
/// set): a quiet device's cache hits and new names still come back right,
/// promptly and from the address it asked; once the flood's misses time
/// out their places come back (the quiet device's misses are answered
/// with the flood's share used up before); and SIGTERM in the middle of a
/// new flood ends the daemon at once rather than after its misses' timeout.
#[test]
fn a_hijacked_flood_of_names_that_never_resolve_keeps_others_answered_gives_places_back_and_stops_at_once() {
    let lab = dns_lab();
    let _up = slow_names_upstream(&lab);
    let daemon = lab.start_tproxyd(&config("rate_limit = { qps = 400, burst = 400 }", "").replace(
        "server_timeout = \"700ms\"",
        "server_timeout = \"1400ms\"\nmax_pending = 64",
    ));
    let attacker = ip("192.0.2.66");
    lab.add_client_address(attacker);
    let quiet = lab::udp::socket(&lab.client, "192.0.2.10:0".parse().unwrap());
    let hijacked: SocketAddr = format!("{HIJACKED}:53").parse().unwrap();
    let (from, m, _) = hijacked_answer(&quiet, 1, "cached.example.test.").expect("a first answer");
    assert_eq!((from, first_a(&m).as_str()), (hijacked, "198.51.100.80"));

    let flood = |stop: Arc<AtomicBool>| {
        // Sixteen source ports, turn by turn, some 300 unique names a
        // second: far more waiting than the group's 64 places.
        let socks: Vec<UdpSocket> = (0..16)
            .map(|_| lab::udp::socket(&lab.client, SocketAddr::new(attacker, 0)))
            .collect();
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let q = query(n as u16, &format!("r{n}.slow.test."), RecordType::A, None);
                let _ = socks[n as usize % socks.len()].send_to(&q.to_vec().unwrap(), hijacked);
                n += 1;
                std::thread::sleep(Duration::from_micros(3300));
            }
            n
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = flood(stop.clone());
    std::thread::sleep(Duration::from_millis(1200));
    let mut slow = Vec::new();
    for i in 0..10u16 {
        for qname in [format!("new{i}.example.test."), "cached.example.test.".to_string()] {
            let got = hijacked_answer(&quiet, 100 + i * 2 + u16::from(qname.starts_with('c')), &qname);
            let Some((from, m, took)) = got else {
                panic!("no answer for {qname} during the flood:\n{}", daemon.log_text())
            };
            assert_eq!(from, hijacked, "{qname} answered from the wrong address");
            assert_eq!(first_a(&m), "198.51.100.80", "{qname}: {m:?}");
            if took > Duration::from_millis(500) {
                slow.push((qname, took));
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent = flooding.join().unwrap();
    assert!(
        slow.len() <= 2,
        "answers held back by the flood ({sent} sent): {slow:?}"
    );

    // Every flood miss has ended (1.4 s for its server, 1.5 s in all):
    // the places are back, the flooding device's own share too, so its
    // next ordinary names are answered, and the quiet device's misses
    // well past what was its share during the flood.
    std::thread::sleep(Duration::from_millis(2500));
    let reformed = lab::udp::socket(&lab.client, SocketAddr::new(attacker, 0));
    for i in 0..5u16 {
        let qname = format!("back{i}.example.test.");
        let got = hijacked_answer(&reformed, 2000 + i, &qname);
        let (from, m, _) =
            got.unwrap_or_else(|| panic!("the flooding device got no answer for {qname} after it stopped"));
        assert_eq!(
            (from, first_a(&m)),
            (hijacked, "198.51.100.80".to_string()),
            "{qname}: {m:?}"
        );
    }
    for i in 0..40u16 {
        let qname = format!("after{i}.example.test.");
        let got = hijacked_answer(&quiet, 1000 + i, &qname);
        let (from, m, _) = got.unwrap_or_else(|| panic!("no answer for {qname} after the flood"));
        assert_eq!((from, first_a(&m)), (hijacked, "198.51.100.80".to_string()), "{qname}");
    }

    // A new flood, and SIGTERM in its middle: the daemon does not wait
    // for its misses' timeouts.
    let stop = Arc::new(AtomicBool::new(false));
    let flooding = flood(stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    // One miss of the quiet device's own that has just begun its 1.4 s.
    quiet
        .send_to(
            &query(3000, "last.slow.test.", RecordType::A, None).to_vec().unwrap(),
            hijacked,
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let asked = Instant::now();
    let stopped = daemon.stop();
    let took = asked.elapsed();
    stop.store(true, Ordering::Relaxed);
    flooding.join().unwrap();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(
        took < Duration::from_millis(1000),
        "SIGTERM took {took:?}:\n{}",
        stopped.log
    );
    assert!(stopped.counter("dns_servfail_client_share") > 0, "{}", stopped.log);
}

/// What [`HostileTcp`] does on a TCP connection once it has a query.
#[derive(Debug, Clone, Copy)]
enum Stream {
    /// Sends the framed answer one byte every `every`.
    Drip { every: Duration },
    /// Sends the two-byte length of an answer, then nothing, until `hold`
    /// has passed (then closes).
    Stall { hold: Duration },
}

/// An upstream that answers names starting with `ok` at once over UDP
/// (198.51.100.80), and every other name with TC=1, so that it is asked
/// again over TCP, where it answers as `stream` says. Counts the TCP
/// connections it accepted.
struct HostileTcp {
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HostileTcp {
    fn start(lab: &Lab, addr: IpAddr, stream: Stream) -> HostileTcp {
        let sa = SocketAddr::new(addr, 53);
        let (udp, tcp) =
            lab.servers[0].enter(move || (UdpSocket::bind(sa).unwrap(), std::net::TcpListener::bind(sa).unwrap()));
        udp.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let accepted: Arc<AtomicUsize> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        {
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let reply = if query_name(&buf[..n]).starts_with("ok") {
                            answer_with(&buf[..n], &[(query_name(&buf[..n]), Err([198, 51, 100, 80]))])
                        } else {
                            reply_head(&buf[..n], true, 0)
                        };
                        if let Some(reply) = reply {
                            let _ = udp.send_to(&reply, from);
                        }
                    }
                }
            }));
        }
        {
            let (accepted, stop) = (accepted.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut conns = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let Ok((s, _)) = tcp.accept() else {
                        std::thread::sleep(Duration::from_millis(10));
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    let stop = stop.clone();
                    conns.push(std::thread::spawn(move || hostile_connection(s, stream, &stop)));
                }
                for t in conns {
                    let _ = t.join();
                }
            }));
        }
        HostileTcp {
            accepted,
            stop,
            threads,
        }
    }
}

/// One connection to [`HostileTcp`]: reads a query, then answers it as
/// `stream` says, until the peer goes away or the test ends.
fn hostile_connection(mut s: TcpStream, stream: Stream, stop: &AtomicBool) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(3)));
    let mut len = [0u8; 2];
    if s.read_exact(&mut len).is_err() {
        return;
    }
    let mut q = vec![0u8; usize::from(u16::from_be_bytes(len))];
    if s.read_exact(&mut q).is_err() {
        return;
    }
    let name = query_name(&q);
    let Some(reply) = answer_with(&q, &[(name, Err([198, 51, 100, 81]))]) else {
        return;
    };
    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&reply);
    // Sleeps `d` in short steps; false once the test ends.
    let pause = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())));
        }
        true
    };
    match stream {
        Stream::Drip { every } => {
            for b in framed {
                if s.write_all(&[b]).is_err() || !pause(every) {
                    return;
                }
            }
        }
        Stream::Stall { hold } => {
            if s.write_all(&framed[..2]).is_ok() {
                pause(hold);
            }
        }
    }
}

impl Drop for HostileTcp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// dig from the lab's client, with how long it took; dig itself waits
/// up to 12 s, far past the daemon's deadline.
fn timed_dig(lab: &Lab, args: &str) -> std::thread::JoinHandle<(lab::dns::Dig, Duration)> {
    let client = lab.client.name.clone();
    let args: Vec<String> = format!("+tries=1 +time=12 @{LISTEN} {args}")
        .split_whitespace()
        .map(String::from)
        .collect();
    std::thread::spawn(move || {
        let asked = Instant::now();
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &client, "dig"])
            .args(&args)
            .output()
            .expect("running dig");
        let raw = String::from_utf8_lossy(&out.stdout).into_owned();
        (lab::dns::parse_dig(&raw), asked.elapsed())
    })
}

/// TCP connections the gateway holds to the upstream's port 53.
fn upstream_tcp_held(lab: &Lab) -> usize {
    lab.gateway
        .sh(&format!("ss -tnH '( dst {UPSTREAM} and dport = :53 )' | wc -l"))
        .trim()
        .parse()
        .unwrap()
}

const ADMIN: &str = "127.0.0.1:9153";

/// The daemon's descriptors by its `/metrics`, less its pooled upstream
/// UDP sockets (those come and go with the queries of every name; what is
/// checked is what the hostile TCP answers leave behind).
fn descriptors_besides_udp_pools(lab: &Lab) -> u64 {
    let text = lab::metrics::fetch(&lab.gateway, ADMIN.parse().unwrap());
    lab::metrics::value(&text, "tproxyd_open_fds") - lab::metrics::value(&text, "tproxyd_dns_upstream_sockets")
}

/// Clients asking names that an upstream truncates over UDP and then
/// cannot or will not answer over TCP (for far longer than anyone waits):
/// each is answered SERVFAIL by its own `dns.timeout` (1.5 s; the
/// server's own timeout is 10 s), not when the upstream gives up; other
/// names from the same upstream are answered meanwhile; and afterwards
/// the daemon holds no connection to it and no more descriptors than
/// before.
fn truncated_then_hostile_over_tcp_holds_nobody_past_the_deadline(lab: &Lab, accepted: impl Fn() -> usize) {
    let daemon = lab.start_tproxyd(
        &config("rate_limit = { qps = 0 }", &format!("[admin]\nlisten = \"{ADMIN}\"\n"))
            .replace("server_timeout = \"700ms\"", "server_timeout = \"10s\""),
    );
    let ok = ask(lab, "ok0.hostile.test");
    assert_eq!(ok.answer_data(), ["198.51.100.80"], "{}", ok.raw);
    let fds_before = descriptors_besides_udp_pools(lab);
    // Two clients on one name (the second waits on the first's upstream
    // query), and four more names.
    let mut waiting = vec![timed_dig(lab, "w0.hostile.test A")];
    std::thread::sleep(Duration::from_millis(300));
    waiting.extend((0..5).map(|i| timed_dig(lab, &format!("w{i}.hostile.test A"))));
    std::thread::sleep(Duration::from_millis(300));
    // Meanwhile other names from the same upstream, and local ones.
    for i in 1..=4 {
        let d = ask(lab, &format!("ok{i}.hostile.test"));
        assert_eq!(d.answer_data(), ["198.51.100.80"], "{}", d.raw);
    }
    assert_eq!(legit_answers(lab, LISTEN, 2), 4);
    for (i, t) in waiting.into_iter().enumerate() {
        let (d, took) = t.join().unwrap();
        eprintln!("client {i}: {} after {took:?}", d.status);
        assert_eq!(d.status, "SERVFAIL", "client {i} after {took:?}: {}", d.raw);
        // 1.5 s and a loaded machine's slack, not the 10 s and more the
        // upstream would keep it.
        assert!(took < Duration::from_secs(5), "client {i} waited {took:?}");
    }
    // Every name went to TCP (or tried to), none was given up on at once.
    assert!(accepted() >= 1, "asked over TCP");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (held, fds) = (upstream_tcp_held(lab), descriptors_besides_udp_pools(lab));
        if held == 0 && fds <= fds_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still {held} TCP connections to the upstream, {fds} descriptors (before: {fds_before})"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
}

#[test]
fn an_upstream_dripping_its_tcp_answer_byte_by_byte_holds_nobody_past_the_deadline() {
    let lab = dns_lab();
    let every = Duration::from_millis(250);
    let up = HostileTcp::start(&lab, ip(UPSTREAM), Stream::Drip { every });
    truncated_then_hostile_over_tcp_holds_nobody_past_the_deadline(&lab, || up.accepted.load(Ordering::Relaxed));
}

#[test]
fn an_upstream_stalling_after_its_tcp_length_prefix_holds_nobody_past_the_deadline() {
    let lab = dns_lab();
    let hold = Duration::from_secs(15);
    let up = HostileTcp::start(&lab, ip(UPSTREAM), Stream::Stall { hold });
    truncated_then_hostile_over_tcp_holds_nobody_past_the_deadline(&lab, || up.accepted.load(Ordering::Relaxed));
}

/// TCP to the upstream is dropped in its namespace (SYNs never answered),
/// while over UDP it truncates every answer.
#[test]
fn an_upstream_whose_tcp_connect_hangs_holds_nobody_past_the_deadline() {
    let lab = dns_lab();
    let up = HostileTcp::start(&lab, ip(UPSTREAM), Stream::Stall { hold: Duration::ZERO });
    lab.servers[0].sh(&format!(
        "nft add table inet hostile && \
         nft add chain inet hostile input '{{ type filter hook input priority -300; }}' && \
         nft add rule inet hostile input ip daddr {UPSTREAM} tcp dport 53 counter drop"
    ));
    let syns = || {
        lab.servers[0]
            .sh("nft list chain inet hostile input")
            .split("packets ")
            .nth(1)
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or(0)
    };
    truncated_then_hostile_over_tcp_holds_nobody_past_the_deadline(&lab, syns);
    assert_eq!(up.accepted.load(Ordering::Relaxed), 0, "no connection got through");
}
