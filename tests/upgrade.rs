//! Zero-downtime upgrades under concurrent load.
#![forbid(unsafe_code)]

use baton_tests::{
    Baton, Load, LoadSpec, TestConfig, WAIT, eventually, heavy, procfs, slow_start_worker_script,
};
use nix::sys::signal::Signal;
use std::collections::HashSet;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_upgrades_under_load_lose_no_request() {
    let _heavy = heavy().await;
    let baton = Baton::start(TestConfig::default()).await;
    let load = Load::start(
        baton.addr(),
        LoadSpec {
            keepalive_10: 4,
            ..LoadSpec::default()
        },
    );
    let mut seen_pids: HashSet<u32> = HashSet::new();
    let (_, first_pids) = baton.serving().await.expect("generation 1 serves");
    seen_pids.extend(&first_pids);
    // Let every client get going on generation 1 before the first upgrade.
    tokio::time::sleep(Duration::from_millis(300)).await;

    for round in 0..20 {
        let (old_gen, old_pids) = baton.serving().await.expect("a generation serves");
        let out = baton.upgrade_wait().await;
        assert_eq!(
            out.code,
            Some(0),
            "upgrade {round} failed: {}\nlog:\n{}",
            out.text(),
            baton.log()
        );
        let (new_gen, new_pids) = baton.serving().await.expect("a generation serves");
        assert!(
            new_gen > old_gen,
            "upgrade {round}: generation did not advance"
        );
        seen_pids.extend(&new_pids);
        // Old workers are gone after their drain.
        let gone = eventually(WAIT, || old_pids.iter().all(|&p| !procfs::alive(p))).await;
        assert!(
            gone,
            "upgrade {round}: old workers {old_pids:?} still alive\nlog:\n{}",
            baton.log()
        );
    }

    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = load.stop().await;
    assert_eq!(
        counts.failed,
        0,
        "failed requests across 20 upgrades: {:#?}\nlog tail:\n{}",
        counts.failures,
        tail(&baton.log())
    );
    assert!(
        counts.ok_keepalive > 0
            && counts.ok_keepalive_10 > 0
            && counts.ok_per_request > 0
            && counts.ok_h2 > 0,
        "{counts:?}"
    );
    // Responses came from workers of many generations, the first and the last among them.
    assert!(
        counts.generations.contains(&1),
        "generation 1 never answered: {:?}",
        counts.generations
    );
    assert!(
        counts.generations.contains(&21),
        "generation 21 never answered: {:?}",
        counts.generations
    );
    assert!(
        counts.pids.len() >= 4,
        "answers came from too few workers: {:?}",
        counts.pids
    );
    assert!(
        counts.pids.is_subset(&seen_pids),
        "an answer came from an unknown pid"
    );
    eprintln!(
        "20 upgrades: {} ok ({} keep-alive, {} HTTP/1.0 keep-alive, {} per-request, {} h2), \
         0 failed, {} reconnects",
        counts.ok(),
        counts.ok_keepalive,
        counts.ok_keepalive_10,
        counts.ok_per_request,
        counts.ok_h2,
        counts.reconnects
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_fifty_sigusr2_is_coalesced_and_bounded() {
    let _heavy = heavy().await;
    // Each generation takes 200 ms to start, so signals arriving meanwhile must coalesce.
    let scripts = tempfile::tempdir().expect("temp dir");
    let config = TestConfig {
        max_generations: 3,
        worker_path: Some(slow_start_worker_script(scripts.path(), "0.2")),
        ..TestConfig::default()
    };
    let baton = Baton::start(config).await;
    let load = Load::start(baton.addr(), LoadSpec::default());
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Sample the generations alive, from the kernel's view, while the burst runs.
    let sup = baton.pid;
    let sampling = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::task::spawn_blocking(move || {
            let mut most = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while sampling.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                let gens: HashSet<u64> = procfs::children(sup)
                    .into_iter()
                    .filter_map(procfs::generation_of)
                    .collect();
                most = most.max(gens.len());
                std::thread::sleep(Duration::from_millis(2));
            }
            most
        })
    };

    let started = Instant::now();
    for _ in 0..50 {
        baton.signal(Signal::SIGUSR2);
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let burst = started.elapsed();
    assert!(burst < Duration::from_secs(1), "the burst took {burst:?}");

    let status = baton.wait_settled().await;
    sampling.store(false, std::sync::atomic::Ordering::Relaxed);
    let most = sampler.await.expect("sampler");
    let counts = load.stop().await;

    assert!(
        most <= 3,
        "{most} generations were alive at once (max_generations = 3)"
    );
    assert_eq!(
        counts.failed,
        0,
        "failed requests: {:#?}\nlog tail:\n{}",
        counts.failures,
        tail(&baton.log())
    );
    assert_eq!(
        status["generations"].as_array().map(Vec::len),
        Some(1),
        "{status:#}"
    );
    let last = status["generations"][0]["number"].as_u64().unwrap();
    // Coalesced: one start at a time, one follow-up for everything that arrived during
    // it. A 750 ms burst over 200 ms starts makes at most about 6 generations, not 50.
    assert!(
        (2..=8).contains(&last),
        "50 signals made {last} generations: {status:#}"
    );
    eprintln!(
        "50 SIGUSR2: {last} generations, at most {most} alive, {} ok",
        counts.ok()
    );
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(150)..].join("\n")
}

/// Runs tests/harness/h2_clients.py (httpx with Python's h2) against `url`: `clients`
/// clients, `rounds` requests each, `pause` seconds apart. Its JSON report.
async fn httpx_clients(url: &str, clients: u32, rounds: u32, pause: f64) -> serde_json::Value {
    let python = baton_tests::python_with("h2", &["httpx[http2]"], "httpx, h2");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/harness/h2_clients.py");
    let run = tokio::process::Command::new(python)
        .args([
            script,
            url,
            &clients.to_string(),
            &rounds.to_string(),
            &pause.to_string(),
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the clients end within 60 s")
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpx_http2_clients_lose_nothing_across_upgrades_whether_idle_or_busy() {
    // httpx (Python's h2) takes a PING after a GOAWAY for an error, which is what h2's
    // graceful shutdown sends: connections at rest (most of these, between requests) get
    // one GOAWAY of their own instead. Short pauses keep some busy at each upgrade too.
    let _heavy = heavy().await;
    let baton = Baton::start(TestConfig {
        extra: "[http]\nheader_read_timeout = \"400ms\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let url = format!("http://{}/_baton/health", baton.addr());
    for (pause, rounds) in [(0.6, 8), (0.05, 60)] {
        let clients = httpx_clients(&url, 24, rounds, pause);
        let upgrades = async {
            for _ in 0..2 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let out = baton.upgrade_wait().await;
                assert_eq!(out.code, Some(0), "{out:?}");
            }
        };
        let (report, ()) = tokio::join!(clients, upgrades);
        assert_eq!(report["error_count"], 0, "pause {pause}: {report}");
        assert_eq!(report["answers"], 24 * rounds, "pause {pause}: {report}");
        assert_eq!(
            report["versions"],
            serde_json::json!(["HTTP/2"]),
            "{report}"
        );
        assert_eq!(report["statuses"], serde_json::json!([200]), "{report}");
    }
}
