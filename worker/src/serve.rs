//! Accept loops, HTTP connections and the drain sequence of one worker.
//!
//! Owns every connection the worker accepts. It answers the health path and 404 for
//! everything else; it never decides when to drain (a signal or the supervisor's death
//! does) and never closes an idle keep-alive connection the moment a drain begins (a
//! client may be sending on it right then): such a connection gets
//! `drain_idle_grace` to send one more request, answered with `Connection: close`.
//!
//! Signals: `SIGTERM`/`SIGINT` or the end of the lifeline start the drain; `SIGQUIT` (the
//! supervisor force-closing a generation to make room under `max_generations`) closes
//! every connection now and exits.

use crate::drain::{ConnectionGuard, Connections, Drain, DrainWatch, Phase};
use crate::inherit::{Listener, NamedListener};
use crate::lazy_select::{Either, lazy_select};
use crate::notify::Notifier;
use crate::plugins::{Answer, Call, Plugin};
use crate::router::{Lookup, Router};
use baton_proto::{Stats, WorkerSettings};
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version, header};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

/// How often changed counters are reported to the supervisor.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after an accept error (EMFILE and friends) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// After `drain_timeout`, how long dropped connections get to release their guards.
const FORCED_CLOSE_WAIT: Duration = Duration::from_millis(200);

struct Shared {
    generation: u64,
    pid: u32,
    settings: WorkerSettings,
    requests: ShardedCounter,
    connections: Arc<Connections>,
    slots: Arc<Semaphore>,
    http1: http1::Builder,
    http2: http2::Builder<TokioExecutor>,
    router: Router,
    /// Per plugin (same index as `router.plugins`): the share of the blocking pool of a
    /// plugin whose handlers may block, so that a saturated one cannot starve the others.
    blocking: Vec<Option<Arc<Semaphore>>>,
    /// Blocking plugin handler calls under way.
    plugin_calls: Arc<AtomicUsize>,
    /// The drain began: HTTP/1 responses carry `Connection: close`.
    closing: AtomicBool,
}

/// A counter every runtime thread bumps on its own cache line, summed when read: one
/// shared atomic bumped by every request on every thread showed up in profiles.
#[derive(Debug, Default)]
struct ShardedCounter {
    shards: [PaddedCounter; COUNTER_SHARDS],
}

const COUNTER_SHARDS: usize = 16;

#[derive(Debug, Default)]
#[repr(align(128))]
struct PaddedCounter(AtomicU64);

