//! The deadlines of a listener's upstream waits, in one queue under one
//! timer.
//!
//! Every upstream try is bounded (`server_timeout`, cut short by the
//! client's deadline), and a group's race waits for its next hedge. With
//! a tokio timer per wait (`timeout_at`, `sleep_until`), each try paid for
//! the timer's creation, its registration in the timer wheel (under the
//! wheel's lock) and its cancel: about 630 of a miss's 14,300
//! instructions (callgrind), for a timer that almost never fires, as the
//! answer comes first.
//!
//! Here the waits of the futures a listener drives ([`super::misses`]) go
//! into that listener's queue ([`Deadlines`]), sorted by deadline, and the
//! listener keeps ONE tokio sleep ([`Timer`]), armed to the earliest
//! deadline. A server's timeout is a constant, so its tries expire in the
//! order they were sent: a new deadline goes at the back, and the sleep
//! is re-armed only when it fires or when a deadline earlier than the one
//! it is armed to comes in (a hedge, a try cut short by its client's
//! deadline). A wait that ends first takes its entry out of the queue; it
//! leaves the sleep armed (firing early only costs a look at the queue).
//!
//! What tokio's timers guaranteed still holds: the inner future is polled
//! first (an answer that is in wins over a deadline passed in the same
//! turn), a deadline counts as passed once the clock reads at or after
//! it, never before, and a passed deadline wakes its wait. A wait polled
//! outside a listener's drive (a TCP connection's query, a test) has no
//! queue to join and uses tokio's own timer, with the same meaning.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio::time::{Instant, Sleep};

/// A wait's deadline passed before its future was ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

thread_local! {
    /// The queue of the listener whose futures this thread is polling
    /// now ([`Timer::enter`]); `None` outside a drive.
    static CURRENT: RefCell<Option<Arc<Deadlines>>> = const { RefCell::new(None) };
}

/// One listener's waiting deadlines.
///
/// Behind a mutex only because the futures that hold it must be `Send`:
/// it is touched by one listener's task at a time, so never contended.
#[derive(Default)]
pub struct Deadlines {
    queue: Mutex<Queue>,
}

impl Deadlines {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Deadlines waiting (for the tests).
    #[cfg(test)]
    fn waiting(&self) -> usize {
        self.queue().live
    }
}

/// Entries sorted by `(at, id)`. The front one is always waiting (or the
/// queue empty): an entry whose wait ended before its deadline is taken
/// out at once when it is at the front, and only marked otherwise, then
/// swept once it reaches the front (or when the marked ones outnumber the
/// waiting ones).
#[derive(Default)]
struct Queue {
    entries: VecDeque<Entry>,
    next_id: u64,
    /// Entries still waiting (with a waker).
    live: usize,
}

struct Entry {
    at: Instant,
    /// Tells entries with the same deadline apart, in the order they came.
    id: u64,
    /// `None` once its wait ended.
    waker: Option<Waker>,
}

impl Queue {
    /// Adds a wait until `at`; its number.
    fn add(&mut self, at: Instant, waker: Waker) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.live += 1;
        let entry = Entry {
            at,
            id,
            waker: Some(waker),
        };
        // Ids only grow, so the new entry goes after every one with the
        // same deadline: at the back, unless its deadline is earlier.
        if self.entries.back().is_none_or(|last| last.at <= at) {
            self.entries.push_back(entry);
        } else {
            let at_or_before = self.entries.partition_point(|e| e.at <= at);
            self.entries.insert(at_or_before, entry);
        }
        id
    }

    fn find(&mut self, at: Instant, id: u64) -> Option<&mut Entry> {
        // Where it is while every entry went in at the back and none was
        // swept from the middle: the usual case, and no search (a binary
        // search was about 280 instructions a try with 500 misses waiting).
        let guess = self
            .entries
            .front()
            .and_then(|front| usize::try_from(id.wrapping_sub(front.id)).ok());
        let i = match guess.filter(|&i| self.entries.get(i).is_some_and(|e| e.id == id)) {
            Some(i) => i,
            None => self.entries.binary_search_by(|e| (e.at, e.id).cmp(&(at, id))).ok()?,
        };
        self.entries.get_mut(i)
    }

    /// The wait `(at, id)` ended: nothing to wake for it any more (nothing
    /// to do if it already expired).
    fn remove(&mut self, at: Instant, id: u64) {
        if self.find(at, id).and_then(|e| e.waker.take()).is_some() {
            self.live -= 1;
            self.sweep();
        }
    }

    /// The wait `(at, id)` is now woken by `waker`.
    fn rewake(&mut self, at: Instant, id: u64, waker: &Waker) {
        if let Some(old) = self.find(at, id).and_then(|e| e.waker.as_mut())
            && !old.will_wake(waker)
        {
            old.clone_from(waker);
        }
    }

    /// Moves the wakers of the waits whose deadline is at or before `now`
    /// into `due`.
    fn expire(&mut self, now: Instant, due: &mut Vec<Waker>) {
        while let Some(front) = self.entries.front()
            && front.at <= now
        {
            if let Some(waker) = self.entries.pop_front().and_then(|e| e.waker) {
                self.live -= 1;
                due.push(waker);
            }
        }
        self.sweep();
    }

    /// Drops ended entries from the front, and all of them when they are
    /// more than the waiting ones (a wait that outlives many short ones
    /// would otherwise hold every one behind it until its deadline).
    fn sweep(&mut self) {
        while self.entries.front().is_some_and(|e| e.waker.is_none()) {
            self.entries.pop_front();
        }
        if self.entries.len() > 2 * self.live + 64 {
            self.entries.retain(|e| e.waker.is_some());
        }
    }

    fn earliest(&self) -> Option<Instant> {
        self.entries.front().map(|e| e.at)
    }
}

