//! Takes ownership of the fds the worker inherits: the listeners at `3..3+LISTEN_FDS`
//! (systemd's socket-activation protocol), the supervisor's lifeline pipe, the checked
//! plugin files named in the settings, and the worker binary's own file, which it closes.
//!
//! The worker's rules for them live here: which variable names which fd, that `LISTEN_PID`
//! may be missing when the supervisor is our parent, what kind of socket a listener is.
//! Taking a number as an owned fd, and checking that a listener really is a listening
//! stream socket before anything serves on it, is `baton_sys`'s (the supervisor takes
//! systemd's fds through the same code). It never takes an fd it was not told about.

use crate::env::WorkerEnv;
use anyhow::{Context, bail, ensure};
use baton_proto::{ENV_EXE_FD, ENV_LIFELINE_FD, ENV_SUPERVISOR_PID};
use baton_sys::activation::ListenFds;
use baton_sys::inherit::adopt;
use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage, getsockname};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

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
    let fds = ListenFds::parse(count, env.listen_fdnames.as_deref())?;
    ensure!(
        (1..=1024).contains(&fds.len()),
        "LISTEN_FDS={count} is out of range"
    );
    check_listen_pid(env)?;
    let mut out = Vec::with_capacity(fds.len());
    for (name, fd) in fds.adopt()? {
        let raw = fd.as_raw_fd();
        let listener =
            classify(fd).with_context(|| format!("inherited fd {raw} (listener {name:?})"))?;
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

/// A listening stream socket (as `baton_sys` verified) as a TCP or a Unix listener.
fn classify(fd: OwnedFd) -> anyhow::Result<Listener> {
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
    let fd = adopt(raw).with_context(|| format!("{ENV_LIFELINE_FD}={raw}"))?;
    Ok(Some(fd))
}

/// The inherited file of a plugin (`PluginSpec::fd`): the very file the supervisor checked
/// and hashed, which the loader opens through `/proc/self/fd`.
pub fn plugin_file(raw: RawFd) -> anyhow::Result<OwnedFd> {
    ensure!(raw > 2, "plugin fd {raw} is a standard stream");
    adopt(raw).with_context(|| format!("plugin fd {raw}"))
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
    // Not open (already closed by whoever started us): nothing to close.
    if let Ok(fd) = adopt(raw) {
        drop(fd);
    }
    Ok(())
}
