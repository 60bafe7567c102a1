//! ABI 1.1 streams: deferred answers (`defer`, `stream_*`) and streamed request bodies
//! (`body_*`), between a plugin (any thread) and the worker (its runtime).
//!
//! A registry maps never-reused handles to live streams and bodies; a handle that is not
//! (or no longer) in it answers `BATON_E_CLOSED`, so a stale handle is harmless. Each
//! stream and body is a bounded buffer behind its own mutex:
//!
//! - a **stream** is written by the plugin and read by the worker's [`StreamReceiver`]
//!   (the response body). A write that does not fit the buffer (`http.stream_buffer_bytes`)
//!   is refused with `BATON_E_WOULD_BLOCK`, or waits with `WRITE_BLOCK`; `stream_on_writable`
//!   is called when the receiver has taken data (room) or the stream ended. The receiver
//!   dropped (the connection ended: the client is gone) ends the stream: the plugin then
//!   sees `BATON_E_CLOSED` and `stream_is_open` 0 (cancellation).
//! - a **body** is written by the worker's [`BodyFeed`] (the request body as it arrives,
//!   only while the buffer has room, so memory stays bounded) and read by the plugin with
//!   `body_read`; its limit is the route's or the configured one.
//!
//! Plugin callbacks (`on_writable`, `on_readable`) are only ever called by the worker's
//! side (a poll or a drop, on a host thread) and never with a lock held, so a callback may
//! call back into any of these functions. Blocking calls (`WRITE_BLOCK`) are refused on
//! the host's own threads: inline handlers and callbacks ([`on_host_thread`]).
//!
//! An entry leaves the registry when its stream is finished, failed, ended by the host, or
//! its receiver dropped; a body when its [`BodyStream`] is dropped (the response is done).
//! Nothing here outlives its connection, and [`live`] counts what is left.

use baton_plugin::abi::{
    BATON_E_CLOSED, BATON_E_INVALID, BATON_E_STATE, BATON_E_TOO_LARGE, BATON_E_WOULD_BLOCK,
    BATON_OK, BatonHandle, BatonResponse, BatonStr, NotifyFn, WRITE_BLOCK,
};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, LazyLock, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

/// Writes the receiver has not taken yet are joined into chunks of up to this many bytes
/// (16 KiB is HTTP/2's default frame size), and a receiver may ask to be woken only once
/// this many are buffered ([`StreamReceiver::poll_chunk`]'s `at_least`): a plugin writing a
/// line at a time goes out in full frames, not a frame per write. HTTP/2 clients count
/// small DATA frames against a budget; Rust's `h2` (0.4.20 on) closes the connection with
/// `ENHANCE_YOUR_CALM` once a slow reader holds too many.
pub const COALESCE_BYTES: usize = 16 * 1024;

/// The next handle; never reused within the process.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Live streams and bodies by handle, in shards by handle so that the writers of
/// different streams (on different threads) rarely meet on one lock.
static REGISTRY: LazyLock<[Mutex<HashMap<BatonHandle, Entry>>; SHARDS]> =
    LazyLock::new(|| std::array::from_fn(|_| Mutex::new(HashMap::new())));
const SHARDS: usize = 16;

#[derive(Clone)]
enum Entry {
    Stream(Arc<Stream>),
    Body(Arc<Body>),
}

/// The shard that holds `handle`.
fn registry(handle: BatonHandle) -> MutexGuard<'static, HashMap<BatonHandle, Entry>> {
    lock(&REGISTRY[(handle % SHARDS as u64) as usize])
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn stream(handle: BatonHandle) -> Option<Arc<Stream>> {
    match registry(handle).get(&handle) {
        Some(Entry::Stream(s)) => Some(s.clone()),
        _ => None,
    }
}

fn body(handle: BatonHandle) -> Option<Arc<Body>> {
    match registry(handle).get(&handle) {
        Some(Entry::Body(b)) => Some(b.clone()),
        _ => None,
    }
}

/// Streams and bodies in the registry now (for tests and leak checks).
pub fn live() -> usize {
    REGISTRY.iter().map(|shard| lock(shard).len()).sum()
}

/// The handles of the open-ended streams open now: what a drain ends early. A stream
/// is open-ended once its head is out without a `Content-Length` (server-sent events, a
/// feed) and no request body is still arriving for it. The others are transfers, which
/// ending would cut short (a sized body, an upload, an answer not begun): like any
/// request in flight they get until `drain_timeout`.
pub fn open_streams() -> Vec<BatonHandle> {
    let mut open = Vec::new();
    for shard in REGISTRY.iter() {
        open.extend(lock(shard).iter().filter_map(|(h, e)| match e {
            Entry::Stream(s) if s.state().open_ended() => Some(*h),
            _ => None,
        }));
    }
    open
}

/// Ends a stream cleanly on the host's behalf (the drain): what the plugin wrote is sent,
/// then the body ends; the plugin's further calls answer `BATON_E_CLOSED`. False if the
/// stream had already ended.
pub fn end(handle: BatonHandle) -> bool {
    let Some(s) = stream(handle) else {
        return false;
    };
    let ended = s.end_with(End::Ended);
    unregister(handle);
    ended
}

/// Fails a stream on the host's behalf (its handler failed after handing it off).
pub(crate) fn fail(handle: BatonHandle, message: &str) {
    if let Some(s) = stream(handle) {
        s.end_with(End::Failed(message.to_owned()));
        unregister(handle);
    }
}

fn unregister(handle: BatonHandle) {
    // Dropped outside the registry's lock: a stream's body closes on drop.
    let removed = registry(handle).remove(&handle);
    drop(removed);
}

