//! What a worker reports for the supervisor's metrics (`BATON_METRICS=` followed by
//! compact JSON, in the same datagram as `BATON_STATS=`): totals since the worker started,
//! never figures per interval, so that the supervisor can fold a worker that exits into
//! the service's totals and add what live workers report now.
//!
//! Every field has a default, so that a worker of an older or newer release that reports
//! fewer or more figures is still read.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Upper bounds (seconds) of the request duration histogram's buckets: a server answering
/// in microseconds to seconds. An overflow bucket (`+Inf`) follows.
pub const DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The bucket bounds of [`DURATION_BUCKETS`] in microseconds, for the request path.
pub const DURATION_BUCKETS_US: [u64; 16] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000,
];

/// The route label of requests to the health path.
pub const ROUTE_HEALTH: &str = "health";
/// The route label of requests no route took: 404, 405, and those refused before routing
/// (400, 413 by `Content-Length`, 431).
pub const ROUTE_UNMATCHED: &str = "unmatched";

/// One worker's totals since it started.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorkerMetrics {
    /// Per route label ("GET /hello/{name}", [`ROUTE_HEALTH`], [`ROUTE_UNMATCHED`]).
    #[serde(rename = "r")]
    pub routes: BTreeMap<String, RouteMetrics>,
    /// Connections accepted.
    #[serde(rename = "a")]
    pub accepted: u64,
    /// Request body bytes read, response body bytes written (see the README for what is
    /// counted).
    #[serde(rename = "bi")]
    pub bytes_in: u64,
    #[serde(rename = "bo")]
    pub bytes_out: u64,
    #[serde(rename = "wo")]
    pub websockets_opened: u64,
    #[serde(rename = "wc")]
    pub websockets_closed: u64,
    #[serde(rename = "so")]
    pub streams_opened: u64,
    #[serde(rename = "sc")]
    pub streams_closed: u64,
    /// Access log lines dropped because the writer could not keep up.
    #[serde(rename = "ld")]
    pub access_log_dropped: u64,
    /// Connections still open when a drain was cut short (`drain_timeout` or a
    /// force-close), closed then.
    #[serde(rename = "fc")]
    pub force_closed: u64,
    /// TLS handshakes completed, and those that failed (a bad or hostile client, a
    /// protocol or SNI the listener does not offer) or did not finish within
    /// `handshake_timeout`.
    #[serde(rename = "th")]
    pub tls_handshakes: u64,
    #[serde(rename = "tf")]
    pub tls_handshake_failures: u64,
}

/// One route's requests.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RouteMetrics {
    /// Requests answered with status 1xx, 2xx, 3xx, 4xx, 5xx.
    #[serde(rename = "c")]
    pub classes: [u64; 5],
    /// Requests per duration bucket ([`DURATION_BUCKETS`], then overflow), not cumulative.
    #[serde(rename = "b")]
    pub buckets: Vec<u64>,
    /// The sum of the durations, in microseconds.
    #[serde(rename = "s")]
    pub sum_us: u64,
}

impl RouteMetrics {
    /// Requests answered.
    pub fn requests(&self) -> u64 {
        self.classes.iter().sum()
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &RouteMetrics) {
        for (a, b) in self.classes.iter_mut().zip(other.classes) {
            *a += b;
        }
        if self.buckets.len() < other.buckets.len() {
            self.buckets.resize(other.buckets.len(), 0);
        }
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.sum_us += other.sum_us;
    }
}

impl WorkerMetrics {
    /// The `BATON_METRICS=` line for these totals.
    pub fn to_line(&self) -> String {
        format!(
            "BATON_METRICS={}",
            serde_json::to_string(self).expect("metrics serialise")
        )
    }

    /// Adds `other`'s totals to these (folding an exited worker, or summing workers).
    pub fn add(&mut self, other: &WorkerMetrics) {
        for (route, m) in &other.routes {
            self.routes.entry(route.clone()).or_default().add(m);
        }
        self.accepted += other.accepted;
        self.bytes_in += other.bytes_in;
        self.bytes_out += other.bytes_out;
        self.websockets_opened += other.websockets_opened;
        self.websockets_closed += other.websockets_closed;
        self.streams_opened += other.streams_opened;
        self.streams_closed += other.streams_closed;
        self.access_log_dropped += other.access_log_dropped;
        self.force_closed += other.force_closed;
        self.tls_handshakes += other.tls_handshakes;
        self.tls_handshake_failures += other.tls_handshake_failures;
    }

    /// Requests answered, over every route.
    pub fn requests(&self) -> u64 {
        self.routes.values().map(RouteMetrics::requests).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_round_trips_and_adds_up() {
        let mut m = WorkerMetrics::default();
        m.routes.insert(
            "GET /hello".into(),
            RouteMetrics {
                classes: [0, 3, 0, 1, 0],
                buckets: vec![2, 2],
                sum_us: 70,
            },
        );
        m.accepted = 2;
        let line = m.to_line();
        let parsed = crate::NotifyMessage::parse(line.as_bytes()).unwrap();
        assert_eq!(parsed.metrics.as_ref(), Some(&m));
        let mut total = m.clone();
        total.add(&m);
        assert_eq!(total.requests(), 8);
        assert_eq!(total.routes["GET /hello"].buckets, [4, 4]);
        assert_eq!(total.accepted, 4);
        // Unknown fields (a newer worker) are ignored.
        let newer = br#"BATON_METRICS={"a":5,"zz":[1]}"#;
        let parsed = crate::NotifyMessage::parse(newer).unwrap();
        assert_eq!(parsed.metrics.unwrap().accepted, 5);
    }
}
