//! One request, from its head to its response: the checks of its head (`Host`, the
//! header count over HTTP/2, a `Content-Length` past the route's body limit), the health
//! path, 404 and 405, plugin handlers (non-blocking ones inline, the others on the
//! blocking pool within their plugin's share), the body limit (the route's own, or
//! `http.max_body_bytes`), deferred answers and streamed request bodies (ABI 1.1, through
//! [`crate::stream`]), and `Connection: close` once the drain began. It never touches the
//! connection's socket.

use crate::conn_state::{ConnCtx, InFlight, has_token};
use crate::metrics::{HEALTH, Mark, RouteId, UNMATCHED};
use crate::router::Lookup;
use crate::shared::{CallGuard, Shared};
use crate::stream::{self, Body};
use baton_loader::stream::{BodyStream, BodyWatch, StreamReceiver};
use baton_loader::{Answer, Call, CallOpts, Handoff, Plugin};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

/// The future hyper keeps for one request. Most requests are answered before [`handle`]
/// returns (no body to read, a non-blocking plugin or none): then it is just the response.
/// The others (a body to collect, a handler on the blocking pool, a deferred answer's
/// head, a WebSocket upgrade) are boxed. A future holding the whole request path inline
/// was copied into hyper for every request, and showed up in profiles.
pub(crate) enum Handled {
    Now(std::future::Ready<Result<Response<Body>, Infallible>>),
    Later(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
    /// A WebSocket upgrade, counted when its answer (the 101 or a refusal) is known.
    Upgrade(crate::websocket::Upgrade, Arc<Shared>, Option<Mark>),
}

impl Future for Handled {
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Handled::Now(ready) => Pin::new(ready).poll(cx),
            Handled::Later(future) => future.as_mut().poll(cx).map(Ok),
            Handled::Upgrade(future, shared, mark) => future.as_mut().poll(cx).map(|r| {
                if let Some(mark) = mark.take() {
                    let bytes = hyper::body::Body::size_hint(r.body()).exact();
                    count(shared, mark, r.status().as_u16(), bytes);
                }
                Ok(r.map(Body::from))
            }),
        }
    }
}

