//! Sending replies to clients from the address they originally asked for.
//!
//! A reply to a flow whose client sent to `198.51.100.7:7000` must leave
//! *from* `198.51.100.7:7000`, or the client's connected socket (or its NAT)
//! drops it. Such a socket is bound to a non-local address, allowed by
//! `IP_TRANSPARENT`, and it is shared by every flow to the same destination:
//! a DNS hijack of 8.8.8.8:53 serves every client through one socket. The
//! sockets live in a bounded LRU so a busy gateway does not spend a file
//! descriptor per packet or per flow on them.
//!
//! When the bind fails with `EADDRINUSE` (a local process holds the
//! wildcard on that port) or `EACCES` (a privileged port, after dropping
//! root), replies for that address go out over raw IP.

use lru::LruCache;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::account::{Direction, count_sent};
use crate::net::raw::{RawBatch, RawSender};
use crate::net::send::{
    GSO_MAX_SEGMENTS, Message, SendScratch, gso_chunks, gso_segments, recycle, recycle_messages, send_messages,
    send_run,
};
use crate::net::sockets;
use crate::net::unresolved::{HalfBuffer, Room, Sendable, UnresolvedGate};
use crate::stats::Stats;
use crate::sync::lock;
use std::os::fd::{AsRawFd, RawFd};

/// How replies from one source address are sent.
#[derive(Debug)]
pub enum ReplySocket {
    /// A UDP socket bound to the source address, and half of its send
    /// buffer (read once, at the bind).
    Bound { sock: UdpSocket, half: HalfBuffer },
    /// Raw IP with a hand-built header, when binding was not possible.
    Raw { src: SocketAddr, raw: Arc<RawSender> },
}

impl ReplySocket {
    /// Sends a run of datagrams to `client` with TOS `tos`; never blocks.
    /// Returns how many were sent.
    pub fn send_to(&self, run: &[&[u8]], client: SocketAddr, tos: Option<u8>) -> io::Result<usize> {
        match self {
            ReplySocket::Bound { sock, .. } => send_run(sock.as_raw_fd(), run, Some(client), tos, client.is_ipv6()),
            ReplySocket::Raw { src, raw } => {
                let mut sent = 0;
                for payload in run {
                    match raw.send(*src, client, payload, tos.unwrap_or(0)) {
                        Ok(()) => sent += 1,
                        Err(e) if sent == 0 => return Err(e),
                        Err(_) => break,
                    }
                }
                Ok(sent)
            }
        }
    }
}

/// A reply gathered for [`ReplySender::send_pending`]: from `src` to
/// `client`; its payload is slot `slot` of the caller's receive batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pending {
    pub src: SocketAddr,
    pub client: SocketAddr,
    pub tos: Option<u8>,
    pub slot: u32,
}

/// A reply's source as a sort key that groups equal addresses: any order of
/// the groups will do, so the address and port are packed into integers
/// (an IPv6 address's port tagged, so that no IPv4 key equals an IPv6
/// one). The derived order of `SocketAddr` compares field by field through
/// the enum: sorting a pool reader's gathered replies by it cost about 470
/// instructions a reply in the flows bench (callgrind), most of a reply's
/// work in user space.
fn source_order(src: &SocketAddr) -> (u128, u32) {
    match src {
        SocketAddr::V4(a) => ((u128::from(a.ip().to_bits()) << 16) | u128::from(a.port()), 0),
        SocketAddr::V6(a) => (a.ip().to_bits(), (1 << 16) | u32::from(a.port())),
    }
}

/// Most datagrams of one flow in one GSO train on the way to a client.
pub const REPLY_GSO_SEGMENTS: usize = GSO_MAX_SEGMENTS;

/// Reusable room for [`ReplySender::send_pending`]: nothing is allocated
/// per datagram, nor (once grown) per batch.
#[derive(Debug, Default)]
pub struct ReplyScratch {
    send: SendScratch,
    /// Payloads in sending order, and each message's share of them; both
    /// empty between calls (the lifetimes are only borrowed for one call).
    payloads: Vec<&'static [u8]>,
    messages: Vec<Message<'static>>,
    /// (client, tos, first payload, count) per message, in sending order.
    plan: Vec<(SocketAddr, Option<u8>, usize, usize)>,
    /// Replies going out over raw IP, sent together at the end.
    raw: RawBatch,
}