thread_local! {
    /// This thread is running plugin code on the host's behalf (an inline handler, a
    /// callback): blocking calls are refused here.
    static HOST_THREAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (which calls plugin code) marked as the host's own thread, on which the
/// plugin may not block (`WRITE_BLOCK` is refused). The blocking pool and the plugin's own
/// threads are not marked. (`tokio::runtime::Handle::try_current` cannot tell: it is set
/// on the blocking pool too, where blocking is what the pool is for.)
pub fn on_host_thread<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            HOST_THREAD.with(|h| h.set(self.0));
        }
    }
    let _reset = Reset(HOST_THREAD.with(|h| h.replace(true)));
    f()
}

fn may_block() -> bool {
    !HOST_THREAD.with(Cell::get)
}

/// A plugin's `notify(user, handle)` registration.
struct Callback {
    notify: NotifyFn,
    user: *mut c_void,
}

// SAFETY: the ABI lets the host call a registered callback with its `user` pointer on any
// of its threads; the pointer is only passed back, never dereferenced by the host.
unsafe impl Send for Callback {}

impl Callback {
    /// Calls it, marked as a host thread; never with a lock of this module held.
    fn fire(self, handle: BatonHandle) {
        // SAFETY: the plugin registered `notify` with `user` to be called once with this
        // handle; this is that one call.
        on_host_thread(|| unsafe { (self.notify)(self.user, handle) });
    }
}

// ---------------------------------------------------------------------------------------
// Streams (deferred answers)

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// The plugin finished it.
    Finished,
    /// The plugin failed it.
    Failed(String),
    /// The host ended it cleanly (the drain).
    Ended,
    /// The receiver is gone: the client went away or the connection ended.
    Gone,
}

struct Stream {
    handle: BatonHandle,
    capacity: usize,
    state: Mutex<StreamState>,
    /// Blocking writers wait here for room.
    room: Condvar,
}

struct StreamState {
    status: StatusCode,
    headers: HeaderMap,
    /// The plugin sent the head (or wrote, or finished).
    head_sent: bool,
    /// The receiver took the head; with a `Content-Length` in it.
    head_out: Option<Length>,
    /// Written and not yet taken; small writes are joined (see [`COALESCE_BYTES`]).
    chunks: VecDeque<BytesMut>,
    buffered: usize,
    end: Option<End>,
    /// The receiver's task, woken on a head, the end, or data once `wake_at` bytes are
    /// buffered.
    waker: Option<Waker>,
    wake_at: usize,
    /// A writer found no room since the receiver last took a chunk.
    no_room: bool,
    on_writable: Option<Callback>,
    /// The request body of the same request, closed with the stream.
    body: Option<BodyStream>,
}

/// Whether a head that went out declared the body's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Length {
    Declared,
    Open,
}

impl StreamState {
    /// See [`open_streams`].
    fn open_ended(&self) -> bool {
        self.end.is_none()
            && self.head_out == Some(Length::Open)
            && !self.body.as_ref().is_some_and(BodyStream::arriving)
    }

    fn fits(&self, len: usize, capacity: usize) -> bool {
        self.buffered == 0 || self.buffered + len <= capacity
    }

    fn wake(&mut self) {
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }
}

impl Stream {
    fn state(&self) -> MutexGuard<'_, StreamState> {
        lock(&self.state)
    }

    /// Ends the stream if it is not already; wakes everyone waiting on it.
    fn end_with(&self, end: End) -> bool {
        let (body, ended) = {
            let mut st = self.state();
            if st.end.is_some() {
                return false;
            }
            st.end = Some(end);
            st.wake();
            (st.body.take(), true)
        };
        self.room.notify_all();
        drop(body);
        ended
    }
}

/// What a deferred answer's head is.
#[derive(Debug)]
pub enum Head {
    /// Send this status and these headers; the body follows.
    Send {
        status: StatusCode,
        headers: HeaderMap,
    },
    /// The plugin failed the stream before its head: answer 500 and log this.
    Failed(String),
}

/// A streamed answer that failed after its head: the connection (HTTP/1) or the HTTP/2
/// stream must be cut off, not ended as if complete.
#[derive(Debug, thiserror::Error)]
#[error("the plugin failed the stream: {0}")]
pub struct StreamError(pub String);

/// The worker's side of a deferred answer: its head, then its body. Dropping it ends the
/// stream (the plugin sees `BATON_E_CLOSED`) and takes it out of the registry.
pub struct StreamReceiver {
    stream: Arc<Stream>,
}

impl std::fmt::Debug for StreamReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReceiver")
            .field("handle", &self.stream.handle)
            .finish()
    }
}

impl StreamReceiver {
    /// The stream's handle (what the plugin got from `defer`).
    pub fn handle(&self) -> BatonHandle {
        self.stream.handle
    }

    /// Ready once the plugin sent the head (or wrote, finished or failed), or the host
    /// ended the stream.
    pub fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Head> {
        let (out, due) = {
            let mut st = self.stream.state();
            let due = take_writable(&mut st, self.stream.capacity);
            let out = match (&st.end, st.head_sent) {
                (Some(End::Failed(message)), false) => Poll::Ready(Head::Failed(message.clone())),
                (Some(_), _) | (None, true) => {
                    st.head_out = Some(if st.headers.contains_key(http::header::CONTENT_LENGTH) {
                        Length::Declared
                    } else {
                        Length::Open
                    });
                    Poll::Ready(Head::Send {
                        status: st.status,
                        headers: std::mem::take(&mut st.headers),
                    })
                }
                (None, false) => {
                    store_waker(&mut st.waker, cx);
                    Poll::Pending
                }
            };
            (out, due)
        };
        if let Some(cb) = due {
            cb.fire(self.stream.handle);
        }
        out
    }

