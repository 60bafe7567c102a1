//! TLS on the listeners the settings name: the material comes from the sealed memfd the
//! supervisor placed (`BATON_TLS_FD`), read once before the worker says READY and closed;
//! the worker never opens a certificate or key file (it may run as a user who cannot).
//!
//! Each TLS listener gets a rustls server config: its certificates (the first for clients
//! without SNI or naming none of them, the others by their DNS names), TLS 1.2 and 1.3 or
//! 1.3 only, its ALPN list, and session tickets encrypted with the supervisor's ticket key
//! chain ([`ChainTicketer`]), so a ticket one generation issued resumes with the next.
//!
//! A handshake runs in the connection's own task, inside one of `max_connections` slots,
//! bounded by `handshake_timeout`; its outcome is counted. Then the connection is served
//! like any other ([`crate::connection`]): ALPN `h2` goes straight to HTTP/2.

use crate::connection::{Socket, connection};
use crate::drain::{ConnectionGuard, DrainWatch, Phase};
use crate::metrics::Global;
use crate::shared::Shared;
use anyhow::Context;
use baton_proto::tls::{TicketKeys, TlsBundle, TlsSettings};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::OwnedSemaphorePermit;

/// One TLS listener's acceptor.
#[derive(Clone)]
pub(crate) struct TlsListener {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

/// The TLS listeners by name, from the memfd `fd` (`BATON_TLS_FD`); none when the
/// settings name no TLS listener.
pub(crate) fn load(
    fd: Option<&str>,
    settings: &[TlsSettings],
) -> anyhow::Result<HashMap<String, TlsListener>> {
    if settings.is_empty() {
        return Ok(HashMap::new());
    }
    let Some(fd) = fd else {
        anyhow::bail!(
            "listener {:?} has TLS, but no {} names its material (a worker gets it from baton only)",
            settings[0].listener,
            baton_proto::tls::ENV_TLS_FD
        );
    };
    let bundle = read_bundle(fd)?;
    // The keys are in this process's memory from now on: no core dumps, no ptrace or
    // /proc/PID/mem by other processes of the same user.
    baton_sys::process::set_dumpable(false)
        .context("cannot make the process undumpable to protect its TLS keys")?;
    let ticketer = Arc::new(ChainTicketer::new(bundle.tickets.clone())?);
    let mut listeners = HashMap::new();
    for s in settings {
        let material = bundle
            .listeners
            .iter()
            .find(|l| l.listener == s.listener)
            .with_context(|| format!("no TLS material for listener {:?}", s.listener))?;
        let resolver =
            SniResolver::new(material).with_context(|| format!("listener {:?}", s.listener))?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let versions: &[&rustls::SupportedProtocolVersion] = if s.tls13_only {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(versions)
            .context("TLS versions")?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = s.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        if s.session_tickets {
            config.ticketer = ticketer.clone();
        } else {
            config.send_tls13_tickets = 0;
        }
        listeners.insert(
            s.listener.clone(),
            TlsListener {
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
                handshake_timeout: Duration::from_millis(s.handshake_timeout_ms),
            },
        );
    }
    Ok(listeners)
}

/// Reads the bundle from the memfd and closes it.
fn read_bundle(fd: &str) -> anyhow::Result<TlsBundle> {
    let raw: i32 = fd.parse().with_context(|| {
        format!(
            "{}={fd:?} is not an fd number",
            baton_proto::tls::ENV_TLS_FD
        )
    })?;
    anyhow::ensure!(
        raw > 2,
        "{}={raw} is a standard stream",
        baton_proto::tls::ENV_TLS_FD
    );
    let owned = baton_sys::inherit::adopt(raw)
        .with_context(|| format!("{}={raw}", baton_proto::tls::ENV_TLS_FD))?;
    // Every worker of the generation has this same open file (one offset): read by
    // position, from the start. Sealed: its length cannot change.
    let file = std::fs::File::from(owned);
    let len = file.metadata().context("the TLS material")?.len();
    let mut bytes = vec![0u8; len as usize];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut bytes, 0)
        .context("reading the TLS material")?;
    drop(file);
    TlsBundle::from_json(&bytes).context("the TLS material does not parse")
}

/// Chooses a listener's certificate by SNI: an exact DNS name, then a wildcard covering
/// one label (`*.example.org` covers `a.example.org`), else the first certificate.
#[derive(Debug)]
struct SniTable<T> {
    default: T,
    exact: HashMap<String, T>,
    wildcard: HashMap<String, T>,
}

impl<T: Clone> SniTable<T> {
    /// `entries`: each certificate with its names, the default first (none: `None`).
    fn new<'a>(entries: impl IntoIterator<Item = (T, &'a [String])>) -> Option<Self> {
        let mut entries = entries.into_iter().peekable();
        let default = entries.peek()?.0.clone();
        let (mut exact, mut wildcard) = (HashMap::new(), HashMap::new());
        for (value, names) in entries {
            for name in names {
                let name = name.to_ascii_lowercase();
                // The first certificate naming it wins, in the config's order.
                match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_owned()),
                    None => exact.entry(name),
                }
                .or_insert_with(|| value.clone());
            }
        }
        Some(Self {
            default,
            exact,
            wildcard,
        })
    }

    fn choose(&self, sni: Option<&str>) -> &T {
        let Some(name) = sni.map(str::to_ascii_lowercase) else {
            return &self.default;
        };
        if let Some(value) = self.exact.get(&name) {
            return value;
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(value) = self.wildcard.get(parent)
        {
            return value;
        }
        &self.default
    }
}

