//! A plain question name read once, in one pass over its bytes, into
//! every form the kept-answer path needs.
//!
//! The plain path looked at the question's name four times: its shape
//! checked byte by byte ([`super::wire::plain`], about 370 instructions a
//! miss), the rule key copied and lowercased (about 210 with its UTF-8
//! check), the cache key copied and lowercased again (about 220), and the
//! name searched for capital letters (about 70), callgrind
//! (docs/BENCHMARKS.md, rounds 12 and 13). [`Forms::read`] does all four
//! in one loop: each byte is looked up once in a table that says whether
//! it may stand in a plain label and what it is lowercased, and the result
//! is stored in the two forms at once.
//!
//! Only the plainest names are read (labels of 1–63 letters, digits, `-`
//! and `_`, no compression, at most [`MAX_NAME`] bytes); anything else is
//! `None`, left to the full parser, exactly as before.

/// Longest name on the wire (RFC 1035 3.1), root byte included.
pub const MAX_NAME: usize = 255;

/// Each byte's lowercase form if it may stand in a plain label (a letter,
/// digit, `-` or `_`), and [`REFUSED`] if it may not, so one lookup answers
/// both questions.
const PLAIN_LOWER: [u8; 256] = {
    let mut table = [REFUSED; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' {
            table[b] = c.to_ascii_lowercase();
        }
        b += 1;
    }
    table
};

/// What [`PLAIN_LOWER`] gives a byte no plain label holds: the one bit no
/// plain byte has (they are all ASCII), so the bytes of a label are judged
/// by OR-ing their lookups together and testing that bit once.
const REFUSED: u8 = 0x80;

/// The forms of one plain name, written by [`Forms::read`]. Kept by the
/// caller (on its stack) and reused: these are the bytes the rules and the
/// cache look up.
pub struct Forms {
    /// The wire form with its letters lowercased: the cache's key name
    /// ([`super::names::wire_key`]).
    lower: [u8; MAX_NAME],
    /// The same bytes with each length byte a dot; the rule key is this
    /// without its first and last byte.
    dotted: [u8; MAX_NAME],
    /// The wire length, root byte included (0 before a read).
    len: usize,
}

impl Default for Forms {
    fn default() -> Self {
        Forms {
            lower: [0; MAX_NAME],
            dotted: [0; MAX_NAME],
            len: 0,
        }
    }
}

/// What [`Forms::read`] found at the start of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    /// The name's wire length, root byte included.
    pub len: usize,
    /// Whether any label holds an ASCII capital letter.
    pub capitals: bool,
}

impl Forms {
    /// Reads the name at the start of `bytes` if every label is 1–63 bytes
    /// of letters, digits, `-` or `_` and the whole is at most
    /// [`MAX_NAME`] bytes, filling both forms. Compression pointers,
    /// extended label types and any other byte give `None` (the forms are
    /// then not to be used).
    pub fn read(&mut self, bytes: &[u8]) -> Option<Read> {
        self.len = 0;
        let mut at = 0;
        // Folded over every byte, with no early exit inside a label: the
        // loop is a lookup, two stores and an OR per byte.
        let mut looked_up = 0u8;
        loop {
            let len = usize::from(*bytes.get(at)?);
            if len == 0 {
                *self.lower.get_mut(at)? = 0;
                *self.dotted.get_mut(at)? = b'.';
                at += 1;
                if looked_up & REFUSED != 0 {
                    return None;
                }
                self.len = at;
                // Lowercasing changed a byte only if it was a capital: one
                // comparison of the whole, cheaper than a test per byte.
                let capitals = self.lower.get(..at) != bytes.get(..at);
                return Some(Read { len: at, capitals });
            }
            if len > 63 {
                return None; // a pointer (0xC0) or a reserved label type
            }
            let end = at + 1 + len;
            if end >= MAX_NAME {
                return None; // no room left for the root byte
            }
            let label = bytes.get(at + 1..end)?;
            *self.lower.get_mut(at)? = len as u8;
            *self.dotted.get_mut(at)? = b'.';
            let lower = self.lower.get_mut(at + 1..end)?;
            let dotted = self.dotted.get_mut(at + 1..end)?;
            for ((&b, l), d) in label.iter().zip(lower).zip(dotted) {
                let c = PLAIN_LOWER[usize::from(b)];
                *l = c;
                *d = c;
                looked_up |= c;
            }
            at = end;
        }
    }

    /// The name's wire form, lowercased (the cache key's name).
    pub fn lower(&self) -> &[u8] {
        self.lower.get(..self.len).unwrap_or(&[])
    }

    /// The rule-matching key: lowercase labels joined by dots, as
    /// [`super::names::query_key`] makes it ("" for the root). Plain labels
    /// need no escapes, and every byte is ASCII, so `None` only before a
    /// read or after a refused one.
    pub fn rule_key(&self) -> Option<&str> {
        // The root's form is one byte: its key is empty.
        let end = match self.len {
            0 => return None,
            len => len.max(2) - 1,
        };
        let body = self.dotted.get(1..end)?;
        std::str::from_utf8(body).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::names::{query_key, wire_key};
    use crate::test_rng::XorShift;
    use hickory_proto::rr::Name;
    use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

    /// The plain-name check as it was written before the forms were folded
    /// into one pass: the reference every read is held to.
    fn plain_len_by_labels(bytes: &[u8]) -> Option<usize> {
        let mut at = 0;
        loop {
            let len = usize::from(*bytes.get(at)?);
            if len == 0 {
                at += 1;
                return (at <= MAX_NAME).then_some(at);
            }
            if len > 63 {
                return None;
            }
            let label = bytes.get(at + 1..at + 1 + len)?;
            if !label
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return None;
            }
            at += 1 + len;
            if at >= MAX_NAME {
                return None;
            }
        }
    }

