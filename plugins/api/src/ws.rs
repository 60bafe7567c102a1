//! WebSocket routes (ABI 1.1): the host does the protocol (handshake, framing, ping/pong,
//! the close handshake, limits); the plugin sees whole messages through [`WebSocket`]
//! and sends through [`WsHandle`]s.

use crate::Plugin;
use crate::abi;
use crate::host;
use crate::stream::StreamError;

/// The longest close reason the protocol allows, in bytes.
pub const MAX_CLOSE_REASON: usize = 123;

/// A plugin's WebSocket side, for plugins with `WS` routes in [`crate::export_plugin!`].
///
/// Each `WS` route names an *open* method, `fn(&self, &Request, WsHandle) ->
/// Result<Self::Conn, Refused>`, called for the upgrade request (its path, parameters,
/// query and headers): `Ok` accepts and gives the connection its state, `Err(Refused)`
/// answers 403. After that, `message` is called for every whole message, one at a time
/// and in order for one connection (connections run in parallel, hence `&self`), and
/// `close` once, last.
///
/// A panic in any of these is caught: in `open` it refuses the upgrade, in `message` it
/// closes that connection with 1011 (and no further messages of it are delivered).
pub trait WebSocket: Plugin {
    /// Per-connection state, made by the route's open method and handed back to
    /// `message` and `close`.
    type Conn: Send + 'static;

    /// A whole message arrived (text is valid UTF-8, checked by the host).
    fn message(&self, conn: &mut Self::Conn, ws: &WsHandle, message: Message<'_>);

    /// The connection closed: `code` is the peer's (1005 if it gave none, 1006 if the
    /// connection was cut off). Called once, last; after it returns `ws` is stale (calls
    /// on it, or on its clones, answer [`StreamError::Closed`]). The default drops
    /// `conn`.
    fn close(&self, conn: Self::Conn, ws: &WsHandle, code: u16, reason: &str) {
        let _ = (conn, ws, code, reason);
    }
}

/// What an open method returns to refuse an upgrade (the host answers 403).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Refused;

/// One WebSocket message, borrowed for the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// A text message.
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

/// A WebSocket connection, to send to and close from any thread.
///
/// It is a number the host never reuses, so it is cheap to clone, `Send` and
/// `Sync`, and keeping one after the connection closed is harmless: every call on a stale
/// handle answers [`StreamError::Closed`]. Sends are queued by the host, never block, and
/// a client whose queue overflows is closed by the host (`websocket.send_queue_bytes`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WsHandle {
    id: abi::BatonHandle,
}

impl WsHandle {
    pub(crate) fn new(id: abi::BatonHandle) -> WsHandle {
        WsHandle { id }
    }

    /// The host's number for this connection (never reused): a key for maps of
    /// connections.
    pub fn id(&self) -> u64 {
        self.id
    }

    fn send(&self, kind: u32, data: &[u8]) -> Result<(), StreamError> {
        let Some(h) = host::table() else {
            return Err(StreamError::Closed);
        };
        // SAFETY: a host function called with a number it checks and a view that lives
        // for the call.
        let code = unsafe { (h.ws_send)(self.id, kind, host::view(data)) };
        StreamError::check(code).map(drop)
    }

    /// Queues a text message.
    pub fn send_text(&self, text: &str) -> Result<(), StreamError> {
        self.send(abi::ws::TEXT, text.as_bytes())
    }

    /// Queues a binary message.
    pub fn send_binary(&self, data: &[u8]) -> Result<(), StreamError> {
        self.send(abi::ws::BINARY, data)
    }

    /// Starts the close handshake with `code` (1000–4999) and `reason` (cut to
    /// [`MAX_CLOSE_REASON`] bytes at a character boundary); [`WebSocket::close`] follows
    /// once it is done.
    pub fn close(&self, code: u16, reason: &str) -> Result<(), StreamError> {
        let Some(h) = host::table() else {
            return Err(StreamError::Closed);
        };
        let mut end = reason.len().min(MAX_CLOSE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        // SAFETY: as in `send`.
        let code = unsafe { (h.ws_close)(self.id, code, host::view(&reason.as_bytes()[..end])) };
        StreamError::check(code).map(drop)
    }
}
