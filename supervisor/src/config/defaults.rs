//! Every default of the config file, in one place. The parser takes each default it fills
//! in from the constants here, and [`KEYS`] lists every key the file may hold with its
//! default. README.md's table and examples/baton.toml are written by hand and held to
//! [`KEYS`] by the tests below: change a default here and they name the line to change
//! there. Nothing here reads the environment or the file system.

/// `listener.tls.min_version`: TLS 1.2 and 1.3.
pub const TLS_MIN_VERSION: &str = "1.2";
/// `listener.tls.alpn`: the protocols offered, in order of preference.
pub const TLS_ALPN: &[&str] = &["h2", "http/1.1"];
/// `listener.tls.handshake_timeout`: a TLS handshake must finish within this.
pub const TLS_HANDSHAKE_TIMEOUT: &str = "10s";
/// `listener.tls.session_tickets`: issue session tickets (resumption across upgrades).
pub const TLS_SESSION_TICKETS: bool = true;

/// `worker.path`: the worker binary, looked up next to the `baton` binary.
pub const WORKER_PATH: &str = "baton-worker";
/// `worker.processes`: worker processes per generation.
pub const PROCESSES: usize = 1;
/// `worker.threads`: runtime threads per worker; 0 is one per core.
pub const THREADS: usize = 0;
/// `worker.scheduling`: the workers' CPU scheduling policy, `SCHED_BATCH`.
pub const SCHEDULING: &str = "batch";
/// `worker.ready_timeout`: how long a new generation has to become ready.
pub const READY_TIMEOUT: &str = "10s";
/// `worker.drain_timeout`: how long a draining worker may take.
pub const DRAIN_TIMEOUT: &str = "30s";
/// `worker.drain_idle_grace`: how long an idle keep-alive connection stays open in a drain.
pub const DRAIN_IDLE_GRACE: &str = "1s";
/// `worker.drain_spread`: long-lived connections of a draining worker close over this.
pub const DRAIN_SPREAD: &str = "5s";
/// `worker.max_generations`: generations alive at once.
pub const MAX_GENERATIONS: usize = 4;
/// `worker.blocking_threads`: threads for plugins whose handlers may block.
pub const BLOCKING_THREADS: usize = 64;
/// `worker.crash_loop_window`: how soon after its promotion exits count as a crash loop.
pub const CRASH_LOOP_WINDOW: &str = "60s";
/// `worker.crash_loop_exits`: exits within the window that make a crash loop (0: never).
pub const CRASH_LOOP_EXITS: usize = 3;

/// `plugins.dir`: the plugin directory, next to the config file.
pub const PLUGIN_DIR: &str = "plugins.d";
/// `plugins.cache_dir` under systemd: this directory inside `$CACHE_DIRECTORY`.
pub const CACHE_SUBDIR: &str = "plugins";
/// `plugins.cache_dir` without `$CACHE_DIRECTORY`: this directory next to the config file.
pub const CACHE_DIR: &str = ".baton-cache";
/// `plugins.watch`: upgrade when the set of plugins changes.
pub const WATCH: bool = false;
/// `plugins.watch_debounce`: quiet time before a change counts.
pub const WATCH_DEBOUNCE: &str = "500ms";

/// `http.keepalive_timeout`: a connection with no request for this long is closed.
pub const KEEPALIVE_TIMEOUT: &str = "60s";
/// `http.header_read_timeout`: a request head must arrive whole within this.
pub const HEADER_READ_TIMEOUT: &str = "10s";
/// `http.max_header_bytes`: larger request heads get 431.
pub const MAX_HEADER_BYTES: u64 = 65_536;
/// `http.max_headers`: more header fields get 431.
pub const MAX_HEADERS: usize = 100;
/// `http.max_body_bytes`: larger request bodies get 413.
pub const MAX_BODY_BYTES: u64 = 1_048_576;
/// `http.max_connections`: connections per worker before it stops accepting.
pub const MAX_CONNECTIONS: usize = 10_000;
/// `http.health_path`: answered with the worker's generation and pid.
pub const HEALTH_PATH: &str = "/_baton/health";
/// `http.stream_buffer_bytes`: bytes one streamed answer or body buffers.
pub const STREAM_BUFFER_BYTES: u64 = 65_536;

