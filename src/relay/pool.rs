//! Upstream sockets shared by one-destination (symmetric) flows.
//!
//! A socket per flow makes descriptors, not memory, the limit of a busy
//! gateway. Here flows to *different* destinations share an upstream
//! socket: a reply from R on socket i belongs to the one flow that socket i
//! carries to R. One client endpoint's flows never share a socket, so each
//! destination sees that client behind its own mapping, as a symmetric NAT
//! promises; a remote with no flow on a socket is dropped by its reader, as
//! a symmetric NAT's filtering requires.
//!
//! This module only allocates: it knows nothing of sessions (a socket's
//! occupants are any `F`) and spawns nothing. A lease says whether its
//! socket is new, and whoever asked has it read, and lets go of it once it
//! is [retired](PoolSocket::is_retired).
//!
//! Choosing a socket costs O(1): the socket at the remote's place in the
//! pool's order is tried first (see [`super::pool_order`]: a remote fills
//! the sockets in order, so that one is mostly free for it), then the
//! socket taken last, sockets given back lately and a bounded number of
//! random ones; if none fits (free for this client *and* this remote) a
//! new socket is opened, outside the lock, if the descriptor budget
//! allows. A pool thus holds about as many sockets as its busiest client
//! endpoint or destination has flows. A flow costs two 4-byte fingerprints
//! (client and remote) in its socket's set (see [`super::pool_taken`]) and
//! one entry in its socket's map of remotes, and nothing else here: its
//! lease is two words and an address inside the flow. Choosing takes only
//! the pool's lock; the socket's own (shared with its reader) is taken when
//! the flow is attached and when it ends.
//!
//! A flood leaves many sockets behind when its flows end. A socket that
//! has carried no flow for a grace period is closed
//! ([`Pools::close_idle`]), so the pool shrinks back with the traffic.
//!
//! Pools are kept per (family, mark, device), because interface rules bind
//! their sockets differently.
//!
//! Some flows must not share: a pool socket's port is seen by every server
//! its flows talk to, and a remote's first flow always takes the pool's
//! first socket, so one datagram to a server of one's own tells anyone the
//! port the next flow to any other remote leaves from. A DNS query's
//! source port is half of what keeps an off-path spoofer from answering it
//! (RFC 5452). [`Pools::own`] gives such a flow a socket of its own: bound
//! to a port the kernel picks at random, connected to the remote (the
//! kernel hands it nothing from anyone else), read by the same readers and
//! closed when the flow ends. It is never in a pool's list, so no other
//! flow can take it and the choice above never looks at it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::net::UdpSocket;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::budget::{FdShare, Permit};
use super::key::AddrKey;
use super::pool_order::{Next, Order};
use super::pool_taken::{Fingerprints, Marks, Taken};
use crate::net::sockets;
use crate::sync::lock;

/// Indexes tried before a new socket is opened: all of them in a small
/// pool, this many random ones in a big one (where, with a quarter of the
/// sockets free for a flow, all miss once in ten thousand).
const PROBES: usize = 32;
/// Recently freed sockets tried first, and how many are remembered.
const FREED_TRIED: usize = 8;
const FREED_KEPT: usize = 4_096;
/// Positions a remote's order is followed before the search: past a
/// socket the remote is on already (placed there by the search), the next
/// is tried, up to this many.
const ORDER_STEPS: usize = 4;

/// Fast, seeded per process: the keys are addresses a client chooses.
type Hasher = foldhash::fast::RandomState;

/// What the pool needs to know of a flow on one of its sockets.
pub trait Occupant {
    /// The client endpoint the flow belongs to.
    fn client(&self) -> SocketAddr;
}

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("descriptor budget for flow sockets used up")]
    Budget,
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// What sockets of one pool have in common.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub v6: bool,
    pub mark: u32,
    pub device: Option<String>,
}

/// All pools, drawing descriptors from one share of the budget.
#[derive(Debug)]
pub struct Pools<F> {
    /// Hashed with foldhash like the rest: every new flow looks its pool
    /// up here (SipHash showed in a profile of the flows bench).
    pools: Mutex<HashMap<PoolKey, Arc<Pool<F>>, Hasher>>,
    share: Arc<FdShare>,
    receive_buffer: usize,
    /// Sockets of their own whose flows have ended, until their readers
    /// let go of them (see [`Pools::take_closed_own`]).
    closed_own: Arc<ClosedOwn<F>>,
}

/// Sockets of their own closed by their flows, shared by every pool.
type ClosedOwn<F> = Mutex<Vec<Arc<PoolSocket<F>>>>;

impl<F> Pools<F> {
    /// Pools whose sockets get receive buffers of `receive_buffer` bytes.
    ///
    /// A pool socket carries the replies of many flows, and a server
    /// streaming towards a client fills it faster than a listener's: with
    /// the kernel's default (~208 KiB) a reverse-direction bulk flow
    /// overflowed it whenever the reader was scheduled late (27 % of
    /// `iperf3 -R` lost in the gateway's `UdpRcvbufErrors`). The size is a
    /// ceiling, not an allocation: memory is used only by datagrams
    /// actually queued, and the kernel's `udp_mem` bounds all of them.
    pub fn new(share: Arc<FdShare>, receive_buffer: usize) -> Self {
        Pools {
            pools: Mutex::new(HashMap::default()),
            share,
            receive_buffer,
            closed_own: Arc::default(),
        }
    }

    /// A socket of pool `key` free for a flow from `client` to `remote`,
    /// and whether it was opened for this lease (nobody reads it yet).
    pub fn lease(&self, key: PoolKey, client: SocketAddr, remote: SocketAddr) -> Result<(Lease<F>, bool), PoolError> {
        self.pool(key).lease(client, remote, &self.share, self.receive_buffer)
    }

