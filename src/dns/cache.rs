//! The answer cache: (upstream group, name, type, class) → upstream answer.
//!
//! TTLs are honoured and counted down: an answer cached 40 s ago with TTL
//! 300 is served with TTL 260. Negative answers (NXDOMAIN, or NOERROR with
//! no data) are cached for the SOA's negative TTL, per RFC 2308, and not at
//! all without an SOA. `min_ttl`/`max_ttl` clamp positive lifetimes;
//! `negative_max_ttl` caps negative ones. The same clamps apply to answers
//! that are passed through without being cached ([`TtlPolicy::apply`]), so
//! a client never sees a TTL the cache would not have served.
//!
//! Keys hold the name in lowercase wire format, so `bank\.test` (one label)
//! and `bank.test` (two) are different entries, and the group by name, so
//! the cache can outlive a reload that renumbers the groups.
//!
//! The cache is bounded twice: by entries (`capacity`) and by an estimate
//! of the memory its records take (`max_bytes`), because one 60 KB TXT
//! answer weighs as much as a thousand A records.

use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use super::cache_lru::{Lru, SlotId};
use super::cache_owners::{Owners, SHARE_DIVISOR};
use super::cache_weight::record_bytes;
use super::clients::ClientKey;
use super::plain_name::Forms;
use super::rendered::Rendered;
use super::ttl_secs;
use crate::config::dns::CacheConfig;

/// A cache key: the upstream group's name (answers from different groups
/// never mix), the question's name in lowercase wire form
/// ([`super::names::wire_key`]), its type and its class.
///
/// Held packed, as the LRU compares keys ([`PACKED_HEAD`]'s layout), in one
/// shared allocation built once per miss: the look-up packs the key, and
/// the answer is stored under the same bytes, where the store packed them
/// a second time (about 240 instructions a miss, callgrind round 19). The
/// upstream group's single-flight map names the question by the same
/// allocation ([`CacheKey::packed`]). Two keys are equal exactly when
/// their parts are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheKey {
    packed: Arc<[u8]>,
}

impl CacheKey {
    /// The key of `name` (a wire-form name already lowercased, as
    /// [`super::names::wire_key`] writes it), `qtype` and `qclass` in
    /// `group`.
    pub fn new(group: &str, name: &[u8], qtype: RecordType, qclass: DNSClass) -> Self {
        let mut room = [0; PACKED_ON_STACK];
        let packed = match room.get_mut(..PACKED_HEAD + name.len() + group.len()) {
            Some(out) => {
                write_packed(out, group, name, qtype, qclass);
                Arc::from(&*out)
            }
            // A group's name too long for the stack: built on the heap.
            None => {
                let mut out = vec![0; PACKED_HEAD + name.len() + group.len()];
                write_packed(&mut out, group, name, qtype, qclass);
                Arc::from(out)
            }
        };
        CacheKey { packed }
    }

    /// The key of `name` (lowercased here), `qtype` and `qclass` in
    /// `group`: [`CacheKey::new`] with [`super::names::wire_key`] of
    /// `name`, without building that key apart first.
    pub fn of_name(group: &str, name: &Name, qtype: RecordType, qclass: DNSClass) -> Self {
        let mut room = [0; PACKED_ON_STACK];
        let written = room
            .get_mut(PACKED_HEAD..)
            .and_then(|out| super::names::write_wire_key(name, out));
        let len = match written {
            Some(len) => len,
            None => return Self::new(group, &super::names::wire_key(name), qtype, qclass),
        };
        let Some(out) = room.get_mut(..PACKED_HEAD + len + group.len()) else {
            return Self::new(group, &super::names::wire_key(name), qtype, qclass);
        };
        let (head, rest) = out.split_at_mut(PACKED_HEAD);
        let (name_out, group_out) = rest.split_at_mut(len);
        head.copy_from_slice(&packed_head(name_out, qtype, qclass));
        group_out.copy_from_slice(group.as_bytes());
        CacheKey {
            packed: Arc::from(&*out),
        }
    }

    /// The key a look-up packed on the stack ([`StackKey`]), owned: the
    /// same bytes, copied once.
    pub fn of_stack(key: &StackKey<'_>) -> Self {
        CacheKey {
            packed: Arc::from(key.packed),
        }
    }

    /// The key `packed` holds, if it is one (for the cache file): its
    /// name's length within it and its group's name in UTF-8.
    fn of_packed(packed: &[u8]) -> Option<Self> {
        let (head, rest) = packed.split_at_checked(PACKED_HEAD)?;
        let name_len = usize::from(u16::from_be_bytes([*head.get(4)?, *head.get(5)?]));
        let (_, group) = rest.split_at_checked(name_len)?;
        std::str::from_utf8(group).ok()?;
        Some(CacheKey {
            packed: Arc::from(packed),
        })
    }

    /// A 16-bit field of the head.
    fn field(&self, at: usize) -> u16 {
        match self.packed.get(at..at + 2) {
            Some(&[a, b]) => u16::from_be_bytes([a, b]),
            _ => 0,
        }
    }

    /// The question's name (lowercase wire form).
    pub fn name(&self) -> &[u8] {
        let len = usize::from(self.field(4));
        self.packed.get(PACKED_HEAD..PACKED_HEAD + len).unwrap_or(&[])
    }

    /// The upstream group's name.
    pub fn group(&self) -> &str {
        let len = usize::from(self.field(4));
        self.packed
            .get(PACKED_HEAD + len..)
            .and_then(|g| std::str::from_utf8(g).ok())
            .unwrap_or("")
    }

    pub fn qtype(&self) -> RecordType {
        RecordType::from(self.field(0))
    }

    pub fn qclass(&self) -> DNSClass {
        DNSClass::from(self.field(2))
    }

    /// The whole key as one byte string, equal exactly when the keys are
    /// (what the LRU holds, and what names the question in flight).
    pub fn packed(&self) -> &Arc<[u8]> {
        &self.packed
    }
}

/// What [`DnsCache::lookup`] found.
#[derive(Debug)]
pub enum Lookup {
    /// A live answer and its age in seconds.
    Live(Arc<Entry>, u32),
    /// An expired answer, still within the stale window: a miss may serve
    /// it if the upstream is slow (`dns.stale`).
    Stale,
    /// Nothing (or only an answer past the stale window, now removed).
    Absent,
}

/// Bytes before the name in a packed key. A key as the LRU holds it (and
/// [`CacheKey`] carries it) is its parts packed into one byte string,
/// `[qtype][qclass][name length]` (two bytes each, big-endian), the name,
/// then the group. Two keys are equal when their parts are (types by
/// their numbers; the name's length says where the group starts), and a
/// lookup hashes one string and compares one: hashing and comparing the
/// four parts one by one (through `dyn` calls, the group and the name
/// each with a `memcmp`, the types as enums) took about 250 of a cache
/// hit's 3,500 instructions (callgrind).
const PACKED_HEAD: usize = 6;

/// Packed keys up to this size are built on the stack for a cache hit's
/// lookup ([`StackKey`]): any name (at most 255 bytes) with a group name of
/// up to 64 bytes.
pub const PACKED_ON_STACK: usize = PACKED_HEAD + 255 + 64;

/// A key packed for a lookup ([`DnsCache::find_at`]) into the caller's
/// room of [`PACKED_ON_STACK`] bytes: what a cache hit looks up, built in one pass over the
/// query's name. Packed in place, not returned by value: moving the
/// room's 325 bytes cost a cache hit more than the packing.
pub struct StackKey<'r> {
    packed: &'r [u8],
}

impl<'r> StackKey<'r> {
    /// The key of `name` (the query's wire-form name, lowercased here),
    /// `qtype` and `qclass` in `group`, packed into `room`; `None` when
    /// it does not fit (a name over 255 bytes, or with its group's name
    /// over [`PACKED_ON_STACK`]; any name fits with a group name of up to
    /// 64). The tests' way to look up any name; the daemon's look-ups are
    /// built by [`StackKey::of_plain`].
    #[cfg(test)]
    pub fn lowercased(
        room: &'r mut [u8; PACKED_ON_STACK],
        group: &str,
        name: &[u8],
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Option<Self> {
        let len = PACKED_HEAD + name.len() + group.len();
        if name.len() > 255 {
            return None;
        }
        let out = room.get_mut(..len)?;
        write_packed(out, group, name, qtype, qclass);
        out.get_mut(PACKED_HEAD..PACKED_HEAD + name.len())?
            .make_ascii_lowercase();
        Some(StackKey { packed: out })
    }

    /// The key of a plain name already lowercased where it was read
    /// ([`Forms::lower`], in the pass that checked its shape), `qtype` and
    /// `qclass` in `group`, packed into `room`; `None` when the group's
    /// name does not fit with it. No second pass over the name: it is
    /// copied as it is.
    pub fn of_plain(
        room: &'r mut [u8; PACKED_ON_STACK],
        group: &str,
        forms: &Forms,
        qtype: RecordType,
        qclass: DNSClass,
    ) -> Option<Self> {
        let name = forms.lower();
        let out = room.get_mut(..PACKED_HEAD + name.len() + group.len())?;
        write_packed(out, group, name, qtype, qclass);
        Some(StackKey { packed: out })
    }

    /// The name as the key holds it (lowercase wire form).
    pub fn name(&self) -> &[u8] {
        let name_len = self
            .packed
            .get(4..PACKED_HEAD)
            .map_or(0, |l| usize::from(u16::from_be_bytes([l[0], l[1]])));
        self.packed.get(PACKED_HEAD..PACKED_HEAD + name_len).unwrap_or(&[])
    }
}

/// Writes the parts packed into `out`, which is exactly as long as they
/// need (`PACKED_HEAD`, the name, the group).
fn write_packed(out: &mut [u8], group: &str, name: &[u8], qtype: RecordType, qclass: DNSClass) {
    let (head_out, rest) = out.split_at_mut(PACKED_HEAD);
    head_out.copy_from_slice(&packed_head(name, qtype, qclass));
    let (name_out, group_out) = rest.split_at_mut(name.len());
    name_out.copy_from_slice(name);
    group_out.copy_from_slice(group.as_bytes());
}

/// The packed key's head: type, class and the name's length.
fn packed_head(name: &[u8], qtype: RecordType, qclass: DNSClass) -> [u8; PACKED_HEAD] {
    // A wire-form name is at most 255 bytes.
    let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX).to_be_bytes();
    let (qtype, qclass) = (u16::from(qtype).to_be_bytes(), u16::from(qclass).to_be_bytes());
    [qtype[0], qtype[1], qclass[0], qclass[1], name_len[0], name_len[1]]
}

