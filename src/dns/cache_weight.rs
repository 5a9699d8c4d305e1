//! What a cached record weighs in memory, counted against the cache's
//! `max_bytes`.
//!
//! A record's uncompressed wire size is a fair measure of most records,
//! but not of one that hickory parses into many small pieces, each an
//! allocation of its own: a TXT record's every character-string is a boxed
//! slice, an HTTPS or SVCB record's every ALPN id a `String`. On the wire
//! such a piece costs its length byte and its bytes; in memory its pointer
//! and at least [`ALLOCATION`] bytes of heap. Counted by wire size, a TXT
//! answer of 2,000 one-byte strings (4 kB) held 16 times what the cache
//! counted (48 bytes a string, measured with glibc's `mallinfo2`), an
//! HTTPS answer of 1,800 one-byte ALPN ids 18 times: a LAN device asking
//! for names whose answers it writes itself could make a 32 MiB cache
//! hold over half a gigabyte. Each piece is now counted as its pointer,
//! its bytes and one allocation, and so are the heap parts of a long name.
//!
//! A CSYNC record's type bitmap is the worst case: hickory reads it into a
//! `BTreeSet` of record types, so 34 bytes on the wire (one window, 32
//! bytes of bitmap) become 256 set entries. A record with every window
//! full (8,710 bytes) held 857,837 bytes (`mallinfo2`), 97 times its wire
//! size; each type in the set is now counted at [`TYPE_SET_ENTRY`].

use hickory_proto::rr::rdata::svcb::{SVCB, SvcParamKey, SvcParamValue};
use hickory_proto::rr::{Name, RData, Record};
use hickory_proto::serialize::binary::BinEncodable;
use std::mem::size_of;

/// A record's memory beyond its wire size: the `Record` struct, its
/// names' fixed parts and the entry's share of the `Vec`.
pub const RECORD_OVERHEAD: usize = 96;

/// What an allocation costs beyond the bytes it holds: glibc's malloc
/// hands out at least 32 bytes (a one-byte string takes 32), with 8 of
/// them its header. Counted whole for every piece, however small.
pub const ALLOCATION: usize = 32;

/// What one record type in a parsed type bitmap holds: a `BTreeSet` of
/// 4-byte keys in nodes of 11, filled about half by the in-order inserts of
/// a bitmap read. Measured: 13.1 bytes a type for a full set of 65,535.
pub const TYPE_SET_ENTRY: usize = 16;

/// A name keeps its first 32 bytes of labels and its first 24 label ends
/// inline (hickory's `Name`); past either, that part is on the heap.
const NAME_INLINE_BYTES: usize = 32;
const NAME_INLINE_LABELS: usize = 24;

/// What a record costs in the cache: [`RECORD_OVERHEAD`], its uncompressed
/// wire size, and what its parsed form holds on the heap beyond that;
/// `None` if it cannot be encoded (then it cannot be served from the
/// cache either). Addresses and names are sized without encoding them,
/// which every cache miss would otherwise pay for; other types are
/// encoded to learn their size.
pub fn record_bytes(r: &Record) -> Option<usize> {
    let rdata = match &r.data {
        RData::A(_) => 4,
        RData::AAAA(_) => 16,
        RData::CNAME(t) => name_bytes(&t.0),
        RData::NS(t) => name_bytes(&t.0),
        RData::PTR(t) => name_bytes(&t.0),
        other => other.to_bytes().ok()?.len() + pieces(other),
    };
    // Owner, then TYPE, CLASS, TTL and RDLENGTH.
    Some(RECORD_OVERHEAD + name_bytes(&r.name) + 10 + rdata)
}

/// A name's uncompressed wire size and the heap its labels take past what
/// is kept inline.
fn name_bytes(n: &Name) -> usize {
    if n.is_root() {
        return 1;
    }
    let (len, labels) = (n.len(), usize::from(n.num_labels()));
    let data = if len > NAME_INLINE_BYTES { ALLOCATION + len } else { 0 };
    let ends = if labels > NAME_INLINE_LABELS {
        ALLOCATION + labels
    } else {
        0
    };
    len + 1 + data + ends
}

