//! Whether some process has a file open for writing, asked of the kernel with a read lease.
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
    // SAFETY: fcntl(F_SETLEASE) takes an int argument and only changes the lease state of
    // this open file description; `file` is borrowed, so the caller's fd stays open for the
    // call and stays the caller's.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn a_lease_is_refused_exactly_while_a_writer_has_the_file_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leased");
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
    }
}
