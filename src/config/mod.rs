//! The configuration file: one TOML document, read with serde.
//!
//! Unknown keys are errors (a typo must not silently fall back to a
//! default), and every error names `file:line:col`. Values are checked while
//! they are deserialized, by the small types in this module, so the TOML
//! parser can point at the exact value that is wrong.

mod cidr;
pub mod dns;
mod duration;
mod error;
pub mod names;
pub mod ops;
mod spans;
pub mod udp;

pub use dns::DnsConfig;
pub use error::{ConfigError, ConfigWarning, line_col};
pub use udp::{NatMode, UdpRuleConfig};

use serde::Deserialize;
use serde::de::{self, Deserializer};
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Everything tproxyd is told by its config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Log filter (`"info"`, `"tproxyd=debug"`); `RUST_LOG` wins when set.
    #[serde(default)]
    pub log_level: Option<LogFilter>,
    /// `SO_MARK` put on every socket tproxyd sends from. The redirect rules
    /// skip packets carrying it, which is what keeps tproxyd's own traffic
    /// from being captured again.
    #[serde(default = "Mark::default_mark")]
    pub mark: Mark,
    /// The transparent UDP relay.
    #[serde(default)]
    pub relay: RelayConfig,
    /// The DNS engine; absent means diverted DNS is relayed like any UDP.
    #[serde(default, rename = "dns")]
    dns_section: Option<Spanned<DnsConfig>>,
    /// Prometheus metrics on a loopback address; off when absent.
    #[serde(default)]
    pub admin: Option<ops::AdminConfig>,
    /// Install and remove the redirect rules at start and exit.
    #[serde(default)]
    pub auto_rules: Option<Spanned<ops::AutoRulesConfig>>,
    /// After start-up, run as this user, keeping only CAP_NET_ADMIN and
    /// CAP_NET_RAW.
    #[serde(default)]
    pub user: Option<String>,
    /// Write the daemon's process id here (`tproxyd reload` reads it).
    #[serde(default)]
    pub pid_file: Option<PathBuf>,
    /// Worker threads; default: half the CPUs, at least one.
    #[serde(default)]
    pub workers: Option<NonZeroUsize>,
    /// Nice value of the daemon's threads (-20 to 19), set at start while
    /// still privileged; absent, the daemon keeps the value it was started
    /// with (see [`crate::priority`] for what it changes and what not).
    #[serde(default, deserialize_with = "nice")]
    pub nice: Option<crate::priority::Nice>,
    /// What in the file works but is probably not what was meant; the
    /// commands print these, the daemon logs them.
    #[serde(skip)]
    pub warnings: Vec<ConfigWarning>,
}

