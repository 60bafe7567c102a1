//! The sd_notify datagram format, as workers send it to the supervisor.
//!
//! A datagram is newline-separated `KEY=VALUE` assignments (systemd's `sd_notify(3)`).
//! [`NotifyMessage::parse`] keeps the keys Baton acts on and ignores the rest, as systemd
//! does; it never fails on unknown keys, only on text that is not an assignment at all.

use thiserror::Error;

/// Counters a worker reports in `BATON_STATS=<open connections> <requests served>
/// <open WebSockets> <open streamed answers> <5xx answers> <idle connections>` (WebSockets
/// and streams since ABI 1.1, 5xx answers since the canary upgrades, idle connections since
/// the idle set; a worker that sends fewer numbers has none of those, and numbers after
/// these are a newer worker's, ignored).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Connections open right now.
    pub connections: u64,
    /// Requests answered since the worker started.
    pub requests: u64,
    /// WebSocket connections open right now.
    pub websockets: u64,
    /// Streamed (deferred) answers under way right now.
    pub streams: u64,
    /// Requests answered with a 5xx status since the worker started.
    #[serde(default)]
    pub errors: u64,
    /// Of the open connections, the idle keep-alive ones waiting in the worker's idle set
    /// (without a task of their own).
    #[serde(default)]
    pub idle: u64,
}

impl Stats {
    /// The `BATON_STATS=` line for these counters.
    pub fn to_line(self) -> String {
        format!(
            "BATON_STATS={} {} {} {} {} {}",
            self.connections, self.requests, self.websockets, self.streams, self.errors, self.idle
        )
    }
}

/// The parts of one notify datagram the supervisor acts on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotifyMessage {
    /// `READY=1`.
    pub ready: bool,
    /// `STOPPING=1`.
    pub stopping: bool,
    /// `STATUS=…`.
    pub status: Option<String>,
    /// `ERRNO=…`: the worker failed to start with this errno.
    pub errno: Option<i32>,
    /// `BATON_STATS=…`.
    pub stats: Option<Stats>,
    /// `BATON_WORKER=<version> <protocol>`, sent with `READY=1`: which release the worker
    /// is and which worker protocol it speaks (a worker that says nothing speaks 1).
    pub worker: Option<WorkerBuild>,
    /// `BATON_METRICS=<json>`: the worker's totals for the metrics
    /// ([`crate::metrics::WorkerMetrics`]).
    pub metrics: Option<crate::metrics::WorkerMetrics>,
}

/// A worker's release and protocol, as it reports them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WorkerBuild {
    /// The worker's release, e.g. `0.1.0`.
    pub version: String,
    /// The worker protocol it speaks ([`crate::WORKER_PROTOCOL`]).
    pub protocol: u32,
}

impl WorkerBuild {
    /// This build's `BATON_WORKER=` line.
    pub fn line() -> String {
        format!(
            "BATON_WORKER={} {}",
            env!("CARGO_PKG_VERSION"),
            crate::WORKER_PROTOCOL
        )
    }
}

/// Why a datagram could not be read as a notify message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    /// The datagram was not UTF-8.
    #[error("notify message is not UTF-8")]
    NotUtf8,
    /// A line had no `=`.
    #[error("notify line {0:?} is not KEY=VALUE")]
    NotAssignment(String),
    /// A value Baton interprets did not parse.
    #[error("notify field {key} has a bad value {value:?}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The offending value.
        value: String,
    },
}

