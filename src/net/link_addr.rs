//! A neighbour's link-layer address, as the kernel's neighbour table
//! holds it (`NDA_LLADDR`): what tells one device of the LAN from
//! another, whatever addresses it uses ([`crate::dns::clients`]).

/// The longest link-layer address the kernel has (`MAX_ADDR_LEN`).
const MOST: usize = 32;

/// A link-layer address (6 bytes on Ethernet and Wi-Fi).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkAddr {
    len: u8,
    bytes: [u8; MOST],
}

impl LinkAddr {
    /// The address `value` holds; `None` when it is empty or longer than
    /// the kernel's longest.
    pub fn from_bytes(value: &[u8]) -> Option<LinkAddr> {
        if value.is_empty() || value.len() > MOST {
            return None;
        }
        let mut bytes = [0; MOST];
        bytes[..value.len()].copy_from_slice(value);
        Some(LinkAddr {
            len: u8::try_from(value.len()).ok()?,
            bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_of_other_bytes_or_lengths_differ_and_odd_ones_are_none() {
        let mac = LinkAddr::from_bytes(&[2, 0, 0, 0, 0, 1]).unwrap();
        assert_eq!(mac, LinkAddr::from_bytes(&[2, 0, 0, 0, 0, 1]).unwrap());
        assert_ne!(mac, LinkAddr::from_bytes(&[2, 0, 0, 0, 0, 2]).unwrap());
        assert_ne!(mac, LinkAddr::from_bytes(&[2, 0, 0, 0, 0, 1, 0]).unwrap());
        assert_eq!(LinkAddr::from_bytes(&[]), None);
        assert_eq!(LinkAddr::from_bytes(&[1; 33]), None);
        assert!(LinkAddr::from_bytes(&[1; 20]).is_some(), "InfiniBand");
    }
}
