//! What tproxyd has learnt about one upstream server: the counters exported
//! per server, its latency (for hedging), and whether it recently timed out.
//!
//! A server that timed out is *penalised*: asked after the others for
//! [`PENALTY`]. Then it is *on probation*: still asked after the others,
//! but the next query also asks it alongside the first server (a probe
//! that costs the client nothing); an answer makes it healthy again, no
//! answer penalises it again. So a dead server never costs a client a
//! timeout again, and a revived one is back in its place within about a
//! penalty period.

use std::fmt::Write as _;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

use crate::stats::{Counter, Histogram};

/// How long a server that timed out is tried after the others.
pub const PENALTY: Duration = Duration::from_secs(30);
/// Never hedge sooner than this: below it, scheduler noise on a busy
/// gateway would look like a slow server.
const MIN_HEDGE: Duration = Duration::from_millis(2);

/// Latency estimate: an exponentially weighted mean (for the metrics) and an
/// exponentially weighted 90th percentile (for hedging).
///
/// The percentile is tracked the frugal way: each sample above the estimate
/// raises it by `9·k`, each one below lowers it by `k` (relative steps), so
/// it settles where 10 % of the samples lie above it, and follows a server
/// whose latency drifts. No sample window to store or sort.
#[derive(Debug, Clone, Copy)]
struct Latency {
    mean_us: f64,
    p90_us: f64,
    samples: u64,
}

/// Relative step of the percentile tracker.
const P90_STEP: f64 = 0.01;
/// Weight of a new sample in the mean.
const MEAN_WEIGHT: f64 = 0.125;

impl Latency {
    fn observe(&mut self, us: f64) {
        if self.samples == 0 {
            self.mean_us = us;
            self.p90_us = us;
        } else {
            self.mean_us += MEAN_WEIGHT * (us - self.mean_us);
            if us > self.p90_us {
                self.p90_us *= 1.0 + 9.0 * P90_STEP;
            } else {
                self.p90_us *= 1.0 - P90_STEP;
            }
            self.p90_us = self.p90_us.max(1.0);
        }
        self.samples = self.samples.saturating_add(1);
    }
}

#[derive(Debug, Default)]
struct State {
    latency: Option<Latency>,
    /// Tried after the healthy servers until then.
    penalised_until: Option<Instant>,
    /// Timed out and has not answered since.
    suspect: bool,
}

/// Where a server stands when a query starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    Healthy,
    /// Penalty over but not answered since: probe it.
    Probation,
    /// Recently timed out: ask last, until then.
    Penalised(Instant),
}

/// One upstream server's record.
#[derive(Debug, Default)]
pub struct Health {
    pub queries: Counter,
    pub answers: Counter,
    pub timeouts: Counter,
    /// Error answers (SERVFAIL, REFUSED, FORMERR, NOTIMP, BADVERS, ...)
    /// and transport failures.
    pub errors: Counter,
    /// Receive errors on its sockets (ICMP errors, spoofed or not).
    pub receive_errors: Counter,
    /// Answers dropped because they did not match the query (wrong
    /// question, ID, case): spoofing attempts or a broken server.
    pub mismatched: Counter,
    /// Queries sent to it before the previous server had given up.
    pub hedges_sent: Counter,
    /// ... of which this server's answer was the one used.
    pub hedges_won: Counter,
    pub latency: Histogram,
    state: Mutex<State>,
}

impl Health {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn answered(&self, took: Duration) {
        self.answers.inc();
        self.latency.observe(took);
        let mut s = self.state();
        s.penalised_until = None;
        s.suspect = false;
        s.latency
            .get_or_insert(Latency {
                mean_us: 0.0,
                p90_us: 0.0,
                samples: 0,
            })
            .observe(took.as_secs_f64() * 1e6);
    }

    pub fn timed_out(&self, waited: Duration, now: Instant) {
        self.timeouts.inc();
        let mut s = self.state();
        s.penalised_until = Some(now + PENALTY);
        s.suspect = true;
        if let Some(l) = s.latency.as_mut() {
            l.observe(waited.as_secs_f64() * 1e6);
        }
    }

    pub fn standing(&self, now: Instant) -> Standing {
        let s = self.state();
        match s.penalised_until {
            Some(t) if t > now => Standing::Penalised(t),
            _ if s.suspect => Standing::Probation,
            _ => Standing::Healthy,
        }
    }

    /// A probe is on its way: no other query probes it meanwhile.
    pub fn probing(&self, now: Instant, hold: Duration) {
        self.state().penalised_until = Some(now + hold);
    }

    /// How long to wait for this server before also asking the next one:
    /// its observed 90th percentile, within `[MIN_HEDGE, cap]`. With no
    /// history yet, `cap`.
    pub fn hedge_after(&self, cap: Duration) -> Duration {
        match self.state().latency {
            Some(l) if l.samples >= 8 => Duration::from_secs_f64(l.p90_us / 1e6).clamp(MIN_HEDGE.min(cap), cap),
            _ => cap,
        }
    }

    /// The mean latency in microseconds, when known.
    pub fn mean_us(&self) -> Option<u64> {
        self.state().latency.map(|l| l.mean_us as u64)
    }
}

