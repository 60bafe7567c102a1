//! The supervisor's state as one versioned document, handed from one image of the
//! supervisor to the next across `exec` (same pid): the core's state, the artifact sets
//! with their configs' text, the generations' listeners and workers, the waiting clients,
//! and the number of every fd that goes along (kept open across `exec`, close-on-exec
//! cleared).
//!
//! It travels in a sealed memfd named by `BATON_HANDOVER_FD`; the previous image's binary
//! (from the artifact cache) is named by `BATON_HANDOVER_FALLBACK_FD`, and an image that
//! cannot take over executes it with the same state and the reason in
//! `BATON_HANDOVER_REJECTED`. The document is JSON with a `format` number: a release reads
//! every format up to its own ([`crate::release::handover_format`]) and refuses a newer
//! one before anything is changed. Format 1 is the first.
//!
//! This module only defines the document and moves it in and out of the memfd; the shell
//! (`supervisor/reexec.rs`) writes and reads it.

use crate::config::PathContext;
use crate::core::SelfUpgrade;
use crate::core::snapshot::CoreSnapshot;
use crate::listeners::ListenerSetState;
use baton_proto::PluginSpec;
use serde::{Deserialize, Serialize};
use std::io::{Read, Seek, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::SystemTime;

/// The memfd holding the document.
pub const ENV_FD: &str = "BATON_HANDOVER_FD";
/// The previous image's binary, to go back to.
pub const ENV_FALLBACK_FD: &str = "BATON_HANDOVER_FALLBACK_FD";
/// Set for the previous image when the new one refused the state: why.
pub const ENV_REJECTED: &str = "BATON_HANDOVER_REJECTED";

/// Why a handover document cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("cannot read the handover state: {0}")]
    Io(#[from] std::io::Error),
    #[error("the handover state is not a document of any format: {0}")]
    NotADocument(serde_json::Error),
    #[error(
        "the handover state has format {found}, newer than this release ({version}) reads (up to {reads})"
    )]
    TooNew {
        found: u32,
        reads: u32,
        version: String,
    },
    #[error("the handover state (format {format}) does not parse: {error}")]
    Invalid {
        format: u32,
        error: serde_json::Error,
    },
}

/// The whole document.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    pub format: u32,
    /// The release that wrote it.
    pub written_by: Build,
    pub shell: ShellState,
    pub core: CoreSnapshot,
}

/// A supervisor image: its release and the SHA-256 of its binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Build {
    pub version: String,
    pub sha256: String,
}

impl std::fmt::Display for Build {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (sha256 {})", self.version, short(&self.sha256))
    }
}

/// The first 12 hex digits of a hash, for messages.
pub fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// A file's (dev, ino, size, mtime, ctime): it changes whenever the file does.
pub type Stamp = (u64, u64, u64, (i64, i64), (i64, i64));

/// What the shell holds.
#[derive(Debug, Serialize, Deserialize)]
pub struct ShellState {
    pub config_path: PathBuf,
    pub ctx: PathContext,
    /// The baton binary on disk that self-upgrades compare with and run.
    pub binary_path: PathBuf,
    /// Its (dev, ino, size, mtime, ctime) when it hashed to the image the state is for.
    #[serde(default)]
    pub binary_stamp: Option<Stamp>,
    /// When the service started (the first image).
    pub started_at: SystemTime,
    /// Images before this one.
    pub reexecs: u64,
    pub control: SocketState,
    /// The metrics listener (`[metrics] address`), if it serves.
    #[serde(default)]
    pub metrics: Option<MetricsState>,
    pub notify: SocketState,
    pub lifeline_read: RawFd,
    pub lifeline_write: RawFd,
    pub listeners: ListenerSetState,
    /// Every cache file held: the sets' files and the supervisor images'.
    pub artifacts: Vec<ArtifactState>,
    /// Indices in `artifacts` of the supervisor images kept (running, previous).
    pub images: Vec<usize>,
    /// Artifact sets; the core names them by index here.
    pub sets: Vec<SetState>,
    pub launched: Vec<LaunchedState>,
    /// Clients waiting for an upgrade's outcome, with their connections.
    pub waiters: Vec<WaiterState>,
    pub next_waiter: u64,
    /// The self-upgrade being carried out.
    pub request: SelfUpgrade,
    /// The session-ticket key chain (absent from a release before TLS: a new one starts).
    #[serde(default)]
    pub tickets: Option<baton_proto::tls::TicketKeys>,
}

/// A socket with the path (or abstract name) it is bound to.
#[derive(Debug, Serialize, Deserialize)]
pub struct SocketState {
    pub fd: RawFd,
    pub path: PathBuf,
}

