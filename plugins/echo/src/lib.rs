//! `echo`: `POST /echo` answers with every part of the request as JSON: method, path,
//! query, headers, path parameters, body, and the generation and pid that served it.
#![forbid(unsafe_code)]

use baton_plugin::{InitContext, Plugin, Request, Response, export_plugin};
use serde_json::{Map, Value, json};

#[derive(Debug)]
pub struct Echo;

impl Plugin for Echo {
    fn init(_: &InitContext) -> Result<Self, String> {
        Ok(Echo)
    }
}

impl Echo {
    fn echo(&self, req: &Request, resp: &mut Response) -> Result<(), String> {
        let headers: Vec<Value> = req
            .headers()
            .map(|(name, value)| json!([name, String::from_utf8_lossy(value)]))
            .collect();
        let params: Map<String, Value> = req
            .params()
            .map(|(name, value)| (name.to_owned(), Value::from(value)))
            .collect();
        let body = json!({
            "method": req.method(),
            "path": req.path(),
            "query": req.query(),
            "headers": headers,
            "params": params,
            "body": String::from_utf8_lossy(req.body()),
            "body_len": req.body().len(),
            "generation": req.generation(),
            "pid": req.worker_pid(),
        });
        resp.header("content-type", "application/json");
        resp.write(body.to_string().as_bytes()).write(b"\n");
        Ok(())
    }
}

export_plugin! {
    plugin: Echo,
    name: "echo",
    version: env!("CARGO_PKG_VERSION"),
    nonblocking: true,
    routes: [
        POST | PUT "/echo" => echo,
        POST | PUT "/echo/{*rest}" => echo,
    ],
}
