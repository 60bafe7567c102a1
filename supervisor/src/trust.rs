//! The checks that decide whether a file may influence what Baton runs, and SHA-256.
//!
//! A file is trusted when it and every directory above it can be changed only by root or
//! by Baton's own user (the way OpenSSH's `StrictModes` judges `authorized_keys`): owned by
//! one of them and not writable by group or others. The one exception is a directory
//! *above* the one checked that is writable by everyone but sticky (`/tmp`, mode 1777):
//! there nobody can rename or remove what another user owns.
//!
//! A leaf module: it knows nothing of plugins, caches or configs, so the artifact cache,
//! the plugin scanner and the commands all use it without depending on each other.

use sha2::{Digest, Sha256};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// `bytes` in lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The SHA-256 of `bytes`, in lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// The SHA-256 (hex) of the file at `path`, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = std::fs::File::open(path)?;
    sha256_stream(&mut file, &mut |_| Ok(())).map(|(hash, _)| hash)
}

/// Reads `reader` to its end in chunks, handing each to `each`; returns the SHA-256 (hex)
/// and the length. Never holds more than one chunk.
pub fn sha256_stream(
    reader: &mut dyn std::io::Read,
    each: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = match reader.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&chunk[..n]);
        each(&chunk[..n])?;
        len += n as u64;
    }
    Ok((hex(&hasher.finalize()), len))
}

/// This process's effective uid: "Baton's user".
pub fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// Why a file or directory is not trusted. `what` names it in the message ("config",
/// "plugin", "artifact cache", …) and `key` is the config key that sets it; each message
/// says what was found and how to fix it.
#[derive(Debug, Error)]
pub enum TrustError {
    #[error(
        "{what} {}: owned by uid {uid}; it must belong to root or to the service's user (uid {me})",
        path.display()
    )]
    Owner {
        what: &'static str,
        path: PathBuf,
        uid: u32,
        me: u32,
    },
    #[error(
        "{what} {}: mode {mode:04o} is group- or world-writable; run chmod go-w on it",
        path.display()
    )]
    Writable {
        what: &'static str,
        path: PathBuf,
        mode: u32,
    },
    #[error(
        "{what} {}: the directory above it, {}, {problem}, so another user could replace what \
         is below it; run chown root {} and chmod go-w {} (or move {} to a directory only root \
         or uid {me} can write)",
        path.display(), dir.display(), dir.display(), dir.display(), path.display()
    )]
    UnsafeParent {
        what: &'static str,
        path: PathBuf,
        dir: PathBuf,
        problem: ParentProblem,
        me: u32,
    },
    #[error("{what} {} is a symlink; point {key} at the real directory", path.display())]
    Symlink {
        what: &'static str,
        path: PathBuf,
        key: &'static str,
    },
    #[error(
        "{what} {} is a symlink owned by uid {uid}; point {key} at the real directory",
        path.display()
    )]
    ForeignSymlink {
        what: &'static str,
        path: PathBuf,
        key: &'static str,
        uid: u32,
    },
    #[error("{what} {} is not a directory ({key})", path.display())]
    NotDirectory {
        what: &'static str,
        path: PathBuf,
        key: &'static str,
    },
    /// `path` itself cannot be looked at.
    #[error("{what} {}: {error}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    /// A trusted directory (set by `key`) cannot be looked at.
    #[error("{what} {}: {error} ({key})", path.display())]
    DirIo {
        what: &'static str,
        path: PathBuf,
        key: &'static str,
        error: std::io::Error,
    },
    /// A directory above `path` cannot be looked at.
    #[error("{what} {}: directory {}: {error}", path.display(), dir.display())]
    ParentIo {
        what: &'static str,
        path: PathBuf,
        dir: PathBuf,
        error: std::io::Error,
    },
}

/// Why a directory above a trusted path is not safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ParentProblem {
    #[error("is owned by uid {uid} (mode {mode:04o}), neither root nor the service's user")]
    Stranger { uid: u32, mode: u32 },
    #[error("has mode {mode:04o} (owner uid {uid}): writable by group or others and not sticky")]
    Open { uid: u32, mode: u32 },
}

