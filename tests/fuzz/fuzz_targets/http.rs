//! The HTTP edge: see `baton_worker::fuzzing::http`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| baton_worker::fuzzing::http(data));
