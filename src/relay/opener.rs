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
use super::key::{ClientId, FlowKey};
use super::open::{self, OpenError, open};
use super::open_backlog::{Held, HeldList, OPENS_PER_ROUND};
use super::redecide::{Now, decide_again, decide_for};
use super::rules::{UdpRule, UdpRules};
use super::session::Session;
use super::slice::{Slice, Step};
use super::table::{Entry, Evicted, Eviction, Unfiled};
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
    // Kept from round to round: a round's list was up to four allocations.
    let mut jobs = Vec::with_capacity(OPENS_PER_ROUND);
    loop {
        ctx.open_backlog().take_into(OPENS_PER_ROUND, &mut jobs);
        if jobs.is_empty() {
            ctx.open_backlog().woken().await;
            continue;
        }
        if ctx.open_backlog().has_waiting() {
            // More than a round's worth: another opener may take some.
            ctx.open_backlog().wake();
        }
        let mut slice = Slice::start();
        // The slice's start stands for "now" while it lasts (it is short,
        // see `relay::slice`): one clock read per slice instead of one per
        // flow. Filing the flows touches them with a later reading anyway.
        let mut now_ms = ctx.clock().ms_at(slice.started());
        for (n, job) in jobs.iter().enumerate() {
            let unfiled = round.unfiled(job.key.owner());
            let entry = {
                // A reload may have come since the flow was filed.
                let current = ctx.rules();
                match decide_again(job, &current, |rules| ctx.route(rules, job.key.client, job.dst)) {
                    Now::Open(rule) => {
                        if rule.by_domain() {
                            ctx.stats().domain_matches.inc();
                        }
                        new_flow(&ctx, job.key, job.dst, rule, now_ms, unfiled, &mut || {
                            round.settle(&ctx)
                        })
                    }
                    // Its held datagrams are dropped when the round
                    // settles; counted once for the flow.
                    Now::Dropped => {
                        ctx.stats().drop_by_rule.inc();
                        None
                    }
                    Now::Moved => {
                        ctx.stats().drop_session_open_failed.inc();
                        None
                    }
                }
            };
            round.keys.push(job.key);
            round.filed_under.push(job.rules.generation());
            round.entries.push(entry);
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
                    now_ms = ctx.clock().ms_at(slice.started());
                }
                Step::Yield => {}
            }
        }
        round.settle(&ctx);
        // Their rules go now, not at the next round's start.
        jobs.clear();
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
    /// The generation of the rules each flow was filed under: what was
    /// held for a flow filed before a reload is decided again, datagram
    /// by datagram, when it is sent.
    filed_under: Vec<u64>,
    /// `None`: the flow could not be opened (counted); its datagrams drop.
    entries: Vec<Option<Entry>>,
    sends: UpstreamSends,
    /// What the backlog held for the flows being filed (kept to save an
    /// allocation per filing).
    held: Vec<HeldList>,
}

impl Round {
    /// The round's flows that are open but not yet filed, all and those
    /// of `owner`: they take table slots when filed.
    fn unfiled(&self, owner: ClientId) -> Unfiled {
        let mut unfiled = Unfiled::default();
        for (key, entry) in self.keys.iter().zip(&self.entries) {
            if entry.is_some() {
                unfiled.all += 1;
                unfiled.own += usize::from(key.owner() == owner);
            }
        }
        unfiled
    }

