//! One flow: its upstream (a marked socket, or a SOCKS5 association), the
//! task that carries replies back, and its idle timer.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::timeout_at;

use super::ports::PortLease;
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
    /// Each worker thread's receive batch for reply pumps: shared by every
    /// session on the thread, so a flow costs no buffer of its own.
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
    /// One destination (symmetric NAT): a connected socket on a shared
    /// port, and the reply socket for the address the client wrote to.
    Connected {
        socket: UdpSocket,
        reply: Arc<ReplySocket>,
        _port: PortLease,
    },
    /// Every destination (full cone): an open socket; replies are spoofed
    /// from whichever remote sent them.
    Cone { socket: UdpSocket },
    /// A SOCKS5 association, run by the session's task.
    Socks { tx: mpsc::Sender<Outbound> },
}

#[derive(Debug)]
pub struct Session {
    pub key: FlowKey,
    /// Tells this session from a later one for the same flow.
    pub id: u64,
    upstream: Upstream,
    idle_ms: u64,
    last_active_ms: AtomicU64,
    last_promoted_ms: AtomicU64,
}

impl Session {
    /// Opens the flow `key` (first datagram to `dst`) as `rule` says, and
    /// starts its task.
    pub fn open(
        key: FlowKey,
        dst: SocketAddr,
        rule: &UdpRule,
        ctx: &Arc<RelayContext>,
    ) -> io::Result<Entry> {
        let one_destination = rule.nat == NatMode::Symmetric;
        let (mark, device) = match &rule.route {
            Route::Interface { device, mark } => (*mark, device.as_deref()),
            _ => (ctx.mark, None),
        };
        let mut socks = None;
        let upstream = match &rule.route {
            Route::Socks5(server) => {
                let (tx, rx) = mpsc::channel(SOCKS_BACKLOG);
                let reply = if one_destination {
                    Some(ctx.replies.socket_for(dst)?)
                } else {
                    None
                };
                socks = Some((server.clone(), rx, reply));
                Upstream::Socks { tx }
            }
            Route::Drop => return Err(io::Error::other("dropped flows have no session")),
            Route::Direct | Route::Interface { .. } | Route::Redirect(_) if one_destination => {
                let target = match rule.route {
                    Route::Redirect(to) => to,
                    _ => dst,
                };
                let reply = ctx.replies.socket_for(dst)?;
                let (socket, port) = ctx.ports.lease(target, |p| {
                    sockets::flow_upstream(target, Some(p), mark, device)
                })?;
                Upstream::Connected {
                    socket: UdpSocket::from_std(socket)?,
                    reply,
                    _port: port,
                }
            }
            Route::Direct | Route::Interface { .. } | Route::Redirect(_) => {
                let socket = UdpSocket::from_std(sockets::flow_upstream(dst, None, mark, device)?)?;
                Upstream::Cone { socket }
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
        let task = match socks {
            Some((server, rx, reply)) => tokio::spawn(socks_pump(
                session.clone(),
                ctx.clone(),
                server,
                mark,
                rx,
                reply,
            )),
            None => tokio::spawn(pump(session.clone(), ctx.clone())),
        };
        ctx.stats.sessions_opened.inc();
        tracing::debug!(client = %key.client, %dst, rule = rule.number, id = session.id, "session opened");
        Ok(Entry::new(session, task.abort_handle()))
    }

    /// Records traffic now.
    pub fn touch(&self, now_ms: u64) {
        self.last_active_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Sends a run of client datagrams towards `dst` (all with TOS `tos`);
    /// never blocks.
    pub fn send_upstream(
        &self,
        run: &[&[u8]],
        dst: SocketAddr,
        tos: Option<u8>,
        ctx: &RelayContext,
    ) {
        let (socket, to) = match &self.upstream {
            Upstream::Connected { socket, .. } => (socket, None),
            Upstream::Cone { socket } => (socket, Some(dst)),
            Upstream::Socks { tx } => {
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
        let send = |run: &[&[u8]]| send_run(socket.as_raw_fd(), run, to, tos, dst.is_ipv6());
        let mut result = send(run);
        if let Err(e) = &result {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                // An ICMP unreachable for an *earlier* datagram is reported on
                // this send, and nothing was sent: count, retry once.
                ctx.stats.upstream_unreachable.inc();
                result = send(run);
            }
        }
        count_upstream_send(result, run, ctx);
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

    fn idle_deadline(&self, ctx: &RelayContext) -> tokio::time::Instant {
        let last = self.last_active_ms.load(Ordering::Relaxed);
        ctx.clock.instant_at(last.saturating_add(self.idle_ms))
    }

    /// Whether the flow has been idle for its whole timeout; if so it is
    /// removed from the table (which ends this task).
    fn expire_if_idle(&self, ctx: &RelayContext) -> bool {
        let idle_for = ctx
            .clock
            .now_ms()
            .saturating_sub(self.last_active_ms.load(Ordering::Relaxed));
        if idle_for < self.idle_ms {
            return false;
        }
        if let Some(entry) = ctx.table.remove(&self.key, self.id) {
            ctx.stats.sessions_expired.inc();
            tracing::debug!(client = %self.key.client, "session expired");
            drop(entry); // aborts this very task: nothing may follow
        }
        true
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

/// The task of a socket-backed session: relay replies until the flow has
/// been idle for its timeout.
async fn pump(session: Arc<Session>, ctx: Arc<RelayContext>) {
    let socket = match &session.upstream {
        Upstream::Connected { socket, .. } | Upstream::Cone { socket } => socket,
        Upstream::Socks { .. } => return,
    };
    loop {
        match timeout_at(session.idle_deadline(&ctx), socket.readable()).await {
            Ok(Ok(())) => {
                if drain_replies(&session, socket, &ctx) > 0 {
                    session.inbound_activity(&ctx);
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(client = %session.key.client, error = %e, "upstream socket failed; closing flow");
                session.close(&ctx);
                return;
            }
            Err(_elapsed) => {
                if session.expire_if_idle(&ctx) {
                    return;
                }
            }
        }
    }
}

/// Reads every datagram queued on `socket` and sends them to the client
/// with the TOS they arrived with, consecutive ones from the same remote as
/// one run. Returns how many were relayed.
fn drain_replies(session: &Session, socket: &UdpSocket, ctx: &RelayContext) -> usize {
    let fd = socket.as_raw_fd();
    let client = session.key.client;
    let mut relayed = 0;
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
                    tracing::debug!(%client, error = %e, "upstream receive failed");
                    break;
                }
            };
            let mut run: Vec<&[u8]> = Vec::with_capacity(n);
            let mut run_key = None;
            for i in 0..n {
                let Some((meta, payload)) = batch.get(i) else {
                    continue;
                };
                let key = (meta.peer, meta.tos);
                if run_key.is_some_and(|k| k != key) {
                    send_reply_run(session, &run, run_key, ctx);
                    run.clear();
                }
                run_key = Some(key);
                run.push(payload);
            }
            send_reply_run(session, &run, run_key, ctx);
            relayed += n;
        }
    });
    relayed
}

/// Sends replies that came from `key.0` with TOS `key.1` to the client.
fn send_reply_run(
    session: &Session,
    run: &[&[u8]],
    key: Option<(SocketAddr, Option<u8>)>,
    ctx: &RelayContext,
) {
    let Some((from, tos)) = key else { return };
    if run.is_empty() {
        return;
    }
    match &session.upstream {
        Upstream::Connected { reply, .. } => ctx.replies.send(reply, run, session.key.client, tos),
        _ => ctx.replies.send_from(from, run, session.key.client, tos),
    }
}

/// The task of a SOCKS5 session: set up the association (datagrams wait in
/// the channel meanwhile), then relay both ways until the flow idles out or
/// the server drops the association. Either way the session leaves the
/// table, so the client's next datagram starts a fresh association.
async fn socks_pump(
    session: Arc<Session>,
    ctx: Arc<RelayContext>,
    server: Arc<Socks5Server>,
    mark: u32,
    mut rx: mpsc::Receiver<Outbound>,
    reply: Option<Arc<ReplySocket>>,
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
                    Ok((remote, payload)) => {
                        match &reply {
                            Some(r) => ctx.replies.send(r, &[payload], session.key.client, None),
                            None => ctx.replies.send_from(remote, &[payload], session.key.client, None),
                        }
                        session.inbound_activity(&ctx);
                    }
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
            _ = tokio::time::sleep_until(session.idle_deadline(&ctx)) => {
                if session.expire_if_idle(&ctx) {
                    return;
                }
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
    pub(crate) fn detached(key: FlowKey) -> Session {
        let std = std::net::UdpSocket::bind("127.0.0.1:0").expect("loopback socket");
        std.set_nonblocking(true).expect("nonblocking");
        Session {
            key,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            upstream: Upstream::Cone {
                socket: UdpSocket::from_std(std).expect("tokio socket"),
            },
            idle_ms: 60_000,
            last_active_ms: AtomicU64::new(0),
            last_promoted_ms: AtomicU64::new(0),
        }
    }
}
