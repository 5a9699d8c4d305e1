//! `tproxyd doctor`: checks what usually breaks a TPROXY setup and says how
//! to fix each finding.
//!
//! It only reads: the kernel is asked whether it accepts a `tproxy` rule
//! with `nft --check` (the kernel validates the batch and discards it), and
//! everything else comes from `/proc`, `ip` and `nft list`.

use std::fmt::Write;
use std::io::Write as _;
use std::process::{Command, Stdio};

use crate::config::Config;

mod installed;

use installed::{Installed, Proto};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub status: Status,
    pub what: String,
    /// How to fix it (empty when all is well).
    pub fix: String,
}

fn ok(what: impl Into<String>) -> Finding {
    Finding {
        status: Status::Ok,
        what: what.into(),
        fix: String::new(),
    }
}

fn problem(status: Status, what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding {
        status,
        what: what.into(),
        fix: fix.into(),
    }
}

/// The settings the checks compare against.
struct Expect {
    /// The relay's TPROXY ports (UDP), each listed once.
    udp_ports: Vec<u16>,
    /// The DNS engine's TPROXY TCP ports (`dns.tcp_listen`).
    tcp_ports: Vec<u16>,
    mark: u32,
    fwmark: u32,
    table: u32,
    families: Vec<u8>,
    lan: Vec<String>,
}

impl Expect {
    fn from(config: &Config) -> Expect {
        let auto = config.auto_rules.as_ref().map(|a| a.get_ref());
        let listen = &config.relay.listen.0;
        let mut families = Vec::new();
        if listen.iter().any(|a| a.is_ipv4()) {
            families.push(4);
        }
        if listen.iter().any(|a| a.is_ipv6()) {
            families.push(6);
        }
        let udp_ports = distinct(listen.iter().map(|a| a.port()));
        let tcp_ports = distinct(
            config
                .dns()
                .into_iter()
                .flat_map(|d| d.tcp_listen.iter().map(|a| a.port())),
        );
        Expect {
            udp_ports,
            tcp_ports,
            mark: config.mark.0,
            fwmark: auto.map_or(1, |a| a.fwmark),
            table: auto.map_or(100, |a| a.route_table),
            families,
            lan: auto.map(|a| a.lan_interfaces.clone()).unwrap_or_default(),
        }
    }
}

