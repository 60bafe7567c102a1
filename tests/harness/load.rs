//! Load generators that count every answer: keep-alive HTTP/1.1 connections, HTTP/1.0
//! keep-alive connections (as `ab -k` speaks it), a client that opens a new connection
//! per request, and HTTP/2 (prior knowledge) clients; the keep-alive and per-request ones
//! over TLS too (`LoadSpec::tls`).
//!
//! The clients follow HTTP: a response with `Connection: close` ends its connection (an
//! HTTP/1.0 one is reused only if its answer says `keep-alive`), a connection the server
//! closed before a request was written is replaced (nothing was sent), and the HTTP/2
//! client retries only what the server's GOAWAY says it never processed. Any other error,
//! a timeout or a non-2xx answer is a failed request; so is an HTTP/1.0 answer that says
//! both `close` and `keep-alive` (`ab -k` reuses the connection and fails).
//! Every loop stops on `stop()` or after `max_duration`, whichever comes first.

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Longest a single request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub keepalive: usize,
    /// HTTP/1.0 clients that ask for keep-alive.
    pub keepalive_10: usize,
    pub per_request: usize,
    pub h2: usize,
    pub path: String,
    pub max_duration: Duration,
    /// Count a complete 5xx answer in [`Counts::server_errors`] instead of as a failed
    /// request (a test of a release that answers 500 on purpose).
    pub server_errors_apart: bool,
    /// Speak TLS: the keep-alive and per-request clients, and `h2` clients over TLS with
    /// ALPN (the HTTP/1.0 ones are not started).
    pub tls: Option<TlsTarget>,
}

/// What TLS clients connect with: their config (its ALPN for HTTP/1.1; the `h2` clients
/// offer `h2` only), and the name they ask for (SNI).
#[derive(Debug, Clone)]
pub struct TlsTarget {
    pub config: Arc<rustls::ClientConfig>,
    pub name: String,
}

/// A client connection, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Connects to `addr`, and shakes hands when `tls` says so.
async fn connect(addr: SocketAddr, tls: &Option<TlsTarget>) -> std::io::Result<Box<dyn Stream>> {
    let tcp = TcpStream::connect(addr).await?;
    let Some(tls) = tls else {
        return Ok(Box::new(tcp));
    };
    let name =
        rustls::pki_types::ServerName::try_from(tls.name.clone()).map_err(std::io::Error::other)?;
    let stream = tokio_rustls::TlsConnector::from(tls.config.clone())
        .connect(name, tcp)
        .await?;
    Ok(Box::new(stream))
}

/// [`connect`]; a failure is counted (as `what`'s) and paused after, briefly.
async fn connect_counted(
    addr: SocketAddr,
    tls: &Option<TlsTarget>,
    c: &mut Counts,
    what: &str,
) -> Option<Box<dyn Stream>> {
    match connect(addr, tls).await {
        Ok(s) => Some(s),
        Err(e) => {
            c.fail(format!("{what} connect: {e}"));
            tokio::time::sleep(Duration::from_millis(10)).await;
            None
        }
    }
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            keepalive: 32,
            keepalive_10: 0,
            per_request: 1,
            h2: 2,
            path: "/_baton/health".into(),
            max_duration: Duration::from_secs(240),
            server_errors_apart: false,
            tls: None,
        }
    }
}

/// What the clients saw.
#[derive(Debug, Default, Clone)]
pub struct Counts {
    pub ok_keepalive: u64,
    pub ok_keepalive_10: u64,
    pub ok_per_request: u64,
    pub ok_h2: u64,
    pub failed: u64,
    /// The first few failures, for the assertion message.
    pub failures: Vec<String>,
    /// Worker pids named in 2xx answers.
    pub pids: HashSet<u32>,
    pub generations: HashSet<u64>,
    /// Connections replaced because the server closed them before a request was sent.
    pub reconnects: u64,
    /// Complete 5xx answers, with [`LoadSpec::server_errors_apart`].
    pub server_errors: u64,
    /// Answers per generation named in their body (`{"generation":N,…}`).
    pub by_generation: BTreeMap<u64, PerGeneration>,
}

/// What one generation answered.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PerGeneration {
    pub ok: u64,
    /// Complete 5xx answers (with [`LoadSpec::server_errors_apart`]).
    pub server_errors: u64,
    /// Answers that were the first on their HTTP/1 connection: the connections this
    /// generation accepted from the shared queue.
    pub connections: u64,
}

