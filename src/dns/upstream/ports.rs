//! A rotating pool of pre-opened upstream UDP sockets, one pool per
//! plain-UDP server, so that a cache miss costs a send and a receive rather
//! than opening, registering and closing a socket of its own.
//!
//! What an off-path spoofer needs is the query's source port and ID while
//! the query is in flight (RFC 5452). A socket per query gives a fresh
//! random port every time, at six system calls per query (`socket`,
//! `setsockopt(SO_MARK)`, `connect`, `close` and the reactor's two
//! `epoll_ctl`). The pool keeps the same guarantee on the figure that
//! matters — any 1,000 consecutive queries to a server leave from at least
//! that many different ports — and rotates the ports so that one learnt
//! (through some side channel) stops being useful soon:
//!
//! * **Reuse distance.** A socket is used again only after
//!   [`Limits::reuse_distance`] other queries (1,000) have been taken from
//!   the pool since its last one; until then the pool opens a new socket,
//!   on a port the kernel picks at random across the ephemeral range. So
//!   the pool grows to about that many sockets under load and stays small
//!   when queries are rare.
//! * **Unpredictable order.** Of the idle sockets that may be reused, one of
//!   the [`Limits::pick_among`] oldest is drawn at random.
//! * **Rotation.** A port serves at most [`Limits::uses`] queries (32) and
//!   lives at most [`Limits::max_age`] (20 s), whichever comes first. Then
//!   its socket moves to a new port the kernel picks at random, as for a
//!   new socket (`sockets::new_port`: two `connect`s, where closing the
//!   socket and opening another cost six system calls and about four times
//!   the kernel time); a socket that aged out while idle is moved only
//!   when a query needs one, and closed otherwise. At 30,000 misses a
//!   second every port changes about once a second; when it is quiet a
//!   port is rarely used twice.
//! * **Clean before use.** Each socket is connected to its server, so the
//!   kernel drops datagrams from any other address or port and reports ICMP
//!   errors about it. Before a query is sent, whatever the socket holds is
//!   read and discarded: a datagram planted while it was idle (a forged
//!   answer waiting for a lucky ID) and a pending ICMP error are counted and
//!   never seen by the query. A socket that held more than
//!   [`MAX_STALE`] is closed instead. The ID is also never the socket's
//!   previous one, and an answer must echo the exact question
//!   (`udp::accept`), so even a late duplicate of an earlier answer is
//!   refused.
//! * **Only clean exchanges return.** A socket goes back to the pool only
//!   when its query was answered; an abandoned, failed or timed-out exchange
//!   closes it, so a late answer can never land on a socket another query
//!   is using.
//!
//! The sockets count against a descriptor budget of their own
//! ([`set_budget`], planned with the relay's in `relay::budget`): when it is
//! spent, a query gets a one-off socket as before the pool (closed after
//! it, bounded by the group's `max_pending`), so the entropy never drops to
//! fit the budget. The pool is owned by its server's entry in the upstream
//! group: a reload or shutdown drops the engine and closes every idle
//! socket; a socket still in use closes when its query ends. No task is
//! spawned for any of this: sockets are opened when a query needs one and
//! closed when they retire.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::time::Instant;

use crate::net::sockets;
use crate::stats::Stats;

/// How the pool rotates its sockets.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Queries taken from the pool between two uses of one socket.
    pub reuse_distance: u64,
    /// Reusable idle sockets the next one is drawn from (oldest first; at
    /// most [`MAX_PICK`]).
    pub pick_among: usize,
    /// Queries a socket carries before it is closed.
    pub uses: u32,
    /// Age at which a socket is closed, used or not.
    pub max_age: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            // RFC 5452's figure, and the one the tests hold tproxyd to:
            // 1,000 consecutive queries on as many ports.
            reuse_distance: 1_000,
            pick_among: 8,
            uses: 32,
            max_age: Duration::from_secs(20),
        }
    }
}

