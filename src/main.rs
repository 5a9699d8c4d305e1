//! The `tproxyd` command: run the daemon, or check, reload, explain, doctor.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tokio::sync::mpsc;
use tproxyd::config::Config;
use tproxyd::reload::LogFilterHandle;
use tproxyd::server::{self, Control, Event};

#[derive(Parser)]
#[command(version, about = "Transparent UDP and DNS proxy for Linux TPROXY gateways")]
struct Cli {
    /// Config file (TOML).
    #[arg(short, long, global = true, default_value = "/etc/tproxyd/tproxyd.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the config and every file it names; exit 0 if valid, else
    /// print FILE:LINE:COL: reason and exit 2.
    Check,
    /// Validate the config, then tell the running daemon to reload it
    /// (SIGHUP).
    Reload,
    /// Show which rule decides a DNS query or a UDP flow, and what happens.
    Explain {
        /// The client's address (IP, or IP:PORT for a flow).
        #[arg(long, default_value = "192.0.2.10")]
        client: String,
        /// A DNS query: NAME [TYPE] (type defaults to A).
        #[arg(long, num_args = 1..=2, value_names = ["NAME", "TYPE"], conflicts_with = "dst")]
        query: Option<Vec<String>>,
        /// A UDP flow's original destination, IP:PORT.
        #[arg(long)]
        dst: Option<SocketAddr>,
    },
    /// Check the kernel, capabilities, policy routing, redirect rules and
    /// sysctls this config needs; print each finding with its fix.
    Doctor,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    for warning in &config.warnings {
        eprintln!("{warning}");
    }
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => run(config, cli.config),
        Command::Check => check(&config, &cli.config).map(|()| println!("{}: ok", cli.config.display())),
        Command::Reload => reload(&config, &cli.config),
        Command::Explain { client, query, dst } => explain(&config, &cli.config, &client, query, dst),
        Command::Doctor => {
            let (report, failed) = tproxyd::doctor::report(&tproxyd::doctor::diagnose(&config));
            print!("{report}");
            return if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tproxyd: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Beyond parsing: loads every list, hosts and CA file the config names,
/// without opening a socket.
fn check(config: &Config, path: &Path) -> anyhow::Result<()> {
    if let Some(dns) = config.dns() {
        let stats = std::sync::Arc::new(tproxyd::stats::Stats::default());
        tproxyd::dns::DnsEngine::build(dns, config.mark.0, stats)?;
    }
    if let Some(problem) = config.pid_file.as_deref().and_then(pid_file_problem) {
        eprintln!("{}: warning: {problem}", path.display());
    }
    Ok(())
}

/// Why the daemon may fail to write its pid file at start, as far as this
/// process can tell. `check` runs as the unit's user under systemd
/// (ExecStartPre), and usually as root by hand: root can write anywhere, so
/// a directory only root may write is worth a word too.
fn pid_file_problem(pid_file: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    const FIX: &str = "under config/tproxyd.service use pid_file = \"/run/tproxyd/tproxyd.pid\" \
                       (its RuntimeDirectory=tproxyd creates that directory at start)";
    let dir = match pid_file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let shown = format!("pid_file {}", pid_file.display());
    let Ok(meta) = std::fs::metadata(dir) else {
        return Some(format!(
            "{shown}: directory {} does not exist: create it before tproxyd starts (under \
             config/tproxyd.service, RuntimeDirectory=tproxyd creates /run/tproxyd at start)",
            dir.display()
        ));
    };
    if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
        return Some(format!(
            "{shown}: directory {} is not writable by this user (uid {}), so tproxyd would not start; {FIX}",
            dir.display(),
            nix::unistd::geteuid()
        ));
    }
    let root_only = meta.uid() == 0 && meta.mode() & 0o022 == 0;
    if nix::unistd::geteuid().is_root() && root_only {
        return Some(format!(
            "{shown}: only root can write {}, and the shipped unit runs tproxyd unprivileged; {FIX}",
            dir.display()
        ));
    }
    None
}

fn reload(config: &Config, path: &Path) -> anyhow::Result<()> {
    check(config, path)?;
    let pid = tproxyd::pidfile::find(config.pid_file.as_deref(), path)?;
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).with_context(|| format!("signalling pid {pid}"))?;
    println!("asked tproxyd (pid {pid}) to reload {}", path.display());
    Ok(())
}

fn explain(
    config: &Config,
    path: &Path,
    client: &str,
    query: Option<Vec<String>>,
    dst: Option<SocketAddr>,
) -> anyhow::Result<()> {
    use tproxyd::explain::Question;
    let client_addr: SocketAddr = client
        .parse()
        .or_else(|_| client.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 40000)))
        .with_context(|| format!("--client {client:?} is not an IP address"))?;
    let question = match (query, dst) {
        (Some(q), _) => {
            let name = q.first().cloned().unwrap_or_default();
            let qtype = match q.get(1) {
                Some(t) => t
                    .to_ascii_uppercase()
                    .parse()
                    .with_context(|| format!("unknown query type {t:?}"))?,
                None => hickory_proto::rr::RecordType::A,
            };
            Question::Query {
                client: client_addr.ip(),
                name,
                qtype,
            }
        }
        (None, Some(dst)) => Question::Flow {
            client: client_addr,
            dst,
        },
        (None, None) => anyhow::bail!("explain what? give --query NAME [TYPE] or --dst IP:PORT"),
    };
    print!("{}", tproxyd::explain::explain(config, path, &question)?);
    Ok(())
}

fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    let log_filter = init_logging(&config);
    // First, while this is the only thread and still privileged: every
    // thread started later (the runtime's workers) inherits the value.
    set_nice(config.nice);
    // Before anything opens a descriptor: the relay plans its descriptor
    // budget from the limit in force.
    let fd_limit = tproxyd::relay::budget::raise_fd_limit();
    // Still one thread: grown now, the descriptor table does not make the
    // relay's worker wait for RCU when a flood of flows opens sockets.
    let plan = tproxyd::relay::budget::Plan::new(&config.relay, fd_limit);
    tproxyd::relay::budget::presize_fd_table(plan.descriptors_used(&config.relay));
    let user = config.user.clone();
    let pid_file = config.pid_file.clone();
    let workers = config.workers;
    let busy_poll = std::time::Duration::from_micros(config.relay.busy_poll_us.into());
    let prepared = server::prepare(config)?;
    // Still one thread: capabilities are per thread, so this must come
    // before the runtime starts its workers.
    if let Some(user) = user {
        tproxyd::privileges::drop_to(&user)?;
        if let Some(dir) = pid_file.as_deref().and_then(std::path::Path::parent) {
            let dir = if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            };
            if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
                tracing::warn!(
                    dir = %dir.display(),
                    user,
                    "the pid file's directory is not writable by this user: at exit the pid file will be emptied, not removed"
                );
            }
        }
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.worker_threads(workers.map_or_else(default_workers, |n| n.get()));
    // Before any socket is watched: the relay adds its sockets as it makes
    // them. A worker about to sleep spins first (see `net::spin`).
    tproxyd::net::spin::install(busy_poll).context("busy polling")?;
    if tproxyd::net::spin::enabled() {
        builder.on_thread_park(tproxyd::net::spin::while_idle);
    }
    let runtime = builder.enable_all().build().context("starting the async runtime")?;
    let stats = runtime.block_on(async move {
        let (tx, events) = mpsc::unbounded_channel();
        // The handlers are installed here, before `run` says "ready": a
        // SIGTERM sent the moment the daemon is ready must stop it cleanly,
        // not kill it with the default action.
        tokio::spawn(forward_signals(Signals::install(), tx));
        server::run(
            prepared,
            Control {
                events,
                config_path: path,
                log_filter,
            },
        )
        .await
    })?;
    let summary: Vec<String> = stats.snapshot().iter().map(|(k, v)| format!("{k}={v}")).collect();
    tracing::info!("final counters: {}", summary.join(" "));
    Ok(())
}

/// Sets the daemon's nice value when the config asks for one (see
/// `tproxyd::priority`). Refused (no `CAP_SYS_NICE`), the daemon runs on
/// at the value it inherited, and says so.
fn set_nice(asked: Option<tproxyd::priority::Nice>) {
    let Some(nice) = asked else { return };
    match tproxyd::priority::set_thread_nice(nice) {
        Ok(()) => tracing::debug!(nice = nice.get(), "nice value set"),
        Err(e) => tracing::warn!(error = %e, "running at the inherited nice value"),
    }
}

/// Half the CPUs, at least one. Most of a relayed datagram's cost is kernel
/// work, much of it in softirq on whichever CPU the packet arrived; more
/// async workers than that leaves room for mostly adds wake-ups and
/// migrations (measured on a 2-CPU lab: one worker delivered as much as two
/// for 64-byte datagrams and 26-46 % more for 1,200-byte ones).
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// The signals tproxyd acts on, registered with the kernel on creation.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl Signals {
    /// Registers the handlers now (inside the runtime); `None` when the
    /// kernel refuses, which leaves only SIGKILL to stop the daemon.
    fn install() -> Option<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Some(Signals {
            term: signal(SignalKind::terminate()).ok()?,
            int: signal(SignalKind::interrupt()).ok()?,
            hup: signal(SignalKind::hangup()).ok()?,
        })
    }
}

/// SIGHUP → reload; SIGINT / SIGTERM → stop.
async fn forward_signals(signals: Option<Signals>, tx: mpsc::UnboundedSender<Event>) {
    let Some(Signals {
        mut term,
        mut int,
        mut hup,
    }) = signals
    else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    loop {
        let event = tokio::select! {
            _ = term.recv() => Event::Stop,
            _ = int.recv() => Event::Stop,
            _ = hup.recv() => Event::Reload,
        };
        if tx.send(event).is_err() || event == Event::Stop {
            return;
        }
    }
}

/// `RUST_LOG` wins over the config's `log_level`, which wins over `info`;
/// the returned handle re-applies `log_level` on reload (none when
/// `RUST_LOG` is in charge).
fn init_logging(config: &Config) -> Option<LogFilterHandle> {
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{EnvFilter, fmt, reload};
    let from_env = EnvFilter::try_from_default_env().ok();
    let env_rules = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(config.log_level.as_ref().map_or("info", |l| l.0.as_str())));
    let (filter, handle) = reload::Layer::new(filter);
    // Under systemd, journald stamps each line itself; no colours off a tty.
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    if journald {
        registry.with(layer.without_time()).init();
    } else {
        registry.with(layer).init();
    }
    if env_rules {
        return None;
    }
    Some(Box::new(move |level: &str| {
        let filter = EnvFilter::builder().parse(level).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    }))
}
