//! The SDK for Baton plugins.
//!
//! A plugin is a shared library (`crate-type = ["cdylib"]`) that Baton's workers load at
//! start-up. With this crate, a Rust plugin is a type implementing [`Plugin`], one method
//! per route, and one [`export_plugin!`] invocation:
//!
//! ```
//! use baton_plugin::{InitContext, Plugin, Request, Response, export_plugin};
//!
//! pub struct Hello {
//!     greeting: String,
//! }
//!
//! impl Plugin for Hello {
//!     fn init(ctx: &InitContext) -> Result<Self, String> {
//!         let greeting = ctx.setting_str("greeting").unwrap_or("hello").to_owned();
//!         Ok(Hello { greeting })
//!     }
//! }
//!
//! impl Hello {
//!     fn hello(&self, req: &Request, resp: &mut Response) -> Result<(), String> {
//!         let name = req.param("name").unwrap_or("world");
//!         resp.header("content-type", "text/plain");
//!         resp.write(format!("{}, {name}\n", self.greeting).as_bytes());
//!         Ok(())
//!     }
//! }
//!
//! export_plugin! {
//!     plugin: Hello,
//!     name: "hello",
//!     version: "1.0.0",
//!     nonblocking: true,
//!     routes: [
//!         GET "/hello" => hello,
//!         GET "/hello/{name}" => hello,
//!     ],
//! }
//! ```
//!
//! Every callback is wrapped in `catch_unwind`: a panic in a handler becomes a 500 (and is
//! logged by the worker); a panic in `init` fails the generation with its message. Nothing
//! Rust-specific crosses into the host. The ABI itself is in [`abi`], and in
//! `include/baton_plugin.h` for plugins written in C.
//!
//! # Streaming, WebSocket and drain (ABI 1.1)
//!
//! - **Deferred answers**: [`Response::defer`] turns the response into a [`Stream`] that
//!   may be answered later, from any thread or async runtime, with backpressure
//!   ([`Stream::write`], [`Stream::on_writable`], [`Stream::write_blocking`]) and
//!   cancellation ([`StreamError::Closed`], [`Stream::is_open`]).
//! - **Streamed request bodies**: a route declared with `{ stream_body: true }` (and
//!   perhaps its own `max_body_bytes`) gets its body as a [`Body`]
//!   ([`Request::body_stream`]) instead of [`Request::body`].
//! - **WebSocket routes**: `WS "/path" => open_method` routes, and an implementation of
//!   [`WebSocket`] for the messages and the close; send with [`WsHandle`].
//! - [`Plugin::drain`]: the generation began to drain.
//!
//! ```
//! use baton_plugin::{
//!     InitContext, Message, Plugin, Refused, Request, Response, WebSocket, WsHandle,
//!     export_plugin,
//! };
//!
//! pub struct Live;
//!
//! impl Plugin for Live {
//!     fn init(_: &InitContext) -> Result<Self, String> {
//!         Ok(Live)
//!     }
//! }
//!
//! impl Live {
//!     /// Counts to 3, one line a second, from a thread of its own.
//!     fn count(&self, _: &Request, resp: &mut Response) -> Result<(), String> {
//!         resp.header("content-type", "text/plain");
//!         let mut stream = resp.defer().ok_or("this host cannot defer")?;
//!         std::thread::spawn(move || {
//!             for n in 1..=3 {
//!                 if stream.write_blocking(format!("{n}\n").as_bytes()).is_err() {
//!                     return; // the client went away
//!                 }
//!                 std::thread::sleep(std::time::Duration::from_secs(1));
//!             }
//!             let _ = stream.finish();
//!         });
//!         Ok(())
//!     }
//!
//!     /// Takes an upload of any size, up to 1 GiB, and answers with its length.
//!     fn upload(&self, req: &Request, resp: &mut Response) -> Result<(), String> {
//!         let mut body = req.body_stream().ok_or("not a streamed route")?;
//!         let mut buf = vec![0; 64 * 1024];
//!         let mut total = 0;
//!         // A blocking plugin may read with `read_blocking` in its handler.
//!         while let n @ 1.. = body.read_blocking(&mut buf).map_err(|e| e.to_string())? {
//!             total += n;
//!         }
//!         resp.write(format!("{total}\n").as_bytes());
//!         Ok(())
//!     }
//!
//!     fn echo_open(&self, _: &Request, _ws: WsHandle) -> Result<(), Refused> {
//!         Ok(())
//!     }
//! }
//!
//! impl WebSocket for Live {
//!     type Conn = ();
//!
//!     fn message(&self, _: &mut (), ws: &WsHandle, message: Message<'_>) {
//!         let _ = match message {
//!             Message::Text(text) => ws.send_text(text),
//!             Message::Binary(data) => ws.send_binary(data),
//!         };
//!     }
//! }
//!
//! export_plugin! {
//!     plugin: Live,
//!     name: "live",
//!     version: "1.0.0",
//!     nonblocking: false,
//!     routes: [
//!         GET "/count" => count,
//!         PUT "/upload" => upload { stream_body: true, max_body_bytes: 1 << 30 },
//!         WS "/echo" => echo_open,
//!     ],
//! }
//! ```
#![allow(unsafe_code)]
#![deny(missing_docs)]

