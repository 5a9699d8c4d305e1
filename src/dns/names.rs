//! Domain-name sets that answer "is this name, or a parent of it, listed?"
//! in O(labels), whatever the number of names.
//!
//! A block list can hold a million names. Storing each as a `String` in a
//! `HashSet` costs ~50 bytes of overhead per name; here all names share one
//! byte arena and the hash tables hold 4-byte offsets into it, so a million
//! names take about 30 MB. A lookup hashes the query name and each of its
//! parent names once: `a.b.example.com` costs four probes.

use hashbrown::HashTable;
use std::hash::BuildHasher;

/// Names are stored lowercase, without the trailing dot. Returns `None` for
/// text that is not a plausible host or domain name.
pub fn normalize(text: &str) -> Option<String> {
    let t = text.trim().trim_end_matches('.');
    if t.is_empty() || t.len() > 253 {
        return None;
    }
    let ascii = if t.is_ascii() {
        t.to_ascii_lowercase()
    } else {
        // Internationalized names are matched in their punycode form, the
        // form in which they travel in DNS queries.
        let name = hickory_proto::rr::Name::from_utf8(t).ok()?;
        name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
    };
    let valid_label = |l: &str| {
        !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    ascii.split('.').all(valid_label).then_some(ascii)
}

/// The rule-matching key of a query name: lowercase labels joined by dots.
///
/// A label may itself hold a dot or a backslash (`bank\.test` is one label),
/// or any other byte, control characters included; everything but printable
/// ASCII, and the dot and backslash themselves, is written as an RFC 1035
/// `\DDD` escape. So the key of a one-label name can never equal the key of
/// a two-label one, no escaped key matches a listed name (listed names hold
/// only letters, digits, `-`, `_`), and the key is safe to log: a LAN
/// device cannot put a newline or a terminal escape into the log.
pub fn query_key(name: &hickory_proto::rr::Name) -> String {
    let mut key = String::with_capacity(name.len());
    for (i, label) in name.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        for &b in label {
            let b = b.to_ascii_lowercase();
            if b.is_ascii_graphic() && b != b'.' && b != b'\\' {
                key.push(char::from(b));
            } else {
                push_escape(&mut key, b);
            }
        }
    }
    key
}

/// `\DDD`, the byte in decimal (RFC 1035 5.1).
fn push_escape(out: &mut String, b: u8) {
    out.push('\\');
    out.push(char::from(b'0' + b / 100));
    out.push(char::from(b'0' + b / 10 % 10));
    out.push(char::from(b'0' + b % 10));
}

