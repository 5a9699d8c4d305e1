//! Receiving datagrams in batches, with what TPROXY knows about each.
//!
//! One `recvmmsg(2)` fills up to [`BATCH`] slots, so a busy socket costs one
//! system call per burst instead of one per datagram. Each slot carries its
//! sender, its original destination (`IP(V6)_ORIGDSTADDR`) and its TOS /
//! traffic class. This is the only place that touches `mmsghdr` and
//! control-message memory directly.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, RawFd};
use std::ptr;
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::would_block;

/// Datagrams read per system call.
pub const BATCH: usize = 64;
/// Room per datagram: the largest UDP payload (65,535 − 8) fits.
pub const SLOT: usize = 65_536;
/// Room for ORIGDSTADDR (a sockaddr_in6), TOS/TCLASS, UDP_GRO and a
/// receive timestamp, with headers.
const CONTROL: usize = 192;

/// What came with a datagram besides its payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatagramMeta {
    /// Payload length.
    pub len: usize,
    /// Who sent it.
    pub peer: SocketAddr,
    /// Where it was going before TPROXY diverted it; `None` on sockets that
    /// do not ask, or for datagrams that were not diverted.
    pub orig_dst: Option<SocketAddr>,
    /// IPv4 TOS or IPv6 traffic class (DSCP + ECN), when reported.
    pub tos: Option<u8>,
    /// The datagram was larger than its slot and was cut.
    pub truncated: bool,
    /// On a socket with `UDP_GRO`: the kernel coalesced datagrams of this
    /// size (the last may be shorter) into this one; see [`segments`].
    pub segment: Option<u16>,
    /// On a socket with `SO_TIMESTAMPNS`: when the kernel received it, as
    /// time since the epoch (`CLOCK_REALTIME`).
    pub received: Option<Duration>,
}

/// The datagrams a received payload holds: itself, or, when the kernel
/// coalesced several (`segment`, from `UDP_GRO`), each of them in order.
/// An empty datagram is one (empty) datagram.
pub fn segments(payload: &[u8], segment: Option<u16>) -> impl Iterator<Item = &[u8]> {
    let size = segment.map_or(0, usize::from);
    let whole = size == 0 || payload.len() <= size;
    let (one, many) = if whole {
        (Some(payload), None)
    } else {
        (None, Some(payload.chunks(size)))
    };
    one.into_iter().chain(many.into_iter().flatten())
}

/// Datagram `k` of those [`segments`] yields, in O(1).
pub fn segment(payload: &[u8], segment: Option<u16>, k: usize) -> Option<&[u8]> {
    let size = segment.map_or(0, usize::from);
    if size == 0 || payload.len() <= size {
        return (k == 0).then_some(payload);
    }
    let start = k.checked_mul(size)?;
    (start < payload.len()).then(|| &payload[start..payload.len().min(start + size)])
}

/// Control-message space, aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct Control([u8; CONTROL]);

/// Buffers for one `recvmmsg` of up to `capacity` datagrams.
pub struct RecvBatch {
    capacity: usize,
    bufs: Box<[u8]>,
    names: Box<[libc::sockaddr_storage]>,
    controls: Box<[Control]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    metas: Vec<DatagramMeta>,
}

// SAFETY: the raw pointers inside `iovs`/`hdrs` only ever point into this
// struct's own boxed buffers, which move with it; nothing is shared.
unsafe impl Send for RecvBatch {}

impl std::fmt::Debug for RecvBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBatch")
            .field("capacity", &self.capacity)
            .field("received", &self.metas.len())
            .finish()
    }
}

