//! Spoofed UDP replies over raw IP, for when a reply socket cannot be bound.
//!
//! Binding `203.0.113.53:53` fails with `EADDRINUSE` when a local process
//! (say a DNS server) holds `0.0.0.0:53` without `SO_REUSEADDR`. A raw
//! `IPPROTO_RAW` socket bypasses the UDP port table entirely: we write the IP
//! and UDP headers ourselves. Raw sends are not fragmented by the kernel, so
//! a datagram larger than the path MTU is split here into IP fragments.

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::cell::RefCell;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::OnceLock;

use super::send::{Message, SendScratch, Sent, recycle, recycle_messages, send_messages};
use super::sockets::route_mtu;
use super::unresolved::{HalfBuffer, Room};

const IPV4_HEADER: usize = 20;
const IPV6_HEADER: usize = 40;
const FRAGMENT_HEADER: usize = 8;
const UDP_HEADER: usize = 8;
const PROTO_UDP: u8 = 17;
const PROTO_FRAGMENT: u8 = 44;
const HOP_LIMIT: u8 = 64;

/// One raw socket per address family, opened on first use.
#[derive(Debug)]
pub struct RawSender {
    mark: u32,
    v4: OnceLock<Result<Socket, io::ErrorKind>>,
    v6: OnceLock<Result<Socket, io::ErrorKind>>,
    /// Half of each socket's send buffer, read at its first look.
    half_v4: OnceLock<HalfBuffer>,
    half_v6: OnceLock<HalfBuffer>,
}

thread_local! {
    static PACKET: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(65_536 + 64));
}

impl RawSender {
    pub fn new(mark: u32) -> Self {
        RawSender {
            mark,
            v4: OnceLock::new(),
            v6: OnceLock::new(),
            half_v4: OnceLock::new(),
            half_v6: OnceLock::new(),
        }
    }

    /// Whether raw sends of this family can work (the raw socket opens: it
    /// needs `CAP_NET_RAW`).
    pub fn available(&self, v6: bool) -> bool {
        self.socket(v6).is_ok()
    }

    /// The room left before the raw socket of this family has its send
    /// buffer half taken (see [`Room`]); room without end when it cannot
    /// open.
    pub fn room(&self, v6: bool) -> Room {
        let Ok(sock) = self.socket(v6) else {
            return Room::ENDLESS;
        };
        let fd = sock.as_raw_fd();
        let half = if v6 { &self.half_v6 } else { &self.half_v4 };
        half.get_or_init(|| HalfBuffer::of(fd)).room(fd)
    }

    fn socket(&self, v6: bool) -> io::Result<&Socket> {
        let (cell, domain) = if v6 {
            (&self.v6, Domain::IPV6)
        } else {
            (&self.v4, Domain::IPV4)
        };
        let sock = cell.get_or_init(|| {
            let open = || -> io::Result<Socket> {
                let s = Socket::new(domain, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))?;
                s.set_mark(self.mark)?;
                s.set_nonblocking(true)?;
                Ok(s)
            };
            open().map_err(|e| e.kind())
        });
        sock.as_ref().map_err(|k| io::Error::from(*k))
    }

    /// Sends `payload` as a UDP datagram from `src` to `dst` with the given
    /// TOS / traffic class.
    pub fn send(&self, src: SocketAddr, dst: SocketAddr, payload: &[u8], tos: u8) -> io::Result<()> {
        let v6 = match (src, dst) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => false,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => true,
            _ => {
                return Err(io::Error::new(io::ErrorKind::InvalidInput, "address families differ"));
            }
        };
        let sock = self.socket(v6)?;
        let to = SockAddr::from(raw_destination(dst));
        let udp = udp_datagram(src, dst, payload)?;
        let whole = PACKET.with_borrow_mut(|pkt| {
            pkt.clear();
            ip_header(pkt, src.ip(), dst.ip(), tos, udp.len(), None);
            pkt.extend_from_slice(&udp);
            sock.send_to(pkt, &to)
        });
        match whole {
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => self.send_fragmented(sock, src.ip(), dst, tos, &udp),
            other => other.map(drop),
        }
    }

    /// Sends the UDP datagram `udp` in IP fragments that fit the route's
    /// MTU: the kernel sends a raw packet larger than the outgoing
    /// device's MTU in no other way.
    fn send_fragmented(&self, sock: &Socket, src: IpAddr, dst: SocketAddr, tos: u8, udp: &[u8]) -> io::Result<()> {
        let to = SockAddr::from(raw_destination(dst));
        let dst = dst.ip();
        let mtu = route_mtu(dst, self.mark)?;
        // Drawn at random, not counted: who sees one datagram's ID must
        // not be able to name the next one's and forge a fragment of it
        // (RFC 7739). Fragmenting here is rare, so the draw costs nothing.
        let id: u32 = rand::random();
        for packet in fragments(src, dst, tos, udp, mtu, id)? {
            sock.send_to(&packet, &to)?;
        }
        Ok(())
    }
}

