//! The plugin ABI, version 1.1: `#[repr(C)]` types mirrored one to one by
//! `include/baton_plugin.h`.
//!
//! 1.1 appends, and a 1.0 plugin never sees any of it:
//! - **deferred answers**: a handler may call [`BatonHostApi::defer`] and return; the
//!   [`BatonHandle`] it gets is the response, usable from any thread until it is finished:
//!   status and headers, the head, body chunks with backpressure
//!   ([`BATON_E_WOULD_BLOCK`], `stream_on_writable`, or [`WRITE_BLOCK`] off the host's
//!   threads), finish or fail, and [`BATON_E_CLOSED`] once the client is gone;
//! - **streaming request bodies**: a route with [`ROUTE_STREAM_BODY`] gets its body as a
//!   stream ([`BatonRequest::body_stream`], `body_read`, `body_on_readable`), and may set its
//!   own body limit ([`BatonRouteExt::max_body_bytes`]);
//! - **WebSocket** routes ([`ROUTE_WEBSOCKET`]): the host does the protocol; the plugin gets
//!   `ws_open`, `ws_message` and `ws_close` and sends with `ws_send` and `ws_close`;
//! - `on_drain`: the plugin's generation began to drain.
//!
//! Handles are numbers, never reused: a handle used after its stream or connection ended is
//! harmless (the call answers [`BATON_E_CLOSED`]).
//!
//! Rules that keep it stable:
//! - A plugin exports one symbol, [`ENTRY_POINT`], an [`EntryFn`] returning a pointer to a
//!   [`BatonPluginV1`] that lives as long as the library is loaded.
//! - The descriptor starts with `magic`, `abi_major`, `abi_minor`, `struct_size`; the host
//!   checks them before it reads anything else. `abi_major` must equal the host's,
//!   `abi_minor` must not exceed it, and the host never reads past `struct_size`.
//! - Minor versions only ever append fields (to the descriptor, [`BatonRequest`],
//!   [`BatonHostApi`] and [`BatonInit`]); every appended-to struct carries its own
//!   `struct_size` for that reason.
//! - Nothing Rust-specific crosses: strings and bytes are borrowed pointer + length views
//!   ([`BatonStr`]), valid only during the call they are passed to; responses are built
//!   through the host's function table, so no memory is ever freed by the other side's
//!   allocator; a panic never unwinds across the boundary.
#![allow(unsafe_code)]

use std::ffi::{c_char, c_void};

/// The descriptor's magic number: the bytes `BATONPL1` read as a little-endian `u64`.
pub const MAGIC: u64 = u64::from_le_bytes(*b"BATONPL1");
/// The ABI major version; a plugin built for another major is refused.
pub const ABI_MAJOR: u32 = 1;
/// The ABI minor version; a plugin built for a newer minor is refused.
pub const ABI_MINOR: u32 = 1;
/// The exported symbol's name, NUL-terminated.
pub const ENTRY_POINT: &[u8] = b"baton_plugin_v1\0";

/// `flags` bit: every handler of the plugin returns quickly without blocking, so the host
/// runs it inline on its async runtime. Without it, handlers run on a bounded blocking pool.
pub const FLAG_NONBLOCKING: u32 = 1;

/// A stream, request body or WebSocket connection, named by a number that is never
/// reused. 0 is no handle.
pub type BatonHandle = u64;

/// Success.
pub const BATON_OK: i64 = 0;
/// The arguments were refused (a bad status, header or handle kind; a blocking call on
/// one of the host's own threads).
pub const BATON_E_INVALID: i64 = -1;
/// No room (or no data) right now: wait for the `on_writable` (`on_readable`) callback.
pub const BATON_E_WOULD_BLOCK: i64 = -2;
/// The client went away, the stream or connection ended, or the handle is unknown.
pub const BATON_E_CLOSED: i64 = -3;
/// The request body exceeds the route's limit (the host answers 413 if it still can).
pub const BATON_E_TOO_LARGE: i64 = -4;
/// Not in this state: a header after the head was sent, `defer` twice.
pub const BATON_E_STATE: i64 = -5;

/// `flags` bit for `stream_write` and `body_read`: wait (block the calling thread) until
/// there is room or data. Refused with [`BATON_E_INVALID`] on the host's own threads
/// (inline handlers, callbacks); fine on the blocking pool and the plugin's own threads.
pub const WRITE_BLOCK: u32 = 1;

