//! Everything that comes back: reading upstream sockets and delivering
//! replies to clients from the addresses they asked.
//!
//! Three kinds of reader run here, each as a task owned by the relay (see
//! [`RelayContext::spawn`]): pool readers, each watching many pool sockets
//! (every flow a socket carries shares it); one per full-cone flow; one per
//! SOCKS5 flow, which also sets up its association. A reply refreshes its
//! flow's idle timer and, now and then, its place in the LRU, so
//! mostly-inbound flows live.
//!
//! Replies are *gathered* before they are sent. A thousand game flows each
//! answered 60 times a second spread over hundreds of pool sockets, one or
//! two datagrams on each at a time: read and sent socket by socket, every
//! reply cost a wake-up, a task poll, a receive and a send of its own. A
//! pool reader instead is woken once for all the sockets the runtime found
//! ready in one `epoll_wait` (each marks itself, see
//! [`pool_readers`](super::pool_readers)), reads them all into one
//! [`RecvBatch`], and hands the lot to [`ReplySender::send_pending`], which
//! sends the replies leaving from one server address (one reply socket) in
//! a single `sendmmsg`.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;

use super::account::{Direction, count_sent};
use super::cone_filter::ConeFilter;
use super::context::RelayContext;
use super::key::{ClientId, Target};
use super::pool::PoolSocket;
use super::pool_readers::{PoolReader, Watch};
use super::reply::{self, Pending, ReplyScratch};
use super::reply_order::{self, ReplyOrder};
use super::rules::Route;
use super::session::{MAX_DATAGRAM, Session};
use super::slice::{Slice, Step};
use super::socks_queue::SocksInbox;
use super::socks5::{self, Socks5Server};
use crate::net::poll::Event;
use crate::net::recv::{self, RecvBatch};
use crate::net::sockets;
use crate::sync::lock;

/// Longest a SOCKS5 handshake may take.
const SOCKS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(5);
/// Queued datagrams a SOCKS5 task sends per wake-up at most.
const SOCKS_DRAIN: usize = 32;
/// Replies gathered before they are sent (and the receive slots for them).
const GATHER: usize = 256;
/// Sockets with errors asked for per `epoll_wait` of the error set, and
/// the room kept for marked sockets.
const EVENTS: usize = 256;
/// Replies a pool reader gathers before it sends them, within a slice.
/// Sending a reply to a new client address costs 7-10 µs (raw IP, the
/// kernel's delivery included), three times a read: a reader that sent
/// only at the end of its slice held the thread for a slice of reads and
/// then as long again and more for their sends (see `relay::slice`). 32
/// still lets replies from one server address to many clients leave in
/// one `sendmmsg`.
const SEND_EVERY: usize = 32;

/// A reply's place: datagram `k` of batch slot `i` (a coalesced slot holds
/// several, at most 65,535). Ordered as the replies arrived.
fn slot_of(i: usize, k: usize) -> u32 {
    ((i as u32) << 16) | (k as u32 & 0xffff)
}

/// Replies read but not yet sent, and the room to send them.
struct Gather {
    batch: RecvBatch,
    pending: Vec<Pending>,
    scratch: ReplyScratch,
    /// Reply sockets the sends of this stretch of work may still open
    /// (see [`reply::OPENS_PER_BATCH`]).
    opens: usize,
    /// The relay's clock (ms) when this stretch of work began: what the
    /// replies filed in it record as their flows' activity. Read once per
    /// stretch (a pool reader's slice, a quarter of a millisecond and one
    /// read) rather than once per socket read: a reading was about 90
    /// instructions under callgrind, 1-2 % of a reverse batch's user space.
    now_ms: u64,
}