/// `text` with every character that is not printable ASCII (control
/// characters, DEL, anything beyond ASCII) written as `\DDD` per byte of
/// its UTF-8 form, and backslashes doubled: for logging text that may
/// carry a query name, such as a resolver library's error message.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if text.bytes().all(|b| (b.is_ascii_graphic() || b == b' ') && b != b'\\') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for b in text.bytes() {
        match b {
            b'\\' => out.push_str("\\\\"),
            b' ' => out.push(' '),
            b if b.is_ascii_graphic() => out.push(char::from(b)),
            b => push_escape(&mut out, b),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// The cache key of a name: its wire format (length-prefixed labels,
/// RFC 1035 3.1) with ASCII letters lowercased. Label boundaries are kept,
/// so `bank\.test` (one label) and `bank.test` (two) never share an entry.
///
/// Shared (`Arc`): a miss's key also names its question in the upstream
/// group's single-flight map, which now holds a second reference where
/// it held a copy of its own (an allocation per miss). Written on the
/// stack first, so that the key is one allocation.
pub fn wire_key(name: &hickory_proto::rr::Name) -> std::sync::Arc<[u8]> {
    let mut key = [0u8; hickory_proto::rr::Name::MAX_LENGTH];
    match write_wire_key(name, &mut key) {
        Some(len) => std::sync::Arc::from(&key[..len]),
        // Longer than any name hickory reads: built on the heap instead.
        None => wire_key_long(name),
    }
}

/// [`wire_key`] of `name` written at the start of `out`; its length, or
/// `None` when it does not fit (what is written is then meaningless).
/// For a caller that packs the key with more around it (the cache's).
pub fn write_wire_key(name: &hickory_proto::rr::Name, out: &mut [u8]) -> Option<usize> {
    let mut len = 0;
    for label in name.iter() {
        // A decoded label is at most 63 bytes; saturate rather than trust it.
        let head = u8::try_from(label.len()).unwrap_or(u8::MAX);
        let room = out.get_mut(len..len + 1 + label.len())?;
        room[0] = head;
        room[1..].copy_from_slice(label);
        len += 1 + label.len();
    }
    *out.get_mut(len)? = 0;
    let key = out.get_mut(..=len)?;
    // Lowercased in one pass over the whole key (length bytes are below
    // 'A'): a vectorised pass instead of a byte-by-byte map, on every
    // cache lookup and every miss.
    key.make_ascii_lowercase();
    Some(len + 1)
}

/// [`wire_key`] of a name too long for its buffer (not one hickory
/// reads or builds: they are at most 255 bytes).
fn wire_key_long(name: &hickory_proto::rr::Name) -> std::sync::Arc<[u8]> {
    let mut key = Vec::with_capacity(name.len() + 1);
    for label in name.iter() {
        key.push(u8::try_from(label.len()).unwrap_or(u8::MAX));
        key.extend_from_slice(label);
    }
    key.make_ascii_lowercase();
    key.push(0);
    std::sync::Arc::from(key)
}

/// `name` itself, then each parent: `a.b.c`, `b.c`, `c`.
pub fn self_and_parents(name: &str) -> impl Iterator<Item = &str> {
    // A byte search: `split_once('.')` goes through the general `char`
    // searcher, which callgrind counted at about 200 instructions per
    // query name on the cache-hit path, for names of a few labels.
    std::iter::successors(Some(name), |n| {
        let dot = n.bytes().position(|b| b == b'.')?;
        n.get(dot + 1..)
    })
}

/// A set of exact names and of names that also cover their subdomains.
#[derive(Debug, Default)]
pub struct DomainSet {
    /// Length-prefixed names: `[len, bytes...]` back to back.
    arena: Vec<u8>,
    exact: HashTable<u32>,
    subtree: HashTable<u32>,
    hasher: foldhash::fast::RandomState,
}

impl DomainSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a normalized name (see [`normalize`]). With `subdomains`, every
    /// name below it matches too.
    pub fn insert(&mut self, name: &str, subdomains: bool) {
        let Ok(len) = u8::try_from(name.len()) else {
            return;
        };
        let hash = self.hasher.hash_one(name.as_bytes());
        let arena = &self.arena;
        let table = if subdomains { &mut self.subtree } else { &mut self.exact };
        if table.find(hash, |&off| entry(arena, off) == name.as_bytes()).is_some() {
            return;
        }
        let Ok(offset) = u32::try_from(self.arena.len()) else {
            return; // 4 GiB of names: beyond any real list
        };
        self.arena.push(len);
        self.arena.extend_from_slice(name.as_bytes());
        let (arena, hasher) = (&self.arena, &self.hasher);
        table.insert_unique(hash, offset, |&off| hasher.hash_one(entry(arena, off)));
    }

    /// Whether `name` (a query key, see [`query_key`]) is listed exactly or
    /// lies under a listed subtree.
    pub fn matches(&self, name: &str) -> bool {
        // With no subtree listed, the walk up the parents (a byte search
        // per label) is skipped: a set of exact names only, such as an
        // override's, cost every query about 200 instructions for it
        // (callgrind, a name of five labels).
        self.contains(&self.exact, name)
            || !self.subtree.is_empty() && self_and_parents(name).any(|n| self.contains(&self.subtree, n))
    }

    fn contains(&self, table: &HashTable<u32>, name: &str) -> bool {
        if table.is_empty() {
            return false;
        }
        let hash = self.hasher.hash_one(name.as_bytes());
        table
            .find(hash, |&off| entry(&self.arena, off) == name.as_bytes())
            .is_some()
    }

    /// Number of names (exact and subtree).
    pub fn len(&self) -> usize {
        self.exact.len() + self.subtree.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Trims spare capacity once loading is done.
    pub fn shrink_to_fit(&mut self) {
        self.arena.shrink_to_fit();
        let (arena, hasher) = (&self.arena, &self.hasher);
        self.exact.shrink_to_fit(|&off| hasher.hash_one(entry(arena, off)));
        self.subtree.shrink_to_fit(|&off| hasher.hash_one(entry(arena, off)));
    }
}

fn entry(arena: &[u8], offset: u32) -> &[u8] {
    let start = offset as usize;
    let len = arena.get(start).copied().unwrap_or(0) as usize;
    arena.get(start + 1..start + 1 + len).unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_case_dots_and_idn() {
        assert_eq!(normalize("Example.COM.").as_deref(), Some("example.com"));
        assert_eq!(normalize(" ads.example ").as_deref(), Some("ads.example"));
        assert_eq!(normalize("bücher.example").as_deref(), Some("xn--bcher-kva.example"));
        assert_eq!(normalize("_dmarc.example").as_deref(), Some("_dmarc.example"));
        for bad in ["", ".", "a..b", "a b", "a/b", "x:y", &"a".repeat(64), "*.x"] {
            assert_eq!(normalize(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn exact_and_subtree_matching() {
        let mut s = DomainSet::new();
        s.insert("printer.lan", false);
        s.insert("ads.example", true);
        assert!(s.matches("printer.lan"));
        assert!(!s.matches("x.printer.lan"));
        assert!(!s.matches("lan"));
        assert!(s.matches("ads.example"));
        assert!(s.matches("a.b.ads.example"));
        assert!(!s.matches("badads.example"));
        assert!(!s.matches("example"));
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn duplicates_are_stored_once() {
        let mut s = DomainSet::new();
        for _ in 0..3 {
            s.insert("a.example", false);
            s.insert("a.example", true);
        }
        assert_eq!(s.len(), 2);
        s.shrink_to_fit();
        assert!(s.matches("b.a.example"));
    }

    #[test]
    fn parents() {
        let v: Vec<_> = self_and_parents("a.b.c").collect();
        assert_eq!(v, ["a.b.c", "b.c", "c"]);
    }

    #[test]
    fn query_key_lowercases() {
        let name = hickory_proto::rr::Name::from_ascii("WwW.Example.COM.").unwrap();
        assert_eq!(query_key(&name), "www.example.com");
        assert_eq!(query_key(&hickory_proto::rr::Name::root()), "");
    }

    fn parse(presentation: &str) -> hickory_proto::rr::Name {
        hickory_proto::rr::Name::from_ascii(presentation).unwrap_or_else(|e| panic!("{presentation}: {e}"))
    }

    #[test]
    fn a_dot_inside_a_label_never_collides_with_a_label_boundary() {
        for (one, two) in [("bank\\.test.", "bank.test."), ("www\\.bank.test.", "www.bank.test.")] {
            let (one, two) = (parse(one), parse(two));
            assert_ne!(
                one.num_labels(),
                two.num_labels(),
                "the test names must differ in labels"
            );
            assert_ne!(wire_key(&one), wire_key(&two));
            assert_ne!(query_key(&one), query_key(&two));
        }
        assert_eq!(query_key(&parse("Bank\\.Test.")), "bank\\046test");
        // A literal backslash-digits label cannot pose as an escaped dot.
        let backslash = hickory_proto::rr::Name::from_labels([b"bank\\046test".as_slice()]).unwrap();
        assert_ne!(query_key(&backslash), query_key(&parse("bank\\.test.")));
        let mut s = DomainSet::new();
        s.insert("bank.test", true);
        assert!(!s.matches(&query_key(&parse("bank\\.test."))));
        assert!(s.matches(&query_key(&parse("www.bank.test."))));
    }

    #[test]
    fn keys_hold_no_control_bytes_so_names_log_safely() {
        let label = b"evil\n2026-11-25T00:00:00Z ERROR forged\x1b[31m\x00\x7f\xff \t".as_slice();
        let name = hickory_proto::rr::Name::from_labels([label, b"test".as_slice()]).unwrap();
        let key = query_key(&name);
        assert!(key.chars().all(|c| c.is_ascii_graphic()), "{key:?}");
        assert_eq!(
            key,
            "evil\\0102026-11-25t00:00:00z\\032error\\032forged\\027[31m\\000\\127\\255\\032\\009.test"
        );
        // Distinct names keep distinct keys.
        let plain = hickory_proto::rr::Name::from_labels([b"evil010".as_slice()]).unwrap();
        let escaped = hickory_proto::rr::Name::from_labels([b"evil\n".as_slice()]).unwrap();
        assert_ne!(query_key(&plain), query_key(&escaped));
        assert_eq!(
            printable("no upstream: www.example.test"),
            "no upstream: www.example.test"
        );
        assert_eq!(printable("a\nb\\c\u{1b}é"), "a\\010b\\\\c\\027\\195\\169");
    }

    #[test]
    fn wire_key_is_lowercase_wire_format() {
        assert_eq!(&*wire_key(&parse("WwW.Ex.")), b"\x03www\x02ex\x00");
        assert_eq!(&*wire_key(&hickory_proto::rr::Name::root()), b"\x00");
        assert_eq!(wire_key(&parse("A.B.")), wire_key(&parse("a.b.")));
    }
}
