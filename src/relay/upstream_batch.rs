//! Sending the runs of many flows together: one `sendmmsg(2)` per upstream
//! socket and batch, instead of one system call per flow.
//!
//! A pool socket carries flows to many destinations, and in a batch read
//! from a listener most datagrams belong to different flows (a thousand
//! game flows, a burst of new flows), each its own run of one. Sent run by
//! run, every datagram cost a system call of its own. Gathered here and
//! sent per socket, the runs on one socket share one call; each run still
//! leaves as one GSO message where its datagrams allow. The openers do the
//! same with the first datagrams of a round of new flows.
//!
//! Order: a flow sends on one socket, and a socket's runs leave in the
//! order they were queued, so each flow's datagrams keep theirs. Datagrams
//! of different flows may leave in another order than they came, which
//! UDP never promised.

use std::net::SocketAddr;
use std::sync::Arc;

use super::session::Session;
use crate::net::send::{
    GSO_MAX_SEGMENTS, Message, gso_chunks, gso_segments, recycle, recycle_messages, send_messages_here,
};
use crate::stats::Stats;

/// A run waiting to be sent: `len` payloads from `start` in the batch.
#[derive(Debug)]
struct Queued {
    /// Keeps the flow's socket open (and its descriptor unreused) until
    /// the batch is sent.
    session: Arc<Session>,
    dst: SocketAddr,
    tos: Option<u8>,
    start: usize,
    len: usize,
}

/// Reusable storage for batches: a reader keeps one and sends nothing
/// through it that outlives a batch.
#[derive(Debug, Default)]
pub struct UpstreamSends {
    runs: Vec<Queued>,
    payloads: Vec<&'static [u8]>,
    order: Vec<(i32, usize)>,
    messages: Vec<Message<'static>>,
}

impl UpstreamSends {
    /// An empty batch for payloads that live for `'p`.
    pub fn batch<'s, 'p>(&'s mut self) -> UpstreamBatch<'s, 'p> {
        let payloads = recycle(std::mem::take(&mut self.payloads));
        UpstreamBatch { owner: self, payloads }
    }
}

/// Runs of many flows, sent by [`UpstreamBatch::flush`].
#[derive(Debug)]
pub struct UpstreamBatch<'s, 'p> {
    owner: &'s mut UpstreamSends,
    payloads: Vec<&'p [u8]>,
}