/// Memory an entry costs beyond its records' wire size: the key, the
/// `Arc`, the LRU node and the per-record `Record` structs, and the slot
/// for its kept encoding.
const ENTRY_OVERHEAD: usize = 160 + std::mem::size_of::<Rendered>();

/// The most bytes an entry's kept encoding may take (answer and question
/// name): room for it is counted against `max_bytes` with the entry, so
/// the bound holds with every entry holding one. Larger answers (big TCP
/// ones) always take the full path.
const KEPT_MAX: usize = 1_536;

/// What an entry is counted for, and the room within that for its kept
/// encoding: at most the encoded answer's size (its records' sizes, which
/// include more than their compressed wire form, plus header, question
/// and OPT), and at most [`KEPT_MAX`].
fn entry_bytes(key: &CacheKey, records: usize) -> (usize, usize) {
    let room = (records + 2 * key.name().len() + 64).min(KEPT_MAX);
    // The packed key holds the group's name too (see [`PACKED_HEAD`]).
    (ENTRY_OVERHEAD + key.packed.len() + records + room, room)
}

/// An answer's RCODE and sections, as the cache takes them over.
#[derive(Debug)]
pub struct Records {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Records {
    /// The sections of `msg`, which is left without records.
    pub fn take(msg: &mut Message) -> Self {
        Records {
            rcode: msg.metadata.response_code,
            answers: std::mem::take(&mut msg.answers),
            authorities: std::mem::take(&mut msg.authorities),
            additionals: std::mem::take(&mut msg.additionals),
        }
    }
}

/// One cached answer.
#[derive(Debug)]
pub struct Entry {
    pub rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    stored: Instant,
    /// Seconds the entry is valid for, from `stored`.
    lifetime: u32,
    /// From when a popular entry is refreshed ahead of its expiry: with a
    /// tenth of its lifetime left ([`Entry::hit_wants_prefetch`]). Kept
    /// as an instant so that a hit compares two times instead of working
    /// out the entry's age in milliseconds again (about 90 instructions
    /// per cache hit, callgrind).
    /// `None` where that lies beyond the clock's range.
    prefetch_from: Option<Instant>,
    /// Estimated memory held, counted against `max_bytes`.
    bytes: usize,
    /// Of `bytes`, the room for a kept encoding (see [`Entry::rendered`]).
    pub kept_room: usize,
    /// Times served from the cache, for prefetch: counted until it
    /// reaches the prefetch threshold, after which a hit only reads it.
    hits: AtomicU32,
    /// Set once a prefetch has been started for this entry: one at a time.
    prefetching: AtomicBool,
    /// The last encoding of the entry as an answer, served again to the
    /// same question at the same age.
    pub rendered: Rendered,
    /// Whether the answers hold a CNAME or DNAME record, whose targets a
    /// hit checks against the block rules in force (see
    /// [`super::aliases`]); worked out once, so an answer without one
    /// (the common one) costs a hit one test of a flag.
    pub aliases: bool,
    /// The rules (an engine's [`Entry::clear_under`] generation) under
    /// which no alias target blocks this answer for any client, 0 when
    /// unknown: a hit of a chain under the same rules then skips the
    /// check (about 3,900 of a 6,000-instruction hit, callgrind, two
    /// targets and a 300,000-name list).
    alias_clear: AtomicU64,
    /// The client (bucket) whose miss stored it, charged for it
    /// ([`Owners`]); `None` for entries from the cache file.
    owner: Option<ClientKey>,
    /// Names this entry among those its owner stored (0: no owner).
    serial: u64,
}

impl Entry {
    /// An entry holding `records`, stored at `stored` for `lifetime`
    /// seconds and counted as `bytes`, of which `kept_room` for its kept
    /// encoding.
    fn new(records: Records, stored: Instant, lifetime: u32, bytes: usize, kept_room: usize) -> Self {
        Entry {
            aliases: super::aliases::has_alias(&records.answers),
            rcode: records.rcode,
            answers: records.answers,
            authorities: records.authorities,
            additionals: records.additionals,
            stored,
            lifetime,
            prefetch_from: prefetch_from(stored, lifetime),
            bytes,
            kept_room,
            hits: AtomicU32::new(0),
            prefetching: AtomicBool::new(false),
            rendered: Rendered::default(),
            alias_clear: AtomicU64::new(0),
            owner: None,
            serial: 0,
        }
    }

    /// Whether the rules of `generation` (never 0) were found to block
    /// no alias target of this answer, for any client.
    pub fn clear_under(&self, generation: u64) -> bool {
        self.alias_clear.load(Ordering::Relaxed) == generation
    }

    /// Records that the rules of `generation` block no alias target of
    /// this answer, for any client.
    pub fn mark_clear(&self, generation: u64) {
        self.alias_clear.store(generation, Ordering::Relaxed);
    }

    /// Counts a hit and says whether the entry should now be refreshed in
    /// the background: asked at least `min_hits` times, with at most 10 %
    /// of its lifetime left, and no refresh started yet.
    ///
    /// Once an entry has had `min_hits` hits, a hit only reads the count:
    /// nothing reads it but this comparison, and a read leaves the cache
    /// line clean where an atomic add would write it on every hit.
    pub fn hit_wants_prefetch(&self, min_hits: u32, now: Instant) -> bool {
        if min_hits == 0 {
            return false;
        }
        if self.hits.load(Ordering::Relaxed) < min_hits {
            let hits = self.hits.fetch_add(1, Ordering::Relaxed).saturating_add(1);
            if hits < min_hits {
                return false;
            }
        }
        self.prefetch_from.is_some_and(|due| now >= due) && !self.prefetching.swap(true, Ordering::Relaxed)
    }

    /// The entry as a response message (records with their stored TTLs),
    /// its lifetime and when it was stored, for the cache file.
    pub(super) fn to_message(&self) -> (Message, u32, Instant) {
        let mut m = Message::new(
            0,
            hickory_proto::op::MessageType::Response,
            hickory_proto::op::OpCode::Query,
        );
        m.metadata.response_code = self.rcode;
        m.answers = self.answers.clone();
        m.authorities = self.authorities.clone();
        m.additionals = self.additionals.clone();
        (m, self.lifetime, self.stored)
    }

    /// The answer section as stored.
    pub fn answers(&self) -> &[Record] {
        &self.answers
    }

    /// Copies the records into `msg` with TTLs reduced by `age` seconds.
    pub fn fill(&self, msg: &mut Message, age: u32) {
        let aged = |r: &Record| {
            let mut r = r.clone();
            r.ttl = r.ttl.saturating_sub(age);
            r
        };
        msg.metadata.response_code = self.rcode;
        msg.answers = self.answers.iter().map(aged).collect();
        msg.authorities = self.authorities.iter().map(aged).collect();
        msg.additionals = self.additionals.iter().map(aged).collect();
    }

