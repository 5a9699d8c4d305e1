//! Answers given at once, gathered while one receive batch is answered and
//! then sent together.
//!
//! Under load a listener reads tens of queries per `recvmmsg`, and most
//! are answered without the network (overrides, cache hits). Sending each
//! answer with a system call of its own cost more than answering it: one
//! `sendmmsg` now carries the whole batch, and the answers to one client
//! socket go as one UDP segmentation (GSO) train when they have one size
//! (a client asking the same name again and again), so routing,
//! netfilter and the socket layer are paid once per train. On the wire
//! each answer is still a datagram of its own, exactly as before.
//!
//! The bytes of every answer live in one buffer that is reused from batch
//! to batch: nothing is allocated per answer once it has grown.

use std::net::SocketAddr;
use std::os::fd::RawFd;

use crate::net::send::{GSO_MAX_SEGMENTS, Message, SendScratch, Sent, gso_chunks, gso_segments, send_messages};
use crate::net::unresolved::{HalfBuffer, Sendable, UnresolvedGate};

/// Answers per `sendmmsg` built on the stack (a receive batch's worth).
const PER_CALL: usize = 64;

/// One answer: from `src` (the address the client asked) to `client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub src: SocketAddr,
    pub client: SocketAddr,
    start: u32,
    len: u32,
}

/// Answers waiting to be sent, in arrival order.
#[derive(Debug, Default)]
pub struct ReplyBatch {
    bytes: Vec<u8>,
    replies: Vec<Reply>,
    /// Reusable: positions in `replies` by client, for [`ReplyBatch::by_client`].
    order: Vec<u32>,
    /// Reusable: a key per answer (client and source), its size
    /// (complemented: larger first) and its position.
    keys: Vec<(u64, u32, u32)>,
}

impl ReplyBatch {
    /// Adds an answer for `client`, to leave from `src`.
    pub fn push(&mut self, src: SocketAddr, client: SocketAddr, answer: &[u8]) {
        // A DNS message over UDP is at most 65,535 bytes, and a batch
        // holds at most a few hundred of them.
        let (Ok(start), Ok(len)) = (u32::try_from(self.bytes.len()), u32::try_from(answer.len())) else {
            return;
        };
        self.bytes.extend_from_slice(answer);
        self.replies.push(Reply {
            src,
            client,
            start,
            len,
        });
    }

    pub fn len(&self) -> usize {
        self.replies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.replies.is_empty()
    }

    /// Forgets every answer (keeping the memory for the next batch).
    pub fn clear(&mut self) {
        self.bytes.clear();
        self.replies.clear();
        self.order.clear();
        self.keys.clear();
    }

    /// Answer `i`, in arrival order.
    pub fn get(&self, i: usize) -> Option<(&Reply, &[u8])> {
        let r = self.replies.get(i)?;
        let start = r.start as usize;
        Some((r, self.bytes.get(start..start + r.len as usize)?))
    }

    /// The positions of the answers, grouped by client and source, and
    /// within each group by size, larger first (arrival order kept among
    /// answers of one size): the order in which the answers to one client
    /// form the fewest GSO trains.
    ///
    /// A train carries datagrams of one size, the last one may be shorter.
    /// In arrival order, answers of two sizes to one client (names of
    /// different lengths: `h9` and `h10.cached.test`) cut the train at
    /// every change from shorter to longer; largest first they make at
    /// most one train per size. Each train is a trip through routing,
    /// netfilter and the client's receive path, paid once for all its
    /// datagrams. Answers to different queries may arrive in any order
    /// (every DNS client matches them by ID and question), and those
    /// sent in one `sendmmsg` leave within microseconds of each other.
    pub fn by_client(&mut self) -> &[u32] {
        let ReplyBatch {
            replies, order, keys, ..
        } = self;
        // One integer per answer, sorted with its position: comparing
        // `SocketAddr`s inside the sort took more instructions than
        // answering. Equal addresses give equal keys; two pairs sharing a
        // key by chance only end up next to each other, and a GSO train
        // still takes only answers to one client (see `send_on`, and
        // `ReplySender::send_pending`).
        keys.clear();
        keys.extend(
            replies
                .iter()
                .zip(0u32..)
                .map(|(r, i)| (addr_key(r.client) ^ addr_key(r.src).rotate_left(29), !r.len, i)),
        );
        keys.sort_unstable();
        order.clear();
        order.extend(keys.iter().map(|&(_, _, i)| i));
        order
    }

