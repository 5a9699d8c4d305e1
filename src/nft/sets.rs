//! tproxyd's sets: created at start, fed by one batching thread, removed
//! with the table when tproxyd created it.
//!
//! Each configured set name `NAME` becomes two typed sets, `NAME4`
//! (`ipv4_addr`) and `NAME6` (`ipv6_addr`), both `flags timeout`, in the
//! table `inet <table>`. If the table was already there (the operator
//! declared it, with their own rules that use the sets), tproxyd only adds
//! its sets and leaves everything in place at exit; if tproxyd created the
//! table, it deletes the table at exit.
//!
//! Answers do not each cost a transaction: the feeder thread takes every
//! update queued while the previous commit ran and commits them together,
//! so a burst of answers shares one round trip to the kernel.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::socket::{NftError, NftSocket};
use super::wire::{Batch, ELEM_BYTES, KeyType, NFPROTO_INET};
use crate::stats::Stats;

/// Updates waiting for the feeder; past this an answer is released at once
/// and the update is counted as dropped (DNS never stalls on the kernel).
const QUEUE: usize = 16_384;
/// Most elements in one transaction (about 100 KB of netlink message, under
/// the socket's default send buffer).
const MAX_BATCH_ELEMENTS: usize = 200_000 / ELEM_BYTES;
/// An element never lives shorter than this: a timeout of 0 would mean
/// "never expires" to the kernel.
const MIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Nor longer (a TTL of years from a hostile upstream).
const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 86_400);
/// Most elements whose expiry the feeder remembers (to never shorten one,
/// and to count refreshes); past it the memory is cleared and rebuilt.
const MAX_KNOWN: usize = 1 << 18;

/// The two typed sets behind one configured set name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetPair {
    pub v4: Arc<str>,
    pub v6: Arc<str>,
}

impl SetPair {
    pub fn new(name: &str) -> SetPair {
        SetPair {
            v4: format!("{name}4").into(),
            v6: format!("{name}6").into(),
        }
    }

    /// The set an address goes to.
    pub fn for_ip(&self, ip: IpAddr) -> &Arc<str> {
        match ip {
            IpAddr::V4(_) => &self.v4,
            IpAddr::V6(_) => &self.v6,
        }
    }
}

/// One element to add or refresh.
#[derive(Debug, Clone)]
pub struct Update {
    pub set: Arc<str>,
    pub ip: IpAddr,
    pub timeout: Duration,
}

#[derive(Debug)]
struct Queued {
    elems: Vec<(Update, bool)>,
    done: Option<oneshot::Sender<()>>,
}

#[derive(Debug)]
enum Command {
    Add(Queued),
    Stop,
}

#[derive(Debug, Clone, Copy)]
struct Known {
    expires: Instant,
}

#[derive(Debug)]
struct Shared {
    table: String,
    /// Configured names (without the 4/6 suffix).
    names: Mutex<Vec<String>>,
    /// What tproxyd believes each element's expiry is.
    known: Mutex<HashMap<(Arc<str>, IpAddr), Known>>,
    stats: Arc<Stats>,
    owned: bool,
    /// Most elements per set (the kernel refuses more); 0 = unbounded.
    max_elements: u32,
}

impl Shared {
    fn known(&self) -> std::sync::MutexGuard<'_, HashMap<(Arc<str>, IpAddr), Known>> {
        self.known.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The running feeder. [`NftSets::shutdown`] (or dropping it) stops the
/// thread and removes the table if tproxyd created it.
#[derive(Debug)]
pub struct NftSets {
    tx: mpsc::SyncSender<Command>,
    thread: Mutex<Option<JoinHandle<()>>>,
    shared: Arc<Shared>,
    stopped: AtomicBool,
}

impl NftSets {
    /// Creates the table (if absent) and the sets of `names`, then starts
    /// the feeder. Needs CAP_NET_ADMIN in the daemon's network namespace.
    /// `max_elements` bounds each set in the kernel (0: no bound): a client
    /// resolving endless names of a wildcard zone cannot grow it further;
    /// new addresses are then refused and counted, refreshes still work.
    pub fn start(table: &str, names: &[String], max_elements: u32, stats: Arc<Stats>) -> Result<NftSets, NftError> {
        let mut sock = NftSocket::open()?;
        let owned = match sock.commit(|b| b.new_table(NFPROTO_INET, table, true)) {
            Ok(()) => true,
            Err(e) if e.errno() == Some(libc::EEXIST) => false,
            Err(e) => return Err(e),
        };
        let shared = Arc::new(Shared {
            table: table.to_string(),
            names: Mutex::new(names.to_vec()),
            known: Mutex::new(HashMap::new()),
            stats,
            owned,
            max_elements,
        });
        if let Err(e) = create_sets(&mut sock, &shared) {
            if owned {
                let _ = sock.commit(|b| b.del_table(NFPROTO_INET, table));
            }
            return Err(e);
        }
        tracing::info!(table = %format!("inet {table}"), owned, sets = ?names, "nftables sets ready");
        let (tx, rx) = mpsc::sync_channel(QUEUE);
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("nft-sets".into())
            .spawn(move || feed(sock, rx, thread_shared))
            .map_err(NftError::Io)?;
        Ok(NftSets {
            tx,
            thread: Mutex::new(Some(thread)),
            shared,
            stopped: AtomicBool::new(false),
        })
    }