/// The cache of reply sockets, keyed by the address they send from.
///
/// The cache alone holds them: a flow names the address its replies come
/// from and looks the socket up per run, so evicting a socket closes it,
/// and the number open is truly bounded by the capacity (flows never keep
/// an evicted one alive).
///
/// When the cache is full of sockets used within [`CHURN_MS`], a new
/// address is answered over raw IP instead: evicting a busy socket to bind
/// another (and rebinding the evicted one a moment later) would cost six
/// system calls per reply just when a flood of destinations makes the
/// gateway busiest.
#[derive(Debug)]
pub struct ReplySender {
    cache: Mutex<LruCache<SocketAddr, Cached>>,
    raw: Arc<RawSender>,
    mark: u32,
    stats: Arc<Stats>,
    epoch: Instant,
    /// Holds back replies to unresolved neighbours on a socket whose
    /// buffer fills: a device forging source addresses must not starve
    /// the real ones of their replies (see [`crate::net::unresolved`]).
    gate: UnresolvedGate,
}

/// The room left on the raw socket of each family before its buffer is
/// half taken ([`Room`]), looked at once per
/// [`ReplySender::send_pending_within`] and only when a reply goes that
/// way (lone replies go over raw IP one after another, and a system call
/// each would double their cost), and again when the replies gathered
/// have spent it.
#[derive(Debug, Default)]
struct RawRooms {
    v4: Option<Room>,
    v6: Option<Room>,
}

impl RawRooms {
    fn get(&mut self, raw: &RawSender, v6: bool) -> &mut Room {
        let known = if v6 { &mut self.v6 } else { &mut self.v4 };
        known.get_or_insert_with(|| raw.room(v6))
    }
}

/// A cached socket and when it was last used (ms since `epoch`).
#[derive(Debug)]
struct Cached {
    sock: Arc<ReplySocket>,
    used_ms: u64,
}

/// How recently the least recently used socket must have been used for a
/// full cache to answer a new address over raw IP rather than evict it.
pub const CHURN_MS: u64 = 1_000;

/// Reply sockets one batch of replies ([`ReplySender::send_pending`]), or
/// one pool reader's slice of them ([`ReplySender::send_pending_within`]),
/// may open; replies from further new addresses in it go out over raw IP,
/// and those addresses get a socket when they are seen again.
///
/// Opening a reply socket costs seven system calls, about 25 µs. In the
/// 20,000-destination flood every reply came from a new address, and until
/// the cache was full a pool reader's batch of 184 replies opened 184
/// sockets in a row: 5-7 ms in which the worker polled nothing else, the
/// longest waits of another client's datagrams (syscall trace). A raw send
/// is one system call.
pub const OPENS_PER_BATCH: usize = 4;

