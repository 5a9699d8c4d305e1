//! The relay floor: the least a user-space UDP relay can do on tproxyd's
//! kernel path, as a baseline for the bench. Not part of the daemon.
//!
//! It makes the kernel calls tproxyd's fast path makes, through the same
//! functions of the tproxyd library, and nothing else:
//!
//! * it receives through **TPROXY** on transparent listeners (an
//!   `SO_REUSEPORT` group of 8, each with its share of 4 MiB, original
//!   destination, TOS and `UDP_GRO` reported), so the captured datagrams
//!   cross the same netfilter rules, socket lookup and control messages as
//!   tproxyd's;
//! * it reads with `recvmmsg` (64 slots of 64 KiB, at most 4 batches per
//!   socket and turn) and sends with `sendmmsg`, consecutive datagrams of
//!   one flow as one GSO train (`net::send::gso_chunks`);
//! * forward, it sends from an unconnected, marked upstream socket with a
//!   4 MiB receive buffer (a pool socket) that flows to different
//!   destinations share, as tproxyd's pools do; reverse, it reads that
//!   socket and sends from a transparent socket bound to the server's
//!   address (a reply socket), except that a reply alone from its address
//!   in a batch from several addresses goes over raw IP, all of a batch's
//!   such replies in one `sendmmsg` (`net::raw::RawBatch`), as tproxyd's
//!   `ReplySender::send_pending` does;
//! * it waits in `epoll_wait`, one thread, level-triggered.
//!
//! What it leaves out is everything tproxyd does besides: rules, a session
//! table with expiry, quotas and LRU, counters per datagram, the async
//! runtime, the open backlog. A flow is two hash-map entries that never
//! expire (client and destination to an upstream socket, and the server's
//! address on that socket back to the client); it is a bench tool for a
//! lab, not a relay to run anywhere else.
//!
//! A new flow costs it those two entries and a third that says how many
//! upstream sockets already talk to its destination: sockets are taken in
//! the order they were opened and never given back, so the next free one
//! for a destination is the one after them (O(1), a million flows in the
//! flows section), and a new socket is opened when there is none.
//!
//! Variants for the attribution (`--threads 2`: forward and reverse on a
//! thread each; `--busy`: never sleep, poll with a zero timeout;
//! `--timeout-ms N`: sleep with a timeout, as tokio's driver does).
//!
//! Its counters are read over UDP: any datagram to the stats address is
//! answered with `to_upstream N to_client N drops N errors N unreachable N
//! flows N upstreams N`.

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tproxyd::net::raw::{RawBatch, RawSender};
use tproxyd::net::recv::{BATCH, RecvBatch, segments};
use tproxyd::net::send::{GSO_MAX_SEGMENTS, Message, SendScratch, gso_chunks, send_messages};
use tproxyd::net::sockets;

/// The floor's relay port in the bench lab (tproxyd's is 15353).
pub const PORT: u16 = 15354;
/// Where the floor answers for its counters (in the gateway namespace).
pub const STATS: &str = "127.0.0.1:9154";
/// The first argument that makes the bench binary run the floor.
pub const COMMAND: &str = "relay-floor";
/// tproxyd's defaults: `receive_buffer` and `listener_sockets`.
const RECEIVE_BUFFER: usize = 4 << 20;
const MEMBERS: usize = 8;
/// Batches read from one socket per turn (tproxyd's `TURN_BATCHES`).
const TURN_BATCHES: usize = 4;

/// How the floor runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub mark: u32,
    pub threads: usize,
    pub busy: bool,
    /// `epoll_wait`'s timeout when it sleeps (`--timeout-ms`, -1: none), to
    /// tell what arming a timer around every sleep costs, as tokio does.
    pub timeout_ms: i32,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options, String> {
        let mut o = Options {
            listen: SocketAddr::from(([0, 0, 0, 0], PORT)),
            mark: 255,
            threads: 1,
            busy: false,
            timeout_ms: -1,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = || it.next().cloned().ok_or(format!("{a} needs a value"));
            match a.as_str() {
                "--listen" => o.listen = value()?.parse().map_err(|e| format!("--listen: {e}"))?,
                "--mark" => o.mark = value()?.parse().map_err(|e| format!("--mark: {e}"))?,
                "--threads" => o.threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
                "--busy" => o.busy = true,
                "--timeout-ms" => o.timeout_ms = value()?.parse().map_err(|e| format!("--timeout-ms: {e}"))?,
                other => return Err(format!("unknown argument {other:?}")),
            }
        }
        if !(1..=2).contains(&o.threads) {
            return Err("--threads is 1 or 2".into());
        }
        Ok(o)
    }
}

