//! Everything that comes back: reading upstream sockets and delivering
//! replies to clients from the addresses they asked.
//!
//! Three kinds of reader run here, each as a task owned by the relay (see
//! [`RelayContext::spawn`]): one per pool socket, shared by every flow
//! that socket carries; one per full-cone flow; one per SOCKS5 flow, which
//! also sets up its association. A reply refreshes its flow's idle timer
//! and, now and then, its place in the LRU, so mostly-inbound flows live.

use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::account::{Direction, count_sent};
use super::context::RelayContext;
use super::pool::PoolSocket;
use super::session::{MAX_DATAGRAM, Outbound, Session};
use super::socks5::{self, Socks5Server};
use crate::net::recv::{self, RecvBatch};
use crate::net::sockets;

/// Longest a SOCKS5 handshake may take.
const SOCKS_HANDSHAKE: std::time::Duration = std::time::Duration::from_secs(5);

thread_local! {
    /// Each worker thread's receive batch for replies, shared by every
    /// socket read on that thread: a flow costs no buffer of its own.
    static BATCH: RefCell<RecvBatch> = RefCell::new(RecvBatch::new(recv::BATCH));
}

/// Waits until `socket` has datagrams or queued ICMP errors; counts and
/// clears the errors (each once: `IP_RECVERR` queues it, and the same error
/// also fails the socket's next send or receive, which is not counted).
async fn wait_readable(socket: &UdpSocket, ctx: &RelayContext) -> io::Result<bool> {
    let ready = socket.ready(Interest::READABLE | Interest::ERROR).await?;
    if ready.is_error() {
        let errors = sockets::drain_error_queue(socket.as_raw_fd());
        ctx.stats().upstream_unreachable.add(errors as u64);
        let _ = socket.try_io(Interest::ERROR, || {
            Err::<(), _>(io::Error::from(io::ErrorKind::WouldBlock))
        });
    }
    Ok(ready.is_readable())
}

/// The reader of one pool socket: replies to the flows they belong to.
pub async fn read_pool(socket: Arc<PoolSocket<Session>>, ctx: Arc<RelayContext>) {
    loop {
        match wait_readable(&socket.socket, &ctx).await {
            Ok(true) => drain_into_flows(&socket.socket, &ctx, |peer| socket.flow(peer)),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "pool socket failed");
                return;
            }
        }
    }
}

/// The task of a full-cone session: relay replies from anyone.
pub async fn pump_cone(session: Arc<Session>, socket: Arc<UdpSocket>, ctx: Arc<RelayContext>) {
    loop {
        match wait_readable(&socket, &ctx).await {
            Ok(true) => drain_into_flows(&socket, &ctx, |_| Some(session.clone())),
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(client = %session.key.client, error = %e, "upstream socket failed; closing flow");
                close(&session, &ctx);
                return;
            }
        }
    }
}

/// Reads every datagram queued on `socket` and hands each to the session
/// `flow_of(sender)` names, consecutive ones from the same sender with the
/// same TOS as one run. Datagrams no flow claims are dropped and counted.
pub fn drain_into_flows(socket: &UdpSocket, ctx: &RelayContext, flow_of: impl Fn(SocketAddr) -> Option<Arc<Session>>) {
    BATCH.with_borrow_mut(|batch| {
        loop {
            let read = match batch.read(socket) {
                Ok(read) => read,
                // Counted from the error queue (see `wait_readable`).
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
                Err(e) => {
                    ctx.stats().receive_errors.inc();
                    tracing::debug!(error = %e, "upstream receive failed");
                    break;
                }
            };
            let n = read.count;
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
            if read.drained {
                break;
            }
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
        }) => reply(session, run, *from, *tos, ctx),
        Some(Sender { flow: None, .. }) => ctx.stats().drop_unsolicited.add(run.len() as u64),
        None => {}
    }
    run.clear();
}

/// Sends replies from `from` to the session's client, from the address the
/// client wrote to (one destination) or from `from` (full cone).
fn reply(session: &Session, run: &[&[u8]], from: SocketAddr, tos: Option<u8>, ctx: &RelayContext) {
    ctx.replies()
        .send(session.reply_source(from), run, session.key.client, tos);
    if session.touch_inbound(ctx.now_ms()) {
        ctx.table().promote(&session.key, session.id);
    }
}

/// Removes `session` from the table because its upstream failed.
fn close(session: &Session, ctx: &RelayContext) {
    drop(ctx.table().remove(&session.key, session.id));
}

/// The task of a SOCKS5 session: set up the association (datagrams wait in
/// the channel meanwhile), then relay both ways until the server drops the
/// association or the flow ends. Either way the session leaves the table,
/// so the client's next datagram starts a fresh association.
pub async fn socks_pump(
    session: Arc<Session>,
    ctx: Arc<RelayContext>,
    server: Arc<Socks5Server>,
    mark: u32,
    mut rx: mpsc::Receiver<Outbound>,
) {
    let mut assoc = match socks5::associate(&server, mark, SOCKS_HANDSHAKE).await {
        Ok(a) => a,
        Err(e) => {
            ctx.stats().socks5_failures.inc();
            tracing::warn!(server = %server.addr, error = %e, "SOCKS5 association failed");
            close(&session, &ctx);
            return;
        }
    };
    ctx.stats().socks5_associations.inc();
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
                count_sent(ctx.stats(), Direction::Upstream, &sent, &[&out.payload]);
            }
            got = assoc.udp.recv(&mut inbound) => match got {
                Ok(n) => match socks5::decode_udp(inbound.get(..n).unwrap_or_default()) {
                    Ok((remote, payload)) => reply(&session, &[payload], remote, None, &ctx),
                    Err(e) => {
                        ctx.stats().receive_errors.inc();
                        tracing::debug!(error = %e, "bad datagram from the SOCKS5 relay");
                    }
                },
                // No error queue here: the relay's ICMP error is seen once,
                // as this failure.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => ctx.stats().upstream_unreachable.inc(),
                Err(e) => tracing::debug!(error = %e, "SOCKS5 relay receive failed"),
            },
            // The server never speaks on the control connection after the
            // handshake: EOF, an error or data all mean the association ended.
            _ = tokio::io::AsyncReadExt::read(&mut assoc.control, &mut control) => {
                ctx.stats().socks5_lost.inc();
                tracing::info!(server = %server.addr, client = %session.key.client, "SOCKS5 server closed the association");
                close(&session, &ctx);
                return;
            }
        }
    }
}
