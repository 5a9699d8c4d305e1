//! Flows: up to 1,000,000 concurrent flows (one client endpoint each) held
//! open through tproxyd; how fast they are set up, what they cost in memory
//! and descriptors, whether all of them still relay, and what a full table
//! does with more.
//!
//! The client side cannot hold a socket per endpoint here (the machine caps
//! a process at 20,000 descriptors), so it forges its datagrams: one raw
//! IPv4 socket (`IPPROTO_RAW`, headers written here) sends from 20 client
//! addresses × 50,000 ports in batches of [`BATCH`] with `sendmmsg`, and
//! blocks when the socket's buffer is full instead of losing datagrams. The
//! server side reads every UDP datagram to 256 server ports through a raw
//! socket, counts what arrives per flow, and echoes it (forged the same
//! way). The echoes come back through tproxyd to client ports nobody
//! listens on: a raw socket in the client namespace counts them, and both
//! end namespaces drop the ICMP errors their kernels send for unbound ports.
//!
//! Every wait is bounded (a window of flows in flight, and deadlines per
//! stage), with a progress line per stage, so the section ends in a few
//! minutes whatever the machine's load; flows not set up by a deadline are
//! reported as missing, not waited for.
//!
//! The same flows then go through the relay floor (`floor.rs`: tproxyd's
//! kernel calls per new flow and nothing else; server ports 33000–33255),
//! in a lab of its own, for its set-up rate and CPU per new flow beside
//! tproxyd's. A full table means nothing to the floor (it has none), so its
//! run ends after the second round.
//!
//! Sizes: `--quick` holds 20,000 then 50,000 flows, a full run 100,000,
//! 500,000 and 1,000,000. Knobs for profiling by hand: `BENCH_FLOWS_ONLY`
//! (`tproxyd` or `floor`: only that path), `BENCH_FLOWS_SIZES` (stages of
//! flows to hold, comma-separated, instead of the above), `BENCH_FLOWS_PERF` (a
//! directory: `perf record -g` of the relay over the set-up stages lands
//! there as `flows-tproxyd.data` or `flows-floor.data`;
//! `BENCH_FLOWS_PERF_HOW` replaces `record -q -g`, e.g. `trace -s`), and
//! `TPROXYD_BIN` (another build of the daemon, for A/B runs).

use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Options;
use crate::lab::Netns;
use crate::setup::{self, REMOTES, SERVER, sleep_ms};

/// The relay the flows go through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum System {
    #[default]
    Tproxyd,
    /// The bench's relay floor (`floor.rs`).
    Floor,
}

impl System {
    pub fn label(self) -> &'static str {
        match self {
            System::Tproxyd => "tproxyd",
            System::Floor => "relay floor",
        }
    }

    fn word(self) -> &'static str {
        match self {
            System::Tproxyd => "tproxyd",
            System::Floor => "floor",
        }
    }

    /// The first of the 256 server ports captured for this relay.
    fn first_remote(self) -> u16 {
        match self {
            System::Tproxyd => FIRST_REMOTE,
            System::Floor => setup::FLOOR_FLOWS_BASE,
        }
    }
}

/// Client addresses and ports per address: 20 × 50,000 = 1,000,000.
const PER_CLIENT_ADDRESS: usize = 50_000;
const FIRST_PORT: u16 = 10_000;
const FIRST_CLIENT: u8 = 11;
/// First server port; the flows go to `REMOTES` ports from here (all captured).
const FIRST_REMOTE: u16 = 30_000;
/// Datagrams per `sendmmsg` / `recvmmsg`.
const BATCH: usize = 64;
/// Flows sent and not yet seen by the server, at most: beyond this they
/// would only pile up in, and overflow, the listener's receive queue.
const WINDOW: u64 = 4_000;
/// Longest the sender waits for the window to open before sending on.
const WINDOW_WAIT: Duration = Duration::from_millis(50);
/// Longest one stage (a pass over some flows) may take.
const STAGE_DEADLINE: Duration = Duration::from_secs(60);
/// Passes that send again what the server has not seen (each skips the
/// flows already seen, so an empty pass costs a scan).
const RESENDS: usize = 2;
/// Flows a full table is offered from one more client.
pub const OVERFLOW: usize = 20_000;

