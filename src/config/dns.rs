//! The `[dns]` section: hijacked ports, listen addresses, rules, upstream
//! groups and the cache.

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;
use toml::Spanned;

use super::duration;

/// The DNS engine. Present in the file means enabled.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Datagrams diverted by TPROXY whose original destination port is one
    /// of these are answered by the DNS engine instead of being relayed.
    #[serde(default = "DnsConfig::default_ports")]
    pub ports: Vec<u16>,
    /// Plain DNS server addresses (UDP and TCP), for clients configured to
    /// use the gateway as their resolver.
    #[serde(default)]
    pub listen: Vec<SocketAddr>,
    /// TPROXY TCP listeners for hijacked DNS over TCP (the rules'
    /// `DNS_TCP_PORT`), so a client falling back to TCP is answered too.
    #[serde(default)]
    pub tcp_listen: Vec<SocketAddr>,
    /// The upstream group used when no rule says otherwise.
    #[serde(default = "DnsConfig::default_upstream")]
    pub upstream: Spanned<String>,
    /// Longest a client waits for a forwarded answer before SERVFAIL.
    #[serde(default = "DnsConfig::default_timeout", deserialize_with = "duration::deserialize")]
    pub timeout: Duration,
    /// The UDP payload size tproxyd advertises and answers up to (EDNS);
    /// at most 4096, so one small query can never buy a huge answer.
    #[serde(default = "DnsConfig::default_udp_payload")]
    pub max_udp_payload: Spanned<u16>,
    /// Clients answered, as CIDRs; anyone else gets REFUSED. Applies to
    /// every path: `dns.listen`, hijacked port-53 traffic, TCP. The default
    /// covers loopback and private networks only, so a listener reachable
    /// from the WAN is not an open resolver.
    #[serde(default = "DnsConfig::default_allow")]
    pub allow: Vec<IpNet>,
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    #[serde(default)]
    pub tcp: TcpConfig,
    #[serde(default)]
    pub stale: StaleConfig,
    /// Prefetch: an answer served from the cache at least this many times
    /// is refreshed in the background once 10 % or less of its TTL is
    /// left, so a popular name never makes a client wait. 0 turns it off.
    #[serde(default = "DnsConfig::default_prefetch")]
    pub prefetch: u32,
    #[serde(default)]
    pub cache: CacheConfig,
    /// Whether an answer whose CNAME or DNAME chain leads to a name a
    /// `block` rule names is blocked as that name would be (trackers
    /// hidden behind a first-party alias, "CNAME cloaking").
    #[serde(default = "DnsConfig::default_block_cname_targets")]
    pub block_cname_targets: bool,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamGroupConfig>,
    /// Evaluated in file order; the first match decides.
    #[serde(default)]
    pub rules: Vec<Spanned<DnsRuleConfig>>,
    /// What tproxyd remembers of its answers (for domain relay rules).
    #[serde(default)]
    pub names: super::names::NamesConfig,
    /// Where `nft_set` sets live.
    #[serde(default)]
    pub nft: super::names::NftConfig,
}

impl DnsConfig {
    /// Every set name the rules feed, once each, in first-use order.
    pub fn nft_sets(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for r in &self.rules {
            for n in &r.get_ref().nft_set.0 {
                if !names.contains(n) {
                    names.push(n.clone());
                }
            }
        }
        names
    }
}

impl DnsConfig {
    fn default_ports() -> Vec<u16> {
        vec![53]
    }
    fn default_upstream() -> Spanned<String> {
        Spanned::new(0..0, "default".to_string())
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(3)
    }
    fn default_udp_payload() -> Spanned<u16> {
        Spanned::new(0..0, 1232)
    }
    fn default_prefetch() -> u32 {
        3
    }
    fn default_block_cname_targets() -> bool {
        true
    }
    fn default_allow() -> Vec<IpNet> {
        [
            "127.0.0.0/8",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "::1/128",
            "fc00::/7",
            "fe80::/10",
        ]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
    }
}

