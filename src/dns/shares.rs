//! Each client's share of an upstream group's pending queries.
//!
//! `max_pending` bounds the queries waiting on a group, so that a dead
//! group cannot grow the task count without bound. But one device alone,
//! within its rate limit, could keep that many waiting: 200 queries a
//! second for names that never resolve, each waiting up to `dns.timeout`
//! (3 s), hold 600 of the default 1,024 places, and two such devices left
//! every other client SERVFAIL on every cache miss. So a client (as
//! [`super::clients`] tells them apart) holds at most a quarter of
//! a group's places, but never fewer than 32 (a page load asks a few dozen
//! names at once: a small group is not split further); past that its own
//! misses get SERVFAIL at once while everyone else's are still forwarded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use super::clients::ClientKey;

/// A client may hold `max_pending / SHARE_DIVISOR` places...
pub const SHARE_DIVISOR: usize = 4;
/// ...but at least this many (or the whole group, when it is smaller).
pub const MIN_SHARE: usize = 32;

/// The most places one client may hold in a group of `max_pending`.
pub fn per_client(max_pending: usize) -> usize {
    (max_pending / SHARE_DIVISOR).max(MIN_SHARE).min(max_pending).max(1)
}

/// Keys are client addresses, which a spoofer can choose within a /56
/// (or a flood of IPv4 sources): a seeded hasher, but a fast one. SipHash
/// here, once to take a place and once to give it back, was about 600
/// instructions of every cache miss (callgrind); foldhash is what the
/// single-flight map and the relay's tables use for the same reason.
type Held = HashMap<(usize, ClientKey), usize, foldhash::quality::RandomState>;

/// Places held, by (group, client).
#[derive(Debug, Default)]
pub struct ClientShares {
    held: Arc<Mutex<Held>>,
}

/// One pending query's place; given back when the query is answered.
#[derive(Debug)]
pub struct Share {
    held: Arc<Mutex<Held>>,
    key: (usize, ClientKey),
}

impl ClientShares {
    /// A place for one more query from `client` to `group`, or `None` when
    /// it already holds `max`.
    pub fn take(&self, group: usize, client: ClientKey, max: usize) -> Option<Share> {
        let key = (group, client);
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = held.entry(key).or_insert(0);
        if *mine >= max {
            return None;
        }
        *mine += 1;
        Some(Share {
            held: self.held.clone(),
            key,
        })
    }
}

impl Share {
    /// The client this place was taken for: what the answer's cache entry
    /// is charged to, so the client's key is worked out once per miss
    /// (for an IPv6 client that is a lock of the neighbour reading) and
    /// the entry's owner is the client that held the place.
    pub fn client(&self) -> ClientKey {
        self.key.1
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> ClientKey {
        ClientKey::by_prefix(s.parse().unwrap())
    }

    #[test]
    fn a_client_gets_a_quarter_of_a_group_and_others_keep_theirs() {
        assert_eq!(per_client(1024), 256);
        assert_eq!(per_client(64), 32, "never fewer than 32");
        assert_eq!(per_client(10), 10, "a small group is not split");
        assert_eq!(per_client(0), 1);
        let shares = ClientShares::default();
        let mine: Vec<Share> = (0..3).filter_map(|_| shares.take(0, ip("192.0.2.66"), 3)).collect();
        assert_eq!(mine.len(), 3);
        assert!(shares.take(0, ip("192.0.2.66"), 3).is_none(), "over its share");
        assert!(shares.take(0, ip("192.0.2.10"), 3).is_some(), "another client");
        assert!(shares.take(1, ip("192.0.2.66"), 3).is_some(), "another group");
        // IPv6: one /56 is one client.
        let v6: Vec<Share> = (1..=3)
            .filter_map(|i| shares.take(0, ip(&format!("2001:db8:1::{i}")), 3))
            .collect();
        assert_eq!(v6.len(), 3);
        assert!(shares.take(0, ip("2001:db8:1:ff::1"), 3).is_none());
        drop(mine);
        assert!(shares.take(0, ip("192.0.2.66"), 3).is_some(), "places given back");
        assert!(shares.held.lock().unwrap().len() <= 2, "no entry left for idle clients");
    }
}
