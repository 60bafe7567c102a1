//! Stopping: every waiter of an upgrade in progress is refused, every generation drains
//! (or is killed, for a fast stop), systemd's stop timeout is extended while drains run,
//! and once no generation is left the stop waiters are answered and the supervisor exits
//! with the result it was given (an error if generation 1 could not start).

use super::{
    Core, EXTEND_INTERVAL, EXTEND_STEP, Effect, Mode, Sig, Systemd, Timer, WaiterId, outcome,
};
use crate::status::UpgradeResult;

impl<A: Clone + std::fmt::Debug> Core<A> {
    pub(super) fn on_stop(&mut self, fast: bool, source: &'static str, waiter: Option<WaiterId>) {
        let first = !self.stopping();
        if first {
            tracing::info!(
                "stopping ({source}){}",
                if fast {
                    ": killing workers"
                } else {
                    ": draining every generation"
                }
            );
            let (waiters, follow_up) = match std::mem::replace(
                &mut self.mode,
                Mode::Stopping {
                    waiters: Vec::new(),
                    exit: None,
                    done: false,
                },
            ) {
                Mode::Preparing { waiters, follow_up }
                | Mode::Starting {
                    waiters, follow_up, ..
                }
                | Mode::Canary {
                    waiters, follow_up, ..
                }
                | Mode::WaitingForRoom {
                    waiters, follow_up, ..
                } => (waiters, follow_up.unwrap_or_default()),
                Mode::Idle | Mode::Stopping { .. } => (Vec::new(), Vec::new()),
            };
            let refused = outcome(
                None,
                UpgradeResult::Refused,
                Some("the supervisor is stopping".into()),
            );
            for waiter in waiters.into_iter().chain(follow_up) {
                self.emit(Effect::Answer {
                    waiter,
                    outcome: refused.clone(),
                });
            }
            // systemd's stop timeout may be shorter than a drain: while generations are
            // left, keep extending it a step at a time (the drain itself is bounded by
            // drain_timeout, after which workers are killed and the supervisor exits).
            let status = format!(
                "stopping: draining {} generation(s)",
                self.generations.len()
            );
            self.emit(Effect::Systemd(Systemd::Stopping(status, EXTEND_STEP)));
            self.after(EXTEND_INTERVAL, Timer::StopTick);
        }
        if let Mode::Stopping { waiters, .. } = &mut self.mode {
            waiters.extend(waiter);
        }
        let numbers: Vec<u64> = self.generations.keys().copied().collect();
        for number in numbers {
            if fast {
                self.signal(number, Sig::Kill);
                if let Some(g) = self.generations.get_mut(&number) {
                    // Slots waiting out a back-off have nothing to kill.
                    for w in &mut g.workers {
                        if !matches!(w.state, super::SlotState::Running { .. }) {
                            w.state = super::SlotState::Exited;
                        }
                    }
                }
                self.reap_if_empty(number);
            } else if first {
                self.drain(number);
            }
        }
    }

    pub(super) fn on_stop_tick(&mut self) {
        if self.stopping() && !self.generations.is_empty() {
            let summary = self.summary();
            self.emit(Effect::Systemd(Systemd::ExtendTimeout(
                format!("stopping: {summary}"),
                EXTEND_STEP,
            )));
            self.after(EXTEND_INTERVAL, Timer::StopTick);
        }
    }

    /// Stopping and nothing left: answer the stop waiters and exit, once.
    pub(super) fn exit_if_stopped(&mut self) {
        if !self.generations.is_empty() {
            return;
        }
        if let Mode::Stopping {
            waiters,
            exit,
            done: done @ false,
        } = &mut self.mode
        {
            *done = true;
            let waiters = std::mem::take(waiters);
            let result = exit.take().unwrap_or(Ok(()));
            self.timers.clear();
            self.emit(Effect::Exit { waiters, result });
        }
    }
}
