//! What reaches the supervisor's loop from outside: signals, the control socket, worker
//! notify messages, child exits, the plugin watcher and the watchdog tick. Below every
//! module that sends one (`watch`, `control`, `commands`) and the loop that receives them
//! (`supervisor`), so none of them depends on another.

use crate::core::{CanaryCall, Exit};
use crate::status::{StatusReport, UpgradeOutcome};
use baton_proto::NotifyMessage;
use std::os::fd::OwnedFd;
use tokio::sync::oneshot;

/// Where an upgrade's outcome goes: the waiting task, and (for a client of the control
/// socket) a duplicate of its connection, which a supervisor re-exec hands to the next
/// image so that the client gets its answer from there.
#[derive(Debug)]
pub struct UpgradeReply {
    pub tx: oneshot::Sender<UpgradeOutcome>,
    pub conn: Option<OwnedFd>,
}

impl UpgradeReply {
    pub fn new(tx: oneshot::Sender<UpgradeOutcome>) -> Self {
        Self { tx, conn: None }
    }
}

/// Everything the loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// Start the next generation from what is on disk now (and, when the baton binary on
    /// disk is not the one running, re-exec the supervisor first); with `supervisor`, only
    /// re-exec the supervisor.
    Upgrade {
        source: &'static str,
        reply: Option<UpgradeReply>,
        supervisor: bool,
    },
    /// Drain every generation and exit (`fast`: kill the workers instead).
    Stop {
        fast: bool,
        source: &'static str,
        reply: Option<oneshot::Sender<()>>,
    },
    Status {
        reply: oneshot::Sender<StatusReport>,
    },
    /// A scrape of the metrics listener: the exposition text.
    Metrics {
        reply: oneshot::Sender<String>,
    },
    /// Decide the running canary by hand (`baton upgrade --promote` / `--abort`).
    DecideCanary {
        decision: CanaryCall,
        reply: oneshot::Sender<UpgradeOutcome>,
    },
    /// A datagram from a worker, attributed by its credentials.
    Notify {
        pid: i32,
        message: NotifyMessage,
    },
    WorkerExited {
        generation: u64,
        exit: Exit,
    },
    /// `SIGUSR1`: every worker reopens its access log file (logrotate's convention).
    ReopenLogs,
    /// The plugin directory changed (with `plugins.watch`).
    PluginsChanged,
    WatchdogTick,
}
