//! The metrics listener (`[metrics] address`): a small HTTP/1.1 server answering
//! `GET /metrics` in Prometheus' text exposition format (version 0.0.4), and the text
//! itself, rendered from the core's state ([`render`]).
//!
//! The listener is bound once, at start, and kept for the supervisor's life: a re-exec
//! hands its fd to the next image like the control socket's, so scrapes go on across a
//! self-upgrade (a connection waiting in its backlog meanwhile is answered by the next
//! image). Each scrape asks the event loop for the text ([`Event::Metrics`]), so what it
//! shows is one consistent view of the core.
//!
//! Counters are totals over the service's life: what exited workers last reported (kept
//! by the core, `core/totals.rs`) plus what live workers report now, so they never go
//! backwards across upgrades, worker restarts or re-execs. The text format is written here
//! rather than with a client library: every value is an aggregate of other processes'
//! reports, which a library's own counter types would have to be fed with anyway, and
//! this keeps to the classic format `promtool check metrics` reads.

use crate::config::Address;
use crate::core::{Core, GenerationState, SlotState, UPGRADE_BUCKETS, UpgradeKind};
use crate::events::Event;
use crate::handover::Build;
use baton_proto::metrics::{DURATION_BUCKETS, ROUTE_HEALTH, ROUTE_UNMATCHED};
use baton_proto::{RouteMetrics, WorkerMetrics};
use std::fmt::Write as _;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::{Semaphore, mpsc, oneshot};

/// The Content-Type of the classic text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A scrape connection that takes longer than this is closed.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// Scrape connections served at once; more wait in the backlog.
const MAX_CONNECTIONS: usize = 16;

/// The metrics listener.
#[derive(Debug)]
pub struct MetricsListener {
    listener: Listener,
    /// As configured, for messages and the handover.
    pub address: String,
}

#[derive(Debug)]
enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener),
}

