//! Network prefixes (`clients`, `destinations`, `bypass`) as written in the
//! file.
//!
//! `"192.0.2.32"` is an easy slip for `"192.0.2.32/32"`; the error says
//! what to write instead of only "invalid IP address syntax". A prefix with
//! host bits set (`192.0.2.33/26`) is accepted as the network it names, and
//! [`host_bits_warning`] says so.

use ipnet::IpNet;
use serde::Deserialize;
use serde::de::{self, Deserializer};
use std::net::IpAddr;

/// One prefix; the error is raised per element so the parser points at it.
struct Cidr(IpNet);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Cidr).map_err(de::Error::custom)
    }
}

/// `deserialize_with` for a list of prefixes.
pub(super) fn list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Ok(Vec::<Cidr>::deserialize(d)?.into_iter().map(|c| c.0).collect())
}

pub(super) fn parse(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net);
    }
    match s.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => Err(format!(
            "{s:?} is an address: expected a CIDR such as {a}/32 (this address) or 192.0.2.0/24 (a network)"
        )),
        Ok(IpAddr::V6(a)) => Err(format!(
            "{s:?} is an address: expected a CIDR such as {a}/128 (this address) or 2001:db8::/64 (a network)"
        )),
        Err(_) => Err(format!(
            "{s:?} is not a CIDR: expected e.g. 192.0.2.32/32 or 2001:db8::/64"
        )),
    }
}

/// For a prefix with bits set below its length, what it really matches.
pub(super) fn host_bits_warning(s: &str) -> Option<String> {
    let net = s.parse::<IpNet>().ok()?;
    let trunc = net.trunc();
    (trunc != net).then(|| {
        format!(
            "{s:?} has host bits set: it matches all of {trunc}; write {trunc}, or {}/{} for the one address",
            net.addr(),
            net.max_prefix_len()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_prefixes() {
        assert_eq!(parse("192.0.2.0/24").unwrap().to_string(), "192.0.2.0/24");
        let e = parse("192.0.2.32").unwrap_err();
        assert!(e.contains("expected a CIDR such as 192.0.2.32/32"), "{e}");
        let e = parse("2001:db8::1").unwrap_err();
        assert!(e.contains("2001:db8::1/128"), "{e}");
        assert!(parse("lan").unwrap_err().contains("not a CIDR"));
        assert_eq!(host_bits_warning("192.0.2.0/26"), None);
        let w = host_bits_warning("192.0.2.33/26").unwrap();
        assert!(w.contains("matches all of 192.0.2.0/26"), "{w}");
        assert!(w.contains("192.0.2.33/32"), "{w}");
    }
}
