//! What the redirect rules installed in this network namespace say, read
//! from the text of `nft list ruleset` and `iptables-save` /
//! `ip6tables-save` (mangle table).
//!
//! The doctor compares the config with this: which ports TPROXY sends UDP
//! and TCP to, and on which interfaces LAN traffic is captured (gateway
//! mode, which only works with forwarding on). Only reading: both listings
//! are what an administrator would look at by hand.

use std::process::{Command, Stdio};

/// Transport protocol a TPROXY rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

/// One TPROXY rule: what it diverts and to which local port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redirect {
    /// `None`: the rule does not restrict the protocol.
    pub proto: Option<Proto>,
    pub port: u16,
}

impl Redirect {
    fn covers(&self, proto: Proto) -> bool {
        self.proto.is_none_or(|p| p == proto)
    }
}

/// The two listings, as text.
#[derive(Debug, Default)]
pub struct Installed {
    pub nft: String,
    pub ipt: String,
}

fn command(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Installed {
    /// Lists the rules of this namespace (missing tools give empty text).
    pub fn read() -> Installed {
        let mut ipt = command("iptables-save", &["-t", "mangle"]).unwrap_or_default();
        ipt.push_str(&command("ip6tables-save", &["-t", "mangle"]).unwrap_or_default());
        Installed {
            nft: command("nft", &["list", "ruleset"]).unwrap_or_default(),
            ipt,
        }
    }

    /// Whether any TPROXY rule exists at all.
    pub fn any_tproxy(&self) -> bool {
        !self.redirects().is_empty()
    }

    /// Every TPROXY rule of either flavour.
    pub fn redirects(&self) -> Vec<Redirect> {
        let nft = self.nft.lines().filter_map(nft_redirect);
        let ipt = self.ipt.lines().filter_map(ipt_redirect);
        nft.chain(ipt).collect()
    }

    /// Whether some rule sends `proto` traffic to `port`.
    pub fn sends(&self, proto: Proto, port: u16) -> bool {
        self.redirects().iter().any(|r| r.port == port && r.covers(proto))
    }

    /// Ports that some rule sends `proto` traffic to, restricted to rules
    /// that name that protocol explicitly.
    pub fn ports_for(&self, proto: Proto) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .redirects()
            .iter()
            .filter(|r| r.proto == Some(proto))
            .map(|r| r.port)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// Interfaces other than `lo` whose incoming traffic the TPROXY rules
    /// capture: the LAN side of a gateway.
    pub fn lan_interfaces(&self) -> Vec<String> {
        let mut names = nft_lan_interfaces(&self.nft);
        names.extend(ipt_lan_interfaces(&self.ipt));
        names.sort();
        names.dedup();
        names
    }
}

/// `... tcp dport 53 tproxy to :15354 ...`, `meta l4proto udp tproxy ip to 192.0.2.1:15353`.
fn nft_redirect(line: &str) -> Option<Redirect> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = words.iter().position(|w| *w == "tproxy")?;
    let to = words[at..].iter().position(|w| *w == "to")? + at;
    let port = words.get(to + 1)?.rsplit_once(':')?.1.parse().ok()?;
    // `meta l4proto udp`, `tcp dport 53`, `meta l4proto { tcp, udp }`.
    let names = |p: &str| {
        words[..at]
            .iter()
            .any(|w| w.trim_matches(|c| c == '{' || c == '}' || c == ',') == p)
    };
    let proto = match (names("udp"), names("tcp")) {
        (true, false) => Some(Proto::Udp),
        (false, true) => Some(Proto::Tcp),
        _ => None,
    };
    Some(Redirect { proto, port })
}

/// `-A TPROXYD_CAPTURE -p tcp -m tcp --dport 53 -j TPROXY --on-port 15354 ...`
fn ipt_redirect(line: &str) -> Option<Redirect> {
    let words: Vec<&str> = line.split_whitespace().collect();
    if !words.windows(2).any(|w| w == ["-j", "TPROXY"]) {
        return None;
    }
    let after = |flag: &str| words.windows(2).find(|w| w[0] == flag).map(|w| w[1]);
    let port = after("--on-port")?.parse().ok()?;
    let proto = match after("-p") {
        Some("udp" | "17") => Some(Proto::Udp),
        Some("tcp" | "6") => Some(Proto::Tcp),
        _ => None,
    };
    Some(Redirect { proto, port })
}

/// `iifname "lan0" jump capture` inside a table that holds a tproxy rule.
fn nft_lan_interfaces(ruleset: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut table: Vec<&str> = Vec::new();
    let mut flush = |table: &mut Vec<&str>| {
        if table.iter().any(|l| nft_redirect(l).is_some()) {
            for line in table.iter() {
                names.extend(nft_input_interfaces(line));
            }
        }
        table.clear();
    };
    for line in ruleset.lines() {
        if line.starts_with("table ") {
            flush(&mut table);
        }
        table.push(line);
    }
    flush(&mut table);
    names
}

