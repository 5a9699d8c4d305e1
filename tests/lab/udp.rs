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
    match sock.recv_from(&mut buf) {
        Ok((n, from)) => Some((from, buf[..n].to_vec())),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            None
        }
        Err(e) => panic!("recv: {e}"),
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
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let seen: Log = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (socket, seen, stop) = (socket.try_clone().unwrap(), seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        seen.lock().unwrap().push((from, buf[..n].to_vec()));
                        let _ = socket.send_to(&buf[..n], from);
                    }
                }
            })
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
        self.received()
            .last()
            .expect("echo server received nothing")
            .0
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
