//! Builders for the sockets tproxyd opens.
//!
//! * **listeners** receive the redirected datagrams: `IP_TRANSPARENT` lets
//!   TPROXY hand them over although they are addressed elsewhere, and
//!   `IP_RECVORIGDSTADDR` tells us where each one was going;
//! * **upstream** sockets carry a flow onward; they bear the configured
//!   `SO_MARK` so the redirect rules skip them and nothing loops (connected
//!   for one destination, open for a full cone);
//! * **reply** sockets are bound *to the original destination* (allowed by
//!   `IP_TRANSPARENT`) so replies leave with the address the client expects;
//! * **server** sockets (DNS) are plain, but marked too.

use nix::sys::socket::{setsockopt, sockopt};
use socket2::{Domain, Protocol, SockAddr, SockFilter, Socket, Type};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};

fn udp_socket(family_of: SocketAddr) -> io::Result<Socket> {
    // Non-blocking from the start: one system call per socket, where
    // setting it afterwards took two (`fcntl` to read the flags, then to
    // write them). A flood of new flows makes a socket each.
    let sock = Socket::new(
        Domain::for_address(family_of),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )?;
    if family_of.is_ipv6() {
        // Keep v4 and v6 apart: a `[::]` listener must not swallow v4 traffic
        // that has its own listener and its own cmsg types.
        sock.set_only_v6(true)?;
    }
    Ok(sock)
}

/// `SO_RCVBUFFORCE` (privileged, ignores `rmem_max`), else `SO_RCVBUF`
/// (capped by the kernel). Best effort: a smaller buffer still works.
fn set_receive_buffer(sock: &Socket, bytes: usize) {
    let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    if set_int_option(sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v).is_err() {
        let _ = sock.set_recv_buffer_size(bytes);
    }
}