/// Memory and descriptors with `flows` flows open.
#[derive(Debug, Clone, Default)]
pub struct Point {
    pub flows: usize,
    /// Flows the server saw by then.
    pub seen: usize,
    pub sessions: u64,
    pub rss_kib: u64,
    pub fds: usize,
    pub pool_sockets: u64,
}

impl Point {
    /// Bytes of RSS per flow over the idle daemon.
    pub fn bytes_per_flow(&self, idle_kib: u64) -> u64 {
        self.rss_kib.saturating_sub(idle_kib) * 1024 / (self.sessions.max(1))
    }
}

#[derive(Debug, Clone, Default)]
pub struct Result {
    pub system: System,
    pub flows: usize,
    /// Sessions opened while setting up all flows.
    pub opened: u64,
    /// The stages' set-up time: from a stage's first datagram until the
    /// server has seen all its flows (or given up), summed. The pauses
    /// between stages, where the bench reads memory and metrics and sends
    /// nothing, are not set-up time.
    pub setup_secs: f64,
    /// From the first stage's start to the last one's end, pauses included.
    pub setup_elapsed_secs: f64,
    /// Flows whose first datagram reached the server, and whose echo
    /// reached the client.
    pub first_seen: usize,
    pub first_replies: usize,
    /// Flows whose second datagram reached the server.
    pub second_replies: usize,
    /// Sessions opened during the second round (0: all were still there).
    pub reopened: u64,
    /// tproxyd's overload guard during the second round: datagrams it
    /// dropped (`drops_total{reason="overload"}`) and, of those, the ones
    /// its kernel filter dropped (`shed_in_kernel_total`). The round is
    /// offered as fast as one forger sends, so a flow the server never
    /// saw is most likely here; without these the figure could not say
    /// where its datagrams died. `None` for the floor, which sheds nothing.
    pub second_shed: Option<(u64, u64)>,
    pub rss_idle_kib: u64,
    pub rss_kib: u64,
    pub peak_kib: u64,
    pub fds: usize,
    pub points: Vec<Point>,
    /// A full table offered [`OVERFLOW`] flows of a new client: how many
    /// reached the server, how many flows were evicted for them, and the
    /// table's size after.
    pub overflow_seen: usize,
    pub overflow_evicted: u64,
    pub overflow_sessions: u64,
    /// The relay's CPU time (user + system) per flow set up, µs: steadier
    /// than the rate on a shared machine.
    pub cpu_us_per_flow: f64,
    /// The user-space part of it (the kernel's tick attribution).
    pub user_us_per_flow: f64,
    /// CPUs busy on the whole machine during the stages (not the pauses),
    /// of the machine's [`Result::cpus`]: whether the set-up rate is the
    /// relay's limit or the machine's.
    pub machine_busy_cpus: f64,
    pub cpus: usize,
    /// The bench's own CPU time (forger, server, echo counter) per flow
    /// set up, µs, over the same stages.
    pub bench_us_per_flow: f64,
    /// The whole section, seconds.
    pub secs: f64,
}

impl Result {
    pub fn setup_rate(&self) -> f64 {
        self.opened as f64 / self.setup_secs.max(1e-9)
    }

    /// The point holding at least `flows` flows.
    pub fn at(&self, flows: usize) -> Option<&Point> {
        self.points
            .iter()
            .find(|p| p.flows >= flows && p.seen >= flows * 99 / 100)
    }
}

fn client(i: usize) -> SocketAddrV4 {
    let ip = Ipv4Addr::new(192, 0, 2, FIRST_CLIENT + (i / PER_CLIENT_ADDRESS) as u8);
    SocketAddrV4::new(ip, FIRST_PORT + (i % PER_CLIENT_ADDRESS) as u16)
}

fn flow_of(addr: SocketAddrV4) -> Option<usize> {
    let block = usize::from(addr.ip().octets()[3].checked_sub(FIRST_CLIENT)?);
    let port = usize::from(addr.port().checked_sub(FIRST_PORT)?);
    (port < PER_CLIENT_ADDRESS).then_some(block * PER_CLIENT_ADDRESS + port)
}

fn target(first_remote: u16, i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(
        SERVER.parse().unwrap(),
        first_remote + (i % usize::from(REMOTES)) as u16,
    )
}

