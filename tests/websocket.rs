//! WebSocket routes end to end: a real client (tokio-tungstenite) against a C plugin
//! built from the 1.1 header alone (tests/harness/ws_plugin.c), through a real `baton`.
#![forbid(unsafe_code)]

use baton_tests::{Baton, TestConfig, WAIT, compile_c_plugin, get, heavy};
use futures_util::{SinkExt, StreamExt};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Client = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// A baton serving the WebSocket test plugin (built with `defines`), with `extra` config.
async fn start(tmp: &Path, defines: &[&str], extra: &str, processes: usize) -> Baton {
    let dir = tmp.join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    compile_c_plugin(
        Path::new("tests/harness/ws_plugin.c"),
        &dir.join("ws_test.so"),
        defines,
    );
    Baton::start(TestConfig {
        processes,
        plugins_dir: Some(dir),
        extra: extra.into(),
        ..TestConfig::default()
    })
    .await
}

async fn connect(baton: &Baton, path: &str) -> Client {
    let url = format!("ws://{}{path}", baton.addr());
    connect_async(url.as_str())
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
        .0
}

/// The next message that is not a ping or pong, within `WAIT`.
async fn next(client: &mut Client) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, client.next())
            .await
            .expect("a message within the deadline")
            .expect("the connection is open")
            .expect("no error");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

/// Reads until the server's close frame: its code. Then the connection must end cleanly.
async fn close_code(client: &mut Client) -> u16 {
    let code = match next(client).await {
        Message::Close(Some(frame)) => u16::from(frame.code),
        other => panic!("expected a close frame, got {other:?}"),
    };
    // The close handshake completes: the stream ends without an error (no reset).
    loop {
        match tokio::time::timeout(WAIT, client.next())
            .await
            .expect("ends")
        {
            None => break,
            Some(Ok(_)) => {}
            Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => break,
            Some(Err(e)) => panic!("the connection ended with an error: {e}"),
        }
    }
    code
}

/// The plugin's counters from its HTTP route.
async fn stats(baton: &Baton) -> String {
    let (status, body) = get(baton.addr(), "/ws/stats").await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

/// Waits until the plugin's counters satisfy `done`.
async fn wait_stats(baton: &Baton, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let s = stats(baton).await;
        if done(&s) {
            return s;
        }
        assert!(Instant::now() < deadline, "{s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stat(stats: &str, name: &str) -> i64 {
    stats
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} in {stats}"))
}

#[tokio::test]
async fn echo_text_binary_fragments_ping_and_close_codes() {
    let tmp = tempfile::tempdir().unwrap();
    let baton = start(tmp.path(), &[], "", 1).await;
    let mut ws = connect(&baton, "/ws/echo").await;

    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("hello"));
    ws.send(Message::binary(vec![0u8, 1, 255])).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(vec![0u8, 1, 255]));

    // A message in three fragments arrives whole.
    for (data, opcode, fin) in [
        ("hel", OpCode::Data(Data::Text), false),
        ("lo wo", OpCode::Data(Data::Continue), false),
        ("rld", OpCode::Data(Data::Continue), true),
    ] {
        ws.send(Message::Frame(Frame::message(data, opcode, fin)))
            .await
            .unwrap();
    }
    assert_eq!(next(&mut ws).await, Message::text("hello world"));

    // A ping is answered with its payload.
    ws.send(Message::Ping("are you there".into()))
        .await
        .unwrap();
    let pong = loop {
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Pong(p))) => break p,
            Some(Ok(Message::Ping(_))) => {}
            other => panic!("expected a pong, got {other:?}"),
        }
    };
    assert_eq!(&pong[..], b"are you there");

    ws.send(Message::text("whoami")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("gen=1"));

    // The plugin closes with its own code.
    ws.send(Message::text("close:4001")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 4001);

    // The client closes: its code is echoed, and the plugin is told.
    let mut ws = connect(&baton, "/ws/echo").await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Away,
        reason: "leaving".into(),
    }))
    .await
    .unwrap();
    assert_eq!(close_code(&mut ws).await, 1001);
    let s = wait_stats(&baton, |s| stat(s, "closes") == 2).await;
    assert_eq!(stat(&s, "opens"), 2, "{s}");
    assert_eq!(stat(&s, "last_close"), 1001, "{s}");
}

