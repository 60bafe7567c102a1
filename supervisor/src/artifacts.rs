//! The content-addressed artifact cache: the worker binary and the plugin libraries each
//! generation runs, stored once under their SHA-256 and never modified.
//!
//! Workers exec the cached copy of `worker.path` and `dlopen` the cached copies of the
//! plugins, so a generation can be started again from exactly the bytes it ran (the
//! crash-loop rollback does that), whatever has been written over the originals since.
//!
//! Files: `<sha256>.so` (plugins), `worker-<sha256>` (worker binaries), `*.tmp.<pid>`
//! (being written). The supervisor that holds the lock file `.lock` prunes what no live
//! generation, and no generation's rollback target, refers to; a second supervisor
//! sharing the directory finds the lock taken and prunes nothing.

use crate::config::Config;
use std::collections::HashSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// A worker binary as a generation runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerBinary {
    /// `worker.path` as configured.
    pub source: PathBuf,
    /// The cached copy that is exec'd.
    pub cached: PathBuf,
    pub hash: String,
}

/// Identifies a file's content without reading it: any write changes `ctime`, which no
/// one can set back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug, Default)]
pub struct ArtifactCache {
    /// The directory locked, and the lock (`None` if another process holds it).
    locked: Option<(PathBuf, Option<nix::fcntl::Flock<std::fs::File>>)>,
    /// The last worker binary hashed, so an unchanged 40 MB file is not read per upgrade.
    last_binary: Option<(FileStamp, WorkerBinary)>,
}

impl ArtifactCache {
    /// Copies `worker.path` into the cache (if that content is not there yet).
    pub fn worker_binary(&mut self, config: &Config) -> Result<WorkerBinary, String> {
        let source = &config.worker.path;
        let dir = &config.plugins.cache_dir;
        let cannot = |e: &dyn std::fmt::Display| {
            format!(
                "cannot execute worker {}: {e} (worker.path)",
                source.display()
            )
        };
        let meta = std::fs::metadata(source).map_err(|e| cannot(&e))?;
        if !meta.is_file() {
            return Err(cannot(&"not a regular file"));
        }
        if meta.permissions().mode() & 0o111 == 0 {
            return Err(cannot(&"not executable (no x bit)"));
        }
        crate::plugins::check_owner_and_mode(source, &meta, "worker binary")?;
        self.lock(dir);
        let stamp = FileStamp::of(&meta);
        if let Some((seen, binary)) = &self.last_binary
            && *seen == stamp
            && binary.source == *source
            && binary.cached.starts_with(dir)
            && std::fs::metadata(&binary.cached).is_ok_and(|m| m.len() == stamp.size)
        {
            return Ok(binary.clone());
        }
        let bytes = std::fs::read(source).map_err(|e| cannot(&e))?;
        let hash = crate::plugins::sha256_hex(&bytes);
        let cached = dir.join(format!("worker-{hash}"));
        create_dir(dir)?;
        if !std::fs::metadata(&cached).is_ok_and(|m| m.len() == bytes.len() as u64) {
            crate::plugins::write_once(&cached, &bytes, 0o555).map_err(|e| {
                format!(
                    "artifact cache {}: cannot write {}: {e}",
                    dir.display(),
                    cached.display()
                )
            })?;
        }
        let binary = WorkerBinary {
            source: source.clone(),
            cached,
            hash,
        };
        self.last_binary = Some((stamp, binary.clone()));
        Ok(binary)
    }

