//! WebSocket (RFC 6455) connections on the routes a plugin declares `ROUTE_WEBSOCKET`:
//! the opening handshake (only a proper HTTP/1.1 upgrade; anything else on such a route
//! is a 426), then one task per connection that runs the protocol with
//! `tokio-tungstenite` (framing, masking, fragments reassembled into whole messages up to
//! the route's or `websocket.max_message_bytes`, UTF-8 checks, the close handshake) and
//! between it and the plugin: messages in, the plugin's send queue out ([`Outbox`]),
//! pings after `ping_interval` of silence, a close when a ping goes unanswered for
//! `ping_timeout`.
//!
//! The drain: once it begins, each connection is closed with 1012 (service restart) at
//! its own offset within `worker.drain_spread`, so that its clients reconnect to the next
//! generation spread out; at the forced phase every connection still open is closed at
//! once (and counted in the log). A connection counts as an open connection of the
//! worker ([`ConnectionGuard`]) until its plugin's `ws_close` returned.
//!
//! A TCP or Unix connection quiet for a while (no message either way: see
//! [`next_quiet`]), with nothing under way and nothing of the client's in tungstenite's
//! hands ([`crate::ws_frames`]), leaves its task: its socket waits in the
//! worker's idle set ([`crate::idle`]) with what the connection needs (the plugin's
//! session, its outbox), and tungstenite, its buffers and the task are freed (8.6 KiB of
//! an idle connection's memory). It comes back, with a new task and a new tungstenite
//! in the same state (a server's tungstenite keeps nothing else between whole messages),
//! when the client sends, its ping is due, its plugin sends or closes, or the drain
//! reaches it. TLS connections keep their task: their state lives above the socket.
//!
//! It never parses frames itself (beyond where they end) and never calls plugin code but
//! through `baton_loader::ws`.

use crate::conn_state::{ConnCtx, InFlight, has_token};
use crate::connection::{ConnIo, Detached, Socket};
use crate::drain::{ConnectionGuard, DrainWatch, Phase, spread_offset};
use crate::idle::{IdleSocket, Parked, Resume, Waiting};
use crate::metrics::Global;
use crate::router::Lookup;
use crate::shared::{CallGuard, Shared};
use crate::ws_frames::FrameEdges;
use baton_loader::ws::{self as plugin_ws, Kind, Next, Outbox, Outgoing, Session};
use baton_loader::{Call, Plugin, RouteKind};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::request::Parts;
use http::{HeaderValue, Method, Response, StatusCode, Version, header};
use http_body_util::Full;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, handshake::derive_accept_key};

/// The answer to an upgrade request: a 101 (the connection's task is spawned and takes
/// the connection over once hyper hands it on), or a refusal.
pub(crate) type Upgrade = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;

/// How long the peer has to answer our close frame before the connection is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The same, in the forced phase of the drain (the worker exits shortly after).
const FORCED_CLOSE_TIMEOUT: Duration = Duration::from_millis(100);
/// The same for a client that does not read (the close frame may never get out).
const SLOW_CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long the closing `shutdown` may take (a lingering close, see `connection`).
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(3);
/// tungstenite's read buffer per connection: most of an idle connection's memory, since
/// tungstenite fills it with zeros before every read. 4 KiB rather than 8: 8.6 KiB per
/// idle WebSocket instead of 12.6, for about 6% fewer 64 KiB messages per second (each
/// takes twice the reads) and none fewer small ones (docs/BENCHMARKS.md).
const READ_BUFFER: usize = 4 * 1024;
/// Frames are written out once this much is buffered (or at every flush).
const WRITE_BUFFER: usize = 16 * 1024;
/// A code the plugin is told when the connection ended without a close frame.
const ABNORMAL: u16 = 1006;
/// A close frame without a code.
const NO_STATUS: u16 = 1005;
/// The code every connection gets when its generation drains.
const SERVICE_RESTART: u16 = 1012;

/// A WebSocket route a request is routed to.
pub(crate) struct Target {
    pub(crate) index: usize,
    plugin: Arc<Plugin>,
    pub(crate) route: u32,
    params: Vec<(String, String)>,
    /// The route's message limit.
    limit: u64,
}

/// For [`crate::handle`]: the WebSocket route `parts` is routed to, if it is one. Cheap
/// when no plugin has WebSocket routes.
pub(crate) fn route(parts: &Parts, ctx: &ConnCtx) -> Option<Target> {
    let shared = &ctx.shared;
    if !shared
        .router
        .plugins
        .iter()
        .any(|p| p.ws_callbacks().is_some())
    {
        return None;
    }
    match shared
        .router
        .lookup(parts.method.as_str(), parts.uri.path())
    {
        Lookup::Found {
            index,
            plugin,
            route,
            params,
        } if plugin.routes[route as usize].kind == RouteKind::WebSocket => Some(Target {
            index,
            plugin: plugin.clone(),
            route,
            params,
            limit: plugin.routes[route as usize]
                .max_body_bytes
                .unwrap_or(shared.settings.websocket.max_message_bytes),
        }),
        _ => None,
    }
}

