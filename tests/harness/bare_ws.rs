//! The WebSocket benchmark's ceiling: a bare tokio-tungstenite echo server, the crate a
//! Baton worker speaks WebSocket with, without hyper's upgrade, supervisor, plugin or
//! drain. `baton-bare-ws ADDR [THREADS]`; every path echoes.
#![forbid(unsafe_code)]

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn main() {
    let mut args = std::env::args().skip(1);
    let addr: std::net::SocketAddr = args
        .next()
        .and_then(|a| a.parse().ok())
        .expect("usage: baton-bare-ws ADDR [THREADS]");
    let threads = args.next().and_then(|t| t.parse().ok()).unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    let echo = match message {
                        Message::Text(_) | Message::Binary(_) => message,
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    if ws.send(echo).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
}
