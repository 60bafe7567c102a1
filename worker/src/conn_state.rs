//! What a connection's task and the requests on it share: the connection's state
//! ([`ConnState`], flipped by the request path and read by the connection's clock and
//! socket), the worker's [`Shared`] state ([`ConnCtx`]), and the count of requests in
//! flight ([`InFlight`]).
//!
//! It sits below [`crate::connection`] (which owns the socket and the clock) and
//! [`crate::handle`] (which answers requests), so that neither imports the other's
//! internals. It holds state and reads headers; it never touches a socket.

use crate::drain::DrainWatch;
use crate::shared::Shared;
use http::{Version, header};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use tokio::sync::OwnedSemaphorePermit;

/// What the handlers of one connection share.
pub(crate) struct ConnCtx {
    pub(crate) shared: Arc<Shared>,
    /// The client's address (none over a Unix socket), for the access log.
    pub(crate) peer: Option<std::net::SocketAddr>,
    pub(crate) state: ConnState,
    /// The drain's phase, for what outlives a request on this connection (a WebSocket).
    pub(crate) drain: DrainWatch,
    /// The connection's place under `max_connections`, held as long as anything of the
    /// connection lives: a WebSocket it was upgraded to keeps it (its socket holds this).
    pub(crate) _slot: OwnedSemaphorePermit,
}

/// What a connection's handlers tell its task. Counters only: reading the clock on every
/// request showed up in profiles.
#[derive(Debug)]
pub(crate) struct ConnState {
    /// HTTP/2 with prior knowledge (known from the first read).
    h2: AtomicBool,
    /// The first HTTP/1 request asked to keep the connection open.
    keep_alive: AtomicBool,
    in_flight: AtomicUsize,
    /// Requests started on this connection.
    started: AtomicU64,
    /// Bytes arrived while no request was in flight ([`InFlight`]) and none has started
    /// since: the head of the next request is being read. True from the accept on, so
    /// that the first request is held to `header_read_timeout` too.
    head: AtomicBool,
    /// The last write to the client could not complete (it is not reading): a response
    /// is still going out, whatever bytes have arrived meanwhile.
    write_blocked: AtomicBool,
    /// A request was answered without reading its whole body: the client may still be
    /// sending it.
    body_left: AtomicBool,
    /// The last read from the socket found nothing to read.
    read_blocked: AtomicBool,
    /// The connection is being taken out of hyper to wait idle ([`ConnState::request_park`]):
    /// the [`ConnState::activity`] mark at that moment, or [`NO_PARK`].
    park: AtomicU64,
    /// The connection's clock found it idle for a whole tick: the [`ConnState::activity`]
    /// mark then, or [`NO_PARK`].
    park_due: AtomicU64,
    /// An HTTP/2 connection is closing (its GOAWAY may be on its way): it no longer leaves
    /// h2 to wait idle.
    h2_closing: AtomicBool,
    /// Where the last read from the socket went and the last write came from (hyper's
    /// buffers, which it keeps for the connection's life), to be prefetched before the
    /// next request is read ([`ConnState::buffers`]). Addresses only, never read through.
    read_at: AtomicUsize,
    write_at: AtomicUsize,
}

/// [`ConnState::park`] when no park was requested.
const NO_PARK: u64 = u64::MAX;

impl ConnState {
    pub(crate) fn new() -> Self {
        Self {
            h2: AtomicBool::new(false),
            keep_alive: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            head: AtomicBool::new(true),
            write_blocked: AtomicBool::new(false),
            body_left: AtomicBool::new(false),
            read_blocked: AtomicBool::new(false),
            park: AtomicU64::new(NO_PARK),
            park_due: AtomicU64::new(NO_PARK),
            h2_closing: AtomicBool::new(false),
            read_at: AtomicUsize::new(0),
            write_at: AtomicUsize::new(0),
        }
    }

    /// Notes where a read from the socket went (`read`) or a write came from (`write`).
    pub(crate) fn read_into(&self, read: *const u8) {
        self.read_at.store(read.addr(), Ordering::Relaxed);
    }

