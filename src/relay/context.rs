//! What the listeners, the flows and their tasks share, behind methods.
//!
//! The context owns the relay's state (rules, table, pools, reply sockets,
//! descriptor budget) and every task the relay spawns: each goes into one
//! [`TaskTracker`] and stops when one [`CancellationToken`] fires, as the
//! tasks of hickory-server's `ServerFuture` do, so [`RelayContext::shutdown`]
//! ends them all and waits for them.

use arc_swap::{ArcSwap, Guard};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::budget::{FdShare, Plan};
use super::clock::Clock;
use super::key::Target;
use super::open_backlog::OpenBacklog;
use super::pool::Pools;
use super::pool_readers::PoolReaders;
use super::reply::ReplySender;
use super::rules::{Route, UdpRule, UdpRules};
use super::session::Session;
use super::shed::SharedShedder;
use super::socks_queue::SocksBudget;
use super::table::{Limits, SessionTable};
use crate::config::RelayConfig;
use crate::dns::DnsService;
use crate::stats::Stats;

#[derive(Debug)]
pub struct RelayContext {
    mark: u32,
    /// Swapped whole on reload; flows keep the route they were opened with
    /// (those a drop rule now matches end).
    rules: ArcSwap<UdpRules>,
    table: SessionTable,
    replies: ReplySender,
    /// Upstream sockets shared by one-destination flows.
    pools: Pools<Session>,
    /// What reads them.
    pool_readers: PoolReaders,
    /// Descriptors for flow sockets (pooled, full cone, SOCKS5).
    flow_fds: Arc<FdShare>,
    /// New flows waiting for an opener task.
    open_backlog: OpenBacklog,
    /// Bytes queued for SOCKS5 flows' tasks (`relay.socks5_queue_bytes`).
    socks_budget: Arc<SocksBudget>,
    plan: Plan,
    /// The shortest idle timeout any session has had (for the sweeper).
    min_idle_ms: AtomicU64,
    /// `relay.shed_after_ms`, read by the listeners each round (reload).
    shed_after_ms: AtomicU64,
    /// The listeners' one overload judgement (see [`SharedShedder`]).
    shedder: SharedShedder,
    clock: Clock,
    stats: Arc<Stats>,
    /// Answers diverted datagrams to DNS ports instead of relaying them.
    dns: Option<Arc<DnsService>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

fn limits(config: &RelayConfig) -> Limits {
    Limits {
        capacity: config.session_capacity.get(),
        per_client: config.client_quota(),
        new_flows_per_sec: config.new_flows_per_client,
    }
}

fn reply_capacity(plan: &Plan) -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(plan.reply).unwrap_or(std::num::NonZeroUsize::MIN)
}