/// [`BatonRouteExt::kind`]: an HTTP route (the default).
pub const ROUTE_HTTP: u32 = 0;
/// [`BatonRouteExt::kind`]: a WebSocket endpoint (RFC 6455); the host answers the upgrade.
pub const ROUTE_WEBSOCKET: u32 = 1;
/// [`BatonRouteExt::flags`] bit: the handler gets the body as a stream, not buffered.
pub const ROUTE_STREAM_BODY: u32 = 1;

/// WebSocket message kinds for `ws_message` and `ws_send`.
pub mod ws {
    /// A text message (UTF-8, checked by the host on receipt).
    pub const TEXT: u32 = 1;
    /// A binary message.
    pub const BINARY: u32 = 2;
}

/// What the host calls back when a stream has room or a body has data (or either ended).
/// Called once per registration, on a host thread: it must not block.
pub type NotifyFn = unsafe extern "C" fn(user: *mut c_void, handle: BatonHandle);

/// HTTP method bits for [`BatonRoute::methods`].
pub mod method {
    /// `GET` (a route with `GET` also answers `HEAD`).
    pub const GET: u32 = 1 << 0;
    /// `HEAD`.
    pub const HEAD: u32 = 1 << 1;
    /// `POST`.
    pub const POST: u32 = 1 << 2;
    /// `PUT`.
    pub const PUT: u32 = 1 << 3;
    /// `DELETE`.
    pub const DELETE: u32 = 1 << 4;
    /// `PATCH`.
    pub const PATCH: u32 = 1 << 5;
    /// `OPTIONS`.
    pub const OPTIONS: u32 = 1 << 6;
    /// Every method above.
    pub const ALL: u32 = (1 << 7) - 1;

    /// The methods and their names, in bit order.
    pub const NAMES: [(u32, &str); 7] = [
        (GET, "GET"),
        (HEAD, "HEAD"),
        (POST, "POST"),
        (PUT, "PUT"),
        (DELETE, "DELETE"),
        (PATCH, "PATCH"),
        (OPTIONS, "OPTIONS"),
    ];

    /// The bit for a method name, if it is one of the above.
    pub fn bit(name: &str) -> Option<u32> {
        NAMES.iter().find(|(_, n)| *n == name).map(|(b, _)| *b)
    }
}

/// A borrowed view of bytes (UTF-8 where the field says so). `ptr` may be null only when
/// `len` is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonStr {
    /// First byte.
    pub ptr: *const u8,
    /// Number of bytes.
    pub len: usize,
}

impl BatonStr {
    /// A view of `bytes`, valid as long as they are.
    pub fn new(bytes: &[u8]) -> Self {
        Self {
            ptr: bytes.as_ptr(),
            len: bytes.len(),
        }
    }

    /// The bytes viewed.
    ///
    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay valid and unchanged for `'a`
    /// (or `len` must be 0).
    pub unsafe fn as_bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 || self.ptr.is_null() {
            &[]
        } else {
            // SAFETY: guaranteed by the caller.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
}

/// One request header: lower-case name (UTF-8) and value (bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonHeader {
    /// Lower-case header name.
    pub name: BatonStr,
    /// Header value, as received.
    pub value: BatonStr,
}

/// One named path parameter, e.g. `name` in `/hello/{name}` (both UTF-8).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonParam {
    /// Parameter name, as in the route pattern.
    pub name: BatonStr,
    /// The matched, still percent-encoded, path segment.
    pub value: BatonStr,
}

/// A route a plugin serves.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonRoute {
    /// [`method`] bits.
    pub methods: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// NUL-terminated UTF-8 path pattern: `/hello`, `/hello/{name}`, `/files/{*rest}`.
    pub path: *const c_char,
}

/// More about a route (1.1): an array of `routes_len` of these, parallel to the routes, or
/// none (every route then has kind [`ROUTE_HTTP`], no flags, the configured limits).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct BatonRouteExt {
    /// [`ROUTE_HTTP`] or [`ROUTE_WEBSOCKET`].
    pub kind: u32,
    /// [`ROUTE_STREAM_BODY`] or 0.
    pub flags: u32,
    /// The largest request body (HTTP) or message (WebSocket) this route takes; 0 means
    /// the configured `http.max_body_bytes` or `websocket.max_message_bytes`.
    pub max_body_bytes: u64,
}

