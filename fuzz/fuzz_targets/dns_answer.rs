//! Fuzzes the answer path with arbitrary upstream datagrams: validation,
//! scrubbing, TTL clamps, caching, and re-serving from the cache. This is
//! what anyone on the WAN side who can spoof an upstream controls.
//!
//!     cargo fuzz run dns_answer      (from the repository root)
//!
//! The harness and its invariants live in tests/support/answer_path.rs,
//! shared with the deterministic twin in tests/dns_robustness.rs.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::{Arc, LazyLock};
use tproxyd::config::Config;
use tproxyd::dns::DnsEngine;
use tproxyd::stats::Stats;

#[path = "../../tests/support/answer_path.rs"]
mod answer_path;

const CONFIG: &str = include_str!("../../tests/data/dns-engine.toml");

static ENGINE: LazyLock<DnsEngine> = LazyLock::new(|| {
    let config = Config::parse(CONFIG, Path::new("fuzz.toml")).expect("fuzz config");
    let dns = config.dns().expect("dns section").clone();
    DnsEngine::build(&dns, 255, Arc::new(Stats::default())).expect("engine")
});

fuzz_target!(|data: &[u8]| {
    answer_path::run(&ENGINE, data);
});
