//! The session table: flow → session, bounded, and fair between clients.
//!
//! A gateway cannot hold every flow it ever saw, and one LAN device must
//! not be able to push everyone else's flows out. So flows are kept per
//! client (an IPv4 address or an IPv6 /64, see [`ClientId`]), each client's
//! in its own least-recently-used order, and three limits apply:
//!
//! * a client at its quota (`relay.max_sessions_per_client`) recycles its
//!   own least recently used flow;
//! * a full table takes the least recently used flow of the client whose
//!   flows weigh most (their count times their idleness, among the client
//!   holding the most and a few drawn at random; see
//!   `Inner::most_to_spare`), an exhausted
//!   descriptor budget that of the client holding the most descriptors;
//! * a client may open only so many new flows a second
//!   (`relay.new_flows_per_client`, a token bucket).
//!
//! The clients' load order that a full table weighs them by is brought up
//! to date when it is read, not at every new flow (`relay::load_order`):
//! the order read is the same, and a new flow costs no B-tree work.
//!
//! An entry owns its session's resources (a pool lease or a socket, and the
//! guard that ends its task), so removal from the table *is* the session's
//! end. Removed entries are returned to the caller and dropped outside the
//! lock.

use lru::LruCache;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio_util::sync::DropGuard;

use super::budget::Permit;
use super::key::{ClientId, FlowKey, Target};
use super::load_order::{LoadOrder, Place};
use super::rate::Bucket;
use super::session::Session;
use crate::sync::lock;

/// Clock milliseconds as whole seconds (136 years fit).
fn secs(ms: u64) -> u32 {
    u32::try_from(ms / 1_000).unwrap_or(u32::MAX)
}

/// Fast, seeded per process: the keys are addresses a client chooses.
type Hasher = foldhash::fast::RandomState;

/// A live session, the guard that ends its task, if it has one, and the
/// permits of the descriptors that task holds.
///
/// Every flow has an entry, and most flows are pooled: no task, no permit.
/// So what only flows with a task of their own hold sits behind one
/// pointer ([`Own`]), and the entry stays 24 bytes, the size it had before
/// it held permits: in the LRU's node beside a 64-byte key, 8 bytes more
/// would take the node one allocation size class up (a million flows,
/// 32 MB; `entry_sizes_are_pinned` below).
#[derive(Debug)]
pub struct Entry {
    pub session: Arc<Session>,
    _own: Option<Box<Own>>,
    /// Whether ending the flow gives a descriptor back (permits of its own,
    /// or a pool socket of its own). Kept here, in what would be padding,
    /// and not asked of the session: the hot look-ups read it.
    holds_fd: bool,
    /// When the flow was filed, in clock seconds: a held client's flows
    /// opened well before its hold are let through (see
    /// [`SessionTable::established`]). In what was padding too.
    filed_secs: u32,
}

/// What a flow with a task of its own holds; dropped with its entry.
#[derive(Debug)]
struct Own {
    _task: Option<DropGuard>,
    /// Given back when the table lets go of the flow, not when its task
    /// has seen that and closed its sockets a moment later: a flow evicted
    /// for its descriptor must make room for the new one at once.
    _permits: Vec<Permit>,
}

impl Entry {
    /// Whether this entry's session is `session` itself, not an earlier or
    /// later one of the same flow: the caller holds `session`, so no other
    /// session can have its address meanwhile.
    fn is(&self, session: &Session) -> bool {
        std::ptr::eq(Arc::as_ptr(&self.session), session)
    }

    pub fn new(session: Arc<Session>, task: Option<DropGuard>) -> Self {
        Entry::with_permits(session, task, Vec::new())
    }

    pub fn with_permits(session: Arc<Session>, task: Option<DropGuard>, permits: Vec<Permit>) -> Self {
        let holds_fd = !permits.is_empty() || session.owns_pool_socket();
        let own = (task.is_some() || !permits.is_empty()).then(|| {
            Box::new(Own {
                _task: task,
                _permits: permits,
            })
        });
        Entry {
            session,
            _own: own,
            holds_fd,
            filed_secs: 0,
        }
    }
}

/// Why a flow was pushed out before its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Its client was at its quota and opened another flow.
    ClientQuota,
    /// The table was full; its client held the most flows.
    TableFull,
    /// The descriptor budget was used up; its client held the most flows.
    FdBudget,
}

/// An entry pushed out, and why.
#[derive(Debug)]
pub struct Evicted {
    pub reason: Eviction,
    pub entry: Entry,
}

/// What [`SessionTable::get_or_admit`] found.
#[derive(Debug)]
pub enum Admission {
    /// The flow is open after all.
    Open(Arc<Session>),
    /// Not open, and the caller's bounds leave no room for it.
    NoRoom,
    /// Not open; its client may open it now (a token was taken).
    Admitted,
    /// Not open; its client's token bucket is empty.
    RateLimited,
}

/// Flows opened but not yet filed with [`SessionTable::insert`], as
/// [`SessionTable::make_room`] counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Unfiled {
    /// All of them.
    pub all: usize,
    /// Those of the client the room is made for.
    pub own: usize,
}

/// The table's limits (from `[relay]`, changed on reload).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub capacity: usize,
    pub per_client: usize,
    /// New flows per second per client; 0 means no limit.
    pub new_flows_per_sec: u32,
}

/// How many clients drawn at random a full table weighs beside the one
/// holding the most, before it picks whose flow to end
/// ([`Inner::most_to_spare`]).
const CANDIDATES: usize = 8;

