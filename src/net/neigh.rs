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
//! [`REFRESH`].

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How long a reading of the table is used. A device that has just come
/// (its first query) was resolved when it asked for our address, long
/// before; a forged address becomes `INCOMPLETE` at our first answer and
/// stays so for seconds. A tenth of a second between readings bounds how
/// many answers a new forged address gets while the buffer is full.
pub const REFRESH: Duration = Duration::from_millis(100);
/// How long the kernel gets to answer a dump (it answers at once; this
/// only bounds a kernel gone wrong, on a worker thread).
const DUMP_TIMEOUT: Duration = Duration::from_millis(500);
/// Receive buffer for one `recv` of a dump: the kernel fills each with as
/// many entries as fit.
const RECV_BUFFER: usize = 64 * 1024;

const NLMSG_HEADER: usize = 16;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
/// `struct ndmsg`: family, two pads, ifindex, state, flags, type.
const NDMSG: usize = 12;
const NDA_DST: u16 = 1;
/// Neighbour states whose datagrams leave at once (`NUD_VALID`):
/// reachable, stale, delay, probe, noarp, permanent.
const NUD_VALID: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

#[derive(Debug, thiserror::Error)]
pub enum NeighError {
    #[error("rtnetlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel refused the neighbour dump: {}", io::Error::from_raw_os_error(*.0))]
    Refused(i32),
    #[error("malformed neighbour dump")]
    Malformed,
}

/// The resolved addresses as last read, shared by the senders of one
/// listener.
#[derive(Debug, Default)]
pub struct NeighbourTable {
    reading: Mutex<Reading>,
}

#[derive(Debug, Default)]
struct Reading {
    taken: Option<Instant>,
    resolved: HashSet<IpAddr>,
    /// The last dump failed: everything is let through (as before this
    /// table existed) until the next try, [`REFRESH`] later.
    failed: bool,
}

impl NeighbourTable {
    /// Whether `ip` is a neighbour the kernel has resolved, by a reading
    /// at most [`REFRESH`] old (taken now if older). Addresses off the
    /// LAN (behind a router) are never in the table: not resolved. When
    /// the table cannot be read, every address is.
    pub fn resolved(&self, ip: IpAddr) -> bool {
        let mut reading = self.reading.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if reading.taken.is_none_or(|t| now.duration_since(t) >= REFRESH) {
            reading.taken = Some(now);
            match dump() {
                Ok(resolved) => {
                    reading.resolved = resolved;
                    reading.failed = false;
                }
                Err(e) => {
                    if !reading.failed {
                        tracing::warn!(error = %e, "cannot read the neighbour table; answers to unresolved addresses are not held back");
                    }
                    reading.failed = true;
                }
            }
        }
        reading.failed || reading.resolved.contains(&unmapped(ip))
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
/// a resolved state.
fn dump() -> Result<HashSet<IpAddr>, NeighError> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    socket2::SockRef::from(&sock).set_read_timeout(Some(DUMP_TIMEOUT))?;
    let seq = 1;
    sock.send(&request(seq), 0)?;
    let mut resolved = HashSet::new();
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    loop {
        buf.clear();
        match sock.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        if parse(&buf, seq, &mut resolved)? {
            return Ok(resolved);
        }
    }
}

/// An `RTM_GETNEIGH` dump request for every family.
fn request(seq: u32) -> Vec<u8> {
    let len = NLMSG_HEADER + NDMSG;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&RTM_GETNEIGH.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.resize(len, 0); // ndmsg: AF_UNSPEC, no interface
    m
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Adds the resolved addresses of one `recv` of a dump to `resolved`;
/// true once the dump's end (`NLMSG_DONE`) was read. Messages of another
/// sequence number are skipped.
fn parse(mut buf: &[u8], seq: u32, resolved: &mut HashSet<IpAddr>) -> Result<bool, NeighError> {
    while buf.len() >= NLMSG_HEADER {
        let len = u32_at(buf, 0).ok_or(NeighError::Malformed)? as usize;
        let kind = u16_at(buf, 4).ok_or(NeighError::Malformed)?;
        let their_seq = u32_at(buf, 8).ok_or(NeighError::Malformed)?;
        if len < NLMSG_HEADER || len > buf.len() {
            return Err(NeighError::Malformed);
        }
        let payload = &buf[NLMSG_HEADER..len];
        if their_seq == seq {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = u32_at(payload, 0).ok_or(NeighError::Malformed)? as i32;
                    return Err(NeighError::Refused(-errno));
                }
                RTM_NEWNEIGH => {
                    if let Some(ip) = resolved_entry(payload) {
                        resolved.insert(ip);
                    }
                }
                _ => {}
            }
        }
        buf = buf.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(false)
}

/// The destination of one neighbour entry (`ndmsg` and its attributes),
/// if it is in a resolved state.
fn resolved_entry(payload: &[u8]) -> Option<IpAddr> {
    let state = u16_at(payload, 8)?;
    if state & NUD_VALID == 0 {
        return None;
    }
    let mut attrs = payload.get(NDMSG..)?;
    while attrs.len() >= 4 {
        let len = usize::from(u16_at(attrs, 0)?);
        let kind = u16_at(attrs, 2)?;
        if len < 4 || len > attrs.len() {
            return None;
        }
        if kind == NDA_DST {
            let value = &attrs[4..len];
            return match value.len() {
                4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(value).ok()?))),
                16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(value).ok()?))),
                _ => None,
            };
        }
        attrs = attrs.get(align4(len)..).unwrap_or(&[]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One `RTM_NEWNEIGH` message as the kernel writes it.
    fn entry(seq: u32, state: u16, dst: &[u8]) -> Vec<u8> {
        let attr_len = 4 + dst.len();
        let len = NLMSG_HEADER + NDMSG + align4(attr_len);
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
        buf.extend(entry(7, REACHABLE, &[192, 0, 2, 10]));
        buf.extend(entry(7, INCOMPLETE, &[192, 0, 2, 100]));
        buf.extend(entry(7, FAILED, &[192, 0, 2, 101]));
        buf.extend(entry(7, STALE, &v6));
        // Another request's message: not ours.
        buf.extend(entry(8, REACHABLE, &[192, 0, 2, 11]));
        let mut resolved = HashSet::new();
        assert!(!parse(&buf, 7, &mut resolved).unwrap(), "no end yet");
        let expected: HashSet<IpAddr> = ["192.0.2.10", "2001:db8::10"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(resolved, expected);
        assert!(parse(&done(7), 7, &mut resolved).unwrap());
    }

    #[test]
    fn a_cut_message_is_malformed_not_a_panic() {
        let whole = entry(7, 0x02, &[192, 0, 2, 10]);
        for cut in 1..whole.len() {
            let mut resolved = HashSet::new();
            let r = parse(&whole[..cut], 7, &mut resolved);
            assert!(matches!(r, Ok(false) | Err(NeighError::Malformed)), "cut at {cut}");
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
