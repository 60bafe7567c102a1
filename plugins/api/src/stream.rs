//! Deferred answers ([`Stream`]) and streamed request bodies ([`Body`]) (ABI 1.1).
//!
//! Both are handle numbers plus this plugin's copy of the host's table: they are `Send`,
//! can be moved to any thread or async task, and a call on one that has ended is harmless
//! (it answers [`StreamError::Closed`]). Nothing here ever blocks unless its name says so.

use crate::abi::{self, BatonHandle};
use crate::host;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why a stream, body or WebSocket call did not do what was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamError {
    /// No room (writing) or no data (reading) right now: try again after
    /// [`Stream::on_writable`] / [`Body::on_readable`] fired, or use the blocking variant.
    WouldBlock,
    /// The client went away, or the stream, body or connection ended (or the host has no
    /// 1.1 support). Nothing more will be accepted; stop.
    Closed,
    /// The host refused the arguments: a bad status, header or close code, a text message
    /// that is not UTF-8, or a blocking call made on one of the host's own threads.
    Invalid,
    /// The request body is larger than the route's limit (the host answers 413 if the
    /// head was not sent yet).
    TooLarge,
    /// Not in this state: a header after the head was sent, or a callback registered
    /// while another one is still pending.
    State,
    /// A code this SDK does not know (from a newer host).
    Other(i64),
}

impl StreamError {
    /// The error for a negative return code of the host.
    pub(crate) fn from_code(code: i64) -> StreamError {
        match code {
            abi::BATON_E_WOULD_BLOCK => StreamError::WouldBlock,
            abi::BATON_E_CLOSED => StreamError::Closed,
            abi::BATON_E_INVALID => StreamError::Invalid,
            abi::BATON_E_TOO_LARGE => StreamError::TooLarge,
            abi::BATON_E_STATE => StreamError::State,
            other => StreamError::Other(other),
        }
    }

    /// `Ok(n)` for a non-negative return code, the error otherwise.
    pub(crate) fn check(code: i64) -> Result<usize, StreamError> {
        if code >= 0 {
            Ok(code as usize)
        } else {
            Err(StreamError::from_code(code))
        }
    }
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::WouldBlock => f.write_str("would block"),
            StreamError::Closed => f.write_str("closed"),
            StreamError::Invalid => f.write_str("refused by the host"),
            StreamError::TooLarge => f.write_str("request body too large"),
            StreamError::State => f.write_str("not in this state"),
            StreamError::Other(code) => write!(f, "host error {code}"),
        }
    }
}

impl std::error::Error for StreamError {}

impl From<StreamError> for std::io::Error {
    fn from(e: StreamError) -> Self {
        use std::io::ErrorKind;
        let kind = match e {
            StreamError::WouldBlock => ErrorKind::WouldBlock,
            StreamError::Closed => ErrorKind::BrokenPipe,
            StreamError::Invalid => ErrorKind::InvalidInput,
            StreamError::TooLarge => ErrorKind::FileTooLarge,
            StreamError::State | StreamError::Other(_) => ErrorKind::Other,
        };
        std::io::Error::new(kind, e)
    }
}

/// Registers `f` with one of the host's `*_on_*` functions, guarded by `pending` so that
/// at most one registration per handle is outstanding. `f` is boxed and freed exactly
/// once: by the host's notification (after running it), or here if the host refused it.
fn register(
    pending: &Arc<AtomicBool>,
    handle: BatonHandle,
    on: Option<unsafe extern "C" fn(BatonHandle, abi::NotifyFn, *mut std::ffi::c_void) -> i64>,
    f: Box<dyn FnOnce() + Send + 'static>,
) -> Result<(), StreamError> {
    let Some(on) = on else {
        return Err(StreamError::Closed);
    };
    if pending.swap(true, Ordering::AcqRel) {
        return Err(StreamError::State);
    }
    let flag = pending.clone();
    let user = host::into_user(Box::new(move || {
        flag.store(false, Ordering::Release);
        f()
    }));
    // SAFETY: `notify` frees `user` when the host calls it, once; the handle is a number
    // the host checks.
    let code = unsafe { on(handle, host::notify, user) };
    if code < 0 {
        // SAFETY: the host refused it, so it will never call it: ours to free.
        unsafe { host::free_user(user) };
        pending.store(false, Ordering::Release);
        return Err(StreamError::from_code(code));
    }
    Ok(())
}

