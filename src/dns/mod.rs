//! The DNS engine and its listeners.
//!
//! A query flows one way: [`message`] parses it → [`rules`] pick the first
//! matching rule (names from [`names`]/[`lists`]) → an override or block is
//! answered at once, anything else goes to the [`cache`] → and on a miss to
//! an [`upstream`] group. [`engine`] ties these together; [`server`] is
//! where queries arrive: hijacked datagrams handed over by the relay
//! listener, plain UDP/TCP listeners, and TPROXY TCP listeners.

pub mod aliases;
pub mod cache;
pub mod cache_file;
mod cache_lru;
mod cache_owners;
mod cache_sketch;
mod cache_weight;
pub mod clients;
pub mod deadlines;
pub mod encoder;
pub mod engine;
pub mod lists;
pub mod message;
pub mod misses;
pub mod names;
pub mod outbox;
pub mod plain_answer;
pub mod plain_name;
pub mod ratelimit;
pub mod rendered;
pub mod replies;
pub mod rules;
pub mod scrub;
pub mod server;
pub mod shares;
pub mod tcp_connection;
pub mod upstream;
pub mod wire;

pub use engine::{DnsEngine, Outcome, Pending, Transport};

/// A configured duration as whole seconds for a TTL field (saturating).
pub fn ttl_secs(d: std::time::Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}
pub use server::DnsService;
