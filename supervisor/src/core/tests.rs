//! The core driven by input sequences, with a recording fake of the shell: every rule, the
//! interleavings the end-to-end suites cannot reach, and property tests of the invariants.

use super::*;
use baton_proto::NotifyMessage;
use std::collections::{BTreeMap, BTreeSet, VecDeque};

/// The artifact set a test generation runs: a label (generation 1's set is "a1", …).
type Set = &'static str;

fn limits(processes: usize, max_generations: usize) -> Limits {
    Limits {
        processes,
        ready_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(30),
        drain_idle_grace: Duration::from_secs(1),
        crash_loop_window: Duration::from_secs(60),
        crash_loop_exits: 3,
        max_generations,
        canary: None,
    }
}

/// `[upgrade] canary = "30s"`, at least 100 requests, at most 0.01 more errors.
fn canary_policy() -> CanaryPolicy {
    CanaryPolicy {
        window: Duration::from_secs(30),
        min_requests: 100,
        max_error_ratio_increase: 0.01,
    }
}

/// The shell, faked: it answers Prepare, Launch and Spawn at once (or as scripted), keeps
/// the processes it started, and records everything else.
struct Sim {
    core: Core<Set>,
    now: Instant,
    limits: Limits,
    /// What the next Prepare answers (default: a fresh set).
    prepare: VecDeque<Result<Set, String>>,
    launch_fails: bool,
    spawn_fails: bool,
    next_pid: u32,
    /// Live worker processes: pid → generation.
    alive: BTreeMap<u32, u64>,
    /// Every signal sent: (pid, signal).
    signals: Vec<(u32, Sig)>,
    /// Answers per upgrade waiter.
    answers: BTreeMap<WaiterId, Vec<UpgradeOutcome>>,
    exits: Vec<(Vec<WaiterId>, Result<(), String>)>,
    launched: Vec<(u64, Set)>,
    systemd: Vec<Systemd>,
    next_waiter: WaiterId,
    sets: u32,
    /// A re-exec the core asked for, carried out once the input is done (as the shell).
    pending_reexec: Option<SelfUpgrade>,
    /// Make the next re-execs fail (the new binary refused).
    reexec_fails: bool,
    /// Re-execs carried out.
    reexecs: usize,
    /// Inputs queued when the next re-exec is about to happen.
    before_reexec: Vec<Input<Set>>,
    /// Workers told to drain say `STOPPING=1` at once (as real ones do once their
    /// accept loops ended); off: they say nothing (an older worker, a stuck one).
    drain_says_stopping: bool,
}

impl Sim {
    fn new(processes: usize, max_generations: usize) -> Sim {
        Sim::build(processes, max_generations, None)
    }

    /// Generation 1 starting, every generation's config asking for `canary`.
    fn build(processes: usize, max_generations: usize, canary: Option<CanaryPolicy>) -> Sim {
        let now = Instant::now();
        let mut sim = Sim {
            core: Core::new(max_generations, now),
            now,
            limits: Limits {
                canary,
                ..limits(processes, max_generations)
            },
            prepare: VecDeque::new(),
            launch_fails: false,
            spawn_fails: false,
            next_pid: 100,
            alive: BTreeMap::new(),
            signals: Vec::new(),
            answers: BTreeMap::new(),
            exits: Vec::new(),
            launched: Vec::new(),
            systemd: Vec::new(),
            next_waiter: 0,
            sets: 0,
            pending_reexec: None,
            reexec_fails: false,
            reexecs: 0,
            before_reexec: Vec::new(),
            drain_says_stopping: true,
        };
        let first = sim.fresh_set();
        sim.feed(Input::First(Ok((first, sim.limits.clone()))));
        sim
    }

    /// Generation 1 serving.
    fn serving(processes: usize, max_generations: usize) -> Sim {
        let mut sim = Sim::new(processes, max_generations);
        sim.ready(1);
        assert_eq!(sim.state(1), Some(GenerationState::Serving));
        sim
    }

    fn fresh_set(&mut self) -> Set {
        self.sets += 1;
        Box::leak(format!("a{}", self.sets).into_boxed_str())
    }

