//! The TPROXY listener: reads redirected datagrams in batches, with their
//! original destinations, and hands each to the flow it belongs to.
//!
//! Consecutive datagrams of one flow (a game or a bulk transfer sends in
//! bursts) are passed on as a *run*, which the session sends with one
//! system call; see [`crate::net::send::send_run`].

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::rules::Route;
use super::session::{Session, flow_key};
use super::{FlowKey, RelayContext};
use crate::dns::DnsService;
use crate::net::recv::{BATCH, DatagramMeta, RecvBatch};
use crate::net::{sockets, would_block};
use crate::shutdown::Shutdown;

/// Batches read per wake-up before yielding, so one busy listener cannot
/// starve the reply pumps sharing its worker thread.
const BATCHES_PER_WAKEUP: usize = 8;

/// Serves one listening socket until shutdown.
pub async fn serve(socket: UdpSocket, ctx: Arc<RelayContext>, mut shutdown: Shutdown) -> io::Result<()> {
    let local = socket.local_addr()?;
    let fd = socket.as_raw_fd();
    let mut batch = RecvBatch::new(BATCH);
    loop {
        tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            ready = socket.readable() => ready?,
        }
        let mut drained = false;
        for _ in 0..BATCHES_PER_WAKEUP {
            match socket.try_io(Interest::READABLE, || batch.recv(fd)) {
                Ok(n) => {
                    let mut run = Run::default();
                    for i in 0..n {
                        if let Some((meta, payload)) = batch.get(i) {
                            handle(&ctx, local, meta, payload, &mut run);
                        }
                    }
                    run.flush(&ctx);
                }
                Err(e) if would_block(&e) => {
                    drained = true;
                    break;
                }
                Err(e) => {
                    ctx.stats.receive_errors.inc();
                    tracing::debug!(%local, error = %e, "listener receive failed");
                }
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
                session.send_upstream(&self.payloads, dst, self.tos, ctx);
            }
        }
        self.payloads.clear();
        self.key = None;
        self.session = None;
        self.dst = None;
    }
}

fn handle<'b>(ctx: &Arc<RelayContext>, local: SocketAddr, meta: &DatagramMeta, payload: &'b [u8], run: &mut Run<'b>) {
    ctx.stats.client_datagrams.inc();
    ctx.stats.client_bytes.add(payload.len() as u64);
    let Some(dst) = meta.orig_dst.filter(|_| meta.peer.port() != 0) else {
        ctx.stats.drop_no_orig_dst.inc();
        return;
    };
    if is_self(dst, local) {
        // Sent straight to our port rather than diverted by TPROXY:
        // relaying it would deliver it right back here, forever.
        ctx.stats.drop_loop.inc();
        return;
    }
    if let Some(dns) = ctx.dns.as_ref().filter(|d| d.hijacks(dst.port())) {
        hijack_dns(ctx, dns, meta.peer, dst, payload);
        return;
    }
    let rules = ctx.rules.load();
    let rule = rules.route(meta.peer, dst);
    if rule.route == Route::Drop {
        ctx.stats.drop_by_rule.inc();
        return;
    }
    let key = flow_key(meta.peer, dst, rule);
    if run.continues(&key, dst, meta.tos) {
        run.payloads.push(payload);
        return;
    }
    run.flush(ctx);
    let session = match ctx.table.get(&key) {
        Some(s) => s,
        None => match ctx.table.get_or_insert_with(key, || Session::open(key, dst, rule, ctx)) {
            Ok((s, evicted)) => {
                if let Some(old) = evicted {
                    ctx.stats.sessions_evicted.inc();
                    tracing::debug!(client = %old.session.key.client, "session evicted");
                }
                s
            }
            Err(e) => {
                ctx.stats.drop_session_open_failed.inc();
                tracing::debug!(client = %key.client, %dst, error = %e, "cannot open session");
                return;
            }
        },
    };
    session.touch(ctx.clock.now_ms());
    *run = Run {
        key: Some(key),
        session: Some(session),
        dst: Some(dst),
        tos: meta.tos,
        payloads: std::mem::take(&mut run.payloads),
    };
    run.payloads.push(payload);
}

/// A query to a DNS port, wherever it was going, is answered by the DNS
/// engine, and the answer leaves from the address the client asked.
fn hijack_dns(ctx: &Arc<RelayContext>, dns: &Arc<DnsService>, client: SocketAddr, dst: SocketAddr, payload: &[u8]) {
    let reply = match ctx.replies.socket_for(dst) {
        Ok(r) => r,
        Err(e) => {
            ctx.stats.reply_send_errors.inc();
            tracing::debug!(%dst, error = %e, "no reply socket for hijacked DNS");
            return;
        }
    };
    let ctx = ctx.clone();
    dns.answer_udp(payload, client, move |answer| {
        ctx.replies.send(&reply, &[answer], client, None)
    });
}

/// True when `dst` is the listener itself: same port and a local address.
fn is_self(dst: SocketAddr, local: SocketAddr) -> bool {
    if dst.port() != local.port() {
        return false;
    }
    if !local.ip().is_unspecified() {
        return dst.ip() == local.ip();
    }
    // Only asked when a datagram's destination port equals ours.
    sockets::is_local_address(dst.ip())
}
