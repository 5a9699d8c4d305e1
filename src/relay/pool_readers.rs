//! The registry of pool readers: which reader watches which pool socket.
//!
//! Kept apart from [`inbound`](super::inbound), which runs the readers, so
//! that the relay's context can own the registry without the two modules
//! naming each other. A pool socket is given to one reader (round robin),
//! in a slot whose index is the socket's token.
//!
//! Each socket is registered with the runtime on its own, with a waker of
//! its own that queues its token with the reader and wakes the reader's
//! task. One `epoll_wait` of the runtime so names every socket with
//! something queued, and a burst on hundreds of sockets still costs the
//! reader one wake-up. (Before, the sockets sat in an `epoll` set of the
//! reader's own, watched by the runtime's: every wake-up then asked that
//! set which sockets were ready, a second `epoll_wait` per batch of
//! replies that a relay waiting on the sockets themselves does not make.)
//!
//! The runtime wakes a socket's reader only for datagrams: an ICMP error
//! alone (`EPOLLERR`, the error queue `IP_RECVERR` fills) is readiness no
//! reader waker is woken for. So each socket also sits in the reader's
//! [`Poller`], asking for nothing: that set reports only errors, and the
//! runtime wakes the reader when it does. A datagram does not touch it.

use std::io;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, RawWaker, RawWakerVTable, Waker};

use futures_util::task::AtomicWaker;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::pool::PoolSocket;
use super::reply_order::HEAVY_AFTER;
use super::session::Session;
use crate::net::poll::Poller;
use crate::sync::lock;

/// The pool readers of a relay: as many as the runtime has workers, each
/// watching its share of the pool sockets.
#[derive(Debug, Default)]
pub struct PoolReaders {
    readers: OnceLock<Vec<Arc<PoolReader>>>,
    next: AtomicUsize,
}

/// One pool reader: the sockets it watches (a socket's token is its index
/// here), the tokens of those whose runtime registration fired, the error
/// set, and whether its task runs.
#[derive(Debug)]
pub(super) struct PoolReader {
    /// Every watched socket, asked for errors only (see the module doc).
    pub(super) errors: Poller,
    pub(super) sockets: Mutex<Watched>,
    pub(super) marks: Arc<Marks>,
    pub(super) running: AtomicBool,
    /// Its place among the readers.
    index: u32,
}

/// Watched sockets by token; the tokens of sockets let go of are reused.
#[derive(Debug, Default)]
pub(super) struct Watched {
    pub(super) slots: Vec<Option<Arc<Watch>>>,
    free: Vec<usize>,
}

/// A watched socket and its registration with the runtime.
///
/// One allocation per socket, its waker's state inline: in a flood to many
/// destinations from one client endpoint every flow has a socket of its
/// own, so what is kept here is paid per flow (see the size test below).
#[derive(Debug)]
pub(super) struct Watch {
    /// Declared before `socket`, so dropped first: the registration must
    /// be removed while the descriptor is still the socket's.
    pub(super) io: AsyncFd<Fd>,
    pub(super) socket: Arc<PoolSocket<Session>>,
    pub(super) mark: SocketWaker,
    /// Wakes `mark` through a [`Weak`] of this very `Watch` (see
    /// [`weak_waker`]), made once.
    pub(super) waker: Waker,
}

/// A descriptor another value keeps open (the [`Watch`]'s socket).
#[derive(Debug)]
pub(super) struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The tokens of sockets that became ready, and the reader task to wake.
#[derive(Debug, Default)]
pub(super) struct Marks {
    queue: Mutex<Vec<usize>>,
    task: AtomicWaker,
}

impl Marks {
    /// Registers the task of `cx` to be woken by the next mark, then
    /// appends the marked tokens to `out`. Registering first means a mark
    /// made after the take wakes the task again: none is lost.
    pub(super) fn take(&self, cx: &Context<'_>, out: &mut Vec<usize>) {
        self.task.register(cx.waker());
        self.take_now(out);
    }

    /// Appends the marked tokens to `out`, without registering anything:
    /// for a task that looks again before it waits.
    pub(super) fn take_now(&self, out: &mut Vec<usize>) {
        out.append(&mut lock(&self.queue));
    }
}

/// The waker state of a watched socket: queues the socket's token (once
/// until the reader takes it) and wakes the reader.
#[derive(Debug)]
pub(super) struct SocketWaker {
    marks: Arc<Marks>,
    /// 32 bits, so that it and `marked` share one word: a reader watches
    /// at most as many sockets as the process has descriptors.
    token: u32,
    /// Queued and not yet served; set by the waker, cleared by the reader
    /// just before it asks the runtime for the socket's readiness.
    pub(super) marked: AtomicBool,
    /// How many reads in a row found only replies to the client that
    /// dominates the relay's work ([`HEAVY_AFTER`] from the start: a socket
    /// not read yet counts as that client's). At [`HEAVY_AFTER`] its reader
    /// serves it after the others (see `relay::reply_order`). Beside
    /// `marked` and the token, in one word.
    pub(super) dominant_reads: AtomicU8,
}