    /// The next body chunk: `None` at the end (finished by the plugin or ended by the
    /// host), an error if the plugin failed the stream.
    ///
    /// A chunk is taken only once `at_least` bytes are buffered (at most the buffer's
    /// capacity), or the stream ended, or a writer found no room; until then the task is
    /// woken only when one of these happens. `1` takes whatever there is.
    pub fn poll_chunk(
        &mut self,
        cx: &mut Context<'_>,
        at_least: usize,
    ) -> Poll<Option<Result<Bytes, StreamError>>> {
        let at_least = at_least.clamp(1, self.stream.capacity);
        let (out, due, took) = {
            let mut st = self.stream.state();
            let chunk = if st.buffered >= at_least || st.no_room || st.end.is_some() {
                st.no_room = false;
                st.chunks.pop_front().map(BytesMut::freeze)
            } else {
                None
            };
            let took = chunk.is_some();
            if let Some(c) = &chunk {
                st.buffered -= c.len();
            }
            let due = take_writable(&mut st, self.stream.capacity);
            let out = match (chunk, &st.end) {
                (Some(c), _) => Poll::Ready(Some(Ok(c))),
                (None, Some(End::Failed(message))) => {
                    Poll::Ready(Some(Err(StreamError(message.clone()))))
                }
                (None, Some(_)) => Poll::Ready(None),
                (None, None) => {
                    st.wake_at = at_least;
                    store_waker(&mut st.waker, cx);
                    Poll::Pending
                }
            };
            (out, due, took)
        };
        if took {
            self.stream.room.notify_all();
        }
        if let Some(cb) = due {
            cb.fire(self.stream.handle);
        }
        out
    }

    /// Whether the body has ended and nothing is left to take.
    pub fn is_end(&self) -> bool {
        let st = self.stream.state();
        st.chunks.is_empty() && matches!(st.end, Some(End::Finished | End::Ended))
    }
}

/// The `on_writable` callback, if it is due: the buffer has room, or the stream ended.
fn take_writable(st: &mut StreamState, capacity: usize) -> Option<Callback> {
    if st.on_writable.is_some() && (st.end.is_some() || st.buffered < capacity) {
        st.on_writable.take()
    } else {
        None
    }
}

fn store_waker(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

impl Drop for StreamReceiver {
    fn drop(&mut self) {
        self.stream.end_with(End::Gone);
        let cb = {
            let mut st = self.stream.state();
            st.chunks.clear();
            st.buffered = 0;
            st.on_writable.take()
        };
        unregister(self.stream.handle);
        if let Some(cb) = cb {
            cb.fire(self.stream.handle);
        }
    }
}

/// Registers a new stream with `capacity` bytes of buffer, its head begun with `status`
/// and `headers` and its buffer holding `body` (what was written before `defer`).
pub(crate) fn new_stream(
    capacity: usize,
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    request_body: Option<BodyStream>,
) -> StreamReceiver {
    let handle = NEXT.fetch_add(1, Ordering::Relaxed);
    let mut chunks = VecDeque::new();
    let buffered = body.len();
    if !body.is_empty() {
        chunks.push_back(BytesMut::from(Bytes::from(body)));
    }
    let stream = Arc::new(Stream {
        handle,
        capacity: capacity.max(1),
        state: Mutex::new(StreamState {
            status,
            headers,
            head_sent: false,
            head_out: None,
            chunks,
            buffered,
            end: None,
            waker: None,
            wake_at: 1,
            no_room: false,
            on_writable: None,
            body: request_body,
        }),
        room: Condvar::new(),
    });
    registry(handle).insert(handle, Entry::Stream(stream.clone()));
    StreamReceiver { stream }
}

/// Reads a view a plugin passed in.
///
/// # Safety
/// The view must be valid for the duration of the call (the ABI's rule).
unsafe fn view<'a>(s: BatonStr) -> &'a [u8] {
    // SAFETY: guaranteed by the caller.
    unsafe { s.as_bytes() }
}

pub(crate) unsafe extern "C" fn host_defer(response: *mut BatonResponse) -> BatonHandle {
    // SAFETY: `response` is the Builder the host passed to `handle`, which is running.
    let b = unsafe { &mut *response.cast::<crate::Builder>() };
    b.defer()
}

pub(crate) unsafe extern "C" fn host_set_status(s: BatonHandle, status: u16) -> i64 {
    let Some(s) = stream(s) else {
        return BATON_E_CLOSED;
    };
    let mut st = s.state();
    if st.end.is_some() {
        return BATON_E_CLOSED;
    }
    if st.head_sent {
        return BATON_E_STATE;
    }
    match StatusCode::from_u16(status) {
        Ok(code) => {
            st.status = code;
            BATON_OK
        }
        Err(_) => BATON_E_INVALID,
    }
}

pub(crate) unsafe extern "C" fn host_add_header(s: BatonHandle, n: BatonStr, v: BatonStr) -> i64 {
    // SAFETY: the views are valid for this call (the ABI).
    let (name, value) = unsafe { (view(n), view(v)) };
    let Some(s) = stream(s) else {
        return BATON_E_CLOSED;
    };
    let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
    else {
        return BATON_E_INVALID;
    };
    let mut st = s.state();
    if st.end.is_some() {
        return BATON_E_CLOSED;
    }
    if st.head_sent {
        return BATON_E_STATE;
    }
    st.headers.append(name, value);
    BATON_OK
}

pub(crate) unsafe extern "C" fn host_send_head(s: BatonHandle) -> i64 {
    let Some(s) = stream(s) else {
        return BATON_E_CLOSED;
    };
    let mut st = s.state();
    if st.end.is_some() {
        return BATON_E_CLOSED;
    }
    if !st.head_sent {
        st.head_sent = true;
        st.wake();
    }
    BATON_OK
}

pub(crate) unsafe extern "C" fn host_write(s: BatonHandle, d: BatonStr, f: u32) -> i64 {
    // SAFETY: the view is valid for this call (the ABI).
    let data = unsafe { view(d) };
    if f & !WRITE_BLOCK != 0 {
        return BATON_E_INVALID;
    }
    let block = f & WRITE_BLOCK != 0;
    if block && !may_block() {
        return BATON_E_INVALID;
    }
    let Some(s) = stream(s) else {
        return BATON_E_CLOSED;
    };
    let mut st = s.state();
    loop {
        if st.end.is_some() {
            return BATON_E_CLOSED;
        }
        if st.fits(data.len(), s.capacity) {
            break;
        }
        // No room: whatever is buffered is all the receiver gets for now.
        st.no_room = true;
        st.wake();
        if !block {
            return BATON_E_WOULD_BLOCK;
        }
        st = s.room.wait(st).unwrap_or_else(PoisonError::into_inner);
    }
    st.head_sent = true;
    if !data.is_empty() {
        match st.chunks.back_mut() {
            Some(last) if last.len() + data.len() <= COALESCE_BYTES => {
                last.extend_from_slice(data);
            }
            _ => st.chunks.push_back(BytesMut::from(data)),
        }
        st.buffered += data.len();
    }
    if st.buffered >= st.wake_at {
        st.wake();
    }
    data.len() as i64
}

pub(crate) unsafe extern "C" fn host_on_writable(
    s: BatonHandle,
    n: NotifyFn,
    u: *mut c_void,
) -> i64 {
    let Some(s) = stream(s) else {
        return BATON_E_CLOSED;
    };
    let mut st = s.state();
    if st.end.is_some() {
        return BATON_E_CLOSED;
    }
    if st.on_writable.is_some() {
        return BATON_E_STATE;
    }
    st.on_writable = Some(Callback { notify: n, user: u });
    // Room already: the receiver's next poll calls it, from a host thread.
    if st.buffered < s.capacity {
        st.wake();
    }
    BATON_OK
}

pub(crate) unsafe extern "C" fn host_finish(s: BatonHandle) -> i64 {
    let Some(stream) = stream(s) else {
        return BATON_E_CLOSED;
    };
    {
        let mut st = stream.state();
        if st.end.is_none() {
            st.head_sent = true;
        }
    }
    let ended = stream.end_with(End::Finished);
    unregister(s);
    if ended { BATON_OK } else { BATON_E_CLOSED }
}

pub(crate) unsafe extern "C" fn host_fail(s: BatonHandle, m: BatonStr) -> i64 {
    // SAFETY: the view is valid for this call (the ABI).
    let message = String::from_utf8_lossy(unsafe { view(m) }).into_owned();
    let Some(stream) = stream(s) else {
        return BATON_E_CLOSED;
    };
    let ended = stream.end_with(End::Failed(message));
    unregister(s);
    if ended { BATON_OK } else { BATON_E_CLOSED }
}

pub(crate) unsafe extern "C" fn host_is_open(s: BatonHandle) -> i32 {
    match stream(s) {
        Some(s) if s.state().end.is_none() => 1,
        _ => 0,
    }
}

// ---------------------------------------------------------------------------------------
// Streamed request bodies

/// How a request body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyEnd {
    Complete,
    TooLarge,
    Error(String),
}