/// For [`crate::handle`]: the answer to a request for a WebSocket route: the 101 (after
/// the plugin's `ws_open` accepted it) or a refusal.
pub(crate) fn upgrade(parts: Parts, target: Target, no_body: bool, ctx: &Arc<ConnCtx>) -> Upgrade {
    let shared = &ctx.shared;
    let Target {
        index,
        plugin,
        route,
        params,
        limit,
    } = target;
    let refused = |r| -> Upgrade { Box::pin(std::future::ready(r)) };
    let accept = match handshake(&parts, no_body) {
        Ok(accept) => accept,
        Err(refusal) => return refused(*refusal),
    };
    if shared.closing.load(Ordering::Relaxed) {
        // Draining: the client reconnects to the next generation.
        let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "draining\n");
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return refused(r);
    }
    let mut parts = parts;
    let Some(on_upgrade) = parts.extensions.remove::<OnUpgrade>() else {
        return refused(upgrade_required(parts.version));
    };
    let in_flight = InFlight::start(ctx);
    let drain = ctx.drain.clone();
    let opening = Opening {
        shared: shared.clone(),
        plugin,
        index,
        route,
        params,
        parts,
        limit,
        drain,
        accept,
    };
    Box::pin(async move {
        let (answer, answered) = tokio::sync::oneshot::channel();
        // Opened and served by a task of its own: a client that goes away while a blocking
        // `ws_open` runs still gets its `ws_close` (1006).
        tokio::spawn(tracing::Instrument::in_current_span(
            opening.open_and_serve(on_upgrade, answer),
        ));
        let response = answered
            .await
            .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "internal server error\n"));
        drop(in_flight);
        response
    })
}

/// What opening a connection needs, from the upgrade request.
struct Opening {
    shared: Arc<Shared>,
    plugin: Arc<Plugin>,
    index: usize,
    route: u32,
    params: Vec<(String, String)>,
    parts: Parts,
    limit: u64,
    drain: DrainWatch,
    accept: HeaderValue,
}

impl Opening {
    /// Calls the plugin's `ws_open`, answers the upgrade request (`answer`: 101 or 403),
    /// then serves the connection.
    async fn open_and_serve(
        self,
        on_upgrade: OnUpgrade,
        answer: tokio::sync::oneshot::Sender<Response<Full<Bytes>>>,
    ) {
        let Opening {
            shared,
            plugin,
            index,
            route,
            params,
            parts,
            limit,
            drain,
            accept,
        } = self;
        let outbox = Outbox::register(shared.settings.websocket.send_queue_bytes);
        // Taken before the 101, so the drain never sees this connection as closed.
        let guard = shared.connections.open();
        let share = shared.blocking[index].clone();
        let opened = {
            let plugin = plugin.clone();
            let (generation, worker_pid) = (shared.generation, shared.pid);
            run_callback(&share, &shared, move || {
                let call = Call {
                    route,
                    method: &parts.method,
                    path: parts.uri.path(),
                    query: parts.uri.query().unwrap_or(""),
                    headers: &parts.headers,
                    params: &params,
                    body: &[],
                    generation,
                    worker_pid,
                };
                let opened = plugin_ws::open(&plugin, &call, &outbox);
                (opened, outbox)
            })
            .await
        };
        let (session, outbox) = match opened {
            Some((Ok(session), outbox)) => (session, outbox),
            Some((Err(rc), _)) => {
                tracing::debug!("plugin {} refused a WebSocket ({rc})", plugin.name);
                let _ = answer.send(text(StatusCode::FORBIDDEN, "forbidden\n"));
                return;
            }
            None => {
                let _ = answer.send(text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal server error\n",
                ));
                return;
            }
        };
        // Boxed now, before the connection's buffers: what stays while it is quiet is
        // not placed among what is freed then (which the allocator can then give back).
        let conn = Box::new(Conn {
            plugin,
            share,
            shared,
            session,
            outbox,
            drain,
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            _guard: guard,
        });
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
        // If the client is gone, the upgrade fails and `serve` closes with 1006.
        let _ = answer.send(r);
        serve(on_upgrade, conn).await;
    }
}

/// Checks an upgrade request (RFC 6455 §4.2.1): the `Sec-WebSocket-Accept` value, or the
/// answer refusing it.
fn handshake(parts: &Parts, no_body: bool) -> Result<HeaderValue, Box<Response<Full<Bytes>>>> {
    let headers = &parts.headers;
    let asks_websocket = headers
        .get_all(header::UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("websocket"));
    if parts.version != Version::HTTP_11
        || parts.method != Method::GET
        || !asks_websocket
        || !has_token(headers, "upgrade")
    {
        return Err(Box::new(upgrade_required(parts.version)));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        let mut r = upgrade_required(parts.version);
        r.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(Box::new(r));
    }
    let key = headers.get(header::SEC_WEBSOCKET_KEY).map(|k| k.as_bytes());
    let Some(key) = key.filter(|k| is_key(k)) else {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "bad request: Sec-WebSocket-Key is not 16 bytes in base64\n",
        )));
    };
    if !no_body {
        return Err(Box::new(text(
            StatusCode::BAD_REQUEST,
            "bad request: a WebSocket upgrade has no body\n",
        )));
    }
    Ok(HeaderValue::from_str(&derive_accept_key(key)).expect("base64 is a header value"))
}

/// 16 bytes in base64: 22 characters of the alphabet and `==`.
fn is_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
}

