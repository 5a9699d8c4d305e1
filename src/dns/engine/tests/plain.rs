//! Plain upstream answers (see [`crate::dns::plain_answer`]) against the
//! full path: the reply and the cache entry made on the wire must be
//! exactly what hickory's parse, scrubbing, clamping and the encoder make
//! of the same datagram, for every way of asking, and a datagram the
//! plain reader refuses must be handled as before.

use super::*;
use crate::dns::names::wire_key;
use std::sync::atomic::Ordering;

/// Records of an upstream answer: TTL and address bytes.
type Addresses = Vec<(u32, Vec<u8>)>;

/// The upstream's datagram answering `qname` (as sent) with `records`.
fn upstream(qname: &str, qtype: RecordType, records: &[(u32, Vec<u8>)], edns: bool) -> Vec<u8> {
    let mut m = Message::new(0x4321, MessageType::Response, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.metadata.recursion_available = true;
    m.add_query(Query::query(name(qname), qtype));
    for (ttl, data) in records {
        let rdata = match <[u8; 4]>::try_from(data.as_slice()) {
            Ok(v4) => RData::A(A(Ipv4Addr::from(v4))),
            Err(_) => RData::AAAA(AAAA(Ipv6Addr::from(<[u8; 16]>::try_from(data.as_slice()).unwrap()))),
        };
        m.add_answer(Record::from_rdata(name(qname), *ttl, rdata));
    }
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        m.set_edns(e);
    }
    m.to_vec().unwrap()
}

/// The cache entry for `qname`/`qtype`: its records (names with their
/// case) and lifetime, or `None`.
fn cached(engine: &DnsEngine, qname: &str, qtype: RecordType) -> Option<(String, u32)> {
    let key = CacheKey::new("default", &wire_key(&name(qname)), qtype, DNSClass::IN);
    let (entry, _) = engine.cache.get(&key)?;
    let (msg, lifetime, _) = entry.to_message();
    Some((
        format!(
            "{:?} {:?} {:?}",
            msg.metadata.response_code, msg.answers, msg.authorities
        ),
        lifetime,
    ))
}

/// Forwards `qname` on both engines as `how` asks it and completes both
/// with `bytes` (a datagram in reply to ID 0x4321): the replies and the
/// cache entries must be the same.
fn both_answer(fast: &DnsEngine, full: &DnsEngine, qname: &str, qtype: RecordType, how: Asking, bytes: &[u8]) {
    let asked = if how.mixed_case {
        mixed(qname)
    } else {
        qname.to_string()
    };
    let q = query(7, &asked, qtype, how);
    let mut replies = Vec::new();
    for engine in [fast, full] {
        let Outcome::Forward(pending) = engine.answer_now(&q, CLIENT, how.transport) else {
            panic!("{qname} was not forwarded");
        };
        replies.push(engine.complete_with(pending, 0x4321, bytes));
    }
    assert_eq!(replies[0], replies[1], "{qname} {qtype} asked {how:?}");
    assert_eq!(
        cached(fast, qname, qtype),
        cached(full, qname, qtype),
        "{qname} {qtype} asked {how:?}"
    );
}

fn engines() -> (DnsEngine, DnsEngine) {
    let mut full = engine();
    full.plain_answers = false;
    (engine(), full)
}

#[test]
fn plain_answers_are_answered_and_cached_as_the_full_path_does() {
    let (fast, full) = engines();
    let v4 = |last: u8| vec![203, 0, 113, last];
    let v6 = |last: u8| {
        let mut v = vec![0x20, 0x01, 0x0d, 0xb8];
        v.resize(15, 0);
        v.push(last);
        v
    };
    let sets: Vec<(RecordType, Addresses)> = vec![
        (RecordType::A, vec![(300, v4(1))]),
        // TTLs below, within and above the clamps, and 0 (not cached).
        (RecordType::A, vec![(0, v4(1)), (5, v4(2)), (4_000_000, v4(3))]),
        (RecordType::A, vec![(0x8000_0000, v4(9))]),
        (RecordType::AAAA, vec![(60, v6(1)), (61, v6(2))]),
        // Over 512 bytes: truncated for some clients, by the full path.
        (RecordType::A, (0..30).map(|i| (120, v4(i))).collect()),
        // More records than the plain reader takes.
        (RecordType::A, (0..40).map(|i| (120, v4(i))).collect()),
    ];
    let mut n = 0;
    for (qtype, records) in &sets {
        for how in every_way_of_asking() {
            for edns in [false, true] {
                n += 1;
                let qname = format!("n{n}.example.test.");
                let asked = if how.mixed_case { mixed(&qname) } else { qname.clone() };
                // The upstream echoes the name as it was sent: the client's.
                let bytes = upstream(&asked, *qtype, records, edns);
                both_answer(&fast, &full, &qname, *qtype, how, &bytes);
            }
        }
    }
    let made = fast.plain_replies.load(Ordering::Relaxed);
    assert_eq!(full.plain_replies.load(Ordering::Relaxed), 0);
    // Four of the six sets are plain for every way of asking; the 30
    // records fit only the clients that take more than 512 bytes.
    assert!(made > n * 4 / 6, "{made} of {n} made on the wire");
}

