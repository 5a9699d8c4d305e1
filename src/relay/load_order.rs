//! The session table's clients in load order, brought up to date only
//! when someone reads it.
//!
//! A full table picks whose flow to end from this order (the heaviest
//! client, and a run of the lightest from a random point: see
//! `table::Inner::most_to_spare`), and it is ordered by each client's flow
//! count. Kept eagerly, every new flow paid a B-tree remove and insert
//! and two keyed hashes for its client's new count (about 295 of the 1,130
//! instructions of `SessionTable::insert`, callgrind, "New flows, round
//! 14" in docs/BENCHMARKS.md), although the order is read only when a flow must
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
//!
//! The notes are a list, not a map: a note is a push, not a hash and a
//! probe. A client noted twice (others noted between) is written once,
//! at its first note, whose count is the one the order holds; its later
//! notes find it in place. The list is bounded: past [`MAX_NOTES`] a note
//! writes the order, so clients taking turns between two reads cost no
//! more than eager upkeep, and no memory beyond the bound.

use std::collections::BTreeSet;
use std::hash::BuildHasher;

use super::key::ClientId;

/// Fast, seeded per process: the keys are addresses a client chooses.
type Hasher = foldhash::fast::RandomState;

/// A client's place: (flows held, tie, client). The last is the heaviest.
pub type Place = (usize, u64, ClientId);

/// Notes held at most between two reads.
const MAX_NOTES: usize = 1024;

#[derive(Debug, Default)]
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
    /// Clients whose count changed since the last read, each with its
    /// count before that change: a client's first note holds the count
    /// `set` holds it at (0: not in it).
    noted: Vec<(ClientId, usize)>,
    /// The client noted last: a burst of one client's new flows notes it
    /// once, not once a flow.
    last: Option<ClientId>,
}

impl LoadOrder {
    /// `v` hashed with the tie order's key (a client's tie, or a random
    /// starting point among ties).
    pub fn tie(&self, v: impl std::hash::Hash) -> u64 {
        self.ties.hash_one(v)
    }

    /// Notes that `id`'s flow count just changed from `old`. Must be
    /// called after every change of any client's count (`count` says the
    /// counts now, as for [`LoadOrder::settled`]).
    pub fn changed(&mut self, id: ClientId, old: usize, count: impl Fn(ClientId) -> usize) {
        if self.last == Some(id) {
            return;
        }
        self.noted.push((id, old));
        self.last = Some(id);
        if self.noted.len() >= MAX_NOTES {
            self.write(count);
        }
    }

    /// The order, with every noted client moved to its place for its
    /// count now (`count` says it; 0 for a client gone).
    pub fn settled(&mut self, count: impl Fn(ClientId) -> usize) -> &BTreeSet<Place> {
        self.write(count);
        &self.set
    }

    /// Moves the noted clients to their places. A client's first note
    /// holds the count `set` has it at; a later note of the same client
    /// finds it already moved to its count now, and either matches that
    /// count or names a place the client is not at (removing nothing,
    /// inserting what is there).
    fn write(&mut self, count: impl Fn(ClientId) -> usize) {
        self.last = None;
        for (id, was) in self.noted.drain(..) {
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
    use std::collections::HashMap;

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
            counts.insert(id, new);
            order.changed(id, old, |c| counts.get(&c).copied().unwrap_or(0));
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
        let count = |counts: &HashMap<ClientId, usize>, c| counts.get(&c).copied().unwrap_or(0);
        for n in 0..32 {
            counts.insert(a, n + 1);
            order.changed(a, n, |c| count(&counts, c));
        }
        counts.insert(b, 1);
        order.changed(b, 0, |c| count(&counts, c));
        assert!(order.set.is_empty(), "nothing written before a read");
        assert_eq!(order.noted, [(a, 0), (b, 0)]);
        let set = order.settled(|c| count(&counts, c)).clone();
        assert_eq!(set.last().map(|p| (p.0, p.2)), Some((32, a)));
        assert_eq!(set.first().map(|p| (p.0, p.2)), Some((1, b)));
        assert!(order.noted.is_empty());
        // One evicted, one filed: back at 32, the order already right.
        order.changed(a, 32, |c| count(&counts, c));
        order.changed(a, 31, |c| count(&counts, c));
        assert_eq!(order.noted, [(a, 32)], "the count the order has");
        assert_eq!(order.settled(|c| count(&counts, c)), &set);
        // Taking turns: a noted again after b, written once, right.
        counts.insert(a, 33);
        order.changed(a, 32, |c| count(&counts, c));
        counts.insert(b, 2);
        order.changed(b, 1, |c| count(&counts, c));
        counts.insert(a, 34);
        order.changed(a, 33, |c| count(&counts, c));
        assert_eq!(order.noted.len(), 3);
        let places: Vec<(usize, ClientId)> = order
            .settled(|c| count(&counts, c))
            .iter()
            .map(|p| (p.0, p.2))
            .collect();
        assert_eq!(places, [(2, b), (34, a)]);
        // Gone: out of the order.
        counts.remove(&b);
        order.changed(b, 2, |c| count(&counts, c));
        assert_eq!(order.settled(|c| count(&counts, c)).len(), 1);
    }

    /// A flood of one-flow clients with no read between holds no more
    /// than [`MAX_NOTES`] notes, and the order is right when read.
    #[test]
    fn the_notes_are_bounded() {
        let mut order = LoadOrder::default();
        for i in 0..10_000 {
            order.changed(ClientId::V4(i), 0, |_| 1);
            assert!(order.noted.len() < MAX_NOTES);
        }
        assert!(order.set.len() >= 10_000 - MAX_NOTES, "written as it went");
        assert_eq!(order.settled(|_| 1).len(), 10_000);
    }
}
