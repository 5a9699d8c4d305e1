//! How often each name was asked lately, estimated: the answer cache's
//! frequency guard (in the spirit of TinyLFU).
//!
//! Why: the cache's segments ([`super::cache_lru`]) keep names asked once
//! from pushing out names asked again, but a flood that asks each of its
//! names twice, from forged source addresses (each with a share and a rate
//! limit of its own), reached the protected segment all the same and, sent
//! more recently than the LAN asked its own names, pushed those out.
//! Recency alone cannot tell a name asked twice in the last second from
//! one asked every minute for an hour; a count can. So every look-up is
//! counted here, and an entry found again moves into a full protected
//! segment only when it has been asked more often than the entry it
//! would demote, and a new answer enters a full cache only when it has
//! been asked more often than the entry it would evict (or as often, when
//! both were asked at most once: see [`super::cache_lru::Lru::pop_for`]).
//! A flood must
//! then ask each of its names more often than the LAN asks the names it
//! wants kept, within one ageing period, not merely twice.
//!
//! What it is: a count-min sketch of 4-bit counters, 16 to a word, one
//! word per entry of the cache (8 bytes an entry), each key counted in four
//! counters picked from its hash; its estimate is the least of the four,
//! which only ever errs high (other keys sharing a counter). Only the
//! counters at that least value are raised ("conservative update"), which
//! keeps other keys' errors down. Counters stop at 15: the guard needs
//! "more often than", not how much. After ten counted look-ups per entry
//! of the cache every counter is halved, so that a name asked often an
//! hour ago does not hold its place against the names asked now.
//!
//! A key's first look-up only sets its two bits in a *doorkeeper* (two bits a
//! key, 64 per entry, cleared at each halving); the counters count from
//! the second, and the estimate is the counters plus one if both bits are set. Why: the
//! halving is paced by look-ups, and whoever asks most sets that pace. A
//! flood of names asked once each, the cheapest flood there is, would
//! otherwise age the LAN's counts away as fast as it is sent, and a few
//! names then asked twice would beat them; now it neither ages the
//! counts nor raises any counter (only bits the next halving clears).
//!
//! The hash is the cache's own (foldhash, seeded at random per cache): a
//! flood cannot be built to land on the counters of the LAN's names
//! without seeing it.

/// Counters per word.
const PER_WORD: usize = 16;

/// The most a counter holds.
const MAX: u64 = 15;

/// Every counter's high bits cleared after a shift right: halves all 16.
const HALVE_MASK: u64 = 0x7777_7777_7777_7777;

/// The most words a sketch takes (8 MiB): past a million entries the
/// cache's own memory dwarfs it, and more counters only refine the
/// estimates of names asked once.
const MAX_WORDS: usize = 1 << 20;

/// Look-ups counted before every counter is halved, per word.
const SAMPLE_PER_WORD: usize = 10;

#[derive(Debug)]
pub struct Sketch {
    /// 16 counters of 4 bits each per word.
    table: Box<[u64]>,
    /// The doorkeeper: two bits per key seen since the last halving, as
    /// many words as `table`.
    door: Box<[u64]>,
    /// `table.len() - 1` (a power of two less one).
    mask: u64,
    /// Look-ups counted since the last halving (halved with the counters).
    additions: usize,
    /// Look-ups between halvings.
    sample: usize,
}

