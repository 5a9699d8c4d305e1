//! The daemon's `/metrics`, read from inside a lab namespace.
//!
//! Tests assert on counters a user would read; these are the one way they
//! fetch the text and pick a series out of it.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use super::Netns;

/// `GET /metrics` from the admin endpoint at `addr`, as seen from `ns`.
/// Panics if the endpoint does not answer: every caller needs it to.
pub fn fetch(ns: &Netns, addr: SocketAddr) -> String {
    ns.enter(move || {
        let mut s = TcpStream::connect(addr).expect("admin endpoint");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("request sent");
        let mut out = String::new();
        s.read_to_string(&mut out).expect("response read");
        out
    })
}

/// The value of `series` (name and labels, exactly) in a metrics text.
pub fn find(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// Like [`find`], for a series that must be there.
pub fn value(text: &str, series: &str) -> u64 {
    find(text, series).unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}
