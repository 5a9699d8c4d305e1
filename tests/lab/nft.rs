//! Reading tproxyd's nftables sets the way an operator does: `nft list`.

use super::Lab;

/// Seconds left before `addr` expires in `inet TABLE SET`, if present.
pub fn expires_in(lab: &Lab, table: &str, set: &str, addr: &str) -> Option<f64> {
    let out = lab.gateway.sh(&format!("nft list set inet {table} {set}"));
    let at = out.find(&format!("{addr} "))?;
    let rest = &out[at..];
    let exp = rest.split("expires ").nth(1)?;
    let spec: String = exp
        .chars()
        .take_while(|c| !matches!(c, ',' | ' ' | '\n' | '}'))
        .collect();
    Some(parse_nft_duration(&spec))
}

/// `1m59s998ms` → seconds.
pub fn parse_nft_duration(spec: &str) -> f64 {
    let mut total = 0.0;
    let mut num = String::new();
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: f64 = num.parse().unwrap_or(0.0);
        num.clear();
        total += match c {
            'd' => n * 86_400.0,
            'h' => n * 3_600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                n / 1_000.0
            }
            'm' => n * 60.0,
            's' => n,
            _ => 0.0,
        };
    }
    total
}

/// The addresses in `inet TABLE SET`.
pub fn elements(lab: &Lab, table: &str, set: &str) -> Vec<String> {
    let out = lab.gateway.sh(&format!("nft list set inet {table} {set}"));
    let Some(list) = out.split("elements = {").nth(1) else {
        return Vec::new();
    };
    let list = list.split('}').next().unwrap_or("");
    list.split(',')
        .filter_map(|e| e.split_whitespace().next().map(String::from))
        .collect()
}
