//! The answer cache's recency list: packed keys to values, least recently
//! used evicted first by its owner ([`Lru::pop_lru`]), which keeps the
//! bounds (entries and bytes).
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
//! (callgrind).
//!
//! The hash is foldhash's fast one, seeded at random per cache, as the
//! `lru` crate's map was: keys are names any client chooses, so the seed
//! is what keeps a flood of colliding names from being built without
//! seeing the hashes, and a keyed hash at a few instructions a byte costs
//! a miss far less than SipHash would.

use hashbrown::HashTable;
use hashbrown::hash_table::Entry as TableEntry;
use std::hash::BuildHasher;

/// Keys up to this many bytes are kept in their slot: a packed key is six
/// bytes of type, class and length, the name, then the group's name, so
/// names of up to about 40 bytes with a short group name fit.
pub const INLINE: usize = 54;

/// No slot: the end of a list.
const NIL: u32 = u32::MAX;

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
}

/// Packed keys to values, in order of use.
#[derive(Debug)]
pub struct Lru<V> {
    /// Slot numbers, found by their keys' hashes.
    table: HashTable<u32>,
    slots: Vec<Slot<V>>,
    /// Most and least recently used slots.
    head: u32,
    tail: u32,
    /// Free slots, linked through `next`.
    free: u32,
    len: usize,
    hasher: foldhash::fast::RandomState,
}

impl<V> Default for Lru<V> {
    fn default() -> Self {
        Lru {
            table: HashTable::new(),
            slots: Vec::new(),
            head: NIL,
            tail: NIL,
            free: NIL,
            len: 0,
            hasher: foldhash::fast::RandomState::default(),
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

    /// The value of `key`, now the most recently used.
    pub fn get(&mut self, key: &[u8]) -> Option<&V> {
        let i = self.find(self.hasher.hash_one(key), key)?;
        self.move_to_front(i);
        self.slots[at(i)].value.as_ref()
    }

    /// The value of `key`, left where it is in the order.
    pub fn peek(&self, key: &[u8]) -> Option<&V> {
        let i = self.find(self.hasher.hash_one(key), key)?;
        self.slots.get(at(i))?.value.as_ref()
    }

    /// Stores `value` under `key` as the most recently used; returns the
    /// value it replaces. Nothing is evicted here: the owner does that.
    pub fn push(&mut self, key: &[u8], value: V) -> Option<V> {
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
                self.slots[at(i)].value.replace(value)
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
                    });
                    i
                };
                vacant.insert(i);
                let slot = &mut self.slots[at(i)];
                slot.key.set(key);
                slot.hash = hash;
                slot.value = Some(value);
                self.len += 1;
                self.link_front(i);
                None
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

    /// Takes the least recently used value out.
    pub fn pop_lru(&mut self) -> Option<V> {
        let i = self.tail;
        let hash = self.slots.get(at(i))?.hash;
        if let Ok(found) = self.table.find_entry(hash, |&j| j == i) {
            found.remove();
        }
        self.release(i)
    }

    /// Keys and values, least recently used first.
    pub fn iter_oldest_first(&self) -> impl Iterator<Item = (&[u8], &V)> {
        let mut i = self.tail;
        std::iter::from_fn(move || {
            let slot = self.slots.get(at(i))?;
            i = slot.prev;
            Some((slot.key.as_slice(), slot.value.as_ref()?))
        })
    }

    /// Unlinks slot `i` (already out of the table), frees it and returns
    /// its value (every slot in the table has one).
    fn release(&mut self, i: u32) -> Option<V> {
        self.unlink(i);
        self.len -= 1;
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

    /// Makes slot `i` (listed) the most recently used.
    fn move_to_front(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.link_front(i);
        }
    }

    fn unlink(&mut self, i: u32) {
        let (prev, next) = {
            let slot = &self.slots[at(i)];
            (slot.prev, slot.next)
        };
        match self.slots.get_mut(at(prev)) {
            Some(p) => p.next = next,
            None => self.head = next,
        }
        match self.slots.get_mut(at(next)) {
            Some(n) => n.prev = prev,
            None => self.tail = prev,
        }
    }

    fn link_front(&mut self, i: u32) {
        let head = self.head;
        {
            let slot = &mut self.slots[at(i)];
            slot.prev = NIL;
            slot.next = head;
        }
        match self.slots.get_mut(at(head)) {
            Some(h) => h.prev = i,
            None => self.tail = i,
        }
        self.head = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// The list as a plain model would have it: (key, value), most
    /// recently used first.
    fn model_push(model: &mut VecDeque<(Vec<u8>, u32)>, key: &[u8], value: u32) -> Option<u32> {
        let old = model.iter().position(|(k, _)| k == key).and_then(|p| model.remove(p));
        model.push_front((key.to_vec(), value));
        old.map(|(_, v)| v)
    }

    /// Random pushes, look-ups, removals and evictions over short and long
    /// keys (inline and boxed, some sharing a prefix) give what a plain
    /// list gives, in the same order, and the slab never holds more slots
    /// than the most values held at once.
    #[test]
    fn it_keeps_what_a_plain_list_keeps_in_the_same_order() {
        let mut lru = Lru::default();
        let mut model: VecDeque<(Vec<u8>, u32)> = VecDeque::new();
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
                0 | 1 => assert_eq!(lru.push(&k, step), model_push(&mut model, &k, step), "push {step}"),
                2 => {
                    let got = lru.get(&k).copied();
                    let want = model.iter().position(|(m, _)| *m == k).map(|p| {
                        let e = model.remove(p).unwrap();
                        model.push_front(e.clone());
                        e.1
                    });
                    assert_eq!(got, want, "get {step}");
                }
                3 => {
                    let want = model.iter().position(|(m, _)| *m == k).and_then(|p| model.remove(p));
                    assert_eq!(lru.pop(&k), want.map(|(_, v)| v), "pop {step}");
                }
                _ => assert_eq!(lru.pop_lru(), model.pop_back().map(|(_, v)| v), "pop_lru {step}"),
            }
            assert_eq!(lru.len(), model.len());
            most = most.max(model.len());
            assert!(lru.slots.len() <= most, "slots are reused");
        }
        let listed: Vec<(Vec<u8>, u32)> = lru.iter_oldest_first().map(|(k, v)| (k.to_vec(), *v)).collect();
        let want: Vec<(Vec<u8>, u32)> = model.iter().rev().cloned().collect();
        assert_eq!(listed, want);
        while lru.pop_lru().is_some() {}
        assert_eq!((lru.len(), lru.head, lru.tail), (0, NIL, NIL));
        assert!(lru.pop_lru().is_none() && lru.iter_oldest_first().next().is_none());
    }

    /// Keys that share all but their last byte, or differ only in length,
    /// are told apart, and a freed slot keeps no long key's memory.
    #[test]
    fn keys_are_compared_whole_and_freed_slots_hold_no_box() {
        let mut lru = Lru::default();
        let long = vec![7; 200];
        let mut longer = long.clone();
        longer.push(0);
        assert_eq!(lru.push(&long, 1), None);
        assert_eq!(lru.push(&longer, 2), None);
        assert_eq!(lru.push(&long[..INLINE], 3), None);
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
        assert_eq!(lru.push(b"short", 4), None);
        assert_eq!(lru.slots.len(), 3);
    }
}
