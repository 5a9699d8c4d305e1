//! Warnings that an attacker cannot turn into a log flood.
//!
//! Anything logged per packet from the network (a spoofed answer, an ICMP
//! error) would let whoever sends those packets fill the disk and drown the
//! lines that matter. A [`RateLimit`] lets one line through per interval and
//! says how many were held back since the last one; the counters in
//! `Stats` keep the exact numbers.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One line per `interval` at most, for one kind of event.
#[derive(Debug)]
pub struct RateLimit {
    interval_ms: u64,
    /// Milliseconds since [`epoch`] of the last line let through, plus one
    /// (0 = never).
    last: AtomicU64,
    suppressed: AtomicU64,
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

impl RateLimit {
    pub const fn new(interval: Duration) -> Self {
        RateLimit {
            interval_ms: interval.as_millis() as u64,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when a line may be logged now, `n` being how many were
    /// held back since the previous one; `None` to stay quiet.
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX) + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now.saturating_sub(last) < self.interval_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // One thread wins the slot; the others count as held back.
        if self
            .last
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_interval_and_the_rest_are_counted() {
        let limit = RateLimit::new(Duration::from_secs(3600));
        assert_eq!(limit.allow(), Some(0));
        for _ in 0..1000 {
            assert_eq!(limit.allow(), None);
        }
        let quick = RateLimit::new(Duration::ZERO);
        assert_eq!(quick.allow(), Some(0));
        assert_eq!(quick.allow(), Some(0));
        // The held-back count is handed to the next line let through.
        let far = RateLimit {
            interval_ms: 1,
            last: AtomicU64::new(0),
            suppressed: AtomicU64::new(7),
        };
        assert_eq!(far.allow(), Some(7));
    }
}
