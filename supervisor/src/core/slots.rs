//! Worker slots: what a started, READY, reporting or exiting worker changes. A worker that
//! exits before READY fails its starting generation; one that exits while its generation
//! serves (or is the canary) is replaced in its slot after a back-off that doubles per
//! crash in a row (and may be a crash loop, see `crash_loop.rs`, or roll the canary back,
//! see `canary.rs`); one of a draining or failed generation is just gone, and the
//! generation with it once it was the last.

use super::GenerationState;
use super::{Core, Effect, Exit, STABLE_RUN, Sig, SlotState, Systemd, Timer, backoff};
use baton_proto::NotifyMessage;

impl<A: Clone + std::fmt::Debug> Core<A> {
    pub(super) fn on_spawned(&mut self, generation: u64, slot: usize, result: Result<u32, String>) {
        let now = self.now;
        let stopping = self.stopping();
        let Some(g) = self.generations.get_mut(&generation) else {
            return;
        };
        let Some(w) = g.workers.get_mut(slot) else {
            return;
        };
        if w.state != SlotState::Spawning {
            // Not wanted any more (the shell asks first, so only a test sends this).
            if let Ok(pid) = result {
                self.emit(Effect::Signal {
                    generation,
                    pid,
                    signal: Sig::Kill,
                });
            }
            return;
        }
        match result {
            Ok(pid) => {
                w.state = SlotState::Running {
                    pid,
                    spawned: now,
                    ready: false,
                };
                w.stats = Default::default();
                w.stats_at = None;
                w.metrics = None;
                w.stopped_accepting = false;
                let _e = g.span.enter();
                tracing::info!("worker {pid} started in slot {slot}");
                drop(_e);
                if matches!(g.state, GenerationState::Serving | GenerationState::Canary) {
                    let timeout = g.limits.ready_timeout;
                    self.after(timeout, Timer::ReplacementReady { generation, pid });
                }
            }
            Err(reason) => match g.state {
                GenerationState::Starting => {
                    w.state = SlotState::Exited;
                    self.fail(generation, reason);
                }
                GenerationState::Serving | GenerationState::Canary if !stopping => {
                    self.retry_restart(generation, slot, reason);
                }
                _ => {
                    w.state = SlotState::Exited;
                    self.reap_if_empty(generation);
                }
            },
        }
    }

    pub(super) fn on_notify(&mut self, pid: u32, mut message: NotifyMessage) {
        let Some((number, slot)) = self.find_worker(pid) else {
            tracing::debug!("notify from pid {pid}, which is not a worker, ignored");
            return;
        };
        let now = self.now;
        let g = self.generations.get_mut(&number).expect("found above");
        let w = &mut g.workers[slot];
        if let Some(stats) = message.stats {
            w.stats = stats;
            w.stats_at = Some(now);
        }
        if let Some(metrics) = message.metrics.take() {
            w.metrics = Some(metrics);
        }
        if let Some(status) = &message.status {
            w.status = Some(status.clone());
        }
        if message.stopping {
            w.stopped_accepting = true;
        }
        if let Some(build) = &message.worker {
            w.build = Some(build.clone());
            if let Err(mismatch) = baton_proto::check_worker_protocol(build.protocol, "worker") {
                if g.state == GenerationState::Starting {
                    return self.fail(number, format!("worker {pid}: {mismatch}"));
                }
                let _e = g.span.enter();
                tracing::error!("worker {pid}: {mismatch}");
            }
        }
        if let Some(failure) = message.failure() {
            if g.state == GenerationState::Starting {
                return self.fail(number, format!("worker {pid} reported: {failure}"));
            }
            let _e = g.span.enter();
            tracing::warn!("worker {pid} reported: {failure}");
        }
        if message.ready
            && let SlotState::Running { ready, .. } = &mut w.state
            && !*ready
        {
            *ready = true;
            let _e = g.span.enter();
            tracing::info!("worker {pid} is ready");
            drop(_e);
            if g.state == GenerationState::Starting && g.all_ready() {
                self.on_all_ready(number);
            }
        }
    }

