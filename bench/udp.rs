//! UDP throughput: iperf3 between the client and the server, through the
//! kernel alone, through tproxyd, through the relay floor (tproxyd's
//! kernel calls and nothing else, `floor.rs`) and through socat; 64- and
//! 1,200-byte datagrams.
//!
//! * **Forward** (client sends, server receives) and **reverse** (`iperf3
//!   -R`: the server sends through tproxyd's pooled upstream socket, whose
//!   replies tproxyd sends on to the client).
//! * **4 MiB endpoint buffers** (`-w 4M` at both iperf3 ends) and the
//!   **default** ones (~208 KiB): with the default, a receiving iperf3 that
//!   the scheduler runs late overflows, and that loss is counted where it
//!   happens (see [`crate::drops`]).
//!
//! Forward with 4 MiB buffers is swept over offered loads (and pinned);
//! the other three combinations are measured at the sender's maximum.
//! Then tproxyd runs again with two workers for the workers = 1 vs 2
//! comparison.
//!
//! `BENCH_UDP_ONLY` (comma-separated: `kernel`, `tproxyd`, `floor`,
//! `socat`; `unpinned`, `pinned`; `default`, `4mib`) runs only those
//! systems, passes and/or endpoint buffers;
//! `BENCH_FLOOR_ARGS` passes arguments to the relay floor (`--threads 2`,
//! `--busy`).

use crate::Options;
use crate::drops::{self, Drops, Relay};
use crate::lab::Lab;
use crate::setup::{self, SERVER, pin, sh, sleep_ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Kernel,
    Tproxyd,
    /// The bench's relay floor (`floor.rs`).
    Floor,
    Socat,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Kernel => "kernel forwarding",
            System::Tproxyd => "tproxyd",
            System::Floor => "relay floor",
            System::Socat => "socat",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client → server.
    Forward,
    /// Server → client (`iperf3 -R`).
    Reverse,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Forward => "forward",
            Direction::Reverse => "reverse",
        }
    }
}

/// Socket buffers of both iperf3 ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffers {
    Default,
    FourMiB,
}

