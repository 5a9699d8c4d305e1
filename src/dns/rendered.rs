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
use hickory_proto::rr::Name;
use std::sync::Mutex;

use super::message::Request;
use super::wire::Plain;

/// The question and flags of a query as an encoding depends on them,
/// whichever parser read it (hickory's, or [`super::wire::plain`]).
#[derive(Debug, Clone, Copy)]
pub struct Asked<'q> {
    /// The question name's labels as they go on the wire, case kept.
    pub name: &'q [u8],
    pub qtype: u16,
    pub qclass: u16,
    pub recursion_desired: bool,
    pub checking_disabled: bool,
    pub edns: bool,
}

impl<'q> Asked<'q> {
    /// `request` as asked; `name` holds [`wire_labels`] of its name.
    pub fn of(request: &Request, name: &'q [u8]) -> Self {
        Asked {
            name,
            qtype: u16::from(request.query.query_type()),
            qclass: u16::from(request.query.query_class()),
            recursion_desired: request.recursion_desired,
            checking_disabled: request.checking_disabled,
            edns: request.edns.is_some(),
        }
    }

    /// A query read by [`super::wire::plain`] as asked.
    pub fn plain(query: &Plain<'q>) -> Self {
        Asked {
            name: query.name,
            qtype: query.qtype,
            qclass: query.qclass,
            recursion_desired: query.recursion_desired,
            checking_disabled: query.checking_disabled,
            edns: query.edns_payload.is_some(),
        }
    }
}

/// Everything an encoded answer depends on besides the message ID.
#[derive(Debug, Clone, Copy)]
pub struct Shape<'q> {
    pub asked: Asked<'q>,
    /// The query's ID, which the answer carries.
    pub id: u16,
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
    qtype: u16,
    qclass: u16,
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
pub fn wire_labels(name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for label in name.iter() {
        // Labels are at most 63 bytes.
        out.push(u8::try_from(label.len()).unwrap_or(u8::MAX));
        out.extend_from_slice(label);
    }
    out.push(0);
    out
}

impl Kept {
    fn fits(&self, shape: &Shape<'_>) -> bool {
        let a = &shape.asked;
        self.age == shape.age
            && self.limit == shape.limit
            && self.our_payload == shape.our_payload
            && self.recursion_desired == a.recursion_desired
            && self.checking_disabled == a.checking_disabled
            && self.edns == a.edns
            && self.qtype == a.qtype
            && self.qclass == a.qclass
            && *self.name == *a.name
    }
}

impl Rendered {
    /// The kept encoding with the request's ID, if it was made from the
    /// same [`Shape`].
    pub fn reuse(&self, shape: &Shape<'_>) -> Option<Reused> {
        self.reuse_into(shape, &mut Vec::new())
    }

