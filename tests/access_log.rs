//! The access log: a line per request with the usual fields, in the combined format and
//! as JSON lines, written by the workers; `SIGUSR1` to the supervisor makes them reopen
//! the file (logrotate renames it first), and no line is lost across the rotation or an
//! upgrade.
#![forbid(unsafe_code)]

use baton_tests::{Baton, TestConfig, WAIT, eventually, get, plugin_dir};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;

async fn start(format: &str) -> (Baton, tempfile::TempDir) {
    let plugins = baton_tests::traversable_tempdir("baton-plugins");
    let dir = plugin_dir(plugins.path(), "plugins", &["hello"]);
    let baton = Baton::start(TestConfig {
        plugins_dir: Some(dir),
        // Relative: next to the config file, in the test's directory.
        extra: format!("\n[log]\naccess = \"access.log\"\naccess_format = \"{format}\"\n"),
        ..TestConfig::default()
    })
    .await;
    (baton, plugins)
}

fn log_path(baton: &Baton) -> PathBuf {
    baton.dir.path().join("access.log")
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Waits until `path` holds `n` lines (the writer collects a few times a second).
async fn wait_lines(path: &Path, n: usize) -> Vec<String> {
    let held = eventually(WAIT, || lines(path).len() >= n).await;
    let got = lines(path);
    assert!(
        held,
        "{} holds {} line(s), not {n}",
        path.display(),
        got.len()
    );
    got
}

async fn request_with_agent(baton: &Baton, path: &str, agent: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\nReferer: http://r/\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    stream.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    text[9..12].parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_lines_carry_the_usual_fields() {
    let (baton, _plugins) = start("combined").await;
    assert_eq!(
        request_with_agent(&baton, "/hello?x=1", "tester/1.0").await,
        200
    );
    assert_eq!(
        request_with_agent(&baton, "/missing", "tester/1.0").await,
        404
    );
    let got = wait_lines(&log_path(&baton), 2).await;
    let pids = baton.serving().await.unwrap().1;
    // 127.0.0.1 - - [27/Nov/2026:16:12:13 +0000] "GET /hello?x=1 HTTP/1.1" 200 6
    //   "http://r/" "tester/1.0" 0.000123 1 4242
    // Two workers: their lines come in either order.
    let first = got
        .iter()
        .find(|l| l.contains("/hello?x=1"))
        .expect("the /hello line");
    let missing = got
        .iter()
        .find(|l| l.contains("/missing"))
        .expect("the 404 line");
    assert!(first.starts_with("127.0.0.1 - - ["), "{first}");
    assert!(
        first.contains("+0000] \"GET /hello?x=1 HTTP/1.1\" 200 "),
        "{first}"
    );
    assert!(first.contains(" \"http://r/\" \"tester/1.0\" "), "{first}");
    let fields: Vec<&str> = first.rsplitn(4, ' ').collect();
    let (pid, generation, duration) = (fields[0], fields[1], fields[2]);
    assert!(
        pids.contains(&pid.parse().unwrap()),
        "{first}: pid of {pids:?}"
    );
    assert_eq!(generation, "1", "{first}");
    assert!(duration.parse::<f64>().unwrap() < 5.0, "{first}");
    let bytes: u64 = first
        .split("HTTP/1.1\" 200 ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(bytes > 0, "{first}");
    assert!(
        missing.contains("\"GET /missing HTTP/1.1\" 404 "),
        "{missing}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_lines_parse_and_carry_the_usual_fields() {
    let (baton, _plugins) = start("json").await;
    assert_eq!(
        request_with_agent(&baton, "/hello", "quote \" and \\ back").await,
        200
    );
    let got = wait_lines(&log_path(&baton), 1).await;
    let line: Value = serde_json::from_str(&got[0]).expect("a JSON line");
    assert_eq!(line["client"], "127.0.0.1");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/hello");
    assert_eq!(line["status"], 200);
    assert_eq!(line["generation"], 1);
    assert_eq!(line["user_agent"], "quote \" and \\ back");
    assert!(line["bytes"].as_u64().unwrap() > 0);
    assert!(line["duration"].as_f64().unwrap() >= 0.0);
    assert!(line["time"].as_str().unwrap().ends_with('Z'));
    let pids = baton.serving().await.unwrap().1;
    assert!(pids.contains(&(line["pid"].as_u64().unwrap() as u32)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_and_an_upgrade_lose_no_line() {
    let (baton, _plugins) = start("json").await;
    let path = log_path(&baton);
    let rotated = baton.dir.path().join("access.log.1");
    let mut sent = 0;
    for _ in 0..100 {
        assert_eq!(get(baton.addr(), "/hello").await.unwrap().0, 200);
        sent += 1;
    }
    // logrotate without copytruncate: rename, then tell the service.
    std::fs::rename(&path, &rotated).unwrap();
    baton.signal(nix::sys::signal::Signal::SIGUSR1);
    let reopened = eventually(WAIT, || path.exists()).await;
    assert!(reopened, "no new file after SIGUSR1\nlog:\n{}", baton.log());
    for _ in 0..100 {
        assert_eq!(get(baton.addr(), "/hello").await.unwrap().0, 200);
        sent += 1;
    }
    // A new generation opens the file too; the old one's last lines are flushed at exit.
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    for _ in 0..50 {
        assert_eq!(get(baton.addr(), "/hello").await.unwrap().0, 200);
        sent += 1;
    }
    let held = eventually(WAIT, || lines(&path).len() + lines(&rotated).len() >= sent).await;
    let (old, new) = (lines(&rotated), lines(&path));
    assert!(
        held,
        "{} + {} lines for {sent} requests",
        old.len(),
        new.len()
    );
    assert_eq!(old.len() + new.len(), sent);
    assert!(
        old.len() >= 100 && new.len() >= 50,
        "{} / {}",
        old.len(),
        new.len()
    );
    let generations: std::collections::BTreeSet<u64> = new
        .iter()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["generation"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(generations.contains(&2), "{generations:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        lines(&rotated).len() + lines(&path).len(),
        sent,
        "no line twice"
    );
}
