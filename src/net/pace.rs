//! A few at most in each window of time, all together: the pace at which
//! the gateway does something per address for addresses a forger can
//! choose (answers let through to unresolved devices,
//! [`super::known_devices`]; echoes that make the kernel ask for an
//! address, [`super::solicit`]), so that a flood of addresses buys no
//! more of it than a few a window.

use std::time::{Duration, Instant};

/// The current window's start and how many it has let go.
#[derive(Debug, Default)]
pub struct Pace {
    window: Option<Instant>,
    used: u32,
}

impl Pace {
    /// Whether one more may go at `now`: fewer than `most` went in the
    /// window of `window` that holds `now` (a new one starts when the last
    /// is over). Counted if so.
    pub fn take(&mut self, now: Instant, window: Duration, most: u32) -> bool {
        if self.window.is_none_or(|w| now.saturating_duration_since(w) >= window) {
            self.window = Some(now);
            self.used = 0;
        }
        if self.used >= most {
            return false;
        }
        self.used += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_most_a_window_and_a_fresh_count_in_the_next() {
        let (mut pace, now, window) = (Pace::default(), Instant::now(), Duration::from_millis(100));
        assert_eq!((0..5).filter(|_| pace.take(now, window, 2)).count(), 2);
        assert!(!pace.take(now + window / 2, window, 2));
        assert!(pace.take(now + window, window, 2));
    }
}
