//! The lab's scriptable DNS upstream: it records every query (who sent it,
//! from which port, with which ID) and answers as told — by a
//! [`Behaviour`] (late, with an error code, not at all, or with a forgery
//! first) or by a closure building any message, for upstream behaviour
//! dnsmasq will not produce (records about other names, huge answers,
//! CNAME loops). Its socket is bound to the upstream's address and port
//! 53, so whatever it sends is exactly what an off-path spoofer forging
//! that source would send. Raw-socket helpers forge ICMP errors the same
//! way.

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    threads: Vec<JoinHandle<()>>,
    socket: UdpSocket,
}

/// What the fake sends for one query received over UDP: datagrams, each
/// after its delay.
type Script = dyn Fn(&Message) -> Vec<(Duration, Vec<u8>)> + Send + Sync;

/// Builds an upstream's answer to one question, for [`FakeDns::scripted`]:
/// the fake copies the ID and question in and sets QR, RD and RA.
pub type Responder = dyn Fn(&Query) -> Message + Send + Sync;

/// Largest UDP answer [`FakeDns::scripted`] sends whole; above it, TC=1.
const UDP_LIMIT: usize = 1232;

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
    /// UDP only, answering every query per `behaviour`.
    pub fn start(ns: &Netns, addr: SocketAddr, behaviour: Behaviour) -> FakeDns {
        FakeDns::serve(ns, addr, Arc::new(move |query: &Message| behaviour.script(query)))
    }

    /// UDP and TCP on `ip` port 53, answering with what `respond` builds.
    /// UDP answers above 1232 bytes go out truncated (TC=1), so the asker
    /// retries over TCP, as with a real server.
    pub fn scripted(ns: &Netns, ip: IpAddr, respond: impl Fn(&Query) -> Message + Send + Sync + 'static) -> FakeDns {
        let addr = SocketAddr::new(ip, 53);
        let respond: Arc<Responder> = Arc::new(respond);
        let udp = {
            let respond = respond.clone();
            move |query: &Message| {
                answer_bytes(&*respond, query, UDP_LIMIT)
                    .map(|b| (Duration::ZERO, b))
                    .into_iter()
                    .collect()
            }
        };
        let mut fake = FakeDns::serve(ns, addr, Arc::new(udp));
        let listener = ns.enter(move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind tcp {addr}: {e}")));
        let seen = fake.seen.clone();
        let answer = move |from: SocketAddr, bytes: &[u8]| {
            let query = Message::from_vec(bytes).ok()?;
            record(&seen, from, &query);
            answer_bytes(&*respond, &query, usize::from(u16::MAX))
        };
        fake.threads.push(serve_tcp(
            listener,
            fake.stop.clone(),
            Arc::default(),
            Arc::default(),
            Arc::new(answer),
        ));
        fake
    }

    fn serve(ns: &Netns, addr: SocketAddr, script: Arc<Script>) -> FakeDns {
        let socket = socket(ns, addr);
        socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (socket, seen, stop) = (socket.try_clone().unwrap(), seen.clone(), stop.clone());
            std::thread::spawn(move || serve_udp(socket, seen, stop, script))
        };
        FakeDns {
            addr,
            seen,
            stop,
            threads: vec![thread],
            socket,
        }
    }

    /// Every query received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Queries received for `name` (any case, trailing dot or not).
    pub fn asked(&self, name: &str) -> usize {
        let name = name.trim_end_matches('.');
        self.seen().iter().filter(|s| s.name.eq_ignore_ascii_case(name)).count()
    }

    /// The names asked, in order (for messages).
    pub fn names(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.name).collect()
    }

    /// Sends `bytes` from the upstream's address and port.
    pub fn send_to(&self, bytes: &[u8], to: SocketAddr) {
        let _ = self.socket.send_to(bytes, to);
    }
}