    /// Sends every answer on `fd` (a socket bound to the one address they
    /// all leave from; `v6` its family), then forgets them.
    ///
    /// With a `gate` (and `fd`'s [`HalfBuffer`]), answers to LAN addresses
    /// the kernel has not resolved are not sent while `fd`'s buffer is past
    /// half (counted in [`Sent::unresolved`]): answers queued for forged
    /// sources must not take the room of the answers to real devices (see
    /// [`crate::net::unresolved`]). The buffer is looked at before each
    /// call, and a call ends early when the answers in it have spent the
    /// room the look found.
    pub fn send_on(
        &mut self,
        fd: RawFd,
        v6: bool,
        scratch: &mut SendScratch,
        gate: Option<(&UnresolvedGate, HalfBuffer)>,
    ) -> Sent {
        let mut total = Sent::default();
        self.by_client();
        let order = std::mem::take(&mut self.order);
        let max = gso_segments(GSO_MAX_SEGMENTS);
        let mut rest = &order[..];
        while !rest.is_empty() {
            let mut payloads: [&[u8]; PER_CALL] = [&[]; PER_CALL];
            let mut clients = [None; PER_CALL];
            // Looked at per call: the call before may have filled it.
            let mut room = gate.map(|(_, half)| half.room(fd));
            let held_back = gate.filter(|_| room.is_some_and(|r| r.pressed())).map(|(g, _)| g);
            if held_back.is_none()
                && let Some((g, _)) = gate
            {
                g.not_pressed();
            }
            let mut taken = 0;
            for (k, &i) in rest.iter().take(PER_CALL).enumerate() {
                let Some((r, bytes)) = self.get(i as usize) else {
                    taken += 1;
                    continue;
                };
                if held_back.is_some_and(|g| g.admits(r.client.ip(), bytes.len()) == Sendable::Held) {
                    total.unresolved += 1;
                    taken += 1;
                    continue;
                }
                // Not past half: each answer takes its charge of the
                // room, and the call ends where it is spent (with at
                // least one answer in it).
                if let Some(room) = room.as_mut().filter(|r| !r.pressed())
                    && !room.take(bytes.len())
                    && k > 0
                {
                    break;
                }
                payloads[k] = bytes;
                clients[k] = Some(r.client);
                taken += 1;
            }
            let part = &rest[..taken];
            rest = &rest[taken..];
            let mut messages = [Message {
                to: None,
                tos: None,
                segments: &[],
            }; PER_CALL];
            let mut count = 0;
            let mut at = 0;
            while at < part.len() {
                let client = clients[at];
                let run = clients[at..part.len()].iter().take_while(|c| **c == client).count();
                if client.is_some() {
                    for chunk in gso_chunks(&payloads[at..at + run], v6, max) {
                        messages[count] = Message {
                            to: client,
                            tos: None,
                            segments: chunk,
                        };
                        count += 1;
                    }
                }
                at += run;
            }
            let sent = send_messages(fd, &messages[..count], v6, scratch, false);
            total.datagrams += sent.datagrams;
            total.bytes += sent.bytes;
            total.full += sent.full;
            total.failed += sent.failed;
            if total.first_error.is_none() {
                total.first_error = sent.first_error;
            }
        }
        self.order = order;
        self.clear();
        total
    }
}

