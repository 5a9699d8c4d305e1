//! Plain UDP endpoints living in lab namespaces: clients and echo servers.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Netns;

/// A UDP socket bound to `addr` inside `ns`, with a 3 s read timeout.
pub fn socket(ns: &Netns, addr: SocketAddr) -> UdpSocket {
    let s = ns.enter(move || UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s
}

/// Sends `payload` to `to` and waits for one datagram back.
pub fn exchange(sock: &UdpSocket, to: SocketAddr, payload: &[u8]) -> (SocketAddr, Vec<u8>) {
    sock.send_to(payload, to)
        .unwrap_or_else(|e| panic!("send to {to}: {e}"));
    recv(sock).unwrap_or_else(|| panic!("no reply from {to} within the timeout"))
}

/// One datagram, or `None` on timeout.
pub fn recv(sock: &UdpSocket) -> Option<(SocketAddr, Vec<u8>)> {
    let mut buf = vec![0u8; 65_536];
    loop {
        return match sock.recv_from(&mut buf) {
            Ok((n, from)) => Some((from, buf[..n].to_vec())),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => None,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("recv: {e} ({:?})", e.kind()),
        };
    }
}

/// What an echo server received: (sender, payload) in arrival order.
type Log = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// An echo server thread: returns every datagram to its sender and records
/// who sent what.
pub struct Echo {
    pub addr: SocketAddr,
    seen: Log,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket: UdpSocket,
}

impl Echo {
    pub fn start(ns: &Netns, addr: SocketAddr) -> Echo {
        let socket = socket(ns, addr);
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let seen: Log = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (socket, seen, stop) = (socket.try_clone().unwrap(), seen.clone(), stop.clone());
            // Named by address so that a scheduler trace (`perf sched`)
            // tells the echoes apart.
            let name = format!("echo{}", short_name(addr));
            std::thread::Builder::new()
                .name(name)
                .spawn(move || {
                    let mut buf = vec![0u8; 65_536];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok((n, from)) = socket.recv_from(&mut buf) {
                            seen.lock().unwrap().push((from, buf[..n].to_vec()));
                            let _ = socket.send_to(&buf[..n], from);
                        }
                    }
                })
                .expect("spawning the echo thread")
        };
        Echo {
            addr,
            seen,
            stop,
            thread: Some(thread),
            socket,
        }
    }

    /// Every (sender, payload) received so far.
    pub fn received(&self) -> Vec<(SocketAddr, Vec<u8>)> {
        self.seen.lock().unwrap().clone()
    }

    /// The sender of the most recent datagram.
    pub fn last_peer(&self) -> SocketAddr {
        self.received().last().expect("echo server received nothing").0
    }

    /// Sends an unsolicited datagram from the server's socket.
    pub fn send_to(&self, payload: &[u8], to: SocketAddr) {
        self.socket.send_to(payload, to).expect("echo send");
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The last part of `addr`'s address and its port (".8:6000"), which fit
/// a thread's name of 15 bytes.
pub fn short_name(addr: SocketAddr) -> String {
    let ip = addr.ip().to_string();
    let last = ip.rsplit(['.', ':']).next().unwrap_or_default();
    format!(".{last}:{}", addr.port())
}

/// Sets the TOS (IPv4) or traffic class (IPv6) of datagrams `sock` sends,
/// and asks for the TOS of datagrams it receives.
pub fn mark_tos(sock: &UdpSocket, tos: u8) {
    use nix::sys::socket::{setsockopt, sockopt};
    if sock.local_addr().unwrap().is_ipv6() {
        setsockopt(sock, sockopt::Ipv6TClass, &i32::from(tos)).unwrap();
        setsockopt(sock, sockopt::Ipv6RecvTClass, &true).unwrap();
    } else {
        setsockopt(sock, sockopt::Ipv4Tos, &i32::from(tos)).unwrap();
        setsockopt(sock, sockopt::IpRecvTos, &true).unwrap();
    }
}

/// One datagram with the TOS / traffic class it arrived with.
pub fn recv_tos(sock: &UdpSocket) -> Option<(SocketAddr, Vec<u8>, u8)> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg};
    use std::os::fd::AsRawFd;
    let mut buf = vec![0u8; 65_536];
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    loop {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        match recvmsg::<SockaddrStorage>(sock.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_DONTWAIT) {
            Ok(msg) => {
                let n = msg.bytes;
                let from = msg.address.and_then(|a| {
                    a.as_sockaddr_in()
                        .map(|v4| SocketAddr::from(*v4))
                        .or_else(|| a.as_sockaddr_in6().map(|v6| SocketAddr::from(*v6)))
                })?;
                let mut tos = 0u8;
                for c in msg.cmsgs().unwrap() {
                    match c {
                        ControlMessageOwned::Ipv4Tos(t) => tos = t,
                        ControlMessageOwned::Ipv6TClass(t) => tos = t as u8,
                        _ => {}
                    }
                }
                return Some((from, buf[..n].to_vec(), tos));
            }
            Err(nix::errno::Errno::EAGAIN) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(nix::errno::Errno::EAGAIN) => return None,
            Err(e) => panic!("recvmsg: {e}"),
        }
    }
}

/// Sends one UDP datagram in an IPv6 packet written whole (raw socket,
/// `IPPROTO_RAW`) from `ns` to the next hop `via`: for destinations the
/// kernel's UDP sockets refuse to send to, such as IPv4-mapped ones.
pub fn send_raw_udp6(
    ns: &Netns,
    src: std::net::SocketAddrV6,
    dst: std::net::SocketAddrV6,
    via: std::net::Ipv6Addr,
    payload: &[u8],
) {
    let len = u16::try_from(8 + payload.len()).expect("a small datagram");
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.ip().octets());
    add(&dst.ip().octets());
    add(&u32::from(len).to_be_bytes());
    add(&[0, 0, 0, 17]);
    add(&src.port().to_be_bytes());
    add(&dst.port().to_be_bytes());
    add(&len.to_be_bytes());
    add(payload);
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    let mut packet = vec![6 << 4, 0, 0, 0];
    packet.extend_from_slice(&len.to_be_bytes());
    packet.extend_from_slice(&[17, 64]);
    packet.extend_from_slice(&src.ip().octets());
    packet.extend_from_slice(&dst.ip().octets());
    packet.extend_from_slice(&src.port().to_be_bytes());
    packet.extend_from_slice(&dst.port().to_be_bytes());
    packet.extend_from_slice(&len.to_be_bytes());
    packet.extend_from_slice(&checksum.to_be_bytes());
    packet.extend_from_slice(payload);
    let raw = ns.enter(|| {
        socket2::Socket::new(
            socket2::Domain::IPV6,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(libc_ipproto_raw())),
        )
        .expect("raw IPv6 socket")
    });
    let to: socket2::SockAddr = std::net::SocketAddr::new(std::net::IpAddr::V6(via), 0).into();
    raw.send_to(&packet, &to).expect("raw IPv6 send");
}

/// `IPPROTO_RAW`: the caller writes the IP header.
fn libc_ipproto_raw() -> i32 {
    255
}
