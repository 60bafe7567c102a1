//! Canary upgrades (`[upgrade] canary`): the new generation serves beside the old one for
//! the window and is promoted or rolled back by its error ratio, with the decision in
//! `baton upgrade --wait`, `baton status` and the log. The releases are the `faulty` test
//! plugin's `/faulty/flaky` route, which answers 500 on the share `error_ratio` of its
//! requests (and exits its worker `exit_after_ms` after start, when asked).
#![forbid(unsafe_code)]

use baton_tests::{Baton, Load, LoadSpec, TestConfig, WAIT, heavy, plugin_dir};
use nix::sys::signal::Signal;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// A config whose `faulty` plugin answers 500 on `error_ratio` of `/faulty/flaky` (and
/// whose workers exit `exit_after_ms` after start), judged by a `canary` window.
fn release(dir: &Path, canary: &str, faulty: &str) -> TestConfig {
    TestConfig {
        plugins_dir: Some(dir.to_owned()),
        extra: format!(
            "[upgrade]\ncanary = \"{canary}\"\ncanary_min_requests = 100\n\
             canary_max_error_ratio_increase = 0.01\n\
             [plugins.settings.faulty]\n{faulty}\n"
        ),
        ..TestConfig::default()
    }
}

/// Load on `/faulty/flaky` that counts the 500s apart from failed requests.
fn flaky_load(keepalive: usize, per_request: usize, h2: usize) -> LoadSpec {
    LoadSpec {
        keepalive,
        per_request,
        h2,
        path: "/faulty/flaky".into(),
        max_duration: Duration::from_secs(120),
        server_errors_apart: true,
        ..LoadSpec::default()
    }
}

