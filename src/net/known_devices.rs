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
//! that pace for itself, so all such answers together are bounded too
//! ([`AT_ONCE`] each [`super::neigh::REFRESH`]): they take a small share
//! of a send buffer, whoever sends them. And an address let through that
//! the kernel has still not resolved [`GIVE_UP`] later is gone, not a
//! device: it is forgotten until it is seen resolved again. With 40 such
//! addresses asking 100 times a second each, a forgotten device got 9 to
//! 17 of its 20 answers before this rule; a departed device's address now
//! costs one answer, not one a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::link_addr::LinkAddr;
use super::pace::Pace;

/// How long an address seen resolved counts as a device: a phone asleep
/// for most of an hour is still the same device when it wakes.
pub const REMEMBER: Duration = Duration::from_secs(3_600);
/// How often an answer to one remembered, unresolved address may go: a
/// stub resolver asks again after a second or more, and the kernel
/// resolves a device that is there within milliseconds.
pub const RETRY: Duration = Duration::from_secs(1);
/// Answers to remembered, unresolved addresses let through in one
/// [`super::neigh::REFRESH`], all addresses together: 20 a second, each
/// waiting at most the kernel's three seconds, some 60 answers at once
/// in a buffer that holds hundreds.
pub const AT_ONCE: u32 = 2;
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
    /// [`AT_ONCE`] a window at most.
    pace: Pace,
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

    /// Whether an answer to `ip`, which the kernel has not resolved now,
    /// may go anyway: it was a device, its last such answer went
    /// [`RETRY`] ago or more, and fewer than [`AT_ONCE`] went in this
    /// window of `window` (the table's refresh).
    pub fn lets_through(&mut self, ip: IpAddr, now: Instant, window: Duration) -> bool {
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
        if !self.pace.take(now, window, AT_ONCE) {
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
        assert!(!known.lets_through(ip(100), now, WINDOW));
        assert!(!known.lets_through(ip(100), now + RETRY * 5, WINDOW));
    }

    #[test]
    fn a_device_seen_resolved_gets_one_answer_each_retry() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        known.saw(unlinked(&[ip(10)]), now);
        assert!(known.lets_through(ip(10), now, WINDOW));
        assert!(!known.lets_through(ip(10), now + WINDOW, WINDOW));
        assert!(!known.lets_through(ip(10), now + RETRY - WINDOW, WINDOW));
        assert!(known.lets_through(ip(10), now + RETRY, WINDOW));
    }

    #[test]
    fn all_remembered_addresses_together_get_at_most_at_once_a_window() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        let all: Vec<IpAddr> = (1..=50).map(ip).collect();
        known.saw(unlinked(&all), now);
        let first = all.iter().filter(|&&a| known.lets_through(a, now, WINDOW)).count();
        assert_eq!(first, AT_ONCE as usize);
        // The next window lets the next ones through, not the same again.
        let later = now + WINDOW;
        let second: Vec<IpAddr> = all
            .iter()
            .copied()
            .filter(|&a| known.lets_through(a, later, WINDOW))
            .collect();
        assert_eq!(second, all[AT_ONCE as usize..2 * AT_ONCE as usize]);
    }

    #[test]
    fn an_address_let_through_and_not_resolved_since_is_forgotten() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        known.saw(unlinked(&[ip(10), ip(11)]), now);
        assert!(known.lets_through(ip(10), now, WINDOW));
        assert!(known.lets_through(ip(11), now, WINDOW));
        // 11 answered the kernel and is seen resolved; 10 never did.
        known.saw(unlinked(&[ip(11)]), now + WINDOW);
        assert!(known.lets_through(ip(10), now + RETRY, WINDOW));
        assert!(!known.lets_through(ip(10), now + GIVE_UP, WINDOW), "past GIVE_UP");
        known.saw(unlinked(&[]), now + GIVE_UP);
        assert_eq!(known.len(), 1);
        assert!(!known.lets_through(ip(10), now + GIVE_UP * 2, WINDOW));
        // 11, let through again much later, has GIVE_UP from then.
        let later = now + GIVE_UP * 2;
        assert!(known.lets_through(ip(11), later, WINDOW));
        known.saw(unlinked(&[]), later + RETRY);
        assert!(known.lets_through(ip(11), later + RETRY, WINDOW));
        // Seen resolved again, 10 is a device again.
        known.saw(unlinked(&[ip(10)]), later + RETRY);
        assert!(known.lets_through(ip(10), later + RETRY, WINDOW));
    }

    #[test]
    fn an_address_not_seen_for_an_hour_is_forgotten() {
        let mut known = KnownDevices::default();
        let now = Instant::now();
        known.saw(unlinked(&[ip(10), ip(11)]), now);
        let later = now + REMEMBER;
        known.saw(unlinked(&[ip(11)]), later);
        assert!(!known.lets_through(ip(10), later, WINDOW));
        assert!(known.lets_through(ip(11), later, WINDOW));
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
        assert!(!known.lets_through(old[0], now, WINDOW));
        assert!(known.lets_through(new[0], now, WINDOW));
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
        assert!(known.lets_through(ip(10), now, WINDOW));
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
