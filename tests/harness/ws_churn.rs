//! The load generator of tests/bench/ws_upgrade.py: WebSocket clients that stay connected
//! across a server's upgrades.
//!
//! `baton-ws-churn URL CONNECTIONS MAX_SECONDS [PAUSE_MS]` connects CONNECTIONS clients one
//! after the other, prints `ready CONNECTED ERRORS T0` (T0: the Unix time, in seconds, its
//! timeline starts at), then each client echoes a 32-byte text message, waits for the echo
//! and PAUSE_MS (default 100; a close that arrives meanwhile is seen at once), and again.
//! A client whose connection ends classifies the end and reconnects at once; a failed
//! reconnect attempt is counted and retried after 100 ms times the attempts so far (at most
//! 1 s). Ends of a connection:
//! - clean: the server's close frame, counted by its code (1012, 1001, 1000, ...);
//! - abnormal (what a browser reports as 1006): `reset` (ECONNRESET or EPIPE), `eof` (the
//!   TCP stream ended without a close frame), `io` (another socket error), `protocol`
//!   (anything else tungstenite refuses), `stalled` (no echo within 10 s).
//!
//! It runs until its standard input closes or MAX_SECONDS pass, closes every client
//! (code 1000, not counted), and prints one JSON line: totals, the close codes, and a
//! timeline in 100 ms buckets of reconnects, clean closes, abnormal closes and failed
//! attempts.
#![forbid(unsafe_code)]

use futures_util::{SinkExt, StreamExt};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout};
use tokio_tungstenite::tungstenite::error::ProtocolError;
use tokio_tungstenite::tungstenite::{Error, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const BUCKET: Duration = Duration::from_millis(100);
const STALL: Duration = Duration::from_secs(10);

struct Stats {
    t0: Instant,
    reconnects: Vec<AtomicU32>,
    clean: Vec<AtomicU32>,
    abnormal: Vec<AtomicU32>,
    failed: Vec<AtomicU32>,
    codes: Mutex<BTreeMap<u16, u64>>,
    kinds: Mutex<BTreeMap<&'static str, u64>>,
    stop: AtomicBool,
}

impl Stats {
    fn mark(&self, series: &[AtomicU32]) {
        let at = (self.t0.elapsed().as_millis() / BUCKET.as_millis()) as usize;
        series[at.min(series.len() - 1)].fetch_add(1, Ordering::Relaxed);
    }
    fn abnormal(&self, kind: &'static str) {
        self.mark(&self.abnormal);
        *self.kinds.lock().unwrap().entry(kind).or_default() += 1;
    }
    fn clean(&self, code: u16) {
        self.mark(&self.clean);
        *self.codes.lock().unwrap().entry(code).or_default() += 1;
    }
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn kind(error: &Error) -> &'static str {
    match error {
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => "eof",
        Error::Io(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) =>
        {
            "reset"
        }
        Error::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => "eof",
        Error::Io(_) => "io",
        Error::ConnectionClosed | Error::AlreadyClosed => "eof",
        _ => "protocol",
    }
}

/// Echoes on one connection until it ends (the end is counted) or the run stops.
async fn echo(ws: &mut Ws, stats: &Stats, pause: Duration) {
    let payload = "x".repeat(32);
    loop {
        if stats.stopped() {
            let _ = timeout(Duration::from_secs(2), ws.close(None)).await;
            return;
        }
        if let Err(e) = ws.send(Message::text(payload.as_str())).await {
            stats.abnormal(kind(&e));
            return;
        }
        // The echo, then the pause; a close frame or an error may come in either.
        let mut echoed = false;
        let mut waited_since = Instant::now();
        loop {
            let wait = if echoed { pause } else { STALL };
            let left = wait.saturating_sub(waited_since.elapsed());
            if echoed && (left.is_zero() || stats.stopped()) {
                break;
            }
            let step = left.min(BUCKET);
            match timeout(step, ws.next()).await {
                Err(_) if !echoed && waited_since.elapsed() >= STALL => {
                    stats.abnormal("stalled");
                    return;
                }
                Err(_) => {}
                Ok(Some(Ok(Message::Text(_)))) => {
                    echoed = true;
                    waited_since = Instant::now();
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    stats.clean(frame.map(|f| u16::from(f.code)).unwrap_or(1005));
                    // Let tungstenite send its answer and see the server end the stream.
                    let _ = timeout(Duration::from_secs(2), async {
                        while let Some(Ok(_)) = ws.next().await {}
                    })
                    .await;
                    return;
                }
                Ok(Some(Ok(_))) => {}
                Ok(Some(Err(e))) => {
                    stats.abnormal(kind(&e));
                    return;
                }
                Ok(None) => {
                    stats.abnormal("eof");
                    return;
                }
            }
        }
    }
}

async fn client(url: String, mut ws: Ws, stats: Arc<Stats>, pause: Duration) {
    loop {
        echo(&mut ws, &stats, pause).await;
        let mut attempts = 0u32;
        ws = loop {
            if stats.stopped() {
                return;
            }
            match timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url.as_str()),
            )
            .await
            {
                Ok(Ok((ws, _))) => {
                    stats.mark(&stats.reconnects);
                    break ws;
                }
                _ => {
                    stats.mark(&stats.failed);
                    attempts += 1;
                    sleep(Duration::from_millis(100 * u64::from(attempts.min(10)))).await;
                }
            }
        };
    }
}

