//! `baton-worker`: see the library.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    baton_worker::main()
}
