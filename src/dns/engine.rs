//! The DNS engine: query → rules → cache → upstream.
//!
//! Answering is split in two so the hot path never waits: [`DnsEngine::answer_now`]
//! handles everything that needs no network (overrides, blocks, hosts
//! files, cache hits, malformed input) synchronously, inline in the
//! listener that received the query; only a cache miss becomes an
//! [`Outcome::Forward`], which the caller awaits (a UDP listener in its
//! set of waiting misses, [`super::misses`]).

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Deref;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use super::aliases;
use super::cache::{CacheKey, DnsCache, Entry, Lookup, PACKED_ON_STACK, Records, StackKey};
use super::clients::{ClientKey, Clients};
use super::lists::ListError;
use super::message::{self, Rejection, Request};
use super::names::{query_key, wire_key};
use super::plain_answer::{self, PlainAnswer, ReplyTo};
use super::plain_name::Forms;
use super::ratelimit::RateLimiter;
use super::rendered::{Asked, Rendered, Reused, Shape, wire_labels};
use super::rules::{Action, RuleSet, StaticAnswer};
use super::scrub;
use super::shares::{self, ClientShares, Share};
use super::ttl_secs;
use super::upstream::{Admission, Answer, UpstreamError, UpstreamGroup};
use super::wire;
use crate::config::dns::{BlockMode, DnsConfig, RateLimitAction, TcpConfig};
use crate::domain::DomainFeed;
use crate::domain::feed::{Committed, released};
use crate::nft::SetPair;
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum DnsBuildError {
    #[error(transparent)]
    List(#[from] ListError),
    #[error("upstream group {group:?}: {source}")]
    Upstream {
        group: String,
        #[source]
        source: UpstreamError,
    },
}

/// How the query arrived: UDP answers must fit the client's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// What to do with a query after the synchronous part.
#[derive(Debug)]
pub enum Outcome {
    /// Send these bytes back.
    Reply(Vec<u8>),
    /// Send nothing (not a query, or too short to answer).
    Drop,
    /// Needs an upstream: pass to [`DnsEngine::forward`].
    Forward(Pending),
    /// Send these bytes once the answer's nftables set elements are
    /// committed (`[dns.nft] wait`): see [`released`].
    Held(Vec<u8>, Committed),
    /// Send these bytes (a cache hit) now, then refresh the entry by
    /// forwarding this query with nobody waiting (prefetch).
    Prefetch(Vec<u8>, Pending),
}

/// A query waiting for an upstream answer. It holds a place in its
/// group's pending limit until it is dropped.
#[derive(Debug)]
pub struct Pending {
    request: Request,
    group: usize,
    /// The cache key the miss was looked up under: the answer is stored
    /// under it and the group's single-flight map reuses its name, so the
    /// wire-format name is built once per miss rather than three times.
    key: CacheKey,
    transport: Transport,
    client: IpAddr,
    /// The matching rule's sets, fed with the answer.
    sets: Vec<SetPair>,
    /// The client's place among its pending queries to the group; its
    /// client key is the answer's cache owner.
    share: Share,
    /// Whether an expired answer may be served: `dns.stale` is on, the rule
    /// does not opt out, and the cache held one when the query missed.
    serve_stale: bool,
    _admission: Admission,
}

impl Pending {
    /// A query holding `place`, with no stale answer allowed (a miss that
    /// may serve one says so itself).
    fn new(
        request: Request,
        group: usize,
        key: CacheKey,
        transport: Transport,
        client: IpAddr,
        rule: Option<&super::rules::Rule>,
        place: Place,
    ) -> Self {
        Pending {
            request,
            group,
            key,
            transport,
            client,
            sets: rule.map(|r| r.nft_sets.clone()).unwrap_or_default(),
            share: place.share,
            serve_stale: false,
            _admission: place.admission,
        }
    }

    /// The upstream group (index into [`DnsEngine::groups`]) it goes to.
    pub fn group(&self) -> usize {
        self.group
    }
}

/// What a query must hold while it waits upstream: a place in its group's
/// pending limit and one of its client's share of them.
struct Place {
    admission: Admission,
    share: Share,
}

/// Why a query found no [`Place`]: each is answered and counted apart.
enum NoPlace {
    /// The group is at its pending limit.
    Group,
    /// The client holds its whole share of the group's places.
    ClientShare,
}

/// What the plain path found out about a query it could not answer from
/// the cache (see [`DnsEngine::answer_kept`]).
struct Missed<'e> {
    request: Request,
    rule: Option<&'e super::rules::Rule>,
    group: usize,
    key: CacheKey,
    /// The cache holds an expired answer for serve-stale.
    stale_kept: bool,
}

/// A miss on its way upstream, as [`DnsEngine::forward_with`] asks it.
struct ToUpstream<'p> {
    request: &'p Request,
    key: &'p CacheKey,
    group: usize,
    deadline: tokio::time::Instant,
    transport: Transport,
    client: IpAddr,
    sets: &'p [SetPair],
}

/// What [`DnsEngine::plain_reply`] made of a plain upstream answer.
struct PlainReply {
    reply: Vec<u8>,
    records: Records,
    /// How long it may be cached, if at all.
    lifetime: Option<u32>,
}

/// When and how expired answers are served (RFC 8767).
#[derive(Debug, Clone, Copy)]
struct StaleAnswers {
    answer_after: Duration,
    ttl: u32,
}

/// Seconds the cache keeps expired answers for serve-stale.
fn stale_window(config: &DnsConfig) -> u32 {
    if config.stale.enabled {
        ttl_secs(config.stale.max_age)
    } else {
        0
    }
}

/// Numbers engines' rules for [`DnsEngine::alias_generation`], from 1.
static RULES_GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

