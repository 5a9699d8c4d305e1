//! A readiness set of many sockets, asked in one system call.
//!
//! Hundreds of pooled upstream sockets each carry a few replies per
//! second; woken one by one, every reply costs a wake-up and a task poll of
//! its own, and replies to different clients can never share a send. One
//! `epoll` instance per reader, itself watched by the async runtime, turns
//! that into one wake-up per *burst*: `epoll_wait` names every socket with
//! something queued, the reader empties them all, then sends the replies
//! together. Level-triggered, so a socket not emptied this round is named
//! again next round and nothing is ever left behind.
//!
//! The pool readers now learn of datagrams from the runtime itself (see
//! `relay::pool_readers`) and use a set like this one only for errors
//! ([`Poller::add_errors_only`]): the runtime does not wake a reader for
//! an ICMP error alone.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One readiness report: the token given at [`Poller::add`] and whether
/// the socket has datagrams and/or queued errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    pub token: u64,
    pub readable: bool,
    pub error: bool,
}

/// An `epoll` instance (close-on-exec), level-triggered.
#[derive(Debug)]
pub struct Poller {
    fd: OwnedFd,
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain system call; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor owned by nobody else.
        Ok(Poller {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for datagrams (errors are always reported), naming it
    /// `token` in events. The caller keeps `fd` open while it is watched;
    /// closing it removes it from the set.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: `ev` is valid for the call; the kernel copies it.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for errors only (`EPOLLERR`, e.g. an ICMP error in
    /// its queue, and `EPOLLHUP`, which `epoll` always reports): a
    /// datagram arriving on `fd` neither makes the set ready nor wakes
    /// whoever watches the set.
    pub fn add_errors_only(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: token };
        // SAFETY: as in `add`.
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: as in `add` (the event is ignored but must be non-null on
        // old kernels).
        if unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether any watched socket is ready now, without waiting (an
    /// error counts as not ready).
    pub fn any_ready(&self) -> bool {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: room for one event; the kernel writes at most one.
        unsafe { libc::epoll_wait(self.fd.as_raw_fd(), &mut ev, 1, 0) > 0 }
    }

    /// The sockets ready now, without waiting: at most `raw.capacity()`
    /// of them (at least one), into `out`. `raw` is the kernel's scratch.
    pub fn ready(&self, raw: &mut Vec<libc::epoll_event>, out: &mut Vec<Event>) -> io::Result<usize> {
        out.clear();
        raw.clear();
        if raw.capacity() == 0 {
            raw.reserve(1);
        }
        let max = raw.capacity().min(i32::MAX as usize);
        // SAFETY: `raw` has room for `max` events; the kernel writes at
        // most that many and says how many.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), raw.as_mut_ptr(), max as i32, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(0)
            } else {
                Err(e)
            };
        }
        // SAFETY: the kernel initialised the first `n` entries.
        unsafe { raw.set_len(n as usize) };
        out.extend(raw.iter().map(|ev| {
            let flags = ev.events;
            Event {
                token: ev.u64,
                readable: flags & libc::EPOLLIN as u32 != 0,
                error: flags & libc::EPOLLERR as u32 != 0,
            }
        }));
        Ok(out.len())
    }
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn names_every_socket_with_something_queued_and_keeps_naming_it() {
        let poller = Poller::new().unwrap();
        let socks: Vec<UdpSocket> = (0..3).map(|_| UdpSocket::bind("127.0.0.1:0").unwrap()).collect();
        for (i, s) in socks.iter().enumerate() {
            poller.add(s.as_raw_fd(), i as u64 + 10).unwrap();
        }
        let (mut raw, mut events) = (Vec::with_capacity(8), Vec::new());
        assert_eq!(poller.ready(&mut raw, &mut events).unwrap(), 0);
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"a", socks[0].local_addr().unwrap()).unwrap();
        tx.send_to(b"c", socks[2].local_addr().unwrap()).unwrap();
        poller.ready(&mut raw, &mut events).unwrap();
        let mut tokens: Vec<u64> = events.iter().map(|e| e.token).collect();
        tokens.sort_unstable();
        assert_eq!(tokens, vec![10, 12]);
        assert!(events.iter().all(|e| e.readable && !e.error));
        // Level-triggered: not read yet, so named again.
        assert_eq!(poller.ready(&mut raw, &mut events).unwrap(), 2);
        let mut buf = [0u8; 8];
        socks[0].recv(&mut buf).unwrap();
        poller.ready(&mut raw, &mut events).unwrap();
        assert_eq!(events.iter().map(|e| e.token).collect::<Vec<_>>(), vec![12]);
        poller.remove(socks[2].as_raw_fd()).unwrap();
        assert_eq!(poller.ready(&mut raw, &mut events).unwrap(), 0);
    }

    #[test]
    fn a_socket_watched_for_errors_only_is_named_for_an_error_not_a_datagram() {
        let poller = Poller::new().unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        crate::net::sockets::report_errors(&sock, false).unwrap();
        poller.add_errors_only(sock.as_raw_fd(), 7).unwrap();
        let (mut raw, mut events) = (Vec::with_capacity(8), Vec::new());
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"a", sock.local_addr().unwrap()).unwrap();
        assert_eq!(poller.ready(&mut raw, &mut events).unwrap(), 0);
        // A datagram to a closed port: the ICMP error lands in the queue.
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap();
        drop(closed);
        sock.send_to(b"b", port).unwrap();
        let mut named = 0;
        for _ in 0..100 {
            named = poller.ready(&mut raw, &mut events).unwrap();
            if named > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(named, 1);
        assert_eq!(
            events[0],
            Event {
                token: 7,
                readable: false,
                error: true
            }
        );
        assert_eq!(crate::net::sockets::drain_error_queue(sock.as_raw_fd()), 1);
        assert_eq!(poller.ready(&mut raw, &mut events).unwrap(), 0);
    }
}
