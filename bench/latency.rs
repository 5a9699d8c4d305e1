//! Latency: sockperf ping-pong (one 64-byte request in flight at a time)
//! through the kernel alone and through tproxyd; full round-trip times.

use crate::Options;
use crate::setup::{self, SERVER, sh, sleep_ms};

#[derive(Debug, Clone)]
pub struct Result {
    pub system: &'static str,
    /// Round-trip time percentiles, microseconds.
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

pub fn run(opts: &Options) -> Vec<Result> {
    let lab = setup::lab();
    let log = lab.path("sockperf-server.log");
    for port in ["11111", "11112", "11113"] {
        lab.spawn(&lab.servers[0], "sockperf", &["sr", "-i", SERVER, "-p", port], &log);
    }
    // The floor for any userspace relay: socat reading and writing each
    // datagram (to 11113 through the gateway's own address).
    let socat_log = lab.path("socat-latency.log");
    lab.spawn(
        &lab.gateway,
        "socat",
        &[
            "-T",
            "60",
            "UDP4-LISTEN:6001,bind=192.0.2.1,reuseaddr",
            &format!("UDP4:{SERVER}:11113"),
        ],
        &socat_log,
    );
    let _daemon = setup::tproxyd(&lab, &[], "");
    sleep_ms(500);
    let secs = if opts.quick { 3 } else { 15 };
    let mut out = Vec::new();
    for (system, host, port) in [
        ("kernel forwarding", SERVER, 11111),
        ("tproxyd", SERVER, 11112),
        ("socat", "192.0.2.1", 6001),
    ] {
        let text = sh(
            &lab.client,
            &format!("sockperf pp -i {host} -p {port} -m 64 -t {secs} --full-rtt --pre-warmup-wait 1 2>&1"),
        );
        let r = Result {
            system,
            p50: percentile(&text, "50.000"),
            p99: percentile(&text, "99.000"),
            p999: percentile(&text, "99.900"),
        };
        eprintln!(
            "latency {:<18} p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs",
            system, r.p50, r.p99, r.p999
        );
        out.push(r);
    }
    out
}

fn percentile(text: &str, which: &str) -> f64 {
    text.lines()
        .find_map(|l| l.split(&format!("percentile {which} =")).nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}
