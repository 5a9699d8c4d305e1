//! Makes the kernel ask at once for an on-link IPv6 address it has not
//! resolved, so that a known device's new address counts as that device
//! ([`crate::dns::clients`]) even while nothing else is sent to it.
//!
//! A device takes new addresses now and then (privacy addresses are
//! renewed). While forged sources of its prefix flood the gateway, the
//! queries from its new address count with the forgers' /56 and are
//! rate-limited and dropped, and the few answered are held back by the
//! gate on the pressed reply socket ([`super::unresolved`]): nothing is
//! sent to the address, so the kernel never asks for it and it stays a
//! stranger for as long as the flood lasts (lab: never resolved, 3 of 3
//! runs). Two ways did not work. An `RTM_NEWNEIGH` with `NTF_USE` made an
//! entry whose first solicitation waited for the retransmit timer, and
//! answers sent to the address meanwhile waited with it (about 1 s).
//! Answering a few limited queries anyway: the gate dropped those answers
//! too, as it must while the buffer is pressed.
//!
//! So one ICMPv6 echo request goes to such an address, if its /64 holds a
//! device the kernel resolved with a link-layer address (where a known
//! device's new address is; a forger cannot have echoes sent to a prefix
//! of a tunnel or of another table's default route, which hold none), on
//! a raw socket of its own that nothing else fills. The kernel sends it
//! as any datagram: to
//! a neighbour it has not resolved it sends a solicitation at once and
//! queues the datagram meanwhile (`neigh_resolve_output`, whose
//! `__neigh_event_send` probes immediately). A device answers the
//! solicitation within milliseconds whatever it does with the echo (a
//! firewall may drop it), the kernel has resolved the address, and the
//! next reading of the table ([`super::neigh::REFRESH`]) makes it a
//! device. A forged source never answers: it stays a stranger, and the
//! kernel drops its echo with the entry three seconds later.
//!
//! Bounded: each address is asked for at most once each [`AGAIN`], and
//! all addresses together [`AT_ONCE`] each [`super::neigh::REFRESH`]: 40
//! a second, some 120 echoes waiting at most for a kernel that never
//! resolves them, about 100 KiB of the socket's own buffer. The pace is
//! bounded because each echo to a forged address costs the kernel up to
//! three multicast solicitations and an incomplete entry for 3 s.
//!
//! Which addresses get that pace: first come, but an address asked for
//! is not asked for again for a minute ([`AGAIN`]). Once asked for, a
//! device's address is resolved within a second and is no longer asked
//! about; one still unresolved when it asks again is one that did not
//! answer, a forged one, and asking again would only spend the pace on
//! it. It was 5 s: a forger holding more than 200 addresses (40 a second
//! for 5 s) had them all due again before the pace got round, took all
//! of it for as long as the flood lasted, and a device's new address
//! went unanswered for 40 s in 3 of 4 runs of a tester's flood from
//! 1,000 sources. Now a forger's fixed set of addresses is spent after
//! one echo each (its size over 40 a second), and then the pace goes to
//! addresses not asked for yet: the device's (lab: 300 forged sources,
//! the new address answered by its second round in 6 of 6 runs; before,
//! none in three rounds in 5 of 6). A
//! forger must now bring more than 40 fresh addresses a second to keep
//! the pace, a few queries each; it still can (a /64 holds enough), and
//! then the new address waits as before. Two ways weighed against it:
//! drawing at random among the askers instead of first come changes
//! nothing against an evenly paced flood (first come is a draw by query
//! already) and has to hold or delay the echoes; echoing first the
//! addresses that asked twice only doubles a forger's cost, as it can
//! repeat each address once. An address is remembered for [`AGAIN`],
//! so at most 2,400 are (some 130 KiB), and never more than [`MOST`].

use std::collections::HashMap;
use std::io;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

use super::pace::Pace;

