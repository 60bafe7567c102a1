//! The worker's counters for the supervisor's metrics: requests by route and status class,
//! their duration histogram, bytes read and written, connections accepted, WebSockets and
//! streamed answers opened and closed (durations and bytes only with `[metrics]` on: they
//! cost a clock read per request and a counter per read and write). They are totals since the worker started, kept
//! per runtime thread (each thread bumps its own shard with relaxed atomics, never a line
//! another thread writes) and summed when read: at most once a second for the report to
//! the supervisor, and once at exit. [`Metrics::snapshot`] turns them into the
//! [`WorkerMetrics`] the worker sends as `BATON_METRICS=`.
//!
//! It holds counters only; it never reads a socket, a clock of its own or the router.

use crate::router::Router;
use baton_proto::metrics::{DURATION_BUCKETS_US, ROUTE_HEALTH, ROUTE_UNMATCHED};
use baton_proto::{RouteMetrics, WorkerMetrics};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// A route as the counters know it: an index into [`Metrics::labels`].
pub(crate) type RouteId = usize;
/// Requests to the health path.
pub(crate) const HEALTH: RouteId = 0;
/// Requests no route took (404, 405) or refused before routing (400, 413, 431).
pub(crate) const UNMATCHED: RouteId = 1;

/// Counters that are not per route, at the start of each shard.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Global {
    Accepted = 0,
    BytesIn,
    BytesOut,
    WebSocketsOpened,
    WebSocketsClosed,
    StreamsOpened,
    StreamsClosed,
    /// Connections still open when the drain was cut short (`drain_timeout`, `SIGQUIT`).
    ForceClosed,
    /// TLS handshakes completed, and failed or timed out.
    TlsHandshakes,
    TlsHandshakeFailures,
}
const GLOBALS: usize = 10;

/// Per route: five status classes, the duration buckets and overflow, the duration sum.
const CLASSES: usize = 5;
const BUCKETS: usize = DURATION_BUCKETS_US.len() + 1;
const STRIDE: usize = CLASSES + BUCKETS + 1;
/// Shards: threads beyond this many share one (still correct, a little slower).
const SHARDS: usize = 16;
/// Cells of padding after each shard's counters, so two shards never share a cache line.
const PAD: usize = 16;

/// When a request began (with `[metrics]` or the access log on), which route took it,
/// and the start of its access log line: what is counted when it is answered.
#[derive(Debug)]
pub(crate) struct Mark {
    pub(crate) started: Option<Instant>,
    pub(crate) route: RouteId,
    pub(crate) log: Option<crate::access_log::Pending>,
}

impl Mark {
    pub(crate) fn new(timed: bool, route: RouteId) -> Self {
        Mark {
            started: timed.then(Instant::now),
            route,
            log: None,
        }
    }

    pub(crate) fn to(self, route: RouteId) -> Self {
        Mark { route, ..self }
    }
}

#[derive(Debug)]
pub(crate) struct Metrics {
    /// Durations and bytes are counted (`[metrics]` is on); without, only what the stats
    /// report (requests and 5xx answers, connections accepted, WebSockets, streams).
    detailed: bool,
    /// Route labels: health, unmatched, then every plugin's routes in order.
    labels: Vec<String>,
    /// Per plugin (same index as the router's): its first route's id.
    first_route: Vec<RouteId>,
    shards: Box<[Box<[AtomicU64]>]>,
}

impl Metrics {
    pub(crate) fn new(router: &Router, detailed: bool) -> Self {
        let mut labels = vec![ROUTE_HEALTH.to_owned(), ROUTE_UNMATCHED.to_owned()];
        let mut first_route = Vec::with_capacity(router.plugins.len());
        for plugin in &router.plugins {
            first_route.push(labels.len());
            labels.extend(Router::describe(plugin));
        }
        let cells = GLOBALS + labels.len() * STRIDE + PAD;
        let shards = (0..SHARDS)
            .map(|_| (0..cells).map(|_| AtomicU64::new(0)).collect())
            .collect();
        Metrics {
            detailed,
            labels,
            first_route,
            shards,
        }
    }

    /// The id of route `route` of plugin `plugin` (the router's indices).
    pub(crate) fn route_id(&self, plugin: usize, route: u32) -> RouteId {
        self.first_route[plugin] + route as usize
    }