#[tokio::test]
async fn too_big_is_1009_bad_utf8_is_1007_refused_is_403_plain_get_is_426() {
    let tmp = tempfile::tempdir().unwrap();
    let baton = start(
        tmp.path(),
        &[],
        "[websocket]\nmax_message_bytes = 4096\n",
        1,
    )
    .await;

    // The configured limit, also over fragments.
    let mut ws = connect(&baton, "/ws/echo").await;
    ws.send(Message::binary(vec![7u8; 4096])).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(vec![7u8; 4096]));
    for fin in [false, true] {
        let opcode = if fin {
            OpCode::Data(Data::Continue)
        } else {
            OpCode::Data(Data::Binary)
        };
        let _ = ws
            .send(Message::Frame(Frame::message(vec![1u8; 3000], opcode, fin)))
            .await;
    }
    assert_eq!(close_code(&mut ws).await, 1009);

    // A route's own limit.
    let mut ws = connect(&baton, "/ws/small").await;
    ws.send(Message::binary(vec![1u8; 1024])).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::binary(vec![1u8; 1024]));
    let _ = ws.send(Message::binary(vec![1u8; 1025])).await;
    assert_eq!(close_code(&mut ws).await, 1009);

    // Text that is not UTF-8 (sent as a raw frame: the client would not build it).
    let mut ws = connect(&baton, "/ws/echo").await;
    let _ = ws
        .send(Message::Frame(Frame::message(
            vec![b'a', 0xff, 0xfe],
            OpCode::Data(Data::Text),
            true,
        )))
        .await;
    assert_eq!(close_code(&mut ws).await, 1007);

    // The plugin refuses: 403, and no connection.
    let url = format!("ws://{}/ws/refuse", baton.addr());
    match connect_async(url.as_str()).await {
        Err(WsError::Http(response)) => assert_eq!(response.status(), 403),
        other => panic!("expected a 403, got {other:?}"),
    }
    // A plain GET to a WebSocket route.
    let (status, body) = get(baton.addr(), "/ws/echo").await.unwrap();
    assert_eq!(status, 426, "{body}");
    // The other routes are untouched.
    assert_eq!(get(baton.addr(), "/ws/stats").await.unwrap().0, 200);
}

/// Sends a WebSocket handshake on a raw socket and reads the 101's head.
async fn raw_upgrade(baton: &Baton, path: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed before the 101");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    s
}

#[tokio::test]
async fn an_idle_client_is_pinged_and_one_that_never_answers_is_closed() {
    let tmp = tempfile::tempdir().unwrap();
    let baton = start(
        tmp.path(),
        &[],
        "[websocket]\nping_interval = \"200ms\"\nping_timeout = \"300ms\"\n",
        1,
    )
    .await;
    // A client that answers pings (tungstenite does) stays open well past the timeout.
    let mut ws = connect(&baton, "/ws/echo").await;
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        if let Ok(Some(Ok(Message::Ping(_)))) =
            tokio::time::timeout(Duration::from_millis(100), ws.next()).await
        {
            pings += 1;
        }
    }
    assert!(pings >= 2, "{pings} pings");
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(next(&mut ws).await, Message::text("still here"));

    // A client that reads but never answers: a ping, then a close (1011), then the end.
    let mut raw = raw_upgrade(&baton, "/ws/echo").await;
    let mut seen = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), raw.read_to_end(&mut seen))
        .await
        .expect("closed by the server")
        .expect("no reset");
    assert_eq!(seen.first(), Some(&0x89), "a ping first: {seen:?}");
    let close = seen
        .windows(4)
        .position(|w| w[0] == 0x88 && w[2..4] == 1011u16.to_be_bytes());
    assert!(close.is_some(), "a close frame with 1011: {seen:?}");
}