pub(crate) fn handle(req: Request<Incoming>, ctx: &Arc<ConnCtx>) -> Handled {
    let shared = &ctx.shared;
    let mut mark = Mark::new(
        shared.metrics.detailed() || shared.access_log.is_some(),
        UNMATCHED,
    );
    let version = req.version();
    let (parts, body) = req.into_parts();
    if let Some(log) = &shared.access_log {
        mark.log = Some(log.begin(&parts, ctx.peer));
    }
    ctx.state.request_started(&parts);
    let no_body = hyper::body::Body::is_end_stream(&body);
    let mut body = Some(body);
    let refused = refuse_head(&parts, &ctx.shared).or_else(|| {
        // The route's body limit, known before the body is read.
        (!no_body)
            .then(|| body_limit(&parts, &ctx.shared))
            .filter(|limit| {
                body.as_ref()
                    .is_some_and(|b| hyper::body::Body::size_hint(b).lower() > limit.bytes)
            })
            .map(|limit| body_too_large(limit.bytes))
    });
    if let Some(refused) = refused {
        // Answered before the body is polled: an `Expect: 100-continue` client is not
        // invited to send it. Hyper closes the connection if a body is left unread.
        if !no_body {
            ctx.state.body_left();
        }
        drop(body);
        let response = finish(refused, version, &ctx.shared, mark);
        return Handled::Now(std::future::ready(Ok(response)));
    }
    // A WebSocket route: the upgrade (or its refusal) is `websocket`'s.
    if let Some(target) = crate::websocket::route(&parts, ctx) {
        let mark = mark.to(ctx.shared.metrics.route_id(target.index, target.route));
        return Handled::Upgrade(
            crate::websocket::upgrade(parts, target, no_body, ctx),
            ctx.shared.clone(),
            Some(mark),
        );
    }
    // A streamed body past its limit, and the limit.
    let mut too_large: Option<(BodyWatch, u64)> = None;
    // Without a body, the route is known now: most requests end here.
    let routed = if no_body {
        match route(&parts, Input::Whole(&Bytes::new()), ctx) {
            (Routed::Reply(Reply::Done(response)), id) => {
                let response = finish(response, version, &ctx.shared, mark.to(id));
                return Handled::Now(std::future::ready(Ok(response)));
            }
            other => Some(other),
        }
    } else {
        let limit = body_limit(&parts, &ctx.shared);
        let body = &mut body;
        let too_large = &mut too_large;
        limit.stream.then(|| {
            // A route that takes its body as a stream is called now, the body fed to it
            // as it arrives.
            let (feed, reader) = baton_loader::stream::body_stream(
                limit.bytes,
                ctx.shared.settings.http.stream_buffer_bytes,
            );
            *too_large = Some((feed.watch(), limit.bytes));
            if let Some(body) = body.take() {
                tokio::spawn(stream::feed_body(body, feed, InFlight::start(ctx)));
            }
            route(&parts, Input::Stream(reader), ctx)
        })
    };
    let in_flight = InFlight::start(ctx);
    Handled::Later(Box::pin(async move {
        let (reply, id) = match routed {
            Some((Routed::Reply(reply), id)) => (reply, id),
            Some((Routed::Blocking(call), id)) => {
                (call.run(parts, Bytes::new(), in_flight.ctx()).await, id)
            }
            None => match body {
                Some(body) => with_body(parts, body, in_flight.ctx()).await,
                None => unreachable!("the body is taken only for a streamed route"),
            },
        };
        let shared = in_flight.ctx().shared.clone();
        let response = match reply {
            Reply::Done(response) => response,
            Reply::Deferred(rx, plugin) => match stream::deferred(rx, in_flight).await {
                stream::Deferred::Answer(response) => response,
                stream::Deferred::Failed(message) => {
                    tracing::error!(
                        "plugin {} ({}) failed its stream: {message}",
                        plugin.name,
                        plugin.spec.file
                    );
                    internal_error()
                }
            },
        };
        // A handler that failed over a streamed body past its limit: the host answers
        // 413 (what `BATON_E_TOO_LARGE` promises, when the head is still unsent).
        let response = match too_large {
            Some((watch, limit))
                if response.status() == StatusCode::INTERNAL_SERVER_ERROR && watch.too_large() =>
            {
                body_too_large(limit)
            }
            _ => response,
        };
        finish(response, version, &shared, mark.to(id))
    }))
}

/// A route's body limit and whether it takes its body as a stream.
struct BodyLimit {
    bytes: u64,
    stream: bool,
}

/// The body limit of the route a request goes to: its own (ABI 1.1) or the configured one.
fn body_limit(parts: &http::request::Parts, shared: &Shared) -> BodyLimit {
    let configured = shared.settings.http.max_body_bytes;
    let path = parts.uri.path();
    match shared.router.lookup(parts.method.as_str(), path) {
        Lookup::Found { plugin, route, .. } if path != shared.settings.http.health_path => {
            let def = &plugin.routes[route as usize];
            BodyLimit {
                bytes: def.max_body_bytes.unwrap_or(configured),
                stream: def.stream_body,
            }
        }
        _ => BodyLimit {
            bytes: configured,
            stream: false,
        },
    }
}

