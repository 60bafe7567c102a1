//! Random bytes from the kernel, for names that must not be guessed.
#![allow(unsafe_code)]

/// Fills `buf` from `getrandom(2)` (blocking until the kernel's pool is initialised, as
/// early in boot it may not be). Meant for short buffers: up to 256 bytes come whole.
pub fn fill(buf: &mut [u8]) -> std::io::Result<()> {
    // SAFETY: getrandom writes at most `buf.len()` bytes to `buf`, which is valid and
    // exclusively borrowed for that length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    if n as usize != buf.len() {
        return Err(std::io::Error::other(format!(
            "getrandom gave {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn two_fills_differ() {
        let (mut a, mut b) = ([0u8; 16], [0u8; 16]);
        super::fill(&mut a).unwrap();
        super::fill(&mut b).unwrap();
        assert_ne!(a, b);
        assert_ne!(a, [0u8; 16]);
    }
}