/// Per-flow counters, shared by the threads.
struct Counts(Vec<AtomicU8>);

impl Counts {
    fn new(n: usize) -> Arc<Counts> {
        Arc::new(Counts((0..n).map(|_| AtomicU8::new(0)).collect()))
    }
    fn bump(&self, i: usize) {
        if let Some(c) = self.0.get(i) {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_add(1));
        }
    }
    fn get(&self, i: usize) -> u8 {
        self.0.get(i).map_or(0, |c| c.load(Ordering::Relaxed))
    }
    fn at_least(&self, range: std::ops::Range<usize>, n: u8) -> usize {
        range.filter(|&i| self.get(i) >= n).count()
    }
}

/// Forged UDP over one raw IPv4 socket, `BATCH` datagrams per system call.
struct Forger {
    sock: socket2::Socket,
    packets: Vec<[u8; 36]>,
    names: Vec<libc::sockaddr_in>,
}

impl Forger {
    fn new() -> Forger {
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc::IPPROTO_RAW)),
        )
        .expect("raw socket (needs CAP_NET_RAW)");
        let _ = sock.set_send_buffer_size(8 << 20);
        Forger {
            sock,
            packets: Vec::with_capacity(BATCH),
            names: Vec::with_capacity(BATCH),
        }
    }

    /// Queues one datagram from `src` to `dst` carrying `payload`; sends
    /// when a batch is full.
    fn push(&mut self, src: SocketAddrV4, dst: SocketAddrV4, payload: [u8; 8]) {
        let mut p = [0u8; 36];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&36u16.to_be_bytes());
        p[8] = 64;
        p[9] = 17;
        p[12..16].copy_from_slice(&src.ip().octets());
        p[16..20].copy_from_slice(&dst.ip().octets());
        p[20..22].copy_from_slice(&src.port().to_be_bytes());
        p[22..24].copy_from_slice(&dst.port().to_be_bytes());
        p[24..26].copy_from_slice(&16u16.to_be_bytes());
        // UDP checksum 0: none (IPv4). The kernel fills the IP checksum and id.
        p[28..36].copy_from_slice(&payload);
        self.packets.push(p);
        // SAFETY: sockaddr_in is plain data; all-zero is a valid value.
        let mut name: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        name.sin_family = libc::AF_INET as libc::sa_family_t;
        name.sin_addr.s_addr = u32::from(*dst.ip()).to_be();
        self.names.push(name);
        if self.packets.len() == BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        let mut iovs: Vec<libc::iovec> = self
            .packets
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr().cast(),
                iov_len: p.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(self.names.iter_mut())
            .map(|(iov, name)| {
                // SAFETY: mmsghdr is plain data; all-zero is a valid value.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = (name as *mut libc::sockaddr_in).cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        let mut done = 0;
        while done < msgs.len() {
            // SAFETY: every header points at live buffers above; the socket
            // is blocking, so a full buffer waits instead of dropping.
            let sent = unsafe {
                libc::sendmmsg(
                    self.sock.as_raw_fd(),
                    msgs[done..].as_mut_ptr(),
                    (msgs.len() - done) as libc::c_uint,
                    0,
                )
            };
            if sent <= 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                break; // a datagram the kernel refuses is lost, like on a wire
            }
            done += sent as usize;
        }
        self.packets.clear();
        self.names.clear();
    }
}

/// How long a reader sleeps when its socket had less than a full batch.
const READ_PAUSE: Duration = Duration::from_micros(200);

