//! `tproxyd explain`: which rule decides a query or a flow, and what would
//! happen, without touching the network.
//!
//! The answer comes from the same code the daemon runs: DNS questions are
//! put to a real [`DnsEngine`] (built from the config, lists loaded) and
//! the response it would send is described; flows go through the same
//! [`UdpRules`]. This is how a user finds out why a name is blocked.

use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::{Name, RecordType};
use std::fmt::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;

use crate::config::{Config, NatMode, line_col};
use crate::dns::engine::DnsBuildError;
use crate::dns::names::query_key;
use crate::dns::{DnsEngine, Outcome, Transport};
use crate::net::sockets;
use crate::relay::rules::UdpRules;
use crate::relay::{Decision, Host, decide};
use crate::stats::{RCODE_NAMES, Stats};

/// What to explain.
#[derive(Debug, Clone)]
pub enum Question {
    /// A DNS query for `name` of type `qtype` from `client`.
    Query {
        client: IpAddr,
        name: String,
        qtype: RecordType,
    },
    /// A UDP flow from `client` to `dst`.
    Flow { client: SocketAddr, dst: SocketAddr },
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("{0:?} is not a domain name")]
    BadName(String),
    #[error(transparent)]
    Dns(#[from] DnsBuildError),
}

/// Explains `question` under `config` (read from `path`, whose text gives
/// the rules' line numbers).
pub fn explain(config: &Config, path: &Path, question: &Question) -> Result<String, ExplainError> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let at = |offset: usize| format!("{}:{}", path.display(), line_col(&text, offset).0);
    let mut out = String::new();
    match question {
        Question::Query { client, name, qtype } => {
            let _ = writeln!(out, "query {name} {qtype} from {client}");
            let Some(dns) = config.dns() else {
                let _ = writeln!(out, "  no [dns] section: diverted DNS is relayed like any other UDP");
                return Ok(out);
            };
            let engine = DnsEngine::build(dns, config.mark.0, Arc::new(Stats::default()))?;
            let qname = Name::from_str(name)
                .map_err(|_| ExplainError::BadName(name.clone()))?
                .append_domain(&Name::root())
                .map_err(|_| ExplainError::BadName(name.clone()))?;
            if !engine.allows(*client) {
                let _ = writeln!(out, "  {client} is outside dns.allow: refused before any rule");
            }
            match engine.rules().first_match(*client, &query_key(&qname), *qtype) {
                Some(rule) => {
                    let span = dns.rules.get(rule.number - 1).map_or(0, |r| r.span().start);
                    let names = match rule.name_count() {
                        0 => String::new(),
                        1 => ", 1 name".to_string(),
                        n => format!(", {n} names"),
                    };
                    let _ = writeln!(
                        out,
                        "  rule {} ({}{names}) matches: {}",
                        rule.number,
                        at(span),
                        rule.action.kind()
                    );
                    if !rule.nft_sets.is_empty() {
                        let sets: Vec<String> = rule.nft_sets.iter().map(|p| format!("{}/{}", p.v4, p.v6)).collect();
                        let table = &dns.nft.table;
                        let _ = writeln!(
                            out,
                            "  → its addresses go into nftables sets {} of inet {table}, for TTL + {:?}",
                            sets.join(", "),
                            dns.names.grace
                        );
                    }
                }
                None => {
                    let _ = writeln!(
                        out,
                        "  no rule matches: the default upstream group {:?}",
                        dns.upstream.get_ref()
                    );
                }
            }
            let mut q = Message::query();
            q.metadata.recursion_desired = true;
            q.add_query(Query::query(qname, *qtype));
            q.set_edns(Edns::new());
            let bytes = q.to_vec().unwrap_or_default();
            match engine.answer_now(&bytes, *client, Transport::Udp) {
                Outcome::Reply(reply) | Outcome::Held(reply, _) | Outcome::Prefetch(reply, _) => {
                    describe_reply(&mut out, &reply)
                }
                Outcome::Forward(pending) => {
                    if let Some(g) = engine.groups().get(pending.group()) {
                        let _ = writeln!(
                            out,
                            "  → forwarded to upstream group {:?} ({}), then cached for its TTL",
                            g.name,
                            g.server_labels().join(", ")
                        );
                    }
                }
                Outcome::Drop => {
                    let _ = writeln!(out, "  → dropped");
                }
            }
        }
        Question::Flow { client, dst } => {
            let _ = writeln!(out, "flow {client} → {dst} (UDP)");
            let rules = UdpRules::new(&config.relay, config.mark.0);
            let dns_port = |port: u16| config.dns().is_some_and(|d| d.ports.contains(&port));
            let listener = config
                .relay
                .listen
                .0
                .first()
                .copied()
                .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)));
            let known = if UdpRules::has_domain_rules(&rules) || config.admin.is_some() {
                match known_names(config, client.ip(), dst.ip()) {
                    Ok(names) if names.is_empty() => {
                        let _ = writeln!(
                            out,
                            "  names: none; tproxyd's DNS answered {} no name with {} (domain rules cannot match)",
                            client.ip(),
                            dst.ip()
                        );
                        names
                    }
                    Ok(names) => {
                        let list: Vec<String> = names.iter().map(ToString::to_string).collect();
                        let _ = writeln!(
                            out,
                            "  names: {} resolved {} as {}",
                            client.ip(),
                            dst.ip(),
                            list.join(", ")
                        );
                        names
                    }
                    Err(why) => {
                        let _ = writeln!(out, "  names: unknown ({why}); domain rules are taken as not matching");
                        Vec::new()
                    }
                }
            } else {
                Vec::new()
            };
            let names = |_: IpAddr, _: IpAddr| known.clone();
            let host = Host {
                listener,
                dns_port: &dns_port,
                is_local: &sockets::is_local_address,
                names: &names,
            };
            let rule = match decide(*client, Some(*dst), &host, &rules) {
                Decision::NoOriginalDestination => {
                    let _ = writeln!(out, "  client port 0: dropped (no_orig_dst)");
                    return Ok(out);
                }
                Decision::MappedDestination => {
                    let _ = writeln!(
                        out,
                        "  {dst} is an IPv4-mapped address, which no IPv6 packet may carry: dropped (no_orig_dst)"
                    );
                    return Ok(out);
                }
                Decision::Loop => {
                    let _ = writeln!(
                        out,
                        "  {dst} is tproxyd's own listener: dropped (loop), relaying it would bring it back forever"
                    );
                    return Ok(out);
                }
                Decision::Dns => {
                    let ports = config.dns().map(|d| d.ports.clone()).unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "  port {} is in dns.ports {ports:?}: answered by the DNS engine, not relayed (explain it with --query)",
                        dst.port(),
                    );
                    return Ok(out);
                }
                Decision::Drop(rule) | Decision::Relay(rule) => rule,
            };
            if rule.number == 0 {
                let _ = writeln!(out, "  no rule matches: the defaults apply");
            } else {
                let span = config.relay.rules.get(rule.number - 1).map_or(0, |r| r.span().start);
                let by = if rule.by_domain() { ", by domain" } else { "" };
                let _ = writeln!(out, "  rule {} ({}{by}) matches", rule.number, at(span));
            }
            let _ = writeln!(out, "  → {}", rule.route);
            if rule.route != crate::relay::rules::Route::Drop {
                let nat = match rule.nat {
                    NatMode::Symmetric => "symmetric (one mapping per destination; only it may answer)",
                    NatMode::FullCone => "full-cone (one mapping per client endpoint; any remote may answer)",
                };
                let own = rule.own_socket(*dst);
                let _ = writeln!(out, "  → NAT {nat}, idle timeout {:?}", rule.idle_timeout_for(own));
                if own {
                    let _ = writeln!(
                        out,
                        "  → a socket of its own, on a port the kernel picks at random (relay.own_socket_ports or the rule's own_socket)"
                    );
                }
            }
        }
    }
    Ok(out)
}