    /// `read` accepts exactly what the label-by-label check accepts, and
    /// then gives hickory's keys and the name's case.
    fn agrees(forms: &mut Forms, bytes: &[u8]) {
        let read = forms.read(bytes);
        assert_eq!(read.map(|r| r.len), plain_len_by_labels(bytes), "{bytes:?}");
        let Some(read) = read else { return };
        let name = &bytes[..read.len];
        assert_eq!(forms.lower(), name.to_ascii_lowercase(), "{bytes:?}");
        assert_eq!(read.capitals, name.iter().any(u8::is_ascii_uppercase), "{bytes:?}");
        let hickory = Name::read(&mut BinDecoder::new(name)).expect("a plain name is a name");
        assert_eq!(forms.lower(), &*wire_key(&hickory), "{bytes:?}");
        assert_eq!(forms.rule_key(), Some(&*query_key(&hickory)), "{bytes:?}");
    }

    #[test]
    fn plain_names_give_their_keys_and_case() {
        let mut forms = Forms::default();
        let read = forms.read(b"\x03WwW\x07Ex-Ampl\x04te_t\x00\x00\x01").unwrap();
        assert_eq!(
            read,
            Read {
                len: 18,
                capitals: true
            }
        );
        assert_eq!(forms.lower(), b"\x03www\x07ex-ampl\x04te_t\x00");
        assert_eq!(forms.rule_key(), Some("www.ex-ampl.te_t"));
        let read = forms.read(b"\x01a\x00").unwrap();
        assert_eq!(
            read,
            Read {
                len: 3,
                capitals: false
            }
        );
        assert_eq!((forms.lower(), forms.rule_key()), (&b"\x01a\x00"[..], Some("a")));
        let read = forms.read(b"\x00").unwrap();
        assert_eq!(
            read,
            Read {
                len: 1,
                capitals: false
            }
        );
        assert_eq!((forms.lower(), forms.rule_key()), (&b"\x00"[..], Some("")));
        for bytes in [
            &b"\x03WwW\x07Example\x04TEST\x00"[..],
            b"\x09printer-1\x03lan\x00",
            b"\x04_srv\x04_tcp\x07example\x00",
        ] {
            agrees(&mut forms, bytes);
        }
    }

    #[test]
    fn every_byte_in_every_place_is_judged_as_the_label_walk_judges_it() {
        let mut forms = Forms::default();
        let base = b"\x02aB\x03c-D\x04e_F9\x00\x00\x01".to_vec();
        for i in 0..base.len() {
            for b in 0..=255u8 {
                let mut v = base.clone();
                v[i] = b;
                agrees(&mut forms, &v);
                v.truncate(i);
                agrees(&mut forms, &v);
            }
        }
    }

    #[test]
    fn only_names_of_at_most_255_bytes_are_read() {
        let name = |labels: &[usize]| {
            let mut v = Vec::new();
            for &n in labels {
                v.push(u8::try_from(n).unwrap());
                v.extend(std::iter::repeat_n(b'X', n));
            }
            v.push(0);
            v
        };
        let mut forms = Forms::default();
        assert_eq!(forms.read(&name(&[63, 63, 63, 63])), None);
        assert_eq!(forms.read(&name(&[63, 63, 63, 62])), None, "256 bytes");
        assert_eq!(forms.read(&name(&[64])), None);
        let most = name(&[63, 63, 63, 61]);
        assert_eq!(forms.read(&most).map(|r| r.len), Some(255));
        agrees(&mut forms, &most);
        assert_eq!(forms.rule_key().map(str::len), Some(253));
    }

    #[test]
    fn a_refused_read_leaves_no_forms_behind_and_a_later_read_is_its_own() {
        let mut forms = Forms::default();
        forms.read(b"\x07example\x04test\x00").unwrap();
        assert_eq!(forms.read(b"\x01a\x01.\x00"), None);
        assert_eq!((forms.lower(), forms.rule_key()), (&b""[..], None));
        // A shorter name after a longer one: nothing of the longer shows.
        forms.read(b"\x02ab\x00").unwrap();
        assert_eq!((forms.lower(), forms.rule_key()), (&b"\x02ab\x00"[..], Some("ab")));
    }

    #[test]
    fn random_names_agree_with_the_label_walk_and_hickory() {
        let mut rng = XorShift::new(0x9e37_79b9_7f4a_7c15);
        let mut forms = Forms::default();
        let alphabet = b"aZ09-_.\x00\x01\x3f\x40\xc0\xff";
        for _ in 0..20_000 {
            let mut v = Vec::new();
            for _ in 0..rng.next_u64() % 6 {
                let len = (rng.next_u64() % 70) as usize;
                v.push(len as u8);
                for _ in 0..len {
                    let r = rng.next_u64();
                    // Mostly plain bytes, now and then anything.
                    let b = if r % 16 == 0 {
                        alphabet[(r >> 8) as usize % alphabet.len()]
                    } else {
                        b"abcXYZ019-_"[(r >> 8) as usize % 11]
                    };
                    v.push(b);
                }
            }
            v.push(0);
            agrees(&mut forms, &v);
        }
    }
}
