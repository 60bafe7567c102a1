//! One connection, from the accept to the close: which HTTP it speaks (HTTP/2 with prior
//! knowledge is recognised in the first read), its header and idle deadlines, and the
//! socket as hyper sees it. It never answers a request ([`crate::handle`] does) and never
//! decides when the worker drains: it closes its connection when the drain or its own
//! clock says so. An idle keep-alive connection is not closed the moment a drain begins
//! (a client may be sending on it right then): it gets `drain_idle_grace` to send one
//! more request, answered with `Connection: close`.
//!
//! A connection that ends while its client may still be sending (an error answer to a
//! head, a body left unread) is closed the way nginx's `lingering_close` does it: shut
//! down writing, read and discard for a short bounded time, then close, so that the close
//! does not send a reset that could destroy the answer before the client reads it.

use crate::conn_state::{ConnCtx, ConnState};
use crate::drain::{ConnectionGuard, Drain, DrainWatch, Phase};
use crate::h2_idle::{H2Idle, Rest};
use crate::handle::handle;
use crate::idle::{IdleSocket, Waiting};
use crate::lazy_select::{Either, lazy_select};
use crate::metrics::Global;
use crate::router::Router;
use crate::shared::Shared;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::OwnedSemaphorePermit;

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

    /// Resolves when the connection has been idle, or has been reading one head, too long
    /// (`Some`), or when the drain says to close it (`None`): an HTTP/2 connection at once
    /// (it gets a GOAWAY), an HTTP/1 one after `grace`, since an idle HTTP/1 connection
    /// may carry a request right now: it is answered (with `Connection: close`) before
    /// what is still idle is closed. One timer serves both, so that the connection's task
    /// stays small.
    async fn closes(
        self,
        state: &ConnState,
        drain: &mut DrainWatch,
        grace: Duration,
    ) -> Option<Expired> {
        use tokio::time::Instant;
        let mut interval = tokio::time::interval_at(Instant::now() + self.tick, self.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = state.activity();
        let (mut header_run, mut idle_run) = (0u32, 0u32);
        // When the drain's grace ends.
        let mut closing: Option<Instant> = None;
        loop {
            tokio::select! {
                () = drain.reached(Phase::Closing), if closing.is_none() => {
                    if state.h2() {
                        return None;
                    }
                    let at = Instant::now() + grace;
                    closing = Some(at);
                    interval.reset_at(at.min(Instant::now() + self.tick));
                    continue;
                }
                _ = interval.tick() => {}
            }
            if let Some(at) = closing {
                let now = Instant::now();
                if now >= at {
                    return None;
                }
                interval.reset_at(at.min(now + self.tick));
            }
            let now = state.activity();
            if now != seen || state.active() {
                seen = now;
                (header_run, idle_run) = (0, 0);
            } else if state.reading_head() {
                idle_run = 0;
                header_run += 1;
                if header_run >= self.header_ticks {
                    return Some(Expired::Header);
                }
            } else {
                header_run = 0;
                idle_run += 1;
                if idle_run >= self.idle_ticks {
                    return Some(Expired::Idle);
                }
                if idle_run == 1 {
                    // Idle for a tick: out of hyper (or h2) it goes. The task is woken for
                    // it (this future's waker wakes the task, which then polls hyper's
                    // side).
                    state.park_due();
                    std::future::poll_fn(|cx| {
                        cx.waker().wake_by_ref();
                        std::task::Poll::Ready(())
                    })
                    .await;
                }
            }
        }
    }
}

/// Serves an accepted connection until it ends. Built here, not in the task: what the
/// task keeps for the connection's whole life is only what [`serve`] holds.
pub(crate) fn connection<I: Socket>(
    io: I,
    peer: Option<std::net::SocketAddr>,
    shared: Arc<Shared>,
    watch: DrainWatch,
    guard: ConnectionGuard,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let ctx = Arc::new(ConnCtx {
        shared,
        peer,
        state: ConnState::new(),
        drain: watch.clone(),
        _slot: permit,
    });
    let io = ConnIo::new(io, ctx.clone(), false);
    serve(io, ctx, watch, guard, false)
}

/// Runs the worker's idle set ([`crate::idle`]) until the drain is over: what waits
/// there is resumed into [`serve`].
pub(crate) async fn watch_idle(shared: Arc<Shared>, watch: DrainWatch) {
    let keepalive = Duration::from_millis(shared.settings.http.keepalive_timeout_ms);
    // A quiet WebSocket waits there until its ping is due.
    let ping = crate::websocket::ping_interval(&shared);
    let grace = Duration::from_millis(shared.settings.drain_idle_grace_ms);
    let sweep = crate::idle::sweep_every(keepalive.min(ping));
    shared.idle.watch(sweep, grace, watch).await;
}

/// Serves a connection again that waited idle in the worker's idle set
/// ([`crate::idle`]): its client sent something (or closed). An HTTP/2 connection goes
/// back to a new h2 connection ([`crate::h2_idle`]).
fn resume<I: Socket>(socket: IdleSocket, mut detached: Detached, guard: ConnectionGuard) {
    if let Some(h2) = &mut detached.h2 {
        // Brought back by the drain or its deadline, not by its client: closed.
        let ctx = &detached.ctx;
        let over = ctx.shared.closing_at.get().is_some()
            || h2.idle_left(ctx.state.activity(), keepalive(ctx)).is_zero();
        if over && !socket.has_unread() {
            return goodbye::<I>(socket, h2.last_stream(), guard);
        }
    }
    match detached.attach::<I>(socket) {
        Ok(io) => {
            let ctx = io.ctx.clone();
            let watch = ctx.drain.clone();
            tokio::spawn(serve(io, ctx, watch, guard, true));
        }
        Err(e) => tracing::debug!("connection ended: {e}"),
    }
}

