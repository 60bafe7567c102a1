//! Accept loops and the drain sequence of one worker.
//!
//! Owns the listeners and what every connection shares (settings, router, counters): it
//! accepts connections and hands each to [`crate::connection`]. It never decides when to
//! drain (a signal or the supervisor's death does); once the drain begins it stops
//! accepting, waits for the connections to close (up to `drain_timeout`) and shuts the
//! plugins down.
//!
//! Signals: `SIGTERM`/`SIGINT` or the end of the lifeline start the drain; `SIGQUIT` (the
//! supervisor force-closing a generation to make room under `max_generations`) closes
//! every connection now and exits.

use crate::connection::{Socket, connection};
use crate::drain::{Connections, Drain, DrainWatch, Phase};
use crate::inherit::{Listener, NamedListener};
use crate::notify::Notifier;
use crate::router::Router;
use baton_proto::{Stats, WorkerSettings};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::Semaphore;
use tracing::Instrument;

/// How often changed counters are reported to the supervisor.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after an accept error (EMFILE and friends) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// After `drain_timeout`, how long dropped connections get to release their guards.
const FORCED_CLOSE_WAIT: Duration = Duration::from_millis(200);

pub(crate) struct Shared {
    pub(crate) generation: u64,
    pub(crate) pid: u32,
    pub(crate) settings: WorkerSettings,
    pub(crate) requests: ShardedCounter,
    pub(crate) connections: Arc<Connections>,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) http1: http1::Builder,
    pub(crate) http2: http2::Builder<TokioExecutor>,
    pub(crate) router: Router,
    /// Per plugin (same index as `router.plugins`): the share of the blocking pool of a
    /// plugin whose handlers may block, so that a saturated one cannot starve the others.
    pub(crate) blocking: Vec<Option<Arc<Semaphore>>>,
    /// Blocking plugin handler calls under way.
    pub(crate) plugin_calls: Arc<AtomicUsize>,
    /// The drain began: HTTP/1 responses carry `Connection: close`.
    pub(crate) closing: AtomicBool,
}

/// A counter every runtime thread bumps on its own cache line, summed when read: one
/// shared atomic bumped by every request on every thread showed up in profiles.
#[derive(Debug, Default)]
pub(crate) struct ShardedCounter {
    shards: [PaddedCounter; COUNTER_SHARDS],
}

const COUNTER_SHARDS: usize = 16;

#[derive(Debug, Default)]
#[repr(align(128))]
struct PaddedCounter(AtomicU64);

