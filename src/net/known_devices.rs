//! LAN addresses the kernel once resolved, so that a real device whose
//! neighbour entry the kernel has since dropped is still answered while
//! answers to unresolved neighbours are held back ([`super::unresolved`]).
//!
//! A device forging source addresses makes the kernel's neighbour table
//! fill with entries nobody answers, and the kernel then drops idle
//! entries (its forced garbage collection takes any not confirmed for
//! five seconds), real devices' among them. The kernel learns such a
//! device again only when it sends it something, and an answer held back
//! is not sent: the device, which still knows the gateway and does not
//! ask for it, was not answered while the flood lasted.
//!
//! An address seen resolved is a device that answered the kernel, which a
//! forged source never is; so such an address is let through at a slow
//! pace ([`RETRY`] each) even while unresolved: its answer waits in the
//! neighbour queue while the kernel asks, and the device answers. A
//! forger that knows the addresses of devices that have left can take
//! that pace for itself, so all such answers together are bounded too,
//! by what they hold of a send buffer ([`CHARGE_PER_SECOND`], each
//! answer at most [`LARGEST`]): they take a small share of it, whoever
//! sends them and however big their answers. And an address let through that
//! the kernel has still not resolved [`GIVE_UP`] later is gone, not a
//! device: it is forgotten until it is seen resolved again. With 40 such
//! addresses asking 100 times a second each, a forgotten device got 9 to
//! 17 of its 20 answers before this rule; a departed device's address now
//! costs one answer, not one a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::link_addr::LinkAddr;

/// How long an address seen resolved counts as a device: a phone asleep
/// for most of an hour is still the same device when it wakes.
pub const REMEMBER: Duration = Duration::from_secs(3_600);
/// How often an answer to one remembered, unresolved address may go: a
/// stub resolver asks again after a second or more, and the kernel
/// resolves a device that is there within milliseconds.
pub const RETRY: Duration = Duration::from_secs(1);
/// What answers to remembered, unresolved addresses may charge a send
/// buffer each second, all addresses together (the charge of each is
/// [`super::unresolved::charge`] of its payload): each waits at most the
/// kernel's three seconds, so they hold some 50 KiB at once, a quarter
/// of a default buffer, of the half that stays free for answers that
/// leave at once. About eleven small answers a second. It was a count, 20
/// answers a second, and the relay let a whole run of answers to one
/// client go on one count: a device that had held 40 addresses and left
/// them filled the reply socket's buffer with bursts to them, and a real
/// device got 0 of 20 answers (lab, 3 of 3 runs).
pub const CHARGE_PER_SECOND: u64 = 16_384;
/// How far ahead of [`CHARGE_PER_SECOND`] the answers may run: a tenth
/// of a second's worth, one or two small answers at once.
pub const AHEAD: Duration = Duration::from_millis(100);
/// The largest charge of one answer let through to a remembered,
/// unresolved address: a DNS answer of 3 KB and more, or a big datagram
/// of a flow, waits until the kernel has resolved the address again
/// (which a small one to it makes it do). A 64 KB datagram alone would
/// take most of the free half of a buffer.
pub const LARGEST: usize = 8_192;
/// How long after the first answer let through to an unresolved address
/// it must be seen resolved, or be forgotten: the kernel asks three times
/// a second apart, and a device that is there answers the first.
pub const GIVE_UP: Duration = Duration::from_secs(3);
/// Addresses remembered at most; past it the longest unseen are
/// forgotten. A LAN with more devices than this keeps the newest.
pub const MOST: usize = 4_096;

/// The remembered addresses, and the pace of answers to them.
#[derive(Debug, Default)]
pub struct KnownDevices {
    /// When each address was last seen resolved, and when an answer to it
    /// last went while it was not.
    seen: HashMap<IpAddr, Seen>,
    /// [`CHARGE_PER_SECOND`] at most.
    pace: ChargePace,
}

/// The charge of the answers let through, kept as the time the pace is
/// due again (the generic cell rate algorithm: a token bucket kept as
/// one time): an answer may go while that time is at most [`AHEAD`] of
/// now, and moves it on by its charge's share of a second.
#[derive(Debug, Default)]
struct ChargePace {
    due: Option<Instant>,
}