/// Fails unless `meta` (of `path`, a `what`) belongs to root or Baton's user and is not
/// writable by group or others.
pub fn check_owner_and_mode(
    path: &Path,
    meta: &std::fs::Metadata,
    what: &'static str,
) -> Result<(), TrustError> {
    let me = me();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(TrustError::Owner {
            what,
            path: path.to_owned(),
            uid: meta.uid(),
            me,
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(TrustError::Writable {
            what,
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// Fails unless every directory above `path` up to `/` belongs to root or Baton's user
/// and is not writable by group or others, or is sticky (`/tmp`). `what` names `path` in
/// the message, which says which directory failed, what was found and the fix.
pub fn check_parents(path: &Path, what: &'static str) -> Result<(), TrustError> {
    let absolute = std::path::absolute(path).map_err(|error| TrustError::Io {
        what,
        path: path.to_owned(),
        error,
    })?;
    let Some(parent) = absolute.parent() else {
        return Ok(());
    };
    let parent_io = |dir: &Path, error| TrustError::ParentIo {
        what,
        path: path.to_owned(),
        dir: dir.to_owned(),
        error,
    };
    // Resolved, so a symlinked parent (/var/run → /run) is judged by what it points at.
    let parent = std::fs::canonicalize(parent).map_err(|e| parent_io(parent, e))?;
    for dir in parent.ancestors() {
        let meta = std::fs::metadata(dir).map_err(|e| parent_io(dir, e))?;
        if let Some(problem) = parent_problem(meta.uid(), meta.permissions().mode(), me()) {
            return Err(TrustError::UnsafeParent {
                what,
                path: path.to_owned(),
                dir: dir.to_owned(),
                problem,
                me: me(),
            });
        }
    }
    Ok(())
}

/// Why a directory above a trusted path is not safe, if it is not.
fn parent_problem(uid: u32, mode: u32, me: u32) -> Option<ParentProblem> {
    let mode = mode & 0o7777;
    if uid != 0 && uid != me {
        return Some(ParentProblem::Stranger { uid, mode });
    }
    let sticky = mode & 0o1000 != 0;
    if mode & 0o022 != 0 && !sticky {
        return Some(ParentProblem::Open { uid, mode });
    }
    None
}

/// Whether a trusted directory may be given as a symlink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Refused: the config must name the real directory.
    Refuse,
    /// Followed, when the link itself is root's or Baton's user's and sits in a trusted
    /// directory; then the directory it leads to is checked (systemd's `CacheDirectory=`
    /// with `DynamicUser=` is such a link, into `/var/cache/private`).
    Follow,
}

/// Checks a directory whose content Baton trusts (a `what`, set by the config key `key`):
/// a directory owned by root or Baton's user, not writable by group or others, and every
/// directory above it as [`check_parents`] says.
pub fn check_dir(
    dir: &Path,
    what: &'static str,
    key: &'static str,
    link: Link,
) -> Result<(), TrustError> {
    let dir_io = |error| TrustError::DirIo {
        what,
        path: dir.to_owned(),
        key,
        error,
    };
    let meta = std::fs::symlink_metadata(dir).map_err(dir_io)?;
    if meta.file_type().is_symlink() {
        if link == Link::Refuse {
            return Err(TrustError::Symlink {
                what,
                path: dir.to_owned(),
                key,
            });
        }
        if meta.uid() != 0 && meta.uid() != me() {
            return Err(TrustError::ForeignSymlink {
                what,
                path: dir.to_owned(),
                key,
                uid: meta.uid(),
            });
        }
        check_parents(dir, what)?;
        let real = std::fs::canonicalize(dir).map_err(dir_io)?;
        return check_dir(&real, what, key, Link::Refuse);
    }
    if !meta.is_dir() {
        return Err(TrustError::NotDirectory {
            what,
            path: dir.to_owned(),
            key,
        });
    }
    check_owner_and_mode(dir, &meta, what)?;
    check_parents(dir, what)
}

/// Checks the config file: it decides which binary runs and as whom, so it gets the rules
/// of any trusted file, and so does every directory above it.
pub fn check_config(path: &Path) -> Result<(), TrustError> {
    let meta = std::fs::metadata(path).map_err(|error| TrustError::Io {
        what: "config",
        path: path.to_owned(),
        error,
    })?;
    check_owner_and_mode(&absolute(path), &meta, "config")?;
    check_parents(path, "config")
}

/// Creates `dir` (and what is missing above it) with mode 0755, if it is not there.
pub fn create_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
}

/// `path` made absolute against the current directory, with the directory it is in
/// resolved (no `..`, no symlinked parents) where that directory exists; the last
/// component is kept as it is, so a check of it still sees a symlink there.
pub fn absolute(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map(|p| p.join(name))
            .unwrap_or(absolute),
        _ => absolute,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0, 1, 0xab, 0xff]), "0001abff");
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[test]
    fn streamed_hash_equals_whole_hash() {
        let data = vec![7u8; 200_000];
        let mut seen = 0;
        let (hash, len) = sha256_stream(&mut data.as_slice(), &mut |c| {
            seen += c.len();
            Ok(())
        })
        .unwrap();
        assert_eq!((hash, len, seen), (sha256_hex(&data), 200_000, 200_000));
    }

    #[test]
    fn absolute_resolves_the_directory_but_not_the_name() {
        let here = std::env::current_dir().unwrap();
        let tmp = std::fs::canonicalize(std::env::temp_dir()).unwrap();
        let link = tmp.join(format!("baton-abs-{}", std::process::id()));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&tmp, &link).unwrap();
        let missing = format!("missing-{}", std::process::id());
        assert_eq!(
            absolute(&link.join(&missing).join("../y.so")),
            link.join(&missing).join("../y.so"),
            "{missing} is missing"
        );
        assert_eq!(absolute(&link.join("y.so")), tmp.join("y.so"));
        assert_eq!(absolute(&link), link, "the name itself stays a link");
        assert_eq!(absolute(Path::new("a.toml")), here.join("a.toml"));
        std::fs::remove_file(&link).unwrap();
    }

    #[test]
    fn parents_writable_by_others_fail_unless_sticky() {
        let me = 1000;
        assert_eq!(parent_problem(0, 0o40755, me), None);
        assert_eq!(parent_problem(me, 0o40700, me), None);
        assert_eq!(parent_problem(0, 0o41777, me), None, "/tmp");
        let open = parent_problem(0, 0o40777, me).unwrap();
        assert_eq!(
            open,
            ParentProblem::Open {
                uid: 0,
                mode: 0o777
            }
        );
        assert_eq!(
            open.to_string(),
            "has mode 0777 (owner uid 0): writable by group or others and not sticky"
        );
        assert!(parent_problem(0, 0o40775, me).is_some(), "group-writable");
        let stranger = parent_problem(65534, 0o40755, me).unwrap();
        assert_eq!(
            stranger.to_string(),
            "is owned by uid 65534 (mode 0755), neither root nor the service's user"
        );
        // Sticky does not excuse a stranger's directory: its owner can still swap entries.
        assert_eq!(
            parent_problem(65534, 0o41777, me),
            Some(ParentProblem::Stranger {
                uid: 65534,
                mode: 0o1777
            })
        );
    }

    #[test]
    fn a_tempdir_under_tmp_is_trusted_and_an_open_one_is_not() {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir().join(format!("baton-trust-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let inner = base.join("cache");
        create_dir(&inner).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
        check_dir(&inner, "artifact cache", "plugins.cache_dir", Link::Follow).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = check_dir(&inner, "artifact cache", "plugins.cache_dir", Link::Follow)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!("the directory above it, {}", base.display()))
                && err.contains("0777")
                && err.contains("chmod go-w"),
            "{err}"
        );
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o757)).unwrap();
        let err = check_dir(&inner, "artifact cache", "plugins.cache_dir", Link::Follow)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("0757") && err.contains("world-writable"),
            "{err}"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
