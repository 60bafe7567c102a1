//! Both directions of the sd_notify protocol.
//!
//! [`Systemd`] sends the supervisor's own state to systemd (only the supervisor talks to
//! systemd: `NotifyAccess=main`). [`WorkerSocket`] is the datagram socket workers report
//! to; each datagram carries the sender's credentials (`SO_PASSCRED`), so a message is
//! attributed by pid, never by what it claims.
//!
//! [`Systemd`] is also the supervisor's [`FdStore`]: it hands the listening sockets to
//! systemd's file descriptor store (`FDSTORE=1` + `FDNAME=`), which passes them back in
//! `LISTEN_FDS` when the service is restarted.

use crate::listeners::FdStore;
use baton_proto::NotifyMessage;
use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, UnixCredentials, recvmsg, setsockopt, sockopt,
};
use sd_notify::NotifyState;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::UnixDatagram;

/// Sends to systemd's `NOTIFY_SOCKET`, when there is one.
#[derive(Debug, Clone)]
pub struct Systemd {
    enabled: bool,
    watchdog: Option<Duration>,
}

impl Systemd {
    /// Reads `NOTIFY_SOCKET` and `WATCHDOG_USEC` once, at start-up.
    pub fn from_env(notify_socket: bool, watchdog: Option<Duration>) -> Self {
        Self {
            enabled: notify_socket,
            watchdog,
        }
    }

    /// The interval at which `WATCHDOG=1` must be sent: half of `WATCHDOG_USEC`.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog.map(|d| d / 2)
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        // A value must stay on its line: a newline would start a bogus assignment.
        let flattened: Vec<String> = states
            .iter()
            .map(|s| match s {
                NotifyState::Status(text) => one_line(text),
                _ => String::new(),
            })
            .collect();
        let states: Vec<NotifyState<'_>> = states
            .iter()
            .zip(&flattened)
            .map(|(s, flat)| match s {
                NotifyState::Status(_) => NotifyState::Status(flat),
                other => other.clone(),
            })
            .collect();
        if let Err(e) = sd_notify::notify(&states) {
            tracing::warn!("sd_notify to systemd failed: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    /// `RELOADING=1` and `MONOTONIC_USEC` in one datagram, as systemd ≥ 253 requires.
    pub fn reloading(&self, status: &str) {
        self.send(&[
            NotifyState::Reloading,
            NotifyState::monotonic_usec_now().expect("CLOCK_MONOTONIC is always readable"),
            NotifyState::Status(status),
        ]);
    }

    /// `STOPPING=1` with `EXTEND_TIMEOUT_USEC` and a `STATUS=`, in one datagram.
    pub fn stopping(&self, status: &str, extend: Duration) {
        self.send(&[
            NotifyState::Stopping,
            extend_usec(extend),
            NotifyState::Status(status),
        ]);
    }

    /// `EXTEND_TIMEOUT_USEC` with a `STATUS=`, in one datagram.
    pub fn extend_timeout(&self, by: Duration, status: &str) {
        self.send(&[extend_usec(by), NotifyState::Status(status)]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }
}

/// systemd's file descriptor store (`FileDescriptorStoreMax=` in the unit; without it
/// systemd refuses the fds and says so in its journal, and nothing else changes). The
/// fds outlive this process: after a crash or `systemctl restart`, systemd passes them
/// back under the same name, with every connection that queued in their backlog.
impl FdStore for Systemd {
    fn store(&self, name: &str, fds: &[BorrowedFd<'_>]) -> bool {
        if !self.enabled || fds.is_empty() {
            return false;
        }
        if !fd_name_is_valid(name) {
            tracing::warn!(
                "listener {name:?}: not kept in systemd's fd store: systemd refuses it as an FDNAME="
            );
            return false;
        }
        match sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], fds) {
            Ok(()) => {
                tracing::info!(
                    "listener {name:?}: {} fd(s) kept in systemd's fd store",
                    fds.len()
                );
                true
            }
            Err(e) => {
                tracing::warn!("listener {name:?}: FDSTORE=1 to systemd failed: {e}");
                false
            }
        }
    }

    fn remove(&self, name: &str) {
        if !self.enabled || !fd_name_is_valid(name) {
            return;
        }
        match sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]) {
            Ok(()) => tracing::info!("listener {name:?}: removed from systemd's fd store"),
            Err(e) => tracing::warn!("listener {name:?}: FDSTOREREMOVE=1 to systemd failed: {e}"),
        }
    }
}

/// Whether systemd accepts `name` as an `FDNAME=` (and so in `LISTEN_FDNAMES`): at most
/// 255 printable ASCII characters, no `:` (systemd's `fdname_is_valid()`). systemd stores
/// fds under an invalid name as "stored", so they would come back under the wrong name.
pub fn fd_name_is_valid(name: &str) -> bool {
    name.len() <= 255
        && name
            .bytes()
            .all(|b| (b' '..=b'~').contains(&b) && b != b':')
}