/// A socket option whose value is one `c_int`, for the options socket2
/// has no setter for.
fn set_int_option(sock: &Socket, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setsockopt with a c_int value of the size given.
    let r = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// [`set_receive_buffer`] for a socket already handed over as a
/// `UdpSocket`.
pub fn set_udp_receive_buffer(sock: &UdpSocket, bytes: usize) {
    set_receive_buffer(&socket2::SockRef::from(sock), bytes);
}

fn set_transparent(sock: &Socket, v6: bool) -> io::Result<()> {
    if v6 {
        sock.set_ip_transparent_v6(true)
    } else {
        sock.set_ip_transparent_v4(true)
    }
}

/// A TPROXY listener on `addr` that reports each datagram's original
/// destination (and its TOS / traffic class) in control messages, with a
/// receive buffer of `buffer` bytes; with `group`, a member of an
/// `SO_REUSEPORT` group (TPROXY spreads clients over its members).
pub fn transparent_listener(addr: SocketAddr, buffer: usize, group: bool) -> io::Result<UdpSocket> {
    let sock = udp_socket(addr)?;
    set_receive_buffer(&sock, buffer);
    set_transparent(&sock, addr.is_ipv6())?;
    if addr.is_ipv6() {
        setsockopt(&sock, sockopt::Ipv6OrigDstAddr, &true)?;
        setsockopt(&sock, sockopt::Ipv6RecvTClass, &true)?;
    } else {
        setsockopt(&sock, sockopt::Ipv4OrigDstAddr, &true)?;
        setsockopt(&sock, sockopt::IpRecvTos, &true)?;
    }
    // Datagrams the kernel coalesced (GRO, or a client's GSO train over a
    // veth) arrive whole, one slot and one copy for the lot, instead of
    // being cut up again in the kernel; the listener splits them
    // (`recv::segments`). Kernels before 5.0 refuse: not needed then.
    let _ = setsockopt(&sock, sockopt::UdpGroSegment, &true);
    // Each datagram's kernel receive time: how long it waited in the queue
    // is what overload shedding (`relay::shed`) watches.
    setsockopt(&sock, sockopt::ReceiveTimestampns, &true)?;
    // No `SO_REUSEADDR`: on UDP it lets a socket of *any* user that sets
    // it too bind the same address, and the kernel looks the newest one up
    // first. Not transparent, such a socket makes TPROXY drop every
    // datagram handed to it: one unprivileged process could blackhole the
    // relay (tests/abuse.rs). A group needs only `SO_REUSEPORT`, which the
    // kernel grants to sockets of the same user alone.
    if group {
        sock.set_reuse_port(true)?;
    }
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// Whether another socket already holds `addr`: binds a throw-away socket
/// there *without* `SO_REUSEADDR` / `SO_REUSEPORT` (transparent like the
/// listener when `transparent`) and closes it again.
///
/// The relay's listeners set `SO_REUSEPORT` (a group), and the kernel lets
/// any socket of the same user that sets it too share the port: a second
/// tproxyd, or tproxyd joining someone else's group, would then take part
/// of the traffic with no error anywhere. A socket without the options
/// conflicts with every existing binding of the port (a wildcard included),
/// so this finds them. `Ok(false)` means free; other errors are returned.
pub fn address_taken(addr: SocketAddr, transparent: bool) -> io::Result<bool> {
    let sock = udp_socket(addr)?;
    if transparent {
        set_transparent(&sock, addr.is_ipv6())?;
    }
    match sock.bind(&addr.into()) {
        Ok(()) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) => Ok(true),
        Err(e) => Err(e),
    }
}

/// A marked, unconnected socket bound to `local`.
pub fn marked_udp(local: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let sock = udp_socket(local)?;
    sock.set_mark(mark)?;
    sock.bind(&local.into())?;
    Ok(sock.into())
}

/// Has an IPv4 upstream socket take no path MTU from ICMP
/// (`IP_PMTUDISC_OMIT`): it ignores "fragmentation needed" messages and
/// the path MTU other sockets learnt, sends without DF, and fragments only
/// beyond the interface's MTU (routers on the way may fragment further).
///
/// Why: an ICMP "fragmentation needed" about a pool socket's port is
/// believed by the kernel from anyone, and every server a client talks to
/// sees that port. One forged message naming an MTU of 552 set the
/// gateway's path MTU to the server it quotes, for ten minutes and for
/// every socket that takes path MTUs: every flow's datagrams over 552
/// bytes then left in fragments, and a path that drops fragments lost all
/// of them (tests/attacks_relay.rs). The relay does not carry the client's
/// DF bit anyway, so nothing is given up that the client relied on.
///
/// IPv6 is left as it is: its routers never fragment, so a socket that
/// ignored real "packet too big" messages would lose its big datagrams on
/// a narrower path for good (none of 200 came back over a 1,300-byte hop
/// with `IPV6_PMTUDISC_OMIT`, `a_real_narrower_ipv6_hop_is_learnt_and_crossed`
/// in tests/attacks_relay.rs), and the kernel never believes an IPv6 path
/// MTU under 1,280 bytes, however forged. What a forgery can still do is
/// in README, "Security notes".
fn ignore_path_mtu(sock: &Socket, remote: SocketAddr) -> io::Result<()> {
    if remote.is_ipv6() {
        return Ok(());
    }
    set_int_option(sock, libc::IPPROTO_IP, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_OMIT)
}

/// A marked socket connected to `remote`, on a port the kernel picks at
/// random across the ephemeral range when it connects (one DNS query's
/// socket). Created non-blocking and left unbound until `connect`: four
/// system calls, the fewest that give a fresh random port and ignore
/// forged path MTUs ([`ignore_path_mtu`]).
pub fn marked_connected_udp(remote: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let sock = Socket::new(
        Domain::for_address(remote),
        Type::DGRAM.nonblocking(),
        Some(Protocol::UDP),
    )?;
    sock.set_mark(mark)?;
    ignore_path_mtu(&sock, remote)?;
    sock.connect(&remote.into())?;
    Ok(sock.into())
}

/// Moves a socket made by [`marked_connected_udp`] to a new random port,
/// still connected to `remote`: two `connect`s where closing it and opening
/// another took six system calls (`socket`, `setsockopt`, `connect`, the
/// reactor's two `epoll_ctl`, `close`) and about four times the kernel time.
///
/// `connect` with `AF_UNSPEC` dissolves the association, and because the
/// port was picked by the kernel (no `bind`), it also gives the port back
/// (`__udp_disconnect` unhashes a socket without `SOCK_BINDPORT_LOCK`); the
/// second `connect` then picks a port at random across the ephemeral range,
/// as for a new socket. In between the socket has no port, so nothing can
/// arrive on it. Datagrams queued before stay queued: the caller empties
/// the socket before its next query, as for any reused socket. The mark,
/// the descriptor and its reactor registration are kept.
pub fn new_port(sock: &impl std::os::fd::AsFd, remote: SocketAddr) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = sock.as_fd();
    let unspec = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: `unspec` is a valid `sockaddr` for the duration of the call and
    // its size is passed; `fd` is borrowed, open and owned by the caller.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &raw const unspec,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    socket2::SockRef::from(&fd).connect(&remote.into())
}