    /// When no socket can be had for a flow from `client` to `remote` and
    /// no new one may be opened: the flows whose end would free a socket
    /// for it. Of a bounded number of sockets looked at, the one whose
    /// blockers were active least recently (`last_active`) wins. Ending
    /// them is the caller's business (they belong to the table).
    pub fn in_the_way(
        &self,
        key: &PoolKey,
        client: SocketAddr,
        remote: SocketAddr,
        last_active: impl Fn(&F) -> u64,
    ) -> Vec<Arc<F>>
    where
        F: Occupant,
    {
        let Some(pool) = lock(&self.pools).get(key).cloned() else {
            return Vec::new();
        };
        let mut state = lock(&pool.state);
        let n = state.sockets.len();
        if n == 0 {
            return Vec::new();
        }
        let candidates: Vec<usize> = if n <= PROBES {
            (0..n).collect()
        } else {
            (0..PROBES).map(|_| state.random_index()).collect()
        };
        candidates
            .into_iter()
            .map(|i| state.blockers(i, client, remote))
            .min_by_key(|b| b.iter().map(|f| last_active(f)).max().unwrap_or(0))
            .unwrap_or_default()
    }

    /// A socket of its own for a flow to `remote` (see the module doc),
    /// with the settings of pool `key`'s sockets; always new, so whoever
    /// asked has it read. Its descriptor comes from the same budget.
    pub fn own(&self, key: PoolKey, remote: SocketAddr) -> Result<Lease<F>, PoolError> {
        let pool = self.pool(key);
        let permit = self.share.try_take().ok_or(PoolError::Budget)?;
        let std = sockets::flow_upstream(remote, None, pool.key.mark, pool.key.device.as_deref())?;
        sockets::report_errors(&std, remote.is_ipv6())?;
        sockets::set_udp_receive_buffer(&std, self.receive_buffer);
        // Bound above to a port the kernel chose (at random in the local
        // port range); connected, the kernel drops whatever another
        // address sends to it before it is queued.
        std.connect(remote)?;
        let socket = Arc::new(PoolSocket {
            socket: std,
            id: OWN_ID,
            pos: AtomicUsize::new(usize::MAX),
            flows: Mutex::new(Flows { map: Remotes::None }),
            retired: AtomicBool::new(false),
            own: true,
            watched: AtomicU64::new(NOT_WATCHED),
            pool: Arc::downgrade(&pool),
            _permit: permit,
        });
        pool.own_open.fetch_add(1, Ordering::Relaxed);
        Ok(pool.lease_of(socket, remote))
    }

    /// Pool `key`, made if it is new.
    fn pool(&self, key: PoolKey) -> Arc<Pool<F>> {
        let mut pools = lock(&self.pools);
        match pools.get(&key) {
            Some(pool) => pool.clone(),
            // The key is cloned (its device name) only for a new pool.
            None => pools
                .entry(key.clone())
                .or_insert_with(|| Arc::new(Pool::new(key, self.closed_own.clone())))
                .clone(),
        }
    }

    /// Shared sockets open across all pools.
    pub fn sockets(&self) -> usize {
        lock(&self.pools).values().map(|p| lock(&p.state).sockets.len()).sum()
    }

    /// The sockets of their own whose flows have ended since the last call:
    /// each stays open, and its descriptor counted, until its reader lets
    /// go of it. Asked before a new one is opened and by the sweeper, so
    /// that a descriptor a flow gave back is soon there for the next.
    pub fn take_closed_own(&self) -> Vec<Arc<PoolSocket<F>>> {
        let mut closed = lock(&self.closed_own);
        if closed.is_empty() {
            return Vec::new();
        }
        std::mem::take(&mut *closed)
    }

    /// Sockets of their own open for flows (see [`Pools::own`]).
    pub fn own_sockets(&self) -> usize {
        lock(&self.pools)
            .values()
            .map(|p| p.own_open.load(Ordering::Relaxed))
            .sum()
    }

    /// Closes the sockets that have carried no flow for `grace` or longer;
    /// returns how many. Each is closed, and its descriptor goes back to
    /// the budget, once its reader lets go of it too (see
    /// [`PoolSocket::is_retired`]).
    pub fn close_idle(&self, grace: Duration) -> usize {
        let pools: Vec<Arc<Pool<F>>> = lock(&self.pools).values().cloned().collect();
        let Some(cutoff) = Instant::now().checked_sub(grace) else {
            return 0;
        };
        let mut closed = Vec::new();
        for pool in pools {
            let mut state = lock(&pool.state);
            let mut i = 0;
            while i < state.sockets.len() {
                let idle = state.taken[i].idle_since().is_some_and(|t| t <= cutoff);
                if idle {
                    closed.push(state.remove(i));
                } else {
                    i += 1;
                }
            }
        }
        for socket in &closed {
            socket.retire();
        }
        closed.len()
    }
}

/// The id of every socket of its own (ids tell pool sockets apart).
const OWN_ID: u32 = u32::MAX;

#[derive(Debug)]
struct Pool<F> {
    key: PoolKey,
    state: Mutex<State<F>>,
    /// Sockets of their own open with this pool's settings.
    own_open: AtomicUsize,
    /// Where their flows leave them when they end (the [`Pools`]' list).
    closed_own: Arc<ClosedOwn<F>>,
}