/// `fut`, unless `at` passes first ([`Timeout`]).
pub fn timeout_at<F: Future>(at: Instant, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        at,
        wait: Wait::New,
    }
}

/// Waits until `at`, as [`timeout_at`] does.
pub fn sleep_until(at: Instant) -> SleepUntil {
    SleepUntil(timeout_at(at, std::future::pending()))
}

/// A future bounded by a deadline: inside a listener's drive the
/// deadline joins that listener's queue; elsewhere it is a tokio timer
/// (`tokio::time::timeout_at`).
///
/// A struct rather than an `async fn`: the `async fn` moved the future
/// it bounds (a try's, about 800 bytes) into its own state and again
/// into the pinned place, two `memcpy`s a try (about 200 instructions).
pub struct Timeout<F> {
    /// Pinned where it lies while the `Timeout` is (structural pinning:
    /// nothing moves it out, `Drop` does not touch it).
    fut: F,
    at: Instant,
    wait: Wait,
}

enum Wait {
    /// Not polled yet: where it waits is decided at the first poll,
    /// inside or outside a drive.
    New,
    /// In a listener's queue, as entry number `id`.
    Queued(Arc<Deadlines>, u64),
    /// On tokio's own timer.
    Tokio(Pin<Box<Sleep>>),
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        // SAFETY: `fut` is structurally pinned: it is only ever polled
        // through this projection, never moved out or replaced, and the
        // `Drop` below leaves it alone. `at` and `wait` are not pinned.
        let this = unsafe { self.get_unchecked_mut() };
        let fut = unsafe { Pin::new_unchecked(&mut this.fut) };
        // The future first: an answer that is in wins.
        if let Poll::Ready(out) = fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        match &mut this.wait {
            // The first wait: the clock need not be read, the caller has
            // just set the deadline from it (one already passed fires at
            // the listener's next turn of its timer).
            Wait::New => {
                this.wait = match CURRENT.with_borrow(Clone::clone) {
                    Some(deadlines) => {
                        let id = deadlines.queue().add(this.at, cx.waker().clone());
                        Wait::Queued(deadlines, id)
                    }
                    None => {
                        let mut sleep = Box::pin(tokio::time::sleep_until(this.at));
                        if sleep.as_mut().poll(cx).is_ready() {
                            return Poll::Ready(Err(Elapsed));
                        }
                        Wait::Tokio(sleep)
                    }
                };
                Poll::Pending
            }
            // Woken again: by the timer, or by the future for nothing.
            Wait::Queued(deadlines, id) => {
                if Instant::now() >= this.at {
                    return Poll::Ready(Err(Elapsed));
                }
                deadlines.queue().rewake(this.at, *id, cx.waker());
                Poll::Pending
            }
            Wait::Tokio(sleep) => sleep.as_mut().poll(cx).map(|()| Err(Elapsed)),
        }
    }
}

impl<F> Drop for Timeout<F> {
    fn drop(&mut self) {
        if let Wait::Queued(deadlines, id) = &self.wait {
            deadlines.queue().remove(self.at, *id);
        }
    }
}

/// [`sleep_until`]'s future.
pub struct SleepUntil(Timeout<std::future::Pending<()>>);

impl Future for SleepUntil {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        Pin::new(&mut self.0).poll(cx).map(|_| ())
    }
}

/// A listener's side: its queue and the one sleep armed to the queue's
/// earliest deadline.
#[derive(Default)]
pub struct Timer {
    /// Its queue; lent to [`CURRENT`] while the listener polls its
    /// futures (moved, not cloned: no count to change per drive).
    deadlines: Option<Arc<Deadlines>>,
    /// Made at the first arming (it needs the runtime), then reset.
    sleep: Option<Pin<Box<Sleep>>>,
    /// What the sleep is armed to; `None` when it is not.
    armed: Option<Instant>,
    fired: Arc<Fired>,
    /// The wakers of expired waits (kept for its allocation).
    due: Vec<Waker>,
}

