//! Per-client query rate limits: a token bucket per client, as
//! [`super::clients`] tells them apart (an IPv4 address, an IPv6 device of
//! the LAN, or else an IPv6 /56, where one host can hold a whole prefix).
//!
//! The buckets live in a bounded LRU: a spoofer cycling through source
//! addresses cannot grow memory, only evict buckets (an evicted client
//! starts again with a full bucket, which is what a quiet client has
//! anyway).

use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use super::clients::ClientKey;
use crate::config::dns::RateLimitConfig;

/// Most clients tracked at once.
const MAX_CLIENTS: NonZeroUsize = NonZeroUsize::new(65_536).unwrap();

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

#[derive(Debug)]
pub struct RateLimiter {
    /// Tokens added per second; `None` when the limit is off.
    rate: Option<f64>,
    burst: f64,
    buckets: Mutex<LruCache<ClientKey, Bucket>>,
}

impl RateLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        RateLimiter {
            rate: (config.qps > 0).then_some(f64::from(config.qps)),
            burst: f64::from(config.burst.max(config.qps).max(1)),
            buckets: Mutex::new(LruCache::new(MAX_CLIENTS)),
        }
    }

    /// Whether the limit is on: when it is off, no client's key is needed.
    pub fn is_on(&self) -> bool {
        self.rate.is_some()
    }

    /// Takes a token for one query from `client`; false when over the limit.
    pub fn allow(&self, client: ClientKey) -> bool {
        // With the limit off the clock is not read: a clock read was a
        // per cent of a cache hit's CPU time here (`perf`, cpu-clock).
        self.rate.is_none() || self.allow_at(client, Instant::now())
    }

    fn allow_at(&self, client: ClientKey, now: Instant) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.get_or_insert_mut(client, || Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(self.burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::dns::RateLimitAction;
    use std::time::Duration;

    fn limiter(qps: u32, burst: u32) -> RateLimiter {
        RateLimiter::new(&RateLimitConfig {
            qps,
            burst,
            action: RateLimitAction::Drop,
        })
    }

    fn ip(s: &str) -> ClientKey {
        ClientKey::by_prefix(s.parse().unwrap())
    }

    fn device(last: u8) -> ClientKey {
        ClientKey::Device(crate::net::link_addr::LinkAddr::from_bytes(&[2, 0, 0, 0, 0, last]).unwrap())
    }

    #[test]
    fn a_burst_then_the_sustained_rate() {
        let l = limiter(10, 20);
        let t0 = Instant::now();
        let passed = (0..100).filter(|_| l.allow_at(ip("192.0.2.10"), t0)).count();
        assert_eq!(passed, 20, "the burst");
        // One second later: ten more tokens, no more.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..100).filter(|_| l.allow_at(ip("192.0.2.10"), t1)).count();
        assert_eq!(passed, 10);
        // Another client is not affected.
        assert!(l.allow_at(ip("192.0.2.11"), t1));
    }

    #[test]
    fn ipv6_clients_share_a_bucket_per_56() {
        let l = limiter(1, 1);
        let t0 = Instant::now();
        assert!(l.allow_at(ip("2001:db8:1:ff::1"), t0));
        assert!(!l.allow_at(ip("2001:db8:1:2::99"), t0), "same /56");
        assert!(l.allow_at(ip("2001:db8:1:100::1"), t0), "next /56");
        // IPv4-mapped addresses count as their IPv4 address.
        assert!(l.allow_at(ip("192.0.2.7"), t0));
        assert!(!l.allow_at(ip("::ffff:192.0.2.7"), t0));
    }

    /// The devices of one LAN share its /64: each has a bucket of its own,
    /// and the addresses that are not devices share theirs.
    #[test]
    fn ipv6_devices_have_a_bucket_each() {
        let l = limiter(1, 1);
        let t0 = Instant::now();
        assert!(l.allow_at(device(1), t0));
        assert!(!l.allow_at(device(1), t0), "its own bucket is empty");
        assert!(l.allow_at(device(2), t0), "another device");
        assert!(l.allow_at(ip("2001:db8:1:ff::3"), t0), "the /56 of the others");
        assert!(!l.allow_at(ip("2001:db8:1:ff::4"), t0));
        assert!(l.allow_at(device(3), t0));
    }

    #[test]
    fn zero_qps_means_unlimited() {
        let l = limiter(0, 0);
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| l.allow_at(ip("192.0.2.10"), t0)));
    }
}
