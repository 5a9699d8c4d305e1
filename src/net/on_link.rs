//! Which addresses the kernel sends to directly on a link (a neighbour of
//! ours) rather than through a router, read from its routing tables.
//!
//! Why: answers held back on a filling socket ([`super::unresolved`]) are
//! those that would wait for a neighbour to be resolved. A client behind a
//! router is never in the neighbour table, yet its answers do not wait:
//! they go to the router, whose address the kernel knows. Telling the two
//! apart by the routes keeps such clients answered through a forged flood,
//! and forging an address behind a router gains a forger nothing: its
//! answers leave at once, as the real devices' do.
//!
//! A route counts as on-link when it is a unicast route without a gateway
//! (the kernel's own routes for an interface's subnets, in either family,
//! and any route straight out of a device); routes of every table are
//! read, so an address that some table sends directly is taken as on-link.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::rtnetlink_dump::{DumpError, address, attributes, dump_with};

const RTM_NEWROUTE: u16 = 24;
const RTM_GETROUTE: u16 = 26;
/// `struct rtmsg`: family, dst_len, src_len, tos, table, protocol, scope,
/// type, flags (u32).
const RTMSG: usize = 12;
const RTN_UNICAST: u8 = 1;
const RTA_DST: u16 = 1;
const RTA_GATEWAY: u16 = 5;
const RTA_MULTIPATH: u16 = 9;
const RTA_VIA: u16 = 18;

/// A destination prefix of an on-link route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefix {
    net: IpAddr,
    len: u8,
}

impl Prefix {
    /// Whether `ip` is within the prefix (families must match).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let bits = u32::from(self.len.min(32));
                let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let bits = u32::from(self.len.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Reads the on-link prefixes of every routing table, both families.
pub fn read() -> Result<Vec<Prefix>, DumpError> {
    let mut prefixes = Vec::new();
    dump_with(RTM_GETROUTE, RTMSG, &mut |kind, payload| {
        if kind == RTM_NEWROUTE
            && let Some(p) = on_link_route(payload)
            && !prefixes.contains(&p)
        {
            prefixes.push(p);
        }
    })?;
    Ok(prefixes)
}

/// The destination of one route (`rtmsg` and its attributes), if it is a
/// unicast route without a gateway.
fn on_link_route(payload: &[u8]) -> Option<Prefix> {
    let (family, len, kind) = (*payload.first()?, *payload.get(1)?, *payload.get(7)?);
    if kind != RTN_UNICAST {
        return None;
    }
    let mut net = match i32::from(family) {
        libc::AF_INET => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        libc::AF_INET6 => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        _ => return None,
    };
    for attr in attributes(payload.get(RTMSG..)?) {
        match attr.ok()? {
            (RTA_GATEWAY | RTA_MULTIPATH | RTA_VIA, _) => return None,
            (RTA_DST, value) => net = address(value)?,
            _ => {}
        }
    }
    Some(Prefix { net, len })
}

#[cfg(test)]
mod tests {
    use super::super::rtnetlink_dump::align4;
    use super::*;

    /// One route's payload: `rtmsg` then its attributes.
    fn route(family: u8, len: u8, kind: u8, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut m = vec![family, len, 0, 0, 254, 2, 253, kind, 0, 0, 0, 0];
        for (t, v) in attrs {
            let attr_len = 4 + v.len();
            m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
            m.extend_from_slice(&t.to_ne_bytes());
            m.extend_from_slice(v);
            m.resize(align4(m.len()), 0);
        }
        m
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn unicast_routes_without_a_gateway_are_on_link() {
        let lan = route(
            2,
            24,
            RTN_UNICAST,
            &[(RTA_DST, &[192, 0, 2, 0]), (4, &3u32.to_ne_bytes())],
        );
        let p = on_link_route(&lan).unwrap();
        assert!(p.contains(ip("192.0.2.100")));
        assert!(!p.contains(ip("192.0.3.1")));
        assert!(!p.contains(ip("::ffff:192.0.2.100")), "families never mix");
        let v6 = ip("2001:db8:1::").to_string().parse::<Ipv6Addr>().unwrap().octets();
        let p6 = on_link_route(&route(10, 64, RTN_UNICAST, &[(RTA_DST, &v6)])).unwrap();
        assert!(p6.contains(ip("2001:db8:1::ffff")));
        assert!(!p6.contains(ip("2001:db8:2::1")));
        // Routed through a gateway: not on-link.
        let via = route(
            2,
            26,
            RTN_UNICAST,
            &[(RTA_DST, &[203, 0, 113, 192]), (RTA_GATEWAY, &[192, 0, 2, 10])],
        );
        assert_eq!(on_link_route(&via), None);
        // A default route straight out of a device covers everything.
        let dev = on_link_route(&route(2, 0, RTN_UNICAST, &[])).unwrap();
        assert!(dev.contains(ip("198.51.100.7")));
        // TPROXY's local default route, and broadcast routes: not unicast.
        assert_eq!(on_link_route(&route(2, 0, 2, &[])), None);
        assert_eq!(on_link_route(&route(2, 32, 3, &[(RTA_DST, &[192, 0, 2, 255])])), None);
    }

    #[test]
    fn cut_routes_are_refused_not_a_panic() {
        let whole = route(2, 24, RTN_UNICAST, &[(RTA_DST, &[192, 0, 2, 0])]);
        for cut in 0..whole.len() {
            let _ = on_link_route(&whole[..cut]);
        }
        // A cut attribute is refused.
        assert_eq!(on_link_route(&whole[..whole.len() - 1]), None);
    }

    /// The real tables of this machine read without error.
    #[test]
    fn the_kernels_routes_read() {
        read().unwrap();
    }
}
