//! `dns.cache.file`: the answer cache written to disk, so a restart does
//! not start cold (and, with serve-stale, still answers while the upstream
//! is down).
//!
//! The file is written whole to a temporary file beside it, synced, then
//! renamed over the old one: a crash mid-write leaves the previous file.
//! Reading trusts nothing: the file may be truncated, corrupt or crafted,
//! so every length is checked, every answer is parsed with hickory like an
//! upstream's, and the first thing wrong ends the load with an error (the
//! caller logs a warning and starts with what was read so far, never a
//! crash). Times are stored as wall-clock seconds, so entries come back
//! aged by the time the daemon was down.
//!
//! Layout: the magic line, then records of `u32 length` + body; a body is
//! `u64 stored (Unix seconds)`, `u32 lifetime (s)`, `u8 group length`,
//! group, `u8 name length`, name (lowercase wire format), `u16 type`,
//! `u16 class`, then the answer as a DNS message.

use hickory_proto::op::Message;
use hickory_proto::rr::{DNSClass, RecordType};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::cache::{CacheKey, DnsCache};

const MAGIC: &[u8] = b"tproxyd-dns-cache 1\n";
/// Largest record accepted: a DNS message is at most 64 KiB.
const MAX_RECORD: usize = 70_000;

#[derive(Debug, thiserror::Error)]
pub enum CacheFileError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a tproxyd cache file (bad header)")]
    Magic,
    #[error("corrupt at byte {0}")]
    Corrupt(usize),
    #[error("not a regular file (a symlink, FIFO or device is never read)")]
    NotRegular,
    #[error("{size} bytes, more than the {limit} a cache of this max_bytes writes")]
    TooLarge { size: u64, limit: u64 },
    /// Only [`crate::safe_file::ReadError::Changing`]: written by another
    /// process while it was read.
    #[error("{0}")]
    Changing(crate::safe_file::ReadError),
}

/// The largest file a cache holding `max_bytes` writes, with room to
/// spare: each entry's estimate counts its records at least at their wire
/// size, its key, and more overhead than the file's per-entry header.
pub fn largest_file(max_bytes: usize) -> u64 {
    (max_bytes as u64).saturating_mul(2).saturating_add(1 << 20)
}

/// Seconds since the Unix epoch now.
fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The cache's entries in the file format, as of `now` / `unix_now`.
pub fn encode(cache: &DnsCache, now: Instant, unix_now: u64) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    for (key, entry) in cache.snapshot(now) {
        let (message, lifetime, stored) = entry.to_message();
        let Ok(wire) = message.to_vec() else { continue };
        let (Ok(group_len), Ok(name_len)) = (u8::try_from(key.group().len()), u8::try_from(key.name().len())) else {
            continue;
        };
        let stored_unix = unix_now.saturating_sub(now.saturating_duration_since(stored).as_secs());
        let mut body = Vec::with_capacity(wire.len() + 64);
        body.extend_from_slice(&stored_unix.to_be_bytes());
        body.extend_from_slice(&lifetime.to_be_bytes());
        body.push(group_len);
        body.extend_from_slice(key.group().as_bytes());
        body.push(name_len);
        body.extend_from_slice(key.name());
        body.extend_from_slice(&u16::from(key.qtype()).to_be_bytes());
        body.extend_from_slice(&u16::from(key.qclass()).to_be_bytes());
        body.extend_from_slice(&wire);
        let Ok(len) = u32::try_from(body.len()) else { continue };
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&body);
    }
    out
}

