//! Upstream resolver groups: UDP, TCP, DNS-over-TLS and DNS-over-HTTPS,
//! with failover, hedging and single-flight.
//!
//! Plain UDP servers are asked by [`udp::Exchange`] (a random ID per query
//! and a socket from the server's rotating pool, [`ports`]: any 1,000
//! consecutive queries leave from as many random ports, RFC 5452); everything
//! connection-oriented (TCP, TLS, HTTPS, and TCP after a truncated UDP
//! answer) through hickory's `NameServerPool`, which reuses connections.
//!
//! A group resolves a question at most once at a time ([`flight`]): later
//! identical questions wait for the one in flight. The servers are raced
//! ([`failover`]): the first is asked at once, the next when the first
//! fails or has not answered within its observed 90th percentile latency
//! (never later than its share of `dns.timeout`), and the first valid
//! answer wins. A server that timed out is tried after the others for a
//! while ([`health`]).

mod failover;
mod flight;
mod health;
mod ports;
mod runtime;
mod udp;

use crate::places::{Place, Places};
use futures_util::StreamExt;
use hickory_net::{DnsError, DnsHandle, NetError};
use hickory_proto::op::{DnsRequest, DnsRequestOptions, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ProtocolConfig, ResolverOpts, ServerOrderingStrategy,
};
use hickory_resolver::{NameServerPool, PoolContext, TlsConfig};
use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use super::names::wire_key;
use super::plain_answer::PlainAnswer;
use crate::config::dns::{UpstreamGroupConfig, UpstreamProtocol, UpstreamServer};
use crate::stats::Stats;
pub use flight::Role;
/// The descriptors the upstream socket pools may hold (`relay::budget`).
pub use ports::{budget_used as pooled_sockets, set_budget as set_socket_budget};
pub use runtime::MarkedRuntime;
/// How a received datagram is checked against the query it should answer
/// (also the answer-path fuzz target's first step).
pub use udp::accept as accept_answer;

#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream group {group:?}: cannot read CA file {}: {reason}", path.display())]
    CaFile {
        group: String,
        path: PathBuf,
        reason: String,
    },
    #[error("TLS setup failed: {0}")]
    Tls(String),
    /// Every server failed or timed out.
    #[error("no upstream answered")]
    NoAnswer,
}

/// How often a group checks all its servers' idle sockets for age.
const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// Answers that mean "this server cannot help": ask the next one.
///
/// Only NOERROR, NXDOMAIN and YXDOMAIN (a DNAME too long to follow,
/// RFC 6672) say something about the name. Every other RCODE is about the
/// exchange or belongs to UPDATE and TSIG; the extended ones (BADVERS,
/// BADCOOKIE, ..., carried in an OPT record) were passed on as answers
/// before, and a client that sent no OPT, where a code above 15 cannot be
/// written, got NOERROR with no records: a name that exists but has no
/// address, which is false.
fn is_failure(rcode: ResponseCode) -> bool {
    !matches!(
        rcode,
        ResponseCode::NoError | ResponseCode::NXDomain | ResponseCode::YXDomain
    )
}

struct Server {
    label: String,
    addr: SocketAddr,
    /// Plain UDP first (TCP only after a truncated answer).
    udp: bool,
    /// TCP/TLS/HTTPS, and the TCP retry of truncated UDP answers.
    pool: NameServerPool<MarkedRuntime>,
    /// Plain UDP's sockets (empty for the other protocols).
    sockets: ports::ServerSockets,
    health: health::Health,
}

/// What identical in-flight questions share. Only the question is sent
/// upstream (the client's DO/CD bits are not forwarded), so name, type and
/// class are the whole of what changes the answer; the group is implied by
/// the map being per group.
/// The key is the cache's, packed (type, class, the name in lowercased
/// wire format, the group's name): cheap to hash and compare, and shared
/// with the miss's cache key rather than copied.
type FlightKey = Arc<[u8]>;
/// What a flight lands with. Not behind an `Arc`: the leader keeps its
/// answer as it is, and only followers (rare) get a clone of it, which
/// they needed anyway to own their answer (an `Arc` cost every miss an
/// allocation, a copy in and a copy out).
type Shared = Result<Answer, UpstreamError>;

