//! Scrubbing upstream answers down to what the question asked.
//!
//! An upstream (or anyone who spoofs one) can put any record in any
//! section. A forwarder that caches what it was handed is then poisoned for
//! names nobody asked about: the classic "additional section" and
//! "out-of-bailiwick answer" attacks. tproxyd keeps only:
//! - in the answer section, the question's CNAME chain (starting at the
//!   question name) and the records of the chain's last name, of the asked
//!   type and class (plus their signatures);
//! - in the authority section, for a negative answer only, the SOA of a
//!   zone that contains the name (RFC 2308 needs it for the negative TTL);
//! - nothing in the additional section (the OPT record is not a record
//!   here: hickory parses it into `Message::edns`, and tproxyd writes its
//!   own on the way out).
//!
//! A CNAME chain that loops or runs past [`MAX_CHAIN`] links has no answer
//! at its end: scrubbing reports it ([`Scrubbed::broken`]) and the engine
//! answers SERVFAIL without caching anything, as resolvers do.

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Longest CNAME chain followed, in links; real chains are a handful.
pub const MAX_CHAIN: usize = 16;

/// Why a CNAME chain has no usable end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokenChain {
    /// A CNAME points back to a name already on the chain.
    Loop,
    /// More than [`MAX_CHAIN`] links.
    TooLong,
}

/// What scrubbing did and found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Scrubbed {
    /// Records removed, for counting.
    pub removed: usize,
    /// The CNAME chain loops or is too long: the answer must not be used.
    pub broken: Option<BrokenChain>,
}

