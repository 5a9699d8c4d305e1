//! DNS rules: which names, clients and query types get which answer.
//!
//! Rules are checked in file order and the first that matches decides.
//! Each rule's names live in a [`DomainSet`], so a rule made from a
//! million-line list costs the same few hash probes as a one-name rule.

use hickory_proto::rr::RecordType;
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::lists::{HostsTable, ListError, load_domain_list};
use super::names::DomainSet;
use super::rendered::Rendered;
use super::ttl_secs;
use crate::config::dns::{BlockMode, DnsConfig, DnsRuleConfig, RuleAction};
use crate::nft::SetPair;

/// What a matching rule does.
#[derive(Debug)]
pub enum Action {
    /// Answer with these records (the LAN override).
    Answer(StaticAnswer),
    /// Answer names from hosts files.
    Hosts(HostsTable, u32),
    /// Refuse to resolve, answering as configured.
    Block(BlockMode, u32),
    /// Resolve through upstream group number `.0` (see [`super::engine`]).
    Forward(usize),
}

impl Action {
    /// A short label for logs and `explain`.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Answer(_) | Action::Hosts(..) => "answer",
            Action::Block(..) => "block",
            Action::Forward(_) => "forward",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticAnswer {
    pub a: Vec<Ipv4Addr>,
    pub aaaa: Vec<Ipv6Addr>,
    pub cname: Option<String>,
    pub ttl: u32,
}

/// Which names a rule covers.
#[derive(Debug)]
enum Names {
    Any,
    Set(DomainSet),
    /// The names of the rule's hosts files.
    Hosts,
}

#[derive(Debug)]
pub struct Rule {
    /// Position in the config, from 1, for logs and `explain`.
    pub number: usize,
    names: Names,
    clients: Vec<IpNet>,
    qtypes: Vec<RecordType>,
    pub action: Action,
    /// nftables sets fed with the addresses this rule answers.
    pub nft_sets: Vec<SetPair>,
    /// Whether its names may be answered stale (`stale = false` opts out).
    pub serve_stale: bool,
    /// The last encoding of its answer (overrides), served again to the
    /// same question.
    pub rendered: Rendered,
}

impl Rule {
    fn matches(&self, client: IpAddr, name: &str, qtype: RecordType) -> bool {
        let client = canonical(client);
        (self.clients.is_empty() || self.clients.iter().any(|net| net.contains(&client)))
            && (self.qtypes.is_empty() || self.qtypes.contains(&qtype))
            && match &self.names {
                Names::Any => true,
                Names::Set(set) => set.matches(name),
                Names::Hosts => {
                    matches!(&self.action, Action::Hosts(t, _) if t.get(name).is_some())
                }
            }
    }

    /// Number of names the rule lists (0 for "any name").
    pub fn name_count(&self) -> usize {
        match (&self.names, &self.action) {
            (Names::Set(s), _) => s.len(),
            (Names::Hosts, Action::Hosts(t, _)) => t.len(),
            _ => 0,
        }
    }
}

/// An IPv4-mapped IPv6 client is matched as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The rules, in order.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
}

const DEFAULT_ANSWER_TTL: Duration = Duration::from_secs(300);
const DEFAULT_BLOCK_TTL: Duration = Duration::from_secs(60);

impl RuleSet {
    /// Builds the rules of `config`, loading their list and hosts files.
    /// `group_index` maps an upstream group name to its number.
    pub fn build(config: &DnsConfig, group_index: impl Fn(&str) -> Option<usize>) -> Result<RuleSet, ListError> {
        let mut rules = Vec::with_capacity(config.rules.len());
        for (i, spanned) in config.rules.iter().enumerate() {
            let r: &DnsRuleConfig = spanned.get_ref();
            let action = match r.action {
                RuleAction::Answer if !r.hosts.is_empty() => {
                    let mut table = HostsTable::default();
                    for path in &r.hosts {
                        let stats = table.load(path)?;
                        tracing::info!(rule = i + 1, file = %path.display(), names = stats.names, skipped = stats.skipped, "hosts file loaded");
                    }
                    Action::Hosts(table, ttl_secs(r.ttl.unwrap_or(DEFAULT_ANSWER_TTL)))
                }
                RuleAction::Answer => Action::Answer(StaticAnswer {
                    a: r.a.clone(),
                    aaaa: r.aaaa.clone(),
                    cname: r.cname.as_ref().map(|c| c.name.clone()),
                    ttl: ttl_secs(r.ttl.unwrap_or(DEFAULT_ANSWER_TTL)),
                }),
                RuleAction::Block => Action::Block(
                    r.block.unwrap_or_default(),
                    ttl_secs(r.ttl.unwrap_or(DEFAULT_BLOCK_TTL)),
                ),
                RuleAction::Forward => {
                    let name = r.upstream.as_deref().unwrap_or(config.upstream.get_ref());
                    // Config validation guarantees the group exists.
                    Action::Forward(group_index(name).unwrap_or(0))
                }
            };
            let names = if !r.hosts.is_empty() {
                Names::Hosts
            } else if r.domains.is_empty() && r.lists.is_empty() {
                Names::Any
            } else {
                let mut set = DomainSet::new();
                for d in &r.domains {
                    set.insert(&d.name, d.subdomains);
                }
                for path in &r.lists {
                    let started = std::time::Instant::now();
                    let stats = load_domain_list(path, &mut set)?;
                    tracing::info!(
                        rule = i + 1,
                        file = %path.display(),
                        names = stats.names,
                        skipped = stats.skipped,
                        ms = started.elapsed().as_millis() as u64,
                        "domain list loaded"
                    );
                }
                set.shrink_to_fit();
                Names::Set(set)
            };
            rules.push(Rule {
                number: i + 1,
                names,
                clients: r.clients.clone(),
                qtypes: r.qtypes.iter().map(|q| q.0).collect(),
                action,
                nft_sets: r.nft_set.0.iter().map(|n| SetPair::new(n)).collect(),
                serve_stale: r.stale.unwrap_or(true),
                rendered: Rendered::default(),
            });
        }
        Ok(RuleSet { rules })
    }

