//! Hostile and broken clients, on raw sockets, while a normal client keeps being served:
//! slow headers, oversized headers and bodies, too many header fields, requests without
//! `Host`, error answers the client must still read whole, the connection cap, malformed
//! requests, and a control-socket peer that is not allowed in.
#![forbid(unsafe_code)]

use baton_tests::{Baton, TestConfig, WAIT, get};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads whatever the server sends until it closes (or `within` passes).
async fn read_all(conn: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(within, conn.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

async fn healthy(baton: &Baton) {
    let (code, body) = get(baton.addr(), "/_baton/health")
        .await
        .expect("a normal client is served");
    assert_eq!(code, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_by_header_read_timeout() {
    let baton = Baton::start(TestConfig {
        extra: "[http]\nheader_read_timeout = \"1s\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let mut slow = TcpStream::connect(baton.addr()).await.unwrap();
    slow.write_all(b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // Trickle one header byte at a time, never finishing the head.
    let trickle = async {
        for _ in 0..40 {
            if slow.write_all(b"X").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let normal = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        healthy(&baton).await;
    };
    tokio::join!(trickle, normal);
    let (_, closed) = read_all(&mut slow, Duration::from_secs(3)).await;
    assert!(closed, "the slow-header connection was not closed");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "closed only after {:?}",
        started.elapsed()
    );
    healthy(&baton).await;
}

/// `header_read_timeout` 1 s, `keepalive_timeout` 3 s.
const SHORT_TIMEOUTS: &str = "[http]\nheader_read_timeout = \"1s\"\nkeepalive_timeout = \"3s\"\n";

/// A connection closed after `took`, which must be in `[from_ms, to_ms)`.
fn assert_within(took: Duration, from_ms: u64, to_ms: u64, what: &str) {
    assert!(
        took >= Duration::from_millis(from_ms) && took < Duration::from_millis(to_ms),
        "closed after {took:?} {what}"
    );
}

/// Reads one response with a `Content-Length` body; `None` if the connection closed first.
async fn read_response(conn: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return Some(head);
            }
        }
        let n = tokio::time::timeout(WAIT, conn.read(&mut chunk))
            .await
            .expect("a response within WAIT")
            .ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Idle for twice `header_read_timeout` (`SHORT_TIMEOUTS`), then `request`: the connection
/// is still open and the request is served.
async fn served_after_idle(conn: &mut TcpStream, request: &[u8], closed: &str) {
    tokio::time::sleep(Duration::from_secs(2)).await;
    conn.write_all(request).await.unwrap();
    let head = read_response(conn)
        .await
        .unwrap_or_else(|| panic!("{closed}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_last_keepalive_timeout_not_header_read_timeout() {
    let baton = Baton::start(TestConfig {
        extra: SHORT_TIMEOUTS.into(),
        ..TestConfig::default()
    })
    .await;
    const REQUEST: &[u8] = b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
    conn.write_all(REQUEST).await.unwrap();
    let head = read_response(&mut conn).await.expect("first response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    served_after_idle(
        &mut conn,
        REQUEST,
        "an idle connection was closed before keepalive_timeout",
    )
    .await;

    // Then idle for good: closed after keepalive_timeout, not long after.
    let idle_from = Instant::now();
    let (rest, closed) = read_all(&mut conn, Duration::from_secs(10)).await;
    let idle_for = idle_from.elapsed();
    assert!(closed, "the idle connection stayed open for 10 s");
    assert!(rest.is_empty(), "unexpected bytes: {rest}");
    assert_within(idle_for, 3000, 5500, "idle; keepalive_timeout is 3 s");

    // A head that starts on a kept-alive connection is held to header_read_timeout.
    let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
    conn.write_all(REQUEST).await.unwrap();
    read_response(&mut conn).await.expect("first response");
    conn.write_all(b"GET /_baton/health HTTP/1.1\r\n")
        .await
        .unwrap();
    let head_from = Instant::now();
    let (_, closed) = read_all(&mut conn, Duration::from_secs(10)).await;
    let took = head_from.elapsed();
    assert!(closed, "an unfinished head was left open for 10 s");
    assert_within(
        took,
        1000,
        2500,
        "with an unfinished head; header_read_timeout is 1 s",
    );

    // An idle connection also lasts after a first request whose body is read after its
    // head: a head of exactly the worker's first read (2 KiB), its body in the same write.
    let mut posted = TcpStream::connect(baton.addr()).await.unwrap();
    let start = "POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\nX-Pad: ";
    let pad = "p".repeat(2048 - start.len() - "\r\n\r\n".len());
    let mut post = format!("{start}{pad}\r\n\r\n").into_bytes();
    assert_eq!(post.len(), 2048);
    post.resize(post.len() + 3000, b'x');
    posted.write_all(&post).await.unwrap();
    let head = read_response(&mut posted)
        .await
        .expect("the POST's response");
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    served_after_idle(
        &mut posted,
        REQUEST,
        "a connection idle after a request with a body was closed",
    )
    .await;
    healthy(&baton).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_lasts_keepalive_timeout_then_gets_goaway() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let baton = Baton::start(TestConfig {
        extra: SHORT_TIMEOUTS.into(),
        ..TestConfig::default()
    })
    .await;
    let stream = TcpStream::connect(baton.addr()).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let conn = tokio::spawn(conn);
    // Connected (preface and settings sent), no request for twice header_read_timeout.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let request = http::Request::get(format!("http://{}/_baton/health", baton.addr()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .expect("an idle HTTP/2 connection was closed before keepalive_timeout");
    assert_eq!(response.status(), 200);
    drop(response);
    // Then idle for good: the server says GOAWAY and closes after keepalive_timeout.
    let idle_from = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
    let idle_for = idle_from.elapsed();
    assert!(
        ended.is_ok(),
        "the idle HTTP/2 connection stayed open for 10 s"
    );
    assert_within(idle_for, 3000, 5500, "idle; keepalive_timeout is 3 s");
    healthy(&baton).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_oversized_bodies_413() {
    let baton = Baton::start(TestConfig {
        // Sizes with units: 8 KiB = 8192 bytes, 1 KB = 1000 bytes.
        extra: "[http]\nmax_header_bytes = \"8KiB\"\nmax_body_bytes = \"1KB\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
    let big = "a".repeat(20_000);
    let request = format!("GET /_baton/health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
    let _ = conn.write_all(request.as_bytes()).await;
    let (response, _) = read_all(&mut conn, WAIT).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{response}");
    healthy(&baton).await;

    // A body over the limit is refused while it streams in: the server answers 413
    // without waiting for (or buffering) the rest of a 100 MB upload.
    let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
    conn.write_all(b"POST /_baton/health HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        .await
        .unwrap();
    conn.write_all(&[b'x'; 4096]).await.unwrap();
    let mut head = [0u8; 64];
    let n = tokio::time::timeout(WAIT, conn.read(&mut head))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    // The same with chunked encoding (no length announced).
    let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
    conn.write_all(b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    for _ in 0..3 {
        conn.write_all(b"200\r\n").await.unwrap();
        conn.write_all(&[b'y'; 512]).await.unwrap();
        conn.write_all(b"\r\n").await.unwrap();
    }
    let (response, _) = read_all(&mut conn, WAIT).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    healthy(&baton).await;
}

/// A request head with `fields` header fields (`Host` among them).
fn head_with_fields(fields: usize) -> String {
    let mut head = String::from("GET /_baton/health HTTP/1.1\r\nHost: x\r\n");
    for i in 1..fields {
        head.push_str(&format!("X-Field-{i}: v\r\n"));
    }
    head + "\r\n"
}

/// Sends `request` and then `more` bytes the server never asked for, and returns the
/// whole answer, read up to a clean end of the connection: a reset after the answer (a
/// server that closes with unread data) fails.
async fn answer_while_sending_more(baton: &Baton, request: &[u8], more: usize) -> String {
    let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
    let mut sent = request.to_vec();
    sent.resize(request.len() + more, b'x');
    conn.write_all(&sent)
        .await
        .expect("the server took what the client sent");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(WAIT, conn.read_to_end(&mut answer))
        .await
        .expect("the server closed within WAIT");
    let text = String::from_utf8_lossy(&answer).into_owned();
    read.unwrap_or_else(|e| panic!("{e} after reading {text:?}"));
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_header_fields_get_431_read_whole_before_the_close() {
    let baton = Baton::start(TestConfig {
        extra: "[http]\nmax_headers = 20\nmax_header_bytes = \"8KiB\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
    conn.write_all(head_with_fields(20).as_bytes())
        .await
        .unwrap();
    let head = read_response(&mut conn).await.expect("an answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // One more field, then 256 KiB the client keeps sending: the 431 arrives whole, and
    // the connection ends with a close, not a reset.
    let answer =
        answer_while_sending_more(&baton, head_with_fields(21).as_bytes(), 256 << 10).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    assert!(answer.ends_with("\r\n\r\n"), "{answer}");
    // The same for a head past max_header_bytes.
    let big = format!(
        "GET /_baton/health HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let answer = answer_while_sending_more(&baton, big.as_bytes(), 256 << 10).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    healthy(&baton).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_announced_past_max_body_bytes_gets_413_without_being_invited() {
    let baton = Baton::start(TestConfig {
        extra: "[http]\nmax_body_bytes = \"1KiB\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let expect = |length: usize| {
        format!(
            "POST /_baton/health HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\
             Content-Length: {length}\r\n\r\n"
        )
    };
    // Past the limit: 413 at once, no `100 Continue`, and the connection closes.
    let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
    conn.write_all(expect(1025).as_bytes()).await.unwrap();
    let (answer, closed) = read_all(&mut conn, WAIT).await;
    assert!(closed, "the connection stayed open: {answer}");
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer}"
    );
    // A client that sends the body anyway still reads the whole 413.
    let answer = answer_while_sending_more(&baton, expect(5_000_000).as_bytes(), 256 << 10).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.ends_with("bytes\n"), "{answer}");
    // Within the limit: invited, then answered (405: the health path takes no POST).
    let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
    conn.write_all(expect(1024).as_bytes()).await.unwrap();
    let mut invitation = [0u8; 25];
    tokio::time::timeout(WAIT, conn.read_exact(&mut invitation))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&invitation, b"HTTP/1.1 100 Continue\r\n\r\n");
    conn.write_all(&[b'y'; 1024]).await.unwrap();
    let head = read_response(&mut conn).await.expect("an answer");
    assert!(head.starts_with("HTTP/1.1 405"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http11_without_host_gets_400_http10_does_not_need_it() {
    let baton = Baton::start(TestConfig::default()).await;
    for (request, status) in [
        (&b"GET /_baton/health HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 400"),
        (
            b"GET http://x/_baton/health HTTP/1.1\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"GET /_baton/health HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "HTTP/1.1 400",
        ),
        (
            b"GET http://x/_baton/health HTTP/1.1\r\nHost: x\r\n\r\n",
            "HTTP/1.1 200",
        ),
        (b"GET /_baton/health HTTP/1.0\r\n\r\n", "HTTP/1.0 200"),
    ] {
        let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
        conn.write_all(request).await.unwrap();
        let head = read_response(&mut conn).await.expect("an answer");
        assert!(
            head.starts_with(status),
            "{}: {head}",
            String::from_utf8_lossy(request)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_400_and_never_crash_a_worker() {
    let baton = Baton::start(TestConfig {
        processes: 1,
        ..TestConfig::default()
    })
    .await;
    let (_, pids) = baton.serving().await.unwrap();
    let garbage: &[&[u8]] = &[
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"\xff\xfe\xfd\r\n\r\n",
    ];
    for raw in garbage {
        let mut conn = TcpStream::connect(baton.addr()).await.unwrap();
        let _ = conn.write_all(raw).await;
        let (response, closed) = read_all(&mut conn, WAIT).await;
        assert!(closed, "{raw:?}: connection left open");
        assert!(
            response.is_empty() || response.starts_with("HTTP/1.1 400"),
            "{raw:?}: {response}"
        );
        healthy(&baton).await;
    }
    assert_eq!(
        baton.serving().await.unwrap().1,
        pids,
        "a worker was replaced"
    );
    assert_eq!(baton.status().await["generations"][0]["restarts"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_queues_instead_of_refusing() {
    let baton = Baton::start(TestConfig {
        processes: 1,
        extra: "[http]\nmax_connections = 4\n".into(),
        ..TestConfig::default()
    })
    .await;
    // Four connections hold every slot.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(baton.addr()).await.unwrap();
        c.write_all(b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = c.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(c);
    }
    // A fifth connects (the kernel queues it) but is not served while the cap is full.
    let addr = baton.addr();
    let waiting = tokio::spawn(async move { get(addr, "/_baton/health").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "a connection above max_connections was served"
    );
    // One slot frees: the queued connection is served, not refused.
    drop(held.pop());
    let (code, _) = tokio::time::timeout(WAIT, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_control_messages_get_an_error_and_other_uids_are_refused() {
    use tokio::net::UnixStream;
    let baton = Baton::start(TestConfig::default()).await;
    let socket = baton.dir.path().join(".baton-run/baton.sock");
    let mode_of = |path: &std::path::Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions())
            & 0o7777
    };
    assert_eq!(mode_of(&socket), 0o600, "control socket mode");
    assert_eq!(
        mode_of(socket.parent().unwrap()),
        0o700,
        "control socket directory mode"
    );
    for bad in [
        &b"not json\n"[..],
        b"{\"command\":\"explode\"}\n",
        &[b'{'; 70_000][..],
    ] {
        let mut c = UnixStream::connect(&socket).await.unwrap();
        let _ = c.write_all(bad).await;
        let _ = c.write_all(b"\n").await;
        let mut reply = String::new();
        let _ = tokio::time::timeout(WAIT, c.read_to_string(&mut reply)).await;
        assert!(reply.contains("\"reply\":\"error\""), "{reply}");
    }
    // A peer that sends nothing is dropped after the request timeout, not held forever.
    let mut idle = UnixStream::connect(&socket).await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(10), idle.read_to_string(&mut reply))
        .await
        .expect("an idle control client was never dropped")
        .unwrap();
    assert!(reply.contains("no request within"), "{reply}");
    healthy(&baton).await;

    // Another uid (as root the test can become nobody): kept out by the directory, and
    // refused and logged by the peer check even with a way past the directory.
    if nix::unistd::geteuid().is_root() {
        let config = baton.config_path.display().to_string();
        let as_nobody = |caps: &[&str]| {
            let mut cmd = tokio::process::Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .args(caps)
                .arg(&baton_tests::bins().baton)
                .args(["status", "-c", &config]);
            cmd
        };
        let text_of = |out: &std::process::Output| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        };
        let out = as_nobody(&[]).output().await.unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text_of(&out));
        assert!(
            text_of(&out).contains("Permission denied"),
            "{}",
            text_of(&out)
        );
        // CAP_DAC_OVERRIDE passes the directory and the socket's mode: the supervisor
        // still refuses uid 65534.
        let out = as_nobody(&["--inh-caps=+dac_override", "--ambient-caps=+dac_override"])
            .output()
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
        assert!(
            text_of(&out).contains("permission denied"),
            "{}",
            text_of(&out)
        );
        assert!(
            baton.log().contains("control connection from uid 65534"),
            "{}",
            baton.log()
        );
    } else {
        eprintln!("skipping the other-uid check: needs root");
    }
}

/// One line of /proc/PID/status, without its label.
fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_drop_to_worker_user_and_serve_a_privileged_port() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping the privilege-drop test: needs root");
        return;
    }
    let Some(port) = (900..1000).find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
    else {
        panic!("no free port below 1024");
    };
    // The worker binary where the unprivileged user can execute it.
    let bin = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        bin.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let worker = bin.path().join("baton-worker");
    std::fs::copy(&baton_tests::bins().worker, &worker).unwrap();
    let baton = Baton::start(TestConfig {
        port,
        worker_path: Some(worker),
        extra: "user = \"nobody\"\ngroup = \"nogroup\"\n".into(),
        ..TestConfig::default()
    })
    .await;
    let (code, body) = get(baton.addr(), "/_baton/health").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .unwrap()
        .uid
        .as_raw();
    let nogroup = nix::unistd::Group::from_name("nogroup")
        .unwrap()
        .unwrap()
        .gid
        .as_raw();
    let pids = baton.worker_pids();
    assert_eq!(pids.len(), 2);
    for pid in pids {
        let ids = |field| -> Vec<u32> {
            status_field(pid, field)
                .split_whitespace()
                .map(|v| v.parse().unwrap())
                .collect()
        };
        assert_eq!(ids("Uid"), vec![nobody; 4], "worker {pid} uids");
        assert_eq!(ids("Gid"), vec![nogroup; 4], "worker {pid} gids");
        assert_eq!(
            status_field(pid, "Groups"),
            "",
            "worker {pid} kept supplementary groups"
        );
        for caps in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
            assert_eq!(
                status_field(pid, caps),
                "0000000000000000",
                "worker {pid} {caps}"
            );
        }
    }
    // The supervisor still holds root (it binds listeners an upgrade adds).
    assert_eq!(
        status_field(baton.pid, "Uid").split_whitespace().next(),
        Some("0")
    );
    let out = baton.upgrade_wait().await;
    assert_eq!(out.code, Some(0), "{}", out.text());
}

#[tokio::test]
async fn an_unknown_worker_user_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        TestConfig {
            extra: "user = \"no-such-user-here\"\n".into(),
            ..TestConfig::default()
        }
        .render(),
    )
    .unwrap();
    let out = baton_tests::run_cli(&["check"], &config).await;
    assert_eq!(out.code, Some(1), "{}", out.text());
    assert!(
        out.stderr
            .contains("worker.user: no user \"no-such-user-here\""),
        "{}",
        out.text()
    );
}
