//! The cache misses (and the other upstream work) of one UDP listener,
//! driven by the listener's own task instead of a task each.
//!
//! A miss used to be a task of its own: spawned, scheduled, woken and
//! completed through tokio's task machinery, its cancellation a select
//! against the service's token. callgrind counted about 2,700 user-space
//! instructions per miss for that alone (spawn, its aligned allocation,
//! the token's wait, completion), an eighth of a miss. Here the
//! listener owns a set of its waiting misses ([`Misses`]): a miss
//! whose upstream socket becomes readable wakes the listener, which polls
//! only the misses that were woken ([`Misses::drive`]), and sends
//! every answer they gave in one go.
//!
//! What does not change: each miss is still bounded by a permit of the
//! service's [`MAX_PENDING`](super::server) (taken before it joins the
//! set), so a flood of unique names holds at most that many misses,
//! whichever listener they came through. A miss ends when its future
//! ends, or when it is dropped: the listener drops its set when it
//! returns at shutdown (its shutdown branch is polled before the misses),
//! and dropping a miss gives back its permit, its upstream socket lease
//! and its single-flight place as cancelling its task did.

use std::any::Any;
use std::future::Future;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

use super::deadlines::Timer;

/// Slots whose memory for their miss's future is kept for the next miss
/// once it ends (see [`Work`]); the others free it at once. A miss's
/// future is about 2 KB, so a listener keeps at most about 1 MB this way
/// after a burst: as many misses as the bench's dnsperf keeps waiting
/// (512) are served without an allocation each.
const KEEP_BOXES: usize = 512;

/// One piece of upstream work (a miss, a prefetch, a held answer) as a
/// slot holds it: in a box of its own, which outlives the work.
///
/// The box was allocated for each miss and freed when it ended: with
/// the `memcpy` into it, about 700 of a miss's 14,500 instructions
/// (callgrind, round 15), among the allocations a burst of misses makes
/// past glibc's per-thread cache. A slot holds any of three kinds of
/// work, which stable Rust cannot name in one field, so each is boxed
/// as a [`Kept<F>`]: empty once it ended (everything it held dropped
/// then, as before), and the next work of the same type `F` is moved
/// into that same memory ([`Work::refill`]), found by its type.
trait Work: Send {
    /// Polls the work; once it is ready it is dropped and the box stays
    /// empty.
    fn poll_work(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;

    /// Moves the work `next` (an `F`) here, if this work has ended and is
    /// of the same type `F`; whether it did.
    ///
    /// # Safety
    ///
    /// When it returns `true`, `next` has been moved out bit for bit: the
    /// caller must neither use nor drop it again (`mem::forget` it).
    unsafe fn refill(self: Pin<&mut Self>, next: &mut dyn Any) -> bool;

    /// Whether it has ended.
    fn ended(&self) -> bool;

    /// Bytes of the box: what it asked the allocator for.
    #[cfg(test)]
    fn size(&self) -> usize;
}

/// A box's work: `work` holds an `F` while `live`, nothing once it
/// ended.
///
/// It was an `Option<F>`, refilled safely: the work put in an `Option`,
/// taken out of it and `Pin::set` into the box, three `memcpy`s of the
/// whole future (about 2 KB), about 680 of a miss's 14,300 instructions
/// (callgrind, round 17). Here the caller's argument is copied into the
/// empty box once, which no safe move of an `Option` came down to (a
/// `ptr::write` of `Some(ptr::read(..))` still went through a copy on
/// the stack). The work is pinned where it lies: it is only ever polled
/// there and dropped there, and written over only while empty.
struct Kept<F> {
    live: bool,
    work: MaybeUninit<F>,
}

impl<F> Kept<F> {
    fn new(work: F) -> Self {
        Kept {
            live: true,
            work: MaybeUninit::new(work),
        }
    }
}

impl<F> Drop for Kept<F> {
    fn drop(&mut self) {
        if self.live {
            // Cleared first: a drop that panics leaks the rest, never
            // drops it twice.
            self.live = false;
            // SAFETY: `live` said it holds an `F`, dropped in place (as
            // its pin requires) and never again.
            unsafe { self.work.assume_init_drop() }
        }
    }
}

impl<F: Future<Output = ()> + Send + 'static> Work for Kept<F> {
    fn poll_work(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        // SAFETY: nothing here moves the work out of the box: it is
        // polled and dropped in place.
        let this = unsafe { self.get_unchecked_mut() };
        if !this.live {
            return Poll::Ready(());
        }
        // SAFETY: `live` says it holds an `F`, which stays where it is
        // until it is dropped (the box is pinned, `Kept` never moves it).
        let work = unsafe { Pin::new_unchecked(this.work.assume_init_mut()) };
        if work.poll(cx).is_pending() {
            return Poll::Pending;
        }
        // Its permit, socket lease and engine go now, not at the next
        // miss that reuses the memory.
        this.live = false;
        // SAFETY: it held an `F` until now, dropped once, in place.
        unsafe { this.work.assume_init_drop() };
        Poll::Ready(())
    }

