//! `faulty`: a plugin that misbehaves on purpose, for tests. `GET /faulty/panic` panics;
//! `GET /faulty/error` returns an error; `GET /faulty/bad-header` sets an invalid header;
//! with `[plugins.settings.faulty] panic_in_init = true`, `init` panics.
//! `GET /faulty/flaky` answers `{"generation":N,"pid":P}`, with status 500 on the share
//! `error_ratio` (0 to 1, default 0) of its requests, spread evenly; with `exit_after_ms`,
//! the worker exits (status 3) that long after `init`, as a release that crashes once it
//! serves.
//! ABI 1.1: `GET /faulty/defer-panic` defers its answer and then panics; the WebSocket
//! route `/faulty/ws` echoes, panics in its open method with `?panic`, and panics in its
//! message callback on the text `panic`.
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_plugin::{
    InitContext, Message, Plugin, Refused, Request, Response, WebSocket, WsHandle, export_plugin,
};

#[derive(Debug)]
pub struct Faulty {
    /// `error_ratio` in millionths.
    error_ppm: u64,
    /// Requests `/faulty/flaky` answered.
    flaky: AtomicU64,
}

impl Plugin for Faulty {
    fn init(ctx: &InitContext) -> Result<Self, String> {
        let settings = ctx.settings();
        if settings.get("panic_in_init").and_then(|v| v.as_bool()) == Some(true) {
            panic!("faulty: told to panic in init");
        }
        let ratio = settings
            .get("error_ratio")
            .map(|v| v.as_f64().ok_or("settings: error_ratio must be a number"))
            .transpose()?
            .unwrap_or(0.0);
        if let Some(ms) = settings.get("exit_after_ms").and_then(|v| v.as_u64()) {
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                eprintln!("faulty: told to exit {ms} ms after init");
                std::process::exit(3);
            });
        }
        Ok(Faulty {
            error_ppm: (ratio.clamp(0.0, 1.0) * 1e6) as u64,
            flaky: AtomicU64::new(0),
        })
    }
}

impl Faulty {
    fn flaky(&self, req: &Request, resp: &mut Response) -> Result<(), String> {
        // Request n fails when the running share of failures crosses a whole number.
        let n = self.flaky.fetch_add(1, Ordering::Relaxed);
        let fails = (n + 1) * self.error_ppm / 1_000_000 > n * self.error_ppm / 1_000_000;
        resp.status(if fails { 500 } else { 200 })
            .header("content-type", "application/json")
            .write(
                format!(
                    "{{\"generation\":{},\"pid\":{}}}",
                    req.generation(),
                    req.worker_pid()
                )
                .as_bytes(),
            );
        Ok(())
    }

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
        GET "/faulty/flaky" => flaky,
        GET "/faulty/panic" => panic,
        GET "/faulty/error" => error,
        GET "/faulty/bad-header" => bad_header,
        GET "/faulty/defer-panic" => defer_panic,
        WS "/faulty/ws" => ws_open,
    ],
}