pub mod abi;
mod host;
mod stream;
mod ws;

pub use stream::{Body, Stream, StreamError};
pub use ws::{MAX_CLOSE_REASON, Message, Refused, WebSocket, WsHandle};

use abi::{BatonHostApi, BatonInit, BatonRequest, BatonResponse, BatonStr};
use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// A plugin: its state, built once per worker by [`Plugin::init`], shared by all requests
/// (handlers may run on several threads at once, hence `Sync`).
pub trait Plugin: Send + Sync + Sized + 'static {
    /// Builds the plugin's state from its settings. An `Err` (or a panic) fails the
    /// generation being started, with this message; the serving one is not affected.
    fn init(ctx: &InitContext) -> Result<Self, String>;

    /// Called once when the worker has drained, before it exits.
    fn shutdown(&self) {}

    /// The generation began to drain (ABI 1.1): its WebSocket connections and streamed
    /// answers will be closed over `worker.drain_spread`. A chance to tell clients in the
    /// application's own protocol, or to end long-lived answers cleanly. May be called on
    /// any thread, while handlers still run; it must not block for long. The default does
    /// nothing.
    fn drain(&self) {}
}

/// A route handler: writes the response; `Err` answers 500 and logs the message.
pub type Handler<P> = fn(&P, &Request<'_>, &mut Response<'_>) -> Result<(), String>;

/// What [`Plugin::init`] gets.
#[derive(Debug)]
pub struct InitContext {
    settings: serde_json::Value,
    generation: u64,
    worker_pid: u32,
}

impl InitContext {
    /// The plugin's `[plugins.settings.NAME]` table (an empty object if there is none).
    pub fn settings(&self) -> &serde_json::Value {
        &self.settings
    }

    /// A string setting.
    pub fn setting_str(&self, key: &str) -> Option<&str> {
        self.settings.get(key).and_then(|v| v.as_str())
    }

    /// An integer setting.
    pub fn setting_i64(&self, key: &str) -> Option<i64> {
        self.settings.get(key).and_then(|v| v.as_i64())
    }

    /// The generation being started.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The worker's pid.
    pub fn worker_pid(&self) -> u32 {
        self.worker_pid
    }
}

/// A request, borrowed for one handler call.
#[derive(Debug)]
pub struct Request<'a> {
    raw: &'a BatonRequest,
}

