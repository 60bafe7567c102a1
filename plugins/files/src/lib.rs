//! `files`: streamed downloads and uploads, with flat memory whatever their size.
//!
//! - `GET /files/zero/{bytes}` answers that many zero bytes, and `GET /files/pattern/{bytes}`
//!   that many bytes of the pattern `i % 251` (what a test can check byte for byte), both
//!   generated as they are sent: written without blocking until the stream's buffer is
//!   full, then resumed by the host's writable callback (backpressure, no thread).
//! - `PUT /files/sha256` takes a body of any size up to the route's limit (16 GiB) as a
//!   stream, on a thread of its own that reads it with blocking reads, and answers with
//!   its SHA-256 in hex and its length: `<hex> <bytes>\n`.
//! - `GET /files/stats` says how many downloads and uploads are in progress
//!   (`downloads N\nuploads M\n`): a client that goes away stops being counted once the
//!   plugin hears of it, so nothing it had is left behind.
#![forbid(unsafe_code)]

use baton_plugin::{
    Body, InitContext, Plugin, Request, Response, Stream, StreamError, export_plugin,
};
use sha2::{Digest, Sha256};
use std::sync::LazyLock;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How much one write or read moves.
const CHUNK: usize = 64 * 1024;
/// The period of the pattern: a prime, so that a chunk dropped, repeated or reordered
/// changes the hash.
const PERIOD: usize = 251;

static ZEROS: [u8; CHUNK] = [0; CHUNK];
static PATTERN: LazyLock<Vec<u8>> =
    LazyLock::new(|| (0..CHUNK + PERIOD).map(|i| (i % PERIOD) as u8).collect());

#[derive(Debug)]
pub struct Files;

static DOWNLOADS: AtomicUsize = AtomicUsize::new(0);
static UPLOADS: AtomicUsize = AtomicUsize::new(0);

/// Counts one transfer in progress while it lives.
#[derive(Debug)]
struct Live(&'static AtomicUsize);

impl Live {
    fn new(counter: &'static AtomicUsize) -> Live {
        counter.fetch_add(1, Ordering::Relaxed);
        Live(counter)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Plugin for Files {
    fn init(_: &InitContext) -> Result<Self, String> {
        Ok(Files)
    }
}

/// A download in progress: it owns its stream and knows how far it got.
#[derive(Debug)]
struct Download {
    stream: Stream,
    sent: u64,
    total: u64,
    pattern: bool,
    live: Live,
}

impl Download {
    fn chunk(&self) -> &'static [u8] {
        let n = (self.total - self.sent).min(CHUNK as u64) as usize;
        if self.pattern {
            let start = (self.sent % PERIOD as u64) as usize;
            &PATTERN[start..start + n]
        } else {
            &ZEROS[..n]
        }
    }

    /// Writes until done or the buffer is full; then waits for room, on a host thread.
    fn run(mut self) {
        while self.sent < self.total {
            match self.stream.write(self.chunk()) {
                Ok(n) => self.sent += n as u64,
                Err(StreamError::WouldBlock) => {
                    let Download {
                        stream,
                        sent,
                        total,
                        pattern,
                        live,
                    } = self;
                    // Called once room is back or the client went away (then the next
                    // write says Closed). If the host refuses, the stream is dropped (and
                    // so failed).
                    let _ = stream.when_writable(move |stream| {
                        Download {
                            stream,
                            sent,
                            total,
                            pattern,
                            live,
                        }
                        .run()
                    });
                    return;
                }
                // The client went away (cancelled): nothing more to do.
                Err(StreamError::Closed) => return,
                Err(e) => {
                    let _ = self.stream.fail(&format!("files: write failed: {e}"));
                    return;
                }
            }
        }
        let _ = self.stream.finish();
    }
}

/// Reads a whole body and answers with its SHA-256 (on a thread of the plugin).
fn hash_upload(mut body: Body, mut stream: Stream) {
    let _live = Live::new(&UPLOADS);
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let mut buf = vec![0; CHUNK];
    loop {
        match body.read_blocking(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                total += n as u64;
            }
            Err(StreamError::TooLarge) => {
                let _ = stream.set_status(413);
                let _ = stream.write_blocking(b"the upload is larger than the route allows\n");
                let _ = stream.finish();
                return;
            }
            Err(StreamError::Closed) => return,
            Err(e) => {
                let _ = stream.fail(&format!("files: reading the upload failed: {e}"));
                return;
            }
        }
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if stream
        .write_blocking(format!("{hex} {total}\n").as_bytes())
        .is_ok()
    {
        let _ = stream.finish();
    }
}

impl Files {
    fn download(&self, req: &Request, resp: &mut Response) -> Result<(), String> {
        let Some(total) = req.param("bytes").and_then(|b| b.parse::<u64>().ok()) else {
            resp.status(400)
                .write(b"usage: GET /files/zero/{bytes} or /files/pattern/{bytes}\n");
            return Ok(());
        };
        resp.header("content-type", "application/octet-stream")
            .header("content-length", &total.to_string());
        let stream = resp.defer().ok_or("the host refused to defer the answer")?;
        Download {
            stream,
            sent: 0,
            total,
            pattern: req.path().starts_with("/files/pattern/"),
            live: Live::new(&DOWNLOADS),
        }
        .run();
        Ok(())
    }

    fn sha256(&self, req: &Request, resp: &mut Response) -> Result<(), String> {
        let body = req.body_stream().ok_or("the body is not a stream")?;
        resp.header("content-type", "text/plain; charset=utf-8");
        let stream = resp.defer().ok_or("the host refused to defer the answer")?;
        std::thread::Builder::new()
            .name("files-sha256".into())
            .spawn(move || hash_upload(body, stream))
            .map_err(|e| format!("cannot start a thread: {e}"))?;
        Ok(())
    }

    fn stats(&self, _: &Request, resp: &mut Response) -> Result<(), String> {
        resp.header("content-type", "text/plain; charset=utf-8");
        resp.write(
            format!(
                "downloads {}\nuploads {}\n",
                DOWNLOADS.load(Ordering::Relaxed),
                UPLOADS.load(Ordering::Relaxed)
            )
            .as_bytes(),
        );
        Ok(())
    }
}

export_plugin! {
    plugin: Files,
    name: "files",
    version: env!("CARGO_PKG_VERSION"),
    nonblocking: true,
    routes: [
        GET "/files/zero/{bytes}" => download,
        GET "/files/pattern/{bytes}" => download,
        PUT "/files/sha256" => sha256 { stream_body: true, max_body_bytes: 16 << 30 },
        GET "/files/stats" => stats,
    ],
}