impl Counts {
    pub fn ok(&self) -> u64 {
        self.ok_keepalive + self.ok_keepalive_10 + self.ok_per_request + self.ok_h2
    }

    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failures.len() < 20 {
            self.failures.push(what);
        }
    }

    fn merge(&mut self, other: Counts) {
        self.ok_keepalive += other.ok_keepalive;
        self.ok_keepalive_10 += other.ok_keepalive_10;
        self.ok_per_request += other.ok_per_request;
        self.ok_h2 += other.ok_h2;
        self.failed += other.failed;
        for f in other.failures {
            if self.failures.len() < 20 {
                self.failures.push(f);
            }
        }
        self.pids.extend(other.pids);
        self.generations.extend(other.generations);
        self.reconnects += other.reconnects;
        self.server_errors += other.server_errors;
        for (g, p) in other.by_generation {
            let mine = self.by_generation.entry(g).or_default();
            mine.ok += p.ok;
            mine.server_errors += p.server_errors;
            mine.connections += p.connections;
        }
    }

    /// Reads the health answer `{"generation":N,"pid":P}`.
    fn record(&mut self, body: &[u8]) {
        self.record_answer(body, false, false);
    }

    /// Reads `{"generation":N,"pid":P}` from a 2xx answer or (`server_error`) a 5xx one
    /// counted apart; `first` says it was the first answer on its connection.
    fn record_answer(&mut self, body: &[u8], server_error: bool, first: bool) {
        if server_error {
            self.server_errors += 1;
        }
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
            if let Some(pid) = v["pid"].as_u64().filter(|_| !server_error) {
                self.pids.insert(pid as u32);
            }
            if let Some(g) = v["generation"].as_u64() {
                if !server_error {
                    self.generations.insert(g);
                }
                let per = self.by_generation.entry(g).or_default();
                if server_error {
                    per.server_errors += 1;
                } else {
                    per.ok += 1;
                }
                per.connections += u64::from(first);
            }
        }
    }
}

/// Running load; `stop` ends it and returns the counts.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Counts>>,
}

impl Load {
    pub fn start(addr: SocketAddr, spec: LoadSpec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let deadline = Instant::now() + spec.max_duration;
        let mut tasks = Vec::new();
        let apart = spec.server_errors_apart;
        for _ in 0..spec.keepalive {
            tasks.push(tokio::spawn(keepalive(
                addr,
                spec.tls.clone(),
                spec.path.clone(),
                stop.clone(),
                deadline,
                apart,
            )));
        }
        let plain_only = if spec.tls.is_some() { 0 } else { 1 };
        if let Some(tls) = &spec.tls {
            for _ in 0..spec.h2 {
                tasks.push(tokio::spawn(h2_tls(
                    addr,
                    tls.clone(),
                    spec.path.clone(),
                    stop.clone(),
                    deadline,
                    apart,
                )));
            }
        }
        for _ in 0..spec.keepalive_10 * plain_only {
            tasks.push(tokio::spawn(keepalive_10(
                addr,
                spec.path.clone(),
                stop.clone(),
                deadline,
            )));
        }
        for _ in 0..spec.per_request {
            tasks.push(tokio::spawn(per_request(
                addr,
                spec.tls.clone(),
                spec.path.clone(),
                stop.clone(),
                deadline,
                apart,
            )));
        }
        if spec.h2 * plain_only > 0 {
            let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http::<Empty<Bytes>>();
            for _ in 0..spec.h2 {
                tasks.push(tokio::spawn(h2(
                    client.clone(),
                    format!("http://{addr}{}", spec.path),
                    stop.clone(),
                    deadline,
                    apart,
                )));
            }
        }
        Load { stop, tasks }
    }

    pub async fn stop(self) -> Counts {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Counts::default();
        for t in self.tasks {
            total.merge(t.await.expect("load task"));
        }
        total
    }
}

fn running(stop: &AtomicBool, deadline: Instant) -> bool {
    !stop.load(Ordering::Relaxed) && Instant::now() < deadline
}

fn get(path: &str, close: bool) -> Request<Empty<Bytes>> {
    let mut b = Request::get(path).header(header::HOST, "127.0.0.1");
    if close {
        b = b.header(header::CONNECTION, "close");
    }
    b.body(Empty::new()).expect("request")
}

