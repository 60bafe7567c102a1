//! The `baton` commands: `run`, `check`, `upgrade`, `status`, `stop`.
//!
//! Exit statuses: 0 success; 1 invalid (config, plugins), failed or rolled back; 2 the
//! supervisor is unreachable; 3 `--timeout` passed before the upgrade ended.

use crate::config::{Config, ConfigError, PathContext, control_socket_lenient};
use crate::control::{ControlSocket, Reply, Request};
use crate::core::CanaryCall;
use crate::events::Event;
use crate::listeners::{Activated, ListenerSet};
use crate::metrics::MetricsListener;
use crate::notify::{Systemd, WorkerSocket};
use crate::status::UpgradeResult;
use crate::supervisor::Supervisor;
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use futures_util::StreamExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Zero-downtime hot-restart supervisor for HTTP services.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about,
    after_long_help = AFTER_HELP
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The part of `--help` and the man page that no option carries.
const AFTER_HELP: &str = "\
Signals to `baton run`: SIGUSR2 or SIGHUP start an upgrade; SIGTERM or SIGINT stop \
gracefully (every generation drains); SIGQUIT stops fast (workers are killed); SIGUSR1 \
makes the workers reopen the access log file.

Exit status: 0 success; 1 invalid config or plugins, a failed or rolled-back upgrade; \
2 the supervisor is unreachable; 3 `upgrade --wait --timeout` passed before the upgrade ended.

Environment: BATON_CONFIG names the config when -c is not given (default \
/etc/baton/baton.toml); BATON_LOG sets the log level (off, error, warn, info, debug, trace).

The README (/usr/local/share/doc/baton/README.md when installed) describes the config \
keys, the plugin ABI and operation under systemd.";

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the supervisor in the foreground.
    Run(ConfigArg),
    /// Check what `run` would refuse at start (config, worker binary, artifact cache, control
    /// socket directory, listeners, plugins) without serving; exit 1 and say what is wrong
    /// where.
    Check(ConfigArg),
    /// Start the next generation from what is on disk now; the supervisor first re-execs
    /// itself in place (same pid) when the baton binary on disk is not the one running.
    Upgrade {
        #[command(flatten)]
        config: ConfigArg,
        /// Wait until the new generation serves (exit 0) or was rolled back (exit 1); with
        /// `[upgrade] canary`, until the canary is decided.
        #[arg(long)]
        wait: bool,
        /// Only upgrade the supervisor: re-exec the baton binary on disk in place (same
        /// pid, same sockets); the workers keep serving untouched.
        #[arg(long)]
        supervisor: bool,
        /// With --wait, give up after this long (exit 3), e.g. "90s".
        #[arg(long, value_parser = humantime::parse_duration, requires = "wait")]
        timeout: Option<Duration>,
        /// Promote the running canary now (`[upgrade] canary`): the generation it is
        /// compared with drains. Exit 1 if no canary runs.
        #[arg(long, conflicts_with_all = ["supervisor", "abort", "wait"])]
        promote: bool,
        /// Roll the running canary back now: it drains, the serving generation goes on.
        /// Exit 1 if no canary runs.
        #[arg(long, conflicts_with_all = ["supervisor", "wait"])]
        abort: bool,
    },
    /// Show generations, their state, pids, connections and requests.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the status document as JSON (see docs/status.md).
        #[arg(long)]
        json: bool,
    },
    /// Drain every generation and stop the supervisor.
    Stop {
        #[command(flatten)]
        config: ConfigArg,
        /// Wait until the supervisor has stopped.
        #[arg(long)]
        wait: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Read a supervisor's handover state from fd N and say which release this is (run by
    /// a supervisor upgrading itself, before it executes this binary).
    #[command(hide = true)]
    HandoverCheck {
        #[arg(long)]
        fd: i32,
    },
    /// Print the man page baton(1) in roff, or write it and one page per command into DIR.
    Manpage {
        /// Write baton.1 and baton-<command>.1 here instead.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// The config file.
    #[arg(
        short = 'c',
        long = "config",
        env = "BATON_CONFIG",
        default_value = "/etc/baton/baton.toml"
    )]
    path: PathBuf,
}