    /// Copies the records into `msg` for a stale answer: every TTL is
    /// `ttl` (RFC 8767 recommends 30 s).
    pub fn fill_stale(&self, msg: &mut Message, ttl: u32) {
        let stale = |r: &Record| {
            let mut r = r.clone();
            r.ttl = ttl;
            r
        };
        msg.metadata.response_code = self.rcode;
        msg.answers = self.answers.iter().map(stale).collect();
        msg.authorities = self.authorities.iter().map(stale).collect();
        msg.additionals = self.additionals.iter().map(stale).collect();
    }
}

/// When an entry stored at `stored` for `lifetime` seconds has a tenth of
/// its lifetime left, to the millisecond: a hit at `now` is due for a
/// refresh when `left_ms * 10 <= lifetime_ms` with `left_ms` the lifetime
/// less the whole milliseconds elapsed, which holds exactly when at least
/// nine tenths of `lifetime_ms` (a whole number of milliseconds) have
/// elapsed.
fn prefetch_from(stored: Instant, lifetime: u32) -> Option<Instant> {
    stored.checked_add(std::time::Duration::from_millis(u64::from(lifetime) * 900))
}

/// The TTL clamps, applied to every forwarded answer.
#[derive(Debug, Clone, Copy)]
pub struct TtlPolicy {
    min_ttl: u32,
    max_ttl: u32,
    negative_max_ttl: u32,
}

impl TtlPolicy {
    pub fn new(config: &CacheConfig) -> Self {
        let max_ttl = ttl_secs(config.max_ttl).max(1);
        TtlPolicy {
            min_ttl: ttl_secs(config.min_ttl).min(max_ttl),
            max_ttl,
            negative_max_ttl: ttl_secs(config.negative_max_ttl).min(max_ttl),
        }
    }

    /// A positive answer's TTL within `[min_ttl, max_ttl]`, once read
    /// ([`received`]).
    pub fn clamp(&self, ttl: u32) -> u32 {
        received(ttl).clamp(self.min_ttl, self.max_ttl)
    }

    /// Rewrites every TTL in `msg` within the configured bounds and returns
    /// how long the answer may be cached (`None`: not cacheable).
    ///
    /// - A positive answer: each TTL clamped to `[min_ttl, max_ttl]`; it
    ///   lives as long as its shortest record.
    /// - A negative answer with an SOA: every record gets the RFC 2308
    ///   negative TTL (the SOA's TTL, bounded by its MINIMUM field and by
    ///   `negative_max_ttl`).
    /// - Anything else (errors, truncated answers, negative answers without
    ///   SOA) is not cached, but its TTLs are still capped by `max_ttl`.
    pub fn apply(&self, msg: &mut Message) -> Option<u32> {
        let rcode = msg.metadata.response_code;
        let positive = rcode == ResponseCode::NoError && !msg.answers.is_empty();
        let negative = rcode == ResponseCode::NXDomain || (rcode == ResponseCode::NoError && msg.answers.is_empty());
        let lifetime = if positive {
            for r in msg
                .answers
                .iter_mut()
                .chain(&mut msg.authorities)
                .chain(&mut msg.additionals)
            {
                r.ttl = self.clamp(r.ttl);
            }
            msg.answers.iter().map(|r| r.ttl).min()
        } else if negative {
            let soa = msg.authorities.iter().find_map(|r| match &r.data {
                RData::SOA(soa) => Some(received(r.ttl).min(received(soa.minimum)).min(self.negative_max_ttl)),
                _ => None,
            });
            let cap = soa.unwrap_or(self.negative_max_ttl);
            for r in msg
                .answers
                .iter_mut()
                .chain(&mut msg.authorities)
                .chain(&mut msg.additionals)
            {
                r.ttl = match soa {
                    Some(l) => l,
                    None => received(r.ttl).min(cap),
                };
            }
            soa
        } else {
            None
        };
        if !positive && !negative {
            for r in msg
                .answers
                .iter_mut()
                .chain(&mut msg.authorities)
                .chain(&mut msg.additionals)
            {
                r.ttl = received(r.ttl).min(self.max_ttl);
            }
        }
        lifetime.filter(|&l| l > 0 && !msg.metadata.truncation)
    }
}

/// A TTL as received: one with its top bit set is read as zero (RFC 2181,
/// section 8), not as a very long time; clamped to `max_ttl` instead, an
/// answer its server meant not to be kept (or a broken one) would be
/// cached for a day by default.
fn received(ttl: u32) -> u32 {
    if ttl & 0x8000_0000 == 0 { ttl } else { 0 }
}

/// The most entries of a cache of `capacity` kept in its window
/// ([`super::cache_lru`]): about 1 %, as in Caffeine, and at least one,
/// so that a new answer is always kept at once. Small, because the window
/// takes any name unguarded: a flood of forged names churns only it.
fn window_max(capacity: usize) -> NonZeroUsize {
    NonZeroUsize::new(capacity / 100).unwrap_or(NonZeroUsize::MIN)
}

/// The most entries of a cache of `capacity` kept in its protected
/// segment ([`super::cache_lru`]): four fifths of what the window leaves
/// (the main space), so that a fifth at least is probation, where answers
/// out of the window wait to be asked again (and one-hit floods churn).
/// Window and main space together are exactly `capacity`.
fn protected_max(capacity: usize) -> usize {
    capacity / 5 * 4
}

/// The LRU of a cache of `capacity`: window, segments and frequency guard.
fn new_lru(capacity: usize) -> Lru<Arc<Entry>> {
    Lru::with_sketch(protected_max(capacity), window_max(capacity), capacity)
}

/// The LRU, the memory it holds and who holds it, under one lock.
#[derive(Debug)]
struct Store {
    lru: Lru<Arc<Entry>>,
    bytes: usize,
    owners: Owners,
}

impl Store {
    fn remove(&mut self, key: &[u8]) {
        if let Some(e) = self.lru.pop(key) {
            self.forget(&e);
        }
    }

    /// `e` has left the LRU: its bytes and its owner's charge go.
    fn forget(&mut self, e: &Entry) {
        self.bytes = self.bytes.saturating_sub(e.bytes);
        if let Some(owner) = e.owner {
            self.owners.uncharge(owner, e.bytes);
        }
    }

    /// Evicts the oldest entry `owner` stored other than `keep`, if it
    /// holds more than its share of `config`'s bounds; whether it did.
    fn evict_own(&mut self, config: &CacheConfig, owner: ClientKey, keep: u64) -> bool {
        let (max_entries, max_bytes) = (
            (config.capacity / SHARE_DIVISOR).max(1),
            config.max_bytes / SHARE_DIVISOR,
        );
        if !self.owners.over_share(owner, max_entries, max_bytes) {
            return false;
        }
        let lru = &self.lru;
        let is_live = |slot: SlotId, serial: u64| lru.value_at(slot).is_some_and(|e| e.serial == serial);
        match self.owners.take_oldest(owner, keep, is_live) {
            Some(slot) => {
                if let Some(e) = self.lru.pop_at(slot) {
                    self.forget(&e);
                }
                true
            }
            None => false,
        }
    }
}

#[derive(Debug)]
pub struct DnsCache {
    /// The settings it was built with: a reload that keeps them keeps the cache.
    config: CacheConfig,
    store: Option<Mutex<Store>>,
    policy: TtlPolicy,
    /// Seconds an entry is kept past its expiry to be served stale
    /// (`dns.stale.max_age`; 0 when serve-stale is off).
    stale_window: u32,
}

impl DnsCache {
    pub fn new(config: &CacheConfig) -> Self {
        Self::with_stale_window(config, 0)
    }

    /// A cache that keeps expired entries `stale_window` seconds longer,
    /// for [`DnsCache::get_stale`].
    pub fn with_stale_window(config: &CacheConfig, stale_window: u32) -> Self {
        let enabled = config.capacity > 0 && config.max_bytes > 0;
        DnsCache {
            config: config.clone(),
            store: enabled.then(|| {
                Mutex::new(Store {
                    lru: new_lru(config.capacity),
                    bytes: 0,
                    owners: Owners::default(),
                })
            }),
            policy: TtlPolicy::new(config),
            stale_window,
        }
    }

    /// A cache whose frequency guard hashes with `seed`
    /// ([`Lru::with_sketch_seeded`]): the same estimates on every run.
    #[cfg(test)]
    fn with_seed(config: &CacheConfig, seed: u64) -> Self {
        DnsCache {
            store: Some(Mutex::new(Store {
                lru: Lru::with_sketch_seeded(
                    protected_max(config.capacity),
                    window_max(config.capacity),
                    config.capacity,
                    seed,
                ),
                bytes: 0,
                owners: Owners::default(),
            })),
            ..Self::new(config)
        }
    }

    /// Seconds expired entries are kept for serve-stale.
    pub fn stale_window(&self) -> u32 {
        self.stale_window
    }

    /// Whether `other` keeps answers the same way (a reload may share it).
    pub fn same_settings(&self, config: &CacheConfig, stale_window: u32) -> bool {
        &self.config == config && self.stale_window == stale_window
    }

    /// The settings this cache was built with.
    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    /// The TTL clamps in force.
    pub fn policy(&self) -> &TtlPolicy {
        &self.policy
    }

    /// A live entry and its age in seconds; expired entries are removed.
    pub fn get(&self, key: &CacheKey) -> Option<(Arc<Entry>, u32)> {
        self.get_at(key, Instant::now())
    }

    /// [`DnsCache::get`] at `now` (a caller that needs the time again
    /// for the same query reads the clock once).
    pub fn get_at(&self, key: &CacheKey, now: Instant) -> Option<(Arc<Entry>, u32)> {
        match self.lookup_at(key, now) {
            Lookup::Live(entry, age) => Some((entry, age)),
            Lookup::Stale | Lookup::Absent => None,
        }
    }