/// The metrics listener: its fd and its address as configured (`unix:PATH` or IP:PORT).
#[derive(Debug, Serialize, Deserialize)]
pub struct MetricsState {
    pub fd: RawFd,
    pub address: String,
}

/// A held cache file.
#[derive(Debug, Serialize, Deserialize)]
pub struct ArtifactState {
    pub path: PathBuf,
    pub sha256: String,
    pub fd: RawFd,
}

/// What a generation runs: its config's text and where it was read from, its worker
/// binary and its plugins (indices in [`ShellState::artifacts`]).
#[derive(Debug, Serialize, Deserialize)]
pub struct SetState {
    pub config_path: PathBuf,
    pub config_text: String,
    pub binary_source: PathBuf,
    pub binary: usize,
    pub plugins: Vec<(PluginSpec, usize)>,
    /// The sealed memfd of its TLS material, if it has TLS listeners.
    #[serde(default)]
    pub tls: Option<RawFd>,
}

/// A launched generation's resources.
#[derive(Debug, Serialize, Deserialize)]
pub struct LaunchedState {
    pub generation: u64,
    /// Indices in the listener set's list.
    pub listeners: Vec<usize>,
    pub settings_json: String,
    pub workers: Vec<WorkerState>,
}

/// A worker process and the read end of its stderr pipe.
#[derive(Debug, Serialize, Deserialize)]
pub struct WorkerState {
    pub pid: u32,
    pub stderr: Option<RawFd>,
}

/// An `upgrade --wait` client.
#[derive(Debug, Serialize, Deserialize)]
pub struct WaiterState {
    pub id: u64,
    pub conn: RawFd,
}

impl Handover {
    /// The document as bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the handover state serialises")
    }

    /// Reads a document, refusing a format this release does not read.
    pub fn decode(bytes: &[u8]) -> Result<Self, HandoverError> {
        #[derive(Deserialize)]
        struct Header {
            format: u32,
        }
        let header: Header = serde_json::from_slice(bytes).map_err(HandoverError::NotADocument)?;
        let reads = crate::release::handover_format();
        if header.format > reads {
            return Err(HandoverError::TooNew {
                found: header.format,
                reads,
                version: crate::release::version(),
            });
        }
        serde_json::from_slice(bytes).map_err(|error| HandoverError::Invalid {
            format: header.format,
            error,
        })
    }
}

/// A sealed memfd holding `bytes`, inheritable (not close-on-exec).
pub fn seal(bytes: &[u8]) -> std::io::Result<OwnedFd> {
    sealed("baton-handover", bytes, false)
}

/// A sealed memfd holding `bytes`, close-on-exec: passed on only where it is placed on
/// purpose (a worker's TLS material).
pub fn seal_private(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    sealed(name, bytes, true)
}

fn sealed(name: &str, bytes: &[u8], cloexec: bool) -> std::io::Result<OwnedFd> {
    use nix::fcntl::{FcntlArg, SealFlag, fcntl};
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let mut flags = MFdFlags::MFD_ALLOW_SEALING;
    if cloexec {
        flags |= MFdFlags::MFD_CLOEXEC;
    }
    let fd = memfd_create(name, flags)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(bytes)?;
    file.rewind()?;
    fcntl(
        &file,
        FcntlArg::F_ADD_SEALS(
            SealFlag::F_SEAL_WRITE
                | SealFlag::F_SEAL_GROW
                | SealFlag::F_SEAL_SHRINK
                | SealFlag::F_SEAL_SEAL,
        ),
    )?;
    Ok(file.into())
}

/// Everything in the memfd `fd`, from its start.
pub fn read_all(fd: &OwnedFd) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::from(fd.try_clone()?);
    file.rewind()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_format_is_refused_before_its_content_is_read() {
        let doc = format!(
            r#"{{"format": {}, "whatever": "a future release writes"}}"#,
            crate::release::handover_format() + 1
        );
        let e = Handover::decode(doc.as_bytes()).unwrap_err();
        assert!(matches!(e, HandoverError::TooNew { .. }), "{e}");
        assert!(e.to_string().contains("newer than this release"), "{e}");
    }

    #[test]
    fn garbage_is_no_document() {
        let e = Handover::decode(b"\x7fELF").unwrap_err();
        assert!(matches!(e, HandoverError::NotADocument(_)), "{e}");
    }

    #[test]
    fn a_sealed_memfd_reads_back_and_cannot_be_written() {
        let fd = seal(b"state").expect("memfd");
        assert_eq!(read_all(&fd).expect("read"), b"state");
        let mut file = std::fs::File::from(fd);
        assert!(file.write_all(b"more").is_err(), "sealed against writes");
    }
}
