//! The session table's clients in load order, brought up to date only
//! when someone reads it.
//!
//! A full table picks whose flow to end from this order (the heaviest
//! client, and a run of the lightest from a random point: see
//! `table::Inner::most_to_spare`), and it is ordered by each client's flow
//! count. Kept eagerly, every new flow paid a B-tree remove and insert
//! for its client's new count (about 600 instructions of the table's
//! 1,200 for a new flow, callgrind, "New flows, round 14" in
//! docs/BENCHMARKS.md), although the order is read only when a flow must
//! be evicted, when limits shrink, and by the admin page. So a count
//! change only notes the client and the count the order still has for
//! it; [`LoadOrder::settled`] writes the noted clients' new places before
//! any read. Every read therefore sees exactly the order eager upkeep
//! would have kept: what is read, and so whom eviction picks, is
//! unchanged; only when the B-tree work is done moves.
//!
//! Noted clients are coalesced: a client that gained 32 flows since the
//! last read costs one remove and one insert at the read, and one whose
//! count went down and back up (a full table: one flow evicted, one
//! filed) none.

use std::collections::{BTreeSet, HashMap};
use std::hash::BuildHasher;

use super::key::ClientId;

/// Fast, seeded per process: the keys are addresses a client chooses.
type Hasher = foldhash::fast::RandomState;

/// A client's place: (flows held, tie, client). The last is the heaviest.
pub type Place = (usize, u64, ClientId);

/// Notes kept above this many clients are given back when read: after a
/// flood of one-flow clients the map would otherwise keep its fullest
/// size for good.
const KEPT_NOTES: usize = 1024;

#[derive(Debug)]
pub struct LoadOrder {
    /// (flows held, tie, client) for every client holding flows, as of
    /// the last [`LoadOrder::settled`], plus the noted clients at the
    /// counts in `noted`. Among clients holding as many, the order is a
    /// keyed hash of the client ([`LoadOrder::tie`]), not the address: a
    /// device forging its source addresses chooses those, and so would
    /// choose which of its clients a full table weighs.
    set: BTreeSet<Place>,
    /// Seeds the tie order, at random per table.
    ties: Hasher,
    /// Clients whose count changed since the last read, with the count
    /// `set` holds them at (0: not in it).
    noted: HashMap<ClientId, usize, Hasher>,
    /// The client noted last: a burst of one client's new flows notes it
    /// once, not once a flow.
    last: Option<ClientId>,
}

impl Default for LoadOrder {
    fn default() -> Self {
        LoadOrder {
            set: BTreeSet::new(),
            ties: Hasher::default(),
            noted: HashMap::with_hasher(Hasher::default()),
            last: None,
        }
    }
}

impl LoadOrder {
    /// `v` hashed with the tie order's key (a client's tie, or a random
    /// starting point among ties).
    pub fn tie(&self, v: impl std::hash::Hash) -> u64 {
        self.ties.hash_one(v)
    }

    /// Notes that `id`'s flow count is about to change (or just changed)
    /// from `old`. Must be called for every change of any client's count.
    pub fn changed(&mut self, id: ClientId, old: usize) {
        if self.last == Some(id) {
            return;
        }
        self.noted.entry(id).or_insert(old);
        self.last = Some(id);
    }

    /// The order, with every noted client moved to its place for its
    /// count now (`count` says it; 0 for a client gone).
    pub fn settled(&mut self, count: impl Fn(ClientId) -> usize) -> &BTreeSet<Place> {
        self.last = None;
        if !self.noted.is_empty() {
            for (id, was) in self.noted.drain() {
                let now = count(id);
                if now == was {
                    continue;
                }
                let tie = self.ties.hash_one(id);
                if was > 0 {
                    self.set.remove(&(was, tie, id));
                }
                if now > 0 {
                    self.set.insert((now, tie, id));
                }
            }
            if self.noted.capacity() > KEPT_NOTES {
                self.noted = HashMap::with_hasher(Hasher::default());
            }
        }
        &self.set
    }

    /// Forgets every client (the table was emptied).
    pub fn clear(&mut self) {
        self.set.clear();
        self.noted.clear();
        self.last = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rng::XorShift;

    /// What eager upkeep keeps: every client holding flows at its count.
    fn eager(order: &LoadOrder, counts: &HashMap<ClientId, usize>) -> BTreeSet<Place> {
        counts
            .iter()
            .filter(|&(_, &n)| n > 0)
            .map(|(&id, &n)| (n, order.tie(id), id))
            .collect()
    }

    /// Random gains and losses of flows among a few clients, with reads
    /// in between at random: every read sees the order eager upkeep keeps
    /// (so whom eviction picks is unchanged), whatever the changes since
    /// the last read were (a client up and back down, gone to 0 and back,
    /// many changes of one client, of many).
    #[test]
    fn every_read_sees_the_order_eager_upkeep_keeps() {
        let mut rng = XorShift::new(0x5eed_1234);
        let mut order = LoadOrder::default();
        let mut counts: HashMap<ClientId, usize> = HashMap::new();
        let mut reads = 0;
        for step in 0..20_000 {
            let id = ClientId::V4(rng.below(12) as u32);
            let old = counts.get(&id).copied().unwrap_or(0);
            let new = match rng.below(3) {
                0 if old > 0 => old - 1,
                1 if old > 0 => 0,
                _ => old + 1 + rng.below(3),
            };
            order.changed(id, old);
            counts.insert(id, new);
            if rng.below(7) == 0 {
                let want = eager(&order, &counts);
                let got = order.settled(|c| counts.get(&c).copied().unwrap_or(0));
                assert_eq!(got, &want, "step {step}");
                reads += 1;
            }
        }
        assert!(reads > 1_000);
    }

    /// Changes are only noted: the B-tree is written at the read, once
    /// per client however many flows it gained, and not at all for a
    /// client whose count came back to where the order has it.
    #[test]
    fn changes_are_written_at_the_read_once_a_client() {
        let mut order = LoadOrder::default();
        let (a, b) = (ClientId::V4(1), ClientId::V4(2));
        let mut counts: HashMap<ClientId, usize> = HashMap::new();
        for n in 0..32 {
            order.changed(a, n);
            counts.insert(a, n + 1);
        }
        order.changed(b, 0);
        counts.insert(b, 1);
        assert!(order.set.is_empty(), "nothing written before a read");
        assert_eq!(order.noted.len(), 2);
        let count = |counts: &HashMap<ClientId, usize>, c| counts.get(&c).copied().unwrap_or(0);
        let set = order.settled(|c| count(&counts, c)).clone();
        assert_eq!(set.last().map(|p| (p.0, p.2)), Some((32, a)));
        assert_eq!(set.first().map(|p| (p.0, p.2)), Some((1, b)));
        assert!(order.noted.is_empty());
        // One evicted, one filed: back at 32, the order already right.
        order.changed(a, 32);
        order.changed(a, 31);
        assert_eq!(order.noted.get(&a), Some(&32), "the count the order has");
        assert_eq!(order.settled(|c| count(&counts, c)), &set);
        // Gone: out of the order.
        order.changed(b, 1);
        counts.remove(&b);
        assert_eq!(order.settled(|c| count(&counts, c)).len(), 1);
    }

    /// A flood of one-flow clients between reads leaves no large map of
    /// notes behind once read.
    #[test]
    fn the_notes_give_their_memory_back() {
        let mut order = LoadOrder::default();
        for i in 0..10_000 {
            order.changed(ClientId::V4(i), 0);
        }
        assert_eq!(order.settled(|_| 1).len(), 10_000);
        assert!(order.noted.capacity() <= KEPT_NOTES);
    }
}
