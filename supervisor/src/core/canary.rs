//! Canary upgrades (`[upgrade] canary`): a starting generation whose workers are all READY
//! is not promoted at once when its config asks for a canary and another generation
//! serves. It becomes the `Canary`: it accepts on the shared listeners beside the serving
//! generation, which is not told to drain, for the window; the supervisor is in
//! `Mode::Canary` meanwhile (upgrade requests join the follow-up, a supervisor re-exec
//! waits, a stop drains both). At the window's end both generations' figures over the
//! window are compared ([`judge`]): the canary is promoted (the serving generation drains,
//! as after any upgrade) or rolled back (it drains; the serving generation goes on). Too
//! few requests to judge extends the window once. A canary worker that exits counts as an
//! error and is replaced as a serving one is; `crash_loop_exits` exits in the window, or no
//! worker left running, roll it back at once. `baton upgrade --promote` / `--abort` decide
//! by hand.

use super::{
    CanaryCall, CanaryPolicy, Core, Effect, GenerationState, Mode, Systemd, Timer, WaiterId,
    canary_outcome,
};
use crate::status::{
    CanaryDecidedBy, CanaryDecision, CanaryInfo, CanaryVerdict, WindowCounts, timestamp,
};
use std::time::{Instant, SystemTime};

/// A generation's counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub requests: u64,
    pub errors: u64,
    pub exits: u64,
}

/// A canary being judged: what it is compared with, by which policy, until when.
#[derive(Debug, Clone)]
pub struct Canary {
    /// The serving generation it is compared with.
    pub baseline: u64,
    pub policy: CanaryPolicy,
    pub since: Instant,
    pub since_at: SystemTime,
    /// When it is judged.
    pub ends: Instant,
    pub ends_at: SystemTime,
    /// The window was extended once (too few requests).
    pub extended: bool,
    start_canary: Tally,
    start_baseline: Tally,
}

/// What [`judge`] concludes at the window's end.
#[derive(Debug, Clone, PartialEq)]
pub enum Judgement {
    Promote(String),
    /// Too few requests: run the window once more.
    Extend(String),
    RollBack(CanaryDecidedBy, String),
}

/// The rule, at the end of a window: with fewer than `min_requests` answered by the canary
/// the window is extended once, and after that the canary is rolled back (it could not be
/// judged, so it is not promoted unseen; `baton upgrade --promote` is there for a quiet
/// service). Otherwise it is promoted when its error ratio exceeds the baseline's by at
/// most `max_error_ratio_increase` (absolute: 0.01 lets 0.5% become 1.5%, never 5%), and
/// rolled back when it exceeds it by more.
pub fn judge(
    policy: &CanaryPolicy,
    canary: &WindowCounts,
    baseline: &WindowCounts,
    extended: bool,
) -> Judgement {
    let rates = rates(canary, baseline);
    if canary.requests < policy.min_requests {
        let why = format!(
            "generation {} answered {} request(s), fewer than canary_min_requests ({})",
            canary.generation, canary.requests, policy.min_requests
        );
        return if extended {
            Judgement::RollBack(
                CanaryDecidedBy::TooFewRequests,
                format!("{why} in two windows: too few to judge; {rates}"),
            )
        } else {
            Judgement::Extend(why)
        };
    }
    let limit = policy.max_error_ratio_increase;
    if canary.error_ratio > baseline.error_ratio + limit {
        Judgement::RollBack(
            CanaryDecidedBy::ErrorRatio,
            format!("{rates}: more than canary_max_error_ratio_increase ({limit}) above"),
        )
    } else {
        Judgement::Promote(format!(
            "{rates}: within canary_max_error_ratio_increase ({limit})"
        ))
    }
}

/// "error ratio 30.00% (…) for generation 3 against 0.00% (…) for generation 2".
fn rates(canary: &WindowCounts, baseline: &WindowCounts) -> String {
    format!(
        "error ratio {} for generation {} against {} for generation {}",
        canary.describe(),
        canary.generation,
        baseline.describe(),
        baseline.generation
    )
}

/// What a generation did between `start` and `now`.
fn window(generation: u64, start: Tally, now: Tally) -> WindowCounts {
    let requests = now.requests.saturating_sub(start.requests);
    let errors = now.errors.saturating_sub(start.errors);
    let exits = now.exits.saturating_sub(start.exits);
    let bad = errors + exits;
    let error_ratio = match (requests, bad) {
        (0, 0) => 0.0,
        (0, _) => 1.0,
        (r, b) => b as f64 / r as f64,
    };
    WindowCounts {
        generation,
        requests,
        errors,
        exits,
        error_ratio,
    }
}

