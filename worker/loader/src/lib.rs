//! `baton-loader`: the worker's plugin loader. Loads plugin libraries and calls into them
//! through the v1 C ABI.
//!
//! Each plugin is the supervisor's content-addressed copy, `dlopen`ed once with
//! `RTLD_NOW | RTLD_LOCAL` and never closed (unloading Rust code with thread-local
//! destructors is unsound, and a worker lives for one generation anyway). The descriptor's
//! fixed head (magic, ABI major/minor, struct size) is checked before anything else is
//! read, and nothing past `struct_size` is ever read. This is the only code of the worker
//! that calls plugin code; every call gets borrowed views and the host's function table,
//! and nothing a plugin returns is freed by the host.
//!
//! It is a crate of its own so that `unsafe`, which calling through a C ABI needs, is
//! allowed here and forbidden in the whole of `baton-worker`.
#![allow(unsafe_code)]

pub mod stream;
pub mod ws;

use baton_plugin::abi::{
    self, BatonError, BatonHeader, BatonHostApi, BatonInit, BatonParam, BatonPluginHead,
    BatonPluginV1, BatonRequest, BatonResponse, BatonStr, EntryFn, HandleFn, ShutdownFn,
};
use baton_proto::PluginSpec;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use std::cell::RefCell;
use std::ffi::{CStr, c_char, c_void};
use std::os::fd::{AsRawFd, OwnedFd};
use thiserror::Error;

/// A plugin that could not be used, naming its file.
#[derive(Debug, Error)]
#[error("plugin {file}: {reason}")]
pub struct PluginError {
    pub file: String,
    pub reason: String,
}

/// One route of a plugin.
#[derive(Debug, Clone)]
pub struct RouteDef {
    pub methods: u32,
    pub pattern: String,
    /// What kind of route (1.1; a 1.0 plugin's routes are all HTTP routes).
    pub kind: RouteKind,
    /// The route takes its body as a stream (1.1, [`abi::ROUTE_STREAM_BODY`]).
    pub stream_body: bool,
    /// The route's own body (or WebSocket message) limit; `None`: the configured one.
    pub max_body_bytes: Option<u64>,
}

/// What a route serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Http,
    WebSocket,
}

/// The 1.1 WebSocket callbacks of a plugin that has WebSocket routes.
#[derive(Debug, Clone, Copy)]
pub struct WsCallbacks {
    pub open: abi::WsOpenFn,
    pub message: abi::WsMessageFn,
    pub close: abi::WsCloseFn,
}

/// The plugin's state pointer, shared by every handler call (the ABI requires `handle`
/// to be callable from several threads at once).
#[derive(Debug, Clone, Copy)]
struct State(*mut c_void);
// SAFETY: the ABI makes the plugin responsible for its state being usable from any
// thread; the host only passes the pointer back.
unsafe impl Send for State {}
// SAFETY: as above.
unsafe impl Sync for State {}

/// A loaded plugin.
#[derive(Debug)]
pub struct Plugin {
    pub spec: PluginSpec,
    pub name: String,
    pub version: String,
    pub nonblocking: bool,
    pub routes: Vec<RouteDef>,
    /// The ABI minor version the plugin was built for.
    pub abi_minor: u32,
    init: abi::InitFn,
    handle: HandleFn,
    shutdown: ShutdownFn,
    on_drain: Option<abi::DrainFn>,
    ws: Option<WsCallbacks>,
    /// Set once `init` succeeded.
    state: std::sync::OnceLock<State>,
}

/// A request as a plugin sees it, borrowed from the HTTP request for one call.
#[derive(Debug)]
pub struct Call<'a> {
    pub route: u32,
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a HeaderMap,
    pub params: &'a [(String, String)],
    pub body: &'a [u8],
    pub generation: u64,
    pub worker_pid: u32,
}

/// What a plugin answered.
#[derive(Debug)]
pub enum Answer {
    Response {
        status: StatusCode,
        headers: HeaderMap,
        body: Vec<u8>,
    },
    /// The handler failed (returned non-zero, called `fail`, panicked, or used the host
    /// functions wrongly): answer 500 and log this.
    Failed(String),
    /// The handler called `defer` (1.1): the answer comes later through the stream, whose
    /// receiver carries the head begun so far (status, headers) and then the body.
    Deferred(stream::StreamReceiver),
    /// The handler called `defer` and its stream went to [`CallOpts::handoff`] then.
    HandedOff,
}

