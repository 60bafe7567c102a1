//! The SDK's 1.1 types against a fake host: what `export_plugin!` declares, what each
//! call asks of the host, and the rules that keep a plugin safe whatever the host does:
//! callbacks freed exactly once, a dropped stream failed, an error after `defer` failing
//! the stream, a panic in a WebSocket callback closing that connection with 1011.
//!
//! The fake host records every call with its handle; each test uses handles of its own,
//! so tests running in parallel do not see each other's calls.
#![allow(unsafe_code)]

use baton_plugin::abi::*;
use baton_plugin::{
    InitContext, Message, Plugin, Refused, Request, Response, Stream, StreamError, WebSocket,
    WsHandle, export_plugin,
};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

// --- The fake host ----------------------------------------------------------------------

/// Handles at or above this are refused by the fake host's `*_on_*` functions (CLOSED).
const REFUSING: u64 = 1 << 40;

#[derive(Debug, Clone, PartialEq)]
enum Call {
    Write(Vec<u8>),
    Finish,
    Fail(String),
    Send(u32, Vec<u8>),
    Close(u16, String),
}

type Pending = (NotifyFn, usize);

#[derive(Default)]
struct Fake {
    calls: Vec<(u64, Call)>,
    /// Registered notifications by handle (`user` as a number).
    pending: HashMap<u64, Pending>,
    /// Handles that ended: further calls answer CLOSED.
    ended: Vec<u64>,
}

fn fake() -> std::sync::MutexGuard<'static, Fake> {
    static FAKE: OnceLock<Mutex<Fake>> = OnceLock::new();
    FAKE.get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
}

fn calls(handle: u64) -> Vec<Call> {
    fake()
        .calls
        .iter()
        .filter(|(h, _)| *h == handle)
        .map(|(_, c)| c.clone())
        .collect()
}

fn record(handle: u64, call: Call) -> i64 {
    let mut f = fake();
    if f.ended.contains(&handle) {
        return BATON_E_CLOSED;
    }
    if matches!(call, Call::Finish | Call::Fail(_)) {
        f.ended.push(handle);
    }
    f.calls.push((handle, call));
    BATON_OK
}

/// Runs the notification registered for `handle`, as the host would (once).
fn fire(handle: u64) -> bool {
    let registered = fake().pending.remove(&handle);
    match registered {
        Some((notify, user)) => {
            // SAFETY: `notify` and `user` are what the SDK registered, called once.
            unsafe { notify(user as *mut c_void, handle) };
            true
        }
        None => false,
    }
}

fn text(s: BatonStr) -> String {
    // SAFETY: the SDK passes views valid for the call.
    String::from_utf8_lossy(unsafe { s.as_bytes() }).into_owned()
}

unsafe extern "C" fn set_status(_: *mut BatonResponse, _: u16) -> i32 {
    0
}
unsafe extern "C" fn add_header(_: *mut BatonResponse, _: BatonStr, _: BatonStr) -> i32 {
    0
}
unsafe extern "C" fn write_body(_: *mut BatonResponse, _: BatonStr) -> i32 {
    0
}
unsafe extern "C" fn fail(response: *mut BatonResponse, message: BatonStr) {
    record(response as u64, Call::Fail(text(message)));
}
unsafe extern "C" fn set_error(_: *mut BatonError, _: BatonStr) {}
/// The stream's handle is the response's address: unique per test.
unsafe extern "C" fn defer(response: *mut BatonResponse) -> BatonHandle {
    response as u64
}
unsafe extern "C" fn stream_set_status(_: BatonHandle, _: u16) -> i64 {
    BATON_OK
}
unsafe extern "C" fn stream_add_header(_: BatonHandle, _: BatonStr, _: BatonStr) -> i64 {
    BATON_OK
}
unsafe extern "C" fn stream_send_head(_: BatonHandle) -> i64 {
    BATON_OK
}
unsafe extern "C" fn stream_write(stream: BatonHandle, data: BatonStr, _: u32) -> i64 {
    // SAFETY: as in `text`.
    let bytes = unsafe { data.as_bytes() }.to_vec();
    let n = bytes.len() as i64;
    match record(stream, Call::Write(bytes)) {
        BATON_OK => n,
        e => e,
    }
}
unsafe extern "C" fn on_notify(handle: BatonHandle, notify: NotifyFn, user: *mut c_void) -> i64 {
    if handle >= REFUSING {
        return BATON_E_CLOSED;
    }
    fake().pending.insert(handle, (notify, user as usize));
    BATON_OK
}
unsafe extern "C" fn stream_finish(stream: BatonHandle) -> i64 {
    record(stream, Call::Finish)
}
unsafe extern "C" fn stream_fail(stream: BatonHandle, message: BatonStr) -> i64 {
    record(stream, Call::Fail(text(message)))
}
unsafe extern "C" fn stream_is_open(stream: BatonHandle) -> i32 {
    i32::from(!fake().ended.contains(&stream))
}
unsafe extern "C" fn body_read(_: BatonHandle, _: *mut u8, _: usize, _: u32) -> i64 {
    0
}
unsafe extern "C" fn ws_send(ws: BatonHandle, kind: u32, data: BatonStr) -> i64 {
    // SAFETY: as in `text`.
    record(ws, Call::Send(kind, unsafe { data.as_bytes() }.to_vec()))
}
unsafe extern "C" fn ws_close(ws: BatonHandle, code: u16, reason: BatonStr) -> i64 {
    record(ws, Call::Close(code, text(reason)))
}