thread_local! {
    /// Each worker thread's gathering room, shared by every reader on that
    /// thread: a flow costs no buffer of its own. It is empty whenever a
    /// reader is not running (every reader sends what it gathered before
    /// it awaits anything).
    static GATHERED: RefCell<Gather> = RefCell::new(Gather {
        batch: RecvBatch::new(GATHER),
        pending: Vec::with_capacity(GATHER),
        scratch: ReplyScratch::default(),
        opens: reply::OPENS_PER_BATCH,
        now_ms: 0,
    });
}

impl Gather {
    /// Files datagrams `from..` of the batch as replies of the flows
    /// `flow_of(sender)` names; datagrams no flow claims are counted.
    fn file(&mut self, from: usize, ctx: &RelayContext, flow_of: &impl Fn(SocketAddr) -> Option<Arc<Session>>) {
        let now = self.now_ms;
        let mut last: Option<(SocketAddr, Option<Arc<Session>>)> = None;
        for i in from..self.batch.len() {
            let Some((meta, payload)) = self.batch.get(i) else {
                continue;
            };
            // Datagrams the kernel coalesced (GRO) are sent on one by one.
            let count = recv::segments(payload, meta.segment).count();
            let peer = meta.peer;
            if last.as_ref().is_none_or(|(p, _)| *p != peer) {
                last = Some((peer, flow_of(peer)));
            }
            let Some((_, Some(session))) = &last else {
                ctx.stats().drop_unsolicited.add(count as u64);
                continue;
            };
            for k in 0..count {
                self.pending.push(Pending {
                    src: session.reply_source(peer),
                    client: session.key.client,
                    tos: meta.tos,
                    slot: slot_of(i, k),
                });
            }
            if session.touch_inbound(now) {
                ctx.table().promote(session);
            }
        }
    }

    /// Sends everything gathered and empties the batch.
    fn flush(&mut self, ctx: &RelayContext) {
        if !self.pending.is_empty() {
            let Gather {
                batch,
                pending,
                scratch,
                opens,
                ..
            } = self;
            let batch = &*batch;
            ctx.replies().send_pending_within(
                pending,
                |slot| {
                    let (i, k) = ((slot >> 16) as usize, (slot & 0xffff) as usize);
                    batch
                        .get(i)
                        .and_then(|(meta, p)| recv::segment(p, meta.segment, k))
                        .unwrap_or(&[])
                },
                scratch,
                opens,
            );
        }
        self.batch.clear();
    }

    /// One receive from `fd` (up to a system call's worth), filed; sends
    /// first when the batch is full. True when the socket's queue is now
    /// empty (the receive came back short, or with `WouldBlock`).
    fn read_fd(
        &mut self,
        fd: RawFd,
        ctx: &RelayContext,
        flow_of: &impl Fn(SocketAddr) -> Option<Arc<Session>>,
    ) -> io::Result<bool> {
        if self.batch.room() == 0 {
            self.flush(ctx);
        }
        let from = self.batch.len();
        let asked = recv::BATCH.min(self.batch.room());
        let mut result = self.batch.recv_more(fd, asked);
        // An ICMP error for an earlier datagram fails one receive (it is
        // counted from the error queue): read again, a few times, since a
        // spray of forged errors can land another between two reads.
        let mut tries = 0;
        while tries < crate::net::ICMP_RETRIES && matches!(&result, Err(e) if crate::net::pending_icmp_error(e)) {
            tries += 1;
            result = self.batch.recv_more(fd, asked);
        }
        match result {
            Ok(n) => {
                self.file(from, ctx, flow_of);
                Ok(n < asked)
            }
            Err(e) if crate::net::would_block(&e) => Ok(true),
            Err(e) => Err(e),
        }
    }
}

/// Waits until `socket` has datagrams or queued ICMP errors; counts and
/// clears the errors (each once: `IP_RECVERR` queues it, and the same error
/// also fails the socket's next send or receive, which is not counted).
async fn wait_readable(socket: &UdpSocket, ctx: &RelayContext) -> io::Result<bool> {
    let ready = socket.ready(Interest::READABLE | Interest::ERROR).await?;
    if ready.is_error() {
        let errors = sockets::drain_error_queue(socket.as_raw_fd());
        ctx.stats().upstream_unreachable.add(errors as u64);
        let _ = socket.try_io(Interest::ERROR, || {
            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
        });
    }
    Ok(ready.is_readable())
}