#[derive(Debug)]
pub struct SessionTable {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    clients: HashMap<ClientId, Client, Hasher>,
    /// (flows held, tie, client): the last is the heaviest; ties in a
    /// keyed hash of the client, not its address (see [`LoadOrder`]).
    /// Read only through [`Inner::load_order`], which brings it up to date.
    by_load: LoadOrder,
    /// Draws of candidates so far: hashed, the start of the next draw.
    draws: u64,
    /// (flows holding a descriptor, client), for clients holding any: the
    /// last holds the most descriptors.
    by_fds: BTreeSet<(usize, ClientId)>,
    len: usize,
    limits: Limits,
}

#[derive(Debug)]
struct Client {
    flows: LruCache<FlowKey, Entry, Hasher>,
    /// How many of `flows` hold a descriptor ([`Entry`]'s `holds_fd`).
    fds: usize,
    /// The keys of those flows, in the recency order of `flows`: eviction
    /// for a descriptor takes the least recently used of them at once.
    /// Walking `flows` for it passed over every pooled flow older than the
    /// first holder, and a device decides how many of those it keeps (up
    /// to its quota), so each eviction at the budget cost what it chose.
    fd_order: LruCache<FlowKey, (), Hasher>,
    bucket: Bucket,
}

impl Client {
    fn new(rate: u32, now_ms: u64) -> Client {
        Client {
            flows: LruCache::unbounded_with_hasher(Hasher::default()),
            fds: 0,
            fd_order: LruCache::unbounded_with_hasher(Hasher::default()),
            bucket: Bucket::full(rate, now_ms),
        }
    }
}

impl Inner {
    fn client(&mut self, id: ClientId, now_ms: u64) -> &mut Client {
        let rate = self.limits.new_flows_per_sec;
        self.clients.entry(id).or_insert_with(|| Client::new(rate, now_ms))
    }

    fn load(&self, id: ClientId) -> usize {
        self.clients.get(&id).map_or(0, |c| c.flows.len())
    }

    /// Notes for the load order that `id`'s flow count changed from `old`
    /// (the order moves it when next read).
    fn reorder(&mut self, id: ClientId, old: usize) {
        let clients = &self.clients;
        self.by_load
            .changed(id, old, |id| clients.get(&id).map_or(0, |c| c.flows.len()));
    }

    /// The load order, every client at its count now.
    fn load_order(&mut self) -> &BTreeSet<Place> {
        let clients = &self.clients;
        self.by_load.settled(|id| clients.get(&id).map_or(0, |c| c.flows.len()))
    }

    /// Moves `id` in the descriptor order after its count of flows holding
    /// a descriptor went from `old` to `old - gone`.
    fn forget_fds(&mut self, id: ClientId, old: usize, gone: usize) {
        if gone == 0 {
            return;
        }
        self.by_fds.remove(&(old, id));
        if old > gone {
            self.by_fds.insert((old - gone, id));
        }
    }