/// A request, borrowed for the duration of one `handle` call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonRequest {
    /// `size_of::<BatonRequest>()` as the host built it.
    pub struct_size: u32,
    /// Index of the matched route in the plugin's route table.
    pub route: u32,
    /// Method (UTF-8, upper case).
    pub method: BatonStr,
    /// Path, without the query (UTF-8, still percent-encoded).
    pub path: BatonStr,
    /// Query string without `?`, empty if none.
    pub query: BatonStr,
    /// Headers, in the order received.
    pub headers: *const BatonHeader,
    /// Number of headers.
    pub headers_len: usize,
    /// Path parameters of the matched route.
    pub params: *const BatonParam,
    /// Number of path parameters.
    pub params_len: usize,
    /// The whole request body (at most `http.max_body_bytes`).
    pub body: BatonStr,
    /// The generation of the worker serving the request.
    pub generation: u64,
    /// The pid of the worker serving the request.
    pub worker_pid: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// 1.1: the body as a stream, for a route with [`ROUTE_STREAM_BODY`] (then `body` is
    /// empty); 0 otherwise. Valid until the response is finished.
    pub body_stream: BatonHandle,
}

/// Opaque: a response under construction, owned by the host.
#[repr(C)]
#[derive(Debug)]
pub struct BatonResponse {
    _private: [u8; 0],
}

/// Opaque: where `init` reports why it failed, owned by the host.
#[repr(C)]
#[derive(Debug)]
pub struct BatonError {
    _private: [u8; 0],
}

/// Functions the host provides. Each returns 0 on success and a negative number when the
/// arguments were refused (the response is then answered with 500).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonHostApi {
    /// `size_of::<BatonHostApi>()` as the host built it.
    pub struct_size: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// Sets the status code (100–999; default 200).
    pub set_status: unsafe extern "C" fn(response: *mut BatonResponse, status: u16) -> i32,
    /// Appends a header (the name must be a valid header name, the value a valid value).
    pub add_header:
        unsafe extern "C" fn(response: *mut BatonResponse, name: BatonStr, value: BatonStr) -> i32,
    /// Appends bytes to the body.
    pub write_body: unsafe extern "C" fn(response: *mut BatonResponse, data: BatonStr) -> i32,
    /// Fails the request: the host answers 500 and logs `message`.
    pub fail: unsafe extern "C" fn(response: *mut BatonResponse, message: BatonStr),
    /// Reports why `init` failed (call before returning non-zero from `init`).
    pub set_error: unsafe extern "C" fn(error: *mut BatonError, message: BatonStr),
    // --- 1.1 ---
    /// During `handle`: keep the response and answer later. Returns the stream's handle
    /// (what was set so far, status and headers, carries over), or 0 if refused (called
    /// twice, or on a WebSocket route). `handle` then returns 0; the stream must be
    /// finished or failed, from any thread. A stream never finished is ended by the host
    /// when its connection ends.
    pub defer: unsafe extern "C" fn(response: *mut BatonResponse) -> BatonHandle,
    /// Sets the status of a stream whose head is not sent yet.
    pub stream_set_status: unsafe extern "C" fn(stream: BatonHandle, status: u16) -> i64,
    /// Appends a header to a stream whose head is not sent yet.
    pub stream_add_header:
        unsafe extern "C" fn(stream: BatonHandle, name: BatonStr, value: BatonStr) -> i64,
    /// Sends the head now (a write or finish sends it too).
    pub stream_send_head: unsafe extern "C" fn(stream: BatonHandle) -> i64,
    /// Queues body bytes. Returns the number of bytes taken (all of them), or
    /// [`BATON_E_WOULD_BLOCK`] when the stream's buffer is full (nothing taken), or
    /// [`BATON_E_CLOSED`]. With [`WRITE_BLOCK`] it waits for room instead.
    pub stream_write: unsafe extern "C" fn(stream: BatonHandle, data: BatonStr, flags: u32) -> i64,
    /// Calls `notify(user, stream)` once, when the stream has room again or has ended.
    pub stream_on_writable:
        unsafe extern "C" fn(stream: BatonHandle, notify: NotifyFn, user: *mut c_void) -> i64,
    /// Ends the body; the handle is invalid afterwards.
    pub stream_finish: unsafe extern "C" fn(stream: BatonHandle) -> i64,
    /// Fails the stream: a 500 if the head was not sent, otherwise the response is cut
    /// off (the connection or HTTP/2 stream is reset); `message` is logged.
    pub stream_fail: unsafe extern "C" fn(stream: BatonHandle, message: BatonStr) -> i64,
    /// 1 while the client is there and the stream not ended, 0 afterwards (cancellation).
    pub stream_is_open: unsafe extern "C" fn(stream: BatonHandle) -> i32,
    /// Reads up to `cap` bytes of a streamed request body into `buf`: the number read,
    /// 0 at its end, [`BATON_E_WOULD_BLOCK`] if nothing arrived yet (with [`WRITE_BLOCK`]:
    /// waits), [`BATON_E_TOO_LARGE`] past the route's limit, [`BATON_E_CLOSED`].
    pub body_read:
        unsafe extern "C" fn(body: BatonHandle, buf: *mut u8, cap: usize, flags: u32) -> i64,
    /// Calls `notify(user, body)` once, when data (or the end, or an error) is there.
    pub body_on_readable:
        unsafe extern "C" fn(body: BatonHandle, notify: NotifyFn, user: *mut c_void) -> i64,
    /// Sends a WebSocket message ([`ws::TEXT`], valid UTF-8, or [`ws::BINARY`]). Queued,
    /// from any thread; a client whose queue overflows is closed by the host (as
    /// configured). [`BATON_E_CLOSED`] once the connection is closing or gone.
    pub ws_send: unsafe extern "C" fn(ws: BatonHandle, kind: u32, data: BatonStr) -> i64,
    /// Starts the close handshake with `code` (1000–4999) and `reason` (UTF-8, at most 123
    /// bytes); `ws_close` follows when it is done.
    pub ws_close: unsafe extern "C" fn(ws: BatonHandle, code: u16, reason: BatonStr) -> i64,
}

