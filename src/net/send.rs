//! Sending datagrams with their own TOS / traffic class, in as few system
//! calls as the kernel allows.
//!
//! VoIP marks its packets EF (DSCP 46) and ECN-capable transports set ECT;
//! a transparent proxy must carry both bits through. They are set per
//! datagram with an `IP_TOS` / `IPV6_TCLASS` control message, because one
//! socket carries datagrams with different marks.
//!
//! Two ways of saving system calls: a *run* of datagrams to one place goes
//! out as one `UDP_SEGMENT` (GSO) message, and many messages to different
//! places from one socket go out in one `sendmmsg(2)` (replies to many
//! clients from the same server address share a reply socket). The
//! headers, addresses and control messages live in a reusable
//! [`SendScratch`], so sending allocates nothing.

use std::cell::RefCell;
use std::io;
use std::mem::{size_of, zeroed};
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use super::{ICMP_RETRIES, would_block};

/// Set once the kernel has refused UDP segmentation offload outright.
static GSO_UNAVAILABLE: AtomicBool = AtomicBool::new(false);
/// GSO trains refused in a row with "not supported" errors; a train sent
/// resets it. A kernel without offload refuses every train, but the same
/// errors also come from ICMP errors left pending on the socket (codes 2
/// and 5, which anyone can forge at a pool socket's port): one refusal,
/// even after the retry, must not turn offload off for good.
static GSO_STRIKES: AtomicU32 = AtomicU32::new(0);
/// Refusals in a row that mean the kernel has no offload.
const GSO_STRIKES_OUT: u32 = 3;
/// Most segments per GSO send (the kernel's UDP_MAX_SEGMENTS floor).
pub const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes per GSO send: one super-datagram must stay under 64 KiB.
const GSO_MAX_BYTES: usize = 60_000;
/// Messages per `sendmmsg` call (the kernel takes at most `UIO_MAXIOV`).
const MESSAGES_PER_CALL: usize = 256;
/// Room for a UDP_SEGMENT and an IP_TOS / IPV6_TCLASS message.
const SEND_CONTROL: usize = 64;

/// One message: datagrams to one place with one TOS. More than one
/// segment is a GSO train: all the same size, the last possibly shorter
/// (as [`gso_chunks`] cuts them).
#[derive(Debug, Clone, Copy)]
pub struct Message<'p> {
    pub to: Option<SocketAddr>,
    pub tos: Option<u8>,
    pub segments: &'p [&'p [u8]],
}

/// What a batch of sends did, in datagrams.
#[derive(Debug, Default)]
pub struct Sent {
    pub datagrams: usize,
    pub bytes: u64,
    /// Refused for a full send buffer (`EAGAIN`, `ENOBUFS`).
    pub full: usize,
    /// Failed otherwise.
    pub failed: usize,
    /// Not tried: to a neighbour the kernel has not resolved, while the
    /// socket's buffer was past half (see [`super::unresolved`]).
    pub unresolved: usize,
    /// The first failure, of either kind.
    pub first_error: Option<io::Error>,
}

impl Sent {
    fn fail(&mut self, e: io::Error, datagrams: usize) {
        if would_block(&e) || e.raw_os_error() == Some(libc::ENOBUFS) {
            self.full += datagrams;
        } else {
            self.failed += datagrams;
        }
        self.first_error.get_or_insert(e);
    }

    fn ok(&mut self, segments: &[&[u8]]) {
        self.datagrams += segments.len();
        self.bytes += segments.iter().map(|p| p.len() as u64).sum::<u64>();
    }
}

/// Control-message space for one outgoing message, aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
struct SendControl([u8; SEND_CONTROL]);

/// Headers, addresses, vectors and control messages for `sendmmsg`.
pub struct SendScratch {
    hdrs: Vec<libc::mmsghdr>,
    names: Vec<libc::sockaddr_storage>,
    controls: Vec<SendControl>,
    iovs: Vec<libc::iovec>,
}

// SAFETY: the raw pointers inside only ever point into the scratch's own
// vectors or at payloads borrowed for the length of one call; between
// calls they are dead values that are rewritten before use.
unsafe impl Send for SendScratch {}