fn series(s: &[AtomicU32]) -> String {
    let v: Vec<String> = s
        .iter()
        .map(|c| c.load(Ordering::Relaxed).to_string())
        .collect();
    format!("[{}]", v.join(","))
}

fn sum(s: &[AtomicU32]) -> u64 {
    s.iter().map(|c| u64::from(c.load(Ordering::Relaxed))).sum()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: baton-ws-churn URL CONNECTIONS MAX_SECONDS [PAUSE_MS]";
    let url = args.first().expect(usage).clone();
    let connections: usize = args.get(1).and_then(|c| c.parse().ok()).expect(usage);
    let max_seconds: u64 = args.get(2).and_then(|c| c.parse().ok()).expect(usage);
    let pause = Duration::from_millis(args.get(3).and_then(|p| p.parse().ok()).unwrap_or(100));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let mut first = Vec::with_capacity(connections);
        let mut errors = 0u64;
        for _ in 0..connections {
            match timeout(
                Duration::from_secs(5),
                tokio_tungstenite::connect_async(url.as_str()),
            )
            .await
            {
                Ok(Ok((ws, _))) => first.push(ws),
                _ => errors += 1,
            }
        }
        let buckets = (max_seconds as usize + 5) * 10;
        let new = || (0..buckets).map(|_| AtomicU32::new(0)).collect::<Vec<_>>();
        let stats = Arc::new(Stats {
            t0: Instant::now(),
            reconnects: new(),
            clean: new(),
            abnormal: new(),
            failed: new(),
            codes: Mutex::default(),
            kinds: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let t0 = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        println!("ready {} {errors} {t0:.3}", first.len());
        let tasks: Vec<_> = first
            .into_iter()
            .map(|ws| tokio::spawn(client(url.clone(), ws, stats.clone(), pause)))
            .collect();
        let stdin = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin()
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                line.clear();
            }
        });
        let _ = timeout(Duration::from_secs(max_seconds), stdin).await;
        let ran = stats.t0.elapsed().as_secs_f64();
        stats.stop.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = timeout(Duration::from_secs(10), task).await;
        }
        let codes: Vec<String> = stats
            .codes
            .lock()
            .unwrap()
            .iter()
            .map(|(c, n)| format!("\"{c}\":{n}"))
            .collect();
        let kinds: Vec<String> = stats
            .kinds
            .lock()
            .unwrap()
            .iter()
            .map(|(k, n)| format!("\"{k}\":{n}"))
            .collect();
        let used = ((ran * 10.0) as usize + 1).min(buckets);
        println!(
            "{{\"connected\":{},\"initial_errors\":{errors},\"seconds\":{ran:.1},\"bucket_ms\":100,\
             \"reconnects\":{},\"clean\":{},\"abnormal\":{},\"failed_attempts\":{},\
             \"codes\":{{{}}},\"abnormal_kinds\":{{{}}},\"timeline\":{{\"reconnects\":{},\
             \"clean\":{},\"abnormal\":{},\"failed\":{}}}}}",
            connections as u64 - errors,
            sum(&stats.reconnects),
            sum(&stats.clean),
            sum(&stats.abnormal),
            sum(&stats.failed),
            codes.join(","),
            kinds.join(","),
            series(&stats.reconnects[..used]),
            series(&stats.clean[..used]),
            series(&stats.abnormal[..used]),
            series(&stats.failed[..used]),
        );
        // The blocking stdin reader may still wait; do not wait for it.
        std::process::exit(0);
    });
}
