//! Where DNS queries arrive, and the limits that keep a flood of them from
//! exhausting the daemon.

use arc_swap::ArcSwap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::engine::{DnsEngine, Outcome, Pending, Transport};
use crate::net::accept::AcceptBackoff;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Most cache misses waiting for an upstream at once. Past this, new
/// misses are dropped (and counted): the client retries, and a flood of
/// random names cannot grow the task count without bound.
const MAX_PENDING: usize = 4_096;
/// Most DNS-over-TCP connections served at once.
const MAX_TCP_CONNECTIONS: usize = 512;
/// A TCP client idle this long is disconnected (RFC 7766 suggests seconds).
const TCP_IDLE: Duration = Duration::from_secs(10);

/// The engine (swapped whole on reload) and the limits that outlive it.
#[derive(Debug)]
pub struct DnsService {
    engine: ArcSwap<DnsEngine>,
    pending: Arc<Semaphore>,
    tcp_connections: Arc<Semaphore>,
    stats: Arc<Stats>,
}

impl DnsService {
    pub fn new(engine: DnsEngine, stats: Arc<Stats>) -> Self {
        DnsService {
            engine: ArcSwap::from_pointee(engine),
            pending: Arc::new(Semaphore::new(MAX_PENDING)),
            tcp_connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
            stats,
        }
    }

    /// The engine in force now.
    pub fn engine(&self) -> Arc<DnsEngine> {
        self.engine.load_full()
    }

    /// Puts a new engine in force; queries already being answered finish
    /// with the old one.
    pub fn replace_engine(&self, mut engine: DnsEngine) {
        if let Some(feed) = self.engine.load().feed() {
            engine.set_feed(feed.clone());
        }
        self.engine.store(Arc::new(engine));
    }

    /// Whether datagrams diverted to original port `port` are DNS for us.
    pub fn hijacks(&self, port: u16) -> bool {
        self.engine.load().hijacks(port)
    }

    /// A permit to forward one more query, or `None` when too many wait.
    pub fn forward_permit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.pending.clone().try_acquire_owned().ok();
        if permit.is_none() {
            self.stats.dns_dropped_overload.inc();
        }
        permit
    }

    /// Answers a UDP query, spawning the upstream wait if there is one;
    /// `send` delivers the answer (now or later).
    pub fn answer_udp(&self, bytes: &[u8], client: SocketAddr, send: impl FnOnce(&[u8]) + Send + 'static) {
        let engine = self.engine.load_full();
        match engine.answer_now(bytes, client.ip(), Transport::Udp) {
            Outcome::Reply(reply) => send(&reply),
            Outcome::Drop => {}
            // The same engine must finish the query: its upstream group
            // numbers mean nothing to another one.
            Outcome::Forward(pending) => self.spawn_forward(engine, pending, send),
            Outcome::Held(reply, committed) => {
                // Bounded like forwards: a flood of answers waiting for
                // the kernel cannot grow the task count without bound.
                let Some(permit) = self.forward_permit() else {
                    return;
                };
                tokio::spawn(async move {
                    crate::domain::feed::released(committed).await;
                    send(&reply);
                    drop(permit);
                });
            }
        }
    }

    fn spawn_forward(&self, engine: Arc<DnsEngine>, pending: Pending, send: impl FnOnce(&[u8]) + Send + 'static) {
        let Some(permit) = self.forward_permit() else {
            // Never silent: the client learns at once that we are overloaded.
            if let Some(reply) = engine.overloaded(pending) {
                send(&reply);
            }
            return;
        };
        tokio::spawn(async move {
            if let Some(reply) = engine.forward(pending).await {
                send(&reply);
            }
            drop(permit);
        });
    }
}

/// A plain DNS server on a UDP socket (clients configured to use us).
pub async fn serve_udp(socket: UdpSocket, service: Arc<DnsService>, mut shutdown: Shutdown) -> io::Result<()> {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, client) = tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            r = socket.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    // ICMP errors from earlier replies surface here; keep serving.
                    service.stats.receive_errors.inc();
                    tracing::debug!(error = %e, "DNS UDP receive failed");
                    continue;
                }
            },
        };
        let reply_socket = socket.clone();
        let stats = service.stats.clone();
        let query = buf.get(..n).unwrap_or_default();
        service.answer_udp(query, client, move |reply| {
            if reply_socket.try_send_to(reply, client).is_err() {
                stats.reply_send_errors.inc();
            }
        });
    }
}

/// A DNS-over-TCP server: plain (`dns.listen`) or transparent
/// (`dns.tcp_listen`, where TPROXY hands over connections to any address,
/// so a client retrying over TCP after TC=1 is still answered by us).
pub async fn serve_tcp(listener: TcpListener, service: Arc<DnsService>, mut shutdown: Shutdown) -> io::Result<()> {
    let mut backoff = AcceptBackoff::new("DNS over TCP");
    loop {
        let (stream, client) = tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    backoff.failed(&e).await;
                    continue;
                }
            },
        };
        backoff.succeeded();
        let Ok(permit) = service.tcp_connections.clone().try_acquire_owned() else {
            service.stats.dns_dropped_overload.inc();
            continue; // dropping the stream closes it
        };
        let service = service.clone();
        let conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, client, &service, conn_shutdown).await {
                tracing::debug!(%client, error = %e, "DNS TCP connection ended");
            }
            drop(permit);
        });
    }
}

/// Length-prefixed queries (RFC 1035 4.2.2) answered in order until the
/// client closes, goes idle, or sends garbage.
async fn serve_connection(
    mut stream: TcpStream,
    client: SocketAddr,
    service: &DnsService,
    mut shutdown: Shutdown,
) -> io::Result<()> {
    let mut buf = vec![0u8; 65_535];
    loop {
        let len = tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            r = tokio::time::timeout(TCP_IDLE, stream.read_u16()) => match r {
                Ok(Ok(len)) => usize::from(len),
                Ok(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(()), // idle
            },
        };
        let query = buf.get_mut(..len).unwrap_or_default();
        tokio::time::timeout(TCP_IDLE, stream.read_exact(query))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "query body"))??;
        service.stats.dns_tcp_queries.inc();
        let Some(reply) = service.engine().answer(query, client.ip(), Transport::Tcp).await else {
            return Ok(()); // malformed beyond answering: close, as RFC 7766 allows
        };
        let Ok(reply_len) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&reply_len.to_be_bytes());
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
}
