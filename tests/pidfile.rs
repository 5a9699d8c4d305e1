//! The pid file after the daemon drops privileges: gone at exit where the
//! user may remove it, emptied where it may not, never a way for that user
//! to have root write or hand over another file at the next start, and
//! never a reason for `tproxyd reload` to signal a process that is not
//! tproxyd.

mod lab;

use lab::Lab;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn config(pid_file: &Path) -> String {
    format!(
        "mark = 255\nuser = \"nobody\"\npid_file = \"{}\"\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n",
        pid_file.display()
    )
}

#[test]
fn the_pid_file_goes_away_at_exit_after_dropping_to_nobody() {
    lab::require_uid_65534();
    let lab = Lab::new();
    // A directory the daemon's user owns, as systemd's RuntimeDirectory is.
    let run = lab.path("run");
    std::fs::create_dir(&run).unwrap();
    nix::unistd::chown(&run, Some(65534.into()), Some(65534.into())).unwrap();
    let pid_file = run.join("tproxyd.pid");
    let daemon = lab.start_tproxyd(&config(&pid_file));
    let written = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(written.trim(), daemon.pid().to_string());
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(!pid_file.exists(), "the pid file outlived the daemon:\n{}", stopped.log);
}

/// A root-owned file outside the pid file's directory, 0600, that the
/// daemon's user must never be able to read or write.
fn victim(lab: &Lab) -> std::path::PathBuf {
    let victim = lab.path("root-only.conf");
    std::fs::write(&victim, "secret = 1\n").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    victim
}

/// What a start as root did to `victim`, and to the pid file.
fn start_over_planted(lab: &Lab, pid_file: &Path, victim: &Path) {
    use std::os::unix::fs::MetadataExt;
    let daemon = lab.start_tproxyd(&config(pid_file));
    let meta = std::fs::metadata(victim).unwrap();
    let text = std::fs::read_to_string(victim).unwrap();
    let written = std::fs::symlink_metadata(pid_file).unwrap();
    let pid = std::fs::read_to_string(pid_file).unwrap_or_default();
    let expected_pid = daemon.pid().to_string();
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert_eq!(
        (text.as_str(), meta.uid(), meta.mode() & 0o777),
        ("secret = 1\n", 0, 0o600),
        "root wrote or handed over the file the pid file's name led to"
    );
    assert!(written.file_type().is_file(), "the pid file is a file of its own");
    assert_eq!(written.nlink(), 1);
    assert_eq!(pid.trim(), expected_pid);
}

#[test]
fn a_symlink_left_where_the_pid_file_goes_is_not_followed() {
    lab::require_uid_65534();
    let lab = Lab::new();
    let run = lab.path("run");
    std::fs::create_dir(&run).unwrap();
    nix::unistd::chown(&run, Some(65534.into()), Some(65534.into())).unwrap();
    let victim = victim(&lab);
    // What the daemon's user (it may write `run`) leaves for the next start.
    let pid_file = run.join("tproxyd.pid");
    std::os::unix::fs::symlink(&victim, &pid_file).unwrap();
    std::os::unix::fs::lchown(&pid_file, Some(65534), Some(65534)).unwrap();
    start_over_planted(&lab, &pid_file, &victim);
}

#[test]
fn a_hard_link_left_where_the_pid_file_goes_is_not_written() {
    lab::require_uid_65534();
    let lab = Lab::new();
    let run = lab.path("run");
    std::fs::create_dir(&run).unwrap();
    nix::unistd::chown(&run, Some(65534.into()), Some(65534.into())).unwrap();
    let victim = victim(&lab);
    // The same file system, and fs.protected_hardlinks may be 0: any user
    // may then link a file it cannot read.
    let pid_file = run.join("tproxyd.pid");
    std::fs::hard_link(&victim, &pid_file).unwrap();
    start_over_planted(&lab, &pid_file, &victim);
}

#[test]
fn where_it_cannot_be_removed_it_is_emptied_and_reload_refuses_it() {
    lab::require_uid_65534();
    let lab = Lab::new();
    // A root-owned directory (like /run itself): nobody may not unlink here.
    let run = lab.path("rootrun");
    std::fs::create_dir(&run).unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pid_file = run.join("tproxyd.pid");
    let daemon = lab.start_tproxyd(&config(&pid_file));
    let config_path = daemon.config.clone();
    assert!(
        daemon.log_text().contains("will be emptied, not removed"),
        "{}",
        daemon.log_text()
    );
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    let left = std::fs::read_to_string(&pid_file).unwrap_or_default();
    assert_eq!(
        left, "",
        "a pid that outlives its daemon may later name another process"
    );
    let reload = lab.tproxyd_command(&["reload", "--config", config_path.to_str().unwrap()]);
    assert!(!reload.status.success());
    assert!(
        String::from_utf8_lossy(&reload.stderr).contains("does not hold a process id"),
        "{}",
        String::from_utf8_lossy(&reload.stderr)
    );
}

#[test]
fn reload_will_not_signal_a_process_that_is_not_tproxyd() {
    let lab = Lab::new();
    // A stale pid file naming a live process that is not tproxyd.
    let sleeper = lab.spawn(&lab.gateway, "sleep", &["30"], &lab.path("sleep.log"));
    let pid_file = lab.path("stale.pid");
    std::fs::write(&pid_file, format!("{sleeper}\n")).unwrap();
    let config_path = lab.path("stale.toml");
    std::fs::write(
        &config_path,
        format!(
            "pid_file = \"{}\"\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n",
            pid_file.display()
        ),
    )
    .unwrap();
    let reload = lab.tproxyd_command(&["reload", "--config", config_path.to_str().unwrap()]);
    assert!(!reload.status.success());
    let err = String::from_utf8_lossy(&reload.stderr);
    assert!(err.contains("not a running tproxyd"), "{err}");
    // The sleeper was not sent SIGHUP (which would have ended it).
    assert!(Path::new(&format!("/proc/{sleeper}")).exists());
    let status = std::fs::read_to_string(format!("/proc/{sleeper}/status")).unwrap();
    assert!(!status.contains("State:\tZ"), "{status}");
    lab.kill(sleeper);
}
