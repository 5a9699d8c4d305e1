//! Who a flow belongs to and what identifies it.
//!
//! A [`FlowKey`] is what a NAT keys its mappings by. A [`ClientId`] is what
//! fairness counts by: one LAN device. IPv6 devices rotate privacy
//! addresses inside their /64 (RFC 8981), so a device is its /64 there;
//! counting per address would let one host multiply its quota at will.

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};

use super::rules::UdpRule;
use crate::config::NatMode;

/// A flow, as a NAT would see it: who sent, and where it was going.
///
/// Hashed by [`hash_addr`], not field by field: a new flow's key is
/// hashed several times on its way in (the table, the open backlog), and
/// the derived hash of a `SocketAddr` feeds the hasher a discriminant, the
/// address's bytes as a slice and the port one write each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    pub client: SocketAddr,
    pub target: Target,
}

impl Hash for FlowKey {
    #[inline(always)]
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_addr(&self.client, h);
        match self.target {
            Target::Destination(dst) => hash_addr(&dst, h),
            Target::Cone(rule) => h.write_usize(rule),
        }
    }
}

/// Feeds `addr` to `h` in one or two words: an IPv4 address and its port
/// as one, an IPv6 address and its port as two. Keys that are equal hash
/// the same (the IPv6 flow label and scope, which equality also compares,
/// are left out; that costs nothing but a rare shared bucket).
///
/// Always inlined, as is `FlowKey`'s hash: a few instructions, run for
/// every look-up of a flow (several a new flow), and whether the optimiser
/// inlined them moved with unrelated changes to `relay` (how the crate is
/// split for code generation): in one build `hash_addr` was a call in
/// every hash of a key, and the table's look-up took 263 instructions,
/// 214 with these hints (callgrind, "New flows, round 14" in
/// docs/BENCHMARKS.md). Whether lru's own key wrapper is inlined around
/// it is still the optimiser's choice.
#[inline(always)]
pub fn hash_addr<H: Hasher>(addr: &SocketAddr, h: &mut H) {
    match addr {
        SocketAddr::V4(a) => h.write_u64((u64::from(a.ip().to_bits()) << 16) | u64::from(a.port())),
        SocketAddr::V6(a) => {
            h.write_u128(a.ip().to_bits());
            h.write_u32((1 << 16) | u32::from(a.port()));
        }
    }
}

/// A socket address as a hash-map key, hashed by [`hash_addr`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddrKey(pub SocketAddr);

impl Hash for AddrKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        hash_addr(&self.0, h);
    }
}

/// The second half of a flow's identity, which depends on its NAT mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClientId {
    V4(u32),
    V6Prefix(u64),
}

/// One word for the hasher, not a discriminant and then the value: a new
/// flow's client is looked up in several maps (table, backlog, quotas).
impl Hash for ClientId {
    #[inline(always)]
    fn hash<H: Hasher>(&self, h: &mut H) {
        match *self {
            ClientId::V4(a) => h.write_u64(u64::from(a)),
            ClientId::V6Prefix(p) => h.write_u64(p ^ (1 << 63)),
        }
    }
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

    fn hash_of(value: &impl Hash) -> u64 {
        use std::hash::BuildHasher;
        // Fixed seed: the same value must hash the same every time.
        foldhash::fast::FixedState::with_seed(7).hash_one(value)
    }

    fn flow(client: &str, dst: &str) -> FlowKey {
        FlowKey {
            client: client.parse().unwrap(),
            target: Target::Destination(dst.parse().unwrap()),
        }
    }

    #[test]
    fn equal_keys_hash_alike_and_each_part_counts() {
        let k = flow("192.0.2.10:5000", "198.51.100.7:7000");
        assert_eq!(hash_of(&k), hash_of(&flow("192.0.2.10:5000", "198.51.100.7:7000")));
        let others = [
            flow("192.0.2.11:5000", "198.51.100.7:7000"),
            flow("192.0.2.10:5001", "198.51.100.7:7000"),
            flow("192.0.2.10:5000", "198.51.100.8:7000"),
            flow("192.0.2.10:5000", "198.51.100.7:7001"),
            flow("198.51.100.7:7000", "192.0.2.10:5000"),
            FlowKey {
                client: k.client,
                target: Target::Cone(0),
            },
        ];
        for o in &others {
            assert_ne!(hash_of(&k), hash_of(o), "{o:?}");
        }
        let v6 = flow("[2001:db8::10]:5000", "[2001:db8:1::7]:7000");
        assert_eq!(
            hash_of(&v6),
            hash_of(&flow("[2001:db8::10]:5000", "[2001:db8:1::7]:7000"))
        );
        assert_ne!(
            hash_of(&v6),
            hash_of(&flow("[2001:db8::10]:5000", "[2001:db8:1::7]:7001"))
        );
        assert_ne!(hash_of(&id("192.0.2.10")), hash_of(&id("192.0.2.11")));
        assert_ne!(hash_of(&id("2001:db8:1::10")), hash_of(&id("2001:db8:2::10")));
        assert_eq!(
            hash_of(&AddrKey(k.client)),
            hash_of(&AddrKey("192.0.2.10:5000".parse().unwrap()))
        );
    }

    #[test]
    fn ipv6_clients_are_counted_per_64() {
        assert_eq!(id("2001:db8:1::10"), id("2001:db8:1::ffff:1234"));
        assert_ne!(id("2001:db8:1::10"), id("2001:db8:1:1::10"));
        assert_ne!(id("192.0.2.10"), id("192.0.2.11"));
        assert_eq!(id("::ffff:192.0.2.10"), id("192.0.2.10"));
    }
}
