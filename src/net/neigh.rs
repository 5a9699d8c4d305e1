//! Which LAN addresses the kernel has resolved to a link-layer address,
//! read from its neighbour (ARP / NDP) table over rtnetlink.
//!
//! A datagram to a LAN address the kernel has not resolved waits in that
//! neighbour's queue (up to `unres_qlen_bytes`, 208 KiB by default, per
//! address) while the kernel asks, three seconds by default, and all that
//! time it still counts against the sending socket's send buffer (208 KiB
//! by default too). A device that forges its source address makes us
//! answer addresses nobody holds: a few dozen of them filled a DNS
//! listener's whole buffer, and every answer to a real device failed with
//! `EAGAIN` until the kernel gave up on the forged ones (see
//! [`super::unresolved`], which decides with this table what may still be
//! sent while a buffer fills).
//!
//! The kernel announces resolved and failed neighbours, but not one that
//! is being resolved, so the table is read whole (a dump) rather than
//! followed; only while a send buffer fills, and at most every
//! [`REFRESH`] (the routes, read with it, at most every
//! [`ROUTES_REFRESH`]). The DNS limits read it too, to tell the IPv6
//! devices of the LAN apart by their link-layer addresses
//! ([`crate::dns::clients`]), and have the kernel ask for an on-link IPv6
//! address it does not know ([`super::solicit`]).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::known_devices::{KnownDevices, prefix_64};
use super::link_addr::LinkAddr;
use super::on_link::Prefix;
use super::rtnetlink_dump::{DumpError, address, attributes, dump_with, u16_at, u32_at};
use super::solicit::Solicit;

/// How long a reading of the table is used. A device that has just come
/// (its first query) was resolved when it asked for our address, long
/// before; a forged address becomes `INCOMPLETE` at our first answer and
/// stays so for seconds. A tenth of a second between readings bounds how
/// many answers a new forged address gets while the buffer is full.
pub const REFRESH: Duration = Duration::from_millis(100);
/// How long a reading of the routes is used. They change with the
/// configuration, not with a flood, and their dump grows with the tables:
/// a gateway with 10,000 policy routes spent some 3 ms of kernel time on
/// each (docs/BENCHMARKS.md, "what the table reads cost"), which every
/// [`REFRESH`] would be 3 % of a core per pressed listener. A route added
/// while a buffer is pressed is seen within this.
pub const ROUTES_REFRESH: Duration = Duration::from_secs(5);
/// How often the table is read while no send buffer is pressed: a
/// device's entry lives on for a minute or more after its last datagram.
pub const IDLE_LOOK: Duration = Duration::from_secs(10);
/// Unpressed batches between two readings of the clock.
const IDLE_CALLS: u32 = 64;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
/// `struct ndmsg`: family, two pads, ifindex, state, flags, type.
const NDMSG: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
/// Neighbour states whose datagrams leave at once (`NUD_VALID`):
/// reachable, stale, delay, probe, noarp, permanent.
const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// The resolved addresses of a reading, with their link-layer addresses.
/// Hashed with foldhash, seeded per map, as the relay's tables are: every
/// DNS miss from an IPv6 client looks its address up here, and the
/// standard hasher (SipHash) was about 220 of the 570 instructions the
/// key then cost such a miss (callgrind, docs/BENCHMARKS.md). The map
/// holds what the kernel resolved; the address looked up is the client's.
type Resolved = HashMap<IpAddr, Option<LinkAddr>, foldhash::fast::RandomState>;

/// The resolved addresses as last read, shared by the senders of one
/// listener.
#[derive(Debug, Default)]
pub struct NeighbourTable {
    reading: Mutex<Reading>,
    /// Calls of [`NeighbourTable::look_now_and_then`], to read the clock
    /// in one of [`IDLE_CALLS`].
    idle_calls: AtomicU32,
}