impl ShardedCounter {
    fn add_one(&self) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % COUNTER_SHARDS;
        }
        let shard = SHARD.with(|s| *s);
        self.shards[shard].0.fetch_add(1, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// Counts one plugin handler call for as long as it runs.
struct CallGuard(Arc<AtomicUsize>);

impl CallGuard {
    fn new(calls: &Arc<AtomicUsize>) -> Self {
        calls.fetch_add(1, Ordering::AcqRel);
        CallGuard(calls.clone())
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What every connection of a worker shares, for `router` and `settings`.
fn shared_state(generation: u64, settings: WorkerSettings, router: Router) -> Shared {
    let blocking_plugins = router.plugins.iter().filter(|p| !p.nonblocking).count();
    let share = (settings.blocking_threads / blocking_plugins.max(1)).max(1);
    let blocking = router
        .plugins
        .iter()
        .map(|p| (!p.nonblocking).then(|| Arc::new(Semaphore::new(share))))
        .collect();
    Shared {
        router,
        blocking,
        plugin_calls: Arc::new(AtomicUsize::new(0)),
        closing: AtomicBool::new(false),
        generation,
        pid: std::process::id(),
        http1: http1_builder(&settings),
        http2: http2_builder(&settings),
        slots: Arc::new(Semaphore::new(settings.http.max_connections.max(1))),
        settings,
        requests: ShardedCounter::default(),
        connections: Arc::new(Connections::default()),
    }
}

/// A worker's connection handling without listeners: each [`OneConnection::serve`] serves
/// one connection the way an accepted one is served, until it ends. For fuzzing the HTTP
/// edge. One difference: the client may half-close (shut down its writing side) and still
/// get its answers, so that an exchange ends without waiting for a timeout.
pub(crate) struct OneConnection {
    shared: Arc<Shared>,
    watch: DrainWatch,
    _drain: Drain,
}

impl OneConnection {
    pub(crate) fn new(settings: WorkerSettings, router: Router) -> Self {
        let mut shared = shared_state(1, settings, router);
        shared.http1.half_close(true);
        let (drain, watch) = Drain::new();
        Self {
            shared: Arc::new(shared),
            watch,
            _drain: drain,
        }
    }

    pub(crate) async fn serve<I: Socket>(&self, io: I) {
        let permit = self
            .shared
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        let guard = self.shared.connections.open();
        connection(io, self.shared.clone(), self.watch.clone(), guard, permit).await;
    }
}

/// Serves until SIGTERM, SIGINT or the supervisor's death, then drains and returns.
pub async fn serve(
    generation: u64,
    settings: WorkerSettings,
    listeners: Vec<NamedListener>,
    lifeline: Option<OwnedFd>,
    router: Router,
    notifier: Notifier,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let lifeline = match lifeline {
        Some(fd) => Some(tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?),
        None => None,
    };

    let shared = Arc::new(shared_state(generation, settings, router));
    let (drain, watch) = Drain::new();

    let mut accepting = tokio::task::JoinSet::new();
    let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    for NamedListener { listener, .. } in listeners {
        let (shared, watch) = (shared.clone(), watch.clone());
        match listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::TcpListener::from_std(l)?;
                accepting.spawn(accept_loop(l, shared, watch).in_current_span());
            }
            Listener::Unix(l) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::UnixListener::from_std(l)?;
                accepting.spawn(accept_loop(l, shared, watch).in_current_span());
            }
        }
    }
    notifier.send(&format!(
        "READY=1\nSTATUS=serving generation {generation} on {}",
        names.join(", ")
    ));
    tracing::info!("serving on {}", names.join(", "));
    let stats = tokio::spawn(report_stats(shared.clone(), notifier.clone()));

    let reason = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = quit.recv() => "SIGQUIT",
        _ = lifeline_closed(lifeline) => "the supervisor is gone",
    };
    tracing::info!(
        "draining ({reason}): {} connection(s) open",
        shared.connections.count()
    );
    notifier.send("STOPPING=1\nSTATUS=draining");
    shared.closing.store(true, Ordering::Relaxed);
    drain.advance(Phase::Closing);
    if reason == "SIGQUIT" {
        drain.advance(Phase::Forced);
    }
    while accepting.join_next().await.is_some() {}

    let drain_timeout = Duration::from_millis(shared.settings.drain_timeout_ms);
    let started = Instant::now();
    let forced = tokio::select! {
        _ = shared.connections.all_closed() => None,
        _ = quit.recv() => Some("SIGQUIT: force-closing".to_owned()),
        _ = tokio::time::sleep(drain_timeout) => {
            Some(format!("drain_timeout ({drain_timeout:?}) reached: closing"))
        }
    };
    if let Some(why) = forced {
        tracing::warn!("{why} {} connection(s)", shared.connections.count());
        drain.advance(Phase::Forced);
        let _ = tokio::time::timeout(FORCED_CLOSE_WAIT, shared.connections.all_closed()).await;
    }
    stats.abort();
    // Inline handlers run inside connection tasks: with every connection closed none is
    // running. Blocking ones may outlive their connection, so they are counted.
    let running = shared.plugin_calls.load(Ordering::Acquire);
    let open = shared.connections.count();
    if running == 0 && open == 0 {
        for plugin in &shared.router.plugins {
            plugin.shut_down();
        }
    } else {
        // Forced past drain_timeout with handlers still on the blocking pool: their
        // plugins' state must stay alive, so shutdown is skipped (the process exits).
        tracing::warn!(
            "{open} connection(s) and {running} blocking handler(s) still running; skipping plugin shutdown"
        );
    }
    notifier.send(&stats_of(&shared).to_line());
    tracing::info!(
        "drained in {:?} after {} request(s)",
        started.elapsed(),
        shared.requests.sum()
    );
    Ok(())
}

fn http1_builder(settings: &WorkerSettings) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Off: hyper's timer runs from the end of one request to the next head as well, so
        // idle keep-alive connections would close at header_read_timeout. `ConnClock`
        // keeps both deadlines.
        .header_read_timeout(None)
        .max_buf_size(settings.http.max_header_bytes.max(8192));
    builder
}

fn http2_builder(settings: &WorkerSettings) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.http.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

