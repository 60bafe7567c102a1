//! ABI 1.1 WebSocket connections, the plugin's side of them: a registry of open
//! connections by handle, the host functions `ws_send` and `ws_close` (callable from any
//! thread), and safe wrappers around the plugin's `ws_open`, `ws_message` and `ws_close`.
//!
//! The protocol itself (handshake, framing, ping/pong, the close handshake) is the
//! worker's `websocket` module; this module never touches a socket. What a plugin sends
//! goes into its connection's [`Outbox`]: a queue bounded by `send_queue_bytes`, which the
//! worker's connection task drains into the socket. A send that would overflow it (the
//! client does not read) empties it, refuses every later send and tells the task to close
//! the client: memory stays bounded whatever the plugin or the client do.
//!
//! Handles are numbers that are never reused, tagged so that a stream's handle is never
//! taken for a WebSocket's. A handle used after its connection closed, or one that never
//! was, answers [`BATON_E_CLOSED`] and touches nothing.
//!
//! Callback rules (the worker keeps them): `ws_open` first (a refusal ends it there, and
//! no `ws_close` follows: the connection never opened), then `ws_message` one at a time
//! and in order, then `ws_close` exactly once, last; when it returns, the [`Outbox`] is
//! dropped and the handle is dead.

use crate::{Call, Plugin, with_views};
use baton_plugin::abi::{self, BATON_E_CLOSED, BATON_E_INVALID, BATON_OK, BatonHandle, BatonStr};
use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, RwLock};
use tokio::sync::Notify;

/// Set in every WebSocket handle, so that no other kind of handle is ever one.
const WS_TAG: u64 = 1 << 62;
/// The longest close reason a close frame carries (RFC 6455 §5.5: 125 bytes of payload).
pub const MAX_CLOSE_REASON: usize = 123;

/// The next handle's number; handles are never reused.
static NEXT: AtomicU64 = AtomicU64::new(1);
/// Open connections by handle.
static REGISTRY: LazyLock<RwLock<HashMap<BatonHandle, Arc<Entry>>>> =
    LazyLock::new(|| RwLock::new(HashMap::new()));

/// A message a plugin sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outgoing {
    Text(String),
    Binary(Vec<u8>),
}

impl Outgoing {
    fn len(&self) -> usize {
        match self {
            Outgoing::Text(t) => t.len(),
            Outgoing::Binary(b) => b.len(),
        }
    }
}

/// What the connection task is to do next, from [`Outbox::take`].
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Send this message.
    Send(Outgoing),
    /// Nothing queued: wait for [`Outbox::ready`].
    Idle,
    /// The plugin closed the connection (everything it sent before is out).
    Close(u16, String),
    /// The client let the queue overflow: close it as configured.
    Overflowed,
    /// The connection is closing on the host's side; nothing more comes.
    Shut,
}

#[derive(Debug)]
enum QueueState {
    Open,
    /// The plugin called `ws_close`; queued messages go first.
    Closing(u16, String),
    Overflowed,
    /// The host closes (or closed) the connection.
    Shut,
}

#[derive(Debug)]
struct Queue {
    items: VecDeque<Outgoing>,
    bytes: usize,
    state: QueueState,
    /// Called at the next change, for a connection waiting without its task.
    on_change: Option<OnChange>,
}

/// What [`Changes::call_on_change`] registered.
struct OnChange(Box<dyn FnOnce() + Send>);

impl std::fmt::Debug for OnChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnChange")
    }
}

#[derive(Debug)]
struct Entry {
    queue: Mutex<Queue>,
    /// Bytes the queue may hold (at least one message is always taken).
    limit: usize,
    /// Wakes the connection task: something was queued, or the state changed.
    wake: Notify,
}

