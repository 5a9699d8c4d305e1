//! The admin endpoint: Prometheus metrics over plain HTTP on loopback.
//!
//! One GET per connection, answered and closed: this serves a scraper every
//! few seconds, so a full HTTP stack would be weight without use.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{AbortHandle, JoinSet};

use crate::dns::DnsService;
use crate::metrics::{self, Gauge};
use crate::net::accept::AcceptBackoff;
use crate::relay::RelayContext;
use crate::relay::budget;
use crate::shutdown::Shutdown;

const MAX_REQUEST: usize = 8 * 1024;

/// Longest one connection is served, request and answer together. A
/// timeout per read let a client sending a byte every few seconds hold its
/// connection for hours.
const DEADLINE: Duration = Duration::from_secs(5);

/// Most connections served at once. A scraper needs one. Any local user
/// can connect (loopback is the only restriction), and each connection is
/// a descriptor of the daemon, taken from the reserve that DNS over TCP and
/// upstream sockets share (`relay.fd_reserve`).
///
/// When all are taken, a new connection takes the place of the oldest one
/// still waiting for its request head (or, when none is, of the oldest).
/// Closing the newcomer instead let one local process that held 16 idle
/// connections (opening another as each was closed at the deadline) keep
/// every scraper, and so `/metrics`, out for as long as it liked. A
/// scraper's request usually comes with its connection, so idle holders
/// give way before it whatever their number.
const MAX_CONNECTIONS: usize = 16;

/// What the metrics are read from.
#[derive(Clone)]
pub struct Sources {
    pub relay: Arc<RelayContext>,
    pub dns: Option<Arc<DnsService>>,
}

impl Sources {
    /// `/names?client=IP&dst=IP`: the names tproxyd's DNS answered that
    /// client with that address, one per line (what `tproxyd explain
    /// --dst` shows). Read only: asking does not keep the entry alive.
    /// Answers are recorded only while a relay rule matches by domain, so
    /// without one this is always empty.
    fn names(&self, path: &[u8]) -> Option<String> {
        let query = std::str::from_utf8(path).ok()?.strip_prefix("/names?")?;
        let mut client = None;
        let mut dst = None;
        for pair in query.split('&') {
            match pair.split_once('=') {
                Some(("client", v)) => client = v.parse::<std::net::IpAddr>().ok(),
                Some(("dst", v)) => dst = v.parse::<std::net::IpAddr>().ok(),
                _ => {}
            }
        }
        let (client, dst) = (client?, dst?);
        let names = self
            .dns
            .as_ref()
            .and_then(|d| d.engine().feed().cloned())
            .map(|f| f.map().lookup(client, dst, std::time::Instant::now()))
            .unwrap_or_default();
        Some(names.iter().map(|n| format!("{n}\n")).collect())
    }

    fn metrics(&self) -> String {
        let mut text = metrics::render(self.relay.stats(), &self.gauges());
        if let Some(dns) = &self.dns {
            dns.engine().render_upstream_metrics(&mut text);
        }
        text
    }

    fn gauges(&self) -> Vec<Gauge> {
        let relay = &self.relay;
        let (clients, heaviest) = relay.table().clients();
        let mut g = vec![
            (
                "sessions_active",
                "Flows in the session table.",
                relay.table().len() as u64,
            ),
            (
                "clients_active",
                "Clients (IPv4 addresses, IPv6 /64s) holding flows.",
                clients as u64,
            ),
            (
                "client_sessions_max",
                "Flows held by the busiest client.",
                heaviest as u64,
            ),
            (
                "reply_sockets",
                "Spoofing reply sockets open (bound; raw-IP fallbacks share one raw socket).",
                relay.replies().open() as u64,
            ),
            (
                "upstream_sockets",
                "Pooled upstream sockets open (shared by flows to different destinations).",
                relay.pools().sockets() as u64,
            ),
            (
                "own_sockets",
                "Upstream sockets of flows that have one of their own (relay.own_socket_ports, a rule's own_socket).",
                relay.pools().own_sockets() as u64,
            ),
            (
                "flow_sockets",
                "Descriptors held by flows: pooled, full-cone and SOCKS5 sockets.",
                relay.flow_fds().held() as u64,
            ),
            (
                "socks5_queued_bytes",
                "Bytes waiting for SOCKS5 flows' tasks (bounded by relay.socks5_queue_bytes).",
                relay.socks_budget().queued() as u64,
            ),
            (
                "flow_sockets_limit",
                "Descriptors flows may hold (the budget's flow share).",
                relay.flow_fds().max() as u64,
            ),
            (
                "open_fds",
                "Descriptors this process has open.",
                budget::open_fds() as u64,
            ),
        ];
        if let Some(dns) = &self.dns {
            g.push((
                "dns_upstream_sockets",
                "Pooled upstream DNS UDP sockets open, all servers (bounded by the budget's DNS share).",
                crate::dns::upstream::pooled_sockets() as u64,
            ));
            g.push((
                "dns_cache_entries",
                "Answers in the DNS cache.",
                dns.engine().cache_len() as u64,
            ));
            g.push((
                "dns_cache_bytes",
                "Estimated memory held by DNS cache entries (bounded by dns.cache.max_bytes).",
                dns.engine().cache_bytes() as u64,
            ));
            if let Some(feed) = dns.engine().feed() {
                let map = feed.map();
                g.push((
                    "name_map_entries",
                    "(client, answered address) entries in the name map used by domain rules.",
                    map.len() as u64,
                ));
                g.push(("name_map_bytes", "Bytes counted for the name map.", map.bytes() as u64));
                g.push((
                    "name_map_evicted",
                    "Name map entries pushed out by its bounds before they expired (since start).",
                    map.evicted(),
                ));
            }
        }
        g
    }
}

