//! The names an answer's CNAME (and DNAME) records lead to, for blocking
//! by target ("CNAME cloaking").
//!
//! A tracker hides behind a first-party name: `metrics.shop.example CNAME
//! tracker.adnet.example`. A block rule for `adnet.example` never sees the
//! query name, only the answer does; so the engine looks at every target
//! of an answer's aliases (see [`super::engine`]), on the way out of the
//! cache as on the way in from upstream, and a target a block rule names
//! gets that rule's block answer.
//!
//! The work is bounded whatever the answer holds: at most
//! [`MAX_TARGETS`] distinct targets are looked at, each compared with the
//! ones already seen (so a loop, or one link repeated a hundred times,
//! costs no more than the records it is made of). What reaches this
//! module has been scrubbed ([`super::scrub`]): at most
//! [`super::scrub::MAX_CHAIN`] links, a longer chain or a loop being
//! answered SERVFAIL and never cached, so the bound is never what stops a
//! walk through an answer that is served.

use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};
use std::borrow::Cow;

use super::scrub::MAX_CHAIN;

/// Most distinct targets looked at in one answer: every link of the
/// longest chain scrubbing lets through, and the question's own CNAME
/// record when the question is for a CNAME.
pub const MAX_TARGETS: usize = MAX_CHAIN + 2;

/// Whether `answers` hold an alias (a CNAME or DNAME record): only such
/// an answer is checked, so the common answer costs one flag.
pub fn has_alias(answers: &[Record]) -> bool {
    answers.iter().any(|r| alias_target(r).is_some())
}

/// The name a CNAME or DNAME record points to. hickory has no type for
/// DNAME data (it keeps its bytes): its target is read from them, and a
/// DNAME whose target cannot be read (compressed, which RFC 6672 forbids,
/// or cut off) has none.
fn alias_target(record: &Record) -> Option<Cow<'_, Name>> {
    match &record.data {
        RData::CNAME(target) => Some(Cow::Borrowed(&target.0)),
        RData::Unknown {
            code: RecordType::DNAME,
            rdata,
        } => {
            let mut decoder = BinDecoder::new(&rdata.anything);
            let name = Name::read(&mut decoder).ok()?;
            decoder.is_empty().then_some(Cow::Owned(name))
        }
        _ => None,
    }
}

/// The first `Some` that `check` gives for a distinct alias target of
/// `answers`, in record order; at most [`MAX_TARGETS`] targets are
/// checked. Names compare without regard to letter case, as DNS does.
pub fn first_target<T>(answers: &[Record], mut check: impl FnMut(&Name) -> Option<T>) -> Option<T> {
    let mut seen: [Option<Cow<'_, Name>>; MAX_TARGETS] = Default::default();
    let mut count = 0;
    for target in answers.iter().filter_map(alias_target) {
        if seen[..count].iter().flatten().any(|s| **s == *target) {
            continue;
        }
        let slot = seen.get_mut(count)?;
        count += 1;
        let target: &Name = slot.insert(target);
        if let Some(found) = check(target) {
            return Some(found);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, CNAME, NULL};
    use hickory_proto::serialize::binary::{BinEncodable, BinEncoder};
    use std::str::FromStr;

    fn n(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }
    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(n(owner), 300, RData::CNAME(CNAME(n(target))))
    }
    fn a(owner: &str) -> Record {
        Record::from_rdata(n(owner), 300, RData::A(A::new(192, 0, 2, 1)))
    }

    /// Every target checked, in order, as `check` sees them.
    fn walked(answers: &[Record]) -> Vec<String> {
        let mut names = Vec::new();
        let none: Option<()> = first_target(answers, |t| {
            names.push(t.to_ascii());
            None
        });
        assert!(none.is_none());
        names
    }

    #[test]
    fn the_common_answer_has_no_alias() {
        assert!(!has_alias(&[a("www.example."), a("www.example.")]));
        assert!(has_alias(&[cname("www.example.", "cdn.example."), a("cdn.example.")]));
        assert!(walked(&[a("www.example.")]).is_empty());
    }

    #[test]
    fn finds_a_target_anywhere_on_the_chain() {
        let answers = [
            cname("metrics.shop.example.", "edge.shop.example."),
            cname("edge.shop.example.", "Tracker.AdNet.Example."),
            a("Tracker.AdNet.Example."),
        ];
        let hit = first_target(&answers, |t| (t == &n("tracker.adnet.example.")).then(|| t.to_ascii()));
        assert_eq!(hit.as_deref(), Some("tracker.adnet.example."));
    }

    #[test]
    fn a_dname_target_is_checked_too() {
        let mut target = Vec::new();
        n("adnet.example.").emit(&mut BinEncoder::new(&mut target)).unwrap();
        let dname = Record::from_rdata(
            n("shop.example."),
            300,
            RData::Unknown {
                code: RecordType::DNAME,
                rdata: NULL::with(target),
            },
        );
        let answers = [dname, cname("metrics.shop.example.", "metrics.adnet.example.")];
        assert_eq!(walked(&answers), ["adnet.example.", "metrics.adnet.example."]);
    }

    /// A loop is two records, not an endless walk: each target once.
    #[test]
    fn a_loop_is_walked_once() {
        let answers = [
            cname("a.example.", "b.example."),
            cname("b.example.", "A.EXAMPLE."),
            cname("a.example.", "b.example."),
        ];
        assert_eq!(walked(&answers), ["b.example.", "a.example."]);
    }

    /// Repeating one link does not use up the bound before the blocked
    /// target: repeated targets are not counted.
    #[test]
    fn repeated_links_do_not_hide_a_later_target() {
        let mut answers: Vec<Record> = (0..200).map(|_| cname("a.example.", "b.example.")).collect();
        answers.push(cname("b.example.", "tracker.adnet.example."));
        let hit = first_target(&answers, |t| (t == &n("tracker.adnet.example.")).then_some(()));
        assert!(hit.is_some());
    }

    /// A chain of 150 links is cut at the bound: bounded work.
    #[test]
    fn a_long_chain_is_cut_at_the_bound() {
        let answers: Vec<Record> = (0..150)
            .map(|i| cname(&format!("l{i}.example."), &format!("l{}.example.", i + 1)))
            .collect();
        let names = walked(&answers);
        assert_eq!(names.len(), MAX_TARGETS);
        assert_eq!(names[0], "l1.example.");
    }
}