async fn lifeline_closed(lifeline: Option<tokio::net::unix::pipe::Receiver>) {
    let Some(pipe) = lifeline else {
        return std::future::pending().await;
    };
    let mut buf = [0u8; 64];
    loop {
        if pipe.readable().await.is_err() {
            return;
        }
        match pipe.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

fn stats_of(shared: &Shared) -> Stats {
    Stats {
        connections: shared.connections.count(),
        requests: shared.requests.sum(),
    }
}

async fn report_stats(shared: Arc<Shared>, notifier: Notifier) {
    let mut last = Stats::default();
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    loop {
        tick.tick().await;
        let now = stats_of(&shared);
        if now != last {
            notifier.send(&now.to_line());
            last = now;
        }
    }
}

/// A listening socket the accept loop can take connections from.
trait Accept: Send + Sync + 'static {
    type Io: Socket;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        Ok(stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

/// Accepts until the drain begins. Above `max_connections` it stops accepting, so new
/// connections wait in the shared backlog instead of being refused.
async fn accept_loop<L: Accept>(listener: L, shared: Arc<Shared>, mut watch: DrainWatch) {
    loop {
        let permit = tokio::select! {
            permit = shared.slots.clone().acquire_owned() => permit.expect("semaphore never closes"),
            _ = watch.reached(Phase::Closing) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = watch.reached(Phase::Closing) => return,
        };
        match accepted {
            Ok(io) => {
                let guard = shared.connections.open();
                tokio::spawn(connection(io, shared.clone(), watch.clone(), guard, permit));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

/// What a connection's handlers tell its task. Counters only: reading the clock on every
/// request showed up in profiles.
#[derive(Debug)]
struct ConnState {
    h2: AtomicBool,
    /// The first HTTP/1 request asked to keep the connection open.
    keep_alive: AtomicBool,
    in_flight: AtomicUsize,
    /// Requests started on this connection.
    started: AtomicU64,
    /// Bytes arrived with no request in flight and no request has started since: the
    /// head of the next request is being read. True from the accept on, so that the first
    /// request is held to `header_read_timeout` too.
    head: AtomicBool,
    /// The last write to the client could not complete (it is not reading): a response
    /// is still going out, whatever bytes have arrived meanwhile.
    write_blocked: AtomicBool,
}

impl ConnState {
    fn new() -> Self {
        Self {
            h2: AtomicBool::new(false),
            keep_alive: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            head: AtomicBool::new(true),
            write_blocked: AtomicBool::new(false),
        }
    }

    /// A request's head arrived whole.
    fn request_started(&self, parts: &http::request::Parts) {
        if self.started.fetch_add(1, Ordering::Relaxed) == 0 && keeps_alive(parts) {
            self.keep_alive.store(true, Ordering::Relaxed);
        }
        self.head.store(false, Ordering::Relaxed);
    }

    /// The connection will carry more than one response.
    fn stays_open(&self) -> bool {
        self.keep_alive.load(Ordering::Relaxed) || self.h2.load(Ordering::Relaxed)
    }

    /// A mark that changes whenever a request starts.
    fn activity(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// A request is in flight, or a response still being written.
    fn active(&self) -> bool {
        self.busy() || self.write_blocked.load(Ordering::Relaxed)
    }

    fn write_polled<T>(&self, polled: &std::task::Poll<T>) {
        let blocked = polled.is_pending();
        if self.write_blocked.load(Ordering::Relaxed) != blocked {
            self.write_blocked.store(blocked, Ordering::Relaxed);
        }
    }

    /// The connection delivered bytes: with nothing in flight, they begin a request head.
    fn bytes_arrived(&self) {
        if !self.busy() && !self.head.load(Ordering::Relaxed) {
            self.head.store(true, Ordering::Relaxed);
        }
    }

    /// An HTTP/1 request head is incomplete (HTTP/2 frames between requests are not heads).
    fn reading_head(&self) -> bool {
        self.head.load(Ordering::Relaxed) && !self.h2.load(Ordering::Relaxed)
    }
}

/// Whether an HTTP/1 request keeps its connection open: HTTP/1.1 unless it says
/// `Connection: close`, HTTP/1.0 only if it says `Connection: keep-alive`.
fn keeps_alive(parts: &http::request::Parts) -> bool {
    let says = |token: &str| {
        parts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    match parts.version {
        Version::HTTP_09 | Version::HTTP_10 => says("keep-alive"),
        _ => !says("close"),
    }
}

/// Why a connection's clock ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// No request for `keepalive_timeout`: close gracefully (HTTP/2 gets a GOAWAY).
    Idle,
    /// A request head did not arrive whole within `header_read_timeout`: drop it.
    Header,
}

/// The idle and header deadlines of one connection, kept with a coarse tick instead of a
/// timer re-armed for every request: the request path only flips atomics, and the tick
/// (half the shorter timeout) checks them. A head is cut off between one and one and a
/// half `header_read_timeout`s after its first byte; an idle connection between one and
/// one and a half `keepalive_timeout`s after its last request (at most one tick late).
#[derive(Debug, Clone, Copy)]
struct ConnClock {
    tick: Duration,
    /// Ticks in a row that must see the same unfinished head / the same idleness.
    header_ticks: u32,
    idle_ticks: u32,
}

impl ConnClock {
    /// Shortest tick, so tiny timeouts in tests do not spin.
    const MIN_TICK: Duration = Duration::from_millis(25);

    fn new(keepalive: Duration, header: Duration) -> Self {
        let tick = (keepalive.min(header) / 2).max(Self::MIN_TICK);
        let ticks = |timeout: Duration| {
            // The first tick may come just after the state began: one more makes the
            // timeout a lower bound.
            (timeout.as_nanos().div_ceil(tick.as_nanos()) as u32).saturating_add(1)
        };
        Self {
            tick,
            header_ticks: ticks(header),
            idle_ticks: ticks(keepalive),
        }
    }

    /// Resolves when the connection has been idle, or has been reading one head, too long.
    async fn expired(self, state: &ConnState) -> Expired {
        let mut interval =
            tokio::time::interval_at(tokio::time::Instant::now() + self.tick, self.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = state.activity();
        let (mut header_run, mut idle_run) = (0u32, 0u32);
        loop {
            interval.tick().await;
            let now = state.activity();
            if now != seen || state.active() {
                seen = now;
                (header_run, idle_run) = (0, 0);
            } else if state.reading_head() {
                idle_run = 0;
                header_run += 1;
                if header_run >= self.header_ticks {
                    return Expired::Header;
                }
            } else {
                header_run = 0;
                idle_run += 1;
                if idle_run >= self.idle_ticks {
                    return Expired::Idle;
                }
            }
        }
    }
}

struct InFlight<'a>(&'a ConnState);

impl<'a> InFlight<'a> {
    /// For a request whose answer is not ready when [`handle`] returns.
    fn start(state: &'a ConnState) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(state)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

async fn connection<I: Socket>(
    io: I,
    shared: Arc<Shared>,
    mut watch: DrainWatch,
    _guard: ConnectionGuard,
    _permit: OwnedSemaphorePermit,
) {
    let ctx = Arc::new(ConnCtx {
        shared: shared.clone(),
        state: ConnState::new(),
    });
    let state = &ctx.state;
    let clock = ConnClock::new(
        Duration::from_millis(shared.settings.http.keepalive_timeout_ms),
        Duration::from_millis(shared.settings.http.header_read_timeout_ms),
    );
    let grace = Duration::from_millis(shared.settings.drain_idle_grace_ms);
    let mut closing_watch = watch.clone();
    let drain_says_close = async {
        closing_watch.reached(Phase::Closing).await;
        if !state.h2.load(Ordering::Relaxed) {
            // An idle HTTP/1 connection may carry a request right now: let it be answered
            // (with `Connection: close`) before closing what is still idle.
            tokio::time::sleep(grace).await;
        }
    };
    let side = async {
        tokio::select! {
            _ = drain_says_close => None,
            expired = clock.expired(state) => Some(expired),
        }
    };
    let mut side = std::pin::pin!(side);

    let mut io = ConnIo {
        io,
        ctx: ctx.clone(),
        prefix: Bytes::new(),
        nodelay: false,
    };
    let h2 = tokio::select! {
        sniffed = io.sniff() => match sniffed {
            Ok(h2) => h2,
            Err(e) => return tracing::debug!("connection ended: {e}"),
        },
        // Closed before its first request: the drain, or no head within the timeout.
        _ = side.as_mut() => return,
    };
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| handle(req, &ctx))
    };
    let io = TokioIo::new(io);
    if h2 {
        state.h2.store(true, Ordering::Relaxed);
        let conn = shared.http2.serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), side, &mut watch).await;
    } else {
        let conn = shared.http1.serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), side, &mut watch).await;
    }
}

/// Serves `conn` until it ends, or until `side` (the drain, the connection's clock) says
/// to close it: then HTTP/2 gets a GOAWAY and its open streams finish, HTTP/1 closes once
/// the request in flight (if any) is answered; the forced phase of the drain cuts that
/// short.
async fn drive<C: Future<Output = hyper::Result<()>>>(
    conn: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    side: Pin<&mut impl Future<Output = Option<Expired>>>,
    watch: &mut DrainWatch,
) {
    let mut conn = std::pin::pin!(conn);
    match lazy_select(conn.as_mut(), side).await {
        Either::Main(result) => return log_end(result),
        Either::Side(Some(Expired::Header)) => {
            // Nothing is in flight; hyper would wait for the head to finish.
            tracing::debug!("request head not complete within header_read_timeout; closing");
            return;
        }
        Either::Side(_) => {}
    }
    graceful_shutdown(conn.as_mut());
    tokio::select! {
        result = conn.as_mut() => log_end(result),
        _ = watch.reached(Phase::Forced) => {}
    }
}

/// How an HTTP/2 connection with prior knowledge begins.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much the first read of a connection takes: a whole small request, so that hyper
/// finds it in [`ConnIo::prefix`] instead of reading again.
const FIRST_READ: usize = 2048;

/// A connection's socket. TCP sets `TCP_NODELAY`, lazily (see [`ConnIo`]); other kinds
/// have nothing to set.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn set_nodelay(&self) {}
}

impl Socket for tokio::net::TcpStream {
    fn set_nodelay(&self) {
        if let Err(e) = tokio::net::TcpStream::set_nodelay(self, true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    }
}

impl Socket for tokio::net::UnixStream {}

impl Socket for tokio::io::DuplexStream {}

/// The connection's socket as hyper sees it. Reads tell the connection's clock that a
/// request head is arriving. Writes skip the `shutdown(SHUT_WR)` hyper issues before
/// dropping a socket: closing it right after sends the same FIN (or the same RST, if the
/// peer left unread data), and connection-per-request load showed the extra syscall.
///
/// It also sets `TCP_NODELAY` before the first write of a connection that stays open
/// (HTTP/2, or an HTTP/1 request that keeps the connection alive), as nginx does: a
/// response followed by the close goes out whole anyway, and connection-per-request load
/// showed the extra syscall.
struct ConnIo<I> {
    io: I,
    ctx: Arc<ConnCtx>,
    /// Read by [`ConnIo::sniff`], not yet by hyper.
    prefix: Bytes,
    /// `TCP_NODELAY` is set.
    nodelay: bool,
}

impl<I: Socket> ConnIo<I> {
    /// Reads the connection's first bytes (as many as arrived, up to [`FIRST_READ`]) and
    /// says whether they begin HTTP/2 with prior knowledge. One read, where sniffing the
    /// 24 bytes of the preface apart from what follows took two.
    async fn sniff(&mut self) -> std::io::Result<bool> {
        use tokio::io::AsyncReadExt;
        let mut first = Vec::with_capacity(FIRST_READ);
        loop {
            if self.io.read_buf(&mut first).await? == 0 {
                break;
            }
            let n = first.len().min(H2_PREFACE.len());
            // Only a prefix of the preface so far: read on until it is whole or differs.
            if first[..n] != H2_PREFACE[..n] || n == H2_PREFACE.len() {
                break;
            }
        }
        let h2 = first.starts_with(H2_PREFACE);
        self.prefix = Bytes::from(first);
        Ok(h2)
    }

    fn before_write(&mut self) {
        if !self.nodelay && self.ctx.state.stays_open() {
            self.nodelay = true;
            self.io.set_nodelay();
        }
    }
}

impl<I: Socket> AsyncRead for ConnIo<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.ctx.state.bytes_arrived();
        }
        polled
    }
}

impl<I: Socket> AsyncWrite for ConnIo<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.before_write();
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.ctx.state.write_polled(&polled);
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.before_write();
        let polled = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.ctx.state.write_polled(&polled);
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // Flush what is buffered; the close that follows does the rest.
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
}

