//! What is hashed is what runs: the artifact cache, the config and the plugin directory
//! against other users and careless writers. Each test plants or swaps files the way an
//! attacker (uid 65534) or a slip of root's would, and checks that the planted bytes never
//! run and that the serving generation is untouched.
#![forbid(unsafe_code)]

use baton_tests::{Baton, TestConfig, get, plugin_dir, run_cli};
use sha2::Digest;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

const NOBODY: u32 = 65534;

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap();
    sha2::Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs a shell command as uid/gid 65534.
fn as_nobody(script: &str) {
    use std::os::unix::process::CommandExt;
    let status = std::process::Command::new("sh")
        .args(["-c", script])
        .uid(NOBODY)
        .gid(NOBODY)
        .status()
        .unwrap();
    assert!(status.success(), "as nobody: {script}");
}

/// The hello plugin's cached name and bytes, as generation 1 got them.
fn cached_plugin(status: &serde_json::Value, cache: &Path) -> PathBuf {
    let hash = status["generations"][0]["plugins"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    cache.join(format!("{hash}.so"))
}

/// The same bytes with the last one changed: the same size, another hash.
fn same_size_other_bytes(path: &Path) -> Vec<u8> {
    let mut bytes = std::fs::read(path).unwrap();
    *bytes.last_mut().unwrap() ^= 0xff;
    bytes
}

/// Writes `bytes` to `path` by a new file renamed into place, mode 0444.
fn plant(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("planting");
    std::fs::write(&tmp, bytes).unwrap();
    chmod(&tmp, 0o444);
    std::fs::rename(&tmp, path).unwrap();
}

/// `check` and `run` both exit 1 with a message that contains every one of `needles`.
async fn refused_by_check_and_run(config: &Path, needles: &[&str]) {
    for command in ["check", "run"] {
        let out = run_cli(&[command], config).await;
        assert_eq!(out.code, Some(1), "{command}: {}", out.text());
        assert!(
            needles.iter().all(|n| out.stderr.contains(n)),
            "{command}: {needles:?} not all in:\n{}",
            out.text()
        );
    }
}

async fn hello(baton: &Baton) -> String {
    let (code, body) = get(baton.addr(), "/hello").await.unwrap();
    assert_eq!(code, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_others_can_write_is_refused_by_check_and_run() {
    let tmp = tempfile::tempdir().unwrap();
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let config = open.join("baton.toml");
    std::fs::write(&config, TestConfig::default().render()).unwrap();
    let above = format!("the directory above it, {}", open.display());
    refused_by_check_and_run(&config, &[&above, "mode 0777", "chmod go-w"]).await;
    // The file itself, in a directory that is fine.
    chmod(&open, 0o755);
    chmod(&config, 0o666);
    refused_by_check_and_run(&config, &["mode 0666 is group- or world-writable"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_in_a_directory_others_can_write_is_refused_at_start() {
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let plugins = plugin_dir(tmp.path(), "plugins", &["hello"]);
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    chmod(&open, 0o777);
    let config = tmp.path().join("baton.toml");
    let text = TestConfig {
        plugins_dir: Some(plugins),
        ..TestConfig::default()
    }
    .render();
    let text = text.replace(
        "cache_dir = ",
        &format!(
            "cache_dir = \"{}\"\n# was: ",
            open.join(".baton-cache").display()
        ),
    );
    std::fs::write(&config, text).unwrap();
    let above = format!("the directory above it, {}", open.display());
    refused_by_check_and_run(&config, &["artifact cache", &above, "mode 0777"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_swapped_by_another_user_is_refused_and_the_service_keeps_serving() {
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let plugins = plugin_dir(tmp.path(), "plugins", &["hello"]);
    let baton = Baton::start(TestConfig {
        processes: 1,
        plugins_dir: Some(plugins.clone()),
        ..TestConfig::default()
    })
    .await;
    let before = hello(&baton).await;
    let status = baton.status().await;
    let cache = plugins.with_extension("cache");
    let cached = cached_plugin(&status, &cache);
    let planted = same_size_other_bytes(&cached);
    // The slip: the directory holding the cache is given to another user. That user
    // swaps the cache for one of their own, with a same-size plugin under the cached name.
    let parent = tmp.path().join("handed-over");
    std::fs::create_dir(&parent).unwrap();
    std::fs::rename(&plugins, parent.join("plugins")).unwrap();
    std::fs::rename(&cache, parent.join("plugins.cache")).unwrap();
    let plugins = parent.join("plugins");
    let cache = parent.join("plugins.cache");
    baton.write_config(
        &TestConfig {
            port: baton.config.port,
            processes: 1,
            plugins_dir: Some(plugins.clone()),
            ..TestConfig::default()
        }
        .render(),
    );
    nix::unistd::chown(&parent, Some(NOBODY.into()), Some(NOBODY.into())).unwrap();
    let staged = tmp.path().join("planted.so");
    std::fs::write(&staged, &planted).unwrap();
    chmod(&staged, 0o444);
    let name = cached.file_name().unwrap().to_str().unwrap();
    as_nobody(&format!(
        "cd '{}' && mv plugins.cache old-cache && mkdir plugins.cache && cp '{}' plugins.cache/{name}",
        parent.display(),
        staged.display()
    ));
    assert_eq!(std::fs::metadata(cache.join(name)).unwrap().uid(), NOBODY);

    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains("upgrade refused")
            && out.stderr.contains(&format!("owned by uid {NOBODY}")),
        "{}",
        out.text()
    );
    let status = baton.status().await;
    let generations = status["generations"].as_array().unwrap();
    assert_eq!(generations.len(), 1, "{status:#}");
    assert_eq!(generations[0]["number"], 1);
    assert_eq!(hello(&baton).await, before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_replaced_and_linked_cache_files_never_run() {
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let plugins = plugin_dir(tmp.path(), "plugins", &["hello"]);
    let baton = Baton::start(TestConfig {
        processes: 1,
        plugins_dir: Some(plugins.clone()),
        ..TestConfig::default()
    })
    .await;
    let cache = plugins.with_extension("cache");
    let status = baton.status().await;
    let cached = cached_plugin(&status, &cache);
    let hash = cached.file_stem().unwrap().to_str().unwrap().to_owned();
    let greeting = hello(&baton).await;

    // 1. A same-size file with other bytes under the cached name: hashed again, written
    //    anew, and the upgrade runs the real plugin.
    plant(&cached, &same_size_other_bytes(&cached));
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(
        sha256(&cached),
        hash,
        "the planted file is still in the cache"
    );
    assert!(
        baton.log().contains(&format!(
            "{} is not trusted (its content hashes to",
            cached.display()
        )),
        "{}",
        baton.log()
    );

    // 2. A symlink under the cached name: replaced, never followed.
    let target = tmp.path().join("elsewhere.so");
    std::fs::write(&target, same_size_other_bytes(&cached)).unwrap();
    std::fs::remove_file(&cached).unwrap();
    std::os::unix::fs::symlink(&target, &cached).unwrap();
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(
        !std::fs::symlink_metadata(&cached)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(sha256(&cached), hash);
    assert_eq!(
        std::fs::read(&target).unwrap(),
        same_size_other_bytes(&cached)
    );
    assert!(
        baton.log().contains("is not trusted (it is a symlink)"),
        "{}",
        baton.log()
    );

    // 3. Replaced between check and use: both cached files of the serving generation are
    //    renamed over; a worker restarted in that generation still runs what was hashed.
    let (generation, pids) = baton.serving().await.unwrap();
    let binary = baton.status().await["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["number"] == generation)
        .unwrap()["worker"]["cached"]
        .as_str()
        .unwrap()
        .to_owned();
    let binary = PathBuf::from(binary);
    let binary_hash = sha256(&binary);
    plant(&binary, &same_size_other_bytes(&binary));
    plant(&cached, &same_size_other_bytes(&cached));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut restarted = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Some((g, now)) = baton.serving().await
            && g == generation
            && !now.is_empty()
            && now[0] != pids[0]
        {
            restarted = Some(now[0]);
            break;
        }
    }
    let pid = restarted.unwrap_or_else(|| panic!("no worker restarted:\n{}", baton.log()));
    assert_eq!(sha256(Path::new(&format!("/proc/{pid}/exe"))), binary_hash);
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(
        exe.to_str().unwrap(),
        format!("{} (deleted)", binary.display())
    );
    assert_eq!(
        hello(&baton).await.split_whitespace().next(),
        greeting.split_whitespace().next()
    );

    // The next upgrade finds both names leading to other bytes and writes them anew.
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(
        (sha256(&binary), sha256(&cached)),
        (binary_hash.clone(), hash.clone())
    );

    // 4. Written over in place (root's `cp` ignores mode 0444): a restart of that
    //    generation refuses to hand the file on, and the next upgrade writes it anew.
    let (_, pids) = baton.serving().await.unwrap();
    let plugin = cached.clone();
    std::fs::write(&plugin, same_size_other_bytes(&plugin)).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let refused = baton_tests::eventually(Duration::from_secs(5), || {
        baton
            .log()
            .contains("was written over after it was checked")
    })
    .await;
    assert!(refused, "{}", baton.log());
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(sha256(&plugin), hash);
    hello(&baton).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_still_open_for_writing_is_waited_for_never_loaded_half_written() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    chmod(tmp.path(), 0o755);
    let plugins = plugin_dir(tmp.path(), "plugins", &["hello"]);
    let baton = Baton::start(TestConfig {
        processes: 1,
        plugins_dir: Some(plugins.clone()),
        watch: true,
        ..TestConfig::default()
    })
    .await;
    let whole = std::fs::read(baton_tests::bins().dir.join("libbaton_echo.so")).unwrap();
    let target = plugins.join("libbaton_echo.so");
    // A copy that pauses half-way for far longer than the watcher's debounce (200 ms).
    let mut writer = std::fs::File::create(&target).unwrap();
    writer.write_all(&whole[..whole.len() / 2]).unwrap();
    writer.sync_all().unwrap();
    let waiting = baton_tests::eventually(Duration::from_secs(5), || {
        baton.log().contains(&format!(
            "{} is still open for writing: waiting until its writer closes it",
            target.display()
        ))
    })
    .await;
    assert!(waiting, "{}", baton.log());
    // An upgrade asked for meanwhile is refused, naming the file and why.
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr.contains(&format!(
            "plugin {}: another process still has it open for writing",
            target.display()
        )),
        "{}",
        out.text()
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(baton.serving().await.unwrap().0, 1, "{}", baton.log());
    writer.write_all(&whole[whole.len() / 2..]).unwrap();
    drop(writer);
    baton.wait_serving(2).await;
    let status = baton.status().await;
    let generation = status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["number"] == 2)
        .unwrap()
        .clone();
    let echo = generation["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["file"].as_str().unwrap().ends_with("libbaton_echo.so"))
        .unwrap_or_else(|| panic!("{status:#}"));
    let expected: String = sha2::Sha256::digest(&whole)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(echo["sha256"], expected.as_str(), "{status:#}");
}
