//! The TPROXY listener: reads redirected datagrams in batches, with their
//! original destinations, and hands each to the flow it belongs to.
//!
//! Consecutive datagrams of one flow (a game or a bulk transfer sends in
//! bursts) are passed on as a *run*, which leaves as one GSO message; the
//! runs of a whole batch leave with one system call per upstream socket
//! (see [`super::upstream_batch`]).
//!
//! A listener never opens a flow itself: the first datagram of a new flow
//! goes to the [`OpenBacklog`](super::open_backlog::OpenBacklog) backlog and the listener
//! reads on, so a burst of new flows costs established flows nothing here.
//!
//! One listening address is a group of `SO_REUSEPORT` sockets. TPROXY's
//! socket lookup picks the member by a hash of the client's address and
//! port, so a client socket's datagrams always queue in the same member
//! and a flood from one client socket fills only its own queue. The
//! listener serves the ready members in turn, each for at most
//! [`TURN_BYTES`] (or [`TURN_BATCHES`] batches), then lets other tasks
//! run: another client's datagram waits behind one turn of each busy
//! member, not behind everything the kernel queued ahead of it.

use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::task::Poll;
use tokio::net::UdpSocket;

use super::context::RelayContext;
use super::decide::{Decision, Host, decide};
use super::key::{ClientId, FlowKey};
use super::open_backlog::{Filed, Held};
use super::ready_set::ReadySet;
use super::reply::{Pending, ReplyScratch};
use super::session::Session;
use super::shed::{Filter, SharedShedder, sojourn};
use super::shed_exempt::{ACTIVE, ESTABLISHED, EXEMPT, Exempt, ExemptFlow};
use super::shed_filter::{Applied, Verdict};
use super::upstream_batch::{UpstreamBatch, UpstreamSends};
use crate::dns::DnsService;
use crate::dns::misses::Misses;
use crate::dns::outbox::{Gather, Outbox};
use crate::dns::replies::ReplyBatch;
use crate::net::recv::{BATCH, DatagramMeta, RecvBatch, segments};
use crate::net::send::recycle;
use crate::net::sockets;
use crate::shutdown::Shutdown;

/// Bytes read from one socket per turn before the next ready one's turn.
pub const TURN_BYTES: usize = 128 << 10;
/// Bytes one batch should hold, judging by the last batch's datagrams.
const BATCH_BYTES: usize = 64 << 10;
/// Batches read from one socket per turn at most (small datagrams).
pub const TURN_BATCHES: usize = 4;
/// DNS answers gathered in a round past which they are sent before the
/// next batch is read (a turn's worth of small queries).
const FLUSH_AT: usize = TURN_BATCHES * BATCH;

