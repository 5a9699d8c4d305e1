//! tproxyd: a transparent UDP and DNS proxy for Linux TPROXY gateways.
//!
//! Start at [`server::run`]; the relay's data path is described in [`relay`].

pub mod admin;
pub mod config;
pub mod dns;
pub mod doctor;
pub mod domain;
pub mod explain;
pub mod firewall;
pub mod metrics;
pub mod net;
pub mod nft;
pub mod pidfile;
pub mod places;
pub mod priority;
pub mod privileges;
pub mod ratelog;
pub mod relay;
pub mod reload;
pub mod safe_file;
pub mod server;
pub mod shutdown;
pub mod stats;
pub mod sync;
#[cfg(test)]
mod test_rng;
