//! The plainest upstream answers, checked and turned into the client's
//! reply on the wire.
//!
//! A cache miss used to read every upstream answer into a hickory
//! `Message` (about 6,200 instructions per miss, callgrind), scrub it
//! (2,200), build a response message from it and encode that (2,800): a
//! third of a miss's user-space work, for an answer that nearly always has
//! one shape. [`read`] recognises exactly that shape and nothing else:
//!
//! * a response (QR) to a standard query with our ID, RCODE NOERROR, not
//!   truncated, no extended RCODE;
//! * one question, byte for byte the name we sent (case included, never
//!   compressed), with our type and class; the type is A or AAAA, the
//!   class IN;
//! * 1 to [`MAX_RECORDS`] answer records, each owned by the question name
//!   through a pointer to it (offset 12, what servers write), of the asked
//!   type and class, with the address's exact length;
//! * nothing in the authority section, and in the additional section at
//!   most an OPT record of version 0 without options;
//! * no byte after that.
//!
//! Such an answer passes every check the full path makes (`udp::accept`:
//! ID, response, opcode, the exact question) and scrubbing removes nothing
//! from it (every record is the question's own type at the question's
//! name). Everything else — a CNAME chain, a negative answer, an error
//! RCODE, records a scrubber would drop, compression elsewhere, a
//! truncated or malformed datagram — gets `None` here and is read by
//! hickory exactly as before, so this parser only ever says "plain" or
//! "not sure": the unit tests check that whatever it accepts, hickory
//! accepts too and the engine answers and caches the same way from either.

use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::cell::Cell;
use std::net::{Ipv4Addr, Ipv6Addr};

/// Most answer records read here (an address set is a handful); more go
/// to hickory.
pub const MAX_RECORDS: usize = 32;

/// Bytes of a DNS header.
const HEADER: usize = 12;
/// Type, class, TTL and RDLENGTH after a record's owner.
const FIXED: usize = 10;
/// The OPT record we accept: root owner, then [`FIXED`] bytes, no data.
const EMPTY_OPT: usize = 1 + FIXED;
/// An answer's owner: a pointer to the question name at offset 12.
const OWNER: [u8; 2] = [0xC0, 0x0C];
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
const CLASS_IN: u16 = 1;

/// A plain answer (see the module), with where its records are.
#[derive(Debug, Clone)]
pub struct PlainAnswer {
    /// The datagram as received, with room for one more OPT record: the
    /// client's reply is written over it ([`PlainAnswer::into_reply`]).
    bytes: Vec<u8>,
    /// The question name is `bytes[HEADER..name_end]`.
    name_end: usize,
    qtype: u16,
    count: usize,
    /// Where each answer record's TTL is; its address follows 6 bytes on.
    ttls: [u16; MAX_RECORDS],
}

