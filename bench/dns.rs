//! DNS: dnsperf from the client against tproxyd (hijacked, and on its
//! plain LAN address), dnsmasq and dnsdist, all on the gateway, all doing
//! the same three jobs:
//!
//! * **override**: a local answer for `printer.lan` (tproxyd answer rule,
//!   dnsmasq `--address`, dnsdist `SpoofAction`);
//! * **cached**: 100 names forwarded once to the upstream, then served
//!   from each one's cache;
//! * **miss**: unique names, every query a cache miss forwarded to the same
//!   local upstream (a dnsmasq in the server namespace).
//!
//! The miss path has two more peers, both forwarding to that upstream:
//! dnsdist with no packet cache (every query goes upstream, as in
//! tproxyd) and Unbound as a plain forwarder (`forward-zone "."`, no root
//! hints, no validator, two threads).
//!
//! Peak QPS comes from an open-loop run (answers other than SERVFAIL over
//! the seconds queries were sent, not dnsperf's own figure: see
//! [`dnsperf_timed`]); latency percentiles from a second
//! run at half that peak, with dnsperf reporting every query; that run's
//! first second, dnsperf's start-up, is not counted ([`START_UP_SECS`]). On the miss
//! path every system and every run gets names of its own, so no run is
//! answered from a cache an earlier one filled.
//!
//! For profiling by hand, two environment variables narrow the section:
//! `BENCH_DNS_ONLY` (comma-separated workloads and/or system names, e.g.
//! `miss,tproxyd (hijacked),dnsdist (no cache)`; a list naming no
//! workload means all of them, and likewise for systems) and
//! `BENCH_DNS_PERF` (a directory: `perf record -g` of the server over each
//! peak run lands there; `BENCH_DNS_PERF_HOW` replaces `record -q -g`,
//! e.g. with `trace -s` for system call counts). `BENCH_DNS_WRAP` starts
//! tproxyd behind a wrapper; with `valgrind --tool=callgrind
//! --instr-atstart=no` only the peak runs are counted, one dump each.
//! `BENCH_DNS_CONFIG` adds top-level config to tproxyd's (a relay domain
//! rule, for the miss with the name map filled). `BENCH_DNS_LATENCY_QPS`
//! runs every latency run at that rate instead of half the peak.
//!
//! `BENCH_DNS_FAMILY` (`4`, the default; `6`; or `4,6`) picks the client's
//! family. The IPv6 rows ask tproxyd only (hijacked to 2001:db8:53::53,
//! and on its LAN address), with the same config and the same rate limit
//! setting as the IPv4 rows: an IPv6 client's key for the per-client
//! limits is the link-layer address the gateway resolved for it, read
//! from a neighbour table reading under a lock (tproxyd's
//! `dns::clients`), which an IPv4 client never pays. The client is made a
//! resolved neighbour before the runs, and its entry in the gateway's
//! table is printed after them.

use crate::Options;
use crate::drops::cpu_seconds;
use crate::lab::Lab;
use crate::lab::{CLIENT6, GATEWAY_LAN6};
use crate::setup::{self, UPSTREAM_DNS, sh, sleep_ms};

#[derive(Debug, Clone)]
pub struct Result {
    pub workload: &'static str,
    pub system: &'static str,
    pub qps: f64,
    pub lost_percent: f64,
    /// CPU time the server spent per answered query at peak, microseconds
    /// (what it would cost at any rate, whatever limits the load generator).
    pub cpu_us_per_query: f64,
    /// Latency at half the peak rate, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
}

const SYSTEMS: [(&str, &str); 6] = [
    ("tproxyd (hijacked)", "203.0.113.53"),
    ("tproxyd (LAN address)", "192.0.2.1"),
    ("dnsmasq", "192.0.2.2"),
    ("dnsdist", "192.0.2.3"),
    ("dnsdist (no cache)", "192.0.2.4"),
    ("unbound (forwarder)", "192.0.2.5"),
];

/// tproxyd's rows for an IPv6 client (`BENCH_DNS_FAMILY`).
const SYSTEMS6: [(&str, &str); 2] = [
    ("tproxyd (hijacked IPv6)", "2001:db8:53::53"),
    ("tproxyd (LAN address IPv6)", GATEWAY_LAN6),
];

/// The peers that only make sense on the miss path.
fn miss_only(system: &str) -> bool {
    matches!(system, "dnsdist (no cache)" | "unbound (forwarder)")
}

