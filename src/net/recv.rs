//! Receiving one datagram together with what TPROXY knows about it.

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrIn, SockaddrIn6, SockaddrStorage, recvmsg,
};
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// What came with a datagram besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramMeta {
    /// Payload length in the buffer.
    pub len: usize,
    /// Who sent it.
    pub peer: SocketAddr,
    /// Where it was going before TPROXY diverted it; `None` when it was sent
    /// to the listener directly.
    pub orig_dst: Option<SocketAddr>,
    /// IPv4 TOS or IPv6 traffic class (DSCP + ECN), when reported.
    pub tos: Option<u8>,
    /// The datagram was larger than the buffer and was cut.
    pub truncated: bool,
}

/// Room for every control message a listener asks for.
pub fn cmsg_buffer() -> Vec<u8> {
    nix::cmsg_space!(libc::sockaddr_in6, libc::c_int, libc::c_int)
}

/// Reads one datagram without blocking (`WouldBlock` when none is queued).
pub fn recv_with_meta(fd: RawFd, buf: &mut [u8], cmsg: &mut [u8]) -> io::Result<DatagramMeta> {
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(cmsg), MsgFlags::MSG_DONTWAIT)?;
    let peer = msg
        .address
        .as_ref()
        .and_then(storage_to_std)
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    let mut meta = DatagramMeta {
        len: msg.bytes,
        peer,
        orig_dst: None,
        tos: None,
        truncated: msg.flags.contains(MsgFlags::MSG_TRUNC),
    };
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(sin) => {
                meta.orig_dst = Some(SockaddrIn::from(sin).into());
            }
            ControlMessageOwned::Ipv6OrigDstAddr(sin6) => {
                meta.orig_dst = Some(SockaddrIn6::from(sin6).into());
            }
            ControlMessageOwned::Ipv4Tos(tos) => meta.tos = Some(tos),
            ControlMessageOwned::Ipv6TClass(tc) => meta.tos = u8::try_from(tc).ok(),
            _ => {}
        }
    }
    Ok(meta)
}

fn storage_to_std(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some((*v4).into());
    }
    s.as_sockaddr_in6().map(|v6| (*v6).into())
}