    /// [`DnsCache::get`], saying also whether a miss found an expired
    /// answer still kept for serve-stale.
    pub fn lookup(&self, key: &CacheKey) -> Lookup {
        self.lookup_at(key, Instant::now())
    }

    /// [`DnsCache::lookup`] at `now`. Entries past the stale window are
    /// removed.
    pub fn lookup_at(&self, key: &CacheKey, now: Instant) -> Lookup {
        self.lookup_packed_at(&key.packed, now)
    }

    /// [`DnsCache::lookup_at`] for a key packed on the stack (a cache
    /// hit's lookup, which allocates nothing).
    pub fn find_at(&self, key: &StackKey, now: Instant) -> Lookup {
        self.lookup_packed_at(key.packed, now)
    }

    fn lookup_packed_at(&self, key: &[u8], now: Instant) -> Lookup {
        let Some(mut store) = self.lock() else {
            return Lookup::Absent;
        };
        let Some(entry) = store.lru.get(key).cloned() else {
            return Lookup::Absent;
        };
        let age = u32::try_from(now.saturating_duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        if age < entry.lifetime {
            return Lookup::Live(entry, age);
        }
        if age >= entry.lifetime.saturating_add(self.stale_window) {
            store.remove(key);
            return Lookup::Absent;
        }
        Lookup::Stale
    }

    /// An entry that has expired, but less than the stale window ago.
    /// Only NOERROR and NXDOMAIN answers are ever cached, so a stale answer
    /// is never a SERVFAIL.
    pub fn get_stale(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        self.get_stale_at(key, Instant::now())
    }

    fn get_stale_at(&self, key: &CacheKey, now: Instant) -> Option<Arc<Entry>> {
        let mut store = self.lock()?;
        let entry = store.lru.get_again(&key.packed).cloned()?;
        let age = u32::try_from(now.saturating_duration_since(entry.stored).as_secs()).unwrap_or(u32::MAX);
        (age < entry.lifetime.saturating_add(self.stale_window)).then_some(entry)
    }

    /// Clamps the TTLs of `response` (see [`TtlPolicy::apply`]) and stores
    /// it if it is cacheable; returns whether it was. The caller sends the
    /// clamped `response`, so what the client gets on a miss is exactly
    /// what the cache serves later.
    pub fn insert(&self, key: CacheKey, response: &mut Message) -> bool {
        self.insert_at(key, response, Instant::now())
    }

    fn insert_at(&self, key: CacheKey, response: &mut Message, now: Instant) -> bool {
        let Some(lifetime) = self.policy.apply(response) else {
            return false;
        };
        let records = Records {
            rcode: response.metadata.response_code,
            answers: response.answers.clone(),
            authorities: response.authorities.clone(),
            additionals: response.additionals.clone(),
        };
        self.keep(key, lifetime, records, now, None)
    }

    /// Stores records that [`TtlPolicy::apply`] found cacheable for
    /// `lifetime` seconds, taking them over: for a caller that has
    /// already encoded its reply from them, so they are not copied.
    pub fn store(&self, key: CacheKey, lifetime: u32, records: Records, client: ClientKey) -> bool {
        self.store_at(key, lifetime, records, Instant::now(), client)
    }

    /// [`DnsCache::store`], stored at `now` (the caller's reading of the
    /// clock, when it has one of the same moment), charged to `client`
    /// (whose miss it answers: see [`super::cache_owners`]).
    pub fn store_at(&self, key: CacheKey, lifetime: u32, records: Records, now: Instant, client: ClientKey) -> bool {
        self.keep(key, lifetime, records, now, Some(client))
    }

    /// Stores `records`, charged to `owner` if any.
    fn keep(&self, key: CacheKey, lifetime: u32, records: Records, now: Instant, owner: Option<ClientKey>) -> bool {
        let Some(mut store) = self.lock() else {
            return false;
        };
        // Records that cannot be encoded cannot be served from the cache either.
        let Some(size) = records
            .answers
            .iter()
            .chain(&records.authorities)
            .chain(&records.additionals)
            .map(record_bytes)
            .sum::<Option<usize>>()
        else {
            return false;
        };
        let (bytes, kept_room) = entry_bytes(&key, size);
        let entry = Entry::new(records, now, lifetime, bytes, kept_room);
        Self::put(&self.config, &mut store, key, entry, owner)
    }

    /// Adds `entry` under the bounds, charged to `owner`; false when it
    /// alone is too big. When the bounds are passed, an owner over its
    /// share makes room from its own oldest entries, anyone else from the
    /// least recently used.
    fn put(config: &CacheConfig, store: &mut Store, key: CacheKey, mut entry: Entry, owner: Option<ClientKey>) -> bool {
        // Packed when the key was made (at the miss's look-up).
        let key: &[u8] = &key.packed;
        let bytes = entry.bytes;
        // An answer bigger than an eighth of the budget would flush a large
        // part of the cache for one name: serve it, do not keep it.
        if bytes > config.max_bytes / 8 {
            store.remove(key);
            return false;
        }
        let serial = match owner {
            Some(_) => store.owners.next_serial(),
            None => 0,
        };
        entry.owner = owner;
        entry.serial = serial;
        store.bytes += bytes;
        let (slot, old) = store.lru.push(key, Arc::new(entry));
        if let Some(old) = old {
            store.forget(&old);
        }
        if let Some(owner) = owner {
            let lru = &store.lru;
            let is_live = |slot: SlotId, serial: u64| lru.value_at(slot).is_some_and(|e| e.serial == serial);
            store.owners.charge(owner, slot, serial, bytes, is_live);
        }
        // A new answer is kept at once, in the window; the answer the
        // window pushes out enters the main space only if asked at least
        // as often lately as what it would push out there (see
        // [`super::cache_sketch`], [`Lru::pop_for`]).
        let mut candidate = store.lru.graduate();
        while store.lru.len() > config.capacity || store.bytes > config.max_bytes {
            if owner.is_some_and(|o| store.evict_own(config, o, serial)) {
                continue;
            }
            // Gone already (its owner's own eviction): nothing to weigh.
            candidate = candidate.filter(|&c| store.lru.value_at(c).is_some());
            let evicted = match candidate {
                Some(c) => store.lru.pop_for(c),
                None => store.lru.pop_lru(),
            };
            match evicted {
                Some(gone) => store.forget(&gone),
                None => break,
            }
        }
        // No slot is reused within the loop: the new entry's holds it
        // exactly while it is kept.
        store
            .lru
            .value_at(slot)
            .is_some_and(|e| serial == 0 || e.serial == serial)
    }

    pub fn len(&self) -> usize {
        self.lock().map_or(0, |s| s.lru.len())
    }

    /// Every entry still worth keeping at `now` (live or within the stale
    /// window), least recently used first, for the cache file.
    pub(super) fn snapshot(&self, now: Instant) -> Vec<(CacheKey, Arc<Entry>)> {
        let Some(store) = self.lock() else {
            return Vec::new();
        };
        store
            .lru
            .iter_oldest_first()
            .filter(|(_, e)| {
                let age = now.saturating_duration_since(e.stored).as_secs();
                age < u64::from(e.lifetime.saturating_add(self.stale_window))
            })
            .filter_map(|(k, e)| Some((CacheKey::of_packed(k)?, e.clone())))
            .collect()
    }

    /// Puts back an entry read from the cache file, `age` seconds old at
    /// `now`. Entries past their stale window are skipped; the bounds hold.
    pub(super) fn restore(&self, key: CacheKey, mut message: Message, lifetime: u32, age: u64, now: Instant) -> bool {
        // The file was written under the clamps of its day, or by someone
        // else: what it holds gets today's, as an upstream answer would.
        // Without this, entries saved under a `max_ttl` of a day kept being
        // served with TTLs of minutes to hours after a restart with
        // `max_ttl = "60s"`, and a hand-edited file set any TTL it liked.
        let Some(allowed) = self.policy.apply(&mut message) else {
            return false;
        };
        let lifetime = lifetime.min(allowed);
        if lifetime == 0 || age >= u64::from(lifetime.saturating_add(self.stale_window)) {
            return false;
        }
        let Some(stored) = now.checked_sub(std::time::Duration::from_secs(age)) else {
            return false;
        };
        let Some(records) = message
            .answers
            .iter()
            .chain(&message.authorities)
            .chain(&message.additionals)
            .map(record_bytes)
            .sum::<Option<usize>>()
        else {
            return false;
        };
        let Some(mut store) = self.lock() else {
            return false;
        };
        let (bytes, kept_room) = entry_bytes(&key, records);
        let entry = Entry::new(Records::take(&mut message), stored, lifetime, bytes, kept_room);
        Self::put(&self.config, &mut store, key, entry, None)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Estimated memory held by the entries, in bytes.
    pub fn bytes(&self) -> usize {
        self.lock().map_or(0, |s| s.bytes)
    }

    fn lock(&self) -> Option<MutexGuard<'_, Store>> {
        self.store
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::{A, SOA};
    use std::net::IpAddr;
    use std::str::FromStr;
    use std::time::Duration;

    fn cache(min: u64, max: u64, neg: u64) -> DnsCache {
        DnsCache::new(&CacheConfig {
            capacity: 10,
            min_ttl: Duration::from_secs(min),
            max_ttl: Duration::from_secs(max),
            negative_max_ttl: Duration::from_secs(neg),
            ..CacheConfig::default()
        })
    }

    fn key(name: &str) -> CacheKey {
        let name = crate::dns::names::wire_key(&Name::from_ascii(name).unwrap());
        CacheKey::new("default", &name, RecordType::A, DNSClass::IN)
    }

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

    /// The key packed afresh, part by part, as the LRU compares keys: the
    /// reference the carried forms are held to.
    fn packed_afresh(group: &str, name: &[u8], qtype: RecordType, qclass: DNSClass) -> Vec<u8> {
        let mut out = u16::from(qtype).to_be_bytes().to_vec();
        out.extend_from_slice(&u16::from(qclass).to_be_bytes());
        out.extend_from_slice(&u16::try_from(name.len()).unwrap().to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(group.as_bytes());
        out
    }

    /// A random wire-form name of 1 to 127 labels of 1 to 63 bytes (at most
    /// 255 bytes in all), its bytes plain (letters of either case, digits,
    /// `-`, `_`) or, with `hostile`, any value at all (dots, zeros, bytes
    /// over 127, length-like bytes).
    fn random_wire_name(rng: &mut crate::test_rng::XorShift, hostile: bool) -> Vec<u8> {
        const PLAIN: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_";
        let mut name = Vec::new();
        for _ in 0..1 + rng.below(8) {
            let most = if rng.below(4) == 0 { 63 } else { 12 };
            let len = 1 + rng.below(most);
            if name.len() + 1 + len + 1 > 255 {
                break;
            }
            name.push(len as u8);
            for _ in 0..len {
                name.push(if hostile {
                    rng.below(256) as u8
                } else {
                    PLAIN[rng.below(PLAIN.len())]
                });
            }
        }
        name.push(0);
        name
    }

    #[test]
    fn a_carried_key_is_the_key_packed_afresh_for_random_and_hostile_names() {
        let mut rng = crate::test_rng::XorShift::new(0x5eed_1919);
        let long_group = "g".repeat(300);
        let groups = [
            "default",
            "",
            "office",
            "Office",
            "\u{0}default",
            "ünïcödé",
            &long_group[..64],
            &long_group[..65],
            &long_group,
        ];
        let types = [
            (RecordType::A, DNSClass::IN),
            (RecordType::AAAA, DNSClass::IN),
            (RecordType::TXT, DNSClass::CH),
            (RecordType::Unknown(65_280), DNSClass::Unknown(65_000)),
        ];
        let mut forms = Forms::default();
        let mut plain_read = 0;
        for step in 0..20_000 {
            let hostile = step % 2 == 1;
            let wire = random_wire_name(&mut rng, hostile);
            let name = <Name as BinDecodable>::read(&mut BinDecoder::new(&wire)).unwrap();
            let lower = crate::dns::names::wire_key(&name);
            assert_eq!(*lower, *wire.to_ascii_lowercase(), "step {step}");
            let group = groups[rng.below(groups.len())];
            let (qtype, qclass) = types[rng.below(types.len())];
            let afresh = packed_afresh(group, &lower, qtype, qclass);
            // The full path's key, built from the `Name`.
            let of_name = CacheKey::of_name(group, &name, qtype, qclass);
            assert_eq!(&**of_name.packed(), &afresh[..], "step {step}: {wire:?} {group:?}");
            assert_eq!(of_name, CacheKey::new(group, &lower, qtype, qclass), "step {step}");
            // Its parts read back as they went in.
            assert_eq!(of_name.name(), &lower[..], "step {step}");
            assert_eq!(of_name.group(), group, "step {step}");
            assert_eq!((of_name.qtype(), of_name.qclass()), (qtype, qclass), "step {step}");
            assert_eq!(
                CacheKey::of_packed(of_name.packed()).as_ref(),
                Some(&of_name),
                "step {step}"
            );
            // The plain path's: the bytes its look-up packed, carried to the
            // store, are the same key.
            if forms.read(&wire).is_some() {
                let mut room = [0; PACKED_ON_STACK];
                if let Some(looked_up) = StackKey::of_plain(&mut room, group, &forms, qtype, qclass) {
                    plain_read += 1;
                    assert_eq!(
                        CacheKey::of_stack(&looked_up),
                        of_name,
                        "step {step}: {wire:?} {group:?}"
                    );
                }
            } else {
                assert!(hostile, "step {step}: a plain name refused: {wire:?}");
            }
        }
        // Most plain names (with a group that fits) took the plain path.
        assert!(plain_read > 8_000, "{plain_read}");
    }

    #[test]
    fn an_answer_stored_under_a_carried_key_is_found_by_its_question_only() {
        let c = DnsCache::new(&CacheConfig {
            capacity: 100,
            ..CacheConfig::default()
        });
        let mut forms = Forms::default();
        let now = Instant::now();
        let asked = b"\x03WwW\x07Example\x04TEST\x00";
        forms.read(asked).unwrap();
        let mut room = [0; PACKED_ON_STACK];
        let looked_up = StackKey::of_plain(&mut room, "default", &forms, RecordType::A, DNSClass::IN).unwrap();
        assert!(matches!(c.find_at(&looked_up, now), Lookup::Absent));
        let carried = CacheKey::of_stack(&looked_up);
        assert!(c.store_at(
            carried,
            300,
            Records::take(&mut answer(&[300])),
            now,
            ClientKey::by_prefix("192.0.2.7".parse().unwrap())
        ));
        // Found again by the same question in any case, on either path.
        let name = Name::from_ascii("www.example.test.").unwrap();
        assert!(
            c.get_at(&CacheKey::of_name("default", &name, RecordType::A, DNSClass::IN), now)
                .is_some()
        );
        forms.read(b"\x03www\x07example\x04test\x00").unwrap();
        let mut room = [0; PACKED_ON_STACK];
        let again = StackKey::of_plain(&mut room, "default", &forms, RecordType::A, DNSClass::IN).unwrap();
        assert!(matches!(c.find_at(&again, now), Lookup::Live(..)));
        // Never by a question that differs in any part.
        for (group, name, qtype, qclass) in [
            ("office", "www.example.test.", RecordType::A, DNSClass::IN),
            ("default", "www.example.test.", RecordType::AAAA, DNSClass::IN),
            ("default", "www.example.test.", RecordType::A, DNSClass::CH),
            ("default", "ww.example.test.", RecordType::A, DNSClass::IN),
            ("default", "www\\.example.test.", RecordType::A, DNSClass::IN),
            ("default", "www.example.test.x.", RecordType::A, DNSClass::IN),
        ] {
            let name = Name::from_ascii(name).unwrap();
            let other = CacheKey::of_name(group, &name, qtype, qclass);
            assert!(c.get_at(&other, now).is_none(), "{other:?}");
        }
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn a_plain_names_key_is_packed_as_the_name_lowercased_as_it_is_packed() {
        let c = cache(0, 3600, 3600);
        assert!(c.insert(key("www.example.test."), &mut answer(&[300])));
        let now = Instant::now();
        let mut forms = Forms::default();
        let long = [
            &[63u8][..],
            &[b'Q'; 63],
            &[63],
            &[b'r'; 63],
            &[63],
            &[b'S'; 63],
            &[61],
            &[b't'; 61],
            &[0],
        ]
        .concat();
        for (name, group) in [
            (&b"\x03WwW\x07Example\x04TEST\x00"[..], "default"),
            (b"\x03www\x07example\x04test\x00", "default"),
            (b"\x04_Srv\x04_tcp\x01x\x00", "office"),
            (b"\x00", ""),
            (&long, &"g".repeat(64)),
        ] {
            forms.read(name).expect("a plain name");
            let (mut ours, mut theirs) = ([0; PACKED_ON_STACK], [0; PACKED_ON_STACK]);
            let plain = StackKey::of_plain(&mut ours, group, &forms, RecordType::A, DNSClass::IN).unwrap();
            let lowered = StackKey::lowercased(&mut theirs, group, name, RecordType::A, DNSClass::IN).unwrap();
            assert_eq!(plain.packed, lowered.packed, "{name:?} {group}");
            let live = matches!(c.find_at(&plain, now), Lookup::Live(..));
            assert_eq!(
                live,
                name.eq_ignore_ascii_case(b"\x03www\x07example\x04test\x00") && group == "default"
            );
        }
        // A group name too long to go with the name: the full path's.
        forms.read(&long).unwrap();
        let group = "g".repeat(65);
        assert!(StackKey::of_plain(&mut [0; PACKED_ON_STACK], &group, &forms, RecordType::A, DNSClass::IN).is_none());
    }

    #[test]
    fn a_lookup_packed_on_the_stack_finds_what_an_owned_key_stored() {
        let c = cache(0, 3600, 3600);
        assert!(c.insert(key("a.example."), &mut answer(&[300])));
        let now = Instant::now();
        let found = |group, name: &[u8], qtype| {
            let mut room = [0; PACKED_ON_STACK];
            let lookup = StackKey::lowercased(&mut room, group, name, qtype, DNSClass::IN).unwrap();
            (
                lookup.name().to_vec(),
                matches!(c.find_at(&lookup, now), Lookup::Live(..)),
            )
        };
        let wire = b"\x01a\x07example\x00";
        assert_eq!(found("default", wire, RecordType::A), (wire.to_vec(), true));
        assert!(!found("other", wire, RecordType::A).1);
        assert!(!found("default", wire, RecordType::AAAA).1);
        // Lowercased as it is packed, as the owned key was.
        assert_eq!(
            found("default", b"\x01A\x07eXample\x00", RecordType::A),
            (wire.to_vec(), true)
        );
        // Too long for the stack: the caller takes the full path. Any name
        // fits with a group name of up to 64 bytes.
        let longest = [b'a'; 255];
        let fits = |group: &str, name: &[u8]| {
            StackKey::lowercased(&mut [0; PACKED_ON_STACK], group, name, RecordType::A, DNSClass::IN).is_some()
        };
        assert!(fits(&"g".repeat(64), &longest));
        assert!(!fits(&"g".repeat(65), &longest));
        assert!(!fits("", &[b'a'; 256]));
    }

    #[test]
    fn one_name_in_groups_classes_and_types_is_kept_apart() {
        let c = cache(0, 3600, 3600);
        let long_group = "g".repeat(200);
        let keyed = |group: &str, qtype, qclass| CacheKey::new(group, b"\x01a\x07example\x00", qtype, qclass);
        let keys = [
            keyed("default", RecordType::A, DNSClass::IN),
            keyed("office", RecordType::A, DNSClass::IN),
            keyed("office", RecordType::A, DNSClass::CH),
            keyed("office", RecordType::Unknown(65_280), DNSClass::IN),
            // Longer than the stack's room for a packed key.
            keyed(&long_group, RecordType::A, DNSClass::IN),
            // The name's last byte and the group's first cannot trade places.
            CacheKey::new("\x00default", b"\x01a\x07example", RecordType::A, DNSClass::IN),
        ];
        for (i, k) in keys.iter().enumerate() {
            assert!(c.insert(k.clone(), &mut answer(&vec![300; i + 1])), "{k:?}");
        }
        let now = Instant::now();
        let answers = |k: &CacheKey| c.get_at(k, now).map(|(e, _)| e.answers.len());
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(answers(k), Some(i + 1), "{k:?}");
        }
        assert_eq!(answers(&keyed("default", RecordType::A, DNSClass::CH)), None);
        assert_eq!(answers(&keyed("other", RecordType::A, DNSClass::IN)), None);
        let mut room = [0; PACKED_ON_STACK];
        let lookup = StackKey::lowercased(
            &mut room,
            "office",
            b"\x01a\x07example\x00",
            RecordType::A,
            DNSClass::IN,
        )
        .unwrap();
        let Lookup::Live(entry, _) = c.find_at(&lookup, now) else {
            panic!("the office entry");
        };
        assert_eq!(entry.answers.len(), 2);
        assert_eq!(c.len(), keys.len());
        // The cache file gets every key back as it was stored.
        let mut saved: Vec<CacheKey> = c.snapshot(now).into_iter().map(|(k, _)| k).collect();
        let mut stored = keys.to_vec();
        let order = |k: &CacheKey| {
            (
                k.group().to_string(),
                k.name().to_vec(),
                u16::from(k.qtype()),
                u16::from(k.qclass()),
            )
        };
        saved.sort_by_key(order);
        stored.sort_by_key(order);
        assert_eq!(saved, stored);
    }

    fn answer(ttls: &[u32]) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        for (i, &t) in ttls.iter().enumerate() {
            m.add_answer(Record::from_rdata(
                name("a.example."),
                t,
                RData::A(A::new(192, 0, 2, i as u8)),
            ));
        }
        m
    }

    fn negative(rcode: ResponseCode, soa_ttl: u32, minimum: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        let soa = SOA::new(
            name("example."),
            name("hostmaster.example."),
            1,
            3600,
            600,
            86400,
            minimum,
        );
        m.add_authority(Record::from_rdata(name("example."), soa_ttl, RData::SOA(soa)));
        m
    }

    fn served_ttls(c: &DnsCache, k: &CacheKey, at: Instant) -> Option<Vec<u32>> {
        let (e, age) = c.get_at(k, at)?;
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        e.fill(&mut m, age);
        Some(m.answers.iter().chain(&m.authorities).map(|r| r.ttl).collect())
    }

    #[test]
    fn ttls_count_down_and_expire_with_the_shortest() {
        let c = cache(0, 86_400, 3_600);
        let t0 = Instant::now();
        assert!(c.insert_at(key("a"), &mut answer(&[300, 100]), t0));
        assert_eq!(served_ttls(&c, &key("a"), t0), Some(vec![300, 100]));
        assert_eq!(
            served_ttls(&c, &key("a"), t0 + Duration::from_secs(40)),
            Some(vec![260, 60])
        );
        assert_eq!(served_ttls(&c, &key("a"), t0 + Duration::from_secs(100)), None);
        assert!(c.is_empty(), "expired entries are removed");
    }

    #[test]
    fn min_and_max_ttl_clamp() {
        let c = cache(60, 120, 3_600);
        let t0 = Instant::now();
        c.insert_at(key("a"), &mut answer(&[5]), t0);
        assert_eq!(served_ttls(&c, &key("a"), t0), Some(vec![60]));
        c.insert_at(key("b"), &mut answer(&[9999]), t0);
        assert_eq!(served_ttls(&c, &key("b"), t0 + Duration::from_secs(119)), Some(vec![1]));
        assert_eq!(served_ttls(&c, &key("b"), t0 + Duration::from_secs(120)), None);
    }

    #[test]
    fn negative_answers_use_the_soa_per_rfc_2308() {
        let c = cache(0, 86_400, 3_600);
        let t0 = Instant::now();
        assert!(c.insert_at(key("nx"), &mut negative(ResponseCode::NXDomain, 900, 30), t0));
        let (e, _) = c.get_at(&key("nx"), t0).unwrap();
        assert_eq!(e.rcode, ResponseCode::NXDomain);
        assert_eq!(
            served_ttls(&c, &key("nx"), t0 + Duration::from_secs(10)),
            Some(vec![20])
        );
        assert_eq!(served_ttls(&c, &key("nx"), t0 + Duration::from_secs(30)), None);
        // NODATA is cached too; the cap applies.
        let capped = cache(0, 86_400, 10);
        assert!(capped.insert_at(key("nd"), &mut negative(ResponseCode::NoError, 900, 600), t0));
        assert_eq!(served_ttls(&capped, &key("nd"), t0), Some(vec![10]));
        // Without an SOA: not cached.
        let mut bare = Message::new(1, MessageType::Response, OpCode::Query);
        bare.metadata.response_code = ResponseCode::NXDomain;
        assert!(!c.insert_at(key("bare"), &mut bare, t0));
    }

    #[test]
    fn errors_truncated_and_zero_ttl_are_not_cached() {
        let c = cache(0, 86_400, 3_600);
        let mut fail = answer(&[300]);
        fail.metadata.response_code = ResponseCode::ServFail;
        assert!(!c.insert(key("f"), &mut fail));
        let mut tc = answer(&[300]);
        tc.metadata.truncation = true;
        assert!(!c.insert(key("t"), &mut tc));
        assert!(!c.insert(key("z"), &mut answer(&[0])));
        let off = DnsCache::new(&CacheConfig {
            capacity: 0,
            ..CacheConfig::default()
        });
        assert!(!off.insert(key("a"), &mut answer(&[300])));
    }

    fn txt(bytes: usize) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        let strings = vec!["x".repeat(250); bytes / 250];
        m.add_answer(Record::from_rdata(
            name("big.example."),
            300,
            RData::TXT(hickory_proto::rr::rdata::TXT::new(strings)),
        ));
        m
    }

    #[test]
    fn memory_stays_under_max_bytes_whatever_the_answers_weigh() {
        let c = DnsCache::new(&CacheConfig {
            capacity: 100_000,
            max_bytes: 1 << 20, // an eighth is 128 KiB
            ..CacheConfig::default()
        });
        for i in 0..1_000 {
            assert!(c.insert(key(&format!("n{i}")), &mut txt(16_000)));
            assert!(c.bytes() <= 1 << 20, "{} bytes after {i}", c.bytes());
        }
        // About 1 MiB / 16 kB entries remain (each of the 64 strings
        // counted with its allocation too), the most recent ones.
        assert!((45..=70).contains(&c.len()), "{} entries", c.len());
        assert!(c.get(&key("n999")).is_some() && c.get(&key("n0")).is_none());
        // One answer above an eighth of the budget is served, not kept.
        let small = DnsCache::new(&CacheConfig {
            max_bytes: 256 << 10,
            ..CacheConfig::default()
        });
        assert!(!small.insert(key("huge"), &mut txt(60_000)));
        assert!(small.get(&key("huge")).is_none() && small.bytes() == 0);
        // Replacing an entry does not count it twice.
        let before = c.bytes();
        assert!(c.insert(key("n999"), &mut txt(16_000)));
        assert_eq!(c.bytes(), before);
    }

    #[test]
    fn the_entry_count_still_bounds_too() {
        let c = cache(0, 86_400, 3_600); // capacity 10
        for i in 0..25 {
            c.insert(key(&format!("n{i}")), &mut answer(&[300]));
        }
        assert_eq!(c.len(), 10);
    }

    /// A full cache: a client over its share makes room from its own
    /// oldest entries (by count and by bytes), one alone fills it all,
    /// and a client within its share still evicts the least recently used.
    #[test]
    fn a_client_over_its_share_of_a_full_cache_evicts_its_own_entries() {
        let c = DnsCache::new(&CacheConfig {
            capacity: 40,
            ..CacheConfig::default()
        });
        let store = |name: &str, client: &str| {
            let records = Records::take(&mut answer(&[300]));
            assert!(c.store(key(name), 300, records, ClientKey::by_prefix(client.parse().unwrap())));
        };
        for i in 0..10 {
            store(&format!("v{i}"), "192.0.2.10");
        }
        // IPv6 addresses of one /56 are one client.
        for i in 0..500 {
            store(&format!("f{i}"), &format!("2001:db8:1:{:x}::{i:x}", i % 200));
        }
        assert_eq!(c.len(), 40);
        for i in 0..10 {
            assert!(c.get(&key(&format!("v{i}"))).is_some(), "v{i} was evicted");
        }
        assert!(c.get(&key("f499")).is_some() && c.get(&key("f0")).is_none());
        // The flooder keeps the rest: 30, the newest.
        assert!(c.get(&key("f470")).is_some() && c.get(&key("f469")).is_none());
        // A newcomer within its share takes the least recently used.
        store("w0", "192.0.2.11");
        assert_eq!(c.len(), 40);
        assert!(c.get(&key("w0")).is_some());
        // By bytes: 16 kB answers from one client in a 1 MiB cache of
        // small ones from another.
        let b = DnsCache::new(&CacheConfig {
            capacity: 100_000,
            max_bytes: 1 << 20,
            ..CacheConfig::default()
        });
        let victim: std::net::IpAddr = "192.0.2.10".parse().unwrap();
        for i in 0..20 {
            assert!(b.store(
                key(&format!("v{i}")),
                300,
                Records::take(&mut answer(&[300])),
                ClientKey::by_prefix(victim)
            ));
        }
        for i in 0..500 {
            let big = Records::take(&mut txt(16_000));
            assert!(b.store(
                key(&format!("f{i}")),
                300,
                big,
                ClientKey::by_prefix("192.0.2.66".parse().unwrap())
            ));
            assert!(b.bytes() <= 1 << 20);
        }
        for i in 0..20 {
            assert!(b.get(&key(&format!("v{i}"))).is_some(), "v{i} was evicted");
        }
        // Alone, a client fills the whole cache.
        let alone = DnsCache::new(&CacheConfig {
            capacity: 40,
            ..CacheConfig::default()
        });
        for i in 0..100 {
            alone.store(
                key(&format!("a{i}")),
                300,
                Records::take(&mut answer(&[300])),
                ClientKey::by_prefix(victim),
            );
        }
        assert_eq!(alone.len(), 40);
    }

    /// A cache of 200 entries whose frequency guard hashes with `seed`
    /// ([`DnsCache::with_seed`]), as the lab's forged-names test sizes it.
    fn seeded_cache(seed: u64) -> DnsCache {
        DnsCache::with_seed(
            &CacheConfig {
                capacity: 200,
                ..CacheConfig::default()
            },
            seed,
        )
    }

    /// `client` asks `cache` for `name`: true for a live answer; on a
    /// miss the upstream's answer (one A record, an hour) is stored as
    /// `client`'s, and false.
    fn ask(cache: &DnsCache, name: &str, client: IpAddr) -> bool {
        match cache.lookup(&key(name)) {
            Lookup::Live(..) => true,
            _ => {
                cache.store(
                    key(name),
                    3600,
                    Records::take(&mut answer(&[3600])),
                    ClientKey::by_prefix(client),
                );
                false
            }
        }
    }

    /// A forger asks each of its names `repeats` times from many source
    /// addresses (10 names each, within every share), while a device asks
    /// its 20 names now and then: as the lab's test does, through a cache
    /// of 200. The device's names must stay cached (without the frequency
    /// guard, names asked twice reached the protected segment and pushed
    /// them out). A forger asking each name four times, as often as the
    /// device asked before the flood, does push them out: the guard
    /// counts, it cannot tell who is honest.
    ///
    /// The sketch's estimates err high where names share counters, and
    /// where they do depends on the hash seed, random per cache: each
    /// flood runs under many fixed seeds, so the test is the same on every
    /// run and a guard that lets a collision through fails it (ties that
    /// admitted, as they once did, failed 5.5 % of random seeds).
    #[test]
    fn forged_names_asked_again_cannot_flush_a_devices_repeated_names() {
        let floods = (0..16).map(|seed| (2, seed)).chain((0..64).map(|seed| (3, seed)));
        for (repeats, seed) in floods {
            let c = seeded_cache(seed);
            let device: IpAddr = "192.0.2.10".parse().unwrap();
            let hot: Vec<String> = (0..20).map(|i| format!("hot{i}.victim.test.")).collect();
            for n in &hot {
                ask(&c, n, device);
            }
            // Names the device uses: asked four times before the flood.
            for _ in 0..3 {
                assert!(hot.iter().all(|n| ask(&c, n, device)));
            }
            let mut misses = 0;
            for source in 0..120u8 {
                let from = IpAddr::from([192, 0, 2, 100 + source]);
                let names: Vec<String> = (0..10).map(|i| format!("n{i}.s{source}.flood.test.")).collect();
                for _ in 0..repeats {
                    for n in &names {
                        ask(&c, n, from);
                    }
                }
                if source % 30 == 29 {
                    misses += hot.iter().filter(|n| !ask(&c, n, device)).count();
                }
            }
            misses += hot.iter().filter(|n| !ask(&c, n, device)).count();
            assert_eq!(
                misses, 0,
                "asked {repeats} times each, the forged names pushed the device's out (seed {seed})"
            );
            assert_eq!(c.len(), 200);
        }
    }

    /// A full cache of names asked again and again still keeps a new
    /// answer at once, in its window: the name's second ask is a hit.
    /// Without the window the new name, asked once, lost to the names it
    /// would push out, and the device's second ask went upstream again.
    #[test]
    fn a_new_name_asked_once_is_served_from_cache_on_its_second_ask_while_the_cache_is_full() {
        for seed in 0..16 {
            let c = seeded_cache(seed);
            let device: IpAddr = "192.0.2.10".parse().unwrap();
            // Asked by eight other devices, each within its share (a
            // device over its share makes room from its own entries).
            let old: Vec<String> = (0..200).map(|i| format!("old{i}.lan.test.")).collect();
            for _ in 0..4 {
                for (i, n) in old.iter().enumerate() {
                    ask(&c, n, IpAddr::from([192, 0, 2, 20 + (i % 8) as u8]));
                }
            }
            assert_eq!(c.len(), 200);
            for i in 0..5 {
                let new = format!("new{i}.lan.test.");
                assert!(!ask(&c, &new, device));
                assert!(ask(&c, &new, device), "new{i} was not kept (seed {seed})");
                assert_eq!(c.len(), 200);
            }
        }
    }

    /// Questions a LAN device can ask that differ in one respect only:
    /// each must have an entry of its own, whichever way it is looked up
    /// (an owned key, or one packed on the stack from the name as sent),
    /// or one device's answer is served for another's question.
    #[test]
    fn questions_that_differ_in_any_part_never_share_an_entry() {
        let c = DnsCache::new(&CacheConfig {
            capacity: 100,
            ..CacheConfig::default()
        });
        let labels = |ls: &[&[u8]]| Name::from_labels(ls.iter().copied()).unwrap();
        // A wire name of exactly 255 bytes (labels of 63, 63, 63 and 61
        // bytes, their four length bytes and the root's), and the same less
        // one byte of its last label.
        let l63 = [b'a'; 63];
        let longest = labels(&[&l63, &l63, &l63, &[b'a'; 61]]);
        let shorter = labels(&[&l63, &l63, &l63, &[b'a'; 60]]);
        assert_eq!(crate::dns::names::wire_key(&longest).len(), 255);
        let asked = |n: Name, qtype: RecordType, qclass: DNSClass, group: &str| (n, qtype, qclass, group.to_string());
        let (a, aaaa, inet) = (RecordType::A, RecordType::AAAA, DNSClass::IN);
        let questions = [
            asked(name("ab.c."), a, inet, "default"),
            asked(name("a.bc."), a, inet, "default"),
            asked(name("a\\.bc."), a, inet, "default"),
            // Binary labels: a zero byte, a byte that reads as a length, a dot.
            asked(labels(&[b"a\0", b"b"]), a, inet, "default"),
            asked(labels(&[b"a", b"\0b"]), a, inet, "default"),
            asked(labels(&[b"\x01a"]), a, inet, "default"),
            asked(labels(&[b"a.b"]), a, inet, "default"),
            // Only ASCII letters have a case: 0xC9 and 0xE9 are two names.
            asked(labels(&[b"\xc9"]), a, inet, "default"),
            asked(labels(&[b"\xe9"]), a, inet, "default"),
            asked(longest.clone(), a, inet, "default"),
            asked(shorter, a, inet, "default"),
            // Types and classes as two bytes each, in their order.
            asked(name("ab.c."), aaaa, inet, "default"),
            asked(name("ab.c."), RecordType::CAA, inet, "default"), // 0x0101
            asked(name("ab.c."), RecordType::Unknown(0x0100), inet, "default"),
            asked(name("ab.c."), a, DNSClass::Unknown(0x0100), "default"),
            asked(name("ab.c."), RecordType::ANY, inet, "default"),
            // Groups, where a name's end could run into a group's start.
            asked(name("ab.c."), a, inet, "office"),
            asked(name("ab.c."), a, inet, "\x00default"),
            asked(name("ab.c."), a, inet, ""),
        ];
        let owned = |(n, qtype, qclass, group): &(Name, RecordType, DNSClass, String)| {
            CacheKey::new(group, &crate::dns::names::wire_key(n), *qtype, *qclass)
        };
        for (i, q) in questions.iter().enumerate() {
            assert!(c.insert(owned(q), &mut answer(&vec![300; i + 1])), "{q:?}");
        }
        assert_eq!(c.len(), questions.len());
        let now = Instant::now();
        for (i, q) in questions.iter().enumerate() {
            let found = |lookup: Lookup| match lookup {
                Lookup::Live(e, _) => Some(e.answers.len()),
                _ => None,
            };
            assert_eq!(found(c.lookup_at(&owned(q), now)), Some(i + 1), "owned {q:?}");
            // As a plain query would be looked up: the name as sent, in
            // upper case, lowercased while it is packed.
            let sent = super::super::rendered::wire_labels(&q.0).to_ascii_uppercase();
            let mut room = [0; PACKED_ON_STACK];
            let stacked = StackKey::lowercased(&mut room, &q.3, &sent, q.1, q.2).unwrap();
            assert_eq!(found(c.find_at(&stacked, now)), Some(i + 1), "stacked {q:?}");
        }
    }

    #[test]
    fn names_differing_only_in_label_boundaries_are_different_entries() {
        let c = cache(0, 86_400, 3_600);
        let t0 = Instant::now();
        assert!(c.insert_at(key("bank\\.test"), &mut negative(ResponseCode::NXDomain, 900, 900), t0));
        assert!(c.get_at(&key("bank.test"), t0).is_none());
        assert!(c.get_at(&key("BANK\\.test"), t0).is_some(), "case does not matter");
        assert!(c.insert_at(
            key("www\\.bank.test"),
            &mut negative(ResponseCode::NXDomain, 900, 900),
            t0
        ));
        assert!(c.get_at(&key("www.bank.test"), t0).is_none());
    }

    #[test]
    fn every_answer_is_clamped_even_when_not_cached() {
        let policy = TtlPolicy::new(&CacheConfig {
            max_ttl: Duration::from_secs(3_600),
            ..CacheConfig::default()
        });
        // A huge TTL on a cacheable answer.
        let mut m = answer(&[1_000_000]);
        assert_eq!(policy.apply(&mut m), Some(3_600));
        assert_eq!(m.answers[0].ttl, 3_600);
        // Truncated: not cacheable, still clamped.
        let mut tc = answer(&[1_000_000]);
        tc.metadata.truncation = true;
        assert_eq!(policy.apply(&mut tc), None);
        assert_eq!(tc.answers[0].ttl, 3_600);
        // An error answer carrying records: capped by max_ttl.
        let mut fail = answer(&[1_000_000]);
        fail.metadata.response_code = ResponseCode::Refused;
        assert_eq!(policy.apply(&mut fail), None);
        assert_eq!(fail.answers[0].ttl, 3_600);
        // A negative answer: the SOA's TTL bounded by negative_max_ttl.
        let mut nx = negative(ResponseCode::NXDomain, 1_000_000, 1_000_000);
        assert_eq!(policy.apply(&mut nx), Some(3_600));
        assert_eq!(nx.authorities[0].ttl, 3_600);
    }

    #[test]
    fn expired_entries_are_kept_for_the_stale_window_only() {
        let c = DnsCache::with_stale_window(&CacheConfig::default(), 100);
        let t0 = Instant::now();
        assert!(c.insert_at(key("a"), &mut answer(&[60]), t0));
        assert!(c.get_at(&key("a"), t0 + Duration::from_secs(61)).is_none(), "expired");
        let stale = c
            .get_stale_at(&key("a"), t0 + Duration::from_secs(61))
            .expect("kept stale");
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        stale.fill_stale(&mut m, 30);
        assert_eq!(m.answers[0].ttl, 30);
        assert!(c.get_stale_at(&key("a"), t0 + Duration::from_secs(161)).is_none());
        // Without a window an expired entry is gone.
        let plain = cache(0, 86_400, 3_600);
        plain.insert_at(key("a"), &mut answer(&[60]), t0);
        assert!(plain.get_at(&key("a"), t0 + Duration::from_secs(61)).is_none());
        assert!(plain.get_stale_at(&key("a"), t0 + Duration::from_secs(61)).is_none());
        // A SERVFAIL is never cached, so never served stale.
        let mut fail = answer(&[60]);
        fail.metadata.response_code = ResponseCode::ServFail;
        assert!(!c.insert_at(key("f"), &mut fail, t0));
        assert!(c.get_stale_at(&key("f"), t0 + Duration::from_secs(61)).is_none());
    }

    #[test]
    fn prefetch_is_due_for_popular_entries_near_expiry_once() {
        let c = cache(0, 86_400, 3_600);
        let t0 = Instant::now();
        c.insert_at(key("a"), &mut answer(&[100]), t0);
        let (e, _) = c.get_at(&key("a"), t0).unwrap();
        // Popular but young: no.
        assert!(!e.hit_wants_prefetch(2, t0 + Duration::from_secs(10)));
        assert!(!e.hit_wants_prefetch(2, t0 + Duration::from_secs(50)));
        // In its last 10 %: yes, once.
        assert!(e.hit_wants_prefetch(2, t0 + Duration::from_millis(90_500)));
        assert!(!e.hit_wants_prefetch(2, t0 + Duration::from_millis(91_000)));
        // An unpopular entry is left to expire.
        c.insert_at(key("b"), &mut answer(&[100]), t0);
        let (b, _) = c.get_at(&key("b"), t0).unwrap();
        assert!(!b.hit_wants_prefetch(5, t0 + Duration::from_secs(95)));
        assert!(
            !b.hit_wants_prefetch(0, t0 + Duration::from_secs(95)),
            "0 turns prefetch off"
        );
    }

    #[test]
    fn prefetch_is_due_from_the_same_millisecond_as_by_the_remaining_lifetime() {
        // What the check said before it was kept as an instant: the
        // remaining milliseconds, times ten, at most the lifetime's.
        let by_remaining = |lifetime: u32, elapsed_ms: u64| {
            let lifetime_ms = u128::from(lifetime) * 1000;
            lifetime_ms.saturating_sub(u128::from(elapsed_ms)) * 10 <= lifetime_ms
        };
        let t0 = Instant::now();
        for lifetime in [1, 7, 10, 99, 100, 3_601, 86_400] {
            let boundary = u64::from(lifetime) * 900;
            for elapsed_ms in [
                0,
                1,
                boundary - 1,
                boundary,
                boundary + 1,
                u64::from(lifetime) * 1000 + 5,
            ] {
                // Up to the millisecond, and a fraction of one past it.
                for extra_us in [0, 999] {
                    let now = t0 + Duration::from_millis(elapsed_ms) + Duration::from_micros(extra_us);
                    let e = Entry::new(
                        Records {
                            rcode: ResponseCode::NoError,
                            answers: Vec::new(),
                            authorities: Vec::new(),
                            additionals: Vec::new(),
                        },
                        t0,
                        lifetime,
                        0,
                        0,
                    );
                    assert_eq!(
                        e.hit_wants_prefetch(1, now),
                        by_remaining(lifetime, elapsed_ms),
                        "lifetime {lifetime} s, {elapsed_ms} ms and {extra_us} µs"
                    );
                }
            }
        }
    }

    #[test]
    fn prefetch_waits_for_the_hits_however_near_expiry() {
        let c = cache(0, 86_400, 3_600);
        let t0 = Instant::now();
        c.insert_at(key("a"), &mut answer(&[100]), t0);
        let (e, _) = c.get_at(&key("a"), t0).unwrap();
        let late = t0 + Duration::from_secs(95);
        assert!(!e.hit_wants_prefetch(3, late), "first hit");
        assert!(!e.hit_wants_prefetch(3, late), "second hit");
        assert!(e.hit_wants_prefetch(3, late), "third hit");
        assert!(!e.hit_wants_prefetch(3, late), "a refresh is already under way");
    }
}