impl std::fmt::Debug for SendScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendScratch").finish_non_exhaustive()
    }
}

impl Default for SendScratch {
    fn default() -> Self {
        // SAFETY: all-zero is a valid value for these plain C structs.
        let (hdr, name, iov) = unsafe {
            (
                zeroed::<libc::mmsghdr>(),
                zeroed::<libc::sockaddr_storage>(),
                zeroed::<libc::iovec>(),
            )
        };
        SendScratch {
            hdrs: vec![hdr; MESSAGES_PER_CALL],
            names: vec![name; MESSAGES_PER_CALL],
            controls: vec![SendControl([0; SEND_CONTROL]); MESSAGES_PER_CALL],
            iovs: vec![iov; MESSAGES_PER_CALL * GSO_MAX_SEGMENTS],
        }
    }
}

thread_local! {
    /// Each thread's scratch for [`send_run`].
    static SCRATCH: RefCell<SendScratch> = RefCell::new(SendScratch::default());
}

/// Writes `addr` into `ss`; returns its length.
fn write_sockaddr(addr: SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is larger than and aligned for
            // sockaddr_in.
            let sin = unsafe { &mut *ptr::from_mut(ss).cast::<libc::sockaddr_in>() };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr = libc::in_addr {
                s_addr: u32::from(*a.ip()).to_be(),
            };
            sin.sin_zero = [0; 8];
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6 = unsafe { &mut *ptr::from_mut(ss).cast::<libc::sockaddr_in6>() };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr = libc::in6_addr {
                s6_addr: a.ip().octets(),
            };
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Appends one control message to `buf` at `*used`.
///
/// # Safety
/// `buf` must have room for `CMSG_SPACE(size_of::<T>())` more bytes.
unsafe fn put_cmsg<T: Copy>(buf: &mut SendControl, used: &mut usize, level: i32, kind: i32, value: T) {
    // SAFETY: the caller guarantees room; the header and data are written
    // unaligned-safe within the 8-aligned buffer.
    unsafe {
        let c = buf.0.as_mut_ptr().add(*used).cast::<libc::cmsghdr>();
        (*c).cmsg_level = level;
        (*c).cmsg_type = kind;
        (*c).cmsg_len = libc::CMSG_LEN(size_of::<T>() as u32) as _;
        ptr::write_unaligned(libc::CMSG_DATA(c).cast::<T>(), value);
        *used += libc::CMSG_SPACE(size_of::<T>() as u32) as usize;
    }
}

/// Fills `hdr` for `m`, with its address in `name`, control messages in
/// `control` and one vector per segment in `iovs` (exactly as many).
fn fill(
    hdr: &mut libc::msghdr,
    name: &mut libc::sockaddr_storage,
    control: &mut SendControl,
    iovs: &mut [libc::iovec],
    m: &Message<'_>,
    v6: bool,
) {
    for (iov, p) in iovs.iter_mut().zip(m.segments) {
        *iov = libc::iovec {
            iov_base: p.as_ptr().cast_mut().cast(),
            iov_len: p.len(),
        };
    }
    let mut used = 0;
    if m.segments.len() > 1 {
        // gso_chunks keeps segments ≤ the MTU, well under u16::MAX.
        let size = u16::try_from(m.segments[0].len()).unwrap_or(u16::MAX);
        // SAFETY: two small messages fit SEND_CONTROL.
        unsafe { put_cmsg(control, &mut used, libc::SOL_UDP, libc::UDP_SEGMENT, size) };
    }
    if let Some(t) = m.tos.filter(|&t| t != 0) {
        let (level, kind) = if v6 {
            (libc::IPPROTO_IPV6, libc::IPV6_TCLASS)
        } else {
            (libc::IPPROTO_IP, libc::IP_TOS)
        };
        // SAFETY: as above; both options take an int.
        unsafe { put_cmsg(control, &mut used, level, kind, libc::c_int::from(t)) };
    }
    hdr.msg_iov = iovs.as_mut_ptr();
    hdr.msg_iovlen = m.segments.len() as _;
    hdr.msg_control = if used > 0 {
        control.0.as_mut_ptr().cast()
    } else {
        ptr::null_mut()
    };
    hdr.msg_controllen = used as _;
    hdr.msg_flags = 0;
    match m.to {
        Some(to) => {
            hdr.msg_namelen = write_sockaddr(to, name);
            hdr.msg_name = ptr::from_mut(name).cast();
        }
        None => {
            hdr.msg_name = ptr::null_mut();
            hdr.msg_namelen = 0;
        }
    }
}

/// Errors after which a GSO train is worth sending datagram by datagram:
/// the kernel lacks GSO, or this train does not fit (a smaller MTU).
fn gso_refused(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP | libc::EINVAL | libc::EMSGSIZE | libc::EIO)
    )
}