/// 426: a WebSocket route answers only an upgrade to WebSocket.
fn upgrade_required(version: Version) -> Response<Full<Bytes>> {
    let mut r = text(
        StatusCode::UPGRADE_REQUIRED,
        "this is a WebSocket endpoint: upgrade required\n",
    );
    // Connection-specific headers do not exist in HTTP/2 (and there is no RFC 8441 here).
    if version < Version::HTTP_2 {
        let h = r.headers_mut();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    }
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// Runs one callback of a plugin: inline for a non-blocking plugin, otherwise on the
/// blocking pool within the plugin's share of it (`share`). `None` if its thread failed.
async fn run_callback<R: Send + 'static>(
    share: &Option<Arc<Semaphore>>,
    shared: &Shared,
    f: impl FnOnce() -> R + Send + 'static,
) -> Option<R> {
    match share {
        None => {
            let _counted = CallGuard::new(&shared.plugin_calls);
            Some(f())
        }
        Some(share) => {
            let _permit = share.acquire().await.ok()?;
            // Counted until the callback returns, even if this task is dropped meanwhile.
            let counted = CallGuard::new(&shared.plugin_calls);
            tokio::task::spawn_blocking(move || {
                let r = f();
                drop(counted);
                r
            })
            .await
            .ok()
        }
    }
}

/// One open connection: what its task needs.
struct Conn {
    plugin: Arc<Plugin>,
    /// The plugin's share of the blocking pool; `None` for a non-blocking plugin.
    share: Option<Arc<Semaphore>>,
    shared: Arc<Shared>,
    session: Session,
    outbox: Outbox,
    drain: DrainWatch,
    /// The largest message taken.
    limit: usize,
    _guard: ConnectionGuard,
}

/// The connection's task: waits for hyper to hand the connection over, runs it, then
/// calls the plugin's `ws_close` (last) and unregisters the handle. A TCP or Unix
/// connection may go quiet and wait in the idle set meanwhile ([`live`]).
async fn serve(on_upgrade: OnUpgrade, conn: Box<Conn>) {
    conn.shared.websockets.fetch_add(1, Ordering::Relaxed);
    (conn.shared.metrics).add(Global::WebSocketsOpened, 1);
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(e) => {
            tracing::debug!("WebSocket upgrade failed: {e}");
            return finish(conn, ABNORMAL, String::new()).await;
        }
    };
    let upgraded = match ConnIo::<tokio::net::TcpStream>::upgraded(upgraded) {
        Ok(io) => return live(io, conn, Instant::now(), FIRST_QUIET_AFTER).await,
        Err(upgraded) => upgraded,
    };
    let upgraded = match ConnIo::<tokio::net::UnixStream>::upgraded(upgraded) {
        Ok(io) => return live(io, conn, Instant::now(), FIRST_QUIET_AFTER).await,
        Err(upgraded) => upgraded,
    };
    // TLS: its state lives above the socket, so the connection keeps its task.
    let (code, reason) = match run(TokioIo::new(upgraded), &conn, Instant::now(), None).await {
        Ended::Closed(code, reason) => (code, reason),
        Ended::Quiet(..) => (ABNORMAL, String::new()),
    };
    finish(conn, code, reason).await;
}

/// Serves a connection whose socket can wait in the idle set, until it ends or goes quiet:
/// then its socket waits there, its task ends, and a new one runs this again when the
/// client sends, its ping is due, its plugin sends or the drain reaches it ([`park`]).
/// `last_heard`: when the client last sent a message; `quiet_for`: how long it must be
/// quiet before it goes there ([`next_quiet`]), at most half the ping interval.
async fn live<I: Socket>(
    mut io: ConnIo<I>,
    conn: Box<Conn>,
    mut last_heard: Instant,
    quiet_for: Duration,
) {
    let quiet_for = quiet_for.min(ping_interval(&conn.shared) / 2);
    let quiet = (io.can_idle() && conn.shared.idle.open()).then_some(quiet_for);
    let (code, reason) = loop {
        match run(io, &conn, last_heard, quiet).await {
            Ended::Closed(code, reason) => break (code, reason),
            Ended::Quiet(quiet, heard) if quiet.can_detach() => {
                // Registered before it parks: a send from now on brings it back.
                let cell = Arc::new(Mutex::new(WakeCell::default()));
                if !(conn.outbox.changes()).call_on_change(on_change(&conn.shared, &cell)) {
                    // The plugin sent (or closed) meanwhile: on with a new tungstenite.
                    (io, last_heard) = (quiet, heard);
                    continue;
                }
                match quiet.detach() {
                    Ok((socket, detached)) => {
                        return park::<I>(socket, detached, conn, heard, quiet_for, &cell);
                    }
                    Err(e) => {
                        conn.outbox.changes().forget();
                        tracing::debug!("WebSocket connection ended: {e}");
                        break (ABNORMAL, String::new());
                    }
                }
            }
            // Bytes hyper read along with the upgrade request, still unread (not seen:
            // a quiet connection has read everything): on with a new tungstenite.
            Ended::Quiet(quiet, heard) => (io, last_heard) = (quiet, heard),
        }
    };
    finish(conn, code, reason).await;
}

