//! Kept encodings (see [`super::super::rendered`]) against the full path:
//! every answer served from a kept encoding must be byte for byte what the
//! full path gives for the same query.

use super::*;
use hickory_proto::op::{Edns, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{SOA, TXT};
use std::path::Path;

const CONFIG: &str = r#"
[dns]
allow = ["192.0.2.0/24"]
rate_limit = { qps = 0 }
[dns.upstreams.default]
servers = ["198.51.100.53"]
[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["192.0.2.50"]
aaaa = ["2001:db8::50"]
cname = "alias.lan"
"#;

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

fn engine() -> DnsEngine {
    let config = crate::config::Config::parse(CONFIG, Path::new("t.toml")).unwrap();
    DnsEngine::build(config.dns().unwrap(), 255, Arc::new(Stats::default())).unwrap()
}

fn name(s: &str) -> Name {
    Name::from_ascii(s).unwrap()
}

/// How a client asks: everything a query carries besides its question.
#[derive(Debug, Clone, Copy)]
struct Asking {
    mixed_case: bool,
    /// EDNS payload size and DO bit, or no EDNS at all.
    edns: Option<(u16, bool)>,
    rd: bool,
    cd: bool,
    transport: Transport,
}

/// The plainest way to ask: lowercase, no EDNS, RD set, over UDP.
const PLAIN: Asking = Asking {
    mixed_case: false,
    edns: None,
    rd: true,
    cd: false,
    transport: Transport::Udp,
};

fn every_way_of_asking() -> Vec<Asking> {
    let mut out = Vec::new();
    for mixed_case in [false, true] {
        for edns in [None, Some((512, false)), Some((1232, false)), Some((4096, true))] {
            for rd in [false, true] {
                for cd in [false, true] {
                    for transport in [Transport::Udp, Transport::Tcp] {
                        out.push(Asking {
                            mixed_case,
                            edns,
                            rd,
                            cd,
                            transport,
                        });
                    }
                }
            }
        }
    }
    out
}

/// `qname` with every other letter upper-cased (0x20 style).
fn mixed(qname: &str) -> String {
    qname
        .chars()
        .enumerate()
        .map(|(i, c)| if i % 2 == 0 { c.to_ascii_uppercase() } else { c })
        .collect()
}

fn query(id: u16, qname: &str, qtype: RecordType, how: Asking) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = how.rd;
    m.metadata.checking_disabled = how.cd;
    let qname = if how.mixed_case {
        mixed(qname)
    } else {
        qname.to_string()
    };
    m.add_query(Query::query(name(&qname), qtype));
    if let Some((payload, dnssec_ok)) = how.edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        e.set_dnssec_ok(dnssec_ok);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

fn answer(engine: &DnsEngine, bytes: &[u8], transport: Transport) -> Vec<u8> {
    match engine.answer_now(bytes, CLIENT, transport) {
        Outcome::Reply(reply) => reply,
        other => panic!("expected an answer at once, got {other:?}"),
    }
}

/// Puts the upstream's answer for `qname`/`qtype` in `engine`'s cache.
fn learn(
    engine: &DnsEngine,
    qname: &str,
    qtype: RecordType,
    rcode: ResponseCode,
    answers: Vec<Record>,
    soa: Option<Record>,
) {
    let how = PLAIN;
    let Outcome::Forward(pending) = engine.answer_now(&query(1, qname, qtype, how), CLIENT, Transport::Udp) else {
        panic!("{qname} was not forwarded");
    };
    let mut upstream = Message::new(0x4321, MessageType::Response, OpCode::Query);
    upstream.metadata.response_code = rcode;
    upstream.metadata.recursion_available = true;
    upstream.add_query(Query::query(name(qname), qtype));
    upstream.answers = answers;
    upstream.authorities = soa.into_iter().collect();
    engine
        .complete_with(pending, 0x4321, &upstream.to_vec().unwrap())
        .expect("an answer");
}

fn a(owner: &str, ttl: u32, addr: [u8; 4]) -> Record {
    Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(addr))))
}