/// The heap of a record's parsed data beyond its wire bytes, for the
/// types hickory splits into pieces.
fn pieces(data: &RData) -> usize {
    match data {
        // An empty string's box allocates nothing.
        RData::TXT(t) => {
            let held = t.txt_data.iter().filter(|s| !s.is_empty()).count();
            ALLOCATION + t.txt_data.len() * size_of::<Box<[u8]>>() + held * ALLOCATION
        }
        RData::SVCB(s) => svcb_pieces(s),
        // The set's root allocation and every type in it; the bitmap as
        // read is kept too, which the wire size counts.
        RData::CSYNC(c) => ALLOCATION + c.type_bit_maps.iter().count() * TYPE_SET_ENTRY,
        RData::HTTPS(h) => svcb_pieces(&h.0),
        _ => 0,
    }
}

fn svcb_pieces(s: &SVCB) -> usize {
    let params = ALLOCATION + s.svc_params.len() * size_of::<(SvcParamKey, SvcParamValue)>();
    let values: usize = s
        .svc_params
        .iter()
        .map(|(_, value)| match value {
            SvcParamValue::Alpn(ids) => ALLOCATION + ids.0.len() * (size_of::<String>() + ALLOCATION),
            SvcParamValue::Mandatory(keys) => ALLOCATION + keys.0.len() * size_of::<SvcParamKey>(),
            SvcParamValue::Ipv4Hint(hints) => ALLOCATION + hints.0.len() * size_of::<std::net::Ipv4Addr>(),
            SvcParamValue::Ipv6Hint(hints) => ALLOCATION + hints.0.len() * size_of::<std::net::Ipv6Addr>(),
            SvcParamValue::EchConfigList(_) | SvcParamValue::Unknown(_) => ALLOCATION,
            SvcParamValue::NoDefaultAlpn | SvcParamValue::Port(_) => 0,
        })
        .sum();
    params + values + name_bytes(&s.target_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Message;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, TXT};
    use hickory_proto::serialize::binary::{BinEncoder, NameEncoding};
    use std::str::FromStr;

    fn n(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn wire(r: &Record) -> usize {
        let mut wire = Vec::new();
        let mut encoder = BinEncoder::new(&mut wire);
        encoder.set_name_encoding(NameEncoding::Uncompressed);
        r.emit(&mut encoder).unwrap();
        wire.len()
    }

    #[test]
    fn flat_records_with_short_names_weigh_their_uncompressed_wire_size() {
        let records = [
            Record::from_rdata(n("www.example.test."), 60, RData::A(A::new(192, 0, 2, 1))),
            Record::from_rdata(
                n("www.example.test."),
                60,
                RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            ),
            Record::from_rdata(n("www.example.test."), 60, RData::CNAME(CNAME(n("cdn.example.test.")))),
            Record::from_rdata(n("."), 60, RData::CNAME(CNAME(n(".")))),
        ];
        for r in &records {
            assert_eq!(record_bytes(r), Some(RECORD_OVERHEAD + wire(r)), "{r}");
        }
    }

    /// The parsed record as a client's upstream answer would give it.
    fn parsed(qtype: u16, rdata: &[u8]) -> Record {
        let mut b = vec![0, 1, 0x81, 0x80, 0, 1, 0, 1, 0, 0, 0, 0];
        b.extend_from_slice(b"\x01x\x07example\x00");
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&[0, 1, 0xc0, 12]);
        b.extend_from_slice(&qtype.to_be_bytes());
        b.extend_from_slice(&[0, 1, 0, 0, 1, 0]);
        b.extend_from_slice(&u16::try_from(rdata.len()).unwrap().to_be_bytes());
        b.extend_from_slice(rdata);
        let mut m = Message::from_vec(&b).unwrap();
        m.answers.pop().unwrap()
    }

    /// Whatever the allocator, each piece of a parsed record holds at
    /// least its pointer and one byte: a TXT record of one-byte strings, an
    /// HTTPS record of one-byte ALPN ids and a name of many labels weigh at
    /// least that. Counted by wire size they weighed a sixteenth of it.
    #[test]
    fn records_of_many_small_pieces_weigh_at_least_their_pieces() {
        let strings: Vec<u8> = (0..2_000).flat_map(|_| [1, b'x']).collect();
        let txt = parsed(16, &strings);
        let RData::TXT(t) = &txt.data else { panic!("{txt:?}") };
        assert_eq!(t.txt_data.len(), 2_000);
        let floor = 2_000 * (size_of::<Box<[u8]>>() + 1);
        assert!(
            record_bytes(&txt).unwrap() >= floor,
            "{:?} < {floor}",
            record_bytes(&txt)
        );

        let empty = parsed(16, &[0; 4_000]);
        let floor = 4_000 * size_of::<Box<[u8]>>();
        assert!(
            record_bytes(&empty).unwrap() >= floor,
            "{:?} < {floor}",
            record_bytes(&empty)
        );

        // Priority 1, the root as target, ALPN (key 1) of 1,800 ids.
        let mut https = vec![0, 1, 0, 0, 1];
        let ids: Vec<u8> = (0..1_800).flat_map(|_| [1, b'h']).collect();
        https.extend_from_slice(&u16::try_from(ids.len()).unwrap().to_be_bytes());
        https.extend_from_slice(&ids);
        let https = parsed(65, &https);
        let floor = 1_800 * (size_of::<String>() + 1);
        assert!(
            record_bytes(&https).unwrap() >= floor,
            "{:?} < {floor}",
            record_bytes(&https)
        );

        // 127 labels of one byte: 255 bytes of labels and 127 ends.
        let long: String = (0..127).map(|_| "a.").collect();
        let a = Record::from_rdata(n(&long), 60, RData::A(A::new(192, 0, 2, 1)));
        assert!(record_bytes(&a).unwrap() >= RECORD_OVERHEAD + wire(&a) + 127);
    }

    /// A CSYNC record with every window of its type bitmap full: 8,710
    /// bytes on the wire, 65,535 types in hickory's set. Counted by wire
    /// size it weighed a 97th of what it held.
    #[test]
    fn a_full_type_bitmap_weighs_every_type_in_it() {
        // SOA serial, flags, then the 256 windows, type 0 left out.
        let mut csync = vec![0, 0, 0, 1, 0, 0];
        for window in 0..=255u8 {
            csync.extend_from_slice(&[window, 32]);
            csync.extend((0..32).map(|i| if window == 0 && i == 0 { 0x7f } else { 0xff }));
        }
        let r = parsed(62, &csync);
        let RData::CSYNC(c) = &r.data else { panic!("{r:?}") };
        assert_eq!(c.type_bit_maps.iter().count(), 65_535);
        let floor = 65_535 * TYPE_SET_ENTRY;
        let got = record_bytes(&r).unwrap();
        assert!(got >= floor, "{got} < {floor}");
        // One window of a few types stays near its wire size.
        let small = parsed(62, &[0, 0, 0, 1, 0, 0, 0, 1, 0b0110_0000]);
        let (got, base) = (record_bytes(&small).unwrap(), RECORD_OVERHEAD + wire(&small));
        assert!(got <= base + ALLOCATION + 2 * TYPE_SET_ENTRY, "{got} against {base}");
    }

    /// A plain TXT record of long strings is still counted near its wire
    /// size: the pieces add a few per cent.
    #[test]
    fn ordinary_text_is_counted_near_its_wire_size() {
        let r = Record::from_rdata(
            n("t.test."),
            60,
            RData::TXT(TXT::new(vec!["x".repeat(200), "y".repeat(100)])),
        );
        let (got, base) = (record_bytes(&r).unwrap(), RECORD_OVERHEAD + wire(&r));
        assert!(got > base && got <= base + 3 * 48 + ALLOCATION, "{got} against {base}");
    }
}