/// What `init` gets.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonInit {
    /// `size_of::<BatonInit>()` as the host built it.
    pub struct_size: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// The host's functions (also passed to every `handle` call).
    pub host: *const BatonHostApi,
    /// The plugin's `[plugins.settings.NAME]` table as a JSON object (`{}` if none).
    pub settings_json: BatonStr,
    /// The generation being started.
    pub generation: u64,
    /// The worker's pid.
    pub worker_pid: u32,
    /// Reserved, zero.
    pub reserved2: u32,
    /// Pass to `host->set_error`.
    pub error: *mut BatonError,
}

/// Called once per worker, before it serves. Returns 0 and sets `*state` (passed to
/// `handle` and `shutdown`; may be null), or non-zero after `host->set_error`.
pub type InitFn = unsafe extern "C" fn(init: *const BatonInit, state: *mut *mut c_void) -> i32;
/// Handles one request. May be called from several threads at once. Returns 0, or
/// non-zero for a 500.
pub type HandleFn = unsafe extern "C" fn(
    state: *mut c_void,
    request: *const BatonRequest,
    host: *const BatonHostApi,
    response: *mut BatonResponse,
) -> i32;
/// Called once when the worker has drained, before it exits.
pub type ShutdownFn = unsafe extern "C" fn(state: *mut c_void);
/// 1.1: the generation began to drain (its long-lived connections will be closed over
/// `worker.drain_spread`); a chance to tell clients in the application's own protocol.
pub type DrainFn = unsafe extern "C" fn(state: *mut c_void);
/// 1.1: a WebSocket upgrade request for a [`ROUTE_WEBSOCKET`] route, which the plugin may
/// refuse (non-zero: the host answers 403, and no other callback follows for `ws`: free
/// anything set in `*user` before returning). Accepted (0), it may set `*user` (passed to
/// the other WebSocket callbacks) and may `ws_send` already; `ws` is valid until `ws_close`
/// returns, which is called exactly once.
pub type WsOpenFn = unsafe extern "C" fn(
    state: *mut c_void,
    request: *const BatonRequest,
    host: *const BatonHostApi,
    ws: BatonHandle,
    user: *mut *mut c_void,
) -> i32;
/// 1.1: a whole message ([`ws::TEXT`] or [`ws::BINARY`]); `data` is valid for the call.
/// Calls for one connection come one at a time, in order.
pub type WsMessageFn = unsafe extern "C" fn(
    state: *mut c_void,
    user: *mut c_void,
    ws: BatonHandle,
    kind: u32,
    data: BatonStr,
);
/// 1.1: the connection closed (`code` 1005 if none was given, 1006 if it was cut off);
/// called once, last. Free `user` here.
pub type WsCloseFn = unsafe extern "C" fn(
    state: *mut c_void,
    user: *mut c_void,
    ws: BatonHandle,
    code: u16,
    reason: BatonStr,
);