/// Largest `max_udp_payload` accepted (the EDNS ceiling common resolvers use).
pub const MAX_UDP_PAYLOAD_LIMIT: u16 = 4096;

/// `dns.rate_limit`: a token bucket per client, as [`crate::dns::clients`]
/// tells them apart (an IPv4 address, an IPv6 device of the LAN, or else
/// an IPv6 /56, since one IPv6 host can use a whole prefix).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained queries per second per client; 0 turns the limit off.
    #[serde(default = "RateLimitConfig::default_qps")]
    pub qps: u32,
    /// Queries a client may send at once after being quiet.
    #[serde(default = "RateLimitConfig::default_burst")]
    pub burst: u32,
    /// What an over-limit query gets.
    #[serde(default)]
    pub action: RateLimitAction,
}

impl RateLimitConfig {
    fn default_qps() -> u32 {
        200
    }
    fn default_burst() -> u32 {
        400
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig {
            qps: Self::default_qps(),
            burst: Self::default_burst(),
            action: RateLimitAction::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateLimitAction {
    /// No answer at all: nothing to reflect towards a spoofed source.
    #[default]
    Drop,
    /// An empty answer with TC=1 (over UDP), sending a real client to TCP,
    /// where its address cannot be spoofed.
    Truncate,
}

/// `dns.stale`: serve-stale (RFC 8767). When no upstream has answered a
/// cache miss within `answer_after`, or every upstream failed, an answer
/// that expired less than `max_age` ago is served with TTL `ttl`, and the
/// upstream query goes on to refresh it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaleConfig {
    #[serde(default = "StaleConfig::default_enabled")]
    pub enabled: bool,
    #[serde(
        default = "StaleConfig::default_answer_after",
        deserialize_with = "duration::deserialize"
    )]
    pub answer_after: Duration,
    #[serde(default = "StaleConfig::default_max_age", deserialize_with = "duration::deserialize")]
    pub max_age: Duration,
    #[serde(default = "StaleConfig::default_ttl", deserialize_with = "duration::deserialize")]
    pub ttl: Duration,
}

impl StaleConfig {
    fn default_enabled() -> bool {
        true
    }
    fn default_answer_after() -> Duration {
        Duration::from_millis(1_800)
    }
    fn default_max_age() -> Duration {
        Duration::from_secs(86_400)
    }
    fn default_ttl() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for StaleConfig {
    fn default() -> Self {
        StaleConfig {
            enabled: Self::default_enabled(),
            answer_after: Self::default_answer_after(),
            max_age: Self::default_max_age(),
            ttl: Self::default_ttl(),
        }
    }
}

/// `dns.tcp`: limits that keep one client from holding every DNS-over-TCP
/// slot (RFC 7766 section 6.2.3 asks servers to protect themselves).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Connections served at once, all clients together.
    #[serde(default = "TcpConfig::default_max_connections")]
    pub max_connections: usize,
    /// Connections one client may hold at once (counted as for the rate
    /// limit).
    #[serde(default = "TcpConfig::default_max_per_client")]
    pub max_per_client: usize,
    /// A connection with no query for this long is closed.
    #[serde(default = "TcpConfig::default_idle", deserialize_with = "duration::deserialize")]
    pub idle_timeout: Duration,
    /// A connection is closed after this long, however busy.
    #[serde(default = "TcpConfig::default_lifetime", deserialize_with = "duration::deserialize")]
    pub max_lifetime: Duration,
    /// ... or after answering this many queries.
    #[serde(default = "TcpConfig::default_max_queries")]
    pub max_queries: u32,
    /// A client that does not read its answer within this long is dropped.
    #[serde(
        default = "TcpConfig::default_write_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub write_timeout: Duration,
}