    fn feed(&mut self, input: Input<Set>) {
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let effects = self.core.handle(self.now, input);
            if let Some(i) = effects.iter().position(|e| matches!(e, Effect::ReExec(_))) {
                assert_eq!(i, effects.len() - 1, "ReExec is not the last effect");
            }
            for effect in effects {
                if let Some(next) = self.perform(effect) {
                    inputs.push_back(next);
                }
            }
            self.check_invariants();
        }
        // As the shell: what was queued before the re-exec is handled first.
        for input in std::mem::take(&mut self.before_reexec) {
            self.feed(input);
        }
        if let Some(request) = self.pending_reexec.take() {
            let Err(request) = self.core.defer_self_upgrade(request) else {
                return;
            };
            if self.reexec_fails {
                self.feed(Input::SelfUpgradeFailed {
                    request,
                    reason: "the new binary failed its check".into(),
                });
            } else {
                self.re_exec(request);
            }
        }
    }

    /// What a re-exec does to the core: written as JSON, read back into a new core (with
    /// the same sets), which is told it took over.
    fn re_exec(&mut self, request: SelfUpgrade) {
        let mut sets: Vec<Set> = Vec::new();
        let snapshot = self
            .core
            .snapshot(|set| {
                let i = sets.iter().position(|s| s == set).unwrap_or_else(|| {
                    sets.push(set);
                    sets.len() - 1
                });
                i as u32
            })
            .expect("a re-exec is asked for only while idle");
        let json = serde_json::to_string(&snapshot).expect("serialise");
        let snapshot: snapshot::CoreSnapshot = serde_json::from_str(&json).expect("parse");
        let before = format!(
            "{:?}",
            self.core.generations().map(describe).collect::<Vec<_>>()
        );
        self.core = Core::from_snapshot(snapshot, self.now, |i| sets[i as usize]);
        let after = format!(
            "{:?}",
            self.core.generations().map(describe).collect::<Vec<_>>()
        );
        assert_eq!(before, after, "the generations changed across the re-exec");
        self.reexecs += 1;
        self.feed(Input::SelfUpgraded {
            request,
            change: "a → b".into(),
        });
    }

    fn perform(&mut self, effect: Effect<Set>) -> Option<Input<Set>> {
        match effect {
            Effect::Prepare => {
                let prepared = match self.prepare.pop_front() {
                    Some(p) => p,
                    None => Ok(self.fresh_set()),
                };
                Some(Input::Prepared(prepared.map(|a| (a, self.limits.clone()))))
            }
            Effect::Launch {
                generation,
                artifacts,
            } => {
                self.launched.push((generation, artifacts));
                self.launch_fails.then(|| Input::LaunchFailed {
                    generation,
                    reason: "cannot listen".into(),
                })
            }
            Effect::Spawn { generation, slot } => {
                if !self.core.wants_spawn(generation, slot) {
                    return None;
                }
                let result = if self.spawn_fails {
                    Err("cannot execute".to_owned())
                } else {
                    self.next_pid += 1;
                    self.alive.insert(self.next_pid, generation);
                    Ok(self.next_pid)
                };
                Some(Input::Spawned {
                    generation,
                    slot,
                    result,
                })
            }
            Effect::Signal {
                generation,
                pid,
                signal,
            } => {
                assert_eq!(
                    self.alive.get(&pid),
                    Some(&generation),
                    "signal {signal:?} for pid {pid}, which is not a live worker of generation {generation}"
                );
                self.signals.push((pid, signal));
                (signal == Sig::Drain && self.drain_says_stopping).then(|| Input::Notify {
                    pid,
                    message: NotifyMessage {
                        stopping: true,
                        ..NotifyMessage::default()
                    },
                })
            }
            Effect::Answer { waiter, outcome } => {
                self.answers.entry(waiter).or_default().push(outcome);
                None
            }
            Effect::Exit { waiters, result } => {
                self.exits.push((waiters, result));
                None
            }
            Effect::Systemd(s) => {
                self.systemd.push(s);
                None
            }
            Effect::ReExec(request) => {
                assert!(self.pending_reexec.is_none(), "two re-execs at once");
                self.pending_reexec = Some(request);
                None
            }
            Effect::Forget { .. } | Effect::Prune | Effect::Watch { .. } => None,
        }
    }

    fn self_upgrade(&mut self, then_generation: bool) -> WaiterId {
        self.next_waiter += 1;
        let waiter = self.next_waiter;
        self.feed(Input::SelfUpgrade {
            source: "test",
            waiter: Some(waiter),
            then_generation,
        });
        waiter
    }

    fn check_invariants(&self) {
        let states: Vec<GenerationState> = self.core.generations().map(|g| g.state).collect();
        let count = |s| states.iter().filter(|&&x| x == s).count();
        assert!(count(GenerationState::Serving) <= 1, "{states:?}");
        assert!(count(GenerationState::Starting) <= 1, "{states:?}");
        // At most one canary, exactly while the mode says so (or while stopping), and
        // always beside a serving generation that it is compared with.
        let canaries: Vec<u64> = self
            .core
            .generations()
            .filter(|g| g.state == GenerationState::Canary)
            .map(|g| g.number)
            .collect();
        match self.core.mode() {
            Mode::Canary {
                generation, canary, ..
            } => {
                assert_eq!(canaries, vec![*generation], "{states:?}");
                assert_eq!(
                    self.core.generation(canary.baseline).map(|g| g.state),
                    Some(GenerationState::Serving),
                    "the canary's baseline serves: {states:?}"
                );
                assert_eq!(count(GenerationState::Starting), 0, "{states:?}");
            }
            // A fast stop kills every generation as it is (a canary too) and reaps it.
            Mode::Stopping { .. } => assert!(canaries.len() <= 1, "{states:?}"),
            _ => assert!(
                canaries.is_empty(),
                "a canary outside Mode::Canary: {states:?}"
            ),
        }
        assert!(
            states.len() <= self.limits.max_generations,
            "{} generations alive, max {}",
            states.len(),
            self.limits.max_generations
        );
        for answers in self.answers.values() {
            assert_eq!(answers.len(), 1, "a waiter answered twice: {answers:?}");
        }
        assert!(self.exits.len() <= 1, "exited twice");
        // Every running slot is a live process of that generation.
        for g in self.core.generations() {
            for pid in g.pids() {
                assert_eq!(self.alive.get(&pid), Some(&g.number), "pid {pid}");
            }
        }
    }

    /// The next generations are judged as canaries by `policy` (`None`: no canary).
    fn canary(&mut self, policy: Option<CanaryPolicy>) {
        self.limits.canary = policy;
    }

    /// Every worker of `generation` reports: together they answered `requests` since the
    /// window's start figures, `errors` of them 5xx (spread over the workers).
    fn report(&mut self, generation: u64, requests: u64, errors: u64) {
        let pids = self.pids(generation);
        let n = pids.len() as u64;
        for (i, pid) in pids.into_iter().enumerate() {
            let share = |total: u64| total / n + u64::from((i as u64) < total % n);
            let before = self
                .core
                .generation(generation)
                .and_then(|g| g.workers.iter().find(|w| w.pid() == Some(pid)))
                .map(|w| w.stats)
                .unwrap_or_default();
            self.feed(Input::Notify {
                pid,
                message: NotifyMessage {
                    stats: Some(baton_proto::Stats {
                        requests: before.requests + share(requests),
                        errors: before.errors + share(errors),
                        ..before
                    }),
                    ..NotifyMessage::default()
                },
            });
        }
    }

    fn decide(&mut self, decision: CanaryCall) -> WaiterId {
        self.next_waiter += 1;
        let waiter = self.next_waiter;
        self.feed(Input::DecideCanary {
            decision,
            source: "test",
            waiter: Some(waiter),
        });
        waiter
    }

    fn upgrade(&mut self) -> WaiterId {
        self.next_waiter += 1;
        let waiter = self.next_waiter;
        self.feed(Input::Upgrade {
            source: "test",
            waiter: Some(waiter),
        });
        waiter
    }

    fn stop(&mut self, fast: bool) -> WaiterId {
        self.next_waiter += 1;
        let waiter = self.next_waiter;
        self.feed(Input::Stop {
            fast,
            source: "test",
            waiter: Some(waiter),
        });
        waiter
    }

    fn ready(&mut self, generation: u64) {
        for pid in self.pids(generation) {
            self.feed(Input::Notify {
                pid,
                message: NotifyMessage {
                    ready: true,
                    ..NotifyMessage::default()
                },
            });
        }
    }

    fn exit(&mut self, pid: u32) {
        let generation = self.alive.remove(&pid).expect("a live pid");
        self.feed(Input::WorkerExited {
            generation,
            exit: Exit {
                pid,
                status: "exit status: 1".into(),
                stderr_tail: Vec::new(),
            },
        });
    }

    /// Every worker of `generation` exits (as after SIGTERM).
    fn exit_all(&mut self, generation: u64) {
        for pid in self.pids(generation) {
            self.exit(pid);
        }
    }

    fn advance(&mut self, by: Duration) {
        self.now += by;
        self.feed(Input::Tick);
    }

    fn pids(&self, generation: u64) -> Vec<u32> {
        self.core
            .generation(generation)
            .map(|g| g.pids())
            .unwrap_or_default()
    }

    fn state(&self, generation: u64) -> Option<GenerationState> {
        self.core.generation(generation).map(|g| g.state)
    }

    fn answer(&self, waiter: WaiterId) -> &UpgradeOutcome {
        let answers = &self.answers[&waiter];
        assert_eq!(answers.len(), 1);
        &answers[0]
    }

    fn signalled(&self, pid: u32, sig: Sig) -> bool {
        self.signals.contains(&(pid, sig))
    }

    fn numbers(&self) -> Vec<u64> {
        self.core.generations().map(|g| g.number).collect()
    }
}

/// What a generation is, as far as a re-exec must keep it.
fn describe(g: &Generation<Set>) -> String {
    format!(
        "{} {:?} {} {:?} restarts {} requests {} previous {:?}",
        g.number,
        g.state,
        g.artifacts,
        g.workers
            .iter()
            .map(|w| match w.state {
                SlotState::Running { pid, ready, .. } =>
                    format!("{pid} ready {ready} x{}", w.restarts),
                SlotState::Backoff { .. } => format!("backoff x{}", w.restarts),
                other => format!("{other:?} x{}", w.restarts),
            })
            .collect::<Vec<_>>(),
        g.restarts,
        g.requests(),
        g.previous.as_ref().map(|p| (p.number, p.artifacts)),
    )
}

#[test]
fn a_supervisor_upgrade_while_idle_re_execs_at_once_and_keeps_every_generation() {
    let mut sim = Sim::serving(2, 4);
    sim.upgrade();
    sim.ready(2);
    let waiter = sim.self_upgrade(false);
    assert_eq!(sim.reexecs, 1);
    assert!(
        sim.systemd
            .iter()
            .any(|s| matches!(s, Systemd::Reloading(t) if t.contains("supervisor")))
    );
    let answer = sim.answer(waiter);
    assert_eq!(answer.result, UpgradeResult::Succeeded);
    assert_eq!(answer.generation, Some(2));
    assert!(matches!(sim.systemd.last(), Some(Systemd::Ready(_))));
    // The draining generation's timers went along: at drain_timeout its workers are
    // closed, as if nothing had happened.
    assert_eq!(sim.state(1), Some(GenerationState::Draining));
    let old = sim.pids(1);
    sim.advance(Duration::from_secs(40));
    assert!(old.iter().all(|&p| sim.signalled(p, Sig::Kill)));
    // No worker was started or signalled by the re-exec itself.
    assert_eq!(sim.pids(2).len(), 2);
}