impl NotifyMessage {
    /// Parses one datagram. Like systemd, a line that cannot be read is skipped, not the
    /// whole datagram; the skipped lines' errors are returned alongside.
    pub fn parse_lenient(bytes: &[u8]) -> (Self, Vec<ParseError>) {
        let mut msg = NotifyMessage::default();
        let mut errors = Vec::new();
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let Ok(line) = std::str::from_utf8(line) else {
                errors.push(ParseError::NotUtf8);
                continue;
            };
            if let Err(e) = msg.apply(line) {
                errors.push(e);
            }
        }
        (msg, errors)
    }

    /// Parses one datagram, failing on the first line that cannot be read.
    pub fn parse(bytes: &[u8]) -> Result<Self, ParseError> {
        let text = std::str::from_utf8(bytes).map_err(|_| ParseError::NotUtf8)?;
        let mut msg = NotifyMessage::default();
        for line in text.split('\n').filter(|l| !l.is_empty()) {
            msg.apply(line)?;
        }
        Ok(msg)
    }

    fn apply(&mut self, line: &str) -> Result<(), ParseError> {
        let msg = self;
        {
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| ParseError::NotAssignment(truncate(line)))?;
            match key {
                "READY" => msg.ready = value == "1",
                "STOPPING" => msg.stopping = value == "1",
                "STATUS" => msg.status = Some(value.to_owned()),
                "ERRNO" => {
                    let errno = value.parse().map_err(|_| ParseError::BadValue {
                        key: "ERRNO",
                        value: truncate(value),
                    })?;
                    msg.errno = Some(errno);
                }
                "BATON_STATS" => msg.stats = Some(parse_stats(value)?),
                "BATON_METRICS" => {
                    msg.metrics =
                        Some(
                            serde_json::from_str(value).map_err(|_| ParseError::BadValue {
                                key: "BATON_METRICS",
                                value: truncate(value),
                            })?,
                        );
                }
                "BATON_WORKER" => {
                    let bad = || ParseError::BadValue {
                        key: "BATON_WORKER",
                        value: truncate(value),
                    };
                    let (version, protocol) = value.split_once(' ').ok_or_else(bad)?;
                    msg.worker = Some(WorkerBuild {
                        version: version.to_owned(),
                        protocol: protocol.trim().parse().map_err(|_| bad())?,
                    });
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Whether the message reports a start-up failure (`ERRNO=` or `STATUS=failed…`).
    pub fn failure(&self) -> Option<String> {
        let status = self
            .status
            .as_deref()
            .filter(|s| s.starts_with("failed"))
            .map(str::to_owned);
        match (status, self.errno) {
            (Some(s), _) => Some(s),
            (None, Some(e)) => Some(format!("failed with errno {e}")),
            (None, None) => None,
        }
    }
}

#[cfg(test)]
mod worker_build_tests {
    use super::*;

    #[test]
    fn a_worker_says_its_release_and_protocol_with_ready() {
        let line = format!("READY=1\n{}", WorkerBuild::line());
        let (msg, errors) = NotifyMessage::parse_lenient(line.as_bytes());
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            msg.worker,
            Some(WorkerBuild {
                version: env!("CARGO_PKG_VERSION").into(),
                protocol: crate::WORKER_PROTOCOL
            })
        );
        let (msg, errors) = NotifyMessage::parse_lenient(b"READY=1\nBATON_WORKER=0.9 x");
        assert!(msg.ready && msg.worker.is_none() && errors.len() == 1);
    }

    #[test]
    fn only_a_protocol_older_than_this_release_speaks_is_refused() {
        assert!(crate::check_worker_protocol(crate::WORKER_PROTOCOL, "worker").is_ok());
        assert!(crate::check_worker_protocol(crate::WORKER_PROTOCOL + 1, "worker").is_ok());
        let e =
            crate::check_worker_protocol(crate::OLDEST_WORKER_PROTOCOL - 1, "worker").unwrap_err();
        assert!(e.contains("worker protocol 0, older than"), "{e}");
    }
}

fn parse_stats(value: &str) -> Result<Stats, ParseError> {
    let bad = || ParseError::BadValue {
        key: "BATON_STATS",
        value: truncate(value),
    };
    let numbers: Vec<u64> = value
        .split(' ')
        .map(|p| p.parse().map_err(|_| bad()))
        .collect::<Result<_, _>>()?;
    match numbers[..] {
        [connections, requests] => Ok(Stats {
            connections,
            requests,
            ..Stats::default()
        }),
        [connections, requests, websockets, streams] => Ok(Stats {
            connections,
            requests,
            websockets,
            streams,
            ..Stats::default()
        }),
        [connections, requests, websockets, streams, errors] => Ok(Stats {
            connections,
            requests,
            websockets,
            streams,
            errors,
            ..Stats::default()
        }),
        // More numbers: a newer worker's counters this supervisor does not know yet.
        [connections, requests, websockets, streams, errors, idle, ..] => Ok(Stats {
            connections,
            requests,
            websockets,
            streams,
            errors,
            idle,
        }),
        _ => Err(bad()),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_fields_baton_acts_on() {
        let m = NotifyMessage::parse(b"READY=1\nSTATUS=serving\nBATON_STATS=3 40\nX=y\n").unwrap();
        assert!(m.ready);
        assert_eq!(m.status.as_deref(), Some("serving"));
        assert_eq!(
            m.stats,
            Some(Stats {
                connections: 3,
                requests: 40,
                ..Stats::default()
            })
        );
        assert_eq!(m.failure(), None);
        // Since ABI 1.1, open WebSockets and streams follow.
        let m = NotifyMessage::parse(b"BATON_STATS=3 40 2 1").unwrap();
        assert_eq!(
            (m.stats.unwrap().websockets, m.stats.unwrap().streams),
            (2, 1)
        );
        assert!(NotifyMessage::parse(b"BATON_STATS=3 40 2").is_err());
    }

    #[test]
    fn start_up_failures_are_recognised() {
        let m = NotifyMessage::parse(b"STATUS=failed: plugin x.so: bad magic\nERRNO=22").unwrap();
        assert_eq!(
            m.failure().as_deref(),
            Some("failed: plugin x.so: bad magic")
        );
        let m = NotifyMessage::parse(b"ERRNO=2").unwrap();
        assert_eq!(m.failure().as_deref(), Some("failed with errno 2"));
    }

    #[test]
    fn rejects_what_is_not_an_assignment() {
        assert_eq!(
            NotifyMessage::parse(b"READY"),
            Err(ParseError::NotAssignment("READY".into()))
        );
        assert!(NotifyMessage::parse(b"ERRNO=x").is_err());
        assert!(NotifyMessage::parse(b"BATON_STATS=1").is_err());
        assert!(NotifyMessage::parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn lenient_parsing_keeps_the_good_lines() {
        let (m, errors) =
            NotifyMessage::parse_lenient(b"READY=1\ngarbage\nERRNO=x\n\xff\nSTATUS=ok");
        assert!(m.ready);
        assert_eq!(m.status.as_deref(), Some("ok"));
        assert_eq!(errors.len(), 3);
    }

    #[test]
    fn stats_line_round_trips() {
        let s = Stats {
            connections: 7,
            requests: 9,
            websockets: 3,
            streams: 2,
            errors: 1,
            idle: 4,
        };
        assert_eq!(
            NotifyMessage::parse(s.to_line().as_bytes()).unwrap().stats,
            Some(s)
        );
        // A newer worker's line with a counter more.
        let newer = format!("{} 11", s.to_line());
        assert_eq!(
            NotifyMessage::parse(newer.as_bytes()).unwrap().stats,
            Some(s)
        );
    }
}
