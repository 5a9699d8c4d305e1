//! Where the DNS engine hands over each answer it gives: into the name
//! map, and into the nftables sets of the rule that answered.
//!
//! The name map has one reader, the relay's domain rules (`domains` /
//! `lists` in `[[relay.rules]]`; `tproxyd explain` and the admin `/names`
//! page show what those rules see). Without such a rule nothing would ever
//! ask the map, so answers are not recorded in it: reading an answer and
//! filing it is a measurable part of a cache miss. A reload that adds the
//! first domain rule starts recording from then on (a flow matches once its
//! client resolves the name again); one that removes the last empties the map.

use hickory_proto::op::Message;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::answer::Resolution;
use super::map::{MapLimits, NameMap};
use crate::config::{Config, DnsConfig};
use crate::nft::{NftError, NftSets, SetPair, Update};
use crate::stats::Stats;

/// Longest an answer is held for its set commit. The feeder answers well
/// before (its own netlink timeout is shorter); this only guarantees that a
/// wedged feeder cannot hold answers forever.
pub const COMMIT_WAIT: Duration = Duration::from_secs(5);

/// Fires when the answer's set elements are committed (or given up on).
pub type Committed = oneshot::Receiver<()>;

/// Waits for `committed`, at most [`COMMIT_WAIT`].
pub async fn released(committed: Committed) {
    let _ = tokio::time::timeout(COMMIT_WAIT, committed).await;
}

/// Whether some relay rule of `config` matches by domain: the name map's
/// only reader.
pub fn wants_names(config: &Config) -> bool {
    config
        .relay
        .rules
        .iter()
        .any(|r| !r.get_ref().domains.is_empty() || !r.get_ref().lists.is_empty())
}

#[derive(Debug)]
pub struct DomainFeed {
    map: Arc<NameMap>,
    /// Whether answers go into `map`: some relay rule matches by domain.
    names_wanted: AtomicBool,
    sets: Option<NftSets>,
    grace: Duration,
    wait: bool,
}

impl DomainFeed {
    /// The map, and the sets when some DNS rule has `nft_set` (which needs
    /// CAP_NET_ADMIN: call before privileges are dropped).
    pub fn new(config: &DnsConfig, stats: Arc<Stats>) -> Result<DomainFeed, NftError> {
        let names = config.nft_sets();
        let sets = if names.is_empty() {
            None
        } else {
            Some(NftSets::start(
                &config.nft.table,
                &names,
                config.nft.max_elements,
                stats,
            )?)
        };
        Ok(DomainFeed {
            map: Arc::new(NameMap::new(MapLimits {
                max_entries: config.names.max_entries,
                max_bytes: config.names.max_bytes,
            })),
            names_wanted: AtomicBool::new(false),
            sets,
            grace: config.names.grace,
            wait: config.nft.wait,
        })
    }

    pub fn map(&self) -> &Arc<NameMap> {
        &self.map
    }

    /// Records answers in the name map only while `config` has a relay
    /// rule that matches by domain (the map's only user); call at start
    /// and on every reload. Turning it off empties the map.
    pub fn follow(&self, config: &Config) {
        let wanted = wants_names(config);
        let was = self.names_wanted.swap(wanted, Ordering::Relaxed);
        if was && !wanted {
            self.map.clear();
            tracing::info!("no relay rule matches by domain any more: name map emptied");
        } else if wanted && !was {
            tracing::debug!("relay rules match by domain: recording answers in the name map");
        }
    }

    /// Whether answers are being recorded in the name map.
    pub fn records_names(&self) -> bool {
        self.names_wanted.load(Ordering::Relaxed)
    }

    /// The names `client` resolved to `dst` through us, for a flow being
    /// routed: the entry then lives at least `grace` longer, so a flow that
    /// outlasts the answer's TTL keeps the rule it was opened with.
    pub fn names_in_use(&self, client: IpAddr, dst: IpAddr) -> Vec<hickory_proto::rr::Name> {
        self.map.lookup_touch(client, dst, Instant::now(), self.grace)
    }

    pub fn sets(&self) -> Option<&NftSets> {
        self.sets.as_ref()
    }

    /// Whether [`DomainFeed::observe`] would look at an answer fed to
    /// `sets`: when it would not, the answer need not exist as a message.
    pub fn watches(&self, sets: &[SetPair]) -> bool {
        self.records_names() || (self.sets.is_some() && !sets.is_empty())
    }

