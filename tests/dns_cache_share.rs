//! LAN devices and the DNS cache: a device that asks for many distinct
//! names (each answered by an upstream, within its rate limit), even from
//! many forged source addresses, must not push every other device's
//! answers out of the shared cache.

mod lab;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use lab::Lab;
use lab::fake_dns::FakeDns;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

const UPSTREAM: &str = "198.51.100.53";
/// tproxyd's plain listener on the LAN.
const LISTEN: &str = "192.0.2.1";
/// The lab's main client: the device whose answers should stay cached.
const VICTIM: &str = "192.0.2.10";
/// A second LAN address of the client namespace: the device asking for
/// many names.
const FLOODER: &str = "192.0.2.66";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Asks `names` (A) from `from`, `batch` at a time, each batch sent
/// before any answer is read; returns how many were answered NOERROR.
fn ask(lab: &Lab, from: IpAddr, names: &[String], batch: usize) -> usize {
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let sock = lab::udp::socket(&lab.client, SocketAddr::new(from, 0));
    sock.set_read_timeout(Some(Duration::from_millis(2000))).unwrap();
    let mut answered = 0;
    for (b, chunk) in names.chunks(batch).enumerate() {
        for (i, n) in chunk.iter().enumerate() {
            let mut m = Message::query();
            m.metadata.id = u16::try_from(b * batch + i).unwrap();
            m.metadata.recursion_desired = true;
            m.add_query(Query::query(Name::from_str(n).unwrap(), RecordType::A));
            sock.send_to(&m.to_vec().unwrap(), to).unwrap();
        }
        for _ in chunk {
            let Some((_, bytes)) = lab::udp::recv(&sock) else { break };
            if Message::from_vec(&bytes).is_ok_and(|m| !m.answers.is_empty()) {
                answered += 1;
            }
        }
    }
    answered
}

/// The lab: one upstream answering every name (TTL 3600), a second client
/// address for a flooding device, and tproxyd with a cache of 200.
fn cache_lab() -> (Lab, FakeDns, lab::daemon::Daemon) {
    let lab = Lab::with_servers(1);
    lab.add_server_address(0, ip(UPSTREAM));
    lab.add_client_address(ip(FLOODER));
    lab.install_rules("nft", "LAN_IF=lan0");
    let fake = FakeDns::scripted(&lab.servers[0], ip(UPSTREAM), |q| {
        let mut m = Message::query();
        m.metadata.message_type = hickory_proto::op::MessageType::Response;
        let a = RData::A(A::new(203, 0, 113, 80));
        m.answers = vec![Record::from_rdata(q.name().clone(), 3600, a)];
        m
    });
    let config = format!(
        r#"
mark = 255
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[dns]
ports = [53]
listen = ["{LISTEN}:53"]
allow = ["192.0.2.0/24"]
timeout = "1500ms"
cache = {{ capacity = 200 }}
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
"#
    );
    let daemon = lab.start_tproxyd(&config);
    (lab, fake, daemon)
}

/// A device asks for 600 distinct names (within the default rate limit's
/// burst) after another device has cached its answers; the cache holds
/// 200. The other device's answers must still be served from the cache.
#[test]
fn one_device_asking_many_names_cannot_flush_the_others_cached_answers() {
    let (lab, fake, _daemon) = cache_lab();
    let hot: Vec<String> = (0..20).map(|i| format!("hot{i}.victim.test.")).collect();
    assert_eq!(ask(&lab, ip(VICTIM), &hot, 20), 20);
    let flood: Vec<String> = (0..600).map(|i| format!("n{i}.flood.test.")).collect();
    let answered = ask(&lab, ip(FLOODER), &flood, 25);
    // More than the cache holds, whatever a loaded machine loses.
    assert!(answered >= 300, "only {answered} of the flood's 600 answered");
    assert_eq!(ask(&lab, ip(VICTIM), &hot, 20), 20);
    let again: Vec<&String> = hot.iter().filter(|n| fake.asked(n) > 1).collect();
    assert!(
        again.is_empty(),
        "{} of the victim's 20 cached answers were pushed out and asked again: {again:?}",
        again.len()
    );
}

/// Sends one query for each of `names` (A) from `from`, an address of the
/// client namespace's LAN that no device holds (`IP_TRANSPARENT`):
/// a forged source, as a hostile device writes it. Its answers go to that
/// address and are lost; only the cache sees the query.
fn forge(lab: &Lab, from: IpAddr, names: &[String]) {
    let to: SocketAddr = format!("{LISTEN}:53").parse().unwrap();
    let sock = lab.client.enter(move || {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
        s.set_freebind_v4(true).unwrap();
        s.set_ip_transparent_v4(true).unwrap();
        s.bind(&SocketAddr::new(from, 0).into()).unwrap();
        std::net::UdpSocket::from(s)
    });
    for (i, n) in names.iter().enumerate() {
        let mut m = Message::query();
        m.metadata.id = u16::try_from(i).unwrap();
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_str(n).unwrap(), RecordType::A));
        sock.send_to(&m.to_vec().unwrap(), to).unwrap();
    }
}