/// `bytes` as the answer to query `id` for `name` (the labels as sent,
/// case kept, with the root's zero byte), type `qtype`, class `qclass`,
/// if it has the plainest shape (see the module).
pub fn read(bytes: &[u8], id: u16, name: &[u8], qtype: u16, qclass: u16) -> Option<PlainAnswer> {
    let header: &[u8; HEADER] = bytes.get(..HEADER)?.try_into().ok()?;
    let word = |b: &[u8], i: usize| -> Option<u16> { Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?])) };
    let flags = word(header, 2)?;
    // QR set; OPCODE (bits 11-14) QUERY; TC clear; RCODE NOERROR.
    if word(header, 0)? != id
        || flags & 0x8000 == 0
        || flags & 0x7800 != 0
        || flags & 0x0200 != 0
        || flags & 0x000F != 0
    {
        return None;
    }
    let (qdcount, ancount, nscount, arcount) =
        (word(header, 4)?, word(header, 6)?, word(header, 8)?, word(header, 10)?);
    let count = usize::from(ancount);
    if qdcount != 1 || count == 0 || count > MAX_RECORDS || nscount != 0 || arcount > 1 {
        return None;
    }
    let rdlength = match (qtype, qclass) {
        (TYPE_A, CLASS_IN) => 4,
        (TYPE_AAAA, CLASS_IN) => 16,
        _ => return None,
    };
    // Not the root: its owners would not be written as a pointer.
    if name.len() < 2 || bytes.get(HEADER..HEADER + name.len())? != name {
        return None;
    }
    let name_end = HEADER + name.len();
    if word(bytes, name_end)? != qtype || word(bytes, name_end + 2)? != qclass {
        return None;
    }
    let mut at = name_end + 4;
    let mut ttls = [0u16; MAX_RECORDS];
    for ttl in ttls.iter_mut().take(count) {
        if bytes.get(at..at + 2)? != OWNER
            || word(bytes, at + 2)? != qtype
            || word(bytes, at + 4)? != qclass
            || usize::from(word(bytes, at + 10)?) != rdlength
        {
            return None;
        }
        *ttl = u16::try_from(at + 6).ok()?;
        at += OWNER.len() + FIXED + rdlength;
    }
    if arcount == 1 {
        // Root owner, TYPE OPT, any payload size; extended RCODE 0 and
        // version 0 (TTL's first two bytes); no options.
        if *bytes.get(at)? != 0
            || word(bytes, at + 1)? != TYPE_OPT
            || word(bytes, at + 5)? != 0
            || word(bytes, at + 9)? != 0
        {
            return None;
        }
        at += EMPTY_OPT;
    }
    if at != bytes.len() {
        return None;
    }
    // With room for the OPT record a client may want where the upstream
    // sent none: the reply is written in place. In the buffer the last
    // reply sent from this thread left, when there is one.
    let mut kept = spare_buffer(at + EMPTY_OPT);
    kept.extend_from_slice(bytes);
    Some(PlainAnswer {
        bytes: kept,
        name_end,
        qtype,
        count,
        ttls,
    })
}