fn extend_usec(by: Duration) -> NotifyState<'static> {
    NotifyState::ExtendTimeoutUsec(u32::try_from(by.as_micros()).unwrap_or(u32::MAX))
}

/// `text` on one line: line breaks become " | ", and it is cut at a length systemd shows.
fn one_line(text: &str) -> String {
    const MAX: usize = 2000;
    let flat = text
        .split('\n')
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join(" | ");
    match flat.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

/// The datagram socket workers send `READY=1`, `STATUS=…` and counters to.
#[derive(Debug)]
pub struct WorkerSocket {
    socket: UnixDatagram,
    path: PathBuf,
}

/// Largest datagram read; longer ones are truncated (and then fail to parse). A worker's
/// `BATON_METRICS=` grows with its routes (about 150 bytes each).
pub const MAX_DATAGRAM: usize = 65536;

impl WorkerSocket {
    /// Binds in the abstract namespace under an unguessable name: no file to leave behind
    /// or to keep reachable for workers running as another user (`worker.user`), while
    /// the control socket's directory stays private. Anyone may send to it; only datagrams
    /// whose kernel-reported pid is a worker's are acted on.
    pub fn bind_abstract() -> std::io::Result<Self> {
        use std::os::linux::net::SocketAddrExt;
        let mut random = [0u8; 8];
        baton_sys::random::fill(&mut random)?;
        let name = format!(
            "baton/{}/notify/{}",
            std::process::id(),
            crate::trust::hex(&random)
        );
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        let socket = std::os::unix::net::UnixDatagram::bind_addr(&addr)?;
        socket.set_nonblocking(true)?;
        let socket = UnixDatagram::from_std(socket)?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        Ok(Self {
            socket,
            path: PathBuf::from(format!("@{name}")),
        })
    }

    /// The socket a previous supervisor image bound as `path` (inherited across `exec`).
    pub fn inherited(fd: std::os::fd::OwnedFd, path: PathBuf) -> std::io::Result<Self> {
        let socket = std::os::unix::net::UnixDatagram::from(fd);
        socket.set_nonblocking(true)?;
        let socket = UnixDatagram::from_std(socket)?;
        setsockopt(&socket, sockopt::PassCred, &true)?;
        Ok(Self { socket, path })
    }

    /// The socket's fd (for a re-exec, which keeps it open).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.socket)
    }

    /// The socket as `NOTIFY_SOCKET` names it (`@` for the abstract namespace).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next message with the pid of its sender. Messages without credentials or that
    /// do not parse are logged and skipped.
    pub async fn recv(&self) -> std::io::Result<(i32, NotifyMessage)> {
        loop {
            let (pid, data) = self
                .socket
                .async_io(Interest::READABLE, || {
                    let mut buf = vec![0u8; MAX_DATAGRAM];
                    let mut cmsg = nix::cmsg_space!(UnixCredentials);
                    let (pid, len) = {
                        let mut iov = [IoSliceMut::new(&mut buf)];
                        let msg = recvmsg::<()>(
                            self.socket.as_raw_fd(),
                            &mut iov,
                            Some(&mut cmsg),
                            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
                        )
                        .map_err(std::io::Error::from)?;
                        let mut pid = None;
                        if let Ok(cmsgs) = msg.cmsgs() {
                            for c in cmsgs {
                                if let ControlMessageOwned::ScmCredentials(cred) = c {
                                    pid = Some(cred.pid());
                                }
                            }
                        }
                        (pid, msg.bytes)
                    };
                    Ok((pid, buf[..len].to_vec()))
                })
                .await?;
            let Some(pid) = pid else {
                tracing::warn!("notify datagram without credentials ignored");
                continue;
            };
            let (msg, errors) = NotifyMessage::parse_lenient(&data);
            for e in errors {
                tracing::warn!("notify line from pid {pid} ignored: {e}");
            }
            return Ok((pid, msg));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_names_are_what_systemd_accepts() {
        for ok in ["http", "admin api", "a.b-c_d", &"x".repeat(255), "~!@#"] {
            assert!(fd_name_is_valid(ok), "{ok:?}");
        }
        for bad in [
            "a:b",
            "tab\there",
            "new\nline",
            "del\u{7f}",
            "é",
            &"x".repeat(256),
        ] {
            assert!(!fd_name_is_valid(bad), "{bad:?}");
        }
    }

    #[test]
    fn without_notify_socket_nothing_is_stored() {
        use std::os::fd::AsFd;
        let systemd = Systemd::from_env(false, None);
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(!systemd.store("http", &[a.as_fd()]));
    }
}