/// An upstream's answer: checked on the wire when it has the plainest
/// shape ([`PlainAnswer`], which the engine answers and caches without a
/// hickory `Message`), read by hickory otherwise.
#[derive(Debug, Clone)]
pub enum Answer {
    Plain(PlainAnswer),
    Parsed(Message),
}

impl Answer {
    fn truncated(&self) -> bool {
        match self {
            Answer::Plain(_) => false,
            Answer::Parsed(m) => m.metadata.truncation,
        }
    }

    fn rcode(&self) -> ResponseCode {
        match self {
            Answer::Plain(_) => ResponseCode::NoError,
            Answer::Parsed(m) => m.metadata.response_code,
        }
    }

    /// The answer as a hickory message. A plain answer's bytes are read
    /// by hickory as the full path would have read them (the plain reader
    /// accepts nothing hickory refuses: `plain_answer`'s tests), so `None`
    /// is not expected; the caller treats it as no answer.
    pub fn into_message(self) -> Option<Message> {
        match self {
            Answer::Plain(p) => Message::from_vec(p.bytes()).ok(),
            Answer::Parsed(m) => Some(m),
        }
    }
}

/// A named list of servers answering the same questions.
pub struct UpstreamGroup {
    pub name: String,
    servers: Vec<Server>,
    server_timeout: Duration,
    randomize_case: bool,
    flights: flight::Flights<FlightKey, Shared>,
    /// Client queries waiting on this group (see [`UpstreamGroup::admit`]).
    pending: Arc<Places>,
    /// When the servers' idle sockets are next checked for age, in
    /// milliseconds after `created` (see [`UpstreamGroup::sweep_sockets`]).
    next_sweep_ms: AtomicU64,
    created: Instant,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for UpstreamGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let labels: Vec<&str> = self.servers.iter().map(|s| s.label.as_str()).collect();
        f.debug_struct("UpstreamGroup")
            .field("name", &self.name)
            .field("servers", &labels)
            .finish()
    }
}