struct Body {
    handle: BatonHandle,
    capacity: usize,
    limit: u64,
    state: Mutex<BodyState>,
    /// Blocking readers wait here for data.
    data: Condvar,
}

struct BodyState {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    received: u64,
    end: Option<BodyEnd>,
    /// The response is done: reads answer `BATON_E_CLOSED`, the feed stops.
    closed: bool,
    /// The feed's task, woken when there is room, a callback to call, or the close.
    waker: Option<Waker>,
    on_readable: Option<Callback>,
}

impl BodyState {
    fn readable(&self) -> bool {
        !self.chunks.is_empty() || self.end.is_some() || self.closed
    }
}

/// The worker's side of a streamed request body: it feeds the body in as it arrives,
/// while there is room. Its task also calls the plugin's `on_readable` callbacks.
pub struct BodyFeed {
    body: Arc<Body>,
}

/// The plugin's side of a streamed request body, held for as long as the answer is not
/// done: dropping it takes the body out of the registry and stops its feed.
pub struct BodyStream {
    body: Arc<Body>,
}

impl std::fmt::Debug for BodyStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyStream")
            .field("handle", &self.body.handle)
            .finish()
    }
}

impl std::fmt::Debug for BodyFeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyFeed")
            .field("handle", &self.body.handle)
            .finish()
    }
}

/// A new streamed request body: at most `limit` bytes in all, at most `capacity` buffered.
pub fn body_stream(limit: u64, capacity: usize) -> (BodyFeed, BodyStream) {
    let handle = NEXT.fetch_add(1, Ordering::Relaxed);
    let body = Arc::new(Body {
        handle,
        capacity: capacity.max(1),
        limit,
        state: Mutex::new(BodyState {
            chunks: VecDeque::new(),
            buffered: 0,
            received: 0,
            end: None,
            closed: false,
            waker: None,
            on_readable: None,
        }),
        data: Condvar::new(),
    });
    registry(handle).insert(handle, Entry::Body(body.clone()));
    (BodyFeed { body: body.clone() }, BodyStream { body })
}

impl BodyStream {
    /// The handle the plugin reads with (`request.body_stream`).
    pub fn handle(&self) -> BatonHandle {
        self.body.handle
    }

    /// The body is still arriving.
    fn arriving(&self) -> bool {
        let st = lock(&self.body.state);
        st.end.is_none() && !st.closed
    }
}

impl Drop for BodyStream {
    fn drop(&mut self) {
        {
            let mut st = lock(&self.body.state);
            st.closed = true;
            st.chunks.clear();
            st.buffered = 0;
            if let Some(w) = st.waker.take() {
                w.wake();
            }
        }
        self.body.data.notify_all();
        unregister(self.body.handle);
    }
}

/// What a [`BodyFeed`] may do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Push the next chunk.
    Free,
    /// The answer is done: stop reading the body.
    Closed,
}