/// The sockets of a pool and which clients and remotes each carries.
///
/// The (client, socket) and (socket, remote) pairs taken are kept per
/// socket as fingerprints, under this state's lock alone (see
/// [`super::pool_taken`]): the socket's map of flows by remote is its
/// reader's, and is written only when a flow is attached or ends.
///
/// Lock order: a pool's `state`, then a socket's `flows`.
#[derive(Debug)]
struct State<F> {
    /// Open sockets; each knows its position ([`PoolSocket::pos`]).
    sockets: Vec<Arc<PoolSocket<F>>>,
    /// What the socket at the same position carries.
    taken: Vec<Taken>,
    /// Per remote, the position its next flow tries first.
    order: Order,
    /// Makes the flows' fingerprints (per pool, so not guessable).
    fingerprints: Fingerprints,
    /// Sockets given back lately, newest last; the oldest are forgotten.
    freed: VecDeque<Weak<PoolSocket<F>>>,
    /// The socket taken last, tried first: new flows that arrive together
    /// then mostly share a socket, and their datagrams leave in one
    /// `sendmmsg` (see `relay::upstream_batch`).
    last: Weak<PoolSocket<F>>,
    /// The client endpoint whose last lease found no socket and got a new
    /// one, with the pool's size after that and [`State::gives`] then.
    /// While both are unchanged, no socket has become free for that client
    /// since (its own new sockets carry it), so its next lease skips the
    /// search. One socket talking to thousands of destinations (a P2P
    /// client, a scan) otherwise paid [`PROBES`] failed probes for every
    /// new flow, 3 % of the relay's CPU in the 20,000-destination flood.
    hopeless: Option<(SocketAddr, usize, u64)>,
    /// The last search that found nothing: client, pool size, `gives`.
    missed: Option<(SocketAddr, usize, u64)>,
    /// Leases given back so far (each may free a socket for someone).
    gives: u64,
    /// Sockets looked at for a flow, all told (for tests and profiles).
    probes: u64,
    next_id: u32,
    rng: u64,
}

impl<F> State<F> {
    fn new() -> Self {
        State {
            sockets: Vec::new(),
            taken: Vec::new(),
            order: Order::default(),
            fingerprints: Fingerprints::default(),
            freed: VecDeque::new(),
            last: Weak::new(),
            hopeless: None,
            missed: None,
            gives: 0,
            probes: 0,
            next_id: 0,
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    /// Whether the socket at `pos` is free for the flow marked `m`.
    fn fits(&self, pos: usize, m: Marks) -> bool {
        self.taken.get(pos).is_some_and(|t| t.free_for(m))
    }

    /// The position of an open socket free for the flow (`m` its marks,
    /// `remote` its remote), in O(1).
    fn choose(&mut self, client: SocketAddr, remote: SocketAddr, m: Marks) -> Option<usize> {
        let mut probes = 0;
        let found = self.search(client, remote, m, &mut probes);
        self.probes += probes;
        if found.is_none() {
            self.missed = Some((client, self.sockets.len(), self.gives));
        }
        found
    }

    fn search(&mut self, client: SocketAddr, remote: SocketAddr, m: Marks, probes: &mut u64) -> Option<usize> {
        match self.in_order(remote, m, probes) {
            Next::At(pos) => return Some(pos),
            // The remote is on every socket: none is free for it.
            Next::New => return None,
            Next::Unknown => {}
        }
        // A socket that has left the pool (retired) has no position.
        if let Some(pos) = self.last.upgrade().and_then(|s| self.position(&s)) {
            *probes += 1;
            if self.fits(pos, m) {
                return Some(pos);
            }
        }
        let recent = self.freed.len().saturating_sub(FREED_TRIED);
        for i in (recent..self.freed.len()).rev() {
            let Some(socket) = self.freed[i].upgrade() else {
                self.freed.remove(i);
                continue;
            };
            *probes += 1;
            if let Some(pos) = self.position(&socket)
                && self.fits(pos, m)
            {
                self.freed.remove(i);
                return Some(pos);
            }
        }
        let n = self.sockets.len();
        if self.hopeless == Some((client, n, self.gives)) {
            return None;
        }
        if n <= PROBES {
            *probes += n as u64;
            return (0..n).find(|&pos| self.fits(pos, m));
        }
        for _ in 0..PROBES {
            let pos = self.random_index();
            *probes += 1;
            if self.fits(pos, m) {
                return Some(pos);
            }
        }
        None
    }

    /// The position of the socket at `remote`'s place in the pool's order
    /// if it is free for the flow, or [`Next::New`] if the remote is on
    /// every socket; [`Next::Unknown`] sends the flow to the search. Places
    /// the remote is on already (the search put it there) are stepped over
    /// for good; one the client is on is left for the remote's next flow,
    /// and this one is searched for.
    fn in_order(&mut self, remote: SocketAddr, m: Marks, probes: &mut u64) -> Next {
        for _ in 0..ORDER_STEPS {
            let pos = match self.order.next(remote, self.sockets.len()) {
                Next::At(pos) => pos,
                other => return other,
            };
            let Some(taken) = self.taken.get(pos) else {
                return Next::Unknown;
            };
            *probes += 1;
            if taken.has_remote(m) {
                self.order.skip(remote, pos);
                continue;
            }
            if taken.has_client(m) {
                return Next::Unknown;
            }
            return Next::At(pos);
        }
        Next::Unknown
    }

    /// Where `socket` is in the pool, if it is still there.
    fn position(&self, socket: &Arc<PoolSocket<F>>) -> Option<usize> {
        let pos = socket.pos.load(Ordering::Relaxed);
        self.sockets
            .get(pos)
            .is_some_and(|s| Arc::ptr_eq(s, socket))
            .then_some(pos)
    }

    /// A random open socket's position (splitmix64: cheap, and spreads
    /// flows over the sockets). The pool must not be empty.
    fn random_index(&mut self) -> usize {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % (self.sockets.len().max(1) as u64)) as usize
    }

    /// The flows that keep (`client`, `remote`) off the socket at position
    /// `i`: the client's own flow there and the flow to `remote` there.
    fn blockers(&self, i: usize, client: SocketAddr, remote: SocketAddr) -> Vec<Arc<F>>
    where
        F: Occupant,
    {
        let (Some(socket), Some(taken)) = (self.sockets.get(i), self.taken.get(i)) else {
            return Vec::new();
        };
        let m = self.fingerprints.of(client, remote);
        let flows = lock(&socket.flows);
        // The client's own flow there: only a fingerprint is kept, so look
        // for it among the socket's flows (a rare path: the budget is out).
        let mine = if taken.has_client(m) {
            flows.map.flows().find(|f| f.client() == client)
        } else {
            None
        };
        let theirs = flows.map.get(&remote).and_then(Weak::upgrade);
        mine.into_iter().chain(theirs).collect()
    }

    /// Takes the flow (`m`, `remote`) on the socket at `pos`; the flow is
    /// filled in by [`Lease::attach`]. The socket's own lock is not taken:
    /// its reader finds no flow for `remote` until then, as it would for a
    /// datagram that came before the flow.
    fn assign(&mut self, pos: usize, remote: SocketAddr, m: Marks) -> Option<Arc<PoolSocket<F>>> {
        let socket = self.sockets.get(pos)?.clone();
        self.last = Arc::downgrade(&socket);
        self.order.taken(remote, pos);
        self.taken.get_mut(pos)?.take(m);
        Some(socket)
    }

    fn give_back(&mut self, socket: &Arc<PoolSocket<F>>, client: SocketAddr, remote: SocketAddr) {
        self.gives += 1;
        let pos = self.position(socket);
        self.order.given_back(remote, pos.unwrap_or(usize::MAX));
        if let Some(taken) = pos.and_then(|pos| self.taken.get_mut(pos)) {
            taken.give_back(self.fingerprints.of(client, remote), Instant::now);
        }
        lock(&socket.flows).map.remove(&remote);
        if self.freed.len() >= FREED_KEPT {
            self.freed.pop_front();
        }
        self.freed.push_back(Arc::downgrade(socket));
    }

    /// Takes the socket at position `i` out of the pool; the last one takes
    /// its place. The remotes' order holds: the socket carries no flow, so
    /// every remote's place is at or before `i` (see `pool_order`).
    fn remove(&mut self, i: usize) -> Arc<PoolSocket<F>> {
        self.taken.swap_remove(i);
        let gone = self.sockets.swap_remove(i);
        if let Some(moved) = self.sockets.get(i) {
            moved.pos.store(i, Ordering::Relaxed);
        }
        gone
    }
}

impl<F> Pool<F> {
    fn new(key: PoolKey, closed_own: Arc<ClosedOwn<F>>) -> Pool<F> {
        Pool {
            key,
            state: Mutex::new(State::new()),
            own_open: AtomicUsize::new(0),
            closed_own,
        }
    }

