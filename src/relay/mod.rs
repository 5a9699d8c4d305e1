//! The transparent UDP relay.
//!
//! Data flows one way through these modules:
//!
//! ```text
//! datagram ─▶ listener ─▶ table (flow → session) ─▶ session: upstream socket ─▶ server
//!                                                         │
//! client ◀── reply (socket bound to the original destination) ◀── session pump
//! ```
//!
//! * [`listener`] reads redirected datagrams and their original destination;
//! * [`table`] maps each flow to its [`session`], bounded and LRU-ordered;
//! * [`session`] owns a flow's marked upstream socket and the task that pumps
//!   replies back and closes the flow when idle;
//! * [`reply`] sends those replies from the spoofed original address.

pub mod clock;
pub mod expiry;
pub mod listener;
pub mod pool;
pub mod reply;
pub mod rules;
pub mod session;
pub mod socks5;
pub mod table;

use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::RelayConfig;
use crate::dns::DnsService;
use crate::stats::Stats;
use clock::Clock;
use pool::UpstreamPools;
use reply::ReplySender;
use rules::UdpRules;
use table::SessionTable;

/// A flow, as a NAT would see it: who sent, and where it was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub target: Target,
}

/// The second half of a flow's identity, which depends on its NAT mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Symmetric: one flow per original destination.
    Destination(SocketAddr),
    /// Full cone: one flow per client endpoint (and rule), whatever the
    /// destination.
    Cone(usize),
}

/// What the listener and every session share.
#[derive(Debug)]
pub struct RelayContext {
    pub mark: u32,
    /// Swapped whole on reload; flows keep the route they were opened with.
    pub rules: ArcSwap<UdpRules>,
    pub table: SessionTable,
    pub replies: ReplySender,
    /// Upstream sockets shared by one-destination flows.
    pub pools: UpstreamPools,
    /// The shortest idle timeout any session has had (for the sweeper).
    min_idle_ms: AtomicU64,
    pub clock: Clock,
    pub stats: Arc<Stats>,
    /// Answers diverted datagrams to DNS ports instead of relaying them.
    pub dns: Option<Arc<DnsService>>,
}

impl RelayContext {
    pub fn new(config: &RelayConfig, mark: u32, stats: Arc<Stats>, dns: Option<Arc<DnsService>>) -> Self {
        RelayContext {
            mark,
            rules: ArcSwap::from_pointee(UdpRules::new(config, mark)),
            table: SessionTable::new(config.session_capacity),
            replies: ReplySender::new(config.reply_sockets, mark, stats.clone()),
            pools: UpstreamPools::default(),
            min_idle_ms: AtomicU64::new(u64::MAX),
            clock: Clock::new(),
            stats,
            dns,
        }
    }
}

impl RelayContext {
    /// Remembers the shortest idle timeout in use.
    pub fn note_idle_timeout(&self, idle_ms: u64) {
        self.min_idle_ms.fetch_min(idle_ms, Ordering::Relaxed);
    }

    /// The shortest idle timeout any session has had, milliseconds.
    pub fn min_idle_ms(&self) -> u64 {
        self.min_idle_ms.load(Ordering::Relaxed)
    }
}