/// More than this many datagrams or errors waiting on an idle socket: it is
/// being aimed at; close it rather than keep reading.
pub const MAX_STALE: usize = 16;
/// The most idle sockets the next one is drawn from.
const MAX_PICK: usize = 16;
/// Expired sockets closed per query at most, so one query never pays for
/// closing a whole pool that went quiet.
const SWEEP_PER_TAKE: usize = 8;

/// Descriptors all pools together may hold, and how many they hold now.
#[derive(Debug)]
struct Budget {
    used: AtomicUsize,
    limit: AtomicUsize,
}

/// Until the daemon plans its descriptors (`relay::budget`), and in
/// tools that never do.
const DEFAULT_BUDGET: usize = 4_096;

static BUDGET: Budget = Budget {
    used: AtomicUsize::new(0),
    limit: AtomicUsize::new(DEFAULT_BUDGET),
};

/// Sets how many descriptors the upstream socket pools may hold together
/// (at start and on reload). Sockets already open stay open; the pools
/// shrink to a lower limit as their sockets retire.
pub fn set_budget(limit: usize) {
    BUDGET.limit.store(limit, Ordering::Relaxed);
}

/// Descriptors the pools hold now (for metrics and tests).
pub fn budget_used() -> usize {
    BUDGET.used.load(Ordering::Relaxed)
}