/// Reads datagrams from `fd` in batches until `stop`, calling `each(packet,
/// source)` per datagram.
///
/// It never sleeps *in* the socket: it reads without waiting and, short of
/// a full batch, pauses [`READ_PAUSE`]. A reader asleep in `recvmmsg` is
/// woken by the next datagram, and over a veth that wake-up (an IPI on
/// this VM) runs in the sender's context: it was 10-15 % of tproxyd's CPU
/// per new flow (`sock_def_readable` under tproxyd's `sendmmsg`), the
/// bench's own readers billed to the daemon. A router's receivers are
/// woken on their own hosts.
fn read_batches(fd: i32, stop: &AtomicBool, mut each: impl FnMut(&[u8], &libc::sockaddr_in) -> bool) {
    let mut bufs = vec![[0u8; 128]; BATCH];
    let mut names: Vec<MaybeUninit<libc::sockaddr_in>> = vec![MaybeUninit::zeroed(); BATCH];
    while !stop.load(Ordering::Relaxed) {
        let mut iovs: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let mut msgs: Vec<libc::mmsghdr> = iovs
            .iter_mut()
            .zip(names.iter_mut())
            .map(|(iov, name)| {
                // SAFETY: mmsghdr is plain data; all-zero is a valid value.
                let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
                m.msg_hdr.msg_name = name.as_mut_ptr().cast();
                m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                m.msg_hdr.msg_iov = iov;
                m.msg_hdr.msg_iovlen = 1;
                m
            })
            .collect();
        // SAFETY: the headers point at the buffers above, alive for the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < BATCH as i32 {
            std::thread::sleep(READ_PAUSE);
        }
        if n <= 0 {
            continue;
        }
        for (k, m) in msgs.iter().take(n as usize).enumerate() {
            let len = (m.msg_len as usize).min(bufs[k].len());
            // SAFETY: the kernel wrote a sockaddr_in (IPv4 socket) or left
            // the zeroed one.
            let from = unsafe { names[k].assume_init_ref() };
            each(&bufs[k][..len], from);
        }
    }
}

/// A packet socket that sees every IPv4 packet arriving in this namespace
/// (not those it sends), before the IP layer: the namespace drops the
/// test's UDP at `prerouting` (see [`drop_udp_on_arrival`]), so no raw
/// socket copy, socket lookup or ICMP error is made for it. Over a veth
/// all of that would run in the *sender's* context and be billed to
/// whoever sent: tproxyd's CPU per flow, with raw sockets here, was 28 %
/// this namespace's work (the raw copies and the ICMP port unreachables).
fn raw_udp_receiver(ns: &Netns) -> socket2::Socket {
    ns.enter(|| {
        let s = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::DGRAM,
            Some(socket2::Protocol::from(i32::from((libc::ETH_P_IP as u16).to_be()))),
        )
        .expect("packet socket (needs CAP_NET_RAW)");
        let one: libc::c_int = 1;
        // SAFETY: a valid descriptor and an int option of the right size.
        let ignored = unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_IGNORE_OUTGOING,
                (&raw const one).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(ignored, 0, "PACKET_IGNORE_OUTGOING");
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let _ = s.set_recv_buffer_size(64 << 20);
        s
    })
}

/// Drops UDP to `ports` as it arrives in `ns`, before routing (the packet
/// socket above has seen it by then).
fn drop_udp_on_arrival(ns: &Netns, ports: &str) {
    ns.sh(&format!(
        "nft 'add chain inet bench pre {{ type filter hook prerouting priority -300; }}' && \
         nft add rule inet bench pre udp dport {ports} drop"
    ));
}

/// Source, destination and payload of a raw IPv4 UDP packet.
fn parse_udp(pkt: &[u8]) -> Option<(SocketAddrV4, SocketAddrV4, &[u8])> {
    let ihl = usize::from(pkt.first()? & 0x0f) * 4;
    if ihl < 20 || pkt.len() < ihl + 8 {
        return None;
    }
    let src = SocketAddrV4::new(
        Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]),
        u16::from_be_bytes([pkt[ihl], pkt[ihl + 1]]),
    );
    let dst = SocketAddrV4::new(
        Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]),
        u16::from_be_bytes([pkt[ihl + 2], pkt[ihl + 3]]),
    );
    Some((src, dst, &pkt[ihl + 8..]))
}

/// The server: counts each flow's datagrams by round, and echoes them.
///
/// It reads through a raw socket and answers through another, so that no
/// socket per server port and no conntrack entry per flow is needed (a
/// redirect folding the ports into one socket filled the namespace's
/// conntrack table at 262,144 flows and dropped the rest); the namespace
/// drops the ICMP errors its kernel sends for the unbound ports.
fn serve(
    ns: &Netns,
    first: Arc<Counts>,
    later: Arc<Counts>,
    seen: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let raw = raw_udp_receiver(ns);
    let mut echo = ns.enter(Forger::new);
    let server: Ipv4Addr = SERVER.parse().unwrap();
    std::thread::spawn(move || {
        read_batches(raw.as_raw_fd(), &stop, |pkt, _| {
            let Some((src, dst, payload)) = parse_udp(pkt) else {
                return false;
            };
            if *dst.ip() != server || payload.len() < 8 {
                return false;
            }
            let i = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
            if payload[4] == 0 { &first } else { &later }.bump(i);
            seen.fetch_add(1, Ordering::Relaxed);
            let mut back = [0u8; 8];
            back.copy_from_slice(&payload[..8]);
            echo.push(dst, src, back);
            false
        });
        echo.flush();
    })
}