/// `websocket.max_message_bytes`: larger messages close the connection (1009).
pub const WS_MAX_MESSAGE_BYTES: u64 = 1_048_576;
/// `websocket.send_queue_bytes`: a client letting more pile up is closed.
pub const WS_SEND_QUEUE_BYTES: u64 = 1_048_576;
/// `websocket.ping_interval`: an idle connection is pinged this often.
pub const WS_PING_INTERVAL: &str = "30s";
/// `websocket.ping_timeout`: an unanswered ping closes the connection after this.
pub const WS_PING_TIMEOUT: &str = "10s";
/// `websocket.slow_reader_close_code`: 1008 or 1011.
pub const WS_SLOW_READER_CLOSE_CODE: u64 = 1008;

/// `upgrade.canary`: how long a new generation serves beside the old one before it is
/// judged ("0s": no canary, the old generation drains as soon as the new one is ready).
pub const CANARY: &str = "0s";
/// `upgrade.canary_min_requests`: requests the canary must answer in its window to be judged.
pub const CANARY_MIN_REQUESTS: u64 = 100;
/// `upgrade.canary_max_error_ratio_increase`: how far (absolute) the canary's error ratio
/// may exceed the old generation's in the same window.
pub const CANARY_MAX_ERROR_RATIO_INCREASE: f64 = 0.01;

/// `control.socket`: in `$RUNTIME_DIRECTORY`, else in [`RUNTIME_DIR`] next to the config.
pub const CONTROL_SOCKET: &str = "baton.sock";
/// Outside systemd, the private directory (mode 0700) relative control sockets go in.
pub const RUNTIME_DIR: &str = ".baton-run";

/// `log.access`: the access log is off.
pub const ACCESS_LOG: &str = "off";
/// `log.access_format`: Apache's and nginx's combined format (plus duration, generation, pid).
pub const ACCESS_LOG_FORMAT: &str = "combined";

/// A key's default, as a reader of the config file sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DefaultValue {
    /// The key must be given (a listener may take its address from systemd instead).
    Required,
    /// Left out, the feature is off (workers run as the supervisor's user; a plugin gets
    /// no settings).
    Unset,
    /// What writing this integer would do.
    Int(u64),
    /// What writing this boolean would do.
    Bool(bool),
    /// What writing this number would do.
    Float(f64),
    /// What writing this string would do (a duration, a path, an HTTP path).
    Str(&'static str),
    /// What writing this list of strings would do.
    StrList(&'static [&'static str]),
    /// `$VAR/subdir` when systemd sets `VAR`, else `otherwise` next to the config file.
    FromEnv {
        var: &'static str,
        subdir: &'static str,
        otherwise: &'static str,
    },
}