/// The transparent UDP relay: where it listens and how it keeps flows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// TPROXY listen addresses (the `tproxy to :PORT` of the rules).
    #[serde(default = "RelayConfig::default_listen")]
    pub listen: ListenAddrs,
    /// Most flows held at once; past this the least recently used is evicted.
    #[serde(default = "RelayConfig::default_capacity")]
    pub session_capacity: NonZeroUsize,
    /// A flow with no datagram in either direction for this long is closed.
    /// RFC 4787 REQ-5 asks for at least two minutes by default.
    #[serde(default = "RelayConfig::default_idle", deserialize_with = "positive_duration")]
    pub idle_timeout: Duration,
    /// Most spoofing reply sockets kept open (one per original destination).
    #[serde(default = "RelayConfig::default_reply_sockets")]
    pub reply_sockets: NonZeroUsize,
    /// Receive buffer of each listener socket (the relay's and the UDP
    /// `dns.listen` sockets) and each pooled upstream socket, in bytes: room
    /// for bursts while the relay or the DNS engine is busy (raised past
    /// `net.core.rmem_max` when privileged).
    #[serde(default = "RelayConfig::default_receive_buffer")]
    pub receive_buffer: usize,
    /// Sockets per relay listen address, in one `SO_REUSEPORT` group. The
    /// kernel queues each client socket's datagrams in one member (by a
    /// hash of its address and port), and the listener serves the members
    /// in turn: a flood from one client socket fills its own queue, not
    /// everyone's. They share `receive_buffer` (each gets its share, at
    /// least 256 KiB).
    #[serde(default = "RelayConfig::default_listener_sockets")]
    pub listener_sockets: NonZeroUsize,
    /// NAT behaviour of flows no rule sets it for.
    #[serde(default)]
    pub nat: NatMode,
    /// Destination ports whose symmetric flows each get an upstream socket
    /// of their own, on a port the kernel picks at random, instead of a
    /// shared pool socket. A pool socket's port is learnt by every server
    /// that shares it, and a remote's first flow always takes the pool's
    /// first socket; a DNS query's source port is half of what keeps an
    /// off-path spoofer out (RFC 5452). Either port of a flow counts: the
    /// one the client wrote to and, under a `redirect` rule, the one the
    /// flow is sent to (port 5353 redirected to a resolver's 53 gets one).
    /// A rule's `own_socket` wins over this list. Default `[53]`; `[]`
    /// turns it off.
    #[serde(default = "RelayConfig::default_own_socket_ports")]
    pub own_socket_ports: Vec<udp::PortRange>,
    /// Idle timeout of flows on a socket of their own whose rule sets no
    /// `idle_timeout` (at most `idle_timeout`). Such a flow holds a
    /// descriptor until then: a LAN resolver opens one per query, and a
    /// query is answered or given up within seconds. RFC 4787 REQ-5a lets
    /// a NAT keep shorter timers for well-known ports; Linux conntrack
    /// forgets an unanswered UDP flow after 30 s. Default 30 s.
    #[serde(
        default = "RelayConfig::default_own_socket_idle",
        deserialize_with = "positive_duration"
    )]
    pub own_socket_idle_timeout: Duration,
    /// Most flows one client (an IPv4 address, an IPv6 /64) may hold; at
    /// its quota a client's new flow replaces its own least recently used
    /// one. Default: a quarter of `session_capacity`, so one device can
    /// never take the table from the others.
    #[serde(default)]
    pub max_sessions_per_client: Option<NonZeroUsize>,
    /// New flows per second one client may open (a token bucket holding a
    /// second's worth); 0 means no limit. Default 2,000: far above what a
    /// busy P2P or game client opens, far below a flood.
    #[serde(default = "RelayConfig::default_new_flows")]
    pub new_flows_per_client: u32,
    /// Overload shedding: when a datagram has waited longer than this in
    /// a listener's queue, the datagrams of the client that sent the most
    /// bytes lately are dropped (`drops_total{reason="overload"}`) until
    /// the listener has caught up, so that the other clients' flows are
    /// not held up behind it; only while that client stands out (more
    /// than twice the others' average, and 64 KiB more), never while only
    /// one client is active. In
    /// milliseconds; 0 turns it off. Default 5, as fq_codel's target:
    /// above any wait the relay has when it keeps up, below what a game
    /// or call notices.
    #[serde(default = "RelayConfig::default_shed_after_ms")]
    pub shed_after_ms: u64,
    /// Descriptors the daemon plans for; default nine tenths of the soft
    /// `RLIMIT_NOFILE` (raised to the hard limit at start).
    #[serde(default)]
    pub fd_budget: Option<NonZeroUsize>,
    /// Part of `fd_budget` flows may never use: the admin endpoint, DNS
    /// over TCP and DNS upstreams keep working when flows take the rest.
    #[serde(default = "RelayConfig::default_fd_reserve")]
    pub fd_reserve: usize,
    /// Bytes that may wait, in all, for SOCKS5 flows' tasks (each
    /// datagram's payload plus a small fixed cost); one client (an IPv4
    /// address, an IPv6 /64) may hold a quarter of it. Each flow holds at
    /// most 1 MiB of it, as a send buffer would, but a device with many
    /// flows to a proxy slow to answer would otherwise hold that many MiB.
    /// Default 64 MiB.
    #[serde(default = "RelayConfig::default_socks5_queue_bytes")]
    pub socks5_queue_bytes: usize,
    /// Busy polling, in microseconds: a worker with nothing to do first
    /// checks the relay's sockets for this long before it sleeps, so a
    /// reply or the next request that comes within it is relayed without a
    /// wake-up. Costs up to this much CPU per idle stretch; 0 (the
    /// default) turns it off. Read at start only. See `net::spin`.
    #[serde(default)]
    pub busy_poll_us: u32,
    /// Per-flow routing, first match wins; unmatched flows go direct.
    #[serde(default)]
    pub rules: Vec<Spanned<UdpRuleConfig>>,
}

