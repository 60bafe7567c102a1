//! Certificates for TLS tests (a private CA and the certificates it issues, written as
//! PEM files with the modes Baton asks for), and a rustls client that verifies against
//! that CA and tells which certificate the server sent.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
};
use rustls::pki_types::{CertificateDer, ServerName};
use sha2::{Digest, Sha256};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpStream;

/// A certificate authority of the test's own.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    der: CertificateDer<'static>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

/// The key algorithm of a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    Rsa2048,
}

/// An issued certificate: its chain (leaf, then the CA) and key as PEM, and the SHA-256 of
/// the leaf (hex) that a client sees.
#[derive(Debug, Clone)]
pub struct Issued {
    pub chain_pem: String,
    pub key_pem: String,
    pub sha256: String,
}

/// Validity of an issued certificate, as (year, month, day) pairs.
pub type Validity = ((i32, u8, u8), (i32, u8, u8));

/// Valid from 2020 to 2090.
pub const VALID: Validity = ((2020, 1, 1), (2090, 1, 1));

impl Ca {
    pub fn new() -> Ca {
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Baton test CA");
        params.distinguished_name = dn;
        let cert = params.self_signed(&key).expect("CA certificate");
        Ca {
            pem: cert.pem(),
            der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM (for `curl --cacert`, `openssl -CAfile`).
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// A certificate for `names` (the first is also its common name).
    pub fn issue(&self, names: &[&str], kind: KeyKind, validity: Validity) -> Issued {
        let key = match kind {
            KeyKind::EcdsaP256 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256),
            KeyKind::Rsa2048 => {
                KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
            }
        }
        .expect("key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("params");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names[0].clone());
        params.distinguished_name = dn;
        let ((y0, m0, d0), (y1, m1, d1)) = validity;
        params.not_before = rcgen::date_time_ymd(y0, m0, d0);
        params.not_after = rcgen::date_time_ymd(y1, m1, d1);
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        Issued {
            chain_pem: cert.pem() + &self.pem,
            key_pem: key.serialize_pem(),
            sha256: hex(&Sha256::digest(cert.der())),
        }
    }

    /// A client config that trusts this CA and offers `alpn`.
    pub fn client(&self, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("CA as a root");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(config)
    }
}

impl Default for Ca {
    fn default() -> Self {
        Ca::new()
    }
}

/// Writes `issued` as `<dir>/<name>.pem` (0644) and `<dir>/<name>.key` (0600), replacing
/// each by rename (as an ACME client does), and returns both paths.
pub fn write(dir: &Path, name: &str, issued: &Issued) -> (PathBuf, PathBuf) {
    let chain = dir.join(format!("{name}.pem"));
    let key = dir.join(format!("{name}.key"));
    replace(&chain, issued.chain_pem.as_bytes(), 0o644);
    replace(&key, issued.key_pem.as_bytes(), 0o600);
    (chain, key)
}

/// Writes `bytes` to `path` with `mode` by a rename.
pub fn replace(path: &Path, bytes: &[u8], mode: u32) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The `[[listener]]` of a TLS listener named `name` on `port` with these certificates
/// (chain, key) and extra `[listener.tls]` lines.
pub fn listener(name: &str, port: u16, certificates: &[(PathBuf, PathBuf)], tls: &str) -> String {
    let mut text = format!(
        "\n[[listener]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\n[listener.tls]\n{tls}\n"
    );
    for (chain, key) in certificates {
        text.push_str(&format!(
            "[[listener.tls.certificate]]\nchain = \"{}\"\nkey = \"{}\"\n",
            chain.display(),
            key.display()
        ));
    }
    text
}

/// What a handshake showed.
#[derive(Debug)]
pub struct Handshake {
    pub stream: tokio_rustls::client::TlsStream<TcpStream>,
    /// SHA-256 of the leaf certificate the server sent, hex.
    pub sha256: String,
    pub alpn: Option<String>,
}

/// Connects to `port` and shakes hands for `name` (SNI).
pub async fn handshake(
    port: u16,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<Handshake> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let server = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(server, tcp)
        .await?;
    let (_, conn) = stream.get_ref();
    let sha256 = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| hex(&Sha256::digest(c)))
        .unwrap_or_default();
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    Ok(Handshake {
        stream,
        sha256,
        alpn,
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