/// The resident memory of `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_and_memory_stays_bounded() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let baton = start(
        tmp.path(),
        &[],
        "[websocket]\nsend_queue_bytes = \"1MiB\"\nslow_reader_close_code = 1011\n",
        1,
    )
    .await;
    let (_, pids) = baton.serving().await.unwrap();
    let before = rss(pids[0]);
    // The plugin's thread sends 64 MB/s until it is told the client is closed. A client
    // that reads keeps up: 32 MiB arrive, and it is not closed.
    let mut reader = connect(&baton, "/ws/flood").await;
    let mut read = 0;
    while read < 32 << 20 {
        match next(&mut reader).await {
            Message::Binary(b) => read += b.len(),
            other => panic!("the reading client got {other:?}"),
        }
    }
    drop(reader);
    let s = wait_stats(&baton, |s| {
        stat(s, "flood_done") == 1 && stat(s, "closes") == 1
    })
    .await;
    let taken = stat(&s, "flood_bytes");

    // One that never reads is closed once its queue overflows.
    let raw = raw_upgrade(&baton, "/ws/flood").await;
    let deadline = Instant::now() + WAIT;
    let mut peak = 0;
    let s = loop {
        peak = peak.max(rss(pids[0]));
        let s = stats(&baton).await;
        if stat(&s, "flood_done") == 2 && stat(&s, "closes") == 2 {
            break s;
        }
        assert!(Instant::now() < deadline, "not closed: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let sent = stat(&s, "flood_bytes") - taken;
    // Closed for being slow, with the configured code (what the plugin is told).
    assert_eq!(stat(&s, "last_close"), 1011, "{s}");
    eprintln!(
        "slow reader: {} MiB taken from the plugin before it was closed; worker RSS {} -> {} MiB",
        sent >> 20,
        before >> 20,
        peak >> 20
    );
    // The queue (1 MiB), tungstenite's buffer and the sockets' buffers: far below 64 MiB.
    assert!(sent < 64 << 20, "{sent} bytes taken from the plugin");
    assert!(
        peak < before + (48 << 20),
        "worker RSS grew from {before} to {peak}"
    );
    drop(raw);
    baton.wait_count(1, "websockets", 0).await;
}

#[tokio::test]
async fn a_blocking_plugin_gets_its_messages_in_order() {
    let tmp = tempfile::tempdir().unwrap();
    let baton = start(tmp.path(), &["BLOCKING"], "", 1).await;
    let mut ws = connect(&baton, "/ws/echo").await;
    for i in 0..200 {
        ws.feed(Message::text(i.to_string())).await.unwrap();
    }
    ws.flush().await.unwrap();
    for i in 0..200 {
        assert_eq!(next(&mut ws).await, Message::text(i.to_string()));
    }
    ws.send(Message::text("close:1000")).await.unwrap();
    assert_eq!(close_code(&mut ws).await, 1000);
}

#[tokio::test]
async fn a_client_gone_while_a_blocking_open_runs_still_gets_its_close_callback() {
    let tmp = tempfile::tempdir().unwrap();
    let baton = start(tmp.path(), &["BLOCKING"], "", 1).await;
    // The handshake, then gone before the plugin's 300 ms `ws_open` returns.
    let mut s = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    s.write_all(
        b"GET /ws/slowopen HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    drop(s);
    // The plugin accepted it, so it is told it closed (cut off: 1006), once.
    let s = wait_stats(&baton, |s| stat(s, "closes") == 1).await;
    assert_eq!(stat(&s, "opens"), 1, "{s}");
    assert_eq!(stat(&s, "last_close"), 1006, "{s}");
    baton.wait_count(1, "websockets", 0).await;
}

#[tokio::test]
async fn across_an_upgrade_every_client_gets_1012_spread_out_and_reconnects() {
    let _heavy = heavy().await;
    const CLIENTS: usize = 120;
    const SPREAD: Duration = Duration::from_secs(2);
    let tmp = tempfile::tempdir().unwrap();
    // `extra` continues the harness's [worker] table.
    let baton = start(tmp.path(), &[], "drain_spread = \"2s\"\n", 2).await;

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let mut ws = connect(&baton, "/ws/echo").await;
        ws.send(Message::text("whoami")).await.unwrap();
        assert_eq!(next(&mut ws).await, Message::text("gen=1"));
        clients.push(ws);
    }
    baton.wait_count(1, "websockets", CLIENTS as u64).await;
    // Quiet, they wait in the idle sets: the drain brings each back at its place in the
    // spread, to be closed.
    baton.wait_count(1, "idle", CLIENTS as u64).await;

    let upgraded = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            let addr = baton.addr();
            tokio::spawn(async move {
                let code = close_code(&mut ws).await;
                let after = upgraded.elapsed();
                // Reconnect: the next generation serves it.
                let url = format!("ws://{addr}/ws/echo");
                let mut ws = connect_async(url.as_str()).await.expect("reconnect").0;
                ws.send(Message::text("whoami")).await.unwrap();
                let generation = next(&mut ws).await;
                (code, after, generation, ws)
            })
        })
        .collect();
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    let mut closes = Vec::new();
    let mut reconnected = Vec::new();
    for task in tasks {
        let (code, after, generation, ws) = task.await.expect("client task");
        assert_eq!(code, 1012, "service restart");
        assert_eq!(generation, Message::text("gen=2"));
        closes.push(after);
        reconnected.push(ws);
    }
    closes.sort();
    let (first, last) = (closes[0], closes[CLIENTS - 1]);
    eprintln!(
        "{CLIENTS} clients closed with 1012 from {first:?} to {last:?} after the upgrade began"
    );
    // Within the window (and the time the upgrade took to start the new generation)...
    assert!(
        last < SPREAD + Duration::from_secs(5),
        "last close after {last:?}"
    );
    // ...and spread over it, not all at once.
    assert!(
        last - first > SPREAD / 3,
        "closes from {first:?} to {last:?}: not spread"
    );
    baton.wait_count(2, "websockets", CLIENTS as u64).await;
    let log = baton.log();
    assert!(!log.contains("drain forced"), "{log}");
}

