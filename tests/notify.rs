//! The exact sd_notify sequence the supervisor sends, caught on a datagram socket the
//! test binds as NOTIFY_SOCKET: start, upgrade, rolled-back upgrade, watchdog, stop with a
//! long drain. Workers never see this socket or WATCHDOG_*.
#![forbid(unsafe_code)]

use baton_tests::{Baton, TestConfig, WAIT, fake_worker_script, get, heavy, plugin_dir, procfs};
use nix::sys::signal::Signal;
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Datagrams received, with when.
#[derive(Clone, Default)]
struct Recorder {
    messages: Arc<Mutex<Vec<(Instant, String)>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    fn bind(path: &std::path::Path) -> Recorder {
        let socket = UnixDatagram::bind(path).expect("bind the fake notify socket");
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let recorder = Recorder::default();
        let r = recorder.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let deadline = Instant::now() + Duration::from_secs(120);
            while !r.stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(n) = socket.recv(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    r.messages.lock().unwrap().push((Instant::now(), text));
                }
            }
        });
        recorder
    }

    fn all(&self) -> Vec<(Instant, String)> {
        self.messages.lock().unwrap().clone()
    }

    /// The datagrams that change the service's state, in order.
    fn states(&self) -> Vec<String> {
        self.all()
            .into_iter()
            .map(|(_, m)| m)
            .filter(|m| {
                m.contains("READY=1") || m.contains("RELOADING=1") || m.contains("STOPPING=1")
            })
            .collect()
    }

    fn watchdogs(&self) -> Vec<Instant> {
        self.all()
            .into_iter()
            .filter(|(_, m)| m.trim_end() == "WATCHDOG=1")
            .map(|(t, _)| t)
            .collect()
    }
}

fn field<'a>(datagram: &'a str, key: &str) -> Option<&'a str> {
    datagram
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_supervisor_sends_the_systemd_sequence() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let notify_path = tmp.path().join("notify.sock");
    let recorder = Recorder::bind(&notify_path);
    let plugins = plugin_dir(tmp.path(), "plugins", &["slow"]);
    let base = TestConfig {
        plugins_dir: Some(plugins),
        ready_timeout: "2s",
        ..TestConfig::default()
    };
    let mut baton = Baton::spawn(
        base.clone(),
        &[
            ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .await;
    baton.wait_serving(1).await;

    // Start: READY=1 with a STATUS= once generation 1 serves.
    let states = recorder.states();
    assert_eq!(states.len(), 1, "{states:#?}");
    assert!(
        field(&states[0], "STATUS").is_some_and(|s| s.contains("generation 1 serving")),
        "{states:#?}"
    );

    // Workers get the supervisor's notify socket, never systemd's, and no WATCHDOG_*.
    for pid in baton.worker_pids() {
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let env = String::from_utf8_lossy(&env);
        let vars: Vec<&str> = env.split('\0').collect();
        let notify = vars
            .iter()
            .find_map(|v| v.strip_prefix("NOTIFY_SOCKET="))
            .unwrap();
        assert_ne!(
            notify,
            notify_path.to_str().unwrap(),
            "a worker got systemd's NOTIFY_SOCKET"
        );
        assert!(
            vars.iter().all(|v| !v.starts_with("WATCHDOG_")),
            "a worker got WATCHDOG_*: {vars:?}"
        );
    }

    // Upgrade: RELOADING=1 and MONOTONIC_USEC in one datagram, then READY=1.
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    // Rolled-back upgrade: RELOADING=1 + MONOTONIC_USEC, then READY=1 saying what failed.
    let failing = TestConfig {
        worker_path: Some(fake_worker_script(tmp.path(), "exit")),
        ..base.clone()
    };
    baton.write_config(&failing.render());
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    baton.write_config(&base.render());

    // Watchdog: WATCHDOG=1 every 200 ms (half of WATCHDOG_USEC) while the loop runs, and
    // none while it is stopped.
    tokio::time::sleep(Duration::from_millis(600)).await;
    baton.signal(Signal::SIGSTOP);
    let stopped_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let resumed_at = Instant::now();
    baton.signal(Signal::SIGCONT);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let pings = recorder.watchdogs();
    assert!(
        pings.len() >= 8,
        "only {} WATCHDOG=1 datagrams",
        pings.len()
    );
    let during_stop = pings
        .iter()
        .filter(|&&t| t > stopped_at + Duration::from_millis(50) && t < resumed_at)
        .count();
    assert_eq!(
        during_stop, 0,
        "WATCHDOG=1 sent while the supervisor was stopped"
    );
    assert!(
        pings.iter().any(|&t| t > resumed_at),
        "no WATCHDOG=1 after SIGCONT"
    );

    // Stop with a long drain: STOPPING=1 with EXTEND_TIMEOUT_USEC, extended again while
    // a 5 s request is still being answered.
    let addr = baton.addr();
    let slow = tokio::spawn(async move { get(addr, "/slow/5000").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop_started = Instant::now();
    baton.signal(Signal::SIGTERM);
    let (code, body) = slow.await.unwrap().unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(baton.wait_exit(WAIT).await, Some(0));
    recorder.stop.store(true, Ordering::Relaxed);

    let states = recorder.states();
    let kinds: Vec<&str> = states
        .iter()
        .map(|m| {
            if m.contains("RELOADING=1") {
                "RELOADING"
            } else if m.contains("STOPPING=1") {
                "STOPPING"
            } else {
                "READY"
            }
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "READY",
            "RELOADING",
            "READY",
            "RELOADING",
            "READY",
            "STOPPING"
        ],
        "{states:#?}"
    );
    for reloading in [&states[1], &states[3]] {
        let usec = field(reloading, "MONOTONIC_USEC").expect("MONOTONIC_USEC with RELOADING=1");
        assert!(usec.parse::<u64>().unwrap() > 0);
        assert!(field(reloading, "STATUS").is_some(), "{reloading}");
    }
    assert!(
        !field(&states[2], "STATUS").unwrap().contains("failed"),
        "{}",
        states[2]
    );
    let failed = field(&states[4], "STATUS").unwrap();
    assert!(
        failed.contains("last upgrade failed")
            && failed.contains("exited (exit status: 3) before READY"),
        "{failed}"
    );
    let stopping = &states[5];
    assert_eq!(
        field(stopping, "EXTEND_TIMEOUT_USEC"),
        Some("6000000"),
        "{stopping}"
    );
    assert!(
        field(stopping, "STATUS").is_some_and(|s| s.starts_with("stopping")),
        "{stopping}"
    );
    let extensions: Vec<_> = recorder
        .all()
        .into_iter()
        .filter(|(t, m)| {
            *t > stop_started && m.contains("EXTEND_TIMEOUT_USEC=") && !m.contains("STOPPING=1")
        })
        .collect();
    assert!(
        extensions.len() >= 2,
        "the stop timeout was not extended during a 5 s drain: {extensions:#?}"
    );
    // Every datagram is one the protocol knows.
    for (_, m) in recorder.all() {
        for line in m.lines() {
            let key = line.split('=').next().unwrap();
            assert!(
                [
                    "READY",
                    "RELOADING",
                    "MONOTONIC_USEC",
                    "STOPPING",
                    "STATUS",
                    "WATCHDOG",
                    "EXTEND_TIMEOUT_USEC",
                    "FDSTORE",
                    "FDSTOREREMOVE",
                    "FDNAME"
                ]
                .contains(&key),
                "unexpected notify line {line:?}"
            );
        }
    }
    assert!(baton.worker_pids().iter().all(|&p| !procfs::alive(p)));
}
