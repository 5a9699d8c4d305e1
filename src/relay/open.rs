//! Opening a flow: its upstream, its reply address, and its task.
//!
//! [`open`] builds the session a rule asks for and starts whatever task it
//! needs (owned by the relay, ended when the returned guard is dropped);
//! the caller puts both in the table. When the descriptor budget is used
//! up, the caller evicts a flow and asks again.

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio_util::sync::DropGuard;

use super::budget::Permit;
use super::context::RelayContext;
use super::inbound;
use super::key::FlowKey;
use super::pool::{PoolError, PoolKey};
use super::rules::{Route, UdpRule};
use super::session::{Session, Upstream};
use super::socks_queue;
use crate::config::NatMode;
use crate::net::sockets;

/// Datagrams queued for a SOCKS5 flow while its association is set up or
/// its task waits for the worker (and at most
/// [`super::socks_queue::FLOW_BYTES`] of them).
const SOCKS_BACKLOG: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("dropped flows have no session")]
    Dropped,
    #[error("descriptor budget for flow sockets used up")]
    Budget,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<PoolError> for OpenError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::Budget => OpenError::Budget,
            PoolError::Io(e) => OpenError::Io(e),
        }
    }
}

/// A new flow, the guard of its task, if it has one, and the permits of
/// the descriptors its task holds (none for a pooled flow).
pub struct Opened {
    pub session: Arc<Session>,
    pub task: Option<DropGuard>,
    pub permits: Vec<Permit>,
}

fn permit(ctx: &RelayContext) -> Result<Permit, OpenError> {
    ctx.flow_fds().try_take().ok_or(OpenError::Budget)
}

/// The pool and remote of a one-destination flow to `dst` under `rule`;
/// `None` for flows that own their socket (full cone, SOCKS5) or are dropped.
fn pooled(dst: SocketAddr, rule: &UdpRule, ctx: &RelayContext) -> Option<(PoolKey, SocketAddr)> {
    if rule.nat != NatMode::Symmetric {
        return None;
    }
    let (mark, device, target) = match &rule.route {
        Route::Direct => (ctx.mark(), None, dst),
        Route::Redirect(to) => (ctx.mark(), None, *to),
        Route::Interface { device, mark } => (*mark, device.clone(), dst),
        Route::Socks5(_) | Route::Drop => return None,
    };
    let key = PoolKey {
        v6: target.is_ipv6(),
        mark,
        device,
    };
    Some((key, target))
}

/// The flows to end so that `key` (to `dst`, under `rule`) can be opened
/// when the descriptor budget is used up: for a pooled flow, those holding
/// the one socket it could share (least recently active first); for a flow
/// that needs a socket of its own, none (the caller frees a descriptor by
/// evicting a flow that holds one, see `SessionTable::evict_for_descriptor`).
pub fn in_the_way(key: FlowKey, dst: SocketAddr, rule: &UdpRule, ctx: &RelayContext) -> Vec<Arc<Session>> {
    match pooled(dst, rule, ctx) {
        Some((pool, target)) if !rule.own_socket(dst) => {
            ctx.pools()
                .in_the_way(&pool, key.client, target, Session::last_active_ms)
        }
        _ => Vec::new(),
    }
}

/// Lets the readers go of the sockets of their own whose flows have ended
/// (see `Pools::take_closed_own`): their descriptors go back to the budget
/// now rather than at the next sweep, so that a flow evicted for its
/// descriptor makes room for the one that needed it.
pub fn let_go_of_closed(ctx: &RelayContext) {
    for socket in ctx.pools().take_closed_own() {
        ctx.pool_readers().forget(&socket);
    }
}

/// Opens the flow `key` (first datagram to `dst`) as `rule` says; `now_ms`
/// (the relay's clock, a reading the caller took) is its first activity.
pub fn open(
    key: FlowKey,
    dst: SocketAddr,
    rule: &UdpRule,
    ctx: &Arc<RelayContext>,
    now_ms: u64,
) -> Result<Opened, OpenError> {
    let one_destination = rule.nat == NatMode::Symmetric;
    let (mark, device) = match &rule.route {
        Route::Interface { device, mark } => (*mark, device.clone()),
        _ => (ctx.mark(), None),
    };
    let own = rule.own_socket(dst);
    let idle_ms = u64::try_from(rule.idle_timeout_for(own).as_millis()).unwrap_or(u64::MAX);
    let make = |upstream| Arc::new(Session::new(key, upstream, idle_ms, now_ms));
    let opened = match &rule.route {
        Route::Drop => return Err(OpenError::Dropped),
        Route::Socks5(server) => {
            // The association holds a TCP control connection and a UDP socket.
            let permits = vec![permit(ctx)?, permit(ctx)?];
            let (queue, rx) = socks_queue::channel(SOCKS_BACKLOG, ctx.socks_budget().clone(), key.owner());
            let session = make(Upstream::Socks { queue });
            let task = ctx.spawn_flow(inbound::socks_pump(
                session.clone(),
                ctx.clone(),
                server.clone(),
                mark,
                rx,
            ));
            Opened {
                session,
                task: Some(task),
                permits,
            }
        }
        Route::Direct | Route::Interface { .. } | Route::Redirect(_) if one_destination => {
            let Some((pool, target)) = pooled(dst, rule, ctx) else {
                return Err(OpenError::Dropped);
            };
            // A flow whose source port must stay unknown (a DNS query:
            // RFC 5452) gets a socket of its own, new and so read here.
            let (lease, fresh) = if own {
                let_go_of_closed(ctx);
                (ctx.pools().own(pool, target)?, true)
            } else {
                ctx.pools().lease(pool, key.client, target)?
            };
            let fresh = fresh.then(|| lease.socket.clone());
            let session = make(Upstream::Pooled(lease));
            if let Upstream::Pooled(lease) = session.upstream() {
                lease.attach(&session);
            }
            if let Some(socket) = fresh {
                inbound::read_pool(socket, ctx);
            }
            Opened {
                session,
                task: None,
                permits: Vec::new(),
            }
        }
        Route::Direct | Route::Interface { .. } | Route::Redirect(_) => {
            let permit = permit(ctx)?;
            let std = sockets::flow_upstream(dst, None, mark, device.as_deref())?;
            sockets::report_errors(&std, dst.is_ipv6())?;
            let socket = Arc::new(UdpSocket::from_std(std)?);
            let session = make(Upstream::Cone { socket: socket.clone() });
            let task = ctx.spawn_flow(inbound::pump_cone(session.clone(), socket, ctx.clone()));
            Opened {
                session,
                task: Some(task),
                permits: vec![permit],
            }
        }
    };
    ctx.note_idle_timeout(idle_ms);
    ctx.stats().sessions_opened.inc();
    tracing::debug!(client = %key.client, %dst, rule = rule.number, "session opened");
    Ok(opened)
}
