//! A generation and its worker processes, as data.
//!
//! [`GenerationState`] is the lifecycle: `Starting` → `Serving` → `Draining` → gone, or
//! `Starting` → `Failed` → gone ("gone" = every worker reaped; the supervisor then drops
//! the generation). This module owns the per-worker task that holds the child process,
//! forwards its stderr and keeps the tail for failure reports; it never decides what a
//! generation does next (the supervisor loop does).

use crate::artifacts::WorkerBinary;
use crate::config::Config;
use crate::listeners::Listener;
use baton_proto::Stats;
use nix::sys::signal::Signal;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;

/// Lines of a worker's stderr kept for failure reports.
const STDERR_TAIL_LINES: usize = 12;
/// Longest stderr line kept in the tail.
const STDERR_LINE_MAX: usize = 400;
/// Longest stretch of a worker's stderr forwarded as one piece.
const STDERR_FORWARD_MAX: usize = 64 * 1024;
/// After a worker exits, how long to wait for the rest of its stderr.
const STDERR_EOF_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GenerationState {
    /// Workers started, not all READY yet.
    Starting,
    /// The one generation taking new connections.
    Serving,
    /// Told to drain (SIGTERM); waiting for its workers to exit.
    Draining,
    /// Rolled back; its workers were killed and are being reaped.
    Failed,
}

impl GenerationState {
    pub fn name(self) -> &'static str {
        match self {
            GenerationState::Starting => "starting",
            GenerationState::Serving => "serving",
            GenerationState::Draining => "draining",
            GenerationState::Failed => "failed",
        }
    }
}

/// One generation: one config, one worker binary, one listener set.
#[derive(Debug)]
pub struct Generation {
    pub number: u64,
    pub state: GenerationState,
    pub started_at: SystemTime,
    pub started: Instant,
    pub config: Arc<Config>,
    pub listeners: Vec<Arc<Listener>>,
    pub settings_json: String,
    pub plugins: Vec<crate::plugins::CachedPlugin>,
    /// The cached worker binary the workers exec.
    pub binary: WorkerBinary,
    pub workers: Vec<WorkerSlot>,
    pub restarts: u64,
    /// Requests served by workers of this generation that have exited.
    pub requests_of_exited: u64,
    pub failure: Option<String>,
    pub span: tracing::Span,
    /// When it began serving.
    pub promoted: Option<Instant>,
    /// When it was told to drain.
    pub draining_since: Option<Instant>,
    /// Worker exits while serving, within `crash_loop_window` of `promoted`.
    pub crashes_after_promotion: usize,
    /// What to start again if this generation crash-loops after promotion: the
    /// generation it replaced (never set for a generation that is itself a restore).
    pub previous: Option<Arc<Artifacts>>,
    /// This generation runs the exact artifacts of that generation, after a crash loop.
    pub restored: Option<Restored>,
}

/// Why a generation runs an older generation's artifacts.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Whose artifacts.
    pub from: u64,
    /// The generation that crash-looped.
    pub crashed: u64,
    pub reason: String,
}

/// Everything a generation was started from: enough to start it again exactly.
#[derive(Debug)]
pub struct Artifacts {
    pub number: u64,
    pub config: Arc<Config>,
    pub binary: WorkerBinary,
    pub plugins: Vec<crate::plugins::CachedPlugin>,
}

impl Artifacts {
    /// The cached files.
    pub fn files(&self) -> impl Iterator<Item = &std::path::Path> {
        cached_files(&self.binary, &self.plugins)
    }
}

/// One worker position in a generation; a crashed worker is replaced in its slot.
#[derive(Debug, Default)]
pub struct WorkerSlot {
    pub process: Option<WorkerProcess>,
    pub ready: bool,
    pub restarts: u64,
    /// Crashes in a row without a stable run between them; drives the back-off.
    pub crash_streak: u32,
    /// The worker's last `STATUS=`, for failure reports.
    pub status: Option<String>,
    /// When a restart is due, while waiting out the back-off.
    pub restart_at: Option<Instant>,
    pub stats: Stats,
    /// When the worker last reported `stats`.
    pub stats_at: Option<Instant>,
}

/// A running worker process.
#[derive(Debug)]
pub struct WorkerProcess {
    pub pid: u32,
    pub spawned: Instant,
    signals: mpsc::UnboundedSender<Signal>,
}

impl WorkerProcess {
    /// Sends `signal` to the process. The task that owns the child delivers it, and only
    /// while the child has not been reaped, so a recycled pid is never signalled.
    pub fn signal(&self, signal: Signal) {
        let _ = self.signals.send(signal);
    }
}

/// The cache files of a worker binary and a plugin set.
fn cached_files<'a>(
    binary: &'a WorkerBinary,
    plugins: &'a [crate::plugins::CachedPlugin],
) -> impl Iterator<Item = &'a std::path::Path> {
    std::iter::once(binary.cached()).chain(plugins.iter().map(|p| p.artifact.path()))
}

