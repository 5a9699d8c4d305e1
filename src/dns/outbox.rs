//! Answers that came from an upstream, gathered while a listener drives
//! its misses and then sent together.
//!
//! Each miss used to send its reply with a `sendmmsg` of its own: under
//! load that was one system call per miss and, per reply, a trip through
//! routing, netfilter and the client's receive path (about 30 % of the
//! daemon's samples in a miss run). Many misses end in one round of their
//! listener (the reactor hands over every upstream socket that became
//! readable at once, see [`super::misses`]), so their replies can leave
//! in one call, and those to one client socket as a GSO train
//! ([`super::replies::ReplyBatch`], or the relay's reply sockets for
//! hijacked queries).
//!
//! The listener runs [`Outbox::flush`] after each round of its misses.
//! Past [`SEND_AT`] replies the one adding sends at once, so a flood of
//! answers holds neither memory nor replies back. Each reply still leaves
//! as its own datagram, from the same address and socket as before.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use super::replies::ReplyBatch;

/// Replies gathered past which the one adding sends them at once (a
/// receive batch's worth: one `sendmmsg` of [`ReplyBatch`]'s size).
pub const SEND_AT: usize = 64;

/// Where replies gather between two sends.
pub trait Gather: Default + Send {
    /// Adds `reply`, to leave from `src` for `client`.
    fn push(&mut self, src: SocketAddr, client: SocketAddr, reply: &[u8]);
    /// Replies gathered.
    fn gathered(&self) -> usize;
}

impl Gather for ReplyBatch {
    fn push(&mut self, src: SocketAddr, client: SocketAddr, reply: &[u8]) {
        ReplyBatch::push(self, src, client, reply);
    }

    fn gathered(&self) -> usize {
        self.len()
    }
}

/// Sends what a [`Gather`] holds, leaving it empty.
pub type Sender<T> = Box<dyn Fn(&mut T) + Send + Sync>;

/// Replies waiting for the end of the turn, and how they are sent.
///
/// What still waits when the last holder lets go is sent then (see the
/// `Drop` impl).
pub struct Outbox<T: Gather> {
    state: Mutex<State<T>>,
    /// `State::due`, readable without the lock (written only under it):
    /// the listener flushes after every round of its misses, nearly always
    /// with nothing gathered, and the lock alone was about 80 instructions
    /// of each relay wake-up. Whoever added since the last flush either
    /// sees this set or was told to see to a flush itself.
    due: AtomicBool,
    send: Sender<T>,
}

struct State<T> {
    /// Where replies are added now.
    open: T,
    /// The other buffer, kept for its memory while `open` is being sent.
    spare: Option<T>,
    /// A flush is due: the one who added the first reply since the last
    /// flush was told to arrange it.
    due: bool,
}

impl<T: Gather> std::fmt::Debug for Outbox<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl<T: Gather> Outbox<T> {
    pub fn new(send: Sender<T>) -> Self {
        Outbox {
            state: Mutex::new(State {
                open: T::default(),
                spare: Some(T::default()),
                due: false,
            }),
            due: AtomicBool::new(false),
            send,
        }
    }

    /// Adds a reply. True when the caller must see to it that
    /// [`Outbox::flush`] runs soon: no flush was due yet. When the replies
    /// gathered reach [`SEND_AT`] they are sent here and now.
    #[must_use]
    pub fn add(&self, src: SocketAddr, client: SocketAddr, reply: &[u8]) -> bool {
        let (first, full) = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.open.push(src, client, reply);
            let first = !state.due;
            state.due = true;
            self.due.store(true, Ordering::Release);
            (first, state.open.gathered() >= SEND_AT)
        };
        if full {
            self.flush();
            // Whatever was added since is sent by the flush due then
            // (`due` is set again by the next `add`).
            return false;
        }
        first
    }

    /// Sends every reply gathered so far. The lock is not held while
    /// sending: tasks on other workers keep adding to the other buffer,
    /// and with several workers two batches may be on their way at once,
    /// so replies of different batches may leave in either order (DNS
    /// clients match answers by ID and question, not by order).
    pub fn flush(&self) {
        if !self.due.load(Ordering::Acquire) {
            // Nothing added since the last flush took the lock.
            return;
        }
        let mut taken = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.due = false;
            self.due.store(false, Ordering::Release);
            if state.open.gathered() == 0 {
                return;
            }
            let spare = state.spare.take().unwrap_or_default();
            std::mem::replace(&mut state.open, spare)
        };
        (self.send)(&mut taken);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if state.spare.is_none() {
            state.spare = Some(taken);
        }
    }

    /// Replies waiting (tests and metrics).
    pub fn waiting(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .open
            .gathered()
    }
}

/// At shutdown a listener ends between adding and its flush, and at a
/// reload a listener's outbox may outlive its listener: answers already
/// taken from an upstream would vanish without being sent or counted.
/// Every holder is gone here (the listener and its misses), but the
/// sender still owns what it sends through (the listener's socket, the
/// relay's reply sockets), so they leave now.
impl<T: Gather> Drop for Outbox<T> {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// What a test's send closure saw: (client port, payload) per reply,
    /// and the number of sends.
    #[derive(Default)]
    struct Log {
        replies: Vec<(u16, Vec<u8>)>,
        sends: usize,
    }