impl RecvBatch {
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        // SAFETY: all-zero is a valid value for these plain C structs.
        let (name, iov, hdr) = unsafe {
            (
                zeroed::<libc::sockaddr_storage>(),
                zeroed::<libc::iovec>(),
                zeroed::<libc::mmsghdr>(),
            )
        };
        let mut batch = RecvBatch {
            capacity,
            // Virtual memory: only the pages datagrams land in become resident.
            bufs: vec![0u8; capacity * SLOT].into_boxed_slice(),
            names: vec![name; capacity].into_boxed_slice(),
            controls: vec![Control([0; CONTROL]); capacity].into_boxed_slice(),
            iovs: vec![iov; capacity].into_boxed_slice(),
            hdrs: vec![hdr; capacity].into_boxed_slice(),
            metas: Vec::with_capacity(capacity),
        };
        // The pointers point into the boxes, which do not move when the
        // batch does: set once here.
        for i in 0..capacity {
            batch.iovs[i] = libc::iovec {
                iov_base: batch.bufs[i * SLOT..].as_mut_ptr().cast(),
                iov_len: SLOT,
            };
            let h = &mut batch.hdrs[i].msg_hdr;
            h.msg_name = ptr::from_mut(&mut batch.names[i]).cast();
            h.msg_iov = ptr::from_mut(&mut batch.iovs[i]);
            h.msg_iovlen = 1;
            h.msg_control = batch.controls[i].0.as_mut_ptr().cast();
            batch.reset(i);
        }
        batch
    }

    /// Restores the lengths and flags of slot `i`'s header, which the
    /// kernel rewrites when it fills the slot (and only then).
    fn reset(&mut self, i: usize) {
        let h = &mut self.hdrs[i];
        h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        h.msg_hdr.msg_controllen = CONTROL as _;
        h.msg_hdr.msg_flags = 0;
        h.msg_len = 0;
    }

    /// Reads up to the batch's capacity without blocking; `WouldBlock` when
    /// nothing is queued. Returns how many datagrams were read.
    pub fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        self.recv_at_most(fd, self.capacity)
    }

    /// Like [`RecvBatch::recv`], reading at most `max` datagrams (a reader
    /// that bounds its work in bytes asks for fewer when they are big).
    pub fn recv_at_most(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        self.metas.clear();
        self.recv_more(fd, max.max(1))
    }

    /// Reads up to `max` more datagrams into the slots after those already
    /// held, keeping them: a reader of many sockets gathers replies from
    /// all of them before sending any (see [`RecvBatch::clear`]). Returns
    /// how many were added; `WouldBlock` when none were queued. Asking for
    /// more than [`RecvBatch::room`] reads only that many.
    pub fn recv_more(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let start = self.metas.len();
        let count = max.min(self.room());
        if count == 0 {
            return Ok(0);
        }
        // Every header is ready: set up once in `new`, and the lengths the
        // kernel rewrote are restored below, slot by slot as the datagrams
        // are read. Resetting all `count` headers before each call cost
        // about 3,200 instructions per call, a third of a 64-byte relay's
        // user-space work at a few datagrams per wake-up.
        // SAFETY: every header from `start` on points at live buffers of
        // the sizes given, owned by `self` and not otherwise borrowed during
        // the call.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs[start..].as_mut_ptr(),
                count as libc::c_uint,
                // glibc declares the flags `int`, musl `unsigned int`.
                libc::MSG_DONTWAIT as _,
                ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // Nothing was filled; the first slot is restored all the same.
            self.reset(start);
            return Err(e);
        }
        let n = n as usize;
        for i in start..start + n {
            let h = &self.hdrs[i];
            // UDP over IP always has a source; port 0 marks "unknown" for
            // callers to drop rather than shifting every later slot.
            let peer = sockaddr_to_std(&self.names[i]).unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            let mut meta = DatagramMeta {
                len: (h.msg_len as usize).min(SLOT),
                peer,
                orig_dst: None,
                tos: None,
                truncated: h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                segment: None,
                received: None,
            };
            read_control(&h.msg_hdr, &mut meta);
            self.metas.push(meta); // slot i holds meta i
            self.reset(i);
        }
        Ok(n)
    }

    /// Datagrams held.
    pub fn len(&self) -> usize {
        self.metas.len()
    }

    pub fn is_empty(&self) -> bool {
        self.metas.is_empty()
    }

    /// Slots still free for [`RecvBatch::recv_more`].
    pub fn room(&self) -> usize {
        self.capacity - self.metas.len()
    }

    /// Forgets every datagram held.
    pub fn clear(&mut self) {
        self.metas.clear();
    }

    /// Reads one batch from `socket` through tokio's readiness.
    ///
    /// A batch shorter than the capacity means the queue ran empty (with
    /// `MSG_DONTWAIT`, `recvmmsg` stops early only there), so readiness is
    /// cleared as an `EAGAIN` would clear it: the caller does not spend one
    /// more system call per wake-up just to hear `EAGAIN`. On a socket
    /// carrying a few datagrams per wake-up (a pool socket serving game
    /// flows) that was half of all receive calls. What is cleared is the
    /// readiness seen *before* the call; a datagram arriving during it
    /// raises a new one, so no wake-up is lost.
    pub fn read(&mut self, socket: &UdpSocket) -> io::Result<Batch> {
        self.read_at_most(socket, self.capacity)
    }

    /// Like [`RecvBatch::read`], reading at most `max` datagrams.
    pub fn read_at_most(&mut self, socket: &UdpSocket, max: usize) -> io::Result<Batch> {
        self.metas.clear();
        self.read_more(socket, max.clamp(1, self.capacity))
    }

    /// Like [`RecvBatch::read_at_most`], but keeping the datagrams already
    /// held and adding up to `max` (at most [`RecvBatch::room`]) after them.
    pub fn read_more(&mut self, socket: &UdpSocket, max: usize) -> io::Result<Batch> {
        let fd = socket.as_raw_fd();
        let asked = max.min(self.room());
        if asked == 0 {
            return Ok(Batch {
                count: 0,
                drained: false,
            });
        }
        let mut count = 0;
        let result = socket.try_io(Interest::READABLE, || {
            count = self.recv_more(fd, asked)?;
            if count < asked {
                Err(io::Error::from(io::ErrorKind::WouldBlock))
            } else {
                Ok(())
            }
        });
        match result {
            Ok(()) => Ok(Batch { count, drained: false }),
            Err(e) if would_block(&e) => Ok(Batch { count, drained: true }),
            Err(e) => Err(e),
        }
    }

    /// Datagram `i` held (of the last [`RecvBatch::recv`], or gathered by
    /// [`RecvBatch::recv_more`] since the last [`RecvBatch::clear`]).
    pub fn get(&self, i: usize) -> Option<(&DatagramMeta, &[u8])> {
        let meta = self.metas.get(i)?;
        let start = i * SLOT;
        Some((meta, self.bufs.get(start..start + meta.len)?))
    }
}

