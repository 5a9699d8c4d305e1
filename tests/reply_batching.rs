//! Replies gathered from many pool sockets and sent together: every reply
//! must still reach its own client, from the address that client wrote
//! to, in order, and none may be lost or handed to someone else, however
//! the clients' flows interleave.

mod lab;

use lab::udp::{Echo, mark_tos, recv, recv_tos, socket};
use lab::{CLIENT4, CLIENT6, Lab, sa, server4, server6};
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

/// What a hostile server can send a flow: empty datagrams, the largest
/// there is, sizes either side of 576 and 1,280 bytes (the most a batch
/// of raw-IP replies takes), from many ports at once so that a pool
/// reader's batch holds replies alone from their address (sent over raw
/// IP) next to runs from one address (sent through a reply socket). Every
/// reply must arrive whole, from its server, in its flow's order, with
/// the server's DSCP/ECN mark; the daemon must take all of it.
#[test]
fn a_hostile_servers_odd_sizes_from_many_ports_arrive_whole_in_order_and_marked() {
    const PORTS: u16 = 8;
    const EF_ECT0: u8 = 0xba;
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd("mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\", \"[::]:15353\"]\n");
    let mut expected = 0u64;
    for (client, server) in [
        (sa(CLIENT4.parse().unwrap(), 41000), server4(0)),
        (sa(CLIENT6.parse().unwrap(), 41000), server6(0)),
    ] {
        let cli = socket(&lab.client, client);
        mark_tos(&cli, 0);
        // Room for several of the largest, reassembled.
        nix::sys::socket::setsockopt(&cli, nix::sys::socket::sockopt::RcvBufForce, &(8 << 20)).unwrap();
        let servers: Vec<UdpSocket> = (0..PORTS)
            .map(|p| {
                let s = socket(&lab.servers[0], sa(server, 7100 + p));
                mark_tos(&s, EF_ECT0);
                s
            })
            .collect();
        let mut peers = Vec::new();
        for s in &servers {
            cli.send_to(b"hello", s.local_addr().unwrap()).unwrap();
            let (peer, _, _) = recv_tos(s).expect("the server got nothing");
            peers.push(peer);
        }
        let body = |port: usize, k: usize, len: usize| -> Vec<u8> {
            (0..len).map(|i| (i * 31 + port * 7 + k * 13) as u8).collect()
        };
        // Rounds sent back to back from every port; port 0 sends each
        // twice, so its replies (a run) take its reply socket while the
        // others' may go over raw IP, and it still sees them in order.
        for (sizes, ports) in [
            (&[0usize, 1, 548, 549, 575, 1_232, 1_233, 1_400][..], PORTS),
            (&[9_000, 65_507][..], 2),
        ] {
            let mut want: Vec<Vec<Vec<u8>>> = vec![Vec::new(); usize::from(ports)];
            for (k, &len) in sizes.iter().enumerate() {
                for p in 0..usize::from(ports) {
                    let copies = if p == 0 { 2 } else { 1 };
                    for c in 0..copies {
                        let b = body(p, 2 * k + c, len);
                        servers[p].send_to(&b, peers[p]).unwrap();
                        want[p].push(b);
                    }
                }
            }
            let total: usize = want.iter().map(Vec::len).sum();
            expected += total as u64;
            let mut got: Vec<Vec<Vec<u8>>> = vec![Vec::new(); usize::from(ports)];
            for i in 0..total {
                let (from, data, tos) = recv_tos(&cli).unwrap_or_else(|| panic!("{client}: reply {i} of {total} lost"));
                assert_eq!(from.ip(), server, "{client}: a reply from the wrong address");
                let p = usize::from(from.port() - 7100);
                assert_eq!(
                    tos,
                    EF_ECT0,
                    "{client}: the server's mark was lost ({} bytes)",
                    data.len()
                );
                got[p].push(data);
            }
            for p in 0..usize::from(ports) {
                let sizes = |v: &Vec<Vec<u8>>| v.iter().map(Vec::len).collect::<Vec<_>>();
                assert_eq!(sizes(&got[p]), sizes(&want[p]), "{client}: port {p}'s replies, by size");
                assert!(got[p] == want[p], "{client}: port {p}'s replies altered or reordered");
            }
        }
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("reply_datagrams"), expected, "{}", stopped.log);
    for counter in ["drop_send_buffer_full", "reply_send_errors"] {
        assert_eq!(stopped.counter(counter), 0, "{counter}: {}", stopped.log);
    }
}

