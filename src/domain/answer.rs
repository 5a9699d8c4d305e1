//! Reading a DNS answer into "these names resolved to these addresses".

use hickory_proto::op::Message;
use hickory_proto::rr::{Name, RData};
use std::net::IpAddr;

/// The longest CNAME chain followed; longer chains (a loop, or an
/// upstream making us do work) are cut here.
pub const MAX_CHAIN: usize = 8;

/// What one answer says: the queried name and the aliases it led to, and
/// the addresses at the end of that chain with the TTL each may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    /// The queried name first, then each CNAME target in order; lowercase.
    pub chain: Vec<Name>,
    /// Each A/AAAA address with its TTL, capped by the TTLs of the CNAMEs
    /// that led to it (an alias that expires takes its addresses along).
    pub addrs: Vec<(IpAddr, u32)>,
}

impl Resolution {
    /// Reads `msg`'s answer section. Only records owned by a name of the
    /// chain count: an upstream cannot make a query for one name put
    /// addresses under an unrelated name. `None` when nothing resolved.
    pub fn of(msg: &Message) -> Option<Resolution> {
        let query = msg.queries.first()?;
        let mut chain = vec![query.name.to_lowercase()];
        let mut cname_ttl = u32::MAX;
        // Follow CNAMEs from the query name; answers are usually in chain
        // order, but nothing requires it, so search the section each step.
        while chain.len() < MAX_CHAIN {
            let Some(owner) = chain.last() else { break };
            let next = msg.answers.iter().find_map(|r| match &r.data {
                RData::CNAME(target) if r.name == *owner => Some((target.0.to_lowercase(), r.ttl)),
                _ => None,
            });
            match next {
                Some((target, ttl)) if !chain.contains(&target) => {
                    cname_ttl = cname_ttl.min(ttl);
                    chain.push(target);
                }
                _ => break,
            }
        }
        let addrs: Vec<(IpAddr, u32)> = msg
            .answers
            .iter()
            .filter(|r| chain.contains(&r.name))
            .filter_map(|r| match &r.data {
                RData::A(a) => Some((IpAddr::V4(a.0), r.ttl.min(cname_ttl))),
                RData::AAAA(a) => Some((IpAddr::V6(a.0), r.ttl.min(cname_ttl))),
                _ => None,
            })
            .filter(|(ip, _)| !ip.is_unspecified())
            .collect();
        (!addrs.is_empty()).then_some(Resolution { chain, addrs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Record, RecordType};
    use std::str::FromStr;

    fn name(s: &str) -> Name {
        Name::from_str(s).unwrap()
    }

    fn answer(qname: &str, records: Vec<Record>) -> Message {
        let mut msg = Message::new(7, MessageType::Response, OpCode::Query);
        msg.add_query(Query::query(name(qname), RecordType::A));
        for r in records {
            msg.add_answer(r);
        }
        msg
    }

    #[test]
    fn follows_the_cname_chain_and_caps_ttls() {
        let msg = answer(
            "WWW.Game.Example.",
            vec![
                Record::from_rdata(
                    name("www.game.example."),
                    30,
                    RData::CNAME(CNAME(name("edge.cdn.example."))),
                ),
                Record::from_rdata(name("edge.cdn.example."), 300, RData::A(A::new(198, 51, 100, 7))),
                Record::from_rdata(
                    name("edge.cdn.example."),
                    10,
                    RData::AAAA(AAAA::from_str("2001:db8::7").unwrap()),
                ),
            ],
        );
        let r = Resolution::of(&msg).unwrap();
        assert_eq!(r.chain, vec![name("www.game.example."), name("edge.cdn.example.")]);
        assert_eq!(r.chain[0].to_string(), "www.game.example.");
        assert_eq!(
            r.addrs,
            vec![
                ("198.51.100.7".parse().unwrap(), 30),
                ("2001:db8::7".parse().unwrap(), 10)
            ]
        );
    }

    #[test]
    fn ignores_records_outside_the_chain_and_null_addresses() {
        let msg = answer(
            "a.example.",
            vec![
                Record::from_rdata(name("victim.example."), 300, RData::A(A::new(203, 0, 113, 1))),
                Record::from_rdata(name("a.example."), 300, RData::A(A::new(0, 0, 0, 0))),
            ],
        );
        assert_eq!(Resolution::of(&msg), None);
    }

    #[test]
    fn a_cname_loop_ends() {
        let msg = answer(
            "a.example.",
            vec![
                Record::from_rdata(name("a.example."), 60, RData::CNAME(CNAME(name("b.example.")))),
                Record::from_rdata(name("b.example."), 60, RData::CNAME(CNAME(name("a.example.")))),
                Record::from_rdata(name("b.example."), 60, RData::A(A::new(192, 0, 2, 9))),
            ],
        );
        let r = Resolution::of(&msg).unwrap();
        assert_eq!(r.chain.len(), 2);
        assert_eq!(r.addrs, vec![("192.0.2.9".parse().unwrap(), 60)]);
    }
}