/// Removes from `answer` every record the question does not need.
pub fn scrub(question: &Query, answer: &mut Message) -> Scrubbed {
    let before = answer.answers.len() + answer.authorities.len() + answer.additionals.len();
    let qtype = question.query_type();
    let qclass = question.query_class();
    let in_class = |r: &Record| r.dns_class == qclass;

    // Follow CNAMEs from the question name; a loop or an overlong chain
    // ends the walk and breaks the answer.
    let mut chain: Vec<Name> = vec![question.name().clone()];
    let mut broken = None;
    if qtype != RecordType::CNAME {
        while let Some(last) = chain.last() {
            let next = answer.answers.iter().find_map(|r| match &r.data {
                RData::CNAME(target) if in_class(r) && &r.name == last => Some(target.0.clone()),
                _ => None,
            });
            let Some(target) = next else { break };
            if chain.contains(&target) {
                broken = Some(BrokenChain::Loop);
                break;
            }
            if chain.len() > MAX_CHAIN {
                broken = Some(BrokenChain::TooLong);
                break;
            }
            chain.push(target);
        }
    }
    let end = chain.last().cloned().unwrap_or_else(|| question.name().clone());
    let wanted = |r: &Record| -> bool {
        if !in_class(r) {
            return false;
        }
        let rtype = r.record_type();
        match rtype {
            // A link of the chain: owner and target both on it, in order.
            RecordType::CNAME => {
                let link = match &r.data {
                    RData::CNAME(target) => chain.windows(2).any(|w| w[0] == r.name && w[1] == target.0),
                    _ => false,
                };
                link || (qtype == RecordType::CNAME && r.name == end)
            }
            // Signatures travel with the records they sign.
            RecordType::RRSIG => chain.contains(&r.name),
            _ => r.name == end && (qtype == rtype || qtype == RecordType::ANY),
        }
    };
    answer.answers.retain(&wanted);

    let negative = answer.metadata.response_code == ResponseCode::NXDomain || answer.answers.is_empty();
    answer.authorities.retain(|r| {
        negative && in_class(r) && matches!(r.data, RData::SOA(_)) && (r.name.zone_of(&end) || r.name.is_root())
    });
    // At most one SOA: the closest enclosing zone's.
    if answer.authorities.len() > 1 {
        answer
            .authorities
            .sort_by_key(|r| std::cmp::Reverse(r.name.num_labels()));
        answer.authorities.truncate(1);
    }
    answer.additionals.clear();
    answer.signature = None;

    let after = answer.answers.len() + answer.authorities.len();
    Scrubbed {
        removed: before.saturating_sub(after),
        broken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::DNSClass;
    use hickory_proto::rr::rdata::{A, CNAME, NS, SOA, TXT};
    use std::str::FromStr;

    fn n(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }
    fn a(name: &str, last: u8) -> Record {
        Record::from_rdata(n(name), 300, RData::A(A::new(192, 0, 2, last)))
    }
    fn cname(name: &str, target: &str) -> Record {
        Record::from_rdata(n(name), 300, RData::CNAME(CNAME(n(target))))
    }
    fn soa(zone: &str) -> Record {
        let soa = SOA::new(n(zone), n("hostmaster.test."), 1, 3600, 600, 86400, 60);
        Record::from_rdata(n(zone), 300, RData::SOA(soa))
    }
    fn msg(rcode: ResponseCode, answers: Vec<Record>, authority: Vec<Record>, additional: Vec<Record>) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.metadata.response_code = rcode;
        m.answers = answers;
        m.authorities = authority;
        m.additionals = additional;
        m
    }
    fn names(records: &[Record]) -> Vec<String> {
        records
            .iter()
            .map(|r| format!("{} {}", r.name, r.record_type()))
            .collect()
    }

    #[test]
    fn an_injected_record_for_another_name_is_removed() {
        let q = Query::query(n("a.test."), RecordType::A);
        let mut m = msg(
            ResponseCode::NoError,
            vec![a("a.test.", 1), a("bank.test.", 66)],
            vec![Record::from_rdata(
                n("bank.test."),
                300,
                RData::NS(NS(n("evil.example."))),
            )],
            vec![a("evil.example.", 66)],
        );
        assert_eq!(
            scrub(&q, &mut m),
            Scrubbed {
                removed: 3,
                broken: None
            }
        );
        assert_eq!(names(&m.answers), ["a.test. A"]);
        assert!(m.authorities.is_empty() && m.additionals.is_empty());
    }

    #[test]
    fn the_cname_chain_and_its_target_stay_everything_else_goes() {
        let q = Query::query(n("WWW.a.test."), RecordType::A);
        let mut m = msg(
            ResponseCode::NoError,
            vec![
                cname("www.a.test.", "cdn.b.test."),
                cname("cdn.b.test.", "edge.c.test."),
                a("edge.c.test.", 1),
                a("cdn.b.test.", 66),                 // not the chain's end
                cname("bank.test.", "evil.example."), // not on the chain
                Record::from_rdata(n("edge.c.test."), 300, RData::TXT(TXT::new(vec!["x".into()]))), // wrong type
            ],
            vec![],
            vec![],
        );
        scrub(&q, &mut m);
        assert_eq!(
            names(&m.answers),
            ["www.a.test. CNAME", "cdn.b.test. CNAME", "edge.c.test. A"]
        );
    }

    #[test]
    fn cname_loops_and_wrong_classes_end_the_chain() {
        let q = Query::query(n("x.test."), RecordType::A);
        let mut chaos = a("x.test.", 9);
        chaos.dns_class = DNSClass::CH;
        let mut m = msg(
            ResponseCode::NoError,
            vec![cname("x.test.", "y.test."), cname("y.test.", "x.test."), chaos],
            vec![],
            vec![],
        );
        assert_eq!(scrub(&q, &mut m).broken, Some(BrokenChain::Loop));
        assert_eq!(names(&m.answers), ["x.test. CNAME"]);
    }

    /// A chain of `links` CNAMEs from `c0.test.` to `c{links}.test.`,
    /// which has an A record.
    fn chain_of(links: usize) -> Message {
        let mut answers: Vec<Record> = (0..links)
            .map(|i| cname(&format!("c{i}.test."), &format!("c{}.test.", i + 1)))
            .collect();
        answers.push(a(&format!("c{links}.test."), 7));
        msg(ResponseCode::NoError, answers, vec![], vec![])
    }

    #[test]
    fn chains_of_up_to_sixteen_links_are_answers_longer_ones_are_broken() {
        let q = Query::query(n("c0.test."), RecordType::A);
        let mut m = chain_of(MAX_CHAIN);
        let done = scrub(&q, &mut m);
        assert_eq!(
            done,
            Scrubbed {
                removed: 0,
                broken: None
            }
        );
        assert_eq!(m.answers.len(), MAX_CHAIN + 1);
        let mut m = chain_of(MAX_CHAIN + 1);
        assert_eq!(scrub(&q, &mut m).broken, Some(BrokenChain::TooLong));
        // A loop further down the chain, and a CNAME to itself.
        let mut m = chain_of(5);
        m.answers.push(cname("c5.test.", "c2.test."));
        m.answers.retain(|r| r.record_type() == RecordType::CNAME);
        assert_eq!(scrub(&q, &mut m).broken, Some(BrokenChain::Loop));
        let mut m = msg(
            ResponseCode::NoError,
            vec![cname("c0.test.", "C0.test.")],
            vec![],
            vec![],
        );
        assert_eq!(scrub(&q, &mut m).broken, Some(BrokenChain::Loop));
        // Asking for the CNAME itself follows nothing.
        let q = Query::query(n("c0.test."), RecordType::CNAME);
        let mut m = chain_of(MAX_CHAIN + 5);
        assert_eq!(scrub(&q, &mut m).broken, None);
    }

    #[test]
    fn negative_answers_keep_only_the_enclosing_soa() {
        let q = Query::query(n("nope.a.test."), RecordType::A);
        let mut m = msg(
            ResponseCode::NXDomain,
            vec![a("bank.test.", 66)],
            vec![soa("other.example."), soa("test."), soa("a.test.")],
            vec![a("ns.a.test.", 1)],
        );
        scrub(&q, &mut m);
        assert!(m.answers.is_empty());
        assert_eq!(names(&m.authorities), ["a.test. SOA"]);
        // A positive answer carries no authority at all.
        let mut pos = msg(
            ResponseCode::NoError,
            vec![a("nope.a.test.", 1)],
            vec![soa("a.test.")],
            vec![],
        );
        scrub(&q, &mut pos);
        assert!(pos.authorities.is_empty());
    }

    #[test]
    fn a_cname_question_gets_its_cname_only() {
        let q = Query::query(n("www.a.test."), RecordType::CNAME);
        let mut m = msg(
            ResponseCode::NoError,
            vec![cname("www.a.test.", "b.test."), a("b.test.", 1)],
            vec![],
            vec![],
        );
        scrub(&q, &mut m);
        assert_eq!(names(&m.answers), ["www.a.test. CNAME"]);
    }
}
