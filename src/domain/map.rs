//! The map from (client, answered IP) to the names that client resolved.
//!
//! A domain relay rule asks "did *this* client get *this* address from us
//! for a name I match?". Keying by client as well as by address is what
//! keeps one client's lookups from steering another client's flows to a
//! shared CDN address. Entries live for the answer's TTL plus a grace (a
//! client may open its flow a little after the TTL ran out), and the map is
//! bounded both in entries and in bytes: least recently answered out first.

use hickory_proto::rr::Name;
use lru::LruCache;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::answer::Resolution;

/// Most distinct names (chains) remembered for one (client, IP); more
/// names on one address (a shared CDN edge) replace the soonest to expire.
pub const MAX_CHAINS: usize = 4;

/// Bytes counted for an entry besides its names: key, entry, LRU node.
/// An estimate of the real cost, checked by the benchmark.
const ENTRY_OVERHEAD: usize = 160;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapLimits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

type Key = (IpAddr, IpAddr);

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
    bytes: usize,
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
    /// until its TTL plus `grace` from `now`.
    pub fn insert(&self, client: IpAddr, res: &Resolution, grace: Duration, now: Instant) {
        if self.limits.max_entries == 0 {
            return;
        }
        let client = canonical(client);
        let head = head_hash(res.chain.first());
        let mut inner = self.lock();
        for &(ip, ttl) in &res.addrs {
            let expires = now + Duration::from_secs(u64::from(ttl)) + grace;
            let key = (client, canonical(ip));
            let inner = &mut *inner;
            let counted = inner.entries.contains(&key);
            let entry = inner.entries.get_or_insert_mut(key, Entry::default);
            let before = if counted { entry.bytes() } else { 0 };
            entry.remember(&res.chain, head, expires);
            inner.bytes = inner.bytes + entry.bytes() - before;
        }
        while inner.entries.len() > self.limits.max_entries || inner.bytes > self.limits.max_bytes {
            let Some((_, gone)) = inner.entries.pop_lru() else {
                break;
            };
            inner.bytes = inner.bytes.saturating_sub(gone.bytes());
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
        let mut dead = Vec::new();
        let mut freed = 0;
        for (key, entry) in inner.entries.iter_mut() {
            let before = entry.bytes();
            entry.chains.retain(|c| c.expires > now);
            if entry.chains.is_empty() {
                dead.push(*key);
                freed += before;
            } else {
                freed += before - entry.bytes();
            }
        }
        for key in &dead {
            inner.entries.pop(key);
        }
        inner.bytes = inner.bytes.saturating_sub(freed);
        dead.len()
    }

    /// Forgets every entry (the last domain rule went away).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.entries.clear();
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
        for i in 0..250u32 {
            let addr = std::net::Ipv4Addr::from(0xC633_6400 + i).to_string();
            map.insert(
                ip("192.0.2.10"),
                &res(&["x.example."], &[(&addr, 60)]),
                Duration::ZERO,
                now,
            );
        }
        assert_eq!(map.len(), 100);
        assert_eq!(map.evicted(), 150);
        // The newest stayed.
        assert_eq!(map.lookup(ip("192.0.2.10"), ip("198.51.100.249"), now).len(), 1);
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
            map.insert(
                ip("192.0.2.10"),
                &res(&["x.example."], &[(&addr, 60)]),
                Duration::ZERO,
                now,
            );
        }
        assert_eq!(map.len(), 10);
        assert!(map.bytes() <= one * 10);
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
