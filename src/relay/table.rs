//! The session table: flow → session, bounded, least recently used first out.
//!
//! A gateway cannot hold every flow it ever saw, so the table has a fixed
//! capacity; when a new flow arrives at a full table the flow that has gone
//! longest without traffic (in either direction) is evicted. An entry owns
//! its session's resources (a pool lease, or a socket and the task pumping
//! it), so removal from the table *is* the session's end: eviction, expiry
//! and shutdown all just drop entries.

use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::task::AbortHandle;

use super::FlowKey;
use super::session::Session;

/// A live session and the task that serves it, if it has one.
#[derive(Debug)]
pub struct Entry {
    pub session: Arc<Session>,
    task: Option<AbortHandle>,
}

impl Entry {
    pub fn new(session: Arc<Session>, task: Option<AbortHandle>) -> Self {
        Entry { session, task }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

#[derive(Debug)]
pub struct SessionTable {
    inner: Mutex<LruCache<FlowKey, Entry>>,
}

impl SessionTable {
    pub fn new(capacity: NonZeroUsize) -> Self {
        SessionTable {
            inner: Mutex::new(LruCache::new(capacity)),
        }
    }

    /// The session of `key`, marking it most recently used.
    pub fn get(&self, key: &FlowKey) -> Option<Arc<Session>> {
        self.lock().get(key).map(|e| e.session.clone())
    }

    /// The session of `key`, or a new one from `open` if there is none.
    ///
    /// Returns the session and, when the table was full, the evicted entry
    /// (dropped by the caller, outside the lock, which ends it).
    pub fn get_or_insert_with<E>(
        &self,
        key: FlowKey,
        open: impl FnOnce() -> Result<Entry, E>,
    ) -> Result<(Arc<Session>, Option<Entry>), E> {
        let mut table = self.lock();
        if let Some(e) = table.get(&key) {
            return Ok((e.session.clone(), None));
        }
        let entry = open()?;
        let session = entry.session.clone();
        let evicted = table.push(key, entry).map(|(_, old)| old);
        Ok((session, evicted))
    }

    /// Marks `key` most recently used if it still maps to session `id`.
    pub fn promote(&self, key: &FlowKey, id: u64) {
        let mut table = self.lock();
        if table.peek(key).is_some_and(|e| e.session.id == id) {
            table.promote(key);
        }
    }

    /// Removes `key` if it still maps to session `id` (a newer session for
    /// the same flow is left alone).
    pub fn remove(&self, key: &FlowKey, id: u64) -> Option<Entry> {
        let mut table = self.lock();
        if table.peek(key).is_some_and(|e| e.session.id == id) {
            table.pop(key)
        } else {
            None
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Removes the sessions idle for at least their timeout at `now_ms`.
    ///
    /// Walks from the least recently used end and stops at the first
    /// session idle for less than `min_idle_ms` (the shortest timeout in
    /// use): everything after it was used later still, so nothing there can
    /// have expired. A sweep costs the expired sessions plus those older
    /// than the shortest timeout, not the whole table.
    pub fn take_idle(&self, now_ms: u64, min_idle_ms: u64) -> Vec<Entry> {
        let mut table = self.lock();
        let mut expired = Vec::new();
        for (key, entry) in table.iter().rev() {
            let idle = entry.session.idle_for(now_ms);
            if idle >= entry.session.idle_ms {
                expired.push(*key);
            } else if idle < min_idle_ms {
                break;
            }
        }
        expired.iter().filter_map(|k| table.pop(k)).collect()
    }

    /// Changes the capacity; when it shrinks, the least recently used flows
    /// beyond it end. Returns how many ended.
    pub fn resize(&self, capacity: NonZeroUsize) -> usize {
        let mut ended = Vec::new();
        {
            let mut table = self.lock();
            while table.len() > capacity.get() {
                if let Some((_, e)) = table.pop_lru() {
                    ended.push(e);
                }
            }
            table.resize(capacity);
        }
        ended.len()
    }

    /// Ends every session; returns how many there were.
    pub fn clear(&self) -> usize {
        let drained: Vec<Entry> = {
            let mut table = self.lock();
            let mut all = Vec::with_capacity(table.len());
            while let Some((_, e)) = table.pop_lru() {
                all.push(e);
            }
            all
        };
        drained.len()
    }

    fn lock(&self) -> MutexGuard<'_, LruCache<FlowKey, Entry>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            client: ([192, 0, 2, 10], port).into(),
            target: super::super::Target::Destination(([198, 51, 100, 7], 7000).into()),
        }
    }

    fn entry(k: FlowKey) -> Result<Entry, Infallible> {
        let task = tokio::spawn(std::future::pending::<()>());
        Ok(Entry::new(
            Arc::new(Session::detached(k, 60_000, 0)),
            Some(task.abort_handle()),
        ))
    }

    fn table(cap: usize) -> SessionTable {
        SessionTable::new(NonZeroUsize::new(cap).unwrap())
    }

    #[tokio::test]
    async fn evicts_the_least_recently_used() {
        let t = table(3);
        for p in 1..=3 {
            let (_, evicted) = t.get_or_insert_with(key(p), || entry(key(p))).unwrap();
            assert!(evicted.is_none());
        }
        assert!(t.get(&key(1)).is_some()); // 2 is now the oldest
        let (_, evicted) = t.get_or_insert_with(key(4), || entry(key(4))).unwrap();
        assert_eq!(evicted.unwrap().session.key, key(2));
        assert!(t.get(&key(2)).is_none());
        assert_eq!(t.len(), 3);
    }

    #[tokio::test]
    async fn existing_flow_is_not_reopened() {
        let t = table(2);
        let (a, _) = t.get_or_insert_with(key(1), || entry(key(1))).unwrap();
        let (b, _) = t
            .get_or_insert_with(key(1), || -> Result<Entry, Infallible> { panic!("opened twice") })
            .unwrap();
        assert_eq!(a.id, b.id);
    }

    #[tokio::test]
    async fn promote_and_remove_respect_the_session_id() {
        let t = table(2);
        let (old, _) = t.get_or_insert_with(key(1), || entry(key(1))).unwrap();
        assert!(t.remove(&key(1), old.id).is_some());
        let (new, _) = t.get_or_insert_with(key(1), || entry(key(1))).unwrap();
        // A stale session (say, its expiry timer firing late) cannot remove
        // the flow's newer session.
        assert!(t.remove(&key(1), old.id).is_none());
        assert_eq!(t.get(&key(1)).unwrap().id, new.id);

        t.get_or_insert_with(key(2), || entry(key(2))).unwrap();
        t.promote(&key(1), new.id); // 2 becomes the oldest
        let (_, evicted) = t.get_or_insert_with(key(3), || entry(key(3))).unwrap();
        assert_eq!(evicted.unwrap().session.key, key(2));
    }

    #[tokio::test]
    async fn idle_sessions_are_taken_whatever_their_own_timeout() {
        let t = table(10);
        let add = |port: u16, idle_ms: u64, last: u64| {
            t.get_or_insert_with(key(port), || {
                Ok::<_, Infallible>(Entry::new(Arc::new(Session::detached(key(port), idle_ms, last)), None))
            })
            .unwrap();
        };
        add(1, 1_000, 0); // idle 10 s, timeout 1 s: expired
        add(2, 60_000, 0); // idle 10 s, timeout 60 s: kept
        add(3, 1_000, 5_000); // idle 5 s, timeout 1 s: expired, behind a kept one
        add(4, 1_000, 9_800); // idle 0.2 s: kept; the walk stops here
        let taken: Vec<u16> = t
            .take_idle(10_000, 1_000)
            .iter()
            .map(|e| e.session.key.client.port())
            .collect();
        assert_eq!(taken, vec![1, 3]);
        assert_eq!(t.len(), 2);
    }

    #[tokio::test]
    async fn dropping_an_entry_stops_its_task() {
        let t = table(1);
        let task = tokio::spawn(std::future::pending::<()>());
        let handle = task.abort_handle();
        t.get_or_insert_with(key(1), || {
            Ok::<_, Infallible>(Entry::new(Arc::new(Session::detached(key(1), 60_000, 0)), Some(handle)))
        })
        .unwrap();
        assert_eq!(t.clear(), 1);
        assert!(task.await.unwrap_err().is_cancelled());
    }
}