#[derive(Debug, Default)]
struct Reading {
    taken: Option<Instant>,
    /// The resolved addresses, with their link-layer addresses (none for
    /// an entry that has none, such as a `NOARP` one).
    resolved: Resolved,
    /// Prefixes the kernel sends to directly ([`super::on_link`]): an
    /// address outside them goes to a router and never waits on its own
    /// neighbour.
    on_link: Vec<Prefix>,
    /// When `on_link` was read ([`ROUTES_REFRESH`]).
    routes_taken: Option<Instant>,
    /// The last dump failed: everything is let through (as before this
    /// table existed) until the next try, [`REFRESH`] later.
    failed: bool,
    /// Addresses seen resolved in earlier readings: devices the kernel
    /// may since have dropped from its table.
    known: KnownDevices,
    /// On-link IPv6 addresses the kernel is made to ask for
    /// ([`NeighbourTable::device_link`]).
    asking: Solicit,
    /// The /64s holding a device the kernel resolved with a link-layer
    /// address ([`KnownDevices::device_prefixes`]), as of the last reading:
    /// only addresses in them are asked for.
    device_prefixes: HashSet<u64>,
}

/// What may be sent to an address while a send buffer fills
/// ([`NeighbourTable::may_send`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sendable {
    /// Anything: it leaves at once (or the tables cannot be read).
    Leaves,
    /// The one message asked about, and nothing more of what is queued
    /// for the address now: it waits for the kernel to resolve it.
    Once,
    /// Nothing.
    Held,
}

impl NeighbourTable {
    /// What may be sent to `ip` while a send buffer fills, by a reading at
    /// most [`REFRESH`] old (taken now if older). Whatever leaves at once:
    /// the kernel has resolved it, or it is off-link, reached through a
    /// router. One message charging `charge` bytes of the buffer to a
    /// device the kernel once resolved and has since dropped, at the pace
    /// [`KnownDevices`] keeps, so that the kernel asks for it again. When
    /// the tables cannot be read, anything.
    pub fn may_send(&self, ip: IpAddr, charge: usize) -> Sendable {
        let mut reading = self.reading.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if reading.taken.is_none_or(|t| now.duration_since(t) >= REFRESH) {
            reading.refresh(now);
        }
        let ip = unmapped(ip);
        if reading.failed || reading.resolved.contains_key(&ip) || !reading.on_link(ip) {
            Sendable::Leaves
        } else if reading.known.lets_through(ip, now, charge) {
            Sendable::Once
        } else {
            Sendable::Held
        }
    }

    /// Reads the table now and then ([`IDLE_LOOK`]) while no buffer is
    /// pressed, so that the devices the kernel has resolved are known
    /// before a flood starts: one the kernel drops early in the flood,
    /// before any buffer is past half, is still remembered. Called with
    /// every unpressed batch; the clock is read one call in
    /// [`IDLE_CALLS`].
    pub fn look_now_and_then(&self) {
        if self.idle_calls.fetch_add(1, Ordering::Relaxed) % IDLE_CALLS != 0 {
            return;
        }
        let mut reading = self.reading.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if reading.taken.is_none_or(|t| now.duration_since(t) >= IDLE_LOOK) {
            reading.refresh(now);
        }
    }

    /// The link-layer address of `ip` if it is a device of the LAN: an
    /// address of a directly connected prefix that the kernel has
    /// resolved, in a reading at most [`IDLE_LOOK`] old, or once within
    /// [`super::known_devices::REMEMBER`]. An on-link address the reading
    /// does not know has the table read again if it is [`REFRESH`] old,
    /// so that a device that has just come counts at its first query; a
    /// flood of forged sources reads it at that pace, as a pressed buffer
    /// does. An on-link IPv6 address still unknown, in a /64 that holds a
    /// known device, is sent one echo request now and then
    /// ([`super::solicit`]): during a flood nothing else may go to it, and
    /// a device's new address would never be resolved. `None` when the
    /// tables cannot be read.
    pub fn device_link(&self, ip: IpAddr) -> Option<LinkAddr> {
        let ip = unmapped(ip);
        let mut reading = self.reading.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        // The look-up that decides whether the reading is due is the
        // answer when it is not: a device's reading is nearly always past
        // REFRESH (it is read again every IDLE_LOOK), and looking it up a
        // second time cost an IPv6 miss about 420 of the 990 instructions
        // its key took (callgrind, docs/BENCHMARKS.md).
        let age = reading.taken.map(|t| now.saturating_duration_since(t));
        let current = age.is_some_and(|age| age < IDLE_LOOK);
        let mut link = if current { reading.device_link(ip, now) } else { None };
        if !current || (link.is_none() && age.is_some_and(|age| age >= REFRESH) && reading.on_link(ip)) {
            reading.refresh(now);
            link = reading.device_link(ip, now);
        }
        // Only in a /64 that holds a known device: that is where a
        // device's new address is, and a forger then cannot have echoes
        // sent to another link's prefix or, through a default route of
        // another table (a tunnel's), to any host at all.
        if link.is_none()
            && let IpAddr::V6(v6) = ip
            && !reading.failed
            && reading.on_link(ip)
            && reading.device_prefixes.contains(&prefix_64(v6))
        {
            reading.asking.ask(v6, now, REFRESH);
        }
        link
    }
}