impl TcpConfig {
    fn default_max_connections() -> usize {
        512
    }
    fn default_max_per_client() -> usize {
        16
    }
    fn default_idle() -> Duration {
        Duration::from_secs(10)
    }
    fn default_lifetime() -> Duration {
        Duration::from_secs(120)
    }
    fn default_max_queries() -> u32 {
        1_000
    }
    fn default_write_timeout() -> Duration {
        Duration::from_secs(5)
    }
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            max_connections: Self::default_max_connections(),
            max_per_client: Self::default_max_per_client(),
            idle_timeout: Self::default_idle(),
            max_lifetime: Self::default_lifetime(),
            max_queries: Self::default_max_queries(),
            write_timeout: Self::default_write_timeout(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Most answers kept (least recently used out first). 0 disables.
    #[serde(default = "CacheConfig::default_capacity")]
    pub capacity: usize,
    /// Most memory the cached records may take (an estimate, in bytes:
    /// `33554432`, or `"32MiB"`, `"512KiB"`). Whichever of this and
    /// `capacity` is reached first evicts. 0 disables the cache.
    #[serde(default = "CacheConfig::default_max_bytes", deserialize_with = "byte_size")]
    pub max_bytes: usize,
    /// Where the cache is saved (at shutdown and every 5 minutes) and
    /// loaded from at start, so a restart does not begin cold. None: not kept.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Answers are kept at least this long (raises tiny upstream TTLs).
    #[serde(default, deserialize_with = "duration::deserialize")]
    pub min_ttl: Duration,
    /// ... and at most this long.
    #[serde(default = "CacheConfig::default_max_ttl", deserialize_with = "duration::deserialize")]
    pub max_ttl: Duration,
    /// Cap on how long NXDOMAIN / no-data answers are kept (RFC 2308).
    #[serde(
        default = "CacheConfig::default_negative_max_ttl",
        deserialize_with = "duration::deserialize"
    )]
    pub negative_max_ttl: Duration,
}

impl CacheConfig {
    fn default_capacity() -> usize {
        10_000
    }
    fn default_max_bytes() -> usize {
        32 << 20
    }
    fn default_max_ttl() -> Duration {
        Duration::from_secs(86_400)
    }
    fn default_negative_max_ttl() -> Duration {
        Duration::from_secs(3_600)
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: Self::default_capacity(),
            max_bytes: Self::default_max_bytes(),
            file: None,
            min_ttl: Duration::ZERO,
            max_ttl: Self::default_max_ttl(),
            negative_max_ttl: Self::default_negative_max_ttl(),
        }
    }
}

/// A named group of upstream servers, tried in order with failover.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamGroupConfig {
    pub servers: Spanned<Vec<UpstreamServer>>,
    /// Name expected in the certificate of `tls://` and `https://` servers.
    #[serde(default)]
    pub tls_name: Option<String>,
    /// Extra trust anchors (PEM) besides the public web roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// How long one server gets before the next one is tried.
    #[serde(
        default = "UpstreamGroupConfig::default_server_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub server_timeout: Duration,
    /// Most client queries waiting on this group at once. Past it a query
    /// is answered SERVFAIL at once: a dead group cannot hold every slot,
    /// and a client is never left without an answer.
    #[serde(default = "UpstreamGroupConfig::default_max_pending")]
    pub max_pending: usize,
    /// DNS 0x20: randomise the case of the query name and believe only an
    /// answer that echoes it exactly (more bits for a spoofer to guess).
    /// Off by default: a few servers do not preserve the case.
    #[serde(default)]
    pub case_randomization: bool,
}

impl UpstreamGroupConfig {
    fn default_server_timeout() -> Duration {
        Duration::from_millis(1_500)
    }
    fn default_max_pending() -> usize {
        1_024
    }
}

/// Transport to an upstream server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    /// UDP, retried over TCP when the answer is truncated.
    Udp,
    Tcp,
    Tls,
    Https,
}

/// `"198.51.100.53"`, `"udp://198.51.100.53:5353"`, `"tcp://[2001:db8::53]"`,
/// `"tls://198.51.100.53"` (port 853), `"https://198.51.100.53/dns-query"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamServer {
    pub protocol: UpstreamProtocol,
    pub addr: SocketAddr,
    /// HTTP path, for `https://`.
    pub path: String,
}