impl MetricsListener {
    /// Binds `address` (a stale Unix socket file no one listens on is replaced).
    pub fn bind(address: &Address) -> std::io::Result<Self> {
        let listener = match address {
            Address::Tcp(addr) => {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
            }
            Address::Unix(path) => {
                if std::os::unix::net::UnixStream::connect(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
                let l = std::os::unix::net::UnixListener::bind(path)?;
                l.set_nonblocking(true)?;
                Listener::Unix(tokio::net::UnixListener::from_std(l)?)
            }
        };
        Ok(Self {
            listener,
            address: address.to_string(),
        })
    }

    /// The listener a previous image handed over.
    pub fn inherited(fd: OwnedFd, address: String) -> std::io::Result<Self> {
        let listener = if address.starts_with("unix:") {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            Listener::Unix(tokio::net::UnixListener::from_std(l)?)
        } else {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Listener::Tcp(tokio::net::TcpListener::from_std(l)?)
        };
        Ok(Self { listener, address })
    }

    /// A duplicate of the listening fd: what a re-exec hands over.
    pub fn handover(&self) -> std::io::Result<OwnedFd> {
        match &self.listener {
            Listener::Tcp(l) => l.as_fd().try_clone_to_owned(),
            Listener::Unix(l) => l.as_fd().try_clone_to_owned(),
        }
    }

    /// Serves scrapes until the process ends.
    pub async fn serve(self, events: mpsc::UnboundedSender<Event>) {
        tracing::info!("serving metrics on http://{}/metrics", self.address);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let permit = slots.clone().acquire_owned().await.expect("never closed");
            let events = events.clone();
            let accepted = match &self.listener {
                Listener::Tcp(l) => l.accept().await.map(|(s, _)| {
                    tokio::spawn(serve_connection(s, events, permit));
                }),
                Listener::Unix(l) => l.accept().await.map(|(s, _)| {
                    tokio::spawn(serve_connection(s, events, permit));
                }),
            };
            if let Err(e) = accepted {
                tracing::warn!("metrics listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Answers one request and closes the connection (`Connection: close`: a scraper connects
/// every interval anyway). A small HTTP/1.x responder of its own rather than hyper's
/// server: the supervisor's memory is mostly its text, and this is all it needs.
async fn serve_connection<S>(
    mut stream: S,
    events: mpsc::UnboundedSender<Event>,
    _permit: tokio::sync::OwnedSemaphorePermit,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(CONNECTION_TIMEOUT, async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n")
        {
            if head.len() > MAX_HEAD {
                return;
            }
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut words = line.split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        let reply = answer(method, target, &events).await;
        let body = if method == "HEAD" { "" } else { &reply.body };
        let allow = if reply.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let text = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n{body}",
            reply.status,
            reply.reason,
            reply.content_type,
            reply.body.len(),
        );
        let _ = stream.write_all(text.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

/// The largest request head read.
const MAX_HEAD: usize = 8192;

struct Reply {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
}

async fn answer(method: &str, target: &str, events: &mpsc::UnboundedSender<Event>) -> Reply {
    let text = "text/plain; charset=utf-8";
    let reply = |status, reason, content_type, body: &str| Reply {
        status,
        reason,
        content_type,
        body: body.to_owned(),
    };
    // origin-form, or absolute-form (`http://host/metrics`); the query is ignored.
    let path = match target.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => target,
    };
    let path = path.split('?').next().unwrap_or(path);
    if path != "/metrics" {
        return reply(404, "Not Found", text, "not found: try /metrics\n");
    }
    if method != "GET" && method != "HEAD" {
        return reply(405, "Method Not Allowed", text, "method not allowed\n");
    }
    let (tx, rx) = oneshot::channel();
    if events.send(Event::Metrics { reply: tx }).is_err() {
        return reply(503, "Service Unavailable", text, "stopping\n");
    }
    match rx.await {
        Ok(body) => Reply {
            status: 200,
            reason: "OK",
            content_type: CONTENT_TYPE,
            body,
        },
        Err(_) => reply(
            503,
            "Service Unavailable",
            text,
            "the supervisor is busy (upgrading itself?); try again\n",
        ),
    }
}

/// The supervisor image, for `baton_build_info` and friends.
#[derive(Debug)]
pub struct ImageInfo<'a> {
    pub build: &'a Build,
    pub reexecs: u64,
    pub service_started_at: SystemTime,
    /// The TLS certificates the serving generation serves.
    pub certificates: &'a [crate::tls::ListenerCertificates],
}

/// The text of one scrape.
pub fn render<A: Clone + std::fmt::Debug>(core: &Core<A>, image: &ImageInfo<'_>) -> String {
    let mut out = Text::default();
    let mut workers = core.worker_totals();
    // The host's own routes exist from the start, at 0 (plugin routes once requested).
    for route in [ROUTE_HEALTH, ROUTE_UNMATCHED] {
        workers.routes.entry(route.to_owned()).or_default();
    }
    requests(&mut out, &workers);
    connections(&mut out, core);
    generations(&mut out, core);
    upgrades(&mut out, core, image);
    processes(&mut out, core, image);
    certificates(&mut out, image.certificates, SystemTime::now());
    out.0
}

/// The serving generation's certificates: when each ends, and the days left.
fn certificates(out: &mut Text, served: &[crate::tls::ListenerCertificates], now: SystemTime) {
    if served.is_empty() {
        return;
    }
    for (name, help, left) in [
        (
            "baton_tls_certificate_not_after_timestamp_seconds",
            "When a served TLS certificate expires (Unix time).",
            false,
        ),
        (
            "baton_tls_certificate_expiry_remaining_seconds",
            "Seconds until a served TLS certificate expires (negative once it has).",
            true,
        ),
    ] {
        out.family(name, "gauge", help);
        for l in served {
            for c in &l.certificates {
                let value = if left {
                    (c.not_after - unix_seconds(now) as i64) as f64
                } else {
                    c.not_after as f64
                };
                out.sample_f64(
                    name,
                    &[
                        ("listener", &l.listener),
                        ("subject", &c.subject),
                        ("sha256", &c.sha256),
                    ],
                    value,
                );
            }
        }
    }
}

fn requests(out: &mut Text, w: &WorkerMetrics) {
    out.family(
        "baton_http_requests_total",
        "counter",
        "HTTP requests answered, by route (\"METHOD /pattern\", \"health\", \"unmatched\") and status class, over the service's life.",
    );
    for (route, m) in &w.routes {
        for (i, n) in m.classes.iter().enumerate() {
            let class = format!("{}xx", i + 1);
            out.sample(
                "baton_http_requests_total",
                &[("route", route), ("status_class", &class)],
                *n,
            );
        }
    }
    let mut all = RouteMetrics::default();
    for m in w.routes.values() {
        all.add(m);
    }
    out.family(
        "baton_http_request_duration_seconds",
        "histogram",
        "Time from a request's start to its response head, every route.",
    );
    out.histogram(
        "baton_http_request_duration_seconds",
        &[],
        &DURATION_BUCKETS,
        &all.buckets,
        all.sum_us as f64 / 1e6,
    );
    out.family(
        "baton_http_route_request_duration_seconds",
        "histogram",
        "Time from a request's start to its response head, by route.",
    );
    for (route, m) in &w.routes {
        out.histogram(
            "baton_http_route_request_duration_seconds",
            &[("route", route)],
            &DURATION_BUCKETS,
            &m.buckets,
            m.sum_us as f64 / 1e6,
        );
    }
    for (name, help, value) in [
        (
            "baton_http_received_bytes_total",
            "Bytes read from client connections (request heads and bodies, WebSocket frames).",
            w.bytes_in,
        ),
        (
            "baton_http_sent_bytes_total",
            "Bytes written to client connections (response heads and bodies, WebSocket frames).",
            w.bytes_out,
        ),
        (
            "baton_connections_accepted_total",
            "Client connections accepted by the workers.",
            w.accepted,
        ),
        (
            "baton_websockets_opened_total",
            "WebSocket connections opened.",
            w.websockets_opened,
        ),
        (
            "baton_websockets_closed_total",
            "WebSocket connections closed.",
            w.websockets_closed,
        ),
        (
            "baton_streams_opened_total",
            "Streamed (deferred) answers begun.",
            w.streams_opened,
        ),
        (
            "baton_streams_closed_total",
            "Streamed (deferred) answers ended.",
            w.streams_closed,
        ),
        (
            "baton_drain_connections_force_closed_total",
            "Connections still open when a drain was cut short (worker.drain_timeout, or a force-close under worker.max_generations), closed then.",
            w.force_closed,
        ),
        (
            "baton_access_log_dropped_lines_total",
            "Access log lines dropped because the writer could not keep up.",
            w.access_log_dropped,
        ),
        (
            "baton_tls_handshakes_total",
            "TLS handshakes completed.",
            w.tls_handshakes,
        ),
        (
            "baton_tls_handshake_failures_total",
            "TLS handshakes that failed or did not finish within listener.tls.handshake_timeout.",
            w.tls_handshake_failures,
        ),
    ] {
        out.family(name, "counter", help);
        out.sample(name, &[], value);
    }
}

fn connections<A: Clone + std::fmt::Debug>(out: &mut Text, core: &Core<A>) {
    let live =
        |f: fn(&crate::core::Generation<A>) -> u64| -> u64 { core.generations().map(f).sum() };
    for (name, help, value) in [
        (
            "baton_connections",
            "Client connections open now, as the live workers last reported.",
            live(|g| g.connections()),
        ),
        (
            "baton_connections_idle",
            "Of the open connections, idle keep-alive ones (HTTP/1 and HTTP/2) and quiet WebSockets waiting in the workers' idle sets.",
            live(|g| g.idle()),
        ),
        (
            "baton_websockets",
            "WebSocket connections open now.",
            live(|g| g.websockets()),
        ),
        (
            "baton_streams",
            "Streamed answers under way now.",
            live(|g| g.streams()),
        ),
    ] {
        out.family(name, "gauge", help);
        out.sample(name, &[], value);
    }
}

fn generations<A: Clone + std::fmt::Debug>(out: &mut Text, core: &Core<A>) {
    out.family("baton_generations", "gauge", "Generations alive, by state.");
    for state in [
        GenerationState::Starting,
        GenerationState::Canary,
        GenerationState::Serving,
        GenerationState::Draining,
        GenerationState::Failed,
    ] {
        let n = core.generations().filter(|g| g.state == state).count();
        out.sample("baton_generations", &[("state", state.name())], n as u64);
    }
    out.family(
        "baton_serving_generation",
        "gauge",
        "The number of the generation serving (0 while none does).",
    );
    let serving = core
        .generations()
        .find(|g| g.state == GenerationState::Serving)
        .map_or(0, |g| g.number);
    out.sample("baton_serving_generation", &[], serving);
    out.family(
        "baton_generation_info",
        "gauge",
        "1 for each live generation, with its state.",
    );
    for g in core.generations() {
        let n = g.number.to_string();
        out.sample(
            "baton_generation_info",
            &[("generation", &n), ("state", g.state.name())],
            1,
        );
    }
    type Of<A> = fn(&crate::core::Generation<A>) -> u64;
    let per_generation: [(&str, &str, &str, Of<A>); 5] = [
        (
            "baton_generation_requests_total",
            "counter",
            "Requests answered by a live generation's workers, exited ones included.",
            |g| g.requests(),
        ),
        (
            "baton_generation_server_errors_total",
            "counter",
            "5xx answers of a live generation's workers, exited ones included.",
            |g| g.errors(),
        ),
        (
            "baton_generation_connections",
            "gauge",
            "Client connections open now in a live generation.",
            |g| g.connections(),
        ),
        (
            "baton_generation_workers",
            "gauge",
            "Worker processes running in a live generation.",
            |g| g.pids().len() as u64,
        ),
        (
            "baton_generation_restarts_total",
            "counter",
            "Workers of a live generation replaced after they exited.",
            |g| g.restarts,
        ),
    ];
    for (name, kind, help, of) in per_generation {
        out.family(name, kind, help);
        for g in core.generations() {
            out.sample(name, &[("generation", &g.number.to_string())], of(g));
        }
    }
}

fn upgrades<A: Clone + std::fmt::Debug>(out: &mut Text, core: &Core<A>, image: &ImageInfo<'_>) {
    let t = core.totals();
    out.family(
        "baton_upgrades_total",
        "counter",
        "Upgrades (new generations asked for) by result: succeeded, refused (nothing started), rolled_back (the new generation failed to start), crash_loop_restored (it crash-looped after promotion and the previous artifacts serve again).",
    );
    for kind in UpgradeKind::ALL {
        let n = t.upgrades.get(kind.label()).copied().unwrap_or(0);
        out.sample("baton_upgrades_total", &[("result", kind.label())], n);
    }
    out.family(
        "baton_upgrade_duration_seconds",
        "histogram",
        "Time from an upgrade's request to its decision.",
    );
    out.histogram(
        "baton_upgrade_duration_seconds",
        &[],
        &UPGRADE_BUCKETS,
        &t.upgrade_seconds.buckets,
        t.upgrade_seconds.sum_seconds,
    );
    out.family(
        "baton_last_upgrade_duration_seconds",
        "gauge",
        "How long the last upgrade took (0 before the first).",
    );
    out.sample_f64(
        "baton_last_upgrade_duration_seconds",
        &[],
        t.last_upgrade_seconds.unwrap_or(0.0),
    );
    out.family(
        "baton_last_upgrade_successful",
        "gauge",
        "1 if the last upgrade succeeded (or none was asked for yet), 0 if it was refused or rolled back.",
    );
    out.sample(
        "baton_last_upgrade_successful",
        &[],
        u64::from(t.last_upgrade_successful.unwrap_or(true)),
    );
    out.family(
        "baton_last_upgrade_success_timestamp_seconds",
        "gauge",
        "When the last successful upgrade was decided, in seconds since the epoch (the service's start before the first).",
    );
    out.sample_f64(
        "baton_last_upgrade_success_timestamp_seconds",
        &[],
        unix_seconds(t.last_success.unwrap_or(image.service_started_at)),
    );
    out.family(
        "baton_worker_restarts_total",
        "counter",
        "Workers of serving generations that exited and were replaced.",
    );
    out.sample("baton_worker_restarts_total", &[], t.worker_restarts);
    out.family(
        "baton_drains_force_closed_total",
        "counter",
        "Draining generations force-closed to stay within worker.max_generations.",
    );
    out.sample(
        "baton_drains_force_closed_total",
        &[],
        t.drains_force_closed,
    );
    out.family(
        "baton_drains_timed_out_total",
        "counter",
        "Draining generations still running at worker.drain_timeout, whose workers were killed.",
    );
    out.sample("baton_drains_timed_out_total", &[], t.drains_timed_out);
    out.family(
        "baton_supervisor_upgrades_total",
        "counter",
        "Upgrades of the supervisor itself in place (re-exec), by result.",
    );
    for result in ["succeeded", "refused"] {
        let n = t.supervisor_upgrades.get(result).copied().unwrap_or(0);
        out.sample("baton_supervisor_upgrades_total", &[("result", result)], n);
    }
    out.family(
        "baton_build_info",
        "gauge",
        "1, with the running supervisor's release and binary hash as labels.",
    );
    out.sample(
        "baton_build_info",
        &[
            ("version", &image.build.version),
            ("sha256", &image.build.sha256),
        ],
        1,
    );
    out.family(
        "baton_supervisor_reexecs",
        "gauge",
        "Images of the supervisor before the running one (self-upgrades in place).",
    );
    out.sample("baton_supervisor_reexecs", &[], image.reexecs);
}

fn processes<A: Clone + std::fmt::Debug>(out: &mut Text, core: &Core<A>, image: &ImageInfo<'_>) {
    let me = std::process::id();
    let own = procfs::read(me);
    out.family(
        "process_cpu_seconds_total",
        "counter",
        "CPU time of the supervisor process (user and system), in seconds.",
    );
    out.sample_f64("process_cpu_seconds_total", &[], own.cpu_seconds);
    out.family(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory of the supervisor process.",
    );
    out.sample("process_resident_memory_bytes", &[], own.rss_bytes);
    out.family(
        "process_open_fds",
        "gauge",
        "Open file descriptors of the supervisor process.",
    );
    out.sample("process_open_fds", &[], own.open_fds);
    if let Some(max) = procfs::max_fds() {
        out.family(
            "process_max_fds",
            "gauge",
            "The supervisor's limit on open file descriptors.",
        );
        out.sample("process_max_fds", &[], max);
    }
    out.family(
        "process_start_time_seconds",
        "gauge",
        "When the supervisor process (the service) started, in seconds since the epoch.",
    );
    out.sample_f64(
        "process_start_time_seconds",
        &[],
        unix_seconds(image.service_started_at),
    );
    let mut workers = Vec::new();
    for g in core.generations() {
        for (slot, w) in g.workers.iter().enumerate() {
            if let SlotState::Running { pid, .. } = w.state {
                workers.push((g.number.to_string(), slot.to_string(), procfs::read(pid)));
            }
        }
    }
    type Of = fn(&procfs::Usage) -> f64;
    let families: [(&str, &str, &str, Of); 3] = [
        (
            "baton_worker_cpu_seconds_total",
            "counter",
            "CPU time of each live worker process (starts again when a slot's worker is replaced).",
            |u| u.cpu_seconds,
        ),
        (
            "baton_worker_resident_memory_bytes",
            "gauge",
            "Resident memory of each live worker process.",
            |u| u.rss_bytes as f64,
        ),
        (
            "baton_worker_open_fds",
            "gauge",
            "Open file descriptors of each live worker process.",
            |u| u.open_fds as f64,
        ),
    ];
    for (name, kind, help, of) in families {
        out.family(name, kind, help);
        for (generation, slot, usage) in &workers {
            out.sample_f64(
                name,
                &[("generation", generation), ("slot", slot)],
                of(usage),
            );
        }
    }
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The text being written.
#[derive(Default)]
struct Text(String);

impl Text {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn labels(&mut self, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        self.0.push('{');
        for (i, (k, v)) in labels.iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            self.0.push_str(k);
            self.0.push_str("=\"");
            for c in v.chars() {
                match c {
                    '\\' => self.0.push_str("\\\\"),
                    '"' => self.0.push_str("\\\""),
                    '\n' => self.0.push_str("\\n"),
                    c => self.0.push(c),
                }
            }
            self.0.push('"');
        }
        self.0.push('}');
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: u64) {
        self.0.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.0, " {value}");
    }

    fn sample_f64(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        self.labels(labels);
        if value.is_finite() {
            let _ = writeln!(self.0, " {value}");
        } else {
            let _ = writeln!(self.0, " NaN");
        }
    }

    /// `_bucket` (cumulative, `le` from `bounds`, then `+Inf`), `_sum` and `_count`;
    /// `counts` are per bucket, not cumulative, with the overflow last.
    fn histogram(
        &mut self,
        name: &str,
        labels: &[(&str, &str)],
        bounds: &[f64],
        counts: &[u64],
        sum: f64,
    ) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0;
        for (i, le) in bounds
            .iter()
            .map(|b| b.to_string())
            .chain(["+Inf".to_owned()])
            .enumerate()
        {
            cumulative += counts.get(i).copied().unwrap_or(0);
            let mut with = labels.to_vec();
            with.push(("le", &le));
            self.sample(&bucket, &with, cumulative);
        }
        self.sample_f64(&format!("{name}_sum"), labels, sum);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

/// A process's usage, from `/proc`.
mod procfs {
    /// Clock ticks per second in `/proc/PID/stat` (`USER_HZ`: 100 on every Linux ABI).
    const USER_HZ: f64 = 100.0;

    #[derive(Debug, Default)]
    pub struct Usage {
        pub cpu_seconds: f64,
        pub rss_bytes: u64,
        pub open_fds: u64,
    }

    pub fn read(pid: u32) -> Usage {
        let mut usage = Usage::default();
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            && let Some((_, rest)) = stat.rsplit_once(')')
        {
            // After "pid (comm)": state is field 3; utime and stime are 14 and 15.
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<u64>().ok());
            usage.cpu_seconds = (field(14).unwrap_or(0) + field(15).unwrap_or(0)) as f64 / USER_HZ;
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            usage.rss_bytes = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map_or(0, |kb| kb * 1024);
        }
        if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
            usage.open_fds = dir.count() as u64;
        }
        usage
    }

    /// This process's soft limit on open files.
    pub fn max_fds() -> Option<u64> {
        let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
        let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
        line["Max open files".len()..]
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }
}
