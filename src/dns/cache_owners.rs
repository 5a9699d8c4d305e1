//! Who put each answer into the cache, so that a full cache makes room
//! from the entries of a client that holds more than its share.
//!
//! The cache is shared by every device of the LAN and evicts the least
//! recently used answer. A device asking for many distinct names (a zone
//! it serves itself answers anything, within its rate limit's burst)
//! pushed every other device's answers out: in the lab, 600 names from one
//! device through a cache of 200 evicted all 20 of another device's
//! answers, cached a moment before, and its next page load went to the
//! upstream again (and lost serve-stale's copy for an upstream outage).
//! Each entry is now charged to the client whose miss stored it (as
//! [`super::clients`] tells them apart); once the cache is
//! full, a client holding more than a quarter of its entries or bytes
//! makes room from its own oldest entries instead. A client alone on the
//! LAN still fills the whole cache. Several devices together, or one
//! forging many source addresses, stay within every share: against them
//! the cache's segments stand ([`super::cache_lru`]).
//!
//! An entry is named here by its slot in the cache ([`SlotId`]) and its
//! serial, not by a copy of its key: the copy cost every miss an
//! allocation and held each key twice.

use super::cache_lru::SlotId;
use super::clients::ClientKey;
use std::collections::{HashMap, VecDeque};

/// A client may hold `capacity / SHARE_DIVISOR` entries and
/// `max_bytes / SHARE_DIVISOR` bytes before it is made to evict its own.
pub const SHARE_DIVISOR: usize = 4;

/// Keys in a client's order beyond twice what it holds (plus this) are
/// swept out, so keys of entries evicted by other means do not pile up.
const SLACK: usize = 64;

/// What one client holds.
#[derive(Debug, Default)]
struct Held {
    entries: usize,
    bytes: usize,
    /// Slots and serials of the entries it stored, oldest first; some
    /// may name entries already gone or stored again since (a slot's
    /// entry with another serial).
    order: VecDeque<(SlotId, u64)>,
}

/// The entries and bytes each client holds in the cache.
#[derive(Debug, Default)]
pub struct Owners {
    /// Keyed by client addresses, which a spoofer can choose: a seeded
    /// hasher, as the cache's own map has.
    held: HashMap<ClientKey, Held, foldhash::quality::RandomState>,
    last_serial: u64,
}

impl Owners {
    /// A serial for the next entry stored (never 0: 0 is an entry with no
    /// owner).
    pub fn next_serial(&mut self) -> u64 {
        self.last_serial += 1;
        self.last_serial
    }

    /// Charges `client` for the entry `serial` of `bytes` stored in
    /// `slot`. `is_live(slot, serial)` says whether that entry is still
    /// the one stored there (for sweeping gone ones out of the client's
    /// order).
    pub fn charge(
        &mut self,
        client: ClientKey,
        slot: SlotId,
        serial: u64,
        bytes: usize,
        is_live: impl Fn(SlotId, u64) -> bool,
    ) {
        let held = self.held.entry(client).or_default();
        held.entries += 1;
        held.bytes += bytes;
        held.order.push_back((slot, serial));
        if held.order.len() > 2 * held.entries + SLACK {
            held.order.retain(|&(k, s)| is_live(k, s));
        }
    }

    /// An entry of `bytes` that `client` was charged for has left.
    pub fn uncharge(&mut self, client: ClientKey, bytes: usize) {
        if let Some(held) = self.held.get_mut(&client) {
            held.entries = held.entries.saturating_sub(1);
            held.bytes = held.bytes.saturating_sub(bytes);
            if held.entries == 0 {
                self.held.remove(&client);
            }
        }
    }

    /// Whether `client` holds more than `max_entries` entries or
    /// `max_bytes` bytes.
    pub fn over_share(&self, client: ClientKey, max_entries: usize, max_bytes: usize) -> bool {
        self.held
            .get(&client)
            .is_some_and(|h| h.entries > max_entries || h.bytes > max_bytes)
    }

    /// The slot of the oldest entry `client` stored that is still live
    /// (`is_live`), other than `keep`; taken out of its order. `None`
    /// when there is none.
    pub fn take_oldest(
        &mut self,
        client: ClientKey,
        keep: u64,
        is_live: impl Fn(SlotId, u64) -> bool,
    ) -> Option<SlotId> {
        let held = self.held.get_mut(&client)?;
        while let Some((slot, serial)) = held.order.pop_front() {
            if serial == keep {
                held.order.push_front((slot, serial));
                return None;
            }
            if is_live(slot, serial) {
                return Some(slot);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ip(s: &str) -> ClientKey {
        ClientKey::by_prefix(s.parse().unwrap())
    }

    #[test]
    fn the_oldest_live_entry_of_the_client_is_taken_and_gone_ones_skipped() {
        let mut o = Owners::default();
        let mut live: HashMap<SlotId, u64> = HashMap::new();
        let c = ip("192.0.2.66");
        for slot in [0, 1, 2] {
            let s = o.next_serial();
            live.insert(slot, s);
            o.charge(c, slot, s, 100, |_, _| true);
        }
        assert!(o.over_share(c, 2, 1_000));
        assert!(!o.over_share(c, 3, 1_000));
        assert!(o.over_share(c, 3, 299));
        // Slot 0's entry was evicted by the LRU meanwhile.
        live.remove(&0);
        o.uncharge(c, 100);
        let is_live = |k: SlotId, s: u64| live.get(&k) == Some(&s);
        assert_eq!(o.take_oldest(c, 0, is_live), Some(1));
        // The newest entry is never taken for its own room.
        let newest = live[&2];
        assert_eq!(o.take_oldest(c, newest, is_live), None);
        assert_eq!(o.take_oldest(ip("192.0.2.10"), 0, is_live), None);
    }

    #[test]
    fn a_client_that_holds_nothing_is_forgotten_and_its_order_stays_bounded() {
        let mut o = Owners::default();
        let c = ip("2001:db8:1::");
        for i in 0..10_000u32 {
            let s = o.next_serial();
            // Only the newest entry lives: the others were evicted.
            o.charge(c, i % 3, s, 10, |_, serial| serial == s);
            if i > 0 {
                o.uncharge(c, 10);
            }
            // Charged before the one it replaces is uncharged: two held.
            assert!(o.held[&c].order.len() <= 2 * 2 + SLACK);
        }
        o.uncharge(c, 10);
        assert!(o.held.is_empty());
    }
}