/// A quiet connection waits in the worker's idle set holding its socket and `conn`, no
/// task, no tungstenite and none of their buffers. It comes back to [`live`] when its
/// client sends, when its ping is due, when its plugin sends or closes (through `cell`,
/// whose wake-up the outbox holds), at its place in the drain's spread, or at the forced
/// phase.
fn park<I: Socket>(
    socket: IdleSocket,
    detached: Detached,
    conn: Box<Conn>,
    last_heard: Instant,
    quiet_for: Duration,
    cell: &Mutex<WakeCell>,
) {
    let shared = conn.shared.clone();
    let parked_at = Instant::now();
    let ping_due = (last_heard + ping_interval(&shared)).saturating_duration_since(parked_at);
    let spread = spread_offset(conn.session.handle(), spread_window(&shared));
    let resume: Resume = Box::new(move |socket| {
        conn.outbox.changes().forget();
        let quiet_for = next_quiet(quiet_for, parked_at.elapsed());
        match detached.attach::<I>(socket) {
            Ok(io) => tokio::spawn(live(io, conn, last_heard, quiet_for)),
            Err(e) => {
                tracing::debug!("WebSocket connection ended: {e}");
                tokio::spawn(finish(conn, ABNORMAL, String::new()))
            }
        };
    });
    let waiting = Waiting::WebSocket { spread };
    let Some(parked) = shared.idle.park(socket, ping_due, waiting, resume) else {
        return;
    };
    // Its buffers were freed: counted towards the next trim of the allocator.
    shared.parked.fetch_add(1, Ordering::Relaxed);
    let early = {
        let mut cell = lock(cell);
        cell.parked = Some(parked);
        cell.early
    };
    if early {
        // The plugin sent while it was parking.
        shared.idle.wake(parked);
    }
}

/// Where a connection parks, for the wake-up its outbox calls when the plugin sends.
#[derive(Debug, Default)]
struct WakeCell {
    parked: Option<Parked>,
    /// Called before the connection was parked: [`park`] wakes it itself.
    early: bool,
}

fn lock(cell: &Mutex<WakeCell>) -> std::sync::MutexGuard<'_, WakeCell> {
    // Two plain fields, consistent after any panic.
    cell.lock().unwrap_or_else(|p| p.into_inner())
}

/// The outbox's wake-up for a connection about to park at `cell`: called from the thread
/// that sends (a plugin's own, maybe), it resumes the connection within the runtime.
fn on_change(shared: &Arc<Shared>, cell: &Arc<Mutex<WakeCell>>) -> Box<dyn FnOnce() + Send> {
    let (weak, cell) = (Arc::downgrade(shared), cell.clone());
    let runtime = tokio::runtime::Handle::current();
    Box::new(move || {
        let parked = {
            let mut cell = lock(&cell);
            cell.early = cell.parked.is_none();
            cell.parked
        };
        if let (Some(parked), Some(shared)) = (parked, weak.upgrade()) {
            runtime.spawn(async move { shared.idle.wake(parked) });
        }
    })
}

/// Calls the plugin's `ws_close` (last) and unregisters the connection's handle.
async fn finish(conn: Box<Conn>, code: u16, reason: String) {
    let Conn {
        plugin,
        share,
        shared,
        session,
        outbox,
        ..
    } = *conn;
    outbox.shut();
    {
        let plugin = plugin.clone();
        run_callback(&share, &shared, move || {
            session.closed(&plugin, code, &reason)
        })
        .await;
    }
    drop(outbox);
    shared.websockets.fetch_sub(1, Ordering::Relaxed);
    shared.metrics.add(Global::WebSocketsClosed, 1);
}

/// `websocket.ping_interval`.
pub(crate) fn ping_interval(shared: &Shared) -> Duration {
    Duration::from_millis(shared.settings.websocket.ping_interval_ms.max(1))
}

/// The window of the drain's spread: `worker.drain_spread`, at most `drain_timeout`.
fn spread_window(shared: &Shared) -> Duration {
    Duration::from_millis(
        shared
            .settings
            .drain_spread_ms
            .min(shared.settings.drain_timeout_ms),
    )
}

/// How a connection's [`run`] ended.
enum Ended<S> {
    /// The connection is over: the plugin is told this code and reason.
    Closed(u16, String),
    /// Quiet for long enough ([`next_quiet`]) with nothing of the client's held: its
    /// socket, and when the client was last heard.
    Quiet(S, Instant),
}

/// Why the host closes a connection, and so how long the peer gets to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    /// The close handshake as usual.
    Normal,
    /// The peer does not read or does not answer: a short wait.
    Slow,
    /// The drain's forced phase: a very short wait.
    Forced,
}

/// The protocol side of one connection, as data the loop updates.
struct Link {
    /// A ping to hand to the sink before anything else.
    ping: bool,
    /// A frame to hand to the sink next (it was not ready yet).
    out: Option<Message>,
    /// Our close frame, handed to the sink after `out`.
    close_frame: Option<Message>,
    /// Frames handed to the sink since the last flush.
    unflushed: bool,
    /// Our close frame is queued or sent; the peer has until then to answer.
    closing: Option<Instant>,
    /// What the plugin is told in `ws_close`, once known.
    told: Option<(u16, String)>,
    last_heard: Instant,
    ping_sent: Option<Instant>,
}

