//! The relay under abuse: the scenarios of the abuse tests (tests/abuse.rs)
//! at full speed, with their figures. Each compares a well-behaved client's
//! flow with the same flow while another client misbehaves.
//!
//! * destinations: one socket opening flows to 20,000 destinations as fast
//!   as the relay takes them; flows opened per second, RSS per flow, and a
//!   50 pps flow's round trips meanwhile, beside the same flow forwarded by
//!   the kernel (not captured) at the same time;
//! * big datagrams: two senders of 65,000-byte datagrams flat out; the
//!   50 pps flow's added p99 over the kernel-forwarded control;
//! * full table: 200,000 flows into a 10,000-slot table while 20 quiet
//!   clients wait 3 s for each answer; answers lost;
//! * descriptors: a 100,000-flow flood under `RLIMIT_NOFILE` 2,048; new
//!   flows from another client answered, and /metrics answering.
//!
//! Knobs, for looking into one scenario:
//! * `BENCH_ABUSE_ONLY=destinations,big` runs only those (`destinations`,
//!   `big`, `table`, `descriptors`);
//! * `BENCH_ABUSE_WRAP="valgrind --tool=dhat"` starts the daemon of the
//!   destination scenario under that command;
//! * `BENCH_ABUSE_HOOK="perf sched record -o /tmp/s.data -p {pid}"` runs
//!   that command (`{pid}` is the daemon's) while the destination flood is
//!   offered, and interrupts it when the flood has been answered; the flood
//!   starts `BENCH_ABUSE_HOOK_WAIT_MS` (default 500) after the command. The
//!   64 KB flood runs it too, from before the flood until its probes end;
//! * `BENCH_ABUSE_BIG_SECS=32` floods that long in the 64 KB scenario
//!   (default 8): long enough for the shedder's holds to reach their
//!   longest and for the flood to come back after several of them.

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::Options;
use crate::lab::flood::{
    LateServer, Prober, big_socket, flood_in_turn, flood_round_robin, folded_lab, metric, rss, scrape, send_paced,
    summary,
};
use crate::lab::udp::{Echo, socket};
use crate::lab::{CLIENT4, Lab, sa, server4};

const ADMIN: &str = "127.0.0.1:9153";

