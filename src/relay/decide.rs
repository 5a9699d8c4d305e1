//! What happens to a redirected datagram, decided in one place.
//!
//! The listener asks this for every datagram it reads and `tproxyd
//! explain` asks it for the flow a user describes, so the explanation is
//! the daemon's own decision, not a second copy of it. It is a pure
//! function of the datagram's addresses and the daemon's settings: the two
//! facts that need the system (is an address ours, does the DNS engine take
//! a port) come in as closures, so tests need no root and no sockets.

use hickory_proto::rr::Name;
use std::net::{IpAddr, SocketAddr};

use super::rules::{Route, UdpRule, UdpRules};

/// The fate of one datagram.
#[derive(Debug, Clone, Copy)]
pub enum Decision<'r> {
    /// No original destination (not redirected by TPROXY), or a sender
    /// with port 0: nothing to relay to or answer.
    NoOriginalDestination,
    /// An IPv4-mapped IPv6 original destination (`::ffff:a.b.c.d`), which
    /// no IPv6 packet should carry (RFC 4291 2.5.5.2) and the kernel
    /// still diverts. Rules written for the IPv4 address do not match it,
    /// yet a SOCKS5 server may relay it to that address over IPv4: a LAN
    /// device could reach a destination a drop rule keeps it from.
    MappedDestination,
    /// Sent straight to the listener itself: relaying it would bring it
    /// right back, forever.
    Loop,
    /// A query to a DNS port: answered by the DNS engine.
    Dns,
    /// Dropped by this rule.
    Drop(&'r UdpRule),
    /// Relayed as this rule says.
    Relay(&'r UdpRule),
}

/// Two decisions are the same when they name the same outcome and rule.
impl PartialEq for Decision<'_> {
    fn eq(&self, other: &Self) -> bool {
        use Decision::*;
        match (self, other) {
            (NoOriginalDestination, NoOriginalDestination)
            | (MappedDestination, MappedDestination)
            | (Loop, Loop)
            | (Dns, Dns) => true,
            (Drop(a), Drop(b)) | (Relay(a), Relay(b)) => a.number == b.number,
            _ => false,
        }
    }
}

/// What `decide` needs to know about the host it runs on.
pub struct Host<'a> {
    /// The listening socket's own address (maybe a wildcard).
    pub listener: SocketAddr,
    /// Whether the DNS engine answers datagrams to this port.
    pub dns_port: &'a dyn Fn(u16) -> bool,
    /// Whether this address belongs to this host.
    pub is_local: &'a dyn Fn(IpAddr) -> bool,
    /// The names tproxyd's DNS answered `client` (first) with the address
    /// `dst` (second), for domain rules; asked only when one is reached.
    pub names: &'a dyn Fn(IpAddr, IpAddr) -> Vec<Name>,
}

/// For a [`Host`] that knows no DNS history.
pub fn no_names(_: IpAddr, _: IpAddr) -> Vec<Name> {
    Vec::new()
}

/// Decides the datagram from `peer` whose original destination was
/// `orig_dst`.
pub fn decide<'r>(
    peer: SocketAddr,
    orig_dst: Option<SocketAddr>,
    host: &Host<'_>,
    rules: &'r UdpRules,
) -> Decision<'r> {
    let Some(dst) = orig_dst.filter(|_| peer.port() != 0) else {
        return Decision::NoOriginalDestination;
    };
    if let IpAddr::V6(v6) = dst.ip() {
        if v6.to_ipv4_mapped().is_some() {
            return Decision::MappedDestination;
        }
    }
    if is_listener(dst, host) {
        return Decision::Loop;
    }
    if (host.dns_port)(dst.port()) {
        return Decision::Dns;
    }
    let rule = rules.route_named(peer, dst, &|| (host.names)(peer.ip(), dst.ip()));
    if rule.route == Route::Drop {
        Decision::Drop(rule)
    } else {
        Decision::Relay(rule)
    }
}

/// True when `dst` is the listener itself: same port and a local address.
fn is_listener(dst: SocketAddr, host: &Host<'_>) -> bool {
    if dst.port() != host.listener.port() {
        return false;
    }
    if !host.listener.ip().is_unspecified() {
        return dst.ip() == host.listener.ip();
    }
    // Only asked when a datagram's destination port equals ours.
    (host.is_local)(dst.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn rules(text: &str) -> UdpRules {
        let c = Config::parse(text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        UdpRules::new(&c.relay, 0xff)
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const RULES: &str = r#"
[relay]
[[relay.rules]]
ports = [27015]
action = "drop"
[[relay.rules]]
destinations = ["203.0.113.0/24"]
action = "redirect"
to = "198.51.100.9:9000"
"#;

    fn host<'a>(dns: &'a dyn Fn(u16) -> bool, local: &'a dyn Fn(IpAddr) -> bool) -> Host<'a> {
        Host {
            listener: sa("0.0.0.0:15353"),
            dns_port: dns,
            is_local: local,
            names: &no_names,
        }
    }

    #[test]
    fn each_outcome_in_order() {
        let r = rules(RULES);
        let dns = |p: u16| p == 53;
        let local = |ip: IpAddr| ip == "192.0.2.1".parse::<IpAddr>().unwrap();
        let h = host(&dns, &local);
        let client = sa("192.0.2.10:5000");
        assert_eq!(decide(client, None, &h, &r), Decision::NoOriginalDestination);
        assert_eq!(
            decide(sa("192.0.2.10:0"), Some(sa("198.51.100.7:7")), &h, &r),
            Decision::NoOriginalDestination
        );
        assert_eq!(decide(client, Some(sa("192.0.2.1:15353")), &h, &r), Decision::Loop);
        // An IPv4 rule's address, IPv4-mapped, is neither matched by it
        // (the default rule would relay it) nor relayed.
        let client6 = sa("[2001:db8:1::10]:5000");
        assert_eq!(
            decide(client6, Some(sa("[::ffff:203.0.113.9]:7000")), &h, &r),
            Decision::MappedDestination
        );
        assert!(matches!(
            decide(client6, Some(sa("[2001:db8:2::7]:27016")), &h, &r),
            Decision::Relay(rule) if rule.number == 0
        ));
        // The listener's port on another host is an ordinary flow.
        assert!(matches!(
            decide(client, Some(sa("198.51.100.7:15353")), &h, &r),
            Decision::Relay(rule) if rule.number == 0
        ));
        // DNS comes before the rules: a drop rule for port 53 never sees it.
        assert_eq!(decide(client, Some(sa("203.0.113.53:53")), &h, &r), Decision::Dns);
        assert!(matches!(
            decide(client, Some(sa("198.51.100.7:27015")), &h, &r),
            Decision::Drop(rule) if rule.number == 1
        ));
        assert!(matches!(
            decide(client, Some(sa("203.0.113.9:7000")), &h, &r),
            Decision::Relay(rule) if rule.number == 2
        ));
    }

    #[test]
    fn a_listener_on_one_address_loops_only_there() {
        let r = rules(RULES);
        let never = |_: u16| false;
        let nothing_local = |_: IpAddr| false;
        let h = Host {
            listener: sa("192.0.2.1:15353"),
            dns_port: &never,
            is_local: &nothing_local,
            names: &no_names,
        };
        let client = sa("192.0.2.10:5000");
        assert_eq!(decide(client, Some(sa("192.0.2.1:15353")), &h, &r), Decision::Loop);
        assert!(matches!(
            decide(client, Some(sa("192.0.2.2:15353")), &h, &r),
            Decision::Relay(_)
        ));
    }
}