/// On a LAN link whose MTU is below 576 bytes (IPv4 links go down to 68),
/// replies between that MTU and 576 bytes arrive whole, fragmented,
/// however they leave: the kernel refuses a raw packet larger than the
/// device's MTU, and replies alone from their address in a batch go over
/// raw IP in one `sendmmsg`.
#[test]
fn replies_over_a_lan_links_small_mtu_arrive_whole() {
    const PORTS: u16 = 8;
    let lab = Lab::new();
    lab.gateway.sh("ip link set lan0 mtu 500");
    lab.client.sh("ip link set lan0 mtu 500");
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd("mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n");
    let cli = socket(&lab.client, sa(CLIENT4.parse().unwrap(), 41000));
    let servers: Vec<UdpSocket> = (0..PORTS)
        .map(|p| socket(&lab.servers[0], sa(server4(0), 7100 + p)))
        .collect();
    let mut peers = Vec::new();
    for s in &servers {
        cli.send_to(b"hello", s.local_addr().unwrap()).unwrap();
        let (peer, _) = recv(s).expect("the server got nothing");
        peers.push(peer);
    }
    let mut sent = 0u64;
    for round in 0..4u8 {
        // 530 bytes of UDP payload: 558 bytes of IP, over the link's 500.
        for (p, s) in servers.iter().enumerate() {
            s.send_to(&[round ^ p as u8; 530], peers[p]).unwrap();
            sent += 1;
        }
        for _ in 0..PORTS {
            let (from, data) = recv(&cli).unwrap_or_else(|| panic!("round {round}: a reply was lost"));
            let p = usize::from(from.port() - 7100);
            assert_eq!(data, [round ^ p as u8; 530], "round {round}: port {p}'s reply");
        }
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("reply_datagrams"), sent, "{}", stopped.log);
    assert_eq!(stopped.counter("reply_send_errors"), 0, "{}", stopped.log);
}

/// Hundreds of pool sockets with replies queued on all of them at once:
/// more sockets than one wake-up of a pool reader serves within its slice
/// and more than the room it keeps for them, so some wait for a later
/// round. Every reply must still be delivered: a socket whose readiness
/// was taken but not served would keep its replies until its next
/// datagram, which never comes here.
#[test]
fn a_burst_on_hundreds_of_pool_sockets_is_all_delivered() {
    const FLOWS: u16 = 400;
    const BURST: usize = 6;
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd("mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n");
    // One destination: each flow needs a pool socket of its own.
    let server = sa(server4(0), 7100);
    let echo = Echo::start(&lab.servers[0], server);
    let flows: Vec<UdpSocket> = (0..FLOWS)
        .map(|p| socket(&lab.client, sa(CLIENT4.parse().unwrap(), 43000 + p)))
        .collect();
    for (f, sock) in flows.iter().enumerate() {
        sock.send_to(&payload(f, 0, 64), server).unwrap();
    }
    for (f, sock) in flows.iter().enumerate() {
        let (from, got) = recv(sock).unwrap_or_else(|| panic!("flow {f}: echo lost"));
        assert_eq!((from, got), (server, payload(f, 0, 64)), "flow {f}");
    }
    let mut gateway_port: HashMap<usize, SocketAddr> = HashMap::new();
    for (peer, got) in echo.received() {
        let text = String::from_utf8_lossy(&got).into_owned();
        let f: usize = text
            .strip_prefix("flow ")
            .and_then(|t| t.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("server got {text:?}"));
        gateway_port.insert(f, peer);
    }
    let ports: std::collections::HashSet<SocketAddr> = gateway_port.values().copied().collect();
    assert_eq!(
        ports.len(),
        usize::from(FLOWS),
        "every flow has a pool socket of its own"
    );
    // The burst, interleaved over the flows, so that every socket has
    // something queued before the reader has served the first few.
    for k in 1..=BURST {
        for f in 0..usize::from(FLOWS) {
            echo.send_to(&payload(f, k, 200), gateway_port[&f]);
        }
    }
    for (f, sock) in flows.iter().enumerate() {
        for k in 1..=BURST {
            let (from, got) = recv(sock).unwrap_or_else(|| panic!("flow {f}: reply {k} lost"));
            assert_eq!(from, server, "flow {f}: reply {k} from the wrong address");
            assert_eq!(got, payload(f, k, 200), "flow {f}: wrong or reordered reply");
        }
    }
    let stopped = daemon.stop();
    let total = u64::from(FLOWS) * (1 + BURST as u64);
    assert_eq!(stopped.counter("reply_datagrams"), total, "{}", stopped.log);
    for counter in ["drop_unsolicited", "receive_errors", "reply_send_errors"] {
        assert_eq!(stopped.counter(counter), 0, "{counter}: {}", stopped.log);
    }
}