/// One line per scenario, as Markdown table rows.
#[derive(Debug, Default)]
pub struct Result {
    pub rows: Vec<(String, String)>,
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn config(extra: &str) -> String {
    format!(
        "mark = 255\nlog_level = \"warn\"\n[admin]\nlisten = \"{ADMIN}\"\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n{extra}\n"
    )
}

/// The abuse lab of the tests ([`folded_lab`]), with `clients` and
/// 192.0.2.12 as more client addresses.
fn lab(first: u16, last: u16, clients: &[String]) -> (Lab, Echo, Echo, Echo) {
    let mut extra: Vec<&str> = clients.iter().map(String::as_str).collect();
    extra.push("192.0.2.12");
    folded_lab(first, last, &extra)
}

/// The 50 pps probe through tproxyd and its kernel-forwarded control.
fn probes(lab: &Lab, probe: &Echo, control: &Echo) -> (Prober, Prober) {
    let every = Duration::from_millis(20);
    (
        Prober::start(socket(&lab.client, sa(ip("192.0.2.11"), 40000)), probe.addr, every),
        Prober::start(socket(&lab.client, sa(ip("192.0.2.12"), 40000)), control.addr, every),
    )
}

/// Datagrams the gateway's full socket queues dropped so far.
fn gateway_queue_drops(lab: &Lab) -> u64 {
    lab.gateway
        .sh("nstat -az UdpRcvbufErrors | awk '/UdpRcvbufErrors/ {print $2}'")
        .trim()
        .parse()
        .unwrap_or(0)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

pub fn run(_opts: &Options) -> Result {
    let only = std::env::var("BENCH_ABUSE_ONLY").unwrap_or_default();
    let wants = |name: &str| only.is_empty() || only.split(',').any(|o| o.trim() == name);
    let mut r = Result::default();
    if wants("destinations") {
        destinations(&mut r);
    }
    if wants("big") {
        big_datagrams(&mut r);
    }
    if wants("table") {
        full_table(&mut r);
    }
    if wants("descriptors") {
        descriptors(&mut r);
    }
    r
}

/// The command of `BENCH_ABUSE_HOOK`, started for the daemon `pid`.
fn hook(pid: u32) -> Option<std::process::Child> {
    let how = std::env::var("BENCH_ABUSE_HOOK")
        .ok()
        .filter(|h| !h.trim().is_empty())?;
    let how = how.replace("{pid}", &pid.to_string());
    let mut words = how.split_whitespace();
    let child = std::process::Command::new(words.next()?)
        .args(words)
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("BENCH_ABUSE_HOOK");
    // Give it time to attach (BENCH_ABUSE_HOOK_WAIT_MS, default 500).
    let wait = std::env::var("BENCH_ABUSE_HOOK_WAIT_MS")
        .ok()
        .and_then(|w| w.parse().ok())
        .unwrap_or(500);
    std::thread::sleep(Duration::from_millis(wait));
    Some(child)
}

fn end_hook(child: Option<std::process::Child>) {
    if let Some(mut child) = child {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = child.wait();
    }
}

fn destinations(r: &mut Result) {
    const N: usize = 20_000;
    const FIRST: u16 = 10_000;
    let (lab, _f, probe_echo, control_echo) = lab(FIRST, FIRST + N as u16 - 1, &["192.0.2.11".into()]);
    let wrap = std::env::var("BENCH_ABUSE_WRAP").unwrap_or_default();
    let wrapper: Vec<&str> = wrap.split_whitespace().collect();
    let daemon = lab.start_tproxyd_wrapped(&wrapper, &config("new_flows_per_client = 0"));
    let (prober, control) = probes(&lab, &probe_echo, &control_echo);
    std::thread::sleep(Duration::from_secs(3));
    let hooked = hook(daemon.pid());
    let baseline = prober.reset();
    control.reset();
    let drops_before = gateway_queue_drops(&lab);
    let rss_before = rss(daemon.pid());
    let flooder = big_socket(&lab.client, sa(ip(CLIENT4), 41000));
    let server = server4(0);
    let seen: Arc<Mutex<HashSet<u16>>> = Arc::default();
    let receiver = {
        let (sock, seen) = (flooder.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut last = Instant::now();
            while seen.lock().unwrap().len() < N {
                let Ok((_, from)) = sock.recv_from(&mut buf) else { break };
                seen.lock().unwrap().insert(from.port());
                last = Instant::now();
            }
            last
        })
    };
    let start = Instant::now();
    // Offered at 40,000 a second; the relay's rate is what comes back.
    send_paced(&flooder, N, 40_000, |i| sa(server, FIRST + i as u16), |_| b"x".to_vec());
    let last = receiver.join().unwrap();
    end_hook(hooked);
    let answered = seen.lock().unwrap().len();
    let took = last.duration_since(start);
    let flooded = prober.finish();
    let controlled = control.finish();
    let rss_after = rss(daemon.pid());
    let queue_drops = gateway_queue_drops(&lab) - drops_before;
    let stopped = daemon.stop();
    eprintln!("abuse destinations: daemon counters {:?}", stopped.counters);
    let opened = stopped.counter("sessions_opened");
    let (_, _, _, b99, _) = summary(&baseline);
    let (ok, lost, p50, p99, max) = summary(&flooded);
    let (_, c_lost, c50, c99, cmax) = summary(&controlled);
    r.rows.push((
        "20,000 destinations from one socket".into(),
        format!(
            "{answered} answered in {:.2} s ({:.0} flows/s, offered 40,000/s once, no resends; {opened} opened; dropped: \
             {} in the open backlog, {} shed, {queue_drops} in the gateway's socket queues); RSS +{} B/opened flow; 50 pps flow: \
             baseline p99 {}, during {ok} ok / {lost} lost, p50 {} p99 {} max {}; kernel-forwarded control meanwhile: \
             {c_lost} lost, p50 {} p99 {} max {}; added p99 {}",
            took.as_secs_f64(),
            answered as f64 / took.as_secs_f64(),
            // Absent from builds older than the open backlog.
            stopped.counters.get("drop_open_backlog").copied().unwrap_or(0),
            // Absent from builds older than overload shedding.
            stopped.counters.get("drop_overload").copied().unwrap_or(0),
            rss_after.saturating_sub(rss_before) / opened.max(1),
            ms(b99),
            ms(p50),
            ms(p99),
            ms(max),
            ms(c50),
            ms(c99),
            ms(cmax),
            ms(p99.saturating_sub(c99))
        ),
    ));
}

fn big_datagrams(r: &mut Result) {
    let (lab, _f, probe_echo, control_echo) = lab(20_000, 20_001, &["192.0.2.11".into()]);
    let _sink = LateServer::start(&lab.servers[0], sa(server4(0), 6200), None);
    let daemon = lab.start_tproxyd(&config(""));
    let (prober, control) = probes(&lab, &probe_echo, &control_echo);
    std::thread::sleep(Duration::from_secs(3));
    let hooked = hook(daemon.pid());
    let baseline = prober.reset();
    control.reset();
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..2u16)
        .map(|i| {
            let sock = big_socket(&lab.client, sa(ip(CLIENT4), 41000 + i));
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(format!("flood64k{i}"))
                .spawn(move || {
                    let big = vec![0x55u8; 65_000];
                    while !stop.load(Ordering::Relaxed) {
                        let _ = sock.send_to(&big, sa(server4(0), 6200));
                    }
                })
                .unwrap()
        })
        .collect();
    let secs: u64 = std::env::var("BENCH_ABUSE_BIG_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    std::thread::sleep(Duration::from_secs(secs));
    let ((flooded, probe_timeline), (controlled, control_timeline)) = std::thread::scope(|s| {
        let c = s.spawn(|| control.finish_timed());
        (prober.finish_timed(), c.join().unwrap_or_default())
    });
    end_hook(hooked);
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        let _ = s.join();
    }
    let stopped = daemon.stop();
    write_timeline(
        &[("probe", &probe_timeline), ("control", &control_timeline)],
        &stopped.log,
    );
    let (_, _, _, b99, _) = summary(&baseline);
    let (ok, lost, p50, p99, max) = summary(&flooded);
    let (_, c_lost, c50, c99, cmax) = summary(&controlled);
    r.rows.push((
        format!("64 KB datagram flood (2 senders, {secs} s)"),
        format!(
            "{} MB relayed, {} datagrams shed; 50 pps flow: baseline p99 {}, during {ok} ok / {lost} lost, p50 {} p99 {} max {}; \
             kernel-forwarded control meanwhile: {c_lost} lost, p50 {} p99 {} max {}; added p50 {}, added p99 {}",
            stopped.counter("upstream_bytes") >> 20,
            stopped.counters.get("drop_overload").copied().unwrap_or(0),
            ms(b99),
            ms(p50),
            ms(p99),
            ms(max),
            ms(c50),
            ms(c99),
            ms(cmax),
            ms(p50.saturating_sub(c50)),
            ms(p99.saturating_sub(c99.max(b99)))
        ),
    ));
}