/// A connection being served.
struct Slot {
    task: AbortHandle,
    /// Still waiting for the end of its request head: the first to give
    /// way to a newcomer when every slot is taken.
    reading: Arc<AtomicBool>,
}

pub async fn serve(listener: TcpListener, sources: Sources, mut shutdown: Shutdown) -> io::Result<()> {
    let mut backoff = AcceptBackoff::new("admin");
    // Owned here: finished requests are reaped as new ones come, and
    // whatever is still running is aborted when the endpoint stops.
    let mut requests = JoinSet::new();
    // The connections being served, oldest first.
    let mut served: VecDeque<Slot> = VecDeque::with_capacity(MAX_CONNECTIONS + 1);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            v = backoff.accept(&listener) => v,
        };
        let sources = sources.clone();
        while requests.try_join_next().is_some() {}
        served.retain(|slot| !slot.task.is_finished());
        // A scraper sends its request as soon as it is connected, so it is
        // usually here already: such a connection is not idle, and holders
        // that never finish a request give way before it.
        let mut request = Vec::with_capacity(1024);
        let mut chunk = [0u8; 1024];
        if let Ok(n) = stream.try_read(&mut chunk) {
            request.extend_from_slice(&chunk[..n]);
        }
        let reading = Arc::new(AtomicBool::new(!head_complete(&request)));
        if served.len() >= MAX_CONNECTIONS {
            let idle = served
                .iter()
                .position(|slot| slot.reading.load(Ordering::Relaxed))
                .unwrap_or(0);
            if let Some(gone) = served.remove(idle) {
                tracing::debug!(%peer, "admin endpoint full: an older connection closed for a new one");
                gone.task.abort();
            }
        }
        let flag = reading.clone();
        let task = requests.spawn(async move {
            match tokio::time::timeout(DEADLINE, respond(stream, request, &flag, &sources)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin request failed"),
                Err(_) => tracing::debug!(%peer, "admin request not done within {DEADLINE:?}: closed"),
            }
        });
        served.push_back(Slot { task, reading });
    }
}

/// Whether `request` holds a whole request head.
fn head_complete(request: &[u8]) -> bool {
    request.windows(4).any(|w| w == b"\r\n\r\n")
}

/// Reads the rest of the request head after `request` (what came with the
/// connection), clearing `reading` once it is whole, and answers it.
async fn respond(
    mut stream: TcpStream,
    mut request: Vec<u8>,
    reading: &AtomicBool,
    sources: &Sources,
) -> io::Result<()> {
    let mut chunk = [0u8; 1024];
    while !head_complete(&request) {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || request.len() + n > MAX_REQUEST {
            return Ok(());
        }
        request.extend_from_slice(&chunk[..n]);
    }
    reading.store(false, Ordering::Relaxed);
    let line = request.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let (status, content_type, body) = match (method, path) {
        (b"GET", b"/metrics") => ("200 OK", "text/plain; version=0.0.4; charset=utf-8", sources.metrics()),
        (b"GET", b"/") => (
            "200 OK",
            "text/plain; charset=utf-8",
            "tproxyd: see /metrics\n".to_string(),
        ),
        (b"GET", p) if p.starts_with(b"/names?") => match sources.names(p) {
            Some(body) => ("200 OK", "text/plain; charset=utf-8", body),
            None => (
                "400 Bad Request",
                "text/plain; charset=utf-8",
                "use /names?client=IP&dst=IP\n".to_string(),
            ),
        },
        (b"GET", _) => ("404 Not Found", "text/plain; charset=utf-8", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "GET only\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}