#[test]
fn a_supervisor_upgrade_waits_for_the_starting_generation_and_merges_requests() {
    let mut sim = Sim::serving(1, 4);
    let upgrade = sim.upgrade();
    let first = sim.self_upgrade(true);
    let second = sim.self_upgrade(false);
    assert_eq!(sim.reexecs, 0, "no re-exec while generation 2 starts");
    assert!(sim.core.upgrade_pending());
    sim.ready(2);
    assert_eq!(sim.answer(upgrade).result, UpgradeResult::Succeeded);
    // One re-exec for both requests, then the generation the first asked for.
    assert_eq!(sim.reexecs, 1);
    assert_eq!(sim.state(3), Some(GenerationState::Starting));
    assert!(!sim.answers.contains_key(&first) && !sim.answers.contains_key(&second));
    sim.ready(3);
    assert_eq!(sim.answer(first).generation, Some(3));
    assert_eq!(sim.answer(second).generation, Some(3));
}

#[test]
fn an_upgrade_queued_before_the_re_exec_goes_first_and_the_re_exec_follows_it() {
    let mut sim = Sim::serving(1, 4);
    sim.next_waiter += 1;
    let queued = sim.next_waiter;
    sim.before_reexec.push(Input::Upgrade {
        source: "test",
        waiter: Some(queued),
    });
    let waiter = sim.self_upgrade(false);
    assert_eq!(sim.reexecs, 0, "generation 2 starts first");
    assert_eq!(sim.state(2), Some(GenerationState::Starting));
    sim.ready(2);
    assert_eq!(sim.answer(queued).result, UpgradeResult::Succeeded);
    assert_eq!(sim.reexecs, 1);
    assert_eq!(sim.answer(waiter).result, UpgradeResult::Succeeded);
}

#[test]
fn a_refused_supervisor_upgrade_changes_nothing_but_says_why() {
    let mut sim = Sim::serving(1, 4);
    sim.reexec_fails = true;
    let waiter = sim.self_upgrade(true);
    let answer = sim.answer(waiter);
    assert_eq!(answer.result, UpgradeResult::Refused);
    assert!(
        answer
            .reason
            .as_deref()
            .unwrap()
            .contains("failed its check")
    );
    assert_eq!(sim.numbers(), vec![1], "no generation started");
    assert!(
        matches!(sim.systemd.last(), Some(Systemd::Ready(s)) if s.contains("failed its check"))
    );
    assert_eq!(
        sim.core.last_upgrade().map(|u| u.result),
        Some(UpgradeResult::Refused)
    );
}

#[test]
fn a_supervisor_upgrade_while_stopping_is_refused() {
    let mut sim = Sim::serving(1, 4);
    sim.stop(false);
    let waiter = sim.self_upgrade(false);
    assert_eq!(sim.answer(waiter).result, UpgradeResult::Refused);
    assert_eq!(sim.reexecs, 0);
}

#[test]
fn only_an_idle_core_can_be_written() {
    let mut sim = Sim::serving(1, 4);
    sim.upgrade();
    assert!(
        sim.core.snapshot(|_| 0).is_err(),
        "generation 2 is starting"
    );
    sim.ready(2);
    assert!(sim.core.snapshot(|_| 0).is_ok());
}

#[test]
fn generation_1_serves_once_every_worker_is_ready() {
    let mut sim = Sim::new(2, 4);
    assert_eq!(sim.state(1), Some(GenerationState::Starting));
    assert_eq!(sim.pids(1).len(), 2);
    let first = sim.pids(1)[0];
    sim.feed(Input::Notify {
        pid: first,
        message: NotifyMessage {
            ready: true,
            ..NotifyMessage::default()
        },
    });
    assert_eq!(sim.state(1), Some(GenerationState::Starting));
    sim.ready(1);
    assert_eq!(sim.state(1), Some(GenerationState::Serving));
    // READY=1 to systemd, no RELOADING for the first start, and no "last upgrade".
    assert!(matches!(sim.systemd.as_slice(), [Systemd::Ready(_)]));
    assert!(sim.core.last_upgrade().is_none());
}

#[test]
fn an_upgrade_promotes_the_new_generation_and_drains_the_old_one() {
    let mut sim = Sim::serving(2, 4);
    let old = sim.pids(1);
    let waiter = sim.upgrade();
    assert!(matches!(sim.systemd.last(), Some(Systemd::Reloading(_))));
    assert_eq!(sim.state(2), Some(GenerationState::Starting));
    assert!(sim.answers.is_empty());
    sim.ready(2);
    assert_eq!(sim.answer(waiter).result, UpgradeResult::Succeeded);
    assert_eq!(sim.state(1), Some(GenerationState::Draining));
    assert!(old.iter().all(|&p| sim.signalled(p, Sig::Drain)));
    assert_eq!(
        sim.core
            .generation(2)
            .unwrap()
            .previous
            .as_ref()
            .unwrap()
            .number,
        1
    );
    sim.exit_all(1);
    assert_eq!(sim.numbers(), vec![2]);
}

#[test]
fn the_answer_waits_until_the_old_generation_stopped_accepting() {
    let mut sim = Sim::serving(2, 4);
    sim.drain_says_stopping = false;
    let old = sim.pids(1);
    let waiter = sim.upgrade();
    sim.ready(2);
    assert_eq!(sim.state(2), Some(GenerationState::Serving));
    assert!(old.iter().all(|&p| sim.signalled(p, Sig::Drain)));
    assert!(
        sim.answers.is_empty(),
        "answered while generation 1 accepts"
    );
    let stopping = |pid| Input::Notify {
        pid,
        message: NotifyMessage {
            stopping: true,
            ..NotifyMessage::default()
        },
    };
    sim.feed(stopping(old[0]));
    assert!(sim.answers.is_empty(), "one of two workers still accepts");
    sim.feed(stopping(old[1]));
    assert_eq!(sim.answer(waiter).result, UpgradeResult::Succeeded);
    sim.advance(ACCEPT_CLOSE_WAIT);
    assert_eq!(sim.answers[&waiter].len(), 1, "answered once");

    // A worker that exits stopped accepting too.
    let old = sim.pids(2);
    let waiter = sim.upgrade();
    sim.ready(3);
    sim.feed(stopping(old[0]));
    assert!(!sim.answers.contains_key(&waiter));
    sim.exit(old[1]);
    assert_eq!(sim.answer(waiter).result, UpgradeResult::Succeeded);

    // A worker that never says so is waited for ACCEPT_CLOSE_WAIT.
    let waiter = sim.upgrade();
    sim.ready(4);
    sim.advance(ACCEPT_CLOSE_WAIT - Duration::from_millis(1));
    assert!(!sim.answers.contains_key(&waiter));
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.answer(waiter).result, UpgradeResult::Succeeded);
    // Without waiters (a signal), nothing is held.
    for g in 1..=3 {
        sim.exit_all(g);
    }
    sim.feed(Input::Upgrade {
        source: "signal",
        waiter: None,
    });
    sim.ready(5);
    assert_eq!(sim.state(5), Some(GenerationState::Serving));
}

#[test]
fn upgrades_while_one_starts_are_coalesced_into_one_follow_up() {
    let mut sim = Sim::serving(1, 4);
    let first = sim.upgrade();
    let (a, b) = (sim.upgrade(), sim.upgrade());
    assert!(sim.core.upgrade_pending());
    assert_eq!(sim.numbers(), vec![1, 2]);
    sim.ready(2);
    assert_eq!(sim.answer(first).result, UpgradeResult::Succeeded);
    // The follow-up started generation 3 for both later requests.
    assert_eq!(sim.state(3), Some(GenerationState::Starting));
    assert!(!sim.answers.contains_key(&a));
    sim.ready(3);
    assert_eq!(sim.answer(a).generation, Some(3));
    assert_eq!(sim.answer(b).generation, Some(3));
    assert!(!sim.core.upgrade_pending());
}

