//! What a child process gets between `fork` and `exec`: the fds it is handed, at fixed
//! numbers from 3 on (systemd's socket-activation layout, which Baton's workers extend
//! with the lifeline, plugin files and their own binary), and no ambient capabilities.
//!
//! The child is started by `std::process::Command`; what runs in it before `exec` is the
//! `pre_exec` closure set by [`prepare`], which only makes async-signal-safe calls
//! (`fcntl`, `dup2`, `prctl`) and allocates nothing: a multi-threaded parent's allocator
//! lock may be held by a thread that does not exist in the child. This module never forks
//! bare.
#![allow(unsafe_code)]

use baton_proto::LISTEN_FDS_START;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::Mutex;

/// Makes `cmd`'s child start with `fds[i]` at fd `3 + i` (inheritable, whatever the
/// flags of the originals) and with no ambient capabilities. It adds nothing else to what
/// the child inherits.
///
/// `fds` are duplicated now and the duplicates are held by `cmd`, so they are open
/// whenever it is spawned, and closed with it. Call it from one thread only, just before
/// spawning: it fills the free fd numbers below `3 + fds.len()` (see `reserve_low_fds`).
pub fn prepare(cmd: &mut Command, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    let held: Vec<OwnedFd> = fds
        .iter()
        .map(|fd| fd.try_clone_to_owned())
        .collect::<Result<_, _>>()?;
    // The targets must not hold anything `Command` itself uses in the child (its
    // exec-error pipe is created just before fork, at the lowest free numbers).
    reserve_low_fds(LISTEN_FDS_START + held.len() as RawFd)?;
    // Filled in the child: allocated here, since the child must not allocate.
    let mut moved: Vec<RawFd> = vec![-1; held.len()];
    let in_child = move || -> std::io::Result<()> {
        // SAFETY: this closure runs only in the child, between fork and exec (it is the
        // `pre_exec` hook below), which is what `place_fds` requires.
        unsafe { place_fds(&held, &mut moved) }?;
        clear_ambient_capabilities()
    };
    // SAFETY: `pre_exec` requires the closure to be async-signal-safe. It only calls
    // fcntl, dup2 and prctl, which are; it writes into `moved`, allocated in the parent,
    // and builds `io::Error`s from errno, which does not allocate. It reads the fds of
    // `held`, which the closure owns, so they are open in the parent when `cmd` is
    // spawned and therefore in the child.
    unsafe {
        cmd.pre_exec(in_child);
    }
    Ok(())
}

/// Fills every free fd number below `end` with `/dev/null` (close-on-exec), kept open for
/// the process's life, so that fds opened later (`Command`'s exec-error pipe among them)
/// land above the range that [`place_fds`] overwrites in the child. Nothing must open an
/// fd between this and the fork: the caller spawns from one thread. (An fd opened earlier
/// inside the range is no problem: `place_fds` moves every source above the range before
/// it overwrites anything.)
fn reserve_low_fds(end: RawFd) -> std::io::Result<()> {
    static RESERVED: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());
    let mut reserved = RESERVED.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let fd: OwnedFd = std::fs::File::open("/dev/null")?.into();
        if fd.as_raw_fd() >= end {
            return Ok(());
        }
        reserved.push(fd);
    }
}

/// Moves `fds[i]` to `3 + i`. Every source is first duplicated above the target range
/// (into `moved`, as long as `fds`), so a source that already sits inside `3..3+len` is
/// never overwritten before it is moved. The duplicates are close-on-exec; the targets are
/// not (dup2 clears the flag). Makes only async-signal-safe calls and allocates nothing.
///
/// # Safety
///
/// Only in a child between `fork` and `exec`: it overwrites fds `3..3+fds.len()`, which in
/// any other process belong to someone else. In the child nothing else runs before `exec`
/// replaces the program, so no other owner of those numbers ever uses them again.
unsafe fn place_fds(fds: &[OwnedFd], moved: &mut [RawFd]) -> std::io::Result<()> {
    let above = LISTEN_FDS_START + fds.len() as RawFd;
    for (fd, slot) in fds.iter().zip(moved.iter_mut()) {
        // SAFETY: F_DUPFD_CLOEXEC on an fd `fds` owns makes a new fd above the target
        // range, which this function owns until exec closes it; no memory is passed.
        let n = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, above) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        *slot = n;
    }
    for (i, &fd) in moved.iter().enumerate() {
        // SAFETY: dup2 onto `3 + i`, which the caller's contract gives us (a child about
        // to exec); `fd` is the duplicate made above. No memory is passed.
        if unsafe { libc::dup2(fd, LISTEN_FDS_START + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Clears the calling thread's ambient capabilities, so none survives an `exec`.
/// Async-signal-safe; allocates nothing.
fn clear_ambient_capabilities() -> std::io::Result<()> {
    // SAFETY: prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL) takes integer arguments only
    // (the unused ones zero, as the kernel requires) and changes only this thread's
    // capability sets.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        // Kernels without ambient capabilities have none to clear.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsFd;

    /// A pipe whose read end holds `text`, its write end closed.
    fn pipe_with(text: &str) -> OwnedFd {
        // Close-on-exec, so that no other test's child keeps the write end open.
        let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        std::fs::File::from(write)
            .write_all(text.as_bytes())
            .unwrap();
        read
    }

    #[test]
    fn a_child_finds_each_fd_at_its_number() {
        // Six sources, passed in the reverse order of their numbers.
        let pipes: Vec<OwnedFd> = (0..6).map(|i| pipe_with(&format!("pipe {i}"))).collect();
        let mut order: Vec<usize> = (0..6).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(pipes[i].as_raw_fd()));
        let fds: Vec<BorrowedFd<'_>> = order.iter().map(|&i| pipes[i].as_fd()).collect();
        let mut cmd = Command::new("/bin/sh");
        // fd 3+j must hold the pipe passed at j, and be inherited (not close-on-exec);
        // single-digit fds suit any sh.
        cmd.args(["-c", "for n in 3 4 5 6 7 8; do cat <&$n; echo; done"]);
        prepare(&mut cmd, &fds).unwrap();
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let expected: String = order.iter().map(|i| format!("pipe {i}\n")).collect();
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    }

    #[test]
    fn the_duplicates_live_as_long_as_the_command() {
        let read = pipe_with("still here");
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "cat <&3"]);
        prepare(&mut cmd, &[read.as_fd()]).unwrap();
        // The caller's fd may close before the spawn: the command holds its own.
        drop(read);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "still here");
    }
}
