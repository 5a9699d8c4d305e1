//! Flows: 100,000 concurrent flows (one client endpoint each, one datagram
//! each way) held open through tproxyd; how fast they are set up, what they
//! cost in memory and descriptors, and whether all of them still relay.
//!
//! The client side cannot hold 100,000 sockets here (the machine caps a
//! process at 20,000 descriptors), so it writes its datagrams from many
//! source ports through one raw socket and reads the replies through
//! another; the client namespace drops the ICMP "port unreachable" its
//! kernel would send back for those unbound ports.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tproxyd::net::raw::RawSender;

use crate::Options;
use crate::setup::{self, SERVER, sleep_ms};

#[derive(Debug, Clone, Default)]
pub struct Result {
    pub flows: usize,
    pub opened: u64,
    pub setup_secs: f64,
    pub first_replies: usize,
    pub second_replies: usize,
    /// Sessions opened during the second round (0: all were still there).
    pub reopened: u64,
    pub rss_idle_kib: u64,
    pub rss_kib: u64,
    pub peak_kib: u64,
    pub fds: usize,
}

impl Result {
    pub fn setup_rate(&self) -> f64 {
        self.opened as f64 / self.setup_secs.max(1e-9)
    }
}

const SERVER_PORTS: u16 = 16;
const PER_CLIENT_ADDRESS: usize = 50_000;
const FIRST_PORT: u16 = 10_000;

fn client(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(192, 0, 2, 11 + (i / PER_CLIENT_ADDRESS) as u8);
    SocketAddr::new(IpAddr::V4(ip), FIRST_PORT + (i % PER_CLIENT_ADDRESS) as u16)
}

fn flow_of(addr: SocketAddr) -> Option<usize> {
    let IpAddr::V4(ip) = addr.ip() else { return None };
    let block = usize::from(ip.octets()[3].checked_sub(11)?);
    let port = usize::from(addr.port().checked_sub(FIRST_PORT)?);
    (port < PER_CLIENT_ADDRESS).then_some(block * PER_CLIENT_ADDRESS + port)
}

fn target(i: usize) -> SocketAddr {
    format!("{SERVER}:{}", 30_000 + (i % usize::from(SERVER_PORTS)))
        .parse()
        .unwrap()
}

