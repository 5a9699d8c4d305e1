//! The side-by-side benchmark. Run it by hand, as root:
//!
//!     bench/run.sh                # two rounds, writes docs/BENCHMARKS.md
//!     bench/run.sh --quick        # one short round, prints only
//!     bench/run.sh --only udp,dns # some sections: udp, latency, flows,
//!                                 # mix, dns, domain, blocklist, abuse
//!
//! Every figure compares tproxyd with a baseline measured in the same run
//! on the same machine, in the same namespace lab the tests use: the
//! kernel forwarding the same traffic (no proxy), socat (a naive userspace
//! relay), the relay floor (tproxyd's kernel calls and nothing else, see
//! `floor.rs`), dnsmasq, dnsdist and Unbound (DNS doing the same work).

#[path = "../tests/lab/mod.rs"]
#[allow(unused_imports)]
mod lab;

mod abuse;
mod blocklist;
mod dns;
mod domain;
mod drops;
mod floor;
mod flows;
mod latency;
mod mix;
mod report;
mod setup;
mod udp;

use std::time::Instant;

/// What to run, from the command line.
#[derive(Debug, Clone)]
pub struct Options {
    pub rounds: usize,
    /// Shorter runs and fewer points: a smoke test of the harness.
    pub quick: bool,
    pub only: Vec<String>,
    pub write: bool,
}

impl Options {
    fn parse() -> Options {
        let mut o = Options {
            rounds: 2,
            quick: false,
            only: Vec::new(),
            write: true,
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => {
                    o.quick = true;
                    o.rounds = 1;
                    o.write = false;
                }
                "--rounds" => o.rounds = args.next().and_then(|v| v.parse().ok()).unwrap_or(2).max(1),
                "--only" => o.only = args.next().unwrap_or_default().split(',').map(String::from).collect(),
                "--no-write" => o.write = false,
                "--bench" => {} // passed by cargo
                other => eprintln!("bench: ignoring argument {other:?}"),
            }
        }
        o
    }

    pub fn wants(&self, section: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|s| s == section)
    }

    /// Seconds per measurement.
    pub fn secs(&self) -> u32 {
        if self.quick { 2 } else { 6 }
    }
}

/// Everything one round measured.
#[derive(Debug, Default)]
pub struct Round {
    pub udp: Vec<udp::Point>,
    pub latency: Vec<latency::Result>,
    pub flows: Option<flows::Result>,
    /// The same flows through the relay floor.
    pub flows_floor: Option<flows::Result>,
    pub mix: Vec<mix::Result>,
    pub dns: Vec<dns::Result>,
    pub domain: Vec<domain::Result>,
    pub blocklist: Option<blocklist::Result>,
    pub abuse: Option<abuse::Result>,
    pub seconds: f64,
    /// `/proc/loadavg`'s first three fields when the round started and ended.
    pub load_before: String,
    pub load_after: String,
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    // The bench starts its relay floor as itself, in the gateway namespace.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(floor::COMMAND) {
        std::process::exit(floor::main(&args[1..]));
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("bench: run as root (it builds network namespaces): sudo bench/run.sh");
        std::process::exit(2);
    }
    let opts = Options::parse();
    setup::raise_fd_limit();
    let mut rounds = Vec::new();
    for r in 0..opts.rounds {
        eprintln!("== round {} of {}", r + 1, opts.rounds);
        let started = Instant::now();
        let mut round = Round {
            load_before: load_average(),
            ..Round::default()
        };
        if opts.wants("udp") {
            round.udp = udp::run(&opts);
        }
        if opts.wants("latency") {
            round.latency = latency::run(&opts);
        }
        if opts.wants("flows") {
            (round.flows, round.flows_floor) = flows::run(&opts);
        }
        if opts.wants("mix") {
            round.mix = mix::run(&opts);
        }
        if opts.wants("dns") {
            round.dns = dns::run(&opts);
        }
        if opts.wants("domain") {
            round.domain = domain::run(&opts);
        }
        if opts.wants("blocklist") {
            round.blocklist = Some(blocklist::run(&opts));
        }
        if opts.wants("abuse") {
            round.abuse = Some(abuse::run(&opts));
        }
        round.seconds = started.elapsed().as_secs_f64();
        round.load_after = load_average();
        rounds.push(round);
    }
    let text = report::render(&opts, &rounds);
    println!("{text}");
    if opts.write {
        let path = lab::repo_path("docs/BENCHMARKS.md");
        std::fs::write(&path, &text).expect("writing docs/BENCHMARKS.md");
        eprintln!("bench: wrote {}", path.display());
    }
}
