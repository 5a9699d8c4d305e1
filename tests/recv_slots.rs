//! The relay listener reads with one receive batch whose headers are set
//! up once and reused (only the lengths and flags of the slots the kernel
//! filled are restored), shared by its IPv4 and IPv6 sockets. Attacked in
//! the namespace lab with what could make a slot carry something of the
//! datagram read into it before: both families in the same bursts, sizes
//! from one byte to fragmented 9,000-byte datagrams, each flow its own
//! TOS mark and its own original destination.

mod lab;

use lab::udp::{mark_tos, recv_tos, socket};
use lab::{CLIENT4, CLIENT6, Lab, gateway_wan4, gateway_wan6, sa, server4, server6};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};

fn config() -> String {
    "mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\", \"[::]:15353\"]\n".to_string()
}

/// Sizes each flow sends in turn: tiny after huge and the other way round,
/// so a slot holds a short datagram right after a long one.
const SIZES: [usize; 8] = [1, 9_000, 3, 1_472, 64, 4_000, 2, 1_200];

/// Payload `k` of flow `f`: its size from [`SIZES`], every byte telling
/// the flow and the datagram apart.
fn payload(f: usize, k: usize) -> Vec<u8> {
    let len = SIZES[k % SIZES.len()];
    (0..len).map(|j| (f * 31 + k * 7 + j) as u8).collect()
}

struct Flow {
    client: UdpSocket,
    server: UdpSocket,
    to: SocketAddr,
    tos: u8,
    gateway: IpAddr,
}

#[test]
fn bursts_of_both_families_odd_sizes_and_marks_reach_each_server_whole_with_their_own_mark_and_back() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let daemon = lab.start_tproxyd(&config());
    let c4: IpAddr = CLIENT4.parse().unwrap();
    let c6: IpAddr = CLIENT6.parse().unwrap();
    // Alternating families; marks that differ from one flow to the next
    // (one unmarked) so a mark carried over would show.
    let plan: [(IpAddr, IpAddr, IpAddr, u8); 6] = [
        (c4, server4(0), gateway_wan4(0), 0xb8),
        (c6, server6(0), gateway_wan6(0), 0x00),
        (c4, server4(0), gateway_wan4(0), 0x02),
        (c6, server6(0), gateway_wan6(0), 0x48),
        (c4, server4(0), gateway_wan4(0), 0x00),
        (c6, server6(0), gateway_wan6(0), 0xba),
    ];
    let flows: Vec<Flow> = plan
        .iter()
        .enumerate()
        .map(|(f, &(client, server, gateway, tos))| {
            let to = sa(server, 7001 + f as u16);
            let srv = socket(&lab.servers[0], to);
            mark_tos(&srv, 0);
            let cli = socket(&lab.client, sa(client, 41001 + f as u16));
            mark_tos(&cli, tos);
            Flow {
                client: cli,
                server: srv,
                to,
                tos,
                gateway,
            }
        })
        .collect();
    // Two bursts, each every flow's datagrams in turn, as fast as they go.
    let per_flow = SIZES.len() * 2;
    for burst in 0..2 {
        for k in burst * SIZES.len()..(burst + 1) * SIZES.len() {
            for (f, flow) in flows.iter().enumerate() {
                flow.client.send_to(&payload(f, k), flow.to).unwrap();
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let mut peers = HashMap::new();
    for (f, flow) in flows.iter().enumerate() {
        let mut got = Vec::new();
        while got.len() < per_flow {
            let Some((peer, data, tos)) = recv_tos(&flow.server) else {
                break;
            };
            assert_eq!(peer.ip(), flow.gateway, "flow {f}: the server must see the gateway");
            assert_eq!(
                tos,
                flow.tos,
                "flow {f}: datagram of {} bytes carries another mark",
                data.len()
            );
            peers.insert(f, peer);
            got.push(data);
        }
        let want: Vec<Vec<u8>> = (0..per_flow).map(|k| payload(f, k)).collect();
        let sizes = |v: &[Vec<u8>]| v.iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(
            sizes(&got),
            sizes(&want),
            "flow {f} to {}: sizes as received\n{}",
            flow.to,
            daemon.log_text()
        );
        assert!(got == want, "flow {f} to {}: payloads differ", flow.to);
    }
    // Back: every server answers each datagram at once; each client sees
    // every answer whole, from the address it wrote to.
    for (f, flow) in flows.iter().enumerate() {
        for k in 0..per_flow {
            flow.server.send_to(&payload(f, k), peers[&f]).unwrap();
        }
    }
    for (f, flow) in flows.iter().enumerate() {
        for k in 0..per_flow {
            let (from, data, _) =
                recv_tos(&flow.client).unwrap_or_else(|| panic!("flow {f}: answer {k} lost\n{}", daemon.log_text()));
            assert_eq!(from, flow.to, "flow {f}: answer {k} from the wrong address");
            assert!(
                data == payload(f, k),
                "flow {f}: answer {k} differs ({} bytes)",
                data.len()
            );
        }
    }
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert_eq!(stopped.counter("sessions_opened"), plan.len() as u64, "{}", stopped.log);
    assert_eq!(stopped.counter("upstream_datagrams"), (plan.len() * per_flow) as u64);
    assert_eq!(stopped.counter("reply_datagrams"), (plan.len() * per_flow) as u64);
}
