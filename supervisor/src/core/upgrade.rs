//! Upgrades: a request becomes `Preparing` (the shell reads config and artifacts), then a
//! start — at once, or `WaitingForRoom` under `max_generations` — then `Starting` until
//! every worker is READY (promotion: the previous generation drains) or the start fails
//! (rollback: the serving generation is untouched). Requests that arrive meanwhile are
//! coalesced into one follow-up, run when this one ends. Also the drain of a generation
//! and its force-close.

use super::GenerationState;
use super::{
    Core, Effect, FORCE_CLOSE_KILL_AFTER, Generation, Limits, Mode, Restored, Sig, Slot, Start,
    Systemd, Target, Timer, WaiterId, outcome,
};
use crate::status::{UpgradeOutcome, UpgradeResult};
use std::time::SystemTime;

impl<A: Clone + std::fmt::Debug> Core<A> {
    /// Generation 1, prepared by the shell before the loop began.
    pub(super) fn on_first(&mut self, prepared: Result<(A, Limits), String>) {
        self.mode = Mode::Preparing {
            waiters: Vec::new(),
            follow_up: None,
        };
        self.on_prepared(prepared);
    }

    pub(super) fn on_upgrade(&mut self, source: &'static str, waiter: Option<WaiterId>) {
        match &mut self.mode {
            Mode::Stopping { .. } => {
                self.refuse_waiter(waiter, "the supervisor is stopping");
            }
            Mode::Preparing { follow_up, .. }
            | Mode::Starting { follow_up, .. }
            | Mode::Canary { follow_up, .. }
            | Mode::WaitingForRoom { follow_up, .. } => {
                tracing::info!(
                    "upgrade requested ({source}) while one is in progress: it will follow"
                );
                follow_up.get_or_insert_with(Vec::new).extend(waiter);
            }
            Mode::Idle => {
                tracing::info!("upgrade requested ({source})");
                self.prepare(waiter.into_iter().collect());
            }
        }
    }

    /// Asks the shell for the next generation's config and artifacts.
    pub(super) fn prepare(&mut self, waiters: Vec<WaiterId>) {
        self.upgrade_begins();
        self.mode = Mode::Preparing {
            waiters,
            follow_up: None,
        };
        let status = format!("upgrading: starting generation {}", self.last_number + 1);
        self.emit(Effect::Systemd(Systemd::Reloading(status)));
        self.emit(Effect::Prepare);
    }

    pub(super) fn on_prepared(&mut self, prepared: Result<(A, Limits), String>) {
        let Mode::Preparing { .. } = self.mode else {
            // Stopped meanwhile: what was prepared is dropped.
            return;
        };
        match prepared {
            Err(reason) => self.refuse(reason),
            Ok((artifacts, limits)) => {
                self.max_generations = limits.max_generations;
                let Mode::Preparing { waiters, follow_up } =
                    std::mem::replace(&mut self.mode, Mode::Idle)
                else {
                    unreachable!("checked above")
                };
                self.start(Start::Fresh(artifacts, limits), waiters, follow_up);
            }
        }
    }

    /// Starts a generation, unless `max_generations` needs an old one gone first (then
    /// the oldest draining one is force-closed after `drain_idle_grace`, and the start
    /// happens when it is gone).
    pub(super) fn start(
        &mut self,
        start: Start<A>,
        waiters: Vec<WaiterId>,
        follow_up: Option<Vec<WaiterId>>,
    ) {
        if self.generations.len() >= self.max_generations {
            let grace = match &start {
                Start::Fresh(_, l) => l.drain_idle_grace,
                Start::Restore(t, _) => t.limits.drain_idle_grace,
            };
            let oldest = self
                .generations
                .values()
                .find(|g| g.state == GenerationState::Draining)
                .map(|g| (g.number, g.span.clone()));
            if let Some((oldest, span)) = oldest {
                let _e = span.enter();
                tracing::info!(
                    "max_generations ({}) reached: the next generation starts when generation {oldest} has drained (force-closed in {} if still draining)",
                    self.max_generations,
                    humantime::format_duration(grace)
                );
                drop(_e);
                self.after(grace, Timer::ForceClose { generation: oldest });
            }
            self.mode = Mode::WaitingForRoom {
                start,
                waiters,
                follow_up,
            };
            return;
        }
        let (artifacts, limits, restored, previous) = match start {
            Start::Fresh(a, l) => (a, l, None, None),
            Start::Restore(t, r) => (t.artifacts, t.limits, Some(r), None),
        };
        self.last_number += 1;
        let number = self.last_number;
        let span = tracing::info_span!("generation", n = number);
        let processes = limits.processes;
        let ready_timeout = limits.ready_timeout;
        self.generations.insert(
            number,
            Generation {
                number,
                state: GenerationState::Starting,
                artifacts: artifacts.clone(),
                limits,
                workers: (0..processes).map(|_| Slot::new()).collect(),
                restarts: 0,
                requests_of_exited: 0,
                errors_of_exited: 0,
                failure: None,
                started: self.now,
                started_at: SystemTime::now(),
                promoted: None,
                draining_since: None,
                crashes_after_promotion: 0,
                previous,
                restored,
                answers_when_closed: Vec::new(),
                span,
            },
        );
        self.mode = Mode::Starting {
            generation: number,
            waiters,
            follow_up,
        };
        self.emit(Effect::Launch {
            generation: number,
            artifacts,
        });
        for slot in 0..processes {
            self.emit(Effect::Spawn {
                generation: number,
                slot,
            });
        }
        self.after(ready_timeout, Timer::Ready { generation: number });
    }