/// Lets a new pool socket's replies be read: hands it to one of the
/// relay's pool readers, now, and starts that reader's task if it is not
/// running (the first socket it gets).
///
/// Not a task per socket: a flood to 20,000 destinations opens 20,000
/// sockets, and a task spawned for each only to register its socket cost
/// a spawn and a poll per new flow, and 1,280-byte task allocations aligned
/// to 128 bytes that the allocator could not reuse for the next ones (a
/// freed 1.3 KB chunk is too small to carve another aligned one from): 10,898
/// such chunks, 14 MB, were left free in the worker's arena after that
/// flood, about half of its RSS growth.
pub fn read_pool(socket: Arc<PoolSocket<Session>>, ctx: &Arc<RelayContext>) {
    let reader = match ctx.pool_readers().pick() {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "no pool reader; replies on a pool socket will be lost");
            return;
        }
    };
    if let Err(e) = reader.watch(socket) {
        tracing::warn!(error = %e, "cannot watch a pool socket; its replies will be lost");
        return;
    }
    if reader.running.swap(true, Ordering::AcqRel) {
        return;
    }
    let task_ctx = ctx.clone();
    ctx.spawn(async move {
        if let Err(e) = run_pool_reader(&reader, &task_ctx).await {
            tracing::warn!(error = %e, "pool reader failed");
        }
        reader.running.store(false, Ordering::Release);
    });
}

/// Waits for any watched socket to be ready (its runtime registration
/// queued its token, see `relay::pool_readers`) or to hold an error, then
/// reads the ready ones, light clients' first (see `relay::reply_order`),
/// and sends what they held, slice after slice until none is left.
async fn run_pool_reader(reader: &Arc<PoolReader>, ctx: &RelayContext) -> io::Result<()> {
    // SAFETY: the registration holds an `Arc` of the reader, whose error
    // set (and so the descriptor, always the same one) lives at least as
    // long.
    let errors = unsafe { AsyncFd::register_with_interest(reader.clone(), Interest::READABLE) }?;
    let mut raw = Vec::with_capacity(EVENTS);
    let mut events: Vec<Event> = Vec::with_capacity(EVENTS);
    let mut tokens: Vec<usize> = Vec::with_capacity(EVENTS);
    // Marked sockets not served yet. Kept across slices: a socket is
    // looked up once per readiness, not once per slice it waits.
    let mut queued: ReplyOrder<Arc<Watch>> = ReplyOrder::default();
    loop {
        let error_guard = std::future::poll_fn(|cx| {
            reader.marks.take(cx, &mut tokens);
            match errors.poll_read_ready(cx) {
                Poll::Ready(Ok(guard)) => Poll::Ready(Ok(Some(guard))),
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending if tokens.is_empty() && queued.is_empty() => Poll::Pending,
                Poll::Pending => Poll::Ready(Ok(None)),
            }
        })
        .await?;
        if let Some(mut guard) = error_guard {
            // Only sockets with an error are named here; each is emptied,
            // which ends its `EPOLLERR`. Cleared only if nothing arrived
            // since the wake-up (the runtime compares ticks).
            if read_errors(reader, ctx, &mut raw, &mut events)? < raw.capacity() {
                guard.clear_ready();
            }
        }
        // Rounds (read, send) go on until no socket is marked or the slice
        // is spent; then the listener and the others get the thread (see
        // `relay::slice`).
        let slice = Slice::start();
        let dominant = ctx.shedder().dominant_client();
        GATHERED.with_borrow_mut(|g| {
            g.opens = reply::OPENS_PER_BATCH;
            g.now_ms = ctx.clock().ms_at(slice.started());
        });
        loop {
            {
                let watched = lock(&reader.sockets);
                for watch in tokens.drain(..).filter_map(|t| watched.slots.get(t)?.clone()) {
                    let heavy = reply_order::is_heavy(watch.mark.dominant_reads.load(Ordering::Relaxed));
                    queued.push(watch, heavy);
                }
            }
            if queued.is_empty() {
                break;
            }
            GATHERED.with_borrow_mut(|g| {
                let mut served = 0;
                // What the last step said, so that the clock is read once
                // per socket served, not again by this check.
                let mut spent = false;
                while served == 0 || !spent {
                    let Some(watch) = queued.pop() else { break };
                    served += 1;
                    // Still holding datagrams: back of its queue, unless
                    // its waker queued it again meanwhile (then its token
                    // comes with the marks).
                    if !serve(&watch, g, ctx, dominant) && !watch.mark.marked.swap(true, Ordering::AcqRel) {
                        let heavy = reply_order::is_heavy(watch.mark.dominant_reads.load(Ordering::Relaxed));
                        queued.push(watch, heavy);
                    }
                    // Sent as they come, a few dozen at a time, so that the
                    // slice's check covers the sends too.
                    match slice.step(g.pending.len(), SEND_EVERY) {
                        Step::Work => {}
                        Step::Send => {
                            g.flush(ctx);
                            spent = slice.spent();
                        }
                        Step::Yield => spent = true,
                    }
                }
                g.flush(ctx);
            });
            reader.marks.take_now(&mut tokens);
            // Nothing left: done, spent or not (the clock is not read).
            if tokens.is_empty() && queued.is_empty() {
                break;
            }
            if slice.spent() {
                // Still busy: let the listener and others run; what is
                // queued is kept, so this reader comes straight back.
                tokio::task::yield_now().await;
                break;
            }
        }
    }
}