    pub(super) fn on_exit(&mut self, number: u64, exit: Exit) {
        let now = self.now;
        let stopping = self.stopping();
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        let Some(slot) = g.slot_of(exit.pid) else {
            return;
        };
        let w = &mut g.workers[slot];
        let SlotState::Running { spawned, .. } = w.state else {
            return;
        };
        let lived = now.saturating_duration_since(spawned);
        let last_status = w.status.take();
        g.requests_of_exited += w.stats.requests;
        g.errors_of_exited += w.stats.errors;
        Self::fold_exited(&mut self.totals, w);
        w.stats = Default::default();
        w.stats_at = None;
        w.state = SlotState::Exited;
        match g.state {
            GenerationState::Starting if !stopping => {
                let when = match last_status {
                    Some(status) => format!("before READY, while {status}"),
                    None => "before READY".to_owned(),
                };
                self.fail(number, exit.describe(&when));
            }
            state @ (GenerationState::Serving | GenerationState::Canary) if !stopping => {
                w.crash_streak = if lived >= STABLE_RUN {
                    1
                } else {
                    w.crash_streak + 1
                };
                w.restarts += 1;
                g.restarts += 1;
                self.totals.worker_restarts += 1;
                let delay = backoff(w.crash_streak);
                w.state = SlotState::Backoff { until: now + delay };
                {
                    let _e = g.span.enter();
                    tracing::warn!(
                        "{}; replacing it in {delay:?} (restart {} of slot {slot})",
                        exit.describe(if state == GenerationState::Canary {
                            "while serving as the canary"
                        } else {
                            "while serving"
                        }),
                        w.restarts
                    );
                }
                let window = g.limits.crash_loop_window;
                if g.promoted
                    .is_some_and(|at| now.saturating_duration_since(at) <= window)
                {
                    g.crashes_after_promotion += 1;
                }
                let limit = g.limits.crash_loop_exits;
                let crash_loop = limit > 0 && g.crashes_after_promotion >= limit;
                self.after(
                    delay,
                    Timer::Restart {
                        generation: number,
                        slot,
                    },
                );
                if crash_loop {
                    self.on_crash_loop(number);
                }
                if state == GenerationState::Canary {
                    self.on_canary_exit(number);
                }
                let summary = self.summary();
                self.emit(Effect::Systemd(Systemd::Status(summary)));
            }
            _ => {
                let _e = g.span.enter();
                tracing::info!("worker {} exited ({})", exit.pid, exit.status);
                drop(_e);
                self.reap_if_empty(number);
            }
        }
    }

    /// The back-off of `slot` is over: start its replacement.
    pub(super) fn on_restart(&mut self, number: u64, slot: usize) {
        let stopping = self.stopping();
        let Some(g) = self.generations.get_mut(&number) else {
            return;
        };
        let Some(w) = g.workers.get_mut(slot) else {
            return;
        };
        if !matches!(g.state, GenerationState::Serving | GenerationState::Canary)
            || !matches!(w.state, SlotState::Backoff { .. })
            || stopping
        {
            return;
        }
        w.state = SlotState::Spawning;
        self.emit(Effect::Spawn {
            generation: number,
            slot,
        });
    }

    /// A replacement could not be started: try again after a longer back-off.
    fn retry_restart(&mut self, number: u64, slot: usize, reason: String) {
        let now = self.now;
        let g = self
            .generations
            .get_mut(&number)
            .expect("checked by caller");
        let w = &mut g.workers[slot];
        w.crash_streak += 1;
        let delay = backoff(w.crash_streak);
        w.state = SlotState::Backoff { until: now + delay };
        {
            let _e = g.span.enter();
            tracing::error!("{reason}; retrying in {delay:?}");
        }
        self.after(
            delay,
            Timer::Restart {
                generation: number,
                slot,
            },
        );
    }

    /// A replacement worker of a serving generation had `ready_timeout` to say READY.
    pub(super) fn on_replacement_timeout(&mut self, generation: u64, pid: u32) {
        let Some(g) = self.generations.get(&generation) else {
            return;
        };
        let Some(slot) = g.slot_of(pid) else {
            return;
        };
        if g.workers[slot].ready() {
            return;
        }
        {
            let _e = g.span.enter();
            tracing::error!(
                "replacement worker {pid} not READY within ready_timeout; killing it (it will be replaced again)"
            );
        }
        self.emit(Effect::Signal {
            generation,
            pid,
            signal: Sig::Kill,
        });
    }
}