/// The interface names an `iif`/`iifname` match in `line` accepts (none
/// for a negated match or `lo`).
fn nft_input_interfaces(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let words: Vec<&str> = line.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        if *w != "iifname" && *w != "iif" {
            continue;
        }
        let mut rest = words[i + 1..].iter().copied().peekable();
        match rest.peek() {
            Some(&"!=") => continue,
            Some(&"==") => {
                rest.next();
            }
            _ => {}
        }
        let values: Vec<&str> = match rest.next() {
            Some("{") => rest.take_while(|w| *w != "}").collect(),
            Some(one) => vec![one],
            None => continue,
        };
        for v in values {
            let name = v.trim_matches(|c| c == '"' || c == ',' || c == '{' || c == '}');
            if !name.is_empty() && name != "lo" {
                out.push(name.to_string());
            }
        }
    }
    out
}

/// `-A TPROXYD_PRE -i lan0 -j TPROXYD_CAPTURE`, where the target chain
/// holds a TPROXY rule (or the rule is one).
fn ipt_lan_interfaces(save: &str) -> Vec<String> {
    let words = |l: &str| l.split_whitespace().map(str::to_string).collect::<Vec<String>>();
    let mut tproxy_chains: Vec<String> = vec!["TPROXY".into()];
    for line in save.lines() {
        let w = words(line);
        if ipt_redirect(line).is_some() && w.first().map(String::as_str) == Some("-A") {
            if let Some(chain) = w.get(1) {
                tproxy_chains.push(chain.clone());
            }
        }
    }
    let mut names = Vec::new();
    for line in save.lines() {
        let w = words(line);
        let target = w.windows(2).find(|p| p[0] == "-j").map(|p| p[1].clone());
        if !target.is_some_and(|t| tproxy_chains.contains(&t)) {
            continue;
        }
        for (i, p) in w.windows(2).enumerate() {
            let negated = i > 0 && w[i - 1] == "!";
            if p[0] == "-i" && !negated && p[1] != "lo" {
                names.push(p[1].clone());
            }
        }
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    const NFT: &str = r#"table inet tproxyd {
	chain capture {
		fib daddr type { local, broadcast, multicast } return
		tcp dport 53 tproxy to :15354 meta mark set 0x00000001 accept
		tcp dport 53 drop
		meta l4proto udp tproxy to :15353 meta mark set 0x00000001 accept
		meta l4proto udp drop
	}
	chain prerouting {
		type filter hook prerouting priority mangle; policy accept;
		meta mark & 0x000000ff == 0x000000ff return
		iifname "lan0" jump capture
		iifname { "br-lan", "wlan0" } jump capture
		iif "lo" meta mark 0x00000001 jump capture
	}
}
table inet filter {
	chain input {
		iifname "wan0" drop
	}
}
"#;

    const IPT: &str = "*mangle
-A PREROUTING -j TPROXYD_PRE
-A TPROXYD_CAPTURE -d 0.0.0.0/8 -j RETURN
-A TPROXYD_CAPTURE -p tcp -m tcp --dport 53 -j TPROXY --on-port 15354 --on-ip 0.0.0.0 --tproxy-mark 0x1/0xffffffff
-A TPROXYD_CAPTURE -p udp -j TPROXY --on-port 15353 --on-ip 0.0.0.0 --tproxy-mark 0x1/0xffffffff
-A TPROXYD_PRE -m mark --mark 0xff/0xff -j RETURN
-A TPROXYD_PRE -i eth1 -j TPROXYD_CAPTURE
-A TPROXYD_PRE -i lo -m mark --mark 0x1 -j TPROXYD_CAPTURE
-A FORWARD -i eth9 -j ACCEPT
COMMIT
";

    #[test]
    fn nft_ports_by_protocol() {
        let i = Installed {
            nft: NFT.into(),
            ..Default::default()
        };
        assert!(i.sends(Proto::Udp, 15353) && !i.sends(Proto::Tcp, 15353));
        assert!(i.sends(Proto::Tcp, 15354) && !i.sends(Proto::Udp, 15354));
        assert_eq!(i.ports_for(Proto::Tcp), [15354]);
        let addr = nft_redirect("meta l4proto udp tproxy ip to 192.0.2.1:4000 accept").unwrap();
        assert_eq!(
            addr,
            Redirect {
                proto: Some(Proto::Udp),
                port: 4000
            }
        );
        let both = nft_redirect("meta l4proto { tcp, udp } tproxy to :4001").unwrap();
        assert_eq!(
            both,
            Redirect {
                proto: None,
                port: 4001
            }
        );
    }

    #[test]
    fn iptables_ports_by_protocol() {
        let i = Installed {
            ipt: IPT.into(),
            ..Default::default()
        };
        assert!(i.sends(Proto::Udp, 15353) && !i.sends(Proto::Tcp, 15353));
        assert!(i.sends(Proto::Tcp, 15354) && !i.sends(Proto::Udp, 15354));
    }

    #[test]
    fn lan_side_interfaces_are_those_that_reach_a_tproxy_rule() {
        let i = Installed {
            nft: NFT.into(),
            ipt: IPT.into(),
        };
        assert_eq!(i.lan_interfaces(), ["br-lan", "eth1", "lan0", "wlan0"]);
        assert!(Installed::default().lan_interfaces().is_empty());
        assert!(nft_input_interfaces(r#"iifname != "lan0" return"#).is_empty());
    }
}