impl Reading {
    /// Whether `ip` is within a prefix the kernel sends to directly.
    fn on_link(&self, ip: IpAddr) -> bool {
        self.on_link.iter().any(|p| p.contains(ip))
    }

    /// [`NeighbourTable::device_link`] by this reading.
    fn device_link(&self, ip: IpAddr, now: Instant) -> Option<LinkAddr> {
        if self.failed || !self.on_link(ip) {
            return None;
        }
        match self.resolved.get(&ip) {
            Some(&link) => link,
            None => self.known.link_of(ip, now),
        }
    }

    /// Reads the neighbours, and the routes if [`ROUTES_REFRESH`] is up.
    fn refresh(&mut self, now: Instant) {
        let reading = self;
        reading.taken = Some(now);
        let routes_due = reading
            .routes_taken
            .is_none_or(|t| now.duration_since(t) >= ROUTES_REFRESH);
        let read = dump().and_then(|resolved| {
            let on_link = if routes_due {
                Some(super::on_link::read()?)
            } else {
                None
            };
            Ok((resolved, on_link))
        });
        match read {
            Ok((resolved, on_link)) => {
                reading.known.saw(resolved.iter().map(|(&ip, &link)| (ip, link)), now);
                reading.device_prefixes = reading.known.device_prefixes(now).collect();
                reading.resolved = resolved;
                if let Some(on_link) = on_link {
                    reading.on_link = on_link;
                    reading.routes_taken = Some(now);
                }
                reading.failed = false;
            }
            Err(e) => {
                if !reading.failed {
                    tracing::warn!(error = %e, "cannot read the neighbour or route tables; answers to unresolved addresses are not held back");
                }
                reading.failed = true;
                // Both tables are read again at the next try.
                reading.routes_taken = None;
            }
        }
    }
}

