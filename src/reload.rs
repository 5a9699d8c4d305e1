//! Hot reload (SIGHUP): re-read the config and every file it names, then
//! swap the rules in one step.
//!
//! Everything is built *before* anything is swapped, off the async threads
//! (a million-line block list takes a moment): a config that fails to load
//! changes nothing, and the daemon keeps running the old one. Live flows
//! keep the route they were opened with (but end if a drop rule now
//! matches them); new flows and queries see the new rules. Settings bound
//! to sockets (listen addresses, the mark, the DNS listeners) or to
//! threads (the workers, their nice value) need a restart, and a reload
//! that changes them says so.

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::dns::engine::DnsBuildError;
use crate::dns::{DnsEngine, DnsService};
use crate::relay::RelayContext;
use crate::stats::Stats;

/// Sets the log filter (`"info"`, `"tproxyd=debug"`).
pub type LogFilterHandle = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("DNS: {0}")]
    Dns(#[from] DnsBuildError),
    #[error("DNS: the engine could not be built: {0}")]
    Build(String),
}

pub struct Reloader {
    path: PathBuf,
    /// The configuration the sockets were set up with.
    started: Config,
    relay: Arc<RelayContext>,
    dns: Option<Arc<DnsService>>,
    stats: Arc<Stats>,
    log_filter: Option<LogFilterHandle>,
}

impl Reloader {
    pub fn new(
        path: PathBuf,
        started: Config,
        relay: Arc<RelayContext>,
        dns: Option<Arc<DnsService>>,
        stats: Arc<Stats>,
        log_filter: Option<LogFilterHandle>,
    ) -> Self {
        Reloader {
            path,
            started,
            relay,
            dns,
            stats,
            log_filter,
        }
    }

    /// Reloads, logging and counting the outcome.
    pub async fn reload(&self) {
        match self.try_reload().await {
            Ok(()) => {
                self.stats.reloads.inc();
                tracing::info!(config = %self.path.display(), "configuration reloaded");
            }
            Err(e) => {
                self.stats.reload_failures.inc();
                tracing::error!("reload refused, the running configuration stays: {e}");
            }
        }
    }

    async fn try_reload(&self) -> Result<(), ReloadError> {
        let path = self.path.clone();
        let mark = self.started.mark.0;
        let stats = self.stats.clone();
        let (config, engine) = tokio::task::spawn_blocking(move || -> Result<_, ReloadError> {
            let config = Config::load(&path)?;
            let engine = match config.dns() {
                Some(dns) => Some(DnsEngine::build(dns, mark, stats)?),
                None => None,
            };
            Ok((config, engine))
        })
        .await
        .map_err(|e| ReloadError::Build(e.to_string()))??;

        for warning in &config.warnings {
            tracing::warn!("{warning}");
        }
        for what in restart_only_changes(&self.started, &config) {
            tracing::warn!("{what} changed: restart tproxyd to apply it (the rest is reloaded)");
        }
        let ended = self.relay.apply(&config.relay);
        crate::dns::upstream::set_socket_budget(
            crate::relay::budget::Plan::new(&config.relay, crate::relay::budget::soft_fd_limit()).dns_upstream,
        );
        if ended > 0 {
            tracing::info!(ended, "flows beyond the new limits ended");
        }
        if let (Some(service), Some(mut engine)) = (&self.dns, engine) {
            // Unchanged cache settings: the answers already learnt stay.
            if !engine.adopt_cache(&service.engine()) {
                tracing::info!("dns.cache settings changed: starting with an empty cache");
            }
            if let (Some(feed), Some(dns)) = (service.engine().feed(), config.dns()) {
                feed.ensure_sets(dns);
                feed.follow(&config);
            }
            service.replace_engine(engine);
        }
        if let (Some(set), Some(level)) = (&self.log_filter, &config.log_level) {
            if let Err(e) = set(&level.0) {
                tracing::warn!("log_level not changed: {e}");
            }
        }
        Ok(())
    }
}

/// What differs between the config the daemon started with and `new` that
/// only a restart applies (and a reload must say so, or an operator
/// believes it applied). The nice value and the worker threads are set
/// once, before the runtime starts its threads (and the nice value while
/// still privileged: lowering it needs `CAP_SYS_NICE`, dropped since).
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.nice != new.nice {
        changed.push("nice");
    }
    if old.workers != new.workers {
        changed.push("workers");
    }
    if old.relay.listen != new.relay.listen {
        changed.push("relay.listen");
    }
    if old.relay.listener_sockets != new.relay.listener_sockets {
        changed.push("relay.listener_sockets");
    }
    if old.mark != new.mark {
        changed.push("mark");
    }
    match (old.dns(), new.dns()) {
        (Some(a), Some(b)) => {
            if a.listen != b.listen || a.tcp_listen != b.tcp_listen {
                changed.push("dns.listen / dns.tcp_listen");
            }
            // The name map and the set feeder outlive reloads.
            if a.names != b.names || a.nft != b.nft {
                changed.push("[dns.names] / [dns.nft]");
            }
        }
        (None, None) => {}
        _ => changed.push("the [dns] section (added or removed)"),
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("t.toml")).expect("a valid config")
    }

    #[test]
    fn a_reload_that_changes_the_nice_value_or_the_workers_says_they_need_a_restart() {
        let old = parse("nice = -5\n");
        assert!(restart_only_changes(&old, &parse("nice = -5\n")).is_empty());
        assert_eq!(restart_only_changes(&old, &parse("nice = 3\n")), ["nice"]);
        assert_eq!(restart_only_changes(&old, &parse("")), ["nice"]);
        assert_eq!(
            restart_only_changes(&old, &parse("nice = -5\nworkers = 3\n")),
            ["workers"]
        );
    }
}