impl RelayConfig {
    fn default_listen() -> ListenAddrs {
        ListenAddrs(vec![
            SocketAddr::from(([0, 0, 0, 0], 15353)),
            SocketAddr::from(([0u16; 8], 15353)),
        ])
    }
    fn default_capacity() -> NonZeroUsize {
        NonZeroUsize::new(65_536).unwrap_or(NonZeroUsize::MIN)
    }
    fn default_idle() -> Duration {
        Duration::from_secs(120)
    }
    fn default_own_socket_ports() -> Vec<udp::PortRange> {
        vec![udp::PortRange { first: 53, last: 53 }]
    }
    fn default_own_socket_idle() -> Duration {
        Duration::from_secs(30)
    }
    fn default_receive_buffer() -> usize {
        4 << 20
    }
    fn default_listener_sockets() -> NonZeroUsize {
        NonZeroUsize::new(8).unwrap_or(NonZeroUsize::MIN)
    }
    /// The receive buffer of each relay listener socket: its share of
    /// `receive_buffer`, at least 256 KiB.
    pub fn listener_socket_buffer(&self) -> usize {
        (self.receive_buffer / self.listener_sockets.get()).max(256 << 10)
    }
    fn default_new_flows() -> u32 {
        2_000
    }
    fn default_shed_after_ms() -> u64 {
        5
    }
    fn default_fd_reserve() -> usize {
        512
    }
    fn default_socks5_queue_bytes() -> usize {
        64 << 20
    }
    /// The per-client quota in force.
    pub fn client_quota(&self) -> usize {
        self.max_sessions_per_client
            .map_or(self.session_capacity.get() / 4, NonZeroUsize::get)
            .clamp(1, self.session_capacity.get())
    }
    fn default_reply_sockets() -> NonZeroUsize {
        NonZeroUsize::new(1_024).unwrap_or(NonZeroUsize::MIN)
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            listen: Self::default_listen(),
            session_capacity: Self::default_capacity(),
            idle_timeout: Self::default_idle(),
            reply_sockets: Self::default_reply_sockets(),
            receive_buffer: Self::default_receive_buffer(),
            listener_sockets: Self::default_listener_sockets(),
            nat: NatMode::default(),
            own_socket_ports: Self::default_own_socket_ports(),
            own_socket_idle_timeout: Self::default_own_socket_idle(),
            max_sessions_per_client: None,
            new_flows_per_client: Self::default_new_flows(),
            shed_after_ms: Self::default_shed_after_ms(),
            fd_budget: None,
            fd_reserve: Self::default_fd_reserve(),
            socks5_queue_bytes: Self::default_socks5_queue_bytes(),
            busy_poll_us: 0,
            rules: Vec::new(),
        }
    }
}

