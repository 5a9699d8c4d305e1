//! Counters shared by every part of the daemon.
//!
//! Each counter is a relaxed atomic: they are read for logs and metrics, never
//! to make decisions, so no ordering is needed and the hot path pays one
//! uncontended `fetch_add`. Each counter also names the Prometheus series it
//! is exported as, so the list below is the single place to look.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One exported series: a counter's value under a metric name and labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Series {
    /// Field name, as in the final log line.
    pub name: &'static str,
    /// Prometheus metric name (without the `tproxyd_` prefix).
    pub metric: &'static str,
    /// Prometheus labels, already formatted (`direction="in"`), or empty.
    pub labels: &'static str,
    pub value: u64,
}

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident => $metric:literal $(, $labels:literal)?; )*) => {
        /// Every counter the daemon keeps.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: Counter, )*
            /// Upstream DNS answer times.
            pub dns_upstream_latency: Histogram,
            /// DNS responses sent, by RCODE.
            pub dns_rcodes: RcodeCounters,
        }

        impl Stats {
            /// Every counter, in declaration order.
            pub fn series(&self) -> Vec<Series> {
                vec![ $( Series {
                    name: stringify!($name),
                    metric: $metric,
                    labels: concat!("" $(, $labels)?),
                    value: self.$name.get(),
                }, )* ]
            }

            /// `(name, value)` for every counter, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                self.series().into_iter().map(|s| (s.name, s.value)).collect()
            }
        }
    };
}