    /// A generation is gone: a start waiting for room may go now.
    pub(super) fn start_if_room(&mut self) {
        if !matches!(self.mode, Mode::WaitingForRoom { .. })
            || self.generations.len() >= self.max_generations
        {
            return;
        }
        let Mode::WaitingForRoom {
            start,
            waiters,
            follow_up,
        } = std::mem::replace(&mut self.mode, Mode::Idle)
        else {
            unreachable!("checked above")
        };
        self.start(start, waiters, follow_up);
    }

    /// The shell could not make the generation's resources: nothing was started, so the
    /// upgrade is refused and the number is not used.
    pub(super) fn on_launch_failed(&mut self, generation: u64, reason: String) {
        if self.state_of(generation) != Some(GenerationState::Starting) {
            return;
        }
        self.generations.remove(&generation);
        self.timers
            .retain(|_, timer| timer.generation() != Some(generation));
        if self.last_number == generation {
            self.last_number -= 1;
        }
        self.refuse(reason);
    }

    /// Generation `number` serves, the previous one drains. `decided` is the outcome of
    /// a canary that ended in this promotion (`None`: every worker just became READY).
    pub(super) fn promote(&mut self, number: u64, decided: Option<UpgradeOutcome>) {
        let previous = self.serving();
        // A restore is not restored from in turn: no ping-pong between two bad sets.
        let target = match previous {
            Some(p) if self.generations[&number].restored.is_none() => {
                let g = &self.generations[&p];
                Some(Target {
                    number: p,
                    artifacts: g.artifacts.clone(),
                    limits: g.limits.clone(),
                })
            }
            _ => None,
        };
        let now = self.now;
        let g = self
            .generations
            .get_mut(&number)
            .expect("promote a live generation");
        g.state = GenerationState::Serving;
        g.promoted = Some(now);
        if target.is_some() {
            g.previous = target;
        }
        let after_canary = decided.is_some();
        let result = match (decided, &g.restored) {
            (Some(decided), _) => decided,
            (None, None) => outcome(Some(number), UpgradeResult::Succeeded, None),
            (None, Some(r)) => outcome(
                Some(r.crashed),
                UpgradeResult::RolledBack,
                Some(format!(
                    "{}; generation {number} serves generation {}'s artifacts",
                    r.reason, r.from
                )),
            ),
        };
        {
            let _e = g.span.enter();
            if after_canary {
                tracing::info!("serving after its canary, pids {:?}", g.pids());
            } else {
                tracing::info!(
                    "serving (ready in {:?}), pids {:?}",
                    now.saturating_duration_since(g.started),
                    g.pids()
                );
            }
        }
        let artifacts = g.artifacts.clone();
        if let Some(old) = previous {
            self.drain(old);
        }
        self.emit(Effect::Watch { artifacts });
        self.emit(Effect::Prune);
        // The answer waits until the old generation stopped accepting.
        self.finish_answering_after(result, true, previous);
    }