/// The largest packet (IP header included) [`RawBatch`] takes: what any
/// IPv4 path carries unfragmented (576, the size every host must accept)
/// and IPv6's minimum MTU. A larger one is sent alone by
/// [`RawSender::send`], which fragments it when the route's MTU says so.
const BATCHED_V4: usize = 576;
const BATCHED_V6: usize = 1_280;

/// Spoofed datagrams built back to back, to leave in one `sendmmsg` per
/// address family ([`RawSender::send_batch`]).
///
/// Replies that go out over raw IP (the reply-socket cache is full, or a
/// batch may open no more sockets) used to cost a `sendto` each: 16 % of
/// tproxyd's CPU in the destination flood, where every reply came from a
/// new address. One batch of a pool reader's replies now costs one system
/// call. The buffers are kept from batch to batch.
#[derive(Debug, Default)]
pub struct RawBatch {
    bytes: Vec<u8>,
    /// (destination, IPv6, start, length) per packet in `bytes`.
    packets: Vec<(IpAddr, bool, usize, usize)>,
    /// (source, TOS) per packet, to fragment one the kernel refuses whole.
    origins: Vec<(IpAddr, u8)>,
    send: SendScratch,
    slices: Vec<&'static [u8]>,
    messages: Vec<Message<'static>>,
}

/// Where a raw packet for `dst` is sent: the address without a port (the
/// port is in the UDP header), keeping an IPv6 scope, without which the
/// kernel cannot tell which link a link-local client is on.
fn raw_destination(dst: SocketAddr) -> SocketAddr {
    match dst {
        SocketAddr::V4(d) => SocketAddr::new(IpAddr::V4(*d.ip()), 0),
        SocketAddr::V6(d) => SocketAddr::V6(std::net::SocketAddrV6::new(*d.ip(), 0, 0, d.scope_id())),
    }
}

impl RawBatch {
    /// Adds a UDP datagram from `src` to `dst` with TOS `tos`; false (and
    /// nothing added) when it cannot join a batch: the families differ or
    /// the packet is larger than every path is sure to carry.
    pub fn push(&mut self, src: SocketAddr, dst: SocketAddr, payload: &[u8], tos: u8) -> bool {
        let v6 = match (src, dst) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => false,
            // A link-scoped client (fe80::/10 with its interface) needs
            // that interface to be reached; a batch keeps only addresses,
            // so such a reply takes a path that keeps the scope.
            (SocketAddr::V6(_), SocketAddr::V6(d)) if d.scope_id() != 0 => return false,
            (SocketAddr::V6(_), SocketAddr::V6(_)) => true,
            _ => return false,
        };
        let (header, max) = if v6 {
            (IPV6_HEADER, BATCHED_V6)
        } else {
            (IPV4_HEADER, BATCHED_V4)
        };
        let udp_len = UDP_HEADER + payload.len();
        if header + udp_len > max {
            return false;
        }
        let start = self.bytes.len();
        ip_header(&mut self.bytes, src.ip(), dst.ip(), tos, udp_len, None);
        let udp = self.bytes.len();
        append_udp(&mut self.bytes, src, dst, payload);
        debug_assert_eq!(self.bytes.len() - udp, udp_len);
        self.packets.push((dst.ip(), v6, start, self.bytes.len() - start));
        self.origins.push((src.ip(), tos));
        true
    }

    pub fn is_empty(&self) -> bool {
        self.packets.is_empty()
    }

    /// The packets added, in order (for tests).
    #[cfg(test)]
    fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.packets.iter().map(|&(_, _, at, len)| &self.bytes[at..at + len])
    }
}