impl<'a> Request<'a> {
    fn str(&self, s: BatonStr) -> &'a str {
        // SAFETY: the host passes views valid for the call; it only passes UTF-8 in the
        // fields read through this function (method, path, query, names, parameters).
        let bytes = unsafe { s.as_bytes() };
        std::str::from_utf8(bytes).unwrap_or("")
    }

    /// The method, upper case (`GET`, `POST`, …).
    pub fn method(&self) -> &'a str {
        self.str(self.raw.method)
    }

    /// The path, without the query, still percent-encoded.
    pub fn path(&self) -> &'a str {
        self.str(self.raw.path)
    }

    /// The query string without `?` (empty if none).
    pub fn query(&self) -> &'a str {
        self.str(self.raw.query)
    }

    /// Index of the matched route in the plugin's route list.
    pub fn route(&self) -> usize {
        self.raw.route as usize
    }

    /// All headers in the order received: lower-case name, raw value.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + '_ {
        let headers = self.slice(self.raw.headers, self.raw.headers_len);
        headers.iter().map(|h| {
            // SAFETY: as in `str`; values are bytes.
            (self.str(h.name), unsafe { h.value.as_bytes() })
        })
    }

    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a [u8]> {
        self.headers()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// All path parameters: name, value.
    pub fn params(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        let params = self.slice(self.raw.params, self.raw.params_len);
        params.iter().map(|p| (self.str(p.name), self.str(p.value)))
    }

    /// The path parameter `name` of the matched route.
    pub fn param(&self, name: &str) -> Option<&'a str> {
        self.params().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The body as a stream, for a route declared with `stream_body: true` (its
    /// [`body`](Request::body) is then empty); `None` on other routes. Take it once: two
    /// readers of one body would each get part of it.
    pub fn body_stream(&self) -> Option<Body> {
        let size = std::mem::offset_of!(BatonRequest, body_stream) + 8;
        ((self.raw.struct_size as usize) >= size && self.raw.body_stream != 0)
            .then(|| Body::new(self.raw.body_stream))
    }

    /// The whole body (empty on a route that takes its body as a stream).
    pub fn body(&self) -> &'a [u8] {
        // SAFETY: the host passes a view valid for the call.
        unsafe { self.raw.body.as_bytes() }
    }

    /// The generation of the worker serving this request.
    pub fn generation(&self) -> u64 {
        self.raw.generation
    }

    /// The pid of the worker serving this request.
    pub fn worker_pid(&self) -> u32 {
        self.raw.worker_pid
    }

    fn slice<T>(&self, ptr: *const T, len: usize) -> &'a [T] {
        if ptr.is_null() || len == 0 {
            &[]
        } else {
            // SAFETY: the host passes arrays valid for the call.
            unsafe { std::slice::from_raw_parts(ptr, len) }
        }
    }
}

/// The response being built, through the host's functions.
#[derive(Debug)]
pub struct Response<'a> {
    host: &'a BatonHostApi,
    raw: *mut BatonResponse,
    /// The stream `defer` made, if it did.
    deferred: Option<abi::BatonHandle>,
}

impl Response<'_> {
    /// Sets the status code (default 200).
    pub fn status(&mut self, code: u16) -> &mut Self {
        // SAFETY: `raw` is the host's response for this call.
        unsafe { (self.host.set_status)(self.raw, code) };
        self
    }

    /// Appends a header. An invalid name or value makes the host answer 500.
    pub fn header(&mut self, name: &str, value: &str) -> &mut Self {
        // SAFETY: as above; the views live for the call.
        unsafe {
            (self.host.add_header)(
                self.raw,
                BatonStr::new(name.as_bytes()),
                BatonStr::new(value.as_bytes()),
            )
        };
        self
    }

    /// Appends bytes to the body.
    pub fn write(&mut self, data: &[u8]) -> &mut Self {
        // SAFETY: as above.
        unsafe { (self.host.write_body)(self.raw, BatonStr::new(data)) };
        self
    }

    /// Keeps the response to answer it later, from any thread: returns the [`Stream`]
    /// that is now the response (the status and headers set so far carry over; the body
    /// written so far does not count on it: write through the stream). `None` if the
    /// host refused (called twice, or a host without ABI 1.1).
    ///
    /// The handler then returns `Ok(())` at once; an `Err` or a panic after deferring
    /// fails the stream. The `Response` must not be used any more.
    pub fn defer(&mut self) -> Option<Stream> {
        if self.deferred.is_some() || host::table().is_none() {
            return None;
        }
        if (self.host.struct_size as usize) < std::mem::size_of::<BatonHostApi>() {
            return None;
        }
        // SAFETY: the table has the 1.1 functions (checked above); `raw` is the host's
        // response for this call.
        let handle = unsafe { (self.host.defer)(self.raw) };
        if handle == 0 {
            return None;
        }
        self.deferred = Some(handle);
        Some(Stream::new(handle))
    }
}

