//! The supervisor's decisions, as a state machine with no I/O: an [`Input`] and the time
//! go in, the state changes, and [`Effect`]s come out for the shell (`supervisor.rs`) to
//! carry out. Nothing here touches a process, a socket, a file or a clock of its own, so
//! every rule is tested by driving [`Core`] with input sequences in milliseconds
//! (`tests.rs`, including property tests of the invariants below).
//!
//! # States
//! - The supervisor is in one [`Mode`]: `Idle`; `Preparing` an upgrade (config and
//!   artifacts being read by the shell); `Starting` generation N (until every worker is
//!   READY, or it fails); `Canary` (generation N serves beside the serving one until it is
//!   judged, with `[upgrade] canary`); `WaitingForRoom` (`max_generations` reached: the
//!   start waits for the oldest draining generation); `Stopping`. Waiters of the upgrade in
//!   progress and the coalesced follow-up live in the variant they belong to.
//! - A [`Generation`] is `Starting` → `Serving` → `Draining`, or `Starting` → `Failed`,
//!   or `Starting` → `Canary` → `Serving` (promoted) or `Draining` (rolled back); it is
//!   forgotten once no worker is left.
//! - A worker [`Slot`] is `Spawning` → `Running` → `Backoff` (serving: replaced after a
//!   back-off) or `Exited`.
//!
//! # Where each rule is decided
//! - Upgrades, coalescing, promotion, rollback of a start, `max_generations`:
//!   [`upgrade.rs`](upgrade).
//! - Worker slots: READY, notify messages, exits, back-off, replacement: [`slots.rs`](slots).
//! - Canaries: the window, the judgement, early rollback on crashes, decisions by hand:
//!   [`canary.rs`](canary).
//! - Crash-loop restore after promotion: [`crash_loop.rs`](crash_loop).
//! - Stopping: [`stop.rs`](stop).
//! - Timers: [`Core::on_tick`] here; each timer is handled by the file of its rule.
//! - What systemd and `baton status` are told: [`report.rs`](report).
//!
//! # Invariants (checked by the property tests)
//! At most one generation is serving, at most one starting and at most one canary; a
//! canary exists exactly while the mode is `Canary`, and then a generation serves beside
//! it; no more than `max_generations` are alive; every waiter is answered exactly once; no timer of a
//! generation that is gone is acted on; nothing is spawned or signalled for a generation
//! that is gone.

mod canary;
mod crash_loop;
mod report;
mod self_upgrade;
mod slots;
pub mod snapshot;
mod stop;
#[cfg(test)]
mod tests;
mod totals;
mod upgrade;

use crate::status::{CanaryVerdict, UpgradeOutcome, UpgradeResult, timestamp};
use baton_proto::{NotifyMessage, Stats};
pub use canary::{Canary, Judgement, judge};
pub use self_upgrade::SelfUpgrade;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};
pub use totals::{Totals, UPGRADE_BUCKETS, UpgradeKind};

/// After `drain_timeout`, how long a worker gets to exit by itself before SIGKILL.
pub const DRAIN_KILL_MARGIN: Duration = Duration::from_secs(2);
/// How long the answer to an upgrade waits for the generation it replaced to stop
/// accepting (its workers say `STOPPING=1` once their accept loops ended): so that a
/// connection made after `upgrade --wait` returned meets the new generation (a new TLS
/// certificate, say). An older worker that does not say it is waited for this long.
pub const ACCEPT_CLOSE_WAIT: Duration = Duration::from_secs(1);
/// After a force-close (SIGQUIT), how long a worker gets before SIGKILL.
pub const FORCE_CLOSE_KILL_AFTER: Duration = Duration::from_secs(1);
/// First back-off before replacing a crashed worker; doubles per crash in a row.
pub const RESTART_BACKOFF_FIRST: Duration = Duration::from_millis(100);
/// Longest back-off.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// While stopping, `EXTEND_TIMEOUT_USEC` is sent this often ...
pub const EXTEND_INTERVAL: Duration = Duration::from_secs(2);
/// ... each time extending systemd's stop timeout by this much from then.
pub const EXTEND_STEP: Duration = Duration::from_secs(6);
/// A worker that ran this long before exiting starts a new crash streak.
pub const STABLE_RUN: Duration = Duration::from_secs(30);

