//! Finding the running daemon, for `tproxyd reload`.
//!
//! With `pid_file` set, the daemon writes its pid there. Without it, the
//! daemon is found by scanning `/proc` for a `tproxyd` started with the
//! same config file, which is what a user running `tproxyd reload --config
//! FILE` means.

use nix::unistd::{Gid, Pid, Uid};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("pid file {}: {source}", path.display())]
    PidFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("pid file {} does not hold a process id", .0.display())]
    BadPidFile(PathBuf),
    #[error("pid file {} names pid {pid}, which is not a running tproxyd (left by a daemon that died?)", path.display())]
    Stale { path: PathBuf, pid: i32 },
    #[error("no running tproxyd uses {}", .0.display())]
    NotRunning(PathBuf),
    #[error("several tproxyd use {}: {pids:?}; set pid_file to tell them apart", path.display())]
    Ambiguous { path: PathBuf, pids: Vec<i32> },
}

/// The daemon's pid file; removed when dropped.
///
/// It is written while still root, so after dropping privileges the
/// daemon may no longer be allowed to unlink it (that takes write access to
/// its directory, e.g. a root-owned `/run`). It is therefore handed to the
/// configured user at creation: where removal is refused, the file is at
/// least emptied, which `tproxyd reload` refuses instead of signalling
/// whatever process reuses the pid. A directory the user may write (systemd's
/// `RuntimeDirectory=`) lets it go away for good.
#[derive(Debug)]
pub struct PidFile(PathBuf);

impl PidFile {
    /// Writes our pid to `path`, owned by `owner` when given (the user the
    /// daemon will run as).
    ///
    /// This runs as root, in a directory that the daemon's user is meant to
    /// be able to write (so that it can remove the file at exit): that user
    /// may have left anything at `path` in a run before. Writing through the
    /// path would follow a symlink or a hard link it planted there, and
    /// then hand the target to that user: a root-owned file such as
    /// `/etc/shadow` truncated to our pid and owned by the dropped user,
    /// who may then write it. So whatever is at `path` is unlinked (which
    /// never follows a link), the file is created anew with `O_EXCL` and
    /// `O_NOFOLLOW` (a name that reappears in between is an error, not
    /// followed), and it is handed over by its descriptor, not by its path.
    pub fn create(path: &Path, owner: Option<(Uid, Gid)>) -> io::Result<PidFile> {
        use std::io::Write;
        // 0644: `tproxyd reload`, run by any user, reads it.
        let mut file = crate::safe_file::create_anew(path, 0o644)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&file, Some(uid.as_raw()), Some(gid.as_raw()))?;
        }
        file.write_all(format!("{}\n", std::process::id()).as_bytes())?;
        Ok(PidFile(path.to_path_buf()))
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        match std::fs::remove_file(&self.0) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                use std::os::unix::fs::OpenOptionsExt;
                // Not through a link, nor blocking on a FIFO, that someone
                // may have put there since.
                let emptied = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                    .open(&self.0)
                    .is_ok();
                tracing::warn!(
                    path = %self.0.display(),
                    error = %e,
                    emptied,
                    "cannot remove the pid file (put it in a directory the daemon's user may write, such as systemd's RuntimeDirectory)"
                );
            }
        }
    }
}

/// The pid of the daemon running `config_path`.
pub fn find(pid_file: Option<&Path>, config_path: &Path) -> Result<Pid, FindError> {
    if let Some(path) = pid_file {
        let text = std::fs::read_to_string(path).map_err(|source| FindError::PidFile {
            path: path.to_path_buf(),
            source,
        })?;
        let pid: i32 = text
            .trim()
            .parse()
            .map_err(|_| FindError::BadPidFile(path.to_path_buf()))?;
        // A pid file left by a daemon that died may name another process now.
        if !is_daemon(pid) {
            return Err(FindError::Stale {
                path: path.to_path_buf(),
                pid,
            });
        }
        return Ok(Pid::from_raw(pid));
    }
    let wanted = std::fs::canonicalize(config_path).unwrap_or_else(|_| config_path.to_path_buf());
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid != me && runs_daemon_with(pid, &wanted) {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [] => Err(FindError::NotRunning(wanted)),
        [pid] => Ok(Pid::from_raw(*pid)),
        _ => Err(FindError::Ambiguous {
            path: wanted,
            pids: found,
        }),
    }
}

/// The command line of process `pid`.
fn cmdline(pid: i32) -> Vec<String> {
    let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return Vec::new();
    };
    raw.split(|&b| b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .map(str::to_string)
        .collect()
}

/// Whether these arguments run the tproxyd daemon (not a one-shot
/// subcommand).
fn runs_daemon(args: &[String]) -> bool {
    let is_tproxyd = args
        .first()
        .is_some_and(|a| Path::new(a).file_name().is_some_and(|n| n == "tproxyd"));
    let one_shot = args
        .iter()
        .any(|a| matches!(a.as_str(), "check" | "reload" | "explain" | "doctor"));
    is_tproxyd && !one_shot
}

/// Whether process `pid` is a tproxyd daemon.
fn is_daemon(pid: i32) -> bool {
    runs_daemon(&cmdline(pid))
}

/// Whether process `pid` is a tproxyd daemon using config file `wanted`.
fn runs_daemon_with(pid: i32, wanted: &Path) -> bool {
    let args = cmdline(pid);
    if !runs_daemon(&args) {
        return false;
    }
    let config = args
        .windows(2)
        .find(|w| w[0] == "--config" || w[0] == "-c")
        .map(|w| w[1].to_string())
        .or_else(|| args.iter().find_map(|a| a.strip_prefix("--config=").map(String::from)));
    let Some(config) = config else {
        return false;
    };
    // A relative path is relative to the daemon's working directory.
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_default();
    let path = cwd.join(config);
    std::fs::canonicalize(&path).unwrap_or(path) == wanted
}
