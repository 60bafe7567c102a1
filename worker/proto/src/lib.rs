//! The contract between the `baton` supervisor and a `baton-worker` process.
//!
//! A worker is started the way systemd starts a socket-activated `Type=notify` service:
//! listeners arrive as fds `3..3+LISTEN_FDS` named by `LISTEN_FDNAMES`, readiness and
//! status go as datagrams to `NOTIFY_SOCKET`, and `SIGTERM` means "drain". On top of that
//! the supervisor passes a few `BATON_*` variables, described by the constants below, and
//! the worker reports its counters in a `BATON_STATS=` notify field.
//!
//! This crate owns only data and parsing: it never touches a socket or a process.
#![forbid(unsafe_code)]

pub mod metrics;
pub mod notify;
pub mod settings;
pub mod tls;

pub use metrics::{RouteMetrics, WorkerMetrics};
pub use notify::{NotifyMessage, Stats, WorkerBuild};
pub use settings::{
    AccessLogFormat, AccessLogSettings, HttpSettings, PluginSpec, WebSocketSettings, WorkerSettings,
};

/// Environment variable: the generation number the worker belongs to (decimal).
pub const ENV_GENERATION: &str = "BATON_GENERATION";
/// Environment variable: the [`WorkerSettings`] as JSON.
pub const ENV_SETTINGS: &str = "BATON_WORKER_SETTINGS";
/// Environment variable: the fd number of the read end of the supervisor's lifeline pipe.
/// The pipe never carries data; end-of-file on it means the supervisor is gone.
pub const ENV_LIFELINE_FD: &str = "BATON_LIFELINE_FD";
/// The fd of the worker binary's own file, which the supervisor exec'd; the worker closes it.
pub const ENV_EXE_FD: &str = "BATON_EXE_FD";
/// Environment variable: the supervisor's pid. A worker started by the supervisor accepts
/// `LISTEN_FDS` without `LISTEN_PID` only when this equals its parent's pid (the supervisor
/// cannot know the worker's pid before `fork`, and setting the environment between `fork`
/// and `exec` is not async-signal-safe).
pub const ENV_SUPERVISOR_PID: &str = "BATON_SUPERVISOR_PID";
/// The version of the protocol between supervisor and worker (the environment variables
/// and notify keys of this crate). A supervisor tells its workers in
/// [`ENV_WORKER_PROTOCOL`]; a worker says which it speaks with `READY=1`
/// (`BATON_WORKER=<version> <protocol>`); a mismatch fails the worker's start with a
/// message rather than misbehaving. A worker that says nothing speaks protocol 1.
pub const WORKER_PROTOCOL: u32 = 1;
/// The oldest protocol this release still speaks with the other side (a newer release
/// raises [`WORKER_PROTOCOL`] and keeps this where it can still serve older peers).
pub const OLDEST_WORKER_PROTOCOL: u32 = 1;
/// Environment variable: the [`WORKER_PROTOCOL`] of the supervisor starting the worker.
pub const ENV_WORKER_PROTOCOL: &str = "BATON_WORKER_PROTOCOL";

/// Whether a peer speaking protocol `theirs` can work with this release: when the peer
/// is newer, it must be the one that still speaks ours (its own check says so); when it
/// is older, this release must still speak its protocol. The message says which side is
/// too old or too new.
pub fn check_worker_protocol(theirs: u32, peer: &str) -> Result<(), String> {
    if theirs > WORKER_PROTOCOL || theirs >= OLDEST_WORKER_PROTOCOL {
        return Ok(());
    }
    Err(format!(
        "the {peer} speaks worker protocol {theirs}, older than this release ({}) speaks (oldest {OLDEST_WORKER_PROTOCOL}, newest {WORKER_PROTOCOL})",
        env!("CARGO_PKG_VERSION")
    ))
}
/// The first fd systemd's protocol passes listeners at.
pub const LISTEN_FDS_START: i32 = 3;
