//! Latency: sockperf ping-pong (one 64-byte request in flight at a time)
//! through the kernel alone and through tproxyd; full round-trip times.
//!
//! One short run per path let whatever else the machine did in those
//! seconds decide the added RTT (one run measured +15 µs at p50, quick
//! runs minutes later put tproxyd at or below the kernel). So the paths
//! take turns, [`RUNS`] short runs each, the order swapped every round,
//! and each percentile reported is the median of the per-run ones.
//!
//! The relay floor (`floor.rs`) takes its turns too: the same two
//! wake-ups and six system calls per round trip as tproxyd, and nothing
//! else, so tproxyd minus the floor is tproxyd's own part of the added
//! RTT and the floor minus the kernel is what any user-space relay pays
//! here. `BENCH_RELAY_EXTRA` (see `setup::config`) sets relay options of
//! the daemon, e.g. `busy_poll_us = 50`.

use crate::Options;
use crate::setup::{self, SERVER, sh, sleep_ms};

#[derive(Debug, Clone)]
pub struct Result {
    pub system: &'static str,
    /// Round-trip time percentiles, microseconds.
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
    /// How many runs the medians are taken over.
    pub runs: usize,
}

/// Runs per path in a full round, and their length in seconds.
const RUNS: usize = 5;
const RUN_SECS: u32 = 3;
/// The same with `--quick`.
const QUICK_RUNS: usize = 3;
const QUICK_RUN_SECS: u32 = 1;

/// One run's percentiles (p50, p99, p99.9), microseconds.
type Percentiles = [f64; 3];

pub fn run(opts: &Options) -> Vec<Result> {
    let lab = setup::lab();
    let log = lab.path("sockperf-server.log");
    for port in ["11111", "11112", "11113", &setup::FLOOR_PORT.to_string()] {
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
    // The relay floor (`floor.rs`): what any user-space relay on
    // tproxyd's kernel path pays per round trip, wake-ups included.
    setup::floor(&lab, &[]);
    let _daemon = setup::tproxyd(&lab, &[], "");
    sleep_ms(500);
    let (runs, secs) = if opts.quick {
        (QUICK_RUNS, QUICK_RUN_SECS)
    } else {
        (RUNS, RUN_SECS)
    };
    // socat's UDP4-LISTEN serves the first peer only: every socat run
    // comes from the same client port, so later runs are that peer again.
    let paths = [
        ("kernel forwarding", SERVER, 11111, ""),
        ("tproxyd", SERVER, 11112, ""),
        ("socat", "192.0.2.1", 6001, " --client_port 6002"),
        ("relay floor", SERVER, setup::FLOOR_PORT, ""),
    ];
    let mut seen: Vec<Vec<Percentiles>> = vec![Vec::new(); paths.len()];
    for round in 0..runs {
        // Kernel and tproxyd swap places every round, so neither always
        // runs right after the other (or after socat).
        let order: [usize; 4] = if round % 2 == 0 { [0, 1, 2, 3] } else { [1, 0, 3, 2] };
        for i in order {
            let (system, host, port, client_port) = paths[i];
            let text = sh(
                &lab.client,
                &format!(
                    "sockperf pp -i {host} -p {port}{client_port} -m 64 -t {secs} --full-rtt --pre-warmup-wait 1 2>&1"
                ),
            );
            let p = [
                percentile(&text, "50.000"),
                percentile(&text, "99.000"),
                percentile(&text, "99.900"),
            ];
            eprintln!(
                "latency run {}/{runs} {:<18} p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs",
                round + 1,
                system,
                p[0],
                p[1],
                p[2]
            );
            seen[i].push(p);
        }
    }
    let mut out = Vec::new();
    for ((system, _, _, _), runs_seen) in paths.iter().zip(&seen) {
        let column = |k: usize| median(runs_seen.iter().map(|p| p[k]).collect());
        let r = Result {
            system,
            p50: column(0),
            p99: column(1),
            p999: column(2),
            runs: runs_seen.len(),
        };
        eprintln!(
            "latency {:<18} median of {} runs: p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs",
            system, r.runs, r.p50, r.p99, r.p999
        );
        out.push(r);
    }
    out
}

/// The median of the runs that produced a figure (NaN when none did).
fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn percentile(text: &str, which: &str) -> f64 {
    text.lines()
        .find_map(|l| l.split(&format!("percentile {which} =")).nth(1))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(f64::NAN)
}