impl UpstreamServer {
    pub fn parse(text: &str) -> Result<UpstreamServer, String> {
        let (protocol, rest) = match text.split_once("://") {
            None => (UpstreamProtocol::Udp, text),
            Some(("udp", r)) => (UpstreamProtocol::Udp, r),
            Some(("tcp", r)) => (UpstreamProtocol::Tcp, r),
            Some(("tls", r)) => (UpstreamProtocol::Tls, r),
            Some(("https", r)) => (UpstreamProtocol::Https, r),
            Some((scheme, _)) => {
                return Err(format!(
                    "unknown upstream scheme {scheme:?} in {text:?}: use udp, tcp, tls or https"
                ));
            }
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) if protocol == UpstreamProtocol::Https => (&rest[..i], rest[i..].to_string()),
            Some(_) => return Err(format!("{text:?}: only https:// upstreams take a path")),
            None if protocol == UpstreamProtocol::Https => (rest, "/dns-query".to_string()),
            None => (rest, String::new()),
        };
        let default_port = match protocol {
            UpstreamProtocol::Udp | UpstreamProtocol::Tcp => 53,
            UpstreamProtocol::Tls => 853,
            UpstreamProtocol::Https => 443,
        };
        let addr = if let Ok(sa) = hostport.parse::<SocketAddr>() {
            sa
        } else if let Ok(ip) = hostport.trim_matches(|c| c == '[' || c == ']').parse::<IpAddr>() {
            SocketAddr::new(ip, default_port)
        } else {
            return Err(format!(
                "upstream {text:?} needs an IP address (tproxyd does not resolve upstream names), \
                 e.g. \"tls://198.51.100.53\" with tls_name = \"dns.example\""
            ));
        };
        Ok(UpstreamServer { protocol, addr, path })
    }

    pub fn needs_tls_name(&self) -> bool {
        matches!(self.protocol, UpstreamProtocol::Tls | UpstreamProtocol::Https)
    }
}

impl<'de> Deserialize<'de> for UpstreamServer {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UpstreamServer::parse(&s).map_err(de::Error::custom)
    }
}

/// One `[[dns.rules]]` entry as written; checked by [`super::Config::parse`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsRuleConfig {
    /// `"printer.lan"` matches that name only; `"*.example.com"` matches
    /// example.com and every name under it.
    #[serde(default)]
    pub domains: Vec<DomainPattern>,
    /// Domain-list files: one name per line, hosts-style `0.0.0.0 name`
    /// lines, or adblock-style `||name^` lines.
    #[serde(default)]
    pub lists: Vec<PathBuf>,
    /// Hosts files (`/etc/hosts` format) answering their names (action
    /// `answer` only).
    #[serde(default)]
    pub hosts: Vec<PathBuf>,
    /// Only for clients in these networks (per-device rules).
    #[serde(default, deserialize_with = "super::cidr::list")]
    pub clients: Vec<IpNet>,
    /// Only for these query types (`"A"`, `"AAAA"`, `"HTTPS"`, ...).
    #[serde(default)]
    pub qtypes: Vec<QueryType>,
    pub action: RuleAction,
    /// `answer`: addresses for A queries.
    #[serde(default)]
    pub a: Vec<Ipv4Addr>,
    /// `answer`: addresses for AAAA queries.
    #[serde(default)]
    pub aaaa: Vec<Ipv6Addr>,
    /// `answer`: an alias; answered as a CNAME record.
    #[serde(default)]
    pub cname: Option<DomainPattern>,
    /// `answer`: TTL of the records (default 5 minutes); `block`: TTL of
    /// the null addresses (default 1 minute).
    #[serde(default, deserialize_with = "optional_duration")]
    pub ttl: Option<Duration>,
    /// `block`: what the answer is.
    #[serde(default)]
    pub block: Option<BlockMode>,
    /// `forward`: the upstream group.
    #[serde(default)]
    pub upstream: Option<String>,
    /// `forward`: `false` never serves these names stale (`dns.stale`).
    #[serde(default)]
    pub stale: Option<bool>,
    /// Sets (`NAME4`/`NAME6` in `[dns.nft] table`) that get every address
    /// this rule answers, for TTL + `[dns.names] grace`.
    #[serde(default)]
    pub nft_set: super::names::SetNames,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleAction {
    Answer,
    Block,
    Forward,
}