/// The names the running daemon's DNS answered `client` with `dst`,
/// asked through its `[admin]` endpoint (the map lives in the daemon).
fn known_names(config: &Config, client: IpAddr, dst: IpAddr) -> Result<Vec<Name>, String> {
    use std::io::{Read, Write as _};
    let admin = config
        .admin
        .as_ref()
        .ok_or("the names live in the running daemon; set [admin] listen so explain can ask it")?;
    let addr = admin.listen.0;
    let timeout = std::time::Duration::from_secs(2);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("the running daemon's admin endpoint {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let request = format!("GET /names?client={client}&dst={dst} HTTP/1.1\r\nHost: tproxyd\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("admin endpoint {addr}: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("admin endpoint {addr}: {e}"))?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "admin endpoint {addr} answered {}",
            head.lines().next().unwrap_or("")
        ));
    }
    Ok(body.lines().filter_map(|l| Name::from_str(l.trim()).ok()).collect())
}

fn describe_reply(out: &mut String, reply: &[u8]) {
    let Ok(m) = Message::from_vec(reply) else {
        let _ = writeln!(out, "  → (unparseable reply)");
        return;
    };
    let code = u16::from(m.metadata.response_code);
    match RCODE_NAMES.get(usize::from(code)).filter(|_| code < 6) {
        Some(name) => {
            let _ = write!(out, "  → {name}");
        }
        None => {
            let _ = write!(out, "  → RCODE {code}");
        }
    }
    if m.answers.is_empty() {
        let _ = writeln!(out, ", no records");
    } else {
        let _ = writeln!(out);
        for r in &m.answers {
            let _ = writeln!(out, "      {} {} {} {}", r.name, r.ttl, r.record_type(), r.data);
        }
    }
}
