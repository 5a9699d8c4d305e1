//! Sending one datagram with its own TOS / traffic class.
//!
//! VoIP marks its packets EF (DSCP 46) and ECN-capable transports set ECT;
//! a transparent proxy must carry both bits through. They are set per
//! datagram with an `IP_TOS` / `IPV6_TCLASS` control message, because one
//! socket carries datagrams with different marks.

use nix::sys::socket::{ControlMessage, MsgFlags, SockaddrStorage, sendmsg};
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::os::fd::RawFd;

/// Sends `payload` on `fd` (to `to`, or to the connected peer), with TOS
/// byte `tos` when it is set and non-zero. `v6` is the socket's family.
pub fn send_with_tos(
    fd: RawFd,
    payload: &[u8],
    to: Option<SocketAddr>,
    tos: Option<u8>,
    v6: bool,
) -> io::Result<usize> {
    let iov = [IoSlice::new(payload)];
    let addr = to.map(SockaddrStorage::from);
    let flags = MsgFlags::MSG_DONTWAIT;
    let sent = match (tos.filter(|&t| t != 0), v6) {
        (None, _) => sendmsg(fd, &iov, &[], flags, addr.as_ref()),
        (Some(t), false) => sendmsg(
            fd,
            &iov,
            &[ControlMessage::Ipv4Tos(&t)],
            flags,
            addr.as_ref(),
        ),
        (Some(t), true) => {
            let tclass = i32::from(t);
            sendmsg(
                fd,
                &iov,
                &[ControlMessage::Ipv6TClass(&tclass)],
                flags,
                addr.as_ref(),
            )
        }
    };
    Ok(sent?)
}