/// Counters, read by the stats socket.
#[derive(Default)]
struct Counters {
    to_upstream: AtomicU64,
    to_client: AtomicU64,
    /// Datagrams with no original destination, or replies no flow claims.
    drops: AtomicU64,
    /// Datagrams a send refused.
    errors: AtomicU64,
    /// ICMP errors read from upstream sockets' error queues.
    unreachable: AtomicU64,
    /// Flows seen, and upstream sockets opened for them.
    flows: AtomicU64,
    upstreams: AtomicU64,
}

/// One upstream socket and the servers it talks to, each for one client.
struct Upstream {
    socket: UdpSocket,
    clients: HashMap<SocketAddr, SocketAddr>,
}

/// Every flow the floor has seen; nothing expires.
#[derive(Default)]
struct Flows {
    /// (client, destination) → index in `upstreams`.
    by_flow: HashMap<(SocketAddr, SocketAddr), usize>,
    upstreams: Vec<Upstream>,
    /// Indices in `upstreams` of the IPv4 and the IPv6 sockets, in the
    /// order they were opened.
    by_family: [Vec<usize>; 2],
    /// Destination → how many sockets of its family talk to it (the first
    /// that many of `by_family`).
    holders: HashMap<SocketAddr, usize>,
    /// Upstream descriptor → index in `upstreams`.
    by_fd: HashMap<RawFd, usize>,
    /// Reply sockets by the address they send from.
    replies: HashMap<SocketAddr, UdpSocket>,
}

struct Shared {
    opts: Options,
    flows: Mutex<Flows>,
    counters: Counters,
    /// Where new upstream sockets are watched (the reverse thread's epoll).
    reverse_epoll: RawFd,
    /// Raw IP for the replies alone from their address in a batch.
    raw: RawSender,
}

/// Token of the stats socket in an epoll set; listeners are 0..MEMBERS,
/// upstream sockets their descriptor + UPSTREAM.
const STATS_TOKEN: u64 = u64::MAX;
const UPSTREAM: u64 = 1 << 32;

/// Runs the floor with `args` (after [`COMMAND`]); returns only on a
/// start-up error.
pub fn main(args: &[String]) -> i32 {
    let opts = match Options::parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("relay floor: {e}");
            return 2;
        }
    };
    match run(opts) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("relay floor: {e}");
            1
        }
    }
}

fn epoll() -> io::Result<RawFd> {
    // SAFETY: plain system call; the result is checked.
    let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(fd)
    }
}

