//! Load for the abuse tests: many flows from few sockets, a steady probe
//! flow that measures round trips, servers that answer late or not at all,
//! all as plain threads and sockets (no process per flow).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::udp::{Echo, socket};
use super::{Lab, Netns};

/// Server 0's second address, which the redirect rules leave alone (install
/// them with `BYPASS4=198.51.100.8/32`): flows to it are forwarded by the
/// kernel, not relayed.
pub const FORWARDED: &str = "198.51.100.8";

/// Makes [`FORWARDED`] reachable by plain kernel forwarding: the address on
/// server 0, and a route back to the clients there. A flow to it is the
/// control a relayed flow is compared with, measured at the same time on
/// the same links and CPUs: what the abuse and the machine's load cost it
/// is not tproxyd's doing.
pub fn forwarded_control(lab: &Lab) {
    lab.add_server_address(0, FORWARDED.parse().unwrap());
    lab.servers[0].sh("ip route replace 192.0.2.0/24 via 198.51.100.1");
}

/// In `ns`, sends UDP to ports `first..=last` of any address to `to_port`
/// instead (conntrack answers from the port asked), so one server socket
/// stands for thousands of destinations.
pub fn fold_ports(ns: &Netns, first: u16, last: u16, to_port: u16) {
    ns.sh(&format!(
        "nft add table ip fold
         nft add chain ip fold pre '{{ type nat hook prerouting priority -100; }}'
         nft add rule ip fold pre udp dport {first}-{last} redirect to :{to_port}"
    ));
}

/// The abuse lab: nft redirect rules that leave [`FORWARDED`] alone, a
/// server that answers UDP on every port of `first..=last` through one
/// socket (see [`fold_ports`]) on port 7000, a plain echo on port 6000 for
/// probes, and the same echo on [`FORWARDED`] for control flows the kernel
/// forwards. Returns the lab and those three echoes (folded, probe,
/// control). `extra_clients` are more client addresses.
pub fn folded_lab(first: u16, last: u16, extra_clients: &[&str]) -> (Lab, Echo, Echo, Echo) {
    let lab = Lab::new();
    for c in extra_clients {
        lab.add_client_address(c.parse().unwrap_or_else(|e| panic!("client address {c}: {e}")));
    }
    lab.install_rules("nft", &format!("LAN_IF=lan0 BYPASS4={FORWARDED}/32"));
    forwarded_control(&lab);
    // Room for bursts at the lab's own endpoints, so what is lost is lost
    // in the gateway.
    for ns in [&lab.client, &lab.servers[0]] {
        ns.sh("sysctl -qw net.core.rmem_max=33554432 net.core.wmem_max=33554432 net.core.rmem_default=4194304");
    }
    fold_ports(&lab.servers[0], first, last, 7000);
    let server = super::server4(0);
    let folded = Echo::start(&lab.servers[0], SocketAddr::new(server, 7000));
    let probe = Echo::start(&lab.servers[0], SocketAddr::new(server, 6000));
    let control = Echo::start(&lab.servers[0], SocketAddr::new(FORWARDED.parse().unwrap(), 6000));
    (lab, folded, probe, control)
}

/// A socket with large buffers, for senders of many datagrams.
pub fn big_socket(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let s = socket(ns, addr);
    let sock = socket2::SockRef::from(&s);
    let _ = sock.set_recv_buffer_size(16 << 20);
    let _ = sock.set_send_buffer_size(4 << 20);
    s
}

/// First client port of the flood helpers' sockets.
const FLOOD_PORT: u16 = 42_000;

/// A flood of new flows in the background, one socket after another:
/// `sockets` sockets of `client` (ports 42000 on) each send to `ports`
/// ports of `server` from `first`, at `per_sec` datagrams a second. The
/// thread returns how long the flood took.
pub fn flood_in_turn(
    ns: &Netns,
    client: IpAddr,
    sockets: usize,
    server: IpAddr,
    (first, ports): (u16, usize),
    per_sec: usize,
) -> JoinHandle<Duration> {
    let socks = flood_sockets(ns, client, sockets);
    std::thread::spawn(move || {
        let start = Instant::now();
        for s in &socks {
            send_paced(
                s,
                ports,
                per_sec,
                |i| SocketAddr::new(server, first + i as u16),
                |_| b"flood".to_vec(),
            );
        }
        start.elapsed()
    })
}