    fn lease(
        self: &Arc<Self>,
        client: SocketAddr,
        remote: SocketAddr,
        share: &Arc<FdShare>,
        receive_buffer: usize,
    ) -> Result<(Lease<F>, bool), PoolError> {
        let m = {
            let mut state = lock(&self.state);
            // Hashed once per lease: the marks do not depend on the socket.
            let m = state.fingerprints.of(client, remote);
            if let Some(socket) = state
                .choose(client, remote, m)
                .and_then(|pos| state.assign(pos, remote, m))
            {
                return Ok((self.lease_of(socket, remote), false));
            }
            m
        };
        // A new socket, opened without holding the lock: other flows keep
        // choosing sockets meanwhile.
        let permit = share.try_take().ok_or(PoolError::Budget)?;
        let std = sockets::flow_upstream(remote, None, self.key.mark, self.key.device.as_deref())?;
        sockets::report_errors(&std, remote.is_ipv6())?;
        // One socket carries many clients' replies: room for one client's
        // burst without dropping another's (the default, about 208 KB,
        // overflowed under a single bulk download).
        sockets::set_udp_receive_buffer(&std, receive_buffer);
        let mut state = lock(&self.state);
        let id = state.next_id;
        state.next_id = state.next_id.wrapping_add(1);
        let pos = state.sockets.len();
        let socket = Arc::new(PoolSocket {
            // Read through the relay's poller, not the runtime's: see
            // `relay::inbound`.
            socket: std,
            id,
            pos: AtomicUsize::new(pos),
            flows: Mutex::new(Flows { map: Remotes::None }),
            retired: AtomicBool::new(false),
            own: false,
            watched: AtomicU64::new(NOT_WATCHED),
            pool: Arc::downgrade(self),
            _permit: permit,
        });
        // Remembered only if nothing changed while the lock was let go.
        if state.missed == Some((client, pos, state.gives)) {
            state.hopeless = Some((client, pos + 1, state.gives));
        }
        state.sockets.push(socket.clone());
        state.taken.push(Taken::new());
        state.assign(pos, remote, m);
        Ok((self.lease_of(socket, remote), true))
    }
    fn lease_of(&self, socket: Arc<PoolSocket<F>>, remote: SocketAddr) -> Lease<F> {
        Lease { socket, remote }
    }
}

/// The flows one socket carries, for its reader (whether it carries any,
/// and since when, the pool keeps in [`Taken`]).
#[derive(Debug)]
struct Flows<F> {
    /// Remote → its flow on this socket.
    map: Remotes<F>,
}

/// A socket's flows by remote. Most sockets of a pool that grew for one
/// busy client endpoint carry a single flow each: that one is kept inline,
/// a map (about 190 bytes for its first entry) only from the second on.
#[derive(Debug)]
enum Remotes<F> {
    None,
    One(SocketAddr, Weak<F>),
    Many(HashMap<AddrKey, Weak<F>, Hasher>),
}

impl<F> Remotes<F> {
    fn get(&self, remote: &SocketAddr) -> Option<&Weak<F>> {
        match self {
            Remotes::None => None,
            Remotes::One(r, f) => (r == remote).then_some(f),
            Remotes::Many(m) => m.get(&AddrKey(*remote)),
        }
    }

