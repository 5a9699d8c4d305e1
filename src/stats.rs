//! Counters shared by every part of the daemon.
//!
//! Each counter is a relaxed atomic: they are read for logs and metrics, never
//! to make decisions, so no ordering is needed and the hot path pays one
//! uncontended `fetch_add`.

use std::sync::atomic::{AtomicU64, Ordering};

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

macro_rules! counters {
    ($( $(#[$doc:meta])* $name:ident, )*) => {
        /// Every counter the daemon keeps.
        #[derive(Debug, Default)]
        pub struct Stats {
            $( $(#[$doc])* pub $name: Counter, )*
        }

        impl Stats {
            /// `(name, value)` for every counter, in declaration order.
            pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
                vec![ $( (stringify!($name), self.$name.get()), )* ]
            }
        }
    };
}

counters! {
    /// Datagrams received from clients on the transparent listeners.
    client_datagrams,
    /// Payload bytes received from clients.
    client_bytes,
    /// Datagrams sent to upstreams.
    upstream_datagrams,
    /// Payload bytes sent to upstreams.
    upstream_bytes,
    /// Datagrams sent back to clients (spoofed).
    reply_datagrams,
    /// Payload bytes sent back to clients.
    reply_bytes,
    /// Flows opened.
    sessions_opened,
    /// Flows closed because the table was full (least recently used first).
    sessions_evicted,
    /// Flows closed after the idle timeout.
    sessions_expired,
    /// Datagrams without an original destination (not redirected by TPROXY).
    drop_no_orig_dst,
    /// Datagrams addressed to a tproxyd listener itself (would loop).
    drop_loop,
    /// Datagrams dropped because a socket send buffer was full.
    drop_send_buffer_full,
    /// Datagrams whose session could not be opened (socket limits, routes).
    drop_session_open_failed,
    /// Send errors towards upstreams other than a full buffer.
    upstream_send_errors,
    /// ICMP port/host unreachable reported by an upstream socket.
    upstream_unreachable,
    /// Receive errors on upstream or listener sockets.
    receive_errors,
    /// Send errors towards clients other than a full buffer.
    reply_send_errors,
    /// Reply sockets that fell back to raw IP because the port was taken.
    reply_raw_fallbacks,
    /// Datagrams dropped by a `drop` rule.
    drop_by_rule,
    /// SOCKS5 associations set up.
    socks5_associations,
    /// SOCKS5 associations that could not be set up.
    socks5_failures,
    /// SOCKS5 associations the server ended while in use.
    socks5_lost,
    /// DNS queries received (UDP and TCP, hijacked and plain).
    dns_queries,
    /// DNS queries received over TCP.
    dns_tcp_queries,
    /// DNS datagrams dropped: shorter than a header, or not a query.
    dns_dropped_malformed,
    /// DNS queries answered FORMERR.
    dns_formerr,
    /// DNS queries answered NOTIMP (opcode other than QUERY).
    dns_notimp,
    /// DNS queries answered from an `answer` rule or hosts file.
    dns_answered_local,
    /// DNS queries answered by a `block` rule.
    dns_blocked,
    /// DNS answers served from the cache.
    dns_cache_hits,
    /// DNS queries not in the cache.
    dns_cache_misses,
    /// DNS queries sent to an upstream group.
    dns_forwarded,
    /// DNS queries answered SERVFAIL because no upstream answered.
    dns_servfail,
    /// DNS answers truncated (TC=1) to fit the client's UDP size.
    dns_truncated,
    /// Hijacked DNS queries whose forwarding was refused: too many pending.
    dns_dropped_overload,
}

#[cfg(test)]
mod tests {
    use super::Stats;

    #[test]
    fn snapshot_lists_counters_in_order() {
        let s = Stats::default();
        s.client_datagrams.inc();
        s.client_bytes.add(10);
        let snap = s.snapshot();
        assert_eq!(snap[0], ("client_datagrams", 1));
        assert_eq!(snap[1], ("client_bytes", 10));
        assert!(
            snap.iter()
                .any(|(n, v)| *n == "sessions_evicted" && *v == 0)
        );
    }
}
