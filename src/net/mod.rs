//! Linux socket glue: every `setsockopt`, control message and raw packet
//! tproxyd needs lives below this module, so the relay and DNS code above it
//! deal only in addresses and payloads.

pub mod accept;
pub mod known_devices;
pub mod link_addr;
pub mod neigh;
pub mod on_link;
pub mod pace;
pub mod poll;
pub mod raw;
pub mod recv;
pub mod rtnetlink_dump;
pub mod send;
pub mod sockets;
pub mod solicit;
pub mod spin;
pub mod unresolved;

use std::io;

/// True for the errors a non-blocking socket returns when it has nothing to
/// give (or no room to take) right now.
pub fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Sends or receives of one message tried again after an error an ICMP
/// message may have left pending (see [`pending_icmp_error`]): more than
/// one, since a thread preempted between a failed try and the next lets
/// another such error land (a forged spray does that under load).
pub const ICMP_RETRIES: u32 = 3;

/// True for the errors an ICMP error message leaves pending on a socket
/// (`sk_err`, with `IP_RECVERR` on an unconnected one) about an *earlier*
/// datagram: the socket's next send or receive fails with it once and
/// clears it, having done nothing. Port unreachable is `ECONNREFUSED`; the
/// other unreachable codes, time exceeded, parameter problems and "too big"
/// map to these. A send or receive failing so is worth once more: the
/// error was not about this datagram, and anyone on the path (or off it,
/// forging the ICMP message at a port every server sees) can raise it.
/// A real failure of the same kind repeats on the second try.
pub fn pending_icmp_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNREFUSED
                | libc::EHOSTUNREACH
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::ENOPROTOOPT
                | libc::EOPNOTSUPP
                | libc::EMSGSIZE
                | libc::EACCES
                | libc::EPROTO
        )
    )
}
