//! A WebSocket echo load generator for tests/bench/ws.py:
//! `baton-ws-bench URL CONNECTIONS SECONDS [BYTES]` opens CONNECTIONS clients, each
//! sending a BYTES-long text message and waiting for its echo in a loop for SECONDS, then
//! prints one JSON line: messages, messages per second, latency p50/p99/max in
//! microseconds, and connection errors. `baton-ws-bench URL CONNECTIONS hold` opens the
//! clients, prints `ready`, and holds them idle until its standard input closes.
#![forbid(unsafe_code)]

use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: baton-ws-bench URL CONNECTIONS (SECONDS [BYTES] | hold)";
    let url = args.first().expect(usage).clone();
    let connections: usize = args.get(1).and_then(|c| c.parse().ok()).expect(usage);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut clients = Vec::with_capacity(connections);
        let mut errors = 0u64;
        for _ in 0..connections {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok((ws, _)) => clients.push(ws),
                Err(_) => errors += 1,
            }
        }
        if args.get(2).map(String::as_str) == Some("hold") {
            println!("ready {} {errors}", clients.len());
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            return;
        }
        let seconds: u64 = args.get(2).and_then(|s| s.parse().ok()).expect(usage);
        let bytes: usize = args.get(3).and_then(|b| b.parse().ok()).unwrap_or(32);
        let payload = "x".repeat(bytes);
        let end = Instant::now() + Duration::from_secs(seconds);
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|mut ws| {
                let payload = payload.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut failed = false;
                    while Instant::now() < end {
                        let sent = Instant::now();
                        if ws.send(Message::text(payload.as_str())).await.is_err() {
                            failed = true;
                            break;
                        }
                        match ws.next().await {
                            Some(Ok(Message::Text(_))) => {
                                latencies.push(sent.elapsed().as_micros() as u64)
                            }
                            _ => {
                                failed = true;
                                break;
                            }
                        }
                    }
                    let _ = ws.close(None).await;
                    (latencies, failed)
                })
            })
            .collect();
        let started = Instant::now();
        let mut all = Vec::new();
        for task in tasks {
            let (latencies, failed) = task.await.expect("client task");
            all.extend(latencies);
            errors += u64::from(failed);
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.sort_unstable();
        let at = |q: f64| all.get(((all.len() as f64 * q) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0);
        println!(
            "{{\"messages\":{},\"per_second\":{:.0},\"p50_us\":{},\"p99_us\":{},\"max_us\":{},\"errors\":{}}}",
            all.len(),
            all.len() as f64 / elapsed,
            at(0.5),
            at(0.99),
            all.last().copied().unwrap_or(0),
            errors
        );
    });
}