    unsafe fn refill(self: Pin<&mut Self>, next: &mut dyn Any) -> bool {
        if self.live {
            return false;
        }
        let Some(next) = next.downcast_mut::<F>() else {
            return false;
        };
        // SAFETY: the box is empty, so nothing pinned is written over and
        // nothing needs dropping. `next` was never pinned, and the caller
        // forgets it (the contract above), so its bits move here once.
        let this = unsafe { self.get_unchecked_mut() };
        unsafe { std::ptr::copy_nonoverlapping(std::ptr::from_mut(next), this.work.as_mut_ptr(), 1) };
        this.live = true;
        true
    }

    fn ended(&self) -> bool {
        !self.live
    }

    #[cfg(test)]
    fn size(&self) -> usize {
        std::mem::size_of::<Self>()
    }
}

/// A listener's waiting misses: slots that hold one miss each and are
/// kept for the next, each with a waker of its own that queues the slot's
/// number and wakes the listener.
///
/// It was a `FuturesUnordered`, which allocates a node for every future
/// pushed (its waker and its links) and frees it when the future ends:
/// with its bookkeeping, about 750 instructions a miss (callgrind, round
/// 15), the node's allocation among those a burst of misses makes past
/// glibc's per-thread cache. A slot and its waker are made once and serve
/// one miss after another, and so does the box its miss's future is in
/// (the first [`KEEP_BOXES`] slots; see [`Work`]). The slots stay for the
/// next burst: at most as many as ever waited at once, which the
/// service's `MAX_PENDING` bounds.
#[derive(Default)]
pub struct Misses {
    slots: Vec<Slot>,
    /// Slots holding no miss, the last freed last.
    free: Vec<usize>,
    /// Misses waiting.
    len: usize,
    woken: Arc<Woken>,
    /// The slots a drive polls, taken from `woken` at its start (kept for
    /// its allocation).
    round: Vec<usize>,
    /// The deadlines of the misses' upstream tries and hedges, under one
    /// tokio sleep ([`super::deadlines`]).
    timer: Timer,
}

struct Slot {
    /// The miss waiting here, or the box an ended one left for the next.
    work: Option<Pin<Box<dyn Work>>>,
    waker: Waker,
    wake: Arc<SlotWake>,
}

impl Slot {
    /// Whether a miss waits here.
    fn busy(&self) -> bool {
        self.work.as_ref().is_some_and(|work| !work.ended())
    }
}

/// Slots woken since the last drive, and the listener to wake for them.
#[derive(Default)]
struct Woken {
    queue: Mutex<Vec<usize>>,
    listener: AtomicWaker,
}

