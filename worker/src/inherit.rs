//! Takes ownership of the fds the worker inherits: the listeners at `3..3+LISTEN_FDS`
//! (systemd's socket-activation protocol), the supervisor's lifeline pipe, the checked
//! plugin files named in the settings, and the worker binary's own file, which it closes.
//!
//! This is the only module of the worker that turns raw fd numbers into owned fds. It
//! verifies each listener really is a listening stream socket before anything serves on it,
//! and never takes an fd it was not told about.
#![allow(unsafe_code)]

use crate::env::WorkerEnv;
use anyhow::{Context, bail, ensure};
use baton_proto::{ENV_EXE_FD, ENV_LIFELINE_FD, ENV_SUPERVISOR_PID, LISTEN_FDS_START};
use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, SockType, SockaddrLike, SockaddrStorage, getsockname, getsockopt, sockopt,
};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// One inherited listening socket.
#[derive(Debug)]
pub enum Listener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener),
}

/// A listener with the name `LISTEN_FDNAMES` gave it.
#[derive(Debug)]
pub struct NamedListener {
    pub name: String,
    pub listener: Listener,
}

/// Adopts the listeners passed by the supervisor or by systemd.
pub fn listeners(env: &WorkerEnv) -> anyhow::Result<Vec<NamedListener>> {
    let Some(count) = &env.listen_fds else {
        bail!(
            "no listeners: LISTEN_FDS is not set (start the worker through baton or systemd socket activation)"
        );
    };
    let count: i32 = count
        .parse()
        .with_context(|| format!("LISTEN_FDS={count:?} is not a number"))?;
    ensure!(
        (1..=1024).contains(&count),
        "LISTEN_FDS={count} is out of range"
    );
    check_listen_pid(env)?;
    let names: Vec<String> = match &env.listen_fdnames {
        Some(names) => names.split(':').map(str::to_owned).collect(),
        None => vec!["unknown".to_owned(); count as usize],
    };
    ensure!(
        names.len() == count as usize,
        "LISTEN_FDNAMES has {} names for {count} fds",
        names.len()
    );
    let mut out = Vec::with_capacity(names.len());
    for (i, name) in names.into_iter().enumerate() {
        let raw = LISTEN_FDS_START + i as i32;
        ensure_open(raw).with_context(|| format!("LISTEN_FDS={count}: listener {name:?}"))?;
        // SAFETY: the socket-activation protocol hands fds 3..3+LISTEN_FDS to this process
        // and the fd is open; each number is taken exactly once, here, and nothing else in
        // the worker uses it.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let listener =
            verify(fd).with_context(|| format!("inherited fd {raw} (listener {name:?})"))?;
        out.push(NamedListener { name, listener });
    }
    Ok(out)
}

/// `LISTEN_PID` must be ours. The supervisor cannot know the pid before `fork`, so a worker
/// whose parent is the supervisor named in `BATON_SUPERVISOR_PID` may go without it.
fn check_listen_pid(env: &WorkerEnv) -> anyhow::Result<()> {
    let me = std::process::id();
    match (&env.listen_pid, &env.supervisor_pid) {
        (Some(pid), _) => ensure!(
            pid.parse::<u32>().ok() == Some(me),
            "LISTEN_PID={pid} is not this process ({me}): the fds are not meant for us"
        ),
        (None, Some(sup)) => {
            let parent = nix::unistd::getppid().as_raw() as u32;
            ensure!(
                sup.parse::<u32>().ok() == Some(parent),
                "{ENV_SUPERVISOR_PID}={sup} is not our parent ({parent}) and LISTEN_PID is unset"
            );
        }
        (None, None) => bail!("LISTEN_FDS is set without LISTEN_PID"),
    }
    Ok(())
}

/// Fails unless `raw` is an open fd, so no `OwnedFd` is ever made of a closed number.
fn ensure_open(raw: RawFd) -> anyhow::Result<()> {
    // SAFETY: F_GETFD on a number only asks whether it is open.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        bail!("fd {raw} is not open");
    }
    Ok(())
}

fn verify(fd: OwnedFd) -> anyhow::Result<Listener> {
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).context("set FD_CLOEXEC")?;
    let ty = getsockopt(&fd, sockopt::SockType).context("not a socket")?;
    ensure!(ty == SockType::Stream, "not a stream socket ({ty:?})");
    ensure!(
        getsockopt(&fd, sockopt::AcceptConn).context("SO_ACCEPTCONN")?,
        "socket is not listening"
    );
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).context("getsockname")?;
    let listener = match addr.family() {
        Some(AddressFamily::Inet | AddressFamily::Inet6) => Listener::Tcp(fd.into()),
        Some(AddressFamily::Unix) => Listener::Unix(fd.into()),
        other => bail!("unsupported socket family {other:?}"),
    };
    Ok(listener)
}

/// The read end of the supervisor's lifeline pipe, if we were started by one.
pub fn lifeline(env: &WorkerEnv) -> anyhow::Result<Option<OwnedFd>> {
    let Some(raw) = &env.lifeline_fd else {
        return Ok(None);
    };
    let raw: RawFd = raw
        .parse()
        .with_context(|| format!("{ENV_LIFELINE_FD}={raw:?} is not an fd number"))?;
    ensure!(raw > 2, "{ENV_LIFELINE_FD}={raw} is a standard stream");
    ensure_open(raw).with_context(|| format!("{ENV_LIFELINE_FD}={raw}"))?;
    // SAFETY: the supervisor placed the lifeline's read end at this number for us and names
    // it in the environment; it is taken once, here.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).context("lifeline fd")?;
    Ok(Some(fd))
}

/// The inherited file of a plugin (`PluginSpec::fd`): the very file the supervisor checked
/// and hashed, which the loader opens through `/proc/self/fd`.
pub fn plugin_file(raw: RawFd) -> anyhow::Result<OwnedFd> {
    ensure!(raw > 2, "plugin fd {raw} is a standard stream");
    ensure_open(raw).with_context(|| format!("plugin fd {raw}"))?;
    // SAFETY: the supervisor placed this plugin's file at this number and names it in the
    // settings, once per plugin; it is taken once, here.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).context("plugin fd")?;
    Ok(fd)
}

/// Closes the worker binary's own file, which the supervisor exec'd through
/// `/proc/self/fd` and names in `BATON_EXE_FD`; nothing in the worker needs it.
pub fn close_exe(env: &WorkerEnv) -> anyhow::Result<()> {
    let Some(raw) = &env.exe_fd else {
        return Ok(());
    };
    let raw: RawFd = raw
        .parse()
        .with_context(|| format!("{ENV_EXE_FD}={raw:?} is not an fd number"))?;
    ensure!(raw > 2, "{ENV_EXE_FD}={raw} is a standard stream");
    if ensure_open(raw).is_ok() {
        // SAFETY: the supervisor placed the binary's file at this number for us and names
        // it in the environment; it is taken once, here, and closed.
        drop(unsafe { OwnedFd::from_raw_fd(raw) });
    }
    Ok(())
}
