//! Deferred (streamed) answers and streamed request bodies end to end (ABI 1.1), through a
//! C plugin built from the header alone (`harness/stream_plugin.c`): answers written from
//! the plugin's threads over HTTP/1.1 and HTTP/2, backpressure against a slow reader,
//! cancellation when clients go, a large upload with flat memory, and streams ending
//! cleanly when their generation drains.
#![forbid(unsafe_code)]

use baton_tests::{Baton, TestConfig, WAIT, compile_c_plugin, eventually, get, heavy};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The worker's memory may not grow past this while streaming hundreds of megabytes.
const RSS_BOUND: u64 = 64 << 20;

struct Setup {
    _tmp: tempfile::TempDir,
    baton: Baton,
    pid: u32,
}

async fn start(extra: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = baton_tests::plugin_dir(tmp.path(), "plugins", &[]);
    compile_c_plugin(
        Path::new("tests/harness/stream_plugin.c"),
        &dir.join("streamtest.so"),
        &[],
    );
    compile_c_plugin(
        Path::new("tests/harness/stream_plugin.c"),
        &dir.join("streamblock.so"),
        &["BLOCKING"],
    );
    let baton = Baton::start(TestConfig {
        processes: 1,
        threads: 2,
        plugins_dir: Some(dir),
        extra: extra.into(),
        ..TestConfig::default()
    })
    .await;
    let (_, pids) = baton.serving().await.unwrap();
    Setup {
        _tmp: tmp,
        pid: pids[0],
        baton,
    }
}

/// The plugin's counters (`GET /st/stats`).
async fn stats(addr: std::net::SocketAddr) -> std::collections::HashMap<String, i64> {
    let (code, body) = get(addr, "/st/stats").await.unwrap();
    assert_eq!(code, 200, "{body}");
    body.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.parse().unwrap()))
        .collect()
}