#[test]
fn a_failed_start_keeps_the_serving_generation_and_runs_the_follow_up() {
    let mut sim = Sim::serving(1, 4);
    let first = sim.upgrade();
    let follow = sim.upgrade();
    let pid = sim.pids(2)[0];
    sim.exit(pid);
    let answer = sim.answer(first);
    assert_eq!(answer.result, UpgradeResult::RolledBack);
    assert!(answer.reason.as_deref().unwrap().contains("before READY"));
    assert_eq!(sim.state(1), Some(GenerationState::Serving));
    assert_eq!(
        sim.numbers(),
        vec![1, 3],
        "generation 2 reaped, the follow-up started"
    );
    sim.ready(3);
    assert_eq!(sim.answer(follow).result, UpgradeResult::Succeeded);
}

#[test]
fn a_refused_upgrade_uses_no_number_and_changes_nothing() {
    let mut sim = Sim::serving(1, 4);
    sim.prepare.push_back(Err("invalid config: line 3".into()));
    let w = sim.upgrade();
    assert_eq!(sim.answer(w).result, UpgradeResult::Refused);
    assert!(
        matches!(sim.systemd.last(), Some(Systemd::Ready(s)) if s.contains("refused: invalid config"))
    );
    sim.launch_fails = true;
    let w = sim.upgrade();
    assert_eq!(sim.answer(w).result, UpgradeResult::Refused);
    assert_eq!(sim.numbers(), vec![1]);
    sim.launch_fails = false;
    sim.upgrade();
    assert_eq!(sim.numbers(), vec![1, 2], "the number was not used up");
}

#[test]
fn generation_1_failing_exits_with_the_reason() {
    let mut sim = Sim::new(1, 4);
    let pid = sim.pids(1)[0];
    sim.exit(pid);
    let (waiters, result) = &sim.exits[0];
    assert!(waiters.is_empty());
    assert!(
        result
            .as_ref()
            .unwrap_err()
            .contains("generation 1 failed to start")
    );
    // And a config that cannot be prepared at all.
    let mut sim = Sim {
        prepare: VecDeque::new(),
        ..Sim::new(1, 4)
    };
    sim.core = Core::new(4, sim.now);
    sim.exits.clear();
    sim.feed(Input::First(Err("worker binary: not executable".into())));
    assert!(
        sim.exits[0]
            .1
            .as_ref()
            .unwrap_err()
            .contains("generation 1 could not start")
    );
}

#[test]
fn a_starting_generation_not_ready_in_time_is_rolled_back() {
    let mut sim = Sim::serving(2, 4);
    let w = sim.upgrade();
    let pids = sim.pids(2);
    sim.advance(Duration::from_secs(9));
    assert!(!sim.answers.contains_key(&w));
    sim.advance(Duration::from_secs(1));
    let reason = sim.answer(w).reason.clone().unwrap();
    assert!(
        reason.contains("2 worker(s) not READY within ready_timeout (10s)"),
        "{reason}"
    );
    assert!(pids.iter().all(|&p| sim.signalled(p, Sig::Kill)));
    sim.exit_all(2);
    assert_eq!(sim.numbers(), vec![1]);
}

#[test]
fn max_generations_waits_for_room_then_force_closes_and_kills() {
    let mut sim = Sim::serving(1, 2);
    sim.upgrade();
    sim.ready(2);
    // Generation 1 drains with a long request: it stays.
    let lingering = sim.pids(1)[0];
    let w = sim.upgrade();
    assert!(matches!(sim.core.mode(), Mode::WaitingForRoom { .. }));
    assert_eq!(sim.numbers(), vec![1, 2]);
    sim.advance(Duration::from_secs(1));
    assert!(sim.signalled(lingering, Sig::ForceClose));
    // A blocking handler keeps it alive: killed shortly after.
    sim.advance(FORCE_CLOSE_KILL_AFTER);
    assert!(sim.signalled(lingering, Sig::Kill));
    sim.exit(lingering);
    assert_eq!(sim.numbers(), vec![2, 3]);
    sim.ready(3);
    assert_eq!(sim.answer(w).generation, Some(3));
}

#[test]
fn a_serving_worker_that_dies_is_replaced_after_a_growing_back_off() {
    let mut sim = Sim::serving(1, 4);
    let pid = sim.pids(1)[0];
    sim.advance(STABLE_RUN);
    sim.exit(pid);
    let g = sim.core.generation(1).unwrap();
    assert!(matches!(g.workers[0].state, SlotState::Backoff { .. }));
    assert_eq!(g.restarts, 1);
    sim.advance(RESTART_BACKOFF_FIRST);
    let second = sim.pids(1)[0];
    assert_ne!(second, pid);
    // Not READY within ready_timeout: killed, and replaced again after a longer back-off.
    sim.advance(Duration::from_secs(10));
    assert!(sim.signalled(second, Sig::Kill));
    sim.exit(second);
    sim.advance(RESTART_BACKOFF_FIRST);
    assert!(sim.pids(1).is_empty(), "the second back-off is longer");
    sim.advance(RESTART_BACKOFF_FIRST);
    assert_eq!(sim.pids(1).len(), 1);
    assert_eq!(sim.core.generation(1).unwrap().workers[0].restarts, 2);
}

#[test]
fn a_crash_loop_after_promotion_restores_the_previous_artifacts() {
    let mut sim = Sim::serving(1, 4);
    sim.upgrade();
    sim.ready(2);
    sim.exit_all(1);
    for _ in 0..3 {
        let pid = sim.pids(2)[0];
        sim.exit(pid);
        sim.advance(Duration::from_secs(1));
        if sim.core.generation(2).is_some_and(|g| g.pids().is_empty()) {
            sim.advance(RESTART_BACKOFF_MAX);
        }
    }
    // Generation 3 runs generation 1's set ("a1"), not what is on disk now.
    assert_eq!(sim.launched.last(), Some(&(3, "a1")));
    let g3 = sim.core.generation(3).unwrap();
    assert_eq!(g3.restored.as_ref().unwrap().from, 1);
    sim.ready(3);
    assert_eq!(sim.state(2), Some(GenerationState::Draining));
    let last = sim.core.last_upgrade().unwrap();
    assert_eq!(last.result, UpgradeResult::RolledBack);
    assert!(
        last.reason
            .as_deref()
            .unwrap()
            .contains("generation 3 serves generation 1's artifacts")
    );
    // A restore has no rollback target of its own: no ping-pong.
    assert!(sim.core.generation(3).unwrap().previous.is_none());
}

#[test]
fn a_crash_loop_while_an_operator_upgrade_starts_is_not_rolled_back() {
    let mut sim = Sim::serving(1, 4);
    sim.upgrade();
    sim.ready(2);
    sim.exit_all(1);
    let w = sim.upgrade();
    for _ in 0..3 {
        if let Some(&pid) = sim.pids(2).first() {
            sim.exit(pid);
        }
        sim.advance(Duration::from_secs(1));
    }
    assert!(sim.core.generation(2).unwrap().crashes_after_promotion >= 3);
    assert_eq!(
        sim.launched.len(),
        3,
        "no restore launched: {:?}",
        sim.launched
    );
    sim.ready(3);
    assert_eq!(sim.answer(w).result, UpgradeResult::Succeeded);
}

#[test]
fn a_follow_up_asked_during_a_deferred_restore_runs_after_it() {
    let mut sim = Sim::serving(1, 2);
    sim.upgrade();
    sim.ready(2);
    let lingering = sim.pids(1)[0]; // generation 1 still draining
    for _ in 0..3 {
        let pid = sim.pids(2)[0];
        sim.exit(pid);
        sim.advance(RESTART_BACKOFF_MAX);
    }
    // The restore of generation 1's artifacts waits for room (1 and 2 alive, max 2).
    assert!(matches!(
        sim.core.mode(),
        Mode::WaitingForRoom {
            start: Start::Restore(..),
            ..
        }
    ));
    let w = sim.upgrade();
    assert!(!sim.answers.contains_key(&w));
    sim.exit(lingering);
    assert_eq!(sim.launched.last(), Some(&(3, "a1")));
    sim.ready(3);
    // Then the follow-up, with a fresh set, once the crashed generation is gone.
    sim.exit_all(2);
    assert_eq!(sim.state(4), Some(GenerationState::Starting));
    assert_ne!(sim.launched.last().unwrap().1, "a1");
    sim.ready(4);
    assert_eq!(sim.answer(w).generation, Some(4));
}

