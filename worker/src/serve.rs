//! Accept loops and the drain sequence of one worker.
//!
//! Owns the listeners and builds what every connection shares ([`crate::shared`]): it
//! accepts connections and hands each to [`crate::connection`]. It never decides when to
//! drain (a signal or the supervisor's death does); once the drain begins it stops
//! accepting, waits for the connections to close (up to `drain_timeout`) and shuts the
//! plugins down.
//!
//! Signals: `SIGTERM`/`SIGINT` or the end of the lifeline start the drain; `SIGQUIT` (the
//! supervisor force-closing a generation to make room under `max_generations`) closes
//! every connection now and exits.
//!
//! When the drain begins, every plugin is told (its `on_drain`), and open-ended streamed
//! answers (server-sent events, feeds: a head without `Content-Length`, no upload still
//! arriving) are ended cleanly (what was written, the last chunk, then the connection
//! closes), each at its own place in the `drain_spread` window so that their clients do
//! not all reconnect at once; in the forced phase, at once. Transfers (a sized download,
//! an upload, an answer not begun) finish like any request in flight, within
//! `drain_timeout`.

use crate::access_log::AccessLog;
use crate::connection::{Socket, connection, watch_idle};
use crate::drain::{self, Drain, DrainWatch, Phase};
use crate::inherit::{Listener, NamedListener};
use crate::metrics::Global;
use crate::notify::Notifier;
use crate::router::Router;
use crate::shared::Shared;
use crate::tls::TlsListener;
use baton_proto::{Stats, WorkerSettings};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};
use tracing::Instrument;

/// How often changed counters are reported to the supervisor.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// At exit, how long the access log's last lines may take to be written.
const ACCESS_LOG_FLUSH: Duration = Duration::from_secs(1);
/// The largest report the supervisor reads (its `notify::MAX_DATAGRAM`).
const MAX_REPORT: usize = 65536;
/// Pause after an accept error (EMFILE and friends) so the loop does not spin.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);
/// After `drain_timeout`, how long dropped connections get to release their guards.
const FORCED_CLOSE_WAIT: Duration = Duration::from_millis(200);
/// How often a drain looks for streamed answers whose time in the spread window came.
const STREAM_END_TICK: Duration = Duration::from_millis(20);

/// Serves until SIGTERM, SIGINT or the supervisor's death, then drains and returns.
pub async fn serve(
    generation: u64,
    settings: WorkerSettings,
    listeners: Vec<NamedListener>,
    lifeline: Option<OwnedFd>,
    router: Router,
    mut tls: std::collections::HashMap<String, TlsListener>,
    notifier: Notifier,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut quit = signal(SignalKind::quit())?;
    let lifeline = match lifeline {
        Some(fd) => Some(tokio::net::unix::pipe::Receiver::from_owned_fd(fd)?),
        None => None,
    };

    let mut usr1 = signal(SignalKind::user_defined1())?;
    let access_log = match &settings.access_log {
        Some(log) => Some(
            AccessLog::start(log, generation)
                .map_err(|e| anyhow::anyhow!("access log {}: {e}", log.target))?,
        ),
        None => None,
    };
    let shared = Arc::new(Shared::new(generation, settings, router, access_log));
    // SIGUSR1 (the supervisor forwards it): open the access log file again, as logrotate
    // expects. Handled even without an access log, so that it never ends the worker.
    let reopen = {
        let shared = shared.clone();
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                if let Some(log) = &shared.access_log {
                    log.reopen();
                }
            }
        })
    };
    let (drain, watch) = Drain::new();
    // Idle keep-alive connections wait there, without a task each.
    let idle = tokio::spawn(watch_idle(shared.clone(), watch.clone()));

    let mut accepting = tokio::task::JoinSet::new();
    let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    for NamedListener { listener, name } in listeners {
        let (shared, watch) = (shared.clone(), watch.clone());
        // Every fd of a listener (systemd may pass several under one name) serves TLS.
        let tls = tls.get(&name).cloned();
        match listener {
            Listener::Tcp(l) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::TcpListener::from_std(l)?;
                accepting.spawn(accept_loop(l, tls, shared, watch).in_current_span());
            }
            Listener::Unix(l) => {
                l.set_nonblocking(true)?;
                let l = tokio::net::UnixListener::from_std(l)?;
                accepting.spawn(accept_loop(l, tls, shared, watch).in_current_span());
            }
        }
    }
    if let Some(name) = tls.keys().find(|n| !names.contains(n)) {
        anyhow::bail!("TLS settings name listener {name:?}, which this worker was not given");
    }
    tls.clear();
    notifier.send(&format!(
        "READY=1\nSTATUS=serving generation {generation} on {}\n{}",
        names.join(", "),
        baton_proto::WorkerBuild::line()
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
        "draining ({reason}): {} connection(s) open, {} of them idle in the idle set",
        shared.connections.count(),
        shared.idle.held()
    );
    // Plugins hear of the drain before any long-lived connection is closed, so that what
    // they send their clients from `on_drain` is queued ahead of the close frame.
    for plugin in &shared.router.plugins {
        plugin.drain();
    }
    shared.begin_closing();
    // Accepting stops before anything is closed: a long-lived client the drain closes
    // reconnects to the next generation, never to this one (an accept loop that had not
    // yet seen the drain could take its reconnection and close it again). Accepting is
    // cancel-safe: a connection not yet accepted stays in the shared backlog.
    accepting.abort_all();
    while accepting.join_next().await.is_some() {}
    // Said once nothing is accepted any more: the supervisor answers the upgrade that
    // replaced this generation then, so a connection made after that meets the new one.
    notifier.send("STOPPING=1\nSTATUS=draining");
    drain.advance(Phase::Closing);
    if reason == "SIGQUIT" {
        drain.advance(Phase::Forced);
    }
    let spread = Duration::from_millis(shared.settings.drain_spread_ms);
    let ending = tokio::spawn(end_streams(spread, watch.clone()));

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
        tracing::warn!(
            "{why} {} connection(s), {} of them streaming an answer",
            shared.connections.count(),
            crate::stream::open(&shared)
        );
        shared
            .metrics
            .add(Global::ForceClosed, shared.connections.count());
        drain.advance(Phase::Forced);
        let _ = tokio::time::timeout(FORCED_CLOSE_WAIT, shared.connections.all_closed()).await;
    }
    stats.abort();
    idle.abort();
    ending.abort();
    reopen.abort();
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
    if let Some(log) = &shared.access_log {
        log.flush(ACCESS_LOG_FLUSH);
    }
    let last = shared.stats();
    notifier.send(&report(&shared, last));
    tracing::info!(
        "drained in {:?} after {} request(s); {} stream or body handle(s) left",
        started.elapsed(),
        last.requests,
        baton_loader::stream::live()
    );
    Ok(())
}

