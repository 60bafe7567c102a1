//! Every way a new generation can fail is rolled back: the serving generation keeps
//! serving untouched, and the reason reaches `baton upgrade --wait`, `baton status` and
//! the log.
#![forbid(unsafe_code)]

use baton_tests::{
    Baton, Load, LoadSpec, TestConfig, WAIT, eventually, fake_worker_script, heavy, procfs,
};
use std::time::Duration;

/// A cause of failure: the config to upgrade to and what the report must say.
struct Case {
    name: &'static str,
    config: String,
    expect: Vec<&'static str>,
    /// `rolled_back` (a generation was started and killed) or `refused` (none started).
    result: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failed_upgrade_leaves_the_serving_generation_untouched() {
    let _heavy = heavy().await;
    let base = TestConfig {
        ready_timeout: "1s",
        ..TestConfig::default()
    };
    let baton = Baton::start(base.clone()).await;
    let dir = baton.dir.path().to_owned();
    let with = |f: &dyn Fn(&mut TestConfig)| {
        let mut c = base.clone();
        f(&mut c);
        c.render()
    };
    let not_executable = dir.join("not-executable");
    std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_port = held.local_addr().unwrap().port();

    let cases = vec![
        Case {
            name: "exits before READY",
            config: with(&|c| c.worker_path = Some(fake_worker_script(&dir, "exit"))),
            expect: vec![
                "exited (exit status: 3) before READY",
                "cannot open /nonexistent/data",
            ],
            result: "rolled_back",
        },
        Case {
            name: "not READY within ready_timeout",
            config: with(&|c| c.worker_path = Some(fake_worker_script(&dir, "hang"))),
            expect: vec!["not READY within ready_timeout (1s)"],
            result: "rolled_back",
        },
        Case {
            name: "cannot be executed (missing)",
            config: with(&|c| c.worker_path = Some(dir.join("no-such-worker"))),
            expect: vec!["cannot execute worker", "no-such-worker", "No such file"],
            result: "refused",
        },
        Case {
            name: "cannot be executed (not executable)",
            config: with(&|c| c.worker_path = Some(not_executable.clone())),
            expect: vec!["cannot execute worker", "not executable"],
            result: "refused",
        },
        Case {
            name: "reports a start-up failure",
            config: with(&|c| c.worker_path = Some(fake_worker_script(&dir, "report"))),
            expect: vec!["reported: failed: fake worker: database unreachable"],
            result: "rolled_back",
        },
        Case {
            name: "speaks a worker protocol this supervisor does not",
            config: with(&|c| c.worker_path = Some(fake_worker_script(&dir, "old-protocol"))),
            expect: vec!["speaks worker protocol 0, older than this release"],
            result: "rolled_back",
        },
        Case {
            name: "unknown key",
            config: with(&|c| c.extra = "bogus_key = 1\n".into()),
            expect: vec![
                "invalid config",
                "baton.toml:13",
                "bogus_key",
                "(in [worker])",
            ],
            result: "refused",
        },
        Case {
            name: "bad duration",
            config: with(&|c| c.drain_timeout = "soon"),
            expect: vec![
                "invalid config",
                "baton.toml:10: worker.drain_timeout",
                "\"soon\"",
            ],
            result: "refused",
        },
        Case {
            name: "bad address",
            config: with(&|c| {
                c.extra = "[[listener]]\nname = \"more\"\naddress = \"nowhere:80\"\n".into()
            }),
            expect: vec!["invalid config", "listener.address", "nowhere:80"],
            result: "refused",
        },
        Case {
            name: "port in use",
            config: with(&|c| {
                c.extra =
                    format!("[[listener]]\nname = \"more\"\naddress = \"127.0.0.1:{held_port}\"\n")
            }),
            expect: vec![
                "listener \"more\"",
                &*format!("127.0.0.1:{held_port}").leak(),
                "Address already in use",
            ],
            result: "refused",
        },
    ];

    let load = Load::start(baton.addr(), LoadSpec::default());
    let (serving_gen, serving_pids) = baton.serving().await.expect("generation 1 serves");
    for case in &cases {
        let alive_before = procfs::children(baton.pid).len();
        baton.write_config(&case.config);
        let out = baton.upgrade_wait().await;
        assert_eq!(
            out.code,
            Some(1),
            "{}: upgrade --wait must exit 1: {}",
            case.name,
            out.text()
        );
        for e in &case.expect {
            assert!(
                out.text().contains(e),
                "{}: output lacks {e:?}: {}",
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
        let status = baton.status().await;
        let last = &status["last_upgrade"];
        assert_eq!(last["result"], case.result, "{}: {status:#}", case.name);
        assert!(
            last["reason"]
                .as_str()
                .unwrap_or_default()
                .contains(case.expect[0]),
            "{}: status lacks the reason: {status:#}",
            case.name
        );
        // The failed generation's processes are gone.
        let settled = eventually(WAIT, || procfs::children(baton.pid).len() <= alive_before).await;
        assert!(
            settled,
            "{}: failed workers left behind: {:?}",
            case.name,
            procfs::children(baton.pid)
        );
        assert!(
            baton.log().contains(case.expect[0]),
            "{}: the log lacks the reason",
            case.name
        );
    }
    drop(held);

    // The serving generation was never disturbed, and a good upgrade still works.
    baton.write_config(&base.render());
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let counts = load.stop().await;
    assert_eq!(counts.failed, 0, "failed requests: {:#?}", counts.failures);
    assert!(counts.ok() > 0);
}
