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

//! What is hashed is what runs: an artifact is used only through an open, read-only fd
//! whose owner, mode and SHA-256 were checked on that very open file ([`Artifact`]).
//! Workers get that fd (the binary is exec'd through `/proc/self/fd/N`, plugins are
//! `dlopen`ed the same way), never a path looked up again, so renaming or replacing a
//! cache file after the check changes nothing. A file this process did not write is never
//! trusted by its name or size: it is hashed again, and one that fails (another owner, a
//! writable mode, other content, a symlink) is written anew over it. The cache directory
//! and every directory above it must pass [`crate::trust::check_dir`].

use crate::config::Config;
use crate::trust::{self, TrustError};
use nix::fcntl::{Flock, FlockArg};
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Why the artifact cache cannot give an artifact, or a held one may no longer be used.
#[derive(Debug, Error)]
pub enum CacheError {
    /// The cache directory, or one above it, is not trusted.
    #[error(transparent)]
    Refused(#[from] TrustError),
    #[error("artifact cache {}: cannot create: {error}", dir.display())]
    CannotCreate { dir: PathBuf, error: io::Error },
    #[error("artifact cache {}: cannot write {}: {error}", dir.display(), path.display())]
    CannotWrite {
        dir: PathBuf,
        path: PathBuf,
        error: io::Error,
    },
    #[error(
        "artifact cache {}: cannot write {}: it keeps disappearing (another process prunes it)",
        dir.display(),
        path.display()
    )]
    KeepsDisappearing { dir: PathBuf, path: PathBuf },
    /// A held artifact could not be looked at again.
    #[error("{}: {error}", path.display())]
    Unreadable { path: PathBuf, error: io::Error },
    /// A held artifact was written in place since it was checked (see
    /// [`Artifact::verify_unchanged`]).
    #[error(
        "{} was written over after it was checked: it hashes to {found} now",
        path.display()
    )]
    WrittenOver { path: PathBuf, found: String },
}

/// Why `worker.path` cannot become a generation's worker binary (or the baton binary on
/// disk the supervisor's own image: `what` and `key` say which).
#[derive(Debug, Error)]
pub enum WorkerBinaryError {
    #[error("cannot execute {what} {}: {error} ({key})", path.display())]
    Unreadable {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
        error: io::Error,
    },
    #[error("cannot execute {what} {}: not a regular file ({key})", path.display())]
    NotFile {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
    },
    #[error(
        "cannot execute {what} {}: not executable (no x bit) ({key})",
        path.display()
    )]
    NotExecutable {
        what: &'static str,
        key: &'static str,
        path: PathBuf,
    },
    /// It, or a directory above it, is not trusted.
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    /// Its copy could not be cached.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// Its content changed while it was copied into the cache; this reaches the caller as
    /// the [`CacheError::CannotWrite`] of that copy.
    #[error("{} changed while it was being copied", path.display())]
    ChangedWhileCopied { path: PathBuf },
}

/// Why a file found under an artifact's name in the cache is not used as it (it is
/// written anew).
#[derive(Debug, Error)]
enum Untrusted {
    #[error("it is a symlink")]
    Symlink,
    #[error("cannot open it: {0}")]
    Open(io::Error),
    #[error("it is not a regular file")]
    NotFile,
    #[error("owned by uid {uid}, not by the service's user (uid {me})")]
    Owner { uid: u32, me: u32 },
    #[error("mode {found:04o}, where the cache writes {mode:04o}")]
    Mode { found: u32, mode: u32 },
    #[error("{0}")]
    Stat(io::Error),
    #[error("{0}")]
    Lock(nix::errno::Errno),
    #[error("cannot read it: {0}")]
    Read(io::Error),
    #[error("its content hashes to {found}, not to its name")]
    Hash { found: String },
}

/// A cache file, open read-only and checked on the open file: owned by Baton's user, not
/// writable by anyone else, of the mode the cache gives it, and hashing to its name. A
/// shared `flock` is held on it for as long as this value lives, so no pruner removes it.
#[derive(Debug)]
pub struct Artifact {
    path: PathBuf,
    hash: String,
    file: Flock<File>,
    /// The file as it was when checked; any write since changes its `ctime`.
    stamp: FileStamp,
}