/// Ends the open-ended streamed answers ([`baton_loader::stream::open_streams`]), each
/// `drain::spread_offset` after the drain began (all at once from the forced phase on),
/// including those that become open-ended during the drain. Runs until the worker stops
/// it.
async fn end_streams(spread: Duration, mut watch: DrainWatch) {
    let began = Instant::now();
    let mut forced = false;
    loop {
        for handle in baton_loader::stream::open_streams() {
            if forced || began.elapsed() >= drain::spread_offset(handle, spread) {
                baton_loader::stream::end(handle);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(STREAM_END_TICK) => {}
            _ = watch.reached(Phase::Forced), if !forced => forced = true,
        }
    }
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

/// Reports the counters to the supervisor when they changed, at most once a second.
async fn report_stats(shared: Arc<Shared>, notifier: Notifier) {
    let mut last = (Stats::default(), None);
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    let mut trim = Trim::default();
    loop {
        tick.tick().await;
        let now = (
            shared.stats(),
            shared.settings.metrics.then(|| shared.metrics_snapshot()),
        );
        let parked = shared.parked.swap(0, Ordering::Relaxed);
        if trim.due(shared.connections.take_peak(), now.0.connections, parked) {
            // Off the runtime's threads: trimming a large heap takes milliseconds.
            tokio::task::spawn_blocking(baton_sys::memory::release_free_memory);
        }
        if now != last {
            notifier.send(&report_line(&now.0, now.1.as_ref()));
            last = now;
        }
    }
}

/// When to hand the allocator's free memory back to the kernel: after the open connections
/// fell to half of (or less than) the most seen since the last trim, once that was at least
/// [`TRIM_MIN_PEAK`]; or after at least [`TRIM_MIN_PEAK`] connections went idle outside
/// hyper (each freeing 16 KiB of buffers), at most every [`TRIM_PARKED_TICKS`] ticks.
/// Without it, a worker that once held many connections, or many busy ones, keeps their
/// memory (the allocator keeps freed pages for reuse, and the buffers of connections now
/// idle sit between the small allocations of the connections that stay) although it needs
/// little now.
#[derive(Debug, Default)]
struct Trim {
    peak: u64,
    /// Connections that went idle outside hyper since the last trim.
    parked: u64,
    /// Ticks since the last trim.
    ticks: u32,
}

/// Connections below which the memory they held is not worth a trim.
const TRIM_MIN_PEAK: u64 = 256;
/// Trims for connections gone idle are this many ticks apart at least: `malloc_trim`
/// holds each arena's lock while it walks it.
const TRIM_PARKED_TICKS: u32 = 5;

impl Trim {
    /// `peak`: the most open at once since the last call; `connections`: open now;
    /// `parked`: connections that went idle outside hyper since the last call.
    fn due(&mut self, peak: u64, connections: u64, parked: u64) -> bool {
        self.peak = self.peak.max(peak).max(connections);
        self.parked += parked;
        self.ticks = self.ticks.saturating_add(1);
        let fell = self.peak >= TRIM_MIN_PEAK && connections <= self.peak / 2;
        let idled = self.parked >= TRIM_MIN_PEAK && self.ticks >= TRIM_PARKED_TICKS;
        if fell || idled {
            self.peak = connections;
            (self.parked, self.ticks) = (0, 0);
            return true;
        }
        false
    }
}

/// All the counters, for the report at exit.
fn report(shared: &Shared, stats: Stats) -> String {
    let metrics = shared.settings.metrics.then(|| shared.metrics_snapshot());
    report_line(&stats, metrics.as_ref())
}

/// One report: `BATON_STATS=`, and with `[metrics]` on `BATON_METRICS=`, in one datagram.
fn report_line(stats: &Stats, metrics: Option<&baton_proto::WorkerMetrics>) -> String {
    let mut line = stats.to_line();
    if let Some(metrics) = metrics {
        let metrics = metrics.to_line();
        if line.len() + 1 + metrics.len() <= MAX_REPORT {
            line.push('\n');
            line.push_str(&metrics);
        } else {
            tracing::warn!(
                "metrics report of {} bytes is too large to send (too many routes?)",
                metrics.len()
            );
        }
    }
    line
}

/// A listening socket the accept loop can take connections from.
trait Accept: Send + Sync + 'static {
    type Io: Socket;
    /// A connection and its client's address (none over a Unix socket).
    fn accept(
        &self,
    ) -> impl Future<Output = std::io::Result<(Self::Io, Option<std::net::SocketAddr>)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Option<std::net::SocketAddr>)> {
        let (stream, peer) = tokio::net::TcpListener::accept(self).await?;
        Ok((stream, Some(peer)))
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept(&self) -> std::io::Result<(Self::Io, Option<std::net::SocketAddr>)> {
        Ok((tokio::net::UnixListener::accept(self).await?.0, None))
    }
}

/// Accepts until the drain begins. Above `max_connections` it stops accepting, so new
/// connections wait in the shared backlog instead of being refused.
async fn accept_loop<L: Accept>(
    listener: L,
    tls: Option<TlsListener>,
    shared: Arc<Shared>,
    mut watch: DrainWatch,
) {
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
            Ok((io, peer)) => {
                shared.metrics.add(Global::Accepted, 1);
                let guard = shared.connections.open();
                let (shared, watch) = (shared.clone(), watch.clone());
                match &tls {
                    None => tokio::spawn(connection(io, peer, shared, watch, guard, permit)),
                    Some(tls) => tokio::spawn(crate::tls::serve(
                        tls.clone(),
                        io,
                        peer,
                        shared,
                        watch,
                        guard,
                        permit,
                    )),
                };
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
            }
        }
    }
}

