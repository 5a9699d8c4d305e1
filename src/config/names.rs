//! `[dns.names]` and `[dns.nft]`: what tproxyd remembers of its answers,
//! and the nftables sets they feed.

use serde::Deserialize;
use serde::de::{self, Deserializer};
use std::time::Duration;

use super::duration;

/// The map from (client, answered IP) to names, used by domain relay rules.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamesConfig {
    /// Kept past the answer's TTL (map entries and set elements alike): a
    /// client may open its flow a little after the TTL ran out, and keeps
    /// using an address it resolved for as long as the flow lives.
    #[serde(default = "NamesConfig::default_grace", deserialize_with = "duration::deserialize")]
    pub grace: Duration,
    /// Most (client, address) entries; 0 turns the map off.
    #[serde(default = "NamesConfig::default_max_entries")]
    pub max_entries: usize,
    /// Most bytes the entries may take.
    #[serde(default = "NamesConfig::default_max_bytes")]
    pub max_bytes: usize,
}

impl NamesConfig {
    fn default_grace() -> Duration {
        Duration::from_secs(300)
    }
    fn default_max_entries() -> usize {
        100_000
    }
    fn default_max_bytes() -> usize {
        64 << 20
    }
}

impl Default for NamesConfig {
    fn default() -> Self {
        NamesConfig {
            grace: Self::default_grace(),
            max_entries: Self::default_max_entries(),
            max_bytes: Self::default_max_bytes(),
        }
    }
}

/// Where the sets named by DNS rules' `nft_set` live.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NftConfig {
    /// The `inet` table holding the sets. Not `auto_rules.nft_table`: the
    /// redirect script replaces that table whole on every `up`, which
    /// would take the sets (and the operator's rules using them) along.
    #[serde(default = "NftConfig::default_table")]
    pub table: String,
    /// Release an answer only once its addresses are committed to the
    /// sets, so the client's first datagram already meets them.
    #[serde(default = "NftConfig::default_wait")]
    pub wait: bool,
    /// Most elements in each set (the kernel refuses more, and tproxyd
    /// counts the refusals): names resolved without end cannot grow the
    /// kernel's memory without end. 0 = no bound.
    #[serde(default = "NftConfig::default_max_elements")]
    pub max_elements: u32,
}

impl NftConfig {
    fn default_table() -> String {
        "tproxyd_dns".into()
    }
    fn default_wait() -> bool {
        true
    }
    fn default_max_elements() -> u32 {
        65_536
    }
}

impl Default for NftConfig {
    fn default() -> Self {
        NftConfig {
            table: Self::default_table(),
            wait: Self::default_wait(),
            max_elements: Self::default_max_elements(),
        }
    }
}

/// A name nft accepts unquoted for a table or set: a letter or `_`, then
/// letters, digits and `_`, short enough for the `4`/`6` suffix.
pub fn valid_nft_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        && name.len() <= 64
}

/// `nft_set = "game"` or `nft_set = ["game", "low_latency"]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetNames(pub Vec<String>);

impl<'de> Deserialize<'de> for SetNames {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let names = match OneOrMany::deserialize(d)? {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        };
        if let Some(bad) = names.iter().find(|n| !valid_nft_name(n)) {
            return Err(de::Error::custom(format!(
                "{bad:?} is not a valid set name: letters, digits and _, starting with a letter (tproxyd adds 4 and 6)"
            )));
        }
        Ok(SetNames(names))
    }
}
