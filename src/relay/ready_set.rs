//! Which members of a listener group woke the listener, so that a wake-up
//! asks only those for readiness.
//!
//! The listener serves a group of `SO_REUSEPORT` sockets (8 by default) in
//! one task. Asking every member for readiness on every poll registered the
//! task's waker with all of them, twice per wake-up (once to find the
//! ready member, once more after its turn to find none): 16 readiness
//! polls, each a lock of the member's waiter list, where a relay waiting in
//! `epoll_wait` learns the one ready socket from the kernel. Under
//! callgrind that was 18 % of tproxyd's user-space instructions on a
//! steady 64-byte flow, about 2,500 instructions per wake-up.
//!
//! Here each member gets a waker of its own that marks its bit and wakes
//! the task. A member's registration with the runtime stays in place until
//! it fires, so a poll asks again only the members whose waker fired, and
//! those that were ready last time (their waker was used up and must be
//! registered again); every other member is still registered and would have
//! marked its bit. No wake-up is lost: the task's waker is stored before
//! the bits are taken, and a member that fires after that marks its bit and
//! wakes the task again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// Members marked since the last [`ReadySet::take`], and the task to wake.
#[derive(Debug)]
struct Shared {
    words: Box<[AtomicU64]>,
    task: AtomicWaker,
}

/// The waker a member registers with the runtime.
#[derive(Debug)]
struct MemberWaker {
    shared: Arc<Shared>,
    index: usize,
}

impl Wake for MemberWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.shared.mark(self.index);
        self.shared.task.wake();
    }
}

impl Shared {
    fn mark(&self, index: usize) {
        if let Some(word) = self.words.get(index / 64) {
            word.fetch_or(1 << (index % 64), Ordering::AcqRel);
        }
    }
}

/// The wakers of a group's members and the marks they leave.
#[derive(Debug)]
pub struct ReadySet {
    shared: Arc<Shared>,
    wakers: Vec<Waker>,
}

impl ReadySet {
    /// A set for `members` members, every one marked: the first poll asks
    /// them all, which registers each one's waker.
    pub fn new(members: usize) -> Self {
        let words = (0..members.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        let shared = Arc::new(Shared {
            words,
            task: AtomicWaker::new(),
        });
        let wakers = (0..members)
            .map(|index| {
                Waker::from(Arc::new(MemberWaker {
                    shared: shared.clone(),
                    index,
                }))
            })
            .collect();
        for index in 0..members {
            shared.mark(index);
        }
        ReadySet { shared, wakers }
    }

    /// Marks member `index` to be asked again at the next [`ReadySet::take`]
    /// (it was ready, so its registration is used up).
    pub fn mark(&self, index: usize) {
        self.shared.mark(index);
    }

    /// Registers the task of `cx` to be woken by any member, then takes the
    /// marked members (clearing their marks) into `out`, in order.
    pub fn take(&self, cx: &Context<'_>, out: &mut Vec<usize>) {
        self.shared.task.register(cx.waker());
        out.clear();
        for (w, word) in self.shared.words.iter().enumerate() {
            let mut bits = word.swap(0, Ordering::AcqRel);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                out.push(w * 64 + bit);
            }
        }
    }

    /// The waker member `index` registers with, so that its readiness marks
    /// it here.
    pub fn waker(&self, index: usize) -> Option<&Waker> {
        self.wakers.get(index)
    }

    /// Polls `future` with the waker of slot `index`, but only when `asked`
    /// (what the last [`ReadySet::take`] gave) names that slot: its waker
    /// fired, or this is the first poll. Pending otherwise, without a poll.
    ///
    /// For a future that is rarely ready and costly to poll, such as the
    /// listener's shutdown wait (a lock of the channel's waiter list per
    /// poll, about 200 instructions per wake-up): polled with a waker of
    /// its own, it marks its slot when it can make progress, and every
    /// other wake-up leaves it alone.
    pub fn poll_slot<F: Future + ?Sized>(&self, index: usize, asked: &[usize], future: Pin<&mut F>) -> Poll<F::Output> {
        let Some(waker) = self.wakers.get(index) else {
            return Poll::Pending;
        };
        if !asked.contains(&index) {
            return Poll::Pending;
        }
        future.poll(&mut Context::from_waker(waker))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// A task waker that counts its wake-ups.
    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn only_members_that_woke_or_were_marked_are_asked_again() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let cx = Context::from_waker(&task);
        let set = ReadySet::new(70);
        let mut asked = Vec::new();
        let mut take = || {
            set.take(&cx, &mut asked);
            asked.clone()
        };
        // At first every member is asked.
        assert_eq!(take(), (0..70).collect::<Vec<_>>());
        // Then none, until one wakes.
        assert!(take().is_empty());
        set.waker(3).unwrap().wake_by_ref();
        set.waker(66).unwrap().wake_by_ref();
        // The task is woken once: it takes both marks when it runs.
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert_eq!(take(), [3, 66]);
        assert!(take().is_empty());
        // A member that was ready is asked again without waking anyone.
        set.mark(5);
        assert_eq!(take(), [5]);
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(set.waker(70).is_none());
    }

    #[test]
    fn a_member_waking_after_the_take_wakes_the_task_again() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let set = ReadySet::new(2);
        let mut asked = Vec::new();
        set.take(&Context::from_waker(&task), &mut asked);
        let member = set.waker(1).unwrap().clone();
        member.wake();
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        set.take(&Context::from_waker(&task), &mut asked);
        assert_eq!(asked, [1]);
    }

    /// A future that counts its polls and is ready once `open` is set,
    /// waking whoever polled it last when it is opened.
    #[derive(Default)]
    struct Gate {
        polls: AtomicUsize,
        open: std::sync::atomic::AtomicBool,
        waiter: AtomicWaker,
    }

    impl Gate {
        fn open(&self) {
            self.open.store(true, Ordering::SeqCst);
            self.waiter.wake();
        }
    }

    impl Future for &Gate {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            self.waiter.register(cx.waker());
            if self.open.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn a_slot_future_is_polled_only_when_its_own_waker_fired() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let cx = Context::from_waker(&task);
        // Slots 0 and 1 are members, slot 2 the gate.
        let set = ReadySet::new(3);
        let gate = Gate::default();
        let mut fut = &gate;
        let mut asked = Vec::new();
        // The first poll asks every slot, the gate too.
        set.take(&cx, &mut asked);
        assert!(set.poll_slot(2, &asked, Pin::new(&mut fut)).is_pending());
        assert_eq!(gate.polls.load(Ordering::SeqCst), 1);
        // A member's wake-up leaves the gate alone.
        set.waker(0).unwrap().wake_by_ref();
        set.take(&cx, &mut asked);
        assert_eq!(asked, [0]);
        assert!(set.poll_slot(2, &asked, Pin::new(&mut fut)).is_pending());
        assert_eq!(gate.polls.load(Ordering::SeqCst), 1);
        // Opening the gate wakes the task through the gate's slot: it is
        // polled at the next take, and ready.
        gate.open();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        set.take(&cx, &mut asked);
        assert_eq!(asked, [2]);
        assert!(set.poll_slot(2, &asked, Pin::new(&mut fut)).is_ready());
        assert_eq!(gate.polls.load(Ordering::SeqCst), 2);
        // No such slot: never polled.
        assert!(set.poll_slot(3, &[3], Pin::new(&mut fut)).is_pending());
        assert_eq!(gate.polls.load(Ordering::SeqCst), 2);
    }
}