pub fn run(opts: &Options) -> Result {
    let n: usize = if opts.quick { 20_000 } else { 100_000 };
    let lab = setup::lab();
    for a in 0..n.div_ceil(PER_CLIENT_ADDRESS) {
        lab.add_client_address(format!("192.0.2.{}", 11 + a).parse().unwrap());
    }
    lab.client.sh("nft add table inet bench && \
         nft 'add chain inet bench out { type filter hook output priority 0; }' && \
         nft add rule inet bench out icmp type destination-unreachable drop");
    // Echo servers: one thread per port.
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for k in 0..SERVER_PORTS {
        let addr: SocketAddr = format!("{SERVER}:{}", 30_000 + k).parse().unwrap();
        let sock = lab.servers[0].enter(move || UdpSocket::bind(addr).unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let stop = stop.clone();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::Relaxed) {
                if let Ok((len, from)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..len], from);
                }
            }
        }));
    }
    let daemon = setup::tproxyd(&lab, &[], "");
    sleep_ms(500);
    let pid = daemon.pid();
    let (rss_idle_kib, _) = setup::rss_kib(pid);

    // The client's receive side: a raw socket sees every UDP reply.
    let replied: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let raw_in = lab.client.enter(|| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::RAW, Some(socket2::Protocol::UDP))
            .expect("raw receive socket");
        s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let _ = s.set_recv_buffer_size(64 << 20);
        s
    });
    {
        let (replied, stop) = (replied.clone(), stop.clone());
        threads.push(std::thread::spawn(move || {
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
            while !stop.load(Ordering::Relaxed) {
                let Ok(len) = raw_in.recv(&mut buf) else { continue };
                // SAFETY: recv initialised the first `len` bytes.
                let pkt: Vec<u8> = buf[..len].iter().map(|b| unsafe { b.assume_init() }).collect();
                let ihl = usize::from(pkt.first().copied().unwrap_or(0) & 0x0f) * 4;
                if pkt.len() < ihl + 8 || ihl < 20 {
                    continue;
                }
                let dst_ip = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
                let dst_port = u16::from_be_bytes([pkt[ihl + 2], pkt[ihl + 3]]);
                if let Some(i) = flow_of(SocketAddr::new(IpAddr::V4(dst_ip), dst_port)) {
                    if let Some(count) = replied.get(i) {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Sessions opened so far, from the metrics endpoint.
    let opened = Arc::new(AtomicU64::new(0));
    let poller = {
        let (opened, stop) = (opened.clone(), stop.clone());
        let gateway = lab.gateway.name.clone();
        std::thread::spawn(move || {
            let ns = crate::lab::Netns { name: gateway };
            while !stop.load(Ordering::Relaxed) {
                let page = ns.enter(setup::metrics_here);
                opened.store(setup::metric(&page, "tproxyd_sessions_opened_total"), Ordering::Relaxed);
                sleep_ms(5);
            }
        })
    };

    // Set-up: every client endpoint sends its first datagram, with at most
    // a few thousand waiting to be opened at once (beyond that they would
    // only pile up in, and overflow, the listener's buffer); endpoints not
    // answered after the pass send again, as a real client would.
    let started = Instant::now();
    let sender = {
        let (opened, replied) = (opened.clone(), replied.clone());
        let ns = crate::lab::Netns {
            name: lab.client.name.clone(),
        };
        std::thread::spawn(move || {
            ns.enter(move || {
                let raw = RawSender::new(0);
                for pass in 0..5 {
                    for i in 0..n {
                        if replied[i].load(Ordering::Relaxed) > 0 {
                            continue;
                        }
                        let _ = raw.send(client(i), target(i), b"open", 0);
                        if pass == 0 && i % 1_000 == 999 {
                            let deadline = Instant::now() + Duration::from_secs(10);
                            while (i as u64 + 1).saturating_sub(opened.load(Ordering::Relaxed)) > 4_000
                                && Instant::now() < deadline
                            {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        }
                    }
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while replied.iter().filter(|c| c.load(Ordering::Relaxed) > 0).count() < n
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                raw
            })
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while (opened.load(Ordering::Relaxed) as usize) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let setup_secs = started.elapsed().as_secs_f64();
    let sender = Arc::new(sender.join().expect("sender thread"));
    let total = opened.load(Ordering::Relaxed);
    let first_replies = replied.iter().filter(|c| c.load(Ordering::Relaxed) > 0).count();
    let (rss_kib, peak_kib) = setup::rss_kib(pid);
    let fds = setup::fds(pid);

    // All of them still relay, through the sessions already open: one more
    // datagram each (resent where no answer came, as a client would), and
    // not one new session may appear.
    let before: Vec<u64> = replied.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let answered = |replied: &[AtomicU64], before: &[u64]| -> Vec<bool> {
        replied
            .iter()
            .zip(before)
            .map(|(c, b)| c.load(Ordering::Relaxed) > *b)
            .collect()
    };
    for _pass in 0..3 {
        let done = answered(&replied, &before);
        if done.iter().all(|d| *d) {
            break;
        }
        let sender = sender.clone();
        lab.client.enter(move || {
            for (i, d) in done.iter().enumerate() {
                if !d {
                    let _ = sender.send(client(i), target(i), b"again", 0);
                    if i % 1_000 == 999 {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        });
        sleep_ms(2_000);
    }
    let second_replies = answered(&replied, &before).iter().filter(|d| **d).count();
    let reopened = opened.load(Ordering::Relaxed).saturating_sub(total);
    stop.store(true, Ordering::Relaxed);
    let _ = poller.join();
    for t in threads {
        let _ = t.join();
    }
    let r = Result {
        flows: n,
        opened: total,
        setup_secs,
        first_replies,
        second_replies,
        reopened,
        rss_idle_kib,
        rss_kib,
        peak_kib,
        fds,
    };
    eprintln!(
        "flows {} opened {} in {:.2} s ({:.0}/s), replies {} then {} (reopened {}), RSS {} KiB (idle {}), fds {}",
        r.flows,
        r.opened,
        r.setup_secs,
        r.setup_rate(),
        r.first_replies,
        r.second_replies,
        r.reopened,
        r.rss_kib,
        r.rss_idle_kib,
        r.fds
    );
    r
}