/// Appends a UDP header, with its checksum, and `payload` to `out`.
///
/// The header is built on the stack and appended in one piece, the payload
/// summed where it lies: every lone reply of a batch passes here (one per
/// new flow in the flows bench).
fn append_udp(out: &mut Vec<u8>, src: SocketAddr, dst: SocketAddr, payload: &[u8]) {
    let len = (UDP_HEADER + payload.len()) as u16; // callers bound the size
    let [sp0, sp1] = src.port().to_be_bytes();
    let [dp0, dp1] = dst.port().to_be_bytes();
    let [l0, l1] = len.to_be_bytes();
    let mut header = [sp0, sp1, dp0, dp1, l0, l1, 0, 0];
    let sum = add_bytes(pseudo_header_sum(src.ip(), dst.ip(), u32::from(len)), &header);
    let mut csum = fold(add_bytes(sum, payload));
    if csum == 0 {
        csum = 0xffff; // 0 means "no checksum" in UDP
    }
    header[6..].copy_from_slice(&csum.to_be_bytes());
    out.reserve(header.len() + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

impl RawSender {
    /// Sends everything in `batch` (then empties it): one `sendmmsg` per
    /// address family, in order within a family. What the kernel refuses
    /// is counted in the result and skipped.
    pub fn send_batch(&self, batch: &mut RawBatch) -> Sent {
        let mut total = Sent::default();
        for v6 in [false, true] {
            if !batch.packets.iter().any(|p| p.1 == v6) {
                continue;
            }
            let sock = match self.socket(v6) {
                Ok(s) => s,
                Err(e) => {
                    let n = batch.packets.iter().filter(|p| p.1 == v6).count();
                    total.failed += n;
                    total.first_error.get_or_insert(e);
                    continue;
                }
            };
            let mut slices: Vec<&[u8]> = recycle(std::mem::take(&mut batch.slices));
            slices.extend(
                batch
                    .packets
                    .iter()
                    .filter(|p| p.1 == v6)
                    .map(|&(_, _, at, len)| &batch.bytes[at..at + len]),
            );
            let mut messages: Vec<Message<'_>> = recycle_messages(std::mem::take(&mut batch.messages));
            messages.extend(
                batch
                    .packets
                    .iter()
                    .filter(|p| p.1 == v6)
                    .zip(&slices)
                    .map(|(&(dst, ..), slice)| Message {
                        // Raw IP takes the address only; the port is in
                        // the UDP header.
                        to: Some(SocketAddr::new(dst, 0)),
                        tos: None,
                        segments: std::slice::from_ref(slice),
                    }),
            );
            // What was sent counts by payload, not by packet.
            let ip_header = if v6 { IPV6_HEADER } else { IPV4_HEADER };
            let headers = (ip_header + UDP_HEADER) as u64;
            // Up to each refusal: a packet larger than the outgoing
            // device's MTU (an IPv4 link below 576 bytes) is refused with
            // `EMSGSIZE` and goes in fragments instead, as one sent alone
            // does; the others refused are counted and skipped.
            let mut from = 0;
            while from < messages.len() {
                let mut sent = send_messages(sock.as_raw_fd(), &messages[from..], v6, &mut batch.send, true);
                let done = sent.datagrams + sent.full + sent.failed;
                if done == 0 {
                    break;
                }
                if sent.failed > 0
                    && sent.first_error.as_ref().and_then(io::Error::raw_os_error) == Some(libc::EMSGSIZE)
                {
                    let k = from + done - 1;
                    let packet = batch
                        .packets
                        .iter()
                        .zip(&batch.origins)
                        .filter(|(p, _)| p.1 == v6)
                        .nth(k)
                        .map(|(&(dst, _, at, len), &(src, tos))| {
                            (src, dst, tos, &batch.bytes[at + ip_header..at + len])
                        });
                    if let Some((src, dst, tos, udp)) = packet {
                        match self.send_fragmented(sock, src, SocketAddr::new(dst, 0), tos, udp) {
                            Ok(()) => {
                                sent.failed -= 1;
                                sent.first_error = None;
                                sent.datagrams += 1;
                                sent.bytes += udp.len() as u64 + ip_header as u64;
                            }
                            Err(e) => sent.first_error = Some(e),
                        }
                    }
                }
                total.datagrams += sent.datagrams;
                total.bytes += sent.bytes.saturating_sub(headers * sent.datagrams as u64);
                total.full += sent.full;
                total.failed += sent.failed;
                if let Some(e) = sent.first_error {
                    total.first_error.get_or_insert(e);
                }
                from += done;
            }
            batch.messages = recycle_messages(messages);
            batch.slices = recycle(slices);
        }
        batch.bytes.clear();
        batch.packets.clear();
        batch.origins.clear();
        total
    }
}

/// A fragment's place in the original datagram.
#[derive(Debug, Clone, Copy)]
struct Fragment {
    id: u32,
    /// Byte offset of this piece, a multiple of 8.
    offset: usize,
    more: bool,
}

/// The UDP header plus payload, with its checksum.
fn udp_datagram(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> io::Result<Vec<u8>> {
    let max = if src.is_ipv6() { 65_535 } else { 65_535 - IPV4_HEADER };
    let len = UDP_HEADER + payload.len();
    if len > max {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    let len16 = len as u16; // fits: checked against `max` above
    let mut d = Vec::with_capacity(len);
    d.extend_from_slice(&src.port().to_be_bytes());
    d.extend_from_slice(&dst.port().to_be_bytes());
    d.extend_from_slice(&len16.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let mut sum = pseudo_header_sum(src.ip(), dst.ip(), len as u32);
    sum = add_bytes(sum, &d);
    let mut csum = fold(sum);
    if csum == 0 {
        csum = 0xffff; // 0 means "no checksum" in UDP
    }
    d[6..8].copy_from_slice(&csum.to_be_bytes());
    Ok(d)
}

/// Appends an IPv4 or IPv6 header for `payload_len` bytes of UDP (or of a
/// fragment of it) to `out`.
fn ip_header(out: &mut Vec<u8>, src: IpAddr, dst: IpAddr, tos: u8, payload_len: usize, frag: Option<Fragment>) {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let total = (IPV4_HEADER + payload_len) as u16;
            let (id, flags_off) = match frag {
                Some(f) => (f.id as u16, (if f.more { 0x2000 } else { 0 }) | (f.offset / 8) as u16),
                None => (0, 0), // the kernel fills in an ID for unfragmented packets
            };
            // Built on the stack and appended once (see `append_udp`).
            let [t0, t1] = total.to_be_bytes();
            let [i0, i1] = id.to_be_bytes();
            let [f0, f1] = flags_off.to_be_bytes();
            let [s0, s1, s2, s3] = s.octets();
            let [d0, d1, d2, d3] = d.octets();
            let mut header = [
                0x45, tos, t0, t1, i0, i1, f0, f1, HOP_LIMIT, PROTO_UDP, 0, 0, s0, s1, s2, s3, d0, d1, d2, d3,
            ];
            let csum = fold(add_bytes(0, &header));
            header[10..12].copy_from_slice(&csum.to_be_bytes());
            out.extend_from_slice(&header);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let extra = if frag.is_some() { FRAGMENT_HEADER } else { 0 };
            let payload = (payload_len + extra) as u16;
            let first = 0x6000_0000u32 | (u32::from(tos) << 20);
            out.extend_from_slice(&first.to_be_bytes());
            out.extend_from_slice(&payload.to_be_bytes());
            let next = if frag.is_some() { PROTO_FRAGMENT } else { PROTO_UDP };
            out.extend_from_slice(&[next, HOP_LIMIT]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
            if let Some(f) = frag {
                let off = (f.offset as u16) | u16::from(f.more);
                out.extend_from_slice(&[PROTO_UDP, 0]);
                out.extend_from_slice(&off.to_be_bytes());
                out.extend_from_slice(&f.id.to_be_bytes());
            }
        }
        _ => unreachable!("callers check that both addresses share a family"),
    }
}

/// Splits a UDP datagram into IP fragments that each fit `mtu`.
fn fragments(src: IpAddr, dst: IpAddr, tos: u8, udp: &[u8], mtu: usize, id: u32) -> io::Result<Vec<Vec<u8>>> {
    let headers = if src.is_ipv6() {
        IPV6_HEADER + FRAGMENT_HEADER
    } else {
        IPV4_HEADER
    };
    let chunk = mtu.saturating_sub(headers) / 8 * 8;
    if chunk == 0 {
        return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
    }
    let mut out = Vec::with_capacity(udp.len() / chunk + 1);
    for (i, piece) in udp.chunks(chunk).enumerate() {
        let offset = i * chunk;
        let frag = Fragment {
            id,
            offset,
            more: offset + piece.len() < udp.len(),
        };
        let mut pkt = Vec::with_capacity(headers + piece.len());
        ip_header(&mut pkt, src, dst, tos, piece.len(), Some(frag));
        pkt.extend_from_slice(piece);
        out.push(pkt);
    }
    Ok(out)
}

fn pseudo_header_sum(src: IpAddr, dst: IpAddr, udp_len: u32) -> u32 {
    // Every word of the pseudo-header (addresses, length, protocol)
    // summed as integers, then folded once: what `add_bytes` does with
    // the same bytes, without laying them out first.
    let tail = u64::from(udp_len) + u64::from(PROTO_UDP);
    let addresses = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => u64::from(s.to_bits()) + u64::from(d.to_bits()),
        (s, d) => {
            let words =
                |a: u128| (a >> 96) as u64 + ((a >> 64) as u32) as u64 + ((a >> 32) as u32) as u64 + (a as u32) as u64;
            words(to_v6(s).to_bits()) + words(to_v6(d).to_bits())
        }
    };
    fold16(addresses + tail)
}

fn to_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// One's-complement sum of big-endian 16-bit words (odd tail padded).
///
/// Four bytes at a time into 64 bits: 2^16 is 1 modulo 2^16 − 1, so a
/// big-endian 32-bit word adds what its two 16-bit halves add, and 64 bits
/// hold the sum of any datagram's words without overflow; it is folded
/// once at the end. Two bytes at a time with a carry check each, the sum
/// was about half of what building a raw reply cost (callgrind).
fn add_bytes(sum: u32, bytes: &[u8]) -> u32 {
    let mut acc = u64::from(sum);
    let mut words = bytes.chunks_exact(4);
    for w in &mut words {
        acc += u64::from(u32::from_be_bytes([w[0], w[1], w[2], w[3]]));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        // An odd last byte is the high half of a word padded with zero.
        let mut last = [0u8; 4];
        last[..rest.len()].copy_from_slice(rest);
        acc += u64::from(u32::from_be_bytes(last));
    }
    fold16(acc)
}

/// Folds a one's-complement sum to 16 bits (not inverted), end-around
/// carry included: zero only if every word was zero.
fn fold16(mut acc: u64) -> u32 {
    while acc >> 16 != 0 {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u32
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests;
