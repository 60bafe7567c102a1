//! Watching a child process by a file descriptor (`pidfd_open`), for children this
//! process did not spawn itself: the workers a supervisor image inherits across `exec`.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

/// A child process, by pidfd, registered with the tokio reactor of the caller.
#[derive(Debug)]
pub struct PidFd {
    fd: AsyncFd<OwnedFd>,
}

impl PidFd {
    /// Opens a pidfd for `pid` and registers it (call from within a tokio runtime).
    pub fn open(pid: u32) -> std::io::Result<Self> {
        let fd = crate::readiness::readable(pidfd_open(pid)?)?;
        Ok(Self { fd })
    }

    /// Waits until the process has exited (it is then a zombie until reaped).
    pub async fn exited(&self) -> std::io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            if poll_readable(self.fd.get_ref())? {
                return Ok(());
            }
            guard.clear_ready();
        }
    }

    /// Sends `signal` to exactly this process; fails with ESRCH once it was reaped, so a
    /// reused pid is never signalled.
    pub fn send_signal(&self, signal: i32) -> std::io::Result<()> {
        // SAFETY: pidfd_send_signal takes the pidfd (open for as long as `self` lives), a
        // signal number, a null siginfo (allowed: the kernel fills in the defaults) and
        // flags 0.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0 as libc::c_uint,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Whether the pidfd is readable now (the process exited).
fn poll_readable(fd: &OwnedFd) -> std::io::Result<bool> {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO)?;
    Ok(n > 0)
}

/// An fd that becomes readable when the process `pid` exits (`pidfd_open(2)`, Linux ≥
/// 5.3). It refers to that very process: a pid reused after it was reaped is never
/// confused with it.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags, no pointers; on success it returns a new
    // fd that nothing else owns, which the OwnedFd below takes.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, libc::O_NONBLOCK as libc::c_uint) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sets whether this process may be dumped (`PR_SET_DUMPABLE`): off, no core dump is
/// written and processes of the same user can neither ptrace it nor read its memory
/// through `/proc/PID/mem` (a worker holding TLS private keys).
pub fn set_dumpable(dumpable: bool) -> std::io::Result<()> {
    nix::sys::prctl::set_dumpable(dumpable).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::pidfd_open;

    #[test]
    fn a_pidfd_becomes_readable_when_the_child_exits() {
        let mut child = std::process::Command::new("true")
            .spawn()
            .expect("spawn true");
        let fd = pidfd_open(child.id()).expect("pidfd_open");
        let mut fds = [nix::poll::PollFd::new(
            std::os::fd::AsFd::as_fd(&fd),
            nix::poll::PollFlags::POLLIN,
        )];
        let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(5000u16)).expect("poll");
        assert_eq!(n, 1, "the pidfd is readable once the child exited");
        assert!(child.wait().expect("wait").success());
    }
}
