//! `chat`: WebSocket chat rooms. Connect to `/chat/{room}?name=NAME` (a room and a name are
//! 1 to 32 of `[A-Za-z0-9_-]`; without a name you are `guest-N`); every text message you
//! send goes to everyone in the room, you included, as `NAME: text`. Joins and leaves are
//! announced as `* NAME joined` and `* NAME left`. Binary messages are refused (close
//! 1003); messages are at most 64 KiB (the route's limit: larger ones close with 1009).
//!
//! When the generation drains, everyone is told `* server restarting` before the host
//! closes the connections (1012) over `worker.drain_spread`; clients reconnect to the new
//! generation and carry on.
#![forbid(unsafe_code)]

use baton_plugin::{
    InitContext, Message, Plugin, Refused, Request, WebSocket, WsHandle, export_plugin,
};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Default)]
pub struct Chat {
    /// Room name → connection id → member.
    rooms: Mutex<HashMap<String, HashMap<u64, Member>>>,
}

#[derive(Debug)]
struct Member {
    ws: WsHandle,
}

/// A connection's state: where it is and who it is.
#[derive(Debug)]
pub struct Conn {
    room: String,
    name: String,
}

impl Plugin for Chat {
    fn init(_: &InitContext) -> Result<Self, String> {
        Ok(Chat::default())
    }

    fn drain(&self) {
        let everyone: Vec<WsHandle> = self
            .lock()
            .values()
            .flat_map(|room| room.values().map(|m| m.ws.clone()))
            .collect();
        for ws in everyone {
            let _ = ws.send_text("* server restarting");
        }
    }
}

impl Chat {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<u64, Member>>> {
        self.rooms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `text` to everyone in `room`. The handles are copied out first: sending
    /// never happens under the lock (it does not block, but keeps the lock short).
    fn broadcast(&self, room: &str, text: &str) {
        let members: Vec<WsHandle> = self
            .lock()
            .get(room)
            .map(|r| r.values().map(|m| m.ws.clone()).collect())
            .unwrap_or_default();
        for ws in members {
            // A member that is closing answers Closed: its close callback removes it.
            let _ = ws.send_text(text);
        }
    }

    /// A WebSocket upgrade to `/chat/{room}`.
    fn join(&self, req: &Request, ws: WsHandle) -> Result<Conn, Refused> {
        let room = req.param("room").filter(|r| valid_name(r)).ok_or(Refused)?;
        let name = match query_param(req.query(), "name") {
            Some(name) if valid_name(name) => name.to_owned(),
            Some(_) => return Err(Refused),
            None => format!("guest-{}", ws.id()),
        };
        self.lock()
            .entry(room.to_owned())
            .or_default()
            .insert(ws.id(), Member { ws });
        self.broadcast(room, &format!("* {name} joined"));
        Ok(Conn {
            room: room.to_owned(),
            name,
        })
    }
}

impl WebSocket for Chat {
    type Conn = Conn;

    fn message(&self, conn: &mut Conn, ws: &WsHandle, message: Message<'_>) {
        match message {
            Message::Text(text) => self.broadcast(&conn.room, &format!("{}: {text}", conn.name)),
            Message::Binary(_) => {
                let _ = ws.close(1003, "text messages only");
            }
        }
    }

    fn close(&self, conn: Conn, ws: &WsHandle, _code: u16, _reason: &str) {
        {
            let mut rooms = self.lock();
            if let Some(room) = rooms.get_mut(&conn.room) {
                room.remove(&ws.id());
                if room.is_empty() {
                    rooms.remove(&conn.room);
                }
            }
        }
        self.broadcast(&conn.room, &format!("* {} left", conn.name));
    }
}

fn valid_name(s: &str) -> bool {
    (1..=32).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The value of `key` in a query string (names are plain ASCII: no decoding needed).
fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

export_plugin! {
    plugin: Chat,
    name: "chat",
    version: env!("CARGO_PKG_VERSION"),
    nonblocking: true,
    routes: [
        WS "/chat/{room}" => join { max_body_bytes: 64 * 1024 },
    ],
}
