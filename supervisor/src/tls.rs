//! TLS certificates and keys as artifacts of a generation: read, checked and handed on by
//! the supervisor, never by workers (which may run as a user who cannot read the keys).
//!
//! For each `[[listener.tls.certificate]]` the chain and the key are opened (following
//! symlinks: ACME clients link `live/` into `archive/`), checked through the opened file
//! (a regular file, owned by root or Baton's user, not writable by group or others, the
//! directories above it likewise; a key readable by others is refused), read once, and
//! parsed: the chain must hold at least one certificate, the key exactly one private key
//! of a kind rustls signs with, the leaf's public key must be the key's, and the leaf must
//! be valid now. What was read is what workers get: the bytes go into one sealed memfd per
//! generation ([`GenerationTls`]) with the session-ticket keys, which each worker reads
//! once at start. Nothing here refuses a certificate for expiring *soon*; that is warned
//! about (the log, `baton status`, metrics) from [`EXPIRY_WARNING_DAYS`] on.
//!
//! It never talks to a worker and never decides about generations: a [`TlsError`] refuses
//! the upgrade that read the files, and the serving generation keeps its memfd.

use crate::config::{CertificateFiles, Config};
use crate::trust::{self, TrustError};
use baton_proto::tls::{CertificateMaterial, ListenerMaterial, TicketKeys, TlsBundle};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};
use thiserror::Error;

/// A certificate closer than this to its end is warned about.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// Larger certificate or key files are refused (a chain is a few KiB).
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Why a generation's TLS material was refused. Each message names the file.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("TLS {what} {}: {error}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Trust(#[from] TrustError),
    #[error(
        "TLS private key {}: mode {mode:04o} lets every user read it; run chmod o-r on it (0600 or 0640)",
        path.display()
    )]
    KeyReadable { path: PathBuf, mode: u32 },
    #[error("TLS {what} {}: {problem}", path.display())]
    Invalid {
        what: &'static str,
        path: PathBuf,
        problem: String,
    },
    #[error(
        "TLS certificate {}: its public key is not the one of private key {}",
        chain.display(),
        key.display()
    )]
    KeyMismatch { chain: PathBuf, key: PathBuf },
    #[error("TLS certificate {}: not valid before {not_before} (it is {now} now)", path.display())]
    NotYetValid {
        path: PathBuf,
        not_before: String,
        now: String,
    },
    #[error("TLS certificate {}: expired at {not_after} (it is {now} now)", path.display())]
    Expired {
        path: PathBuf,
        not_after: String,
        now: String,
    },
    #[error("cannot hand the TLS material to the workers: {0}")]
    Memfd(std::io::Error),
}

/// What `baton status` and the metrics say about one certificate served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateInfo {
    pub chain: String,
    pub key: String,
    pub subject: String,
    /// Subject alternative names: DNS names, and IP addresses.
    pub names: Vec<String>,
    pub not_before: i64,
    pub not_after: i64,
    /// SHA-256 of the leaf certificate (DER), hex.
    pub sha256: String,
}

impl CertificateInfo {
    /// Whole days until `not_after` (negative once expired).
    pub fn days_left(&self, now: SystemTime) -> i64 {
        (self.not_after - unix(now)).div_euclid(86_400)
    }
}

/// One listener's certificates, the first the default.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerCertificates {
    pub listener: String,
    pub certificates: Vec<CertificateInfo>,
}

/// A generation's TLS material: what its workers read (the sealed memfd) and what status
/// shows of it.
#[derive(Debug)]
pub struct GenerationTls {
    pub memfd: OwnedFd,
    pub listeners: Vec<ListenerCertificates>,
}

/// Reads and checks every TLS listener's files of `config` (none: `None`) and seals them
/// with `tickets` for a generation. `now` judges validity.
pub fn prepare(
    config: &Config,
    tickets: &TicketKeys,
    now: SystemTime,
) -> Result<Option<GenerationTls>, TlsError> {
    let mut material = Vec::new();
    let mut listeners = Vec::new();
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        let mut certificates = Vec::new();
        let mut infos = Vec::new();
        for files in &tls.certificates {
            let (m, info) = load(files, now)?;
            certificates.push(m);
            infos.push(info);
        }
        material.push(ListenerMaterial {
            listener: l.name.clone(),
            certificates,
        });
        listeners.push(ListenerCertificates {
            listener: l.name.clone(),
            certificates: infos,
        });
    }
    if material.is_empty() {
        return Ok(None);
    }
    let bundle = TlsBundle {
        listeners: material,
        tickets: tickets.clone(),
    };
    let memfd = crate::handover::seal_private("baton-tls", bundle.to_json().as_bytes())
        .map_err(TlsError::Memfd)?;
    Ok(Some(GenerationTls { memfd, listeners }))
}

