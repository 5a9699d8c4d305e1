//! A scriptable DNS upstream for attack tests: it records every query (who
//! sent it, from which port, with which ID) and answers as told — late,
//! with an error code, not at all, or with a forgery first. Its socket is
//! bound to the upstream's address and port 53, so whatever it sends is
//! exactly what an off-path spoofer forging that source would send.
//! Raw-socket helpers forge ICMP errors the same way.

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::Netns;
use super::udp::socket;

/// How the fake upstream answers.
#[derive(Debug, Clone, Copy)]
pub enum Reply {
    /// An A record with this address, TTL 300.
    Address(Ipv4Addr),
    /// An empty answer with this RCODE.
    Rcode(ResponseCode),
    /// Nothing: a black hole.
    Silent,
}

#[derive(Debug, Clone, Copy)]
pub struct Behaviour {
    pub reply: Reply,
    /// Wait this long before answering.
    pub delay: Duration,
    /// First send an answer with the right ID but another question
    /// (`evil.NAME A 203.0.113.66`), as a spoofer would.
    pub forge_wrong_question_first: bool,
}

impl Behaviour {
    pub fn answer(a: Ipv4Addr) -> Behaviour {
        Behaviour {
            reply: Reply::Address(a),
            delay: Duration::ZERO,
            forge_wrong_question_first: false,
        }
    }
    pub fn late(a: Ipv4Addr, delay: Duration) -> Behaviour {
        Behaviour {
            delay,
            ..Behaviour::answer(a)
        }
    }
    pub fn rcode(rcode: ResponseCode) -> Behaviour {
        Behaviour {
            reply: Reply::Rcode(rcode),
            ..Behaviour::answer(Ipv4Addr::UNSPECIFIED)
        }
    }
    pub fn silent() -> Behaviour {
        Behaviour {
            reply: Reply::Silent,
            ..Behaviour::answer(Ipv4Addr::UNSPECIFIED)
        }
    }
}

/// One query the fake upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub from: SocketAddr,
    pub id: u16,
    /// The name exactly as sent (case kept), without the trailing dot.
    pub name: String,
    pub qtype: RecordType,
}

pub struct FakeDns {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    socket: UdpSocket,
}

/// The answer to `query` per `reply`.
pub fn response(query: &Message, reply: Reply) -> Message {
    let mut m = Message::response(query.metadata.id, OpCode::Query);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    for q in &query.queries {
        m.add_query(q.clone());
    }
    match reply {
        Reply::Address(a) => {
            if let Some(q) = query.queries.first()
                && q.query_type() == RecordType::A
            {
                m.add_answer(Record::from_rdata(q.name().clone(), 300, RData::A(A(a))));
            }
        }
        Reply::Rcode(rcode) => m.metadata.response_code = rcode,
        Reply::Silent => {}
    }
    m
}

impl FakeDns {
    pub fn start(ns: &Netns, addr: SocketAddr, behaviour: Behaviour) -> FakeDns {
        let socket = socket(ns, addr);
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (socket, seen, stop) = (socket.try_clone().unwrap(), seen.clone(), stop.clone());
            std::thread::spawn(move || serve(socket, seen, stop, behaviour))
        };
        FakeDns {
            addr,
            seen,
            stop,
            thread: Some(thread),
            socket,
        }
    }

    /// Every query received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Queries received for `name` (any case).
    pub fn asked(&self, name: &str) -> usize {
        self.seen().iter().filter(|s| s.name.eq_ignore_ascii_case(name)).count()
    }

    /// Sends `bytes` from the upstream's address and port.
    pub fn send_to(&self, bytes: &[u8], to: SocketAddr) {
        let _ = self.socket.send_to(bytes, to);
    }
}