/// An upstream socket for a flow: marked, optionally bound to a device,
/// reporting each reply's TOS so it can be carried back to the client.
///
/// With `shared_port`, it is bound to that port with `SO_REUSEADDR` and
/// connected to `remote`: one destination, and the port may serve flows to
/// other destinations too (see `relay::ports`). Without, it gets a port of
/// its own and stays open to every remote (a full cone).
pub fn flow_upstream(
    remote: SocketAddr,
    shared_port: Option<u16>,
    mark: u32,
    device: Option<&str>,
) -> io::Result<UdpSocket> {
    let sock = udp_socket(remote)?;
    sock.set_mark(mark)?;
    ignore_path_mtu(&sock, remote)?;
    if let Some(dev) = device {
        sock.bind_device(Some(dev.as_bytes()))?;
    }
    if remote.is_ipv6() {
        setsockopt(&sock, sockopt::Ipv6RecvTClass, &true)?;
    } else {
        setsockopt(&sock, sockopt::IpRecvTos, &true)?;
    }
    // A server's GSO train (QUIC servers send them), or datagrams the NIC
    // coalesced, arrive whole; the reply readers split them (see
    // `recv::segments`). Kernels before 5.0 refuse: not needed then.
    let _ = setsockopt(&sock, sockopt::UdpGroSegment, &true);
    let mut local = unspecified(remote);
    if let Some(port) = shared_port {
        sock.set_reuse_address(true)?;
        local.set_port(port);
    }
    sock.bind(&local.into())?;
    if shared_port.is_some() {
        sock.connect(&remote.into())?;
    }
    Ok(sock.into())
}

/// Asks for ICMP errors (unreachable ports and hosts) in the socket's error
/// queue: an unconnected socket is told nothing otherwise.
pub fn report_errors(sock: &UdpSocket, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt(sock, sockopt::Ipv6RecvErr, &true)?;
    } else {
        setsockopt(sock, sockopt::Ipv4RecvErr, &true)?;
    }
    Ok(())
}

/// Empties the error queue of `fd` (see [`report_errors`]); returns how
/// many errors it held.
pub fn drain_error_queue(fd: std::os::fd::RawFd) -> usize {
    let mut count = 0;
    let mut data = [0u8; 64];
    let mut control = [0u8; 256];
    loop {
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: a zeroed msghdr is valid; every pointer set below refers
        // to a local buffer of the length given, alive for the call.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len() as _;
        let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT) };
        if n < 0 {
            return count;
        }
        count += 1;
    }
}

/// A marked, transparent socket bound to `local` (usually *not* an address
/// of this host) used only to send replies that appear to come from it.
///
/// It never needs to receive, so a one-instruction BPF filter drops anything
/// that would otherwise pile up in its receive queue.
pub fn spoofing_reply(local: SocketAddr, mark: u32) -> io::Result<UdpSocket> {
    let sock = udp_socket(local)?;
    set_transparent(&sock, local.is_ipv6())?;
    sock.set_mark(mark)?;
    // Our own reply sockets for the same address may briefly coexist (an old
    // one still held by a live flow after the cache replaced it).
    sock.set_reuse_address(true)?;
    const BPF_RET_K: u16 = 0x06;
    sock.attach_filter(&[SockFilter::new(BPF_RET_K, 0, 0, 0)])?;
    sock.bind(&local.into())?;
    Ok(sock.into())
}

/// A marked TCP socket for connecting to `remote` (an upstream resolver, a
/// SOCKS5 server), with Nagle off: these connections carry small requests.
pub fn marked_tcp(remote: SocketAddr, mark: u32) -> io::Result<std::net::TcpStream> {
    let sock = Socket::new(Domain::for_address(remote), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_mark(mark)?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)?;
    Ok(sock.into())
}

