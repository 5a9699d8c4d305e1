//! A bounded number of places, taken without waiting and given back on drop.
//!
//! Every bound here is "take a place now or be refused": no caller ever
//! waits for one. The DNS service's bound on misses waiting at once and
//! each upstream group's `max_pending` answer SERVFAIL past it; the relay's
//! descriptor budget (`relay::budget::FdShare`) refuses a socket and makes
//! room instead. The DNS bounds were tokio `Semaphore`s, whose permit, when
//! dropped, takes the semaphore's waiter-list mutex to look for waiters that
//! never exist here: about 100 instructions per drop, two drops per cache
//! miss (callgrind, round 14 in docs/BENCHMARKS.md). A counter does the same
//! bookkeeping with one atomic operation each way.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// At most `max` places held at once.
#[derive(Debug)]
pub struct Places {
    max: AtomicUsize,
    held: AtomicUsize,
}

/// One place, given back when dropped.
#[derive(Debug)]
pub struct Place(Arc<Places>);

impl Places {
    /// `max` places, none held.
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Places {
            max: AtomicUsize::new(max),
            held: AtomicUsize::new(0),
        })
    }

    /// A place, or `None` when all `max` are held.
    pub fn try_take(self: &Arc<Self>) -> Option<Place> {
        // A failed take writes nothing: a flood past the bound only reads.
        let max = self.max.load(Ordering::Relaxed);
        self.held
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |n| (n < max).then_some(n + 1))
            .ok()?;
        Some(Place(self.clone()))
    }

    /// Places held now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The bound.
    pub fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }

    /// A new bound (on reload); places already held stay held, and no new
    /// one is given while they are over it.
    pub fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_max_places_are_held_and_each_drop_gives_one_back() {
        let places = Places::new(3);
        let taken: Vec<Place> = (0..3).map(|_| places.try_take().expect("a free place")).collect();
        assert_eq!(places.held(), 3);
        assert!(places.try_take().is_none(), "a fourth place past the bound");
        assert_eq!(places.held(), 3, "a refused take holds nothing");
        drop(taken);
        assert_eq!(places.held(), 0);
        let one = places.try_take().expect("places back after the drops");
        let two = places.try_take().expect("a second");
        drop(one);
        let three = places.try_take().expect("the one given back");
        let four = places.try_take().expect("the last free one");
        assert!(places.try_take().is_none());
        drop((two, three, four));
        assert_eq!(places.held(), 0);
    }

    #[test]
    fn a_bound_of_zero_gives_no_place() {
        let places = Places::new(0);
        assert!(places.try_take().is_none());
        assert_eq!(places.held(), 0);
    }

    /// Four threads taking and dropping places in a race never hold more
    /// than the bound between them, and end with every place back.
    #[test]
    fn racing_threads_never_hold_more_than_the_bound() {
        let places = Places::new(5);
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let places = places.clone();
                let most = most.clone();
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..20_000 {
                        if i % 3 == 2 {
                            mine.pop();
                        } else if let Some(p) = places.try_take() {
                            mine.push(p);
                        }
                        most.fetch_max(places.held(), Ordering::Relaxed);
                        if mine.len() > 7 {
                            mine.clear();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a racing thread");
        }
        assert!(
            most.load(Ordering::Relaxed) <= 5,
            "held {}",
            most.load(Ordering::Relaxed)
        );
        assert_eq!(places.held(), 0);
    }
}
