//! Per-flow routing: the first `[[relay.rules]]` entry matching a flow's
//! client, destination, port and family decides where it goes, how its NAT
//! behaves and how long it may idle. Flows no rule matches go direct.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hickory_proto::rr::Name;

use super::socks5::Socks5Server;
use crate::config::RelayConfig;
use crate::config::udp::{Family, NatMode, PortRange, UdpAction, UdpRuleConfig};
use crate::dns::names::{DomainSet, query_key};

/// Where a flow's datagrams go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// To the original destination.
    Direct,
    /// To this address instead.
    Redirect(SocketAddr),
    /// Direct, from a socket bound to `device` and marked `mark`.
    Interface { device: Option<String>, mark: u32 },
    /// Through a SOCKS5 server.
    Socks5(Arc<Socks5Server>),
    /// Nowhere.
    Drop,
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Route::Direct => f.write_str("direct to the original destination"),
            Route::Redirect(to) => write!(f, "redirect to {to} (replies still from the original destination)"),
            Route::Interface { device, mark } => {
                f.write_str("direct")?;
                if let Some(d) = device {
                    write!(f, " through interface {d}")?;
                }
                write!(f, " with socket mark {mark:#x}")
            }
            Route::Socks5(s) => {
                write!(f, "through SOCKS5 server {}", s.addr)?;
                if let Some((user, _)) = &s.auth {
                    write!(f, " as user {user:?}")?;
                }
                Ok(())
            }
            Route::Drop => f.write_str("drop"),
        }
    }
}

#[derive(Debug)]
pub struct UdpRule {
    /// Position in the config from 1; 0 for the built-in "direct" default.
    pub number: usize,
    clients: Vec<IpNet>,
    destinations: Vec<IpNet>,
    ports: Vec<PortRange>,
    family: Option<Family>,
    /// `domains`/`lists`: the flow's destination must have been answered
    /// to this client, by tproxyd's DNS, for one of these names.
    names: Option<Arc<DomainSet>>,
    pub route: Route,
    pub nat: NatMode,
    pub idle_timeout: Duration,
    /// Which of this rule's flows get an upstream socket of their own.
    own_socket: OwnSocket,
    /// The idle timeout of those flows.
    own_idle_timeout: Duration,
}

/// Which flows of a rule get an upstream socket of their own, on a port the
/// kernel picks at random, instead of a pool socket (see
/// `relay::pool::Pools::own`). Only symmetric flows relayed from tproxyd's
/// own sockets can: a full cone has a socket per client endpoint already,
/// a SOCKS5 flow leaves from its proxy's port.
#[derive(Debug, Clone, PartialEq, Eq)]
enum OwnSocket {
    Never,
    Always,
    /// Flows to these ports (`relay.own_socket_ports`): the port the client
    /// wrote to or, for a `redirect`, the port the flow is sent to.
    Ports(Arc<[PortRange]>),
}

/// The names a client resolved to a flow's destination, looked up once per
/// decision and only if a domain rule is reached.
struct Known<'a> {
    lookup: &'a dyn Fn() -> Vec<Name>,
    keys: Option<Vec<String>>,
}

impl Known<'_> {
    fn keys(&mut self) -> &[String] {
        let lookup = self.lookup;
        self.keys
            .get_or_insert_with(|| lookup().iter().map(query_key).collect())
    }
}

impl UdpRule {
    fn matches(&self, client: SocketAddr, dst: SocketAddr, known: &mut Known<'_>) -> bool {
        let in_any = |nets: &[IpNet], ip: IpAddr| nets.is_empty() || nets.iter().any(|n| n.contains(&ip));
        in_any(&self.clients, client.ip())
            && in_any(&self.destinations, dst.ip())
            && (self.ports.is_empty() || self.ports.iter().any(|p| p.contains(dst.port())))
            && match self.family {
                None => true,
                Some(Family::Ipv4) => dst.is_ipv4(),
                Some(Family::Ipv6) => dst.is_ipv6(),
            }
            && match &self.names {
                None => true,
                Some(set) => known.keys().iter().any(|k| set.matches(k)),
            }
    }

    /// Whether this rule matches by name (a `domains`/`lists` rule).
    pub fn by_domain(&self) -> bool {
        self.names.is_some()
    }

