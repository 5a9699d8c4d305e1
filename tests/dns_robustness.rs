//! The DNS engine against hostile input, without the network: the same
//! entry point and invariants as the cargo-fuzz target (fuzz/), driven by
//! a deterministic mutator so every CI run covers the same 60,000 inputs.

use hickory_proto::op::{Edns, Message, MessageType, Query};
use hickory_proto::rr::{Name, RecordType};
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use tproxyd::config::Config;
use tproxyd::dns::{DnsEngine, Outcome, Transport};
use tproxyd::stats::Stats;

fn engine() -> (DnsEngine, Arc<Stats>) {
    let text = include_str!("data/dns-engine.toml");
    let dns = Config::parse(text, Path::new("t.toml")).unwrap().dns().unwrap().clone();
    let stats = Arc::new(Stats::default());
    (DnsEngine::build(&dns, 255, stats.clone()).unwrap(), stats)
}

fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (name, qtype, edns) in [
        ("printer.lan.", RecordType::A, None),
        ("x.ads.example.", RecordType::AAAA, Some(4096)),
        ("printer.lan.", RecordType::CNAME, Some(512)),
        ("www.example.test.", RecordType::TXT, None),
    ] {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        out.push(m.to_vec().unwrap());
    }
    out
}

/// xorshift64*: deterministic and dependency-free.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, input: &mut Vec<u8>) {
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !input.is_empty() => {
                let i = rng.below(input.len());
                input[i] = rng.next() as u8;
            }
            1 => input.truncate(rng.below(input.len() + 1)),
            2 => {
                let i = rng.below(input.len() + 1);
                input.insert(i, rng.next() as u8);
            }
            3 if input.len() > 4 => {
                // Header counts are where parsers go wrong most.
                let i = 4 + rng.below(8.min(input.len() - 4));
                input[i] = [0, 1, 2, 0xff][rng.below(4)];
            }
            _ => input.extend_from_slice(&[0xc0, rng.next() as u8]), // compression pointers
        }
    }
}

#[test]
fn sixty_thousand_mutated_queries_never_panic_and_replies_are_well_formed() {
    let (engine, stats) = engine();
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
    let seeds = seeds();
    let mut rng = Rng(0x7470_726f_7879_6421);
    let (mut replies, mut forwards) = (0, 0);
    for i in 0..60_000 {
        let mut input = seeds[i % seeds.len()].clone();
        mutate(&mut rng, &mut input);
        let transport = if i % 3 == 0 { Transport::Tcp } else { Transport::Udp };
        match engine.answer_now(&input, client, transport) {
            Outcome::Reply(bytes) | Outcome::Held(bytes, _) | Outcome::Prefetch(bytes, _) => {
                replies += 1;
                let reply = Message::from_vec(&bytes).unwrap_or_else(|e| panic!("unparseable reply to {input:?}: {e}"));
                assert_eq!(reply.metadata.message_type, MessageType::Response);
                if transport == Transport::Udp {
                    assert!(bytes.len() <= 1232, "UDP reply of {} bytes to {input:?}", bytes.len());
                }
                if input.len() >= 2 {
                    assert_eq!(reply.metadata.id.to_be_bytes(), [input[0], input[1]], "reply ID");
                }
            }
            Outcome::Forward(_) => forwards += 1,
            Outcome::Drop => {}
        }
    }
    // The mutator must actually reach every outcome, or this test proves little.
    assert!(
        replies > 10_000 && forwards > 1_000,
        "replies {replies}, forwards {forwards}"
    );
    assert!(stats.dns_formerr.get() > 1_000, "formerr {}", stats.dns_formerr.get());
    assert!(stats.dns_dropped_malformed.get() > 100);
    assert!(stats.dns_answered_local.get() > 1_000 && stats.dns_blocked.get() > 1_000);
}

#[path = "support/answer_path.rs"]
mod answer_path;

/// A resource record owned by the question name (compression pointer to
/// offset 12), or by `other` (uncompressed labels).
fn record(other: Option<&[&str]>, rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
    let mut r = match other {
        None => vec![0xc0, 0x0c],
        Some(labels) => {
            let mut n = Vec::new();
            for l in labels {
                n.push(l.len() as u8);
                n.extend_from_slice(l.as_bytes());
            }
            n.push(0);
            n
        }
    };
    r.extend_from_slice(&rtype.to_be_bytes());
    r.extend_from_slice(&1u16.to_be_bytes());
    r.extend_from_slice(&ttl.to_be_bytes());
    r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
    r.extend_from_slice(rdata);
    r
}

