//! Files at paths that someone else may have tampered with.
//!
//! The daemon writes files (the pid file, the DNS cache file) into
//! directories that its unprivileged user, or an operator's cron job, may
//! also write, and reads files (block lists, hosts files, the cache file)
//! that a third party fetched. Both directions had grown the same careful
//! code twice; it lives here once:
//!
//! - [`create_anew`]: whatever is at the path is unlinked (which never
//!   follows a link) and the file created with `O_EXCL | O_NOFOLLOW`, so a
//!   planted symlink or hard link is never written through, nor its
//!   target handed to anyone.
//! - [`read_bounded`]: a regular file of at most a bound, opened without
//!   blocking (a FIFO would hold the caller until a writer came; a device
//!   such as `/dev/zero` reads without end), read again when it changed
//!   during the read (a list rewritten in place gives a torn copy), and
//!   refused when it keeps changing.

use std::fs::{File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::Duration;

/// How often a file that changed while it was read is read again before
/// the read is refused. A job that rewrites a list in place finishes
/// within a few tries; one that never stops would keep every reload torn.
pub const READ_TRIES: u32 = 3;

/// Pause before reading again, so a writer that is halfway through can
/// finish.
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// Why [`read_bounded`] gave no bytes.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    /// A FIFO, device, directory, or (where links are refused) a symlink.
    #[error("not a regular file")]
    NotRegular,
    #[error("larger than {} MiB, the most a {what} is read", .limit >> 20)]
    TooLarge {
        /// The size seen; at least `limit + 1` when it grew while read.
        size: u64,
        limit: u64,
        what: &'static str,
    },
    #[error(
        "changed while it was read, {tries} times in a row (is it rewritten in place? write a new file and rename it over the old one)"
    )]
    Changing { tries: u32 },
}

/// What [`read_bounded`] accepts.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    /// Largest file read, in bytes.
    pub max_bytes: u64,
    /// Whether the path may be a symlink. The cache file is read as root
    /// from a directory the daemon's user may write, so a link there could
    /// point at anything; a list is named by the operator, who may link it.
    pub follow_links: bool,
    /// What the file is, for the message when it is too large ("list").
    pub what: &'static str,
}

/// Creates the file at `path` anew with `mode`, for writing, whatever was
/// there before (a file, a symlink, a hard link to someone else's file).
///
/// The name is unlinked first, then created with `O_EXCL | O_NOFOLLOW`:
/// a name that reappears in between is an error, never followed. Anything
/// further (such as handing it to another user) must go through the
/// returned descriptor, not the path.
pub fn create_anew(path: &Path, mode: u32) -> io::Result<File> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// Reads the regular file at `path` whole, within `limits`.
///
/// A file that changes during the read (its size, times or inode, seen
/// through the descriptor, or the path now naming another file) is read
/// again, up to [`READ_TRIES`] times, then refused with
/// [`ReadError::Changing`]: a torn list would load part of the old rules
/// and part of the new without a word.
pub fn read_bounded(path: &Path, limits: ReadLimits) -> Result<Vec<u8>, ReadError> {
    read_checked(path, limits, &mut || {})
}

/// [`read_bounded`], with `mid_read` called between reading the bytes and
/// checking that the file held still (where tests change it).
fn read_checked(path: &Path, limits: ReadLimits, mid_read: &mut dyn FnMut()) -> Result<Vec<u8>, ReadError> {
    for attempt in 1..=READ_TRIES {
        if attempt > 1 {
            std::thread::sleep(RETRY_PAUSE);
        }
        if let Some(bytes) = read_once(path, limits, mid_read)? {
            return Ok(bytes);
        }
    }
    Err(ReadError::Changing { tries: READ_TRIES })
}

