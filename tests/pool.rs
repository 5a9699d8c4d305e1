//! Pooled upstream sockets in the namespace lab: a flood's sockets are
//! given back once its flows are gone.

mod lab;

use lab::flood::{metric, scrape};
use lab::udp::{Echo, socket};
use lab::{CLIENT4, Lab, sa, server4};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Client endpoints of the flood, all to one server address and port: each
/// needs a pool socket of its own (a socket carries one flow per remote).
const FLOWS: u16 = 1_500;

fn admin() -> SocketAddr {
    "127.0.0.1:9153".parse().unwrap()
}

fn gauge(lab: &Lab, name: &str) -> u64 {
    scrape(&lab.gateway, admin(), Duration::from_secs(5))
        .and_then(|page| metric(&page, &format!("tproxyd_{name}")))
        .unwrap_or_else(|| panic!("no {name} on /metrics"))
}

#[test]
fn a_floods_pool_sockets_are_closed_after_its_flows_expire() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 6000));
    let daemon = lab.start_tproxyd(&format!(
        "mark = 255\n[admin]\nlisten = \"{}\"\n[relay]\nlisten = [\"0.0.0.0:15353\"]\nidle_timeout = \"1s\"\n\
         new_flows_per_client = 0\n",
        admin()
    ));
    let baseline = gauge(&lab, "open_fds");

    // The flood: every endpoint sends one datagram and must get its answer.
    let client: IpAddr = CLIENT4.parse().unwrap();
    let sockets: Vec<_> = (0..FLOWS)
        .map(|i| {
            let s = socket(&lab.client, sa(client, 20_000 + i));
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            s
        })
        .collect();
    let mut answered = 0;
    for chunk in sockets.chunks(100) {
        for s in chunk {
            s.send_to(b"flood", echo.addr).unwrap();
        }
        for s in chunk {
            let mut buf = [0u8; 16];
            // One retry: a datagram may die in a full queue on a busy machine.
            let got = s.recv_from(&mut buf).is_ok() || {
                s.send_to(b"flood", echo.addr).unwrap();
                s.recv_from(&mut buf).is_ok()
            };
            answered += usize::from(got);
        }
    }
    let during = gauge(&lab, "open_fds");
    let pooled = gauge(&lab, "upstream_sockets");
    drop(sockets);
    assert_eq!(answered, usize::from(FLOWS), "every flow of the flood is answered");
    assert!(
        pooled >= u64::from(FLOWS) && during >= baseline + u64::from(FLOWS),
        "the flood holds a pool socket per flow: {pooled} pool sockets, {during} descriptors (baseline {baseline})"
    );

    // Idle for 1 s, swept within a quarter of that, then 1 s of grace for
    // their sockets: give it ten times as long on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut fds, mut pooled) = (during, pooled);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        fds = gauge(&lab, "open_fds");
        pooled = gauge(&lab, "upstream_sockets");
        if fds <= baseline + 10 && pooled == 0 {
            break;
        }
    }
    let stopped = daemon.stop();
    assert_eq!(pooled, 0, "pool sockets left open:\n{}", stopped.log);
    assert!(
        fds <= baseline + 10,
        "{fds} descriptors open after the flood's flows expired, {baseline} before it:\n{}",
        stopped.log
    );
    assert!(stopped.counter("sessions_expired") >= u64::from(FLOWS));
}