/// The client families `BENCH_DNS_FAMILY` asks for: (IPv4, IPv6).
fn families() -> (bool, bool) {
    let knob = std::env::var("BENCH_DNS_FAMILY").unwrap_or_default();
    let picked: Vec<&str> = knob.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    if picked.is_empty() {
        return (true, false);
    }
    (picked.contains(&"4"), picked.contains(&"6"))
}

/// The bench config with tproxyd listening for IPv6 clients too: a relay
/// listener for the hijacked queries, a DNS listener on the LAN address,
/// and the LAN's /64 allowed. Nothing else differs from the IPv4 rows'.
fn config_v6(config: String) -> String {
    let replaced = config
        .replacen(
            &format!("listen = [\"0.0.0.0:{}\"]", setup::RELAY_PORT),
            &format!("listen = [\"0.0.0.0:{0}\", \"[::]:{0}\"]", setup::RELAY_PORT),
            1,
        )
        .replacen(
            "listen = [\"192.0.2.1:53\"]",
            &format!("listen = [\"192.0.2.1:53\", \"[{GATEWAY_LAN6}]:53\"]"),
            1,
        )
        .replacen(
            "allow = [\"192.0.2.0/24\"]",
            "allow = [\"192.0.2.0/24\", \"2001:db8:1::/64\"]",
            1,
        );
    assert_eq!(
        replaced.matches("2001:db8:1::").count(),
        2,
        "the IPv6 listeners in the bench config"
    );
    replaced
}