/// What the host adds to a call (1.1).
#[derive(Debug, Default)]
pub struct CallOpts {
    /// `http.stream_buffer_bytes`: the buffer of a stream the handler defers to.
    pub stream_buffer_bytes: usize,
    /// The request body as a stream, for a route with [`abi::ROUTE_STREAM_BODY`]. Closed
    /// when the answer is done: when the call returns, or when its deferred stream ends.
    pub body: Option<stream::BodyStream>,
    /// Where a deferred stream goes at `defer` time rather than when the handler returns,
    /// so that a handler on the blocking pool may write it with `WRITE_BLOCK` before it
    /// returns (the worker sends its body meanwhile). A handler that then fails fails
    /// the stream.
    pub handoff: Option<Handoff>,
}

/// Takes a deferred stream at `defer` time (see [`CallOpts::handoff`]).
pub struct Handoff(Box<dyn FnOnce(stream::StreamReceiver) + Send>);

impl Handoff {
    pub fn new(f: impl FnOnce(stream::StreamReceiver) + Send + 'static) -> Self {
        Handoff(Box::new(f))
    }
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handoff")
    }
}

fn fail(spec: &PluginSpec, reason: impl Into<String>) -> PluginError {
    PluginError {
        file: spec.file.clone(),
        reason: reason.into(),
    }
}