impl<'p> UpstreamBatch<'_, 'p> {
    /// Queues a run of client datagrams of `session` towards `dst`, all
    /// with TOS `tos`. A SOCKS5 flow's run goes to its task at once.
    pub fn push(&mut self, session: &Arc<Session>, run: &[&'p [u8]], dst: SocketAddr, tos: Option<u8>, stats: &Stats) {
        if run.is_empty() {
            return;
        }
        if session.upstream_target(dst).is_none() {
            session.queue_socks(run, dst, stats);
            return;
        }
        let start = self.payloads.len();
        self.payloads.extend_from_slice(run);
        self.owner.runs.push(Queued {
            session: session.clone(),
            dst,
            tos,
            start,
            len: run.len(),
        });
    }

    /// Runs queued and not yet sent.
    pub fn len(&self) -> usize {
        self.owner.runs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.owner.runs.is_empty()
    }

    /// Sends everything queued, one `sendmmsg` per socket (more only past
    /// its limits), and counts it.
    pub fn flush(self, stats: &Stats) {
        let UpstreamBatch { owner, payloads } = self;
        let mut order = std::mem::take(&mut owner.order);
        order.clear();
        order.extend(owner.runs.iter().enumerate().filter_map(|(i, q)| {
            let (fd, _) = q.session.upstream_target(q.dst)?;
            Some((fd, i))
        }));
        // By socket, and within one in the order queued (the index breaks
        // ties, so an unstable sort keeps it).
        order.sort_unstable();
        let max = gso_segments(GSO_MAX_SEGMENTS);
        let mut messages: Vec<Message<'_>> = recycle_messages(std::mem::take(&mut owner.messages));
        let mut rest = &order[..];
        while let Some(&(fd, _)) = rest.first() {
            let n = rest.iter().take_while(|(f, _)| *f == fd).count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            messages.clear();
            let mut v6 = false;
            for &(_, i) in group {
                let q = &owner.runs[i];
                let Some((_, to)) = q.session.upstream_target(q.dst) else {
                    continue;
                };
                v6 = to.is_ipv6();
                let run = &payloads[q.start..q.start + q.len];
                messages.extend(gso_chunks(run, v6, max).map(|segments| Message {
                    to: Some(to),
                    tos: q.tos,
                    segments,
                }));
            }
            let sent = send_messages_here(fd, &messages, v6, false);
            stats.upstream_datagrams.add(sent.datagrams as u64);
            stats.upstream_bytes.add(sent.bytes);
            stats.drop_send_buffer_full.add(sent.full as u64);
            stats.upstream_send_errors.add(sent.failed as u64);
            if let Some(e) = &sent.first_error {
                tracing::debug!(error = %e, "upstream send failed");
            }
        }
        owner.runs.clear();
        owner.order = order;
        owner.messages = recycle_messages(messages);
        owner.payloads = recycle(payloads);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayConfig;
    use crate::relay::budget::FdShare;
    use crate::relay::key::FlowKey;
    use crate::relay::pool::{PoolKey, Pools};
    use crate::relay::rules::UdpRules;
    use crate::relay::session::Upstream;
    use std::net::UdpSocket;
    use std::time::Duration;

    fn refs(v: &[Vec<u8>]) -> Vec<&[u8]> {
        v.iter().map(Vec::as_slice).collect()
    }

    fn receiver() -> UdpSocket {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        rx
    }

    fn received(rx: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
        let mut buf = [0u8; 2048];
        (0..n)
            .map(|_| rx.recv(&mut buf).map(|len| buf[..len].to_vec()).unwrap())
            .collect()
    }

    #[test]
    fn runs_of_flows_sharing_a_socket_arrive_separately_and_in_order() {
        let pools: Pools<Session> = Pools::new(FdShare::new(100), 1 << 16);
        let rules = Arc::new(UdpRules::new(&RelayConfig::default(), 0xff));
        let pool = PoolKey {
            v6: false,
            mark: 0,
            device: None,
        };
        let (rx_a, rx_b) = (receiver(), receiver());
        let flow = |client: &str, rx: &UdpSocket| {
            let (client, remote): (SocketAddr, SocketAddr) = (client.parse().unwrap(), rx.local_addr().unwrap());
            let (lease, _) = pools.lease(pool.clone(), client, remote).unwrap();
            let key = FlowKey::new(client, remote, rules.numbered(0));
            let session = Arc::new(Session::new(key, Upstream::Pooled(lease), 60_000, 0));
            if let Upstream::Pooled(lease) = session.upstream() {
                lease.attach(&session);
            }
            (session, remote)
        };
        let (a, dst_a) = flow("192.0.2.10:5000", &rx_a);
        let (b, dst_b) = flow("192.0.2.11:5000", &rx_b);
        // Arriving together, the two flows share a socket: one batch, one call.
        assert_eq!(a.upstream_target(dst_a).unwrap().0, b.upstream_target(dst_b).unwrap().0);

        // A GSO-able run, another flow's mixed sizes, then the first again.
        let a1: Vec<Vec<u8>> = vec![vec![1; 64], vec![2; 64], vec![3; 30]];
        let b1: Vec<Vec<u8>> = vec![vec![4; 10], vec![5; 100], vec![6; 200], vec![7; 100]];
        let a2: Vec<Vec<u8>> = vec![vec![8; 64]];
        let (a1r, b1r, a2r) = (refs(&a1), refs(&b1), refs(&a2));
        let stats = Stats::default();
        let mut sends = UpstreamSends::default();
        for _ in 0..2 {
            let mut out = sends.batch();
            out.push(&a, &a1r, dst_a, None, &stats);
            out.push(&b, &b1r, dst_b, Some(0xb8), &stats);
            out.push(&a, &a2r, dst_a, None, &stats);
            assert_eq!(out.len(), 3);
            out.flush(&stats);
            let want_a: Vec<Vec<u8>> = a1.iter().chain(&a2).cloned().collect();
            assert_eq!(received(&rx_a, 4), want_a);
            assert_eq!(received(&rx_b, 4), b1);
        }
        assert_eq!(stats.upstream_datagrams.get(), 16);
        assert_eq!(stats.upstream_send_errors.get(), 0);
        // Nothing more arrived than was sent.
        rx_a.set_nonblocking(true).unwrap();
        assert!(rx_a.recv(&mut [0u8; 16]).is_err());
    }
}