/// How long after asking for an address it is not asked for again: the
/// kernel asks three times a second apart, and a device that is there
/// answers the first, so an address still unresolved when it asks again
/// did not answer (see the module's comment for why a minute).
pub const AGAIN: Duration = Duration::from_secs(60);
/// Addresses remembered at most: the pace alone allows 40 a second for
/// [`AGAIN`], 2,400; this bounds it should the pace be raised.
pub const MOST: usize = 4096;
/// Addresses asked for in one window, all together.
pub const AT_ONCE: u32 = 4;
/// An ICMPv6 echo request (type 128, code 0), identifier and sequence
/// number 0; the kernel fills in the checksum of every raw ICMPv6
/// datagram.
const ECHO_REQUEST: [u8; 8] = [128, 0, 0, 0, 0, 0, 0, 0];
/// `ICMPV6_FILTER` (linux/icmpv6.h), at level `IPPROTO_ICMPV6`.
const ICMPV6_FILTER: libc::c_int = 1;

/// The addresses asked for lately, the pace, and the socket (opened at
/// the first address asked for).
#[derive(Debug, Default)]
pub struct Solicit {
    asked: HashMap<Ipv6Addr, Instant>,
    pace: Pace,
    /// `Some(None)`: it could not be opened (no `CAP_NET_RAW`), and is not
    /// tried again.
    socket: Option<Option<Socket>>,
}

impl Solicit {
    /// Sends an echo request to `ip`, an on-link address the kernel has
    /// not resolved, if it is due ([`Solicit::due`]) and can be sent to
    /// without a scope (not link-local).
    pub fn ask(&mut self, ip: Ipv6Addr, now: Instant, window: Duration) {
        if ip.is_unicast_link_local() || ip.is_multicast() || ip.is_unspecified() || !self.due(ip, now, window) {
            return;
        }
        let socket = self.socket.get_or_insert_with(|| match open() {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open an ICMPv6 socket; new IPv6 addresses of LAN devices are learnt only when the kernel sends them something");
                None
            }
        });
        if let Some(s) = socket
            && let Err(e) = s.send_to(&ECHO_REQUEST, &SocketAddrV6::new(ip, 0, 0, 0).into())
        {
            tracing::debug!(%ip, error = %e, "echo request not sent");
        }
    }

    /// Whether `ip` may be asked for at `now`: not asked for within
    /// [`AGAIN`], and fewer than [`AT_ONCE`] asked for in this window of
    /// `window`. Taken if so.
    fn due(&mut self, ip: Ipv6Addr, now: Instant, window: Duration) -> bool {
        if self
            .asked
            .get(&ip)
            .is_some_and(|&t| now.saturating_duration_since(t) < AGAIN)
        {
            return false;
        }
        // Full of addresses asked for within AGAIN (only should the pace
        // be raised): the oldest go first, and if none has had its
        // minute, nothing is asked for and no share of the pace is spent.
        if self.asked.len() >= MOST {
            self.asked.retain(|_, t| now.saturating_duration_since(*t) < AGAIN);
            if self.asked.len() >= MOST {
                return false;
            }
        }
        if !self.pace.take(now, window, AT_ONCE) {
            return false;
        }
        // At most AT_ONCE a window within AGAIN are left, 2,400; gone
        // through at most 40 times a second.
        self.asked.retain(|_, t| now.saturating_duration_since(*t) < AGAIN);
        self.asked.insert(ip, now);
        true
    }
}

