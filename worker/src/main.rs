//! `baton-worker`: serves HTTP on inherited listeners until told to drain.
//!
//! The environment is read once, here, before any thread starts; everything after works
//! from that snapshot.

mod drain;
mod env;
mod inherit;
mod notify;
mod serve;

use std::process::ExitCode;

fn main() -> ExitCode {
    let env = env::WorkerEnv::read();
    init_tracing(env.journal);
    let notifier = notify::Notifier::new(env.notify_socket.clone());
    match run(env, &notifier) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("worker failed: {err:#}");
            notifier.send(&format!(
                "STATUS=failed: {}\nERRNO={}",
                one_line(&format!("{err:#}")),
                libc::EINVAL
            ));
            ExitCode::FAILURE
        }
    }
}

fn run(env: env::WorkerEnv, notifier: &notify::Notifier) -> anyhow::Result<()> {
    let settings = env.settings()?;
    let listeners = inherit::listeners(&env)?;
    let lifeline = inherit::lifeline(&env)?;
    let threads = match settings.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    let span = tracing::info_span!(
        "worker",
        generation = env.generation,
        pid = std::process::id()
    );
    runtime.block_on(tracing::Instrument::instrument(
        serve::serve(
            env.generation,
            settings,
            listeners,
            lifeline,
            notifier.clone(),
        ),
        span,
    ))
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

fn init_tracing(journal: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if journal {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