#[test]
fn altered_answers_get_the_same_treatment_from_both_paths() {
    let (fast, full) = engines();
    let mut n = 0;
    for edns in [false, true] {
        for i in 0.. {
            let base = upstream(
                "x.example.",
                RecordType::A,
                &[(300, vec![203, 0, 113, 1]), (7, vec![203, 0, 113, 2])],
                edns,
            );
            if i >= base.len() {
                break;
            }
            for b in [0u8, 1, 3, 0x0c, 0x1c, 0x29, 0x40, 0x80, 0xc0, 0xff, b'X'] {
                n += 1;
                let qname = format!("x{n}.example.");
                let mut v = upstream(
                    &qname,
                    RecordType::A,
                    &[(300, vec![203, 0, 113, 1]), (7, vec![203, 0, 113, 2])],
                    edns,
                );
                // The same byte of the same field: names differ in length
                // only in the first label, before the question's end.
                let at = if i < 14 { i } else { i + v.len() - base.len() };
                v[at] = b;
                both_answer(&fast, &full, &qname, RecordType::A, PLAIN, &v);
                n += 1;
                let qname = format!("x{n}.example.");
                let mut v = upstream(&qname, RecordType::A, &[(300, vec![203, 0, 113, 1])], edns);
                v.truncate(i.min(v.len()));
                both_answer(&fast, &full, &qname, RecordType::A, PLAIN, &v);
            }
        }
    }
    assert!(fast.plain_replies.load(Ordering::Relaxed) > 0);
}