impl Entry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while the lock is held cannot leave the queue inconsistent (every
        // update is a push or a state change), so a poisoned lock is used as it is.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, message: Outgoing) -> i64 {
        let mut q = self.lock();
        if !matches!(q.state, QueueState::Open) {
            return BATON_E_CLOSED;
        }
        let len = message.len();
        if q.bytes > 0 && q.bytes.saturating_add(len) > self.limit {
            // The client is not reading: drop what waits and close it.
            q.items = VecDeque::new();
            q.bytes = 0;
            q.state = QueueState::Overflowed;
            self.changed(q);
            return BATON_E_CLOSED;
        }
        q.bytes += len;
        q.items.push_back(message);
        self.changed(q);
        BATON_OK
    }

    fn close(&self, code: u16, reason: String) -> i64 {
        let mut q = self.lock();
        if !matches!(q.state, QueueState::Open) {
            return BATON_E_CLOSED;
        }
        q.state = QueueState::Closing(code, reason);
        self.changed(q);
        BATON_OK
    }

    /// Wakes the connection task after a change made under `q`, and whatever waits for
    /// a connection without its task (outside the lock).
    fn changed(&self, mut q: std::sync::MutexGuard<'_, Queue>) {
        let on_change = q.on_change.take();
        drop(q);
        self.wake.notify_one();
        if let Some(OnChange(f)) = on_change {
            f();
        }
    }
}

/// One connection's registration: its handle and its send queue, read by the worker's
/// connection task. Dropping it unregisters the handle (after `ws_close` returned).
#[derive(Debug)]
pub struct Outbox {
    handle: BatonHandle,
    entry: Arc<Entry>,
}

impl Outbox {
    /// Registers a new connection whose queue holds at most `send_queue_bytes` (one
    /// message is always taken, however large).
    pub fn register(send_queue_bytes: usize) -> Outbox {
        let handle = WS_TAG | NEXT.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            queue: Mutex::new(Queue {
                items: VecDeque::new(),
                bytes: 0,
                state: QueueState::Open,
                on_change: None,
            }),
            limit: send_queue_bytes,
            wake: Notify::new(),
        });
        REGISTRY
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(handle, entry.clone());
        Outbox { handle, entry }
    }

    /// The handle the plugin knows the connection by.
    pub fn handle(&self) -> BatonHandle {
        self.handle
    }

    /// The next thing to do: a queued message first, then the plugin's close or the
    /// overflow.
    pub fn take(&self) -> Next {
        let mut q = self.entry.lock();
        if let Some(message) = q.items.pop_front() {
            q.bytes -= message.len();
            return Next::Send(message);
        }
        match &q.state {
            QueueState::Open => Next::Idle,
            QueueState::Closing(code, reason) => Next::Close(*code, reason.clone()),
            QueueState::Overflowed => Next::Overflowed,
            QueueState::Shut => Next::Shut,
        }
    }

    /// The next queued message, if any (the state is left for [`Outbox::take`]).
    pub fn take_message(&self) -> Option<Outgoing> {
        let mut q = self.entry.lock();
        let message = q.items.pop_front()?;
        q.bytes -= message.len();
        Some(message)
    }

    /// Resolves when something was queued or the state changed since the last time it
    /// resolved (a wake-up that came before the wait is not lost).
    pub async fn ready(&self) {
        self.entry.wake.notified().await;
    }

    /// The host is closing the connection: later sends answer `BATON_E_CLOSED` and what
    /// is queued is dropped.
    pub fn shut(&self) {
        let mut q = self.entry.lock();
        q.items = VecDeque::new();
        q.bytes = 0;
        q.state = QueueState::Shut;
        q.on_change = None;
    }

    /// The client let the queue overflow.
    pub fn overflowed(&self) -> bool {
        matches!(self.entry.lock().state, QueueState::Overflowed)
    }

    /// Closes the connection with `code` once what is queued is sent, as the plugin's
    /// `ws_close` does; `false` (and nothing done) if it is closing already.
    pub fn close_after_queue(&self, code: u16, reason: &str) -> bool {
        self.entry.close(code, reason.to_owned()) == BATON_OK
    }

    /// Bytes queued right now.
    pub fn queued_bytes(&self) -> usize {
        self.entry.lock().bytes
    }

    /// The queue's changes, for a connection that waits without its task (the outbox
    /// itself waits with it).
    pub fn changes(&self) -> Changes {
        Changes(self.entry.clone())
    }
}

/// The changes of one [`Outbox`], watched while its connection waits without a task.
#[derive(Debug)]
pub struct Changes(Arc<Entry>);