impl Link {
    /// Something is to be handed to the sink or flushed.
    fn writing(&self) -> bool {
        self.ping || self.out.is_some() || self.close_frame.is_some() || self.unflushed
    }

    /// Starts the close handshake with `code` unless it began already.
    fn close(&mut self, outbox: &Outbox, code: u16, reason: &str, urgency: Urgency) {
        if self.closing.is_some() {
            if urgency == Urgency::Forced {
                self.closing = Some(Instant::now() + FORCED_CLOSE_TIMEOUT);
            }
            return;
        }
        outbox.shut();
        self.close_frame = Some(Message::Close(Some(CloseFrame {
            code: CloseCode::from(code),
            reason: reason.into(),
        })));
        let wait = match urgency {
            Urgency::Normal => CLOSE_TIMEOUT,
            Urgency::Slow => SLOW_CLOSE_TIMEOUT,
            Urgency::Forced => FORCED_CLOSE_TIMEOUT,
        };
        self.closing = Some(Instant::now() + wait);
        self.told.get_or_insert_with(|| (code, reason.to_owned()));
    }
}

/// Runs the protocol until the connection ends (what the plugin is told), or, with
/// `quiet`, until it has been quiet that long ([`next_quiet`]) with nothing of the
/// client's held (its socket).
async fn run<S>(io: S, conn: &Conn, last_heard: Instant, quiet: Option<Duration>) -> Ended<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let settings = &conn.shared.settings.websocket;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(WRITE_BUFFER + conn.limit.max(settings.send_queue_bytes) + 64)
        .max_message_size(Some(conn.limit))
        .max_frame_size(Some(conn.limit));
    let ws =
        WebSocketStream::from_raw_socket(FrameEdges::new(io), Role::Server, Some(config)).await;
    let (mut sink, mut stream) = ws.split();
    let ping_interval = ping_interval(&conn.shared);
    let ping_timeout = Duration::from_millis(settings.ping_timeout_ms.max(1));
    let offset = spread_offset(conn.session.handle(), spread_window(&conn.shared));
    let (mut spread_watch, mut forced_watch) = (conn.drain.clone(), conn.drain.clone());
    let closing_at = &conn.shared.closing_at;
    let spread = async move {
        spread_watch.reached(Phase::Closing).await;
        // From when the drain began: a connection that waited quiet comes back at its
        // place in the spread.
        let began = closing_at.get().copied().unwrap_or_else(Instant::now);
        tokio::time::sleep_until(began + offset).await;
    };
    let forced = async move { forced_watch.reached(Phase::Forced).await };
    let (mut spread, mut forced) = (std::pin::pin!(spread), std::pin::pin!(forced));
    let (mut spread_done, mut forced_done) = (false, false);
    let mut link = Link {
        ping: false,
        out: None,
        close_frame: None,
        unflushed: false,
        closing: None,
        told: None,
        last_heard,
        ping_sent: None,
    };
    // When something last happened (a message either way): quiet from then on.
    let mut active = Instant::now();
    // Quiet long enough, with nothing under way: the connection may leave its task.
    let mut go_quiet = false;
    // A `ws_message` of a blocking plugin under way; reading waits for it (in order, one
    // at a time), writing goes on.
    let mut pending: Option<Pin<Box<dyn Future<Output = ()> + Send>>> = None;
    let mut stream_done = false;
    let timer = tokio::time::sleep_until(link.last_heard + ping_interval);
    let mut timer = std::pin::pin!(timer);

    loop {
        // What to write next: control frames and the close first, then the plugin's queue.
        if link.closing.is_none() {
            if link.out.is_none() {
                match conn.outbox.take() {
                    Next::Send(message) => link.out = Some(frame_of(message)),
                    Next::Idle | Next::Shut => {}
                    Next::Close(code, reason) => {
                        link.close(&conn.outbox, code, &reason, Urgency::Normal)
                    }
                    Next::Overflowed => slow_reader(&mut link, conn),
                }
            } else if conn.outbox.overflowed() {
                slow_reader(&mut link, conn);
            }
        }
        if stream_done && !link.writing() {
            // The close handshake is over, or the peer is gone.
            break;
        }
        let deadline = match (link.closing, link.ping_sent) {
            (Some(at), _) => at,
            // Not reading while a callback runs: no pong can be seen meanwhile.
            (None, _) if pending.is_some() => Instant::now() + ping_interval,
            (None, Some(sent)) => sent + ping_timeout,
            (None, None) => match quiet {
                Some(quiet) => (link.last_heard + ping_interval).min(active + quiet),
                None => link.last_heard + ping_interval,
            },
        };
        // Reset only when due earlier, or once it fired: `last_heard` moves with every
        // message, and re-arming the timer for each showed in the echo benchmark.
        if deadline < timer.deadline() || timer.is_elapsed() {
            timer.as_mut().reset(deadline);
        }
        let reading = pending.is_none() && !stream_done;
        // Unbiased: a plugin that keeps the queue full must not starve reading (and so the
        // client's close or pong), nor a client that keeps sending starve writing.
        tokio::select! {
            () = &mut forced, if !forced_done => {
                forced_done = true;
                log_forced(&conn.shared);
                link.close(&conn.outbox, SERVICE_RESTART, "service restart", Urgency::Forced);
            }
            () = async { pending.as_mut().expect("guarded").await }, if pending.is_some() => {
                pending = None;
                // Quiet from the end of the callback on.
                active = Instant::now();
                // Pongs waited unread meanwhile: the timeout starts again.
                if link.ping_sent.is_some() {
                    link.ping_sent = Some(Instant::now());
                }
            }
            wrote = futures_util::future::poll_fn(|cx| {
                write_step(&mut sink, &mut link, &conn.outbox, cx)
            }),
                if link.writing() =>
            {
                if let Err(e) = wrote {
                    tracing::debug!("WebSocket write failed: {e}");
                    link.told.get_or_insert_with(|| (ABNORMAL, String::new()));
                    break;
                }
                active = Instant::now();
            }
            incoming = stream.next(), if reading => {
                let Some(incoming) = incoming else {
                    // The handshake is over (or the peer is gone): what is left to write
                    // gets a moment, then the loop ends.
                    stream_done = true;
                    link.told.get_or_insert_with(|| (ABNORMAL, String::new()));
                    link.closing.get_or_insert_with(|| Instant::now() + FORCED_CLOSE_TIMEOUT);
                    continue;
                };
                link.last_heard = Instant::now();
                active = link.last_heard;
                match incoming {
                    Ok(Message::Text(t)) => {
                        pending = deliver(conn, Kind::Text, Bytes::from(t));
                    }
                    Ok(Message::Binary(b)) => pending = deliver(conn, Kind::Binary, b),
                    Ok(Message::Ping(_)) => link.unflushed = true,
                    Ok(Message::Pong(_)) => link.ping_sent = None,
                    Ok(Message::Close(frame)) => {
                        // tungstenite answers it; the stream ends after the reply is out.
                        link.told.get_or_insert_with(|| match frame {
                            Some(f) => (u16::from(f.code), f.reason.as_str().to_owned()),
                            None => (NO_STATUS, String::new()),
                        });
                        conn.outbox.shut();
                        link.out = None;
                        link.close_frame = None;
                        link.ping = false;
                        link.unflushed = true;
                        link.closing.get_or_insert_with(|| Instant::now() + CLOSE_TIMEOUT);
                    }
                    Ok(Message::Frame(_)) => {}
                    Err(e) => {
                        // The stream ends after an error: close with the reason and go.
                        stream_done = true;
                        match failure(&e) {
                            Some((code, reason)) => {
                                tracing::debug!("WebSocket closed with {code}: {e}");
                                // After the answers to what came before (as Autobahn's
                                // strict cases expect).
                                link.told = Some((code, reason.to_owned()));
                                if !conn.outbox.close_after_queue(code, reason) {
                                    link.close(&conn.outbox, code, reason, Urgency::Slow);
                                }
                            }
                            None => {
                                link.told.get_or_insert_with(|| (ABNORMAL, String::new()));
                                break;
                            }
                        }
                    }
                }
            }
            () = conn.outbox.ready(), if link.closing.is_none() => {}
            () = &mut spread, if !spread_done => {
                spread_done = true;
                // After what the plugin queued, like its own close.
                conn.outbox.close_after_queue(SERVICE_RESTART, "service restart");
            }
            () = &mut timer => {
                let now = Instant::now();
                if link.closing.is_some_and(|at| at <= now) {
                    break;
                } else if link.ping_sent.is_some_and(|sent| sent + ping_timeout <= now) {
                    if pending.is_none() {
                        tracing::debug!("WebSocket peer did not answer a ping: closing");
                        link.told = Some((ABNORMAL, "ping timeout".into()));
                        link.close(&conn.outbox, 1011, "ping timeout", Urgency::Slow);
                    }
                } else if link.ping_sent.is_none()
                    && link.last_heard + ping_interval <= now
                    && link.closing.is_none()
                {
                    link.ping_sent = Some(now);
                    link.ping = true;
                } else if quiet.is_some_and(|quiet| active + quiet <= now) {
                    go_quiet = !stream_done
                        && pending.is_none()
                        && !link.writing()
                        && link.closing.is_none()
                        && link.ping_sent.is_none()
                        && !spread_done
                        && !forced_done
                        && !conn.shared.closing.load(Ordering::Relaxed)
                        && conn.outbox.queued_bytes() == 0;
                    // Looked at again after another quiet while, if not now.
                    active = now;
                }
            }
        }
        if std::mem::take(&mut go_quiet) {
            let ws = sink.reunite(stream).expect("the halves of one stream");
            if ws.get_ref().at_rest() {
                return Ended::Quiet(ws.into_inner().into_inner(), link.last_heard);
            }
            // Part of a frame or of a message is in tungstenite's hands.
            (sink, stream) = ws.split();
        }
    }
    if let Some(pending) = pending {
        // A callback still running: wait for it, so that `ws_close` comes after it.
        pending.await;
    }
    if let Ok(mut ws) = sink.reunite(stream) {
        // A lingering close (see `connection`): no reset destroys the close frame.
        // In the forced phase the worker exits within moments: `ws_close` must come first.
        let wait = if forced_done {
            FORCED_CLOSE_TIMEOUT
        } else {
            SHUTDOWN_TIMEOUT
        };
        let _ = tokio::time::timeout(wait, ws.get_mut().shutdown()).await;
    }
    let (code, reason) = link.told.unwrap_or((ABNORMAL, String::new()));
    Ended::Closed(code, reason)
}