impl ReplySender {
    pub fn new(capacity: NonZeroUsize, mark: u32, stats: Arc<Stats>) -> Self {
        ReplySender {
            cache: Mutex::new(LruCache::new(capacity)),
            raw: Arc::new(RawSender::new(mark)),
            mark,
            stats,
            epoch: Instant::now(),
            gate: UnresolvedGate::default(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The socket that sends from `src`, opening it on first use (and
    /// closing the least recently used one when the cache is full).
    pub fn socket_for(&self, src: SocketAddr) -> io::Result<Arc<ReplySocket>> {
        let mut unbounded = usize::MAX;
        self.socket_within(src, &mut unbounded)
    }

    /// [`ReplySender::socket_for`], opening a socket only while `opens` is
    /// not used up (and counting it down); past it, raw IP.
    fn socket_within(&self, src: SocketAddr, opens: &mut usize) -> io::Result<Arc<ReplySocket>> {
        let now = self.now_ms();
        {
            let mut cache = lock(&self.cache);
            if let Some(c) = cache.get_mut(&src) {
                c.used_ms = now;
                return Ok(c.sock.clone());
            }
            let churning = cache.len() >= cache.cap().get()
                && cache
                    .peek_lru()
                    .is_some_and(|(_, c)| now.saturating_sub(c.used_ms) < CHURN_MS);
            if churning || *opens == 0 {
                if churning {
                    self.stats.reply_cache_full.inc();
                } else {
                    self.stats.reply_opens_deferred.inc();
                }
                return Ok(Arc::new(ReplySocket::Raw {
                    src,
                    raw: self.raw.clone(),
                }));
            }
        }
        *opens -= 1;
        // Open outside the lock: binding is a few syscalls and other flows'
        // replies should not wait on them.
        let sock = match sockets::spoofing_reply(src, self.mark) {
            Ok(sock) => ReplySocket::Bound {
                half: HalfBuffer::of(sock.as_raw_fd()),
                sock,
            },
            // EADDRINUSE: a local process holds the wildcard on that port.
            // EACCES: a port below 1024 and no CAP_NET_BIND_SERVICE (tproxyd
            // keeps only NET_ADMIN and NET_RAW after dropping root).
            Err(e) if matches!(e.kind(), io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied) => {
                tracing::debug!(%src, error = %e, "cannot bind the reply address; replying over raw IP");
                self.stats.reply_raw_fallbacks.inc();
                ReplySocket::Raw {
                    src,
                    raw: self.raw.clone(),
                }
            }
            Err(e) => return Err(e),
        };
        let sock = Arc::new(sock);
        let evicted = {
            let mut cache = lock(&self.cache);
            if let Some(existing) = cache.get(&src) {
                return Ok(existing.sock.clone());
            }
            cache.push(
                src,
                Cached {
                    sock: sock.clone(),
                    used_ms: now,
                },
            )
        };
        // Closed here, outside the lock (a send in progress may hold it a
        // moment longer).
        drop(evicted);
        Ok(sock)
    }

    /// Sends a run of datagrams to `client` as if from `src`, counting the
    /// outcome.
    pub fn send(&self, src: SocketAddr, run: &[&[u8]], client: SocketAddr, tos: Option<u8>) {
        match self.socket_for(src) {
            Ok(sock) => self.send_on(&sock, run, client, tos),
            Err(e) => {
                self.stats.reply_send_errors.add(run.len() as u64);
                tracing::debug!(%src, error = %e, "no reply socket");
            }
        }
    }

    /// Sends a run through `sock`, counting the outcome.
    pub fn send_on(&self, sock: &ReplySocket, run: &[&[u8]], client: SocketAddr, tos: Option<u8>) {
        // One look for the run: it is one client's, held back or sent as
        // a whole, and a batch long at most.
        let filling = match sock {
            ReplySocket::Bound { sock, half } => half.room(sock.as_raw_fd()).pressed(),
            ReplySocket::Raw { .. } => self.raw.room(client.is_ipv6()).pressed(),
        };
        let Some(first) = run.first() else {
            return;
        };
        let run = &run[..self.let_go(filling, client, first.len(), run.len())];
        if run.is_empty() {
            return;
        }
        let result = sock.send_to(run, client, tos);
        count_sent(&self.stats, Direction::Reply, &result, run);
    }

    /// Sends every reply in `pending` (then empties it), in as few system
    /// calls as possible: replies leaving from the same address share that
    /// address's reply socket and go out in one `sendmmsg`, whichever
    /// clients they are for; consecutive replies of one flow go as one GSO
    /// train; replies alone from their address (when there are several
    /// addresses) go out together over raw IP. Each flow's replies keep their order (`pending` is sorted by
    /// source, then by position). `payload(slot)` is a reply's payload.
    pub fn send_pending<'p>(
        &self,
        pending: &mut Vec<Pending>,
        payload: impl Fn(u32) -> &'p [u8],
        scratch: &mut ReplyScratch,
    ) {
        let mut opens = OPENS_PER_BATCH;
        self.send_pending_within(pending, payload, scratch, &mut opens);
    }

    /// [`ReplySender::send_pending`] for a caller that sends in several
    /// parts within one stretch of work (a pool reader sends every few
    /// sockets, see `relay::slice`): the reply sockets it may still open,
    /// `opens`, are shared by all the parts and counted down here. Per
    /// part instead, sending eight times as often opened eight times as
    /// many sockets in the destination flood, each seven system calls.
    pub fn send_pending_within<'p>(
        &self,
        pending: &mut Vec<Pending>,
        payload: impl Fn(u32) -> &'p [u8],
        scratch: &mut ReplyScratch,
        opens: &mut usize,
    ) {
        // Replies of one flow, or of flows behind one server address, come
        // from one source in arrival order: already sorted. Seen so by
        // equality and slot order, a few instructions a reply, where the
        // sort cost a tenth of a pool reader's user-space work per batch on
        // a steady flow (callgrind, before the packed key).
        let sorted = pending
            .windows(2)
            .all(|w| w[0].src == w[1].src && w[0].slot <= w[1].slot);
        let sources = if sorted {
            1
        } else {
            // Position first breaks ties: the order within a source is arrival.
            pending.sort_unstable_by_key(|p| (source_order(&p.src), p.slot));
            1 + pending.windows(2).filter(|w| w[0].src != w[1].src).count()
        };
        let mut rest = &pending[..];
        let mut raw_rooms = RawRooms::default();
        while let Some(first) = rest.first() {
            let n = rest.iter().take_while(|p| p.src == first.src).count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            if n == 1 && sources > 1 && self.lone_over_raw(first, &payload, &mut scratch.raw, &mut raw_rooms) {
                continue;
            }
            self.send_group(first.src, group, &payload, scratch, opens, &mut raw_rooms);
        }
        self.flush_raw(&mut scratch.raw);
        pending.clear();
    }

    /// Gathers a reply that is alone from its address in a batch with
    /// replies from other addresses too into `raw`; false when it must
    /// take its reply socket (too big for a batch, or no raw IP here).
    ///
    /// Through reply sockets such a batch costs one `sendmmsg` per
    /// address: in the flows bench, where every echo comes from one of 256
    /// server ports, that was a system call per reply, about one per new
    /// flow. Over raw IP the whole batch is one call, and an address that
    /// only ever answers like this needs no socket (nor a descriptor) at
    /// all. Replies of one flow still leave in order: a batch holds one
    /// from this address, and batches leave one after the other.
    fn lone_over_raw<'p>(
        &self,
        reply: &Pending,
        payload: &impl Fn(u32) -> &'p [u8],
        raw: &mut RawBatch,
        rooms: &mut RawRooms,
    ) -> bool {
        let v6 = reply.src.is_ipv6();
        if !self.raw.available(v6) {
            return false;
        }
        let bytes = payload(reply.slot);
        if self.raw_held_back(rooms, raw, reply.client, bytes.len()) {
            return true;
        }
        raw.push(reply.src, reply.client, bytes, reply.tos.unwrap_or(0))
    }

    /// Whether a reply of `len` bytes to `client` over raw IP is held back
    /// ([`ReplySender::held_back`]) by the raw socket's room. When the
    /// replies gathered in `batch` have spent that room, they are sent and
    /// the buffer is looked at again first: gathered whole, a batch of
    /// replies to forged sources could fill it to the brim.
    fn raw_held_back(&self, rooms: &mut RawRooms, batch: &mut RawBatch, client: SocketAddr, len: usize) -> bool {
        let v6 = client.is_ipv6();
        let room = rooms.get(&self.raw, v6);
        if !room.pressed() && !room.take(len) {
            self.flush_raw(batch);
            // The batch held both families: both are looked at again.
            *rooms = RawRooms::default();
            let room = rooms.get(&self.raw, v6);
            if !room.pressed() {
                room.take_anyway(len);
            }
        }
        let pressed = rooms.get(&self.raw, v6).pressed();
        self.let_go(pressed, client, len, 1) == 0
    }

    /// How many of `n` replies to `client`, the first carrying `first`
    /// bytes, may go; the rest are held back, and counted. All when their
    /// socket is not `filling` (past half of its buffer) or the client's
    /// neighbour leaves at once; the first alone when it is a device the
    /// kernel has dropped, at the pace of such answers
    /// ([`crate::net::known_devices`]): it makes the kernel ask, and the
    /// rest would wait with it for seconds, holding the buffer (the whole
    /// run went on that pace before, a GSO train of them among it, and
    /// bursts to addresses a device had held and left filled the buffer).
    fn let_go(&self, filling: bool, client: SocketAddr, first: usize, n: usize) -> usize {
        if !filling {
            self.gate.not_pressed();
            return n;
        }
        let go = match self.gate.admits(client.ip(), first) {
            Sendable::Leaves => n,
            Sendable::Once => 1.min(n),
            Sendable::Held => 0,
        };
        self.stats.drop_neighbour_unresolved.add((n - go) as u64);
        go
    }

    /// Whether the rest of a run to `client`, `n` replies, is held back,
    /// and counted, when its socket is found `filling` part way through
    /// it: only a client whose replies leave at once goes on (a device the
    /// kernel has dropped had its one reply at the run's start).
    fn rest_held_back(&self, filling: bool, client: SocketAddr, n: usize) -> bool {
        if !filling {
            return false;
        }
        let held = !self.gate.leaves(client.ip());
        if held {
            self.stats.drop_neighbour_unresolved.add(n as u64);
        }
        held
    }

    /// Sends the raw-IP replies gathered in `raw`, counting the outcome.
    fn flush_raw(&self, raw: &mut RawBatch) {
        if raw.is_empty() {
            return;
        }
        let sent = self.raw.send_batch(raw);
        self.stats.reply_datagrams.add(sent.datagrams as u64);
        self.stats.reply_bytes.add(sent.bytes);
        self.stats.drop_send_buffer_full.add(sent.full as u64);
        self.stats.reply_send_errors.add(sent.failed as u64);
        if let Some(e) = &sent.first_error {
            tracing::debug!(error = %e, "raw reply send failed");
        }
    }

    /// Sends replies that all leave from `src`.
    fn send_group<'p>(
        &self,
        src: SocketAddr,
        group: &[Pending],
        payload: &impl Fn(u32) -> &'p [u8],
        scratch: &mut ReplyScratch,
        opens: &mut usize,
        raw_rooms: &mut RawRooms,
    ) {
        let sock = match self.socket_within(src, opens) {
            Ok(sock) => sock,
            Err(e) => {
                self.stats.reply_send_errors.add(group.len() as u64);
                tracing::debug!(%src, error = %e, "no reply socket");
                return;
            }
        };
        let (fd, half) = match &*sock {
            ReplySocket::Bound { sock, half } => (sock.as_raw_fd(), *half),
            ReplySocket::Raw { .. } => {
                // Gathered for one `sendmmsg` after the batch; one too big
                // for that goes alone, after those before it (a flow's
                // replies keep their order).
                for p in group {
                    let bytes = payload(p.slot);
                    if self.raw_held_back(raw_rooms, &mut scratch.raw, p.client, bytes.len()) {
                        continue;
                    }
                    if !scratch.raw.push(src, p.client, bytes, p.tos.unwrap_or(0)) {
                        self.flush_raw(&mut scratch.raw);
                        self.send_on(&sock, &[bytes], p.client, p.tos);
                    }
                }
                return;
            }
        };
        let v6 = src.is_ipv6();
        let mut room = half.room(fd);
        let mut payloads: Vec<&'p [u8]> = recycle(std::mem::take(&mut scratch.payloads));
        scratch.plan.clear();
        let mut rest = group;
        while let Some(first) = rest.first() {
            // A run: consecutive replies to one client with one TOS.
            let n = rest
                .iter()
                .take_while(|p| p.client == first.client && p.tos == first.tos)
                .count();
            let (run, tail) = rest.split_at(n);
            rest = tail;
            let n = self.let_go(room.pressed(), first.client, payload(first.slot).len(), n);
            if n == 0 {
                continue;
            }
            let run = &run[..n];
            let start = payloads.len();
            payloads.extend(run.iter().map(|p| payload(p.slot)));
            let mut at = start;
            for chunk in gso_chunks(&payloads[start..], v6, gso_segments(REPLY_GSO_SEGMENTS)) {
                let bytes = chunk.iter().map(|p| p.len()).sum();
                if !room.pressed() && !room.take(bytes) {
                    // The room the last look found is spent: what is
                    // planned goes, and the buffer is looked at again.
                    self.send_planned(fd, v6, src, &payloads, scratch);
                    room = half.room(fd);
                    if self.rest_held_back(room.pressed(), first.client, start + n - at) {
                        break;
                    }
                    // Past half, this client's replies leave at once (the
                    // gate admitted it) and the room stays spent.
                    if !room.pressed() {
                        room.take_anyway(bytes);
                    }
                }
                scratch.plan.push((first.client, first.tos, at, chunk.len()));
                at += chunk.len();
            }
        }
        self.send_planned(fd, v6, src, &payloads, scratch);
        scratch.payloads = recycle(payloads);
    }