/// How a blocked name is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockMode {
    /// NXDOMAIN: "no such name".
    #[default]
    Nxdomain,
    /// NOERROR with no records.
    Nodata,
    /// `0.0.0.0` for A, `::` for AAAA, no data for other types.
    Null,
    /// REFUSED.
    Refused,
}

/// A validated domain pattern: a lowercase name without the trailing dot,
/// and whether it also covers every name below it (`*.` prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainPattern {
    pub name: String,
    pub subdomains: bool,
}

impl DomainPattern {
    pub fn parse(text: &str) -> Result<DomainPattern, String> {
        let (subdomains, rest) = match text.strip_prefix("*.") {
            Some(r) => (true, r),
            None => (false, text),
        };
        let name = crate::dns::names::normalize(rest).ok_or_else(|| format!("{text:?} is not a valid domain name"))?;
        Ok(DomainPattern { name, subdomains })
    }
}

impl<'de> Deserialize<'de> for DomainPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        DomainPattern::parse(&s).map_err(de::Error::custom)
    }
}

/// A DNS record type given by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryType(pub hickory_proto::rr::RecordType);

impl<'de> Deserialize<'de> for QueryType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.to_ascii_uppercase()
            .parse::<hickory_proto::rr::RecordType>()
            .map(QueryType)
            .map_err(|_| de::Error::custom(format!("unknown query type {s:?}")))
    }
}

/// A byte count: an integer, or a string with a `KiB`/`MiB`/`GiB` suffix.
fn byte_size<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    let bytes = match Size::deserialize(d)? {
        Size::Bytes(n) => n,
        Size::Text(t) => {
            let t = t.trim();
            let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
            let scale: u64 = match unit.trim() {
                "" | "B" => 1,
                "KiB" => 1 << 10,
                "MiB" => 1 << 20,
                "GiB" => 1 << 30,
                other => {
                    return Err(de::Error::custom(format!(
                        "unknown size unit {other:?}: use KiB, MiB or GiB"
                    )));
                }
            };
            digits
                .parse::<u64>()
                .ok()
                .and_then(|n| n.checked_mul(scale))
                .ok_or_else(|| de::Error::custom(format!("{t:?} is not a size")))?
        }
    };
    usize::try_from(bytes).map_err(|_| de::Error::custom("size too large"))
}

fn optional_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration::deserialize(d).map(Some)
}

