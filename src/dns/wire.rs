//! The plainest queries read straight from the wire, for answers that are
//! kept encoded (cache hits, overrides).
//!
//! Parsing a query into a hickory `Message` (questions, records, the OPT
//! record, a `Name` with its label table, then the lowercase key) was the
//! largest share of the instructions a kept answer cost (callgrind,
//! docs/BENCHMARKS.md). Nearly every query is the same shape: one
//! question, a name of letters, digits, `-` and `_`, no records but
//! perhaps an empty OPT. [`plain`] reads exactly that shape and nothing
//! else; every other datagram (compression, escapes, options, trailing
//! bytes, other opcodes, malformed input) gets `None` and takes the full
//! path through hickory, which also produces FORMERR, NOTIMP and BADVERS.
//! So this parser only ever has to say "plain, and here it is" or "not
//! sure": it never decides an error answer.

/// A query of the plainest shape, borrowing the datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plain<'a> {
    pub id: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    /// The question name as sent: length-prefixed labels, case kept,
    /// ending with the root's zero byte (never compressed).
    pub name: &'a [u8],
    /// Whether that name holds an ASCII capital letter (found in the same
    /// pass that read it).
    pub capitals: bool,
    pub qtype: u16,
    pub qclass: u16,
    /// The UDP payload size of the client's OPT record, if it sent one.
    pub edns_payload: Option<u16>,
    /// That record's flags (DO and Z), 0 without one.
    pub edns_flags: u16,
}

use super::plain_name::Forms;
pub use super::plain_name::MAX_NAME;

/// Header flags this parser accepts set: RD and CD (copied into the
/// answer) and AD (a query may set it to ask for the AD bit, RFC 6840
/// 5.7, which the full path ignores too). QR, opcode, AA, TC, RA, Z and
/// RCODE must be zero.
const FLAGS_ACCEPTED: u16 = 0x0100 | 0x0020 | 0x0010;

/// The query in `bytes`, if it has the plainest shape (see the module).
/// Its name's lowercase forms (the cache's and the rules' keys) are left
/// in `forms`, written in the pass that checks the name's shape.
pub fn plain<'a>(bytes: &'a [u8], forms: &mut Forms) -> Option<Plain<'a>> {
    let header: &[u8; 12] = bytes.get(..12)?.try_into().ok()?;
    let word = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let flags = word(2);
    if flags & !FLAGS_ACCEPTED != 0 {
        return None;
    }
    let (qdcount, ancount, nscount, arcount) = (word(4), word(6), word(8), word(10));
    if qdcount != 1 || ancount != 0 || nscount != 0 || arcount > 1 {
        return None;
    }
    let rest = bytes.get(12..)?;
    let read = forms.read(rest)?;
    let (name, rest) = rest.split_at(read.len);
    let (fixed, rest) = rest.split_first_chunk::<4>()?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    let (edns_payload, edns_flags) = match arcount {
        0 => (None, 0),
        _ => {
            let (payload, flags) = empty_opt(rest)?;
            (Some(payload), flags)
        }
    };
    if arcount == 0 && !rest.is_empty() {
        return None; // trailing bytes: the full path decides
    }
    Some(Plain {
        id: word(0),
        recursion_desired: flags & 0x0100 != 0,
        checking_disabled: flags & 0x0010 != 0,
        name,
        capitals: read.capitals,
        qtype,
        qclass,
        edns_payload,
        edns_flags,
    })
}