    /// Sends the messages planned in `scratch` (slices of `payloads`) on
    /// `fd`, counting the outcome, and empties the plan.
    fn send_planned(&self, fd: RawFd, v6: bool, src: SocketAddr, payloads: &[&[u8]], scratch: &mut ReplyScratch) {
        if scratch.plan.is_empty() {
            return;
        }
        let mut messages: Vec<Message<'_>> = recycle_messages(std::mem::take(&mut scratch.messages));
        messages.extend(scratch.plan.iter().map(|&(client, tos, at, n)| Message {
            to: Some(client),
            tos,
            segments: &payloads[at..at + n],
        }));
        let sent = send_messages(fd, &messages, v6, &mut scratch.send, false);
        self.stats.reply_datagrams.add(sent.datagrams as u64);
        self.stats.reply_bytes.add(sent.bytes);
        self.stats.drop_send_buffer_full.add(sent.full as u64);
        self.stats.reply_send_errors.add(sent.failed as u64);
        if let Some(e) = &sent.first_error {
            tracing::debug!(%src, error = %e, "reply send failed");
        }
        scratch.messages = recycle_messages(messages);
        scratch.plan.clear();
    }

    /// Changes how many reply sockets are kept; the least recently used
    /// beyond a smaller capacity close.
    pub fn resize(&self, capacity: NonZeroUsize) {
        let mut evicted = Vec::new();
        {
            let mut cache = lock(&self.cache);
            while cache.len() > capacity.get() {
                match cache.pop_lru() {
                    Some(e) => evicted.push(e),
                    None => break,
                }
            }
            cache.resize(capacity);
        }
        drop(evicted);
    }

