//! The HTTP fuzz target in `tests/fuzz/` (and its regression test in
//! `tests/fuzz_regressions.rs`): raw bytes into one worker connection, the response bytes
//! out, invariants checked. Not an interface for anything else.

use std::cell::RefCell;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Longest an exchange may take before it counts as a hang (the client has closed its
/// side by then, so the server has nothing to wait for).
const EXCHANGE_LIMIT: Duration = Duration::from_secs(10);

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

/// Never a panic or a hang, and nothing but HTTP/1.x responses (or HTTP/2 frames after
/// the preface) comes back; with no plugin loaded, no 5xx (the bodies the worker writes
/// itself never contain a status line, so any "HTTP/1.x 5" is one).
pub fn http(data: &[u8]) {
    let out = http_exchange(data);
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

/// Writes `input` to a fresh connection served like an accepted one (default settings, no
/// plugins), closes the client's write side, and returns everything the server sent
/// before it closed. Panics if a worker task panics or the connection never ends.
pub fn http_exchange(input: &[u8]) -> Vec<u8> {
    RUNTIME.with(|cell| {
        let mut cell = cell.borrow_mut();
        let runtime = cell.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a tokio runtime")
        });
        runtime.block_on(exchange(input))
    })
}

async fn exchange(input: &[u8]) -> Vec<u8> {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let settings = baton_proto::WorkerSettings::default();
    let served = tokio::spawn(crate::serve::one_connection(server, settings));
    let (mut read, mut write) = tokio::io::split(&mut client);
    let send = async {
        // The server may stop reading (an error answer) and close: that ends the write.
        let _ = write.write_all(input).await;
        let _ = write.shutdown().await;
    };
    let mut output = Vec::new();
    let receive = read.read_to_end(&mut output);
    let ((), received) =
        tokio::time::timeout(EXCHANGE_LIMIT, async { tokio::join!(send, receive) })
            .await
            .expect("the connection did not end after the client closed its side");
    let _ = received;
    match tokio::time::timeout(EXCHANGE_LIMIT, served).await {
        Ok(Ok(result)) => result.expect("serving one connection"),
        Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("the connection task did not end"),
    }
    output
}

#[cfg(test)]
mod tests {
    use super::http_exchange;

    #[test]
    fn a_request_gets_an_answer_and_garbage_at_most_a_400() {
        let out = http_exchange(b"GET /_baton/health HTTP/1.1\r\nHost: x\r\n\r\n");
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        for garbage in [
            &b"GET / HTTP/1.1\r\nHost x\r\n\r\n"[..],
            b"\x00\x01 nonsense\r\n\r\n",
        ] {
            let out = http_exchange(garbage);
            let text = String::from_utf8_lossy(&out);
            assert!(
                text.is_empty() || text.starts_with("HTTP/1.1 400"),
                "{text:?}"
            );
        }
    }
}
