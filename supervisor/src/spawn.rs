//! Starts one worker process.
//!
//! The worker gets the generation's listener fds at `3..3+n`, the lifeline pipe's read
//! end at `3+n`, its plugins' checked cache files from `4+n` on (named by fd in the
//! settings), the sealed memfd of its TLS material if it has TLS listeners, and the checked worker binary's own file last, which is what is exec'd (as
//! `/proc/self/fd/N`, the way `fexecve` does it): no path is looked up again after the
//! supervisor hashed the file. It also gets systemd's socket-activation variables, and
//! `NOTIFY_SOCKET` pointing at the supervisor's own notify socket. systemd's `NOTIFY_SOCKET`, `WATCHDOG_*` and `LISTEN_*`
//! never reach a worker. This module uses `std::process::Command` (through tokio); what
//! runs in the child between `fork` and `exec` (placing the fds, clearing ambient
//! capabilities) is `baton_sys::child`'s. It never forks bare.

use crate::artifacts::{CacheError, WorkerBinary};
use crate::listeners::Listener;
use crate::plugins::CachedPlugin;
use baton_proto::{
    ENV_EXE_FD, ENV_GENERATION, ENV_LIFELINE_FD, ENV_SETTINGS, ENV_SUPERVISOR_PID,
    LISTEN_FDS_START, PluginSpec,
};
use std::os::fd::{BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use thiserror::Error;

/// Why a worker of a generation was not started.
#[derive(Debug, Error)]
pub enum SpawnError {
    /// A checked file of its generation was written over since: it is not handed on.
    #[error(transparent)]
    Changed(#[from] CacheError),
    #[error(
        "cannot execute worker {} (cached as {}): {error}",
        binary.display(),
        cached.display()
    )]
    Exec {
        binary: PathBuf,
        cached: PathBuf,
        error: std::io::Error,
    },
    /// The supervisor no longer has the generation (it ended meanwhile).
    #[error("generation {generation} is gone")]
    Gone { generation: u64 },
    /// The generation's listeners and settings were never made (its launch failed).
    #[error("generation {generation} was not launched")]
    NotLaunched { generation: u64 },
}

/// Variables of systemd's that must not leak into a worker.
const SYSTEMD_ONLY: &[&str] = &[
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
];

/// What a worker is started with.
#[derive(Debug)]
pub struct SpawnSpec<'a> {
    pub binary: &'a WorkerBinary,
    pub plugins: &'a [CachedPlugin],
    pub generation: u64,
    /// Listener fds with their names, in the order they are placed from fd 3.
    pub listeners: Vec<(&'a str, BorrowedFd<'a>)>,
    pub lifeline: BorrowedFd<'a>,
    pub notify_socket: &'a Path,
    pub settings_json: &'a str,
    /// Run the worker as this user and group (`worker.user`/`worker.group`).
    pub credentials: Option<&'a crate::config::Credentials>,
    /// The sealed memfd of the generation's TLS material, placed after the plugins.
    pub tls: Option<BorrowedFd<'a>>,
}

/// Forks and execs a worker. Its stderr is piped (the caller keeps a tail of it for
/// failure reports); stdout is inherited; it runs in its own process group so that a
/// terminal's Ctrl-C reaches only the supervisor, which then drains in order. What was
/// hashed is what runs: a binary or plugin written over since its check is not handed on.
pub fn spawn(spec: &SpawnSpec<'_>) -> Result<tokio::process::Child, SpawnError> {
    std::iter::once(&spec.binary.artifact)
        .chain(spec.plugins.iter().map(|p| &p.artifact))
        .try_for_each(|a| a.verify_unchanged())?;
    let exec = |error| SpawnError::Exec {
        binary: spec.binary.source.clone(),
        cached: spec.binary.cached().to_owned(),
        error,
    };
    let n = spec.listeners.len() as RawFd;
    let names: Vec<&str> = spec.listeners.iter().map(|(name, _)| *name).collect();
    let mut fds: Vec<BorrowedFd<'_>> = spec.listeners.iter().map(|(_, fd)| *fd).collect();
    fds.push(spec.lifeline);
    let mut cmd = worker_command(spec.binary, spec.plugins, fds, spec.tls).map_err(exec)?;
    use std::os::unix::process::CommandExt;
    cmd.env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("NOTIFY_SOCKET", spec.notify_socket)
        .env(ENV_GENERATION, spec.generation.to_string())
        .env(ENV_SETTINGS, spec.settings_json)
        .env(ENV_LIFELINE_FD, (LISTEN_FDS_START + n).to_string())
        .env(ENV_SUPERVISOR_PID, std::process::id().to_string())
        .env(
            baton_proto::ENV_WORKER_PROTOCOL,
            baton_proto::WORKER_PROTOCOL.to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(c) = spec.credentials {
        // std switches in the child before the pre_exec closure: supplementary groups
        // dropped (as root), then setgid, then setuid. A failed switch fails the spawn:
        // a worker never runs as root when a user is configured.
        cmd.uid(c.uid).gid(c.gid);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    cmd.spawn().map_err(exec)
}

/// The plugin specs a worker is told, each naming the fd its file will have: after the
/// listeners' fds and the lifeline, in order (as [`worker_command`] places them).
pub fn plugin_specs(plugins: &[CachedPlugin], listeners: &[Arc<Listener>]) -> Vec<PluginSpec> {
    let n: usize = listeners.iter().map(|l| l.fd_count()).sum();
    numbered(plugins, LISTEN_FDS_START + n as RawFd + 1)
}

/// `plugins`' specs with fds numbered from `first`.
pub fn numbered(plugins: &[CachedPlugin], first: RawFd) -> Vec<PluginSpec> {
    plugins
        .iter()
        .enumerate()
        .map(|(i, p)| PluginSpec {
            fd: Some(first + i as RawFd),
            ..p.spec.clone()
        })
        .collect()
}

/// A command that execs the checked worker binary itself, with `fds` placed at `3..`,
/// then each plugin's checked file, then the TLS material's memfd (named in
/// `BATON_TLS_FD`), then the binary's file (named in `BATON_EXE_FD`, so
/// that the worker closes it). systemd's variables are removed; the caller adds its own.
pub fn worker_command(
    binary: &WorkerBinary,
    plugins: &[CachedPlugin],
    fds: Vec<BorrowedFd<'_>>,
    tls: Option<BorrowedFd<'_>>,
) -> std::io::Result<std::process::Command> {
    let mut sources: Vec<BorrowedFd<'_>> = fds;
    sources.extend(plugins.iter().map(|p| p.artifact.fd()));
    let tls_fd = tls.map(|fd| {
        sources.push(fd);
        LISTEN_FDS_START + sources.len() as RawFd - 1
    });
    sources.push(binary.artifact.fd());
    let exe = LISTEN_FDS_START + sources.len() as RawFd - 1;
    // The file checked, not a path looked up again; the process shows the cache's path.
    let mut cmd = std::process::Command::new(format!("/proc/self/fd/{exe}"));
    std::os::unix::process::CommandExt::arg0(&mut cmd, binary.cached());
    for var in SYSTEMD_ONLY {
        cmd.env_remove(var);
    }
    cmd.env(ENV_EXE_FD, exe.to_string());
    if let Some(fd) = tls_fd {
        cmd.env(baton_proto::tls::ENV_TLS_FD, fd.to_string());
    }
    // In the child: `sources` at 3.., no ambient capabilities.
    baton_sys::child::prepare(&mut cmd, &sources)?;
    Ok(cmd)
}
