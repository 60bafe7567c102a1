//! The first step: a raw serde mirror of each section of the file (`deny_unknown_fields`,
//! values kept with their spans), and the validation that turns it into the typed section
//! of [`Config`](super::Config). Each section's checks are in its `validate`, in the order
//! the file is checked; the defaults they fill in come from [`defaults`]; how one value is
//! checked and worded is in [`values`](super::values).

use super::defaults;
use super::values::{Validator, millis};
use super::{
    Address, CertificateFiles, ConfigError, ListenerConfig, PathContext, PluginsConfig, TlsConfig,
    UpgradeConfig, WorkerConfig, control_path,
};
use baton_proto::{HttpSettings, WebSocketSettings};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    #[serde(default)]
    pub listener: Vec<Spanned<RawListener>>,
    #[serde(default)]
    pub worker: RawWorker,
    #[serde(default)]
    pub plugins: RawPlugins,
    #[serde(default)]
    pub http: RawHttp,
    #[serde(default)]
    pub websocket: RawWebSocket,
    #[serde(default)]
    pub upgrade: RawUpgrade,
    #[serde(default)]
    pub control: RawControl,
    #[serde(default)]
    pub metrics: RawMetrics,
    #[serde(default)]
    pub log: RawLog,
}

/// One `[[listener]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListener {
    name: Spanned<String>,
    address: Option<Spanned<String>>,
    tls: Option<Spanned<RawTls>>,
}

/// `[listener.tls]` of one `[[listener]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    #[serde(default)]
    certificate: Vec<Spanned<RawCertificate>>,
    min_version: Option<Spanned<String>>,
    alpn: Option<Spanned<Vec<String>>>,
    handshake_timeout: Option<Spanned<String>>,
    session_tickets: Option<Spanned<bool>>,
}

/// One `[[listener.tls.certificate]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    chain: Spanned<String>,
    key: Spanned<String>,
}

impl RawTls {
    /// Files resolve against `base`, the config file's directory. Only the settings are
    /// checked here: the files are read when a generation is prepared (`crate::tls`).
    fn validate(
        &self,
        v: &Validator,
        at: &Spanned<RawTls>,
        base: &Path,
    ) -> Result<TlsConfig, ConfigError> {
        if self.certificate.is_empty() {
            return Err(v.invalid(
                at,
                "listener.tls.certificate",
                "a TLS listener needs at least one [[listener.tls.certificate]] with chain and key",
            ));
        }
        let mut certificates = Vec::new();
        for c in &self.certificate {
            let file = |value: &Spanned<String>, key: &str| {
                if value.get_ref().is_empty() {
                    return Err(v.invalid(value, key, "must not be empty"));
                }
                Ok(base.join(value.get_ref()))
            };
            certificates.push(CertificateFiles {
                chain: file(&c.get_ref().chain, "listener.tls.certificate.chain")?,
                key: file(&c.get_ref().key, "listener.tls.certificate.key")?,
                line: v.line(c),
            });
        }
        let tls13_only = v.choice(
            &self.min_version,
            "listener.tls.min_version",
            &[("1.2", false), ("1.3", true)],
            "write \"1.2\" (TLS 1.2 and 1.3) or \"1.3\" (TLS 1.3 only)",
        )?;
        let alpn = match &self.alpn {
            None => defaults::TLS_ALPN.iter().map(|s| (*s).to_owned()).collect(),
            Some(list) => {
                let protocols = list.get_ref();
                if protocols.is_empty() {
                    return Err(v.invalid(
                        list,
                        "listener.tls.alpn",
                        "must name at least one protocol",
                    ));
                }
                for (i, p) in protocols.iter().enumerate() {
                    if !defaults::TLS_ALPN.contains(&p.as_str()) {
                        return Err(v.invalid(
                            list,
                            "listener.tls.alpn",
                            &format!("{p:?} is not offered: \"h2\" and \"http/1.1\" are"),
                        ));
                    }
                    if protocols[..i].contains(p) {
                        return Err(v.invalid(
                            list,
                            "listener.tls.alpn",
                            &format!("{p:?} is named twice"),
                        ));
                    }
                }
                protocols.clone()
            }
        };
        Ok(TlsConfig {
            certificates,
            tls13_only,
            alpn,
            handshake_timeout: v.duration(
                &self.handshake_timeout,
                "listener.tls.handshake_timeout",
                defaults::TLS_HANDSHAKE_TIMEOUT,
            )?,
            session_tickets: self
                .session_tickets
                .as_ref()
                .map_or(defaults::TLS_SESSION_TICKETS, |b| *b.get_ref()),
        })
    }
}