/// Serves a connection: its first bytes say which HTTP it speaks.
///
/// HTTP/1: when the connection is idle after its first request, and later once its clock
/// found it idle for a tick ([`ConnState::idle_in_hyper`]), it is taken out of hyper.
/// Hyper's connection ends without closing the socket (asked to while idle, it
/// gives the socket back with whatever it had read and not parsed), and the connection
/// waits for its next bytes holding no buffer at all; a new hyper connection then serves
/// them. Hyper keeps a read buffer of 8 KiB and a write buffer of 8 KiB for as long as its
/// connection lives, which made most of an idle keep-alive connection's memory. An idle
/// connection outside hyper obeys the same rules as one inside: its clock closes it after
/// `keepalive_timeout`; the drain gives it `drain_idle_grace` to send one more request
/// (answered with `Connection: close`) and then closes it with a FIN.
///
/// Out of hyper, a TCP or Unix connection waits in the worker's idle set ([`crate::idle`])
/// and this task ends; the set starts another (`resumed`) when the client sends. Other
/// kinds (TLS, whose state lives above the socket) wait in this task.
///
/// HTTP/2 over TCP or a Unix socket leaves h2 the same way, at the same moments, once its
/// frames show it at rest ([`crate::h2_idle`], [`ConnIo::try_hand_off`]): h2 cannot give
/// its connection back, so it is dropped, and the next request is served by a new h2
/// connection that first reads a replay of the client's preface and settings.
///
/// This future is the connection's task: everything of hyper's is boxed, and `io` is the
/// one place the socket lives (hyper's connection takes it and gives it back into the
/// same slot).
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn keeps its arguments twice in the task"
)]
fn serve<I: Socket>(
    mut io: ConnIo<I>,
    ctx: Arc<ConnCtx>,
    mut watch: DrainWatch,
    guard: ConnectionGuard,
    resumed: bool,
) -> impl Future<Output = ()> + Send + 'static {
    // An async block, not an async fn: a function's arguments would be kept twice.
    async move {
        let settings = &ctx.shared.settings;
        let clock = ConnClock::new(
            Duration::from_millis(settings.http.keepalive_timeout_ms),
            Duration::from_millis(settings.http.header_read_timeout_ms),
        );
        let grace = Duration::from_millis(settings.drain_idle_grace_ms);
        let mut closing_watch = watch.clone();
        let side = clock.closes(&ctx.state, &mut closing_watch, grace);
        let mut side = std::pin::pin!(side);

        // Biased: when the first bytes and the drain's deadline are both there (a worker kept
        // off the CPU past `drain_idle_grace`), the request that arrived is served.
        let h2 = if resumed {
            io.h2.is_some()
        } else {
            io.io.negotiated_h2()
                || tokio::select! {
                    biased;
                    sniffed = io.sniff() => match sniffed {
                        Ok(h2) => h2,
                        Err(e) => return tracing::debug!("connection ended: {e}"),
                    },
                    // Closed before its first request: the drain, or no head within the timeout.
                    _ = side.as_mut() => return,
                }
        };
        if h2 {
            ctx.state.set_h2();
            if !resumed && io.can_idle() {
                io.begin_h2();
            }
            let service = {
                let ctx = ctx.clone();
                service_fn(move |req| handle(req, &ctx))
            };
            let slot = io.h2.as_ref().map(|h2| h2.slot.clone());
            let builder = match slot {
                Some(_) => &ctx.shared.http2_idle,
                None => &ctx.shared.http2,
            };
            let conn = Box::pin(builder.serve_connection(TokioIo::new(io), service));
            let shutdown =
                |c: Pin<&mut _>| hyper::server::conn::http2::Connection::graceful_shutdown(c);
            let driven = drive_h2(
                conn,
                shutdown,
                side,
                &mut watch,
                &ctx.state,
                slot.as_deref(),
                grace,
            );
            let Some((socket, mut detached)) = driven.await else {
                return;
            };
            ctx.shared.parked.fetch_add(1, Ordering::Relaxed);
            #[cfg(test)]
            tests::PARKS.with(|p| p.set(p.get() + 1));
            let h2 = detached
                .h2
                .as_mut()
                .expect("a handed-off connection is HTTP/2");
            let last_stream = h2.last_stream();
            // What is left of keepalive_timeout since its last request (none left: closed
            // now, with a GOAWAY).
            let idle_for = h2.idle_left(ctx.state.activity(), keepalive(&ctx));
            if idle_for.is_zero() {
                return goodbye::<I>(socket, last_stream, guard);
            }
            ctx.shared.idle.park(
                socket,
                idle_for,
                Waiting::Http2,
                Box::new(move |socket| resume::<I>(socket, detached, guard)),
            );
            return;
        }
        loop {
            let service = {
                let ctx = ctx.clone();
                service_fn(move |req| handle(req, &ctx))
            };
            // With upgrades: a WebSocket route takes the connection over after its 101.
            let mut conn = Box::new(
                ctx.shared
                    .http1
                    .serve_connection(TokioIo::new(io), service)
                    .with_upgrades(),
            );
            let serving = UntilIdle {
                conn: &mut *conn,
                state: &ctx.state,
                entered: ctx.state.activity(),
                parking: false,
            };
            match lazy_select(serving, side.as_mut()).await {
                Either::Main(Ok(())) => {}
                Either::Main(result) => return log_end(result),
                Either::Side(Some(Expired::Header)) => {
                    // Nothing is in flight; hyper would wait for the head to finish.
                    tracing::debug!(
                        "request head not complete within header_read_timeout; closing"
                    );
                    return;
                }
                Either::Side(_) => {
                    Pin::new(&mut *conn).graceful_shutdown();
                    let forced = Box::pin(watch.reached(Phase::Forced));
                    if let Either::Main(result) = lazy_select(&mut *conn, forced).await {
                        log_end(result);
                    }
                    return;
                }
            }
            // Hyper's connection ended: upgraded (the WebSocket task has the socket), closed,
            // or given back idle. (Its box is freed here, not kept while the connection idles.)
            let pipelined = {
                let Some(parts) = { *conn }.into_parts() else {
                    return;
                };
                io = parts.io.into_inner();
                ctx.state.clear_park();
                if !std::mem::take(&mut io.parked) {
                    return;
                }
                ctx.shared.parked.fetch_add(1, Ordering::Relaxed);
                #[cfg(test)]
                tests::PARKS.with(|p| p.set(p.get() + 1));
                // The beginning of a pipelined request: served at once.
                io.prefix = parts.read_buf.to_vec();
                !io.prefix.is_empty()
            };
            if pipelined {
                ctx.state.head_began();
                continue;
            }
            if io.can_detach() && ctx.shared.idle.open() {
                // All of keepalive_timeout from now: how long it idled before is known
                // only to a tick (it may be nothing), and closing before the timeout
                // would surprise a client (or a load balancer) that counts on it.
                let idle_for = Duration::from_millis(settings.http.keepalive_timeout_ms);
                match io.detach() {
                    Ok((socket, detached)) => {
                        ctx.shared.idle.park(
                            socket,
                            idle_for,
                            Waiting::Request,
                            Box::new(move |socket| resume::<I>(socket, detached, guard)),
                        );
                    }
                    Err(e) => tracing::debug!("connection ended: {e}"),
                }
                return;
            }
            // Idle outside hyper until the client sends (or closes). Biased like the first
            // read: a request that arrived is served even if the drain's grace is over.
            tokio::select! {
                biased;
                ready = io.idle_read() => {
                    if let Err(e) = ready {
                        return tracing::debug!("connection ended: {e}");
                    }
                }
                // The drain's grace or keepalive_timeout is over: closed (nothing is unread,
                // so the close is a FIN).
                _ = side.as_mut() => return,
            }
        }
    }
}

/// Polls an HTTP/1 connection in hyper until it ends; once it is idle between requests
/// ([`ConnState::idle_in_hyper`]), asks hyper to end it (`graceful_shutdown`, which
/// closes an idle hyper connection at once) and [`ConnIo`] to keep the socket open
/// ([`ConnState::request_park`]). Should hyper not have been idle after all (a request
/// under way), the request is answered with `Connection: close` and the connection closes
/// as it would have at a drain: [`ConnIo::poll_shutdown`] parks a connection only when no
/// request started since the park was asked for.
struct UntilIdle<'a, C> {
    conn: &'a mut C,
    state: &'a ConnState,
    /// [`ConnState::activity`] when hyper took the connection.
    entered: u64,
    parking: bool,
}

impl<I, S, B> Future for UntilIdle<'_, hyper::server::conn::http1::UpgradeableConnection<I, S>>
where
    hyper::server::conn::http1::UpgradeableConnection<I, S>:
        Future<Output = hyper::Result<()>> + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Output = hyper::Result<()>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.get_mut();
        // With thousands of connections, what hyper keeps for this one (its connection,
        // with the socket in it), its state, and where its next request is read into and
        // its answer's head written from are out of the CPU's caches by its next request,
        // and the code reads them one line after another. Asked for at once here, they
        // cost 0.9 µs less CPU per request at 10,000 connections, of about 11.8
        // (docs/BENCHMARKS.md, "Cache misses at 10,000 connections").
        baton_sys::cache::prefetch(&*this.conn);
        baton_sys::cache::prefetch(this.state);
        let (read, write) = this.state.buffers();
        baton_sys::cache::prefetch_at(read, 128);
        baton_sys::cache::prefetch_at(write, 192);
        loop {
            if let std::task::Poll::Ready(result) = Pin::new(&mut *this.conn).poll(cx) {
                return std::task::Poll::Ready(result);
            }
            if this.parking || !this.state.idle_in_hyper(this.entered) {
                return std::task::Poll::Pending;
            }
            this.parking = true;
            this.state.request_park();
            Pin::new(&mut *this.conn).graceful_shutdown();
        }
    }
}

/// Serves an HTTP/2 connection until it ends, or until `side` (the drain, the
/// connection's clock) says to close it: then it gets a GOAWAY and its open streams
/// finish; the forced phase of the drain cuts that short. A connection that can wait idle
/// (`slot`) may leave h2 meanwhile ([`ConnIo::try_hand_off`]): then h2's connection is
/// dropped here and its socket returned, to wait in the idle set.
async fn drive_h2<C: Future<Output = hyper::Result<()>>>(
    mut conn: Pin<Box<C>>,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    side: Pin<&mut impl Future<Output = Option<Expired>>>,
    watch: &mut DrainWatch,
    state: &ConnState,
    slot: Option<&Mutex<Option<HandOff>>>,
    grace: Duration,
) -> Option<HandOff> {
    let serving = H2Serving {
        conn: conn.as_mut(),
        slot,
    };
    // On return h2's connection is dropped, and its socket with it: a connection handed
    // off goes on with the idle set's copy.
    match lazy_select(serving, side).await {
        Either::Main(end) => return end.handed_off(),
        Either::Side(Some(Expired::Header)) => {
            // Nothing is in flight; hyper would wait for the head to finish.
            tracing::debug!("request head not complete within header_read_timeout; closing");
            return None;
        }
        Either::Side(Some(Expired::Idle)) => {}
        Either::Side(None) => {
            // The drain: the connection leaves h2 as soon as it is at rest (now, if it is),
            // served meanwhile, and the idle set gives it back to be closed with one GOAWAY
            // that names its last stream. h2's own graceful shutdown sends a GOAWAY while
            // answers may still be on their way, then a PING to time a second GOAWAY; and
            // Python's h2 (under httpx) takes any frame but a GOAWAY after a GOAWAY for an
            // error. A connection never at rest within `drain_idle_grace` (streams always
            // open) gets h2's graceful shutdown after it.
            if slot.is_some() {
                let serving = H2Serving {
                    conn: conn.as_mut(),
                    slot,
                };
                let waited = Box::pin(tokio::time::sleep(grace));
                if let Either::Main(end) = lazy_select(serving, waited).await {
                    return end.handed_off();
                }
            }
        }
    }
    // The GOAWAY may wait in h2's buffer: the connection must not leave h2 now.
    state.h2_closes();
    graceful_shutdown(conn.as_mut());
    // Boxed: this rare wait would otherwise take room in every connection's task.
    let forced = Box::pin(watch.reached(Phase::Forced));
    if let Either::Main(result) = lazy_select(conn.as_mut(), forced).await {
        log_end(result);
    }
    None
}