/// Identifies a client waiting for an answer (the shell keeps the channel).
pub type WaiterId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum GenerationState {
    /// Workers started, not all READY yet.
    Starting,
    /// Ready, and taking new connections beside the serving generation until it is
    /// judged (`[upgrade] canary`).
    Canary,
    /// The one generation taking new connections (with a canary beside it, if any).
    Serving,
    /// Told to drain (SIGTERM); waiting for its workers to exit.
    Draining,
    /// Rolled back; its workers were killed and are being reaped.
    Failed,
}

impl GenerationState {
    pub fn name(self) -> &'static str {
        match self {
            GenerationState::Starting => "starting",
            GenerationState::Canary => "canary",
            GenerationState::Serving => "serving",
            GenerationState::Draining => "draining",
            GenerationState::Failed => "failed",
        }
    }
}

/// What the core needs to know of a generation's config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    pub processes: usize,
    pub ready_timeout: Duration,
    pub drain_timeout: Duration,
    pub drain_idle_grace: Duration,
    pub crash_loop_window: Duration,
    pub crash_loop_exits: usize,
    pub max_generations: usize,
    /// How this generation, once ready, is judged beside the serving one (`None`: it is
    /// promoted at once).
    #[serde(default)]
    pub canary: Option<CanaryPolicy>,
}

/// `[upgrade] canary*`: the window and thresholds a canary is judged by.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanaryPolicy {
    pub window: Duration,
    pub min_requests: u64,
    pub max_error_ratio_increase: f64,
}

impl Limits {
    pub fn of(config: &crate::config::Config) -> Self {
        let w = &config.worker;
        Self {
            processes: w.processes,
            ready_timeout: w.ready_timeout,
            drain_timeout: w.drain_timeout,
            drain_idle_grace: w.drain_idle_grace,
            crash_loop_window: w.crash_loop_window,
            crash_loop_exits: w.crash_loop_exits,
            max_generations: w.max_generations,
            canary: config.upgrade.canary.map(|window| CanaryPolicy {
                window,
                min_requests: config.upgrade.canary_min_requests,
                max_error_ratio_increase: config.upgrade.canary_max_error_ratio_increase,
            }),
        }
    }
}

/// What a generation can be started from again: its artifacts (opaque to the core: the
/// shell's checked files and parsed config) and limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target<A> {
    /// The generation that ran them.
    pub number: u64,
    pub artifacts: A,
    pub limits: Limits,
}

/// Why a generation runs an older generation's artifacts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restored {
    /// Whose artifacts.
    pub from: u64,
    /// The generation that crash-looped.
    pub crashed: u64,
    pub reason: String,
}

/// How a worker process ended, as the shell saw it.
#[derive(Debug, Clone)]
pub struct Exit {
    pub pid: u32,
    pub status: String,
    pub stderr_tail: Vec<String>,
}

impl Exit {
    /// "worker 12 exited (exit status: 3) WHEN", plus the stderr tail when there is one.
    pub fn describe(&self, when: &str) -> String {
        if self.stderr_tail.is_empty() {
            format!("worker {} exited ({}) {when}", self.pid, self.status)
        } else {
            format!(
                "worker {} exited ({}) {when}; stderr tail:\n{}",
                self.pid,
                self.status,
                self.stderr_tail.join("\n")
            )
        }
    }
}

