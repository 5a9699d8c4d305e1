//! Dropping root: run as a configured user, keeping only the two
//! capabilities a transparent proxy needs.
//!
//! `CAP_NET_ADMIN` covers `IP_TRANSPARENT`, `SO_MARK` and nftables;
//! `CAP_NET_RAW` covers the raw-IP reply fallback. They are also raised as
//! *ambient* capabilities, so the `nft` that removes `auto_rules` at exit
//! still may. This must run before any other thread exists: capabilities
//! are per thread.

use caps::{CapSet, Capability, CapsHashSet};
use nix::unistd::{Group, User, setgid, setgroups, setuid};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("no such user {0:?}")]
    NoUser(String),
    #[error("looking up user {user:?}: {source}")]
    Lookup {
        user: String,
        #[source]
        source: nix::Error,
    },
    #[error("switching to user {user:?}: {reason}")]
    Switch { user: String, reason: String },
}

/// The capabilities tproxyd keeps.
pub fn kept() -> CapsHashSet {
    [Capability::CAP_NET_ADMIN, Capability::CAP_NET_RAW]
        .into_iter()
        .collect()
}

/// Becomes `user` (and its primary group), keeping [`kept`] capabilities.
pub fn drop_to(user: &str) -> Result<(), PrivilegeError> {
    let fail = |reason: String| PrivilegeError::Switch {
        user: user.to_string(),
        reason,
    };
    let entry = User::from_name(user)
        .map_err(|source| PrivilegeError::Lookup {
            user: user.to_string(),
            source,
        })?
        .ok_or_else(|| PrivilegeError::NoUser(user.to_string()))?;
    // Keep the permitted set across setuid; the effective set is cleared
    // by the kernel and raised again below.
    // SAFETY: prctl(PR_SET_KEEPCAPS) takes plain integers.
    if unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) } != 0 {
        return Err(fail(format!("PR_SET_KEEPCAPS: {}", std::io::Error::last_os_error())));
    }
    setgroups(&[]).map_err(|e| fail(format!("setgroups: {e}")))?;
    setgid(entry.gid).map_err(|e| fail(format!("setgid: {e}")))?;
    setuid(entry.uid).map_err(|e| fail(format!("setuid: {e}")))?;
    let keep = kept();
    for set in [CapSet::Permitted, CapSet::Effective, CapSet::Inheritable] {
        caps::set(None, set, &keep).map_err(|e| fail(format!("setting {set:?} capabilities: {e}")))?;
    }
    for cap in &keep {
        caps::raise(None, CapSet::Ambient, *cap).map_err(|e| fail(format!("ambient {cap}: {e}")))?;
    }
    let group = Group::from_gid(entry.gid)
        .ok()
        .flatten()
        .map_or_else(|| entry.gid.to_string(), |g| g.name);
    tracing::info!(user, group, "dropped privileges (keeping CAP_NET_ADMIN, CAP_NET_RAW)");
    Ok(())
}