/// Answers a request whose head alone is enough to refuse it: HTTP/1.1 without exactly
/// one `Host` (RFC 9112 §3.2; HTTP/1.0 may leave it out) or more header fields than
/// `max_headers` over HTTP/2 (hyper counts them for HTTP/1). (A `Content-Length` past the
/// route's body limit is refused by [`handle`].)
fn refuse_head(parts: &http::request::Parts, shared: &Shared) -> Option<Response<Body>> {
    let http = &shared.settings.http;
    if parts.version < Version::HTTP_2 {
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let (first, second) = (hosts.next(), hosts.next());
        if second.is_some() || (first.is_none() && parts.version == Version::HTTP_11) {
            let why = if second.is_some() {
                "more than one"
            } else {
                "no"
            };
            return Some(text(
                StatusCode::BAD_REQUEST,
                format!("bad request: {why} Host header\n"),
            ));
        }
    } else if parts.headers.len() > http.max_headers {
        return Some(text(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            format!("more than {} request header fields\n", http.max_headers),
        ));
    }
    None
}

fn body_too_large(limit: u64) -> Response<Body> {
    text(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body exceeds {limit} bytes\n"),
    )
}

/// Collects the request body (413 past the route's limit), then routes the request.
async fn with_body(parts: http::request::Parts, body: Incoming, ctx: &ConnCtx) -> (Reply, RouteId) {
    let limit = body_limit(&parts, &ctx.shared).bytes;
    match Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX))
        .collect()
        .await
    {
        Ok(collected) => {
            let body = collected.to_bytes();
            match route(&parts, Input::Whole(&body), ctx) {
                (Routed::Reply(reply), id) => (reply, id),
                (Routed::Blocking(call), id) => (call.run(parts, body, ctx).await, id),
            }
        }
        Err(e) => {
            // The client may still be sending the rest.
            ctx.state.body_left();
            let reply = Reply::Done(if e.downcast_ref::<LengthLimitError>().is_some() {
                body_too_large(limit)
            } else {
                text(StatusCode::BAD_REQUEST, format!("bad request body: {e}\n"))
            });
            (reply, UNMATCHED)
        }
    }
}

/// Counts the answered request; during the drain, HTTP/1 responses close the connection.
fn finish(
    mut response: Response<Body>,
    version: Version,
    shared: &Shared,
    mark: Mark,
) -> Response<Body> {
    let bytes = hyper::body::Body::size_hint(response.body()).exact();
    count(shared, mark, response.status().as_u16(), bytes);
    if shared.closing.load(Ordering::Relaxed) && version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if version == Version::HTTP_10 && has_token(response.headers(), "close") {
        // To an HTTP/1.0 request that asked for keep-alive, hyper appends `keep-alive` to
        // an HTTP/1.1 response's `Connection`, even after `close`: a client that sees it
        // sends its next request into the close. An HTTP/1.0 response without
        // `keep-alive` closes the connection and says only `close` (hyper answers an
        // HTTP/1.0 client in HTTP/1.0 anyway).
        *response.version_mut() = Version::HTTP_10;
    }
    response
}

/// Counts an answered request in the metrics and writes its access log line (`bytes`:
/// the body's size when known at the head).
fn count(shared: &Shared, mark: Mark, status: u16, bytes: Option<u64>) {
    let took = mark.started.map(|s| s.elapsed());
    shared.metrics.request(mark.route, status, took);
    if let (Some(log), Some(line)) = (&shared.access_log, mark.log) {
        let seconds = took.map_or(0.0, |t| t.as_secs_f64());
        log.finish(line, status, bytes, seconds);
    }
}

/// Where a request went.
enum Routed {
    /// Answered or deferred: the health path, a 404 or 405, or a non-blocking plugin's
    /// handler.
    Reply(Reply),
    /// A handler of a plugin that may block: it runs on the blocking pool.
    Blocking(BlockingCall),
}

/// What a handler answered.
enum Reply {
    Done(Response<Body>),
    /// A deferred answer (ABI 1.1), by this plugin: its head is still to come.
    Deferred(StreamReceiver, Arc<Plugin>),
}

/// The request body a handler gets.
enum Input<'a> {
    Whole(&'a Bytes),
    /// A route that streams its body (ABI 1.1).
    Stream(BodyStream),
}

