//! UDP throughput: iperf3 from the client to the server, through the kernel
//! alone, through tproxyd, and through socat; 64- and 1,200-byte datagrams,
//! offered load swept up to the sender's maximum.
//!
//! Both iperf3 ends get 4 MiB socket buffers (`-w 4M`): with the default
//! ~200 KiB, the receiving iperf3 overflows whenever the scheduler runs it
//! late, and the loss measured is the receiver's, not the path's.

use crate::Options;
use crate::lab::Lab;
use crate::setup::{self, SERVER, pin, sh, sleep_ms};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    Kernel,
    Tproxyd,
    Socat,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Kernel => "kernel forwarding",
            System::Tproxyd => "tproxyd",
            System::Socat => "socat",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Point {
    pub system: System,
    pub size: usize,
    /// Offered datagrams/s; `None` = as fast as the sender can.
    pub offered: Option<u64>,
    /// Sender on CPU 0, everything else on CPU 1.
    pub pinned: bool,
    pub sent_pps: f64,
    pub delivered_pps: f64,
    pub loss_percent: f64,
}

pub fn run(opts: &Options) -> Vec<Point> {
    let mut points = Vec::new();
    for pinned in [false, true] {
        let lab = setup::lab();
        let other = if pinned { Some(1) } else { None };
        for port in [5201, 5202, 5203] {
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
        let daemon = setup::tproxyd(&lab, &wrapper, "");
        sleep_ms(300);
        for size in [64usize, 1200] {
            let rates: Vec<Option<u64>> = if pinned || opts.quick {
                vec![None]
            } else {
                vec![Some(50_000), Some(100_000), Some(150_000), Some(200_000), None]
            };
            for system in [System::Kernel, System::Tproxyd, System::Socat] {
                for &rate in &rates {
                    let p = measure(&lab, system, size, rate, pinned, opts.secs());
                    eprintln!(
                        "udp {:>5}B {:<18} {:>8} pinned={:<5} delivered {:>9.0}/s loss {:>5.1}%",
                        size,
                        system.name(),
                        rate.map_or("max".to_string(), |r| r.to_string()),
                        pinned,
                        p.delivered_pps,
                        p.loss_percent
                    );
                    points.push(p);
                }
            }
        }
        drop(daemon);
    }
    points
}

fn measure(lab: &Lab, system: System, size: usize, rate: Option<u64>, pinned: bool, secs: u32) -> Point {
    let (host, port) = match system {
        System::Kernel => (SERVER.to_string(), 5201),
        System::Tproxyd => (SERVER.to_string(), 5202),
        System::Socat => ("192.0.2.1".to_string(), 6000),
    };
    let mut socat_pids = Vec::new();
    if system == System::Socat {
        // iperf3 needs its TCP control connection relayed too; the data is
        // relayed by a plain UDP socat (read a datagram, write it on).
        let log = lab.path("socat.log");
        for (proto, fork) in [("TCP4", ",fork"), ("UDP4", "")] {
            let listen = format!("{proto}-LISTEN:6000,bind=192.0.2.1,reuseaddr{fork}");
            let connect = format!("{proto}:{SERVER}:5203");
            let mut args = vec![];
            if pinned {
                args.extend(["-c", "1", "socat"]);
            }
            args.extend(["-T", "30", &listen, &connect]);
            let program = if pinned { "taskset" } else { "socat" };
            socat_pids.push(lab.spawn(&lab.gateway, program, &args, &log));
        }
        sleep_ms(300);
    }
    let bps = rate.map_or(0, |r| r * size as u64 * 8);
    let json = sh(
        &lab.client,
        &format!(
            "{}iperf3 -u -c {host} -p {port} -l {size} -b {bps} -t {secs} -w 4M -J",
            pin(pinned.then_some(0))
        ),
    );
    for pid in socat_pids {
        lab.kill(pid);
    }
    parse(&json, system, size, rate, pinned)
}

fn parse(json: &str, system: System, size: usize, offered: Option<u64>, pinned: bool) -> Point {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let sent = &v["end"]["sum_sent"];
    let recv = &v["end"]["sum_received"];
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(0.0);
    let sent_secs = f(&sent["seconds"]).max(1e-9);
    let recv_secs = f(&recv["seconds"]).max(1e-9);
    let total = f(&recv["packets"]);
    let lost = f(&recv["lost_packets"]);
    Point {
        system,
        size,
        offered,
        pinned,
        sent_pps: f(&sent["packets"]) / sent_secs,
        delivered_pps: (total - lost).max(0.0) / recv_secs,
        loss_percent: if total > 0.0 { 100.0 * lost / total } else { 100.0 },
    }
}
