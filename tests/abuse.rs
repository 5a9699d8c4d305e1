//! The relay under abuse, in the namespace lab: one device misbehaving must
//! not cost the others their flows.
//!
//! Each test performs one abuse from issue "Relay under abuse" and asserts
//! what the other users would notice. Latency bounds here are generous (a
//! loaded 2-core CI machine must not flake) but still far below the stalls
//! the abuse used to cause; the figures themselves are measured by the
//! benchmark (bench/, docs/BENCHMARKS.md).

mod lab;

use lab::flood::{LateServer, Prober, big_socket, fds, fold_ports, metric, rss, scrape, send_paced, summary};
use lab::udp::{Echo, socket};
use lab::{CLIENT4, Lab, sa, server4};
use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const ADMIN: &str = "127.0.0.1:9153";

/// These tests each load the machine on purpose; run together they would
/// measure each other. One at a time.
static HEAVY: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    HEAVY.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn config(relay_extra: &str) -> String {
    format!("mark = 255\n[admin]\nlisten = \"{ADMIN}\"\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n{relay_extra}\n")
}

/// A lab whose server answers UDP on every port of `first..=last` through
/// one socket (see `fold_ports`), plus a plain echo on port 6000 for probes.
fn folded_lab(first: u16, last: u16, extra_clients: &[&str]) -> (Lab, Echo, Echo) {
    let lab = Lab::new();
    for c in extra_clients {
        lab.add_client_address(ip(c));
    }
    lab.install_rules("nft", "LAN_IF=lan0");
    // Room for bursts at the test's own endpoints, so what is lost is lost
    // in the gateway.
    for ns in [&lab.client, &lab.servers[0]] {
        ns.sh("sysctl -qw net.core.rmem_max=33554432 net.core.wmem_max=33554432 net.core.rmem_default=4194304");
    }
    fold_ports(&lab.servers[0], first, last, 7000);
    let folded = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let probe = Echo::start(&lab.servers[0], sa(server4(0), 6000));
    (lab, folded, probe)
}

