//! The plugin set of a generation, as the supervisor prepares it: every `*.so` in the
//! plugin directory is checked (regular file, not a symlink, owned by root or the service
//! user, not group- or world-writable; the same rules for the directory), hashed, and
//! copied to a content-addressed cache that workers load from.
//!
//! The supervisor never `dlopen`s a plugin: it only reads bytes. Cached copies are written
//! once (temporary file, then rename) and never modified, so an operator who `cp`s over a
//! plugin in the directory cannot touch a library a worker has mapped.

use crate::artifacts::{Artifact, ArtifactCache, CacheError, PLUGIN_MODE};
use crate::config::Config;
use crate::trust::{self, TrustError};
use baton_proto::PluginSpec;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use thiserror::Error;

/// Why the plugin set cannot be prepared: the first plugin (or the directory) that fails.
#[derive(Debug, Error)]
pub enum PluginError {
    #[error("plugin directory {}: {error}", dir.display())]
    Directory { dir: PathBuf, error: io::Error },
    /// The directory or a plugin file is not trusted (owner, mode, a directory above).
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    #[error(
        "plugin {}: is a symlink; plugins must be regular files (copy the library in)",
        path.display()
    )]
    Symlink { path: PathBuf },
    #[error("plugin {}: cannot open: {error}", path.display())]
    Open { path: PathBuf, error: io::Error },
    #[error("plugin {}: {error}", path.display())]
    Stat { path: PathBuf, error: io::Error },
    #[error("plugin {}: is not a regular file", path.display())]
    NotFile { path: PathBuf },
    #[error(
        "plugin {}: another process still has it open for writing; wait until it is written \
         whole (copy to a dotfile or *.tmp name, then rename it into place)",
        path.display()
    )]
    OpenForWriting { path: PathBuf },
    #[error("plugin {}: cannot read: {error}", path.display())]
    Read { path: PathBuf, error: io::Error },
    #[error("plugin {}: {problem}", path.display())]
    Elf { path: PathBuf, problem: ElfProblem },
    /// Its checked copy could not be cached.
    #[error("plugin {}: {error}", file.display())]
    Cache { file: PathBuf, error: CacheError },
}

/// What is wrong with a plugin file's ELF structure ([`check_elf`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ElfProblem {
    #[error("not an ELF shared library (no ELF header)")]
    NoHeader,
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64Le,
    #[error(
        "ELF type {e_type} is not a shared object (build with crate-type cdylib, or cc -shared)"
    )]
    NotShared { e_type: u16 },
    #[error("built for ELF machine {machine}, this host is {host}")]
    Machine { machine: u16, host: u16 },
    #[error("truncated: {part} ends at byte {end}, but the file has {len} bytes")]
    Truncated { part: ElfPart, end: u64, len: u64 },
}

/// A part of an ELF file that must lie within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum ElfPart {
    #[error("the program header table")]
    ProgramHeaders,
    #[error("segment {0}")]
    Segment(u64),
    #[error("the section header table")]
    SectionHeaders,
}

/// A plugin file and the hash of its content.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Scanned {
    pub file: PathBuf,
    pub hash: String,
    bytes: Vec<u8>,
}

/// Whether a directory entry is a plugin candidate (`*.so`, not a dotfile).
pub fn is_plugin_name(name: &str) -> bool {
    name.ends_with(".so") && !name.starts_with('.')
}

/// Reads and checks every plugin in `config.plugins.dir`, in name order.
pub fn scan(config: &Config) -> Result<Vec<Scanned>, PluginError> {
    let dir = &config.plugins.dir;
    let unreadable = |error| PluginError::Directory {
        dir: dir.clone(),
        error,
    };
    match std::fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !config.plugins.dir_explicit => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(unreadable(e)),
    }
    trust::check_dir(dir, "plugin directory", "plugins.dir", trust::Link::Refuse)?;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(unreadable)?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| is_plugin_name(n))
        .collect();
    names.sort();
    names
        .iter()
        .map(|name| read_plugin(&dir.join(name)))
        .collect()
}

