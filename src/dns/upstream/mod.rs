//! Upstream resolver groups: UDP, TCP, DNS-over-TLS and DNS-over-HTTPS
//! through hickory-resolver's name-server layer, with failover.
//!
//! Plain UDP servers are asked through [`udp::UdpMux`] (a few long-lived
//! sockets, queries told apart by ID); everything connection-oriented (TCP,
//! TLS, HTTPS, and TCP after a truncated UDP answer) through hickory's
//! `NameServerPool`, which reuses connections. The failover across servers
//! is ours: servers are tried in order, starting
//! with the last one that answered, each for at most `server_timeout`, all
//! within the query's overall deadline. A dead first server therefore costs
//! one timeout once, not on every query.

mod runtime;
mod udp;

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
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

use crate::config::dns::{UpstreamGroupConfig, UpstreamProtocol, UpstreamServer};
pub use runtime::MarkedRuntime;

#[derive(Debug, thiserror::Error)]
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

struct Server {
    label: String,
    /// Plain UDP servers: the first try.
    udp: Option<udp::UdpMux>,
    /// TCP/TLS/HTTPS, and the TCP retry of truncated UDP answers.
    pool: NameServerPool<MarkedRuntime>,
}

impl Server {
    /// One server's answer: UDP first where that is the protocol, TCP when
    /// the UDP answer was truncated. SERVFAIL and REFUSED count as failures
    /// so the next server is tried.
    async fn ask(&self, query: &Query) -> Result<Message, String> {
        if let Some(udp) = &self.udp {
            let answer = udp.query(query).await.map_err(|e| e.to_string())?;
            if !answer.metadata.truncation {
                return match answer.metadata.response_code {
                    ResponseCode::ServFail | ResponseCode::Refused => Err(answer.metadata.response_code.to_string()),
                    _ => Ok(answer),
                };
            }
        }
        let mut options = DnsRequestOptions::default();
        options.use_edns = true;
        options.edns_payload_len = 1232;
        options.recursion_desired = true;
        let request = DnsRequest::from_query(query.clone(), options);
        first_response(&self.pool, request).await.map_err(|e| e.to_string())
    }
}

/// A named list of servers answering the same questions.
pub struct UpstreamGroup {
    pub name: String,
    servers: Vec<Server>,
    /// Index of the server to try first: the last one that answered.
    preferred: AtomicUsize,
    server_timeout: Duration,
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

impl UpstreamGroup {
    pub fn new(name: &str, config: &UpstreamGroupConfig, mark: u32) -> Result<Self, UpstreamError> {
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
                udp: (s.protocol == UpstreamProtocol::Udp).then(|| udp::UdpMux::new(s.addr, mark)),
                pool: NameServerPool::from_config(
                    [name_server(s, config.tls_name.as_deref().unwrap_or_default())],
                    cx.clone(),
                    MarkedRuntime::new(mark),
                ),
            })
            .collect();
        Ok(UpstreamGroup {
            name: name.to_string(),
            servers,
            preferred: AtomicUsize::new(0),
            server_timeout: config.server_timeout,
        })
    }

    /// Resolves `query`, trying servers until one answers or `deadline`.
    ///
    /// NXDOMAIN and no-data answers are answers (returned with their SOA);
    /// only SERVFAIL, REFUSED, timeouts and transport errors move on to the
    /// next server.
    pub async fn resolve(&self, query: &Query, deadline: Instant) -> Result<Message, UpstreamError> {
        let n = self.servers.len();
        let first = self.preferred.load(Ordering::Relaxed);
        for i in 0..n {
            let idx = (first + i) % n;
            let server = &self.servers[idx];
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let budget = self.server_timeout.min(deadline - now);
            let attempt = tokio::time::timeout(budget, server.ask(query)).await;
            match attempt {
                Ok(Ok(message)) => {
                    if idx != first {
                        tracing::info!(group = %self.name, server = %server.label, "failing over to this upstream");
                        self.preferred.store(idx, Ordering::Relaxed);
                    }
                    return Ok(message);
                }
                Ok(Err(e)) => {
                    tracing::debug!(group = %self.name, server = %server.label, error = %e, "upstream failed")
                }
                Err(_) => {
                    tracing::debug!(group = %self.name, server = %server.label, ?budget, "upstream timed out")
                }
            }
        }
        Err(UpstreamError::NoAnswer)
    }

    pub fn server_labels(&self) -> Vec<String> {
        self.servers.iter().map(|s| s.label.clone()).collect()
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