/// An engine whose cache knows a CNAME chain, a negative answer with its
/// SOA, and a TXT answer too big for 512 bytes.
fn engine_that_learnt() -> DnsEngine {
    let engine = engine();
    learn(
        &engine,
        "www.example.test.",
        RecordType::A,
        ResponseCode::NoError,
        vec![
            Record::from_rdata(
                name("www.example.test."),
                300,
                RData::CNAME(CNAME(name("web.example.test."))),
            ),
            a("web.example.test.", 120, [203, 0, 113, 80]),
            a("web.example.test.", 120, [203, 0, 113, 81]),
        ],
        None,
    );
    let soa = SOA::new(
        name("example.test."),
        name("hostmaster.example.test."),
        1,
        3600,
        600,
        86_400,
        600,
    );
    learn(
        &engine,
        "missing.example.test.",
        RecordType::A,
        ResponseCode::NXDomain,
        vec![],
        Some(Record::from_rdata(name("example.test."), 3600, RData::SOA(soa))),
    );
    let txt = (0..8)
        .map(|i| {
            Record::from_rdata(
                name("big.example.test."),
                600,
                RData::TXT(TXT::new(vec![format!("{i}").repeat(100)])),
            )
        })
        .collect();
    learn(
        &engine,
        "big.example.test.",
        RecordType::TXT,
        ResponseCode::NoError,
        txt,
        None,
    );
    engine
}

const QUESTIONS: [(&str, RecordType); 6] = [
    ("www.example.test.", RecordType::A),
    ("missing.example.test.", RecordType::A),
    ("big.example.test.", RecordType::TXT),
    ("printer.lan.", RecordType::A),
    ("printer.lan.", RecordType::AAAA),
    ("printer.lan.", RecordType::CNAME),
];

#[test]
fn a_kept_encoding_is_byte_for_byte_the_full_paths_answer_for_every_way_of_asking() {
    let kept = engine_that_learnt();
    let mut full = engine();
    full.reuse_encoded = false;
    // One cache: the same entries, so the same ages.
    assert!(full.adopt_cache(&kept));
    let ways = every_way_of_asking();
    let mut id = 0u16;
    let mut reused = 0;
    let mut truncated = 0;
    for (qname, qtype) in QUESTIONS {
        for &target in &ways {
            // Whatever the kept encoding was made for, the answer to
            // `target` must be the full path's.
            for &before in &ways {
                id = id.wrapping_add(1);
                let _ = answer(&kept, &query(id, qname, qtype, before), before.transport);
                id = id.wrapping_add(1);
                let q = query(id, qname, qtype, target);
                let mut pair = (answer(&kept, &q, target.transport), answer(&full, &q, target.transport));
                if pair.0 != pair.1 {
                    // The entry may have turned a second older between
                    // the two answers: then both are asked again.
                    pair = (answer(&kept, &q, target.transport), answer(&full, &q, target.transport));
                }
                assert_eq!(pair.0, pair.1, "{qname} {qtype}: asked as {target:?} after {before:?}");
                let same_shape = format!("{before:?}") == format!("{target:?}");
                reused += usize::from(same_shape);
                truncated += usize::from(pair.0.get(2).is_some_and(|b| b & 0x02 != 0));
            }
        }
    }
    // Coverage: answers that had to be cut for small buffers were among
    // those compared, and every question was asked twice in a row the
    // same way (answered from the kept encoding) for every way of asking.
    assert!(truncated > 0);
    assert_eq!(reused, QUESTIONS.len() * ways.len());
}