/// Logs a warning for each certificate of `tls` that expires within
/// [`EXPIRY_WARNING_DAYS`].
pub fn warn_expiring(tls: &GenerationTls, now: SystemTime) {
    for l in &tls.listeners {
        for c in &l.certificates {
            let days = c.days_left(now);
            if days < EXPIRY_WARNING_DAYS {
                tracing::warn!(
                    "TLS certificate {} of listener {:?} ({}) expires in {days} day(s), at {}",
                    c.chain,
                    l.listener,
                    c.subject,
                    time_text(c.not_after)
                );
            }
        }
    }
}

/// What a sealed bundle holds, described again (a supervisor re-exec takes the memfds of
/// the generations it adopts and needs their certificates' descriptions).
pub fn describe(memfd: OwnedFd) -> Result<GenerationTls, String> {
    let bytes = crate::handover::read_all(&memfd).map_err(|e| e.to_string())?;
    let bundle = TlsBundle::from_json(&bytes).map_err(|e| e.to_string())?;
    let mut listeners = Vec::new();
    for l in &bundle.listeners {
        let mut certificates = Vec::new();
        for c in &l.certificates {
            let chain = parse_chain(c.chain_pem.as_bytes(), Path::new(&c.chain_file))
                .map_err(|e| e.to_string())?;
            let (info, _) =
                leaf_info(&chain[0], Path::new(&c.chain_file)).map_err(|e| e.to_string())?;
            certificates.push(CertificateInfo {
                chain: c.chain_file.clone(),
                key: c.key_file.clone(),
                ..info
            });
        }
        listeners.push(ListenerCertificates {
            listener: l.listener.clone(),
            certificates,
        });
    }
    Ok(GenerationTls { memfd, listeners })
}

/// Reads, checks and parses one certificate and its key.
fn load(
    files: &CertificateFiles,
    now: SystemTime,
) -> Result<(CertificateMaterial, CertificateInfo), TlsError> {
    let chain_pem = read_checked(&files.chain, "certificate chain", false)?;
    let key_pem = read_checked(&files.key, "private key", true)?;
    let chain = parse_chain(&chain_pem, &files.chain)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Invalid {
        what: "private key",
        path: files.key.clone(),
        problem: format!("no private key in PEM ({e}); expected a PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block"),
    })?;
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key).map_err(|e| {
        TlsError::Invalid {
            what: "private key",
            path: files.key.clone(),
            problem: format!("not a key rustls can sign with: {e}"),
        }
    })?;
    let (info, spki) = leaf_info(&chain[0], &files.chain)?;
    match signing.public_key() {
        Some(public) if public.as_ref() == spki.as_slice() => {}
        _ => {
            return Err(TlsError::KeyMismatch {
                chain: files.chain.clone(),
                key: files.key.clone(),
            });
        }
    }
    let t = unix(now);
    if t < info.not_before {
        return Err(TlsError::NotYetValid {
            path: files.chain.clone(),
            not_before: time_text(info.not_before),
            now: time_text(t),
        });
    }
    if t > info.not_after {
        return Err(TlsError::Expired {
            path: files.chain.clone(),
            not_after: time_text(info.not_after),
            now: time_text(t),
        });
    }
    let text = |bytes: Vec<u8>, path: &Path, what| {
        String::from_utf8(bytes).map_err(|_| TlsError::Invalid {
            what,
            path: path.to_owned(),
            problem: "not text (PEM is ASCII)".into(),
        })
    };
    let info = CertificateInfo {
        chain: files.chain.display().to_string(),
        key: files.key.display().to_string(),
        ..info
    };
    Ok((
        CertificateMaterial {
            chain_file: info.chain.clone(),
            key_file: info.key.clone(),
            names: info.names.clone(),
            chain_pem: text(chain_pem, &files.chain, "certificate chain")?,
            key_pem: text(key_pem, &files.key, "private key")?,
        },
        info,
    ))
}