impl ShardedCounter {
    pub(crate) fn add_one(&self) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % COUNTER_SHARDS;
        }
        let shard = SHARD.with(|s| *s);
        self.shards[shard].0.fetch_add(1, Ordering::Relaxed);
    }

    fn sum(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// Counts one plugin handler call for as long as it runs.
pub(crate) struct CallGuard(Arc<AtomicUsize>);

impl CallGuard {
    pub(crate) fn new(calls: &Arc<AtomicUsize>) -> Self {
        calls.fetch_add(1, Ordering::AcqRel);
        CallGuard(calls.clone())
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What every connection of a worker shares, for `router` and `settings`.
fn shared_state(generation: u64, settings: WorkerSettings, router: Router) -> Shared {
    let blocking_plugins = router.plugins.iter().filter(|p| !p.nonblocking).count();
    let share = (settings.blocking_threads / blocking_plugins.max(1)).max(1);
    let blocking = router
        .plugins
        .iter()
        .map(|p| (!p.nonblocking).then(|| Arc::new(Semaphore::new(share))))
        .collect();
    Shared {
        router,
        blocking,
        plugin_calls: Arc::new(AtomicUsize::new(0)),
        closing: AtomicBool::new(false),
        generation,
        pid: std::process::id(),
        http1: http1_builder(&settings),
        http2: http2_builder(&settings),
        slots: Arc::new(Semaphore::new(settings.http.max_connections.max(1))),
        settings,
        requests: ShardedCounter::default(),
        connections: Arc::new(Connections::default()),
    }
}

/// A worker's connection handling without listeners: each [`OneConnection::serve`] serves
/// one connection the way an accepted one is served, until it ends. For fuzzing the HTTP
/// edge. One difference: the client may half-close (shut down its writing side) and still
/// get its answers, so that an exchange ends without waiting for a timeout.
pub(crate) struct OneConnection {
    shared: Arc<Shared>,
    watch: DrainWatch,
    _drain: Drain,
}

impl OneConnection {
    pub(crate) fn new(settings: WorkerSettings, router: Router) -> Self {
        let mut shared = shared_state(1, settings, router);
        shared.http1.half_close(true);
        let (drain, watch) = Drain::new();
        Self {
            shared: Arc::new(shared),
            watch,
            _drain: drain,
        }
    }

    pub(crate) async fn serve<I: Socket>(&self, io: I) {
        let permit = self
            .shared
            .slots
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore never closes");
        let guard = self.shared.connections.open();
        connection(io, self.shared.clone(), self.watch.clone(), guard, permit).await;
    }

    /// Begins the drain, as a worker does when told to stop.
    #[cfg(test)]
    pub(crate) fn drain(&self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        self._drain.advance(Phase::Closing);
    }
}

/// Serves until SIGTERM, SIGINT or the supervisor's death, then drains and returns.
pub async fn serve(
    generation: u64,
    settings: WorkerSettings,
    listeners: Vec<NamedListener>,
    lifeline: Option<OwnedFd>,
    router: Router,
    notifier: Notifier,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let lifeline = match lifeline {
        Some(fd) => Some(tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?),
        None => None,
    };

    let shared = Arc::new(shared_state(generation, settings, router));
    let (drain, watch) = Drain::new();

    let mut accepting = tokio::task::JoinSet::new();
    let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    for NamedListener { listener, .. } in listeners {
        let (shared, watch) = (shared.clone(), watch.clone());
        match listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::TcpListener::from_std(l)?;
                accepting.spawn(accept_loop(l, shared, watch).in_current_span());
            }
            Listener::Unix(l) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::UnixListener::from_std(l)?;
                accepting.spawn(accept_loop(l, shared, watch).in_current_span());
            }
        }
    }
    notifier.send(&format!(
        "READY=1\nSTATUS=serving generation {generation} on {}",
        names.join(", ")
    ));
    tracing::info!("serving on {}", names.join(", "));
    let stats = tokio::spawn(report_stats(shared.clone(), notifier.clone()));

    let reason = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
        _ = quit.recv() => "SIGQUIT",
        _ = lifeline_closed(lifeline) => "the supervisor is gone",
    };
    tracing::info!(
        "draining ({reason}): {} connection(s) open",
        shared.connections.count()
    );
    notifier.send("STOPPING=1\nSTATUS=draining");
    shared.closing.store(true, Ordering::Relaxed);
    drain.advance(Phase::Closing);
    if reason == "SIGQUIT" {
        drain.advance(Phase::Forced);
    }
    while accepting.join_next().await.is_some() {}

    let drain_timeout = Duration::from_millis(shared.settings.drain_timeout_ms);
    let started = Instant::now();
    let forced = tokio::select! {
        _ = shared.connections.all_closed() => None,
        _ = quit.recv() => Some("SIGQUIT: force-closing".to_owned()),
        _ = tokio::time::sleep(drain_timeout) => {
            Some(format!("drain_timeout ({drain_timeout:?}) reached: closing"))
        }
    };
    if let Some(why) = forced {
        tracing::warn!("{why} {} connection(s)", shared.connections.count());
        drain.advance(Phase::Forced);
        let _ = tokio::time::timeout(FORCED_CLOSE_WAIT, shared.connections.all_closed()).await;
    }
    stats.abort();
    // Inline handlers run inside connection tasks: with every connection closed none is
    // running. Blocking ones may outlive their connection, so they are counted.
    let running = shared.plugin_calls.load(Ordering::Acquire);
    let open = shared.connections.count();
    if running == 0 && open == 0 {
        for plugin in &shared.router.plugins {
            plugin.shut_down();
        }
    } else {
        // Forced past drain_timeout with handlers still on the blocking pool: their
        // plugins' state must stay alive, so shutdown is skipped (the process exits).
        tracing::warn!(
            "{open} connection(s) and {running} blocking handler(s) still running; skipping plugin shutdown"
        );
    }
    notifier.send(&stats_of(&shared).to_line());
    tracing::info!(
        "drained in {:?} after {} request(s)",
        started.elapsed(),
        shared.requests.sum()
    );
    Ok(())
}

fn http1_builder(settings: &WorkerSettings) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // Off: hyper's timer runs from the end of one request to the next head as well, so
        // idle keep-alive connections would close at header_read_timeout. `ConnClock`
        // keeps both deadlines.
        .header_read_timeout(None)
        .max_buf_size(settings.http.max_header_bytes.max(8192));
    // Hyper's default is the same limit with the parser's buffer inline; set, the buffer
    // is sized per request (on the heap above 100), so only a different limit is set.
    if settings.http.max_headers != HYPER_MAX_HEADERS {
        builder.max_headers(settings.http.max_headers);
    }
    builder
}

/// Hyper's limit on HTTP/1 request header fields when none is set.
const HYPER_MAX_HEADERS: usize = 100;

fn http2_builder(settings: &WorkerSettings) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.http.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

async fn lifeline_closed(lifeline: Option<tokio::net::unix::pipe::Receiver>) {
    let Some(pipe) = lifeline else {
        return std::future::pending().await;
    };
    let mut buf = [0u8; 64];
    loop {
        if pipe.readable().await.is_err() {
            return;
        }
        match pipe.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

fn stats_of(shared: &Shared) -> Stats {
    Stats {
        connections: shared.connections.count(),
        requests: shared.requests.sum(),
    }
}

async fn report_stats(shared: Arc<Shared>, notifier: Notifier) {
    let mut last = Stats::default();
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    loop {
        tick.tick().await;
        let now = stats_of(&shared);
        if now != last {
            notifier.send(&now.to_line());
            last = now;
        }
    }
}

/// A listening socket the accept loop can take connections from.
trait Accept: Send + Sync + 'static {
    type Io: Socket;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Io>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        let (stream, _) = tokio::net::TcpListener::accept(self).await?;
        Ok(stream)
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<Self::Io> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

/// Accepts until the drain begins. Above `max_connections` it stops accepting, so new
/// connections wait in the shared backlog instead of being refused.
async fn accept_loop<L: Accept>(listener: L, shared: Arc<Shared>, mut watch: DrainWatch) {
    loop {
        let permit = tokio::select! {
            permit = shared.slots.clone().acquire_owned() => permit.expect("semaphore never closes"),
            _ = watch.reached(Phase::Closing) => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = watch.reached(Phase::Closing) => return,
        };
        match accepted {
            Ok(io) => {
                let guard = shared.connections.open();
                tokio::spawn(connection(io, shared.clone(), watch.clone(), guard, permit));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}
