//! Loading block lists and hosts files.
//!
//! Lists found on the internet mix formats and carry junk, so a line that is
//! not understood is skipped and counted rather than failing the load; a
//! file that cannot be read is an error.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use super::names::{DomainSet, normalize};
use crate::safe_file::{ReadError, ReadLimits, read_bounded};

#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct ListError {
    pub path: PathBuf,
    #[source]
    pub source: ReadError,
}

/// How a file went.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LoadStats {
    pub names: usize,
    pub skipped: usize,
}

/// Largest list or hosts file read. Lists are fetched from third parties,
/// often by a cron job, and a million names take about 30 MB; each file is
/// read whole at start and on every reload. A source that sends gigabytes
/// (compromised, or streaming an error) made the daemon hold all of it.
pub const MAX_FILE_BYTES: u64 = 256 * 1024 * 1024;

/// Reads a list or hosts file whole: a regular file of at most
/// [`MAX_FILE_BYTES`], opened without blocking (a FIFO must not hold a
/// reload forever, nor a device such as `/dev/zero` be read without end),
/// and refused rather than loaded torn when a job rewrites it in place
/// while it is read. A symlink is followed: the operator named the path.
fn read(path: &Path) -> Result<Vec<u8>, ListError> {
    let limits = ReadLimits {
        max_bytes: MAX_FILE_BYTES,
        follow_links: true,
        what: "list",
    };
    read_bounded(path, limits).map_err(|source| ListError {
        path: path.to_path_buf(),
        source,
    })
}

/// Lines of `bytes`, without comments and surrounding blanks, skipping
/// lines that are not UTF-8.
fn lines(bytes: &[u8]) -> impl Iterator<Item = Result<&str, ()>> {
    bytes.split(|&b| b == b'\n').filter_map(|raw| {
        let Ok(line) = std::str::from_utf8(raw) else {
            return Some(Err(()));
        };
        let line = line.split('#').next().unwrap_or("").trim();
        (!line.is_empty() && !line.starts_with('!')).then_some(Ok(line))
    })
}

/// Names hosts-format block lists map to 0.0.0.0 that are not blocks.
fn is_placeholder(name: &str) -> bool {
    matches!(
        name,
        "localhost" | "localhost.localdomain" | "local" | "broadcasthost" | "ip6-localhost" | "ip6-loopback"
    ) || name.parse::<IpAddr>().is_ok()
}

/// Adds every name of a domain-list file to `set`. Understood lines:
/// `name` (exactly that name), `*.name` and `||name^` (the name and all
/// below it), and hosts-style `0.0.0.0 name [name...]` (exact names).
pub fn load_domain_list(path: &Path, set: &mut DomainSet) -> Result<LoadStats, ListError> {
    let bytes = read(path)?;
    let mut stats = LoadStats::default();
    for line in lines(&bytes) {
        let Ok(line) = line else {
            stats.skipped += 1;
            continue;
        };
        let mut added = false;
        if let Some(rest) = line.strip_prefix("||") {
            // Adblock: `||name^` or `||name^$options`; anything with a path
            // or wildcard in the middle is not a DNS rule.
            if let Some(name) = rest
                .split('^')
                .next()
                .filter(|_| rest.contains('^'))
                .and_then(normalize)
            {
                set.insert(&name, true);
                added = true;
            }
        } else if let Some(rest) = line.strip_prefix("*.") {
            if let Some(name) = normalize(rest) {
                set.insert(&name, true);
                added = true;
            }
        } else {
            let mut fields = line.split_whitespace();
            let first = fields.next().unwrap_or("");
            if first.parse::<IpAddr>().is_ok() {
                for field in fields {
                    if let Some(name) = normalize(field).filter(|n| !is_placeholder(n)) {
                        set.insert(&name, false);
                        stats.names += 1;
                    }
                }
                continue;
            } else if let (Some(name), None) = (normalize(first), fields.next()) {
                set.insert(&name, false);
                added = true;
            }
        }
        if added {
            stats.names += 1;
        } else {
            stats.skipped += 1;
        }
    }
    Ok(stats)
}

/// Addresses a hosts file gives one name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HostAddrs {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// Name → addresses, from `/etc/hosts`-format files.
#[derive(Debug, Default)]
pub struct HostsTable {
    map: HashMap<String, HostAddrs>,
}

