//! Per-client query rate limits: a token bucket per address (IPv4) or per
//! /56 (IPv6, where one host can hold a whole prefix).
//!
//! The buckets live in a bounded LRU: a spoofer cycling through source
//! addresses cannot grow memory, only evict buckets (an evicted client
//! starts again with a full bucket, which is what a quiet client has
//! anyway).

use lru::LruCache;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroUsize;
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

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
    buckets: Mutex<LruCache<IpAddr, Bucket>>,
}

/// The address a client's bucket is keyed by.
pub fn client_bucket(client: IpAddr) -> IpAddr {
    match client.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 72) - 1); // /56
            IpAddr::V6(Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

impl RateLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        RateLimiter {
            rate: (config.qps > 0).then_some(f64::from(config.qps)),
            burst: f64::from(config.burst.max(config.qps).max(1)),
            buckets: Mutex::new(LruCache::new(MAX_CLIENTS)),
        }
    }

    /// Takes a token for one query from `client`; false when over the limit.
    pub fn allow(&self, client: IpAddr) -> bool {
        // With the limit off the clock is not read: a clock read was a
        // per cent of a cache hit's CPU time here (`perf`, cpu-clock).
        self.rate.is_none() || self.allow_at(client, Instant::now())
    }

    fn allow_at(&self, client: IpAddr, now: Instant) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        let bucket = buckets.get_or_insert_mut(client_bucket(client), || Bucket {
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
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

    #[test]
    fn zero_qps_means_unlimited() {
        let l = limiter(0, 0);
        let t0 = Instant::now();
        assert!((0..10_000).all(|_| l.allow_at(ip("192.0.2.10"), t0)));
    }
}