/// Serves a group of listening sockets (members of one `SO_REUSEPORT`
/// group, or a single socket) until shutdown.
pub async fn serve(sockets: Vec<UdpSocket>, ctx: Arc<RelayContext>, mut shutdown: Shutdown) -> io::Result<()> {
    let members: Vec<Member> = sockets
        .into_iter()
        .map(|socket| {
            crate::net::spin::watch(std::os::fd::AsRawFd::as_raw_fd(&socket));
            Ok(Member {
                local: socket.local_addr()?,
                socket,
                slots: BATCH,
                run: Vec::new(),
            })
        })
        .collect::<io::Result<_>>()?;
    let mut members = members;
    // One slot per member, and the last one for the shutdown wait.
    let stop_slot = members.len();
    let woken = ReadySet::new(members.len() + 1);
    let mut asked = Vec::with_capacity(members.len() + 1);
    let mut batch = RecvBatch::new(BATCH);
    let mut sends = UpstreamSends::default();
    let mut dns = Dns {
        now: DnsAnswers::default(),
        later: Arc::new(later_answers(ctx.clone())),
        misses: Misses::default(),
        spare: Vec::new(),
    };
    let mut ready = Vec::with_capacity(members.len());
    // Whether this task's last round ended with datagrams still queued,
    // as the shared shedder was told.
    let mut behind = false;
    // One future for the whole loop: made anew each round, it cost a
    // borrow of the channel and a waiter registration per wake-up. It is
    // polled only when its own waker fired (see [`ReadySet::poll_slot`]):
    // polled on every wake-up, its poll (a lock of the channel's waiter
    // list) was about 200 instructions of each.
    let stop = shutdown.recv();
    tokio::pin!(stop);
    // The kernel-side shedding filter on this task's sockets, if any:
    // taken off when its hold ends or its client stopped (the wait below
    // ends then too, and every LOOK to count what it dropped), and when
    // the task ends (a reload's listeners keep their sockets).
    let mut kernel = Applied::default();
    let served = async {
        loop {
            let wait = poll_fn(|cx| {
                woken.take(cx, &mut asked);
                // Before the misses: a stop is never held back by them, and
                // they end (dropped with `dns`) when this returns.
                if woken.poll_slot(stop_slot, &asked, stop.as_mut()).is_ready() {
                    return Poll::Ready(Ok(Woke::Stop));
                }
                // The hijacked DNS misses first, and the answers they gave in
                // one go. Driven in every poll, not as an alternative to
                // reading: neither a stream of upstream answers nor one of
                // datagrams keeps the other waiting. A wake-up by a miss asks
                // no member (none woke).
                dns.misses.drive(cx);
                dns.later.flush();
                poll_ready(&members, &woken, &asked, &mut ready).map_ok(|()| Woke::Ready)
            });
            let woke = match kernel.next_wake() {
                Some(until) => {
                    let at = tokio::time::Instant::from_std(ctx.shedder().instant(until));
                    tokio::time::timeout_at(at, wait).await.unwrap_or(Ok(Woke::Hold))?
                }
                None => wait.await?,
            };
            match woke {
                Woke::Stop => return Ok(()),
                Woke::Hold => {
                    sync_filter(&mut kernel, &members, &ctx);
                    continue;
                }
                Woke::Ready => {}
            }
            let mut more = false;
            for &i in &ready {
                more |= !members[i].turn(&mut batch, &mut sends, &mut dns, &mut kernel, &ctx);
            }
            // The DNS answers of every member's turn leave together.
            dns.now.flush(&ctx);
            // Caught up (the worker sleeps until the next datagram) or not:
            // the overload ends when no listener task is behind.
            ctx.shedder().round_ended(behind, more);
            behind = more;
            sync_filter(&mut kernel, &members, &ctx);
            if more {
                // Still more queued: let other tasks run before reading on.
                tokio::task::yield_now().await;
            }
        }
    }
    .await;
    count_kernel_drops(ctx.stats(), kernel.clear(members.iter().map(|m| &m.socket)));
    served
}

/// Puts on this task's sockets the filter the shedder wants now, or takes
/// it off; what the kernel dropped while it was on counts as shed.
fn sync_filter(kernel: &mut Applied, members: &[Member], ctx: &RelayContext) {
    let shedder = ctx.shedder();
    // Nothing on and nothing wanted: no clock reading, no lock. (Asked
    // under the lock, the shedder would want nothing, and with nothing on
    // there is nothing to look at.)
    if kernel.until().is_none() && (ctx.shed_after().is_zero() || !shedder.filtering()) {
        return;
    }
    let now = shedder.now();
    // First what the filter dropped: a hold stays only while the client
    // it keeps out still floods, as some listener must say.
    if kernel.look_due(now) {
        report_kernel_drops(kernel, members, shedder, now);
    }
    let mut wanted = shedder.filter(now);
    if wanted.iter().any(|f| f.exempt.is_none()) {
        choose_exempt(&wanted, ctx, now);
        wanted = shedder.filter(now);
    }
    if wanted != kernel.filters() {
        // What it dropped since the last look counts for its client too,
        // before another filter (or none) takes its place.
        report_kernel_drops(kernel, members, shedder, now);
    }
    count_kernel_drops(ctx.stats(), kernel.sync(&wanted, members.iter().map(|m| &m.socket)));
}