/// One descriptor of a budget, given back when dropped.
#[derive(Debug)]
struct Permit(&'static Budget);

impl Budget {
    fn take(&'static self) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Relaxed);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| (u < limit).then_some(u + 1))
            .ok()
            .map(|_| Permit(self))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.0.used.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A pooled socket in the reactor, registered for reading only.
///
/// A query is one small datagram on an otherwise idle socket, so its send
/// never finds the buffer full in practice and goes straight to the kernel
/// (`udp::Exchange::run`). Registered for writing too (as tokio's
/// `UdpSocket` is), every send would also put the socket on the epoll ready
/// list when its buffer space came back, and the next `epoll_wait` would
/// poll it and hand tokio an event nobody waits for: about half an event
/// more per query, each on a socket 1,000 queries cold.
pub type PoolSocket = AsyncFd<std::net::UdpSocket>;

/// A socket and what the pool knows about it.
#[derive(Debug)]
struct Pooled {
    socket: PoolSocket,
    /// When it retires, however little it was used.
    retires: Instant,
    uses: u32,
    /// The pool's take count when it was last taken.
    last_take: u64,
    /// The ID of its last query (the next one must differ).
    last_id: Option<u16>,
    /// `None` for a one-off socket opened beyond the budget.
    permit: Option<Permit>,
}

#[derive(Debug, Default)]
struct State {
    idle: VecDeque<Pooled>,
    takes: u64,
}

/// What was found on a reused socket before its query (the pool counts
/// the rest itself: sockets opened, retired, one-off).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cleaned {
    /// Datagrams that were waiting on the socket, discarded unread.
    pub stale: usize,
    /// Errors (ICMP) that were pending on the socket, cleared.
    pub errors: usize,
}

/// The sockets of one upstream server.
#[derive(Debug)]
pub struct ServerSockets {
    server: SocketAddr,
    mark: u32,
    limits: Limits,
    state: Mutex<State>,
    stats: Arc<Stats>,
    /// [`BUDGET`], shared by all pools (a test may give its own).
    budget: &'static Budget,
}

/// A socket lent to one query. It goes back to the pool only if
/// [`Lease::answered`] was called; otherwise it is closed when dropped.
#[derive(Debug)]
pub struct Lease<'a> {
    pool: &'a ServerSockets,
    pooled: Option<Pooled>,
    answered: bool,
    /// When it was taken: its age on return is judged by this, not by
    /// another reading of the clock (an exchange lasts milliseconds, and
    /// a socket past its age is never taken again: [`ServerSockets::take_at`]
    /// checks with the time of each query).
    taken: Instant,
}

impl ServerSockets {
    pub fn new(server: SocketAddr, mark: u32, stats: Arc<Stats>) -> Self {
        Self::with_limits(server, mark, Limits::default(), stats)
    }

    pub fn with_limits(server: SocketAddr, mark: u32, limits: Limits, stats: Arc<Stats>) -> Self {
        ServerSockets {
            server,
            mark,
            limits,
            state: Mutex::new(State::default()),
            stats,
            budget: &BUDGET,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Idle sockets now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.state().idle.len()
    }

    /// A clean socket for one query, and what was cleaned off it. Must
    /// run inside the runtime (a new socket joins its reactor).
    #[cfg(test)]
    pub fn take(&self) -> io::Result<(Lease<'_>, Cleaned)> {
        self.take_at(Instant::now())
    }

    /// [`ServerSockets::take`] at `now`, the caller's reading of the clock.
    pub fn take_at(&self, now: Instant) -> io::Result<(Lease<'_>, Cleaned)> {
        let mut closing: Vec<Pooled> = Vec::new();
        let (seq, reused) = {
            let mut st = self.state();
            st.takes += 1;
            let seq = st.takes;
            while closing.len() < SWEEP_PER_TAKE && st.idle.front().is_some_and(|p| self.expired(p, now)) {
                closing.extend(st.idle.pop_front());
            }
            // The reusable ones among the oldest few, without allocating:
            // this runs on every query.
            let mut candidates = [0usize; MAX_PICK];
            let mut n = 0;
            for (i, p) in st.idle.iter().take(self.limits.pick_among.min(MAX_PICK)).enumerate() {
                if seq.saturating_sub(p.last_take) > self.limits.reuse_distance && !self.expired(p, now) {
                    candidates[n] = i;
                    n += 1;
                }
            }
            let picked = match n {
                0 => None,
                n => candidates.get(rand::random_range(0..n)).copied(),
            };
            let reused = picked.and_then(|i| st.idle.remove(i)).map(|mut p| {
                p.last_take = seq;
                p
            });
            (seq, reused)
        };
        // With nothing to reuse, a socket that aged out moves to a new
        // port and serves as a new one would (what is queued on it from its
        // old port is emptied below); the rest close.
        let recycled = match reused {
            None => closing.pop(),
            Some(_) => None,
        };
        self.retire(closing.len());
        drop(closing);
        let reused = reused.or_else(|| {
            recycled.and_then(|mut p| match self.rotate(&mut p, now) {
                Ok(()) => {
                    p.last_take = seq;
                    Some(p)
                }
                Err(_) => {
                    self.retire(1);
                    None
                }
            })
        });
        let mut cleaned = Cleaned::default();
        let pooled = match reused {
            Some(p) => match clean(&p.socket) {
                Ok(c) => {
                    cleaned = c;
                    p
                }
                Err(c) => {
                    // Aimed at: a new socket instead.
                    cleaned = c;
                    drop(p);
                    self.retire(1);
                    self.open(now, seq)?
                }
            },
            None => self.open(now, seq)?,
        };
        Ok((
            Lease {
                pool: self,
                pooled: Some(pooled),
                answered: false,
                taken: now,
            },
            cleaned,
        ))
    }

    /// A new socket on a random port, in the budget if there is room.
    fn open(&self, now: Instant, seq: u64) -> io::Result<Pooled> {
        let permit = self.budget.take();
        let std = sockets::marked_connected_udp(self.server, self.mark)?;
        // SAFETY: a `std::net::UdpSocket` owns its descriptor: it stays open
        // and is the one `as_raw_fd` returns until the `AsyncFd` that owns
        // the socket is dropped.
        let socket = unsafe { AsyncFd::register_with_interest(std, Interest::READABLE) }?;
        self.stats.dns_upstream_sockets_opened.inc();
        if permit.is_none() {
            self.stats.dns_upstream_sockets_unpooled.inc();
        }
        Ok(Pooled {
            socket,
            retires: now + self.limits.max_age,
            uses: 0,
            last_take: seq,
            last_id: None,
            permit,
        })
    }

    /// Moves `p` to a new random port (`sockets::new_port`) with a fresh
    /// count of uses and a fresh age: a new port at a third of the cost of
    /// a new socket. Its ID history is kept.
    fn rotate(&self, p: &mut Pooled, now: Instant) -> io::Result<()> {
        sockets::new_port(p.socket.get_ref(), self.server)?;
        p.uses = 0;
        p.retires = now + self.limits.max_age;
        self.stats.dns_upstream_sockets_rotated.inc();
        Ok(())
    }

    fn retire(&self, n: usize) {
        if n > 0 {
            self.stats.dns_upstream_sockets_retired.add(n as u64);
        }
    }

    fn expired(&self, p: &Pooled, now: Instant) -> bool {
        p.uses >= self.limits.uses || now >= p.retires
    }

    /// Closes idle sockets past their age (when the server is no longer
    /// asked, its pool would otherwise stay open until the next reload).
    pub fn sweep(&self) {
        let now = Instant::now();
        let closing: VecDeque<Pooled> = {
            let mut st = self.state();
            let (closing, kept): (VecDeque<Pooled>, VecDeque<Pooled>) = std::mem::take(&mut st.idle)
                .into_iter()
                .partition(|p| self.expired(p, now));
            st.idle = kept;
            closing
        };
        self.retire(closing.len());
    }

    fn give_back(&self, mut p: Pooled, now: Instant) {
        if p.permit.is_none() {
            return;
        }
        if now >= p.retires {
            self.retire(1);
            return;
        }
        // Used up: its port changes now, while the socket is still warm in
        // the caches, rather than closing it and opening another later.
        if p.uses >= self.limits.uses && self.rotate(&mut p, now).is_err() {
            self.retire(1);
            return;
        }
        self.state().idle.push_back(p);
    }
}

impl Lease<'_> {
    pub fn socket(&self) -> &PoolSocket {
        // Only `Drop` takes it out.
        match &self.pooled {
            Some(p) => &p.socket,
            None => unreachable!("a lease holds its socket until dropped"),
        }
    }

    /// A random query ID that differs from this socket's previous one.
    pub fn fresh_id(&mut self) -> u16 {
        let last = self.pooled.as_ref().and_then(|p| p.last_id);
        loop {
            let id: u16 = rand::random();
            if Some(id) != last {
                if let Some(p) = self.pooled.as_mut() {
                    p.last_id = Some(id);
                    p.uses += 1;
                }
                return id;
            }
        }
    }

    /// The query was answered: the socket may serve again.
    pub fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        match self.pooled.take() {
            Some(p) if self.answered => self.pool.give_back(p, self.taken),
            Some(p) if p.permit.is_some() => self.pool.retire(1),
            _ => {}
        }
    }
}