/// Every `[[listener]]`: names and addresses unique, at least one listener. Relative
/// Unix socket paths resolve against `base`, the config file's directory.
pub(super) fn listeners(
    v: &Validator,
    entries: &[Spanned<RawListener>],
    base: &Path,
) -> Result<Vec<ListenerConfig>, ConfigError> {
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    for entry in entries {
        let line = v.line(entry);
        let l = entry.get_ref();
        let name = l.name.get_ref().trim().to_owned();
        if name.is_empty() || !crate::notify::fd_name_is_valid(&name) {
            return Err(v.invalid(
                &l.name,
                "listener.name",
                "must be 1 to 255 printable ASCII characters without ':' (it becomes an fd name)",
            ));
        }
        if listeners.iter().any(|o| o.name == name) {
            return Err(v.invalid(&l.name, "listener.name", &format!("{name:?} is used twice")));
        }
        let address = match &l.address {
            None => None,
            Some(a) => {
                let addr = v.address(a, "listener.address", base)?;
                if let Some(other) = listeners.iter().find(|o| o.address.as_ref() == Some(&addr)) {
                    return Err(v.invalid(
                        a,
                        "listener.address",
                        &format!("{addr} is already used by listener {:?}", other.name),
                    ));
                }
                Some(addr)
            }
        };
        let tls = match &l.tls {
            None => None,
            Some(t) => {
                if matches!(address, Some(Address::Unix(_))) {
                    return Err(v.invalid(
                        t,
                        "listener.tls",
                        "TLS is offered on TCP listeners only",
                    ));
                }
                Some(t.get_ref().validate(v, t, base)?)
            }
        };
        listeners.push(ListenerConfig {
            name,
            address,
            line,
            tls,
        });
    }
    if listeners.is_empty() {
        return Err(v.invalid_at(1, "listener", "at least one [[listener]] is required"));
    }
    Ok(listeners)
}

/// `[worker]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWorker {
    path: Option<Spanned<String>>,
    processes: Option<Spanned<i64>>,
    threads: Option<Spanned<i64>>,
    scheduling: Option<Spanned<String>>,
    ready_timeout: Option<Spanned<String>>,
    drain_timeout: Option<Spanned<String>>,
    drain_idle_grace: Option<Spanned<String>>,
    drain_spread: Option<Spanned<String>>,
    max_generations: Option<Spanned<i64>>,
    blocking_threads: Option<Spanned<i64>>,
    crash_loop_window: Option<Spanned<String>>,
    crash_loop_exits: Option<Spanned<i64>>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
}

impl RawWorker {
    /// A relative `path` resolves next to the `baton` binary.
    pub fn validate(&self, v: &Validator, ctx: &PathContext) -> Result<WorkerConfig, ConfigError> {
        let path = v.non_empty(&self.path, "worker.path")?;
        Ok(WorkerConfig {
            path: ctx.exe_dir.join(path.unwrap_or(defaults::WORKER_PATH)),
            processes: v.int(
                &self.processes,
                "worker.processes",
                defaults::PROCESSES,
                1..=1024,
            )?,
            threads: v.int(&self.threads, "worker.threads", defaults::THREADS, 0..=1024)?,
            batch_scheduling: v.choice(
                &self.scheduling,
                "worker.scheduling",
                &[("batch", true), ("inherit", false)],
                "write \"batch\" (SCHED_BATCH) or \"inherit\" (the policy baton runs under)",
            )?,
            ready_timeout: v.duration(
                &self.ready_timeout,
                "worker.ready_timeout",
                defaults::READY_TIMEOUT,
            )?,
            drain_timeout: v.duration(
                &self.drain_timeout,
                "worker.drain_timeout",
                defaults::DRAIN_TIMEOUT,
            )?,
            drain_idle_grace: v.duration(
                &self.drain_idle_grace,
                "worker.drain_idle_grace",
                defaults::DRAIN_IDLE_GRACE,
            )?,
            drain_spread: v.duration(
                &self.drain_spread,
                "worker.drain_spread",
                defaults::DRAIN_SPREAD,
            )?,
            max_generations: v.int(
                &self.max_generations,
                "worker.max_generations",
                defaults::MAX_GENERATIONS,
                2..=64,
            )?,
            blocking_threads: v.int(
                &self.blocking_threads,
                "worker.blocking_threads",
                defaults::BLOCKING_THREADS,
                1..=4096,
            )?,
            crash_loop_window: v.duration(
                &self.crash_loop_window,
                "worker.crash_loop_window",
                defaults::CRASH_LOOP_WINDOW,
            )?,
            crash_loop_exits: v.int(
                &self.crash_loop_exits,
                "worker.crash_loop_exits",
                defaults::CRASH_LOOP_EXITS,
                0..=1000,
            )?,
            credentials: v.credentials(&self.user, &self.group)?,
        })
    }
}

