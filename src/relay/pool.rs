//! Upstream sockets shared by one-destination (symmetric) flows.
//!
//! A socket per flow makes file descriptors, not memory, the limit of a
//! busy gateway (and a tokio task per flow the next one). Here flows to
//! *different* destinations share an upstream socket: a reply from R on
//! socket i belongs to the one flow that socket i carries to R, so the
//! pool needs only as many sockets as the busiest single destination (or
//! the busiest single client) has flows. One client's flows never share a
//! socket, so each destination still sees that client behind its own
//! mapping, as a symmetric NAT promises. Each socket has one reader task
//! that hands replies to their flows; a reply from a remote with no flow on
//! that socket is dropped, as a symmetric NAT's filtering requires.
//!
//! Pools are kept per (family, mark, device), because interface rules bind
//! their sockets differently.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, Weak};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::RelayContext;
use super::session::{self, Session};
use crate::net::sockets;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What sockets of one pool have in common.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub v6: bool,
    pub mark: u32,
    pub device: Option<String>,
}

/// All pools.
#[derive(Debug, Default)]
pub struct UpstreamPools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
}

impl UpstreamPools {
    /// A socket of pool `key` free for a flow to `remote`, and the lease
    /// that keeps it so.
    pub fn lease(
        &self,
        ctx: &Arc<RelayContext>,
        key: PoolKey,
        client: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<PoolLease> {
        let pool = lock(&self.pools)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Pool::new(key)))
            .clone();
        pool.lease(ctx, client, remote)
    }

    /// Sockets open across all pools.
    pub fn sockets(&self) -> usize {
        lock(&self.pools)
            .values()
            .map(|p| p.sockets.read().map_or(0, |s| s.len()))
            .sum()
    }
}

#[derive(Debug)]
pub struct Pool {
    key: PoolKey,
    sockets: RwLock<Vec<Arc<PoolSocket>>>,
    /// Which socket carries which flow.
    slots: Mutex<Assignments>,
}

/// Which socket indexes are taken: per destination, and per client.
#[derive(Debug, Default)]
struct Assignments {
    by_remote: HashMap<SocketAddr, RemoteSlots>,
    by_client: HashMap<SocketAddr, Vec<usize>>,
}

/// Socket indexes in use for one destination: `0..next` minus `free`.
#[derive(Debug, Default)]
struct RemoteSlots {
    next: usize,
    free: BTreeSet<usize>,
}

impl Assignments {
    /// The lowest index free for `remote` and not used by `client`.
    fn take(&mut self, client: SocketAddr, remote: SocketAddr) -> usize {
        let mine = self.by_client.get(&client).map(Vec::as_slice).unwrap_or_default();
        let r = self.by_remote.entry(remote).or_default();
        let index = match r.free.iter().copied().find(|i| !mine.contains(i)) {
            Some(i) => {
                r.free.remove(&i);
                i
            }
            None => loop {
                let i = r.next;
                r.next += 1;
                if !mine.contains(&i) {
                    break i;
                }
                r.free.insert(i);
            },
        };
        self.by_client.entry(client).or_default().push(index);
        index
    }

    fn give_back(&mut self, client: SocketAddr, remote: SocketAddr, index: usize) {
        if let Some(r) = self.by_remote.get_mut(&remote) {
            r.free.insert(index);
            if r.free.len() == r.next {
                self.by_remote.remove(&remote);
            }
        }
        if let Some(v) = self.by_client.get_mut(&client) {
            if let Some(pos) = v.iter().position(|&i| i == index) {
                v.swap_remove(pos);
            }
            if v.is_empty() {
                self.by_client.remove(&client);
            }
        }
    }
}

impl Pool {
    fn new(key: PoolKey) -> Pool {
        Pool {
            key,
            sockets: RwLock::new(Vec::new()),
            slots: Mutex::new(Assignments::default()),
        }
    }

    fn lease(
        self: &Arc<Self>,
        ctx: &Arc<RelayContext>,
        client: SocketAddr,
        remote: SocketAddr,
    ) -> io::Result<PoolLease> {
        let index = lock(&self.slots).take(client, remote);
        match self.socket(ctx, index, remote) {
            Ok(socket) => Ok(PoolLease {
                pool: self.clone(),
                socket,
                client,
                remote,
                index,
            }),
            Err(e) => {
                lock(&self.slots).give_back(client, remote, index);
                Err(e)
            }
        }
    }

