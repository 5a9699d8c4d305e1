//! One DNS-over-TCP connection from a client: length-prefixed queries
//! (RFC 1035 4.2.2) read as they arrive and each answered as soon as it is
//! ready, out of order when an earlier one waits for an upstream.
//!
//! A client may send several queries without waiting for the answers
//! (RFC 7766 6.2.1: stub resolvers and forwarders do, over one connection).
//! Answered strictly one after the other, a single miss to a slow upstream
//! held back every answer behind it on the connection, cache hits
//! included, for up to `dns.timeout`. Here up to [`MAX_IN_FLIGHT`] queries
//! of a connection are answered at once; past that the connection is not
//! read until one of them is answered, so what a client can make tproxyd
//! hold stays bounded per connection, whatever it sends. Each miss still
//! takes its place in its upstream group and the client's share of it
//! (`engine`), as over UDP.
//!
//! The connection ends when the client closes it (the answers still owed
//! are sent first), goes idle, sends something that cannot be answered
//! (likewise), stops reading its answers (`write_timeout`), or reaches its
//! lifetime or query cap, so a trickle of queries cannot hold a slot
//! forever (RFC 7766 lets the server close at any time).

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::engine::{DnsEngine, Transport};
use crate::config::dns::TcpConfig;
use crate::shutdown::Shutdown;
use crate::stats::Stats;

/// Queries of one connection being answered at once.
pub const MAX_IN_FLIGHT: usize = 16;

/// A length prefix and the longest query it can announce.
const MAX_FRAME: usize = 2 + u16::MAX as usize;

/// What a client sent and tproxyd has not yet taken as queries: whole
/// queries are taken from the front, and what follows is read in behind
/// them.
struct Inbox {
    buf: Box<[u8]>,
    /// The unread bytes are `buf[start..end]`.
    start: usize,
    end: usize,
}

