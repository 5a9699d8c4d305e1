//! One plain-UDP exchange with an upstream, hardened against off-path
//! spoofing (RFC 5452).
//!
//! The query leaves from a socket of the server's rotating pool
//! ([`super::ports`]): a port the kernel picked at random, not used for any
//! of the previous 1,000 queries to that server and retired after a few
//! dozen queries or seconds, plus a random ID: a spoofer must guess both
//! while the query is in flight. The socket is connected, so the kernel
//! already drops datagrams from any other address or port, and anything
//! waiting on it from before the query is discarded unread. An answer is
//! believed only if it is a response with our ID and echoes our question
//! exactly (including the 0x20 case pattern when that is on); anything
//! else is counted and dropped *without* ending the wait, so a forged
//! answer cannot cut the real one off.
//!
//! Receive errors (ICMP unreachable, spoofed or real) are counted and the
//! wait goes on: an off-path attacker can make a query time out at worst,
//! never disable forwarding. The socket returns to the pool only when the
//! exchange ended with an answer; otherwise it closes.
//!
//! A query costs three system calls here: the `recv` that finds the
//! reused socket empty, the `send` and the `recv` of the answer. Opening
//! and closing sockets (`socket`, two `setsockopt` (`SO_MARK`, and
//! `IP_MTU_DISCOVER` for IPv4), `connect`, two
//! `epoll_ctl`, `close`) happens once per socket, not per query, and a
//! socket's port changes with two `connect`s every 32 queries.

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::Name;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use super::Answer;
use super::health::Health;
use super::ports::ServerSockets;
use crate::dns::plain_answer;
use crate::net::send::{send_connected_read_only, try_send_connected};
use crate::ratelog::RateLimit;
use crate::stats::Stats;

/// Our EDNS UDP payload size towards upstreams (DNS flag day 2020).
const PAYLOAD: u16 = 1232;
/// How long a query waits before sending again into a full socket buffer.
const SEND_RETRY: Duration = Duration::from_millis(1);
/// Room for any UDP answer, so a server that ignores the size we
/// advertise is still read whole (and checked like any other). With 4 KiB
/// here an answer above that was cut by the kernel, failed to parse, was
/// dropped as a mismatch and waited on until the server's timeout. The
/// buffer is one per worker thread, allocated once.
const RECEIVE_BUFFER: usize = u16::MAX as usize;

thread_local! {
    /// Where answers are read and checked (never across an await).
    static RECEIVE: std::cell::RefCell<Box<[u8]>> = std::cell::RefCell::new(vec![0; RECEIVE_BUFFER].into_boxed_slice());
}

static RECEIVE_ERROR_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));
static MISMATCH_LOG: RateLimit = RateLimit::new(Duration::from_secs(10));

/// Where the exchange goes and what to count on the way.
pub struct Exchange<'a> {
    pub server: SocketAddr,
    pub sockets: &'a ServerSockets,
    /// The time the exchange starts, as the caller read it (the socket
    /// pool judges its sockets' age by it).
    pub now: Instant,
    /// DNS 0x20: send the name in random case and require it echoed.
    pub randomize_case: bool,
    pub health: &'a Health,
    pub stats: &'a Stats,
}