fn log_end(result: hyper::Result<()>) {
    if let Err(e) = result {
        tracing::debug!("connection ended: {e}");
    }
}

/// What the handlers of one connection share.
struct ConnCtx {
    shared: Arc<Shared>,
    state: ConnState,
}

/// The future hyper keeps for one request. Most requests are answered before [`handle`]
/// returns (no body to read, a non-blocking plugin or none): then it is just the response.
/// The others (a body to collect, a handler on the blocking pool) are boxed. A future
/// holding the whole request path inline was copied into hyper for every request, and
/// showed up in profiles.
enum Handled {
    Now(Option<Response<Full<Bytes>>>),
    Later(Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>),
}

impl Future for Handled {
    type Output = Result<Response<Full<Bytes>>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Handled::Now(response) => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            Handled::Later(future) => future.as_mut().poll(cx).map(Ok),
        }
    }
}

fn handle(req: Request<Incoming>, ctx: &Arc<ConnCtx>) -> Handled {
    let version = req.version();
    if version == Version::HTTP_2 {
        ctx.state.h2.store(true, Ordering::Relaxed);
    }
    let (parts, body) = req.into_parts();
    ctx.state.request_started(&parts);
    if hyper::body::Body::is_end_stream(&body) {
        let body = Bytes::new();
        let blocking = match route(&parts, &body, &ctx.shared) {
            Routed::Done(response) => {
                return Handled::Now(Some(finish(response, version, &ctx.shared)));
            }
            Routed::Blocking(call) => call,
        };
        let ctx = ctx.clone();
        return Handled::Later(Box::pin(async move {
            let _in_flight = InFlight::start(&ctx.state);
            let response = blocking.run(parts, body, &ctx.shared).await;
            finish(response, version, &ctx.shared)
        }));
    }
    let ctx = ctx.clone();
    Handled::Later(Box::pin(async move {
        let _in_flight = InFlight::start(&ctx.state);
        let shared = &ctx.shared;
        let limit = usize::try_from(shared.settings.http.max_body_bytes).unwrap_or(usize::MAX);
        let response = match Limited::new(body, limit).collect().await {
            Ok(collected) => {
                let body = collected.to_bytes();
                match route(&parts, &body, shared) {
                    Routed::Done(response) => response,
                    Routed::Blocking(call) => call.run(parts, body, shared).await,
                }
            }
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("request body exceeds {limit} bytes\n"),
            ),
            Err(e) => text(StatusCode::BAD_REQUEST, format!("bad request body: {e}\n")),
        };
        finish(response, version, shared)
    }))
}

