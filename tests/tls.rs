//! TLS listeners: HTTPS with HTTP/2 by ALPN, certificates chosen by SNI, certificates
//! replaced by an upgrade under load without a failed request, sessions resumed across
//! upgrades and supervisor re-execs, bad certificates refused with the reason while the
//! served one stays, workers serving TLS as a user who cannot read the key, and slow or
//! broken handshakes cut off and counted. Driven with curl, `openssl s_client` and a
//! rustls client.
#![forbid(unsafe_code)]

use baton_tests::load::{Load, LoadSpec, TlsTarget};
use baton_tests::tls::{Ca, Issued, KeyKind, VALID, handshake, listener, write};
use baton_tests::{Baton, TestConfig, free_port, heavy, request_on, traversable_tempdir};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A running Baton with a plain listener and a TLS listener `https` on `tls_port`, its
/// CA, and the directory holding the certificate files.
struct Tls {
    baton: Baton,
    ca: Ca,
    dir: tempfile::TempDir,
    tls_port: u16,
}

/// Starts Baton with `certs` (name, certificate) on its TLS listener, plus `tls` lines
/// in `[listener.tls]` and `extra` config.
async fn start(certs: &[(&str, Issued)], tls: &str, config: TestConfig, ca: Ca) -> Tls {
    let dir = traversable_tempdir("baton-tls");
    let files: Vec<(PathBuf, PathBuf)> = certs
        .iter()
        .map(|(name, issued)| write(dir.path(), name, issued))
        .collect();
    let tls_port = free_port();
    let config = TestConfig {
        extra: config.extra.clone() + &listener("https", tls_port, &files, tls),
        ..config
    };
    let baton = Baton::start(config).await;
    Tls {
        baton,
        ca,
        dir,
        tls_port,
    }
}

impl Tls {
    /// The SHA-256 of the certificate a new handshake for `name` gets, and the ALPN.
    async fn served(&self, name: &str) -> (String, Option<String>) {
        let h = handshake(self.tls_port, name, self.ca.client(&["http/1.1"]))
            .await
            .unwrap_or_else(|e| panic!("handshake for {name}: {e}\n{}", self.baton.log()));
        (h.sha256, h.alpn)
    }

    fn ca_file(&self) -> PathBuf {
        let path = self.dir.path().join("ca.pem");
        std::fs::write(&path, self.ca.pem()).unwrap();
        path
    }

    /// `curl ARGS https://NAME:PORT/PATH` with this CA, resolving NAME to 127.0.0.1.
    async fn curl(&self, name: &str, args: &[&str], path: &str) -> (bool, String) {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(self.ca_file())
            .arg("--resolve")
            .arg(format!("{name}:{}:127.0.0.1", self.tls_port))
            .args(args)
            .arg(format!("https://{name}:{}{path}", self.tls_port))
            .output()
            .await
            .expect("curl (Debian package curl)");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }

    /// `openssl s_client` to `name` (SNI; `-noservername` in `args`: none) with `args`,
    /// sending one request; its output.
    async fn s_client(&self, name: &str, args: &[&str]) -> String {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new("openssl")
            .args(["s_client", "-connect"])
            .arg(format!("127.0.0.1:{}", self.tls_port))
            .args(if args.contains(&"-noservername") {
                vec![]
            } else {
                vec!["-servername", name]
            })
            .arg("-CAfile")
            .arg(self.ca_file())
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl (Debian package openssl)");
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        // Open long enough for the answer and a TLS 1.3 ticket to arrive, then EOF.
        tokio::time::sleep(Duration::from_millis(400)).await;
        drop(stdin);
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .expect("s_client ended")
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_speaks_http2_by_alpn_and_http1_and_sni_picks_the_certificate() {
    let ca = Ca::new();
    let a = ca.issue(&["a.test", "localhost"], KeyKind::EcdsaP256, VALID);
    let b = ca.issue(&["b.test", "*.b.test"], KeyKind::Rsa2048, VALID);
    let t = start(
        &[("a", a.clone()), ("b", b.clone())],
        "",
        TestConfig::default(),
        ca,
    )
    .await;

    let (ok, out) = t
        .curl(
            "a.test",
            &["--http2", "-o", "/dev/null", "-w", "%{http_version}"],
            "/_baton/health",
        )
        .await;
    assert!(ok && out == "2", "curl --http2: {out}");
    let (ok, out) = t
        .curl(
            "a.test",
            &["--http1.1", "-o", "/dev/null", "-w", "%{http_version}"],
            "/_baton/health",
        )
        .await;
    assert!(ok && out == "1.1", "curl --http1.1: {out}");
    let (ok, out) = t.curl("a.test", &[], "/_baton/health").await;
    assert!(ok && out.contains("\"generation\":1"), "{out}");

    // SNI: each name gets its certificate; a wildcard covers one label; no match and no
    // SNI get the first.
    assert_eq!(t.served("a.test").await.0, a.sha256);
    assert_eq!(t.served("b.test").await.0, b.sha256);
    assert_eq!(t.served("x.b.test").await.0, b.sha256);
    // (openssl: a rustls client would refuse a certificate for another name.)
    let out = t.s_client("unknown.test", &[]).await;
    assert!(out.contains("CN = a.test"), "{out}");
    let out = t.s_client("b.test", &["-noservername"]).await;
    assert!(
        out.contains("CN = a.test") && !out.contains("CN = b.test"),
        "{out}"
    );
    let (_, alpn) = t.served("a.test").await;
    assert_eq!(alpn.as_deref(), Some("http/1.1"));
    let h2 = handshake(t.tls_port, "a.test", t.ca.client(&["h2", "http/1.1"]))
        .await
        .unwrap();
    assert_eq!(h2.alpn.as_deref(), Some("h2"));

    // openssl shows the chain (leaf and CA) and verifies it.
    let out = t.s_client("b.test", &["-showcerts"]).await;
    assert_eq!(
        out.matches("-----BEGIN CERTIFICATE-----").count(),
        2,
        "{out}"
    );
    assert!(out.contains("CN = b.test"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("\"generation\":1"), "{out}");

    // status --json: per listener, the certificates served.
    let status = t.baton.status().await;
    let https = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "https")
        .cloned()
        .unwrap();
    let certs = https["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 2, "{https}");
    assert_eq!(certs[0]["sha256"], a.sha256.as_str());
    assert_eq!(certs[0]["subject"], "CN=a.test");
    assert_eq!(
        certs[0]["names"],
        serde_json::json!(["a.test", "localhost"])
    );
    assert_eq!(certs[0]["not_after"], "2090-01-01T00:00:00Z");
    assert_eq!(certs[1]["sha256"], b.sha256.as_str());
    assert_eq!(certs[1]["expires_soon"], false);
    // The plain listener works as before, without certificates.
    let plain = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "http")
        .cloned()
        .unwrap();
    assert!(plain.get("certificates").is_none(), "{plain}");
    let (code, _) = baton_tests::get(t.baton.addr(), "/_baton/health")
        .await
        .unwrap();
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_replaced_and_upgraded_twenty_times_under_load_fail_no_request() {
    let _heavy = heavy().await;
    let ca = Ca::new();
    let first = ca.issue(&["a.test"], KeyKind::EcdsaP256, VALID);
    let t = start(&[("a", first)], "", TestConfig::default(), ca).await;
    let load = Load::start(
        ([127, 0, 0, 1], t.tls_port).into(),
        LoadSpec {
            keepalive: 8,
            per_request: 2,
            h2: 2,
            max_duration: Duration::from_secs(180),
            tls: Some(TlsTarget {
                config: t.ca.client(&["http/1.1"]),
                name: "a.test".into(),
            }),
            ..LoadSpec::default()
        },
    );
    for i in 0..20 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Every other one RSA: a change of key type too.
        let kind = if i % 2 == 0 {
            KeyKind::Rsa2048
        } else {
            KeyKind::EcdsaP256
        };
        let next = t.ca.issue(&["a.test"], kind, VALID);
        write(t.dir.path(), "a", &next);
        let out = t.baton.upgrade_wait().await;
        assert_eq!(out.code, Some(0), "upgrade {i}: {}", out.text());
        // `--wait` answers once the old generation stopped accepting: the very next
        // handshake meets the new generation.
        let (seen, _) = t.served("a.test").await;
        assert_eq!(seen, next.sha256, "new handshakes after upgrade {i}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "failures: {:?}", counts.failures);
    assert!(counts.ok_keepalive > 200, "{counts:?}");
    assert!(counts.ok_per_request > 20, "{counts:?}");
    assert!(counts.ok_h2 > 200, "{counts:?}");
    assert!(counts.generations.len() >= 20, "{:?}", counts.generations);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_across_upgrades_and_supervisor_reexecs() {
    let ca = Ca::new();
    let a = ca.issue(&["a.test"], KeyKind::EcdsaP256, VALID);
    let t = start(&[("a", a)], "", TestConfig::default(), ca).await;
    for version in ["-tls1_3", "-tls1_2"] {
        let session = t.dir.path().join(format!("session{version}.pem"));
        let session = session.to_str().unwrap();
        let out = t.s_client("a.test", &[version, "-sess_out", session]).await;
        assert!(out.contains("\nNew, TLSv1."), "{version}: {out}");
        for upgrade in [
            &["upgrade", "--wait"][..],
            &["upgrade", "--supervisor", "--wait"],
        ] {
            let up = t.baton.cli(upgrade).await;
            assert_eq!(up.code, Some(0), "{}", up.text());
            let out = t.s_client("a.test", &[version, "-sess_in", session]).await;
            assert!(
                out.contains("\nReused, TLSv1."),
                "{version} after {upgrade:?}: not resumed:\n{out}"
            );
        }
    }
    // The TLS 1.2 session was issued before the first re-exec and resumed by a generation
    // the next image started: the ticket keys were handed over.
    let status = t.baton.status().await;
    assert_eq!(status["supervisor"]["reexecs"], 2, "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_certificates_refuse_the_upgrade_and_the_served_one_stays() {
    let ca = Ca::new();
    let good = ca.issue(&["a.test"], KeyKind::EcdsaP256, VALID);
    let t = start(&[("a", good.clone())], "", TestConfig::default(), ca).await;
    let chain = t.dir.path().join("a.pem");
    let key = t.dir.path().join("a.key");
    let other = t.ca.issue(&["a.test"], KeyKind::EcdsaP256, VALID);
    let expired = t.ca.issue(
        &["a.test"],
        KeyKind::EcdsaP256,
        ((2020, 1, 1), (2021, 1, 1)),
    );
    let future = t.ca.issue(
        &["a.test"],
        KeyKind::EcdsaP256,
        ((2090, 1, 1), (2091, 1, 1)),
    );
    type Break = Box<dyn Fn(&Path, &Path)>;
    let cases: Vec<(&str, Break, String)> = vec![
        (
            "a key that is not the certificate's",
            Box::new(move |_: &Path, key: &Path| {
                baton_tests::tls::replace(key, other.key_pem.as_bytes(), 0o600)
            }),
            format!(
                "its public key is not the one of private key {}",
                key.display()
            ),
        ),
        (
            "an expired certificate",
            Box::new(move |chain: &Path, key: &Path| {
                baton_tests::tls::replace(chain, expired.chain_pem.as_bytes(), 0o644);
                baton_tests::tls::replace(key, expired.key_pem.as_bytes(), 0o600);
            }),
            format!("{}: expired at 2021-01-01T00:00:00Z", chain.display()),
        ),
        (
            "a certificate not yet valid",
            Box::new(move |chain: &Path, key: &Path| {
                baton_tests::tls::replace(chain, future.chain_pem.as_bytes(), 0o644);
                baton_tests::tls::replace(key, future.key_pem.as_bytes(), 0o600);
            }),
            format!("{}: not valid before 2090-01-01T00:00:00Z", chain.display()),
        ),
        (
            "a garbage chain",
            Box::new(|chain: &Path, _: &Path| {
                baton_tests::tls::replace(chain, b"not a certificate\n", 0o644)
            }),
            format!("{}: no CERTIFICATE block in it", chain.display()),
        ),
        (
            "a garbage key",
            Box::new(|_: &Path, key: &Path| {
                baton_tests::tls::replace(
                    key,
                    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                    0o600,
                )
            }),
            format!("TLS private key {}", key.display()),
        ),
        (
            "a key readable by others",
            Box::new(|_: &Path, key: &Path| {
                std::fs::set_permissions(key, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                    .unwrap()
            }),
            format!("{}: mode 0644 lets every user read it", key.display()),
        ),
        (
            "a missing key",
            Box::new(|_: &Path, key: &Path| std::fs::remove_file(key).unwrap()),
            format!("TLS private key {}: No such file", key.display()),
        ),
    ];
    for (what, break_it, reason) in cases {
        break_it(&chain, &key);
        let out = t.baton.upgrade_wait().await;
        assert_eq!(out.code, Some(1), "{what}: {}", out.text());
        assert!(out.text().contains(&reason), "{what}: {}", out.text());
        assert_eq!(
            t.served("a.test").await.0,
            good.sha256,
            "{what}: the serving generation keeps its certificate"
        );
        let (serving, _) = t.baton.serving().await.unwrap();
        assert_eq!(serving, 1, "{what}");
        write(t.dir.path(), "a", &good);
    }
    // `baton check` says the same before any upgrade is tried.
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let out = t.baton.cli(&["check"]).await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(out.text().contains(&good.sha256), "{}", out.text());
    baton_tests::tls::replace(&chain, b"garbage", 0o644);
    let out = t.baton.cli(&["check"]).await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.text().contains("no CERTIFICATE block"),
        "{}",
        out.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_running_as_another_user_serve_tls_without_reading_the_key() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: needs root to run workers as nobody");
        return;
    }
    let bin = traversable_tempdir("baton-bin");
    let worker = bin.path().join("baton-worker");
    std::fs::copy(&baton_tests::bins().worker, &worker).unwrap();
    let ca = Ca::new();
    let a = ca.issue(&["a.test"], KeyKind::EcdsaP256, VALID);
    let t = start(
        &[("a", a.clone())],
        "",
        TestConfig {
            worker_path: Some(worker),
            extra: "user = \"nobody\"\ngroup = \"nogroup\"\n".into(),
            ..TestConfig::default()
        },
        ca,
    )
    .await;
    // The key is root's, mode 0600: nobody cannot open it.
    let key = t.dir.path().join("a.key");
    let read_as_nobody = tokio::process::Command::new("setpriv")
        .args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "cat"])
        .arg(&key)
        .output()
        .await
        .unwrap();
    assert!(!read_as_nobody.status.success(), "nobody read the key");
    let (seen, _) = t.served("a.test").await;
    assert_eq!(seen, a.sha256);
    let h = handshake(t.tls_port, "a.test", t.ca.client(&["http/1.1"]))
        .await
        .unwrap();
    let (code, body) = request_on(h.stream, "/_baton/health").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    let secret = a.key_pem.lines().nth(1).unwrap().to_owned();
    for pid in t.baton.worker_pids() {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(uid.contains(&nobody.to_string()), "worker {pid}: {uid}");
        // Not in its environment or command line, and the memfd is closed.
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        assert!(!String::from_utf8_lossy(&environ).contains(&secret));
        assert!(!String::from_utf8_lossy(&environ).contains("PRIVATE KEY"));
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        assert!(!String::from_utf8_lossy(&cmdline).contains("PRIVATE KEY"));
        for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
            let target = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
            assert!(
                !target.to_string_lossy().contains("baton-tls"),
                "worker {pid} still holds {}",
                target.display()
            );
        }
        // Not dumpable: its memory is closed to its own user.
        assert!(
            std::fs::metadata(format!("/proc/{pid}/mem"))
                .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
                .unwrap_or(true),
            "worker {pid}'s /proc entries belong to nobody"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_broken_handshakes_are_cut_off_and_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ca = Ca::new();
    let a = ca.issue(&["a.test"], KeyKind::EcdsaP256, VALID);
    let metrics_port = free_port();
    let t = start(
        &[("a", a)],
        "handshake_timeout = \"300ms\"",
        TestConfig {
            processes: 1,
            extra: format!("\n[metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n"),
            ..TestConfig::default()
        },
        ca,
    )
    .await;
    // Silent: closed once the handshake timeout passed.
    let mut silent = tokio::net::TcpStream::connect(("127.0.0.1", t.tls_port))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("closed within the handshake timeout")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "{:?}",
        started.elapsed()
    );
    // Garbage: refused at once (with an alert, then the close).
    let mut garbage = tokio::net::TcpStream::connect(("127.0.0.1", t.tls_port))
        .await
        .unwrap();
    garbage
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read_to_end(&mut rest))
        .await
        .expect("closed");
    // A good one still works, and everything is counted.
    assert!(!t.served("a.test").await.0.is_empty());
    let addr = ([127, 0, 0, 1], metrics_port).into();
    let mut text = String::new();
    for _ in 0..50 {
        text = baton_tests::scrape::scrape(addr).await.unwrap();
        let failures = baton_tests::scrape::sum(&text, "baton_tls_handshake_failures_total", &[]);
        let done = baton_tests::scrape::sum(&text, "baton_tls_handshakes_total", &[]);
        if failures >= Some(2.0) && done >= Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        baton_tests::scrape::sum(&text, "baton_tls_handshake_failures_total", &[]),
        Some(2.0),
        "{text}"
    );
    let left = baton_tests::scrape::sum(
        &text,
        "baton_tls_certificate_expiry_remaining_seconds",
        &[("listener", "https")],
    );
    // Valid until 2090.
    assert!(left.is_some_and(|s| s > 60.0 * 365.0 * 86400.0), "{text}");
    baton_tests::scrape::promtool_check(&text, t.dir.path()).unwrap();
}