impl Changes {
    /// Calls `f` once, from the thread that queues the next message or closes (the plugin's
    /// `ws_send` or `ws_close`, or an overflow). `false`, and `f` dropped, if something is
    /// queued or the queue is not open any more: the connection has work now.
    pub fn call_on_change(&self, f: Box<dyn FnOnce() + Send>) -> bool {
        let mut q = self.0.lock();
        if !q.items.is_empty() || !matches!(q.state, QueueState::Open) {
            return false;
        }
        q.on_change = Some(OnChange(f));
        true
    }

    /// Forgets what [`Changes::call_on_change`] registered (the connection has its task
    /// again).
    pub fn forget(&self) {
        self.0.lock().on_change = None;
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        self.shut();
        REGISTRY
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.handle);
    }
}

/// The number of connections registered right now (open, or being opened or closed).
pub fn registered() -> usize {
    REGISTRY.read().unwrap_or_else(|p| p.into_inner()).len()
}

/// The `user` pointer a plugin's `ws_open` set, passed back to its other callbacks.
#[derive(Debug, Clone, Copy)]
struct User(*mut c_void);
// SAFETY: the ABI lets the WebSocket callbacks run on any thread (one at a time per
// connection, which the worker keeps); the host never dereferences the pointer.
unsafe impl Send for User {}
// SAFETY: as above.
unsafe impl Sync for User {}

/// A message's kind, as the ABI numbers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Binary,
}

/// An open connection as its plugin knows it: the handle and the `user` pointer. Copied
/// into each callback; the worker keeps the callback order.
#[derive(Debug, Clone, Copy)]
pub struct Session {
    handle: BatonHandle,
    user: User,
}

/// Calls the plugin's `ws_open` for `call` (the upgrade request). `Ok`: the connection
/// is open; `Err(rc)`: the plugin refused it (or has no WebSocket callbacks, or no
/// state: -1), and no other callback follows.
pub fn open(plugin: &Plugin, call: &Call<'_>, outbox: &Outbox) -> Result<Session, i32> {
    let (Some(cb), Some(state)) = (plugin.ws_callbacks(), plugin.state_ptr()) else {
        return Err(-1);
    };
    let mut user: *mut c_void = std::ptr::null_mut();
    let rc = with_views(call, |headers, params| {
        // A WebSocket upgrade carries no body.
        let request = crate::request_view(call, headers, params, 0);
        // SAFETY: every view points into `call`, `headers` or `params`, all of which
        // outlive the call; `user` is a valid place for the plugin to write a pointer;
        // `state` is what `init` made.
        unsafe { (cb.open)(state, &request, &crate::HOST_API, outbox.handle, &mut user) }
    });
    if rc == 0 {
        Ok(Session {
            handle: outbox.handle,
            user: User(user),
        })
    } else {
        Err(rc)
    }
}

impl Session {
    /// The connection's handle.
    pub fn handle(&self) -> BatonHandle {
        self.handle
    }

    /// Calls the plugin's `ws_message` with one whole message.
    pub fn message(&self, plugin: &Plugin, kind: Kind, data: &[u8]) {
        let (Some(cb), Some(state)) = (plugin.ws_callbacks(), plugin.state_ptr()) else {
            return;
        };
        let kind = match kind {
            Kind::Text => abi::ws::TEXT,
            Kind::Binary => abi::ws::BINARY,
        };
        // SAFETY: `data` outlives the call; `user` is what `ws_open` set for this
        // connection and `state` what `init` made.
        unsafe { (cb.message)(state, self.user.0, self.handle, kind, BatonStr::new(data)) };
    }

    /// Calls the plugin's `ws_close`, the connection's last callback (consumed: no other
    /// can follow).
    pub fn closed(self, plugin: &Plugin, code: u16, reason: &str) {
        let (Some(cb), Some(state)) = (plugin.ws_callbacks(), plugin.state_ptr()) else {
            return;
        };
        // SAFETY: as for `message`; the reason outlives the call.
        unsafe {
            (cb.close)(
                state,
                self.user.0,
                self.handle,
                code,
                BatonStr::new(reason.as_bytes()),
            )
        };
    }
}

fn entry(ws: BatonHandle) -> Option<Arc<Entry>> {
    if ws & WS_TAG == 0 {
        return None;
    }
    REGISTRY
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .get(&ws)
        .cloned()
}