impl HostsTable {
    pub fn get(&self, name: &str) -> Option<&HostAddrs> {
        self.map.get(name)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Adds `IP name [alias...]` lines of the file at `path`.
    pub fn load(&mut self, path: &Path) -> Result<LoadStats, ListError> {
        let bytes = read(path)?;
        let mut stats = LoadStats::default();
        for line in lines(&bytes) {
            let Ok(line) = line else {
                stats.skipped += 1;
                continue;
            };
            let mut fields = line.split_whitespace();
            let Some(Ok(ip)) = fields.next().map(str::parse::<IpAddr>) else {
                stats.skipped += 1;
                continue;
            };
            for name in fields.filter_map(normalize) {
                let entry = self.map.entry(name).or_default();
                match ip {
                    IpAddr::V4(v4) if !entry.v4.contains(&v4) => entry.v4.push(v4),
                    IpAddr::V6(v6) if !entry.v6.contains(&v6) => entry.v6.push(v6),
                    _ => {}
                }
                stats.names += 1;
            }
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `text` in a directory of the test's own; the directory goes
    /// away when the returned guard is dropped.
    fn file(name: &str, text: impl AsRef<[u8]>) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::Builder::new().prefix("tproxyd-lists-").tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn domain_list_formats() {
        let mut text = b"# comment\n! adblock comment\n\nplain.example\n*.wild.example\n||adblock.example^\n\
             ||opts.example^$important\n0.0.0.0 hosts.example other.example # trailing\n\
             127.0.0.1 localhost\n0.0.0.0 0.0.0.0\n/path/rule\n||no-caret.example\nexample.com/x\n\
             two words\n"
            .to_vec();
        text.extend_from_slice(b"\xff\xfe\n");
        let (_dir, p) = file("mixed.txt", &text);
        let mut set = DomainSet::new();
        let stats = load_domain_list(&p, &mut set).unwrap();
        assert_eq!(stats, LoadStats { names: 6, skipped: 5 });
        assert!(set.matches("plain.example"));
        assert!(!set.matches("sub.plain.example"));
        assert!(set.matches("wild.example") && set.matches("a.wild.example"));
        assert!(set.matches("x.adblock.example") && set.matches("opts.example"));
        assert!(set.matches("hosts.example") && set.matches("other.example"));
        assert!(!set.matches("localhost"));
    }

    #[test]
    fn hosts_file() {
        let (_dir, p) = file(
            "hosts",
            "127.0.0.1 localhost\n192.0.2.50 printer.lan printer\n2001:db8::50 printer.lan\n\
             192.0.2.50 printer.lan\nnot-an-ip name\n",
        );
        let mut t = HostsTable::default();
        let stats = t.load(&p).unwrap();
        assert_eq!(stats.skipped, 1);
        let printer = t.get("printer.lan").unwrap();
        assert_eq!(printer.v4, vec![Ipv4Addr::new(192, 0, 2, 50)]);
        assert_eq!(printer.v6, vec!["2001:db8::50".parse::<Ipv6Addr>().unwrap()]);
        assert!(t.get("printer").is_some());
    }

    /// A file larger than the bound is refused without being read: a
    /// sparse file, so the test writes nothing to disk.
    #[test]
    fn a_file_past_the_bound_is_refused() {
        let (_dir, p) = file("huge.txt", "plain.example\n");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(256 * 1024 * 1024 + 1)
            .unwrap();
        let e = load_domain_list(&p, &mut DomainSet::new()).expect_err("a list of 256 MiB + 1 byte was read");
        assert!(e.to_string().contains("larger than 256 MiB"), "{e}");
        assert!(HostsTable::default().load(&p).is_err());
    }

    /// A path naming a FIFO (or a device) is refused at once; reading it
    /// would wait for a writer, holding the reload, or read without end.
    #[test]
    fn a_path_that_is_not_a_regular_file_is_refused_at_once() {
        let dir = tempfile::Builder::new().prefix("tproxyd-lists-").tempdir().unwrap();
        let fifo = dir.path().join("list.fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        let reader = std::thread::spawn(move || {
            let _ = tx.send(load_domain_list(&path, &mut DomainSet::new()).map_err(|e| e.to_string()));
        });
        let outcome = rx.recv_timeout(std::time::Duration::from_secs(5));
        if outcome.is_err() {
            // Let the blocked reader go: a writer opens and closes the FIFO.
            drop(std::fs::OpenOptions::new().write(true).open(&fifo));
        }
        let _ = reader.join();
        let e = outcome
            .expect("reading a FIFO with no writer was still waiting after 5 s")
            .expect_err("a FIFO was read as a list");
        assert!(e.contains("not a regular file"), "{e}");
        let e = load_domain_list(Path::new("/dev/zero"), &mut DomainSet::new()).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn missing_file_is_an_error_naming_it() {
        let e = load_domain_list(Path::new("/nonexistent/list"), &mut DomainSet::new()).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/list: "));
    }
}