/// A plain, marked UDP server socket (the DNS engine's own addresses),
/// with a receive buffer of `buffer` bytes: with the default (about
/// 208 KB, some 200 small queries) one device's burst fills the queue
/// before the rate limiter sees it, and other devices' queries are dropped
/// by the kernel.
pub fn server_udp(addr: SocketAddr, mark: u32, buffer: usize) -> io::Result<UdpSocket> {
    let sock = udp_socket(addr)?;
    set_receive_buffer(&sock, buffer);
    sock.set_mark(mark)?;
    // No `SO_REUSEADDR`: on UDP it lets a socket of any user that sets it
    // too share the address, and the kernel hands the newest one the
    // queries. On a port above 1024 any local user could then read them
    // and answer in our place. The socket is bound once at start and kept
    // across reloads, so nothing of ours needs to share it.
    sock.bind(&addr.into())?;
    Ok(sock.into())
}

/// A marked TCP listening socket; `transparent` lets TPROXY hand it
/// connections addressed to any destination. Accepted sockets inherit the
/// mark, so their replies are never captured again.
pub fn tcp_listener(addr: SocketAddr, mark: u32, transparent: bool) -> io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    if transparent {
        set_transparent(&sock, addr.is_ipv6())?;
    }
    sock.set_mark(mark)?;
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(1024)?;
    Ok(sock.into())
}

/// The path MTU the kernel would use towards `dst` for a socket with `mark`.
pub fn route_mtu(dst: IpAddr, mark: u32) -> io::Result<usize> {
    let remote = SocketAddr::new(dst, 9);
    let sock = udp_socket(remote)?;
    sock.set_mark(mark)?;
    sock.connect(&SockAddr::from(remote))?;
    let (level, name) = match dst {
        IpAddr::V4(_) => (libc::IPPROTO_IP, libc::IP_MTU),
        IpAddr::V6(_) => (libc::IPPROTO_IPV6, libc::IPV6_MTU),
    };
    let mut mtu: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    use std::os::fd::AsRawFd;
    // SAFETY: `mtu` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&mut mtu as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    usize::try_from(mtu).map_err(|_| io::Error::other("negative MTU"))
}

/// Whether `ip` is an address of this host: only those can be bound
/// without `IP_TRANSPARENT`.
pub fn is_local_address(ip: IpAddr) -> bool {
    ip.is_loopback() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// `0.0.0.0:0` or `[::]:0`, matching the family of `addr`.
pub fn unspecified(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(_) => SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0),
        SocketAddr::V6(_) => SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_are_non_blocking_from_the_start() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let sock = udp_socket(addr).unwrap();
            assert!(sock.nonblocking().unwrap(), "{addr}");
        }
    }

    #[test]
    fn a_new_port_is_random_connected_and_the_old_one_is_closed() {
        for addr in ["127.0.0.1:0", "[::1]:0"] {
            let server = UdpSocket::bind(addr).unwrap();
            server
                .set_read_timeout(Some(std::time::Duration::from_millis(200)))
                .unwrap();
            let remote = server.local_addr().unwrap();
            let sock = marked_connected_udp(remote, 0).unwrap();
            let mut ports = std::collections::HashSet::new();
            let mut buf = [0u8; 16];
            for i in 0..64u8 {
                let old = sock.local_addr().unwrap();
                new_port(&sock, remote).unwrap();
                let now = sock.local_addr().unwrap();
                assert_ne!(now.port(), 0, "{addr}: bound again");
                assert_eq!(now.ip(), old.ip(), "{addr}: same source address");
                assert_eq!(sock.peer_addr().unwrap(), remote, "{addr}: still connected");
                ports.insert(now.port());
                // The query leaves from the new port...
                sock.send(&[i]).unwrap();
                let (n, from) = server.recv_from(&mut buf).unwrap();
                assert_eq!((n, buf[0], from), (1, i, now), "{addr}");
                // ...and nothing sent to the old one reaches the socket.
                if old.port() != now.port() {
                    server.send_to(b"late", old).unwrap();
                }
                server.send_to(&[i], now).unwrap();
                let n = sock.recv(&mut buf).unwrap();
                assert_eq!((n, buf[0]), (1, i), "{addr}: only what was sent to the new port");
            }
            // 64 draws from about 28,000 ports: a repeat is rare; a socket
            // that kept its port would show one.
            assert!(ports.len() >= 60, "{addr}: {} distinct ports in 64", ports.len());
        }
    }
}