async fn keepalive(
    addr: SocketAddr,
    tls: Option<TlsTarget>,
    path: String,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    apart: bool,
) -> Counts {
    let mut c = Counts::default();
    'connection: while running(&stop, deadline) {
        let Some(stream) = connect_counted(addr, &tls, &mut c, "keep-alive").await else {
            continue;
        };
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => {
                    c.fail(format!("keep-alive handshake: {e}"));
                    continue;
                }
            };
        tokio::spawn(conn);
        let mut first = true;
        while running(&stop, deadline) {
            if sender.ready().await.is_err() {
                // Closed by the server before we wrote anything: open another.
                c.reconnects += 1;
                continue 'connection;
            }
            let response =
                match tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(get(&path, false)))
                    .await
                {
                    Err(_) => {
                        c.fail("keep-alive request timed out".into());
                        continue 'connection;
                    }
                    Ok(Err(e)) => {
                        c.fail(format!("keep-alive request: {e}"));
                        continue 'connection;
                    }
                    Ok(Ok(r)) => r,
                };
            let close = response
                .headers()
                .get(header::CONNECTION)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
            let status = response.status();
            match response.into_body().collect().await {
                Ok(body) if status.is_success() => {
                    c.ok_keepalive += 1;
                    c.record_answer(&body.to_bytes(), false, first);
                }
                Ok(body) if apart && status.is_server_error() => {
                    c.record_answer(&body.to_bytes(), true, first);
                }
                Ok(_) => c.fail(format!("keep-alive answer {status}")),
                Err(e) => c.fail(format!("keep-alive body: {e}")),
            }
            first = false;
            if close {
                continue 'connection;
            }
        }
    }
    c
}