#[test]
fn the_same_question_is_served_from_the_kept_encoding_with_its_own_id() {
    let engine = engine_that_learnt();
    let how = Asking {
        mixed_case: true,
        edns: Some((1232, true)),
        rd: true,
        cd: false,
        transport: Transport::Udp,
    };
    for (qname, qtype) in QUESTIONS {
        let first = answer(&engine, &query(7, qname, qtype, how), how.transport);
        let request = message::parse_request(&query(8, qname, qtype, how)).unwrap();
        let entry;
        let (rendered, age) =
            match engine
                .rules
                .first_match(CLIENT, &crate::dns::names::query_key(request.query.name()), qtype)
            {
                Some(rule) => (&rule.rendered, 0),
                None => {
                    let (e, age) = engine.cache.get(&engine.cache_key(&request, 0)).unwrap();
                    entry = e;
                    (&entry.rendered, age)
                }
            };
        let wire = wire_labels(request.query.name());
        let shape = Shape {
            asked: Asked::of(&request, &wire),
            id: request.id,
            limit: engine.answer_limit(&request, how.transport),
            our_payload: engine.max_udp_payload,
            age,
        };
        let reused = rendered.reuse(&shape).expect("kept after the first answer");
        assert_eq!(&reused.bytes[..2], &8u16.to_be_bytes());
        assert_eq!(reused.bytes[2..], first[2..]);
        let second = answer(&engine, &query(9, qname, qtype, how), how.transport);
        assert_eq!(&second[..2], &9u16.to_be_bytes());
        assert_eq!(second[2..], first[2..]);
    }
}

#[test]
fn ttls_served_from_a_kept_encoding_count_down() {
    let engine = engine_that_learnt();
    let how = PLAIN;
    let ttls = |id: u16| {
        let bytes = answer(
            &engine,
            &query(id, "www.example.test.", RecordType::A, how),
            how.transport,
        );
        let m = Message::from_vec(&bytes).unwrap();
        m.answers.iter().map(|r| r.ttl).collect::<Vec<_>>()
    };
    let first = ttls(1);
    assert_eq!(first.len(), 3);
    // Again at once (from the kept encoding, unless a second passed).
    let again = ttls(2);
    assert!(again == first || again.iter().zip(&first).all(|(a, f)| a + 1 == *f));
    std::thread::sleep(std::time::Duration::from_millis(2_100));
    let later = ttls(3);
    for (l, f) in later.iter().zip(&first) {
        assert!(*l + 2 <= *f && *l + 3 >= *f, "{first:?} then {later:?}");
    }
}

#[test]
fn plain_queries_are_answered_from_the_wire_and_others_take_the_full_path() {
    let engine = engine_that_learnt();
    let how = Asking {
        mixed_case: true,
        edns: Some((1232, true)),
        ..PLAIN
    };
    for (qname, qtype) in QUESTIONS {
        // A cached entry may turn a second older between two answers:
        // then the three are taken again.
        let three = || {
            let first = answer(&engine, &query(7, qname, qtype, how), how.transport);
            // Asked the same way again: answered without a hickory parse.
            let again = query(8, qname, qtype, how);
            let Some(Outcome::Reply(kept)) =
                engine.answer_kept(&again, CLIENT, how.transport, &mut None, &mut Vec::new())
            else {
                panic!("{qname} {qtype}: not answered from the wire");
            };
            assert_eq!(&kept[..2], &8u16.to_be_bytes());
            // With an EDNS option (a cookie) the shape is not plain: the
            // full path answers, the same answer.
            let mut cookie = query(9, qname, qtype, how);
            let rdlen_at = cookie.len() - 2;
            cookie[rdlen_at + 1] = 12;
            cookie.extend_from_slice(&[0, 10, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]);
            assert!(
                engine
                    .answer_kept(&cookie, CLIENT, how.transport, &mut None, &mut Vec::new())
                    .is_none()
            );
            let full = answer(&engine, &cookie, how.transport);
            (first[2..].to_vec(), kept[2..].to_vec(), full[2..].to_vec())
        };
        let (mut first, mut kept, mut full) = three();
        if first != kept || first != full {
            (first, kept, full) = three();
        }
        assert_eq!(first, kept, "{qname} {qtype}");
        assert_eq!(first, full, "{qname} {qtype}");
    }
    // A client outside `dns.allow` is refused by the full path, never
    // answered from the wire.
    let stranger = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9));
    let q = query(10, "printer.lan.", RecordType::A, PLAIN);
    assert!(
        engine
            .answer_kept(&q, stranger, Transport::Udp, &mut None, &mut Vec::new())
            .is_none()
    );
    let Outcome::Reply(refused) = engine.answer_now(&q, stranger, Transport::Udp) else {
        panic!("no answer to a stranger");
    };
    assert_eq!(refused[3] & 0x0f, ResponseCode::Refused.low());
}