/// With `BENCH_ABUSE_TIMELINE=PATH`, writes each probe datagram of the
/// 64 KB flood (and of its control) to PATH, one line each: which flow,
/// when it was sent (wall clock, ns since the epoch) and its round trip in
/// µs (`lost` when none), and the daemon's log to PATH.log: run with
/// `TPROXYD_TEST_LOG=info,tproxyd::relay=debug` (the lab hands it to the
/// daemon as `RUST_LOG`; `RUST_LOG` itself does not reach it) to line the
/// slow probes up with the shedding filter going on and off.
fn write_timeline(flows: &[(&str, &crate::lab::flood::Timeline)], log: &str) {
    let Some(path) = std::env::var_os("BENCH_ABUSE_TIMELINE") else {
        return;
    };
    let mut out = String::new();
    for (name, timeline) in flows {
        for (at, rtt) in timeline.iter() {
            let ns = at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
            let rtt = rtt.map_or("lost".to_string(), |r| r.as_micros().to_string());
            out.push_str(&format!("{name} {ns} {rtt}\n"));
        }
    }
    let path = std::path::PathBuf::from(path);
    let _ = std::fs::write(&path, out);
    let _ = std::fs::write(path.with_extension("log"), log);
}

fn full_table(r: &mut Result) {
    const QUIET: usize = 20;
    let quiet_ips: Vec<String> = (0..QUIET).map(|i| format!("192.0.2.{}", 20 + i)).collect();
    let (lab, _f, _p, _c) = lab(20_000, 23_999, &quiet_ips);
    let daemon = lab.start_tproxyd(&config(
        "session_capacity = 10000\nmax_sessions_per_client = 10000\nnew_flows_per_client = 0",
    ));
    let late = LateServer::start(&lab.servers[0], sa(server4(0), 6100), Some(Duration::from_secs(3)));
    let to = sa(server4(0), 6100);
    let server = server4(0);
    let flood = flood_in_turn(&lab.client, ip(CLIENT4), 50, server, (20_000, 4_000), 40_000);
    let quiet: Vec<_> = quiet_ips
        .iter()
        .enumerate()
        .map(|(c, addr)| {
            let sock = socket(&lab.client, sa(ip(addr), 40000));
            sock.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            std::thread::spawn(move || {
                let mut got = HashSet::new();
                let start = Instant::now();
                let mut buf = [0u8; 64];
                let mut round = 0u64;
                while start.elapsed() < Duration::from_secs(12) {
                    if round < 3 && start.elapsed() >= Duration::from_millis(4_000 * round + 50 * c as u64) {
                        // Retried until acknowledged (see LateServer).
                        let request = format!("q{c}-{round}");
                        for _ in 0..20 {
                            let _ = sock.send_to(request.as_bytes(), to);
                            match sock.recv_from(&mut buf) {
                                Ok((n, _)) if buf[..n].starts_with(b"ack:") => break,
                                Ok((n, _)) => {
                                    got.insert(buf[..n].to_vec());
                                }
                                Err(_) => {}
                            }
                        }
                        round += 1;
                    }
                    if let Ok((n, _)) = sock.recv_from(&mut buf) {
                        if !buf[..n].starts_with(b"ack:") {
                            got.insert(buf[..n].to_vec());
                        }
                    }
                }
                got
            })
        })
        .collect();
    let flood_took = flood.join().unwrap();
    let received: HashSet<Vec<u8>> = quiet.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let sent = late.sent();
    let lost = sent.iter().filter(|p| !received.contains(*p)).count();
    let stopped = daemon.stop();
    r.rows.push((
        "200,000 flows into a 10,000-slot table".into(),
        format!(
            "flood offered in {:.1} s, {} flows opened, {} evicted (table full); quiet clients: {} answers sent, {lost} lost",
            flood_took.as_secs_f64(),
            stopped.counter("sessions_opened"),
            stopped.counter("sessions_evicted"),
            sent.len()
        ),
    ));
}