/// Sends `bytes` on the connected `socket`, straight to the kernel (the
/// reactor may not have reported a new socket writable yet); how many ICMP
/// errors pending on it failed a try first, for the caller to count.
///
/// A connected socket keeps the last hard ICMP error about it pending
/// (port, protocol or host unreachable, prohibited, ...: forged at its
/// port by anyone who knows it and the peer, or real, about an earlier
/// datagram), and the next send fails with it once, having sent nothing
/// (see [`super::pending_icmp_error`]): tried again, up to
/// [`ICMP_RETRIES`] times, since a thread preempted between tries lets
/// another land. A real failure of the same kind repeats and is returned.
pub async fn send_connected(socket: &tokio::net::UdpSocket, bytes: &[u8]) -> io::Result<u64> {
    let mut cleared = 0;
    loop {
        let result = match socket2::SockRef::from(socket).send(bytes) {
            Err(e) if would_block(&e) => socket.send(bytes).await,
            other => other,
        };
        match result {
            Ok(_) => return Ok(cleared),
            Err(e) if super::pending_icmp_error(&e) && cleared < u64::from(ICMP_RETRIES) => cleared += 1,
            Err(e) => return Err(e),
        }
    }
}

/// As [`send_connected`], for a socket in the reactor for reading only
/// (`dns::upstream::ports::PoolSocket`): there is no writable event to wait
/// for, so a full buffer, which one small query on an idle socket does not
/// meet, is tried again after `retry`.
pub async fn send_connected_read_only(
    socket: &tokio::io::unix::AsyncFd<std::net::UdpSocket>,
    bytes: &[u8],
    retry: std::time::Duration,
) -> io::Result<u64> {
    let mut cleared = 0;
    while !try_send_connected(socket.get_ref(), bytes, &mut cleared)? {
        tokio::time::sleep(retry).await;
    }
    Ok(cleared)
}

/// One go at [`send_connected_read_only`]'s send, without waiting: `true`
/// once sent, `false` when the socket's buffer is full. Pending ICMP
/// errors are tried past as there, counted in `cleared` (at most
/// [`ICMP_RETRIES`] in all). A caller that sends from a buffer it cannot
/// keep across a wait (`dns::upstream::udp`'s query on the stack) tries
/// this first and keeps a copy only when it must wait.
pub fn try_send_connected(socket: &std::net::UdpSocket, bytes: &[u8], cleared: &mut u64) -> io::Result<bool> {
    loop {
        match socket.send(bytes) {
            Ok(_) => return Ok(true),
            Err(e) if would_block(&e) => return Ok(false),
            Err(e) if super::pending_icmp_error(&e) && *cleared < u64::from(ICMP_RETRIES) => *cleared += 1,
            Err(e) => return Err(e),
        }
    }
}

