//! The configuration file, in two steps: a raw serde mirror of the TOML
//! (`deny_unknown_fields`, values kept with their spans) and a validated [`Config`] with
//! typed values and resolved paths. Validation has no side effects: it never binds,
//! opens or creates anything, so it is safe for `baton check` and for an upgrade that
//! may be refused.

use baton_proto::{HttpSettings, PluginSpec, WorkerSettings};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;
use toml::Spanned;

/// Where relative paths in the config resolve to, read once at start-up.
#[derive(Debug, Clone)]
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
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
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
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
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
}

/// `[worker]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    pub path: PathBuf,
    pub processes: usize,
    pub threads: usize,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    pub drain_idle_grace: Duration,
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

/// A validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The file it was read from.
    pub file: PathBuf,
    pub listeners: Vec<ListenerConfig>,
    pub worker: WorkerConfig,
    pub plugins: PluginsConfig,
    pub http: HttpSettings,
    pub control_socket: PathBuf,
}

const DEFAULT_WORKER: &str = "baton-worker";
const DEFAULT_PLUGIN_DIR: &str = "plugins.d";
const DEFAULT_CONTROL_SOCKET: &str = "baton.sock";
const DEFAULT_CACHE_DIR: &str = ".baton-cache";
/// Outside systemd, the private directory (mode 0700) relative control sockets go in.
const DEFAULT_RUNTIME_DIR: &str = ".baton-run";
/// Longest duration accepted anywhere, so that deadlines computed from them cannot overflow.
const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    worker: RawWorker,
    #[serde(default)]
    plugins: RawPlugins,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    control: RawControl,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: Spanned<String>,
    address: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    path: Option<Spanned<String>>,
    processes: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
    ready_timeout: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    drain_idle_grace: Option<Spanned<String>>,
    max_generations: Option<Spanned<i64>>,
    blocking_threads: Option<Spanned<i64>>,
    crash_loop_window: Option<Spanned<String>>,
    crash_loop_exits: Option<Spanned<i64>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlugins {
    dir: Option<Spanned<String>>,
    cache_dir: Option<Spanned<String>>,
    watch: Option<bool>,
    watch_debounce: Option<Spanned<String>>,
    settings: Option<Spanned<toml::Table>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    keepalive_timeout: Option<Spanned<String>>,
    header_read_timeout: Option<Spanned<String>>,
    /// Byte sizes: an integer, or a string with a unit ([`parse_size`]).
    max_header_bytes: Option<Spanned<toml::Value>>,
    max_headers: Option<Spanned<i64>>,
    max_body_bytes: Option<Spanned<toml::Value>>,
    max_connections: Option<Spanned<i64>>,
    health_path: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawControl {
    socket: Option<Spanned<String>>,
}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path, ctx: &PathContext) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path, ctx)
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(text: &str, path: &Path, ctx: &PathContext) -> Result<Config, ConfigError> {
        let raw: Raw = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            let mut message = e.message().trim().to_owned();
            if let Some(table) = table_at(text, line) {
                message = format!("{message} (in {table})");
            }
            ConfigError::Syntax {
                path: path.to_owned(),
                line,
                message,
            }
        })?;
        let v = Validator { text, path };
        let base = path.parent().unwrap_or(Path::new(".")).to_owned();
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };

        let mut listeners: Vec<ListenerConfig> = Vec::new();
        for entry in &raw.listener {
            let line = line_of(text, entry.span().start);
            let l = entry.get_ref();
            let name = l.name.get_ref().trim().to_owned();
            if name.is_empty() || name.len() > 255 || name.contains(':') || !name.is_ascii() {
                return Err(v.invalid(
                    &l.name,
                    "listener.name",
                    "must be 1 to 255 ASCII characters without ':' (it becomes an fd name)",
                ));
            }
            if listeners.iter().any(|o| o.name == name) {
                return Err(v.invalid(
                    &l.name,
                    "listener.name",
                    &format!("{name:?} is used twice"),
                ));
            }
            let address = match &l.address {
                None => None,
                Some(a) => {
                    let addr = parse_address(a.get_ref(), &base)
                        .map_err(|m| v.invalid(a, "listener.address", &m))?;
                    if let Some(other) =
                        listeners.iter().find(|o| o.address.as_ref() == Some(&addr))
                    {
                        return Err(v.invalid(
                            a,
                            "listener.address",
                            &format!("{addr} is already used by listener {:?}", other.name),
                        ));
                    }
                    Some(addr)
                }
            };
            listeners.push(ListenerConfig {
                name,
                address,
                line,
            });
        }
        if listeners.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line: 1,
                key: "listener".into(),
                message: "at least one [[listener]] is required".into(),
            });
        }

        let w = &raw.worker;
        let worker_path = match &w.path {
            None => ctx.exe_dir.join(DEFAULT_WORKER),
            Some(p) if p.get_ref().is_empty() => {
                return Err(v.invalid(p, "worker.path", "must not be empty"));
            }
            Some(p) => {
                let given = Path::new(p.get_ref());
                if given.is_absolute() {
                    given.to_owned()
                } else {
                    ctx.exe_dir.join(given)
                }
            }
        };
        let worker = WorkerConfig {
            path: worker_path,
            processes: v.int(&w.processes, "worker.processes", 1, 1..=1024)?,
            threads: v.int(&w.threads, "worker.threads", 0, 0..=1024)?,
            ready_timeout: v.duration(&w.ready_timeout, "worker.ready_timeout", "10s")?,
            drain_timeout: v.duration(&w.drain_timeout, "worker.drain_timeout", "30s")?,
            drain_idle_grace: v.duration(&w.drain_idle_grace, "worker.drain_idle_grace", "1s")?,
            max_generations: v.int(&w.max_generations, "worker.max_generations", 4, 2..=64)?,
            blocking_threads: v.int(
                &w.blocking_threads,
                "worker.blocking_threads",
                64,
                1..=4096,
            )?,
            crash_loop_window: v.duration(
                &w.crash_loop_window,
                "worker.crash_loop_window",
                "60s",
            )?,
            crash_loop_exits: v.int(&w.crash_loop_exits, "worker.crash_loop_exits", 3, 0..=1000)?,
            credentials: v.credentials(&w.user, &w.group)?,
        };

        let plugins = PluginsConfig {
            dir: match &raw.plugins.dir {
                None => base.join(DEFAULT_PLUGIN_DIR),
                Some(d) if d.get_ref().is_empty() => {
                    return Err(v.invalid(d, "plugins.dir", "must not be empty"));
                }
                Some(d) => base.join(d.get_ref()),
            },
            dir_explicit: raw.plugins.dir.is_some(),
            cache_dir: match &raw.plugins.cache_dir {
                Some(d) if d.get_ref().is_empty() => {
                    return Err(v.invalid(d, "plugins.cache_dir", "must not be empty"));
                }
                Some(d) => base.join(d.get_ref()),
                None => match &ctx.cache_dir {
                    Some(dir) => dir.join("plugins"),
                    None => base.join(DEFAULT_CACHE_DIR),
                },
            },
            watch: raw.plugins.watch.unwrap_or(false),
            watch_debounce: v.duration(
                &raw.plugins.watch_debounce,
                "plugins.watch_debounce",
                "500ms",
            )?,
            settings: match &raw.plugins.settings {
                None => toml::Table::new(),
                Some(table) => {
                    for (name, value) in table.get_ref() {
                        if !value.is_table() {
                            return Err(v.invalid(
                                table,
                                &format!("plugins.settings.{name}"),
                                "must be a table ([plugins.settings.NAME])",
                            ));
                        }
                    }
                    table.get_ref().clone()
                }
            },
        };

        let h = &raw.http;
        let defaults = HttpSettings::default();
        let health_path = match &h.health_path {
            None => defaults.health_path.clone(),
            Some(p) => {
                let s = p.get_ref();
                if !s.starts_with('/')
                    || s.chars().any(|c| c.is_whitespace() || c == '?' || c == '#')
                {
                    return Err(v.invalid(
                        p,
                        "http.health_path",
                        "must start with '/' and hold no spaces, '?' or '#'",
                    ));
                }
                s.clone()
            }
        };
        let http = HttpSettings {
            keepalive_timeout_ms: millis(v.duration(
                &h.keepalive_timeout,
                "http.keepalive_timeout",
                "60s",
            )?),
            header_read_timeout_ms: millis(v.duration(
                &h.header_read_timeout,
                "http.header_read_timeout",
                "10s",
            )?),
            max_header_bytes: v.bytes(
                &h.max_header_bytes,
                "http.max_header_bytes",
                defaults.max_header_bytes as u64,
                1024..=16 << 20,
            )? as usize,
            max_headers: v.int(
                &h.max_headers,
                "http.max_headers",
                defaults.max_headers,
                1..=10_000,
            )?,
            max_body_bytes: v.bytes(
                &h.max_body_bytes,
                "http.max_body_bytes",
                defaults.max_body_bytes,
                0..=1 << 40,
            )?,
            max_connections: v.int(
                &h.max_connections,
                "http.max_connections",
                10_000,
                1..=1 << 20,
            )?,
            health_path,
        };

        let control_socket = match &raw.control.socket {
            Some(s) if s.get_ref().is_empty() => {
                return Err(v.invalid(s, "control.socket", "must not be empty"));
            }
            other => control_path(
                other
                    .as_ref()
                    .map_or(DEFAULT_CONTROL_SOCKET, |s| s.get_ref()),
                &base,
                ctx,
            ),
        };
        if control_socket.as_os_str().len() > 100 {
            let line = raw
                .control
                .socket
                .as_ref()
                .map_or(1, |s| line_of(text, s.span().start));
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                line,
                key: "control.socket".into(),
                message: format!(
                    "{} is too long for a Unix socket path (at most 100 bytes)",
                    control_socket.display()
                ),
            });
        }

        Ok(Config {
            file: path.to_owned(),
            listeners,
            worker,
            plugins,
            http,
            control_socket,
        })
    }

    /// The settings a worker of this configuration is started with, loading `plugins`.
    pub fn worker_settings(&self, plugins: Vec<PluginSpec>) -> WorkerSettings {
        WorkerSettings {
            threads: self.worker.threads,
            drain_timeout_ms: millis(self.worker.drain_timeout),
            drain_idle_grace_ms: millis(self.worker.drain_idle_grace),
            http: self.http.clone(),
            blocking_threads: self.worker.blocking_threads,
            plugins,
            plugin_settings_json: serde_json::to_string(&self.plugins.settings)
                .expect("TOML tables serialise as JSON"),
        }
    }
}

