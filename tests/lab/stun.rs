//! coturn as an RFC 5780 STUN server, and its NAT discovery client: the
//! tools players use to see their "NAT type".

use std::net::IpAddr;
use std::time::{Duration, Instant};

use super::Lab;

/// What `turnutils_natdiscovery -m -f` concluded.
#[derive(Debug)]
pub struct NatReport {
    pub mapping: String,
    pub filtering: String,
    pub raw: String,
}

impl Lab {
    /// Starts `turnserver --stun-only` in server namespace `i` listening on
    /// `primary` and `alternate` (the two addresses RFC 5780 needs).
    pub fn stun_server(&self, i: usize, primary: IpAddr, alternate: IpAddr) -> u32 {
        let log = self.path("turnserver.log");
        let args = [
            "-n".to_string(),
            "--stun-only".into(),
            format!("--listening-ip={primary}"),
            format!("--listening-ip={alternate}"),
            "--no-cli".into(),
            "--log-file=stdout".into(),
            "--simple-log".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let pid = self.spawn(&self.servers[i], "turnserver", &args, &log);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Both addresses, ports 3478 and 3479 (the RFC 5780 alternate).
            let sockets = self.servers[i].sh("ss -ulnH 'sport = :3478 or sport = :3479'");
            if sockets.lines().count() >= 4 {
                return pid;
            }
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(Instant::now() < deadline, "turnserver did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs the RFC 5780 mapping and filtering discovery from the client.
    pub fn nat_discovery(&self, server: IpAddr) -> NatReport {
        let out = self.client.sh(&format!(
            "timeout 60 turnutils_natdiscovery -m -f {server} 2>&1 || true"
        ));
        let verdict = |section: &str| -> String {
            out.split(section)
                .nth(1)
                .and_then(|rest| rest.lines().find(|l| l.starts_with("NAT with")))
                .unwrap_or("no verdict")
                .trim()
                .to_string()
        };
        NatReport {
            mapping: verdict("Mapping Behavior Discovery"),
            filtering: verdict("Filtering Behavior Discovery"),
            raw: out,
        }
    }
}
