//! The supervisor upgrading itself: a request waits until no generation is being
//! prepared, started or waiting for room (requests meanwhile are merged into it), then the
//! shell is asked to `exec` the new binary in this process ([`Effect::ReExec`]). The new
//! image restores this core from the handover and feeds [`Input::SelfUpgraded`]; a
//! refused image ([`Input::SelfUpgradeFailed`]) changes nothing but the last upgrade's
//! outcome. Workers are never touched by the re-exec itself; `then_generation` starts a
//! generation afterwards, as `baton upgrade` always does.

use super::{Core, Effect, Mode, Systemd, WaiterId, outcome};
use crate::status::UpgradeResult;
use serde::{Deserialize, Serialize};

/// A supervisor re-exec: who asked, who waits, and whether a generation follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfUpgrade {
    /// Where the first request came from (a signal, the control socket).
    pub source: String,
    /// Clients waiting for the outcome (answered by whichever image decides it).
    pub waiters: Vec<WaiterId>,
    /// Start a new generation once the new image runs.
    pub then_generation: bool,
}

impl<A: Clone + std::fmt::Debug> Core<A> {
    pub(super) fn on_self_upgrade(
        &mut self,
        source: &'static str,
        waiter: Option<WaiterId>,
        then_generation: bool,
    ) {
        if self.stopping() {
            self.refuse_waiter(waiter, "the supervisor is stopping");
            return;
        }
        match &mut self.self_upgrade {
            Some(pending) => {
                tracing::info!(
                    "supervisor upgrade requested ({source}): merged with the pending one"
                );
                pending.waiters.extend(waiter);
                pending.then_generation |= then_generation;
            }
            None => {
                if !matches!(self.mode, Mode::Idle) {
                    tracing::info!(
                        "supervisor upgrade requested ({source}): it runs when the generation being started is decided"
                    );
                }
                self.self_upgrade = Some(SelfUpgrade {
                    source: source.to_owned(),
                    waiters: waiter.into_iter().collect(),
                    then_generation,
                });
            }
        }
    }

    /// Emits the pending re-exec once nothing is in progress. Called after every input,
    /// so [`Effect::ReExec`] is always the last effect of its batch.
    pub(super) fn re_exec_if_idle(&mut self) {
        if self.stopping()
            && let Some(request) = self.self_upgrade.take()
        {
            let refused = outcome(
                None,
                UpgradeResult::Refused,
                Some("the supervisor is stopping".into()),
            );
            for waiter in request.waiters {
                self.emit(Effect::Answer {
                    waiter,
                    outcome: refused.clone(),
                });
            }
        }
        if !matches!(self.mode, Mode::Idle) {
            return;
        }
        let Some(request) = self.self_upgrade.take() else {
            return;
        };
        tracing::info!("upgrading the supervisor in place ({})", request.source);
        self.emit(Effect::Systemd(Systemd::Reloading(
            "upgrading the supervisor in place".into(),
        )));
        self.emit(Effect::ReExec(request));
    }

    /// The shell's last look before a re-exec: if the core is no longer idle (an event
    /// handled meanwhile started something), `request` waits again (merged with any
    /// newer one) and is emitted once it is idle; otherwise it is handed back to be
    /// carried out now.
    pub fn defer_self_upgrade(&mut self, request: SelfUpgrade) -> Result<(), SelfUpgrade> {
        if matches!(self.mode, Mode::Idle) && self.self_upgrade.is_none() {
            return Err(request);
        }
        match &mut self.self_upgrade {
            Some(pending) => {
                pending.waiters.extend(request.waiters);
                pending.then_generation |= request.then_generation;
            }
            None => self.self_upgrade = Some(request),
        }
        Ok(())
    }

    pub(super) fn on_self_upgrade_failed(&mut self, request: SelfUpgrade, reason: String) {
        let reason = format!("supervisor upgrade: {reason}");
        tracing::error!("{reason}; this supervisor goes on");
        let result = outcome(None, UpgradeResult::Refused, Some(reason));
        self.count_supervisor_upgrade(false);
        for waiter in request.waiters {
            self.emit(Effect::Answer {
                waiter,
                outcome: result.clone(),
            });
        }
        self.last_upgrade = Some(result);
        if !self.stopping() {
            let summary = self.summary();
            self.emit(Effect::Systemd(Systemd::Ready(summary)));
        }
    }

    /// The first input of a new image: go on with what was asked.
    pub(super) fn on_self_upgraded(&mut self, request: SelfUpgrade, change: String) {
        tracing::info!("supervisor upgraded in place: {change}");
        self.count_supervisor_upgrade(true);
        if request.then_generation && !self.stopping() {
            // As an upgrade request: RELOADING=1, a new generation, READY=1 when decided.
            self.prepare(request.waiters);
            return;
        }
        let result = outcome(
            self.serving(),
            UpgradeResult::Succeeded,
            Some(format!("supervisor upgraded in place: {change}")),
        );
        for waiter in request.waiters {
            self.emit(Effect::Answer {
                waiter,
                outcome: result.clone(),
            });
        }
        self.last_upgrade = Some(result);
        let summary = self.summary();
        self.emit(Effect::Systemd(Systemd::Ready(summary)));
    }
}