/// Everything the core reacts to.
#[derive(Debug)]
pub enum Input<A> {
    /// Generation 1: what the shell prepared at start-up (no `RELOADING=1` for it).
    First(Result<(A, Limits), String>),
    /// Start the next generation from what is on disk now.
    Upgrade {
        source: &'static str,
        waiter: Option<WaiterId>,
    },
    /// The answer to [`Effect::Prepare`].
    Prepared(Result<(A, Limits), String>),
    /// The answer to [`Effect::Launch`] when the generation's resources could not be made
    /// (a listener its config adds cannot be bound): nothing was started.
    LaunchFailed {
        generation: u64,
        reason: String,
    },
    /// The answer to [`Effect::Spawn`].
    Spawned {
        generation: u64,
        slot: usize,
        result: Result<u32, String>,
    },
    /// A datagram from a worker, attributed by its credentials.
    Notify {
        pid: u32,
        message: NotifyMessage,
    },
    WorkerExited {
        generation: u64,
        exit: Exit,
    },
    /// Drain every generation and exit (`fast`: kill the workers instead).
    Stop {
        fast: bool,
        source: &'static str,
        waiter: Option<WaiterId>,
    },
    /// Time passed: act on the timers that are due.
    Tick,
    /// Decide the running canary by hand (`baton upgrade --promote` / `--abort`); the
    /// waiter is answered with the upgrade's outcome, or `refused` when no canary runs.
    DecideCanary {
        decision: CanaryCall,
        source: &'static str,
        waiter: Option<WaiterId>,
    },
    /// Replace the supervisor's own image with the binary on disk (`exec`, same pid),
    /// then (`then_generation`) start a generation as an upgrade does.
    SelfUpgrade {
        source: &'static str,
        waiter: Option<WaiterId>,
        then_generation: bool,
    },
    /// The answer to [`Effect::ReExec`] when the new image was refused: this image goes on.
    SelfUpgradeFailed {
        request: SelfUpgrade,
        reason: String,
    },
    /// The first input of a new image that took over with `request` (restored state).
    SelfUpgraded {
        request: SelfUpgrade,
        /// "0.1.0 (sha256 …) → 0.1.1 (sha256 …)", for the log and the outcome.
        change: String,
    },
}

/// An operator's decision on a running canary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CanaryCall {
    /// Promote it now: the generation it was compared with drains.
    Promote,
    /// Roll it back now: it drains, the serving generation goes on.
    Abort,
}

/// A signal for a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    /// SIGTERM: drain.
    Drain,
    /// SIGQUIT: close everything now and exit (force-close).
    ForceClose,
    /// SIGKILL.
    Kill,
}

/// A message for systemd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Systemd {
    /// `READY=1` with a `STATUS=`.
    Ready(String),
    /// `RELOADING=1` with `MONOTONIC_USEC`.
    Reloading(String),
    Status(String),
    /// `STOPPING=1`, extending the stop timeout by the duration.
    Stopping(String, Duration),
    /// `EXTEND_TIMEOUT_USEC` while stopping.
    ExtendTimeout(String, Duration),
}

/// What the shell is asked to do.
#[derive(Debug)]
pub enum Effect<A> {
    /// Read the config, check and cache the worker binary and plugins; answer with
    /// [`Input::Prepared`].
    Prepare,
    /// Make generation `generation`'s resources (listeners, settings, log span) from
    /// `artifacts`; answer [`Input::LaunchFailed`] if that fails.
    Launch {
        generation: u64,
        artifacts: A,
    },
    /// Start the worker of `slot` (if [`Core::wants_spawn`] still says so); answer with
    /// [`Input::Spawned`].
    Spawn {
        generation: u64,
        slot: usize,
    },
    Signal {
        generation: u64,
        pid: u32,
        signal: Sig,
    },
    /// The answer for an upgrade's waiter.
    Answer {
        waiter: WaiterId,
        outcome: UpgradeOutcome,
    },
    /// The generation is gone: drop its resources.
    Forget {
        generation: u64,
    },
    /// Remove from the artifact cache what [`Core::artifacts_in_use`] does not name.
    Prune,
    /// The serving generation's config decides what is watched (`plugins.watch`).
    Watch {
        artifacts: A,
    },
    Systemd(Systemd),
    /// Check the supervisor binary on disk, hand the state over and `exec` it; answer
    /// [`Input::SelfUpgradeFailed`] if that cannot be done. Emitted only while the core is
    /// idle, as the last effect of an input.
    ReExec(SelfUpgrade),
    /// Stopped: answer these stop waiters, then exit with this result.
    Exit {
        waiters: Vec<WaiterId>,
        result: Result<(), String>,
    },
}