/// Sends every message on `fd` with as few `sendmmsg` calls as possible.
/// A message the kernel refuses is counted and skipped, and the rest still
/// go, unless `stop_at_error` (then sending stops there). A GSO train the
/// kernel cannot segment is sent again datagram by datagram.
pub fn send_messages(
    fd: RawFd,
    msgs: &[Message<'_>],
    v6: bool,
    scratch: &mut SendScratch,
    stop_at_error: bool,
) -> Sent {
    let mut sent = Sent::default();
    let mut next = 0;
    // The message last sent again after a refusal meant for an earlier one.
    let (mut retried, mut retries) = (usize::MAX, 0);
    while next < msgs.len() {
        // Fill as many headers as fit, then send them.
        let mut count = 0;
        let mut iov_at = 0;
        while next + count < msgs.len() && count < MESSAGES_PER_CALL {
            let m = &msgs[next + count];
            if m.segments.is_empty() || m.segments.len() > GSO_MAX_SEGMENTS {
                // Not cut by gso_chunks: nothing, or too many to send at once.
                break;
            }
            if iov_at + m.segments.len() > scratch.iovs.len() {
                break;
            }
            let k = m.segments.len();
            let SendScratch {
                hdrs,
                names,
                controls,
                iovs,
            } = &mut *scratch;
            hdrs[count].msg_len = 0;
            fill(
                &mut hdrs[count].msg_hdr,
                &mut names[count],
                &mut controls[count],
                &mut iovs[iov_at..iov_at + k],
                m,
                v6,
            );
            iov_at += k;
            count += 1;
        }
        if count == 0 {
            // An empty message is nothing to send; an oversized one goes
            // datagram by datagram.
            let m = &msgs[next];
            for p in m.segments {
                match send_one(fd, p, m.to, m.tos, v6) {
                    Ok(()) => sent.ok(&[p]),
                    Err(e) => sent.fail(e, 1),
                }
            }
            next += 1;
            continue;
        }
        // SAFETY: headers 0..count point at vectors, names and controls in
        // `scratch` and at payloads borrowed by `msgs`, all alive for the
        // call.
        let n = unsafe {
            libc::sendmmsg(
                fd,
                scratch.hdrs.as_mut_ptr(),
                count as libc::c_uint,
                libc::MSG_DONTWAIT as _,
            )
        };
        if n > 0 {
            for m in &msgs[next..next + n as usize] {
                sent.ok(m.segments);
            }
            if GSO_STRIKES.load(Ordering::Relaxed) != 0
                && msgs[next..next + n as usize].iter().any(|m| m.segments.len() > 1)
            {
                GSO_STRIKES.store(0, Ordering::Relaxed);
            }
            next += n as usize;
            continue;
        }
        // The first message failed (a later failure shows as a short count,
        // and the next call starts at it).
        let e = if n < 0 {
            io::Error::last_os_error()
        } else {
            io::Error::from(io::ErrorKind::WriteZero)
        };
        if retried != next {
            (retried, retries) = (next, 0);
        }
        if super::pending_icmp_error(&e) && retries < ICMP_RETRIES {
            // An ICMP error for an *earlier* datagram on this socket (of
            // any code, see `pending_icmp_error`) is reported on this
            // call, and nothing was sent: once more. (The error itself is
            // counted from the socket's error queue, by its reader.) Only
            // a failure that repeats is this message's own: then a GSO
            // train the kernel refuses is sent datagram by datagram below,
            // not on a forged "protocol unreachable" that would otherwise
            // turn segmentation offload off for good.
            retries += 1;
            continue;
        }
        let m = &msgs[next];
        next += 1;
        if m.segments.len() > 1 && gso_refused(&e) {
            if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP))
                && GSO_STRIKES.fetch_add(1, Ordering::Relaxed) + 1 >= GSO_STRIKES_OUT
                && !GSO_UNAVAILABLE.swap(true, Ordering::Relaxed)
            {
                tracing::info!("the kernel refuses UDP segmentation offload; sending datagrams one by one");
            }
            for p in m.segments {
                match send_one(fd, p, m.to, m.tos, v6) {
                    Ok(()) => sent.ok(&[p]),
                    Err(e) => {
                        sent.fail(e, 1);
                        if stop_at_error {
                            return sent;
                        }
                    }
                }
            }
            continue;
        }
        sent.fail(e, m.segments.len());
        if stop_at_error {
            return sent;
        }
    }
    sent
}