    /// Records that `client` was answered `msg` and feeds `sets`. Returns
    /// what to await before sending the answer, if anything.
    pub fn observe(&self, client: IpAddr, msg: &Message, sets: &[SetPair]) -> Option<Committed> {
        let names = self.records_names();
        let feeder = self.sets.as_ref().filter(|_| !sets.is_empty());
        if !names && feeder.is_none() {
            // Nobody reads this answer: skip even parsing it.
            return None;
        }
        let res = Resolution::of(msg)?;
        let now = Instant::now();
        if names {
            self.map.insert(client, &res, self.grace, now);
        }
        let feeder = feeder?;
        let updates = sets
            .iter()
            .flat_map(|pair| {
                res.addrs.iter().map(|&(ip, ttl)| Update {
                    set: pair.for_ip(ip).clone(),
                    ip,
                    timeout: Duration::from_secs(u64::from(ttl)) + self.grace,
                })
            })
            .collect();
        let committed = feeder.add(updates, now)?;
        self.wait.then_some(committed)
    }

    /// A reloaded config may name new sets.
    pub fn ensure_sets(&self, config: &DnsConfig) {
        let names = config.nft_sets();
        match &self.sets {
            Some(sets) => {
                if let Err(e) = sets.ensure(&names) {
                    tracing::warn!(error = %e, "creating nftables sets of the reloaded config");
                }
            }
            None if !names.is_empty() => {
                tracing::warn!("nft_set added by a reload: restart tproxyd to create the sets");
            }
            None => {}
        }
    }

    /// Stops the set feeder (removing its table if tproxyd created it).
    pub fn shutdown(&self) {
        if let Some(sets) = &self.sets {
            sets.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record, RecordType};
    use std::path::Path;
    use std::str::FromStr;

    const DNS: &str = "[dns]\n[dns.upstreams.default]\nservers = [\"198.51.100.53\"]\n";
    const DOMAIN_RULE: &str = "[[relay.rules]]\ndomains = [\"*.game.example\"]\naction = \"drop\"\n";
    const PLAIN_RULE: &str = "[[relay.rules]]\ndestinations = [\"203.0.113.0/24\"]\naction = \"drop\"\n";

    fn config(extra: &str) -> Config {
        Config::parse(&format!("{DNS}{extra}"), Path::new("t.toml")).expect("valid config")
    }

    fn feed(config: &Config) -> DomainFeed {
        let dns = config.dns().expect("dns section");
        let feed = DomainFeed::new(dns, Arc::new(Stats::default())).expect("no sets: nothing to create");
        feed.follow(config);
        feed
    }

    fn answer() -> Message {
        let qname = Name::from_str("eu.game.example.").unwrap();
        let mut msg = Message::new(7, MessageType::Response, OpCode::Query);
        msg.add_query(Query::query(qname.clone(), RecordType::A));
        msg.add_answer(Record::from_rdata(qname, 60, RData::A(A::new(203, 0, 113, 80))));
        msg
    }

    fn client() -> IpAddr {
        "192.0.2.10".parse().unwrap()
    }

    fn dst() -> IpAddr {
        "203.0.113.80".parse().unwrap()
    }

    #[test]
    fn without_domain_rules_answers_do_not_fill_the_map() {
        for extra in ["", PLAIN_RULE] {
            let c = config(extra);
            assert!(!wants_names(&c));
            let f = feed(&c);
            assert!(f.observe(client(), &answer(), &[]).is_none());
            assert!(f.map().is_empty(), "config {extra:?} filled the map");
            assert!(f.names_in_use(client(), dst()).is_empty());
        }
    }

    #[test]
    fn with_a_domain_rule_answers_fill_the_map() {
        let c = config(&format!("{PLAIN_RULE}{DOMAIN_RULE}"));
        assert!(wants_names(&c));
        let f = feed(&c);
        f.observe(client(), &answer(), &[]);
        assert_eq!(f.map().len(), 1);
        assert_eq!(
            f.names_in_use(client(), dst()),
            vec![Name::from_str("eu.game.example.").unwrap()]
        );
    }

    #[test]
    fn a_reload_turns_recording_on_and_off() {
        let f = feed(&config(""));
        f.observe(client(), &answer(), &[]);
        assert!(f.map().is_empty());
        // A domain rule arrives: answers from now on are recorded.
        f.follow(&config(DOMAIN_RULE));
        f.observe(client(), &answer(), &[]);
        assert_eq!(f.map().len(), 1);
        // The same rules again keep what is known.
        f.follow(&config(DOMAIN_RULE));
        assert_eq!(f.map().len(), 1);
        // The last domain rule goes: the map is emptied and stays empty.
        f.follow(&config(PLAIN_RULE));
        assert!(f.map().is_empty());
        assert_eq!(f.map().bytes(), 0);
        f.observe(client(), &answer(), &[]);
        assert!(f.map().is_empty());
    }
}
