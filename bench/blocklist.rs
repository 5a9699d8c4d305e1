//! Block list: how long one million domains take to load, and how much
//! memory they add, compared with the same daemon without the list.

use crate::Options;
use crate::setup::{self, sleep_ms};

#[derive(Debug, Clone, Default)]
pub struct Result {
    pub names: usize,
    /// As logged by the loader.
    pub load_ms: u64,
    pub rss_without_kib: u64,
    pub rss_with_kib: u64,
}

impl Result {
    pub fn extra_mib(&self) -> f64 {
        self.rss_with_kib.saturating_sub(self.rss_without_kib) as f64 / 1024.0
    }
}

pub fn run(_opts: &Options) -> Result {
    let names = 1_000_000;
    let lab = setup::lab();
    let list = lab.path("million.txt");
    let mut text = String::with_capacity(30 * names);
    for i in 0..names {
        // The formats published lists use, in equal parts.
        text.push_str(&match i % 4 {
            0 => format!("tracker{i}.ads.test\n"),
            1 => format!("0.0.0.0 pixel{i}.ads.test\n"),
            2 => format!("||cdn{i}.ads.test^\n"),
            _ => format!("*.wild{i}.ads.test\n"),
        });
    }
    std::fs::write(&list, text).unwrap();

    let without = setup::tproxyd(&lab, &[], "");
    sleep_ms(300);
    let (rss_without_kib, _) = setup::rss_kib(without.pid());
    drop(without);
    sleep_ms(300);

    let rule = format!("[[dns.rules]]\nlists = [\"{}\"]\naction = \"block\"\n", list.display());
    let text = setup::config("").replacen("[[dns.rules]]", &format!("{rule}\n[[dns.rules]]"), 1);
    let with = lab.start_tproxyd_within(&text, std::time::Duration::from_secs(60));
    sleep_ms(300);
    let (rss_with_kib, _) = setup::rss_kib(with.pid());
    let log = with.log_text();
    let load_ms = log
        .lines()
        .find(|l| l.contains("domain list loaded"))
        .and_then(|l| l.split("ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let r = Result {
        names,
        load_ms,
        rss_without_kib,
        rss_with_kib,
    };
    eprintln!(
        "blocklist {} names: load {} ms, +{:.1} MiB RSS",
        r.names,
        r.load_ms,
        r.extra_mib()
    );
    r
}