    /// Counts out of `id`'s descriptors those `entries` held (which were
    /// just taken out of its flows).
    fn uncount<'a>(&mut self, id: ClientId, entries: impl Iterator<Item = &'a Entry>) {
        let Some(client) = self.clients.get_mut(&id) else {
            return;
        };
        let mut gone = 0;
        for e in entries.filter(|e| e.holds_fd) {
            client.fd_order.pop(&e.session.key);
            gone += 1;
        }
        if gone == 0 {
            return;
        }
        let old = client.fds;
        client.fds -= gone;
        self.forget_fds(id, old, gone);
    }

    /// Takes the flows `keys` of `id` (which held `old` flows) into `into`;
    /// a client left without flows is forgotten, and the count and the
    /// load order follow. The one tail of every sweep over the table.
    fn take_keys(&mut self, id: ClientId, old: usize, keys: &[FlowKey], into: &mut Vec<Entry>) {
        let first = into.len();
        if let Some(client) = self.clients.get_mut(&id) {
            into.extend(keys.iter().filter_map(|k| client.flows.pop(k)));
        }
        self.uncount(id, into[first..].iter());
        if self.clients.get(&id).is_some_and(|c| c.flows.is_empty()) {
            self.clients.remove(&id);
        }
        self.len -= old - self.load(id);
        self.reorder(id, old);
    }

    /// Pops the flow `key` of `id` (which holds `old` flows).
    fn pop_key(&mut self, id: ClientId, old: usize, key: &FlowKey) -> Option<Entry> {
        let entry = self.clients.get_mut(&id)?.flows.pop(key)?;
        self.len -= 1;
        self.reorder(id, old);
        self.uncount(id, std::iter::once(&entry));
        Some(entry)
    }

    /// Pops the least recently used flow of `id`.
    fn pop_oldest(&mut self, id: ClientId) -> Option<Entry> {
        let old = self.load(id);
        let (_, entry) = self.clients.get_mut(&id)?.flows.pop_lru()?;
        self.len -= 1;
        self.reorder(id, old);
        self.uncount(id, std::iter::once(&entry));
        Some(entry)
    }

    /// Pops the least recently used flow holding a descriptor of the
    /// client holding the most descriptors. Its pooled flows ahead of it
    /// are passed over: ending one gives no descriptor back (its socket
    /// carries other flows), so evicting it for a descriptor would end a
    /// flow for nothing and leave the new flow refused.
    fn pop_descriptor_holder(&mut self) -> Option<Entry> {
        let &(_, id) = self.by_fds.last()?;
        let client = self.clients.get_mut(&id)?;
        let key = *client.fd_order.peek_lru()?.0;
        let old = client.flows.len();
        self.pop_key(id, old, &key)
    }

    fn pop_heaviest(&mut self) -> Option<Entry> {
        let &(_, _, id) = self.load_order().last()?;
        self.pop_oldest(id)
    }

    /// Pops the flow a full table gives up for a new one: the least
    /// recently used flow of the client that [`Inner::most_to_spare`]
    /// picks.
    fn pop_for_room(&mut self, now_ms: u64) -> Option<Entry> {
        let id = self.most_to_spare(now_ms)?;
        self.pop_oldest(id)
    }

    /// The client whose flows weigh most, weight being a client's flow
    /// count times how long its least recently used flow has been idle,
    /// among the client holding the most flows and [`CANDIDATES`] others
    /// drawn at random.
    ///
    /// Why not simply the client holding the most: a device that forges
    /// its source address (any address of the LAN, or IPv6 /64s by the
    /// hundred) opens one flow per forged client, and then every real
    /// device with two flows or more is "the heaviest" and loses its
    /// active flows, one per new forged flow: a game flow answered every
    /// 20 ms was reopened on new upstream ports and lost echoes. Weighing
    /// idleness too, forged flows, each about as idle as the table is
    /// long, go before a flow that carried a datagram a moment ago, while
    /// a flooding client's own flows still go first: its count outweighs
    /// any quiet client's idle flow.
    ///
    /// Why at random: the others are a run of the load order from a random
    /// point of its lightest clients' tie order (a keyed hash of the
    /// client, see `by_load`).
    /// A fixed run would refill with the flows that replace the ones it
    /// gave up, all fresh, and, in address order, would be the forger's
    /// own choice. A few candidates keep the pick's cost independent of
    /// the number of clients.
    fn most_to_spare(&mut self, now_ms: u64) -> Option<ClientId> {
        // The draw's start, hashed before the order is borrowed; the draw
        // is counted only once there is a client to draw.
        let start = self.by_load.tie(self.draws.wrapping_add(1));
        let order = {
            let clients = &self.clients;
            self.by_load.settled(|id| clients.get(&id).map_or(0, |c| c.flows.len()))
        };
        let &(_, _, heaviest) = order.last()?;
        let &(lightest, _, _) = order.first()?;
        self.draws = self.draws.wrapping_add(1);
        let from = (lightest, start, ClientId::V4(0));
        let drawn = order.range(from..).chain(order.iter()).take(CANDIDATES);
        let mut pick: Option<(u128, ClientId)> = None;
        for id in std::iter::once(heaviest).chain(drawn.map(|&(_, _, id)| id)) {
            let Some(client) = self.clients.get(&id) else {
                continue;
            };
            let idle = client
                .flows
                .peek_lru()
                .map_or(0, |(_, e)| now_ms.saturating_sub(e.session.last_active_ms()));
            // At least a millisecond, so that among flows all active this
            // millisecond the count still decides.
            let weight = client.flows.len() as u128 * u128::from(idle.max(1));
            if pick.is_none_or(|(most, _)| weight > most) {
                pick = Some((weight, id));
            }
        }
        pick.map(|(_, id)| id)
    }

    fn remove_if(&mut self, session: &Session) -> Option<Entry> {
        let key = &session.key;
        let owner = key.owner();
        let old = self.load(owner);
        let client = self.clients.get(&owner)?;
        if client.flows.peek(key).is_none_or(|e| !e.is(session)) {
            return None;
        }
        self.pop_key(owner, old, key)
    }
}

impl SessionTable {
    pub fn new(limits: Limits) -> Self {
        SessionTable {
            inner: Mutex::new(Inner {
                clients: HashMap::with_hasher(Hasher::default()),
                by_load: LoadOrder::default(),
                draws: 0,
                by_fds: BTreeSet::new(),
                len: 0,
                limits,
            }),
        }
    }

    /// The session of `key`, marking it most recently used.
    pub fn get(&self, key: &FlowKey) -> Option<Arc<Session>> {
        let mut inner = self.lock();
        let client = inner.clients.get_mut(&key.owner())?;
        let e = client.flows.get(key)?;
        if e.holds_fd {
            client.fd_order.promote(key);
        }
        Some(e.session.clone())
    }

    /// For a datagram of `key` that found no session a moment ago: its
    /// session, if one was filed meanwhile; else whether its client may
    /// open the flow now, asked only if `room()` (the caller's own bounds)
    /// says it could be queued: a refused flow takes no token. One lock and
    /// one look-up of the client where a look-up and a separate
    /// admission took two of each.
    pub fn get_or_admit(&self, key: &FlowKey, now_ms: u64, room: impl FnOnce() -> bool) -> Admission {
        let mut inner = self.lock();
        let rate = inner.limits.new_flows_per_sec;
        let client = match inner.clients.entry(key.owner()) {
            std::collections::hash_map::Entry::Occupied(o) => {
                let client = o.into_mut();
                if let Some(e) = client.flows.get(key) {
                    if e.holds_fd {
                        client.fd_order.promote(key);
                    }
                    return Admission::Open(e.session.clone());
                }
                if !room() {
                    return Admission::NoRoom;
                }
                client
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                if !room() {
                    return Admission::NoRoom;
                }
                v.insert(Client::new(rate, now_ms))
            }
        };
        if client.bucket.take(rate, now_ms) {
            Admission::Admitted
        } else {
            Admission::RateLimited
        }
    }

    /// Frees a slot for a new flow of `client` before it is opened (so its
    /// descriptors are back first): the client's own oldest flow if it is
    /// at its quota, else the heaviest client's oldest if the table is full.
    ///
    /// `unfiled` are the flows the caller opened but has not filed yet:
    /// they take their slots when filed. Counted here, the slot is freed
    /// before this flow takes its upstream, not by [`SessionTable::insert`]
    /// after it. An opener files its flows every few opens, so without them
    /// a full table freed one slot per batch here and the rest in `insert`
    /// (16,000 of the flows bench's 20,000 evictions into a full table):
    /// the new flows took their upstreams before the evicted flows gave
    /// theirs back, and `insert` built a list for each eviction.
    pub fn make_room(&self, client: ClientId, unfiled: Unfiled, now_ms: u64) -> Option<Evicted> {
        let mut inner = self.lock();
        let at_quota = inner.load(client) + unfiled.own >= inner.limits.per_client;
        let (reason, entry) = if inner.len + unfiled.all >= inner.limits.capacity {
            let entry = if at_quota {
                inner.pop_oldest(client)
            } else {
                inner.pop_for_room(now_ms)
            };
            (Eviction::TableFull, entry)
        } else if at_quota {
            (Eviction::ClientQuota, inner.pop_oldest(client))
        } else {
            return None;
        };
        entry.map(|entry| Evicted { reason, entry })
    }

