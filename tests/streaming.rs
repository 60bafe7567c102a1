//! The ABI 1.1 examples end to end, with real clients: server-sent events from `ticker`
//! (deferred answers, cancellation, the drain), WebSocket rooms from `chat` and the C
//! WebSocket echo (tokio-tungstenite clients), and `files`' streamed download and upload
//! of 1 GiB each, hashed byte for byte while the worker's memory stays flat.
#![forbid(unsafe_code)]

use baton_tests::{Baton, TestConfig, WAIT, compile_c_plugin, get, heavy, plugin_dir};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Starts Baton with one worker serving the named example plugins.
async fn start(plugins: &[&str]) -> (tempfile::TempDir, Baton) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", plugins);
    let baton = Baton::start(TestConfig {
        plugins_dir: Some(dir),
        processes: 1,
        ..TestConfig::default()
    })
    .await;
    (tmp, baton)
}

/// Opens a GET on a fresh connection and returns the response head and its body, to be
/// read frame by frame.
async fn open(
    addr: std::net::SocketAddr,
    path: &str,
) -> (http::response::Parts, hyper::body::Incoming) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(WAIT, sender.send_request(request))
        .await
        .expect("no answer within WAIT")
        .unwrap();
    response.into_parts()
}

/// The next data frame of a body: `Some(bytes)`, `None` at its (clean) end; panics on an
/// error or after WAIT.
async fn next_data(body: &mut hyper::body::Incoming) -> Option<Bytes> {
    loop {
        let frame = tokio::time::timeout(WAIT, body.frame())
            .await
            .expect("no frame within WAIT")?
            .expect("the body ended with an error");
        if let Ok(data) = frame.into_data() {
            return Some(data);
        }
    }
}

/// Reads server-sent events until `n` complete ones arrived (or the body ended).
async fn read_events(body: &mut hyper::body::Incoming, buf: &mut String, n: usize) -> bool {
    while buf.matches("\n\n").count() < n {
        match next_data(body).await {
            Some(data) => buf.push_str(std::str::from_utf8(&data).unwrap()),
            None => return false,
        }
    }
    true
}

