//! The answer cache: (upstream group, name, type, class) → upstream answer.
//!
//! TTLs are honoured and counted down: an answer cached 40 s ago with TTL
//! 300 is served with TTL 260. Negative answers (NXDOMAIN, or NOERROR with
//! no data) are cached for the SOA's negative TTL, per RFC 2308, and not at
//! all without an SOA. `min_ttl`/`max_ttl` clamp positive lifetimes;
//! `negative_max_ttl` caps negative ones.

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::ttl_secs;
use crate::config::dns::CacheConfig;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub group: usize,
    pub name: String,
    pub qtype: RecordType,
    pub qclass: DNSClass,
}

/// One cached answer.
#[derive(Debug)]
pub struct Entry {
    pub rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    stored: Instant,
    /// Seconds the entry is valid for, from `stored`.
    lifetime: u32,
}

impl Entry {
    /// Copies the records into `msg` with TTLs reduced by `age` seconds.
    pub fn fill(&self, msg: &mut Message, age: u32) {
        let aged = |r: &Record| {
            let mut r = r.clone();
            r.ttl = r.ttl.saturating_sub(age);
            r
        };
        msg.metadata.response_code = self.rcode;
        msg.answers = self.answers.iter().map(aged).collect();
        msg.authorities = self.authorities.iter().map(aged).collect();
        msg.additionals = self.additionals.iter().map(aged).collect();
    }
}

#[derive(Debug)]
pub struct DnsCache {
    entries: Option<Mutex<LruCache<CacheKey, Arc<Entry>>>>,
    min_ttl: u32,
    max_ttl: u32,
    negative_max_ttl: u32,
}

impl DnsCache {
    pub fn new(config: &CacheConfig) -> Self {
        DnsCache {
            entries: NonZeroUsize::new(config.capacity).map(|c| Mutex::new(LruCache::new(c))),
            min_ttl: ttl_secs(config.min_ttl),
            max_ttl: ttl_secs(config.max_ttl).max(1),
            negative_max_ttl: ttl_secs(config.negative_max_ttl),
        }
    }

    /// A live entry and its age in seconds; expired entries are removed.
    pub fn get(&self, key: &CacheKey) -> Option<(Arc<Entry>, u32)> {
        self.get_at(key, Instant::now())
    }