/// How long a connection must be quiet (no message either way) before it leaves its task
/// for the idle set ([`park`]), once it came back from there: a second; or, if it came
/// back sooner than it had been quiet before it went (`parked_for` < `quiet_for`), twice
/// as long as last time (up to a minute; [`live`] caps it at half the ping interval).
///
/// Going there and back costs more CPU than a message does: 30 to 45 µs of worker CPU per
/// round, against 18 to 31 µs per message answered without one (2,000 aiohttp clients
/// echoing a message every 1.5 or 3 s, against every 0.5 s; two runs each). So a connection
/// stays in the set at least about as long as it waited before going there, or it waits
/// longer next time: one that speaks every 1.5 s stops going there and back after its
/// first round, one that speaks every 3 s or less often still goes there between its
/// messages.
///
/// Right after it opened, the quiet it needs is [`FIRST_QUIET_AFTER`], 20 ms, enough for
/// an opening exchange on a local network; a client that speaks later costs one round
/// more. Most connections of a large crowd go quiet after their opening exchange: so a
/// crowd that arrives at once is not all in tasks at once, and the buffers each freed are
/// reused by the next instead of leaving the heap larger than it needs to be (3.4 KiB per
/// idle connection at 1,000 in benchmark (d) with 20 ms; about 6 with a second).
fn next_quiet(quiet_for: Duration, parked_for: Duration) -> Duration {
    let quiet_for = quiet_for.max(QUIET_AFTER);
    if parked_for < quiet_for {
        (quiet_for * 2).min(MAX_QUIET)
    } else {
        QUIET_AFTER
    }
}
const FIRST_QUIET_AFTER: Duration = Duration::from_millis(20);
const MAX_QUIET: Duration = Duration::from_secs(60);
const QUIET_AFTER: Duration = Duration::from_secs(1);

