//! Who a flow belongs to and what identifies it.
//!
//! A [`FlowKey`] is what a NAT keys its mappings by. A [`ClientId`] is what
//! fairness counts by: one LAN device. IPv6 devices rotate privacy
//! addresses inside their /64 (RFC 8981), so a device is its /64 there;
//! counting per address would let one host multiply its quota at will.

use std::net::{IpAddr, SocketAddr};

use super::rules::UdpRule;
use crate::config::NatMode;

/// A flow, as a NAT would see it: who sent, and where it was going.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub target: Target,
}

/// The second half of a flow's identity, which depends on its NAT mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// Symmetric: one flow per original destination.
    Destination(SocketAddr),
    /// Full cone: one flow per client endpoint (and rule), whatever the
    /// destination.
    Cone(usize),
}

impl FlowKey {
    /// The table key of a flow: per destination, or per client endpoint
    /// and rule for a full cone.
    pub fn new(client: SocketAddr, dst: SocketAddr, rule: &UdpRule) -> FlowKey {
        let target = match rule.nat {
            NatMode::Symmetric => Target::Destination(dst),
            NatMode::FullCone => Target::Cone(rule.number),
        };
        FlowKey { client, target }
    }

    /// The device this flow counts against.
    pub fn owner(&self) -> ClientId {
        ClientId::of(self.client.ip())
    }
}

/// One LAN device, for quotas: an IPv4 address, or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ClientId {
    V4(u32),
    V6Prefix(u64),
}

impl ClientId {
    pub fn of(ip: IpAddr) -> ClientId {
        match ip {
            IpAddr::V4(v4) => ClientId::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => ClientId::V4(u32::from(v4)),
                None => ClientId::V6Prefix((u128::from(v6) >> 64) as u64),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ClientId {
        ClientId::of(s.parse().unwrap())
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        assert_eq!(id("2001:db8:1::10"), id("2001:db8:1::ffff:1234"));
        assert_ne!(id("2001:db8:1::10"), id("2001:db8:1:1::10"));
        assert_ne!(id("192.0.2.10"), id("192.0.2.11"));
        assert_eq!(id("::ffff:192.0.2.10"), id("192.0.2.10"));
    }
}