/// The supervisor's mode. Each variant carries what only it has.
#[derive(Debug)]
pub enum Mode<A> {
    Idle,
    /// The shell is reading the config and artifacts for the next generation.
    Preparing {
        waiters: Vec<WaiterId>,
        follow_up: Option<Vec<WaiterId>>,
    },
    /// Generation `generation` is starting.
    Starting {
        generation: u64,
        waiters: Vec<WaiterId>,
        follow_up: Option<Vec<WaiterId>>,
    },
    /// Generation `generation` is the canary: it serves beside the serving generation
    /// until `canary` is decided.
    Canary {
        generation: u64,
        waiters: Vec<WaiterId>,
        follow_up: Option<Vec<WaiterId>>,
        canary: Canary,
    },
    /// A start waits for a generation to be gone (`max_generations`).
    WaitingForRoom {
        start: Start<A>,
        waiters: Vec<WaiterId>,
        follow_up: Option<Vec<WaiterId>>,
    },
    Stopping {
        waiters: Vec<WaiterId>,
        /// The result to exit with (`None`: a clean stop).
        exit: Option<Result<(), String>>,
        /// `Effect::Exit` was emitted.
        done: bool,
    },
}

/// What a new generation is started from.
#[derive(Debug)]
pub enum Start<A> {
    /// What is on disk now (an upgrade), prepared by the shell.
    Fresh(A, Limits),
    /// An older generation's exact artifacts, after a crash loop.
    Restore(Target<A>, Restored),
}

/// One worker position in a generation; a crashed worker is replaced in its slot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Slot {
    pub state: SlotState,
    pub restarts: u64,
    /// Crashes in a row without a stable run between them; drives the back-off.
    pub crash_streak: u32,
    /// The worker's last `STATUS=`, for failure reports.
    pub status: Option<String>,
    pub stats: Stats,
    /// When the worker last reported `stats`.
    #[serde(with = "snapshot::mono_opt")]
    pub stats_at: Option<Instant>,
    /// The release and protocol the worker reported with READY.
    #[serde(default)]
    pub build: Option<baton_proto::WorkerBuild>,
    /// The worker's last `BATON_METRICS=`: its totals since it started.
    #[serde(default)]
    pub metrics: Option<baton_proto::WorkerMetrics>,
    /// The worker said `STOPPING=1`: it accepts no more connections.
    #[serde(default)]
    pub stopped_accepting: bool,
}

/// A worker slot's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotState {
    /// Asked of the shell, not started yet.
    Spawning,
    Running {
        pid: u32,
        #[serde(with = "snapshot::mono")]
        spawned: Instant,
        ready: bool,
    },
    /// Serving generation: replaced at `until`.
    Backoff {
        #[serde(with = "snapshot::mono")]
        until: Instant,
    },
    Exited,
}

