//! A select of two futures for the hot path of a connection: the main future (the HTTP
//! connection) is polled on every wake-up of the task, the side future (the drain and the
//! connection's clock) only when a waker it registered has fired.
//!
//! `tokio::select!` polls every branch whenever the task wakes. A connection task wakes
//! for every request, while its drain and clock change a few times in its life; polling
//! them each time (a watch channel's lock, a timer entry) showed up in profiles. Owns no
//! I/O and never decides anything: it only reports which future finished first.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

/// Which future finished first.
#[derive(Debug)]
pub enum Either<A, B> {
    Main(A),
    Side(B),
}

/// Resolves when `main` or `side` does; `main` is polled first.
pub fn lazy_select<M, S>(main: M, side: S) -> LazySelect<M, S>
where
    M: Future + Unpin,
    S: Future + Unpin,
{
    let flag = Arc::new(SideWaker {
        // Set, so that the first poll polls `side` and lets it register its wakers.
        fired: AtomicBool::new(true),
        task: Mutex::new(None),
    });
    LazySelect {
        main,
        side,
        side_waker: Waker::from(flag.clone()),
        flag,
        task: None,
    }
}

pub struct LazySelect<M, S> {
    main: M,
    side: S,
    flag: Arc<SideWaker>,
    /// The waker `side` is polled with: it marks `flag` and wakes the task.
    side_waker: Waker,
    /// The task waker last handed to `flag`.
    task: Option<Waker>,
}

/// The side future's waker: remembers that it fired, and wakes the task.
struct SideWaker {
    fired: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for SideWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.fired.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

impl<M, S> Future for LazySelect<M, S>
where
    M: Future + Unpin,
    S: Future + Unpin,
{
    type Output = Either<M::Output, S::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // Hand over the task's waker before looking at the flag, so that a side wake-up
        // after the look still reaches this task. A task's waker rarely changes.
        if !this.task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *this
                .flag
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
            this.task = Some(waker);
        }
        if let Poll::Ready(out) = Pin::new(&mut this.main).poll(cx) {
            return Poll::Ready(Either::Main(out));
        }
        // A plain load first: most polls find the flag clear, and a wake-up between the
        // load and the store is not lost, since `side` is polled right after.
        if this.flag.fired.load(Ordering::Acquire) {
            this.flag.fired.store(false, Ordering::Release);
            let mut side_cx = Context::from_waker(&this.side_waker);
            if let Poll::Ready(out) = Pin::new(&mut this.side).poll(&mut side_cx) {
                return Poll::Ready(Either::Side(out));
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn the_main_future_wins_when_it_finishes_first() {
        let main = std::pin::pin!(async { 1 });
        let side = std::pin::pin!(std::future::pending::<()>());
        assert!(matches!(lazy_select(main, side).await, Either::Main(1)));
    }

    #[tokio::test]
    async fn a_side_future_woken_later_is_polled_again() {
        let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
        let main = std::pin::pin!(std::future::pending::<()>());
        let side = std::pin::pin!(rx);
        let sender = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(7).unwrap();
        });
        let out = tokio::time::timeout(Duration::from_secs(5), lazy_select(main, side)).await;
        assert!(matches!(out, Ok(Either::Side(Ok(7)))), "{out:?}");
        sender.await.unwrap();
    }

    #[tokio::test]
    async fn the_side_future_is_not_polled_when_only_the_main_one_woke() {
        struct CountPolls<'a>(&'a std::sync::atomic::AtomicUsize);
        impl Future for CountPolls<'_> {
            type Output = ();
            fn poll(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
                self.0.fetch_add(1, Ordering::Relaxed);
                Poll::Pending
            }
        }
        let polls = std::sync::atomic::AtomicUsize::new(0);
        // A main future that wakes its task ten times before it finishes.
        let mut left = 10;
        let main = std::future::poll_fn(|cx| {
            if left == 0 {
                return Poll::Ready(());
            }
            left -= 1;
            cx.waker().wake_by_ref();
            Poll::Pending
        });
        let side = CountPolls(&polls);
        let out = lazy_select(std::pin::pin!(main), std::pin::pin!(side)).await;
        assert!(matches!(out, Either::Main(())));
        assert_eq!(polls.load(Ordering::Relaxed), 1, "polled once, to register");
    }
}