/// The same flood, round-robin over its sockets 40 ports at a time, so
/// that every socket keeps opening flows; datagrams are lost silently
/// when a send buffer is full.
pub fn flood_round_robin(
    ns: &Netns,
    client: IpAddr,
    sockets: usize,
    server: IpAddr,
    (first, ports): (u16, usize),
    per_sec: usize,
) -> JoinHandle<Duration> {
    let socks = flood_sockets(ns, client, sockets);
    let pace = Duration::from_nanos(1_000_000_000 / per_sec.max(1) as u64);
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = 0usize;
        for chunk in 0..ports / 40 {
            for s in &socks {
                for i in 0..40 {
                    let _ = s.send_to(b"flood", SocketAddr::new(server, first + (chunk * 40 + i) as u16));
                }
                sent += 40;
            }
            let due = start + pace * sent as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        start.elapsed()
    })
}

fn flood_sockets(ns: &Netns, client: IpAddr, sockets: usize) -> Vec<UdpSocket> {
    (0..sockets)
        .map(|i| big_socket(ns, SocketAddr::new(client, FLOOD_PORT + i as u16)))
        .collect()
}

/// Sends `payload(i)` to `dst(i)` for `i in 0..n` from `sock`, at most
/// `per_sec` a second (in 10 ms slices). Returns how long it took.
pub fn send_paced(
    sock: &UdpSocket,
    n: usize,
    per_sec: usize,
    dst: impl Fn(usize) -> SocketAddr,
    payload: impl Fn(usize) -> Vec<u8>,
) -> Duration {
    let start = Instant::now();
    let per_slice = (per_sec / 100).max(1);
    let mut i = 0;
    while i < n {
        let slice_start = Instant::now();
        for _ in 0..per_slice {
            if i >= n {
                break;
            }
            // A full send buffer: wait a little and go on (datagrams may be
            // lost; callers count replies, not sends).
            if sock.send_to(&payload(i), dst(i)).is_err() {
                std::thread::sleep(Duration::from_micros(200));
            }
            i += 1;
        }
        let target = start + Duration::from_millis(10) * (i / per_slice) as u32;
        if let Some(wait) = target.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        } else if slice_start.elapsed() > Duration::from_millis(50) {
            std::thread::yield_now();
        }
    }
    start.elapsed()
}

/// Where a prober logs each round trip ("destination sequence µs", one a
/// line), if `PROBE_LOG` names a file: to match the bench's round trips
/// with packet captures of the same probes, and so tell the time spent in
/// the bench's own threads from the time spent on the wire.
fn probe_log() -> Option<std::io::LineWriter<std::fs::File>> {
    let path = std::env::var_os("PROBE_LOG")?;
    let file = std::fs::OpenOptions::new().append(true).create(true).open(path).ok()?;
    Some(std::io::LineWriter::new(file))
}

/// A flow that sends a datagram every `interval` whatever became of the
/// last one (as a game or a call does), and records each one's round trip
/// (`None` when no echo came within a second). Open loop: a stall shows in
/// every datagram sent during it, not in one.
pub struct Prober {
    /// Stops the sender; the receiver stops on `stop_receiving`.
    stop_sending: Arc<AtomicBool>,
    stop_receiving: Arc<AtomicBool>,
    probes: Arc<Mutex<Probes>>,
    sender: Option<JoinHandle<()>>,
    receiver: Option<JoinHandle<()>>,
}

/// Each probe datagram's send time (wall clock) and round trip, in order.
pub type Timeline = Vec<(std::time::SystemTime, Option<Duration>)>;

/// Datagrams sent (sequence number, when) and the round trips seen.
#[derive(Default)]
struct Probes {
    sent: std::collections::VecDeque<(u64, Instant)>,
    rtts: std::collections::HashMap<u64, Duration>,
    /// Every datagram taken so far: when it was sent (wall clock) and its
    /// round trip, for lining the slow ones up with the daemon's log.
    timeline: Timeline,
}

