//! The content-addressed artifact cache: the worker binary and the plugin libraries each
//! generation runs, stored once under their SHA-256 and never modified.
//!
//! Workers exec the cached copy of `worker.path` and `dlopen` the cached copies of the
//! plugins, so a generation can be started again from exactly the bytes it ran (the
//! crash-loop rollback does that), whatever has been written over the originals since.
//!
//! Files: `<sha256>.so` (plugins), `worker-<sha256>` (worker binaries), `*.tmp.<pid>`
//! (being written). A process using an artifact holds a shared `flock` on it for as long
//! as it may need it (a supervisor: while a live generation, or a rollback target, refers
//! to it; `baton check`: while it checks). Pruning removes only artifacts it can lock
//! exclusively, so several supervisors (and `baton check`) can share one directory without
//! deleting each other's files; whoever holds nothing any more leaves the file to be
//! pruned by the next one to look.

use crate::config::Config;
use nix::fcntl::{Flock, FlockArg};
use std::collections::{HashMap, HashSet};
use std::fs::File;
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
    /// The artifacts this process uses, each with a shared lock held.
    held: HashMap<PathBuf, Flock<File>>,
    /// The last worker binary hashed, so an unchanged 40 MB file is not read per upgrade.
    last_binary: Option<(FileStamp, WorkerBinary)>,
}

/// Checks that `path` can serve as the worker binary: an executable regular file, owned
/// by root or this user, not writable by group or others.
pub fn check_worker_binary(path: &Path) -> Result<std::fs::Metadata, String> {
    let cannot = |e: &dyn std::fmt::Display| {
        format!(
            "cannot execute worker {}: {e} (worker.path)",
            path.display()
        )
    };
    let meta = std::fs::metadata(path).map_err(|e| cannot(&e))?;
    if !meta.is_file() {
        return Err(cannot(&"not a regular file"));
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(cannot(&"not executable (no x bit)"));
    }
    crate::plugins::check_owner_and_mode(path, &meta, "worker binary")?;
    Ok(meta)
}

impl ArtifactCache {
    /// Copies `worker.path` into the cache (if that content is not there yet) and holds it.
    pub fn worker_binary(&mut self, config: &Config) -> Result<WorkerBinary, String> {
        let source = &config.worker.path;
        let dir = &config.plugins.cache_dir;
        let meta = check_worker_binary(source)?;
        let stamp = FileStamp::of(&meta);
        if let Some((seen, binary)) = &self.last_binary
            && *seen == stamp
            && binary.source == *source
            && binary.cached.starts_with(dir)
            && self.is_held(&binary.cached)
        {
            return Ok(binary.clone());
        }
        // Streamed, never read whole: a 40 MB buffer would stay in the supervisor's heap.
        let (hash, len) = stream_file(source, &mut |_| Ok(()))
            .map_err(|e| format!("cannot execute worker {}: {e}", source.display()))?;
        let cached = dir.join(format!("worker-{hash}"));
        self.store_with(dir, &cached, len, 0o555, &mut |file| {
            use std::io::Write;
            let (copied, _) = stream_file(source, &mut |chunk| file.write_all(chunk))?;
            if copied != hash {
                return Err(std::io::Error::other(format!(
                    "{} changed while it was being copied",
                    source.display()
                )));
            }
            Ok(())
        })?;
        let binary = WorkerBinary {
            source: source.clone(),
            cached,
            hash,
        };
        self.last_binary = Some((stamp, binary.clone()));
        Ok(binary)
    }

    /// Makes sure `path` in `dir` holds `bytes` and holds it: an existing copy is locked
    /// and kept; a missing one (or one pruned by another process just now) is written.
    pub fn store(
        &mut self,
        dir: &Path,
        path: &Path,
        bytes: &[u8],
        mode: u32,
    ) -> Result<(), String> {
        use std::io::Write;
        self.store_with(dir, path, bytes.len() as u64, mode, &mut |f| {
            f.write_all(bytes)
        })
    }

    /// [`ArtifactCache::store`] for `len` bytes that `fill` writes.
    fn store_with(
        &mut self,
        dir: &Path,
        path: &Path,
        len: u64,
        mode: u32,
        fill: &mut dyn FnMut(&mut File) -> std::io::Result<()>,
    ) -> Result<(), String> {
        let failed = |e: &dyn std::fmt::Display| {
            format!(
                "artifact cache {}: cannot write {}: {e}",
                dir.display(),
                path.display()
            )
        };
        for _ in 0..3 {
            if self.is_held(path) {
                return Ok(());
            }
            if let Some(lock) = hold(path, len) {
                self.held.insert(path.to_owned(), lock);
                return Ok(());
            }
            create_dir(dir)?;
            crate::plugins::write_once_with(path, mode, fill).map_err(|e| failed(&e))?;
        }
        Err(failed(&"it keeps disappearing (another process prunes it)"))
    }

