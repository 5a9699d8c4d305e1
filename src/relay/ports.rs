//! Local ports for one-destination (symmetric) upstream sockets.
//!
//! Left to the kernel, every UDP socket gets a port of its own, so a
//! gateway runs out after ~28,000 flows (the default ephemeral range). A
//! connected UDP socket is identified by its remote address too, so one
//! local port can serve one flow *per destination*: the kernel delivers a
//! datagram from R to port p to the socket on p connected to R. This
//! allocator hands out (port, destination) pairs that are not in use, and
//! the lease gives the pair back when the flow ends. Sockets sharing a port
//! set `SO_REUSEADDR`; a port some other program holds exclusively is
//! skipped (its bind fails and the next port is tried).

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

#[derive(Debug)]
pub struct PortAllocator {
    first: u16,
    count: u32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    in_use: HashSet<(u16, SocketAddr)>,
    cursor: u32,
}

/// A (port, destination) pair held by one flow.
#[derive(Debug)]
pub struct PortLease {
    pub port: u16,
    remote: SocketAddr,
    allocator: Arc<PortAllocator>,
}

impl Drop for PortLease {
    fn drop(&mut self) {
        self.allocator
            .lock()
            .in_use
            .remove(&(self.port, self.remote));
    }
}

impl PortAllocator {
    /// Ports from the kernel's ephemeral range (`ip_local_port_range`).
    pub fn from_system() -> Arc<Self> {
        let range =
            std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap_or_default();
        let mut it = range
            .split_whitespace()
            .filter_map(|v| v.parse::<u16>().ok());
        let (lo, hi) = match (it.next(), it.next()) {
            (Some(lo), Some(hi)) if lo > 0 && lo <= hi => (lo, hi),
            _ => (32_768, 60_999),
        };
        Self::new(lo, hi)
    }

    pub fn new(first: u16, last: u16) -> Arc<Self> {
        let count = u32::from(last.max(first)) - u32::from(first) + 1;
        Arc::new(PortAllocator {
            first,
            count,
            state: Mutex::new(State::default()),
        })
    }

    /// Calls `bind` with free ports for `remote`, in turn, until it
    /// succeeds; returns its socket and the lease on the port.
    pub fn lease<T>(
        self: &Arc<Self>,
        remote: SocketAddr,
        mut bind: impl FnMut(u16) -> io::Result<T>,
    ) -> io::Result<(T, PortLease)> {
        // Bounded: a range where every port is taken for this remote, or
        // held by others, ends in an error rather than a spin.
        for _ in 0..self.count.min(4_096) {
            let port = {
                let mut s = self.lock();
                let mut found = None;
                for _ in 0..self.count {
                    let p = self.first.wrapping_add((s.cursor % self.count) as u16);
                    s.cursor = s.cursor.wrapping_add(1);
                    if s.in_use.insert((p, remote)) {
                        found = Some(p);
                        break;
                    }
                }
                found.ok_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "no free port for this destination",
                    )
                })?
            };
            let lease = PortLease {
                port,
                remote,
                allocator: self.clone(),
            };
            match bind(port) {
                Ok(sock) => return Ok((sock, lease)),
                // Held exclusively by another program: try the next port
                // (dropping the lease frees the pair).
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            "no bindable port for this destination",
        ))
    }

    /// Pairs in use.
    pub fn leased(&self) -> usize {
        self.lock().in_use.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_port_is_shared_across_destinations_but_not_within_one() {
        let a = PortAllocator::new(40_000, 40_002);
        let r1 = sa("198.51.100.7:7000");
        let r2 = sa("198.51.100.8:7000");
        let ok = |p: u16| Ok::<u16, io::Error>(p);
        let (p1, l1) = a.lease(r1, ok).unwrap();
        let (p2, _l2) = a.lease(r1, ok).unwrap();
        let (p3, _l3) = a.lease(r1, ok).unwrap();
        let mut ports = vec![p1, p2, p3];
        ports.sort();
        assert_eq!(ports, vec![40_000, 40_001, 40_002]);
        assert!(a.lease(r1, ok).is_err(), "three ports, three flows to r1");
        // Another destination may reuse all three.
        for _ in 0..3 {
            a.lease(r2, ok).map(std::mem::forget).unwrap();
        }
        drop(l1);
        assert_eq!(
            a.lease(r1, ok).unwrap().0,
            p1,
            "a released pair is free again"
        );
    }

    #[test]
    fn ports_taken_by_others_are_skipped() {
        let a = PortAllocator::new(50_000, 50_003);
        let r = sa("198.51.100.7:9");
        let (port, _lease) = a
            .lease(r, |p| {
                if p < 50_002 {
                    Err(io::Error::from(io::ErrorKind::AddrInUse))
                } else {
                    Ok(p)
                }
            })
            .unwrap();
        assert_eq!(port, 50_002);
        assert_eq!(a.leased(), 1, "failed attempts give their pair back");
    }
}