impl Plugin {
    /// Loads and checks the library, without running any of its code but the entry point.
    /// `file` is the checked cache file the supervisor handed over (loaded through
    /// `/proc/self/fd`, so no path is looked up again); without it, `spec.cached` is loaded.
    pub fn load(spec: &PluginSpec, file: Option<OwnedFd>) -> Result<Plugin, PluginError> {
        let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
        let path = match &file {
            Some(fd) => format!("/proc/self/fd/{}", fd.as_raw_fd()),
            None => spec.cached.clone(),
        };
        // SAFETY: loading runs the library's initialisers; that is what loading a plugin
        // means, and the supervisor checked the file's ownership, permissions and hash.
        let library = unsafe { libloading::os::unix::Library::open(Some(&path), flags) }
            .map_err(|e| fail(spec, format!("cannot load: {}", dl_reason(&e))))?;
        // Mapped now; the fd is not needed any more.
        drop(file);
        // SAFETY: the symbol's type is fixed by the ABI; a library exporting the name with
        // another type is not a Baton plugin and breaks its contract.
        let entry = unsafe { library.get::<EntryFn>(abi::ENTRY_POINT) }.map_err(|_| {
            fail(
                spec,
                "no entry point baton_plugin_v1 (not a Baton plugin, or built without the export macro)",
            )
        })?;
        let entry: EntryFn = *entry;
        // Never dlclose: see the module documentation.
        std::mem::forget(library);
        // SAFETY: calling the entry point is the ABI's first step.
        let descriptor = unsafe { entry() };
        if descriptor.is_null() {
            return Err(fail(spec, "baton_plugin_v1 returned NULL"));
        }
        // SAFETY: the ABI guarantees at least the head is readable; read it unaligned so a
        // misaligned pointer cannot be undefined behaviour.
        let head = unsafe { descriptor.cast::<BatonPluginHead>().read_unaligned() };
        if head.magic != abi::MAGIC {
            return Err(fail(
                spec,
                format!(
                    "wrong magic {:#018x} (expected {:#018x}): not a Baton plugin descriptor",
                    head.magic,
                    abi::MAGIC
                ),
            ));
        }
        if head.abi_major != abi::ABI_MAJOR {
            return Err(fail(
                spec,
                format!(
                    "built for plugin ABI {}.{}; this Baton speaks major version {}",
                    head.abi_major,
                    head.abi_minor,
                    abi::ABI_MAJOR
                ),
            ));
        }
        if head.abi_minor > abi::ABI_MINOR {
            return Err(fail(
                spec,
                format!(
                    "built for plugin ABI {}.{}, newer than this Baton's {}.{}: upgrade Baton",
                    head.abi_major,
                    head.abi_minor,
                    abi::ABI_MAJOR,
                    abi::ABI_MINOR
                ),
            ));
        }
        let needed = abi::DESCRIPTOR_SIZE_1_0;
        if (head.struct_size as usize) < needed {
            return Err(fail(
                spec,
                format!(
                    "descriptor struct_size {} is smaller than the {needed} bytes of an ABI 1.0 descriptor",
                    head.struct_size
                ),
            ));
        }
        let d = read_descriptor(descriptor, head.struct_size as usize);
        let name = c_text(d.name).ok_or_else(|| fail(spec, "name is NULL or not UTF-8"))?;
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(fail(spec, format!("name {name:?} must be [A-Za-z0-9_-]+")));
        }
        let version =
            c_text(d.version).ok_or_else(|| fail(spec, "version is NULL or not UTF-8"))?;
        let (Some(init), Some(handle), Some(shutdown)) = (d.init, d.handle, d.shutdown) else {
            let missing: Vec<&str> = [
                ("init", d.init.is_none()),
                ("handle", d.handle.is_none()),
                ("shutdown", d.shutdown.is_none()),
            ]
            .iter()
            .filter(|(_, null)| *null)
            .map(|(n, _)| *n)
            .collect();
            return Err(fail(
                spec,
                format!("null function pointer: {}", missing.join(", ")),
            ));
        };
        if d.routes_len == 0 {
            return Err(fail(spec, "declares no routes"));
        }
        if d.routes.is_null() || d.routes_len > 4096 {
            return Err(fail(
                spec,
                format!(
                    "bad route table ({} routes at {:p})",
                    d.routes_len, d.routes
                ),
            ));
        }
        let mut routes = Vec::with_capacity(d.routes_len);
        for i in 0..d.routes_len {
            // SAFETY: the descriptor says `routes_len` routes are at `routes`.
            let r = unsafe { d.routes.add(i).read_unaligned() };
            let ext = if d.route_ext.is_null() {
                abi::BatonRouteExt::default()
            } else {
                // SAFETY: a non-null `route_ext` has `routes_len` entries (ABI 1.1).
                unsafe { d.route_ext.add(i).read_unaligned() }
            };
            let pattern = c_text(r.path)
                .ok_or_else(|| fail(spec, format!("route {i}: path is NULL or not UTF-8")))?;
            if !pattern.starts_with('/') {
                return Err(fail(
                    spec,
                    format!("route {i}: path {pattern:?} must start with '/'"),
                ));
            }
            if r.methods == 0 || r.methods & !abi::method::ALL != 0 {
                return Err(fail(
                    spec,
                    format!("route {i} ({pattern}): bad method bits {:#x}", r.methods),
                ));
            }
            let kind = match ext.kind {
                abi::ROUTE_HTTP => RouteKind::Http,
                abi::ROUTE_WEBSOCKET => RouteKind::WebSocket,
                other => {
                    return Err(fail(
                        spec,
                        format!("route {i} ({pattern}): unknown route kind {other}"),
                    ));
                }
            };
            if ext.flags & !abi::ROUTE_STREAM_BODY != 0 {
                return Err(fail(
                    spec,
                    format!(
                        "route {i} ({pattern}): unknown route flags {:#x}",
                        ext.flags
                    ),
                ));
            }
            if kind == RouteKind::WebSocket && r.methods != abi::method::GET {
                return Err(fail(
                    spec,
                    format!("route {i} ({pattern}): a WebSocket route takes GET only"),
                ));
            }
            routes.push(RouteDef {
                methods: r.methods,
                pattern,
                kind,
                stream_body: ext.flags & abi::ROUTE_STREAM_BODY != 0,
                max_body_bytes: (ext.max_body_bytes != 0).then_some(ext.max_body_bytes),
            });
        }
        let ws = match (d.ws_open, d.ws_message, d.ws_close) {
            (Some(open), Some(message), Some(close)) => Some(WsCallbacks {
                open,
                message,
                close,
            }),
            _ if routes.iter().any(|r| r.kind == RouteKind::WebSocket) => {
                return Err(fail(
                    spec,
                    "has WebSocket routes but not all of ws_open, ws_message and ws_close",
                ));
            }
            _ => None,
        };
        Ok(Plugin {
            spec: spec.clone(),
            name,
            version,
            nonblocking: d.flags & abi::FLAG_NONBLOCKING != 0,
            routes,
            abi_minor: head.abi_minor,
            init,
            handle,
            shutdown,
            on_drain: d.on_drain,
            ws,
            state: std::sync::OnceLock::new(),
        })
    }

    /// Runs the plugin's `init` with its settings (a JSON object).
    pub fn initialise(&self, settings_json: &str, generation: u64) -> Result<(), PluginError> {
        let mut error = ErrorSink(None);
        let init = BatonInit {
            struct_size: std::mem::size_of::<BatonInit>() as u32,
            reserved: 0,
            host: &HOST_API,
            settings_json: BatonStr::new(settings_json.as_bytes()),
            generation,
            worker_pid: std::process::id(),
            reserved2: 0,
            error: (&mut error as *mut ErrorSink).cast(),
        };
        let mut state: *mut c_void = std::ptr::null_mut();
        // SAFETY: the arguments follow the ABI and outlive the call.
        let rc = unsafe { (self.init)(&init, &mut state) };
        if rc != 0 {
            let why = error
                .0
                .unwrap_or_else(|| format!("init returned {rc} without a message"));
            return Err(PluginError {
                file: self.spec.file.clone(),
                reason: format!("init failed: {why}"),
            });
        }
        let _ = self.state.set(State(state));
        Ok(())
    }

    /// Calls the handler of `call.route`.
    pub fn call(&self, call: &Call<'_>) -> Answer {
        self.call_with(call, CallOpts::default())
    }

    /// Calls the handler of `call.route` with what 1.1 adds: the stream buffer a deferred
    /// answer gets and the streamed request body. A non-blocking plugin's handler is
    /// called as on the host's own thread (it must not block: `WRITE_BLOCK` is refused).
    pub fn call_with(&self, call: &Call<'_>, opts: CallOpts) -> Answer {
        let Some(state) = self.state.get().copied() else {
            return Answer::Failed("plugin called before init".into());
        };
        let body_stream = opts.body.as_ref().map_or(0, stream::BodyStream::handle);
        let mut builder = Builder {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Vec::new(),
            error: None,
            stream_buffer_bytes: opts.stream_buffer_bytes,
            request_body: opts.body,
            deferred: None,
            handoff: opts.handoff,
            handed_off: None,
        };
        let rc = with_views(call, |headers, params| {
            let request = request_view(call, headers, params, body_stream);
            let response = (&mut builder as *mut Builder).cast::<BatonResponse>();
            // SAFETY: every view points into `call`, which outlives the call, or into
            // `headers` and `params`, which are not touched until it returns; `builder`
            // is only reached through the host functions below.
            let run = || unsafe { (self.handle)(state.0, &request, &HOST_API, response) };
            if self.nonblocking {
                stream::on_host_thread(run)
            } else {
                run()
            }
        });
        if let Some(handle) = builder.handed_off {
            return match (rc, builder.error) {
                (0, None) => Answer::HandedOff,
                (rc, error) => {
                    let message = error.unwrap_or_else(|| format!("handler returned {rc}"));
                    stream::fail(handle, &message);
                    Answer::Failed(message)
                }
            };
        }
        // A failed handler's stream, if any, is dropped here: the plugin sees it closed.
        match (rc, builder.error, builder.deferred) {
            (_, Some(message), _) => Answer::Failed(message),
            (0, None, Some(receiver)) => Answer::Deferred(receiver),
            (0, None, None) => Answer::Response {
                status: builder.status,
                headers: builder.headers,
                body: builder.body,
            },
            (rc, None, _) => Answer::Failed(format!("handler returned {rc}")),
        }
    }

    /// Tells the plugin its generation began to drain (its 1.1 `on_drain`, if it has one
    /// and `init` ran).
    pub fn drain(&self) {
        if let (Some(on_drain), Some(state)) = (self.on_drain, self.state.get()) {
            // SAFETY: the state `init` made; `on_drain` may run on any thread (ABI 1.1).
            stream::on_host_thread(|| unsafe { on_drain(state.0) });
        }
    }

    /// The 1.1 WebSocket callbacks, for a plugin with WebSocket routes.
    pub fn ws_callbacks(&self) -> Option<WsCallbacks> {
        self.ws
    }

    /// The state `init` made, as the WebSocket and stream code passes it back.
    pub fn state_ptr(&self) -> Option<*mut c_void> {
        self.state.get().map(|s| s.0)
    }

    /// Runs the plugin's `shutdown`, if `init` ran.
    pub fn shut_down(&self) {
        if let Some(state) = self.state.get() {
            // SAFETY: called once, after the last handler call, with the state `init` made.
            unsafe { (self.shutdown)(state.0) };
        }
    }
}

