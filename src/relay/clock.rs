//! A coarse monotonic clock in milliseconds.
//!
//! Sessions record their last activity from two tasks at once (client side
//! and upstream side); a millisecond count fits an `AtomicU64`, which an
//! `Instant` does not.

use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock { start: Instant::now() }
    }

    /// Milliseconds since the clock was made.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// [`Clock::now_ms`] at `at`, a reading the caller took anyway.
    pub fn ms_at(&self, at: std::time::Instant) -> u64 {
        let since = Instant::from_std(at).saturating_duration_since(self.start);
        u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
    }

    /// The instant `ms` milliseconds after the clock was made.
    pub fn instant_at(&self, ms: u64) -> Instant {
        self.start + Duration::from_millis(ms)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}
