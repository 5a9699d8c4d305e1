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
//! What this costs: outside such a flood nothing changes. A socket's
//! buffer size is read once ([`HalfBuffer`]); the look at what it holds is
//! one `ioctl` per batch of answers, and one more each time the batch has
//! spent the room that look found ([`Room`]): half a default buffer takes
//! some 30 full-size datagrams, or a hundred small answers.

use std::net::IpAddr;
use std::os::fd::RawFd;

use super::neigh::NeighbourTable;
pub use super::neigh::Sendable;

/// Holds back answers to unresolved neighbours on a pressed socket; one
/// per listener (its senders share the reading of the table).
#[derive(Debug, Default)]
pub struct UnresolvedGate {
    table: NeighbourTable,
}

impl UnresolvedGate {
    /// What may be sent to `client` on a socket whose buffer is half taken
    /// ([`Room::pressed`]), the first message carrying `payload` bytes:
    /// anything when its neighbour is resolved or it is reached through a
    /// router; that one message when it is a device the kernel resolved
    /// before (at a slow pace, by the message's [`charge`]); else nothing.
    pub fn admits(&self, client: IpAddr, payload: usize) -> Sendable {
        self.table.may_send(client, charge(payload))
    }

    /// Whether anything to `client` leaves at once (the pace of answers to
    /// devices the kernel has dropped is not spent).
    pub fn leaves(&self, client: IpAddr) -> bool {
        self.table.may_send(client, usize::MAX) == Sendable::Leaves
    }

    /// Told of each batch sent on a socket not half taken: reads the
    /// table now and then, so that the devices are known before a flood.
    pub fn not_pressed(&self) {
        self.table.look_now_and_then();
    }
}

/// Half of the smallest send buffer the kernel allows (`SOCK_MIN_SNDBUF`,
/// about 4.5 KiB): less queued than this is never past half.
const MIN_HALF: usize = 2_048;

/// Half of a socket's send buffer: past it, answers to neighbours the
/// kernel has not resolved are held back. Read once per socket: tproxyd
/// never changes a socket's buffer size after making it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HalfBuffer(usize);

impl HalfBuffer {
    /// `fd`'s (`SO_SNDBUF`). When it cannot be read, a half no queue
    /// reaches: the socket is then used as before.
    pub fn of(fd: RawFd) -> HalfBuffer {
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
        match usize::try_from(size) {
            Ok(size) if got == 0 && size > 0 => HalfBuffer((size / 2).max(MIN_HALF)),
            _ => HalfBuffer(usize::MAX),
        }
    }

    /// Looks at what `fd` still holds of datagrams not yet gone
    /// (`SIOCOUTQ`): the room left before half. One system call. When it
    /// cannot be read, room without end: the socket is used as before.
    pub fn room(self, fd: RawFd) -> Room {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer.
        if unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) } != 0 {
            return Room::ENDLESS;
        }
        let queued = usize::try_from(queued).unwrap_or(0);
        Room {
            left: self.0.saturating_sub(queued),
        }
    }
}

/// What may still be sent on a socket before its buffer is half taken: the
/// room found by the last look ([`HalfBuffer::room`]), less the [`charge`]
/// of every message sent since.
///
/// Why not one look per batch: a batch of answers handed over at once (the
/// relay gathers up to 320 hijacked answers before sending) went out
/// whole when its look found the buffer just under half, and the answers
/// to forged sources among it filled the buffer to the brim. Every answer
/// after, to real devices too, failed with `EAGAIN` until the kernel gave
/// up on the forged neighbours, three seconds later (lab: 0 of 20
/// answered, `tests/dns_forged_neighbours.rs`). Looking again whenever the
/// room is spent keeps what passes half to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    left: usize,
}

impl Room {
    /// Room without end: for a socket whose buffer cannot be looked at,
    /// used as before.
    pub const ENDLESS: Room = Room { left: usize::MAX };

    /// The buffer was past half when looked at: only answers that leave at
    /// once may go ([`UnresolvedGate::admits`]).
    pub fn pressed(self) -> bool {
        self.left == 0
    }

    /// Counts a message (a datagram, or a GSO train: one buffer) carrying
    /// `payload` bytes as sent; false, and nothing counted, when it may
    /// not fit: the messages before it are to be sent and the buffer
    /// looked at again.
    pub fn take(&mut self, payload: usize) -> bool {
        let charge = charge(payload);
        if charge > self.left {
            return false;
        }
        self.left -= charge;
        true
    }

    /// Counts a message as sent whether it fits or not: for the first one
    /// after a look that found the buffer under half, which goes however
    /// big it is (a GSO train may be larger than half of the buffer).
    pub fn take_anyway(&mut self, payload: usize) {
        self.left = self.left.saturating_sub(charge(payload)).max(1);
    }
}

/// An upper bound of what the kernel charges a send buffer for a message
/// carrying `payload` bytes (its `truesize`): the data with its headers
/// and bookkeeping (`skb_shared_info`), which the allocator rounds up to
/// a size of its own (at most twice the asked), and the `sk_buff` itself.
/// Measured (`SIOCOUTQ`) on UDP sockets whose datagram waits for a
/// neighbour that never answers, every payload from 1 to 3,099 bytes and
/// every 97th up to 65,000, IPv4 and IPv6, at MTU 1,500 and 1,280: at
/// most 0.94 of this (832 bytes up to some 130 bytes of payload, 1,280 up
/// to some 640, 2,304 up to 1,472; fragments of a bigger one are charged
/// each). It was `2 × payload + 640`, which 400 to 600 of those sizes
/// passed (832 for a 1-byte datagram, 1,280 for 200 bytes). Below an MTU
/// of 1,280 (IPv4 only) a big datagram's fragments are charged up to 1.15
/// times this (MTU 576); the other half of the buffer takes that.
pub const fn charge(payload: usize) -> usize {
    2 * payload + 1280
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn an_idle_socket_has_half_its_buffer_for_room_and_a_bad_descriptor_no_end() {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        let half = HalfBuffer::of(sock.as_raw_fd());
        let room = half.room(sock.as_raw_fd());
        assert!(!room.pressed());
        assert_eq!(room, Room { left: half.0 });
        assert_eq!(HalfBuffer::of(-1), HalfBuffer(usize::MAX));
        assert!(!HalfBuffer(4_096).room(-1).pressed());
    }

    #[test]
    fn the_room_is_spent_by_charges_and_one_message_may_pass_it_after_a_look() {
        let mut room = Room {
            left: charge(100) * 2 + 10,
        };
        assert!(room.take(100));
        assert!(room.take(100));
        assert!(!room.take(100), "a third does not fit");
        assert_eq!(room.left, 10, "and a refusal takes nothing");
        room.take_anyway(60_000);
        assert!(
            !room.pressed(),
            "spent room is not a look that found the buffer past half"
        );
        assert!(!room.take(1));
    }
}
