//! Encoded answers kept for the next identical question.
//!
//! Building a hickory `Message` for a cache hit or an override and
//! encoding it was over half of the instructions such a query cost
//! (callgrind, docs/BENCHMARKS.md). A client that asks the same question
//! again gets the same bytes but for its ID, so the last encoding is kept
//! beside what it was made from (the cache entry, or the answer rule) and
//! served again with the ID patched, while every input of the encoding is
//! the same. [`Shape`] lists those inputs: the question byte for byte
//! (letter case included, for clients using 0x20), the RD and CD flags the
//! response copies, whether the client sent EDNS (the response then
//! carries our OPT record, whose payload size is ours), the size limit that
//! decides truncation, and for a cache entry its age in whole seconds,
//! which every TTL is reduced by. Anything else that differs (another
//! name's case, EDNS where there was none, a smaller buffer, one more
//! second of age) takes the full path, which then keeps its own encoding.
//!
//! One encoding per entry or rule, swapped under a `try_lock`: a query
//! never waits for another one here; when the slot is busy it simply takes
//! the full path.

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::{DNSClass, Name, RecordType};
use std::sync::Mutex;

use super::message::Request;

/// Everything an encoded answer depends on besides the message ID.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'r> {
    pub request: &'r Request,
    /// The limit the answer was fitted to (UDP: the client's, within ours;
    /// TCP: 65,535).
    pub limit: usize,
    /// Our UDP payload size, advertised in the OPT record.
    pub our_payload: u16,
    /// Seconds every TTL was reduced by (0 for a rule's answer).
    pub age: u32,
}

/// An answer as it was encoded, and what the encoding counted.
#[derive(Debug)]
struct Kept {
    name: Box<[u8]>,
    qtype: RecordType,
    qclass: DNSClass,
    recursion_desired: bool,
    checking_disabled: bool,
    edns: bool,
    limit: usize,
    our_payload: u16,
    age: u32,
    bytes: Vec<u8>,
    truncated: bool,
    rcode: ResponseCode,
}

/// A reply served again: its bytes (ID patched), and what the encoder
/// reported for it, for the counters.
#[derive(Debug)]
pub struct Reused {
    pub bytes: Vec<u8>,
    pub truncated: bool,
    pub rcode: ResponseCode,
}

/// The last encoding of one entry's or rule's answer.
#[derive(Debug, Default)]
pub struct Rendered(Mutex<Option<Kept>>);

/// The name's labels, each with its length byte, case kept, as they go on
/// the wire (without compression).
fn wire_labels(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        // Labels are at most 63 bytes.
        out.push(u8::try_from(label.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

/// Whether `name` has exactly the labels `wire` holds, byte for byte.
fn same_labels(wire: &[u8], name: &Name) -> bool {
    let mut rest = wire;
    for label in name.iter() {
        let Some((&len, tail)) = rest.split_first() else {
            return false;
        };
        if usize::from(len) != label.len() || tail.get(..label.len()) != Some(label) {
            return false;
        }
        rest = tail.get(label.len()..).unwrap_or_default();
    }
    rest == [0]
}

impl Kept {
    fn fits(&self, shape: &Shape<'_>) -> bool {
        let r = shape.request;
        self.age == shape.age
            && self.limit == shape.limit
            && self.our_payload == shape.our_payload
            && self.recursion_desired == r.recursion_desired
            && self.checking_disabled == r.checking_disabled
            && self.edns == r.edns.is_some()
            && self.qtype == r.query.query_type()
            && self.qclass == r.query.query_class()
            && same_labels(&self.name, r.query.name())
    }
}

impl Rendered {
    /// The kept encoding with the request's ID, if it was made from the
    /// same [`Shape`].
    pub fn reuse(&self, shape: &Shape<'_>) -> Option<Reused> {
        let kept = self.0.try_lock().ok()?;
        let kept = kept.as_ref().filter(|k| k.fits(shape))?;
        let mut bytes = kept.bytes.clone();
        let id = bytes.get_mut(..2)?;
        id.copy_from_slice(&shape.request.id.to_be_bytes());
        Some(Reused {
            bytes,
            truncated: kept.truncated,
            rcode: kept.rcode,
        })
    }

    /// Keeps `bytes`, the full path's encoding for `shape`, in place of
    /// the last one, if it takes no more than `room` bytes with its
    /// question name (what the owner counted for it).
    pub fn keep(&self, shape: &Shape<'_>, bytes: &[u8], truncated: bool, rcode: ResponseCode, room: usize) {
        let r = shape.request;
        let name_len = r.query.name().iter().map(|l| l.len() + 1).sum::<usize>() + 1;
        if bytes.len() + name_len > room {
            return;
        }
        let Ok(mut slot) = self.0.try_lock() else {
            return;
        };
        *slot = Some(Kept {
            name: wire_labels(r.query.name()).into_boxed_slice(),
            qtype: r.query.query_type(),
            qclass: r.query.query_class(),
            recursion_desired: r.recursion_desired,
            checking_disabled: r.checking_disabled,
            edns: r.edns.is_some(),
            limit: shape.limit,
            our_payload: shape.our_payload,
            age: shape.age,
            bytes: bytes.to_vec(),
            truncated,
            rcode,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_compare_byte_for_byte() {
        let name = Name::from_ascii("WwW.Example.test.").unwrap();
        let wire = wire_labels(&name);
        assert_eq!(wire, b"\x03WwW\x07Example\x04test\x00");
        assert!(same_labels(&wire, &name));
        for other in [
            "www.example.test.",
            "WwW.Example.tes.",
            "WwW.Example.test.x.",
            "Example.test.",
        ] {
            assert!(!same_labels(&wire, &Name::from_ascii(other).unwrap()), "{other}");
        }
        // One label `a.b` is not two labels `a` and `b`.
        let escaped = Name::from_ascii("a\\.b.test.").unwrap();
        assert!(!same_labels(
            &wire_labels(&escaped),
            &Name::from_ascii("a.b.test.").unwrap()
        ));
        assert!(same_labels(&[0], &Name::root()));
    }

    #[test]
    fn an_encoding_larger_than_its_room_is_not_kept() {
        let mut m = hickory_proto::op::Message::query();
        m.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("a.test.").unwrap(),
            RecordType::A,
        ));
        let request = super::super::message::parse_request(&m.to_vec().unwrap()).unwrap();
        let shape = Shape {
            request: &request,
            limit: 512,
            our_payload: 1232,
            age: 0,
        };
        let slot = Rendered::default();
        let answer = [0u8; 100];
        // 100 bytes and the name's 8 need 108.
        slot.keep(&shape, &answer, false, ResponseCode::NoError, 107);
        assert!(slot.reuse(&shape).is_none());
        slot.keep(&shape, &answer, false, ResponseCode::NoError, 108);
        assert_eq!(slot.reuse(&shape).unwrap().bytes.len(), 100);
    }
}