pub fn run(opts: &Options) -> Vec<Result> {
    let (four, six) = families();
    let lab = if six { setup::lab_for("4 6") } else { setup::lab() };
    lab.gateway
        .sh("for a in 2 3 4 5; do ip addr add 192.0.2.$a/24 dev lan0; done");
    let log = lab.path("dns-peers.log");
    // The upstream: answers any name under cached.test and miss.test.
    lab.spawn(
        &lab.servers[0],
        "dnsmasq",
        &[
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={UPSTREAM_DNS}"),
            "--user=root",
            "--cache-size=0",
            "--local-ttl=3600",
            "--address=/cached.test/203.0.113.80",
            "--address=/miss.test/203.0.113.81",
        ],
        &log,
    );
    // The peers on the gateway, each on its own LAN address.
    let dnsmasq_pid = lab.spawn(
        &lab.gateway,
        "dnsmasq",
        &[
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=192.0.2.2",
            "--user=root",
            "--cache-size=100000",
            "--dns-forward-max=4096",
            &format!("--server={UPSTREAM_DNS}"),
            "--address=/printer.lan/192.0.2.50",
        ],
        &log,
    );
    let dnsdist_conf = lab.path("dnsdist.conf");
    std::fs::write(
        &dnsdist_conf,
        format!(
            r#"setSecurityPollSuffix("")
setACL({{"0.0.0.0/0"}})
addLocal("192.0.2.3:53")
newServer({{address="{UPSTREAM_DNS}:53"}})
pc = newPacketCache(100000)
getPool(""):setCache(pc)
addAction(QNameRule("printer.lan."), SpoofAction("192.0.2.50"))
"#
        ),
    )
    .unwrap();
    let conf = dnsdist_conf.display().to_string();
    let dnsdist_pid = lab.spawn(
        &lab.gateway,
        "dnsdist",
        &["-C", &conf, "--supervised", "--disable-syslog"],
        &log,
    );
    let plain_conf = lab.path("dnsdist-plain.conf");
    std::fs::write(
        &plain_conf,
        format!(
            r#"setSecurityPollSuffix("")
setACL({{"0.0.0.0/0"}})
addLocal("192.0.2.4:53")
newServer({{address="{UPSTREAM_DNS}:53"}})
"#
        ),
    )
    .unwrap();
    let conf = plain_conf.display().to_string();
    let plain_pid = lab.spawn(
        &lab.gateway,
        "dnsdist",
        &["-C", &conf, "--supervised", "--disable-syslog"],
        &log,
    );
    let unbound_pid = unbound(&lab, &log);
    let wrap = std::env::var("BENCH_DNS_WRAP").unwrap_or_default();
    let wrapper: Vec<&str> = wrap.split_whitespace().collect();
    // Top-level config for tproxyd, e.g. a `[[relay.rules]]` domain rule
    // so that every answer also goes into the name map.
    let extra = std::env::var("BENCH_DNS_CONFIG").unwrap_or_default();
    let daemon = if six {
        lab.start_tproxyd_wrapped(&wrapper, &config_v6(setup::config(&extra)))
    } else {
        setup::tproxyd(&lab, &wrapper, &extra)
    };
    if six {
        // The client asks for the gateway's address, and the gateway
        // learns the client's from that: from the first query on, the
        // client is a resolved neighbour, as a LAN device is.
        sh(
            &lab.client,
            &format!("ping -6 -c 1 -W 1 {GATEWAY_LAN6} >/dev/null 2>&1"),
        );
    }
    let pid_of = |system: &str| match system {
        "dnsmasq" => dnsmasq_pid,
        "dnsdist" => dnsdist_pid,
        "dnsdist (no cache)" => plain_pid,
        "unbound (forwarder)" => unbound_pid,
        _ => daemon.pid(),
    };
    sleep_ms(1_000);

    let files = query_files(&lab);
    let secs = opts.secs();
    let only: Vec<String> = std::env::var("BENCH_DNS_ONLY")
        .unwrap_or_default()
        .split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let workloads = ["override", "cached", "miss"];
    let picked =
        |name: &str, all: &[&str]| !only.iter().any(|o| all.contains(&o.as_str())) || only.iter().any(|o| o == name);
    let rows: Vec<(&str, &str)> = SYSTEMS
        .iter()
        .filter(|_| four)
        .chain(SYSTEMS6.iter().filter(|_| six))
        .copied()
        .collect();
    let systems: Vec<&str> = SYSTEMS.iter().chain(SYSTEMS6.iter()).map(|(s, _)| *s).collect();
    let perf_dir = std::env::var("BENCH_DNS_PERF").ok();
    let mut out = Vec::new();
    for (workload, file) in &files {
        if !picked(workload, &workloads) {
            continue;
        }
        for &(system, server) in &rows {
            if miss_only(system) && *workload != "miss" || !picked(system, &systems) {
                continue;
            }
            // Misses: names no earlier run has asked, one set for the peak
            // run and another for the latency run.
            let (peak_file, half_file) = if *workload == "miss" {
                (miss_file(&lab, system, "peak"), miss_file(&lab, system, "half"))
            } else {
                (file.clone(), file.clone())
            };
            if *workload == "cached" {
                // Fill the cache first: every name once.
                sh(
                    &lab.client,
                    &format!("dnsperf -s {server} -d {file} -n 1 -q 100 >/dev/null 2>&1"),
                );
            }
            let perf = perf_dir.as_deref().map(|dir| {
                let out = format!("{dir}/{workload}-{}.data", system.replace([' ', '(', ')'], ""));
                let how = std::env::var("BENCH_DNS_PERF_HOW").unwrap_or_else(|_| "record -q -g".into());
                std::process::Command::new("perf")
                    .args(how.split_whitespace())
                    .args(["-p", &pid_of(system).to_string(), "-o", &out])
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .spawn()
                    .expect("perf")
            });
            let callgrind = wrap.contains("callgrind") && system.starts_with("tproxyd");
            if callgrind {
                sh(
                    &lab.client,
                    &format!(
                        "callgrind_control -z {} >/dev/null 2>&1; callgrind_control -i on {} >/dev/null 2>&1",
                        daemon.pid(),
                        daemon.pid()
                    ),
                );
            }
            let cpu_before = cpu_seconds(pid_of(system));
            let (peak, client_cpu) = dnsperf_timed(&lab, server, &peak_file, secs, None);
            let cpu = cpu_seconds(pid_of(system)) - cpu_before;
            if callgrind {
                let tag: String = system.chars().filter(char::is_ascii_alphanumeric).collect();
                sh(
                    &lab.client,
                    &format!(
                        "callgrind_control -i off {0} >/dev/null 2>&1; callgrind_control -d {workload}-{tag} {0} >/dev/null 2>&1",
                        daemon.pid()
                    ),
                );
                eprintln!(
                    "callgrind: {workload} {system}: {:.0} queries answered",
                    peak.0 * f64::from(secs)
                );
            }
            if let Some(mut perf) = perf {
                // SAFETY: kill has no memory preconditions; the pid is our child's.
                unsafe { libc::kill(perf.id() as i32, libc::SIGINT) };
                let _ = perf.wait();
            }
            // BENCH_DNS_LATENCY_QPS: one rate for every latency run, to
            // compare builds (or systems) at the same load rather than at
            // half of each one's own peak.
            let half = std::env::var("BENCH_DNS_LATENCY_QPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or((peak.0 / 2.0).max(100.0) as u64);
            // One second longer than measured: the answers of the first
            // second are dnsperf's start-up, not the server's (see
            // `START_UP_SECS`), and are left out for every system alike.
            let (_, _, lat) = dnsperf(&lab, server, &half_file, secs.min(4) + START_UP_SECS, Some(half));
            let lat = after_start_up(lat, half);
            if *workload == "miss" {
                let _ = std::fs::remove_file(&peak_file);
                let _ = std::fs::remove_file(&half_file);
            }
            let mut lat = lat;
            lat.sort_by(f64::total_cmp);
            let pct = |q: f64| {
                lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            let r = Result {
                workload,
                system,
                qps: peak.0,
                lost_percent: peak.1,
                cpu_us_per_query: cpu * 1e6 / (peak.0 * f64::from(secs)).max(1.0),
                p50_us: pct(0.50),
                p99_us: pct(0.99),
            };
            // At peak: the server's and the client's CPU, in CPUs (two here).
            let busy = |seconds: f64| seconds / f64::from(secs);
            eprintln!(
                "dns {:<9} {:<22} {:>9.0} qps  lost {:>5.2}%  cpu {:>5.1} µs/q  @peak: server {:.2} client {:.2} CPUs  @half: p50 {:>6.0} µs p99 {:>6.0} µs",
                workload,
                system,
                r.qps,
                r.lost_percent,
                r.cpu_us_per_query,
                busy(cpu),
                busy(client_cpu),
                r.p50_us,
                r.p99_us
            );
            out.push(r);
        }
    }
    if six {
        // What the IPv6 rows' key was: the client counts by its link-layer
        // address only if this shows it resolved (REACHABLE, STALE, ...).
        let entry = sh(&lab.gateway, &format!("ip -6 neigh show {CLIENT6} dev lan0"));
        eprintln!(
            "dns: the IPv6 client in the gateway's neighbour table: {}",
            entry.trim()
        );
    }
    out
}

/// Seconds at the start of each latency run whose answers are not counted.
///
/// Every dnsperf run at a fixed rate, against any server here, answers its
/// first `-q` queries (512) within tens of µs and then stalls: nothing
/// comes back for 2–4 ms, and the queries sent meanwhile come back
/// together, their latencies falling from about 3–4 ms. The stall moves with
/// dnsperf's `-q` (with `-q 2048` it came after 2,048–2,106 answers, against
/// tproxyd and dnsdist alike), so it is the client's start-up. It put 500 to
/// 1,500 answers over 1 ms into each run, about a quarter to a half of the
/// 1 % that a p99 may spend. One second covers it with room to spare.
const START_UP_SECS: u32 = 1;

/// The latencies after dnsperf's start-up: answers come back in the order
/// they arrive, so at `rate` queries/s the first `rate × START_UP_SECS`
/// of them are the run's first seconds.
fn after_start_up(mut lat: Vec<f64>, rate: u64) -> Vec<f64> {
    let skip = usize::try_from(rate.saturating_mul(u64::from(START_UP_SECS))).unwrap_or(usize::MAX);
    lat.drain(..skip.min(lat.len()));
    lat
}

/// Unbound on 192.0.2.5 as a forwarder to the lab's upstream: no root
/// hints, no trust anchor, nothing leaves the lab. `test.` is one of its
/// built-in empty zones (RFC 6761), so that is switched off.
fn unbound(lab: &Lab, log: &std::path::Path) -> u32 {
    let dir = lab.dir.display().to_string();
    let conf = lab.path("unbound.conf");
    std::fs::write(
        &conf,
        format!(
            r#"server:
    interface: 192.0.2.5
    port: 53
    access-control: 0.0.0.0/0 allow
    do-ip6: no
    do-tcp: no
    username: ""
    chroot: ""
    directory: "{dir}"
    pidfile: ""
    use-syslog: no
    logfile: ""
    verbosity: 0
    num-threads: 2
    so-reuseport: yes
    num-queries-per-thread: 4096
    outgoing-range: 8192
    module-config: "iterator"
    do-not-query-localhost: no
    local-zone: "test." nodefault
forward-zone:
    name: "."
    forward-addr: {UPSTREAM_DNS}
"#
        ),
    )
    .unwrap();
    let conf = conf.display().to_string();
    lab.spawn(&lab.gateway, "unbound", &["-d", "-c", &conf], log)
}

fn write_file(lab: &Lab, name: &str, text: String) -> String {
    let p = lab.path(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

/// Query files for the override and cached workloads, inside the lab
/// directory (the miss workload's are made per run by [`miss_file`]).
fn query_files(lab: &Lab) -> Vec<(&'static str, String)> {
    let cached: String = (0..100).map(|i| format!("h{i}.cached.test A\n")).collect();
    vec![
        ("override", write_file(lab, "override.txt", "printer.lan A\n".into())),
        ("cached", write_file(lab, "cached.txt", cached)),
        ("miss", String::new()),
    ]
}

/// Unique names for one run of the miss workload: `run` and `system` are
/// part of every name, so no run can hit what another one cached. More
/// names than any peak run here has asked (dnsperf would start over at
/// the end); the caller removes the file after its run.
fn miss_file(lab: &Lab, system: &str, run: &str) -> String {
    // Lower case: a name with a capital letter takes tproxyd's path for
    // names spelt otherwise than their cache key (the query written anew,
    // about 800 instructions more a miss), which dnsperf's names here are
    // not meant to measure.
    let tag: String = system
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let names: String = (0..1_000_000)
        .map(|i| format!("q{i}.{run}.{tag}.miss.test A\n"))
        .collect();
    write_file(lab, &format!("miss-{tag}-{run}.txt"), names)
}

/// Runs dnsperf; returns (QPS, lost %, per-query latencies in µs when
/// rate-limited).
pub fn dnsperf(lab: &Lab, server: &str, file: &str, secs: u32, rate: Option<u64>) -> (f64, f64, Vec<f64>) {
    dnsperf_timed(lab, server, file, secs, rate).0
}

/// [`dnsperf`], and the CPU time dnsperf itself used, in seconds (the
/// shell's `times` for its children): on two CPUs the client's share
/// says whether a peak is the server's or the client's. It covers
/// dnsperf's whole life, including its wait (up to `-t`) for answers
/// still outstanding at the end, so with a server that loses queries it
/// is an upper bound.
pub fn dnsperf_timed(lab: &Lab, server: &str, file: &str, secs: u32, rate: Option<u64>) -> ((f64, f64, Vec<f64>), f64) {
    let cmd = match rate {
        None => format!("dnsperf -s {server} -d {file} -l {secs} -c 8 -q 512 -t 2 2>&1; times"),
        Some(q) => format!("dnsperf -s {server} -d {file} -l {secs} -c 8 -q 512 -t 2 -Q {q} -v 2>&1; times"),
    };
    let text = sh(&lab.client, &cmd);
    // `times` prints the shell's own user and system time, then its
    // children's: `0m1.234s 0m0.567s`.
    let client_cpu = text
        .lines()
        .last()
        .map(|l| l.split_whitespace().filter_map(minutes_seconds).sum())
        .unwrap_or(f64::NAN);
    let value = |key: &str| -> f64 {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let sent = value("Queries sent:");
    let lost = value("Queries lost:");
    let completed = value("Queries completed:");
    let run = value("Run time (s):");
    let servfail = response_code(&text, "SERVFAIL");
    // dnsperf's own "Queries per second" divides by its run time, which
    // lasts until the last answer arrives. A server that answers a query
    // its upstream dropped with SERVFAIL after its upstream timeout
    // (tproxyd: 1.5 s) stretches that by up to the timeout; one that stays
    // silent (dnsdist) does not. Queries are sent for `secs` only, so the
    // rate is the answers over `secs` for every system. SERVFAILs are not
    // counted as answers: they are exactly the queries the silent server
    // drops, so counting them would credit one system and not the other
    // for the same lost query. The CPU per query (CPU over rate × `secs`)
    // is then the CPU over the answers that answered.
    let answered = (completed - servfail).max(0.0);
    let qps = answered / f64::from(secs.max(1));
    if rate.is_none() && (run > f64::from(secs) + 0.1 || servfail > 0.0) {
        eprintln!(
            "dns: {server}: dnsperf ran {run:.2} s for {secs} s of queries, {completed:.0} completed, SERVFAIL {servfail:.0}: {answered:.0} answers over {secs} s counted"
        );
    }
    let latencies = text
        .lines()
        .filter(|l| l.starts_with("> "))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|s| s * 1e6)
        .collect();
    let lost_percent = if sent > 0.0 { 100.0 * lost / sent } else { 100.0 };
    ((qps, lost_percent, latencies), client_cpu)
}

/// How many answers dnsperf's "Response codes:" line gives `rcode`
/// (`Response codes:       NOERROR 85000 (99.40%), SERVFAIL 515 (0.60%)`);
/// 0 when it lists none.
fn response_code(text: &str, rcode: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Response codes:"))
        .and_then(|codes| {
            codes
                .split(',')
                .find_map(|c| c.trim().strip_prefix(rcode)?.strip_prefix(' '))
        })
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `1m2.500s` as seconds.
fn minutes_seconds(t: &str) -> Option<f64> {
    let (m, s) = t.strip_suffix('s')?.split_once('m')?;
    Some(m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}