/// Polls the status until generation `n` is the canary; returns that status.
async fn wait_canary(baton: &Baton, n: u64) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = baton.status().await;
        let canary = s["generations"].as_array().and_then(|gs| {
            gs.iter()
                .find(|g| g["number"] == n && g["state"] == "canary")
        });
        if canary.is_some() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "generation {n} never became the canary: {s:#}\nlog:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn generation(status: &Value, n: u64) -> Option<&Value> {
    status["generations"]
        .as_array()?
        .iter()
        .find(|g| g["number"] == n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_answering_500_on_30_percent_is_rolled_back_within_the_window() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["faulty"]);
    let good = release(&dir, "3s", "error_ratio = 0.0");
    let baton = Baton::start(good.clone()).await;
    let load = Load::start(baton.addr(), flaky_load(8, 4, 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, pids) = baton.serving().await.expect("generation 1 serves");

    baton.write_config(
        &TestConfig {
            port: good.port,
            ..release(&dir, "3s", "error_ratio = 0.3")
        }
        .render(),
    );
    let began = Instant::now();
    let cli = {
        let config = baton.config_path.clone();
        tokio::spawn(async move {
            baton_tests::run_cli(&["upgrade", "--wait", "--timeout", "60s"], &config).await
        })
    };
    // During the window both serve, and the status shows the canary's figures.
    let during = wait_canary(&baton, 2).await;
    assert_eq!(generation(&during, 1).unwrap()["state"], "serving");
    let info = &generation(&during, 2).unwrap()["canary"];
    assert_eq!(info["baseline"]["generation"], 1, "{during:#}");
    assert!(info["ends_in_ms"].as_u64().unwrap() <= 3000, "{info:#}");
    let out = cli.await.unwrap();
    let took = began.elapsed();
    assert_eq!(out.code, Some(1), "{}\nlog:\n{}", out.text(), baton.log());
    assert!(
        out.text()
            .contains("generation 2 was rolled back: canary: error ratio"),
        "{}",
        out.text()
    );
    assert!(
        took < Duration::from_secs(3) + Duration::from_secs(5),
        "decided after {took:?}"
    );
    // The old generation never stopped serving; the canary drains away.
    assert_eq!(baton.serving().await, Some((1, pids)));
    let status = baton.wait_settled().await;
    let last = &status["last_upgrade"];
    assert_eq!(last["result"], "rolled_back", "{status:#}");
    let verdict = &last["canary"];
    assert_eq!(verdict["decision"], "rolled_back");
    assert_eq!(verdict["decided_by"], "error_ratio");
    let canary_ratio = verdict["canary"]["error_ratio"].as_f64().unwrap();
    let baseline_ratio = verdict["baseline"]["error_ratio"].as_f64().unwrap();
    assert!(
        (0.25..0.35).contains(&canary_ratio),
        "the canary's ratio: {verdict:#}"
    );
    assert_eq!(baseline_ratio, 0.0, "{verdict:#}");
    assert!(
        baton.log().contains("rolled back"),
        "the log lacks the rollback"
    );

    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = load.stop().await;
    eprintln!(
        "30% release: window {} ms; canary {:#}; baseline {:#}; clients saw {:?}",
        verdict["window_ms"], verdict["canary"], verdict["baseline"], counts.by_generation
    );
    // No request failed because of the canary or its rollback: only its own 500s.
    assert_eq!(counts.failed, 0, "failed requests: {:#?}", counts.failures);
    let by = &counts.by_generation;
    assert_eq!(by.get(&1).map_or(0, |g| g.server_errors), 0, "{by:?}");
    let canary = by.get(&2).copied().unwrap_or_default();
    assert!(canary.server_errors > 0 && canary.ok > 0, "{by:?}");
    assert_eq!(counts.server_errors, canary.server_errors);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_release_is_promoted_and_both_generations_accept_during_the_window() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["faulty"]);
    let config = release(&dir, "4s", "error_ratio = 0.0");
    let baton = Baton::start(config).await;
    // Keep-alive connections opened before the upgrade stay with generation 1.
    let background = Load::start(baton.addr(), flaky_load(4, 0, 0));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cli = {
        let config = baton.config_path.clone();
        tokio::spawn(async move {
            baton_tests::run_cli(&["upgrade", "--wait", "--timeout", "60s"], &config).await
        })
    };
    wait_canary(&baton, 2).await;
    // New connections during the window: each takes whichever generation's worker the
    // shared accept queue hands it to.
    let fresh = Load::start(baton.addr(), flaky_load(0, 4, 0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fresh = fresh.stop().await;
    let during = baton.status().await;
    assert_eq!(
        generation(&during, 2).map(|g| g["state"].clone()),
        Some("canary".into()),
        "the window was still running: {during:#}"
    );
    let out = cli.await.unwrap();
    assert_eq!(out.code, Some(0), "{}\nlog:\n{}", out.text(), baton.log());
    assert!(
        out.text()
            .contains("upgrade succeeded: canary: error ratio"),
        "{}",
        out.text()
    );
    let status = baton.wait_settled().await;
    assert_eq!(status["generations"][0]["number"], 2, "{status:#}");
    let verdict = &status["last_upgrade"]["canary"];
    assert_eq!(verdict["decision"], "promoted", "{status:#}");
    let counts = background.stop().await;
    let (new, old) = (
        fresh.by_generation.get(&2).copied().unwrap_or_default(),
        fresh.by_generation.get(&1).copied().unwrap_or_default(),
    );
    eprintln!(
        "accept-queue share during the window: generation 2 (canary) {} connection(s), generation 1 {} ({:.1}% to the canary); window figures: canary {:#}, baseline {:#}",
        new.connections,
        old.connections,
        100.0 * new.connections as f64 / (new.connections + old.connections).max(1) as f64,
        verdict["canary"],
        verdict["baseline"]
    );
    assert!(
        new.connections > 0 && old.connections > 0,
        "both generations accept during the window: {:?}",
        fresh.by_generation
    );
    assert_eq!(
        fresh.failed + counts.failed,
        0,
        "{:#?} {:#?}",
        fresh.failures,
        counts.failures
    );
    assert_eq!(fresh.server_errors + counts.server_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_whose_workers_crash_is_rolled_back_before_the_window_ends() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["faulty"]);
    let good = release(&dir, "20s", "error_ratio = 0.0");
    let baton = Baton::start(good.clone()).await;
    let (_, pids) = baton.serving().await.expect("generation 1 serves");
    baton.write_config(
        &TestConfig {
            port: good.port,
            ..release(&dir, "20s", "exit_after_ms = 500")
        }
        .render(),
    );
    let began = Instant::now();
    let out = baton.upgrade_wait().await;
    let took = began.elapsed();
    assert_eq!(out.code, Some(1), "{}\nlog:\n{}", out.text(), baton.log());
    assert!(out.text().contains("canary: "), "{}", out.text());
    assert!(
        out.text().contains("exited") || out.text().contains("worker exit(s)"),
        "{}",
        out.text()
    );
    assert!(took < Duration::from_secs(15), "not early: {took:?}");
    assert_eq!(baton.serving().await, Some((1, pids)));
    let status = baton.wait_settled().await;
    assert_eq!(
        status["last_upgrade"]["canary"]["decided_by"], "crashed",
        "{status:#}"
    );
    assert!(
        status["last_upgrade"]["canary"]["canary"]["exits"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert!(baton.log().contains("while serving as the canary"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_during_a_canary_are_coalesced_and_decisions_by_hand_work() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["faulty"]);
    let baton = Baton::start(release(&dir, "3s", "error_ratio = 0.0")).await;
    // Without a canary, --promote and --abort are refused.
    let out = baton.cli(&["upgrade", "--promote"]).await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.text().contains("no canary is running"),
        "{}",
        out.text()
    );

    let load = Load::start(baton.addr(), flaky_load(4, 2, 1));
    let cli = {
        let config = baton.config_path.clone();
        tokio::spawn(async move {
            baton_tests::run_cli(&["upgrade", "--wait", "--timeout", "60s"], &config).await
        })
    };
    wait_canary(&baton, 2).await;
    // A storm during the window: one follow-up, not ten generations.
    for i in 0..10 {
        if i % 2 == 0 {
            baton.signal(Signal::SIGUSR2);
        } else {
            let out = baton.cli(&["upgrade"]).await;
            assert_eq!(out.code, Some(0), "{}", out.text());
        }
    }
    let s = baton.status().await;
    assert_eq!(s["supervisor"]["upgrade_pending"], true, "{s:#}");
    assert_eq!(s["generations"].as_array().unwrap().len(), 2, "{s:#}");
    let out = cli.await.unwrap();
    assert_eq!(out.code, Some(0), "{}\nlog:\n{}", out.text(), baton.log());
    // The follow-up is generation 3, itself a canary beside generation 2: abort it.
    wait_canary(&baton, 3).await;
    let out = baton.cli(&["upgrade", "--abort"]).await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(
        out.text()
            .contains("canary aborted by hand (control socket)"),
        "{}",
        out.text()
    );
    let status = baton.wait_settled().await;
    assert_eq!(status["generations"][0]["number"], 2, "{status:#}");
    assert_eq!(status["last_upgrade"]["result"], "rolled_back");
    assert_eq!(status["last_upgrade"]["canary"]["decided_by"], "operator");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "{:#?}", counts.failures);
    assert_eq!(counts.server_errors, 0);
    assert!(
        counts.generations.iter().all(|&g| g <= 3),
        "{:?}",
        counts.generations
    );
}