/// IPv4-mapped IPv6 addresses (a dual-stack socket's IPv4 clients) as the
/// IPv4 addresses the ARP table holds.
fn unmapped(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Reads the kernel's neighbour table (both families): the addresses in
/// a resolved state, and their link-layer addresses.
fn dump() -> Result<Resolved, DumpError> {
    let mut resolved = Resolved::default();
    dump_with(RTM_GETNEIGH, NDMSG, &mut |kind, payload| {
        if kind == RTM_NEWNEIGH
            && let Some((ip, link)) = resolved_entry(payload)
        {
            resolved.insert(ip, link);
        }
    })?;
    Ok(resolved)
}

/// The destination of one neighbour entry (`ndmsg` and its attributes),
/// if it is in a resolved state, and its link-layer address if it has
/// one.
fn resolved_entry(payload: &[u8]) -> Option<(IpAddr, Option<LinkAddr>)> {
    let state = u16_at(payload, 8)?;
    if state & NUD_VALID == 0 {
        return None;
    }
    let ifindex = i32::from_ne_bytes(u32_at(payload, 4)?.to_ne_bytes());
    let (mut dst, mut link) = (None, None);
    for attr in attributes(payload.get(NDMSG..)?) {
        let (kind, value) = attr.ok()?;
        match kind {
            NDA_DST => dst = address(value),
            NDA_LLADDR => link = LinkAddr::from_bytes(ifindex, value),
            _ => {}
        }
    }
    Some((dst?, link))
}

#[cfg(test)]
mod tests {
    use super::super::rtnetlink_dump::{NLMSG_DONE, NLMSG_HEADER, align4, parse};
    use super::*;
    use std::net::Ipv6Addr;

    /// One `RTM_NEWNEIGH` message as the kernel writes it, without a
    /// link-layer address.
    fn entry(seq: u32, state: u16, dst: &[u8]) -> Vec<u8> {
        linked_entry(seq, state, dst, &[])
    }

    /// [`entry`] with `link` as its link-layer address (none if empty).
    fn linked_entry(seq: u32, state: u16, dst: &[u8], link: &[u8]) -> Vec<u8> {
        let attr_len = 4 + dst.len();
        let link_len = if link.is_empty() { 0 } else { align4(4 + link.len()) };
        let len = NLMSG_HEADER + NDMSG + align4(attr_len) + link_len;
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&RTM_NEWNEIGH.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes()); // NLM_F_MULTI
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        let family: u8 = if dst.len() == 4 { 2 } else { 10 };
        m.extend_from_slice(&[family, 0, 0, 0]);
        m.extend_from_slice(&3i32.to_ne_bytes()); // ifindex
        m.extend_from_slice(&state.to_ne_bytes());
        m.extend_from_slice(&[0, 1]); // flags, type
        m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        m.extend_from_slice(&NDA_DST.to_ne_bytes());
        m.extend_from_slice(dst);
        m.resize(NLMSG_HEADER + NDMSG + align4(attr_len), 0);
        if !link.is_empty() {
            m.extend_from_slice(&((4 + link.len()) as u16).to_ne_bytes());
            m.extend_from_slice(&NDA_LLADDR.to_ne_bytes());
            m.extend_from_slice(link);
        }
        m.resize(len, 0);
        m
    }

    fn done(seq: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&20u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_DONE.to_ne_bytes());
        m.extend_from_slice(&0x2u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m
    }

    #[test]
    fn only_resolved_entries_count_and_the_end_is_seen() {
        const REACHABLE: u16 = 0x02;
        const STALE: u16 = 0x04;
        const INCOMPLETE: u16 = 0x01;
        const FAILED: u16 = 0x20;
        let v6 = "2001:db8::10".parse::<Ipv6Addr>().unwrap().octets();
        let mut buf = Vec::new();
        let mac = [2, 0, 0, 0, 0, 10];
        buf.extend(entry(7, REACHABLE, &[192, 0, 2, 10]));
        buf.extend(linked_entry(7, INCOMPLETE, &[192, 0, 2, 100], &mac));
        buf.extend(entry(7, FAILED, &[192, 0, 2, 101]));
        buf.extend(linked_entry(7, STALE, &v6, &mac));
        // Another request's message: not ours.
        buf.extend(entry(8, REACHABLE, &[192, 0, 2, 11]));
        let mut resolved = HashMap::new();
        let mut keep = |kind: u16, payload: &[u8]| {
            if let Some((ip, link)) = resolved_entry(payload).filter(|_| kind == RTM_NEWNEIGH) {
                resolved.insert(ip, link);
            }
        };
        assert!(!parse(&buf, 7, &mut keep).unwrap(), "no end yet");
        assert!(parse(&done(7), 7, &mut keep).unwrap());
        let expected: HashMap<IpAddr, Option<LinkAddr>> = [
            ("192.0.2.10".parse().unwrap(), None),
            (IpAddr::from(v6), LinkAddr::from_bytes(3, &mac)),
        ]
        .into_iter()
        .collect();
        assert_eq!(resolved, expected);
    }

    #[test]
    fn a_cut_message_is_malformed_not_a_panic() {
        let whole = linked_entry(7, 0x02, &[192, 0, 2, 10], &[2, 0, 0, 0, 0, 10]);
        for cut in 1..whole.len() {
            let r = parse(&whole[..cut], 7, &mut |_, p| {
                resolved_entry(p);
            });
            assert!(matches!(r, Ok(false) | Err(DumpError::Malformed)), "cut at {cut}");
        }
    }

    #[test]
    fn an_ipv4_mapped_client_is_looked_up_as_ipv4() {
        let mapped: IpAddr = "::ffff:192.0.2.10".parse().unwrap();
        assert_eq!(unmapped(mapped), "192.0.2.10".parse::<IpAddr>().unwrap());
    }

    /// The real table of this machine reads without error (a dump needs
    /// no privilege).
    #[test]
    fn the_kernels_table_reads() {
        dump().unwrap();
    }
}