/// Reads and discards whatever waits on `socket` (datagrams, pending
/// errors), then tells the reactor it is empty, so the query's receive
/// waits for what arrives after its own send. One `recv` when there is
/// nothing, the usual case.
fn clean(socket: &PoolSocket) -> Result<Cleaned, Cleaned> {
    let sock = socket2::SockRef::from(socket.get_ref());
    // MSG_TRUNC: the datagram is consumed whatever its size.
    let mut byte = [MaybeUninit::<u8>::uninit(); 1];
    let (mut stale, mut errors) = (0, 0);
    loop {
        match sock.recv_with_flags(&mut byte, libc::MSG_DONTWAIT | libc::MSG_TRUNC) {
            Ok(_) => stale += 1,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A pending ICMP error, now cleared.
            Err(_) => errors += 1,
        }
        if stale + errors > MAX_STALE {
            return Err(Cleaned { stale, errors });
        }
    }
    // The reactor may still think the socket readable from an earlier
    // datagram; without this the query's first receive would be a wasted
    // system call. (The readiness is cleared only if nothing newer came.)
    // (`try_io`, not `poll_read_ready`: the latter answers `Pending` once
    // the task's cooperative budget is spent, which a listener driving a
    // batch of misses often has, and then cleared nothing: a fifth of the
    // queries made a wasted `recv` right after their send.)
    let _ = socket.try_io(Interest::READABLE, |_| Err::<(), _>(io::ErrorKind::WouldBlock.into()));
    Ok(Cleaned { stale, errors })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::net::{Ipv4Addr, UdpSocket as StdUdp};

    /// A stand-in server on loopback (never answers by itself).
    fn server() -> (StdUdp, SocketAddr) {
        let s = StdUdp::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = s.local_addr().unwrap();
        (s, addr)
    }

    fn pool(server: SocketAddr, limits: Limits) -> (ServerSockets, Arc<Stats>) {
        let stats = Arc::new(Stats::default());
        (ServerSockets::with_limits(server, 0, limits, stats.clone()), stats)
    }

    fn limits(reuse_distance: u64, uses: u32) -> Limits {
        Limits {
            reuse_distance,
            pick_among: 4,
            uses,
            max_age: Duration::from_secs(60),
        }
    }

    fn port(lease: &Lease<'_>) -> u16 {
        lease.socket().get_ref().local_addr().unwrap().port()
    }

    /// Takes a socket, "answers" its query and gives it back; its port.
    fn one_query(pool: &ServerSockets) -> u16 {
        let (mut lease, _) = pool.take().unwrap();
        lease.fresh_id();
        lease.answered();
        port(&lease)
    }

    #[tokio::test]
    async fn no_socket_serves_twice_within_the_reuse_distance() {
        let (_srv, addr) = server();
        let (pool, stats) = pool(addr, limits(50, 1_000));
        let ports: Vec<u16> = (0..400).map(|_| one_query(&pool)).collect();
        for window in ports.windows(50) {
            let distinct: HashSet<_> = window.iter().collect();
            assert_eq!(distinct.len(), 50, "a socket reused within 50 queries");
        }
        // ...and the pool stopped growing near the distance: sockets are
        // reused, not opened per query.
        let opened = stats.dns_upstream_sockets_opened.get();
        assert!((51..=60).contains(&opened), "{opened} sockets opened");
        assert!(pool.idle() as u64 <= opened);
    }

    #[tokio::test]
    async fn used_up_sockets_move_to_new_ports_instead_of_closing() {
        let (_srv, addr) = server();
        let (pool, stats) = pool(addr, limits(10, 4));
        let first: Vec<u16> = (0..40).map(|_| one_query(&pool)).collect();
        let later: HashSet<u16> = (0..40).map(|_| one_query(&pool)).collect();
        // Every port of the first round has been given up by the end of
        // the second: four uses each, eleven sockets.
        let third: Vec<u16> = (0..40).map(|_| one_query(&pool)).collect();
        let (first_set, third_set): (HashSet<u16>, HashSet<u16>) =
            (first.iter().copied().collect(), third.iter().copied().collect());
        assert!(
            first_set.intersection(&third_set).count() <= 1,
            "ports still in use after their four queries: {first:?} {third:?}"
        );
        assert!(later.len() >= 11);
        // No port carries more than its four queries (eight if the kernel
        // happened to draw one twice).
        let mut uses = std::collections::HashMap::<u16, u32>::new();
        for p in first.iter().chain(&third) {
            *uses.entry(*p).or_default() += 1;
        }
        assert!(uses.values().all(|&n| n <= 8), "{uses:?}");
        // The same eleven sockets did it: moved, not closed and reopened.
        assert!(stats.dns_upstream_sockets_rotated.get() >= 20);
        assert_eq!(stats.dns_upstream_sockets_retired.get(), 0);
        assert!(stats.dns_upstream_sockets_opened.get() <= 12);
    }

    #[tokio::test]
    async fn sockets_change_port_with_age_and_close_when_not_needed() {
        let (_srv, addr) = server();
        let (pool, stats) = pool(
            addr,
            Limits {
                max_age: Duration::from_millis(50),
                ..limits(0, 1_000)
            },
        );
        let a = one_query(&pool);
        assert_eq!(one_query(&pool), a, "reused while young");
        std::thread::sleep(Duration::from_millis(80));
        let b = one_query(&pool);
        assert_ne!(a, b, "an old port is replaced");
        // ...by moving the old socket, which was needed again.
        assert_eq!(stats.dns_upstream_sockets_rotated.get(), 1);
        assert_eq!(stats.dns_upstream_sockets_opened.get(), 1);
        assert_eq!(stats.dns_upstream_sockets_retired.get(), 0);
        std::thread::sleep(Duration::from_millis(80));
        pool.sweep();
        assert_eq!(pool.idle(), 0, "the sweep closes what aged while idle");
        assert_eq!(stats.dns_upstream_sockets_retired.get(), 1);
    }

    #[tokio::test]
    async fn what_waited_on_a_socket_before_its_port_changed_is_discarded() {
        let (srv, addr) = server();
        let (pool, stats) = pool(addr, limits(0, 1));
        // One use per port: the socket moves as it is given back.
        let (mut lease, _) = pool.take().unwrap();
        lease.fresh_id();
        let old = lease.socket().get_ref().local_addr().unwrap();
        // Planted on the old port while the query was in flight.
        srv.send_to(b"planted", old).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        lease.answered();
        drop(lease);
        assert_eq!(stats.dns_upstream_sockets_rotated.get(), 1);
        let (lease, cleaned) = pool.take().unwrap();
        assert_ne!(port(&lease), old.port(), "a new port");
        assert_eq!(cleaned, Cleaned { stale: 1, errors: 0 }, "emptied all the same");
        let mut buf = [0u8; 64];
        let e = lease.socket().get_ref().recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "nothing left for the query");
    }

    #[tokio::test]
    async fn past_the_budget_queries_get_one_off_sockets_and_entropy_holds() {
        let (_srv, addr) = server();
        let (mut pool, stats) = pool(addr, limits(50, 1_000));
        let budget: &'static Budget = Box::leak(Box::new(Budget {
            used: AtomicUsize::new(0),
            limit: AtomicUsize::new(10),
        }));
        pool.budget = budget;
        let ports: Vec<u16> = (0..200).map(|_| one_query(&pool)).collect();
        assert_eq!(budget.used.load(Ordering::Relaxed), 10, "the pool holds its budget");
        assert!(pool.idle() <= 10);
        // Past the budget each query takes a one-off socket, whose port the
        // kernel draws at random again, so a port may come back by chance
        // (about 49 in 28,000 per query, and the suite failed on it): the
        // entropy asked for is 90 % distinct, not all. That no pooled socket
        // serves twice within the distance is checked exactly above.
        for window in ports.windows(50) {
            let distinct: HashSet<_> = window.iter().collect();
            assert!(distinct.len() >= 45, "{} distinct ports in 50 queries", distinct.len());
        }
        assert!(stats.dns_upstream_sockets_unpooled.get() >= 150);
        drop(pool);
        assert_eq!(
            budget.used.load(Ordering::Relaxed),
            0,
            "closing the pool gives its budget back"
        );
    }

    /// The epoll event masks registered for descriptor `fd`, read from
    /// every epoll instance of this process (`/proc/self/fdinfo`).
    fn epoll_masks_of(fd: i32) -> Vec<u32> {
        let mut masks = Vec::new();
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let is_epoll = std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy() == "anon_inode:[eventpoll]");
            if !is_epoll {
                continue;
            }
            let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", entry.file_name().to_string_lossy()))
                .unwrap_or_default();
            for line in info.lines() {
                // `tfd:        9 events:       19 data: ...`
                let mut words = line.split_whitespace();
                if words.next() == Some("tfd:")
                    && words.next().and_then(|w| w.parse::<i32>().ok()) == Some(fd)
                    && words.next() == Some("events:")
                {
                    masks.extend(words.next().and_then(|w| u32::from_str_radix(w, 16).ok()));
                }
            }
        }
        masks
    }

    #[tokio::test]
    async fn pooled_sockets_are_in_the_reactor_for_reading_only() {
        use std::os::fd::AsRawFd;
        let (_srv, addr) = server();
        let (pool, _) = pool(addr, limits(0, 1_000));
        let (lease, _) = pool.take().unwrap();
        // The reactor keeps a duplicate of its epoll descriptor: the one
        // registration shows under both.
        let masks = epoll_masks_of(lease.socket().as_raw_fd());
        assert!(!masks.is_empty(), "not in the reactor");
        for mask in masks {
            assert_ne!(mask & libc::EPOLLIN as u32, 0, "{mask:x}");
            assert_eq!(mask & libc::EPOLLOUT as u32, 0, "no write interest: {mask:x}");
        }
    }

    #[tokio::test]
    async fn an_unanswered_query_closes_its_socket() {
        let (_srv, addr) = server();
        let (pool, stats) = pool(addr, limits(0, 1_000));
        let (mut lease, _) = pool.take().unwrap();
        lease.fresh_id();
        drop(lease);
        assert_eq!(pool.idle(), 0);
        assert_eq!(stats.dns_upstream_sockets_retired.get(), 1);
    }

    #[tokio::test]
    async fn what_waits_on_an_idle_socket_is_discarded_before_the_next_query() {
        let (srv, addr) = server();
        let (pool, _) = pool(addr, limits(0, 1_000));
        let (mut lease, _) = pool.take().unwrap();
        let id = lease.fresh_id();
        let local = lease.socket().get_ref().local_addr().unwrap();
        lease.answered();
        drop(lease);
        // A forged answer planted while the socket is idle (from the
        // server's own address: the only one a connected socket accepts).
        srv.send_to(b"forged answer", local).unwrap();
        srv.send_to(b"another", local).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (mut lease, cleaned) = pool.take().unwrap();
        assert_eq!(port(&lease), local.port());
        assert_eq!(cleaned, Cleaned { stale: 2, errors: 0 });
        assert_ne!(lease.fresh_id(), id, "the next ID differs from the last");
        let mut buf = [0u8; 64];
        let e = lease.socket().get_ref().recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock, "nothing left for the query");
    }

    #[tokio::test]
    async fn a_socket_aimed_at_is_replaced_and_an_icmp_error_is_cleared() {
        let (srv, addr) = server();
        let (pool, stats) = pool(addr, limits(0, 1_000));
        let local = {
            let (mut lease, _) = pool.take().unwrap();
            lease.fresh_id();
            lease.answered();
            lease.socket().get_ref().local_addr().unwrap()
        };
        for _ in 0..=MAX_STALE {
            srv.send_to(b"flood", local).unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
        let (lease, cleaned) = pool.take().unwrap();
        assert!(cleaned.stale > MAX_STALE);
        assert_ne!(port(&lease), local.port(), "a new port");
        assert_eq!(stats.dns_upstream_sockets_retired.get(), 1);
        drop(lease);

        // The server goes away: the kernel's port unreachable becomes an
        // error pending on the idle socket, cleared before the next query.
        drop(srv);
        let (mut lease, _) = pool.take().unwrap();
        lease.fresh_id();
        lease.socket().get_ref().send(b"query").unwrap();
        lease.answered();
        let local = lease.socket().get_ref().local_addr().unwrap();
        drop(lease);
        std::thread::sleep(Duration::from_millis(20));
        let (lease, cleaned) = pool.take().unwrap();
        assert_eq!(lease.socket().get_ref().local_addr().unwrap(), local, "keeps serving");
        assert_eq!(cleaned, Cleaned { stale: 0, errors: 1 });
    }
}
