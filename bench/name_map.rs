//! Bytes per name-map entry, counted by the allocator (run by hand:
//! `cargo bench --bench name_map`).
//!
//! Fills a map with 100,000 (client, address) entries, each holding a
//! two-name chain as a typical CDN answer does (`www.game.example` →
//! `edge-N.cdn.example`), and divides what the allocator holds by the entry
//! count. Also prints the map's own estimate, which its `max_bytes` bound
//! is counted in, so the two can be compared.

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::rr::Name;
use tproxyd::domain::{MapLimits, NameMap, Resolution};

struct Counting;

static HELD: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator, only counting sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        HELD.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        HELD.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        HELD.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const ENTRIES: u32 = 100_000;

fn main() {
    for (label, v6) in [("IPv4 client and address", false), ("IPv6 client and address", true)] {
        // Names are built before counting: the map's share is what it copies.
        let answers: Vec<(IpAddr, Resolution)> = (0..ENTRIES)
            .map(|i| {
                let client = if v6 {
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, (i % 200) as u16, 0, 0, 0, 1))
                } else {
                    IpAddr::V4(Ipv4Addr::new(192, 0, 2, (i % 200) as u8))
                };
                let addr = if v6 {
                    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, (i >> 16) as u16, i as u16))
                } else {
                    IpAddr::V4(Ipv4Addr::from(0xCB00_7100u32.wrapping_add(i)))
                };
                let chain = vec![
                    Name::from_str(&format!("www{}.game.example.", i % 1000)).unwrap_or_default(),
                    Name::from_str(&format!("edge-{i}.cdn.example.")).unwrap_or_default(),
                ];
                (
                    client,
                    Resolution {
                        chain,
                        addrs: vec![(addr, 300)],
                    },
                )
            })
            .collect();
        let before = HELD.load(Ordering::Relaxed);
        let map = NameMap::new(MapLimits {
            max_entries: ENTRIES as usize,
            max_bytes: usize::MAX,
        });
        let now = Instant::now();
        let started = Instant::now();
        for (client, res) in &answers {
            map.insert(*client, res, Duration::from_secs(60), now);
        }
        let insert_ns = started.elapsed().as_nanos() as f64 / f64::from(ENTRIES);
        let started = Instant::now();
        let mut found = 0;
        for (client, res) in &answers {
            found += map.lookup(*client, res.addrs[0].0, now).len();
        }
        let lookup_ns = started.elapsed().as_nanos() as f64 / f64::from(ENTRIES);
        let held = HELD.load(Ordering::Relaxed) - before;
        println!(
            "{label}: {} entries, {:.0} bytes per entry by the allocator, {:.0} by the map's own count; \
             insert {insert_ns:.0} ns, lookup {lookup_ns:.0} ns ({found} names found)",
            map.len(),
            held as f64 / map.len() as f64,
            map.bytes() as f64 / map.len() as f64,
        );
    }
}
