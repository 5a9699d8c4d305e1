//! Dumps of the kernel's rtnetlink tables (neighbours, routes): the
//! request, and the walk over the messages of the answer.
//!
//! Why by hand: two dumps, read only while a reply socket fills
//! ([`super::unresolved`]), with a few fields each; the plumbing is short,
//! and [`super::neigh`] and [`super::on_link`] read their own messages.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

/// How long the kernel gets to answer a dump (it answers at once; this
/// only bounds a kernel gone wrong, on a worker thread).
const DUMP_TIMEOUT: Duration = Duration::from_millis(500);
/// Receive buffer for one `recv` of a dump: the kernel fills each with as
/// many entries as fit.
const RECV_BUFFER: usize = 64 * 1024;

pub(super) const NLMSG_HEADER: usize = 16;
const NLMSG_ERROR: u16 = 2;
pub(super) const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("rtnetlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel refused a table dump: {}", io::Error::from_raw_os_error(*.0))]
    Refused(i32),
    #[error("malformed table dump")]
    Malformed,
}

/// Asks the kernel for a dump of `kind` (every family; `header` bytes of
/// the request's family header, zeroed) and hands each message of the
/// answer to `each`.
pub fn dump_with(kind: u16, header: usize, each: &mut impl FnMut(u16, &[u8])) -> Result<(), DumpError> {
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    socket2::SockRef::from(&sock).set_read_timeout(Some(DUMP_TIMEOUT))?;
    let seq = 1;
    sock.send(&request(kind, header, seq), 0)?;
    let mut buf = Vec::with_capacity(RECV_BUFFER);
    loop {
        buf.clear();
        match sock.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
        if parse(&buf, seq, each)? {
            return Ok(());
        }
    }
}

/// A dump request of `kind` for every family.
fn request(kind: u16, header: usize, seq: u32) -> Vec<u8> {
    let len = NLMSG_HEADER + header;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.resize(len, 0); // AF_UNSPEC, no interface
    m
}

pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

pub const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Hands each message of one `recv` of a dump to `each` (its type and
/// payload); true once the dump's end (`NLMSG_DONE`) was read. Messages
/// of another sequence number are skipped.
pub(super) fn parse(mut buf: &[u8], seq: u32, each: &mut impl FnMut(u16, &[u8])) -> Result<bool, DumpError> {
    while buf.len() >= NLMSG_HEADER {
        let len = u32_at(buf, 0).ok_or(DumpError::Malformed)? as usize;
        let kind = u16_at(buf, 4).ok_or(DumpError::Malformed)?;
        let their_seq = u32_at(buf, 8).ok_or(DumpError::Malformed)?;
        if len < NLMSG_HEADER || len > buf.len() {
            return Err(DumpError::Malformed);
        }
        let payload = &buf[NLMSG_HEADER..len];
        if their_seq == seq {
            match kind {
                NLMSG_DONE => return Ok(true),
                NLMSG_ERROR => {
                    let errno = u32_at(payload, 0).ok_or(DumpError::Malformed)? as i32;
                    return Err(DumpError::Refused(-errno));
                }
                _ => each(kind, payload),
            }
        }
        buf = buf.get(align4(len)..).unwrap_or(&[]);
    }
    Ok(false)
}

/// The attributes of one message (after its family header): each a type
/// and a value, in order. An attribute cut short yields `Err(Cut)` and
/// ends the walk; fewer than four bytes left end it quietly (padding).
pub fn attributes(attrs: &[u8]) -> Attributes<'_> {
    Attributes { rest: attrs }
}

/// An attribute whose length runs past its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut;

/// See [`attributes`].
#[derive(Debug)]
pub struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Result<(u16, &'a [u8]), Cut>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.rest;
        let (len, kind) = (usize::from(u16_at(rest, 0)?), u16_at(rest, 2)?);
        if len < 4 || len > rest.len() {
            self.rest = &[];
            return Some(Err(Cut));
        }
        self.rest = rest.get(align4(len)..).unwrap_or(&[]);
        Some(Ok((kind, &rest[4..len])))
    }
}

/// An address attribute's value (4 or 16 bytes).
pub fn address(value: &[u8]) -> Option<IpAddr> {
    match value.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(value).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(value).ok()?))),
        _ => None,
    }
}