/// Frames handed to the sink in one turn of the loop, before it flushes or reads again.
const WRITE_BATCH: usize = 64;

/// A plugin's message as a frame.
fn frame_of(message: Outgoing) -> Message {
    match message {
        Outgoing::Text(t) => Message::text(t),
        Outgoing::Binary(b) => Message::binary(b),
    }
}

/// One turn of writing: hands the next frames (a ping first, the close last) to the sink
/// while it has room, taking more of the plugin's queue (up to [`WRITE_BATCH`]), then
/// flushes.
fn write_step<S>(
    sink: &mut S,
    link: &mut Link,
    outbox: &Outbox,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Result<(), WsError>>
where
    S: futures_util::Sink<Message, Error = WsError> + Unpin,
{
    use std::task::Poll;
    let mut handed = 0;
    loop {
        if link.out.is_none() && link.closing.is_none() && handed < WRITE_BATCH {
            link.out = outbox.take_message().map(frame_of);
        }
        if link.ping || link.out.is_some() || link.close_frame.is_some() {
            if handed == WRITE_BATCH {
                return Poll::Ready(Ok(()));
            }
            match sink.poll_ready_unpin(cx) {
                Poll::Pending if handed > 0 => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(ready) => ready?,
            }
            let frame = if std::mem::take(&mut link.ping) {
                Message::Ping(Bytes::new())
            } else if let Some(out) = link.out.take() {
                out
            } else {
                link.close_frame.take().expect("checked above")
            };
            let sent = sink.start_send_unpin(frame);
            link.unflushed = true;
            handed += 1;
            // Once closing, a refused frame (the peer closed meanwhile) is no failure.
            if link.closing.is_none() {
                sent?;
            }
            continue;
        }
        if !link.unflushed {
            return Poll::Ready(Ok(()));
        }
        let flushed = std::task::ready!(sink.poll_flush_unpin(cx));
        link.unflushed = false;
        return Poll::Ready(flushed);
    }
}

/// The client let its send queue overflow: close it with the configured code.
fn slow_reader(link: &mut Link, conn: &Conn) {
    tracing::debug!(
        "WebSocket client does not read: closing it ({} bytes queued at most)",
        conn.shared.settings.websocket.send_queue_bytes
    );
    // What waits for the socket is dropped: it would not get out anyway.
    link.out = None;
    link.ping = false;
    link.close(
        &conn.outbox,
        conn.shared.settings.websocket.slow_reader_close_code,
        "client too slow",
        Urgency::Slow,
    );
}

/// Calls `ws_message`: inline for a non-blocking plugin (`None` then), else the future of
/// the call on the blocking pool.
fn deliver(
    conn: &Conn,
    kind: Kind,
    data: Bytes,
) -> Option<Pin<Box<dyn Future<Output = ()> + Send>>> {
    let (plugin, session) = (conn.plugin.clone(), conn.session);
    match &conn.share {
        None => {
            let _counted = CallGuard::new(&conn.shared.plugin_calls);
            session.message(&plugin, kind, &data);
            None
        }
        Some(_) => {
            let (share, shared) = (conn.share.clone(), conn.shared.clone());
            Some(Box::pin(async move {
                run_callback(&share, &shared, move || {
                    session.message(&plugin, kind, &data)
                })
                .await;
            }))
        }
    }
}

/// The close code for an error reading from the peer, or `None` when the connection is
/// gone (nothing can be sent).
fn failure(e: &WsError) -> Option<(u16, &'static str)> {
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => Some((1009, "message too big")),
        WsError::Capacity(_) => Some((1009, "too big")),
        WsError::Utf8(_) => Some((1007, "invalid UTF-8")),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) => Some((1002, "protocol error")),
        _ => None,
    }
}