/// `[plugins]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPlugins {
    dir: Option<Spanned<String>>,
    cache_dir: Option<Spanned<String>>,
    watch: Option<bool>,
    watch_debounce: Option<Spanned<String>>,
    settings: Option<Spanned<toml::Table>>,
}

impl RawPlugins {
    /// Relative paths resolve against `base`, the config file's directory; without
    /// `cache_dir`, systemd's `$CACHE_DIRECTORY` is used if it is set.
    pub fn validate(
        &self,
        v: &Validator,
        base: &Path,
        ctx: &PathContext,
    ) -> Result<PluginsConfig, ConfigError> {
        let dir = v.non_empty(&self.dir, "plugins.dir")?;
        let cache_dir = match v.non_empty(&self.cache_dir, "plugins.cache_dir")? {
            Some(d) => base.join(d),
            None => match &ctx.cache_dir {
                Some(dir) => dir.join(defaults::CACHE_SUBDIR),
                None => base.join(defaults::CACHE_DIR),
            },
        };
        Ok(PluginsConfig {
            dir: base.join(dir.unwrap_or(defaults::PLUGIN_DIR)),
            dir_explicit: dir.is_some(),
            cache_dir,
            watch: self.watch.unwrap_or(defaults::WATCH),
            watch_debounce: v.duration(
                &self.watch_debounce,
                "plugins.watch_debounce",
                defaults::WATCH_DEBOUNCE,
            )?,
            settings: self.settings(v)?,
        })
    }

    /// `[plugins.settings.NAME]`: a table per plugin.
    fn settings(&self, v: &Validator) -> Result<toml::Table, ConfigError> {
        let Some(table) = &self.settings else {
            return Ok(toml::Table::new());
        };
        for (name, value) in table.get_ref() {
            if !value.is_table() {
                return Err(v.invalid(
                    table,
                    &format!("plugins.settings.{name}"),
                    "must be a table ([plugins.settings.NAME])",
                ));
            }
        }
        Ok(table.get_ref().clone())
    }
}

/// `[http]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHttp {
    keepalive_timeout: Option<Spanned<String>>,
    header_read_timeout: Option<Spanned<String>>,
    /// Byte sizes: an integer, or a string with a unit ([`Validator::bytes`]).
    max_header_bytes: Option<Spanned<toml::Value>>,
    max_headers: Option<Spanned<i64>>,
    max_body_bytes: Option<Spanned<toml::Value>>,
    max_connections: Option<Spanned<i64>>,
    health_path: Option<Spanned<String>>,
    stream_buffer_bytes: Option<Spanned<toml::Value>>,
}

impl RawHttp {
    pub fn validate(&self, v: &Validator) -> Result<HttpSettings, ConfigError> {
        let health_path = self.health_path(v)?;
        Ok(HttpSettings {
            keepalive_timeout_ms: millis(v.duration(
                &self.keepalive_timeout,
                "http.keepalive_timeout",
                defaults::KEEPALIVE_TIMEOUT,
            )?),
            header_read_timeout_ms: millis(v.duration(
                &self.header_read_timeout,
                "http.header_read_timeout",
                defaults::HEADER_READ_TIMEOUT,
            )?),
            max_header_bytes: v.bytes(
                &self.max_header_bytes,
                "http.max_header_bytes",
                defaults::MAX_HEADER_BYTES,
                1024..=16 << 20,
            )? as usize,
            max_headers: v.int(
                &self.max_headers,
                "http.max_headers",
                defaults::MAX_HEADERS,
                1..=10_000,
            )?,
            max_body_bytes: v.bytes(
                &self.max_body_bytes,
                "http.max_body_bytes",
                defaults::MAX_BODY_BYTES,
                0..=1 << 40,
            )?,
            max_connections: v.int(
                &self.max_connections,
                "http.max_connections",
                defaults::MAX_CONNECTIONS,
                1..=1 << 20,
            )?,
            health_path,
            stream_buffer_bytes: v.bytes(
                &self.stream_buffer_bytes,
                "http.stream_buffer_bytes",
                defaults::STREAM_BUFFER_BYTES,
                1024..=64 << 20,
            )? as usize,
        })
    }