/// The message of a panic payload.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

/// Defines the plugin's exported descriptor and the `extern "C"` callbacks around a
/// [`Plugin`] type. See the crate documentation for examples.
///
/// Methods are written as `GET`, `POST`, … and may be combined with `|`
/// (`GET | POST "/x" => handler`); a `GET` route also answers `HEAD`. Path patterns use
/// `{name}` for one segment and `{*name}` for the rest of the path. `nonblocking: true`
/// promises that no handler blocks (they then run inline on the worker's runtime);
/// otherwise they run on a bounded pool of threads.
///
/// A route may end with options in braces:
/// - `stream_body: true`: the handler gets its body as a [`Body`]
///   ([`Request::body_stream`]) instead of buffered;
/// - `max_body_bytes: N`: the route's own body limit (a WebSocket route: its largest
///   message), instead of the configured `http.max_body_bytes`
///   (`websocket.max_message_bytes`).
///
/// `WS "/path" => open` declares a WebSocket route (a `GET` upgrade): `open` is a method
/// `fn(&self, &Request, WsHandle) -> Result<Self::Conn, Refused>`, and the plugin type
/// implements [`WebSocket`] for the messages and the close.
///
/// Every callback is wrapped in `catch_unwind`. [`Plugin::drain`] is always wired to the
/// host's `on_drain`.
///
/// The `unsafe` the expansion needs is this crate's (the compiler does not lint code from
/// another crate's macro), so a plugin crate may `#![forbid(unsafe_code)]`, as the
/// examples do.
#[macro_export]
macro_rules! export_plugin {
    (
        plugin: $ty:ty,
        name: $name:literal,
        version: $version:expr,
        nonblocking: $nonblocking:literal,
        routes: [ $(
            $($method:ident)|+ $path:literal => $handler:ident
            $({ $($opt:ident : $val:expr),* $(,)? })?
        ),+ $(,)? ] $(,)?
    ) => {
        const _: () = {
            use $crate::abi as __abi;
            const __ROUTE_COUNT: usize = $crate::__count!($($path)+);
            static __ROUTES: $crate::__private::AssertSync<[__abi::BatonRoute; __ROUTE_COUNT]> =
                $crate::__private::AssertSync([$(
                    __abi::BatonRoute {
                        methods: $crate::__route_methods!($($method)|+),
                        reserved: 0,
                        path: concat!($path, "\0").as_ptr().cast(),
                    }
                ),+]);
            static __ROUTE_EXT: [__abi::BatonRouteExt; __ROUTE_COUNT] = [$(
                $crate::__route_ext!(
                    $crate::__route_kind!($($method)|+);
                    $($($opt : $val),*)?
                )
            ),+];
            static __HANDLERS: [$crate::__private::Route<$ty>; __ROUTE_COUNT] =
                [$($crate::__route_fn!($ty, $handler, $($method)|+)),+];
            $crate::__ws_callbacks!($ty; $($($method)*)*);
            static __DESCRIPTOR: $crate::__private::AssertSync<__abi::BatonPluginV1> =
                $crate::__private::AssertSync(__abi::BatonPluginV1 {
                    magic: __abi::MAGIC,
                    abi_major: __abi::ABI_MAJOR,
                    abi_minor: __abi::ABI_MINOR,
                    struct_size: ::std::mem::size_of::<__abi::BatonPluginV1>() as u32,
                    flags: if $nonblocking { __abi::FLAG_NONBLOCKING } else { 0 },
                    name: concat!($name, "\0").as_ptr().cast(),
                    version: concat!($version, "\0").as_ptr().cast(),
                    routes: __ROUTES.0.as_ptr(),
                    routes_len: __ROUTE_COUNT,
                    init: Some(__init),
                    handle: Some(__handle),
                    shutdown: Some(__shutdown),
                    route_ext: __ROUTE_EXT.as_ptr(),
                    on_drain: Some(__drain),
                    ws_open: __WS_CALLBACKS.0,
                    ws_message: __WS_CALLBACKS.1,
                    ws_close: __WS_CALLBACKS.2,
                });

            unsafe extern "C" fn __init(
                init: *const __abi::BatonInit,
                state: *mut *mut ::std::ffi::c_void,
            ) -> i32 {
                // SAFETY: called by the host with valid arguments, per the ABI.
                unsafe { $crate::__private::init::<$ty>(init, state) }
            }

            unsafe extern "C" fn __handle(
                state: *mut ::std::ffi::c_void,
                request: *const __abi::BatonRequest,
                host: *const __abi::BatonHostApi,
                response: *mut __abi::BatonResponse,
            ) -> i32 {
                // SAFETY: called by the host with the state `__init` made, per the ABI.
                unsafe { $crate::__private::handle::<$ty>(&__HANDLERS, state, request, host, response) }
            }

            unsafe extern "C" fn __shutdown(state: *mut ::std::ffi::c_void) {
                // SAFETY: called once by the host with the state `__init` made.
                unsafe { $crate::__private::shutdown::<$ty>(state) }
            }

            unsafe extern "C" fn __drain(state: *mut ::std::ffi::c_void) {
                // SAFETY: called by the host with the state `__init` made.
                unsafe { $crate::__private::drain::<$ty>(state) }
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn baton_plugin_v1() -> *const __abi::BatonPluginV1 {
                &__DESCRIPTOR.0
            }
        };
    };
}

/// The method bits of a route (for [`export_plugin!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __route_methods {
    (WS) => {
        $crate::abi::method::GET
    };
    ($($method:ident)|+) => {
        0 $(| $crate::abi::method::$method)+
    };
}