#[test]
fn a_stop_while_starting_refuses_the_waiters_and_drains_everything() {
    let mut sim = Sim::serving(1, 4);
    let starting = sim.upgrade();
    let follow = sim.upgrade();
    let stop = sim.stop(false);
    assert_eq!(sim.answer(starting).result, UpgradeResult::Refused);
    assert_eq!(sim.answer(follow).result, UpgradeResult::Refused);
    assert!(
        sim.pids(1)
            .iter()
            .chain(&sim.pids(2))
            .all(|&p| sim.signalled(p, Sig::Drain))
    );
    // A worker of the starting generation says READY meanwhile: it is not promoted.
    sim.ready(2);
    assert_eq!(sim.state(2), Some(GenerationState::Draining));
    let late = sim.upgrade();
    assert_eq!(sim.answer(late).result, UpgradeResult::Refused);
    sim.exit_all(1);
    assert!(sim.exits.is_empty());
    sim.exit_all(2);
    assert_eq!(sim.exits, vec![(vec![stop], Ok(()))]);
}

#[test]
fn a_fast_stop_kills_and_exits_even_with_workers_in_back_off() {
    let mut sim = Sim::serving(2, 4);
    let pids = sim.pids(1);
    sim.exit(pids[0]);
    let stop = sim.stop(true);
    assert!(sim.signalled(pids[1], Sig::Kill));
    sim.exit(pids[1]);
    assert_eq!(sim.exits, vec![(vec![stop], Ok(()))]);
}

#[test]
fn while_stopping_systemd_hears_the_stop_extended_until_the_drain_ends() {
    let mut sim = Sim::serving(1, 4);
    sim.stop(false);
    assert!(matches!(sim.systemd.last(), Some(Systemd::Stopping(_, d)) if *d == EXTEND_STEP));
    sim.advance(EXTEND_INTERVAL);
    assert!(
        matches!(sim.systemd.last(), Some(Systemd::ExtendTimeout(s, _)) if s.contains("generation 1 draining"))
    );
    sim.advance(Duration::from_secs(32));
    assert!(
        sim.signalled(sim.pids(1)[0], Sig::Kill),
        "drain_timeout + margin"
    );
    sim.exit_all(1);
    assert_eq!(sim.exits.len(), 1);
}

#[test]
fn exits_in_every_state_and_timers_of_gone_generations_do_nothing() {
    let mut sim = Sim::serving(1, 4);
    // Failed: its ready timer is dropped with it.
    sim.upgrade();
    sim.feed(Input::Notify {
        pid: sim.pids(2)[0],
        message: NotifyMessage {
            status: Some("failed: cannot load plugin".into()),
            errno: Some(22),
            ..NotifyMessage::default()
        },
    });
    assert_eq!(sim.state(2), Some(GenerationState::Failed));
    sim.exit_all(2);
    assert_eq!(sim.numbers(), vec![1]);
    let signals = sim.signals.len();
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.signals.len(), signals, "no timer of generation 2 acted");
    // Draining: reaped when the last worker goes; its drain timer is dropped.
    sim.upgrade();
    sim.ready(3);
    sim.exit_all(1);
    assert_eq!(sim.numbers(), vec![3]);
    assert!(sim.core.next_deadline().is_none_or(|d| d > sim.now));
    // An exit of an unknown pid, or one reported twice, changes nothing.
    sim.feed(Input::WorkerExited {
        generation: 3,
        exit: Exit {
            pid: 1,
            status: "?".into(),
            stderr_tail: Vec::new(),
        },
    });
    assert_eq!(sim.state(3), Some(GenerationState::Serving));
}

#[test]
fn a_replacement_that_cannot_be_spawned_is_retried_with_back_off() {
    let mut sim = Sim::serving(1, 4);
    let pid = sim.pids(1)[0];
    sim.exit(pid);
    sim.spawn_fails = true;
    sim.advance(RESTART_BACKOFF_FIRST);
    let g = sim.core.generation(1).unwrap();
    assert!(matches!(g.workers[0].state, SlotState::Backoff { .. }));
    assert_eq!(g.workers[0].crash_streak, 2);
    sim.spawn_fails = false;
    sim.advance(RESTART_BACKOFF_MAX);
    assert_eq!(sim.pids(1).len(), 1);
}

/// Generation 1 serving with `processes` workers, generation 2 ready and in its canary
/// window (30 s); returns the upgrade's waiter.
fn in_canary(processes: usize) -> (Sim, WaiterId) {
    let mut sim = Sim::serving(processes, 4);
    sim.canary(Some(canary_policy()));
    let waiter = sim.upgrade();
    sim.ready(2);
    (sim, waiter)
}

#[test]
fn a_ready_canary_serves_beside_the_old_generation_until_it_is_judged() {
    let (mut sim, waiter) = in_canary(2);
    assert_eq!(sim.state(2), Some(GenerationState::Canary));
    assert_eq!(sim.state(1), Some(GenerationState::Serving));
    assert!(
        !sim.signals.iter().any(|&(_, s)| s == Sig::Drain),
        "nothing drains during the window: {:?}",
        sim.signals
    );
    assert!(
        !sim.answers.contains_key(&waiter),
        "answered before the decision"
    );
    assert!(
        matches!(sim.systemd.last(), Some(Systemd::Status(s)) if s.contains("canary: generation 2 serves beside generation 1")),
        "{:?}",
        sim.systemd.last()
    );
    assert!(sim.core.snapshot(|_| 0).is_err(), "a canary is not idle");
    let (n, info) = sim.core.canary_info(sim.now).expect("a canary runs");
    assert_eq!(n, 2);
    assert_eq!(info.baseline.generation, 1);
    assert_eq!(info.ends_in_ms, 30_000);
    sim.advance(Duration::from_secs(29));
    assert_eq!(sim.state(2), Some(GenerationState::Canary));
    assert!(!sim.answers.contains_key(&waiter));
}

#[test]
fn a_healthy_canary_is_promoted_at_the_window_end_and_the_old_generation_drains() {
    let mut sim = Sim::serving(2, 4);
    sim.canary(Some(canary_policy()));
    let waiter = sim.upgrade();
    // Before the window: not counted.
    sim.report(1, 5000, 500);
    sim.ready(2);
    let old = sim.pids(1);
    sim.report(1, 1000, 10); // 1.00%
    sim.report(2, 500, 9); // 1.80%: within 1 point of the old one
    sim.advance(Duration::from_secs(30));
    let answer = sim.answer(waiter);
    assert_eq!(answer.result, UpgradeResult::Succeeded, "{answer:?}");
    assert_eq!(answer.generation, Some(2));
    let verdict = answer.canary.as_ref().expect("the canary's verdict");
    assert_eq!(
        verdict.decided_by,
        crate::status::CanaryDecidedBy::ErrorRatio
    );
    assert_eq!((verdict.canary.requests, verdict.canary.errors), (500, 9));
    assert_eq!(
        (verdict.baseline.requests, verdict.baseline.errors),
        (1000, 10)
    );
    let reason = answer.reason.as_deref().unwrap();
    assert!(
        reason.contains("1.80% (9 5xx + 0 exit(s) in 500 request(s)) for generation 2"),
        "{reason}"
    );
    assert!(
        reason.contains("1.00% (10 5xx + 0 exit(s) in 1000 request(s)) for generation 1"),
        "{reason}"
    );
    assert_eq!(sim.state(2), Some(GenerationState::Serving));
    assert_eq!(sim.state(1), Some(GenerationState::Draining));
    assert!(old.iter().all(|&p| sim.signalled(p, Sig::Drain)));
    assert!(matches!(sim.systemd.last(), Some(Systemd::Ready(_))));
    assert_eq!(
        sim.core
            .generation(2)
            .unwrap()
            .previous
            .as_ref()
            .unwrap()
            .number,
        1
    );
    // Promoted now: the crash-loop window counts from here.
    assert_eq!(sim.core.generation(2).unwrap().promoted, Some(sim.now));
}