/// Counts the answered request; during the drain, HTTP/1 responses close the connection.
fn finish(
    mut response: Response<Full<Bytes>>,
    version: Version,
    shared: &Shared,
) -> Response<Full<Bytes>> {
    shared.requests.add_one();
    if shared.closing.load(Ordering::Relaxed) && version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Where a request went.
enum Routed {
    /// Answered: the health path, a 404 or 405, or a non-blocking plugin's handler.
    Done(Response<Full<Bytes>>),
    /// A handler of a plugin that may block: it runs on the blocking pool.
    Blocking(BlockingCall),
}

struct BlockingCall {
    index: usize,
    plugin: Arc<Plugin>,
    route: u32,
    params: Vec<(String, String)>,
}

/// Answers the health path and unknown routes, and calls non-blocking handlers inline.
fn route(parts: &http::request::Parts, body: &Bytes, shared: &Shared) -> Routed {
    let path = parts.uri.path();
    if path == shared.settings.http.health_path {
        return Routed::Done(health(&parts.method, shared));
    }
    match shared.router.lookup(parts.method.as_str(), path) {
        Lookup::NotFound => Routed::Done(text(StatusCode::NOT_FOUND, "not found\n".into())),
        Lookup::MethodNotAllowed(allow) => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
            if let Ok(v) = HeaderValue::from_str(&allow) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            Routed::Done(r)
        }
        Lookup::Found {
            index,
            plugin,
            route,
            params,
        } => {
            if shared.blocking[index].is_some() {
                return Routed::Blocking(BlockingCall {
                    index,
                    plugin: plugin.clone(),
                    route,
                    params,
                });
            }
            let _counted = CallGuard::new(&shared.plugin_calls);
            let answer = plugin.call(&call_of(
                route,
                parts,
                &params,
                body,
                shared.generation,
                shared.pid,
            ));
            Routed::Done(respond(answer, plugin, parts))
        }
    }
}

