//! The relay under abuse, in the namespace lab: one device misbehaving must
//! not cost the others their flows.
//!
//! Each test performs one abuse from issue "Relay under abuse" and asserts
//! what the other users would notice. Where that is a delay, it is compared
//! with a control flow the kernel forwards at the same time, over the same
//! links and CPUs: what the machine's load costs both is not counted
//! against tproxyd, and the margins left are far below the stalls the
//! abuse used to cause. The figures themselves are measured by the
//! benchmark (bench/, docs/BENCHMARKS.md).

mod lab;

use lab::flood::{
    LateServer, Prober, big_socket, fds, flood_in_turn, flood_round_robin, folded_lab, metric, rss, scrape, send_paced,
    summary,
};
use lab::icmp::{every_icmp_error_sent, icmp_unreachables_sent};
use lab::udp::{Echo, socket};
use lab::{CLIENT4, CLIENT6, Lab, sa, server4, server6};
use std::collections::{HashMap, HashSet};
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

/// `config`, with the daemon at nice -10: for the tests that assert how
/// long something took or how much of a flood got through. The daemon's
/// own stalls still show, since they hold up its own worker; what the
/// priority keeps out is other work on the machine (the other test
/// binaries, builds), which at a load average of 9-11 made these tests
/// fail by taking the CPU from the daemon, not by anything it did. Where
/// the daemon may not raise its priority (an unprivileged namespace) it
/// warns and keeps the one it inherited.
fn config_ahead_of_the_machine(relay_extra: &str) -> String {
    format!("nice = -10\n{}", config(relay_extra))
}

/// A 50 pps flow through tproxyd from `relayed` and the same flow from
/// `forwarded`, which the kernel forwards: started together.
fn probe_pair(lab: &Lab, probe: &Echo, control: &Echo, relayed: &str, forwarded: &str) -> (Prober, Prober) {
    let every = Duration::from_millis(20);
    (
        Prober::start(socket(&lab.client, sa(ip(relayed), 40000)), probe.addr, every),
        Prober::start(socket(&lab.client, sa(ip(forwarded), 40000)), control.addr, every),
    )
}

/// Both probers' round trips, finished together.
fn finish_both(a: Prober, b: Prober) -> (Vec<Option<Duration>>, Vec<Option<Duration>>) {
    std::thread::scope(|s| {
        let b = s.spawn(|| b.finish());
        (a.finish(), b.join().unwrap())
    })
}

#[test]
fn one_socket_to_twenty_thousand_destinations_is_linear_and_stalls_no_one() {
    const N: usize = 20_000;
    let _heavy = one_at_a_time();
    const FIRST: u16 = 10_000;
    let (lab, _folded, probe_echo, control_echo) =
        folded_lab(FIRST, FIRST + N as u16 - 1, &["192.0.2.11", "192.0.2.12"]);
    // The default listener queue: a listener that opened flows itself held
    // seconds of the flood there, in front of everyone.
    let daemon = lab.start_tproxyd(&config_ahead_of_the_machine("new_flows_per_client = 0"));
    let (prober, control) = probe_pair(&lab, &probe_echo, &control_echo, "192.0.2.11", "192.0.2.12");
    std::thread::sleep(Duration::from_millis(500));
    prober.reset();
    control.reset();
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
    // 40,000 new flows a second, more than even a release build opens: the
    // excess must wait or be dropped somewhere, and not in front of the
    // other client. What was dropped (the flooder's share of the backlog
    // full, the gateway's queue full) is sent again, slower, as a client
    // would, until the deadline.
    let start = Instant::now();
    let deadline = Duration::from_secs(20);
    let payload = |p: u16| format!("to {p}").into_bytes();
    let mut missing: Vec<u16> = (0..N).map(|i| FIRST + i as u16).collect();
    let mut round = 0;
    while !missing.is_empty() && start.elapsed() < deadline {
        let rate = if round == 0 { 40_000 } else { 5_000 };
        round += 1;
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
    }
    let opened_in = start.elapsed();
    let wrong = receiver.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    let rss_after = rss(daemon.pid());
    let (rtts, control) = finish_both(prober, control);
    let (ok, lost, p50, p99, max) = summary(&rtts);
    let (_, control_lost, control_p50, control_p99, control_max) = summary(&control);
    let per_flow = rss_after.saturating_sub(rss_before) / N as u64;
    eprintln!(
        "{N} destinations answered in {opened_in:?} ({round} rounds); {} answered; probe: {ok} ok, {lost} lost, p50 {p50:?} \
         p99 {p99:?} max {max:?}; kernel-forwarded control: {control_lost} lost, p50 {control_p50:?} p99 {control_p99:?} \
         max {control_max:?}; RSS +{per_flow} B/flow; fds {}",
        seen.len(),
        fds(daemon.pid())
    );
    let stopped = daemon.stop();
    eprintln!(
        "shed {} ({} in the kernel), open backlog drops {}, flows opened {}",
        stopped.counter("drop_overload"),
        stopped.counter("shed_in_kernel"),
        stopped.counter("drop_open_backlog"),
        stopped.counter("sessions_opened")
    );
    assert!(
        wrong.is_empty(),
        "replies from the wrong source or with the wrong payload: {:?}",
        &wrong[..wrong.len().min(5)]
    );
    assert!(
        seen.len() == N,
        "only {} of {N} destinations answered in {opened_in:?}:\n{}",
        seen.len(),
        stopped.log
    );
    // Quadratic choice took 9.8 s for 6,025 destinations, so about 100 s
    // for 20,000; linear takes a few seconds even unoptimised and loaded.
    assert!(opened_in < deadline, "opening {N} flows took {opened_in:?}");
    // The probe's datagrams share the gateway with the flood; a lost one
    // or two is the kernel's doing, a stall is ours.
    assert!(
        lost * 50 <= rtts.len(),
        "the other client's flow lost {lost} of {} probes",
        rtts.len()
    );
    // The flood queued in front of the other client's flow (in the
    // listener's one queue, while the listener opened flows) cost it
    // 0.2-0.5 s at p99 in a release build on a quiet machine, and in this
    // test unoptimised at load 7 p50 57 ms and p99 984 ms with 36 % lost;
    // at that load the flow now pays p50 2-4 ms and p99 40-90 ms, and up
    // to 450 ms at p99 with five copies of these tests running at once.
    // The median is what every datagram behind the flood paid; the p99
    // bound catches stalls. What the kernel-forwarded control paid, the
    // machine's load did.
    let added_p50 = p50.saturating_sub(control_p50);
    let added = p99.saturating_sub(control_p99);
    assert!(
        added_p50 < Duration::from_millis(20) && added < Duration::from_secs(1),
        "the other client's RTT was p50 {p50:?} p99 {p99:?}: {added_p50:?} and {added:?} above the kernel-forwarded \
         control's {control_p50:?} and {control_p99:?}"
    );
    // About 1 KiB per flow, all included (sockets' user-space side, table
    // and pool entries, what the new-flow backlog held, allocator slack).
    // This build measured 1,137-1,235 B while a task was spawned per pool
    // socket (its freed allocations piled up in the arena) and 640 B
    // after; 1 KiB is the figure.
    assert!(per_flow <= 1024, "{per_flow} bytes of RSS per flow");
    assert!(stopped.counter("sessions_opened") >= N as u64 * 99 / 100);
}