/// Sends one datagram with a `sendmsg` of its own (everything on the
/// stack).
fn send_one(fd: RawFd, payload: &[u8], to: Option<SocketAddr>, tos: Option<u8>, v6: bool) -> io::Result<()> {
    let segments = [payload];
    let m = Message {
        to,
        tos,
        segments: &segments,
    };
    // SAFETY: all-zero is valid for these C structs.
    let (mut hdr, mut name, mut iov) = unsafe {
        (
            zeroed::<libc::msghdr>(),
            zeroed::<libc::sockaddr_storage>(),
            [zeroed::<libc::iovec>(); 1],
        )
    };
    let mut control = SendControl([0; SEND_CONTROL]);
    fill(&mut hdr, &mut name, &mut control, &mut iov, &m, v6);
    // SAFETY: the header points at locals and at `payload`, alive here.
    let mut n = unsafe { libc::sendmsg(fd, &hdr, libc::MSG_DONTWAIT) };
    let mut retries = 0;
    while n < 0 && retries < ICMP_RETRIES && super::pending_icmp_error(&io::Error::last_os_error()) {
        // An error about an earlier datagram (see `send_messages`).
        retries += 1;
        // SAFETY: as above.
        n = unsafe { libc::sendmsg(fd, &hdr, libc::MSG_DONTWAIT) };
    }
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `payload` on `fd` (to `to`, or to the connected peer), with TOS
/// byte `tos` when it is set and non-zero. `v6` is the socket's family.
pub fn send_with_tos(
    fd: RawFd,
    payload: &[u8],
    to: Option<SocketAddr>,
    tos: Option<u8>,
    v6: bool,
) -> io::Result<usize> {
    send_one(fd, payload, to, tos, v6).map(|()| payload.len())
}

/// [`send_messages`] with this thread's scratch.
pub fn send_messages_here(fd: RawFd, msgs: &[Message<'_>], v6: bool, stop_at_error: bool) -> Sent {
    SCRATCH.with_borrow_mut(|scratch| send_messages(fd, msgs, v6, scratch, stop_at_error))
}

/// Sends a run of datagrams to the same place with the same TOS; returns
/// how many were sent (an error only when none was).
///
/// When they share one size (the last may be shorter) and each fits an
/// Ethernet MTU, they go out as one `UDP_SEGMENT` message: the kernel
/// builds one buffer and cuts it into datagrams late, so routing,
/// netfilter and the socket layer are paid once per run, not per datagram.
/// Otherwise one message each, all in one `sendmmsg`.
pub fn send_run(fd: RawFd, run: &[&[u8]], to: Option<SocketAddr>, tos: Option<u8>, v6: bool) -> io::Result<usize> {
    if run.is_empty() {
        return Ok(0);
    }
    let max = gso_segments(GSO_MAX_SEGMENTS);
    // A run longer than 64 messages is sent in several calls.
    let mut msgs = [Message { to, tos, segments: &[] }; 64];
    let mut total = 0;
    let mut chunks = gso_chunks(run, v6, max).peekable();
    while chunks.peek().is_some() {
        let mut n = 0;
        for chunk in chunks.by_ref().take(msgs.len()) {
            msgs[n].segments = chunk;
            n += 1;
        }
        let sent = send_messages_here(fd, &msgs[..n], v6, true);
        total += sent.datagrams;
        if let Some(e) = sent.first_error {
            return if total == 0 { Err(e) } else { Ok(total) };
        }
    }
    Ok(total)
}

/// Most datagrams per GSO train: `wanted`, or 1 once the kernel has
/// refused segmentation offload.
pub fn gso_segments(wanted: usize) -> usize {
    if GSO_UNAVAILABLE.load(Ordering::Relaxed) {
        1
    } else {
        wanted
    }
}

/// Splits `run` into pieces a single GSO send can carry, at most `max`
/// datagrams each.
pub fn gso_chunks<'r, 'p>(run: &'r [&'p [u8]], v6: bool, max: usize) -> impl Iterator<Item = &'r [&'p [u8]]> {
    let max_segment = if v6 { 1_452 } else { 1_472 };
    let mut rest = run;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        let size = first.len();
        let mut n = 1;
        if size > 0 && size <= max_segment {
            let per_send = GSO_MAX_SEGMENTS.min(GSO_MAX_BYTES / size).min(max.max(1));
            while n < rest.len() && n < per_send && rest[n].len() == size {
                n += 1;
            }
            // A shorter datagram may end a GSO run.
            if n < rest.len() && n < per_send && rest[n].len() < size && !rest[n].is_empty() {
                n += 1;
            }
        }
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        Some(chunk)
    })
}