struct BlockingCall {
    index: usize,
    plugin: Arc<Plugin>,
    route: u32,
    params: Vec<(String, String)>,
    body: Option<BodyStream>,
}

/// Answers the health path and unknown routes, and calls non-blocking handlers inline.
/// Also says which route the request went to, for the metrics.
fn route(parts: &http::request::Parts, input: Input<'_>, ctx: &ConnCtx) -> (Routed, RouteId) {
    let shared = &ctx.shared;
    let path = parts.uri.path();
    if path == shared.settings.http.health_path {
        return (
            Routed::Reply(Reply::Done(health(&parts.method, shared))),
            HEALTH,
        );
    }
    let routed = match shared.router.lookup(parts.method.as_str(), path) {
        Lookup::NotFound => Routed::Reply(Reply::Done(text(
            StatusCode::NOT_FOUND,
            "not found\n".into(),
        ))),
        Lookup::MethodNotAllowed(allow) => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            Routed::Reply(Reply::Done(r))
        }
        Lookup::Found {
            index,
            plugin,
            route,
            params,
        } => {
            let id = shared.metrics.route_id(index, route);
            let (body, stream_body) = match input {
                Input::Whole(bytes) => (&bytes[..], None),
                Input::Stream(reader) => (&[][..], Some(reader)),
            };
            let stream_body = stream_body.or_else(|| {
                // A streaming route without a body gets one that has ended.
                plugin.routes[route as usize].stream_body.then(|| {
                    let (mut feed, reader) = baton_loader::stream::body_stream(0, 1);
                    feed.finish();
                    reader
                })
            });
            if shared.blocking[index].is_some() {
                let call = BlockingCall {
                    index,
                    plugin: plugin.clone(),
                    route,
                    params,
                    body: stream_body,
                };
                return (Routed::Blocking(call), id);
            }
            // Not counted in `plugin_calls`: an inline call runs inside its connection's
            // task, so an open connection already stands for it at shutdown, and the
            // counter's cache line would bounce between the runtime threads at every
            // request.
            let answer = plugin.call_with(
                &call_of(route, parts, &params, body, shared.generation, shared.pid),
                CallOpts {
                    stream_buffer_bytes: shared.settings.http.stream_buffer_bytes,
                    body: stream_body,
                    // Inline: the handler cannot block on its stream anyway.
                    handoff: None,
                },
            );
            return (Routed::Reply(respond(answer, plugin, parts)), id);
        }
    };
    (routed, UNMATCHED)
}

impl BlockingCall {
    /// Calls the handler on the blocking pool, within its plugin's share of it. A stream it
    /// defers comes back at `defer` time, so that the handler may go on writing it (with
    /// `WRITE_BLOCK`) while its body is sent; its share is held until it returns.
    async fn run(self, parts: http::request::Parts, body: Bytes, ctx: &ConnCtx) -> Reply {
        let shared = &ctx.shared;
        let BlockingCall {
            index,
            plugin,
            route,
            params,
            body: stream_body,
        } = self;
        let share = shared.blocking[index]
            .as_ref()
            .expect("routed to the blocking pool");
        let permit = share
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        // Counted until the handler returns, even if this request's task is dropped
        // meanwhile (a forced close): the blocking thread keeps running.
        let counted = CallGuard::new(&shared.plugin_calls);
        let (generation, worker_pid) = (shared.generation, shared.pid);
        let stream_buffer_bytes = shared.settings.http.stream_buffer_bytes;
        let handler = plugin.clone();
        let request = parts.clone();
        let (handoff, deferred) = tokio::sync::oneshot::channel();
        let call = tokio::task::spawn_blocking(move || {
            let answer = handler.call_with(
                &call_of(route, &request, &params, &body, generation, worker_pid),
                CallOpts {
                    stream_buffer_bytes,
                    body: stream_body,
                    handoff: Some(Handoff::new(move |rx| {
                        let _ = handoff.send(rx);
                    })),
                },
            );
            drop((counted, permit));
            answer
        });
        // A deferred stream (then the handler may still run), or else the answer.
        if let Ok(rx) = deferred.await {
            return Reply::Deferred(rx, plugin);
        }
        let answer = call
            .await
            .unwrap_or_else(|e| Answer::Failed(format!("handler thread failed: {e}")));
        respond(answer, &plugin, &parts)
    }
}

