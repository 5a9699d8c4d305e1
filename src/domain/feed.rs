//! Where the DNS engine hands over each answer it gives: into the name
//! map, and into the nftables sets of the rule that answered.

use hickory_proto::op::Message;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::answer::Resolution;
use super::map::{MapLimits, NameMap};
use crate::config::DnsConfig;
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

#[derive(Debug)]
pub struct DomainFeed {
    map: Arc<NameMap>,
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
            sets,
            grace: config.names.grace,
            wait: config.nft.wait,
        })
    }

    pub fn map(&self) -> &Arc<NameMap> {
        &self.map
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

    /// Records that `client` was answered `msg` and feeds `sets`. Returns
    /// what to await before sending the answer, if anything.
    pub fn observe(&self, client: IpAddr, msg: &Message, sets: &[SetPair]) -> Option<Committed> {
        let res = Resolution::of(msg)?;
        let now = Instant::now();
        self.map.insert(client, &res, self.grace, now);
        let feeder = self.sets.as_ref().filter(|_| !sets.is_empty())?;
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
