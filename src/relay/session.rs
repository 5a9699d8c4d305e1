//! One flow: where its datagrams go, where its replies come from, and when
//! it was last active.
//!
//! A flow to one destination (symmetric NAT) rides a shared socket of the
//! [`pool`](super::pool) and costs no descriptor or task of its own. A full
//! cone needs a socket any remote can reach, so it owns one, read by a task
//! of its own; a SOCKS5 flow owns its association and a task. No flow keeps
//! a timer: the [`expiry`](super::expiry) sweeper closes idle ones. This
//! module holds the flow's state only; [`open`](super::open) makes flows
//! and [`inbound`](super::inbound) brings their replies home.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use tokio::net::UdpSocket;

use super::account::{Direction, count_sent};
use super::key::{FlowKey, Target};
use super::pool::{Lease, Occupant};
use super::socks_queue::SocksQueue;
use crate::net::send::send_run;
use crate::stats::Stats;

/// Largest UDP payload over IPv6 (65,535 − 8); IPv4's 65,507 fits too.
pub const MAX_DATAGRAM: usize = 65_535;

/// How often, at most, traffic from upstream re-promotes a flow in the LRU.
/// Promotion takes the table lock; once a second is plenty to keep a
/// mostly-inbound flow (a game server streaming state) from looking idle.
const PROMOTE_EVERY_SECS: u32 = 1;

/// Clock milliseconds as whole seconds (136 years fit).
fn secs(ms: u64) -> u32 {
    u32::try_from(ms / 1_000).unwrap_or(u32::MAX)
}

/// Where a session's datagrams go.
#[derive(Debug)]
pub enum Upstream {
    /// One destination (symmetric NAT): a shared pool socket.
    Pooled(Lease<Session>),
    /// Every destination (full cone): an own socket; replies are spoofed
    /// from whichever remote sent them. Its descriptor's permit is the
    /// table entry's (see `table::Entry`).
    Cone { socket: Arc<UdpSocket> },
    /// A SOCKS5 association, run by the session's task; its two
    /// descriptors' permits are the table entry's.
    Socks {
        /// Bounded per flow and charged to the relay's SOCKS5 budget.
        queue: SocksQueue,
    },
}

/// A flow's state; one allocation per flow (an `Arc`), so its size is
/// memory a million flows pay a million times. It carries no id: a later
/// session for the same flow is a different allocation, and whoever asks
/// the table about "this" session holds it, so its address tells the two
/// apart (see `SessionTable::promote`). Pinned by `session_size_is_pinned`.
#[derive(Debug)]
pub struct Session {
    pub key: FlowKey,
    upstream: Upstream,
    /// Idle timeout, milliseconds (up to 49 days).
    idle_ms: u32,
    /// When traffic from upstream last promoted the flow in the LRU, in
    /// clock seconds. Seconds, and the timeout in 32 bits, keep a session
    /// in one allocation size class smaller: a million flows, 16 MB.
    promoted_secs: AtomicU32,
    last_active_ms: AtomicU64,
}

impl Occupant for Session {
    fn client(&self) -> SocketAddr {
        self.key.client
    }
}

impl Session {
    pub fn new(key: FlowKey, upstream: Upstream, idle_ms: u64, now_ms: u64) -> Session {
        Session {
            key,
            upstream,
            idle_ms: u32::try_from(idle_ms).unwrap_or(u32::MAX),
            promoted_secs: AtomicU32::new(secs(now_ms)),
            last_active_ms: AtomicU64::new(now_ms),
        }
    }

    /// Idle timeout, milliseconds.
    pub fn idle_ms(&self) -> u64 {
        u64::from(self.idle_ms)
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    /// Whether the flow rides a socket of its own in a pool (a flow to
    /// `relay.own_socket_ports`): ending it gives that descriptor back.
    pub fn owns_pool_socket(&self) -> bool {
        matches!(&self.upstream, Upstream::Pooled(lease) if lease.socket.is_own())
    }

    /// Records traffic now.
    pub fn touch(&self, now_ms: u64) {
        self.last_active_ms.store(now_ms, Ordering::Relaxed);
    }

    /// When the last datagram in either direction passed (clock ms).
    pub fn last_active_ms(&self) -> u64 {
        self.last_active_ms.load(Ordering::Relaxed)
    }

    /// Milliseconds since the last datagram in either direction.
    pub fn idle_for(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.last_active_ms.load(Ordering::Relaxed))
    }

    /// Records inbound traffic now; true when the flow is also due for
    /// promotion in the LRU (at most once a second).
    pub fn touch_inbound(&self, now_ms: u64) -> bool {
        self.touch(now_ms);
        let now = secs(now_ms);
        if now.saturating_sub(self.promoted_secs.load(Ordering::Relaxed)) >= PROMOTE_EVERY_SECS {
            self.promoted_secs.store(now, Ordering::Relaxed);
            return true;
        }
        false
    }

