//! A second, lenient read of the file that keeps the position of the
//! values checked after parsing: the files the config names, the CIDRs,
//! and the upstream group each DNS rule names.
//!
//! The structs the daemon uses keep plain types (`PathBuf`, `IpNet`); this
//! view exists only so that errors and warnings about those values can say
//! `FILE:LINE:COL`. It ignores every key it does not look at, and runs only
//! on a file the strict read accepted.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::ops::Range;
use std::path::PathBuf;
use toml::Spanned;

#[derive(Debug, Default, Deserialize)]
pub(super) struct Spans {
    #[serde(default)]
    relay: RelaySpans,
    #[serde(default)]
    dns: DnsSpans,
    #[serde(default)]
    auto_rules: AutoRulesSpans,
}

#[derive(Debug, Default, Deserialize)]
struct RelaySpans {
    #[serde(default)]
    rules: Vec<UdpRuleSpans>,
}

#[derive(Debug, Default, Deserialize)]
struct UdpRuleSpans {
    #[serde(default)]
    clients: Vec<Spanned<String>>,
    #[serde(default)]
    destinations: Vec<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct DnsSpans {
    #[serde(default)]
    rules: Vec<DnsRuleSpans>,
    #[serde(default)]
    upstreams: BTreeMap<String, GroupSpans>,
}

#[derive(Debug, Default, Deserialize)]
struct DnsRuleSpans {
    #[serde(default)]
    clients: Vec<Spanned<String>>,
    #[serde(default)]
    lists: Vec<Spanned<PathBuf>>,
    #[serde(default)]
    hosts: Vec<Spanned<PathBuf>>,
    #[serde(default)]
    upstream: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
struct GroupSpans {
    #[serde(default)]
    ca_file: Option<Spanned<PathBuf>>,
}

#[derive(Debug, Default, Deserialize)]
struct AutoRulesSpans {
    #[serde(default)]
    bypass: Vec<Spanned<String>>,
}

/// A message about the value at a byte range of the file.
pub(super) type Located = (Range<usize>, String);

impl Spans {
    pub(super) fn read(text: &str) -> Spans {
        toml::from_str(text).unwrap_or_default()
    }

    /// Where the `upstream = ...` of DNS rule `index` is written.
    pub(super) fn dns_rule_upstream(&self, index: usize) -> Option<Range<usize>> {
        self.dns.rules.get(index)?.upstream.as_ref().map(Spanned::span)
    }

    /// The first list, hosts or CA file that cannot be read, pointing at
    /// where the config names it.
    pub(super) fn unreadable_file(&self) -> Option<Located> {
        let rules = self.dns.rules.iter();
        let lists = rules.clone().flat_map(|r| r.lists.iter().map(|p| ("list", p)));
        let hosts = rules.flat_map(|r| r.hosts.iter().map(|p| ("hosts", p)));
        let cas = self
            .dns
            .upstreams
            .values()
            .filter_map(|g| g.ca_file.as_ref())
            .map(|p| ("CA", p));
        lists.chain(hosts).chain(cas).find_map(|(kind, path)| {
            let reason = unreadable(path.get_ref())?;
            Some((
                path.span(),
                format!("cannot read {kind} file {}: {reason}", path.get_ref().display()),
            ))
        })
    }

    /// Every CIDR written with host bits set.
    pub(super) fn cidr_warnings(&self) -> Vec<Located> {
        let relay = self
            .relay
            .rules
            .iter()
            .flat_map(|r| r.clients.iter().chain(&r.destinations));
        let dns = self.dns.rules.iter().flat_map(|r| r.clients.iter());
        relay
            .chain(dns)
            .chain(&self.auto_rules.bypass)
            .filter_map(|s| super::cidr::host_bits_warning(s.get_ref()).map(|w| (s.span(), w)))
            .collect()
    }
}

/// Why `path` cannot be read as a file, if it cannot.
fn unreadable(path: &std::path::Path) -> Option<String> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Ok(m) if m.is_dir() => Some("it is a directory".into()),
        Ok(_) => None,
        Err(e) => Some(e.to_string()),
    }
}
