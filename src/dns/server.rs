//! Where DNS queries arrive, and the limits that keep a flood of them from
//! exhausting the daemon.

use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use tokio::net::{TcpListener, UdpSocket};

use super::clients::ClientKey;
use super::engine::{DnsEngine, Outcome, Transport};
use super::misses::Misses;
use super::outbox::{Gather, Outbox};
use super::replies::ReplyBatch;
use super::tcp_connection;
use crate::net::accept::AcceptBackoff;
use crate::net::recv::{BATCH, RecvBatch};
use crate::net::send::SendScratch;
use crate::net::unresolved::{HalfBuffer, UnresolvedGate};
use crate::places::{Place, Places};
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Most cache misses waiting for an upstream at once. Past this, new
/// misses are dropped (and counted): the client retries, and a flood of
/// random names cannot grow the task count without bound.
const MAX_PENDING: usize = 4_096;

/// The engine (swapped whole on reload) and the limits that outlive it.
#[derive(Debug)]
pub struct DnsService {
    engine: ArcSwap<DnsEngine>,
    /// Misses (with refreshes and held answers) waiting at once, over
    /// every listener; each holds a permit while it waits.
    pending: Arc<Places>,
    tcp: Arc<TcpSlots>,
    /// Slots of clients outside `dns.allow`, apart from `tcp`: they are
    /// only ever answered REFUSED, and the transparent TCP listener takes
    /// connections to any local address, the WAN side's included. Counted
    /// in `tcp`, 32 WAN hosts holding 16 idle connections each for
    /// `idle_timeout` took every one of the 512, and no LAN device had
    /// DNS over TCP meanwhile.
    strangers: Arc<TcpSlots>,
    stats: Arc<Stats>,
}

/// DNS-over-TCP connections held, in total and per client (as
/// [`super::clients`] tells them apart: one host can use every address
/// of its IPv6 prefix, so counting addresses would let it take every
/// slot). The limits are
/// read from the engine at each accept, so a reload applies them.
#[derive(Debug, Default)]
struct TcpSlots {
    held: Mutex<(usize, HashMap<ClientKey, usize>)>,
}

/// Why a connection was not accepted.
enum SlotRefusal {
    Total,
    PerClient,
}

impl TcpSlots {
    fn take(self: &Arc<Self>, client: ClientKey, total: usize, per_client: usize) -> Result<TcpSlot, SlotRefusal> {
        let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        if held.0 >= total {
            return Err(SlotRefusal::Total);
        }
        let mine = held.1.entry(client).or_insert(0);
        if *mine >= per_client {
            return Err(SlotRefusal::PerClient);
        }
        *mine += 1;
        held.0 += 1;
        Ok(TcpSlot {
            slots: self.clone(),
            client,
        })
    }
}

/// One connection's share; given back when the connection ends.
struct TcpSlot {
    slots: Arc<TcpSlots>,
    client: ClientKey,
}

impl Drop for TcpSlot {
    fn drop(&mut self) {
        let mut held = self.slots.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.0 = held.0.saturating_sub(1);
        if let Some(n) = held.1.get_mut(&self.client) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.1.remove(&self.client);
            }
        }
    }
}

impl DnsService {
    pub fn new(engine: DnsEngine, stats: Arc<Stats>) -> Self {
        DnsService {
            engine: ArcSwap::from_pointee(engine),
            pending: Places::new(MAX_PENDING),
            tcp: Arc::new(TcpSlots::default()),
            strangers: Arc::new(TcpSlots::default()),
            stats,
        }
    }

    /// The engine in force now.
    pub fn engine(&self) -> Arc<DnsEngine> {
        self.engine.load_full()
    }

    /// Puts a new engine in force; queries already being answered finish
    /// with the old one.
    pub fn replace_engine(&self, mut engine: DnsEngine) {
        if let Some(feed) = self.engine.load().feed() {
            engine.set_feed(feed.clone());
        }
        self.engine.store(Arc::new(engine));
    }

