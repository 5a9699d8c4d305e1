//! `[[relay.rules]]`: where each UDP flow goes and how its NAT behaves.

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer};
use std::net::SocketAddr;
use std::time::Duration;
use toml::Spanned;

use super::duration;

/// How a flow's public mapping behaves (RFC 4787 terms).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatMode {
    /// One upstream socket per (client, destination), connected to that
    /// destination: address- and port-dependent mapping and filtering.
    /// Nothing can reach the client unless it wrote to it first.
    #[default]
    Symmetric,
    /// One upstream socket per client endpoint, for every destination:
    /// endpoint-independent mapping and filtering ("NAT type open"). Any
    /// remote may send to the mapping, and the client receives it from that
    /// remote's own address.
    FullCone,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UdpAction {
    /// To the original destination.
    Direct,
    /// To `to` instead; replies still come from the original destination.
    Redirect,
    /// To the original destination, through `interface` and/or with `mark`.
    Interface,
    /// Through a SOCKS5 server's UDP ASSOCIATE.
    Socks5,
    /// Dropped (and counted).
    Drop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// A destination port or an inclusive range: `3478` or `"27000-27100"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    fn parse(text: &str) -> Result<PortRange, String> {
        let bad = || format!("invalid port range {text:?}: expected e.g. 3478 or \"27000-27100\"");
        let (a, b) = text.split_once('-').unwrap_or((text, text));
        let first: u16 = a.trim().parse().map_err(|_| bad())?;
        let last: u16 = b.trim().parse().map_err(|_| bad())?;
        if first == 0 || first > last {
            return Err(bad());
        }
        Ok(PortRange { first, last })
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = PortRange;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a port number or a range such as \"27000-27100\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                PortRange::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                PortRange::parse(&v.to_string()).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                PortRange::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// One `[[relay.rules]]` entry as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UdpRuleConfig {
    /// Only flows from these client networks.
    #[serde(default, deserialize_with = "super::cidr::list")]
    pub clients: Vec<IpNet>,
    /// Only flows to an address tproxyd's own DNS answered this client for
    /// one of these names (or an alias they led to); same syntax as DNS
    /// rules: `"voip.example"`, `"*.game.example"`.
    #[serde(default)]
    pub domains: Vec<super::dns::DomainPattern>,
    /// Domain-list files, as for DNS rules.
    #[serde(default)]
    pub lists: Vec<std::path::PathBuf>,
    /// `domains` and `lists` loaded, filled in by [`super::Config::parse`].
    #[serde(skip)]
    pub names: Option<std::sync::Arc<crate::dns::names::DomainSet>>,
    /// Only flows to these destination networks.
    #[serde(default, deserialize_with = "super::cidr::list")]
    pub destinations: Vec<IpNet>,
    /// Only flows to these destination ports.
    #[serde(default)]
    pub ports: Vec<PortRange>,
    /// Only IPv4 or only IPv6 flows.
    #[serde(default)]
    pub family: Option<Family>,
    pub action: UdpAction,
    /// `redirect`: where the flow goes instead.
    #[serde(default)]
    pub to: Option<SocketAddr>,
    /// `interface`: the upstream socket is bound to this device
    /// (`SO_BINDTODEVICE`), e.g. a tunnel.
    #[serde(default)]
    pub interface: Option<String>,
    /// `interface`: bits added (OR) to the socket mark, for `ip rule fwmark`
    /// policy routing; the redirect's skip rule still matches.
    #[serde(default)]
    pub mark: Option<u32>,
    /// `socks5`: the SOCKS5 server.
    #[serde(default)]
    pub socks5: Option<SocketAddr>,
    /// `socks5`: RFC 1929 username/password.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Idle timeout for these flows (default: `relay.idle_timeout`).
    #[serde(default, deserialize_with = "optional_duration")]
    pub idle_timeout: Option<Duration>,
    /// NAT behaviour for these flows (default: `relay.nat`).
    #[serde(default)]
    pub nat: Option<NatMode>,
    /// Symmetric flows only: `true` gives each flow an upstream socket of
    /// its own (a random port, see `relay.own_socket_ports`), `false` a
    /// pool socket; absent, `relay.own_socket_ports` decides by the
    /// destination port.
    #[serde(default)]
    pub own_socket: Option<bool>,
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let v = duration::deserialize(d)?;
    if v.is_zero() {
        return Err(de::Error::custom("idle_timeout must be greater than zero"));
    }
    Ok(Some(v))
}

