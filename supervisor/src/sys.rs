//! The few system calls the supervisor makes that `nix` does not wrap. The only module of
//! the supervisor besides `spawn` where `unsafe` is allowed; each call is plain, on an fd
//! or on nothing at all.
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd};

/// What a read lease on a file says about its writers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writers {
    /// The lease was granted (and let go at once): no process has it open for writing.
    None,
    /// Refused with `EAGAIN`: some process has it open for writing.
    Some,
    /// No lease can be taken here (not the file's owner and no `CAP_LEASE`, or a
    /// filesystem without leases): nothing is known.
    Unknown,
}

/// Asks for a read lease (`F_SETLEASE`, `F_RDLCK`) on `file`, which the kernel refuses
/// exactly while any process has the file open for writing, and lets it go at once.
pub fn writers(file: BorrowedFd<'_>) -> Writers {
    // SAFETY: fcntl with F_SETLEASE takes an int argument and only changes the lease
    // state of this open file, which we own for the duration.
    let taken = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_RDLCK) };
    if taken == 0 {
        // SAFETY: as above: releases the lease just taken.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
        return Writers::None;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN) => Writers::Some,
        _ => Writers::Unknown,
    }
}

/// Hands the heap memory freed after preparing a generation (plugin files are read whole
/// to be checked and hashed) back to the kernel, so the supervisor's resident size stays
/// what it needs rather than what its largest upgrade needed.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only returns the allocator's own free
    // memory to the kernel, and is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_lease_is_refused_exactly_while_a_writer_has_the_file_open() {
        let path = std::env::temp_dir().join(format!("baton-lease-{}", std::process::id()));
        std::fs::write(&path, b"x").unwrap();
        let reader = std::fs::File::open(&path).unwrap();
        assert_eq!(writers(reader.as_fd()), Writers::None);
        let writer = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        assert_eq!(writers(reader.as_fd()), Writers::Some);
        drop(writer);
        assert_eq!(writers(reader.as_fd()), Writers::None);
        std::fs::remove_file(&path).unwrap();
    }
}
