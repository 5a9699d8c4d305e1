//! The opener tasks: they take the new flows the listeners filed in the
//! [`OpenBacklog`](super::open_backlog::OpenBacklog) backlog, open them, send what was held
//! for them and put them in the table.
//!
//! One task per runtime worker, owned by the relay's context (they end
//! with it). Each takes at most [`OPENS_PER_ROUND`] flows at a time, and
//! opens them one [`Slice`] at a time: every few flows it sends what it
//! held for them and files them, and once a slice is spent it lets the
//! listeners and reply readers that share its thread run before it opens
//! the rest. A burst of new flows thus costs established flows one slice
//! of opening and sending (plus a few opens), not a round and not the
//! whole burst.

use std::net::SocketAddr;
use std::sync::Arc;

use super::context::RelayContext;
use super::key::FlowKey;
use super::open::{self, OpenError, open};
use super::open_backlog::{HeldList, OPENS_PER_ROUND};
use super::rules::UdpRule;
use super::session::Session;
use super::slice::{Slice, Step};
use super::table::{Entry, Evicted, Eviction};
use super::upstream_batch::{UpstreamBatch, UpstreamSends};

/// Evictions tried for a new flow when the descriptor budget is used up.
const BUDGET_TRIES: usize = 3;

/// Flows opened before what was held for them is sent. Small enough that
/// the sends of a step (10 µs each to a veth peer, see `relay::slice`)
/// stay well within a slice; large enough that flows opened together on
/// one pooled socket still leave in one `sendmmsg`.
const SEND_EVERY: usize = 8;

/// Starts `tasks` opener tasks (at least one) for `ctx`.
pub fn start(ctx: &Arc<RelayContext>, tasks: usize) {
    for _ in 0..tasks.max(1) {
        ctx.spawn(run(ctx.clone()));
    }
}

/// Opens filed flows until the relay shuts down.
async fn run(ctx: Arc<RelayContext>) {
    let mut round = Round::default();
    loop {
        let jobs = ctx.open_backlog().take(OPENS_PER_ROUND);
        if jobs.is_empty() {
            ctx.open_backlog().woken().await;
            continue;
        }
        if ctx.open_backlog().has_waiting() {
            // More than a round's worth: another opener may take some.
            ctx.open_backlog().wake();
        }
        let mut slice = Slice::start();
        for (n, job) in jobs.iter().enumerate() {
            let rule = job.rule();
            let entry = new_flow(&ctx, job.key, job.dst, rule, &mut || round.settle(&ctx));
            round.keys.push(job.key);
            round.entries.push(entry);
            if rule.by_domain() {
                ctx.stats().domain_matches.inc();
            }
            match slice.step(round.keys.len(), SEND_EVERY) {
                Step::Work => {}
                // Sending what was held costs more than opening (see
                // `relay::slice`): done every few flows, so that the
                // slice's check after it covers the sends too.
                Step::Send => round.settle(&ctx),
                Step::Yield if n + 1 < jobs.len() => {
                    // The rest of the round waits (their datagrams are
                    // held, in order) while the others have the thread.
                    round.settle(&ctx);
                    tokio::task::yield_now().await;
                    slice = Slice::start();
                }
                Step::Yield => {}
            }
        }
        round.settle(&ctx);
        tokio::task::yield_now().await;
    }
}

/// The flows of one round, opened but not yet in the table. Their held
/// datagrams leave together, one `sendmmsg` per upstream socket, and then
/// the flows go into the table: a round of new flows costs a system call
/// per socket, not one per flow.
#[derive(Default)]
struct Round {
    keys: Vec<FlowKey>,
    /// `None`: the flow could not be opened (counted); its datagrams drop.
    entries: Vec<Option<Entry>>,
    sends: UpstreamSends,
}

impl Round {
    /// Sends what was held for the round's flows and files them in the
    /// table, under the backlog's lock so that no later datagram of a flow
    /// can overtake its held ones.
    fn settle(&mut self, ctx: &Arc<RelayContext>) {
        if self.keys.is_empty() {
            return;
        }
        let Round { keys, entries, sends } = self;
        // One clock read for the round: its flows were opened a moment ago.
        let now = ctx.now_ms();
        let evicted = ctx.open_backlog().complete_all(keys.iter(), |held| {
            let mut out = sends.batch();
            for (entry, held) in entries.iter().zip(&held) {
                if let Some(entry) = entry {
                    queue_held(&entry.session, held, &mut out, now, ctx);
                }
            }
            out.flush(ctx.stats());
            let mut evicted = Vec::new();
            for (&key, entry) in keys.iter().zip(entries.drain(..)) {
                let Some(entry) = entry else { continue };
                // Only openers file flows and a flow is filed once; should
                // another have come first, ours ends here with its entry.
                if let Ok((_, e)) = ctx.table().insert(key, entry, now) {
                    evicted.extend(e);
                }
            }
            evicted
        });
        keys.clear();
        entries.clear();
        for e in evicted {
            count_evicted(ctx, Some(e));
        }
    }
}

/// Queues held datagrams in order, consecutive ones to the same place as
/// one run.
fn queue_held<'p>(
    session: &Arc<Session>,
    held: &'p HeldList,
    out: &mut UpstreamBatch<'_, 'p>,
    now_ms: u64,
    ctx: &RelayContext,
) {
    session.touch(now_ms);
    let stats = ctx.stats();
    if held.len() == 1 {
        // Most new flows hold their first datagram alone: no run to build.
        if let Some(one) = held.iter().next() {
            out.push(session, &[one.payload.as_slice()], one.dst, one.tos, stats);
        }
        return;
    }
    let mut run: Vec<&'p [u8]> = Vec::with_capacity(held.len());
    let mut to: Option<(SocketAddr, Option<u8>)> = None;
    for h in held.iter() {
        if let Some((dst, tos)) = to.filter(|&(dst, tos)| dst != h.dst || tos != h.tos) {
            out.push(session, &run, dst, tos, stats);
            run.clear();
        }
        to = Some((h.dst, h.tos));
        run.push(h.payload.as_slice());
    }
    if let Some((dst, tos)) = to {
        out.push(session, &run, dst, tos, stats);
    }
}

/// Makes room for and opens a new flow, as the limits say. `None` when it
/// cannot be opened (counted).
/// `settle` files the flows opened before in this round first, so that
/// evictions for descriptors can find them.
fn new_flow(
    ctx: &Arc<RelayContext>,
    key: FlowKey,
    dst: SocketAddr,
    rule: &UdpRule,
    settle: &mut dyn FnMut(),
) -> Option<Entry> {
    let table = ctx.table();
    let owner = key.owner();
    count_evicted(ctx, table.make_room(owner));
    let mut opened = open(key, dst, rule, ctx);
    if matches!(opened, Err(OpenError::Budget)) {
        settle();
    }
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
    match opened {
        Ok(o) => Some(Entry::new(o.session, o.task)),
        Err(OpenError::Budget) => {
            ctx.stats().drop_fd_budget.inc();
            None
        }
        Err(e) => {
            ctx.stats().drop_session_open_failed.inc();
            tracing::debug!(client = %key.client, %dst, error = %e, "cannot open session");
            None
        }
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
