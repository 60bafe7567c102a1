//! TLS between supervisor and worker: what a worker is told about each TLS listener
//! ([`TlsSettings`], in the settings JSON, nothing secret), the secret material
//! ([`TlsBundle`]: certificate chains, private keys, session-ticket keys) that the
//! supervisor hands each generation in a sealed memfd named by [`ENV_TLS_FD`] — never in
//! the environment or on a command line — and the session-ticket key schedule
//! ([`TicketKeys`]) both sides follow.
//!
//! Ticket keys form a one-way chain: the key of period `n + 1` is a hash of the key of
//! period `n`, and a period is [`TICKET_PERIOD_SECS`] of wall-clock time. A generation gets
//! the key of the period it starts in and the one before; it moves along the chain by
//! itself as time passes, so every generation (and every worker of it) encrypts with the
//! same key at the same time, and a ticket issued by one generation is accepted by the next.
//! Nobody can go back along the chain: a key that is more than one period old is gone
//! everywhere, so a recorded session cannot be decrypted with what a process holds later.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Environment variable: the fd of the sealed memfd holding the generation's [`TlsBundle`]
/// as JSON. The worker reads it once at start, then closes it.
pub const ENV_TLS_FD: &str = "BATON_TLS_FD";

/// How long one ticket key encrypts new tickets (6 hours). A ticket is accepted during the
/// period it was issued in and the next one: between 6 and 12 hours.
pub const TICKET_PERIOD_SECS: u64 = 6 * 3600;

/// One TLS listener, as a worker is told in its settings (nothing secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// The listener's name.
    pub listener: String,
    /// Accept TLS 1.3 only (otherwise 1.2 and 1.3).
    pub tls13_only: bool,
    /// ALPN protocols offered, in order of preference (`h2`, `http/1.1`).
    pub alpn: Vec<String>,
    /// A handshake must finish within this long, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// Issue and accept session tickets.
    pub session_tickets: bool,
}

/// The secret part: every TLS listener's certificates and keys, and the ticket keys.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsBundle {
    pub listeners: Vec<ListenerMaterial>,
    pub tickets: TicketKeys,
}

impl std::fmt::Debug for TlsBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("TlsBundle")
            .field("listeners", &self.listeners.len())
            .finish_non_exhaustive()
    }
}

/// One listener's certificates, the first being the default (no SNI, or a name none of
/// them covers).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerMaterial {
    pub listener: String,
    pub certificates: Vec<CertificateMaterial>,
}

/// A certificate chain and its private key, PEM, exactly as the supervisor read and checked
/// them.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateMaterial {
    /// The chain and key files (for messages).
    pub chain_file: String,
    pub key_file: String,
    /// The names SNI chooses it by: the leaf's DNS subject alternative names (`*.` for a
    /// wildcard).
    pub names: Vec<String>,
    pub chain_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for ListenerMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerMaterial")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for CertificateMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateMaterial")
            .field("chain_file", &self.chain_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

impl TlsBundle {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a TLS bundle always serialises")
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The ticket keys of one period of the chain, and the key of the period before (to
/// accept the tickets issued then).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TicketKeys {
    /// The period: seconds since the Unix epoch / [`TICKET_PERIOD_SECS`].
    pub period: u64,
    /// This period's chain key, hex.
    pub current: String,
    /// The previous period's chain key, hex (a fresh chain has a random one nobody used).
    pub previous: String,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TicketKeys")
            .field("period", &self.period)
            .finish_non_exhaustive()
    }
}

/// A chain key.
pub type ChainKey = [u8; 32];

/// The period `unix_secs` falls in.
pub fn period_of(unix_secs: u64) -> u64 {
    unix_secs / TICKET_PERIOD_SECS
}

/// The chain key of the period after `key`'s.
pub fn next_key(key: &ChainKey) -> ChainKey {
    let mut h = Sha256::new();
    h.update(b"baton tls ticket chain v1\0");
    h.update(key);
    h.finalize().into()
}

/// The key tickets are encrypted with during the period of chain key `key` (never the chain
/// key itself, so that a ticket key does not lead to the next period's).
pub fn aead_key(key: &ChainKey) -> ChainKey {
    let mut h = Sha256::new();
    h.update(b"baton tls ticket aead v1\0");
    h.update(key);
    h.finalize().into()
}

impl TicketKeys {
    /// A new chain starting at `period`, from 64 random bytes.
    pub fn new(period: u64, random: [u8; 64]) -> Self {
        Self {
            period,
            current: hex(&random[..32]),
            previous: hex(&random[32..]),
        }
    }

    /// The keys of `period`, moving along the chain; `None` when `period` is before this
    /// one's (the chain cannot go back: the clock went back).
    pub fn at(&self, period: u64) -> Option<TicketKeys> {
        let steps = period.checked_sub(self.period)?;
        let (mut current, mut previous) = (self.current_key()?, self.previous_key()?);
        // A clock years ahead is a few thousand hashes.
        for _ in 0..steps {
            previous = current;
            current = next_key(&current);
        }
        Some(TicketKeys {
            period,
            current: hex(&current),
            previous: hex(&previous),
        })
    }

    pub fn current_key(&self) -> Option<ChainKey> {
        unhex(&self.current)
    }

    pub fn previous_key(&self) -> Option<ChainKey> {
        unhex(&self.previous)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<ChainKey> {
    if text.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain() -> TicketKeys {
        let mut random = [0u8; 64];
        for (i, b) in random.iter_mut().enumerate() {
            *b = i as u8;
        }
        TicketKeys::new(100, random)
    }

    #[test]
    fn the_chain_moves_forward_one_hash_per_period() {
        let start = chain();
        let next = start.at(101).unwrap();
        assert_eq!(next.previous, start.current);
        assert_eq!(
            next.current_key().unwrap(),
            next_key(&start.current_key().unwrap())
        );
        // Two steps at once are two single steps.
        assert_eq!(start.at(102).unwrap(), next.at(102).unwrap());
        // Far ahead, the same as walking.
        let mut walked = start.clone();
        for p in 101..=140 {
            walked = walked.at(p).unwrap();
        }
        assert_eq!(start.at(140).unwrap(), walked);
        assert_eq!(
            start.at(100).unwrap(),
            start,
            "the same period changes nothing"
        );
    }

    #[test]
    fn the_chain_never_goes_back() {
        assert!(chain().at(99).is_none());
    }

    #[test]
    fn encryption_keys_are_not_chain_keys() {
        let k = chain().current_key().unwrap();
        assert_ne!(aead_key(&k), k);
        assert_ne!(aead_key(&k), next_key(&k));
    }

    #[test]
    fn keys_round_trip_as_hex_and_bad_hex_is_no_key() {
        let c = chain();
        assert_eq!(hex(&c.current_key().unwrap()), c.current);
        let bad = TicketKeys {
            current: "zz".repeat(32),
            ..c.clone()
        };
        assert!(bad.current_key().is_none() && bad.at(101).is_none());
        assert!(!format!("{c:?}").contains(&c.current), "Debug shows no key");
    }
}
