//! Flows: 100,000 concurrent flows (one client socket each, one datagram
//! each way) held open through tproxyd; how fast they are set up, what they
//! cost in memory and descriptors, and whether all of them still relay.

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::Options;
use crate::setup::{self, SERVER, sleep_ms};

#[derive(Debug, Clone, Default)]
pub struct Result {
    pub flows: usize,
    pub opened: u64,
    pub setup_secs: f64,
    pub first_replies: usize,
    pub second_replies: usize,
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

pub fn run(opts: &Options) -> Result {
    let n: usize = if opts.quick { 20_000 } else { 100_000 };
    let lab = setup::lab();
    let addresses = n.div_ceil(PER_CLIENT_ADDRESS);
    for a in 0..addresses {
        lab.add_client_address(format!("192.0.2.{}", 11 + a).parse().unwrap());
    }
    // Echo servers: one thread per port.
    let stop = Arc::new(AtomicBool::new(false));
    let mut echoes = Vec::new();
    for k in 0..SERVER_PORTS {
        let addr: SocketAddr = format!("{SERVER}:{}", 30_000 + k).parse().unwrap();
        let sock = lab.servers[0].enter(move || UdpSocket::bind(addr).unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let stop = stop.clone();
        echoes.push(std::thread::spawn(move || {
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

    let clients: Vec<UdpSocket> = lab.client.enter(move || {
        (0..n)
            .map(|i| {
                let ip = format!("192.0.2.{}", 11 + i / PER_CLIENT_ADDRESS);
                let port = 10_000 + (i % PER_CLIENT_ADDRESS) as u16;
                let s = UdpSocket::bind((ip.as_str(), port)).expect("client socket");
                s.set_nonblocking(true).unwrap();
                s
            })
            .collect()
    });
    let target = |i: usize| -> SocketAddr {
        format!("{SERVER}:{}", 30_000 + (i % usize::from(SERVER_PORTS)))
            .parse()
            .unwrap()
    };

    // Set-up: every client sends its first datagram, with at most a few
    // thousand waiting to be opened at once (beyond that they would only
    // pile up in the listener's buffer).
    let opened = || setup::metric(&setup::metrics(&lab), "tproxyd_sessions_opened_total");
    let started = Instant::now();
    for (i, c) in clients.iter().enumerate() {
        let _ = c.send_to(b"open", target(i));
        if i % 2_000 == 1_999 {
            let deadline = Instant::now() + Duration::from_secs(10);
            while (i as u64 + 1).saturating_sub(opened()) > 4_000 && Instant::now() < deadline {
                sleep_ms(2);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut total = opened();
    while total < n as u64 && Instant::now() < deadline {
        sleep_ms(5);
        total = opened();
    }
    let setup_secs = started.elapsed().as_secs_f64();
    let first_replies = collect(&clients);
    let (rss_kib, peak_kib) = setup::rss_kib(pid);
    let fds = setup::fds(pid);

    // All of them still relay.
    for (i, c) in clients.iter().enumerate() {
        let _ = c.send_to(b"again", target(i));
        if i % 1_000 == 999 {
            sleep_ms(1);
        }
    }
    let second_replies = collect(&clients);
    stop.store(true, Ordering::Relaxed);
    for e in echoes {
        let _ = e.join();
    }
    let r = Result {
        flows: n,
        opened: total,
        setup_secs,
        first_replies,
        second_replies,
        rss_idle_kib,
        rss_kib,
        peak_kib,
        fds,
    };
    eprintln!(
        "flows {} opened {} in {:.2} s ({:.0}/s), replies {} then {}, RSS {} KiB (idle {}), fds {}",
        r.flows,
        r.opened,
        r.setup_secs,
        r.setup_rate(),
        r.first_replies,
        r.second_replies,
        r.rss_kib,
        r.rss_idle_kib,
        r.fds
    );
    r
}

/// Sweeps every socket until each has a reply or 5 s have passed.
fn collect(clients: &[UdpSocket]) -> usize {
    let mut got = vec![false; clients.len()];
    let mut count = 0;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 64];
    while count < clients.len() && Instant::now() < deadline {
        for (i, c) in clients.iter().enumerate() {
            if !got[i] && c.recv_from(&mut buf).is_ok() {
                got[i] = true;
                count += 1;
            }
        }
    }
    count
}