/// The sleep's waker: notes that it fired and wakes the listener.
#[derive(Default)]
struct Fired {
    fired: AtomicBool,
    listener: AtomicWaker,
}

impl Wake for Fired {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::SeqCst);
        self.listener.wake();
    }
}

/// While it lives, the waits polled on this thread join its listener's
/// queue ([`Timer::enter`]).
pub struct Entered<'t> {
    timer: &'t mut Timer,
    previous: Option<Arc<Deadlines>>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let previous = self.previous.take();
        self.timer.deadlines = CURRENT.with_borrow_mut(|c| std::mem::replace(c, previous));
    }
}

impl Timer {
    /// Wakes the waits whose deadline has passed, if the sleep fired:
    /// before the listener collects its woken futures, so that they are
    /// polled in the same drive.
    pub fn expire(&mut self) {
        if !self.fired.fired.swap(false, Ordering::SeqCst) {
            return;
        }
        self.armed = None;
        let Some(deadlines) = self.deadlines.as_ref() else {
            return;
        };
        deadlines.queue().expire(Instant::now(), &mut self.due);
        // Woken outside the lock.
        for waker in self.due.drain(..) {
            waker.wake();
        }
    }

    /// Makes this listener's queue the one the waits polled on this
    /// thread join, until the guard is dropped.
    pub fn enter(&mut self) -> Entered<'_> {
        let ours = self.deadlines.take().unwrap_or_default();
        let previous = CURRENT.with_borrow_mut(|c| c.replace(ours));
        Entered { timer: self, previous }
    }

    /// After the listener polled its futures: arms the sleep to the
    /// earliest deadline if it is not armed to that or earlier; the
    /// listener (`cx`) is woken when it fires.
    pub fn arm(&mut self, cx: &mut Context<'_>) {
        let Some(earliest) = self.deadlines.as_ref().and_then(|d| d.queue().earliest()) else {
            return;
        };
        // Whoever is to be woken now (the same listener every time, so
        // this is a compare).
        self.fired.listener.register(cx.waker());
        if self.armed.is_some_and(|armed| armed <= earliest) {
            return;
        }
        self.armed = Some(earliest);
        let sleep = match self.sleep.as_mut() {
            Some(sleep) => {
                sleep.as_mut().reset(earliest);
                sleep
            }
            None => self.sleep.insert(Box::pin(tokio::time::sleep_until(earliest))),
        };
        let waker = Waker::from(self.fired.clone());
        if sleep.as_mut().poll(&mut Context::from_waker(&waker)).is_ready() {
            waker.wake();
        }
    }

    /// Deadlines waiting (for the tests).
    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.deadlines.as_ref().map_or(0, |d| d.waiting())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::misses::{Misses, until_ended};
    use std::sync::Mutex as StdMutex;
    use std::time::Duration;

    /// Polls `f` once.
    async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
    }

    type Log = Arc<StdMutex<Vec<(&'static str, bool)>>>;

    /// A try that never hears back, timed out at `start + after`: logs
    /// its name, and whether the clock had reached its deadline.
    async fn silent(name: &'static str, start: Instant, after: Duration, log: Log) {
        let at = start + after;
        let out = timeout_at(at, std::future::pending::<()>()).await;
        assert_eq!(out, Err(Elapsed));
        log.lock().unwrap().push((name, Instant::now() >= at));
    }

    /// Deadlines that come in out of order expire in the order of their
    /// deadlines, none before it, each once, and leave the queue empty.
    #[tokio::test]
    async fn deadlines_expire_in_their_order_and_never_early() {
        let mut misses = Misses::default();
        let log: Log = Arc::default();
        let start = Instant::now();
        for (name, ms) in [("c", 90), ("a", 30), ("d", 120), ("b", 60)] {
            misses.push(silent(name, start, Duration::from_millis(ms), log.clone()));
        }
        tokio::time::timeout(Duration::from_secs(10), until_ended(&mut misses, 4))
            .await
            .expect("every deadline fires");
        let log = log.lock().unwrap().clone();
        assert_eq!(
            log,
            [("a", true), ("b", true), ("c", true), ("d", true)],
            "in the order of their deadlines, none early"
        );
        assert_eq!(misses.deadlines_waiting(), 0);
    }

    /// A try answered before its deadline is not timed out and leaves no
    /// deadline behind; one left silent beside it still times out.
    #[tokio::test]
    async fn a_try_answered_in_time_is_not_timed_out() {
        let mut misses = Misses::default();
        let log: Log = Arc::default();
        let start = Instant::now();
        let (tx, rx) = tokio::sync::oneshot::channel::<u32>();
        let answered = Arc::new(StdMutex::new(None));
        let got = answered.clone();
        misses.push(async move {
            let out = timeout_at(start + Duration::from_secs(30), rx).await;
            *got.lock().unwrap() = Some(out.map(Result::ok));
        });
        misses.push(silent("silent", start, Duration::from_millis(40), log.clone()));
        {
            let mut drive = std::pin::pin!(until_ended(&mut misses, 1));
            // Both wait (one drive); then the answer comes.
            assert!(poll_once(&mut drive.as_mut()).await.is_pending());
            tx.send(7).unwrap();
            tokio::time::timeout(Duration::from_secs(10), drive)
                .await
                .expect("answered");
        }
        assert_eq!(
            *answered.lock().unwrap(),
            Some(Ok(Some(7))),
            "the answer, not a timeout"
        );
        assert_eq!(misses.deadlines_waiting(), 1, "its deadline left with it");
        tokio::time::timeout(Duration::from_secs(10), until_ended(&mut misses, 1))
            .await
            .expect("the silent one times out");
        assert_eq!(*log.lock().unwrap(), [("silent", true)]);
        assert_eq!(misses.deadlines_waiting(), 0);
    }

    /// A race as `failover` runs it: the first server's try is bounded by
    /// its timeout, and the wait for the hedge, which comes in after the
    /// timer was armed to that timeout but is due earlier, fires first; the second server's try (the hedge) is then
    /// asked while the first is still pending, and the first still times
    /// out at its own deadline.
    #[tokio::test]
    async fn the_hedge_fires_before_an_earlier_armed_timeout() {
        let mut misses = Misses::default();
        let log: Log = Arc::default();
        let start = Instant::now();
        let events = log.clone();
        misses.push(async move {
            let first_at = start + Duration::from_millis(400);
            let hedge_at = start + Duration::from_millis(50);
            let mut first = std::pin::pin!(timeout_at(first_at, std::future::pending::<()>()));
            // The first try joins the queue, and the timer is armed to it
            // at the end of this drive, before the hedge's wait comes in.
            assert!(poll_once(&mut first.as_mut()).await.is_pending());
            tokio::task::yield_now().await;
            tokio::select! {
                biased;
                _ = first.as_mut() => events.lock().unwrap().push(("first timed out", false)),
                () = sleep_until(hedge_at) => events.lock().unwrap().push(("hedge", Instant::now() >= hedge_at)),
            }
            // The hedge's try, pending while the first one runs out.
            let second_at = Instant::now() + Duration::from_secs(30);
            let mut second = std::pin::pin!(timeout_at(second_at, std::future::pending::<()>()));
            tokio::select! {
                biased;
                out = first.as_mut() => {
                    assert_eq!(out, Err(Elapsed));
                    events.lock().unwrap().push(("first timed out", Instant::now() >= first_at));
                }
                _ = second.as_mut() => events.lock().unwrap().push(("second timed out", false)),
            }
        });
        tokio::time::timeout(Duration::from_secs(10), until_ended(&mut misses, 1))
            .await
            .expect("the race ends");
        assert_eq!(
            *log.lock().unwrap(),
            [("hedge", true), ("first timed out", true)],
            "the hedge at its time, then the first try at its own"
        );
        assert_eq!(misses.deadlines_waiting(), 0, "the hedge's try took its deadline along");
    }

    /// Outside a listener's drive, a wait is tokio's own timer.
    #[tokio::test]
    async fn outside_a_drive_tokio_keeps_the_time() {
        let at = Instant::now() + Duration::from_millis(10);
        assert_eq!(timeout_at(at, std::future::pending::<()>()).await, Err(Elapsed));
        assert!(Instant::now() >= at);
        assert_eq!(timeout_at(at, async { 5 }).await, Ok(5));
    }

    /// Ended entries behind a waiting one are swept before they pile up.
    #[test]
    fn ended_entries_do_not_pile_up_behind_a_waiting_one() {
        let mut q = Queue::default();
        let start = Instant::now();
        let waker = Waker::noop();
        let first = q.add(start + Duration::from_secs(60), waker.clone());
        for i in 0..10_000u64 {
            let at = start + Duration::from_secs(61) + Duration::from_micros(i);
            let id = q.add(at, waker.clone());
            q.remove(at, id);
            assert!(q.entries.len() <= 2 * q.live + 65);
        }
        assert_eq!(q.live, 1);
        q.remove(start + Duration::from_secs(60), first);
        assert!(q.entries.is_empty());
    }
}
