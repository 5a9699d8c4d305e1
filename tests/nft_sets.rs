//! tproxyd's nftables set feeder against the real kernel, in a namespace
//! of its own: sets created typed and with timeouts, elements committed
//! before the answer is released, timeouts refreshed, the table removed
//! only when tproxyd created it.

mod lab;

use lab::Lab;
use lab::nft::{elements, expires_in};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tproxyd::nft::{NftSets, SetPair, Update};
use tproxyd::stats::Stats;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn update(set: &SetPair, addr: &str, secs: u64) -> Update {
    let ip = ip(addr);
    Update {
        set: set.for_ip(ip).clone(),
        ip,
        timeout: Duration::from_secs(secs),
    }
}

fn start(lab: &Lab, table: &'static str, names: &'static [&'static str], stats: Arc<Stats>) -> Arc<NftSets> {
    start_bounded(lab, table, names, 65_536, stats)
}

fn start_bounded(
    lab: &Lab,
    table: &'static str,
    names: &'static [&'static str],
    max_elements: u32,
    stats: Arc<Stats>,
) -> Arc<NftSets> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    lab.gateway
        .enter(move || NftSets::start(table, &names, max_elements, stats).map(Arc::new))
        .unwrap_or_else(|e| panic!("starting the sets: {e}"))
}

fn wait(rx: Option<tokio::sync::oneshot::Receiver<()>>) {
    if let Some(rx) = rx {
        rx.blocking_recv().expect("the feeder answers");
    }
}

#[test]
fn sets_are_typed_fed_refreshed_and_removed_with_an_owned_table() {
    let lab = Lab::new();
    let stats = Arc::new(Stats::default());
    let sets = start(&lab, "tproxyd_dns", &["game", "voip"], stats.clone());
    assert!(sets.owns_table());
    let listing = lab.gateway.sh("nft list table inet tproxyd_dns");
    for (set, ty) in [("game4", "ipv4_addr"), ("game6", "ipv6_addr"), ("voip4", "ipv4_addr")] {
        let block = listing.split(&format!("set {set} {{")).nth(1).expect(set);
        assert!(block.contains(&format!("type {ty}")), "{set}: {listing}");
        assert!(block.contains("flags timeout"), "{set}: {listing}");
    }

    let game = SetPair::new("game");
    let voip = SetPair::new("voip");
    // One answer feeding two sets, both families; committed before the
    // receiver fires.
    wait(sets.add(
        vec![
            update(&game, "198.51.100.7", 30),
            update(&game, "2001:db8::7", 30),
            update(&voip, "198.51.100.7", 30),
        ],
        Instant::now(),
    ));
    for (set, addr) in [
        ("game4", "198.51.100.7"),
        ("game6", "2001:db8::7"),
        ("voip4", "198.51.100.7"),
    ] {
        let left = expires_in(&lab, "tproxyd_dns", set, addr).unwrap_or_else(|| panic!("{addr} not in {set}"));
        assert!(left <= 30.0 && left > 25.0, "{set} {addr}: {left}s left");
    }
    assert_eq!(stats.nft_added.get(), 3);

    // The same element again with a longer timeout: refreshed, no error.
    wait(sets.add(vec![update(&game, "198.51.100.7", 300)], Instant::now()));
    let left = expires_in(&lab, "tproxyd_dns", "game4", "198.51.100.7").unwrap();
    assert!(left > 290.0 && left <= 300.0, "refreshed to {left}s");
    assert_eq!(stats.nft_refreshed.get(), 1);
    // A shorter one does not shorten it.
    wait(sets.add(vec![update(&game, "198.51.100.7", 10)], Instant::now()));
    assert!(expires_in(&lab, "tproxyd_dns", "game4", "198.51.100.7").unwrap() > 290.0);

    // Someone deletes the table under us: the sets come back.
    lab.gateway.sh("nft delete table inet tproxyd_dns");
    wait(sets.add(vec![update(&game, "198.51.100.8", 30)], Instant::now()));
    assert!(expires_in(&lab, "tproxyd_dns", "game4", "198.51.100.8").is_some());
    assert_eq!(stats.nft_errors.get(), 0);

    sets.shutdown();
    let out = lab.gateway.sh_output("nft list table inet tproxyd_dns");
    assert!(!out.status.success(), "the owned table outlived tproxyd");
}

#[test]
fn a_table_declared_by_the_operator_is_left_in_place() {
    let lab = Lab::new();
    // The operator's own rule already uses the set.
    lab.gateway.sh("nft -f - <<'EOF'
table inet tproxyd_dns {
    set game4 { type ipv4_addr; flags timeout; }
    chain steer {
        type filter hook prerouting priority mangle; policy accept;
        ip daddr @game4 meta mark set 0x20
    }
}
EOF");
    let stats = Arc::new(Stats::default());
    let sets = start(&lab, "tproxyd_dns", &["game"], stats.clone());
    assert!(!sets.owns_table());
    wait(sets.add(vec![update(&SetPair::new("game"), "203.0.113.9", 60)], Instant::now()));
    assert!(expires_in(&lab, "tproxyd_dns", "game4", "203.0.113.9").is_some());
    sets.shutdown();
    let listing = lab.gateway.sh("nft list table inet tproxyd_dns");
    assert!(listing.contains("meta mark set 0x00000020"), "{listing}");
    assert!(listing.contains("set game6"), "{listing}");
}

#[test]
fn a_burst_of_answers_is_all_committed() {
    let lab = Lab::new();
    let stats = Arc::new(Stats::default());
    let sets = start(&lab, "tproxyd_dns", &["burst"], stats.clone());
    let pair = SetPair::new("burst");
    let now = Instant::now();
    let waits: Vec<_> = (0..2_000u32)
        .map(|i| {
            let addr = std::net::Ipv4Addr::from(0xC633_6400u32 + (i % 256) + ((i / 256) << 8)).to_string();
            sets.add(vec![update(&pair, &addr, 60)], now)
        })
        .collect();
    for w in waits {
        wait(w);
    }
    assert_eq!(stats.nft_added.get(), 2_000);
    let count = lab
        .gateway
        .sh("nft list set inet tproxyd_dns burst4 | grep -o 'expires' | wc -l");
    assert_eq!(count.trim(), "2000");
    drop(sets);
}

#[test]
fn a_full_set_refuses_new_addresses_but_still_refreshes_and_releases_answers() {
    let lab = Lab::new();
    let stats = Arc::new(Stats::default());
    let sets = start_bounded(&lab, "tproxyd_dns", &["flood"], 2, stats.clone());
    let pair = SetPair::new("flood");
    let now = Instant::now();
    wait(sets.add(vec![update(&pair, "198.51.100.1", 30)], now));
    wait(sets.add(vec![update(&pair, "198.51.100.2", 30)], now));
    // Queued together with a refresh: the batch fails as a whole, then each
    // answer is committed on its own.
    let third = sets.add(vec![update(&pair, "198.51.100.3", 30)], now);
    let refresh = sets.add(vec![update(&pair, "198.51.100.1", 300)], now);
    wait(third);
    wait(refresh);
    assert_eq!(elements(&lab, "tproxyd_dns", "flood4").len(), 2);
    assert!(expires_in(&lab, "tproxyd_dns", "flood4", "198.51.100.3").is_none());
    assert!(expires_in(&lab, "tproxyd_dns", "flood4", "198.51.100.1").unwrap() > 290.0);
    assert_eq!(stats.nft_errors.get(), 1);
    assert!(
        lab.gateway
            .sh("nft list set inet tproxyd_dns flood4")
            .contains("size 2")
    );
}