#[tokio::test]
async fn a_generation_force_closed_for_room_closes_its_websockets_at_once() {
    let _heavy = heavy().await;
    const CLIENTS: usize = 20;
    let tmp = tempfile::tempdir().unwrap();
    // A window so long that the spread alone would close almost none of them.
    let dir = tmp.path().join("plugins");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    compile_c_plugin(
        Path::new("tests/harness/ws_plugin.c"),
        &dir.join("ws_test.so"),
        &[],
    );
    let baton = Baton::start(TestConfig {
        processes: 1,
        plugins_dir: Some(dir),
        drain_timeout: "120s",
        max_generations: 2,
        extra: "drain_spread = \"100s\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(connect(&baton, "/ws/echo").await);
    }
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { close_code(&mut ws).await }))
        .collect();
    // Generation 1 drains; generation 3 needs its room: generation 1 is force-closed.
    for _ in 0..2 {
        let out = baton.upgrade_wait().await;
        assert_eq!(out.code, Some(0), "{}", out.text());
    }
    let forced = Instant::now();
    for task in tasks {
        assert_eq!(task.await.unwrap(), 1012);
    }
    // Long before the spread window or drain_timeout.
    assert!(
        forced.elapsed() < Duration::from_secs(10),
        "{:?}",
        forced.elapsed()
    );
    assert!(
        baton_tests::eventually(WAIT, || baton
            .log()
            .contains("drain forced: closing 20 WebSocket"))
        .await,
        "{}",
        baton.log()
    );
    // Every connection ended (its `ws_close` called) before the worker exited: the plugin
    // was shut down, not skipped.
    assert!(
        baton_tests::eventually(WAIT, || baton.log().contains("generation gone")).await,
        "{}",
        baton.log()
    );
    assert!(
        !baton.log().contains("skipping plugin shutdown"),
        "{}",
        baton.log()
    );
}

