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

/// A SOCKS5 server that relays UDP as a full cone, as many do (unlike
/// dante, which passes only replies from where the client sent): one
/// outgoing socket per association, and whatever reaches it, from anyone,
/// goes back to the client wrapped with its sender's address.
pub struct ConeSocks5 {
    pub addr: SocketAddr,
    /// Where the association's datagrams leave from: what remotes see.
    pub outgoing: SocketAddr,
}

impl Lab {
    /// Starts a [`ConeSocks5`] on `listen` in server namespace `i`, for one
    /// association (no authentication). Its threads end with the test
    /// process; the lab's namespaces go away with the lab.
    pub fn cone_socks5(&self, i: usize, listen: SocketAddr) -> ConeSocks5 {
        use std::io::{Read, Write};
        use std::net::{TcpListener, UdpSocket};
        let (tcp, relay, out) = self.servers[i].enter(move || {
            let any = SocketAddr::new(listen.ip(), 0);
            (
                TcpListener::bind(listen).expect("bind the SOCKS5 port"),
                UdpSocket::bind(any).expect("bind the relay socket"),
                UdpSocket::bind(any).expect("bind the outgoing socket"),
            )
        });
        let outgoing = out.local_addr().unwrap();
        let relay_addr = relay.local_addr().unwrap();
        std::thread::spawn(move || {
            let Ok((mut control, _)) = tcp.accept() else { return };
            let mut hello = [0u8; 3];
            if control.read_exact(&mut hello).is_err() || control.write_all(&[5, 0]).is_err() {
                return;
            }
            // VER CMD RSV ATYP(1) ADDR(4) PORT(2): tproxyd names its IPv4 socket.
            let mut request = [0u8; 10];
            if control.read_exact(&mut request).is_err() {
                return;
            }
            let std::net::IpAddr::V4(ip) = relay_addr.ip() else {
                return;
            };
            let mut reply = vec![5, 0, 0, 1];
            reply.extend_from_slice(&ip.octets());
            reply.extend_from_slice(&relay_addr.port().to_be_bytes());
            if control.write_all(&reply).is_err() {
                return;
            }
            let client = std::sync::Arc::new(std::sync::Mutex::new(None::<SocketAddr>));
            let (relay_in, out_in) = (relay.try_clone().unwrap(), out.try_clone().unwrap());
            let seen = client.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65_535];
                while let Ok((n, from)) = relay_in.recv_from(&mut buf) {
                    *seen.lock().unwrap() = Some(from);
                    // RSV RSV FRAG ATYP(1) ADDR(4) PORT(2) payload
                    if n < 10 || buf[3] != 1 {
                        continue;
                    }
                    let ip = std::net::Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
                    let port = u16::from_be_bytes([buf[8], buf[9]]);
                    let _ = out_in.send_to(&buf[10..n], SocketAddr::from((ip, port)));
                }
            });
            let mut buf = vec![0u8; 65_535];
            while let Ok((n, from)) = out.recv_from(&mut buf) {
                let (SocketAddr::V4(from), Some(to)) = (from, *client.lock().unwrap()) else {
                    continue;
                };
                let mut wrapped = vec![0, 0, 0, 1];
                wrapped.extend_from_slice(&from.ip().octets());
                wrapped.extend_from_slice(&from.port().to_be_bytes());
                wrapped.extend_from_slice(&buf[..n]);
                let _ = relay.send_to(&wrapped, to);
            }
            drop(control);
        });
        ConeSocks5 { addr: listen, outgoing }
    }
}