/// Reads the descriptor at `ptr`: the first `size` bytes of it (the plugin's
/// `struct_size`), the rest left as zeros (null pointers, no callbacks), so that nothing
/// past what the plugin declared is ever read.
fn read_descriptor(ptr: *const BatonPluginV1, size: usize) -> BatonPluginV1 {
    let mut d = std::mem::MaybeUninit::<BatonPluginV1>::zeroed();
    let n = size.min(std::mem::size_of::<BatonPluginV1>());
    // SAFETY: the plugin declares `size` readable bytes at `ptr` (checked to be at least
    // the 1.0 size); at most the host's struct size is copied into a zeroed value, and an
    // all-zero BatonPluginV1 is valid (null pointers, `None` functions, zero numbers).
    unsafe {
        std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), d.as_mut_ptr().cast::<u8>(), n);
        d.assume_init()
    }
}

thread_local! {
    /// Room for one call's header and parameter views, kept per thread so that a handler
    /// call allocates nothing of its own. Emptied before every call: what is left from the
    /// last one points into that call's request, and is never read.
    static VIEWS: RefCell<(Vec<BatonHeader>, Vec<BatonParam>)> =
        const { RefCell::new((Vec::new(), Vec::new())) };
}

/// `call` as the ABI's request: views into `call`, `headers` and `params`, valid as long
/// as they are.
pub(crate) fn request_view(
    call: &Call<'_>,
    headers: &[BatonHeader],
    params: &[BatonParam],
    body_stream: abi::BatonHandle,
) -> BatonRequest {
    BatonRequest {
        struct_size: std::mem::size_of::<BatonRequest>() as u32,
        route: call.route,
        method: BatonStr::new(call.method.as_str().as_bytes()),
        path: BatonStr::new(call.path.as_bytes()),
        query: BatonStr::new(call.query.as_bytes()),
        headers: headers.as_ptr(),
        headers_len: headers.len(),
        params: params.as_ptr(),
        params_len: params.len(),
        body: BatonStr::new(call.body),
        generation: call.generation,
        worker_pid: call.worker_pid,
        reserved: 0,
        body_stream,
    }
}

