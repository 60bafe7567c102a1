//! The worker's side of ABI 1.1 streams: a response [`Body`] that is either whole (the
//! common case, no allocation beyond the bytes) or a plugin's deferred stream, the
//! deferred answer's head, and the task that feeds a streamed request body to a plugin.
//!
//! Backpressure and cancellation live in `baton_loader::stream` (bounded buffers, the
//! plugin's callbacks); here a stream is polled by hyper as it can write (so a slow client
//! leaves the plugin's writes waiting), and dropped with its connection (so the plugin
//! sees the client go). A stream counts in [`Shared::streams`] and keeps its request in
//! flight (the connection is not idle) until it ends.

use crate::conn_state::InFlight;
use crate::metrics::Global;
use crate::shared::Shared;
use baton_loader::stream::{BodyFeed, COALESCE_BYTES, Head, Room, StreamError, StreamReceiver};
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// A response body: whole, or streamed by a plugin.
pub(crate) enum Body {
    Full(Full<Bytes>),
    Stream(StreamBody),
}

impl From<Full<Bytes>> for Body {
    fn from(full: Full<Bytes>) -> Self {
        Body::Full(full)
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = StreamError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, StreamError>>> {
        match self.get_mut() {
            Body::Full(full) => Pin::new(full)
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map_err(|never| match never {}))),
            Body::Stream(s) => s.poll_data(cx).map(|c| c.map(|c| c.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(full) => full.is_end_stream(),
            Body::Stream(s) => s.rx.is_end(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(full) => full.size_hint(),
            Body::Stream(_) => SizeHint::default(),
        }
    }
}

/// A plugin's stream as a response body. Dropping it (the response is done, or the
/// connection ended) ends the stream. It counts in [`Shared::streams`] while it lives.
///
/// Every response's body is a [`Body`], kept in hyper's state and in the handler's future
/// for each request; this is kept as small as a whole body, so that streams cost the
/// common case nothing (see the test).
pub(crate) struct StreamBody {
    rx: StreamReceiver,
    /// Runs out [`GATHER`] after the last chunk was taken (made at the stream's first):
    /// until then, writes are gathered.
    gather: Option<Pin<Box<Sleep>>>,
    in_flight: InFlight,
}

impl Drop for StreamBody {
    fn drop(&mut self) {
        let shared = &self.in_flight.ctx().shared;
        shared.streams.fetch_sub(1, Ordering::Relaxed);
        shared.metrics.add(Global::StreamsClosed, 1);
    }
}

/// How long writes that follow a chunk taken are gathered into the next one, unless
/// [`COALESCE_BYTES`] are there sooner or the stream ends. A write after a quiet spell
/// goes out at once; a plugin writing line after line sends a full frame, or one frame per
/// `GATHER`, not one per line (which an HTTP/2 client may count against it: see
/// [`COALESCE_BYTES`]).
const GATHER: Duration = Duration::from_millis(1);

impl StreamBody {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, StreamError>>> {
        let gathering = self
            .gather
            .as_mut()
            .filter(|timer| timer.deadline() > Instant::now());
        let at_least = if gathering.is_some() {
            COALESCE_BYTES
        } else {
            1
        };
        let mut out = self.rx.poll_chunk(cx, at_least);
        if out.is_pending()
            && let Some(timer) = gathering
            && timer.as_mut().poll(cx).is_ready()
        {
            out = self.rx.poll_chunk(cx, 1);
        }
        if let Poll::Ready(Some(Ok(_))) = out {
            let until = Instant::now() + GATHER;
            match &mut self.gather {
                Some(timer) => timer.as_mut().reset(until),
                None => self.gather = Some(Box::pin(tokio::time::sleep_until(until))),
            }
        }
        out
    }
}

/// What a deferred answer's head is, once the plugin sent it.
pub(crate) enum Deferred {
    Answer(Response<Body>),
    /// The plugin failed the stream before its head (log this, answer 500).
    Failed(String),
}

/// Waits for a deferred answer's head, then answers with the stream as the body; the
/// request stays in flight (`in_flight`) until the stream ends.
pub(crate) async fn deferred(mut rx: StreamReceiver, in_flight: InFlight) -> Deferred {
    match std::future::poll_fn(|cx| rx.poll_head(cx)).await {
        Head::Failed(message) => Deferred::Failed(message),
        Head::Send { status, headers } => {
            let shared = &in_flight.ctx().shared;
            shared.streams.fetch_add(1, Ordering::Relaxed);
            shared.metrics.add(Global::StreamsOpened, 1);
            let body = StreamBody {
                rx,
                gather: None,
                in_flight,
            };
            let mut response = Response::new(Body::Stream(body));
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Deferred::Answer(response)
        }
    }
}

/// Feeds a streamed request body to the plugin as it arrives, only while its buffer has
/// room, and calls the plugin's `on_readable` callbacks; ends when the answer is done.
/// The request counts as in flight meanwhile, so that body bytes are not taken for the
/// head of a next request.
pub(crate) async fn feed_body(mut body: Incoming, mut feed: BodyFeed, in_flight: InFlight) {
    enum Step {
        Closed,
        Frame(Option<Result<Frame<Bytes>, hyper::Error>>),
    }
    let mut reading = true;
    // The client may still be sending: the connection closes lingering.
    let body_left = || in_flight.arc().state.body_left();
    loop {
        let step = std::future::poll_fn(|cx| {
            match feed.poll_room(cx) {
                Poll::Ready(Room::Closed) => return Poll::Ready(Step::Closed),
                Poll::Ready(Room::Free) if reading => {}
                // Full, or no longer reading: wait for room, a callback or the close.
                _ => return Poll::Pending,
            }
            Pin::new(&mut body).poll_frame(cx).map(Step::Frame)
        })
        .await;
        match step {
            Step::Closed => break,
            Step::Frame(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data()
                    && feed.push(data).is_err()
                {
                    // Past the limit: the rest is not read.
                    reading = false;
                    body_left();
                }
            }
            Step::Frame(Some(Err(e))) => {
                feed.error(e.to_string());
                reading = false;
                body_left();
            }
            Step::Frame(None) => {
                feed.finish();
                reading = false;
            }
        }
    }
    if reading {
        // The answer was done before the body was read whole.
        body_left();
    }
}

/// The number of streams a worker has open (for the drain's log).
pub(crate) fn open(shared: &Shared) -> u64 {
    shared.streams.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole body and the enum's tag. When a [`Body`] grew from 40 to 56 bytes, each
    /// idle WebSocket's share of the worker's memory at 15,000 grew from 1.5 to 3 KiB
    /// (benchmark scenario f).
    #[test]
    fn a_body_is_no_larger_than_a_whole_one_and_a_tag() {
        assert!(
            size_of::<Body>() <= size_of::<Full<Bytes>>() + 8,
            "{} bytes against {}",
            size_of::<Body>(),
            size_of::<Full<Bytes>>()
        );
    }
}
