//! Opening new flows off the listener's path.
//!
//! Opening a flow costs system calls (a socket, its options, a bind, a
//! connect), a reader task and table work: tens of microseconds, where
//! relaying a datagram of an established flow costs one or two. Done inside
//! the listener, a burst of new flows from one client (a P2P client talking
//! to thousands of peers, a compromised device spraying flows) would keep
//! the listener from reading, and every other client's datagrams would wait
//! in the kernel's receive queue behind the burst. So the listener only
//! files the first datagram of a new flow here and goes on reading; opener
//! tasks owned by the relay open the flows.
//!
//! Waiting flows are kept per client and taken round-robin, so one client's
//! burst delays another client's new flow by one opener round at most, not
//! by the whole burst. Everything here is bounded: flows waiting per client
//! and in all, bytes held per client and in all, datagrams held per flow.
//! Past a bound the datagram is dropped and counted (`open_backlog`), as a
//! full receive queue would have dropped it, but only the client that
//! filled its share loses.
//!
//! Datagrams that arrive for a flow while it is being opened are held with
//! it and sent, in order, before the flow becomes visible in the table.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

use super::key::{ClientId, FlowKey};
use super::rules::{UdpRule, UdpRules};
use super::session::Session;
use super::table::{Admission, SessionTable};
use crate::sync::lock;

/// Flows one client may have waiting to be opened.
pub const WAITING_PER_CLIENT: usize = 8_192;
/// Flows waiting in all.
pub const WAITING: usize = 32_768;
/// Datagrams held for one flow while it waits (its first included): a
/// whole GSO train, the most a client's single send can carry (the
/// kernel's `UDP_MAX_SEGMENTS`), so a flow that starts with one loses none
/// of it. The byte bounds below keep many such flows in check.
pub const HELD_PER_FLOW: usize = 64;
/// Bytes one client may have held, each datagram charged [`HELD_COST`]
/// beside its payload.
pub const BYTES_PER_CLIENT: usize = 2 << 20;
/// Bytes held in all, charged the same way.
pub const BYTES: usize = 16 << 20;
/// What holding a datagram costs beside its payload: its [`Held`] and the
/// allocator's share of its buffer. Charged so that a flood of empty or
/// one-byte datagrams is bounded by memory, not only by count.
pub const HELD_COST: usize = std::mem::size_of::<Held>() + 16;
/// Flows one opener task takes from the backlog at a time; it opens them
/// one time slice at a time (see `relay::slice`), letting other tasks run
/// between slices.
pub const OPENS_PER_ROUND: usize = 32;

/// A datagram held for a flow that is being opened.
#[derive(Debug)]
pub struct Held {
    pub dst: SocketAddr,
    pub tos: Option<u8>,
    pub payload: Vec<u8>,
}

/// The datagrams held for one flow, oldest first. The first is kept
/// inline: most new flows hold only it, and a list of its own was a second
/// allocation (and free) for every new flow.
#[derive(Debug, Default)]
pub struct HeldList {
    first: Option<Held>,
    more: Vec<Held>,
}

impl HeldList {
    fn one(held: Held) -> Self {
        HeldList {
            first: Some(held),
            more: Vec::new(),
        }
    }

    fn push(&mut self, held: Held) {
        if self.first.is_none() {
            self.first = Some(held);
        } else {
            self.more.push(held);
        }
    }

    pub fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    pub fn is_empty(&self) -> bool {
        self.first.is_none()
    }

    /// The held datagrams, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Held> {
        self.first.iter().chain(&self.more)
    }
}

/// A flow to open, as the opener tasks get it.
#[derive(Debug)]
pub struct Job {
    pub key: FlowKey,
    pub dst: SocketAddr,
    /// The rules the flow was decided by (a reload does not change it).
    pub rules: Arc<UdpRules>,
    pub rule: usize,
}

impl Job {
    /// The rule that decided the flow.
    pub fn rule(&self) -> &UdpRule {
        self.rules.numbered(self.rule)
    }
}

/// What became of a datagram for a flow that is not in the table.
#[derive(Debug)]
pub enum Filed {
    /// The flow is open after all (opened meanwhile): send it there.
    Open(Arc<Session>),
    /// A new flow, filed with its first datagram: wake an opener.
    Queued,
    /// Held with its flow, which is waiting or being opened.
    Held,
    /// The client may open no more flows now (its token bucket).
    RateLimited,
    /// Over a bound of the backlog: dropped.
    Full,
}

