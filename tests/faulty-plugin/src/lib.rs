//! `faulty`: a plugin that misbehaves on purpose, for tests. `GET /faulty/panic` panics;
//! `GET /faulty/error` returns an error; `GET /faulty/bad-header` sets an invalid header;
//! with `[plugins.settings.faulty] panic_in_init = true`, `init` panics.
//! ABI 1.1: `GET /faulty/defer-panic` defers its answer and then panics; the WebSocket
//! route `/faulty/ws` echoes, panics in its open method with `?panic`, and panics in its
//! message callback on the text `panic`.
#![forbid(unsafe_code)]

use baton_plugin::{
    InitContext, Message, Plugin, Refused, Request, Response, WebSocket, WsHandle, export_plugin,
};

#[derive(Debug)]
pub struct Faulty;

impl Plugin for Faulty {
    fn init(ctx: &InitContext) -> Result<Self, String> {
        if ctx
            .settings()
            .get("panic_in_init")
            .and_then(|v| v.as_bool())
            == Some(true)
        {
            panic!("faulty: told to panic in init");
        }
        Ok(Faulty)
    }
}

impl Faulty {
    fn panic(&self, _: &Request, _: &mut Response) -> Result<(), String> {
        panic!("faulty: told to panic in a handler");
    }

    fn error(&self, _: &Request, _: &mut Response) -> Result<(), String> {
        Err("faulty: told to fail".into())
    }

    fn bad_header(&self, _: &Request, resp: &mut Response) -> Result<(), String> {
        resp.header("bad header name", "x").write(b"never sent\n");
        Ok(())
    }

    fn defer_panic(&self, _: &Request, resp: &mut Response) -> Result<(), String> {
        let _stream = resp.defer().ok_or("the host refused to defer")?;
        panic!("faulty: told to panic after deferring");
    }

    fn ws_open(&self, req: &Request, _: WsHandle) -> Result<(), Refused> {
        if req.query() == "panic" {
            panic!("faulty: told to panic in a WebSocket open");
        }
        Ok(())
    }
}

impl WebSocket for Faulty {
    type Conn = ();

    fn message(&self, _: &mut (), ws: &WsHandle, message: Message<'_>) {
        match message {
            Message::Text("panic") => panic!("faulty: told to panic in a WebSocket message"),
            Message::Text(text) => {
                let _ = ws.send_text(text);
            }
            Message::Binary(data) => {
                let _ = ws.send_binary(data);
            }
        }
    }
}

export_plugin! {
    plugin: Faulty,
    name: "faulty",
    version: env!("CARGO_PKG_VERSION"),
    nonblocking: true,
    routes: [
        GET "/faulty/panic" => panic,
        GET "/faulty/error" => error,
        GET "/faulty/bad-header" => bad_header,
        GET "/faulty/defer-panic" => defer_panic,
        WS "/faulty/ws" => ws_open,
    ],
}
