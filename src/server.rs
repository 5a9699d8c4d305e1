//! Starting and stopping the daemon: bind every listener, run until told to
//! stop, then close everything in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use crate::config::Config;
use crate::net::sockets;
use crate::relay::{RelayContext, listener};
use crate::shutdown;
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source} (transparent sockets need CAP_NET_ADMIN)")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Runs the daemon until `stop` completes; returns the final counters.
pub async fn run(
    config: Config,
    stop: impl Future<Output = ()>,
) -> Result<Arc<Stats>, ServerError> {
    let stats = Arc::new(Stats::default());
    let relay = Arc::new(RelayContext::new(
        &config.relay,
        config.mark.0,
        stats.clone(),
    ));

    // Bind everything before serving anything, so a bad address fails the
    // start instead of leaving a half-working daemon.
    let mut sockets = Vec::new();
    for &addr in &config.relay.listen.0 {
        let sock = sockets::transparent_listener(addr)
            .and_then(UdpSocket::from_std)
            .map_err(|source| ServerError::Listen { addr, source })?;
        tracing::info!(%addr, "relay listening");
        sockets.push(sock);
    }

    let (trigger, shutdown) = shutdown::channel();
    let mut tasks = JoinSet::new();
    let listeners = sockets.len();
    for sock in sockets {
        tasks.spawn(listener::serve(sock, relay.clone(), shutdown.clone()));
    }
    tracing::info!(listeners, "tproxyd ready");

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