/// Reads `bytes` into `cache`; returns how many entries were restored. On
/// an error, the entries before the bad record are kept.
pub fn decode_into(cache: &DnsCache, bytes: &[u8], now: Instant, unix_now: u64) -> Result<usize, CacheFileError> {
    let mut rest = bytes.strip_prefix(MAGIC).ok_or(CacheFileError::Magic)?;
    let mut restored = 0;
    while !rest.is_empty() {
        let at = bytes.len() - rest.len();
        let corrupt = || CacheFileError::Corrupt(at);
        let (len, tail) = split(rest, 4).ok_or_else(corrupt)?;
        let len = u32::from_be_bytes(len.try_into().map_err(|_| corrupt())?) as usize;
        if len > MAX_RECORD {
            return Err(corrupt());
        }
        let (body, tail) = split(tail, len).ok_or_else(corrupt)?;
        rest = tail;
        let (key, stored_unix, lifetime, message) = parse_body(body).ok_or_else(corrupt)?;
        let age = unix_now.saturating_sub(stored_unix);
        if cache.restore(key, message, lifetime, age, now) {
            restored += 1;
        }
    }
    Ok(restored)
}

fn split(b: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (b.len() >= n).then(|| b.split_at(n))
}

fn parse_body(body: &[u8]) -> Option<(CacheKey, u64, u32, Message)> {
    let (stored, b) = split(body, 8)?;
    let (lifetime, b) = split(b, 4)?;
    let (group_len, b) = split(b, 1)?;
    let (group, b) = split(b, usize::from(group_len[0]))?;
    let (name_len, b) = split(b, 1)?;
    let (name, b) = split(b, usize::from(name_len[0]))?;
    let (qtype, b) = split(b, 2)?;
    let (qclass, wire) = split(b, 2)?;
    if !valid_wire_name(name) {
        return None;
    }
    let key = CacheKey::new(
        std::str::from_utf8(group).ok()?,
        name,
        RecordType::from(u16::from_be_bytes(qtype.try_into().ok()?)),
        DNSClass::from(u16::from_be_bytes(qclass.try_into().ok()?)),
    );
    let message = Message::from_vec(wire).ok()?;
    // Only what tproxyd can write back and read again: some parsed records
    // re-encode to bytes the parser refuses, and a cache file must survive
    // its own save.
    // Checked in the form `encode` writes: no question, no EDNS.
    let mut rebuilt = Message::new(
        0,
        hickory_proto::op::MessageType::Response,
        hickory_proto::op::OpCode::Query,
    );
    rebuilt.metadata.response_code = message.metadata.response_code;
    rebuilt.answers = message.answers.clone();
    rebuilt.authorities = message.authorities.clone();
    rebuilt.additionals = message.additionals.clone();
    Message::from_vec(&rebuilt.to_vec().ok()?).ok()?;
    Some((
        key,
        u64::from_be_bytes(stored.try_into().ok()?),
        u32::from_be_bytes(lifetime.try_into().ok()?),
        message,
    ))
}

/// Lowercase length-prefixed labels ending in the root label, as
/// [`super::names::wire_key`] writes them.
fn valid_wire_name(name: &[u8]) -> bool {
    if name.len() > 255 {
        return false;
    }
    let mut i = 0;
    while let Some(&len) = name.get(i) {
        if len == 0 {
            return i + 1 == name.len();
        }
        if len > 63 {
            return false;
        }
        let label = name.get(i + 1..i + 1 + usize::from(len));
        if label.is_none_or(|l| l.iter().any(u8::is_ascii_uppercase)) {
            return false;
        }
        i += 1 + usize::from(len);
    }
    false
}

