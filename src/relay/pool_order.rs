//! Where in a pool a remote's next flow looks first.
//!
//! A pool socket carries at most one flow per remote. If every remote
//! fills the pool's sockets in their order (its first flow on socket 0,
//! its second on socket 1, ...), a remote with `k` flows is on sockets
//! `0..k` and socket `k` is free for it: its next flow needs one look,
//! not a search, and the sockets fill as tightly as the busiest remote
//! allows. This is the relay floor's rule (`bench/floor.rs`). A random
//! search instead looked at 2.9 sockets per new flow at 1,000,000 flows
//! (12.5 % of the relay's samples there), and a flow that came late found
//! the one socket still free for it seldom enough that the pool opened
//! about 14 % more sockets than the floor.
//!
//! Here the order is kept per remote as the position its next flow tries,
//! and the pool still checks that the socket there is free for the flow's
//! client (searching as before when it is not). The remote is on every
//! socket before that position: a flow that ends moves it back to its
//! socket, if earlier; a flow placed elsewhere by the search is stepped
//! over when the position reaches it. Only sockets with no flow leave the
//! pool, and every remote's position is at or before such a socket, so the
//! one moved into its place changes no remote's prefix. So a remote whose
//! position is the pool's end is on every socket, and a new one is opened
//! without a search.
//!
//! A remote is remembered while it has flows in the pool, up to
//! [`REMOTES_KEPT`] remotes (a scan of a million destinations, one flow
//! each, needs no order and must not cost a million entries); the others
//! are placed by the search alone.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::key::AddrKey;

/// Remotes whose order is kept, per pool (about 40 bytes each).
pub const REMOTES_KEPT: usize = 65_536;

/// Fast, seeded per process: the keys are addresses a client chooses.
type Hasher = foldhash::fast::RandomState;

/// Where a remote's next flow goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// The remote is not in the order: the search places it.
    Unknown,
    /// The socket at this position (the remote is on every one before it).
    At(usize),
    /// A new socket: the remote is on every one.
    New,
}

/// One remote's place in its pool's order.
#[derive(Debug, Clone, Copy)]
struct Place {
    /// The position its next flow tries first.
    next: u32,
    /// Its flows in the pool that this entry has counted (it is dropped
    /// when they are all given back).
    flows: u32,
}

/// The positions remotes' next flows try first, in one pool.
#[derive(Debug)]
pub struct Order {
    places: HashMap<AddrKey, Place, Hasher>,
}

impl Default for Order {
    fn default() -> Self {
        Order {
            places: HashMap::with_hasher(Hasher::default()),
        }
    }
}

impl Order {
    /// Where `remote`'s next flow goes in a pool of `len` sockets.
    pub fn next(&self, remote: SocketAddr, len: usize) -> Next {
        match self.places.get(&AddrKey(remote)) {
            None => Next::Unknown,
            Some(place) if (place.next as usize) < len => Next::At(place.next as usize),
            Some(_) => Next::New,
        }
    }

    /// `remote` is on the socket at `pos` already (placed there by the
    /// search): its next flow looks past it.
    pub fn skip(&mut self, remote: SocketAddr, pos: usize) {
        if let Some(place) = self.places.get_mut(&AddrKey(remote))
            && place.next as usize == pos
        {
            place.next = place.next.saturating_add(1);
        }
    }

    /// A flow to `remote` took the socket at `pos`.
    pub fn taken(&mut self, remote: SocketAddr, pos: usize) {
        let kept = self.places.len() < REMOTES_KEPT;
        let place = match self.places.get_mut(&AddrKey(remote)) {
            Some(place) => place,
            None if kept => self
                .places
                .entry(AddrKey(remote))
                .or_insert(Place { next: 0, flows: 0 }),
            None => return,
        };
        place.flows = place.flows.saturating_add(1);
        if place.next as usize == pos {
            place.next = place.next.saturating_add(1);
        }
    }

    /// A flow to `remote` gave back the socket at `pos`: the remote's next
    /// flow takes that one, if it comes first in the order.
    pub fn given_back(&mut self, remote: SocketAddr, pos: usize) {
        let key = AddrKey(remote);
        let Some(place) = self.places.get_mut(&key) else {
            return;
        };
        // Counted from when the entry was made, so it may reach 0 with
        // flows left: they are placed by the search alone then.
        place.flows = place.flows.saturating_sub(1);
        if place.flows == 0 {
            self.places.remove(&key);
        } else if pos < place.next as usize {
            place.next = pos as u32;
        }
    }

    /// Each remote remembered and its place.
    #[cfg(test)]
    pub fn places(&self) -> impl Iterator<Item = (SocketAddr, usize)> + '_ {
        self.places.iter().map(|(r, p)| (r.0, p.next as usize))
    }

    /// Remotes remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.places.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(i: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 7], 7000 + i))
    }

    #[test]
    fn a_remote_fills_the_sockets_in_order_and_goes_back_to_one_given_back() {
        let mut o = Order::default();
        let r = remote(0);
        // Unknown: placed by the search.
        assert_eq!(o.next(r, 4), Next::Unknown);
        o.taken(r, 0);
        assert_eq!(o.next(r, 4), Next::At(1));
        o.taken(r, 1);
        o.taken(r, 2);
        o.taken(r, 3);
        // On all four: a new socket is its place.
        assert_eq!(o.next(r, 4), Next::New);
        assert_eq!(o.next(r, 5), Next::At(4));
        o.given_back(r, 1);
        assert_eq!(o.next(r, 5), Next::At(1));
        o.taken(r, 1);
        // Past 1, the next position is one it is on already (2): skipped.
        assert_eq!(o.next(r, 5), Next::At(2));
        o.skip(r, 2);
        o.skip(r, 3);
        assert_eq!(o.next(r, 5), Next::At(4));
        // A flow placed out of order elsewhere does not move the position.
        o.taken(r, 7);
        assert_eq!(o.next(r, 8), Next::At(4));
    }

    #[test]
    fn a_remote_is_forgotten_with_its_last_flow_and_few_are_kept() {
        let mut o = Order::default();
        o.taken(remote(0), 0);
        o.taken(remote(0), 1);
        o.given_back(remote(0), 0);
        assert_eq!(o.len(), 1);
        o.given_back(remote(0), 1);
        assert_eq!(o.len(), 0);
        // Giving back what was never counted changes nothing.
        o.given_back(remote(0), 1);
        assert_eq!(o.len(), 0);
        for i in 0..REMOTES_KEPT + 10 {
            let ip = std::net::Ipv6Addr::from(0x2001_0db8_u128 << 96 | i as u128);
            o.taken(SocketAddr::from((ip, 53)), 0);
        }
        assert_eq!(o.len(), REMOTES_KEPT);
    }
}