/// The client's receive side: a raw socket sees every UDP echo.
fn count_echoes(ns: &Netns, echoes: Arc<Counts>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let raw = raw_udp_receiver(ns);
    std::thread::spawn(move || {
        read_batches(raw.as_raw_fd(), &stop, |pkt, _| {
            if let Some(i) = parse_udp(pkt).and_then(|(_, dst, _)| flow_of(dst)) {
                echoes.bump(i);
            }
            false
        });
    })
}

/// Sends round `round` of flows `range` (only those `pending` says), no
/// more than [`WINDOW`] ahead of what the server has seen, for at most
/// [`STAGE_DEADLINE`]. Returns how many were sent.
fn send_stage(
    forger: &mut Forger,
    first_remote: u16,
    range: std::ops::Range<usize>,
    round: u8,
    seen: &AtomicU64,
    pending: impl Fn(usize) -> bool,
) -> u64 {
    let started = Instant::now();
    let base = seen.load(Ordering::Relaxed);
    let mut sent = 0u64;
    // Datagrams given up on: lost on the way, they would hold the window
    // shut for good.
    let mut lost = 0u64;
    let outstanding = |sent: u64, lost: u64| sent.saturating_sub(lost + (seen.load(Ordering::Relaxed) - base));
    for i in range {
        if !pending(i) {
            continue;
        }
        let mut payload = [0u8; 8];
        payload[..4].copy_from_slice(&(i as u32).to_be_bytes());
        payload[4] = round;
        forger.push(client(i), target(first_remote, i), payload);
        sent += 1;
        if sent % BATCH as u64 == 0 {
            let waited = Instant::now();
            while outstanding(sent, lost) > WINDOW {
                if waited.elapsed() >= WINDOW_WAIT {
                    lost += outstanding(sent, lost) - WINDOW / 2;
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            if started.elapsed() > STAGE_DEADLINE {
                eprintln!("flows: stage deadline reached after {sent} datagrams");
                break;
            }
        }
    }
    forger.flush();
    sent
}

/// The whole machine's busy CPU time (`/proc/stat`: everything but idle
/// and iowait) and the bench's own (`/proc/self/stat`), summed over the
/// stages.
#[derive(Debug, Default, Clone, Copy)]
struct MachineCpu {
    busy_secs: f64,
    own_secs: f64,
    cpus: usize,
}

impl MachineCpu {
    fn now() -> MachineCpu {
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let tick = ticks_per_second();
        let mut m = MachineCpu::default();
        for line in stat.lines() {
            let mut fields = line.split_whitespace();
            match fields.next() {
                Some("cpu") => {
                    let v: Vec<u64> = fields.filter_map(|f| f.parse().ok()).collect();
                    // user nice system idle iowait irq softirq steal ...
                    let busy: u64 = v
                        .iter()
                        .take(8)
                        .enumerate()
                        .filter(|&(i, _)| i != 3 && i != 4)
                        .map(|(_, x)| x)
                        .sum();
                    m.busy_secs = busy as f64 / tick;
                }
                Some(c) if c.starts_with("cpu") => m.cpus += 1,
                _ => {}
            }
        }
        let (user, system) = crate::drops::cpu_split(std::process::id());
        m.own_secs = user + system;
        m
    }

    /// Adds what was used between `from` and `to`.
    fn add(&mut self, from: &MachineCpu, to: &MachineCpu) {
        self.busy_secs += to.busy_secs - from.busy_secs;
        self.own_secs += to.own_secs - from.own_secs;
        self.cpus = to.cpus;
    }
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// Waits (at most `limit`) until `done()` holds.
fn wait_until(limit: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() && Instant::now() < deadline {
        sleep_ms(20);
    }
}

fn metrics(gateway: &Netns) -> String {
    gateway.enter(setup::metrics_here)
}

/// How many flows to hold: 1,000,000, or 50,000 for a quick run, or the
/// stages `BENCH_FLOWS_SIZES` lists (e.g. `1000000`: a single stage, the
/// one memory figure of issue #11, in about 25 s instead of a full round).
fn sizes(opts: &Options) -> Vec<usize> {
    let asked: Vec<usize> = std::env::var("BENCH_FLOWS_SIZES")
        .unwrap_or_default()
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .filter(|&n| n > 0)
        .collect();
    if !asked.is_empty() {
        asked
    } else if opts.quick {
        vec![20_000, 50_000]
    } else {
        vec![100_000, 500_000, 1_000_000]
    }
}

fn config(capacity: usize) -> String {
    setup::config("").replace(
        "session_capacity = 200000",
        &format!(
            "session_capacity = {capacity}\nmax_sessions_per_client = {PER_CLIENT_ADDRESS}\n\
             new_flows_per_client = 0\nidle_timeout = \"10m\""
        ),
    )
}

/// What the relay says of its flows: (open now, opened so far, upstream
/// sockets).
fn counts(system: System, gateway: &Netns) -> (u64, u64, u64) {
    match system {
        System::Tproxyd => {
            let page = metrics(gateway);
            (
                setup::metric(&page, "tproxyd_sessions_active"),
                setup::metric(&page, "tproxyd_sessions_opened_total"),
                setup::metric(&page, "tproxyd_upstream_sockets"),
            )
        }
        System::Floor => {
            let c = gateway.enter(crate::floor::counters_here).unwrap_or_default();
            (c.flows, c.flows, c.upstreams)
        }
    }
}

/// The flows through tproxyd, then through the relay floor (those that
/// `BENCH_FLOWS_ONLY` leaves in).
pub fn run(opts: &Options) -> (Option<Result>, Option<Result>) {
    let only = std::env::var("BENCH_FLOWS_ONLY").unwrap_or_default();
    let wants = |s: System| only.is_empty() || only.split(',').any(|w| w.trim() == s.word());
    let tproxyd = wants(System::Tproxyd).then(|| run_one(opts, System::Tproxyd));
    let floor = wants(System::Floor).then(|| run_one(opts, System::Floor));
    (tproxyd, floor)
}

fn run_one(opts: &Options, system: System) -> Result {
    let section = Instant::now();
    let first_remote = system.first_remote();
    let stages = sizes(opts);
    let n = *stages.last().unwrap_or(&100_000);
    let lab = setup::lab();
    let addresses = n.div_ceil(PER_CLIENT_ADDRESS) + 1; // one more for the overflow
    for a in 0..addresses {
        lab.add_client_address(IpAddr::V4(Ipv4Addr::new(192, 0, 2, FIRST_CLIENT + a as u8)));
    }
    // Room at the test's own endpoints, so that what is lost is lost in
    // the gateway.
    for ns in [&lab.client, &lab.servers[0]] {
        ns.sh("sysctl -qw net.core.rmem_max=67108864 net.core.wmem_max=33554432");
    }
    lab.client.sh("nft add table inet bench && \
         nft 'add chain inet bench out { type filter hook output priority 0; }' && \
         nft add rule inet bench out icmp type destination-unreachable drop");
    lab.servers[0].sh("nft add table inet bench && \
         nft 'add chain inet bench out { type filter hook output priority 0; }' && \
         nft add rule inet bench out icmp type destination-unreachable drop");
    drop_udp_on_arrival(
        &lab.client,
        &format!("{FIRST_PORT}-{}", FIRST_PORT as usize + PER_CLIENT_ADDRESS - 1),
    );
    drop_udp_on_arrival(
        &lab.servers[0],
        &format!("{first_remote}-{}", first_remote + REMOTES - 1),
    );
    let total = n + OVERFLOW;
    let (first, later, echoes) = (Counts::new(total), Counts::new(total), Counts::new(total));
    let stop = Arc::new(AtomicBool::new(false));
    // Datagrams the server has seen, for the sender's window.
    let seen = Arc::new(AtomicU64::new(0));
    let threads = vec![
        serve(
            &lab.servers[0],
            first.clone(),
            later.clone(),
            seen.clone(),
            stop.clone(),
        ),
        count_echoes(&lab.client, echoes.clone(), stop.clone()),
    ];
    let (daemon, pid) = match system {
        System::Tproxyd => {
            let d = lab.start_tproxyd(&config(n));
            let pid = d.pid();
            (Some(d), pid)
        }
        System::Floor => (None, setup::floor(&lab, &[])),
    };
    sleep_ms(500);
    let (rss_idle_kib, _) = setup::rss_kib(pid);
    let gateway = Netns {
        name: lab.gateway.name.clone(),
    };
    // A socket stays in the namespace it was made in: the forger sends
    // from the client namespace whichever thread uses it.
    let mut forger = lab.client.enter(Forger::new);
    let mut r = Result {
        system,
        flows: n,
        rss_idle_kib,
        ..Result::default()
    };

    // Set-up, in stages; memory at the end of each.
    let perf = std::env::var("BENCH_FLOWS_PERF").ok().map(|dir| {
        let how = std::env::var("BENCH_FLOWS_PERF_HOW").unwrap_or_else(|_| "record -q -g".into());
        std::process::Command::new("perf")
            .args(how.split_whitespace())
            .args([
                "-p",
                &pid.to_string(),
                "-o",
                &format!("{dir}/flows-{}.data", system.word()),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("perf")
    });
    let started = Instant::now();
    let cpu_before = crate::drops::cpu_split(pid);
    let mut from = 0;
    let mut setting_up = 0.0;
    let mut machine = MachineCpu::default();
    for &upto in &stages {
        let t = Instant::now();
        let stage_start = MachineCpu::now();
        let mut sent = send_stage(&mut forger, first_remote, from..upto, 0, &seen, |_| true);
        // What the listener's queue dropped is sent again, as a client would.
        for _ in 0..RESENDS {
            wait_until(Duration::from_secs(2), || first.at_least(from..upto, 1) == upto - from);
            sent += send_stage(&mut forger, first_remote, from..upto, 0, &seen, |i| first.get(i) == 0);
        }
        wait_until(Duration::from_secs(3), || first.at_least(from..upto, 1) == upto - from);
        let secs = t.elapsed().as_secs_f64();
        machine.add(&stage_start, &MachineCpu::now());
        setting_up += secs;
        sleep_ms(300);
        let (sessions, _, pool_sockets) = counts(system, &gateway);
        let point = Point {
            flows: upto,
            seen: first.at_least(0..upto, 1),
            sessions,
            rss_kib: setup::rss_kib(pid).0,
            fds: setup::fds(pid),
            pool_sockets,
        };
        eprintln!(
            "flows ({}): {} of {} seen at the server ({} sent, {:.1} s, {:.0}/s); {} sessions, RSS {:.1} MiB ({} B/flow), {} fds, {} pool sockets",
            system.label(),
            point.seen,
            upto,
            sent,
            secs,
            (upto - from) as f64 / secs.max(1e-9),
            point.sessions,
            point.rss_kib as f64 / 1024.0,
            point.bytes_per_flow(rss_idle_kib),
            point.fds,
            point.pool_sockets
        );
        r.points.push(point);
        from = upto;
    }
    let cpu_after = crate::drops::cpu_split(pid);
    if let Some(mut p) = perf {
        // SIGINT: perf writes its file and ends.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = p.wait();
    }
    r.setup_secs = setting_up;
    r.setup_elapsed_secs = started.elapsed().as_secs_f64();
    r.opened = counts(system, &gateway).1;
    let per_flow = |secs: f64| secs * 1e6 / r.opened.max(1) as f64;
    r.cpu_us_per_flow = per_flow((cpu_after.0 + cpu_after.1) - (cpu_before.0 + cpu_before.1));
    r.user_us_per_flow = per_flow(cpu_after.0 - cpu_before.0);
    r.cpus = machine.cpus;
    r.machine_busy_cpus = machine.busy_secs / setting_up.max(1e-9);
    r.bench_us_per_flow = per_flow(machine.own_secs);
    r.first_seen = first.at_least(0..n, 1);
    wait_until(Duration::from_secs(2), || echoes.at_least(0..n, 1) >= r.first_seen);
    r.first_replies = echoes.at_least(0..n, 1);
    (r.rss_kib, r.peak_kib) = setup::rss_kib(pid);
    r.fds = setup::fds(pid);

    // All of them still relay, through the sessions already open: one more
    // datagram each (resent once where the server saw nothing), and not one
    // new session may appear.
    let shed = |page: &str| {
        (
            setup::metric(page, "tproxyd_drops_total{reason=\"overload\"}"),
            setup::metric(page, "tproxyd_shed_in_kernel_total"),
        )
    };
    let shed_before = (system == System::Tproxyd).then(|| shed(&metrics(&gateway)));
    let t = Instant::now();
    send_stage(&mut forger, first_remote, 0..n, 1, &seen, |_| true);
    for _ in 0..RESENDS {
        wait_until(Duration::from_secs(2), || later.at_least(0..n, 1) == n);
        send_stage(&mut forger, first_remote, 0..n, 1, &seen, |i| later.get(i) == 0);
    }
    wait_until(Duration::from_secs(3), || later.at_least(0..n, 1) == n);
    r.second_replies = later.at_least(0..n, 1);
    r.reopened = counts(system, &gateway).1.saturating_sub(r.opened);
    r.second_shed = shed_before.map(|(dropped, in_kernel)| {
        let (d, k) = shed(&metrics(&gateway));
        (d.saturating_sub(dropped), k.saturating_sub(in_kernel))
    });
    eprintln!(
        "flows ({}): second round: {} of {n} seen at the server in {:.1} s, {} sessions reopened{}",
        system.label(),
        r.second_replies,
        t.elapsed().as_secs_f64(),
        r.reopened,
        r.second_shed
            .map(|(d, k)| format!(", {d} datagrams shed ({k} in the kernel)"))
            .unwrap_or_default()
    );

    if system == System::Tproxyd {
        // The table is full: one more client's flows take the heaviest
        // clients' oldest.
        let evicted_before = setup::metric(
            &metrics(&gateway),
            "tproxyd_sessions_evicted_total{reason=\"table_full\"}",
        );
        send_stage(&mut forger, first_remote, n..total, 0, &seen, |_| true);
        for _ in 0..RESENDS {
            wait_until(Duration::from_secs(2), || first.at_least(n..total, 1) == OVERFLOW);
            send_stage(&mut forger, first_remote, n..total, 0, &seen, |i| first.get(i) == 0);
        }
        wait_until(Duration::from_secs(3), || first.at_least(n..total, 1) == OVERFLOW);
        let page = metrics(&gateway);
        r.overflow_seen = first.at_least(n..total, 1);
        r.overflow_evicted = setup::metric(&page, "tproxyd_sessions_evicted_total{reason=\"table_full\"}")
            .saturating_sub(evicted_before);
        r.overflow_sessions = setup::metric(&page, "tproxyd_sessions_active");
        eprintln!(
            "flows: full table: {} of {OVERFLOW} new flows seen at the server, {} evicted, {} sessions, RSS {:.1} MiB",
            r.overflow_seen,
            r.overflow_evicted,
            r.overflow_sessions,
            setup::rss_kib(pid).0 as f64 / 1024.0
        );
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    drop(daemon);
    if system == System::Floor {
        lab.kill(pid);
    }
    r.secs = section.elapsed().as_secs_f64();
    eprintln!(
        "flows ({}): machine {:.2} of {} CPUs busy during set-up; the bench's own threads {:.1} µs of CPU per flow",
        system.label(),
        r.machine_busy_cpus,
        r.cpus,
        r.bench_us_per_flow
    );
    eprintln!(
        "flows ({}) {} opened {} in {:.2} s of set-up ({:.2} s with pauses; {:.0}/s, {:.1} µs of CPU each, {:.1} of it user), server saw {} then {} (reopened {}), echoes {}, RSS {} KiB (idle {}), fds {}; section {:.0} s",
        system.label(),
        r.flows,
        r.opened,
        r.setup_secs,
        r.setup_elapsed_secs,
        r.setup_rate(),
        r.cpu_us_per_flow,
        r.user_us_per_flow,
        r.first_seen,
        r.second_replies,
        r.reopened,
        r.first_replies,
        r.rss_kib,
        r.rss_idle_kib,
        r.fds,
        r.secs
    );
    r
}