/// One read; `None` when the file changed while it was read.
fn read_once(path: &Path, limits: ReadLimits, mid_read: &mut dyn FnMut()) -> Result<Option<Vec<u8>>, ReadError> {
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if !limits.follow_links {
        flags |= libc::O_NOFOLLOW;
    }
    let file = match std::fs::OpenOptions::new().read(true).custom_flags(flags).open(path) {
        Ok(f) => f,
        // O_NOFOLLOW on a symlink.
        Err(e) if !limits.follow_links && e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(ReadError::NotRegular);
        }
        Err(e) => return Err(e.into()),
    };
    let before = file.metadata()?;
    if !before.is_file() {
        return Err(ReadError::NotRegular);
    }
    let too_large = |size| ReadError::TooLarge {
        size,
        limit: limits.max_bytes,
        what: limits.what,
    };
    if before.len() > limits.max_bytes {
        return Err(too_large(before.len()));
    }
    // The file may grow while it is read: never past the bound either.
    let mut bytes = Vec::with_capacity(usize::try_from(before.len()).unwrap_or(0));
    (&file).take(limits.max_bytes + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limits.max_bytes {
        return Err(too_large(bytes.len() as u64));
    }
    mid_read();
    let after = file.metadata()?;
    let named = if limits.follow_links {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    };
    let still = same_version(&before, &after)
        && bytes.len() as u64 == after.len()
        && named.is_ok_and(|n| n.dev() == after.dev() && n.ino() == after.ino());
    Ok(still.then_some(bytes))
}