    /// Sends what was held for the round's flows and files them in the
    /// table, under the backlog's lock so that no later datagram of a flow
    /// can overtake its held ones.
    fn settle(&mut self, ctx: &Arc<RelayContext>) {
        if self.keys.is_empty() {
            return;
        }
        let Round {
            keys,
            filed_under,
            entries,
            sends,
            held,
        } = self;
        // One clock read for the round: its flows were opened a moment ago.
        let now = ctx.now_ms();
        let current = ctx.rules();
        let evicted = ctx.open_backlog().complete_all(keys.iter(), held, |held| {
            let mut out = sends.batch();
            for ((entry, held), &generation) in entries.iter().zip(held).zip(filed_under.iter()) {
                let Some(entry) = entry else { continue };
                let session = &entry.session;
                if generation == current.generation() {
                    queue_held(session, held, &mut out, now, ctx, |_| true);
                } else {
                    let still = |h: &Held| relayed_still(session.key, h, ctx, &current);
                    queue_held(session, held, &mut out, now, ctx, still);
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
        filed_under.clear();
        entries.clear();
        for e in evicted {
            count_evicted(ctx, Some(e));
        }
    }
}

/// Queues held datagrams in order, consecutive ones to the same place as
/// one run; only those `relays` says still go (all of them, but for a flow
/// filed before a reload: see [`relayed_still`]).
fn queue_held<'p>(
    session: &Arc<Session>,
    held: &'p HeldList,
    out: &mut UpstreamBatch<'_, 'p>,
    now_ms: u64,
    ctx: &RelayContext,
    mut relays: impl FnMut(&Held) -> bool,
) {
    session.touch(now_ms);
    let stats = ctx.stats();
    if held.len() == 1 {
        // Most new flows hold their first datagram alone: no run to build.
        if let Some(one) = held.iter().next().filter(|&h| relays(h)) {
            out.push(session, &[one.payload.as_slice()], one.dst, one.tos, stats);
        }
        return;
    }
    let mut run: Vec<&'p [u8]> = Vec::with_capacity(held.len());
    let mut to: Option<(SocketAddr, Option<u8>)> = None;
    for h in held.iter().filter(|&h| relays(h)) {
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

/// Whether the datagram `h` held for the flow `key`, filed under rules a
/// reload has since replaced, is still relayed as this flow under
/// `current` (see `redecide::decide_for`); a datagram that is not is
/// counted as dropped. Rare (a reload), so decided one by one.
fn relayed_still(key: FlowKey, h: &Held, ctx: &RelayContext, current: &UdpRules) -> bool {
    match decide_for(key, h.dst, ctx.route(current, key.client, h.dst)) {
        Now::Open(_) => true,
        Now::Dropped => {
            ctx.stats().drop_by_rule.inc();
            false
        }
        Now::Moved => {
            ctx.stats().drop_session_open_failed.inc();
            false
        }
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
    now_ms: u64,
    unfiled: Unfiled,
    settle: &mut dyn FnMut(),
) -> Option<Entry> {
    let table = ctx.table();
    let owner = key.owner();
    count_evicted(ctx, table.make_room(owner, unfiled, now_ms));
    let mut opened = open(key, dst, rule, ctx, now_ms);
    if matches!(opened, Err(OpenError::Budget)) {
        settle();
    }
    // Out of descriptors. A pooled flow takes over a socket from the flows
    // in its way there (a client that busy is the heaviest, or close to
    // it); a flow that needs its own socket gets the descriptor of the
    // oldest descriptor-holding flow of the client holding the most. A few tries: a socket's blockers may
    // be on their way out already.
    for _ in 0..BUDGET_TRIES {
        if !matches!(opened, Err(OpenError::Budget)) {
            break;
        }
        let in_the_way = open::in_the_way(key, dst, rule, ctx);
        if in_the_way.is_empty() {
            count_evicted(ctx, table.evict_for_descriptor());
        }
        for session in in_the_way {
            let entry = table.remove(&session);
            count_evicted(
                ctx,
                entry.map(|entry| Evicted {
                    reason: Eviction::FdBudget,
                    entry,
                }),
            );
        }
        // An evicted flow on a socket of its own leaves it to its reader.
        open::let_go_of_closed(ctx);
        opened = open(key, dst, rule, ctx, now_ms);
    }
    match opened {
        Ok(o) => Some(Entry::with_permits(o.session, o.task, o.permits)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::key::Target;

    fn key(client: &str, port: u16) -> FlowKey {
        FlowKey {
            client: SocketAddr::new(client.parse().unwrap(), port),
            target: Target::Destination(([198, 51, 100, 7], 7000).into()),
        }
    }

    #[tokio::test]
    async fn a_round_counts_its_opened_flows_not_yet_filed() {
        let mut round = Round::default();
        let opened = |k| Some(Entry::new(Arc::new(Session::detached(k, 60_000, 0)), None));
        for (k, entry) in [
            (key("192.0.2.10", 1), opened(key("192.0.2.10", 1))),
            (key("192.0.2.10", 2), opened(key("192.0.2.10", 2))),
            (key("192.0.2.11", 1), opened(key("192.0.2.11", 1))),
            // Could not be opened: it will take no slot.
            (key("192.0.2.10", 3), None),
        ] {
            round.keys.push(k);
            round.entries.push(entry);
        }
        let owner = |c: &str| key(c, 9).owner();
        assert_eq!(round.unfiled(owner("192.0.2.10")), Unfiled { all: 3, own: 2 });
        assert_eq!(round.unfiled(owner("192.0.2.12")), Unfiled { all: 3, own: 0 });
        assert_eq!(Round::default().unfiled(owner("192.0.2.10")), Unfiled::default());
    }
}