    /// Whether this rule's flow to `dst` (the original destination, which
    /// the rule matched on) gets an upstream socket of its own.
    ///
    /// By the ports, either port counts: the one the client wrote to and,
    /// for a `redirect`, the one the flow is sent to. A query redirected
    /// from port 5353 to a resolver's port 53 is as exposed to a spoofer
    /// who knows its source port as one sent to port 53 directly, and a
    /// client's port-53 query redirected to a resolver on 5353 still
    /// counts on its source port being unknown.
    pub fn own_socket(&self, dst: SocketAddr) -> bool {
        match &self.own_socket {
            OwnSocket::Never => false,
            OwnSocket::Always => true,
            OwnSocket::Ports(ports) => {
                let sent_to = match &self.route {
                    Route::Redirect(to) => to.port(),
                    _ => dst.port(),
                };
                ports.iter().any(|p| p.contains(dst.port()) || p.contains(sent_to))
            }
        }
    }

    /// The idle timeout of this rule's flows, those on a socket of their
    /// own (`own`) or the others.
    pub fn idle_timeout_for(&self, own: bool) -> Duration {
        if own { self.own_idle_timeout } else { self.idle_timeout }
    }
}

/// Which flows get a socket of their own under a rule with this route, NAT
/// mode and `own_socket` setting (`None`: by `relay.own_socket_ports`).
fn own_socket(route: &Route, nat: NatMode, setting: Option<bool>, ports: &Arc<[PortRange]>) -> OwnSocket {
    let pooled = nat == NatMode::Symmetric && !matches!(route, Route::Socks5(_) | Route::Drop);
    match setting {
        _ if !pooled => OwnSocket::Never,
        Some(true) => OwnSocket::Always,
        Some(false) => OwnSocket::Never,
        None if ports.is_empty() => OwnSocket::Never,
        None => OwnSocket::Ports(ports.clone()),
    }
}

#[derive(Debug)]
pub struct UdpRules {
    rules: Vec<UdpRule>,
    default: UdpRule,
    /// Tells these rules from every other set built in this process
    /// (from 1): what a flow remembers verdicts under.
    generation: u64,
    /// Whether any rule drops.
    drops: bool,
}

/// The generation of the next set of rules built.
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

impl UdpRules {
    /// The rules of `config`; `mark` is the daemon's socket mark, to which
    /// an interface rule's own mark bits are added.
    pub fn new(config: &RelayConfig, mark: u32) -> UdpRules {
        let own_ports: Arc<[PortRange]> = config.own_socket_ports.as_slice().into();
        let rules = config
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| rule(i + 1, r.get_ref(), config, mark, &own_ports))
            .collect::<Vec<UdpRule>>();
        UdpRules {
            drops: rules.iter().any(|r| r.route == Route::Drop),
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            rules,
            default: UdpRule {
                number: 0,
                clients: Vec::new(),
                destinations: Vec::new(),
                ports: Vec::new(),
                family: None,
                names: None,
                own_socket: own_socket(&Route::Direct, config.nat, None, &own_ports),
                route: Route::Direct,
                nat: config.nat,
                idle_timeout: config.idle_timeout,
                own_idle_timeout: config.own_socket_idle_timeout.min(config.idle_timeout),
            },
        }
    }

    /// The rule deciding the flow from `client` to `dst`, for a client
    /// whose DNS history is unknown (domain rules do not match).
    pub fn route(&self, client: SocketAddr, dst: SocketAddr) -> &UdpRule {
        self.route_named(client, dst, &Vec::new)
    }

    /// The rule deciding the flow from `client` to `dst`; `names` tells
    /// which names tproxyd's DNS answered this client with `dst`'s address
    /// (asked only when a domain rule is reached, at most once).
    pub fn route_named(&self, client: SocketAddr, dst: SocketAddr, names: &dyn Fn() -> Vec<Name>) -> &UdpRule {
        let mut known = Known {
            lookup: names,
            keys: None,
        };
        self.rules
            .iter()
            .find(|r| r.matches(client, dst, &mut known))
            .unwrap_or(&self.default)
    }

    /// The rule numbered `number` (0, or a number past the last, is the
    /// built-in default), for work that holds the rules and a rule's
    /// number instead of a borrow.
    pub fn numbered(&self, number: usize) -> &UdpRule {
        number
            .checked_sub(1)
            .and_then(|i| self.rules.get(i))
            .unwrap_or(&self.default)
    }

    /// Whether any rule drops.
    pub fn has_drop_rules(&self) -> bool {
        self.drops
    }

    /// Tells these rules from any other set this process built.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Whether any rule matches by name.
    pub fn has_domain_rules(&self) -> bool {
        self.rules.iter().any(UdpRule::by_domain)
    }
}