/// Hostile upstream answers that a change of one byte does not make:
/// records repeated, owners that reach the question name through another
/// record, classes, lengths and counts that lie, header bits and OPT
/// fields a server should not set, bytes after the message, a NODATA
/// answer with its SOA. Whatever either path makes of each, asked every
/// way, the other must make the same reply and cache entry.
#[test]
fn hostile_answers_get_the_same_treatment_from_both_paths() {
    let (fast, full) = engines();
    let a = |last: u8| vec![203, 0, 113, last];
    type Alter = fn(&mut Vec<u8>, usize);
    // `r` is where the first answer record starts (two A records of 16
    // bytes each follow the question; then the OPT, when there is one).
    let alterations: Vec<(&str, Alter)> = vec![
        ("as sent", |_, _| {}),
        ("the same record twice", |v, r| {
            let first = v[r..r + 16].to_vec();
            v[r + 16..r + 32].copy_from_slice(&first);
        }),
        ("owner: a pointer to the first record's owner", |v, r| {
            v[r + 16..r + 18].copy_from_slice(&[0xC0, r as u8]);
        }),
        ("owner: a pointer to the question's type", |v, r| {
            v[r + 16..r + 18].copy_from_slice(&[0xC0, (r - 4) as u8]);
        }),
        ("owner: a pointer to itself", |v, r| {
            v[r + 16..r + 18].copy_from_slice(&[0xC0, (r + 16) as u8]);
        }),
        ("class CH", |v, r| v[r + 21] = 3),
        ("class ANY", |v, r| v[r + 20..r + 22].copy_from_slice(&[0, 255])),
        ("RDLENGTH 16 in an A record", |v, r| {
            v[r + 27] = 16;
            let tail = v.split_off(r + 32);
            v.extend_from_slice(&[0; 12]);
            v.extend_from_slice(&tail);
        }),
        ("RDLENGTH 0", |v, r| {
            v[r + 27] = 0;
            v.drain(r + 28..r + 32);
        }),
        ("RDLENGTH longer than the datagram", |v, r| v[r + 26] = 0xff),
        ("TTL 0xffffffff", |v, r| v[r + 6..r + 10].copy_from_slice(&[0xff; 4])),
        ("ANCOUNT 0xffff", |v, _| v[6..8].copy_from_slice(&[0xff, 0xff])),
        ("ANCOUNT 3", |v, _| v[7] = 3),
        ("ANCOUNT 1", |v, _| v[7] = 1),
        ("AA, AD and Z set, RA clear", |v, _| {
            v[2] |= 0x04;
            v[3] = (v[3] & 0x7f) | 0x60;
        }),
        ("RD clear", |v, _| v[2] &= !0x01),
        ("question class CH", |v, r| v[r - 1] = 3),
        ("a byte after the message", |v, _| v.push(0)),
        ("a whole record after the message", |v, r| {
            let first = v[r..r + 16].to_vec();
            v.extend_from_slice(&first);
        }),
    ];
    // What keeps the plain shape (and is answered on the wire, the same
    // as the full path answers it); anything else must not be.
    const PLAIN_SHAPED: [&str; 7] = [
        "as sent",
        "the same record twice",
        "TTL 0xffffffff",
        "AA, AD and Z set, RA clear",
        "RD clear",
        "OPT with DO",
        "OPT payload 0",
    ];
    let mut n = 0;
    for edns in [false, true] {
        let opt_alterations: Vec<(&str, Alter)> = if edns {
            vec![
                ("OPT with DO", |v, _| {
                    let at = v.len() - 11;
                    v[at + 7] = 0x80;
                }),
                ("OPT payload 0", |v, _| {
                    let at = v.len() - 11;
                    v[at + 3..at + 5].copy_from_slice(&[0, 0]);
                }),
                ("OPT owned by a name", |v, _| {
                    let at = v.len() - 11;
                    v[at] = 0xC0;
                    v.insert(at + 1, 12);
                }),
                ("two OPT records", |v, _| {
                    let opt = v[v.len() - 11..].to_vec();
                    v.extend_from_slice(&opt);
                    v[11] = 2;
                }),
                ("OPT extended RCODE", |v, _| {
                    let at = v.len() - 11;
                    v[at + 5] = 1;
                }),
                ("OPT RDLENGTH lies", |v, _| {
                    let at = v.len() - 11;
                    v[at + 10] = 4;
                }),
            ]
        } else {
            Vec::new()
        };
        for (why, alter) in alterations.iter().chain(&opt_alterations) {
            for how in every_way_of_asking() {
                n += 1;
                let qname = format!("h{n}.example.test.");
                let asked = if how.mixed_case { mixed(&qname) } else { qname.clone() };
                let mut v = upstream(&asked, RecordType::A, &[(300, a(1)), (7, a(2))], edns);
                let r = 12 + qname.len() + 1 + 4;
                alter(&mut v, r);
                let before = fast.plain_replies.load(Ordering::Relaxed);
                both_answer(&fast, &full, &qname, RecordType::A, how, &v);
                let made = fast.plain_replies.load(Ordering::Relaxed) > before;
                assert!(!made || PLAIN_SHAPED.contains(why), "{why}: made on the wire");
            }
        }
    }
    // A NODATA answer (NOERROR, no record, the zone's SOA) is cached as
    // the full path caches it, with the SOA.
    for how in every_way_of_asking() {
        n += 1;
        let qname = format!("h{n}.example.test.");
        let asked = if how.mixed_case { mixed(&qname) } else { qname.clone() };
        let mut m = Message::new(0x4321, MessageType::Response, OpCode::Query);
        m.add_query(Query::query(name(&asked), RecordType::A));
        m.add_authority(Record::from_rdata(
            name("example.test."),
            600,
            RData::SOA(SOA::new(
                name("ns.example.test."),
                name("hostmaster.example.test."),
                1,
                3600,
                600,
                86_400,
                300,
            )),
        ));
        both_answer(&fast, &full, &qname, RecordType::A, how, &m.to_vec().unwrap());
        assert!(cached(&fast, &qname, RecordType::A).is_some(), "NODATA cached");
    }
}

/// A TTL with its top bit set is read as zero (RFC 2181, section 8), by
/// either path: the client gets TTL 0 and nothing is cached, where such
/// an answer used to be kept for `max_ttl` (a day by default).
#[test]
fn a_ttl_with_its_top_bit_set_is_read_as_zero() {
    let (fast, full) = engines();
    for (i, engine) in [&fast, &full].into_iter().enumerate() {
        for (j, ttl) in [0x8000_0000u32, 0xffff_ffff].into_iter().enumerate() {
            let qname = format!("top{i}-{j}.example.test.");
            let bytes = upstream(&qname, RecordType::A, &[(ttl, vec![203, 0, 113, 1])], j == 1);
            let Outcome::Forward(pending) =
                engine.answer_now(&query(7, &qname, RecordType::A, PLAIN), CLIENT, Transport::Udp)
            else {
                panic!("{qname} was not forwarded");
            };
            let reply = engine.complete_with(pending, 0x4321, &bytes).expect("a reply");
            let msg = Message::from_vec(&reply).unwrap();
            assert_eq!(msg.answers.len(), 1, "{qname}");
            assert_eq!(msg.answers[0].ttl, 0, "{qname}: TTL {ttl:#x}");
            assert!(cached(engine, &qname, RecordType::A).is_none(), "{qname}: cached");
        }
    }
}