/// The process environment, read once at the top of `main`.
#[derive(Debug, Clone, Default)]
pub struct Env {
    listen_pid: Option<String>,
    listen_fds: Option<String>,
    listen_fdnames: Option<String>,
    notify_socket: bool,
    watchdog: Option<Duration>,
    runtime_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    journal: bool,
    /// Started by systemd as part of a unit (`INVOCATION_ID`).
    invocation: bool,
    /// A previous supervisor image's state (`BATON_HANDOVER_FD`): this is a re-exec.
    handover_fd: Option<i32>,
    /// The previous image's binary, to return to (`BATON_HANDOVER_FALLBACK_FD`).
    fallback_fd: Option<i32>,
    /// Why the image this state was handed to refused it (`BATON_HANDOVER_REJECTED`).
    rejected: Option<String>,
}

impl Env {
    pub fn read() -> Self {
        let var = |name: &str| std::env::var(name).ok();
        let watchdog_for_us =
            var("WATCHDOG_PID").is_none_or(|p| p.parse::<u32>().ok() == Some(std::process::id()));
        Self {
            listen_pid: var("LISTEN_PID"),
            listen_fds: var("LISTEN_FDS"),
            listen_fdnames: var("LISTEN_FDNAMES"),
            notify_socket: std::env::var_os("NOTIFY_SOCKET").is_some(),
            watchdog: var("WATCHDOG_USEC")
                .and_then(|u| u.parse::<u64>().ok())
                .filter(|&u| u > 0 && watchdog_for_us)
                .map(Duration::from_micros),
            runtime_dir: var("RUNTIME_DIRECTORY")
                .and_then(|d| d.split(':').next().map(PathBuf::from))
                .filter(|d| !d.as_os_str().is_empty()),
            cache_dir: var("CACHE_DIRECTORY")
                .and_then(|d| d.split(':').next().map(PathBuf::from))
                .filter(|d| !d.as_os_str().is_empty()),
            journal: std::env::var_os("JOURNAL_STREAM").is_some(),
            invocation: std::env::var_os("INVOCATION_ID").is_some(),
            handover_fd: var(crate::handover::ENV_FD).and_then(|v| v.parse().ok()),
            fallback_fd: var(crate::handover::ENV_FALLBACK_FD).and_then(|v| v.parse().ok()),
            rejected: var(crate::handover::ENV_REJECTED),
        }
    }

    fn path_context(&self) -> PathContext {
        let exe_dir = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
            .unwrap_or_else(|| PathBuf::from("."));
        PathContext {
            exe_dir,
            runtime_dir: self.runtime_dir.clone(),
            cache_dir: self.cache_dir.clone(),
        }
    }
}

