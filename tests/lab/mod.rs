//! A network-namespace lab for end-to-end tests.
//!
//! ```text
//!  client ns                gateway ns (tproxyd + rules)              server ns i
//!  lan0 192.0.2.10/24  ──  lan0 192.0.2.1/24
//!       2001:db8:1::10          2001:db8:1::1
//!                          wan{i} 198.51.100.{128i+1}/25   ──   wan0 198.51.100.{128i+7}/25
//!                                 2001:db8:{2+i}::1/64               2001:db8:{2+i}::7/64
//! ```
//!
//! Every name is unique per process and lab, so tests run in parallel; every
//! namespace and process is removed when the [`Lab`] is dropped, also when
//! the test panics. Servers have no route beyond the gateway's own address:
//! a datagram the kernel forwarded without tproxyd could not be answered.
//! Nothing here touches the root namespace's links, rules or routes.

#![allow(dead_code)] // each test binary uses a different part of the lab

pub mod daemon;
pub mod dns;
pub mod fake_dns;
pub mod flood;
pub mod icmp;
pub mod metrics;
pub mod nft;
pub mod socks;
pub mod stun;
pub mod udp;

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

pub use daemon::Daemon;

/// Client address inside the lab.
pub const CLIENT4: &str = "192.0.2.10";
pub const CLIENT6: &str = "2001:db8:1::10";
/// The gateway's address on the client side.
pub const GATEWAY_LAN4: &str = "192.0.2.1";
pub const GATEWAY_LAN6: &str = "2001:db8:1::1";

/// The gateway's address towards server `i`.
pub fn gateway_wan4(i: usize) -> IpAddr {
    format!("198.51.100.{}", 128 * i + 1).parse().unwrap()
}
pub fn gateway_wan6(i: usize) -> IpAddr {
    format!("2001:db8:{}::1", 2 + i).parse().unwrap()
}
/// Server `i`'s primary address.
pub fn server4(i: usize) -> IpAddr {
    format!("198.51.100.{}", 128 * i + 7).parse().unwrap()
}
pub fn server6(i: usize) -> IpAddr {
    format!("2001:db8:{}::7", 2 + i).parse().unwrap()
}

