//! Starting and stopping the daemon.
//!
//! Start-up happens in two steps so privileges can be dropped in between:
//! [`prepare`] (still root, still one thread) loads the rules and lists,
//! binds every socket, installs `auto_rules` and writes the pid file; then
//! [`run`] (as the configured user, on the async runtime) serves until told
//! to stop, and shuts down in order: listeners, flows, rules, pid file.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::admin;
use crate::config::Config;
use crate::dns::engine::DnsBuildError;
use crate::dns::{DnsEngine, DnsService, server as dns_server};
use crate::domain::DomainFeed;
use crate::firewall::{AutoRules, FirewallError};
use crate::net::sockets;
use crate::pidfile::PidFile;
use crate::relay::{RelayContext, budget, expiry, listener, opener};
use crate::reload::{LogFilterHandle, Reloader};
use crate::shutdown::{self, Shutdown};
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({what}): {source} (transparent sockets and marks need CAP_NET_ADMIN)")]
    Listen {
        addr: SocketAddr,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "cannot listen on {addr} ({what}): another process already holds this address (another tproxyd, or \
         any program bound to the port); tproxyd does not share its listening ports, stop the other one first"
    )]
    AddressTaken { addr: SocketAddr, what: &'static str },
    #[error("DNS: {0}")]
    Dns(#[from] DnsBuildError),
    #[error("DNS nftables sets: {0} (tproxyd needs CAP_NET_ADMIN and nf_tables)")]
    Sets(#[from] crate::nft::NftError),
    #[error("auto_rules: {0}")]
    Firewall(#[from] FirewallError),
    #[error(
        "cannot write pid file {}: {reason}. Its directory must exist and be writable by the user tproxyd \
         runs as; under config/tproxyd.service use pid_file = \"/run/tproxyd/tproxyd.pid\" (the unit's \
         RuntimeDirectory=tproxyd creates that directory), or leave pid_file out (`tproxyd reload --config \
         FILE` then finds the daemon by its config file)",
        path.display()
    )]
    PidFile { path: PathBuf, reason: io::Error },
}

/// What the daemon is told while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP: re-read the config.
    Reload,
    /// SIGINT / SIGTERM: shut down.
    Stop,
}

/// Installed `auto_rules`, removed when dropped: on a normal exit, on an
/// error after installing, and on a panic. (A SIGKILL leaves them; the next
/// start replaces them.)
struct InstalledRules(AutoRules);

impl Drop for InstalledRules {
    fn drop(&mut self) {
        match self.0.remove() {
            Ok(()) => tracing::info!("auto_rules removed"),
            Err(e) => tracing::error!("removing auto_rules: {e}"),
        }
    }
}

/// Everything set up while still privileged.
pub struct Prepared {
    config: Config,
    stats: Arc<Stats>,
    dns_engine: Option<DnsEngine>,
    /// What the DNS answers feed (name map, nftables sets).
    feed: Option<Arc<DomainFeed>>,
    /// One `SO_REUSEPORT` group per relay listen address.
    relay: Vec<Vec<std::net::UdpSocket>>,
    dns_udp: Vec<std::net::UdpSocket>,
    dns_tcp: Vec<std::net::TcpListener>,
    admin: Option<std::net::TcpListener>,
    // Dropped last (field order), after the sockets are closed.
    rules: Option<InstalledRules>,
    pid_file: Option<PidFile>,
}

fn listen_error(addr: SocketAddr, what: &'static str) -> impl FnOnce(io::Error) -> ServerError {
    move |source| ServerError::Listen { addr, what, source }
}

/// Fails the start when another socket already holds UDP `addr`: the
/// listening sockets set `SO_REUSEADDR` (and the relay's `SO_REUSEPORT`),
/// so binding them would silently share the traffic with it. (TCP needs no
/// check: a second listener on a listening port is refused by the kernel.)
fn refuse_if_taken(addr: SocketAddr, transparent: bool, what: &'static str) -> Result<(), ServerError> {
    if addr.port() == 0 {
        return Ok(());
    }
    match sockets::address_taken(addr, transparent) {
        Ok(false) => Ok(()),
        Ok(true) => Err(ServerError::AddressTaken { addr, what }),
        Err(source) => Err(ServerError::Listen { addr, what, source }),
    }
}

/// The listening sockets of one relay address: `listener_sockets` members
/// of one `SO_REUSEPORT` group, all on the port the first one got.
fn relay_group(addr: SocketAddr, relay: &crate::config::RelayConfig) -> io::Result<Vec<std::net::UdpSocket>> {
    let n = relay.listener_sockets.get();
    let buffer = relay.listener_socket_buffer();
    let first = sockets::transparent_listener(addr, buffer, n > 1)?;
    let bound = first.local_addr()?;
    let mut group = vec![first];
    for _ in 1..n {
        group.push(sockets::transparent_listener(bound, buffer, true)?);
    }
    Ok(group)
}