    /// Tells generation `number` to drain; it is killed `drain_timeout` (and a margin)
    /// later if it has not exited by then.
    pub(super) fn drain(&mut self, number: u64) {
        let now = self.now;
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        if g.state == GenerationState::Draining {
            return;
        }
        g.state = GenerationState::Draining;
        g.draining_since = Some(now);
        let deadline = g.limits.drain_timeout + super::DRAIN_KILL_MARGIN;
        {
            let _e = g.span.enter();
            tracing::info!(
                "draining {} connection(s) of pids {:?} (drain_timeout {})",
                g.connections(),
                g.pids(),
                humantime::format_duration(g.limits.drain_timeout)
            );
        }
        // Slots waiting out a back-off have no process: nothing to restart any more.
        for w in &mut g.workers {
            if matches!(
                w.state,
                super::SlotState::Backoff { .. } | super::SlotState::Spawning
            ) {
                w.state = super::SlotState::Exited;
            }
        }
        self.signal(number, Sig::Drain);
        self.after(deadline, Timer::Drain { generation: number });
        self.reap_if_empty(number);
    }

    /// Rolls back the starting generation `number`: its workers are killed, the serving
    /// generation is not touched, and the reason goes to the log, the status and waiters.
    pub(super) fn fail(&mut self, number: u64, reason: String) {
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        g.state = GenerationState::Failed;
        g.failure = Some(reason.clone());
        {
            let _e = g.span.enter();
            tracing::error!("rolled back: {reason}");
        }
        for w in &mut g.workers {
            if w.state == super::SlotState::Spawning {
                w.state = super::SlotState::Exited;
            }
        }
        self.signal(number, Sig::Kill);
        let exiting = self.serving().is_none() && !self.stopping();
        self.finish_with(
            outcome(
                Some(number),
                UpgradeResult::RolledBack,
                Some(reason.clone()),
            ),
            !exiting,
        );
        if exiting {
            // Nothing else can serve: the supervisor cannot go on.
            self.exit_when_empty(Err(format!(
                "generation {number} failed to start: {reason}"
            )));
        }
        self.reap_if_empty(number);
    }

    /// Nothing was started (an invalid config, an artifact that cannot be cached, a
    /// listener that cannot be bound): the serving generation keeps serving.
    pub(super) fn refuse(&mut self, reason: String) {
        let next = self.last_number + 1;
        let exiting = match self.serving() {
            Some(serving) => {
                tracing::error!("upgrade refused: {reason}; generation {serving} keeps serving");
                false
            }
            None if !self.stopping() => {
                // The first start: nothing else can serve, so the supervisor cannot go on.
                tracing::error!("cannot start generation {next}: {reason}");
                true
            }
            None => {
                tracing::error!("upgrade refused: {reason}");
                false
            }
        };
        self.finish_with(
            outcome(None, UpgradeResult::Refused, Some(reason.clone())),
            !exiting,
        );
        if exiting {
            self.exit_when_empty(Err(format!("generation {next} could not start: {reason}")));
        }
    }

    /// The upgrade in progress ended: answer its waiters, tell systemd, and run the
    /// coalesced follow-up if there is one.
    pub(super) fn finish(&mut self, result: UpgradeOutcome) {
        self.finish_with(result, true);
    }

    fn finish_with(&mut self, result: UpgradeOutcome, follow: bool) {
        self.finish_answering_after(result, follow, None);
    }