    #[cfg(test)]
    fn contains_key(&self, remote: &SocketAddr) -> bool {
        self.get(remote).is_some()
    }

    fn insert(&mut self, remote: SocketAddr, flow: Weak<F>) {
        match self {
            Remotes::None => *self = Remotes::One(remote, flow),
            Remotes::One(r, f) if *r == remote => *f = flow,
            Remotes::One(..) => {
                let Remotes::One(r, f) = std::mem::replace(self, Remotes::None) else {
                    return;
                };
                let mut m = HashMap::with_capacity_and_hasher(2, Hasher::default());
                m.insert(AddrKey(r), f);
                m.insert(AddrKey(remote), flow);
                *self = Remotes::Many(m);
            }
            Remotes::Many(m) => {
                m.insert(AddrKey(remote), flow);
            }
        }
    }

    fn remove(&mut self, remote: &SocketAddr) {
        match self {
            Remotes::One(r, _) if r == remote => *self = Remotes::None,
            Remotes::Many(m) => {
                m.remove(&AddrKey(*remote));
                if m.is_empty() {
                    *self = Remotes::None;
                }
            }
            _ => {}
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        matches!(self, Remotes::None)
    }

    /// The live flows.
    fn flows(&self) -> impl Iterator<Item = Arc<F>> + '_ {
        let (one, many) = match self {
            Remotes::None => (None, None),
            Remotes::One(_, f) => (Some(f), None),
            Remotes::Many(m) => (None, Some(m.values())),
        };
        one.into_iter()
            .chain(many.into_iter().flatten())
            .filter_map(Weak::upgrade)
    }
}

/// One shared upstream socket and the flows it carries, by remote.
#[derive(Debug)]
pub struct PoolSocket<F> {
    pub socket: UdpSocket,
    /// Names the socket (in tests and debug output); never reused while
    /// it is open.
    #[cfg_attr(not(test), allow(dead_code))]
    id: u32,
    /// Its position among the pool's sockets (written under the pool's
    /// lock; stale once it has left the pool).
    pos: AtomicUsize,
    flows: Mutex<Flows<F>>,
    retired: AtomicBool,
    /// A socket of one flow's own, not in its pool's list (see
    /// [`Pools::own`]): closed when that flow ends.
    own: bool,
    /// Which reader watches it and in which slot (see
    /// `relay::pool_readers`), for letting go of it when it closes;
    /// [`NOT_WATCHED`] until then.
    watched: AtomicU64,
    /// The pool it belongs to, for giving a flow's place back. Weak, as
    /// the pool holds its sockets; and here, not in each lease: a lease
    /// lives in every pooled flow's session, a million of them, and the
    /// socket is shared by up to 256.
    pool: Weak<Pool<F>>,
    _permit: Permit,
}

/// [`PoolSocket::watched`] of a socket no reader watches.
const NOT_WATCHED: u64 = u64::MAX;

impl<F> PoolSocket<F> {
    /// The flow this socket carries to `remote`, if any.
    /// Whether this is a socket of one flow's own (see [`Pools::own`]):
    /// ending that flow gives its descriptor back.
    pub fn is_own(&self) -> bool {
        self.own
    }

    pub fn flow(&self, remote: SocketAddr) -> Option<Arc<F>> {
        lock(&self.flows).map.get(&remote).and_then(Weak::upgrade)
    }

    /// Whether the pool has closed this socket: its reader must let go of
    /// it then, for the descriptor to be released.
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn retire(&self) {
        self.retired.store(true, Ordering::Release);
    }

    /// Records that reader `reader` watches it in slot `token`.
    pub fn set_watched(&self, reader: u32, token: u32) {
        self.watched
            .store(u64::from(reader) << 32 | u64::from(token), Ordering::Release);
    }

    /// The reader watching it and its slot there, if any.
    pub fn watched(&self) -> Option<(usize, usize)> {
        let w = self.watched.load(Ordering::Acquire);
        (w != NOT_WATCHED).then_some(((w >> 32) as usize, (w & 0xffff_ffff) as usize))
    }
}

/// A flow's hold on (socket, remote). The flow gives it back with
/// [`Lease::release`] when it ends (the flow knows its client endpoint, so
/// the lease need not hold it too).
#[derive(Debug)]
pub struct Lease<F> {
    pub socket: Arc<PoolSocket<F>>,
    pub remote: SocketAddr,
}

impl<F> Lease<F> {
    /// Routes the socket's datagrams from the lease's remote to `flow`.
    pub fn attach(&self, flow: &Arc<F>) {
        lock(&self.socket.flows).map.insert(self.remote, Arc::downgrade(flow));
    }

    /// Gives (socket, remote) back; `client` is the endpoint it was leased
    /// for. A socket of its own is closed: used again, its port would be
    /// one more that is known.
    ///
    /// With its pool gone (the relay shutting down) there is nothing to
    /// give back to.
    pub fn release(&self, client: SocketAddr) {
        let pool = self.socket.pool.upgrade();
        if self.socket.own {
            lock(&self.socket.flows).map.remove(&self.remote);
            self.socket.retire();
            if let Some(pool) = pool {
                pool.own_open.fetch_sub(1, Ordering::Relaxed);
                lock(&pool.closed_own).push(self.socket.clone());
            }
            return;
        }
        if let Some(pool) = pool {
            lock(&pool.state).give_back(&self.socket, client, self.remote);
        }
    }

