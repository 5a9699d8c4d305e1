//! Counting what a send did, the same way in both directions.

use std::io;

use crate::net::would_block;
use crate::stats::Stats;

/// Which way a run of datagrams went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → upstream.
    Upstream,
    /// Upstream → client (spoofed reply).
    Reply,
}

/// Counts the outcome of sending `run`, of which `result` says how many
/// datagrams left: sent ones as datagrams and bytes, the rest as dropped at
/// a full buffer or as send errors.
pub fn count_sent(stats: &Stats, direction: Direction, result: &io::Result<usize>, run: &[&[u8]]) {
    let (datagrams, bytes, errors) = match direction {
        Direction::Upstream => (
            &stats.upstream_datagrams,
            &stats.upstream_bytes,
            &stats.upstream_send_errors,
        ),
        Direction::Reply => (&stats.reply_datagrams, &stats.reply_bytes, &stats.reply_send_errors),
    };
    match result {
        Ok(sent) => {
            let sent = (*sent).min(run.len());
            datagrams.add(sent as u64);
            bytes.add(run.iter().take(sent).map(|p| p.len() as u64).sum());
            let lost = run.len() - sent;
            if lost > 0 {
                stats.drop_send_buffer_full.add(lost as u64);
            }
        }
        Err(e) if would_block(e) => stats.drop_send_buffer_full.add(run.len() as u64),
        Err(e) => {
            errors.add(run.len() as u64);
            tracing::debug!(?direction, error = %e, "send failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_sends_count_the_rest_as_dropped() {
        let stats = Stats::default();
        let run: [&[u8]; 3] = [b"ab", b"cde", b"f"];
        count_sent(&stats, Direction::Upstream, &Ok(2), &run);
        count_sent(&stats, Direction::Reply, &Err(io::ErrorKind::WouldBlock.into()), &run);
        count_sent(
            &stats,
            Direction::Reply,
            &Err(io::ErrorKind::PermissionDenied.into()),
            &run[..1],
        );
        assert_eq!(stats.upstream_datagrams.get(), 2);
        assert_eq!(stats.upstream_bytes.get(), 5);
        assert_eq!(stats.drop_send_buffer_full.get(), 1 + 3);
        assert_eq!(stats.reply_datagrams.get(), 0);
        assert_eq!(stats.reply_send_errors.get(), 1);
    }
}
