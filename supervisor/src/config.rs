//! The configuration file, in two steps: a raw serde mirror of the TOML
//! (`deny_unknown_fields`, values kept with their spans) and a validated [`Config`] with
//! typed values and resolved paths. Validation has no side effects: it never binds,
//! opens or creates anything, so it is safe for `baton check` and for an upgrade that
//! may be refused.
//!
//! This module holds the typed result and the one error type; `sections` holds each
//! section's raw struct and checks, `values` how one value is checked and worded, and
//! [`defaults`] every default (README.md's table and examples/baton.toml are tested
//! against it).

pub mod defaults;
mod sections;
mod values;

use baton_proto::{HttpSettings, PluginSpec, WebSocketSettings, WorkerSettings};
use sections::Raw;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use values::{Validator, millis};

/// Where relative paths in the config resolve to, read once at start-up.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PathContext {
    /// The directory holding the running `baton` binary (for `worker.path`).
    pub exe_dir: PathBuf,
    /// `$RUNTIME_DIRECTORY` (first entry), set by systemd's `RuntimeDirectory=`.
    pub runtime_dir: Option<PathBuf>,
    /// `$CACHE_DIRECTORY` (first entry), set by systemd's `CacheDirectory=`.
    pub cache_dir: Option<PathBuf>,
}

/// A configuration that failed to load.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The TOML did not parse, or a key is unknown or of the wrong type.
    #[error("{}:{line}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A value parsed but is not acceptable.
    #[error("{}:{line}: {key}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        message: String,
    },
}

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Address {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Tcp(addr) => write!(f, "{addr}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// One `[[listener]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    /// `None`: the listener must come from systemd socket activation.
    pub address: Option<Address>,
    /// The line of the `[[listener]]` entry, for messages.
    pub line: usize,
    /// `[listener.tls]`: serve HTTPS.
    pub tls: Option<TlsConfig>,
}

/// `[listener.tls]` of a listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// The first is served to clients without SNI or naming none of them.
    pub certificates: Vec<CertificateFiles>,
    pub tls13_only: bool,
    pub alpn: Vec<String>,
    pub handshake_timeout: Duration,
    pub session_tickets: bool,
}

/// One `[[listener.tls.certificate]]`: its files, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFiles {
    pub chain: PathBuf,
    pub key: PathBuf,
    /// Its line in the config, for messages.
    pub line: usize,
}

/// `[worker]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    pub path: PathBuf,
    pub processes: usize,
    pub threads: usize,
    /// `worker.scheduling = "batch"` (the default): workers move from the normal CPU
    /// scheduling policy to `SCHED_BATCH`; `"inherit"`: they keep baton's.
    pub batch_scheduling: bool,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    pub drain_idle_grace: Duration,
    /// Long-lived connections of a draining generation close spread over this.
    pub drain_spread: Duration,
    pub max_generations: usize,
    pub blocking_threads: usize,
    /// A generation whose workers exit `crash_loop_exits` times within `crash_loop_window`
    /// of its promotion is replaced by the previous generation's exact artifacts
    /// (`crash_loop_exits = 0`: never).
    pub crash_loop_window: Duration,
    pub crash_loop_exits: usize,
    /// `worker.user`/`worker.group`: the uid and gid workers run as (the supervisor must
    /// be root to switch).
    pub credentials: Option<Credentials>,
}

/// Who workers run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub user: String,
    pub uid: u32,
    pub gid: u32,
}

/// `[plugins]`.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginsConfig {
    pub dir: PathBuf,
    /// `dir` was written in the config (a missing directory is then an error; the
    /// default one may be absent, meaning no plugins).
    pub dir_explicit: bool,
    pub cache_dir: PathBuf,
    pub watch: bool,
    pub watch_debounce: Duration,
    pub settings: toml::Table,
}

