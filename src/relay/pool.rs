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
//! socket is new, and whoever asked starts that socket's reader.
//!
//! Choosing a socket costs O(1): indexes given back lately are tried
//! first, then a bounded number of random ones; if none fits (free for this client *and*
//! this remote) a new socket is opened, outside the lock, if the descriptor
//! budget allows. A pool thus holds about as many sockets as its busiest
//! client or destination has flows, and a flow costs two small hash entries
//! here and one in its socket's map.
//!
//! Pools are kept per (family, mark, device), because interface rules bind
//! their sockets differently.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::net::UdpSocket;
use std::sync::{Arc, Mutex, Weak};

use super::budget::{FdShare, Permit};
use crate::net::sockets;
use crate::sync::lock;

/// Indexes tried before a new socket is opened: all of them in a small
/// pool, this many random ones in a big one (where, with a quarter of the
/// sockets free for a flow, all miss once in ten thousand).
const PROBES: usize = 32;
/// Recently freed indexes tried first, and how many are remembered.
const FREED_TRIED: usize = 8;
const FREED_KEPT: usize = 4_096;

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
    pools: Mutex<HashMap<PoolKey, Arc<Pool<F>>>>,
    share: Arc<FdShare>,
    receive_buffer: usize,
}

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
            pools: Mutex::new(HashMap::new()),
            share,
            receive_buffer,
        }
    }

    /// A socket of pool `key` free for a flow from `client` to `remote`.
    pub fn lease(&self, key: PoolKey, client: SocketAddr, remote: SocketAddr) -> Result<Lease<F>, PoolError> {
        let pool = lock(&self.pools)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Pool::new(key)))
            .clone();
        pool.lease(client, remote, &self.share, self.receive_buffer)
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
    ) -> Vec<Arc<F>> {
        let Some(pool) = lock(&self.pools).get(key).cloned() else {
            return Vec::new();
        };
        let mut state = lock(&pool.state);
        let n = state.sockets.len();
        if n == 0 {
            return Vec::new();
        }
        let candidates: Vec<u32> = if n <= PROBES {
            (0..n as u32).collect()
        } else {
            (0..PROBES).map(|_| state.random_index()).collect()
        };
        candidates
            .into_iter()
            .map(|i| state.blockers(i, client, remote))
            .min_by_key(|b| b.iter().map(|f| last_active(f)).max().unwrap_or(0))
            .unwrap_or_default()
    }

    /// Sockets open across all pools.
    pub fn sockets(&self) -> usize {
        lock(&self.pools).values().map(|p| lock(&p.state).sockets.len()).sum()
    }
}

#[derive(Debug)]
struct Pool<F> {
    key: PoolKey,
    state: Mutex<State<F>>,
}

/// The sockets of a pool and which (socket, remote) and (client, socket)
/// pairs are taken.
#[derive(Debug)]
struct State<F> {
    sockets: Vec<Arc<PoolSocket<F>>>,
    /// Per client endpoint: socket index → the remote it talks to there.
    by_client: HashMap<SocketAddr, HashMap<u32, SocketAddr>>,
    taken: HashSet<(u32, SocketAddr)>,
    /// Indexes given back, newest last; the oldest are forgotten.
    freed: VecDeque<u32>,
    rng: u64,
}

impl<F> State<F> {
    fn new() -> Self {
        State {
            sockets: Vec::new(),
            by_client: HashMap::new(),
            taken: HashSet::new(),
            freed: VecDeque::new(),
            rng: 0x9E37_79B9_7F4A_7C15,
        }
    }

    fn fits(&self, index: u32, client: SocketAddr, remote: SocketAddr) -> bool {
        !self.taken.contains(&(index, remote)) && !self.by_client.get(&client).is_some_and(|m| m.contains_key(&index))
    }

    /// An open socket free for (`client`, `remote`), in O(1).
    fn choose(&mut self, client: SocketAddr, remote: SocketAddr) -> Option<u32> {
        let recent = self.freed.len().saturating_sub(FREED_TRIED);
        for pos in (recent..self.freed.len()).rev() {
            let index = self.freed[pos];
            if self.fits(index, client, remote) {
                self.freed.remove(pos);
                return Some(index);
            }
        }
        let n = self.sockets.len() as u64;
        if n <= PROBES as u64 {
            return (0..n as u32).find(|&i| self.fits(i, client, remote));
        }
        for _ in 0..PROBES {
            let index = self.random_index();
            if self.fits(index, client, remote) {
                return Some(index);
            }
        }
        None
    }

    /// A random open socket's index (splitmix64: cheap, and spreads flows
    /// over the sockets). The pool must not be empty.
    fn random_index(&mut self) -> u32 {
        self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) % (self.sockets.len().max(1) as u64)) as u32
    }

    /// The flows that keep (`client`, `remote`) off socket `index`: the
    /// client's own flow there and the flow to `remote` there.
    fn blockers(&self, index: u32, client: SocketAddr, remote: SocketAddr) -> Vec<Arc<F>> {
        let Some(socket) = self.sockets.get(index as usize) else {
            return Vec::new();
        };
        let mine = self.by_client.get(&client).and_then(|m| m.get(&index)).copied();
        mine.into_iter()
            .chain(self.taken.contains(&(index, remote)).then_some(remote))
            .filter_map(|r| socket.flow(r))
            .collect()
    }

    fn assign(&mut self, index: u32, client: SocketAddr, remote: SocketAddr) {
        self.by_client.entry(client).or_default().insert(index, remote);
        self.taken.insert((index, remote));
    }

    fn give_back(&mut self, index: u32, client: SocketAddr, remote: SocketAddr) {
        if let Some(mine) = self.by_client.get_mut(&client) {
            mine.remove(&index);
            if mine.is_empty() {
                self.by_client.remove(&client);
            }
        }
        self.taken.remove(&(index, remote));
        if self.freed.len() >= FREED_KEPT {
            self.freed.pop_front();
        }
        self.freed.push_back(index);
    }
}