impl Woken {
    fn queue(&self) -> MutexGuard<'_, Vec<usize>> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A slot's waker. Woken by whatever its miss waits on, possibly on
/// another thread, possibly after that miss ended and another took the
/// slot: the slot is then polled once for nothing, which a future allows.
struct SlotWake {
    index: usize,
    /// In `woken`'s queue already: a slot is queued once however often it
    /// is woken before its next poll.
    queued: AtomicBool,
    woken: Arc<Woken>,
}

impl SlotWake {
    /// Queues the slot; whether it was not queued already.
    fn queue(&self) -> bool {
        if self.queued.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.woken.queue().push(self.index);
        true
    }
}

impl Wake for SlotWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queue() {
            self.woken.listener.wake();
        }
    }
}

impl std::fmt::Debug for Misses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Misses").field("waiting", &self.len).finish()
    }
}

impl Misses {
    /// Adds `work`; it is first polled at the listener's next
    /// [`Misses::drive`].
    pub fn push<F: Future<Output = ()> + Send + 'static>(&mut self, mut work: F) {
        let index = match self.free.pop() {
            Some(index) => index,
            None => {
                let index = self.slots.len();
                let wake = Arc::new(SlotWake {
                    index,
                    queued: AtomicBool::new(false),
                    woken: self.woken.clone(),
                });
                self.slots.push(Slot {
                    work: None,
                    waker: Waker::from(wake.clone()),
                    wake,
                });
                index
            }
        };
        let Some(slot) = self.slots.get_mut(index) else {
            return;
        };
        // Into the box an ended miss of the same type left here; else a
        // box of its own (which keeps a miss's large future from being
        // moved again once it is in).
        // SAFETY: `work` is forgotten below when it was moved into the box.
        let refilled = slot
            .work
            .as_mut()
            .is_some_and(|kept| unsafe { kept.as_mut().refill(&mut work) });
        if refilled {
            std::mem::forget(work);
        } else {
            let boxed: Pin<Box<dyn Work>> = Box::pin(Kept::new(work));
            slot.work = Some(boxed);
        }
        self.len += 1;
        // Queued without waking the listener: it is the one pushing, and
        // drives its misses before it next waits.
        slot.wake.queue();
    }

    /// Misses waiting.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots made so far (each kept for the next miss).
    #[cfg(test)]
    fn slots(&self) -> usize {
        self.slots.len()
    }

    /// Boxes allocated for work and still held, waiting or kept.
    #[cfg(test)]
    fn boxes(&self) -> usize {
        self.slots.iter().filter(|slot| slot.work.is_some()).count()
    }

    /// Where `slot`'s box is, if it has one (to tell it was reused).
    #[cfg(test)]
    fn box_at(&self, slot: usize) -> Option<*const ()> {
        let work = self.slots.get(slot)?.work.as_ref()?;
        Some(std::ptr::from_ref::<dyn Work>(&**work).cast::<()>())
    }

    /// Bytes of the largest waiting future's box: what it asks the
    /// allocator for.
    #[cfg(test)]
    pub fn largest(&self) -> usize {
        self.slots
            .iter()
            .filter(|slot| slot.busy())
            .filter_map(|slot| slot.work.as_ref())
            .map(|work| work.size())
            .max()
            .unwrap_or(0)
    }

    /// Polls the misses that were woken; how many ended. Each woken miss
    /// registers for its next wake-up (which wakes the listener) or
    /// ends. The listener sends the answers they gave right after (a miss
    /// may answer and go on: a stale answer, then the refresh).
    ///
    /// Only the misses woken before the drive began are polled: one woken
    /// again meanwhile (or waking itself) is polled at the next drive,
    /// after the listener has read its queries again (its wake wakes the
    /// listener), so a burst of answers cannot keep the listener from
    /// reading new queries.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> usize {
        // No miss waiting (the usual case on a relay wake-up): nothing to
        // poll and nothing that could wake the listener. A miss pushed
        // later is first polled at the next drive, as [`Misses::push`]
        // says, so the listener's waker needs no registering now.
        if self.len == 0 {
            return 0;
        }
        // Registered before the queue is taken: a slot woken after that
        // wakes this listener.
        self.woken.listener.register(cx.waker());
        // Misses whose deadline passed are woken first, to be polled now.
        self.timer.expire();
        std::mem::swap(&mut *self.woken.queue(), &mut self.round);
        let mut ended = 0;
        let entered = self.timer.enter();
        for &index in &self.round {
            let Some(slot) = self.slots.get_mut(index) else {
                continue;
            };
            // Before the poll: a wake from here on queues the slot again.
            slot.wake.queued.store(false, Ordering::SeqCst);
            if !slot.busy() {
                continue; // woken after its miss ended
            }
            let Some(work) = slot.work.as_mut() else {
                continue;
            };
            if work
                .as_mut()
                .poll_work(&mut Context::from_waker(&slot.waker))
                .is_ready()
            {
                // Ended: its permit and socket went with it; its box
                // stays for the next miss, in the first slots.
                if index >= KEEP_BOXES {
                    slot.work = None;
                }
                self.free.push(index);
                self.len -= 1;
                ended += 1;
            }
        }
        drop(entered);
        self.timer.arm(cx);
        self.round.clear();
        ended
    }

    /// Deadlines the misses wait for.
    #[cfg(test)]
    pub fn deadlines_waiting(&self) -> usize {
        self.timer.waiting()
    }
}

