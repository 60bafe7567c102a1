//! The HTTP fuzz target in `tests/fuzz/` (and its regression test in
//! `tests/fuzz_regressions.rs`): raw bytes into one worker connection, the response bytes
//! out, invariants checked. Not an interface for anything else.

use std::cell::RefCell;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest an exchange may take before it counts as a hang (the client has closed its
/// side by then, so the server has nothing to wait for).
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

/// Plugins to load, as a `:`-separated list of `.so` paths (`tests/fuzz/run.sh` sets it
/// to the example plugins); unset: none, so only the health path and 404s answer.
pub const ENV_PLUGINS: &str = "BATON_FUZZ_PLUGINS";

/// The runtime and the connection handling for one plugin list, built on first use and
/// kept.
struct Harness {
    plugins: Vec<String>,
    runtime: tokio::runtime::Runtime,
    server: crate::connection::OneConnection,
}

thread_local! {
    static HARNESS: RefCell<Option<Harness>> = const { RefCell::new(None) };
}

fn harness(paths: Vec<String>) -> Harness {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    // Loaded and initialised the way a worker does it, with empty settings.
    let settings = baton_proto::WorkerSettings {
        plugins: paths
            .iter()
            .map(|path| baton_proto::PluginSpec {
                file: path.to_owned(),
                cached: path.to_owned(),
                hash: "fuzz".into(),
                fd: None,
            })
            .collect(),
        ..baton_proto::WorkerSettings::default()
    };
    let router = crate::load_plugins(&settings, 1, &crate::notify::Notifier::new(None))
        .unwrap_or_else(|e| panic!("{ENV_PLUGINS}: {e:#}"));
    // Entered, so that the server's parts may register with the runtime.
    let server = {
        let _guard = runtime.enter();
        crate::connection::OneConnection::new(settings, router)
    };
    Harness {
        plugins: paths,
        runtime,
        server,
    }
}

/// Never a panic or a hang, and nothing but HTTP/1.x responses (or HTTP/2 frames after
/// the preface) comes back; no 5xx, which from the example plugins would mean a handler
/// failed (the bodies they write never contain a status line, so any "HTTP/1.x 5" is
/// one).
pub fn http(data: &[u8]) {
    let plugins: Vec<String> = std::env::var(ENV_PLUGINS)
        .unwrap_or_default()
        .split(':')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    http_with(&plugins, data);
}

/// [`http`] with these plugins loaded (paths to `.so` files).
pub fn http_with(plugins: &[String], data: &[u8]) {
    let out = http_exchange(plugins, data);
    if out.is_empty() || data.starts_with(b"PRI * HTTP/2.0") {
        return;
    }
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 ") || text.starts_with("HTTP/1.0 "),
        "not an HTTP/1.x response: {:?}",
        &text[..text.len().min(200)]
    );
    assert!(
        !text.contains("HTTP/1.1 5") && !text.contains("HTTP/1.0 5"),
        "a server error without any plugin: {text:?}"
    );
}

/// Writes `input` to a fresh connection served like an accepted one (default settings,
/// `plugins` loaded), closes the client's write side, and returns
/// everything the server sent before it closed. Panics if the connection panics or never
/// ends.
pub fn http_exchange(plugins: &[String], input: &[u8]) -> Vec<u8> {
    HARNESS.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.as_ref().is_some_and(|h| h.plugins != plugins) {
            *cell = None;
        }
        let harness = cell.get_or_insert_with(|| harness(plugins.to_vec()));
        harness.runtime.block_on(exchange(&harness.server, input))
    })
}

async fn exchange(server: &crate::connection::OneConnection, input: &[u8]) -> Vec<u8> {
    let (mut client, server_io) = tokio::io::duplex(64 * 1024);
    let (mut read, mut write) = tokio::io::split(&mut client);
    let send = async {
        // The server may stop reading (an error answer) and close: that ends the write.
        let _ = write.write_all(input).await;
        let _ = write.shutdown().await;
    };
    let mut output = Vec::new();
    let receive = read.read_to_end(&mut output);
    let ((), received, ()) = tokio::time::timeout(EXCHANGE_LIMIT, async {
        tokio::join!(send, receive, server.serve(server_io))
    })
    .await
    .expect("the connection did not end after the client closed its side");
    let _ = received;
    output
}

#[cfg(test)]
mod tests {
    use super::http_exchange;

    #[test]
    fn a_request_gets_an_answer_and_garbage_at_most_a_400() {
        let out = http_exchange(&[], b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n\r\n");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        for garbage in [
            &b"GET / HTTP/1.1\r\nHost x\r\n\r\n"[..],
            b"\x00\x01 nonsense\r\n\r\n",
        ] {
            let out = http_exchange(&[], garbage);
            let text = String::from_utf8_lossy(&out);
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 400"),
                "{text:?}"
            );
        }
    }
}