impl Probes {
    /// The round trips of the datagrams sent at least `settle` ago, in
    /// order, forgetting them.
    fn take(&mut self, settle: Duration) -> Vec<Option<Duration>> {
        let now = Instant::now();
        let mut taken = Vec::new();
        while let Some(&(seq, at)) = self.sent.front() {
            if now.duration_since(at) < settle {
                break;
            }
            self.sent.pop_front();
            let rtt = self.rtts.remove(&seq).filter(|rtt| *rtt < Duration::from_secs(1));
            let wall = std::time::SystemTime::now() - now.duration_since(at);
            self.timeline.push((wall, rtt));
            taken.push(rtt);
        }
        taken
    }
}

impl Prober {
    pub fn start(sock: UdpSocket, to: SocketAddr, interval: Duration) -> Prober {
        let stop_sending = Arc::new(AtomicBool::new(false));
        let stop_receiving = Arc::new(AtomicBool::new(false));
        let probes: Arc<Mutex<Probes>> = Arc::default();
        let receiver = {
            let (stop, probes) = (stop_receiving.clone(), probes.clone());
            let sock = sock.try_clone().unwrap();
            sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let name = format!("rx{}", super::udp::short_name(sock.local_addr().unwrap()));
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let mut buf = [0u8; 2048];
                    let mut log = probe_log();
                    while !stop.load(Ordering::Relaxed) {
                        let Ok((8, from)) = sock.recv_from(&mut buf) else {
                            continue;
                        };
                        let now = Instant::now();
                        let seq = u64::from_be_bytes([buf[0], buf[1], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7]]);
                        let mut p = probes.lock().unwrap();
                        let sent = p.sent.iter().rev().find(|(s, _)| *s == seq).map(|(_, at)| *at);
                        if let (true, Some(at)) = (from == to, sent) {
                            if let Some(log) = log.as_mut() {
                                use std::io::Write;
                                let _ = writeln!(log, "{to} {seq} {}", now.duration_since(at).as_micros());
                            }
                            p.rtts.insert(seq, now.duration_since(at));
                        }
                    }
                })
                .expect("spawning the probe's receiver")
        };
        let sender = {
            let (stop, probes) = (stop_sending.clone(), probes.clone());
            let name = format!("tx{}", super::udp::short_name(sock.local_addr().unwrap()));
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let start = Instant::now();
                    let mut seq: u64 = 0;
                    while !stop.load(Ordering::Relaxed) {
                        seq += 1;
                        probes.lock().unwrap().sent.push_back((seq, Instant::now()));
                        let _ = sock.send_to(&seq.to_be_bytes(), to);
                        let next = start + interval * seq as u32;
                        if let Some(wait) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                    }
                })
                .expect("spawning the probe's sender")
        };
        Prober {
            stop_sending,
            stop_receiving,
            probes,
            sender: Some(sender),
            receiver: Some(receiver),
        }
    }

    /// What was measured so far, forgetting it (datagrams sent in the last
    /// second, whose echo may still come, are kept for later).
    pub fn reset(&self) -> Vec<Option<Duration>> {
        self.probes.lock().unwrap().take(Duration::from_secs(1))
    }

    /// Stops sending, waits a second for the last echoes, and returns every
    /// round trip not returned yet.
    pub fn finish(self) -> Vec<Option<Duration>> {
        self.finish_timed().0
    }

    /// [`finish`](Self::finish), and every datagram's send time (wall
    /// clock) and round trip since the start, those taken by
    /// [`reset`](Self::reset) included.
    pub fn finish_timed(mut self) -> (Vec<Option<Duration>>, Timeline) {
        self.stop_sending.store(true, Ordering::Relaxed);
        if let Some(t) = self.sender.take() {
            let _ = t.join();
        }
        std::thread::sleep(Duration::from_secs(1));
        self.stop();
        let mut p = self.probes.lock().unwrap();
        let rest = p.take(Duration::ZERO);
        (rest, std::mem::take(&mut p.timeline))
    }

    fn stop(&mut self) {
        self.stop_sending.store(true, Ordering::Relaxed);
        self.stop_receiving.store(true, Ordering::Relaxed);
        for t in [self.sender.take(), self.receiver.take()].into_iter().flatten() {
            let _ = t.join();
        }
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Round-trip summary: (answered, lost, p50, p99, max).
pub fn summary(rtts: &[Option<Duration>]) -> (usize, usize, Duration, Duration, Duration) {
    let mut ok: Vec<Duration> = rtts.iter().flatten().copied().collect();
    ok.sort();
    let pick = |q: f64| -> Duration {
        if ok.is_empty() {
            return Duration::ZERO;
        }
        ok[((ok.len() as f64 * q).ceil() as usize).clamp(1, ok.len()) - 1]
    };
    (
        ok.len(),
        rtts.len() - ok.len(),
        pick(0.50),
        pick(0.99),
        ok.last().copied().unwrap_or_default(),
    )
}

/// An answer waiting for its time: when, to whom, what.
type Due = (Instant, SocketAddr, Vec<u8>);

/// A server thread that acknowledges each datagram at once (`ack:` and the
/// payload) and answers it again `delay` after it came (a server pushing
/// state to a client that went quiet); with `delay` `None`, a sink that
/// never answers.
pub struct LateServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    sent: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl LateServer {
    pub fn start(ns: &Netns, addr: SocketAddr, delay: Option<Duration>) -> LateServer {
        let sock = socket(ns, addr);
        let _ = socket2::SockRef::from(&sock).set_recv_buffer_size(16 << 20);
        sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let due: Arc<Mutex<Vec<Due>>> = Arc::default();
        let mut threads = Vec::new();
        {
            let (sock, stop, due) = (sock.try_clone().unwrap(), stop.clone(), due.clone());
            let name = format!("srv{}", super::udp::short_name(addr));
            threads.push(
                std::thread::Builder::new()
                    .name(name)
                    .spawn(move || {
                        let mut buf = vec![0u8; 65_536];
                        while !stop.load(Ordering::Relaxed) {
                            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                                if let Some(d) = delay {
                                    let mut ack = b"ack:".to_vec();
                                    ack.extend_from_slice(&buf[..n]);
                                    let _ = sock.send_to(&ack, from);
                                    let mut due = due.lock().unwrap();
                                    // A retried request is answered once.
                                    if !due.iter().any(|(_, to, p)| *to == from && p[..] == buf[..n]) {
                                        due.push((Instant::now() + d, from, buf[..n].to_vec()));
                                    }
                                }
                            }
                        }
                    })
                    .expect("spawning the server's receiver"),
            );
        }
        let sent: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        if delay.is_some() {
            let (stop, due, sent) = (stop.clone(), due.clone(), sent.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    let ready: Vec<_> = {
                        let mut d = due.lock().unwrap();
                        let (ready, later) = d.drain(..).partition(|(at, _, _)| *at <= now);
                        *d = later;
                        ready
                    };
                    for (_, to, payload) in ready {
                        if sock.send_to(&payload, to).is_ok() {
                            sent.lock().unwrap().push(payload);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }));
        }
        LateServer { stop, threads, sent }
    }

    /// The payloads answered so far.
    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.sent.lock().unwrap().clone()
    }
}

impl Drop for LateServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// `GET /metrics` from inside `ns`, or `None` if no answer within `timeout`.
pub fn scrape(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Option<String> {
    ns.enter(move || {
        let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
        s.set_read_timeout(Some(timeout)).ok()?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        out.contains("200 OK").then_some(out)
    })
}

/// The value of `series` in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<u64> {
    super::metrics::find(text, series)
}

/// Resident memory of process `pid`, bytes.
pub fn rss(pid: u32) -> u64 {
    status_bytes(pid, "VmRSS:")
}

/// A size in kB that `/proc/<pid>/status` gives on the line starting
/// with `field`, in bytes; 0 when the process or the line is gone.
fn status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Open descriptors of process `pid`.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Peak resident memory of process `pid` so far (`VmHWM`), bytes: what a
/// burst cost even if it was freed before anyone looked.
pub fn peak_rss(pid: u32) -> u64 {
    status_bytes(pid, "VmHWM:")
}
