//! Starts one worker process.
//!
//! The worker gets the generation's listener fds at `3..3+n` and the lifeline pipe's read
//! end at `3+n`, systemd's socket-activation variables, and `NOTIFY_SOCKET` pointing at the
//! supervisor's own notify socket. systemd's `NOTIFY_SOCKET`, `WATCHDOG_*` and `LISTEN_*`
//! never reach a worker. This module uses `std::process::Command` (through tokio) and only
//! async-signal-safe calls between `fork` and `exec`; it never forks bare.
#![allow(unsafe_code)]

use baton_proto::{
    ENV_GENERATION, ENV_LIFELINE_FD, ENV_SETTINGS, ENV_SUPERVISOR_PID, LISTEN_FDS_START,
};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::process::Stdio;

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
    pub binary: &'a Path,
    pub generation: u64,
    /// Listener fds with their names, in the order they are placed from fd 3.
    pub listeners: Vec<(&'a str, BorrowedFd<'a>)>,
    pub lifeline: BorrowedFd<'a>,
    pub notify_socket: &'a Path,
    pub settings_json: &'a str,
}

/// Forks and execs a worker. Its stderr is piped (the caller keeps a tail of it for
/// failure reports); stdout is inherited; it runs in its own process group so that a
/// terminal's Ctrl-C reaches only the supervisor, which then drains in order.
pub fn spawn(spec: &SpawnSpec<'_>) -> std::io::Result<tokio::process::Child> {
    let n = spec.listeners.len() as RawFd;
    let names: Vec<&str> = spec.listeners.iter().map(|(name, _)| *name).collect();
    let mut cmd = tokio::process::Command::new(spec.binary);
    for var in SYSTEMD_ONLY {
        cmd.env_remove(var);
    }
    cmd.env("LISTEN_FDS", n.to_string())
        .env("LISTEN_FDNAMES", names.join(":"))
        .env("NOTIFY_SOCKET", spec.notify_socket)
        .env(ENV_GENERATION, spec.generation.to_string())
        .env(ENV_SETTINGS, spec.settings_json)
        .env(ENV_LIFELINE_FD, (LISTEN_FDS_START + n).to_string())
        .env(ENV_SUPERVISOR_PID, std::process::id().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);

    let mut sources: Vec<RawFd> = spec
        .listeners
        .iter()
        .map(|(_, fd)| fd.as_raw_fd())
        .collect();
    sources.push(spec.lifeline.as_raw_fd());
    // SAFETY: the closure runs in the child between fork and exec. It only calls fcntl and
    // dup2, which are async-signal-safe, and mutates `sources` in place (no allocation).
    // The fds it reads are open in the parent when `spawn` is called (the caller holds
    // them borrowed for the duration) and therefore in the child.
    unsafe {
        cmd.pre_exec(move || place_fds(&mut sources));
    }
    cmd.spawn()
}

/// Moves `fds[i]` to `3 + i`. Every source is first duplicated above the target range, so a
/// source that already sits inside `3..3+len` is never overwritten before it is moved.
/// The duplicates are close-on-exec; the targets are not (dup2 clears the flag).
fn place_fds(fds: &mut [RawFd]) -> std::io::Result<()> {
    let above = LISTEN_FDS_START + fds.len() as RawFd;
    for fd in fds.iter_mut() {
        // SAFETY: plain fcntl on an fd number; it cannot violate memory safety.
        let moved = unsafe { libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, above) };
        if moved < 0 {
            return Err(std::io::Error::last_os_error());
        }
        *fd = moved;
    }
    for (i, fd) in fds.iter().enumerate() {
        // SAFETY: dup2 onto a target the worker's protocol reserves for this fd.
        if unsafe { libc::dup2(*fd, LISTEN_FDS_START + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