async fn keepalive_10(
    addr: SocketAddr,
    path: String,
    stop: Arc<AtomicBool>,
    deadline: Instant,
) -> Counts {
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: keep-alive\r\n\r\n");
    let mut c = Counts::default();
    'connection: while running(&stop, deadline) {
        let mut stream = match TcpStream::connect(addr).await {
            Ok(s) => s,
            Err(e) => {
                c.fail(format!("HTTP/1.0 connect: {e}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while running(&stop, deadline) {
            match stream.try_read(&mut [0u8; 1]) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Closed by the server before we wrote anything: open another.
                Ok(0) | Err(_) => {
                    c.reconnects += 1;
                    continue 'connection;
                }
                Ok(_) => {
                    c.fail("HTTP/1.0 keep-alive: bytes nobody asked for".into());
                    continue 'connection;
                }
            }
            let answer =
                match tokio::time::timeout(REQUEST_TIMEOUT, exchange_10(&mut stream, &request))
                    .await
                {
                    Err(_) => {
                        c.fail("HTTP/1.0 keep-alive request timed out".into());
                        continue 'connection;
                    }
                    Ok(Err(e)) => {
                        c.fail(format!("HTTP/1.0 keep-alive request: {e}"));
                        continue 'connection;
                    }
                    Ok(Ok(answer)) => answer,
                };
            if !answer.status.is_success() {
                c.fail(format!("HTTP/1.0 keep-alive answer {}", answer.status));
            } else if answer.close && answer.keep_alive {
                c.fail("HTTP/1.0 keep-alive answer says both close and keep-alive".into());
            } else {
                c.ok_keepalive_10 += 1;
                c.record(&answer.body);
            }
            if answer.close || !answer.keep_alive {
                continue 'connection;
            }
        }
    }
    c
}

/// An answer to an HTTP/1.0 request.
struct Answer10 {
    status: http::StatusCode,
    /// Its `Connection` header holds these tokens.
    keep_alive: bool,
    close: bool,
    body: Vec<u8>,
}

/// Sends `request` and reads its answer (which must have a `Content-Length`).
async fn exchange_10(stream: &mut TcpStream, request: &str) -> Result<Answer10, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let status = lines
                .next()
                .and_then(|l| l.strip_prefix("HTTP/1.0 "))
                .and_then(|l| l.get(..3))
                .and_then(|code| code.parse::<http::StatusCode>().ok())
                .ok_or_else(|| format!("not an HTTP/1.0 answer: {head:?}"))?;
            let (mut keep_alive, mut close, mut length) = (false, false, None);
            for (name, value) in lines.filter_map(|l| l.split_once(':')) {
                if name.eq_ignore_ascii_case("connection") {
                    for token in value.split(',').map(str::trim) {
                        keep_alive |= token.eq_ignore_ascii_case("keep-alive");
                        close |= token.eq_ignore_ascii_case("close");
                    }
                } else if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
            let length = length.ok_or_else(|| format!("no Content-Length: {head:?}"))?;
            let body_from = end + 4;
            while buf.len() < body_from + length {
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("read body: {e}"))?;
                if n == 0 {
                    return Err("closed within the body".into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            if buf.len() > body_from + length {
                return Err(format!(
                    "{} bytes past the body",
                    buf.len() - body_from - length
                ));
            }
            return Ok(Answer10 {
                status,
                keep_alive,
                close,
                body: buf.split_off(body_from),
            });
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err(if buf.is_empty() {
                "closed before an answer".into()
            } else {
                "closed within the head".into()
            });
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn per_request(
    addr: SocketAddr,
    tls: Option<TlsTarget>,
    path: String,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    apart: bool,
) -> Counts {
    let mut c = Counts::default();
    while running(&stop, deadline) {
        let attempt = async {
            let stream = connect(addr, &tls)
                .await
                .map_err(|e| format!("connect: {e}"))?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            let response = sender
                .send_request(get(&path, true))
                .await
                .map_err(|e| format!("request: {e}"))?;
            success_body(response, apart).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(Answer::Ok(body))) => {
                c.ok_per_request += 1;
                c.record_answer(&body, false, true);
            }
            Ok(Ok(Answer::ServerError(body))) => c.record_answer(&body, true, true),
            Ok(Err(e)) => c.fail(format!("per-request {e}")),
            Err(_) => c.fail("per-request timed out".into()),
        }
    }
    c
}

async fn h2(
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Empty<Bytes>,
    >,
    url: String,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    apart: bool,
) -> Counts {
    let mut c = Counts::default();
    let uri: http::Uri = url.parse().expect("uri");
    while running(&stop, deadline) {
        let attempt = async {
            // A stream the server refused with GOAWAY was never processed (RFC 9113
            // §6.8): a client may send it again, on a new connection.
            let mut refused = 0;
            let response = loop {
                match client.get(uri.clone()).await {
                    Ok(r) => break r,
                    Err(e) if refused < 3 && refused_by_goaway(&e) => refused += 1,
                    Err(e) => return Err(format!("request: {e:?}")),
                }
            };
            success_body(response, apart).await
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, attempt).await {
            Ok(Ok(Answer::Ok(body))) => {
                c.ok_h2 += 1;
                c.record_answer(&body, false, false);
            }
            Ok(Ok(Answer::ServerError(body))) => c.record_answer(&body, true, false),
            Ok(Err(e)) => c.fail(format!("h2 {e}")),
            Err(_) => c.fail("h2 timed out".into()),
        }
    }
    c
}

/// HTTP/2 over TLS (ALPN `h2`, as browsers speak it): one connection at a time, requests
/// one after another. A connection the server is closing (GOAWAY) is replaced, and a
/// stream it refused is sent again on the new one.
async fn h2_tls(
    addr: SocketAddr,
    tls: TlsTarget,
    path: String,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    apart: bool,
) -> Counts {
    let mut c = Counts::default();
    let mut config = (*tls.config).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let target = Some(TlsTarget {
        config: Arc::new(config),
        name: tls.name.clone(),
    });
    let url = format!("https://{}{path}", tls.name);
    'connection: while running(&stop, deadline) {
        let Some(stream) = connect_counted(addr, &target, &mut c, "h2 TLS").await else {
            continue;
        };
        let (mut sender, conn) =
            match hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
            {
                Ok(x) => x,
                Err(e) => {
                    c.fail(format!("h2 TLS handshake: {e}"));
                    continue;
                }
            };
        tokio::spawn(conn);
        while running(&stop, deadline) {
            if sender.ready().await.is_err() {
                // Closed by the server (GOAWAY) before this request: open another.
                c.reconnects += 1;
                continue 'connection;
            }
            let request = Request::get(url.as_str())
                .body(Empty::<Bytes>::new())
                .expect("request");
            let response =
                match tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(request)).await {
                    Err(_) => {
                        c.fail("h2 TLS request timed out".into());
                        continue 'connection;
                    }
                    // Refused by the GOAWAY, or never sent (the connection ended first,
                    // hyper's `Canceled`): the request was not processed; send it again.
                    Ok(Err(e)) if refused_by_goaway(&e) || e.is_canceled() => {
                        c.reconnects += 1;
                        continue 'connection;
                    }
                    Ok(Err(e)) => {
                        c.fail(format!("h2 TLS request: {e:?}"));
                        continue 'connection;
                    }
                    Ok(Ok(r)) => r,
                };
            match success_body(response, apart).await {
                Ok(Answer::Ok(body)) => {
                    c.ok_h2 += 1;
                    c.record_answer(&body, false, false);
                }
                Ok(Answer::ServerError(body)) => c.record_answer(&body, true, false),
                Err(e) => c.fail(format!("h2 TLS {e}")),
            }
        }
    }
    c
}

/// A complete answer that is not a failure.
enum Answer {
    Ok(Bytes),
    /// A 5xx, counted apart.
    ServerError(Bytes),
}

/// The body of a 2xx answer (or, with `apart`, of a 5xx one), or what went wrong.
async fn success_body(
    response: http::Response<hyper::body::Incoming>,
    apart: bool,
) -> Result<Answer, String> {
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    if apart && status.is_server_error() {
        return Ok(Answer::ServerError(body.to_bytes()));
    }
    if !status.is_success() {
        return Err(format!("answer {status}"));
    }
    Ok(Answer::Ok(body.to_bytes()))
}

fn refused_by_goaway(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.is_go_away() && h2.is_remote();
        }
        source = err.source();
    }
    false
}