/// A close code a plugin may send (RFC 6455 §7.4): the defined ones an endpoint may put
/// in a frame, and the registered (3000–3999) and private (4000–4999) ranges.
pub fn sendable_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// `host->ws_send`.
///
/// # Safety
/// `data` must be a valid view for the duration of the call (the ABI's rule).
pub(crate) unsafe extern "C" fn host_ws_send(ws: BatonHandle, kind: u32, data: BatonStr) -> i64 {
    // SAFETY: guaranteed by the caller.
    let bytes = unsafe { data.as_bytes() };
    let message = match kind {
        abi::ws::TEXT => match std::str::from_utf8(bytes) {
            Ok(text) => Outgoing::Text(text.to_owned()),
            Err(_) => return BATON_E_INVALID,
        },
        abi::ws::BINARY => Outgoing::Binary(bytes.to_vec()),
        _ => return BATON_E_INVALID,
    };
    match entry(ws) {
        Some(entry) => entry.send(message),
        None => BATON_E_CLOSED,
    }
}

/// `host->ws_close`.
///
/// # Safety
/// `reason` must be a valid view for the duration of the call (the ABI's rule).
pub(crate) unsafe extern "C" fn host_ws_close(ws: BatonHandle, code: u16, reason: BatonStr) -> i64 {
    // SAFETY: guaranteed by the caller.
    let bytes = unsafe { reason.as_bytes() };
    let Some(entry) = entry(ws) else {
        return BATON_E_CLOSED;
    };
    match std::str::from_utf8(bytes) {
        Ok(reason) if sendable_close_code(code) && reason.len() <= MAX_CLOSE_REASON => {
            entry.close(code, reason.to_owned())
        }
        _ => BATON_E_INVALID,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(ws: BatonHandle, kind: u32, data: &[u8]) -> i64 {
        // SAFETY: the view is valid for the call.
        unsafe { host_ws_send(ws, kind, BatonStr::new(data)) }
    }

    fn close(ws: BatonHandle, code: u16, reason: &str) -> i64 {
        // SAFETY: the view is valid for the call.
        unsafe { host_ws_close(ws, code, BatonStr::new(reason.as_bytes())) }
    }

    #[test]
    fn a_quiet_connection_hears_of_the_next_send_or_close_once() {
        use std::sync::atomic::AtomicUsize;
        let outbox = Outbox::register(1024);
        let ws = outbox.handle();
        let heard = Arc::new(AtomicUsize::new(0));
        let hear = || -> Box<dyn FnOnce() + Send> {
            let heard = heard.clone();
            Box::new(move || {
                heard.fetch_add(1, Ordering::SeqCst);
            })
        };
        let changes = outbox.changes();
        assert!(changes.call_on_change(hear()));
        assert_eq!(send(ws, abi::ws::TEXT, b"one"), BATON_OK);
        assert_eq!(send(ws, abi::ws::TEXT, b"two"), BATON_OK);
        assert_eq!(heard.load(Ordering::SeqCst), 1, "called once");
        // Something is queued: the connection has work now, nothing is registered.
        assert!(!changes.call_on_change(hear()));
        while outbox.take_message().is_some() {}
        assert!(changes.call_on_change(hear()));
        changes.forget();
        assert_eq!(send(ws, abi::ws::TEXT, b"three"), BATON_OK);
        assert_eq!(heard.load(Ordering::SeqCst), 1, "forgotten");
        while outbox.take_message().is_some() {}
        assert!(changes.call_on_change(hear()));
        assert_eq!(close(ws, 1000, "bye"), BATON_OK);
        assert_eq!(heard.load(Ordering::SeqCst), 2, "a close is a change");
        assert!(!changes.call_on_change(hear()), "closing: not open");
    }

    #[test]
    fn sends_queue_in_order_and_text_must_be_utf8() {
        let outbox = Outbox::register(1024);
        let ws = outbox.handle();
        assert_eq!(send(ws, abi::ws::TEXT, b"one"), BATON_OK);
        assert_eq!(send(ws, abi::ws::BINARY, &[0xff, 0]), BATON_OK);
        assert_eq!(send(ws, abi::ws::TEXT, &[0xff]), BATON_E_INVALID);
        assert_eq!(send(ws, 7, b"x"), BATON_E_INVALID);
        assert_eq!(outbox.queued_bytes(), 5);
        assert_eq!(outbox.take(), Next::Send(Outgoing::Text("one".into())));
        assert_eq!(outbox.take_message(), Some(Outgoing::Binary(vec![0xff, 0])));
        assert_eq!(outbox.take_message(), None);
        assert_eq!(outbox.take(), Next::Idle);
        assert_eq!(outbox.queued_bytes(), 0);
    }

    #[test]
    fn an_overflow_empties_the_queue_and_refuses_later_sends() {
        let outbox = Outbox::register(10);
        let ws = outbox.handle();
        // One message is always taken, even past the limit.
        assert_eq!(send(ws, abi::ws::BINARY, &[0; 64]), BATON_OK);
        assert_eq!(send(ws, abi::ws::BINARY, &[0; 1]), BATON_E_CLOSED);
        assert_eq!(outbox.queued_bytes(), 0);
        assert_eq!(outbox.take(), Next::Overflowed);
        assert_eq!(send(ws, abi::ws::BINARY, &[0; 1]), BATON_E_CLOSED);

        let outbox = Outbox::register(10);
        for _ in 0..10 {
            assert_eq!(send(outbox.handle(), abi::ws::BINARY, &[1]), BATON_OK);
        }
        assert_eq!(send(outbox.handle(), abi::ws::BINARY, &[1]), BATON_E_CLOSED);
    }

    #[test]
    fn a_close_follows_what_was_queued_and_is_checked() {
        let outbox = Outbox::register(1024);
        let ws = outbox.handle();
        assert_eq!(close(ws, 1005, ""), BATON_E_INVALID);
        assert_eq!(close(ws, 999, ""), BATON_E_INVALID);
        assert_eq!(close(ws, 1000, &"x".repeat(124)), BATON_E_INVALID);
        assert_eq!(send(ws, abi::ws::TEXT, b"last"), BATON_OK);
        assert_eq!(close(ws, 4000, "bye"), BATON_OK);
        assert_eq!(send(ws, abi::ws::TEXT, b"late"), BATON_E_CLOSED);
        assert_eq!(close(ws, 1000, ""), BATON_E_CLOSED);
        assert_eq!(outbox.take(), Next::Send(Outgoing::Text("last".into())));
        assert_eq!(outbox.take(), Next::Close(4000, "bye".into()));
    }

    #[test]
    fn stale_and_foreign_handles_are_harmless() {
        let outbox = Outbox::register(1024);
        let ws = outbox.handle();
        assert!(ws & WS_TAG != 0);
        drop(outbox);
        assert_eq!(send(ws, abi::ws::TEXT, b"x"), BATON_E_CLOSED);
        assert_eq!(close(ws, 1000, ""), BATON_E_CLOSED);
        // An untagged number (a stream's handle) is never a WebSocket.
        assert_eq!(send(ws & !WS_TAG, abi::ws::TEXT, b"x"), BATON_E_CLOSED);
        assert_eq!(send(0, abi::ws::TEXT, b"x"), BATON_E_CLOSED);
        // Never reused.
        let next = Outbox::register(1);
        assert_ne!(next.handle(), ws);
    }

    #[test]
    fn a_shut_connection_refuses_sends_and_drops_its_queue() {
        let outbox = Outbox::register(1024);
        assert_eq!(send(outbox.handle(), abi::ws::TEXT, b"x"), BATON_OK);
        outbox.shut();
        assert_eq!(outbox.queued_bytes(), 0);
        assert_eq!(outbox.take(), Next::Shut);
        assert_eq!(send(outbox.handle(), abi::ws::TEXT, b"x"), BATON_E_CLOSED);
    }

    #[tokio::test]
    async fn a_send_from_another_thread_wakes_the_task() {
        let outbox = Outbox::register(1024);
        let ws = outbox.handle();
        std::thread::spawn(move || assert_eq!(send(ws, abi::ws::TEXT, b"hi"), BATON_OK))
            .join()
            .unwrap();
        // The wake-up came before the wait: not lost.
        tokio::time::timeout(std::time::Duration::from_secs(1), outbox.ready())
            .await
            .expect("woken");
        assert_eq!(outbox.take(), Next::Send(Outgoing::Text("hi".into())));
    }
}
