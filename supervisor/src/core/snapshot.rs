//! The core's state as data, for the supervisor's re-exec: [`Core::snapshot`] writes
//! what the core knows (generations, slots, timers as deadlines, counters, the last
//! upgrade) with each artifact set replaced by an index the shell chooses, and
//! [`Core::from_snapshot`] builds the core again in the new image.
//!
//! Instants are written as `CLOCK_MONOTONIC` nanoseconds ([`mono`]): the clock of
//! [`Instant`] on Linux, which an `exec` does not reset, so a deadline written by one
//! image is the same deadline in the next.

use super::{Core, Generation, Mode, Target, Timer, Totals};
use crate::status::UpgradeOutcome;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Instant;

/// The core of an idle supervisor, with artifact sets as indices.
#[derive(Debug, Serialize, Deserialize)]
pub struct CoreSnapshot {
    generations: Vec<Generation<u32>>,
    last_number: u64,
    max_generations: usize,
    last_upgrade: Option<UpgradeOutcome>,
    timers: Vec<TimerEntry>,
    timer_seq: u64,
    /// The metrics' totals (since the metrics; an older image has none to hand over).
    #[serde(default)]
    totals: Totals,
}

#[derive(Debug, Serialize, Deserialize)]
struct TimerEntry {
    #[serde(with = "mono")]
    at: Instant,
    seq: u64,
    timer: Timer,
}

/// Why the core cannot be written now.
#[derive(Debug, thiserror::Error)]
#[error("the supervisor is busy ({0}); try again when it is done")]
pub struct Busy(&'static str);

impl<A: Clone + std::fmt::Debug> Core<A> {
    /// The state to hand over, naming each artifact set by `index(set)`. Only an idle
    /// core is written: nothing is being prepared, started or judged as a canary, and no
    /// one waits for room.
    pub fn snapshot(&self, mut index: impl FnMut(&A) -> u32) -> Result<CoreSnapshot, Busy> {
        match self.mode {
            Mode::Idle => {}
            Mode::Preparing { .. } => return Err(Busy("an upgrade is being prepared")),
            Mode::Starting { .. } => return Err(Busy("a generation is starting")),
            Mode::Canary { .. } => return Err(Busy("a canary is being judged")),
            Mode::WaitingForRoom { .. } => return Err(Busy("a start waits for room")),
            Mode::Stopping { .. } => return Err(Busy("stopping")),
        }
        Ok(CoreSnapshot {
            generations: self
                .generations
                .values()
                .map(|g| g.map(|a| index(a)))
                .collect(),
            last_number: self.last_number,
            max_generations: self.max_generations,
            last_upgrade: self.last_upgrade.clone(),
            timers: self
                .timers
                .iter()
                .map(|(&(at, seq), &timer)| TimerEntry { at, seq, timer })
                .collect(),
            timer_seq: self.timer_seq,
            totals: self.totals.clone(),
        })
    }

    /// The core a snapshot describes, each set index turned back into a set by `set`.
    pub fn from_snapshot(
        snapshot: CoreSnapshot,
        now: Instant,
        mut set: impl FnMut(u32) -> A,
    ) -> Self {
        let mut core = Core::new(snapshot.max_generations, now);
        for g in snapshot.generations {
            let number = g.number;
            let mut g = g.map(|&i| set(i));
            g.span = tracing::info_span!("generation", n = number);
            core.generations.insert(number, g);
        }
        core.last_number = snapshot.last_number;
        core.last_upgrade = snapshot.last_upgrade;
        core.timers = snapshot
            .timers
            .into_iter()
            .map(|t| ((t.at, t.seq), t.timer))
            .collect::<BTreeMap<_, _>>();
        core.timer_seq = snapshot.timer_seq;
        core.totals = snapshot.totals;
        core
    }
}

impl<A> Generation<A> {
    /// The same generation with its artifact sets mapped by `f`.
    fn map<B>(&self, mut f: impl FnMut(&A) -> B) -> Generation<B> {
        Generation {
            number: self.number,
            state: self.state,
            artifacts: f(&self.artifacts),
            limits: self.limits.clone(),
            workers: self.workers.clone(),
            restarts: self.restarts,
            requests_of_exited: self.requests_of_exited,
            errors_of_exited: self.errors_of_exited,
            failure: self.failure.clone(),
            started: self.started,
            started_at: self.started_at,
            promoted: self.promoted,
            draining_since: self.draining_since,
            crashes_after_promotion: self.crashes_after_promotion,
            previous: self.previous.as_ref().map(|p| Target {
                number: p.number,
                artifacts: f(&p.artifacts),
                limits: p.limits.clone(),
            }),
            restored: self.restored.clone(),
            answers_when_closed: self.answers_when_closed.clone(),
            span: self.span.clone(),
        }
    }
}

/// `Instant` as `CLOCK_MONOTONIC` nanoseconds.
pub mod mono {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::{Duration, Instant};

    /// Now, as an `Instant` and as monotonic nanoseconds, read together.
    fn now() -> (Instant, i128) {
        let instant = Instant::now();
        let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .expect("CLOCK_MONOTONIC is always readable");
        (
            instant,
            ts.tv_sec() as i128 * 1_000_000_000 + ts.tv_nsec() as i128,
        )
    }

    pub fn to_nanos(at: Instant) -> i64 {
        let (now, nanos) = now();
        let offset = if at >= now {
            (at - now).as_nanos() as i128
        } else {
            -((now - at).as_nanos() as i128)
        };
        (nanos + offset) as i64
    }

    pub fn from_nanos(at: i64) -> Instant {
        let (now, nanos) = now();
        let offset = at as i128 - nanos;
        if offset >= 0 {
            now + Duration::from_nanos(offset as u64)
        } else {
            now.checked_sub(Duration::from_nanos((-offset) as u64))
                .unwrap_or(now)
        }
    }

    pub fn serialize<S: Serializer>(at: &Instant, s: S) -> Result<S::Ok, S::Error> {
        to_nanos(*at).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Instant, D::Error> {
        i64::deserialize(d).map(from_nanos)
    }
}

/// `Option<Instant>` as `CLOCK_MONOTONIC` nanoseconds.
pub mod mono_opt {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::time::Instant;

    pub fn serialize<S: Serializer>(at: &Option<Instant>, s: S) -> Result<S::Ok, S::Error> {
        at.map(super::mono::to_nanos).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Instant>, D::Error> {
        Option::<i64>::deserialize(d).map(|n| n.map(super::mono::from_nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::mono;
    use std::time::{Duration, Instant};

    #[test]
    fn an_instant_survives_the_round_trip_to_monotonic_nanoseconds() {
        let now = Instant::now();
        for at in [
            now,
            now + Duration::from_secs(30),
            now - Duration::from_millis(1500),
        ] {
            let back = mono::from_nanos(mono::to_nanos(at));
            let error = if back > at { back - at } else { at - back };
            assert!(error < Duration::from_millis(5), "{error:?}");
        }
    }
}