/// Chooses from the session table the flows each new hold in `wanted`
/// lets through (see [`super::shed_exempt`]): the client's flows opened
/// [`ESTABLISHED`] before its first hold of this run and active within
/// [`ACTIVE`]. Once per hold: the first listener task to claim it
/// chooses, and the others do not walk the table for it.
fn choose_exempt(wanted: &[Filter], ctx: &RelayContext, now: std::time::Duration) {
    let now_ms = ctx.clock().now_ms();
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    // Another task that claimed a hold chooses its flows; until it has,
    // this task's filter holds the client whole.
    for f in wanted
        .iter()
        .filter(|f| f.exempt.is_none() && ctx.shedder().claim_exempt(f.client))
    {
        let before = now.saturating_sub(f.since) + ESTABLISHED;
        let keys = ctx.table().established(
            f.client,
            now_ms.saturating_sub(ms(before)),
            now_ms.saturating_sub(ms(ACTIVE)),
            // Room for flows that are one to the filter (`Exempt::new`).
            2 * EXEMPT,
        );
        let exempt = Exempt::new(keys.iter().filter_map(ExemptFlow::of));
        tracing::debug!(client = ?f.client, exempt = ?exempt, "held client's established flows let through");
        ctx.shedder().exempt(f.client, exempt);
    }
}

/// Tells the shedder what this task's filter dropped since it last
/// looked, and whose datagrams those were, and which flows it let
/// through came at a flood's rate.
fn report_kernel_drops(kernel: &mut Applied, members: &[Member], shedder: &SharedShedder, now: std::time::Duration) {
    if kernel.filters().is_empty() {
        return;
    }
    for (client, flow) in kernel.take_heavy() {
        tracing::debug!(?client, ?flow, "a flow let through came at a flood's rate: held");
        shedder.withdraw(client, &flow);
    }
    let held: Vec<ClientId> = kernel.filters().iter().map(|f| f.client).collect();
    let (dropped, samples) = kernel.look(members.iter().map(|m| &m.socket), now);
    shedder.kernel_dropped(&held, dropped, &samples, now);
}

/// Datagrams the kernel dropped while a filter was on: shed, like those
/// the listener drops itself, and counted apart as well.
fn count_kernel_drops(stats: &crate::stats::Stats, dropped: u64) {
    if dropped > 0 {
        stats.drop_overload.add(dropped);
        stats.shed_in_kernel.add(dropped);
    }
}

/// What ended a wait of the listener.
enum Woke {
    /// Shutdown began.
    Stop,
    /// Some members have datagrams queued.
    Ready,
    /// The kernel-side shedding filter's hold is over, or a look at what
    /// it dropped is due.
    Hold,
}

/// Collects the indices of the members with datagrams queued into `ready`;
/// pending (with every member registered for wake-up) when none has.
///
/// Only the members `asked` names (taken from `woken`) are asked: those
/// whose waker fired, and those that were ready last time (see
/// [`ReadySet`]); the others are still registered from an earlier poll.
/// Slots past the members (the shutdown wait's) are skipped.
fn poll_ready(members: &[Member], woken: &ReadySet, asked: &[usize], ready: &mut Vec<usize>) -> Poll<io::Result<()>> {
    ready.clear();
    for &i in asked {
        let (Some(m), Some(waker)) = (members.get(i), woken.waker(i)) else {
            continue;
        };
        let mut member_cx = std::task::Context::from_waker(waker);
        match m.socket.poll_recv_ready(&mut member_cx) {
            Poll::Ready(Ok(())) => {
                // Its registration is used up: ask it again next time.
                woken.mark(i);
                ready.push(i);
            }
            Poll::Ready(Err(e)) => {
                woken.mark(i);
                return Poll::Ready(Err(e));
            }
            Poll::Pending => {}
        }
    }
    if ready.is_empty() {
        Poll::Pending
    } else {
        Poll::Ready(Ok(()))
    }
}

/// The clocks a batch's datagrams are judged by, read only when shedding
/// is on: the target, the wall clock the kernel stamps them with, and the
/// shared shedder's monotonic one for the byte windows (at `now`, the
/// batch's reading of the monotonic clock).
fn shed_clocks(
    ctx: &RelayContext,
    now: std::time::Instant,
) -> Option<(std::time::Duration, std::time::Duration, std::time::Duration)> {
    let target = ctx.shed_after();
    (!target.is_zero()).then(|| {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        (target, wall, ctx.shedder().at(now))
    })
}

/// One listening socket and how many datagrams its batches ask for.
struct Member {
    socket: UdpSocket,
    local: SocketAddr,
    slots: usize,
    /// The storage of a batch's [`Run`], kept empty between batches: one
    /// allocation per batch less.
    run: Vec<&'static [u8]>,
}

