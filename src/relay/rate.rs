//! How fast one client may open flows: a token bucket.
//!
//! It holds one second's worth of tokens, so a client may open a second's
//! worth at once (a game joining a lobby, a browser opening QUIC
//! connections) and then at the configured rate. Kept in thousandths of a
//! token so that rates below one per millisecond refill exactly.

/// A token bucket in thousandths of a token.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    milli: u64,
    at_ms: u64,
}

impl Bucket {
    pub fn full(rate: u32, now_ms: u64) -> Bucket {
        Bucket {
            milli: u64::from(rate) * 1_000,
            at_ms: now_ms,
        }
    }

    /// Takes a token if there is one; the bucket holds a second's worth.
    pub fn take(&mut self, rate: u32, now_ms: u64) -> bool {
        if rate == 0 {
            return true;
        }
        let elapsed = now_ms.saturating_sub(self.at_ms);
        self.at_ms = now_ms;
        let cap = u64::from(rate) * 1_000;
        self.milli = self
            .milli
            .saturating_add(elapsed.saturating_mul(u64::from(rate)))
            .min(cap);
        if self.milli >= 1_000 {
            self.milli -= 1_000;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_bucket_holds_a_second_and_refills() {
        let mut b = Bucket::full(10, 0);
        assert_eq!((0..20).filter(|_| b.take(10, 0)).count(), 10);
        assert!(!b.take(10, 50));
        assert!(b.take(10, 100)); // 100 ms = one token at 10/s
        assert!(Bucket::full(0, 0).take(0, 0), "0 means no limit");
    }
}
