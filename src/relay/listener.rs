//! The TPROXY listener: reads each redirected datagram with its original
//! destination and hands it to the flow it belongs to.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::RelayContext;
use super::rules::Route;
use super::session::{MAX_DATAGRAM, Session, flow_key};
use crate::dns::DnsService;
use crate::net::recv::{DatagramMeta, cmsg_buffer, recv_with_meta};
use crate::net::would_block;
use crate::shutdown::Shutdown;

/// Datagrams read per wake-up before yielding to other tasks, so one busy
/// listener cannot starve the reply pumps sharing its worker thread.
const BATCH: usize = 64;

/// Serves one listening socket until shutdown.
pub async fn serve(
    socket: UdpSocket,
    ctx: Arc<RelayContext>,
    mut shutdown: Shutdown,
) -> io::Result<()> {
    let local = socket.local_addr()?;
    let fd = socket.as_raw_fd();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut cmsg = cmsg_buffer();
    loop {
        tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            ready = socket.readable() => ready?,
        }
        for _ in 0..BATCH {
            match socket.try_io(Interest::READABLE, || {
                recv_with_meta(fd, &mut buf, &mut cmsg)
            }) {
                Ok(meta) => {
                    let payload = buf.get(..meta.len).unwrap_or_default();
                    handle(&ctx, local, meta, payload);
                }
                Err(e) if would_block(&e) => break,
                Err(e) => {
                    ctx.stats.receive_errors.inc();
                    tracing::debug!(%local, error = %e, "listener receive failed");
                }
            }
        }
        tokio::task::yield_now().await;
    }
}

fn handle(ctx: &Arc<RelayContext>, local: SocketAddr, meta: DatagramMeta, payload: &[u8]) {
    ctx.stats.client_datagrams.inc();
    ctx.stats.client_bytes.add(payload.len() as u64);
    let Some(dst) = meta.orig_dst else {
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
    let session = match ctx.table.get(&key) {
        Some(s) => s,
        None => match ctx
            .table
            .get_or_insert_with(key, || Session::open(key, dst, rule, ctx))
        {
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
    session.send_upstream(payload, dst, meta.tos, ctx);
}

/// A query to a DNS port, wherever it was going, is answered by the DNS
/// engine, and the answer leaves from the address the client asked.
fn hijack_dns(
    ctx: &Arc<RelayContext>,
    dns: &Arc<DnsService>,
    client: SocketAddr,
    dst: SocketAddr,
    payload: &[u8],
) {
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
        ctx.replies.send(&reply, answer, client, None)
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
    is_local_address(dst.ip())
}

/// Whether `ip` belongs to this host: a plain bind succeeds only for local
/// addresses. Only asked when a datagram's destination port equals ours.
fn is_local_address(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}