/// The ports in first-seen order, each once.
fn distinct(ports: impl Iterator<Item = u16>) -> Vec<u16> {
    let mut out = Vec::new();
    for p in ports {
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Runs every check.
pub fn diagnose(config: &Config) -> Vec<Finding> {
    let e = Expect::from(config);
    let mut f = vec![kernel_support(), capabilities()];
    for &fam in &e.families {
        f.push(policy_routing(&e, fam));
    }
    let installed = Installed::read();
    f.extend(redirect_rules(&e, &installed));
    f.extend(sysctls(&e, &installed));
    if let Some(dns) = config.dns() {
        let names = dns.nft_sets();
        if !names.is_empty() {
            f.push(nft_sets(&dns.nft.table, &names, dns.nft.max_elements));
        }
    }
    f
}

/// Whether the kernel takes the sets DNS rules feed: the whole setup is
/// sent as one batch that is rolled back (see [`crate::nft::sets::probe`]).
fn nft_sets(table: &str, names: &[String], max_elements: u32) -> Finding {
    match crate::nft::sets::probe(table, names, max_elements) {
        Ok(()) => ok(format!(
            "nftables: the kernel accepts tproxyd's sets in inet {table} ({})",
            names
                .iter()
                .map(|n| format!("{n}4/{n}6"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Err(why) => problem(
            Status::Fail,
            format!("nftables: the kernel refused tproxyd's sets in inet {table}: {why}"),
            "run as root or with CAP_NET_ADMIN; if you declared the sets yourself, declare them \
             `{ type ipv4_addr; flags timeout; }` (and ipv6_addr for NAME6) or leave them to tproxyd",
        ),
    }
}

/// A report, and whether anything failed.
pub fn report(findings: &[Finding]) -> (String, bool) {
    let mut out = String::new();
    for finding in findings {
        let tag = match finding.status {
            Status::Ok => "[ ok ]",
            Status::Warn => "[warn]",
            Status::Fail => "[FAIL]",
        };
        let _ = writeln!(out, "{tag} {}", finding.what);
        if !finding.fix.is_empty() {
            let _ = writeln!(out, "       fix: {}", finding.fix);
        }
    }
    let failed = findings.iter().any(|f| f.status == Status::Fail);
    (out, failed)
}

fn command(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn kernel_support() -> Finding {
    // A throwaway table using both expressions TPROXY setups need; --check
    // makes the kernel validate it and throw it away.
    let probe = "table inet tproxyd_doctor_probe {
        chain c {
            type filter hook prerouting priority mangle;
            meta l4proto udp socket transparent 1 accept
            meta l4proto udp tproxy to :1 accept
        }
    }
";
    let checked = Command::new("nft")
        .args(["--check", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            if let Some(mut stdin) = child.stdin.take() {
                stdin.write_all(probe.as_bytes())?;
            }
            child.wait_with_output()
        });
    match checked {
        Ok(out) if out.status.success() => ok("kernel: nftables `tproxy` and `socket` expressions are supported"),
        Ok(out) => problem(
            Status::Fail,
            format!(
                "kernel: nftables refused a tproxy rule: {}",
                String::from_utf8_lossy(&out.stderr).lines().next().unwrap_or("").trim()
            ),
            "a kernel with CONFIG_NFT_TPROXY, CONFIG_NFT_SOCKET (or the xt_TPROXY / xt_socket modules for \
             iptables) and CAP_NET_ADMIN; try `modprobe nft_tproxy nft_socket` (OpenWrt: \
             `opkg install kmod-nft-tproxy kmod-nft-socket`)",
        ),
        Err(e) => problem(
            Status::Warn,
            format!("kernel: cannot run nft to check TPROXY support ({e})"),
            "apt-get install nftables",
        ),
    }
}

/// Effective capabilities of this process, from /proc.
fn capabilities() -> Finding {
    const NET_ADMIN: u32 = 12;
    const NET_RAW: u32 = 13;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |bit: u32| eff & (1 << bit) != 0;
    match (has(NET_ADMIN), has(NET_RAW)) {
        (true, true) => ok("capabilities: CAP_NET_ADMIN and CAP_NET_RAW present"),
        (admin, raw) => {
            let missing: Vec<&str> = [(admin, "CAP_NET_ADMIN"), (raw, "CAP_NET_RAW")]
                .iter()
                .filter(|(have, _)| !have)
                .map(|(_, n)| *n)
                .collect();
            problem(
                Status::Fail,
                format!("capabilities: {} missing here", missing.join(" and ")),
                "run as root, or as the unit in config/tproxyd.service does: \
                 AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW",
            )
        }
    }
}

fn policy_routing(e: &Expect, family: u8) -> Finding {
    let fam = format!("-{family}");
    let rules = command("ip", &[&fam, "rule", "show"]).unwrap_or_default();
    let want_rule = format!("fwmark {:#x} lookup {}", e.fwmark, e.table);
    let has_rule = rules
        .lines()
        .any(|l| l.contains(&want_rule) || l.contains(&format!("fwmark {:#x}/", e.fwmark)));
    let routes = command("ip", &[&fam, "route", "show", "table", &e.table.to_string()]).unwrap_or_default();
    let has_route = routes
        .lines()
        .any(|l| l.starts_with("local default dev lo") || l.starts_with("local ::/0 dev lo"));
    let any = if family == 4 { "0.0.0.0/0" } else { "::/0" };
    match (has_rule, has_route) {
        (true, true) => ok(format!(
            "policy routing (IPv{family}): fwmark {:#x} → table {} → local via lo",
            e.fwmark, e.table
        )),
        (false, _) => problem(
            Status::Fail,
            format!(
                "policy routing (IPv{family}): no `ip rule` for fwmark {:#x} lookup {}",
                e.fwmark, e.table
            ),
            format!(
                "ip {fam} rule add fwmark {} lookup {t} && ip {fam} route replace local {any} dev lo table {t} \
                 (or run iptables/tproxy-nft.sh up)",
                e.fwmark,
                t = e.table
            ),
        ),
        (true, false) => problem(
            Status::Fail,
            format!(
                "policy routing (IPv{family}): table {} has no `local default dev lo` route",
                e.table
            ),
            format!("ip {fam} route replace local {any} dev lo table {}", e.table),
        ),
    }
}

/// The redirect itself: present, pointing at every listener's port,
/// skipping our mark, setting the mark the policy routing expects.
fn redirect_rules(e: &Expect, installed: &Installed) -> Vec<Finding> {
    let (nft, ipt) = (&installed.nft, &installed.ipt);
    let mut f = Vec::new();
    let relay_port = e.udp_ports.first().copied().unwrap_or(15353);
    if !installed.any_tproxy() {
        f.push(problem(
            Status::Fail,
            "redirect: no nftables or iptables TPROXY rule found",
            format!(
                "TPROXY_PORT={relay_port} LAN_IF=<your LAN> iptables/tproxy-nft.sh up, or auto_rules in the config"
            ),
        ));
        return f;
    }
    for &port in &e.udp_ports {
        if installed.sends(Proto::Udp, port) {
            f.push(ok(format!("redirect: UDP TPROXY rule to the relay's port {port}")));
        } else {
            f.push(problem(
                Status::Fail,
                format!(
                    "redirect: TPROXY rules exist but none sends UDP to tproxyd's relay port {port} (relay.listen)"
                ),
                format!("run the rules' up again with TPROXY_PORT={port}, or make relay.listen match the rules"),
            ));
        }
    }
    for &port in &e.tcp_ports {
        if installed.sends(Proto::Tcp, port) {
            f.push(ok(format!("redirect: TCP TPROXY rule to the DNS-over-TCP port {port}")));
        } else {
            f.push(problem(
                Status::Fail,
                format!(
                    "redirect: no TPROXY rule sends TCP to dns.tcp_listen port {port}: DNS over TCP escapes the proxy"
                ),
                format!("run the rules' up again with DNS_TCP_PORT={port} (auto_rules sets it by itself)"),
            ));
        }
    }
    for port in installed.ports_for(Proto::Tcp) {
        if !e.tcp_ports.contains(&port) {
            f.push(problem(
                Status::Warn,
                format!(
                    "redirect: the rules send TCP to port {port}, where tproxyd does not listen: those connections \
                     are dropped"
                ),
                format!(
                    "add dns.tcp_listen = [\"0.0.0.0:{port}\"] to the config, or run the rules without DNS_TCP_PORT"
                ),
            ));
        }
    }
    let nft_skip = nft.contains(&format!("meta mark & {m:#010x} == {m:#010x}", m = e.mark))
        || nft.contains(&format!("meta mark {:#010x}", e.mark));
    let ipt_skip =
        ipt.contains(&format!("--mark {m:#x}/{m:#x}", m = e.mark)) || ipt.contains(&format!("--mark {:#x} ", e.mark));
    if nft_skip || ipt_skip {
        f.push(ok(format!(
            "redirect: packets with tproxyd's mark {:#x} are skipped",
            e.mark
        )));
    } else {
        f.push(problem(
            Status::Fail,
            format!(
                "redirect: no rule skips tproxyd's mark {:#x}: its own traffic would be captured again",
                e.mark
            ),
            format!(
                "make the rules' SKIP_MARK equal the config's mark ({}), then run the script's up again",
                e.mark
            ),
        ));
    }
    let nft_fw = nft.contains(&format!("meta mark set {:#010x}", e.fwmark));
    let ipt_fw = ipt.contains(&format!("--tproxy-mark {:#x}", e.fwmark));
    if nft_fw || ipt_fw {
        f.push(ok(format!(
            "redirect: captured packets get fwmark {:#x}, as the policy routing expects",
            e.fwmark
        )));
    } else {
        f.push(problem(
            Status::Warn,
            format!(
                "redirect: no rule sets fwmark {:#x}, which the policy routing looks up",
                e.fwmark
            ),
            "use the same FWMARK in the rules as in auto_rules.fwmark (default 1)",
        ));
    }
    f
}

fn sysctls(e: &Expect, installed: &Installed) -> Vec<Finding> {
    let read = |path: &str| std::fs::read_to_string(path).ok().map(|s| s.trim().to_string());
    let mut f = Vec::new();
    // LAN-side capture, from the config's auto_rules or from the rules
    // found installed (iptables/*.sh with LAN_IF): gateway mode, where the
    // LAN's other traffic must still be routed.
    let mut lan = e.lan.clone();
    lan.extend(installed.lan_interfaces());
    lan.sort();
    lan.dedup();
    if !lan.is_empty() {
        let on = lan.join(", ");
        match read("/proc/sys/net/ipv4/ip_forward").as_deref() {
            Some("1") => f.push(ok("forwarding: net.ipv4.ip_forward = 1")),
            _ => f.push(problem(
                Status::Fail,
                format!(
                    "forwarding: net.ipv4.ip_forward is off, but the rules capture traffic arriving on {on} \
                     (gateway mode): the LAN's traffic that is not captured is not routed"
                ),
                "sysctl -w net.ipv4.ip_forward=1 (and set it in /etc/sysctl.d/ to keep it)",
            )),
        }
        if e.families.contains(&6) {
            match read("/proc/sys/net/ipv6/conf/all/forwarding").as_deref() {
                Some("1") => f.push(ok("forwarding: net.ipv6.conf.all.forwarding = 1")),
                _ => f.push(problem(
                    Status::Warn,
                    format!(
                        "forwarding: net.ipv6.conf.all.forwarding is off: IPv6 traffic arriving on {on} that is \
                         not captured is not routed"
                    ),
                    "sysctl -w net.ipv6.conf.all.forwarding=1",
                )),
            }
        }
    }
    let mut strict = Vec::new();
    for dev in std::iter::once("all".to_string())
        .chain(lan.iter().cloned())
        .chain(std::iter::once("lo".to_string()))
    {
        if read(&format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter")).as_deref() == Some("1") {
            strict.push(dev);
        }
    }
    if strict.is_empty() {
        f.push(ok("rp_filter: not strict"));
    } else {
        f.push(problem(
            Status::Warn,
            format!(
                "rp_filter: strict (1) on {}: in local mode the rerouted packets arrive on lo with a source \
                 that routes elsewhere and can be dropped",
                strict.join(", ")
            ),
            "sysctl -w net.ipv4.conf.all.rp_filter=2 (loose), and the same for the interfaces listed",
        ));
    }
    f
}