/// Cross-field checks that serde cannot express; each error names the
/// byte range to point at.
pub(super) fn validate(
    dns: &DnsConfig,
    section: std::ops::Range<usize>,
    rule_upstream: impl Fn(usize) -> Option<std::ops::Range<usize>>,
) -> Result<(), (std::ops::Range<usize>, String)> {
    if !dns.upstreams.contains_key(dns.upstream.get_ref()) {
        let needed = dns
            .rules
            .iter()
            .any(|r| r.get_ref().action == RuleAction::Forward && r.get_ref().upstream.is_none())
            || dns.rules.iter().all(|r| !matches_everything(r.get_ref()));
        if needed {
            // Point at `upstream = ...` if written, else at the section.
            let span = Some(dns.upstream.span()).filter(|s| !s.is_empty()).unwrap_or(section);
            return Err((span, no_group(dns.upstream.get_ref())));
        }
    }
    if *dns.max_udp_payload.get_ref() > MAX_UDP_PAYLOAD_LIMIT {
        return Err((
            dns.max_udp_payload.span(),
            format!(
                "max_udp_payload {} is above {MAX_UDP_PAYLOAD_LIMIT}: larger answers over UDP fragment \
                 and let a small spoofed query buy a huge reply",
                dns.max_udp_payload.get_ref()
            ),
        ));
    }
    for (name, group) in &dns.upstreams {
        let servers = group.servers.get_ref();
        if servers.is_empty() {
            return Err((group.servers.span(), format!("upstream group {name:?} has no servers")));
        }
        if group.max_pending == 0 {
            return Err((
                group.servers.span(),
                format!("upstream group {name:?}: max_pending must be at least 1"),
            ));
        }
        if servers.iter().any(UpstreamServer::needs_tls_name) && group.tls_name.is_none() {
            return Err((
                group.servers.span(),
                format!("upstream group {name:?} has tls:// or https:// servers: set tls_name"),
            ));
        }
    }
    for (i, rule) in dns.rules.iter().enumerate() {
        check_rule(rule.get_ref(), dns).map_err(|problem| match problem {
            RuleProblem::Rule(reason) => (rule.span(), reason),
            // Point at the rule's `upstream = ...`, where the typo is.
            RuleProblem::Group(reason) => (rule_upstream(i).unwrap_or(rule.span()), reason),
        })?;
    }
    if !super::names::valid_nft_name(&dns.nft.table) {
        return Err((
            section,
            format!("{:?} is not a valid nftables table name", dns.nft.table),
        ));
    }
    Ok(())
}

/// The same fix wherever a missing group is named.
fn no_group(name: &str) -> String {
    format!("no upstream group {name:?}: add [dns.upstreams.{name}] with servers = [...]")
}

/// What is wrong with one rule: the rule as a whole, or the group it names.
enum RuleProblem {
    Rule(String),
    Group(String),
}

impl From<&str> for RuleProblem {
    fn from(reason: &str) -> Self {
        RuleProblem::Rule(reason.to_string())
    }
}

/// A rule with no name, client or type condition catches every query, so
/// the default group is then never used.
fn matches_everything(r: &DnsRuleConfig) -> bool {
    r.domains.is_empty() && r.lists.is_empty() && r.hosts.is_empty() && r.clients.is_empty() && r.qtypes.is_empty()
}

fn check_rule(r: &DnsRuleConfig, dns: &DnsConfig) -> Result<(), RuleProblem> {
    let answers = !r.a.is_empty() || !r.aaaa.is_empty() || r.cname.is_some();
    if r.stale.is_some() && r.action != RuleAction::Forward {
        return Err("stale applies to forward rules only".into());
    }
    match r.action {
        RuleAction::Answer => {
            if !answers && r.hosts.is_empty() {
                return Err("an answer rule needs a, aaaa, cname or hosts".into());
            }
            if !r.hosts.is_empty() && (answers || !r.domains.is_empty() || !r.lists.is_empty()) {
                return Err("a hosts rule answers the names in its files: drop a/aaaa/cname/domains/lists".into());
            }
            if r.block.is_some() || r.upstream.is_some() {
                return Err("an answer rule takes no block or upstream".into());
            }
        }
        RuleAction::Block => {
            if answers || !r.hosts.is_empty() || r.upstream.is_some() {
                return Err("a block rule takes no a/aaaa/cname/hosts/upstream (see block = ...)".into());
            }
            if !r.nft_set.0.is_empty() {
                return Err("a block rule answers no addresses to put in nft_set".into());
            }
        }
        RuleAction::Forward => {
            if answers || !r.hosts.is_empty() || r.block.is_some() || r.ttl.is_some() {
                return Err("a forward rule takes only upstream".into());
            }
            let group = r.upstream.as_deref().unwrap_or(dns.upstream.get_ref());
            if !dns.upstreams.contains_key(group) {
                return Err(RuleProblem::Group(no_group(group)));
            }
        }
    }
    Ok(())
}
