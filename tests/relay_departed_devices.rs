//! Relayed replies to LAN addresses a device held and left, and the reply
//! socket's buffer.
//!
//! tproxyd remembers an address the kernel once resolved as a device, and
//! while a reply socket's buffer is past half it still lets a reply go to
//! such an address when the kernel has dropped it, now and then, so that
//! the kernel asks for it again (`net::known_devices`). A hostile device
//! can hold addresses long enough to be remembered and then leave them:
//! replies to them wait seconds for neighbours that never answer. Big
//! ones must not be let through on that pace, or a few of them fill the
//! buffer and a real device's replies fail.

mod lab;

use lab::Lab;
use lab::udp::Echo;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

const ADMIN: &str = "127.0.0.1:9153";
/// The real device.
const DEVICE: &str = "192.0.2.10";

/// A socket in the client namespace bound to `from`, an address it does
/// not hold (`IP_TRANSPARENT`), with room to send big datagrams.
fn forged_socket(lab: &Lab, from: IpAddr) -> std::net::UdpSocket {
    lab.client.enter(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_freebind_v4(true).unwrap();
        s.set_ip_transparent_v4(true).unwrap();
        s.set_send_buffer_size(8 << 20).unwrap();
        s.bind(&SocketAddr::new(from, 0).into()).unwrap();
        std::net::UdpSocket::from(s)
    })
}

/// Sends `n` datagrams of 64 bytes from the real device to `server` and
/// counts the distinct echoes that come back from it.
fn device_echoes(lab: &Lab, server: SocketAddr, n: usize) -> usize {
    let sock = lab::udp::socket(&lab.client, SocketAddr::new(DEVICE.parse().unwrap(), 0));
    sock.set_read_timeout(Some(Duration::from_millis(2500))).unwrap();
    for i in 0..n {
        let mut p = format!("device-{i:04}-").into_bytes();
        p.resize(64, b'd');
        sock.send_to(&p, server).unwrap();
    }
    let mut got = std::collections::HashSet::new();
    while got.len() < n
        && let Some((sender, bytes)) = lab::udp::recv(&sock)
    {
        if sender == server && bytes.starts_with(b"device-") {
            got.insert(bytes[..11].to_vec());
        }
    }
    got.len()
}

/// 40 LAN addresses (192.0.2.100 to 192.0.2.139) a hostile device holds
/// (answering ARP for them) and talks to `server` from for 12 s, past
/// tproxyd's idle reading of the neighbour table, and then leaves; their
/// entries are dropped, as the kernel's forced garbage collection does
/// (here by hand).
fn departed_devices(lab: &Lab, server: SocketAddr) -> Vec<IpAddr> {
    let addrs: Vec<IpAddr> = (0..40u8).map(|s| IpAddr::from([192, 0, 2, 100 + s])).collect();
    for a in &addrs {
        lab.client.sh(&format!("ip addr add {a}/32 dev lan0"));
    }
    let held: Vec<_> = addrs
        .iter()
        .map(|&a| lab::udp::socket(&lab.client, SocketAddr::new(a, 0)))
        .collect();
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        for s in &held {
            s.send_to(b"hello", server).unwrap();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    for a in &addrs {
        lab.client.sh(&format!("ip addr del {a}/32 dev lan0"));
        lab.gateway.sh(&format!("ip -4 neigh del {a} dev lan0 || true"));
    }
    std::thread::sleep(Duration::from_millis(500));
    addrs
}

/// The departed addresses send a 65,000-byte datagram each to an echo
/// server every half second; meanwhile the real device sends four rounds
/// of 20 small datagrams: every one must be echoed. When a reply to a
/// departed address went on the pace of such replies whatever its size
/// (about 100 KB of the buffer for three seconds each), the device's
/// first round got no echo, with `send_buffer_full` 32 or 33 (5 of 5
/// runs).
#[test]
fn big_replies_to_departed_devices_cannot_starve_a_real_device() {
    let lab = Lab::with_servers(1);
    lab.install_rules("nft", "LAN_IF=lan0");
    let _daemon = lab.start_tproxyd(&format!(
        "mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n[admin]\nlisten = \"{ADMIN}\"\n"
    ));
    let server = SocketAddr::new(lab::server4(0), 7000);
    let _echo = Echo::start(&lab.servers[0], server);
    assert_eq!(device_echoes(&lab, server, 5), 5, "no echo before the flood");
    let socks: Vec<_> = departed_devices(&lab, server)
        .into_iter()
        .map(|a| forged_socket(&lab, a))
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let payload = vec![b'f'; 65_000];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for s in &socks {
                    let _ = s.send_to(&payload, server);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let rounds: Vec<usize> = (0..4).map(|_| device_echoes(&lab, server, 20)).collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = flood.join();
    let metrics = lab::metrics::fetch(&lab.gateway, ADMIN.parse().unwrap());
    let full = lab::metrics::value(&metrics, "tproxyd_drops_total{reason=\"send_buffer_full\"}");
    let held = lab::metrics::value(&metrics, "tproxyd_drops_total{reason=\"neighbour_unresolved\"}");
    assert_eq!(
        rounds, [20; 4],
        "the device was starved of its echoes (send_buffer_full: {full})"
    );
    assert!(held > 0, "no reply to a departed address was held back");
}
