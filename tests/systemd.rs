//! Baton's unit files under a real systemd (252 from Debian 12 and 254 from
//! bookworm-backports), booted per test by the repository's systemd harness: start, reload
//! under load, a failed reload, stop with a request in flight, the watchdog, the
//! notify-reload alternative, a `kill -9` of the supervisor that the fd store rides out,
//! and the supervisor upgrading itself in place on `systemctl reload` after its binary was
//! replaced. Needs root; skips with the reason where it cannot run.
#![forbid(unsafe_code)]

use baton_tests::sdh::{Instance, skip_reason, text};
use baton_tests::{Load, LoadSpec, WAIT, get, heavy, run_cli};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn skip() -> bool {
    match skip_reason() {
        Some(reason) => {
            eprintln!("skipping the real-systemd test: {reason}");
            true
        }
        None => false,
    }
}

/// Serving generation number and its pids, from `baton status` (pids as the namespace
/// sees them).
async fn serving(instance: &Instance) -> Option<(u64, Vec<u64>, u64)> {
    let out = run_cli(&["status", "--json"], &instance.config).await;
    let status: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
    let g = status["generations"]
        .as_array()?
        .iter()
        .find(|g| g["state"] == "serving")?
        .clone();
    Some((
        g["number"].as_u64()?,
        g["pids"]
            .as_array()?
            .iter()
            .filter_map(|p| p.as_u64())
            .collect(),
        status["supervisor"]["pid"].as_u64()?,
    ))
}

