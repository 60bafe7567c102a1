//! What every connection of a worker shares: its settings, router, counters and limits
//! ([`Shared`]), built once per worker, and the guard that counts plugin handler calls.
//!
//! It sits below every module that serves ([`crate::serve`], [`crate::connection`],
//! [`crate::handle`]) and imports none of them. It holds state; it never accepts, reads a
//! socket or answers a request.

use crate::access_log::AccessLog;
use crate::drain::Connections;
use crate::idle::IdleSet;
use crate::metrics::Metrics;
use crate::router::Router;
use baton_proto::{Stats, WorkerSettings};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use tokio::sync::Semaphore;

pub(crate) struct Shared {
    pub(crate) generation: u64,
    pub(crate) pid: u32,
    pub(crate) settings: WorkerSettings,
    /// Requests by route and status class, their durations, bytes, connections accepted:
    /// per-thread counters, summed when reported.
    pub(crate) metrics: Metrics,
    pub(crate) connections: Arc<Connections>,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) http1: http1::Builder,
    pub(crate) http2: http2::Builder<TokioExecutor>,
    /// HTTP/2 on a socket that can wait idle ([`crate::h2_idle`]): asks clients for a
    /// header table of 0 bytes, so that the connection can leave h2 between requests.
    pub(crate) http2_idle: http2::Builder<TokioExecutor>,
    pub(crate) router: Router,
    /// Per plugin (same index as `router.plugins`): the share of the blocking pool of a
    /// plugin whose handlers may block, so that a saturated one cannot starve the others.
    pub(crate) blocking: Vec<Option<Arc<Semaphore>>>,
    /// Blocking plugin handler calls under way.
    pub(crate) plugin_calls: Arc<AtomicUsize>,
    /// The drain began: HTTP/1 responses carry `Connection: close`.
    pub(crate) closing: AtomicBool,
    /// When it began: long-lived connections are closed spread out from then.
    pub(crate) closing_at: std::sync::OnceLock<tokio::time::Instant>,
    /// WebSocket connections open right now.
    pub(crate) websockets: AtomicU64,
    /// Streamed (deferred) answers under way right now.
    pub(crate) streams: AtomicU64,
    /// HTTP/1 connections that went idle outside hyper, and WebSockets that went quiet
    /// outside tungstenite (freeing their buffers), since the allocator was last trimmed.
    pub(crate) parked: AtomicU64,
    /// Idle HTTP/1 connections and quiet WebSockets, waiting without a task of their own.
    pub(crate) idle: IdleSet,
    /// The access log, when `[log] access` is on.
    pub(crate) access_log: Option<Arc<AccessLog>>,
}

impl Shared {
    /// The drain begins: from now on HTTP/1 responses close their connections.
    pub(crate) fn begin_closing(&self) {
        self.closing_at.get_or_init(tokio::time::Instant::now);
        self.closing.store(true, Ordering::Relaxed);
    }

    /// What every connection of a worker shares, for `router` and `settings`.
    pub(crate) fn new(
        generation: u64,
        settings: WorkerSettings,
        router: Router,
        access_log: Option<Arc<AccessLog>>,
    ) -> Self {
        let blocking_plugins = router.plugins.iter().filter(|p| !p.nonblocking).count();
        let share = (settings.blocking_threads / blocking_plugins.max(1)).max(1);
        let blocking = router
            .plugins
            .iter()
            .map(|p| (!p.nonblocking).then(|| Arc::new(Semaphore::new(share))))
            .collect();
        let metrics = Metrics::new(&router, settings.metrics);
        Shared {
            access_log,
            router,
            blocking,
            plugin_calls: Arc::new(AtomicUsize::new(0)),
            closing: AtomicBool::new(false),
            closing_at: std::sync::OnceLock::new(),
            websockets: AtomicU64::new(0),
            streams: AtomicU64::new(0),
            parked: AtomicU64::new(0),
            idle: IdleSet::new(),
            generation,
            pid: std::process::id(),
            http1: http1_builder(&settings),
            http2: http2_builder(&settings, None),
            http2_idle: http2_builder(&settings, Some(0)),
            slots: Arc::new(Semaphore::new(settings.http.max_connections.max(1))),
            settings,
            metrics,
            connections: Arc::new(Connections::default()),
        }
    }

    /// The metrics' totals, for `BATON_METRICS=`.
    pub(crate) fn metrics_snapshot(&self) -> baton_proto::WorkerMetrics {
        let mut m = self.metrics.snapshot();
        m.access_log_dropped = self.access_log.as_ref().map_or(0, |l| l.dropped());
        m
    }

    /// The counters reported to the supervisor.
    pub(crate) fn stats(&self) -> Stats {
        let (requests, errors) = self.metrics.requests_and_errors();
        Stats {
            connections: self.connections.count(),
            requests,
            websockets: self.websockets.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
            errors,
            idle: self.idle.held() as u64,
        }
    }
}

fn http1_builder(settings: &WorkerSettings) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Off: hyper's timer runs from the end of one request to the next head as well, so
        // idle keep-alive connections would close at header_read_timeout. `ConnClock`
        // keeps both deadlines.
        .header_read_timeout(None)
        .max_buf_size(settings.http.max_header_bytes.max(8192));
    // Hyper's default is the same limit with the parser's buffer inline; set, the buffer
    // is sized per request (on the heap above 100), so only a different limit is set.
    if settings.http.max_headers != HYPER_MAX_HEADERS {
        builder.max_headers(settings.http.max_headers);
    }
    builder
}

/// Hyper's limit on HTTP/1 request header fields when none is set.
const HYPER_MAX_HEADERS: usize = 100;

/// `header_table`: the HPACK table the client may keep (h2's default, 4,096 bytes, if
/// none).
fn http2_builder(
    settings: &WorkerSettings,
    header_table: Option<u32>,
) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .header_table_size(header_table)
        // Hyper's default, stated: an idle connection's next h2 connection must open the
        // same window (crate::h2_idle).
        .initial_connection_window_size(crate::h2_idle::CONN_WINDOW)
        .max_header_list_size(u32::try_from(settings.http.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Counts one plugin handler call for as long as it runs.
pub(crate) struct CallGuard(Arc<AtomicUsize>);

impl CallGuard {
    pub(crate) fn new(calls: &Arc<AtomicUsize>) -> Self {
        calls.fetch_add(1, Ordering::AcqRel);
        CallGuard(calls.clone())
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
