//! Plugins end to end: the examples (Rust and C) serving through one worker, the router,
//! panics, the blocking pool, and every kind of bad plugin rolled back under load.
#![forbid(unsafe_code)]

use baton_tests::{
    Baton, Load, LoadSpec, TestConfig, WAIT, bins, compile_c_plugin, get, heavy, plugin_dir,
    procfs, run_cli,
};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn with_plugins(dir: &Path) -> TestConfig {
    TestConfig {
        plugins_dir: Some(dir.to_owned()),
        ..TestConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_and_c_plugins_serve_through_one_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["hello", "echo"]);
    compile_c_plugin(
        Path::new("plugins/c-hello/hello.c"),
        &dir.join("c_hello.so"),
        &[],
    );
    let baton = Baton::start(TestConfig {
        processes: 1,
        extra: "[plugins.settings.hello]\ngreeting = \"howdy\"\n[plugins.settings.c_hello]\ngreeting = \"bonjour\"\n"
            .into(),
        ..with_plugins(&dir)
    })
    .await;
    let (_, pids) = baton.serving().await.unwrap();
    let pid = pids[0];

    let (code, body) = get(baton.addr(), "/hello/ada").await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(body, format!("howdy, ada! (generation 1, pid {pid})\n"));
    let (code, body) = get(baton.addr(), "/c/hello").await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        body,
        format!("bonjour! (generation 1, pid {pid}, version 1.0.0)\n")
    );

    // The router: a known path with the wrong method is a 405 with Allow; else 404.
    let out = raw(
        baton.addr(),
        "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 405"), "{out}");
    assert!(
        out.to_ascii_lowercase().contains("allow: get, head"),
        "{out}"
    );
    let (code, _) = get(baton.addr(), "/hello/a/b").await.unwrap();
    assert_eq!(code, 404);

    // echo returns every part of the request.
    let out = raw(
        baton.addr(),
        "POST /echo/a/b?x=1&y=2 HTTP/1.1\r\nHost: x\r\nX-Test: yes\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    )
    .await;
    let json: serde_json::Value =
        serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap().trim()).unwrap();
    assert_eq!(json["method"], "POST");
    assert_eq!(json["path"], "/echo/a/b");
    assert_eq!(json["query"], "x=1&y=2");
    assert_eq!(json["params"]["rest"], "a/b");
    assert_eq!(json["body"], "hello");
    assert_eq!(json["pid"], pid);
    assert!(
        json["headers"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h[0] == "x-test" && h[1] == "yes"),
        "{json}"
    );

    // The status names each plugin file with its hash.
    let status = baton.status().await;
    let plugins = status["generations"][0]["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3, "{status:#}");
    assert!(
        plugins
            .iter()
            .all(|p| p["sha256"].as_str().unwrap().len() == 64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_a_500_and_the_worker_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["hello", "faulty"]);
    let baton = Baton::start(TestConfig {
        processes: 1,
        ..with_plugins(&dir)
    })
    .await;
    let (_, pids) = baton.serving().await.unwrap();
    for path in ["/faulty/panic", "/faulty/error", "/faulty/bad-header"] {
        let (code, _) = get(baton.addr(), path).await.unwrap();
        assert_eq!(code, 500, "{path}");
    }
    let (code, body) = get(baton.addr(), "/hello").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        baton.serving().await.unwrap().1,
        pids,
        "the worker was replaced"
    );
    let log = baton.log();
    assert!(
        log.contains("handler panicked: faulty: told to panic in a handler"),
        "{log}"
    );
    assert!(log.contains("faulty: told to fail"), "{log}");
    assert!(log.contains("invalid header"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_blocking_plugin_does_not_stop_a_fast_one() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["hello", "slow"]);
    let baton = Baton::start(TestConfig {
        processes: 1,
        extra: "blocking_threads = 4\n".into(),
        ..with_plugins(&dir)
    })
    .await;
    // Three times as many sleepers as the slow plugin has threads.
    let started = Instant::now();
    let sleepers: Vec<_> = (0..12)
        .map(|_| {
            let addr = baton.addr();
            tokio::spawn(async move { get(addr, "/slow/3000").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..5 {
        let (code, body) = get(baton.addr(), "/hello").await.unwrap();
        assert_eq!(code, 200, "{body}");
    }
    // hello answered while every sleeper was still waiting.
    assert!(
        sleepers.iter().all(|s| !s.is_finished()),
        "a sleeper finished before hello answered"
    );
    assert!(
        started.elapsed() < Duration::from_millis(2900),
        "hello waited for the sleepers"
    );
    for s in sleepers {
        let (code, _) = s.await.unwrap().unwrap();
        assert_eq!(code, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_request_finishes_on_the_old_generation_after_an_upgrade() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["slow"]);
    let baton = Baton::start(TestConfig {
        processes: 1,
        ..with_plugins(&dir)
    })
    .await;
    let addr = baton.addr();
    let slow = tokio::spawn(async move { get(addr, "/slow/2500").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(
        !slow.is_finished(),
        "the slow request ended before the new generation took over"
    );
    let (code, body) = slow.await.unwrap().unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("slept 2500 ms (generation 1"), "{body}");
}

/// What a bad plugin directory must make `baton upgrade --wait` and `baton check` say.
struct BadCase {
    name: &'static str,
    /// Prepares the directory (which already holds hello).
    setup: Box<dyn Fn(&Path)>,
    expect: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_plugin_is_rolled_back_under_load_and_named_by_check() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let good = plugin_dir(tmp.path(), "good", &["hello"]);
    let base = with_plugins(&good);
    let baton = Baton::start(TestConfig {
        ready_timeout: "5s",
        ..base.clone()
    })
    .await;

    let c = |defines: &'static [&'static str]| -> Box<dyn Fn(&Path)> {
        Box::new(move |dir: &Path| {
            compile_c_plugin(
                Path::new("tests/harness/bad_plugin.c"),
                &dir.join("bad.so"),
                defines,
            );
        })
    };
    let hello = bins().dir.join("libbaton_hello.so");
    let cases = vec![
        BadCase {
            name: "not an ELF file",
            setup: Box::new(|dir| {
                std::fs::write(dir.join("bad.so"), "this is not a library\n".repeat(20)).unwrap()
            }),
            expect: vec!["bad.so: not an ELF shared library".into()],
        },
        BadCase {
            name: "truncated",
            setup: Box::new(move |dir| {
                let bytes = std::fs::read(&hello).unwrap();
                std::fs::write(dir.join("bad.so"), &bytes[..4096]).unwrap();
            }),
            expect: vec!["bad.so: truncated: segment".into()],
        },
        BadCase {
            name: "missing entry point",
            setup: c(&["NO_ENTRY"]),
            expect: vec!["bad.so: no entry point baton_plugin_v1".into()],
        },
        BadCase {
            name: "wrong magic",
            setup: c(&["BAD_MAGIC"]),
            expect: vec!["bad.so: wrong magic 0x0123456789abcdef".into()],
        },
        BadCase {
            name: "wrong major",
            setup: c(&["BAD_MAJOR"]),
            expect: vec![
                "bad.so: built for plugin ABI 2.1; this Baton speaks major version 1".into(),
            ],
        },
        BadCase {
            name: "newer minor",
            setup: c(&["NEWER_MINOR"]),
            expect: vec!["bad.so: built for plugin ABI 1.2, newer than this Baton's 1.1".into()],
        },
        BadCase {
            name: "struct_size too small",
            setup: c(&["SMALL_STRUCT"]),
            expect: vec!["bad.so: descriptor struct_size 40 is smaller than the 80 bytes".into()],
        },
        BadCase {
            name: "null function pointer",
            setup: c(&["NULL_HANDLE"]),
            expect: vec!["bad.so: null function pointer: handle".into()],
        },
        BadCase {
            name: "init error",
            setup: c(&["INIT_FAILS"]),
            expect: vec!["bad.so: init failed: bad: cannot connect to the database".into()],
        },
        BadCase {
            name: "init panic",
            setup: Box::new(|dir| {
                std::fs::copy(bins().dir.join("libbaton_faulty.so"), dir.join("faulty.so"))
                    .unwrap();
                let config = dir.join("settings.toml");
                std::fs::write(config, "").unwrap();
            }),
            expect: vec![
                "faulty.so: init failed: init panicked: faulty: told to panic in init".into(),
            ],
        },
        BadCase {
            name: "duplicate route",
            setup: c(&["DUP_ROUTE"]),
            expect: vec![
                "duplicate route GET /hello: claimed by plugin".into(),
                "bad.so (bad)".into(),
            ],
        },
        BadCase {
            name: "world-writable file",
            setup: Box::new(|dir| {
                std::fs::copy(bins().dir.join("libbaton_echo.so"), dir.join("echo.so")).unwrap();
                std::fs::set_permissions(
                    dir.join("echo.so"),
                    std::fs::Permissions::from_mode(0o666),
                )
                .unwrap();
            }),
            expect: vec!["echo.so: mode 0666 is group- or world-writable".into()],
        },
        BadCase {
            name: "group-writable directory",
            setup: Box::new(|dir| {
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o775)).unwrap();
            }),
            expect: vec![
                "plugin directory".into(),
                "mode 0775 is group- or world-writable".into(),
            ],
        },
        BadCase {
            name: "symlink",
            setup: Box::new(|dir| {
                std::os::unix::fs::symlink(
                    bins().dir.join("libbaton_echo.so"),
                    dir.join("echo.so"),
                )
                .unwrap();
            }),
            expect: vec!["echo.so: is a symlink".into()],
        },
    ];

    let load = Load::start(
        baton.addr(),
        LoadSpec {
            path: "/hello".into(),
            keepalive: 8,
            ..LoadSpec::default()
        },
    );
    let (serving_gen, serving_pids) = baton.serving().await.unwrap();
    for (i, case) in cases.iter().enumerate() {
        let dir = plugin_dir(tmp.path(), &format!("case{i}"), &["hello"]);
        (case.setup)(&dir);
        let mut config = TestConfig {
            port: base.port,
            ready_timeout: "5s",
            ..with_plugins(&dir)
        };
        if case.name == "init panic" {
            config.extra = "[plugins.settings.faulty]\npanic_in_init = true\n".into();
        }
        baton.write_config(&config.render());
        let out = baton.upgrade_wait().await;
        assert_eq!(out.code, Some(1), "{}: {}", case.name, out.text());
        for e in &case.expect {
            assert!(
                out.text().contains(e.as_str()),
                "{}: upgrade output lacks {e:?}:\n{}",
                case.name,
                out.text()
            );
        }
        assert_eq!(
            baton.serving().await,
            Some((serving_gen, serving_pids.clone())),
            "{}: the serving generation changed",
            case.name
        );
        let check = run_cli(&["check"], &baton.config_path).await;
        assert_eq!(
            check.code,
            Some(1),
            "{}: check must fail: {}",
            case.name,
            check.text()
        );
        for e in &case.expect {
            assert!(
                check.stderr.contains(e.as_str()),
                "{}: check lacks {e:?}:\n{}",
                case.name,
                check.text()
            );
        }
    }
    assert!(serving_pids.iter().all(|&p| procfs::alive(p)));
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "failed requests: {:#?}", counts.failures);
    assert!(counts.ok() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_swaps_a_plugin_dropped_in_by_mv_without_losing_a_request() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &[]);
    let source = Path::new("plugins/c-hello/hello.c");
    compile_c_plugin(
        source,
        &dir.join("c_hello.so"),
        &["C_HELLO_VERSION=\"1.0.0\""],
    );
    let baton = Baton::start(TestConfig {
        watch: true,
        ..with_plugins(&dir)
    })
    .await;
    let load = Load::start(
        baton.addr(),
        LoadSpec {
            path: "/c/hello".into(),
            keepalive: 16,
            ..LoadSpec::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Built elsewhere (a dotfile is ignored), then moved in: the usual deploy.
    let staged = compile_c_plugin(
        source,
        &tmp.path().join("c_hello.so.new"),
        &[
            "C_HELLO_VERSION=\"2.0.0\"",
            "C_HELLO_GREETING=\"hello again from C\"",
        ],
    );
    std::fs::rename(&staged, dir.join("c_hello.so")).unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        let (code, body) = get(baton.addr(), "/c/hello").await.unwrap();
        assert_eq!(code, 200);
        if body.contains("version 2.0.0") {
            assert!(body.starts_with("hello again from C!"), "{body}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v2 never served; log:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    baton.wait_settled().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "failed requests: {:#?}", counts.failures);
    // A change that leaves the set of hashes as it was starts nothing.
    let before = baton.status().await["generations"][0]["number"].clone();
    std::fs::write(dir.join(".ignored.so"), "a dotfile").unwrap();
    std::fs::write(dir.join("notes.tmp"), "not a plugin").unwrap();
    let bytes = std::fs::read(dir.join("c_hello.so")).unwrap();
    std::fs::write(dir.join("c_hello.so"), bytes).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(baton.status().await["generations"][0]["number"], before);
    assert!(
        baton.log().contains("not the plugin set: no upgrade"),
        "{}",
        baton.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copying_over_a_loaded_plugin_crashes_nothing() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["hello"]);
    let baton = Baton::start(with_plugins(&dir)).await;
    let (_, pids) = baton.serving().await.unwrap();
    let load = Load::start(
        baton.addr(),
        LoadSpec {
            path: "/hello".into(),
            keepalive: 16,
            ..LoadSpec::default()
        },
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    // `cp` truncates and rewrites the file in place: a mapped library would crash.
    for other in ["echo", "slow", "hello"] {
        std::fs::copy(
            bins().dir.join(format!("libbaton_{other}.so")),
            dir.join("libbaton_hello.so"),
        )
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "failed requests: {:#?}", counts.failures);
    assert_eq!(
        baton.serving().await.unwrap().1,
        pids,
        "a worker crashed or was replaced"
    );
    let status = baton.status().await;
    assert_eq!(status["generations"][0]["restarts"], 0, "{status:#}");
}

async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    out
}
