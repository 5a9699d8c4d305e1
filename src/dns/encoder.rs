//! Writing a response directly, for the shapes nearly every answer has,
//! byte for byte as hickory's encoder writes it.
//!
//! Every reply used to go through hickory's `Message::to_vec`: on a cache
//! miss that was the largest single item (about 7,000 instructions of
//! 48,000), mostly its buffer abstraction writing a byte at a time and its
//! compression table copying every name suffix it stores. Here the same
//! output comes from one `Vec` and a table of references into the message:
//! the header, the question, records whose data is an address or names
//! (A, AAAA, CNAME, NS, PTR, SOA) and an OPT record without options.
//! Anything else — another record type, EDNS options, an extended RCODE,
//! a signature, very many records — returns `None` and the caller uses
//! hickory, so no answer is ever written differently: the unit tests
//! compare both encoders' bytes over many messages.
//!
//! Names are compressed exactly as hickory does it (RFC 1035 4.1.4): each
//! name is written out, then its suffixes are looked up, longest first,
//! among those of earlier names (exact bytes, so case-sensitive); the first
//! match replaces the rest of the name by a pointer, and the suffixes that
//! did not match become candidates themselves (at most 64, only below
//! offset 0x3FFF, and compression stops after 120 names).

use hickory_proto::op::{Message, MessageType};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// hickory's limit on stored compression candidates.
const MAX_CANDIDATES: usize = 64;
/// hickory's limit on names compressed per message.
const MAX_COMPRESSED: usize = 120;
/// Past this many records the message goes to hickory (so the name limit
/// above is never reached here either).
const MAX_RECORDS: usize = 32;
/// A name of at most 255 bytes has at most 127 labels.
const MAX_LABELS: usize = 128;

/// `msg` encoded as hickory would encode it, or `None` when it has
/// something this encoder does not write.
pub fn encode(msg: &Message) -> Option<Vec<u8>> {
    let records = msg.answers.len() + msg.authorities.len() + msg.additionals.len();
    if records > MAX_RECORDS || msg.signature.is_some() || msg.queries.len() > MAX_RECORDS {
        return None;
    }
    let rcode = msg.metadata.response_code;
    let edns = msg.edns.as_ref();
    if rcode.high() > 0 || edns.is_some_and(|e| !e.options().as_ref().is_empty()) {
        return None;
    }
    let mut w = Writer {
        out: Vec::with_capacity(512),
        candidates: Vec::with_capacity(16),
        arena: Vec::with_capacity(256),
        compressed: 0,
    };
    let m = &msg.metadata;
    w.u16(m.id);
    let mut flags = if m.message_type == MessageType::Response {
        0x80
    } else {
        0
    };
    flags |= u8::from(m.op_code) << 3;
    flags |= u8::from(m.authoritative) << 2;
    flags |= u8::from(m.truncation) << 1;
    flags |= u8::from(m.recursion_desired);
    w.out.push(flags);
    let mut flags = u8::from(m.recursion_available) << 7;
    flags |= u8::from(m.authentic_data) << 5;
    flags |= u8::from(m.checking_disabled) << 4;
    flags |= rcode.low();
    w.out.push(flags);
    // Counts fit: each list is at most MAX_RECORDS long.
    let count = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
    w.u16(count(msg.queries.len()));
    w.u16(count(msg.answers.len()));
    w.u16(count(msg.authorities.len()));
    w.u16(count(msg.additionals.len() + usize::from(edns.is_some())));
    for q in &msg.queries {
        w.name(q.name())?;
        w.u16(u16::from(q.query_type()));
        w.u16(u16::from(q.query_class()));
    }
    for record in msg.answers.iter().chain(&msg.authorities).chain(&msg.additionals) {
        w.record(record)?;
    }
    if let Some(edns) = edns {
        // The OPT record (RFC 6891 6.1.2): root owner, the payload size as
        // class, extended RCODE, version and flags as TTL, no options.
        w.root();
        w.u16(u16::from(RecordType::OPT));
        w.u16(edns.max_payload().max(512));
        let ttl =
            (u32::from(rcode.high()) << 24) | (u32::from(edns.version()) << 16) | u32::from(u16::from(*edns.flags()));
        w.u32(ttl);
        w.u16(0);
    }
    Some(w.out)
}

