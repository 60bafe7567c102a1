//! A generation's lifecycle states, what it runs ([`Artifacts`]), and its worker
//! processes.
//!
//! [`GenerationState`] is the lifecycle: `Starting` → `Serving` → `Draining` → gone, or
//! `Starting` → `Failed` → gone ("gone" = every worker reaped). This module owns the
//! per-worker task that holds the child process, forwards its stderr and keeps the tail
//! for failure reports; it never decides what a generation does next (`core` does).

use crate::artifacts::WorkerBinary;
use crate::config::Config;
use crate::core::Exit;
pub use crate::core::GenerationState;
use nix::sys::signal::Signal;
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;
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

/// Everything a generation was started from: enough to start it again exactly. The
/// checked cache files are held open for as long as this lives.
#[derive(Debug)]
pub struct Artifacts {
    pub config: Arc<Config>,
    pub binary: WorkerBinary,
    pub plugins: Vec<crate::plugins::CachedPlugin>,
    /// Its TLS listeners' certificates and keys (sealed), if it has any.
    pub tls: Option<crate::tls::GenerationTls>,
}

impl Artifacts {
    /// The cached files.
    pub fn files(&self) -> impl Iterator<Item = &std::path::Path> {
        std::iter::once(self.binary.cached()).chain(self.plugins.iter().map(|p| p.artifact.path()))
    }
}

/// A running worker process.
#[derive(Debug)]
pub struct WorkerProcess {
    pub pid: u32,
    signals: mpsc::UnboundedSender<Signal>,
    /// A duplicate of the read end of its stderr pipe, kept so that a supervisor re-exec
    /// can hand the pipe to the next image.
    pub stderr: Option<OwnedFd>,
}

impl WorkerProcess {
    /// Sends `signal` to the process. The task that owns the child delivers it, and only
    /// while the child has not been reaped, so a recycled pid is never signalled.
    pub fn signal(&self, signal: Signal) {
        let _ = self.signals.send(signal);
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
    let stderr = child.stderr.take();
    let kept = stderr
        .as_ref()
        .and_then(|s| s.as_fd().try_clone_to_owned().ok());
    supervise(
        pid,
        stderr,
        kept,
        span,
        on_exit,
        move |mut signals| async move {
            let status = loop {
                tokio::select! {
                    biased;
                    status = child.wait() => break status,
                    Some(signal) = signals.recv() => {
                        // The child has not been reaped: `wait` above has not returned.
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
                    }
                }
            };
            match status {
                Ok(s) => s.to_string(),
                Err(e) => format!("wait failed: {e}"),
            }
        },
    )
}

/// Takes over a worker this image inherited across the supervisor's `exec` (it is still
/// our child, but no `Child` value exists for it): watches it through a pidfd, reaps it,
/// forwards `stderr` (the read end of its stderr pipe) and delivers signals as [`watch`]
/// does.
pub fn adopt(
    pid: u32,
    stderr: Option<OwnedFd>,
    span: tracing::Span,
    on_exit: impl FnOnce(Exit) + Send + 'static,
) -> std::io::Result<WorkerProcess> {
    let pidfd = baton_sys::process::PidFd::open(pid)?;
    let kept = stderr.as_ref().and_then(|s| s.try_clone().ok());
    let pipe = match stderr {
        Some(fd) => Some(tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?),
        None => None,
    };
    let nix_pid = nix::unistd::Pid::from_raw(pid as i32);
    Ok(supervise(
        pid,
        pipe,
        kept,
        span,
        on_exit,
        move |mut signals| async move {
            loop {
                tokio::select! {
                    biased;
                    exited = pidfd.exited() => {
                        if let Err(e) = exited {
                            return format!("watching it failed: {e}");
                        }
                        match nix::sys::wait::waitpid(nix_pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                            Ok(nix::sys::wait::WaitStatus::StillAlive) => {}
                            Ok(status) => return describe_wait(status),
                            Err(e) => return format!("wait failed: {e}"),
                        }
                    }
                    Some(signal) = signals.recv() => {
                        let _ = pidfd.send_signal(signal as i32);
                    }
                }
            }
        },
    ))
}

/// What [`watch`] and [`adopt`] share: forwards `stderr` and keeps its tail, runs `wait`
/// (which delivers the signals it receives until the process is reaped, then says how it
/// ended) in a task of `span`, and calls `on_exit` with the tail once the rest of the
/// stderr has arrived.
fn supervise<F>(
    pid: u32,
    stderr: Option<impl tokio::io::AsyncRead + Unpin + Send + 'static>,
    kept: Option<OwnedFd>,
    span: tracing::Span,
    on_exit: impl FnOnce(Exit) + Send + 'static,
    wait: impl FnOnce(mpsc::UnboundedReceiver<Signal>) -> F,
) -> WorkerProcess
where
    F: std::future::Future<Output = String> + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel::<Signal>();
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let forward = tokio::spawn(forward_stderr(stderr, tail.clone()));
    let waited = wait(rx);
    let task = async move {
        let status = waited.await;
        let _ = tokio::time::timeout(STDERR_EOF_WAIT, forward).await;
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
        signals: tx,
        stderr: kept,
    }
}

/// A wait status as `std::process::ExitStatus` shows it ("exit status: 3",
/// "signal: 9 (SIGKILL)"), so that adopted workers are reported like spawned ones.
fn describe_wait(status: nix::sys::wait::WaitStatus) -> String {
    use nix::sys::wait::WaitStatus;
    use std::os::unix::process::ExitStatusExt;
    let raw = match status {
        WaitStatus::Exited(_, code) => (code & 0xff) << 8,
        WaitStatus::Signaled(_, signal, core) => signal as i32 | if core { 0x80 } else { 0 },
        other => return format!("{other:?}"),
    };
    std::process::ExitStatus::from_raw(raw).to_string()
}

/// Copies the worker's stderr to ours line by line (so its log lines reach the same
/// journal) and keeps the last lines.
async fn forward_stderr(
    stderr: Option<impl tokio::io::AsyncRead + Unpin>,
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
    use super::{describe_wait, strip_ansi};
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;
    use nix::unistd::Pid;

    #[test]
    fn an_adopted_worker_s_exit_reads_like_a_spawned_one_s() {
        let pid = Pid::from_raw(1);
        assert_eq!(describe_wait(WaitStatus::Exited(pid, 3)), "exit status: 3");
        assert_eq!(
            describe_wait(WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            "signal: 9 (SIGKILL)"
        );
    }

    #[test]
    fn colour_codes_are_removed_from_the_tail() {
        assert_eq!(strip_ansi("\u{1b}[31mERROR\u{1b}[0m boom"), "ERROR boom");
    }
}
