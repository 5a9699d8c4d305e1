//! The TPROXY listener: reads redirected datagrams in batches, with their
//! original destinations, and hands each to the flow it belongs to.
//!
//! Consecutive datagrams of one flow (a game or a bulk transfer sends in
//! bursts) are passed on as a *run*, which the session sends with one
//! system call; see [`crate::net::send::send_run`].
//!
//! A listener shares its worker thread with the tasks that carry replies
//! home, so its work between yields is bounded: a round ends after
//! [`BYTES_PER_ROUND`] bytes or [`OPENS_PER_ROUND`] new flows, whichever
//! comes first. A flood of 64 KB datagrams or of new flows then delays
//! other flows' replies by one round, not by the whole flood.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tokio::net::UdpSocket;

use super::context::RelayContext;
use super::decide::{Decision, Host, decide};
use super::key::FlowKey;
use super::open::{self, OpenError, open};
use super::rules::UdpRule;
use super::session::Session;
use super::table::{Entry, Evicted, Eviction};
use crate::dns::DnsService;
use crate::net::recv::{BATCH, DatagramMeta, RecvBatch};
use crate::net::sockets;
use crate::shutdown::Shutdown;

/// Bytes read per round before other tasks get the thread.
pub const BYTES_PER_ROUND: usize = 1 << 20;
/// Bytes one batch should hold, judging by the last batch's datagrams.
const BYTES_PER_BATCH: usize = 256 << 10;
/// Flows opened per round before other tasks get the thread.
pub const OPENS_PER_ROUND: usize = 64;
/// Evictions tried for a new flow when the descriptor budget is used up.
const BUDGET_TRIES: usize = 3;
/// Batches read per round at most (small datagrams).
const BATCHES_PER_ROUND: usize = 8;

/// Serves one listening socket until shutdown.
pub async fn serve(socket: UdpSocket, ctx: Arc<RelayContext>, mut shutdown: Shutdown) -> io::Result<()> {
    let local = socket.local_addr()?;
    let mut batch = RecvBatch::new(BATCH);
    let mut slots = BATCH;
    loop {
        tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            ready = socket.readable() => ready?,
        }
        let mut drained = false;
        let mut bytes = 0;
        let mut opens = 0;
        for _ in 0..BATCHES_PER_ROUND {
            match batch.read_at_most(&socket, slots) {
                Ok(read) => {
                    let n = read.count;
                    let mut run = Run::default();
                    let mut batch_bytes = 0;
                    for i in 0..n {
                        if let Some((meta, payload)) = batch.get(i) {
                            batch_bytes += payload.len();
                            if handle(&ctx, local, meta, payload, &mut run) {
                                opens += 1;
                            }
                        }
                    }
                    run.flush(&ctx);
                    bytes += batch_bytes;
                    // Big datagrams: read fewer at a time, so that a round
                    // stays near BYTES_PER_ROUND instead of a whole batch of
                    // 64 KB ones (4 MB) passing before anyone else's turn.
                    if let Some(average) = batch_bytes.checked_div(n) {
                        slots = (BYTES_PER_BATCH / average.max(1)).clamp(1, BATCH);
                    }
                    if read.drained {
                        drained = true;
                        break;
                    }
                }
                Err(e) => {
                    ctx.stats().receive_errors.inc();
                    tracing::debug!(%local, error = %e, "listener receive failed");
                }
            }
            if bytes >= BYTES_PER_ROUND || opens >= OPENS_PER_ROUND {
                break;
            }
        }
        if !drained {
            // Still more queued: let other tasks run before reading on.
            tokio::task::yield_now().await;
        }
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

    fn flush(&mut self, ctx: &RelayContext) {
        if let (Some(session), Some(dst)) = (&self.session, self.dst) {
            if !self.payloads.is_empty() {
                session.send_upstream(&self.payloads, dst, self.tos, ctx.stats());
            }
        }
        self.payloads.clear();
        self.key = None;
        self.session = None;
        self.dst = None;
    }
}

