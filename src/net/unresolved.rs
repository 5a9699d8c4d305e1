//! Answers to LAN addresses the kernel has not resolved, held back while
//! a reply socket's send buffer fills, so that they cannot take the room
//! the answers to real devices need.
//!
//! A datagram to an unresolved neighbour keeps its share of the socket's
//! send buffer while it waits in the neighbour's queue, seconds long (see
//! [`super::neigh`]). One such neighbour may hold as much as a whole
//! default buffer, and a device forging source addresses makes as many as
//! it likes, so no buffer size is enough: the answers themselves must be
//! told apart. While the buffer is less than half taken every answer goes
//! as before. Past half, only answers to neighbours the kernel has
//! resolved go; the others are dropped and counted (`drops_total`,
//! `reason="neighbour_unresolved"`). Whatever the forged addresses hold,
//! the other half stays for the real devices, whose datagrams leave the
//! buffer as soon as the interface takes them.
//!
//! A client behind a router is never in the neighbour table, but its
//! answers go to the router and leave at once: such clients are told apart
//! by the routes ([`super::on_link`]) and answered as before.
//!
//! A device the kernel resolved once and has since dropped from its table
//! (as it does with idle entries when forged ones fill it) is still
//! answered, at a slow pace, so that the kernel asks for it again
//! ([`super::known_devices`]).
//!
//! What this costs: outside such a flood nothing changes, and the check is
//! one `ioctl` per batch of answers (and a `getsockopt` when something is
//! still queued).

use std::net::IpAddr;
use std::os::fd::RawFd;

use super::neigh::NeighbourTable;

/// Holds back answers to unresolved neighbours on a pressed socket; one
/// per listener (its senders share the reading of the table).
#[derive(Debug, Default)]
pub struct UnresolvedGate {
    table: NeighbourTable,
}

impl UnresolvedGate {
    /// Whether an answer to `client` may be sent on a socket [`pressed`]:
    /// its neighbour is resolved, it is reached through a router, or it is
    /// a device the kernel resolved before (at a slow pace).
    pub fn admits(&self, client: IpAddr) -> bool {
        self.table.may_send(client)
    }

    /// Told of each batch sent on a socket not [`pressed`]: reads the
    /// table now and then, so that the devices are known before a flood.
    pub fn not_pressed(&self) {
        self.table.look_now_and_then();
    }
}

/// Half of the smallest send buffer the kernel allows (`SOCK_MIN_SNDBUF`,
/// about 4.5 KiB): less queued than this is never past half, and the
/// buffer's size need not be asked (one system call less per batch).
const MIN_HALF: libc::c_int = 2_048;

/// Whether `fd`'s send buffer is at least half taken by datagrams not yet
/// gone (`SIOCOUTQ` against `SO_SNDBUF`). False when either cannot be
/// read: the socket is then used as before.
pub fn pressed(fd: RawFd) -> bool {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 || queued < MIN_HALF {
        // Nearly always: the datagrams sent before have left.
        return false;
    }
    let mut size: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_SNDBUF writes one int, its length given.
    let got = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&raw mut size).cast(),
            &raw mut len,
        )
    };
    got == 0 && size > 0 && queued >= size / 2
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn an_idle_socket_is_not_pressed_and_a_bad_descriptor_neither() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        assert!(!pressed(sock.as_raw_fd()));
        assert!(!pressed(-1));
    }
}
