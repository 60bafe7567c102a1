//! Taking ownership of the fds a process inherited across `exec`, by number.
//!
//! A number the environment names (`LISTEN_FDS`, `BATON_LIFELINE_FD`, a plugin's fd in the
//! settings) refers to an fd that the parent placed there and that nothing in this process
//! owns yet. [`adopt`] turns such a number into an `OwnedFd`, once: it refuses the
//! standard streams, a number that is not open and a number adopted before, so no two
//! `OwnedFd`s ever hold the same number. Call it at start-up, before the process opens
//! files of its own: a named number the process has itself opened since is not
//! inherited, and nothing here can tell the difference. This module never closes an fd it
//! was not told about.
#![allow(unsafe_code)]

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use std::collections::BTreeSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;
use thiserror::Error;

/// Why an inherited fd could not be taken.
#[derive(Debug, Error)]
pub enum AdoptError {
    #[error("fd {0} is a standard stream")]
    Standard(RawFd),
    #[error("fd {0} is not open")]
    NotOpen(RawFd),
    #[error("fd {0} was taken already")]
    Taken(RawFd),
    #[error("fd {fd}: cannot set close-on-exec: {source}")]
    Cloexec { fd: RawFd, source: nix::Error },
}

/// Every number [`adopt`] has handed out in this process's life.
static ADOPTED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// Sets or clears close-on-exec on the fd `raw`, which the caller holds open (as an
/// `OwnedFd` somewhere, or inherited and not yet adopted): what a process that is about to
/// `exec` itself does to the fds it hands to its next image.
pub fn set_cloexec(raw: RawFd, cloexec: bool) -> std::io::Result<()> {
    let flag = if cloexec { libc::FD_CLOEXEC } else { 0 };
    // SAFETY: F_SETFD on a number only changes that fd's close-on-exec flag; no memory is
    // passed, and on a number that is not open it fails with EBADF.
    if unsafe { libc::fcntl(raw, libc::F_SETFD, flag) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether `raw` is an open fd of this process that nothing here has adopted (what
/// [`adopt`] would take), without taking it.
pub fn is_open(raw: RawFd) -> bool {
    let adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
    // SAFETY: F_GETFD on a number only reads that fd's flags; on a number that is not
    // open it fails with EBADF. No memory is passed.
    raw > 2 && !adopted.contains(&raw) && unsafe { libc::fcntl(raw, libc::F_GETFD) } >= 0
}

/// Takes ownership of the inherited fd `raw` and makes it close-on-exec, so that it reaches
/// no child unless handed on on purpose. See the module documentation for when to call it.
pub fn adopt(raw: RawFd) -> Result<OwnedFd, AdoptError> {
    if (0..=2).contains(&raw) {
        return Err(AdoptError::Standard(raw));
    }
    // A poisoned lock still holds a valid set: a panic cannot leave it half-changed.
    let mut adopted = ADOPTED.lock().unwrap_or_else(|e| e.into_inner());
    if adopted.contains(&raw) {
        return Err(AdoptError::Taken(raw));
    }
    // SAFETY: F_GETFD on a number only reads that fd's flags; on a number that is not
    // open it fails with EBADF. No memory is passed.
    if unsafe { libc::fcntl(raw, libc::F_GETFD) } < 0 {
        return Err(AdoptError::NotOpen(raw));
    }
    adopted.insert(raw);
    // SAFETY: `raw` is open (checked just above, under the lock that every adoption takes)
    // and owned by nothing in this process: the parent placed it there for us across
    // `exec` (the caller's start-up contract, see the module documentation), and `ADOPTED`
    // guarantees it is turned into an `OwnedFd` exactly once. From here the returned
    // `OwnedFd` is its only owner.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    fcntl(&fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map_err(|source| AdoptError::Cloexec { fd: raw, source })?;
    Ok(fd)
}

/// Sets close-on-exec on every fd from 3 up that the process has, so that nothing its
/// parent leaked reaches a child. Takes ownership of nothing. Call once at start-up, after
/// the fds it means to keep were adopted and before any other thread starts.
pub fn cloexec_inherited() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: fcntl on an fd number reads and sets only that fd's close-on-exec flag
        // and passes no memory; whoever owns the fd keeps it. A number that was the
        // read_dir handle and is closed by now just fails with EBADF.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn an_inherited_fd_is_taken_once_and_made_close_on_exec() {
        let (read, _write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let raw = crate::inherited(&read);
        let fd = adopt(raw).unwrap();
        assert_eq!(fd.as_raw_fd(), raw);
        let flags = FdFlag::from_bits_truncate(fcntl(&fd, FcntlArg::F_GETFD).unwrap());
        assert!(flags.contains(FdFlag::FD_CLOEXEC));
        assert!(matches!(adopt(raw), Err(AdoptError::Taken(n)) if n == raw));
        // Closed and taken before: still refused, whatever opens at that number next.
        drop(fd);
        assert!(matches!(adopt(raw), Err(AdoptError::Taken(n)) if n == raw));
    }

    #[test]
    fn standard_streams_and_closed_numbers_are_refused() {
        for raw in 0..=2 {
            assert!(matches!(adopt(raw), Err(AdoptError::Standard(n)) if n == raw));
        }
        // Far above anything a test process opens.
        let closed = i32::MAX - 7;
        assert!(matches!(adopt(closed), Err(AdoptError::NotOpen(n)) if n == closed));
        assert!(matches!(adopt(-1), Err(AdoptError::NotOpen(-1))));
    }
}
