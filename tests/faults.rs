//! Fault injection under load: a worker that ignores SIGTERM while draining, a worker
//! stopped while serving, and the supervisor killed in the middle of an upgrade.
#![forbid(unsafe_code)]

use baton_tests::{
    Baton, Load, LoadSpec, TestConfig, WAIT, eventually, fake_worker_script, heavy, procfs,
    slow_start_worker_script,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// Keep-alive, connection-per-request and HTTP/2 clients on `/hello`.
fn mixed_hello_load() -> LoadSpec {
    LoadSpec {
        keepalive: 4,
        per_request: 1,
        h2: 1,
        path: "/hello".into(),
        ..LoadSpec::default()
    }
}

fn per_request_only() -> LoadSpec {
    LoadSpec {
        keepalive: 0,
        per_request: 2,
        h2: 0,
        ..LoadSpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_ignores_sigterm_is_killed_after_drain_timeout() {
    let _heavy = heavy().await;
    let scripts = tempfile::tempdir().unwrap();
    let base = TestConfig {
        drain_timeout: "1s",
        ..TestConfig::default()
    };
    // Generation 1 says READY, never accepts, and ignores SIGTERM.
    let stubborn = TestConfig {
        worker_path: Some(fake_worker_script(scripts.path(), "stubborn")),
        ..base.clone()
    };
    let baton = Baton::start(stubborn).await;
    let (_, stubborn_pids) = baton.serving().await.unwrap();
    baton.write_config(&base.render());
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    let load = Load::start(baton.addr(), LoadSpec::default());
    // drain_timeout (1 s) plus the supervisor's kill margin (2 s).
    let started = Instant::now();
    let gone = eventually(Duration::from_secs(6), || {
        stubborn_pids.iter().all(|&p| !procfs::alive(p))
    })
    .await;
    assert!(gone, "a worker ignoring SIGTERM outlived its drain");
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "killed before drain_timeout"
    );
    assert!(
        baton.log().contains("drain_timeout passed; killing"),
        "{}",
        baton.log()
    );
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "{:#?}", counts.failures);
    assert!(counts.ok() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_worker_does_not_stop_the_service_or_an_upgrade() {
    let _heavy = heavy().await;
    let baton = Baton::start(TestConfig {
        drain_timeout: "1s",
        ..TestConfig::default()
    })
    .await;
    let (_, pids) = baton.serving().await.unwrap();
    kill(Pid::from_raw(pids[0] as i32), Signal::SIGSTOP).unwrap();
    // New connections go to the worker that still accepts (they share one backlog).
    let load = Load::start(baton.addr(), per_request_only());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    // The stopped worker cannot drain; SIGKILL after drain_timeout ends it anyway.
    let gone = eventually(Duration::from_secs(6), || !procfs::alive(pids[0])).await;
    assert!(gone, "the stopped worker was never cleaned up");
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "{:#?}", counts.failures);
    assert!(counts.ok() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supervisor_killed_mid_upgrade_leaves_no_orphans_and_restarts_on_the_same_port() {
    let _heavy = heavy().await;
    let scripts = tempfile::tempdir().unwrap();
    let base = TestConfig {
        drain_timeout: "2s",
        ..TestConfig::default()
    };
    let mut baton = Baton::start(base.clone()).await;
    let old = baton.worker_pids();
    // Generation 2 takes 1.5 s to start: kill the supervisor while it does.
    baton.write_config(
        &TestConfig {
            worker_path: Some(slow_start_worker_script(scripts.path(), "1.5")),
            ..base.clone()
        }
        .render(),
    );
    baton.signal(Signal::SIGUSR2);
    let started = eventually(WAIT, || baton.worker_pids().len() > old.len()).await;
    assert!(started, "generation 2 never started");
    let all = baton.worker_pids();
    baton.signal(Signal::SIGKILL);
    baton.wait_exit(WAIT).await;
    let gone = eventually(Duration::from_secs(5), || {
        all.iter().all(|&p| !procfs::alive(p))
    })
    .await;
    let left: Vec<u32> = all.iter().copied().filter(|&p| procfs::alive(p)).collect();
    assert!(
        gone,
        "orphans after the supervisor died mid-upgrade: {left:?}"
    );
    // A new supervisor with the same config serves on the same port again.
    let again = Baton::start(TestConfig {
        port: base.port,
        ..base.clone()
    })
    .await;
    let (code, _) = baton_tests::get(again.addr(), "/_baton/health")
        .await
        .unwrap();
    assert_eq!(code, 200);
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn dir_size(dir: &std::path::Path) -> (usize, u64) {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .fold((0, 0), |(n, b), m| (n + 1, b + m.len()))
        })
        .unwrap_or((0, 0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_upgrades_leak_nothing() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let plugins = baton_tests::plugin_dir(tmp.path(), "plugins", &["hello"]);
    let baton = Baton::start(TestConfig {
        plugins_dir: Some(plugins.clone()),
        drain_idle_grace: "50ms",
        ..TestConfig::default()
    })
    .await;
    // Every upgrade runs a plugin with new content (the library plus a trailing counter),
    // so the cache would grow by one file per upgrade if nothing were pruned.
    let original = std::fs::read(plugins.join("libbaton_hello.so")).unwrap();
    let release = |i: u64| {
        let mut bytes = original.clone();
        bytes.extend_from_slice(&i.to_le_bytes());
        let tmp = plugins.join(".next.tmp");
        std::fs::write(&tmp, bytes).unwrap();
        std::fs::rename(&tmp, plugins.join("libbaton_hello.so")).unwrap();
    };
    // Warm up: the first upgrades allocate what every later one reuses.
    for i in 0..10 {
        release(i);
        assert_eq!(baton.upgrade_wait().await.code, Some(0));
    }
    baton.wait_settled().await;
    let cache = plugins.with_extension("cache");
    let before = (
        fd_count(baton.pid),
        rss_kib(baton.pid),
        baton.worker_pids().len(),
        dir_size(&cache),
    );
    let load = Load::start(baton.addr(), mixed_hello_load());
    for i in 0..200 {
        release(1000 + i);
        let out = baton.upgrade_wait().await;
        assert_eq!(out.code, Some(0), "upgrade {i}: {}", out.text());
    }
    let counts = load.stop().await;
    baton.wait_settled().await;
    let settled = eventually(WAIT, || baton.worker_pids().len() == before.2).await;
    assert!(
        settled,
        "processes: {} before, {:?} after",
        before.2,
        baton.worker_pids()
    );
    let after = (
        fd_count(baton.pid),
        rss_kib(baton.pid),
        baton.worker_pids().len(),
        dir_size(&cache),
    );
    eprintln!(
        "200 upgrades: supervisor fds {} -> {}, RSS {} -> {} KiB, worker processes {} -> {}, \
         artifact cache {} files/{} bytes -> {} files/{} bytes; {} requests, {} failed",
        before.0,
        after.0,
        before.1,
        after.1,
        before.2,
        after.2,
        before.3.0,
        before.3.1,
        after.3.0,
        after.3.1,
        counts.ok(),
        counts.failed
    );
    assert_eq!(after.0, before.0, "the supervisor's fd count changed");
    assert_eq!(after.2, before.2, "the number of worker processes changed");
    assert_eq!(after.3, before.3, "the artifact cache was not pruned back");
    // The allocator may keep a little; a leak per upgrade would show as hundreds of KiB.
    assert!(
        after.1 <= before.1 + 256,
        "supervisor RSS grew from {} to {} KiB",
        before.1,
        after.1
    );
    assert_eq!(counts.failed, 0, "{:#?}", counts.failures);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_or_read_only_cache_disk_refuses_the_upgrade() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping the cache-disk test: needs root (for a private tmpfs)");
        return;
    }
    let _heavy = heavy().await;
    for (case, expect) in [
        ("full", "No space left on device"),
        ("read-only", "Read-only file system"),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let plugins = baton_tests::plugin_dir(tmp.path(), "plugins", &[]);
        let cache = tmp.path().join("cache");
        std::fs::create_dir(&cache).unwrap();
        let port = baton_tests::free_port();
        let config = tmp.path().join("baton.toml");
        let render = || {
            format!(
                "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:{port}\"\n[worker]\npath = \"{}\"\nthreads = 1\n[plugins]\ndir = \"{}\"\ncache_dir = \"{}\"\n",
                baton_tests::bins().worker.display(),
                plugins.display(),
                cache.display()
            )
        };
        std::fs::write(&config, render()).unwrap();
        // The cache is a small tmpfs in the supervisor's own mount namespace (generation 1
        // caches the worker binary there), filled up or made read-only once it serves.
        let script = format!(
            "mount -t tmpfs -o size=96m,mode=0755 baton-test-cache '{}' && exec '{}' run -c '{}'",
            cache.display(),
            baton_tests::bins().baton.display(),
            config.display()
        );
        let log = std::fs::File::create(tmp.path().join("log")).unwrap();
        let mut child = tokio::process::Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        // Serving, not just bound: generation 1 has cached the worker binary.
        let mut up = false;
        let deadline = Instant::now() + WAIT;
        while !up && Instant::now() < deadline {
            up = tokio::time::timeout(
                Duration::from_millis(500),
                baton_tests::get(addr, "/_baton/health"),
            )
            .await
            .is_ok_and(|r| r.is_ok_and(|(code, _)| code == 200));
            if !up {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        assert!(
            up,
            "{case}: baton did not start: {}",
            std::fs::read_to_string(tmp.path().join("log")).unwrap()
        );
        let pid = child.id().unwrap();
        if case == "full" {
            // Seen through the supervisor's root, the cache is its tmpfs.
            let filler = format!("/proc/{pid}/root{}/filler", cache.display());
            let mut file = std::fs::File::create(&filler).unwrap();
            let block = vec![0u8; 1 << 20];
            let full = (0..200).any(|_| std::io::Write::write_all(&mut file, &block).is_err());
            assert!(full, "the 96 MiB tmpfs never filled up");
        } else {
            let status = std::process::Command::new("nsenter")
                .args([
                    "--target",
                    &pid.to_string(),
                    "--mount",
                    "mount",
                    "-o",
                    "remount,ro",
                ])
                .arg(&cache)
                .status()
                .unwrap();
            assert!(status.success(), "remount read-only failed");
        }
        let load = Load::start(
            addr,
            LoadSpec {
                keepalive: 4,
                h2: 0,
                ..LoadSpec::default()
            },
        );
        // A plugin appears: caching it fails, the upgrade is refused, generation 1 serves on.
        std::fs::copy(
            baton_tests::bins().dir.join("libbaton_hello.so"),
            plugins.join("libbaton_hello.so"),
        )
        .unwrap();
        let out = baton_tests::run_cli(&["upgrade", "--wait"], &config).await;
        assert_eq!(out.code, Some(1), "{case}: {}", out.text());
        assert!(
            out.text().contains("libbaton_hello.so: artifact cache") && out.text().contains(expect),
            "{case}: {}\nlog:\n{}",
            out.text(),
            std::fs::read_to_string(tmp.path().join("log")).unwrap()
        );
        let status = baton_tests::run_cli(&["status", "--json"], &config).await;
        let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
        assert_eq!(status["generations"][0]["number"], 1, "{case}: {status:#}");
        assert_eq!(
            status["last_upgrade"]["result"], "refused",
            "{case}: {status:#}"
        );
        let counts = load.stop().await;
        assert_eq!(counts.failed, 0, "{case}: {:#?}", counts.failures);
        let (code, _) = baton_tests::get(addr, "/_baton/health").await.unwrap();
        assert_eq!(code, 200);
        assert_eq!(baton_tests::terminate(&mut child).await, Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_loop_after_promotion_restores_the_previous_generations_exact_artifacts() {
    use std::os::unix::fs::PermissionsExt;
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The worker binary at worker.path is a copy the test overwrites later.
    let worker = tmp.path().join("baton-worker");
    std::fs::copy(&baton_tests::bins().worker, &worker).unwrap();
    let plugins = baton_tests::plugin_dir(tmp.path(), "plugins", &["hello"]);
    let cache = plugins.with_extension("cache");
    let config = |greeting: &str| TestConfig {
        worker_path: Some(worker.clone()),
        plugins_dir: Some(plugins.clone()),
        drain_timeout: "2s",
        extra: format!(
            "crash_loop_window = \"30s\"\ncrash_loop_exits = 3\n\
             [plugins.settings.hello]\ngreeting = \"{greeting}\"\n"
        ),
        ..TestConfig::default()
    };
    let mut base = config("one");
    let baton = Baton::start(base.clone()).await;
    let gen1 = baton.status().await["generations"][0].clone();
    let load = Load::start(
        baton.addr(),
        LoadSpec {
            keepalive: 4,
            per_request: 1,
            h2: 0,
            path: "/hello".into(),
            ..LoadSpec::default()
        },
    );

    // Release 2: another greeting and a plugin that aborts its worker 300 ms after it
    // loads. It becomes READY, is promoted, then crashes over and over.
    baton_tests::compile_c_plugin(
        std::path::Path::new("tests/harness/bad_plugin.c"),
        &plugins.join("crasher.so"),
        &["CRASH_AFTER_MS=300"],
    );
    base = TestConfig {
        port: base.port,
        ..config("two")
    };
    baton.write_config(&base.render());
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    // While it crash-loops, the files on disk change again: a rollback that re-read
    // them would start this broken binary, greeting "three", with the crasher.
    std::fs::remove_file(&worker).unwrap();
    std::fs::write(&worker, "#!/bin/sh\necho 'broken release' >&2\nexit 1\n").unwrap();
    std::fs::set_permissions(&worker, std::fs::Permissions::from_mode(0o755)).unwrap();
    baton.write_config(
        &TestConfig {
            port: base.port,
            ..config("three")
        }
        .render(),
    );

    let mut restored = None;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let status = baton.status().await;
        let serving = status["generations"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["state"] == "serving" && g["restored_from"] == 1)
            .cloned();
        if let Some(g) = serving
            && status["generations"].as_array().unwrap().len() == 1
        {
            restored = Some((g, status));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let crash_window = load.stop().await;
    let Some((gen3, status)) = restored else {
        panic!(
            "no restored generation took over:\n{:#}\nlog:\n{}",
            baton.status().await,
            baton.log()
        );
    };
    eprintln!(
        "crash loop: {} requests answered, {} failed while generation 2 crashed and generation {} took over",
        crash_window.ok(),
        crash_window.failed,
        gen3["number"]
    );

    // Exactly generation 1's artifacts: binary, plugin set and config.
    assert_eq!(gen3["number"], 3, "{status:#}");
    assert_eq!(gen3["worker"]["sha256"], gen1["worker"]["sha256"]);
    assert_eq!(gen3["worker"]["cached"], gen1["worker"]["cached"]);
    assert_eq!(gen3["plugins"], gen1["plugins"], "{status:#}");
    assert_eq!(gen3["rollback_to"], serde_json::Value::Null);
    let cached = gen3["worker"]["cached"].as_str().unwrap();
    for pid in gen3["pids"].as_array().unwrap() {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert_eq!(
            exe,
            std::path::Path::new(cached),
            "worker {pid} runs {exe:?}"
        );
    }
    let (code, body) = baton_tests::get(baton.addr(), "/hello").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        body.starts_with("one"),
        "generation 1's config was not restored: {body}"
    );
    let (code, _) = baton_tests::get(baton.addr(), "/bad/ok").await.unwrap();
    assert_eq!(
        code, 404,
        "the crasher is not part of generation 1's plugin set"
    );

    // Reported: the last upgrade, the log.
    let last = &status["last_upgrade"];
    assert_eq!(last["result"], "rolled_back", "{status:#}");
    assert_eq!(last["generation"], 2, "{status:#}");
    let reason = last["reason"].as_str().unwrap();
    assert!(
        reason.contains("generation 2 crash-looped: 3 worker exit(s) within 30s of promotion")
            && reason.contains("generation 3 serves generation 1's artifacts"),
        "{reason}"
    );
    assert!(
        baton
            .log()
            .contains("rolling back to generation 1's exact artifacts"),
        "{}",
        baton.log()
    );

    // Generation 2's artifacts left the cache with it; generation 3's stay.
    let names: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".lock")
        .collect();
    assert_eq!(names.len(), 2, "cache holds {names:?}\n{}", baton.log());

    // And it serves without failures from here on.
    let load = Load::start(baton.addr(), mixed_hello_load());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = load.stop().await;
    assert_eq!(after.failed, 0, "{:#?}", after.failures);
    assert!(after.ok() > 0);
}