static HOST: BatonHostApi = BatonHostApi {
    struct_size: std::mem::size_of::<BatonHostApi>() as u32,
    reserved: 0,
    set_status,
    add_header,
    write_body,
    fail,
    set_error,
    defer,
    stream_set_status,
    stream_add_header,
    stream_send_head,
    stream_write,
    stream_on_writable: on_notify,
    stream_finish,
    stream_fail,
    stream_is_open,
    body_read,
    body_on_readable: on_notify,
    ws_send,
    ws_close,
};

// --- The plugin under test ----------------------------------------------------------------

/// Streams handlers leave behind, by handle.
static KEPT: Mutex<Vec<Stream>> = Mutex::new(Vec::new());
static DRAINS: AtomicUsize = AtomicUsize::new(0);
static CONNS_DROPPED: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug)]
pub struct Probe;

/// A connection's state; counts its drops.
#[derive(Debug)]
pub struct Conn {
    messages: Arc<AtomicUsize>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        CONNS_DROPPED.fetch_add(1, Ordering::SeqCst);
    }
}

static MESSAGES: OnceLock<Arc<AtomicUsize>> = OnceLock::new();

impl Plugin for Probe {
    fn init(_: &InitContext) -> Result<Self, String> {
        Ok(Probe)
    }

    fn drain(&self) {
        DRAINS.fetch_add(1, Ordering::SeqCst);
    }
}

impl Probe {
    fn keep(&self, _: &Request, resp: &mut Response) -> Result<(), String> {
        let stream = resp.defer().ok_or("refused")?;
        assert!(resp.defer().is_none(), "a second defer must be refused");
        KEPT.lock().unwrap().push(stream);
        Ok(())
    }

    fn defer_then_fail(&self, _: &Request, resp: &mut Response) -> Result<(), String> {
        let stream = resp.defer().ok_or("refused")?;
        KEPT.lock().unwrap().push(stream);
        Err("failed after deferring".into())
    }

    fn defer_then_panic(&self, _: &Request, resp: &mut Response) -> Result<(), String> {
        let _stream = resp.defer().ok_or("refused")?;
        panic!("panicked after deferring");
    }

    fn upload(&self, _: &Request, _: &mut Response) -> Result<(), String> {
        Ok(())
    }

    fn open(&self, req: &Request, ws: WsHandle) -> Result<Conn, Refused> {
        if req.query() == "refuse" {
            return Err(Refused);
        }
        KEPT_WS.lock().unwrap().push(ws);
        Ok(Conn {
            messages: MESSAGES.get_or_init(Default::default).clone(),
        })
    }
}

impl WebSocket for Probe {
    type Conn = Conn;

    fn message(&self, conn: &mut Conn, ws: &WsHandle, message: Message<'_>) {
        conn.messages.fetch_add(1, Ordering::SeqCst);
        match message {
            Message::Text("panic") => panic!("told to panic"),
            Message::Text(text) => ws.send_text(text).unwrap(),
            Message::Binary(data) => ws.send_binary(data).unwrap(),
        }
    }
}

export_plugin! {
    plugin: Probe,
    name: "probe",
    version: "1.2.3",
    nonblocking: true,
    routes: [
        GET "/keep" => keep,
        GET "/defer-fail" => defer_then_fail,
        GET "/defer-panic" => defer_then_panic,
        PUT | POST "/upload" => upload { stream_body: true, max_body_bytes: 1 << 33 },
        WS "/ws/{room}" => open { max_body_bytes: 4096 },
    ],
}

