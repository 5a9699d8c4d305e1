//! Routing by domain, end to end: tproxyd's own DNS answers fill
//! nftables sets (and the name map) in the gateway namespace, with real
//! dig, dnsmasq and nft.

mod lab;

use lab::dns::{Dnsmasq, dig};
use lab::nft::{elements, expires_in};
use lab::{Daemon, Lab};
use std::net::IpAddr;
use std::time::{Duration, Instant};

const PUBLIC: &str = "203.0.113.53";
const UPSTREAM: &str = "198.51.100.53";
const ADMIN: &str = "127.0.0.1:9153";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn config(extra: &str) -> String {
    format!(
        r#"
mark = 255
[relay]
listen = ["0.0.0.0:15353", "[::]:15353"]
[admin]
listen = "{ADMIN}"
[dns]
ports = [53]
# The lab's LAN uses documentation addresses, outside the default allow list.
allow = ["192.0.2.0/24", "2001:db8:1::/64"]
[dns.upstreams.default]
servers = ["{UPSTREAM}"]
{extra}
"#
    )
}

struct DomainLab {
    lab: Lab,
    _upstream: Dnsmasq,
}

impl DomainLab {
    fn new() -> DomainLab {
        let lab = Lab::new();
        for addr in [UPSTREAM, PUBLIC] {
            lab.add_server_address(0, ip(addr));
        }
        lab.install_rules("nft", "LAN_IF=lan0");
        let upstream = lab.dnsmasq(
            0,
            ip(UPSTREAM),
            "game.example",
            &[
                "--host-record=eu.game.example,203.0.113.80,2001:db8::80",
                "--cname=play.game.example,eu.game.example",
                "--host-record=other.game.example,203.0.113.81",
            ],
        );
        DomainLab {
            lab,
            _upstream: upstream,
        }
    }

    fn start(&self, extra: &str) -> Daemon {
        self.lab.start_tproxyd(&config(extra))
    }

    fn metrics(&self) -> String {
        lab::metrics::fetch(&self.lab.gateway, ADMIN.parse().unwrap())
    }

    fn metric(&self, series: &str) -> u64 {
        lab::metrics::value(&self.metrics(), series)
    }
}

#[test]
fn forwarded_cached_and_local_answers_fill_the_sets_with_ttl_plus_grace() {
    let l = DomainLab::new();
    let daemon = l.start(
        r#"
[dns.names]
grace = "60s"
# The name map is kept only for relay rules that match by domain.
[[relay.rules]]
domains = ["*.game.example"]
action = "direct"
[[dns.rules]]
domains = ["lan.game.example"]
action = "answer"
a = ["192.0.2.77"]
ttl = "30s"
nft_set = "game"
[[dns.rules]]
domains = ["*.game.example"]
action = "forward"
nft_set = ["game", "low_latency"]
"#,
    );
    // A forwarded answer through a CNAME: both sets, both families.
    let d = dig(&l.lab.client, &format!("@{PUBLIC} play.game.example A"));
    assert_eq!(d.status, "NOERROR", "{}", d.raw);
    assert!(d.answer_data().contains(&"203.0.113.80".to_string()), "{}", d.raw);
    for set in ["game4", "low_latency4"] {
        let left = expires_in(&l.lab, "tproxyd_dns", set, "203.0.113.80")
            .unwrap_or_else(|| panic!("203.0.113.80 not in {set}"));
        assert!(left <= 300.0 + 60.0 && left > 300.0, "{set}: {left}s left");
    }
    assert!(elements(&l.lab, "tproxyd_dns", "game6").is_empty());
    let d = dig(&l.lab.client, &format!("@{PUBLIC} eu.game.example AAAA"));
    assert_eq!(d.answer_data(), vec!["2001:db8::80"], "{}", d.raw);
    assert!(expires_in(&l.lab, "tproxyd_dns", "game6", "2001:db8::80").is_some());

    // A cached answer: still fed (and so a flushed set is filled again).
    dig(&l.lab.client, &format!("@{PUBLIC} other.game.example A"));
    l.lab.gateway.sh("nft flush set inet tproxyd_dns game4");
    let d = dig(&l.lab.client, &format!("@{PUBLIC} other.game.example A"));
    assert_eq!(d.answer_data(), vec!["203.0.113.81"], "{}", d.raw);
    assert!(expires_in(&l.lab, "tproxyd_dns", "game4", "203.0.113.81").is_some());
    assert!(
        l.metric("tproxyd_dns_queries_by_action_total{action=\"cache\"}") >= 1,
        "second query was not a cache hit"
    );

    // A local answer rule.
    let d = dig(&l.lab.client, &format!("@{PUBLIC} lan.game.example A"));
    assert_eq!(d.answer_data(), vec!["192.0.2.77"], "{}", d.raw);
    let left = expires_in(&l.lab, "tproxyd_dns", "game4", "192.0.2.77").expect("local answer in game4");
    assert!(left <= 90.0 && left > 80.0, "{left}s left");
    assert_eq!(l.metric("tproxyd_errors_total{kind=\"netlink\"}"), 0);
    assert!(l.metric("tproxyd_nft_set_elements_total{op=\"added\"}") >= 4);
    assert!(l.metric("tproxyd_name_map_entries") >= 3);

    // The table is tproxyd's: it goes when tproxyd stops.
    daemon.stop();
    assert!(
        !l.lab
            .gateway
            .sh_output("nft list table inet tproxyd_dns")
            .status
            .success()
    );
}

