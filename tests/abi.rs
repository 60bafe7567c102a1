//! Plugin ABI versions end to end: a plugin built against the frozen 1.0 header loads and
//! serves in this (1.1) host next to 1.1 plugins, and a plugin built for a newer minor is
//! refused with a message that says so, while the serving generation keeps serving.
#![forbid(unsafe_code)]

use baton_tests::{
    Baton, TestConfig, compile_c_plugin, compile_c_plugin_with, get, plugin_dir, run_cli,
};
use std::path::Path;

fn with_plugins(dir: &Path) -> TestConfig {
    TestConfig {
        plugins_dir: Some(dir.to_owned()),
        processes: 1,
        ..TestConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_the_frozen_1_0_header_serves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["hello"]);
    compile_c_plugin_with(
        Path::new("tests/harness/abi-1.0"),
        Path::new("tests/harness/abi10_plugin.c"),
        &dir.join("abi10.so"),
        &[],
    );
    let baton = Baton::start(with_plugins(&dir)).await;
    let (_, pids) = baton.serving().await.unwrap();

    let (code, body) = get(baton.addr(), "/abi10/ada").await.unwrap();
    assert_eq!(code, 200, "{body}\nlog:\n{}", baton.log());
    assert_eq!(
        body,
        format!(
            "hello ada from ABI 1.0 (GET, generation 1, pid {})\n",
            pids[0]
        )
    );
    // The 1.1 plugin next to it serves too.
    let (code, _) = get(baton.addr(), "/hello/ada").await.unwrap();
    assert_eq!(code, 200);
    let status = baton.status().await;
    let plugins = status["generations"][0]["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 2, "{status:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_for_abi_1_2_is_refused_and_named() {
    let tmp = tempfile::tempdir().unwrap();
    let good = plugin_dir(tmp.path(), "good", &["hello"]);
    let baton = Baton::start(with_plugins(&good)).await;
    let serving = baton.serving().await;

    let bad = plugin_dir(tmp.path(), "bad", &["hello"]);
    // bad_plugin.c with NEWER_MINOR declares BATON_ABI_MINOR + 1 = 2.
    compile_c_plugin(
        Path::new("tests/harness/bad_plugin.c"),
        &bad.join("bad.so"),
        &["NEWER_MINOR"],
    );
    let expected = "bad.so: built for plugin ABI 1.2, newer than this Baton's 1.1";
    baton.write_config(
        &TestConfig {
            port: baton.config.port,
            ..with_plugins(&bad)
        }
        .render(),
    );
    let check = run_cli(&["check"], &baton.config_path).await;
    assert_eq!(check.code, Some(1), "{}", check.text());
    assert!(check.stderr.contains(expected), "{}", check.text());

    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(out.text().contains(expected), "{}", out.text());
    assert_eq!(
        baton.serving().await,
        serving,
        "the serving generation changed"
    );
    let (code, _) = get(baton.addr(), "/hello").await.unwrap();
    assert_eq!(code, 200);
}
