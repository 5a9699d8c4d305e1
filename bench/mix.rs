//! Many clients: 50 client addresses × 20 game-like flows each (a datagram
//! of 64–300 bytes every 1/60 s, echoed by the server), plus two bulk
//! flows of 1,200-byte datagrams at a fixed rate, one each way; through
//! the kernel alone and through tproxyd.
//!
//! The load generator is here rather than an outside tool: it has to keep
//! a thousand sockets busy at a steady rate and time every echo. The
//! client side is one tokio thread (every flow a task on one runtime, as a
//! real game client's socket would be); the server side is one plain
//! thread per port. A game datagram carries its send time, so the echo's
//! round-trip time is measured by the clock that sent it.
//!
//! Ports (server side): kernel path 31000–31005 (not captured), tproxyd
//! path 30000–30005 (captured), relay floor path 32000–32005 (captured for
//! the floor, `floor.rs`): four game ports, then bulk forward (the server
//! counts), then bulk reverse (the server streams to whoever asks).

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::Options;
use crate::drops::{self, Drops, Relay};
use crate::setup::{self, SERVER, sleep_ms};

pub const CLIENTS: usize = 50;
pub const FLOWS_PER_CLIENT: usize = 20;
pub const GAME_PPS: u64 = 60;
pub const BULK_PPS: u64 = 10_000;
pub const BULK_SIZE: usize = 1200;
const GAME_PORTS: u16 = 4;
/// Echoes later than this after the run are lost.
const GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Default)]
pub struct Result {
    pub system: &'static str,
    pub secs: f64,
    pub game_sent: u64,
    /// Game datagrams the server read.
    pub game_at_server: u64,
    /// Echoes the client read.
    pub game_echoed: u64,
    /// Round-trip time of the echoes, µs.
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub bulk_fwd_sent: u64,
    pub bulk_fwd_delivered: u64,
    pub bulk_rev_sent: u64,
    pub bulk_rev_delivered: u64,
    pub drops: Drops,
}

impl Result {
    /// Datagrams delivered per second, every flow and both directions.
    pub fn delivered_pps(&self) -> f64 {
        (self.game_at_server + self.game_echoed + self.bulk_fwd_delivered + self.bulk_rev_delivered) as f64
            / self.secs.max(1e-9)
    }

    /// Datagrams sent per second (echoes count as sent by the server).
    pub fn sent_pps(&self) -> f64 {
        (self.game_sent + self.game_at_server + self.bulk_fwd_sent + self.bulk_rev_sent) as f64 / self.secs.max(1e-9)
    }

    pub fn loss_percent(&self) -> f64 {
        let sent = self.game_sent + self.game_at_server + self.bulk_fwd_sent + self.bulk_rev_sent;
        let got = self.game_at_server + self.game_echoed + self.bulk_fwd_delivered + self.bulk_rev_delivered;
        100.0 * sent.saturating_sub(got) as f64 / sent.max(1) as f64
    }

    /// Round trips of game flows that did not come back, %.
    pub fn game_loss_percent(&self) -> f64 {
        100.0 * self.game_sent.saturating_sub(self.game_echoed) as f64 / self.game_sent.max(1) as f64
    }
}

