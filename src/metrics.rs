//! The Prometheus text exposition of the daemon's counters.

use std::fmt::Write;

use crate::stats::Stats;

/// Help text of each metric family, in export order.
const FAMILIES: &[(&str, &str, &str)] = &[
    ("datagrams_total", "counter", "UDP datagrams by direction."),
    ("bytes_total", "counter", "UDP payload bytes by direction."),
    ("sessions_opened_total", "counter", "Flows opened."),
    (
        "sessions_evicted_total",
        "counter",
        "Flows closed before their idle timeout, by reason (table full, client quota, descriptor budget).",
    ),
    (
        "sessions_expired_total",
        "counter",
        "Flows closed after their idle timeout.",
    ),
    ("drops_total", "counter", "Datagrams or queries dropped, by reason."),
    (
        "shed_in_kernel_total",
        "counter",
        "Datagrams of a shed client the listeners' socket filter had the kernel drop (also in drops_total overload).",
    ),
    ("errors_total", "counter", "Network errors, by kind."),
    (
        "reply_raw_fallbacks_total",
        "counter",
        "Reply addresses served over raw IP because their port was taken.",
    ),
    (
        "reply_raw_deferred_total",
        "counter",
        "Replies sent over raw IP because their batch had already opened its share of new reply sockets.",
    ),
    (
        "reply_cache_full_total",
        "counter",
        "Replies sent over raw IP because every reply socket was in use within the last second.",
    ),
    (
        "socks5_associations_total",
        "counter",
        "SOCKS5 UDP associations set up.",
    ),
    (
        "socks5_failures_total",
        "counter",
        "SOCKS5 UDP associations that could not be set up.",
    ),
    (
        "socks5_lost_total",
        "counter",
        "SOCKS5 UDP associations ended by the server while in use.",
    ),
    ("dns_queries_total", "counter", "DNS queries received."),
    ("dns_tcp_queries_total", "counter", "DNS queries received over TCP."),
    (
        "dns_queries_by_action_total",
        "counter",
        "DNS queries by what answered them.",
    ),
    (
        "dns_cache_misses_total",
        "counter",
        "DNS queries not found in the cache.",
    ),
    (
        "dns_upstream_failures_total",
        "counter",
        "DNS queries no upstream answered in time (SERVFAIL).",
    ),
    (
        "dns_upstream_sockets_total",
        "counter",
        "Upstream DNS UDP sockets opened, retired from the pools, and opened one-off beyond their budget.",
    ),
    (
        "dns_coalesced_total",
        "counter",
        "DNS cache misses that shared an identical query already sent upstream.",
    ),
    (
        "dns_coalesced_late_total",
        "counter",
        "DNS cache misses that shared an identical query and gave up at their own deadline while it went on (SERVFAIL or stale).",
    ),
    (
        "dns_truncated_total",
        "counter",
        "DNS answers truncated to fit the client's UDP size.",
    ),
    (
        "dns_scrubbed_records_total",
        "counter",
        "Upstream DNS records removed as outside the question's answer.",
    ),
    (
        "dns_prefetches_total",
        "counter",
        "Popular DNS cache entries refreshed before they expired.",
    ),
    (
        "dns_cache_file_entries_total",
        "counter",
        "DNS cache entries loaded from and saved to dns.cache.file.",
    ),
    (
        "dns_tcp_closed_total",
        "counter",
        "DNS-over-TCP connections closed by tproxyd, by reason.",
    ),
    (
        "nft_set_elements_total",
        "counter",
        "Addresses from DNS answers committed to nftables sets, by operation.",
    ),
    (
        "nft_transactions_total",
        "counter",
        "nf_tables transactions committed with set elements (one carries many answers).",
    ),
    (
        "relay_domain_matches_total",
        "counter",
        "New flows routed by a domain relay rule.",
    ),
    ("reloads_total", "counter", "Configuration reloads applied."),
    ("reload_failures_total", "counter", "Configuration reloads refused."),
];

/// A point-in-time value: `(metric name, help, value)`.
pub type Gauge = (&'static str, &'static str, u64);

/// Renders every counter, the histogram, the RCODE breakdown and `gauges`.
pub fn render(stats: &Stats, gauges: &[Gauge]) -> String {
    let mut out = String::with_capacity(8 * 1024);
    let series = stats.series();
    for (family, kind, help) in FAMILIES {
        let _ = writeln!(out, "# HELP tproxyd_{family} {help}\n# TYPE tproxyd_{family} {kind}");
        for s in series.iter().filter(|s| s.metric == *family) {
            if s.labels.is_empty() {
                let _ = writeln!(out, "tproxyd_{family} {}", s.value);
            } else {
                let _ = writeln!(out, "tproxyd_{family}{{{}}} {}", s.labels, s.value);
            }
        }
    }
    out.push_str("# HELP tproxyd_dns_responses_total DNS responses sent, by RCODE.\n# TYPE tproxyd_dns_responses_total counter\n");
    for (rcode, n) in stats.dns_rcodes.read() {
        let _ = writeln!(out, "tproxyd_dns_responses_total{{rcode=\"{rcode}\"}} {n}");
    }
    let (buckets, count, sum_us) = stats.dns_upstream_latency.read();
    out.push_str("# HELP tproxyd_dns_upstream_seconds Time for an upstream to answer a forwarded query.\n# TYPE tproxyd_dns_upstream_seconds histogram\n");
    for (le_us, n) in buckets {
        let _ = writeln!(
            out,
            "tproxyd_dns_upstream_seconds_bucket{{le=\"{}\"}} {n}",
            le_us as f64 / 1e6
        );
    }
    let _ = writeln!(out, "tproxyd_dns_upstream_seconds_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "tproxyd_dns_upstream_seconds_sum {}", sum_us as f64 / 1e6);
    let _ = writeln!(out, "tproxyd_dns_upstream_seconds_count {count}");
    for (name, help, value) in gauges {
        let _ = writeln!(
            out,
            "# HELP tproxyd_{name} {help}\n# TYPE tproxyd_{name} gauge\ntproxyd_{name} {value}"
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_counter_belongs_to_a_documented_family() {
        let families: HashSet<&str> = FAMILIES.iter().map(|f| f.0).collect();
        for s in Stats::default().series() {
            assert!(
                families.contains(s.metric),
                "{} exports undocumented {}",
                s.name,
                s.metric
            );
        }
    }

    #[test]
    fn renders_series_with_labels() {
        let stats = Stats::default();
        stats.client_datagrams.add(3);
        stats.drop_by_rule.inc();
        stats.dns_rcodes.record(3);
        stats.dns_upstream_latency.observe(std::time::Duration::from_millis(2));
        let text = render(&stats, &[("sessions_active", "Flows in the table.", 7)]);
        assert!(text.contains("tproxyd_datagrams_total{direction=\"from_client\"} 3\n"));
        assert!(text.contains("tproxyd_drops_total{reason=\"rule\"} 1\n"));
        assert!(text.contains("tproxyd_dns_responses_total{rcode=\"NXDOMAIN\"} 1\n"));
        assert!(text.contains("tproxyd_dns_upstream_seconds_bucket{le=\"0.0025\"} 1\n"));
        assert!(text.contains("tproxyd_dns_upstream_seconds_count 1\n"));
        assert!(text.contains("# TYPE tproxyd_sessions_active gauge\ntproxyd_sessions_active 7\n"));
        // Each family's TYPE line appears exactly once.
        assert_eq!(text.matches("# TYPE tproxyd_datagrams_total ").count(), 1);
    }
}