/// Spreads a hash for the next of the four counters (a 64-bit finaliser:
/// each counter's place depends on every bit of the key's hash).
fn mix(h: u64) -> u64 {
    let h = (h ^ (h >> 31)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

impl Sketch {
    /// A sketch for a cache of `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        let words = capacity.clamp(PER_WORD, MAX_WORDS).next_power_of_two();
        Sketch {
            table: vec![0; words].into_boxed_slice(),
            door: vec![0; words].into_boxed_slice(),
            mask: (words - 1) as u64,
            additions: 0,
            sample: words * SAMPLE_PER_WORD,
        }
    }

    /// The four counters of `hash`: word and bit offset of each.
    fn places(&self, hash: u64) -> [(usize, u32); 4] {
        let mut h = hash;
        std::array::from_fn(|depth| {
            h = mix(h.wrapping_add(depth as u64));
            // The word from the high bits, the counter in it from the low
            // four: the two never overlap for a table under 2^60 words.
            let word = usize::try_from((h >> 32) & self.mask).unwrap_or(0);
            (word, ((h & 15) as u32) * 4)
        })
    }

    /// The doorkeeper's word and two bits of `hash` (from bits the
    /// counters' places do not start from).
    ///
    /// Why two: a flood brings many more names than the cache holds, and
    /// with one bit a name each a name whose bit another had set was
    /// counted on its first look-up, reading one more than it was asked
    /// (7 % of a flood six times the cache). Both bits in one word keep it
    /// one memory access.
    fn door_bits(&self, hash: u64) -> (usize, u64) {
        let h = mix(hash ^ 0xd6e8_feb8_6659_fd93);
        let bits = (1 << (h & 63)) | (1 << ((h >> 6) & 63));
        (usize::try_from((h >> 32) & self.mask).unwrap_or(0), bits)
    }

    fn counter(&self, (word, shift): (usize, u32)) -> u64 {
        self.table.get(word).map_or(0, |w| (w >> shift) & MAX)
    }

    /// How often `hash`'s key was counted lately (0 to 16: the doorkeeper's
    /// bit and the counters; never less than the truth, short of
    /// halvings).
    pub fn estimate(&self, hash: u64) -> u8 {
        let (word, bits) = self.door_bits(hash);
        let seen = self.door.get(word).is_some_and(|w| w & bits == bits);
        let least = self.places(hash).iter().map(|&p| self.counter(p)).min().unwrap_or(0);
        // At most `MAX` + 1.
        least as u8 + u8::from(seen)
    }

    /// Counts one look-up of `hash`'s key; every `sample` look-ups halve
    /// every counter.
    pub fn increment(&mut self, hash: u64) {
        let (word, bits) = self.door_bits(hash);
        if let Some(w) = self.door.get_mut(word)
            && *w & bits != bits
        {
            // A first look-up: the doorkeeper's, not counted.
            *w |= bits;
            return;
        }
        let places = self.places(hash);
        let least = places.iter().map(|&p| self.counter(p)).min().unwrap_or(MAX);
        if least >= MAX {
            return;
        }
        for &(word, shift) in &places {
            if let Some(w) = self.table.get_mut(word)
                && (*w >> shift) & MAX == least
            {
                *w += 1 << shift;
            }
        }
        self.additions += 1;
        if self.additions >= self.sample {
            self.halve();
        }
    }

    /// Halves every counter (ageing): what was asked often long ago weighs
    /// half as much against what is asked now.
    fn halve(&mut self) {
        for w in self.table.iter_mut() {
            *w = (*w >> 1) & HALVE_MASK;
        }
        self.door.fill(0);
        self.additions /= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(i: u64) -> u64 {
        // Keys' hashes as the cache's hasher gives them: well spread.
        mix(i.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ 0x5851_f42d_4c95_7f2d)
    }

    /// A key looked up n times reads n (alone in the sketch): the first
    /// in the doorkeeper, the rest in the counters, which stop at 15; a
    /// key never looked up reads 0.
    #[test]
    fn counts_saturate_at_fifteen_past_the_doorkeeper() {
        let mut s = Sketch::new(1_000);
        for n in 1..=40u8 {
            s.increment(hash(1));
            assert_eq!(s.estimate(hash(1)), n.min(16), "after {n}");
        }
        assert_eq!(s.estimate(hash(2)), 0);
        // Neither the doorkeeper's look-up nor a saturated key's counts
        // as an addition: they cannot speed the ageing.
        assert_eq!(s.additions, 15);
    }

    /// After `sample` counted look-ups every counter is halved and the
    /// doorkeeper cleared: a key asked 13 times before a flood reads 6
    /// after it, then 3 after the next, while a key asked 4 times since
    /// reads 1 + 3. Keys asked once each, however many, age nothing.
    #[test]
    fn counts_age_by_halving_and_one_hit_keys_do_not_age_them() {
        let mut s = Sketch::new(64);
        assert_eq!(s.sample, 640);
        for _ in 0..13 {
            s.increment(hash(7));
        }
        assert_eq!((s.estimate(hash(7)), s.additions), (13, 12));
        for i in 0..1_500 {
            s.increment(hash(1_000_000 + i));
        }
        // Only the doorkeeper's false positives counted.
        assert!(s.additions < 640, "{}", s.additions);
        assert_eq!(s.estimate(hash(7)), 13);
        // Keys asked twice count once each.
        let mut i = 0;
        loop {
            let before = s.additions;
            s.increment(hash(2_000_000 + i));
            s.increment(hash(2_000_000 + i));
            i += 1;
            if s.additions < before {
                break;
            }
        }
        // The 640th counted look-up halved the counts.
        assert_eq!(s.additions, 320);
        assert_eq!(s.estimate(hash(7)), 6);
        for _ in 0..4 {
            s.increment(hash(8));
        }
        assert_eq!(s.estimate(hash(8)), 4);
        loop {
            let before = s.additions;
            s.increment(hash(3_000_000 + i));
            s.increment(hash(3_000_000 + i));
            i += 1;
            if s.additions < before {
                break;
            }
        }
        assert_eq!(s.estimate(hash(7)), 3);
        assert_eq!(s.estimate(hash(8)), 1);
    }

    /// With as many keys as the cache holds, each asked once, the keys
    /// asked three times stand out: no one-hit key reads more than one of
    /// them, and each asked key reads at least what it was asked (a
    /// count-min sketch errs only high).
    #[test]
    fn frequent_keys_stand_out_of_one_hit_keys() {
        let mut s = Sketch::new(200);
        for round in 0..3 {
            for k in 0..20 {
                s.increment(hash(k));
            }
            for i in 0..200 {
                s.increment(hash(1_000 + round * 1_000 + i));
            }
        }
        let frequent = (0..20).map(|k| s.estimate(hash(k))).min().unwrap();
        let one_hit = (0..600).map(|i| s.estimate(hash(1_000 + i))).max().unwrap();
        assert!(frequent >= 3, "{frequent}");
        assert!(one_hit < frequent, "one-hit {one_hit} vs frequent {frequent}");
    }

    /// The table is sized from the capacity, within its bounds.
    #[test]
    fn the_table_is_one_word_an_entry_within_bounds() {
        assert_eq!(Sketch::new(0).table.len(), 16);
        assert_eq!(Sketch::new(200).table.len(), 256);
        assert_eq!(Sketch::new(10_000).table.len(), 16_384);
        assert_eq!(Sketch::new(usize::MAX).table.len(), MAX_WORDS);
    }
}
