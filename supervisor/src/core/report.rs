//! What the core says about itself: the one-line summary for systemd's `STATUS=` and the
//! log. (The status document is built by the shell from the core's read-only views.)

use super::Core;
use crate::status::{UpgradeOutcome, UpgradeResult};

impl<A: Clone + std::fmt::Debug> Core<A> {
    /// One line for systemd's `STATUS=` and the log.
    pub fn summary(&self) -> String {
        summary_line(
            self.generations
                .values()
                .map(|g| (g.number, g.state.name(), g.pids().len())),
            self.last_upgrade.as_ref(),
        )
    }
}

/// "generation 2 serving (2 worker(s)); …", and why the last upgrade failed until the
/// next one succeeds.
fn summary_line(
    generations: impl Iterator<Item = (u64, &'static str, usize)>,
    last_upgrade: Option<&UpgradeOutcome>,
) -> String {
    let mut parts: Vec<String> = generations
        .map(|(n, state, workers)| format!("generation {n} {state} ({workers} worker(s))"))
        .collect();
    if parts.is_empty() {
        parts.push("no generation running".into());
    }
    if let Some(last) = last_upgrade
        && last.result != UpgradeResult::Succeeded
    {
        parts.push(format!("last upgrade {}", last.describe()));
    }
    parts.join("; ")
}