pub fn sa(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// One network namespace of the lab.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Runs `script` with `sh -c` inside the namespace; panics with its
    /// output if it fails.
    pub fn sh(&self, script: &str) -> String {
        let out = self.sh_output(script);
        if !out.status.success() {
            panic!(
                "in netns {}: `{script}` failed ({}):\n{}{}",
                self.name,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `script` inside the namespace and returns whatever happened.
    pub fn sh_output(&self, script: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("running ip netns exec")
    }

    /// A command that will run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// A UDP socket of the user nobody (uid 65534) bound to `addr` here
    /// with `SO_REUSEADDR`, and `SO_REUSEPORT` too when `reuse_port`: what
    /// an unprivileged local process would try in order to share a port
    /// the daemon listens on. Needs [`require_uid_65534`].
    pub fn bind_as_nobody(&self, addr: SocketAddr, reuse_port: bool) -> std::io::Result<std::net::UdpSocket> {
        self.enter(move || {
            // This thread only: the raw system call, not libc's wrapper,
            // which would switch every thread of the test.
            // SAFETY: plain system calls; the results are checked.
            let r = unsafe { libc::syscall(libc::SYS_setresuid, 65_534, 65_534, 65_534) };
            assert_eq!(r, 0, "setresuid: {}", std::io::Error::last_os_error());
            let bound = (|| {
                let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::DGRAM, None)?;
                sock.set_reuse_address(true)?;
                if reuse_port {
                    sock.set_reuse_port(true)?;
                }
                sock.bind(&addr.into()).map(|()| sock.into())
            })();
            // SAFETY: as above; back to root for the thread's last moments.
            unsafe { libc::syscall(libc::SYS_setresuid, 0, 0, 0) };
            bound
        })
    }

    /// Runs `f` on a thread that has joined this namespace. Sockets created
    /// there stay in this namespace wherever they are used afterwards.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .expect("thread in namespace panicked")
    }
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);
static SWEEP: Once = Once::new();
const PREFIX: &str = "tpd";

/// The lab: a client, a gateway and `n` servers.
pub struct Lab {
    pub id: String,
    pub client: Netns,
    pub gateway: Netns,
    pub servers: Vec<Netns>,
    pub dir: PathBuf,
    children: Mutex<Vec<Child>>,
    daemons: Mutex<Vec<PathBuf>>,
    /// Owns `dir`: removed when the lab is dropped, after its processes.
    _scratch: tempfile::TempDir,
}

impl Lab {
    /// A lab with one server namespace.
    pub fn new() -> Lab {
        Lab::with_servers(1)
    }

    pub fn with_servers(n: usize) -> Lab {
        require_privileges();
        SWEEP.call_once(sweep_stale);
        let id = format!(
            "{PREFIX}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        // World-readable like a normal directory: some tests run the daemon
        // as `nobody`, which must still read its config and lists.
        let scratch = tempfile::Builder::new()
            .prefix(&format!("{id}-"))
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .tempdir()
            .expect("lab temp dir");
        let dir = scratch.path().to_path_buf();
        let lab = Lab {
            client: Netns { name: format!("{id}c") },
            gateway: Netns { name: format!("{id}g") },
            servers: (0..n)
                .map(|i| Netns {
                    name: format!("{id}s{i}"),
                })
                .collect(),
            id,
            dir,
            children: Mutex::new(Vec::new()),
            daemons: Mutex::new(Vec::new()),
            _scratch: scratch,
        };
        // From here on, Drop cleans up whatever was created.
        lab.build();
        lab
    }

    fn all_ns(&self) -> impl Iterator<Item = &Netns> {
        [&self.client, &self.gateway].into_iter().chain(self.servers.iter())
    }

    fn build(&self) {
        for ns in self.all_ns() {
            run("ip", &["netns", "add", &ns.name]);
            run("ip", &["-n", &ns.name, "link", "set", "lo", "up"]);
        }
        let (c, g) = (&self.client.name, &self.gateway.name);
        self.gateway.sh(&format!(
            "ip link add lan0 type veth peer name lan0 netns {c}
             ip addr add {GATEWAY_LAN4}/24 dev lan0
             ip addr add {GATEWAY_LAN6}/64 dev lan0 nodad
             ip link set lan0 up
             sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1"
        ));
        self.client.sh(&format!(
            "ip addr add {CLIENT4}/24 dev lan0
             ip addr add {CLIENT6}/64 dev lan0 nodad
             ip link set lan0 up
             ip route add default via {GATEWAY_LAN4}
             ip -6 route add default via {GATEWAY_LAN6}"
        ));
        for (i, s) in self.servers.iter().enumerate() {
            let wan = format!("wan{i}");
            self.gateway.sh(&format!(
                "ip link add {wan} type veth peer name wan0 netns {}
                 ip addr add {}/25 dev {wan}
                 ip addr add {}/64 dev {wan} nodad
                 ip link set {wan} up",
                s.name,
                gateway_wan4(i),
                gateway_wan6(i)
            ));
            s.sh(&format!(
                "ip addr add {}/25 dev wan0
                 ip addr add {}/64 dev wan0 nodad
                 ip link set wan0 up",
                server4(i),
                server6(i)
            ));
        }
        let _ = g;
    }

    /// Gives server `i` one more address and routes it there from the
    /// gateway (e.g. a "public resolver" 203.0.113.53).
    pub fn add_server_address(&self, i: usize, ip: IpAddr) {
        let (len, fam, via) = match ip {
            IpAddr::V4(_) => (32, "-4", server4(i)),
            IpAddr::V6(_) => (128, "-6", server6(i)),
        };
        self.servers[i].sh(&format!(
            "ip addr add {ip}/{len} dev wan0 nodad 2>/dev/null || ip addr add {ip}/{len} dev wan0"
        ));
        self.gateway.sh(&format!("ip {fam} route replace {ip}/{len} via {via}"));
    }

    /// Gives the client one more address on its LAN.
    pub fn add_client_address(&self, ip: IpAddr) {
        let len = if ip.is_ipv4() { 24 } else { 64 };
        self.client.sh(&format!("ip addr add {ip}/{len} dev lan0 nodad"));
    }

    /// Installs the redirect on the gateway with one of the iptables/
    /// scripts (`"nft"` or `"iptables"`), plus extra environment settings.
    pub fn install_rules(&self, flavour: &str, env: &str) {
        let script = repo_path(&format!("iptables/tproxy-{flavour}.sh"));
        self.gateway.sh(&format!("{env} {} up", script.display()));
    }

    /// Starts a process in `ns`, stopped with the lab.
    pub fn spawn(&self, ns: &Netns, program: &str, args: &[&str], log: &Path) -> u32 {
        let out = File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = ns
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {program}: {e}"));
        let pid = child.id();
        self.children.lock().unwrap().push(child);
        pid
    }

    /// Stops a process started with [`Lab::spawn`] (SIGTERM, then SIGKILL)
    /// and every process it forked (servers such as dante fork workers that
    /// would otherwise outlive it).
    pub fn kill(&self, pid: u32) {
        let forked = descendants(pid);
        let mut children = self.children.lock().unwrap();
        if let Some(child) = children.iter_mut().find(|c| c.id() == pid) {
            stop_child(child);
        }
        for p in forked {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// A path inside the lab's scratch directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Starts tproxyd in the gateway with `config` and waits until it is ready.
    pub fn start_tproxyd(&self, config: &str) -> Daemon {
        self.start_tproxyd_within(config, Duration::from_secs(10))
    }

    /// Like [`Lab::start_tproxyd`], behind `wrapper` (see [`Daemon::start_wrapped`]).
    pub fn start_tproxyd_wrapped(&self, wrapper: &[&str], config: &str) -> Daemon {
        let (config_path, log) = self.daemon_files(config);
        Daemon::start_wrapped(&self.gateway, wrapper, &config_path, &log, Duration::from_secs(10))
    }

    /// A config file with `config` and a log file for the next daemon.
    fn daemon_files(&self, config: &str) -> (PathBuf, PathBuf) {
        let n = self.daemons.lock().unwrap().len();
        let config_path = self.path(&format!("tproxyd{n}.toml"));
        std::fs::write(&config_path, config).expect("write config");
        let log = self.path(&format!("tproxyd{n}.log"));
        self.daemons.lock().unwrap().push(log.clone());
        (config_path, log)
    }

    /// Runs a one-shot `tproxyd ARGS` in the gateway namespace.
    pub fn tproxyd_command(&self, args: &[&str]) -> Output {
        self.gateway
            .command(env!("CARGO_BIN_EXE_tproxyd"))
            .args(args)
            .output()
            .expect("running tproxyd")
    }

    /// Like [`Lab::start_tproxyd`], allowing `startup` for loading lists.
    pub fn start_tproxyd_within(&self, config: &str, startup: Duration) -> Daemon {
        let (config_path, log) = self.daemon_files(config);
        Daemon::start(&self.gateway, &config_path, &log, startup)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for log in self.daemons.lock().map(|d| d.clone()).unwrap_or_default() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("---- {} (last lines) ----", log.display());
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
        if let Ok(mut children) = self.children.lock() {
            for child in children.iter_mut() {
                stop_child(child);
            }
        }
        // Deleting a namespace also deletes its veths, addresses, routes,
        // rules and nftables tables.
        for ns in self.all_ns() {
            let _ = Command::new("ip").args(["netns", "del", &ns.name]).status();
        }
    }
}

/// SIGTERM, then SIGKILL if it has not exited within two seconds.
pub fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Every live process descending from `pid`.
fn descendants(pid: u32) -> Vec<u32> {
    let parent_of = |p: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        // "pid (comm) state ppid ...": comm may hold spaces, so split after ')'.
        stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
    };
    let all: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default();
    let mut found = vec![pid];
    let mut i = 0;
    while i < found.len() {
        let parent = found[i];
        let children: Vec<u32> = all.iter().copied().filter(|&p| parent_of(p) == Some(parent)).collect();
        found.extend(children);
        i += 1;
    }
    found.remove(0);
    found
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The lab needs to create network namespaces; say so plainly if it can't.
fn require_privileges() {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *CAN.get_or_init(can_create_namespaces) {
        return;
    }
    panic!(
        "the namespace lab cannot create network namespaces here (effective uid {}). \
         These end-to-end tests need root (`sudo cargo test`) or an unprivileged \
         user+mount+network namespace (`unshare -rmn --propagation private sh -c \
         'mount -t tmpfs none /run && cargo test'`). They do not skip themselves.",
        nix::unistd::geteuid()
    );
}

fn can_create_namespaces() -> bool {
    let root = nix::unistd::geteuid().is_root();
    let probe = format!("{PREFIX}probe{}", std::process::id());
    let can = root
        && Command::new("ip")
            .args(["netns", "add", &probe])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if can {
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    }
    can
}

/// For tests that switch to the user `nobody` (uid 65534): under an
/// unprivileged user namespace (`unshare -r`) only uid 0 exists, so they
/// need real root, and say so instead of failing obscurely.
pub fn require_uid_65534() {
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let mapped = map.lines().any(|l| {
        let f: Vec<u64> = l.split_whitespace().filter_map(|v| v.parse().ok()).collect();
        f.len() == 3 && (f[0]..f[0] + f[2]).contains(&65_534)
    });
    assert!(
        mapped,
        "this test switches to the user nobody (uid 65534), which this user namespace does not map \
         (uid_map: {map:?}); run it as real root"
    );
}

/// Removes namespaces and scratch directories left by a test or bench
/// process that was killed before its labs could clean up (their names
/// carry the dead process's id).
fn sweep_stale() {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or("");
            if left_by_a_dead_process(name) {
                let _ = Command::new("ip").args(["netns", "del", name]).status();
            }
        }
    }
    // `tpd<pid>x<n>-XXXXXX`, the lab's own temp-dir names (see `with_servers`).
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let is_lab_dir = name.split_once('-').is_some_and(|(id, _)| {
                id.strip_prefix(PREFIX)
                    .and_then(|rest| rest.split_once('x'))
                    .is_some_and(|(pid, n)| {
                        !pid.is_empty()
                            && !n.is_empty()
                            && pid.bytes().all(|b| b.is_ascii_digit())
                            && n.bytes().all(|b| b.is_ascii_digit())
                    })
            });
            if is_lab_dir && left_by_a_dead_process(&name) && entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// Whether `name` is a lab name (`tpd<pid>...`) whose process is gone.
fn left_by_a_dead_process(name: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    let pid: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    pid.parse::<u32>()
        .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
}
