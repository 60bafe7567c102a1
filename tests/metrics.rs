//! The supervisor's Prometheus metrics, read the way a monitoring system reads them: the
//! scrape passes `promtool check metrics`, and the request counter never goes backwards
//! across generation upgrades, a worker killed with SIGKILL and the supervisor upgrading
//! itself in place, and ends equal to what the load generator counted; and a real
//! Prometheus server scraping Baton across ten upgrades and a crash sees no counter reset
//! and the same total.
#![forbid(unsafe_code)]

use baton_tests::scrape::{promtool_check, scrape, sum};
use baton_tests::{Baton, Counts, Load, LoadSpec, TestConfig, WAIT, eventually, free_port, heavy};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

fn with_metrics() -> (TestConfig, SocketAddr) {
    let port = free_port();
    let config = TestConfig {
        processes: 2,
        extra: format!("\n[metrics]\naddress = \"127.0.0.1:{port}\"\n"),
        ..TestConfig::default()
    };
    (config, ([127, 0, 0, 1], port).into())
}

fn requests(text: &str) -> f64 {
    sum(text, "baton_http_requests_total", &[]).expect("baton_http_requests_total")
}

/// Scrapes every 50 ms until stopped; returns the request totals seen in order and the
/// scrapes that failed.
fn watch(addr: SocketAddr, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(Vec<f64>, u64)> {
    tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(240);
        let (mut seen, mut failed) = (Vec::new(), 0);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match scrape(addr).await {
                Ok(text) => seen.push(requests(&text)),
                Err(_) => failed += 1,
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        (seen, failed)
    })
}

