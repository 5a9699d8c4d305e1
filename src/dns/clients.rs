//! Who a client is, for the limits each client has: its query rate
//! ([`super::ratelimit`]), its share of the cache
//! ([`super::cache_owners`]) and of an upstream group's places
//! ([`super::shares`]), and its DNS-over-TCP connections.
//!
//! An IPv4 client is its address. An IPv6 host can use every address of
//! its prefix (a /64 at least, often a /56), so counting addresses would
//! let one host multiply every limit: an IPv6 client is its /56. But the
//! devices of one LAN share one /64, and counted so they were one client:
//! one device over the rate limit (busy, or forging sources in the LAN's
//! prefix) emptied every IPv6 device's bucket, 0 to 3 of 20 answers left
//! to another device in the lab, and all of them together held a quarter
//! of the cache.
//!
//! So an IPv6 address of a directly connected prefix that the kernel has
//! resolved to a link-layer address, now or within the hour
//! ([`crate::net::known_devices`]), counts by that link-layer address on
//! that interface ([`crate::net::link_addr`]): it answered the kernel's
//! neighbour solicitation, which a forged source never does, and a device
//! that holds many addresses of the prefix answers for all of them with
//! one link-layer address, so it is still one client. Every other IPv6
//! address counts by its /56 as before: forged sources, and clients
//! behind a router (a site, which may hold a whole prefix). Until the
//! kernel resolves a device's new address, that address counts with the
//! /56's strangers, so one host can hold two counts. During a forged
//! flood of the prefix its queries were then limited, nothing was sent to
//! it, and the kernel never asked for it: it stayed a stranger for the
//! whole flood (lab: none of 20 answered in five rounds, 3 of 3 runs). So
//! such an address, on-link and unresolved, is sent an echo request that
//! makes the kernel ask for it at once ([`crate::net::solicit`], bounded
//! to 40 a second); the device answers, and its next queries count as
//! the device (all 20 by the third round, 3 of 3). An address asked for
//! that stays unresolved is not asked for again for a minute, so a
//! forger's addresses are spent after one echo each and the pace then
//! goes to new ones; a forger bringing more than 40 fresh addresses a
//! second still takes it, and the new address then waits for a later
//! query. Devices behind a
//! bridge that rewrites link-layer addresses (a Wi-Fi repeater's MAC NAT)
//! share its address, and so one count, as all IPv6 devices did before;
//! a device that answers solicitations with many link-layer addresses is
//! a client for each, within the kernel's neighbour table.

use std::net::{IpAddr, Ipv6Addr};

use crate::net::link_addr::LinkAddr;
use crate::net::neigh::NeighbourTable;

/// A client as the per-client limits count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    /// An IPv4 address, or the /56 of an IPv6 address not known as a
    /// device of the LAN.
    Address(IpAddr),
    /// An IPv6 device of the LAN, by its link-layer address on the
    /// interface it was resolved on.
    Device(LinkAddr),
}

impl ClientKey {
    /// `client` counted by its prefix: an IPv4 address (IPv4-mapped ones
    /// too) alone, an IPv6 address by its /56.
    pub fn by_prefix(client: IpAddr) -> ClientKey {
        match client.to_canonical() {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 72) - 1); // /56
                ClientKey::Address(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => ClientKey::Address(v4),
        }
    }
}

/// Tells each client's key, by the kernel's neighbour table.
#[derive(Debug, Default)]
pub struct Clients {
    devices: NeighbourTable,
}

impl Clients {
    /// The key `client`'s limits count by. For an IPv6 client this takes
    /// the table's lock, and now and then reads the table
    /// ([`NeighbourTable::device_link`]); an IPv4 client costs nothing.
    pub fn key(&self, client: IpAddr) -> ClientKey {
        match client.to_canonical() {
            v6 @ IpAddr::V6(_) => self
                .devices
                .device_link(v6)
                .map_or_else(|| ClientKey::by_prefix(v6), ClientKey::Device),
            v4 => ClientKey::Address(v4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn by_prefix_ipv6_counts_by_56_and_ipv4_alone() {
        assert_eq!(
            ClientKey::by_prefix(ip("2001:db8:1:ff::1")),
            ClientKey::by_prefix(ip("2001:db8:1:2::99"))
        );
        assert_ne!(
            ClientKey::by_prefix(ip("2001:db8:1:ff::1")),
            ClientKey::by_prefix(ip("2001:db8:1:100::1"))
        );
        assert_ne!(
            ClientKey::by_prefix(ip("192.0.2.7")),
            ClientKey::by_prefix(ip("192.0.2.8"))
        );
        // IPv4-mapped addresses count as their IPv4 address, either way.
        assert_eq!(
            ClientKey::by_prefix(ip("::ffff:192.0.2.7")),
            ClientKey::by_prefix(ip("192.0.2.7"))
        );
    }

    /// Addresses this machine has never resolved, outside its on-link
    /// prefixes: counted by their /56 as before.
    #[test]
    fn a_stranger_counts_by_its_prefix() {
        let clients = Clients::default();
        for s in [
            "2001:db8:77:1::1",
            "2001:db8:77:2::2",
            "192.0.2.77",
            "::ffff:192.0.2.77",
        ] {
            assert_eq!(clients.key(ip(s)), ClientKey::by_prefix(ip(s)));
        }
    }
}
