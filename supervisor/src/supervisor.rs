//! The shell around [`crate::core`]: the one event loop that owns the sockets, the worker
//! processes, the artifact cache and the systemd connection, turns [`Event`]s into the
//! core's inputs, and carries out the [`Effect`]s the core decides. It makes no decision
//! of its own about generations: what happens when a worker exits, an upgrade is asked
//! for or a timer fires is in `core/` (see its module header for where each rule lives).
//!
//! A `SIGUSR2`, in a few hops: `commands::pump_signals` sends [`Event::Upgrade`] →
//! [`Supervisor::on_event`] feeds `Input::Upgrade` → `core/upgrade.rs` answers
//! `Effect::Prepare` → [`Supervisor::prepare`] reads the config and caches the artifacts
//! → `Input::Prepared` → `Effect::Launch` and `Effect::Spawn` per worker →
//! [`Supervisor::spawn_worker`] → `spawn::spawn`.

mod reexec;
pub use reexec::{Image, handover_check, release_held_signals, resume};

use crate::artifacts::{ArtifactCache, WorkerBinaryError};
use crate::config::{Config, ConfigError, PathContext};
use crate::core::SelfUpgrade;
use crate::core::{Core, Effect, Input, Limits, Sig, SlotState, Systemd as Say, WaiterId};
use crate::events::{Event, UpgradeReply};
use crate::generation::{Artifacts, GenerationState, WorkerProcess};
use crate::listeners::{Listener, ListenerSet};
use crate::notify::{Systemd, WorkerSocket};
use crate::plugins::PluginError;
use crate::spawn::{SpawnError, SpawnSpec, spawn};
use crate::status::{
    GenerationInfo, ListenerInfo, STATUS_VERSION, StatusReport, SupervisorInfo, WorkerInfo,
    timestamp,
};
use nix::sys::signal::Signal;
use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

/// What the core holds for a generation: its artifacts, shared.
type Set = Arc<Artifacts>;