    /// Takes the cache directory's lock if it is not held yet (quietly: the directory may
    /// not exist or be writable, and writing an artifact reports that).
    fn lock(&mut self, dir: &Path) {
        if self.locked.as_ref().is_some_and(|(d, _)| d == dir) {
            return;
        }
        if create_dir(dir).is_err() {
            return;
        }
        // Created, then held open read-only: a file open for writing would keep the
        // cache's filesystem from being remounted read-only.
        let path = dir.join(".lock");
        if !path.exists() {
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path);
        }
        let lock = std::fs::File::open(&path).ok().and_then(|f| {
            nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).ok()
        });
        if lock.is_none() {
            tracing::warn!(
                "artifact cache {} is in use by another process; old artifacts are not pruned",
                dir.display()
            );
        }
        self.locked = Some((dir.to_owned(), lock));
    }

    /// Removes the artifacts in the locked directory that `keep` does not name, and what
    /// dead writers left behind. Returns the names removed.
    pub fn prune(&mut self, dir: &Path, keep: &HashSet<PathBuf>) -> Vec<String> {
        self.lock(dir);
        if !matches!(&self.locked, Some((d, Some(_))) if d == dir) {
            return Vec::new();
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let stale = match artifact_kind(&name) {
                Some(Kind::Artifact) => !keep.contains(&entry.path()),
                Some(Kind::Partial(pid)) => {
                    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
                }
                None => false,
            };
            if stale && std::fs::remove_file(entry.path()).is_ok() {
                removed.push(name);
            }
        }
        removed.sort();
        removed
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Artifact,
    /// A file being written by the process with this pid.
    Partial(u32),
}

/// What a file in the cache is, by its name; `None` for anything the cache did not write.
fn artifact_kind(name: &str) -> Option<Kind> {
    let is_hash = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    let base = |s: &str| {
        s.strip_suffix(".so")
            .or_else(|| s.strip_prefix("worker-"))
            .is_some_and(is_hash)
    };
    if let Some((stem, pid)) = name.split_once(".tmp.") {
        let stem_ok = is_hash(stem) || stem.strip_prefix("worker-").is_some_and(is_hash);
        return match pid.parse() {
            Ok(pid) if stem_ok => Some(Kind::Partial(pid)),
            _ => None,
        };
    }
    base(name).then_some(Kind::Artifact)
}

fn create_dir(dir: &Path) -> Result<(), String> {
    std::fs::create_dir_all(dir)
        .map_err(|e| format!("artifact cache {}: cannot create: {e}", dir.display()))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_files_the_cache_writes_are_artifacts() {
        let h = "ab".repeat(32);
        assert_eq!(artifact_kind(&format!("{h}.so")), Some(Kind::Artifact));
        assert_eq!(artifact_kind(&format!("worker-{h}")), Some(Kind::Artifact));
        assert_eq!(
            artifact_kind(&format!("{h}.tmp.42")),
            Some(Kind::Partial(42))
        );
        assert_eq!(
            artifact_kind(&format!("worker-{h}.tmp.7")),
            Some(Kind::Partial(7))
        );
        for other in [
            ".lock",
            "notes.txt",
            "abc.so",
            &format!("{h}.so.bak"),
            &format!("{h}.tmp.x"),
            &format!("worker-{h}x"),
        ] {
            assert_eq!(artifact_kind(other), None, "{other}");
        }
    }

    #[test]
    fn prune_keeps_what_is_named_and_what_it_did_not_write() {
        let dir = std::env::temp_dir().join(format!("baton-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = ("aa".repeat(32), "bb".repeat(32));
        for name in [
            format!("{a}.so"),
            format!("{b}.so"),
            format!("worker-{a}"),
            format!("{a}.tmp.4000000"),
            "README".into(),
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let keep: HashSet<PathBuf> = [dir.join(format!("{a}.so"))].into();
        let mut cache = ArtifactCache::default();
        let removed = cache.prune(&dir, &keep);
        assert_eq!(
            removed,
            vec![
                format!("{a}.tmp.4000000"),
                format!("{b}.so"),
                format!("worker-{a}")
            ]
        );
        assert!(dir.join(format!("{a}.so")).exists());
        assert!(dir.join("README").exists());
        // A second holder of the same directory prunes nothing.
        std::fs::write(dir.join(format!("{b}.so")), b"x").unwrap();
        let mut other = ArtifactCache::default();
        assert!(other.prune(&dir, &keep).is_empty());
        assert!(dir.join(format!("{b}.so")).exists());
        drop(cache);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
