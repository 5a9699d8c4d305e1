//! Day-two operations, end to end: hot reload, metrics, self-installed
//! rules, the doctor, and running with dropped privileges.

mod lab;

use lab::dns::dig;
use lab::udp::{Echo, exchange, socket};
use lab::{CLIENT4, Lab, sa, server4};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const PUBLIC: &str = "203.0.113.53";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn client4(port: u16) -> SocketAddr {
    sa(ip(CLIENT4), port)
}

fn config(printer: &str, port_9999: &str, extra: &str) -> String {
    format!(
        r#"mark = 255
{extra}
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[[relay.rules]]
ports = [9999]
action = "{port_9999}"
[dns]
# The lab's LAN uses documentation addresses, outside the default allow list.
allow = ["192.0.2.0/24", "2001:db8:1::/64"]
[dns.upstreams.default]
servers = ["198.51.100.53"]
server_timeout = "500ms"
[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["{printer}"]
"#
    )
}

/// `GET path` from inside the gateway namespace.
fn http_get(lab: &Lab, addr: SocketAddr, path: &str) -> String {
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    lab.gateway.enter(move || {
        let mut s = TcpStream::connect(addr).expect("admin endpoint");
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

use lab::metrics::value as metric;

#[test]
fn reload_swaps_rules_while_flows_keep_going_and_a_bad_config_is_refused() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let mut daemon = lab.start_tproxyd(&config("192.0.2.50", "drop", ""));
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let echo9999 = Echo::start(&lab.servers[0], sa(server4(0), 9999));
    let flow = socket(&lab.client, client4(40000));
    exchange(&flow, echo.addr, b"before");
    let upstream_before = echo.last_peer();
    assert_eq!(
        dig(&lab.client, &format!("@{PUBLIC} printer.lan")).answer_data(),
        ["192.0.2.50"]
    );

    // Traffic keeps flowing *during* the reload: a flow and DNS in a loop.
    let stop = Arc::new(AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let rounds = Arc::new(AtomicUsize::new(0));
    let busy = {
        let (stop, failures, rounds) = (stop.clone(), failures.clone(), rounds.clone());
        let busy_flow = socket(&lab.client, client4(40001));
        let target = echo.addr;
        std::thread::spawn(move || {
            busy_flow.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                busy_flow.send_to(b"ping", target).unwrap();
                match busy_flow.recv_from(&mut buf) {
                    Ok((_, from)) if from == target => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                rounds.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // The busy flow is exchanging before the reload starts and goes on
    // for 20 more rounds after it ends, however slowly a loaded machine
    // schedules it, so the reload happens in the middle of its traffic.
    wait_for_rounds(&rounds, 5);
    std::fs::write(&daemon.config, config("192.0.2.51", "direct", "")).unwrap();
    let out = lab.tproxyd_command(&["reload", "--config", daemon.config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(5));
    wait_for_rounds(&rounds, rounds.load(Ordering::Relaxed) + 20);
    stop.store(true, Ordering::Relaxed);
    busy.join().unwrap();
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "datagrams were lost during the reload"
    );

    // After: new rules answer, the old flow kept its upstream socket.
    assert_eq!(
        dig(&lab.client, &format!("@{PUBLIC} printer.lan")).answer_data(),
        ["192.0.2.51"]
    );
    exchange(&flow, echo.addr, b"after");
    assert_eq!(echo.last_peer(), upstream_before, "a live flow must survive a reload");
    exchange(&flow, echo9999.addr, b"now allowed");

    // A broken config is refused by `tproxyd reload` itself...
    std::fs::write(&daemon.config, "mark = 255\n[relay]\nidle_timeout = \"soon\"\n").unwrap();
    let out = lab.tproxyd_command(&["reload", "--config", daemon.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(":3:16: "),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and by the daemon when signalled directly, which keeps running
    // the previous configuration and says where the error is.
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_for_log("reload refused", Duration::from_secs(5));
    assert!(
        daemon
            .log_text()
            .contains(&format!("{}:3:16: ", daemon.config.display())),
        "{}",
        daemon.log_text()
    );
    assert_eq!(
        dig(&lab.client, &format!("@{PUBLIC} printer.lan")).answer_data(),
        ["192.0.2.51"]
    );
    exchange(&flow, echo.addr, b"still");

    let stopped = daemon.stop();
    assert_eq!(stopped.counter("reloads"), 1);
    assert_eq!(stopped.counter("reload_failures"), 1);
}

#[test]
fn metrics_endpoint_reports_what_happened() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let admin: SocketAddr = "127.0.0.1:9153".parse().unwrap();
    let daemon = lab.start_tproxyd(&config("192.0.2.50", "drop", &format!("[admin]\nlisten = \"{admin}\"")));
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let flow = socket(&lab.client, client4(40000));
    for _ in 0..3 {
        exchange(&flow, echo.addr, b"0123456789");
    }
    flow.send_to(b"x", sa(server4(0), 9999)).unwrap();
    assert_eq!(dig(&lab.client, &format!("@{PUBLIC} printer.lan")).status, "NOERROR");
    std::thread::sleep(Duration::from_millis(200));

    let response = http_get(&lab, admin, "/metrics");
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.contains("Content-Type: text/plain; version=0.0.4"));
    let m = response.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(metric(m, "tproxyd_datagrams_total{direction=\"to_upstream\"}"), 3);
    assert_eq!(metric(m, "tproxyd_bytes_total{direction=\"to_upstream\"}"), 30);
    assert_eq!(
        metric(m, "tproxyd_datagrams_total{direction=\"to_client\"}"),
        4,
        "3 echoes + 1 DNS answer"
    );
    assert_eq!(metric(m, "tproxyd_sessions_active"), 1);
    assert_eq!(metric(m, "tproxyd_upstream_sockets"), 1);
    assert_eq!(metric(m, "tproxyd_sessions_opened_total"), 1);
    assert_eq!(metric(m, "tproxyd_drops_total{reason=\"rule\"}"), 1);
    assert_eq!(metric(m, "tproxyd_dns_queries_by_action_total{action=\"answer\"}"), 1);
    assert_eq!(metric(m, "tproxyd_dns_responses_total{rcode=\"NOERROR\"}"), 1);
    assert!(m.contains("# TYPE tproxyd_dns_upstream_seconds histogram"));
    assert_eq!(metric(m, "tproxyd_reloads_total"), 0);
    assert!(http_get(&lab, admin, "/nope").starts_with("HTTP/1.1 404"));
    // Nothing listens beyond loopback.
    let ss = lab.gateway.sh("ss -ltnH 'sport = :9153'");
    assert!(ss.contains("127.0.0.1:9153") && ss.lines().count() == 1, "{ss}");
    drop(daemon);
}

/// Whether the peer closed `s` (or reset it) within `limit`, while one
/// byte of a request is written to it every 500 ms.
fn closed_while_trickling(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let request = b"GET /metrics HTTP/1.1\r\nX-Slow: "
        .iter()
        .chain(std::iter::repeat(&b'a'));
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    for &b in request {
        if started.elapsed() > limit {
            return false;
        }
        if s.write_all(&[b]).is_err() {
            return true;
        }
        match s.read(&mut buf) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            // Closed, reset, or answered: the daemon stopped reading.
            _ => return true,
        }
    }
    false
}

/// A local process (the endpoint is on loopback, so any user of the
/// gateway) holding the admin endpoint: a request sent a byte at a time,
/// and hundreds of connections at once. Each connection is a descriptor of
/// the daemon, taken from what its flows and DNS sockets need.
#[test]
fn the_admin_endpoint_bounds_slow_requests_and_open_connections() {
    const HELD: usize = 600;
    let lab = Lab::new();
    let admin: SocketAddr = "127.0.0.1:9153".parse().unwrap();
    let daemon = lab.start_tproxyd(&config("192.0.2.50", "drop", &format!("[admin]\nlisten = \"{admin}\"")));

    let before = lab::flood::fds(daemon.pid());
    let held: Vec<TcpStream> = lab
        .gateway
        .enter(move || (0..HELD).filter_map(|_| TcpStream::connect(admin).ok()).collect());
    assert_eq!(held.len(), HELD, "connections made");
    // Let the daemon accept what it will.
    std::thread::sleep(Duration::from_millis(1_000));
    let grew = lab::flood::fds(daemon.pid()).saturating_sub(before);
    assert!(
        grew <= 100,
        "{HELD} idle connections to the admin endpoint held {grew} descriptors of the daemon"
    );
    drop(held);
    // One request, a byte every half second: 8 KiB of it would take over
    // an hour, and each byte came well within the per-read timeout.
    let mut slow = lab
        .gateway
        .enter(move || TcpStream::connect(admin).expect("admin endpoint"));
    assert!(
        closed_while_trickling(&mut slow, Duration::from_secs(20)),
        "a request trickled a byte every 500 ms was still being read after 20 s"
    );

    // A scraper gets its page once they are gone.
    std::thread::sleep(Duration::from_millis(300));
    assert!(http_get(&lab, admin, "/metrics").starts_with("HTTP/1.1 200 OK\r\n"));
    drop(daemon);
}

/// `GET /metrics` from `addr`; `None` when the endpoint closed or reset
/// the connection instead of answering.
fn try_scrape(lab: &Lab, addr: SocketAddr) -> Option<String> {
    lab.gateway.enter(move || {
        let mut s = TcpStream::connect(addr).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.starts_with("HTTP/1.1 200 OK\r\n").then_some(out)
    })
}

/// Keeps one connection to `addr` open until `stop`, opening another as
/// soon as the endpoint closes it: idle, or (`slow`) sending a request
/// head a byte at a time that never ends.
fn hold_admin(addr: SocketAddr, slow: bool, stop: &AtomicBool, opened: &AtomicUsize) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut s) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        };
        opened.fetch_add(1, Ordering::Relaxed);
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        if slow && s.write_all(b"GET /metrics HTTP/1.1\r\n").is_err() {
            continue;
        }
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if slow && s.write_all(b"X").is_err() {
                break;
            }
            match s.read(&mut buf) {
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
                // Closed or reset by the daemon: open another.
                _ => break,
            }
        }
    }
}

/// A local process (the endpoint is on loopback, so any user of the
/// gateway) keeping every one of the admin endpoint's 16 slots busy: more
/// idle connections than slots and a few never-ending requests sent a
/// byte at a time, each opened again as soon as the daemon closes it. A
/// scraper that asks for `/metrics` meanwhile gets it every time.
#[test]
fn a_local_process_holding_the_admin_slots_does_not_keep_a_scraper_out() {
    const IDLE: usize = 20;
    const SLOW: usize = 4;
    const SCRAPES: usize = 5;
    let lab = Lab::new();
    let admin: SocketAddr = "127.0.0.1:9153".parse().unwrap();
    let daemon = lab.start_tproxyd(&config("192.0.2.50", "drop", &format!("[admin]\nlisten = \"{admin}\"")));
    assert!(try_scrape(&lab, admin).is_some(), "no page before the attack");

    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicUsize::new(0));
    let holders: Vec<std::thread::JoinHandle<()>> = {
        let (stop, opened) = (stop.clone(), opened.clone());
        lab.gateway.enter(move || {
            (0..IDLE + SLOW)
                .map(|i| {
                    let (stop, opened) = (stop.clone(), opened.clone());
                    // Threads started here stay in the gateway's namespace.
                    std::thread::spawn(move || hold_admin(admin, i >= IDLE, &stop, &opened))
                })
                .collect()
        })
    };
    // Every holder connected, and the slots full of them.
    while opened.load(Ordering::Relaxed) < IDLE + SLOW {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    let mut answered = 0;
    for _ in 0..SCRAPES {
        if try_scrape(&lab, admin).is_some() {
            answered += 1;
        }
        std::thread::sleep(Duration::from_millis(1_000));
    }
    stop.store(true, Ordering::Relaxed);
    for h in holders {
        h.join().unwrap();
    }
    assert_eq!(
        answered,
        SCRAPES,
        "a scraper got /metrics {answered} times of {SCRAPES} while {} connections held the admin endpoint ({} opened)",
        IDLE + SLOW,
        opened.load(Ordering::Relaxed)
    );
    drop(daemon);
}

/// A burst of SIGHUPs (a script, or reloads sent faster than a large
/// list loads) is one reload, or two when more came during the first, not
/// one full reload after another; and a SIGTERM after the burst is not
/// queued behind them.
#[test]
fn a_burst_of_reloads_is_not_queued_one_by_one() {
    const SIGHUPS: usize = 20;
    let lab = Lab::new();
    let list = lab.path("block.list");
    let text: String = (0..200_000).map(|i| format!("ad{i}.block.example\n")).collect();
    std::fs::write(&list, text).unwrap();
    // Loading 200,000 names takes a debug build seconds on a busy machine.
    let mut daemon = lab.start_tproxyd_within(
        &format!(
            "{}[[dns.rules]]\nlists = [\"{}\"]\naction = \"block\"\n",
            config("192.0.2.50", "drop", ""),
            list.display()
        ),
        Duration::from_secs(60),
    );
    for _ in 0..SIGHUPS {
        daemon.signal(nix::sys::signal::Signal::SIGHUP);
        std::thread::sleep(Duration::from_millis(10));
    }
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(60));
    // Time for several more reloads of this list, were they queued.
    std::thread::sleep(Duration::from_secs(8));
    let reloads = daemon.log_text().matches("configuration reloaded").count();
    assert!(
        reloads <= 2,
        "{SIGHUPS} SIGHUPs in a burst: {reloads} reloads done one after another"
    );
    // Within 10 s of SIGTERM, or Daemon::stop fails the test.
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
}

/// Waits until the busy flow of a reload test has done `n` rounds (each
/// one an answer or a 1 s timeout, counted apart); fails the test if its
/// thread stalls.
fn wait_for_rounds(rounds: &AtomicUsize, n: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while rounds.load(Ordering::Relaxed) < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the busy flow did {} of {n} rounds in 20 s",
            rounds.load(Ordering::Relaxed)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn auto_rules_config() -> String {
    "mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\", \"[::]:15353\"]\n[auto_rules]\nlan_interfaces = [\"lan0\"]\n"
        .to_string()
}

fn assert_gateway_clean(lab: &Lab) {
    let tables = lab.gateway.sh("nft list tables");
    assert!(!tables.contains("tproxyd"), "nft table left behind: {tables}");
    for fam in ["-4", "-6"] {
        let rules = lab.gateway.sh(&format!("ip {fam} rule show"));
        assert!(!rules.contains("fwmark"), "ip rule left behind: {rules}");
        // (A table that was never created is reported as an error: clean too.)
        let routes = lab
            .gateway
            .sh(&format!("ip {fam} route show table 100 2>/dev/null || true"));
        assert!(routes.trim().is_empty(), "route left behind: {routes}");
    }
}

#[test]
fn auto_rules_are_installed_at_start_and_removed_at_exit_even_after_a_crash() {
    let lab = Lab::new();
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let flow = socket(&lab.client, client4(40000));

    let daemon = lab.start_tproxyd(&auto_rules_config());
    assert!(lab.gateway.sh("nft list tables").contains("inet tproxyd"));
    let (from, _) = exchange(&flow, echo.addr, b"via auto rules");
    assert_eq!(from, echo.addr);
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(stopped.log.contains("auto_rules removed"));
    assert_gateway_clean(&lab);

    // A crash (SIGKILL) leaves the rules; the next start replaces them.
    let daemon = lab.start_tproxyd(&auto_rules_config());
    daemon.signal(nix::sys::signal::Signal::SIGKILL);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        lab.gateway.sh("nft list tables").contains("inet tproxyd"),
        "a killed daemon cannot clean up"
    );
    let daemon = lab.start_tproxyd(&auto_rules_config());
    assert_eq!(lab.gateway.sh("nft list tables").matches("tproxyd").count(), 1);
    assert_eq!(lab.gateway.sh("ip -4 rule show").matches("fwmark").count(), 1);
    exchange(&flow, echo.addr, b"after restart");
    assert!(daemon.stop().status.success());
    assert_gateway_clean(&lab);
}

fn doctor(lab: &Lab, config: &str) -> (bool, String) {
    let path = lab.path("doctor.toml");
    std::fs::write(&path, config).unwrap();
    let out = lab.tproxyd_command(&["doctor", "--config", path.to_str().unwrap()]);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn doctor_finds_what_is_missing_and_says_how_to_fix_it() {
    let lab = Lab::new();
    let cfg = "mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n";
    let (healthy, report) = doctor(&lab, cfg);
    assert!(!healthy, "{report}");
    assert!(
        report.contains("[ ok ] kernel: nftables `tproxy` and `socket` expressions are supported"),
        "{report}"
    );
    assert!(report.contains("[ ok ] capabilities"), "{report}");
    assert!(
        report.contains("[FAIL] policy routing (IPv4): no `ip rule` for fwmark 0x1 lookup 100"),
        "{report}"
    );
    assert!(report.contains("fix: ip -4 rule add fwmark 1 lookup 100"), "{report}");
    assert!(
        report.contains("[FAIL] redirect: no nftables or iptables TPROXY rule found"),
        "{report}"
    );

    lab.install_rules("nft", "LAN_IF=lan0 FAMILIES=4");
    let (healthy, report) = doctor(&lab, cfg);
    assert!(healthy, "{report}");
    assert!(!report.contains("[FAIL]"), "{report}");

    // The config's mark differs from the rules' skip mark: a loop waiting to happen.
    let (healthy, report) = doctor(&lab, &cfg.replace("mark = 255", "mark = 254"));
    assert!(!healthy);
    assert!(
        report.contains("[FAIL] redirect: no rule skips tproxyd's mark 0xfe"),
        "{report}"
    );

    // The rules send to another port than tproxyd listens on.
    let (healthy, report) = doctor(&lab, &cfg.replace("15353", "15999"));
    assert!(!healthy);
    assert!(
        report.contains("[FAIL] redirect: TPROXY rules exist but none sends UDP to tproxyd's relay port 15999"),
        "{report}"
    );

    // Every relay listener is checked, not only the first.
    let two = cfg.replace("\"0.0.0.0:15353\"", "\"0.0.0.0:15353\", \"0.0.0.0:15360\"");
    let (healthy, report) = doctor(&lab, &two);
    assert!(!healthy);
    assert!(
        report.contains("[ ok ] redirect: UDP TPROXY rule to the relay's port 15353"),
        "{report}"
    );
    assert!(
        report.contains("none sends UDP to tproxyd's relay port 15360"),
        "{report}"
    );
}

#[test]
fn doctor_fails_a_gateway_that_does_not_forward() {
    let lab = Lab::new();
    let cfg = "mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n";
    for flavour in ["nft", "iptables"] {
        lab.install_rules(flavour, "LAN_IF=lan0 FAMILIES=4");
        lab.gateway.sh("sysctl -qw net.ipv4.ip_forward=1");
        let (healthy, report) = doctor(&lab, cfg);
        assert!(healthy, "{flavour}: {report}");
        assert!(
            report.contains("[ ok ] forwarding: net.ipv4.ip_forward = 1"),
            "{flavour}: {report}"
        );

        // Rules from the scripts, no auto_rules in the config: the doctor
        // learns the LAN side from the installed rules.
        lab.gateway.sh("sysctl -qw net.ipv4.ip_forward=0");
        let (healthy, report) = doctor(&lab, cfg);
        assert!(!healthy, "{flavour}: {report}");
        assert!(
            report.contains(
                "[FAIL] forwarding: net.ipv4.ip_forward is off, but the rules capture traffic arriving on lan0"
            ),
            "{flavour}: {report}"
        );
        assert!(
            report.contains("fix: sysctl -w net.ipv4.ip_forward=1"),
            "{flavour}: {report}"
        );
        lab.gateway.sh(&format!(
            "FAMILIES=4 {} down",
            lab::repo_path(&format!("iptables/tproxy-{flavour}.sh")).display()
        ));
    }
}

#[test]
fn doctor_checks_the_dns_over_tcp_port_against_the_rules() {
    let lab = Lab::new();
    let cfg = "mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n[dns]\ntcp_listen = [\"0.0.0.0:15354\"]\n\
               [dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n";
    for flavour in ["nft", "iptables"] {
        let script = lab::repo_path(&format!("iptables/tproxy-{flavour}.sh"));
        // Rules without DNS_TCP_PORT: hijacked DNS over TCP is not captured.
        lab.install_rules(flavour, "LAN_IF=lan0 FAMILIES=4");
        let (healthy, report) = doctor(&lab, cfg);
        assert!(!healthy, "{flavour}: {report}");
        assert!(
            report.contains("[FAIL] redirect: no TPROXY rule sends TCP to dns.tcp_listen port 15354"),
            "{flavour}: {report}"
        );
        assert!(report.contains("DNS_TCP_PORT=15354"), "{flavour}: {report}");

        lab.install_rules(flavour, "LAN_IF=lan0 FAMILIES=4 DNS_TCP_PORT=15354");
        let (healthy, report) = doctor(&lab, cfg);
        assert!(healthy, "{flavour}: {report}");
        assert!(
            report.contains("[ ok ] redirect: TCP TPROXY rule to the DNS-over-TCP port 15354"),
            "{flavour}: {report}"
        );

        // The rules send TCP elsewhere: the listener is missed, and what is
        // captured is dropped.
        lab.install_rules(flavour, "LAN_IF=lan0 FAMILIES=4 DNS_TCP_PORT=15999");
        let (healthy, report) = doctor(&lab, cfg);
        assert!(!healthy, "{flavour}: {report}");
        assert!(report.contains("dns.tcp_listen port 15354"), "{flavour}: {report}");
        assert!(
            report.contains("[warn] redirect: the rules send TCP to port 15999, where tproxyd does not listen"),
            "{flavour}: {report}"
        );
        lab.gateway.sh(&format!("FAMILIES=4 {} down", script.display()));
    }
}

/// The check for a dropped-privilege daemon: its uid and its capabilities.
fn assert_unprivileged(pid: u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> String {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    assert!(field("Uid:").starts_with("65534"), "uid: {}", field("Uid:"));
    // CAP_NET_ADMIN (12) and CAP_NET_RAW (13), nothing else.
    assert_eq!(
        u64::from_str_radix(&field("CapEff:"), 16).unwrap(),
        (1 << 12) | (1 << 13)
    );
}

fn assert_relays_and_hijacks(lab: &Lab, upstream: &lab::dns::Dnsmasq) {
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let flow = socket(&lab.client, client4(40000));
    assert_eq!(exchange(&flow, echo.addr, b"unprivileged").0, echo.addr);
    // Port 53 replies need the raw fallback without CAP_NET_BIND_SERVICE.
    let d = dig(&lab.client, &format!("@{PUBLIC} www.example.test"));
    assert_eq!(d.answer_data(), ["203.0.113.80"], "{}", d.raw);
    assert!(upstream.was_asked("www.example.test"));
}

fn privilege_lab() -> (Lab, lab::dns::Dnsmasq, String) {
    lab::require_uid_65534();
    let lab = Lab::new();
    lab.add_server_address(0, ip("198.51.100.53"));
    let upstream = lab.dnsmasq(
        0,
        ip("198.51.100.53"),
        "example.test",
        &["--host-record=www.example.test,203.0.113.80"],
    );
    let cfg = "mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n[auto_rules]\nlan_interfaces = [\"lan0\"]\n\
               [dns]\nallow = [\"192.0.2.0/24\"]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n"
        .to_string();
    (lab, upstream, cfg)
}

#[test]
fn started_as_root_it_drops_to_the_configured_user_keeping_two_capabilities() {
    let (lab, upstream, cfg) = privilege_lab();
    let daemon = lab.start_tproxyd(&format!("user = \"nobody\"\n{cfg}"));
    assert_unprivileged(daemon.pid());
    assert_relays_and_hijacks(&lab, &upstream);
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(stopped.counter("reply_raw_fallbacks") >= 1);
    // Removing auto_rules at exit still worked, through the ambient capabilities.
    assert!(stopped.log.contains("auto_rules removed"), "{}", stopped.log);
    assert_gateway_clean(&lab);
}

#[test]
fn runs_the_way_the_systemd_unit_starts_it() {
    // config/tproxyd.service: an unprivileged user, AmbientCapabilities =
    // CAP_NET_ADMIN CAP_NET_RAW, bounding set limited to the same, and
    // NoNewPrivileges. setpriv sets up exactly that.
    let unit = std::fs::read_to_string(lab::repo_path("config/tproxyd.service")).unwrap();
    assert!(unit.contains("AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW\n"));
    assert!(unit.contains("ExecReload=/bin/kill -HUP $MAINPID"));
    let (lab, upstream, cfg) = privilege_lab();
    let daemon = lab.start_tproxyd_wrapped(
        &[
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--inh-caps=-all,+net_admin,+net_raw",
            "--ambient-caps=-all,+net_admin,+net_raw",
            "--bounding-set=-all,+net_admin,+net_raw",
            "--no-new-privs",
        ],
        &cfg,
    );
    assert_unprivileged(daemon.pid());
    assert_relays_and_hijacks(&lab, &upstream);
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert_gateway_clean(&lab);
}

#[test]
fn a_pid_file_that_cannot_be_written_stops_the_start_with_what_to_do() {
    let lab = Lab::new();
    let pid = lab.path("missing/tproxyd.pid");
    let path = lab.path("pid.toml");
    std::fs::write(
        &path,
        format!(
            "mark = 255\npid_file = {:?}\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n",
            pid.to_str().unwrap()
        ),
    )
    .unwrap();
    let out = lab.tproxyd_command(&["--config", path.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot write pid file {}: No such file or directory",
            pid.display()
        )),
        "{stderr}"
    );
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
    assert!(stderr.contains("pid_file = \"/run/tproxyd/tproxyd.pid\""), "{stderr}");
    assert!(stderr.contains("RuntimeDirectory=tproxyd"), "{stderr}");
}

/// A relay-and-DNS config whose DNS server also listens on the gateway's
/// LAN address.
fn exclusive_config() -> String {
    config("192.0.2.50", "drop", "").replace(
        "[dns.upstreams.default]",
        "listen = [\"192.0.2.1:5353\"]\n[dns.upstreams.default]",
    )
}

/// Runs a second tproxyd with `config` to its end (killed after 20 s: a
/// daemon that starts anyway would otherwise serve forever).
fn run_to_exit(lab: &Lab, name: &str, config: &str) -> (Option<i32>, String) {
    let path = lab.path(name);
    std::fs::write(&path, config).unwrap();
    let out = lab
        .gateway
        .command("timeout")
        .args(["20", env!("CARGO_BIN_EXE_tproxyd"), "--config", path.to_str().unwrap()])
        .output()
        .expect("running tproxyd");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A plain UDP socket in the gateway bound to `addr` with `SO_REUSEADDR`,
/// and `SO_REUSEPORT` when `reuse_port`: what a careless program would open.
fn sharing_socket(lab: &Lab, addr: SocketAddr, reuse_port: bool) -> std::net::UdpSocket {
    lab.gateway.enter(move || {
        use socket2::{Domain, Socket, Type};
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None).unwrap();
        if addr.is_ipv6() {
            s.set_only_v6(true).unwrap();
        }
        s.set_reuse_address(true).unwrap();
        s.set_reuse_port(reuse_port).unwrap();
        s.bind(&addr.into()).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
        s.into()
    })
}

/// Closes `squatter` and waits until its address can be bound again.
///
/// Closing our descriptor is not always the end of the socket: another
/// test thread that forks at that moment (to run `ip netns exec`, `dig`,
/// ...) holds a copy of every descriptor until its child execs, and the
/// next tproxyd would find the port still taken.
fn release(lab: &Lab, squatter: std::net::UdpSocket) {
    let addr = squatter.local_addr().unwrap();
    drop(squatter);
    let free = lab.gateway.enter(move || {
        use socket2::{Domain, Socket, Type};
        for _ in 0..500 {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None).unwrap();
            if addr.is_ipv6() {
                s.set_only_v6(true).unwrap();
            }
            if s.bind(&addr.into()).is_ok() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        false
    });
    assert!(free, "{addr} still taken 5 s after the squatter closed it");
}

fn assert_refused(code: Option<i32>, stderr: &str, addr: &str, what: &str) {
    assert!(
        code.is_some_and(|c| c != 0 && c != 124),
        "exit {code:?}, expected a refused start:\n{stderr}"
    );
    let expected = format!("cannot listen on {addr} ({what}): another process already holds this address");
    assert!(stderr.contains(&expected), "no {expected:?} in:\n{stderr}");
}

#[test]
fn a_listen_address_held_by_another_socket_is_refused_not_shared() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let config = exclusive_config();

    // A program holding the relay port in a SO_REUSEPORT group of its own:
    // tproxyd would join it and lose part of the traffic to it.
    let squatter = sharing_socket(&lab, "0.0.0.0:15353".parse().unwrap(), true);
    let (code, stderr) = run_to_exit(&lab, "squatted-relay.toml", &config);
    assert_refused(code, &stderr, "0.0.0.0:15353", "relay, transparent UDP");
    release(&lab, squatter);
    // The IPv6 listener is checked on its own (both sides are v6-only).
    let squatter = sharing_socket(&lab, "[::]:15353".parse().unwrap(), true);
    let (code, stderr) = run_to_exit(&lab, "squatted-relay6.toml", &config);
    assert_refused(code, &stderr, "[::]:15353", "relay, transparent UDP");
    release(&lab, squatter);
    // Plain SO_REUSEADDR is enough for two UDP sockets to share a port.
    let squatter = sharing_socket(&lab, "192.0.2.1:5353".parse().unwrap(), false);
    let (code, stderr) = run_to_exit(&lab, "squatted-dns.toml", &config);
    assert_refused(code, &stderr, "192.0.2.1:5353", "DNS, UDP");
    release(&lab, squatter);

    // A second tproxyd with the same config must not join the first one.
    let first = lab.start_tproxyd(&config);
    let (code, stderr) = run_to_exit(&lab, "second.toml", &config);
    assert_refused(code, &stderr, "0.0.0.0:15353", "relay, transparent UDP");

    // The first one still has every socket: flows from many client ports
    // (spread over the whole group) all come back, all relayed by it.
    const FLOWS: u16 = 64;
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    for i in 0..FLOWS {
        let flow = socket(&lab.client, client4(41000 + i));
        let payload = format!("flow {i}");
        let (from, reply) = exchange(&flow, echo.addr, payload.as_bytes());
        assert_eq!((from, reply), (echo.addr, payload.into_bytes()));
    }
    let answer = dig(&lab.client, "@192.0.2.1 -p 5353 printer.lan");
    assert_eq!(answer.status, "NOERROR");
    assert_eq!(
        answer.answers.iter().map(|a| a.3.as_str()).collect::<Vec<_>>(),
        ["192.0.2.50"]
    );
    let stopped = first.stop();
    assert_eq!(stopped.counter("sessions_opened"), u64::from(FLOWS), "{}", stopped.log);
}

/// The nice value of each of process `pid`'s threads (field 19 of
/// `/proc/PID/task/TID/stat`, counted after the command's parenthesis).
fn thread_nice_values(pid: u32) -> Vec<(String, i32)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("the daemon's threads");
    tasks
        .flatten()
        .map(|t| {
            let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let (head, tail) = stat.rsplit_once(')').expect("stat has a command in parentheses");
            let name = head.split_once('(').map_or("", |(_, n)| n).to_string();
            let nice = tail
                .split_whitespace()
                .nth(16)
                .and_then(|v| v.parse().ok())
                .expect("nice field");
            (name, nice)
        })
        .collect()
}

