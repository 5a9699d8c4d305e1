//! The shell scripts shipped beside the daemon.

mod lab;

use lab::{Lab, repo_path};

#[test]
fn iptables_print_shows_what_up_installs_and_changes_nothing() {
    let lab = Lab::new();
    let script = repo_path("iptables/tproxy-iptables.sh");
    let before = lab.gateway.sh("iptables-save -t mangle; ip -4 rule show");
    let printed = lab.gateway.sh(&format!(
        "LAN_IF=lan0 DNS_TCP_PORT=15354 FAMILIES=4 {} print",
        script.display()
    ));
    for line in [
        "iptables -w -t mangle -A TPROXYD_CAPTURE -p tcp --dport 53 -j TPROXY --on-port 15354 --tproxy-mark 1",
        "iptables -w -t mangle -A TPROXYD_CAPTURE -p udp -j TPROXY --on-port 15353 --tproxy-mark 1",
        "iptables -w -t mangle -A TPROXYD_PRE -i lan0 -j TPROXYD_CAPTURE",
        "ip -4 rule add fwmark 1 lookup 100",
    ] {
        assert!(printed.lines().any(|l| l == line), "missing {line:?} in:\n{printed}");
    }
    assert!(!printed.contains("ip6tables"), "FAMILIES=4 printed IPv6:\n{printed}");
    let after = lab.gateway.sh("iptables-save -t mangle; ip -4 rule show");
    let strip = |s: &str| s.lines().filter(|l| !l.starts_with('#')).collect::<Vec<_>>().join("\n");
    assert_eq!(strip(&before), strip(&after), "print changed the gateway");

    // What it prints is what `up` installs.
    lab.install_rules("iptables", "LAN_IF=lan0 DNS_TCP_PORT=15354 FAMILIES=4");
    let saved = lab.gateway.sh("iptables-save -t mangle");
    assert!(saved.contains("--dport 53 -j TPROXY --on-port 15354"), "{saved}");
    assert!(saved.contains("-A TPROXYD_PRE -i lan0 -j TPROXYD_CAPTURE"), "{saved}");
}