/// Loads the names of domain rules (their `lists` files are read here, so
/// a missing file refuses the config like any other mistake). Domain rules
/// match what tproxyd's DNS answered, so they need the `[dns]` section.
pub(super) fn load_names(
    rules: &mut [Spanned<UdpRuleConfig>],
    dns: bool,
) -> Result<(), (std::ops::Range<usize>, String)> {
    for rule in rules.iter_mut() {
        let span = rule.span();
        let r = rule.get_mut();
        if r.domains.is_empty() && r.lists.is_empty() {
            continue;
        }
        if !dns {
            return Err((
                span,
                "domains and lists match names tproxyd's own DNS answered: add a [dns] section".into(),
            ));
        }
        let mut set = crate::dns::names::DomainSet::new();
        for d in &r.domains {
            set.insert(&d.name, d.subdomains);
        }
        for path in &r.lists {
            crate::dns::lists::load_domain_list(path, &mut set).map_err(|e| (span.clone(), e.to_string()))?;
        }
        set.shrink_to_fit();
        r.names = Some(std::sync::Arc::new(set));
    }
    Ok(())
}

/// Checks each rule's fields against its action; errors name the rule.
pub(super) fn validate(
    rules: &[Spanned<UdpRuleConfig>],
    default_nat: NatMode,
    listen: &[SocketAddr],
) -> Result<(), (std::ops::Range<usize>, String)> {
    for rule in rules {
        check(rule.get_ref(), default_nat, listen).map_err(|reason| (rule.span(), reason))?;
    }
    Ok(())
}

fn check(r: &UdpRuleConfig, default_nat: NatMode, listen: &[SocketAddr]) -> Result<(), String> {
    let given = |set: bool, key: &'static str| set.then_some(key);
    let extras = [
        given(r.to.is_some(), "to"),
        given(r.interface.is_some(), "interface"),
        given(r.mark.is_some(), "mark"),
        given(r.socks5.is_some(), "socks5"),
        given(r.username.is_some() || r.password.is_some(), "username/password"),
    ];
    let allowed: &[&str] = match r.action {
        UdpAction::Direct | UdpAction::Drop => &[],
        UdpAction::Redirect => &["to"],
        UdpAction::Interface => &["interface", "mark"],
        UdpAction::Socks5 => &["socks5", "username/password"],
    };
    if let Some(key) = extras.iter().flatten().find(|k| !allowed.contains(k)) {
        return Err(format!("{key} does not apply to action {:?}", r.action).to_lowercase());
    }
    if r.own_socket.is_some() {
        if matches!(r.action, UdpAction::Drop | UdpAction::Socks5) {
            return Err(format!(
                "own_socket does not apply to action {}: {}",
                format!("{:?}", r.action).to_lowercase(),
                if r.action == UdpAction::Drop {
                    "a dropped flow has no socket"
                } else {
                    "a SOCKS5 flow leaves from the port its proxy picks"
                }
            ));
        }
        if r.nat.unwrap_or(default_nat) == NatMode::FullCone {
            return Err("own_socket is for symmetric flows: a full-cone flow has a socket of its own already".into());
        }
    }
    match r.action {
        UdpAction::Redirect => {
            let to = r.to.ok_or("a redirect rule needs to = \"host:port\"")?;
            if r.nat.unwrap_or(default_nat) == NatMode::FullCone {
                return Err("a redirect sends a flow to one place: nat = \"full-cone\" does not apply".into());
            }
            if redirects_to_ourselves(to, listen) {
                return Err(format!(
                    "redirect to {to} is tproxyd's own listener on this host: every datagram would loop"
                ));
            }
        }
        UdpAction::Interface => {
            if r.interface.is_none() && r.mark.is_none() {
                return Err("an interface rule needs interface = \"name\" and/or mark".into());
            }
            if let Some(name) = &r.interface {
                if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', '\t']) {
                    return Err(format!("{name:?} is not a valid interface name"));
                }
            }
            if r.mark == Some(0) {
                return Err("mark must not be 0".into());
            }
        }
        UdpAction::Socks5 => {
            if r.socks5.is_none() {
                return Err("a socks5 rule needs socks5 = \"host:port\"".into());
            }
            match (&r.username, &r.password) {
                (Some(u), Some(p)) if (1..=255).contains(&u.len()) && (1..=255).contains(&p.len()) => {}
                (None, None) => {}
                _ => {
                    return Err("username and password go together, 1 to 255 bytes each (RFC 1929)".into());
                }
            }
        }
        UdpAction::Direct | UdpAction::Drop => {}
    }
    Ok(())
}

/// A redirect target that is one of our own listen sockets on this host.
fn redirects_to_ourselves(to: SocketAddr, listen: &[SocketAddr]) -> bool {
    listen.iter().any(|l| {
        l.port() == to.port()
            && (l.ip() == to.ip()
                || to.ip().is_loopback()
                || to.ip().is_unspecified()
                || (l.ip().is_unspecified()
                    && l.is_ipv4() == to.is_ipv4()
                    && crate::net::sockets::is_local_address(to.ip())))
    })
}
