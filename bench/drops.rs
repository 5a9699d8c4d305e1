//! Where datagrams die: the kernel's UDP and IP counters in each namespace
//! of the lab (`nstat`), the host's per-CPU backlog drops, and tproxyd's own
//! counters, read before and after a measurement.
//!
//! A datagram the sender wrote but the receiver never read died in one of
//! these places:
//!
//! * a socket receive queue that was full (`UdpRcvbufErrors`): the
//!   receiving application's in the receiver's namespace, or tproxyd's
//!   listener / pool sockets in the gateway's;
//! * on its way out of a namespace (`IpOutDiscards`, `UdpSndbufErrors`);
//! * in a CPU's input backlog before any namespace saw it (the second
//!   column of `/proc/net/softnet_stat`, host-wide: veth hands packets over
//!   through it);
//! * inside tproxyd, which counts what it drops and fails to send.
//!
//! In the gateway, `UdpRcvbufErrors` is split further by tproxyd's own
//! sockets (the per-socket `drops` column of `/proc/PID/net/udp`, for the
//! sockets the daemon holds): its relay listener's members, or the rest
//! (pool and reply sockets). In the many-client mix that told which queue
//! overflowed: the listener member that the bulk flow hashes to.

use std::collections::HashSet;

use crate::lab::{Lab, Netns};
use crate::setup::{self, RELAY_PORT, sh};

/// The kernel counters read in every namespace.
pub const KERNEL: [&str; 5] = [
    "UdpInDatagrams",
    "UdpRcvbufErrors",
    "UdpSndbufErrors",
    "UdpInErrors",
    "IpOutDiscards",
];

/// Counters of one place, in the order of [`KERNEL`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Kernel(pub [u64; 5]);

impl Kernel {
    fn read(ns: &Netns) -> Kernel {
        let text = sh(ns, "nstat -asz 2>/dev/null");
        let mut k = Kernel::default();
        for (i, name) in KERNEL.iter().enumerate() {
            k.0[i] = text
                .lines()
                .find_map(|l| {
                    let mut f = l.split_whitespace();
                    (f.next() == Some(name)).then(|| f.next()?.parse().ok())?
                })
                .unwrap_or(0);
        }
        k
    }

    fn since(&self, before: &Kernel) -> Kernel {
        let mut d = Kernel::default();
        for i in 0..KERNEL.len() {
            d.0[i] = self.0[i].saturating_sub(before.0[i]);
        }
        d
    }

    pub fn in_datagrams(&self) -> u64 {
        self.0[0]
    }
    pub fn rcvbuf_errors(&self) -> u64 {
        self.0[1]
    }
    pub fn sndbuf_errors(&self) -> u64 {
        self.0[2]
    }
    /// `UdpInErrors` includes `UdpRcvbufErrors`; this is the rest
    /// (checksum and similar).
    pub fn other_in_errors(&self) -> u64 {
        self.0[3].saturating_sub(self.0[1])
    }
    pub fn out_discards(&self) -> u64 {
        self.0[4]
    }
}

/// tproxyd's counters that matter for loss and cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Daemon {
    pub from_client: u64,
    pub to_upstream: u64,
    pub to_client: u64,
    /// Every `tproxyd_drops_total` series.
    pub drops: u64,
    /// Every `tproxyd_errors_total` series.
    pub errors: u64,
    /// CPU time (user + system, all threads), microseconds.
    pub cpu_us: f64,
    /// Datagrams dropped at a full queue of tproxyd's relay listener
    /// sockets, and of its other sockets (pool, reply).
    pub listener_drops: u64,
    pub other_socket_drops: u64,
}

/// The relay process in the path, whose counters and sockets are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    Tproxyd(u32),
    /// The bench's relay floor (`floor.rs`).
    Floor(u32),
}

impl Relay {
    pub fn pid(self) -> u32 {
        match self {
            Relay::Tproxyd(p) | Relay::Floor(p) => p,
        }
    }
}

