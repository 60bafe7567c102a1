//! What the metrics count over the service's whole life, beyond what live workers report:
//! the last report of every worker that has exited (folded in when it exits, so that a
//! counter never goes backwards when a worker is restarted or a generation drains away),
//! and the supervisor's own events (upgrades by outcome and their durations, worker
//! restarts, drains cut short, supervisor self-upgrades). Kept in the core's snapshot, so
//! that a supervisor re-exec goes on counting from where the previous image was.
//!
//! The rules that decide those events live in their own files; they only call the
//! `count_*` methods here.

use super::{Core, Mode, Slot};
use baton_proto::WorkerMetrics;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

/// Upper bounds (seconds) of the upgrade duration histogram's buckets.
pub const UPGRADE_BUCKETS: [f64; 10] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

/// An upgrade's outcome, as the metrics label it (`result`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeKind {
    /// The new generation serves.
    Succeeded,
    /// Nothing was started (invalid config, an artifact that cannot be cached, …).
    Refused,
    /// The new generation failed to start; the old one serves on.
    RolledBack,
    /// A generation crash-looped after promotion and the previous generation's
    /// artifacts serve again.
    CrashLoopRestored,
    /// A canary was judged (or aborted by hand) and drained; the old generation serves on.
    CanaryRolledBack,
}

impl UpgradeKind {
    pub fn label(self) -> &'static str {
        match self {
            UpgradeKind::Succeeded => "succeeded",
            UpgradeKind::Refused => "refused",
            UpgradeKind::RolledBack => "rolled_back",
            UpgradeKind::CrashLoopRestored => "crash_loop_restored",
            UpgradeKind::CanaryRolledBack => "canary_rolled_back",
        }
    }

    /// Every label, so that each series exists (at 0) from the start.
    pub const ALL: [UpgradeKind; 5] = [
        UpgradeKind::Succeeded,
        UpgradeKind::Refused,
        UpgradeKind::RolledBack,
        UpgradeKind::CrashLoopRestored,
        UpgradeKind::CanaryRolledBack,
    ];
}

/// A histogram of durations with [`UPGRADE_BUCKETS`] (not cumulative; the last is +Inf).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Histogram {
    pub buckets: Vec<u64>,
    pub sum_seconds: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        self.buckets.resize(UPGRADE_BUCKETS.len() + 1, 0);
        let i = UPGRADE_BUCKETS.partition_point(|&le| le < seconds);
        self.buckets[i] += 1;
        self.sum_seconds += seconds;
    }
}

/// The service's totals, as the core keeps them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    /// The last reports of every worker that has exited, added up.
    pub exited: WorkerMetrics,
    /// Upgrades by [`UpgradeKind::label`].
    pub upgrades: BTreeMap<String, u64>,
    pub upgrade_seconds: Histogram,
    /// How long the last upgrade took, from the request to the decision.
    pub last_upgrade_seconds: Option<f64>,
    /// Whether the last upgrade succeeded.
    pub last_upgrade_successful: Option<bool>,
    /// When the last upgrade succeeded.
    pub last_success: Option<SystemTime>,
    /// Workers of serving generations that exited and were replaced.
    pub worker_restarts: u64,
    /// Supervisor self-upgrades by result (`succeeded`, `refused`).
    pub supervisor_upgrades: BTreeMap<String, u64>,
    /// Draining generations force-closed to stay within `max_generations`.
    pub drains_force_closed: u64,
    /// Draining generations still alive at `drain_timeout`, whose workers were killed.
    pub drains_timed_out: u64,
}

impl<A: Clone + std::fmt::Debug> Core<A> {
    /// The totals kept over the service's life.
    pub fn totals(&self) -> &Totals {
        &self.totals
    }

    /// What every worker reported, exited ones included: the service's totals now.
    pub fn worker_totals(&self) -> WorkerMetrics {
        let mut all = self.totals.exited.clone();
        for g in self.generations.values() {
            for m in g.workers.iter().filter_map(|w| w.metrics.as_ref()) {
                all.add(m);
            }
        }
        all
    }

    /// A worker is gone: its last report joins the totals.
    pub(super) fn fold_exited(totals: &mut Totals, slot: &mut Slot) {
        if let Some(m) = slot.metrics.take() {
            totals.exited.add(&m);
        }
    }

    /// An upgrade asked for is being prepared: its duration counts from now.
    pub(super) fn upgrade_begins(&mut self) {
        self.upgrade_started = Some(self.now);
    }

    /// An upgrade was decided.
    pub(super) fn count_upgrade(&mut self, kind: UpgradeKind) {
        let t = &mut self.totals;
        *t.upgrades.entry(kind.label().to_owned()).or_default() += 1;
        let took = self
            .upgrade_started
            .take()
            .map(|at| self.now.saturating_duration_since(at))
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        t.upgrade_seconds.observe(took);
        t.last_upgrade_seconds = Some(took);
        let ok = kind == UpgradeKind::Succeeded;
        t.last_upgrade_successful = Some(ok);
        if ok {
            t.last_success = Some(SystemTime::now());
        }
    }

    /// The kind of the upgrade in progress ending with `result`: a crash-loop restore
    /// that now serves is told apart from an upgrade rolled back.
    pub(super) fn kind_of(&self, result: &crate::status::UpgradeOutcome) -> UpgradeKind {
        use crate::status::UpgradeResult;
        match result.result {
            UpgradeResult::Succeeded => UpgradeKind::Succeeded,
            UpgradeResult::Refused => UpgradeKind::Refused,
            UpgradeResult::RolledBack
                if result
                    .canary
                    .as_ref()
                    .is_some_and(|v| v.decision == crate::status::CanaryDecision::RolledBack) =>
            {
                UpgradeKind::CanaryRolledBack
            }
            UpgradeResult::RolledBack => {
                let restored = match &self.mode {
                    Mode::Starting { generation, .. } => {
                        self.generations.get(generation).is_some_and(|g| {
                            g.restored.is_some() && g.state == super::GenerationState::Serving
                        })
                    }
                    _ => false,
                };
                if restored {
                    UpgradeKind::CrashLoopRestored
                } else {
                    UpgradeKind::RolledBack
                }
            }
        }
    }

    pub(super) fn count_supervisor_upgrade(&mut self, succeeded: bool) {
        let label = if succeeded { "succeeded" } else { "refused" };
        *self
            .totals
            .supervisor_upgrades
            .entry(label.to_owned())
            .or_default() += 1;
        // What `systemctl reload` said: a refused supervisor upgrade failed it too.
        self.totals.last_upgrade_successful = Some(succeeded);
    }
}