/// The drop, eviction and error counters that grew from one scrape
/// (`before`) to the next, as `name{labels} +n`.
fn counter_deltas(before: &str, after: &str) -> String {
    let counters = |text: &str| -> Vec<(String, u64)> {
        text.lines()
            .filter(|l| {
                ["drops_total", "evicted", "errors_total", "shed", "reply_"]
                    .iter()
                    .any(|k| l.contains(k))
            })
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (series, value) = l.rsplit_once(' ')?;
                Some((series.to_string(), value.parse().ok()?))
            })
            .collect()
    };
    let was = counters(before);
    counters(after)
        .into_iter()
        .filter_map(|(series, now)| {
            let then = was.iter().find(|(s, _)| *s == series).map_or(0, |(_, v)| *v);
            (now > then).then(|| format!("{series} +{}", now - then))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// How long a probe of a new flow that went unanswered for a second
/// goes on trying.
const LATE: Duration = Duration::from_secs(5);

#[test]
fn a_flow_flood_under_a_low_descriptor_limit_leaves_room_for_new_clients_and_metrics() {
    const PORTS: usize = 4_000;
    let _heavy = one_at_a_time();
    const SOCKETS: usize = 25; // 25 × 4,000 = 100,000 flows
    const FIRST: u16 = 20_000;
    let (lab, _folded, probe_echo, _control) = folded_lab(FIRST, FIRST + PORTS as u16 - 1, &["192.0.2.11"]);
    let daemon = lab.start_tproxyd_wrapped(
        &["prlimit", "--nofile=2048:2048"],
        &config_ahead_of_the_machine("new_flows_per_client = 0\nsession_capacity = 200000"),
    );
    let server = server4(0);
    // 12,000 new flows a second for 8 s, more than an unoptimised build
    // opens on a loaded 2-core machine: the flooder's excess is dropped
    // from its own share of the open backlog, the other client's new flow
    // waits its turn. Round-robin over the sockets so every one of them
    // keeps opening flows.
    let flood = flood_round_robin(&lab.client, ip(CLIENT4), SOCKETS, server, (FIRST, PORTS), 12_000);
    // Once a second, a brand-new flow from another client, and a scrape.
    let mut new_flows = 0;
    let mut answered = 0;
    let mut outcomes = Vec::new();
    let mut scrapes = Vec::new();
    let mut in_time = 0;
    let mut late = Vec::new();
    let mut port = 45000;
    while !flood.is_finished() || new_flows < 5 {
        let t = Instant::now();
        let sock = socket(&lab.client, sa(ip("192.0.2.11"), port));
        port += 1;
        sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        new_flows += 1;
        // A client retries a lost datagram (the flood overflows the
        // listener's queue, and the kernel drops without looking at who
        // sent): five tries within the second, and on for LATE more if
        // none was answered. A new flow waits for the opener's round in
        // progress (32 flows, each evicting another under the descriptor
        // budget), which took up to 292 ms with the test on one CPU at
        // load 9-11; and all five tries of a second can be lost (seen once
        // in 15 runs there: none reached the server, and the counters
        // could not tell whether the listener's full queue or the daemon
        // dropped them). A flow the daemon keeps dropping is never
        // answered.
        let echoed_before = probe_echo.received().len();
        let mut outcome = None;
        let mut tries = 0;
        while outcome.is_none() && t.elapsed() < Duration::from_secs(1) + LATE {
            tries += 1;
            sock.send_to(b"hello", probe_echo.addr).unwrap();
            if let Some((from, data)) = lab::udp::recv(&sock) {
                assert_eq!((from, data.as_slice()), (probe_echo.addr, &b"hello"[..]));
                outcome = Some(t.elapsed());
            }
        }
        answered += usize::from(outcome.is_some());
        in_time += usize::from(outcome.is_some_and(|o| o < Duration::from_secs(1)));
        outcomes.push(outcome);
        scrapes.push(scrape(&lab.gateway, ADMIN.parse().unwrap(), Duration::from_secs(1)));
        if outcome.is_none_or(|o| o >= Duration::from_secs(1)) {
            // Where the probe was held up or lost: did its datagrams reach
            // the server (tproxyd relayed them), and what did the daemon
            // drop or evict meanwhile?
            let before = scrapes.iter().rev().nth(1).cloned().flatten().unwrap_or_default();
            let after = scrapes.last().cloned().flatten().unwrap_or_default();
            late.push(format!(
                "probe {new_flows} ({outcome:?}): the server got {} of {tries}; {}",
                probe_echo.received().len() - echoed_before,
                counter_deltas(&before, &after)
            ));
        }
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
    eprintln!("late or unanswered: {late:?}");
    let stopped = daemon.stop();
    assert!(stopped.status.success(), "{}", stopped.log);
    // No new flow of the other client is dropped for good (by a share of
    // the backlog, the budget, an eviction)...
    assert_eq!(
        answered, new_flows,
        "new flows of the other client went unanswered: {late:?}\n{}",
        stopped.log
    );
    // ... and at most one in ten (rounded up) waits longer than the
    // second for its answer. Asked as "9 of 10 answered within the
    // second", it demanded 9 of 9 when the flood ended within nine
    // probes, and one probe whose tries were all lost in that second
    // failed it (at load 6-7, 8 of 9).
    assert!(
        new_flows - in_time <= new_flows.div_ceil(10),
        "only {in_time} of {new_flows} new flows were answered within the second: {late:?}\n{}",
        stopped.log
    );
    assert_eq!(answered_scrapes.len(), scrapes.len(), "/metrics did not always answer");
    assert!(open_fds.iter().all(|&n| n < 2048), "descriptors: {open_fds:?}");
    // The flood really used up the budget, and was met by eviction. (How
    // many flows it evicted depends on how many the machine let it open:
    // 500-60,000 seen, the fewest with five copies of these tests at once.)
    let limit = metric(last, "tproxyd_flow_sockets_limit").unwrap_or(0);
    let most = answered_scrapes
        .iter()
        .filter_map(|m| metric(m, "tproxyd_flow_sockets"))
        .max()
        .unwrap_or(0);
    assert!(
        limit > 0 && most * 100 >= limit * 99,
        "the flood used {most} of {limit} flow sockets"
    );
    assert!(stopped.counter("sessions_evicted_budget") > 100, "{}", stopped.log);
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
    let (lab, folded, _probe, _control) = folded_lab(FIRST, FIRST + PORTS as u16 - 1, &refs);
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
    let flood = flood_in_turn(&lab.client, ip(CLIENT4), FLOWS / PORTS, server, (FIRST, PORTS), 15_000);
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
    let (lab, _folded, probe_echo, control_echo) = folded_lab(20_000, 20_001, &["192.0.2.11", "192.0.2.12"]);
    let _sink = LateServer::start(&lab.servers[0], sa(server4(0), 6200), None);
    // Sixteen queues: the other client's socket shares one with a flooding
    // socket less often (the kernel picks by a hash), and shares less of
    // it when it does.
    let daemon = lab.start_tproxyd(&config("listener_sockets = 16"));
    // The control: the same flow from the same client namespace over the
    // same links and CPUs, forwarded by the kernel. What the flood and the
    // machine's load cost it is not tproxyd's doing; only what the relayed
    // flow pays beyond that is.
    let (prober, control) = probe_pair(&lab, &probe_echo, &control_echo, "192.0.2.11", "192.0.2.12");
    std::thread::sleep(Duration::from_secs(2));
    let baseline = prober.reset();
    control.reset();
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
    let (flooded, control) = finish_both(prober, control);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let sent: u64 = senders.into_iter().map(|t| t.join().unwrap()).sum();
    let stopped = daemon.stop();
    let (_, _, base_p50, base_p99, _) = summary(&baseline);
    let (ok, lost, p50, p99, max) = summary(&flooded);
    let (_, control_lost, control_p50, control_p99, control_max) = summary(&control);
    let relayed = stopped.counter("upstream_bytes");
    eprintln!(
        "64 KB flood: {sent} sent, {} MB relayed; probe baseline p50 {base_p50:?} p99 {base_p99:?}; under flood {ok} ok, \
         {lost} lost, p50 {p50:?} p99 {p99:?} max {max:?}; kernel-forwarded control {control_lost} lost, p50 \
         {control_p50:?} p99 {control_p99:?} max {control_max:?}",
        relayed >> 20
    );
    // Relayed or shed, in user space or by the kernel's hold (which grows
    // while the flood goes on and leaves less of it relayed): what reached
    // the gateway.
    let reached = relayed + stopped.counter("drop_overload") * 65_000;
    assert!(
        reached > 50 << 20,
        "the flood hardly reached the gateway: {relayed} bytes relayed, {reached} in all"
    );
    assert!(lost * 50 <= flooded.len(), "the probe lost {lost} of {}", flooded.len());
    // Behind the flood in one FIFO queue, the other flow waited for
    // whatever the queue held: at p50, 17-37 ms above the control in a
    // release build and 30 ms in this test unoptimised; every datagram
    // paid it, so the median shows it whatever the machine's load. In a
    // queue of its own, served in turn with the flood's, it waits a turn
    // or two (under 1-8 ms here at load 5-7; p99 up to 460 ms with five
    // copies of these tests running at once). Both compared with the
    // kernel-forwarded control, which pays the flood's cost on the links
    // and the machine's load; the p99 bound only catches stalls.
    let added_p50 = p50.saturating_sub(control_p50.max(base_p50));
    let added_p99 = p99.saturating_sub(control_p99.max(base_p99));
    assert!(
        added_p50 < Duration::from_millis(15) && added_p99 < Duration::from_secs(1),
        "added p50 {added_p50:?}, p99 {added_p99:?} (flooded p50 {p50:?} p99 {p99:?}, baseline p99 {base_p99:?}, \
         control p50 {control_p50:?} p99 {control_p99:?})"
    );
}

/// Shed in user space, every datagram of a 64 KB flood still woke the
/// relay's worker and was copied out of the kernel before it was dropped,
/// CPU another client's datagram waited for. Now shedding has the kernel
/// drop the shed client's datagrams (a socket filter on the listeners)
/// for a while: the kernel does at least as much of the shedding as the
/// listener, and the filter comes off again, the flooding client's next
/// datagram relayed as any other.
#[test]
fn a_shed_flood_is_dropped_by_the_kernel_and_the_filter_comes_off_after() {
    let _heavy = one_at_a_time();
    let (lab, _folded, probe_echo, _control_echo) = folded_lab(20_000, 20_001, &["192.0.2.11"]);
    let _sink = LateServer::start(&lab.servers[0], sa(server4(0), 6200), None);
    let sink = sa(server4(0), 6200);
    // Each member's queue holds 4 MiB, some 30 of the flood's datagrams,
    // so that one 30 ms pause sheds a run long enough for the kernel's
    // filter (as in the test above). With the default share (two or three
    // datagrams) each pause shed a few, the relay caught up in between,
    // and on a quiet machine the filter never went on: 486 shed, none by
    // the kernel, once in CI.
    let daemon = lab.start_tproxyd(&config_ahead_of_the_machine(
        "listener_sockets = 16\nreceive_buffer = 67108864",
    ));
    // Another client active all along: one client alone is never shed.
    let other = socket(&lab.client, sa(ip("192.0.2.11"), 40000));
    let prober = Prober::start(other, probe_echo.addr, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(1));
    flood_big_with_stalls(&lab, daemon.pid(), CLIENT4, sink, 12);
    let _ = prober.finish();
    // Long past the filter's hold and the byte counts' windows: the
    // flooding address is an ordinary client again.
    std::thread::sleep(Duration::from_millis(1_500));
    let after = socket(&lab.client, sa(ip(CLIENT4), 41010));
    let answered = (0..3u8)
        .filter(|&k| {
            after.send_to(&[k; 3], probe_echo.addr).is_ok()
                && lab::udp::recv(&after).is_some_and(|(from, data)| from == probe_echo.addr && data == [k; 3])
        })
        .count();
    let metrics = scrape(&lab.gateway, ADMIN.parse().unwrap(), Duration::from_secs(5)).unwrap_or_default();
    let stopped = daemon.stop();
    let shed = stopped.counter("drop_overload");
    let in_kernel = stopped.counter("shed_in_kernel");
    eprintln!("kernel-side shedding: {shed} shed, {in_kernel} of them by the kernel");
    assert!(in_kernel > 0, "the kernel shed nothing ({shed} shed)\n{}", stopped.log);
    assert!(
        in_kernel * 2 >= shed,
        "the listener shed {} itself, the kernel only {in_kernel}",
        shed - in_kernel
    );
    assert_eq!(
        metric(&metrics, "tproxyd_shed_in_kernel_total").map(|m| m > 0),
        Some(true),
        "{metrics}"
    );
    assert_eq!(answered, 3, "the flooding address is still filtered\n{}", stopped.log);
}

#[test]
fn each_icmp_error_is_counted_once_under_load() {
    let _heavy = one_at_a_time();
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    // Every datagram to a closed port gets its ICMP error: no rate limit.
    every_icmp_error_sent(&lab.servers[0]);
    let daemon = lab.start_tproxyd(&config(""));
    let before = icmp_unreachables_sent(&lab.servers[0]);
    // Several flows hammering closed ports: each send after an error sees
    // that error again (ECONNREFUSED) while it also sits in the error queue.
    // Each client socket goes round 16 ports, so that no two consecutive
    // datagrams are one flow's: a flow's run leaves as one GSO train, which
    // the server's kernel, handed the train whole over the veth, answers
    // with one error for the lot. Sent to one port each, the relay read
    // longer runs the further it fell behind: beside three busy loops the
    // server sent as few as 44 errors for 2,700 datagrams relayed (each
    // counted once), and 32 of 60 runs failed the threshold below.
    let senders: Vec<_> = (0..4u16)
        .map(|i| {
            let sock = big_socket(&lab.client, sa(ip(CLIENT4), 44000 + i));
            let closed = move |k: usize| sa(server4(0), 30_000 + 16 * i + (k % 16) as u16);
            std::thread::spawn(move || send_paced(&sock, 2_000, 20_000, closed, |_| b"x".to_vec()))
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    // Stopped first: an error arriving after this is counted by no one,
    // and only adds to what the server sent.
    let stopped = daemon.stop();
    let sent = icmp_unreachables_sent(&lab.servers[0]) - before;
    let counted = stopped.counter("upstream_unreachable");
    eprintln!(
        "ICMP port unreachable: {sent} sent by the server, {counted} counted; {} datagrams read, {} relayed",
        stopped.counter("client_datagrams"),
        stopped.counter("upstream_datagrams")
    );
    assert!(sent > 100, "the server sent only {sent} ICMP errors");
    assert!(counted <= sent, "{counted} counted for {sent} sent:\n{}", stopped.log);
    // Some may be lost when an error queue overflows, not half of them.
    assert!(counted * 2 > sent, "{counted} counted for {sent} sent");
}

/// Continues a stopped process when dropped, also when the test fails.
struct Paused(u32);

impl Paused {
    /// Returns once the kernel reports the process stopped: `kill` only
    /// queues the signal, and a daemon still running for a moment would
    /// read part of what the test sends next.
    fn new(pid: u32) -> Paused {
        // SAFETY: kill(2) with a pid this test started.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGSTOP) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !stopped(pid) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(stopped(pid), "tproxyd (pid {pid}) did not stop on SIGSTOP");
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

/// Whether `pid` is stopped (state `T` in /proc/PID/stat).
fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('T')))
        .unwrap_or(false)
}

/// Datagrams queued per listening socket of the relay (`ss`, Recv-Q).
fn listener_queues(lab: &Lab) -> Vec<u64> {
    lab.gateway
        .sh("ss -uanH 'sport = :15353'")
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1).and_then(|q| q.parse().ok()))
        .collect()
}

#[test]
fn each_client_socket_queues_in_one_member_of_the_listener_group() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let daemon = lab.start_tproxyd(&config("listener_sockets = 4"));
    assert_eq!(listener_queues(&lab).len(), 4, "{}", lab.gateway.sh("ss -uanp"));
    // With the relay paused, what the kernel queued where is visible: the
    // 64 client sockets' datagrams spread over the members.
    let socks: Vec<_> = (0..64u16)
        .map(|i| socket(&lab.client, sa(ip(CLIENT4), 46000 + i)))
        .collect();
    {
        let _paused = Paused::new(daemon.pid());
        for s in &socks {
            s.send_to(b"one", echo.addr).unwrap();
        }
        // On a loaded machine the datagrams may take a while to get
        // through the kernel's backlog, or die there: look until they have
        // spread, sending again now and then (the same flows).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut queues = listener_queues(&lab);
        while queues.iter().filter(|&&q| q > 0).count() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            queues = listener_queues(&lab);
            if queues.iter().filter(|&&q| q > 0).count() < 2 {
                for s in &socks {
                    s.send_to(b"one", echo.addr).unwrap();
                }
            }
        }
        let busy = queues.iter().filter(|&&q| q > 0).count();
        assert!(busy >= 2, "all 64 client sockets queued in one socket: {queues:?}");
    }
    for s in &socks {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (from, data) = lab::udp::recv(s).expect("an answer after the pause");
        assert_eq!((from, data.as_slice()), (echo.addr, &b"one"[..]));
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("sessions_opened"), 64, "{}", stopped.log);
}