impl Daemon {
    fn read(lab: &Lab, relay: Relay) -> Daemon {
        let pid = relay.pid();
        let Relay::Tproxyd(_) = relay else {
            let socket_drops = SocketDrops::read(pid, crate::floor::PORT);
            let c = lab.gateway.enter(crate::floor::counters_here).unwrap_or_default();
            return Daemon {
                from_client: 0,
                to_upstream: c.to_upstream,
                to_client: c.to_client,
                drops: c.drops,
                errors: c.errors,
                cpu_us: cpu_seconds(pid) * 1e6,
                listener_drops: socket_drops.listener,
                other_socket_drops: socket_drops.other,
            };
        };
        let socket_drops = SocketDrops::read(pid, RELAY_PORT);
        let page = lab.gateway.enter(setup::metrics_here);
        let sum = |prefix: &str| -> u64 {
            page.lines()
                .filter(|l| l.starts_with(prefix))
                .filter_map(|l| l.rsplit(' ').next()?.trim().parse::<u64>().ok())
                .sum()
        };
        Daemon {
            from_client: setup::metric(&page, "tproxyd_datagrams_total{direction=\"from_client\"}"),
            to_upstream: setup::metric(&page, "tproxyd_datagrams_total{direction=\"to_upstream\"}"),
            to_client: setup::metric(&page, "tproxyd_datagrams_total{direction=\"to_client\"}"),
            drops: sum("tproxyd_drops_total"),
            errors: sum("tproxyd_errors_total"),
            cpu_us: cpu_seconds(pid) * 1e6,
            listener_drops: socket_drops.listener,
            other_socket_drops: socket_drops.other,
        }
    }

    fn since(&self, b: &Daemon) -> Daemon {
        Daemon {
            from_client: self.from_client.saturating_sub(b.from_client),
            to_upstream: self.to_upstream.saturating_sub(b.to_upstream),
            to_client: self.to_client.saturating_sub(b.to_client),
            drops: self.drops.saturating_sub(b.drops),
            errors: self.errors.saturating_sub(b.errors),
            cpu_us: (self.cpu_us - b.cpu_us).max(0.0),
            listener_drops: self.listener_drops.saturating_sub(b.listener_drops),
            other_socket_drops: self.other_socket_drops.saturating_sub(b.other_socket_drops),
        }
    }

    /// Datagrams tproxyd relayed, both directions.
    pub fn relayed(&self) -> u64 {
        self.to_upstream + self.to_client
    }

    /// CPU time per relayed datagram, microseconds.
    pub fn cpu_us_per_datagram(&self) -> f64 {
        self.cpu_us / (self.relayed().max(1) as f64)
    }
}

/// Receive-queue drops of one process's UDP sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SocketDrops {
    listener: u64,
    other: u64,
}

impl SocketDrops {
    /// Sums the `drops` column of `/proc/PID/net/udp{,6}` (the sockets of
    /// the process's namespace) over the sockets `pid` holds, so that
    /// another program's sockets in the gateway (socat) are not counted.
    /// A socket closed since an earlier read takes its count with it.
    fn read(pid: u32, listen_port: u16) -> SocketDrops {
        let held: HashSet<u64> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let target = std::fs::read_link(e.ok()?.path()).ok()?;
                let target = target.to_str()?;
                target.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect();
        let mut d = SocketDrops::default();
        for table in ["udp", "udp6"] {
            let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
            for line in text.lines().skip(1) {
                let f: Vec<&str> = line.split_whitespace().collect();
                // sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
                let (Some(local), Some(inode), Some(drops)) = (f.get(1), f.get(9), f.last()) else {
                    continue;
                };
                let (Ok(inode), Ok(drops)) = (inode.parse::<u64>(), drops.parse::<u64>()) else {
                    continue;
                };
                if !held.contains(&inode) {
                    continue;
                }
                let port = local.rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok());
                if port == Some(listen_port) {
                    d.listener += drops;
                } else {
                    d.other += drops;
                }
            }
        }
        d
    }
}