pub fn run(opts: &Options) -> Vec<Result> {
    let secs = if opts.quick { 3 } else { 10 };
    let lab = setup::lab();
    for c in 0..CLIENTS {
        lab.add_client_address(client_ip(c).into());
    }
    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new(ServerCounts::default());
    let mut threads = Vec::new();
    for base in [30_000u16, 31_000, setup::FLOOR_MIX_BASE] {
        for k in 0..=GAME_PORTS + 1 {
            let addr: SocketAddr = format!("{SERVER}:{}", base + k).parse().unwrap();
            let sock = lab.servers[0].enter(move || UdpSocket::bind(addr).unwrap());
            force_buffers(&sock, 4 << 20);
            sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let (stop, counts) = (stop.clone(), counts.clone());
            threads.push(std::thread::spawn(move || serve(sock, &stop, &counts)));
        }
    }
    let mut out = Vec::new();
    // The kernel, then tproxyd with one worker (the default on two CPUs)
    // and with two: the same tproxyd ports, a fresh daemon each; then the
    // relay floor (tproxyd's kernel calls and nothing else) on its own.
    for (system, base, workers) in [
        ("kernel forwarding", 31_000u16, None),
        ("tproxyd", 30_000, Some(1)),
        ("tproxyd, 2 workers", 30_000, Some(2)),
        ("relay floor", setup::FLOOR_MIX_BASE, None),
    ] {
        let daemon = workers.map(|w| {
            let d = setup::tproxyd(&lab, &[], &format!("workers = {w}"));
            sleep_ms(500);
            d
        });
        let floor = (base == setup::FLOOR_MIX_BASE).then(|| setup::floor(&lab, &[]));
        let relay = match (&daemon, floor) {
            (Some(d), _) => Some(Relay::Tproxyd(d.pid())),
            (None, Some(f)) => Some(Relay::Floor(f)),
            (None, None) => None,
        };
        counts.reset();
        let counters = drops::before_relay(&lab, relay);
        let ns = crate::lab::Netns {
            name: lab.client.name.clone(),
        };
        let client = ns.enter(move || client_side(base, Duration::from_secs(secs)));
        sleep_ms(200);
        let drops = counters.since(&lab);
        let mut rtts = client.rtts;
        rtts.sort_unstable();
        let pct = |q: f64| -> f64 {
            rtts.get(((rtts.len() as f64 * q) as usize).min(rtts.len().saturating_sub(1)))
                .map_or(f64::NAN, |v| f64::from(*v))
        };
        let r = Result {
            system,
            secs: secs as f64,
            game_sent: client.game_sent,
            game_at_server: counts.game.load(Ordering::Relaxed),
            game_echoed: client.game_echoed,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            p999_us: pct(0.999),
            bulk_fwd_sent: client.bulk_sent,
            bulk_fwd_delivered: counts.bulk.load(Ordering::Relaxed),
            bulk_rev_sent: counts.streamed.load(Ordering::Relaxed),
            bulk_rev_delivered: client.bulk_received,
            drops,
        };
        eprintln!(
            "mix {:<18} game {} sent, {} at server, {} echoed ({:.2} % lost), rtt p50 {:.0} p99 {:.0} p99.9 {:.0} µs; \
             bulk fwd {}/{}, rev {}/{}; delivered {:.0}/s, loss {:.2} %; cpu {} µs/dgram; drops: {}",
            r.system,
            r.game_sent,
            r.game_at_server,
            r.game_echoed,
            r.game_loss_percent(),
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.bulk_fwd_delivered,
            r.bulk_fwd_sent,
            r.bulk_rev_delivered,
            r.bulk_rev_sent,
            r.delivered_pps(),
            r.loss_percent(),
            r.drops
                .daemon
                .map_or("-".into(), |d| format!("{:.2}", d.cpu_us_per_datagram())),
            r.drops.summary()
        );
        out.push(r);
        drop(daemon);
        if let Some(f) = floor {
            lab.kill(f);
        }
        sleep_ms(500);
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    out
}

fn client_ip(c: usize) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, 100 + c as u8)
}

/// What the server side counted.
#[derive(Debug, Default)]
struct ServerCounts {
    game: AtomicU64,
    bulk: AtomicU64,
    streamed: AtomicU64,
}

impl ServerCounts {
    fn reset(&self) {
        for c in [&self.game, &self.bulk, &self.streamed] {
            c.store(0, Ordering::Relaxed);
        }
    }
}

/// `SO_RCVBUFFORCE` and `SO_SNDBUFFORCE`: the bench runs as root, and the
/// server's own queues are not what is measured.
fn force_buffers(sock: &impl AsRawFd, bytes: i32) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: setsockopt with a c_int value of the size given.
        unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const i32).cast(),
                std::mem::size_of::<i32>() as libc::socklen_t,
            );
        }
    }
}

/// One server port: echo `G`, count `F`, and on `R` stream bulk datagrams
/// back to the asker (rate and duration in the request).
fn serve(sock: UdpSocket, stop: &AtomicBool, counts: &Arc<ServerCounts>) {
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Ok((len, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        match buf.first() {
            Some(b'G') => {
                counts.game.fetch_add(1, Ordering::Relaxed);
                let _ = sock.send_to(&buf[..len], from);
            }
            Some(b'F') => {
                counts.bulk.fetch_add(1, Ordering::Relaxed);
            }
            Some(b'R') if len >= 9 => {
                let rate = u64::from(u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]));
                let ms = u64::from(u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]));
                let Ok(out) = sock.try_clone() else { continue };
                let counts = counts.clone();
                std::thread::spawn(move || stream(out, from, rate, Duration::from_millis(ms), &counts));
            }
            _ => {}
        }
    }
}