/// Handles one datagram; true when it opened (or tried to open) a flow.
fn handle<'b>(
    ctx: &Arc<RelayContext>,
    local: SocketAddr,
    meta: &DatagramMeta,
    payload: &'b [u8],
    run: &mut Run<'b>,
) -> bool {
    ctx.stats().client_datagrams.inc();
    ctx.stats().client_bytes.add(payload.len() as u64);
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
        Decision::NoOriginalDestination => {
            ctx.stats().drop_no_orig_dst.inc();
            return false;
        }
        Decision::Loop => {
            ctx.stats().drop_loop.inc();
            return false;
        }
        Decision::Dns => {
            if let (Some(dns), Some(dst)) = (ctx.dns(), meta.orig_dst) {
                hijack_dns(ctx, dns, meta.peer, dst, payload);
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
    run.flush(ctx);
    let (session, opened) = match ctx.table().get(&key) {
        Some(s) => (s, false),
        None => match new_flow(ctx, key, dst, rule) {
            Some(s) => {
                if rule.by_domain() {
                    ctx.stats().domain_matches.inc();
                }
                (s, true)
            }
            None => return true,
        },
    };
    session.touch(ctx.now_ms());
    *run = Run {
        key: Some(key),
        session: Some(session),
        dst: Some(dst),
        tos: meta.tos,
        payloads: std::mem::take(&mut run.payloads),
    };
    run.payloads.push(payload);
    opened
}

/// Admits, opens and files a new flow, making room as the limits say.
/// `None` when the datagram is dropped (and counted).
fn new_flow(ctx: &Arc<RelayContext>, key: FlowKey, dst: SocketAddr, rule: &UdpRule) -> Option<Arc<Session>> {
    let table = ctx.table();
    let owner = key.owner();
    if !table.admit(owner, ctx.now_ms()) {
        ctx.stats().drop_new_flow_rate.inc();
        return None;
    }
    count_evicted(ctx, table.make_room(owner));
    let mut opened = open(key, dst, rule, ctx);
    // Out of descriptors. A pooled flow takes over a socket from the flows
    // in its way there (a client that busy is the heaviest, or close to
    // it); a flow that needs its own socket gets the descriptor of the
    // heaviest client's oldest flow. A few tries: a socket's blockers may
    // be on their way out already.
    for _ in 0..BUDGET_TRIES {
        if !matches!(opened, Err(OpenError::Budget)) {
            break;
        }
        let in_the_way = open::in_the_way(key, dst, rule, ctx);
        if in_the_way.is_empty() {
            count_evicted(ctx, table.evict_heaviest());
        }
        for session in in_the_way {
            let entry = table.remove(&session.key, session.id);
            count_evicted(
                ctx,
                entry.map(|entry| Evicted {
                    reason: Eviction::FdBudget,
                    entry,
                }),
            );
        }
        opened = open(key, dst, rule, ctx);
    }
    let opened = match opened {
        Ok(o) => o,
        Err(OpenError::Budget) => {
            ctx.stats().drop_fd_budget.inc();
            return None;
        }
        Err(e) => {
            ctx.stats().drop_session_open_failed.inc();
            tracing::debug!(client = %key.client, %dst, error = %e, "cannot open session");
            return None;
        }
    };
    match table.insert(key, Entry::new(opened.session, opened.task), ctx.now_ms()) {
        Ok((session, evicted)) => {
            for e in evicted {
                count_evicted(ctx, Some(e));
            }
            Some(session)
        }
        // Opened meanwhile on another thread: use that one.
        Err(_ours) => table.get(&key),
    }
}

fn count_evicted(ctx: &RelayContext, evicted: Option<Evicted>) {
    let Some(e) = evicted else { return };
    let counter = match e.reason {
        Eviction::TableFull => &ctx.stats().sessions_evicted,
        Eviction::ClientQuota => &ctx.stats().sessions_evicted_quota,
        Eviction::FdBudget => &ctx.stats().sessions_evicted_budget,
    };
    counter.inc();
    tracing::debug!(client = %e.entry.session.key.client, reason = ?e.reason, "session evicted");
}

/// A query to a DNS port, wherever it was going, is answered by the DNS
/// engine, and the answer leaves from the address the client asked.
fn hijack_dns(ctx: &Arc<RelayContext>, dns: &Arc<DnsService>, client: SocketAddr, dst: SocketAddr, payload: &[u8]) {
    let ctx = ctx.clone();
    dns.answer_udp(payload, client, move |answer| {
        ctx.replies().send(dst, &[answer], client, None)
    });
}
