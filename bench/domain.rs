//! DNS answers that feed nftables sets: what `nft_set` costs.
//!
//! The same workload twice, with and without `nft_set` on the rule: 200
//! names under set.test, each resolving to its own address, forwarded once
//! and then answered from tproxyd's cache, so every answer carries a set
//! update (a refresh of its element) and nothing else differs. Peak QPS
//! from an open-loop dnsperf run; latency percentiles from a run at a
//! fixed 5,000 queries/s, where the difference of the two p99s is what
//! waiting for the kernel's commit adds to an answer.

use crate::Options;
use crate::dns::dnsperf;
use crate::drops::cpu_seconds;
use crate::setup::{self, UPSTREAM_DNS, metric, sh, sleep_ms};

#[derive(Debug, Clone)]
pub struct Result {
    pub with_sets: bool,
    pub qps: f64,
    pub lost_percent: f64,
    pub cpu_us_per_query: f64,
    /// Latency at 5,000 queries/s, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    pub elements: u64,
    pub transactions: u64,
    pub netlink_errors: u64,
}

const NAMES: usize = 200;
const FIXED_RATE: u64 = 5_000;

pub fn run(opts: &Options) -> Vec<Result> {
    let lab = setup::lab();
    let log = lab.path("domain-upstream.log");
    let records: Vec<String> = (0..NAMES)
        .map(|i| format!("--host-record=h{i}.set.test,203.0.113.{}", i + 1))
        .collect();
    let mut args: Vec<String> = [
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--user=root",
        "--cache-size=0",
        "--local-ttl=3600",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.push(format!("--listen-address={UPSTREAM_DNS}"));
    args.extend(records);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn(&lab.servers[0], "dnsmasq", &args, &log);
    sleep_ms(500);
    let file = lab.path("set-names.txt");
    std::fs::write(
        &file,
        (0..NAMES).map(|i| format!("h{i}.set.test A\n")).collect::<String>(),
    )
    .unwrap();
    let file = file.display().to_string();
    let secs = opts.secs();
    let mut out = Vec::new();
    for with_sets in [false, true] {
        let feed = if with_sets { "nft_set = \"bench\"\n" } else { "" };
        let config = format!(
            "{}[[dns.rules]]\ndomains = [\"*.set.test\"]\naction = \"forward\"\n{feed}",
            setup::config("")
        );
        let daemon = lab.start_tproxyd(&config);
        sleep_ms(300);
        let server = "192.0.2.1";
        sh(
            &lab.client,
            &format!("dnsperf -s {server} -d {file} -n 1 -q 100 >/dev/null 2>&1"),
        );
        let cpu_before = cpu_seconds(daemon.pid());
        let peak = dnsperf(&lab, server, &file, secs, None);
        let cpu = cpu_seconds(daemon.pid()) - cpu_before;
        let (_, _, mut lat) = dnsperf(&lab, server, &file, secs.min(4), Some(FIXED_RATE));
        lat.sort_by(f64::total_cmp);
        let pct = |q: f64| {
            lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        let page = lab.gateway.enter(setup::metrics_here);
        let r = Result {
            with_sets,
            qps: peak.0,
            lost_percent: peak.1,
            cpu_us_per_query: cpu * 1e6 / (peak.0 * f64::from(secs)).max(1.0),
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            elements: metric(&page, "tproxyd_nft_set_elements_total{op=\"added\"}")
                + metric(&page, "tproxyd_nft_set_elements_total{op=\"refreshed\"}"),
            transactions: metric(&page, "tproxyd_nft_transactions_total"),
            netlink_errors: metric(&page, "tproxyd_errors_total{kind=\"netlink\"}"),
        };
        eprintln!(
            "domain {:<13} {:>9.0} qps  lost {:>5.2}%  cpu {:>5.1} µs/q  @{FIXED_RATE}/s: p50 {:>6.0} µs p99 {:>6.0} µs  \
             elements {} in {} transactions, {} netlink errors",
            if with_sets { "with nft_set" } else { "without" },
            r.qps,
            r.lost_percent,
            r.cpu_us_per_query,
            r.p50_us,
            r.p99_us,
            r.elements,
            r.transactions,
            r.netlink_errors
        );
        out.push(r);
        daemon.stop();
    }
    out
}
