//! Answers blocked by a CNAME target (see [`crate::dns::aliases`]): from
//! upstream and from the cache, on the plain path (kept encodings) and
//! the full one, after a rule change that keeps the cache, and not when
//! `dns.block_cname_targets` is off.

use super::*;

/// The test config with a block list naming `adnet.test` and below.
fn blocking(keys: &str) -> DnsEngine {
    blocking_names(keys, "*.adnet.test", "")
}

/// The test config with a block rule for `names`, `rule_keys` added.
fn blocking_names(keys: &str, names: &str, rule_keys: &str) -> DnsEngine {
    let text = CONFIG.replace("[dns]\n", &format!("[dns]\n{keys}\n"))
        + &format!(
            "[[dns.rules]]\ndomains = [\"{names}\"]\naction = \"block\"\nblock = \"null\"\nttl = \"42s\"\n{rule_keys}\n"
        );
    let config = crate::config::Config::parse(&text, Path::new("t.toml")).unwrap();
    DnsEngine::build(config.dns().unwrap(), 255, Arc::new(Stats::default())).unwrap()
}

fn cname(owner: &str, target: &str) -> Record {
    Record::from_rdata(name(owner), 300, RData::CNAME(CNAME(name(target))))
}

/// `metrics.shop.test` → (`links` - 1 first-party hops) → `TrAcKeR.AdNeT.TeSt`.
fn chain(links: usize) -> Vec<Record> {
    let mut owner = "metrics.shop.test.".to_string();
    let mut records = Vec::new();
    for i in 1..links {
        let next = format!("hop{i}.shop.test.");
        records.push(cname(&owner, &next));
        owner = next;
    }
    records.push(cname(&owner, "TrAcKeR.AdNeT.TeSt."));
    records.push(a("TrAcKeR.AdNeT.TeSt.", 300, [203, 0, 113, 99]));
    records
}

/// What a client reads: RCODE and the answer section.
fn read(reply: &[u8]) -> (ResponseCode, Vec<Record>) {
    let m = Message::from_vec(reply).unwrap();
    (m.metadata.response_code, m.answers)
}

fn is_null_block(reply: &[u8]) -> bool {
    let (rcode, answers) = read(reply);
    rcode == ResponseCode::NoError
        && answers.len() == 1
        && answers[0].name == name("metrics.shop.test.")
        && answers[0].ttl == 42
        && matches!(answers[0].data, RData::A(A(ip)) if ip == Ipv4Addr::UNSPECIFIED)
}

#[test]
fn a_chain_through_a_blocked_name_gets_the_rules_block_answer_every_way_of_asking() {
    for links in [1, 2, scrub::MAX_CHAIN] {
        let engine = blocking("");
        learn(
            &engine,
            "metrics.shop.test.",
            RecordType::A,
            ResponseCode::NoError,
            chain(links),
            None,
        );
        let mut id = 0u16;
        for how in every_way_of_asking() {
            for _ in 0..2 {
                id = id.wrapping_add(1);
                let q = query(id, "metrics.shop.test.", RecordType::A, how);
                let reply = answer(&engine, &q, how.transport);
                assert!(is_null_block(&reply), "{links} links, {how:?}: {:?}", read(&reply));
            }
        }
        // Once from upstream (`learn`), then every hit.
        let hits = 2 * every_way_of_asking().len() as u64;
        assert_eq!(engine.stats.dns_blocked_cname.get(), 1 + hits);
        assert_eq!(engine.stats.dns_cache_hits.get(), 0);
    }
}

/// The reload case: an answer cached, and served from its kept encoding,
/// under rules without the block (but blocking other names, so its chain
/// was checked and found clear) is blocked by the next engine's rules
/// however it is asked, from the same cache.
#[test]
fn a_rule_change_that_keeps_the_cache_blocks_chains_cached_before_it() {
    let before = blocking_names("", "*.other.test", "");
    learn(
        &before,
        "metrics.shop.test.",
        RecordType::A,
        ResponseCode::NoError,
        chain(2),
        None,
    );
    let mut id = 0u16;
    for how in every_way_of_asking() {
        id = id.wrapping_add(1);
        let reply = answer(
            &before,
            &query(id, "metrics.shop.test.", RecordType::A, how),
            how.transport,
        );
        assert_eq!(read(&reply).1.len(), 3);
        // Asked twice the same way: the second from the kept encoding.
        let _ = answer(
            &before,
            &query(id, "metrics.shop.test.", RecordType::A, how),
            how.transport,
        );
    }
    let mut after = blocking("");
    assert!(after.adopt_cache(&before));
    for how in every_way_of_asking() {
        id = id.wrapping_add(1);
        let reply = answer(
            &after,
            &query(id, "metrics.shop.test.", RecordType::A, how),
            how.transport,
        );
        assert!(is_null_block(&reply), "{how:?}: {:?}", read(&reply));
    }
    // And with the switch off, the same cache serves the chain again.
    let mut off = blocking("block_cname_targets = false");
    assert!(off.adopt_cache(&after));
    for how in every_way_of_asking() {
        id = id.wrapping_add(1);
        let reply = answer(
            &off,
            &query(id, "metrics.shop.test.", RecordType::A, how),
            how.transport,
        );
        assert_eq!(read(&reply).1.len(), 3, "{how:?}");
    }
    assert_eq!(off.stats.dns_blocked_cname.get(), 0);
}

/// Only the targets are looked at: a first-party alias of a first-party
/// name, and an answer without alias, are served as before.
#[test]
fn answers_without_a_blocked_target_are_served_unchanged() {
    let engine = blocking("");
    learn(
        &engine,
        "www.shop.test.",
        RecordType::A,
        ResponseCode::NoError,
        vec![
            cname("www.shop.test.", "cdn.shop.test."),
            a("cdn.shop.test.", 300, [203, 0, 113, 80]),
        ],
        None,
    );
    learn(
        &engine,
        "plain.shop.test.",
        RecordType::A,
        ResponseCode::NoError,
        vec![a("plain.shop.test.", 300, [203, 0, 113, 81])],
        None,
    );
    for how in every_way_of_asking() {
        let reply = answer(&engine, &query(7, "www.shop.test.", RecordType::A, how), how.transport);
        assert_eq!(read(&reply).1.len(), 2);
        let reply = answer(
            &engine,
            &query(8, "plain.shop.test.", RecordType::A, how),
            how.transport,
        );
        assert_eq!(read(&reply).1.len(), 1);
    }
    assert_eq!(engine.stats.dns_blocked_cname.get(), 0);
}

/// A block for some clients only: a chain found clear for one client is
/// still checked for the next.
#[test]
fn a_per_client_block_applies_to_its_clients_whoever_asked_first() {
    let engine = blocking_names("", "*.adnet.test", "clients = [\"192.0.2.10/32\"]");
    learn(
        &engine,
        "metrics.shop.test.",
        RecordType::A,
        ResponseCode::NoError,
        chain(2),
        None,
    );
    let other = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11));
    for how in every_way_of_asking() {
        let q = query(9, "metrics.shop.test.", RecordType::A, how);
        let Outcome::Reply(reply) = engine.answer_now(&q, other, how.transport) else {
            panic!("no answer")
        };
        assert_eq!(read(&reply).1.len(), 3, "{how:?}");
        let reply = answer(&engine, &q, how.transport);
        assert!(is_null_block(&reply), "{how:?}: {:?}", read(&reply));
    }
}
