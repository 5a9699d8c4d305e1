//! One flow: where its datagrams go, where its replies come from, and when
//! it was last active.
//!
//! A flow to one destination (symmetric NAT) rides a shared socket of the
//! [`pool`](super::pool) and costs no descriptor or task of its own. A full
//! cone needs a socket any remote can reach, so it owns one, with a task
//! pumping its replies; a SOCKS5 flow owns its association and a task. No
//! flow keeps a timer: the [`expiry`](super::expiry) sweeper closes idle
//! ones.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::pool::{PoolKey, PoolLease};
use super::reply::ReplySocket;
use super::rules::{Route, UdpRule};
use super::socks5::{self, Socks5Server};
use super::table::Entry;
use super::{FlowKey, RelayContext, Target};
use crate::config::NatMode;
use crate::net::recv::{self, RecvBatch};
use crate::net::send::send_run;
use crate::net::{sockets, would_block};

/// Largest UDP payload over IPv6 (65,535 − 8); IPv4's 65,507 fits too.
pub const MAX_DATAGRAM: usize = 65_535;

/// How often, at most, traffic from upstream re-promotes a flow in the LRU.
/// Promotion takes the table lock; once a second is plenty to keep a
/// mostly-inbound flow (a game server streaming state) from looking idle.
const PROMOTE_EVERY_MS: u64 = 1_000;

/// Datagrams queued for a SOCKS5 flow while its association is set up.
const SOCKS_BACKLOG: usize = 64;
/// Longest a SOCKS5 handshake may take.
const SOCKS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(5);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Each worker thread's receive batch for replies, shared by every
    /// socket read on that thread: a flow costs no buffer of its own.
    static BATCH: RefCell<RecvBatch> = RefCell::new(RecvBatch::new(recv::BATCH));
}

/// A datagram on its way to a SOCKS5 association.
#[derive(Debug)]
struct Outbound {
    dst: SocketAddr,
    payload: Vec<u8>,
}

/// Where a session's datagrams go.
#[derive(Debug)]
enum Upstream {
    /// One destination (symmetric NAT): a shared pool socket, and the reply
    /// socket for the address the client wrote to.
    Pooled { lease: PoolLease, reply: Arc<ReplySocket> },
    /// Every destination (full cone): an own socket; replies are spoofed
    /// from whichever remote sent them.
    Cone { socket: Arc<UdpSocket> },
    /// A SOCKS5 association, run by the session's task.
    Socks {
        tx: mpsc::Sender<Outbound>,
        reply: Option<Arc<ReplySocket>>,
    },
}

#[derive(Debug)]
pub struct Session {
    pub key: FlowKey,
    /// Tells this session from a later one for the same flow.
    pub id: u64,
    upstream: Upstream,
    /// Idle timeout, milliseconds.
    pub idle_ms: u64,
    last_active_ms: AtomicU64,
    last_promoted_ms: AtomicU64,
}