#[test]
fn entries_expire_from_the_set_and_the_map() {
    let l = DomainLab::new();
    let _daemon = l.start(
        r#"
[dns.names]
grace = "1s"
[[relay.rules]]
domains = ["brief.game.example"]
action = "direct"
[[dns.rules]]
domains = ["brief.game.example"]
action = "answer"
a = ["192.0.2.78"]
ttl = "1s"
nft_set = "game"
"#,
    );
    let d = dig(&l.lab.client, &format!("@{PUBLIC} brief.game.example A"));
    assert_eq!(d.answer_data(), vec!["192.0.2.78"], "{}", d.raw);
    let left = expires_in(&l.lab, "tproxyd_dns", "game4", "192.0.2.78").expect("in the set");
    assert!(left <= 2.0, "{left}s left");
    assert_eq!(l.metric("tproxyd_name_map_entries"), 1);
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let in_set = !elements(&l.lab, "tproxyd_dns", "game4").is_empty();
        let in_map = l.metric("tproxyd_name_map_entries") > 0;
        if !in_set && !in_map {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still there after 12 s: set {in_set}, map {in_map}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn doctor_asks_the_kernel_about_the_sets_and_changes_nothing() {
    let lab = Lab::new();
    lab.install_rules("nft", "LAN_IF=lan0 FAMILIES=4");
    let cfg = format!(
        "mark = 255\n[relay]\nlisten = [\"0.0.0.0:15353\"]\n[dns]\n[dns.upstreams.default]\nservers = [\"{UPSTREAM}\"]\n\
         [[dns.rules]]\ndomains = [\"*.game.example\"]\naction = \"forward\"\nnft_set = [\"game\", \"voip\"]\n"
    );
    let path = lab.path("doctor.toml");
    std::fs::write(&path, &cfg).unwrap();
    let doctor = || {
        let out = lab.tproxyd_command(&["doctor", "--config", path.to_str().unwrap()]);
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (healthy, report) = doctor();
    assert!(healthy, "{report}");
    assert!(
        report.contains(
            "[ ok ] nftables: the kernel accepts tproxyd's sets in inet tproxyd_dns (game4/game6, voip4/voip6)"
        ),
        "{report}"
    );
    // explain names the sets a query feeds.
    let out = lab.tproxyd_command(&[
        "explain",
        "--config",
        path.to_str().unwrap(),
        "--client",
        "192.0.2.10",
        "--query",
        "play.game.example",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "→ its addresses go into nftables sets game4/game6, voip4/voip6 of inet tproxyd_dns, for TTL + 300s"
        ),
        "{text}"
    );
    // Nothing was left behind.
    assert!(
        !lab.gateway
            .sh_output("nft list table inet tproxyd_dns")
            .status
            .success()
    );

    // An operator's set of the wrong shape (no timeouts) is caught.
    lab.gateway
        .sh("nft add table inet tproxyd_dns && nft add set inet tproxyd_dns game4 '{ type ipv4_addr; }'");
    let (healthy, report) = doctor();
    assert!(!healthy, "{report}");
    assert!(
        report.contains("[FAIL] nftables: the kernel refused tproxyd's sets in inet tproxyd_dns: set game4"),
        "{report}"
    );
    assert!(lab.gateway.sh("nft list table inet tproxyd_dns").contains("set game4"));
}

#[test]
fn a_reload_creates_new_sets_and_keeps_the_map() {
    let l = DomainLab::new();
    let rules = "[[relay.rules]]\ndomains = [\"*.game.example\"]\naction = \"direct\"\n\
                 [[dns.rules]]\ndomains = [\"*.game.example\"]\naction = \"forward\"\nnft_set = \"game\"\n";
    let mut daemon = l.start(rules);
    let d = dig(&l.lab.client, &format!("@{PUBLIC} eu.game.example A"));
    assert_eq!(d.answer_data(), vec!["203.0.113.80"], "{}", d.raw);
    assert!(
        !l.lab
            .gateway
            .sh_output("nft list set inet tproxyd_dns voip4")
            .status
            .success()
    );

    let more = format!(
        "[[dns.rules]]\ndomains = [\"other.game.example\"]\naction = \"forward\"\nnft_set = [\"voip\", \"game\"]\n{rules}"
    );
    std::fs::write(&daemon.config, config(&more)).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    daemon.wait_for_log("configuration reloaded", Duration::from_secs(5));
    let d = dig(&l.lab.client, &format!("@{PUBLIC} other.game.example A"));
    assert_eq!(d.answer_data(), vec!["203.0.113.81"], "{}", d.raw);
    assert!(expires_in(&l.lab, "tproxyd_dns", "voip4", "203.0.113.81").is_some());
    assert!(expires_in(&l.lab, "tproxyd_dns", "game4", "203.0.113.81").is_some());
    // What the old engine recorded is still known.
    assert_eq!(l.metric("tproxyd_name_map_entries"), 2);
}