/// Sends `rate` datagrams/s of [`BULK_SIZE`] bytes to `to` for `length`,
/// paced per millisecond.
fn stream(sock: UdpSocket, to: SocketAddr, rate: u64, length: Duration, counts: &ServerCounts) {
    let payload = [b'B'; BULK_SIZE];
    let started = Instant::now();
    let mut sent = 0u64;
    while started.elapsed() < length {
        let due = rate * started.elapsed().as_micros() as u64 / 1_000_000;
        while sent < due {
            if sock.send_to(&payload, to).is_ok() {
                counts.streamed.fetch_add(1, Ordering::Relaxed);
            }
            sent += 1;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// What the client side saw.
#[derive(Debug, Default)]
struct ClientSide {
    game_sent: u64,
    game_echoed: u64,
    rtts: Vec<u32>,
    bulk_sent: u64,
    bulk_received: u64,
}

/// Runs every client flow for `length`, on a runtime of its own (the
/// calling thread is in the client namespace).
fn client_side(base: u16, length: Duration) -> ClientSide {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    rt.block_on(async move {
        let clock = Instant::now();
        let start = tokio::time::Instant::now() + Duration::from_millis(200);
        let end = start + length;
        let mut tasks = tokio::task::JoinSet::new();
        let server = IpAddr::V4(SERVER.parse().unwrap());
        for c in 0..CLIENTS {
            for f in 0..FLOWS_PER_CLIENT {
                let n = c * FLOWS_PER_CLIENT + f;
                let to = SocketAddr::new(server, base + (n % usize::from(GAME_PORTS)) as u16);
                let sock = tokio::net::UdpSocket::bind(SocketAddr::new(client_ip(c).into(), 0))
                    .await
                    .expect("client socket");
                sock.connect(to).await.expect("connect");
                tasks.spawn(game(sock, n as u64, clock, start, end));
            }
        }
        let fwd = tokio::net::UdpSocket::bind("192.0.2.10:0").await.expect("bulk socket");
        fwd.connect(SocketAddr::new(server, base + GAME_PORTS))
            .await
            .expect("connect");
        tasks.spawn(bulk_forward(fwd, start, end));
        let rev = tokio::net::UdpSocket::bind("192.0.2.10:0").await.expect("bulk socket");
        force_buffers(&rev, 4 << 20);
        rev.connect(SocketAddr::new(server, base + GAME_PORTS + 1))
            .await
            .expect("connect");
        tasks.spawn(bulk_reverse(rev, start, end, length));
        let mut total = ClientSide::default();
        while let Some(Ok(part)) = tasks.join_next().await {
            total.game_sent += part.game_sent;
            total.game_echoed += part.game_echoed;
            total.rtts.extend(part.rtts);
            total.bulk_sent += part.bulk_sent;
            total.bulk_received += part.bulk_received;
        }
        total
    })
}

/// One game flow: a datagram of 64–300 bytes every 1/60 s, starting at a
/// phase of its own; each echo's round-trip time.
async fn game(
    sock: tokio::net::UdpSocket,
    n: u64,
    clock: Instant,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
) -> ClientSide {
    let period = Duration::from_micros(1_000_000 / GAME_PPS);
    let phase = period.mul_f64((n * 7919 % 1000) as f64 / 1000.0);
    let mut tick = tokio::time::interval_at(start + phase, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut out = [0u8; 300];
    out[0] = b'G';
    let mut buf = [0u8; 2048];
    let mut me = ClientSide::default();
    let mut rng = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let on_echo = |len: usize, buf: &[u8], me: &mut ClientSide| {
        if len >= 9 && buf[0] == b'G' {
            let mut t = [0u8; 8];
            t.copy_from_slice(&buf[1..9]);
            let sent_ns = u64::from_be_bytes(t);
            let now_ns = clock.elapsed().as_nanos() as u64;
            me.rtts.push((now_ns.saturating_sub(sent_ns) / 1_000) as u32);
            me.game_echoed += 1;
        }
    };
    loop {
        tokio::select! {
            t = tick.tick() => {
                if t >= end {
                    break;
                }
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let size = 64 + (rng % 237) as usize;
                let now_ns = clock.elapsed().as_nanos() as u64;
                out[1..9].copy_from_slice(&now_ns.to_be_bytes());
                if sock.send(&out[..size]).await.is_ok() {
                    me.game_sent += 1;
                }
            }
            r = sock.recv(&mut buf) => if let Ok(len) = r {
                on_echo(len, &buf, &mut me);
            }
        }
    }
    let grace = tokio::time::sleep(GRACE);
    tokio::pin!(grace);
    loop {
        tokio::select! {
            _ = &mut grace => break,
            r = sock.recv(&mut buf) => if let Ok(len) = r {
                on_echo(len, &buf, &mut me);
            }
        }
    }
    me
}

/// [`BULK_PPS`] datagrams/s to the server, paced per millisecond.
async fn bulk_forward(
    sock: tokio::net::UdpSocket,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
) -> ClientSide {
    let payload = [b'F'; BULK_SIZE];
    let mut me = ClientSide::default();
    let mut tick = tokio::time::interval_at(start, Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let t = tick.tick().await;
        if t >= end {
            break;
        }
        let due = BULK_PPS * (t - start).as_micros() as u64 / 1_000_000;
        while me.bulk_sent < due {
            if sock.send(&payload).await.is_err() {
                break;
            }
            me.bulk_sent += 1;
        }
    }
    me
}

/// Asks the server to stream [`BULK_PPS`] datagrams/s for `length`, and
/// counts what arrives.
async fn bulk_reverse(
    sock: tokio::net::UdpSocket,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
    length: Duration,
) -> ClientSide {
    tokio::time::sleep_until(start).await;
    let mut ask = [0u8; 9];
    ask[0] = b'R';
    ask[1..5].copy_from_slice(&(BULK_PPS as u32).to_be_bytes());
    ask[5..9].copy_from_slice(&(length.as_millis() as u32).to_be_bytes());
    let mut me = ClientSide::default();
    if sock.send(&ask).await.is_err() {
        return me;
    }
    let mut buf = [0u8; 2048];
    let until = tokio::time::sleep_until(end + GRACE);
    tokio::pin!(until);
    loop {
        tokio::select! {
            _ = &mut until => break,
            r = sock.recv(&mut buf) => if matches!(r, Ok(n) if n == BULK_SIZE) {
                me.bulk_received += 1;
            }
        }
    }
    me
}