/// An emptied vector of references, for references of another lifetime,
/// so a scratch vector of borrowed payloads keeps its allocation from one
/// call to the next (nothing is mapped: the vector is empty).
pub fn recycle<'b, T: ?Sized>(mut v: Vec<&'_ T>) -> Vec<&'b T> {
    v.clear();
    v.into_iter()
        .map(|_| -> &'b T { unreachable!("the vector is empty") })
        .collect()
}

/// [`recycle`] for messages.
pub fn recycle_messages<'b>(mut v: Vec<Message<'_>>) -> Vec<Message<'b>> {
    v.clear();
    v.into_iter()
        .map(|_| -> Message<'b> { unreachable!("the vector is empty") })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    fn sizes<'a>(chunks: impl Iterator<Item = &'a [&'a [u8]]>) -> Vec<Vec<usize>> {
        chunks.map(|c| c.iter().map(|p| p.len()).collect()).collect()
    }

    #[test]
    fn runs_split_where_gso_must_stop() {
        let a = [0u8; 100];
        let b = [0u8; 50];
        let big = [0u8; 3000];
        let run: Vec<&[u8]> = vec![&a, &a, &a, &b, &a, &big, &a];
        assert_eq!(
            sizes(gso_chunks(&run, false, GSO_MAX_SEGMENTS)),
            vec![vec![100, 100, 100, 50], vec![100], vec![3000], vec![100]]
        );
        let many: Vec<&[u8]> = vec![&a[..]; 130];
        assert_eq!(
            sizes(gso_chunks(&many, false, GSO_MAX_SEGMENTS))
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            vec![64, 64, 2]
        );
        let mtu: Vec<&[u8]> = vec![&big[..1200]; 60];
        assert_eq!(
            sizes(gso_chunks(&mtu, false, GSO_MAX_SEGMENTS))
                .iter()
                .map(Vec::len)
                .collect::<Vec<_>>(),
            vec![50, 10]
        );
    }

    #[test]
    fn a_refusal_meant_for_an_earlier_datagram_does_not_drop_the_next() {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        crate::net::sockets::report_errors(&tx, false).unwrap();
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        // The port unreachable for this one is reported on the next send.
        send_with_tos(tx.as_raw_fd(), b"lost", Some(closed), None, false).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let payloads: [&[u8]; 2] = [b"one", b"two"];
        let msgs: Vec<Message<'_>> = payloads
            .iter()
            .map(|p| Message {
                to: Some(rx.local_addr().unwrap()),
                tos: None,
                segments: std::slice::from_ref(p),
            })
            .collect();
        let sent = send_messages_here(tx.as_raw_fd(), &msgs, false, false);
        assert_eq!((sent.datagrams, sent.failed), (2, 0), "{:?}", sent.first_error);
        let mut buf = [0u8; 16];
        for p in payloads {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], p);
        }
    }

    #[test]
    fn a_run_arrives_as_separate_datagrams_in_order() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.connect(rx.local_addr().unwrap()).unwrap();
        let payloads: Vec<Vec<u8>> = (0..10u8).map(|i| vec![i; if i == 9 { 30 } else { 64 }]).collect();
        let run: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        assert_eq!(send_run(tx.as_raw_fd(), &run, None, Some(0xb8), false).unwrap(), 10);
        let mut buf = [0u8; 2048];
        for p in &payloads {
            let (n, from) = rx.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (p.as_slice(), tx.local_addr().unwrap()));
        }
    }

    #[tokio::test]
    async fn a_send_failed_by_an_icmp_error_about_an_earlier_datagram_is_tried_again() {
        // A closed port on loopback: each datagram to it leaves the
        // kernel's port unreachable pending on the connected socket.
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = closed.local_addr().unwrap();
        drop(closed);
        let std = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        std.connect(to).unwrap();
        std.set_nonblocking(true).unwrap();
        let socket = tokio::net::UdpSocket::from_std(std).unwrap();
        let pending = || {
            socket2::SockRef::from(&socket).send(b"earlier").unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        // What a plain send does then: fails, having sent nothing.
        pending();
        let e = socket2::SockRef::from(&socket).send(b"query").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ECONNREFUSED));
        // The query's send goes out, and says it met one error.
        pending();
        assert_eq!(send_connected(&socket, b"query").await.unwrap(), 1);
    }
}