    /// Reply sockets open: bound ones in the cache (raw fallbacks share
    /// one raw socket and are not counted).
    pub fn open(&self) -> usize {
        lock(&self.cache)
            .iter()
            .filter(|(_, c)| matches!(*c.sock, ReplySocket::Bound { .. }))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_keys_are_equal_only_for_equal_addresses() {
        let addrs: Vec<SocketAddr> = [
            "0.0.0.1:2",
            "0.0.0.1:3",
            "0.0.0.2:2",
            "198.51.100.7:53",
            "[::1]:2",
            "[::1]:3",
            "[::2]:2",
            "[::ffff:198.51.100.7]:53",
            "[2001:db8::7]:53",
        ]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
        for a in &addrs {
            for b in &addrs {
                assert_eq!(source_order(a) == source_order(b), a == b, "{a} {b}");
            }
        }
    }

    /// A sender for up to 64 reply sockets, its counters, and a client
    /// socket (with its address) that the replies go to.
    fn fixture() -> (Arc<Stats>, ReplySender, UdpSocket, SocketAddr) {
        let stats = Arc::new(Stats::default());
        let replies = ReplySender::new(NonZeroUsize::new(64).unwrap(), 0, stats.clone());
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let to = client.local_addr().unwrap();
        (stats, replies, client, to)
    }

    /// Needs root (transparent binding, raw IP), as the lab tests do.
    #[test]
    fn sends_in_parts_share_one_allowance_of_new_reply_sockets() {
        let (stats, replies, client, to) = fixture();
        let mut scratch = ReplyScratch::default();
        let mut opens = OPENS_PER_BATCH;
        // Three parts, each with two replies from each of three new
        // addresses (a reply alone from its address would go over raw IP
        // without a socket).
        for part in 0..3 {
            let mut pending: Vec<Pending> = (0..6)
                .map(|i| Pending {
                    src: format!("127.0.1.{}:7000", 10 * part + i / 2 + 2).parse().unwrap(),
                    client: to,
                    tos: None,
                    slot: 0,
                })
                .collect();
            replies.send_pending_within(&mut pending, |_| b"part", &mut scratch, &mut opens);
            assert!(pending.is_empty());
        }
        assert_eq!(opens, 0);
        assert_eq!(replies.open(), OPENS_PER_BATCH);
        assert_eq!(stats.reply_opens_deferred.get(), (9 - OPENS_PER_BATCH) as u64);
        let mut buf = [0u8; 16];
        for _ in 0..18 {
            let (n, _) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"part");
        }
    }