/// The payload size and flags of an OPT record with the root as owner, EDNS
/// version 0, no extended RCODE and no options, filling `bytes` exactly.
fn empty_opt(bytes: &[u8]) -> Option<(u16, u16)> {
    let opt: &[u8; 11] = bytes.try_into().ok()?;
    // Owner (root), TYPE = OPT (41), CLASS = payload, TTL = ext. RCODE,
    // version, flags; RDLENGTH = 0.
    let [0, 0, 41, p0, p1, 0, 0, f0, f1, 0, 0] = *opt else {
        return None;
    };
    Some((u16::from_be_bytes([p0, p1]), u16::from_be_bytes([f0, f1])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::message::parse_request;
    use crate::dns::names::{query_key, wire_key};
    use hickory_proto::op::{Edns, Message, Query};
    use hickory_proto::rr::{Name, RecordType};

    fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 0xbeef;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    /// [`super::plain`] with forms of its own, for the tests that look
    /// only at the query.
    fn plain(bytes: &[u8]) -> Option<Plain<'_>> {
        super::plain(bytes, &mut Forms::default())
    }

    /// The rule key `plain` leaves for the query in `bytes`.
    fn key(bytes: &[u8]) -> String {
        let mut forms = Forms::default();
        super::plain(bytes, &mut forms).expect("a plain query");
        forms.rule_key().expect("a key").to_owned()
    }

    /// Whatever `plain` accepts, the full parser reads the same way.
    fn agrees_with_hickory(bytes: &[u8]) {
        let mut forms = Forms::default();
        let Some(p) = super::plain(bytes, &mut forms) else {
            return;
        };
        let full = parse_request(bytes).unwrap_or_else(|_| panic!("plain accepted what hickory rejects: {bytes:?}"));
        assert_eq!(p.id, full.id);
        assert_eq!(p.recursion_desired, full.recursion_desired);
        assert_eq!(p.checking_disabled, full.checking_disabled);
        assert_eq!(p.qtype, u16::from(full.query.query_type()));
        assert_eq!(p.qclass, u16::from(full.query.query_class()));
        assert_eq!(p.edns_payload.is_some(), full.edns.is_some());
        if let (Some(ours), Some(theirs)) = (p.edns_payload, &full.edns) {
            assert_eq!(ours.max(512), theirs.max_payload().max(512));
        }
        assert_eq!(p.name.to_ascii_lowercase(), *wire_key(full.query.name()));
        assert_eq!(forms.lower(), &*wire_key(full.query.name()));
        assert_eq!(forms.rule_key(), Some(&*query_key(full.query.name())));
        assert_eq!(p.capitals, !full.lowercase);
    }

    #[test]
    fn reads_the_plain_shape_as_hickory_does() {
        for (name, edns) in [
            ("printer.lan.", None),
            ("WwW.Ex-Ample.TEST.", Some(1232)),
            ("_srv._tcp.example.test.", Some(4096)),
            ("a.", Some(100)),
            (".", None),
        ] {
            let bytes = query(name, RecordType::AAAA, edns);
            let p = plain(&bytes).unwrap_or_else(|| panic!("{name} is plain"));
            assert_eq!(p.id, 0xbeef);
            assert!(p.recursion_desired && !p.checking_disabled);
            assert_eq!(p.edns_payload, edns.map(|e| e.max(512)));
            agrees_with_hickory(&bytes);
        }
        let bytes = query("WwW.Example.TEST.", RecordType::A, None);
        let p = plain(&bytes).unwrap();
        assert_eq!(p.name, b"\x03WwW\x07Example\x04TEST\x00");
        assert!(p.capitals);
        assert_eq!(key(&bytes), "www.example.test");
        assert_eq!(key(&query(".", RecordType::A, None)), "");
    }

    #[test]
    fn anything_unusual_is_left_to_the_full_parser() {
        let base = query("a.example.", RecordType::A, None);
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = base.clone();
            f(&mut v);
            v
        };
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("truncated header", base[..11].to_vec()),
            ("header only", base[..12].to_vec()),
            ("truncated name", base[..15].to_vec()),
            ("no type and class", base[..base.len() - 4].to_vec()),
            ("half a class", base[..base.len() - 1].to_vec()),
            ("QDCOUNT 0", with(&|v| v[5] = 0)),
            ("QDCOUNT 2", with(&|v| v[5] = 2)),
            ("an answer", with(&|v| v[7] = 1)),
            ("an authority", with(&|v| v[9] = 1)),
            ("two additionals", with(&|v| v[11] = 2)),
            ("an additional that is not there", with(&|v| v[11] = 1)),
            ("a response", with(&|v| v[2] |= 0x80)),
            ("opcode STATUS", with(&|v| v[2] |= 2 << 3)),
            ("TC set", with(&|v| v[2] |= 0x02)),
            ("an RCODE", with(&|v| v[3] |= 0x01)),
            ("trailing bytes", with(&|v| v.push(0))),
            // A pointer back to the header, as the first and as a later label.
            ("pointer first", {
                let mut v = base[..12].to_vec();
                v.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
                v
            }),
            ("pointer later", {
                let mut v = base[..12].to_vec();
                v.extend_from_slice(&[1, b'a', 0xc0, 0x0c, 0, 1, 0, 1]);
                v
            }),
            ("extended label type", {
                let mut v = base[..12].to_vec();
                v.extend_from_slice(&[0x41, 0, 0, 1, 0, 1]);
                v
            }),
            ("label of 64", {
                let mut v = base[..12].to_vec();
                v.push(64);
                v.extend_from_slice(&[b'a'; 64]);
                v.extend_from_slice(&[0, 0, 1, 0, 1]);
                v
            }),
            ("a dot inside a label", {
                let mut v = base[..12].to_vec();
                v.extend_from_slice(b"\x03a.b\x04test\x00\x00\x01\x00\x01");
                v
            }),
            ("a control byte", {
                let mut v = base[..12].to_vec();
                v.extend_from_slice(b"\x02a\n\x00\x00\x01\x00\x01");
                v
            }),
            ("a space", {
                let mut v = base[..12].to_vec();
                v.extend_from_slice(b"\x02a \x00\x00\x01\x00\x01");
                v
            }),
            ("a byte beyond ASCII", {
                let mut v = base[..12].to_vec();
                v.extend_from_slice(b"\x02a\xc3\x00\x00\x01\x00\x01");
                v
            }),
        ];
        for (why, bytes) in &cases {
            assert_eq!(plain(bytes), None, "{why}");
        }
    }

    #[test]
    fn names_longer_than_255_bytes_are_not_plain() {
        // 4 labels of 63: 256 bytes with the root. 253 + root is the most.
        let long = |labels: &[usize]| {
            let mut v = query("a.", RecordType::A, None)[..12].to_vec();
            for &n in labels {
                v.push(u8::try_from(n).unwrap());
                v.extend(std::iter::repeat_n(b'x', n));
            }
            v.extend_from_slice(&[0, 0, 1, 0, 1]);
            v
        };
        assert_eq!(plain(&long(&[63, 63, 63, 63])), None);
        assert_eq!(plain(&long(&[63, 63, 63, 62])), None, "256 bytes");
        let most = long(&[63, 63, 63, 61]);
        let p = plain(&most).expect("255 bytes is a name");
        assert_eq!(p.name.len(), 255);
        agrees_with_hickory(&most);
    }

    #[test]
    fn only_an_empty_version_0_opt_at_the_root_is_plain() {
        let base = query("a.example.", RecordType::A, Some(1232));
        let opt_at = base.len() - 11;
        let with = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut v = base.clone();
            f(&mut v);
            v
        };
        assert_eq!(plain(&base).unwrap().edns_payload, Some(1232));
        // The DO bit and the other EDNS flags change nothing here.
        let dnssec_ok = with(&|v| v[opt_at + 7] = 0x80);
        assert_eq!(plain(&dnssec_ok).unwrap().edns_payload, Some(1232));
        agrees_with_hickory(&dnssec_ok);
        for (why, bytes) in [
            ("version 1", with(&|v| v[opt_at + 6] = 1)),
            ("an extended RCODE", with(&|v| v[opt_at + 5] = 1)),
            ("an owner other than the root", {
                let mut v = base[..opt_at].to_vec();
                v.extend_from_slice(&[1, b'a', 0]);
                v.extend_from_slice(&base[opt_at + 1..]);
                v
            }),
            ("not an OPT", with(&|v| v[opt_at + 2] = 1)),
            ("options", {
                let mut v = base.clone();
                v[opt_at + 10] = 4;
                v.extend_from_slice(&[0, 10, 0, 0]);
                v
            }),
            ("cut short", base[..base.len() - 1].to_vec()),
            ("trailing bytes", with(&|v| v.push(0))),
        ] {
            assert_eq!(plain(&bytes), None, "{why}");
        }
    }

    #[test]
    fn hostile_bytes_never_panic_and_what_is_accepted_is_what_hickory_reads() {
        let bases = [
            query("x.example.", RecordType::A, Some(1232)),
            query("Ab-c_d.example.test.", RecordType::TXT, None),
        ];
        for base in &bases {
            for i in 0..base.len() {
                for b in [0u8, 1, 0x3f, 0x40, 0x7f, 0x80, 0xc0, 0xff, b'A', b'.'] {
                    let mut v = base.clone();
                    v[i] = b;
                    agrees_with_hickory(&v);
                    v.truncate(i);
                    agrees_with_hickory(&v);
                }
            }
        }
        // Arbitrary bytes, deterministically.
        let mut rng = crate::test_rng::XorShift::new(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let seed = rng.next_u64();
            let len = (seed % 64) as usize;
            let mut v: Vec<u8> = (0..len).map(|i| (seed >> (i % 8 * 8)) as u8).collect();
            if let Some(h) = v.get_mut(2..6) {
                h.copy_from_slice(&[0x01, 0x00, 0, 1]);
            }
            agrees_with_hickory(&v);
        }
    }
}
