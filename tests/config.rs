//! Bad configs: a clear message naming the key and line, exit status 1, nothing started.
#![forbid(unsafe_code)]

use baton_tests::{TestConfig, WAIT, bins, free_port, run_cli};
use std::path::Path;

fn write(dir: &Path, text: &str) -> std::path::PathBuf {
    let path = dir.join("baton.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn run_and_expect_failure(config: &Path, expect: &[&str]) {
    let out = tokio::time::timeout(WAIT, run_cli(&["run"], config))
        .await
        .expect("baton run with a bad config must exit");
    assert_eq!(out.code, Some(1), "{}", out.text());
    for e in expect {
        assert!(out.stderr.contains(e), "stderr lacks {e:?}: {}", out.stderr);
    }
    // Nothing was started: no control socket was left, and no worker was spawned.
    assert!(
        !config.with_file_name(".baton-run/baton.sock").exists(),
        "a control socket was left behind"
    );
    assert!(
        !out.stderr.contains("started in slot"),
        "a worker was started: {}",
        out.stderr
    );
}

#[tokio::test]
async fn check_accepts_a_good_config_and_reports_what_it_found() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), &TestConfig::default().render());
    let out = run_cli(&["check"], &config).await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(
        out.stdout.contains("OK") && out.stdout.contains("listener \"http\""),
        "{}",
        out.text()
    );
}

#[tokio::test]
async fn the_example_config_is_valid() {
    // The example points at target/release; check it against this build's plugins.
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/baton.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let plugin_dir = bins().baton.parent().unwrap().display().to_string();
    let dir = tempfile::tempdir().unwrap();
    let text = text
        .replace(
            "dir = \"../target/release\"",
            &format!("dir = \"{plugin_dir}\""),
        )
        .replace(
            "address = \"127.0.0.1:8080\"",
            &format!("address = \"127.0.0.1:{}\"", free_port()),
        )
        .replace(
            "path = \"baton-worker\"",
            &format!("path = \"{}\"", bins().worker.display()),
        );
    let config = write(dir.path(), &text);
    let out = run_cli(&["check"], &config).await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    for plugin in ["plugin hello", "plugin echo", "plugin slow"] {
        assert!(
            out.stdout.contains(plugin),
            "{plugin} missing: {}",
            out.stdout
        );
    }
}

#[tokio::test]
async fn bad_configs_are_refused_by_check_and_run_with_key_and_line() {
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "unknown key",
            TestConfig { extra: "[http]\nkeepalive = \"5s\"\n".into(), ..TestConfig::default() }.render(),
            vec!["baton.toml:14:", "unknown field `keepalive`", "(in [http])"],
        ),
        (
            "bad address",
            "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1\"\n".into(),
            vec!["baton.toml:3: listener.address:", "\"127.0.0.1\" is not an address"],
        ),
        (
            "bad duration",
            TestConfig { ready_timeout: "ten seconds", ..TestConfig::default() }.render(),
            vec!["baton.toml:9: worker.ready_timeout:", "\"ten seconds\" is not a duration"],
        ),
        (
            "bad size",
            TestConfig { extra: "[http]\nmax_body_bytes = \"1 Mbit\"\n".into(), ..TestConfig::default() }.render(),
            vec!["baton.toml:14: http.max_body_bytes:", "\"1 Mbit\" is not a size", "\"64KiB\""],
        ),
        (
            "no listener",
            "[worker]\nprocesses = 1\n".into(),
            vec!["at least one [[listener]] is required"],
        ),
        (
            "wrong type",
            "[[listener]]\nname = \"http\"\naddress = \"127.0.0.1:1\"\n[worker]\nprocesses = \"two\"\n".into(),
            vec!["baton.toml:5:", "invalid type"],
        ),
    ];
    for (name, text, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        let config = write(dir.path(), &text);
        let out = run_cli(&["check"], &config).await;
        assert_eq!(out.code, Some(1), "{name}: {}", out.text());
        for e in &expect {
            assert!(
                out.stderr.contains(e),
                "{name}: check output lacks {e:?}: {}",
                out.stderr
            );
        }
        run_and_expect_failure(&config, &expect).await;
    }
}

#[tokio::test]
async fn a_port_in_use_fails_run_with_the_address() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &TestConfig {
            port,
            ..TestConfig::default()
        }
        .render(),
    );
    run_and_expect_failure(
        &config,
        &[
            &format!("listener \"http\": cannot listen on 127.0.0.1:{port}"),
            "Address already in use",
        ],
    )
    .await;
    // Said once, not twice.
    let out = run_cli(&["run"], &config).await;
    assert_eq!(
        out.stderr.matches("Address already in use").count(),
        1,
        "{}",
        out.text()
    );
    // `check` refuses what `run` refuses.
    let out = run_cli(&["check"], &config).await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains(&format!(
            "listener \"http\" (line 1): 127.0.0.1:{port} is in use by another process"
        )),
        "{}",
        out.text()
    );
}

#[tokio::test]
async fn a_missing_worker_binary_fails_check() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &TestConfig {
            worker_path: Some(dir.path().join("nope")),
            port: free_port(),
            ..TestConfig::default()
        }
        .render(),
    );
    let out = run_cli(&["check"], &config).await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains("worker.path") && out.stderr.contains("cannot execute worker"),
        "{}",
        out.text()
    );
}