/// Opens `path` (following symlinks), checks the opened file and the directories above
/// the path and above what it resolves to, and reads it.
fn read_checked(path: &Path, what: &'static str, secret: bool) -> Result<Vec<u8>, TlsError> {
    let io = |error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(TlsError::Invalid {
            what,
            path: path.to_owned(),
            problem: "not a regular file".into(),
        });
    }
    let label = if secret {
        "TLS private key"
    } else {
        "TLS certificate"
    };
    trust::check_owner_and_mode(path, &meta, label)?;
    let mode = meta.permissions().mode() & 0o7777;
    if secret && mode & 0o004 != 0 {
        return Err(TlsError::KeyReadable {
            path: path.to_owned(),
            mode,
        });
    }
    trust::check_parents(path, label)?;
    let real = std::fs::canonicalize(path).map_err(io)?;
    if real != trust::absolute(path) {
        trust::check_parents(&real, label)?;
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(TlsError::Invalid {
            what,
            path: path.to_owned(),
            problem: format!(
                "{} bytes; a PEM file is at most {MAX_FILE_BYTES}",
                meta.len()
            ),
        });
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Ok(bytes)
}

/// Every certificate in a PEM chain, leaf first; at least one.
fn parse_chain(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let invalid = |problem: String| TlsError::Invalid {
        what: "certificate chain",
        path: path.to_owned(),
        problem,
    };
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM: {e}")))?;
    if chain.is_empty() {
        return Err(invalid("no CERTIFICATE block in it".into()));
    }
    for (i, der) in chain.iter().enumerate() {
        x509_parser::parse_x509_certificate(der).map_err(|e| {
            invalid(format!(
                "certificate {} of the chain does not parse: {e}",
                i + 1
            ))
        })?;
    }
    Ok(chain)
}

/// The leaf's description (without file names) and its SubjectPublicKeyInfo (DER).
fn leaf_info(
    leaf: &CertificateDer<'_>,
    path: &Path,
) -> Result<(CertificateInfo, Vec<u8>), TlsError> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::Invalid {
        what: "certificate chain",
        path: path.to_owned(),
        problem: format!("the certificate does not parse: {e}"),
    })?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                GeneralName::IPAddress(ip) => match ip.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).expect("4")).to_string(),
                    ),
                    16 => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).expect("16"))
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    let info = CertificateInfo {
        chain: String::new(),
        key: String::new(),
        subject: cert.subject().to_string(),
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        sha256: trust::sha256_hex(leaf),
    };
    Ok((info, cert.public_key().raw.to_vec()))
}

fn unix(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `secs` since the epoch as RFC 3339 (UTC).
pub fn time_text(secs: i64) -> String {
    let t = UNIX_EPOCH + std::time::Duration::from_secs(secs.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// The period's ticket keys of a new chain (at start-up).
pub fn new_ticket_chain(now: SystemTime) -> std::io::Result<TicketKeys> {
    let mut random = [0u8; 64];
    baton_sys::random::fill(&mut random)?;
    Ok(TicketKeys::new(
        baton_proto::tls::period_of(unix(now) as u64),
        random,
    ))
}

/// `keys` moved along the chain to `now`'s period (kept when the clock went back).
pub fn ticket_keys_at(keys: &TicketKeys, now: SystemTime) -> TicketKeys {
    keys.at(baton_proto::tls::period_of(unix(now) as u64))
        .unwrap_or_else(|| keys.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: i64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    }

    #[test]
    fn days_left_are_whole_days_and_negative_once_expired() {
        let c = CertificateInfo {
            chain: String::new(),
            key: String::new(),
            subject: String::new(),
            names: Vec::new(),
            not_before: 0,
            not_after: 30 * 86_400,
            sha256: String::new(),
        };
        assert_eq!(c.days_left(at(0)), 30);
        assert_eq!(c.days_left(at(86_400 + 1)), 28, "29 days less a second");
        assert_eq!(c.days_left(at(30 * 86_400)), 0);
        assert_eq!(c.days_left(at(30 * 86_400 + 1)), -1);
        assert_eq!(time_text(30 * 86_400), "1970-01-31T00:00:00Z");
    }

    #[test]
    fn ticket_keys_move_with_the_clock_and_stay_when_it_goes_back() {
        let period = baton_proto::tls::TICKET_PERIOD_SECS as i64;
        let start = new_ticket_chain(at(10 * period)).unwrap();
        assert_eq!(start.period, 10);
        let later = ticket_keys_at(&start, at(12 * period + 5));
        assert_eq!(later.period, 12);
        assert_eq!(later, start.at(12).unwrap());
        assert_eq!(ticket_keys_at(&later, at(3 * period)), later);
        assert_ne!(new_ticket_chain(at(0)).unwrap().current, start.current);
    }
}