#[derive(Debug)]
pub struct DnsEngine {
    /// Original destination ports whose datagrams this engine answers.
    ports: Vec<u16>,
    rules: RuleSet,
    groups: Vec<UpstreamGroup>,
    /// The most queries one client may have waiting on each group.
    per_client_pending: Vec<usize>,
    shares: ClientShares,
    /// Group names, as cache keys use them (numbers change across reloads).
    group_names: Vec<Arc<str>>,
    default_group: Option<usize>,
    /// Shared with the next engine when a reload keeps the cache settings.
    cache: Arc<DnsCache>,
    /// Serve-stale (`dns.stale`), when on.
    stale: Option<StaleAnswers>,
    /// Hits after which an entry near expiry is refreshed (0: never).
    prefetch: u32,
    /// Whether answers are blocked by their CNAME and DNAME targets
    /// (`dns.block_cname_targets`, and some rule naming names blocks).
    block_cname_targets: bool,
    /// This engine's rules, as cache entries remember them (see
    /// [`super::cache::Entry::clear_under`]): unique to each engine, so a
    /// reload's new rules check every cached chain again. 0 when what the
    /// rules say of a target depends on the client, and nothing is
    /// remembered.
    alias_generation: u64,
    timeout: Duration,
    max_udp_payload: u16,
    allow: Vec<IpNet>,
    /// Who each client is, for its limits: the rate limit, the shares of
    /// the cache and of upstream places, DNS-over-TCP connections.
    clients: Clients,
    limiter: RateLimiter,
    over_limit: RateLimitAction,
    tcp: TcpConfig,
    stats: Arc<Stats>,
    /// Where answers are recorded (name map, nftables sets); shared by
    /// the engines that replace each other on reload.
    feed: Option<Arc<DomainFeed>>,
    /// Whether kept encodings are served (off only in the test that
    /// checks them against the full path).
    reuse_encoded: bool,
    /// Whether plain upstream answers are answered on the wire (off only
    /// in the test that checks them against the full path).
    plain_answers: bool,
    /// Replies made by [`DnsEngine::plain_reply`] (for the tests).
    #[cfg(test)]
    plain_replies: std::sync::atomic::AtomicUsize,
}

