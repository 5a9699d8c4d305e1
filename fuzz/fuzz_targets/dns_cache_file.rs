//! Fuzzes the `dns.cache.file` loader: a file on disk may be truncated,
//! corrupt or crafted, and must never crash the daemon at start.
//!
//!     cargo fuzz run dns_cache_file      (from the repository root)
//!
//! Whatever loads must also survive a save and load again unchanged in
//! number, and stay within the cache's bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::time::Instant;
use tproxyd::config::dns::CacheConfig;
use tproxyd::dns::cache::DnsCache;
use tproxyd::dns::cache_file::{decode_into, encode};

fuzz_target!(|data: &[u8]| {
    let config = CacheConfig {
        capacity: 64,
        max_bytes: 256 << 10,
        ..CacheConfig::default()
    };
    let now = Instant::now();
    let unix = 2_000_000_000;
    let cache = DnsCache::with_stale_window(&config, 86_400);
    let _ = decode_into(&cache, data, now, unix);
    assert!(cache.len() <= 64 && cache.bytes() <= 256 << 10);
    let again = DnsCache::with_stale_window(&config, 86_400);
    let loaded = decode_into(&again, &encode(&cache, now, unix), now, unix).expect("our own file");
    assert_eq!(loaded, cache.len());
});