    /// Whether datagrams diverted to original port `port` are DNS for us.
    pub fn hijacks(&self, port: u16) -> bool {
        self.engine.load().hijacks(port)
    }

    /// A permit to forward one more query, or `None` when too many wait.
    pub fn forward_permit(&self) -> Option<Place> {
        let permit = self.pending.try_take();
        if permit.is_none() {
            self.stats.dns_dropped_overload.inc();
        }
        permit
    }

    /// Answers a UDP query. An answer that can be given at once goes to
    /// `now` (the caller gathers those of one receive batch and sends them
    /// together); the others come later, from a miss the caller drives in
    /// `misses` (see [`super::misses`]), through the sender `later` makes
    /// (built only then).
    ///
    /// `spare` is the listener's buffer for answers given at once: an
    /// answer served from a kept encoding is written into it, and it comes
    /// back here once `now` has copied the answer into the batch, so the
    /// next such answer needs no allocation.
    pub fn answer_udp<S>(
        &self,
        bytes: &[u8],
        client: SocketAddr,
        now: impl FnOnce(&[u8]),
        later: impl FnOnce() -> S,
        misses: &mut Misses,
        spare: &mut Vec<u8>,
    ) where
        S: FnOnce(&[u8]) + Send + 'static,
    {
        let engine = self.engine.load_full();
        match engine.answer_now_reusing(bytes, client.ip(), Transport::Udp, spare) {
            Outcome::Reply(reply) => {
                now(&reply);
                keep_spare(spare, reply);
            }
            Outcome::Drop => {}
            // The same engine must finish the query: its upstream group
            // numbers mean nothing to another one.
            Outcome::Forward(pending) => {
                let Some(permit) = self.forward_permit() else {
                    // Never silent: the client learns at once that we are overloaded.
                    if let Some(reply) = engine.overloaded(pending) {
                        now(&reply);
                    }
                    return;
                };
                let send = later();
                // May answer stale first and go on refreshing the cache.
                // Made here, not in an `async` block of ours: that block
                // would keep `pending` beside the future it is moved into.
                misses.push(DnsEngine::forward_with(
                    engine,
                    pending,
                    move |reply| {
                        send(&reply);
                        // Copied into the batch: the next answer's buffer.
                        super::plain_answer::give_back(reply);
                    },
                    permit,
                ));
            }
            Outcome::Prefetch(reply, pending) => {
                now(&reply);
                keep_spare(spare, reply);
                // The refresh: bounded by the same permits as forwards,
                // and nobody waits for its answer.
                if let Some(permit) = self.forward_permit() {
                    misses.push(DnsEngine::forward_with(engine, pending, |_| {}, permit));
                }
            }
            Outcome::Held(reply, committed) => {
                // Bounded like forwards: a flood of answers waiting for
                // the kernel cannot grow the set without bound. Past the
                // bound the answer goes out without waiting, never
                // dropped.
                let Some(permit) = self.pending.try_take() else {
                    now(&reply);
                    return;
                };
                let send = later();
                misses.push(async move {
                    crate::domain::feed::released(committed).await;
                    send(&reply);
                    drop(permit);
                });
            }
        }
    }
}

/// Largest answer buffer a listener keeps for the next one: a classic
/// UDP answer's worth, so a rare large answer does not stay allocated.
const SPARE_MAX: usize = 512;

/// Keeps `used` (an answer already copied into the batch) as the
/// listener's spare buffer, unless it is larger than an answer usually
/// needs.
fn keep_spare(spare: &mut Vec<u8>, used: Vec<u8>) {
    if used.capacity() <= SPARE_MAX {
        *spare = used;
    }
}

/// Saves the cache to `dns.cache.file` every few minutes and once more at
/// shutdown (the engine in force at that moment: a reload may change it).
pub async fn persist_cache(service: Arc<DnsService>, mut shutdown: Shutdown) -> io::Result<()> {
    let mut every = tokio::time::interval(super::cache_file::SAVE_EVERY);
    every.tick().await; // the first tick is immediate: nothing learnt yet
    loop {
        let stopping = tokio::select! {
            _ = shutdown.recv() => true,
            _ = every.tick() => false,
        };
        let engine = service.engine();
        // File I/O off the async workers.
        let _ = tokio::task::spawn_blocking(move || engine.save_cache_file()).await;
        if stopping {
            return Ok(());
        }
    }
}