/// The body is past its limit: stop reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge;

/// Tells whether a streamed body went past its limit, for the worker to answer 413 when
/// a handler fails because of it.
pub struct BodyWatch {
    body: Arc<Body>,
}

impl std::fmt::Debug for BodyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyWatch")
            .field("handle", &self.body.handle)
            .finish()
    }
}

impl BodyWatch {
    /// The body went past its limit (the plugin was told `BATON_E_TOO_LARGE`).
    pub fn too_large(&self) -> bool {
        lock(&self.body.state).end == Some(BodyEnd::TooLarge)
    }
}

impl BodyFeed {
    /// The body's handle.
    pub fn handle(&self) -> BatonHandle {
        self.body.handle
    }

    /// A watch on whether the body went past its limit.
    pub fn watch(&self) -> BodyWatch {
        BodyWatch {
            body: self.body.clone(),
        }
    }

    /// Calls a due `on_readable` callback, then says whether there is room for more (or
    /// the answer is done). Always keeps `cx`'s waker, so that a callback registered or a
    /// close later wakes the feed's task.
    pub fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<Room> {
        let (out, due) = {
            let mut st = lock(&self.body.state);
            store_waker(&mut st.waker, cx);
            let due = if st.readable() {
                st.on_readable.take()
            } else {
                None
            };
            let out = if st.closed {
                Poll::Ready(Room::Closed)
            } else if st.buffered < self.body.capacity && st.end.is_none() {
                Poll::Ready(Room::Free)
            } else {
                Poll::Pending
            };
            (out, due)
        };
        if let Some(cb) = due {
            cb.fire(self.body.handle);
        }
        out
    }

    /// Adds a chunk that arrived; past the limit the body ends as too large.
    pub fn push(&mut self, data: Bytes) -> Result<(), TooLarge> {
        let (out, due) = {
            let mut st = lock(&self.body.state);
            if st.end.is_some() || st.closed {
                return Ok(());
            }
            st.received += data.len() as u64;
            let out = if st.received > self.body.limit {
                st.end = Some(BodyEnd::TooLarge);
                st.chunks.clear();
                st.buffered = 0;
                Err(TooLarge)
            } else {
                if !data.is_empty() {
                    st.buffered += data.len();
                    st.chunks.push_back(data);
                }
                Ok(())
            };
            (out, st.on_readable.take())
        };
        self.body.data.notify_all();
        if let Some(cb) = due {
            cb.fire(self.body.handle);
        }
        out
    }

    /// The body arrived whole.
    pub fn finish(&mut self) {
        self.end_with(BodyEnd::Complete);
    }

    /// The body could not be read (the client went away, a bad chunk).
    pub fn error(&mut self, why: String) {
        self.end_with(BodyEnd::Error(why));
    }

    fn end_with(&mut self, end: BodyEnd) {
        let due = {
            let mut st = lock(&self.body.state);
            if st.end.is_some() {
                return;
            }
            st.end = Some(end);
            st.on_readable.take()
        };
        self.body.data.notify_all();
        if let Some(cb) = due {
            cb.fire(self.body.handle);
        }
    }
}

impl Drop for BodyFeed {
    fn drop(&mut self) {
        self.end_with(BodyEnd::Error("the request body was cut off".into()));
        let cb = lock(&self.body.state).on_readable.take();
        if let Some(cb) = cb {
            cb.fire(self.body.handle);
        }
    }
}

pub(crate) unsafe extern "C" fn host_body_read(
    b: BatonHandle,
    buf: *mut u8,
    cap: usize,
    f: u32,
) -> i64 {
    if buf.is_null() || cap == 0 || f & !WRITE_BLOCK != 0 {
        return BATON_E_INVALID;
    }
    let block = f & WRITE_BLOCK != 0;
    if block && !may_block() {
        return BATON_E_INVALID;
    }
    let Some(body) = body(b) else {
        return BATON_E_CLOSED;
    };
    let mut st = lock(&body.state);
    loop {
        if st.closed {
            return BATON_E_CLOSED;
        }
        if let Some(front) = st.chunks.front_mut() {
            let n = front.len().min(cap);
            let taken = front.split_to(n);
            if front.is_empty() {
                st.chunks.pop_front();
            }
            let was_full = st.buffered >= body.capacity;
            st.buffered -= n;
            if was_full
                && st.buffered < body.capacity
                && let Some(w) = st.waker.take()
            {
                w.wake();
            }
            drop(st);
            // SAFETY: the plugin passed `cap` writable bytes at `buf` for this call; `n`
            // is at most `cap`, and `taken` is host memory, so the two cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(taken.as_ptr(), buf, n) };
            return n as i64;
        }
        match &st.end {
            Some(BodyEnd::Complete) => return 0,
            Some(BodyEnd::TooLarge) => return BATON_E_TOO_LARGE,
            Some(BodyEnd::Error(_)) => return BATON_E_CLOSED,
            None if !block => return BATON_E_WOULD_BLOCK,
            None => st = body.data.wait(st).unwrap_or_else(PoisonError::into_inner),
        }
    }
}

