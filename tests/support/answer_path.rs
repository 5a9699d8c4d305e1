//! The answer-path harness shared by the `dns_answer` fuzz target (fuzz/)
//! and its deterministic twin in tests/dns_robustness.rs.
//!
//! Input: byte 0 picks the question, bytes 1..13 are the upstream's header
//! (its ID and question count are overwritten so the answer is accepted
//! as far as the header goes), the rest follows our question as the answer,
//! authority and additional sections. The question name is made unique per
//! input (`q<hash>.<base>`) so every input takes the miss path rather than
//! hitting an entry an earlier input left in the (shared, bounded) cache;
//! a compression pointer to offset 12 names it, as real answers do.
//!
//! Invariants, for the reply on the miss and the reply re-served from the
//! cache: a well-formed response with the query's ID and question, within
//! the UDP size, holding nothing scrubbing would remove, with every TTL
//! within `max_ttl`.

use hickory_proto::op::{Message, MessageType, Query};
use hickory_proto::rr::{Name, RecordType};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, Ipv4Addr};
use tproxyd::dns::scrub::scrub;
use tproxyd::dns::{DnsEngine, Outcome, Transport};

const BASES: [&str; 4] = ["a.test.", "www.example.test.", "bank.test.", "x.y.z.test."];
const TYPES: [RecordType; 6] = [
    RecordType::A,
    RecordType::AAAA,
    RecordType::TXT,
    RecordType::CNAME,
    RecordType::MX,
    RecordType::ANY,
];
/// `dns.cache.max_ttl` in tests/data/dns-engine.toml (the default).
const MAX_TTL: u32 = 86_400;

/// What one input did, for the twin's coverage checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Not accepted as an answer: SERVFAIL.
    Rejected,
    /// Accepted and answered; `true` when re-served from the cache.
    Answered(bool),
    /// The engine did not forward the question (cannot happen with the
    /// shared config, but not an invariant worth a crash).
    NotForwarded,
}

pub fn run(engine: &DnsEngine, data: &[u8]) -> Path {
    let Some((&pick, rest)) = data.split_first() else {
        return Path::NotForwarded;
    };
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut hasher);
    let base = BASES[usize::from(pick) % BASES.len()];
    let qtype = TYPES[usize::from(pick / 4) % TYPES.len()];
    let Ok(qname) = Name::from_ascii(format!("q{:016x}.{base}", hasher.finish())) else {
        return Path::NotForwarded;
    };
    let transport = if pick & 0x80 != 0 {
        Transport::Tcp
    } else {
        Transport::Udp
    };
    let mut query = Message::query();
    query.metadata.id = 0x5a5a;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(qname, qtype));
    let Ok(query_bytes) = query.to_vec() else {
        return Path::NotForwarded;
    };
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
    let Outcome::Forward(pending) = engine.answer_now(&query_bytes, client, transport) else {
        return Path::NotForwarded;
    };

    // The upstream's datagram: its header, our question, its sections.
    let id = 0x1234;
    let mut header = [0u8; 12];
    for (h, b) in header.iter_mut().zip(rest) {
        *h = *b;
    }
    header[..2].copy_from_slice(&u16::to_be_bytes(id));
    header[4..6].copy_from_slice(&[0, 1]);
    let mut wire = header.to_vec();
    wire.extend_from_slice(query_bytes.get(12..).unwrap_or_default());
    wire.extend_from_slice(rest.get(12..).unwrap_or_default());

    let Some(reply) = engine.complete_with(pending, id, &wire) else {
        panic!("no reply at all to a forwarded query");
    };
    let first = check(&query, &reply, transport);
    let rejected =
        first.metadata.response_code == hickory_proto::op::ResponseCode::ServFail && first.answers.is_empty();

    // Re-served from the cache, if it was kept.
    match engine.answer_now(&query_bytes, client, transport) {
        Outcome::Reply(again) => {
            let again = check(&query, &again, transport);
            let key = |m: &Message| {
                m.answers
                    .iter()
                    .map(|r| (r.name.to_string().to_ascii_lowercase(), r.record_type(), r.data.clone()))
                    .collect::<Vec<_>>()
            };
            if !again.metadata.truncation && !first.metadata.truncation {
                assert_eq!(key(&first), key(&again), "the cache re-served other records");
            }
            assert_eq!(first.metadata.response_code, again.metadata.response_code);
            Path::Answered(true)
        }
        Outcome::Held(..) => Path::Answered(true),
        _ if rejected => Path::Rejected,
        _ => Path::Answered(false),
    }
}

/// The invariants of one reply; returns it parsed.
fn check(query: &Message, reply: &[u8], transport: Transport) -> Message {
    let mut parsed = Message::from_vec(reply).unwrap_or_else(|e| panic!("unparseable reply: {e}"));
    assert_eq!(parsed.metadata.message_type, MessageType::Response);
    assert_eq!(parsed.metadata.id, query.metadata.id);
    assert_eq!(parsed.queries, query.queries, "the question must be echoed");
    if transport == Transport::Udp {
        assert!(reply.len() <= 1232, "UDP reply of {} bytes", reply.len());
    }
    for r in parsed
        .answers
        .iter()
        .chain(&parsed.authorities)
        .chain(&parsed.additionals)
    {
        assert!(r.ttl <= MAX_TTL, "TTL {} above max_ttl: {r}", r.ttl);
    }
    let copy = parsed.clone();
    let removed = scrub(&query.queries[0], &mut parsed);
    assert_eq!(removed.removed, 0, "served records scrubbing removes: {copy:?}");
    assert_eq!(removed.broken, None, "a broken CNAME chain was served: {copy:?}");
    copy
}
