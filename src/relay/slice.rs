//! The longest stretch one relay task keeps its worker thread.
//!
//! The listener, the opener tasks and the pool readers share the runtime's
//! worker threads, and a datagram of an established flow is read only when
//! the listener gets the thread, its reply only when a pool reader does.
//! So whatever any of them does in one go, every other client's datagram
//! may wait for, twice per round trip. Counting the work (32 opens, 256
//! replies) did not bound that wait: one open costs 2 µs when a pooled
//! socket fits and 20-30 µs when a socket must be made, one reply 1 µs on
//! a bound reply socket and more over raw IP, and a preempted thread
//! stretches all of them. During a flood to 20,000 destinations an opener
//! round of 32 took 0.85 ms on average and up to 9.7 ms, a reader's turn
//! up to 6.8 ms (288 replies), in a trace of the bench at load 4.4.
//!
//! A task that may have much to do checks a [`Slice`] between units of
//! work (an open, a socket read) and, once [`SLICE`] has passed, finishes
//! what it began (sends what it gathered) and yields; it comes back after
//! the runtime has polled for I/O and run the others. What a datagram
//! waits for is then one slice of each busy task plus one unit of work,
//! whatever the flood.

use std::time::{Duration, Instant};

/// How long a task works before it lets the others run. A quarter of a
/// millisecond: a yield and the runtime's I/O poll cost a few
/// microseconds, so a busy task loses about 2 % of its time to them.
pub const SLICE: Duration = Duration::from_micros(250);

/// The time a task has had the thread since it began this slice.
#[derive(Debug, Clone, Copy)]
pub struct Slice {
    start: Instant,
}

impl Slice {
    /// A slice beginning now.
    pub fn start() -> Self {
        Slice { start: Instant::now() }
    }

    /// Whether the slice is used up: time to finish and yield.
    pub fn spent(&self) -> bool {
        self.start.elapsed() >= SLICE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_is_spent_once_its_time_has_passed() {
        let s = Slice::start();
        std::thread::sleep(SLICE + Duration::from_micros(50));
        assert!(s.spent());
    }
}