impl Exchange<'_> {
    /// Asks `query` (recursion desired, EDNS) and waits for a matching
    /// answer; the caller bounds the wait. The answer's question and owner
    /// names come back in the case of `query`. `spelt`, when known, is
    /// `query`'s name on the wire exactly as it is spelt (labels, case,
    /// root byte): the query is then a copy of it (see [`encode_spelt`]).
    pub async fn run(&self, query: &Query, spelt: Option<&[u8]>) -> io::Result<Answer> {
        let (mut lease, cleaned) = self.sockets.take_at(self.now)?;
        if cleaned.stale > 0 {
            self.stats.dns_upstream_stale.add(cleaned.stale as u64);
        }
        if cleaned.errors > 0 {
            self.health.receive_errors.add(cleaned.errors as u64);
            self.stats.receive_errors.add(cleaned.errors as u64);
        }
        let id = lease.fresh_id();
        // The question as sent: the client's, unless 0x20 spells it anew.
        let spun;
        let sent = if self.randomize_case {
            let mut q = query.clone();
            q.set_name(randomize_case(query.name()));
            spun = q;
            &spun
        } else {
            query
        };
        let (qtype, qclass) = (u16::from(sent.query_type()), u16::from(sent.query_class()));
        // Straight to the kernel. The pool's sockets are in the reactor for
        // reading only (`ports::PoolSocket`): one query on an idle socket
        // does not fill its buffer, and if it ever did, the retry waits a
        // moment rather than for a writable event. An ICMP error that
        // landed since the pool's clean (forged at the socket's port, or
        // real) would fail the send, and the query go to the next server or
        // be answered SERVFAIL: tried past it.
        let socket = lease.socket();
        let written;
        // The name as sent, for the plain reader (see below). 0x20 spells
        // the name anew, so only the client's own spelling can be copied;
        // that query is written on the stack and sent at once, and the
        // name it carries is `spelt` itself, so nothing of it need outlive
        // the send (an allocation and a free per miss, callgrind round 14).
        let (sent_name, cleared) = match spelt.filter(|_| !self.randomize_case) {
            Some(name) => {
                let mut cleared = 0;
                if !send_spelt(socket.get_ref(), id, name, sent, &mut cleared)? {
                    // The socket's buffer full: a copy that can wait.
                    written = encode_spelt(id, name, sent)?;
                    cleared += send_connected_read_only(socket, &written, SEND_RETRY).await?;
                }
                (name, cleared)
            }
            None => {
                written = encode(id, sent)?;
                let name = written.get(HEADER..written.len() - 4 - OPT).unwrap_or_default();
                (name, send_connected_read_only(socket, &written, SEND_RETRY).await?)
            }
        };
        if cleared > 0 {
            self.health.receive_errors.add(cleared);
            self.stats.receive_errors.add(cleared);
        }
        loop {
            let mut ready = socket.readable().await?;
            // Read and checked without an await in between, into this
            // thread's buffer: no 64 KiB allocation per query (an allocation
            // that size also makes the allocator tidy up its small-chunk
            // lists every time). A `WouldBlock` clears the readiness.
            let got = RECEIVE.with_borrow_mut(|buf| match ready.try_io(|s| s.get_ref().recv(&mut buf[..])) {
                Err(_would_block) => Ok(None),
                Ok(Err(e)) => Err(e),
                Ok(Ok(n)) => {
                    let datagram = buf.get(..n).unwrap_or_default();
                    // The plainest answers are checked on the wire and
                    // kept as bytes (`plain_answer`); with 0x20 on, the
                    // owners' case must be put back, which takes the
                    // full parse.
                    let plain = if self.randomize_case {
                        None
                    } else {
                        plain_answer::read(datagram, id, sent_name, qtype, qclass)
                    };
                    Ok(Some(match plain {
                        Some(plain) => Some(Answer::Plain(plain)),
                        None => accept(datagram, id, sent).map(Answer::Parsed),
                    }))
                }
            });
            let checked = match got {
                Ok(Some(checked)) => checked,
                // Woken for nothing (the readiness was stale).
                Ok(None) => continue,
                Err(e) => {
                    self.health.receive_errors.inc();
                    self.stats.receive_errors.inc();
                    if let Some(suppressed) = RECEIVE_ERROR_LOG.allow() {
                        tracing::warn!(server = %self.server, error = %e, suppressed, "receive error on an upstream socket (ICMP); still waiting for the answer");
                    }
                    continue;
                }
            };
            match checked {
                Some(mut answer) => {
                    lease.answered();
                    if let (true, Answer::Parsed(answer)) = (self.randomize_case, &mut answer) {
                        restore_case(answer, sent.name(), query);
                    }
                    return Ok(answer);
                }
                None => {
                    self.health.mismatched.inc();
                    self.stats.dns_upstream_mismatched.inc();
                    if let Some(suppressed) = MISMATCH_LOG.allow() {
                        tracing::warn!(server = %self.server, suppressed, "dropped an upstream answer that does not match its query (spoofed?)");
                    }
                }
            }
        }
    }
}

