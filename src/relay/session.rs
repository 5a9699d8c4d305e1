//! One flow: its marked upstream socket, its reply socket, and the task that
//! carries replies back and closes the flow when it goes idle.

use nix::sys::socket::{MsgFlags, send};
use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::UdpSocket;
use tokio::time::timeout_at;

use super::reply::ReplySocket;
use super::table::Entry;
use super::{FlowKey, RelayContext};
use crate::net::{sockets, would_block};

/// Largest UDP payload over IPv6 (65,535 − 8); IPv4's 65,507 fits too.
pub const MAX_DATAGRAM: usize = 65_535;

/// How often, at most, traffic from upstream re-promotes a flow in the LRU.
/// Promotion takes the table lock; once a second is plenty to keep a
/// mostly-inbound flow (a game server streaming state) from looking idle.
const PROMOTE_EVERY_MS: u64 = 1_000;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; MAX_DATAGRAM].into_boxed_slice());
}

#[derive(Debug)]
pub struct Session {
    pub key: FlowKey,
    /// Tells this session from a later one for the same flow.
    pub id: u64,
    upstream: UdpSocket,
    reply: Arc<ReplySocket>,
    last_active_ms: AtomicU64,
    last_promoted_ms: AtomicU64,
}

impl Session {
    /// Opens the flow's sockets and starts its reply pump.
    pub fn open(key: FlowKey, ctx: &Arc<RelayContext>) -> io::Result<Entry> {
        let reply = ctx.replies.socket_for(key.dst)?;
        let upstream = UdpSocket::from_std(sockets::upstream(key.dst, ctx.mark)?)?;
        let now = ctx.clock.now_ms();
        let session = Arc::new(Session {
            key,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            upstream,
            reply,
            last_active_ms: AtomicU64::new(now),
            last_promoted_ms: AtomicU64::new(now),
        });
        let task = tokio::spawn(pump(session.clone(), ctx.clone()));
        ctx.stats.sessions_opened.inc();
        tracing::debug!(client = %key.client, dst = %key.dst, id = session.id, "session opened");
        Ok(Entry::new(session, task.abort_handle()))
    }

    /// Records traffic now.
    pub fn touch(&self, now_ms: u64) {
        self.last_active_ms.store(now_ms, Ordering::Relaxed);
    }

    /// Sends one client datagram upstream; never blocks.
    pub fn send_upstream(&self, payload: &[u8], ctx: &RelayContext) {
        let mut result = self.send_now(payload);
        if let Err(e) = &result {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                // An ICMP unreachable for an *earlier* datagram is reported on
                // this send, and this datagram was not sent: count, retry once.
                ctx.stats.upstream_unreachable.inc();
                result = self.send_now(payload);
            }
        }
        match result {
            Ok(_) => {
                ctx.stats.upstream_datagrams.inc();
                ctx.stats.upstream_bytes.add(payload.len() as u64);
            }
            Err(e) if would_block(&e) => ctx.stats.drop_send_buffer_full.inc(),
            Err(e) => {
                ctx.stats.upstream_send_errors.inc();
                tracing::debug!(dst = %self.key.dst, error = %e, "upstream send failed");
            }
        }
    }

    /// A plain non-blocking `send(2)`. tokio's `try_send` would refuse until
    /// the reactor has *seen* the new socket become writable, which drops the
    /// first datagram of every flow.
    fn send_now(&self, payload: &[u8]) -> io::Result<usize> {
        let fd = self.upstream.as_raw_fd();
        Ok(send(fd, payload, MsgFlags::MSG_DONTWAIT)?)
    }

    /// Reads every datagram queued on the upstream socket and sends each to
    /// the client. Returns how many were relayed.
    fn drain_replies(&self, ctx: &RelayContext) -> usize {
        let mut relayed = 0;
        BUF.with_borrow_mut(|buf| {
            loop {
                match self.upstream.try_recv(buf) {
                    Ok(n) => {
                        ctx.replies.send(&self.reply, &buf[..n], self.key.client);
                        relayed += 1;
                    }
                    Err(e) if would_block(&e) => break,
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        ctx.stats.upstream_unreachable.inc();
                    }
                    Err(e) => {
                        ctx.stats.receive_errors.inc();
                        tracing::debug!(dst = %self.key.dst, error = %e, "upstream receive failed");
                        break;
                    }
                }
            }
        });
        relayed
    }
}

/// The session's task: relay replies until the flow has been idle for the
/// timeout, then remove it from the table.
async fn pump(session: Arc<Session>, ctx: Arc<RelayContext>) {
    let idle_ms = u64::try_from(ctx.idle_timeout.as_millis()).unwrap_or(u64::MAX);
    loop {
        let last = session.last_active_ms.load(Ordering::Relaxed);
        let deadline = ctx.clock.instant_at(last.saturating_add(idle_ms));
        match timeout_at(deadline, session.upstream.readable()).await {
            Ok(Ok(())) => {
                if session.drain_replies(&ctx) > 0 {
                    let now = ctx.clock.now_ms();
                    session.touch(now);
                    let promoted = session.last_promoted_ms.load(Ordering::Relaxed);
                    if now.saturating_sub(promoted) >= PROMOTE_EVERY_MS {
                        session.last_promoted_ms.store(now, Ordering::Relaxed);
                        ctx.table.promote(&session.key, session.id);
                    }
                }
            }
            Ok(Err(e)) => {
                tracing::warn!(dst = %session.key.dst, error = %e, "upstream socket failed; closing flow");
                drop(ctx.table.remove(&session.key, session.id));
                return;
            }
            Err(_elapsed) => {
                let idle_for = ctx
                    .clock
                    .now_ms()
                    .saturating_sub(session.last_active_ms.load(Ordering::Relaxed));
                if idle_for >= idle_ms {
                    if let Some(entry) = ctx.table.remove(&session.key, session.id) {
                        ctx.stats.sessions_expired.inc();
                        tracing::debug!(client = %session.key.client, dst = %session.key.dst, "session expired");
                        drop(entry); // aborts this very task: nothing may follow
                    }
                    return;
                }
            }
        }
    }
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
            upstream: UdpSocket::from_std(std).expect("tokio socket"),
            reply: Arc::new(ReplySocket::Raw {
                src: key.dst,
                raw: Arc::new(crate::net::raw::RawSender::new(1)),
            }),
            last_active_ms: AtomicU64::new(0),
            last_promoted_ms: AtomicU64::new(0),
        }
    }
}