    /// Ends a flow to free a descriptor for a new one: the least recently
    /// used flow holding a descriptor of the client holding the most (see
    /// `Inner::pop_descriptor_holder`); only when no flow holds one (all
    /// descriptors are shared pool sockets), the heaviest client's oldest.
    pub fn evict_for_descriptor(&self) -> Option<Evicted> {
        let mut inner = self.lock();
        let entry = match inner.pop_descriptor_holder() {
            Some(entry) => Some(entry),
            None => inner.pop_heaviest(),
        };
        entry.map(|entry| Evicted {
            reason: Eviction::FdBudget,
            entry,
        })
    }

    /// Adds a new flow. If another opened the same flow meanwhile, that one
    /// stays and `entry` comes back in `Err` (the caller drops it).
    /// Whatever the limits push out comes back in the `Vec`.
    ///
    /// The client is looked up once to check and once to file (the flow's
    /// key hashed twice): this runs for every new flow, and it used to look
    /// the client up six times.
    pub fn insert(&self, key: FlowKey, mut entry: Entry, now_ms: u64) -> Result<(Arc<Session>, Vec<Evicted>), Entry> {
        entry.filed_secs = secs(now_ms);
        let mut inner = self.lock();
        let owner = key.owner();
        let mut old = match inner.clients.get(&owner) {
            Some(c) if c.flows.contains(&key) => return Err(entry),
            Some(c) => c.flows.len(),
            None => 0,
        };
        let mut evicted = Vec::new();
        if old >= inner.limits.per_client {
            while inner.load(owner) >= inner.limits.per_client {
                match inner.pop_oldest(owner) {
                    Some(entry) => evicted.push(Evicted {
                        reason: Eviction::ClientQuota,
                        entry,
                    }),
                    None => break,
                }
            }
        }
        while inner.len >= inner.limits.capacity {
            match inner.pop_for_room(now_ms) {
                Some(entry) => evicted.push(Evicted {
                    reason: Eviction::TableFull,
                    entry,
                }),
                None => break,
            }
        }
        if !evicted.is_empty() {
            // The heaviest may have been this client.
            old = inner.load(owner);
        }
        let session = entry.session.clone();
        let holds_fd = entry.holds_fd;
        let client = inner.client(owner, now_ms);
        client.flows.put(key, entry);
        let new = client.flows.len();
        let fds = client.fds;
        if holds_fd {
            client.fd_order.put(key, ());
            client.fds += 1;
            if fds > 0 {
                inner.by_fds.remove(&(fds, owner));
            }
            inner.by_fds.insert((fds + 1, owner));
        }
        inner.len += 1;
        debug_assert_eq!(new, old + 1);
        inner.reorder(owner, old);
        Ok((session, evicted))
    }

    /// Marks `session`'s flow most recently used if the table still maps
    /// it to `session` (not to a later session of the same flow).
    pub fn promote(&self, session: &Session) {
        let key = &session.key;
        let mut inner = self.lock();
        if let Some(client) = inner.clients.get_mut(&key.owner()) {
            if let Some(e) = client.flows.peek(key).filter(|e| e.is(session)) {
                if e.holds_fd {
                    client.fd_order.promote(key);
                }
                client.flows.promote(key);
            }
        }
    }

    /// Removes `session`'s flow if the table still maps it to `session` (a
    /// newer session for the same flow is left alone).
    pub fn remove(&self, session: &Session) -> Option<Entry> {
        self.lock().remove_if(session)
    }

