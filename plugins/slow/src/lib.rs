//! `slow`: `GET /slow/{ms}` sleeps that many milliseconds (at most `max_ms`, default
//! 60000) in a blocking handler, then answers. For drain tests and for seeing the
//! blocking pool keep a slow plugin from starving the others.
#![forbid(unsafe_code)]

use baton_plugin::{InitContext, Plugin, Request, Response, export_plugin};
use std::time::Duration;

#[derive(Debug)]
pub struct Slow {
    max_ms: u64,
}

impl Plugin for Slow {
    fn init(ctx: &InitContext) -> Result<Self, String> {
        let max_ms = match ctx.settings().get("max_ms") {
            None => 60_000,
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("settings: max_ms must be a positive integer, not {v}"))?,
        };
        Ok(Slow { max_ms })
    }
}

impl Slow {
    fn slow(&self, req: &Request, resp: &mut Response) -> Result<(), String> {
        let Some(ms) = req.param("ms").and_then(|m| m.parse::<u64>().ok()) else {
            resp.status(400).write(b"usage: GET /slow/{milliseconds}\n");
            return Ok(());
        };
        let ms = ms.min(self.max_ms);
        std::thread::sleep(Duration::from_millis(ms));
        resp.header("content-type", "text/plain; charset=utf-8");
        resp.write(
            format!(
                "slept {ms} ms (generation {}, pid {})\n",
                req.generation(),
                req.worker_pid()
            )
            .as_bytes(),
        );
        Ok(())
    }
}

export_plugin! {
    plugin: Slow,
    name: "slow",
    version: env!("CARGO_PKG_VERSION"),
    nonblocking: false,
    routes: [
        GET "/slow/{ms}" => slow,
    ],
}