impl DnsEngine {
    /// Builds the engine, loading every list and hosts file.
    pub fn build(config: &DnsConfig, mark: u32, stats: Arc<Stats>) -> Result<DnsEngine, DnsBuildError> {
        let mut groups = Vec::with_capacity(config.upstreams.len());
        let mut per_client_pending = Vec::with_capacity(config.upstreams.len());
        for (name, group) in &config.upstreams {
            per_client_pending.push(shares::per_client(group.max_pending.max(1)));
            groups.push(UpstreamGroup::new(name, group, mark, stats.clone()).map_err(|source| {
                DnsBuildError::Upstream {
                    group: name.clone(),
                    source,
                }
            })?);
        }
        let index = |name: &str| groups.iter().position(|g| g.name == name);
        let rules = RuleSet::build(config, index)?;
        // Read before `rules` moves into the engine.
        let blocks_names = rules.blocks_names();
        let alias_generation = if rules.targets_depend_on_client() {
            0
        } else {
            RULES_GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        };
        let default_group = index(config.upstream.get_ref());
        let group_names = groups.iter().map(|g| Arc::from(g.name.as_str())).collect();
        Ok(DnsEngine {
            ports: config.ports.clone(),
            rules,
            groups,
            per_client_pending,
            shares: ClientShares::default(),
            group_names,
            default_group,
            cache: Arc::new(DnsCache::with_stale_window(&config.cache, stale_window(config))),
            prefetch: config.prefetch,
            block_cname_targets: config.block_cname_targets && blocks_names,
            alias_generation,
            stale: config.stale.enabled.then(|| StaleAnswers {
                answer_after: config.stale.answer_after,
                ttl: ttl_secs(config.stale.ttl),
            }),
            timeout: config.timeout,
            max_udp_payload: *config.max_udp_payload.get_ref(),
            allow: config.allow.clone(),
            clients: Clients::default(),
            limiter: RateLimiter::new(&config.rate_limit),
            over_limit: config.rate_limit.action,
            tcp: config.tcp.clone(),
            stats,
            feed: None,
            reuse_encoded: true,
            plain_answers: true,
            #[cfg(test)]
            plain_replies: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Takes over `previous`'s cache if it was built with the same cache
    /// settings, so a reload does not empty it. Returns whether it did.
    pub fn adopt_cache(&mut self, previous: &DnsEngine) -> bool {
        if previous
            .cache
            .same_settings(self.cache.config(), self.cache.stale_window())
        {
            self.cache = previous.cache.clone();
            true
        } else {
            false
        }
    }

    /// Loads `dns.cache.file`, if set, into the cache. A missing file is
    /// an empty cache; an unreadable or corrupt one a warning (what was
    /// read before the damage is kept), never a failure to start.
    pub fn load_cache_file(&self) {
        let Some(path) = &self.cache.config().file else {
            return;
        };
        match super::cache_file::load(&self.cache, path) {
            Ok(n) => {
                self.stats.dns_cache_file_loaded.add(n as u64);
                tracing::info!(file = %path.display(), entries = n, "DNS cache loaded");
            }
            Err(e) => {
                self.stats.dns_cache_file_errors.inc();
                tracing::warn!(file = %path.display(), error = %e, kept = self.cache.len(), "DNS cache file ignored");
            }
        }
    }

    /// Writes the cache to `dns.cache.file`, if set (atomically).
    pub fn save_cache_file(&self) {
        let Some(path) = &self.cache.config().file else {
            return;
        };
        match super::cache_file::save(&self.cache, path) {
            Ok(n) => {
                self.stats.dns_cache_file_saved.add(n as u64);
                tracing::debug!(file = %path.display(), entries = n, "DNS cache saved");
            }
            Err(e) => {
                self.stats.dns_cache_file_errors.inc();
                tracing::warn!(file = %path.display(), error = %e, "DNS cache not saved");
            }
        }
    }

    /// Estimated memory held by cached answers, in bytes.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// The DNS-over-TCP limits in force.
    pub fn tcp_limits(&self) -> &TcpConfig {
        &self.tcp
    }

    /// The key `client`'s limits count it by ([`super::clients`]).
    pub fn client_key(&self, client: IpAddr) -> ClientKey {
        self.clients.key(client)
    }

    /// Whether `client` may use this resolver (`dns.allow`).
    pub fn allows(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.allow.iter().any(|net| net.contains(&client))
    }

    /// Records every answer given from now on in `feed`.
    pub fn set_feed(&mut self, feed: Arc<DomainFeed>) {
        self.feed = Some(feed);
    }

    pub fn feed(&self) -> Option<&Arc<DomainFeed>> {
        self.feed.as_ref()
    }

    /// Whether diverted datagrams to original port `port` are DNS for us.
    pub fn hijacks(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Answers held in the cache.
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    pub fn groups(&self) -> &[UpstreamGroup] {
        &self.groups
    }

    /// Everything that can be answered without the network.
    pub fn answer_now(&self, bytes: &[u8], client: IpAddr, transport: Transport) -> Outcome {
        self.answer_now_reusing(bytes, client, transport, &mut Vec::new())
    }

    /// [`DnsEngine::answer_now`], serving a kept encoding (a cache hit or
    /// an override of a plain query) in `spare`, which the caller hands
    /// back once the answer is sent: the buffer's allocation and its free
    /// were about 150 of a cache hit's 2,400 instructions (callgrind).
    /// `spare` is taken only for such an answer.
    pub fn answer_now_reusing(
        &self,
        bytes: &[u8],
        client: IpAddr,
        transport: Transport,
        spare: &mut Vec<u8>,
    ) -> Outcome {
        let s = &self.stats;
        s.dns_queries.inc();
        // Only UDP spends tokens. Over TCP the client has proven its
        // address (a spoofer cannot complete a handshake) and `dns.tcp`
        // bounds what it can hold; and TCP is where `action = "truncate"`
        // sends a limited client, so it must be answered there even while
        // its UDP bucket is empty (possibly emptied by someone spoofing it).
        //
        // The key the limit counts the client by is worked out once, and a
        // miss takes its place under the same key: for an IPv6 client each
        // working out is a lock of the neighbour reading.
        let counted = (transport == Transport::Udp && self.limiter.is_on()).then(|| self.clients.key(client));
        let limited = counted.is_some_and(|k| !self.limiter.allow(k));
        if limited && self.over_limit == RateLimitAction::Drop {
            s.dns_rate_limited.inc();
            return Outcome::Drop;
        }
        let mut missed = None;
        if !limited && let Some(outcome) = self.answer_kept(bytes, client, transport, &mut missed, spare) {
            return outcome;
        }
        let allowed = self.allows(client);
        if let Some(m) = missed {
            // The plain path read the query, matched its rule and missed
            // the cache: nothing is left to do but forward it.
            if let Some(rule) = m.rule {
                tracing::debug!(%client, name = %m.request.query.name(), qtype = ?m.request.query.query_type(), rule = rule.number, action = rule.action.kind(), "DNS rule matched");
            }
            return self.miss(
                m.request,
                m.group,
                m.key,
                m.stale_kept,
                transport,
                client,
                counted,
                m.rule,
            );
        }
        let request = match message::parse_request(bytes) {
            Ok(r) => r,
            Err(Rejection::Drop(why)) => {
                s.dns_dropped_malformed.inc();
                tracing::debug!(%client, why, "DNS datagram dropped");
                return Outcome::Drop;
            }
            Err(Rejection::Respond(_)) if limited || !allowed => {
                // Strangers and floods get no error answers to reflect.
                s.dns_dropped_malformed.inc();
                return Outcome::Drop;
            }
            Err(Rejection::Respond(mut msg)) => {
                match msg.metadata.response_code {
                    ResponseCode::NotImp => s.dns_notimp.inc(),
                    ResponseCode::BADVERS => s.dns_badvers.inc(),
                    _ => s.dns_formerr.inc(),
                }
                // BADVERS carries our OPT: it says what we take, as every
                // other answer's does (RFC 6891 6.1.3, 7).
                if let Some(edns) = msg.edns.as_mut() {
                    edns.set_max_payload(self.max_udp_payload.max(message::CLASSIC_UDP_PAYLOAD as u16));
                }
                return self.reply(&msg, transport, message::CLASSIC_UDP_PAYLOAD);
            }
        };
        if limited {
            // Over the limit, with `action = "truncate"`: an empty TC=1
            // answer no bigger than the query sends a real client to TCP.
            s.dns_rate_limited.inc();
            let mut msg = message::response(&request, ResponseCode::NoError, self.max_udp_payload);
            msg.metadata.truncation = true;
            return self.reply(&msg, transport, message::CLASSIC_UDP_PAYLOAD);
        }
        if !allowed {
            s.dns_refused_acl.inc();
            tracing::debug!(%client, "DNS query from a client outside dns.allow refused");
            let msg = message::response(&request, ResponseCode::Refused, self.max_udp_payload);
            return self.reply_to(&request, &msg, transport);
        }
        let qtype = request.query.query_type();
        if let Some(rcode) = refused_locally(request.query.query_class(), qtype) {
            // Zone transfers and CHAOS queries (version.bind, id.server)
            // describe servers, not names: never forwarded.
            s.dns_refused_local.inc();
            let msg = message::response(&request, rcode, self.max_udp_payload);
            return self.reply_to(&request, &msg, transport);
        }
        let name_key = query_key(request.query.name());
        let rule = self.rules.first_match(client, &name_key, qtype);
        if let Some(rule) = rule {
            tracing::debug!(%client, name = %name_key, ?qtype, rule = rule.number, action = rule.action.kind(), "DNS rule matched");
        }
        let group = match rule.map(|r| &r.action) {
            Some(Action::Answer(answer)) => {
                s.dns_answered_local.inc();
                // One per rule, and rules are few: room for any answer.
                let rendered = rule.map(|r| (&r.rendered, usize::MAX));
                return self.reply_rendered(rendered, &request, transport, client, rule, 0, || {
                    self.static_answer(&request, answer)
                });
            }
            Some(Action::Hosts(table, ttl)) => {
                s.dns_answered_local.inc();
                let addrs = table.get(&name_key).cloned().unwrap_or_default();
                let answer = StaticAnswer {
                    a: addrs.v4,
                    aaaa: addrs.v6,
                    cname: None,
                    ttl: *ttl,
                };
                let msg = self.static_answer(&request, &answer);
                return self.reply_observed(&request, &msg, transport, client, rule);
            }
            Some(Action::Block(mode, ttl)) => {
                s.dns_blocked.inc();
                let msg = self.blocked(&request, *mode, *ttl);
                return self.reply_to(&request, &msg, transport);
            }
            Some(Action::Forward(g)) => Some(*g),
            None => self.default_group,
        };
        let Some(group) = group else {
            // No rule and no default group: nothing can answer this.
            let msg = message::response(&request, ResponseCode::Refused, self.max_udp_payload);
            return self.reply_to(&request, &msg, transport);
        };
        let key = self.cache_key(&request, group);
        let lookup = self.cache.lookup(&key);
        if let Lookup::Live(entry, age) = lookup {
            // Checked on every hit, under the rules in force: a reload that
            // adds a block applies to answers cached before it.
            if entry.aliases
                && let Some(rule) = self.cached_alias_block(&entry, client, qtype)
                && let Some(msg) = self.cname_block_answer(&request, client, rule)
            {
                return self.reply_to(&request, &msg, transport);
            }
            s.dns_cache_hits.inc();
            let outcome = self.reply_rendered(
                Some((&entry.rendered, entry.kept_room)),
                &request,
                transport,
                client,
                rule,
                age,
                || {
                    let mut msg = message::response(&request, entry.rcode, self.max_udp_payload);
                    entry.fill(&mut msg, age);
                    msg
                },
            );
            if let Outcome::Reply(bytes) = outcome {
                if entry.hit_wants_prefetch(self.prefetch, std::time::Instant::now())
                    && let Some(pending) = self.refresh(request, group, key, transport, client, rule)
                {
                    return Outcome::Prefetch(bytes, pending);
                }
                return Outcome::Reply(bytes);
            }
            return outcome;
        }
        let stale_kept = matches!(lookup, Lookup::Stale);
        self.miss(request, group, key, stale_kept, transport, client, counted, rule)
    }

    /// A cache miss: a place in the group's pending queries and the
    /// client's share of them, or SERVFAIL now. `stale_kept`: the cache
    /// holds an expired answer that serve-stale could give.
    #[allow(clippy::too_many_arguments)]
    fn miss(
        &self,
        request: Request,
        group: usize,
        key: CacheKey,
        stale_kept: bool,
        transport: Transport,
        client: IpAddr,
        counted: Option<ClientKey>,
        rule: Option<&super::rules::Rule>,
    ) -> Outcome {
        let s = &self.stats;
        s.dns_cache_misses.inc();
        let place = match self.place(group, client, counted) {
            Ok(place) => place,
            Err(full) => {
                match full {
                    // Over the group's pending limit: say so now, never stay
                    // silent (the client would only retry into the same queue).
                    NoPlace::Group => s.dns_servfail_overload.inc(),
                    // This client alone holds its share of the group's places:
                    // it waits for its own misses, the others do not wait for it.
                    NoPlace::ClientShare => s.dns_servfail_client_share.inc(),
                }
                let msg = message::response(&request, ResponseCode::ServFail, self.max_udp_payload);
                return self.reply_to(&request, &msg, transport);
            }
        };
        // With nothing kept to serve, the wait needs no stale answer's
        // timer: the answers to this question on their way upstream are
        // this query's own (single-flight), so the only entry that could
        // appear meanwhile is a fresh one from a flight that landed just
        // before this one took off. Most misses are of names not asked
        // before; the timer and the race with it cost each of them about
        // as much as the rest of the wait (callgrind).
        let serve_stale = self.stale.is_some() && stale_kept && rule.is_none_or(|r| r.serve_stale);
        let pending = Pending::new(request, group, key, transport, client, rule, place);
        Outcome::Forward(Pending { serve_stale, ..pending })
    }

    /// A place among `group`'s pending queries and `client`'s share of
    /// them, which a miss and a prefetch alike must hold while upstream.
    /// `counted`: `client`'s key, when the rate limit has worked it out.
    fn place(&self, group: usize, client: IpAddr, counted: Option<ClientKey>) -> Result<Place, NoPlace> {
        let admission = self
            .groups
            .get(group)
            .and_then(UpstreamGroup::admit)
            .ok_or(NoPlace::Group)?;
        let max_share = self.per_client_pending.get(group).copied().unwrap_or(1);
        let share = self
            .shares
            .take(group, counted.unwrap_or_else(|| self.clients.key(client)), max_share)
            .ok_or(NoPlace::ClientShare)?;
        Ok(Place { admission, share })
    }

    /// A prefetch of `request`'s answer (a cache hit near its expiry). A
    /// refresh takes a place like a miss, the client's share included;
    /// without one it is simply not made.
    fn refresh(
        &self,
        request: Request,
        group: usize,
        key: CacheKey,
        transport: Transport,
        client: IpAddr,
        rule: Option<&super::rules::Rule>,
    ) -> Option<Pending> {
        let place = self.place(group, client, None).ok()?;
        self.stats.dns_prefetches.inc();
        Some(Pending::new(request, group, key, transport, client, rule, place))
    }

    /// Cache hits and overrides of the plainest queries (see
    /// [`super::wire`]), answered from their kept encodings without
    /// parsing the query into a hickory `Message`. `None` when the query
    /// has any other shape, or its answer is not kept for this shape, or
    /// the full path would do anything else with it (a refusal, a block,
    /// a hosts file, a miss, an answer the domain feed must see): the full
    /// path then answers it, and nothing has been counted here.
    ///
    /// A plain query whose answer is not cached leaves in `missed` what
    /// the full path would otherwise work out again (the parsed request,
    /// the rule, the group, the cache key).
    fn answer_kept<'e>(
        &'e self,
        bytes: &[u8],
        client: IpAddr,
        transport: Transport,
        missed: &mut Option<Missed<'e>>,
        spare: &mut Vec<u8>,
    ) -> Option<Outcome> {
        if !self.reuse_encoded {
            return None;
        }
        // The name's keys for the rules and the cache, written in the pass
        // that checks its shape.
        let mut forms = Forms::default();
        let query = wire::plain(bytes, &mut forms)?;
        let qtype = RecordType::from(query.qtype);
        let qclass = DNSClass::from(query.qclass);
        if refused_locally(qclass, qtype).is_some() || !self.allows(client) {
            return None;
        }
        let key = forms.rule_key()?;
        let rule = self.rules.first_match(client, key, qtype);
        let sets = rule.map_or(&[][..], |r| &r.nft_sets[..]);
        if self.feed.as_ref().is_some_and(|f| f.watches(sets)) {
            return None;
        }
        let shape = |age| Shape {
            asked: Asked::plain(&query),
            id: query.id,
            limit: match transport {
                Transport::Udp => message::udp_limit(query.edns_payload, self.max_udp_payload),
                Transport::Tcp => usize::from(u16::MAX),
            },
            our_payload: self.max_udp_payload,
            age,
        };
        let log_rule = || {
            if let Some(rule) = rule {
                tracing::debug!(%client, name = %key, ?qtype, rule = rule.number, action = rule.action.kind(), "DNS rule matched");
            }
        };
        let group = match rule.map(|r| &r.action) {
            Some(Action::Answer(_)) => {
                let reused = rule?.rendered.reuse_into(&shape(0), spare)?;
                log_rule();
                self.stats.dns_answered_local.inc();
                return Some(Outcome::Reply(self.served(reused)));
            }
            Some(Action::Forward(g)) => *g,
            None => self.default_group?,
            Some(Action::Hosts(..) | Action::Block(..)) => return None,
        };
        let group_name = self.group_names.get(group)?;
        // The cache key (a group name too long for the stack takes the
        // full path).
        let mut room = [0; PACKED_ON_STACK];
        let cache_key = StackKey::of_plain(&mut room, group_name, &forms, qtype, qclass)?;
        let now = std::time::Instant::now();
        let lookup = self.cache.find_at(&cache_key, now);
        let Lookup::Live(entry, age) = lookup else {
            // The miss is forwarded by the caller, with a `Request` built
            // from what was read here rather than from a second parse, and
            // the key owned (it goes with the query upstream).
            *missed = message::plain_request(&query).map(|request| Missed {
                request,
                rule,
                group,
                // The bytes just looked up, not packed again to store.
                key: CacheKey::of_stack(&cache_key),
                stale_kept: matches!(lookup, Lookup::Stale),
            });
            return None;
        };
        if entry.aliases && self.cached_alias_block(&entry, client, qtype).is_some() {
            // The full path answers with the block, and counts it.
            return None;
        }
        let reused = entry.rendered.reuse_into(&shape(age), spare)?;
        log_rule();
        self.stats.dns_cache_hits.inc();
        let reply = self.served(reused);
        if entry.hit_wants_prefetch(self.prefetch, now) {
            // The refresh needs the query as a `Request`: parsed in full,
            // once per entry and lifetime at most.
            if let Ok(request) = message::parse_request(bytes)
                && let key = self.cache_key(&request, group)
                && let Some(pending) = self.refresh(request, group, key, transport, client, rule)
            {
                return Some(Outcome::Prefetch(reply, pending));
            }
        }
        Some(Outcome::Reply(reply))
    }

    /// A kept encoding's bytes, counted as the encoder's would have been.
    fn served(&self, reused: Reused) -> Vec<u8> {
        if reused.truncated {
            self.stats.dns_truncated.inc();
        }
        self.stats.dns_rcodes.record(u16::from(reused.rcode));
        reused.bytes
    }

    /// SERVFAIL for a query that cannot be forwarded after all (the
    /// daemon-wide task limit).
    pub fn overloaded(&self, pending: Pending) -> Option<Vec<u8>> {
        self.stats.dns_servfail_overload.inc();
        let msg = message::response(&pending.request, ResponseCode::ServFail, self.max_udp_payload);
        match self.reply_to(&pending.request, &msg, pending.transport) {
            Outcome::Reply(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// Per-upstream-server metrics (Prometheus text).
    pub fn render_upstream_metrics(&self, out: &mut String) {
        UpstreamGroup::render_metrics(&self.groups, out);
    }

    /// Resolves a cache miss upstream and returns the first reply; see
    /// [`DnsEngine::forward_with`]. When the reply is a stale answer, the
    /// refresh is left to other askers (this caller stops waiting).
    pub async fn forward(&self, pending: Pending) -> Option<Vec<u8>> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let work = Self::forward_with(
            self,
            pending,
            move |reply| {
                let _ = tx.send(reply);
            },
            (),
        );
        tokio::pin!(work);
        tokio::select! {
            reply = &mut rx => reply.ok(),
            () = &mut work => rx.try_recv().ok(),
        }
    }

    /// Resolves a cache miss upstream and hands the reply to `send`:
    /// - the upstream's answer (scrubbed, clamped, cached) when it comes
    ///   within `dns.stale.answer_after`, or at any time when there is no
    ///   stale answer to give;
    /// - otherwise an expired answer with TTL `dns.stale.ttl` (RFC 8767),
    ///   after which the upstream query goes on in this same task and its
    ///   answer refreshes the cache. Identical questions share one upstream
    ///   query (the groups' single-flight), so a name is refreshed once at
    ///   a time however many clients ask;
    /// - SERVFAIL when no upstream answers within `dns.timeout` and there
    ///   is nothing stale.
    ///
    /// Not an `async fn`: its arguments would be kept in the future beside
    /// the parts they are taken apart into. Taken apart first, each part is
    /// held once. For the same reason it takes the engine as an owner (an
    /// `Arc` for a listener's miss, which must own it) and `hold`, kept
    /// until the future ends (the miss's permit): a caller's `async` block
    /// around it would keep the whole `Pending` again beside it.
    pub fn forward_with<E: Deref<Target = DnsEngine>>(
        engine: E,
        pending: Pending,
        send: impl FnOnce(Vec<u8>),
        hold: impl Sized,
    ) -> impl Future<Output = ()> {
        let Pending {
            request,
            group,
            key,
            transport,
            client,
            sets,
            serve_stale,
            _admission,
            share,
        } = pending;
        let mut send = Some(send);
        async move {
            let this: &DnsEngine = &engine;
            // Held until the client has its answer, by the future itself:
            // moved into a local, they would take their room twice.
            let _place = (&_admission, &share, &hold);
            // One reading of the clock for the deadline and the latency,
            // and one when the answer is in (for the latency and the cache
            // entry's time): each was a reading of its own.
            let started = tokio::time::Instant::now();
            let deadline = started + this.timeout;
            this.stats.dns_forwarded.inc();
            let stale = this.stale.filter(|_| serve_stale);
            let asked = ToUpstream {
                request: &request,
                key: &key,
                group,
                deadline,
                transport,
                client,
                sets: &sets,
            };
            // The race against the stale answer's timer is boxed: most misses
            // never run it (see `miss`), and in line its state would be part
            // of every miss's future.
            let upstream = match stale {
                Some(settings) => Box::pin(this.resolve_or_stale(&asked, settings, &mut send)).await,
                None => this.resolve(&asked).await,
            };
            let answered = tokio::time::Instant::now();
            if upstream.is_ok() {
                this.stats.dns_upstream_latency.observe(answered - started);
            }
            let upstream = match upstream {
                Ok(Answer::Plain(plain)) => match this.plain_reply(&request, &key, plain, transport, &sets) {
                    // The same reply and cache entry as below, made on the wire.
                    Ok(done) => {
                        let reply = this.keep_plain(key, done, send.is_some(), answered.into_std(), share.client());
                        if let Some(send) = send {
                            send(reply);
                        }
                        return;
                    }
                    Err(plain) => Answer::Plain(plain).into_message().ok_or(UpstreamError::NoAnswer),
                },
                Ok(Answer::Parsed(msg)) => Ok(msg),
                Err(e) => Err(e),
            };
            // In a block of its own, so that the message is gone before the
            // wait below and takes no room in the future across it.
            let rendered = {
                // What the upstream's answer leaves to cache: stored once the reply
                // is encoded, so the records move into the cache instead of being
                // copied for it.
                let mut keep = None;
                let mut msg = match upstream {
                    Ok(answer) => {
                        let (msg, lifetime) = this.absorb(&request, answer);
                        keep = lifetime.map(|l| (key, l));
                        msg
                    }
                    Err(e) => {
                        let stale_msg = stale
                            .filter(|_| send.is_some())
                            .and_then(|settings| this.stale_answer(&request, &key, settings));
                        match stale_msg {
                            // Every upstream failed before answer_after: stale beats SERVFAIL.
                            Some(msg) => msg,
                            _ => {
                                if send.is_some() {
                                    this.stats.dns_servfail.inc();
                                }
                                tracing::debug!(name = %request.query.name(), error = %e, "no upstream answer");
                                message::response(&request, ResponseCode::ServFail, this.max_udp_payload)
                            }
                        }
                    }
                };
                // A refresh after a stale answer sends nothing: it only caches.
                // An answer blocked by an alias target is neither recorded
                // nor fed to sets, as a direct block is not; it is still
                // cached as the upstream gave it, and checked on every hit.
                let rendered = send
                    .as_ref()
                    .map(|_| match this.cname_blocked(&request, &msg.answers, client) {
                        Some(block) => (this.encoded(&request, &block, transport), None),
                        None => this.render(&request, &msg, transport, client, &sets),
                    });
                if let Some((key, lifetime)) = keep {
                    this.cache.store_at(
                        key,
                        lifetime,
                        Records::take(&mut msg),
                        answered.into_std(),
                        share.client(),
                    );
                }
                rendered
            };
            let (Some(send), Some((reply, committed))) = (send, rendered) else {
                return;
            };
            if let Some(c) = committed {
                released(c).await;
            }
            if let Some(bytes) = reply {
                send(bytes);
            }
        }
    }

    /// The upstream's answer to a miss (see [`UpstreamGroup::resolve`]).
    async fn resolve(&self, asked: &ToUpstream<'_>) -> Result<Answer, UpstreamError> {
        match self.groups.get(asked.group) {
            Some(g) => {
                // A name asked with no capital letter is spelt on the wire
                // as its key's name: the query is then a copy of it.
                let spelt = asked.request.lowercase.then(|| asked.key.name());
                g.resolve(&asked.request.query, asked.key.packed(), spelt, asked.deadline)
                    .await
            }
            None => Err(UpstreamError::NoAnswer),
        }
    }

    /// [`DnsEngine::resolve`], where a stale answer may be given: when the
    /// upstream has not answered within `dns.stale.answer_after`, the
    /// cache's expired answer goes to `send` (taking it) and the upstream
    /// is waited for still, to refresh the cache.
    async fn resolve_or_stale<F: FnOnce(Vec<u8>)>(
        &self,
        asked: &ToUpstream<'_>,
        settings: StaleAnswers,
        send: &mut Option<F>,
    ) -> Result<Answer, UpstreamError> {
        let resolve = self.resolve(asked);
        tokio::pin!(resolve);
        tokio::select! {
            r = &mut resolve => r,
            () = tokio::time::sleep(settings.answer_after) => {
                let request = asked.request;
                if let Some(msg) = self.stale_answer(request, asked.key, settings) {
                    let bytes = match self.cname_blocked(request, &msg.answers, asked.client) {
                        Some(block) => self.encoded(request, &block, asked.transport),
                        None => self.deliver(request, &msg, asked.transport, asked.client, asked.sets).await,
                    };
                    if let (Some(bytes), Some(send)) = (bytes, send.take()) {
                        send(bytes);
                    }
                }
                resolve.await
            }
        }
    }

    /// An expired answer for `request`, if the cache still holds one, with
    /// every TTL set to the stale TTL; counted.
    fn stale_answer(&self, request: &Request, key: &CacheKey, settings: StaleAnswers) -> Option<Message> {
        let entry = self.cache.get_stale(key)?;
        self.stats.dns_stale_served.inc();
        tracing::debug!(name = %request.query.name(), "no upstream answer in time: serving a stale answer");
        let mut msg = message::response(request, entry.rcode, self.max_udp_payload);
        entry.fill_stale(&mut msg, settings.ttl);
        Some(msg)
    }

    /// Encodes `msg` for the client, first recording it in the domain feed
    /// (and waiting for its set elements to be committed).
    async fn deliver(
        &self,
        request: &Request,
        msg: &Message,
        transport: Transport,
        client: IpAddr,
        sets: &[SetPair],
    ) -> Option<Vec<u8>> {
        let (reply, committed) = self.render(request, msg, transport, client, sets);
        if let Some(c) = committed {
            released(c).await;
        }
        reply
    }

    /// [`DnsEngine::deliver`] up to the wait: the encoded reply, and the
    /// commit of its set elements to wait for before sending it.
    fn render(
        &self,
        request: &Request,
        msg: &Message,
        transport: Transport,
        client: IpAddr,
        sets: &[SetPair],
    ) -> (Option<Vec<u8>>, Option<Committed>) {
        let committed = self.feed.as_ref().and_then(|f| f.observe(client, msg, sets));
        let reply = match self.reply_to(request, msg, transport) {
            Outcome::Reply(bytes) => Some(bytes),
            _ => None,
        };
        (reply, committed)
    }

    /// What the client gets for an upstream's answer: scrubbed to the
    /// question, TTLs clamped; with how long it may be cached, if at all
    /// (the caller stores it, see [`DnsCache::store`]).
    fn absorb(&self, request: &Request, mut answer: Message) -> (Message, Option<u32>) {
        let scrubbed = scrub::scrub(&request.query, &mut answer);
        if scrubbed.removed > 0 {
            self.stats.dns_scrubbed_records.add(scrubbed.removed as u64);
            tracing::debug!(name = %request.query.name(), removed = scrubbed.removed, "records outside the question removed");
        }
        if let Some(broken) = scrubbed.broken {
            // No answer at the end of the chain: SERVFAIL, and nothing
            // cached, so the next query asks again (a loop is often a
            // zone being fixed).
            // Counted with the other upstream failures: the upstream
            // answered, but nothing usable.
            self.stats.dns_servfail.inc();
            tracing::debug!(name = %request.query.name(), ?broken, "CNAME chain loops or is too long");
            return (
                message::response(request, ResponseCode::ServFail, self.max_udp_payload),
                None,
            );
        }
        // Clamps the TTLs in place whether or not it is cacheable.
        let lifetime = self.cache.policy().apply(&mut answer);
        let mut msg = message::response(request, answer.metadata.response_code, self.max_udp_payload);
        msg.answers = answer.answers;
        msg.authorities = answer.authorities;
        msg.additionals = answer.additionals;
        (msg, lifetime)
    }

    /// The client's reply and the cache's records for an upstream answer
    /// of the plainest shape, made on the wire ([`plain_answer`]) exactly
    /// as [`DnsEngine::absorb`] and the encoder make them from the parsed
    /// answer (nothing to scrub, positive TTLs clamped, the lifetime the
    /// shortest of them). `None` leaves it to that full path: when the
    /// domain feed must see the answer, when the reply would need
    /// truncating, and when this client spelt the name otherwise than the
    /// question that went upstream (a follower of another client's query:
    /// the records keep that one's spelling). The reply is written over
    /// the answer's own bytes; a refused answer comes back untouched.
    /// `key` is the miss's cache key (see [`spelt_as_key`]).
    fn plain_reply(
        &self,
        request: &Request,
        key: &CacheKey,
        plain: PlainAnswer,
        transport: Transport,
        sets: &[SetPair],
    ) -> Result<PlainReply, PlainAnswer> {
        if !self.plain_answers || self.feed.as_ref().is_some_and(|f| f.watches(sets)) {
            return Err(plain);
        }
        // The answer's question is the client's, labels and case alike.
        if !spelt_as_key(request, key, &plain) || request.query.query_type() != plain.record_type() {
            return Err(plain);
        }
        let to = ReplyTo {
            id: request.id,
            recursion_desired: request.recursion_desired,
            checking_disabled: request.checking_disabled,
            owner: request.query.name(),
            our_payload: request.edns.as_ref().map(|_| self.max_udp_payload),
        };
        let policy = self.cache.policy();
        let (reply, answers) = plain.into_reply(&to, |ttl| policy.clamp(ttl), self.answer_limit(request, transport))?;
        #[cfg(test)]
        self.plain_replies.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let lifetime = answers.iter().map(|r| r.ttl).min().filter(|&l| l > 0);
        Ok(PlainReply {
            reply,
            records: Records {
                rcode: ResponseCode::NoError,
                answers,
                authorities: Vec::new(),
                additionals: Vec::new(),
            },
            lifetime,
        })
    }

    /// Caches what a plain reply leaves to cache and hands back the
    /// client's reply, counted as answered when it will be sent (a
    /// refresh after a stale answer only caches).
    fn keep_plain(
        &self,
        key: CacheKey,
        done: PlainReply,
        answered: bool,
        now: std::time::Instant,
        owner: ClientKey,
    ) -> Vec<u8> {
        if let Some(lifetime) = done.lifetime {
            self.cache.store_at(key, lifetime, done.records, now, owner);
        }
        if answered {
            self.stats.dns_rcodes.record(u16::from(ResponseCode::NoError));
        }
        done.reply
    }

    /// Completes `pending` as if its upstream had sent the datagram `bytes`
    /// in reply to query `id`: the same validation, scrubbing, clamping and
    /// caching as [`DnsEngine::forward`], without the network. This is the
    /// answer-path fuzz target's entry (what the WAN side controls).
    pub fn complete_with(&self, pending: Pending, id: u16, bytes: &[u8]) -> Option<Vec<u8>> {
        let Pending {
            request,
            key,
            transport,
            client,
            share,
            ..
        } = pending;
        let name = wire_labels(request.query.name());
        let (qtype, qclass) = (request.query.query_type(), request.query.query_class());
        // As `udp::Exchange` reads it: the plainest answers on the wire.
        let answer = match plain_answer::read(bytes, id, &name, u16::from(qtype), u16::from(qclass)) {
            Some(plain) => match self.plain_reply(&request, &key, plain, transport, &[]) {
                Ok(done) => return Some(self.keep_plain(key, done, true, std::time::Instant::now(), share.client())),
                Err(plain) => Answer::Plain(plain).into_message(),
            },
            None => super::upstream::accept_answer(bytes, id, &request.query),
        };
        let (mut msg, lifetime) = match answer {
            Some(answer) => self.absorb(&request, answer),
            None => (
                message::response(&request, ResponseCode::ServFail, self.max_udp_payload),
                None,
            ),
        };
        let reply = match self.cname_blocked(&request, &msg.answers, client) {
            Some(block) => self.encoded(&request, &block, transport),
            None => self.encoded(&request, &msg, transport),
        };
        if let Some(lifetime) = lifetime {
            self.cache.store(key, lifetime, Records::take(&mut msg), share.client());
        }
        reply
    }

    /// Answers `bytes` completely, awaiting the upstream if needed.
    pub async fn answer(&self, bytes: &[u8], client: IpAddr, transport: Transport) -> Option<Vec<u8>> {
        match self.answer_now(bytes, client, transport) {
            Outcome::Reply(b) => Some(b),
            Outcome::Drop => None,
            Outcome::Forward(p) => self.forward(p).await,
            // Over TCP the hit is answered; the refresh is left to UDP askers.
            Outcome::Prefetch(b, _) => Some(b),
            Outcome::Held(b, committed) => {
                released(committed).await;
                Some(b)
            }
        }
    }

    /// Like `reply_to`, recording the answer first; held until its set
    /// elements are committed when the rule feeds sets.
    fn reply_observed(
        &self,
        request: &Request,
        msg: &Message,
        transport: Transport,
        client: IpAddr,
        rule: Option<&super::rules::Rule>,
    ) -> Outcome {
        let sets = rule.map_or(&[][..], |r| &r.nft_sets[..]);
        let committed = self.feed.as_ref().and_then(|f| f.observe(client, msg, sets));
        match (self.reply_to(request, msg, transport), committed) {
            (Outcome::Reply(bytes), Some(c)) => Outcome::Held(bytes, c),
            (outcome, _) => outcome,
        }
    }

    /// Like `reply_observed` for an answer that `rendered` keeps the last
    /// encoding of (see [`super::rendered`]): served from there when the
    /// question has the same shape, else built by `build`, encoded, and
    /// kept. `age` is what every TTL was reduced by. An answer the domain
    /// feed must see always takes the full path.
    #[allow(clippy::too_many_arguments)]
    fn reply_rendered(
        &self,
        rendered: Option<(&Rendered, usize)>,
        request: &Request,
        transport: Transport,
        client: IpAddr,
        rule: Option<&super::rules::Rule>,
        age: u32,
        build: impl FnOnce() -> Message,
    ) -> Outcome {
        let sets = rule.map_or(&[][..], |r| &r.nft_sets[..]);
        let watched = self.feed.as_ref().is_some_and(|f| f.watches(sets));
        let rendered = rendered.filter(|_| self.reuse_encoded && !watched);
        let name = wire_labels(request.query.name());
        let shape = Shape {
            asked: Asked::of(request, &name),
            id: request.id,
            limit: self.answer_limit(request, transport),
            our_payload: self.max_udp_payload,
            age,
        };
        if let Some(reused) = rendered.and_then(|(r, _)| r.reuse(&shape)) {
            return Outcome::Reply(self.served(reused));
        }
        let msg = build();
        let outcome = self.reply_observed(request, &msg, transport, client, rule);
        if let (Some((rendered, room)), Outcome::Reply(bytes)) = (rendered, &outcome) {
            // Neither path ever sets TC but the encoder, when it truncates.
            let truncated = bytes.get(2).is_some_and(|b| b & 0x02 != 0);
            rendered.keep(&shape, bytes, truncated, msg.metadata.response_code, room);
        }
        outcome
    }

    /// The most bytes an answer to `request` over `transport` may take.
    fn answer_limit(&self, request: &Request, transport: Transport) -> usize {
        match transport {
            Transport::Udp => request.udp_limit(self.max_udp_payload),
            Transport::Tcp => usize::from(u16::MAX),
        }
    }

    fn reply_to(&self, request: &Request, msg: &Message, transport: Transport) -> Outcome {
        self.reply(msg, transport, request.udp_limit(self.max_udp_payload))
    }

    fn reply(&self, msg: &Message, transport: Transport, udp_limit: usize) -> Outcome {
        let limit = match transport {
            Transport::Udp => udp_limit,
            Transport::Tcp => usize::from(u16::MAX),
        };
        match message::encode(msg, limit) {
            Some((bytes, truncated)) => {
                if truncated {
                    self.stats.dns_truncated.inc();
                }
                self.stats.dns_rcodes.record(u16::from(msg.metadata.response_code));
                Outcome::Reply(bytes)
            }
            None => Outcome::Drop,
        }
    }

    /// An override: the records of `answer` that fit the query type.
    fn static_answer(&self, request: &Request, answer: &StaticAnswer) -> Message {
        let mut msg = message::response(request, ResponseCode::NoError, self.max_udp_payload);
        msg.metadata.authoritative = true;
        let qname = request.query.name().clone();
        let qtype = request.query.query_type();
        let mut owner = qname.clone();
        if let Some(target) = answer
            .cname
            .as_deref()
            .and_then(|t| Name::from_str(&format!("{t}.")).ok())
        {
            msg.add_answer(Record::from_rdata(
                qname,
                answer.ttl,
                RData::CNAME(CNAME(target.clone())),
            ));
            if qtype == RecordType::CNAME {
                return msg;
            }
            owner = target;
        }
        let wants = |t: RecordType| qtype == t || qtype == RecordType::ANY;
        if wants(RecordType::A) {
            for ip in &answer.a {
                msg.add_answer(Record::from_rdata(owner.clone(), answer.ttl, RData::A(A(*ip))));
            }
        }
        if wants(RecordType::AAAA) {
            for ip in &answer.aaaa {
                msg.add_answer(Record::from_rdata(owner.clone(), answer.ttl, RData::AAAA(AAAA(*ip))));
            }
        }
        msg
    }

    /// `msg` encoded for `request`'s client, if it can be.
    fn encoded(&self, request: &Request, msg: &Message, transport: Transport) -> Option<Vec<u8>> {
        match self.reply_to(request, msg, transport) {
            Outcome::Reply(bytes) => Some(bytes),
            _ => None,
        }
    }

    /// The rule blocking an answer to `client`'s query of type `qtype`
    /// through an alias target in `answers` (see [`aliases`] and
    /// [`RuleSet::target_block`]), when `dns.block_cname_targets` is on.
    /// Only answers holding an alias come here (a cached entry says so in
    /// a flag), and a target costs the rules' hash probes: the common
    /// answer, and every cache hit of one, pays nothing.
    fn alias_block(&self, answers: &[Record], client: IpAddr, qtype: RecordType) -> Option<&super::rules::Rule> {
        if !self.block_cname_targets {
            return None;
        }
        aliases::first_target(answers, |target| {
            self.rules.target_block(client, &query_key(target), qtype)
        })
    }

    /// The block answer to `request` when its answer (`answers`) leads
    /// through an alias to a blocked name: the answer the blocking rule
    /// gives a query for that name (same mode and TTL), for the name
    /// asked. Counted apart from direct blocks (`action="block_cname"`).
    fn cname_blocked(&self, request: &Request, answers: &[Record], client: IpAddr) -> Option<Message> {
        let rule = self.alias_block(answers, client, request.query.query_type())?;
        self.cname_block_answer(request, client, rule)
    }

    /// [`DnsEngine::alias_block`] for a cached answer (one with an alias):
    /// an answer found clear under these rules for every client is not
    /// looked at again until a reload brings other rules.
    fn cached_alias_block(&self, entry: &Entry, client: IpAddr, qtype: RecordType) -> Option<&super::rules::Rule> {
        let generation = self.alias_generation;
        if !self.block_cname_targets || generation != 0 && entry.clear_under(generation) {
            return None;
        }
        let rule = self.alias_block(entry.answers(), client, qtype);
        if rule.is_none() && generation != 0 {
            entry.mark_clear(generation);
        }
        rule
    }

    /// The block answer `rule` gives `request` for an alias target:
    /// counted, and logged.
    fn cname_block_answer(&self, request: &Request, client: IpAddr, rule: &super::rules::Rule) -> Option<Message> {
        let Action::Block(mode, ttl) = rule.action else {
            return None;
        };
        self.stats.dns_blocked_cname.inc();
        tracing::debug!(%client, name = %query_key(request.query.name()), qtype = ?request.query.query_type(), rule = rule.number, "DNS answer blocked by a CNAME target");
        Some(self.blocked(request, mode, ttl))
    }

    fn blocked(&self, request: &Request, mode: BlockMode, ttl: u32) -> Message {
        let rcode = match mode {
            BlockMode::Nxdomain => ResponseCode::NXDomain,
            BlockMode::Refused => ResponseCode::Refused,
            BlockMode::Nodata | BlockMode::Null => ResponseCode::NoError,
        };
        let mut msg = message::response(request, rcode, self.max_udp_payload);
        if mode == BlockMode::Null {
            let null = StaticAnswer {
                a: vec![Ipv4Addr::UNSPECIFIED],
                aaaa: vec![Ipv6Addr::UNSPECIFIED],
                cname: None,
                ttl,
            };
            msg = self.static_answer(request, &null);
            msg.metadata.authoritative = false;
        }
        msg
    }
}

impl DnsEngine {
    fn cache_key(&self, request: &Request, group: usize) -> CacheKey {
        let group = self.group_names.get(group).map_or("", |g| &**g);
        CacheKey::of_name(
            group,
            request.query.name(),
            request.query.query_type(),
            request.query.query_class(),
        )
    }
}

/// Whether `plain`'s question name is `request`'s, labels and case alike.
/// A name with no capital letter is spelt on the wire exactly as its cache
/// key (the labels lowercased, see [`super::names::wire_key`]), which the
/// miss holds: one comparison of bytes. Walking hickory's `Name` label by
/// label ([`PlainAnswer::is_named`], kept for names with capitals) cost a
/// miss about 250 instructions (callgrind).
fn spelt_as_key(request: &Request, key: &CacheKey, plain: &PlainAnswer) -> bool {
    if request.lowercase {
        debug_assert_eq!(key.name(), &*wire_key(request.query.name()));
        plain.name() == key.name()
    } else {
        plain.is_named(request.query.name())
    }
}

/// The answer to a query that is never forwarded, whatever the rules say.
fn refused_locally(class: DNSClass, qtype: RecordType) -> Option<ResponseCode> {
    match (class, qtype) {
        (_, RecordType::AXFR | RecordType::IXFR) => Some(ResponseCode::NotImp),
        (DNSClass::IN, _) => None,
        _ => Some(ResponseCode::Refused),
    }
}

#[cfg(test)]
mod tests;
