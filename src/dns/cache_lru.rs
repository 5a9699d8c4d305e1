//! The answer cache's recency lists: packed keys to values in two
//! segments, evicted by their owner ([`Lru::pop_lru`]), which keeps the
//! bounds (entries and bytes).
//!
//! Why two segments (a segmented LRU): with one list, every new name went
//! to the front and the least recently used went out, so a flood of names
//! asked once each (a device forging its source address, so that no one
//! "client" ever holds more than its share, or several devices together)
//! pushed out every answer the LAN's devices ask again and again, and
//! serve-stale lost its copies. Now a new entry enters *probation*; only
//! an entry found again (a cache hit) moves to the *protected* segment,
//! which holds at most `protected_max` entries (its least recently used
//! goes back to probation's front); eviction takes probation's least
//! recently used first. A flood of one-hit names then only churns
//! probation, whoever seems to ask it. A flood that asks each of its
//! names twice reached the protected segment all the same, so with a
//! sketch ([`Lru::with_sketch`], [`super::cache_sketch`]) the segments are
//! also guarded by how often each key was looked up lately: a full
//! protected segment takes an entry only in place of one asked less
//! often, and [`Lru::pop_for`] keeps a new entry out of a full cache
//! when the entry it would evict was asked more often (or as often, past
//! one look-up).
//!
//! The sketch comes with a window (both made by [`Lru::with_sketch`], as
//! in Caffeine's W-TinyLFU): a new entry enters a small *window* list in
//! front of the two segments instead, and only the entry the window
//! pushes out ([`Lru::graduate`]) goes to probation, where
//! [`Lru::pop_for`] weighs it against the entry it would evict. Why:
//! without it a new answer entered a full cache only when its name had
//! been asked more often than the victim's, so a device's genuinely new
//! name was fetched twice before it was kept; in the window it is kept at
//! once, and the frequency guard still decides what enters the main
//! space, which a flood of forged names can then only churn the window
//! of. A sketch without a window is not a state this type has: the
//! daemon has not built one since the window came, and a way of evicting
//! kept only for it would be code no cache runs.
//!
//! Why not the `lru` crate, which the cache used before: every miss stores
//! an answer, and an insert there hashed the key twice (a look-up, then the
//! insert), allocated a node for it, and needed the key in an allocation of
//! its own; its map, growing, hashed every key again, and an eviction
//! hashed the evicted key to find it. Here the nodes are slots of one
//! slab, reused after an eviction; a key of up to [`INLINE`] bytes is kept
//! in its slot; each slot keeps its key's hash, so growing and evicting
//! hash nothing, and an insert hashes its key once. Together that was
//! about 800 of a miss's 1,830 instructions in the cache's insert
//! (callgrind). A slot's number ([`SlotId`]) names its entry to the
//! owners' accounting, which so keeps no copy of the key.
//!
//! The hash is foldhash's fast one, seeded at random per cache, as the
//! `lru` crate's map was: keys are names any client chooses, so the seed
//! is what keeps a flood of colliding names from being built without
//! seeing the hashes, and a keyed hash at a few instructions a byte costs
//! a miss far less than SipHash would.

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as TableEntry;
use std::hash::BuildHasher;
use std::num::NonZeroUsize;

use super::cache_sketch::Sketch;

/// Keys up to this many bytes are kept in their slot: a packed key is six
/// bytes of type, class and length, the name, then the group's name, so
/// names of up to about 40 bytes with a short group name fit.
pub const INLINE: usize = 54;

/// No slot: the end of a list.
const NIL: u32 = u32::MAX;

/// A slot's number: names an entry until it leaves (then the slot may be
/// reused, for another key).
pub type SlotId = u32;

/// The segments, as indexes of [`Lru::ends`].
const PROBATION: usize = 0;
const PROTECTED: usize = 1;
const WINDOW: usize = 2;

/// A key as a slot keeps it.
#[derive(Debug)]
enum Key {
    Inline { len: u8, bytes: [u8; INLINE] },
    Boxed(Box<[u8]>),
}

impl Key {
    const EMPTY: Key = Key::Inline {
        len: 0,
        bytes: [0; INLINE],
    };