/// Logs, once per worker (a worker drains once), how many connections the forced phase
/// of the drain closes: the first connection to see the phase counts them all.
fn log_forced(shared: &Shared) {
    static LOGGED: AtomicBool = AtomicBool::new(false);
    if !LOGGED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "drain forced: closing {} WebSocket connection(s) still open with 1012",
            shared.websockets.load(Ordering::Relaxed)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: Version, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::get("/ws").version(version);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    const UPGRADE: [(&str, &str); 4] = [
        ("connection", "keep-alive, Upgrade"),
        ("upgrade", "WebSocket"),
        ("sec-websocket-version", "13"),
        ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ];

    #[test]
    fn a_proper_upgrade_gets_the_accept_key_of_rfc_6455() {
        let accept = handshake(&parts(Version::HTTP_11, &UPGRADE), true).unwrap();
        // RFC 6455 §1.3's example.
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn anything_else_is_refused() {
        let status = |version, headers: &[(&str, &str)], no_body| {
            handshake(&parts(version, headers), no_body)
                .map(|_| StatusCode::SWITCHING_PROTOCOLS)
                .unwrap_or_else(|r| r.status())
        };
        // A plain GET: 426, saying what to upgrade to.
        let plain = handshake(&parts(Version::HTTP_11, &[]), true).unwrap_err();
        assert_eq!(plain.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(plain.headers()[header::UPGRADE], "websocket");
        assert_eq!(
            status(Version::HTTP_10, &UPGRADE, true),
            StatusCode::UPGRADE_REQUIRED
        );
        assert_eq!(
            status(Version::HTTP_2, &UPGRADE, true),
            StatusCode::UPGRADE_REQUIRED
        );
        let without = |name: &str| -> Vec<(&str, &str)> {
            UPGRADE
                .iter()
                .copied()
                .filter(|(n, _)| *n != name)
                .collect()
        };
        assert_eq!(
            status(Version::HTTP_11, &without("connection"), true),
            StatusCode::UPGRADE_REQUIRED
        );
        let old = handshake(
            &parts(Version::HTTP_11, &without("sec-websocket-version")),
            true,
        )
        .unwrap_err();
        assert_eq!(old.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(old.headers()[header::SEC_WEBSOCKET_VERSION], "13");
        assert_eq!(
            status(Version::HTTP_11, &without("sec-websocket-key"), true),
            StatusCode::BAD_REQUEST
        );
        let mut short_key = without("sec-websocket-key");
        short_key.push(("sec-websocket-key", "c2hvcnQ="));
        assert_eq!(
            status(Version::HTTP_11, &short_key, true),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(Version::HTTP_11, &UPGRADE, false),
            StatusCode::BAD_REQUEST
        );
    }

    #[test]
    fn a_connection_that_comes_back_sooner_than_it_waited_waits_twice_as_long_next_time() {
        let s = Duration::from_secs;
        // Back after longer than it waited: a second again.
        assert_eq!(next_quiet(s(1), s(5)), s(1));
        assert_eq!(next_quiet(FIRST_QUIET_AFTER, s(5)), s(1));
        // Back sooner: twice as long, from a second at least, up to a minute.
        assert_eq!(next_quiet(s(1), Duration::from_millis(500)), s(2));
        assert_eq!(
            next_quiet(FIRST_QUIET_AFTER, Duration::from_millis(50)),
            s(2)
        );
        assert_eq!(next_quiet(s(2), s(1)), s(4));
        assert_eq!(next_quiet(s(40), s(1)), MAX_QUIET);
        // A message every 1.5 s: in the set after the first second, back half a second
        // later, then never again (it waits 2 s); every 3 s: there between all of them.
        let every = |gap: Duration| {
            let (mut quiet, mut rounds) = (s(1), 0);
            for _ in 0..10 {
                if gap > quiet {
                    rounds += 1;
                    quiet = next_quiet(quiet, gap - quiet);
                }
            }
            rounds
        };
        assert_eq!(every(Duration::from_millis(1500)), 1);
        assert_eq!(every(s(3)), 10);
    }

    #[test]
    fn read_errors_map_to_rfc_6455_close_codes() {
        let too_long = WsError::Capacity(CapacityError::MessageTooLong {
            size: 2,
            max_size: 1,
        });
        assert_eq!(failure(&too_long).map(|f| f.0), Some(1009));
        let bad_utf8 = WsError::Utf8("x".into());
        assert_eq!(failure(&bad_utf8).map(|f| f.0), Some(1007));
        let protocol = WsError::Protocol(ProtocolError::FragmentedControlFrame);
        assert_eq!(failure(&protocol).map(|f| f.0), Some(1002));
        let reset = WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake);
        assert_eq!(failure(&reset), None);
    }
}