    /// [`Rendered::reuse`], written into `spare` (taken only when the
    /// kept encoding fits): a listener hands back the buffer of its last
    /// answer, so serving a kept encoding asks the allocator for nothing.
    pub fn reuse_into(&self, shape: &Shape<'_>, spare: &mut Vec<u8>) -> Option<Reused> {
        let kept = self.0.try_lock().ok()?;
        let kept = kept.as_ref().filter(|k| k.fits(shape) && k.bytes.len() >= 2)?;
        let mut bytes = std::mem::take(spare);
        bytes.clear();
        bytes.extend_from_slice(&kept.bytes);
        let id = bytes.get_mut(..2)?;
        id.copy_from_slice(&shape.id.to_be_bytes());
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
        let a = &shape.asked;
        if bytes.len() + a.name.len() > room {
            return;
        }
        let Ok(mut slot) = self.0.try_lock() else {
            return;
        };
        *slot = Some(Kept {
            name: a.name.into(),
            qtype: a.qtype,
            qclass: a.qclass,
            recursion_desired: a.recursion_desired,
            checking_disabled: a.checking_disabled,
            edns: a.edns,
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

    use hickory_proto::rr::RecordType;

    #[test]
    fn labels_are_the_wire_form_with_case_kept() {
        let name = Name::from_ascii("WwW.Example.test.").unwrap();
        assert_eq!(wire_labels(&name), b"\x03WwW\x07Example\x04test\x00");
        // One label `a.b` is not two labels `a` and `b`.
        let escaped = Name::from_ascii("a\\.b.test.").unwrap();
        assert_eq!(wire_labels(&escaped), b"\x03a.b\x04test\x00");
        assert_eq!(wire_labels(&Name::root()), [0]);
    }

    /// A one-question A request for `name`, parsed as the listener does.
    fn request(name: &str) -> super::super::message::Request {
        let mut m = hickory_proto::op::Message::query();
        m.add_query(hickory_proto::op::Query::query(
            Name::from_ascii(name).unwrap(),
            RecordType::A,
        ));
        super::super::message::parse_request(&m.to_vec().unwrap()).unwrap()
    }

    /// The shape of an answer to `asked`: a 512-byte client, our 1232.
    fn shape(asked: Asked<'_>, id: u16) -> Shape<'_> {
        Shape {
            asked,
            id,
            limit: 512,
            our_payload: 1232,
            age: 0,
        }
    }

    #[test]
    fn only_the_same_question_asked_the_same_way_fits() {
        let kept_for = request("WwW.Example.test.");
        let wire = wire_labels(kept_for.query.name());
        let slot = Rendered::default();
        slot.keep(
            &shape(Asked::of(&kept_for, &wire), 7),
            &[0u8; 20],
            false,
            ResponseCode::NoError,
            100,
        );
        assert!(slot.reuse(&shape(Asked::of(&kept_for, &wire), 7)).is_some());
        for other in [
            "www.example.test.",
            "WwW.Example.tes.",
            "WwW.Example.test.x.",
            "Example.test.",
        ] {
            let r = request(other);
            let w = wire_labels(r.query.name());
            assert!(slot.reuse(&shape(Asked::of(&r, &w), 7)).is_none(), "{other}");
        }
        let mut asked = Asked::of(&kept_for, &wire);
        asked.qtype = u16::from(RecordType::AAAA);
        assert!(slot.reuse(&shape(asked, 7)).is_none(), "another type");
    }

    /// A kept encoding served into a listener's spare buffer: the
    /// buffer's memory is reused with the ID patched, and a question the
    /// encoding does not fit leaves the buffer where it was.
    #[test]
    fn a_reuse_into_a_spare_buffer_keeps_its_memory() {
        let request = request("a.test.");
        let wire = wire_labels(request.query.name());
        let mut shape = shape(Asked::of(&request, &wire), 0x1234);
        let slot = Rendered::default();
        let answer: Vec<u8> = (0..40).collect();
        slot.keep(&shape, &answer, false, ResponseCode::NoError, 1_000);
        let mut spare = Vec::with_capacity(512);
        spare.extend_from_slice(b"the last answer, longer than this one's forty bytes");
        let memory = spare.as_ptr();
        let reused = slot.reuse_into(&shape, &mut spare).expect("kept for this shape");
        assert_eq!(reused.bytes.as_ptr(), memory, "the spare's memory, not a new buffer");
        assert_eq!(reused.bytes[..2], [0x12, 0x34], "the query's ID");
        assert_eq!(reused.bytes[2..], answer[2..], "the rest as kept");
        assert!(spare.is_empty(), "the spare was taken");
        let mut spare = reused.bytes;
        shape.age = 1;
        assert!(slot.reuse_into(&shape, &mut spare).is_none(), "one second older");
        assert_eq!(spare.as_ptr(), memory, "a misfit leaves the spare in place");
        assert_eq!(spare.len(), 40);
    }

    #[test]
    fn an_encoding_larger_than_its_room_is_not_kept() {
        let request = request("a.test.");
        let wire = wire_labels(request.query.name());
        let shape = shape(Asked::of(&request, &wire), request.id);
        let slot = Rendered::default();
        let answer = [0u8; 100];
        // 100 bytes and the name's 8 need 108.
        slot.keep(&shape, &answer, false, ResponseCode::NoError, 107);
        assert!(slot.reuse(&shape).is_none());
        slot.keep(&shape, &answer, false, ResponseCode::NoError, 108);
        assert_eq!(slot.reuse(&shape).unwrap().bytes.len(), 100);
    }
}