/// A place in a group's pending limit, held until the client is answered.
#[derive(Debug)]
pub struct Admission(#[allow(dead_code)] Place);

impl UpstreamGroup {
    pub fn new(name: &str, config: &UpstreamGroupConfig, mark: u32, stats: Arc<Stats>) -> Result<Self, UpstreamError> {
        let tls = tls_config(name, config.ca_file.as_deref())?;
        let mut opts = ResolverOpts::default();
        opts.timeout = config.server_timeout;
        opts.attempts = 1;
        opts.num_concurrent_reqs = 1;
        opts.server_ordering_strategy = ServerOrderingStrategy::UserProvidedOrder;
        opts.case_randomization = false;
        opts.edns_payload_len = 1232;
        let cx = Arc::new(PoolContext::new(opts, tls));
        let servers = config
            .servers
            .get_ref()
            .iter()
            .map(|s| Server {
                label: label(s),
                addr: s.addr,
                udp: s.protocol == UpstreamProtocol::Udp,
                pool: NameServerPool::from_config(
                    [name_server(s, config.tls_name.as_deref().unwrap_or_default())],
                    cx.clone(),
                    MarkedRuntime::new(mark),
                ),
                sockets: ports::ServerSockets::new(s.addr, mark, stats.clone()),
                health: health::Health::default(),
            })
            .collect();
        Ok(UpstreamGroup {
            name: name.to_string(),
            servers,
            server_timeout: config.server_timeout,
            randomize_case: config.case_randomization,
            flights: flight::Flights::default(),
            pending: Places::new(config.max_pending.max(1)),
            next_sweep_ms: AtomicU64::new(0),
            created: Instant::now(),
            stats,
        })
    }

    /// A place among the group's pending queries, or `None` when
    /// `max_pending` are already waiting (answer SERVFAIL then).
    pub fn admit(&self) -> Option<Admission> {
        self.pending.try_take().map(Admission)
    }

    /// Resolves `query` by the group's servers, by `deadline`.
    ///
    /// If the same question is already on its way upstream, waits for that
    /// answer instead of asking again ([`Role::Follower`]), until its own
    /// `deadline` at the latest (then [`UpstreamError::NoAnswer`], while
    /// the flight goes on for the others and fills the cache). Dropping the
    /// returned future stops waiting; other callers of the same question
    /// carry on (one of them takes over the asking if needed).
    ///
    /// NXDOMAIN and no-data answers are answers (returned with their SOA);
    /// any other RCODE (SERVFAIL, REFUSED, FORMERR, NOTIMP, the extended
    /// ones such as BADVERS), timeouts and transport errors move on to the
    /// next server.
    ///
    /// `flight_key` names the question among the group's flights: equal
    /// keys share one flight, so it must say everything the question
    /// asks, its name in any case and its type and class (the caller's
    /// packed cache key, built for its look-up; the map holds a reference
    /// to it, not a copy). `spelt`, when given, is the query's name on the
    /// wire exactly as it is spelt (labels, case, root byte): the query
    /// then goes out as a copy of it, not written label by label from the
    /// `Name`.
    pub async fn resolve_shared(
        &self,
        query: &Query,
        flight_key: &Arc<[u8]>,
        spelt: Option<&[u8]>,
        deadline: Instant,
    ) -> (Result<Answer, UpstreamError>, Role) {
        debug_assert!(spelt.is_none_or(|s| s == &*wire_key(query.name())));
        let key = flight_key.clone();
        // A follower is answered by its own deadline, not its leader's
        // (`flight`): past it, no answer for this caller.
        let (shared, role) = match self
            .flights
            .run(key, deadline, || self.race(query, spelt, deadline))
            .await
        {
            Ok(landed) => landed,
            Err(flight::Late) => {
                // Counted apart: a rising count means shared questions
                // outlast the clients who wait on them (an upstream slower
                // than `dns.timeout`, or a device keeping a flight going).
                self.stats.dns_coalesced_late.inc();
                (Err(UpstreamError::NoAnswer), Role::Follower)
            }
        };
        if role == Role::Follower {
            self.stats.dns_coalesced.inc();
        }
        (shared, role)
    }

    /// [`UpstreamGroup::resolve_shared`], without saying who asked.
    pub async fn resolve(
        &self,
        query: &Query,
        flight_key: &Arc<[u8]>,
        spelt: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<Answer, UpstreamError> {
        self.resolve_shared(query, flight_key, spelt, deadline).await.0
    }

    pub fn server_labels(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.label.clone()).collect()
    }

    /// Questions on their way upstream now.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Appends the per-server metrics of `groups` (Prometheus text).
    pub fn render_metrics(groups: &[UpstreamGroup], out: &mut String) {
        health::render(
            out,
            groups.iter().flat_map(|g| {
                g.servers
                    .iter()
                    .map(move |s| (g.name.as_str(), s.label.as_str(), &s.health))
            }),
        );
    }

    /// Closes the servers' idle sockets that are past their age, every
    /// [`SWEEP_EVERY`] at most. A server's pool retires its old sockets as
    /// it is used; this covers the servers that are no longer asked (one
    /// that fell behind in the order, one only asked as a hedge), whose
    /// sockets would otherwise stay open until the next reload.
    fn sweep_sockets(&self, now: Instant) {
        let now_ms = u64::try_from(now.saturating_duration_since(self.created).as_millis()).unwrap_or(u64::MAX);
        let due = self.next_sweep_ms.load(Ordering::Relaxed);
        if now_ms < due || self.servers.len() < 2 {
            return;
        }
        let next = now_ms.saturating_add(u64::try_from(SWEEP_EVERY.as_millis()).unwrap_or(u64::MAX));
        if self
            .next_sweep_ms
            .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            for server in &self.servers {
                server.sockets.sweep();
            }
        }
    }

    /// One server's answer: UDP first where that is the protocol, TCP when
    /// the UDP answer was truncated. Error RCODEs count as failures so the
    /// next server is tried. `now` is the caller's reading of the clock.
    async fn ask(&self, server: &Server, query: &Query, spelt: Option<&[u8]>, now: Instant) -> Result<Answer, String> {
        if server.udp {
            let exchange = udp::Exchange {
                server: server.addr,
                sockets: &server.sockets,
                now,
                randomize_case: self.randomize_case,
                health: &server.health,
                stats: &self.stats,
            };
            let answer = exchange.run(query, spelt).await.map_err(|e| e.to_string())?;
            if !answer.truncated() {
                return match answer.rcode() {
                    rcode if is_failure(rcode) => Err(rcode.to_string()),
                    _ => Ok(answer),
                };
            }
        }
        let mut options = DnsRequestOptions::default();
        options.use_edns = true;
        options.edns_payload_len = 1232;
        options.recursion_desired = true;
        let request = DnsRequest::from_query(query.clone(), options);
        let answer = first_response(&server.pool, request).await.map_err(|e| e.to_string())?;
        if !answers_question(&answer, query) {
            server.health.mismatched.inc();
            self.stats.dns_upstream_mismatched.inc();
            return Err("an answer to another question".into());
        }
        match answer.metadata.response_code {
            rcode if is_failure(rcode) => Err(rcode.to_string()),
            _ => Ok(Answer::Parsed(answer)),
        }
    }
}

