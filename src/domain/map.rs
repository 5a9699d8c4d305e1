//! The map from (client, answered IP) to the names that client resolved.
//!
//! A domain relay rule asks "did *this* client get *this* address from us
//! for a name I match?". Keying by client as well as by address is what
//! keeps one client's lookups from steering another client's flows to a
//! shared CDN address. Entries live for the answer's TTL plus a grace (a
//! client may open its flow a little after the TTL ran out), and the map is
//! bounded both in entries and in bytes: least recently answered out first.
//!
//! One client (an IPv4 address, an IPv6 /64) holds at most a quarter of
//! each bound, and past it loses its own oldest entries. The map is shared,
//! and a device asking for names of a zone it serves itself can have every
//! answer carry dozens of addresses (thousands over TCP): with one global
//! order it pushed every other device's entries out within seconds, so
//! their next flows to the names they had resolved missed their domain rule
//! and took another route.

use hickory_proto::rr::Name;
use lru::LruCache;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::answer::Resolution;

/// Most distinct names (chains) remembered for one (client, IP); more
/// names on one address (a shared CDN edge) replace the soonest to expire.
pub const MAX_CHAINS: usize = 4;

/// Bytes counted for an entry besides its names: key, entry, the node in
/// the map's order and the one in its client's. An estimate of the real
/// cost, checked by the benchmark.
const ENTRY_OVERHEAD: usize = 296;

/// One client may hold this fraction of `max_entries` and of `max_bytes`.
const CLIENT_SHARE: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

type Key = (IpAddr, IpAddr);

/// Who an entry counts against: the client's IPv4 address, or its IPv6
/// /64 (a device picks addresses in its /64 freely).
fn owner(client: IpAddr) -> IpAddr {
    match client {
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        v4 => v4,
    }
}

/// One client's entries, least recently answered first, and their bytes.
#[derive(Debug)]
struct Held {
    order: LruCache<Key, ()>,
    bytes: usize,
}

#[derive(Debug)]
struct Chain {
    names: Box<[Name]>,
    /// Hash of the queried name (`names[0]`): when many names answer the
    /// same address (a CDN edge), an insert tells them apart by this
    /// instead of comparing names label by label.
    head: u64,
    /// What `names` counts against `max_bytes`, computed once.
    bytes: usize,
    expires: Instant,
}

impl Chain {
    fn new(names: &[Name], head: u64, expires: Instant) -> Chain {
        Chain {
            names: names.into(),
            head,
            bytes: chain_bytes(names),
            expires,
        }
    }
}

fn chain_bytes(names: &[Name]) -> usize {
    std::mem::size_of::<Chain>()
        + names
            .iter()
            .map(|n| std::mem::size_of::<Name>() + n.len())
            .sum::<usize>()
}

/// A fixed hash of a (lowercase) name's labels. Fixed, not seeded: it only
/// narrows compares inside one entry and is never a table index an outsider
/// could aim at.
fn head_hash(name: Option<&Name>) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = foldhash::fast::FixedState::default().build_hasher();
    if let Some(name) = name {
        for label in name.iter() {
            h.write_u8(label.len() as u8);
            h.write(label);
        }
    }
    h.finish()
}

#[derive(Debug, Default)]
struct Entry {
    chains: Vec<Chain>,
}

impl Entry {
    fn bytes(&self) -> usize {
        ENTRY_OVERHEAD + self.chains.iter().map(|c| c.bytes).sum::<usize>()
    }

    /// `chain`'s names are lowercase (see [`Resolution`]), so a hash match
    /// is confirmed by a case-sensitive compare, the cheaper one.
    fn remember(&mut self, chain: &[Name], head: u64, expires: Instant) {
        let first = chain.first();
        if let Some(c) = self.chains.iter_mut().find(|c| {
            c.head == head
                && match (c.names.first(), first) {
                    (Some(a), Some(b)) => a.eq_case(b),
                    (a, b) => a.is_none() && b.is_none(),
                }
        }) {
            c.names = chain.into();
            c.bytes = chain_bytes(chain);
            c.expires = c.expires.max(expires);
            return;
        }
        let chain = Chain::new(chain, head, expires);
        if self.chains.len() < MAX_CHAINS {
            self.chains.push(chain);
        } else if let Some(soonest) = self.chains.iter_mut().min_by_key(|c| c.expires) {
            *soonest = chain;
        }
    }
}

