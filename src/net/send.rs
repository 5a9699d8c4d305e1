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
use std::sync::atomic::{AtomicBool, Ordering};

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
        (Some(t), false) => sendmsg(fd, &iov, &[ControlMessage::Ipv4Tos(&t)], flags, addr.as_ref()),
        (Some(t), true) => {
            let tclass = i32::from(t);
            sendmsg(fd, &iov, &[ControlMessage::Ipv6TClass(&tclass)], flags, addr.as_ref())
        }
    };
    Ok(sent?)
}

/// Set once the kernel has refused UDP segmentation offload outright.
static GSO_UNAVAILABLE: AtomicBool = AtomicBool::new(false);
/// Most segments per GSO send (the kernel's UDP_MAX_SEGMENTS floor).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes per GSO send: one super-datagram must stay under 64 KiB.
const GSO_MAX_BYTES: usize = 60_000;

/// Sends a run of datagrams to the same place with the same TOS; returns
/// how many were sent.
///
/// When they share one size (the last may be shorter) and each fits an
/// Ethernet MTU, they go out in a single `sendmsg` with `UDP_SEGMENT`: the
/// kernel builds one buffer and cuts it into datagrams late, so routing,
/// netfilter and the socket layer are paid once per run, not per datagram.
/// Otherwise, or if the kernel refuses, one `sendmsg` each.
pub fn send_run(fd: RawFd, run: &[&[u8]], to: Option<SocketAddr>, tos: Option<u8>, v6: bool) -> io::Result<usize> {
    let mut sent = 0;
    for chunk in gso_chunks(run, v6) {
        if chunk.len() > 1 && !GSO_UNAVAILABLE.load(Ordering::Relaxed) {
            match send_gso(fd, chunk, to, tos, v6) {
                Ok(()) => {
                    sent += chunk.len();
                    continue;
                }
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOPROTOOPT | libc::EOPNOTSUPP)) => {
                    GSO_UNAVAILABLE.store(true, Ordering::Relaxed);
                    tracing::info!("the kernel refuses UDP segmentation offload; sending datagrams one by one");
                }
                // EINVAL/EMSGSIZE: this run does not fit (a smaller MTU);
                // send it datagram by datagram below.
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::EMSGSIZE | libc::EIO)) => {}
                Err(e) => return if sent > 0 { Ok(sent) } else { Err(e) },
            }
        }
        for payload in chunk {
            match send_with_tos(fd, payload, to, tos, v6) {
                Ok(_) => sent += 1,
                Err(e) if sent == 0 => return Err(e),
                Err(_) => return Ok(sent),
            }
        }
    }
    Ok(sent)
}

/// Splits `run` into pieces a single GSO send can carry.
fn gso_chunks<'r, 'p>(run: &'r [&'p [u8]], v6: bool) -> impl Iterator<Item = &'r [&'p [u8]]> {
    let max_segment = if v6 { 1_452 } else { 1_472 };
    let mut rest = run;
    std::iter::from_fn(move || {
        let first = rest.first()?;
        let size = first.len();
        let mut n = 1;
        if size > 0 && size <= max_segment {
            let per_send = GSO_MAX_SEGMENTS.min(GSO_MAX_BYTES / size);
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

fn send_gso(fd: RawFd, chunk: &[&[u8]], to: Option<SocketAddr>, tos: Option<u8>, v6: bool) -> io::Result<()> {
    let iov: Vec<IoSlice<'_>> = chunk.iter().map(|p| IoSlice::new(p)).collect();
    let segment = u16::try_from(chunk[0].len()).map_err(|_| io::Error::from_raw_os_error(libc::EMSGSIZE))?;
    let addr = to.map(SockaddrStorage::from);
    let flags = MsgFlags::MSG_DONTWAIT;
    let gso = ControlMessage::UdpGsoSegments(&segment);
    let tos = tos.filter(|&t| t != 0);
    let tclass = tos.map(i32::from).unwrap_or(0);
    let tos_byte = tos.unwrap_or(0);
    let result = match (tos.is_some(), v6) {
        (false, _) => sendmsg(fd, &iov, &[gso], flags, addr.as_ref()),
        (true, false) => sendmsg(
            fd,
            &iov,
            &[gso, ControlMessage::Ipv4Tos(&tos_byte)],
            flags,
            addr.as_ref(),
        ),
        (true, true) => sendmsg(
            fd,
            &iov,
            &[gso, ControlMessage::Ipv6TClass(&tclass)],
            flags,
            addr.as_ref(),
        ),
    };
    result.map(drop).map_err(io::Error::from)
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
            sizes(gso_chunks(&run, false)),
            vec![vec![100, 100, 100, 50], vec![100], vec![3000], vec![100]]
        );
        let many: Vec<&[u8]> = vec![&a[..]; 130];
        assert_eq!(
            sizes(gso_chunks(&many, false)).iter().map(Vec::len).collect::<Vec<_>>(),
            vec![64, 64, 2]
        );
        let mtu: Vec<&[u8]> = vec![&big[..1200]; 60];
        assert_eq!(
            sizes(gso_chunks(&mtu, false)).iter().map(Vec::len).collect::<Vec<_>>(),
            vec![50, 10]
        );
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
}