#[test]
fn one_socket_to_twenty_thousand_destinations_is_linear_and_stalls_no_one() {
    const N: usize = 20_000;
    let _heavy = one_at_a_time();
    const FIRST: u16 = 10_000;
    let (lab, _folded, probe_echo) = folded_lab(FIRST, FIRST + N as u16 - 1, &["192.0.2.11"]);
    // A small listener queue, so that what an overloaded (unoptimised,
    // shared) machine cannot keep up with is dropped and sent again rather
    // than queued in front of the probe for a second.
    let daemon = lab.start_tproxyd(&config("new_flows_per_client = 0\nreceive_buffer = 262144"));
    let prober = Prober::start(
        socket(&lab.client, sa(ip("192.0.2.11"), 40000)),
        probe_echo.addr,
        Duration::from_millis(20),
    );
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss(daemon.pid());

    let flooder = big_socket(&lab.client, sa(ip(CLIENT4), 41000));
    let server = server4(0);
    let seen: Arc<Mutex<HashSet<u16>>> = Arc::default();
    let receiver = {
        let (sock, seen) = (flooder.try_clone().unwrap(), seen.clone());
        std::thread::spawn(move || {
            let mut wrong = Vec::new();
            let mut buf = [0u8; 64];
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            while seen.lock().unwrap().len() < N {
                let Ok((n, from)) = sock.recv_from(&mut buf) else { break };
                let expected = format!("to {}", from.port());
                if from.ip() != server || buf[..n] != *expected.as_bytes() {
                    wrong.push((from, String::from_utf8_lossy(&buf[..n]).into_owned()));
                }
                seen.lock().unwrap().insert(from.port());
            }
            wrong
        })
    };
    // 15,000 new flows a second: what an unoptimised build keeps up with
    // on a loaded machine (the release rate is in the benchmark). What the
    // gateway's full queue dropped is sent again, as a client would.
    let start = Instant::now();
    let payload = |p: u16| format!("to {p}").into_bytes();
    let mut missing: Vec<u16> = (0..N).map(|i| FIRST + i as u16).collect();
    for round in 0..8 {
        let rate = if round == 0 { 15_000 } else { 5_000 };
        send_paced(
            &flooder,
            missing.len(),
            rate,
            |i| sa(server, missing[i]),
            |i| payload(missing[i]),
        );
        std::thread::sleep(Duration::from_millis(500));
        let got = seen.lock().unwrap();
        missing.retain(|p| !got.contains(p));
        if missing.is_empty() {
            break;
        }
    }
    let opened_in = start.elapsed();
    let wrong = receiver.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    let rss_after = rss(daemon.pid());
    let rtts = prober.finish();
    let (ok, lost, p50, p99, max) = summary(&rtts);
    let per_flow = rss_after.saturating_sub(rss_before) / N as u64;
    eprintln!(
        "{N} destinations answered in {opened_in:?}; {} answered; probe: {ok} ok, {lost} lost, p50 {p50:?} p99 {p99:?} max {max:?}; \
         RSS +{per_flow} B/flow; fds {}",
        seen.len(),
        fds(daemon.pid())
    );
    let stopped = daemon.stop();
    assert!(
        wrong.is_empty(),
        "replies from the wrong source or with the wrong payload: {:?}",
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        seen.len() == N,
        "only {} of {N} destinations answered:\n{}",
        seen.len(),
        stopped.log
    );
    // Quadratic choice took 9.8 s for 6,025 destinations, so about 100 s
    // for 20,000; linear takes a few seconds even unoptimised and loaded.
    assert!(
        opened_in < Duration::from_secs(20),
        "opening {N} flows took {opened_in:?}"
    );
    // The probe's datagrams share the listener's queue with the flood; a
    // lost one or two is the kernel's doing, a stall is ours.
    assert!(
        lost * 50 <= rtts.len(),
        "the other client's flow lost {lost} of {} probes",
        rtts.len()
    );
    assert!(p99 < Duration::from_secs(1), "the other client's p99 RTT was {p99:?}");
    // About 1 KiB per flow, all included (tasks, sockets' user-space side,
    // table and pool entries); 4 KiB leaves room for allocator slack.
    assert!(per_flow < 4096, "{per_flow} bytes of RSS per flow");
    assert!(stopped.counter("sessions_opened") >= N as u64 * 99 / 100);
}