counters! {
    /// Datagrams received from clients on the transparent listeners.
    client_datagrams => "datagrams_total", "direction=\"from_client\"";
    /// Payload bytes received from clients.
    client_bytes => "bytes_total", "direction=\"from_client\"";
    /// Datagrams sent to upstreams.
    upstream_datagrams => "datagrams_total", "direction=\"to_upstream\"";
    /// Payload bytes sent to upstreams.
    upstream_bytes => "bytes_total", "direction=\"to_upstream\"";
    /// Datagrams sent back to clients (spoofed).
    reply_datagrams => "datagrams_total", "direction=\"to_client\"";
    /// Payload bytes sent back to clients.
    reply_bytes => "bytes_total", "direction=\"to_client\"";
    /// Flows opened.
    sessions_opened => "sessions_opened_total";
    /// Flows closed because the table was full (the least recently used
    /// flow of the client holding the most).
    sessions_evicted => "sessions_evicted_total", "reason=\"table_full\"";
    /// Flows closed because their client opened another at its quota.
    sessions_evicted_quota => "sessions_evicted_total", "reason=\"client_quota\"";
    /// Flows closed to free descriptors for a new flow (heaviest client).
    sessions_evicted_budget => "sessions_evicted_total", "reason=\"fd_budget\"";
    /// Flows closed after the idle timeout.
    sessions_expired => "sessions_expired_total";
    /// Datagrams without an original destination (not redirected by TPROXY).
    drop_no_orig_dst => "drops_total", "reason=\"no_orig_dst\"";
    /// Datagrams addressed to a tproxyd listener itself (would loop).
    drop_loop => "drops_total", "reason=\"loop\"";
    /// Datagrams dropped because a socket send buffer was full.
    drop_send_buffer_full => "drops_total", "reason=\"send_buffer_full\"";
    /// Replies (DNS answers, relayed datagrams) not sent to a LAN address
    /// the kernel had not resolved (a forged source, as a rule) while their
    /// socket's send buffer was past half (`net::unresolved`).
    drop_neighbour_unresolved => "drops_total", "reason=\"neighbour_unresolved\"";
    /// Datagrams whose session could not be opened (socket limits, routes).
    drop_session_open_failed => "drops_total", "reason=\"session_open_failed\"";
    /// New flows refused: their client exceeded `relay.new_flows_per_client`.
    drop_new_flow_rate => "drops_total", "reason=\"new_flow_rate\"";
    /// Datagrams of new flows dropped because their client's share of the
    /// backlog of flows waiting to be opened was full.
    drop_open_backlog => "drops_total", "reason=\"open_backlog\"";
    /// Datagrams for SOCKS5 flows dropped because the relay's queue
    /// budget (`relay.socks5_queue_bytes`), or their client's quarter of
    /// it, was full.
    drop_socks5_queue => "drops_total", "reason=\"socks5_queue\"";
    /// New flows refused: no descriptor left even after evicting a flow.
    drop_fd_budget => "drops_total", "reason=\"fd_budget\"";
    /// Datagrams of the heaviest client dropped while the relay was
    /// overloaded (`relay.shed_after_ms`).
    drop_overload => "drops_total", "reason=\"overload\"";
    /// Of those, the ones the kernel dropped, by the filter the listener
    /// sockets carry while a client is shed (`relay::shed_filter`): read
    /// from the sockets' drop counters, so a datagram that found a full
    /// queue while the filter was on counts here too.
    shed_in_kernel => "shed_in_kernel_total";
    /// Datagrams dropped by a `drop` rule.
    drop_by_rule => "drops_total", "reason=\"rule\"";
    /// Datagrams from a remote no flow on that upstream socket talks to.
    drop_unsolicited => "drops_total", "reason=\"unsolicited\"";
    /// Send errors towards upstreams other than a full buffer.
    upstream_send_errors => "errors_total", "kind=\"upstream_send\"";
    /// ICMP port/host unreachable reported by an upstream socket.
    upstream_unreachable => "errors_total", "kind=\"upstream_unreachable\"";
    /// Receive errors on upstream or listener sockets.
    receive_errors => "errors_total", "kind=\"receive\"";
    /// Send errors towards clients other than a full buffer.
    reply_send_errors => "errors_total", "kind=\"reply_send\"";
    /// Replies sent over raw IP because every cached reply socket was busy
    /// (a flood of destinations), instead of evicting one.
    reply_cache_full => "reply_cache_full_total";
    /// Replies sent over raw IP because their batch had opened its share
    /// of new reply sockets (a burst of new destinations).
    reply_opens_deferred => "reply_raw_deferred_total";
    /// Reply sockets that fell back to raw IP because the port was taken.
    reply_raw_fallbacks => "reply_raw_fallbacks_total";
    /// SOCKS5 associations set up.
    socks5_associations => "socks5_associations_total";
    /// SOCKS5 associations that could not be set up.
    socks5_failures => "socks5_failures_total";
    /// SOCKS5 associations the server ended while in use.
    socks5_lost => "socks5_lost_total";
    /// DNS queries received (UDP and TCP, hijacked and plain).
    dns_queries => "dns_queries_total";
    /// DNS queries received over TCP.
    dns_tcp_queries => "dns_tcp_queries_total";
    /// DNS datagrams dropped: shorter than a header, or not a query.
    dns_dropped_malformed => "dns_queries_by_action_total", "action=\"dropped_malformed\"";
    /// DNS queries answered FORMERR.
    dns_formerr => "dns_queries_by_action_total", "action=\"formerr\"";
    /// DNS queries answered BADVERS (an EDNS version above 0).
    dns_badvers => "dns_queries_by_action_total", "action=\"badvers\"";
    /// DNS queries answered NOTIMP (opcode other than QUERY).
    dns_notimp => "dns_queries_by_action_total", "action=\"notimp\"";
    /// DNS queries answered from an `answer` rule or hosts file.
    dns_answered_local => "dns_queries_by_action_total", "action=\"answer\"";
    /// DNS queries answered by a `block` rule.
    dns_blocked => "dns_queries_by_action_total", "action=\"block\"";
    /// DNS answers blocked because a CNAME or DNAME target in them is
    /// named by a `block` rule (`dns.block_cname_targets`).
    dns_blocked_cname => "dns_queries_by_action_total", "action=\"block_cname\"";
    /// DNS answers served from the cache.
    dns_cache_hits => "dns_queries_by_action_total", "action=\"cache\"";
    /// DNS queries not in the cache (then forwarded, or dropped on overload).
    dns_cache_misses => "dns_cache_misses_total";
    /// DNS queries sent to an upstream group.
    dns_forwarded => "dns_queries_by_action_total", "action=\"forward\"";
    /// DNS queries answered SERVFAIL because no upstream answered, or the
    /// answer's CNAME chain loops or runs too long.
    dns_servfail => "dns_upstream_failures_total";
    /// DNS answers truncated (TC=1) to fit the client's UDP size.
    dns_truncated => "dns_truncated_total";
    /// DNS queries refused because the client is outside `dns.allow`.
    dns_refused_acl => "dns_queries_by_action_total", "action=\"refused_acl\"";
    /// DNS queries over the per-client rate limit (dropped or TC=1).
    dns_rate_limited => "dns_queries_by_action_total", "action=\"rate_limited\"";
    /// Zone transfers (NOTIMP) and non-IN classes such as CHAOS (REFUSED).
    dns_refused_local => "dns_queries_by_action_total", "action=\"refused_local\"";
    /// Expired answers served because no upstream answered in time (RFC 8767).
    dns_stale_served => "dns_queries_by_action_total", "action=\"stale\"";
    /// Popular cache entries refreshed before they expired.
    dns_prefetches => "dns_prefetches_total";
    /// Cache entries loaded from `dns.cache.file` at start.
    dns_cache_file_loaded => "dns_cache_file_entries_total", "op=\"loaded\"";
    /// Cache entries written to `dns.cache.file`.
    dns_cache_file_saved => "dns_cache_file_entries_total", "op=\"saved\"";
    /// Failed or refused (corrupt) reads and writes of `dns.cache.file`.
    dns_cache_file_errors => "errors_total", "kind=\"dns_cache_file\"";
    /// Upstream records removed as outside the question's answer.
    dns_scrubbed_records => "dns_scrubbed_records_total";
    /// DNS-over-TCP connections refused: the client already holds its share.
    dns_tcp_refused_per_client => "drops_total", "reason=\"dns_tcp_per_client\"";
    /// DNS-over-TCP connections closed because the client did not read.
    dns_tcp_write_timeouts => "dns_tcp_closed_total", "reason=\"write_timeout\"";
    /// DNS-over-TCP connections closed at their lifetime or query cap.
    dns_tcp_recycled => "dns_tcp_closed_total", "reason=\"recycled\"";
    /// DNS-over-TCP connections closed because their client left answers
    /// unread, past its share, while all connections' unsent answers were
    /// past their limit.
    dns_tcp_unread => "dns_tcp_closed_total", "reason=\"unread_answers\"";
    /// DNS queries dropped because too many were already pending.
    dns_dropped_overload => "drops_total", "reason=\"dns_overload\"";
    /// DNS queries answered SERVFAIL at once: their upstream group had
    /// `max_pending` queries waiting already.
    dns_servfail_overload => "dns_queries_by_action_total", "action=\"servfail_overload\"";
    /// DNS queries answered SERVFAIL at once: their client already had its
    /// share (a quarter) of the group's `max_pending` waiting.
    dns_servfail_client_share => "dns_queries_by_action_total", "action=\"servfail_client_share\"";
    /// DNS cache misses that joined an identical query already on its way
    /// upstream instead of asking again.
    dns_coalesced => "dns_coalesced_total";
    /// Of those, the ones whose own `dns.timeout` passed while the query
    /// they joined was still on its way: answered SERVFAIL (or stale)
    /// without it, while it went on for the others.
    dns_coalesced_late => "dns_coalesced_late_total";
    /// Upstream answers dropped for not matching their query (ID, question,
    /// 0x20 case): spoofing attempts or a broken server.
    dns_upstream_mismatched => "drops_total", "reason=\"dns_mismatched_answer\"";
    /// Datagrams found waiting on an idle upstream socket and discarded
    /// before its next query (planted forgeries, or late duplicates).
    dns_upstream_stale => "drops_total", "reason=\"dns_stale_upstream_datagram\"";
    /// Upstream UDP sockets opened (pool growth and rotation, one-offs).
    dns_upstream_sockets_opened => "dns_upstream_sockets_total", "op=\"opened\"";
    /// Pooled upstream sockets closed: too old and not needed, abandoned by
    /// their query, aimed at, or their port could not be changed.
    dns_upstream_sockets_retired => "dns_upstream_sockets_total", "op=\"retired\"";
    /// Pooled upstream sockets moved to a new random port instead of being
    /// closed and replaced: used up, or aged out and needed again.
    dns_upstream_sockets_rotated => "dns_upstream_sockets_total", "op=\"rotated\"";
    /// One-off upstream sockets opened because the pools' descriptor
    /// budget was spent.
    dns_upstream_sockets_unpooled => "dns_upstream_sockets_total", "op=\"unpooled\"";
    /// Configuration reloads applied.
    /// Elements added to tproxyd's nftables sets from DNS answers.
    nft_added => "nft_set_elements_total", "op=\"added\"";
    /// Elements whose timeout a later answer extended.
    nft_refreshed => "nft_set_elements_total", "op=\"refreshed\"";
    /// nf_tables transactions committed by the set feeder (each carries
    /// the updates of every answer queued meanwhile).
    nft_transactions => "nft_transactions_total";
    /// Set updates the kernel refused (or that timed out).
    nft_errors => "errors_total", "kind=\"netlink\"";
    /// Set updates dropped because the feeder's queue was full.
    nft_dropped => "drops_total", "reason=\"nft_queue_full\"";
    /// New flows routed by a domain relay rule.
    domain_matches => "relay_domain_matches_total";
    reloads => "reloads_total";
    /// Configuration reloads refused (the old configuration kept running).
    reload_failures => "reload_failures_total";
}

