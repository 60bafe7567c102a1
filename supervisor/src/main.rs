//! `baton`: parse the command line, run the command, map the outcome to an exit status.
#![forbid(unsafe_code)]

use clap::Parser;

fn main() -> std::process::ExitCode {
    // The environment is read once, here, before any thread exists.
    let env = baton::commands::Env::read();
    let cli = baton::commands::Cli::parse();
    baton::commands::main(cli, env)
}