#[test]
fn a_flow_flood_under_a_low_descriptor_limit_leaves_room_for_new_clients_and_metrics() {
    const PORTS: usize = 4_000;
    let _heavy = one_at_a_time();
    const SOCKETS: usize = 25; // 25 × 4,000 = 100,000 flows
    const FIRST: u16 = 20_000;
    let (lab, _folded, probe_echo) = folded_lab(FIRST, FIRST + PORTS as u16 - 1, &["192.0.2.11"]);
    let daemon = lab.start_tproxyd_wrapped(
        &["prlimit", "--nofile=2048:2048"],
        // A small listener queue: under overload the kernel drops the excess
        // instead of queueing a second of it in front of everyone.
        &config("new_flows_per_client = 0\nsession_capacity = 200000\nreceive_buffer = 262144"),
    );
    let server = server4(0);
    // 7,000 new flows a second for 14 s (what an unoptimised build keeps up
    // with on a loaded 2-core machine: past it, the kernel drops at the
    // listener's queue whoever the sender), round-robin over the sockets so
    // every one of them keeps opening flows.
    let flood = {
        let socks: Vec<_> = (0..SOCKETS)
            .map(|i| big_socket(&lab.client, sa(ip(CLIENT4), 42000 + i as u16)))
            .collect();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut sent = 0usize;
            for chunk in 0..PORTS / 40 {
                for s in &socks {
                    for i in 0..40 {
                        let _ = s.send_to(b"flood", sa(server, FIRST + (chunk * 40 + i) as u16));
                    }
                    sent += 40;
                }
                let due = start + Duration::from_nanos(1_000_000_000 / 7_000) * sent as u32;
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            start.elapsed()
        })
    };
    // Once a second, a brand-new flow from another client, and a scrape.
    let mut new_flows = 0;
    let mut answered = 0;
    let mut outcomes = Vec::new();
    let mut scrapes = Vec::new();
    let mut port = 45000;
    while !flood.is_finished() || new_flows < 5 {
        let t = Instant::now();
        let sock = socket(&lab.client, sa(ip("192.0.2.11"), port));
        port += 1;
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        new_flows += 1;
        // A client retries a lost datagram (the flood overflows the
        // listener's queue, and the kernel drops without looking at who
        // sent): five tries within the second.
        let mut outcome = None;
        for _ in 0..5 {
            sock.send_to(b"hello", probe_echo.addr).unwrap();
            if let Some((from, data)) = lab::udp::recv(&sock) {
                assert_eq!((from, data.as_slice()), (probe_echo.addr, &b"hello"[..]));
                answered += 1;
                outcome = Some(t.elapsed());
                break;
            }
        }
        outcomes.push(outcome);
        scrapes.push(scrape(&lab.gateway, ADMIN.parse().unwrap(), Duration::from_secs(1)));
        if let Some(wait) = Duration::from_secs(1).checked_sub(t.elapsed()) {
            std::thread::sleep(wait);
        }
    }
    let flood_took = flood.join().unwrap();
    let answered_scrapes: Vec<&String> = scrapes.iter().flatten().collect();
    let open_fds: Vec<u64> = answered_scrapes
        .iter()
        .filter_map(|m| metric(m, "tproxyd_open_fds"))
        .collect();
    let last = answered_scrapes.last().map(|s| s.as_str()).unwrap_or("");
    eprintln!(
        "flood of {} flows took {flood_took:?}; new flows {answered}/{new_flows} {outcomes:?}; scrapes {}/{}; open fds {open_fds:?}; \
         flow sockets {:?} of {:?}",
        PORTS * SOCKETS,
        answered_scrapes.len(),
        scrapes.len(),
        metric(last, "tproxyd_flow_sockets"),
        metric(last, "tproxyd_flow_sockets_limit"),
    );
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    assert!(
        answered * 10 >= new_flows * 9,
        "only {answered} of {new_flows} new flows were answered:\n{}",
        stopped.log
    );
    assert_eq!(answered_scrapes.len(), scrapes.len(), "/metrics did not always answer");
    assert!(open_fds.iter().all(|&n| n < 2048), "descriptors: {open_fds:?}");
    // The flood really went past the budget, and was met by eviction.
    assert!(stopped.counter("sessions_evicted_budget") > 10_000, "{}", stopped.log);
    // ... and almost never by failing the new flow.
    assert!(
        stopped.counter("drop_fd_budget") * 1000 <= stopped.counter("sessions_opened"),
        "{}",
        stopped.log
    );
    // No warning per failed flow or accept.
    let warnings = stopped.log.matches(" WARN ").count();
    assert!(warnings < 10, "{warnings} warnings:\n{}", stopped.log);
}

