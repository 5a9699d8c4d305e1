//! The cache misses (and the other upstream work) of one UDP listener,
//! driven by the listener's own task instead of a task each.
//!
//! A miss used to be a task of its own: spawned, scheduled, woken and
//! completed through tokio's task machinery, its cancellation a select
//! against the service's token. callgrind counted about 2,700 user-space
//! instructions per miss for that alone (spawn, its aligned allocation,
//! the token's wait, completion), an eighth of a miss. Here the
//! listener owns a [`FuturesUnordered`] of its waiting misses: a miss
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

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

/// One piece of upstream work: a miss, a prefetch, a held answer.
pub type Miss = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A listener's waiting misses.
#[derive(Default)]
pub struct Misses {
    set: FuturesUnordered<Miss>,
}

impl std::fmt::Debug for Misses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Misses").field("waiting", &self.set.len()).finish()
    }
}

impl Misses {
    /// Adds `work`; it is first polled at the listener's next
    /// [`Misses::drive`].
    pub fn push(&mut self, work: impl Future<Output = ()> + Send + 'static) {
        // Boxed: the set holds one type, and the box keeps a miss's large
        // future from being moved again once it is in.
        self.set.push(Box::pin(work));
    }

    /// Misses waiting.
    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    /// Bytes of the largest waiting future: what its box asks the
    /// allocator for.
    #[cfg(test)]
    pub fn largest(&self) -> usize {
        self.set
            .iter()
            .map(|work| std::mem::size_of_val(&**work))
            .max()
            .unwrap_or(0)
    }

    /// Polls the misses that were woken; how many ended. Each woken miss
    /// registers for its next wake-up (which wakes the listener) or
    /// ends. The listener sends the answers they gave right after (a miss
    /// may answer and go on: a stale answer, then the refresh).
    ///
    /// The set polls only the misses that were woken, and yields (waking
    /// the listener again) after polling as many as it holds, so a burst
    /// of answers cannot keep the listener from reading new queries.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> usize {
        // No miss waiting (the usual case on a relay wake-up): nothing to
        // poll and nothing that could wake the listener. A miss pushed
        // later is first polled at the next drive, as [`Misses::push`]
        // says, so the set's waker needs no registering now; the empty
        // set's poll was about 90 instructions.
        if self.set.is_empty() {
            return 0;
        }
        let mut ended = 0;
        while let Poll::Ready(Some(())) = self.set.poll_next_unpin(cx) {
            ended += 1;
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// Drives `misses` until `n` more have ended (or forever).
    async fn until_ended(misses: &mut Misses, n: usize) {
        let mut seen = 0;
        std::future::poll_fn(|cx| {
            seen += misses.drive(cx);
            if seen >= n { Poll::Ready(()) } else { Poll::Pending }
        })
        .await
    }

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
}