impl Slot {
    fn new() -> Self {
        Self {
            state: SlotState::Spawning,
            restarts: 0,
            crash_streak: 0,
            status: None,
            stats: Stats::default(),
            stats_at: None,
            build: None,
            metrics: None,
            stopped_accepting: false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        match self.state {
            SlotState::Running { pid, .. } => Some(pid),
            _ => None,
        }
    }

    pub fn ready(&self) -> bool {
        matches!(self.state, SlotState::Running { ready: true, .. })
    }

    /// A process may still exist (or is about to): the generation is not empty.
    fn occupied(&self) -> bool {
        matches!(self.state, SlotState::Spawning | SlotState::Running { .. })
    }
}

/// One generation, as the core sees it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Generation<A> {
    pub number: u64,
    pub state: GenerationState,
    pub artifacts: A,
    pub limits: Limits,
    pub workers: Vec<Slot>,
    pub restarts: u64,
    /// Requests served by workers of this generation that have exited.
    pub requests_of_exited: u64,
    /// 5xx answers of workers of this generation that have exited.
    #[serde(default)]
    pub errors_of_exited: u64,
    pub failure: Option<String>,
    #[serde(with = "snapshot::mono")]
    pub started: Instant,
    pub started_at: SystemTime,
    /// When it began serving.
    #[serde(with = "snapshot::mono_opt")]
    pub promoted: Option<Instant>,
    /// When it was told to drain.
    #[serde(with = "snapshot::mono_opt")]
    pub draining_since: Option<Instant>,
    /// Worker exits while serving, within `crash_loop_window` of `promoted`.
    pub crashes_after_promotion: usize,
    /// What to start again if this generation crash-loops after promotion: the
    /// generation it replaced (never set for a generation that is itself a restore).
    pub previous: Option<Target<A>>,
    /// This generation runs the exact artifacts of that generation, after a crash loop.
    pub restored: Option<Restored>,
    /// Answers to the upgrade that replaced this generation, given once it stopped
    /// accepting (or [`ACCEPT_CLOSE_WAIT`] after it was told to drain).
    #[serde(default)]
    pub answers_when_closed: Vec<(WaiterId, UpgradeOutcome)>,
    #[serde(skip, default = "tracing::Span::none")]
    pub span: tracing::Span,
}

impl<A> Generation<A> {
    pub fn pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(Slot::pid).collect()
    }

    pub fn all_ready(&self) -> bool {
        self.workers.iter().all(Slot::ready)
    }

    /// Every worker process left said it stopped accepting.
    pub fn stopped_accepting(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.pid().is_none() || w.stopped_accepting)
    }

    /// No worker process is left (or about to be started).
    pub fn is_empty(&self) -> bool {
        !self.workers.iter().any(Slot::occupied)
    }

    pub fn slot_of(&self, pid: u32) -> Option<usize> {
        self.workers.iter().position(|w| w.pid() == Some(pid))
    }

    /// The sum of a gauge over the running workers, as they last reported it.
    fn reported(&self, gauge: impl Fn(&Stats) -> u64) -> u64 {
        self.workers
            .iter()
            .filter(|w| w.pid().is_some())
            .map(|w| gauge(&w.stats))
            .sum()
    }

    pub fn connections(&self) -> u64 {
        self.reported(|s| s.connections)
    }

    /// Open WebSockets, as the running workers last reported.
    pub fn websockets(&self) -> u64 {
        self.reported(|s| s.websockets)
    }

    /// Streamed answers under way, as the running workers last reported.
    pub fn streams(&self) -> u64 {
        self.reported(|s| s.streams)
    }

    /// Of the open connections, the idle ones in the workers' idle sets, as the running
    /// workers last reported.
    pub fn idle(&self) -> u64 {
        self.reported(|s| s.idle)
    }

    pub fn requests(&self) -> u64 {
        self.requests_of_exited + self.workers.iter().map(|w| w.stats.requests).sum::<u64>()
    }

    /// Answers with a 5xx status, including those of workers that have exited.
    pub fn errors(&self) -> u64 {
        self.errors_of_exited + self.workers.iter().map(|w| w.stats.errors).sum::<u64>()
    }

    /// Its counters now, for a canary window's deltas (unexpected worker exits are its
    /// restarts).
    fn tally(&self) -> canary::Tally {
        canary::Tally {
            requests: self.requests(),
            errors: self.errors(),
            exits: self.restarts,
        }
    }
}