/// Upper bounds of the latency buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 12] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
];

/// A fixed-bucket latency histogram (Prometheus style, cumulative on export).
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [Counter; LATENCY_BUCKETS_US.len()],
    count: Counter,
    sum_us: Counter,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        if let Some(i) = LATENCY_BUCKETS_US.iter().position(|&b| us <= b) {
            self.buckets[i].inc();
        }
        self.count.inc();
        self.sum_us.add(us);
    }

    /// `(upper bound in µs, cumulative count)` per bucket, then the total
    /// count and the sum in µs.
    pub fn read(&self) -> (Vec<(u64, u64)>, u64, u64) {
        let mut running = 0;
        let buckets = LATENCY_BUCKETS_US
            .iter()
            .zip(&self.buckets)
            .map(|(&b, c)| {
                running += c.get();
                (b, running)
            })
            .collect();
        (buckets, self.count.get(), self.sum_us.get())
    }
}

/// The RCODEs worth a series of their own; everything else is "other".
pub const RCODE_NAMES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "OTHER",
];

/// DNS responses by RCODE.
#[derive(Debug, Default)]
pub struct RcodeCounters([Counter; RCODE_NAMES.len()]);

impl RcodeCounters {
    /// Counts a response with numeric RCODE `code`.
    pub fn record(&self, code: u16) {
        let i = usize::from(code).min(RCODE_NAMES.len() - 1);
        self.0[i].inc();
    }

