//! Closing idle flows.
//!
//! One sweeper for all flows instead of a timer per flow: every so often it
//! takes the sessions idle (in both directions) for at least their own
//! timeout out of the table, which ends them. Then it closes the pool
//! sockets that no flow has used for a grace period, so that the
//! descriptors a flood took come back when its flows are gone.

use std::sync::Arc;
use std::time::Duration;

use super::context::RelayContext;
use crate::shutdown::Shutdown;

/// How often to sweep: a quarter of the shortest timeout in use, between
/// 50 ms and a second. A flow thus outlives its timeout by at most that
/// (plus up to a second of LRU order skew, see `SessionTable::take_idle`).
fn interval(min_idle_ms: u64) -> Duration {
    Duration::from_millis((min_idle_ms / 4).clamp(50, 1_000))
}

/// How long a pool socket stays open with no flow on it: as long as the
/// shortest idle timeout, between one and thirty seconds. Long enough that
/// flows coming and going reuse a socket instead of opening and closing
/// one each time; short enough that a flood's sockets are soon given back.
fn socket_grace(min_idle_ms: u64) -> Duration {
    Duration::from_millis(min_idle_ms.clamp(1_000, 30_000))
}

pub async fn sweep(ctx: Arc<RelayContext>, mut shutdown: Shutdown) -> std::io::Result<()> {
    loop {
        tokio::select! {
            _ = shutdown.recv() => return Ok(()),
            _ = tokio::time::sleep(interval(ctx.min_idle_ms())) => {}
        }
        let expired = ctx.table().take_idle(ctx.now_ms(), ctx.min_idle_ms());
        if !expired.is_empty() {
            ctx.stats().sessions_expired.add(expired.len() as u64);
            tracing::debug!(count = expired.len(), "sessions expired");
        }
        drop(expired);
        super::open::let_go_of_closed(&ctx);
        let closed = ctx.pools().close_idle(socket_grace(ctx.min_idle_ms()));
        if closed > 0 {
            ctx.pool_readers().forget_retired();
            tracing::debug!(count = closed, "idle pool sockets closed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{interval, socket_grace};
    use std::time::Duration;

    #[test]
    fn sweeps_often_enough_for_the_shortest_timeout() {
        assert_eq!(interval(1_000), Duration::from_millis(250));
        assert_eq!(interval(120_000), Duration::from_secs(1));
        assert_eq!(interval(10), Duration::from_millis(50));
        assert_eq!(interval(u64::MAX), Duration::from_secs(1));
    }

    #[test]
    fn idle_sockets_get_a_grace_of_the_shortest_timeout_within_bounds() {
        assert_eq!(socket_grace(2_000), Duration::from_secs(2));
        assert_eq!(socket_grace(10), Duration::from_secs(1));
        assert_eq!(socket_grace(u64::MAX), Duration::from_secs(30));
    }
}