/// A hostile device forges queries for 1,200 distinct names from 120
/// source addresses of the LAN (10 each: far below any one client's share
/// of the cache, or its rate limit), while a victim device keeps asking
/// its 20 names now and then; the cache holds 200. The victim's names,
/// asked again and again, must still be answered from the cache: the
/// upstream must not see any of them twice.
#[test]
fn forged_sources_asking_one_hit_names_cannot_flush_a_devices_repeated_names() {
    let (lab, fake, _daemon) = cache_lab();
    let hot: Vec<String> = (0..20).map(|i| format!("hot{i}.victim.test.")).collect();
    // Asked, then asked again from the cache: names the device uses.
    assert_eq!(ask(&lab, ip(VICTIM), &hot, 20), 20);
    assert_eq!(ask(&lab, ip(VICTIM), &hot, 20), 20);
    let mut flood = Vec::new();
    for source in 0..120u32 {
        // 192.0.2.100 to 192.0.2.219: LAN addresses no device holds.
        let from = IpAddr::from([192, 0, 2, u8::try_from(100 + source).unwrap()]);
        let names: Vec<String> = (0..10).map(|i| format!("n{i}.s{source}.flood.test.")).collect();
        forge(&lab, from, &names);
        flood.extend(names);
        // The victim now and then, between the flood's sources, with time
        // for the upstream to answer the forged queries into the cache.
        if source % 30 == 29 {
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(ask(&lab, ip(VICTIM), &hot, 20), 20);
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    // The flood was stored: far more names than the cache holds.
    let reached = flood.iter().filter(|n| fake.asked(n) > 0).count();
    assert!(
        reached >= 600,
        "only {reached} of the flood's 1,200 names reached the upstream"
    );
    assert_eq!(ask(&lab, ip(VICTIM), &hot, 20), 20);
    let again: Vec<&String> = hot.iter().filter(|n| fake.asked(n) > 1).collect();
    assert!(
        again.is_empty(),
        "{} of the victim's 20 cached answers were pushed out by {reached} forged one-hit names and asked again: \
         {again:?}",
        again.len()
    );
}

/// A hostile device forges queries for 1,200 distinct names from 120 LAN
/// source addresses, as above, but asks each name `repeats` times (each
/// time after the upstream answered the last), so that every name is
/// found again in the cache; a victim device asked its 20 names four
/// times before and keeps asking them now and then. The cache holds 200.
/// Found again, the forged names once moved into the protected segment
/// and pushed the victim's out; the victim's names, asked more often, must
/// still be answered from the cache.
fn forged_names_asked_again(repeats: usize) {
    let (lab, fake, _daemon) = cache_lab();
    let hot: Vec<String> = (0..20).map(|i| format!("hot{i}.victim.test.")).collect();
    for _ in 0..4 {
        assert_eq!(ask(&lab, ip(VICTIM), &hot, 20), 20);
    }
    let mut flood = Vec::new();
    for source in 0..120u32 {
        // 192.0.2.100 to 192.0.2.219: LAN addresses no device holds.
        let from = IpAddr::from([192, 0, 2, u8::try_from(100 + source).unwrap()]);
        let names: Vec<String> = (0..10).map(|i| format!("n{i}.s{source}.flood.test.")).collect();
        for _ in 0..repeats {
            forge(&lab, from, &names);
            // Time for the upstream's answers to reach the cache, so that
            // the next ask of each name finds it there.
            std::thread::sleep(Duration::from_millis(15));
        }
        flood.extend(names);
        if source % 30 == 29 {
            std::thread::sleep(Duration::from_millis(300));
            assert_eq!(ask(&lab, ip(VICTIM), &hot, 20), 20);
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    let reached = flood.iter().filter(|n| fake.asked(n) > 0).count();
    assert!(
        reached >= 600,
        "only {reached} of the flood's 1,200 names reached the upstream"
    );
    assert_eq!(ask(&lab, ip(VICTIM), &hot, 20), 20);
    let again: Vec<&String> = hot.iter().filter(|n| fake.asked(n) > 1).collect();
    assert!(
        again.is_empty(),
        "{} of the victim's 20 cached answers were pushed out by {reached} forged names asked {repeats} times each \
         and asked again: {again:?}",
        again.len()
    );
}

#[test]
fn forged_sources_asking_each_name_twice_cannot_flush_a_devices_repeated_names() {
    forged_names_asked_again(2);
}

#[test]
fn forged_sources_asking_each_name_three_times_cannot_flush_a_devices_repeated_names() {
    forged_names_asked_again(3);
}