fn watch(epoll: RawFd, fd: RawFd, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: `ev` is valid for the call; the kernel copies it.
    if unsafe { libc::epoll_ctl(epoll, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn run(opts: Options) -> io::Result<()> {
    let share = (RECEIVE_BUFFER / MEMBERS).max(256 << 10);
    let listeners: Vec<UdpSocket> = (0..MEMBERS)
        .map(|_| sockets::transparent_listener(opts.listen, share, true))
        .collect::<io::Result<_>>()?;
    let stats = UdpSocket::bind(STATS)?;
    stats.set_nonblocking(true)?;
    let forward = epoll()?;
    let reverse = if opts.threads == 2 { epoll()? } else { forward };
    for (i, l) in listeners.iter().enumerate() {
        watch(forward, l.as_raw_fd(), i as u64)?;
    }
    watch(forward, stats.as_raw_fd(), STATS_TOKEN)?;
    let opts_mark = opts.mark;
    let shared = Arc::new(Shared {
        opts,
        flows: Mutex::new(Flows::default()),
        counters: Counters::default(),
        reverse_epoll: reverse,
        raw: RawSender::new(opts_mark),
    });
    if reverse != forward {
        let s = shared.clone();
        std::thread::spawn(move || serve(&s, reverse, &[], None));
    }
    serve(&shared, forward, &listeners, Some(&stats));
    Ok(())
}

/// One thread's loop: wait, then give every ready socket its turn.
fn serve(shared: &Shared, epoll: RawFd, listeners: &[UdpSocket], stats: Option<&UdpSocket>) {
    let mut events: Vec<libc::epoll_event> = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut batch = RecvBatch::new(BATCH);
    let mut scratch = SendScratch::default();
    let mut rev = ReverseScratch::default();
    let timeout = if shared.opts.busy { 0 } else { shared.opts.timeout_ms };
    loop {
        // SAFETY: `events` has room for its length; the kernel writes at
        // most that many.
        let n = unsafe { libc::epoll_wait(epoll, events.as_mut_ptr(), events.len() as i32, timeout) };
        if n < 0 {
            continue; // EINTR
        }
        for ev in &events[..n as usize] {
            let token = ev.u64;
            if token == STATS_TOKEN {
                if let Some(s) = stats {
                    answer_stats(s, &shared.counters);
                }
            } else if token >= UPSTREAM {
                let fd = (token - UPSTREAM) as RawFd;
                if ev.events & libc::EPOLLERR as u32 != 0 {
                    // An ICMP error (a server port closed after a run):
                    // level-triggered, it is named until read, as tproxyd
                    // reads it.
                    let n = sockets::drain_error_queue(fd);
                    shared.counters.unreachable.fetch_add(n as u64, Ordering::Relaxed);
                }
                turn(fd, &mut batch, |batch| {
                    reverse_batch(shared, fd, batch, &mut scratch, &mut rev)
                });
            } else if let Some(l) = listeners.get(token as usize) {
                let local = shared.opts.listen;
                turn(l.as_raw_fd(), &mut batch, |batch| {
                    forward_batch(shared, local, batch, &mut scratch)
                });
            }
        }
    }
}

/// Reads up to [`TURN_BATCHES`] batches from `fd`, handing each to `relay`,
/// until a batch comes back short (the queue is empty).
fn turn(fd: RawFd, batch: &mut RecvBatch, mut relay: impl FnMut(&RecvBatch)) {
    for _ in 0..TURN_BATCHES {
        match batch.recv_at_most(fd, BATCH) {
            Ok(n) => {
                relay(batch);
                if n < BATCH {
                    return;
                }
            }
            // Empty, or an ICMP error of an earlier send: read next turn.
            Err(_) => return,
        }
    }
}

fn answer_stats(s: &UdpSocket, c: &Counters) {
    let mut buf = [0u8; 64];
    while let Ok((_, from)) = s.recv_from(&mut buf) {
        let text = format!(
            "to_upstream {} to_client {} drops {} errors {} unreachable {} flows {} upstreams {}",
            c.to_upstream.load(Ordering::Relaxed),
            c.to_client.load(Ordering::Relaxed),
            c.drops.load(Ordering::Relaxed),
            c.errors.load(Ordering::Relaxed),
            c.unreachable.load(Ordering::Relaxed),
            c.flows.load(Ordering::Relaxed),
            c.upstreams.load(Ordering::Relaxed),
        );
        let _ = s.send_to(text.as_bytes(), from);
    }
}

/// A run of consecutive datagrams for one socket and destination.
struct Run {
    fd: RawFd,
    to: SocketAddr,
    tos: Option<u8>,
    start: usize,
    len: usize,
}

/// Sends `runs` (of `payloads`), one `sendmmsg` per socket, the runs of a
/// socket in the order they came; returns datagrams sent and refused.
fn send_runs(runs: &mut [Run], payloads: &[&[u8]], scratch: &mut SendScratch) -> (u64, u64) {
    runs.sort_by_key(|r| r.fd); // stable: keeps each socket's order
    let (mut sent, mut failed) = (0, 0);
    let mut messages: Vec<Message<'_>> = Vec::with_capacity(runs.len());
    let mut rest = &runs[..];
    while let Some(first) = rest.first() {
        let n = rest.iter().take_while(|r| r.fd == first.fd).count();
        let (group, tail) = rest.split_at(n);
        rest = tail;
        messages.clear();
        let v6 = first.to.is_ipv6();
        for r in group {
            let run = &payloads[r.start..r.start + r.len];
            messages.extend(gso_chunks(run, v6, GSO_MAX_SEGMENTS).map(|segments| Message {
                to: Some(r.to),
                tos: r.tos,
                segments,
            }));
        }
        let s = send_messages(first.fd, &messages, v6, scratch, false);
        sent += s.datagrams as u64;
        failed += (s.full + s.failed) as u64;
    }
    (sent, failed)
}

/// Client datagrams of one batch: each run of one flow to its upstream
/// socket, as one GSO train where sizes allow.
fn forward_batch(shared: &Shared, local: SocketAddr, batch: &RecvBatch, scratch: &mut SendScratch) {
    let mut payloads: Vec<&[u8]> = Vec::with_capacity(BATCH);
    let mut runs: Vec<Run> = Vec::new();
    let mut last: Option<(SocketAddr, SocketAddr, Option<u8>)> = None;
    let mut drops = 0;
    for i in 0..batch.len() {
        let Some((meta, payload)) = batch.get(i) else { continue };
        let Some(dst) = meta.orig_dst.filter(|d| *d != local) else {
            drops += 1;
            continue;
        };
        if last != Some((meta.peer, dst, meta.tos)) {
            match upstream_for(shared, meta.peer, dst) {
                Ok(fd) => runs.push(Run {
                    fd,
                    to: dst,
                    tos: meta.tos,
                    start: payloads.len(),
                    len: 0,
                }),
                Err(_) => {
                    drops += 1;
                    last = None;
                    continue;
                }
            }
            last = Some((meta.peer, dst, meta.tos));
        }
        let before = payloads.len();
        payloads.extend(segments(payload, meta.segment));
        if let Some(r) = runs.last_mut() {
            r.len += payloads.len() - before;
        }
    }
    let (sent, failed) = send_runs(&mut runs, &payloads, scratch);
    let c = &shared.counters;
    c.to_upstream.fetch_add(sent, Ordering::Relaxed);
    c.errors.fetch_add(failed, Ordering::Relaxed);
    c.drops.fetch_add(drops, Ordering::Relaxed);
}

/// The upstream socket of the flow `client` → `dst`: the first socket not
/// yet talking to `dst` for another client, or a new one.
fn upstream_for(shared: &Shared, client: SocketAddr, dst: SocketAddr) -> io::Result<RawFd> {
    let mut flows = shared.flows.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&i) = flows.by_flow.get(&(client, dst)) {
        return Ok(flows.upstreams[i].socket.as_raw_fd());
    }
    let family = usize::from(dst.is_ipv6());
    let held = flows.holders.get(&dst).copied().unwrap_or(0);
    let i = match flows.by_family[family].get(held) {
        Some(&i) => i,
        None => {
            let socket = sockets::flow_upstream(dst, None, shared.opts.mark, None)?;
            sockets::report_errors(&socket, dst.is_ipv6())?;
            sockets::set_udp_receive_buffer(&socket, RECEIVE_BUFFER);
            let fd = socket.as_raw_fd();
            watch(shared.reverse_epoll, fd, UPSTREAM + fd as u64)?;
            flows.upstreams.push(Upstream {
                socket,
                clients: HashMap::new(),
            });
            let i = flows.upstreams.len() - 1;
            flows.by_fd.insert(fd, i);
            flows.by_family[family].push(i);
            shared.counters.upstreams.fetch_add(1, Ordering::Relaxed);
            i
        }
    };
    flows.upstreams[i].clients.insert(dst, client);
    flows.by_flow.insert((client, dst), i);
    flows.holders.insert(dst, held + 1);
    shared.counters.flows.fetch_add(1, Ordering::Relaxed);
    Ok(flows.upstreams[i].socket.as_raw_fd())
}

/// What the reverse path keeps from batch to batch.
#[derive(Default)]
struct ReverseScratch {
    /// (server, position in the batch) of the batch's datagrams.
    order: Vec<(SocketAddr, usize)>,
    /// Replies alone from their address, sent together over raw IP.
    raw: RawBatch,
}

/// Server datagrams of one batch from upstream socket `fd`: each server's
/// datagrams to its client from a socket bound to the server's address,
/// one `sendmmsg` per such socket, except that a reply alone from its
/// address in a batch from several addresses joins the batch's raw-IP
/// replies (one `sendmmsg`), as tproxyd's `ReplySender::send_pending`
/// sends them. In the flows section every echo of a batch comes from
/// another of 256 server ports: through reply sockets that would be a
/// system call per flow, which tproxyd does not pay.
fn reverse_batch(shared: &Shared, fd: RawFd, batch: &RecvBatch, scratch: &mut SendScratch, rev: &mut ReverseScratch) {
    let mut payloads: Vec<&[u8]> = Vec::with_capacity(BATCH);
    let mut runs: Vec<Run> = Vec::new();
    let mut drops = 0;
    rev.order.clear();
    rev.order
        .extend((0..batch.len()).filter_map(|k| Some((batch.get(k)?.0.peer, k))));
    // By server, then arrival: a server's datagrams keep their order.
    rev.order.sort_unstable();
    let sources = 1 + rev.order.windows(2).filter(|w| w[0].0 != w[1].0).count();
    {
        let mut flows = shared.flows.lock().unwrap_or_else(|e| e.into_inner());
        let Some(&i) = flows.by_fd.get(&fd) else { return };
        let mut rest = &rev.order[..];
        while let Some(&(peer, first)) = rest.first() {
            let n = rest.iter().take_while(|o| o.0 == peer).count();
            let (group, tail) = rest.split_at(n);
            rest = tail;
            let Some(&client) = flows.upstreams[i].clients.get(&peer) else {
                drops += n as u64;
                continue;
            };
            if n == 1 && sources > 1 {
                if let Some((meta, payload)) = batch.get(first) {
                    let one = segments(payload, meta.segment).nth(1).is_none();
                    if one
                        && shared.raw.available(peer.is_ipv6())
                        && rev.raw.push(peer, client, payload, meta.tos.unwrap_or(0))
                    {
                        continue;
                    }
                }
            }
            let reply = match flows.replies.get(&peer) {
                Some(s) => s.as_raw_fd(),
                None => match sockets::spoofing_reply(peer, shared.opts.mark) {
                    Ok(s) => {
                        let r = s.as_raw_fd();
                        flows.replies.insert(peer, s);
                        r
                    }
                    Err(_) => {
                        drops += n as u64;
                        continue;
                    }
                },
            };
            let mut last_tos = None;
            for &(_, k) in group {
                let Some((meta, payload)) = batch.get(k) else { continue };
                if last_tos != Some(meta.tos) {
                    runs.push(Run {
                        fd: reply,
                        to: client,
                        tos: meta.tos,
                        start: payloads.len(),
                        len: 0,
                    });
                    last_tos = Some(meta.tos);
                }
                let before = payloads.len();
                payloads.extend(segments(payload, meta.segment));
                if let Some(r) = runs.last_mut() {
                    r.len += payloads.len() - before;
                }
            }
        }
    }
    let (mut sent, mut failed) = send_runs(&mut runs, &payloads, scratch);
    if !rev.raw.is_empty() {
        let s = shared.raw.send_batch(&mut rev.raw);
        sent += s.datagrams as u64;
        failed += (s.full + s.failed) as u64;
    }
    let c = &shared.counters;
    c.to_client.fetch_add(sent, Ordering::Relaxed);
    c.errors.fetch_add(failed, Ordering::Relaxed);
    c.drops.fetch_add(drops, Ordering::Relaxed);
}

/// The floor's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct FloorCounters {
    pub to_upstream: u64,
    pub to_client: u64,
    pub drops: u64,
    pub errors: u64,
    /// Flows seen so far, and the upstream sockets they took.
    pub flows: u64,
    pub upstreams: u64,
}

/// The floor's counters, asked from a thread in its namespace.
pub fn counters_here() -> Option<FloorCounters> {
    let s = UdpSocket::bind("127.0.0.1:0").ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_millis(500))).ok()?;
    s.send_to(b"?", STATS).ok()?;
    let mut buf = [0u8; 256];
    let n = s.recv(&mut buf).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let v: Vec<u64> = text
        .split_whitespace()
        .skip(1)
        .step_by(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    match v[..] {
        [to_upstream, to_client, drops, errors, _, flows, upstreams] => Some(FloorCounters {
            to_upstream,
            to_client,
            drops,
            errors,
            flows,
            upstreams,
        }),
        _ => None,
    }
}