thread_local! {
    /// A reply's buffer, given back ([`give_back`]) once the reply was
    /// copied into its listener's batch: the next plain answer read on
    /// this thread is copied into it. A miss reads its answer, writes the
    /// reply over it and hands it to the listener in one poll, so one
    /// buffer a thread serves one miss after another, and the answer's
    /// allocation and its free (about 330 instructions a miss, callgrind)
    /// are not made. Never read: [`spare_buffer`] empties it first.
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Largest buffer [`give_back`] keeps: a classic UDP answer's worth, so
/// that a rare large answer does not stay allocated per thread.
const SPARE_MAX: usize = 512;

/// An empty buffer with room for `len` bytes: this thread's spare, or a
/// new one.
fn spare_buffer(len: usize) -> Vec<u8> {
    let mut kept = SPARE.try_with(Cell::take).unwrap_or_default();
    kept.clear();
    kept.reserve(len);
    kept
}

/// Keeps `reply` (a reply the caller has copied where it goes) as this
/// thread's spare for the next answer, unless it is larger than
/// [`SPARE_MAX`].
pub fn give_back(reply: Vec<u8>) {
    if reply.capacity() <= SPARE_MAX {
        let _ = SPARE.try_with(|spare| spare.set(reply));
    }
}

impl PlainAnswer {
    /// The question name as sent and echoed (labels, case kept, root byte).
    pub fn name(&self) -> &[u8] {
        self.bytes.get(HEADER..self.name_end).unwrap_or_default()
    }

    /// Whether `name` is the question name, labels and case alike (what
    /// comparing it with [`PlainAnswer::name`] says, without writing it
    /// out first).
    pub fn is_named(&self, name: &Name) -> bool {
        let mut wire = self.name();
        for label in name.iter() {
            let Some((&len, rest)) = wire.split_first() else {
                return false;
            };
            match rest.split_at_checked(label.len()) {
                Some((bytes, after)) if usize::from(len) == label.len() && bytes == label => wire = after,
                _ => return false,
            }
        }
        wire == [0]
    }

    /// The whole datagram (for hickory, when the plain path does not apply).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Answer records (at least one).
    pub fn records_count(&self) -> usize {
        self.count
    }

    /// Each record's TTL and address data, in order.
    fn records(&self) -> impl Iterator<Item = (u32, &[u8])> + '_ {
        let rdlength = if self.qtype == TYPE_A { 4 } else { 16 };
        self.ttls.iter().take(self.count).filter_map(move |&at| {
            let at = usize::from(at);
            let ttl = u32::from_be_bytes(self.bytes.get(at..at + 4)?.try_into().ok()?);
            Some((ttl, self.bytes.get(at + 6..at + 6 + rdlength)?))
        })
    }

    /// The client's reply and the cache's records, with every TTL put
    /// through `clamp`, the reply written over the upstream's datagram;
    /// the answer back, untouched, when the reply would be longer than
    /// `limit` (the full path truncates it).
    ///
    /// The reply is what `message::response` plus the encoder write for
    /// the same answer: header (the client's ID, RD and CD; RA; NOERROR),
    /// the question, each record as a pointer to the question name with
    /// type, class, clamped TTL and the address, then our OPT record when
    /// the client sent one. [`read`] checked that the datagram is laid out
    /// exactly so up to the end of its records, so only the header's ID,
    /// flags and ARCOUNT, the TTLs and the OPT are written: no second
    /// buffer, no copy. The question is the one sent upstream, which the
    /// caller checked is the client's, case included
    /// ([`PlainAnswer::is_named`]); the records are owned by `owner`, the
    /// same name.
    pub fn into_reply(
        mut self,
        to: &ReplyTo<'_>,
        clamp: impl Fn(u32) -> u32,
        limit: usize,
    ) -> Result<(Vec<u8>, Vec<Record>), PlainAnswer> {
        let rdlength = if self.qtype == TYPE_A { 4 } else { 16 };
        let records_end = self.name_end + 4 + self.count * (OWNER.len() + FIXED + rdlength);
        let len = records_end + to.our_payload.map_or(0, |_| EMPTY_OPT);
        if len > limit || records_end > self.bytes.len() {
            return Err(self);
        }
        // Everything that reads is done before anything is written, so
        // the answer goes back whole if a read fails (it cannot: `read`
        // checked every offset).
        let mut records = Vec::with_capacity(self.count);
        for (ttl, data) in self.records() {
            let rdata = match <[u8; 4]>::try_from(data) {
                Ok(v4) => RData::A(A(Ipv4Addr::from(v4))),
                Err(_) => match <[u8; 16]>::try_from(data) {
                    Ok(v6) => RData::AAAA(AAAA(Ipv6Addr::from(v6))),
                    Err(_) => break,
                },
            };
            records.push(Record::from_rdata(to.owner.clone(), clamp(ttl), rdata));
        }
        let Some(count) = u16::try_from(records.len())
            .ok()
            .filter(|_| records.len() == self.count)
        else {
            return Err(self);
        };
        let out = &mut self.bytes;
        let flags = [
            0x80 | u8::from(to.recursion_desired),
            0x80 | (u8::from(to.checking_disabled) << 4),
        ];
        let arcount = u16::from(to.our_payload.is_some());
        let header = [
            &to.id.to_be_bytes()[..],
            &flags,
            &[0, 1],
            &count.to_be_bytes(),
            &[0, 0],
            &arcount.to_be_bytes(),
        ];
        let mut at = 0;
        for part in header {
            if let Some(dst) = out.get_mut(at..at + part.len()) {
                dst.copy_from_slice(part);
            }
            at += part.len();
        }
        for (&ttl_at, record) in self.ttls.iter().zip(&records) {
            let ttl_at = usize::from(ttl_at);
            if let Some(dst) = out.get_mut(ttl_at..ttl_at + 4) {
                dst.copy_from_slice(&record.ttl.to_be_bytes());
            }
        }
        out.truncate(records_end);
        if let Some(payload) = to.our_payload {
            // Root owner, TYPE OPT, our payload size, extended RCODE,
            // version and flags 0, no options.
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&payload.max(512).to_be_bytes());
            out.extend_from_slice(&[0; 6]);
        }
        debug_assert_eq!(out.len(), len);
        Ok((self.bytes, records))
    }

    /// The record type asked and answered.
    pub fn record_type(&self) -> RecordType {
        RecordType::from(self.qtype)
    }
}