    /// The first rule matching a query for `name` (a query key) of type
    /// `qtype` from `client`.
    pub fn first_match(&self, client: IpAddr, name: &str, qtype: RecordType) -> Option<&Rule> {
        self.rules.iter().find(|r| r.matches(client, name, qtype))
    }

    /// The block a CNAME or DNAME target `name` (a query key) gets in an
    /// answer to `client`'s query of type `qtype`: that of the first rule
    /// *naming* it (in `domains`, `lists` or `hosts`), when that rule
    /// blocks. Rules without names are passed over: a catch-all block
    /// below the rules that allow some names (an allow-list setup) would
    /// otherwise block every alias those names have. Any other action of
    /// the first rule naming the target (an override, a forward) leaves
    /// the answer alone, as it would decide a query for the target itself:
    /// so a rule above the block list naming a target is an exception.
    pub fn target_block(&self, client: IpAddr, name: &str, qtype: RecordType) -> Option<&Rule> {
        self.rules
            .iter()
            .filter(|r| !matches!(r.names, Names::Any))
            .find(|r| r.matches(client, name, qtype))
            .filter(|r| matches!(r.action, Action::Block(..)))
    }

    /// Whether what [`RuleSet::target_block`] says can differ from one
    /// client to another: some rule naming names has `clients`.
    pub fn targets_depend_on_client(&self) -> bool {
        self.rules
            .iter()
            .any(|r| !matches!(r.names, Names::Any) && !r.clients.is_empty())
    }

    /// Whether any rule naming names blocks: without one, no alias target
    /// can be blocked and answers are not looked at.
    pub fn blocks_names(&self) -> bool {
        self.rules
            .iter()
            .any(|r| !matches!(r.names, Names::Any) && matches!(r.action, Action::Block(..)))
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn rules(toml: &str) -> RuleSet {
        let text = format!(
            "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n[dns.upstreams.office]\nservers = [\"198.51.100.54\"]\n{toml}"
        );
        let config = Config::parse(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        let dns = config.dns().unwrap().clone();
        RuleSet::build(&dns, |n| dns.upstreams.keys().position(|k| k == n)).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn first_match_wins_in_file_order() {
        let r = rules(
            r#"
[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["192.0.2.50"]
[[dns.rules]]
domains = ["*.lan"]
action = "block"
"#,
        );
        let m = r.first_match(ip("192.0.2.10"), "printer.lan", RecordType::A).unwrap();
        assert_eq!(m.number, 1);
        assert!(matches!(&m.action, Action::Answer(a) if a.a == [Ipv4Addr::new(192, 0, 2, 50)] && a.ttl == 300));
        assert_eq!(
            r.first_match(ip("192.0.2.10"), "nas.lan", RecordType::A)
                .unwrap()
                .number,
            2
        );
        assert_eq!(r.first_match(ip("192.0.2.10"), "lan", RecordType::A).unwrap().number, 2);
        assert!(r.first_match(ip("192.0.2.10"), "example.com", RecordType::A).is_none());
    }

    #[test]
    fn clients_and_qtypes_narrow_a_rule() {
        let r = rules(
            r#"
[[dns.rules]]
clients = ["192.0.2.64/26", "2001:db8:1::/64"]
domains = ["*.games.example"]
action = "block"
block = "refused"
[[dns.rules]]
qtypes = ["aaaa"]
action = "block"
block = "nodata"
[[dns.rules]]
domains = ["*.corp.example"]
action = "forward"
upstream = "office"
"#,
        );
        let kid = ip("192.0.2.70");
        let parent = ip("192.0.2.10");
        assert_eq!(r.first_match(kid, "x.games.example", RecordType::A).unwrap().number, 1);
        assert_eq!(
            r.first_match(ip("::ffff:192.0.2.70"), "games.example", RecordType::A)
                .unwrap()
                .number,
            1
        );
        assert_eq!(
            r.first_match(ip("2001:db8:1::9"), "games.example", RecordType::A)
                .unwrap()
                .number,
            1
        );
        assert!(r.first_match(parent, "x.games.example", RecordType::A).is_none());
        assert_eq!(
            r.first_match(parent, "x.games.example", RecordType::AAAA)
                .unwrap()
                .number,
            2
        );
        let fwd = r.first_match(parent, "wiki.corp.example", RecordType::A).unwrap();
        assert!(matches!(fwd.action, Action::Forward(1)));
    }
}
