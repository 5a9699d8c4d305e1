//! Starting and stopping the daemon: build the engines, bind every socket,
//! run until told to stop, then close everything in order.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::JoinSet;

use crate::config::Config;
use crate::dns::engine::DnsBuildError;
use crate::dns::{DnsEngine, DnsService, server as dns_server};
use crate::net::sockets;
use crate::relay::{RelayContext, listener};
use crate::shutdown::{self, Shutdown};
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(
        "cannot listen on {addr} ({what}): {source} (transparent sockets and marks need CAP_NET_ADMIN)"
    )]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("DNS: {0}")]
    Dns(#[from] DnsBuildError),
}

fn listen_error(addr: SocketAddr, what: &'static str) -> impl FnOnce(io::Error) -> ServerError {
    move |source| ServerError::Listen { addr, what, source }
}

/// Every socket, bound before anything is served so that a bad address
/// fails the start instead of leaving a half-working daemon.
struct Sockets {
    relay: Vec<UdpSocket>,
    dns_udp: Vec<UdpSocket>,
    dns_tcp: Vec<TcpListener>,
}

fn bind_all(config: &Config) -> Result<Sockets, ServerError> {
    let mark = config.mark.0;
    let mut s = Sockets {
        relay: Vec::new(),
        dns_udp: Vec::new(),
        dns_tcp: Vec::new(),
    };
    for &addr in &config.relay.listen.0 {
        let what = "relay, transparent UDP";
        let sock = sockets::transparent_listener(addr)
            .and_then(UdpSocket::from_std)
            .map_err(listen_error(addr, what))?;
        tracing::info!(%addr, "relay listening");
        s.relay.push(sock);
    }
    if let Some(dns) = config.dns() {
        for &addr in &dns.listen {
            let udp = sockets::server_udp(addr, mark)
                .and_then(UdpSocket::from_std)
                .map_err(listen_error(addr, "DNS, UDP"))?;
            let tcp = sockets::tcp_listener(addr, mark, false)
                .and_then(TcpListener::from_std)
                .map_err(listen_error(addr, "DNS, TCP"))?;
            tracing::info!(%addr, "DNS listening (UDP and TCP)");
            s.dns_udp.push(udp);
            s.dns_tcp.push(tcp);
        }
        for &addr in &dns.tcp_listen {
            let tcp = sockets::tcp_listener(addr, mark, true)
                .and_then(TcpListener::from_std)
                .map_err(listen_error(addr, "DNS, transparent TCP"))?;
            tracing::info!(%addr, "DNS listening (transparent TCP)");
            s.dns_tcp.push(tcp);
        }
    }
    Ok(s)
}

/// Runs the daemon until `stop` completes; returns the final counters.
pub async fn run(
    config: Config,
    stop: impl Future<Output = ()>,
) -> Result<Arc<Stats>, ServerError> {
    let stats = Arc::new(Stats::default());
    let dns = match config.dns() {
        Some(dns) => {
            let engine = DnsEngine::build(dns, config.mark.0, stats.clone())?;
            tracing::info!(rules = engine.rules().len(), groups = engine.groups().len(), ports = ?dns.ports, "DNS engine ready");
            Some(Arc::new(DnsService::new(
                Arc::new(engine),
                dns.ports.clone(),
                stats.clone(),
            )))
        }
        None => None,
    };
    let relay = Arc::new(RelayContext::new(
        &config.relay,
        config.mark.0,
        stats.clone(),
        dns.clone(),
    ));
    let sockets = bind_all(&config)?;

    let (trigger, shutdown) = shutdown::channel();
    let mut tasks: JoinSet<io::Result<()>> = JoinSet::new();
    for sock in sockets.relay {
        tasks.spawn(listener::serve(sock, relay.clone(), shutdown.clone()));
    }
    if let Some(dns) = &dns {
        spawn_dns(&mut tasks, dns, sockets.dns_udp, sockets.dns_tcp, &shutdown);
    }
    tracing::info!(tasks = tasks.len(), "tproxyd ready");

    tokio::select! {
        _ = stop => tracing::info!("shutting down"),
        Some(done) = tasks.join_next() => {
            // A listener only returns early on a socket error.
            tracing::error!(?done, "a listener stopped unexpectedly; shutting down");
        }
    }
    trigger.trigger();
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "listener ended with an error");
        }
    }
    let closed = relay.table.clear();
    tracing::info!(sessions_closed = closed, "all sessions closed");
    Ok(stats)
}

fn spawn_dns(
    tasks: &mut JoinSet<io::Result<()>>,
    dns: &Arc<DnsService>,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    shutdown: &Shutdown,
) {
    for sock in udp {
        tasks.spawn(dns_server::serve_udp(sock, dns.clone(), shutdown.clone()));
    }
    for listener in tcp {
        tasks.spawn(dns_server::serve_tcp(
            listener,
            dns.clone(),
            shutdown.clone(),
        ));
    }
}