/// Loads the DNS rules, binds every socket (so a bad address fails the
/// start instead of leaving a half-working daemon), installs `auto_rules`
/// and writes the pid file.
pub fn prepare(config: Config) -> Result<Prepared, ServerError> {
    let stats = Arc::new(Stats::default());
    let mark = config.mark.0;
    let (dns_engine, feed) = match config.dns() {
        Some(dns) => {
            let mut engine = DnsEngine::build(dns, mark, stats.clone())?;
            engine.load_cache_file();
            tracing::info!(rules = engine.rules().len(), groups = engine.groups().len(), ports = ?dns.ports, "DNS engine ready");
            // Sets are created now, while privileged.
            let feed = Arc::new(DomainFeed::new(dns, stats.clone())?);
            feed.follow(&config);
            engine.set_feed(feed.clone());
            (Some(engine), Some(feed))
        }
        None => (None, None),
    };
    let mut p = Prepared {
        stats,
        dns_engine,
        feed,
        relay: Vec::new(),
        dns_udp: Vec::new(),
        dns_tcp: Vec::new(),
        admin: None,
        rules: None,
        pid_file: None,
        config,
    };
    // Every address is checked before any is bound, so our own sockets
    // never trip the check (reloads keep the sockets and bind nothing).
    for &addr in &p.config.relay.listen.0 {
        refuse_if_taken(addr, true, "relay, transparent UDP")?;
    }
    if let Some(dns) = p.config.dns() {
        for &addr in &dns.listen {
            refuse_if_taken(addr, false, "DNS, UDP")?;
        }
    }
    for &addr in &p.config.relay.listen.0 {
        p.relay
            .push(relay_group(addr, &p.config.relay).map_err(listen_error(addr, "relay, transparent UDP"))?);
        tracing::info!(%addr, sockets = p.config.relay.listener_sockets, "relay listening");
    }
    if let Some(dns) = p.config.dns() {
        for &addr in &dns.listen {
            p.dns_udp.push(
                sockets::server_udp(addr, mark, p.config.relay.receive_buffer)
                    .map_err(listen_error(addr, "DNS, UDP"))?,
            );
            p.dns_tcp
                .push(sockets::tcp_listener(addr, mark, false).map_err(listen_error(addr, "DNS, TCP"))?);
            tracing::info!(%addr, "DNS listening (UDP and TCP)");
        }
        for &addr in &dns.tcp_listen {
            p.dns_tcp
                .push(sockets::tcp_listener(addr, mark, true).map_err(listen_error(addr, "DNS, transparent TCP"))?);
            tracing::info!(%addr, "DNS listening (transparent TCP)");
        }
    }
    if let Some(admin) = &p.config.admin {
        let addr = admin.listen.0;
        let l = std::net::TcpListener::bind(addr)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(listen_error(addr, "admin"))?;
        tracing::info!(%addr, "metrics at http://{addr}/metrics");
        p.admin = Some(l);
    }
    if let Some(rules) = AutoRules::from_config(&p.config) {
        rules.install()?;
        tracing::info!("auto_rules installed");
        p.rules = Some(InstalledRules(rules));
    }
    if let Some(path) = &p.config.pid_file {
        // Owned by the user the daemon becomes, so it can still clear it.
        let owner = p
            .config
            .user
            .as_deref()
            .and_then(|u| nix::unistd::User::from_name(u).ok().flatten())
            .map(|u| (u.uid, u.gid));
        p.pid_file = Some(PidFile::create(path, owner).map_err(|reason| ServerError::PidFile {
            path: path.clone(),
            reason,
        })?);
    }
    Ok(p)
}

/// What `first` and every event already queued behind it ask for, taken
/// together: a stop if any of them stops, else one reload. Each SIGHUP is
/// queued as it comes, and a reload waits for the one before it: a burst
/// of them (a script, or reloads sent faster than a large list loads) was
/// one full reload each, one after another, and a SIGTERM sent after them
/// waited for them all. One reload reads the files as they are by then,
/// which is all that the reloads queued before it could have read.
fn pending(first: Event, queued: &mut mpsc::UnboundedReceiver<Event>) -> Event {
    let mut event = first;
    while let Ok(next) = queued.try_recv() {
        if next == Event::Stop {
            event = Event::Stop;
        }
    }
    event
}

/// How the daemon is controlled while it runs.
pub struct Control {
    pub events: mpsc::UnboundedReceiver<Event>,
    /// Re-read on [`Event::Reload`].
    pub config_path: PathBuf,
    /// Applies `log_level` on reload (absent when `RUST_LOG` rules).
    pub log_filter: Option<LogFilterHandle>,
}