    fn as_slice(&self) -> &[u8] {
        match self {
            Key::Inline { len, bytes } => bytes.get(..usize::from(*len)).unwrap_or(&[]),
            Key::Boxed(b) => b,
        }
    }

    /// Holds `key` from now on, reusing the slot's room when it fits.
    fn set(&mut self, key: &[u8]) {
        match u8::try_from(key.len()) {
            Ok(len) if key.len() <= INLINE => {
                let mut bytes = [0; INLINE];
                if let Some(room) = bytes.get_mut(..key.len()) {
                    room.copy_from_slice(key);
                }
                *self = Key::Inline { len, bytes };
            }
            _ => *self = Key::Boxed(key.into()),
        }
    }
}

#[derive(Debug)]
struct Slot<V> {
    key: Key,
    hash: u64,
    /// Towards the most recently used (`NIL` at the head); in the free
    /// list, unused.
    prev: u32,
    /// Towards the least recently used (`NIL` at the tail); in the free
    /// list, the next free slot.
    next: u32,
    /// `None` while the slot is free.
    value: Option<V>,
    /// Which segment's list the slot is in ([`PROBATION`], [`PROTECTED`]
    /// or [`WINDOW`]).
    segment: u8,
}

/// Packed keys to values, in order of use.
#[derive(Debug)]
pub struct Lru<V> {
    /// Slot numbers, found by their keys' hashes.
    table: HashTable<u32>,
    slots: Vec<Slot<V>>,
    /// Each segment's most and least recently used slots.
    ends: [(u32, u32); 3],
    /// Free slots, linked through `next`.
    free: u32,
    len: usize,
    /// Slots in the protected segment, and the most it holds.
    protected: usize,
    protected_max: usize,
    /// Slots in the window (none without a guard: new entries then
    /// enter probation).
    window: usize,
    hasher: foldhash::fast::SeedableRandomState,
    /// The frequency guard and its window, when the cache has them
    /// ([`Lru::with_sketch`]).
    guard: Option<Guard>,
}

/// How often each key was looked up lately, and the most entries the
/// window in front of the segments keeps: one of them never comes
/// without the other (see the module's comment), and a window keeps at
/// least one entry, so that a new one is always kept at once.
#[derive(Debug)]
struct Guard {
    sketch: Sketch,
    window_max: NonZeroUsize,
}

impl<V> Lru<V> {
    /// An empty cache whose protected segment holds at most
    /// `protected_max` entries (0: one plain LRU list).
    pub fn new(protected_max: usize) -> Self {
        Lru {
            table: HashTable::new(),
            slots: Vec::new(),
            ends: [(NIL, NIL); 3],
            free: NIL,
            len: 0,
            protected: 0,
            protected_max,
            window: 0,
            hasher: foldhash::fast::SeedableRandomState::random(),
            guard: None,
        }
    }

    /// [`Lru::new`] for a cache of `capacity` entries, guarded by
    /// frequency ([`super::cache_sketch`]) behind a window of
    /// `window_max` entries: a new entry enters the window, every
    /// [`Lru::get`] is counted, an entry found again moves into a full
    /// protected segment only when it was asked more often than the entry
    /// it would demote, and [`Lru::pop_for`] keeps the entry the window
    /// pushed out of a full main space unless it was asked more often than
    /// the entry it would evict (ties past one look-up stay out).
    pub fn with_sketch(protected_max: usize, window_max: NonZeroUsize, capacity: usize) -> Self {
        Lru {
            guard: Some(Guard {
                sketch: Sketch::new(capacity),
                window_max,
            }),
            ..Self::new(protected_max)
        }
    }

    /// [`Lru::with_sketch`] hashing with `seed`, not a random one: a test
    /// of the frequency guard then sees the same collisions on every run
    /// (the sketch's estimates err high where keys share counters, and
    /// where they do depends on the seed).
    #[cfg(test)]
    pub fn with_sketch_seeded(protected_max: usize, window_max: NonZeroUsize, capacity: usize, seed: u64) -> Self {
        Lru {
            hasher: foldhash::fast::SeedableRandomState::with_seed(seed, foldhash::SharedSeed::global_fixed()),
            ..Self::with_sketch(protected_max, window_max, capacity)
        }
    }
}