pub fn main(cli: Cli, env: Env) -> ExitCode {
    init_tracing(env.journal);
    // Absolute from here on, so every path derived from the config's (plugins, cache,
    // control socket) is absolute in status, logs and process titles.
    let absolute = |c: ConfigArg| crate::trust::absolute(&c.path);
    let result = match cli.command {
        Command::Run(c) => run(&absolute(c), env),
        Command::Check(c) => check(&absolute(c), &env),
        Command::Upgrade {
            config,
            wait,
            supervisor,
            timeout,
            promote,
            abort,
        } => {
            let request = match (promote, abort) {
                (true, _) => Request::Canary {
                    decision: CanaryCall::Promote,
                },
                (_, true) => Request::Canary {
                    decision: CanaryCall::Abort,
                },
                _ => Request::Upgrade { wait, supervisor },
            };
            client(&absolute(config), &env, request, timeout, false)
        }
        Command::Status { config, json } => {
            client(&absolute(config), &env, Request::Status, None, json)
        }
        Command::Stop { config, wait } => {
            client(&absolute(config), &env, Request::Stop { wait }, None, false)
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "baton", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Command::Manpage { dir } => manpages(dir.as_deref()),
        Command::HandoverCheck { fd } => match crate::supervisor::handover_check(fd) {
            Ok(build) => {
                println!("{}", serde_json::to_string(&build).expect("serialises"));
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("baton handover-check: {e}");
                Ok(ExitCode::from(1))
            }
        },
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("baton: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `baton manpage`: baton(1) to stdout, or every page into `dir`.
fn manpages(dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let command = <Cli as clap::CommandFactory>::command();
    let Some(dir) = dir else {
        clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
        return Ok(ExitCode::SUCCESS);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let mut written = vec![dir.join("baton.1")];
    clap_mangen::Man::new(command.clone()).render(&mut std::fs::File::create(&written[0])?)?;
    for sub in command.get_subcommands().filter(|s| !s.is_hide_set()) {
        // clap names are 'static; this command runs once and exits.
        let name: &'static str = format!("baton-{}", sub.get_name()).leak();
        let path = dir.join(format!("{name}.1"));
        let usage: &'static str = format!("baton {}", sub.get_name()).leak();
        let page = sub.clone().name(name).bin_name(usage);
        clap_mangen::Man::new(page).render(&mut std::fs::File::create(&path)?)?;
        written.push(path);
    }
    for path in written {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
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

fn run(path: &Path, env: Env) -> anyhow::Result<ExitCode> {
    if let Some(fd) = env.handover_fd {
        return resume(fd, env);
    }
    // Socket-activation fds are taken before anything else opens an fd.
    let activated = Activated::from_env(
        env.listen_pid.as_deref(),
        env.listen_fds.as_deref(),
        env.listen_fdnames.as_deref(),
    )?;
    baton_sys::inherit::cloexec_inherited();
    let ctx = env.path_context();
    crate::trust::check_config(path)?;
    let config = Config::load(path, &ctx)?;
    let image = crate::supervisor::Image::first(
        std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe")),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        // Signals first: from here on SIGTERM drains instead of killing us.
        let signals = install_signals()?;
        let control = ControlSocket::bind(&config.control_socket)?;
        let listeners = ListenerSet::open(&config, activated)?;
        let notify =
            Arc::new(WorkerSocket::bind_abstract().context("bind the worker notify socket")?);
        let lifeline =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("create the lifeline pipe")?;
        let systemd = Systemd::from_env(env.notify_socket, env.watchdog);
        let listeners = listeners.with_fd_store(systemd.clone());
        let control_dup = control.handover().context("control socket")?;
        let metrics = match &config.metrics_address {
            Some(address) => Some(
                MetricsListener::bind(address)
                    .with_context(|| format!("metrics.address {address}: cannot listen"))?,
            ),
            None => None,
        };
        let metrics_dup = match &metrics {
            Some(m) => Some((m.handover().context("metrics listener")?, m.address.clone())),
            None => None,
        };
        start_tasks(signals, &notify, &systemd, control, metrics, &events_tx);
        let supervisor = Supervisor::new(
            &config,
            path.to_owned(),
            ctx,
            listeners,
            lifeline,
            control_dup,
            image,
            notify,
            systemd,
            events_tx,
        )
        .with_metrics(metrics_dup);
        finish(supervisor.run(config, events_rx).await)
    })
}

/// `run` in an image a supervisor re-exec started: the state comes from the previous
/// image, every socket and worker is inherited.
fn resume(fd: i32, env: Env) -> anyhow::Result<ExitCode> {
    // The kernel names the process after the file it executed (the cache's
    // `baton-<sha256>`): ps, top and the journal should go on saying `baton`.
    let _ = nix::sys::prctl::set_name(c"baton");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let (events_tx, events_rx) = tokio::sync::mpsc::unbounded_channel();
        let signals = install_signals()?;
        let systemd = Systemd::from_env(env.notify_socket, env.watchdog);
        let resumed = crate::supervisor::resume(
            fd,
            env.fallback_fd,
            env.rejected.clone(),
            systemd.clone(),
            events_tx.clone(),
        )
        .map_err(|e| anyhow::anyhow!("cannot take over from the previous supervisor image: {e}"))?;
        // Alive and in charge: the previous image's last ping was just before its `exec`,
        // and starting the next generation may take a moment before the loop runs.
        systemd.watchdog();
        baton_sys::inherit::cloexec_inherited();
        start_tasks(
            signals,
            &resumed.notify,
            &systemd,
            resumed.control,
            resumed.metrics,
            &events_tx,
        );
        // Signals that came during the exec were held back; they arrive now, handled.
        crate::supervisor::release_held_signals();
        finish(
            resumed
                .supervisor
                .run_resumed(resumed.input, events_rx)
                .await,
        )
    })
}

fn install_signals() -> anyhow::Result<signal_hook_tokio::Signals> {
    signal_hook_tokio::Signals::new([
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGHUP,
        libc::SIGTERM,
        libc::SIGINT,
        libc::SIGQUIT,
    ])
    .context("install signal handlers")
}

/// The tasks that turn signals, worker datagrams, the watchdog, the control socket and
/// metrics scrapes into events.
fn start_tasks(
    signals: signal_hook_tokio::Signals,
    notify: &Arc<WorkerSocket>,
    systemd: &Systemd,
    control: ControlSocket,
    metrics: Option<MetricsListener>,
    events: &tokio::sync::mpsc::UnboundedSender<Event>,
) {
    tokio::spawn(pump_signals(signals, events.clone()));
    tokio::spawn(pump_notify(notify.clone(), events.clone()));
    if let Some(every) = systemd.watchdog_interval() {
        let events = events.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if events.send(Event::WatchdogTick).is_err() {
                    return;
                }
            }
        });
    }
    tokio::spawn(control.serve(events.clone()));
    if let Some(metrics) = metrics {
        tokio::spawn(metrics.serve(events.clone()));
    }
}

fn finish(result: Result<(), String>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(()) => {
            tracing::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => Err(anyhow::anyhow!(reason)),
    }
}

/// Turns the supervisor's signals into events.
async fn pump_signals(
    mut signals: signal_hook_tokio::Signals,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
) {
    while let Some(signal) = signals.next().await {
        let event = match signal {
            libc::SIGUSR1 => Event::ReopenLogs,
            libc::SIGUSR2 => Event::Upgrade {
                source: "SIGUSR2",
                reply: None,
                supervisor: false,
            },
            libc::SIGHUP => Event::Upgrade {
                source: "SIGHUP",
                reply: None,
                supervisor: false,
            },
            libc::SIGTERM => Event::Stop {
                fast: false,
                source: "SIGTERM",
                reply: None,
            },
            libc::SIGINT => Event::Stop {
                fast: false,
                source: "SIGINT",
                reply: None,
            },
            libc::SIGQUIT => Event::Stop {
                fast: true,
                source: "SIGQUIT",
                reply: None,
            },
            _ => continue,
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

async fn pump_notify(socket: Arc<WorkerSocket>, events: tokio::sync::mpsc::UnboundedSender<Event>) {
    loop {
        match socket.recv().await {
            Ok((pid, message)) => {
                if events.send(Event::Notify { pid, message }).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!("worker notify socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn check(path: &Path, env: &Env) -> anyhow::Result<ExitCode> {
    let failed = |e: &dyn std::fmt::Display| {
        eprintln!("baton check: {e}");
        Ok(ExitCode::from(1))
    };
    if let Err(e) = crate::trust::check_config(path) {
        return failed(&e);
    }
    let config = match Config::load(path, &env.path_context()) {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let worker = &config.worker.path;
    if let Err(e) = crate::artifacts::check_worker_binary(worker) {
        return failed(&format!("{}: {e}", path.display()));
    }
    // What `run` would refuse at start besides the artifacts: the control socket's
    // directory and the listeners. What cannot be checked from here is said.
    let mut notes = Vec::new();
    let running = std::os::unix::net::UnixStream::connect(&config.control_socket).is_ok();
    if running {
        notes.push(format!(
            "a supervisor is running with this config (control socket {}): its listeners were not bound again",
            config.control_socket.display()
        ));
    } else {
        if let Err(e) = crate::control::check_private_dir(&config.control_socket) {
            return failed(&e);
        }
        for l in &config.listeners {
            match crate::listeners::probe(l, env.listen_fdnames.as_deref(), env.invocation) {
                Ok(None) => {}
                Ok(Some(note)) => notes.push(note),
                Err(e) => return failed(&e),
            }
        }
    }
    // Held until the check is done, so that a supervisor sharing the cache does not prune
    // what the throw-away worker is about to load.
    let mut artifacts = crate::artifacts::ArtifactCache::default();
    let binary = match artifacts.worker_binary(&config) {
        Ok(b) => b,
        Err(e) => return failed(&e),
    };
    let plugins = match crate::plugins::prepare(&config, &mut artifacts) {
        Ok(p) => p,
        Err(e) => return failed(&e),
    };
    let now = std::time::SystemTime::now();
    let tls = crate::tls::new_ticket_chain(now)
        .map_err(crate::tls::TlsError::Memfd)
        .and_then(|tickets| crate::tls::prepare(&config, &tickets, now));
    let tls = match tls {
        Ok(tls) => tls,
        Err(e) => return failed(&e),
    };
    let report = match check_plugins(&config, &binary, &plugins) {
        Ok(report) => report,
        Err(e) => return failed(&format!("{e:#}")),
    };
    println!("{}: OK", crate::trust::absolute(path).display());
    for l in &config.listeners {
        let addr = l
            .address
            .as_ref()
            .map_or("(from systemd socket activation)".to_owned(), |a| {
                a.to_string()
            });
        println!(
            "  listener {:?}: {addr}{}",
            l.name,
            if l.tls.is_some() { " (TLS)" } else { "" }
        );
        let certificates = tls
            .iter()
            .flat_map(|t| &t.listeners)
            .filter(|c| c.listener == l.name)
            .flat_map(|c| &c.certificates);
        for c in certificates {
            let days = c.days_left(now);
            println!(
                "    certificate {} ({}; {}), sha256 {}, valid until {}: {days} day(s) left{}",
                c.chain,
                c.subject,
                c.names.join(", "),
                c.sha256,
                crate::tls::time_text(c.not_after),
                if days < crate::tls::EXPIRY_WARNING_DAYS {
                    " (expires soon)"
                } else {
                    ""
                }
            );
        }
    }
    println!(
        "  worker: {} x{} (ready_timeout {}, drain_timeout {}, max_generations {})",
        crate::trust::absolute(worker).display(),
        config.worker.processes,
        humantime::format_duration(config.worker.ready_timeout),
        humantime::format_duration(config.worker.drain_timeout),
        config.worker.max_generations
    );
    if let Some(window) = config.upgrade.canary {
        println!(
            "  upgrade: canary {} (at least {} request(s), error ratio at most {} above the old generation's)",
            humantime::format_duration(window),
            config.upgrade.canary_min_requests,
            config.upgrade.canary_max_error_ratio_increase
        );
    }
    if report.is_empty() {
        println!(
            "  plugins: none in {}",
            crate::trust::absolute(&config.plugins.dir).display()
        );
    }
    for p in report {
        println!(
            "  plugin {} {} from {} (sha256 {}, {})",
            p["name"].as_str().unwrap_or("?"),
            p["version"].as_str().unwrap_or("?"),
            p["file"].as_str().unwrap_or("?"),
            p["hash"].as_str().unwrap_or("?"),
            if p["nonblocking"] == true {
                "non-blocking"
            } else {
                "blocking"
            }
        );
        for r in p["routes"].as_array().into_iter().flatten() {
            println!("    {}", r.as_str().unwrap_or("?"));
        }
    }
    println!(
        "  control socket: {}",
        crate::trust::absolute(&config.control_socket).display()
    );
    println!(
        "  artifact cache: {}",
        crate::trust::absolute(&config.plugins.cache_dir).display()
    );
    for note in notes {
        println!("  not checked: {note}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads the plugin set in a throw-away worker (`baton-worker --check`), never in this
/// process, and returns its report: one JSON object per plugin. The worker and the
/// plugins are the checked cache files, handed over open, as a generation gets them.
fn check_plugins(
    config: &Config,
    binary: &crate::artifacts::WorkerBinary,
    plugins: &[crate::plugins::CachedPlugin],
) -> anyhow::Result<Vec<serde_json::Value>> {
    if plugins.is_empty() {
        return Ok(Vec::new());
    }
    let specs = crate::spawn::numbered(plugins, baton_proto::LISTEN_FDS_START);
    let mut cmd = crate::spawn::worker_command(binary, plugins, Vec::new(), None)?;
    let mut child = cmd
        .arg("--check")
        .env(
            baton_proto::ENV_SETTINGS,
            config.worker_settings(specs).to_json(),
        )
        .env(baton_proto::ENV_GENERATION, "0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {} --check", binary.cached().display()))?;
    let deadline = std::time::Instant::now() + config.worker.ready_timeout;
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "loading the plugins took longer than worker.ready_timeout ({})",
                humantime::format_duration(config.worker.ready_timeout)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        anyhow::bail!("{}", stderr.trim());
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).context("bad report from baton-worker --check"))
        .collect()
}

fn client(
    path: &Path,
    env: &Env,
    request: Request,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let socket = match control_socket_lenient(path, &env.path_context()) {
        Ok(socket) => socket,
        Err(e) => {
            let e: &dyn std::fmt::Display = match &e {
                ConfigError::Read { error, .. } => error,
                other => other,
            };
            eprintln!(
                "baton: cannot read the config {} to find the control socket: {e}\n\
                 (name the config with -c FILE or BATON_CONFIG; the default is /etc/baton/baton.toml)",
                crate::trust::absolute(path).display()
            );
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let unreachable = |e: std::io::Error| {
            let socket = crate::trust::absolute(&socket);
            match e.kind() {
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => eprintln!(
                    "baton: no supervisor is listening on {} ({e}): is `baton run -c {}` running with this config?",
                    socket.display(),
                    crate::trust::absolute(path).display()
                ),
                _ => eprintln!("baton: supervisor unreachable at {}: {e}", socket.display()),
            }
            ExitCode::from(2)
        };
        let mut replies = match crate::control::request(&socket, &request).await {
            Ok(r) => r,
            Err(e) => return Ok(unreachable(e)),
        };
        let first = match replies.next().await {
            Ok(Some(reply)) => reply,
            Ok(None) => return Ok(unreachable(std::io::ErrorKind::ConnectionAborted.into())),
            Err(e) => return Ok(unreachable(e)),
        };
        match (&request, first) {
            (_, Reply::Error { message }) => {
                eprintln!("baton: the supervisor refused the request: {message}");
                Ok(ExitCode::from(1))
            }
            (Request::Status, Reply::Status { status }) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    print!("{}", status.render());
                }
                Ok(ExitCode::SUCCESS)
            }
            (Request::Canary { .. }, Reply::Upgrade { outcome }) => {
                // The decision asked for was made: the canary serves or was rolled back.
                println!("upgrade {}", outcome.describe());
                Ok(ExitCode::SUCCESS)
            }
            (Request::Upgrade { wait: false, .. }, Reply::Accepted { message })
            | (Request::Stop { wait: false }, Reply::Accepted { message }) => {
                println!("{message}");
                Ok(ExitCode::SUCCESS)
            }
            (Request::Upgrade { wait: true, .. }, Reply::Accepted { .. }) => {
                let next = match timeout {
                    Some(t) => match tokio::time::timeout(t, replies.next()).await {
                        Ok(r) => r,
                        Err(_) => {
                            eprintln!(
                                "baton: no result within {}; the upgrade may still complete (see baton status)",
                                humantime::format_duration(t)
                            );
                            return Ok(ExitCode::from(3));
                        }
                    },
                    None => replies.next().await,
                };
                match next {
                    Ok(Some(Reply::Upgrade { outcome })) => {
                        if outcome.result == UpgradeResult::Succeeded {
                            println!("upgrade {}", outcome.describe());
                            Ok(ExitCode::SUCCESS)
                        } else {
                            eprintln!("upgrade {}", outcome.describe());
                            Ok(ExitCode::from(1))
                        }
                    }
                    Ok(other) => {
                        eprintln!("baton: unexpected reply {other:?}");
                        Ok(ExitCode::from(2))
                    }
                    Err(e) => Ok(unreachable(e)),
                }
            }
            (Request::Stop { wait: true }, Reply::Accepted { .. }) => {
                // The supervisor replies `stopped` just before it exits; EOF means the same.
                match replies.next().await {
                    Ok(Some(Reply::Stopped)) | Ok(None) => {
                        println!("stopped");
                        Ok(ExitCode::SUCCESS)
                    }
                    Ok(Some(other)) => {
                        eprintln!("baton: unexpected reply {other:?}");
                        Ok(ExitCode::from(2))
                    }
                    Err(e) => Ok(unreachable(e)),
                }
            }
            (_, other) => {
                eprintln!("baton: unexpected reply {other:?}");
                Ok(ExitCode::from(2))
            }
        }
    })
}