/// Every key of the config file and its default, in the README's order. `listener.*` are
/// the keys of each `[[listener]]`; `plugins.settings.NAME` is the table for plugin NAME.
pub const KEYS: &[(&str, DefaultValue)] = {
    use DefaultValue::*;
    &[
        ("listener.name", Required),
        ("listener.address", Required),
        ("listener.tls.certificate.chain", Required),
        ("listener.tls.certificate.key", Required),
        ("listener.tls.min_version", Str(TLS_MIN_VERSION)),
        ("listener.tls.alpn", StrList(TLS_ALPN)),
        ("listener.tls.handshake_timeout", Str(TLS_HANDSHAKE_TIMEOUT)),
        ("listener.tls.session_tickets", Bool(TLS_SESSION_TICKETS)),
        ("worker.path", Str(WORKER_PATH)),
        ("worker.processes", Int(PROCESSES as u64)),
        ("worker.threads", Int(THREADS as u64)),
        ("worker.scheduling", Str(SCHEDULING)),
        ("worker.ready_timeout", Str(READY_TIMEOUT)),
        ("worker.drain_timeout", Str(DRAIN_TIMEOUT)),
        ("worker.drain_idle_grace", Str(DRAIN_IDLE_GRACE)),
        ("worker.drain_spread", Str(DRAIN_SPREAD)),
        ("worker.max_generations", Int(MAX_GENERATIONS as u64)),
        ("worker.user", Unset),
        ("worker.group", Unset),
        ("worker.blocking_threads", Int(BLOCKING_THREADS as u64)),
        ("worker.crash_loop_window", Str(CRASH_LOOP_WINDOW)),
        ("worker.crash_loop_exits", Int(CRASH_LOOP_EXITS as u64)),
        ("plugins.dir", Str(PLUGIN_DIR)),
        (
            "plugins.cache_dir",
            FromEnv {
                var: "CACHE_DIRECTORY",
                subdir: CACHE_SUBDIR,
                otherwise: CACHE_DIR,
            },
        ),
        ("plugins.watch", Bool(WATCH)),
        ("plugins.watch_debounce", Str(WATCH_DEBOUNCE)),
        ("plugins.settings.NAME", Unset),
        ("http.keepalive_timeout", Str(KEEPALIVE_TIMEOUT)),
        ("http.header_read_timeout", Str(HEADER_READ_TIMEOUT)),
        ("http.max_header_bytes", Int(MAX_HEADER_BYTES)),
        ("http.max_headers", Int(MAX_HEADERS as u64)),
        ("http.max_body_bytes", Int(MAX_BODY_BYTES)),
        ("http.max_connections", Int(MAX_CONNECTIONS as u64)),
        ("http.health_path", Str(HEALTH_PATH)),
        ("http.stream_buffer_bytes", Int(STREAM_BUFFER_BYTES)),
        ("websocket.max_message_bytes", Int(WS_MAX_MESSAGE_BYTES)),
        ("websocket.send_queue_bytes", Int(WS_SEND_QUEUE_BYTES)),
        ("websocket.ping_interval", Str(WS_PING_INTERVAL)),
        ("websocket.ping_timeout", Str(WS_PING_TIMEOUT)),
        (
            "websocket.slow_reader_close_code",
            Int(WS_SLOW_READER_CLOSE_CODE),
        ),
        ("upgrade.canary", Str(CANARY)),
        ("upgrade.canary_min_requests", Int(CANARY_MIN_REQUESTS)),
        (
            "upgrade.canary_max_error_ratio_increase",
            Float(CANARY_MAX_ERROR_RATIO_INCREASE),
        ),
        ("control.socket", Str(CONTROL_SOCKET)),
        ("metrics.address", Unset),
        ("log.access", Str(ACCESS_LOG)),
        ("log.access_format", Str(ACCESS_LOG_FORMAT)),
    ]
};

#[cfg(test)]
mod tests {
    //! The README's table and the example config agree with [`KEYS`], and [`KEYS`] with
    //! the parser: that it names every key the raw structs accept, and that writing every
    //! default out gives the same config as leaving them all out.

    use super::DefaultValue::*;
    use super::*;
    use crate::config::{Config, PathContext, sections};
    use std::collections::BTreeMap;
    use std::path::Path;

    const README: &str = include_str!("../../../README.md");
    const EXAMPLE: &str = include_str!("../../../examples/baton.toml");

    impl DefaultValue {
        /// As the README's table writes it.
        fn readme(self) -> String {
            match self {
                Required => "required".into(),
                Unset => "—".into(),
                Int(n) => n.to_string(),
                Bool(b) => b.to_string(),
                Float(f) => f.to_string(),
                Str(s) => format!("`{s:?}`"),
                StrList(list) => format!("`{list:?}`"),
                FromEnv {
                    var,
                    subdir,
                    otherwise,
                } => format!("`${var}/{subdir}`, else `{otherwise}` next to the config"),
            }
        }

        /// As a config file writes it, when one can (outside systemd, for `FromEnv`).
        fn toml(self) -> Option<toml::Value> {
            match self {
                Required | Unset => None,
                Int(n) => Some(toml::Value::Integer(n as i64)),
                Bool(b) => Some(toml::Value::Boolean(b)),
                Float(f) => Some(toml::Value::Float(f)),
                Str(s) | FromEnv { otherwise: s, .. } => Some(toml::Value::String(s.into())),
                StrList(list) => Some(toml::Value::Array(
                    list.iter()
                        .map(|s| toml::Value::String((*s).into()))
                        .collect(),
                )),
            }
        }
    }