/// The response for what a plugin answered; a failure is logged and becomes a 500.
fn respond(answer: Answer, plugin: &Arc<Plugin>, parts: &http::request::Parts) -> Reply {
    Reply::Done(match answer {
        Answer::Response {
            status,
            headers,
            body,
        } => {
            let mut r = Response::new(Body::Full(Full::new(Bytes::from(body))));
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            r
        }
        Answer::Deferred(rx) => return Reply::Deferred(rx, plugin.clone()),
        // Only with a handoff, which takes the stream first.
        Answer::HandedOff => internal_error(),
        Answer::Failed(message) => {
            tracing::error!(
                "plugin {} ({}) failed on {} {}: {message}",
                plugin.name,
                plugin.spec.file,
                parts.method,
                parts.uri.path()
            );
            internal_error()
        }
    })
}

fn internal_error() -> Response<Body> {
    text(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal server error\n".into(),
    )
}

fn call_of<'a>(
    route: u32,
    parts: &'a http::request::Parts,
    params: &'a [(String, String)],
    body: &'a [u8],
    generation: u64,
    worker_pid: u32,
) -> Call<'a> {
    Call {
        route,
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
        params,
        body,
        generation,
        worker_pid,
    }
}

fn health(method: &Method, shared: &Shared) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let body = format!(
        "{{\"status\":\"ok\",\"generation\":{},\"pid\":{}}}\n",
        shared.generation, shared.pid
    );
    let mut r = Response::new(Body::Full(Full::new(Bytes::from(body))));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Body::Full(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use crate::connection::OneConnection;
    use crate::router::Router;
    use baton_proto::{HttpSettings, WorkerSettings};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn server(http: HttpSettings) -> OneConnection {
        let settings = WorkerSettings {
            http,
            ..WorkerSettings::default()
        };
        let router = Router::build(Vec::new(), &settings.http.health_path).expect("router");
        OneConnection::new(settings, router)
    }

    /// Writes `input` to a connection of `server` and returns what the server sends
    /// until it closes, or what it sent within 500 ms if it keeps the connection open.
    async fn exchange(server: &OneConnection, input: &[u8]) -> String {
        let (mut client, io) = tokio::io::duplex(64 * 1024);
        let talk = async {
            client.write_all(input).await.unwrap();
            let mut out = Vec::new();
            let _ = tokio::time::timeout(Duration::from_millis(500), client.read_to_end(&mut out))
                .await;
            String::from_utf8_lossy(&out).into_owned()
        };
        tokio::select! {
            out = talk => out,
            // Ended by the server: it answered and closed.
            () = server.serve(io) => {
                let mut out = Vec::new();
                client.read_to_end(&mut out).await.unwrap();
                String::from_utf8_lossy(&out).into_owned()
            }
        }
    }

    /// The values of the response's `Connection` header lines, lower-cased.
    fn connection_header(response: &str) -> Vec<String> {
        response
            .lines()
            .take_while(|l| !l.is_empty())
            .filter_map(|l| l.split_once(':'))
            .filter(|(name, _)| name.eq_ignore_ascii_case("connection"))
            .map(|(_, value)| value.trim().to_ascii_lowercase())
            .collect()
    }

    const KEEP_ALIVE_10: &[u8] = b"GET /_baton/health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";

    #[tokio::test]
    async fn an_http10_keep_alive_request_in_a_drain_is_told_close_and_nothing_else() {
        let server = server(HttpSettings::default());
        // Before the drain: kept alive, as the client asked.
        let out = exchange(&server, KEEP_ALIVE_10).await;
        assert!(out.starts_with("HTTP/1.0 200"), "{out}");
        assert_eq!(connection_header(&out), ["keep-alive"], "{out}");

        server.drain();
        let out = exchange(&server, KEEP_ALIVE_10).await;
        assert!(out.starts_with("HTTP/1.0 200"), "{out}");
        assert_eq!(connection_header(&out), ["close"], "{out}");
        // HTTP/1.1 is told the same.
        let out = exchange(&server, b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert_eq!(connection_header(&out), ["close"], "{out}");
    }

    #[tokio::test]
    async fn http11_needs_exactly_one_host_and_http10_none() {
        let server = server(HttpSettings::default());
        for (request, status) in [
            (&b"GET /_baton/health HTTP/1.1\r\n\r\n"[..], "HTTP/1.1 400"),
            (
                b"GET http://x/_baton/health HTTP/1.1\r\n\r\n",
                "HTTP/1.1 400",
            ),
            (
                b"GET /_baton/health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "HTTP/1.1 400",
            ),
            (
                b"GET /_baton/health HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
                "HTTP/1.0 400",
            ),
            (
                b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n\r\n",
                "HTTP/1.1 200",
            ),
            (
                b"GET http://x/_baton/health HTTP/1.1\r\nHost: x\r\n\r\n",
                "HTTP/1.1 200",
            ),
            (b"GET /_baton/health HTTP/1.0\r\n\r\n", "HTTP/1.0 200"),
        ] {
            let out = exchange(&server, request).await;
            assert!(
                out.starts_with(status),
                "{}: {out}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[tokio::test]
    async fn a_content_length_past_the_limit_gets_413_without_an_invitation() {
        let server = server(HttpSettings {
            max_body_bytes: 10,
            ..HttpSettings::default()
        });
        let ask = |length: usize| {
            format!(
                "POST /_baton/health HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n\
                 Content-Length: {length}\r\n\r\n"
            )
        };
        let out = exchange(&server, ask(11).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 413"), "{out}");
        assert!(!out.contains("100 Continue"), "{out}");
        assert_eq!(connection_header(&out), ["close"], "{out}");
        // Within the limit, the body is invited.
        let out = exchange(&server, ask(10).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 100 Continue\r\n\r\n"), "{out}");
    }

    #[tokio::test]
    async fn more_header_fields_than_max_headers_get_431() {
        let server = server(HttpSettings {
            max_headers: 5,
            ..HttpSettings::default()
        });
        let with = |fields: usize| {
            let mut r = String::from("GET /_baton/health HTTP/1.1\r\nHost: x\r\n");
            for i in 1..fields {
                r.push_str(&format!("X-Field-{i}: v\r\n"));
            }
            r + "\r\n"
        };
        let out = exchange(&server, with(5).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        let out = exchange(&server, with(6).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 431"), "{out}");
    }

    #[tokio::test]
    async fn http2_requests_are_held_to_max_headers_too() {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let server = server(HttpSettings {
            max_headers: 5,
            ..HttpSettings::default()
        });
        let (client, io) = tokio::io::duplex(64 * 1024);
        let talk = async {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            let mut statuses = Vec::new();
            for fields in [5, 6] {
                let mut request = http::Request::get("http://x/_baton/health");
                for i in 0..fields {
                    request = request.header(format!("x-field-{i}"), "v");
                }
                let request = request
                    .body(http_body_util::Empty::<bytes::Bytes>::new())
                    .unwrap();
                statuses.push(
                    sender
                        .send_request(request)
                        .await
                        .unwrap()
                        .status()
                        .as_u16(),
                );
            }
            statuses
        };
        tokio::select! {
            statuses = talk => assert_eq!(statuses, [200, 431]),
            () = server.serve(io) => panic!("the connection ended"),
        }
    }
}