    pub fn read(&self) -> Vec<(&'static str, u64)> {
        RCODE_NAMES.iter().zip(&self.0).map(|(n, c)| (*n, c.get())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_lists_counters_in_order() {
        let s = Stats::default();
        s.client_datagrams.inc();
        s.client_bytes.add(10);
        let snap = s.snapshot();
        assert_eq!(snap[0], ("client_datagrams", 1));
        assert_eq!(snap[1], ("client_bytes", 10));
        assert!(snap.iter().any(|(n, v)| *n == "sessions_evicted" && *v == 0));
        let series = s.series();
        assert_eq!(
            (series[0].metric, series[0].labels),
            ("datagrams_total", "direction=\"from_client\"")
        );
        assert_eq!(series[6].labels, "");
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(300));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(10));
        let (buckets, count, sum) = h.read();
        assert_eq!(buckets[0], (500, 1));
        assert_eq!(buckets[3], (5_000, 2));
        assert_eq!(buckets.last().unwrap().1, 2, "10 s is only in +Inf");
        assert_eq!(count, 3);
        assert_eq!(sum, 300 + 3_000 + 10_000_000);
    }

    #[test]
    fn rcodes() {
        let r = RcodeCounters::default();
        r.record(0);
        r.record(3);
        r.record(3);
        r.record(16);
        let v = r.read();
        assert_eq!(v[0], ("NOERROR", 1));
        assert_eq!(v[3], ("NXDOMAIN", 2));
        assert_eq!(v[6], ("OTHER", 1));
    }
}