/// Finds the control socket's path in a config that may not validate, so that `baton
/// upgrade` can still reach the supervisor and let it report what is wrong. Fails only
/// when the file cannot be read, or is not TOML at all.
pub fn control_socket_lenient(path: &Path, ctx: &PathContext) -> Result<PathBuf, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    if let Ok(config) = Config::parse(&text, path, ctx) {
        return Ok(config.control_socket);
    }
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| e.message().to_owned())?;
    let name = table
        .get("control")
        .and_then(|c| c.get("socket"))
        .and_then(|s| s.as_str())
        .unwrap_or(DEFAULT_CONTROL_SOCKET);
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(control_path(name, base, ctx))
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
        None => base.join(DEFAULT_RUNTIME_DIR).join(name),
    }
}

/// The `[table]` header that line `line` falls under, if any.
fn table_at(text: &str, line: usize) -> Option<&str> {
    text.lines()
        .take(line)
        .map(str::trim)
        .filter(|l| l.starts_with('['))
        .last()
        .map(|l| l.split('#').next().unwrap_or(l).trim())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The units a byte size may carry (ASCII case ignored): decimal ones are powers of 1000,
/// binary ones powers of 1024, as their names say.
const SIZE_UNITS: [(&str, u64); 9] = [
    ("B", 1),
    ("KB", 1_000),
    ("KiB", 1 << 10),
    ("MB", 1_000_000),
    ("MiB", 1 << 20),
    ("GB", 1_000_000_000),
    ("GiB", 1 << 30),
    ("TB", 1_000_000_000_000),
    ("TiB", 1 << 40),
];

/// What a byte size may look like, for messages.
const SIZE_FORMS: &str = "write a number of bytes (65536) or a string with a unit: \"512B\", \
                          \"64KiB\" (65536), \"64KB\" (64000), \"1MiB\", \"1MB\", \"1GiB\", \
                          \"1GB\"";

/// A byte size written as a string: digits, then optional spaces and a unit of
/// [`SIZE_UNITS`] (none: bytes).
fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let number: u64 = s[..digits].parse().ok()?;
    let unit = s[digits..].trim_start();
    let scale = if unit.is_empty() {
        1
    } else {
        SIZE_UNITS
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(unit))?
            .1
    };
    number.checked_mul(scale)
}