/// A window of `requests`, `errors` and `exits` for generation `generation`.
#[cfg(test)]
pub(super) fn window_for_test(
    generation: u64,
    requests: u64,
    errors: u64,
    exits: u64,
) -> WindowCounts {
    let now = Tally {
        requests,
        errors,
        exits,
    };
    window(generation, Tally::default(), now)
}

impl<A: Clone + std::fmt::Debug> Core<A> {
    /// Every worker of the starting generation `number` is READY: it is promoted, or,
    /// when its config asks for a canary and another generation serves, it begins its
    /// canary. A restore (after a crash loop) is never a canary: the generation it
    /// replaces is the one crashing.
    pub(super) fn on_all_ready(&mut self, number: u64) {
        let g = &self.generations[&number];
        let policy = g.limits.canary.clone().filter(|_| g.restored.is_none());
        let starting =
            matches!(self.mode, Mode::Starting { generation, .. } if generation == number);
        match (policy, self.serving()) {
            (Some(policy), Some(baseline)) if starting => {
                self.begin_canary(number, baseline, policy)
            }
            _ => self.promote(number, None),
        }
    }

    fn begin_canary(&mut self, number: u64, baseline: u64, policy: CanaryPolicy) {
        let Mode::Starting {
            waiters, follow_up, ..
        } = std::mem::replace(&mut self.mode, Mode::Idle)
        else {
            unreachable!("checked by on_all_ready")
        };
        let now = self.now;
        let start_baseline = self.generations[&baseline].tally();
        let g = self
            .generations
            .get_mut(&number)
            .expect("a live generation");
        g.state = GenerationState::Canary;
        let start_canary = g.tally();
        let since_at = SystemTime::now();
        let canary = Canary {
            baseline,
            since: now,
            since_at,
            ends: now + policy.window,
            ends_at: since_at + policy.window,
            extended: false,
            start_canary,
            start_baseline,
            policy,
        };
        {
            let _e = g.span.enter();
            tracing::info!(
                "canary: ready in {:?}, pids {:?}; serving beside generation {baseline} for {} before it is judged",
                now.saturating_duration_since(g.started),
                g.pids(),
                humantime::format_duration(canary.policy.window)
            );
        }
        let window = canary.policy.window;
        let ends_at = timestamp(canary.ends_at);
        self.mode = Mode::Canary {
            generation: number,
            waiters,
            follow_up,
            canary,
        };
        self.after(window, Timer::CanaryEnd { generation: number });
        let summary = self.summary();
        self.emit(Effect::Systemd(Systemd::Status(format!(
            "canary: generation {number} serves beside generation {baseline} until {ends_at}; {summary}"
        ))));
    }

    /// The running canary, if `number` is it.
    fn canary_of(&self, number: u64) -> Option<&Canary> {
        match &self.mode {
            Mode::Canary {
                generation, canary, ..
            } if *generation == number => Some(canary),
            _ => None,
        }
    }

    /// The canary's and the baseline's figures since the window began.
    fn windows(&self, number: u64, canary: &Canary) -> (WindowCounts, WindowCounts) {
        let now_of = |n: u64| self.generations.get(&n).map(|g| g.tally());
        let c = window(
            number,
            canary.start_canary,
            now_of(number).unwrap_or(canary.start_canary),
        );
        let b = window(
            canary.baseline,
            canary.start_baseline,
            now_of(canary.baseline).unwrap_or(canary.start_baseline),
        );
        (c, b)
    }

    /// The canary in progress as `baton status` shows it at `now`: its generation and
    /// window.
    pub fn canary_info(&self, now: Instant) -> Option<(u64, CanaryInfo)> {
        let Mode::Canary {
            generation, canary, ..
        } = &self.mode
        else {
            return None;
        };
        let (c, b) = self.windows(*generation, canary);
        Some((
            *generation,
            CanaryInfo {
                since: timestamp(canary.since_at),
                ends_at: timestamp(canary.ends_at),
                ends_in_ms: canary.ends.saturating_duration_since(now).as_millis() as u64,
                extended: canary.extended,
                canary: c,
                baseline: b,
                min_requests: canary.policy.min_requests,
                max_error_ratio_increase: canary.policy.max_error_ratio_increase,
            },
        ))
    }