/// Why the next generation's artifacts could not be prepared. The core gets its message
/// as the reason the upgrade (or generation 1) was refused.
#[derive(Debug, Error)]
enum PrepareError {
    #[error("invalid config: {0}")]
    Config(ConfigError),
    #[error(transparent)]
    WorkerBinary(#[from] WorkerBinaryError),
    #[error(transparent)]
    Plugins(#[from] PluginError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// A generation's resources, made when the core launches it.
#[derive(Debug)]
struct Launched {
    listeners: Vec<Arc<Listener>>,
    settings_json: String,
    processes: HashMap<u32, WorkerProcess>,
}

#[derive(Debug)]
pub struct Supervisor {
    config_path: PathBuf,
    ctx: PathContext,
    listeners: ListenerSet,
    lifeline: OwnedFd,
    /// The lifeline's write end: open for as long as this process lives (across a
    /// re-exec too); workers see end-of-file on their read end when it is gone.
    lifeline_write: OwnedFd,
    /// A duplicate of the control socket's listening fd, and its path (for a re-exec).
    control: (OwnedFd, PathBuf),
    /// A duplicate of the metrics listener's fd, and its address (for a re-exec).
    metrics: Option<(OwnedFd, String)>,
    /// The supervisor's own binary.
    image: Image,
    /// A re-exec the core asked for, carried out once the current input is done.
    pending_reexec: Option<SelfUpgrade>,
    notify: Arc<WorkerSocket>,
    systemd: Systemd,
    events: mpsc::UnboundedSender<Event>,
    core: Core<Set>,
    launched: HashMap<u64, Launched>,
    cache: ArtifactCache,
    upgrade_waiters: HashMap<WaiterId, UpgradeReply>,
    stop_waiters: HashMap<WaiterId, oneshot::Sender<()>>,
    next_waiter: WaiterId,
    exit: Option<Result<(), String>>,
    started_at: SystemTime,
    /// The plugin directory being watched (`plugins.watch`), and the watching task.
    watcher: Option<(PathBuf, tokio::task::JoinHandle<()>)>,
    /// The session-ticket key chain every generation's TLS listeners share
    /// (`baton_proto::tls`): moved along at each prepare, handed over by a re-exec.
    tickets: baton_proto::tls::TicketKeys,
}

impl Supervisor {
    /// Goes on with the ticket key chain a previous image held.
    pub fn with_tickets(mut self, tickets: Option<baton_proto::tls::TicketKeys>) -> Self {
        if let Some(t) = tickets {
            self.tickets = t;
        }
        self
    }

    /// Serves metrics: `dup` is a duplicate of the listener's fd, kept for a re-exec.
    pub fn with_metrics(mut self, dup: Option<(OwnedFd, String)>) -> Self {
        self.metrics = dup;
        self
    }

    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        config_path: PathBuf,
        ctx: PathContext,
        listeners: ListenerSet,
        (lifeline, lifeline_write): (OwnedFd, OwnedFd),
        control: (OwnedFd, PathBuf),
        image: Image,
        notify: Arc<WorkerSocket>,
        systemd: Systemd,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        let core = Core::new(config.worker.max_generations, Instant::now());
        Self::new_with_core(
            core,
            config_path,
            ctx,
            listeners,
            (lifeline, lifeline_write),
            control,
            image,
            notify,
            systemd,
            events,
        )
    }

    /// A supervisor around `core` (restored by a re-exec, or new).
    #[allow(clippy::too_many_arguments)]
    fn new_with_core(
        core: Core<Set>,
        config_path: PathBuf,
        ctx: PathContext,
        listeners: ListenerSet,
        (lifeline, lifeline_write): (OwnedFd, OwnedFd),
        control: (OwnedFd, PathBuf),
        image: Image,
        notify: Arc<WorkerSocket>,
        systemd: Systemd,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        let started_at = image.service_started_at;
        Self {
            config_path,
            ctx,
            listeners,
            lifeline,
            lifeline_write,
            control,
            metrics: None,
            image,
            pending_reexec: None,
            notify,
            systemd,
            events,
            core,
            launched: HashMap::new(),
            cache: ArtifactCache::default(),
            upgrade_waiters: HashMap::new(),
            stop_waiters: HashMap::new(),
            next_waiter: 0,
            exit: None,
            started_at,
            watcher: None,
            tickets: crate::tls::new_ticket_chain(SystemTime::now())
                .expect("getrandom(2) gives random bytes once the kernel's pool is ready"),
        }
    }

    /// Starts generation 1 from `config` and runs until stopped. `Err` carries the reason
    /// the supervisor could not go on (generation 1 failed).
    pub async fn run(
        mut self,
        config: Config,
        events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), String> {
        self.sync_watcher(&config);
        let first = self.prepare_artifacts(Arc::new(config));
        self.feed(Input::First(first.map_err(|e| e.to_string())));
        self.event_loop(events).await
    }

    /// Handles events and timers until stopped.
    async fn event_loop(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), String> {
        loop {
            if let Some(result) = self.exit.take() {
                return result;
            }
            let deadline = self.core.next_deadline();
            let event = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return Ok(()),
                },
                () = sleep_until(deadline) => {
                    self.feed(Input::Tick);
                    self.re_exec_when_idle(&mut events);
                    continue;
                }
            };
            self.on_event(event);
            self.re_exec_when_idle(&mut events);
        }
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Upgrade {
                source,
                reply,
                supervisor,
            } => {
                let waiter = reply.map(|r| {
                    let id = self.waiter_id();
                    self.upgrade_waiters.insert(id, r);
                    id
                });
                if supervisor || self.image.changed_on_disk() {
                    self.feed(Input::SelfUpgrade {
                        source,
                        waiter,
                        then_generation: !supervisor,
                    });
                } else {
                    self.feed(Input::Upgrade { source, waiter });
                }
            }
            Event::Stop {
                fast,
                source,
                reply,
            } => {
                let waiter = reply.map(|r| {
                    let id = self.waiter_id();
                    self.stop_waiters.insert(id, r);
                    id
                });
                self.feed(Input::Stop {
                    fast,
                    source,
                    waiter,
                });
            }
            Event::Status { reply } => {
                let _ = reply.send(self.report());
            }
            Event::Metrics { reply } => {
                let image = crate::metrics::ImageInfo {
                    build: &self.image.build,
                    reexecs: self.image.reexecs,
                    service_started_at: self.image.service_started_at,
                    certificates: self.served_certificates(),
                };
                let _ = reply.send(crate::metrics::render(&self.core, &image));
            }
            Event::DecideCanary { decision, reply } => {
                let id = self.waiter_id();
                self.upgrade_waiters.insert(id, UpgradeReply::new(reply));
                self.feed(Input::DecideCanary {
                    decision,
                    source: "control socket",
                    waiter: Some(id),
                });
            }
            Event::Notify { pid, message } => self.feed(Input::Notify {
                pid: pid as u32,
                message,
            }),
            Event::WorkerExited { generation, exit } => {
                if let Some(l) = self.launched.get_mut(&generation) {
                    l.processes.remove(&exit.pid);
                }
                self.feed(Input::WorkerExited { generation, exit });
            }
            Event::PluginsChanged => self.on_plugins_changed(),
            Event::ReopenLogs => {
                // Not a decision about generations: every live worker is told.
                let mut told = 0;
                for l in self.launched.values() {
                    for p in l.processes.values() {
                        p.signal(Signal::SIGUSR1);
                        told += 1;
                    }
                }
                tracing::info!("SIGUSR1: {told} worker(s) told to reopen their access log");
            }
            Event::WatchdogTick => self.systemd.watchdog(),
        }
    }

    fn waiter_id(&mut self) -> WaiterId {
        self.next_waiter += 1;
        self.next_waiter
    }

    /// Hands `input` to the core and carries out what it decides; effects that answer
    /// with an input (prepare, launch, spawn) are fed back in order.
    fn feed(&mut self, input: Input<Set>) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            for effect in self.core.handle(Instant::now(), input) {
                if let Some(answer) = self.perform(effect) {
                    inputs.push_back(answer);
                }
            }
        }
    }

    /// Carries out the re-exec the core asked for, once every event already queued has
    /// been handled (a worker's READY, a client's request: what the old image has read
    /// must not be lost with it). If one of them started something meanwhile, the
    /// re-exec waits in the core until it is idle again. On success this never returns.
    fn re_exec_when_idle(&mut self, events: &mut mpsc::UnboundedReceiver<Event>) {
        while self.pending_reexec.is_some() {
            while let Ok(event) = events.try_recv() {
                self.on_event(event);
            }
            let Some(request) = self.pending_reexec.take() else {
                return;
            };
            if let Err(request) = self.core.defer_self_upgrade(request) {
                let reason = self.re_exec(&request);
                self.feed(Input::SelfUpgradeFailed { request, reason });
            }
        }
    }

    fn perform(&mut self, effect: Effect<Set>) -> Option<Input<Set>> {
        match effect {
            Effect::Prepare => Some(Input::Prepared(self.prepare().map_err(|e| e.to_string()))),
            Effect::Launch {
                generation,
                artifacts,
            } => self.launch(generation, &artifacts),
            Effect::Spawn { generation, slot } => {
                if !self.core.wants_spawn(generation, slot) {
                    return None;
                }
                Some(Input::Spawned {
                    generation,
                    slot,
                    result: self
                        .spawn_worker(generation, slot)
                        .map_err(|e| e.to_string()),
                })
            }
            Effect::Signal {
                generation,
                pid,
                signal,
            } => {
                if let Some(p) = self
                    .launched
                    .get(&generation)
                    .and_then(|l| l.processes.get(&pid))
                {
                    p.signal(match signal {
                        Sig::Drain => Signal::SIGTERM,
                        Sig::ForceClose => Signal::SIGQUIT,
                        Sig::Kill => Signal::SIGKILL,
                    });
                }
                None
            }
            Effect::Answer { waiter, outcome } => {
                if let Some(w) = self.upgrade_waiters.remove(&waiter) {
                    let _ = w.tx.send(outcome);
                }
                None
            }
            Effect::ReExec(request) => {
                match &mut self.pending_reexec {
                    Some(pending) => {
                        pending.waiters.extend(request.waiters);
                        pending.then_generation |= request.then_generation;
                    }
                    None => self.pending_reexec = Some(request),
                }
                None
            }
            Effect::Forget { generation } => {
                self.launched.remove(&generation);
                None
            }
            Effect::Prune => {
                self.prune_cache();
                None
            }
            Effect::Watch { artifacts } => {
                self.sync_watcher(&artifacts.config);
                None
            }
            Effect::Systemd(say) => {
                match say {
                    Say::Ready(status) => self.systemd.ready(&status),
                    Say::Reloading(status) => self.systemd.reloading(&status),
                    Say::Status(status) => self.systemd.status(&status),
                    Say::Stopping(status, by) => self.systemd.stopping(&status, by),
                    Say::ExtendTimeout(status, by) => self.systemd.extend_timeout(by, &status),
                }
                None
            }
            Effect::Exit { waiters, result } => {
                for id in waiters {
                    if let Some(w) = self.stop_waiters.remove(&id) {
                        let _ = w.send(());
                    }
                }
                self.exit = Some(result);
                None
            }
        }
    }

    /// Reads the config again and prepares what the next generation runs.
    fn prepare(&mut self) -> Result<(Set, Limits), PrepareError> {
        let config = Config::load(&self.config_path, &self.ctx).map_err(PrepareError::Config)?;
        self.prepare_artifacts(Arc::new(config))
    }

    /// Checks, hashes and caches the worker binary and the plugins of `config`.
    fn prepare_artifacts(&mut self, config: Arc<Config>) -> Result<(Set, Limits), PrepareError> {
        let now = SystemTime::now();
        self.tickets = crate::tls::ticket_keys_at(&self.tickets, now);
        let tls = crate::tls::prepare(&config, &self.tickets, now)?;
        if let Some(tls) = &tls {
            crate::tls::warn_expiring(tls, now);
        }
        let binary = self.cache.worker_binary(&config)?;
        let plugins = crate::plugins::prepare(&config, &mut self.cache);
        baton_sys::memory::release_free_memory();
        let limits = Limits::of(&config);
        Ok((
            Arc::new(Artifacts {
                config,
                binary,
                plugins: plugins?,
                tls,
            }),
            limits,
        ))
    }

    /// Makes generation `number`'s listeners and settings.
    fn launch(&mut self, number: u64, artifacts: &Artifacts) -> Option<Input<Set>> {
        let config = &artifacts.config;
        let listeners = match self.listeners.prepare(config) {
            Ok(l) => l,
            Err(e) => {
                return Some(Input::LaunchFailed {
                    generation: number,
                    reason: e.to_string(),
                });
            }
        };
        let mut settings =
            config.worker_settings(crate::spawn::plugin_specs(&artifacts.plugins, &listeners));
        // Workers report their metrics when this supervisor serves them, whatever the
        // generation's own config says (a restored generation runs an older one).
        settings.metrics = self.metrics.is_some();
        let settings_json = settings.to_json();
        if let Some(g) = self.core.generation(number) {
            let _e = g.span.enter();
            match &g.restored {
                Some(r) => tracing::warn!(
                    "starting {} worker(s) from generation {}'s artifacts: {} (sha256 {}), {} plugin(s)",
                    config.worker.processes,
                    r.from,
                    artifacts.binary.source.display(),
                    artifacts.binary.hash(),
                    artifacts.plugins.len()
                ),
                None => tracing::info!(
                    "starting {} worker(s) of {} (sha256 {})",
                    config.worker.processes,
                    artifacts.binary.source.display(),
                    artifacts.binary.hash()
                ),
            }
        }
        self.launched.insert(
            number,
            Launched {
                listeners,
                settings_json,
                processes: HashMap::new(),
            },
        );
        None
    }

    /// Spawns the worker of `slot` in generation `number`.
    fn spawn_worker(&mut self, number: u64, slot: usize) -> Result<u32, SpawnError> {
        let g = self
            .core
            .generation(number)
            .ok_or(SpawnError::Gone { generation: number })?;
        let artifacts = g.artifacts.clone();
        let span = g.span.clone();
        let launched = self
            .launched
            .get_mut(&number)
            .ok_or(SpawnError::NotLaunched { generation: number })?;
        let spec = SpawnSpec {
            binary: &artifacts.binary,
            plugins: &artifacts.plugins,
            generation: number,
            listeners: launched
                .listeners
                .iter()
                .flat_map(|l| l.fds().map(move |fd| (l.name.as_str(), fd)))
                .collect(),
            lifeline: self.lifeline.as_fd(),
            notify_socket: self.notify.path(),
            settings_json: &launched.settings_json,
            credentials: artifacts.config.worker.credentials.as_ref(),
            tls: artifacts.tls.as_ref().map(|t| t.memfd.as_fd()),
        };
        let child = spawn(&spec)?;
        let events = self.events.clone();
        let process = crate::generation::watch(child, span, move |exit| {
            let _ = events.send(Event::WorkerExited {
                generation: number,
                exit,
            });
        });
        let pid = process.pid;
        launched.processes.insert(pid, process);
        let _ = slot;
        Ok(pid)
    }

    /// Removes cached artifacts that no live generation runs and none could be restored
    /// to (the previous generation of each live one).
    fn prune_cache(&mut self) {
        let in_use = self.core.artifacts_in_use();
        let Some(dir) = in_use.last().map(|a| a.config.plugins.cache_dir.clone()) else {
            return;
        };
        let keep: HashSet<PathBuf> = in_use
            .iter()
            .flat_map(|a| a.files().map(ToOwned::to_owned))
            .chain(self.image.held.iter().map(|a| a.path().to_owned()))
            .collect();
        let removed = self.cache.prune(&dir, &keep);
        if !removed.is_empty() {
            tracing::info!(
                "artifact cache {}: pruned {} unused file(s): {}",
                dir.display(),
                removed.len(),
                removed.join(", ")
            );
        }
    }

    /// Watches the plugin directory of `config` if it asks for it (and only then).
    fn sync_watcher(&mut self, config: &Config) {
        let wanted = config.plugins.watch.then(|| config.plugins.dir.clone());
        if self.watcher.as_ref().map(|(dir, _)| dir) == wanted.as_ref() {
            return;
        }
        if let Some((_, task)) = self.watcher.take() {
            task.abort();
        }
        if let Some(dir) = wanted {
            match crate::watch::spawn(
                dir.clone(),
                config.plugins.watch_debounce,
                self.events.clone(),
            ) {
                Ok(task) => self.watcher = Some((dir, task)),
                Err(e) => tracing::error!("cannot watch plugin directory {}: {e}", dir.display()),
            }
        }
    }

    /// The watcher saw the plugin directory settle: upgrade if the set of hashes differs
    /// from the newest generation's (a failing scan upgrades too, so that the refusal and
    /// its reason are reported).
    fn on_plugins_changed(&mut self) {
        let newest = self.core.generations().rev().find(|g| {
            matches!(
                g.state,
                GenerationState::Starting | GenerationState::Serving | GenerationState::Canary
            )
        });
        let Some(newest) = newest else { return };
        let artifacts = newest.artifacts.clone();
        match crate::plugins::scan(&artifacts.config) {
            Ok(scanned)
                if scanned
                    .iter()
                    .map(|s| s.hash.as_str())
                    .eq(artifacts.plugins.iter().map(|p| p.spec.hash.as_str())) =>
            {
                tracing::info!("plugin directory changed, but not the plugin set: no upgrade");
            }
            _ => self.feed(Input::Upgrade {
                source: "plugin directory changed",
                waiter: None,
            }),
        }
    }

    /// The TLS certificates of the serving generation (none while none serves).
    fn served_certificates(&self) -> &[crate::tls::ListenerCertificates] {
        self.core
            .generations()
            .find(|g| g.state == GenerationState::Serving)
            .and_then(|g| g.artifacts.tls.as_ref())
            .map_or(&[], |t| t.listeners.as_slice())
    }

    fn report(&self) -> StatusReport {
        let now = Instant::now();
        let (served, wall) = (self.served_certificates(), SystemTime::now());
        let canary = self.core.canary_info(now);
        StatusReport {
            version: STATUS_VERSION,
            supervisor: SupervisorInfo {
                pid: std::process::id(),
                config: self.config_path.display().to_string(),
                started_at: timestamp(self.started_at),
                state: if self.core.stopping() {
                    "stopping"
                } else {
                    "running"
                }
                .into(),
                upgrade_pending: self.core.upgrade_pending(),
                version: self.image.build.version.clone(),
                sha256: self.image.build.sha256.clone(),
                binary: self.image.path.display().to_string(),
                image_started_at: timestamp(self.image.started_at),
                reexecs: self.image.reexecs,
                worker_protocol: baton_proto::WORKER_PROTOCOL,
            },
            listeners: {
                let mut l: Vec<ListenerInfo> = self
                    .listeners
                    .all()
                    .map(|l| ListenerInfo {
                        name: l.name.clone(),
                        address: l.description.clone(),
                        origin: serde_json::to_value(l.origin)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default(),
                        fds: l.fd_count(),
                        certificates: served
                            .iter()
                            .filter(|c| c.listener == l.name)
                            .flat_map(|c| &c.certificates)
                            .map(|c| crate::status::ServedCertificate::of(c, wall))
                            .collect(),
                    })
                    .collect();
                l.sort_by(|a, b| a.name.cmp(&b.name));
                l
            },
            generations: self
                .core
                .generations()
                .map(|g| GenerationInfo {
                    number: g.number,
                    state: g.state.name().into(),
                    started_at: timestamp(g.started_at),
                    uptime_secs: now.saturating_duration_since(g.started).as_secs(),
                    pids: g.pids(),
                    restarts: g.restarts,
                    connections: g.connections(),
                    idle: g.idle(),
                    requests: g.requests(),
                    errors: g.errors(),
                    websockets: g.websockets(),
                    streams: g.streams(),
                    failure: g.failure.clone(),
                    worker: Some(crate::status::BinaryInfo {
                        path: g.artifacts.binary.source.display().to_string(),
                        cached: g.artifacts.binary.cached().display().to_string(),
                        sha256: g.artifacts.binary.hash().to_owned(),
                    }),
                    restored_from: g.restored.as_ref().map(|r| r.from),
                    rollback_to: g.previous.as_ref().map(|p| p.number),
                    canary: canary
                        .as_ref()
                        .filter(|(n, _)| *n == g.number)
                        .map(|(_, info)| info.clone()),
                    plugins: g
                        .artifacts
                        .plugins
                        .iter()
                        .map(|p| crate::status::PluginInfo {
                            file: p.spec.file.clone(),
                            sha256: p.spec.hash.clone(),
                        })
                        .collect(),
                    workers: g
                        .workers
                        .iter()
                        .enumerate()
                        .map(|(slot, w)| WorkerInfo {
                            slot,
                            pid: w.pid(),
                            state: match w.state {
                                SlotState::Running { ready: true, .. } => "ready",
                                SlotState::Running { ready: false, .. } | SlotState::Spawning => {
                                    "starting"
                                }
                                SlotState::Backoff { .. } => "restarting",
                                SlotState::Exited => "exited",
                            }
                            .into(),
                            restarts: w.restarts,
                            restart_in_ms: match w.state {
                                SlotState::Backoff { until } => {
                                    Some(until.saturating_duration_since(now).as_millis() as u64)
                                }
                                _ => None,
                            },
                            connections: w.stats.connections,
                            requests: w.stats.requests,
                            stats_age_ms: w
                                .stats_at
                                .filter(|_| w.pid().is_some())
                                .map(|at| now.saturating_duration_since(at).as_millis() as u64),
                            version: w.build.as_ref().map(|b| b.version.clone()),
                            protocol: w.build.as_ref().map(|b| b.protocol),
                        })
                        .collect(),
                })
                .collect(),
            last_upgrade: self.core.last_upgrade().cloned(),
        }
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await,
        None => std::future::pending().await,
    }
}
