//! Racing a group's servers for one question.
//!
//! Servers are asked in order (healthy ones in configuration order, then
//! those that recently timed out). The first is asked at once; the next one
//! is asked as soon as the previous one fails (an RCODE other than
//! NOERROR, NXDOMAIN or YXDOMAIN, a transport error, `server_timeout`), or
//! — while it is still pending — once it has taken longer than its
//! observed 90th percentile (a hedge). A hedge never waits longer than `dns.timeout` divided by the
//! number of servers (nor `server_timeout`), so within `dns.timeout` every
//! server gets its chance even when all the earlier ones are black holes.
//! Earlier queries stay pending; the first valid answer wins and the rest
//! are dropped (their sockets close).
//!
//! A server on probation (see [`super::health`]) is asked alongside the
//! first one rather than in its turn, so checking whether a dead server came
//! back costs no client any waiting.
//!
//! Hedging at the p90 keeps the extra upstream queries near 10 % of misses
//! in steady state, while one slow or dead server costs a client at most its
//! p90, not a timeout.

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use hickory_proto::op::Query;
use std::time::Duration;
use tokio::time::Instant;

use super::health::Standing;
use super::{Answer, UpstreamError, UpstreamGroup};
use crate::dns::deadlines;
use crate::dns::names::printable;

/// A server still silent this long after a later one answered (10 times
/// faster) counts as timed out.
const SLOW_LOSER: Duration = Duration::from_millis(50);

enum Failure {
    Timeout,
    Error(String),
}

struct Attempt {
    index: usize,
    hedged: bool,
    started: Instant,
    /// When it ended: the time its result is judged at, read once.
    ended: Instant,
    result: Result<Answer, Failure>,
}

/// The order to ask servers in: healthy ones in configuration order, then
/// those on probation, then the penalised ones, soonest forgiven first.
pub(super) fn order(standings: &[Standing]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..standings.len()).collect();
    order.sort_by_key(|&i| (standings[i], i));
    order
}

impl UpstreamGroup {
    /// Asks the servers as described in the module docs.
    pub(super) async fn race(
        &self,
        query: &Query,
        spelt: Option<&[u8]>,
        deadline: Instant,
    ) -> Result<Answer, UpstreamError> {
        let start = Instant::now();
        self.sweep_sockets(start);
        if let [only] = self.servers.as_slice() {
            return self.ask_only(only, query, spelt, start, deadline).await;
        }
        let standings: Vec<Standing> = self.servers.iter().map(|s| s.health.standing(start)).collect();
        let mut order = order(&standings);
        // A server on probation is asked alongside the first one, not in
        // its turn: the client does not wait for it.
        let probe = order
            .iter()
            .skip(1)
            .position(|&i| standings[i] == Standing::Probation)
            .map(|p| order.remove(p + 1));
        let n = u32::try_from(order.len()).unwrap_or(u32::MAX).max(1);
        // The longest one server is waited for before the next is asked.
        let step = self.server_timeout.min(deadline.saturating_duration_since(start) / n);
        let mut pending = FuturesUnordered::new();
        let mut launched: Vec<(usize, Instant)> = Vec::with_capacity(order.len());
        let mut finished: Vec<usize> = Vec::with_capacity(order.len());
        let mut next = 0;
        let mut next_at = start;
        if let Some(index) = probe {
            self.servers[index].health.probing(start, self.server_timeout);
            pending.push(self.attempt(index, query, spelt, start, deadline, false));
            launched.push((index, start));
        }
        loop {
            let now = Instant::now();
            if let Some(&index) = order.get(next)
                && now >= next_at
            {
                // A hedge: an earlier server in the order is still pending.
                let hedged = order[..next].iter().any(|i| !finished.contains(i));
                pending.push(self.attempt(index, query, spelt, now, deadline, hedged));
                launched.push((index, now));
                next_at = now + self.servers[index].health.hedge_after(step);
                next += 1;
                continue;
            }
            if pending.is_empty() && next >= order.len() {
                return Err(UpstreamError::NoAnswer);
            }
            let wake = if next < order.len() {
                next_at.min(deadline)
            } else {
                deadline
            };
            tokio::select! {
                // An answer that is in wins over a timer that fired in the
                // same turn (and no random branch order to draw per poll).
                biased;
                Some(attempt) = pending.next() => {
                    let server = &self.servers[attempt.index];
                    finished.push(attempt.index);
                    let now = attempt.ended;
                    match attempt.result {
                        Ok(answer) => {
                            server.health.answered(now - attempt.started);
                            if attempt.hedged {
                                server.health.hedges_won.inc();
                            }
                            self.note_slow(&launched, &finished, step, Some(now - attempt.started), now);
                            if let Some(p) = probe.filter(|p| !finished.contains(p)) {
                                // Beaten while on probation: stay penalised.
                                self.servers[p].health.timed_out(now - start, now);
                            }
                            return Ok(answer);
                        }
                        Err(Failure::Timeout) => {
                            server.health.timed_out(now - attempt.started, now);
                            tracing::debug!(group = %self.name, server = %server.label, "upstream timed out");
                            if Some(attempt.index) != probe {
                                next_at = now;
                            }
                        }
                        Err(Failure::Error(e)) => {
                            server.health.errors.inc();
                            tracing::debug!(group = %self.name, server = %server.label, error = %printable(&e), "upstream failed");
                            if Some(attempt.index) != probe {
                                next_at = now;
                            }
                        }
                    }
                }
                () = deadlines::sleep_until(wake) => {
                    if Instant::now() >= deadline {
                        self.note_slow(&launched, &finished, step, None, deadline);
                        return Err(UpstreamError::NoAnswer);
                    }
                }
            }
        }
    }