/// A listener's certificates, chosen by [`SniTable`].
#[derive(Debug)]
struct SniResolver(SniTable<Arc<CertifiedKey>>);

impl SniResolver {
    fn new(material: &baton_proto::tls::ListenerMaterial) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        for c in &material.certificates {
            let chain = CertificateDer::pem_slice_iter(c.chain_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .with_context(|| format!("certificate chain {}", c.chain_file))?;
            let key = PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes())
                .with_context(|| format!("private key {}", c.key_file))?;
            let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
                .with_context(|| format!("private key {}", c.key_file))?;
            keys.push((
                Arc::new(CertifiedKey::new(chain, signing)),
                c.names.as_slice(),
            ));
        }
        SniTable::new(keys).map(Self).context("no certificate")
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.choose(hello.server_name()).clone())
    }
}

/// Session tickets under the supervisor's key chain (`baton_proto::tls`): sealed with
/// AES-256-GCM under the current period's key, the period and a random nonce in front;
/// opened when they name this period or the one before. The chain moves on with the
/// clock; keys older than the previous period are dropped.
struct ChainTicketer {
    keys: Mutex<PeriodKeys>,
}

struct PeriodKeys {
    chain: TicketKeys,
    current: aws_lc_rs::aead::LessSafeKey,
    previous: aws_lc_rs::aead::LessSafeKey,
}

impl std::fmt::Debug for ChainTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainTicketer").finish_non_exhaustive()
    }
}

/// Period (8 bytes) and nonce (12) before the sealed ticket.
const TICKET_HEADER: usize = 8 + aws_lc_rs::aead::NONCE_LEN;

impl PeriodKeys {
    fn new(chain: TicketKeys) -> anyhow::Result<Self> {
        let aead = |key: Option<baton_proto::tls::ChainKey>| -> anyhow::Result<_> {
            let key = key.context("a ticket key is not 64 hex digits")?;
            let unbound = aws_lc_rs::aead::UnboundKey::new(
                &aws_lc_rs::aead::AES_256_GCM,
                &baton_proto::tls::aead_key(&key),
            )
            .map_err(|_| anyhow::anyhow!("cannot make a ticket key"))?;
            Ok(aws_lc_rs::aead::LessSafeKey::new(unbound))
        };
        Ok(Self {
            current: aead(chain.current_key())?,
            previous: aead(chain.previous_key())?,
            chain,
        })
    }
}