/// Drives `misses` until `n` more have ended (or forever); shared by this
/// module's tests and those of [`super::deadlines`].
#[cfg(test)]
pub(crate) async fn until_ended(misses: &mut Misses, n: usize) {
    let mut seen = 0;
    std::future::poll_fn(|cx| {
        seen += misses.drive(cx);
        if seen >= n { Poll::Ready(()) } else { Poll::Pending }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Poll;
    use std::time::Duration;

    #[tokio::test]
    async fn misses_end_when_driven_and_are_dropped_with_the_set() {
        let ended = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(());
        let mut misses = Misses::default();
        assert!(
            tokio::time::timeout(Duration::from_millis(5), until_ended(&mut misses, 1))
                .await
                .is_err(),
            "an empty set never ends a miss"
        );
        for ms in [10, 20] {
            let ended = ended.clone();
            misses.push(async move {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                ended.fetch_add(1, Ordering::Relaxed);
            });
        }
        let never = held.clone();
        misses.push(async move {
            std::future::pending::<()>().await;
            drop(never);
        });
        tokio::time::timeout(Duration::from_secs(5), until_ended(&mut misses, 2))
            .await
            .expect("the two timed misses end when driven");
        assert_eq!(ended.load(Ordering::Relaxed), 2);
        assert_eq!(misses.len(), 1);
        assert_eq!(Arc::strong_count(&held), 2, "the waiting miss holds its share");
        drop(misses);
        assert_eq!(Arc::strong_count(&held), 1, "dropping the set ends the waiting miss");
    }

    /// A waker that counts its wakes (the listener's, in these tests).
    struct Counted(AtomicUsize);

    impl std::task::Wake for Counted {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A miss that waits `polls` polls, waking itself each time, and
    /// counts how often it was polled.
    fn self_waking(polls: usize, seen: Arc<AtomicUsize>) -> impl Future<Output = ()> + Send {
        std::future::poll_fn(move |cx| {
            if seen.fetch_add(1, Ordering::SeqCst) + 1 >= polls {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
    }

    /// A miss woken while it is polled (here, by itself) is polled again
    /// at the next drive, not in the same one, and its wake wakes the
    /// listener so that there is a next drive; a miss nobody woke is not
    /// polled at all.
    #[test]
    fn a_miss_woken_while_polled_waits_for_the_next_drive() {
        let listener = Arc::new(Counted(AtomicUsize::new(0)));
        let waker = Waker::from(listener.clone());
        let mut cx = Context::from_waker(&waker);
        let mut misses = Misses::default();
        let (busy, idle) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        misses.push(self_waking(3, busy.clone()));
        let idle_seen = idle.clone();
        misses.push(std::future::poll_fn(move |_| {
            idle_seen.fetch_add(1, Ordering::SeqCst);
            Poll::<()>::Pending
        }));
        assert_eq!(misses.drive(&mut cx), 0);
        assert_eq!((busy.load(Ordering::SeqCst), idle.load(Ordering::SeqCst)), (1, 1));
        assert_eq!(listener.0.load(Ordering::SeqCst), 1, "its wake woke the listener");
        assert_eq!(misses.drive(&mut cx), 0);
        assert_eq!((busy.load(Ordering::SeqCst), idle.load(Ordering::SeqCst)), (2, 1));
        assert_eq!(misses.drive(&mut cx), 1);
        assert_eq!((busy.load(Ordering::SeqCst), idle.load(Ordering::SeqCst)), (3, 1));
        assert_eq!(misses.len(), 1);
        assert_eq!(misses.drive(&mut cx), 0, "nothing woke the other one");
        assert_eq!(idle.load(Ordering::SeqCst), 1);
    }

    /// A slot serves one miss after another. A waker its earlier miss
    /// left behind (an upstream socket's registration, say) may still
    /// wake it: the miss now in it is polled once for nothing, and neither
    /// ends early nor stops being polled when it is woken itself.
    #[test]
    fn a_slot_serves_miss_after_miss_and_a_stale_wake_ends_nothing() {
        let listener = Arc::new(Counted(AtomicUsize::new(0)));
        let waker = Waker::from(listener.clone());
        let mut cx = Context::from_waker(&waker);
        let mut misses = Misses::default();
        let left: Arc<Mutex<Option<Waker>>> = Arc::default();
        let kept = left.clone();
        misses.push(std::future::poll_fn(move |cx| {
            *kept.lock().unwrap() = Some(cx.waker().clone());
            Poll::Ready(())
        }));
        assert_eq!(misses.drive(&mut cx), 1);
        for _ in 0..100 {
            misses.push(async {});
            assert_eq!(misses.drive(&mut cx), 1);
        }
        assert_eq!(misses.slots(), 1, "one slot for misses one at a time");
        // The next one waits for a flag, woken by whoever sets it.
        let (flag, polls) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
        let own: Arc<Mutex<Option<Waker>>> = Arc::default();
        let (f, p, o) = (flag.clone(), polls.clone(), own.clone());
        misses.push(std::future::poll_fn(move |cx| {
            p.fetch_add(1, Ordering::SeqCst);
            if f.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *o.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }));
        assert_eq!(misses.drive(&mut cx), 0);
        assert_eq!(misses.drive(&mut cx), 0, "not woken: not polled");
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        let before = listener.0.load(Ordering::SeqCst);
        left.lock().unwrap().take().unwrap().wake();
        assert_eq!(
            listener.0.load(Ordering::SeqCst),
            before + 1,
            "a wake wakes the listener"
        );
        assert_eq!(misses.drive(&mut cx), 0, "a stale wake ends nothing");
        assert_eq!((polls.load(Ordering::SeqCst), misses.len()), (2, 1));
        flag.store(true, Ordering::SeqCst);
        let wake = std::thread::spawn({
            let own = own.clone();
            move || own.lock().unwrap().take().unwrap().wake()
        });
        wake.join().unwrap();
        assert_eq!(misses.drive(&mut cx), 1, "woken from another thread, it ends");
        assert!(misses.is_empty());
        assert_eq!(misses.slots(), 1);
    }

    /// A miss that holds `share` and waits until `go` is set (woken by
    /// whoever sets it, through the waker it leaves in `waker`). One
    /// type for every call, so that its boxes can be reused.
    fn gated(
        share: Arc<()>,
        go: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        std::future::poll_fn(move |cx| {
            let _held = &share;
            if go.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
            *waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        })
    }

    fn listener_cx() -> (Arc<Counted>, Waker) {
        let listener = Arc::new(Counted(AtomicUsize::new(0)));
        let waker = Waker::from(listener.clone());
        (listener, waker)
    }

    /// A miss that ends drops what it held at once, and leaves its box in
    /// its slot: the next miss of its type is written into that same
    /// memory, with no box of its own; work of another type gets a box
    /// of its own in its place.
    #[test]
    fn an_ended_miss_leaves_its_box_to_the_next_of_its_type() {
        let (_listener, waker) = listener_cx();
        let mut cx = Context::from_waker(&waker);
        let mut misses = Misses::default();
        let share = Arc::new(());
        let go = Arc::new(AtomicBool::new(false));
        let left: Arc<Mutex<Option<Waker>>> = Arc::default();
        misses.push(gated(share.clone(), go.clone(), left.clone()));
        assert_eq!(misses.drive(&mut cx), 0);
        let first = misses.box_at(0).expect("a box for the miss");
        go.store(true, Ordering::SeqCst);
        left.lock().unwrap().take().unwrap().wake();
        assert_eq!(misses.drive(&mut cx), 1);
        assert_eq!(Arc::strong_count(&share), 1, "what it held went when it ended");
        assert_eq!((misses.len(), misses.boxes()), (0, 1), "its box stays");
        // The next of the same type, waiting this time: the same memory.
        let go = Arc::new(AtomicBool::new(false));
        misses.push(gated(share.clone(), go.clone(), left.clone()));
        assert_eq!(misses.box_at(0), Some(first), "written into the kept box");
        assert_eq!(misses.drive(&mut cx), 0);
        assert_eq!((misses.len(), Arc::strong_count(&share)), (1, 2));
        go.store(true, Ordering::SeqCst);
        left.lock().unwrap().take().unwrap().wake();
        assert_eq!(misses.drive(&mut cx), 1);
        assert_eq!(Arc::strong_count(&share), 1);
        // Another type in that slot: runs in a box of its own.
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        misses.push(async move {
            r.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(misses.drive(&mut cx), 1);
        assert_eq!((ran.load(Ordering::SeqCst), misses.slots(), misses.boxes()), (1, 1, 1));
    }

    /// A stale wake of a slot whose miss ended, its box kept, polls
    /// nothing and frees nothing twice: the miss still waiting stays
    /// counted, and the next two misses take a slot each and all wait.
    #[test]
    fn a_stale_wake_of_a_kept_box_ends_nothing() {
        let (_listener, waker) = listener_cx();
        let mut cx = Context::from_waker(&waker);
        let mut misses = Misses::default();
        let share = Arc::new(());
        let stop = Arc::new(AtomicBool::new(false));
        misses.push(gated(share.clone(), stop.clone(), Arc::default()));
        let left: Arc<Mutex<Option<Waker>>> = Arc::default();
        let kept = left.clone();
        misses.push(std::future::poll_fn(move |cx| {
            *kept.lock().unwrap() = Some(cx.waker().clone());
            Poll::Ready(())
        }));
        assert_eq!(misses.drive(&mut cx), 1);
        assert_eq!((misses.len(), misses.boxes()), (1, 2));
        left.lock().unwrap().take().unwrap().wake();
        assert_eq!(misses.drive(&mut cx), 0, "the ended miss is not ended again");
        assert_eq!(misses.len(), 1, "the other still waits");
        for _ in 0..2 {
            misses.push(gated(share.clone(), stop.clone(), Arc::default()));
        }
        assert_eq!(misses.drive(&mut cx), 0);
        assert_eq!(misses.len(), 3);
        assert_eq!(Arc::strong_count(&share), 4, "all three wait, none was dropped");
        assert_eq!(misses.slots(), 3);
    }

    /// Counts its drops: a value moved bit for bit must be dropped once,
    /// never twice, never leaked.
    struct Dropped(Arc<AtomicUsize>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A miss of one type for every call, about as large as a real one:
    /// it holds `bytes` (each its index's low byte, so a copy that lost or
    /// shifted any is seen), `dropped` and `share`, and reports on each
    /// poll whether its bytes are whole; it ends once `go` is set.
    fn large(
        dropped: Arc<AtomicUsize>,
        share: Arc<()>,
        go: Arc<AtomicBool>,
        whole: Arc<Mutex<Vec<bool>>>,
    ) -> impl Future<Output = ()> + Send + 'static {
        let bytes: [u8; 2048] = std::array::from_fn(|i| i as u8);
        let counted = Dropped(dropped);
        std::future::poll_fn(move |_| {
            let _held = (&share, &counted);
            let ok = bytes.iter().enumerate().all(|(i, &b)| b == i as u8);
            whole.lock().unwrap().push(ok);
            if go.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
    }

    /// A miss moved into a kept box arrives whole and is dropped exactly
    /// once, when it ends; one refused by the box (its miss still waiting,
    /// or of another type) is neither lost nor dropped twice.
    #[test]
    fn a_miss_moved_into_a_kept_box_is_whole_and_dropped_once() {
        let (_listener, waker) = listener_cx();
        let mut cx = Context::from_waker(&waker);
        let mut misses = Misses::default();
        let dropped = Arc::new(AtomicUsize::new(0));
        let share = Arc::new(());
        let whole: Arc<Mutex<Vec<bool>>> = Arc::default();
        let done = Arc::new(AtomicBool::new(true));
        // The first ends at its first poll and leaves its box.
        misses.push(large(dropped.clone(), share.clone(), done.clone(), whole.clone()));
        assert_eq!(misses.drive(&mut cx), 1);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        let kept = misses.box_at(0).expect("the box is kept");
        // 100 more, one after another, each moved into that box.
        for n in 2..=101 {
            misses.push(large(dropped.clone(), share.clone(), done.clone(), whole.clone()));
            assert_eq!(misses.box_at(0), Some(kept), "moved into the kept box");
            assert_eq!(dropped.load(Ordering::SeqCst), n - 1, "not dropped when moved in");
            assert_eq!(Arc::strong_count(&share), 2, "held once, by the box");
            assert_eq!(misses.drive(&mut cx), 1);
            assert_eq!(dropped.load(Ordering::SeqCst), n, "dropped once, when it ended");
            assert_eq!(Arc::strong_count(&share), 1);
        }
        // Refused: the slot's miss still waits, so the next takes a slot
        // and a box of its own.
        let wait = Arc::new(AtomicBool::new(false));
        misses.push(large(dropped.clone(), share.clone(), wait.clone(), whole.clone()));
        misses.push(large(dropped.clone(), share.clone(), wait.clone(), whole.clone()));
        assert_eq!(misses.drive(&mut cx), 0);
        assert_eq!((misses.slots(), Arc::strong_count(&share)), (2, 3));
        assert_eq!(dropped.load(Ordering::SeqCst), 101);
        // Dropping the set drops each waiting miss once.
        drop(misses);
        assert_eq!((dropped.load(Ordering::SeqCst), Arc::strong_count(&share)), (103, 1));
        let whole = whole.lock().unwrap();
        assert_eq!(whole.len(), 103);
        assert!(whole.iter().all(|&ok| ok), "every miss's bytes arrived whole");
    }

    /// Past the first [`KEEP_BOXES`] slots an ended miss's box is freed:
    /// a burst leaves at most that many boxes behind.
    #[test]
    fn only_the_first_slots_keep_their_boxes() {
        let (_listener, waker) = listener_cx();
        let mut cx = Context::from_waker(&waker);
        let mut misses = Misses::default();
        let go = Arc::new(AtomicBool::new(false));
        let wakers: Vec<Arc<Mutex<Option<Waker>>>> = (0..KEEP_BOXES + 10).map(|_| Arc::default()).collect();
        let share = Arc::new(());
        for w in &wakers {
            misses.push(gated(share.clone(), go.clone(), w.clone()));
        }
        assert_eq!(misses.drive(&mut cx), 0);
        assert_eq!(misses.boxes(), KEEP_BOXES + 10);
        go.store(true, Ordering::SeqCst);
        for w in &wakers {
            w.lock().unwrap().take().unwrap().wake();
        }
        assert_eq!(misses.drive(&mut cx), KEEP_BOXES + 10);
        assert_eq!((misses.len(), misses.boxes()), (0, KEEP_BOXES));
        assert_eq!(Arc::strong_count(&share), 1);
    }
}