    fn health_path(&self, v: &Validator) -> Result<String, ConfigError> {
        let Some(p) = &self.health_path else {
            return Ok(defaults::HEALTH_PATH.to_owned());
        };
        let s = p.get_ref();
        if !s.starts_with('/') || s.chars().any(|c| c.is_whitespace() || c == '?' || c == '#') {
            return Err(v.invalid(
                p,
                "http.health_path",
                "must start with '/' and hold no spaces, '?' or '#'",
            ));
        }
        Ok(s.clone())
    }
}

/// `[websocket]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWebSocket {
    max_message_bytes: Option<Spanned<toml::Value>>,
    send_queue_bytes: Option<Spanned<toml::Value>>,
    ping_interval: Option<Spanned<String>>,
    ping_timeout: Option<Spanned<String>>,
    slow_reader_close_code: Option<Spanned<i64>>,
}

impl RawWebSocket {
    pub fn validate(&self, v: &Validator) -> Result<WebSocketSettings, ConfigError> {
        let code = v.int(
            &self.slow_reader_close_code,
            "websocket.slow_reader_close_code",
            defaults::WS_SLOW_READER_CLOSE_CODE as usize,
            1008..=1011,
        )? as u16;
        if code != 1008 && code != 1011 {
            let at = self
                .slow_reader_close_code
                .as_ref()
                .expect("a default is valid");
            return Err(v.invalid(
                at,
                "websocket.slow_reader_close_code",
                "must be 1008 (policy violation) or 1011 (internal error)",
            ));
        }
        Ok(WebSocketSettings {
            max_message_bytes: v.bytes(
                &self.max_message_bytes,
                "websocket.max_message_bytes",
                defaults::WS_MAX_MESSAGE_BYTES,
                1..=1 << 30,
            )?,
            send_queue_bytes: v.bytes(
                &self.send_queue_bytes,
                "websocket.send_queue_bytes",
                defaults::WS_SEND_QUEUE_BYTES,
                1024..=1 << 30,
            )? as usize,
            ping_interval_ms: millis(v.duration(
                &self.ping_interval,
                "websocket.ping_interval",
                defaults::WS_PING_INTERVAL,
            )?),
            ping_timeout_ms: millis(v.duration(
                &self.ping_timeout,
                "websocket.ping_timeout",
                defaults::WS_PING_TIMEOUT,
            )?),
            slow_reader_close_code: code,
        })
    }
}

/// `[upgrade]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpgrade {
    canary: Option<Spanned<String>>,
    canary_min_requests: Option<Spanned<i64>>,
    canary_max_error_ratio_increase: Option<Spanned<toml::Value>>,
}

impl RawUpgrade {
    pub fn validate(&self, v: &Validator) -> Result<UpgradeConfig, ConfigError> {
        Ok(UpgradeConfig {
            canary: v.duration_or_off(&self.canary, "upgrade.canary", defaults::CANARY)?,
            canary_min_requests: v.int(
                &self.canary_min_requests,
                "upgrade.canary_min_requests",
                defaults::CANARY_MIN_REQUESTS as usize,
                0..=1 << 40,
            )? as u64,
            canary_max_error_ratio_increase: v.number(
                &self.canary_max_error_ratio_increase,
                "upgrade.canary_max_error_ratio_increase",
                defaults::CANARY_MAX_ERROR_RATIO_INCREASE,
                0.0..=1.0,
            )?,
        })
    }
}

/// `[control]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawControl {
    socket: Option<Spanned<String>>,
}

