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
//!
//! The sends count too. What a task sends for the work it did (an
//! opener's held datagrams, a reader's gathered replies) costs more than
//! the work itself when the datagrams cross to another namespace or a
//! veth: the kernel delivers them in the sender's own softirq, 7-10 µs a
//! datagram in the 20,000-destination flood, where an open took about
//! 6 µs and a read 2-3 µs (`perf record` of the relay's thread: half its
//! time in `sendmmsg` and raw `sendto`). A slice that only counted the
//! work and then sent everything at its end ran twice its length and
//! more. So a task sends every few units (its own count: eight opens,
//! 32 replies), and the slice is checked after each send: [`Slice::step`]
//! says which.

use std::time::{Duration, Instant};

/// How long a task works before it lets the others run. A quarter of a
/// millisecond: a yield and the runtime's I/O poll cost a few
/// microseconds, so a busy task loses about 2 % of its time to them.
pub const SLICE: Duration = Duration::from_micros(250);

/// What a task does after a unit of work (see [`Slice::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Go on working.
    Work,
    /// Send what the units so far produced, then go on.
    Send,
    /// Send, and give the thread to the others: the slice is spent.
    Yield,
}

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

    /// When the slice began: a clock reading a task may use for what it
    /// timestamps within the slice (a quarter of a millisecond and one
    /// unit of work long) instead of reading the clock again.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// What to do after a unit of work, with `unsent` units' output not
    /// yet sent, for a task that sends every `send_every` units.
    pub fn step(&self, unsent: usize, send_every: usize) -> Step {
        decide(self.spent(), unsent, send_every)
    }
}

/// [`Slice::step`]'s rule: the slice's end wins, then the send's turn.
fn decide(spent: bool, unsent: usize, send_every: usize) -> Step {
    if spent {
        Step::Yield
    } else if unsent >= send_every {
        Step::Send
    } else {
        Step::Work
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_is_sent_every_few_units_and_the_slice_end_wins() {
        assert_eq!(decide(false, 0, 8), Step::Work);
        assert_eq!(decide(false, 7, 8), Step::Work);
        assert_eq!(decide(false, 8, 8), Step::Send);
        assert_eq!(decide(false, 40, 8), Step::Send);
        assert_eq!(decide(true, 0, 8), Step::Yield);
        assert_eq!(decide(true, 8, 8), Step::Yield);
        // A fresh slice is not spent.
        assert_eq!(Slice::start().step(1, 8), Step::Work);
        assert_eq!(Slice::start().step(1, 1), Step::Send);
    }

    #[test]
    fn a_slice_is_spent_once_its_time_has_passed() {
        let s = Slice::start();
        std::thread::sleep(SLICE + Duration::from_micros(50));
        assert!(s.spent());
    }
}