impl BlockingCall {
    /// Calls the handler on the blocking pool, within its plugin's share of it.
    async fn run(
        self,
        parts: http::request::Parts,
        body: Bytes,
        shared: &Shared,
    ) -> Response<Full<Bytes>> {
        let BlockingCall {
            index,
            plugin,
            route,
            params,
        } = self;
        let share = shared.blocking[index]
            .as_ref()
            .expect("routed to the blocking pool");
        let _permit = share.acquire().await.expect("semaphore never closes");
        // Counted until the handler returns, even if this request's task is dropped
        // meanwhile (a forced close): the blocking thread keeps running.
        let counted = CallGuard::new(&shared.plugin_calls);
        let (generation, worker_pid) = (shared.generation, shared.pid);
        let handler = plugin.clone();
        let request = parts.clone();
        let answer = tokio::task::spawn_blocking(move || {
            let answer = handler.call(&call_of(
                route, &request, &params, &body, generation, worker_pid,
            ));
            drop(counted);
            answer
        })
        .await
        .unwrap_or_else(|e| Answer::Failed(format!("handler thread failed: {e}")));
        respond(answer, &plugin, &parts)
    }
}

/// The response for what a plugin answered; a failure is logged and becomes a 500.
fn respond(answer: Answer, plugin: &Plugin, parts: &http::request::Parts) -> Response<Full<Bytes>> {
    match answer {
        Answer::Response {
            status,
            headers,
            body,
        } => {
            let mut r = Response::new(Full::new(Bytes::from(body)));
            *r.status_mut() = status;
            *r.headers_mut() = headers;
            r
        }
        Answer::Failed(message) => {
            tracing::error!(
                "plugin {} ({}) failed on {} {}: {message}",
                plugin.name,
                plugin.spec.file,
                parts.method,
                parts.uri.path()
            );
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal server error\n".into(),
            )
        }
    }
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