impl Session {
    /// Opens the flow `key` (first datagram to `dst`) as `rule` says.
    pub fn open(key: FlowKey, dst: SocketAddr, rule: &UdpRule, ctx: &Arc<RelayContext>) -> io::Result<Entry> {
        let one_destination = rule.nat == NatMode::Symmetric;
        let (mark, device) = match &rule.route {
            Route::Interface { device, mark } => (*mark, device.clone()),
            _ => (ctx.mark, None),
        };
        let mut socks_rx = None;
        let upstream = match &rule.route {
            Route::Drop => return Err(io::Error::other("dropped flows have no session")),
            Route::Socks5(server) => {
                let (tx, rx) = mpsc::channel(SOCKS_BACKLOG);
                let reply = if one_destination {
                    Some(ctx.replies.socket_for(dst)?)
                } else {
                    None
                };
                socks_rx = Some((server.clone(), rx));
                Upstream::Socks { tx, reply }
            }
            Route::Direct | Route::Interface { .. } | Route::Redirect(_) if one_destination => {
                let target = match rule.route {
                    Route::Redirect(to) => to,
                    _ => dst,
                };
                let reply = ctx.replies.socket_for(dst)?;
                let pool = PoolKey {
                    v6: target.is_ipv6(),
                    mark,
                    device,
                };
                Upstream::Pooled {
                    lease: ctx.pools.lease(ctx, pool, key.client, target)?,
                    reply,
                }
            }
            Route::Direct | Route::Interface { .. } | Route::Redirect(_) => {
                let std = sockets::flow_upstream(dst, None, mark, device.as_deref())?;
                Upstream::Cone {
                    socket: Arc::new(UdpSocket::from_std(std)?),
                }
            }
        };
        let now = ctx.clock.now_ms();
        let session = Arc::new(Session {
            key,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            upstream,
            idle_ms: u64::try_from(rule.idle_timeout.as_millis()).unwrap_or(u64::MAX),
            last_active_ms: AtomicU64::new(now),
            last_promoted_ms: AtomicU64::new(now),
        });
        ctx.note_idle_timeout(session.idle_ms);
        let task = match (&session.upstream, socks_rx) {
            (Upstream::Pooled { lease, .. }, _) => {
                lease.attach(&session);
                None
            }
            (Upstream::Cone { socket }, _) => {
                Some(tokio::spawn(pump_cone(session.clone(), socket.clone(), ctx.clone())))
            }
            (Upstream::Socks { .. }, Some((server, rx))) => {
                Some(tokio::spawn(socks_pump(session.clone(), ctx.clone(), server, mark, rx)))
            }
            (Upstream::Socks { .. }, None) => None,
        };
        ctx.stats.sessions_opened.inc();
        tracing::debug!(client = %key.client, %dst, rule = rule.number, id = session.id, "session opened");
        Ok(Entry::new(session, task.map(|t| t.abort_handle())))
    }

    /// Records traffic now.
    pub fn touch(&self, now_ms: u64) {
        self.last_active_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Milliseconds since the last datagram in either direction.
    pub fn idle_for(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_active_ms.load(Ordering::Relaxed))
    }

    /// Sends a run of client datagrams towards `dst` (all with TOS `tos`);
    /// never blocks.
    pub fn send_upstream(&self, run: &[&[u8]], dst: SocketAddr, tos: Option<u8>, ctx: &RelayContext) {
        let (fd, to) = match &self.upstream {
            Upstream::Pooled { lease, .. } => (lease.socket.socket.as_raw_fd(), lease.remote),
            Upstream::Cone { socket } => (socket.as_raw_fd(), dst),
            Upstream::Socks { tx, .. } => {
                for payload in run {
                    let out = Outbound {
                        dst,
                        payload: payload.to_vec(),
                    };
                    if tx.try_send(out).is_err() {
                        ctx.stats.drop_send_buffer_full.inc();
                    }
                }
                return;
            }
        };
        // Plain sendmsg(2): tokio's try_send would refuse until the reactor
        // has *seen* a new socket become writable, dropping the first
        // datagram of every flow.
        let mut result = send_run(fd, run, Some(to), tos, to.is_ipv6());
        if let Err(e) = &result {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                // An ICMP unreachable for an *earlier* datagram is reported on
                // this send, and nothing was sent: count, retry once.
                ctx.stats.upstream_unreachable.inc();
                result = send_run(fd, run, Some(to), tos, to.is_ipv6());
            }
        }
        count_upstream_send(result, run, ctx);
    }

    /// Sends replies from `from` to the client, spoofed from the address
    /// the client wrote to (one destination) or from `from` (full cone).
    fn reply(&self, run: &[&[u8]], from: SocketAddr, tos: Option<u8>, ctx: &RelayContext) {
        match &self.upstream {
            Upstream::Pooled { reply, .. } | Upstream::Socks { reply: Some(reply), .. } => {
                ctx.replies.send(reply, run, self.key.client, tos)
            }
            _ => ctx.replies.send_from(from, run, self.key.client, tos),
        }
        self.inbound_activity(ctx);
    }

    /// Refreshes the idle timer and, at most once a second, the LRU order.
    fn inbound_activity(&self, ctx: &RelayContext) {
        let now = ctx.clock.now_ms();
        self.touch(now);
        let promoted = self.last_promoted_ms.load(Ordering::Relaxed);
        if now.saturating_sub(promoted) >= PROMOTE_EVERY_MS {
            self.last_promoted_ms.store(now, Ordering::Relaxed);
            ctx.table.promote(&self.key, self.id);
        }
    }

    /// Removes this session from the table because its upstream failed.
    fn close(&self, ctx: &RelayContext) {
        drop(ctx.table.remove(&self.key, self.id));
    }
}