fn rule(number: usize, r: &UdpRuleConfig, config: &RelayConfig, mark: u32, own_ports: &Arc<[PortRange]>) -> UdpRule {
    // Config validation guarantees each action's fields are present.
    let route = match r.action {
        UdpAction::Direct => Route::Direct,
        UdpAction::Drop => Route::Drop,
        UdpAction::Redirect => r.to.map_or(Route::Drop, Route::Redirect),
        UdpAction::Interface => Route::Interface {
            device: r.interface.clone(),
            mark: mark | r.mark.unwrap_or(0),
        },
        UdpAction::Socks5 => match r.socks5 {
            Some(addr) => Route::Socks5(Arc::new(Socks5Server {
                addr,
                auth: r.username.clone().zip(r.password.clone()),
            })),
            None => Route::Drop,
        },
    };
    let nat = r.nat.unwrap_or(config.nat);
    UdpRule {
        number,
        clients: r.clients.clone(),
        destinations: r.destinations.clone(),
        ports: r.ports.clone(),
        family: r.family,
        names: r.names.clone(),
        own_socket: own_socket(&route, nat, r.own_socket, own_ports),
        route,
        nat,
        idle_timeout: r.idle_timeout.unwrap_or(config.idle_timeout),
        // A rule's own timeout is for all its flows; otherwise the shorter
        // default of flows on a socket of their own, never longer than
        // the relay's.
        own_idle_timeout: r
            .idle_timeout
            .unwrap_or(config.own_socket_idle_timeout.min(config.idle_timeout)),
    }
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

    #[test]
    fn first_match_and_default() {
        let r = rules(
            r#"
[relay]
idle_timeout = "30s"
[[relay.rules]]
clients = ["192.0.2.64/26"]
ports = ["27000-27100"]
action = "drop"
[[relay.rules]]
destinations = ["198.51.100.0/25"]
family = "ipv4"
action = "interface"
interface = "wg0"
mark = 0x200
nat = "full-cone"
idle_timeout = "10m"
[[relay.rules]]
family = "ipv6"
action = "redirect"
to = "[2001:db8:3::7]:7000"
"#,
        );
        let kid = sa("192.0.2.70:5000");
        let adult = sa("192.0.2.10:5000");
        assert_eq!(r.route(kid, sa("203.0.113.9:27015")).route, Route::Drop);
        assert_eq!(r.route(adult, sa("203.0.113.9:27015")).number, 0);
        let game = r.route(adult, sa("198.51.100.7:3478"));
        assert_eq!(game.number, 2);
        assert_eq!(
            game.route,
            Route::Interface {
                device: Some("wg0".into()),
                mark: 0x2ff
            }
        );
        assert_eq!(
            (game.nat, game.idle_timeout),
            (NatMode::FullCone, Duration::from_secs(600))
        );
        let v6 = r.route(sa("[2001:db8:1::10]:5000"), sa("[2001:db8:2::7]:9"));
        assert_eq!(v6.route, Route::Redirect(sa("[2001:db8:3::7]:7000")));
        let default = r.route(adult, sa("203.0.113.9:9"));
        assert_eq!(
            (default.route.clone(), default.nat, default.idle_timeout),
            (Route::Direct, NatMode::Symmetric, Duration::from_secs(30))
        );
    }

    #[test]
    fn own_sockets_by_port_or_by_rule_and_their_idle_timeout() {
        let r = rules(
            r#"
[relay]
idle_timeout = "5m"
own_socket_ports = [53, "123-124"]
[[relay.rules]]
ports = [5353]
action = "direct"
own_socket = true
[[relay.rules]]
destinations = ["203.0.113.0/24"]
action = "interface"
mark = 0x200
own_socket = false
idle_timeout = "1m"
[[relay.rules]]
destinations = ["198.51.100.128/25"]
action = "direct"
nat = "full-cone"
[[relay.rules]]
destinations = ["198.51.100.0/26"]
action = "redirect"
to = "198.51.100.9:53"
idle_timeout = "10s"
[[relay.rules]]
destinations = ["198.51.100.64/26"]
action = "redirect"
to = "198.51.100.9:5353"
idle_timeout = "10s"
"#,
        );
        let client = sa("192.0.2.10:5000");
        let own = |dst: &str| {
            let rule = r.route(client, sa(dst));
            let dst = sa(dst);
            (
                rule.number,
                rule.own_socket(dst),
                rule.idle_timeout_for(rule.own_socket(dst)),
            )
        };
        let (s30, m5) = (Duration::from_secs(30), Duration::from_secs(300));
        // The default rule, by the ports; their flows idle out sooner.
        assert_eq!(own("192.0.2.99:53"), (0, true, s30));
        assert_eq!(own("[2001:db8:2::7]:124"), (0, true, s30));
        assert_eq!(own("192.0.2.99:125"), (0, false, m5));
        // A rule's own_socket wins over the ports, both ways.
        assert_eq!(own("192.0.2.99:5353"), (1, true, s30));
        assert_eq!(own("203.0.113.9:53"), (2, false, Duration::from_secs(60)));
        // A full cone has a socket per client endpoint already.
        assert!(!own("198.51.100.200:53").1);
        // Either port counts: the original destination's, or the one a
        // redirect sends the flow to; the rule's timeout is for all its
        // flows.
        assert_eq!(own("198.51.100.7:53"), (4, true, Duration::from_secs(10)));
        assert_eq!(own("198.51.100.7:7"), (4, true, Duration::from_secs(10)));
        assert_eq!(own("198.51.100.70:53"), (5, true, Duration::from_secs(10)));
        assert_eq!(own("198.51.100.70:7"), (5, false, Duration::from_secs(10)));
        // A relay timeout shorter than the own-socket default wins.
        let short = rules("[relay]\nidle_timeout = \"5s\"\n");
        assert_eq!(
            short.route(client, sa("192.0.2.99:53")).idle_timeout_for(true),
            Duration::from_secs(5)
        );
        // No ports: no flow has its own socket unless a rule says so.
        let off = rules("[relay]\nown_socket_ports = []\n");
        assert!(!off.route(client, sa("192.0.2.99:53")).own_socket(sa("192.0.2.99:53")));
    }

    #[test]
    fn domain_rules_match_the_names_the_client_resolved() {
        let dns = "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n";
        let r = rules(&format!(
            r#"{dns}
[[relay.rules]]
ports = ["5060"]
action = "drop"
[[relay.rules]]
domains = ["*.game.example", "voip.example"]
action = "interface"
interface = "wg0"
[[relay.rules]]
destinations = ["203.0.113.0/24"]
action = "redirect"
to = "198.51.100.9:9000"
"#
        ));
        assert!(r.has_domain_rules());
        let client = sa("192.0.2.10:5000");
        let dst = sa("203.0.113.80:9999");
        let name = |n: &str| hickory_proto::rr::Name::from_ascii(n).unwrap();
        // Any name of the chain counts, in any letter case.
        let cdn = || vec![name("www.Game.Example."), name("edge.cdn.example.")];
        let rule = r.route_named(client, dst, &cdn);
        assert_eq!(rule.number, 2);
        assert!(rule.by_domain());
        let voip = || vec![name("voip.example.")];
        assert_eq!(r.route_named(client, dst, &voip).number, 2);
        // No matching name, or no DNS history: the next rules decide.
        let other = || vec![name("www.other.example.")];
        assert_eq!(r.route_named(client, dst, &other).number, 3);
        assert_eq!(r.route(client, dst).number, 3);
        // Rules stay in file order: an earlier rule wins without a lookup.
        let never = || -> Vec<hickory_proto::rr::Name> { panic!("names looked up for a rule decided earlier") };
        assert_eq!(r.route_named(client, sa("203.0.113.80:5060"), &never).number, 1);
    }
}
