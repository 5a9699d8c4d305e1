//! Busy polling while the relay is idle (`relay.busy_poll_us`, off by
//! default).
//!
//! A relay that sleeps in `epoll_wait` between datagrams is woken twice
//! per round trip of a request/response flow: once for the request, once
//! for the reply. On a virtual machine whose idle CPUs halt (a `HLT` exit
//! to the host), a wake-up of a thread on a halted CPU costs an
//! inter-processor interrupt through the host and the CPU's return from
//! the halt: tens of microseconds, far more than the relay's own work (see
//! docs/BENCHMARKS.md, "Added RTT: where a round trip's time goes").
//!
//! With a budget set, a worker about to sleep first asks one `epoll` set
//! holding the relay's listening and pooled upstream sockets whether any
//! has a datagram, again and again, for up to the budget; it stops at the
//! first one (the runtime's own wait then returns at once, without a
//! sleep) or when the budget is spent (then it sleeps as before). The
//! price is CPU: every idle stretch shorter than the budget is spent
//! spinning, so a flow that sends a datagram every 100 µs keeps a CPU
//! busy. Worth it only where latency matters more than a CPU.
//!
//! Sockets are added when they are made and never removed by hand:
//! closing a descriptor takes it out of every `epoll` set it is in.

use std::io;
use std::os::fd::RawFd;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::poll::Poller;

/// The process's spin set, when a budget is configured.
static SPIN: OnceLock<SpinSet> = OnceLock::new();

struct SpinSet {
    poller: Poller,
    budget: Duration,
}

impl SpinSet {
    fn new(budget: Duration) -> io::Result<Self> {
        Ok(SpinSet {
            poller: Poller::new()?,
            budget,
        })
    }

    fn watch(&self, fd: RawFd) {
        if let Err(e) = self.poller.add(fd, 0) {
            tracing::debug!(fd, error = %e, "busy polling: socket not added");
        }
    }

    fn spin(&self) {
        let start = Instant::now();
        while !self.poller.any_ready() && start.elapsed() < self.budget {
            std::hint::spin_loop();
        }
    }
}

/// Turns busy polling on with `budget` per idle stretch (nothing when
/// zero). Called once, before any socket is watched; a second call keeps
/// the first budget (a reload cannot change it: the runtime is built).
pub fn install(budget: Duration) -> io::Result<()> {
    if budget.is_zero() || SPIN.get().is_some() {
        return Ok(());
    }
    // Lost a race with another install: the first one stays.
    let _ = SPIN.set(SpinSet::new(budget)?);
    Ok(())
}

/// Whether busy polling is on.
pub fn enabled() -> bool {
    SPIN.get().is_some()
}

/// Adds `fd` to the spin set (nothing when busy polling is off). The
/// caller keeps `fd` open while it matters; closing it removes it.
/// A failure only means this socket is not spun on: logged, not fatal.
pub fn watch(fd: RawFd) {
    if let Some(set) = SPIN.get() {
        set.watch(fd);
    }
}

/// Spins until a watched socket has a datagram or the budget is spent.
/// For the runtime's `on_thread_park` hook: it runs on a worker that has
/// no task to run and is about to sleep.
pub fn while_idle() {
    if let Some(set) = SPIN.get() {
        set.spin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_spin_ends_at_a_datagram_or_at_the_budget() {
        // A set of its own: the process-wide one is never installed here.
        let budget = Duration::from_millis(300);
        let set = SpinSet::new(budget).unwrap();
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        set.watch(sock.as_raw_fd());
        // Nothing queued: the whole budget is spent.
        let t = Instant::now();
        set.spin();
        assert!(t.elapsed() >= budget);
        // A datagram queued: the spin ends at once (well before the
        // budget, whatever else the machine runs).
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"x", sock.local_addr().unwrap()).unwrap();
        let t = Instant::now();
        set.spin();
        assert!(t.elapsed() < budget);
        // Off by default: the hook returns at once.
        assert!(!enabled());
        let t = Instant::now();
        while_idle();
        assert!(t.elapsed() < budget);
    }
}