/// Serves one marked socket: if the runtime says it is readable, one
/// receive (up to a system call's worth), filed, and the socket judged
/// heavy or light by whose replies it held (see `reply_order::after_read`).
/// True when the socket is
/// done with for now: its queue was emptied and its readiness cleared with
/// the tick from before the read, or it was not readable; either way its
/// waker is registered again and queues it at its next datagram. False
/// when it still holds datagrams (or the receive failed) and must be read
/// again.
fn serve(watch: &Watch, g: &mut Gather, ctx: &RelayContext, dominant: Option<ClientId>) -> bool {
    // Cleared before the runtime is asked, so that readiness the runtime
    // reports after this marks the socket again.
    watch.mark.marked.store(false, Ordering::Release);
    let mut cx = Context::from_waker(&watch.waker);
    let mut guard = match watch.io.poll_read_ready(&mut cx) {
        Poll::Pending => return true,
        Poll::Ready(Ok(guard)) => guard,
        Poll::Ready(Err(e)) => {
            tracing::debug!(error = %e, "pool socket readiness failed");
            return true;
        }
    };
    let fd = watch.socket.socket.as_raw_fd();
    // Sent first if full, so that this receive's replies are the ones
    // after `from`.
    if g.batch.room() == 0 {
        g.flush(ctx);
    }
    let from = g.pending.len();
    let read = g.read_fd(fd, ctx, &|peer| watch.socket.flow(peer));
    if let Some(filed) = g.pending.get(from..).filter(|f| !f.is_empty()) {
        let dominant_only = dominant.is_some_and(|d| filed.iter().all(|p| ClientId::of(p.client.ip()) == d));
        let reads = &watch.mark.dominant_reads;
        reads.store(
            reply_order::after_read(reads.load(Ordering::Relaxed), dominant_only),
            Ordering::Relaxed,
        );
    }
    match read {
        Ok(true) => {
            // Keeps readiness that arrived after the guard's tick: then
            // the poll below is ready again and the socket is read again.
            guard.clear_ready();
            watch.io.poll_read_ready(&mut cx).is_pending()
        }
        Ok(false) => false,
        // Still an ICMP error after the retries (a spray): counted from the
        // error queue already, and nothing was lost; read again later. As a
        // receive error too, one forged message would count twice, and
        // anyone could make that counter tick.
        Err(e) if crate::net::pending_icmp_error(&e) => false,
        Err(e) => {
            ctx.stats().receive_errors.inc();
            tracing::debug!(error = %e, "upstream receive failed");
            false
        }
    }
}