/// Timers: events the core schedules for itself, as deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Timer {
    Ready {
        generation: u64,
    },
    Drain {
        generation: u64,
    },
    ForceClose {
        generation: u64,
    },
    ForceKill {
        generation: u64,
    },
    ReplacementReady {
        generation: u64,
        pid: u32,
    },
    Restart {
        generation: u64,
        slot: usize,
    },
    /// The end of generation's canary window.
    CanaryEnd {
        generation: u64,
    },
    /// Answer the upgrade that replaced this generation, whether it stopped accepting
    /// or not.
    AcceptClosed {
        generation: u64,
    },
    StopTick,
}

impl Timer {
    fn generation(self) -> Option<u64> {
        match self {
            Timer::Ready { generation }
            | Timer::Drain { generation }
            | Timer::ForceClose { generation }
            | Timer::ForceKill { generation }
            | Timer::ReplacementReady { generation, .. }
            | Timer::Restart { generation, .. }
            | Timer::CanaryEnd { generation }
            | Timer::AcceptClosed { generation } => Some(generation),
            Timer::StopTick => None,
        }
    }
}

/// The state machine.
#[derive(Debug)]
pub struct Core<A> {
    generations: BTreeMap<u64, Generation<A>>,
    last_number: u64,
    mode: Mode<A>,
    max_generations: usize,
    last_upgrade: Option<UpgradeOutcome>,
    timers: BTreeMap<(Instant, u64), Timer>,
    timer_seq: u64,
    effects: Vec<Effect<A>>,
    now: Instant,
    /// A supervisor re-exec asked for, waiting for the core to be idle.
    self_upgrade: Option<SelfUpgrade>,
    /// The service's totals for the metrics (`totals.rs`).
    totals: Totals,
    /// When the upgrade in progress was asked for.
    upgrade_started: Option<Instant>,
}

impl<A: Clone + std::fmt::Debug> Core<A> {
    pub fn new(max_generations: usize, now: Instant) -> Self {
        Self {
            generations: BTreeMap::new(),
            last_number: 0,
            mode: Mode::Idle,
            max_generations,
            last_upgrade: None,
            timers: BTreeMap::new(),
            timer_seq: 0,
            effects: Vec::new(),
            now,
            self_upgrade: None,
            totals: Totals::default(),
            upgrade_started: None,
        }
    }

    /// Handles `input` at time `now` and returns what the shell must do, in order.
    pub fn handle(&mut self, now: Instant, input: Input<A>) -> Vec<Effect<A>> {
        self.now = self.now.max(now);
        match input {
            Input::First(prepared) => self.on_first(prepared),
            Input::Upgrade { source, waiter } => self.on_upgrade(source, waiter),
            Input::Prepared(prepared) => self.on_prepared(prepared),
            Input::LaunchFailed { generation, reason } => self.on_launch_failed(generation, reason),
            Input::Spawned {
                generation,
                slot,
                result,
            } => self.on_spawned(generation, slot, result),
            Input::Notify { pid, message } => self.on_notify(pid, message),
            Input::WorkerExited { generation, exit } => self.on_exit(generation, exit),
            Input::Stop {
                fast,
                source,
                waiter,
            } => self.on_stop(fast, source, waiter),
            Input::Tick => self.on_tick(),
            Input::DecideCanary {
                decision,
                source,
                waiter,
            } => self.on_decide_canary(decision, source, waiter),
            Input::SelfUpgrade {
                source,
                waiter,
                then_generation,
            } => self.on_self_upgrade(source, waiter, then_generation),
            Input::SelfUpgradeFailed { request, reason } => {
                self.on_self_upgrade_failed(request, reason)
            }
            Input::SelfUpgraded { request, change } => self.on_self_upgraded(request, change),
        }
        self.release_closed_answers();
        self.exit_if_stopped();
        self.re_exec_if_idle();
        std::mem::take(&mut self.effects)
    }