async fn run_service_checks(version: &'static str) {
    let _heavy = heavy().await;
    let mut sd = Instance::prepare(&format!("baton-it-{version}"), version, false);
    sd.up().await;

    // systemctl start goes active only after READY: each generation takes 1.5 s.
    let start = {
        let name = sd.name.clone();
        tokio::spawn(async move {
            let sdh = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd-harness/sdh");
            tokio::process::Command::new(sdh)
                .args([
                    "exec",
                    "--name",
                    &name,
                    "--",
                    "systemctl",
                    "start",
                    "baton.service",
                ])
                .output()
                .await
                .unwrap()
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        sd.property("ActiveState").await,
        "activating",
        "active before READY"
    );
    assert!(
        !start.is_finished(),
        "systemctl start returned before READY"
    );
    let out = start.await.unwrap();
    assert!(
        out.status.success(),
        "start: {}\n{}",
        text(&out),
        sd.journal().await
    );
    assert_eq!(sd.property("ActiveState").await, "active");
    let (code, body) = get(sd.addr(), "/hello").await.unwrap();
    assert_eq!((code, body.contains("generation 1")), (200, true), "{body}");
    let status = sd.property("StatusText").await;
    assert!(status.contains("generation 1 serving"), "{status}");

    // systemctl reload under load returns when the new generation serves; nothing fails.
    let load = Load::start(
        sd.addr(),
        LoadSpec {
            path: "/hello".into(),
            keepalive: 8,
            ..LoadSpec::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let reload_started = Instant::now();
    let out = sd.systemctl(&["reload", "baton.service"]).await;
    let took = reload_started.elapsed();
    assert!(
        out.status.success(),
        "reload: {}\n{}",
        text(&out),
        sd.journal().await
    );
    let (generation, _, _) = serving(&sd).await.expect("a generation serves");
    assert_eq!(
        generation, 2,
        "systemctl reload returned before generation 2 served"
    );
    assert!(
        took >= Duration::from_millis(1400),
        "reload returned after {took:?}, before the worker could be ready"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = load.stop().await;
    assert_eq!(
        counts.failed, 0,
        "failed requests during reload: {:#?}",
        counts.failures
    );
    assert!(counts.ok() > 0);

    // A reload whose generation fails makes systemctl reload fail; the service stays
    // active and serving, and systemctl status says why.
    sd.write_config("failing-worker");
    let out = sd.systemctl(&["reload", "baton.service"]).await;
    assert!(
        !out.status.success(),
        "a failed upgrade was reported as a successful reload"
    );
    assert_eq!(sd.property("ActiveState").await, "active");
    let out = sd.systemctl(&["status", "baton.service"]).await;
    let status = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.contains("last upgrade failed")
            && status.contains("exited (exit status: 3) before READY"),
        "{status}"
    );
    let (code, body) = get(sd.addr(), "/hello").await.unwrap();
    assert_eq!((code, body.contains("generation 2")), (200, true), "{body}");
    sd.write_config("baton-worker");

    // systemctl stop with a request in flight: the request completes.
    let addr = sd.addr();
    let slow = tokio::spawn(async move { get(addr, "/slow/2000").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = sd.systemctl(&["stop", "baton.service"]).await;
    assert!(out.status.success(), "stop: {}", text(&out));
    let (code, body) = slow.await.unwrap().unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(sd.property("ActiveState").await, "inactive");
    assert_eq!(sd.property("Result").await, "success");

    // A hung supervisor is killed by the watchdog and restarted; connections that queued
    // on the socket-activated listeners meanwhile are served by the new one.
    let out = sd.systemctl(&["start", "baton.service"]).await;
    assert!(out.status.success(), "start: {}", text(&out));
    let (_, pids, supervisor) = serving(&sd).await.expect("serving");
    let mut stop = vec![
        "kill".to_owned(),
        "-STOP".to_owned(),
        supervisor.to_string(),
    ];
    stop.extend(pids.iter().map(|p| p.to_string()));
    let stop: Vec<&str> = stop.iter().map(String::as_str).collect();
    let out = sd.exec(&stop).await;
    assert!(out.status.success(), "kill -STOP: {}", text(&out));
    let mut queued = Vec::new();
    for _ in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(sd.addr())
            .await
            .expect("the socket accepts while hung");
        conn.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        queued.push(conn);
    }
    for mut conn in queued {
        let mut response = String::new();
        tokio::time::timeout(Duration::from_secs(30), conn.read_to_string(&mut response))
            .await
            .expect("a queued connection was never answered")
            .unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "{response}\n{}",
            sd.journal().await
        );
        assert!(
            response.contains("generation 1"),
            "not served by a restarted supervisor: {response}"
        );
    }
    let restarts: u32 = sd.property("NRestarts").await.parse().unwrap();
    assert!(restarts >= 1, "not restarted");
    let journal = sd.journal().await;
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    let (_, _, new_supervisor) = serving(&sd).await.expect("serving after the restart");
    assert_ne!(new_supervisor, supervisor);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_under_systemd_252() {
    if !skip() {
        run_service_checks("252").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_under_systemd_254() {
    if !skip() {
        run_service_checks("254").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reload_blocks_until_the_new_generation_serves_on_254() {
    if skip() {
        return;
    }
    let _heavy = heavy().await;
    let mut sd = Instance::prepare("baton-it-reload", "254", true);
    sd.up().await;
    let out = sd.systemctl(&["start", "baton.service"]).await;
    assert!(
        out.status.success(),
        "start: {}\n{}",
        text(&out),
        sd.journal().await
    );
    assert_eq!(sd.property("Type").await, "notify-reload");
    let started = Instant::now();
    let out = sd.systemctl(&["reload", "baton.service"]).await;
    let took = started.elapsed();
    assert!(
        out.status.success(),
        "reload: {}\n{}",
        text(&out),
        sd.journal().await
    );
    assert!(
        took >= Duration::from_millis(1400),
        "reload returned after {took:?}"
    );
    let (generation, _, _) = serving(&sd).await.expect("serving");
    assert_eq!(generation, 2, "reload returned before generation 2 served");
    let deadline = Instant::now() + WAIT;
    while sd.property("ActiveState").await != "active" {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `systemd-analyze` of a given version: the host's (252) or the fetched 254.
async fn analyze(version: &str, args: &[&str], dir: &std::path::Path) -> std::process::Output {
    let mut cmd = if version == "252" {
        tokio::process::Command::new("systemd-analyze")
    } else {
        let root = std::path::Path::new("/var/cache/sdh/systemd254");
        let lib = std::fs::read_dir(root.join("usr/lib"))
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| p.join("systemd").join("libsystemd-shared-254.so").exists())
            .expect("the 254 tree's library directory");
        let mut cmd = tokio::process::Command::new(root.join("usr/bin/systemd-analyze"));
        cmd.env(
            "LD_LIBRARY_PATH",
            format!("{}:{}", lib.join("systemd").display(), lib.display()),
        );
        cmd
    };
    cmd.args(args)
        .current_dir(dir)
        .output()
        .await
        .expect("run systemd-analyze")
}

#[tokio::test]
async fn the_unit_files_verify_cleanly_and_rate_ok() {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bins = baton_tests::bins();
    let dir = tempfile::tempdir().unwrap();
    // Only the binaries' paths change (verify checks that ExecStart= exists).
    let service = std::fs::read_to_string(repo.join("systemd/baton.service"))
        .unwrap()
        .replace("/usr/local/bin/baton-worker", bins.worker.to_str().unwrap())
        .replace("/usr/local/bin/baton", bins.baton.to_str().unwrap());
    std::fs::write(dir.path().join("baton.service"), &service).unwrap();
    std::fs::copy(
        repo.join("systemd/baton.socket"),
        dir.path().join("baton.socket"),
    )
    .unwrap();
    // The notify-reload alternative, as systemd sees the unit with the drop-in applied.
    let alt = dir.path().join("alt");
    std::fs::create_dir(&alt).unwrap();
    let dropin = std::fs::read_to_string(repo.join("systemd/notify-reload.conf")).unwrap();
    std::fs::write(alt.join("baton.service"), format!("{service}\n{dropin}")).unwrap();
    std::fs::copy(repo.join("systemd/baton.socket"), alt.join("baton.socket")).unwrap();
    // fdstore-preserve.conf, likewise: a drop-in because 252 does not know the key.
    let preserve = dir.path().join("preserve");
    std::fs::create_dir(&preserve).unwrap();
    let dropin = std::fs::read_to_string(repo.join("systemd/fdstore-preserve.conf")).unwrap();
    std::fs::write(
        preserve.join("baton.service"),
        format!("{service}\n{dropin}"),
    )
    .unwrap();

    let mut versions = vec!["252"];
    if nix::unistd::geteuid().is_root() {
        let sdh = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd-harness/sdh");
        let out = tokio::process::Command::new(sdh)
            .arg("fetch-254")
            .output()
            .await
            .unwrap();
        assert!(out.status.success(), "sdh fetch-254: {}", text(&out));
        versions.push("254");
    } else {
        eprintln!("checking the units on systemd 252 only: fetching 254 needs root");
    }
    for version in versions {
        let out = analyze(
            version,
            &["verify", "./baton.socket", "./baton.service"],
            dir.path(),
        )
        .await;
        assert!(
            out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
            "systemd {version} verify: {}",
            text(&out)
        );
        let out = analyze(
            version,
            &["security", "--offline=true", "./baton.service"],
            dir.path(),
        )
        .await;
        let report = String::from_utf8_lossy(&out.stdout);
        let verdict = report.lines().last().unwrap_or_default();
        assert!(
            verdict.contains("Overall exposure level")
                && (verdict.contains(" OK") || verdict.contains("SAFE")),
            "systemd {version} security: {verdict}"
        );
        eprintln!("systemd {version}: {verdict}");
        let out = analyze(version, &["verify", "./baton.service"], &preserve).await;
        if version == "254" {
            assert!(
                out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
                "systemd 254 verify with fdstore-preserve.conf: {}",
                text(&out)
            );
            let out = analyze(
                version,
                &["verify", "./baton.socket", "./baton.service"],
                &alt,
            )
            .await;
            assert!(
                out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
                "systemd 254 verify with notify-reload.conf: {}",
                text(&out)
            );
        } else {
            // What fdstore-preserve.conf's comment says of 252.
            assert!(
                String::from_utf8_lossy(&out.stderr)
                    .contains("Unknown key 'FileDescriptorStorePreserve'"),
                "systemd 252 verify with fdstore-preserve.conf: {}",
                text(&out)
            );
        }
    }
}

/// How one connection of the crash test ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Outcome {
    Answered,
    Refused,
    ConnectTimeout,
    ConnectError,
    Reset,
    /// Closed without an answer (the worker that accepted it was killed).
    Empty,
    NotOk,
    Timeout,
    /// Another error while sending or reading.
    Broken,
}

/// One connection: connect, one GET with `Connection: close`, read the whole answer.
async fn one_connection(addr: std::net::SocketAddr) -> Outcome {
    use std::io::ErrorKind;
    const LIMIT: Duration = Duration::from_secs(20);
    let mut conn = match tokio::time::timeout(LIMIT, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => return Outcome::ConnectTimeout,
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => return Outcome::Refused,
        Ok(Err(_)) => return Outcome::ConnectError,
        Ok(Ok(conn)) => conn,
    };
    let exchange = async {
        conn.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = Vec::new();
        conn.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(response)
    };
    match tokio::time::timeout(LIMIT, exchange).await {
        Err(_) => Outcome::Timeout,
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionReset => Outcome::Reset,
        Ok(Err(_)) => Outcome::Broken,
        Ok(Ok(r)) if r.is_empty() => Outcome::Empty,
        Ok(Ok(r)) if r.starts_with(b"HTTP/1.1 200") => Outcome::Answered,
        Ok(Ok(_)) => Outcome::NotOk,
    }
}

/// The inodes of the sockets listening on 127.0.0.1:`port`, from `/proc/net/tcp` (the
/// instance shares the host's network namespace).
fn listening_inodes(port: u16) -> Vec<u64> {
    const LISTEN: &str = "0A";
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 9 && f[1] == local && f[3] == LISTEN)
        .map(|f| f[9].parse().unwrap())
        .collect()
}

/// `socket:[INODE]` links among the fds of `pid` (a pid in the instance).
async fn socket_fds(sd: &Instance, pid: &str) -> String {
    let out = sd
        .exec(&["sh", "-c", &format!("readlink /proc/{pid}/fd/*")])
        .await;
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Under systemd with `FileDescriptorStoreMax=` and no socket unit: `kill -9` the
/// supervisor while a client keeps opening connections. systemd restarts it
/// (`Restart=on-failure`) and hands it the same listening socket from its fd store;
/// no connection is refused, and those that queued meanwhile are answered.
async fn crash_restart_from_the_fd_store(version: &'static str) {
    let _heavy = heavy().await;
    let mut sd = Instance::prepare(&format!("baton-fdstore-{version}"), version, false);
    sd.without_socket_unit();
    sd.write_config("baton-worker");
    // After test.conf (RestartSec=500ms): restart quickly.
    sd.drop_in("z-restart.conf", "[Service]\nRestartSec=100ms\n");
    let preserve = version == "254";
    if preserve {
        std::fs::copy(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../systemd/fdstore-preserve.conf"),
            sd.units.join("baton.service.d/fdstore-preserve.conf"),
        )
        .unwrap();
    }
    // sdh.target wants baton.service, as multi-user.target does once it is enabled: it
    // starts at boot and stays loaded while stopped.
    sd.up().await;
    let out = sd.systemctl(&["start", "baton.service"]).await;
    assert!(
        out.status.success(),
        "start: {}\n{}",
        text(&out),
        sd.journal().await
    );
    assert_eq!(sd.property("FileDescriptorStoreMax").await, "64");
    assert_eq!(sd.property("NFileDescriptorStore").await, "1");
    let (code, _) = get(sd.addr(), "/hello").await.unwrap();
    assert_eq!(code, 200);
    let journal = sd.journal().await;
    assert!(
        journal.contains("listener \"http\": bound")
            && journal.contains("kept in systemd's fd store"),
        "{journal}"
    );
    let inodes = listening_inodes(sd.port);
    assert_eq!(inodes.len(), 1, "listening sockets on the port: {inodes:?}");
    let inode = inodes[0];
    let main_pid = sd.property("MainPID").await;
    assert!(
        socket_fds(&sd, &main_pid)
            .await
            .contains(&format!("socket:[{inode}]")),
        "the supervisor does not hold the listening socket {inode}"
    );
    let (_, old_workers, _) = serving(&sd).await.expect("serving");

    // A new connection every 5 ms for 5 s; the supervisor is killed after 0.5 s.
    let addr = sd.addr();
    let client = tokio::spawn(async move {
        let mut conns = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            tick.tick().await;
            conns.push(tokio::spawn(async move {
                let started = Instant::now();
                (one_connection(addr).await, started.elapsed())
            }));
        }
        let mut outcomes = std::collections::BTreeMap::<Outcome, usize>::new();
        let mut longest = Duration::ZERO;
        for c in conns {
            let (outcome, took) = c.await.unwrap();
            *outcomes.entry(outcome).or_default() += 1;
            longest = longest.max(took);
        }
        (outcomes, longest)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed = Instant::now();
    let out = sd.exec(&["kill", "-9", &main_pid]).await;
    assert!(out.status.success(), "kill -9: {}", text(&out));
    let deadline = Instant::now() + WAIT;
    let new_pid = loop {
        let pid = sd.property("MainPID").await;
        if pid != main_pid && pid != "0" && sd.property("ActiveState").await == "active" {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "not restarted: {}",
            sd.journal().await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let restart = killed.elapsed();
    let (outcomes, longest) = client.await.unwrap();
    let attempted: usize = outcomes.values().sum();
    eprintln!(
        "systemd {version}: kill -9 → active again (new MainPID {new_pid}) in {restart:?}; \
         {attempted} connections: {outcomes:?}, the longest took {longest:?}"
    );
    let journal = sd.journal().await;
    assert_eq!(
        outcomes.get(&Outcome::Refused),
        None,
        "connections refused while the supervisor restarted: {outcomes:?}\n{journal}"
    );
    assert!(outcomes.get(&Outcome::Answered).copied().unwrap_or(0) > attempted / 2);
    let restarts: u32 = sd.property("NRestarts").await.parse().unwrap();
    assert!(restarts >= 1, "NRestarts {restarts}");
    assert!(
        journal.contains("listener \"http\": 1 fd(s) from systemd socket activation"),
        "the restarted supervisor did not take the listener from the fd store:\n{journal}"
    );
    // The very socket: still the only one on the port, held by the new supervisor, and
    // once in the store.
    assert_eq!(sd.property("NFileDescriptorStore").await, "1");
    assert_eq!(
        listening_inodes(sd.port),
        vec![inode],
        "another socket listens"
    );
    assert!(
        socket_fds(&sd, &new_pid)
            .await
            .contains(&format!("socket:[{inode}]")),
        "the new supervisor does not hold the listening socket {inode}"
    );
    // The killed supervisor's workers are gone (KillMode=mixed: systemd kills what is left
    // of the cgroup once the main process has died).
    for pid in &old_workers {
        let out = sd.exec(&["test", "-e", &format!("/proc/{pid}")]).await;
        assert!(
            !out.status.success(),
            "worker {pid} of the killed supervisor is still there"
        );
    }
    let (code, body) = get(sd.addr(), "/hello").await.unwrap();
    assert_eq!((code, body.contains("generation 1")), (200, true), "{body}");

    // systemctl stop: with FileDescriptorStorePreserve=yes (254, fdstore-preserve.conf)
    // systemd keeps the socket, so a connection waits for the next start; without it
    // (252) the store goes with the stopped service and the port closes.
    let out = sd.systemctl(&["stop", "baton.service"]).await;
    assert!(out.status.success(), "stop: {}", text(&out));
    if preserve {
        assert_eq!(sd.property("SubState").await, "dead-resources-pinned");
        assert_eq!(
            listening_inodes(sd.port),
            vec![inode],
            "{}",
            sd.journal().await
        );
        let waiting = tokio::spawn(one_connection(addr));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "answered while stopped");
        let out = sd.systemctl(&["start", "baton.service"]).await;
        assert!(out.status.success(), "start: {}", text(&out));
        assert_eq!(waiting.await.unwrap(), Outcome::Answered);
        assert_eq!(listening_inodes(sd.port), vec![inode]);
    } else {
        let deadline = Instant::now() + WAIT;
        while !listening_inodes(sd.port).is_empty() {
            assert!(Instant::now() < deadline, "the port stays open after stop");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(one_connection(addr).await, Outcome::Refused);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_supervisor_gets_its_listener_back_from_the_fd_store_252() {
    if !skip() {
        crash_restart_from_the_fd_store("252").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_supervisor_gets_its_listener_back_from_the_fd_store_254() {
    if !skip() {
        crash_restart_from_the_fd_store("254").await;
    }
}

/// The supervisor's version, image hash and re-exec count, from `baton status`.
async fn supervisor_status(sd: &Instance) -> serde_json::Value {
    let out = run_cli(&["status", "--json"], &sd.config).await;
    let status: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("baton status: {e}: {}{}", out.stdout, out.stderr));
    status
}

/// The longest time between two `WATCHDOG=1` from `pid` since systemd logs at debug
/// level, from its journal's monotonic timestamps.
async fn longest_watchdog_gap(sd: &Instance, pid: &str) -> Duration {
    let out = sd
        .exec(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "_PID=1",
        ])
        .await;
    let needle = format!("Got notification message from PID {pid} (WATCHDOG=1");
    let pings: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| {
            let stamp = l.strip_prefix('[')?.split(']').next()?;
            stamp.trim().parse().ok()
        })
        .collect();
    assert!(pings.len() > 5, "watchdog pings logged: {}", pings.len());
    let gap = pings.windows(2).map(|w| w[1] - w[0]).fold(0.0, f64::max);
    Duration::from_secs_f64(gap)
}

/// Installs `from` at `to` by rename, keeping `from`'s mode (as a package manager does).
fn install_keeping_mode(from: &std::path::Path, to: &std::path::Path) {
    let tmp = to.with_extension("installing");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::set_permissions(&tmp, std::fs::metadata(from).unwrap().permissions()).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// After a package upgrade, `systemctl reload baton` is all an operator does: the
/// shipped unit's `ExecReload=baton upgrade --wait` finds the baton binary at `ExecStart=`
/// replaced and the supervisor re-executes itself in place, under the unit's sandbox.
/// Six rounds alternate two builds under keep-alive and connection-per-request load: each
/// reload job succeeds, `MainPID` never changes, the version in `baton status` follows
/// the binary, and the watchdog (2 s here) never fires. A binary that cannot take over
/// fails the reload, and the same supervisor goes on serving and says why.
///
/// With `notify_reload` (systemd/notify-reload.conf, 254) systemd sends SIGUSR2 itself:
/// no baton CLI runs, so even a binary that does not run reaches the supervisor's check,
/// and a refused upgrade is a successful reload (the drop-in's documented trade-off) that
/// STATUS= reports.
async fn supervisor_upgrades_itself_on_reload(version: &'static str, notify_reload: bool) {
    use baton_tests::{install, patched_baton};
    let _heavy = heavy().await;
    let mut sd = Instance::prepare(
        &format!(
            "baton-selfup-{version}{}",
            if notify_reload { "-nr" } else { "" }
        ),
        version,
        notify_reload,
    );
    sd.write_config("baton-worker");
    let bin = sd.share.join("bin/baton");
    let builds = sd.share.join("builds");
    std::fs::create_dir(&builds).unwrap();
    let a = builds.join("baton-a");
    std::fs::copy(&bin, &a).unwrap();
    let b = patched_baton(&builds.join("baton-b"), "+b", None);
    let old_format = patched_baton(&builds.join("baton-old-format"), "-old", Some(0));
    let exits = builds.join("exits");
    std::fs::write(&exits, "#!/bin/sh\nexit 3\n").unwrap();
    std::fs::set_permissions(&exits, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    sd.up().await;
    let out = sd.systemctl(&["start", "baton.service"]).await;
    assert!(
        out.status.success(),
        "start: {}\n{}",
        text(&out),
        sd.journal().await
    );
    let main_pid = sd.property("MainPID").await;
    assert_eq!(sd.property("WatchdogUSec").await, "2s");
    let kind = if notify_reload {
        "notify-reload"
    } else {
        "notify"
    };
    assert_eq!(sd.property("Type").await, kind);
    let first = supervisor_status(&sd).await;
    let built = first["supervisor"]["version"].as_str().unwrap().to_owned();
    assert_eq!(first["supervisor"]["pid"].to_string(), main_pid);
    assert_eq!(first["supervisor"]["reexecs"], 0);

    let load = Load::start(
        sd.addr(),
        LoadSpec {
            keepalive: 4,
            per_request: 2,
            h2: 0,
            max_duration: Duration::from_secs(60),
            ..LoadSpec::default()
        },
    );
    // systemd logs every notification at debug level: the watchdog pings' timestamps.
    let out = sd.systemctl(&["log-level", "debug"]).await;
    assert!(out.status.success(), "log-level: {}", text(&out));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut took = Vec::new();
    for i in 1..=6u64 {
        let (next, expected) = if i % 2 == 1 {
            (&b, format!("{built}+b"))
        } else {
            (&a, built.clone())
        };
        install(next, &bin);
        let started = Instant::now();
        let out = sd.systemctl(&["reload", "baton.service"]).await;
        took.push(started.elapsed());
        assert!(
            out.status.success(),
            "reload {i}: {}\n{}",
            text(&out),
            sd.journal().await
        );
        assert_eq!(sd.property("MainPID").await, main_pid, "reload {i}");
        assert_eq!(sd.property("ActiveState").await, "active", "reload {i}");
        assert_eq!(sd.property("NRestarts").await, "0", "reload {i}");
        let status = supervisor_status(&sd).await;
        assert_eq!(status["supervisor"]["pid"].to_string(), main_pid);
        assert_eq!(
            status["supervisor"]["version"],
            expected.as_str(),
            "reload {i}"
        );
        assert_eq!(status["supervisor"]["reexecs"], i, "reload {i}");
        assert_eq!(status["last_upgrade"]["result"], "succeeded", "reload {i}");
    }

    // A build that cannot take over (it reads only an older handover format, as after a
    // downgrade): the check refuses it, the reload job fails (not with notify-reload),
    // and the same supervisor serves on and says why.
    install(&old_format, &bin);
    let started = Instant::now();
    let out = sd.systemctl(&["reload", "baton.service"]).await;
    let refused_took = started.elapsed();
    assert_eq!(
        out.status.success(),
        notify_reload,
        "reload with a build that cannot take over: {}\n{}",
        text(&out),
        sd.journal().await
    );
    assert_eq!(sd.property("MainPID").await, main_pid);
    assert_eq!(sd.property("ActiveState").await, "active");
    let status_text = sd.property("StatusText").await;
    assert!(
        status_text.contains("last upgrade refused: supervisor upgrade")
            && status_text.contains("newer than this release"),
        "{status_text}\n{}\n{}",
        text(&out),
        sd.journal().await
    );
    let status = supervisor_status(&sd).await;
    assert_eq!(status["supervisor"]["reexecs"], 6);
    assert_eq!(status["supervisor"]["version"], built.as_str());
    assert_eq!(status["last_upgrade"]["result"], "refused");

    // A binary that does not even run (`exit 3`). With ExecReload= it is what that runs
    // (the same path as ExecStart=): the reload job fails with its status before the
    // supervisor is asked. With notify-reload the supervisor's check refuses it.
    install_keeping_mode(&exits, &bin);
    let out = sd.systemctl(&["reload", "baton.service"]).await;
    if notify_reload {
        assert!(out.status.success(), "reload: {}", text(&out));
        let status_text = sd.property("StatusText").await;
        assert!(
            status_text.contains("last upgrade refused: supervisor upgrade")
                && status_text.contains("failed its check (exit status: 3)"),
            "{status_text}\n{}",
            sd.journal().await
        );
    } else {
        assert!(!out.status.success(), "reload with a broken baton binary");
        assert!(
            sd.journal()
                .await
                .contains("Control process exited, code=exited, status=3"),
            "{}",
            sd.journal().await
        );
    }
    assert_eq!(sd.property("MainPID").await, main_pid);
    assert_eq!(sd.property("ActiveState").await, "active");
    let status = supervisor_status(&sd).await;
    assert_eq!(status["supervisor"]["reexecs"], 6);
    assert_eq!(status["supervisor"]["version"], built.as_str());
    let (code, _) = get(sd.addr(), "/hello").await.unwrap();
    assert_eq!(code, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let counts = load.stop().await;

    let journal = sd.journal().await;
    assert!(!journal.contains("Watchdog timeout"), "{journal}");
    let gap = longest_watchdog_gap(&sd, &main_pid).await;
    assert!(
        gap < Duration::from_secs(2),
        "{gap:?} between two watchdog pings"
    );
    assert_eq!(sd.property("NRestarts").await, "0");
    assert_eq!(sd.property("MainPID").await, main_pid);
    eprintln!(
        "systemd {version} ({kind}): 6 supervisor upgrades by systemctl reload, MainPID {main_pid} \
         throughout, reloads took {took:?}, the refused one {refused_took:?}; at most {gap:?} \
         between two watchdog pings; {} requests ok \
         ({} keep-alive, {} per connection), {} failed",
        counts.ok(),
        counts.ok_keepalive,
        counts.ok_per_request,
        counts.failed
    );
    assert_eq!(
        counts.failed, 0,
        "failed requests across the supervisor upgrades: {:#?}",
        counts.failures
    );
    assert!(
        counts.ok_keepalive > 0 && counts.ok_per_request > 0,
        "{counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemctl_reload_upgrades_the_supervisor_in_place_on_252() {
    if !skip() {
        supervisor_upgrades_itself_on_reload("252", false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemctl_reload_upgrades_the_supervisor_in_place_on_254() {
    if !skip() {
        supervisor_upgrades_itself_on_reload("254", false).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_reload_upgrades_the_supervisor_in_place_on_254() {
    if !skip() {
        supervisor_upgrades_itself_on_reload("254", true).await;
    }
}