impl ChainTicketer {
    fn new(chain: TicketKeys) -> anyhow::Result<Self> {
        Ok(Self {
            keys: Mutex::new(PeriodKeys::new(chain)?),
        })
    }

    /// The keys of now's period (moved along when the period changed).
    fn with_keys<T>(&self, f: impl FnOnce(&PeriodKeys) -> T) -> T {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let period = baton_proto::tls::period_of(now);
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if period > keys.chain.period
            && let Some(next) = keys.chain.at(period)
            && let Ok(next) = PeriodKeys::new(next)
        {
            *keys = next;
        }
        f(&keys)
    }
}

impl rustls::server::ProducesTickets for ChainTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        baton_proto::tls::TICKET_PERIOD_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        self.with_keys(|keys| {
            let period = keys.chain.period.to_be_bytes();
            let mut out = Vec::with_capacity(TICKET_HEADER + plain.len() + 16);
            out.extend_from_slice(&period);
            out.extend_from_slice(&nonce);
            let mut sealed = plain.to_vec();
            keys.current
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(period),
                    &mut sealed,
                )
                .ok()?;
            out.extend_from_slice(&sealed);
            Some(out)
        })
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        use aws_lc_rs::aead::{Aad, NONCE_LEN, Nonce};
        if cipher.len() < TICKET_HEADER {
            return None;
        }
        let period: [u8; 8] = cipher[..8].try_into().ok()?;
        let nonce: [u8; NONCE_LEN] = cipher[8..TICKET_HEADER].try_into().ok()?;
        let p = u64::from_be_bytes(period);
        let mut sealed = cipher[TICKET_HEADER..].to_vec();
        self.with_keys(|keys| {
            let key = if p == keys.chain.period {
                &keys.current
            } else if p.checked_add(1) == Some(keys.chain.period) {
                &keys.previous
            } else {
                return None;
            };
            let plain = key
                .open_in_place(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(period),
                    &mut sealed,
                )
                .ok()?;
            Some(plain.to_vec())
        })
    }
}

/// Runs the handshake of an accepted connection (within `handshake_timeout`, and never
/// past the drain's forced phase), then serves it.
pub(crate) async fn serve<I: Socket>(
    tls: TlsListener,
    io: I,
    peer: Option<std::net::SocketAddr>,
    shared: Arc<Shared>,
    mut watch: DrainWatch,
    guard: ConnectionGuard,
    permit: OwnedSemaphorePermit,
) {
    let handshake = tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(io));
    let outcome = tokio::select! {
        outcome = handshake => outcome,
        _ = watch.reached(Phase::Forced) => return,
    };
    match outcome {
        Ok(Ok(stream)) => {
            shared.metrics.add(Global::TlsHandshakes, 1);
            connection(stream, peer, shared, watch, guard, permit).await;
        }
        Ok(Err(e)) => {
            shared.metrics.add(Global::TlsHandshakeFailures, 1);
            tracing::debug!("TLS handshake with {peer:?} failed: {e}");
        }
        Err(_) => {
            shared.metrics.add(Global::TlsHandshakeFailures, 1);
            tracing::debug!(
                "TLS handshake with {peer:?} not done within {:?}",
                tls.handshake_timeout
            );
        }
    }
}

impl<I: Socket> Socket for tokio_rustls::server::TlsStream<I> {
    fn set_nodelay(&self) {
        self.get_ref().0.set_nodelay();
    }

    fn negotiated_h2(&self) -> bool {
        self.get_ref().1.alpn_protocol() == Some(b"h2")
    }