#[test]
fn a_client_flooding_a_full_table_does_not_cost_quiet_clients_their_replies() {
    const QUIET: usize = 20;
    const FLOWS: usize = 200_000;
    const FIRST: u16 = 20_000;
    const PORTS: usize = 4_000;
    let _heavy = one_at_a_time();
    let quiet_ips: Vec<String> = (0..QUIET).map(|i| format!("192.0.2.{}", 20 + i)).collect();
    let refs: Vec<&str> = quiet_ips.iter().map(String::as_str).collect();
    let (lab, folded, _probe) = folded_lab(FIRST, FIRST + PORTS as u16 - 1, &refs);
    // The flood's datagrams go unanswered: 15,000 replies a second back to
    // the client namespace would overflow its CPU backlog on a loaded
    // machine and drop the quiet clients' answers there, outside tproxyd.
    drop(folded);
    let _sink = LateServer::start(&lab.servers[0], sa(server4(0), 7000), None);
    // A per-client quota as large as the table and no rate limit: only
    // "evict from the heaviest client" stands between the flood and the
    // quiet clients' flows.
    let daemon = lab.start_tproxyd(&config(
        "session_capacity = 10000\nmax_sessions_per_client = 10000\nnew_flows_per_client = 0",
    ));
    // Answers each request 3 s later: the quiet flows sit idle for 3 s
    // while the flood churns the table.
    let late = LateServer::start(&lab.servers[0], sa(server4(0), 6100), Some(Duration::from_secs(3)));
    let server = server4(0);
    let flood = {
        let socks: Vec<_> = (0..FLOWS / PORTS)
            .map(|i| big_socket(&lab.client, sa(ip(CLIENT4), 42000 + i as u16)))
            .collect();
        std::thread::spawn(move || {
            let start = Instant::now();
            for s in &socks {
                send_paced(
                    s,
                    PORTS,
                    15_000,
                    |i| sa(server, FIRST + i as u16),
                    |_| b"flood".to_vec(),
                );
            }
            start.elapsed()
        })
    };
    let quiet: Vec<_> = quiet_ips
        .iter()
        .enumerate()
        .map(|(c, addr)| {
            let sock = socket(&lab.client, sa(ip(addr), 40000));
            sock.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
            let to = late_addr();
            std::thread::spawn(move || {
                let mut got = HashSet::new();
                let start = Instant::now();
                let mut buf = [0u8; 64];
                for round in 0..4u64 {
                    let due = Duration::from_millis(4_000 * round + 50 * c as u64);
                    while start.elapsed() < due {
                        if let Ok((n, from)) = sock.recv_from(&mut buf) {
                            if from == to && !buf[..n].starts_with(b"ack:") {
                                got.insert(buf[..n].to_vec());
                            }
                        }
                    }
                    // The request may die in the gateway's overflowing queue
                    // like any datagram of the flood: retry until acknowledged.
                    let request = format!("q{c}-{round}");
                    let ack = format!("ack:{request}");
                    'tries: for _ in 0..20 {
                        let _ = sock.send_to(request.as_bytes(), to);
                        let asked = Instant::now();
                        while asked.elapsed() < Duration::from_millis(150) {
                            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                                if from != to {
                                    continue;
                                }
                                if buf[..n] == *ack.as_bytes() {
                                    break 'tries;
                                }
                                if !buf[..n].starts_with(b"ack:") {
                                    got.insert(buf[..n].to_vec());
                                }
                            }
                        }
                    }
                }
                // The last answer comes 3 s after the last request (and on
                // a loaded machine, maybe a while later).
                let end = Instant::now() + Duration::from_secs(8);
                while Instant::now() < end {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        if from == to && !buf[..n].starts_with(b"ack:") {
                            got.insert(buf[..n].to_vec());
                        }
                    }
                }
                got
            })
        })
        .collect();
    let flood_took = flood.join().unwrap();
    let received: HashSet<Vec<u8>> = quiet.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let sent = late.sent();
    let lost: Vec<String> = sent
        .iter()
        .filter(|p| !received.contains(*p))
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    let stopped = daemon.stop();
    eprintln!(
        "flood of {FLOWS} flows in {flood_took:?}; quiet replies sent {}, lost {}; evicted (table full) {}, opened {}; \
         unsolicited {}, send buffer full {}, reply errors {}; gateway {}; client {}",
        sent.len(),
        lost.len(),
        stopped.counter("sessions_evicted"),
        stopped.counter("sessions_opened"),
        stopped.counter("drop_unsolicited"),
        stopped.counter("drop_send_buffer_full"),
        stopped.counter("reply_send_errors"),
        lab.gateway
            .sh("nstat -az UdpRcvbufErrors UdpInErrors | tail -n +2 | tr -s ' ' | tr '\\n' ' '"),
        lab.client
            .sh("nstat -az UdpRcvbufErrors UdpInErrors | tail -n +2 | tr -s ' ' | tr '\\n' ' '"),
    );
    assert!(
        sent.len() >= QUIET * 4 / 2,
        "the server answered only {} requests",
        sent.len()
    );
    // At most 1 % lost; evicting the wrong client lost 398 of 433 here.
    assert!(
        lost.len() * 100 <= sent.len(),
        "quiet clients lost replies: {lost:?}\n{}",
        stopped.log
    );
    // The table really was full and churning.
    assert!(stopped.counter("sessions_evicted") > 20_000, "{}", stopped.log);
    assert!(
        flood_took > Duration::from_secs(12),
        "the flood must outlast the quiet clients' rounds"
    );
}