#[test]
fn a_canary_with_too_many_errors_is_rolled_back_and_the_old_generation_goes_on() {
    let (mut sim, waiter) = in_canary(2);
    let canary = sim.pids(2);
    sim.report(1, 2000, 10); // 0.50%
    sim.report(2, 600, 180); // 30%
    sim.advance(Duration::from_secs(30));
    let answer = sim.answer(waiter);
    assert_eq!(answer.result, UpgradeResult::RolledBack);
    assert_eq!(answer.generation, Some(2));
    let reason = answer.reason.as_deref().unwrap();
    assert!(reason.starts_with("canary: error ratio 30.00%"), "{reason}");
    assert!(reason.contains("against 0.50%"), "{reason}");
    assert!(
        reason.contains("more than canary_max_error_ratio_increase (0.01) above"),
        "{reason}"
    );
    assert_eq!(
        answer.canary.as_ref().unwrap().decision,
        crate::status::CanaryDecision::RolledBack
    );
    // Drained, not killed: what it has in flight finishes.
    assert!(canary.iter().all(|&p| sim.signalled(p, Sig::Drain)));
    assert!(!canary.iter().any(|&p| sim.signalled(p, Sig::Kill)));
    assert_eq!(sim.state(2), Some(GenerationState::Draining));
    assert_eq!(sim.state(1), Some(GenerationState::Serving));
    assert_eq!(
        sim.core.generation(2).unwrap().failure.as_deref(),
        Some(reason)
    );
    assert!(
        matches!(sim.systemd.last(), Some(Systemd::Ready(s)) if s.contains("rolled back: canary: error ratio 30.00%")),
        "{:?}",
        sim.systemd.last()
    );
    assert_eq!(
        sim.core.last_upgrade().unwrap().result,
        UpgradeResult::RolledBack
    );
    // The metrics tell it apart from a start that failed.
    let upgrades = &sim.core.totals().upgrades;
    assert_eq!(upgrades.get("canary_rolled_back"), Some(&1), "{upgrades:?}");
    assert_eq!(upgrades.get("rolled_back"), None, "{upgrades:?}");
    sim.exit_all(2);
    assert_eq!(sim.numbers(), vec![1]);
}

#[test]
fn the_error_ratio_threshold_is_an_absolute_increase_over_the_old_generation() {
    let policy = canary_policy();
    let counts = |generation, requests, errors, exits| {
        super::canary::window_for_test(generation, requests, errors, exits)
    };
    let old = counts(1, 1000, 20, 0); // 2%
    // 3% is one point above: promoted; 3.1% is not.
    assert!(matches!(
        judge(&policy, &counts(2, 1000, 30, 0), &old, false),
        Judgement::Promote(_)
    ));
    assert!(matches!(
        judge(&policy, &counts(2, 1000, 31, 0), &old, false),
        Judgement::RollBack(crate::status::CanaryDecidedBy::ErrorRatio, _)
    ));
    // Worker exits are errors: 25 5xx + 6 exits in 1000 is 3.1%.
    assert!(matches!(
        judge(&policy, &counts(2, 1000, 25, 6), &old, false),
        Judgement::RollBack(..)
    ));
    // An old generation with no request is a baseline of 0.
    let idle = counts(1, 0, 0, 0);
    assert!(matches!(
        judge(&policy, &counts(2, 200, 2, 0), &idle, false),
        Judgement::Promote(_)
    ));
    assert!(matches!(
        judge(&policy, &counts(2, 200, 3, 0), &idle, false),
        Judgement::RollBack(..)
    ));
    // With 0 allowed, the canary may only be as good as the old generation.
    let strict = CanaryPolicy {
        max_error_ratio_increase: 0.0,
        ..policy.clone()
    };
    assert!(matches!(
        judge(&strict, &counts(2, 1000, 20, 0), &old, false),
        Judgement::Promote(_)
    ));
    assert!(matches!(
        judge(&strict, &counts(2, 1000, 21, 0), &old, false),
        Judgement::RollBack(..)
    ));
    // Too few requests: extended once, then rolled back.
    assert!(matches!(
        judge(&policy, &counts(2, 99, 0, 0), &old, false),
        Judgement::Extend(_)
    ));
    assert!(matches!(
        judge(&policy, &counts(2, 99, 0, 0), &old, true),
        Judgement::RollBack(crate::status::CanaryDecidedBy::TooFewRequests, _)
    ));
}

#[test]
fn too_few_requests_extend_the_window_once_then_roll_back() {
    let (mut sim, waiter) = in_canary(1);
    sim.report(1, 5000, 0);
    sim.report(2, 40, 0);
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.state(2), Some(GenerationState::Canary), "extended");
    assert!(!sim.answers.contains_key(&waiter));
    assert!(sim.core.canary_info(sim.now).unwrap().1.extended);
    sim.report(2, 40, 0); // 80 in both windows
    sim.advance(Duration::from_secs(30));
    let answer = sim.answer(waiter);
    assert_eq!(answer.result, UpgradeResult::RolledBack);
    let reason = answer.reason.as_deref().unwrap();
    assert!(
        reason.contains(
            "answered 80 request(s), fewer than canary_min_requests (100) in two windows"
        ),
        "{reason}"
    );
    assert_eq!(sim.state(1), Some(GenerationState::Serving));
    // Enough in the second window: judged as usual.
    let w = sim.upgrade();
    sim.ready(3);
    sim.report(3, 60, 0);
    sim.advance(Duration::from_secs(30));
    sim.report(3, 60, 0);
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.answer(w).result, UpgradeResult::Succeeded);
    assert_eq!(sim.state(3), Some(GenerationState::Serving));
}

#[test]
fn canary_worker_exits_count_as_errors_are_replaced_and_a_crash_loop_rolls_back_early() {
    let (mut sim, waiter) = in_canary(2);
    sim.report(1, 10_000, 0);
    sim.report(2, 5000, 0);
    // One exit: replaced like a serving worker's, and counted.
    let first = sim.pids(2)[0];
    sim.exit(first);
    assert_eq!(sim.state(2), Some(GenerationState::Canary));
    sim.advance(RESTART_BACKOFF_FIRST);
    assert_eq!(sim.pids(2).len(), 2, "replaced");
    assert_eq!(sim.core.canary_info(sim.now).unwrap().1.canary.exits, 1);
    // crash_loop_exits (3) within the window: rolled back at once.
    for _ in 0..2 {
        let pid = sim.pids(2)[0];
        sim.exit(pid);
    }
    let answer = sim.answer(waiter);
    assert_eq!(answer.result, UpgradeResult::RolledBack);
    let reason = answer.reason.as_deref().unwrap();
    assert!(
        reason.contains("3 worker exit(s) within the window (crash_loop_exits 3)"),
        "{reason}"
    );
    assert_eq!(
        answer.canary.as_ref().unwrap().decided_by,
        crate::status::CanaryDecidedBy::Crashed
    );
    assert_eq!(sim.state(1), Some(GenerationState::Serving));
    // Its slots in back-off are not restarted: with no worker left it is gone.
    assert_eq!(sim.numbers(), vec![1]);
    sim.advance(RESTART_BACKOFF_MAX);
    assert_eq!(sim.numbers(), vec![1]);
}

#[test]
fn a_canary_whose_every_worker_exited_is_rolled_back_at_once() {
    let (mut sim, waiter) = in_canary(1);
    let pid = sim.pids(2)[0];
    sim.exit(pid);
    let answer = sim.answer(waiter);
    assert_eq!(answer.result, UpgradeResult::RolledBack);
    assert!(
        answer
            .reason
            .as_deref()
            .unwrap()
            .contains("every worker of generation 2 exited"),
        "{answer:?}"
    );
    assert_eq!(sim.numbers(), vec![1], "nothing left of generation 2");
}