/// The kind of a route (for [`export_plugin!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __route_kind {
    (WS) => {
        $crate::abi::ROUTE_WEBSOCKET
    };
    ($($method:ident)|+) => {
        $crate::abi::ROUTE_HTTP
    };
}

/// A route's extension, from its kind and options (for [`export_plugin!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __route_ext {
    ($kind:expr; $($opt:ident : $val:expr),*) => {{
        #[allow(unused_mut)]
        let mut ext = $crate::abi::BatonRouteExt {
            kind: $kind,
            flags: 0,
            max_body_bytes: 0,
        };
        $($crate::__route_opt!(ext, $opt, $val);)*
        ext
    }};
}

/// One route option (for [`export_plugin!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __route_opt {
    ($ext:ident, stream_body, $val:expr) => {
        if $val {
            $ext.flags |= $crate::abi::ROUTE_STREAM_BODY;
        }
    };
    ($ext:ident, max_body_bytes, $val:expr) => {
        $ext.max_body_bytes = $val;
    };
    ($ext:ident, $other:ident, $val:expr) => {
        compile_error!(concat!(
            "unknown route option `",
            stringify!($other),
            "` (known: stream_body, max_body_bytes)"
        ))
    };
}

/// A route's entry in the handler table (for [`export_plugin!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __route_fn {
    ($ty:ty, $handler:ident, WS) => {
        $crate::__private::Route::WebSocket(|plugin, request, ws| {
            $crate::__private::ws_accept::<$ty>(<$ty>::$handler(plugin, request, ws))
        })
    };
    ($ty:ty, $handler:ident, $($method:ident)|+) => {
        $crate::__private::Route::Http(<$ty>::$handler)
    };
}

