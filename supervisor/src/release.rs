//! Which release of Baton this binary is, and which handover formats it reads.
//!
//! Both live in one marker in the binary's read-only data, `BATON-RELEASE:<version>;
//! handover=<format>`, read at run time through [`std::hint::black_box`] so that the
//! compiler never folds it into the code. A packager (or a test) can therefore tell two
//! builds apart by their marker alone, and the supervisor reports what the running image
//! says of itself, not what the source tree said when another image was built.

/// The newest handover format this release writes and reads (see `handover.rs`).
pub const HANDOVER_FORMAT: u32 = 1;

const MARKER_LEN: usize = 64;
const PREFIX: &[u8] = b"BATON-RELEASE:";

/// `BATON-RELEASE:<CARGO_PKG_VERSION>;handover=<HANDOVER_FORMAT>`, NUL-padded.
const fn marker() -> [u8; MARKER_LEN] {
    let mut out = [0u8; MARKER_LEN];
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    let format = b";handover=";
    let mut at = 0;
    let mut i = 0;
    while i < PREFIX.len() {
        out[at] = PREFIX[i];
        at += 1;
        i += 1;
    }
    i = 0;
    while i < version.len() {
        out[at] = version[i];
        at += 1;
        i += 1;
    }
    i = 0;
    while i < format.len() {
        out[at] = format[i];
        at += 1;
        i += 1;
    }
    // HANDOVER_FORMAT in decimal (it stays below 100).
    let n = HANDOVER_FORMAT;
    if n >= 10 {
        out[at] = b'0' + (n / 10) as u8;
        at += 1;
    }
    out[at] = b'0' + (n % 10) as u8;
    out
}

#[used]
static MARKER: [u8; MARKER_LEN] = marker();

/// What the marker says: (version, newest handover format read).
fn parse(marker: &[u8]) -> (String, u32) {
    let text = marker.strip_prefix(PREFIX).unwrap_or(marker);
    let end = text.iter().position(|&b| b == 0).unwrap_or(text.len());
    let text = String::from_utf8_lossy(&text[..end]);
    let (version, format) = text.split_once(";handover=").unwrap_or((&text, ""));
    (
        version.to_owned(),
        format.parse().unwrap_or(HANDOVER_FORMAT),
    )
}

/// This binary's release, e.g. `0.1.0`.
pub fn version() -> String {
    parse(std::hint::black_box(&MARKER)).0
}

/// The newest handover format this binary reads.
pub fn handover_format() -> u32 {
    parse(std::hint::black_box(&MARKER)).1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_names_the_crate_version_and_the_handover_format() {
        assert_eq!(version(), env!("CARGO_PKG_VERSION"));
        assert_eq!(handover_format(), HANDOVER_FORMAT);
        assert!(MARKER.starts_with(b"BATON-RELEASE:"));
    }

    #[test]
    fn a_patched_marker_is_read_as_written() {
        let mut m = [0u8; MARKER_LEN];
        let text = b"BATON-RELEASE:9.9.9-test;handover=0";
        m[..text.len()].copy_from_slice(text);
        assert_eq!(parse(&m), ("9.9.9-test".to_owned(), 0));
    }
}