/// Batches a plain UDP listener reads per turn before letting other
/// tasks run (a batch is up to [`BATCH`] queries).
const TURN_BATCHES: usize = 4;

/// A plain DNS server on a UDP socket (clients configured to use us).
///
/// Queries are read in batches (`recvmmsg`), and the answers given at once
/// go out together after each batch ([`ReplyBatch`]): under load that is
/// two system calls per batch instead of two per query. Misses wait in
/// the listener's own set ([`Misses`]), driven here; the answers of those
/// that end in one round leave together ([`super::outbox`]).
pub async fn serve_udp(socket: UdpSocket, service: Arc<DnsService>, mut shutdown: Shutdown) -> io::Result<()> {
    let socket = Arc::new(socket);
    let local = socket.local_addr()?;
    let v6 = local.is_ipv6();
    let mut batch = RecvBatch::new(BATCH);
    let mut replies = ReplyBatch::default();
    let mut scratch = SendScratch::default();
    // Shared by both senders of this socket: one reading of the
    // neighbour table serves them.
    let gate = Arc::new(UnresolvedGate::default());
    let half = HalfBuffer::of(socket.as_raw_fd());
    let later = Arc::new(later_answers(
        socket.clone(),
        v6,
        service.stats.clone(),
        gate.clone(),
        half,
    ));
    let mut misses = Misses::default();
    let mut spare = Vec::new();
    loop {
        tokio::select! {
            // Before the misses: a stop is never held back by them, and
            // they end (dropped with `misses`) when this returns.
            biased;
            _ = shutdown.recv() => return Ok(()),
            r = std::future::poll_fn(|cx| misses_then_queries(&mut misses, &later, &socket, cx)) => r?,
        };
        let mut drained = false;
        for _ in 0..TURN_BATCHES {
            let read = match batch.read(&socket) {
                Ok(read) => read,
                Err(e) => {
                    // ICMP errors from earlier replies surface here; keep serving.
                    service.stats.receive_errors.inc();
                    tracing::debug!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            };
            for i in 0..read.count {
                let Some((meta, query)) = batch.get(i) else { continue };
                let client = meta.peer;
                if client.port() == 0 {
                    continue; // no usable source: nowhere to answer
                }
                service.answer_udp(
                    query,
                    client,
                    |reply| replies.push(local, client, reply),
                    || {
                        let later = later.clone();
                        // Sent by the `flush` after the misses' turn (or
                        // here, past a full batch).
                        move |reply: &[u8]| {
                            let _ = later.add(local, client, reply);
                        }
                    },
                    &mut misses,
                    &mut spare,
                );
            }
            if !replies.is_empty() {
                let sent = replies.send_on(socket.as_raw_fd(), v6, &mut scratch, Some((&gate, half)));
                service.stats.reply_send_errors.add((sent.full + sent.failed) as u64);
                service.stats.drop_neighbour_unresolved.add(sent.unresolved as u64);
                if let Some(e) = &sent.first_error {
                    tracing::debug!(error = %e, "DNS UDP answer not sent");
                }
            }
            if read.drained {
                drained = true;
                break;
            }
        }
        if !drained {
            // Still more queued: let other tasks run before reading on.
            tokio::task::yield_now().await;
        }
    }
}

/// Drives the woken misses and sends the answers they gave (in one
/// go), then ready when queries are queued; pending with the socket and
/// every waiting miss registered for wake-up. The misses are driven in
/// every poll of the listener, not as an alternative to reading: a
/// steady stream of upstream answers cannot keep the queries waiting,
/// nor the queries the answers.
fn misses_then_queries(
    misses: &mut Misses,
    later: &Outbox<LaterAnswers>,
    socket: &UdpSocket,
    cx: &mut Context<'_>,
) -> Poll<io::Result<()>> {
    misses.drive(cx);
    later.flush();
    socket.poll_recv_ready(cx)
}

/// Answers a plain UDP listener sends later (those that came from an
/// upstream): gathered per worker turn and sent like the listener's own
/// batches, one `sendmmsg` for all of them.
#[derive(Default)]
struct LaterAnswers {
    replies: ReplyBatch,
    scratch: SendScratch,
}

impl Gather for LaterAnswers {
    fn push(&mut self, src: SocketAddr, client: SocketAddr, reply: &[u8]) {
        self.replies.push(src, client, reply);
    }

    fn gathered(&self) -> usize {
        self.replies.len()
    }
}

fn later_answers(
    socket: Arc<UdpSocket>,
    v6: bool,
    stats: Arc<Stats>,
    gate: Arc<UnresolvedGate>,
    half: HalfBuffer,
) -> Outbox<LaterAnswers> {
    Outbox::new(Box::new(move |later: &mut LaterAnswers| {
        let sent = later
            .replies
            .send_on(socket.as_raw_fd(), v6, &mut later.scratch, Some((&gate, half)));
        stats.reply_send_errors.add((sent.full + sent.failed) as u64);
        stats.drop_neighbour_unresolved.add(sent.unresolved as u64);
        if let Some(e) = &sent.first_error {
            tracing::debug!(error = %e, "DNS UDP answer not sent");
        }
    }))
}

/// A DNS-over-TCP server: plain (`dns.listen`) or transparent
/// (`dns.tcp_listen`, where TPROXY hands over connections to any address,
/// so a client retrying over TCP after TC=1 is still answered by us).
pub async fn serve_tcp(listener: TcpListener, service: Arc<DnsService>, mut shutdown: Shutdown) -> io::Result<()> {
    let mut backoff = AcceptBackoff::new("DNS over TCP");
    loop {
        // EMFILE and friends: the accept backs off instead of spinning.
        let (stream, client) = tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            v = backoff.accept(&listener) => v,
        };
        let engine = service.engine();
        let limits = engine.tcp_limits().clone();
        // Clients outside `dns.allow` share what one client may hold.
        let allowed = engine.allows(client.ip());
        let key = engine.client_key(client.ip());
        let (slots, total) = if allowed {
            (&service.tcp, limits.max_connections)
        } else {
            (&service.strangers, limits.max_per_client)
        };
        drop(engine);
        let permit = match slots.take(key, total, limits.max_per_client) {
            Ok(slot) => slot,
            // Dropping the stream closes it.
            Err(SlotRefusal::Total) if allowed => {
                service.stats.dns_dropped_overload.inc();
                continue;
            }
            Err(SlotRefusal::Total) => {
                service.stats.dns_refused_acl.inc();
                continue;
            }
            Err(SlotRefusal::PerClient) => {
                service.stats.dns_tcp_refused_per_client.inc();
                continue;
            }
        };
        let service = service.clone();
        let conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let engine = || service.engine();
            if let Err(e) = tcp_connection::serve(stream, client, engine, &service.stats, &limits, conn_shutdown).await
            {
                tracing::debug!(%client, error = %e, "DNS TCP connection ended");
            }
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(id: u16, name: &str) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        m.to_vec().unwrap()
    }

    /// A flood of unique names (every query a miss) from many clients,
    /// each within its share, the group's places more than the service's
    /// bound: at most `MAX_PENDING` misses wait in a listener's set, the
    /// rest are answered SERVFAIL at once and counted, and a miss dropped
    /// from the set (its listener gone) gives its permit back.
    #[test]
    fn a_flood_of_unique_names_holds_at_most_max_pending_misses() {
        let config = crate::config::Config::parse(
            r#"
[dns]
allow = ["2001:db8::/32"]
rate_limit = { qps = 0 }
[dns.upstreams.default]
servers = ["198.51.100.53"]
max_pending = 100000
"#,
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let stats = Arc::new(Stats::default());
        let engine = DnsEngine::build(config.dns().unwrap(), 255, stats.clone()).unwrap();
        let service = DnsService::new(engine, stats.clone());
        let mut misses = Misses::default();
        let flood = MAX_PENDING + 1_000;
        let mut at_once = 0;
        for i in 0..flood {
            // 200 clients (each its own /56), each well within its share
            // of the group.
            let k = (i % 200) as u16;
            let client = SocketAddr::from(([0x2001, 0xdb8, 0, k << 8, 0, 0, 0, 1], 5353));
            let id = (i % 65_536) as u16;
            service.answer_udp(
                &query(id, &format!("n{i}.flood.example.")),
                client,
                |_| at_once += 1,
                || |_: &[u8]| {},
                &mut misses,
                &mut Vec::new(),
            );
        }
        assert_eq!(misses.len(), MAX_PENDING, "waiting misses are bounded");
        assert_eq!(stats.dns_dropped_overload.get(), (flood - MAX_PENDING) as u64);
        assert_eq!(at_once, flood - MAX_PENDING, "the rest are answered at once");
        // The listener's set gone (shutdown, or its end): every permit back.
        drop(misses);
        let mut misses = Misses::default();
        service.answer_udp(
            &query(1, "after.flood.example."),
            SocketAddr::from(([0x2001, 0xdb8, 1, 0, 0, 0, 0, 1], 5353)),
            |_| panic!("a miss, not an answer at once"),
            || |_: &[u8]| {},
            &mut misses,
            &mut Vec::new(),
        );
        assert_eq!(misses.len(), 1);
    }

    /// A miss's future, with a sender like the listeners' (their outbox
    /// and two addresses), holds its query once: 2,464 bytes when the
    /// listener wrapped `forward_with` in an `async` block of its own
    /// (the `Pending` kept beside the future made from it), 2,024 now.
    /// 4,096 waiting misses are that many boxes.
    const MISS_FUTURE_MAX: usize = 2_200;

    #[test]
    fn a_miss_future_holds_its_query_once() {
        let config = crate::config::Config::parse(
            r#"
[dns]
allow = ["2001:db8::/32"]
[dns.upstreams.default]
servers = ["198.51.100.53"]
"#,
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let stats = Arc::new(Stats::default());
        let engine = DnsEngine::build(config.dns().unwrap(), 255, stats.clone()).unwrap();
        let service = DnsService::new(engine, stats);
        let mut misses = Misses::default();
        let client = SocketAddr::from(([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1], 5353));
        let outbox = Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
        service.answer_udp(
            &query(7, "fits.example."),
            client,
            |_| panic!("a miss, not an answer at once"),
            || {
                let (outbox, local) = (outbox.clone(), client);
                move |reply: &[u8]| {
                    if let Ok(mut out) = outbox.lock() {
                        out.extend_from_slice(reply);
                    }
                    let _ = (local, client);
                }
            },
            &mut misses,
            &mut Vec::new(),
        );
        assert_eq!(misses.len(), 1);
        let size = misses.largest();
        assert!(size <= MISS_FUTURE_MAX, "a miss's future is {size} bytes");
    }

    fn ip(s: &str) -> ClientKey {
        ClientKey::by_prefix(s.parse().unwrap())
    }

    #[test]
    fn the_per_client_tcp_cap_counts_an_ipv6_56_as_one_client() {
        let slots = Arc::new(TcpSlots::default());
        let held: Vec<TcpSlot> = (1..=2)
            .filter_map(|i| slots.take(ip(&format!("2001:db8:1::{i}")), 100, 2).ok())
            .collect();
        assert_eq!(held.len(), 2);
        // Another address of the same /56: the same client.
        assert!(matches!(
            slots.take(ip("2001:db8:1:ff::9"), 100, 2),
            Err(SlotRefusal::PerClient)
        ));
        // The next /56 and IPv4 clients are others.
        assert!(slots.take(ip("2001:db8:1:100::1"), 100, 2).is_ok());
        assert!(slots.take(ip("192.0.2.10"), 100, 2).is_ok());
        drop(held);
        assert!(slots.take(ip("2001:db8:1:ff::9"), 100, 2).is_ok(), "slots given back");
    }
}
