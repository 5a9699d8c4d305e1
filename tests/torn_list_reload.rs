//! A reload while a job rewrites a block list in place (truncate, then
//! write) must refuse the list it cannot read whole and keep the rules
//! that run, end to end: signal, read, refusal, and the answers after.
//!
//! Whether a rewrite lands inside a read of a small file is a matter of
//! microseconds, so the test makes it certain: strace holds each `read`
//! of the list (and only of the list) for 300 ms, while the job rewrites
//! it every 20 ms. Every read, and every retry, then sees it change.

mod lab;

use lab::Lab;
use lab::dns::{Dig, dig};
use std::io::Write;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The "public resolver" a device has hard-coded: hijacked by the gateway.
const PUBLIC: &str = "203.0.113.53";
const UPSTREAM: &str = "198.51.100.53";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn config(list: &Path) -> String {
    format!(
        r#"
mark = 255
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[dns]
ports = [53]
timeout = "1500ms"
allow = ["192.0.2.0/24", "2001:db8:1::/64"]
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
server_timeout = "700ms"
[[dns.rules]]
lists = ["{}"]
action = "block"
"#,
        list.display()
    )
}

fn q(lab: &Lab, name: &str) -> Dig {
    dig(&lab.client, &format!("@{PUBLIC} {name} A"))
}

fn blocked(lab: &Lab, name: &str) -> bool {
    let d = q(lab, name);
    match d.status.as_str() {
        "NXDOMAIN" => true,
        "NOERROR" if d.answer_data() == ["203.0.113.80"] => false,
        _ => panic!("{name}: {}", d.raw),
    }
}

/// Whether every thread of `pid` is traced.
fn all_traced(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().all(|t| {
        std::fs::read_to_string(t.path().join("status"))
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0"))
    })
}

/// strace, detached (by its own id) when the test ends, however it ends:
/// a daemon left traced would hold its reads of the list forever.
struct Tracer(std::process::Child);

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_reload_refuses_a_list_rewritten_while_it_is_read_and_keeps_the_running_rules() {
    let lab = Lab::with_servers(1);
    lab.add_server_address(0, ip(UPSTREAM));
    lab.add_server_address(0, ip(PUBLIC));
    lab.install_rules("nft", "LAN_IF=lan0");
    let _upstream = lab.dnsmasq(
        0,
        ip(UPSTREAM),
        "example.test",
        &[
            "--host-record=old.example.test,203.0.113.80",
            "--host-record=new.example.test,203.0.113.80",
        ],
    );
    let list = lab.path("blocked.txt");
    std::fs::write(&list, "||old.example.test^\n").unwrap();
    let mut daemon = lab.start_tproxyd(&config(&list));
    assert!(blocked(&lab, "old.example.test"));
    assert!(!blocked(&lab, "new.example.test"));

    // Every read of the list by any thread of the daemon takes 300 ms.
    let strace = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=read"])
        .args(["-e", "inject=read:delay_exit=300000", "-P"])
        .arg(&list)
        .args(["-p", &daemon.pid().to_string()])
        .spawn()
        .expect("strace (needed to hold the daemon's reads of the list)");
    let strace = Tracer(strace);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !all_traced(daemon.pid()) {
        assert!(Instant::now() < deadline, "strace did not attach");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The job: rewrites the list in place, a new version each time.
    let stop = Arc::new(AtomicBool::new(false));
    let job = {
        let (stop, list) = (stop.clone(), list.clone());
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .truncate(true)
                    .open(&list)
                    .unwrap();
                f.write_all(b"||new.example.test^\n").unwrap();
                for i in 0..n % 7 {
                    writeln!(f, "||x{i}.example.test^").unwrap();
                }
                drop(f);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !["reload refused", "configuration reloaded"]
        .iter()
        .any(|l| daemon.log_text().contains(l))
    {
        assert!(Instant::now() < deadline, "no reload: {}", daemon.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    stop.store(true, Ordering::Relaxed);
    job.join().unwrap();
    // Detached, the daemon's reads run at their own pace again.
    drop(strace);
    let log = daemon.log_text();
    assert!(log.contains("changed while it was read"), "{log}");
    assert!(!log.contains("configuration reloaded"), "{log}");
    // The running rules stay: nothing of the torn list was taken.
    assert!(blocked(&lab, "old.example.test"), "{log}");
    assert!(!blocked(&lab, "new.example.test"), "{log}");

    // The same list, once it holds still, is taken at the next reload.
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(10));
    assert!(blocked(&lab, "new.example.test"));
    assert!(!blocked(&lab, "old.example.test"));
    drop(daemon.stop());
}