/// The worker's resident memory.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Streams open in the status of the serving generation.
async fn status_streams(baton: &Baton) -> u64 {
    let status = baton.status().await;
    status["generations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["streams"].as_u64().unwrap_or(0))
        .sum()
}

/// Sends `request` on a new connection and reads until the server closes it.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("the server closed the connection")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP/2 (prior knowledge) client on a new connection.
async fn h2_client(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deferred_answer_comes_from_a_thread_over_http1_and_http2() {
    let s = start("").await;
    let addr = s.baton.addr();
    let expected: String = (0..500).map(|i| format!("chunk {i}\n")).collect();

    // HTTP/1.1: chunked, with what the handler set before `defer`.
    let out = raw(
        addr,
        "GET /st/thread?n=500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, _) = out.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 201"), "{head}");
    assert!(head.contains("x-deferred: yes"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    let (code, body) = get(addr, "/st/thread?n=500").await.unwrap();
    assert_eq!((code, body.as_str()), (201, expected.as_str()));

    // HTTP/2 with prior knowledge.
    let mut sender = h2_client(addr).await;
    for _ in 0..3 {
        let request = http::Request::get(format!("http://{addr}/st/thread?n=500"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 201);
        assert_eq!(response.headers()["x-deferred"], "yes");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(String::from_utf8_lossy(&body), expected);
    }

    // A blocking write on the host's own thread is refused, not a stalled runtime...
    let (code, body) = get(addr, "/st/inline-block").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "refused\n"));
    let (code, body) = get(addr, "/st/in-handler?n=3").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "refused\n"));
    // ...while a handler on the blocking pool may write its stream, far past the buffer,
    // before it returns: the stream is sent meanwhile.
    let lines: String = (0..100_000).map(|i| format!("line {i}\n")).collect();
    for version in [http::Version::HTTP_11, http::Version::HTTP_2] {
        let body = if version == http::Version::HTTP_2 {
            let mut sender = h2_client(addr).await;
            let request = http::Request::get(format!("http://{addr}/sb/in-handler?n=100000"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            let response = sender.send_request(request).await.unwrap();
            let body = response.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8_lossy(&body).into_owned()
        } else {
            get(addr, "/sb/in-handler?n=100000").await.unwrap().1
        };
        assert!(body == lines, "{version:?}: {} bytes", body.len());
    }

    let st = stats(addr).await;
    assert_eq!(st["finished"], 5, "{st:?}");
    assert!(
        status_eventually_zero(&s.baton).await,
        "streams still counted"
    );
}

/// A stream written a line at a time reaches an HTTP/2 client that leaves it unread for a
/// while, whole. Rust's `h2` (hyper's client) counts the small DATA frames it holds unread
/// and closes the connection with `ENHANCE_YOUR_CALM` past a budget. Lines go out in
/// frames of 16 KiB, or one frame per millisecond at most, not a frame each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_at_a_time_stream_reaches_a_slow_http2_reader_whole() {
    let s = start("").await;
    let addr = s.baton.addr();
    let lines: String = (0..100_000).map(|i| format!("line {i}\n")).collect();
    let mut sender = h2_client(addr).await;
    for path in ["/sb/in-handler?n=100000", "/st/thread?n=100000"] {
        let request = http::Request::get(format!("http://{addr}{path}"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let started = Instant::now();
        let response = sender.send_request(request).await.unwrap();
        // The client's window (2 MiB) holds the whole body: the server sends it all while
        // nothing is read.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut body = response.into_body();
        let (mut got, mut frames) = (Vec::new(), 0);
        while let Some(frame) = body.frame().await {
            let frame = frame.unwrap_or_else(|e| panic!("{path}: after {frames} frames: {e:?}"));
            if let Ok(data) = frame.into_data() {
                got.extend_from_slice(&data);
                frames += 1;
            }
        }
        let expected = if path.starts_with("/sb") {
            lines.clone()
        } else {
            (0..100_000).map(|i| format!("chunk {i}\n")).collect()
        };
        assert!(got == expected.as_bytes(), "{path}: {} bytes", got.len());
        // Each frame is full, or at least a millisecond after the one before (or the
        // first, or the last).
        let ms = started.elapsed().as_millis() as usize;
        let bound = got.len() / 16384 + ms + 2;
        eprintln!(
            "{path}: {} bytes in {frames} DATA frames over {ms} ms",
            got.len()
        );
        assert!(
            frames <= bound,
            "{path}: {frames} frames, more than {bound}"
        );
    }
}

async fn status_eventually_zero(baton: &Baton) -> bool {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if status_streams(baton).await == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_holds_the_writer_back_and_memory_stays_bounded() {
    let _heavy = heavy().await;
    let s = start("").await;
    let addr = s.baton.addr();
    // A client that asks for 1 GiB and reads nothing for a while.
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /st/slow?bytes=1073741824 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 1024];
    let n = client.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let written = stats(addr).await["written"];
    // The plugin is held back by the buffer and the sockets' buffers, nothing more.
    assert!(
        written < 32 << 20,
        "{written} bytes written to a client that reads nothing"
    );
    assert!(rss(s.pid) < RSS_BOUND, "rss {}", rss(s.pid));

    // Reading on lets it write on.
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    while read < 64 << 20 {
        read += client.read(&mut buf).await.unwrap() as u64;
    }
    assert!(stats(addr).await["written"] > written);
    assert!(rss(s.pid) < RSS_BOUND, "rss {}", rss(s.pid));
    assert_eq!(status_streams(&s.baton).await, 1);

    // Going away mid-stream releases the blocked writer.
    drop(client);
    let deadline = Instant::now() + WAIT;
    loop {
        let st = stats(addr).await;
        if st["cancelled"] == 1 && st["open"] == 0 {
            assert_eq!(st["saw_closed"], 1, "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_disconnect_mid_stream_are_seen_and_nothing_leaks() {
    let _heavy = heavy().await;
    let s = start("").await;
    let addr = s.baton.addr();
    const CLIENTS: usize = 10_000;
    let mut tasks = tokio::task::JoinSet::new();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(25));
    for i in 0..CLIENTS {
        let gate = gate.clone();
        tasks.spawn(async move {
            let _p = gate.acquire_owned().await.unwrap();
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(b"GET /st/forever HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            // Some of the answer, then gone.
            let mut buf = vec![0u8; 16 * 1024 * (1 + i % 4)];
            let mut got = 0;
            while got < buf.len() {
                let n = c.read(&mut buf[got..]).await.unwrap();
                assert!(n > 0);
                got += n;
            }
        });
    }
    while let Some(t) = tasks.join_next().await {
        t.unwrap();
    }
    let deadline = Instant::now() + WAIT;
    loop {
        let st = stats(addr).await;
        if st["cancelled"] == CLIENTS as i64 && st["open"] == 0 {
            assert_eq!(st["saw_closed"], CLIENTS as i64, "{st:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{st:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(status_eventually_zero(&s.baton).await);
    assert!(rss(s.pid) < RSS_BOUND, "rss {}", rss(s.pid));
    // The worker's own count, when it stops: nothing is left in its registry.
    let mut baton = s.baton;
    baton.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(baton.wait_exit(WAIT).await, Some(0));
    let log = baton.log();
    assert!(
        log.contains("request(s); 0 stream or body handle(s) left"),
        "{log}"
    );
}

/// FNV-1a 64, as the plugin hashes.
fn fnv(hash: &mut u64, data: &[u8]) {
    for &b in data {
        *hash = (*hash ^ u64::from(b)).wrapping_mul(0x100000001b3);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_upload_streams_through_a_route_with_its_own_limit_in_flat_memory() {
    let _heavy = heavy().await;
    // The configured limit stays 1 MiB; the route says 512 MiB.
    let s = start("").await;
    let addr = s.baton.addr();
    const TOTAL: usize = 200 << 20;
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(
        b"POST /st/upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut hash = 0xcbf29ce484222325u64;
    let mut chunk = vec![0u8; 256 * 1024];
    let mut seed = 1u64;
    let mut sent = 0;
    let mut peak = 0;
    while sent < TOTAL {
        for b in chunk.iter_mut() {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *b = (seed >> 56) as u8;
        }
        fnv(&mut hash, &chunk);
        c.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        c.write_all(&chunk).await.unwrap();
        c.write_all(b"\r\n").await.unwrap();
        sent += chunk.len();
        if sent % (16 << 20) == 0 {
            peak = peak.max(rss(s.pid));
        }
    }
    c.write_all(b"0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, c.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(
        out.contains(&format!("bytes={TOTAL} fnv={hash:016x}")),
        "{out}"
    );
    assert!(peak < RSS_BOUND, "rss peaked at {peak}");

    // The small route's own limit: by Content-Length before the body, chunked while read.
    let out = raw(
        addr,
        "POST /st/small HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(
        b"POST /st/small HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n7d0\r\n",
    )
    .await
    .unwrap();
    c.write_all(&[b'x'; 2000]).await.unwrap();
    c.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("too large"), "{out}");
    // A handler that fails over it: the host answers 413 for it.
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(
        b"POST /st/small?fail=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\
          Connection: close\r\n\r\n7d0\r\n",
    )
    .await
    .unwrap();
    c.write_all(&[b'x'; 2000]).await.unwrap();
    c.write_all(b"\r\n0\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("request body exceeds 1000 bytes"), "{out}");
    // Within it, the body arrives whole.
    let out = raw(
        addr,
        "POST /st/small HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    .await;
    let mut h = 0xcbf29ce484222325u64;
    fnv(&mut h, b"abc");
    assert!(out.contains(&format!("bytes=3 fnv={h:016x}")), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buffered_body_is_held_to_its_routes_own_limit() {
    // The configured limit stays 1 MiB; the route says 4 MiB.
    let s = start("").await;
    let addr = s.baton.addr();
    let post = |len: usize| async move {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /st/buffered HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\
             Connection: close\r\n\r\n"
        );
        c.write_all(head.as_bytes()).await.unwrap();
        // A body the server refuses is not read: the write may fail then.
        let _ = c.write_all(&vec![b'x'; len]).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    let out = post(2 << 20).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.ends_with(&format!("len={}\n", 2 << 20)), "{out}");
    let out = post((4 << 20) + 1).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    // Elsewhere the configured limit holds.
    let out = raw(
        addr,
        "POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2000000\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_client_reads_nothing_is_closed_at_drain_timeout_and_counted() {
    let _heavy = heavy().await;
    let tmp = tempfile::tempdir().unwrap();
    let dir = baton_tests::plugin_dir(tmp.path(), "plugins", &[]);
    compile_c_plugin(
        Path::new("tests/harness/stream_plugin.c"),
        &dir.join("streamtest.so"),
        &[],
    );
    let baton = Baton::start(TestConfig {
        processes: 1,
        drain_timeout: "2s",
        plugins_dir: Some(dir),
        extra: "drain_spread = \"500ms\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let addr = baton.addr();
    // Ended on time by the drain, but what was written never leaves: the client does not
    // read.
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /st/slow?bytes=1073741824 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 64];
    let n = client.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    let deadline = Instant::now() + WAIT;
    while status_streams(&baton).await < 1 {
        assert!(Instant::now() < deadline, "the stream is not counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    assert!(
        eventually(WAIT, || baton.log().contains("drained in")).await,
        "{}",
        baton.log()
    );
    let log = baton.log();
    assert!(
        log.contains("drain_timeout (2s) reached: closing 1 connection(s), 1 of them streaming"),
        "{log}"
    );
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_a_feed_early_but_lets_a_sized_download_and_an_upload_finish() {
    let _heavy = heavy().await;
    let s = start("drain_spread = \"200ms\"\n").await;
    let addr = s.baton.addr();
    const SIZE: usize = 64 << 20;
    let mut download = TcpStream::connect(addr).await.unwrap();
    download
        .write_all(
            format!("GET /st/slow?bytes={SIZE}&sized=1 HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut upload = TcpStream::connect(addr).await.unwrap();
    upload
        .write_all(
            format!("POST /st/upload HTTP/1.1\r\nHost: x\r\nContent-Length: {SIZE}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let feed = tokio::spawn(async move {
        let (code, body) = get(addr, "/st/ticker").await.unwrap();
        assert_eq!(code, 200);
        body
    });
    let deadline = Instant::now() + WAIT;
    while status_streams(&s.baton).await < 2 {
        assert!(Instant::now() < deadline, "not streaming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = s.baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    // The feed ends within the spread window...
    let body = tokio::time::timeout(Duration::from_secs(5), feed)
        .await
        .expect("the feed ended")
        .unwrap();
    assert!(body.starts_with("tick\n"), "{body}");
    // ...while the transfers, slowed down, go on to their end.
    let chunk = vec![7u8; 1 << 20];
    let mut hash = 0xcbf29ce484222325u64;
    for _ in 0..SIZE / chunk.len() {
        upload.write_all(&chunk).await.unwrap();
        fnv(&mut hash, &chunk);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut answer = Vec::new();
    upload.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.contains(&format!("bytes={SIZE} fnv={hash:016x}")),
        "{answer}"
    );
    let mut got = Vec::new();
    download.read_to_end(&mut got).await.unwrap();
    let head_end = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&got[..head_end]).to_ascii_lowercase();
    assert!(head.contains(&format!("content-length: {SIZE}")), "{head}");
    assert_eq!(got.len() - head_end, SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_cleanly_spread_over_the_window_when_their_generation_drains() {
    let _heavy = heavy().await;
    let s = start("drain_spread = \"1500ms\"\n").await;
    let addr = s.baton.addr();
    const CLIENTS: usize = 12;
    let began = std::sync::Arc::new(std::sync::OnceLock::<Instant>::new());
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let began = began.clone();
        clients.spawn(async move {
            let stream = TcpStream::connect(addr).await.unwrap();
            let io = TokioIo::new(stream);
            let response = if i % 3 == 0 {
                let (mut sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let request = http::Request::get(format!("http://{addr}/st/ticker"))
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                sender.send_request(request).await.unwrap()
            } else {
                let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                let request = http::Request::get("/st/ticker")
                    .header("host", "x")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                sender.send_request(request).await.unwrap()
            };
            assert_eq!(response.status(), 200);
            // Read to the end: an error here would be a reset, not a clean end.
            let body = response
                .into_body()
                .collect()
                .await
                .expect("the stream ends cleanly")
                .to_bytes();
            let ended = began.get().expect("ended after the drain began").elapsed();
            (String::from_utf8_lossy(&body).into_owned(), ended)
        });
    }
    // Every client is streaming.
    let deadline = Instant::now() + WAIT;
    while status_streams(&s.baton).await < CLIENTS as u64 {
        assert!(Instant::now() < deadline, "not every client is streaming");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    began.set(Instant::now()).unwrap();
    let out = s.baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
    let (mut ends, mut told) = (Vec::new(), 0);
    while let Some(done) = clients.join_next().await {
        let (body, ended) = done.unwrap();
        assert!(body.starts_with("tick\n"), "{body}");
        told += usize::from(body.contains("draining\n"));
        ends.push(ended);
    }
    // The plugin was told of the drain (a stream whose turn came within a tick of it may
    // have ended before the plugin wrote again).
    assert!(told >= CLIENTS - 3, "{told} of {CLIENTS} saw the drain");
    ends.sort();
    let (first, last) = (ends[0], ends[ends.len() - 1]);
    assert!(last < Duration::from_secs(8), "{ends:?}");
    assert!(
        last - first > Duration::from_millis(200),
        "not spread: {ends:?}"
    );
    // The old worker exits drained, not cut off at drain_timeout.
    assert!(
        eventually(WAIT, || s.baton.log().contains("drained in")).await,
        "{}",
        s.baton.log()
    );
    let log = s.baton.log();
    assert!(!log.contains("reached: closing"), "{log}");
}
