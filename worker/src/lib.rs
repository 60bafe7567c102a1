//! `baton-worker`: serves HTTP on inherited listeners until told to drain. The binary is
//! [`main`]; the library exists so that fuzz targets can drive one HTTP connection
//! ([`fuzzing`]).
//!
//! The environment is read once, in [`main`], before any thread starts; everything after
//! works from that snapshot.
//!
//! No `unsafe` here: the plugin loader is `baton-loader`, the system calls are `baton-sys`.
//!
//! Modules, each importing only those below it: `serve` (accept loops, the drain) →
//! `connection` (one connection) → `handle` (one request) → `websocket` (a WebSocket
//! route's upgrade and connection) and `stream` (a deferred answer's body, a streamed
//! request body) → `conn_state` (what a connection and its requests share) → `shared`
//! (what every connection shares) → `metrics` (its counters), `router`, `drain`; beside them `inherit`, `env`,
//! `notify` and `lazy_select`.
#![forbid(unsafe_code)]

mod access_log;
mod conn_state;
mod connection;
mod drain;
mod env;
pub mod fuzzing;
mod h2_idle;
mod handle;
mod idle;
mod inherit;
mod lazy_select;
mod metrics;
mod notify;
mod router;
mod serve;
mod shared;
mod stream;
mod tls;
mod websocket;
mod ws_frames;

use std::process::ExitCode;

/// The `baton-worker` program.
pub fn main() -> ExitCode {
    let env = env::WorkerEnv::read();
    init_tracing(env.journal);
    let notifier = notify::Notifier::new(env.notify_socket.clone());
    let check = env.check;
    match run(env, &notifier) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if check => {
            eprintln!("{err:#}");
            ExitCode::FAILURE
        }
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
    inherit::close_exe(&env)?;
    if let Some(theirs) = &env.supervisor_protocol {
        let theirs: u32 = theirs
            .parse()
            .map_err(|_| anyhow::anyhow!("bad {}={theirs:?}", baton_proto::ENV_WORKER_PROTOCOL))?;
        baton_proto::check_worker_protocol(theirs, "supervisor").map_err(anyhow::Error::msg)?;
    }
    let settings = env.settings()?;
    if env.check {
        return check(&settings, env.generation, notifier);
    }
    // First: plugins' own threads, started by their init, inherit it too.
    if settings.batch_scheduling {
        batch_scheduling();
    }
    let span = tracing::info_span!(
        "worker",
        generation = env.generation,
        pid = std::process::id()
    );
    let listeners = inherit::listeners(&env)?;
    let lifeline = inherit::lifeline(&env)?;
    let tls = tls::load(env.tls_fd.as_deref(), &settings.tls)?;
    let router = span.in_scope(|| load_plugins(&settings, env.generation, notifier))?;
    let threads = match settings.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    // One thread: the current-thread scheduler, which skips work stealing altogether.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let runtime = builder
        .max_blocking_threads(settings.blocking_threads.max(1) + BLOCKING_SPARE)
        .enable_all()
        .build()?;
    let served = runtime.block_on(tracing::Instrument::instrument(
        serve::serve(
            env.generation,
            settings,
            listeners,
            lifeline,
            router,
            tls,
            notifier.clone(),
        ),
        span,
    ));
    // Dropping the runtime would wait for every blocking handler still running (a forced
    // close leaves them behind): the worker must exit now, so they are abandoned, and the
    // process's exit ends their threads.
    runtime.shutdown_background();
    served
}

