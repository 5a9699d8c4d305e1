//! The registry of pool readers: which reader watches which pool socket.
//!
//! Kept apart from [`inbound`](super::inbound), which runs the readers, so
//! that the relay's context can own the registry without the two modules
//! naming each other. A pool socket is given to one reader (round robin);
//! the reader's [`Poller`] names the sockets that have something to read,
//! by a token that is the socket's slot here.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::pool::PoolSocket;
use super::session::Session;
use crate::net::poll::Poller;
use crate::sync::lock;

/// The pool readers of a relay: as many as the runtime has workers, each
/// watching its share of the pool sockets through a [`Poller`] of its own.
#[derive(Debug, Default)]
pub struct PoolReaders {
    readers: OnceLock<Vec<Arc<PoolReader>>>,
    next: AtomicUsize,
}

/// One pool reader: the sockets it watches (a socket's token is its index
/// here) and whether its task runs.
#[derive(Debug)]
pub(super) struct PoolReader {
    pub(super) poller: Poller,
    pub(super) sockets: Mutex<Watched>,
    pub(super) running: AtomicBool,
}

/// Watched sockets by token; the tokens of sockets let go of are reused.
#[derive(Debug, Default)]
pub(super) struct Watched {
    pub(super) slots: Vec<Option<Arc<PoolSocket<Session>>>>,
    free: Vec<usize>,
}

impl PoolReaders {
    /// The reader that takes the next new socket (round robin).
    pub(super) fn pick(&self) -> io::Result<Arc<PoolReader>> {
        let readers = match self.readers.get() {
            Some(r) => r,
            None => {
                let n = tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers().max(1));
                let made = (0..n)
                    .map(|_| {
                        Ok(Arc::new(PoolReader {
                            poller: Poller::new()?,
                            sockets: Mutex::new(Watched::default()),
                            running: AtomicBool::new(false),
                        }))
                    })
                    .collect::<io::Result<Vec<_>>>()?;
                // Another thread may have won: use whichever was stored.
                let _ = self.readers.set(made);
                self.readers.get().ok_or_else(|| io::Error::other("pool readers"))?
            }
        };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % readers.len();
        readers.get(i).cloned().ok_or_else(|| io::Error::other("pool readers"))
    }

    /// Lets go of the sockets the pool has closed (see
    /// `Pools::close_idle`), so that their descriptors are released.
    pub fn forget_retired(&self) {
        for reader in self.readers.get().into_iter().flatten() {
            reader.forget_retired();
        }
    }
}

impl PoolReader {
    pub(super) fn watch(&self, socket: Arc<PoolSocket<Session>>) -> io::Result<()> {
        let mut watched = lock(&self.sockets);
        let token = watched.free.pop().unwrap_or(watched.slots.len());
        if let Err(e) = self.poller.add(socket.socket.as_raw_fd(), token as u64) {
            if token < watched.slots.len() {
                watched.free.push(token);
            }
            return Err(e);
        }
        match watched.slots.get_mut(token) {
            Some(slot) => *slot = Some(socket),
            None => watched.slots.push(Some(socket)),
        }
        Ok(())
    }

    fn forget_retired(&self) {
        let mut watched = lock(&self.sockets);
        let Watched { slots, free } = &mut *watched;
        for (token, slot) in slots.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|s| s.is_retired()) {
                if let Some(socket) = slot.take() {
                    // Closing the socket would remove it from the set too,
                    // but a reply being read elsewhere may still hold it.
                    let _ = self.poller.remove(socket.socket.as_raw_fd());
                }
                free.push(token);
            }
        }
    }
}

impl AsRawFd for PoolReader {
    fn as_raw_fd(&self) -> RawFd {
        self.poller.as_raw_fd()
    }
}
