//! Dante (danted) as a real SOCKS5 server with UDP ASSOCIATE support.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::Lab;

/// Credentials of the lab's SOCKS5 user.
pub const SOCKS_USER: &str = "labuser";
pub const SOCKS_PASSWORD: &str = "lab-secret";

impl Lab {
    /// Starts danted on `listen` in server namespace `i`, requiring the lab
    /// user's password when `auth` is set, and returns its pid.
    ///
    /// Dante checks passwords against the system's passwd/shadow files, so
    /// for `auth` it runs with lab copies bind-mounted over them. The
    /// mounts live in the mount namespace `ip netns exec` creates for this
    /// one process, so the host's files are never touched.
    pub fn danted(&self, i: usize, listen: SocketAddr, auth: bool) -> u32 {
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let conf = self.path(&format!("danted{n}.conf"));
        let log = self.path(&format!("danted{n}.log"));
        let method = if auth { "username" } else { "none" };
        std::fs::write(
            &conf,
            format!(
                "logoutput: {log}
internal: {ip} port = {port}
external: {ip}
clientmethod: none
socksmethod: {method}
user.privileged: root
user.unprivileged: root
client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: udpassociate udpreply }}
",
                log = log.display(),
                ip = listen.ip(),
                port = listen.port(),
            ),
        )
        .unwrap();
        let mut script = String::new();
        if auth {
            let passwd = self.path("passwd");
            let shadow = self.path("shadow");
            let hash = self.client.sh(&format!("openssl passwd -6 '{SOCKS_PASSWORD}'"));
            let mut p = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
            p.push_str(&format!("{SOCKS_USER}:x:60123:60123::/nonexistent:/usr/sbin/nologin\n"));
            std::fs::write(&passwd, p).unwrap();
            std::fs::write(
                &shadow,
                format!(
                    "root:*:19000:0:99999:7:::\n{SOCKS_USER}:{}:19000:0:99999:7:::\n",
                    hash.trim()
                ),
            )
            .unwrap();
            script.push_str(&format!(
                "mount --bind {} /etc/passwd && mount --bind {} /etc/shadow && ",
                passwd.display(),
                shadow.display()
            ));
        }
        script.push_str(&format!("exec danted -f {}", conf.display()));
        let out = self.path(&format!("danted{n}.out"));
        let pid = self.spawn(&self.servers[i], "sh", &["-c", &script], &out);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.servers[i]
            .sh(&format!("ss -ltnH 'sport = :{}'", listen.port()))
            .trim()
            .is_empty()
        {
            assert!(
                Instant::now() < deadline,
                "danted did not start: {}{}",
                std::fs::read_to_string(&out).unwrap_or_default(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pid
    }

    /// Lets server namespaces reach each other through the gateway (for a
    /// proxy in one server namespace relaying to servers in another).
    pub fn route_between_servers(&self) {
        for (i, s) in self.servers.iter().enumerate() {
            for j in 0..self.servers.len() {
                if i != j {
                    s.sh(&format!(
                        "ip route replace 198.51.100.{}/25 via {}",
                        128 * j,
                        super::gateway_wan4(i)
                    ));
                }
            }
        }
    }
}