    /// The window of `number` is over: judge it (or extend it once).
    pub(super) fn on_canary_end(&mut self, number: u64) {
        let Some(canary) = self.canary_of(number) else {
            return;
        };
        if canary.ends > self.now {
            return;
        }
        let (c, b) = self.windows(number, canary);
        match judge(&canary.policy, &c, &b, canary.extended) {
            Judgement::Promote(reason) => {
                self.promote_canary(CanaryDecidedBy::ErrorRatio, format!("canary: {reason}"))
            }
            Judgement::RollBack(by, reason) => {
                self.roll_back_canary(by, format!("canary: {reason}"))
            }
            Judgement::Extend(why) => {
                let now = self.now;
                let Mode::Canary { canary, .. } = &mut self.mode else {
                    unreachable!("checked by canary_of")
                };
                let window = canary.policy.window;
                canary.extended = true;
                canary.ends = now + window;
                canary.ends_at = SystemTime::now() + window;
                if let Some(g) = self.generations.get(&number) {
                    let _e = g.span.enter();
                    tracing::warn!(
                        "canary: {why}; the window runs once more ({})",
                        humantime::format_duration(window)
                    );
                }
                self.after(window, Timer::CanaryEnd { generation: number });
            }
        }
    }

    /// A worker of canary `number` exited (its slot is already in back-off): with
    /// `crash_loop_exits` exits in the window, or no worker left running, it is rolled
    /// back now.
    pub(super) fn on_canary_exit(&mut self, number: u64) {
        let Some(canary) = self.canary_of(number) else {
            return;
        };
        let (c, b) = self.windows(number, canary);
        let g = &self.generations[&number];
        let limit = g.limits.crash_loop_exits as u64;
        let why = if limit > 0 && c.exits >= limit {
            format!(
                "{} worker exit(s) within the window (crash_loop_exits {limit})",
                c.exits
            )
        } else if g.is_empty() {
            format!("every worker of generation {number} exited")
        } else {
            return;
        };
        self.roll_back_canary(
            CanaryDecidedBy::Crashed,
            format!("canary: {why}; {}", rates(&c, &b)),
        );
    }

    /// `baton upgrade --promote` / `--abort`.
    pub(super) fn on_decide_canary(
        &mut self,
        decision: CanaryCall,
        source: &'static str,
        waiter: Option<WaiterId>,
    ) {
        let Mode::Canary {
            generation,
            waiters,
            canary,
            ..
        } = &mut self.mode
        else {
            self.refuse_waiter(waiter, "no canary is running");
            return;
        };
        waiters.extend(waiter);
        let number = *generation;
        let canary = canary.clone();
        let (c, b) = self.windows(number, &canary);
        let rates = rates(&c, &b);
        match decision {
            CanaryCall::Promote => self.promote_canary(
                CanaryDecidedBy::Operator,
                format!("canary promoted by hand ({source}); {rates}"),
            ),
            CanaryCall::Abort => self.roll_back_canary(
                CanaryDecidedBy::Operator,
                format!("canary aborted by hand ({source}); {rates}"),
            ),
        }
    }

    /// The verdict on the running canary, and its generation.
    fn verdict(
        &self,
        decision: CanaryDecision,
        by: CanaryDecidedBy,
    ) -> Option<(u64, CanaryVerdict)> {
        let Mode::Canary {
            generation, canary, ..
        } = &self.mode
        else {
            return None;
        };
        let (c, b) = self.windows(*generation, canary);
        Some((
            *generation,
            CanaryVerdict {
                decision,
                decided_by: by,
                window_ms: self.now.saturating_duration_since(canary.since).as_millis() as u64,
                canary: c,
                baseline: b,
            },
        ))
    }

    /// The canary serves; the generation it was compared with drains.
    fn promote_canary(&mut self, by: CanaryDecidedBy, reason: String) {
        let Some((number, verdict)) = self.verdict(CanaryDecision::Promoted, by) else {
            return;
        };
        if let Some(g) = self.generations.get(&number) {
            let _e = g.span.enter();
            tracing::info!("{reason}: promoted");
        }
        self.promote(number, Some(canary_outcome(number, reason, verdict)));
    }

    /// The canary drains (gracefully: what it has in flight finishes); the serving
    /// generation goes on, and takes every new connection again.
    fn roll_back_canary(&mut self, by: CanaryDecidedBy, reason: String) {
        let Some((number, verdict)) = self.verdict(CanaryDecision::RolledBack, by) else {
            return;
        };
        if let Some(g) = self.generations.get_mut(&number) {
            g.failure = Some(reason.clone());
            let _e = g.span.enter();
            tracing::error!("{reason}: rolled back");
        }
        let result = canary_outcome(number, reason, verdict);
        self.drain(number);
        self.finish(result);
    }
}