    fn close_notify(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn chain(period: u64, seed: u8) -> TicketKeys {
        let mut k = TicketKeys::new(period, [seed; 64]);
        k.previous = format!("{:02x}", seed.wrapping_add(1)).repeat(32);
        k
    }

    fn now_period() -> u64 {
        baton_proto::tls::period_of(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
    }

    #[test]
    fn sni_picks_exact_names_then_one_label_wildcards_then_the_first() {
        let names = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let (a, b, c) = (
            names(&["a.test", "www.a.test"]),
            names(&["*.b.test", "b.test"]),
            names(&["A.TEST", "*.a.test"]),
        );
        let t = SniTable::new([
            ("a", a.as_slice()),
            ("b", b.as_slice()),
            ("c", c.as_slice()),
        ])
        .unwrap();
        assert_eq!(*t.choose(None), "a", "no SNI: the first");
        assert_eq!(*t.choose(Some("WWW.A.test")), "a", "case does not matter");
        assert_eq!(*t.choose(Some("b.test")), "b");
        assert_eq!(
            *t.choose(Some("x.b.test")),
            "b",
            "a wildcard covers one label"
        );
        assert_eq!(*t.choose(Some("y.x.b.test")), "a", "not two");
        assert_eq!(*t.choose(Some("a.test")), "a", "the first naming it wins");
        assert_eq!(*t.choose(Some("m.a.test")), "c");
        assert_eq!(*t.choose(Some("other.test")), "a");
        assert!(SniTable::<&str>::new([]).is_none());
    }

    #[test]
    fn a_ticket_opens_with_another_ticketer_of_the_same_chain() {
        let p = now_period();
        let one = ChainTicketer::new(chain(p, 7)).unwrap();
        let two = ChainTicketer::new(chain(p, 7)).unwrap();
        let ticket = one.encrypt(b"session state").unwrap();
        assert_eq!(two.decrypt(&ticket).unwrap(), b"session state");
        // Tampered: refused.
        let mut bad = ticket.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(two.decrypt(&bad).is_none());
        assert!(two.decrypt(&ticket[..10]).is_none());
        // Another chain: refused.
        let other = ChainTicketer::new(chain(p, 8)).unwrap();
        assert!(other.decrypt(&ticket).is_none());
    }

    #[test]
    fn a_ticket_of_the_previous_period_opens_and_older_ones_do_not() {
        let p = now_period();
        // A generation started a period ago issued this ticket then.
        let before = ChainTicketer::new(chain(p - 1, 3)).unwrap();
        let keys = before.keys.lock().unwrap();
        let ticket = {
            use aws_lc_rs::aead::{Aad, Nonce};
            let period = keys.chain.period.to_be_bytes();
            let nonce = [9u8; 12];
            let mut sealed = b"old".to_vec();
            keys.current
                .seal_in_place_append_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(period),
                    &mut sealed,
                )
                .unwrap();
            [&period[..], &nonce[..], &sealed[..]].concat()
        };
        drop(keys);
        // A generation started now from the chain moved along opens it...
        let now = ChainTicketer::new(chain(p - 1, 3).at(p).unwrap()).unwrap();
        assert_eq!(now.decrypt(&ticket).unwrap(), b"old");
        // ...and the old one, moving along by itself, too.
        assert_eq!(before.decrypt(&ticket).unwrap(), b"old");
        // Two periods on, it is gone.
        let later = ChainTicketer::new(chain(p - 2, 3)).unwrap();
        let mut k = later.keys.lock().unwrap();
        let old_period = (p - 2).to_be_bytes();
        let mut sealed = b"older".to_vec();
        k.current
            .seal_in_place_append_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key([1; 12]),
                aws_lc_rs::aead::Aad::from(old_period),
                &mut sealed,
            )
            .unwrap();
        let older = [&old_period[..], &[1u8; 12][..], &sealed[..]].concat();
        *k = PeriodKeys::new(chain(p - 2, 3).at(p).unwrap()).unwrap();
        drop(k);
        assert!(later.decrypt(&older).is_none());
    }
}
