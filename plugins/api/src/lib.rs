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
#![allow(unsafe_code)]
#![deny(missing_docs)]

pub mod abi;

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

    /// The whole body.
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
/// [`Plugin`] type. See the crate documentation for an example.
///
/// Methods are written as `GET`, `POST`, … and may be combined with `|`
/// (`GET | POST "/x" => handler`); a `GET` route also answers `HEAD`. Path patterns use
/// `{name}` for one segment and `{*name}` for the rest of the path. `nonblocking: true`
/// promises that no handler blocks (they then run inline on the worker's runtime);
/// otherwise they run on a bounded pool of threads.
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
        routes: [ $( $($method:ident)|+ $path:literal => $handler:ident ),+ $(,)? ] $(,)?
    ) => {
        const _: () = {
            use $crate::abi as __abi;
            const __ROUTE_COUNT: usize = $crate::__count!($($path)+);
            static __ROUTES: $crate::__private::AssertSync<[__abi::BatonRoute; __ROUTE_COUNT]> =
                $crate::__private::AssertSync([$(
                    __abi::BatonRoute {
                        methods: 0 $(| __abi::method::$method)+,
                        reserved: 0,
                        path: concat!($path, "\0").as_ptr().cast(),
                    }
                ),+]);
            static __HANDLERS: [$crate::Handler<$ty>; __ROUTE_COUNT] = [$(<$ty>::$handler),+];
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

            #[unsafe(no_mangle)]
            pub extern "C" fn baton_plugin_v1() -> *const __abi::BatonPluginV1 {
                &__DESCRIPTOR.0
            }
        };
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
        handlers: &[Handler<P>],
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
        let Some(handler) = handlers.get(raw.route as usize) else {
            fail(&format!("no handler for route {}", raw.route));
            return 1;
        };
        let request = Request { raw };
        let mut resp = Response {
            host,
            raw: response,
        };
        match catch_unwind(AssertUnwindSafe(|| handler(plugin, &request, &mut resp))) {
            Ok(Ok(())) => 0,
            Ok(Err(message)) => {
                fail(&message);
                1
            }
            Err(panic) => {
                fail(&format!("handler panicked: {}", panic_message(&*panic)));
                2
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
