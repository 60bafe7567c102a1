//! Crash loops after promotion: when the workers of a newly promoted generation exit
//! `crash_loop_exits` times within `crash_loop_window` of its promotion, the generation it
//! replaced is started again from exactly the artifacts it ran (its rollback target),
//! unless the supervisor is stopping, an operator's upgrade is in progress (presumably the
//! fix), or the crashing generation is itself a restore (no ping-pong).

use super::{Core, Mode, Restored, outcome};
use crate::status::UpgradeResult;

impl<A: Clone + std::fmt::Debug> Core<A> {
    pub(super) fn on_crash_loop(&mut self, number: u64) {
        let g = &self.generations[&number];
        let _e = g.span.enter();
        let Some(previous) = g.previous.clone() else {
            if g.crashes_after_promotion == g.limits.crash_loop_exits {
                tracing::error!(
                    "crash loop: {} worker exit(s) within {} of promotion, but there is no previous generation to roll back to{}",
                    g.crashes_after_promotion,
                    humantime::format_duration(g.limits.crash_loop_window),
                    if g.restored.is_some() {
                        " (this generation is already a rollback)"
                    } else {
                        ""
                    }
                );
            }
            return;
        };
        match self.mode {
            Mode::Stopping { .. } => return,
            Mode::Preparing { .. }
            | Mode::Starting { .. }
            | Mode::Canary { .. }
            | Mode::WaitingForRoom { .. } => {
                tracing::error!(
                    "crash loop after promotion, but an upgrade is starting; no rollback unless it fails and the crashes go on"
                );
                return;
            }
            Mode::Idle => {}
        }
        let reason = format!(
            "generation {number} crash-looped: {} worker exit(s) within {} of promotion",
            g.crashes_after_promotion,
            humantime::format_duration(g.limits.crash_loop_window)
        );
        tracing::error!(
            "{reason}; rolling back to generation {}'s exact artifacts",
            previous.number,
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
        self.restore(previous, restored);
    }
}