    /// Whether this process holds `path`, and it is still in place.
    fn is_held(&self, path: &Path) -> bool {
        self.held
            .get(path)
            .is_some_and(|lock| lock.metadata().is_ok_and(|m| m.nlink() > 0))
    }

    /// Lets go of the artifacts not in `keep`, then removes every artifact in `dir` that no
    /// process holds and `keep` does not name, and what dead writers left behind.
    /// Returns the names removed.
    pub fn prune(&mut self, dir: &Path, keep: &HashSet<PathBuf>) -> Vec<String> {
        self.held.retain(|path, _| keep.contains(path));
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for entry in entries.filter_map(Result::ok) {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let path = entry.path();
            let gone = match artifact_kind(&name) {
                Some(Kind::Artifact) => !keep.contains(&path) && remove_if_unused(&path),
                Some(Kind::Partial(pid)) => {
                    pid != std::process::id()
                        && !Path::new(&format!("/proc/{pid}")).exists()
                        && std::fs::remove_file(&path).is_ok()
                }
                None => false,
            };
            if gone {
                removed.push(name);
            }
        }
        removed.sort();
        removed
    }
}

/// Hands the heap memory freed after preparing a generation (plugin files are read whole
/// to be checked and hashed) back to the kernel, so the supervisor's resident size stays
/// what it needs rather than what its largest upgrade needed.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only returns the allocator's own free
    // memory to the kernel, and is safe to call at any time from any thread.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Reads `path` in chunks, handing each to `each`; returns the SHA-256 (hex) and length.
fn stream_file(
    path: &Path,
    each: &mut dyn FnMut(&[u8]) -> std::io::Result<()>,
) -> std::io::Result<(String, u64)> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        hasher.update(&chunk[..n]);
        each(&chunk[..n])?;
        len += n as u64;
    }
    Ok((crate::plugins::hex(&hasher.finalize()), len))
}

/// Opens `path` and takes a shared lock on it, if it is there with `len` bytes.
fn hold(path: &Path, len: u64) -> Option<Flock<File>> {
    let file = File::open(path).ok()?;
    // Waits if a pruner holds it exclusively: it does for a moment, while it removes it.
    let lock = Flock::lock(file, FlockArg::LockShared).ok()?;
    // Locked, but pruned just before? Then it is gone from the directory.
    let meta = lock.metadata().ok()?;
    (meta.nlink() > 0 && meta.len() == len).then_some(lock)
}

/// Removes `path` if no process holds it. It is removed while locked exclusively: a
/// process that opened it meanwhile finds no link left once it gets its shared lock, and
/// writes it again.
fn remove_if_unused(path: &Path) -> bool {
    let Ok(file) = File::open(path) else {
        return false;
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(_lock) => std::fs::remove_file(path).is_ok(),
        Err(_) => false,
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
    let named = |s: &str| {
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
    named(name).then_some(Kind::Artifact)
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
    fn prune_spares_what_is_kept_held_elsewhere_or_not_an_artifact() {
        let dir = std::env::temp_dir().join(format!("baton-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b, c) = ("aa".repeat(32), "bb".repeat(32), "cc".repeat(32));
        let mut other = ArtifactCache::default();
        let mut mine = ArtifactCache::default();
        for name in [format!("{a}.so"), format!("{b}.so")] {
            mine.store(&dir, &dir.join(name), b"x", 0o444).unwrap();
        }
        other
            .store(&dir, &dir.join(format!("{c}.so")), b"x", 0o444)
            .unwrap();
        for name in [
            format!("worker-{a}"),
            format!("{a}.tmp.4000000"),
            "README".into(),
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        let keep: HashSet<PathBuf> = [dir.join(format!("{a}.so"))].into();
        let removed = mine.prune(&dir, &keep);
        // b was let go of, the worker file never held, the partial file's writer is dead;
        // c is held by the other cache, README is not an artifact.
        assert_eq!(
            removed,
            vec![
                format!("{a}.tmp.4000000"),
                format!("{b}.so"),
                format!("worker-{a}")
            ]
        );
        assert!(dir.join(format!("{c}.so")).exists());
        assert!(dir.join("README").exists());
        // Once the other lets go, it can be pruned; a kept one is written again if it
        // was removed under us.
        drop(other);
        assert_eq!(mine.prune(&dir, &keep), vec![format!("{c}.so")]);
        std::fs::remove_file(dir.join(format!("{a}.so"))).unwrap();
        mine.store(&dir, &dir.join(format!("{a}.so")), b"x", 0o444)
            .unwrap();
        assert!(dir.join(format!("{a}.so")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