/// The query datagram, written directly rather than through hickory's
/// `Message` and its encoder (which looks for names to compress, where one
/// question has none; it was a twelfth of a miss's instructions): a
/// header with RD set and one question, then an OPT record advertising
/// [`PAYLOAD`] (RFC 1035 4.1, RFC 6891 6.1.2). The name goes out as it is
/// spelt, uncompressed, as every resolver accepts.
fn encode(id: u16, query: &Query) -> io::Result<Vec<u8>> {
    let name = query.name();
    let mut out = header(id, name.len() + 2);
    for label in name.iter() {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|&l| l <= 63)
            .ok_or_else(|| io::Error::other("label longer than 63 bytes"))?;
        out.push(len);
        out.extend_from_slice(label);
    }
    out.push(0);
    if out.len() - HEADER > 255 {
        return Err(io::Error::other("name longer than 255 bytes"));
    }
    finish(&mut out, query);
    Ok(out)
}

/// A query's header, in a buffer with room for a name of `name_len`
/// bytes, the question's type and class, and the OPT record.
fn header(id: u16, name_len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + name_len + 4 + OPT);
    out.extend_from_slice(&id.to_be_bytes());
    // QR=0, OPCODE=QUERY, RD=1; one question, one additional (the OPT).
    out.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
    out
}

/// After the question's name: its type and class, then the OPT record.
fn finish(out: &mut Vec<u8>, query: &Query) {
    out.extend_from_slice(&u16::from(query.query_type()).to_be_bytes());
    out.extend_from_slice(&u16::from(query.query_class()).to_be_bytes());
    // OPT: root owner, TYPE 41, CLASS = our UDP payload size, TTL = extended
    // RCODE 0, version 0, no flags; no options.
    out.push(0);
    out.extend_from_slice(&41u16.to_be_bytes());
    out.extend_from_slice(&PAYLOAD.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
}

/// [`encode`] for a name already on the wire as `name` (length-prefixed
/// labels, the root's zero byte last, uncompressed: `query`'s name as it
/// is spelt, which the caller vouches for): a copy where `encode` walks
/// the labels (about half of the 800 instructions a miss spent on its
/// query). Refused, never sent, when `name` is not one well-formed name.
fn encode_spelt(id: u16, name: &[u8], query: &Query) -> io::Result<Vec<u8>> {
    let mut out = [0; SPELT_MAX];
    let len = write_spelt(id, name, query, &mut out)?;
    Ok(out[..len].to_vec())
}

/// The longest query [`write_spelt`] writes: a 255-byte name.
const SPELT_MAX: usize = HEADER + 255 + 4 + OPT;

/// [`encode_spelt`] into `out`; the query's length. The same bytes as
/// [`header`] and [`finish`] write around the name.
fn write_spelt(id: u16, name: &[u8], query: &Query, out: &mut [u8; SPELT_MAX]) -> io::Result<usize> {
    if !well_formed(name) {
        return Err(io::Error::other("not a name on the wire"));
    }
    let end = HEADER + name.len();
    let (head, rest) = out.split_at_mut(HEADER);
    head[..2].copy_from_slice(&id.to_be_bytes());
    // QR=0, OPCODE=QUERY, RD=1; one question, one additional (the OPT).
    head[2..].copy_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
    let (question, tail) = rest.split_at_mut(name.len());
    question.copy_from_slice(name);
    tail[..2].copy_from_slice(&u16::from(query.query_type()).to_be_bytes());
    tail[2..4].copy_from_slice(&u16::from(query.query_class()).to_be_bytes());
    // OPT as in `finish`: root owner, TYPE 41, CLASS = our payload size,
    // extended RCODE 0, version 0, no flags, no options.
    let [p0, p1] = PAYLOAD.to_be_bytes();
    tail[4..4 + OPT].copy_from_slice(&[0, 0, 41, p0, p1, 0, 0, 0, 0, 0, 0]);
    Ok(end + 4 + OPT)
}

/// The query for the wire name `name` written on this frame's stack (not
/// the caller's future: it never waits) and sent once, as
/// [`try_send_connected`] does: `false` when the socket's buffer was full
/// and nothing went.
fn send_spelt(
    socket: &std::net::UdpSocket,
    id: u16,
    name: &[u8],
    query: &Query,
    cleared: &mut u64,
) -> io::Result<bool> {
    let mut out = [0; SPELT_MAX];
    let len = write_spelt(id, name, query, &mut out)?;
    try_send_connected(socket, &out[..len], cleared)
}

/// Whether `name` is exactly one uncompressed name: labels of 1 to 63
/// bytes, the root's zero byte last and nowhere else, at most 255 bytes.
fn well_formed(name: &[u8]) -> bool {
    let mut at = 0;
    while let Some(&len) = name.get(at) {
        if len == 0 {
            return at + 1 == name.len() && name.len() <= 255;
        }
        if len > 63 {
            return false;
        }
        at += 1 + usize::from(len);
    }
    false
}

/// Bytes of a DNS header, and of an OPT record without options.
const HEADER: usize = 12;
const OPT: usize = 11;

/// The answer in `bytes` if it answers query `id` for exactly `sent`.
pub fn accept(bytes: &[u8], id: u16, sent: &Query) -> Option<Message> {
    // Cheap checks on the raw header first: a flood of forgeries with the
    // wrong ID costs no parse.
    let header_id = u16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]);
    if header_id != id {
        return None;
    }
    let answer = Message::from_vec(bytes).ok()?;
    let ok = answer.metadata.message_type == MessageType::Response
        && answer.metadata.op_code == OpCode::Query
        && answer.queries.len() == 1
        && answer.queries.first().is_some_and(|q| {
            q.query_type() == sent.query_type()
                && q.query_class() == sent.query_class()
                && q.name().eq_case(sent.name())
        });
    ok.then_some(answer)
}

