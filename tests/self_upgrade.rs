//! The supervisor upgrading itself in place: the baton binary on disk is replaced (by
//! rename, as a package manager does) with a build that reports another release, and
//! `baton upgrade --wait` re-executes the supervisor in the same process before it starts
//! the next generation. Clients under load see nothing, the pid stays, every fd and worker
//! goes along, and a new binary that cannot take over changes nothing but the answer.
#![forbid(unsafe_code)]

use baton_tests::{
    Baton, LoadSpec, TestConfig, WAIT, bins, get, heavy, install, patched_baton, plugin_dir,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// A directory with the baton binary the supervisor runs (`bin/baton`, a copy it may
/// replace) and two builds to alternate: `a` (as built) and `b` (reporting `+b`).
struct Builds {
    _dir: tempfile::TempDir,
    path: PathBuf,
    a: PathBuf,
    b: PathBuf,
    root: PathBuf,
}

fn builds() -> Builds {
    let dir = baton_tests::traversable_tempdir("baton-builds");
    let root = dir.path().to_owned();
    std::fs::create_dir(root.join("bin")).unwrap();
    let a = root.join("baton-a");
    std::fs::copy(&bins().baton, &a).unwrap();
    let b = patched_baton(&root.join("baton-b"), "+b", None);
    let path = root.join("bin/baton");
    install(&a, &path);
    Builds {
        _dir: dir,
        path,
        a,
        b,
        root,
    }
}

fn version_of(status: &Value) -> String {
    status["supervisor"]["version"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_supervisor_upgrades_under_load_lose_no_request_and_keep_the_pid() {
    let _heavy = heavy().await;
    let builds = builds();
    let baton = Baton::start(TestConfig {
        baton: Some(builds.path.clone()),
        processes: 1,
        threads: 2,
        ..TestConfig::default()
    })
    .await;
    let first = baton.status().await;
    let built = version_of(&first);
    assert_eq!(first["supervisor"]["pid"], baton.pid);
    assert_eq!(first["supervisor"]["reexecs"], 0);
    let load = baton_tests::Load::start(
        baton.addr(),
        LoadSpec {
            keepalive: 8,
            keepalive_10: 2,
            per_request: 2,
            h2: 2,
            ..LoadSpec::default()
        },
    );
    let mut baseline = None;
    for i in 1..=20u64 {
        let (next, version) = if i % 2 == 1 {
            (&builds.b, format!("{built}+b"))
        } else {
            (&builds.a, built.clone())
        };
        install(next, &builds.path);
        // The client waits while the supervisor re-executes: its answer comes from the
        // new image, on the connection the old one accepted.
        let out = baton.upgrade_wait().await;
        assert_eq!(
            out.code,
            Some(0),
            "upgrade {i}: {}\nlog:\n{}",
            out.text(),
            baton.log()
        );
        let status = baton.status().await;
        assert_eq!(status["supervisor"]["pid"], baton.pid, "upgrade {i}");
        assert_eq!(version_of(&status), version, "upgrade {i}");
        assert_eq!(status["supervisor"]["reexecs"], i, "upgrade {i}");
        assert_eq!(status["last_upgrade"]["result"], "succeeded", "upgrade {i}");
        if i == 2 {
            baseline = Some((fd_count(baton.pid), rss_kib(baton.pid)));
        }
    }
    baton.wait_settled().await;
    let counts = load.stop().await;
    assert_eq!(
        counts.failed, 0,
        "failed requests across 20 supervisor upgrades: {:?}",
        counts.failures
    );
    assert!(
        counts.ok_keepalive > 0
            && counts.ok_keepalive_10 > 0
            && counts.ok_per_request > 0
            && counts.ok_h2 > 0,
        "every kind of client was served: {counts:?}"
    );
    assert!(
        counts.generations.len() >= 20,
        "each upgrade also started a generation: {:?}",
        counts.generations
    );
    // Nothing accumulates in the supervisor from one image to the next.
    let (fds, rss) = baseline.unwrap();
    let (fds_after, rss_after) = (fd_count(baton.pid), rss_kib(baton.pid));
    eprintln!(
        "20 supervisor upgrades: {} requests ok ({} keep-alive, {} HTTP/1.0 keep-alive, {} \
         per connection, {} HTTP/2), {} failed; supervisor fds {fds} → {fds_after}, RSS \
         {rss} → {rss_after} KiB",
        counts.ok(),
        counts.ok_keepalive,
        counts.ok_keepalive_10,
        counts.ok_per_request,
        counts.ok_h2,
        counts.failed
    );
    assert!(
        fds_after <= fds,
        "the supervisor holds {fds_after} fds after 20 upgrades, {fds} after 2"
    );
    assert!(
        rss_after < rss + rss / 2,
        "the supervisor's RSS grew from {rss} KiB to {rss_after} KiB"
    );
}

/// Starts Baton (from a replaceable binary) serving the chat and ticker plugins.
async fn start_with_plugins(builds: &Builds) -> (tempfile::TempDir, Baton) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["chat", "ticker"]);
    let baton = Baton::start(TestConfig {
        baton: Some(builds.path.clone()),
        plugins_dir: Some(dir),
        processes: 1,
        ..TestConfig::default()
    })
    .await;
    (tmp, baton)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_and_a_stream_stay_open_while_the_supervisor_upgrades_itself() {
    let _heavy = heavy().await;
    let builds = builds();
    let (_tmp, baton) = start_with_plugins(&builds).await;
    let (generation, pids) = baton.serving().await.unwrap();
    let url = format!("ws://{}/chat/lobby?name=alice", baton.addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    // A server-sent event stream that never ends by itself.
    let mut sse = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sse.write_all(b"GET /ticker HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut seen = 0usize;
    for i in 1..=6u64 {
        let next = if i % 2 == 1 { &builds.b } else { &builds.a };
        install(next, &builds.path);
        let out = baton
            .cli(&["upgrade", "--supervisor", "--wait", "--timeout", "60s"])
            .await;
        assert_eq!(out.code, Some(0), "{}\nlog:\n{}", out.text(), baton.log());
        assert!(
            out.stdout.contains("supervisor upgraded in place"),
            "{}",
            out.stdout
        );
        // The same generation serves with the same workers: nothing was restarted.
        assert_eq!(
            baton.serving().await,
            Some((generation, pids.clone())),
            "upgrade {i}"
        );
        // The WebSocket still carries messages both ways.
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        loop {
            let m = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("a message")
                .expect("open")
                .expect("no error");
            if let Message::Text(t) = m
                && t.contains(&text)
            {
                break;
            }
        }
        // The stream still delivers events.
        let before = seen;
        while seen < before + 2 {
            let n = tokio::time::timeout(WAIT, sse.read(&mut buf))
                .await
                .expect("an event")
                .unwrap();
            assert!(n > 0, "the event stream ended at upgrade {i}");
            seen += buf[..n].windows(2).filter(|w| w == b"\n\n").count();
        }
    }
    let status = baton.status().await;
    assert_eq!(status["supervisor"]["reexecs"], 6);
    assert_eq!(status["supervisor"]["pid"], baton.pid);
}

/// A binary at `path` that is a shell script with `body`.
fn script(path: &Path, body: &str) -> PathBuf {
    std::fs::write(path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    path.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_binary_that_cannot_take_over_is_refused_and_the_old_supervisor_keeps_serving() {
    let _heavy = heavy().await;
    let builds = builds();
    let baton = Baton::start(TestConfig {
        baton: Some(builds.path.clone()),
        processes: 1,
        ..TestConfig::default()
    })
    .await;
    let before = baton.status().await;
    let load = baton_tests::Load::start(
        baton.addr(),
        LoadSpec {
            keepalive: 4,
            per_request: 1,
            h2: 1,
            ..LoadSpec::default()
        },
    );
    let exits = script(&builds.root.join("exits"), "exit 3");
    let crashes = script(&builds.root.join("crashes"), "kill -SEGV $$");
    let old_format = patched_baton(&builds.root.join("old-format"), "-old", Some(0));
    let not_executable = builds.root.join("not-executable");
    std::fs::copy(&builds.b, &not_executable).unwrap();
    std::fs::set_permissions(
        &not_executable,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let writable = builds.root.join("writable");
    std::fs::copy(&builds.b, &writable).unwrap();
    std::fs::set_permissions(
        &writable,
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let cases: [(&Path, &str); 5] = [
        (&exits, "failed its check (exit status: 3)"),
        (&crashes, "failed its check (signal: 11 (SIGSEGV))"),
        (&old_format, "newer than this release"),
        (&not_executable, "not executable"),
        (&writable, "writable"),
    ];
    for (binary, reason) in cases {
        // Installed with its own mode (a rename keeps the file's mode).
        let tmp = builds.path.with_extension("installing");
        std::fs::copy(binary, &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::metadata(binary).unwrap().permissions()).unwrap();
        std::fs::rename(&tmp, &builds.path).unwrap();
        let out = baton.upgrade_wait().await;
        assert_eq!(out.code, Some(1), "{}: {}", binary.display(), out.text());
        assert!(
            out.stderr.contains("supervisor upgrade") && out.stderr.contains(reason),
            "{}: {}",
            binary.display(),
            out.stderr
        );
        let status = baton.status().await;
        assert_eq!(status["supervisor"]["pid"], baton.pid);
        assert_eq!(
            status["supervisor"]["sha256"],
            before["supervisor"]["sha256"]
        );
        assert_eq!(status["supervisor"]["reexecs"], 0);
        assert_eq!(status["last_upgrade"]["result"], "refused");
        let (code, _) = get(baton.addr(), "/_baton/health").await.unwrap();
        assert_eq!(code, 200);
    }
    // The old supervisor is whole: a good binary still upgrades it.
    install(&builds.b, &builds.path);
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}\nlog:\n{}", out.text(), baton.log());
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "{:?}", counts.failures);
    assert!(counts.ok() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_refuses_the_state_after_the_exec_returns_to_the_previous_one() {
    let _heavy = heavy().await;
    let builds = builds();
    let refusing = patched_baton(&builds.root.join("baton-refusing"), "+refusing", None);
    let built = {
        let out = tokio::process::Command::new(&builds.a)
            .arg("--version")
            .output()
            .await
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_start_matches("baton ")
            .to_owned()
    };
    // Fault injection (debug builds only): the image reporting this release refuses any
    // state after its exec, as if it could not take over the fds.
    let refuse = format!("{built}+refusing");
    let baton = Baton::spawn(
        TestConfig {
            baton: Some(builds.path.clone()),
            processes: 1,
            ..TestConfig::default()
        },
        &[("BATON_TEST_REFUSE_HANDOVER", refuse.as_str())],
    )
    .await;
    baton.wait_serving(1).await;
    let before = baton.status().await;
    let load = baton_tests::Load::start(
        baton.addr(),
        LoadSpec {
            keepalive: 4,
            per_request: 1,
            h2: 1,
            ..LoadSpec::default()
        },
    );
    install(&refusing, &builds.path);
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains("refused the state and returned to")
            && out.stderr.contains("BATON_TEST_REFUSE_HANDOVER"),
        "{}",
        out.stderr
    );
    let status = baton.status().await;
    assert_eq!(status["supervisor"]["pid"], baton.pid);
    assert_eq!(
        status["supervisor"]["sha256"],
        before["supervisor"]["sha256"]
    );
    assert_eq!(version_of(&status), built);
    assert_eq!(
        status["supervisor"]["reexecs"], 0,
        "it went back: no upgrade"
    );
    assert_eq!(
        status["generations"][0]["number"], 1,
        "no generation started"
    );
    assert!(
        baton.log().contains("returning to the previous image"),
        "{}",
        baton.log()
    );
    // The image it returned to goes on: a good build upgrades it.
    install(&builds.b, &builds.path);
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}\nlog:\n{}", out.text(), baton.log());
    assert_eq!(version_of(&baton.status().await), format!("{built}+b"));
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "{:?}", counts.failures);
    tokio::time::sleep(Duration::from_millis(1)).await;
}