/// Moves the worker to `SCHED_BATCH` before it starts any thread (its runtime's and its
/// plugins' inherit it), unless it runs under a policy set on purpose. Under the normal
/// policy a worker thread woken by a request preempts whatever runs on that CPU (the
/// client of a local benchmark, a neighbouring service, another worker thread) after every
/// few requests; under `SCHED_BATCH` it waits for that task's time slice or sleep and then
/// finds several requests ready, at the same share of the CPU. Measured on two cores
/// shared with wrk: keep-alive from 0.88x to 1.06x nginx's throughput under
/// `wrk -t1 -c64` (docs/BENCHMARKS.md, "What profiling found and changed").
fn batch_scheduling() {
    match baton_sys::scheduling::batch_if_normal() {
        Ok(true) => tracing::debug!("scheduling policy: SCHED_BATCH"),
        Ok(false) => tracing::info!("scheduling policy left as set (not the normal one)"),
        Err(e) => tracing::warn!("could not move to SCHED_BATCH: {e}"),
    }
}

/// Blocking threads beyond the plugins' share, for the runtime's own blocking work.
const BLOCKING_SPARE: usize = 4;

/// Loads every plugin, builds the router (refusing duplicate routes before any plugin
/// code beyond the entry point ran), then initialises the plugins in order.
fn load_plugins(
    settings: &baton_proto::WorkerSettings,
    generation: u64,
    notifier: &notify::Notifier,
) -> anyhow::Result<router::Router> {
    use anyhow::Context;
    let all: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&settings.plugin_settings_json)
            .context("plugin settings are not a JSON object")?;
    let mut loaded: Vec<std::sync::Arc<baton_loader::Plugin>> = Vec::new();
    for spec in &settings.plugins {
        // If loading kills the process, the supervisor's report says where it was.
        notifier.send(&format!("STATUS=loading plugin {}", spec.file));
        let file = spec.fd.map(inherit::plugin_file).transpose()?;
        let plugin = baton_loader::Plugin::load(spec, file)?;
        if let Some(other) = loaded.iter().find(|p| p.name == plugin.name) {
            anyhow::bail!(
                "plugin name {:?} is used by both {} and {}",
                plugin.name,
                other.spec.file,
                spec.file
            );
        }
        loaded.push(std::sync::Arc::new(plugin));
    }
    for name in all.keys() {
        if !loaded.iter().any(|p| &p.name == name) {
            tracing::warn!("[plugins.settings.{name}] names no loaded plugin");
        }
    }
    let router =
        router::Router::build(loaded, &settings.http.health_path).map_err(anyhow::Error::msg)?;
    for plugin in &router.plugins {
        let own = all
            .get(&plugin.name)
            .map_or_else(|| "{}".to_owned(), |v| v.to_string());
        plugin.initialise(&own, generation)?;
        tracing::info!(
            "plugin {} {} from {} (sha256 {}): {}",
            plugin.name,
            plugin.version,
            plugin.spec.file,
            &plugin.spec.hash[..plugin.spec.hash.len().min(12)],
            router::Router::describe(plugin).join(", ")
        );
    }
    Ok(router)
}

/// `baton-worker --check`: load and initialise the plugin set, print one JSON line per
/// plugin, shut them down again. Used by `baton check`; never serves.
fn check(
    settings: &baton_proto::WorkerSettings,
    generation: u64,
    notifier: &notify::Notifier,
) -> anyhow::Result<()> {
    let router = load_plugins(settings, generation, notifier)?;
    for plugin in &router.plugins {
        let line = serde_json::json!({
            "file": plugin.spec.file,
            "name": plugin.name,
            "version": plugin.version,
            "hash": plugin.spec.hash,
            "nonblocking": plugin.nonblocking,
            "routes": router::Router::describe(plugin),
        });
        println!("{line}");
        plugin.shut_down();
    }
    Ok(())
}

fn one_line(text: &str) -> String {
    text.replace('\n', " ")
}

fn init_tracing(journal: bool) {
    // BATON_LOG: off, error, warn, info (default), debug or trace.
    let filter: tracing_subscriber::filter::LevelFilter = std::env::var("BATON_LOG")
        .ok()
        .and_then(|level| level.parse().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    let builder = tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if journal {
        builder.without_time().init();
    } else {
        builder.init();
    }
}