/// A raw ICMPv6 socket that sends without blocking and takes in nothing:
/// every ICMPv6 message the machine receives would otherwise be copied to
/// it.
fn open() -> io::Result<Socket> {
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    socket.set_nonblocking(true)?;
    // A set bit blocks its type: all are set.
    let block_all = [u32::MAX; 8];
    // SAFETY: ICMPV6_FILTER reads a `struct icmp6_filter` (eight u32), its
    // length given.
    let set = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_ICMPV6,
            ICMPV6_FILTER,
            block_all.as_ptr().cast(),
            std::mem::size_of_val(&block_all) as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(100);

    fn lan(host: u16) -> Ipv6Addr {
        Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, host)
    }

    #[test]
    fn an_address_is_asked_for_once_each_again() {
        let mut s = Solicit::default();
        let now = Instant::now();
        assert!(s.due(lan(1), now, WINDOW));
        assert!(!s.due(lan(1), now + WINDOW, WINDOW));
        // Still unresolved when it asks again 5 s later: it did not
        // answer, and is not asked for again.
        assert!(!s.due(lan(1), now + Duration::from_secs(5), WINDOW));
        assert!(!s.due(lan(1), now + AGAIN - WINDOW, WINDOW));
        assert!(s.due(lan(1), now + AGAIN, WINDOW));
    }

    /// The tester's flood, scaled: forged addresses asking in turn, 2,000
    /// queries a second, and a device's new address asking once a
    /// second. The forged ones are asked for once each (400 over 40 a
    /// second: 10 s), then the pace goes to the new address. With the
    /// forged ones due again after 5 s, as before, it never got it.
    #[test]
    fn a_forgers_fixed_addresses_are_spent_and_a_new_address_gets_the_pace() {
        const FORGED: u16 = 400;
        let device = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x7e57);
        let mut s = Solicit::default();
        let start = Instant::now();
        let step = Duration::from_micros(500);
        let mut first = None;
        for n in 0..60_000u32 {
            let now = start + step * n;
            s.due(lan(0x1000 + (n % u32::from(FORGED)) as u16), now, WINDOW);
            // Once a second, a quarter into a window (after the forgers'
            // first queries in it).
            if n % 2_000 == 50 && s.due(device, now, WINDOW) {
                first = Some(now - start);
                break;
            }
        }
        let first = first.expect("the new address was never asked for");
        let spent = Duration::from_secs(u64::from(FORGED) / 40);
        assert!(first <= spent + Duration::from_secs(2), "asked for after {first:?}");
    }

    #[test]
    fn remembered_addresses_are_bounded() {
        let mut s = Solicit::default();
        let start = Instant::now();
        // A pace far above 40 a second: MOST still bounds the memory.
        for i in 0..20_000u32 {
            let now = start + Duration::from_millis(u64::from(i));
            let ip = Ipv6Addr::from(0x2001_0db8_0001_0000_0000_0000_0000_0000u128 + u128::from(i));
            s.due(ip, now, Duration::from_micros(1));
        }
        assert!(s.asked.len() <= MOST, "{} remembered", s.asked.len());
    }

    /// With [`MOST`] addresses remembered, none of them a minute old, a
    /// new address is not asked for, and the window's share of the pace
    /// is left for when there is room again.
    #[test]
    fn a_full_memory_spends_none_of_the_pace() {
        let mut s = Solicit::default();
        let now = Instant::now();
        let host = |i: usize| Ipv6Addr::from(0x2001_0db8_0001_0000_0000_0000_0001_0000u128 + i as u128);
        s.asked = (0..MOST).map(|i| (host(i), now)).collect();
        for i in 0..AT_ONCE as usize {
            assert!(!s.due(lan(1 + i as u16), now, WINDOW));
        }
        s.asked.clear();
        assert!(s.due(lan(100), now, WINDOW), "the window's pace was spent on nothing");
    }

    #[test]
    fn all_addresses_together_are_asked_for_at_most_at_once_a_window() {
        let mut s = Solicit::default();
        let now = Instant::now();
        let all: Vec<Ipv6Addr> = (1..=50).map(lan).collect();
        let first = all.iter().filter(|&&a| s.due(a, now, WINDOW)).count();
        assert_eq!(first, AT_ONCE as usize);
        // The next window takes the next ones, not the same again.
        let later = now + WINDOW;
        let second: Vec<Ipv6Addr> = all.iter().copied().filter(|&a| s.due(a, later, WINDOW)).collect();
        assert_eq!(second, all[AT_ONCE as usize..2 * AT_ONCE as usize]);
    }

    #[test]
    fn addresses_asked_for_are_remembered_for_each_only() {
        let mut s = Solicit::default();
        let start = Instant::now();
        // A forger's many addresses, asked as fast as the pace allows.
        for i in 0..10_000u16 {
            let now = start + WINDOW * u32::from(i / 2);
            s.due(lan(i), now, WINDOW);
        }
        let most = AT_ONCE as usize * (AGAIN.as_millis() / WINDOW.as_millis()) as usize;
        assert!(s.asked.len() <= most, "{} remembered", s.asked.len());
    }

    #[test]
    fn link_local_addresses_are_never_asked_for() {
        let mut s = Solicit::default();
        s.ask("fe80::1".parse().unwrap(), Instant::now(), WINDOW);
        assert!(s.asked.is_empty());
        assert!(s.socket.is_none(), "nothing opened");
    }
}
