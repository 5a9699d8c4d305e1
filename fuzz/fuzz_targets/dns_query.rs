//! Fuzzes the DNS engine's entry point with arbitrary datagrams.
//!
//!     cargo fuzz run dns_query      (from the repository root)
//!
//! Besides "never panics", every reply must be a well-formed response that
//! fits the size the query allowed.
#![no_main]

use hickory_proto::op::{Message, MessageType};
use libfuzzer_sys::fuzz_target;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::{Arc, LazyLock};
use tproxyd::config::Config;
use tproxyd::dns::{DnsEngine, Outcome, Transport};
use tproxyd::stats::Stats;

const CONFIG: &str = r#"
[dns]
[dns.upstreams.default]
servers = ["198.51.100.53"]
[[dns.rules]]
domains = ["printer.lan"]
action = "answer"
a = ["192.0.2.50"]
aaaa = ["2001:db8::50"]
cname = "alias.lan"
[[dns.rules]]
domains = ["*.ads.example"]
action = "block"
block = "null"
[[dns.rules]]
clients = ["192.0.2.0/24"]
qtypes = ["TXT"]
action = "block"
block = "refused"
"#;

static ENGINE: LazyLock<DnsEngine> = LazyLock::new(|| {
    let config = Config::parse(CONFIG, Path::new("fuzz.toml")).expect("fuzz config");
    let dns = config.dns().expect("dns section").clone();
    DnsEngine::build(&dns, 255, Arc::new(Stats::default())).expect("engine")
});

fuzz_target!(|data: &[u8]| {
    let client = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
    for transport in [Transport::Udp, Transport::Tcp] {
        if let Outcome::Reply(bytes) = ENGINE.answer_now(data, client, transport) {
            let reply = Message::from_vec(&bytes).expect("tproxyd sent an unparseable reply");
            assert_eq!(reply.metadata.message_type, MessageType::Response);
            if transport == Transport::Udp {
                assert!(bytes.len() <= 1232, "UDP reply of {} bytes", bytes.len());
            }
        }
    }
});
