//! Crashes, stops and listeners: a killed worker is replaced, a killed supervisor leaves
//! no orphans, SIGTERM finishes requests in flight, and every listener kind serves.
#![forbid(unsafe_code)]

use baton_tests::{
    Baton, TestConfig, WAIT, bins, eventually, free_port, get, get_unix, heavy, procfs, terminate,
};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_replaced_and_service_continues() {
    let baton = Baton::start(TestConfig::default()).await;
    let (generation, pids) = baton.serving().await.unwrap();
    let victim = pids[0];
    kill(Pid::from_raw(victim as i32), Signal::SIGKILL).unwrap();

    // Replaced in the same generation, with the restart counted.
    let deadline = Instant::now() + WAIT;
    let status = loop {
        let s = baton.status().await;
        let g = &s["generations"][0];
        let pids: Vec<u64> = g["pids"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_u64())
            .collect();
        if g["restarts"] == 1
            && pids.len() == 2
            && !pids.contains(&(victim as u64))
            && g["workers"][0]["state"] == "ready"
        {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "worker not replaced: {s:#}\nlog:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status["generations"][0]["number"], generation, "{status:#}");
    assert_eq!(status["generations"].as_array().unwrap().len(), 1);
    assert!(
        baton.log().contains("replacing it in"),
        "the log does not say the worker is replaced"
    );

    // Service continues: every request on fresh connections is answered.
    for _ in 0..20 {
        let (code, body) = get(baton.addr(), "/_baton/health")
            .await
            .expect("request after a crash");
        assert_eq!(code, 200, "{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_of_a_killed_supervisor_exit_on_their_own() {
    let mut baton = Baton::start(TestConfig {
        drain_timeout: "3s",
        ..TestConfig::default()
    })
    .await;
    let workers = baton.worker_pids();
    assert_eq!(workers.len(), 2);
    baton.signal(Signal::SIGKILL);
    baton.wait_exit(WAIT).await;
    // Each worker sees its lifeline close, drains and exits within drain_timeout.
    let gone = eventually(Duration::from_secs(3), || {
        workers.iter().all(|&p| !procfs::alive(p))
    })
    .await;
    assert!(
        gone,
        "orphaned workers: {:?}",
        workers
            .iter()
            .filter(|&&p| procfs::alive(p))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_requests_in_flight_finish_then_exits_zero() {
    let _heavy = heavy().await;
    let mut baton = Baton::start(TestConfig::default()).await;
    // A request whose body is still arriving when the stop begins.
    let mut conn = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    conn.write_all(b"GET /_baton/health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello")
        .await
        .unwrap();
    // Wait until a worker reports holding the connection (counters come once a second).
    let deadline = Instant::now() + WAIT;
    while baton.status().await["generations"][0]["connections"].as_u64() < Some(1) {
        assert!(
            Instant::now() < deadline,
            "the connection was never reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let workers = baton.worker_pids();
    baton.signal(Signal::SIGTERM);
    // Longer than drain_idle_grace (500ms): the request is in flight, not idle.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        workers.iter().any(|&p| procfs::alive(p)),
        "workers exited with a request in flight"
    );
    conn.write_all(b"world").await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, conn.read_to_string(&mut response))
        .await
        .expect("response in time")
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    assert_eq!(
        baton.wait_exit(WAIT).await,
        Some(0),
        "log:\n{}",
        baton.log()
    );
    assert!(workers.iter().all(|&p| !procfs::alive(p)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_stop_wait_drains_and_exits_zero() {
    let mut baton = Baton::start(TestConfig::default()).await;
    let workers = baton.worker_pids();
    let out = baton.cli(&["stop", "--wait"]).await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(out.stdout.contains("stopped"), "{}", out.text());
    assert_eq!(baton.wait_exit(WAIT).await, Some(0));
    assert!(workers.iter().all(|&p| !procfs::alive(p)));
    // The control socket is gone with it: status now reports the supervisor unreachable.
    let out = baton.cli(&["status"]).await;
    assert_eq!(out.code, Some(2), "{}", out.text());
    assert!(
        out.stderr.contains("no supervisor is listening"),
        "{}",
        out.text()
    );
}

/// `SCHED_BATCH` and `SCHED_OTHER` (sched.h).
const SCHED_BATCH: u32 = 3;
const SCHED_OTHER: u32 = 0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_run_under_sched_batch_unless_told_to_inherit() {
    let threads = |extra: &str| TestConfig {
        threads: 2,
        extra: extra.to_owned(),
        ..TestConfig::default()
    };
    let baton = Baton::start(threads("")).await;
    let (_, pids) = baton.serving().await.unwrap();
    for pid in pids {
        let policies = procfs::policies(pid);
        assert!(
            policies.len() >= 3,
            "main thread and two runtime threads: {policies:?}"
        );
        assert!(
            policies.iter().all(|&p| p == SCHED_BATCH),
            "worker {pid}: {policies:?}"
        );
    }
    let supervisor = procfs::policies(baton.pid);
    assert!(
        supervisor.iter().all(|&p| p == SCHED_OTHER),
        "the supervisor keeps its policy: {supervisor:?}"
    );

    let inherit = Baton::start(threads("scheduling = \"inherit\"\n")).await;
    let (_, pids) = inherit.serving().await.unwrap();
    for pid in pids {
        let policies = procfs::policies(pid);
        assert!(
            !policies.is_empty() && policies.iter().all(|&p| p == SCHED_OTHER),
            "worker {pid}: {policies:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigquit_kills_the_workers_and_exits() {
    let mut baton = Baton::start(TestConfig {
        drain_timeout: "60s",
        ..TestConfig::default()
    })
    .await;
    // An idle keep-alive connection would hold a graceful drain for the grace period.
    let _idle = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    let workers = baton.worker_pids();
    baton.signal(Signal::SIGQUIT);
    assert_eq!(
        baton.wait_exit(WAIT).await,
        Some(0),
        "log:\n{}",
        baton.log()
    );
    assert!(workers.iter().all(|&p| !procfs::alive(p)));
    assert!(
        baton.log().contains("killing workers"),
        "log:\n{}",
        baton.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_on_ipv4_ipv6_and_unix_listeners() {
    let v6_port = free_port();
    let has_v6 = std::net::TcpListener::bind(("::1", 0)).is_ok();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("http.sock");
    let mut extra = format!(
        "[[listener]]\nname = \"local\"\naddress = \"unix:{}\"\n",
        sock.display()
    );
    if has_v6 {
        extra += &format!("[[listener]]\nname = \"v6\"\naddress = \"[::1]:{v6_port}\"\n");
    }
    let baton = Baton::start(TestConfig {
        extra,
        ..TestConfig::default()
    })
    .await;
    let (code, body) = get(baton.addr(), "/_baton/health").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = get_unix(&sock, "/_baton/health").await.unwrap();
    assert_eq!(code, 200, "{body}");
    if has_v6 {
        let (code, body) = get(
            ("::1".parse::<std::net::IpAddr>().unwrap(), v6_port).into(),
            "/_baton/health",
        )
        .await
        .unwrap();
        assert_eq!(code, 200, "{body}");
    } else {
        eprintln!("skipping the IPv6 listener: ::1 is not available here");
    }
    let (code, _) = get(baton.addr(), "/nope").await.unwrap();
    assert_eq!(code, 404);
    // The listeners survive upgrades: same sockets, new workers.
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    let (code, body) = get_unix(&sock, "/_baton/health").await.unwrap();
    assert_eq!(
        (code, body.contains("\"generation\":2")),
        (200, true),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adopts_listeners_from_systemd_socket_activate() {
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("activated.sock");
    let config = dir.path().join("baton.toml");
    // No addresses: both listeners must come from the activation fds, by name.
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"web\"\n[[listener]]\nname = \"local\"\n[worker]\npath = \"{}\"\nthreads = 1\n",
            bins().worker.display()
        ),
    )
    .unwrap();
    let mut child = socket_activated(
        &[format!("127.0.0.1:{port}"), sock.display().to_string()],
        "web:local",
        &config,
        &dir.path().join("baton.log"),
    )
    .await;
    let (code, body) = get(([127, 0, 0, 1], port).into(), "/_baton/health")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let (code, body) = get_unix(&sock, "/_baton/health").await.unwrap();
    assert_eq!(code, 200, "{body}");

    let status = baton_tests::run_cli(&["status", "--json"], &config).await;
    let status: serde_json::Value = serde_json::from_str(&status.stdout).expect("status JSON");
    for l in status["listeners"].as_array().unwrap() {
        assert_eq!(l["origin"], "systemd", "{status:#}");
    }
    let log_text = std::fs::read_to_string(dir.path().join("baton.log")).unwrap();
    assert!(
        log_text.contains("from systemd socket activation"),
        "{log_text}"
    );
    assert_eq!(terminate(&mut child).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_systemd_does_not_pass_are_bound_by_baton() {
    let (activated, own) = (free_port(), free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        format!(
            "[[listener]]\nname = \"web\"\naddress = \"127.0.0.1:{activated}\"\n[[listener]]\nname = \"admin\"\naddress = \"127.0.0.1:{own}\"\n[worker]\npath = \"{}\"\nthreads = 1\n",
            bins().worker.display()
        ),
    )
    .unwrap();
    let log_path = dir.path().join("baton.log");
    let mut child = socket_activated(
        &[format!("127.0.0.1:{activated}")],
        "web",
        &config,
        &log_path,
    )
    .await;
    let (code, _) = get(([127, 0, 0, 1], activated).into(), "/_baton/health")
        .await
        .unwrap();
    assert_eq!(code, 200);
    // The supervisor bound the listener systemd did not pass.
    let (code, _) = get(([127, 0, 0, 1], own).into(), "/_baton/health")
        .await
        .unwrap();
    assert_eq!(code, 200);
    let status = baton_tests::run_cli(&["status", "--json"], &config).await;
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    let origin = |name: &str| {
        status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .map(|l| l["origin"].clone())
    };
    assert_eq!(origin("web"), Some("systemd".into()), "{status:#}");
    assert_eq!(origin("admin"), Some("config".into()), "{status:#}");
    let text = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        text.contains("listener \"web\": 1 fd(s) from systemd socket activation"),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "listener \"admin\": bound 127.0.0.1:{own} from the config"
        )),
        "{text}"
    );
    assert_eq!(terminate(&mut child).await, Some(0));
}

/// Runs `baton run -c config` under systemd-socket-activate listening on `listen` (the
/// first a TCP address) with `fdnames`, and returns once the TCP address accepts (baton
/// is exec'd on the first connection, which waits in the backlog).
async fn socket_activated(
    listen: &[String],
    fdnames: &str,
    config: &std::path::Path,
    log: &std::path::Path,
) -> tokio::process::Child {
    let Ok(tool) = which("systemd-socket-activate") else {
        panic!("systemd-socket-activate is required (Debian package systemd); .ci/run installs it");
    };
    let log = std::fs::File::create(log).unwrap();
    let mut cmd = tokio::process::Command::new(tool);
    for l in listen {
        cmd.arg("-l").arg(l);
    }
    let child = cmd
        .arg(format!("--fdname={fdnames}"))
        .arg(&bins().baton)
        .args(["run", "-c"])
        .arg(config)
        .env_remove("NOTIFY_SOCKET")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let tcp = listen[0].clone();
    let listening = eventually(WAIT, || std::net::TcpStream::connect(&tcp).is_ok()).await;
    assert!(listening, "systemd-socket-activate did not listen on {tcp}");
    child
}

fn which(tool: &str) -> Result<std::path::PathBuf, ()> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keepalive_connection_is_handed_off_with_connection_close() {
    use http_body_util::{BodyExt, Empty};
    let baton = Baton::start(TestConfig {
        drain_idle_grace: "3s",
        ..TestConfig::default()
    })
    .await;
    let stream = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = || {
        http::Request::get("/_baton/health")
            .header("host", "x")
            .body(Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let first = sender.send_request(request()).await.unwrap();
    assert!(first.headers().get("connection").is_none(), "{first:?}");
    let body = first.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("\"generation\":1"));

    // SIGHUP upgrades too; the connection is now idle on a draining worker.
    baton.signal(Signal::SIGHUP);
    baton.wait_serving(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Within the grace its next request is still answered, with Connection: close.
    sender
        .ready()
        .await
        .expect("the idle connection was closed at once");
    let second = sender
        .send_request(request())
        .await
        .expect("request on the draining connection");
    assert_eq!(second.status(), 200);
    assert_eq!(
        second.headers().get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let body = second.into_body().collect().await.unwrap().to_bytes();
    assert!(
        String::from_utf8_lossy(&body).contains("\"generation\":1"),
        "served by the old generation"
    );
    // And the old generation then finishes its drain well before the grace ends.
    let status = baton.status().await;
    assert_eq!(status["last_upgrade"]["result"], "succeeded", "{status:#}");
    let settled = baton.wait_settled().await;
    assert_eq!(settled["generations"][0]["number"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_listener_change_keeps_the_serving_sockets() {
    let base = TestConfig {
        ready_timeout: "2s",
        ..TestConfig::default()
    };
    let baton = Baton::start(base.clone()).await;
    let scripts = tempfile::tempdir().unwrap();
    // Move the listener to another port with a worker that fails: rolled back.
    let moved = TestConfig {
        port: free_port(),
        worker_path: Some(baton_tests::fake_worker_script(scripts.path(), "exit")),
        ..base.clone()
    };
    baton.write_config(&moved.render());
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    // Back to the original config: the serving generation's socket is reused, not rebound.
    baton.write_config(&base.render());
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}\nlog:\n{}", out.text(), baton.log());
    let (code, body) = get(baton.addr(), "/_baton/health").await.unwrap();
    assert_eq!(code, 200, "{body}");
    // And the port of the failed attempt was let go once nothing used it.
    let released = eventually(WAIT, || {
        std::net::TcpListener::bind(("127.0.0.1", moved.port)).is_ok()
    })
    .await;
    assert!(released, "the rolled-back listener's port is still bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_force_closed_for_room_exits_then_even_with_blocking_handlers() {
    let tmp = tempfile::tempdir().unwrap();
    let plugins = baton_tests::plugin_dir(tmp.path(), "plugins", &["slow"]);
    let baton = Baton::start(TestConfig {
        processes: 1,
        max_generations: 2,
        drain_timeout: "60s",
        drain_idle_grace: "500ms",
        plugins_dir: Some(plugins),
        extra: "[plugins.settings.slow]\nmax_ms = 50000\n".into(),
        ..TestConfig::default()
    })
    .await;
    // Two requests that block a handler thread for 50 s each, on generation 1.
    let addr = baton.addr();
    let slow: Vec<_> = (0..2)
        .map(|_| tokio::spawn(baton_tests::get(addr, "/slow/50000")))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = baton.worker_pids();
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    // Generation 1 drains, held by its blocking handlers; generation 2 serves. A second
    // upgrade needs room: generation 1 is force-closed after drain_idle_grace, and its
    // worker must really exit then, not at drain_timeout (60 s).
    let started = Instant::now();
    let out = baton.upgrade_wait().await;
    let took = started.elapsed();
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(
        first.iter().all(|&p| !procfs::alive(p)),
        "generation 1's worker is still alive:\n{}",
        baton.log()
    );
    assert!(
        took < Duration::from_secs(30),
        "the upgrade waited {took:?}: the force-closed worker waited for its blocking handlers\n{}",
        baton.log()
    );
    assert!(
        baton.log().contains("force-closing draining generation 1"),
        "{}",
        baton.log()
    );
    eprintln!("second upgrade took {took:?} (drain_idle_grace 500ms)");
    for request in slow {
        request.abort();
    }
}

/// Sends a request for the health path on `stream` and reads its whole answer (sized).
async fn health_on(stream: &mut tokio::net::TcpStream) -> String {
    stream
        .write_all(b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let l = l.to_ascii_lowercase();
                    l.strip_prefix("content-length: ")
                        .map(|v| v.trim().parse().unwrap())
                })
                .expect("a sized answer");
            if got.len() >= end + 4 + length {
                return text;
            }
        }
        let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed after {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_wait_in_the_idle_set_and_close_with_a_fin_at_a_drain() {
    const HELD: usize = 300;
    let baton = Baton::start(TestConfig {
        drain_idle_grace: "1s",
        ..TestConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..HELD {
        let mut stream = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
        let answer = health_on(&mut stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        held.push(stream);
    }
    // The workers report them idle in their idle sets (reports come once a second).
    let deadline = Instant::now() + WAIT;
    loop {
        let status = baton.status().await;
        let g = &status["generations"][0];
        if g["idle"].as_u64() == Some(HELD as u64) {
            assert_eq!(g["connections"].as_u64(), Some(HELD as u64), "{status:#}");
            break;
        }
        assert!(Instant::now() < deadline, "not all idle: {status:#}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Out of the set, each is served again (and goes back).
    for stream in held.iter_mut().step_by(3) {
        let answer = health_on(stream).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"generation\":1"), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    // An upgrade: after drain_idle_grace every one is closed with a FIN, never a reset.
    let began = Instant::now();
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for mut stream in held {
        let mut rest = Vec::new();
        tokio::time::timeout(WAIT, stream.read_to_end(&mut rest))
            .await
            .expect("closed after the grace")
            .expect("a FIN, not a reset");
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }
    assert!(
        began.elapsed() >= Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
    let settled = baton.wait_settled().await;
    assert_eq!(settled["generations"][0]["number"], 2);
}

/// The generation's `idle` count, while `until` runs: the highest seen.
async fn most_idle(baton: &Baton, number: u64, until: impl std::future::Future) -> u64 {
    let mut most = 0;
    let watch = async {
        loop {
            most = most.max(baton.generation_count(number, "idle").await.unwrap_or(0));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = until => {}
        () = watch => {}
    }
    most
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_leave_h2_between_requests_of_a_real_client() {
    // h2load (nghttp2): 40 clients over HTTP/2 with prior knowledge, 4 requests each, a
    // second apart. The connection's clock ticks every 200 ms, so each pause is long enough
    // for the connection to leave h2 and wait in the idle set.
    const CLIENTS: u64 = 40;
    let baton = Baton::start(TestConfig {
        extra: "[http]\nheader_read_timeout = \"400ms\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let url = format!("http://{}/_baton/health", baton.addr());
    let n = (CLIENTS * 4).to_string();
    let clients = CLIENTS.to_string();
    let run = tokio::process::Command::new("h2load")
        .args(["-c", &clients, "-n", &n, "--rps", "1", &url])
        .kill_on_drop(true)
        .output();
    let run = tokio::time::timeout(Duration::from_secs(30), run);
    let (idle, out) = {
        let mut out = None;
        let idle = most_idle(&baton, 1, async {
            out = Some(
                run.await
                    .expect("h2load within 30 s")
                    .expect("h2load (Debian package nghttp2-client)"),
            );
        })
        .await;
        (idle, out.expect("h2load ran"))
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "{n} total, {n} started, {n} done, {n} succeeded, 0 failed"
        )),
        "{text}"
    );
    // Between requests the clients wait in the idle set (the count is reported once a
    // second, so a few may be under way each time).
    assert!(
        idle >= CLIENTS * 3 / 4,
        "at most {idle} of {CLIENTS} idle: {text}"
    );
    // Every request was served by this generation (counts come once a second).
    baton.wait_count(1, "requests", CLIENTS * 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http2_connections_get_a_goaway_at_once_when_a_drain_begins() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    const HELD: u64 = 100;
    let baton = Baton::start(TestConfig {
        // Long, so that a close after the grace would show.
        drain_idle_grace: "5s",
        ..TestConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..HELD {
        let stream = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        let conn = tokio::spawn(conn);
        let request = http::Request::get(format!("http://{}/_baton/health", baton.addr()))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        held.push((sender, conn));
    }
    baton.wait_count(1, "idle", HELD).await;
    // Each client's connection ends without an error: a GOAWAY, then the close. Before
    // the grace is over: a GOAWAY tells an HTTP/2 client to go elsewhere at once.
    let began = Instant::now();
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{out:?}");
    for (sender, conn) in held {
        let ended = tokio::time::timeout(WAIT, conn)
            .await
            .expect("the connection ended")
            .unwrap();
        assert!(ended.is_ok(), "{ended:?}");
        assert!(sender.is_closed());
    }
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(baton.generation_count(1, "requests").await, None);
    assert_eq!(baton.wait_settled().await["generations"][0]["number"], 2);
}