/// Counts the outcome of sending `run`, of which `result` says how many
/// datagrams left.
fn count_upstream_send(result: io::Result<usize>, run: &[&[u8]], ctx: &RelayContext) {
    match result {
        Ok(sent) => {
            ctx.stats.upstream_datagrams.add(sent as u64);
            ctx.stats
                .upstream_bytes
                .add(run.iter().take(sent).map(|p| p.len() as u64).sum());
            let lost = run.len().saturating_sub(sent);
            if lost > 0 {
                ctx.stats.drop_send_buffer_full.add(lost as u64);
            }
        }
        Err(e) if would_block(&e) => ctx.stats.drop_send_buffer_full.add(run.len() as u64),
        Err(e) => {
            ctx.stats.upstream_send_errors.add(run.len() as u64);
            tracing::debug!(error = %e, "upstream send failed");
        }
    }
}

/// Reads every datagram queued on `socket` and hands each to the session
/// `flow_of(sender)` names, consecutive ones from the same sender with the
/// same TOS as one run. Datagrams no flow claims are dropped and counted.
pub fn drain_into_flows(socket: &UdpSocket, ctx: &RelayContext, flow_of: impl Fn(SocketAddr) -> Option<Arc<Session>>) {
    let fd = socket.as_raw_fd();
    BATCH.with_borrow_mut(|batch| {
        loop {
            let n = match socket.try_io(Interest::READABLE, || batch.recv(fd)) {
                Ok(n) => n,
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                    ctx.stats.upstream_unreachable.inc();
                    continue;
                }
                Err(e) => {
                    ctx.stats.receive_errors.inc();
                    tracing::debug!(error = %e, "upstream receive failed");
                    break;
                }
            };
            let mut run: Vec<&[u8]> = Vec::with_capacity(n);
            let mut current: Option<Sender> = None;
            for i in 0..n {
                let Some((meta, payload)) = batch.get(i) else { continue };
                if !current
                    .as_ref()
                    .is_some_and(|c| c.from == meta.peer && c.tos == meta.tos)
                {
                    deliver(&mut run, current.as_ref(), ctx);
                    current = Some(Sender {
                        from: meta.peer,
                        tos: meta.tos,
                        flow: flow_of(meta.peer),
                    });
                }
                run.push(payload);
            }
            deliver(&mut run, current.as_ref(), ctx);
        }
    });
}

/// Who sent the run being gathered, and the flow it belongs to.
struct Sender {
    from: SocketAddr,
    tos: Option<u8>,
    flow: Option<Arc<Session>>,
}

/// Hands a gathered run to its flow (or counts it as unsolicited).
fn deliver(run: &mut Vec<&[u8]>, sender: Option<&Sender>, ctx: &RelayContext) {
    match sender {
        Some(Sender {
            from,
            tos,
            flow: Some(session),
        }) => session.reply(run, *from, *tos, ctx),
        Some(Sender { flow: None, .. }) => ctx.stats.drop_unsolicited.add(run.len() as u64),
        None => {}
    }
    run.clear();
}