impl ChargePace {
    fn take(&mut self, now: Instant, charge: usize) -> bool {
        let due = self.due.map_or(now, |d| d.max(now));
        if due.saturating_duration_since(now) > AHEAD {
            return false;
        }
        let nanos = (charge as u64).saturating_mul(1_000_000_000) / CHARGE_PER_SECOND;
        self.due = Some(due + Duration::from_nanos(nanos));
        true
    }
}

#[derive(Debug, Clone, Copy)]
struct Seen {
    resolved: Instant,
    /// Its link-layer address when last seen resolved, if the entry had
    /// one.
    link: Option<LinkAddr>,
    /// The last answer let through while unresolved ([`RETRY`]).
    let_through: Option<Instant>,
    /// The first one since the address was last seen resolved
    /// ([`GIVE_UP`]).
    first_let_through: Option<Instant>,
}

impl KnownDevices {
    /// Remembers `resolved` (one reading of the kernel's table, taken at
    /// `now`), forgetting what was not seen within [`REMEMBER`], what was
    /// let through [`GIVE_UP`] ago and not resolved since, and what is
    /// past [`MOST`].
    pub fn saw(&mut self, resolved: impl IntoIterator<Item = (IpAddr, Option<LinkAddr>)>, now: Instant) {
        for (ip, link) in resolved {
            let fresh = Seen {
                resolved: now,
                link,
                let_through: None,
                first_let_through: None,
            };
            self.seen.insert(ip, fresh);
        }
        self.seen
            .retain(|_, s| now.saturating_duration_since(s.resolved) < REMEMBER && !gave_up(s.first_let_through, now));
        if self.seen.len() > MOST {
            let mut ages: Vec<Instant> = self.seen.values().map(|s| s.resolved).collect();
            let cut = ages.len() - MOST;
            let (_, &mut oldest_kept, _) = ages.select_nth_unstable(cut);
            self.seen.retain(|_, s| s.resolved >= oldest_kept);
            // Ties at the cut may keep a few more; never fewer than MOST.
        }
    }

    /// Whether an answer to `ip` charging `charge` bytes of a send buffer,
    /// which the kernel has not resolved now, may go anyway: it was a
    /// device, its last such answer went [`RETRY`] ago or more, the answer
    /// is at most [`LARGEST`], and the pace of all such answers
    /// ([`CHARGE_PER_SECOND`]) has room for it.
    pub fn lets_through(&mut self, ip: IpAddr, now: Instant, charge: usize) -> bool {
        if charge > LARGEST {
            return false;
        }
        let Some(seen) = self.seen.get_mut(&ip) else {
            return false;
        };
        if seen
            .let_through
            .is_some_and(|t| now.saturating_duration_since(t) < RETRY)
            || gave_up(seen.first_let_through, now)
        {
            return false;
        }
        if !self.pace.take(now, charge) {
            return false;
        }
        seen.let_through = Some(now);
        seen.first_let_through.get_or_insert(now);
        true
    }

    /// The IPv6 /64s (their upper 64 bits) that hold a device remembered
    /// with a link-layer address: where a known device's new address can
    /// be. Off-link prefixes (a tunnel's route, a default route of another
    /// table) and prefixes with no device are not among them.
    pub fn device_prefixes(&self, now: Instant) -> impl Iterator<Item = u64> + '_ {
        self.seen.iter().filter_map(move |(ip, s)| match ip {
            IpAddr::V6(v6)
                if s.link.is_some()
                    && now.saturating_duration_since(s.resolved) < REMEMBER
                    && !gave_up(s.first_let_through, now) =>
            {
                Some(prefix_64(*v6))
            }
            _ => None,
        })
    }

    /// The link-layer address `ip` had when last seen resolved, if that
    /// was within [`REMEMBER`] and it has not been given up on since
    /// ([`GIVE_UP`]).
    pub fn link_of(&self, ip: IpAddr, now: Instant) -> Option<LinkAddr> {
        self.seen
            .get(&ip)
            .filter(|s| now.saturating_duration_since(s.resolved) < REMEMBER && !gave_up(s.first_let_through, now))
            .and_then(|s| s.link)
    }

    /// How many addresses are remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }
}