/// A deferred response, answered from any thread: what [`crate::Response::defer`]
/// returns.
///
/// Set the status and headers (those set on the `Response` before deferring carry over),
/// then write the body in chunks and [`finish`](Stream::finish). Writes have
/// backpressure: [`write`](Stream::write) takes a chunk whole or answers
/// [`StreamError::WouldBlock`] when the stream's buffer (`http.stream_buffer_bytes`) is
/// full; then wait for [`on_writable`](Stream::on_writable) (from an inline handler or a
/// callback) or use [`write_blocking`](Stream::write_blocking) (from a thread of your
/// own or a blocking plugin's handler). Once the client goes away every call answers
/// [`StreamError::Closed`] and [`is_open`](Stream::is_open) is false: that is the
/// cancellation signal.
///
/// **Dropping a `Stream` that was neither finished nor failed fails it** (a 500 if the
/// head was not sent, otherwise the response is cut off), so that a client never takes a
/// truncated body for a whole one: a thread that panics while it owns the stream ends it
/// visibly. Call [`finish`](Stream::finish) to end it cleanly.
#[derive(Debug)]
pub struct Stream {
    handle: BatonHandle,
    /// Finished, failed, or seen closed: nothing to do on drop.
    ended: bool,
    pending: Arc<AtomicBool>,
}

