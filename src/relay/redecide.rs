//! A new flow decided under rules that a reload has since replaced is
//! decided again before it opens.
//!
//! The listener decides a flow when its first datagram arrives; the flow
//! then waits in the open backlog for an opener (behind a burst of other
//! new flows, or while the descriptor budget is being made room in). A
//! reload that lands in between swaps the rules, and its sweep of live
//! flows that a drop rule now matches does not see the waiting flow: it is
//! not in the table yet. Opened under the decision it was filed with, it
//! would have relayed to a destination the new rules drop (and let that
//! destination answer) for as long as it stayed busy.

use std::sync::Arc;

use super::key::FlowKey;
use super::open_backlog::Job;
use super::rules::{Route, UdpRule, UdpRules};

/// What the rules in force say about a waiting flow.
#[derive(Debug)]
pub enum Now<'r> {
    /// Open it under this rule (the one it was filed with when no reload
    /// came between).
    Open(&'r UdpRule),
    /// A drop rule matches it now.
    Dropped,
    /// The rules in force relay it as another flow (another NAT mode, or
    /// another full-cone rule): its key is not the one it waits under.
    /// The client's next datagram files that flow.
    Moved,
}

/// Decides `job` again if `current` are not the rules it was filed under;
/// `route` is the rule `current` give the job's client and destination
/// (asked only then: a reload is rare, a new flow is not).
pub fn decide_again<'r>(
    job: &'r Job,
    current: &'r Arc<UdpRules>,
    route: impl FnOnce(&'r UdpRules) -> &'r UdpRule,
) -> Now<'r> {
    if Arc::ptr_eq(&job.rules, current) {
        return Now::Open(job.rule());
    }
    decide_for(job.key, job.dst, route(current))
}

/// What `rule` (the rules in force give the client of `key` and `dst`)
/// says of a datagram to `dst` held for the flow `key`.
///
/// The opener asks this of every datagram held for a flow filed under
/// rules a reload has since replaced, not only of the first: a full-cone
/// flow's held datagrams may go to many destinations, each decided by the
/// listener under the old rules, and a drop rule the reload added for one
/// of them must hold for it as it does once the flow is open.
pub fn decide_for(key: FlowKey, dst: std::net::SocketAddr, rule: &UdpRule) -> Now<'_> {
    if rule.route == Route::Drop {
        Now::Dropped
    } else if FlowKey::new(key.client, dst, rule) == key {
        Now::Open(rule)
    } else {
        Now::Moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::net::SocketAddr;
    use std::path::Path;

    fn rules(relay: &str) -> Arc<UdpRules> {
        let c = Config::parse(&format!("[relay]\n{relay}"), Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}"));
        Arc::new(UdpRules::new(&c.relay, 0xff))
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The job the listener files for the first datagram from the client
    /// to `dst` under `rules`.
    fn job(rules: &Arc<UdpRules>, dst: &str) -> Job {
        let (client, dst) = (sa("192.0.2.10:40000"), sa(dst));
        let rule = rules.route(client, dst);
        Job {
            key: FlowKey::new(client, dst, rule),
            dst,
            rules: rules.clone(),
            rule: rule.number,
        }
    }

    fn again<'r>(job: &'r Job, current: &'r Arc<UdpRules>) -> Now<'r> {
        decide_again(job, current, |r| r.route(job.key.client, job.dst))
    }

    const DROP_9995: &str = "[[relay.rules]]\nports = [9995]\naction = \"drop\"\n";

    #[test]
    fn a_flow_waiting_through_a_reload_that_drops_it_is_not_opened() {
        let before = rules("");
        let after = rules(DROP_9995);
        let dropped = job(&before, "198.51.100.7:9995");
        assert!(matches!(again(&dropped, &after), Now::Dropped));
        // Full cone: decided by its first destination as the listener did.
        let cone_before = rules("nat = \"full-cone\"\n");
        let cone_after = rules(&format!("nat = \"full-cone\"\n{DROP_9995}"));
        let cone = job(&cone_before, "198.51.100.7:9995");
        assert!(matches!(again(&cone, &cone_after), Now::Dropped));
        // A flow the new rule does not match opens as before.
        let other = job(&before, "198.51.100.7:9989");
        assert!(matches!(again(&other, &after), Now::Open(r) if r.number == 0));
    }

    #[test]
    fn a_flow_waiting_through_a_reload_opens_under_the_rule_now_in_force() {
        let before = rules("");
        let after = rules("[[relay.rules]]\nports = [9995]\naction = \"redirect\"\nto = \"203.0.113.9:7\"\n");
        let waiting = job(&before, "198.51.100.7:9995");
        match again(&waiting, &after) {
            Now::Open(rule) => assert_eq!(rule.route, Route::Redirect(sa("203.0.113.9:7"))),
            other => panic!("{other:?}"),
        }
        // Now full cone: another flow than the one that waits.
        let cone = rules("[[relay.rules]]\nports = [9995]\naction = \"direct\"\nnat = \"full-cone\"\n");
        assert!(matches!(again(&waiting, &cone), Now::Moved));
    }

    /// A full-cone flow filed under the old rules holds datagrams to its
    /// first destination and to another one that a reload now drops: the
    /// first still opens the flow, and the other is dropped on its own.
    #[test]
    fn each_held_datagram_of_a_full_cone_flow_is_decided_again() {
        let before = rules("nat = \"full-cone\"\n");
        let after =
            rules("nat = \"full-cone\"\n[[relay.rules]]\ndestinations = [\"198.51.100.9/32\"]\naction = \"drop\"\n");
        let cone = job(&before, "198.51.100.7:7000");
        assert!(matches!(again(&cone, &after), Now::Open(_)));
        let held = |dst: &str| decide_for(cone.key, sa(dst), after.route(cone.key.client, sa(dst)));
        assert!(matches!(held("198.51.100.7:7000"), Now::Open(_)));
        assert!(matches!(held("198.51.100.8:7000"), Now::Open(_)));
        assert!(matches!(held("198.51.100.9:9000"), Now::Dropped));
        // A destination the new rules give another NAT mode is another flow.
        let split =
            rules("nat = \"full-cone\"\n[[relay.rules]]\nports = [5000]\naction = \"direct\"\nnat = \"symmetric\"\n");
        let moved = decide_for(
            cone.key,
            sa("198.51.100.8:5000"),
            split.route(cone.key.client, sa("198.51.100.8:5000")),
        );
        assert!(matches!(moved, Now::Moved));
    }

    #[test]
    fn without_a_reload_the_decision_filed_stands() {
        let before = rules(DROP_9995);
        let waiting = job(&before, "198.51.100.7:9989");
        let asked = std::cell::Cell::new(false);
        let now = decide_again(&waiting, &before, |r| {
            asked.set(true);
            r.numbered(0)
        });
        assert!(matches!(now, Now::Open(r) if r.number == 0));
        assert!(!asked.get(), "the rules were asked again without a reload");
    }
}