    /// The pool the lease's socket belongs to.
    #[cfg(test)]
    fn pool(&self) -> Arc<Pool<F>> {
        self.socket
            .pool
            .upgrade()
            .expect("the pool outlives its leases in tests")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn pools() -> Pools<()> {
        Pools::new(FdShare::new(10_000), 1 << 16)
    }

    fn key() -> PoolKey {
        PoolKey {
            v6: false,
            mark: 0,
            device: None,
        }
    }

    #[test]
    fn a_client_never_shares_a_socket_with_itself_nor_a_remote() {
        let p = pools();
        let (c1, c2) = (sa("192.0.2.10:5000"), sa("192.0.2.11:5000"));
        let (r1, r2) = (sa("127.0.0.7:7000"), sa("127.0.0.8:7000"));
        let (a, fresh) = p.lease(key(), c1, r1).unwrap();
        assert!(fresh);
        // c1 to another remote, c2 to the same remote: both need new sockets.
        let (b, fresh_b) = p.lease(key(), c1, r2).unwrap();
        assert!(fresh_b);
        assert_ne!(a.socket.id, b.socket.id);
        // c2 to r1: not on a's socket (r1 is there), but on b's.
        let (c, fresh_c) = p.lease(key(), c2, r1).unwrap();
        assert!(!fresh_c);
        assert_eq!(c.socket.id, b.socket.id);
        // c2 to r2: not on b's (c2 is there), but on a's.
        let (d, fresh_d) = p.lease(key(), c2, r2).unwrap();
        assert!(!fresh_d);
        assert_eq!(d.socket.id, a.socket.id);
        assert_eq!(p.sockets(), 2);
        for (l, c) in [(&a, c1), (&b, c1), (&c, c2), (&d, c2)] {
            l.release(c);
        }
        let pool = a.pool();
        let state = lock(&pool.state);
        assert!(state.taken.iter().all(|t| t.flows() == 0 && t.idle_since().is_some()));
        assert!(state.sockets.iter().all(|s| lock(&s.flows).map.is_empty()));
    }

    #[test]
    fn a_sockets_remotes_go_from_one_inline_to_a_map_and_back() {
        let flows: Vec<Arc<u32>> = (0..3).map(Arc::new).collect();
        let r = |i: u16| sa(&format!("198.51.100.7:{}", 7000 + i));
        let mut m: Remotes<u32> = Remotes::None;
        m.insert(r(0), Arc::downgrade(&flows[0]));
        assert!(matches!(m, Remotes::One(..)));
        m.insert(r(1), Arc::downgrade(&flows[1]));
        m.insert(r(2), Arc::downgrade(&flows[2]));
        assert!(matches!(m, Remotes::Many(..)));
        assert_eq!(m.get(&r(1)).and_then(Weak::upgrade).as_deref(), Some(&1));
        assert_eq!(m.flows().count(), 3);
        for i in [0, 2, 1] {
            assert!(!m.is_empty());
            m.remove(&r(i));
            assert!(!m.contains_key(&r(i)));
        }
        assert!(m.is_empty());
        m.insert(r(2), Arc::downgrade(&flows[2]));
        m.remove(&r(0)); // not there: nothing happens
        assert_eq!(m.flows().count(), 1);
    }

    #[test]
    fn given_back_sockets_are_tried_first() {
        let p = pools();
        let c = sa("192.0.2.10:5000");
        // 40 sockets, all used by c (more than PROBES, so choice is random).
        let leases: Vec<_> = (0..40)
            .map(|i| p.lease(key(), c, sa(&format!("127.0.0.1:{}", 1000 + i))).unwrap().0)
            .collect();
        assert_eq!(p.sockets(), 40);
        leases[17].release(c);
        let (again, fresh) = p.lease(key(), c, sa("127.0.0.2:9")).unwrap();
        assert!(!fresh);
        assert_eq!(again.socket.id, leases[17].socket.id);
    }

    #[test]
    fn a_client_on_every_socket_skips_the_search_until_one_is_given_back() {
        let p = pools();
        let (c, d) = (sa("192.0.2.10:5000"), sa("192.0.2.11:5000"));
        let remote = |i: u16| sa(&format!("198.51.100.7:{}", 1000 + i));
        // c on 40 sockets (more than PROBES): every search for c fails.
        let leases: Vec<_> = (0..40).map(|i| p.lease(key(), c, remote(i)).unwrap().0).collect();
        let probes = |l: &Lease<()>| lock(&l.pool().state).probes;
        let before = probes(&leases[0]);
        let (l41, fresh) = p.lease(key(), c, remote(40)).unwrap();
        assert!(fresh);
        assert!(
            probes(&l41) - before <= 1 + FREED_TRIED as u64,
            "{} probes for a client on every socket",
            probes(&l41) - before
        );
        // d takes a socket and gives it back: something may have become
        // free, so c's next lease searches again.
        let (ld, fresh_d) = p.lease(key(), d, remote(0)).unwrap();
        assert!(!fresh_d);
        ld.release(d);
        let before = probes(&l41);
        let (l42, fresh) = p.lease(key(), c, remote(41)).unwrap();
        assert!(fresh, "c is on every socket");
        assert!(probes(&l42) - before >= PROBES as u64);
        assert_eq!(p.sockets(), 42);
        // A socket c gave back is found again, search or not.
        leases[5].release(c);
        let (again, fresh) = p.lease(key(), c, remote(42)).unwrap();
        assert!(!fresh);
        assert_eq!(again.socket.id, leases[5].socket.id);
    }

    /// The flows bench's pattern: each flow a new client endpoint, the
    /// remotes in turn, a few flows late. Every remote fills the sockets
    /// in order, so a late flow finds the one socket still free for it.
    #[test]
    fn a_remote_fills_the_sockets_in_order_even_with_late_flows() {
        const REMOTES: usize = 64;
        const PER_REMOTE: usize = 40;
        let p = pools();
        let n = REMOTES * PER_REMOTE;
        let mut order: Vec<usize> = (0..n).filter(|i| i % 50 != 7).collect();
        for late in (0..n).filter(|i| i % 50 == 7) {
            order.insert((late + 700).min(order.len()), late);
        }
        let client = |i: usize| SocketAddr::from(([192, 0, 2, 1 + (i / 50_000) as u8], 1024 + (i % 50_000) as u16));
        let remote = |i: usize| SocketAddr::from(([198, 51, 100, 7], 7000 + (i % REMOTES) as u16));
        let leases: Vec<_> = order
            .iter()
            .map(|&i| p.lease(key(), client(i), remote(i)).unwrap().0)
            .collect();
        let probes = lock(&leases[0].pool().state).probes;
        assert_eq!(
            p.sockets(),
            PER_REMOTE,
            "the fewest sockets for {PER_REMOTE} flows a remote"
        );
        assert!(
            probes * 100 <= n as u64 * 125,
            "{probes} sockets looked at for {n} leases"
        );
    }

    /// A flow that ends leaves its socket to its remote's next flow, found
    /// in one look however many flows ended since.
    #[test]
    fn a_remotes_next_flow_takes_the_socket_its_last_one_gave_back() {
        let p = pools();
        let client = |i: usize| SocketAddr::from(([192, 0, 2, 10], 1024 + i as u16));
        let remote = |r: usize| SocketAddr::from(([198, 51, 100, 7], 7000 + r as u16));
        // 40 sockets (more than PROBES), 16 remotes on each.
        let leases: Vec<_> = (0..640)
            .map(|i| p.lease(key(), client(i), remote(i % 16)).unwrap().0)
            .collect();
        assert_eq!(p.sockets(), 40);
        // Remote 5's flow on socket 3 ends, then 30 flows of other remotes.
        let gone = 3 * 16 + 5;
        leases[gone].release(client(gone));
        for i in (0..30).map(|k| 16 * (10 + k) + 9) {
            leases[i].release(client(i));
        }
        let before = lock(&leases[0].pool().state).probes;
        let (again, fresh) = p.lease(key(), client(1000), remote(5)).unwrap();
        assert!(!fresh);
        assert_eq!(again.socket.id, leases[gone].socket.id);
        assert_eq!(lock(&again.pool().state).probes - before, 1);
    }

    /// However flows come and go and sockets close, no socket carries two
    /// flows of one client endpoint or two flows to one remote.
    #[test]
    fn no_socket_ever_carries_a_client_or_a_remote_twice() {
        let p = pools();
        let mut rng = crate::test_rng::XorShift::new(0x2545_F491_4F6C_DD1D);
        let mut next = |m: usize| rng.below(m);
        let mut live: Vec<(Lease<()>, SocketAddr)> = Vec::new();
        for step in 0..20_000 {
            if live.is_empty() || next(100) < 55 {
                let c = SocketAddr::from(([192, 0, 2, 10 + next(4) as u8], 5000 + next(12) as u16));
                let r = SocketAddr::from(([198, 51, 100, 7], 7000 + next(24) as u16));
                // Skip a flow that already exists: a flow is leased once.
                if live.iter().any(|(l, lc)| *lc == c && l.remote == r) {
                    continue;
                }
                live.push((p.lease(key(), c, r).unwrap().0, c));
            } else {
                let (l, c) = live.swap_remove(next(live.len()));
                l.release(c);
            }
            if step % 997 == 0 {
                p.close_idle(Duration::ZERO);
            }
            // What lets a remote on every socket by the order skip the
            // search: it is on every socket before its place.
            let pool = lock(&p.pools).values().next().cloned().unwrap();
            let state = lock(&pool.state);
            for (remote, next) in state.order.places() {
                let m = state.fingerprints.of(remote, remote);
                assert!(state.taken[..next].iter().all(|t| t.has_remote(m)));
            }
            assert_eq!(state.taken.len(), state.sockets.len());
            drop(state);
            let mut pairs = HashSet::new();
            for (l, c) in &live {
                assert!(!l.socket.is_retired());
                assert!(pairs.insert((l.socket.id, Ok(l.remote))), "a remote twice on a socket");
                assert!(pairs.insert((l.socket.id, Err(*c))), "a client twice on a socket");
            }
        }
    }

    /// A socket's reader locks its map of flows for every reply; choosing
    /// and taking a socket for a new flow must not wait for it (the pool
    /// keeps what each socket carries under its own lock).
    #[test]
    fn a_lease_does_not_wait_for_the_sockets_reader() {
        let p = Arc::new(pools());
        let remote = |i: u16| sa(&format!("198.51.100.7:{}", 7000 + i));
        let (first, _) = p.lease(key(), sa("192.0.2.10:5000"), remote(0)).unwrap();
        // The reader holds the socket's lock while the next flows are
        // leased: one to the same socket, one that cannot fit on it.
        let reading = lock(&first.socket.flows);
        let (tx, rx) = std::sync::mpsc::channel();
        let leaser = {
            let p = p.clone();
            std::thread::spawn(move || {
                let same = p
                    .lease(key(), sa("192.0.2.11:5000"), remote(1))
                    .map(|(l, fresh)| (l.socket.id, fresh));
                let other = p
                    .lease(key(), sa("192.0.2.12:5000"), remote(0))
                    .map(|(l, fresh)| (l.socket.id, fresh));
                let _ = tx.send((same.ok(), other.ok()));
            })
        };
        let got = rx.recv_timeout(Duration::from_secs(5));
        drop(reading);
        let _ = leaser.join();
        let (same, other) = got.expect("leases waited for the socket's reader");
        assert_eq!(same, Some((first.socket.id, false)));
        assert!(matches!(other, Some((id, true)) if id != first.socket.id));
    }

    /// What a socket carries is kept in the pool beside the socket; a
    /// socket that leaves the pool takes its own with it, and the one moved
    /// into its position keeps its own.
    #[test]
    fn what_each_socket_carries_moves_with_it_when_another_closes() {
        let p = pools();
        let c = |i: u16| SocketAddr::from(([192, 0, 2, 10], 5000 + i));
        let remote = |i: u16| SocketAddr::from(([198, 51, 100, 7], 7000 + i));
        // One client endpoint on three sockets, then another client's flow
        // to the first remote: on the second socket, its place.
        let leases: Vec<_> = (0..3).map(|i| p.lease(key(), c(0), remote(i)).unwrap().0).collect();
        let (extra, fresh) = p.lease(key(), c(1), remote(0)).unwrap();
        assert!(!fresh);
        assert_eq!(p.sockets(), 3);
        // The first socket empties and closes; the last moves into its place.
        leases[0].release(c(0));
        let moved = extra.socket.clone();
        assert_eq!(p.close_idle(Duration::ZERO), 1);
        let pool = extra.pool();
        let state = lock(&pool.state);
        assert_eq!(state.position(&moved), Some(1));
        assert_eq!(state.taken[1].flows(), 2);
        assert_eq!(
            state.position(&leases[2].socket),
            Some(0),
            "moved into the closed one's place"
        );
        assert_eq!(state.taken[0].flows(), 1);
        assert!(state.taken[0].has_remote(state.fingerprints.of(c(0), remote(2))));
        assert!(!state.taken[0].has_remote(state.fingerprints.of(c(0), remote(0))));
        drop(state);
        // c(0) is still on both sockets left: a new flow of it needs a third.
        let (l, fresh) = p.lease(key(), c(0), remote(9)).unwrap();
        assert!(fresh);
        l.release(c(0));
    }

    /// A flow on a socket of its own leaves from a port nobody else's
    /// flow shows, takes nothing from the pool's sockets, and its socket
    /// closes with it.
    #[test]
    fn a_socket_of_its_own_is_connected_never_shared_and_closed_with_its_flow() {
        let share = FdShare::new(10_000);
        let p: Pools<()> = Pools::new(share.clone(), 1 << 16);
        let remote = sa("127.0.0.7:7000");
        // A pooled flow to a stranger first: its socket is the pool's first.
        let (pooled, _) = p.lease(key(), sa("192.0.2.10:5000"), sa("127.0.0.8:9")).unwrap();
        let pooled_port = pooled.socket.socket.local_addr().unwrap().port();
        let own: Vec<_> = (0..20).map(|_| p.own(key(), remote).unwrap()).collect();
        let mut ports = HashSet::new();
        for l in &own {
            assert!(l.socket.own);
            assert_eq!(l.socket.socket.peer_addr().unwrap(), remote, "connected to its remote");
            ports.insert(l.socket.socket.local_addr().unwrap().port());
        }
        assert_eq!(ports.len(), 20, "one port a flow");
        assert!(!ports.contains(&pooled_port));
        assert_eq!((p.sockets(), p.own_sockets(), share.held()), (1, 20, 21));
        // A pooled flow to the same remote does not land on one of them.
        let (next, fresh) = p.lease(key(), sa("192.0.2.11:5000"), remote).unwrap();
        assert!(!fresh);
        assert_eq!(next.socket.id, pooled.socket.id);
        let flow = Arc::new(());
        own[0].attach(&flow);
        assert!(own[0].socket.flow(remote).is_some());
        let kept = own[0].socket.clone();
        for l in &own {
            l.release(sa("192.0.2.10:6000"));
        }
        assert!(kept.is_retired() && kept.flow(remote).is_none());
        assert_eq!(p.own_sockets(), 0);
        // Listed once, for their readers to let go of them.
        assert_eq!(p.close_idle(Duration::ZERO), 0, "not the pool's to close");
        assert_eq!(p.take_closed_own().len(), 20);
        assert!(p.take_closed_own().is_empty());
        drop((own, kept));
        assert_eq!(share.held(), 1, "the descriptors are back");
        // Out of budget: refused, as for a new pool socket.
        let tight: Pools<()> = Pools::new(FdShare::new(1), 1 << 16);
        let one = tight.own(key(), remote).unwrap();
        assert!(matches!(tight.own(key(), remote), Err(PoolError::Budget)));
        one.release(sa("192.0.2.10:6000"));
    }

    #[test]
    fn idle_sockets_close_after_the_grace() {
        let share = FdShare::new(10_000);
        let p: Pools<()> = Pools::new(share.clone(), 1 << 16);
        let c = sa("192.0.2.10:5000");
        let leases: Vec<_> = (0..5)
            .map(|i| p.lease(key(), c, sa(&format!("127.0.0.1:{}", 1000 + i))).unwrap().0)
            .collect();
        let reader = leases[0].socket.clone();
        assert_eq!(share.held(), 5);
        // In use: never closed, whatever the grace.
        assert_eq!(p.close_idle(Duration::ZERO), 0);
        for l in &leases[..3] {
            l.release(c);
        }
        // Idle, but not yet for a minute.
        assert_eq!(p.close_idle(Duration::from_secs(60)), 0);
        assert_eq!(p.close_idle(Duration::ZERO), 3);
        assert_eq!(p.sockets(), 2);
        assert!(reader.is_retired());
        assert!(!leases[4].socket.is_retired());
        drop((reader, leases));
        // The descriptors are back once nothing holds the sockets.
        assert_eq!(share.held(), 2);
        // The two left are still found, in their new positions.
        let state_len = p.sockets();
        assert_eq!(state_len, 2);
        let (l, fresh) = p.lease(key(), sa("192.0.2.11:1"), sa("127.0.0.1:1003")).unwrap();
        assert!(!fresh, "a socket still open is reused");
        l.release(sa("192.0.2.11:1"));
    }
}