#[test]
fn exits_of_the_old_generation_during_the_window_count_against_it() {
    let (mut sim, waiter) = in_canary(2);
    sim.report(1, 1000, 0);
    let old = sim.pids(1)[0];
    sim.exit(old);
    sim.exit(sim.pids(1)[0]);
    sim.advance(RESTART_BACKOFF_FIRST * 2);
    // The old one: 2 exits in 1000 (0.2%); the canary 1.1%: within one point.
    sim.report(2, 1000, 11);
    sim.advance(Duration::from_secs(30));
    let answer = sim.answer(waiter);
    assert_eq!(answer.result, UpgradeResult::Succeeded, "{answer:?}");
    assert_eq!(answer.canary.as_ref().unwrap().baseline.exits, 2);
}

#[test]
fn upgrades_during_a_canary_are_coalesced_into_one_follow_up() {
    let (mut sim, waiter) = in_canary(1);
    let (a, b) = (sim.upgrade(), sim.upgrade());
    assert!(sim.core.upgrade_pending());
    assert_eq!(
        sim.numbers(),
        vec![1, 2],
        "nothing started during the window"
    );
    sim.report(2, 500, 0);
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.answer(waiter).result, UpgradeResult::Succeeded);
    // The follow-up: generation 3, itself a canary beside generation 2.
    assert_eq!(sim.state(3), Some(GenerationState::Starting));
    sim.ready(3);
    assert_eq!(sim.state(3), Some(GenerationState::Canary));
    assert_eq!(
        sim.core.canary_info(sim.now).unwrap().1.baseline.generation,
        2
    );
    sim.report(3, 500, 0);
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.answer(a).generation, Some(3));
    assert_eq!(sim.answer(b).generation, Some(3));
    assert!(!sim.core.upgrade_pending());
}

#[test]
fn a_stop_during_a_canary_refuses_its_waiters_and_drains_both_generations() {
    let (mut sim, waiter) = in_canary(2);
    let follow = sim.upgrade();
    let stop = sim.stop(false);
    assert_eq!(sim.answer(waiter).result, UpgradeResult::Refused);
    assert_eq!(sim.answer(follow).result, UpgradeResult::Refused);
    assert!(
        sim.pids(1)
            .iter()
            .chain(&sim.pids(2))
            .all(|&p| sim.signalled(p, Sig::Drain))
    );
    // The window's end does nothing now.
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.state(2), Some(GenerationState::Draining));
    sim.exit_all(1);
    sim.exit_all(2);
    assert_eq!(sim.exits, vec![(vec![stop], Ok(()))]);
}

#[test]
fn a_canary_is_decided_by_hand_and_without_one_the_request_is_refused() {
    let mut sim = Sim::serving(1, 4);
    let none = sim.decide(CanaryCall::Promote);
    let answer = sim.answer(none);
    assert_eq!(answer.result, UpgradeResult::Refused);
    assert_eq!(answer.reason.as_deref(), Some("no canary is running"));
    sim.canary(Some(canary_policy()));
    // Promote: both the upgrade's waiter and the operator get the outcome.
    let w = sim.upgrade();
    sim.ready(2);
    let promote = sim.decide(CanaryCall::Promote);
    for waiter in [w, promote] {
        let answer = sim.answer(waiter);
        assert_eq!(answer.result, UpgradeResult::Succeeded);
        assert!(
            answer
                .reason
                .as_deref()
                .unwrap()
                .starts_with("canary promoted by hand (test)")
        );
        assert_eq!(
            answer.canary.as_ref().unwrap().decided_by,
            crate::status::CanaryDecidedBy::Operator
        );
    }
    assert_eq!(sim.state(2), Some(GenerationState::Serving));
    assert_eq!(sim.state(1), Some(GenerationState::Draining));
    // Abort: the canary drains, generation 2 goes on.
    let w = sim.upgrade();
    sim.ready(3);
    let abort = sim.decide(CanaryCall::Abort);
    assert_eq!(sim.answer(w).result, UpgradeResult::RolledBack);
    assert!(
        sim.answer(abort)
            .reason
            .as_deref()
            .unwrap()
            .starts_with("canary aborted by hand (test)")
    );
    assert_eq!(sim.state(3), Some(GenerationState::Draining));
    assert_eq!(sim.state(2), Some(GenerationState::Serving));
    // Decided already: the window's end does nothing.
    let signals = sim.signals.len();
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.signals.len(), signals);
}

#[test]
fn generation_1_and_a_crash_loop_restore_are_never_canaries() {
    let mut sim = Sim::build(1, 4, Some(canary_policy()));
    sim.ready(1);
    assert_eq!(
        sim.state(1),
        Some(GenerationState::Serving),
        "nothing to compare with"
    );
    // Generations 2 and 3 are promoted by hand; 3 crash-loops, and the restore of
    // generation 2's artifacts (whose config asks for a canary) is promoted at once.
    for n in [2, 3] {
        sim.upgrade();
        sim.ready(n);
        sim.decide(CanaryCall::Promote);
        sim.exit_all(n - 1);
    }
    for _ in 0..3 {
        let pid = sim.pids(3)[0];
        sim.exit(pid);
        sim.advance(Duration::from_secs(1));
    }
    assert_eq!(sim.launched.last(), Some(&(4, "a2")));
    sim.ready(4);
    assert_eq!(sim.state(4), Some(GenerationState::Serving));
    assert_eq!(sim.state(3), Some(GenerationState::Draining));
}