impl Buffers {
    pub fn name(self) -> &'static str {
        match self {
            Buffers::Default => "default",
            Buffers::FourMiB => "4 MiB",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Point {
    pub system: System,
    pub size: usize,
    pub direction: Direction,
    pub buffers: Buffers,
    /// tproxyd's worker threads (1 unless comparing).
    pub workers: usize,
    /// Offered datagrams/s; `None` = as fast as the sender can.
    pub offered: Option<u64>,
    /// Sender on CPU 0, everything else on CPU 1.
    pub pinned: bool,
    pub sent_pps: f64,
    pub delivered_pps: f64,
    pub loss_percent: f64,
    /// Datagrams the receiving iperf3 missed (by sequence number).
    pub lost: f64,
    /// Counter changes over the measurement.
    pub drops: Drops,
}

impl Point {
    /// tproxyd's CPU time per datagram it relayed, µs.
    pub fn cpu_us_per_datagram(&self) -> Option<f64> {
        self.drops
            .daemon
            .filter(|d| d.relayed() > 0)
            .map(|d| d.cpu_us_per_datagram())
    }
}

/// What one measurement is.
#[derive(Debug, Clone, Copy)]
struct Case {
    system: System,
    size: usize,
    direction: Direction,
    buffers: Buffers,
    workers: usize,
    rate: Option<u64>,
    pinned: bool,
}

/// What `BENCH_UDP_ONLY` asks for; everything when it is unset.
struct Only(Vec<String>);

impl Only {
    fn from_env() -> Only {
        Only(
            std::env::var("BENCH_UDP_ONLY")
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        )
    }

    /// Whether the word of one group (systems, or passes) is wanted: yes
    /// when named, or when no word of its group is named.
    fn wants(&self, word: &str, group: &[&str]) -> bool {
        self.0.iter().any(|w| w == word) || !self.0.iter().any(|w| group.contains(&w.as_str()))
    }

    fn system(&self, s: System) -> bool {
        let word = match s {
            System::Kernel => "kernel",
            System::Tproxyd => "tproxyd",
            System::Floor => "floor",
            System::Socat => "socat",
        };
        self.wants(word, &["kernel", "tproxyd", "floor", "socat"])
    }

    fn pass(&self, pinned: bool) -> bool {
        self.wants(if pinned { "pinned" } else { "unpinned" }, &["pinned", "unpinned"])
    }

    fn buffers(&self, b: Buffers) -> bool {
        let word = match b {
            Buffers::Default => "default",
            Buffers::FourMiB => "4mib",
        };
        self.wants(word, &["default", "4mib"])
    }
}

pub fn run(opts: &Options) -> Vec<Point> {
    let mut points = Vec::new();
    let only = Only::from_env();
    for pinned in [false, true] {
        if !only.pass(pinned) {
            continue;
        }
        let lab = setup::lab();
        let other = if pinned { Some(1) } else { None };
        for port in [5201, 5202, 5203, setup::FLOOR_PORT] {
            // In the foreground, as a child of the lab: it ends with the lab.
            let log = lab.path(&format!("iperf3-{port}.log"));
            let port = port.to_string();
            match other {
                Some(cpu) => lab.spawn(
                    &lab.servers[0],
                    "taskset",
                    &["-c", &cpu.to_string(), "iperf3", "-s", "-p", &port],
                    &log,
                ),
                None => lab.spawn(&lab.servers[0], "iperf3", &["-s", "-p", &port], &log),
            };
        }
        let wrapper: Vec<&str> = if pinned { vec!["taskset", "-c", "1"] } else { vec![] };
        let daemon = setup::tproxyd(&lab, &wrapper, "workers = 1");
        let floor = setup::floor(&lab, &wrapper);
        sleep_ms(300);
        let pid = daemon.pid();
        let mut one = |case: Case| {
            if !only.system(case.system) || !only.buffers(case.buffers) {
                return;
            }
            let relay = match case.system {
                System::Tproxyd => Some(Relay::Tproxyd(pid)),
                System::Floor => Some(Relay::Floor(floor)),
                _ => None,
            };
            let p = measure(&lab, case, relay, opts.secs());
            print(&p);
            points.push(p);
        };
        // Forward, 4 MiB buffers: the sweep (as before), all three systems.
        for size in [64usize, 1200] {
            let rates: Vec<Option<u64>> = if pinned || opts.quick {
                vec![None]
            } else {
                vec![Some(50_000), Some(100_000), Some(150_000), Some(200_000), None]
            };
            for system in [System::Kernel, System::Tproxyd, System::Floor, System::Socat] {
                for &rate in &rates {
                    one(Case {
                        system,
                        size,
                        direction: Direction::Forward,
                        buffers: Buffers::FourMiB,
                        workers: 1,
                        rate,
                        pinned,
                    });
                }
            }
        }
        if pinned {
            drop(daemon);
            lab.kill(floor);
            continue;
        }
        // The other three combinations, at the sender's maximum.
        for (direction, buffers) in [
            (Direction::Forward, Buffers::Default),
            (Direction::Reverse, Buffers::FourMiB),
            (Direction::Reverse, Buffers::Default),
        ] {
            for size in [64usize, 1200] {
                for system in [System::Kernel, System::Tproxyd, System::Floor] {
                    one(Case {
                        system,
                        size,
                        direction,
                        buffers,
                        workers: 1,
                        rate: None,
                        pinned,
                    });
                }
            }
        }
        drop(daemon);
        lab.kill(floor);
        // Two workers, the same four combinations at the maximum.
        if !only.system(System::Tproxyd) {
            continue;
        }
        let daemon = setup::tproxyd(&lab, &[], "workers = 2");
        sleep_ms(300);
        let pid = daemon.pid();
        for direction in [Direction::Forward, Direction::Reverse] {
            for buffers in [Buffers::FourMiB, Buffers::Default] {
                if !only.buffers(buffers) {
                    continue;
                }
                for size in [64usize, 1200] {
                    let case = Case {
                        system: System::Tproxyd,
                        size,
                        direction,
                        buffers,
                        workers: 2,
                        rate: None,
                        pinned,
                    };
                    let p = measure(&lab, case, Some(Relay::Tproxyd(pid)), opts.secs());
                    print(&p);
                    points.push(p);
                }
            }
        }
        drop(daemon);
    }
    points
}

fn print(p: &Point) {
    eprintln!(
        "udp {:>5}B {:<7} {:<7} {:<18} w{} {:>7} pinned={:<5} delivered {:>9.0}/s loss {:>5.1}% cpu {} µs/dgram; drops: {}",
        p.size,
        p.direction.name(),
        p.buffers.name(),
        p.system.name(),
        p.workers,
        p.offered.map_or("max".to_string(), |r| r.to_string()),
        p.pinned,
        p.delivered_pps,
        p.loss_percent,
        p.cpu_us_per_datagram().map_or("-".into(), |v| format!("{v:.2}")),
        p.drops.summary()
    );
}

fn measure(lab: &Lab, case: Case, relay: Option<Relay>, secs: u32) -> Point {
    let (host, port) = match case.system {
        System::Kernel => (SERVER.to_string(), 5201),
        System::Tproxyd => (SERVER.to_string(), 5202),
        System::Floor => (SERVER.to_string(), setup::FLOOR_PORT),
        System::Socat => ("192.0.2.1".to_string(), 6000),
    };
    let mut socat_pids = Vec::new();
    if case.system == System::Socat {
        // iperf3 needs its TCP control connection relayed too; the data is
        // relayed by a plain UDP socat (read a datagram, write it on).
        let log = lab.path("socat.log");
        for (proto, fork) in [("TCP4", ",fork"), ("UDP4", "")] {
            let listen = format!("{proto}-LISTEN:6000,bind=192.0.2.1,reuseaddr{fork}");
            let connect = format!("{proto}:{SERVER}:5203");
            let mut args = vec![];
            if case.pinned {
                args.extend(["-c", "1", "socat"]);
            }
            args.extend(["-T", "30", &listen, &connect]);
            let program = if case.pinned { "taskset" } else { "socat" };
            socat_pids.push(lab.spawn(&lab.gateway, program, &args, &log));
        }
        sleep_ms(300);
    }
    let bps = case.rate.map_or(0, |r| r * case.size as u64 * 8);
    let window = match case.buffers {
        Buffers::FourMiB => " -w 4M",
        Buffers::Default => "",
    };
    let reverse = match case.direction {
        Direction::Forward => "",
        Direction::Reverse => " -R",
    };
    let counters = drops::before_relay(lab, relay);
    let json = sh(
        &lab.client,
        &format!(
            "{}iperf3 -u -c {host} -p {port} -l {} -b {bps} -t {secs}{window}{reverse} -J",
            pin(case.pinned.then_some(0)),
            case.size
        ),
    );
    // Late datagrams still in flight settle before the counters are read.
    sleep_ms(200);
    let drops = counters.since(lab);
    for pid in socat_pids {
        lab.kill(pid);
    }
    parse(&json, case, drops)
}

fn parse(json: &str, case: Case, drops: Drops) -> Point {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let sent = &v["end"]["sum_sent"];
    let recv = &v["end"]["sum_received"];
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    let sent_secs = f(&sent["seconds"]).max(1e-9);
    let recv_secs = f(&recv["seconds"]).max(1e-9);
    let total = f(&recv["packets"]);
    let lost = f(&recv["lost_packets"]);
    Point {
        system: case.system,
        size: case.size,
        direction: case.direction,
        buffers: case.buffers,
        workers: case.workers,
        offered: case.rate,
        pinned: case.pinned,
        sent_pps: f(&sent["packets"]) / sent_secs,
        delivered_pps: (total - lost).max(0.0) / recv_secs,
        loss_percent: if total > 0.0 { 100.0 * lost / total } else { 100.0 },
        lost,
        drops,
    }
}