/// `[upgrade]`: how a new generation is judged before the old one drains.
#[derive(Debug, Clone, PartialEq)]
pub struct UpgradeConfig {
    /// The canary window (`None`: no canary; the old generation drains once the new one
    /// is ready).
    pub canary: Option<Duration>,
    /// Requests the canary must answer in its window to be judged.
    pub canary_min_requests: u64,
    /// How much (absolute) the canary's error ratio may exceed the old generation's.
    pub canary_max_error_ratio_increase: f64,
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    /// The text it was read from: what a supervisor re-exec hands over, so the next
    /// image runs each generation with exactly its config, whatever the file says now.
    pub text: String,
    pub listeners: Vec<ListenerConfig>,
    pub worker: WorkerConfig,
    pub plugins: PluginsConfig,
    pub http: HttpSettings,
    pub websocket: WebSocketSettings,
    pub upgrade: UpgradeConfig,
    pub control_socket: PathBuf,
    /// `[metrics] address`: where the supervisor serves `GET /metrics`, if anywhere.
    pub metrics_address: Option<Address>,
    /// `[log] access`: where workers write their access log, and how.
    pub access_log: Option<baton_proto::AccessLogSettings>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path, ctx: &PathContext) -> Result<Config, ConfigError> {
        Config::parse(&read(path)?, path, ctx)
    }

    /// Validates `text` as if read from `path`: the raw sections first (any TOML error,
    /// unknown key or wrong type), then the values of each section in turn (listeners,
    /// worker, plugins, http, websocket, upgrade, control, metrics, log); the first error
    /// found is the one reported.
    pub fn parse(text: &str, path: &Path, ctx: &PathContext) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| values::syntax_error(text, path, &e))?;
        let v = Validator { text, path };
        let base = config_dir(path);
        let listeners = sections::listeners(&v, &raw.listener, &base)?;
        Ok(Config {
            file: path.to_owned(),
            text: text.to_owned(),
            listeners: listeners.clone(),
            worker: raw.worker.validate(&v, ctx)?,
            plugins: raw.plugins.validate(&v, &base, ctx)?,
            http: raw.http.validate(&v)?,
            websocket: raw.websocket.validate(&v)?,
            upgrade: raw.upgrade.validate(&v)?,
            control_socket: raw.control.validate(&v, &base, ctx)?,
            metrics_address: raw.metrics.validate(&v, &base, &listeners)?,
            access_log: raw.log.validate(&v, &base)?,
        })
    }

    /// The settings a worker of this configuration is started with, loading `plugins`.
    pub fn worker_settings(&self, plugins: Vec<PluginSpec>) -> WorkerSettings {
        WorkerSettings {
            threads: self.worker.threads,
            batch_scheduling: self.worker.batch_scheduling,
            drain_timeout_ms: millis(self.worker.drain_timeout),
            drain_idle_grace_ms: millis(self.worker.drain_idle_grace),
            drain_spread_ms: millis(self.worker.drain_spread.min(self.worker.drain_timeout)),
            websocket: self.websocket.clone(),
            http: self.http.clone(),
            blocking_threads: self.worker.blocking_threads,
            plugins,
            plugin_settings_json: serde_json::to_string(&self.plugins.settings)
                .expect("TOML tables serialise as JSON"),
            metrics: self.metrics_address.is_some(),
            access_log: self.access_log.clone(),
            tls: self
                .listeners
                .iter()
                .filter_map(|l| {
                    let tls = l.tls.as_ref()?;
                    Some(baton_proto::tls::TlsSettings {
                        listener: l.name.clone(),
                        tls13_only: tls.tls13_only,
                        alpn: tls.alpn.clone(),
                        handshake_timeout_ms: millis(tls.handshake_timeout),
                        session_tickets: tls.session_tickets,
                    })
                })
                .collect(),
        }
    }
}

/// The text of the config file at `path`.
fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Finds the control socket's path in a config that may not validate, so that `baton
/// upgrade` can still reach the supervisor and let it report what is wrong. Fails only
/// when the file cannot be read, or is not TOML at all.
pub fn control_socket_lenient(path: &Path, ctx: &PathContext) -> Result<PathBuf, ConfigError> {
    let text = read(path)?;
    if let Ok(config) = Config::parse(&text, path, ctx) {
        return Ok(config.control_socket);
    }
    let table: toml::Table = text
        .parse()
        .map_err(|e| values::syntax_error(&text, path, &e))?;
    let name = table
        .get("control")
        .and_then(|c| c.get("socket"))
        .and_then(|s| s.as_str())
        .unwrap_or(defaults::CONTROL_SOCKET);
    Ok(control_path(name, &config_dir(path), ctx))
}