    fn default_of(key: &str) -> DefaultValue {
        KEYS.iter()
            .find(|(k, _)| *k == key)
            .unwrap_or_else(|| panic!("{key} is not in defaults::KEYS"))
            .1
    }

    /// The README's table, key → its default cell, in the table's order.
    fn readme_defaults() -> Vec<(String, String)> {
        let mut rows = Vec::new();
        let table = README
            .lines()
            .skip_while(|l| *l != "| key | default | meaning |")
            .skip(2)
            .take_while(|l| l.starts_with('|'));
        for row in table {
            let cells: Vec<&str> = row.splitn(4, '|').map(str::trim).collect();
            let keys: Vec<String> = cells[1]
                .split(", ")
                .map(|k| k.trim_matches('`').replace("[[listener]] ", "listener."))
                .collect();
            // `a`, `b` | `x`, `y`: one default each; otherwise the cell is every key's.
            let parts: Vec<&str> = cells[2].split(", ").collect();
            for (i, key) in keys.iter().enumerate() {
                let cell = if keys.len() > 1 && parts.len() == keys.len() {
                    parts[i]
                } else {
                    cells[2]
                };
                rows.push((key.clone(), cell.to_owned()));
            }
        }
        rows
    }

    #[test]
    fn the_readme_table_lists_every_key_with_its_default() {
        let rows = readme_defaults();
        let listed: Vec<&str> = rows.iter().map(|(k, _)| k.as_str()).collect();
        let keys: Vec<&str> = KEYS.iter().map(|(k, _)| *k).collect();
        assert_eq!(listed, keys, "README.md's config table and defaults::KEYS");
        for (key, cell) in &rows {
            let default = default_of(key);
            let agrees = match default {
                Required => cell.starts_with("required"),
                _ => *cell == default.readme(),
            };
            assert!(
                agrees,
                "README.md says the default of {key} is {cell}; the code says {}",
                default.readme()
            );
        }
    }

    /// The example's keys (as [`KEYS`] names them), each with its value and the comment on
    /// its line.
    fn example_keys() -> BTreeMap<String, (toml::Value, String)> {
        let table: toml::Table = EXAMPLE.parse().expect("examples/baton.toml is TOML");
        let mut keys = BTreeMap::new();
        let mut add = |key: String, value: &toml::Value| {
            let comment = comment_of(&key);
            keys.insert(key, (value.clone(), comment));
        };
        for (section, body) in &table {
            let entries: Vec<&toml::Table> = match body {
                toml::Value::Array(listeners) => {
                    listeners.iter().flat_map(|l| l.as_table()).collect()
                }
                toml::Value::Table(t) => vec![t],
                other => panic!("examples/baton.toml: {section} = {other} outside a table"),
            };
            for entry in entries {
                for (name, value) in entry {
                    if section == "plugins" && name == "settings" {
                        add("plugins.settings.NAME".into(), value);
                    } else {
                        add(format!("{section}.{name}"), value);
                    }
                }
            }
        }
        keys
    }

    /// The keys the example writes in comments (`# key = value`) under a commented-out
    /// `# [section]` header: the TLS listener, which needs certificate files a fresh clone
    /// does not have.
    fn example_commented_keys() -> BTreeMap<String, toml::Value> {
        let mut keys = BTreeMap::new();
        let mut current = String::new();
        for line in EXAMPLE.lines().map(str::trim) {
            let Some(line) = line.strip_prefix("# ") else {
                if !line.starts_with('#') {
                    current.clear();
                }
                continue;
            };
            let head = line.split(" #").next().unwrap_or(line).trim();
            if head.starts_with('[') && head.ends_with(']') {
                current = head.trim_matches(|c| c == '[' || c == ']').to_owned();
            } else if !current.is_empty()
                && let Ok(table) = line.parse::<toml::Table>()
            {
                for (name, value) in table {
                    keys.insert(format!("{current}.{name}"), value);
                }
            }
        }
        keys
    }