/// What one [`RecvBatch::read`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batch {
    /// Datagrams now in the batch.
    pub count: usize,
    /// The socket's queue was empty: wait for readiness before reading on.
    pub drained: bool,
}

/// Walks the control messages of one received header.
fn read_control(hdr: &libc::msghdr, meta: &mut DatagramMeta) {
    // SAFETY: `hdr` was filled by the kernel; CMSG_* stay within
    // msg_control[..msg_controllen], and each payload is read unaligned.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(hdr);
        while !c.is_null() {
            let data = libc::CMSG_DATA(c);
            match ((*c).cmsg_level, (*c).cmsg_type) {
                (libc::IPPROTO_IP, libc::IP_ORIGDSTADDR) => {
                    let sin: libc::sockaddr_in = ptr::read_unaligned(data.cast());
                    meta.orig_dst = Some(v4(&sin));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_ORIGDSTADDR) => {
                    let sin6: libc::sockaddr_in6 = ptr::read_unaligned(data.cast());
                    meta.orig_dst = Some(v6(&sin6));
                }
                (libc::IPPROTO_IP, libc::IP_TOS) => meta.tos = Some(*data),
                (libc::SOL_UDP, libc::UDP_GRO) => {
                    let size: libc::c_int = ptr::read_unaligned(data.cast());
                    meta.segment = u16::try_from(size).ok().filter(|&s| s > 0);
                }
                (libc::SOL_SOCKET, libc::SCM_TIMESTAMPNS) => {
                    let ts: libc::timespec = ptr::read_unaligned(data.cast());
                    meta.received = u64::try_from(ts.tv_sec)
                        .ok()
                        .zip(u32::try_from(ts.tv_nsec).ok())
                        .map(|(s, ns)| Duration::new(s, ns));
                }
                (libc::IPPROTO_IPV6, libc::IPV6_TCLASS) => {
                    let tc: libc::c_int = ptr::read_unaligned(data.cast());
                    meta.tos = u8::try_from(tc).ok();
                }
                _ => {}
            }
            c = libc::CMSG_NXTHDR(hdr, c);
        }
    }
}

fn v4(sin: &libc::sockaddr_in) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
        u16::from_be(sin.sin_port),
    ))
}

fn v6(sin6: &libc::sockaddr_in6) -> SocketAddr {
    SocketAddr::V6(SocketAddrV6::new(
        Ipv6Addr::from(sin6.sin6_addr.s6_addr),
        u16::from_be(sin6.sin6_port),
        sin6.sin6_flowinfo,
        sin6.sin6_scope_id,
    ))
}

fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    // SAFETY: the family field says which layout the storage holds.
    unsafe {
        match i32::from(ss.ss_family) {
            libc::AF_INET => Some(v4(&*ptr::from_ref(ss).cast::<libc::sockaddr_in>())),
            libc::AF_INET6 => Some(v6(&*ptr::from_ref(ss).cast::<libc::sockaddr_in6>())),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_a_burst_in_one_call_with_sources_and_tos() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        nix::sys::socket::setsockopt(&rx, nix::sys::socket::sockopt::IpRecvTos, &true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        nix::sys::socket::setsockopt(&tx, nix::sys::socket::sockopt::Ipv4Tos, &0xb8).unwrap();
        for i in 0..5u8 {
            tx.send_to(&vec![i; 100 + usize::from(i)], rx.local_addr().unwrap())
                .unwrap();
        }
        tx.send_to(&vec![9; 65_000], rx.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(4);
        assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 4);
        for i in 0..4u8 {
            let (meta, payload) = batch.get(usize::from(i)).unwrap();
            assert_eq!(payload, vec![i; 100 + usize::from(i)].as_slice());
            assert_eq!(meta.peer, tx.local_addr().unwrap());
            assert_eq!(meta.tos, Some(0xb8));
            assert!(meta.orig_dst.is_none() && !meta.truncated);
        }
        assert!(batch.get(4).is_none());
        // The rest, including a 65,000-byte datagram, on the next call.
        assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 2);
        assert_eq!(batch.get(1).unwrap().1.len(), 65_000);
        let e = batch.recv(rx.as_raw_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn coalesced_datagrams_split_back_into_what_was_sent() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        nix::sys::socket::setsockopt(&rx, nix::sys::socket::sockopt::UdpGroSegment, &true).unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        // One GSO train (five of 100 bytes and a shorter last), then a
        // mixed-size burst of single datagrams.
        let train: Vec<Vec<u8>> = (0..6u8).map(|i| vec![i; if i == 5 { 40 } else { 100 }]).collect();
        let run: Vec<&[u8]> = train.iter().map(Vec::as_slice).collect();
        assert_eq!(
            crate::net::send::send_run(tx.as_raw_fd(), &run, Some(to), None, false).unwrap(),
            6
        );
        let burst: [&[u8]; 4] = [&[7; 200], &[8; 10], &[9; 200], &[]];
        for p in burst {
            tx.send_to(p, to).unwrap();
        }
        let mut batch = RecvBatch::new(16);
        let n = batch.recv(rx.as_raw_fd()).unwrap();
        let mut got: Vec<Vec<u8>> = Vec::new();
        let mut coalesced = 0;
        for i in 0..n {
            let (meta, payload) = batch.get(i).unwrap();
            coalesced += usize::from(meta.segment.is_some() && payload.len() > 100);
            got.extend(segments(payload, meta.segment).map(<[u8]>::to_vec));
        }
        let want: Vec<Vec<u8>> = train.iter().cloned().chain(burst.iter().map(|p| p.to_vec())).collect();
        assert_eq!(got, want);
        // Picked one by one, the same.
        let mut picked: Vec<Vec<u8>> = Vec::new();
        for i in 0..n {
            let (meta, payload) = batch.get(i).unwrap();
            picked.extend(
                (0..)
                    .map_while(|k| segment(payload, meta.segment, k))
                    .map(<[u8]>::to_vec),
            );
        }
        assert_eq!(picked, want);
        // The train came as one (the kernel kept the GSO buffer whole for
        // a socket that takes coalesced datagrams).
        assert_eq!((n, coalesced), (5, 1));
    }

    #[test]
    fn slots_used_before_read_whole_datagrams_and_all_their_control_messages() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = rx.local_addr().unwrap();
        // First with no control messages asked for and a short datagram:
        // the kernel writes a control length of 0 and a short name back.
        tx.send_to(&[1; 10], to).unwrap();
        let mut batch = RecvBatch::new(3);
        assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 1);
        assert_eq!(batch.get(0).unwrap().0.tos, None);
        // A batch that moves keeps working (its pointers are to the heap).
        let mut batch = Box::new(batch);
        // Then with TOS asked for, from another address family's worth of
        // name room, and bigger datagrams in the same slots.
        nix::sys::socket::setsockopt(&rx, nix::sys::socket::sockopt::IpRecvTos, &true).unwrap();
        nix::sys::socket::setsockopt(&tx, nix::sys::socket::sockopt::Ipv4Tos, &0x20).unwrap();
        for i in 0..3u8 {
            tx.send_to(&vec![i; 1_000 * (usize::from(i) + 1)], to).unwrap();
        }
        for round in 0..2 {
            let n = batch.recv(rx.as_raw_fd()).unwrap();
            assert_eq!(n, if round == 0 { 3 } else { 1 });
            for i in 0..n {
                let (meta, payload) = batch.get(i).unwrap();
                assert_eq!(meta.tos, Some(0x20), "slot {i}, round {round}");
                assert_eq!(meta.peer, tx.local_addr().unwrap());
                assert!(!meta.truncated);
                if round == 0 {
                    assert_eq!(payload.len(), 1_000 * (i + 1));
                } else {
                    assert_eq!(payload, &[7; 2_000][..]);
                }
            }
            tx.send_to(&[7; 2_000], to).unwrap();
        }
    }

    #[test]
    fn reads_ipv6_sources() {
        let Ok(rx) = UdpSocket::bind("[::1]:0") else {
            return; // no IPv6 loopback on this host
        };
        let tx = UdpSocket::bind("[::1]:0").unwrap();
        tx.send_to(b"six", rx.local_addr().unwrap()).unwrap();
        let mut batch = RecvBatch::new(2);
        assert_eq!(batch.recv(rx.as_raw_fd()).unwrap(), 1);
        let (meta, payload) = batch.get(0).unwrap();
        assert_eq!((meta.peer, payload), (tx.local_addr().unwrap(), &b"six"[..]));
    }
}