/// Connects `n` clients to the echo route, each asking which generation serves it.
async fn connect_many(baton: &Baton, n: usize, generation: u64) -> Vec<Client> {
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut ws = connect(baton, "/ws/echo").await;
        ws.send(Message::text("whoami")).await.unwrap();
        assert_eq!(
            next(&mut ws).await,
            Message::text(format!("gen={generation}"))
        );
        clients.push(ws);
    }
    clients
}

#[tokio::test]
async fn a_thousand_clients_across_five_upgrades_each_see_1012_and_reconnect() {
    let _heavy = heavy().await;
    const CLIENTS: usize = 1000;
    const SPREAD: Duration = Duration::from_secs(2);
    let tmp = tempfile::tempdir().unwrap();
    let baton = start(tmp.path(), &[], "drain_spread = \"2s\"\n", 2).await;
    let (_, pids) = baton.serving().await.unwrap();
    let before: u64 = pids.iter().map(|&p| rss(p)).sum();
    let mut clients = connect_many(&baton, CLIENTS, 1).await;
    let after: u64 = pids.iter().map(|&p| rss(p)).sum();
    eprintln!(
        "{CLIENTS} idle WebSockets: worker RSS {} -> {} KiB, {} bytes per connection",
        before >> 10,
        after >> 10,
        after.saturating_sub(before) / CLIENTS as u64
    );
    for generation in 2..=6u64 {
        let upgraded = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut ws| {
                let addr = baton.addr();
                tokio::spawn(async move {
                    let code = close_code(&mut ws).await;
                    let after = upgraded.elapsed();
                    let url = format!("ws://{addr}/ws/echo");
                    let mut ws = connect_async(url.as_str()).await.expect("reconnect").0;
                    ws.send(Message::text("whoami")).await.unwrap();
                    let answer = next(&mut ws).await;
                    (code, after, answer, ws)
                })
            })
            .collect();
        let out = baton.upgrade_wait().await;
        assert_eq!(out.code, Some(0), "{}", out.text());
        clients = Vec::with_capacity(CLIENTS);
        let mut last = Duration::ZERO;
        for task in tasks {
            let (code, after, answer, ws) = task.await.expect("client task");
            // A reset or an abnormal close fails in `close_code`.
            assert_eq!(code, 1012);
            assert_eq!(answer, Message::text(format!("gen={generation}")));
            last = last.max(after);
            clients.push(ws);
        }
        assert!(
            last < SPREAD + Duration::from_secs(10),
            "last close after {last:?}"
        );
        eprintln!("upgrade to generation {generation}: last 1012 after {last:?}");
    }
    baton.wait_count(6, "websockets", CLIENTS as u64).await;
    assert!(!baton.log().contains("drain forced"), "{}", baton.log());
}

#[tokio::test]
async fn websockets_count_under_max_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let baton = start(tmp.path(), &[], "[http]\nmax_connections = 2\n", 1).await;
    let first = connect(&baton, "/ws/echo").await;
    let mut second = connect(&baton, "/ws/echo").await;
    // A third waits in the backlog while both are open...
    let url = format!("ws://{}/ws/echo", baton.addr());
    let mut third = tokio::spawn(async move { connect_async(url.as_str()).await.map(|c| c.0) });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "a connection above max_connections was served"
    );
    // ...and is served once one of them closes.
    drop(first);
    let mut third = tokio::time::timeout(WAIT, third)
        .await
        .expect("served after a close")
        .unwrap()
        .expect("connected");
    third.send(Message::text("hi")).await.unwrap();
    assert_eq!(next(&mut third).await, Message::text("hi"));
    second.send(Message::text("still")).await.unwrap();
    assert_eq!(next(&mut second).await, Message::text("still"));
}
