//! What one pool socket carries, as the pool's choice of a socket sees it.
//!
//! A new flow may take a socket only if neither its client endpoint nor
//! its remote is on it already. Both were asked elsewhere before: the
//! client in one set of (client, socket) fingerprints for the whole pool,
//! the remote in the socket's own map of flows. At 1,000,000 flows the
//! first is a million-entry set, and its look-up was a cache miss for every
//! new flow (56 % of `Pools::lease`'s samples in the flows bench); the
//! second sits behind the socket's mutex, which the socket's reader takes
//! for every reply from the other CPU, so locking it (three times a new
//! flow: the look, the take, the attach) was where `State::assign` spent
//! 92 % of its samples.
//!
//! So each socket's clients and remotes are kept here, beside the pool's
//! list of sockets and under the pool's lock only: a new flow asks the one
//! socket at its remote's place (see `pool_order`), whose set the flows
//! before it have just used (the bench fills a socket with 256 flows in a
//! row), and takes it without touching the reader's mutex. The reader's
//! map of flows by remote is written only when the flow is attached and
//! when it ends.
//!
//! Both are kept as 32-bit fingerprints, seeded per pool. A socket carries
//! at most a few hundred flows (one per remote): a new flow's two
//! fingerprints match one of a socket's 512 entries about once in four
//! million looks, and the flow is then refused there as if taken and goes
//! to another socket: a collision costs a choice, never a mapping.

use std::collections::HashSet;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher as _};
use std::net::SocketAddr;
use std::time::Instant;

use super::key::hash_addr;

/// A flow's two fingerprints: its client endpoint's and its remote's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    client: u32,
    remote: u32,
}

/// Makes [`Marks`]; seeded per pool, so not guessable from outside.
#[derive(Debug, Default)]
pub struct Fingerprints {
    seed: foldhash::fast::RandomState,
}

impl Fingerprints {
    /// The marks of a flow from `client` to `remote`: one hash each, once
    /// per lease (the set is the socket's, so the socket is not hashed in).
    pub fn of(&self, client: SocketAddr, remote: SocketAddr) -> Marks {
        let mark = |addr: &SocketAddr, side: u8| {
            let mut h = self.seed.build_hasher();
            h.write_u8(side);
            hash_addr(addr, &mut h);
            let v = h.finish();
            (v ^ (v >> 32)) as u32
        };
        Marks {
            client: mark(&client, 0),
            remote: mark(&remote, 1),
        }
    }
}

/// Spreads a 32-bit fingerprint over 64 bits: the set's table takes its
/// control byte from the top bits of the hash, which would all be zero.
#[derive(Debug, Default)]
pub struct Spread(u64);

impl std::hash::Hasher for Spread {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// One socket's clients and remotes, and since when it carries no flow.
#[derive(Debug)]
pub struct Taken {
    marks: HashSet<u32, BuildHasherDefault<Spread>>,
    /// Flows on the socket (the set may hold fewer marks: a flow whose two
    /// marks are equal holds one).
    flows: usize,
    idle_since: Option<Instant>,
}

impl Taken {
    /// A new socket's: no flow, and not idle (it is opened for one).
    pub fn new() -> Self {
        Taken {
            marks: HashSet::default(),
            flows: 0,
            idle_since: None,
        }
    }

    /// Whether the flow's client and remote are both absent.
    pub fn free_for(&self, m: Marks) -> bool {
        !self.marks.contains(&m.remote) && !self.marks.contains(&m.client)
    }

    /// Whether the flow's remote (or a fingerprint like it) is on it.
    pub fn has_remote(&self, m: Marks) -> bool {
        self.marks.contains(&m.remote)
    }

    /// Whether the flow's client endpoint (or one like it) is on it.
    pub fn has_client(&self, m: Marks) -> bool {
        self.marks.contains(&m.client)
    }

    /// The flow takes the socket (checked [`Taken::free_for`] first, or
    /// the socket is new).
    pub fn take(&mut self, m: Marks) {
        self.marks.insert(m.client);
        self.marks.insert(m.remote);
        self.flows += 1;
        self.idle_since = None;
    }

    /// The flow gives the socket back; `now` is asked only if it was the
    /// socket's last.
    pub fn give_back(&mut self, m: Marks, now: impl FnOnce() -> Instant) {
        self.marks.remove(&m.client);
        self.marks.remove(&m.remote);
        self.flows = self.flows.saturating_sub(1);
        if self.flows == 0 {
            self.idle_since = Some(now());
        }
    }

    /// Since when the socket has carried no flow, if it carries none.
    pub fn idle_since(&self) -> Option<Instant> {
        self.idle_since
    }

    /// Flows on the socket.
    #[cfg(test)]
    pub fn flows(&self) -> usize {
        self.flows
    }
}

impl Default for Taken {
    fn default() -> Self {
        Taken::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_socket_refuses_a_client_or_a_remote_it_carries_and_frees_them() {
        let f = Fingerprints::default();
        let (c1, c2) = (sa("192.0.2.10:5000"), sa("192.0.2.10:5001"));
        let (r1, r2) = (sa("198.51.100.7:7000"), sa("[2001:db8::7]:7000"));
        let mut t = Taken::new();
        assert!(t.free_for(f.of(c1, r1)));
        t.take(f.of(c1, r1));
        assert_eq!(t.flows(), 1);
        assert!(!t.free_for(f.of(c1, r2)), "the client is on it");
        assert!(!t.free_for(f.of(c2, r1)), "the remote is on it");
        assert!(t.has_client(f.of(c1, r2)) && !t.has_remote(f.of(c1, r2)));
        assert!(t.has_remote(f.of(c2, r1)) && !t.has_client(f.of(c2, r1)));
        assert!(t.free_for(f.of(c2, r2)));
        t.take(f.of(c2, r2));
        t.give_back(f.of(c1, r1), || panic!("not the last flow"));
        assert!(t.idle_since().is_none());
        assert!(t.free_for(f.of(c1, r1)));
        assert!(!t.free_for(f.of(c1, r2)));
        let then = Instant::now();
        t.give_back(f.of(c2, r2), || then);
        assert_eq!((t.flows(), t.idle_since()), (0, Some(then)));
        assert!(t.marks.is_empty());
        t.take(f.of(c1, r1));
        assert!(t.idle_since().is_none(), "in use again");
    }

    #[test]
    fn a_client_and_a_remote_with_the_same_address_are_told_apart() {
        // A client endpoint may be a remote's address too (a flow between
        // two clients of the gateway): the side is hashed in.
        let f = Fingerprints::default();
        let a = sa("192.0.2.10:5000");
        let m = f.of(a, a);
        assert_ne!(m.client, m.remote);
        let mut t = Taken::new();
        t.take(f.of(a, sa("198.51.100.7:7000")));
        assert!(t.free_for(f.of(sa("192.0.2.11:5000"), a)));
    }

    #[test]
    fn marks_are_seeded_per_pool() {
        let (c, r) = (sa("192.0.2.10:5000"), sa("198.51.100.7:7000"));
        let (f, g) = (Fingerprints::default(), Fingerprints::default());
        assert_eq!(f.of(c, r), f.of(c, r));
        // Two seeds agree on one address with odds of 2^-32.
        assert_ne!(f.of(c, r), g.of(c, r));
    }
}