/// The WebSocket callbacks if any route is `WS`, else none (for [`export_plugin!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __ws_callbacks {
    ($ty:ty;) => {
        const __WS_CALLBACKS: (
            Option<$crate::abi::WsOpenFn>,
            Option<$crate::abi::WsMessageFn>,
            Option<$crate::abi::WsCloseFn>,
        ) = (None, None, None);
    };
    ($ty:ty; WS $($rest:ident)*) => {
        const __WS_CALLBACKS: (
            Option<$crate::abi::WsOpenFn>,
            Option<$crate::abi::WsMessageFn>,
            Option<$crate::abi::WsCloseFn>,
        ) = (Some(__ws_open), Some(__ws_message), Some(__ws_close));

        unsafe extern "C" fn __ws_open(
            state: *mut ::std::ffi::c_void,
            request: *const $crate::abi::BatonRequest,
            host: *const $crate::abi::BatonHostApi,
            ws: $crate::abi::BatonHandle,
            user: *mut *mut ::std::ffi::c_void,
        ) -> i32 {
            // SAFETY: called by the host with valid arguments and the state `__init` made.
            unsafe { $crate::__private::ws_open::<$ty>(&__HANDLERS, state, request, host, ws, user) }
        }

        unsafe extern "C" fn __ws_message(
            state: *mut ::std::ffi::c_void,
            user: *mut ::std::ffi::c_void,
            ws: $crate::abi::BatonHandle,
            kind: u32,
            data: $crate::abi::BatonStr,
        ) {
            // SAFETY: called by the host with the state and the `user` `__ws_open` made.
            unsafe { $crate::__private::ws_message::<$ty>(state, user, ws, kind, data) }
        }

        unsafe extern "C" fn __ws_close(
            state: *mut ::std::ffi::c_void,
            user: *mut ::std::ffi::c_void,
            ws: $crate::abi::BatonHandle,
            code: u16,
            reason: $crate::abi::BatonStr,
        ) {
            // SAFETY: called once, last, by the host with the `user` `__ws_open` made.
            unsafe { $crate::__private::ws_close::<$ty>(state, user, ws, code, reason) }
        }
    };
    ($ty:ty; $other:ident $($rest:ident)*) => {
        $crate::__ws_callbacks!($ty; $($rest)*);
    };
}

/// Counts token trees (for [`export_plugin!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __count {
    () => { 0usize };
    ($head:tt $($tail:tt)*) => { 1usize + $crate::__count!($($tail)*) };
}