fn late_addr() -> std::net::SocketAddr {
    sa(server4(0), 6100)
}

#[test]
fn new_flows_beyond_a_clients_rate_are_dropped_and_counted() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let _echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let daemon = lab.start_tproxyd(&config("new_flows_per_client = 50"));
    // 500 new flows at once from one client: the bucket holds 50.
    let socks: Vec<_> = (0..500u16)
        .map(|i| socket(&lab.client, sa(ip(CLIENT4), 43000 + i)))
        .collect();
    for s in &socks {
        s.send_to(b"new", sa(server4(0), 7000)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    // Another client is not affected by the first one's bucket.
    lab.add_client_address(ip("192.0.2.11"));
    let other = socket(&lab.client, sa(ip("192.0.2.11"), 43000));
    assert_eq!(lab::udp::exchange(&other, sa(server4(0), 7000), b"mine").1, b"mine");
    let stopped = daemon.stop();
    let opened = stopped.counter("sessions_opened");
    let refused = stopped.counter("drop_new_flow_rate");
    assert_eq!(opened + refused, 501, "{}", stopped.log);
    // 50 in the bucket, plus the refill while the burst was read (50/s).
    assert!((51..=100).contains(&opened), "opened {opened}\n{}", stopped.log);
}

#[test]
fn a_flood_of_64_kb_datagrams_does_not_hold_up_another_clients_flow() {
    let _heavy = one_at_a_time();
    let (lab, _folded, probe_echo) = folded_lab(20_000, 20_001, &["192.0.2.11"]);
    let _sink = LateServer::start(&lab.servers[0], sa(server4(0), 6200), None);
    let daemon = lab.start_tproxyd(&config(""));
    let prober = Prober::start(
        socket(&lab.client, sa(ip("192.0.2.11"), 40000)),
        probe_echo.addr,
        Duration::from_millis(20),
    );
    // The control: the same client, link and CPUs, answered by the gateway
    // itself without tproxyd. What the flood costs it is the kernel's and
    // the machine's; only what tproxyd's flow pays beyond that is ours.
    let local_echo = Echo::start(&lab.gateway, sa(ip(lab::GATEWAY_LAN4), 6001));
    let control = Prober::start(
        socket(&lab.client, sa(ip("192.0.2.11"), 40001)),
        local_echo.addr,
        Duration::from_millis(20),
    );
    // And the other half of the path: the gateway itself to the same
    // server, over the link the flood leaves by.
    let wan_control = Prober::start(
        socket(&lab.gateway, sa(lab::gateway_wan4(0), 40002)),
        probe_echo.addr,
        Duration::from_millis(20),
    );
    std::thread::sleep(Duration::from_secs(2));
    let baseline = prober.reset();
    control.reset();
    wan_control.reset();
    // Two senders of 65,000-byte datagrams, as fast as they can.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders: Vec<_> = (0..2u16)
        .map(|i| {
            let sock = big_socket(&lab.client, sa(ip(CLIENT4), 41000 + i));
            let stop = stop.clone();
            std::thread::spawn(move || {
                let big = vec![0x55u8; 65_000];
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if sock.send_to(&big, sa(server4(0), 6200)).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    let flooded = prober.finish();
    let control = control.finish();
    let wan_control = wan_control.finish();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
    let stopped = daemon.stop();
    let (_, _, _, base_p99, _) = summary(&baseline);
    let (ok, lost, p50, p99, max) = summary(&flooded);
    let (_, _, _, lan_p99, _) = summary(&control);
    let (_, _, _, wan_p99, _) = summary(&wan_control);
    // Each half of the path as the flood left it, without tproxyd.
    let control_p99 = lan_p99 + wan_p99;
    let relayed = stopped.counter("upstream_bytes");
    eprintln!(
        "64 KB flood: {sent} sent, {} MB relayed; probe baseline p99 {base_p99:?}; under flood {ok} ok, {lost} lost, \
         p50 {p50:?} p99 {p99:?} max {max:?}; control p99 LAN {lan_p99:?} + WAN {wan_p99:?}",
        relayed >> 20
    );
    assert!(
        relayed > 50 << 20,
        "the flood hardly reached the gateway: {relayed} bytes"
    );
    assert!(lost * 50 <= flooded.len(), "the probe lost {lost} of {}", flooded.len());
    // Head-of-line blocking behind whole batches of 64 KB datagrams cost
    // 150-300 ms on a quiet machine and over 500 ms in this test on a loaded
    // one; bounded rounds cost a few ms (the figure is in the benchmark).
    // Beyond what the control paid, and generous for a loaded machine.
    let added = p99.saturating_sub(control_p99.max(base_p99));
    assert!(
        added < Duration::from_millis(300),
        "added p99 {added:?} (baseline {base_p99:?}, control {control_p99:?}, flooded {p99:?})"
    );
}

/// ICMP destination-unreachable messages `ns` has sent (from /proc/net/snmp).
fn icmp_unreachables_sent(ns: &lab::Netns) -> u64 {
    let snmp = ns.sh("cat /proc/net/snmp");
    let mut icmp = snmp.lines().filter(|l| l.starts_with("Icmp:"));
    let (Some(names), Some(values)) = (icmp.next(), icmp.next()) else {
        panic!("no Icmp lines in:\n{snmp}");
    };
    let at = names
        .split_whitespace()
        .position(|n| n == "OutDestUnreachs")
        .expect("OutDestUnreachs");
    values
        .split_whitespace()
        .nth(at)
        .and_then(|v| v.parse().ok())
        .expect("a count")
}

#[test]
fn each_icmp_error_is_counted_once_under_load() {
    let _heavy = one_at_a_time();
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    // Every datagram to a closed port gets its ICMP error: no rate limit.
    lab.servers[0]
        .sh("sysctl -qw net.ipv4.icmp_ratelimit=0 net.ipv4.icmp_msgs_per_sec=100000 net.ipv4.icmp_msgs_burst=100000");
    let daemon = lab.start_tproxyd(&config(""));
    let before = icmp_unreachables_sent(&lab.servers[0]);
    // Several flows hammering closed ports: each send after an error sees
    // that error again (ECONNREFUSED) while it also sits in the error queue.
    let senders: Vec<_> = (0..4u16)
        .map(|i| {
            let sock = big_socket(&lab.client, sa(ip(CLIENT4), 44000 + i));
            std::thread::spawn(move || send_paced(&sock, 2_000, 20_000, |_| sa(server4(0), 9 + i), |_| b"x".to_vec()))
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    let sent = icmp_unreachables_sent(&lab.servers[0]) - before;
    let stopped = daemon.stop();
    let counted = stopped.counter("upstream_unreachable");
    eprintln!("ICMP port unreachable: {sent} sent by the server, {counted} counted");
    assert!(sent > 100, "the server sent only {sent} ICMP errors");
    assert!(counted <= sent, "{counted} counted for {sent} sent:\n{}", stopped.log);
    // Some may be lost when an error queue overflows, not half of them.
    assert!(counted * 2 > sent, "{counted} counted for {sent} sent");
}