/// Runs `f` with `call`'s headers and path parameters as ABI views.
fn with_views<R>(call: &Call<'_>, f: impl FnOnce(&[BatonHeader], &[BatonParam]) -> R) -> R {
    let fill = |headers: &mut Vec<BatonHeader>, params: &mut Vec<BatonParam>| {
        headers.extend(call.headers.iter().map(|(name, value)| BatonHeader {
            name: BatonStr::new(name.as_str().as_bytes()),
            value: BatonStr::new(value.as_bytes()),
        }));
        params.extend(call.params.iter().map(|(n, v)| BatonParam {
            name: BatonStr::new(n.as_bytes()),
            value: BatonStr::new(v.as_bytes()),
        }));
    };
    VIEWS.with(|views| match views.try_borrow_mut() {
        Ok(mut views) => {
            let (headers, params) = &mut *views;
            headers.clear();
            params.clear();
            fill(headers, params);
            f(headers, params)
        }
        // Only if a handler were called from inside another: fresh room, then.
        Err(_) => {
            let (mut headers, mut params) = (Vec::new(), Vec::new());
            fill(&mut headers, &mut params);
            f(&headers, &params)
        }
    })
}

fn c_text(ptr: *const c_char) -> Option<String> {
    if ptr.is_null() {
        return None;
    }
    // SAFETY: the ABI requires NUL-terminated strings that live as long as the library.
    let text = unsafe { CStr::from_ptr(ptr) };
    text.to_str().ok().map(str::to_owned)
}

/// The useful part of a `dlopen` error ("invalid ELF header", "file too short", …).
fn dl_reason(e: &libloading::Error) -> String {
    let text = e.to_string();
    match text.rsplit_once(": ") {
        Some((_, reason)) if !reason.is_empty() => format!("{reason} ({text})"),
        _ => text,
    }
}

/// A response under construction; the host functions reach it through `BatonResponse`.
pub(crate) struct Builder {
    status: StatusCode,
    headers: HeaderMap,
    body: Vec<u8>,
    error: Option<String>,
    /// 1.1: the buffer of a deferred stream.
    stream_buffer_bytes: usize,
    /// 1.1: the streamed request body, handed to the stream on `defer`.
    request_body: Option<stream::BodyStream>,
    /// 1.1: `defer` was called: the answer is this stream.
    deferred: Option<stream::StreamReceiver>,
    /// 1.1: where the stream goes at `defer` time, if anywhere.
    handoff: Option<Handoff>,
    /// 1.1: `defer` was called and the stream went to the handoff.
    handed_off: Option<abi::BatonHandle>,
}