fn parse_address(s: &str, base: &Path) -> Result<Address, String> {
    if let Some(path) = s.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("unix: needs a path, as in \"unix:/run/baton/http.sock\"".into());
        }
        let path = base.join(path);
        if path.as_os_str().len() > 100 {
            return Err(format!(
                "{} is too long for a Unix socket path",
                path.display()
            ));
        }
        return Ok(Address::Unix(path));
    }
    s.parse::<SocketAddr>().map(Address::Tcp).map_err(|_| {
        format!("{s:?} is not an address: expected IP:PORT (\"127.0.0.1:8080\", \"[::]:8080\") or unix:PATH")
    })
}

struct Validator<'a> {
    text: &'a str,
    path: &'a Path,
}

impl Validator<'_> {
    fn invalid<T>(&self, at: &Spanned<T>, key: &str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_owned(),
            line: line_of(self.text, at.span().start),
            key: key.to_owned(),
            message: message.to_owned(),
        }
    }

    fn duration(
        &self,
        value: &Option<Spanned<String>>,
        key: &str,
        default: &str,
    ) -> Result<Duration, ConfigError> {
        let Some(value) = value else {
            return Ok(humantime::parse_duration(default).expect("defaults parse"));
        };
        let d = humantime::parse_duration(value.get_ref()).map_err(|e| {
            self.invalid(
                value,
                key,
                &format!(
                    "{:?} is not a duration ({e}); write e.g. \"500ms\", \"10s\", \"2m\"",
                    value.get_ref()
                ),
            )
        })?;
        if d.is_zero() {
            return Err(self.invalid(value, key, "must be longer than zero"));
        }
        if d > MAX_DURATION {
            return Err(self.invalid(value, key, "must be at most 7 days"));
        }
        Ok(d)
    }

    /// Looks the user and group up (a read of the user database, nothing else).
    fn credentials(
        &self,
        user: &Option<Spanned<String>>,
        group: &Option<Spanned<String>>,
    ) -> Result<Option<Credentials>, ConfigError> {
        let Some(user) = user else {
            if let Some(group) = group {
                return Err(self.invalid(group, "worker.group", "needs worker.user"));
            }
            return Ok(None);
        };
        let found = nix::unistd::User::from_name(user.get_ref())
            .map_err(|e| self.invalid(user, "worker.user", &format!("cannot look it up: {e}")))?
            .ok_or_else(|| {
                self.invalid(
                    user,
                    "worker.user",
                    &format!("no user {:?}", user.get_ref()),
                )
            })?;
        let gid = match group {
            None => found.gid.as_raw(),
            Some(group) => nix::unistd::Group::from_name(group.get_ref())
                .map_err(|e| {
                    self.invalid(group, "worker.group", &format!("cannot look it up: {e}"))
                })?
                .ok_or_else(|| {
                    self.invalid(
                        group,
                        "worker.group",
                        &format!("no group {:?}", group.get_ref()),
                    )
                })?
                .gid
                .as_raw(),
        };
        if found.uid.is_root() {
            return Err(self.invalid(
                user,
                "worker.user",
                "must not be root (leave it out to run workers as the supervisor's user)",
            ));
        }
        Ok(Some(Credentials {
            user: user.get_ref().clone(),
            uid: found.uid.as_raw(),
            gid,
        }))
    }

    /// A byte size: a TOML integer, or a string [`parse_size`] reads.
    fn bytes(
        &self,
        value: &Option<Spanned<toml::Value>>,
        key: &str,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<u64, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let (n, written) = match value.get_ref() {
            toml::Value::Integer(n) => (Some(i128::from(*n)), n.to_string()),
            toml::Value::String(s) => (parse_size(s).map(i128::from), format!("{s:?}")),
            other => {
                return Err(self.invalid(
                    value,
                    key,
                    &format!(
                        "expected an integer or a string, found a {}; {SIZE_FORMS}",
                        other.type_str()
                    ),
                ));
            }
        };
        let Some(n) = n else {
            return Err(self.invalid(
                value,
                key,
                &format!("{written} is not a size; {SIZE_FORMS}"),
            ));
        };
        match u64::try_from(n) {
            Ok(n) if range.contains(&n) => Ok(n),
            _ => {
                let bytes = if written == n.to_string() {
                    String::new()
                } else {
                    format!(" ({n} bytes)")
                };
                Err(self.invalid(
                    value,
                    key,
                    &format!(
                        "{written}{bytes} is out of range ({} to {} bytes)",
                        range.start(),
                        range.end()
                    ),
                ))
            }
        }
    }

    fn int(
        &self,
        value: &Option<Spanned<i64>>,
        key: &str,
        default: usize,
        range: std::ops::RangeInclusive<i64>,
    ) -> Result<usize, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let n = *value.get_ref();
        if !range.contains(&n) {
            return Err(self.invalid(
                value,
                key,
                &format!("{n} is out of range ({} to {})", range.start(), range.end()),
            ));
        }
        Ok(n as usize)
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
