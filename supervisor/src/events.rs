//! What reaches the supervisor's loop from outside: signals, the control socket, worker
//! notify messages, child exits, the plugin watcher and the watchdog tick. Below every
//! module that sends one (`watch`, `control`, `commands`) and the loop that receives them
//! (`supervisor`), so none of them depends on another.

use crate::core::Exit;
use crate::status::{StatusReport, UpgradeOutcome};
use baton_proto::NotifyMessage;
use tokio::sync::oneshot;

/// Everything the loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// Start the next generation from what is on disk now.
    Upgrade {
        source: &'static str,
        reply: Option<oneshot::Sender<UpgradeOutcome>>,
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
    /// A datagram from a worker, attributed by its credentials.
    Notify {
        pid: i32,
        message: NotifyMessage,
    },
    WorkerExited {
        generation: u64,
        exit: Exit,
    },
    /// The plugin directory changed (with `plugins.watch`).
    PluginsChanged,
    WatchdogTick,
}