    /// See [`ConnState::read_into`].
    pub(crate) fn wrote_from(&self, write: *const u8) {
        self.write_at.store(write.addr(), Ordering::Relaxed);
    }

    /// Where the last read went and the last write came from (0: none yet). They may be
    /// gone since: only ever prefetched.
    pub(crate) fn buffers(&self) -> (usize, usize) {
        (
            self.read_at.load(Ordering::Relaxed),
            self.write_at.load(Ordering::Relaxed),
        )
    }

    /// HTTP/2 with prior knowledge: known from the connection's first read.
    pub(crate) fn h2(&self) -> bool {
        self.h2.load(Ordering::Relaxed)
    }

    pub(crate) fn set_h2(&self) {
        self.h2.store(true, Ordering::Relaxed);
    }

    /// A request is answered without its whole body being read.
    pub(crate) fn body_left(&self) {
        self.body_left.store(true, Ordering::Relaxed);
    }

    /// The client may still be sending when the connection ends: a head hyper answered
    /// with an error (431, 400) or that arrived after the last request, or a body left
    /// unread.
    pub(crate) fn input_pending(&self) -> bool {
        !self.h2.load(Ordering::Relaxed)
            && (self.head.load(Ordering::Relaxed) || self.body_left.load(Ordering::Relaxed))
    }

    /// A request's head arrived whole.
    pub(crate) fn request_started(&self, parts: &http::request::Parts) {
        if self.started.fetch_add(1, Ordering::Relaxed) == 0 && keeps_alive(parts) {
            self.keep_alive.store(true, Ordering::Relaxed);
        }
        self.head.store(false, Ordering::Relaxed);
    }

    /// The connection will carry more than one response.
    pub(crate) fn stays_open(&self) -> bool {
        self.keep_alive.load(Ordering::Relaxed) || self.h2.load(Ordering::Relaxed)
    }

    /// A mark that changes whenever a request starts.
    pub(crate) fn activity(&self) -> u64 {
        self.started.load(Ordering::Relaxed)
    }

    pub(crate) fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// A request is in flight, or a response still being written.
    pub(crate) fn active(&self) -> bool {
        self.busy() || self.write_blocked.load(Ordering::Relaxed)
    }

    pub(crate) fn write_polled<T>(&self, polled: &std::task::Poll<T>) {
        let blocked = polled.is_pending();
        if self.write_blocked.load(Ordering::Relaxed) != blocked {
            self.write_blocked.store(blocked, Ordering::Relaxed);
        }
    }

    /// The connection delivered bytes: with nothing in flight, they begin a request head.
    pub(crate) fn bytes_arrived(&self) {
        if !self.busy() && !self.head.load(Ordering::Relaxed) {
            self.head.store(true, Ordering::Relaxed);
        }
    }

    /// An HTTP/1 request head is incomplete (HTTP/2 frames between requests are not heads).
    pub(crate) fn reading_head(&self) -> bool {
        self.head.load(Ordering::Relaxed) && !self.h2.load(Ordering::Relaxed)
    }

    /// Bytes that begin the next request head are at hand (left over in hyper's buffer
    /// when the connection was taken out of it).
    pub(crate) fn head_began(&self) {
        self.head.store(true, Ordering::Relaxed);
    }

    /// A read from the socket delivered bytes (`false`) or found none (`true`).
    pub(crate) fn read_polled(&self, blocked: bool) {
        if self.read_blocked.load(Ordering::Relaxed) != blocked {
            self.read_blocked.store(blocked, Ordering::Relaxed);
        }
    }

    /// An HTTP/1 connection that hyper serves is idle between requests, after its first
    /// request or once its clock says it has been idle for a tick ([`ConnState::park_due`]),
    /// as far as its requests and socket show: a request was served since `entered` (the
    /// [`ConnState::activity`] mark when hyper took the connection, so hyper has been
    /// through a whole exchange and is between two), nothing is in flight or still being
    /// written, no head or body is arriving, and hyper's last read found nothing. Hyper
    /// may still hold the beginning of a pipelined request it read along with the last
    /// one: taking the connection out of hyper gives those bytes back.
    pub(crate) fn idle_in_hyper(&self, entered: u64) -> bool {
        let now = self.activity();
        // After the first request at once: most connections of a large idle crowd go
        // quiet after their first exchange, and buffers freed at once are reused by the
        // next connection instead of leaving holes in the heap between the small
        // allocations of connections that stay (which a trim can only partly return).
        (now == 1 || self.park_due.load(Ordering::Relaxed) == now)
            && now != entered
            && self.read_blocked.load(Ordering::Relaxed)
            && !self.active()
            && !self.input_pending()
            && !self.h2()
    }

