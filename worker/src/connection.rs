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
use crate::handle::handle;
use crate::lazy_select::{Either, lazy_select};
use crate::metrics::Global;
use crate::router::Router;
use crate::shared::Shared;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
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

pub(crate) async fn connection<I: Socket>(
    io: I,
    peer: Option<std::net::SocketAddr>,
    shared: Arc<Shared>,
    mut watch: DrainWatch,
    _guard: ConnectionGuard,
    permit: OwnedSemaphorePermit,
) {
    let ctx = Arc::new(ConnCtx {
        shared,
        peer,
        state: ConnState::new(),
        drain: watch.clone(),
        _slot: permit,
    });
    let (shared, state) = (&ctx.shared, &ctx.state);
    let clock = ConnClock::new(
        Duration::from_millis(shared.settings.http.keepalive_timeout_ms),
        Duration::from_millis(shared.settings.http.header_read_timeout_ms),
    );
    let grace = Duration::from_millis(shared.settings.drain_idle_grace_ms);
    let mut closing_watch = watch.clone();
    let drain_says_close = async {
        closing_watch.reached(Phase::Closing).await;
        if !state.h2() {
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
        prefix: Vec::new(),
        nodelay: false,
        linger: None,
    };
    // Biased: when the first bytes and the drain's deadline are both there (a worker kept
    // off the CPU past `drain_idle_grace`), the request that arrived is served.
    let h2 = if io.io.negotiated_h2() {
        true
    } else {
        tokio::select! {
            biased;
            sniffed = io.sniff() => match sniffed {
                Ok(h2) => h2,
                Err(e) => return tracing::debug!("connection ended: {e}"),
            },
            // Closed before its first request: the drain, or no head within the timeout.
            _ = side.as_mut() => return,
        }
    };
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| handle(req, &ctx))
    };
    let io = TokioIo::new(io);
    if h2 {
        state.set_h2();
        let conn = shared.http2.serve_connection(io, service);
        drive(conn, |c| c.graceful_shutdown(), side, &mut watch).await;
    } else {
        // With upgrades: a WebSocket route takes the connection over after its 101.
        let conn = shared.http1.serve_connection(io, service).with_upgrades();
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
struct ConnIo<I> {
    io: I,
    ctx: Arc<ConnCtx>,
    /// Read by [`ConnIo::sniff`], not yet by hyper (freed once it has all of it).
    prefix: Vec<u8>,
    /// `TCP_NODELAY` is set.
    nodelay: bool,
    /// Writing is shut down and what the client still sends is being discarded.
    linger: Option<Linger>,
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
            buf.put_slice(&this.prefix[..n]);
            this.prefix.drain(..n);
            if this.prefix.is_empty() {
                this.prefix = Vec::new();
            }
            return std::task::Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
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
        self.before_write();
        let polled = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        self.ctx.state.write_polled(&polled);
        self.count_written(&polled);
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
        self.count_written(&polled);
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
        let this = &mut *self;
        if this.linger.is_none() {
            // Flush what is buffered; unless the client may still be sending, the close
            // that follows does the rest.
            std::task::ready!(std::pin::Pin::new(&mut this.io).poll_flush(cx))?;
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
        self.shared
            .closing
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self._drain.advance(Phase::Closing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_proto::WorkerSettings;
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

    /// A connection of [`one_connection`] over TCP: the client's end, and the server's
    /// task serving the other.
    async fn tcp_connection() -> (tokio::net::TcpStream, tokio::task::JoinHandle<()>) {
        let server = one_connection();
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
        tokio::time::timeout(Duration::from_secs(1), serving)
            .await
            .expect("the connection ended")
            .unwrap();
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
        tokio::time::timeout(LINGER_TIME + Duration::from_secs(1), serving)
            .await
            .expect("the lingering close ended")
            .unwrap();
    }
}