#[derive(Debug)]
struct Inner {
    entries: LruCache<Key, Entry>,
    /// The same entries by owner, for the per-client share.
    owners: HashMap<IpAddr, Held>,
    bytes: usize,
}

impl Inner {
    /// Removes `key`'s entry (in both orders); returns it.
    fn remove(&mut self, key: &Key) -> Option<Entry> {
        let gone = self.entries.pop(key)?;
        let bytes = gone.bytes();
        self.bytes = self.bytes.saturating_sub(bytes);
        let who = owner(key.0);
        if let Some(held) = self.owners.get_mut(&who) {
            held.order.pop(key);
            held.bytes = held.bytes.saturating_sub(bytes);
            if held.order.is_empty() {
                self.owners.remove(&who);
            }
        }
        Some(gone)
    }

    /// The least recently answered entry of `who`, if it holds more than
    /// `entries` entries or `bytes` bytes.
    fn over_share(&self, who: &IpAddr, entries: usize, bytes: usize) -> Option<Key> {
        let held = self.owners.get(who)?;
        if held.order.len() > entries || held.bytes > bytes {
            held.order.peek_lru().map(|(k, ())| *k)
        } else {
            None
        }
    }
}

/// Thread-safe; one short lock per answer and per new flow.
#[derive(Debug)]
pub struct NameMap {
    inner: Mutex<Inner>,
    limits: MapLimits,
    evicted: AtomicU64,
}