impl Stream {
    pub(crate) fn new(handle: BatonHandle) -> Stream {
        Stream {
            handle,
            ended: false,
            pending: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The host's number for this stream (never reused).
    pub fn id(&self) -> u64 {
        self.handle
    }

    fn call(&mut self, f: impl FnOnce(&abi::BatonHostApi) -> i64) -> Result<usize, StreamError> {
        let Some(host) = host::table() else {
            self.ended = true;
            return Err(StreamError::Closed);
        };
        let result = StreamError::check(f(host));
        if result == Err(StreamError::Closed) {
            self.ended = true;
        }
        result
    }

    /// Sets the status code (100–999); only before the head is sent.
    pub fn set_status(&mut self, status: u16) -> Result<(), StreamError> {
        let handle = self.handle;
        // SAFETY: a host function called with a handle number it checks.
        self.call(|h| unsafe { (h.stream_set_status)(handle, status) })
            .map(drop)
    }

    /// Appends a header; only before the head is sent.
    pub fn header(&mut self, name: &str, value: &str) -> Result<(), StreamError> {
        let handle = self.handle;
        let (n, v) = (host::view(name.as_bytes()), host::view(value.as_bytes()));
        // SAFETY: as above; the views live for the call.
        self.call(|h| unsafe { (h.stream_add_header)(handle, n, v) })
            .map(drop)
    }

    /// Sends the status and headers now (the first write or `finish` would send them).
    pub fn send_head(&mut self) -> Result<(), StreamError> {
        let handle = self.handle;
        // SAFETY: as above.
        self.call(|h| unsafe { (h.stream_send_head)(handle) })
            .map(drop)
    }

    /// Queues `data` without blocking: `Ok(data.len())` when it was taken (whole), or
    /// [`StreamError::WouldBlock`] when the buffer is full (nothing was taken).
    pub fn write(&mut self, data: &[u8]) -> Result<usize, StreamError> {
        let handle = self.handle;
        let view = host::view(data);
        // SAFETY: as above; the view lives for the call.
        self.call(|h| unsafe { (h.stream_write)(handle, view, 0) })
    }

    /// Queues `data`, waiting for room as long as it takes (or until the client goes).
    /// Refused with [`StreamError::Invalid`] on the host's own threads (an inline
    /// handler, a callback): use it from your own threads or a blocking plugin.
    pub fn write_blocking(&mut self, data: &[u8]) -> Result<(), StreamError> {
        let handle = self.handle;
        let view = host::view(data);
        // SAFETY: as above.
        self.call(|h| unsafe { (h.stream_write)(handle, view, abi::WRITE_BLOCK) })
            .map(drop)
    }

    /// Runs `f` once, on a host thread, when the stream has room again or has ended (so
    /// it always runs unless this returns an error; then it is dropped unrun). `f` must
    /// not block. One registration at a time: a second one while the first is pending is
    /// [`StreamError::State`].
    pub fn on_writable(&self, f: impl FnOnce() + Send + 'static) -> Result<(), StreamError> {
        let on = host::table().map(|h| h.stream_on_writable);
        register(&self.pending, self.handle, on, Box::new(f))
    }

    /// Like [`on_writable`](Stream::on_writable), handing the stream itself to `f`: the
    /// usual shape of a writer that writes until [`StreamError::WouldBlock`] and then
    /// waits. If the host refuses the registration, `f` and the stream are dropped (so
    /// the stream is failed) and the error is returned.
    pub fn when_writable(self, f: impl FnOnce(Stream) + Send + 'static) -> Result<(), StreamError> {
        let on = host::table().map(|h| h.stream_on_writable);
        let (pending, handle) = (self.pending.clone(), self.handle);
        register(&pending, handle, on, Box::new(move || f(self)))
    }

    /// Ends the body cleanly.
    pub fn finish(mut self) -> Result<(), StreamError> {
        let handle = self.handle;
        self.ended = true;
        // SAFETY: as above.
        self.call(|h| unsafe { (h.stream_finish)(handle) })
            .map(drop)
    }

    /// Fails the stream: a 500 if the head was not sent, otherwise the response is cut
    /// off; `message` goes to the worker's log.
    pub fn fail(mut self, message: &str) -> Result<(), StreamError> {
        self.ended = true;
        self.fail_inner(message)
    }

    fn fail_inner(&mut self, message: &str) -> Result<(), StreamError> {
        let handle = self.handle;
        let view = host::view(message.as_bytes());
        // SAFETY: as above.
        self.call(|h| unsafe { (h.stream_fail)(handle, view) })
            .map(drop)
    }

    /// Whether the client is still there and the stream not ended (false once it is
    /// cancelled).
    pub fn is_open(&self) -> bool {
        match host::table() {
            // SAFETY: as above.
            Some(h) => unsafe { (h.stream_is_open)(self.handle) == 1 },
            None => false,
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.ended {
            self.ended = true;
            let message = if std::thread::panicking() {
                "the plugin panicked while it held its unfinished stream"
            } else {
                "the plugin dropped its stream without finishing it"
            };
            let _ = self.fail_inner(message);
        }
    }
}

/// `Write` for a stream is [`Stream::write_blocking`]: use it from your own threads.
impl std::io::Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_blocking(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A request body taken as a stream, for a route declared with `stream_body: true`:
/// what [`crate::Request::body_stream`] returns. Valid until the response is finished.
///
/// [`read`](Body::read) never blocks: it answers [`StreamError::WouldBlock`] when nothing
/// has arrived yet (then wait for [`on_readable`](Body::on_readable));
/// [`read_blocking`](Body::read_blocking) waits, off the host's threads. `Ok(0)` is the
/// end of the body; [`StreamError::TooLarge`] says the body passed the route's limit.
/// `Read` is implemented with `read_blocking`. Dropping a `Body` does nothing.
#[derive(Debug)]
pub struct Body {
    handle: BatonHandle,
    pending: Arc<AtomicBool>,
}

impl Body {
    pub(crate) fn new(handle: BatonHandle) -> Body {
        Body {
            handle,
            pending: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The host's number for this body (never reused).
    pub fn id(&self) -> u64 {
        self.handle
    }

    fn read_with(&mut self, buf: &mut [u8], flags: u32) -> Result<usize, StreamError> {
        let Some(h) = host::table() else {
            return Err(StreamError::Closed);
        };
        // SAFETY: `buf` is writable for `buf.len()` bytes during the call; the handle is
        // a number the host checks.
        let code = unsafe { (h.body_read)(self.handle, buf.as_mut_ptr(), buf.len(), flags) };
        StreamError::check(code)
    }

    /// Reads what has arrived, up to `buf.len()` bytes, without blocking: the number read,
    /// `Ok(0)` at the end of the body, or [`StreamError::WouldBlock`].
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        self.read_with(buf, 0)
    }

    /// Reads up to `buf.len()` bytes, waiting for them: the number read, `Ok(0)` at the
    /// end. Refused with [`StreamError::Invalid`] on the host's own threads.
    pub fn read_blocking(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        self.read_with(buf, abi::WRITE_BLOCK)
    }

    /// Runs `f` once, on a host thread, when data, the end or an error is there (so it
    /// always runs unless this returns an error; then it is dropped unrun). `f` must not
    /// block. One registration at a time.
    pub fn on_readable(&self, f: impl FnOnce() + Send + 'static) -> Result<(), StreamError> {
        let on = host::table().map(|h| h.body_on_readable);
        register(&self.pending, self.handle, on, Box::new(f))
    }

    /// Like [`on_readable`](Body::on_readable), handing the body itself to `f`. If the
    /// host refuses the registration, `f` and the body are dropped and the error returned.
    pub fn when_readable(self, f: impl FnOnce(Body) + Send + 'static) -> Result<(), StreamError> {
        let on = host::table().map(|h| h.body_on_readable);
        let (pending, handle) = (self.pending.clone(), self.handle);
        register(&pending, handle, on, Box::new(move || f(self)))
    }
}

/// `Read` for a body is [`Body::read_blocking`]: use it from your own threads.
impl std::io::Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        Ok(self.read_blocking(buf)?)
    }
}
