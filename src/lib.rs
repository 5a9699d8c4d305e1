//! tproxyd: a transparent UDP and DNS proxy for Linux TPROXY gateways.
//!
//! Start at [`server::run`]; the relay's data path is described in [`relay`].

pub mod config;
pub mod dns;
pub mod net;
pub mod relay;
pub mod server;
pub mod shutdown;
pub mod stats;