impl Artifact {
    /// Where it is in the cache (absolute), for messages and pruning.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its SHA-256, hex.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The open file that was checked: what a worker gets.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Fails if the open file was written since it was checked (only root or Baton's user
    /// can: `cp` over a cache file as root writes in place) and no longer hashes to its
    /// name. Cheap when it was not: one `fstat`.
    pub fn verify_unchanged(&self) -> Result<(), CacheError> {
        let unreadable = |error| CacheError::Unreadable {
            path: self.path.clone(),
            error,
        };
        let meta = self.file.metadata().map_err(unreadable)?;
        if FileStamp::of(&meta) == self.stamp {
            return Ok(());
        }
        let mut reader = std::io::BufReader::new(ReadAt {
            file: &self.file,
            at: 0,
        });
        let (found, _) = trust::sha256_stream(&mut reader, &mut |_| Ok(())).map_err(unreadable)?;
        if found == self.hash {
            return Ok(());
        }
        Err(CacheError::WrittenOver {
            path: self.path.clone(),
            found,
        })
    }

    /// Takes over an artifact a previous supervisor image held (fd `file`, inherited
    /// across `exec`, still locked): checked again on the open file (owner and read-only
    /// mode) and by `ctime` from now on; its content was hashed by the image that held it.
    pub fn inherited(path: PathBuf, hash: String, file: OwnedFd) -> Result<Self, CacheError> {
        let unreadable = |error| CacheError::Unreadable {
            path: path.clone(),
            error,
        };
        let file = File::from(file);
        let meta = file.metadata().map_err(unreadable)?;
        if meta.uid() != trust::me() || meta.permissions().mode() & 0o222 != 0 {
            return Err(CacheError::Unreadable {
                path: path.clone(),
                error: io::Error::other(format!(
                    "owned by uid {} with mode {:04o}: not a cache file of this user",
                    meta.uid(),
                    meta.permissions().mode() & 0o7777
                )),
            });
        }
        // The image before held the shared lock on this very open file description;
        // taking it again keeps it.
        let file = Flock::lock(file, FlockArg::LockSharedNonblock)
            .map_err(|(_, e)| unreadable(io::Error::from(e)))?;
        Ok(Self {
            path,
            hash,
            stamp: FileStamp::of(&meta),
            file,
        })
    }

    /// Whether its name in the cache still leads to it (nobody pruned or replaced it).
    fn still_in_place(&self) -> bool {
        let Ok(mine) = self.file.metadata() else {
            return false;
        };
        std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| mine.nlink() > 0 && m.dev() == mine.dev() && m.ino() == mine.ino())
    }
}

/// Reads a file from an offset of its own, leaving the fd's offset alone.
struct ReadAt<'a> {
    file: &'a File,
    at: u64,
}

