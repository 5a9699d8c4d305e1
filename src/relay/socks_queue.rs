//! The queues between the listener and SOCKS5 flows' tasks, and what
//! bounds their memory.
//!
//! A SOCKS5 flow's datagrams wait in a channel for its task: while the
//! association is set up (up to the handshake timeout, seconds if the
//! proxy is slow) and while the task waits for a worker. One flow's queue
//! is bounded like a send buffer ([`FLOW_BYTES`], and the channel's
//! length), but that alone let one device hold flows x 1 MiB: 150 flows to
//! a proxy slow to answer grew tproxyd by 139 MiB, and the descriptor
//! budget allows thousands of flows. So every queued byte is also charged
//! to one [`SocksBudget`]: in all (`relay.socks5_queue_bytes`) and per
//! client (a quarter of that, as the session table's per-client quota).
//! Past a bound the datagram is dropped and counted
//! (`drops_total{reason="socks5_queue"}`), as a full socket buffer would
//! drop it, and only the client that filled its share loses first.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

use super::key::ClientId;
use crate::stats::Stats;
use crate::sync::lock;

/// Bytes one flow may have queued for its task, as a send buffer would
/// bound them: the queue is the flow's only slack while its task waits (a
/// direct flow has the socket's buffer).
pub const FLOW_BYTES: usize = 1 << 20;
/// What queueing a datagram costs beside its payload: its [`Outbound`], the
/// channel's slot and the allocator's share of its buffer. Charged so that
/// a flood of empty datagrams is bounded by memory, not only by count.
pub const DATAGRAM_COST: usize = 2 * std::mem::size_of::<Outbound>() + 16;

/// A client datagram for a SOCKS5 flow's task.
#[derive(Debug)]
pub struct Outbound {
    pub dst: SocketAddr,
    pub payload: Vec<u8>,
}

impl Outbound {
    fn cost(&self) -> usize {
        self.payload.len() + DATAGRAM_COST
    }
}

/// Bytes queued for every SOCKS5 flow's task, in all and per client.
#[derive(Debug)]
pub struct SocksBudget {
    limit: AtomicUsize,
    state: Mutex<Charged>,
}

#[derive(Debug, Default)]
struct Charged {
    total: usize,
    by_client: HashMap<ClientId, usize>,
}

impl SocksBudget {
    /// A budget of `limit` bytes in all, a quarter of it per client.
    pub fn new(limit: usize) -> Arc<SocksBudget> {
        Arc::new(SocksBudget {
            limit: AtomicUsize::new(limit),
            state: Mutex::new(Charged::default()),
        })
    }

    /// Takes a new limit (reload); what is queued stays and drains.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// Bytes queued now, in all.
    pub fn queued(&self) -> usize {
        lock(&self.state).total
    }

    /// Bytes queued now for `client`.
    pub fn queued_by(&self, client: ClientId) -> usize {
        lock(&self.state).by_client.get(&client).copied().unwrap_or(0)
    }

    fn per_client(limit: usize) -> usize {
        limit / 4
    }

    /// Charges `bytes` to `client` if both bounds have room.
    fn take(state: &mut Charged, limit: usize, client: ClientId, bytes: usize) -> bool {
        let mine = state.by_client.get(&client).copied().unwrap_or(0);
        if state.total + bytes > limit || mine + bytes > Self::per_client(limit) {
            return false;
        }
        state.total += bytes;
        *state.by_client.entry(client).or_insert(0) += bytes;
        true
    }

    /// Gives `bytes` charged to `client` back.
    fn give_back(&self, client: ClientId, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut state = lock(&self.state);
        state.total = state.total.saturating_sub(bytes);
        if let Entry::Occupied(mut mine) = state.by_client.entry(client) {
            let left = mine.get().saturating_sub(bytes);
            if left == 0 {
                mine.remove();
            } else {
                *mine.get_mut() = left;
            }
        }
    }
}

/// What a flow's two ends share: its own count and the budget it is
/// charged to.
#[derive(Debug)]
struct Shared {
    queued: AtomicUsize,
    budget: Arc<SocksBudget>,
    client: ClientId,
}

/// The listener's end of a SOCKS5 flow's queue.
#[derive(Debug)]
pub struct SocksQueue {
    tx: mpsc::Sender<Outbound>,
    shared: Arc<Shared>,
}

/// The flow task's end. Dropping it (the task ended or was cancelled)
/// gives back what is still queued.
#[derive(Debug)]
pub struct SocksInbox {
    rx: mpsc::Receiver<Outbound>,
    shared: Arc<Shared>,
    /// Taken and not yet given back (see [`SocksInbox::settle`]).
    taken: usize,
}

/// A queue of at most `len` datagrams for a flow of `client`, charged to
/// `budget`.
pub fn channel(len: usize, budget: Arc<SocksBudget>, client: ClientId) -> (SocksQueue, SocksInbox) {
    let (tx, rx) = mpsc::channel(len);
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        budget,
        client,
    });
    (
        SocksQueue {
            tx,
            shared: shared.clone(),
        },
        SocksInbox { rx, shared, taken: 0 },
    )
}