    fn shard(&self) -> &[AtomicU64] {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
        }
        &self.shards[SHARD.with(|s| *s)]
    }

    /// Whether request durations are counted.
    pub(crate) fn detailed(&self) -> bool {
        self.detailed
    }

    /// Counts one answered request: its status class and how long it took to its head.
    pub(crate) fn request(&self, route: RouteId, status: u16, took: Option<std::time::Duration>) {
        let class = usize::from(status / 100).clamp(1, CLASSES) - 1;
        let base = GLOBALS + route * STRIDE;
        let shard = self.shard();
        shard[base + class].fetch_add(1, Ordering::Relaxed);
        if let Some(took) = took.filter(|_| self.detailed) {
            let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
            let bucket = DURATION_BUCKETS_US.partition_point(|&le| le < micros);
            shard[base + CLASSES + bucket].fetch_add(1, Ordering::Relaxed);
            shard[base + CLASSES + BUCKETS].fetch_add(micros, Ordering::Relaxed);
        }
    }

    pub(crate) fn add(&self, counter: Global, n: u64) {
        self.shard()[counter as usize].fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes read or written on a client connection, counted with `[metrics]` on.
    pub(crate) fn bytes(&self, counter: Global, n: usize) {
        if self.detailed {
            self.add(counter, n as u64);
        }
    }

    fn sum(&self, cell: usize) -> u64 {
        self.shards
            .iter()
            .map(|s| s[cell].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// Requests answered, and those answered with a 5xx status.
    pub(crate) fn requests_and_errors(&self) -> (u64, u64) {
        let (mut requests, mut errors) = (0, 0);
        for route in 0..self.labels.len() {
            let base = GLOBALS + route * STRIDE;
            for class in 0..CLASSES {
                let n = self.sum(base + class);
                requests += n;
                if class == CLASSES - 1 {
                    errors += n;
                }
            }
        }
        (requests, errors)
    }

    /// The totals, for `BATON_METRICS=`; routes without a request are left out.
    pub(crate) fn snapshot(&self) -> WorkerMetrics {
        let global = |g: Global| self.sum(g as usize);
        let mut routes = std::collections::BTreeMap::new();
        for (route, label) in self.labels.iter().enumerate() {
            let base = GLOBALS + route * STRIDE;
            let mut m = RouteMetrics {
                classes: [0; CLASSES],
                buckets: (0..BUCKETS).map(|b| self.sum(base + CLASSES + b)).collect(),
                sum_us: self.sum(base + CLASSES + BUCKETS),
            };
            for (class, n) in m.classes.iter_mut().enumerate() {
                *n = self.sum(base + class);
            }
            if m.requests() > 0 || m.buckets.iter().any(|&n| n > 0) {
                routes
                    .entry(label.clone())
                    .or_insert_with(RouteMetrics::default)
                    .add(&m);
            }
        }
        WorkerMetrics {
            routes,
            accepted: global(Global::Accepted),
            bytes_in: global(Global::BytesIn),
            bytes_out: global(Global::BytesOut),
            websockets_opened: global(Global::WebSocketsOpened),
            websockets_closed: global(Global::WebSocketsClosed),
            streams_opened: global(Global::StreamsOpened),
            streams_closed: global(Global::StreamsClosed),
            access_log_dropped: 0,
            force_closed: global(Global::ForceClosed),
            tls_handshakes: global(Global::TlsHandshakes),
            tls_handshake_failures: global(Global::TlsHandshakeFailures),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn requests_land_in_their_route_class_and_bucket() {
        let router = Router::build(Vec::new(), "/_baton/health").unwrap();
        let m = Metrics::new(&router, true);
        let fast = Some(Duration::from_micros(50));
        m.request(HEALTH, 200, fast);
        m.request(UNMATCHED, 404, fast);
        m.request(UNMATCHED, 503, Some(Duration::from_millis(30)));
        m.add(Global::Accepted, 2);
        let s = m.snapshot();
        assert_eq!(s.routes["health"].classes, [0, 1, 0, 0, 0]);
        assert_eq!(s.routes["unmatched"].classes, [0, 0, 0, 1, 1]);
        // 30 ms: the 50 ms bucket (index 8).
        assert_eq!(s.routes["unmatched"].buckets[8], 1);
        assert!(s.routes["unmatched"].sum_us >= 30_000);
        assert_eq!(s.routes["health"].buckets.len(), 17);
        assert_eq!(s.accepted, 2);
        assert_eq!(m.requests_and_errors(), (3, 1));
        // From other threads too.
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| m.request(HEALTH, 204, fast));
            }
        });
        assert_eq!(m.snapshot().routes["health"].classes[1], 5);
        // Off: requests are counted for the stats, without the clock.
        let off = Metrics::new(&router, false);
        off.request(HEALTH, 500, fast);
        off.bytes(Global::BytesOut, 10);
        assert_eq!(off.requests_and_errors(), (1, 1));
        assert_eq!(off.snapshot().bytes_out, 0);
    }
}