/// The task of a full-cone session: relay replies from anyone.
async fn pump_cone(session: Arc<Session>, socket: Arc<UdpSocket>, ctx: Arc<RelayContext>) {
    loop {
        if let Err(e) = socket.readable().await {
            tracing::warn!(client = %session.key.client, error = %e, "upstream socket failed; closing flow");
            session.close(&ctx);
            return;
        }
        drain_into_flows(&socket, &ctx, |_| Some(session.clone()));
    }
}

/// The task of a SOCKS5 session: set up the association (datagrams wait in
/// the channel meanwhile), then relay both ways until the server drops the
/// association or the sweeper ends the flow. Either way the session leaves
/// the table, so the client's next datagram starts a fresh association.
async fn socks_pump(
    session: Arc<Session>,
    ctx: Arc<RelayContext>,
    server: Arc<Socks5Server>,
    mark: u32,
    mut rx: mpsc::Receiver<Outbound>,
) {
    let mut assoc = match socks5::associate(&server, mark, SOCKS_HANDSHAKE).await {
        Ok(a) => a,
        Err(e) => {
            ctx.stats.socks5_failures.inc();
            tracing::warn!(server = %server.addr, error = %e, "SOCKS5 association failed");
            session.close(&ctx);
            return;
        }
    };
    ctx.stats.socks5_associations.inc();
    tracing::debug!(server = %server.addr, relay = %assoc.relay, "SOCKS5 association up");
    let mut wrapped = Vec::with_capacity(MAX_DATAGRAM);
    let mut inbound = vec![0u8; MAX_DATAGRAM];
    let mut control = [0u8; 64];
    loop {
        tokio::select! {
            out = rx.recv() => {
                let Some(out) = out else { return };
                socks5::encode_udp(out.dst, &out.payload, &mut wrapped);
                let sent = assoc.udp.send(&wrapped).await.map(|_| 1);
                count_upstream_send(sent, &[&out.payload], &ctx);
            }
            got = assoc.udp.recv(&mut inbound) => match got {
                Ok(n) => match socks5::decode_udp(inbound.get(..n).unwrap_or_default()) {
                    Ok((remote, payload)) => session.reply(&[payload], remote, None, &ctx),
                    Err(e) => {
                        ctx.stats.receive_errors.inc();
                        tracing::debug!(error = %e, "bad datagram from the SOCKS5 relay");
                    }
                },
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => ctx.stats.upstream_unreachable.inc(),
                Err(e) => tracing::debug!(error = %e, "SOCKS5 relay receive failed"),
            },
            // The server never speaks on the control connection after the
            // handshake: EOF, an error or data all mean the association ended.
            _ = tokio::io::AsyncReadExt::read(&mut assoc.control, &mut control) => {
                ctx.stats.socks5_lost.inc();
                tracing::info!(server = %server.addr, client = %session.key.client, "SOCKS5 server closed the association");
                session.close(&ctx);
                return;
            }
        }
    }
}

/// The table key of a flow: per destination, or per client endpoint and
/// rule for a full cone.
pub fn flow_key(client: SocketAddr, dst: SocketAddr, rule: &UdpRule) -> FlowKey {
    let target = match rule.nat {
        NatMode::Symmetric => Target::Destination(dst),
        NatMode::FullCone => Target::Cone(rule.number),
    };
    FlowKey { client, target }
}

#[cfg(test)]
impl Session {
    /// A session with a loopback socket and no task, for table tests.
    pub(crate) fn detached(key: FlowKey, idle_ms: u64, last_active_ms: u64) -> Session {
        let std = std::net::UdpSocket::bind("127.0.0.1:0").expect("loopback socket");
        std.set_nonblocking(true).expect("nonblocking");
        Session {
            key,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            upstream: Upstream::Cone {
                socket: Arc::new(UdpSocket::from_std(std).expect("tokio socket")),
            },
            idle_ms,
            last_active_ms: AtomicU64::new(last_active_ms),
            last_promoted_ms: AtomicU64::new(0),
        }
    }
}
