//! `auto_rules`: the daemon installs its own redirect at start and removes
//! it at exit.
//!
//! It runs the very script users run by hand (`iptables/tproxy-nft.sh`,
//! compiled in), so there is one definition of the rules. `up` first
//! removes whatever an earlier run left, which is how a table left behind
//! by a killed daemon is cleaned at the next start.

use std::io::Write;
use std::process::{Command, Stdio};

use crate::config::Config;

const POLICY_ROUTING: &str = include_str!("../iptables/lib/policy-routing.sh");
const NFT_SCRIPT: &str = include_str!("../iptables/tproxy-nft.sh");

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error("cannot run sh: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("iptables/tproxy-nft.sh {action} failed: {stderr}")]
    Script { action: &'static str, stderr: String },
}

/// The script's settings, derived from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoRules {
    env: Vec<(&'static str, String)>,
}

impl AutoRules {
    /// `None` unless the config asks for `auto_rules`.
    pub fn from_config(config: &Config) -> Option<AutoRules> {
        let r = config.auto_rules.as_ref()?.get_ref();
        let listen = &config.relay.listen.0;
        let port = listen.first().map_or(15353, |a| a.port());
        let mut families = Vec::new();
        if listen.iter().any(|a| a.is_ipv4()) {
            families.push("4");
        }
        if listen.iter().any(|a| a.is_ipv6()) {
            families.push("6");
        }
        let join = |v: Vec<String>| v.join(" ");
        let mut env = vec![
            ("TPROXY_PORT", port.to_string()),
            ("LAN_IF", r.lan_interfaces.join(" ")),
            ("LOCAL", if r.local { "1" } else { "0" }.to_string()),
            ("FWMARK", r.fwmark.to_string()),
            ("SKIP_MARK", config.mark.0.to_string()),
            ("ROUTE_TABLE", r.route_table.to_string()),
            ("NFT_TABLE", r.nft_table.clone()),
            ("FAMILIES", families.join(" ")),
            (
                "UDP_PORTS",
                r.udp_ports
                    .iter()
                    .map(|p| {
                        if p.first == p.last {
                            p.first.to_string()
                        } else {
                            format!("{}-{}", p.first, p.last)
                        }
                    })
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "BYPASS4",
                join(
                    r.bypass
                        .iter()
                        .filter(|n| n.addr().is_ipv4())
                        .map(ToString::to_string)
                        .collect(),
                ),
            ),
            (
                "BYPASS6",
                join(
                    r.bypass
                        .iter()
                        .filter(|n| n.addr().is_ipv6())
                        .map(ToString::to_string)
                        .collect(),
                ),
            ),
        ];
        if let Some(tcp) = config.dns().and_then(|d| d.tcp_listen.first()) {
            env.push(("DNS_TCP_PORT", tcp.port().to_string()));
        }
        // The listeners the anti-spoofing rule guards (the script's default,
        // 53, when the config has none).
        let mut dns_ports: Vec<u16> = config
            .dns()
            .map(|d| d.listen.iter().map(|a| a.port()).collect())
            .unwrap_or_default();
        dns_ports.sort_unstable();
        dns_ports.dedup();
        if !dns_ports.is_empty() {
            let ports: Vec<String> = dns_ports.iter().map(ToString::to_string).collect();
            env.push(("DNS_PORTS", ports.join(",")));
        }
        Some(AutoRules { env })
    }

    /// Installs the redirect, replacing any left by an earlier run.
    pub fn install(&self) -> Result<(), FirewallError> {
        self.run("up")
    }

    /// Removes it.
    pub fn remove(&self) -> Result<(), FirewallError> {
        self.run("down")
    }

    fn run(&self, action: &'static str) -> Result<(), FirewallError> {
        let mut child = Command::new("sh")
            .args(["-s", "--", action])
            .env_clear()
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(POLICY_ROUTING.as_bytes())?;
            stdin.write_all(b"\n")?;
            stdin.write_all(NFT_SCRIPT.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if out.status.success() {
            Ok(())
        } else {
            Err(FirewallError::Script {
                action,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }
}