#[test]
fn a_new_flows_first_datagrams_all_arrive_in_order() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let daemon = lab.start_tproxyd(&config(""));
    // A burst on a brand-new flow: the first datagram opens it, the rest
    // arrive while it is being opened and are held until it is.
    let socks: Vec<_> = (0..20u16)
        .map(|i| socket(&lab.client, sa(ip(CLIENT4), 47000 + i)))
        .collect();
    for s in &socks {
        for i in 0..8u8 {
            s.send_to(&[i], echo.addr).unwrap();
        }
    }
    for s in &socks {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let got: Vec<u8> = (0..8).filter_map(|_| lab::udp::recv(s)).map(|(_, d)| d[0]).collect();
        assert_eq!(got, (0..8).collect::<Vec<u8>>(), "from {:?}", s.local_addr());
    }
    let stopped = daemon.stop();
    assert_eq!(stopped.counter("sessions_opened"), 20, "{}", stopped.log);
}

#[test]
fn another_user_cannot_bind_the_relay_port_and_take_its_traffic() {
    lab::require_uid_65534();
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let daemon = lab.start_tproxyd(&config(""));
    // Not transparent, so TPROXY would drop what the kernel handed it: a
    // socket of any user that shared the port would blackhole the flows
    // it won, all of them if it is looked up first.
    let port = sa(ip("0.0.0.0"), 15353);
    let taken = [
        lab.gateway.bind_as_nobody(port, false),
        lab.gateway.bind_as_nobody(port, true),
    ];
    for i in 0..20u16 {
        let sock = socket(&lab.client, sa(ip(CLIENT4), 42_000 + i));
        assert_eq!(
            lab::udp::exchange(&sock, echo.addr, b"mine").1,
            b"mine",
            "client port {}; the other user's binds: {:?}",
            42_000 + i,
            taken
                .iter()
                .map(|t| t.as_ref().map(|_| ()).map_err(|e| e.kind()))
                .collect::<Vec<_>>()
        );
    }
    assert!(
        taken.iter().all(Result::is_err),
        "another user bound the relay's port: {taken:?}"
    );
    drop(daemon.stop());
}