/// Waits until the scraped total equals `want` (the workers report once a second).
async fn wait_total(addr: SocketAddr, want: f64, baton: &Baton) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape(addr).await.expect("scrape");
        if requests(&text) == want {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "the scraped total stayed {} where the clients counted {want}\nlog:\n{}",
            requests(&text),
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn load_spec() -> LoadSpec {
    LoadSpec {
        keepalive: 4,
        keepalive_10: 1,
        per_request: 1,
        h2: 1,
        max_duration: Duration::from_secs(120),
        ..LoadSpec::default()
    }
}

fn ok_all(counts: &Counts, baton: &Baton) -> f64 {
    assert_eq!(
        counts.failed,
        0,
        "{:?}\nlog:\n{}",
        counts.failures,
        baton.log()
    );
    counts.ok() as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_survive_upgrades_a_killed_worker_and_a_supervisor_reexec() {
    let _heavy = heavy().await;
    let (config, metrics) = with_metrics();
    let baton = Baton::start(config).await;
    let first = scrape(metrics).await.expect("scrape");
    promtool_check(&first, baton.dir.path()).unwrap();
    assert_eq!(requests(&first), 0.0);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(metrics, stop.clone());

    // Phase 1: load across three upgrades and a supervisor re-exec.
    let load = Load::start(baton.addr(), load_spec());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = baton.upgrade_wait().await;
        assert_eq!(out.code, Some(0), "{}\nlog:\n{}", out.text(), baton.log());
    }
    let out = baton
        .cli(&["upgrade", "--supervisor", "--wait", "--timeout", "60s"])
        .await;
    assert_eq!(out.code, Some(0), "{}\nlog:\n{}", out.text(), baton.log());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut counted = ok_all(&load.stop().await, &baton);
    assert!(counted > 0.0);
    // The final reports of the drained generations and the live workers' next report.
    wait_total(metrics, counted, &baton).await;

    // A worker killed with SIGKILL sends no final report: its last one (current, the
    // load stopped over a second ago) stays in the totals, and its replacement goes on.
    let (_, pids) = baton.serving().await.expect("serving");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill a worker");
    let replaced = eventually(WAIT, || {
        let now = baton.worker_pids();
        now.len() == 2 && !now.contains(&pids[0])
    })
    .await;
    assert!(
        replaced,
        "the worker was not replaced\nlog:\n{}",
        baton.log()
    );
    baton.wait_serving(1).await;

    // Phase 2: load across two more upgrades.
    let load = Load::start(baton.addr(), load_spec());
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let out = baton.upgrade_wait().await;
        assert_eq!(out.code, Some(0), "{}\nlog:\n{}", out.text(), baton.log());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    counted += ok_all(&load.stop().await, &baton);
    let last = wait_total(metrics, counted, &baton).await;
    stop.store(true, Ordering::Relaxed);
    let (seen, failed) = watcher.await.expect("watcher");

    promtool_check(&last, baton.dir.path()).unwrap();
    assert!(seen.len() > 20, "only {} scrapes succeeded", seen.len());
    assert!(
        failed <= 2,
        "{failed} scrapes failed (only one during the re-exec may)"
    );
    for pair in seen.windows(2) {
        assert!(
            pair[1] >= pair[0],
            "the request counter went back from {} to {}",
            pair[0],
            pair[1]
        );
    }
    let get = |name: &str, labels: &[(&str, &str)]| sum(&last, name, labels).unwrap_or(-1.0);
    assert_eq!(get("baton_upgrades_total", &[("result", "succeeded")]), 5.0);
    assert_eq!(
        get(
            "baton_supervisor_upgrades_total",
            &[("result", "succeeded")]
        ),
        1.0
    );
    assert_eq!(get("baton_worker_restarts_total", &[]), 1.0);
    assert_eq!(get("baton_supervisor_reexecs", &[]), 1.0);
    assert_eq!(get("baton_last_upgrade_successful", &[]), 1.0);
    assert_eq!(get("baton_generations", &[("state", "serving")]), 1.0);
    // Every request went to the health path: its route and histogram add up.
    assert_eq!(
        get(
            "baton_http_requests_total",
            &[("route", "health"), ("status_class", "2xx")]
        ),
        counted
    );
    assert_eq!(
        get("baton_http_request_duration_seconds_count", &[]),
        counted
    );
    assert!(get("baton_http_sent_bytes_total", &[]) > counted * 50.0);
    assert!(get("baton_connections_accepted_total", &[]) >= 1.0);
    assert!(get("process_resident_memory_bytes", &[]) > 0.0);
    assert_eq!(
        sum(&last, "baton_worker_resident_memory_bytes", &[])
            .map(|_| last.matches("baton_worker_resident_memory_bytes{").count()),
        Some(2)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_upgrade_shows_in_the_metrics() {
    let (config, metrics) = with_metrics();
    let baton = Baton::start(config.clone()).await;
    // A config that does not parse: refused.
    baton.write_config("[[listener]]\nname = \"http\"\naddress = \"nope\"\n");
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    let text = scrape(metrics).await.expect("scrape");
    assert_eq!(
        sum(&text, "baton_upgrades_total", &[("result", "refused")]),
        Some(1.0)
    );
    assert_eq!(sum(&text, "baton_last_upgrade_successful", &[]), Some(0.0));
    // Back to a good config: succeeded, and the gauge says so.
    baton.write_config(&config.render());
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    let text = scrape(metrics).await.expect("scrape");
    assert_eq!(sum(&text, "baton_last_upgrade_successful", &[]), Some(1.0));
    assert_eq!(
        sum(&text, "baton_upgrades_total", &[("result", "succeeded")]),
        Some(1.0)
    );
    // Anything but /metrics is a 404; the listener is no serving listener.
    let (status, _) = baton_tests::get(metrics, "/").await.expect("get /");
    assert_eq!(status, 404);
}

/// A real Prometheus server (Debian's `prometheus`, on loopback, its data in a temporary
/// directory) scraping every second.
struct Prometheus {
    child: tokio::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("prometheus")
            .tempdir()
            .unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
                 scrape_configs:\n  - job_name: baton\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = tokio::process::Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("run /usr/bin/prometheus (apt-get install prometheus)");
        let p = Prometheus {
            child,
            port,
            _dir: dir,
        };
        let deadline = Instant::now() + WAIT;
        while p.query("up").await.is_none() {
            assert!(Instant::now() < deadline, "prometheus did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        p
    }

    /// The value of an instant query that returns one sample, if it does.
    async fn query(&self, expr: &str) -> Option<f64> {
        let mut encoded = String::new();
        for b in expr.bytes() {
            match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    encoded.push(b as char)
                }
                _ => encoded.push_str(&format!("%{b:02X}")),
            }
        }
        let addr: SocketAddr = ([127, 0, 0, 1], self.port).into();
        let (status, body) = baton_tests::get(addr, &format!("/api/v1/query?query={encoded}"))
            .await
            .ok()?;
        if status != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        let [one] = &result[..] else { return None };
        one["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_sees_no_reset_across_ten_upgrades_and_a_crash() {
    let _heavy = heavy().await;
    let (config, metrics) = with_metrics();
    let baton = Baton::start(config).await;
    let prometheus = Prometheus::start(metrics).await;
    let load = Load::start(baton.addr(), load_spec());
    for i in 0..10 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let out = baton.upgrade_wait().await;
        assert_eq!(out.code, Some(0), "upgrade {i}: {}", out.text());
    }
    let mut counted = ok_all(&load.stop().await, &baton);
    wait_total(metrics, counted, &baton).await;
    // A worker crash with nothing in flight (its last report is current).
    let (_, pids) = baton.serving().await.expect("serving");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let replaced = eventually(WAIT, || {
        let now = baton.worker_pids();
        now.len() == 2 && !now.contains(&pids[0])
    })
    .await;
    assert!(replaced, "the worker was not replaced");
    let load = Load::start(baton.addr(), load_spec());
    tokio::time::sleep(Duration::from_secs(2)).await;
    counted += ok_all(&load.stop().await, &baton);
    wait_total(metrics, counted, &baton).await;
    // Prometheus's own view, once it scraped the final figures.
    let total = "sum(baton_http_requests_total)";
    let deadline = Instant::now() + WAIT;
    while prometheus.query(total).await != Some(counted) {
        assert!(
            Instant::now() < deadline,
            "prometheus says {:?} requests, the clients counted {counted}",
            prometheus.query(total).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for counter in [
        "baton_http_requests_total",
        "baton_connections_accepted_total",
        "baton_http_sent_bytes_total",
        "baton_upgrades_total",
    ] {
        let resets = prometheus
            .query(&format!("sum(resets({counter}[10m]))"))
            .await;
        assert_eq!(resets, Some(0.0), "resets of {counter}");
    }
    assert_eq!(
        prometheus
            .query("baton_upgrades_total{result=\"succeeded\"}")
            .await,
        Some(10.0)
    );
    assert_eq!(
        prometheus.query("baton_worker_restarts_total").await,
        Some(1.0)
    );
    // The rate of requests never showed a drop to a reset: its increase is the total.
    let increase = prometheus
        .query("sum(increase(baton_http_requests_total[10m]))")
        .await
        .unwrap();
    assert!(increase > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_cut_short_counts_what_it_closed() {
    let plugins = baton_tests::traversable_tempdir("baton-plugins");
    let (config, metrics) = with_metrics();
    let baton = Baton::start(TestConfig {
        processes: 1,
        drain_timeout: "1s",
        plugins_dir: Some(baton_tests::plugin_dir(
            plugins.path(),
            "plugins",
            &["slow"],
        )),
        ..config
    })
    .await;
    // A request that outlives the old generation's drain_timeout.
    let slow = tokio::spawn(baton_tests::get(baton.addr(), "/slow/5000"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    let cut = eventually(WAIT, || baton.worker_pids().len() == 1).await;
    assert!(cut, "the old worker did not exit");
    let _ = slow.await;
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape(metrics).await.expect("scrape");
        if sum(&text, "baton_drain_connections_force_closed_total", &[]) == Some(1.0) {
            assert_eq!(sum(&text, "baton_drains_timed_out_total", &[]), Some(0.0));
            break;
        }
        assert!(Instant::now() < deadline, "not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
