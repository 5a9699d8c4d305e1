//! Routing by domain: what tproxyd's own DNS answers told each client.
//!
//! Every answer tproxyd gives (forwarded, cached or local) is read once by
//! [`answer`] into the queried name, its CNAME chain and the addresses it
//! resolved to. That goes two ways: into the [`map`] from (client, answered
//! IP) to names, which domain relay rules consult when the client's first
//! datagram arrives; and, for DNS rules with `nft_set`, into nftables sets
//! (see [`crate::nft`]).

pub mod answer;
pub mod feed;
pub mod map;

pub use answer::Resolution;
pub use feed::DomainFeed;
pub use map::{MapLimits, NameMap};