    /// The address replies from `sender` must come from: the address the
    /// client wrote to (one destination, which the key holds), or the
    /// sender itself (full cone).
    pub fn reply_source(&self, sender: SocketAddr) -> SocketAddr {
        match self.key.target {
            Target::Destination(dst) => dst,
            Target::Cone(_) => sender,
        }
    }

    /// Whether a datagram from `sender` is this flow's to deliver: from
    /// its destination (one destination), or from anyone (full cone).
    ///
    /// A pooled flow needs no such check (its socket hands it only what
    /// its remote sent), but a SOCKS5 flow's replies all arrive from the
    /// proxy, each naming the remote it came from, and many proxies relay
    /// UDP as a full cone: whatever reaches the association's outgoing
    /// port. Without this a stranger who learnt that port could reach the
    /// client of a symmetric flow, spoofed as its destination. An
    /// IPv4-mapped sender is taken as the IPv4 address it maps.
    pub fn answers_from(&self, sender: SocketAddr) -> bool {
        match self.key.target {
            Target::Destination(dst) => {
                dst.port() == sender.port() && dst.ip().to_canonical() == sender.ip().to_canonical()
            }
            Target::Cone(_) => true,
        }
    }

    /// The socket a run towards `dst` leaves on and the address it is sent
    /// to; `None` for a SOCKS5 flow, whose task sends.
    pub fn upstream_target(&self, dst: SocketAddr) -> Option<(RawFd, SocketAddr)> {
        match &self.upstream {
            Upstream::Pooled(lease) => Some((lease.socket.socket.as_raw_fd(), lease.remote)),
            Upstream::Cone { socket, .. } => Some((socket.as_raw_fd(), dst)),
            Upstream::Socks { .. } => None,
        }
    }

    /// Hands a run of client datagrams to the flow's SOCKS5 task; a full
    /// queue drops (counted). Other flows send on their socket instead.
    pub fn queue_socks(&self, run: &[&[u8]], dst: SocketAddr, stats: &Stats) {
        if let Upstream::Socks { queue, .. } = &self.upstream {
            queue.push(run, dst, stats);
        }
    }

    /// Sends a run of client datagrams towards `dst` (all with TOS `tos`);
    /// never blocks.
    pub fn send_upstream(&self, run: &[&[u8]], dst: SocketAddr, tos: Option<u8>, stats: &Stats) {
        let Some((fd, to)) = self.upstream_target(dst) else {
            self.queue_socks(run, dst, stats);
            return;
        };
        // Plain sendmsg(2): tokio's try_send would refuse until the reactor
        // has *seen* a new socket become writable, dropping the first
        // datagram of every flow. An ICMP error meant for an earlier datagram
        // is retried inside.
        let result = send_run(fd, run, Some(to), tos, to.is_ipv6());
        count_sent(stats, Direction::Upstream, &result, run);
    }
}

impl Drop for Session {
    /// A pooled flow's (socket, remote) goes back to its pool with it.
    fn drop(&mut self) {
        if let Upstream::Pooled(lease) = &self.upstream {
            lease.release(self.key.client);
        }
    }
}

#[cfg(test)]
impl Session {
    /// A session with a loopback socket and no task, for table tests.
    pub(crate) fn detached(key: FlowKey, idle_ms: u64, last_active_ms: u64) -> Session {
        let std = std::net::UdpSocket::bind("127.0.0.1:0").expect("loopback socket");
        std.set_nonblocking(true).expect("nonblocking");
        let upstream = Upstream::Cone {
            socket: Arc::new(UdpSocket::from_std(std).expect("tokio socket")),
        };
        let mut s = Session::new(key, upstream, idle_ms, last_active_ms);
        s.promoted_secs = AtomicU32::new(0);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// A session is one `Arc` allocation per flow: its size, plus the
    /// `Arc`'s two counts and glibc's 8-byte header rounded up to 16, is
    /// what a million flows pay a million times. At 120 bytes that is a
    /// 144-byte chunk; at 136 (as it was, with an id and the pool in
    /// every lease) it was 160.
    #[test]
    fn session_size_is_pinned() {
        assert_eq!(std::mem::size_of::<Session>(), 120);
        assert_eq!(std::mem::size_of::<Upstream>(), 40);
    }

    #[tokio::test]
    async fn a_symmetric_flow_answers_only_from_its_destination() {
        let client = sa("192.0.2.10:40000");
        let one = Session::detached(
            FlowKey {
                client,
                target: Target::Destination(sa("198.51.100.7:7000")),
            },
            1_000,
            0,
        );
        assert!(one.answers_from(sa("198.51.100.7:7000")));
        assert!(one.answers_from(sa("[::ffff:198.51.100.7]:7000")));
        assert!(!one.answers_from(sa("198.51.100.7:7001")));
        assert!(!one.answers_from(sa("198.51.100.9:7000")));
        let cone = Session::detached(
            FlowKey {
                client,
                target: Target::Cone(1),
            },
            1_000,
            0,
        );
        assert!(cone.answers_from(sa("198.51.100.9:9000")));
    }
}
