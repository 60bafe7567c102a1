//! `baton-worker`: see the library.

fn main() -> std::process::ExitCode {
    baton_worker::main()
}
