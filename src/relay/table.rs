//! The session table: flow → session, bounded, least recently used first out.
//!
//! A gateway cannot hold every flow it ever saw, so the table has a fixed
//! capacity; when a new flow arrives at a full table the flow that has gone
//! longest without traffic (in either direction) is evicted and its socket
//! closed. Every entry owns the task pumping its replies, and dropping the
//! entry stops that task: removal from the table *is* the session's end.

use lru::LruCache;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::task::AbortHandle;

use super::FlowKey;
use super::session::Session;

/// A live session and the task that serves it.
#[derive(Debug)]
pub struct Entry {
    pub session: Arc<Session>,
    task: AbortHandle,
}

impl Entry {
    pub fn new(session: Arc<Session>, task: AbortHandle) -> Self {
        Entry { session, task }
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.task.abort();
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