/// The directory relative paths in the config file at `path` resolve against.
fn config_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// `control.socket` resolved: absolute as written; relative inside `$RUNTIME_DIRECTORY`,
/// else inside `.baton-run/` next to the config file (`base`). Either way its directory
/// must be one only baton's user can enter (the supervisor creates it so, or refuses).
fn control_path(name: &str, base: &Path, ctx: &PathContext) -> PathBuf {
    if Path::new(name).is_absolute() {
        return PathBuf::from(name);
    }
    match &ctx.runtime_dir {
        Some(dir) => dir.join(name),
        None => base.join(defaults::RUNTIME_DIR).join(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> PathContext {
        PathContext {
            exe_dir: PathBuf::from("/opt/baton/bin"),
            runtime_dir: None,
            cache_dir: None,
        }
    }

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/baton/baton.toml"), &ctx())
    }

    const MINIMAL: &str = "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n";

    #[test]
    fn defaults_fill_everything_but_the_listeners() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(
            c.listeners[0].address,
            Some(Address::Tcp("127.0.0.1:8080".parse().unwrap()))
        );
        assert_eq!(c.worker.path, PathBuf::from("/opt/baton/bin/baton-worker"));
        assert_eq!(c.worker.ready_timeout, Duration::from_secs(10));
        assert_eq!(c.worker.drain_timeout, Duration::from_secs(30));
        assert_eq!(c.worker.max_generations, 4);
        assert_eq!(c.plugins.dir, PathBuf::from("/etc/baton/plugins.d"));
        assert_eq!(
            c.control_socket,
            PathBuf::from("/etc/baton/.baton-run/baton.sock")
        );
        assert_eq!(c.worker.crash_loop_exits, 3);
        assert_eq!(c.worker.crash_loop_window, Duration::from_secs(60));
        assert_eq!(c.http, HttpSettings::default());
    }

    #[test]
    fn every_address_form_parses() {
        let c = parse(
            "[[listener]]\nname=\"a\"\naddress=\"[::1]:80\"\n[[listener]]\nname=\"b\"\naddress=\"unix:run/b.sock\"\n[[listener]]\nname=\"c\"\n",
        )
        .unwrap();
        assert_eq!(
            c.listeners[0].address,
            Some(Address::Tcp("[::1]:80".parse().unwrap()))
        );
        assert_eq!(
            c.listeners[1].address,
            Some(Address::Unix("/etc/baton/run/b.sock".into()))
        );
        assert_eq!(c.listeners[2].address, None);
    }

    const TLS: &str =
        "[[listener]]\nname = \"https\"\naddress = \"127.0.0.1:8443\"\n[listener.tls]\n";
    const CERT: &str = "[[listener.tls.certificate]]\nchain = \"tls/a.pem\"\nkey = \"tls/a.key\"\n";

    #[test]
    fn a_tls_listener_takes_its_defaults_and_resolves_its_files() {
        let c = parse(&format!("{TLS}{CERT}{CERT}")).unwrap();
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.certificates.len(), 2);
        assert_eq!(
            tls.certificates[0].chain,
            PathBuf::from("/etc/baton/tls/a.pem")
        );
        assert_eq!(
            tls.certificates[0].key,
            PathBuf::from("/etc/baton/tls/a.key")
        );
        assert_eq!(tls.certificates[0].line, 5);
        assert!(!tls.tls13_only && tls.session_tickets);
        assert_eq!(tls.alpn, ["h2", "http/1.1"]);
        assert_eq!(tls.handshake_timeout, Duration::from_secs(10));
        let settings = c.worker_settings(Vec::new());
        assert_eq!(settings.tls.len(), 1);
        assert_eq!(settings.tls[0].listener, "https");
        assert_eq!(settings.tls[0].handshake_timeout_ms, 10_000);
        // Without TLS, workers are told nothing of it (older workers read the settings).
        let plain = parse(MINIMAL).unwrap().worker_settings(Vec::new());
        assert!(!plain.to_json().contains("tls"));
        let c = parse(&format!(
            "{TLS}min_version = \"1.3\"\nalpn = [\"http/1.1\"]\nsession_tickets = false\n{CERT}"
        ))
        .unwrap();
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert!(tls.tls13_only && !tls.session_tickets);
        assert_eq!(tls.alpn, ["http/1.1"]);
    }

    #[test]
    fn bad_tls_settings_name_the_key_and_line() {
        for (text, key, line, says) in [
            (
                TLS.to_string(),
                "listener.tls.certificate",
                4,
                "at least one",
            ),
            (
                format!("{TLS}min_version = \"1.1\"\n{CERT}"),
                "listener.tls.min_version",
                5,
                "\"1.1\"",
            ),
            (
                format!("{TLS}alpn = [\"h3\"]\n{CERT}"),
                "listener.tls.alpn",
                5,
                "\"h3\" is not offered",
            ),
            (
                format!("{TLS}alpn = []\n{CERT}"),
                "listener.tls.alpn",
                5,
                "at least one",
            ),
            (
                format!("{TLS}alpn = [\"h2\", \"h2\"]\n{CERT}"),
                "listener.tls.alpn",
                5,
                "twice",
            ),
            (
                format!("{TLS}handshake_timeout = \"soon\"\n{CERT}"),
                "listener.tls.handshake_timeout",
                5,
                "not a duration",
            ),
            (
                format!("{TLS}[[listener.tls.certificate]]\nchain = \"\"\nkey = \"k\"\n"),
                "listener.tls.certificate.chain",
                6,
                "must not be empty",
            ),
            (
                format!(
                    "[[listener]]\nname = \"u\"\naddress = \"unix:u.sock\"\n[listener.tls]\n{CERT}"
                ),
                "listener.tls",
                4,
                "TCP listeners only",
            ),
        ] {
            let msg = parse(&text).unwrap_err().to_string();
            let want = format!("/etc/baton/baton.toml:{line}: {key}:");
            assert!(
                msg.starts_with(&want) && msg.contains(says),
                "{text}\n→ {msg}"
            );
        }
        let msg = parse(&format!("{TLS}{CERT}ciphers = \"all\"\n"))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("ciphers"), "{msg}");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse(&format!(
            "{MINIMAL}\n[worker]\nprocesses = 2\nproceses = 3\n"
        ))
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/baton/baton.toml:7:"), "{msg}");
        assert!(msg.contains("proceses"), "{msg}");
        assert!(msg.contains("(in [worker])"), "{msg}");
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let err = parse(&format!(
            "{MINIMAL}[worker]\nready_timeout = \"10 parsecs\"\n"
        ))
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("/etc/baton/baton.toml:5: worker.ready_timeout:"),
            "{msg}"
        );
        assert!(msg.contains("10 parsecs"), "{msg}");
    }

    #[test]
    fn bad_address_names_key_and_line() {
        let err = parse("[[listener]]\nname = \"http\"\naddress = \"localhost:80\"\n").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("/etc/baton/baton.toml:3: listener.address:"),
            "{err}"
        );
    }

    #[test]
    fn duplicate_names_and_addresses_are_refused() {
        let twice = format!("{MINIMAL}{MINIMAL}");
        assert!(
            parse(&twice)
                .unwrap_err()
                .to_string()
                .contains("used twice")
        );
        let same_addr =
            format!("{MINIMAL}[[listener]]\nname = \"b\"\naddress = \"127.0.0.1:8080\"\n");
        assert!(
            parse(&same_addr)
                .unwrap_err()
                .to_string()
                .contains("already used")
        );
    }

    #[test]
    fn listener_names_are_fd_names_systemd_accepts() {
        for bad in [
            "\"a:b\"",
            "\"tab\\there\"",
            "\"\"",
            &format!("\"{}\"", "x".repeat(256)),
        ] {
            let err = parse(&format!(
                "[[listener]]\nname = {bad}\naddress = \"127.0.0.1:8080\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(err.contains("listener.name"), "{bad}: {err}");
        }
        let ok = format!(
            "[[listener]]\nname = \"{}\"\naddress = \"127.0.0.1:8080\"\n",
            "x".repeat(255)
        );
        parse(&ok).unwrap();
    }

    #[test]
    fn ranges_are_checked() {
        let err = parse(&format!("{MINIMAL}[worker]\nmax_generations = 1\n")).unwrap_err();
        assert!(err.to_string().contains("worker.max_generations"), "{err}");
        let err = parse(&format!("{MINIMAL}[worker]\nprocesses = 0\n")).unwrap_err();
        assert!(err.to_string().contains("worker.processes"), "{err}");
    }

    /// `[http] KEY = VALUE` on line 5.
    fn http_key(key: &str, value: &str) -> Result<Config, ConfigError> {
        parse(&format!("{MINIMAL}[http]\n{key} = {value}\n"))
    }

    #[test]
    fn byte_sizes_are_integers_or_strings_with_a_unit() {
        let body = |value: &str| {
            http_key("max_body_bytes", value)
                .unwrap()
                .http
                .max_body_bytes
        };
        assert_eq!(body("2048"), 2048);
        assert_eq!(body("\"2048\""), 2048);
        assert_eq!(body("\"512B\""), 512);
        assert_eq!(body("\"64KiB\""), 65_536);
        assert_eq!(body("\"64KB\""), 64_000);
        assert_eq!(body("\"1MB\""), 1_000_000);
        assert_eq!(body("\" 1 MiB \""), 1 << 20);
        assert_eq!(body("\"1gib\""), 1 << 30);
        assert_eq!(body("\"1TiB\""), 1 << 40);
        assert_eq!(body("0"), 0);
        let header = http_key("max_header_bytes", "\"16KiB\"").unwrap();
        assert_eq!(header.http.max_header_bytes, 16_384);
    }

    #[test]
    fn bad_byte_sizes_name_key_line_and_the_forms_accepted() {
        for (value, says) in [
            (
                "\"1.5MB\"",
                "\"1.5MB\" is not a size; write a number of bytes (65536) or a string",
            ),
            ("\"1 Mbit\"", "\"1 Mbit\" is not a size"),
            ("\"MiB\"", "\"MiB\" is not a size"),
            ("\"\"", "\"\" is not a size"),
            ("true", "expected an integer or a string, found a boolean"),
            ("-1", "-1 is out of range (0 to 1099511627776 bytes)"),
            ("\"2TiB\"", "\"2TiB\" (2199023255552 bytes) is out of range"),
            ("\"99999999999TiB\"", "is not a size"),
        ] {
            let err = http_key("max_body_bytes", value).unwrap_err().to_string();
            assert!(
                err.starts_with("/etc/baton/baton.toml:5: http.max_body_bytes: "),
                "{value}: {err}"
            );
            assert!(err.contains(says), "{value}: {err}");
        }
        let err = http_key("max_body_bytes", "\"1 Mbit\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"64KiB\" (65536)"), "{err}");
        let err = http_key("max_header_bytes", "\"512B\"")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("http.max_header_bytes: \"512B\" (512 bytes) is out of range (1024 to"),
            "{err}"
        );
    }

    #[test]
    fn max_headers_is_checked_and_reaches_the_workers() {
        assert_eq!(parse(MINIMAL).unwrap().http.max_headers, 100);
        let c = http_key("max_headers", "200").unwrap();
        assert_eq!(c.worker_settings(Vec::new()).http.max_headers, 200);
        let err = http_key("max_headers", "0").unwrap_err().to_string();
        assert!(
            err.starts_with("/etc/baton/baton.toml:5: http.max_headers: 0 is out of range"),
            "{err}"
        );
    }

    #[test]
    fn scheduling_is_batch_or_inherit_and_reaches_the_workers() {
        let settings = |c: Config| c.worker_settings(Vec::new()).batch_scheduling;
        assert!(settings(parse(MINIMAL).unwrap()), "batch by default");
        let with = |value: &str| parse(&format!("{MINIMAL}[worker]\nscheduling = {value}\n"));
        assert!(settings(with("\"batch\"").unwrap()));
        assert!(!settings(with("\"inherit\"").unwrap()));
        let err = with("\"fifo\"").unwrap_err().to_string();
        assert!(err.contains(":5: worker.scheduling: \"fifo\""), "{err}");
        assert!(
            err.contains("\"batch\"") && err.contains("\"inherit\""),
            "{err}"
        );
    }

    #[test]
    fn no_listener_is_an_error() {
        assert!(parse("").unwrap_err().to_string().contains("[[listener]]"));
    }

    #[test]
    fn control_socket_goes_to_the_runtime_directory() {
        let systemd = PathContext {
            runtime_dir: Some("/run/baton".into()),
            ..ctx()
        };
        let c = Config::parse(MINIMAL, Path::new("/etc/baton/baton.toml"), &systemd).unwrap();
        assert_eq!(c.control_socket, PathBuf::from("/run/baton/baton.sock"));
        let c = Config::parse(MINIMAL, Path::new("/etc/baton/baton.toml"), &ctx()).unwrap();
        assert_eq!(
            c.control_socket,
            PathBuf::from("/etc/baton/.baton-run/baton.sock")
        );
    }
}