/// `addr` folded into one integer: equal addresses give equal keys.
fn addr_key(addr: SocketAddr) -> u64 {
    let (ip, port) = match addr {
        SocketAddr::V4(a) => (u128::from(a.ip().to_bits()), a.port()),
        SocketAddr::V6(a) => (a.ip().to_bits(), a.port()),
    };
    let folded = (ip as u64) ^ ((ip >> 64) as u64).rotate_left(17);
    (folded ^ u64::from(port) << 48).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn groups_by_client_keeping_each_clients_order() {
        let a: SocketAddr = "192.0.2.10:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.11:1000".parse().unwrap();
        let src: SocketAddr = "192.0.2.1:53".parse().unwrap();
        let mut batch = ReplyBatch::default();
        for (client, text) in [(b, "b1"), (a, "a1"), (b, "b2"), (a, "a2"), (b, "b3")] {
            batch.push(src, client, text.as_bytes());
        }
        let order = batch.by_client().to_vec();
        let texts: Vec<&[u8]> = order.iter().map(|&i| batch.get(i as usize).unwrap().1).collect();
        // Either client may come first; each one's answers are together,
        // in their order.
        let (a_first, b_first) = (
            [&b"a1"[..], b"a2", b"b1", b"b2", b"b3"],
            [&b"b1"[..], b"b2", b"b3", b"a1", b"a2"],
        );
        assert!(texts == a_first || texts == b_first, "{texts:?}");
        batch.clear();
        assert!(batch.is_empty() && batch.get(0).is_none());
    }

    #[test]
    fn every_answer_arrives_as_its_own_datagram() {
        let server = UdpSocket::bind("127.0.0.1:0").unwrap();
        let one = UdpSocket::bind("127.0.0.1:0").unwrap();
        let two = UdpSocket::bind("127.0.0.1:0").unwrap();
        let src = server.local_addr().unwrap();
        let mut batch = ReplyBatch::default();
        let mut expected: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        // Same-size answers to one client (a GSO train), a shorter one
        // ending it, and another client's in between: 150 in all, more
        // than one call's worth.
        for i in 0..150u8 {
            let (client, size) = if i % 3 == 0 {
                (two.local_addr().unwrap(), 40)
            } else {
                (one.local_addr().unwrap(), if i % 7 == 0 { 30 } else { 60 })
            };
            let answer = vec![i; size];
            batch.push(src, client, &answer);
            expected.push((client, answer));
        }
        let sent = batch.send_on(server.as_raw_fd(), false, &mut SendScratch::default(), None);
        assert_eq!((sent.datagrams, sent.full + sent.failed), (150, 0));
        assert!(batch.is_empty());
        let mut buf = [0u8; 2048];
        for sock in [&one, &two] {
            let me = sock.local_addr().unwrap();
            // Each client's answers, larger first, in arrival order within a size.
            let mut mine: Vec<&Vec<u8>> = expected.iter().filter(|(c, _)| *c == me).map(|(_, a)| a).collect();
            mine.sort_by_key(|a| std::cmp::Reverse(a.len()));
            for answer in mine {
                let (n, from) = sock.recv_from(&mut buf).unwrap();
                assert_eq!((&buf[..n], from), (answer.as_slice(), src));
            }
        }
    }

    #[test]
    fn one_clients_answers_of_two_sizes_make_one_train_per_size() {
        let client: SocketAddr = "192.0.2.10:1000".parse().unwrap();
        let other: SocketAddr = "192.0.2.11:1000".parse().unwrap();
        let src: SocketAddr = "192.0.2.1:53".parse().unwrap();
        let mut batch = ReplyBatch::default();
        // Names of two lengths asked in turn (`h9`, `h10`, ...), with
        // another client's answer in between.
        let sizes = [30, 31, 30, 31, 31, 30, 31];
        for (i, &size) in sizes.iter().enumerate() {
            batch.push(src, client, &vec![i as u8; size]);
            if i == 3 {
                batch.push(src, other, &[99; 31]);
            }
        }
        let order = batch.by_client().to_vec();
        let mine: Vec<&[u8]> = order
            .iter()
            .filter_map(|&i| batch.get(i as usize))
            .filter(|(r, _)| r.client == client)
            .map(|(_, bytes)| bytes)
            .collect();
        // Larger first, arrival order kept within each size.
        let firsts: Vec<(usize, u8)> = mine.iter().map(|b| (b.len(), b[0])).collect();
        assert_eq!(firsts, [(31, 1), (31, 3), (31, 4), (31, 6), (30, 0), (30, 2), (30, 5)]);
        // Two trains: the longer answers ending with one shorter, then the
        // rest. In arrival order the same answers needed four.
        let trains = gso_chunks(&mine, false, GSO_MAX_SEGMENTS).count();
        assert_eq!(trains, 2);
        let arrival: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, &n)| vec![i as u8; n]).collect();
        let arrival: Vec<&[u8]> = arrival.iter().map(Vec::as_slice).collect();
        assert_eq!(gso_chunks(&arrival, false, GSO_MAX_SEGMENTS).count(), 4);
    }
}