    impl Log {
        /// (client port, first payload byte) per reply, in sending order.
        fn firsts(&self) -> Vec<(u16, u8)> {
            self.replies.iter().map(|(p, b)| (*p, b[0])).collect()
        }
    }

    fn outbox() -> (Arc<Outbox<ReplyBatch>>, Arc<Mutex<Log>>) {
        let log = Arc::new(Mutex::new(Log::default()));
        let seen = log.clone();
        let outbox = Outbox::new(Box::new(move |batch: &mut ReplyBatch| {
            let mut log = seen.lock().unwrap();
            log.sends += 1;
            for i in 0..batch.len() {
                let (r, bytes) = batch.get(i).unwrap();
                log.replies.push((r.client.port(), bytes.to_vec()));
            }
            batch.clear();
        }));
        (Arc::new(outbox), log)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 10], port))
    }

    #[test]
    fn only_the_first_reply_of_a_turn_asks_for_a_flush_and_one_send_takes_them_all() {
        let (outbox, log) = outbox();
        let src = SocketAddr::from(([203, 0, 113, 53], 53));
        assert!(outbox.add(src, addr(1000), &[1]), "the first asks");
        assert!(!outbox.add(src, addr(1001), &[2]), "the others ride along");
        assert!(!outbox.add(src, addr(1000), &[3]));
        assert_eq!(log.lock().unwrap().sends, 0, "nothing sent before the flush");
        outbox.flush();
        let log_now = |l: &Mutex<Log>| {
            let l = l.lock().unwrap();
            (l.sends, l.firsts())
        };
        assert_eq!(log_now(&log), (1, vec![(1000, 1), (1001, 2), (1000, 3)]));
        // Nothing left: a second flush sends nothing, and the next reply
        // asks again.
        outbox.flush();
        assert_eq!(log.lock().unwrap().sends, 1);
        assert!(outbox.add(src, addr(1002), &[4]));
        outbox.flush();
        assert_eq!(log_now(&log), (2, vec![(1000, 1), (1001, 2), (1000, 3), (1002, 4)]));
    }

    #[test]
    fn replies_waiting_when_the_last_holder_lets_go_are_still_sent() {
        // At shutdown the listener ends with its misses before a flush: answers already taken from an upstream
        // must still leave, not vanish uncounted.
        let (outbox, log) = outbox();
        let src = SocketAddr::from(([203, 0, 113, 53], 53));
        assert!(outbox.add(src, addr(1000), &[1]));
        assert!(!outbox.add(src, addr(1001), &[2]));
        drop(outbox);
        let log = log.lock().unwrap();
        assert_eq!((log.sends, log.firsts()), (1, vec![(1000, 1), (1001, 2)]));
    }

    #[test]
    fn a_full_outbox_is_sent_by_the_one_who_filled_it() {
        let (outbox, log) = outbox();
        let src = SocketAddr::from(([203, 0, 113, 53], 53));
        // A flood of answers for one client: never more than SEND_AT wait.
        let mut asked = 0;
        for i in 0..(3 * SEND_AT + 5) {
            asked += usize::from(outbox.add(src, addr(1000), &[i as u8]));
            assert!(outbox.waiting() < SEND_AT);
        }
        assert_eq!(log.lock().unwrap().sends, 3, "sent as each batch filled");
        assert_eq!(outbox.waiting(), 5);
        // The first reply after each send asks for a flush: the one that
        // began the outbox, and one after each of the three sends.
        assert_eq!(asked, 4);
        outbox.flush();
        let log = log.lock().unwrap();
        assert_eq!(log.replies.len(), 3 * SEND_AT + 5, "every reply sent once");
        let order: Vec<u8> = log.firsts().iter().map(|&(_, b)| b).collect();
        let expected: Vec<u8> = (0..(3 * SEND_AT + 5)).map(|i| i as u8).collect();
        assert_eq!(order, expected);
    }

    #[test]
    fn replies_added_from_many_threads_are_each_sent_exactly_once() {
        let (outbox, log) = outbox();
        let src = SocketAddr::from(([203, 0, 113, 53], 53));
        let threads: Vec<_> = (0..4u16)
            .map(|t| {
                let outbox = outbox.clone();
                std::thread::spawn(move || {
                    for i in 0..500u16 {
                        if outbox.add(src, addr(1000 + t), &i.to_be_bytes()) {
                            outbox.flush();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        outbox.flush();
        let log = log.lock().unwrap();
        // Every reply once. Not necessarily in order: two threads'
        // flushes may send their batches at the same time.
        for t in 0..4u16 {
            let mut mine: Vec<u16> = log
                .replies
                .iter()
                .filter(|(p, _)| *p == 1000 + t)
                .map(|(_, b)| u16::from_be_bytes([b[0], b[1]]))
                .collect();
            mine.sort_unstable();
            let expected: Vec<u16> = (0..500).collect();
            assert_eq!(mine, expected, "thread {t}: every reply, once");
        }
        assert_eq!(log.replies.len(), 2_000);
    }
}