fn read_plugin(path: &Path) -> Result<Scanned, PluginError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|error| {
            if error.raw_os_error() == Some(libc::ELOOP) {
                PluginError::Symlink {
                    path: path.to_owned(),
                }
            } else {
                PluginError::Open {
                    path: path.to_owned(),
                    error,
                }
            }
        })?;
    // Checked on the opened file, so the file read is the file checked.
    let meta = file.metadata().map_err(|error| PluginError::Stat {
        path: path.to_owned(),
        error,
    })?;
    if !meta.is_file() {
        return Err(PluginError::NotFile {
            path: path.to_owned(),
        });
    }
    trust::check_owner_and_mode(path, &meta, "plugin")?;
    if baton_sys::lease::writers(file.as_fd()) == baton_sys::lease::Writers::Some {
        return Err(PluginError::OpenForWriting {
            path: path.to_owned(),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&file)
        .read_to_end(&mut bytes)
        .map_err(|error| PluginError::Read {
            path: path.to_owned(),
            error,
        })?;
    check_elf(&bytes).map_err(|problem| PluginError::Elf {
        path: path.to_owned(),
        problem,
    })?;
    let hash = trust::sha256_hex(&bytes);
    Ok(Scanned {
        file: trust::absolute(path),
        hash,
        bytes,
    })
}

/// The ELF machine number of this host.
const HOST_MACHINE: u16 = if cfg!(target_arch = "x86_64") {
    62
} else if cfg!(target_arch = "aarch64") {
    183
} else {
    0
};

/// Reads just enough of the ELF structure to refuse what `dlopen` would choke on, or crash
/// on: a file that is not a 64-bit little-endian shared object for this machine, or one
/// cut short (a truncated segment is mapped past the end of the file, and touching it
/// kills the loading process with SIGBUS). It never interprets code.
fn check_elf(bytes: &[u8]) -> Result<(), ElfProblem> {
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
    };
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err(ElfProblem::NoHeader);
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err(ElfProblem::NotElf64Le);
    }
    let e_type = u16_at(16).unwrap_or(0);
    if e_type != 3 {
        return Err(ElfProblem::NotShared { e_type });
    }
    let machine = u16_at(18).unwrap_or(0);
    if HOST_MACHINE != 0 && machine != HOST_MACHINE {
        return Err(ElfProblem::Machine {
            machine,
            host: HOST_MACHINE,
        });
    }
    let len = bytes.len() as u64;
    let truncated = |part, end| ElfProblem::Truncated { part, end, len };
    let (phoff, phentsize, phnum) = (
        u64_at(32).unwrap_or(0),
        u64::from(u16_at(54).unwrap_or(0)),
        u64::from(u16_at(56).unwrap_or(0)),
    );
    let ph_end = phoff.saturating_add(phentsize.saturating_mul(phnum));
    if ph_end > len {
        return Err(truncated(ElfPart::ProgramHeaders, ph_end));
    }
    for i in 0..phnum {
        let at = (phoff + i * phentsize) as usize;
        let (offset, filesz) = (u64_at(at + 8).unwrap_or(0), u64_at(at + 32).unwrap_or(0));
        let end = offset.saturating_add(filesz);
        if end > len {
            return Err(truncated(ElfPart::Segment(i), end));
        }
    }
    let (shoff, shentsize, shnum) = (
        u64_at(40).unwrap_or(0),
        u64::from(u16_at(58).unwrap_or(0)),
        u64::from(u16_at(60).unwrap_or(0)),
    );
    let sh_end = shoff.saturating_add(shentsize.saturating_mul(shnum));
    if shoff != 0 && sh_end > len {
        return Err(truncated(ElfPart::SectionHeaders, sh_end));
    }
    Ok(())
}

/// A plugin of a generation: what workers are told, and the checked cache file they load.
#[derive(Debug, Clone)]
pub struct CachedPlugin {
    pub spec: PluginSpec,
    pub artifact: Arc<Artifact>,
}

/// Copies each scanned plugin to `<cache_dir>/<sha256>.so` (if not there yet), holds it
/// in `artifacts`, and returns what workers load.
pub fn cache(
    config: &Config,
    scanned: Vec<Scanned>,
    artifacts: &mut ArtifactCache,
) -> Result<Vec<CachedPlugin>, PluginError> {
    let dir = &config.plugins.cache_dir;
    scanned
        .into_iter()
        .map(|s| {
            let name = format!("{}.so", s.hash);
            let artifact = artifacts
                .store(dir, &name, &s.hash, &s.bytes, PLUGIN_MODE)
                .map_err(|error| PluginError::Cache {
                    file: s.file.clone(),
                    error,
                })?;
            Ok(CachedPlugin {
                spec: PluginSpec {
                    file: s.file.display().to_string(),
                    cached: artifact.path().display().to_string(),
                    hash: s.hash,
                    fd: None,
                },
                artifact,
            })
        })
        .collect()
}

/// Scans and caches: the plugin set a new generation starts with.
pub fn prepare(
    config: &Config,
    artifacts: &mut ArtifactCache,
) -> Result<Vec<CachedPlugin>, PluginError> {
    cache(config, scan(config)?, artifacts)
}

#[cfg(test)]
mod tests {
    use super::{ElfProblem, check_elf};

    fn this_binary() -> Vec<u8> {
        // The test binary is an ELF executable (ET_DYN when built as a PIE).
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn refuses_what_is_not_elf() {
        assert_eq!(check_elf(b"hello"), Err(ElfProblem::NoHeader));
        assert_eq!(check_elf(&[b'x'; 100]), Err(ElfProblem::NoHeader));
        let mut header = this_binary()[..64].to_vec();
        header[4] = 1;
        assert_eq!(check_elf(&header), Err(ElfProblem::NotElf64Le));
    }

    #[test]
    fn refuses_a_truncated_file() {
        let bytes = this_binary();
        if bytes[16] != 3 {
            return; // not a PIE here; the shared-object check would fire first
        }
        check_elf(&bytes).unwrap();
        let err = check_elf(&bytes[..4096]).unwrap_err();
        assert!(
            matches!(err, ElfProblem::Truncated { len: 4096, end, .. } if end > 4096),
            "{err}"
        );
        assert!(err.to_string().starts_with("truncated: "), "{err}");
    }
}
