//! Plain DNS over UDP to one upstream, multiplexed over a few long-lived
//! sockets.
//!
//! hickory's UDP client opens a fresh socket per query (a new random port
//! each time), which on a busy gateway costs a socket, an epoll
//! registration and a close per cache miss: in the benchmark that capped
//! forwarding near 18,000 queries/s. Here a handful of marked sockets, on
//! ports the kernel picks at random, stay open; queries get random IDs and
//! each answer is matched by socket, ID, source address and question before
//! it is believed.

use hickory_proto::op::{Edns, Message, MessageType, Query};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use tokio::net::UdpSocket;
use tokio::sync::oneshot;

use crate::net::sockets;

/// Sockets per upstream server.
const SOCKETS: usize = 4;
/// Our EDNS UDP payload size towards upstreams (DNS flag day 2020).
const PAYLOAD: u16 = 1232;

type Pending = Mutex<HashMap<u16, oneshot::Sender<Message>>>;

#[derive(Debug)]
struct Channel {
    socket: Arc<UdpSocket>,
    pending: Arc<Pending>,
}

#[derive(Debug)]
pub struct UdpMux {
    server: SocketAddr,
    mark: u32,
    /// Opened on first use, inside the async runtime.
    channels: OnceLock<Result<Vec<Channel>, io::ErrorKind>>,
    next: AtomicUsize,
}

fn lock(p: &Pending) -> MutexGuard<'_, HashMap<u16, oneshot::Sender<Message>>> {
    p.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Forgets a query's ID when its caller stops waiting (answer or timeout).
struct Waiting<'a> {
    pending: &'a Pending,
    id: u16,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        lock(self.pending).remove(&self.id);
    }
}

impl UdpMux {
    pub fn new(server: SocketAddr, mark: u32) -> Self {
        UdpMux {
            server,
            mark,
            channels: OnceLock::new(),
            next: AtomicUsize::new(0),
        }
    }

    fn channels(&self) -> io::Result<&[Channel]> {
        let opened = self.channels.get_or_init(|| {
            (0..SOCKETS)
                .map(|_| {
                    let std = sockets::marked_udp(sockets::unspecified(self.server), self.mark)?;
                    std.connect(self.server)?;
                    let socket = Arc::new(UdpSocket::from_std(std)?);
                    let pending: Arc<Pending> = Arc::default();
                    tokio::spawn(read_answers(socket.clone(), Arc::downgrade(&pending)));
                    Ok(Channel { socket, pending })
                })
                .collect::<io::Result<Vec<_>>>()
                .map_err(|e| e.kind())
        });
        opened.as_deref().map_err(|k| io::Error::from(*k))
    }

    /// Asks `query` (recursion desired, EDNS) and waits for its answer. The
    /// caller bounds the wait.
    pub async fn query(&self, query: &Query) -> io::Result<Message> {
        let channels = self.channels()?;
        let channel = &channels[self.next.fetch_add(1, Ordering::Relaxed) % channels.len()];
        let (tx, rx) = oneshot::channel();
        let mut message = Message::query();
        let id = {
            let mut pending = lock(&channel.pending);
            // A random ID that is not in flight on this socket.
            while pending.contains_key(&message.metadata.id) {
                message = Message::query();
            }
            pending.insert(message.metadata.id, tx);
            message.metadata.id
        };
        let _waiting = Waiting {
            pending: &channel.pending,
            id,
        };
        message.metadata.recursion_desired = true;
        message.add_query(query.clone());
        let mut edns = Edns::new();
        edns.set_max_payload(PAYLOAD);
        message.set_edns(edns);
        let bytes = message.to_vec().map_err(io::Error::other)?;
        channel.socket.send(&bytes).await?;
        let answer = rx.await.map_err(|_| io::Error::other("upstream socket closed"))?;
        if !same_question(&answer, query) {
            return Err(io::Error::other("answer to another question"));
        }
        Ok(answer)
    }
}

fn same_question(answer: &Message, query: &Query) -> bool {
    answer.queries.first().is_some_and(|q| {
        q.query_type() == query.query_type() && q.query_class() == query.query_class() && q.name() == query.name()
    })
}

/// Hands each answer on `socket` to the query waiting for its ID. The
/// socket is connected, so the kernel already dropped anything not from the
/// server; answers for IDs nobody waits for are dropped here.
async fn read_answers(socket: Arc<UdpSocket>, pending: std::sync::Weak<Pending>) {
    let mut buf = vec![0u8; 65_535];
    loop {
        let n = match socket.recv(&mut buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => continue,
            Err(_) => return,
        };
        let Some(pending) = pending.upgrade() else { return };
        let Ok(answer) = Message::from_vec(buf.get(..n).unwrap_or_default()) else {
            continue;
        };
        if answer.metadata.message_type != MessageType::Response {
            continue;
        }
        if let Some(tx) = lock(&pending).remove(&answer.metadata.id) {
            let _ = tx.send(answer);
        }
    }
}
