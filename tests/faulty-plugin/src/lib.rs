//! `faulty`: a plugin that misbehaves on purpose, for tests. `GET /faulty/panic` panics;
//! `GET /faulty/error` returns an error; `GET /faulty/bad-header` sets an invalid header;
//! with `[plugins.settings.faulty] panic_in_init = true`, `init` panics.
#![forbid(unsafe_code)]

use baton_plugin::{InitContext, Plugin, Request, Response, export_plugin};

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
    ],
}