impl<F> Pool<F> {
    fn new(key: PoolKey) -> Pool<F> {
        Pool {
            key,
            state: Mutex::new(State::new()),
        }
    }

    fn lease(
        self: &Arc<Self>,
        client: SocketAddr,
        remote: SocketAddr,
        share: &Arc<FdShare>,
        receive_buffer: usize,
    ) -> Result<Lease<F>, PoolError> {
        {
            let mut state = lock(&self.state);
            if let Some(index) = state.choose(client, remote) {
                state.assign(index, client, remote);
                let socket = state.sockets[index as usize].clone();
                return Ok(self.lease_of(socket, index, client, remote, false));
            }
        }
        // A new socket, opened without holding the lock: other flows keep
        // choosing sockets meanwhile.
        let permit = share.try_take().ok_or(PoolError::Budget)?;
        let std = sockets::flow_upstream(remote, None, self.key.mark, self.key.device.as_deref())?;
        sockets::report_errors(&std, remote.is_ipv6())?;
        // One socket carries many clients' replies: room for one client's
        // burst without dropping another's (the default, about 208 KB,
        // overflowed under a single bulk download).
        sockets::set_udp_receive_buffer(&std, receive_buffer);
        let socket = Arc::new(PoolSocket {
            // Read through the relay's poller, not the runtime's: see
            // `relay::inbound`.
            socket: std,
            flows: Mutex::new(HashMap::new()),
            _permit: permit,
        });
        let mut state = lock(&self.state);
        let index = u32::try_from(state.sockets.len()).map_err(|_| PoolError::Budget)?;
        state.sockets.push(socket.clone());
        state.assign(index, client, remote);
        Ok(self.lease_of(socket, index, client, remote, true))
    }

    fn lease_of(
        self: &Arc<Self>,
        socket: Arc<PoolSocket<F>>,
        index: u32,
        client: SocketAddr,
        remote: SocketAddr,
        fresh: bool,
    ) -> Lease<F> {
        Lease {
            pool: self.clone(),
            socket,
            client,
            remote,
            index,
            fresh,
        }
    }
}

/// One shared upstream socket and the flows it carries, by remote.
#[derive(Debug)]
pub struct PoolSocket<F> {
    pub socket: UdpSocket,
    flows: Mutex<HashMap<SocketAddr, Weak<F>>>,
    _permit: Permit,
}

impl<F> PoolSocket<F> {
    /// The flow this socket carries to `remote`, if any.
    pub fn flow(&self, remote: SocketAddr) -> Option<Arc<F>> {
        lock(&self.flows).get(&remote).and_then(Weak::upgrade)
    }
}

/// A flow's hold on (socket, remote); given back when dropped.
#[derive(Debug)]
pub struct Lease<F> {
    pool: Arc<Pool<F>>,
    pub socket: Arc<PoolSocket<F>>,
    client: SocketAddr,
    pub remote: SocketAddr,
    index: u32,
    /// The socket was opened for this lease: nobody reads it yet.
    pub fresh: bool,
}

impl<F> Lease<F> {
    /// Routes the socket's datagrams from the lease's remote to `flow`.
    pub fn attach(&self, flow: &Arc<F>) {
        lock(&self.socket.flows).insert(self.remote, Arc::downgrade(flow));
    }
}

impl<F> Drop for Lease<F> {
    fn drop(&mut self) {
        lock(&self.socket.flows).remove(&self.remote);
        lock(&self.pool.state).give_back(self.index, self.client, self.remote);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_client_never_shares_a_socket_with_itself_nor_a_remote() {
        let mut s: State<()> = State::new();
        let (c1, c2) = (sa("192.0.2.10:5000"), sa("192.0.2.11:5000"));
        let (r1, r2) = (sa("198.51.100.7:7000"), sa("198.51.100.8:7000"));
        s.assign(0, c1, r1);
        assert!(!s.fits(0, c1, r2), "c1 already uses socket 0");
        assert!(!s.fits(0, c2, r1), "socket 0 already carries a flow to r1");
        assert!(s.fits(0, c2, r2));
        s.give_back(0, c1, r1);
        assert!(s.fits(0, c1, r1));
        assert!(s.by_client.is_empty() && s.taken.is_empty());
    }

    #[test]
    fn given_back_indexes_are_tried_first() {
        let mut s: State<()> = State::new();
        let c = sa("192.0.2.10:5000");
        // Pretend 1,000 sockets exist, all used by c.
        for i in 0..1_000 {
            s.assign(i, c, sa(&format!("198.51.100.{}:{}", i % 200, 1000 + i)));
        }
        let r = sa("203.0.113.1:9");
        assert_eq!(s.choose(c, r), None);
        s.give_back(417, c, sa(&format!("198.51.100.{}:{}", 417 % 200, 1417)));
        assert_eq!(s.choose(c, r), Some(417));
        // However many stale ones came before, the latest is remembered.
        for _ in 0..FREED_KEPT + 10 {
            s.freed.push_back(3);
        }
        s.give_back(8, c, sa("198.51.100.8:1008"));
        assert_eq!(s.choose(c, r), Some(8));
    }
}