/// The plugin descriptor, version 1.0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonPluginV1 {
    /// [`MAGIC`].
    pub magic: u64,
    /// [`ABI_MAJOR`] the plugin was built for.
    pub abi_major: u32,
    /// [`ABI_MINOR`] the plugin was built for.
    pub abi_minor: u32,
    /// `size_of::<BatonPluginV1>()` as the plugin built it.
    pub struct_size: u32,
    /// [`FLAG_NONBLOCKING`] or 0.
    pub flags: u32,
    /// NUL-terminated UTF-8 name: `[A-Za-z0-9_-]+`; `[plugins.settings.NAME]` is its table.
    pub name: *const c_char,
    /// NUL-terminated UTF-8 version.
    pub version: *const c_char,
    /// The route table.
    pub routes: *const BatonRoute,
    /// Number of routes.
    pub routes_len: usize,
    /// Required.
    pub init: Option<InitFn>,
    /// Required.
    pub handle: Option<HandleFn>,
    /// Required (may do nothing).
    pub shutdown: Option<ShutdownFn>,
    // --- 1.1 ---
    /// `routes_len` route extensions, or null.
    pub route_ext: *const BatonRouteExt,
    /// Optional.
    pub on_drain: Option<DrainFn>,
    /// Required if a route is a WebSocket route.
    pub ws_open: Option<WsOpenFn>,
    /// Required if a route is a WebSocket route.
    pub ws_message: Option<WsMessageFn>,
    /// Required if a route is a WebSocket route.
    pub ws_close: Option<WsCloseFn>,
}

/// The size of a 1.0 descriptor: what a 1.0 plugin's `struct_size` says.
pub const DESCRIPTOR_SIZE_1_0: usize = 80;
/// The size of a 1.0 host function table.
pub const HOST_API_SIZE_1_0: usize = 48;
/// The size of a 1.0 request.
pub const REQUEST_SIZE_1_0: usize = 120;

/// The type of [`ENTRY_POINT`].
pub type EntryFn = unsafe extern "C" fn() -> *const BatonPluginV1;

/// The fields every version has, read before anything else.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct BatonPluginHead {
    /// See [`BatonPluginV1::magic`].
    pub magic: u64,
    /// See [`BatonPluginV1::abi_major`].
    pub abi_major: u32,
    /// See [`BatonPluginV1::abi_minor`].
    pub abi_minor: u32,
    /// See [`BatonPluginV1::struct_size`].
    pub struct_size: u32,
}

// Layout assertions: these sizes and offsets are the ABI (x86_64 and aarch64 Linux); the
// C header asserts the same numbers, and a test compiles it to prove they agree.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<BatonStr>() == 16);
    assert!(size_of::<BatonHeader>() == 32);
    assert!(size_of::<BatonParam>() == 32);
    assert!(size_of::<BatonRoute>() == 16);
    assert!(offset_of!(BatonRoute, path) == 8);
    assert!(size_of::<BatonRequest>() == 128);
    assert!(offset_of!(BatonRequest, body_stream) == REQUEST_SIZE_1_0);
    assert!(size_of::<BatonRouteExt>() == 16);
    assert!(offset_of!(BatonRouteExt, max_body_bytes) == 8);
    assert!(offset_of!(BatonRequest, method) == 8);
    assert!(offset_of!(BatonRequest, headers) == 56);
    assert!(offset_of!(BatonRequest, params) == 72);
    assert!(offset_of!(BatonRequest, body) == 88);
    assert!(offset_of!(BatonRequest, generation) == 104);
    assert!(offset_of!(BatonRequest, worker_pid) == 112);
    assert!(size_of::<BatonHostApi>() == 152);
    assert!(offset_of!(BatonHostApi, set_error) == 40);
    assert!(offset_of!(BatonHostApi, defer) == HOST_API_SIZE_1_0);
    assert!(offset_of!(BatonHostApi, stream_write) == 80);
    assert!(offset_of!(BatonHostApi, body_read) == 120);
    assert!(offset_of!(BatonHostApi, ws_close) == 144);
    assert!(size_of::<BatonInit>() == 56);
    assert!(offset_of!(BatonInit, settings_json) == 16);
    assert!(offset_of!(BatonInit, error) == 48);
    assert!(size_of::<BatonPluginHead>() == 24);
    assert!(offset_of!(BatonPluginV1, struct_size) == 16);
    assert!(offset_of!(BatonPluginV1, name) == 24);
    assert!(offset_of!(BatonPluginV1, routes_len) == 48);
    assert!(offset_of!(BatonPluginV1, init) == 56);
    assert!(offset_of!(BatonPluginV1, shutdown) == 72);
    assert!(offset_of!(BatonPluginV1, route_ext) == DESCRIPTOR_SIZE_1_0);
    assert!(offset_of!(BatonPluginV1, on_drain) == 88);
    assert!(offset_of!(BatonPluginV1, ws_close) == 112);
    assert!(size_of::<BatonPluginV1>() == 120);
};
