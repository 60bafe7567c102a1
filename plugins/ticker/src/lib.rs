//! `ticker`: server-sent events on deferred answers. `GET /ticker` answers
//! `text/event-stream` and sends `data: <n>\n\n` (n = 0, 1, 2, …) every `interval_ms`
//! (setting, default 100) until the client goes away; `?count=N` ends the stream after N
//! events. When the generation drains, every stream gets `event: end` and is finished
//! cleanly, so that clients reconnect to the new generation. `GET /ticker/clients` says
//! how many streams are open (a client that went away is dropped at the next tick).
//!
//! One thread of the plugin's own serves every stream with non-blocking writes: a client
//! too slow to take an event (its buffer is full) skips that tick instead of growing
//! memory.
#![forbid(unsafe_code)]

use baton_plugin::{InitContext, Plugin, Request, Response, Stream, StreamError, export_plugin};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Ticker {
    hub: Arc<Hub>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// What the handlers and the ticking thread share.
#[derive(Debug, Default)]
struct Hub {
    state: Mutex<HubState>,
    wake: Condvar,
}

#[derive(Debug, Default)]
struct HubState {
    clients: Vec<Client>,
    /// New clients wait here for their first event, sent at once.
    joining: Vec<Client>,
    draining: bool,
    stopping: bool,
}

#[derive(Debug)]
struct Client {
    stream: Stream,
    next: u64,
    /// Events left to send (`?count=N`), or none for no end.
    left: Option<u64>,
}

impl Client {
    /// Sends the next event; false once the client is done with (gone, or finished).
    fn tick(&mut self) -> bool {
        if self.left == Some(0) {
            return false;
        }
        match self
            .stream
            .write(format!("data: {}\n\n", self.next).as_bytes())
        {
            Ok(_) => {
                self.next += 1;
                self.left = self.left.map(|n| n - 1);
                self.left != Some(0)
            }
            // Slow client: it misses this tick, and memory stays bounded.
            Err(StreamError::WouldBlock) => true,
            // Gone (cancelled) or refused: drop it.
            Err(_) => false,
        }
    }

    /// Ends the stream cleanly (after its last event, or with `event: end` on drain).
    fn end(mut self, drain: bool) {
        if drain {
            let _ = self.stream.write(b"event: end\ndata: draining\n\n");
        }
        let _ = self.stream.finish();
    }
}

impl Hub {
    fn lock(&self) -> MutexGuard<'_, HubState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The ticking thread: wakes every `interval` (or when a client joins, or on drain
    /// and stop) and writes one event to each client.
    fn run(&self, interval: Duration) {
        let mut next_tick = Instant::now() + interval;
        let mut state = self.lock();
        loop {
            if state.stopping || state.draining {
                let mut all = std::mem::take(&mut state.clients);
                all.append(&mut state.joining);
                let stopping = state.stopping;
                drop(state);
                for client in all {
                    client.end(true);
                }
                if stopping {
                    return;
                }
                state = self.lock();
                if !state.stopping && state.clients.is_empty() && state.joining.is_empty() {
                    state = self.wake.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                continue;
            }
            let (mut done, mut joined) = split(std::mem::take(&mut state.joining));
            let now = Instant::now();
            if now >= next_tick {
                next_tick = (next_tick + interval).max(now);
                let (mut gone, kept) = split(std::mem::take(&mut state.clients));
                state.clients = kept;
                done.append(&mut gone);
            }
            state.clients.append(&mut joined);
            for client in done {
                client.end(false);
            }
            let wait = next_tick.saturating_duration_since(Instant::now());
            state = self
                .wake
                .wait_timeout(state, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Ticks every client: those that are done (their count reached, or gone) and the rest.
fn split(clients: Vec<Client>) -> (Vec<Client>, Vec<Client>) {
    let mut done = Vec::new();
    let mut kept = Vec::with_capacity(clients.len());
    for mut client in clients {
        if client.tick() {
            kept.push(client);
        } else {
            done.push(client);
        }
    }
    (done, kept)
}

impl Plugin for Ticker {
    fn init(ctx: &InitContext) -> Result<Self, String> {
        let interval_ms = match ctx.settings().get("interval_ms") {
            None => 100,
            Some(v) => v
                .as_u64()
                .filter(|ms| (1..=3_600_000).contains(ms))
                .ok_or_else(|| format!("settings: interval_ms must be 1 to 3600000, not {v}"))?,
        };
        let hub = Arc::new(Hub::default());
        let runner = hub.clone();
        let thread = std::thread::Builder::new()
            .name("ticker".into())
            .spawn(move || runner.run(Duration::from_millis(interval_ms)))
            .map_err(|e| format!("cannot start the ticker thread: {e}"))?;
        Ok(Ticker {
            hub,
            thread: Mutex::new(Some(thread)),
        })
    }

    fn drain(&self) {
        self.hub.lock().draining = true;
        self.hub.wake.notify_all();
    }

    fn shutdown(&self) {
        self.hub.lock().stopping = true;
        self.hub.wake.notify_all();
        if let Some(thread) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl Ticker {
    fn ticker(&self, req: &Request, resp: &mut Response) -> Result<(), String> {
        let left = match query_param(req.query(), "count") {
            None => None,
            Some(n) => Some(
                n.parse::<u64>()
                    .map_err(|_| format!("count must be a number, not {n:?}"))?,
            ),
        };
        resp.header("content-type", "text/event-stream")
            .header("cache-control", "no-cache");
        let mut state = self.hub.lock();
        if state.draining || state.stopping {
            // This generation is going away: tell the client to come back soon.
            resp.write(b"retry: 100\nevent: end\ndata: draining\n\n");
            return Ok(());
        }
        let stream = resp.defer().ok_or("the host refused to defer the answer")?;
        state.joining.push(Client {
            stream,
            next: 0,
            left,
        });
        drop(state);
        self.hub.wake.notify_all();
        Ok(())
    }

    fn clients(&self, _: &Request, resp: &mut Response) -> Result<(), String> {
        let state = self.hub.lock();
        let open = state.clients.len() + state.joining.len();
        drop(state);
        resp.header("content-type", "text/plain; charset=utf-8");
        resp.write(format!("{open}\n").as_bytes());
        Ok(())
    }
}

/// The value of `key` in a query string (no percent-decoding: numbers only here).
fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

export_plugin! {
    plugin: Ticker,
    name: "ticker",
    version: env!("CARGO_PKG_VERSION"),
    nonblocking: true,
    routes: [
        GET "/ticker" => ticker,
        GET "/ticker/clients" => clients,
    ],
}