    /// The comment on the line that sets `key` in the example (the first such line).
    fn comment_of(key: &str) -> String {
        let (section, name) = key.split_once('.').unwrap();
        let mut current = "";
        for line in EXAMPLE.lines().map(str::trim) {
            if line.starts_with('[') {
                current = line.trim_matches(|c| c == '[' || c == ']');
            } else if current == section
                && line
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            {
                return line.split_once("# ").map_or("", |(_, c)| c).to_owned();
            }
        }
        String::new()
    }

    #[test]
    fn the_example_config_writes_every_default() {
        let example = example_keys();
        for key in example.keys() {
            default_of(key);
        }
        for &(key, default) in KEYS {
            let Some(want) = default.toml() else {
                continue;
            };
            if key.starts_with("listener.tls.") {
                // The TLS listener is commented out: it needs certificate files.
                assert_eq!(
                    example_commented_keys().get(key),
                    Some(&want),
                    "examples/baton.toml's commented-out TLS listener and {key}'s default"
                );
                continue;
            }
            let Some((value, comment)) = example.get(key) else {
                panic!("examples/baton.toml lacks {key} (default {want})");
            };
            // A value other than the default says so: `processes = 2  # default 1`.
            assert!(
                *value == want || comment.starts_with(&format!("default {want}")),
                "examples/baton.toml sets {key} = {value}; the code's default is {want} \
                 (write it, or say `# default {want}` on its line)"
            );
        }
    }

    #[test]
    fn keys_name_every_key_the_parser_accepts() {
        let mut accepted = Vec::new();
        for (section, fields) in sections::field_names() {
            for field in fields {
                // Tables of their own, whose keys are listed under their names.
                if [("listener", "tls"), ("listener.tls", "certificate")]
                    .contains(&(section, field))
                {
                    continue;
                }
                accepted.push(match (section, field) {
                    ("plugins", "settings") => "plugins.settings.NAME".to_owned(),
                    _ => format!("{section}.{field}"),
                });
            }
        }
        accepted.sort();
        let mut keys: Vec<String> = KEYS.iter().map(|(k, _)| (*k).to_owned()).collect();
        keys.sort();
        assert_eq!(accepted, keys);
    }

    #[test]
    fn writing_every_default_changes_nothing() {
        let ctx = PathContext {
            exe_dir: "/opt/baton/bin".into(),
            runtime_dir: None,
            cache_dir: None,
        };
        let path = Path::new("/etc/baton/baton.toml");
        let listener = "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n";
        let mut written = listener.to_owned();
        let mut section = "";
        for &(key, default) in KEYS {
            let (table, name) = key.split_once('.').unwrap();
            let Some(value) = default.toml() else {
                continue;
            };
            if table == "listener" {
                // A listener's (TLS) keys: see the_tls_defaults_are_the_parsers.
                continue;
            }
            if table != section {
                written.push_str(&format!("[{table}]\n"));
                section = table;
            }
            written.push_str(&format!("{name} = {value}\n"));
        }
        let explicit = Config::parse(&written, path, &ctx).expect(&written);
        let mut implied = Config::parse(listener, path, &ctx).unwrap();
        // The one difference that is meant: a plugin directory that was written must exist.
        assert!(explicit.plugins.dir_explicit && !implied.plugins.dir_explicit);
        implied.plugins.dir_explicit = true;
        implied.text = explicit.text.clone();
        assert_eq!(explicit, implied, "{written}");
    }

    #[test]
    fn workers_without_settings_use_the_same_defaults() {
        let ctx = PathContext {
            exe_dir: "/opt/baton/bin".into(),
            runtime_dir: None,
            cache_dir: None,
        };
        let listener = "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:8080\"\n";
        let config = Config::parse(listener, Path::new("/etc/baton/baton.toml"), &ctx).unwrap();
        assert_eq!(
            config.worker_settings(Vec::new()),
            baton_proto::WorkerSettings::default(),
            "baton-proto's WorkerSettings::default (a worker started without settings) \
             and the config's defaults"
        );
    }
}