// --- Driving it ------------------------------------------------------------------------

unsafe extern "C" {
    /// The entry point `export_plugin!` defined above, found by its symbol as the host does.
    fn baton_plugin_v1() -> *const BatonPluginV1;
}

fn descriptor() -> &'static BatonPluginV1 {
    // SAFETY: the descriptor is a static of this binary.
    unsafe { &*baton_plugin_v1() }
}

/// The plugin's state, `init` run once with the fake host.
fn state() -> *mut c_void {
    static STATE: OnceLock<usize> = OnceLock::new();
    *STATE.get_or_init(|| {
        let settings = b"{}";
        let init = BatonInit {
            struct_size: std::mem::size_of::<BatonInit>() as u32,
            reserved: 0,
            host: &HOST,
            settings_json: BatonStr::new(settings),
            generation: 1,
            worker_pid: 1,
            reserved2: 0,
            error: std::ptr::null_mut(),
        };
        let mut state = std::ptr::null_mut();
        // SAFETY: valid arguments, per the ABI.
        let code = unsafe { (descriptor().init.unwrap())(&init, &mut state) };
        assert_eq!(code, 0);
        state as usize
    }) as *mut c_void
}

fn request(route: u32, query: &'static str) -> BatonRequest {
    BatonRequest {
        struct_size: std::mem::size_of::<BatonRequest>() as u32,
        route,
        method: BatonStr::new(b"GET"),
        path: BatonStr::new(b"/"),
        query: BatonStr::new(query.as_bytes()),
        headers: std::ptr::null(),
        headers_len: 0,
        params: std::ptr::null(),
        params_len: 0,
        body: BatonStr::new(b""),
        generation: 1,
        worker_pid: 1,
        reserved: 0,
        body_stream: 0,
    }
}

/// Calls `handle` for `route` with a response whose address (the stream's handle once
/// deferred) is `id`.
fn handle(route: u32, id: u64) -> i32 {
    let req = request(route, "");
    // SAFETY: valid arguments; the fake host never dereferences the response.
    unsafe { (descriptor().handle.unwrap())(state(), &req, &HOST, id as *mut BatonResponse) }
}

fn take_kept(id: u64) -> Stream {
    let mut kept = KEPT.lock().unwrap();
    let i = kept
        .iter()
        .position(|s| s.id() == id)
        .expect("no stream kept");
    kept.remove(i)
}

/// Counts how often it was run and dropped.
#[derive(Debug, Default)]
struct Counts {
    ran: AtomicUsize,
    dropped: AtomicUsize,
}

struct Token(Arc<Counts>);

impl Drop for Token {
    fn drop(&mut self) {
        self.0.dropped.fetch_add(1, Ordering::SeqCst);
    }
}

impl Token {
    fn run(self) {
        self.0.ran.fetch_add(1, Ordering::SeqCst);
    }
}

// --- Tests ------------------------------------------------------------------------------

#[test]
fn the_macro_declares_abi_1_1_routes_extensions_and_callbacks() {
    let d = descriptor();
    assert_eq!(d.magic, MAGIC);
    assert_eq!((d.abi_major, d.abi_minor), (1, 1));
    assert_eq!(d.struct_size as usize, std::mem::size_of::<BatonPluginV1>());
    assert_eq!(d.routes_len, 5);
    // SAFETY: the macro's arrays have `routes_len` entries.
    let (routes, ext) = unsafe {
        (
            std::slice::from_raw_parts(d.routes, d.routes_len),
            std::slice::from_raw_parts(d.route_ext, d.routes_len),
        )
    };
    assert_eq!(routes[3].methods, method::PUT | method::POST);
    assert_eq!(routes[4].methods, method::GET, "a WebSocket route is a GET");
    let kinds: Vec<(u32, u32, u64)> = ext
        .iter()
        .map(|e| (e.kind, e.flags, e.max_body_bytes))
        .collect();
    assert_eq!(
        kinds,
        [
            (ROUTE_HTTP, 0, 0),
            (ROUTE_HTTP, 0, 0),
            (ROUTE_HTTP, 0, 0),
            (ROUTE_HTTP, ROUTE_STREAM_BODY, 1 << 33),
            (ROUTE_WEBSOCKET, 0, 4096),
        ]
    );
    assert!(d.on_drain.is_some());
    assert!(d.ws_open.is_some() && d.ws_message.is_some() && d.ws_close.is_some());
}