fn descriptors(r: &mut Result) {
    let (lab, _f, probe_echo, _c) = lab(20_000, 23_999, &["192.0.2.11".into()]);
    let daemon = lab.start_tproxyd_wrapped(
        &["prlimit", "--nofile=2048:2048"],
        &config("new_flows_per_client = 0\nsession_capacity = 200000"),
    );
    let server = server4(0);
    let flood = flood_round_robin(&lab.client, ip(CLIENT4), 25, server, (20_000, 4_000), 20_000);
    let (mut tries, mut answered, mut scrapes, mut scraped) = (0, 0, 0, 0);
    let mut port = 45000;
    let mut waits = Vec::new();
    while !flood.is_finished() {
        let t = Instant::now();
        let sock = socket(&lab.client, sa(ip("192.0.2.11"), port));
        port += 1;
        sock.set_read_timeout(Some(Duration::from_millis(1000))).unwrap();
        tries += 1;
        sock.send_to(b"hello", probe_echo.addr).unwrap();
        if crate::lab::udp::recv(&sock).is_some() {
            answered += 1;
            waits.push(t.elapsed());
        }
        scrapes += 1;
        if scrape(&lab.gateway, ADMIN.parse().unwrap(), Duration::from_secs(1))
            .and_then(|m| metric(&m, "tproxyd_open_fds"))
            .is_some()
        {
            scraped += 1;
        }
        if let Some(wait) = Duration::from_millis(500).checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let took = flood.join().unwrap();
    let stopped = daemon.stop();
    waits.sort();
    let p50 = waits.get(waits.len() / 2).copied().unwrap_or_default();
    r.rows.push((
        "100,000-flow flood, RLIMIT_NOFILE 2,048".into(),
        format!(
            "offered at 20,000/s ({:.1} s); new flows of another client answered {answered}/{tries} (first try, \
             median {}); /metrics {scraped}/{scrapes}; evicted for descriptors {}, refused {}",
            took.as_secs_f64(),
            ms(p50),
            stopped.counter("sessions_evicted_budget"),
            stopped.counter("drop_fd_budget")
        ),
    ));
}