#[derive(Debug)]
struct Pending {
    rules: Arc<UdpRules>,
    rule: usize,
    dst: SocketAddr,
    held: HeldList,
    bytes: usize,
}

#[derive(Debug, Default)]
struct Waiting {
    /// Flows not yet taken by an opener, oldest first.
    keys: VecDeque<FlowKey>,
    /// Bytes held for this client's flows (waiting or opening), each
    /// datagram charged its payload and [`HELD_COST`].
    bytes: usize,
    /// Flows waiting or being opened.
    flows: usize,
}

/// The backlog's maps hash as the session table and the pools do (foldhash,
/// seeded per process): every new flow's key is hashed here several times
/// (filed, taken, completed), and SipHash, the default, costs several
/// times more per key (`sip::Hasher::write` showed in the profile of the
/// flows bench; foldhash does not).
type Hasher = foldhash::fast::RandomState;

#[derive(Debug, Default)]
struct Backlog {
    /// Flows waiting or being opened, with what is held for them.
    flows: HashMap<FlowKey, Pending, Hasher>,
    clients: HashMap<ClientId, Waiting, Hasher>,
    /// Clients with flows not yet taken, in turn order.
    turns: VecDeque<ClientId>,
    /// Flows not yet taken.
    waiting: usize,
    bytes: usize,
}

/// Capacity (flows) the backlog's map keeps when it empties; above it the
/// map is given back.
const KEPT_WHEN_EMPTY: usize = 256;

impl Backlog {
    /// Forgets the flow `key`; what was held for it.
    fn remove(&mut self, key: &FlowKey) -> HeldList {
        let Some(p) = self.flows.remove(key) else {
            return HeldList::default();
        };
        self.bytes -= p.bytes;
        let owner = key.owner();
        if let Some(client) = self.clients.get_mut(&owner) {
            client.bytes -= p.bytes;
            client.flows -= 1;
            if client.flows == 0 {
                self.clients.remove(&owner);
            }
        }
        self.shrink_when_empty();
        p.held
    }

    /// Gives the map's memory back once a burst has been opened. A map
    /// keeps the capacity of its fullest moment: after a flood of new flows
    /// that is up to [`WAITING`] entries of about 150 bytes, held for
    /// nothing (8,192 buckets, 1.2 MB, after the 20,000-destination flood,
    /// in the bench's malloc_info). Big enough to have come from `mmap`, it
    /// goes back to the system when freed.
    fn shrink_when_empty(&mut self) {
        if self.flows.is_empty() && self.flows.capacity() > KEPT_WHEN_EMPTY {
            self.flows = HashMap::default();
        }
        if self.turns.is_empty() && self.turns.capacity() > KEPT_WHEN_EMPTY {
            self.turns = VecDeque::new();
        }
    }
}

/// The new flows waiting to be opened, and the signal that wakes openers.
#[derive(Debug, Default)]
pub struct OpenBacklog {
    backlog: Mutex<Backlog>,
    ready: Notify,
}

impl OpenBacklog {
    pub fn new() -> Self {
        OpenBacklog::default()
    }

