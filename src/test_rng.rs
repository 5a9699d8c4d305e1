//! A deterministic generator for unit tests that walk many random cases.
//!
//! Why one: a test that draws its cases from a fixed seed draws the same
//! ones on every run, so a failure names a step anyone can replay; and
//! the tests that do so share this instead of each spelling the shifts.

/// Marsaglia's xorshift64. Only for tests: nothing an attacker sees may
/// come from it.
pub(crate) struct XorShift(u64);

impl XorShift {
    /// A generator starting from `seed`, which must not be zero (zero
    /// stays zero).
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next value of the sequence.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }

    /// A value below `n` (`n` > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
