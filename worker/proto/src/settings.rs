//! What a worker is told to do: the part of the validated configuration it needs, with
//! every duration already resolved. The supervisor serialises this to JSON in
//! [`crate::ENV_SETTINGS`]; a worker started without it (for example by
//! `systemd-socket-activate`) uses [`WorkerSettings::default`].

use serde::{Deserialize, Serialize};

/// Everything a worker process needs besides its listener fds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// Runtime threads; 0 means one per available core.
    pub threads: usize,
    /// Move the worker's threads from the normal CPU scheduling policy to `SCHED_BATCH`
    /// (`worker.scheduling = "batch"`). Left out of the JSON when on, the default, so
    /// that a worker binary that predates it still reads it.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub batch_scheduling: bool,
    /// How long a drain may take before what is left is closed, in milliseconds.
    pub drain_timeout_ms: u64,
    /// How long an idle keep-alive connection is kept open once a drain began, so that a
    /// request the client is sending at that moment is still answered (with
    /// `Connection: close`), in milliseconds.
    pub drain_idle_grace_ms: u64,
    /// Long-lived connections (WebSocket, streamed answers) of a draining worker are
    /// closed spread over this window (at most `drain_timeout`), in milliseconds, so the
    /// next generation meets no reconnect storm.
    #[serde(default = "default_drain_spread_ms")]
    pub drain_spread_ms: u64,
    /// WebSocket behaviour.
    #[serde(default)]
    pub websocket: WebSocketSettings,
    /// HTTP limits and behaviour.
    pub http: HttpSettings,
    /// Threads for plugins whose handlers may block, shared out evenly between them.
    pub blocking_threads: usize,
    /// The plugins to load, in order.
    pub plugins: Vec<PluginSpec>,
    /// `[plugins.settings]` as a JSON object: plugin name → its settings.
    pub plugin_settings_json: String,
    /// Report `BATON_METRICS=` with the stats (`[metrics] address` is set). Left out of
    /// the JSON when off, so that a worker binary that predates it still reads it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub metrics: bool,
    /// The access log (`[log] access`), if on; left out of the JSON when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSettings>,
    /// The TLS listeners; left out of the JSON when there is none. Their certificates,
    /// keys and ticket keys come in the memfd named by [`crate::tls::ENV_TLS_FD`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tls: Vec<crate::tls::TlsSettings>,
}

/// Where and how a worker writes its access log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSettings {
    /// `"stdout"` (inherited from the supervisor: the journal under systemd) or the path of
    /// a file the worker opens for appending.
    pub target: String,
    pub format: AccessLogFormat,
}

/// The access log's line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    /// Apache's and nginx's combined format, then the duration in seconds, the generation
    /// and the worker's pid.
    Combined,
    /// One JSON object per line.
    Json,
}

/// One plugin of a generation, already checked and copied to the cache by the supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpec {
    /// The file in the plugin directory (for messages).
    pub file: String,
    /// The content-addressed copy (for messages; loaded by this path only without `fd`).
    pub cached: String,
    /// SHA-256 of the file, hex.
    pub hash: String,
    /// The inherited fd of the checked cache file, which the worker loads: what the
    /// supervisor hashed is what runs, whatever happens to `cached` meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
}

/// HTTP behaviour of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Idle keep-alive connections are closed after this long, in milliseconds.
    pub keepalive_timeout_ms: u64,
    /// A request's header must arrive within this long, in milliseconds.
    pub header_read_timeout_ms: u64,
    /// Largest accepted request header block, in bytes.
    pub max_header_bytes: usize,
    /// Most header fields a request may carry; more get 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: u64,
    /// Most connections one worker holds open at once.
    pub max_connections: usize,
    /// The path answered with the worker's generation and pid, for load balancers.
    pub health_path: String,
    /// The most bytes one streamed answer (or streamed request body) buffers between the
    /// plugin and the client; beyond it the writer is told to wait.
    #[serde(default = "default_stream_buffer_bytes")]
    pub stream_buffer_bytes: usize,
}

/// WebSocket behaviour of a worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebSocketSettings {
    /// Largest message accepted (a route may set its own), in bytes; larger: close 1009.
    pub max_message_bytes: u64,
    /// The most bytes queued to one client; a client that lets more pile up is closed
    /// with `slow_reader_close_code`.
    pub send_queue_bytes: usize,
    /// A connection idle this long is pinged, in milliseconds.
    pub ping_interval_ms: u64,
    /// A ping unanswered this long closes the connection, in milliseconds.
    pub ping_timeout_ms: u64,
    /// 1008 (policy violation) or 1011 (internal error).
    pub slow_reader_close_code: u16,
}

impl Default for WebSocketSettings {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            send_queue_bytes: 1 << 20,
            ping_interval_ms: 30_000,
            ping_timeout_ms: 10_000,
            slow_reader_close_code: 1008,
        }
    }
}

impl Default for WorkerSettings {
    fn default() -> Self {
        Self {
            threads: 0,
            batch_scheduling: true,
            drain_timeout_ms: 30_000,
            drain_idle_grace_ms: 1_000,
            drain_spread_ms: default_drain_spread_ms(),
            websocket: WebSocketSettings::default(),
            http: HttpSettings::default(),
            blocking_threads: 64,
            plugins: Vec::new(),
            plugin_settings_json: "{}".to_owned(),
            metrics: false,
            access_log: None,
            tls: Vec::new(),
        }
    }
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            keepalive_timeout_ms: 60_000,
            header_read_timeout_ms: 10_000,
            max_header_bytes: 65_536,
            max_headers: default_max_headers(),
            max_body_bytes: 1_048_576,
            max_connections: 10_000,
            health_path: "/_baton/health".to_owned(),
            stream_buffer_bytes: default_stream_buffer_bytes(),
        }
    }
}

/// `drain_spread_ms` when the settings lack it (a supervisor that predates the key).
fn default_drain_spread_ms() -> u64 {
    5_000
}

/// `stream_buffer_bytes` when the settings lack it.
fn default_stream_buffer_bytes() -> usize {
    64 * 1024
}

/// `max_headers` when the settings lack it: an upgrade may start a newer worker binary
/// under a supervisor that predates the key. Hyper's own limit, which applied then.
fn default_max_headers() -> usize {
    100
}

impl WorkerSettings {
    /// Encodes the settings for [`crate::ENV_SETTINGS`].
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("settings always serialise")
    }

    /// Decodes the settings from [`crate::ENV_SETTINGS`].
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }
}

fn yes() -> bool {
    true
}

fn is_true(on: &bool) -> bool {
    *on
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_every_field() {
        let settings = WorkerSettings {
            threads: 3,
            http: HttpSettings {
                health_path: "/healthz".into(),
                ..HttpSettings::default()
            },
            ..WorkerSettings::default()
        };
        let back = WorkerSettings::from_json(&settings.to_json()).unwrap();
        assert_eq!(back, settings);
    }

    #[test]
    fn batch_scheduling_is_written_only_when_off() {
        let on = WorkerSettings::default();
        assert!(on.batch_scheduling);
        assert!(
            !on.to_json().contains("batch_scheduling"),
            "older workers read it"
        );
        let off = WorkerSettings {
            batch_scheduling: false,
            ..WorkerSettings::default()
        };
        assert_eq!(WorkerSettings::from_json(&off.to_json()).unwrap(), off);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = WorkerSettings::from_json(r#"{"threads":1,"bogus":2}"#).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }
}
