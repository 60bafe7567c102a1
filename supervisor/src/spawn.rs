//! Starts one worker process.
//!
//! The worker gets the generation's listener fds at `3..3+n`, the lifeline pipe's read
//! end at `3+n`, its plugins' checked cache files from `4+n` on (named by fd in the
//! settings), and the checked worker binary's own file last, which is what is exec'd (as
//! `/proc/self/fd/N`, the way `fexecve` does it): no path is looked up again after the
//! supervisor hashed the file. It also gets systemd's socket-activation variables, and
//! `NOTIFY_SOCKET` pointing at the supervisor's own notify socket. systemd's `NOTIFY_SOCKET`, `WATCHDOG_*` and `LISTEN_*`
//! never reach a worker. This module uses `std::process::Command` (through tokio) and only
//! async-signal-safe calls between `fork` and `exec`; it never forks bare.
#![allow(unsafe_code)]

use crate::artifacts::WorkerBinary;
use crate::listeners::Listener;
use crate::plugins::CachedPlugin;
use baton_proto::{
    ENV_EXE_FD, ENV_GENERATION, ENV_LIFELINE_FD, ENV_SETTINGS, ENV_SUPERVISOR_PID,
    LISTEN_FDS_START, PluginSpec,
};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

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
}

/// Forks and execs a worker. Its stderr is piped (the caller keeps a tail of it for
/// failure reports); stdout is inherited; it runs in its own process group so that a
/// terminal's Ctrl-C reaches only the supervisor, which then drains in order.
pub fn spawn(spec: &SpawnSpec<'_>) -> std::io::Result<tokio::process::Child> {
    let n = spec.listeners.len() as RawFd;
    let names: Vec<&str> = spec.listeners.iter().map(|(name, _)| *name).collect();
    let mut fds: Vec<BorrowedFd<'_>> = spec.listeners.iter().map(|(_, fd)| *fd).collect();
    fds.push(spec.lifeline);
    let mut cmd = worker_command(spec.binary, spec.plugins, fds)?;
    use std::os::unix::process::CommandExt;
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
        .process_group(0);
    if let Some(c) = spec.credentials {
        // std switches in the child before the pre_exec closure: supplementary groups
        // dropped (as root), then setgid, then setuid. A failed switch fails the spawn:
        // a worker never runs as root when a user is configured.
        cmd.uid(c.uid).gid(c.gid);
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(false);
    cmd.spawn()
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
/// then each plugin's checked file, then the binary's file (named in `BATON_EXE_FD`, so
/// that the worker closes it). systemd's variables are removed; the caller adds its own.
pub fn worker_command(
    binary: &WorkerBinary,
    plugins: &[CachedPlugin],
    fds: Vec<BorrowedFd<'_>>,
) -> std::io::Result<std::process::Command> {
    let mut sources: Vec<RawFd> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
    sources.extend(plugins.iter().map(|p| p.artifact.fd().as_raw_fd()));
    sources.push(binary.artifact.fd().as_raw_fd());
    let exe = LISTEN_FDS_START + sources.len() as RawFd - 1;
    // The file checked, not a path looked up again; the process shows the cache's path.
    let mut cmd = std::process::Command::new(format!("/proc/self/fd/{exe}"));
    std::os::unix::process::CommandExt::arg0(&mut cmd, binary.cached());
    for var in SYSTEMD_ONLY {
        cmd.env_remove(var);
    }
    cmd.env(ENV_EXE_FD, exe.to_string());
    // The targets 3..3+len must not hold anything `Command` itself uses in the child
    // (its exec-error pipe is created just before fork, at the lowest free numbers).
    reserve_low_fds(exe + 1)?;
    // SAFETY: the closure runs in the child between fork and exec. It only calls fcntl,
    // dup2 and prctl, which are async-signal-safe, and mutates `sources` in place (no
    // allocation). The fds it reads are open in the parent when the command is spawned
    // (the caller holds them borrowed, the artifacts are held by the generation) and
    // therefore in the child.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            place_fds(&mut sources)?;
            // No ambient capabilities survive into the worker.
            if libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) < 0
            {
                let e = std::io::Error::last_os_error();
                // Kernels without ambient capabilities have none to clear.
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// Fills every free fd number below `end` with `/dev/null` (close-on-exec), kept open for
/// the process's life, so that fds opened later — `Command`'s exec-error pipe among them —
/// land above the range that `place_fds` overwrites in the child. The supervisor's loop
/// is single-threaded, so nothing opens an fd between this and the fork. (An fd opened
/// earlier inside the range is no problem: `place_fds` moves every source above the range
/// before it overwrites anything.)
fn reserve_low_fds(end: RawFd) -> std::io::Result<()> {
    static RESERVED: std::sync::Mutex<Vec<std::os::fd::OwnedFd>> =
        std::sync::Mutex::new(Vec::new());
    let mut reserved = RESERVED.lock().expect("reserve lock");
    loop {
        let fd: std::os::fd::OwnedFd = std::fs::File::open("/dev/null")?.into();
        if fd.as_raw_fd() >= end {
            return Ok(());
        }
        reserved.push(fd);
    }
}

/// Sets close-on-exec on every fd from 3 up that the process inherited, so that nothing
/// its parent leaked reaches a worker. Call once at start-up, after socket-activation fds
/// were adopted and before any thread starts.
pub fn cloexec_inherited() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl on an fd number only changes its close-on-exec flag; a number
        // that was the read_dir handle and is closed by now just fails.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
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