impl RelayContext {
    /// The relay for `config`, planning descriptors for the soft limit
    /// `fd_limit`.
    pub fn new(
        config: &RelayConfig,
        mark: u32,
        stats: Arc<Stats>,
        dns: Option<Arc<DnsService>>,
        fd_limit: usize,
    ) -> Self {
        let plan = Plan::new(config, fd_limit);
        let flow_fds = FdShare::new(plan.flows);
        tracing::info!(
            limit = plan.limit,
            reserve = plan.reserve,
            reply_sockets = plan.reply,
            flow_sockets = plan.flows,
            "descriptor budget"
        );
        RelayContext {
            mark,
            rules: ArcSwap::from_pointee(UdpRules::new(config, mark)),
            table: SessionTable::new(limits(config)),
            replies: ReplySender::new(reply_capacity(&plan), mark, stats.clone()),
            pools: Pools::new(flow_fds.clone(), config.receive_buffer),
            pool_readers: PoolReaders::default(),
            flow_fds,
            open_backlog: OpenBacklog::new(),
            socks_budget: SocksBudget::new(config.socks5_queue_bytes),
            plan,
            min_idle_ms: AtomicU64::new(u64::MAX),
            shed_after_ms: AtomicU64::new(config.shed_after_ms),
            shedder: SharedShedder::new(std::time::Duration::from_millis(config.shed_after_ms)),
            clock: Clock::new(),
            stats,
            dns,
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Applies a reloaded `[relay]`: rules, table limits, reply sockets,
    /// budget. Returns how many flows the new limits ended.
    pub fn apply(&self, config: &RelayConfig) -> usize {
        let rules = Arc::new(UdpRules::new(config, self.mark));
        self.rules.store(rules.clone());
        let dropped = self.end_dropped_flows(&rules);
        if dropped > 0 {
            tracing::info!(ended = dropped, "live flows that a drop rule now matches ended");
        }
        let ended = self.table.set_limits(limits(config)).len();
        self.stats.sessions_evicted.add(ended as u64);
        let plan = Plan::new(config, self.plan.limit);
        self.replies.resize(reply_capacity(&plan));
        self.flow_fds.set_max(plan.flows);
        self.shed_after_ms.store(config.shed_after_ms, Ordering::Relaxed);
        self.socks_budget.set_limit(config.socks5_queue_bytes);
        ended
    }

    /// Ends the live one-destination flows that `rules` drop, and says
    /// how many there were.
    ///
    /// Live flows keep the route they were opened with, but a drop rule is
    /// no route: the listener decides each datagram before it looks the
    /// flow up, so the client's datagrams were dropped while the flow
    /// stayed, and its destination went on reaching the client through it
    /// (each datagram also kept it from going idle) for as long as it
    /// liked. A full-cone flow has no one destination to judge and stays.
    fn end_dropped_flows(&self, rules: &UdpRules) -> usize {
        let ended = self.table.take_where(|key| match key.target {
            Target::Destination(dst) => self.route(rules, key.client, dst).route == Route::Drop,
            Target::Cone(_) => false,
        });
        // Dropped here, outside the table's lock.
        ended.len()
    }

    /// The rule `rules` give the flow from `client` to `dst`, with the
    /// names tproxyd's DNS answered `client` for `dst`'s address (asked
    /// only when a domain rule is reached): as the listener decides.
    pub fn route<'r>(&self, rules: &'r UdpRules, client: SocketAddr, dst: SocketAddr) -> &'r UdpRule {
        let names = || {
            self.dns()
                .and_then(|d| d.engine().feed().cloned())
                .map(|feed| feed.names_in_use(client.ip(), dst.ip()))
                .unwrap_or_default()
        };
        rules.route_named(client, dst, &names)
    }

    /// The listeners' overload target (`relay.shed_after_ms`); zero: off.
    pub fn shed_after(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.shed_after_ms.load(Ordering::Relaxed))
    }

    /// The overload shedder every listener task shares.
    pub fn shedder(&self) -> &SharedShedder {
        &self.shedder
    }

    pub fn mark(&self) -> u32 {
        self.mark
    }

    pub fn rules(&self) -> Guard<Arc<UdpRules>> {
        self.rules.load()
    }

    pub fn table(&self) -> &SessionTable {
        &self.table
    }

    pub fn replies(&self) -> &ReplySender {
        &self.replies
    }

    pub fn pools(&self) -> &Pools<Session> {
        &self.pools
    }

    pub fn pool_readers(&self) -> &PoolReaders {
        &self.pool_readers
    }

    pub fn socks_budget(&self) -> &Arc<SocksBudget> {
        &self.socks_budget
    }

    pub fn open_backlog(&self) -> &OpenBacklog {
        &self.open_backlog
    }

    pub fn flow_fds(&self) -> &Arc<FdShare> {
        &self.flow_fds
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn shared_stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn dns(&self) -> Option<&Arc<DnsService>> {
        self.dns.as_ref()
    }

    /// Remembers the shortest idle timeout in use.
    pub fn note_idle_timeout(&self, idle_ms: u64) {
        self.min_idle_ms.fetch_min(idle_ms, Ordering::Relaxed);
    }

    /// The shortest idle timeout any session has had, milliseconds.
    pub fn min_idle_ms(&self) -> u64 {
        self.min_idle_ms.load(Ordering::Relaxed)
    }

    /// Runs `task` until it ends or the relay shuts down.
    pub fn spawn(&self, task: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.tasks.spawn(async move {
            cancel.run_until_cancelled(task).await;
        });
    }

    /// Runs a flow's `task` until it ends, the relay shuts down, or the
    /// returned guard (kept in the flow's table entry) is dropped.
    pub fn spawn_flow(&self, task: impl Future<Output = ()> + Send + 'static) -> DropGuard {
        let token = self.cancel.child_token();
        let stop = token.clone();
        self.tasks.spawn(async move {
            stop.run_until_cancelled(task).await;
        });
        token.drop_guard()
    }

    /// Ends every flow and task of the relay and waits for the tasks.
    /// Returns how many flows were open.
    pub async fn shutdown(&self) -> usize {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.table.clear()
    }
}