    /// When the next timer is due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(at, _)| *at)
    }

    /// Whether the worker of `slot` is still wanted (the shell asks before it spawns).
    pub fn wants_spawn(&self, generation: u64, slot: usize) -> bool {
        self.generations.get(&generation).is_some_and(|g| {
            matches!(
                g.state,
                GenerationState::Starting | GenerationState::Serving | GenerationState::Canary
            ) && g.workers.get(slot).map(|w| w.state) == Some(SlotState::Spawning)
        })
    }

    pub fn generations(&self) -> impl DoubleEndedIterator<Item = &Generation<A>> {
        self.generations.values()
    }

    pub fn generation(&self, number: u64) -> Option<&Generation<A>> {
        self.generations.get(&number)
    }

    pub fn mode(&self) -> &Mode<A> {
        &self.mode
    }

    pub fn last_upgrade(&self) -> Option<&UpgradeOutcome> {
        self.last_upgrade.as_ref()
    }

    pub fn stopping(&self) -> bool {
        matches!(self.mode, Mode::Stopping { .. })
    }

    /// An upgrade will run after the current one (coalesced, or waiting for room).
    pub fn upgrade_pending(&self) -> bool {
        let generation = match &self.mode {
            Mode::Preparing { follow_up, .. }
            | Mode::Starting { follow_up, .. }
            | Mode::Canary { follow_up, .. } => follow_up.is_some(),
            Mode::WaitingForRoom { .. } => true,
            Mode::Idle | Mode::Stopping { .. } => false,
        };
        generation || self.self_upgrade.is_some()
    }

    /// The generation a worker belongs to, and its slot.
    pub fn find_worker(&self, pid: u32) -> Option<(u64, usize)> {
        self.generations
            .values()
            .find_map(|g| g.slot_of(pid).map(|slot| (g.number, slot)))
    }

    /// Every artifact set a live generation runs or could be restored to, and a start
    /// waiting for room: what pruning must keep.
    pub fn artifacts_in_use(&self) -> Vec<&A> {
        let mut all = Vec::new();
        for g in self.generations.values() {
            all.push(&g.artifacts);
            if let Some(p) = &g.previous {
                all.push(&p.artifacts);
            }
        }
        if let Mode::WaitingForRoom { start, .. } = &self.mode {
            all.push(match start {
                Start::Fresh(a, _) => a,
                Start::Restore(t, _) => &t.artifacts,
            });
        }
        all
    }

    fn state_of(&self, generation: u64) -> Option<GenerationState> {
        self.generations.get(&generation).map(|g| g.state)
    }

    fn serving(&self) -> Option<u64> {
        self.generations
            .values()
            .find(|g| g.state == GenerationState::Serving)
            .map(|g| g.number)
    }

    fn emit(&mut self, effect: Effect<A>) {
        self.effects.push(effect);
    }

    /// Answers `waiter` (if any) that its request was refused, saying why.
    fn refuse_waiter(&mut self, waiter: Option<WaiterId>, why: &str) {
        if let Some(waiter) = waiter {
            self.emit(Effect::Answer {
                waiter,
                outcome: outcome(None, UpgradeResult::Refused, Some(why.into())),
            });
        }
    }

    fn signal(&mut self, generation: u64, signal: Sig) {
        let pids = self.generations.get(&generation).map(|g| g.pids());
        for pid in pids.into_iter().flatten() {
            self.emit(Effect::Signal {
                generation,
                pid,
                signal,
            });
        }
    }

    /// Schedules `timer` for `delay` from now.
    fn after(&mut self, delay: Duration, timer: Timer) {
        self.timer_seq += 1;
        self.timers
            .insert((self.now + delay, self.timer_seq), timer);
    }

    /// Acts on every timer that is due, in order. A timer of a generation that is gone
    /// is dropped with it (see `reap`); the handlers check the state they were for.
    fn on_tick(&mut self) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > self.now {
                break;
            }
            let timer = entry.remove();
            if timer
                .generation()
                .is_some_and(|g| !self.generations.contains_key(&g))
            {
                continue;
            }
            match timer {
                Timer::Ready { generation } => self.on_ready_timeout(generation),
                Timer::Drain { generation } => self.on_drain_timeout(generation),
                Timer::ForceClose { generation } => self.on_force_close(generation),
                Timer::ForceKill { generation } => self.on_force_kill(generation),
                Timer::ReplacementReady { generation, pid } => {
                    self.on_replacement_timeout(generation, pid)
                }
                Timer::Restart { generation, slot } => self.on_restart(generation, slot),
                Timer::CanaryEnd { generation } => self.on_canary_end(generation),
                Timer::AcceptClosed { generation } => self.release_answers(generation),
                Timer::StopTick => self.on_stop_tick(),
            }
        }
    }

    /// Answers what waited for a generation that has now stopped accepting.
    fn release_closed_answers(&mut self) {
        let closed: Vec<u64> = self
            .generations
            .values()
            .filter(|g| !g.answers_when_closed.is_empty() && g.stopped_accepting())
            .map(|g| g.number)
            .collect();
        for number in closed {
            self.release_answers(number);
        }
    }

    /// Gives the answers that waited for generation `number` to stop accepting.
    fn release_answers(&mut self, number: u64) {
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        for (waiter, outcome) in std::mem::take(&mut g.answers_when_closed) {
            self.emit(Effect::Answer { waiter, outcome });
        }
    }

    /// Every worker of `number` has exited: forget it, and start what waited for room.
    fn reap(&mut self, number: u64) {
        self.release_answers(number);
        let Some(g) = self.generations.remove(&number) else {
            return;
        };
        self.timers
            .retain(|_, timer| timer.generation() != Some(number));
        {
            let _e = g.span.enter();
            let ms = |d: Duration| {
                humantime::format_duration(Duration::from_millis(d.as_millis() as u64))
            };
            let now = self.now;
            match g.draining_since {
                Some(since) => tracing::info!(
                    "generation gone: drained in {}, {} request(s) served in {}",
                    ms(now.saturating_duration_since(since)),
                    g.requests(),
                    ms(now.saturating_duration_since(g.started))
                ),
                None => tracing::info!(
                    "{} generation gone after {}, {} request(s) served",
                    g.state.name(),
                    ms(now.saturating_duration_since(g.started)),
                    g.requests()
                ),
            }
        }
        // Its artifacts are let go of before the cache is pruned.
        drop(g);
        self.emit(Effect::Forget { generation: number });
        if !self.stopping() {
            let summary = self.summary();
            self.emit(Effect::Systemd(Systemd::Status(summary)));
        }
        self.emit(Effect::Prune);
        self.start_if_room();
    }

    fn reap_if_empty(&mut self, number: u64) {
        if self.generations.get(&number).is_some_and(|g| g.is_empty()) {
            self.reap(number);
        }
    }
}

/// An upgrade's outcome, stamped with the wall-clock time.
pub fn outcome(
    generation: Option<u64>,
    result: UpgradeResult,
    reason: Option<String>,
) -> UpgradeOutcome {
    UpgradeOutcome {
        generation,
        result,
        reason,
        at: timestamp(SystemTime::now()),
        canary: None,
    }
}

/// The outcome of an upgrade that ran a canary.
fn canary_outcome(generation: u64, reason: String, verdict: CanaryVerdict) -> UpgradeOutcome {
    let result = match verdict.decision {
        crate::status::CanaryDecision::Promoted => UpgradeResult::Succeeded,
        crate::status::CanaryDecision::RolledBack => UpgradeResult::RolledBack,
    };
    UpgradeOutcome {
        canary: Some(verdict),
        ..outcome(Some(generation), result, Some(reason))
    }
}

/// The back-off before the `streak`-th restart in a row.
pub fn backoff(streak: u32) -> Duration {
    let factor = 1u32 << streak.saturating_sub(1).min(16);
    (RESTART_BACKOFF_FIRST * factor).min(RESTART_BACKOFF_MAX)
}
