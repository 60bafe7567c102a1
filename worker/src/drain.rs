//! The drain as data: a phase that only moves forward, and a count of open connections
//! that the drain waits on.
//!
//! `Serving` → `Closing` (stop accepting; HTTP/1 responses carry `Connection: close`,
//! HTTP/2 connections get GOAWAY; idle HTTP/1 connections get a grace period) → `Forced`
//! (`drain_timeout` passed, or the supervisor force-closes the generation: whatever is
//! left is dropped). Nothing here sleeps or decides
//! when to move on; `serve` does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{Notify, watch};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    Closing,
    Forced,
}

/// The one writer of the phase.
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<Phase>,
}

/// A reader of the phase, cloned into every task that must react to it.
#[derive(Debug, Clone)]
pub struct DrainWatch {
    rx: watch::Receiver<Phase>,
}

impl Drain {
    pub fn new() -> (Self, DrainWatch) {
        let (tx, rx) = watch::channel(Phase::Serving);
        (Self { tx }, DrainWatch { rx })
    }

    /// Moves to `phase` unless the drain is already further along.
    pub fn advance(&self, phase: Phase) {
        self.tx.send_if_modified(|current| {
            let moved = phase > *current;
            if moved {
                *current = phase;
            }
            moved
        });
    }
}

impl DrainWatch {
    /// Resolves once the phase is `phase` or later.
    pub async fn reached(&mut self, phase: Phase) {
        // `changed` rather than `wait_for`: every connection's task holds one of these
        // futures, and this one is half the size.
        while *self.rx.borrow_and_update() < phase {
            if self.rx.changed().await.is_err() {
                // The sender lives as long as the worker serves; if it is gone, so is the
                // worker.
                return;
            }
        }
    }
}

/// When, within the drain's spread window, the long-lived connection `key` (a WebSocket,
/// a streamed answer) is closed: spread evenly by a hash of the key, so that the clients
/// of a draining generation reconnect over `window` rather than all at once.
#[allow(dead_code)] // used by the WebSocket and stream drains being written
pub fn spread_offset(key: u64, window: std::time::Duration) -> std::time::Duration {
    // splitmix64: consecutive keys land far apart.
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    window.mul_f64((z >> 11) as f64 / (1u64 << 53) as f64)
}

/// Counts open connections; the drain is over when the count reaches zero.
#[derive(Debug, Default)]
pub struct Connections {
    open: AtomicU64,
    /// The most open at once since [`Connections::take_peak`] last read it.
    peak: AtomicU64,
    idle: Notify,
}

/// Held by a connection task for its whole life.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Connections>);

impl Connections {
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        let now = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    /// The most connections open at once since the last call (at least those open now).
    pub fn take_peak(&self) -> u64 {
        self.peak
            .swap(self.count(), Ordering::Relaxed)
            .max(self.count())
    }

    pub fn count(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Resolves when no connection is open.
    pub async fn all_closed(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_offsets_cover_the_window_evenly() {
        let window = std::time::Duration::from_secs(10);
        let mut buckets = [0u32; 10];
        for key in 0..10_000u64 {
            let at = spread_offset(key, window);
            assert!(at < window);
            buckets[(at.as_secs_f64()) as usize] += 1;
        }
        // 1,000 expected per second of the window; none far off.
        assert!(
            buckets.iter().all(|&n| (800..1200).contains(&n)),
            "{buckets:?}"
        );
        assert_eq!(
            spread_offset(7, std::time::Duration::ZERO),
            std::time::Duration::ZERO
        );
    }

    #[tokio::test]
    async fn phase_only_moves_forward() {
        let (drain, mut watch) = Drain::new();
        drain.advance(Phase::Forced);
        drain.advance(Phase::Closing);
        watch.reached(Phase::Forced).await;
        assert_eq!(*watch.rx.borrow(), Phase::Forced);
    }

    #[tokio::test]
    async fn all_closed_waits_for_the_last_guard() {
        let conns = Arc::new(Connections::default());
        let a = conns.open();
        let b = conns.open();
        drop(a);
        let waiter = tokio::spawn({
            let conns = conns.clone();
            async move { conns.all_closed().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(b);
        waiter.await.unwrap();
        assert_eq!(conns.count(), 0);
    }
}
