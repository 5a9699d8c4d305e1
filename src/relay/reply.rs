//! Sending replies to clients from the address they originally asked for.
//!
//! A reply to a flow whose client sent to `198.51.100.7:7000` must leave
//! *from* `198.51.100.7:7000`, or the client's connected socket (or its NAT)
//! drops it. Such a socket is bound to a non-local address, allowed by
//! `IP_TRANSPARENT`, and it is shared by every flow to the same destination:
//! a DNS hijack of 8.8.8.8:53 serves every client through one socket. The
//! sockets live in a bounded LRU so a busy gateway does not spend a file
//! descriptor per packet or per flow on them.
//!
//! When the bind fails with `EADDRINUSE` (a local process holds the
//! wildcard on that port) or `EACCES` (a privileged port, after dropping
//! root), replies for that address go out over raw IP.

use lru::LruCache;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex, PoisonError};

use crate::net::raw::RawSender;
use crate::net::send::send_run;
use crate::net::sockets;
use crate::stats::Stats;
use std::os::fd::AsRawFd;

/// How replies from one source address are sent.
#[derive(Debug)]
pub enum ReplySocket {
    /// A UDP socket bound to the source address.
    Bound(UdpSocket),
    /// Raw IP with a hand-built header, when binding was not possible.
    Raw { src: SocketAddr, raw: Arc<RawSender> },
}

impl ReplySocket {
    /// Sends a run of datagrams to `client` with TOS `tos`; never blocks.
    /// Returns how many were sent.
    pub fn send_to(&self, run: &[&[u8]], client: SocketAddr, tos: Option<u8>) -> io::Result<usize> {
        match self {
            ReplySocket::Bound(sock) => send_run(sock.as_raw_fd(), run, Some(client), tos, client.is_ipv6()),
            ReplySocket::Raw { src, raw } => {
                let mut sent = 0;
                for payload in run {
                    match raw.send(*src, client, payload, tos.unwrap_or(0)) {
                        Ok(()) => sent += 1,
                        Err(e) if sent == 0 => return Err(e),
                        Err(_) => break,
                    }
                }
                Ok(sent)
            }
        }
    }
}

/// The cache of reply sockets, keyed by the address they send from.
#[derive(Debug)]
pub struct ReplySender {
    cache: Mutex<LruCache<SocketAddr, Arc<ReplySocket>>>,
    raw: Arc<RawSender>,
    mark: u32,
    stats: Arc<Stats>,
}

impl ReplySender {
    pub fn new(capacity: NonZeroUsize, mark: u32, stats: Arc<Stats>) -> Self {
        ReplySender {
            cache: Mutex::new(LruCache::new(capacity)),
            raw: Arc::new(RawSender::new(mark)),
            mark,
            stats,
        }
    }

    /// The socket that sends from `src`, opening it on first use.
    pub fn socket_for(&self, src: SocketAddr) -> io::Result<Arc<ReplySocket>> {
        if let Some(s) = self.lock().get(&src) {
            return Ok(s.clone());
        }
        // Open outside the lock: binding is a few syscalls and other flows'
        // replies should not wait on them.
        let sock = match sockets::spoofing_reply(src, self.mark) {
            Ok(s) => ReplySocket::Bound(s),
            // EADDRINUSE: a local process holds the wildcard on that port.
            // EACCES: a port below 1024 and no CAP_NET_BIND_SERVICE (tproxyd
            // keeps only NET_ADMIN and NET_RAW after dropping root).
            Err(e) if matches!(e.kind(), io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied) => {
                tracing::debug!(%src, error = %e, "cannot bind the reply address; replying over raw IP");
                self.stats.reply_raw_fallbacks.inc();
                ReplySocket::Raw {
                    src,
                    raw: self.raw.clone(),
                }
            }
            Err(e) => return Err(e),
        };
        let sock = Arc::new(sock);
        // `push` returns the evicted socket: it closes once the last flow
        // still holding it is gone.
        let mut cache = self.lock();
        if let Some(existing) = cache.get(&src) {
            return Ok(existing.clone());
        }
        cache.push(src, sock.clone());
        Ok(sock)
    }

    /// Sends a run of datagrams to `client` through `sock`, counting the
    /// outcome.
    pub fn send(&self, sock: &ReplySocket, run: &[&[u8]], client: SocketAddr, tos: Option<u8>) {
        match sock.send_to(run, client, tos) {
            Ok(sent) => {
                self.stats.reply_datagrams.add(sent as u64);
                self.stats
                    .reply_bytes
                    .add(run.iter().take(sent).map(|p| p.len() as u64).sum());
                let lost = run.len() - sent.min(run.len());
                if lost > 0 {
                    self.stats.drop_send_buffer_full.add(lost as u64);
                }
            }
            Err(e) if crate::net::would_block(&e) => self.stats.drop_send_buffer_full.add(run.len() as u64),
            Err(e) => {
                self.stats.reply_send_errors.add(run.len() as u64);
                tracing::debug!(%client, error = %e, "reply send failed");
            }
        }
    }

    /// Sends a run to `client` as if from `src` (full-cone replies, whose
    /// source differs from datagram to datagram).
    pub fn send_from(&self, src: SocketAddr, run: &[&[u8]], client: SocketAddr, tos: Option<u8>) {
        match self.socket_for(src) {
            Ok(sock) => self.send(&sock, run, client, tos),
            Err(e) => {
                self.stats.reply_send_errors.inc();
                tracing::debug!(%src, error = %e, "no reply socket");
            }
        }
    }

    /// Changes how many reply sockets are cached.
    pub fn resize(&self, capacity: NonZeroUsize) {
        self.lock().resize(capacity);
    }

    /// Reply sockets currently cached.
    pub fn cached(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LruCache<SocketAddr, Arc<ReplySocket>>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