/// An IPv4-mapped IPv6 address is the IPv4 address it carries, whichever
/// socket family saw it.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl NameMap {
    pub fn new(limits: MapLimits) -> NameMap {
        NameMap {
            inner: Mutex::new(Inner {
                entries: LruCache::unbounded(),
                owners: HashMap::new(),
                bytes: 0,
            }),
            limits,
            evicted: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `client` was told `res`; each address is remembered
    /// until its TTL plus `grace` from `now`. A client past its share loses
    /// its own oldest entries; past the map's bounds, the oldest of all go.
    pub fn insert(&self, client: IpAddr, res: &Resolution, grace: Duration, now: Instant) {
        if self.limits.max_entries == 0 {
            return;
        }
        let client = canonical(client);
        let who = owner(client);
        let share_entries = (self.limits.max_entries / CLIENT_SHARE).max(1);
        let share_bytes = self.limits.max_bytes / CLIENT_SHARE;
        let head = head_hash(res.chain.first());
        let mut inner = self.lock();
        let inner = &mut *inner;
        for &(ip, ttl) in &res.addrs {
            let expires = now + Duration::from_secs(u64::from(ttl)) + grace;
            let key = (client, canonical(ip));
            let counted = inner.entries.contains(&key);
            let entry = inner.entries.get_or_insert_mut(key, Entry::default);
            let before = if counted { entry.bytes() } else { 0 };
            entry.remember(&res.chain, head, expires);
            let after = entry.bytes();
            inner.bytes = inner.bytes + after - before;
            let held = inner.owners.entry(who).or_insert_with(|| Held {
                order: LruCache::unbounded(),
                bytes: 0,
            });
            held.order.put(key, ());
            held.bytes = held.bytes + after - before;
            while let Some(oldest) = inner.over_share(&who, share_entries, share_bytes) {
                inner.remove(&oldest);
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
        while inner.entries.len() > self.limits.max_entries || inner.bytes > self.limits.max_bytes {
            let Some((oldest, _)) = inner.entries.peek_lru().map(|(k, _)| (*k, ())) else {
                break;
            };
            inner.remove(&oldest);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The names `client` resolved to `ip` that have not expired at `now`:
    /// each chain's queried name first, then its aliases.
    pub fn lookup(&self, client: IpAddr, ip: IpAddr, now: Instant) -> Vec<Name> {
        let inner = self.lock();
        let Some(entry) = inner.entries.peek(&(canonical(client), canonical(ip))) else {
            return Vec::new();
        };
        let mut names: Vec<Name> = Vec::new();
        for chain in entry.chains.iter().filter(|c| c.expires > now) {
            for n in chain.names.iter() {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
    }

    /// Like [`NameMap::lookup`], and each chain found lives on until at
    /// least `now + extend`: the address is in use.
    pub fn lookup_touch(&self, client: IpAddr, ip: IpAddr, now: Instant, extend: Duration) -> Vec<Name> {
        let mut inner = self.lock();
        let Some(entry) = inner.entries.peek_mut(&(canonical(client), canonical(ip))) else {
            return Vec::new();
        };
        let mut names: Vec<Name> = Vec::new();
        for chain in entry.chains.iter_mut().filter(|c| c.expires > now) {
            chain.expires = chain.expires.max(now + extend);
            for n in chain.names.iter() {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
    }

    /// Drops what expired by `now`; returns how many entries went.
    pub fn sweep(&self, now: Instant) -> usize {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut dead = Vec::new();
        let mut shrunk = Vec::new();
        for (key, entry) in inner.entries.iter_mut() {
            let before = entry.bytes();
            entry.chains.retain(|c| c.expires > now);
            if entry.bytes() < before {
                shrunk.push((*key, before - entry.bytes()));
            }
            if entry.chains.is_empty() {
                dead.push(*key);
            }
        }
        for (key, freed) in shrunk {
            inner.bytes = inner.bytes.saturating_sub(freed);
            if let Some(held) = inner.owners.get_mut(&owner(key.0)) {
                held.bytes = held.bytes.saturating_sub(freed);
            }
        }
        // The expired chains' bytes are off already: `remove` takes off
        // what is left of a dead entry, its overhead.
        for key in &dead {
            inner.remove(key);
        }
        dead.len()
    }

    /// Forgets every entry (the last domain rule went away).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
        inner.owners.clear();
        inner.bytes = 0;
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes counted against `max_bytes`.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    /// Entries pushed out by the bounds before they expired.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn res(names: &[&str], addrs: &[(&str, u32)]) -> Resolution {
        Resolution {
            chain: names.iter().map(|n| name(n)).collect(),
            addrs: addrs.iter().map(|(a, t)| (ip(a), *t)).collect(),
        }
    }

    const BIG: MapLimits = MapLimits {
        max_entries: 1_000,
        max_bytes: 1 << 20,
    };

    #[test]
    fn keyed_by_client_and_address() {
        let map = NameMap::new(BIG);
        let now = Instant::now();
        let r = res(&["www.game.example.", "edge.cdn.example."], &[("198.51.100.7", 60)]);
        map.insert(ip("192.0.2.10"), &r, Duration::ZERO, now);
        assert_eq!(
            map.lookup(ip("192.0.2.10"), ip("198.51.100.7"), now),
            vec![name("www.game.example."), name("edge.cdn.example.")]
        );
        // Another client, same address: nothing known.
        assert!(map.lookup(ip("192.0.2.11"), ip("198.51.100.7"), now).is_empty());
        // The same client seen through an IPv4-mapped socket address.
        assert_eq!(map.lookup(ip("::ffff:192.0.2.10"), ip("198.51.100.7"), now).len(), 2);
    }

    #[test]
    fn expires_at_ttl_plus_grace() {
        let map = NameMap::new(BIG);
        let now = Instant::now();
        map.insert(
            ip("192.0.2.10"),
            &res(&["a.example."], &[("198.51.100.1", 30)]),
            Duration::from_secs(10),
            now,
        );
        let c = ip("192.0.2.10");
        let a = ip("198.51.100.1");
        assert_eq!(map.lookup(c, a, now + Duration::from_secs(39)).len(), 1);
        assert!(map.lookup(c, a, now + Duration::from_secs(40)).is_empty());
        assert_eq!(map.sweep(now + Duration::from_secs(39)), 0);
        assert_eq!(map.sweep(now + Duration::from_secs(40)), 1);
        assert!(map.is_empty());
        assert_eq!(map.bytes(), 0);
    }

    #[test]
    fn several_names_on_one_address_each_keep_their_expiry() {
        let map = NameMap::new(BIG);
        let now = Instant::now();
        let c = ip("192.0.2.10");
        let a = ip("198.51.100.1");
        map.insert(c, &res(&["a.example."], &[("198.51.100.1", 10)]), Duration::ZERO, now);
        map.insert(c, &res(&["b.example."], &[("198.51.100.1", 100)]), Duration::ZERO, now);
        assert_eq!(map.lookup(c, a, now).len(), 2);
        assert_eq!(
            map.lookup(c, a, now + Duration::from_secs(50)),
            vec![name("b.example.")]
        );
        // A refresh of a name extends it.
        map.insert(c, &res(&["a.example."], &[("198.51.100.1", 100)]), Duration::ZERO, now);
        assert_eq!(map.lookup(c, a, now + Duration::from_secs(50)).len(), 2);
        assert_eq!(map.len(), 1);
        // Past MAX_CHAINS names the soonest to expire is replaced.
        for (i, ttl) in [(1, 20), (2, 30), (3, 40), (4, 50)] {
            map.insert(
                c,
                &res(&[&format!("n{i}.example.")], &[("198.51.100.1", ttl)]),
                Duration::ZERO,
                now,
            );
        }
        let names = map.lookup(c, a, now);
        assert_eq!(names.len(), MAX_CHAINS);
        assert!(names.contains(&name("n4.example.")));
    }

    #[test]
    fn bounded_in_entries_and_bytes() {
        let map = NameMap::new(MapLimits {
            max_entries: 100,
            max_bytes: usize::MAX,
        });
        let now = Instant::now();
        // Ten clients, so that no one of them reaches its share first.
        let client = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0xC000_020A + i % 10));
        for i in 0..250u32 {
            let addr = std::net::Ipv4Addr::from(0xC633_6400 + i).to_string();
            map.insert(client(i), &res(&["x.example."], &[(&addr, 60)]), Duration::ZERO, now);
        }
        assert_eq!(map.len(), 100);
        assert_eq!(map.evicted(), 150);
        // The newest stayed.
        assert_eq!(map.lookup(ip("192.0.2.19"), ip("198.51.100.249"), now).len(), 1);
        assert!(map.lookup(ip("192.0.2.10"), ip("198.51.100.0"), now).is_empty());

        let one = {
            let m = NameMap::new(BIG);
            m.insert(
                ip("192.0.2.10"),
                &res(&["x.example."], &[("198.51.100.1", 60)]),
                Duration::ZERO,
                now,
            );
            m.bytes()
        };
        let map = NameMap::new(MapLimits {
            max_entries: usize::MAX,
            max_bytes: one * 10,
        });
        for i in 0..50u32 {
            let addr = std::net::Ipv4Addr::from(0xC633_6400 + i).to_string();
            map.insert(client(i), &res(&["x.example."], &[(&addr, 60)]), Duration::ZERO, now);
        }
        assert_eq!(map.len(), 10);
        assert!(map.bytes() <= one * 10);
    }

    /// A device answered many addresses at a time (names of a zone it
    /// serves itself) and another device that resolved one name.
    fn flood(map: &NameMap, attacker: &dyn Fn(u32) -> IpAddr, answers: u32, now: Instant) {
        for a in 0..answers {
            let addrs: Vec<String> = (0..50u32)
                .map(|i| {
                    std::net::Ipv6Addr::from(0x2001_0db8_00f0_0000_0000_0000_0000_0000u128 + u128::from(a * 50 + i))
                        .to_string()
                })
                .collect();
            let addrs: Vec<(&str, u32)> = addrs.iter().map(|s| (s.as_str(), 86_400)).collect();
            map.insert(
                attacker(a),
                &res(&[&format!("n{a}.flood.example.")], &addrs),
                Duration::ZERO,
                now,
            );
        }
    }

    #[test]
    fn one_client_answered_many_addresses_cannot_push_out_another() {
        let limits = MapLimits {
            max_entries: 1_000,
            max_bytes: 1 << 20,
        };
        let map = NameMap::new(limits);
        let now = Instant::now();
        let (victim, game) = (ip("192.0.2.10"), ip("203.0.113.80"));
        map.insert(
            victim,
            &res(&["eu.game.example."], &[("203.0.113.80", 300)]),
            Duration::ZERO,
            now,
        );
        // 5,000 addresses for one device: five times the whole map.
        flood(&map, &|_| ip("192.0.2.66"), 100, now);
        assert_eq!(
            map.lookup(victim, game, now),
            vec![name("eu.game.example.")],
            "the flood pushed the other client's answer out"
        );
        assert!(map.len() <= 1 + limits.max_entries / 4, "{} entries", map.len());
        // Its newest answers are what the flooding device keeps.
        let newest = ip("2001:db8:f0::1387");
        assert_eq!(map.lookup(ip("192.0.2.66"), newest, now).len(), 1);

        // The same from an IPv6 device using a new address of its /64 for
        // each query.
        let map = NameMap::new(limits);
        let victim6 = ip("2001:db8:1::10");
        map.insert(
            victim6,
            &res(&["eu.game.example."], &[("203.0.113.80", 300)]),
            Duration::ZERO,
            now,
        );
        flood(
            &map,
            &|a| {
                IpAddr::from(std::net::Ipv6Addr::from(
                    0x2001_0db8_0001_0066_0000_0000_0000_0000u128 + u128::from(a),
                ))
            },
            100,
            now,
        );
        assert_eq!(
            map.lookup(victim6, game, now).len(),
            1,
            "pushed out by a device rotating addresses in its /64"
        );
        assert!(map.len() <= 1 + limits.max_entries / 4, "{} entries", map.len());
    }

    #[test]
    fn one_client_with_long_chains_cannot_push_out_another_by_bytes() {
        let map = NameMap::new(MapLimits {
            max_entries: 1_000_000,
            max_bytes: 1 << 20,
        });
        let now = Instant::now();
        let (victim, game) = (ip("192.0.2.10"), ip("203.0.113.80"));
        map.insert(
            victim,
            &res(&["eu.game.example."], &[("203.0.113.80", 300)]),
            Duration::ZERO,
            now,
        );
        // Chains of the longest names, eight deep: about 2 kB a chain.
        let long = |a: u32, k: u32| format!("{}.{a}-{k}.flood.example.", vec!["x".repeat(63); 3].join("."));
        for a in 0..2_000u32 {
            let chain: Vec<String> = (0..8).map(|k| long(a, k)).collect();
            let chain: Vec<&str> = chain.iter().map(String::as_str).collect();
            let addr = std::net::Ipv4Addr::from(0xC633_6400 + a % 256).to_string();
            map.insert(ip("192.0.2.66"), &res(&chain, &[(&addr, 86_400)]), Duration::ZERO, now);
        }
        assert_eq!(map.lookup(victim, game, now).len(), 1, "pushed out by bytes");
        assert!(map.bytes() <= (1 << 20) / 4 + 4096, "{} bytes", map.bytes());
        // Everything swept: nothing left counted.
        map.sweep(now + Duration::from_secs(100_000));
        assert!(map.is_empty());
        assert_eq!(map.bytes(), 0);
    }

    #[test]
    fn a_lookup_for_a_flow_in_use_keeps_the_entry_alive() {
        let map = NameMap::new(BIG);
        let now = Instant::now();
        let (c, a) = (ip("192.0.2.10"), ip("198.51.100.1"));
        map.insert(c, &res(&["a.example."], &[("198.51.100.1", 10)]), Duration::ZERO, now);
        let later = now + Duration::from_secs(8);
        assert_eq!(map.lookup_touch(c, a, later, Duration::from_secs(30)).len(), 1);
        assert_eq!(map.lookup(c, a, now + Duration::from_secs(37)).len(), 1);
        assert!(map.lookup(c, a, now + Duration::from_secs(38)).is_empty());
        // An expired entry is not revived.
        assert!(
            map.lookup_touch(c, a, now + Duration::from_secs(40), Duration::from_secs(30))
                .is_empty()
        );
    }

    #[test]
    fn disabled_when_zero_entries() {
        let map = NameMap::new(MapLimits {
            max_entries: 0,
            max_bytes: usize::MAX,
        });
        map.insert(
            ip("192.0.2.10"),
            &res(&["x.example."], &[("198.51.100.1", 60)]),
            Duration::ZERO,
            Instant::now(),
        );
        assert!(map.is_empty());
    }
}