/// Who the reply goes to and how they asked.
#[derive(Debug)]
pub struct ReplyTo<'a> {
    pub id: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The client's question name (the answer's, case included), owner
    /// of the cached records.
    pub owner: &'a Name,
    /// Our OPT record's payload size, when the client sent an OPT.
    pub our_payload: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
    use hickory_proto::rr::DNSClass;
    use hickory_proto::rr::rdata::{CNAME, NS};

    const ID: u16 = 0x5151;

    /// Case kept (`from_str` would lowercase).
    fn n(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    /// The labels of `name` as sent, case kept.
    fn labels(name: &str) -> Vec<u8> {
        super::super::rendered::wire_labels(&n(name))
    }

    fn upstream(qname: &str, qtype: RecordType, records: Vec<Record>, edns: bool) -> Message {
        let mut m = Message::new(ID, MessageType::Response, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.add_query(Query::query(n(qname), qtype));
        m.answers = records;
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(1232);
            m.set_edns(e);
        }
        m
    }

    fn a(owner: &str, ttl: u32, last: u8) -> Record {
        Record::from_rdata(n(owner), ttl, RData::A(A::new(203, 0, 113, last)))
    }

    fn aaaa(owner: &str, ttl: u32, last: u16) -> Record {
        Record::from_rdata(
            n(owner),
            ttl,
            RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)),
        )
    }

    /// What hickory reads in `bytes` for the question `qname`/`qtype`,
    /// as the full path would accept it, or `None`.
    fn hickory(bytes: &[u8], qname: &str, qtype: RecordType) -> Option<Message> {
        let sent = Query::query(n(qname), qtype);
        crate::dns::upstream::accept_answer(bytes, ID, &sent)
    }

    /// Whatever [`read`] accepts, the full path accepts too, with the same
    /// records, nothing for scrubbing to remove, and no error or truncation.
    fn agrees_with_hickory(bytes: &[u8], qname: &str, qtype: RecordType) {
        let Some(plain) = read(bytes, ID, &labels(qname), u16::from(qtype), 1) else {
            return;
        };
        let msg = hickory(bytes, qname, qtype).expect("hickory accepts what is plain");
        assert_eq!(msg.metadata.response_code, ResponseCode::NoError);
        assert!(!msg.metadata.truncation);
        assert!(msg.authorities.is_empty() && msg.additionals.is_empty());
        assert!(msg.edns.as_ref().is_none_or(|e| e.options().as_ref().is_empty()));
        assert_eq!(msg.answers.len(), plain.records_count());
        for (r, (ttl, data)) in msg.answers.iter().zip(plain.records()) {
            assert!(r.name.eq_case(&n(qname)), "owner is the question name");
            assert_eq!((r.record_type(), r.dns_class, r.ttl), (qtype, DNSClass::IN, ttl));
            let expected = match &r.data {
                RData::A(v4) => v4.0.octets().to_vec(),
                RData::AAAA(v6) => v6.0.octets().to_vec(),
                other => panic!("not an address: {other:?}"),
            };
            assert_eq!(expected, data);
        }
        let mut scrubbed = msg.clone();
        let removed = crate::dns::scrub::scrub(&Query::query(n(qname), qtype), &mut scrubbed);
        assert_eq!((removed.removed, removed.broken), (0, None), "nothing to scrub");
    }

    #[test]
    fn reads_plain_answers_as_hickory_does() {
        for edns in [false, true] {
            let bytes = upstream(
                "Www.Example.test.",
                RecordType::A,
                vec![a("Www.Example.test.", 300, 1), a("Www.Example.test.", 0x8000_0001, 2)],
                edns,
            )
            .to_vec()
            .unwrap();
            let plain = read(&bytes, ID, &labels("Www.Example.test."), 1, 1).expect("plain");
            assert_eq!(plain.records_count(), 2);
            assert_eq!(plain.name(), labels("Www.Example.test.").as_slice());
            assert!(plain.is_named(&n("Www.Example.test.")));
            for other in [
                "www.example.test.",
                "Www.Example.test.x.",
                "Www.Example.",
                "Www.Example.tesT.",
                ".",
            ] {
                assert!(!plain.is_named(&n(other)), "{other}");
            }
            agrees_with_hickory(&bytes, "Www.Example.test.", RecordType::A);
            let six = upstream("v6.test.", RecordType::AAAA, vec![aaaa("v6.test.", 60, 7)], edns)
                .to_vec()
                .unwrap();
            assert!(read(&six, ID, &labels("v6.test."), 28, 1).is_some());
            agrees_with_hickory(&six, "v6.test.", RecordType::AAAA);
        }
    }

    #[test]
    fn anything_else_is_left_to_hickory() {
        let q = "www.example.test.";
        let plain = |m: &Message| read(&m.to_vec().unwrap(), ID, &labels(q), 1, 1).is_some();
        let base = upstream(q, RecordType::A, vec![a(q, 300, 1)], true);
        assert!(plain(&base));
        let with = |f: &dyn Fn(&mut Message)| {
            let mut m = base.clone();
            f(&mut m);
            m
        };
        let cases: Vec<(&str, Message)> = vec![
            ("wrong ID", with(&|m| m.metadata.id = ID ^ 1)),
            ("a query", with(&|m| m.metadata.message_type = MessageType::Query)),
            ("another opcode", with(&|m| m.metadata.op_code = OpCode::Status)),
            ("truncated", with(&|m| m.metadata.truncation = true)),
            ("NXDOMAIN", with(&|m| m.metadata.response_code = ResponseCode::NXDomain)),
            ("SERVFAIL", with(&|m| m.metadata.response_code = ResponseCode::ServFail)),
            (
                "extended RCODE",
                with(&|m| m.metadata.response_code = ResponseCode::BADVERS),
            ),
            ("no answer", with(&|m| m.answers.clear())),
            (
                "two questions",
                with(&|m| {
                    m.add_query(Query::query(n("bank.test."), RecordType::A));
                }),
            ),
            ("no question", with(&|m| m.queries.clear())),
            (
                "another name",
                with(&|m| m.queries[0] = Query::query(n("bank.test."), RecordType::A)),
            ),
            (
                "the name in another case",
                with(&|m| m.queries[0] = Query::query(n("WWW.example.test."), RecordType::A)),
            ),
            (
                "another type",
                with(&|m| m.queries[0] = Query::query(n(q), RecordType::AAAA)),
            ),
            (
                "a record of another name",
                with(&|m| m.answers.push(a("bank.test.", 300, 9))),
            ),
            (
                "a CNAME chain",
                with(&|m| {
                    m.answers
                        .insert(0, Record::from_rdata(n(q), 60, RData::CNAME(CNAME(n("web.test.")))))
                }),
            ),
            (
                "an authority record",
                with(&|m| {
                    m.add_authority(Record::from_rdata(n("example.test."), 60, RData::NS(NS(n("ns.test.")))));
                }),
            ),
            (
                "an additional record",
                with(&|m| {
                    m.add_additional(a("ns.test.", 60, 3));
                }),
            ),
            ("an AAAA in an A answer", with(&|m| m.answers.push(aaaa(q, 60, 1)))),
            (
                "too many records",
                with(&|m| m.answers = (0..=MAX_RECORDS as u8).map(|i| a(q, 60, i)).collect()),
            ),
        ];
        for (why, m) in cases {
            assert!(!plain(&m), "{why}");
        }
        let mut version = base.clone();
        version.edns.as_mut().unwrap().set_version(1);
        assert!(!plain(&version), "EDNS version 1");
        let mut option = base.clone();
        option
            .edns
            .as_mut()
            .unwrap()
            .options_mut()
            .insert(hickory_proto::rr::rdata::opt::EdnsOption::Unknown(65001, vec![1]));
        assert!(!plain(&option), "EDNS option");
        // Byte-level shapes hickory's encoder never writes.
        let bytes = base.to_vec().unwrap();
        let owner = 12 + labels(q).len() + 4;
        assert_eq!(bytes[owner..owner + 2], OWNER);
        let mut literal = bytes[..owner].to_vec();
        literal.extend_from_slice(&labels(q));
        literal.extend_from_slice(&bytes[owner + 2..]);
        assert!(hickory(&literal, q, RecordType::A).is_some());
        assert!(read(&literal, ID, &labels(q), 1, 1).is_none(), "owner written out");
        let mut elsewhere = bytes.clone();
        elsewhere[owner + 1] = 13; // a pointer into the middle of the name
        assert!(
            read(&elsewhere, ID, &labels(q), 1, 1).is_none(),
            "owner pointer elsewhere"
        );
        let mut long = bytes.clone();
        long[owner + 11] = 5; // RDLENGTH 5 for an A record
        assert!(
            read(&long, ID, &labels(q), 1, 1).is_none(),
            "address of the wrong length"
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(
            read(&trailing, ID, &labels(q), 1, 1).is_none(),
            "a byte after the message"
        );
        let mut chaos = bytes.clone();
        chaos[owner - 1] = 3; // the question's class: CH
        assert!(read(&chaos, ID, &labels(q), 1, 3).is_none(), "class CH");
        let root = upstream(".", RecordType::A, vec![a(".", 60, 1)], false)
            .to_vec()
            .unwrap();
        assert!(read(&root, ID, &[0], 1, 1).is_none(), "the root");
        for len in 0..bytes.len() {
            assert!(read(&bytes[..len], ID, &labels(q), 1, 1).is_none(), "cut at {len}");
        }
    }

    #[test]
    fn hostile_bytes_never_panic_and_what_is_accepted_is_what_hickory_reads() {
        let q = "x.example.";
        let bases = [
            upstream(q, RecordType::A, vec![a(q, 300, 1), a(q, 7, 2)], true),
            upstream(q, RecordType::A, vec![a(q, 0, 1)], false),
        ];
        for base in &bases {
            let base = base.to_vec().unwrap();
            for i in 0..base.len() {
                for b in [
                    0u8,
                    1,
                    3,
                    0x0c,
                    0x1c,
                    0x29,
                    0x3f,
                    0x40,
                    0x7f,
                    0x80,
                    0xc0,
                    0xc0 | 0x0c,
                    0xff,
                    b'X',
                ] {
                    let mut v = base.clone();
                    v[i] = b;
                    agrees_with_hickory(&v, q, RecordType::A);
                    // A compression loop: the question's first label made a
                    // pointer to itself.
                    if i == 12 {
                        v[13] = 12;
                        agrees_with_hickory(&v, q, RecordType::A);
                    }
                    v.truncate(i);
                    agrees_with_hickory(&v, q, RecordType::A);
                }
            }
        }
        // Arbitrary bytes behind a plausible header, deterministically.
        let mut rng = crate::test_rng::XorShift::new(0x9e37_79b9_7f4a_7c15);
        let question = [labels(q), vec![0, 1, 0, 1]].concat();
        for round in 0..20_000 {
            let seed = rng.next_u64();
            let len = (seed % 96) as usize;
            let mut v: Vec<u8> = vec![
                (ID >> 8) as u8,
                ID as u8,
                0x81,
                0x80,
                0,
                1,
                0,
                (seed >> 40) as u8 % 4,
                0,
                0,
                0,
                (seed >> 48) as u8 % 2,
            ];
            if round % 2 == 0 {
                v.extend_from_slice(&question);
            }
            v.extend((0..len).map(|i| (seed >> (i % 8 * 8)) as u8));
            agrees_with_hickory(&v, q, RecordType::A);
        }
    }

    #[test]
    fn the_reply_has_the_clients_id_flags_name_and_clamped_ttls() {
        let q = "WWW.example.TEST.";
        let bytes = upstream(q, RecordType::A, vec![a(q, 5, 1), a(q, 999_999, 2)], true)
            .to_vec()
            .unwrap();
        let plain = read(&bytes, ID, &labels(q), 1, 1).unwrap();
        let owner = n(q);
        let to = ReplyTo {
            id: 7,
            recursion_desired: false,
            checking_disabled: true,
            owner: &owner,
            our_payload: Some(1232),
        };
        let (reply, records) = plain.clone().into_reply(&to, |t| t.clamp(60, 3600), 4096).unwrap();
        let msg = Message::from_vec(&reply).unwrap();
        assert_eq!(msg.metadata.id, 7);
        assert!(!msg.metadata.recursion_desired && msg.metadata.checking_disabled && msg.metadata.recursion_available);
        assert!(msg.queries[0].name().eq_case(&owner));
        let ttls: Vec<u32> = msg.answers.iter().map(|r| r.ttl).collect();
        assert_eq!(ttls, [60, 3600]);
        assert!(msg.answers.iter().all(|r| r.name.eq_case(&owner)));
        assert_eq!(msg.answers, records);
        assert_eq!(msg.edns.as_ref().map(Edns::max_payload), Some(1232));
        // Longer than the client takes: the full path truncates it, from
        // the answer as it came, not a half-written one.
        let refused = plain.clone().into_reply(&to, |t| t, reply.len() - 1).unwrap_err();
        assert_eq!(refused.bytes(), bytes.as_slice());
        assert!(plain.into_reply(&to, |t| t, reply.len()).is_ok());
    }

    /// A reply given back is the buffer the next answer read on the
    /// thread is copied into: the same memory, holding that answer's bytes
    /// and nothing of the longer reply before it, with room for the OPT;
    /// a reply past [`SPARE_MAX`] is not kept.
    #[test]
    fn the_next_answer_is_read_into_the_reply_given_back() {
        let q = "Spare.example.test.";
        let owner = n(q);
        let to = ReplyTo {
            id: 9,
            recursion_desired: true,
            checking_disabled: false,
            owner: &owner,
            our_payload: Some(1232),
        };
        let long = upstream(q, RecordType::AAAA, (0..4).map(|i| aaaa(q, 60, i)).collect(), true)
            .to_vec()
            .unwrap();
        let short = upstream(q, RecordType::A, vec![a(q, 300, 1)], false).to_vec().unwrap();
        let (reply, _) = read(&long, ID, &labels(q), 28, 1)
            .unwrap()
            .into_reply(&to, |t| t, 4096)
            .unwrap();
        let (given, capacity) = (reply.as_ptr(), reply.capacity());
        give_back(reply);
        let next = read(&short, ID, &labels(q), 1, 1).unwrap();
        assert_eq!(next.bytes(), short.as_slice(), "the answer's bytes, nothing left over");
        assert_eq!(next.bytes.as_ptr(), given, "read into the buffer given back");
        assert_eq!(next.bytes.capacity(), capacity);
        // Taken: the answer after it gets a buffer of its own.
        let other = read(&short, ID, &labels(q), 1, 1).unwrap();
        assert_ne!(other.bytes.as_ptr(), given);
        let (reply, _) = next.into_reply(&to, |t| t, 4096).unwrap();
        assert_eq!(reply, written_afresh(&to, 1, &[(300, vec![203, 0, 113, 1])]));
        // A large buffer is freed, not kept.
        give_back(Vec::with_capacity(SPARE_MAX + 1));
        assert_eq!(SPARE.with(Cell::take).capacity(), 0);
        give_back(Vec::with_capacity(SPARE_MAX));
        assert_eq!(SPARE.with(Cell::take).capacity(), SPARE_MAX);
    }

    /// The reply as `message::response` and the encoder write it for the
    /// same answer, written out byte by byte (what the plain path wrote
    /// into a buffer of its own before it wrote over the answer).
    fn written_afresh(to: &ReplyTo<'_>, qtype: u16, records: &[(u32, Vec<u8>)]) -> Vec<u8> {
        let mut out = to.id.to_be_bytes().to_vec();
        out.push(0x80 | u8::from(to.recursion_desired));
        out.push(0x80 | (u8::from(to.checking_disabled) << 4));
        for count in [1, records.len() as u16, 0, u16::from(to.our_payload.is_some())] {
            out.extend_from_slice(&count.to_be_bytes());
        }
        out.extend_from_slice(&super::super::rendered::wire_labels(to.owner));
        out.extend_from_slice(&qtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        for (ttl, data) in records {
            out.extend_from_slice(&OWNER);
            out.extend_from_slice(&qtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(data.len() as u16).to_be_bytes());
            out.extend_from_slice(data);
        }
        if let Some(payload) = to.our_payload {
            out.extend_from_slice(&[0, 0, 41]);
            out.extend_from_slice(&payload.max(512).to_be_bytes());
            out.extend_from_slice(&[0; 6]);
        }
        out
    }

    /// Whatever the upstream set that the client must not see (its ID, AA,
    /// AD, Z, RA clear, RD as it was sent, its OPT's payload size and DO
    /// flag) is written over; whatever the client asked for (its ID, RD,
    /// CD, an OPT or none) is in the reply, with or without an OPT from
    /// the upstream: byte for byte the reply written afresh, and read by
    /// hickory as the client's answer.
    #[test]
    fn the_reply_written_over_the_answer_is_the_reply_written_afresh() {
        let q = "Mixed.Case.example.";
        let owner = n(q);
        let mut rng = crate::test_rng::XorShift::new(0x2545_f491_4f6c_dd1d);
        for upstream_edns in [false, true] {
            for qtype in [RecordType::A, RecordType::AAAA] {
                for count in [1usize, 2, MAX_RECORDS] {
                    let records: Vec<Record> = (0..count)
                        .map(|i| match qtype {
                            RecordType::A => a(q, (i as u32) * 1_000_003, i as u8),
                            _ => aaaa(q, 0xffff_ff00 + i as u32, i as u16),
                        })
                        .collect();
                    let mut bytes = upstream(q, qtype, records, upstream_edns).to_vec().unwrap();
                    // Header bits a server should not set: AA, then AD and Z.
                    bytes[2] |= 0x04;
                    bytes[3] |= 0x60;
                    if upstream_edns {
                        let opt = bytes.len() - 11;
                        bytes[opt + 3..opt + 5].copy_from_slice(&[0xff, 0xff]); // payload
                        bytes[opt + 7] = 0x80; // DO
                    }
                    let plain = read(&bytes, ID, &labels(q), u16::from(qtype), 1).expect("plain");
                    let kept: Vec<(u32, Vec<u8>)> = plain.records().map(|(t, d)| (t, d.to_vec())).collect();
                    for (rd, cd, our_payload) in [
                        (true, false, None),
                        (false, true, Some(1232)),
                        (true, true, Some(100)),
                        (false, false, Some(4096)),
                    ] {
                        let seed = rng.next_u64();
                        let to = ReplyTo {
                            id: seed as u16,
                            recursion_desired: rd,
                            checking_disabled: cd,
                            owner: &owner,
                            our_payload,
                        };
                        let clamp = |t: u32| t.clamp(30, 86_400);
                        let clamped: Vec<(u32, Vec<u8>)> = kept.iter().map(|(t, d)| (clamp(*t), d.clone())).collect();
                        let expected = written_afresh(&to, u16::from(qtype), &clamped);
                        let (reply, cached) = plain.clone().into_reply(&to, clamp, 65_535).expect("fits");
                        assert_eq!(
                            reply, expected,
                            "{qtype} x{count}, upstream OPT {upstream_edns}, client {our_payload:?}"
                        );
                        let msg = Message::from_vec(&reply).unwrap();
                        assert_eq!(msg.metadata.id, to.id);
                        assert!(!msg.metadata.authoritative && !msg.metadata.authentic_data);
                        assert_eq!(msg.answers, cached);
                        assert_eq!(msg.edns.is_some(), our_payload.is_some());
                        assert!(msg.edns.as_ref().is_none_or(|e| !e.flags().dnssec_ok));
                        // One byte short of the reply: refused, the answer untouched.
                        let refused = plain.clone().into_reply(&to, clamp, expected.len() - 1).unwrap_err();
                        assert_eq!(refused.bytes(), bytes.as_slice());
                    }
                }
            }
        }
    }
}