/// `name` with each ASCII letter's case chosen at random (DNS 0x20).
fn randomize_case(name: &Name) -> Name {
    let mut bits: u64 = 0;
    let mut left = 0;
    let labels: Vec<Vec<u8>> = name
        .iter()
        .map(|label| {
            label
                .iter()
                .map(|&b| {
                    if !b.is_ascii_alphabetic() {
                        return b;
                    }
                    if left == 0 {
                        bits = rand::random();
                        left = 64;
                    }
                    let upper = bits & 1 == 1;
                    bits >>= 1;
                    left -= 1;
                    if upper {
                        b.to_ascii_uppercase()
                    } else {
                        b.to_ascii_lowercase()
                    }
                })
                .collect()
        })
        .collect();
    match Name::from_labels(labels) {
        Ok(mut n) => {
            n.set_fqdn(name.is_fqdn());
            n
        }
        Err(_) => name.clone(),
    }
}

/// Puts the client's spelling back where the upstream echoed ours.
fn restore_case(answer: &mut Message, sent: &Name, query: &Query) {
    if let Some(q) = answer.queries.first_mut() {
        *q = query.clone();
    }
    for record in answer
        .answers
        .iter_mut()
        .chain(answer.authorities.iter_mut())
        .chain(answer.additionals.iter_mut())
    {
        if record.name.eq_case(sent) {
            record.name = query.name().clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Edns;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{RData, Record, RecordType};
    use std::str::FromStr;

    fn query(name: &str) -> Query {
        Query::query(Name::from_str(name).unwrap(), RecordType::A)
    }

    fn answer_bytes(id: u16, q: &Query) -> Vec<u8> {
        let mut m = Message::response(id, OpCode::Query);
        m.add_query(q.clone());
        m.add_answer(Record::from_rdata(
            q.name().clone(),
            60,
            RData::A(A::new(203, 0, 113, 80)),
        ));
        m.to_vec().unwrap()
    }

    /// What hickory itself would send for the same query.
    fn hickory_encode(id: u16, query: &Query) -> Vec<u8> {
        let mut message = Message::query();
        message.metadata.id = id;
        message.metadata.recursion_desired = true;
        message.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(PAYLOAD);
        message.set_edns(edns);
        message.to_vec().unwrap()
    }

    #[test]
    fn queries_are_encoded_as_hickory_would() {
        for (name, qtype) in [
            ("www.Example.test.", RecordType::A),
            ("bank\\.test.", RecordType::AAAA),
            (".", RecordType::NS),
            ("_sip._udp.example.test", RecordType::SRV),
        ] {
            let mut q = Query::query(Name::from_str(name).unwrap(), qtype);
            let ours = encode(0xbeef, &q).unwrap();
            assert_eq!(ours, hickory_encode(0xbeef, &q), "{name} {qtype}");
            let parsed = Message::from_vec(&ours).unwrap();
            let [back] = parsed.queries.as_slice() else {
                panic!("one question")
            };
            assert!(back.name().eq_ignore_root_case(q.name()), "case kept");
            assert_eq!(
                (back.query_type(), back.query_class()),
                (q.query_type(), q.query_class())
            );
            assert_eq!(parsed.edns.as_ref().map(Edns::max_payload), Some(PAYLOAD));
            q.set_query_class(hickory_proto::rr::DNSClass::CH);
            assert_eq!(encode(1, &q).unwrap(), hickory_encode(1, &q));
        }
    }

    #[test]
    fn a_spelt_name_is_sent_as_encode_sends_it() {
        for (name, qtype) in [
            ("www.example.test.", RecordType::A),
            ("_sip._udp.example.test.", RecordType::SRV),
            ("a-b.0.x.", RecordType::AAAA),
        ] {
            let q = Query::query(Name::from_ascii(name).unwrap(), qtype);
            let spelt = crate::dns::names::wire_key(q.name());
            assert_eq!(
                encode_spelt(0xbeef, &spelt, &q).unwrap(),
                encode(0xbeef, &q).unwrap(),
                "{name}"
            );
        }
        // Anything but one whole name is refused, whatever the bytes.
        let q = query("www.example.test.");
        for bad in [
            &b""[..],
            b"\x03www",
            b"\x03ww\x00",
            b"\x03www\x00\x00",
            b"\xc0\x0c",
            b"\x40aaaa\x00",
            b"\x00\x01",
        ] {
            assert!(encode_spelt(1, bad, &q).is_err(), "{bad:?}");
        }
        assert!(encode_spelt(1, &[0], &q).is_ok(), "the root");
        let mut long = Vec::new();
        while long.len() < 256 {
            long.push(63);
            long.extend_from_slice(&[b'a'; 63]);
        }
        long.push(0);
        assert!(encode_spelt(1, &long, &q).is_err(), "longer than 255 bytes");
        // Garbage of small label lengths (so that some of it is well
        // formed): whatever is sent, hickory reads as one question.
        let mut rng = crate::test_rng::XorShift::new(0x1234_5678_9abc_def1);
        let mut sent = 0;
        for _ in 0..50_000 {
            let seed = rng.next_u64();
            let len = (seed % 24) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8 % 4).collect();
            if let Ok(query) = encode_spelt(1, &bytes, &q) {
                sent += 1;
                let m = Message::from_vec(&query).unwrap();
                assert_eq!(m.queries.len(), 1, "{bytes:?}");
            }
        }
        assert!(sent > 0);
    }

    /// The query written on the stack (`write_spelt`, which `send_spelt`
    /// sends) is hickory's, byte for byte, for random names up to the
    /// longest, written over a buffer of garbage; and what `send_spelt`
    /// puts on the wire is that query.
    #[test]
    fn a_query_written_on_the_stack_is_hickorys_up_to_the_longest_name() {
        // Any label bytes but capitals (a spelt name is a lowercase key),
        // dots, backslashes and binary among them.
        const LABEL: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789-_.\\\x00\xff@ ";
        let mut rng = crate::test_rng::XorShift::new(0x0dd5_eed5_1234_5678);
        let qtypes = [
            RecordType::A,
            RecordType::AAAA,
            RecordType::TXT,
            RecordType::MX,
            RecordType::HTTPS,
        ];
        let mut longest = 0;
        for round in 0..2_000u64 {
            // Labels of 1 to 63 bytes while the wire name stays within
            // 255; every eighth name filled to exactly 255.
            let mut labels: Vec<Vec<u8>> = Vec::new();
            let mut wire: usize = 1;
            loop {
                let want = 1 + (rng.next_u64() % 63) as usize;
                let room = 255 - wire;
                let len = if round % 8 == 0 {
                    want.min(room.saturating_sub(1))
                } else {
                    want
                };
                if len == 0 || wire + 1 + len > 255 || (round % 8 != 0 && rng.next_u64() % 4 == 0) {
                    break;
                }
                labels.push(
                    (0..len)
                        .map(|_| LABEL[(rng.next_u64() % LABEL.len() as u64) as usize])
                        .collect(),
                );
                wire += 1 + len;
            }
            longest = longest.max(wire);
            let text = format!("{labels:?}");
            let name = Name::from_labels(labels.iter().map(Vec::as_slice)).unwrap();
            let q = Query::query(name, qtypes[(round % 5) as usize]);
            let spelt = crate::dns::names::wire_key(q.name());
            assert_eq!(spelt.len(), wire, "{text}");
            let id = rng.next_u64() as u16;
            let mut out = [0xa5; SPELT_MAX];
            let len = write_spelt(id, &spelt, &q, &mut out).unwrap();
            assert_eq!(&out[..len], hickory_encode(id, &q).as_slice(), "{text}");
        }
        assert_eq!(longest, 255, "names of the longest length were written");
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let q = query("www.example.test.");
        let spelt = crate::dns::names::wire_key(q.name());
        let mut cleared = 0;
        assert!(send_spelt(&tx, 0x1234, &spelt, &q, &mut cleared).unwrap());
        assert_eq!(cleared, 0);
        let mut got = [0; 512];
        let n = rx.recv(&mut got).unwrap();
        assert_eq!(&got[..n], hickory_encode(0x1234, &q).as_slice());
        let mut cleared = 0;
        assert!(
            send_spelt(&tx, 1, b"\x03www", &q, &mut cleared).is_err(),
            "not a name: nothing sent"
        );
    }

    #[test]
    fn only_the_exact_question_and_id_are_accepted() {
        let sent = query("www.example.test.");
        assert!(accept(&answer_bytes(7, &sent), 7, &sent).is_some());
        assert!(accept(&answer_bytes(8, &sent), 7, &sent).is_none(), "wrong ID");
        assert!(
            accept(&answer_bytes(7, &query("bank.test.")), 7, &sent).is_none(),
            "wrong name"
        );
        let mut aaaa = sent.clone();
        aaaa.set_query_type(RecordType::AAAA);
        assert!(accept(&answer_bytes(7, &aaaa), 7, &sent).is_none(), "wrong type");
        // A query echoed back (QR=0) is not an answer.
        assert!(accept(&encode(7, &sent).unwrap(), 7, &sent).is_none());
        assert!(accept(&[0, 7], 7, &sent).is_none(), "truncated");
        assert!(accept(&[], 7, &sent).is_none());
        // Two questions, one of them ours: not an answer to ours alone.
        let mut two = Message::response(7, OpCode::Query);
        two.add_query(sent.clone());
        two.add_query(query("bank.test."));
        assert!(accept(&two.to_vec().unwrap(), 7, &sent).is_none());
    }

    #[test]
    fn case_randomization_is_checked_and_undone() {
        let client = query("www.Example.test.");
        let mut sent = client.clone();
        // Long enough that an unchanged spelling is (almost) impossible.
        let long = Name::from_str("abcdefghijklmnopqrstuvwxyz.example.test.").unwrap();
        let spun = randomize_case(&long);
        assert!(spun.eq_ignore_root(&long) && spun.is_fqdn());
        assert!(!spun.eq_case(&long) || !spun.eq_case(&randomize_case(&long)));
        sent.set_name(randomize_case(client.name()));
        let mut lower = sent.clone();
        lower.set_name(Name::from_str("www.example.test.").unwrap());
        if !sent.name().eq_case(lower.name()) {
            assert!(accept(&answer_bytes(1, &lower), 1, &sent).is_none(), "case not echoed");
        }
        let mut answer = accept(&answer_bytes(1, &sent), 1, &sent).unwrap();
        restore_case(&mut answer, sent.name(), &client);
        assert!(answer.queries[0].name().eq_case(client.name()));
        assert!(answer.answers[0].name.eq_case(client.name()));
    }
}