/// Empties the error queues of the sockets the error set names, counting
/// what they held (see `wait_readable`); returns how many it named.
fn read_errors(
    reader: &PoolReader,
    ctx: &RelayContext,
    raw: &mut Vec<libc::epoll_event>,
    events: &mut Vec<Event>,
) -> io::Result<usize> {
    let named = reader.errors.ready(raw, events)?;
    let watched = lock(&reader.sockets);
    for event in events.iter() {
        let Some(watch) = usize::try_from(event.token)
            .ok()
            .and_then(|t| watched.slots.get(t)?.as_ref())
        else {
            continue;
        };
        let errors = sockets::drain_error_queue(watch.socket.socket.as_raw_fd());
        ctx.stats().upstream_unreachable.add(errors as u64);
    }
    Ok(named)
}

/// The task of a full-cone session: relay replies from anyone.
pub async fn pump_cone(session: Arc<Session>, socket: Arc<UdpSocket>, ctx: Arc<RelayContext>) {
    let filter = RefCell::new(ConeFilter::default());
    loop {
        match wait_readable(&socket, &ctx).await {
            // What a remote the rules drop sends is unsolicited.
            Ok(true) => drain_into_flows(&socket, &ctx, |remote| {
                cone_admits(&mut filter.borrow_mut(), &session, remote, &ctx).then(|| session.clone())
            }),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(client = %session.key.client, error = %e, "upstream socket failed; closing flow");
                close(&session, &ctx);
                return;
            }
        }
    }
}

/// Whether `remote` may reach the client of the full-cone flow `session`
/// (always, for a one-destination flow): not when the rules in force
/// drop the client's flow to it (see [`ConeFilter`]).
fn cone_admits(filter: &mut ConeFilter, session: &Session, remote: SocketAddr, ctx: &RelayContext) -> bool {
    if !matches!(session.key.target, Target::Cone(_)) {
        return true;
    }
    let rules = ctx.rules();
    filter.admits(&rules, remote, || {
        ctx.route(&rules, session.key.client, remote).route == Route::Drop
    })
}

/// Reads every datagram queued on `socket` and sends each as a reply of
/// the session `flow_of(sender)` names. Datagrams no flow claims are
/// dropped and counted.
pub fn drain_into_flows(socket: &UdpSocket, ctx: &RelayContext, flow_of: impl Fn(SocketAddr) -> Option<Arc<Session>>) {
    GATHERED.with_borrow_mut(|g| {
        g.opens = reply::OPENS_PER_BATCH;
        g.now_ms = ctx.now_ms();
        loop {
            if g.batch.room() == 0 {
                g.flush(ctx);
            }
            let from = g.batch.len();
            let read = match g.batch.read_more(socket, recv::BATCH) {
                Ok(read) => read,
                // Counted from the error queue (see `wait_readable`).
                Err(e) if crate::net::pending_icmp_error(&e) => continue,
                Err(e) => {
                    ctx.stats().receive_errors.inc();
                    tracing::debug!(error = %e, "upstream receive failed");
                    break;
                }
            };
            g.file(from, ctx, &flow_of);
            if read.drained {
                break;
            }
        }
        g.flush(ctx);
    });
}

/// Sends replies from `from` to the session's client, from the address the
/// client wrote to (one destination) or from `from` (full cone).
fn reply(session: &Session, run: &[&[u8]], from: SocketAddr, tos: Option<u8>, ctx: &RelayContext) {
    ctx.replies()
        .send(session.reply_source(from), run, session.key.client, tos);
    if session.touch_inbound(ctx.now_ms()) {
        ctx.table().promote(session);
    }
}