    /// Needs root (transparent binding, raw IP), as the lab tests do.
    #[test]
    fn a_batch_opens_only_its_share_of_new_reply_sockets() {
        let (stats, replies, client, to) = fixture();
        let new_sources = OPENS_PER_BATCH + 6;
        // Two replies from each address: a reply alone from its address
        // would go over raw IP without a socket.
        let mut pending: Vec<Pending> = (0..2 * new_sources)
            .map(|i| Pending {
                src: format!("127.0.0.{}:7000", i / 2 + 2).parse().unwrap(),
                client: to,
                tos: None,
                slot: 0,
            })
            .collect();
        replies.send_pending(&mut pending, |_| b"reply", &mut ReplyScratch::default());
        assert_eq!(replies.open(), OPENS_PER_BATCH);
        assert_eq!(stats.reply_opens_deferred.get(), 6);
        // Every reply arrived, from the address it belongs to, either way.
        let mut from = Vec::new();
        let mut buf = [0u8; 16];
        for _ in 0..2 * new_sources {
            let (n, src) = client.recv_from(&mut buf).unwrap();
            assert_eq!(&buf[..n], b"reply");
            from.push(src.ip().to_string());
        }
        from.sort();
        from.dedup();
        assert_eq!(from.len(), new_sources);
    }

