//! DNS tools in the lab: dnsmasq as a real upstream, dig as a real client.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{Lab, Netns};

/// A dnsmasq upstream in a server namespace.
pub struct Dnsmasq {
    pub pid: u32,
    pub log: PathBuf,
    pub addr: IpAddr,
}

impl Dnsmasq {
    /// Everything dnsmasq was asked, as `(name, client)` pairs.
    pub fn queries(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                // "query[A] name from ip", or "auth[A] ..." for its own zone.
                let rest = l.split("query[").nth(1).or_else(|| l.split("auth[").nth(1))?;
                let (_, rest) = rest.split_once("] ")?;
                let (name, from) = rest.split_once(" from ")?;
                Some((name.to_string(), from.trim().to_string()))
            })
            .collect()
    }

    pub fn was_asked(&self, name: &str) -> bool {
        self.queries().iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }
}

impl Lab {
    /// Starts dnsmasq on `addr` (port 53) in server namespace `i`,
    /// authoritative for `zone` (so negative answers carry an SOA), with
    /// extra records given as dnsmasq options.
    pub fn dnsmasq(&self, i: usize, addr: IpAddr, zone: &str, records: &[&str]) -> Dnsmasq {
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let log = self.path(&format!("dnsmasq{n}.log"));
        let mut args: Vec<String> = vec![
            "--no-daemon".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--bind-interfaces".into(),
            format!("--listen-address={addr}"),
            "--port=53".into(),
            "--user=root".into(),
            "--cache-size=0".into(),
            format!("--auth-server=ns.{zone},{addr}"),
            format!("--auth-zone={zone}"),
            "--auth-ttl=300".into(),
            "--local-ttl=300".into(),
            "--log-queries".into(),
            format!("--log-facility={}", log.display()),
        ];
        args.extend(records.iter().map(|r| r.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.path(&format!("dnsmasq{n}.out"));
        let pid = self.spawn(&self.servers[i], "dnsmasq", &args, &out);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("started") {
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start: {}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Dnsmasq { pid, log, addr }
    }
}

/// What dig printed, parsed into what a user reads.
#[derive(Debug, Default)]
pub struct Dig {
    pub status: String,
    pub flags: Vec<String>,
    /// `(name, ttl, type, data)`
    pub answers: Vec<(String, u32, String, String)>,
    pub authority: Vec<(String, u32, String, String)>,
    pub question: String,
    pub server: String,
    pub query_ms: u64,
    pub raw: String,
}

impl Dig {
    pub fn answer_data(&self) -> Vec<String> {
        self.answers.iter().map(|a| a.3.clone()).collect()
    }
}

/// Runs `dig ARGS` in `ns` (one try, 3 s) and parses the answer.
pub fn dig(ns: &Netns, args: &str) -> Dig {
    let raw = ns.sh(&format!("dig +tries=1 +time=3 {args} || true"));
    parse_dig(&raw)
}

pub fn parse_dig(raw: &str) -> Dig {
    let mut d = Dig {
        raw: raw.to_string(),
        ..Dig::default()
    };
    let mut section = "";
    for line in raw.lines() {
        if let Some(rest) = line.split("status: ").nth(1) {
            d.status = rest.split(',').next().unwrap_or("").to_string();
        } else if let Some(rest) = line.strip_prefix(";; flags: ") {
            d.flags = rest
                .split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .map(String::from)
                .collect();
        } else if let Some(rest) = line.strip_prefix(";; SERVER: ") {
            d.server = rest.split('(').next().unwrap_or("").to_string();
        } else if let Some(rest) = line.strip_prefix(";; Query time: ") {
            d.query_ms = rest.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        } else if line.starts_with(";; ") && line.ends_with("SECTION:") {
            section = line;
        } else if line.trim().is_empty() {
            section = "";
        } else if section.contains("QUESTION") {
            d.question = line
                .trim_start_matches(';')
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_string();
        } else if section.contains("ANSWER") || section.contains("AUTHORITY") {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() >= 5 {
                let rec = (
                    f[0].to_string(),
                    f[1].parse().unwrap_or(0),
                    f[3].to_string(),
                    f[4..].join(" "),
                );
                if section.contains("ANSWER") {
                    d.answers.push(rec);
                } else {
                    d.authority.push(rec);
                }
            }
        }
    }
    d
}

/// A private CA and a server certificate for `name`, made with openssl
/// inside the lab's directory: what DoT/DoH upstreams in the lab present.
pub struct LabPki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Lab {
    pub fn pki(&self, name: &str) -> LabPki {
        let dir = self.path("pki");
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        self.client.sh(&format!(
            "set -e; cd {d}
             openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                 -keyout ca.key -out ca.pem -days 2 -subj '/CN=tproxyd lab CA' 2>/dev/null
             openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
                 -keyout server.key -out server.csr -subj '/CN={name}' 2>/dev/null
             printf 'subjectAltName=DNS:{name}\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext.cnf
             openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                 -out server.pem -days 2 -extfile ext.cnf 2>/dev/null"
        ));
        LabPki {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }

    /// Starts dnsdist in server namespace `i` with `config` (Lua), its
    /// security polling off, and waits until it logs `ready_line`.
    pub fn dnsdist(&self, i: usize, config: &str, ready_line: &str) -> u32 {
        let conf = self.path("dnsdist.conf");
        std::fs::write(&conf, format!("setSecurityPollSuffix(\"\")\n{config}\n")).unwrap();
        let out = self.path("dnsdist.out");
        let conf_s = conf.display().to_string();
        let pid = self.spawn(
            &self.servers[i],
            "dnsdist",
            &["-C", &conf_s, "--supervised", "--disable-syslog"],
            &out,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&out).unwrap_or_default().contains(ready_line) {
            assert!(
                Instant::now() < deadline,
                "dnsdist did not start: {}",
                std::fs::read_to_string(&out).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        pid
    }
}