impl Generation {
    /// The cache files this generation runs.
    pub fn files(&self) -> impl Iterator<Item = &std::path::Path> {
        cached_files(&self.binary, &self.plugins)
    }

    pub fn artifacts(&self) -> Artifacts {
        Artifacts {
            number: self.number,
            config: self.config.clone(),
            binary: self.binary.clone(),
            plugins: self.plugins.clone(),
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.workers
            .iter()
            .filter_map(|w| w.process.as_ref().map(|p| p.pid))
            .collect()
    }

    pub fn all_ready(&self) -> bool {
        self.workers.iter().all(|w| w.ready)
    }

    /// No worker process is left to reap.
    pub fn is_empty(&self) -> bool {
        self.workers.iter().all(|w| w.process.is_none())
    }

    pub fn signal_all(&self, signal: Signal) {
        for p in self.workers.iter().filter_map(|w| w.process.as_ref()) {
            p.signal(signal);
        }
    }

    pub fn slot_of(&self, pid: u32) -> Option<usize> {
        self.workers
            .iter()
            .position(|w| w.process.as_ref().is_some_and(|p| p.pid == pid))
    }

    pub fn connections(&self) -> u64 {
        self.workers.iter().map(|w| w.stats.connections).sum()
    }

    pub fn requests(&self) -> u64 {
        self.requests_of_exited + self.workers.iter().map(|w| w.stats.requests).sum::<u64>()
    }
}

/// How a worker process ended.
#[derive(Debug, Clone)]
pub struct Exit {
    pub pid: u32,
    pub status: String,
    pub stderr_tail: Vec<String>,
}

impl Exit {
    /// "worker 12 exited (exit status: 3) WHEN", plus the stderr tail when there is one.
    pub fn describe(&self, when: &str) -> String {
        if self.stderr_tail.is_empty() {
            format!("worker {} exited ({}) {when}", self.pid, self.status)
        } else {
            format!(
                "worker {} exited ({}) {when}; stderr tail:\n{}",
                self.pid,
                self.status,
                self.stderr_tail.join("\n")
            )
        }
    }
}

/// Takes ownership of a spawned child: delivers signals to it, forwards its stderr, and
/// calls `on_exit` once it has been reaped.
pub fn watch(
    mut child: tokio::process::Child,
    span: tracing::Span,
    on_exit: impl FnOnce(Exit) + Send + 'static,
) -> WorkerProcess {
    let pid = child.id().expect("a child that was just spawned has a pid");
    let (tx, mut rx) = mpsc::unbounded_channel::<Signal>();
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let stderr = child.stderr.take();
    let forward = tokio::spawn(forward_stderr(stderr, tail.clone()));
    let task = async move {
        let status = loop {
            tokio::select! {
                biased;
                status = child.wait() => break status,
                Some(signal) = rx.recv() => {
                    // The child has not been reaped: `wait` above has not returned.
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
                }
            }
        };
        let _ = tokio::time::timeout(STDERR_EOF_WAIT, forward).await;
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("wait failed: {e}"),
        };
        let stderr_tail = tail.lock().expect("tail lock").drain(..).collect();
        on_exit(Exit {
            pid,
            status,
            stderr_tail,
        });
    };
    tokio::spawn(tracing::Instrument::instrument(task, span));
    WorkerProcess {
        pid,
        spawned: Instant::now(),
        signals: tx,
    }
}

/// Copies the worker's stderr to ours line by line (so its log lines reach the same
/// journal) and keeps the last lines.
async fn forward_stderr(
    stderr: Option<tokio::process::ChildStderr>,
    tail: Arc<Mutex<VecDeque<String>>>,
) {
    let Some(stderr) = stderr else { return };
    let mut reader = BufReader::new(stderr);
    let mut out = tokio::io::stderr();
    let mut line = Vec::new();
    loop {
        line.clear();
        // A line is cut at STDERR_FORWARD_MAX, so a worker writing without newlines
        // cannot grow the supervisor's memory.
        match (&mut reader)
            .take(STDERR_FORWARD_MAX as u64)
            .read_until(b'\n', &mut line)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let _ = out.write_all(&line).await;
        let text = strip_ansi(&String::from_utf8_lossy(&line));
        let text: String = text.trim_end().chars().take(STDERR_LINE_MAX).collect();
        if text.is_empty() {
            continue;
        }
        let mut tail = tail.lock().expect("tail lock");
        if tail.len() == STDERR_TAIL_LINES {
            tail.pop_front();
        }
        tail.push_back(text);
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::strip_ansi;

    #[test]
    fn colour_codes_are_removed_from_the_tail() {
        assert_eq!(strip_ansi("\u{1b}[31mERROR\u{1b}[0m boom"), "ERROR boom");
    }
}