    /// Socket `index`, opening sockets up to it as needed.
    fn socket(&self, ctx: &Arc<RelayContext>, index: usize, remote: SocketAddr) -> io::Result<Arc<PoolSocket>> {
        if let Some(s) = self
            .sockets
            .read()
            .map_err(|_| io::Error::other("pool lock"))?
            .get(index)
        {
            return Ok(s.clone());
        }
        let mut sockets = self.sockets.write().map_err(|_| io::Error::other("pool lock"))?;
        while sockets.len() <= index {
            let std = sockets::flow_upstream(remote, None, self.key.mark, self.key.device.as_deref())?;
            sockets::report_errors(&std, remote.is_ipv6())?;
            let socket = Arc::new(PoolSocket {
                socket: UdpSocket::from_std(std)?,
                flows: Mutex::new(HashMap::new()),
            });
            tokio::spawn(read_replies(socket.clone(), Arc::downgrade(ctx)));
            sockets.push(socket);
        }
        sockets
            .get(index)
            .cloned()
            .ok_or_else(|| io::Error::other("pool index"))
    }
}

/// One shared upstream socket and the flows it carries, by destination.
#[derive(Debug)]
pub struct PoolSocket {
    pub socket: UdpSocket,
    flows: Mutex<HashMap<SocketAddr, Weak<Session>>>,
}

/// A flow's hold on (socket, destination); given back when dropped.
#[derive(Debug)]
pub struct PoolLease {
    pool: Arc<Pool>,
    pub socket: Arc<PoolSocket>,
    client: SocketAddr,
    pub remote: SocketAddr,
    index: usize,
}

impl PoolLease {
    /// Routes the socket's replies from `remote` to `session`.
    pub fn attach(&self, session: &Arc<Session>) {
        lock(&self.socket.flows).insert(self.remote, Arc::downgrade(session));
    }
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        lock(&self.socket.flows).remove(&self.remote);
        lock(&self.pool.slots).give_back(self.client, self.remote, self.index);
    }
}

/// The reader of one pool socket: replies to the flows they belong to,
/// ICMP errors counted. Ends with the daemon.
async fn read_replies(socket: Arc<PoolSocket>, ctx: Weak<RelayContext>) {
    let fd = socket.socket.as_raw_fd();
    loop {
        let ready = match socket.socket.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(r) => r,
            Err(_) => return,
        };
        let Some(ctx) = ctx.upgrade() else { return };
        if ready.is_error() {
            // ICMP errors (port unreachable...) queued by IP_RECVERR: count
            // them and free the buffer space they hold, then tell tokio the
            // condition has been consumed.
            let errors = sockets::drain_error_queue(fd);
            ctx.stats.upstream_unreachable.add(errors as u64);
            let _ = socket.socket.try_io(Interest::ERROR, || {
                Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
            });
        }
        if ready.is_readable() {
            session::drain_into_flows(&socket.socket, &ctx, |peer| {
                lock(&socket.flows).get(&peer).and_then(Weak::upgrade)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Assignments;
    use std::net::SocketAddr;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn clients_share_sockets_but_never_with_themselves() {
        let mut a = Assignments::default();
        let (c1, c2) = (sa("192.0.2.10:5000"), sa("192.0.2.11:5000"));
        let (r1, r2) = (sa("198.51.100.7:7000"), sa("198.51.100.8:7000"));
        // Two clients to one server: two sockets.
        assert_eq!(a.take(c1, r1), 0);
        assert_eq!(a.take(c2, r1), 1);
        // One client to two servers: two sockets (its own mapping for each).
        assert_eq!(a.take(c1, r2), 1);
        // Another client to the second server reuses socket 0.
        assert_eq!(a.take(c2, r2), 0);
        a.give_back(c1, r1, 0);
        // c1 still holds socket 1 (to r2): its next flow to r1 gets 0 back.
        assert_eq!(a.take(c1, r1), 0);
        a.give_back(c2, r1, 1);
        let c3 = sa("192.0.2.12:5000");
        assert_eq!(a.take(c3, r1), 1, "freed indexes are reused lowest first");
    }

    #[test]
    fn a_client_skips_indexes_it_already_uses() {
        let mut a = Assignments::default();
        let c = sa("192.0.2.10:5000");
        let others: Vec<SocketAddr> = (0..3).map(|i| sa(&format!("192.0.2.{}:1", 20 + i))).collect();
        let r = sa("198.51.100.7:7000");
        let x = sa("198.51.100.9:7000");
        // c uses sockets 0 and 1 towards x.
        assert_eq!(a.take(c, x), 0);
        assert_eq!(a.take(others[0], x), 1);
        a.give_back(others[0], x, 1);
        assert_eq!(a.take(c, x), 1);
        // Towards r, c must skip 0 and 1.
        assert_eq!(a.take(c, r), 2);
        // Others still get 0 and 1 towards r.
        assert_eq!(a.take(others[1], r), 0);
        assert_eq!(a.take(others[2], r), 1);
    }
}
