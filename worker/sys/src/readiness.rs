//! Registering an owned fd with the tokio reactor, to wait until it is readable: a pidfd
//! (a child exited), an epoll instance (one of its fds is ready).
#![allow(unsafe_code)]

use std::os::fd::OwnedFd;
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// `fd`, registered with the reactor of the calling runtime for readability (call from
/// within a tokio runtime).
pub fn readable(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns `fd` (an OwnedFd, which nothing else can close) until it is
    // dropped, so the fd stays open and refers to the same file for as long as it is
    // registered, which is what `register_with_interest` requires.
    unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }.map_err(|e| e.into_parts().1)
}