#[cfg(test)]
mod trim_tests {
    use super::Trim;

    #[test]
    fn memory_is_trimmed_once_connections_fell_to_half_of_a_large_peak() {
        let mut t = Trim::default();
        let small = !t.due(100, 100, 0) && !t.due(100, 60, 0);
        assert!(small, "a small peak is never worth it");
        assert!(
            !t.due(8000, 8000, 0) && !t.due(8000, 5000, 0),
            "still above half"
        );
        assert!(t.due(5000, 3000, 0), "half of the peak or less");
        let above = !t.due(3000, 2000, 0);
        assert!(above, "the peak is now 3000, 2000 is above half");
        assert!(t.due(2000, 10, 0), "then below half of that");
        let small = !t.due(10, 0, 0);
        assert!(small, "and not again for a peak under the minimum");
        // Connections that came and went between two looks still count.
        assert!(t.due(1000, 0, 0), "a burst seen only as a peak");
    }

    #[test]
    fn memory_is_trimmed_once_many_connections_went_idle_outside_hyper() {
        let mut t = Trim::default();
        // 5,000 connections open and stay; they go idle over two ticks.
        assert!(!t.due(5000, 5000, 100), "too few idle yet");
        assert!(
            !t.due(5000, 5000, 4900),
            "not before TRIM_PARKED_TICKS ticks"
        );
        assert!(!t.due(5000, 5000, 0) && !t.due(5000, 5000, 0));
        assert!(t.due(5000, 5000, 0), "then once");
        for _ in 0..10 {
            assert!(!t.due(5000, 5000, 10), "and not for a few idle ones");
        }
    }
}