impl SocketWaker {
    /// The socket's slot in its reader.
    pub(super) fn token(&self) -> usize {
        self.token as usize
    }

    fn wake(&self) {
        if !self.marked.swap(true, Ordering::AcqRel) {
            lock(&self.marks.queue).push(self.token());
        }
        self.marks.task.wake();
    }
}

/// A waker that marks `watch`'s socket, holding only a [`Weak`] of it.
///
/// The runtime keeps the waker last registered in the socket's
/// registration, which the `Watch` owns: a strong reference there would
/// be a cycle, and a socket let go of would never be closed. (The waker
/// state used to be an `Arc` of its own for that reason: one more
/// allocation, 48 bytes, per socket.) A wake after the `Watch` is gone
/// does nothing.
fn weak_waker(watch: Weak<Watch>) -> Waker {
    fn raw(watch: Weak<Watch>) -> RawWaker {
        RawWaker::new(Weak::into_raw(watch).cast(), &VTABLE)
    }
    /// The `Weak` a raw waker holds, still owned by the waker.
    ///
    /// SAFETY (caller): `data` came from `raw` and was not dropped.
    unsafe fn borrowed(data: *const ()) -> ManuallyDrop<Weak<Watch>> {
        // SAFETY: as the caller promises, `data` is `Weak::into_raw`'s.
        ManuallyDrop::new(unsafe { Weak::from_raw(data.cast::<Watch>()) })
    }
    fn mark(watch: &Weak<Watch>) {
        if let Some(watch) = watch.upgrade() {
            watch.mark.wake();
        }
    }
    // SAFETY (all four): the runtime passes back the `data` of a waker
    // made by `raw`; `wake` and `drop` consume it, as the contract says.
    const VTABLE: RawWakerVTable = RawWakerVTable::new(
        |data| raw(Weak::clone(&*unsafe { borrowed(data) })),
        |data| mark(&ManuallyDrop::into_inner(unsafe { borrowed(data) })),
        |data| mark(&*unsafe { borrowed(data) }),
        |data| drop(ManuallyDrop::into_inner(unsafe { borrowed(data) })),
    );
    // SAFETY: the vtable's functions honour the `RawWaker` contract: the
    // `Weak` is cloned, consumed or dropped exactly as each is called, and
    // `Weak<Watch>` is `Send + Sync` (a `Watch` is).
    unsafe { Waker::from_raw(raw(watch)) }
}