#[test]
fn a_supervisor_upgrade_waits_for_the_canary_to_be_decided() {
    let (mut sim, waiter) = in_canary(1);
    let reexec = sim.self_upgrade(false);
    assert_eq!(sim.reexecs, 0);
    sim.report(2, 500, 0);
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.answer(waiter).result, UpgradeResult::Succeeded);
    assert_eq!(sim.reexecs, 1);
    assert_eq!(sim.answer(reexec).result, UpgradeResult::Succeeded);
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Upgrade,
        Stop(bool),
        Ready(u64),
        ExitOne(usize),
        ExitAll(u64),
        Advance(u64),
        Fail(usize),
        PrepareFails,
        SpawnFails(bool),
        SelfUpgrade(bool),
        ReExecFails(bool),
        /// The next generations' config asks for a canary (or not).
        Canary(bool),
        /// `baton upgrade --promote` (true) or `--abort`.
        Decide(bool),
        /// A generation (counted back from the newest) reports requests and 5xx.
        Report(u64, u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Upgrade),
            1 => any::<bool>().prop_map(Op::Stop),
            // Mostly the newest generation: the one that can be starting.
            5 => prop_oneof![3 => Just(0u64), 1 => 0u64..6].prop_map(Op::Ready),
            3 => any::<usize>().prop_map(Op::ExitOne),
            3 => (0u64..6).prop_map(Op::ExitAll),
            4 => (0u64..40_000).prop_map(Op::Advance),
            1 => any::<usize>().prop_map(Op::Fail),
            1 => Just(Op::PrepareFails),
            1 => any::<bool>().prop_map(Op::SpawnFails),
            2 => any::<bool>().prop_map(Op::SelfUpgrade),
            1 => any::<bool>().prop_map(Op::ReExecFails),
            2 => any::<bool>().prop_map(Op::Canary),
            1 => any::<bool>().prop_map(Op::Decide),
            3 => (0u64..3, 0u64..400, prop_oneof![2 => Just(0u64), 1 => 0u64..100])
                .prop_map(|(g, r, e)| Op::Report(g, r, e.min(r))),
        ]
    }

    /// A canary window shorter than the longest `Op::Advance`.
    fn short_canary() -> CanaryPolicy {
        CanaryPolicy {
            window: Duration::from_secs(10),
            ..canary_policy()
        }
    }

    fn apply(sim: &mut Sim, op: &Op) {
        let newest = sim.numbers().last().copied().unwrap_or(0);
        match *op {
            Op::Upgrade => {
                sim.upgrade();
            }
            Op::Stop(fast) => {
                sim.stop(fast);
            }
            Op::Ready(back) => sim.ready(newest.saturating_sub(back)),
            Op::ExitOne(i) => {
                let pids: Vec<u32> = sim.alive.keys().copied().collect();
                if !pids.is_empty() {
                    sim.exit(pids[i % pids.len()]);
                }
            }
            Op::ExitAll(back) => sim.exit_all(newest.saturating_sub(back)),
            Op::Advance(ms) => sim.advance(Duration::from_millis(ms)),
            Op::Fail(i) => {
                let pids: Vec<u32> = sim.alive.keys().copied().collect();
                if !pids.is_empty() {
                    sim.feed(Input::Notify {
                        pid: pids[i % pids.len()],
                        message: NotifyMessage {
                            status: Some("failed: boom".into()),
                            ..NotifyMessage::default()
                        },
                    });
                }
            }
            Op::PrepareFails => sim.prepare.push_back(Err("invalid config".into())),
            Op::SpawnFails(fails) => sim.spawn_fails = fails,
            Op::SelfUpgrade(then_generation) => {
                sim.self_upgrade(then_generation);
            }
            Op::ReExecFails(fails) => sim.reexec_fails = fails,
            Op::Canary(on) => sim.canary(on.then(short_canary)),
            Op::Decide(promote) => {
                sim.decide(if promote {
                    CanaryCall::Promote
                } else {
                    CanaryCall::Abort
                });
            }
            Op::Report(back, requests, errors) => {
                sim.report(newest.saturating_sub(back), requests, errors)
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(400))]

        /// Any sequence of events keeps the invariants (checked after every input by
        /// `Sim::feed`), and once the supervisor is stopped and its workers are gone,
        /// every waiter was answered exactly once and it exited once.
        #[test]
        fn random_event_sequences_keep_the_invariants(
            ops in proptest::collection::vec(op(), 1..60),
            max_generations in 2usize..5,
            processes in 1usize..3,
            canary in any::<bool>(),
        ) {
            // Half the runs judge every upgrade as a canary from the start; `Op::Canary`
            // turns it on and off along the way.
            let mut sim = Sim::build(processes, max_generations, canary.then(short_canary));
            for op in &ops {
                if !sim.exits.is_empty() {
                    break; // the supervisor exited: nothing reaches it any more
                }
                apply(&mut sim, op);
            }
            sim.spawn_fails = false;
            let stop = if sim.exits.is_empty() { Some(sim.stop(false)) } else { None };
            for _ in 0..20 {
                let pids: Vec<u32> = sim.alive.keys().copied().collect();
                for pid in pids {
                    sim.exit(pid);
                }
                sim.advance(Duration::from_secs(60));
            }
            prop_assert!(sim.alive.is_empty(), "workers left: {:?}", sim.alive);
            prop_assert_eq!(sim.exits.len(), 1);
            if let Some(stop) = stop {
                prop_assert!(sim.exits[0].0.contains(&stop));
            }
            let waiters: BTreeSet<WaiterId> = (1..=sim.next_waiter).collect();
            let stops: BTreeSet<WaiterId> = sim.exits[0].0.iter().copied().collect();
            for w in waiters.difference(&stops) {
                prop_assert_eq!(sim.answers.get(w).map(Vec::len), Some(1), "waiter {}", w);
            }
        }
    }
}

/// Reports `requests` (2xx on one route) as worker `pid`'s totals since it started.
fn report(sim: &mut Sim, pid: u32, requests: u64) {
    let mut metrics = baton_proto::WorkerMetrics::default();
    metrics.routes.insert(
        "GET /x".into(),
        baton_proto::RouteMetrics {
            classes: [0, requests, 0, 0, 0],
            buckets: vec![requests],
            sum_us: requests * 10,
        },
    );
    metrics.accepted = requests;
    sim.feed(Input::Notify {
        pid,
        message: NotifyMessage {
            metrics: Some(metrics),
            ..NotifyMessage::default()
        },
    });
}

fn total(sim: &Sim) -> u64 {
    sim.core.worker_totals().requests()
}

#[test]
fn request_totals_never_go_backwards_across_exits_restarts_drains_and_reexecs() {
    let mut sim = Sim::serving(2, 4);
    let mut seen = 0;
    let mut check = |sim: &Sim, want: u64| {
        let now = total(sim);
        assert_eq!(now, want);
        assert!(now >= seen, "the total went from {seen} to {now}");
        seen = now;
    };
    let [a, b] = sim.pids(1)[..] else { panic!() };
    report(&mut sim, a, 10);
    report(&mut sim, b, 5);
    check(&sim, 15);
    // A worker that crashes: its last report stays in the totals.
    sim.exit(a);
    check(&sim, 15);
    // Its replacement starts from zero; the total goes on from 15.
    sim.advance(RESTART_BACKOFF_FIRST);
    let c = *sim.pids(1).iter().find(|&&p| p != b).unwrap();
    sim.ready(1);
    report(&mut sim, c, 3);
    check(&sim, 18);
    assert_eq!(sim.core.totals().worker_restarts, 1);
    // An upgrade: generation 1 drains; its workers' final reports, then their exits.
    sim.upgrade();
    sim.ready(2);
    let [d, _] = sim.pids(2)[..] else { panic!() };
    report(&mut sim, d, 1);
    report(&mut sim, b, 7);
    report(&mut sim, c, 4);
    check(&sim, 22);
    sim.exit_all(1);
    assert!(sim.core.generation(1).is_none(), "generation 1 is gone");
    check(&sim, 22);
    // A supervisor re-exec hands the totals over with the core.
    let before = sim.core.totals().clone();
    sim.self_upgrade(false);
    assert_eq!(sim.reexecs, 1);
    check(&sim, 22);
    assert_eq!(sim.core.totals().exited, before.exited);
    assert_eq!(sim.core.totals().upgrades, before.upgrades);
    assert_eq!(sim.core.totals().supervisor_upgrades["succeeded"], 1);
    // And the live worker's next report counts from its own total as before.
    report(&mut sim, d, 6);
    check(&sim, 27);
    assert_eq!(sim.core.worker_totals().accepted, 27);
}

#[test]
fn upgrades_are_counted_by_outcome_with_their_duration() {
    let mut sim = Sim::serving(1, 4);
    sim.upgrade();
    sim.now += Duration::from_millis(300);
    sim.ready(2);
    let t = sim.core.totals();
    assert_eq!(t.upgrades["succeeded"], 1);
    assert_eq!(t.last_upgrade_seconds, Some(0.3));
    assert_eq!(t.last_upgrade_successful, Some(true));
    assert!(t.last_success.is_some());
    // The first generation is not an upgrade.
    assert_eq!(t.upgrade_seconds.buckets.iter().sum::<u64>(), 1);
    // Refused: nothing started.
    sim.prepare.push_back(Err("invalid config".into()));
    sim.upgrade();
    assert_eq!(sim.core.totals().upgrades["refused"], 1);
    assert_eq!(sim.core.totals().last_upgrade_successful, Some(false));
    // Rolled back: a worker of the new generation exits before READY.
    sim.upgrade();
    let pid = sim.pids(3)[0];
    sim.exit(pid);
    assert_eq!(sim.core.totals().upgrades["rolled_back"], 1);
    assert_eq!(
        sim.core
            .totals()
            .upgrade_seconds
            .buckets
            .iter()
            .sum::<u64>(),
        3
    );
}

#[test]
fn a_crash_loop_restore_is_counted_apart_from_a_rollback() {
    let mut sim = Sim::serving(1, 4);
    sim.upgrade();
    sim.ready(2);
    sim.exit_all(1);
    for _ in 0..3 {
        let pid = sim.pids(2)[0];
        sim.exit(pid);
        sim.advance(Duration::from_secs(1));
        if sim.core.generation(2).is_some_and(|g| g.pids().is_empty()) {
            sim.advance(RESTART_BACKOFF_MAX);
        }
    }
    sim.ready(3);
    let t = sim.core.totals();
    assert_eq!(t.upgrades.get("crash_loop_restored"), Some(&1));
    assert_eq!(t.upgrades.get("rolled_back"), None);
    assert_eq!(t.worker_restarts, 3);
}