/// Writes the cache to `path` atomically; returns the entries written.
///
/// The file says which names the LAN asked for, so it is readable by the
/// daemon's user only (0600). A temporary file left by a crash, or
/// anything else at its name, is unlinked first and the file created anew
/// without following a link.
pub fn save(cache: &DnsCache, path: &Path) -> Result<usize, CacheFileError> {
    let bytes = encode(cache, Instant::now(), unix_now());
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = Path::new(&tmp_name);
    let result = (|| {
        let mut f = crate::safe_file::create_anew(tmp, 0o600)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    result?;
    Ok(cache.len())
}

/// Loads `path` into `cache`; a missing file is an empty cache, not an error.
pub fn load(cache: &DnsCache, path: &Path) -> Result<usize, CacheFileError> {
    use crate::safe_file::ReadError;
    let limits = crate::safe_file::ReadLimits {
        max_bytes: largest_file(cache.config().max_bytes),
        // Read as root from a directory the daemon's user may write.
        follow_links: false,
        what: "cache file",
    };
    let bytes = match crate::safe_file::read_bounded(path, limits) {
        Ok(bytes) => bytes,
        Err(ReadError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(ReadError::Io(e)) => return Err(e.into()),
        Err(ReadError::NotRegular) => return Err(CacheFileError::NotRegular),
        Err(ReadError::TooLarge { size, limit, .. }) => return Err(CacheFileError::TooLarge { size, limit }),
        Err(e @ ReadError::Changing { .. }) => return Err(CacheFileError::Changing(e)),
    };
    decode_into(cache, &bytes, Instant::now(), unix_now())
}

/// How often the cache is written while running (and once at shutdown).
pub const SAVE_EVERY: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::dns::CacheConfig;
    use crate::dns::names::wire_key;
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::{Name, RData, Record};

    fn key(name: &str) -> CacheKey {
        CacheKey::new(
            "default",
            &wire_key(&Name::from_ascii(name).unwrap()),
            RecordType::A,
            DNSClass::IN,
        )
    }

    fn answer(name: &str, ttl: u32) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.add_answer(Record::from_rdata(
            Name::from_ascii(name).unwrap(),
            ttl,
            RData::A(A::new(192, 0, 2, 1)),
        ));
        m
    }

    #[test]
    fn entries_come_back_aged_by_the_downtime() {
        let c = DnsCache::new(&CacheConfig::default());
        assert!(c.insert(key("a.example."), &mut answer("a.example.", 300)));
        assert!(c.insert(key("b.example."), &mut answer("b.example.", 60)));
        let now = Instant::now();
        let file = encode(&c, now, 1_000_000);
        // Read back 100 s later: b (60 s) has expired, a has 200 s left.
        let fresh = DnsCache::new(&CacheConfig::default());
        assert_eq!(decode_into(&fresh, &file, now, 1_000_100).unwrap(), 1);
        let (entry, age) = fresh.get(&key("a.example.")).unwrap();
        assert!((100..=101).contains(&age), "age {age}");
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        entry.fill(&mut m, age);
        assert!(m.answers[0].ttl <= 200);
        assert!(fresh.get(&key("b.example.")).is_none());
        // With a stale window, b comes back for serve-stale.
        let stale = DnsCache::with_stale_window(&CacheConfig::default(), 3600);
        assert_eq!(decode_into(&stale, &file, now, 1_000_100).unwrap(), 2);
        assert!(stale.get_stale(&key("b.example.")).is_some());
    }

    #[test]
    fn corrupt_or_truncated_files_are_errors_never_panics() {
        let c = DnsCache::new(&CacheConfig::default());
        for i in 0..5 {
            c.insert(
                key(&format!("n{i}.example.")),
                &mut answer(&format!("n{i}.example."), 300),
            );
        }
        let now = Instant::now();
        let file = encode(&c, now, 1_000_000);
        assert!(matches!(
            decode_into(&DnsCache::new(&CacheConfig::default()), b"garbage", now, 1_000_000),
            Err(CacheFileError::Magic)
        ));
        for cut in 0..file.len() {
            let fresh = DnsCache::new(&CacheConfig::default());
            if let Ok(n) = decode_into(&fresh, &file[..cut], now, 1_000_000) {
                assert!(n < 5 && fresh.len() == n, "cut at {cut}");
            }
        }
        let fresh = DnsCache::new(&CacheConfig::default());
        assert!(decode_into(&fresh, &file[..file.len() - 1], now, 1_000_000).is_err());
        assert_eq!(fresh.len(), 4, "what came before the bad record is kept");
        for i in MAGIC.len()..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0xff;
            let _ = decode_into(&DnsCache::new(&CacheConfig::default()), &bad, now, 1_000_000);
        }
        assert!(!valid_wire_name(b"\x01A\x00") && !valid_wire_name(b"\x05ab\x00") && valid_wire_name(b"\x01a\x00"));
    }

    #[test]
    fn save_is_atomic_and_load_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let c = DnsCache::new(&CacheConfig::default());
        c.insert(key("a.example."), &mut answer("a.example.", 300));
        assert_eq!(save(&c, &path).unwrap(), 1);
        assert!(!dir.path().join("cache.tmp").exists());
        let fresh = DnsCache::new(&CacheConfig::default());
        assert_eq!(load(&fresh, &path).unwrap(), 1);
        assert_eq!(load(&fresh, &dir.path().join("missing")).unwrap(), 0);
    }

    #[test]
    fn only_a_regular_file_within_the_bound_is_read_and_the_saved_one_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache");
        let c = DnsCache::new(&CacheConfig::default());
        c.insert(key("a.example."), &mut answer("a.example.", 300));
        save(&c, &path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        // A symlink to it, a FIFO, a directory: refused without blocking.
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        for p in [&link, &fifo, &dir.path().to_path_buf()] {
            let fresh = DnsCache::new(&CacheConfig::default());
            assert!(
                matches!(load(&fresh, p), Err(CacheFileError::NotRegular)),
                "{}",
                p.display()
            );
        }
        // A (sparse) file beyond what this cache could write.
        let small = CacheConfig {
            max_bytes: 1 << 20,
            ..CacheConfig::default()
        };
        let big = dir.path().join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(largest_file(small.max_bytes) + 1)
            .unwrap();
        let fresh = DnsCache::new(&small);
        assert!(matches!(load(&fresh, &big), Err(CacheFileError::TooLarge { .. })));
        // A cache filled to max_bytes writes a file within the bound.
        let full = DnsCache::new(&small);
        for i in 0..20_000 {
            let name = format!("n{i}.example.");
            full.insert(key(&name), &mut answer(&name, 300));
        }
        assert!(full.bytes() > small.max_bytes / 2, "{}", full.bytes());
        save(&full, &path).unwrap();
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(size <= largest_file(small.max_bytes), "{size}");
        assert!(load(&DnsCache::new(&small), &path).unwrap() > 0);
    }

    #[test]
    fn what_loads_saves_and_loads_again() {
        // Found by the dns_cache_file fuzz target: a record that hickory
        // parses but re-encodes into bytes it then refuses.
        const FOUND: &[u8] = &[
            116, 112, 114, 111, 120, 121, 100, 45, 100, 110, 115, 45, 99, 97, 99, 104, 101, 32, 49, 10, 0, 0, 0, 105,
            0, 0, 0, 0, 255, 255, 255, 255, 255, 255, 255, 0, 7, 100, 101, 102, 97, 117, 108, 116, 11, 1, 97, 7, 13, 0,
            255, 255, 255, 255, 0, 0, 1, 0, 1, 0, 0, 1, 44, 0, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 0, 0, 1, 0, 0, 0, 0, 1, 97, 7, 101, 120, 13, 109,
            112, 108, 101, 0, 0, 1, 0, 1, 0, 0, 1, 44, 0, 4, 192, 0, 2, 1,
        ];
        let now = Instant::now();
        let cache = DnsCache::with_stale_window(&CacheConfig::default(), 86_400);
        let _ = decode_into(&cache, FOUND, now, 2_000_000_000);
        let again = DnsCache::with_stale_window(&CacheConfig::default(), 86_400);
        let loaded = decode_into(&again, &encode(&cache, now, 2_000_000_000), now, 2_000_000_000).unwrap();
        assert_eq!(loaded, cache.len());
    }
}