/// Answers to hijacked DNS queries that were given at once while the
/// ready members took their turns, sent together after the last turn: one
/// `sendmmsg` per reply address for the round, and a GSO train for the
/// answers to one client, where each answer used to cost a system call of
/// its own.
///
/// Per round rather than per member batch: TPROXY spreads client sockets
/// over the group's members (8 by default), so a member's batch is mostly
/// one client's queries, and flushing each one cost a `sendmmsg` (and a
/// wake-up of the client) per member and round; `perf trace` of a hijacked
/// DNS run counted as many `sendmmsg` as `recvmmsg`, one or two messages
/// each. A round still ends within a few turns, and past [`FLUSH_AT`]
/// answers a member's turn sends what is gathered at once.
#[derive(Default)]
struct DnsAnswers {
    batch: ReplyBatch,
    /// Positions in `batch`, grouped by client; a pending reply's slot
    /// is its place here.
    order: Vec<u32>,
    pending: Vec<Pending>,
    scratch: ReplyScratch,
}

/// The hijacked DNS answers a listener sends: those given at once, and
/// those that come later from an upstream (gathered while the listener
/// drives its misses, see [`crate::dns::misses`]), and the misses.
struct Dns {
    now: DnsAnswers,
    later: Arc<Outbox<DnsAnswers>>,
    misses: Misses,
    /// The buffer an answer given at once is served in (see
    /// [`DnsService::answer_udp`]).
    spare: Vec<u8>,
}

impl Gather for DnsAnswers {
    fn push(&mut self, src: SocketAddr, client: SocketAddr, reply: &[u8]) {
        self.batch.push(src, client, reply);
    }

    fn gathered(&self) -> usize {
        self.batch.len()
    }
}

/// Sends later answers as the listener sends its own: from the address
/// each client asked, one `sendmmsg` per address, GSO trains per client.
/// The outbox holds the context, never the other way round.
fn later_answers(ctx: Arc<RelayContext>) -> Outbox<DnsAnswers> {
    Outbox::new(Box::new(move |answers: &mut DnsAnswers| answers.flush(&ctx)))
}

impl DnsAnswers {
    fn flush(&mut self, ctx: &RelayContext) {
        if self.batch.is_empty() {
            return;
        }
        self.order.clear();
        self.order.extend_from_slice(self.batch.by_client());
        self.pending.clear();
        for (slot, &i) in self.order.iter().enumerate() {
            if let (Some((r, _)), Ok(slot)) = (self.batch.get(i as usize), u32::try_from(slot)) {
                self.pending.push(Pending {
                    src: r.src,
                    client: r.client,
                    tos: None,
                    slot,
                });
            }
        }
        let (batch, order) = (&self.batch, &self.order);
        let payload = |slot: u32| {
            order
                .get(slot as usize)
                .and_then(|&i| batch.get(i as usize))
                .map_or(&[][..], |(_, bytes)| bytes)
        };
        ctx.replies()
            .send_pending(&mut self.pending, payload, &mut self.scratch);
        self.batch.clear();
    }
}