    /// Up to `most` flows of `client` with one destination, filed before
    /// `filed_before_ms` and active since `active_since_ms` (clock
    /// milliseconds): the flows a hold of that client lets through
    /// (`relay::shed_exempt`). Walks the client's flows, at most its
    /// quota, once per hold.
    ///
    /// Each source address's longest-filed flow first, then each one's
    /// second, and so on, the longest-filed first within a round: an IPv6
    /// client is a /64 that most often holds every device of the LAN, and
    /// one device's old flows (a console's, a forger's own) must not take
    /// every place from the others'. An IPv4 client is one address: the
    /// longest-filed first, as before.
    pub fn established(
        &self,
        client: ClientId,
        filed_before_ms: u64,
        active_since_ms: u64,
        most: usize,
    ) -> Vec<FlowKey> {
        let inner = self.lock();
        let Some(c) = inner.clients.get(&client) else {
            return Vec::new();
        };
        let mut found: Vec<(u32, FlowKey)> = c
            .flows
            .iter()
            .filter(|(key, e)| {
                // Filed within the second `filed_secs` names: before the
                // end of it.
                matches!(key.target, Target::Destination(_))
                    && (u64::from(e.filed_secs) + 1) * 1_000 <= filed_before_ms
                    && e.session.last_active_ms() >= active_since_ms
            })
            .map(|(key, e)| (e.filed_secs, *key))
            .collect();
        drop(inner);
        by_address_rounds(&mut found);
        found.into_iter().take(most).map(|(_, key)| key).collect()
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Clients holding flows, and the most one holds.
    pub fn clients(&self) -> (usize, usize) {
        let mut inner = self.lock();
        let order = inner.load_order();
        (order.len(), order.last().map_or(0, |&(n, _, _)| n))
    }

    /// Removes the sessions idle for at least their timeout at `now_ms`.
    ///
    /// Walks each client's flows from the least recently used end and stops
    /// at the first one idle for less than `min_idle_ms` (the shortest
    /// timeout in use): everything after it was used later still, so
    /// nothing there can have expired. A sweep costs the clients, the
    /// expired sessions and those older than the shortest timeout, not the
    /// whole table. Clients left without flows are forgotten.
    pub fn take_idle(&self, now_ms: u64, min_idle_ms: u64) -> Vec<Entry> {
        let mut inner = self.lock();
        let mut expired = Vec::new();
        let ids: Vec<ClientId> = inner.clients.keys().copied().collect();
        for id in ids {
            let old = inner.load(id);
            let Some(client) = inner.clients.get_mut(&id) else {
                continue;
            };
            let mut keys = Vec::new();
            for (key, entry) in client.flows.iter().rev() {
                let idle = entry.session.idle_for(now_ms);
                if idle >= entry.session.idle_ms() {
                    keys.push(*key);
                } else if idle < min_idle_ms {
                    break;
                }
            }
            inner.take_keys(id, old, &keys, &mut expired);
        }
        expired
    }

    /// Takes out every flow `ends` says must end (a reload's new drop
    /// rules); clients left without flows are forgotten. Walks the whole
    /// table, once per reload.
    pub fn take_where(&self, mut ends: impl FnMut(&FlowKey) -> bool) -> Vec<Entry> {
        let mut inner = self.lock();
        let mut ended = Vec::new();
        let ids: Vec<ClientId> = inner.clients.keys().copied().collect();
        for id in ids {
            let old = inner.load(id);
            let Some(client) = inner.clients.get_mut(&id) else {
                continue;
            };
            let keys: Vec<FlowKey> = client.flows.iter().map(|(k, _)| *k).filter(|k| ends(k)).collect();
            inner.take_keys(id, old, &keys, &mut ended);
        }
        ended
    }

    /// New limits; when the capacity or quota shrank, the flows beyond them
    /// are returned (heaviest clients first).
    pub fn set_limits(&self, limits: Limits) -> Vec<Entry> {
        let mut inner = self.lock();
        inner.limits = limits;
        let mut ended = Vec::new();
        while inner
            .load_order()
            .last()
            .is_some_and(|&(n, _, _)| n > limits.per_client)
        {
            match inner.pop_heaviest() {
                Some(e) => ended.push(e),
                None => break,
            }
        }
        while inner.len > limits.capacity {
            match inner.pop_heaviest() {
                Some(e) => ended.push(e),
                None => break,
            }
        }
        ended
    }

    /// Ends every session; returns how many there were.
    pub fn clear(&self) -> usize {
        let drained: Vec<Client> = {
            let mut inner = self.lock();
            inner.len = 0;
            inner.by_load.clear();
            inner.by_fds.clear();
            inner.clients.drain().map(|(_, c)| c).collect()
        };
        drained.iter().map(|c| c.flows.len()).sum()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

/// Orders `flows` (each with the second it was filed) in rounds: every
/// source address's longest-filed flow, then every one's second, and so
/// on; within a round the longest-filed first (see
/// [`SessionTable::established`]).
fn by_address_rounds(flows: &mut [(u32, FlowKey)]) {
    flows.sort_by_key(|&(filed, key)| (key.client.ip(), filed));
    let mut ranked: Vec<(usize, u32, FlowKey)> = Vec::with_capacity(flows.len());
    let (mut rank, mut prev) = (0, None);
    for &(filed, key) in flows.iter() {
        rank = if prev == Some(key.client.ip()) { rank + 1 } else { 0 };
        prev = Some(key.client.ip());
        ranked.push((rank, filed, key));
    }
    ranked.sort_by_key(|&(rank, filed, _)| (rank, filed));
    for (slot, (_, filed, key)) in flows.iter_mut().zip(ranked) {
        *slot = (filed, key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(client: &str, port: u16) -> FlowKey {
        FlowKey {
            client: std::net::SocketAddr::new(client.parse().unwrap(), port),
            target: Target::Destination(([198, 51, 100, 7], 7000).into()),
        }
    }

    fn key(port: u16) -> FlowKey {
        key_of("192.0.2.10", port)
    }

    fn entry(k: FlowKey) -> Entry {
        Entry::new(Arc::new(Session::detached(k, 60_000, 0)), None)
    }

    fn limits(capacity: usize, per_client: usize) -> Limits {
        Limits {
            capacity,
            per_client,
            new_flows_per_sec: 0,
        }
    }

    fn add(t: &SessionTable, k: FlowKey) -> Vec<Evicted> {
        if let Some(e) = t.make_room(k.owner(), Unfiled::default(), 0) {
            return vec![e];
        }
        t.insert(k, entry(k), 0).map(|(_, ev)| ev).unwrap_or_default()
    }

    /// What a hold lets through: a client's flows with one destination,
    /// filed before a time and active since another, longest-filed first.
    #[tokio::test]
    async fn a_clients_established_flows_were_filed_early_and_active_lately() {
        let t = SessionTable::new(limits(16, 16));
        let put = |k: FlowKey, filed_ms: u64, active_ms: u64| {
            let session = Arc::new(Session::detached(k, 60_000, active_ms));
            t.insert(k, Entry::new(session, None), filed_ms).unwrap();
            k
        };
        let old = put(key(1), 1_000, 9_500);
        put(key(2), 500, 2_000); // idle since
        let older = put(key(3), 200, 9_800);
        put(key(4), 8_200, 9_900); // filed too late
        let cone = FlowKey {
            client: key(5).client,
            target: Target::Cone(1),
        };
        put(cone, 100, 9_900); // no destination to match
        put(key_of("192.0.2.11", 1), 100, 9_900); // another client
        let client = key(1).owner();
        assert_eq!(t.established(client, 8_000, 9_000, 8), [older, old]);
        assert_eq!(t.established(client, 8_000, 9_000, 1), [older]);
        assert_eq!(t.established(client, 1_000, 9_000, 8), [older]);
        assert!(t.established(key_of("192.0.2.12", 1).owner(), 8_000, 0, 8).is_empty());
    }

    /// An IPv6 client is a /64, most often the whole LAN: one device's old
    /// flows do not take every place from another device's younger one.
    /// Longest-filed first alone (as before) fails this.
    #[tokio::test]
    async fn a_hold_lets_through_each_addresss_oldest_flows_first() {
        let t = SessionTable::new(limits(32, 32));
        let put = |k: FlowKey, filed_ms: u64| {
            let session = Arc::new(Session::detached(k, 60_000, 9_900));
            t.insert(k, Entry::new(session, None), filed_ms).unwrap();
            k
        };
        let neighbour: Vec<FlowKey> = (0..8)
            .map(|p| put(key_of("2001:db8:1::99", 50_000 + p), 1_000))
            .collect();
        let device = put(key_of("2001:db8:1::11", 40_000), 4_000);
        let second = put(key_of("2001:db8:1::11", 40_001), 5_000);
        let third = put(key_of("2001:db8:1::12", 40_000), 6_000);
        let chosen = t.established(device.owner(), 8_000, 9_000, 8);
        assert_eq!(chosen.len(), 8);
        // Each address's oldest, the longest-filed first (the neighbour's
        // were all filed in one second: any of them); then the second
        // round, and the neighbour's on.
        let mine = |k: &FlowKey| neighbour.contains(k);
        assert!(mine(&chosen[0]), "{chosen:?}");
        assert_eq!(chosen[1..3], [device, third]);
        assert!(mine(&chosen[3]), "{chosen:?}");
        assert_eq!(chosen[4], second);
        assert!(chosen[5..].iter().all(mine), "{chosen:?}");
    }

    #[tokio::test]
    async fn evicts_the_least_recently_used_of_a_client() {
        let t = SessionTable::new(limits(3, 3));
        for p in 1..=3 {
            assert!(add(&t, key(p)).is_empty());
        }
        assert!(t.get(&key(1)).is_some()); // 2 is now the oldest
        let ev = add(&t, key(4));
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0].entry.session.key, key(2));
        assert!(t.insert(key(4), entry(key(4)), 0).is_ok());
        assert!(t.get(&key(2)).is_none());
        assert_eq!(t.len(), 3);
    }

    /// A client's oldest flows are pooled (no descriptor of their own), its
    /// newer ones hold one each: eviction for a descriptor passes over the
    /// pooled ones, takes its oldest holder, and gives the permit back at
    /// once; the client holding the most descriptors pays, not the one
    /// holding the most flows.
    #[tokio::test]
    async fn eviction_for_a_descriptor_takes_a_flow_that_holds_one() {
        let share = crate::relay::budget::FdShare::new(8);
        let t = SessionTable::new(limits(100, 100));
        let holder = |k: FlowKey| {
            let permit = share.try_take().unwrap();
            Entry::with_permits(Arc::new(Session::detached(k, 60_000, 0)), None, vec![permit])
        };
        let heavy = "192.0.2.66";
        for p in 1..=10 {
            add(&t, key_of(heavy, p)); // pooled-like: no descriptor
        }
        for p in 11..=13 {
            let k = key_of(heavy, p);
            t.insert(k, holder(k), 0).unwrap();
        }
        // A lighter client in flows that holds more descriptors.
        for p in 1..=4 {
            let k = key_of("192.0.2.20", p);
            t.insert(k, holder(k), 0).unwrap();
        }
        assert_eq!(share.held(), 7);
        let ev = t.evict_for_descriptor().unwrap();
        assert_eq!(ev.reason, Eviction::FdBudget);
        assert_eq!(ev.entry.session.key, key_of("192.0.2.20", 1));
        drop(ev);
        assert_eq!(share.held(), 6, "the permit is back with the entry");
        // Now 3 each: ties go to either; both hold descriptors.
        let ev = t.evict_for_descriptor().unwrap();
        assert!(ev.entry.holds_fd);
        drop(ev);
        let ev = t.evict_for_descriptor().unwrap();
        assert!(ev.entry.holds_fd);
        drop(ev);
        for _ in 0..4 {
            assert!(t.evict_for_descriptor().unwrap().entry.holds_fd);
        }
        assert_eq!(share.held(), 0);
        assert_eq!(t.len(), 10, "the pooled flows stayed while any held one");
        // None left holding one: the heaviest's oldest, as before.
        assert_eq!(t.evict_for_descriptor().unwrap().entry.session.key, key_of(heavy, 1));
        // The counts follow every way out of the table.
        let k = key_of(heavy, 40);
        t.insert(k, holder(k), 0).unwrap();
        drop(t.remove(&t.get(&k).unwrap()));
        assert!(t.lock().by_fds.is_empty());
        t.insert(k, holder(k), 0).unwrap();
        drop(t.take_where(|_| true));
        assert!(t.lock().by_fds.is_empty());
        assert_eq!(share.held(), 0);
    }

    /// The descriptor holder evicted is the least recently *used*, not the
    /// first opened: a flow in use (looked up, admitted again, promoted)
    /// moves behind the idle one, as it does among all flows. And the
    /// recency order of holders empties with the flows, whichever way they
    /// leave.
    #[tokio::test]
    async fn eviction_for_a_descriptor_takes_the_least_recently_used_holder() {
        let share = crate::relay::budget::FdShare::new(8);
        let t = SessionTable::new(limits(100, 100));
        let holder = |k: FlowKey| {
            let permit = share.try_take().unwrap();
            Entry::with_permits(Arc::new(Session::detached(k, 60_000, 0)), None, vec![permit])
        };
        let c = "192.0.2.66";
        for p in 1..=20 {
            add(&t, key_of(c, p));
        }
        for p in 21..=24 {
            let k = key_of(c, p);
            t.insert(k, holder(k), 0).unwrap();
        }
        // 21 used by a lookup, 22 admitted again, 23 promoted by the relay.
        assert!(t.get(&key_of(c, 21)).is_some());
        assert!(matches!(t.get_or_admit(&key_of(c, 22), 0, || true), Admission::Open(_)));
        t.promote(&t.get(&key_of(c, 23)).unwrap());
        let order: Vec<FlowKey> = (0..4)
            .map(|_| t.evict_for_descriptor().unwrap().entry.session.key)
            .collect();
        assert_eq!(order, [24, 21, 22, 23].map(|p| key_of(c, p)));
        assert_eq!(t.len(), 20);
        assert!(t.lock().clients.values().all(|cl| cl.fd_order.is_empty()));
        let k = key_of(c, 30);
        t.insert(k, holder(k), 0).unwrap();
        drop(t.take_where(|_| true));
        assert!(t.lock().clients.values().all(|cl| cl.fd_order.is_empty()));
        assert_eq!(share.held(), 0);
    }

    #[tokio::test]
    async fn a_full_table_takes_from_the_heaviest_client() {
        let t = SessionTable::new(limits(6, 6));
        for p in 1..=5 {
            add(&t, key_of("192.0.2.66", p));
        }
        add(&t, key_of("192.0.2.20", 1)); // a quiet client, the oldest of all but one
        // Full: the newcomer's slot comes from the flooder, not the quiet one.
        let ev = add(&t, key_of("192.0.2.21", 1));
        assert_eq!(ev[0].reason, Eviction::TableFull);
        assert_eq!(ev[0].entry.session.key, key_of("192.0.2.66", 1));
        t.insert(key_of("192.0.2.21", 1), entry(key_of("192.0.2.21", 1)), 0)
            .unwrap();
        assert!(t.get(&key_of("192.0.2.20", 1)).is_some());
        assert_eq!(t.clients(), (3, 4));
    }

    /// A flow of `k` last active at `at_ms`, filed at `now_ms`.
    fn add_at(t: &SessionTable, k: FlowKey, at_ms: u64, now_ms: u64) -> Vec<Evicted> {
        let entry = Entry::new(Arc::new(Session::detached(k, 60_000, at_ms)), None);
        t.insert(k, entry, now_ms).map(|(_, ev)| ev).unwrap_or_default()
    }

    /// Forged sources, one flow each, must not make an active device with
    /// two flows "the heaviest" and take its flows one by one: the table
    /// ends the forged flows, each as idle as the table is long, and not a
    /// flow that carried a datagram a moment ago.
    #[tokio::test]
    async fn a_full_table_spares_an_active_client_from_a_flood_of_one_flow_clients() {
        let t = SessionTable::new(limits(256, 256));
        let device = [key_of("192.0.2.2", 1), key_of("192.0.2.2", 2)];
        for k in device {
            add_at(&t, k, 0, 0);
        }
        // A forged flow a millisecond, from ascending addresses; the
        // device active every 2 ms.
        for i in 0..2_000u16 {
            let now = 1 + u64::from(i);
            let forged = key_of(&format!("10.{}.{}.1", i / 256, i % 256), 1);
            for e in add_at(&t, forged, now, now) {
                assert_ne!(e.entry.session.key.owner(), device[0].owner(), "at {now} ms");
            }
            if now % 2 == 0 {
                for k in &device {
                    t.get(k).expect("the device's flow").touch(now);
                }
            }
        }
        assert_eq!(t.clients().1, 2);
        // Idle long enough, its two flows weigh more than any forged flow
        // opened since: a table that full must end something.
        let ev = add_at(&t, key_of("10.200.0.1", 1), 10_000, 10_000);
        assert_eq!(ev[0].entry.session.key.owner(), device[0].owner());
    }

    #[tokio::test]
    async fn a_client_at_its_quota_recycles_its_own_flows() {
        let t = SessionTable::new(limits(100, 2));
        add(&t, key_of("2001:db8:1::10", 1));
        add(&t, key_of("2001:db8:1::10", 2));
        // Another address in the same /64 is the same client.
        let ev = add(&t, key_of("2001:db8:1::beef", 3));
        assert_eq!(ev[0].reason, Eviction::ClientQuota);
        assert_eq!(ev[0].entry.session.key.client.port(), 1);
    }

    #[tokio::test]
    async fn room_is_made_for_flows_opened_but_not_yet_filed() {
        let t = SessionTable::new(limits(4, 3));
        for p in 1..=3 {
            add(&t, key_of("192.0.2.66", p));
        }
        // One slot left: enough for this flow alone, not for it and one
        // opened before it and not yet filed.
        let (heavy, quiet) = (key_of("192.0.2.66", 9).owner(), key_of("192.0.2.20", 1).owner());
        assert!(t.make_room(quiet, Unfiled::default(), 0).is_none());
        let ev = t.make_room(quiet, Unfiled { all: 1, own: 0 }, 0).expect("evicted");
        assert_eq!(ev.reason, Eviction::TableFull);
        assert_eq!(ev.entry.session.key, key_of("192.0.2.66", 1));
        assert_eq!(t.len(), 2);
        // Under its quota with two flows, at it with one more unfiled.
        assert!(t.make_room(heavy, Unfiled { all: 1, own: 0 }, 0).is_none());
        let ev = t.make_room(heavy, Unfiled { all: 1, own: 1 }, 0).expect("evicted");
        assert_eq!(ev.reason, Eviction::ClientQuota);
        assert_eq!(ev.entry.session.key, key_of("192.0.2.66", 2));
    }

    #[tokio::test]
    async fn promote_and_remove_respect_the_session() {
        let t = SessionTable::new(limits(2, 2));
        let (old, _) = t.insert(key(1), entry(key(1)), 0).unwrap();
        assert!(t.remove(&old).is_some());
        let (new, _) = t.insert(key(1), entry(key(1)), 0).unwrap();
        // A stale session cannot remove the flow's newer session.
        assert!(t.remove(&old).is_none());
        assert!(Arc::ptr_eq(&t.get(&key(1)).unwrap(), &new));
        // The same flow opened twice: the first stays.
        assert!(t.insert(key(1), entry(key(1)), 0).is_err());
        t.insert(key(2), entry(key(2)), 0).unwrap();
        t.promote(&new); // 2 becomes the oldest
        let ev = add(&t, key(3));
        assert_eq!(ev[0].entry.session.key, key(2));
    }

    #[tokio::test]
    async fn idle_sessions_are_taken_whatever_their_own_timeout() {
        let t = SessionTable::new(limits(10, 10));
        let put = |port: u16, idle_ms: u64, last: u64| {
            let k = key(port);
            t.insert(k, Entry::new(Arc::new(Session::detached(k, idle_ms, last)), None), 0)
                .unwrap();
        };
        put(1, 1_000, 0); // idle 10 s, timeout 1 s: expired
        put(2, 60_000, 0); // idle 10 s, timeout 60 s: kept
        put(3, 1_000, 5_000); // idle 5 s, timeout 1 s: expired, behind a kept one
        put(4, 1_000, 9_800); // idle 0.2 s: kept; the walk stops here
        let taken: Vec<u16> = t
            .take_idle(10_000, 1_000)
            .iter()
            .map(|e| e.session.key.client.port())
            .collect();
        assert_eq!(taken, vec![1, 3]);
        assert_eq!(t.len(), 2);
        assert_eq!(t.clients(), (1, 2));
    }

    /// Every flow pays for its entry and its key in the LRU's node (with
    /// two links, 104 bytes: a 112-byte allocation), so a byte more here is
    /// a megabyte more at a million flows, and 8 more take the node up a
    /// size class (fef2662 did: 32 bytes, 28 MB of RSS at a million flows).
    /// Growing either must be a decision, not a side effect.
    #[test]
    fn entry_sizes_are_pinned() {
        assert_eq!(std::mem::size_of::<Entry>(), 24);
        assert_eq!(std::mem::size_of::<FlowKey>(), 64);
    }

    /// A flow with a task and permits of its own gives them back with its
    /// entry; one without holds nothing behind the entry.
    #[tokio::test]
    async fn only_a_flow_with_a_task_or_permits_holds_them_behind_its_entry() {
        let share = crate::relay::budget::FdShare::new(4);
        let session = |p| Arc::new(Session::detached(key(p), 60_000, 0));
        let token = tokio_util::sync::CancellationToken::new();
        let permits = vec![share.try_take().unwrap(), share.try_take().unwrap()];
        let socks = Entry::with_permits(session(1), Some(token.clone().drop_guard()), permits);
        assert!(socks.holds_fd && socks._own.is_some());
        let pooled = entry(key(2));
        assert!(!pooled.holds_fd && pooled._own.is_none());
        assert_eq!(share.held(), 2);
        drop(socks);
        assert_eq!(share.held(), 0, "both permits back with the entry");
        assert!(token.is_cancelled(), "and its task told to end");
    }

    #[tokio::test]
    async fn dropping_an_entry_ends_its_task() {
        let t = SessionTable::new(limits(1, 1));
        let token = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let token = token.clone();
            async move { token.cancelled().await }
        });
        t.insert(
            key(1),
            Entry::new(Arc::new(Session::detached(key(1), 60_000, 0)), Some(token.drop_guard())),
            0,
        )
        .unwrap();
        assert_eq!(t.clear(), 1);
        tokio::time::timeout(std::time::Duration::from_secs(1), task)
            .await
            .expect("the task ended")
            .unwrap();
    }

    #[tokio::test]
    async fn take_where_ends_the_flows_it_names_and_keeps_the_count() {
        let t = SessionTable::new(limits(10, 10));
        for port in [1, 2, 3] {
            add(&t, key(port));
        }
        add(&t, key_of("192.0.2.20", 1));
        let ended = t.take_where(|k| k.client.port() == 2 || k.client.ip().to_string() == "192.0.2.20");
        assert_eq!(ended.len(), 2);
        assert_eq!(t.len(), 2);
        assert!(t.get(&key(2)).is_none());
        assert!(t.get(&key(1)).is_some() && t.get(&key(3)).is_some());
        assert_eq!(t.clients(), (1, 2));
    }

    #[tokio::test]
    async fn shrinking_limits_end_the_heaviest_first() {
        let t = SessionTable::new(limits(10, 10));
        for p in 1..=6 {
            add(&t, key_of("192.0.2.66", p));
        }
        add(&t, key_of("192.0.2.20", 1));
        let ended = t.set_limits(limits(4, 4));
        assert_eq!(ended.len(), 3);
        assert!(
            ended
                .iter()
                .all(|e| e.session.key.client.ip().to_string() == "192.0.2.66")
        );
        assert_eq!(t.len(), 4);
    }
}