fn events(n: std::ops::Range<u64>) -> String {
    n.map(|i| format!("data: {i}\n\n")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_events_arrive_one_by_one_and_the_stream_ends_after_its_count() {
    let (_tmp, baton) = start(&["ticker"]).await;
    let (head, mut body) = open(baton.addr(), "/ticker?count=5").await;
    assert_eq!(head.status, 200, "log:\n{}", baton.log());
    assert_eq!(head.headers["content-type"], "text/event-stream");
    assert_eq!(head.headers["cache-control"], "no-cache");

    let mut text = String::new();
    assert!(read_events(&mut body, &mut text, 1).await);
    let first = Instant::now();
    assert_eq!(text, events(0..1), "the first event came alone");
    while let Some(data) = next_data(&mut body).await {
        text.push_str(std::str::from_utf8(&data).unwrap());
    }
    // Four more ticks of 100 ms each came after the first event: it was streamed, not
    // buffered until the end.
    assert!(
        first.elapsed() >= Duration::from_millis(300),
        "the stream ended {:?} after its first event",
        first.elapsed()
    );
    assert_eq!(text, events(0..5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_work_over_http2_as_over_http1() {
    let (_tmp, baton) = start(&["ticker"]).await;
    let stream = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    // Two streams at once on one connection.
    let mut bodies = Vec::new();
    for count in [3, 5] {
        let request = http::Request::get(format!("http://localhost/ticker?count={count}"))
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let response = tokio::time::timeout(WAIT, sender.send_request(request))
            .await
            .expect("no answer within WAIT")
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.version(), http::Version::HTTP_2);
        bodies.push((count, response.into_body()));
    }
    for (count, mut body) in bodies {
        let mut text = String::new();
        while let Some(data) = next_data(&mut body).await {
            text.push_str(std::str::from_utf8(&data).unwrap());
        }
        assert_eq!(text, events(0..count));
    }
}

/// Open file descriptors of `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

async fn ticker_clients(baton: &Baton) -> String {
    let (code, body) = get(baton.addr(), "/ticker/clients").await.unwrap();
    assert_eq!(code, 200);
    body
}

/// Waits until the ticker holds `n` streams.
async fn wait_clients(baton: &Baton, n: usize) {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = ticker_clients(baton).await;
        if now == format!("{n}\n") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the ticker still holds {now:?} streams, not {n}; log:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_clients_that_go_away_are_seen_by_the_plugin_and_nothing_is_left() {
    let (_tmp, baton) = start(&["ticker"]).await;
    let (_, pids) = baton.serving().await.unwrap();
    wait_clients(&baton, 0).await;
    let fds_before = fds(pids[0]);

    let mut open_streams = Vec::new();
    for _ in 0..20 {
        let (head, mut body) = open(baton.addr(), "/ticker").await;
        assert_eq!(head.status, 200);
        let mut text = String::new();
        assert!(read_events(&mut body, &mut text, 2).await);
        assert!(text.starts_with(&events(0..2)), "{text:?}");
        open_streams.push(body);
    }
    wait_clients(&baton, 20).await;
    drop(open_streams);
    // The next write to each fails with Closed (the cancellation): the plugin drops them.
    wait_clients(&baton, 0).await;

    for _ in 0..200 {
        let (_, mut body) = open(baton.addr(), "/ticker").await;
        let mut text = String::new();
        assert!(read_events(&mut body, &mut text, 1).await);
    }
    wait_clients(&baton, 0).await;
    let settled = baton_tests::eventually(WAIT, || fds(pids[0]) <= fds_before).await;
    assert!(
        settled,
        "the worker holds {} fds, {fds_before} before 220 streams came and went",
        fds(pids[0])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_streams_end_cleanly_when_their_generation_drains() {
    let (_tmp, baton) = start(&["ticker"]).await;
    let (_, mut body) = open(baton.addr(), "/ticker").await;
    let mut text = String::new();
    assert!(read_events(&mut body, &mut text, 2).await);

    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    // The body ends (`next_data` panics on an error: a reset is not a clean end).
    while let Some(data) = next_data(&mut body).await {
        text.push_str(std::str::from_utf8(&data).unwrap());
    }
    assert!(
        text.ends_with("\n\n"),
        "cut in the middle of an event: {text:?}"
    );
    let data: Vec<&str> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|d| *d != "draining")
        .collect();
    let expected: Vec<String> = (0..data.len()).map(|i| i.to_string()).collect();
    assert_eq!(data, expected, "events were lost or repeated: {text:?}");

    // The new generation serves the ticker.
    let (head, mut body) = open(baton.addr(), "/ticker?count=2").await;
    assert_eq!(head.status, 200);
    let mut text = String::new();
    while let Some(data) = next_data(&mut body).await {
        text.push_str(std::str::from_utf8(&data).unwrap());
    }
    assert_eq!(text, events(0..2));
    assert_eq!(baton.serving().await.map(|s| s.0), Some(2));
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn ws_connect(baton: &Baton, path: &str) -> Ws {
    let url = format!("ws://{}{path}", baton.addr());
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("no handshake within WAIT")
        .unwrap_or_else(|e| panic!("connecting to {path}: {e}; log:\n{}", baton.log()));
    assert_eq!(response.status(), 101);
    ws
}

/// The next text or binary message (pings and pongs are skipped).
async fn ws_next(ws: &mut Ws) -> Message {
    loop {
        let message = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no message within WAIT")
            .expect("the connection ended")
            .expect("a WebSocket error");
        if !matches!(message, Message::Ping(_) | Message::Pong(_)) {
            return message;
        }
    }
}

async fn ws_text(ws: &mut Ws) -> String {
    match ws_next(ws).await {
        Message::Text(text) => text.to_string(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_broadcasts_to_everyone_in_the_room_and_no_one_else() {
    let (_tmp, baton) = start(&["chat"]).await;
    let mut alice = ws_connect(&baton, "/chat/lobby?name=alice").await;
    assert_eq!(ws_text(&mut alice).await, "* alice joined");
    let mut bob = ws_connect(&baton, "/chat/lobby?name=bob").await;
    assert_eq!(ws_text(&mut bob).await, "* bob joined");
    assert_eq!(ws_text(&mut alice).await, "* bob joined");
    let mut carol = ws_connect(&baton, "/chat/attic?name=carol").await;
    assert_eq!(ws_text(&mut carol).await, "* carol joined");

    alice.send(Message::text("hello, lobby")).await.unwrap();
    assert_eq!(ws_text(&mut alice).await, "alice: hello, lobby");
    assert_eq!(ws_text(&mut bob).await, "alice: hello, lobby");
    for i in 0..50 {
        bob.send(Message::text(format!("message {i}")))
            .await
            .unwrap();
    }
    for i in 0..50 {
        let expected = format!("bob: message {i}");
        assert_eq!(ws_text(&mut alice).await, expected);
        assert_eq!(ws_text(&mut bob).await, expected);
    }
    // Carol, in another room, heard none of it: her own message is the next she gets.
    carol.send(Message::text("anyone?")).await.unwrap();
    assert_eq!(ws_text(&mut carol).await, "carol: anyone?");

    // Binary is refused with 1003; the room hears that carol left.
    let mut dave = ws_connect(&baton, "/chat/attic?name=dave").await;
    assert_eq!(ws_text(&mut dave).await, "* dave joined");
    assert_eq!(ws_text(&mut carol).await, "* dave joined");
    carol.send(Message::binary(vec![1, 2, 3])).await.unwrap();
    match ws_next(&mut carol).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Unsupported),
        other => panic!("expected a close frame, got {other:?}"),
    }
    assert_eq!(ws_text(&mut dave).await, "* carol left");

    // A normal close: the room is told.
    bob.close(None).await.unwrap();
    assert_eq!(ws_text(&mut alice).await, "* bob left");

    // A bad name is refused at the upgrade.
    let url = format!("ws://{}/chat/lobby?name=no%20spaces", baton.addr());
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected a 403, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_room_of_100_delivers_every_message_to_everyone() {
    const N: usize = 100;
    let (_tmp, baton) = start(&["chat"]).await;
    let mut clients = Vec::new();
    for i in 0..N {
        clients.push(ws_connect(&baton, &format!("/chat/big?name=c{i}")).await);
    }
    // Everyone has heard the last one join.
    let last = format!("* c{} joined", N - 1);
    for ws in &mut clients {
        while ws_text(ws).await != last {}
    }
    for (i, ws) in clients.iter_mut().enumerate() {
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
    }
    let expected: std::collections::BTreeSet<String> =
        (0..N).map(|i| format!("c{i}: m{i}")).collect();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut got = std::collections::BTreeSet::new();
                for _ in 0..N {
                    got.insert(ws_text(&mut ws).await);
                }
                got
            })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_chat_tells_its_rooms_then_they_reconnect_to_the_new_generation() {
    let (_tmp, baton) = start(&["chat"]).await;
    let mut alice = ws_connect(&baton, "/chat/lobby?name=alice").await;
    assert_eq!(ws_text(&mut alice).await, "* alice joined");

    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    // The plugin's drain callback speaks first, then the host closes with 1012.
    assert_eq!(ws_text(&mut alice).await, "* server restarting");
    match ws_next(&mut alice).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Restart),
        other => panic!("expected a close frame 1012, got {other:?}"),
    }

    let mut alice = ws_connect(&baton, "/chat/lobby?name=alice").await;
    assert_eq!(ws_text(&mut alice).await, "* alice joined");
    alice.send(Message::text("back")).await.unwrap();
    assert_eq!(ws_text(&mut alice).await, "alice: back");
    assert_eq!(baton.serving().await.map(|s| s.0), Some(2));
}

/// A chat client that reads all the time (answering pings, as a browser does): what it
/// hears, and how many pings.
struct Member {
    send: futures_util::stream::SplitSink<Ws, Message>,
    heard: tokio::sync::mpsc::UnboundedReceiver<Message>,
    pings: Arc<AtomicU64>,
}

impl Member {
    async fn join(baton: &Baton, path: &str) -> Member {
        let (send, mut read) = ws_connect(baton, path).await.split();
        let (tx, heard) = tokio::sync::mpsc::unbounded_channel();
        let pings = Arc::new(AtomicU64::new(0));
        let counted = pings.clone();
        tokio::spawn(async move {
            while let Some(Ok(message)) = read.next().await {
                match message {
                    Message::Ping(_) => {
                        counted.fetch_add(1, Ordering::SeqCst);
                    }
                    message => {
                        let _ = tx.send(message);
                    }
                }
            }
        });
        Member { send, heard, pings }
    }

    async fn next(&mut self) -> Message {
        tokio::time::timeout(WAIT, self.heard.recv())
            .await
            .expect("no message within WAIT")
            .expect("the connection ended")
    }

    async fn text(&mut self) -> String {
        match self.next().await {
            Message::Text(text) => text.to_string(),
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_chat_clients_wait_in_the_idle_set_and_miss_no_message_ping_or_1012() {
    const CLIENTS: usize = 40;
    const SPREAD: Duration = Duration::from_secs(2);
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["chat"]);
    // Pinged every 4 s: quiet for a second, a connection leaves its task, and waits
    // there about 3 s of every 4 (all at once, as the gauge must see them).
    let baton = Baton::start(TestConfig {
        plugins_dir: Some(dir),
        processes: 1,
        extra: "drain_spread = \"2s\"\n[websocket]\nping_interval = \"4s\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let mut members = Vec::new();
    for i in 0..CLIENTS {
        members.push(Member::join(&baton, &format!("/chat/lobby?name=c{i}")).await);
    }
    for member in &mut members {
        while member.text().await != format!("* c{} joined", CLIENTS - 1) {}
    }
    // Quiet: every connection waits in the idle set, none in a task of its own.
    baton.wait_count(1, "idle", CLIENTS as u64).await;

    // A message to the room reaches everyone: the plugin's sends bring each quiet
    // connection back from the idle set.
    members[0].send.send(Message::text("hello")).await.unwrap();
    for member in &mut members {
        assert_eq!(member.text().await, "c0: hello");
    }
    baton.wait_count(1, "idle", CLIENTS as u64).await;

    // Pings still go out to the connections that wait there, and they stay open.
    let deadline = Instant::now() + WAIT;
    while members.iter().any(|m| m.pings.load(Ordering::SeqCst) == 0) {
        assert!(Instant::now() < deadline, "not every client was pinged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    baton.wait_count(1, "idle", CLIENTS as u64).await;

    // The drain: the plugin's farewell (which brings each back from the idle set), then
    // 1012, spread over the window.
    let upgraded = Instant::now();
    let tasks: Vec<_> = members
        .into_iter()
        .map(|mut member| {
            tokio::spawn(async move {
                assert_eq!(member.text().await, "* server restarting");
                // Those closed before it leave the room meanwhile.
                loop {
                    match member.next().await {
                        Message::Close(Some(frame)) => {
                            assert_eq!(frame.code, CloseCode::Restart);
                            break;
                        }
                        Message::Text(t) if t.ends_with(" left") => {}
                        other => panic!("expected a close frame 1012, got {other:?}"),
                    }
                }
                upgraded.elapsed()
            })
        })
        .collect();
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    let mut closes = Vec::new();
    for task in tasks {
        closes.push(task.await.expect("client task"));
    }
    closes.sort();
    let (first, last) = (closes[0], closes[CLIENTS - 1]);
    assert!(
        last - first > SPREAD / 3,
        "closes from {first:?} to {last:?}: not spread"
    );
    let log = baton.log();
    assert!(!log.contains("drain forced"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panics_after_defer_and_in_websocket_callbacks_stay_inside_the_plugin() {
    let (_tmp, baton) = start(&["faulty"]).await;
    let (_, pids) = baton.serving().await.unwrap();

    // A handler that deferred and then panicked: its stream is failed, a 500.
    let (code, _) = get(baton.addr(), "/faulty/defer-panic").await.unwrap();
    assert_eq!(code, 500);

    // A panic in an open method refuses the upgrade.
    let url = format!("ws://{}/faulty/ws?panic", baton.addr());
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected a refused upgrade, got {other:?}"),
    }

    // A panic in a message callback closes that connection with 1011, not the others.
    let mut doomed = ws_connect(&baton, "/faulty/ws").await;
    let mut bystander = ws_connect(&baton, "/faulty/ws").await;
    doomed.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws_text(&mut doomed).await, "hello");
    doomed.send(Message::text("panic")).await.unwrap();
    match ws_next(&mut doomed).await {
        Message::Close(Some(frame)) => assert_eq!(frame.code, CloseCode::Error),
        other => panic!("expected a close frame 1011, got {other:?}"),
    }
    bystander.send(Message::text("still here")).await.unwrap();
    assert_eq!(ws_text(&mut bystander).await, "still here");
    assert_eq!(
        baton.serving().await.unwrap().1,
        pids,
        "the worker was replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_c_websocket_echo_built_from_the_header_alone_echoes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &[]);
    compile_c_plugin(
        Path::new("plugins/c-ws-echo/echo.c"),
        &dir.join("c_ws_echo.so"),
        &[],
    );
    let baton = Baton::start(TestConfig {
        plugins_dir: Some(dir),
        processes: 1,
        ..TestConfig::default()
    })
    .await;
    let mut ws = ws_connect(&baton, "/c/ws-echo").await;
    ws.send(Message::text("héllo from a client")).await.unwrap();
    assert_eq!(ws_text(&mut ws).await, "héllo from a client");
    let binary: Vec<u8> = (0..=255).cycle().take(100_000).collect();
    ws.send(Message::binary(binary.clone())).await.unwrap();
    match ws_next(&mut ws).await {
        Message::Binary(data) => assert_eq!(&data[..], &binary[..]),
        other => panic!("expected a binary message, got {other:?}"),
    }
    ws.send(Message::text("")).await.unwrap();
    assert_eq!(ws_text(&mut ws).await, "");
    ws.close(None).await.unwrap();
    match ws_next(&mut ws).await {
        Message::Close(frame) => {
            assert!(
                frame.as_ref().is_none_or(|f| f.code == CloseCode::Normal),
                "{frame:?}"
            )
        }
        other => panic!("expected the close frame, got {other:?}"),
    }
}

/// `files`' pattern: byte `i` is `i % 251`.
fn pattern_chunk(offset: u64, len: usize) -> Bytes {
    static PATTERN: std::sync::LazyLock<Vec<u8>> =
        std::sync::LazyLock::new(|| (0..CHUNK + 251).map(|i| (i % 251) as u8).collect());
    let start = (offset % 251) as usize;
    Bytes::from_static(&PATTERN[start..start + len])
}

const CHUNK: usize = 64 * 1024;
/// How much each way: 1 GiB.
const SIZE: u64 = 1 << 30;
/// The worker's resident memory stays below this while it moves `SIZE` each way.
const RSS_BOUND_KIB: u64 = 32 * 1024;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// Samples a process's VmRSS every 20 ms until dropped; `peak()` is the largest seen.
struct RssWatch {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl RssWatch {
    fn start(pid: u32) -> RssWatch {
        let peak = Arc::new(AtomicU64::new(rss_kib(pid)));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (peak.clone(), stop.clone());
        tokio::spawn(async move {
            while !s.load(Ordering::Relaxed) {
                p.fetch_max(rss_kib(pid), Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        RssWatch { peak, stop }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn expected_sha256(size: u64) -> String {
    let mut hasher = Sha256::new();
    let mut at = 0;
    while at < size {
        let n = (size - at).min(CHUNK as u64) as usize;
        hasher.update(pattern_chunk(at, n));
        at += n as u64;
    }
    hex(&hasher.finalize())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_download_and_upload_arrive_byte_for_byte_with_flat_worker_memory() {
    let _heavy = heavy().await;
    let (_tmp, baton) = start(&["files"]).await;
    let (_, pids) = baton.serving().await.unwrap();
    let before = rss_kib(pids[0]);
    let watch = RssWatch::start(pids[0]);
    let expected = expected_sha256(SIZE);

    // Download: hashed as it arrives.
    let (head, mut body) = open(baton.addr(), &format!("/files/pattern/{SIZE}")).await;
    assert_eq!(head.status, 200, "log:\n{}", baton.log());
    assert_eq!(head.headers["content-length"], SIZE.to_string().as_str());
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    while let Some(data) = next_data(&mut body).await {
        got += data.len() as u64;
        hasher.update(&data);
    }
    assert_eq!(got, SIZE);
    assert_eq!(hex(&hasher.finalize()), expected, "the download differs");
    let after_download = watch.peak();

    // Upload: generated as it is sent, with a Content-Length.
    let stream = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let chunks = futures_util::stream::iter((0..SIZE).step_by(CHUNK).map(|at| {
        let n = (SIZE - at).min(CHUNK as u64) as usize;
        Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(pattern_chunk(at, n)))
    }));
    let request = http::Request::put("/files/sha256")
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_LENGTH, SIZE)
        .body(http_body_util::StreamBody::new(chunks))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(120), sender.send_request(request))
        .await
        .expect("no answer to the upload")
        .unwrap();
    let status = response.status();
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status, 200, "{answer}\nlog:\n{}", baton.log());
    assert_eq!(answer, format!("{expected} {SIZE}\n"), "the upload differs");

    let peak = watch.peak();
    eprintln!(
        "worker VmRSS: {before} KiB before, peak {after_download} KiB during the download, \
         {peak} KiB at the end (bound {RSS_BOUND_KIB} KiB)"
    );
    assert!(
        peak < RSS_BOUND_KIB,
        "the worker's VmRSS reached {peak} KiB moving {SIZE} bytes each way (bound \
         {RSS_BOUND_KIB} KiB, {before} KiB before)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_download_and_upload_complete_byte_for_byte_across_an_upgrade() {
    let _heavy = heavy().await;
    let (_tmp, baton) = start(&["files"]).await;
    let expected = expected_sha256(SIZE);

    // Both begin on generation 1...
    let (head, mut download) = open(baton.addr(), &format!("/files/pattern/{SIZE}")).await;
    assert_eq!(head.status, 200);
    let stream = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let (tx, rx) = tokio::sync::mpsc::channel::<u64>(1);
    // The upload sends a chunk each time the test says so, so that it spans the upgrade.
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        let at = rx.recv().await?;
        let n = (SIZE - at).min(CHUNK as u64) as usize;
        let frame = hyper::body::Frame::data(pattern_chunk(at, n));
        Some((Ok::<_, std::convert::Infallible>(frame), rx))
    });
    let request = http::Request::put("/files/sha256")
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_LENGTH, SIZE)
        .body(http_body_util::StreamBody::new(chunks))
        .unwrap();
    let upload = tokio::spawn(async move {
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    });

    // ...a quarter of each is moved, then the upgrade starts, then the rest follows.
    let mut hasher = Sha256::new();
    let mut got = 0u64;
    let mut sent = 0u64;
    let mut upgrade = None;
    while got < SIZE || sent < SIZE {
        if upgrade.is_none() && got >= SIZE / 4 && sent >= SIZE / 4 {
            let config = baton.config_path.clone();
            upgrade = Some(tokio::spawn(async move {
                baton_tests::run_cli(&["upgrade", "--wait", "--timeout", "60s"], &config).await
            }));
        }
        if sent < SIZE {
            if tx.send(sent).await.is_err() {
                let result = upload.await.unwrap();
                panic!(
                    "the upload ended after {sent} bytes, {got} downloaded: {result:?}\nlog:\n{}",
                    baton.log()
                );
            }
            sent = (sent + CHUNK as u64).min(SIZE);
        }
        if got < SIZE {
            let data = next_data(&mut download)
                .await
                .expect("the download ended early");
            got += data.len() as u64;
            hasher.update(&data);
        }
    }
    assert!(next_data(&mut download).await.is_none());
    assert_eq!(got, SIZE);
    assert_eq!(hex(&hasher.finalize()), expected, "the download differs");
    let (status, answer) = tokio::time::timeout(Duration::from_secs(60), upload)
        .await
        .expect("no answer to the upload")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200, "{answer}\nlog:\n{}", baton.log());
    assert_eq!(answer, format!("{expected} {SIZE}\n"), "the upload differs");

    let out = upgrade.expect("the upgrade started").await.unwrap();
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert_eq!(baton.serving().await.map(|s| s.0), Some(2));
}

async fn files_stats(baton: &Baton) -> String {
    let (code, body) = get(baton.addr(), "/files/stats").await.unwrap();
    assert_eq!(code, 200);
    body
}

/// Waits until `files` counts exactly these transfers in progress.
async fn wait_transfers(baton: &Baton, downloads: usize, uploads: usize) {
    let want = format!("downloads {downloads}\nuploads {uploads}\n");
    let deadline = Instant::now() + WAIT;
    loop {
        let now = files_stats(baton).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "files says {now:?}, not {want:?}; log:\n{}",
            baton.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_hold_downloads_back_and_clients_that_go_away_leave_nothing() {
    let _heavy = heavy().await;
    let (_tmp, baton) = start(&["files"]).await;
    let (_, pids) = baton.serving().await.unwrap();
    let worker = pids[0];
    wait_transfers(&baton, 0, 0).await;
    let fds_before = fds(worker);
    let watch = RssWatch::start(worker);

    // 20 clients ask for 1 GiB each, take the first 64 KiB and then stop reading: each
    // download waits on its writable callback with a full buffer instead of buffering.
    let mut readers = Vec::new();
    for _ in 0..20 {
        let mut socket = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
        socket
            .write_all(format!("GET /files/zero/{SIZE} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut first = vec![0; CHUNK];
        socket.read_exact(&mut first).await.unwrap();
        readers.push(socket);
    }
    // 10 uploads of a declared 1 GiB send 1 MiB and stop.
    let mut writers = Vec::new();
    for _ in 0..10 {
        let mut socket = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
        socket
            .write_all(
                format!("PUT /files/sha256 HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n")
                    .as_bytes(),
            )
            .await
            .unwrap();
        for at in (0..1 << 20).step_by(CHUNK) {
            socket.write_all(&pattern_chunk(at, CHUNK)).await.unwrap();
        }
        writers.push(socket);
    }
    wait_transfers(&baton, 20, 10).await;
    // However long they stall, the worker holds no more than their buffers.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(watch.peak() < RSS_BOUND_KIB, "VmRSS {} KiB", watch.peak());
    }
    wait_transfers(&baton, 20, 10).await;

    // They all go away: the plugin hears it (the parked downloads' callbacks run, the
    // uploads' reads say Closed) and lets go of everything.
    drop(readers);
    drop(writers);
    wait_transfers(&baton, 0, 0).await;

    // And again, 200 times: a download cut off after its first bytes.
    for _ in 0..200 {
        let mut socket = tokio::net::TcpStream::connect(baton.addr()).await.unwrap();
        socket
            .write_all(format!("GET /files/zero/{SIZE} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut first = vec![0; 1024];
        socket.read_exact(&mut first).await.unwrap();
    }
    wait_transfers(&baton, 0, 0).await;
    let settled = baton_tests::eventually(WAIT, || fds(worker) <= fds_before).await;
    assert!(
        settled,
        "the worker holds {} fds, {fds_before} before",
        fds(worker)
    );
    assert!(
        watch.peak() < RSS_BOUND_KIB,
        "the worker's VmRSS reached {} KiB (bound {RSS_BOUND_KIB} KiB)",
        watch.peak()
    );
}

/// What one long-lived client saw across the upgrades.
#[derive(Debug, Default)]
struct Seen {
    /// Ends that were clean: an SSE body that ended, a WebSocket close 1012.
    clean: u64,
    /// Anything else: a reset, an error, another close code.
    abnormal: Vec<String>,
    /// Chat: own messages that came back through the room after a (re)connect.
    delivered: u64,
}

/// An SSE client: reads `/ticker` until its body ends (cleanly or not), then reconnects,
/// until `stop`.
async fn sse_client(addr: std::net::SocketAddr, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    while !stop.load(Ordering::Relaxed) {
        let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
            seen.abnormal.push("connect refused".into());
            continue;
        };
        let Ok((mut sender, conn)) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
        else {
            seen.abnormal.push("handshake".into());
            continue;
        };
        tokio::spawn(conn);
        let request = http::Request::get("/ticker")
            .header(http::header::HOST, "localhost")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let mut body = match sender.send_request(request).await {
            Ok(r) if r.status() == 200 => r.into_body(),
            Ok(r) => {
                seen.abnormal.push(format!("status {}", r.status()));
                continue;
            }
            Err(e) => {
                seen.abnormal.push(format!("request: {e}"));
                continue;
            }
        };
        loop {
            tokio::select! {
                frame = body.frame() => match frame {
                    None => {
                        seen.clean += 1;
                        break;
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        seen.abnormal.push(format!("body: {e}"));
                        break;
                    }
                },
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stop.load(Ordering::Relaxed) {
                        return seen;
                    }
                }
            }
        }
    }
    seen
}

/// A chat client: after every (re)connect it says something and waits for it to come back
/// through the room; a close 1012 makes it reconnect; until `stop`.
async fn chat_client(addr: std::net::SocketAddr, me: usize, stop: Arc<AtomicBool>) -> Seen {
    let mut seen = Seen::default();
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        // Rooms of ten: everyone in a room hears everyone else's messages too.
        let url = format!("ws://{addr}/chat/room{}?name=c{me}", me / 10);
        let mut ws = match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                seen.abnormal.push(format!("connect: {e}"));
                continue;
            }
        };
        round += 1;
        // The room hears it as "NAME: text".
        let said = format!("c{me}: round {round}");
        if ws
            .send(Message::text(format!("round {round}")))
            .await
            .is_err()
        {
            seen.abnormal.push("send".into());
            continue;
        }
        loop {
            let next = tokio::select! {
                next = ws.next() => next,
                () = tokio::time::sleep(Duration::from_millis(100)) => {
                    if stop.load(Ordering::Relaxed) {
                        return seen;
                    }
                    continue;
                }
            };
            match next {
                Some(Ok(Message::Text(text))) if text.as_str() == said => seen.delivered += 1,
                Some(Ok(Message::Close(Some(frame)))) if frame.code == CloseCode::Restart => {
                    seen.clean += 1;
                    break;
                }
                Some(Ok(Message::Close(frame))) => {
                    seen.abnormal.push(format!("close {frame:?}"));
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    seen.abnormal.push(format!("error: {e}"));
                    break;
                }
                None => {
                    seen.abnormal.push("ended without a close frame".into());
                    break;
                }
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_upgrades_under_http_sse_and_1000_chat_clients_lose_nothing() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = plugin_dir(tmp.path(), "plugins", &["hello", "ticker", "chat"]);
    let baton = Baton::start(TestConfig {
        plugins_dir: Some(dir),
        processes: 1,
        extra: "drain_spread = \"1s\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let addr = baton.addr();
    let load = baton_tests::Load::start(
        addr,
        baton_tests::LoadSpec {
            keepalive: 4,
            keepalive_10: 2,
            per_request: 1,
            h2: 1,
            path: "/hello".into(),
            ..baton_tests::LoadSpec::default()
        },
    );
    let stop = Arc::new(AtomicBool::new(false));
    let sse: Vec<_> = (0..10)
        .map(|_| tokio::spawn(sse_client(addr, stop.clone())))
        .collect();
    let chat: Vec<_> = (0..1000)
        .map(|i| tokio::spawn(chat_client(addr, i, stop.clone())))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..5 {
        let out = baton.upgrade_wait().await;
        assert_eq!(out.code, Some(0), "{}", out.text());
        // Past the spread window: every long-lived client was closed and reconnected.
        tokio::time::sleep(Duration::from_millis(2500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let counts = load.stop().await;
    let mut sse_seen = Vec::new();
    for task in sse {
        sse_seen.push(task.await.unwrap());
    }
    let mut chat_seen = Vec::new();
    for task in chat {
        chat_seen.push(task.await.unwrap());
    }
    eprintln!(
        "5 upgrades: {} HTTP requests ok, {} failed; SSE clean ends {:?}; chat: {} clients, {} closes 1012, {} own messages delivered",
        counts.ok(),
        counts.failed,
        sse_seen.iter().map(|s| s.clean).collect::<Vec<_>>(),
        chat_seen.len(),
        chat_seen.iter().map(|s| s.clean).sum::<u64>(),
        chat_seen.iter().map(|s| s.delivered).sum::<u64>(),
    );
    assert_eq!(counts.failed, 0, "{:#?}", counts.failures);
    for (i, s) in sse_seen.iter().chain(&chat_seen).enumerate() {
        assert!(
            s.abnormal.is_empty(),
            "client {i}: {:?}\n{}",
            s.abnormal,
            baton.log()
        );
        assert_eq!(
            s.clean, 5,
            "client {i} was not closed once per upgrade: {s:?}"
        );
    }
    for (i, s) in chat_seen.iter().enumerate() {
        // Its message came back after the first connect and after each of 5 reconnects.
        assert_eq!(s.delivered, 6, "chat client {i}: {s:?}");
    }
    assert_eq!(baton.serving().await.map(|s| s.0), Some(6));
}
