//! The notify-message parser: see `baton::fuzzing::notify`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| baton::fuzzing::notify(data));