    /// Ends the upgrade in progress with `result`; its waiters are answered now, or, with
    /// `drained`, once that generation stopped accepting (at most ACCEPT_CLOSE_WAIT).
    fn finish_answering_after(
        &mut self,
        result: UpgradeOutcome,
        follow: bool,
        drained: Option<u64>,
    ) {
        let kind = self.kind_of(&result);
        let (waiters, follow_up) = match std::mem::replace(&mut self.mode, Mode::Idle) {
            Mode::Preparing { waiters, follow_up }
            | Mode::Starting {
                waiters, follow_up, ..
            }
            | Mode::Canary {
                waiters, follow_up, ..
            }
            | Mode::WaitingForRoom {
                waiters, follow_up, ..
            } => (waiters, follow_up),
            Mode::Idle => (Vec::new(), None),
            stopping @ Mode::Stopping { .. } => {
                self.mode = stopping;
                (Vec::new(), None)
            }
        };
        let hold = drained.filter(|old| {
            self.generations
                .get(old)
                .is_some_and(|g| !g.stopped_accepting())
        });
        match hold {
            Some(old) if !waiters.is_empty() => {
                let g = self.generations.get_mut(&old).expect("checked above");
                g.answers_when_closed
                    .extend(waiters.into_iter().map(|w| (w, result.clone())));
                self.after(
                    super::ACCEPT_CLOSE_WAIT,
                    Timer::AcceptClosed { generation: old },
                );
            }
            _ => {
                for waiter in waiters {
                    self.emit(Effect::Answer {
                        waiter,
                        outcome: result.clone(),
                    });
                }
            }
        }
        // Generation 1 starting is not an upgrade.
        if result.generation != Some(1) {
            self.count_upgrade(kind);
            self.last_upgrade = Some(result);
        }
        if self.stopping() {
            return;
        }
        let summary = self.summary();
        self.emit(Effect::Systemd(Systemd::Ready(summary)));
        match follow_up {
            Some(waiters) if follow => {
                tracing::info!("running the upgrade requested while the last one was in progress");
                self.prepare(waiters);
            }
            Some(waiters) => {
                let refused = outcome(
                    None,
                    UpgradeResult::Refused,
                    Some("the supervisor is stopping".into()),
                );
                for waiter in waiters {
                    self.emit(Effect::Answer {
                        waiter,
                        outcome: refused.clone(),
                    });
                }
            }
            None => {}
        }
    }

    /// Stops with `result` once every generation is gone (killing them now).
    pub(super) fn exit_when_empty(&mut self, result: Result<(), String>) {
        if !self.stopping() {
            self.mode = Mode::Stopping {
                waiters: Vec::new(),
                exit: None,
                done: false,
            };
            let numbers: Vec<u64> = self.generations.keys().copied().collect();
            for n in numbers {
                self.signal(n, Sig::Kill);
            }
        }
        if let Mode::Stopping { exit, .. } = &mut self.mode {
            *exit = Some(result);
        }
    }

    pub(super) fn on_ready_timeout(&mut self, generation: u64) {
        let Some(g) = self.generations.get(&generation) else {
            return;
        };
        if g.state != GenerationState::Starting {
            return;
        }
        let not_ready = g.workers.iter().filter(|w| !w.ready()).count();
        let timeout = g.limits.ready_timeout;
        self.fail(
            generation,
            format!(
                "{not_ready} worker(s) not READY within ready_timeout ({})",
                humantime::format_duration(timeout)
            ),
        );
    }

    pub(super) fn on_drain_timeout(&mut self, generation: u64) {
        if let Some(g) = self.generations.get(&generation) {
            let _e = g.span.enter();
            tracing::warn!("drain_timeout passed; killing worker(s) {:?}", g.pids());
            self.totals.drains_timed_out += 1;
        }
        self.signal(generation, Sig::Kill);
    }

    /// `max_generations` needs room: close this draining generation now. Its workers
    /// get SIGQUIT (close every connection, exit) and SIGKILL shortly after if a blocking
    /// handler keeps one alive.
    pub(super) fn on_force_close(&mut self, generation: u64) {
        let Some(g) = self.generations.get(&generation) else {
            return;
        };
        if g.state != GenerationState::Draining || !matches!(self.mode, Mode::WaitingForRoom { .. })
        {
            return;
        }
        {
            let _e = g.span.enter();
            tracing::warn!(
                "force-closing draining generation {generation} (pids {:?}, {} connection(s)) to stay within max_generations ({})",
                g.pids(),
                g.connections(),
                self.max_generations
            );
        }
        self.totals.drains_force_closed += 1;
        self.signal(generation, Sig::ForceClose);
        self.after(FORCE_CLOSE_KILL_AFTER, Timer::ForceKill { generation });
    }

    pub(super) fn on_force_kill(&mut self, generation: u64) {
        if let Some(g) = self.generations.get(&generation)
            && !g.pids().is_empty()
        {
            let _e = g.span.enter();
            tracing::warn!(
                "force-closed worker(s) {:?} still running after {:?}: killing them",
                g.pids(),
                FORCE_CLOSE_KILL_AFTER
            );
        }
        self.signal(generation, Sig::Kill);
    }

    /// A restore, after a crash loop: started like an upgrade, from `target`.
    pub(super) fn restore(&mut self, target: Target<A>, restored: Restored) {
        self.upgrade_begins();
        self.start(Start::Restore(target, restored), Vec::new(), None);
    }
}