/// Answers blocked by a CNAME target.
mod cname_block;
/// Plain upstream answers made on the wire, against the full path.
mod plain;

/// An upstream's plain answer (one A record owned by a pointer to the
/// question) for the name spelt as `labels` on the wire.
fn plain_answer_for(labels: &[u8]) -> Option<PlainAnswer> {
    let mut bytes = vec![0x51, 0x51, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
    bytes.extend_from_slice(labels);
    bytes.extend_from_slice(&[0, 1, 0, 1, 0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 203, 0, 113, 1]);
    plain_answer::read(&bytes, 0x5151, labels, 1, 1)
}

#[test]
fn a_lowercase_names_key_says_what_the_label_walk_says_of_every_answers_question() {
    // Plain, mixed case, a name of letters that differ only in case from
    // its key, binary labels (bytes a plain query never holds, read by
    // hickory's full path), 63-byte labels, a 253-byte name and names
    // that are another's prefix or suffix.
    let long_label = [b'a'; 63];
    let mut names: Vec<Name> = [
        "www.example.test.",
        "WWW.example.test.",
        "www.Example.test.",
        "www.example.test.x.",
        "example.test.",
        "w-w_w.ex4mple.test.",
        "a.b.c.d.e.f.g.h.",
    ]
    .iter()
    .map(|s| name(s))
    .collect();
    names.push(Name::from_labels([&b"\x00\xff"[..], b"b.c", b"\x7f@[`{"]).unwrap());
    names.push(Name::from_labels([&b"\x00\xff"[..], b"b.C", b"\x7f@[`{"]).unwrap());
    names.push(Name::from_labels([&long_label[..], b"test"]).unwrap());
    names.push(Name::from_labels([&long_label[..], &long_label[..], &long_label[..], &[b'z'; 61][..]]).unwrap());
    names.push(Name::from_labels([&long_label[..], &long_label[..], &long_label[..], &[b'Z'; 61][..]]).unwrap());
    let engine = engine();
    let mut compared = 0;
    for asked in &names {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(asked.clone(), RecordType::A));
        let Ok(request) = message::parse_request(&m.to_vec().unwrap()) else {
            panic!("{asked:?} not read");
        };
        let key = engine.cache_key(&request, 0);
        for answered in &names {
            let Some(plain) = plain_answer_for(&wire_labels(answered)) else {
                panic!("no plain answer for {answered:?}");
            };
            assert_eq!(
                spelt_as_key(&request, &key, &plain),
                plain.is_named(request.query.name()),
                "asked {asked:?}, answered {answered:?}"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, names.len() * names.len());
    // Each name's own answer is its question; another's never is.
    let own = names
        .iter()
        .filter(|asked| {
            let mut m = Message::query();
            m.add_query(Query::query((*asked).clone(), RecordType::A));
            let request = message::parse_request(&m.to_vec().unwrap()).unwrap();
            let plain = plain_answer_for(&wire_labels(asked)).unwrap();
            spelt_as_key(&request, &engine.cache_key(&request, 0), &plain)
        })
        .count();
    assert_eq!(own, names.len());
}
