//! `baton-sys`: the system calls of Baton's supervisor and worker that need `unsafe`, each
//! behind a safe function that takes or returns `OwnedFd`/`BorrowedFd`.
//!
//! Besides the plugin loader (`baton-loader`) and the plugin SDK (`baton-plugin`), this is
//! the only crate of the workspace where `unsafe` is allowed, and within it only the
//! modules that make a system call `libc` alone offers allow it. Every `unsafe` block says
//! why it holds in a `// SAFETY:` comment (clippy's `undocumented_unsafe_blocks` checks
//! that there is one), and says who owns the fds it touches.
//!
//! - [`inherit`]: taking the fds a process inherited across `exec`, by number;
//! - [`activation`]: systemd's socket-activation protocol (`LISTEN_FDS`), receiving side,
//!   used by the supervisor and the worker alike;
//! - [`cache`]: prefetching a value's cache lines;
//! - [`child`]: placing fds in a child process between `fork` and `exec`;
//! - [`lease`]: whether some process has a file open for writing;
//! - [`memory`] and [`random`]: `malloc_trim` and `getrandom`;
//! - [`process`]: `pidfd_open`, to watch a child inherited across `exec`;
//! - [`readiness`]: registering an owned fd with the tokio reactor;
//! - [`scheduling`]: the CPU scheduling policy (`SCHED_BATCH`).
//!
//! It decides no policy: which variable names which fd, and what a failure means, is the
//! caller's.

pub mod activation;
pub mod cache;
pub mod child;
pub mod inherit;
pub mod lease;
pub mod memory;
pub mod process;
pub mod random;
pub mod readiness;
pub mod scheduling;

/// A duplicate of `fd` that nothing owns, at a number no other test uses and the process
/// never hands out itself (it takes the lowest free one): what an fd a parent placed for
/// us looks like. Not close-on-exec, as an inherited fd is not.
#[cfg(test)]
pub(crate) fn inherited(fd: impl std::os::fd::AsFd) -> std::os::fd::RawFd {
    use nix::fcntl::{FcntlArg, fcntl};
    static NEXT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(5000);
    let number = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let raw = fcntl(fd.as_fd(), FcntlArg::F_DUPFD(number)).expect("F_DUPFD");
    assert_eq!(raw, number, "a test fd number in use");
    raw
}
