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
pub mod listener;
pub mod reply;
pub mod session;
pub mod table;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::RelayConfig;
use crate::dns::DnsService;
use crate::stats::Stats;
use clock::Clock;
use reply::ReplySender;
use table::SessionTable;

/// A flow, as a NAT would see it: who sent, and where it was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub dst: SocketAddr,
}

/// What the listener and every session share.
#[derive(Debug)]
pub struct RelayContext {
    pub mark: u32,
    pub idle_timeout: Duration,
    pub table: SessionTable,
    pub replies: ReplySender,
    pub clock: Clock,
    pub stats: Arc<Stats>,
    /// Answers diverted datagrams to DNS ports instead of relaying them.
    pub dns: Option<Arc<DnsService>>,
}

impl RelayContext {
    pub fn new(
        config: &RelayConfig,
        mark: u32,
        stats: Arc<Stats>,
        dns: Option<Arc<DnsService>>,
    ) -> Self {
        RelayContext {
            mark,
            idle_timeout: config.idle_timeout,
            table: SessionTable::new(config.session_capacity),
            replies: ReplySender::new(config.reply_sockets, mark, stats.clone()),
            clock: Clock::new(),
            stats,
            dns,
        }
    }
}
