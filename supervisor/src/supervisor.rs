//! The supervisor's one event loop and the generation state machine it drives.
//!
//! Signals, the control socket, worker notify messages, child exits and timers all become
//! [`Event`]s on one channel, handled in order by [`Supervisor::handle`]. Nothing else
//! mutates generations. Every wait has a deadline taken from the config (`ready_timeout`,
//! `drain_timeout`); a timer is an event scheduled for later and is ignored if the state
//! it was for has moved on.

use crate::artifacts::ArtifactCache;
use crate::config::{Config, PathContext};
use crate::generation::{Artifacts, Exit, Generation, GenerationState, Restored, WorkerSlot};
use crate::listeners::ListenerSet;
use crate::notify::{Systemd, WorkerSocket};
use crate::spawn::{SpawnSpec, spawn};
use crate::status::{
    GenerationInfo, ListenerInfo, STATUS_VERSION, StatusReport, SupervisorInfo, UpgradeOutcome,
    UpgradeResult, WorkerInfo, timestamp,
};
use baton_proto::NotifyMessage;
use nix::sys::signal::Signal;
use std::collections::{BTreeMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{mpsc, oneshot};

/// After `drain_timeout`, how long a worker gets to exit by itself before SIGKILL.
const DRAIN_KILL_MARGIN: Duration = Duration::from_secs(2);
/// First back-off before replacing a crashed worker; doubles per crash in a row.
const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest back-off.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// While stopping, `EXTEND_TIMEOUT_USEC` is sent this often ...
const EXTEND_INTERVAL: Duration = Duration::from_secs(2);
/// ... each time extending systemd's stop timeout by this much from then.
const EXTEND_STEP: Duration = Duration::from_secs(6);
/// A worker that ran this long before exiting starts a new crash streak.
const STABLE_RUN: Duration = Duration::from_secs(30);

/// Everything the loop reacts to.
#[derive(Debug)]
pub enum Event {
    /// Start the next generation from what is on disk now.
    Upgrade {
        source: &'static str,
        reply: Option<oneshot::Sender<UpgradeOutcome>>,
    },
    /// Drain every generation and exit (`fast`: kill the workers instead).
    Stop {
        fast: bool,
        source: &'static str,
        reply: Option<oneshot::Sender<()>>,
    },
    Status {
        reply: oneshot::Sender<StatusReport>,
    },
    /// A datagram from a worker, attributed by its credentials.
    Notify {
        pid: i32,
        message: NotifyMessage,
    },
    WorkerExited {
        generation: u64,
        exit: Exit,
    },
    ReadyTimeout {
        generation: u64,
    },
    DrainTimeout {
        generation: u64,
    },
    /// `max_generations` needs room: close this draining generation now.
    ForceClose {
        generation: u64,
    },
    /// A replacement worker of a serving generation had `ready_timeout` to say READY.
    ReplacementReadyTimeout {
        generation: u64,
        pid: u32,
    },
    Restart {
        generation: u64,
        slot: usize,
    },
    /// The plugin directory changed (with `plugins.watch`).
    PluginsChanged,
    /// Time to extend systemd's stop timeout again, if still draining.
    StopTick,
    WatchdogTick,
}

/// What a new generation is started from.
#[derive(Debug)]
enum Start {
    /// What is on disk now (an upgrade): the config given, the worker binary and plugins
    /// read and cached.
    Fresh(Arc<Config>),
    /// An older generation's exact artifacts, after a crash loop.
    Restore(Arc<Artifacts>, Restored),
}

impl Event {
    /// The generation a timer event is about (it means nothing once that one is gone).
    fn generation(&self) -> Option<u64> {
        match self {
            Event::ReadyTimeout { generation }
            | Event::DrainTimeout { generation }
            | Event::ForceClose { generation }
            | Event::ReplacementReadyTimeout { generation, .. }
            | Event::Restart { generation, .. } => Some(*generation),
            _ => None,
        }
    }
}

/// Waiters for the result of an upgrade.
type Waiters = Vec<oneshot::Sender<UpgradeOutcome>>;

#[derive(Debug)]
pub struct Supervisor {
    config_path: PathBuf,
    ctx: PathContext,
    listeners: ListenerSet,
    lifeline: OwnedFd,
    notify: Arc<WorkerSocket>,
    systemd: Systemd,
    events: mpsc::UnboundedSender<Event>,
    generations: BTreeMap<u64, Generation>,
    last_number: u64,
    /// Events scheduled for later, by due time (and order of scheduling).
    timers: BTreeMap<(tokio::time::Instant, u64), Event>,
    timer_seq: u64,
    /// Waiters of the generation that is starting (or waiting for room to start).
    starting_waiters: Waiters,
    /// An upgrade asked for while one was starting: run once that one ends.
    follow_up: Option<Waiters>,
    /// A start waits for an old generation to be reaped (`max_generations`).
    start_deferred: bool,
    /// ... and it is this restore (an upgrade re-reads the config when it happens).
    deferred_restore: Option<(Arc<Artifacts>, Restored)>,
    cache: ArtifactCache,
    last_upgrade: Option<UpgradeOutcome>,
    stopping: Option<Vec<oneshot::Sender<()>>>,
    /// The result to exit with once stopping and every generation is gone (default: Ok).
    pending_exit: Option<Result<(), String>>,
    started_at: SystemTime,
    max_generations: usize,
    /// The plugin directory being watched (`plugins.watch`), and the watching task.
    watcher: Option<(PathBuf, tokio::task::JoinHandle<()>)>,
}

impl Supervisor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &Config,
        config_path: PathBuf,
        ctx: PathContext,
        listeners: ListenerSet,
        lifeline: OwnedFd,
        notify: Arc<WorkerSocket>,
        systemd: Systemd,
        events: mpsc::UnboundedSender<Event>,
    ) -> Self {
        Self {
            config_path,
            ctx,
            listeners,
            lifeline,
            notify,
            systemd,
            events,
            generations: BTreeMap::new(),
            last_number: 0,
            timers: BTreeMap::new(),
            timer_seq: 0,
            starting_waiters: Vec::new(),
            follow_up: None,
            start_deferred: false,
            deferred_restore: None,
            cache: ArtifactCache::default(),
            last_upgrade: None,
            stopping: None,
            pending_exit: None,
            started_at: SystemTime::now(),
            max_generations: config.worker.max_generations,
            watcher: None,
        }
    }

    /// Starts generation 1 from `config` and runs until stopped. `Err` carries the reason
    /// the supervisor could not go on (generation 1 failed).
    pub async fn run(
        mut self,
        config: Config,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) -> Result<(), String> {
        self.sync_watcher(&config);
        self.start_generation(Start::Fresh(Arc::new(config)));
        loop {
            // Checked before waiting: generation 1 may have failed without any event.
            if self.stopping.is_some() && self.generations.is_empty() {
                for w in self.stopping.take().unwrap_or_default() {
                    let _ = w.send(());
                }
                return self.pending_exit.take().unwrap_or(Ok(()));
            }
            let event = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => event,
                    None => return Ok(()),
                },
                () = Self::next_timer(&self.timers) => {
                    let (_, event) = self.timers.pop_first().expect("a timer was due");
                    event
                }
            };
            self.handle(event);
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

    pub fn handle(&mut self, event: Event) {
        match event {
            Event::Upgrade { source, reply } => self.on_upgrade(source, reply),
            Event::Stop {
                fast,
                source,
                reply,
            } => self.on_stop(fast, source, reply),
            Event::Status { reply } => {
                let _ = reply.send(self.report());
            }
            Event::Notify { pid, message } => self.on_notify(pid, message),
            Event::WorkerExited { generation, exit } => self.on_exit(generation, exit),
            Event::ReadyTimeout { generation } => {
                if self.state_of(generation) == Some(GenerationState::Starting) {
                    let timeout = self.generations[&generation].config.worker.ready_timeout;
                    let not_ready = self.generations[&generation]
                        .workers
                        .iter()
                        .filter(|w| !w.ready)
                        .count();
                    self.fail(
                        generation,
                        format!(
                            "{not_ready} worker(s) not READY within ready_timeout ({})",
                            humantime::format_duration(timeout)
                        ),
                    );
                }
            }
            Event::DrainTimeout { generation } => {
                if let Some(g) = self.generations.get(&generation) {
                    let _e = g.span.enter();
                    tracing::warn!("drain_timeout passed; killing worker(s) {:?}", g.pids());
                    g.signal_all(Signal::SIGKILL);
                }
            }
            Event::ForceClose { generation } => {
                if let Some(g) = self.generations.get(&generation)
                    && g.state == GenerationState::Draining
                    && self.start_deferred
                {
                    let _e = g.span.enter();
                    tracing::warn!(
                        "force-closing draining generation {generation} (pids {:?}, {} connection(s)) to stay within max_generations ({})",
                        g.pids(),
                        g.connections(),
                        self.max_generations
                    );
                    g.signal_all(Signal::SIGQUIT);
                }
            }
            Event::Restart { generation, slot } => self.on_restart(generation, slot),
            Event::PluginsChanged => self.on_plugins_changed(),
            Event::StopTick => {
                if self.stopping.is_some() && !self.generations.is_empty() {
                    let summary = self.summary();
                    self.systemd
                        .extend_timeout(EXTEND_STEP, &format!("stopping: {summary}"));
                    self.after(EXTEND_INTERVAL, Event::StopTick);
                }
            }
            Event::ReplacementReadyTimeout { generation, pid } => {
                if let Some(g) = self.generations.get(&generation)
                    && let Some(slot) = g.slot_of(pid)
                    && !g.workers[slot].ready
                    && let Some(process) = &g.workers[slot].process
                {
                    let _e = g.span.enter();
                    tracing::error!(
                        "replacement worker {pid} not READY within ready_timeout; killing it (it will be replaced again)"
                    );
                    process.signal(Signal::SIGKILL);
                }
            }
            Event::WatchdogTick => self.systemd.watchdog(),
        }
    }

    fn state_of(&self, generation: u64) -> Option<GenerationState> {
        self.generations.get(&generation).map(|g| g.state)
    }

    fn starting(&self) -> Option<u64> {
        self.generations
            .values()
            .find(|g| g.state == GenerationState::Starting)
            .map(|g| g.number)
    }

    fn serving(&self) -> Option<u64> {
        self.generations
            .values()
            .find(|g| g.state == GenerationState::Serving)
            .map(|g| g.number)
    }

    fn on_upgrade(&mut self, source: &'static str, reply: Option<oneshot::Sender<UpgradeOutcome>>) {
        if self.stopping.is_some() {
            if let Some(reply) = reply {
                let _ = reply.send(outcome(
                    None,
                    UpgradeResult::Refused,
                    Some("the supervisor is stopping".into()),
                ));
            }
            return;
        }
        if self.starting().is_some() || self.start_deferred {
            tracing::info!("upgrade requested ({source}) while one is starting: it will follow");
            let waiters = self.follow_up.get_or_insert_with(Vec::new);
            waiters.extend(reply);
            return;
        }
        tracing::info!("upgrade requested ({source})");
        self.starting_waiters.extend(reply);
        self.systemd.reloading(&format!(
            "upgrading: starting generation {}",
            self.last_number + 1
        ));
        self.begin_upgrade();
    }

    /// Re-reads the config and starts the next generation, or refuses.
    fn begin_upgrade(&mut self) {
        let config = match Config::load(&self.config_path, &self.ctx) {
            Ok(config) => config,
            Err(e) => return self.refuse(format!("invalid config: {e}")),
        };
        self.max_generations = config.worker.max_generations;
        self.start_generation(Start::Fresh(Arc::new(config)));
    }

    fn refuse(&mut self, reason: String) {
        match self.serving() {
            Some(serving) => {
                tracing::error!("upgrade refused: {reason}; generation {serving} keeps serving")
            }
            None if self.stopping.is_none() => {
                // The first start: nothing else can serve, so the supervisor cannot go on.
                tracing::error!("cannot start generation {}: {reason}", self.last_number + 1);
                self.exit_when_empty(Err(format!(
                    "generation {} could not start: {reason}",
                    self.last_number + 1
                )));
            }
            None => tracing::error!("upgrade refused: {reason}"),
        }
        self.finish_upgrade(outcome(None, UpgradeResult::Refused, Some(reason)));
    }

    /// Starts a generation, unless `max_generations` needs an old one reaped first (then
    /// it is force-closed and the start happens when it is gone).
    fn start_generation(&mut self, start: Start) {
        let config = match &start {
            Start::Fresh(config) => config.clone(),
            Start::Restore(artifacts, _) => artifacts.config.clone(),
        };
        let alive = self.generations.len();
        if alive + 1 > self.max_generations {
            // The start waits for the oldest draining generation. A drain under steady
            // traffic ends within milliseconds; one still running after
            // `drain_idle_grace` (long requests, idle connections) is force-closed.
            if let Some(oldest) = self
                .generations
                .values()
                .find(|g| g.state == GenerationState::Draining)
            {
                let _e = oldest.span.enter();
                tracing::info!(
                    "max_generations ({}) reached: the next generation starts when generation {} has drained (force-closed in {} if still draining)",
                    self.max_generations,
                    oldest.number,
                    humantime::format_duration(config.worker.drain_idle_grace)
                );
                let generation = oldest.number;
                drop(_e);
                self.after(
                    config.worker.drain_idle_grace,
                    Event::ForceClose { generation },
                );
            }
            self.start_deferred = true;
            if let Start::Restore(artifacts, restored) = start {
                self.deferred_restore = Some((artifacts, restored));
            }
            return;
        }
        self.start_deferred = false;

        let (binary, plugins, restored) = match start {
            Start::Fresh(_) => {
                let binary = match self.cache.worker_binary(&config) {
                    Ok(b) => b,
                    Err(e) => return self.refuse(e),
                };
                let prepared = crate::plugins::prepare(&config, &mut self.cache);
                crate::sys::release_free_memory();
                match prepared {
                    Ok(p) => (binary, p, None),
                    Err(e) => return self.refuse(e),
                }
            }
            // The restored generation's files are held open since it ran: what runs
            // again is what was checked then, whatever became of the cache directory.
            Start::Restore(artifacts, restored) => (
                artifacts.binary.clone(),
                artifacts.plugins.clone(),
                Some(restored),
            ),
        };
        let listeners = match self.listeners.prepare(&config) {
            Ok(l) => l,
            Err(e) => return self.refuse(e.to_string()),
        };
        self.last_number += 1;
        let number = self.last_number;
        let span = tracing::info_span!("generation", n = number);
        let generation = Generation {
            number,
            state: GenerationState::Starting,
            started_at: SystemTime::now(),
            started: Instant::now(),
            settings_json: config
                .worker_settings(crate::spawn::plugin_specs(&plugins, &listeners))
                .to_json(),
            plugins,
            binary,
            workers: (0..config.worker.processes)
                .map(|_| WorkerSlot::default())
                .collect(),
            listeners,
            config: config.clone(),
            restarts: 0,
            requests_of_exited: 0,
            failure: None,
            span: span.clone(),
            promoted: None,
            draining_since: None,
            crashes_after_promotion: 0,
            previous: None,
            restored,
        };
        {
            let _e = span.enter();
            match &generation.restored {
                Some(r) => tracing::warn!(
                    "starting {} worker(s) from generation {}'s artifacts: {} (sha256 {}), {} plugin(s)",
                    config.worker.processes,
                    r.from,
                    generation.binary.source.display(),
                    generation.binary.hash(),
                    generation.plugins.len()
                ),
                None => tracing::info!(
                    "starting {} worker(s) of {} (sha256 {})",
                    config.worker.processes,
                    generation.binary.source.display(),
                    generation.binary.hash()
                ),
            }
        }
        self.generations.insert(number, generation);
        for slot in 0..config.worker.processes {
            if let Err(reason) = self.launch(number, slot) {
                return self.fail(number, reason);
            }
        }
        self.after(
            config.worker.ready_timeout,
            Event::ReadyTimeout { generation: number },
        );
    }

    /// Spawns the worker of `slot` in generation `number`.
    fn launch(&mut self, number: u64, slot: usize) -> Result<(), String> {
        let g = self
            .generations
            .get_mut(&number)
            .expect("launch of a live generation");
        // What was hashed is what runs: a file written over since is not handed on.
        std::iter::once(&g.binary.artifact)
            .chain(g.plugins.iter().map(|p| &p.artifact))
            .try_for_each(|a| a.verify_unchanged())?;
        let spec = SpawnSpec {
            binary: &g.binary,
            plugins: &g.plugins,
            generation: number,
            listeners: g
                .listeners
                .iter()
                .flat_map(|l| l.fds().map(move |fd| (l.name.as_str(), fd)))
                .collect(),
            lifeline: self.lifeline.as_fd(),
            notify_socket: self.notify.path(),
            settings_json: &g.settings_json,
            credentials: g.config.worker.credentials.as_ref(),
        };
        let child = spawn(&spec).map_err(|e| {
            format!(
                "cannot execute worker {} (cached as {}): {e}",
                g.binary.source.display(),
                g.binary.cached().display()
            )
        })?;
        let events = self.events.clone();
        let process = crate::generation::watch(child, g.span.clone(), move |exit| {
            let _ = events.send(Event::WorkerExited {
                generation: number,
                exit,
            });
        });
        let _e = g.span.enter();
        tracing::info!("worker {} started in slot {slot}", process.pid);
        let w = &mut g.workers[slot];
        w.process = Some(process);
        w.ready = false;
        w.restart_at = None;
        w.stats = Default::default();
        Ok(())
    }

    fn find_worker(&self, pid: u32) -> Option<(u64, usize)> {
        self.generations
            .values()
            .find_map(|g| g.slot_of(pid).map(|slot| (g.number, slot)))
    }

    fn on_notify(&mut self, pid: i32, message: NotifyMessage) {
        let Some((number, slot)) = self.find_worker(pid as u32) else {
            tracing::debug!("notify from pid {pid}, which is not a worker, ignored");
            return;
        };
        let g = self.generations.get_mut(&number).expect("found above");
        if let Some(stats) = message.stats {
            g.workers[slot].stats = stats;
            g.workers[slot].stats_at = Some(Instant::now());
        }
        if let Some(status) = &message.status {
            g.workers[slot].status = Some(status.clone());
        }
        if let Some(failure) = message.failure() {
            if g.state == GenerationState::Starting {
                return self.fail(number, format!("worker {pid} reported: {failure}"));
            }
            let _e = g.span.enter();
            tracing::warn!("worker {pid} reported: {failure}");
        }
        if message.ready && !g.workers[slot].ready {
            g.workers[slot].ready = true;
            let _e = g.span.enter();
            tracing::info!("worker {pid} is ready");
            drop(_e);
            if g.state == GenerationState::Starting && g.all_ready() {
                self.promote(number);
            }
        }
    }

    /// Every worker of `number` is READY: it serves, the previous one drains.
    fn promote(&mut self, number: u64) {
        let previous = self.serving();
        // A restore is not restored from in turn: no ping-pong between two bad sets. (Made
        // only when kept: the artifacts it holds open would keep the cache from pruning.)
        let previous_artifacts = previous
            .filter(|_| self.generations[&number].restored.is_none())
            .map(|p| Arc::new(self.generations[&p].artifacts()));
        let g = self
            .generations
            .get_mut(&number)
            .expect("promote a live generation");
        g.state = GenerationState::Serving;
        g.promoted = Some(Instant::now());
        if previous_artifacts.is_some() {
            g.previous = previous_artifacts;
        }
        let result = match &g.restored {
            None => outcome(Some(number), UpgradeResult::Succeeded, None),
            Some(r) => outcome(
                Some(r.crashed),
                UpgradeResult::RolledBack,
                Some(format!(
                    "{}; generation {number} serves generation {}'s artifacts",
                    r.reason, r.from
                )),
            ),
        };
        let took = g.started.elapsed();
        {
            let _e = g.span.enter();
            tracing::info!("serving (ready in {took:?}), pids {:?}", g.pids());
        }
        if let Some(old) = previous {
            self.drain(old);
        }
        let config = self.generations[&number].config.clone();
        self.sync_watcher(&config);
        self.prune_cache();
        self.finish_upgrade(result);
    }

    /// Removes cached artifacts that no live generation runs and none could be restored
    /// to (the previous generation of each live one).
    fn prune_cache(&mut self) {
        let Some(dir) = self
            .generations
            .values()
            .next_back()
            .map(|g| g.config.plugins.cache_dir.clone())
        else {
            return;
        };
        let mut keep = HashSet::new();
        for g in self.generations.values() {
            keep.extend(g.files().map(ToOwned::to_owned));
            if let Some(previous) = &g.previous {
                keep.extend(previous.files().map(ToOwned::to_owned));
            }
        }
        // A rollback waiting for room under max_generations needs its files.
        if let Some((restore, _)) = &self.deferred_restore {
            keep.extend(restore.files().map(ToOwned::to_owned));
        }
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

    fn drain(&mut self, number: u64) {
        let g = self
            .generations
            .get_mut(&number)
            .expect("drain a live generation");
        if g.state == GenerationState::Draining {
            return;
        }
        g.state = GenerationState::Draining;
        g.draining_since = Some(Instant::now());
        let deadline = g.config.worker.drain_timeout + DRAIN_KILL_MARGIN;
        {
            let _e = g.span.enter();
            tracing::info!(
                "draining {} connection(s) of pids {:?} (drain_timeout {})",
                g.connections(),
                g.pids(),
                humantime::format_duration(g.config.worker.drain_timeout)
            );
        }
        g.signal_all(Signal::SIGTERM);
        let empty = g.is_empty();
        self.after(deadline, Event::DrainTimeout { generation: number });
        if empty {
            self.reap(number);
        }
    }

    /// Rolls back the starting generation `number`: its workers are killed, the serving
    /// generation is not touched, and the reason goes to the log, the status and waiters.
    fn fail(&mut self, number: u64, reason: String) {
        let g = self
            .generations
            .get_mut(&number)
            .expect("fail a live generation");
        g.state = GenerationState::Failed;
        g.failure = Some(reason.clone());
        {
            let _e = g.span.enter();
            tracing::error!("rolled back: {reason}");
        }
        g.signal_all(Signal::SIGKILL);
        if g.is_empty() {
            self.reap(number);
        }
        if self.serving().is_none() && self.stopping.is_none() {
            // Nothing else can serve: the supervisor cannot go on.
            self.exit_when_empty(Err(format!(
                "generation {number} failed to start: {reason}"
            )));
        }
        self.finish_upgrade(outcome(
            Some(number),
            UpgradeResult::RolledBack,
            Some(reason),
        ));
    }

    fn exit_when_empty(&mut self, result: Result<(), String>) {
        if self.stopping.is_none() {
            self.stopping = Some(Vec::new());
            for g in self.generations.values() {
                g.signal_all(Signal::SIGKILL);
            }
        }
        self.pending_exit = Some(result);
    }

    /// The upgrade that was starting ended: answer its waiters, tell systemd, and run the
    /// coalesced follow-up if there is one.
    fn finish_upgrade(&mut self, result: UpgradeOutcome) {
        for w in self.starting_waiters.drain(..) {
            let _ = w.send(result.clone());
        }
        let first_start = result.generation == Some(1);
        self.last_upgrade = (!first_start)
            .then_some(result.clone())
            .or(self.last_upgrade.take());
        if self.stopping.is_none() {
            let summary = self.summary();
            self.systemd.ready(&summary);
        }
        if self.stopping.is_none()
            && let Some(waiters) = self.follow_up.take()
        {
            tracing::info!("running the upgrade requested while the last one was starting");
            self.starting_waiters = waiters;
            self.systemd.reloading(&format!(
                "upgrading: starting generation {}",
                self.last_number + 1
            ));
            self.begin_upgrade();
        }
    }

    fn on_exit(&mut self, number: u64, exit: Exit) {
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        let Some(slot) = g.slot_of(exit.pid) else {
            return;
        };
        let w = &mut g.workers[slot];
        let lived = w
            .process
            .take()
            .map(|p| p.spawned.elapsed())
            .unwrap_or_default();
        let last_status = w.status.take();
        g.requests_of_exited += w.stats.requests;
        w.stats = Default::default();
        w.ready = false;
        match g.state {
            GenerationState::Starting => {
                if self.stopping.is_some() {
                    return self.reap_if_empty(number);
                }
                let when = match last_status {
                    Some(status) => format!("before READY, while {status}"),
                    None => "before READY".to_owned(),
                };
                self.fail(number, exit.describe(&when));
            }
            GenerationState::Serving if self.stopping.is_none() => {
                w.crash_streak = if lived >= STABLE_RUN {
                    1
                } else {
                    w.crash_streak + 1
                };
                w.restarts += 1;
                g.restarts += 1;
                let delay = backoff(w.crash_streak);
                w.restart_at = Some(Instant::now() + delay);
                {
                    let _e = g.span.enter();
                    tracing::warn!(
                        "{}; replacing it in {delay:?} (restart {} of slot {slot})",
                        exit.describe("while serving"),
                        w.restarts
                    );
                }
                let window = g.config.worker.crash_loop_window;
                if g.promoted.is_some_and(|at| at.elapsed() <= window) {
                    g.crashes_after_promotion += 1;
                }
                let limit = g.config.worker.crash_loop_exits;
                let crash_loop = limit > 0 && g.crashes_after_promotion >= limit;
                self.after(
                    delay,
                    Event::Restart {
                        generation: number,
                        slot,
                    },
                );
                if crash_loop {
                    self.on_crash_loop(number);
                }
                let summary = self.summary();
                self.systemd.status(&summary);
            }
            _ => {
                let _e = g.span.enter();
                tracing::info!("worker {} exited ({})", exit.pid, exit.status);
                drop(_e);
                self.reap_if_empty(number);
            }
        }
    }

    /// The serving generation `number` crash-looped after its promotion: start the
    /// generation it replaced again, from exactly the artifacts that one ran.
    fn on_crash_loop(&mut self, number: u64) {
        let g = &self.generations[&number];
        let _e = g.span.enter();
        let Some(previous) = g.previous.clone() else {
            if g.crashes_after_promotion == g.config.worker.crash_loop_exits {
                tracing::error!(
                    "crash loop: {} worker exit(s) within {} of promotion, but there is no previous generation to roll back to{}",
                    g.crashes_after_promotion,
                    humantime::format_duration(g.config.worker.crash_loop_window),
                    if g.restored.is_some() {
                        " (this generation is already a rollback)"
                    } else {
                        ""
                    }
                );
            }
            return;
        };
        if self.stopping.is_some() {
            return;
        }
        if self.starting().is_some() || self.start_deferred {
            tracing::error!(
                "crash loop after promotion, but an upgrade is starting; no rollback unless it fails and the crashes go on"
            );
            return;
        }
        let reason = format!(
            "generation {number} crash-looped: {} worker exit(s) within {} of promotion",
            g.crashes_after_promotion,
            humantime::format_duration(g.config.worker.crash_loop_window)
        );
        tracing::error!(
            "{reason}; rolling back to generation {}'s exact artifacts (worker sha256 {}, {} plugin(s))",
            previous.number,
            previous.binary.hash(),
            previous.plugins.len()
        );
        drop(_e);
        let restored = Restored {
            from: previous.number,
            crashed: number,
            reason: reason.clone(),
        };
        self.generations
            .get_mut(&number)
            .expect("crash-looping generation")
            .previous = None;
        self.last_upgrade = Some(outcome(
            Some(number),
            UpgradeResult::RolledBack,
            Some(format!(
                "{reason}; restoring generation {}'s artifacts",
                previous.number
            )),
        ));
        self.start_generation(Start::Restore(previous, restored));
    }

    /// The watcher saw the plugin directory settle: upgrade if the set of hashes differs
    /// from the newest generation's (a failing scan upgrades too, so that the refusal and
    /// its reason are reported).
    fn on_plugins_changed(&mut self) {
        let newest = self.generations.values().rev().find(|g| {
            matches!(
                g.state,
                GenerationState::Starting | GenerationState::Serving
            )
        });
        let Some(newest) = newest else { return };
        let current: Vec<&str> = newest
            .plugins
            .iter()
            .map(|p| p.spec.hash.as_str())
            .collect();
        match crate::plugins::scan(&newest.config) {
            Ok(scanned)
                if scanned
                    .iter()
                    .map(|s| s.hash.as_str())
                    .eq(current.iter().copied()) =>
            {
                tracing::info!("plugin directory changed, but not the plugin set: no upgrade");
            }
            _ => self.on_upgrade("plugin directory changed", None),
        }
    }

    fn on_restart(&mut self, number: u64, slot: usize) {
        let Some(g) = self.generations.get(&number) else {
            return;
        };
        if g.state != GenerationState::Serving
            || g.workers[slot].process.is_some()
            || self.stopping.is_some()
        {
            return;
        }
        match self.launch(number, slot) {
            Ok(()) => {
                let g = &self.generations[&number];
                if let Some(pid) = g.workers[slot].process.as_ref().map(|p| p.pid) {
                    self.after(
                        g.config.worker.ready_timeout,
                        Event::ReplacementReadyTimeout {
                            generation: number,
                            pid,
                        },
                    );
                }
            }
            Err(reason) => self.retry_restart(number, slot, reason),
        }
    }

    fn retry_restart(&mut self, number: u64, slot: usize, reason: String) {
        let g = self.generations.get_mut(&number).expect("checked above");
        let w = &mut g.workers[slot];
        w.crash_streak += 1;
        let delay = backoff(w.crash_streak);
        w.restart_at = Some(Instant::now() + delay);
        {
            let _e = g.span.enter();
            tracing::error!("{reason}; retrying in {delay:?}");
        }
        self.after(
            delay,
            Event::Restart {
                generation: number,
                slot,
            },
        );
    }

    fn reap_if_empty(&mut self, number: u64) {
        if self.generations.get(&number).is_some_and(|g| g.is_empty()) {
            self.reap(number);
        }
    }

    /// Every worker of `number` has exited: forget it, and start what waited for room.
    fn reap(&mut self, number: u64) {
        let Some(g) = self.generations.remove(&number) else {
            return;
        };
        self.timers
            .retain(|_, event| event.generation() != Some(number));
        {
            let _e = g.span.enter();
            let ms = |d: Duration| {
                humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
            };
            match g.draining_since {
                Some(since) => tracing::info!(
                    "generation gone: drained in {}, {} request(s) served in {}",
                    ms(since.elapsed()),
                    g.requests(),
                    ms(g.started.elapsed())
                ),
                None => tracing::info!(
                    "{} generation gone after {}, {} request(s) served",
                    g.state.name(),
                    ms(g.started.elapsed()),
                    g.requests()
                ),
            }
        }
        // Its artifacts are let go of before the cache is pruned.
        drop(g);
        if self.stopping.is_none() {
            let summary = self.summary();
            self.systemd.status(&summary);
        }
        self.prune_cache();
        if self.start_deferred && self.stopping.is_none() {
            match self.deferred_restore.take() {
                Some((artifacts, restored)) => {
                    self.start_generation(Start::Restore(artifacts, restored));
                }
                None => self.begin_upgrade(),
            }
        }
    }

    fn on_stop(&mut self, fast: bool, source: &'static str, reply: Option<oneshot::Sender<()>>) {
        let first = self.stopping.is_none();
        self.stopping.get_or_insert_with(Vec::new).extend(reply);
        if first {
            tracing::info!(
                "stopping ({source}){}",
                if fast {
                    ": killing workers"
                } else {
                    ": draining every generation"
                }
            );
            // systemd's stop timeout may be shorter than a drain: while generations are
            // left, keep extending it a step at a time (the drain itself is bounded by
            // drain_timeout, after which workers are killed and the supervisor exits).
            self.systemd.stopping(
                &format!(
                    "stopping: draining {} generation(s)",
                    self.generations.len()
                ),
                EXTEND_STEP,
            );
            self.after(EXTEND_INTERVAL, Event::StopTick);
            let refused = outcome(
                None,
                UpgradeResult::Refused,
                Some("the supervisor is stopping".into()),
            );
            for w in self
                .starting_waiters
                .drain(..)
                .chain(self.follow_up.take().unwrap_or_default())
            {
                let _ = w.send(refused.clone());
            }
            self.start_deferred = false;
            self.deferred_restore = None;
        }
        let numbers: Vec<u64> = self.generations.keys().copied().collect();
        for number in numbers {
            if fast {
                self.generations[&number].signal_all(Signal::SIGKILL);
                // A generation whose workers all wait out a back-off has nothing to reap.
                self.reap_if_empty(number);
            } else if first {
                self.drain(number);
            }
        }
    }

    /// Hands `event` to the loop after `delay`. Timers live in the supervisor, not in
    /// tasks, so those of a generation that is gone are dropped with it (hundreds of quick
    /// upgrades would otherwise leave hundreds of sleeping tasks behind).
    fn after(&mut self, delay: Duration, event: Event) {
        self.timer_seq += 1;
        self.timers
            .insert((tokio::time::Instant::now() + delay, self.timer_seq), event);
    }

    /// The next timer that is due, once it is.
    async fn next_timer(timers: &BTreeMap<(tokio::time::Instant, u64), Event>) {
        match timers.keys().next() {
            Some((at, _)) => tokio::time::sleep_until(*at).await,
            None => std::future::pending().await,
        }
    }

    /// One line for systemd's `STATUS=` and the log.
    fn summary(&self) -> String {
        let mut parts = Vec::new();
        for g in self.generations.values() {
            parts.push(format!(
                "generation {} {} ({} worker(s))",
                g.number,
                g.state.name(),
                g.pids().len()
            ));
        }
        if parts.is_empty() {
            parts.push("no generation running".into());
        }
        // Until the next upgrade succeeds, the status keeps saying why the last one did not.
        if let Some(last) = &self.last_upgrade
            && last.result != UpgradeResult::Succeeded
        {
            parts.push(format!("last upgrade {}", last.describe()));
        }
        parts.join("; ")
    }

    fn report(&self) -> StatusReport {
        let now = Instant::now();
        StatusReport {
            version: STATUS_VERSION,
            supervisor: SupervisorInfo {
                pid: std::process::id(),
                config: self.config_path.display().to_string(),
                started_at: timestamp(self.started_at),
                state: if self.stopping.is_some() {
                    "stopping"
                } else {
                    "running"
                }
                .into(),
                upgrade_pending: self.follow_up.is_some() || self.start_deferred,
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
                    })
                    .collect();
                l.sort_by(|a, b| a.name.cmp(&b.name));
                l
            },
            generations: self
                .generations
                .values()
                .map(|g| GenerationInfo {
                    number: g.number,
                    state: g.state.name().into(),
                    started_at: timestamp(g.started_at),
                    uptime_secs: g.started.elapsed().as_secs(),
                    pids: g.pids(),
                    restarts: g.restarts,
                    connections: g.connections(),
                    requests: g.requests(),
                    failure: g.failure.clone(),
                    worker: Some(crate::status::BinaryInfo {
                        path: g.binary.source.display().to_string(),
                        cached: g.binary.cached().display().to_string(),
                        sha256: g.binary.hash().to_owned(),
                    }),
                    restored_from: g.restored.as_ref().map(|r| r.from),
                    rollback_to: g.previous.as_ref().map(|p| p.number),
                    plugins: g
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
                            pid: w.process.as_ref().map(|p| p.pid),
                            state: match (&w.process, w.ready, w.restart_at) {
                                (Some(_), true, _) => "ready",
                                (Some(_), false, _) => "starting",
                                (None, _, Some(_)) => "restarting",
                                (None, _, None) => "exited",
                            }
                            .into(),
                            restarts: w.restarts,
                            restart_in_ms: w
                                .restart_at
                                .filter(|_| w.process.is_none())
                                .map(|at| at.saturating_duration_since(now).as_millis() as u64),
                            connections: w.stats.connections,
                            requests: w.stats.requests,
                            stats_age_ms: w
                                .stats_at
                                .filter(|_| w.process.is_some())
                                .map(|at| now.saturating_duration_since(at).as_millis() as u64),
                        })
                        .collect(),
                })
                .collect(),
            last_upgrade: self.last_upgrade.clone(),
        }
    }
}

fn backoff(streak: u32) -> Duration {
    let factor = 1u32 << streak.saturating_sub(1).min(16);
    (RESTART_BACKOFF_FIRST * factor).min(RESTART_BACKOFF_MAX)
}

fn outcome(
    generation: Option<u64>,
    result: UpgradeResult,
    reason: Option<String>,
) -> UpgradeOutcome {
    UpgradeOutcome {
        generation,
        result,
        reason,
        at: timestamp(SystemTime::now()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(30), RESTART_BACKOFF_MAX);
    }
}
