//! Replies gathered from many pool sockets and sent together: every reply
//! must still reach its own client, from the address that client wrote
//! to, in order, and none may be lost or handed to someone else, however
//! the clients' flows interleave.

mod lab;

use lab::udp::{Echo, recv, socket};
use lab::{Lab, sa, server4};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

const CLIENT_ADDRESSES: usize = 10;
const PORTS_PER_CLIENT: u16 = 12;
/// Echoed datagrams per flow, sent round-robin over all flows.
const ECHOES: usize = 5;
/// Datagrams per flow streamed by the servers, back to back (GSO trains).
const STREAMED: usize = 16;
const STREAM_SIZE: usize = 1000;

fn client_ip(c: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 150 + c as u8))
}

/// A payload of `len` bytes that says which flow and which datagram it is.
fn payload(flow: usize, k: usize, len: usize) -> Vec<u8> {
    let mut p = format!("flow {flow} datagram {k} ").into_bytes();
    p.resize(len.max(p.len()), b'.');
    p
}

#[test]
fn replies_to_many_interleaved_clients_reach_the_right_client_from_the_right_address() {
    let lab = Lab::new();
    let extra: IpAddr = "203.0.113.30".parse().unwrap();
    lab.add_server_address(0, extra);
    for c in 0..CLIENT_ADDRESSES {
        lab.add_client_address(client_ip(c));
    }
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd("mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n");
    // Four destinations on two addresses: four reply sockets, each shared
    // by a quarter of the flows.
    let servers = [
        sa(server4(0), 7000),
        sa(server4(0), 7001),
        sa(extra, 7000),
        sa(extra, 7001),
    ];
    let echoes: Vec<Echo> = servers.iter().map(|s| Echo::start(&lab.servers[0], *s)).collect();
    let flows: Vec<(UdpSocket, SocketAddr)> = (0..CLIENT_ADDRESSES)
        .flat_map(|c| (0..PORTS_PER_CLIENT).map(move |p| (c, p)))
        .enumerate()
        .map(|(f, (c, p))| {
            let sock = socket(&lab.client, sa(client_ip(c), 42000 + p));
            (sock, servers[f % servers.len()])
        })
        .collect();

    // Echoes, every flow's datagram k before any flow's datagram k + 1.
    for k in 0..ECHOES {
        for (f, (sock, to)) in flows.iter().enumerate() {
            sock.send_to(&payload(f, k, 64 + f % 50), *to).unwrap();
        }
    }
    for (f, (sock, to)) in flows.iter().enumerate() {
        for k in 0..ECHOES {
            let (from, got) = recv(sock).unwrap_or_else(|| panic!("flow {f}: echo {k} lost"));
            assert_eq!(from, *to, "flow {f}: echo {k} from the wrong address");
            assert_eq!(got, payload(f, k, 64 + f % 50), "flow {f}: wrong or reordered echo");
        }
    }

    // Each server now streams to every flow it serves, flow after flow:
    // equal-sized runs that go out as GSO trains inside one sendmmsg.
    let mut gateway_port: HashMap<usize, SocketAddr> = HashMap::new();
    for (e, echo) in echoes.iter().enumerate() {
        for (peer, got) in echo.received() {
            let text = String::from_utf8_lossy(&got).into_owned();
            let f: usize = text
                .strip_prefix("flow ")
                .and_then(|t| t.split(' ').next())
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("server {e} got {text:?}"));
            assert_eq!(f % servers.len(), e, "flow {f} reached the wrong server");
            let known = *gateway_port.entry(f).or_insert(peer);
            assert_eq!(known, peer, "flow {f} reached its server from two gateway ports");
        }
    }
    assert_eq!(gateway_port.len(), flows.len());
    for (f, _) in flows.iter().enumerate() {
        let echo = &echoes[f % servers.len()];
        for k in 0..STREAMED {
            echo.send_to(&payload(f, 100 + k, STREAM_SIZE), gateway_port[&f]);
        }
    }
    for (f, (sock, to)) in flows.iter().enumerate() {
        for k in 0..STREAMED {
            let (from, got) = recv(sock).unwrap_or_else(|| panic!("flow {f}: streamed datagram {k} lost"));
            assert_eq!(from, *to, "flow {f}: streamed datagram {k} from the wrong address");
            assert_eq!(
                got,
                payload(f, 100 + k, STREAM_SIZE),
                "flow {f}: wrong or reordered datagram"
            );
        }
        sock.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        assert!(recv(sock).is_none(), "flow {f} got a datagram meant for no one");
    }

    let stopped = daemon.stop();
    let total = (flows.len() * (ECHOES + STREAMED)) as u64;
    assert_eq!(stopped.counter("reply_datagrams"), total, "{}", stopped.log);
    assert_eq!(stopped.counter("sessions_opened"), flows.len() as u64);
    for counter in ["drop_unsolicited", "drop_send_buffer_full", "reply_send_errors"] {
        assert_eq!(stopped.counter(counter), 0, "{counter}: {}", stopped.log);
    }
}