/// Writes the per-server series (Prometheus text) for `servers`, given as
/// `(group, server label, health)`.
pub fn render<'a>(out: &mut String, servers: impl Iterator<Item = (&'a str, &'a str, &'a Health)> + Clone) {
    let servers = servers.map(|(g, l, h)| (escape(g), l, h));
    type Pick = fn(&Health) -> u64;
    let families: [(&str, &str, Pick); 8] = [
        ("queries_total", "Queries sent to this upstream server.", |h| {
            h.queries.get()
        }),
        ("answers_total", "Answers used from this upstream server.", |h| {
            h.answers.get()
        }),
        ("timeouts_total", "Queries this server did not answer in time.", |h| {
            h.timeouts.get()
        }),
        (
            "errors_total",
            "Error answers (SERVFAIL, REFUSED, FORMERR, NOTIMP, BADVERS, ...) and transport failures.",
            |h| h.errors.get(),
        ),
        (
            "receive_errors_total",
            "Receive errors (ICMP) on sockets to this server.",
            |h| h.receive_errors.get(),
        ),
        (
            "mismatched_total",
            "Answers dropped for not matching their query.",
            |h| h.mismatched.get(),
        ),
        (
            "hedges_sent_total",
            "Queries sent here while an earlier server was still pending.",
            |h| h.hedges_sent.get(),
        ),
        ("hedges_won_total", "Hedged queries whose answer was used.", |h| {
            h.hedges_won.get()
        }),
    ];
    for (family, help, pick) in families {
        let _ = writeln!(
            out,
            "# HELP tproxyd_dns_upstream_server_{family} {help}\n# TYPE tproxyd_dns_upstream_server_{family} counter"
        );
        for (group, label, h) in servers.clone() {
            let _ = writeln!(
                out,
                "tproxyd_dns_upstream_server_{family}{{group=\"{group}\",server=\"{label}\"}} {}",
                pick(h)
            );
        }
    }
    let metric = "tproxyd_dns_upstream_server_latency_ewma_seconds";
    let _ = writeln!(
        out,
        "# HELP {metric} Exponentially weighted mean answer time of this upstream server.\n# TYPE {metric} gauge"
    );
    for (group, label, h) in servers.clone() {
        if let Some(us) = h.mean_us() {
            let _ = writeln!(
                out,
                "{metric}{{group=\"{group}\",server=\"{label}\"}} {}",
                us as f64 / 1e6
            );
        }
    }
    let metric = "tproxyd_dns_upstream_server_seconds";
    let _ = writeln!(
        out,
        "# HELP {metric} Time this upstream server took to answer.\n# TYPE {metric} histogram"
    );
    for (group, label, h) in servers {
        let (buckets, count, sum_us) = h.latency.read();
        let labels = format!("group=\"{group}\",server=\"{label}\"");
        for (le_us, n) in buckets {
            let _ = writeln!(out, "{metric}_bucket{{{labels},le=\"{}\"}} {n}", le_us as f64 / 1e6);
        }
        let _ = writeln!(out, "{metric}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let _ = writeln!(out, "{metric}_sum{{{labels}}} {}", sum_us as f64 / 1e6);
        let _ = writeln!(out, "{metric}_count{{{labels}}} {count}");
    }
}

/// A Prometheus label value: group names come from the configuration.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn p90_settles_where_one_sample_in_ten_is_slower() {
        let h = Health::default();
        // 90 % at 1 ms, 10 % at 20 ms, interleaved.
        for i in 0..5_000 {
            let ms = if i % 10 == 9 { 20 } else { 1 };
            h.answered(Duration::from_millis(ms));
        }
        let hedge = h.hedge_after(Duration::from_secs(1));
        assert!(
            hedge >= Duration::from_micros(900) && hedge <= Duration::from_millis(21),
            "{hedge:?}"
        );
        // A server that got slow is followed.
        for _ in 0..2_000 {
            h.answered(Duration::from_millis(50));
        }
        assert!(h.hedge_after(Duration::from_secs(1)) >= Duration::from_millis(45));
    }

    #[test]
    fn hedge_delay_is_capped_and_floored() {
        let h = Health::default();
        assert_eq!(h.hedge_after(Duration::from_millis(300)), Duration::from_millis(300));
        for _ in 0..100 {
            h.answered(Duration::from_micros(50));
        }
        assert_eq!(h.hedge_after(Duration::from_millis(300)), MIN_HEDGE);
        for _ in 0..1_000 {
            h.answered(Duration::from_secs(2));
        }
        assert_eq!(h.hedge_after(Duration::from_millis(300)), Duration::from_millis(300));
    }

    #[test]
    fn a_timeout_penalises_then_probes_until_an_answer() {
        let h = Health::default();
        let now = Instant::now();
        assert_eq!(h.standing(now), Standing::Healthy);
        h.timed_out(Duration::from_secs(1), now);
        assert_eq!(h.standing(now), Standing::Penalised(now + PENALTY));
        assert_eq!(h.standing(now + PENALTY), Standing::Probation, "then probed");
        h.probing(now + PENALTY, Duration::from_secs(1));
        assert!(
            matches!(h.standing(now + PENALTY), Standing::Penalised(_)),
            "one probe at a time"
        );
        h.answered(Duration::from_millis(1));
        assert_eq!(h.standing(now), Standing::Healthy);
        assert_eq!(h.timeouts.get(), 1);
        assert_eq!(h.answers.get(), 1);
    }

    #[test]
    fn renders_one_series_per_server() {
        let a = Health::default();
        a.queries.add(3);
        a.answered(Duration::from_millis(2));
        let b = Health::default();
        let servers = [
            ("default", "udp://198.51.100.53:53", &a),
            ("default", "udp://198.51.100.54:53", &b),
        ];
        let mut out = String::new();
        render(&mut out, servers.iter().copied());
        assert!(out.contains(
            "tproxyd_dns_upstream_server_queries_total{group=\"default\",server=\"udp://198.51.100.53:53\"} 3\n"
        ));
        assert!(out.contains(
            "tproxyd_dns_upstream_server_answers_total{group=\"default\",server=\"udp://198.51.100.54:53\"} 0\n"
        ));
        assert!(out.contains(
            "tproxyd_dns_upstream_server_seconds_count{group=\"default\",server=\"udp://198.51.100.53:53\"} 1\n"
        ));
    }
}