/// Answer-path seeds: `[pick, header(12), records...]` (see the harness).
fn answer_seeds() -> Vec<Vec<u8>> {
    let header = |rcode: u8, an: u8, ns: u8, ar: u8| vec![0, 0, 0x81, 0x80 | rcode, 0, 1, 0, an, 0, ns, 0, ar];
    let soa_rdata = {
        let mut d = vec![0xc0, 0x0c, 0xc0, 0x0c]; // mname, rname
        for v in [1u32, 3600, 600, 86400, 300] {
            d.extend_from_slice(&v.to_be_bytes());
        }
        d
    };
    let mut out = Vec::new();
    // a.test A: the answer with a huge TTL plus an injected bank.test A.
    let mut s = vec![0u8];
    s.extend(header(0, 2, 0, 1));
    s.extend(record(None, 1, 1_000_000, &[198, 51, 100, 10]));
    s.extend(record(Some(&["bank", "test"]), 1, 300, &[203, 0, 113, 66]));
    s.extend(record(Some(&["ns", "evil"]), 1, 300, &[203, 0, 113, 66]));
    out.push(s);
    // A CNAME chain: q -> t.test, t.test A.
    let mut s = vec![0u8];
    s.extend(header(0, 2, 0, 0));
    s.extend(record(None, 5, 300, &[1, b't', 4, b't', b'e', b's', b't', 0]));
    s.extend(record(Some(&["t", "test"]), 1, 300, &[198, 51, 100, 11]));
    out.push(s);
    // NXDOMAIN with an SOA owned by the name, and a stray NS.
    let mut s = vec![1u8];
    s.extend(header(3, 0, 2, 0));
    s.extend(record(None, 6, 900, &soa_rdata));
    s.extend(record(Some(&["test"]), 2, 300, &[2, b'n', b's', 0]));
    out.push(s);
    // TXT over TCP, big enough to need truncation over UDP.
    let mut s = vec![0x88u8];
    s.extend(header(0, 1, 0, 0));
    let txt: Vec<u8> = std::iter::repeat_n([200u8].into_iter().chain([b'x'; 200]), 8)
        .flatten()
        .collect();
    s.extend(record(None, 16, 60, &txt));
    out.push(s);
    out
}

#[test]
fn forty_thousand_mutated_upstream_answers_keep_every_answer_path_invariant() {
    let (engine, stats) = engine();
    let seeds = answer_seeds();
    let mut rng = Rng(0x616e_7377_6572_7321);
    let (mut rejected, mut cached, mut passed) = (0, 0, 0);
    for i in 0..40_000 {
        let mut input = seeds[i % seeds.len()].clone();
        if i >= seeds.len() {
            mutate(&mut rng, &mut input);
        }
        match answer_path::run(&engine, &input) {
            answer_path::Path::Rejected => rejected += 1,
            answer_path::Path::Answered(true) => cached += 1,
            answer_path::Path::Answered(false) => passed += 1,
            answer_path::Path::NotForwarded => {}
        }
    }
    eprintln!(
        "answer path: rejected {rejected}, cached {cached}, passed {passed}, scrubbed {}",
        stats.dns_scrubbed_records.get()
    );
    // The mutator must reach every path, or this test proves little.
    assert!(
        rejected > 1_000 && cached > 1_000 && passed > 100,
        "rejected {rejected}, cached {cached}, passed {passed}"
    );
    assert!(
        stats.dns_scrubbed_records.get() > 1_000,
        "{}",
        stats.dns_scrubbed_records.get()
    );
}

/// The twin of the `dns_cache_file` fuzz target: mutated cache files load
/// without a panic, within bounds, and what loads saves and loads again.
#[test]
fn twenty_thousand_mutated_cache_files_never_panic_and_round_trip() {
    use std::time::Instant;
    use tproxyd::config::dns::CacheConfig;
    use tproxyd::dns::cache::DnsCache;
    use tproxyd::dns::cache_file::{decode_into, encode};
    let config = CacheConfig {
        capacity: 64,
        max_bytes: 256 << 10,
        ..CacheConfig::default()
    };
    let now = Instant::now();
    let unix = 2_000_000_000;
    // A real file of eight entries.
    let source = DnsCache::with_stale_window(&config, 86_400);
    let mut m = Message::query();
    m.metadata.message_type = MessageType::Response;
    m.add_answer(hickory_proto::rr::Record::from_rdata(
        Name::from_ascii("a.example.").unwrap(),
        300,
        hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A::new(192, 0, 2, 1)),
    ));
    for i in 0..8u8 {
        let key = tproxyd::dns::cache::CacheKey::new(
            "default",
            &[1, b'a' + i, 7, b'e', b'x', b'a', b'm', b'p', b'l', b'e', 0],
            RecordType::A,
            hickory_proto::rr::DNSClass::IN,
        );
        assert!(source.insert(key, &mut m.clone()));
    }
    let file = encode(&source, now, unix);
    let mut rng = Rng(0x6361_6368_6566_696c);
    let (mut ok, mut partial) = (0, 0);
    for _ in 0..20_000 {
        let mut input = file.clone();
        mutate(&mut rng, &mut input);
        let cache = DnsCache::with_stale_window(&config, 86_400);
        match decode_into(&cache, &input, now, unix) {
            Ok(_) => ok += 1,
            Err(_) => partial += 1,
        }
        assert!(cache.len() <= 64 && cache.bytes() <= 256 << 10);
        let again = DnsCache::with_stale_window(&config, 86_400);
        assert_eq!(
            decode_into(&again, &encode(&cache, now, unix), now, unix).unwrap(),
            cache.len()
        );
    }
    // Most mutations break a length or a record (rejected, with what came
    // before kept); enough still load to exercise the restore path.
    assert!(ok > 300 && partial > 1_000, "ok {ok}, rejected {partial}");
}