/// Serves until [`Event::Stop`]; returns the final counters.
pub async fn run(prepared: Prepared, mut control: Control) -> Result<Arc<Stats>, ServerError> {
    let Prepared {
        config,
        stats,
        dns_engine,
        feed,
        relay,
        dns_udp,
        dns_tcp,
        admin,
        rules,
        pid_file,
    } = prepared;
    let mark = config.mark.0;
    let dns = dns_engine.map(|e| Arc::new(DnsService::new(e, stats.clone())));
    let relay_ctx = Arc::new(RelayContext::new(
        &config.relay,
        mark,
        stats.clone(),
        dns.clone(),
        budget::soft_fd_limit(),
    ));
    crate::dns::upstream::set_socket_budget(budget::Plan::new(&config.relay, budget::soft_fd_limit()).dns_upstream);

    let (trigger, shutdown) = shutdown::channel();
    let mut tasks: JoinSet<io::Result<()>> = JoinSet::new();
    // A listener task per worker thread for each address (as many as it
    // has sockets at most), each serving its share of the group; and as
    // many opener tasks, so new flows can be opened on every worker.
    let workers = tokio::runtime::Handle::current().metrics().num_workers().max(1);
    for group in relay {
        let per_task = workers.min(group.len()).max(1);
        let mut shares: Vec<Vec<tokio::net::UdpSocket>> = (0..per_task).map(|_| Vec::new()).collect();
        for (i, sock) in group.into_iter().enumerate() {
            shares[i % per_task].push(async_udp(sock, "relay")?);
        }
        for share in shares {
            tasks.spawn(listener::serve(share, relay_ctx.clone(), shutdown.clone()));
        }
    }
    opener::start(&relay_ctx, workers);
    tasks.spawn(expiry::sweep(relay_ctx.clone(), shutdown.clone()));
    if let Some(feed) = &feed {
        tasks.spawn(sweep_names(feed.clone(), shutdown.clone()));
    }
    if let Some(dns) = &dns {
        spawn_dns(&mut tasks, dns, dns_udp, dns_tcp, &shutdown)?;
    }
    if let Some(l) = admin {
        let l = async_tcp(l, "admin")?;
        let sources = admin::Sources {
            relay: relay_ctx.clone(),
            dns: dns.clone(),
        };
        tasks.spawn(admin::serve(l, sources, shutdown.clone()));
    }
    let reloader = Reloader::new(
        control.config_path.clone(),
        config,
        relay_ctx.clone(),
        dns.clone(),
        stats.clone(),
        control.log_filter.take(),
    );
    tracing::info!(tasks = tasks.len(), "tproxyd ready");

    loop {
        tokio::select! {
            event = control.events.recv() => match event.map(|e| pending(e, &mut control.events)) {
                Some(Event::Reload) => reloader.reload().await,
                Some(Event::Stop) | None => {
                    tracing::info!("shutting down");
                    break;
                }
            },
            Some(done) = tasks.join_next() => {
                // A listener only returns early on a socket error.
                tracing::error!(?done, "a listener stopped unexpectedly; shutting down");
                break;
            }
        }
    }
    trigger.trigger();
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "listener ended with an error");
        }
    }
    // Queries still waiting for an upstream ended with the listeners that
    // drove them (`dns::misses`), and with them their sockets.
    let closed = relay_ctx.shutdown().await;
    tracing::info!(sessions_closed = closed, "all sessions closed");
    if let Some(feed) = feed {
        // Commits what is queued, then removes the sets' table if ours.
        tokio::task::spawn_blocking(move || feed.shutdown()).await.ok();
    }
    drop(rules);
    drop(pid_file);
    Ok(stats)
}

/// Frees expired name-map entries (lookups already ignore them).
async fn sweep_names(feed: Arc<DomainFeed>, mut shutdown: Shutdown) -> io::Result<()> {
    let mut tick = tokio::time::interval(NAME_SWEEP);
    loop {
        tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            _ = tick.tick() => {
                feed.map().sweep(std::time::Instant::now());
            }
        }
    }
}

/// How often expired name-map entries are freed.
const NAME_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

fn spawn_dns(
    tasks: &mut JoinSet<io::Result<()>>,
    dns: &Arc<DnsService>,
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    shutdown: &Shutdown,
) -> Result<(), ServerError> {
    for sock in udp {
        tasks.spawn(dns_server::serve_udp(
            async_udp(sock, "DNS, UDP")?,
            dns.clone(),
            shutdown.clone(),
        ));
    }
    tasks.spawn(dns_server::persist_cache(dns.clone(), shutdown.clone()));
    for listener in tcp {
        tasks.spawn(dns_server::serve_tcp(
            async_tcp(listener, "DNS, TCP")?,
            dns.clone(),
            shutdown.clone(),
        ));
    }
    Ok(())
}

/// Hands a bound socket to the async runtime.
fn async_udp(sock: std::net::UdpSocket, what: &'static str) -> Result<UdpSocket, ServerError> {
    let addr = sock
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    UdpSocket::from_std(sock).map_err(listen_error(addr, what))
}

fn async_tcp(listener: std::net::TcpListener, what: &'static str) -> Result<TcpListener, ServerError> {
    let addr = listener
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    TcpListener::from_std(listener).map_err(listen_error(addr, what))
}