impl Member {
    /// Reads and hands on one turn's worth; true when the queue was drained.
    fn turn(
        &mut self,
        batch: &mut RecvBatch,
        sends: &mut UpstreamSends,
        dns: &mut Dns,
        kernel: &mut Applied,
        ctx: &Arc<RelayContext>,
    ) -> bool {
        let mut bytes = 0;
        let mut filed = false;
        let mut drained = false;
        for _ in 0..TURN_BATCHES {
            match batch.read_at_most(&self.socket, self.slots) {
                Ok(read) => {
                    let n = read.count;
                    let mut run = Run {
                        payloads: recycle(std::mem::take(&mut self.run)),
                        ..Run::default()
                    };
                    // The runs of all flows in the batch, sent together.
                    let mut out = sends.batch();
                    let mut batch_bytes = 0;
                    // One reading of the monotonic clock for the batch, for
                    // the shedder's windows and the flows' activity, which
                    // read it apart before (two readings per batch, about
                    // 90 instructions each under callgrind).
                    let now = std::time::Instant::now();
                    let now_ms = ctx.clock().ms_at(now);
                    let clocks = shed_clocks(ctx, now);
                    let mut datagrams = 0;
                    for i in 0..n {
                        if let Some((meta, payload)) = batch.get(i) {
                            batch_bytes += payload.len();
                            // Coalesced datagrams (GRO) one by one.
                            for one in segments(payload, meta.segment) {
                                datagrams += 1;
                                if let Some((target, wall, mono)) = clocks {
                                    let waited = sojourn(meta.received, wall);
                                    let client = ClientId::of(meta.peer.ip());
                                    // Judged by when it came, not when it is read:
                                    // after a stall a whole queue is read at once.
                                    let came = mono.saturating_sub(waited.unwrap_or_default());
                                    match kernel.through(client, meta.peer.port(), meta.orig_dst, one.len(), came) {
                                        // A held client's established
                                        // light flow: shed by no one.
                                        Some(Verdict::Light) => {}
                                        // At a flood's rate or bytes: shed,
                                        // and held from the next look on.
                                        Some(Verdict::Heavy) => {
                                            ctx.stats().drop_overload.inc();
                                            continue;
                                        }
                                        None => {
                                            // One the filter let through to
                                            // tell its held clients apart:
                                            // held, shed.
                                            if kernel.sampling() && kernel.sampled(client) {
                                                ctx.stats().drop_overload.inc();
                                                continue;
                                            }
                                            if ctx.shedder().offer(target, client, one.len(), waited, mono) {
                                                ctx.stats().drop_overload.inc();
                                                continue;
                                            }
                                        }
                                    }
                                }
                                filed |= handle(ctx, self.local, meta, one, now_ms, &mut run, &mut out, dns);
                            }
                        }
                    }
                    // Counted once per batch rather than per datagram.
                    ctx.stats().client_datagrams.add(datagrams);
                    ctx.stats().client_bytes.add(batch_bytes as u64);
                    run.flush(ctx, &mut out);
                    self.run = recycle(std::mem::take(&mut run.payloads));
                    out.flush(ctx.stats());
                    if dns.now.batch.len() >= FLUSH_AT {
                        dns.now.flush(ctx);
                    }
                    bytes += batch_bytes;
                    // Big datagrams: read fewer at a time, so that a turn
                    // stays near TURN_BYTES instead of a whole batch of
                    // 64 KB ones (4 MB) passing before anyone else's turn.
                    if let Some(average) = batch_bytes.checked_div(n) {
                        self.slots = (BATCH_BYTES / average.max(1)).clamp(1, BATCH);
                    }
                    if read.drained {
                        drained = true;
                        break;
                    }
                }
                Err(e) => {
                    ctx.stats().receive_errors.inc();
                    tracing::debug!(local = %self.local, error = %e, "listener receive failed");
                }
            }
            if bytes >= TURN_BYTES {
                break;
            }
        }
        if filed {
            ctx.open_backlog().wake();
        }
        drained
    }
}

/// Datagrams of one flow waiting to be sent together.
#[derive(Default)]
struct Run<'b> {
    key: Option<FlowKey>,
    session: Option<Arc<Session>>,
    dst: Option<SocketAddr>,
    tos: Option<u8>,
    payloads: Vec<&'b [u8]>,
}

impl<'b> Run<'b> {
    /// Whether a datagram with these properties can join the run.
    fn continues(&self, key: &FlowKey, dst: SocketAddr, tos: Option<u8>) -> bool {
        self.key.as_ref() == Some(key) && self.dst == Some(dst) && self.tos == tos
    }

    /// Whether a datagram from `peer` to `dst` with TOS `tos` belongs to
    /// the run, before any decision about it: the run is a relayed flow's
    /// and the datagram is that flow's.
    fn continues_from(&self, peer: SocketAddr, dst: Option<SocketAddr>, tos: Option<u8>) -> bool {
        self.session.is_some()
            && self.key.as_ref().is_some_and(|k| k.client == peer)
            && self.dst == dst
            && self.tos == tos
    }

    fn flush(&mut self, ctx: &RelayContext, out: &mut UpstreamBatch<'_, 'b>) {
        if let (Some(session), Some(dst)) = (&self.session, self.dst) {
            out.push(session, &self.payloads, dst, self.tos, ctx.stats());
        }
        self.payloads.clear();
        self.key = None;
        self.session = None;
        self.dst = None;
    }
}