/// Removes `session` from the table because its upstream failed.
fn close(session: &Session, ctx: &RelayContext) {
    drop(ctx.table().remove(session));
}

/// The task of a SOCKS5 session: set up the association (datagrams wait in
/// the channel meanwhile), then relay both ways until the server drops the
/// association or the flow ends. Either way the session leaves the table,
/// so the client's next datagram starts a fresh association.
pub async fn socks_pump(
    session: Arc<Session>,
    ctx: Arc<RelayContext>,
    server: Arc<Socks5Server>,
    mark: u32,
    mut rx: SocksInbox,
) {
    let mut assoc = match socks5::associate(&server, mark, SOCKS_HANDSHAKE).await {
        Ok(a) => a,
        Err(e) => {
            ctx.stats().socks5_failures.inc();
            tracing::warn!(server = %server.addr, error = %e, "SOCKS5 association failed");
            close(&session, &ctx);
            return;
        }
    };
    ctx.stats().socks5_associations.inc();
    tracing::debug!(server = %server.addr, relay = %assoc.relay, "SOCKS5 association up");
    let mut filter = ConeFilter::default();
    let mut wrapped = Vec::with_capacity(MAX_DATAGRAM);
    let mut inbound = vec![0u8; MAX_DATAGRAM];
    let mut control = [0u8; 64];
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(mut out) = out else { return };
                // What queued while the task waited goes out in this turn
                // (bounded, so replies get their turn): one wake-up per
                // datagram left a task slowed by a stream of (forged) ICMP
                // errors behind its client, and the queue overflowed.
                for turn in 1.. {
                    socks5::encode_udp(out.dst, &out.payload, &mut wrapped);
                    // Past ICMP errors pending on the association (each
                    // counted once, here or by the receive below).
                    let sent = crate::net::send::send_connected(&assoc.udp, &wrapped).await.map(|cleared| {
                        ctx.stats().upstream_unreachable.add(cleared);
                        1
                    });
                    count_sent(ctx.stats(), Direction::Upstream, &sent, &[&out.payload]);
                    if turn == SOCKS_DRAIN {
                        break;
                    }
                    match rx.try_recv() {
                        Some(next) => out = next,
                        None => break,
                    }
                }
                rx.settle();
            }
            got = assoc.udp.recv(&mut inbound) => match got {
                Ok(n) => match socks5::decode_udp(inbound.get(..n).unwrap_or_default()) {
                    Ok((remote, payload))
                        if session.answers_from(remote) && cone_admits(&mut filter, &session, remote, &ctx) =>
                    {
                        reply(&session, &[payload], remote, None, &ctx)
                    }
                    // Relayed by a full-cone proxy from someone a symmetric
                    // flow never wrote to, or to a full-cone flow from a
                    // remote the rules drop.
                    Ok(_) => ctx.stats().drop_unsolicited.inc(),
                    Err(e) => {
                        ctx.stats().receive_errors.inc();
                        tracing::debug!(error = %e, "bad datagram from the SOCKS5 relay");
                    }
                },
                // No error queue here: an ICMP error about the relay, of
                // any code, is seen once, as this failure or a send's.
                Err(e) if crate::net::pending_icmp_error(&e) => ctx.stats().upstream_unreachable.inc(),
                Err(e) => tracing::debug!(error = %e, "SOCKS5 relay receive failed"),
            },
            // The server never speaks on the control connection after the
            // handshake: EOF, an error or data all mean the association ended.
            _ = tokio::io::AsyncReadExt::read(&mut assoc.control, &mut control) => {
                ctx.stats().socks5_lost.inc();
                tracing::info!(server = %server.addr, client = %session.key.client, "SOCKS5 server closed the association");
                close(&session, &ctx);
                return;
            }
        }
    }
}