fn at(i: u32) -> usize {
    // Slot numbers are below `u32::MAX` (see `Lru::take_slot`).
    i as usize
}

impl<V> Lru<V> {
    pub fn len(&self) -> usize {
        self.len
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<u32> {
        let slots = &self.slots;
        self.table
            .find(hash, |&i| {
                let slot = &slots[at(i)];
                slot.hash == hash && slot.key.as_slice() == key
            })
            .copied()
    }

    /// The value of `key`, now the most recently used of the protected
    /// segment (found again: see the module's comment), or of probation
    /// when the frequency guard keeps it there. The look-up is counted,
    /// found or not: a miss is a name asked too.
    pub fn get(&mut self, key: &[u8]) -> Option<&V> {
        let hash = self.hasher.hash_one(key);
        if let Some(guard) = &mut self.guard {
            guard.sketch.increment(hash);
        }
        self.found(hash, key)
    }

    /// [`Lru::get`] for a key looked up again for the same question (an
    /// expired answer served after the miss that looked for it): not
    /// counted a second time.
    pub fn get_again(&mut self, key: &[u8]) -> Option<&V> {
        self.found(self.hasher.hash_one(key), key)
    }

    fn found(&mut self, hash: u64, key: &[u8]) -> Option<&V> {
        let i = self.find(hash, key)?;
        let segment = usize::from(self.slots[at(i)].segment);
        if segment == PROTECTED {
            self.move_to_front(i);
        } else if self.protected >= self.protected_max && !self.hotter(hash, self.ends[PROTECTED].1) {
            // A full protected segment takes it only in place of an entry
            // asked less often: it stays in probation, as its most
            // recently used.
            self.move_to_front(i);
        } else {
            // Found again in the window, it is promoted as from
            // probation, under the same guard: otherwise a name asked
            // again and again while the window held it left it for
            // probation, behind names asked less, and a flood asking
            // names three times pushed it out there (14 of the 64 seeds
            // of the cache's forged-names test).
            self.unlink(i);
            if segment == WINDOW {
                self.window -= 1;
            }
            self.slots[at(i)].segment = PROTECTED as u8;
            self.protected += 1;
            self.link_front(i);
            if self.protected > self.protected_max {
                // The protected segment's least recently used goes back
                // to probation, as its most recently used.
                let demoted = self.ends[PROTECTED].1;
                self.unlink(demoted);
                self.protected -= 1;
                self.slots[at(demoted)].segment = PROBATION as u8;
                self.link_front(demoted);
            }
        }
        self.slots[at(i)].value.as_ref()
    }

    /// Whether the key of `hash` was asked more often lately than the
    /// entry in slot `than` (always without a sketch, or without that
    /// entry).
    fn hotter(&self, hash: u64, than: u32) -> bool {
        match (&self.guard, self.slots.get(at(than))) {
            (Some(guard), Some(slot)) => guard.sketch.estimate(hash) > guard.sketch.estimate(slot.hash),
            _ => true,
        }
    }

    /// The value in slot `i`, if it holds one.
    pub fn value_at(&self, i: SlotId) -> Option<&V> {
        self.slots.get(at(i))?.value.as_ref()
    }

    /// Stores `value` under `key` as the most recently used of its
    /// segment (the window for a new key, or probation without a guard);
    /// returns its slot and the value it replaces. Nothing is evicted or
    /// moved out of the window here: the owner does that.
    pub fn push(&mut self, key: &[u8], value: V) -> (SlotId, Option<V>) {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        let entry = self.table.entry(
            hash,
            |&i| {
                let slot = &slots[at(i)];
                slot.hash == hash && slot.key.as_slice() == key
            },
            |&i| slots[at(i)].hash,
        );
        match entry {
            TableEntry::Occupied(found) => {
                let i = *found.get();
                self.move_to_front(i);
                (i, self.slots[at(i)].value.replace(value))
            }
            TableEntry::Vacant(vacant) => {
                let i = if self.free != NIL {
                    let i = self.free;
                    self.free = self.slots[at(i)].next;
                    i
                } else {
                    // More slots than `u32` numbers is more entries than
                    // any configuration's memory could hold; the slab only
                    // grows to the most entries held at once.
                    let i = u32::try_from(self.slots.len()).unwrap_or(NIL - 1);
                    self.slots.push(Slot {
                        key: Key::EMPTY,
                        hash,
                        prev: NIL,
                        next: NIL,
                        value: None,
                        segment: PROBATION as u8,
                    });
                    i
                };
                vacant.insert(i);
                let windowed = self.guard.is_some();
                let slot = &mut self.slots[at(i)];
                slot.key.set(key);
                slot.hash = hash;
                slot.value = Some(value);
                slot.segment = if windowed { WINDOW } else { PROBATION } as u8;
                if windowed {
                    self.window += 1;
                }
                self.len += 1;
                self.link_front(i);
                (i, None)
            }
        }
    }

    /// Takes `key`'s value out.
    pub fn pop(&mut self, key: &[u8]) -> Option<V> {
        let hash = self.hasher.hash_one(key);
        let slots = &self.slots;
        let found = self
            .table
            .find_entry(hash, |&i| {
                let slot = &slots[at(i)];
                slot.hash == hash && slot.key.as_slice() == key
            })
            .ok()?;
        let (i, _) = found.remove();
        self.release(i)
    }

    /// Takes the least recently used value of probation out, or of the
    /// protected segment when probation is empty, or of the window when
    /// both are.
    pub fn pop_lru(&mut self) -> Option<V> {
        let i = self.main_victim(NIL);
        let i = if i == NIL { self.ends[WINDOW].1 } else { i };
        self.pop_at(i)
    }

    /// The entry the main space (probation, then the protected segment)
    /// gives up first, other than `except`; `NIL` when there is none.
    fn main_victim(&self, except: u32) -> u32 {
        match self.ends[PROBATION].1 {
            i if i == NIL || i == except => match self.slots.get(at(i)).map(|s| s.prev) {
                // `except` is probation's last: the one before it.
                Some(prev) if prev != NIL => prev,
                _ => self.ends[PROTECTED].1,
            },
            i => i,
        }
    }

    /// Moves the window's least recently used entry to probation's front
    /// when the window holds more than its most; returns its slot, the
    /// candidate [`Lru::pop_for`] weighs when the cache is over its
    /// bounds. Without a guard there is no window: `None`.
    pub fn graduate(&mut self) -> Option<SlotId> {
        let window_max = self.guard.as_ref()?.window_max.get();
        if self.window <= window_max {
            return None;
        }
        let i = self.ends[WINDOW].1;
        self.slots.get(at(i))?;
        self.unlink(i);
        self.window -= 1;
        self.slots[at(i)].segment = PROBATION as u8;
        self.link_front(i);
        Some(i)
    }

    /// Takes out the entry an eviction should take to make room for the
    /// entry in slot `candidate`, the one the window pushed out to
    /// probation ([`Lru::graduate`]): the main space's least recently used
    /// other than the candidate, unless the candidate was asked less often
    /// lately, or as often when both were asked more than once: then the
    /// candidate itself (a full main space does not admit it). With no
    /// other entry in the main space, the candidate goes.
    ///
    /// Why ties admit only names asked at most once: those go on churning
    /// probation among themselves, as without the guard. Past that, the
    /// sketch's estimates err high (a shared counter, a doorkeeper bit
    /// set by another name), so a tie is often a forged name asked less
    /// often than a device's name it is compared with. In 1,000 simulated
    /// floods of names asked three times against a device's names asked
    /// four, 188 of the 192 evictions of the device's names were ties.
    pub fn pop_for(&mut self, candidate: SlotId) -> Option<V> {
        let lru = match self.main_victim(candidate) {
            NIL => candidate,
            i => i,
        };
        let keep_out = match (&self.guard, self.slots.get(at(candidate)), self.slots.get(at(lru))) {
            (Some(guard), Some(new), Some(old)) if lru != candidate && new.value.is_some() => {
                let (new, old) = (guard.sketch.estimate(new.hash), guard.sketch.estimate(old.hash));
                new < old || (new == old && new > 1)
            }
            _ => false,
        };
        let victim = if keep_out { candidate } else { lru };
        self.pop_at(victim)
    }

    /// Takes the value in slot `i` out, if it holds one.
    pub fn pop_at(&mut self, i: SlotId) -> Option<V> {
        let slot = self.slots.get(at(i))?;
        slot.value.as_ref()?;
        let hash = slot.hash;
        if let Ok(found) = self.table.find_entry(hash, |&j| j == i) {
            found.remove();
        }
        self.release(i)
    }

    /// Keys and values, probation's least recently used first, then the
    /// protected segment's, then the window's: the order to store them in
    /// again so that each list keeps its order and the most recent are
    /// stored last.
    pub fn iter_oldest_first(&self) -> impl Iterator<Item = (&[u8], &V)> {
        let list = |segment: usize| {
            let mut i = self.ends[segment].1;
            std::iter::from_fn(move || {
                let slot = self.slots.get(at(i))?;
                i = slot.prev;
                Some((slot.key.as_slice(), slot.value.as_ref()?))
            })
        };
        list(PROBATION).chain(list(PROTECTED)).chain(list(WINDOW))
    }

    /// Unlinks slot `i` (already out of the table), frees it and returns
    /// its value (every slot in the table has one).
    fn release(&mut self, i: u32) -> Option<V> {
        self.unlink(i);
        self.len -= 1;
        match usize::from(self.slots[at(i)].segment) {
            PROTECTED => self.protected -= 1,
            WINDOW => self.window -= 1,
            _ => {}
        }
        let free = self.free;
        let slot = &mut self.slots[at(i)];
        // A long key's box goes: free slots hold no memory of their own.
        if matches!(slot.key, Key::Boxed(_)) {
            slot.key = Key::EMPTY;
        }
        slot.next = free;
        self.free = i;
        slot.value.take()
    }

    /// Makes slot `i` (listed) the most recently used of its segment.
    fn move_to_front(&mut self, i: u32) {
        if self.ends[usize::from(self.slots[at(i)].segment)].0 != i {
            self.unlink(i);
            self.link_front(i);
        }
    }

    /// Takes slot `i` out of its segment's list.
    fn unlink(&mut self, i: u32) {
        let (prev, next, segment) = {
            let slot = &self.slots[at(i)];
            (slot.prev, slot.next, usize::from(slot.segment))
        };
        let ends = &mut self.ends[segment];
        match self.slots.get_mut(at(prev)) {
            Some(p) => p.next = next,
            None => ends.0 = next,
        }
        match self.slots.get_mut(at(next)) {
            Some(n) => n.prev = prev,
            None => ends.1 = prev,
        }
    }

    /// Puts slot `i` at the front of its segment's list.
    fn link_front(&mut self, i: u32) {
        let segment = usize::from(self.slots[at(i)].segment);
        let head = self.ends[segment].0;
        {
            let slot = &mut self.slots[at(i)];
            slot.prev = NIL;
            slot.next = head;
        }
        let ends = &mut self.ends[segment];
        match self.slots.get_mut(at(head)) {
            Some(h) => h.prev = i,
            None => ends.1 = i,
        }
        ends.0 = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// The two lists as a plain model has them: (key, value), most
    /// recently used first, and the protected segment's bound.
    struct Model {
        probation: VecDeque<(Vec<u8>, u32)>,
        protected: VecDeque<(Vec<u8>, u32)>,
        protected_max: usize,
    }

    impl Model {
        fn take(&mut self, key: &[u8]) -> Option<((Vec<u8>, u32), bool)> {
            if let Some(p) = self.protected.iter().position(|(k, _)| k == key) {
                return self.protected.remove(p).map(|e| (e, true));
            }
            let p = self.probation.iter().position(|(k, _)| k == key)?;
            self.probation.remove(p).map(|e| (e, false))
        }

        fn push(&mut self, key: &[u8], value: u32) -> Option<u32> {
            match self.take(key) {
                Some(((_, old), true)) => {
                    self.protected.push_front((key.to_vec(), value));
                    Some(old)
                }
                Some(((_, old), false)) => {
                    self.probation.push_front((key.to_vec(), value));
                    Some(old)
                }
                None => {
                    self.probation.push_front((key.to_vec(), value));
                    None
                }
            }
        }

        fn get(&mut self, key: &[u8]) -> Option<u32> {
            let (e, _) = self.take(key)?;
            let v = e.1;
            self.protected.push_front(e);
            if self.protected.len() > self.protected_max {
                let demoted = self.protected.pop_back()?;
                self.probation.push_front(demoted);
            }
            Some(v)
        }

        fn pop_lru(&mut self) -> Option<u32> {
            self.probation
                .pop_back()
                .or_else(|| self.protected.pop_back())
                .map(|(_, v)| v)
        }

        fn len(&self) -> usize {
            self.probation.len() + self.protected.len()
        }
    }

    /// Random pushes, look-ups, removals and evictions over short and long
    /// keys (inline and boxed, some sharing a prefix) give what the plain
    /// model gives, in the same order, for protected segments of none, some
    /// and room for all; the slab never holds more slots than the most
    /// values held at once.
    #[test]
    fn it_keeps_what_a_plain_model_keeps_in_the_same_order() {
        for protected_max in [0, 1, 7, 1_000] {
            let mut lru = Lru::new(protected_max);
            let mut model = Model {
                probation: VecDeque::new(),
                protected: VecDeque::new(),
                protected_max,
            };
            let mut rng = crate::test_rng::XorShift::new(0x9e37_79b9_7f4a_7c15);
            let mut rand = move |n: u64| rng.next_u64() % n;
            let key = |n: u64| {
                // Lengths around the inline limit, and past it.
                let len = [1, INLINE - 1, INLINE, INLINE + 1, 300][usize::try_from(n % 5).unwrap()];
                let mut k = vec![b'k'; len];
                k[0] = u8::try_from(n % 251).unwrap();
                k
            };
            let mut most = 0;
            for step in 0..20_000u32 {
                let k = key(rand(40));
                match rand(5) {
                    0 | 1 => assert_eq!(lru.push(&k, step).1, model.push(&k, step), "push {step}"),
                    2 => assert_eq!(lru.get(&k).copied(), model.get(&k), "get {step}"),
                    3 => assert_eq!(lru.pop(&k), model.take(&k).map(|((_, v), _)| v), "pop {step}"),
                    _ => assert_eq!(lru.pop_lru(), model.pop_lru(), "pop_lru {step}"),
                }
                assert_eq!(lru.len(), model.len());
                assert_eq!(lru.protected, model.protected.len());
                assert!(lru.protected <= protected_max);
                most = most.max(model.len());
                assert!(lru.slots.len() <= most, "slots are reused");
            }
            let listed: Vec<(Vec<u8>, u32)> = lru.iter_oldest_first().map(|(k, v)| (k.to_vec(), *v)).collect();
            let want: Vec<(Vec<u8>, u32)> = model
                .probation
                .iter()
                .rev()
                .chain(model.protected.iter().rev())
                .cloned()
                .collect();
            assert_eq!(listed, want, "protected_max {protected_max}");
            while lru.pop_lru().is_some() {}
            assert_eq!((lru.len(), lru.protected, lru.ends), (0, 0, [(NIL, NIL); 3]));
            assert!(lru.pop_lru().is_none() && lru.iter_oldest_first().next().is_none());
        }
    }

    /// Names asked once each, however many, push out only names asked
    /// once: a name found again stays while the protected segment has
    /// room, whatever the flood.
    #[test]
    fn one_hit_keys_churn_probation_only() {
        let mut lru = Lru::new(8);
        let cap = 10;
        for k in 0..5u32 {
            lru.push(&k.to_be_bytes(), k);
            assert!(lru.get(&k.to_be_bytes()).is_some());
        }
        for k in 100..10_000u32 {
            lru.push(&k.to_be_bytes(), k);
            while lru.len() > cap {
                lru.pop_lru();
            }
        }
        for k in 0..5u32 {
            assert_eq!(lru.get(&k.to_be_bytes()), Some(&k), "{k} was pushed out");
        }
    }

    /// A full main space admits the entry its window pushes out in place
    /// of its own least recently used only when the newcomer was asked
    /// more often, or as often when both were asked once: a tie past one
    /// look-up stays out (the sketch errs high, so such a tie is often a
    /// name asked less often).
    #[test]
    fn ties_past_one_look_up_stay_out_of_a_full_cache() {
        // A window of one and no protected segment: every entry out of the
        // window waits in probation, which holds two (3 in all).
        let mut lru = Lru::with_sketch_seeded(0, NonZeroUsize::MIN, 3, 7);
        // `k` asked `times` (misses are counted as look-ups, as the
        // cache's are), then stored as the cache stores: the value the
        // room for what the window pushed out took out, if it took any.
        let stored = |lru: &mut Lru<u32>, k: &[u8], times: usize, value: u32| {
            for _ in 0..times {
                assert!(lru.get(k).is_none());
            }
            lru.push(k, value);
            let candidate = lru.graduate()?;
            (lru.len() > 3).then(|| lru.pop_for(candidate)).flatten()
        };
        assert_eq!(stored(&mut lru, b"x", 2, 10), None);
        assert_eq!(stored(&mut lru, b"y", 1, 20), None);
        assert_eq!(stored(&mut lru, b"f", 2, 30), None);
        // "f", asked twice, leaves the window for a full main space whose
        // least recently used, "x", was asked twice: the tie stays out.
        assert_eq!(stored(&mut lru, b"g", 3, 40), Some(30), "a tie at two was let in");
        // Asked three times, "g" is let in in place of "x".
        assert_eq!(
            stored(&mut lru, b"h", 1, 50),
            Some(10),
            "asked more often, it was kept out"
        );
        // "y", asked once, is now the least recently used: "h", asked
        // once, ties it and is let in, as without the guard.
        assert_eq!(stored(&mut lru, b"i", 1, 60), Some(20), "a tie at one was kept out");
        assert_eq!(lru.len(), 3);
        // The newest waits in the window, kept.
        assert_eq!(lru.value_at(lru.ends[WINDOW].0), Some(&60));
    }

    /// Slots name entries: a slot's value is read and taken out by its
    /// number, and a taken slot reads as empty.
    #[test]
    fn slots_name_their_entries_until_they_leave() {
        let mut lru = Lru::new(4);
        let (a, _) = lru.push(b"a", 1);
        let (b, _) = lru.push(b"b", 2);
        assert_eq!(lru.push(b"a", 3), (a, Some(1)), "a key keeps its slot");
        assert_eq!(lru.value_at(b), Some(&2));
        assert!(lru.get(b"b").is_some());
        assert_eq!(lru.pop_at(b), Some(2));
        assert!(lru.value_at(b).is_none() && lru.pop_at(b).is_none());
        assert_eq!((lru.len(), lru.protected), (1, 0));
        assert!(lru.get(b"b").is_none() && lru.value_at(NIL).is_none());
    }

    /// Keys that share all but their last byte, or differ only in length,
    /// are told apart, and a freed slot keeps no long key's memory.
    #[test]
    fn keys_are_compared_whole_and_freed_slots_hold_no_box() {
        let mut lru = Lru::new(2);
        let long = vec![7; 200];
        let mut longer = long.clone();
        longer.push(0);
        assert_eq!(lru.push(&long, 1).1, None);
        assert_eq!(lru.push(&longer, 2).1, None);
        assert_eq!(lru.push(&long[..INLINE], 3).1, None);
        assert_eq!(lru.get(&long), Some(&1));
        assert_eq!(lru.get(&longer), Some(&2));
        assert_eq!(lru.get(&long[..INLINE]), Some(&3));
        assert_eq!(lru.get(&long[..INLINE - 1]), None);
        assert_eq!(lru.pop(&longer), Some(2));
        assert!(
            lru.slots
                .iter()
                .filter(|s| s.value.is_none())
                .all(|s| matches!(s.key, Key::Inline { .. }))
        );
        // The freed slot is the next one used.
        assert_eq!(lru.push(b"short", 4).1, None);
        assert_eq!(lru.slots.len(), 3);
    }
}