#[test]
fn drain_reaches_the_plugin() {
    let before = DRAINS.load(Ordering::SeqCst);
    // SAFETY: the state `init` made.
    unsafe { (descriptor().on_drain.unwrap())(state()) };
    assert_eq!(DRAINS.load(Ordering::SeqCst), before + 1);
}

#[test]
fn a_deferred_stream_writes_and_finishes_through_the_host() {
    let id = 0x1000;
    assert_eq!(handle(0, id), 0);
    let mut stream = take_kept(id);
    assert!(stream.is_open());
    assert_eq!(stream.write(b"chunk"), Ok(5));
    stream.finish().unwrap();
    assert_eq!(calls(id), [Call::Write(b"chunk".to_vec()), Call::Finish]);
}

#[test]
fn a_stream_dropped_unfinished_is_failed_once() {
    let id = 0x2000;
    assert_eq!(handle(0, id), 0);
    let mut stream = take_kept(id);
    stream.write(b"partial").unwrap();
    drop(stream);
    let calls = calls(id);
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(matches!(&calls[1], Call::Fail(m) if m.contains("without finishing")));
}

#[test]
fn a_stream_seen_closed_is_not_failed_on_drop() {
    let id = 0x2800;
    assert_eq!(handle(0, id), 0);
    let mut stream = take_kept(id);
    fake().ended.push(id); // the client went away
    assert!(!stream.is_open());
    assert_eq!(stream.write(b"x"), Err(StreamError::Closed));
    drop(stream);
    assert_eq!(calls(id), []);
}

#[test]
fn an_error_or_a_panic_after_defer_fails_the_stream_and_returns_0() {
    let id = 0x3000;
    assert_eq!(handle(1, id), 0, "a deferred handler returns 0");
    assert_eq!(
        calls(id),
        [Call::Fail("failed after deferring".into())],
        "the stream is failed, the response is not"
    );
    // The stream the handler kept only hears Closed now, and its drop does nothing.
    let mut stream = take_kept(id);
    assert_eq!(stream.write(b"late"), Err(StreamError::Closed));
    drop(stream);
    assert_eq!(calls(id).len(), 1);

    let id = 0x3800;
    assert_eq!(handle(2, id), 0);
    let calls = calls(id);
    assert!(
        matches!(&calls[..], [Call::Fail(m)] if m.contains("panicked")),
        "{calls:?}"
    );
}

#[test]
fn a_writable_callback_runs_once_and_is_freed_once() {
    let id = 0x4000;
    assert_eq!(handle(0, id), 0);
    let stream = take_kept(id);

    let counts = Arc::new(Counts::default());
    let token = Token(counts.clone());
    stream.on_writable(move || token.run()).unwrap();
    // One registration at a time: a second one is refused, and its closure freed unrun.
    let second = Token(counts.clone());
    assert_eq!(
        stream.on_writable(move || second.run()),
        Err(StreamError::State)
    );
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 1);
    assert!(fire(id));
    assert!(!fire(id), "the host calls a notification once");
    assert_eq!(counts.ran.load(Ordering::SeqCst), 1);
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 2);

    // when_writable hands the stream back.
    let counts2 = Arc::new(Counts::default());
    let token = Token(counts2.clone());
    stream
        .when_writable(move |stream| {
            token.run();
            stream.finish().unwrap();
        })
        .unwrap();
    assert!(fire(id));
    assert_eq!(counts2.ran.load(Ordering::SeqCst), 1);
    assert_eq!(counts2.dropped.load(Ordering::SeqCst), 1);
    assert_eq!(calls(id), [Call::Finish]);
}

#[test]
fn a_refused_callback_is_freed_unrun_and_a_panicking_one_is_caught() {
    let id = REFUSING + 0x5000;
    assert_eq!(handle(0, id), 0);
    let stream = take_kept(id);
    let counts = Arc::new(Counts::default());
    let token = Token(counts.clone());
    assert_eq!(
        stream.on_writable(move || token.run()),
        Err(StreamError::Closed)
    );
    assert_eq!(counts.ran.load(Ordering::SeqCst), 0);
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 1);
    // when_writable refused: the stream is dropped with the closure, so it is failed.
    let token = Token(counts.clone());
    assert_eq!(
        stream.when_writable(move |_| token.run()),
        Err(StreamError::Closed)
    );
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 2);
    assert!(matches!(&calls(id)[..], [Call::Fail(_)]));

    let id = 0x5800;
    assert_eq!(handle(0, id), 0);
    let stream = take_kept(id);
    let token = Token(counts.clone());
    stream
        .when_writable(move |_stream| {
            let _token = token;
            panic!("a callback panics");
        })
        .unwrap();
    assert!(fire(id), "the panic is caught inside the notification");
    assert_eq!(counts.dropped.load(Ordering::SeqCst), 3);
    // The stream, dropped while unwinding, was failed.
    assert!(matches!(&calls(id)[..], [Call::Fail(_)]));
}

