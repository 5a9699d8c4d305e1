//! Operational settings: the admin endpoint, self-installed redirect rules.

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer};
use std::net::SocketAddr;

use super::udp::PortRange;

/// `[admin]`: Prometheus metrics over HTTP. Absent means off.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where to serve `/metrics`; a loopback address only, because the
    /// endpoint has no authentication.
    pub listen: LoopbackAddr,
}

/// A socket address on 127.0.0.0/8 or ::1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopbackAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for LoopbackAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let addr = SocketAddr::deserialize(d)?;
        if !addr.ip().is_loopback() {
            return Err(de::Error::custom(format!(
                "admin.listen {addr} is not a loopback address: the metrics endpoint has no \
                 authentication, so it only listens on 127.0.0.1 or [::1] (reach it remotely \
                 through a proxy or SSH tunnel)"
            )));
        }
        Ok(LoopbackAddr(addr))
    }
}

/// `[auto_rules]`: tproxyd installs the redirect itself at start (the same
/// nftables ruleset and policy routing as `iptables/tproxy-nft.sh`) and
/// removes it at exit. Ports and marks come from the rest of the config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoRulesConfig {
    /// Gateway mode: capture UDP arriving on these interfaces.
    #[serde(default)]
    pub lan_interfaces: Vec<String>,
    /// Local mode: capture this host's own UDP too.
    #[serde(default)]
    pub local: bool,
    /// Mark that sends captured packets to `route_table`.
    #[serde(default = "AutoRulesConfig::default_fwmark")]
    pub fwmark: u32,
    /// Policy-routing table for the `local default dev lo` route.
    #[serde(default = "AutoRulesConfig::default_table")]
    pub route_table: u32,
    /// Only these destination ports (empty: all UDP).
    #[serde(default)]
    pub udp_ports: Vec<PortRange>,
    /// Destinations never captured.
    #[serde(default, deserialize_with = "super::cidr::list")]
    pub bypass: Vec<IpNet>,
    /// Name of the nftables table (inet family).
    #[serde(default = "AutoRulesConfig::default_nft_table")]
    pub nft_table: String,
}

impl AutoRulesConfig {
    fn default_fwmark() -> u32 {
        1
    }
    fn default_table() -> u32 {
        100
    }
    fn default_nft_table() -> String {
        "tproxyd".into()
    }
}

/// Checks that need the rest of the config.
pub(super) fn validate_auto_rules(r: &AutoRulesConfig, mark: u32, listen: &[SocketAddr]) -> Result<(), String> {
    if r.lan_interfaces.is_empty() && !r.local {
        return Err("auto_rules captures nothing: set lan_interfaces and/or local = true".into());
    }
    if r.fwmark == 0 || r.fwmark & mark == mark {
        return Err(format!(
            "auto_rules.fwmark {:#x} must be non-zero and must not carry all bits of mark {mark:#x}, \
             or captured packets would be skipped as tproxyd's own",
            r.fwmark
        ));
    }
    let ports: Vec<u16> = listen.iter().map(SocketAddr::port).collect();
    if ports.windows(2).any(|w| w[0] != w[1]) {
        return Err("auto_rules needs every relay.listen address on the same port".into());
    }
    let name_ok = |n: &str| {
        !n.is_empty() && n.len() <= 15 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b))
    };
    if let Some(bad) = r.lan_interfaces.iter().find(|n| !name_ok(n)) {
        return Err(format!("{bad:?} is not a valid interface name"));
    }
    if !r.nft_table.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') || r.nft_table.is_empty() {
        return Err(format!("{:?} is not a valid nftables table name", r.nft_table));
    }
    Ok(())
}