    /// Whether tproxyd created the table (and so removes it at exit).
    pub fn owns_table(&self) -> bool {
        self.shared.owned
    }

    pub fn table(&self) -> &str {
        &self.shared.table
    }

    /// Creates sets named by a reloaded config that did not exist yet.
    pub fn ensure(&self, names: &[String]) -> Result<(), NftError> {
        {
            let mut have = self.shared.names.lock().unwrap_or_else(PoisonError::into_inner);
            let mut changed = false;
            for n in names {
                if !have.contains(n) {
                    have.push(n.clone());
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
        }
        let mut sock = NftSocket::open()?;
        create_sets(&mut sock, &self.shared)
    }

    /// Queues `updates`. Returns what to await before releasing the
    /// answer, or `None` when the queue is full (the answer goes out at
    /// once and the drop is counted). Every answer is committed, even one
    /// that changes nothing in tproxyd's eyes: that is what repairs a set
    /// someone flushed. A timeout never shortens an element's life: an
    /// answer with a shorter TTL keeps the expiry an earlier one gave.
    pub fn add(&self, updates: Vec<Update>, now: Instant) -> Option<oneshot::Receiver<()>> {
        let mut elems = Vec::with_capacity(updates.len());
        {
            let mut known = self.shared.known();
            if known.len() >= MAX_KNOWN {
                known.retain(|_, k| k.expires > now);
                if known.len() >= MAX_KNOWN {
                    known.clear();
                }
            }
            for mut u in updates {
                u.timeout = u.timeout.clamp(MIN_TIMEOUT, MAX_TIMEOUT);
                let key = (u.set.clone(), u.ip);
                let earlier = known.get(&key).map(|k| k.expires).filter(|&e| e > now);
                if let Some(e) = earlier {
                    u.timeout = u.timeout.max(e - now);
                }
                known.insert(
                    key,
                    Known {
                        expires: now + u.timeout,
                    },
                );
                elems.push((u, earlier.is_some()));
            }
        }
        if elems.is_empty() {
            return None;
        }
        let (done, wait) = oneshot::channel();
        match self.tx.try_send(Command::Add(Queued {
            elems,
            done: Some(done),
        })) {
            Ok(()) => Some(wait),
            Err(_) => {
                self.shared.stats.nft_dropped.inc();
                None
            }
        }
    }

    /// Stops the feeder after it has committed what is queued, and deletes
    /// the table if tproxyd created it. Safe to call twice.
    pub fn shutdown(&self) {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        // A full queue still drains; wait for room rather than lose Stop.
        let _ = self.tx.send(Command::Stop);
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for NftSets {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn create_sets(sock: &mut NftSocket, shared: &Shared) -> Result<(), NftError> {
    let names = shared.names.lock().unwrap_or_else(PoisonError::into_inner).clone();
    let table = &shared.table;
    sock.commit(|b| {
        let mut id = 1;
        for n in &names {
            let pair = SetPair::new(n);
            b.new_set(NFPROTO_INET, table, &pair.v4, KeyType::Ipv4, id, shared.max_elements);
            b.new_set(
                NFPROTO_INET,
                table,
                &pair.v6,
                KeyType::Ipv6,
                id + 1,
                shared.max_elements,
            );
            id += 2;
        }
    })
}

/// The feeder thread: one transaction per wake-up, holding everything
/// queued meanwhile.
fn feed(mut sock: NftSocket, rx: mpsc::Receiver<Command>, shared: Arc<Shared>) {
    let mut batch: Vec<Queued> = Vec::new();
    let mut stop = false;
    while !stop {
        match rx.recv() {
            Ok(Command::Add(q)) => batch.push(q),
            Ok(Command::Stop) | Err(_) => break,
        }
        let mut elems = batch.iter().map(|q| q.elems.len()).sum::<usize>();
        while elems < MAX_BATCH_ELEMENTS {
            match rx.try_recv() {
                Ok(Command::Add(q)) => {
                    elems += q.elems.len();
                    batch.push(q);
                }
                Ok(Command::Stop) => {
                    stop = true;
                    break;
                }
                Err(_) => break,
            }
        }
        commit(&mut sock, &shared, &batch);
        for q in batch.drain(..) {
            if let Some(done) = q.done {
                let _ = done.send(());
            }
        }
    }
    if shared.owned {
        match sock.commit(|b| b.del_table(NFPROTO_INET, &shared.table)) {
            Ok(()) => tracing::info!(table = %shared.table, "nftables table removed"),
            Err(e) => tracing::warn!(table = %shared.table, error = %e, "removing the nftables table"),
        }
    }
}

/// Commits the elements of `queued`; on failure retries once after
/// re-creating the sets (someone deleted them), then answer by answer so
/// one bad element does not fail the others.
fn commit(sock: &mut NftSocket, shared: &Shared, queued: &[Queued]) {
    let all: Vec<&(Update, bool)> = queued.iter().flat_map(|q| &q.elems).collect();
    let mut result = commit_elems(sock, shared, &all);
    if let Err(e) = &result {
        if e.errno() == Some(libc::ENOENT) {
            tracing::warn!(table = %shared.table, "nftables sets missing: creating them again");
            if shared.owned {
                let _ = sock.commit(|b| b.new_table(NFPROTO_INET, &shared.table, false));
            }
            let _ = create_sets(sock, shared);
            result = commit_elems(sock, shared, &all);
        }
    }
    match result {
        Ok(()) => mark_committed(shared, &all, true),
        Err(e) if queued.len() > 1 => {
            tracing::debug!(error = %e, "nftables batch refused; committing answer by answer");
            for q in queued {
                let one: Vec<&(Update, bool)> = q.elems.iter().collect();
                let ok = match commit_elems(sock, shared, &one) {
                    Ok(()) => true,
                    Err(e) => {
                        // Counted; logged quietly: a full set under a flood
                        // of names would otherwise flood the log too.
                        shared.stats.nft_errors.inc();
                        tracing::debug!(error = %e, "nftables set update refused");
                        false
                    }
                };
                mark_committed(shared, &one, ok);
            }
        }
        Err(e) => {
            shared.stats.nft_errors.inc();
            tracing::debug!(error = %e, "nftables set update refused");
            mark_committed(shared, &all, false);
        }
    }
}

fn commit_elems(sock: &mut NftSocket, shared: &Shared, elems: &[&(Update, bool)]) -> Result<(), NftError> {
    shared.stats.nft_transactions.inc();
    // One message per set; one element per address, with the longest
    // timeout asked for it.
    let mut per_set: HashMap<&str, HashMap<IpAddr, u64>> = HashMap::new();
    for (u, _) in elems {
        let ms = u64::try_from(u.timeout.as_millis()).unwrap_or(u64::MAX);
        let t = per_set.entry(&u.set).or_default().entry(u.ip).or_insert(0);
        *t = (*t).max(ms);
    }
    sock.commit(|b: &mut Batch| {
        for (set, ips) in &per_set {
            let list: Vec<(IpAddr, u64)> = ips.iter().map(|(ip, t)| (*ip, *t)).collect();
            b.new_elements(NFPROTO_INET, &shared.table, set, &list);
        }
    })
}

fn mark_committed(shared: &Shared, elems: &[&(Update, bool)], ok: bool) {
    let mut known = shared.known();
    for (u, refresh) in elems {
        let key = (u.set.clone(), u.ip);
        if ok {
            if *refresh {
                shared.stats.nft_refreshed.inc();
            } else {
                shared.stats.nft_added.inc();
            }
        } else {
            // Unknown state: the next answer tries again.
            known.remove(&key);
        }
    }
}

/// Asks the kernel whether it would accept tproxyd's sets of `names` in
/// `table` (creating the table and sets, adding an element with a timeout)
/// without changing anything: the batch ends with a message bound to fail,
/// so the kernel checks every message and then rolls all of them back.
/// Returns what was refused, described, if anything was.
pub fn probe(table: &str, names: &[String], max_elements: u32) -> Result<(), String> {
    const ABORT: &str = "tproxyd_probe_abort_no_such_table";
    let mut sock = NftSocket::open().map_err(|e| e.to_string())?;
    let mut what = vec![format!("table inet {table}")];
    let errnos = sock
        .transact(|b| {
            b.new_table(NFPROTO_INET, table, false);
            let mut id = 1;
            for n in names {
                let pair = SetPair::new(n);
                b.new_set(NFPROTO_INET, table, &pair.v4, KeyType::Ipv4, id, max_elements);
                b.new_set(NFPROTO_INET, table, &pair.v6, KeyType::Ipv6, id + 1, max_elements);
                id += 2;
                let v4: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
                let v6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
                b.new_elements(NFPROTO_INET, table, &pair.v4, &[(v4, 1_000)]);
                b.new_elements(NFPROTO_INET, table, &pair.v6, &[(v6, 1_000)]);
                what.push(format!("set {} (ipv4_addr, flags timeout)", pair.v4));
                what.push(format!("set {} (ipv6_addr, flags timeout)", pair.v6));
                what.push(format!("an element with a timeout in {}", pair.v4));
                what.push(format!("an element with a timeout in {}", pair.v6));
            }
            b.del_table(NFPROTO_INET, ABORT);
        })
        .map_err(|e| e.to_string())?;
    // `what` names the messages in the order they were sent; the last
    // one (the abort) is meant to fail.
    for (index, errno) in errnos.iter().enumerate().take(errnos.len().saturating_sub(1)) {
        if *errno != 0 {
            let desc = what.get(index).cloned().unwrap_or_default();
            return Err(format!("{desc}: {}", std::io::Error::from_raw_os_error(*errno)));
        }
    }
    Ok(())
}