/// Whether an address first let through at `first` has had [`GIVE_UP`]
/// to be resolved, by `now`.
fn gave_up(first: Option<Instant>, now: Instant) -> bool {
    first.is_some_and(|t| now.saturating_duration_since(t) >= GIVE_UP)
}

/// The upper 64 bits of `ip`: its /64.
pub fn prefix_64(ip: std::net::Ipv6Addr) -> u64 {
    (u128::from(ip) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(100);
    /// The charge of a small answer (100 bytes).
    const SMALL: usize = 1_480;

    /// `ips` as a reading of the table whose entries carry no link-layer
    /// address.
    fn unlinked(ips: &[IpAddr]) -> impl Iterator<Item = (IpAddr, Option<LinkAddr>)> + '_ {
        ips.iter().map(|&ip| (ip, None))
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn lan_v6(host: u128) -> IpAddr {
        IpAddr::from(std::net::Ipv6Addr::from((0x2001_0db8u128 << 96) + host))
    }

    #[test]
    fn an_address_never_seen_resolved_is_never_let_through() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        known.saw(unlinked(&[ip(10)]), now);
        assert!(!known.lets_through(ip(100), now, SMALL));
        assert!(!known.lets_through(ip(100), now + RETRY * 5, SMALL));
    }

    #[test]
    fn a_device_seen_resolved_gets_one_answer_each_retry() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        known.saw(unlinked(&[ip(10)]), now);
        assert!(known.lets_through(ip(10), now, SMALL));
        assert!(!known.lets_through(ip(10), now + WINDOW, SMALL));
        assert!(!known.lets_through(ip(10), now + RETRY - WINDOW, SMALL));
        assert!(known.lets_through(ip(10), now + RETRY, SMALL));
    }

    #[test]
    fn all_remembered_addresses_together_charge_at_most_the_pace() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        let all: Vec<IpAddr> = (1..=50).map(ip).collect();
        known.saw(unlinked(&all), now);
        // At once: AHEAD's worth of small answers, and the one that
        // crosses it.
        let at_once = all.iter().filter(|&&a| known.lets_through(a, now, SMALL)).count();
        let ahead = (CHARGE_PER_SECOND as u128 * AHEAD.as_millis() / 1_000) as usize;
        assert_eq!(at_once, ahead / SMALL + 1);
        // The next ones, not the same again, as the pace comes due.
        let later = now + WINDOW;
        let second: Vec<IpAddr> = all
            .iter()
            .copied()
            .filter(|&a| known.lets_through(a, later, SMALL))
            .collect();
        assert_eq!(second, all[at_once..at_once + 1]);
        // Over three seconds, all together charge no more than the pace
        // and its head start, plus one answer.
        let mut charged = (at_once + 1) * SMALL;
        for ms in (110..3_000).step_by(10) {
            let t = now + Duration::from_millis(ms);
            charged += all.iter().filter(|&&a| known.lets_through(a, t, SMALL)).count() * SMALL;
            known.saw(unlinked(&all), t);
        }
        let bound = CHARGE_PER_SECOND as usize * 3 + ahead + SMALL;
        assert!(charged <= bound, "{charged} charged over 3 s, more than {bound}");
        assert!(charged > bound / 2, "{charged} charged over 3 s: the pace was not used");
    }

    #[test]
    fn an_answer_too_big_is_not_let_through_and_a_big_one_spends_the_pace() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        known.saw(unlinked(&[ip(10), ip(11), ip(12)]), now);
        assert!(!known.lets_through(ip(10), now, LARGEST + 1));
        // Refused whole: 10 is not marked as let through.
        assert!(known.lets_through(ip(10), now, LARGEST));
        // Half a second of the pace spent: 11 waits for it.
        assert!(!known.lets_through(ip(11), now + WINDOW, SMALL));
        let due = now + Duration::from_nanos(LARGEST as u64 * 1_000_000_000 / CHARGE_PER_SECOND);
        assert!(known.lets_through(ip(11), due - AHEAD, SMALL));
    }

    #[test]
    fn an_address_let_through_and_not_resolved_since_is_forgotten() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        known.saw(unlinked(&[ip(10), ip(11)]), now);
        assert!(known.lets_through(ip(10), now, SMALL));
        assert!(known.lets_through(ip(11), now, SMALL));
        // 11 answered the kernel and is seen resolved; 10 never did.
        known.saw(unlinked(&[ip(11)]), now + WINDOW);
        assert!(known.lets_through(ip(10), now + RETRY, SMALL));
        assert!(!known.lets_through(ip(10), now + GIVE_UP, SMALL), "past GIVE_UP");
        known.saw(unlinked(&[]), now + GIVE_UP);
        assert_eq!(known.len(), 1);
        assert!(!known.lets_through(ip(10), now + GIVE_UP * 2, SMALL));
        // 11, let through again much later, has GIVE_UP from then.
        let later = now + GIVE_UP * 2;
        assert!(known.lets_through(ip(11), later, SMALL));
        known.saw(unlinked(&[]), later + RETRY);
        assert!(known.lets_through(ip(11), later + RETRY, SMALL));
        // Seen resolved again, 10 is a device again.
        known.saw(unlinked(&[ip(10)]), later + RETRY);
        assert!(known.lets_through(ip(10), later + RETRY, SMALL));
    }

    #[test]
    fn an_address_not_seen_for_an_hour_is_forgotten() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        known.saw(unlinked(&[ip(10), ip(11)]), now);
        let later = now + REMEMBER;
        known.saw(unlinked(&[ip(11)]), later);
        assert!(!known.lets_through(ip(10), later, SMALL));
        assert!(known.lets_through(ip(11), later, SMALL));
    }

    #[test]
    fn past_most_the_longest_unseen_are_forgotten() {
        let mut known = KnownDevices::default();
        let start = Instant::now();
        let old: Vec<IpAddr> = (0..100u128).map(|i| lan_v6(0x1_0000 + i)).collect();
        known.saw(unlinked(&old), start);
        let new: Vec<IpAddr> = (0..MOST as u128).map(|i| lan_v6(0x2_0000 + i)).collect();
        let now = start + Duration::from_secs(1);
        known.saw(unlinked(&new), now);
        assert_eq!(known.len(), MOST);
        assert!(!known.lets_through(old[0], now, SMALL));
        assert!(known.lets_through(new[0], now, SMALL));
    }

    #[test]
    fn a_devices_link_address_is_remembered_with_it() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        let mac = LinkAddr::from_bytes(3, &[2, 0, 0, 0, 0, 1]);
        known.saw([(ip(10), mac), (ip(11), None)], now);
        assert_eq!(known.link_of(ip(10), now), mac);
        assert_eq!(known.link_of(ip(11), now), None, "no link-layer address");
        assert_eq!(known.link_of(ip(12), now), None, "never seen");
        assert_eq!(known.link_of(ip(10), now + REMEMBER), None, "an hour later");
        // Let through and not resolved since: given up on.
        assert!(known.lets_through(ip(10), now, SMALL));
        assert_eq!(known.link_of(ip(10), now + GIVE_UP), None);
    }

    #[test]
    fn only_the_64s_of_devices_with_a_link_layer_address_are_device_prefixes() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        let mac = LinkAddr::from_bytes(3, &[2, 0, 0, 0, 0, 1]);
        let tunnel_peer = IpAddr::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0xff, 0, 0, 0, 0, 1));
        known.saw([(lan_v6(7), mac), (tunnel_peer, None), (ip(10), mac)], now);
        let prefixes: Vec<u64> = known.device_prefixes(now).collect();
        assert_eq!(prefixes, vec![0x2001_0db8_0000_0000]);
        // Forgotten with the device.
        assert_eq!(known.device_prefixes(now + REMEMBER).count(), 0);
    }
}
