//! `hello`: `GET /hello` and `GET /hello/{name}` answer with a greeting from the plugin's
//! settings (`[plugins.settings.hello] greeting = "…"`) and say which generation and
//! worker served them.
#![forbid(unsafe_code)]

use baton_plugin::{InitContext, Plugin, Request, Response, export_plugin};

#[derive(Debug)]
pub struct Hello {
    greeting: String,
}

impl Plugin for Hello {
    fn init(ctx: &InitContext) -> Result<Self, String> {
        let greeting = match ctx.settings().get("greeting") {
            None => "hello".to_owned(),
            Some(v) => v
                .as_str()
                .ok_or_else(|| format!("settings: greeting must be a string, not {v}"))?
                .to_owned(),
        };
        Ok(Hello { greeting })
    }
}

impl Hello {
    fn hello(&self, req: &Request, resp: &mut Response) -> Result<(), String> {
        let name = req.param("name").unwrap_or("world");
        resp.header("content-type", "text/plain; charset=utf-8");
        resp.write(
            format!(
                "{}, {name}! (generation {}, pid {})\n",
                self.greeting,
                req.generation(),
                req.worker_pid()
            )
            .as_bytes(),
        );
        Ok(())
    }
}

export_plugin! {
    plugin: Hello,
    name: "hello",
    version: env!("CARGO_PKG_VERSION"),
    nonblocking: true,
    routes: [
        GET "/hello" => hello,
        GET "/hello/{name}" => hello,
    ],
}
