//! The benchmark lab: the test lab, plus what the baselines need.
//!
//! The server gets a route back to the client (the kernel-forwarding
//! baseline needs one; tproxyd does not), and only the ports under test are
//! captured, so the baselines' traffic is forwarded by the kernel untouched:
//!
//! | port            | path                 |
//! |-----------------|----------------------|
//! | 5201, 11111     | kernel forwarding    |
//! | 5202, 11112     | through tproxyd      |
//! | 5203            | through socat        |
//! | 5204            | through the floor    |
//! | 32000-32005     | mix, via the floor   |
//! | 30000-30255     | flows, via tproxyd   |
//! | 33000-33255     | flows, via the floor |
//! | 53 (hijacked)   | tproxyd DNS          |

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Output;
use std::time::Duration;

use crate::lab::{Daemon, Lab};

pub const SERVER: &str = "198.51.100.7";
pub const UPSTREAM_DNS: &str = "198.51.100.53";
pub const ADMIN: &str = "127.0.0.1:9153";
/// tproxyd's relay listen port in the bench config.
pub const RELAY_PORT: u16 = 15353;
pub const CAPTURED_PORTS: &str = "53,5202,11112,30000-30255";
/// The port captured for the relay floor, by a table of its own.
pub const FLOOR_PORT: u16 = 5204;
/// The first of the mix's six server ports through the relay floor.
pub const FLOOR_MIX_BASE: u16 = 32_000;
/// The first of the flows section's server ports through the relay floor
/// (as many as through tproxyd, from 30000).
pub const FLOOR_FLOWS_BASE: u16 = 33_000;
/// Server ports of the flows section, for tproxyd and the floor alike.
/// With 256 remotes a pool socket can carry 256 flows, so 1,000,000 flows
/// need about 3,900 sockets, well inside the descriptor budget.
pub const REMOTES: u16 = 256;

/// A fresh lab with the bench's routes and redirect rules.
pub fn lab() -> Lab {
    lab_for("4")
}

/// [`lab`] with tproxyd's redirect rules for `families` (`"4"`, or
/// `"4 6"` for the DNS section's IPv6 clients); the floor's stay IPv4.
pub fn lab_for(families: &str) -> Lab {
    let lab = Lab::new();
    lab.servers[0].sh("ip route replace default via 198.51.100.1");
    lab.add_server_address(0, UPSTREAM_DNS.parse().unwrap());
    lab.install_rules(
        "nft",
        &format!("LAN_IF=lan0 FAMILIES='{families}' UDP_PORTS={CAPTURED_PORTS}"),
    );
    // The floor's port goes through the same script's rules, in a table of
    // its own that diverts to the floor's listener instead of tproxyd's.
    lab.install_rules(
        "nft",
        &format!(
            "LAN_IF=lan0 FAMILIES=4 NFT_TABLE=tpfloor ANTISPOOF=0 UDP_PORTS={FLOOR_PORT},{FLOOR_MIX_BASE}-{},{FLOOR_FLOWS_BASE}-{} TPROXY_PORT={}",
            FLOOR_MIX_BASE + 5,
            FLOOR_FLOWS_BASE + REMOTES - 1,
            crate::floor::PORT
        ),
    );
    lab
}

/// Starts the relay floor (`floor.rs`) in the gateway, behind `wrapper`
/// (e.g. taskset), with the extra arguments in `BENCH_FLOOR_ARGS` (e.g.
/// `--threads 2`, `--busy`); returns its pid. It ends with the lab.
pub fn floor(lab: &Lab, wrapper: &[&str]) -> u32 {
    let exe = std::env::current_exe().expect("the bench's own path");
    let exe = exe.to_str().expect("a UTF-8 path");
    let extra = std::env::var("BENCH_FLOOR_ARGS").unwrap_or_default();
    let mut args: Vec<&str> = wrapper.iter().skip(1).copied().collect();
    let program = wrapper.first().copied().unwrap_or(exe);
    if !wrapper.is_empty() {
        args.push(exe);
    }
    args.push(crate::floor::COMMAND);
    args.extend(extra.split_whitespace());
    let pid = lab.spawn(&lab.gateway, program, &args, &lab.path("floor.log"));
    sleep_ms(200);
    pid
}

/// tproxyd's bench config: room for 200,000 flows, metrics on, DNS on.
/// `BENCH_RELAY_EXTRA` adds lines to its `[relay]` table (e.g.
/// `busy_poll_us = 50`), for A/B runs of relay options.
pub fn config(extra: &str) -> String {
    let relay_extra = std::env::var("BENCH_RELAY_EXTRA").unwrap_or_default();
    format!(
        r#"mark = 255
log_level = "warn"
{extra}
[admin]
listen = "{ADMIN}"
[relay]
listen = ["0.0.0.0:{RELAY_PORT}"]
session_capacity = 200000
{relay_extra}
[dns]
listen = ["192.0.2.1:53"]
allow = ["192.0.2.0/24"]
rate_limit = {{ qps = 0 }}
[dns.cache]
capacity = 100000
[dns.upstreams.default]
servers = ["{UPSTREAM_DNS}"]
# dnsperf is one client with up to 512 queries outstanding: its share of
# the group (a quarter) must not be what the miss path measures.
max_pending = 4096
[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["192.0.2.50"]
"#
    )
}

/// Starts tproxyd (behind `wrapper`, e.g. taskset) with the bench config.
pub fn tproxyd(lab: &Lab, wrapper: &[&str], extra: &str) -> Daemon {
    lab.start_tproxyd_wrapped(wrapper, &config(extra))
}

/// The metrics page, from a thread already in the gateway namespace.
pub fn metrics_here() -> String {
    let addr: SocketAddr = ADMIN.parse().unwrap();
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// One series from the metrics page (0 when absent).
pub fn metric(page: &str, series: &str) -> u64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Resident memory of `pid`, in KiB (current and peak).
pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Open file descriptors of `pid`.
pub fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Runs `script` in `ns`, returning stdout whatever the exit status.
pub fn sh(ns: &crate::lab::Netns, script: &str) -> String {
    let out: Output = ns.sh_output(script);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `taskset -c CPU` when pinning, nothing otherwise.
pub fn pin(cpu: Option<u32>) -> String {
    cpu.map(|c| format!("taskset -c {c} ")).unwrap_or_default()
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// The bench needs a socket per flow on the client side too.
pub fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, 1_048_576, 1_048_576) {
        eprintln!("bench: cannot raise the descriptor limit: {e}");
    }
    eprintln!("bench: descriptor limit {:?}", getrlimit(Resource::RLIMIT_NOFILE));
}