    /// The connection's clock found it idle for a whole tick: it is to leave hyper (at
    /// once if it is idle in hyper, see [`ConnState::idle_in_hyper`]) unless a request
    /// starts first. Not at every pause between requests: a new hyper connection per
    /// request cost a tenth of the keep-alive throughput.
    pub(crate) fn park_due(&self) {
        self.park_due.store(self.activity(), Ordering::Relaxed);
    }

    /// No request started since the connection's clock last found it idle for a whole
    /// tick.
    pub(crate) fn quiet(&self) -> bool {
        self.park_due.load(Ordering::Relaxed) == self.activity()
    }

    /// An HTTP/2 connection begins to close: it stays in h2 until it ends.
    pub(crate) fn h2_closes(&self) {
        self.h2_closing.store(true, Ordering::Relaxed);
    }

    pub(crate) fn h2_closing(&self) -> bool {
        self.h2_closing.load(Ordering::Relaxed)
    }

    /// The last read from the socket found nothing to read.
    pub(crate) fn read_blocked(&self) -> bool {
        self.read_blocked.load(Ordering::Relaxed)
    }

    /// The last write to the socket could not complete.
    pub(crate) fn write_blocked(&self) -> bool {
        self.write_blocked.load(Ordering::Relaxed)
    }

    /// The connection is about to be taken out of hyper, idle.
    pub(crate) fn request_park(&self) {
        self.park.store(self.activity(), Ordering::Relaxed);
    }

    /// A park was requested and no request started since: hyper is ending the connection
    /// because it was asked to while idle, not for a reason of its own.
    pub(crate) fn parking(&self) -> bool {
        self.park.load(Ordering::Relaxed) == self.activity()
    }

    /// The connection is back in hyper (or closing).
    pub(crate) fn clear_park(&self) {
        self.park.store(NO_PARK, Ordering::Relaxed);
    }
}

/// Whether an HTTP/1 request keeps its connection open: HTTP/1.1 unless it says
/// `Connection: close`, HTTP/1.0 only if it says `Connection: keep-alive`.
fn keeps_alive(parts: &http::request::Parts) -> bool {
    match parts.version {
        Version::HTTP_09 | Version::HTTP_10 => has_token(&parts.headers, "keep-alive"),
        _ => !has_token(&parts.headers, "close"),
    }
}

/// Whether a `Connection` header of `headers` holds `token` (ASCII case ignored).
pub(crate) fn has_token(headers: &http::HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A request whose answer is not ready when [`crate::handle::handle`] returns (its body is still to be
/// read, or its handler runs on the blocking pool), from then until the answer is: taken
/// before `handle` returns, since hyper may read the body from the socket before it first
/// polls the answer, and those bytes are not the head of another request.
pub(crate) struct InFlight(Arc<ConnCtx>);

impl InFlight {
    pub(crate) fn start(ctx: &Arc<ConnCtx>) -> Self {
        ctx.state.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(ctx.clone())
    }

    pub(crate) fn ctx(&self) -> &ConnCtx {
        &self.0
    }

    pub(crate) fn arc(&self) -> &Arc<ConnCtx> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.state.in_flight.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;

    #[test]
    fn the_buffers_noted_are_the_last_read_into_and_written_from() {
        let state = ConnState::new();
        assert_eq!(state.buffers(), (0, 0), "none before the first read");
        let (read, write) = ([0u8; 16], [0u8; 16]);
        state.read_into(read.as_ptr());
        state.wrote_from(write[4..].as_ptr());
        assert_eq!(
            state.buffers(),
            (read.as_ptr().addr(), write.as_ptr().addr() + 4)
        );
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
