//! The `tproxyd` command: run the daemon, or check a config.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tproxyd::config::Config;

#[derive(Parser)]
#[command(
    version,
    about = "Transparent UDP and DNS proxy for Linux TPROXY gateways"
)]
struct Cli {
    /// Config file (TOML).
    #[arg(
        short,
        long,
        global = true,
        default_value = "/etc/tproxyd/tproxyd.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (the default).
    Run,
    /// Validate the config and exit: 0 if valid, else FILE:LINE:COL: reason.
    Check,
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
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => match check(&config) {
            Ok(()) => {
                println!("{}: ok", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e:#}");
                ExitCode::from(2)
            }
        },
        Command::Run => match run(config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("tproxyd: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// Beyond parsing: loads every list, hosts and CA file the config names,
/// without opening a socket.
fn check(config: &Config) -> anyhow::Result<()> {
    if let Some(dns) = config.dns() {
        let stats = std::sync::Arc::new(tproxyd::stats::Stats::default());
        tproxyd::dns::DnsEngine::build(dns, config.mark.0, stats)?;
    }
    Ok(())
}

fn run(config: Config) -> anyhow::Result<()> {
    init_logging(&config);
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let stats = runtime.block_on(tproxyd::server::run(config, stop_signal()))?;
    let summary: Vec<String> = stats
        .snapshot()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!("final counters: {}", summary.join(" "));
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `RUST_LOG` wins over the config's `log_level`, which wins over `info`.
fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        let level = config.log_level.as_ref().map_or("info", |l| l.0.as_str());
        EnvFilter::new(level)
    });
    // journald adds its own timestamps; plain text when not on a terminal.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
}

/// Every flow holds a socket: lift the soft descriptor limit to the hard one
/// (and the hard one as far as the kernel allows, when privileged).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    let wanted = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard)
        .max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err() && soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
