//! The plugin set of a generation, as the supervisor prepares it: every `*.so` in the
//! plugin directory is checked (regular file, not a symlink, owned by root or the service
//! user, not group- or world-writable; the same rules for the directory), hashed, and
//! copied to a content-addressed cache that workers load from.
//!
//! The supervisor never `dlopen`s a plugin: it only reads bytes. Cached copies are written
//! once (temporary file, then rename) and never modified, so an operator who `cp`s over a
//! plugin in the directory cannot touch a library a worker has mapped.

use crate::artifacts::{Artifact, ArtifactCache, PLUGIN_MODE};
use crate::config::Config;
use crate::trust;
use baton_proto::PluginSpec;
use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

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
pub fn scan(config: &Config) -> Result<Vec<Scanned>, String> {
    let dir = &config.plugins.dir;
    match std::fs::symlink_metadata(dir) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !config.plugins.dir_explicit => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(format!("plugin directory {}: {e}", dir.display())),
    }
    trust::check_dir(dir, "plugin directory", "plugins.dir", trust::Link::Refuse)?;
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("plugin directory {}: {e}", dir.display()))?
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

fn read_plugin(path: &Path) -> Result<Scanned, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                format!(
                    "plugin {}: is a symlink; plugins must be regular files (copy the library in)",
                    path.display()
                )
            } else {
                format!("plugin {}: cannot open: {e}", path.display())
            }
        })?;
    // Checked on the opened file, so the file read is the file checked.
    let meta = file
        .metadata()
        .map_err(|e| format!("plugin {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("plugin {}: is not a regular file", path.display()));
    }
    trust::check_owner_and_mode(path, &meta, "plugin")?;
    if baton_sys::lease::writers(file.as_fd()) == baton_sys::lease::Writers::Some {
        return Err(format!(
            "plugin {}: another process still has it open for writing; wait until it is \
             written whole (copy to a dotfile or *.tmp name, then rename it into place)",
            path.display()
        ));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&file)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("plugin {}: cannot read: {e}", path.display()))?;
    check_elf(&bytes).map_err(|e| format!("plugin {}: {e}", path.display()))?;
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
fn check_elf(bytes: &[u8]) -> Result<(), String> {
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
        return Err("not an ELF shared library (no ELF header)".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let e_type = u16_at(16).unwrap_or(0);
    if e_type != 3 {
        return Err(format!(
            "ELF type {e_type} is not a shared object (build with crate-type cdylib, or cc -shared)"
        ));
    }
    let machine = u16_at(18).unwrap_or(0);
    if HOST_MACHINE != 0 && machine != HOST_MACHINE {
        return Err(format!(
            "built for ELF machine {machine}, this host is {HOST_MACHINE}"
        ));
    }
    let len = bytes.len() as u64;
    let truncated = |what: &str, end: u64| {
        format!("truncated: {what} ends at byte {end}, but the file has {len} bytes")
    };
    let (phoff, phentsize, phnum) = (
        u64_at(32).unwrap_or(0),
        u64::from(u16_at(54).unwrap_or(0)),
        u64::from(u16_at(56).unwrap_or(0)),
    );
    let ph_end = phoff.saturating_add(phentsize.saturating_mul(phnum));
    if ph_end > len {
        return Err(truncated("the program header table", ph_end));
    }
    for i in 0..phnum {
        let at = (phoff + i * phentsize) as usize;
        let (offset, filesz) = (u64_at(at + 8).unwrap_or(0), u64_at(at + 32).unwrap_or(0));
        let end = offset.saturating_add(filesz);
        if end > len {
            return Err(truncated(&format!("segment {i}"), end));
        }
    }
    let (shoff, shentsize, shnum) = (
        u64_at(40).unwrap_or(0),
        u64::from(u16_at(58).unwrap_or(0)),
        u64::from(u16_at(60).unwrap_or(0)),
    );
    let sh_end = shoff.saturating_add(shentsize.saturating_mul(shnum));
    if shoff != 0 && sh_end > len {
        return Err(truncated("the section header table", sh_end));
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
) -> Result<Vec<CachedPlugin>, String> {
    let dir = &config.plugins.cache_dir;
    scanned
        .into_iter()
        .map(|s| {
            let name = format!("{}.so", s.hash);
            let artifact = artifacts
                .store(dir, &name, &s.hash, &s.bytes, PLUGIN_MODE)
                .map_err(|e| format!("plugin {}: {e}", s.file.display()))?;
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
) -> Result<Vec<CachedPlugin>, String> {
    cache(config, scan(config)?, artifacts)
}

#[cfg(test)]
mod tests {
    use super::check_elf;

    fn this_binary() -> Vec<u8> {
        // The test binary is an ELF executable (ET_DYN when built as a PIE).
        std::fs::read(std::env::current_exe().unwrap()).unwrap()
    }

    #[test]
    fn refuses_what_is_not_elf() {
        assert!(check_elf(b"hello").unwrap_err().contains("not an ELF"));
        assert!(check_elf(&[b'x'; 100]).unwrap_err().contains("not an ELF"));
    }

    #[test]
    fn refuses_a_truncated_file() {
        let bytes = this_binary();
        if bytes[16] != 3 {
            return; // not a PIE here; the shared-object check would fire first
        }
        check_elf(&bytes).unwrap();
        let err = check_elf(&bytes[..4096]).unwrap_err();
        assert!(err.starts_with("truncated:"), "{err}");
    }
}
