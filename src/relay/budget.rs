//! The descriptor budget.
//!
//! A process that runs out of descriptors fails everything at once: new
//! flows, DNS over TCP, even the metrics that would say why. So tproxyd
//! plans its descriptors up front. Out of the soft `RLIMIT_NOFILE` (raised
//! to the hard limit at start), `relay.fd_budget` is what the relay and DNS
//! may use; `relay.fd_reserve` of it is kept for what must keep working
//! under attack (the admin endpoint, DNS over TCP, DNS upstream sockets,
//! listeners, logs); an eighth of the rest, at most [`DNS_UPSTREAM_MAX`],
//! goes to the DNS engine's pools of upstream UDP sockets (each busy
//! upstream server keeps about a thousand, for port entropy); up to
//! `relay.reply_sockets` go to reply sockets; the rest carry flows (pooled, full-cone and SOCKS5 upstream sockets). A
//! flow's socket is taken as a [`Permit`] and handed back when it closes;
//! when none is left the caller evicts a flow instead of failing
//! (see `SessionTable::evict_for_descriptor`).

use crate::config::RelayConfig;
/// A count of descriptors in use against a limit, shared by everything that
/// opens flow sockets; one descriptor is a [`Permit`]. The same bound as the
/// DNS service's pending places: taken at once or refused, given back on drop.
pub use crate::places::{Place as Permit, Places as FdShare};

/// Raises the soft descriptor limit to the hard one (and, when privileged,
/// the hard one as far as the kernel allows). Returns the soft limit now
/// in force.
pub fn raise_fd_limit() -> usize {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let wanted = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard)
        .max(hard);
    if setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_err() && soft < hard {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    soft_fd_limit()
}

/// The soft descriptor limit in force.
pub fn soft_fd_limit() -> usize {
    use nix::sys::resource::{Resource, getrlimit};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| usize::try_from(soft).unwrap_or(usize::MAX))
}

/// Grows the process's descriptor table to hold `n` descriptors now, and
/// returns the number it holds room for (at least `n` unless the limit is
/// lower).
///
/// The kernel grows the table by doubling it as descriptors are opened,
/// and in a process with more than one thread each growth waits for an
/// RCU grace period (`expand_files` → `synchronize_rcu`): the thread that
/// opens the socket sleeps 5–15 ms. During a flood of new flows that
/// thread is the relay's worker, and every other client's datagrams wait
/// with it: seven such sleeps were most of the stalls of the
/// 20,000-destination flood (perf sched, docs/BENCHMARKS.md). Grown once
/// here, while the process is still one thread, it never grows under load
/// (up to `n`). The cost is kernel memory, about 8 bytes a slot, never
/// given back; the caller sizes `n` by what the relay can use.
pub fn presize_fd_table(n: usize) -> usize {
    let top = n.min(soft_fd_limit()).saturating_sub(1);
    let Ok(top) = libc::c_int::try_from(top) else {
        return 0;
    };
    if top <= 0 {
        return 0;
    }
    let Ok(null) = std::fs::File::open("/dev/null") else {
        return 0;
    };
    // SAFETY: plain system calls on a descriptor we own; the duplicate is
    // closed at once (its number is not used by anything else: F_DUPFD
    // picked a free one).
    unsafe {
        let dup = libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&null), libc::F_DUPFD_CLOEXEC, top);
        if dup < 0 {
            return 0;
        }
        libc::close(dup);
    }
    top as usize + 1
}

/// Descriptors this process has open now (a directory listing; for
/// metrics, not for the data path).
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1))
}

/// The DNS upstream socket pools' share at most: room for a few busy
/// servers at the thousand sockets each that keeps 1,000 consecutive
/// queries on as many ports.
pub const DNS_UPSTREAM_MAX: usize = 4_096;

