//! The order a pool reader serves its ready sockets in: those of light
//! clients first, those of the client that dominates the relay's work
//! after them.
//!
//! A pool reader served its sockets in the order they became ready. One
//! client opening flows to 20,000 destinations has a pool socket per
//! destination (one client endpoint's flows never share a socket, see
//! `relay::pool`), and its replies make hundreds of sockets ready at once:
//! a quiet client's reply, ready a moment later, waited behind all of them,
//! each a receive and a send over raw IP (7-10 µs). In the lab's flood the
//! quiet client's reply sat 3.4-5.7 ms in the reader (`tcpdump` on both
//! sides of the relay), which alone misses a 5 ms p99.
//!
//! A reply's client is known only once it has been read, so a socket is
//! judged by what it held before: a socket whose last [`HEAVY_AFTER`]
//! reads all held replies of the dominant client only (the one the
//! shedder would shed, overloaded or not), or that has not been read yet,
//! waits in the *heavy* queue; every other socket, in the *light* one,
//! which is served first.
//!
//! Not by the last read alone: pool sockets are shared between clients,
//! and the flood's first flows take the sockets the quiet clients' flows
//! already hold (one client endpoint's flows never share a socket, other
//! clients' do). The one reply of such a flood flow, read from a quiet
//! client's socket, made that socket heavy, and the quiet client's next
//! reply on it waited behind every flood socket ready at the time. A
//! socket that a light client's replies still come through between the
//! flood's stays light. A socket that
//! still holds datagrams after its one receive goes to the back of its
//! queue, so sockets of one class are served round robin, one receive
//! (at most `recv::BATCH` datagrams) per turn. The heavy queue is served
//! whenever the light one is empty: the dominant client gets whatever the
//! others leave, as the shedder gives it on the way out.

use std::collections::VecDeque;

/// Reads in a row that found only the dominant client's replies before a
/// socket counts as heavy; a new socket starts here. A quiet client's
/// socket sees one reply per flood flow that shares it between two of
/// its own (a flood of new flows sends once to each destination): a few
/// reads, not this many.
pub(super) const HEAVY_AFTER: u8 = 4;

/// The count of a socket's dominant-only reads after one more read, which
/// held only the dominant client's replies or not.
pub(super) fn after_read(count: u8, dominant_only: bool) -> u8 {
    if dominant_only {
        count.saturating_add(1).min(HEAVY_AFTER)
    } else {
        0
    }
}

/// Whether a socket with that count waits in the heavy queue.
pub(super) fn is_heavy(count: u8) -> bool {
    count >= HEAVY_AFTER
}

/// Ready sockets (any `T`) waiting for a reader's turn, light ones first.
#[derive(Debug)]
pub(super) struct ReplyOrder<T> {
    light: VecDeque<T>,
    heavy: VecDeque<T>,
}

impl<T> Default for ReplyOrder<T> {
    fn default() -> Self {
        ReplyOrder {
            light: VecDeque::new(),
            heavy: VecDeque::new(),
        }
    }
}

impl<T> ReplyOrder<T> {
    /// Queues `socket` at the back of its class.
    pub(super) fn push(&mut self, socket: T, heavy: bool) {
        if heavy {
            self.heavy.push_back(socket);
        } else {
            self.light.push_back(socket);
        }
    }

    /// The next socket to serve: the oldest light one, else the oldest
    /// heavy one.
    pub(super) fn pop(&mut self) -> Option<T> {
        self.light.pop_front().or_else(|| self.heavy.pop_front())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.light.is_empty() && self.heavy.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_light_socket_turns_heavy_only_after_several_dominant_reads() {
        // Not read yet: heavy, and a dominant-only read keeps it so.
        assert!(is_heavy(HEAVY_AFTER));
        assert!(is_heavy(after_read(HEAVY_AFTER, true)));
        // One reply of a light client makes it light at once.
        let mut count = after_read(HEAVY_AFTER, false);
        assert!(!is_heavy(count));
        // A flood flow's reply or two on a shared socket leave it light.
        for _ in 1..HEAVY_AFTER {
            count = after_read(count, true);
            assert!(!is_heavy(count));
        }
        count = after_read(count, true);
        assert!(is_heavy(count));
    }

    #[test]
    fn light_sockets_are_served_first_and_each_class_in_turn() {
        let mut order = ReplyOrder::default();
        for s in 0..4 {
            order.push(s, true);
        }
        order.push(10, false);
        assert_eq!(order.pop(), Some(10));
        assert_eq!(order.pop(), Some(0));
        // A heavy socket with more to read goes behind the other heavy
        // ones; a light one that turns up meanwhile goes before them all.
        order.push(0, true);
        order.push(11, false);
        let rest: Vec<_> = std::iter::from_fn(|| order.pop()).collect();
        assert_eq!(rest, [11, 1, 2, 3, 0]);
        assert!(order.is_empty());
    }
}