/// For each of `socks`, the member of the listener group (its place in
/// `ss`'s list) its datagrams queue in, learnt with the relay paused: one
/// datagram each to `to`, and which member's queue grew. `None` when none
/// grew within 5 s (the datagram died on a loaded machine).
fn members_of(lab: &Lab, pid: u32, socks: &[&std::net::UdpSocket], to: std::net::SocketAddr) -> Vec<Option<usize>> {
    let _paused = Paused::new(pid);
    let mut before = listener_queues(lab);
    socks
        .iter()
        .map(|s| {
            s.send_to(b"where", to).unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let now = listener_queues(lab);
                let grew = now.iter().zip(&before).position(|(n, b)| n > b);
                if grew.is_some() || Instant::now() > deadline {
                    before = now;
                    return grew;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
        .collect()
}

/// What of the flood [`an_overloaded_relay_sheds_the_flooding_client_and_never_the_quiet_one`]
/// wants relayed after the first hold: 16 of its datagrams.
const AFTER_FIRST_HOLD: u64 = 1 << 20;

#[test]
fn an_overloaded_relay_sheds_the_flooding_client_and_never_the_quiet_one() {
    let _heavy = one_at_a_time();
    let (lab, _folded, probe_echo, _control_echo) = folded_lab(20_000, 20_001, &["192.0.2.11"]);
    let _sink = LateServer::start(&lab.servers[0], sa(server4(0), 6200), None);
    let sink = sa(server4(0), 6200);
    // The default target (5 ms). The relay is held still for 30 ms now
    // and then during the flood (below), so it falls that far behind on
    // any machine: on a quiet one even an unoptimised build can keep up
    // with two senders of 64 KB datagrams, and then nothing is to be shed.
    // Ahead of the machine's other work: beside three busy loops (load
    // 9-12) the daemon at the machine's priority failed 3 of 50 runs while
    // shedding as it should. Twice the quiet flow "lost" datagrams that
    // were all relayed and echoed, 3 or 4 of them after more than the
    // prober's second (one stall of 1.1 s, during which every echo waited);
    // once only 0.3 MB of the flood went through between the holds.
    // Each member's queue holds 4 MiB, some 30 of the flood's datagrams: a
    // 30 ms pause then sheds over a megabyte of the flooding client in one
    // overload, as a flood past what the relay carries does, and the
    // kernel's filter goes on. With the default share (256 KiB, two or
    // three datagrams) each pause shed a few and the filter went on only
    // because those few added up across pauses, which a client the relay
    // carries between brief overloads must not suffer (src/relay/shed.rs).
    let daemon = lab.start_tproxyd(&config_ahead_of_the_machine(
        "listener_sockets = 16\nreceive_buffer = 67108864",
    ));
    let flooders: Vec<_> = (0..2u16)
        .map(|i| big_socket(&lab.client, sa(ip(CLIENT4), 41000 + i)))
        .collect();
    // The quiet client's socket must not share a listener queue with a
    // flooding one: the kernel would drop its datagrams in that full queue
    // before the relay saw them, which is not what this test is about.
    let candidates: Vec<_> = (0..16u16)
        .map(|i| socket(&lab.client, sa(ip("192.0.2.11"), 40000 + i)))
        .collect();
    let socks: Vec<&std::net::UdpSocket> = flooders.iter().chain(&candidates).collect();
    let members = members_of(&lab, daemon.pid(), &socks, sink);
    let flooded_members = &members[..2];
    assert!(flooded_members.iter().all(Option::is_some), "{members:?}");
    let quiet = candidates
        .into_iter()
        .zip(&members[2..])
        .find(|(_, m)| m.is_some() && !flooded_members.contains(m))
        .map(|(s, _)| s)
        .unwrap_or_else(|| panic!("no quiet socket in a queue of its own: {members:?}"));
    // What the pause queued waited for seconds, and the quiet client sent
    // the most of it: the relay sheds that client's datagrams until it has
    // caught up. Let that pass and the byte counts of it age out.
    std::thread::sleep(Duration::from_secs(1));
    let prober = Prober::start(quiet, probe_echo.addr, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(1));
    let before = prober.reset();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders = flood_big(flooders, sink, &stop);
    // What the relay had forwarded by the end of the first held round
    // after which /metrics showed datagrams shed by the kernel, counted
    // when a filter comes off: so once the first hold had ended. Most of
    // it is what a machine relays of two 64 KB floods before shedding
    // starts, from 1 MB with the machine's two CPUs busy to some 90 MB
    // when idle.
    //
    // The flood lasts 5 s, and longer (at most 30 s) until over a megabyte
    // of it went through after that. Holds grow (100 ms, 400 ms, 1.6 s,
    // then 6.4 s each, src/relay/shed.rs), so only two or three gaps
    // between holds fall in the first 5 s. In 14 runs, alone or beside
    // busy loops, 2.9 to 35 MB went through them; once, with the suite's
    // other tests beside this one, 0.65 MB did (3.3 MB relayed of the
    // whole flood, against 17 to 117 MB in those 14). How much goes
    // through a gap is the machine's speed; that the gaps come at all is
    // the relay's, and what is asserted below: with holds that never end
    // after the first, 12 KB (the quiet flow's probes) went through in the
    // 30 s.
    let mut relayed_when_shedding = None;
    let mut rounds = 0;
    loop {
        stall_now_and_then(daemon.pid(), 1);
        rounds += 1;
        if relayed_when_shedding.is_some() && rounds < 20 {
            continue;
        }
        let now = scrape(&lab.gateway, ADMIN.parse().unwrap(), Duration::from_secs(5)).unwrap_or_default();
        let relayed_now = metric(&now, "tproxyd_bytes_total{direction=\"to_upstream\"}");
        if relayed_when_shedding.is_none() && metric(&now, "tproxyd_shed_in_kernel_total").is_some_and(|m| m > 0) {
            relayed_when_shedding = relayed_now;
        }
        let since = relayed_now
            .zip(relayed_when_shedding)
            .map_or(0, |(now, then)| now.saturating_sub(then));
        if rounds >= 120 || (rounds >= 20 && since > AFTER_FIRST_HOLD) {
            break;
        }
    }
    let during = prober.finish();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        let _ = s.join();
    }
    let metrics = scrape(&lab.gateway, ADMIN.parse().unwrap(), Duration::from_secs(5)).unwrap_or_default();
    let stopped = daemon.stop();
    let shed = stopped.counter("drop_overload");
    let relayed = stopped.counter("upstream_bytes");
    let (ok, lost, p50, p99, _) = summary(&during);
    eprintln!(
        "overload: {shed} shed, {} MB relayed ({:?} MB after the first hold); quiet flow {ok} ok, {lost} lost, p50 \
         {p50:?} p99 {p99:?}",
        relayed >> 20,
        relayed_when_shedding.map(|r| relayed.saturating_sub(r) >> 20)
    );
    // What a user would check: the quiet client lost nothing (not one of
    // its datagrams was shed), before or during the flood ...
    assert_eq!(
        summary(&before).1,
        0,
        "the quiet flow lost datagrams before the flood: {before:?}"
    );
    assert!(during.len() >= 200, "only {} probes", during.len());
    assert_eq!(
        lost,
        0,
        "the quiet flow lost {lost} of {} ({shed} shed)\n{}",
        during.len(),
        stopped.log
    );
    // ... the flooding client was shed, and it shows on /metrics ...
    assert!(shed > 0, "nothing shed; {} MB relayed\n{}", relayed >> 20, stopped.log);
    assert_eq!(
        metric(&metrics, "tproxyd_drops_total{reason=\"overload\"}").map(|m| m > 0),
        Some(true),
        "{metrics}"
    );
    // ... and still got what the relay had left: the kernel's filter came
    // off after its hold, and the flood went on through between the holds.
    // Counted from the first hold's end, not from the start: what is
    // relayed before shedding starts is the machine's speed (a bound of 20
    // MiB on all of it failed in 4 of 6 runs with three busy loops beside
    // the test, and passed with holds that never ended when the machine
    // was idle). Over a megabyte: 16 of the flood's datagrams, more than
    // the quiet flow's probes add up to.
    let Some(at_shedding) = relayed_when_shedding else {
        panic!("/metrics never showed datagrams shed by the kernel during the flood: no hold ended\n{metrics}");
    };
    assert!(
        relayed > at_shedding + AFTER_FIRST_HOLD,
        "only {} bytes relayed after the first hold, of {relayed}, in {rounds} rounds of 250 ms",
        relayed.saturating_sub(at_shedding)
    );
}

/// One listening socket of the relay as the test sees it: a copy of the
/// daemon's descriptor (`pidfd_getfd`), to read what the kernel holds for
/// that socket (its filter, its drop count), and the listener task that
/// serves it.
struct Listener {
    fd: std::os::fd::OwnedFd,
    task: usize,
}

/// The relay's listening sockets in daemon `pid`, in the order `ss` lists
/// them (that of [`listener_queues`] and [`members_of`]). With `tasks`
/// listener tasks, the daemon hands the group's sockets out in turn, in
/// the order it made them, so in the order of their descriptors.
fn listeners(lab: &Lab, pid: u32, tasks: usize) -> Vec<Listener> {
    use std::os::fd::{FromRawFd, OwnedFd};
    let inodes: Vec<u64> = lab
        .gateway
        .sh("ss -uaneH 'sport = :15353'")
        .lines()
        .filter_map(|l| l.split_whitespace().find_map(|f| f.strip_prefix("ino:")?.parse().ok()))
        .collect();
    let mut fd_of: HashMap<u64, i32> = HashMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the daemon's descriptors")
        .flatten()
    {
        let (Ok(link), Some(fd)) = (
            std::fs::read_link(entry.path()),
            entry.file_name().to_str().and_then(|n| n.parse().ok()),
        ) else {
            continue;
        };
        if let Some(ino) = link
            .to_str()
            .and_then(|l| l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok())
        {
            fd_of.insert(ino, fd);
        }
    }
    let mut by_fd: Vec<i32> = inodes.iter().map(|i| fd_of[i]).collect();
    by_fd.sort_unstable();
    // SAFETY: plain system calls on a pid this test started; every
    // descriptor returned is checked and owned from here on.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as i32;
    assert!(pidfd >= 0, "pidfd_open: {}", std::io::Error::last_os_error());
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    inodes
        .iter()
        .map(|ino| {
            let theirs = fd_of[ino];
            let fd = unsafe {
                libc::syscall(
                    libc::SYS_pidfd_getfd,
                    std::os::fd::AsRawFd::as_raw_fd(&pidfd),
                    theirs,
                    0,
                )
            } as i32;
            assert!(fd >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
            Listener {
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
                task: by_fd.iter().position(|&f| f == theirs).unwrap_or(0) % tasks,
            }
        })
        .collect()
}

impl Listener {
    /// Instructions in the socket's filter (0: none).
    fn filter_len(&self) -> u32 {
        let mut len: libc::socklen_t = 0;
        // SAFETY: with a zero length the kernel writes nothing to the
        // buffer and returns the filter's length in `len`.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                libc::SOL_SOCKET,
                libc::SO_GET_FILTER,
                std::ptr::null_mut(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_GET_FILTER: {}", std::io::Error::last_os_error());
        len
    }

    /// Datagrams the kernel dropped for the socket (filtered, or its queue
    /// full), from `SO_MEMINFO`.
    fn drops(&self) -> u64 {
        let mut info = [0u32; 9];
        let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `info`.
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&self.fd),
                libc::SOL_SOCKET,
                55, // SO_MEMINFO
                info.as_mut_ptr().cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "SO_MEMINFO: {}", std::io::Error::last_os_error());
        u64::from(info[libc::SK_MEMINFO_DROPS as usize])
    }
}

/// With two workers the relay runs a listener task on each, each serving
/// half of the listening sockets and putting the kernel's filter on its
/// own half, while one shedder judges the clients of both. A client
/// flooding from one socket in each half is shed on both: the filter goes
/// on every socket its datagrams queue in, the quiet client (in a queue of
/// its own) loses nothing, what was shed is counted once whichever task
/// shed it, and once the flood stops the filter comes off every socket.
#[test]
fn with_two_workers_a_flood_is_shed_by_both_listener_tasks_and_counted_once() {
    let _heavy = one_at_a_time();
    let (lab, _folded, probe_echo, _control_echo) = folded_lab(20_000, 20_001, &["192.0.2.11"]);
    let _sink = LateServer::start(&lab.servers[0], sa(server4(0), 6200), None);
    let sink = sa(server4(0), 6200);
    let daemon = lab.start_tproxyd(&format!("workers = 2\n{}", config("listener_sockets = 16")));
    let sockets = listeners(&lab, daemon.pid(), 2);
    assert_eq!(sockets.len(), 16, "{}", lab.gateway.sh("ss -uanep"));
    // Where each candidate socket's datagrams queue: one flooding socket
    // in each task's half, and a quiet socket in a queue no flood shares.
    let flood_candidates: Vec<_> = (0..16u16)
        .map(|i| big_socket(&lab.client, sa(ip(CLIENT4), 41000 + i)))
        .collect();
    let quiet_candidates: Vec<_> = (0..16u16)
        .map(|i| socket(&lab.client, sa(ip("192.0.2.11"), 40000 + i)))
        .collect();
    let socks: Vec<&std::net::UdpSocket> = flood_candidates.iter().chain(&quiet_candidates).collect();
    let members = members_of(&lab, daemon.pid(), &socks, sink);
    let mut flooders = Vec::new();
    let mut flooded: Vec<usize> = Vec::new();
    for (sock, member) in flood_candidates.into_iter().zip(&members) {
        let Some(m) = *member else { continue };
        if !flooded.iter().any(|&f| sockets[f].task == sockets[m].task) {
            flooders.push(sock);
            flooded.push(m);
        }
    }
    assert_eq!(flooded.len(), 2, "no flooding socket in each task's half: {members:?}");
    let quiet = quiet_candidates
        .into_iter()
        .zip(&members[16..])
        .find(|(_, m)| m.is_some_and(|m| !flooded.contains(&m)))
        .map(|(s, _)| s)
        .unwrap_or_else(|| panic!("no quiet socket in a queue of its own: {members:?}"));
    // What the look-up queued (the quiet client sent the most of it) ages
    // out of the byte counts.
    std::thread::sleep(Duration::from_secs(1));
    let prober = Prober::start(quiet, probe_echo.addr, Duration::from_millis(20));
    std::thread::sleep(Duration::from_secs(1));
    let before = prober.reset();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let senders = flood_big(flooders, sink, &stop);
    // Which sockets had a filter on, looked at every 2 ms during the flood.
    let sockets = Arc::new(sockets);
    let watcher = {
        let (sockets, stop) = (sockets.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut filtered = vec![false; sockets.len()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (seen, s) in filtered.iter_mut().zip(sockets.iter()) {
                    *seen |= s.filter_len() > 0;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            filtered
        })
    };
    // Held still now and then, so that the relay falls behind on any
    // machine (see `an_overloaded_relay_sheds_the_flooding_client_and_never_the_quiet_one`).
    stall_now_and_then(daemon.pid(), 20);
    let during = prober.finish();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flood_sent: u64 = senders.into_iter().map(|s| s.join().unwrap()).sum();
    let filtered = watcher.join().unwrap();
    let flood_end = Instant::now();
    // The hold ends once the kernel stops dropping the client's datagrams
    // (QUIET, 200 ms), on every socket, however long the hold was to last.
    while sockets.iter().any(|s| s.filter_len() > 0) && flood_end.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let off_after = flood_end.elapsed();
    let still: Vec<usize> = (0..sockets.len()).filter(|&i| sockets[i].filter_len() > 0).collect();
    // The flooding address is an ordinary client again, in both halves.
    let after: Vec<_> = (0..8u16)
        .map(|i| socket(&lab.client, sa(ip(CLIENT4), 41100 + i)))
        .collect();
    let answered = after
        .iter()
        .filter(|s| {
            s.send_to(b"bak", probe_echo.addr).is_ok()
                && lab::udp::recv(s).is_some_and(|(from, data)| from == probe_echo.addr && data == b"bak")
        })
        .count();
    let dropped: u64 = sockets.iter().map(Listener::drops).sum();
    let stopped = daemon.stop();
    let shed = stopped.counter("drop_overload");
    let in_kernel = stopped.counter("shed_in_kernel");
    let read = stopped.counter("client_datagrams");
    let relayed = stopped.counter("upstream_datagrams");
    let (ok, lost, p50, p99, _) = summary(&during);
    eprintln!(
        "two workers: flooded members {flooded:?} (tasks {:?}); filter seen on {:?}; off on all {off_after:?} after \
         the flood; {flood_sent} flood datagrams sent, {read} read, {relayed} relayed, {shed} shed ({in_kernel} by the \
         kernel, whose listener sockets dropped {dropped}); quiet flow {ok} ok, {lost} lost, p50 {p50:?} p99 {p99:?}",
        flooded.iter().map(|&m| sockets[m].task).collect::<Vec<_>>(),
        (0..filtered.len()).filter(|&i| filtered[i]).collect::<Vec<_>>(),
    );
    assert_eq!(summary(&before).1, 0, "the quiet flow lost datagrams before the flood");
    assert!(during.len() >= 200, "only {} probes", during.len());
    assert_eq!(
        lost,
        0,
        "the quiet flow lost {lost} of {} ({shed} shed)\n{}",
        during.len(),
        stopped.log
    );
    // Shed in both halves, by the kernel too, and the filter went on every
    // socket a flooding socket queues in.
    assert!(in_kernel > 0, "the kernel shed nothing ({shed} shed)\n{}", stopped.log);
    for &m in &flooded {
        assert!(
            filtered[m],
            "no filter ever on member {m} (task {}), which a flooding socket queues in",
            sockets[m].task
        );
    }
    // Counted once: the kernel's share is no more than the sockets
    // dropped, the listeners' share no more than they read (besides what
    // they relayed), and all of it no more than the client sent.
    assert!(
        in_kernel <= dropped,
        "{in_kernel} counted as shed by the kernel, {dropped} dropped"
    );
    assert!(in_kernel <= shed, "{in_kernel} by the kernel of {shed} shed");
    assert!(
        relayed + (shed - in_kernel) <= read,
        "{relayed} relayed and {} shed by the listeners of {read} read",
        shed - in_kernel
    );
    let others = (during.len() + before.len() + members.len() + after.len()) as u64;
    assert!(
        read + in_kernel <= flood_sent + others,
        "{read} read and {in_kernel} shed by the kernel of {flood_sent} + {others} sent"
    );
    // The hold ended with the flood, on every socket.
    assert!(
        still.is_empty(),
        "filters still on members {still:?} {off_after:?} after the flood"
    );
    assert_eq!(
        answered,
        after.len(),
        "the flooding address is still filtered\n{}",
        stopped.log
    );
}

/// Holds the daemon still while `sends` runs and for 30 ms after, so that
/// everything sent is late when the relay reads it, then gives the relay
/// 100 ms to catch up.
fn while_held(pid: u32, sends: impl FnOnce()) {
    let paused = Paused::new(pid);
    sends();
    std::thread::sleep(Duration::from_millis(30));
    drop(paused);
    std::thread::sleep(Duration::from_millis(100));
}

/// Reads the 3-byte echoes of `asked` requests sent from `socket` to
/// `from`, until all came or the socket's read timeout passes; each must
/// come from `from` and be one of those echoes. How many came.
fn echoes_of_three_bytes(socket: &std::net::UdpSocket, from: std::net::SocketAddr, asked: usize) -> usize {
    let mut answered = 0;
    while answered < asked {
        let Some((source, data)) = lab::udp::recv(socket) else {
            break;
        };
        assert_eq!((source, data.len()), (from, 3), "{data:?}");
        answered += 1;
    }
    answered
}

/// A hostile LAN device fills the shedder's table of clients (64 a
/// window) with 63 addresses of its own that send one byte each now and
/// then, and floods from one address more, while tproxyd (one listener
/// queue, so datagrams are read in the order sent) is held for 30 ms at a
/// time so that the flood is late when read. What the quiet client sent
/// in the middle of each burst, and how many of its answers came back;
/// the final counters.
fn flood_from_beyond_a_full_table(relay_extra: &str) -> (usize, usize, lab::daemon::Stopped) {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0 FAMILIES=4");
    let fillers: Vec<IpAddr> = (0..63).map(|i| ip(&format!("192.0.2.{}", 100 + i))).collect();
    let flooder = ip("192.0.2.66");
    for a in fillers.iter().chain([&flooder]) {
        lab.add_client_address(*a);
    }
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let sink = Echo::start(&lab.servers[0], sa(server4(0), 7001));
    let daemon = lab.start_tproxyd(&config(&format!("listener_sockets = 1\n{relay_extra}")));
    let victim = socket(&lab.client, sa(ip(CLIENT4), 40000));
    let fill: Vec<std::net::UdpSocket> = fillers.iter().map(|a| socket(&lab.client, sa(*a, 40000))).collect();
    let flood = socket(&lab.client, sa(flooder, 40000));
    // The quiet client is known first, and has sent more than any filler.
    let (from, _) = lab::udp::exchange(&victim, echo.addr, &[0x11; 600]);
    assert_eq!(from, echo.addr);
    let mut asked = 0;
    for round in 0..5 {
        // The fillers keep their places: one byte each, every round.
        for s in &fill {
            s.send_to(b"f", sink.addr).unwrap();
        }
        std::thread::sleep(Duration::from_millis(30));
        while_held(daemon.pid(), || {
            for _ in 0..20 {
                flood.send_to(&[0x55; 1_200], sink.addr).unwrap();
            }
            for k in 0..5u8 {
                victim.send_to(&[round, k, 0x22], echo.addr).unwrap();
                asked += 1;
            }
            for _ in 0..20 {
                flood.send_to(&[0x55; 1_200], sink.addr).unwrap();
            }
        });
    }
    let answered = echoes_of_three_bytes(&victim, echo.addr, asked);
    (asked, answered, daemon.stop())
}

/// The table used to ignore a client beyond its 64: the flood was never
/// counted, hence never shed, yet its late datagrams made the relay
/// overloaded, and the heaviest client the table did know, the quiet one,
/// was shed in its place (all 25 of its datagrams).
#[test]
fn a_flood_from_beyond_a_table_filled_with_light_addresses_is_shed_not_the_quiet_client() {
    let _heavy = one_at_a_time();
    let (asked, answered, stopped) = flood_from_beyond_a_full_table("shed_after_ms = 5");
    let shed = stopped.counter("drop_overload");
    assert_eq!(
        answered,
        asked,
        "the quiet client lost {} of {asked} ({shed} shed)\n{}",
        asked - answered,
        stopped.log
    );
    assert!(shed > 0, "the flood was never shed\n{}", stopped.log);
}

/// The same with shedding off: nothing is shed at all, and the quiet
/// client loses nothing either.
#[test]
fn with_shedding_off_nothing_is_shed_whatever_the_table_holds() {
    let _heavy = one_at_a_time();
    let (asked, answered, stopped) = flood_from_beyond_a_full_table("shed_after_ms = 0");
    assert_eq!(stopped.counter("drop_overload"), 0, "{}", stopped.log);
    assert_eq!(answered, asked, "{}", stopped.log);
}

/// The busy client's side of the held-relay shedding tests: the lab with
/// the attacker's `addresses` added, an echo server and a sink, tproxyd
/// with one listener queue (datagrams read in the order sent) shedding
/// after 5 ms, a busy client whose flow is open, and an upload beside it.
struct BusyBesideAnUpload {
    lab: Lab,
    echo: Echo,
    sink: Echo,
    daemon: lab::daemon::Daemon,
    busy: std::net::UdpSocket,
    upload: std::net::UdpSocket,
}

impl BusyBesideAnUpload {
    fn new(addresses: &[IpAddr]) -> Self {
        let lab = Lab::new();
        lab.install_rules("nft", "LAN_IF=lan0 FAMILIES=4");
        for a in addresses {
            lab.add_client_address(*a);
        }
        let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
        let sink = Echo::start(&lab.servers[0], sa(server4(0), 7001));
        let daemon = lab.start_tproxyd(&config("listener_sockets = 1\nshed_after_ms = 5"));
        let busy = socket(&lab.client, sa(ip(CLIENT4), 40000));
        let upload = socket(&lab.client, sa(ip(CLIENT4), 40001));
        let (from, _) = lab::udp::exchange(&busy, echo.addr, &[0x11; 16]);
        assert_eq!(from, echo.addr);
        BusyBesideAnUpload {
            lab,
            echo,
            sink,
            daemon,
            busy,
            upload,
        }
    }

    /// Five rounds: `on_time` sends (relayed on time), a pause, then the
    /// relay is held while `held` sends and the busy client asks five
    /// requests, late when read. Asserts the busy client got every answer
    /// and returns the stopped daemon.
    fn rounds(
        self,
        mut on_time: impl FnMut(&std::net::UdpSocket, std::net::SocketAddr),
        mut held: impl FnMut(std::net::SocketAddr),
    ) -> lab::daemon::Stopped {
        let mut asked = 0;
        for round in 0..5u8 {
            on_time(&self.upload, self.sink.addr);
            std::thread::sleep(Duration::from_millis(30));
            while_held(self.daemon.pid(), || {
                held(self.sink.addr);
                for k in 0..5u8 {
                    self.busy.send_to(&[round, k, 0x22], self.echo.addr).unwrap();
                    asked += 1;
                }
            });
        }
        let answered = echoes_of_three_bytes(&self.busy, self.echo.addr, asked);
        let stopped = self.daemon.stop();
        let shed = stopped.counter("drop_overload");
        assert_eq!(
            answered,
            asked,
            "the busy client lost {} of {asked} ({shed} shed)\n{}",
            asked - answered,
            stopped.log
        );
        stopped
    }
}

/// A hostile LAN device floods from 64 addresses of its own, each lighter
/// than an innocent client's upload, while tproxyd (one listener queue) is
/// held for 30 ms at a time. The innocent client is the heaviest address,
/// but a sixth of the bytes: it used to be shed, losing every datagram it
/// sent while the relay was behind (its DNS queries and game flows alike),
/// while the flood five times its size was relayed in full.
#[test]
fn a_flood_spread_over_many_addresses_does_not_get_a_busy_client_shed() {
    let _heavy = one_at_a_time();
    let spread: Vec<IpAddr> = (0..64).map(|i| ip(&format!("192.0.2.{}", 100 + i))).collect();
    let test = BusyBesideAnUpload::new(&spread);
    let flood: Vec<std::net::UdpSocket> = spread.iter().map(|a| socket(&test.lab.client, sa(*a, 40000))).collect();
    test.rounds(
        |upload, sink| {
            // The upload: 100 KB; the flood: five times that, over 64
            // addresses, each sending 8 KB. Both relayed on time.
            for _ in 0..84 {
                upload.send_to(&[0x33; 1_200], sink).unwrap();
            }
            for _ in 0..7 {
                for s in &flood {
                    s.send_to(&[0x55; 1_200], sink).unwrap();
                }
            }
        },
        // Held: the flood's next datagrams are late when read, then the
        // busy client's requests.
        |sink| {
            for s in &flood {
                s.send_to(&[0x55; 1_200], sink).unwrap();
            }
        },
    );
}

/// A hostile LAN device sprays one-byte datagrams, six times as many as an
/// innocent client's upload sends (1,200 bytes each), while tproxyd (one
/// listener queue) is held for 30 ms at a time. The spray is six times
/// the relay's work (a datagram costs the same up to a full packet), but
/// counted by bytes it was the lighter client: the upload's client was
/// shed, losing every request it sent while the relay was behind, and the
/// spray relayed in full.
#[test]
fn a_spray_of_tiny_datagrams_is_shed_not_a_client_sending_fewer_bigger_ones() {
    let _heavy = one_at_a_time();
    let sprayer = ip("192.0.2.66");
    let test = BusyBesideAnUpload::new(&[sprayer]);
    let spray = socket(&test.lab.client, sa(sprayer, 40000));
    let stopped = test.rounds(
        |upload, sink| {
            // The upload: 100 datagrams of 1,200 bytes; the spray: 600 of
            // one byte. Both relayed on time.
            for i in 0..600 {
                if i % 6 == 0 {
                    upload.send_to(&[0x33; 1_200], sink).unwrap();
                }
                spray.send_to(b"s", sink).unwrap();
            }
        },
        // Held: the spray's next datagrams are late when read, then the
        // busy client's requests.
        |sink| {
            for _ in 0..50 {
                spray.send_to(b"s", sink).unwrap();
            }
        },
    );
    assert!(
        stopped.counter("drop_overload") > 0,
        "the spray was never shed\n{}",
        stopped.log
    );
}

/// One client floods over IPv6 while another's IPv4 datagrams wait behind
/// it for the same worker (the relay held still for 30 ms at a time, so
/// that both are late when read). Each listen address used to have a
/// shedder of its own, and each saw one client alone, never shed: the
/// flood went on taking the worker while the IPv4 client waited. One
/// shedder for the whole relay sees both, sheds the flood and never the
/// quiet client.
#[test]
fn a_flood_over_ipv6_is_shed_for_an_ipv4_clients_sake() {
    let _heavy = one_at_a_time();
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0");
    let echo = Echo::start(&lab.servers[0], sa(server4(0), 7000));
    let sink = Echo::start(&lab.servers[0], sa(server6(0), 7001));
    let daemon = lab.start_tproxyd(&format!(
        "mark = 255\n[admin]\nlisten = \"{ADMIN}\"\n[relay]\nlisten = [\"0.0.0.0:15353\", \"[::]:15353\"]\n\
         listener_sockets = 1\nshed_after_ms = 5\n"
    ));
    let quiet = socket(&lab.client, sa(ip(CLIENT4), 40000));
    let flood = socket(&lab.client, sa(ip(CLIENT6), 40000));
    // Both flows open before the test proper.
    assert_eq!(lab::udp::exchange(&quiet, echo.addr, b"hello").0, echo.addr);
    assert_eq!(lab::udp::exchange(&flood, sink.addr, b"hello").0, sink.addr);
    let mut asked = 0;
    for round in 0..8u8 {
        while_held(daemon.pid(), || {
            for _ in 0..30 {
                flood.send_to(&[0x55; 1_200], sink.addr).unwrap();
            }
            for k in 0..5u8 {
                quiet.send_to(&[round, k, 0x22], echo.addr).unwrap();
                asked += 1;
            }
            for _ in 0..30 {
                flood.send_to(&[0x55; 1_200], sink.addr).unwrap();
            }
        });
    }
    let answered = echoes_of_three_bytes(&quiet, echo.addr, asked);
    let stopped = daemon.stop();
    let shed = stopped.counter("drop_overload");
    assert_eq!(
        answered,
        asked,
        "the quiet client lost {} of {asked} ({shed} shed)\n{}",
        asked - answered,
        stopped.log
    );
    assert!(shed > 0, "the IPv6 flood was never shed\n{}", stopped.log);
}

/// The kernel's receive time of the next datagram on `socket`
/// (`SO_TIMESTAMPNS` must be on), or `None` once its read timeout passes.
fn recv_stamped(socket: &std::net::UdpSocket) -> Option<Duration> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    use std::os::fd::AsRawFd;
    let mut buf = [0u8; 2048];
    let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
    let mut iov = [std::io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<SockaddrStorage>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()).ok()?;
    let stamp = msg.cmsgs().ok()?.find_map(|c| match c {
        ControlMessageOwned::ScmTimestampns(ts) => Some(Duration::from(ts)),
        _ => None,
    });
    Some(stamp.expect("a datagram without a receive timestamp"))
}

/// Issue #10, item 1, on the way back: one client's flood of new flows
/// leaves a pool socket per destination, and when the replies of all of
/// them are waiting at once, another client's reply that came last must
/// not be delivered last. The daemon (one worker, so one pool reader) is
/// held while a reply to each of the flood's 1,000 flows and then one to
/// the quiet client arrive, that one last; once it runs again, the quiet client's reply
/// must reach the client before half of the flood's. Served in the order
/// the sockets became ready, it came after nearly all of them. Judged by
/// the client's kernel receive times, so by order, not by speed. Before
/// the hold, a flood flow that shares the quiet client's pool socket is
/// answered once, so that the socket's last read held only the flood's
/// reply: one such reply must not put the quiet client's socket behind
/// the flood's.
#[test]
fn a_quiet_clients_reply_is_not_delivered_behind_a_floods_waiting_replies() {
    const N: usize = 1_000;
    const FIRST: u16 = 10_000;
    let _heavy = one_at_a_time();
    let lab = Lab::new();
    lab.add_client_address(ip("192.0.2.11"));
    lab.install_rules("nft", "LAN_IF=lan0");
    for ns in [&lab.client, &lab.servers[0]] {
        ns.sh("sysctl -qw net.core.rmem_max=33554432 net.core.wmem_max=33554432 net.core.rmem_default=4194304");
    }
    lab::flood::fold_ports(&lab.servers[0], FIRST, FIRST + N as u16 - 1, 7000);
    let server = server4(0);
    let folded = socket(&lab.servers[0], sa(server, 7000));
    let probed = socket(&lab.servers[0], sa(server, 6000));
    let daemon = lab.start_tproxyd(&format!(
        "workers = 1\n{}",
        config_ahead_of_the_machine("new_flows_per_client = 0")
    ));
    let flooder = big_socket(&lab.client, sa(ip(CLIENT4), 41000));
    let quiet = socket(&lab.client, sa(ip("192.0.2.11"), 40000));
    let quiet_exchange = |payload: &[u8]| {
        quiet.send_to(payload, sa(server, 6000)).unwrap();
        let (peer, _) = lab::udp::recv(&probed).expect("the quiet client's request");
        probed.send_to(payload, peer).unwrap();
        assert!(lab::udp::recv(&quiet).is_some(), "the quiet client's answer");
        peer
    };
    // Both clients active, so that the flood's are the dominant client's
    // replies when they are first read.
    quiet_exchange(b"a");
    // The quiet client stays active meanwhile (to a port nobody answers),
    // so that the flood's replies are read as the dominant client's.
    let keep_going = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let keeper = {
        let (quiet, keep_going) = (quiet.try_clone().unwrap(), keep_going.clone());
        std::thread::spawn(move || {
            while keep_going.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = quiet.send_to(b"k", sa(server, 6001));
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    // The pool sockets of the flood's flows, as the server sees them, each
    // answered once. What the open backlog dropped is sent again.
    let mut peers = HashMap::new();
    folded.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while peers.len() < N && Instant::now() < deadline {
        let missing: Vec<u16> = (0..N as u16)
            .map(|i| FIRST + i)
            .filter(|p| !peers.contains_key(p))
            .collect();
        send_paced(
            &flooder,
            missing.len(),
            5_000,
            |i| sa(server, missing[i]),
            |i| missing[i].to_string().into_bytes(),
        );
        while let Some((peer, data)) = lab::udp::recv(&folded) {
            let port: u16 = String::from_utf8_lossy(&data).parse().expect("a flood datagram");
            if peers.insert(port, peer).is_none() {
                folded.send_to(b"y", peer).unwrap();
            }
        }
    }
    keep_going.store(false, std::sync::atomic::Ordering::Relaxed);
    keeper.join().unwrap();
    assert_eq!(peers.len(), N, "flows opened");
    let peers: Vec<_> = peers.into_values().collect();
    flooder.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    while lab::udp::recv(&flooder).is_some() {}
    let quiet_peer = quiet_exchange(b"b");
    // The flood's first flows took the pool socket the quiet client's
    // flow already held (other clients' flows share sockets).
    let (shared, others): (Vec<&std::net::SocketAddr>, Vec<_>) = peers.iter().partition(|p| **p == quiet_peer);
    assert!(
        !shared.is_empty(),
        "no flood flow shares the quiet client's pool socket: this test needs one"
    );
    // The flooder busy again on its flows, so that it dominates; then the
    // flood flow on the quiet client's socket is answered once more, and
    // that socket's last read holds only the flooder's reply. It must not
    // make the quiet client's socket heavy: a light socket turned heavy by
    // one flood reply served the quiet client's next reply behind the
    // whole flood's.
    for i in 0..200u16 {
        flooder.send_to(b"busy", sa(server, FIRST + i % N as u16)).unwrap();
    }
    // Read by the listener (and counted) before the reply comes.
    std::thread::sleep(Duration::from_millis(50));
    for peer in &shared {
        folded.send_to(b"w", **peer).unwrap();
    }
    assert!(
        lab::udp::recv(&flooder).is_some(),
        "the flood flow's reply on the shared socket"
    );

    for s in [&flooder, &quiet] {
        nix::sys::socket::setsockopt(s, nix::sys::socket::sockopt::ReceiveTimestampns, &true).unwrap();
    }
    {
        let _held = Paused::new(daemon.pid());
        // A flood flow that shares the quiet client's pool socket is
        // answered last, so that the socket becomes ready after all others.
        for peer in others {
            folded.send_to(b"z", *peer).unwrap();
        }
        probed.send_to(b"c", quiet_peer).unwrap();
        for peer in shared {
            folded.send_to(b"z", *peer).unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let quiet_at = recv_stamped(&quiet).expect("the quiet client's last reply");
    let mut flood_at = Vec::new();
    while let Some(at) = recv_stamped(&flooder) {
        flood_at.push(at);
    }
    assert!(
        flood_at.len() >= peers.len() / 2,
        "only {} of the flood's replies came",
        flood_at.len()
    );
    let before = flood_at.iter().filter(|at| **at < quiet_at).count();
    eprintln!(
        "the quiet client's reply came after {before} of the flood's {} replies",
        flood_at.len()
    );
    assert!(
        before < flood_at.len() / 2,
        "the quiet client's reply came after {before} of the flood's {} replies",
        flood_at.len()
    );
    drop(daemon.stop());
}

/// Holds tproxyd (`pid`) still for 30 ms every 250 ms, `times` times: a
/// relay that falls behind on any machine, however fast.
fn stall_now_and_then(pid: u32, times: usize) {
    for _ in 0..times {
        std::thread::sleep(Duration::from_millis(220));
        let paused = Paused::new(pid);
        std::thread::sleep(Duration::from_millis(30));
        drop(paused);
    }
}

/// Each of `socks` sends 65,000-byte datagrams to `sink` as fast as it
/// can until `stop`; each thread returns how many its socket took.
fn flood_big(
    socks: Vec<std::net::UdpSocket>,
    sink: std::net::SocketAddr,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<u64>> {
    socks
        .into_iter()
        .map(|sock| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let big = vec![0x55u8; 65_000];
                let mut sent = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if sock.send_to(&big, sink).is_ok() {
                        sent += 1;
                    }
                }
                sent
            })
        })
        .collect()
}

/// Floods 64 KB datagrams from two ports of `from` to `sink` while tproxyd
/// is held still now and then (`stalls` times), so that the relay falls
/// behind on any machine and the flood is held again and again; then
/// stops the flood.
fn flood_big_with_stalls(lab: &Lab, pid: u32, from: &str, sink: std::net::SocketAddr, stalls: usize) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let socks = (0..2u16).map(|i| big_socket(&lab.client, sa(ip(from), 41000 + i)));
    let senders = flood_big(socks.collect(), sink, &stop);
    stall_now_and_then(pid, stalls);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for s in senders {
        let _ = s.join();
    }
}

/// An echo server `delay` away: it answers each datagram that long after
/// it came (within a fraction of a millisecond), as a game server across
/// the Internet does. The lab's own round trips are a fraction of a
/// millisecond, too short a time for anything to happen in between.
struct DistantEcho {
    addr: std::net::SocketAddr,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl DistantEcho {
    fn start(ns: &lab::Netns, addr: std::net::SocketAddr, delay: Duration) -> DistantEcho {
        use std::sync::atomic::{AtomicBool, Ordering};
        let sock = socket(ns, addr);
        sock.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut due: std::collections::VecDeque<(Instant, std::net::SocketAddr, Vec<u8>)> = Default::default();
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    while let Ok((n, from)) = sock.recv_from(&mut buf) {
                        due.push_back((Instant::now() + delay, from, buf[..n].to_vec()));
                    }
                    while due.front().is_some_and(|(at, _, _)| *at <= Instant::now()) {
                        if let Some((_, to, payload)) = due.pop_front() {
                            let _ = sock.send_to(&payload, to);
                        }
                    }
                    std::thread::sleep(Duration::from_micros(100));
                }
            })
        };
        DistantEcho {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for DistantEcho {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A LAN device forges 120 client addresses of the LAN and sends from
/// each in turn, one flow per address, 2,000 datagrams a second for 5 s,
/// into a 64-flow table; another device keeps two flows to a server 2 ms
/// away, a datagram every 20 ms each. A full table used to end the
/// oldest flow of the client holding the most, and with every forged
/// client holding one, the device with two was that client: a new forged
/// flow ended one of its flows, the one whose echo was on its way when
/// the other's datagram came, and the echo was lost. Weighed by flow count
/// times idleness, forged flows, each idle for about as long as the table
/// lasts them, go first.
#[test]
fn forged_one_flow_clients_filling_the_table_do_not_end_an_active_devices_flows() {
    const FORGED: usize = 120;
    const PER_SEC: usize = 2_000;
    const FLOOD: Duration = Duration::from_secs(5);
    let _heavy = one_at_a_time();
    let forged: Vec<String> = (0..FORGED).map(|i| format!("192.0.2.{}", 100 + i)).collect();
    let refs: Vec<&str> = forged.iter().map(String::as_str).collect();
    let (lab, _folded, _probe, _control) = folded_lab(20_000, 20_001, &refs);
    let echo = DistantEcho::start(&lab.servers[0], sa(server4(0), 6300), Duration::from_millis(2));
    // Nothing answers the forged flows: their sources would not see it.
    let sink = sa(server4(0), 6200);
    let _sink = LateServer::start(&lab.servers[0], sink, None);
    // No quota or rate limit below the flood's, no shedding: only the
    // table's choice of whom to end stands between the forged flows and
    // the device's.
    let daemon = lab.start_tproxyd(&config_ahead_of_the_machine(
        "session_capacity = 64\nmax_sessions_per_client = 64\nnew_flows_per_client = 0\nshed_after_ms = 0",
    ));
    let socks: Vec<std::net::UdpSocket> = forged.iter().map(|a| socket(&lab.client, sa(ip(a), 40000))).collect();
    // Both flows' datagrams leave together (the sockets made first, the
    // probers started back to back): each is sent while the other's
    // echo is on its way, as two flows of one game or call are.
    let every = Duration::from_millis(20);
    let [a, b] = [40000, 40001].map(|port| socket(&lab.client, sa(ip(CLIENT4), port)));
    let [a, b] = [a, b].map(|sock| Prober::start(sock, echo.addr, every));
    // Both flows open before the forged ones come.
    std::thread::sleep(Duration::from_millis(200));
    // Paced by the millisecond: a new forged flow every half of one.
    let start = Instant::now();
    let mut next = 0usize;
    while start.elapsed() < FLOOD {
        let due = start.elapsed().as_micros() as usize * PER_SEC / 1_000_000;
        while next < due {
            let _ = socks[next % FORGED].send_to(b"forged", sink);
            next += 1;
        }
        std::thread::sleep(Duration::from_micros(300));
    }
    let (a, b) = finish_both(a, b);
    let stopped = daemon.stop();
    let (a_ok, a_lost, ..) = summary(&a);
    let (b_ok, b_lost, ..) = summary(&b);
    let evicted = stopped.counter("sessions_evicted");
    eprintln!(
        "{next} forged datagrams from {FORGED} addresses; device: {a_ok} + {b_ok} echoes, {a_lost} + {b_lost} lost; \
         evicted (table full) {evicted}, opened {}",
        stopped.counter("sessions_opened"),
    );
    // The table was full and churning.
    assert!(evicted as usize > next / 4, "{}", stopped.log);
    assert!(
        a_ok + b_ok > 300,
        "the device's flows were hardly answered\n{}",
        stopped.log
    );
    // Some 520 echoes: the old pick lost 157 to 166 of them, most of one
    // flow's (3 runs). A flow may still be ended now and then when the
    // daemon, held off the CPU, reads a burst whose forged flows are all
    // as fresh as the device's (0 to 5 in 10 runs): at most a tenth.
    assert!(
        (a_lost + b_lost) * 10 <= a.len() + b.len(),
        "the device lost {} of {} echoes to forged one-flow clients\n{}",
        a_lost + b_lost,
        a.len() + b.len(),
        stopped.log
    );
}

/// A device that forges another client's source address floods in its
/// name: the shedder holds that client in the kernel, by its address, and
/// the client's own flows were dropped with the flood for as long as the
/// holds lasted (100 ms, 400 ms, 1.6 s on). A held client's flows opened
/// well before its first hold and active lately are let through: the
/// innocent client's 50 pps flow, a game's or a call's, keeps its echoes
/// while the flood in its name is held. (The flood is sent from the
/// innocent's address on the client host: the relay sees no more of a
/// forger than that.)
#[test]
fn a_flood_in_an_innocents_name_does_not_cost_its_established_light_flow() {
    // Some 260 probes while the flood and its holds went on (and a
    // second after): the old filter dropped every one while it held the
    // innocent, 196 to 201 (3 runs). Those still lost are shed by hand
    // before each hold and between holds: 3 to 16 in 4 runs, and 70 of
    // 279 once with a benchmark saturating both CPUs beside the suite
    // (more holds, more shed by hand): at most a third, far from the
    // three quarters the old filter lost.
    innocent_beside_a_flood_in_its_name(Duration::from_millis(20), "a flood in its name");
}

/// As [`a_flood_in_an_innocents_name_does_not_cost_its_established_light_flow`],
/// the innocent's flow at a call's rate: a datagram every 3.2 ms, 15.6 a
/// look, just under the 16 a look a flow let through may send. tproxyd
/// is held still 30 ms in every 250 (as a busy gateway falls behind), so
/// its looks come late and it reads what queued meanwhile at once. A
/// count of one look's worth, whenever the look came, withdrew the flow
/// again and again; the flow is now held to a rate, judged by when each
/// datagram came.
#[test]
fn a_held_clients_flow_at_a_calls_rate_is_not_withdrawn_when_the_relay_falls_behind() {
    innocent_beside_a_flood_in_its_name(Duration::from_micros(3_200), "a flood in its name, the relay behind");
}

/// The innocent client probes an echo server every `every`, from well
/// before a flood of 64 KB datagrams in its name (with tproxyd held still
/// now and then) until a second after it, beside another client probing
/// all along (one client alone is never shed); it must keep its flow.
fn innocent_beside_a_flood_in_its_name(every: Duration, flood: &str) {
    const INNOCENT: &str = "192.0.2.11";
    let _heavy = one_at_a_time();
    let (lab, _folded, probe_echo, _control_echo) = folded_lab(20_000, 20_001, &[INNOCENT, "192.0.2.12"]);
    let sink = sa(server4(0), 6200);
    let _sink = LateServer::start(&lab.servers[0], sink, None);
    // As in the kernel-filter test above: queues that hold a run long
    // enough for the filter to go on.
    let daemon = lab.start_tproxyd(&config_ahead_of_the_machine(
        "listener_sockets = 16\nreceive_buffer = 67108864",
    ));
    let other = Prober::start(
        socket(&lab.client, sa(ip("192.0.2.12"), 40000)),
        probe_echo.addr,
        Duration::from_millis(20),
    );
    let innocent = Prober::start(socket(&lab.client, sa(ip(INNOCENT), 40000)), probe_echo.addr, every);
    // Established well before the flood.
    std::thread::sleep(Duration::from_secs(3));
    let before = innocent.reset();
    flood_big_with_stalls(&lab, daemon.pid(), INNOCENT, sink, 16);
    let (during, _) = finish_both(innocent, other);
    let stopped = daemon.stop();
    the_innocent_kept_its_flow(&during, &before, &stopped, flood);
}

/// The flood was held in the kernel, and the innocent's flow lost at most
/// a third of its echoes `during` it (those shed by hand before each hold
/// and between holds).
fn the_innocent_kept_its_flow(
    during: &[Option<Duration>],
    before: &[Option<Duration>],
    stopped: &lab::daemon::Stopped,
    flood: &str,
) {
    let in_kernel = stopped.counter("shed_in_kernel");
    let (ok, lost, p50, p99, _) = summary(during);
    let (_, lost_before, ..) = summary(before);
    eprintln!(
        "innocent's flow: {ok} echoes, {lost} lost during {flood} (p50 {p50:?}, p99 {p99:?}); \
         {lost_before} lost of {} before; {in_kernel} of the flood held in the kernel, {} shed in all",
        before.len(),
        stopped.counter("drop_overload"),
    );
    assert!(in_kernel > 0, "the kernel held nothing\n{}", stopped.log);
    assert!(
        lost * 3 <= during.len(),
        "the innocent lost {lost} of {} echoes during {flood}\n{}",
        during.len(),
        stopped.log
    );
}

/// Counts the datagrams over 1,500 bytes that arrive at `addr` (in the
/// first server's namespace) by their first byte, until `stop`: the
/// server sees the gateway's ports, not the client's.
fn count_big_by_first_byte(
    lab: &Lab,
    addr: std::net::SocketAddr,
    stop: &Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<HashMap<u8, u64>> {
    let sock = socket(&lab.servers[0], addr);
    // Room for a burst of 64 KB datagrams: what the sink drops itself
    // would count as held.
    socket2::SockRef::from(&sock).set_recv_buffer_size(32 << 20).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let stop = stop.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        let mut counts = HashMap::new();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok(n) = sock.recv(&mut buf)
                && n > 1_500
            {
                *counts.entry(buf[0]).or_default() += 1;
            }
        }
        counts
    })
}

/// A held client's flows let through are light flows: a game's, a
/// call's. Its own flows, opened well before its flood and light until
/// then (or a forger's, opened in its name), that turn to 64 KB
/// datagrams under a flood's rate of datagrams (some 155 a second each)
/// are held like the rest of its flood. Counting a flow's datagrams alone,
/// 8 such flows had about 640 of some 650 datagrams each relayed during
/// the holds (some 80 MB a second), none of it shed.
#[test]
fn a_held_clients_flows_let_through_carry_no_flood_of_big_datagrams() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    const FLOODER: &str = "192.0.2.11";
    let _heavy = one_at_a_time();
    let (lab, _folded, probe_echo, _control_echo) = folded_lab(20_000, 20_001, &[FLOODER, "192.0.2.12"]);
    let sink = sa(server4(0), 6300);
    let stop_all = Arc::new(AtomicBool::new(false));
    let counter = count_big_by_first_byte(&lab, sink, &stop_all);
    let daemon = lab.start_tproxyd(&config_ahead_of_the_machine(
        "listener_sockets = 16\nreceive_buffer = 67108864",
    ));
    // Another client active all along: one client alone is never shed.
    let other = Prober::start(
        socket(&lab.client, sa(ip("192.0.2.12"), 40000)),
        probe_echo.addr,
        Duration::from_millis(20),
    );
    // Eight light flows, 5 datagrams a second each, established well
    // before the flood; then 64 KB datagrams every 6 ms.
    let big = Arc::new(AtomicBool::new(false));
    let flows: Vec<std::thread::JoinHandle<u64>> = (0..8u16)
        .map(|i| {
            let sock = big_socket(&lab.client, sa(ip(FLOODER), 50000 + i));
            let (stop, big) = (stop_all.clone(), big.clone());
            std::thread::spawn(move || {
                let (light, heavy) = (vec![0x33u8; 40], vec![0x44u8; 65_000]);
                let mut sent_big = 0;
                while !stop.load(Relaxed) {
                    if big.load(Relaxed) {
                        sent_big += u64::from(sock.send_to(&heavy, sink).is_ok());
                        std::thread::sleep(Duration::from_millis(6));
                    } else {
                        let _ = sock.send_to(&light, sink);
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
                sent_big
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    big.store(true, Relaxed);
    flood_big_with_stalls(&lab, daemon.pid(), FLOODER, sink, 16);
    stop_all.store(true, Relaxed);
    let sent: u64 = flows.into_iter().map(|f| f.join().unwrap_or(0)).sum();
    let _ = other.finish();
    let counts = counter.join().unwrap_or_default();
    let stopped = daemon.stop();
    // The flows' 64 KB datagrams are 0x44s, the flood's 0x55s.
    let relayed = counts.get(&0x44).copied().unwrap_or(0);
    let in_kernel = stopped.counter("shed_in_kernel");
    eprintln!(
        "the flows let through: {relayed} of {sent} 64 KB datagrams relayed; {in_kernel} held in the kernel, {} shed in all",
        stopped.counter("drop_overload")
    );
    // The flood was held in the kernel, its flows let through chosen.
    assert!(in_kernel > 0, "the kernel held nothing\n{}", stopped.log);
    assert!(sent > 1_000, "the flows sent only {sent} 64 KB datagrams");
    // Counting datagrams alone let 98 % through (3 runs); flows of the
    // same client opened with the flood, never let through, had some 6 %
    // relayed between its holds.
    assert!(
        relayed * 4 <= sent,
        "{relayed} of {sent} 64 KB datagrams of the flows let through were relayed\n{}",
        stopped.log
    );
}

/// A held IPv6 client is its /64, most often every device of the LAN. A
/// neighbour's own light flows (8 of them, one datagram every 200 ms,
/// older than the innocent's game flow; nothing forged) took every place
/// a hold lets through when the longest-lived went first: a flood from a
/// third host of the /64 then cost the innocent 187 to 215 of some 265
/// echoes (4 runs), against 2 to 46 with each address's oldest flow
/// first (4 runs, load 5.8 to 7.6).
#[test]
fn a_neighbours_old_flows_do_not_take_every_place_a_hold_of_their_64_lets_through() {
    use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
    const INNOCENT: &str = "2001:db8:1::11";
    const NEIGHBOUR: &str = "2001:db8:1::99";
    const FLOODER: &str = "2001:db8:1::77";
    let _heavy = one_at_a_time();
    let (lab, _folded, probe_echo, _control_echo) =
        folded_lab(20_000, 20_001, &["192.0.2.12", INNOCENT, NEIGHBOUR, FLOODER]);
    let probe6 = Echo::start(&lab.servers[0], sa(server6(0), 6000));
    let sink = sa(server6(0), 6300);
    let _sink = LateServer::start(&lab.servers[0], sink, None);
    let daemon = lab.start_tproxyd(&format!(
        "nice = -10\nmark = 255\n[admin]\nlisten = \"{ADMIN}\"\n[relay]\n\
         listen = [\"0.0.0.0:15353\", \"[::]:15353\"]\nlistener_sockets = 16\nreceive_buffer = 67108864\n"
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let neighbour: Vec<std::thread::JoinHandle<()>> = (0..8u16)
        .map(|i| {
            let sock = socket(&lab.client, sa(ip(NEIGHBOUR), 50000 + i));
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    let _ = sock.send_to(&[0x33; 40], sink);
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let every = Duration::from_millis(20);
    // Another client active all along: one client alone is never shed.
    let other = Prober::start(socket(&lab.client, sa(ip("192.0.2.12"), 40000)), probe_echo.addr, every);
    let innocent = Prober::start(socket(&lab.client, sa(ip(INNOCENT), 40000)), probe6.addr, every);
    std::thread::sleep(Duration::from_secs(3));
    let before = innocent.reset();
    flood_big_with_stalls(&lab, daemon.pid(), FLOODER, sink, 16);
    stop.store(true, Relaxed);
    for n in neighbour {
        let _ = n.join();
    }
    let (during, _) = finish_both(innocent, other);
    let stopped = daemon.stop();
    // As in the IPv4 test above.
    the_innocent_kept_its_flow(
        &during,
        &before,
        &stopped,
        "a flood from its /64 beside its neighbour's old flows",
    );
}