/// The machinery behind [`export_plugin!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    use super::*;

    /// Lets statics hold the descriptor's raw pointers, which point to other statics.
    #[repr(transparent)]
    #[derive(Debug)]
    pub struct AssertSync<T>(pub T);
    // SAFETY: only used for immutable statics whose pointers point to immutable statics.
    unsafe impl<T> Sync for AssertSync<T> {}

    /// A route's entry in the handler table: an HTTP handler, or a WebSocket route's open
    /// method with its connection state boxed (by [`ws_accept`]).
    #[derive(Debug)]
    pub enum Route<P> {
        /// An HTTP route.
        Http(Handler<P>),
        /// A WebSocket route.
        WebSocket(fn(&P, &Request<'_>, WsHandle) -> Result<*mut c_void, Refused>),
    }

    /// A connection's state as `user`: the plugin's, and whether a callback panicked.
    struct Conn<C> {
        conn: C,
        broken: bool,
    }

    /// Boxes an accepted connection's state for the host's `user` pointer.
    pub fn ws_accept<P: WebSocket>(
        opened: Result<P::Conn, Refused>,
    ) -> Result<*mut c_void, Refused> {
        opened.map(|conn| {
            Box::into_raw(Box::new(Conn {
                conn,
                broken: false,
            }))
            .cast()
        })
    }

    /// # Safety
    /// The arguments must be the host's valid arguments to `ws_open`, and `state` the
    /// value `init::<P>` produced.
    pub unsafe fn ws_open<P: Plugin>(
        routes: &[Route<P>],
        state: *mut c_void,
        request: *const BatonRequest,
        _host: *const BatonHostApi,
        ws: abi::BatonHandle,
        user: *mut *mut c_void,
    ) -> i32 {
        // SAFETY: per the ABI these are valid for the call; `state` is a `P` from `init`.
        let (plugin, raw) = unsafe { (&*(state as *const P), &*request) };
        let Some(Route::WebSocket(open)) = routes.get(raw.route as usize) else {
            return 1;
        };
        let request = Request { raw };
        match catch_unwind(AssertUnwindSafe(|| {
            open(plugin, &request, WsHandle::new(ws))
        })) {
            Ok(Ok(conn)) => {
                // SAFETY: `user` is the host's out-pointer.
                unsafe { *user = conn };
                0
            }
            Ok(Err(Refused)) => 1,
            Err(_) => 2,
        }
    }

    /// # Safety
    /// The host's arguments to `ws_message`: `user` is what `ws_open::<P>` set, not yet
    /// closed, and calls for one connection do not overlap.
    pub unsafe fn ws_message<P: WebSocket>(
        state: *mut c_void,
        user: *mut c_void,
        ws: abi::BatonHandle,
        kind: u32,
        data: BatonStr,
    ) {
        if user.is_null() {
            return;
        }
        // SAFETY: `state` is a `P` from `init`; `user` a live `Conn` only this call uses.
        let (plugin, conn) =
            unsafe { (&*(state as *const P), &mut *(user.cast::<Conn<P::Conn>>())) };
        if conn.broken {
            return;
        }
        let handle = WsHandle::new(ws);
        // SAFETY: the view is valid for the call.
        let bytes = unsafe { data.as_bytes() };
        let message = if kind == abi::ws::TEXT {
            match std::str::from_utf8(bytes) {
                Ok(text) => Message::Text(text),
                Err(_) => {
                    let _ = handle.close(1007, "invalid UTF-8");
                    return;
                }
            }
        } else {
            Message::Binary(bytes)
        };
        let state = &mut conn.conn;
        if catch_unwind(AssertUnwindSafe(|| plugin.message(state, &handle, message))).is_err() {
            conn.broken = true;
            let _ = handle.close(1011, "internal error");
        }
    }

    /// # Safety
    /// The host's arguments to `ws_close`: `user` is what `ws_open::<P>` set; called once.
    pub unsafe fn ws_close<P: WebSocket>(
        state: *mut c_void,
        user: *mut c_void,
        ws: abi::BatonHandle,
        code: u16,
        reason: BatonStr,
    ) {
        if user.is_null() {
            return;
        }
        // SAFETY: `user` came from Box::into_raw in `ws_accept`; released once, here.
        let conn = unsafe { Box::from_raw(user.cast::<Conn<P::Conn>>()) };
        // SAFETY: `state` is a `P` from `init`; the view is valid for the call.
        let (plugin, reason) = unsafe { (&*(state as *const P), reason.as_bytes()) };
        let reason = String::from_utf8_lossy(reason);
        let handle = WsHandle::new(ws);
        // Dropping the state runs plugin code too: keep it inside the catch.
        let _ = catch_unwind(AssertUnwindSafe(move || {
            plugin.close(conn.conn, &handle, code, &reason)
        }));
    }

    /// # Safety
    /// `state` must be the value `init::<P>` produced (or null).
    pub unsafe fn drain<P: Plugin>(state: *mut c_void) {
        if state.is_null() {
            return;
        }
        // SAFETY: `state` is a `P` from `init`, alive until `shutdown`.
        let plugin = unsafe { &*(state as *const P) };
        let _ = catch_unwind(AssertUnwindSafe(|| plugin.drain()));
    }

    unsafe fn report(host: *const BatonHostApi, error: *mut abi::BatonError, message: &str) {
        if !host.is_null() {
            // SAFETY: `host` is the host's table; the view lives for the call.
            unsafe { ((*host).set_error)(error, BatonStr::new(message.as_bytes())) };
        }
    }

    /// # Safety
    /// `init` and `state` must be the host's valid arguments to the `init` callback.
    pub unsafe fn init<P: Plugin>(init: *const BatonInit, state: *mut *mut c_void) -> i32 {
        // SAFETY: per the ABI, `init` points to a valid BatonInit for this call.
        let init = unsafe { &*init };
        // SAFETY: the host's table, valid for at least its `struct_size` bytes.
        unsafe { host::remember(init.host) };
        // SAFETY: the settings view is valid for the call.
        let settings_text = unsafe { init.settings_json.as_bytes() };
        let settings = match serde_json::from_slice(settings_text) {
            Ok(v) => v,
            Err(e) => {
                // SAFETY: host and error come from the host.
                unsafe {
                    report(
                        init.host,
                        init.error,
                        &format!("settings are not JSON: {e}"),
                    )
                };
                return 1;
            }
        };
        let ctx = InitContext {
            settings,
            generation: init.generation,
            worker_pid: init.worker_pid,
        };
        match catch_unwind(AssertUnwindSafe(|| P::init(&ctx))) {
            Ok(Ok(plugin)) => {
                // SAFETY: `state` is the host's out-pointer.
                unsafe { *state = Box::into_raw(Box::new(plugin)).cast() };
                0
            }
            Ok(Err(message)) => {
                // SAFETY: as above.
                unsafe { report(init.host, init.error, &message) };
                1
            }
            Err(panic) => {
                let message = format!("init panicked: {}", panic_message(&*panic));
                // SAFETY: as above.
                unsafe { report(init.host, init.error, &message) };
                2
            }
        }
    }

    /// # Safety
    /// The arguments must be the host's valid arguments to `handle`, and `state` the value
    /// `init::<P>` produced.
    pub unsafe fn handle<P: Plugin>(
        handlers: &[Route<P>],
        state: *mut c_void,
        request: *const BatonRequest,
        host: *const BatonHostApi,
        response: *mut BatonResponse,
    ) -> i32 {
        // SAFETY: per the ABI these are valid for the call; `state` is a `P` from `init`.
        let (plugin, raw, host) = unsafe { (&*(state as *const P), &*request, &*host) };
        let fail = |message: &str| {
            // SAFETY: as above.
            unsafe { (host.fail)(response, BatonStr::new(message.as_bytes())) };
        };
        let Some(Route::Http(handler)) = handlers.get(raw.route as usize) else {
            fail(&format!("no HTTP handler for route {}", raw.route));
            return 1;
        };
        let request = Request { raw };
        let mut resp = Response {
            host,
            raw: response,
            deferred: None,
        };
        let result = catch_unwind(AssertUnwindSafe(|| handler(plugin, &request, &mut resp)));
        let (message, code) = match result {
            Ok(Ok(())) => return 0,
            Ok(Err(message)) => (message, 1),
            Err(panic) => (format!("handler panicked: {}", panic_message(&*panic)), 2),
        };
        match resp.deferred {
            // The response is a stream now: fail it (the `Stream`, wherever it went, then
            // only hears `Closed`), and return 0 as the ABI asks of a deferred handler.
            Some(handle) => {
                let _ = Stream::new(handle).fail(&message);
                0
            }
            None => {
                fail(&message);
                code
            }
        }
    }

    /// # Safety
    /// `state` must be the value `init::<P>` produced; called once.
    pub unsafe fn shutdown<P: Plugin>(state: *mut c_void) {
        if state.is_null() {
            return;
        }
        // SAFETY: `state` came from Box::into_raw in `init` and is released once, here.
        let plugin = unsafe { Box::from_raw(state as *mut P) };
        // Dropping the state runs plugin code too: keep it inside the catch.
        let _ = catch_unwind(AssertUnwindSafe(move || {
            plugin.shutdown();
            drop(plugin);
        }));
    }
}