/// Handles one datagram; true when it filed a new flow for the openers.
#[allow(clippy::too_many_arguments)]
fn handle<'b>(
    ctx: &Arc<RelayContext>,
    local: SocketAddr,
    meta: &DatagramMeta,
    payload: &'b [u8],
    now_ms: u64,
    run: &mut Run<'b>,
    out: &mut UpstreamBatch<'_, 'b>,
    answers: &mut Dns,
) -> bool {
    // The next datagram of the run being gathered (same client, original
    // destination and TOS, in the same batch) joins it without a second
    // decision: the rules it was decided by are those of this batch, and
    // its flow was just looked up and touched. A steady flow's batch is
    // mostly such datagrams.
    if meta.orig_dst.is_some() && run.continues_from(meta.peer, meta.orig_dst, meta.tos) {
        run.payloads.push(payload);
        return false;
    }
    let dns_port = |port: u16| ctx.dns().is_some_and(|d| d.hijacks(port));
    // What this client resolved through us, for domain rules; a lookup
    // also keeps the entry alive while the flow is in use.
    let names = |client: IpAddr, dst: IpAddr| {
        ctx.dns()
            .and_then(|d| d.engine().feed().cloned())
            .map(|feed| feed.names_in_use(client, dst))
            .unwrap_or_default()
    };
    let host = Host {
        listener: local,
        dns_port: &dns_port,
        is_local: &sockets::is_local_address,
        names: &names,
    };
    let rules = ctx.rules();
    let rule = match decide(meta.peer, meta.orig_dst, &host, &rules) {
        // Nothing an IPv6 packet may be sent to: no destination either.
        Decision::NoOriginalDestination | Decision::MappedDestination => {
            ctx.stats().drop_no_orig_dst.inc();
            return false;
        }
        Decision::Loop => {
            ctx.stats().drop_loop.inc();
            return false;
        }
        Decision::Dns => {
            if let (Some(dns), Some(dst)) = (ctx.dns(), meta.orig_dst) {
                hijack_dns(dns, meta.peer, dst, payload, answers);
            }
            return false;
        }
        Decision::Drop(_) => {
            ctx.stats().drop_by_rule.inc();
            return false;
        }
        Decision::Relay(rule) => rule,
    };
    let Some(dst) = meta.orig_dst else { return false };
    let key = FlowKey::new(meta.peer, dst, rule);
    if run.continues(&key, dst, meta.tos) {
        run.payloads.push(payload);
        return false;
    }
    run.flush(ctx, out);
    let session = match ctx.table().get(&key) {
        Some(s) => s,
        None => {
            let held = Held {
                dst,
                tos: meta.tos,
                payload: payload.to_vec(),
            };
            let number = rule.number;
            let table = ctx.table();
            let filed = ctx.open_backlog().file(table, key, held, now_ms, || {
                (arc_swap::Guard::into_inner(rules), number)
            });
            match filed {
                Filed::Open(s) => s,
                Filed::Queued => return true,
                Filed::Held => return false,
                Filed::RateLimited => {
                    ctx.stats().drop_new_flow_rate.inc();
                    return false;
                }
                Filed::Full => {
                    ctx.stats().drop_open_backlog.inc();
                    return false;
                }
            }
        }
    };
    session.touch(now_ms);
    *run = Run {
        key: Some(key),
        session: Some(session),
        dst: Some(dst),
        tos: meta.tos,
        payloads: std::mem::take(&mut run.payloads),
    };
    run.payloads.push(payload);
    false
}

/// A query to a DNS port, wherever it was going, is answered by the DNS
/// engine, and the answer leaves from the address the client asked: at
/// once into `answers.now` (sent after the batch), or later from a miss
/// the listener drives, with the other answers of its round.
fn hijack_dns(dns: &Arc<DnsService>, client: SocketAddr, dst: SocketAddr, payload: &[u8], answers: &mut Dns) {
    let Dns {
        now,
        later,
        misses,
        spare,
    } = answers;
    dns.answer_udp(
        payload,
        client,
        |answer| now.batch.push(dst, client, answer),
        || {
            let later = later.clone();
            // Sent by the listener's flush after its misses' turn (or
            // here, past a full batch).
            move |answer: &[u8]| {
                let _ = later.add(dst, client, answer);
            }
        },
        misses,
        spare,
    );
}
