//! The shell scripts shipped beside the daemon: the rule scripts' `print`,
//! and the OpenWrt init script's syntax.

mod lab;

use lab::{Lab, repo_path};
use std::process::Command;

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

#[test]
fn openwrt_init_script_is_valid_shell() {
    let script = repo_path("config/openwrt/tproxyd.init");
    let out = Command::new("sh")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("running sh -n");
    assert!(
        out.status.success(),
        "sh -n {}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&script).unwrap();
    // procd's conventions: without these the service does not start.
    assert!(text.starts_with("#!/bin/sh /etc/rc.common\n"), "{text}");
    for needle in [
        "USE_PROCD=1",
        "start_service()",
        "procd_open_instance",
        "procd_set_param command",
    ] {
        assert!(text.contains(needle), "{needle} missing");
    }
}