impl Builder {
    /// `defer`: the answer so far (status, headers, body) becomes a stream's beginning.
    /// 0 (refused) if called twice.
    pub(crate) fn defer(&mut self) -> abi::BatonHandle {
        if self.is_deferred() {
            return 0;
        }
        let receiver = stream::new_stream(
            self.stream_buffer_bytes,
            self.status,
            std::mem::take(&mut self.headers),
            std::mem::take(&mut self.body),
            self.request_body.take(),
        );
        let handle = receiver.handle();
        match self.handoff.take() {
            Some(Handoff(handoff)) => {
                handoff(receiver);
                self.handed_off = Some(handle);
            }
            None => self.deferred = Some(receiver),
        }
        handle
    }

    fn is_deferred(&self) -> bool {
        self.deferred.is_some() || self.handed_off.is_some()
    }
}

struct ErrorSink(Option<String>);

/// Reads a view a plugin passed in. The views come from plugin memory that is valid for
/// the duration of the host call, per the ABI.
unsafe fn view<'a>(s: BatonStr) -> &'a [u8] {
    // SAFETY: guaranteed by the caller (the ABI).
    unsafe { s.as_bytes() }
}

unsafe extern "C" fn host_set_status(response: *mut BatonResponse, status: u16) -> i32 {
    // SAFETY: `response` is the Builder the host passed to `handle`.
    let b = unsafe { &mut *response.cast::<Builder>() };
    if b.is_deferred() {
        return abi::BATON_E_STATE as i32;
    }
    match StatusCode::from_u16(status) {
        Ok(s) => {
            b.status = s;
            0
        }
        Err(_) => {
            b.error
                .get_or_insert_with(|| format!("set_status({status}): not a status code"));
            -1
        }
    }
}

unsafe extern "C" fn host_add_header(
    response: *mut BatonResponse,
    name: BatonStr,
    value: BatonStr,
) -> i32 {
    // SAFETY: as above; the views are valid for this call.
    let (b, name, value) = unsafe { (&mut *response.cast::<Builder>(), view(name), view(value)) };
    if b.is_deferred() {
        return abi::BATON_E_STATE as i32;
    }
    match (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
        (Ok(n), Ok(v)) => {
            b.headers.append(n, v);
            0
        }
        _ => {
            b.error.get_or_insert_with(|| {
                format!(
                    "add_header({:?}, {:?}): invalid header",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(value)
                )
            });
            -1
        }
    }
}

unsafe extern "C" fn host_write_body(response: *mut BatonResponse, data: BatonStr) -> i32 {
    // SAFETY: as above.
    let (b, data) = unsafe { (&mut *response.cast::<Builder>(), view(data)) };
    if b.is_deferred() {
        return abi::BATON_E_STATE as i32;
    }
    b.body.extend_from_slice(data);
    0
}

unsafe extern "C" fn host_fail(response: *mut BatonResponse, message: BatonStr) {
    // SAFETY: as above.
    let (b, message) = unsafe { (&mut *response.cast::<Builder>(), view(message)) };
    b.error
        .get_or_insert_with(|| String::from_utf8_lossy(message).into_owned());
}

unsafe extern "C" fn host_set_error(error: *mut BatonError, message: BatonStr) {
    // SAFETY: `error` is the ErrorSink passed in BatonInit.
    let (sink, message) = unsafe { (&mut *error.cast::<ErrorSink>(), view(message)) };
    sink.0 = Some(String::from_utf8_lossy(message).into_owned());
}

static HOST_API: BatonHostApi = BatonHostApi {
    struct_size: std::mem::size_of::<BatonHostApi>() as u32,
    reserved: 0,
    set_status: host_set_status,
    add_header: host_add_header,
    write_body: host_write_body,
    fail: host_fail,
    set_error: host_set_error,
    defer: stream::host_defer,
    stream_set_status: stream::host_set_status,
    stream_add_header: stream::host_add_header,
    stream_send_head: stream::host_send_head,
    stream_write: stream::host_write,
    stream_on_writable: stream::host_on_writable,
    stream_finish: stream::host_finish,
    stream_fail: stream::host_fail,
    stream_is_open: stream::host_is_open,
    body_read: stream::host_body_read,
    body_on_readable: stream::host_body_on_readable,
    ws_send: ws::host_ws_send,
    ws_close: ws::host_ws_close,
};

/// The method bits of a route, as text: `GET|HEAD`.
pub fn method_names(bits: u32) -> String {
    abi::method::NAMES
        .iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join("|")
}