/// Whether two looks at one descriptor saw the same contents: any write
/// or truncation moves the modification time, and any change at all
/// (including one that sets the modification time back) the change time.
fn same_version(a: &Metadata, b: &Metadata) -> bool {
    a.dev() == b.dev()
        && a.ino() == b.ino()
        && a.len() == b.len()
        && (a.mtime(), a.mtime_nsec()) == (b.mtime(), b.mtime_nsec())
        && (a.ctime(), a.ctime_nsec()) == (b.ctime(), b.ctime_nsec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;

    const LIST: ReadLimits = ReadLimits {
        max_bytes: 1024,
        follow_links: true,
        what: "list",
    };
    const NO_LINKS: ReadLimits = ReadLimits {
        follow_links: false,
        ..LIST
    };

    fn dir() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("tproxyd-safe-file-").tempdir().unwrap()
    }

    #[test]
    fn a_regular_file_within_the_bound_is_read_whole() {
        let d = dir();
        let p = d.path().join("list");
        std::fs::write(&p, "a.example\nb.example\n").unwrap();
        assert_eq!(read_bounded(&p, NO_LINKS).unwrap(), b"a.example\nb.example\n");
        let exact = d.path().join("exact");
        std::fs::write(&exact, vec![b'x'; 1024]).unwrap();
        assert_eq!(read_bounded(&exact, LIST).unwrap().len(), 1024);
    }

    #[test]
    fn a_file_over_the_bound_is_refused() {
        let d = dir();
        let p = d.path().join("big");
        std::fs::write(&p, vec![b'x'; 1025]).unwrap();
        let e = read_bounded(&p, LIST).unwrap_err();
        assert!(
            matches!(
                e,
                ReadError::TooLarge {
                    size: 1025,
                    limit: 1024,
                    ..
                }
            ),
            "{e}"
        );
    }

    /// Opening a FIFO for reading waits for a writer unless done without
    /// blocking; the test would hang (and is ended after 5 s) if it were.
    #[test]
    fn a_fifo_is_refused_without_blocking() {
        let d = dir();
        let fifo = d.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let path = fifo.clone();
        let reader = std::thread::spawn(move || {
            let _ = tx.send(read_bounded(&path, LIST).map_err(|e| e.to_string()));
        });
        let outcome = rx.recv_timeout(Duration::from_secs(5));
        if outcome.is_err() {
            // Let the blocked reader go: a writer opens and closes the FIFO.
            drop(std::fs::OpenOptions::new().write(true).open(&fifo));
        }
        let _ = reader.join();
        let e = outcome
            .expect("opening a FIFO with no writer was still waiting after 5 s")
            .expect_err("a FIFO was read");
        assert_eq!(e, "not a regular file");
        assert!(matches!(read_bounded(d.path(), LIST), Err(ReadError::NotRegular)));
        assert!(matches!(
            read_bounded(Path::new("/dev/zero"), LIST),
            Err(ReadError::NotRegular)
        ));
    }

    #[test]
    fn a_symlink_is_refused_where_asked_and_followed_elsewhere() {
        let d = dir();
        let target = d.path().join("target");
        std::fs::write(&target, "x\n").unwrap();
        let link = d.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(matches!(read_bounded(&link, NO_LINKS), Err(ReadError::NotRegular)));
        assert_eq!(read_bounded(&link, LIST).unwrap(), b"x\n");
    }

    #[test]
    fn a_missing_file_is_an_io_error_saying_so() {
        let e = read_bounded(Path::new("/nonexistent/list"), LIST).unwrap_err();
        assert!(
            matches!(&e, ReadError::Io(io) if io.kind() == io::ErrorKind::NotFound),
            "{e}"
        );
    }

    /// Rewrites `p` in place (same inode, same size) the way a careless
    /// list updater does: truncate, then write.
    fn rewrite_in_place(p: &Path, text: &[u8]) {
        let mut f = std::fs::OpenOptions::new().write(true).truncate(true).open(p).unwrap();
        f.write_all(text).unwrap();
    }

    #[test]
    fn a_file_rewritten_during_the_read_is_read_again() {
        let d = dir();
        let p = d.path().join("list");
        std::fs::write(&p, "old.example\n").unwrap();
        let mut writes = 0;
        let bytes = read_checked(&p, LIST, &mut || {
            if writes == 0 {
                // Past a timestamp tick, so that even a coarse clock moves.
                std::thread::sleep(Duration::from_millis(20));
                rewrite_in_place(&p, b"new.example\n");
            }
            writes += 1;
        })
        .unwrap();
        assert_eq!(bytes, b"new.example\n", "the copy read before the rewrite was kept");
        assert_eq!(writes, 2);
    }

    #[test]
    fn a_file_that_keeps_changing_is_refused() {
        let d = dir();
        let p = d.path().join("list");
        std::fs::write(&p, "v0.example\n").unwrap();
        let mut n = 0;
        let e = read_checked(&p, LIST, &mut || {
            n += 1;
            std::thread::sleep(Duration::from_millis(20));
            rewrite_in_place(&p, format!("v{n}.example\n").as_bytes());
        })
        .unwrap_err();
        assert!(matches!(e, ReadError::Changing { tries: READ_TRIES }), "{e}");
        assert_eq!(n, READ_TRIES);
        // Replaced by a rename during the read: the path names another file.
        let mut renamed = false;
        let bytes = read_checked(&p, LIST, &mut || {
            if !renamed {
                let tmp = d.path().join("list.new");
                std::fs::write(&tmp, "renamed.example\n").unwrap();
                std::fs::rename(&tmp, &p).unwrap();
                renamed = true;
            }
        })
        .unwrap();
        assert_eq!(bytes, b"renamed.example\n");
    }

    #[test]
    fn a_created_file_is_private_and_never_written_through_a_link() {
        let d = dir();
        let victim = d.path().join("victim");
        std::fs::write(&victim, "keep\n").unwrap();
        std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
        let sym = d.path().join("sym");
        std::os::unix::fs::symlink(&victim, &sym).unwrap();
        let hard = d.path().join("hard");
        std::fs::hard_link(&victim, &hard).unwrap();
        for p in [&sym, &hard, &d.path().join("fresh")] {
            let mut f = create_anew(p, 0o600).unwrap();
            f.write_all(b"new\n").unwrap();
            drop(f);
            let meta = std::fs::symlink_metadata(p).unwrap();
            assert!(meta.file_type().is_file(), "{}", p.display());
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{}", p.display());
            assert_eq!(meta.nlink(), 1, "{} shares its inode", p.display());
            assert_eq!(std::fs::read(p).unwrap(), b"new\n");
        }
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep\n", "written through a link");
        assert_eq!(std::fs::metadata(&victim).unwrap().permissions().mode() & 0o777, 0o644);
    }
}