impl Config {
    /// The DNS engine's settings, if the file has a `[dns]` section.
    pub fn dns(&self) -> Option<&DnsConfig> {
        self.dns_section.as_ref().map(Spanned::get_ref)
    }

    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::parse(&text, path)?;
        // Files named in the config: a clear error at the line naming the
        // file, before anything tries to load it.
        if let Some((span, reason)) = spans::Spans::read(&text).unreadable_file() {
            return Err(ConfigError::at(path, &text, Some(span), reason));
        }
        Ok(config)
    }

    /// Validates `text`; `path` is only used to name the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut config = toml::from_str::<Config>(text)
            .map_err(|e| ConfigError::at(path, text, e.span(), e.message().trim_end()))?;
        let spans = spans::Spans::read(text);
        udp::validate(&config.relay.rules, config.relay.nat, &config.relay.listen.0)
            .map_err(|(span, reason)| ConfigError::at(path, text, Some(span), reason))?;
        if let Some(auto) = &config.auto_rules {
            ops::validate_auto_rules(auto.get_ref(), config.mark.0, &config.relay.listen.0)
                .map_err(|reason| ConfigError::at(path, text, Some(auto.span()), reason))?;
        }
        if let Some(dns) = &config.dns_section {
            dns::validate(dns.get_ref(), dns.span(), |i| spans.dns_rule_upstream(i))
                .map_err(|(span, reason)| ConfigError::at(path, text, Some(span), reason))?;
            if let Some(auto) = &config.auto_rules {
                let sets = &dns.get_ref().nft.table;
                if !dns.get_ref().nft_sets().is_empty() && *sets == auto.get_ref().nft_table {
                    return Err(ConfigError::at(
                        path,
                        text,
                        Some(dns.span()),
                        format!(
                            "[dns.nft] table {sets:?} is auto_rules' table, which is replaced whole at every start: \
                             give the sets a table of their own"
                        ),
                    ));
                }
            }
        }
        udp::load_names(&mut config.relay.rules, config.dns_section.is_some())
            .map_err(|(span, reason)| ConfigError::at(path, text, Some(span), reason))?;
        let mut warnings = spans.cidr_warnings();
        warnings.sort_by_key(|(span, _)| span.start);
        config.warnings = warnings
            .into_iter()
            .map(|(span, reason)| ConfigWarning::at(path, text, span, reason))
            .collect();
        Ok(config)
    }
}

/// A non-zero firewall mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark(pub u32);

impl Mark {
    fn default_mark() -> Mark {
        Mark(0xff)
    }
}

impl<'de> Deserialize<'de> for Mark {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        if v == 0 {
            return Err(de::Error::custom(
                "mark must not be 0: unmarked sockets would be captured by the redirect rules again",
            ));
        }
        Ok(Mark(v))
    }
}

fn nice<'de, D: Deserializer<'de>>(d: D) -> Result<Option<crate::priority::Nice>, D::Error> {
    let v = i64::deserialize(d)?;
    crate::priority::Nice::new(v).map(Some).map_err(de::Error::custom)
}

/// A validated `tracing` filter directive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFilter(pub String);

impl<'de> Deserialize<'de> for LogFilter {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        tracing_subscriber::EnvFilter::builder()
            .parse(&s)
            .map_err(|e| de::Error::custom(format!("invalid log_level {s:?}: {e}")))?;
        Ok(LogFilter(s))
    }
}

/// A non-empty list of distinct listen addresses with non-zero ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddrs(pub Vec<SocketAddr>);

impl<'de> Deserialize<'de> for ListenAddrs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let addrs = Vec::<SocketAddr>::deserialize(d)?;
        if addrs.is_empty() {
            return Err(de::Error::custom("listen needs at least one address"));
        }
        for (i, a) in addrs.iter().enumerate() {
            if a.port() == 0 {
                return Err(de::Error::custom(format!("listen address {a} has port 0")));
            }
            if addrs[..i].contains(a) {
                return Err(de::Error::custom(format!("listen address {a} is listed twice")));
            }
        }
        Ok(ListenAddrs(addrs))
    }
}

fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v = duration::deserialize(d)?;
    if v.is_zero() {
        return Err(de::Error::custom("duration must be greater than zero"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests;