fn serve(socket: UdpSocket, seen: Arc<Mutex<Vec<Seen>>>, stop: Arc<AtomicBool>, b: Behaviour) {
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        let Ok(query) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        if query.metadata.message_type != MessageType::Query {
            continue;
        }
        if let Some(q) = query.queries.first() {
            seen.lock().unwrap().push(Seen {
                from,
                id: query.metadata.id,
                name: q.name().to_string().trim_end_matches('.').to_string(),
                qtype: q.query_type(),
            });
        }
        if b.forge_wrong_question_first {
            let mut forged = query.clone();
            let name = query.queries.first().map(|q| q.name().to_string()).unwrap_or_default();
            forged.queries = vec![Query::query(
                Name::from_str(&format!("evil.{name}")).unwrap(),
                RecordType::A,
            )];
            let forged = response(&forged, Reply::Address(Ipv4Addr::new(203, 0, 113, 66)));
            let _ = socket.send_to(&forged.to_vec().unwrap(), from);
        }
        if matches!(b.reply, Reply::Silent) {
            continue;
        }
        let bytes = response(&query, b.reply).to_vec().unwrap();
        if b.delay.is_zero() {
            let _ = socket.send_to(&bytes, from);
        } else {
            let socket = socket.try_clone().unwrap();
            let delay = b.delay;
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                let _ = socket.send_to(&bytes, from);
            });
        }
    }
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A DNS-over-TCP fake upstream: answers every query on every connection
/// with `a`, keeps connections open as real servers do, and counts the
/// connections it accepted and those still open.
pub struct FakeTcpDns {
    pub addr: SocketAddr,
    open: Arc<std::sync::atomic::AtomicUsize>,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeTcpDns {
    pub fn start(ns: &Netns, addr: SocketAddr, a: Ipv4Addr) -> FakeTcpDns {
        let listener = ns.enter(move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
        listener.set_nonblocking(true).unwrap();
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (open, accepted, stop) = (open.clone(), accepted.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut conn, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    open.fetch_add(1, Ordering::Relaxed);
                    let (open, stop) = (open.clone(), stop.clone());
                    std::thread::spawn(move || {
                        let _ = conn.set_nonblocking(false);
                        let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                        let mut len = [0u8; 2];
                        while !stop.load(Ordering::Relaxed) {
                            match conn.read_exact(&mut len) {
                                Ok(()) => {}
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                    ) =>
                                {
                                    continue;
                                }
                                Err(_) => break,
                            }
                            let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                            if conn.read_exact(&mut body).is_err() {
                                break;
                            }
                            let Ok(query) = Message::from_vec(&body) else { break };
                            let answer = response(&query, Reply::Address(a)).to_vec().unwrap();
                            let mut framed = (answer.len() as u16).to_be_bytes().to_vec();
                            framed.extend_from_slice(&answer);
                            if conn.write_all(&framed).is_err() {
                                break;
                            }
                        }
                        open.fetch_sub(1, Ordering::Relaxed);
                    });
                }
            })
        };
        FakeTcpDns {
            addr,
            open,
            accepted,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections still open from the gateway.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FakeTcpDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A query for `name` `qtype` with ID `id`, recursion desired.
pub fn query_bytes(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    m.to_vec().unwrap()
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMP destination-unreachable with `code`, quoting a UDP datagram
/// `quoted_src:quoted_port → quoted_dst:53` (what a router or a spoofer
/// would send back about it).
pub fn icmp_unreachable(code: u8, quoted_src: Ipv4Addr, quoted_port: u16, quoted_dst: Ipv4Addr) -> Vec<u8> {
    let mut ip = vec![0x45, 0, 0, 40, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
    ip.extend_from_slice(&quoted_src.octets());
    ip.extend_from_slice(&quoted_dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut udp = Vec::new();
    udp.extend_from_slice(&quoted_port.to_be_bytes());
    udp.extend_from_slice(&53u16.to_be_bytes());
    udp.extend_from_slice(&20u16.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(&[0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
    let mut icmp = vec![3, code, 0, 0, 0, 0, 0, 0];
    if code == 4 {
        // "Fragmentation needed": a plausible next-hop MTU.
        icmp[6..8].copy_from_slice(&1400u16.to_be_bytes());
    }
    icmp.extend_from_slice(&ip);
    icmp.extend_from_slice(&udp);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    icmp
}

/// A raw ICMP socket in `ns`, for forging ICMP errors.
pub fn raw_icmp_socket(ns: &Netns) -> socket2::Socket {
    ns.enter(|| {
        socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::ICMPV4),
        )
        .expect("raw ICMP socket")
    })
}

/// The ephemeral port range of `ns`.
pub fn ephemeral_ports(ns: &Netns) -> (u16, u16) {
    let text = ns.sh("cat /proc/sys/net/ipv4/ip_local_port_range");
    let mut it = text.split_whitespace().map(|v| v.parse::<u16>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

pub fn v4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(v) => v,
        IpAddr::V6(_) => panic!("an IPv4 address was expected"),
    }
}