pub(crate) unsafe extern "C" fn host_body_on_readable(
    b: BatonHandle,
    n: NotifyFn,
    u: *mut c_void,
) -> i64 {
    let Some(body) = body(b) else {
        return BATON_E_CLOSED;
    };
    let mut st = lock(&body.state);
    if st.closed {
        return BATON_E_CLOSED;
    }
    if st.on_readable.is_some() {
        return BATON_E_STATE;
    }
    st.on_readable = Some(Callback { notify: n, user: u });
    // Readable already: the feed's task calls it, from a host thread.
    if st.readable()
        && let Some(w) = st.waker.take()
    {
        w.wake();
    }
    BATON_OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;
    use std::time::Duration;

    /// A waker that counts its wake-ups.
    #[derive(Default)]
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn receiver(capacity: usize) -> StreamReceiver {
        new_stream(capacity, StatusCode::OK, HeaderMap::new(), Vec::new(), None)
    }

    fn write(h: BatonHandle, data: &[u8], flags: u32) -> i64 {
        // SAFETY: the view points at `data`, alive for the call.
        unsafe { host_write(h, BatonStr::new(data), flags) }
    }

    fn poll_chunk(rx: &mut StreamReceiver) -> Poll<Option<Result<Bytes, StreamError>>> {
        let waker = Waker::from(Arc::new(Count::default()));
        rx.poll_chunk(&mut Context::from_waker(&waker), 1)
    }

    static CALLED: AtomicUsize = AtomicUsize::new(0);
    unsafe extern "C" fn count_call(user: *mut c_void, _handle: BatonHandle) {
        // SAFETY: the tests pass a pointer to a live AtomicUsize.
        let n = unsafe { &*user.cast::<AtomicUsize>() };
        n.fetch_add(1, Ordering::SeqCst);
        CALLED.fetch_add(1, Ordering::SeqCst);
    }

    #[test]
    fn a_full_buffer_says_would_block_and_room_calls_on_writable_once() {
        let mut rx = receiver(8);
        let h = rx.handle();
        assert_eq!(write(h, b"12345", 0), 5);
        assert_eq!(write(h, b"6789", 0), BATON_E_WOULD_BLOCK);
        let called = AtomicUsize::new(0);
        let user = (&called as *const AtomicUsize).cast_mut().cast();
        // SAFETY: `count_call` matches NotifyFn; `called` outlives the stream.
        assert_eq!(unsafe { host_on_writable(h, count_call, user) }, BATON_OK);
        // SAFETY: as above.
        let rc = unsafe { host_on_writable(h, count_call, user) };
        assert_eq!(rc, BATON_E_STATE);
        assert_eq!(
            called.load(Ordering::SeqCst),
            0,
            "not while the buffer is full"
        );
        match poll_chunk(&mut rx) {
            Poll::Ready(Some(Ok(c))) => assert_eq!(&c[..], b"12345"),
            other => panic!("{other:?}"),
        }
        assert_eq!(called.load(Ordering::SeqCst), 1);
        assert_eq!(write(h, b"6789", 0), 4);
        let _ = poll_chunk(&mut rx);
        assert_eq!(called.load(Ordering::SeqCst), 1, "once per registration");
    }

    #[test]
    fn a_write_larger_than_the_buffer_goes_whole_into_an_empty_one() {
        let mut rx = receiver(4);
        assert_eq!(write(rx.handle(), b"0123456789", 0), 10);
        assert_eq!(write(rx.handle(), b"x", 0), BATON_E_WOULD_BLOCK);
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(Some(Ok(c))) if c.len() == 10));
    }

    #[test]
    fn small_writes_not_yet_taken_are_joined_up_to_a_frame() {
        let mut rx = receiver(1 << 20);
        let h = rx.handle();
        let line = b"line 12345\n";
        let per_chunk = COALESCE_BYTES / line.len();
        for _ in 0..per_chunk + 1 {
            assert_eq!(write(h, line, 0), line.len() as i64);
        }
        let big = vec![b'x'; COALESCE_BYTES];
        assert_eq!(write(h, &big, 0), big.len() as i64);
        let mut taken = Vec::new();
        while let Poll::Ready(Some(Ok(c))) = poll_chunk(&mut rx) {
            taken.push(c);
        }
        let sizes: Vec<usize> = taken.iter().map(|c| c.len()).collect();
        // One full chunk of lines, the line that did not fit, then the big write alone.
        assert_eq!(sizes, [per_chunk * line.len(), line.len(), COALESCE_BYTES]);
        assert!(
            taken[..2]
                .iter()
                .all(|c| c.chunks(line.len()).all(|l| l == line))
        );

        // What the receiver already took is never added to: the next write is new.
        assert_eq!(write(h, b"a", 0), 1);
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(Some(Ok(c))) if &c[..] == b"a"));
        assert_eq!(write(h, b"b", 0), 1);
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(Some(Ok(c))) if &c[..] == b"b"));
    }

    #[test]
    fn a_receiver_asking_for_at_least_n_bytes_is_woken_once_they_are_there() {
        let mut rx = receiver(100);
        let h = rx.handle();
        let woken = Arc::new(Count::default());
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let woken = || woken.0.load(Ordering::SeqCst);
        assert!(rx.poll_chunk(&mut cx, 10).is_pending());
        assert_eq!(write(h, b"12345", 0), 5);
        assert_eq!(woken(), 0, "not for 5 of 10 bytes");
        assert!(rx.poll_chunk(&mut cx, 10).is_pending());
        assert_eq!(write(h, b"67890", 0), 5);
        assert_eq!(woken(), 1);
        let got = rx.poll_chunk(&mut cx, 10);
        assert!(matches!(got, Poll::Ready(Some(Ok(c))) if &c[..] == b"1234567890"));

        // Asking for more than the buffer holds is asking for a full buffer, and a writer
        // that finds no room gets the receiver to take what there is.
        assert!(rx.poll_chunk(&mut cx, 1 << 20).is_pending());
        assert_eq!(write(h, &[b'x'; 95], 0), 95);
        assert_eq!(woken(), 1);
        assert_eq!(write(h, &[b'y'; 10], 0), BATON_E_WOULD_BLOCK);
        assert_eq!(woken(), 2);
        let got = rx.poll_chunk(&mut cx, 1 << 20);
        assert!(matches!(got, Poll::Ready(Some(Ok(c))) if c.len() == 95));
        assert!(rx.poll_chunk(&mut cx, 1 << 20).is_pending());
        assert_eq!(write(h, &[b'y'; 100], 0), 100);
        assert_eq!(woken(), 3, "a full buffer");
        assert!(matches!(
            rx.poll_chunk(&mut cx, 1 << 20),
            Poll::Ready(Some(Ok(_)))
        ));

        // The end is taken at once, with what is left.
        assert!(rx.poll_chunk(&mut cx, 50).is_pending());
        assert_eq!(write(h, b"tail", 0), 4);
        assert_eq!(woken(), 3);
        // SAFETY: a live handle.
        assert_eq!(unsafe { host_finish(h) }, BATON_OK);
        assert_eq!(woken(), 4);
        let got = rx.poll_chunk(&mut cx, 50);
        assert!(matches!(got, Poll::Ready(Some(Ok(c))) if &c[..] == b"tail"));
        assert!(matches!(rx.poll_chunk(&mut cx, 50), Poll::Ready(None)));
    }

    #[test]
    fn the_head_waits_for_the_plugin_and_carries_what_it_set() {
        let mut rx = receiver(16);
        let h = rx.handle();
        let waker = Waker::from(Arc::new(Count::default()));
        let mut cx = Context::from_waker(&waker);
        assert!(rx.poll_head(&mut cx).is_pending());
        // SAFETY: plain values and views of statics.
        unsafe {
            assert_eq!(host_set_status(h, 201), BATON_OK);
            assert_eq!(host_set_status(h, 42), BATON_E_INVALID);
            assert_eq!(
                host_add_header(h, BatonStr::new(b"x-a"), BatonStr::new(b"1")),
                BATON_OK
            );
            assert_eq!(
                host_add_header(h, BatonStr::new(b"bad name"), BatonStr::new(b"1")),
                BATON_E_INVALID
            );
            assert_eq!(host_send_head(h), BATON_OK);
            assert_eq!(host_set_status(h, 404), BATON_E_STATE);
        }
        match rx.poll_head(&mut cx) {
            Poll::Ready(Head::Send { status, headers }) => {
                assert_eq!(status, StatusCode::CREATED);
                assert_eq!(headers["x-a"], "1");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fail_before_the_head_is_a_500_and_after_it_an_error() {
        let mut rx = receiver(16);
        let waker = Waker::from(Arc::new(Count::default()));
        let mut cx = Context::from_waker(&waker);
        // SAFETY: a view of a static.
        let rc = unsafe { host_fail(rx.handle(), BatonStr::new(b"no")) };
        assert_eq!(rc, BATON_OK);
        assert!(matches!(rx.poll_head(&mut cx), Poll::Ready(Head::Failed(m)) if m == "no"));

        let mut rx = receiver(16);
        assert_eq!(write(rx.handle(), b"abc", 0), 3);
        assert!(matches!(
            rx.poll_head(&mut cx),
            Poll::Ready(Head::Send { .. })
        ));
        // SAFETY: as above.
        let rc = unsafe { host_fail(rx.handle(), BatonStr::new(b"late")) };
        assert_eq!(rc, BATON_OK);
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(Some(Ok(_)))));
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(Some(Err(_)))));
    }

    #[test]
    fn a_dropped_receiver_is_seen_as_cancellation_and_leaves_nothing() {
        let mut handles = Vec::new();
        for _ in 0..10_000 {
            let rx = receiver(64);
            let h = rx.handle();
            assert_eq!(write(h, b"data", 0), 4);
            // SAFETY: a plain handle.
            assert_eq!(unsafe { host_is_open(h) }, 1);
            drop(rx);
            handles.push(h);
        }
        for &h in &handles {
            // SAFETY: as above.
            assert_eq!(unsafe { host_is_open(h) }, 0);
            assert_eq!(write(h, b"more", 0), BATON_E_CLOSED);
            // SAFETY: as above.
            assert_eq!(unsafe { host_finish(h) }, BATON_E_CLOSED);
        }
        let open = open_streams();
        assert!(handles.iter().all(|h| !open.contains(h)));
    }

    #[test]
    fn a_finished_stream_leaves_the_registry_but_its_data_is_still_read() {
        let mut rx = receiver(64);
        let h = rx.handle();
        assert_eq!(write(h, b"last", 0), 4);
        // SAFETY: a plain handle.
        assert_eq!(unsafe { host_finish(h) }, BATON_OK);
        assert!(!open_streams().contains(&h));
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(Some(Ok(c))) if &c[..] == b"last"));
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(None)));
    }

    #[test]
    fn a_drain_ends_open_ended_streams_early_and_leaves_transfers() {
        let waker = Waker::from(Arc::new(Count::default()));
        let mut cx = Context::from_waker(&waker);
        let mut head_out = |headers: HeaderMap, body: Option<BodyStream>| {
            let mut rx = new_stream(64, StatusCode::OK, headers, Vec::new(), body);
            // SAFETY: a plain handle.
            assert_eq!(unsafe { host_send_head(rx.handle()) }, BATON_OK);
            assert!(matches!(
                rx.poll_head(&mut cx),
                Poll::Ready(Head::Send { .. })
            ));
            rx
        };
        // Not begun: a request in flight.
        let unsent = receiver(64);
        // A feed: open-ended.
        let feed = head_out(HeaderMap::new(), None);
        // A sized download.
        let mut sized = HeaderMap::new();
        sized.insert(http::header::CONTENT_LENGTH, HeaderValue::from_static("10"));
        let download = head_out(sized, None);
        // An upload still arriving, then whole.
        let (mut upload_feed, upload_body) = body_stream(1 << 20, 64);
        let upload = head_out(HeaderMap::new(), Some(upload_body));
        let open = open_streams();
        assert!(open.contains(&feed.handle()));
        for transfer in [&unsent, &download, &upload] {
            assert!(!open.contains(&transfer.handle()));
        }
        upload_feed.finish();
        assert!(open_streams().contains(&upload.handle()));
    }

    #[test]
    fn the_host_ends_a_stream_cleanly() {
        let mut rx = receiver(64);
        let h = rx.handle();
        assert_eq!(write(h, b"tick", 0), 4);
        assert!(end(h));
        assert!(!end(h));
        assert_eq!(write(h, b"tock", 0), BATON_E_CLOSED);
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(Some(Ok(_)))));
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(None)));
    }

    #[test]
    fn a_blocking_write_waits_for_room_off_the_host_threads_and_is_refused_on_them() {
        let mut rx = receiver(4);
        let h = rx.handle();
        assert_eq!(write(h, b"full", 0), 4);
        assert_eq!(
            on_host_thread(|| write(h, b"more", WRITE_BLOCK)),
            BATON_E_INVALID
        );
        let writer = std::thread::spawn(move || write(h, b"more", WRITE_BLOCK));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writer.is_finished(), "it waits while the buffer is full");
        assert!(matches!(poll_chunk(&mut rx), Poll::Ready(Some(Ok(_)))));
        assert_eq!(writer.join().unwrap(), 4);
        // A writer blocked when the client goes is released with CLOSED.
        let writer = std::thread::spawn(move || write(h, b"again", WRITE_BLOCK));
        std::thread::sleep(Duration::from_millis(50));
        drop(rx);
        assert_eq!(writer.join().unwrap(), BATON_E_CLOSED);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn the_blocking_pool_is_not_a_host_thread_but_has_a_runtime_handle() {
        // Why `Handle::try_current` cannot be the test for "may block".
        let (current, may) = tokio::task::spawn_blocking(|| {
            (tokio::runtime::Handle::try_current().is_ok(), may_block())
        })
        .await
        .unwrap();
        assert!(current);
        assert!(may);
    }

    fn read(h: BatonHandle, cap: usize, flags: u32) -> (i64, Vec<u8>) {
        let mut buf = vec![0u8; cap];
        // SAFETY: `buf` has `cap` writable bytes.
        let n = unsafe { host_body_read(h, buf.as_mut_ptr(), cap, flags) };
        buf.truncate(n.max(0) as usize);
        (n, buf)
    }

    fn poll_room(feed: &mut BodyFeed, wakes: &Arc<Count>) -> Poll<Room> {
        let waker = Waker::from(wakes.clone());
        feed.poll_room(&mut Context::from_waker(&waker))
    }

    #[test]
    fn a_body_is_fed_while_there_is_room_and_read_in_pieces() {
        let (mut feed, reader) = body_stream(1 << 20, 8);
        let h = reader.handle();
        let wakes = Arc::new(Count::default());
        assert_eq!(read(h, 4, 0).0, BATON_E_WOULD_BLOCK);
        assert_eq!(poll_room(&mut feed, &wakes), Poll::Ready(Room::Free));
        feed.push(Bytes::from_static(b"0123456789")).unwrap();
        assert!(poll_room(&mut feed, &wakes).is_pending(), "full");
        assert_eq!(read(h, 4, 0), (4, b"0123".to_vec()));
        assert_eq!(read(h, 4, 0), (4, b"4567".to_vec()));
        assert!(wakes.0.load(Ordering::SeqCst) >= 1, "room wakes the feed");
        assert_eq!(poll_room(&mut feed, &wakes), Poll::Ready(Room::Free));
        feed.finish();
        assert_eq!(read(h, 100, 0), (2, b"89".to_vec()));
        assert_eq!(read(h, 100, 0).0, 0, "the end");
        drop(reader);
        assert_eq!(read(h, 100, 0).0, BATON_E_CLOSED);
        assert_eq!(poll_room(&mut feed, &wakes), Poll::Ready(Room::Closed));
    }

    #[test]
    fn a_body_past_its_limit_is_too_large() {
        let (mut feed, reader) = body_stream(10, 64);
        feed.push(Bytes::from_static(b"0123456")).unwrap();
        let watch = feed.watch();
        assert!(!watch.too_large());
        assert_eq!(feed.push(Bytes::from_static(b"789ab")), Err(TooLarge));
        assert!(watch.too_large());
        assert_eq!(read(reader.handle(), 100, 0).0, BATON_E_TOO_LARGE);
    }

    #[test]
    fn a_blocking_read_waits_for_data_and_on_readable_fires_from_the_feed() {
        let (mut feed, reader) = body_stream(1 << 20, 64);
        let h = reader.handle();
        assert_eq!(
            on_host_thread(|| read(h, 4, WRITE_BLOCK).0),
            BATON_E_INVALID
        );
        let blocked = std::thread::spawn(move || read(h, 4, WRITE_BLOCK));
        let called = AtomicUsize::new(0);
        let user = (&called as *const AtomicUsize).cast_mut().cast();
        // SAFETY: `count_call` matches NotifyFn; `called` outlives the body.
        let rc = unsafe { host_body_on_readable(h, count_call, user) };
        assert_eq!(rc, BATON_OK);
        std::thread::sleep(Duration::from_millis(50));
        assert!(!blocked.is_finished());
        feed.push(Bytes::from_static(b"data")).unwrap();
        assert_eq!(blocked.join().unwrap(), (4, b"data".to_vec()));
        assert_eq!(called.load(Ordering::SeqCst), 1);
        // Registered with data waiting: called by the feed's next poll.
        feed.push(Bytes::from_static(b"more")).unwrap();
        // SAFETY: as above.
        let rc = unsafe { host_body_on_readable(h, count_call, user) };
        assert_eq!(rc, BATON_OK);
        assert_eq!(called.load(Ordering::SeqCst), 1);
        let wakes = Arc::new(Count::default());
        let _ = poll_room(&mut feed, &wakes);
        assert_eq!(called.load(Ordering::SeqCst), 2);
        drop(reader);
        assert!(body(h).is_none());
    }
}