/// How an HTTP/2 connection left [`drive_h2`]'s main future.
enum H2End {
    Ended(hyper::Result<()>),
    Parked(HandOff),
}

impl H2End {
    /// The socket handed off, if it was; an end is logged.
    fn handed_off(self) -> Option<HandOff> {
        match self {
            H2End::Parked(handoff) => Some(handoff),
            H2End::Ended(result) => {
                log_end(result);
                None
            }
        }
    }
}

/// h2's connection, watched for its socket being handed off ([`ConnIo::try_hand_off`]).
struct H2Serving<'a, C> {
    conn: Pin<&'a mut C>,
    slot: Option<&'a Mutex<Option<HandOff>>>,
}

impl<C: Future<Output = hyper::Result<()>>> Future for H2Serving<'_, C> {
    type Output = H2End;

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let polled = self.conn.as_mut().poll(cx);
        if let Some(slot) = self.slot
            && let Some(handoff) = slot.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            return std::task::Poll::Ready(H2End::Parked(handoff));
        }
        polled.map(H2End::Ended)
    }
}

/// How an HTTP/2 connection with prior knowledge begins.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How much the first read of a connection takes: a whole small request, so that hyper
/// finds it in [`ConnIo::prefix`] instead of reading again.
const FIRST_READ: usize = 2048;

/// A lingering close reads and discards what the client still sends for at most this
/// long, and at most [`LINGER_BYTES`], before closing.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 1 << 20;