/// How the descriptor limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The soft limit the plan was made for.
    pub limit: usize,
    /// Kept for the admin endpoint, DNS (TCP clients and upstreams),
    /// listeners and logs.
    pub reserve: usize,
    /// The DNS upstream socket pools, all servers together.
    pub dns_upstream: usize,
    /// Reply sockets at most.
    pub reply: usize,
    /// Flow sockets at most (pooled, full cone, SOCKS5).
    pub flows: usize,
}

impl Plan {
    /// Descriptors the relay may have open at once under this plan: each
    /// flow holds one socket at most (a SOCKS5 flow two, rare enough to
    /// leave out), so the table's capacity bounds the flow sockets. Used to
    /// size the descriptor table up front ([`presize_fd_table`]).
    pub fn descriptors_used(&self, config: &RelayConfig) -> usize {
        let flows = self.flows.min(config.session_capacity.get());
        self.reserve + self.reply + flows
    }

    /// The plan for `config` under the soft limit `limit`.
    pub fn new(config: &RelayConfig, limit: usize) -> Plan {
        let budget = config.fd_budget.map_or(limit / 10 * 9, |b| b.get()).min(limit);
        let reserve = config.fd_reserve.min(budget / 2);
        let usable = budget - reserve;
        let dns_upstream = (usable / 8).min(DNS_UPSTREAM_MAX);
        let usable = usable - dns_upstream;
        // Reply sockets are one per destination address; a quarter of the
        // usable budget at most, so flows always keep the larger part.
        let reply = config.reply_sockets.get().min(usable / 4).max(1);
        let flows = usable.saturating_sub(reply).max(1);
        Plan {
            limit,
            reserve,
            dns_upstream,
            reply,
            flows,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroUsize;

    #[test]
    fn permits_are_bounded_and_given_back() {
        let share = FdShare::new(2);
        let a = share.try_take().unwrap();
        let _b = share.try_take().unwrap();
        assert!(share.try_take().is_none());
        drop(a);
        assert!(share.try_take().is_some());
        assert_eq!(share.held(), 1);
        // A reload's lower limit refuses new descriptors until enough are back.
        share.set_max(1);
        assert!(share.try_take().is_none());
    }

    #[test]
    fn the_plan_keeps_a_reserve_and_caps_reply_sockets() {
        let mut c = RelayConfig::default();
        let p = Plan::new(&c, 20_000);
        assert_eq!(p.reserve, c.fd_reserve);
        assert_eq!(p.reply, 1_024);
        assert_eq!(p.dns_upstream, (18_000 - c.fd_reserve) / 8);
        assert_eq!(p.reserve + p.dns_upstream + p.reply + p.flows, 18_000);
        c.fd_budget = NonZeroUsize::new(2_000);
        c.reply_sockets = NonZeroUsize::new(100_000).unwrap();
        let p = Plan::new(&c, 20_000);
        assert_eq!(p.reply, (2_000 - c.fd_reserve - p.dns_upstream) / 4);
        assert!(p.reserve + p.dns_upstream + p.reply + p.flows <= 2_000);
        // A large budget caps the DNS pools' share.
        c.fd_budget = None;
        assert_eq!(Plan::new(&c, 1 << 20).dns_upstream, DNS_UPSTREAM_MAX);
        // A budget above the limit is cut to the limit.
        c.fd_budget = NonZeroUsize::new(1_000_000);
        assert!(Plan::new(&c, 4_096).flows < 4_096);
    }

    #[test]
    fn the_descriptor_table_is_grown_up_front() {
        let p = Plan::new(&RelayConfig::default(), 1 << 20);
        assert_eq!(p.descriptors_used(&RelayConfig::default()), 512 + 1_024 + 65_536);
        let room = presize_fd_table(5_000.min(soft_fd_limit()));
        assert_eq!(room, 5_000.min(soft_fd_limit()));
        // The slot used to grow it is free again.
        // SAFETY: only asks whether the descriptor is open.
        assert_eq!(unsafe { libc::fcntl(room as i32 - 1, libc::F_GETFD) }, -1);
    }
}