    fn get_at(&self, key: &CacheKey, now: Instant) -> Option<(Arc<Entry>, u32)> {
        let mut entries = self.lock()?;
        let entry = entries.get(key)?.clone();
        let age = u32::try_from(now.saturating_duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        if age >= entry.lifetime {
            entries.pop(key);
            return None;
        }
        Some((entry, age))
    }

    /// Stores `response` if it is cacheable; returns whether it was.
    pub fn insert(&self, key: CacheKey, response: &Message) -> bool {
        self.insert_at(key, response, Instant::now())
    }

    fn insert_at(&self, key: CacheKey, response: &Message, now: Instant) -> bool {
        let Some(mut entries) = self.lock() else {
            return false;
        };
        if response.metadata.truncation {
            return false;
        }
        let rcode = response.metadata.response_code;
        let positive = rcode == ResponseCode::NoError && !response.answers.is_empty();
        let negative =
            rcode == ResponseCode::NXDomain || (rcode == ResponseCode::NoError && response.answers.is_empty());
        let clamp = |t: u32| t.clamp(self.min_ttl, self.max_ttl.max(self.min_ttl));
        let lifetime = if positive {
            response.answers.iter().map(|r| clamp(r.ttl)).min()
        } else if negative {
            // RFC 2308 section 5: the SOA's TTL, bounded by its MINIMUM field.
            response.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum).min(self.negative_max_ttl)),
                _ => None,
            })
        } else {
            None
        };
        let Some(lifetime) = lifetime.filter(|&l| l > 0) else {
            return false;
        };
        // Every record lives exactly as long as the entry or longer, so none
        // is served with TTL 0 while the entry is still valid.
        let adjust = |records: &[Record]| -> Vec<Record> {
            records
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.ttl = if positive { clamp(r.ttl).max(lifetime) } else { lifetime };
                    r
                })
                .collect()
        };
        let entry = Entry {
            rcode,
            answers: adjust(&response.answers),
            authorities: adjust(&response.authorities),
            additionals: adjust(&response.additionals),
            stored: now,
            lifetime,
        };
        entries.put(key, Arc::new(entry));
        true
    }

    pub fn len(&self) -> usize {
        self.lock().map_or(0, |e| e.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> Option<MutexGuard<'_, LruCache<CacheKey, Arc<Entry>>>> {
        self.entries
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::{A, SOA};
    use std::str::FromStr;
    use std::time::Duration;

    fn cache(min: u64, max: u64, neg: u64) -> DnsCache {
        DnsCache::new(&CacheConfig {
            capacity: 10,
            min_ttl: Duration::from_secs(min),
            max_ttl: Duration::from_secs(max),
            negative_max_ttl: Duration::from_secs(neg),
        })
    }

    fn key(name: &str) -> CacheKey {
        CacheKey {
            group: 0,
            name: name.into(),
            qtype: RecordType::A,
            qclass: DNSClass::IN,
        }
    }

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn answer(ttls: &[u32]) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        for (i, &t) in ttls.iter().enumerate() {
            m.add_answer(Record::from_rdata(
                name("a.example."),
                t,
                RData::A(A::new(192, 0, 2, i as u8)),
            ));
        }
        m
    }

    fn negative(rcode: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        let soa = SOA::new(
            name("example."),
            name("hostmaster.example."),
            1,
            3600,
            600,
            86400,
            minimum,
        );
        m.add_authority(Record::from_rdata(name("example."), soa_ttl, RData::SOA(soa)));
        m
    }

    fn served_ttls(c: &DnsCache, k: &CacheKey, at: Instant) -> Option<Vec<u32>> {
        let (e, age) = c.get_at(k, at)?;
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        e.fill(&mut m, age);
        Some(m.answers.iter().chain(&m.authorities).map(|r| r.ttl).collect())
    }

    #[test]
    fn ttls_count_down_and_expire_with_the_shortest() {
        let c = cache(0, 86_400, 3_600);
        let t0 = Instant::now();
        assert!(c.insert_at(key("a"), &answer(&[300, 100]), t0));
        assert_eq!(served_ttls(&c, &key("a"), t0), Some(vec![300, 100]));
        assert_eq!(
            served_ttls(&c, &key("a"), t0 + Duration::from_secs(40)),
            Some(vec![260, 60])
        );
        assert_eq!(served_ttls(&c, &key("a"), t0 + Duration::from_secs(100)), None);
        assert!(c.is_empty(), "expired entries are removed");
    }

    #[test]
    fn min_and_max_ttl_clamp() {
        let c = cache(60, 120, 3_600);
        let t0 = Instant::now();
        c.insert_at(key("a"), &answer(&[5]), t0);
        assert_eq!(served_ttls(&c, &key("a"), t0), Some(vec![60]));
        c.insert_at(key("b"), &answer(&[9999]), t0);
        assert_eq!(served_ttls(&c, &key("b"), t0 + Duration::from_secs(119)), Some(vec![1]));
        assert_eq!(served_ttls(&c, &key("b"), t0 + Duration::from_secs(120)), None);
    }

    #[test]
    fn negative_answers_use_the_soa_per_rfc_2308() {
        let c = cache(0, 86_400, 3_600);
        let t0 = Instant::now();
        assert!(c.insert_at(key("nx"), &negative(ResponseCode::NXDomain, 900, 30), t0));
        let (e, _) = c.get_at(&key("nx"), t0).unwrap();
        assert_eq!(e.rcode, ResponseCode::NXDomain);
        assert_eq!(
            served_ttls(&c, &key("nx"), t0 + Duration::from_secs(10)),
            Some(vec![20])
        );
        assert_eq!(served_ttls(&c, &key("nx"), t0 + Duration::from_secs(30)), None);
        // NODATA is cached too; the cap applies.
        let capped = cache(0, 86_400, 10);
        assert!(capped.insert_at(key("nd"), &negative(ResponseCode::NoError, 900, 600), t0));
        assert_eq!(served_ttls(&capped, &key("nd"), t0), Some(vec![10]));
        // Without an SOA: not cached.
        let mut bare = Message::new(1, MessageType::Response, OpCode::Query);
        bare.metadata.response_code = ResponseCode::NXDomain;
        assert!(!c.insert_at(key("bare"), &bare, t0));
    }

    #[test]
    fn errors_truncated_and_zero_ttl_are_not_cached() {
        let c = cache(0, 86_400, 3_600);
        let mut fail = answer(&[300]);
        fail.metadata.response_code = ResponseCode::ServFail;
        assert!(!c.insert(key("f"), &fail));
        let mut tc = answer(&[300]);
        tc.metadata.truncation = true;
        assert!(!c.insert(key("t"), &tc));
        assert!(!c.insert(key("z"), &answer(&[0])));
        let off = DnsCache::new(&CacheConfig {
            capacity: 0,
            ..CacheConfig::default()
        });
        assert!(!off.insert(key("a"), &answer(&[300])));
    }
}