fn ws_open(ws: u64, query: &'static str) -> (i32, *mut c_void) {
    let req = request(4, query);
    let mut user = std::ptr::null_mut();
    // SAFETY: valid arguments, per the ABI.
    let code = unsafe { (descriptor().ws_open.unwrap())(state(), &req, &HOST, ws, &mut user) };
    (code, user)
}

fn ws_message(user: *mut c_void, ws: u64, kind: u32, data: &[u8]) {
    // SAFETY: `user` is what ws_open set, not closed yet.
    unsafe { (descriptor().ws_message.unwrap())(state(), user, ws, kind, BatonStr::new(data)) }
}

fn ws_closed(user: *mut c_void, ws: u64) {
    // SAFETY: as above; called once.
    unsafe { (descriptor().ws_close.unwrap())(state(), user, ws, 1000, BatonStr::new(b"bye")) }
}

#[test]
fn websocket_callbacks_reach_the_plugin_and_a_panic_closes_with_1011() {
    // Refused: non-zero, no state.
    let (code, user) = ws_open(0x6000, "refuse");
    assert_ne!(code, 0);
    assert!(user.is_null());

    let ws = 0x6800;
    let (code, user) = ws_open(ws, "");
    assert_eq!(code, 0);
    assert!(!user.is_null());
    ws_message(user, ws, ws::TEXT, b"hi");
    ws_message(user, ws, ws::BINARY, &[1, 2]);
    ws_message(user, ws, ws::TEXT, b"panic");
    let delivered = MESSAGES.get().unwrap().load(Ordering::SeqCst);
    // After the panic nothing more is delivered to the connection.
    ws_message(user, ws, ws::TEXT, b"after");
    assert_eq!(MESSAGES.get().unwrap().load(Ordering::SeqCst), delivered);
    // Text that is not UTF-8 (a host would never pass it) closes with 1007, not UB.
    let ws2 = 0x6900;
    let (_, user2) = ws_open(ws2, "");
    ws_message(user2, ws2, ws::TEXT, &[0xff, 0xfe]);

    let dropped = CONNS_DROPPED.load(Ordering::SeqCst);
    ws_closed(user, ws);
    ws_closed(user2, ws2);
    assert_eq!(CONNS_DROPPED.load(Ordering::SeqCst), dropped + 2);
    assert_eq!(
        calls(ws),
        [
            Call::Send(ws::TEXT, b"hi".to_vec()),
            Call::Send(ws::BINARY, vec![1, 2]),
            Call::Close(1011, "internal error".into()),
        ]
    );
    assert_eq!(calls(ws2), [Call::Close(1007, "invalid UTF-8".into())]);

    // A handle kept after its connection closed only hears Closed from the host, and a
    // close reason longer than the protocol allows is cut at a character boundary.
    let stale = kept_ws(ws);
    fake().ended.push(ws);
    assert_eq!(stale.send_text("late"), Err(StreamError::Closed));
    let ws3 = 0x6a00;
    let (_, user3) = ws_open(ws3, "");
    kept_ws(ws3).close(4000, &"é".repeat(100)).unwrap();
    ws_closed(user3, ws3);
    assert_eq!(calls(ws3), [Call::Close(4000, "é".repeat(61))]);
}

/// Handles the open method was given, by id.
static KEPT_WS: Mutex<Vec<WsHandle>> = Mutex::new(Vec::new());

fn kept_ws(id: u64) -> WsHandle {
    let kept = KEPT_WS.lock().unwrap();
    kept.iter().find(|h| h.id() == id).cloned().expect("kept")
}

#[test]
fn streams_bodies_and_handles_cross_threads() {
    fn send<T: Send + 'static>() {}
    fn shared<T: Send + Sync + Clone + 'static>() {}
    send::<Stream>();
    send::<baton_plugin::Body>();
    shared::<WsHandle>();
    // A stream moved to another thread and finished there.
    let id = 0x7000;
    assert_eq!(handle(0, id), 0);
    let mut stream = take_kept(id);
    std::thread::spawn(move || {
        stream.write_blocking(b"from a thread").unwrap();
        stream.finish().unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(
        calls(id),
        [Call::Write(b"from a thread".to_vec()), Call::Finish]
    );
}