    /// The race of a group with one server: it is asked whatever its
    /// standing, with nobody to hedge to or probe alongside, so there is
    /// nothing to race. Exactly what the general loop does for one server,
    /// without its set of pending attempts, order and bookkeeping (each an
    /// allocation per miss).
    async fn ask_only(
        &self,
        server: &super::Server,
        query: &Query,
        spelt: Option<&[u8]>,
        start: Instant,
        deadline: Instant,
    ) -> Result<Answer, UpstreamError> {
        let attempt = self.attempt(0, query, spelt, start, deadline, false).await;
        let now = attempt.ended;
        match attempt.result {
            Ok(answer) => {
                server.health.answered(now - attempt.started);
                Ok(answer)
            }
            Err(Failure::Timeout) => {
                server.health.timed_out(now - attempt.started, now);
                tracing::debug!(group = %self.name, server = %server.label, "upstream timed out");
                Err(UpstreamError::NoAnswer)
            }
            Err(Failure::Error(e)) => {
                server.health.errors.inc();
                tracing::debug!(group = %self.name, server = %server.label, error = %printable(&e), "upstream failed");
                Err(UpstreamError::NoAnswer)
            }
        }
    }

    /// Servers still silent when the race ends are treated as timed out
    /// (tried later for a while) once they have had a whole `step`, or when
    /// they lost to a server asked after them by a wide margin (10 times
    /// the winner's time, and at least [`SLOW_LOSER`]). Without this a dead
    /// server that a live one always overtakes before its `server_timeout`
    /// would stay first in the order and cost every query a step.
    fn note_slow(
        &self,
        launched: &[(usize, Instant)],
        finished: &[usize],
        step: Duration,
        winner_took: Option<Duration>,
        now: Instant,
    ) {
        for &(index, started) in launched {
            let waited = now.saturating_duration_since(started);
            let outpaced = winner_took.is_some_and(|w| waited >= SLOW_LOSER && waited >= w * 10);
            if !finished.contains(&index) && (waited >= step || outpaced) {
                self.servers[index].health.timed_out(waited, now);
            }
        }
    }

    /// One server's try, bounded by `server_timeout` and the deadline.
    ///
    /// `started` is the caller's reading of the clock, taken just before
    /// (nothing awaited in between): it also dates the socket taken for
    /// the query, and the try reads the clock once more, when it ends.
    /// Each reading was its own `clock_gettime` before, eleven in a miss.
    async fn attempt(
        &self,
        index: usize,
        query: &Query,
        spelt: Option<&[u8]>,
        started: Instant,
        deadline: Instant,
        hedged: bool,
    ) -> Attempt {
        let server = &self.servers[index];
        server.health.queries.inc();
        if hedged {
            server.health.hedges_sent.inc();
        }
        let limit = self.server_timeout.min(deadline.saturating_duration_since(started));
        // In the listener's queue of deadlines, not a tokio timer of its
        // own (`deadlines`).
        let result = match deadlines::timeout_at(started + limit, self.ask(server, query, spelt, started)).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(Failure::Error(e)),
            Err(deadlines::Elapsed) => Err(Failure::Timeout),
        };
        Attempt {
            index,
            hedged,
            started,
            ended: Instant::now(),
            result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn penalised_servers_go_last_soonest_forgiven_first() {
        let now = Instant::now();
        let later = now + Duration::from_secs(10);
        use Standing::*;
        assert_eq!(order(&[Healthy, Healthy, Healthy]), [0, 1, 2]);
        assert_eq!(
            order(&[Penalised(later), Healthy, Penalised(now), Probation, Healthy]),
            [1, 4, 3, 2, 0]
        );
    }
}