impl Behaviour {
    /// The datagrams this behaviour sends for `query`.
    fn script(&self, query: &Message) -> Vec<(Duration, Vec<u8>)> {
        let mut out = Vec::new();
        if self.forge_wrong_question_first {
            let mut forged = query.clone();
            let name = query.queries.first().map(|q| q.name().to_string()).unwrap_or_default();
            forged.queries = vec![Query::query(
                Name::from_str(&format!("evil.{name}")).unwrap(),
                RecordType::A,
            )];
            let forged = response(&forged, Reply::Address(Ipv4Addr::new(203, 0, 113, 66)));
            out.push((Duration::ZERO, forged.to_vec().unwrap()));
        }
        if !matches!(self.reply, Reply::Silent) {
            out.push((self.delay, response(query, self.reply).to_vec().unwrap()));
        }
        out
    }
}

/// `respond`'s answer to `query`, made a response to it; truncated when
/// longer than `limit`.
fn answer_bytes(respond: &Responder, query: &Message, limit: usize) -> Option<Vec<u8>> {
    let q = query.queries.first()?.clone();
    let mut m = respond(&q);
    m.metadata.id = query.metadata.id;
    m.metadata.message_type = MessageType::Response;
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.queries = vec![q];
    let full = m.to_vec().ok()?;
    if full.len() <= limit {
        Some(full)
    } else {
        m.truncate().to_vec().ok()
    }
}

fn record(seen: &Mutex<Vec<Seen>>, from: SocketAddr, query: &Message) {
    if let Some(q) = query.queries.first() {
        seen.lock().unwrap().push(Seen {
            from,
            id: query.metadata.id,
            name: q.name().to_string().trim_end_matches('.').to_string(),
            qtype: q.query_type(),
        });
    }
}

fn serve_udp(socket: UdpSocket, seen: Arc<Mutex<Vec<Seen>>>, stop: Arc<AtomicBool>, script: Arc<Script>) {
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
        record(&seen, from, &query);
        for (delay, bytes) in script(&query) {
            if delay.is_zero() {
                let _ = socket.send_to(&bytes, from);
            } else {
                let socket = socket.try_clone().unwrap();
                std::thread::spawn(move || {
                    std::thread::sleep(delay);
                    let _ = socket.send_to(&bytes, from);
                });
            }
        }
    }
}

/// How a TCP fake answers one query (from the peer, the query's bytes):
/// the answer's bytes, or `None` to close the connection.
type TcpAnswer = dyn Fn(SocketAddr, &[u8]) -> Option<Vec<u8>> + Send + Sync;

/// Accepts connections on `listener` until `stop`, answering each
/// length-prefixed query by `answer` and keeping connections open as real
/// servers do; counts the connections accepted and those still open.
fn serve_tcp(
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    answer: Arc<TcpAnswer>,
) -> JoinHandle<()> {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut conn, peer)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            accepted.fetch_add(1, Ordering::Relaxed);
            open.fetch_add(1, Ordering::Relaxed);
            let (open, stop, answer) = (open.clone(), stop.clone(), answer.clone());
            std::thread::spawn(move || {
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                let mut len = [0u8; 2];
                while !stop.load(Ordering::Relaxed) {
                    match conn.read_exact(&mut len) {
                        Ok(()) => {}
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                            continue;
                        }
                        Err(_) => break,
                    }
                    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    if conn.read_exact(&mut body).is_err() {
                        break;
                    }
                    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                    let Some(reply) = answer(peer, &body) else { break };
                    let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
                    framed.extend_from_slice(&reply);
                    if conn.write_all(&framed).is_err() {
                        break;
                    }
                }
                open.fetch_sub(1, Ordering::Relaxed);
            });
        }
    })
}

impl Drop for FakeDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A DNS-over-TCP fake upstream: answers every query on every connection
/// with `a`, keeps connections open as real servers do, and counts the
/// connections it accepted and those still open.
pub struct FakeTcpDns {
    pub addr: SocketAddr,
    open: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeTcpDns {
    pub fn start(ns: &Netns, addr: SocketAddr, a: Ipv4Addr) -> FakeTcpDns {
        let listener = ns.enter(move || TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")));
        let open: Arc<AtomicUsize> = Arc::default();
        let accepted: Arc<AtomicUsize> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let answer = move |_: SocketAddr, bytes: &[u8]| {
            let query = Message::from_vec(bytes).ok()?;
            response(&query, Reply::Address(a)).to_vec().ok()
        };
        let thread = serve_tcp(listener, stop.clone(), open.clone(), accepted.clone(), Arc::new(answer));
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