impl RawControl {
    /// The control socket's path, resolved as [`control_path`] says; it must fit in a
    /// Unix socket address.
    pub fn validate(
        &self,
        v: &Validator,
        base: &Path,
        ctx: &PathContext,
    ) -> Result<PathBuf, ConfigError> {
        let name = v.non_empty(&self.socket, "control.socket")?;
        let socket = control_path(name.unwrap_or(defaults::CONTROL_SOCKET), base, ctx);
        if socket.as_os_str().len() > 100 {
            let line = self.socket.as_ref().map_or(1, |s| v.line(s));
            return Err(v.invalid_at(
                line,
                "control.socket",
                &format!(
                    "{} is too long for a Unix socket path (at most 100 bytes)",
                    socket.display()
                ),
            ));
        }
        Ok(socket)
    }
}

/// `[metrics]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    address: Option<Spanned<String>>,
}

impl RawMetrics {
    /// The metrics listener's address, if any; it may not be a serving listener's.
    pub fn validate(
        &self,
        v: &Validator,
        base: &Path,
        listeners: &[ListenerConfig],
    ) -> Result<Option<super::Address>, ConfigError> {
        let Some(a) = &self.address else {
            return Ok(None);
        };
        let addr = v.address(a, "metrics.address", base)?;
        if let Some(l) = listeners.iter().find(|l| l.address.as_ref() == Some(&addr)) {
            return Err(v.invalid(
                a,
                "metrics.address",
                &format!("{addr} is listener {:?}'s address", l.name),
            ));
        }
        Ok(Some(addr))
    }
}

/// `[log]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    access: Option<Spanned<String>>,
    access_format: Option<Spanned<String>>,
}

impl RawLog {
    /// The access log's target and format; a relative file is relative to `base`.
    pub fn validate(
        &self,
        v: &Validator,
        base: &Path,
    ) -> Result<Option<baton_proto::AccessLogSettings>, ConfigError> {
        let format = v.choice(
            &self.access_format,
            "log.access_format",
            &[
                ("combined", baton_proto::AccessLogFormat::Combined),
                ("json", baton_proto::AccessLogFormat::Json),
            ],
            "expected \"combined\" or \"json\"",
        )?;
        let target = match v.non_empty(&self.access, "log.access")? {
            None | Some("off") => return Ok(None),
            Some("stdout") => "stdout".to_owned(),
            Some("stderr") => {
                return Err(v.invalid(
                    self.access.as_ref().expect("set"),
                    "log.access",
                    "\"stderr\" is not offered: a worker's stderr passes through the supervisor line by line; \"stdout\" writes to the same place (the journal under systemd) straight from the workers",
                ));
            }
            Some(path) => base.join(path).display().to_string(),
        };
        Ok(Some(baton_proto::AccessLogSettings { target, format }))
    }
}

/// The keys each raw struct accepts, by section (`listener` for each `[[listener]]`), as
/// serde sees them: what [`defaults::KEYS`] is checked against.
#[cfg(test)]
pub(super) fn field_names() -> Vec<(&'static str, Vec<&'static str>)> {
    vec![
        ("listener", fields_of::<RawListener>()),
        ("listener.tls", fields_of::<RawTls>()),
        ("listener.tls.certificate", fields_of::<RawCertificate>()),
        ("worker", fields_of::<RawWorker>()),
        ("plugins", fields_of::<RawPlugins>()),
        ("http", fields_of::<RawHttp>()),
        ("websocket", fields_of::<RawWebSocket>()),
        ("upgrade", fields_of::<RawUpgrade>()),
        ("control", fields_of::<RawControl>()),
        ("metrics", fields_of::<RawMetrics>()),
        ("log", fields_of::<RawLog>()),
    ]
}

/// The field names a derived `Deserialize` for `T` hands to `deserialize_struct`.
#[cfg(test)]
fn fields_of<T: for<'de> Deserialize<'de>>() -> Vec<&'static str> {
    use serde::de::{Error, Visitor, value};

    struct FieldNames<'a>(&'a mut Vec<&'static str>);

    impl<'de> serde::Deserializer<'de> for FieldNames<'_> {
        type Error = value::Error;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, value::Error> {
            Err(value::Error::custom("not a struct"))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, value::Error> {
            self.0.extend(fields);
            Err(value::Error::custom("only the field names were wanted"))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    let mut fields = Vec::new();
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}