/// Whether `answer` (from a connection hickory keeps) is about `query`:
/// one question, its name (in any case), type and class. hickory matches
/// a response to its request by ID alone, so an answer to another question
/// (a late answer to an abandoned query whose ID came round again on a
/// reused connection, or a confused or lying server) would otherwise have
/// been taken as this one's, its RCODE (NXDOMAIN) kept for the wrong
/// name. Plain UDP answers are checked more strictly (`udp::accept`).
fn answers_question(answer: &Message, query: &Query) -> bool {
    match answer.queries.as_slice() {
        [q] => {
            q.query_type() == query.query_type()
                && q.query_class() == query.query_class()
                && q.name().eq_ignore_root(query.name())
        }
        _ => false,
    }
}

/// The first response from `pool`, with hickory's "no records" errors
/// turned back into the negative answers they came from.
async fn first_response(pool: &NameServerPool<MarkedRuntime>, request: DnsRequest) -> Result<Message, NetError> {
    match pool.send(request).next().await {
        Some(Ok(response)) => Ok(response.into_message()),
        Some(Err(NetError::Dns(DnsError::NoRecordsFound(nr)))) => {
            let mut m = Message::new(0, MessageType::Response, OpCode::Query);
            m.metadata.response_code = nr.response_code;
            m.metadata.recursion_available = true;
            m.add_query(*nr.query);
            match (nr.authorities, nr.soa) {
                (Some(auth), _) => m.add_authorities(auth.iter().cloned()),
                (None, Some(soa)) => m.add_authority(soa.into_record_of_rdata()),
                (None, None) => &mut m,
            };
            if nr.response_code == ResponseCode::ServFail {
                return Err(NetError::from("SERVFAIL"));
            }
            Ok(m)
        }
        Some(Err(e)) => Err(e),
        None => Err(NetError::from("no response")),
    }
}

fn label(s: &UpstreamServer) -> String {
    match s.protocol {
        UpstreamProtocol::Udp => format!("udp://{}", s.addr),
        UpstreamProtocol::Tcp => format!("tcp://{}", s.addr),
        UpstreamProtocol::Tls => format!("tls://{}", s.addr),
        UpstreamProtocol::Https => format!("https://{}{}", s.addr, s.path),
    }
}

fn name_server(s: &UpstreamServer, tls_name: &str) -> NameServerConfig {
    let connection = |protocol| {
        let mut c = ConnectionConfig::new(protocol);
        c.port = s.addr.port();
        c
    };
    let connections = match s.protocol {
        // UDP goes through our own multiplexer; hickory only does the TCP
        // retry of a truncated answer.
        UpstreamProtocol::Udp => vec![connection(ProtocolConfig::Tcp)],
        UpstreamProtocol::Tcp => vec![connection(ProtocolConfig::Tcp)],
        UpstreamProtocol::Tls => vec![connection(ProtocolConfig::Tls {
            server_name: tls_name.into(),
        })],
        UpstreamProtocol::Https => vec![connection(ProtocolConfig::Https {
            server_name: tls_name.into(),
            path: s.path.as_str().into(),
        })],
    };
    NameServerConfig::new(s.addr.ip(), true, connections)
}

/// Public web roots, plus the group's own CA file when it has one (a
/// resolver on the LAN with a private certificate).
fn tls_config(group: &str, ca_file: Option<&Path>) -> Result<TlsConfig, UpstreamError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let ca_error = |reason: String| UpstreamError::CaFile {
            group: group.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| ca_error(e.to_string()))?;
        let mut added = 0;
        for cert in certs {
            let cert = cert.map_err(|e| ca_error(e.to_string()))?;
            roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            added += 1;
        }
        if added == 0 {
            return Err(ca_error("no certificate in the file".into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| UpstreamError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConfig { config })
}