impl Inbox {
    fn new() -> Self {
        Inbox {
            buf: vec![0u8; MAX_FRAME].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    /// The next whole query, if one has arrived.
    fn next_query(&mut self) -> Option<Vec<u8>> {
        let unread = self.buf.get(self.start..self.end)?;
        let len = usize::from(u16::from_be_bytes([*unread.first()?, *unread.get(1)?]));
        let query = unread.get(2..2 + len)?.to_vec();
        self.start += 2 + len;
        Some(query)
    }

    /// Whether part of a query has arrived and the rest not.
    fn has_partial(&self) -> bool {
        self.end > self.start
    }

    /// Reads what the client sent next behind what is unread; 0 at its
    /// end of stream. Only called when no whole query is unread, so there
    /// is always room: an unread part is shorter than [`MAX_FRAME`].
    /// Cancel-safe: a read that did not complete took nothing.
    async fn fill(&mut self, stream: &mut (impl AsyncReadExt + Unpin)) -> io::Result<usize> {
        if self.start > 0 {
            // Only the part of a query after the last whole one moves.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let room = self.buf.get_mut(self.end..).unwrap_or_default();
        let n = stream.read(room).await?;
        self.end += n;
        Ok(n)
    }
}

/// Answers written to no connection yet, in bytes, across all connections
/// (see [`Outbox`]).
static UNSENT: AtomicUsize = AtomicUsize::new(0);

/// Connections with answers waiting (a non-empty [`Outbox`]).
static HOLDERS: AtomicUsize = AtomicUsize::new(0);

/// Bytes of answers all connections together may hold beyond the one each
/// is writing (or would write next) before they are shared out equally.
///
/// Past it, a connection that already has answers waiting may queue
/// another only while it holds less than an equal share of this among the
/// connections with answers waiting; otherwise it is closed rather than
/// hold more. A connection whose client does not read holds up to 16
/// answers of 64 kB, a reader the few it is being sent: with a plain
/// limit, a device with four addresses filled it with such queues (and
/// topped it up with small answers, as a connection refused room gives
/// its room back), and every reader's second answer closed its
/// connection. The share keeps the reader's room and closes the
/// device's.
const UNSENT_LIMIT: usize = 32 << 20;

/// What the shares can add past [`UNSENT_LIMIT`]: a hard ceiling on all
/// answers beyond the one each connection is writing.
const UNSENT_CEILING: usize = UNSENT_LIMIT + UNSENT_LIMIT / 2;

/// Answers ready for the client and not yet written, oldest first.
///
/// They are written while the connection's other queries keep being
/// answered: a query waiting for an upstream may lead a single flight
/// (`upstream::flight`), other clients' identical questions waiting for
/// its answer, and it only gets its answer by being polled. Writing each
/// answer to the end before looking at the others let a client that does
/// not read hold such a question for `write_timeout`, and the others got
/// silence. What waits here is bounded per connection by
/// [`MAX_IN_FLIGHT`] (taken queries and unsent answers together) and in
/// all by [`UNSENT_LIMIT`], shared out past it up to [`UNSENT_CEILING`].
struct Outbox {
    framed: VecDeque<Vec<u8>>,
    /// Bytes of the front answer already written.
    written: usize,
    /// When the front answer must be written by.
    deadline: Instant,
    /// Bytes counted in [`UNSENT`].
    counted: usize,
}

impl Outbox {
    fn new() -> Self {
        Outbox {
            framed: VecDeque::new(),
            written: 0,
            deadline: Instant::now(),
            counted: 0,
        }
    }

    fn len(&self) -> usize {
        self.framed.len()
    }

    fn is_empty(&self) -> bool {
        self.framed.is_empty()
    }

    /// Queues `reply`, framed; `false` (nothing queued) if all
    /// connections' unsent answers are past their limit and this one's
    /// client already has its share waiting (see [`UNSENT_LIMIT`]), or if
    /// it cannot be framed.
    fn push(&mut self, reply: &[u8], write_timeout: std::time::Duration) -> bool {
        let Ok(len) = u16::try_from(reply.len()) else {
            return false;
        };
        let size = reply.len() + 2;
        if !self.framed.is_empty() {
            let unsent = UNSENT.load(Ordering::Relaxed) + size;
            let share = UNSENT_LIMIT / HOLDERS.load(Ordering::Relaxed).max(1);
            if unsent > UNSENT_LIMIT && (self.counted + size > share || unsent > UNSENT_CEILING) {
                return false;
            }
        } else {
            HOLDERS.fetch_add(1, Ordering::Relaxed);
        }
        UNSENT.fetch_add(size, Ordering::Relaxed);
        self.counted += size;
        let mut framed = Vec::with_capacity(size);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(reply);
        if self.framed.is_empty() {
            self.deadline = Instant::now() + write_timeout;
        }
        self.framed.push_back(framed);
        true
    }

    /// The part of the front answer still to write.
    fn unwritten(&self) -> &[u8] {
        self.framed
            .front()
            .and_then(|f| f.get(self.written..))
            .unwrap_or_default()
    }

    /// `n` more bytes were written; `true` when that finished an answer.
    fn wrote(&mut self, n: usize, write_timeout: std::time::Duration) -> bool {
        self.written += n;
        let Some(front) = self.framed.front() else { return false };
        if self.written < front.len() {
            return false;
        }
        let size = front.len();
        self.framed.pop_front();
        self.written = 0;
        self.uncount(size);
        if self.framed.is_empty() {
            HOLDERS.fetch_sub(1, Ordering::Relaxed);
        }
        self.deadline = Instant::now() + write_timeout;
        true
    }

    fn uncount(&mut self, size: usize) {
        let size = size.min(self.counted);
        self.counted -= size;
        UNSENT.fetch_sub(size, Ordering::Relaxed);
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if !self.framed.is_empty() {
            HOLDERS.fetch_sub(1, Ordering::Relaxed);
        }
        self.uncount(self.counted);
    }
}

/// Answers `client`'s queries on `stream` (see the module), each by the
/// engine in force when it is taken (`current_engine`: a reload may
/// replace it).
pub async fn serve(
    mut stream: TcpStream,
    client: SocketAddr,
    current_engine: impl Fn() -> Arc<DnsEngine>,
    stats: &Stats,
    limits: &TcpConfig,
    mut shutdown: Shutdown,
) -> io::Result<()> {
    let end_of_life = Instant::now() + limits.max_lifetime;
    let (mut reader, mut writer) = stream.split();
    let mut inbox = Inbox::new();
    let mut in_flight = FuturesUnordered::new();
    let mut outbox = Outbox::new();
    let mut reading = true;
    let mut taken = 0u32;
    let mut recycled = false;
    // The idle time counts from the last query taken or answer sent.
    let mut last_activity = Instant::now();
    loop {
        while reading && in_flight.len() + outbox.len() < MAX_IN_FLIGHT {
            let Some(query) = inbox.next_query() else { break };
            stats.dns_tcp_queries.inc();
            last_activity = Instant::now();
            let (engine, ip) = (current_engine(), client.ip());
            in_flight.push(async move { engine.answer(&query, ip, Transport::Tcp).await });
            taken += 1;
            if taken >= limits.max_queries {
                reading = false;
                recycled = true;
            }
        }
        if reading && Instant::now() >= end_of_life {
            reading = false;
            recycled = true;
        }
        if !reading && in_flight.is_empty() && outbox.is_empty() {
            if recycled {
                stats.dns_tcp_recycled.inc();
            }
            return Ok(());
        }
        let wants_input = reading && in_flight.len() + outbox.len() < MAX_IN_FLIGHT;
        let idle = in_flight.is_empty() && outbox.is_empty();
        let idle_at = (last_activity + limits.idle_timeout).min(end_of_life);
        tokio::select! {
            biased;
            _ = shutdown.recv() => return Ok(()),
            wrote = writer.write(outbox.unwritten()), if !outbox.is_empty() => {
                // Cancel-safe: a write that did not complete wrote nothing.
                match wrote? {
                    0 => return Ok(()),
                    n => {
                        if outbox.wrote(n, limits.write_timeout) {
                            last_activity = Instant::now();
                        }
                    }
                }
            }
            Some(reply) = in_flight.next(), if !in_flight.is_empty() => {
                // Malformed beyond answering: no more queries are read,
                // as RFC 7766 allows; those already taken are answered.
                let Some(reply) = reply else {
                    reading = false;
                    continue;
                };
                if u16::try_from(reply.len()).is_err() {
                    return Ok(()); // cannot be framed (never built so)
                }
                if !outbox.push(&reply, limits.write_timeout) {
                    stats.dns_tcp_unread.inc();
                    return Ok(());
                }
            }
            () = tokio::time::sleep_until(outbox.deadline), if !outbox.is_empty() => {
                // The client does not read: its slot is worth more to others.
                stats.dns_tcp_write_timeouts.inc();
                return Ok(());
            }
            read = inbox.fill(&mut reader), if wants_input => {
                // At the client's end of stream, a part of a query is
                // dropped; the answers owed are still sent.
                if read? == 0 {
                    reading = false;
                }
            }
            () = tokio::time::sleep_until(idle_at), if idle => {
                if inbox.has_partial() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "query body"));
                }
                return Ok(()); // idle, or lived long enough
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(queries: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for q in queries {
            out.extend_from_slice(&(q.len() as u16).to_be_bytes());
            out.extend_from_slice(q);
        }
        out
    }

    #[tokio::test]
    async fn queries_are_taken_whole_however_the_bytes_arrive() {
        let big = vec![7u8; 60_000];
        let sent = framed(&[b"abc", b"", &big, b"z"]);
        // Arriving in pieces that split prefixes and bodies alike.
        let (mut tx, mut rx) = tokio::io::duplex(1_000);
        let writer = tokio::spawn(async move {
            for piece in sent.chunks(777) {
                tx.write_all(piece).await.unwrap();
            }
            tx.write_all(&[0xff]).await.unwrap(); // half a prefix, then the end
        });
        let mut inbox = Inbox::new();
        let mut got = Vec::new();
        loop {
            while let Some(q) = inbox.next_query() {
                got.push(q);
            }
            if inbox.fill(&mut rx).await.unwrap() == 0 {
                break;
            }
        }
        writer.await.unwrap();
        assert_eq!(got, [b"abc".to_vec(), Vec::new(), big, b"z".to_vec()]);
        assert!(inbox.has_partial(), "the lone prefix byte is left over");
    }

    #[tokio::test]
    async fn a_full_size_query_fits_behind_a_partial_one() {
        let big = vec![1u8; u16::MAX as usize];
        let sent = framed(&[b"q", &big]);
        let (mut tx, mut rx) = tokio::io::duplex(MAX_FRAME * 2);
        tx.write_all(&sent).await.unwrap();
        drop(tx);
        let mut inbox = Inbox::new();
        let mut got = Vec::new();
        loop {
            while let Some(q) = inbox.next_query() {
                got.push(q.len());
            }
            if inbox.fill(&mut rx).await.unwrap() == 0 {
                break;
            }
        }
        assert_eq!(got, [1, u16::MAX as usize]);
        assert!(!inbox.has_partial());
    }

    /// The only test that fills [`UNSENT`] and [`HOLDERS`] (process-wide
    /// counts): no other unit test runs a connection.
    #[test]
    fn unsent_answers_past_the_limit_are_shared_out_equally() {
        let timeout = std::time::Duration::from_secs(5);
        let answer = vec![0u8; 60_000];
        let mut hog = Outbox::new();
        let mut queued = 0;
        while hog.push(&answer, timeout) {
            queued += 1;
        }
        assert!(queued * 60_002 <= UNSENT_LIMIT + 60_002, "{queued} answers queued");
        assert!(queued * 60_002 > UNSENT_LIMIT - 60_002, "{queued} answers queued");
        // Another connection may queue, past the limit, up to its equal
        // share (half, with two holding answers); the hog no more.
        let mut other = Outbox::new();
        let mut others = 0;
        while other.push(&answer, timeout) {
            others += 1;
        }
        assert!(others * 60_002 <= UNSENT_LIMIT / 2 + 60_002, "{others} answers queued");
        assert!(others * 60_002 > UNSENT_LIMIT / 2 - 60_002, "{others} answers queued");
        assert!(!hog.push(&answer, timeout), "the hog holds more than its share");
        // A third connection's first answer always, but no more: the
        // shares add at most half the limit.
        let mut third = Outbox::new();
        assert!(third.push(&answer, timeout));
        assert!(!third.push(&answer, timeout), "past the ceiling");
        // Written answers give their room back.
        let before = UNSENT.load(Ordering::Relaxed);
        for _ in 0..20 {
            assert!(hog.wrote(60_002, timeout));
        }
        assert_eq!(UNSENT.load(Ordering::Relaxed), before - 20 * 60_002);
        // Below the ceiling again, each holder's share is a third.
        assert!(third.push(&answer, timeout));
        assert!(!other.push(&answer, timeout), "past its third");
        for _ in 0..2 {
            assert!(third.wrote(60_002, timeout));
        }
        assert_eq!(HOLDERS.load(Ordering::Relaxed), 2, "an emptied outbox holds nothing");
        drop(hog);
        drop(other);
        drop(third);
        assert_eq!(
            UNSENT.load(Ordering::Relaxed),
            0,
            "dropped outboxes give everything back"
        );
        assert_eq!(HOLDERS.load(Ordering::Relaxed), 0);
    }
}