/// A connection's socket. TCP sets `TCP_NODELAY`, lazily (see [`ConnIo`]); other kinds
/// have nothing to set.
pub(crate) trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn set_nodelay(&self) {}

    /// The connection negotiated HTTP/2 already (TLS ALPN `h2`): no need to sniff.
    fn negotiated_h2(&self) -> bool {
        false
    }

    /// Closing must be announced in the stream itself (TLS `close_notify`): hyper's
    /// shutdown is always passed on.
    fn close_notify(&self) -> bool {
        false
    }

    /// Resolves once there is something to read (bytes, the end, an error), leaving it in
    /// the kernel; `None`: this kind cannot wait so (see [`ConnIo::idle_read`]).
    fn poll_readable(
        &self,
        _: &mut std::task::Context<'_>,
    ) -> Option<std::task::Poll<std::io::Result<()>>> {
        None
    }

    /// An idle connection of this kind can wait in the worker's idle set: its socket is
    /// all there is to keep.
    fn can_idle(&self) -> bool {
        false
    }

    /// The socket out of tokio, for the idle set (only if [`Socket::can_idle`]).
    fn into_idle(self) -> std::io::Result<IdleSocket>
    where
        Self: Sized,
    {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// The socket back from the idle set, registered with tokio again.
    fn from_idle(_: IdleSocket) -> std::io::Result<Self>
    where
        Self: Sized,
    {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// A second descriptor of the socket, for the idle set (only if [`Socket::can_idle`]):
    /// for a connection whose socket h2 owns ([`ConnIo::try_hand_off`]).
    fn try_clone_idle(&self) -> std::io::Result<IdleSocket> {
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// The idle-set methods of a socket kind that waits there as `IdleSocket::$kind`: TCP and
/// Unix sockets make the same calls on two types.
macro_rules! idle_socket {
    ($kind:ident) => {
        fn poll_readable(
            &self,
            cx: &mut std::task::Context<'_>,
        ) -> Option<std::task::Poll<std::io::Result<()>>> {
            Some(self.poll_read_ready(cx))
        }

        fn can_idle(&self) -> bool {
            true
        }

        fn into_idle(self) -> std::io::Result<IdleSocket> {
            self.into_std().map(IdleSocket::$kind)
        }

        fn from_idle(socket: IdleSocket) -> std::io::Result<Self> {
            match socket {
                IdleSocket::$kind(s) => Self::from_std(s),
                _ => Err(std::io::ErrorKind::InvalidInput.into()),
            }
        }

        fn try_clone_idle(&self) -> std::io::Result<IdleSocket> {
            use std::os::fd::AsFd;
            let fd = self.as_fd().try_clone_to_owned()?;
            Ok(IdleSocket::$kind(fd.into()))
        }
    };
}

impl Socket for tokio::net::TcpStream {
    fn set_nodelay(&self) {
        if let Err(e) = tokio::net::TcpStream::set_nodelay(self, true) {
            tracing::debug!("TCP_NODELAY: {e}");
        }
    }

    idle_socket!(Tcp);
}

impl Socket for tokio::net::UnixStream {
    idle_socket!(Unix);
}

impl Socket for tokio::io::DuplexStream {}

/// The connection's socket as hyper sees it. Reads tell the connection's clock that a
/// request head is arriving. The `shutdown(SHUT_WR)` hyper issues before dropping a
/// socket is skipped when nothing more can come from the client: closing it right after
/// sends the same FIN, and connection-per-request load showed the extra syscall. When
/// the client may still be sending ([`ConnState::input_pending`]), closing with unread
/// data would send a reset instead, which can destroy the answer before the client reads
/// it: then the shutdown is a lingering close ([`Linger`]).
///
/// It also sets `TCP_NODELAY` before the first write of a connection that stays open
/// (HTTP/2, or an HTTP/1 request that keeps the connection alive), as nginx does: the
/// kernel sends a response followed by the close whole anyway, so those connections are
/// spared the `setsockopt`.
pub(crate) struct ConnIo<I> {
    io: I,
    ctx: Arc<ConnCtx>,
    /// Read by [`ConnIo::sniff`], not yet by hyper (freed once it has all of it).
    prefix: Vec<u8>,
    /// `TCP_NODELAY` is set.
    nodelay: bool,
    /// Writing is shut down and what the client still sends is being discarded.
    linger: Option<Linger>,
    /// Hyper ended the connection while idle, on request ([`UntilIdle`]): the socket
    /// stays open and the connection waits for its next request outside hyper.
    parked: bool,
    /// HTTP/2 on a socket that can wait idle: its frames followed ([`crate::h2_idle`]).
    h2: Option<Box<H2Conn>>,
    /// The socket went to the idle set while h2 had it ([`ConnIo::try_hand_off`]): h2
    /// reads nothing more, and what it still writes is not sent.
    handed_off: bool,
}

/// An HTTP/2 connection's part of [`ConnIo`] when its socket can wait idle.
struct H2Conn {
    idle: Box<H2Idle>,
    /// The beginning of a frame header that the last read cut off: given to h2 with what
    /// follows it (see [`H2Idle::inbound`]).
    held: Vec<u8>,
    /// Bytes for the client that h2 counts as written, not yet sent: only while the first
    /// frames of a resumed connection are adjusted ([`H2Idle::filter_out`]).
    staging: Vec<u8>,
    /// The first read after the replayed preface finds nothing, so that h2 sends its
    /// first WINDOW_UPDATE before it reads what the client sent meanwhile.
    yield_once: bool,
    /// Where [`ConnIo::try_hand_off`] leaves the socket for [`drive_h2`].
    slot: Arc<Mutex<Option<HandOff>>>,
}

/// A socket handed off by h2 to wait idle, and what its connection keeps meanwhile.
type HandOff = (IdleSocket, Detached);

impl H2Conn {
    fn new(idle: Box<H2Idle>, resumed: bool) -> Box<Self> {
        Box::new(Self {
            idle,
            held: Vec::new(),
            staging: Vec::new(),
            yield_once: resumed,
            slot: Arc::new(Mutex::new(None)),
        })
    }
}

/// A lingering close under way: its deadline and how much more it reads.
struct Linger {
    deadline: Pin<Box<tokio::time::Sleep>>,
    left: usize,
}

impl Linger {
    fn new() -> Self {
        Self {
            deadline: Box::pin(tokio::time::sleep(LINGER_TIME)),
            left: LINGER_BYTES,
        }
    }

    /// Reads and discards until the client closes (or fails), the deadline passes or
    /// [`LINGER_BYTES`] were read.
    fn poll_discard<I: AsyncRead + Unpin>(
        &mut self,
        io: &mut I,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let mut scratch = [0u8; 4096];
        loop {
            if self.deadline.as_mut().poll(cx).is_ready() {
                return std::task::Poll::Ready(());
            }
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut *io).poll_read(cx, &mut buf) {
                std::task::Poll::Pending => return std::task::Poll::Pending,
                std::task::Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    self.left = self.left.saturating_sub(buf.filled().len());
                    if self.left == 0 {
                        return std::task::Poll::Ready(());
                    }
                }
                // The client closed, or the connection failed: nothing left to protect.
                std::task::Poll::Ready(_) => return std::task::Poll::Ready(()),
            }
        }
    }
}

impl<I: Socket> ConnIo<I> {
    fn new(io: I, ctx: Arc<ConnCtx>, nodelay: bool) -> Self {
        ConnIo {
            io,
            ctx,
            prefix: Vec::new(),
            nodelay,
            linger: None,
            parked: false,
            h2: None,
            handed_off: false,
        }
    }

    /// An HTTP/2 connection begins on a socket that can wait idle: its frames are followed
    /// from here, beginning with those already read.
    fn begin_h2(&mut self) {
        let mut idle = Box::new(H2Idle::new());
        let keep = idle.inbound(&mut self.prefix);
        let mut h2 = H2Conn::new(idle, false);
        // A header cut off at the end of the first read passes with what follows it.
        h2.held = self.prefix.split_off(self.prefix.len() - keep);
        self.h2 = Some(h2);
    }

    /// Gives the socket to the idle set if the HTTP/2 connection is at rest: nothing left
    /// to read or write, in h2 or here ([`H2Idle::rest`]), the last read found nothing,
    /// and either it is the first time or the connection's clock found it idle for a tick
    /// ([`ConnState::quiet`]). The socket is copied (h2 owns this one, and closes it when
    /// its connection is dropped) and left with the connection's state in the slot that
    /// [`drive_h2`] watches.
    fn try_hand_off(&mut self) -> bool {
        let Some(h2) = self.h2.as_deref() else {
            return false;
        };
        let state = &self.ctx.state;
        let settled = self.prefix.is_empty()
            && h2.held.is_empty()
            && h2.staging.is_empty()
            && state.read_blocked()
            && !state.write_blocked()
            && !state.busy()
            && !state.h2_closing();
        let due = settled && may_go(&h2.idle, state, &self.ctx.shared);
        if !due || !self.ctx.shared.idle.open() {
            return false;
        }
        let socket = match self.io.try_clone_idle() {
            Ok(socket) => socket,
            Err(e) => {
                tracing::debug!("HTTP/2 connection stays in h2: {e}");
                return false;
            }
        };
        // A read that found nothing may only mean that tokio has not heard of what came
        // yet (a socket just registered again, after the idle set): what is there is read.
        if socket.has_unread() {
            return false;
        }
        let h2 = self.h2.take().expect("checked above");
        let H2Conn { mut idle, slot, .. } = *h2;
        idle.park();
        let detached = Detached {
            ctx: self.ctx.clone(),
            nodelay: self.nodelay,
            h2: Some(idle),
        };
        *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some((socket, detached));
        self.handed_off = true;
        true
    }

    /// h2's read of an HTTP/2 connection that can wait idle: the bytes are followed (and a
    /// frame on a stream closed before the last park is made one h2 ignores, which needs its
    /// header whole in one piece); at rest, the socket is handed off instead.
    fn poll_read_h2(
        &mut self,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        use std::task::Poll;
        loop {
            if !self.prefix.is_empty() {
                return self.read_prefix(buf);
            }
            let h2 = self.h2.as_deref_mut().expect("an HTTP/2 connection");
            if std::mem::take(&mut h2.yield_once) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if self.try_hand_off() {
                return Poll::Pending;
            }
            let h2 = self.h2.as_deref_mut().expect("not handed off");
            if !h2.held.is_empty() {
                // A header cut off last time: read into a buffer of this side's, so that it
                // passes whole, and give h2 what is whole from [`ConnIo::prefix`].
                let mut scratch = [0u8; 2048];
                let mut read = tokio::io::ReadBuf::new(&mut scratch);
                let polled = Pin::new(&mut self.io).poll_read(cx, &mut read);
                self.ctx.state.read_polled(polled.is_pending());
                std::task::ready!(polled)?;
                let mut piece = std::mem::take(&mut h2.held);
                if !read.filled().is_empty() {
                    arrived(&self.ctx, read.filled().len());
                    piece.extend_from_slice(read.filled());
                    let keep = h2.idle.inbound(&mut piece);
                    h2.held = piece.split_off(piece.len() - keep);
                }
                // At the end of the stream h2 gets the cut header as it is, then the end.
                self.prefix = piece;
                continue;
            }
            let before = buf.filled().len();
            let polled = Pin::new(&mut self.io).poll_read(cx, buf);
            self.ctx.state.read_polled(polled.is_pending());
            if polled.is_pending() {
                // Everything h2 read is used (it reads only for more): the moment to go.
                self.try_hand_off();
                return Poll::Pending;
            }
            let n = buf.filled().len() - before;
            if n == 0 {
                return polled;
            }
            arrived(&self.ctx, n);
            let piece = &mut buf.filled_mut()[before..];
            let keep = h2.idle.inbound(piece);
            if keep > 0 {
                h2.held = piece[n - keep..].to_vec();
                buf.set_filled(before + n - keep);
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// Gives h2 what [`ConnIo::prefix`] holds.
    fn read_prefix(
        &mut self,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.drain(..n);
        if self.prefix.is_empty() {
            self.prefix = Vec::new();
        }
        self.ctx.state.read_polled(false);
        std::task::Poll::Ready(Ok(()))
    }

    /// h2's write while a resumed connection's first frames are adjusted (or what was
    /// adjusted still waits): all of `bufs` is taken, through [`H2Idle::filter_out`],
    /// once what waited before is sent.
    fn poll_write_staged(
        &mut self,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_send_staged(cx))?;
        let h2 = self.h2.as_deref_mut().expect("an HTTP/2 connection");
        let mut taken = 0;
        for buf in bufs {
            h2.idle.filter_out(buf, &mut h2.staging);
            taken += buf.len();
        }
        if let std::task::Poll::Ready(Err(e)) = self.poll_send_staged(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::task::Poll::Ready(Ok(taken))
    }

    /// Sends what [`ConnIo::poll_write_staged`] took and could not send yet.
    fn poll_send_staged(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let Some(h2) = self.h2.as_deref_mut() else {
            return std::task::Poll::Ready(Ok(()));
        };
        while !h2.staging.is_empty() {
            let polled = Pin::new(&mut self.io).poll_write(cx, &h2.staging);
            self.ctx.state.write_polled(&polled);
            let n = std::task::ready!(polled)?;
            if n == 0 {
                return std::task::Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.ctx.shared.metrics.bytes(Global::BytesOut, n);
            h2.staging.drain(..n);
        }
        if !h2.idle.filtering() {
            h2.staging = Vec::new();
        }
        std::task::Poll::Ready(Ok(()))
    }

    /// h2's write goes through [`ConnIo::poll_write_staged`].
    fn staged(&self) -> bool {
        self.h2
            .as_deref()
            .is_some_and(|h2| h2.idle.filtering() || !h2.staging.is_empty())
    }

    /// Follows what h2 wrote directly: the first `n` bytes of `bufs`. Once that ends the
    /// last stream under way, h2 is polled once more, so that it reads, and
    /// [`ConnIo::try_hand_off`] can see whether the connection is at rest.
    fn wrote(
        &mut self,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
        mut n: usize,
    ) {
        let Some(h2) = self.h2.as_deref_mut() else {
            return;
        };
        for buf in bufs {
            let take = n.min(buf.len());
            h2.idle.outbound(&buf[..take]);
            n -= take;
            if n == 0 {
                break;
            }
        }
        if may_go(&h2.idle, &self.ctx.state, &self.ctx.shared) {
            cx.waker().wake_by_ref();
        }
    }

    /// The socket of a connection hyper upgraded (a WebSocket), if it is of this kind,
    /// with what hyper had read and not parsed.
    pub(crate) fn upgraded(
        upgraded: hyper::upgrade::Upgraded,
    ) -> Result<Self, hyper::upgrade::Upgraded> {
        let parts = upgraded.downcast::<TokioIo<ConnIo<I>>>()?;
        let mut io = parts.io.into_inner();
        if !parts.read_buf.is_empty() {
            io.prefix.splice(0..0, parts.read_buf);
        }
        Ok(io)
    }

    /// Whether a socket of this kind can wait in the idle set.
    pub(crate) fn can_idle(&self) -> bool {
        self.io.can_idle()
    }

    /// Whether the socket can wait in the idle set now: its kind can, and nothing is
    /// left unread in [`ConnIo::prefix`].
    pub(crate) fn can_detach(&self) -> bool {
        self.prefix.is_empty() && self.io.can_idle()
    }

    /// The socket out of tokio for the idle set, and what it shares with its connection
    /// until it comes back ([`Detached::attach`]). Only if [`ConnIo::can_detach`]: what is
    /// left in [`ConnIo::prefix`] would be lost.
    pub(crate) fn detach(self) -> std::io::Result<(IdleSocket, Detached)> {
        let detached = Detached {
            ctx: self.ctx,
            nodelay: self.nodelay,
            h2: None,
        };
        Ok((self.io.into_idle()?, detached))
    }

    /// Reads the connection's first bytes (as many as arrived, up to [`FIRST_READ`]) and
    /// says whether they begin HTTP/2 with prior knowledge. Usually one read, where
    /// sniffing the 24 bytes of the preface apart from what follows took two; more only
    /// while what arrived is a beginning of the preface.
    async fn sniff(&mut self) -> std::io::Result<bool> {
        use tokio::io::AsyncReadExt;
        let mut first = Vec::with_capacity(FIRST_READ);
        loop {
            let n = self.io.read_buf(&mut first).await?;
            self.ctx.shared.metrics.bytes(Global::BytesIn, n);
            if n == 0 {
                break;
            }
            let n = first.len().min(H2_PREFACE.len());
            // Only a prefix of the preface so far: read on until it is whole or differs.
            if first[..n] != H2_PREFACE[..n] || n == H2_PREFACE.len() {
                break;
            }
        }
        let h2 = first.starts_with(H2_PREFACE);
        self.prefix = first;
        Ok(h2)
    }

    fn count_written(&self, polled: &std::task::Poll<std::io::Result<usize>>) {
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.ctx.shared.metrics.bytes(Global::BytesOut, *n);
        }
    }

    /// Waits, holding no buffer, until the client sends more (or closes). A socket leaves
    /// what arrived in the kernel; other kinds read a few bytes of it into
    /// [`ConnIo::prefix`]: TLS (whose library may hold decrypted bytes the socket no longer
    /// shows, and keeps its own buffers), and what tests and fuzzing serve.
    async fn idle_read(&mut self) -> std::io::Result<()> {
        std::future::poll_fn(|cx| {
            if let Some(polled) = self.io.poll_readable(cx) {
                return polled;
            }
            let mut scratch = [0u8; 512];
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            self.prefix.extend_from_slice(buf.filled());
            std::task::Poll::Ready(Ok(()))
        })
        .await?;
        if !self.prefix.is_empty() {
            self.ctx.state.bytes_arrived();
            self.ctx
                .shared
                .metrics
                .bytes(Global::BytesIn, self.prefix.len());
        }
        Ok(())
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
        if this.handed_off {
            return std::task::Poll::Pending;
        }
        if this.h2.is_some() {
            return this.poll_read_h2(cx, buf);
        }
        if !this.prefix.is_empty() {
            return this.read_prefix(buf);
        }
        let before = buf.filled().len();
        this.ctx.state.read_into(buf.filled().as_ptr_range().end);
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.ctx.state.read_polled(polled.is_pending());
        if n > 0 {
            this.ctx.state.bytes_arrived();
            this.ctx.shared.metrics.bytes(Global::BytesIn, n);
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
        if self.handed_off || self.staged() {
            return self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)]);
        }
        self.before_write();
        self.ctx.state.wrote_from(buf.as_ptr());
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.ctx.state.write_polled(&polled);
        self.count_written(&polled);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.wrote(cx, &[std::io::IoSlice::new(buf)], n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.handed_off {
            // The client never gets these: the connection goes on elsewhere.
            return std::task::Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        self.before_write();
        if self.staged() {
            return self.poll_write_staged(cx, bufs);
        }
        if let Some(first) = bufs.first() {
            self.ctx.state.wrote_from(first.as_ptr());
        }
        let polled = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.ctx.state.write_polled(&polled);
        self.count_written(&polled);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            self.wrote(cx, bufs, n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.handed_off {
            return std::task::Poll::Ready(Ok(()));
        }
        std::task::ready!(self.poll_send_staged(cx))?;
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.handed_off {
            return std::task::Poll::Ready(Ok(()));
        }
        std::task::ready!(this.poll_send_staged(cx))?;
        if this.linger.is_none() {
            // Flush what is buffered; unless the client may still be sending, the close
            // that follows does the rest.
            std::task::ready!(std::pin::Pin::new(&mut this.io).poll_flush(cx))?;
            if this.ctx.state.parking() {
                // Hyper ends an idle connection on request: the socket stays open.
                this.parked = true;
                return std::task::Poll::Ready(Ok(()));
            }
            if !this.ctx.state.input_pending() {
                if this.io.close_notify() {
                    return std::pin::Pin::new(&mut this.io).poll_shutdown(cx);
                }
                return std::task::Poll::Ready(Ok(()));
            }
            std::task::ready!(std::pin::Pin::new(&mut this.io).poll_shutdown(cx))?;
            this.linger = Some(Linger::new());
        }
        let linger = this.linger.as_mut().expect("set above");
        linger.poll_discard(&mut this.io, cx).map(Ok)
    }
}

/// What a connection's socket shares with its connection (its state, its slot under
/// `max_connections`) while the socket waits in the idle set; for HTTP/2, its state on
/// the wire.
pub(crate) struct Detached {
    ctx: Arc<ConnCtx>,
    nodelay: bool,
    h2: Option<Box<H2Idle>>,
}

impl Detached {
    /// The socket back from the idle set, as it was. An HTTP/2 connection's next h2
    /// connection first reads the preface [`H2Idle::resume`] replays.
    pub(crate) fn attach<I: Socket>(self, socket: IdleSocket) -> std::io::Result<ConnIo<I>> {
        let mut io = ConnIo::new(I::from_idle(socket)?, self.ctx, self.nodelay);
        if let Some(mut idle) = self.h2 {
            io.prefix = idle.resume();
            io.h2 = Some(H2Conn::new(idle, true));
        }
        Ok(io)
    }
}

/// Whether an HTTP/2 connection at rest as far as its frames show may leave h2: the first
/// time at once (most connections of an idle crowd go quiet after their first exchange),
/// later once its clock found it idle for a tick (a new h2 connection per request would
/// cost more than it saves); after a reset stream, only then. At a drain, at once.
///
/// The timing is looked at first: it is cheaper than the frames, and on the write path of
/// a busy connection it is usually what says no.
fn may_go(idle: &H2Idle, state: &ConnState, shared: &Shared) -> bool {
    // A drain began (`Shared::begin_closing`, before the connections hear of it): at once.
    let timely = state.quiet() || shared.closing.load(Ordering::Relaxed);
    if !timely && idle.parks() > 0 {
        return false;
    }
    match idle.rest() {
        Rest::Yes => true,
        Rest::AfterReset => timely,
        Rest::No => false,
    }
}

/// `http.keepalive_timeout`.
fn keepalive(ctx: &ConnCtx) -> Duration {
    Duration::from_millis(ctx.shared.settings.http.keepalive_timeout_ms)
}

/// Closes an idle HTTP/2 connection out of h2: a GOAWAY that says every stream up to
/// `last_stream` was processed, then a FIN, then what the client still sends is read and
/// dropped until it closes (bounded as a lingering close is, [`Linger`]). A request its
/// client sent meanwhile is not lost: the GOAWAY tells the client it was not processed,
/// so it may send it again elsewhere, and the close after it is a FIN, not a reset that
/// could destroy the GOAWAY before the client reads it.
fn goodbye<I: Socket>(socket: IdleSocket, last_stream: u32, guard: ConnectionGuard) {
    use std::io::Write;
    let goaway = crate::h2_idle::goaway(last_stream);
    // An idle connection's send buffer is empty: the few bytes go at once.
    let _ = match &socket {
        IdleSocket::Tcp(s) => (&*s)
            .write(&goaway)
            .and_then(|_| s.shutdown(std::net::Shutdown::Write)),
        IdleSocket::Unix(s) => (&*s)
            .write(&goaway)
            .and_then(|_| s.shutdown(std::net::Shutdown::Write)),
    };
    let Ok(mut io) = I::from_idle(socket) else {
        return;
    };
    tokio::spawn(async move {
        // The connection counts as open until then.
        let _guard = guard;
        let mut linger = Linger::new();
        std::future::poll_fn(|cx| linger.poll_discard(&mut io, cx)).await;
    });
}

/// `n` bytes came from the client.
fn arrived(ctx: &ConnCtx, n: usize) {
    ctx.state.bytes_arrived();
    ctx.shared.metrics.bytes(Global::BytesIn, n);
}

fn log_end(result: hyper::Result<()>) {
    if let Err(e) = result {
        tracing::debug!("connection ended: {e}");
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
    pub(crate) fn new(settings: baton_proto::WorkerSettings, router: Router) -> Self {
        let mut shared = Shared::new(1, settings, router, None);
        shared.http1.half_close(true);
        let (drain, watch) = Drain::new();
        let shared = Arc::new(shared);
        // Inside a runtime (tests), idle TCP connections wait in the idle set, as in a
        // worker; fuzzing's in-memory connections cannot.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(watch_idle(shared.clone(), watch.clone()));
        }
        Self {
            shared,
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
        connection(
            io,
            None,
            self.shared.clone(),
            self.watch.clone(),
            guard,
            permit,
        )
        .await;
    }

    /// Begins the drain, as a worker does when told to stop.
    #[cfg(test)]
    pub(crate) fn drain(&self) {
        self.shared.begin_closing();
        self._drain.advance(Phase::Closing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proto::WorkerSettings;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn one_connection() -> OneConnection {
        one_connection_with(WorkerSettings::default().http.header_read_timeout_ms)
    }

    /// With `header_read_timeout` in ms: half of it (at least 25 ms) is the tick of the
    /// connection's clock, after which an idle connection leaves hyper.
    fn one_connection_with(header_read_timeout_ms: u64) -> OneConnection {
        let mut settings = WorkerSettings::default();
        settings.http.header_read_timeout_ms = header_read_timeout_ms;
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

    thread_local! {
        /// Connections taken out of hyper idle on this thread (each test has its own
        /// runtime on its own thread).
        pub(super) static PARKS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    fn parks() -> u64 {
        PARKS.with(|p| p.get())
    }

    /// Reads `n` whole sized answers (the health path's), and nothing more.
    async fn read_answers(client: &mut tokio::net::TcpStream, n: usize) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let text = String::from_utf8_lossy(&got).into_owned();
            // Where each complete answer ends.
            let (mut at, mut whole) = (0, 0);
            while let Some(end) = text[at..].find("\r\n\r\n") {
                let head = &text[at..at + end];
                let length: usize = head
                    .lines()
                    .find_map(|l| {
                        let l = l.to_ascii_lowercase();
                        l.strip_prefix("content-length: ")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .expect("a sized answer");
                if got.len() < at + end + 4 + length {
                    break;
                }
                at += end + 4 + length;
                whole += 1;
            }
            if whole >= n {
                assert_eq!((whole, at), (n, got.len()), "more than asked for: {text:?}");
                return text;
            }
            let read = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("an answer within 5 s")
                .unwrap();
            assert!(read > 0, "the connection closed after {text:?}");
            got.extend_from_slice(&buf[..read]);
        }
    }

    async fn read_response(client: &mut tokio::net::TcpStream) -> String {
        read_answers(client, 1).await
    }

    /// Waits for the server's side of a connection to end.
    async fn ended(serving: tokio::task::JoinHandle<()>, within: Duration, what: &str) {
        tokio::time::timeout(within, serving)
            .await
            .expect(what)
            .unwrap();
    }

    const HEALTH: &[u8] = b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n\r\n";

    /// Waits until the server took its connection out of hyper `n` times in all.
    async fn parked(n: u64) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while parks() < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the idle connection left hyper");
    }

    /// Waits until every connection of `server` ended (its tasks, and what waited in its
    /// idle set).
    async fn all_ended(server: &OneConnection, within: Duration, what: &str) {
        tokio::time::timeout(within, server.shared.connections.all_closed())
            .await
            .expect(what);
    }

    /// Waits until `n` connections of `server` wait in its idle set.
    async fn held_idle(server: &OneConnection, n: usize) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while server.shared.idle.held() != n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .expect("the idle connection waits in the idle set");
    }

    /// hyper's HTTP/2 client (h2's) on `client`, and the task that drives its connection.
    async fn h2_client(
        client: tokio::net::TcpStream,
    ) -> (
        hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ) {
        let (send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            TokioIo::new(client),
        )
        .await
        .expect("HTTP/2 handshake");
        (send, tokio::spawn(conn))
    }

    /// GETs the health path; its status.
    async fn h2_health(
        send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    ) -> http::StatusCode {
        use http_body_util::BodyExt;
        send.ready().await.expect("the connection takes a request");
        let request = http::Request::get("http://x/_baton/health")
            .body(http_body_util::Empty::new())
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), send.send_request(request))
            .await
            .expect("an answer within 5 s")
            .expect("an answer");
        let status = response.status();
        response.into_body().collect().await.expect("the body");
        status
    }

    #[tokio::test]
    async fn an_idle_http2_connection_leaves_h2_and_comes_back_for_its_next_request() {
        let server = Arc::new(one_connection_with(200));
        let (client, _serving) = tcp_connection_of(server.clone()).await;
        let (mut send, driving) = h2_client(client).await;
        for round in 1..=4 {
            assert_eq!(h2_health(&mut send).await, 200);
            parked(round).await;
            // Without a task and without h2: in the worker's idle set.
            held_idle(&server, 1).await;
        }
        // Streams at once on a connection that came back.
        let mut again = send.clone();
        let mut third = send.clone();
        let (a, b, c) = tokio::join!(
            h2_health(&mut send),
            h2_health(&mut again),
            h2_health(&mut third)
        );
        assert_eq!([a, b, c], [http::StatusCode::OK; 3]);
        parked(5).await;
        drop((send, again, third));
        driving
            .await
            .unwrap()
            .expect("the client's connection ends cleanly");
        all_ended(&server, Duration::from_secs(1), "the connection ended").await;
    }

    #[tokio::test]
    async fn a_drain_closes_an_idle_http2_connection_with_a_goaway() {
        let server = Arc::new(one_connection_with(200));
        let (client, _serving) = tcp_connection_of(server.clone()).await;
        let (mut send, driving) = h2_client(client).await;
        assert_eq!(h2_health(&mut send).await, 200);
        parked(1).await;
        held_idle(&server, 1).await;
        server.drain();
        // h2's client ends its connection without an error only after a GOAWAY.
        tokio::time::timeout(Duration::from_secs(2), driving)
            .await
            .expect("closed at once, not after the grace")
            .unwrap()
            .expect("a GOAWAY, then the close");
        all_ended(&server, Duration::from_secs(1), "the connection ended").await;
    }

    /// A frame of `kind` on `stream`.
    fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags]);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// A GET of the health path on `stream`, its header block with no table entries.
    fn h2_get(stream: u32) -> Vec<u8> {
        let path = b"/_baton/health";
        let mut block = vec![0x82, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path);
        block.extend_from_slice(&[0x01, 0x01, b'x']);
        h2_frame(1, 0x5, stream, &block)
    }

    /// A raw HTTP/2 client of `server` that opened its connection window (as clients do)
    /// and got its first answer, after which its connection left h2; and the task that
    /// served it.
    async fn h2_first_exchange(
        server: &Arc<OneConnection>,
    ) -> (tokio::net::TcpStream, tokio::task::JoinHandle<()>) {
        let (mut client, serving) = tcp_connection_of(server.clone()).await;
        let mut hello = H2_PREFACE.to_vec();
        hello.extend(h2_frame(4, 0, 0, &[]));
        hello.extend(h2_frame(8, 0, 0, &(1u32 << 24).to_be_bytes()));
        hello.extend(h2_get(1));
        client.write_all(&hello).await.unwrap();
        assert!(h2_answered(&mut client, 1).await);
        parked(1).await;
        (client, serving)
    }

    /// The next frame from the server, from `got` and what more it sends (within 5 s):
    /// (type, flags, stream, payload); none if it closed.
    async fn h2_next_frame(
        client: &mut tokio::net::TcpStream,
        got: &mut Vec<u8>,
    ) -> Option<(u8, u8, u32, Vec<u8>)> {
        let mut buf = [0u8; 4096];
        loop {
            if got.len() >= 9 {
                let len =
                    usize::from(got[0]) << 16 | usize::from(got[1]) << 8 | usize::from(got[2]);
                if got.len() >= 9 + len {
                    let id = u32::from_be_bytes([got[5], got[6], got[7], got[8]]);
                    let frame = (got[3], got[4], id, got[9..9 + len].to_vec());
                    got.drain(..9 + len);
                    return Some(frame);
                }
            }
            let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
                .await
                .expect("frames within 5 s")
                .unwrap();
            if n == 0 {
                return None;
            }
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// The frames the server sends until it closes, with a FIN: (type, flags, stream,
    /// payload).
    async fn h2_frames_until_the_end(
        client: &mut tokio::net::TcpStream,
    ) -> Vec<(u8, u8, u32, Vec<u8>)> {
        let mut got = Vec::new();
        let mut frames = Vec::new();
        while let Some(frame) = h2_next_frame(client, &mut got).await {
            frames.push(frame);
        }
        assert!(got.is_empty(), "half a frame at the end: {got:?}");
        frames
    }

    /// Reads frames until `stream` ends, or for stream 0 until a PING answer
    /// (acknowledging the server's SETTINGS); false if a GOAWAY or the end came first.
    async fn h2_answered(client: &mut tokio::net::TcpStream, stream: u32) -> bool {
        let mut got = Vec::new();
        while let Some((kind, flags, id, _)) = h2_next_frame(client, &mut got).await {
            match kind {
                4 if flags & 1 == 0 => client.write_all(&h2_frame(4, 1, 0, &[])).await.unwrap(),
                7 => return false,
                0 | 1 if id == stream && stream != 0 && flags & 1 != 0 => return true,
                6 if stream == 0 && flags & 1 != 0 => return true,
                _ => {}
            }
        }
        false
    }

    #[tokio::test]
    async fn a_drain_closes_an_http2_connection_at_rest_in_h2_with_one_goaway_and_no_ping() {
        // A tick of 5 s: after its second request the connection stays in h2.
        let server = Arc::new(one_connection_with(10_000));
        let (mut client, serving) = h2_first_exchange(&server).await;
        client.write_all(&h2_get(3)).await.unwrap();
        assert!(h2_answered(&mut client, 3).await);
        // Back in h2, where it stays until its clock ticks.
        held_idle(&server, 0).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        server.drain();
        let frames = h2_frames_until_the_end(&mut client).await;
        let kinds: Vec<u8> = frames.iter().map(|f| f.0).collect();
        // One GOAWAY: every stream up to 3 was processed, NO_ERROR. No PING before it.
        assert_eq!(
            frames.iter().filter(|f| f.0 == 7).collect::<Vec<_>>(),
            [&(7, 0, 0, [0, 0, 0, 3, 0, 0, 0, 0].to_vec())],
            "{frames:?}"
        );
        assert!(!kinds.contains(&6), "a PING: {frames:?}");
        // The server reads what the client still sends until it closes too.
        drop(client);
        ended(serving, Duration::from_secs(1), "the connection ended").await;
        all_ended(&server, Duration::from_secs(1), "the connection ended").await;
    }

    #[tokio::test]
    async fn pings_alone_do_not_keep_an_idle_http2_connection_past_keepalive_timeout() {
        let mut settings = WorkerSettings::default();
        settings.http.header_read_timeout_ms = 200;
        settings.http.keepalive_timeout_ms = 600;
        let router = Router::build(Vec::new(), &settings.http.health_path).expect("router");
        let server = Arc::new(OneConnection::new(settings, router));
        let (mut client, _serving) = h2_first_exchange(&server).await;
        // A PING every 100 ms brings the connection back each time; yet it is closed, with
        // a GOAWAY, within 2.25 keepalive_timeouts of its last request (and some slack).
        let began = std::time::Instant::now();
        let goaway = loop {
            assert!(
                began.elapsed() < Duration::from_secs(3),
                "still open after 3 s of PINGs"
            );
            if client.write_all(&h2_frame(6, 0, 0, &[1; 8])).await.is_err() {
                break false;
            }
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(Duration::from_millis(100), client.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break false,
                Ok(Ok(n)) => {
                    // A GOAWAY (type 7) among what came: the connection is closing.
                    let mut rest = &buf[..n];
                    let mut seen = false;
                    while rest.len() >= 9 {
                        let len = usize::from(rest[1]) << 8 | usize::from(rest[2]);
                        seen |= rest[3] == 7;
                        rest = &rest[(9 + len).min(rest.len())..];
                    }
                    if seen {
                        break true;
                    }
                }
                Err(_) => {}
            }
        };
        assert!(goaway, "closed without a GOAWAY");
        drop(client);
        all_ended(&server, Duration::from_secs(2), "the connection ended").await;
    }

    /// Reads frames until `stream` ends or is reset: the RST_STREAM error codes seen on it,
    /// and whether a GOAWAY came.
    async fn h2_resets_of(client: &mut tokio::net::TcpStream, stream: u32) -> (Vec<u32>, bool) {
        let mut got = Vec::new();
        let mut resets = Vec::new();
        while let Some((kind, flags, id, payload)) = h2_next_frame(client, &mut got).await {
            match kind {
                7 => return (resets, true),
                3 if id == stream => {
                    resets.push(u32::from_be_bytes(payload[..4].try_into().unwrap()));
                    break;
                }
                0 | 1 if id == stream && flags & 1 != 0 => break,
                _ => {}
            }
        }
        (resets, false)
    }

    #[tokio::test]
    async fn a_request_body_past_64_kib_sent_at_once_to_a_resumed_connection_is_taken() {
        let server = Arc::new(one_connection_with(200));
        let (mut client, _serving) = h2_first_exchange(&server).await;
        held_idle(&server, 1).await;
        // The server's settings (1 MiB per stream) were acknowledged long ago: a POST with
        // 160 KiB of body, all at once, as the client may.
        let path = b"/_baton/health";
        let mut block = vec![0x83, 0x86, 0x04, path.len() as u8];
        block.extend_from_slice(path);
        block.extend_from_slice(&[0x01, 0x01, b'x']);
        let mut post = h2_frame(1, 0x4, 3, &block);
        for i in 0..10 {
            post.extend(h2_frame(
                0,
                if i == 9 { 1 } else { 0 },
                3,
                &[b'a'; 16 * 1024],
            ));
        }
        client.write_all(&post).await.unwrap();
        let (resets, goaway) = h2_resets_of(&mut client, 3).await;
        assert!(!goaway, "a GOAWAY");
        // FLOW_CONTROL_ERROR is 3.
        assert!(
            !resets.contains(&3),
            "stream 3 reset for flow control: {resets:?}"
        );
    }

    #[tokio::test]
    async fn a_preface_read_with_half_a_frame_header_after_it_is_followed_whole() {
        let server = Arc::new(one_connection_with(200));
        let (mut client, _serving) = tcp_connection_of(server.clone()).await;
        let mut hello = H2_PREFACE.to_vec();
        hello.extend(h2_frame(4, 0, 0, &[]));
        hello.extend(h2_frame(8, 0, 0, &(1u32 << 24).to_be_bytes()));
        let get = h2_get(1);
        // The first read ends 4 bytes into a header, the next brings 1 byte, then the rest.
        hello.extend_from_slice(&get[..4]);
        client.write_all(&hello).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.write_all(&get[4..5]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        client.write_all(&get[5..]).await.unwrap();
        assert!(h2_answered(&mut client, 1).await);
        parked(1).await;
    }

    #[tokio::test]
    async fn late_frames_on_streams_closed_before_the_park_are_ignored() {
        let server = Arc::new(one_connection_with(200));
        let (mut client, _serving) = h2_first_exchange(&server).await;
        held_idle(&server, 1).await;
        // RFC 9113 lets a WINDOW_UPDATE or RST_STREAM follow a stream's end for a while.
        let mut late = h2_frame(8, 0, 1, &100u32.to_be_bytes());
        late.extend(h2_frame(3, 0, 1, &8u32.to_be_bytes()));
        // Sent in two pieces, the second header cut in two.
        client.write_all(&late[..17]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        client.write_all(&late[17..]).await.unwrap();
        client.write_all(&h2_get(3)).await.unwrap();
        assert!(h2_answered(&mut client, 3).await, "the connection went on");
        parked(2).await;
        held_idle(&server, 1).await;
        // A PING is answered by the next connection too (after its SETTINGS, which the
        // client acknowledges).
        client.write_all(&h2_frame(6, 0, 0, &[7; 8])).await.unwrap();
        assert!(h2_answered(&mut client, 0).await, "a PING answer");
        parked(3).await;
    }

    #[tokio::test]
    async fn an_idle_connection_leaves_hyper_and_comes_back_for_its_next_request() {
        let server = Arc::new(one_connection_with(200));
        let (mut client, _serving) = tcp_connection_of(server.clone()).await;
        for round in 1..=3 {
            client.write_all(HEALTH).await.unwrap();
            let answer = read_response(&mut client).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            parked(round).await;
            // Without a task: in the worker's idle set.
            held_idle(&server, 1).await;
        }
        drop(client);
        all_ended(
            &server,
            Duration::from_secs(1),
            "the connection ended with its client",
        )
        .await;
        assert_eq!(server.shared.idle.held(), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_keepalive_timeout_with_a_fin() {
        let mut settings = WorkerSettings::default();
        settings.http.keepalive_timeout_ms = 300;
        let router = Router::build(Vec::new(), &settings.http.health_path).expect("router");
        let server = Arc::new(OneConnection::new(settings, router));
        let (mut client, _serving) = tcp_connection_of(server.clone()).await;
        client.write_all(HEALTH).await.unwrap();
        read_response(&mut client).await;
        let answered = tokio::time::Instant::now();
        held_idle(&server, 1).await;
        let mut rest = Vec::new();
        // A reset instead of a FIN would fail the read.
        tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut rest))
            .await
            .expect("closed within keepalive_timeout and a sweep")
            .unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        assert!(
            answered.elapsed() >= Duration::from_millis(300),
            "closed after {:?}",
            answered.elapsed()
        );
        all_ended(&server, Duration::from_secs(1), "the connection ended").await;
    }

    #[tokio::test]
    async fn pipelined_requests_left_in_hyper_are_served_after_it_gives_them_back() {
        let (_server, mut client) = fast_clock_connection().await;
        // Two whole requests and the beginning of a third in one write: hyper answers
        // two and keeps the third's beginning, which the connection gets back when it
        // leaves hyper idle.
        let mut burst = [HEALTH, HEALTH].concat();
        burst.extend_from_slice(b"GET /_baton/health HT");
        client.write_all(&burst).await.unwrap();
        let answers = read_answers(&mut client, 2).await;
        assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
        // The connection leaves hyper (within two ticks) with the third's beginning.
        parked(1).await;
        client
            .write_all(b"TP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let answer = read_response(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            !answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }

    #[tokio::test]
    async fn requests_sent_the_moment_the_connection_goes_idle_are_all_answered() {
        // A clock tick of 25 ms, and pauses of 0 to 30 ms between requests: ticks find the
        // connection idle while the next request is on its way, and it leaves hyper while
        // a request arrives or waits outside when one does.
        let server = Arc::new(one_connection_with(50));
        let (mut client, _serving) = tcp_connection_of(server.clone()).await;
        for i in 0..400u64 {
            client.write_all(HEALTH).await.unwrap();
            let answer = read_response(&mut client).await;
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            tokio::time::sleep(Duration::from_millis(i % 7 * 5)).await;
        }
        assert!(parks() > 0, "the connection never left hyper");
    }

    /// A connection of `server` over TCP: the client's end, and the server's task serving
    /// the other (until the connection ends or waits in the idle set; keep `server`, or its
    /// idle set closes what waits there).
    async fn tcp_connection_of(
        server: Arc<OneConnection>,
    ) -> (tokio::net::TcpStream, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        (
            client,
            tokio::spawn(async move { server.serve(accepted).await }),
        )
    }

    /// A connection that served one request and waits idle outside hyper.
    async fn idle_outside_hyper() -> (
        Arc<OneConnection>,
        tokio::net::TcpStream,
        tokio::task::JoinHandle<()>,
    ) {
        let server = Arc::new(one_connection_with(200));
        let (mut client, serving) = tcp_connection_of(server.clone()).await;
        client.write_all(HEALTH).await.unwrap();
        read_response(&mut client).await;
        parked(1).await;
        held_idle(&server, 1).await;
        (server, client, serving)
    }

    #[tokio::test]
    async fn a_drain_gives_an_idle_connection_outside_hyper_one_request_with_connection_close() {
        let (server, mut client, serving) = idle_outside_hyper().await;
        server.drain();
        // Within drain_idle_grace: answered, with Connection: close, then a FIN.
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(HEALTH).await.unwrap();
        let answer = read_response(&mut client).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
        let mut rest = Vec::new();
        // A reset instead of a FIN would fail the read.
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        serving.await.unwrap();
        all_ended(&server, Duration::from_secs(1), "the connection ended").await;
    }

    #[tokio::test]
    async fn a_drain_closes_a_connection_still_idle_outside_hyper_after_the_grace() {
        let (server, mut client, serving) = idle_outside_hyper().await;
        let grace = Duration::from_millis(server.shared.settings.drain_idle_grace_ms);
        let began = tokio::time::Instant::now();
        server.drain();
        let mut rest = Vec::new();
        tokio::time::timeout(grace * 3, client.read_to_end(&mut rest))
            .await
            .expect("closed after the grace")
            .unwrap();
        assert!(rest.is_empty(), "{rest:?}");
        assert!(
            began.elapsed() >= grace,
            "closed after {:?}",
            began.elapsed()
        );
        serving.await.unwrap();
        all_ended(&server, Duration::from_secs(1), "the connection ended").await;
    }

    /// A connection of [`one_connection`] over TCP: the client's end, and the server's
    /// task serving the other.
    async fn tcp_connection() -> (tokio::net::TcpStream, tokio::task::JoinHandle<()>) {
        tcp_connection_of(Arc::new(one_connection())).await
    }

    /// A connection whose clock ticks every 100 ms: idle, it leaves hyper within 200 ms.
    /// The server must be kept: with it go the drain's sender and its idle set's watcher.
    async fn fast_clock_connection() -> (Arc<OneConnection>, tokio::net::TcpStream) {
        let server = Arc::new(one_connection_with(200));
        let (client, _serving) = tcp_connection_of(server.clone()).await;
        (server, client)
    }

    #[tokio::test]
    async fn an_error_answer_is_read_whole_while_the_client_still_sends() {
        let (mut client, serving) = tcp_connection().await;
        // More header fields than hyper's 100, then more than the server reads of it.
        let mut request = b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n".to_vec();
        for i in 0..150 {
            request.extend_from_slice(format!("X-Field-{i}: v\r\n").as_bytes());
        }
        request.resize(request.len() + 256 * 1024, b'x');
        client.write_all(&request).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer))
            .await
            .expect("the server closed its side");
        let text = String::from_utf8_lossy(&answer);
        // A reset instead of a close would fail the read (ECONNRESET).
        read.unwrap_or_else(|e| panic!("{e} after {text:?}"));
        assert!(text.starts_with("HTTP/1.1 431"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
        // Closing its side ends the server's lingering at once.
        drop(client);
        ended(serving, Duration::from_secs(1), "the connection ended").await;
    }

    #[tokio::test]
    async fn a_lingering_close_is_bounded_in_bytes_and_in_time() {
        // A client that never stops sending: the server stops reading after LINGER_BYTES,
        // well before LINGER_TIME.
        let (mut client, serving) = tcp_connection().await;
        client.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
        let flood = async {
            let chunk = [b'x'; 64 * 1024];
            while client.write_all(&chunk).await.is_ok() {}
        };
        let started = tokio::time::Instant::now();
        let (_, served) = tokio::join!(flood, serving);
        served.unwrap();
        assert!(started.elapsed() < LINGER_TIME, "{:?}", started.elapsed());

        // A client that neither sends nor closes: the server closes after LINGER_TIME.
        let (mut client, serving) = tcp_connection().await;
        client.write_all(b"GARBAGE\r\n\r\n").await.unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 400"), "{answer:?}");
        ended(
            serving,
            LINGER_TIME + Duration::from_secs(1),
            "the lingering close ended",
        )
        .await;
    }
}