impl PoolReaders {
    /// The reader that takes the next new socket (round robin).
    pub(super) fn pick(&self) -> io::Result<Arc<PoolReader>> {
        let readers = match self.readers.get() {
            Some(r) => r,
            None => {
                let n = tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers().max(1));
                let made = (0..n)
                    .map(|i| {
                        Ok(Arc::new(PoolReader {
                            index: u32::try_from(i).unwrap_or(u32::MAX),
                            errors: Poller::new()?,
                            sockets: Mutex::new(Watched::default()),
                            marks: Arc::new(Marks::default()),
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

    /// Lets go of `socket` now, wherever it is watched: one socket, found
    /// in O(1), where [`PoolReaders::forget_retired`] looks at them all.
    pub fn forget(&self, socket: &Arc<PoolSocket<Session>>) {
        let Some((i, token)) = socket.watched() else {
            return;
        };
        if let Some(reader) = self.readers.get().and_then(|r| r.get(i)) {
            reader.forget_slot(token, socket);
        }
    }
}

impl PoolReader {
    /// Watches `socket`: registers it with the runtime (which needs a
    /// runtime here) and with the error set. Its token is queued, so the
    /// reader's first look also registers the reader's waker for it.
    pub(super) fn watch(&self, socket: Arc<PoolSocket<Session>>) -> io::Result<()> {
        let fd = socket.socket.as_raw_fd();
        // Registering outside a runtime would panic; there would be no
        // reader task to serve the socket either.
        let _runtime = tokio::runtime::Handle::try_current().map_err(io::Error::other)?;
        let mut watched = lock(&self.sockets);
        let token = watched.free.pop().unwrap_or(watched.slots.len());
        let Ok(token32) = u32::try_from(token) else {
            return Err(io::Error::other("too many pool sockets for one reader"));
        };
        // SAFETY: the registration is kept in the `Watch` beside an `Arc` of
        // the socket, and dropped before it (field order): the descriptor
        // stays the socket's while it is registered.
        let registered = unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE) }
            .map_err(io::Error::from)
            .and_then(|io| self.errors.add_errors_only(fd, token as u64).map(|()| io));
        let io = match registered {
            Ok(io) => {
                crate::net::spin::watch(fd);
                io
            }
            Err(e) => {
                if token < watched.slots.len() {
                    watched.free.push(token);
                }
                return Err(e);
            }
        };
        let watch = Arc::new_cyclic(|me| Watch {
            io,
            socket,
            mark: SocketWaker {
                marks: self.marks.clone(),
                token: token32,
                marked: AtomicBool::new(false),
                dominant_reads: AtomicU8::new(HEAVY_AFTER),
            },
            waker: weak_waker(me.clone()),
        });
        match watched.slots.get_mut(token) {
            Some(slot) => *slot = Some(watch.clone()),
            None => watched.slots.push(Some(watch.clone())),
        }
        watch.socket.set_watched(self.index, token32);
        drop(watched);
        watch.waker.wake_by_ref();
        Ok(())
    }

    /// Lets go of the socket in slot `token` if it is `socket`.
    fn forget_slot(&self, token: usize, socket: &Arc<PoolSocket<Session>>) {
        let mut watched = lock(&self.sockets);
        let Watched { slots, free } = &mut *watched;
        let Some(slot) = slots.get_mut(token) else { return };
        if slot.as_ref().is_some_and(|w| Arc::ptr_eq(&w.socket, socket)) {
            if let Some(watch) = slot.take() {
                let _ = self.errors.remove(watch.socket.socket.as_raw_fd());
            }
            free.push(token);
        }
    }

    fn forget_retired(&self) {
        let mut watched = lock(&self.sockets);
        let Watched { slots, free } = &mut *watched;
        for (token, slot) in slots.iter_mut().enumerate() {
            if slot.as_ref().is_some_and(|w| w.socket.is_retired()) {
                if let Some(watch) = slot.take() {
                    // Closing the socket would remove it from the set too,
                    // but a reply being read elsewhere may still hold it.
                    let _ = self.errors.remove(watch.socket.socket.as_raw_fd());
                }
                free.push(token);
            }
        }
    }
}

impl AsRawFd for PoolReader {
    fn as_raw_fd(&self) -> RawFd {
        self.errors.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood from one client endpoint to many destinations opens one
    /// pool socket per flow, so a `Watch` is paid per flow (issue #10: at
    /// most about 1 KiB per flow, all included). On top of it the runtime
    /// allocates 256 bytes at 128-byte alignment per registration, out of
    /// our hands. 72 bytes plus the `Arc`'s two counts is 88, one 96-byte
    /// chunk of the system allocator; a field more (the waker state as an
    /// `Arc` of its own, a 64-bit token) takes the next chunk size or a
    /// second allocation, 16 to 48 bytes more per flow.
    #[test]
    fn a_watched_socket_fits_one_small_allocation() {
        assert!(
            std::mem::size_of::<Watch>() <= 72,
            "Watch grew to {} bytes",
            std::mem::size_of::<Watch>()
        );
    }

    /// The waker holds only a `Weak`: once the `Watch` is dropped (its
    /// socket let go of), a wake does nothing and the memory is released
    /// with the waker, not kept alive by it.
    #[test]
    fn a_waker_outliving_its_watch_does_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _g = rt.enter();
        let marks = Arc::new(Marks::default());
        let pools = super::super::pool::Pools::<Session>::new(super::super::budget::FdShare::new(10), 1 << 16);
        let key = super::super::pool::PoolKey {
            v6: false,
            mark: 0,
            device: None,
        };
        let remote = "192.0.2.1:53".parse().unwrap();
        let (lease, _) = pools.lease(key, "198.51.100.1:5000".parse().unwrap(), remote).unwrap();
        let socket = lease.socket.clone();
        let fd = socket.socket.as_raw_fd();
        // SAFETY: `socket` outlives the registration (field order).
        let io = unsafe { AsyncFd::register_with_interest(Fd(fd), Interest::READABLE) }.unwrap();
        let watch = Arc::new_cyclic(|me| Watch {
            io,
            socket,
            mark: SocketWaker {
                marks: marks.clone(),
                token: 7,
                marked: AtomicBool::new(false),
                dominant_reads: AtomicU8::new(HEAVY_AFTER),
            },
            waker: weak_waker(me.clone()),
        });
        let waker = watch.waker.clone();
        waker.wake_by_ref();
        waker.wake_by_ref();
        let mut out = Vec::new();
        marks.take_now(&mut out);
        assert_eq!(out, vec![7], "queued once until taken");
        let weak = Arc::downgrade(&watch);
        drop(watch);
        assert!(weak.upgrade().is_none(), "the waker kept the Watch alive");
        waker.wake();
        marks.take_now(&mut out);
        assert_eq!(out, vec![7]);
    }
}