impl SocksQueue {
    /// Queues a run of client datagrams for `dst`; what the flow's or the
    /// budget's bounds leave no room for is dropped and counted.
    pub fn push(&self, run: &[&[u8]], dst: SocketAddr, stats: &Stats) {
        let shared = &*self.shared;
        let limit = shared.budget.limit.load(Ordering::Relaxed);
        let mut state = lock(&shared.budget.state);
        for payload in run {
            let cost = payload.len() + DATAGRAM_COST;
            if shared.queued.load(Ordering::Relaxed) + cost > FLOW_BYTES {
                stats.drop_send_buffer_full.inc();
                continue;
            }
            if !SocksBudget::take(&mut state, limit, shared.client, cost) {
                stats.drop_socks5_queue.inc();
                continue;
            }
            let out = Outbound {
                dst,
                payload: payload.to_vec(),
            };
            match self.tx.try_send(out) {
                Ok(()) => {
                    shared.queued.fetch_add(cost, Ordering::Relaxed);
                }
                Err(_) => {
                    // Given back under the same lock: nothing else saw it.
                    state.total -= cost;
                    if let Some(mine) = state.by_client.get_mut(&shared.client) {
                        *mine -= cost;
                        if *mine == 0 {
                            state.by_client.remove(&shared.client);
                        }
                    }
                    stats.drop_send_buffer_full.inc();
                }
            }
        }
    }
}

impl SocksInbox {
    /// The next datagram, waiting for one; `None` once the listener's end
    /// is gone.
    pub async fn recv(&mut self) -> Option<Outbound> {
        let out = self.rx.recv().await?;
        self.taken += out.cost();
        Some(out)
    }

    /// The next datagram if one is queued.
    pub fn try_recv(&mut self) -> Option<Outbound> {
        let out = self.rx.try_recv().ok()?;
        self.taken += out.cost();
        Some(out)
    }

    /// Gives back what was taken since the last call (once per turn of the
    /// task, not per datagram: the budget's lock is the listener's too).
    pub fn settle(&mut self) {
        let taken = std::mem::take(&mut self.taken);
        self.shared.queued.fetch_sub(taken, Ordering::Relaxed);
        self.shared.budget.give_back(self.shared.client, taken);
    }
}

impl Drop for SocksInbox {
    fn drop(&mut self) {
        // No more can be queued once closed; what is left is given back.
        self.rx.close();
        while self.try_recv().is_some() {}
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn client(n: u8) -> ClientId {
        ClientId::of(IpAddr::V4(Ipv4Addr::new(192, 0, 2, n)))
    }

    fn dst() -> SocketAddr {
        "198.51.100.7:7000".parse().unwrap()
    }

    const SIZE: usize = 60_000;
    const COST: usize = SIZE + DATAGRAM_COST;

    #[test]
    fn one_client_gets_a_quarter_and_the_others_the_rest() {
        let stats = Stats::default();
        // Room for eight datagrams in all, two per client.
        let budget = SocksBudget::new(8 * COST);
        let payload = vec![0u8; SIZE];
        let flows: Vec<_> = (0..4).map(|_| channel(64, budget.clone(), client(10))).collect();
        for (q, _) in &flows {
            q.push(&[&payload, &payload], dst(), &stats);
        }
        assert_eq!(budget.queued_by(client(10)), 2 * COST, "a quarter for the first client");
        assert_eq!(stats.drop_socks5_queue.get(), 6);
        let (other, _inbox) = channel(64, budget.clone(), client(11));
        other.push(&[&payload, &payload], dst(), &stats);
        assert_eq!(
            budget.queued_by(client(11)),
            2 * COST,
            "another client is not crowded out"
        );
        assert_eq!(budget.queued(), 4 * COST);
    }

    #[test]
    fn the_whole_budget_bounds_many_clients() {
        let stats = Stats::default();
        let budget = SocksBudget::new(8 * COST);
        let payload = vec![0u8; SIZE];
        let flows: Vec<_> = (0..6).map(|n| channel(64, budget.clone(), client(n))).collect();
        for (q, _) in &flows {
            q.push(&[&payload, &payload], dst(), &stats);
        }
        assert_eq!(budget.queued(), 8 * COST);
        assert_eq!(stats.drop_socks5_queue.get(), 4);
    }

    #[test]
    fn taking_and_dropping_give_the_bytes_back() {
        let stats = Stats::default();
        let budget = SocksBudget::new(64 * COST);
        let payload = vec![0u8; SIZE];
        let (q, mut inbox) = channel(64, budget.clone(), client(10));
        q.push(&[&payload, &payload, &payload], dst(), &stats);
        assert!(inbox.try_recv().is_some());
        inbox.settle();
        assert_eq!(budget.queued(), 2 * COST);
        drop(inbox);
        assert_eq!(budget.queued(), 0, "a task that ends gives back its queue");
        assert_eq!(budget.queued_by(client(10)), 0);
        q.push(&[&payload], dst(), &stats);
        assert_eq!(budget.queued(), 0, "nothing is charged to a closed queue");
        assert_eq!(stats.drop_send_buffer_full.get(), 1);
    }

    #[test]
    fn one_flow_is_bounded_like_a_send_buffer() {
        let stats = Stats::default();
        let budget = SocksBudget::new(1 << 30);
        let payload = vec![0u8; SIZE];
        let (q, _inbox) = channel(1_024, budget.clone(), client(10));
        let run: Vec<&[u8]> = (0..32).map(|_| payload.as_slice()).collect();
        q.push(&run, dst(), &stats);
        assert_eq!(budget.queued(), (FLOW_BYTES / COST) * COST);
        assert_eq!(stats.drop_send_buffer_full.get(), (32 - FLOW_BYTES / COST) as u64);
    }
}