/// The daemon's threads once a runtime worker has named itself. A new
/// thread shows its parent's name until it first runs and names itself,
/// and the daemon is ready (its main thread runs the server) before a
/// worker on a loaded machine has run at all.
fn threads_once_a_worker_is_named(pid: u32) -> Vec<(String, i32)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let threads = thread_nice_values(pid);
        if threads.iter().any(|(n, _)| n.starts_with("tokio-rt")) || std::time::Instant::now() > deadline {
            return threads;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_thread_runs_at_the_configured_nice_value_also_after_dropping_privileges() {
    let lab = Lab::new();
    // Absent from the config: the value the daemon was started with.
    let daemon = lab.start_tproxyd_wrapped(
        &["nice", "-n", "3"],
        "mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n",
    );
    let threads = threads_once_a_worker_is_named(daemon.pid());
    assert!(threads.iter().any(|(n, _)| n.starts_with("tokio-rt")), "{threads:?}");
    let own = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let own: i32 = own
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .nth(16)
        .unwrap()
        .parse()
        .unwrap();
    let started_at = (own + 3).min(19);
    assert!(threads.iter().all(|(_, nice)| *nice == started_at), "{threads:?}");
    drop(daemon);
    // Asked for, and kept after the switch to an unprivileged user (which
    // could not have set a negative value itself).
    let daemon = lab.start_tproxyd("mark = 255\nnice = -2\nuser = \"nobody\"\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n");
    let threads = threads_once_a_worker_is_named(daemon.pid());
    assert!(threads.iter().any(|(n, _)| n.starts_with("tokio-rt")), "{threads:?}");
    assert!(threads.iter().all(|(_, nice)| *nice == -2), "{threads:?}");
    drop(daemon);
}