/// Counter changes over one measurement.
#[derive(Debug, Clone, Copy, Default)]
pub struct Drops {
    pub client: Kernel,
    pub gateway: Kernel,
    pub server: Kernel,
    /// Host-wide input backlog drops (all namespaces share the CPUs).
    pub backlog: u64,
    /// tproxyd's counters, when it ran.
    pub daemon: Option<Daemon>,
}

/// Counters read before a measurement.
pub struct Before {
    drops: Drops,
    relay: Option<Relay>,
}

/// Reads every counter now, with those of `relay` when one is in the path.
pub fn before_relay(lab: &Lab, relay: Option<Relay>) -> Before {
    Before {
        drops: read(lab, relay),
        relay,
    }
}

fn read(lab: &Lab, relay: Option<Relay>) -> Drops {
    Drops {
        client: Kernel::read(&lab.client),
        gateway: Kernel::read(&lab.gateway),
        server: Kernel::read(&lab.servers[0]),
        backlog: backlog_drops(),
        daemon: relay.map(|r| Daemon::read(lab, r)),
    }
}

impl Before {
    /// What changed since `self` was read.
    pub fn since(&self, lab: &Lab) -> Drops {
        let now = read(lab, self.relay);
        let b = &self.drops;
        Drops {
            client: now.client.since(&b.client),
            gateway: now.gateway.since(&b.gateway),
            server: now.server.since(&b.server),
            backlog: now.backlog.saturating_sub(b.backlog),
            daemon: match (now.daemon, b.daemon) {
                (Some(n), Some(b)) => Some(n.since(&b)),
                _ => None,
            },
        }
    }
}

/// Sum over CPUs of the second column of `/proc/net/softnet_stat` (hex).
fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .sum()
}

/// User plus system CPU time of `pid` (all threads), seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let (user, system) = cpu_split(pid);
    user + system
}

/// A process's user and system CPU time so far, seconds (clock ticks, so
/// 10 ms steps at the usual 100 Hz).
pub fn cpu_split(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // utime and stime are the 14th and 15th fields of the line, the 12th and
    // 13th after the parenthesised command name. Counted by position: a
    // daemon without a terminal has tpgid -1 (the 8th field), so skipping
    // what does not parse as unsigned would shift both by one (and read
    // stime and cutime instead).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let field = |i: usize| -> u64 { rest.split_whitespace().nth(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    let tick = ticks_per_second();
    (field(11) as f64 / tick, field(12) as f64 / tick)
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

impl Drops {
    /// The gateway's full-queue drops, split by tproxyd's sockets when it
    /// ran: "N (listener L, other O)", other being its pool and reply
    /// sockets.
    pub fn gateway_rcvbuf(&self) -> String {
        let n = self.gateway.rcvbuf_errors();
        match &self.daemon {
            Some(d) if n > 0 => format!("{n} (listener {}, other {})", d.listener_drops, d.other_socket_drops),
            _ => n.to_string(),
        }
    }

    /// One line for the console and the report: where datagrams were
    /// dropped (only the places that dropped any).
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        for (place, k) in [
            ("client", &self.client),
            ("gateway", &self.gateway),
            ("server", &self.server),
        ] {
            for (what, v) in [
                ("rcvbuf", k.rcvbuf_errors()),
                ("sndbuf", k.sndbuf_errors()),
                ("in-err", k.other_in_errors()),
                ("out-discard", k.out_discards()),
            ] {
                if v > 0 {
                    let v = if (place, what) == ("gateway", "rcvbuf") {
                        self.gateway_rcvbuf()
                    } else {
                        v.to_string()
                    };
                    parts.push(format!("{place} {what} {v}"));
                }
            }
        }
        if self.backlog > 0 {
            parts.push(format!("backlog {}", self.backlog));
        }
        if let Some(d) = &self.daemon {
            if d.drops > 0 {
                parts.push(format!("relay drops {}", d.drops));
            }
            if d.errors > 0 {
                parts.push(format!("relay errors {}", d.errors));
            }
        }
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}