    fn lock(&self) -> MutexGuard<'_, Backlog> {
        lock(&self.backlog)
    }

    /// Files a datagram of the flow `key`, which the listener did not find
    /// in `table`. A new flow is admitted by its client's token bucket (in
    /// `table`, at `now_ms`) and filed under the rule that decided it
    /// (`rule`, asked only then).
    ///
    /// The flow's key is hashed once here (an entry kept from the look-up
    /// to the insert), its client once here and once in the table.
    pub fn file(
        &self,
        table: &SessionTable,
        key: FlowKey,
        held: Held,
        now_ms: u64,
        rule: impl FnOnce() -> (Arc<UdpRules>, usize),
    ) -> Filed {
        let len = held.payload.len() + HELD_COST;
        let owner = key.owner();
        let mut b = self.lock();
        let Backlog {
            flows,
            clients,
            turns,
            waiting,
            bytes,
        } = &mut *b;
        let slot = match flows.entry(key) {
            Entry::Occupied(p) => {
                let p = p.into_mut();
                let client = clients.entry(owner).or_default();
                if p.held.len() >= HELD_PER_FLOW || client.bytes + len > BYTES_PER_CLIENT || *bytes + len > BYTES {
                    return Filed::Full;
                }
                p.held.push(held);
                p.bytes += len;
                client.bytes += len;
                *bytes += len;
                return Filed::Held;
            }
            Entry::Vacant(v) => v,
        };
        // Checked under the backlog's lock: an opener files a flow in the
        // table under it too, so a datagram is either held (and sent by the
        // opener, in order) or finds the flow here. The client's token is
        // taken only if the backlog has room for the flow.
        let client = clients.get(&owner);
        let (queued, client_bytes) = client.map_or((0, 0), |c| (c.keys.len(), c.bytes));
        let room = || {
            queued < WAITING_PER_CLIENT
                && *waiting < WAITING
                && client_bytes + len <= BYTES_PER_CLIENT
                && *bytes + len <= BYTES
        };
        match table.get_or_admit(&key, now_ms, room) {
            Admission::Open(session) => return Filed::Open(session),
            Admission::NoRoom => return Filed::Full,
            Admission::RateLimited => return Filed::RateLimited,
            Admission::Admitted => {}
        }
        let (rules, rule) = rule();
        let client = clients.entry(owner).or_default();
        if client.keys.is_empty() {
            turns.push_back(owner);
        }
        client.keys.push_back(key);
        client.flows += 1;
        client.bytes += len;
        *waiting += 1;
        *bytes += len;
        slot.insert(Pending {
            rules,
            rule,
            dst: held.dst,
            held: HeldList::one(held),
            bytes: len,
        });
        Filed::Queued
    }

    /// Wakes an opener (after filing new flows).
    pub fn wake(&self) {
        self.ready.notify_one();
    }

    /// Waits until [`OpenBacklog::wake`] was called since the last wait ended.
    pub async fn woken(&self) {
        self.ready.notified().await;
    }

    /// Up to `max` flows to open, one per client in turn. They stay filed
    /// (their datagrams are held) until [`OpenBacklog::complete`].
    pub fn take(&self, max: usize) -> Vec<Job> {
        let mut jobs = Vec::new();
        self.take_into(max, &mut jobs);
        jobs
    }

    /// [`OpenBacklog::take`] into `jobs` (cleared first), so that an
    /// opener keeps one list for all its rounds.
    pub fn take_into(&self, max: usize, jobs: &mut Vec<Job>) {
        jobs.clear();
        let mut b = self.lock();
        let b = &mut *b;
        while jobs.len() < max {
            let Some(owner) = b.turns.pop_front() else { break };
            let Some(client) = b.clients.get_mut(&owner) else {
                continue;
            };
            let Some(key) = client.keys.pop_front() else {
                continue;
            };
            if !client.keys.is_empty() {
                b.turns.push_back(owner);
            }
            b.waiting -= 1;
            if let Some(p) = b.flows.get(&key) {
                jobs.push(Job {
                    key,
                    dst: p.dst,
                    rules: p.rules.clone(),
                    rule: p.rule,
                });
            }
        }
    }

    /// Whether flows are waiting to be taken.
    pub fn has_waiting(&self) -> bool {
        self.lock().waiting > 0
    }

    /// Ends the opening of `key`: hands its held datagrams to `finish`,
    /// which sends them and files the flow in the table (or drops them if
    /// the flow could not be opened), all under the backlog's lock so no
    /// later datagram of the flow can overtake them.
    pub fn complete<R>(&self, key: &FlowKey, finish: impl FnOnce(HeldList) -> R) -> R {
        let held = self.lock().remove(key);
        finish(held)
    }

    /// [`OpenBacklog::complete`] for several flows at once (a round of an
    /// opener): `finish` gets their held datagrams in the order of `keys`,
    /// so it can send them all together. `held` is the caller's list to
    /// gather them in (left empty), kept to save an allocation per round.
    pub fn complete_all<'k, R>(
        &self,
        keys: impl IntoIterator<Item = &'k FlowKey>,
        held: &mut Vec<HeldList>,
        finish: impl FnOnce(&[HeldList]) -> R,
    ) -> R {
        let mut b = self.lock();
        held.clear();
        held.extend(keys.into_iter().map(|k| b.remove(k)));
        let r = finish(held);
        held.clear();
        r
    }

    /// Flows waiting or being opened, and the bytes held for them.
    pub fn backlog(&self) -> (usize, usize) {
        let b = self.lock();
        (b.flows.len(), b.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayConfig;
    use crate::relay::table::Limits;

    fn rules() -> Arc<UdpRules> {
        Arc::new(UdpRules::new(&RelayConfig::default(), 0xff))
    }

    fn key(client: &str, port: u16) -> FlowKey {
        let dst: SocketAddr = ([198, 51, 100, 7], port).into();
        FlowKey::new(SocketAddr::new(client.parse().unwrap(), 5000), dst, rules().numbered(0))
    }

    fn held(k: &FlowKey, len: usize) -> Held {
        let dst = match k.target {
            crate::relay::key::Target::Destination(d) => d,
            crate::relay::key::Target::Cone(_) => unreachable!(),
        };
        Held {
            dst,
            tos: None,
            payload: vec![0; len],
        }
    }

    fn table() -> SessionTable {
        SessionTable::new(Limits {
            capacity: 100_000,
            per_client: 100_000,
            new_flows_per_sec: 0,
        })
    }

    fn file(o: &OpenBacklog, t: &SessionTable, k: FlowKey, len: usize) -> Filed {
        o.file(t, k, held(&k, len), 0, || (rules(), 0))
    }

    #[test]
    fn clients_take_turns_and_a_flooder_fills_only_its_share() {
        let (o, t) = (OpenBacklog::new(), table());
        for p in 0..WAITING_PER_CLIENT as u16 + 10 {
            let filed = file(&o, &t, key("192.0.2.66", 10_000 + p), 10);
            assert_eq!(
                matches!(filed, Filed::Queued),
                usize::from(p) < WAITING_PER_CLIENT,
                "{p}: {filed:?}"
            );
        }
        // Another client's new flow still gets in, and its turn comes next.
        assert!(matches!(file(&o, &t, key("192.0.2.11", 7000), 10), Filed::Queued));
        let first: Vec<_> = o.take(3).iter().map(|j| j.key.client.ip().to_string()).collect();
        assert_eq!(first, ["192.0.2.66", "192.0.2.11", "192.0.2.66"]);
        assert_eq!(o.backlog().0, WAITING_PER_CLIENT + 1);
    }

    #[test]
    fn datagrams_of_a_waiting_flow_are_held_in_order_and_bounded() {
        let (o, t) = (OpenBacklog::new(), table());
        let k = key("192.0.2.10", 7000);
        assert!(matches!(file(&o, &t, k, 1), Filed::Queued));
        for i in 2..=HELD_PER_FLOW {
            assert!(matches!(file(&o, &t, k, i), Filed::Held));
        }
        assert!(matches!(file(&o, &t, k, 99), Filed::Full));
        let jobs = o.take(10);
        assert_eq!(jobs.len(), 1);
        // Still held while it is being opened.
        assert!(matches!(file(&o, &t, k, 1), Filed::Full));
        let sizes = o.complete(&k, |held| held.iter().map(|h| h.payload.len()).collect::<Vec<_>>());
        assert_eq!(sizes, (1..=HELD_PER_FLOW).collect::<Vec<_>>());
        assert_eq!(o.backlog(), (0, 0));
        // Completed: the next datagram files a new flow again.
        assert!(matches!(file(&o, &t, k, 1), Filed::Queued));
    }

    #[test]
    fn held_bytes_are_bounded_per_client() {
        let (o, t) = (OpenBacklog::new(), table());
        let big = 65_000;
        let fit = BYTES_PER_CLIENT / big;
        for p in 0..fit as u16 {
            assert!(matches!(
                file(&o, &t, key("192.0.2.66", 10_000 + p), big),
                Filed::Queued
            ));
        }
        assert!(matches!(file(&o, &t, key("192.0.2.66", 9_999), big), Filed::Full));
        assert!(matches!(file(&o, &t, key("192.0.2.11", 9_999), big), Filed::Queued));
    }

    #[test]
    fn empty_datagrams_are_charged_their_bookkeeping() {
        let (o, t) = (OpenBacklog::new(), table());
        // Flows of one client, each filled with empty datagrams, until the
        // client's byte share stops them: memory, not the flow count, is
        // the bound.
        let flows = BYTES_PER_CLIENT / (HELD_PER_FLOW * HELD_COST) + 1;
        assert!(flows < WAITING_PER_CLIENT);
        let mut held = 0;
        for p in 0..flows as u16 {
            for _ in 0..HELD_PER_FLOW {
                if matches!(
                    file(&o, &t, key("192.0.2.66", 10_000 + p), 0),
                    Filed::Queued | Filed::Held
                ) {
                    held += 1;
                }
            }
        }
        assert_eq!(held, BYTES_PER_CLIENT / HELD_COST);
        assert_eq!(o.backlog().1, held * HELD_COST);
        // Another client still gets in.
        assert!(matches!(file(&o, &t, key("192.0.2.11", 9_999), 0), Filed::Queued));
    }

    #[test]
    fn the_backlog_gives_its_memory_back_when_a_burst_is_opened() {
        let (o, t) = (OpenBacklog::new(), table());
        let keys: Vec<FlowKey> = (0..2_000).map(|p| key("192.0.2.66", 10_000 + p)).collect();
        for &k in &keys {
            assert!(matches!(file(&o, &t, k, 1), Filed::Queued));
        }
        let filled = o.lock().flows.capacity();
        assert!(filled >= 2_000);
        let jobs = o.take(2_000);
        for (i, job) in jobs.iter().enumerate() {
            o.complete(&job.key, |_| ());
            // Kept while flows are still being opened. `capacity()` is not
            // the table's size: a removal that leaves a tombstone lowers it
            // by one (hashbrown counts only the slots still free to fill),
            // so the map may read below 2,000 here with a random hash seed.
            // A replaced map would read 0; a kept one lost at most one per
            // removal.
            if i + 1 < jobs.len() {
                assert!(o.lock().flows.capacity() + (i + 1) >= filled);
            }
        }
        assert!(o.lock().flows.capacity() <= KEPT_WHEN_EMPTY);
        assert_eq!(o.backlog(), (0, 0));
    }

    #[test]
    fn an_openers_lists_are_reused_and_left_empty() {
        let (o, t) = (OpenBacklog::new(), table());
        let keys: Vec<FlowKey> = (0..5).map(|p| key("192.0.2.66", 10_000 + p)).collect();
        for &k in &keys {
            assert!(matches!(file(&o, &t, k, 3), Filed::Queued));
        }
        let mut jobs = Vec::new();
        o.take_into(3, &mut jobs);
        assert_eq!(jobs.iter().map(|j| j.key).collect::<Vec<_>>(), keys[..3]);
        // Cleared first: the next round's list holds only its own flows.
        o.take_into(3, &mut jobs);
        assert_eq!(jobs.iter().map(|j| j.key).collect::<Vec<_>>(), keys[3..]);
        let mut held = vec![HeldList::default()];
        let sizes = o.complete_all(&keys, &mut held, |held| {
            held.iter()
                .map(|h| h.iter().map(|d| d.payload.len()).sum::<usize>())
                .collect::<Vec<_>>()
        });
        assert_eq!(sizes, [3; 5]);
        assert!(held.is_empty());
        assert_eq!(o.backlog(), (0, 0));
    }

    #[test]
    fn a_refused_flow_is_not_filed() {
        let o = OpenBacklog::new();
        // One new flow a second: the bucket holds one token.
        let t = SessionTable::new(Limits {
            capacity: 100,
            per_client: 100,
            new_flows_per_sec: 1,
        });
        let (k1, k2) = (key("192.0.2.10", 7000), key("192.0.2.10", 7001));
        assert!(matches!(
            o.file(&t, k1, held(&k1, 1), 0, || (rules(), 0)),
            Filed::Queued
        ));
        assert!(matches!(
            o.file(&t, k2, held(&k2, 1), 0, || (rules(), 0)),
            Filed::RateLimited
        ));
        assert_eq!(o.backlog(), (1, 1 + HELD_COST));
        assert_eq!(o.take(2).len(), 1);
    }

    #[test]
    fn a_flow_over_the_bounds_takes_no_token() {
        let o = OpenBacklog::new();
        let t = SessionTable::new(Limits {
            capacity: 100,
            per_client: 100,
            new_flows_per_sec: 1,
        });
        let k = key("192.0.2.10", 7000);
        // Larger than a client may hold: refused before its bucket is asked.
        assert!(matches!(
            o.file(&t, k, held(&k, BYTES_PER_CLIENT), 0, || (rules(), 0)),
            Filed::Full
        ));
        assert!(matches!(o.file(&t, k, held(&k, 1), 0, || (rules(), 0)), Filed::Queued));
        assert_eq!(o.backlog(), (1, 1 + HELD_COST));
    }
}