#[tokio::test]
async fn an_unreadable_config_is_refused_saying_why_once() {
    // A directory passes the owner and mode checks, then cannot be read.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::create_dir(&config).unwrap();
    for command in ["check", "run"] {
        let out = tokio::time::timeout(WAIT, run_cli(&[command], &config))
            .await
            .expect("baton must exit");
        assert_eq!(out.code, Some(1), "{command}: {}", out.text());
        assert!(
            out.stderr
                .contains(&format!("cannot read {}: Is a directory", config.display())),
            "{command}: {}",
            out.text()
        );
        assert_eq!(
            out.stderr.matches("Is a directory").count(),
            1,
            "{command}: {}",
            out.text()
        );
    }
}

#[tokio::test]
async fn clients_report_an_unreachable_supervisor_with_status_two() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(dir.path(), &TestConfig::default().render());
    for args in [&["status"][..], &["upgrade", "--wait"], &["stop"]] {
        let out = run_cli(args, &config).await;
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.text());
        assert!(
            out.stderr.contains("no supervisor is listening on")
                && out
                    .stderr
                    .contains(&format!("is `baton run -c {}` running", config.display())),
            "{args:?}: {}",
            out.text()
        );
    }
    // No config where it was looked for: say so, and how to name one.
    let missing = dir.path().join("nope.toml");
    let out = run_cli(&["status"], &missing).await;
    assert_eq!(out.code, Some(2), "{}", out.text());
    assert!(
        out.stderr
            .contains(&format!("cannot read the config {}", missing.display()))
            && out.stderr.contains("No such file")
            && out.stderr.contains("-c FILE or BATON_CONFIG"),
        "{}",
        out.text()
    );
}

#[tokio::test]
async fn run_exits_when_generation_1_cannot_be_prepared() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let plugins = baton_tests::plugin_dir(dir.path(), "plugins", &["hello"]);
    let plugin = plugins.join("libbaton_hello.so");
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o666)).unwrap();
    let config = write(
        dir.path(),
        &TestConfig {
            plugins_dir: Some(plugins.clone()),
            port: free_port(),
            ..TestConfig::default()
        }
        .render(),
    );
    let out = tokio::time::timeout(WAIT, run_cli(&["run"], &config))
        .await
        .expect("baton run must exit when generation 1 cannot start");
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains("generation 1 could not start")
            && out.stderr.contains(&plugin.display().to_string())
            && out.stderr.contains("mode 0666"),
        "{}",
        out.text()
    );
}

#[tokio::test]
async fn a_control_socket_directory_others_can_enter_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = write(
        dir.path(),
        &TestConfig {
            port: free_port(),
            extra: format!("[control]\nsocket = \"{}/baton.sock\"\n", open.display()),
            ..TestConfig::default()
        }
        .render(),
    );
    let out = tokio::time::timeout(WAIT, run_cli(&["run"], &config))
        .await
        .expect("baton run must refuse to start");
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr
            .contains(&format!("control socket directory {}", open.display()))
            && out.stderr.contains("mode 0755"),
        "{}",
        out.text()
    );
    assert!(!open.join("baton.sock").exists());
    // `check` says the same, so `ExecStartPre=baton check` stops it.
    let out = run_cli(&["check"], &config).await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr
            .contains(&format!("control socket directory {}", open.display()))
            && out.stderr.contains("mode 0755"),
        "{}",
        out.text()
    );

    // A directory that does not exist yet is created private.
    let private = dir.path().join("private");
    let config = write(
        dir.path(),
        &TestConfig {
            port: free_port(),
            extra: format!("[control]\nsocket = \"{}/baton.sock\"\n", private.display()),
            ..TestConfig::default()
        }
        .render(),
    );
    let mut baton = tokio::process::Command::new(&bins().baton)
        .args(["run", "-c"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = baton_tests::eventually(WAIT, || private.join("baton.sock").exists()).await;
    assert!(up, "no control socket in {}", private.display());
    let mode = std::fs::metadata(&private).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o700);
    let out = run_cli(&["status"], &config).await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(baton_tests::terminate(&mut baton).await, Some(0));
}

#[tokio::test]
async fn completions_and_man_pages_come_from_the_cli_definitions() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(&bins().baton)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let script = dir.path().join("baton.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for word in [
        "upgrade",
        "--wait",
        "--timeout",
        "status",
        "--json",
        "--config",
    ] {
        assert!(text.contains(word), "{word} missing from the completions");
    }
    // Valid bash, which defines the completion.
    let check = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source '{}' && complete -p baton",
            script.display()
        ))
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let pages = dir.path().join("man1");
    let out = std::process::Command::new(&bins().baton)
        .args(["manpage", "--dir"])
        .arg(&pages)
        .output()
        .unwrap();
    assert!(out.status.success());
    for page in ["baton.1", "baton-run.1", "baton-upgrade.1", "baton-check.1"] {
        let text = std::fs::read_to_string(pages.join(page)).unwrap();
        assert!(text.starts_with(".ie") || text.contains(".TH"), "{page}");
    }
    let top = std::fs::read_to_string(pages.join("baton.1")).unwrap();
    assert!(
        top.contains("SIGUSR2") && top.contains("Exit status"),
        "{top}"
    );
}
