//! tproxyd as a child process in the gateway namespace.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::Netns;

pub struct Daemon {
    child: Option<Child>,
    pub log: PathBuf,
    pub config: PathBuf,
}

/// What a stopped daemon left: its exit status, final counters and log.
#[derive(Debug)]
pub struct Stopped {
    pub status: ExitStatus,
    pub counters: HashMap<String, u64>,
    pub log: String,
}

impl Stopped {
    pub fn counter(&self, name: &str) -> u64 {
        *self
            .counters
            .get(name)
            .unwrap_or_else(|| panic!("no counter {name} in the final log line:\n{}", self.log))
    }
}

impl Daemon {
    pub fn start(ns: &Netns, config: &Path, log: &Path, startup: Duration) -> Daemon {
        Daemon::start_wrapped(ns, &[], config, log, startup)
    }

    /// Starts tproxyd behind `wrapper` (e.g. `setpriv ...` to run it the way
    /// a service manager would).
    pub fn start_wrapped(ns: &Netns, wrapper: &[&str], config: &Path, log: &Path, startup: Duration) -> Daemon {
        let out = std::fs::File::create(log).expect("daemon log");
        let err = out.try_clone().expect("daemon log");
        // TPROXYD_BIN runs another build of the daemon with the same
        // harness: the benchmark compares build profiles that way.
        let bin = std::env::var("TPROXYD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tproxyd").to_string());
        let (program, args): (&str, Vec<&str>) = match wrapper.split_first() {
            Some((p, rest)) => (p, rest.iter().copied().chain([bin.as_str()]).collect()),
            None => (bin.as_str(), Vec::new()),
        };
        let child = ns
            .command(program)
            .args(args)
            .arg("--config")
            .arg(config)
            .env(
                "RUST_LOG",
                std::env::var("TPROXYD_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawning tproxyd");
        let mut d = Daemon {
            child: Some(child),
            log: log.to_path_buf(),
            config: config.to_path_buf(),
        };
        d.wait_for_log("tproxyd ready", startup);
        d
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`; panics (showing the log) after
    /// `timeout` or if the daemon exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log_text().contains(needle) {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "tproxyd exited ({status}) before logging {needle:?}:\n{}",
                    self.log_text()
                );
            }
            if Instant::now() > deadline {
                panic!(
                    "tproxyd did not log {needle:?} within {timeout:?}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal).expect("signalling tproxyd");
    }

    /// SIGTERM, wait (at most 10 s), and collect the final counters.
    pub fn stop(mut self) -> Stopped {
        let mut child = self.child.take().expect("daemon already stopped");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Ok(Some(s)) = child.try_wait() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("tproxyd did not exit within 10 s of SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let log = self.log_text();
        Stopped {
            status,
            counters: parse_counters(&log),
            log,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            super::stop_child(child);
        }
    }
}

/// Parses the `final counters: a=1 b=2` log line.
fn parse_counters(log: &str) -> HashMap<String, u64> {
    let line = log
        .lines()
        .rev()
        .find_map(|l| l.split_once("final counters: ").map(|(_, rest)| rest))
        .unwrap_or("");
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}
