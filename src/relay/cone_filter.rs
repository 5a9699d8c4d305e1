//! Which remotes may reach a client through its full-cone flow: those the
//! rules in force would not drop were the client to write to them.
//!
//! A full-cone flow has no one destination, so a reload that adds a drop
//! rule cannot end it as it ends the one-destination flows the rule
//! matches. The listener dropped the client's datagrams to the newly
//! dropped remote, but that remote (or anyone who learnt the flow's
//! mapping) could still write to the flow's socket and reach the LAN, and
//! every such datagram kept the flow from going idle. An operator adding
//! `drop` for a destination expects nothing from it to reach the LAN.
//!
//! Judging a remote walks the rules (and may look up names, for domain
//! rules), too much for every reply. Rules with no drop rule are not
//! asked at all; otherwise a flow remembers its last few verdicts, for the
//! rules they were reached under (their generation), so a reply costs a
//! compare and a short scan, and a remote is judged once per reload.

use std::net::SocketAddr;

use super::rules::UdpRules;

/// Verdicts a flow remembers: a full-cone flow mostly talks to a handful
/// of remotes (a game server, a STUN server, a few peers); one with more
/// judges the rest again as they come (only while drop rules exist).
pub const REMEMBERED: usize = 8;

/// One full-cone flow's remembered verdicts (kept by its task).
#[derive(Debug, Default)]
pub struct ConeFilter {
    /// The generation of the rules the verdicts were reached under.
    generation: u64,
    verdicts: Vec<(SocketAddr, bool)>,
    /// The verdict replaced next once all places are taken.
    next: usize,
}

impl ConeFilter {
    /// Whether `remote` may reach the client under `rules`; `dropped`
    /// says whether `rules` drop the client's flow to `remote` (asked only
    /// when `rules` have a drop rule and no verdict is remembered).
    pub fn admits(&mut self, rules: &UdpRules, remote: SocketAddr, dropped: impl FnOnce() -> bool) -> bool {
        if !rules.has_drop_rules() {
            return true;
        }
        if self.generation != rules.generation() {
            self.generation = rules.generation();
            self.verdicts.clear();
            self.next = 0;
        }
        if let Some(&(_, admitted)) = self.verdicts.iter().find(|(r, _)| *r == remote) {
            return admitted;
        }
        let admitted = !dropped();
        if self.verdicts.len() < REMEMBERED {
            self.verdicts.push((remote, admitted));
        } else if let Some(slot) = self.verdicts.get_mut(self.next) {
            *slot = (remote, admitted);
            self.next = (self.next + 1) % REMEMBERED;
        }
        admitted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::relay::rules::Route;
    use std::cell::Cell;
    use std::path::Path;

    fn rules(relay: &str) -> UdpRules {
        let c = Config::parse(&format!("[relay]\nnat = \"full-cone\"\n{relay}"), Path::new("t.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        UdpRules::new(&c.relay, 0xff)
    }

    fn remote(port: u16) -> SocketAddr {
        SocketAddr::from(([198, 51, 100, 9], port))
    }

    const CLIENT: &str = "192.0.2.10:40000";
    const DROP_9000: &str = "[[relay.rules]]\nports = [9000]\naction = \"drop\"\n";

    /// Judges `remote` under `rules` as the flow's task does, counting in
    /// `asked` how often the rules were walked.
    fn admits(f: &mut ConeFilter, rules: &UdpRules, remote: SocketAddr, asked: &Cell<usize>) -> bool {
        f.admits(rules, remote, || {
            asked.set(asked.get() + 1);
            rules.route(CLIENT.parse().unwrap(), remote).route == Route::Drop
        })
    }

    #[test]
    fn a_remote_the_rules_drop_is_kept_out_and_judged_once_per_generation() {
        let asked = Cell::new(0);
        let mut f = ConeFilter::default();
        let before = rules("");
        assert!(admits(&mut f, &before, remote(9000), &asked));
        assert_eq!(asked.get(), 0, "rules without a drop rule were walked");
        let after = rules(DROP_9000);
        for _ in 0..3 {
            assert!(!admits(&mut f, &after, remote(9000), &asked));
            assert!(admits(&mut f, &after, remote(7000), &asked));
        }
        assert_eq!(asked.get(), 2, "each remote is judged once");
        // Another reload: judged again, under the new rules.
        let again = rules("");
        assert!(admits(&mut f, &again, remote(9000), &asked));
        let dropping_again = rules(DROP_9000);
        assert!(!admits(&mut f, &dropping_again, remote(9000), &asked));
        assert_eq!(asked.get(), 3);
    }

    #[test]
    fn many_remotes_are_judged_again_not_remembered_without_bound() {
        let asked = Cell::new(0);
        let mut f = ConeFilter::default();
        let r = rules(DROP_9000);
        for port in 0..100 {
            assert_eq!(admits(&mut f, &r, remote(8900 + port), &asked), 8900 + port != 9000);
        }
        assert_eq!(f.verdicts.len(), REMEMBERED);
        assert!(
            !admits(&mut f, &r, remote(9000), &asked),
            "a forgotten verdict is reached again"
        );
        assert_eq!(asked.get(), 101);
    }
}