    /// Replies alone from their address in a batch from several addresses
    /// leave over raw IP (one system call for all) and open no reply
    /// socket; an address with a run of replies still gets its socket.
    /// Needs root (raw IP), as the lab tests do.
    #[test]
    fn lone_replies_of_a_batch_go_over_raw_ip_without_sockets() {
        let (stats, replies, client, to) = fixture();
        let reply = |src: &str, slot: u32| Pending {
            src: src.parse().unwrap(),
            client: to,
            tos: None,
            slot,
        };
        let mut pending = vec![
            reply("127.0.0.2:7000", 0),
            reply("127.0.0.3:7000", 1),
            reply("127.0.0.4:7000", 2),
            reply("127.0.0.4:7000", 3),
        ];
        let payloads: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];
        replies.send_pending(
            &mut pending,
            |slot| payloads[slot as usize],
            &mut ReplyScratch::default(),
        );
        assert_eq!(replies.open(), 1, "only the address with two replies opens a socket");
        assert_eq!(stats.reply_datagrams.get(), 4);
        let mut got = Vec::new();
        let mut buf = [0u8; 16];
        for _ in 0..4 {
            let (n, src) = client.recv_from(&mut buf).unwrap();
            got.push((src.to_string(), buf[..n].to_vec()));
        }
        got.sort();
        let want: Vec<(String, Vec<u8>)> = [
            ("127.0.0.2:7000", b"a"),
            ("127.0.0.3:7000", b"b"),
            ("127.0.0.4:7000", b"c"),
            ("127.0.0.4:7000", b"d"),
        ]
        .iter()
        .map(|(a, p)| (a.to_string(), p.to_vec()))
        .collect();
        assert_eq!(got, want);
    }

    /// Replies from one address leave in arrival (slot) order: gathered in
    /// that order they are sent as they are, and gathered out of it they
    /// are still sorted. Needs root (transparent binding), as the lab
    /// tests do.
    #[test]
    fn replies_from_one_address_leave_in_slot_order_however_gathered() {
        let (_stats, replies, client, to) = fixture();
        let payloads: [&[u8]; 4] = [b"a", b"b", b"c", b"d"];
        for slots in [[0, 1, 2, 3], [3, 1, 0, 2]] {
            let mut pending: Vec<Pending> = slots
                .iter()
                .map(|&slot| Pending {
                    src: "127.0.0.5:7000".parse().unwrap(),
                    client: to,
                    tos: None,
                    slot,
                })
                .collect();
            replies.send_pending(
                &mut pending,
                |slot| payloads[slot as usize],
                &mut ReplyScratch::default(),
            );
            let mut buf = [0u8; 16];
            let got: Vec<Vec<u8>> = (0..4)
                .map(|_| {
                    let (n, _) = client.recv_from(&mut buf).unwrap();
                    buf[..n].to_vec()
                })
                .collect();
            assert_eq!(
                got,
                [b"a", b"b", b"c", b"d"].map(|p| p.to_vec()),
                "gathered as {slots:?}"
            );
        }
    }
}