fn health(method: &Method, shared: &Shared) -> Response<Full<Bytes>> {
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
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn one_connection() -> OneConnection {
        let settings = WorkerSettings::default();
        let router = Router::build(Vec::new(), &settings.http.health_path).expect("router");
        OneConnection::new(settings, router)
    }

    /// Sends `pieces` with pauses between them (so each is a read of its own), then
    /// returns the first bytes the server answers.
    async fn answer_to(pieces: &[&[u8]]) -> Vec<u8> {
        let server = one_connection();
        let (mut client, io) = tokio::io::duplex(64 * 1024);
        let talk = async {
            for piece in pieces {
                client.write_all(piece).await.unwrap();
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            let mut first = vec![0; 64];
            let n = client.read(&mut first).await.unwrap();
            first.truncate(n);
            first
        };
        tokio::select! {
            first = talk => first,
            () = server.serve(io) => panic!("the connection ended before it answered"),
        }
    }

    #[tokio::test]
    async fn an_http2_preface_split_across_reads_is_still_http2() {
        let preface = H2_PREFACE;
        // An empty SETTINGS frame: length 0, type 4, no flags, stream 0.
        let settings = [0u8, 0, 0, 4, 0, 0, 0, 0, 0];
        let first = answer_to(&[&preface[..5], &preface[5..16], &preface[16..], &settings]).await;
        // The server's first frame is its SETTINGS (type 4), not an HTTP/1 error.
        assert!(first.len() >= 9, "{first:?}");
        assert_eq!(first[3], 4, "not an HTTP/2 SETTINGS frame: {first:?}");
    }

    #[tokio::test]
    async fn a_request_that_starts_like_the_preface_is_http1() {
        let first = answer_to(&[b"P", b"UT /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"]).await;
        let text = String::from_utf8_lossy(&first);
        assert!(text.starts_with("HTTP/1.1 404"), "{text:?}");
    }

    #[test]
    fn keep_alive_follows_the_version_and_the_connection_header() {
        let parts = |version, connection: Option<&str>| {
            let mut b = Request::get("/").version(version);
            if let Some(c) = connection {
                b = b.header(header::CONNECTION, c);
            }
            b.body(()).unwrap().into_parts().0
        };
        assert!(keeps_alive(&parts(Version::HTTP_11, None)));
        assert!(!keeps_alive(&parts(Version::HTTP_11, Some("close"))));
        assert!(!keeps_alive(&parts(
            Version::HTTP_11,
            Some("Upgrade, Close")
        )));
        assert!(!keeps_alive(&parts(Version::HTTP_10, None)));
        assert!(keeps_alive(&parts(Version::HTTP_10, Some("Keep-Alive"))));
    }
}
