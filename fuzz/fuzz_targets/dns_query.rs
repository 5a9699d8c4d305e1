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

/// Shared with tests/dns_robustness.rs, which runs the same invariants in CI.
const CONFIG: &str = include_str!("../../tests/data/dns-engine.toml");

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