/// A name suffix written earlier: at `offset` in the message, with the
/// labels `arena[start..end]` (length-prefixed, no terminator) as first
/// written, before any of it was replaced by a pointer.
struct Candidate {
    offset: u16,
    start: usize,
    end: usize,
}

struct Writer {
    out: Vec<u8>,
    candidates: Vec<Candidate>,
    /// Every name written so far, uncompressed, back to back: what the
    /// candidates are compared against (exact bytes, as hickory does).
    arena: Vec<u8>,
    compressed: usize,
}

impl Writer {
    fn u16(&mut self, v: u16) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.out.extend_from_slice(&v.to_be_bytes());
    }

    /// The root name, as hickory writes it: no label, so no candidate,
    /// but it counts as a compressed name.
    fn root(&mut self) {
        self.compressed += 1;
        self.out.push(0);
    }

    fn record(&mut self, r: &Record) -> Option<()> {
        let rtype = r.record_type();
        if !matches!(
            rtype,
            RecordType::A | RecordType::AAAA | RecordType::CNAME | RecordType::NS | RecordType::PTR | RecordType::SOA
        ) {
            return None;
        }
        self.name(&r.name)?;
        self.u16(u16::from(rtype));
        self.u16(u16::from(r.dns_class));
        self.u32(r.ttl);
        let place = self.out.len();
        self.u16(0);
        match &r.data {
            RData::A(a) => self.out.extend_from_slice(&a.0.octets()),
            RData::AAAA(a) => self.out.extend_from_slice(&a.0.octets()),
            RData::CNAME(n) => self.name(&n.0)?,
            RData::NS(n) => self.name(&n.0)?,
            RData::PTR(n) => self.name(&n.0)?,
            RData::SOA(soa) => {
                self.name(&soa.mname)?;
                self.name(&soa.rname)?;
                self.u32(soa.serial);
                self.out.extend_from_slice(&soa.refresh.to_be_bytes());
                self.out.extend_from_slice(&soa.retry.to_be_bytes());
                self.out.extend_from_slice(&soa.expire.to_be_bytes());
                self.u32(soa.minimum);
            }
            _ => return None,
        }
        let len = u16::try_from(self.out.len() - place - 2).ok()?;
        self.out[place..place + 2].copy_from_slice(&len.to_be_bytes());
        Some(())
    }

    /// Writes `name`, compressed against the names before it.
    fn name(&mut self, name: &Name) -> Option<()> {
        // The labels as they would be written in full, and where each
        // starts: in the arena, which keeps them for later names.
        let base = self.arena.len();
        let mut starts = [0usize; MAX_LABELS];
        let mut labels = 0;
        for label in name.iter() {
            let len = u8::try_from(label.len()).ok().filter(|&l| l <= 63)?;
            *starts.get_mut(labels)? = self.arena.len();
            labels += 1;
            self.arena.push(len);
            self.arena.extend_from_slice(label);
        }
        let end = self.arena.len();
        if end - base + 1 > 255 {
            self.arena.truncate(base);
            return None;
        }
        // Where the name ends in the message if written in full (hickory
        // stores candidates only while that is below 0x3FFF).
        let at = self.out.len();
        let full_end = at + (end - base);
        let compress = self.compressed < MAX_COMPRESSED;
        if compress {
            self.compressed += 1;
        }
        for &start in &starts[..labels] {
            let offset = at + (start - base);
            if compress && let Some(target) = self.find(&self.arena[start..end]) {
                self.out.extend_from_slice(&self.arena[base..start]);
                self.u16(0xC000 | target);
                return Some(());
            }
            if full_end < 0x3FFF && self.candidates.len() < MAX_CANDIDATES {
                self.candidates.push(Candidate {
                    offset: u16::try_from(offset).ok()?,
                    start,
                    end,
                });
            }
        }
        self.out.extend_from_slice(&self.arena[base..end]);
        self.out.push(0);
        Some(())
    }

    /// The first candidate whose labels are exactly `labels`.
    fn find(&self, labels: &[u8]) -> Option<u16> {
        self.candidates
            .iter()
            .find(|c| self.arena.get(c.start..c.end) == Some(labels))
            .map(|c| c.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Edns, OpCode, Query, ResponseCode};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, PTR, SOA, TXT};
    use hickory_proto::rr::{DNSClass, RData, Record};
    use std::str::FromStr;

    fn n(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn same_as_hickory(m: &Message) {
        let ours = encode(m).expect("a shape this encoder writes");
        assert_eq!(ours, m.to_vec().unwrap(), "{m:?}");
    }

    fn response(q: &str, qtype: RecordType) -> Message {
        let mut m = Message::response(0x1234, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.metadata.recursion_available = true;
        m.add_query(Query::query(n(q), qtype));
        m
    }

    fn soa(zone: &str) -> Record {
        let soa = SOA::new(
            n(&format!("ns1.{zone}")),
            n(&format!("hostmaster.{zone}")),
            7,
            3600,
            -1,
            86400,
            60,
        );
        Record::from_rdata(n(zone), 300, RData::SOA(soa))
    }

    #[test]
    fn common_answers_are_written_as_hickory_writes_them() {
        // An address answer, with and without OPT, in the client's case.
        let mut m = response("WwW.Example.test.", RecordType::A);
        m.add_answer(Record::from_rdata(
            n("WwW.Example.test."),
            60,
            RData::A(A::new(203, 0, 113, 7)),
        ));
        m.add_answer(Record::from_rdata(
            n("www.example.test."),
            60,
            RData::A(A::new(203, 0, 113, 8)),
        ));
        same_as_hickory(&m);
        let mut edns = Edns::new();
        edns.set_max_payload(1232);
        m.set_edns(edns.clone());
        same_as_hickory(&m);
        edns.set_dnssec_ok(true);
        edns.set_max_payload(100);
        m.set_edns(edns);
        m.metadata.checking_disabled = true;
        m.metadata.authentic_data = true;
        m.metadata.authoritative = true;
        same_as_hickory(&m);

        // A CNAME chain into another zone, then addresses; AAAA.
        let mut m = response("www.example.test.", RecordType::AAAA);
        m.add_answer(Record::from_rdata(
            n("www.example.test."),
            300,
            RData::CNAME(CNAME(n("cdn.example.test."))),
        ));
        m.add_answer(Record::from_rdata(
            n("cdn.example.test."),
            300,
            RData::CNAME(CNAME(n("edge.cdn.net.test."))),
        ));
        for i in 1..4 {
            let ip = std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i);
            m.add_answer(Record::from_rdata(n("edge.cdn.net.test."), 20, RData::AAAA(AAAA(ip))));
        }
        m.set_edns(Edns::new());
        same_as_hickory(&m);

        // Negative answers with their SOA (names compressed inside it).
        for rcode in [ResponseCode::NXDomain, ResponseCode::NoError, ResponseCode::ServFail] {
            let mut m = response("missing.example.test.", RecordType::A);
            m.metadata.response_code = rcode;
            m.add_authority(soa("example.test."));
            same_as_hickory(&m);
        }

        // Names in other rdata, the root, an empty question list, a query.
        let mut m = response(".", RecordType::NS);
        m.add_answer(Record::from_rdata(
            Name::root(),
            518400,
            RData::NS(NS(n("a.root.test."))),
        ));
        m.add_answer(Record::from_rdata(
            Name::root(),
            518400,
            RData::NS(NS(n("b.root.test."))),
        ));
        m.add_additional(Record::from_rdata(n("a.root.test."), 1, RData::A(A::new(192, 0, 2, 1))));
        same_as_hickory(&m);
        let mut m = response("7.113.0.203.in-addr.arpa.", RecordType::PTR);
        m.add_answer(Record::from_rdata(
            n("7.113.0.203.in-addr.arpa."),
            60,
            RData::PTR(PTR(n("host.example.test."))),
        ));
        same_as_hickory(&m);
        same_as_hickory(&Message::response(9, OpCode::Query));
        let mut q = Message::query();
        q.add_query(Query::query(n("a.test."), RecordType::A));
        same_as_hickory(&q);
        let mut chaos = response("version.bind.", RecordType::A);
        chaos.queries[0].set_query_class(DNSClass::CH);
        chaos.metadata.response_code = ResponseCode::Refused;
        same_as_hickory(&chaos);
    }

    #[test]
    fn many_mixed_messages_match_hickory_byte_for_byte() {
        // Names that share suffixes in every way, in mixed case, so that
        // the compression choices (which candidate, which label) are
        // exercised, not just the plain cases above.
        let names = [
            "a.test.",
            "A.test.",
            "b.a.test.",
            "a.b.a.test.",
            "test.",
            "x.example.test.",
            "example.test.",
            "Example.TEST.",
            "y.x.example.test.",
            "x.y.test.",
            "bank\\.test.",
            "bank.test.",
            ".",
            "a-really-quite-long-label-for-the-compression-table-to-compare.test.",
            "a.b.c.d.e.f.g.test.",
            "g.f.e.d.c.b.a.test.",
            "q.w.e.r.t.y.u.i.example.test.",
            "z.y.x.w.v.u.t.s.r.q.x.example.test.",
        ];
        let mut rng = crate::test_rng::XorShift::new(0x9e37_79b9_7f4a_7c15);
        let mut next = |n: usize| rng.below(n);
        for round in 0..2_000 {
            let qname = names[next(names.len())];
            let mut m = response(qname, [RecordType::A, RecordType::AAAA, RecordType::CNAME][next(3)]);
            m.metadata.id = round as u16;
            m.metadata.response_code = [ResponseCode::NoError, ResponseCode::NXDomain][next(2)];
            m.metadata.recursion_desired = next(2) == 0;
            let records = next(MAX_RECORDS + 1);
            for _ in 0..records {
                let owner = n(names[next(names.len())]);
                let data = match next(6) {
                    0 => RData::A(A::new(192, 0, 2, next(256) as u8)),
                    1 => RData::AAAA(AAAA(std::net::Ipv6Addr::LOCALHOST)),
                    2 => RData::CNAME(CNAME(n(names[next(names.len())]))),
                    3 => RData::NS(NS(n(names[next(names.len())]))),
                    4 => RData::PTR(PTR(n(names[next(names.len())]))),
                    _ => RData::SOA(SOA::new(
                        n(names[next(names.len())]),
                        n(names[next(names.len())]),
                        1,
                        2,
                        3,
                        4,
                        5,
                    )),
                };
                let record = Record::from_rdata(owner, next(100_000) as u32, data);
                match next(3) {
                    0 => m.add_answer(record),
                    1 => m.add_authority(record),
                    _ => m.add_additional(record),
                };
            }
            if next(2) == 0 {
                let mut e = Edns::new();
                e.set_max_payload(next(5000) as u16);
                e.set_dnssec_ok(next(2) == 0);
                m.set_edns(e);
            }
            same_as_hickory(&m);
        }
    }

    #[test]
    fn a_full_compression_table_matches_hickory() {
        // Distinct long names store far more than 64 suffixes; a name
        // written after that is not compressed against the later ones
        // (record 20 ends below offset 0x3FFF, past which none is stored).
        let long = |i: usize, tag: &str| {
            let label = format!("{tag}{i:02}{}", "x".repeat(56));
            n(&format!("{label}.{label}.{label}.test."))
        };
        let mut m = response("example.test.", RecordType::SOA);
        for i in 0..MAX_RECORDS - 1 {
            let soa = SOA::new(long(i, "m"), long(i, "r"), 1, 2, 3, 4, 5);
            m.add_answer(Record::from_rdata(long(i, "o"), 60, RData::SOA(soa)));
        }
        m.add_additional(Record::from_rdata(long(20, "m"), 60, RData::A(A::new(192, 0, 2, 1))));
        let bytes = encode(&m).unwrap();
        assert!(bytes.len() > 0x3FFF, "{}", bytes.len());
        same_as_hickory(&m);
    }

    #[test]
    fn other_shapes_are_left_to_hickory() {
        let mut m = response("example.test.", RecordType::MX);
        m.add_answer(Record::from_rdata(
            n("example.test."),
            60,
            RData::MX(MX::new(10, n("mx.example.test."))),
        ));
        assert!(encode(&m).is_none(), "MX");
        let mut m = response("example.test.", RecordType::TXT);
        m.add_answer(Record::from_rdata(
            n("example.test."),
            60,
            RData::TXT(TXT::new(vec!["x".into()])),
        ));
        assert!(encode(&m).is_none(), "TXT");
        let mut m = response("example.test.", RecordType::A);
        m.metadata.response_code = ResponseCode::BADVERS;
        m.set_edns(Edns::new());
        assert!(encode(&m).is_none(), "extended RCODE");
        let mut m = response("example.test.", RecordType::A);
        for _ in 0..=MAX_RECORDS {
            m.add_answer(Record::from_rdata(
                n("example.test."),
                60,
                RData::A(A::new(192, 0, 2, 1)),
            ));
        }
        assert!(encode(&m).is_none(), "too many records");
    }
}