impl std::io::Read for ReadAt<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = std::os::unix::fs::FileExt::read_at(self.file, buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

/// A worker binary as a generation runs it.
#[derive(Debug, Clone)]
pub struct WorkerBinary {
    /// `worker.path` as configured (absolute).
    pub source: PathBuf,
    /// The cached copy that is exec'd, through its fd.
    pub artifact: Arc<Artifact>,
}

impl WorkerBinary {
    pub fn hash(&self) -> &str {
        self.artifact.hash()
    }

    pub fn cached(&self) -> &Path {
        self.artifact.path()
    }
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
    /// The artifacts this process checked (or wrote) and holds.
    held: HashMap<PathBuf, Arc<Artifact>>,
    /// The last worker binary hashed, so an unchanged 40 MB file is not read per upgrade.
    last_binary: Option<(FileStamp, WorkerBinary)>,
}

/// Checks that `path` can serve as the worker binary: an executable regular file, owned
/// by root or this user, not writable by group or others, nor is any directory above it.
pub fn check_worker_binary(path: &Path) -> Result<std::fs::Metadata, WorkerBinaryError> {
    check_binary(path, "worker binary", "worker.path")
}

/// "worker binary" → "worker" (as the messages have always said).
fn short(what: &'static str) -> &'static str {
    match what {
        "worker binary" => "worker",
        other => other,
    }
}

/// [`check_worker_binary`] for any binary: `what` names it in trust errors, `key` says
/// where its path comes from.
fn check_binary(
    path: &Path,
    what: &'static str,
    key: &'static str,
) -> Result<std::fs::Metadata, WorkerBinaryError> {
    let meta = std::fs::metadata(path).map_err(|error| WorkerBinaryError::Unreadable {
        what: short(what),
        key,
        path: path.to_owned(),
        error,
    })?;
    if !meta.is_file() {
        return Err(WorkerBinaryError::NotFile {
            what: short(what),
            key,
            path: path.to_owned(),
        });
    }
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(WorkerBinaryError::NotExecutable {
            what: short(what),
            key,
            path: path.to_owned(),
        });
    }
    trust::check_owner_and_mode(path, &meta, what)?;
    trust::check_parents(path, what)?;
    Ok(meta)
}

/// Mode of cached plugins.
pub const PLUGIN_MODE: u32 = 0o444;
/// Mode of cached worker binaries.
pub const BINARY_MODE: u32 = 0o555;

impl ArtifactCache {
    /// Copies `worker.path` into the cache (if that content is not there yet) and holds it.
    pub fn worker_binary(&mut self, config: &Config) -> Result<WorkerBinary, WorkerBinaryError> {
        let source = &config.worker.path;
        let dir = &config.plugins.cache_dir;
        let meta = check_worker_binary(source)?;
        let stamp = FileStamp::of(&meta);
        if let Some((seen, binary)) = &self.last_binary
            && *seen == stamp
            && binary.source == trust::absolute(source)
            && binary.artifact.path.starts_with(trust::absolute(dir))
            && self.is_held(&binary.artifact.path)
            && binary.artifact.verify_unchanged().is_ok()
        {
            return Ok(binary.clone());
        }
        // Streamed, never read whole: a 40 MB buffer would stay in the supervisor's heap.
        let artifact = self.copy_binary(source, dir, "worker-", ("worker", "worker.path"))?;
        let binary = WorkerBinary {
            source: trust::absolute(source),
            artifact,
        };
        self.last_binary = Some((stamp, binary.clone()));
        Ok(binary)
    }

    /// The artifact `name` in `dir` with content `bytes` (whose SHA-256 is `hash`): an
    /// existing copy is checked and hashed again, a missing or failing one is written.
    pub fn store(
        &mut self,
        dir: &Path,
        name: &str,
        hash: &str,
        bytes: &[u8],
        mode: u32,
    ) -> Result<Arc<Artifact>, CacheError> {
        use std::io::Write;
        self.acquire(dir, name, hash, mode, &mut |f| f.write_all(bytes))
    }

    /// [`ArtifactCache::store`] for content that `fill` writes.
    fn acquire(
        &mut self,
        dir: &Path,
        name: &str,
        hash: &str,
        mode: u32,
        fill: &mut dyn FnMut(&mut File) -> std::io::Result<()>,
    ) -> Result<Arc<Artifact>, CacheError> {
        let dir = trust::absolute(dir);
        let path = dir.join(name);
        trust::create_dir(&dir).map_err(|error| CacheError::CannotCreate {
            dir: dir.clone(),
            error,
        })?;
        trust::check_dir(
            &dir,
            "artifact cache",
            "plugins.cache_dir",
            trust::Link::Follow,
        )?;
        for _ in 0..3 {
            if let Some(held) = self.held.get(&path)
                && held.still_in_place()
            {
                match held.verify_unchanged() {
                    Ok(()) => return Ok(held.clone()),
                    Err(why) => tracing::warn!("artifact cache: {why}; writing it again"),
                }
            }
            match adopt(&path, hash, mode) {
                Ok(Some(artifact)) => {
                    let artifact = Arc::new(artifact);
                    self.held.insert(path.clone(), artifact.clone());
                    return Ok(artifact);
                }
                Ok(None) => {}
                Err(why) => tracing::warn!(
                    "artifact cache: {} is not trusted ({why}); writing it again",
                    path.display()
                ),
            }
            let artifact =
                write_once(&path, hash, mode, fill).map_err(|error| CacheError::CannotWrite {
                    dir: dir.clone(),
                    path: path.clone(),
                    error,
                })?;
            // Checked like any other: a rename over it between write and lock shows here.
            if artifact.still_in_place() {
                let artifact = Arc::new(artifact);
                self.held.insert(path.clone(), artifact.clone());
                return Ok(artifact);
            }
        }
        Err(CacheError::KeepsDisappearing { dir, path })
    }

    /// Holds `artifact` (inherited from a previous supervisor image) as if checked here.
    pub fn hold(&mut self, artifact: Arc<Artifact>) {
        self.held.insert(artifact.path.clone(), artifact);
    }

    /// Copies the supervisor binary at `source` into the cache (`baton-<sha256>`), with
    /// the worker binary's checks (an executable regular file owned by root or this user,
    /// not writable by others, nor any directory above it), and holds it.
    pub fn supervisor_binary(
        &mut self,
        source: &Path,
        dir: &Path,
    ) -> Result<Arc<Artifact>, WorkerBinaryError> {
        check_binary(source, "supervisor binary", "the baton binary")?;
        self.copy_binary(
            source,
            dir,
            "baton-",
            ("supervisor binary", "the baton binary"),
        )
    }

    /// Copies the binary this process runs (`/proc/self/exe`, whatever its path shows
    /// now) into the cache, so that a failed self-upgrade can return to exactly it.
    pub fn running_binary(&mut self, dir: &Path) -> Result<Arc<Artifact>, WorkerBinaryError> {
        self.copy_binary(
            Path::new("/proc/self/exe"),
            dir,
            "baton-",
            ("supervisor binary", "the baton binary"),
        )
    }

    /// Hashes `source` and copies it into `dir` as `<prefix><sha256>` (unless that
    /// content is there already), checking that the copy hashes the same; `(what, key)`
    /// name it in errors.
    fn copy_binary(
        &mut self,
        source: &Path,
        dir: &Path,
        prefix: &str,
        (what, key): (&'static str, &'static str),
    ) -> Result<Arc<Artifact>, WorkerBinaryError> {
        let unreadable = |error| WorkerBinaryError::Unreadable {
            what,
            key,
            path: source.to_owned(),
            error,
        };
        let hash = trust::sha256_file(source).map_err(unreadable)?;
        let artifact = self.acquire(
            dir,
            &format!("{prefix}{hash}"),
            &hash,
            BINARY_MODE,
            &mut |file| {
                use std::io::Write;
                let (copied, _) = File::open(source).and_then(|mut f| {
                    trust::sha256_stream(&mut f, &mut |chunk| file.write_all(chunk))
                })?;
                if copied != hash {
                    return Err(std::io::Error::other(
                        WorkerBinaryError::ChangedWhileCopied {
                            path: source.to_owned(),
                        },
                    ));
                }
                Ok(())
            },
        )?;
        Ok(artifact)
    }

    /// Whether this process holds `path`, and it is still in place.
    fn is_held(&self, path: &Path) -> bool {
        self.held.get(path).is_some_and(|a| a.still_in_place())
    }

    /// Lets go of the artifacts not in `keep`, then removes every artifact in `dir` that no
    /// process holds and `keep` does not name, and what dead writers left behind.
    /// Returns the names removed.
    pub fn prune(&mut self, dir: &Path, keep: &HashSet<PathBuf>) -> Vec<String> {
        let dir = trust::absolute(dir);
        self.held.retain(|path, _| keep.contains(path));
        if let Some((_, binary)) = &self.last_binary
            && !keep.contains(binary.artifact.path())
        {
            self.last_binary = None;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
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

/// Opens the cache file `path` and checks it on the open file: a regular file (not a
/// symlink), owned by this user, of mode `mode` exactly, hashing to `hash`. `Ok(None)`
/// when it is not there (or was pruned just now); `Err` says why an existing file is not
/// trusted.
fn adopt(path: &Path, hash: &str, mode: u32) -> Result<Option<Artifact>, Untrusted> {
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(Untrusted::Symlink),
        Err(e) => return Err(Untrusted::Open(e)),
    };
    let meta = file.metadata().map_err(Untrusted::Stat)?;
    if !meta.is_file() {
        return Err(Untrusted::NotFile);
    }
    if meta.uid() != trust::me() {
        return Err(Untrusted::Owner {
            uid: meta.uid(),
            me: trust::me(),
        });
    }
    let found = meta.permissions().mode() & 0o7777;
    if found != mode {
        return Err(Untrusted::Mode { found, mode });
    }
    // Waits if a pruner holds it exclusively: it does for a moment, while it removes it.
    let lock = Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| Untrusted::Lock(e))?;
    // Locked, but pruned just before? Then it is gone from the directory.
    let meta = lock.metadata().map_err(Untrusted::Stat)?;
    if meta.nlink() == 0 {
        return Ok(None);
    }
    let stamp = FileStamp::of(&meta);
    let (found, _) = trust::sha256_stream(&mut &*lock, &mut |_| Ok(())).map_err(Untrusted::Read)?;
    if found != hash {
        return Err(Untrusted::Hash { found });
    }
    Ok(Some(Artifact {
        path: path.to_owned(),
        hash: hash.to_owned(),
        file: lock,
        stamp,
    }))
}

/// Writes what `fill` writes to a new temporary name (`<name>.tmp.<pid>`, created
/// exclusively, so nothing planted there is followed), gives it `mode`, renames it into
/// place and returns it, open read-only and locked. Its content is what `fill` wrote,
/// which the caller hashed; nobody else can write a file of ours with that mode.
fn write_once(
    path: &Path,
    hash: &str,
    mode: u32,
    fill: &mut dyn FnMut(&mut File) -> std::io::Result<()>,
) -> std::io::Result<Artifact> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut writer = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)?;
        fill(&mut writer)?;
        writer.set_permissions(std::fs::Permissions::from_mode(mode))?;
        writer.sync_all()?;
        // The same file, read-only: a binary open for writing cannot be exec'd.
        let reader = File::open(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&writer)
        ))?;
        drop(writer);
        let lock =
            Flock::lock(reader, FlockArg::LockShared).map_err(|(_, e)| std::io::Error::from(e))?;
        std::fs::rename(&tmp, path)?;
        let stamp = FileStamp::of(&lock.metadata()?);
        Ok(Artifact {
            path: path.to_owned(),
            hash: hash.to_owned(),
            file: lock,
            stamp,
        })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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
            .or_else(|| s.strip_prefix("baton-"))
            .is_some_and(is_hash)
    };
    if let Some((stem, pid)) = name.split_once(".tmp.") {
        let stem_ok = is_hash(stem)
            || stem.strip_prefix("worker-").is_some_and(is_hash)
            || stem.strip_prefix("baton-").is_some_and(is_hash);
        return match pid.parse() {
            Ok(pid) if stem_ok => Some(Kind::Partial(pid)),
            _ => None,
        };
    }
    named(name).then_some(Kind::Artifact)
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

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("baton-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        trust::create_dir(&dir).unwrap();
        dir
    }

    fn store(cache: &mut ArtifactCache, dir: &Path, bytes: &[u8]) -> Arc<Artifact> {
        let hash = trust::sha256_hex(bytes);
        cache
            .store(dir, &format!("{hash}.so"), &hash, bytes, PLUGIN_MODE)
            .unwrap()
    }

    fn read_fd(artifact: &Artifact) -> Vec<u8> {
        let fd = artifact.fd().as_raw_fd();
        std::fs::read(format!("/proc/self/fd/{fd}")).unwrap()
    }

    use std::os::fd::AsRawFd;

    #[test]
    fn prune_spares_what_is_kept_held_elsewhere_or_not_an_artifact() {
        let dir = temp_dir("prune");
        let mut other = ArtifactCache::default();
        let mut mine = ArtifactCache::default();
        let a = store(&mut mine, &dir, b"a").path().to_owned();
        let b = store(&mut mine, &dir, b"b").path().to_owned();
        let c = store(&mut other, &dir, b"c").path().to_owned();
        let name = |p: &Path| p.file_name().unwrap().to_str().unwrap().to_owned();
        let a_hash = name(&a).trim_end_matches(".so").to_owned();
        for n in [
            format!("worker-{a_hash}"),
            format!("{a_hash}.tmp.4000000"),
            "README".into(),
        ] {
            std::fs::write(dir.join(n), b"x").unwrap();
        }
        let keep: HashSet<PathBuf> = [a.clone()].into();
        let removed = mine.prune(&dir, &keep);
        // b was let go of, the worker file never held, the partial file's writer is dead;
        // c is held by the other cache, README is not an artifact.
        let mut expected = vec![
            format!("{a_hash}.tmp.4000000"),
            name(&b),
            format!("worker-{a_hash}"),
        ];
        expected.sort();
        assert_eq!(removed, expected);
        assert!(c.exists());
        assert!(dir.join("README").exists());
        // Once the other lets go, it can be pruned; a kept one is written again if it
        // was removed under us.
        drop(other);
        assert_eq!(mine.prune(&dir, &keep), vec![name(&c)]);
        std::fs::remove_file(&a).unwrap();
        store(&mut mine, &dir, b"a");
        assert_eq!(std::fs::read(&a).unwrap(), b"a");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_file_not_written_here_is_hashed_again_and_rewritten_when_it_differs() {
        let dir = temp_dir("distrust");
        let good = b"the real plugin";
        let hash = trust::sha256_hex(good);
        let path = dir.join(format!("{hash}.so"));
        // Planted: the same size, other bytes, the right mode.
        std::fs::write(&path, b"a planted one!!").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(PLUGIN_MODE)).unwrap();
        let artifact = store(&mut ArtifactCache::default(), &dir, good);
        assert_eq!(read_fd(&artifact), good);
        assert_eq!(std::fs::read(&path).unwrap(), good);
        // A right file of the wrong mode (anyone could have written it).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(
            adopt(&path, &hash, PLUGIN_MODE).unwrap_err().to_string(),
            "mode 0666, where the cache writes 0444"
        );
        let artifact = store(&mut ArtifactCache::default(), &dir, good);
        assert_eq!(read_fd(&artifact), good);
        // A symlink under the name is replaced, never followed; its target is untouched.
        let target = dir.join("elsewhere");
        std::fs::write(&target, b"not ours").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let artifact = store(&mut ArtifactCache::default(), &dir, good);
        assert_eq!(read_fd(&artifact), good);
        assert!(
            !std::fs::symlink_metadata(&path)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"not ours");
        // Another user's file, as root can make one.
        if trust::me() == 0 {
            nix::unistd::chown(&path, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
            assert!(matches!(
                adopt(&path, &hash, PLUGIN_MODE).unwrap_err(),
                Untrusted::Owner { uid: 65534, .. }
            ));
            let artifact = store(&mut ArtifactCache::default(), &dir, good);
            assert_eq!(std::fs::metadata(artifact.path()).unwrap().uid(), 0);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_is_held_is_what_was_checked_whatever_happens_to_the_path() {
        let dir = temp_dir("swap");
        let mut cache = ArtifactCache::default();
        let artifact = store(&mut cache, &dir, b"checked");
        // Replaced under the same name, by rename, and then the directory swapped too.
        std::fs::remove_file(artifact.path()).unwrap();
        std::fs::write(artifact.path(), b"planted").unwrap();
        assert_eq!(read_fd(&artifact), b"checked");
        std::fs::rename(&dir, dir.with_extension("old")).unwrap();
        assert_eq!(read_fd(&artifact), b"checked");
        std::fs::remove_dir_all(dir.with_extension("old")).unwrap();
    }

    #[test]
    fn a_file_written_over_in_place_is_noticed_and_replaced() {
        let dir = temp_dir("in-place");
        let mut cache = ArtifactCache::default();
        let artifact = store(&mut cache, &dir, b"checked");
        artifact.verify_unchanged().unwrap();
        // As root's `cp` does: the same inode, opened for writing despite mode 0444.
        std::fs::set_permissions(artifact.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::write(artifact.path(), b"planted").unwrap();
        std::fs::set_permissions(artifact.path(), std::fs::Permissions::from_mode(0o444)).unwrap();
        let err = artifact.verify_unchanged().unwrap_err();
        assert!(
            matches!(&err, CacheError::WrittenOver { path, .. } if path == artifact.path())
                && err
                    .to_string()
                    .contains("written over after it was checked"),
            "{err}"
        );
        let again = store(&mut cache, &dir, b"checked");
        assert_eq!(read_fd(&again), b"checked");
        assert_eq!(std::fs::read(again.path()).unwrap(), b"checked");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cache_in_a_directory_others_can_write_is_refused() {
        let base = temp_dir("open-cache");
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o777)).unwrap();
        let hash = trust::sha256_hex(b"x");
        let err = ArtifactCache::default()
            .store(&base.join(".baton-cache"), "x.so", &hash, b"x", PLUGIN_MODE)
            .unwrap_err();
        assert!(
            matches!(
                err,
                CacheError::Refused(TrustError::UnsafeParent { ref dir, .. })
                    if *dir == std::fs::canonicalize(&base).unwrap()
            ) && err.to_string().starts_with("artifact cache ")
                && err.to_string().contains("0777"),
            "{err}"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
