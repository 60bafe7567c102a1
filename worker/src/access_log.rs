//! The access log (`[log] access`): one line per answered request, in the combined format
//! (Apache's and nginx's, plus the duration, generation and worker pid) or as JSON lines.
//!
//! The request path never waits for the disk: a line is appended to its runtime thread's
//! own buffer (one of [`SHARDS`], each behind a lock only that thread takes, except when
//! the writer collects it); a full buffer is handed to the writer thread through a
//! bounded channel, and the writer also collects every buffer a few times a second. When
//! the writer cannot keep up and the channel is full, the buffer is dropped and its lines
//! counted ([`AccessLog::dropped`], reported with the metrics and logged).
//!
//! The worker opens the file itself (as `worker.user` when one is set), appending, at
//! start and again on `SIGUSR1`, so that logrotate's rename-then-signal works; each new
//! generation opens it anew anyway.

use baton_proto::settings::{AccessLogFormat, AccessLogSettings};
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Per-thread buffers; threads beyond this many share one.
const SHARDS: usize = 16;
/// A buffer this full is handed to the writer.
const FLUSH_BYTES: usize = 32 * 1024;
/// Full buffers waiting for the writer (8 MiB at most); beyond, lines are dropped.
const QUEUE: usize = 256;
/// How often the writer collects what the buffers hold.
const COLLECT_EVERY: Duration = Duration::from_millis(100);

/// What a request's line needs from its head, taken when it arrives.
#[derive(Debug)]
pub(crate) struct Pending {
    /// The line up to the status.
    line: String,
    /// What follows the status and size (combined: referer and user agent).
    after: String,
}

#[derive(Debug)]
pub(crate) struct AccessLog {
    format: AccessLogFormat,
    generation: u64,
    pid: u32,
    shards: Box<[Mutex<Vec<u8>>]>,
    full: SyncSender<Vec<u8>>,
    reopen: AtomicBool,
    /// Lines dropped since the worker started.
    dropped: AtomicU64,
    /// Told once the writer has written everything queued before [`AccessLog::flush`].
    flushed: Mutex<Option<std::sync::mpsc::Sender<()>>>,
}

impl AccessLog {
    /// Opens the log and starts its writer thread.
    pub(crate) fn start(
        settings: &AccessLogSettings,
        generation: u64,
    ) -> std::io::Result<Arc<AccessLog>> {
        let target = Target::open(&settings.target)?;
        let (full, queued) = std::sync::mpsc::sync_channel(QUEUE);
        let log = Arc::new(AccessLog {
            format: settings.format,
            generation,
            pid: std::process::id(),
            shards: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            full,
            reopen: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            flushed: Mutex::new(None),
        });
        let writer = Writer {
            log: Arc::downgrade(&log),
            target,
            path: settings.target.clone(),
            queued,
        };
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer.run())?;
        Ok(log)
    }

    /// Lines dropped since the worker started.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits (up to `within`) until every line queued so far is written: at exit.
    pub(crate) fn flush(&self, within: Duration) {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.flushed.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        // Wakes the writer (a full queue wakes it anyway).
        let _ = self.full.try_send(Vec::new());
        let _ = rx.recv_timeout(within);
    }

    /// Asks the writer to open the file again (`SIGUSR1`).
    pub(crate) fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
    }

    /// The first part of a request's line, from its head.
    pub(crate) fn begin(
        &self,
        parts: &http::request::Parts,
        client: Option<std::net::SocketAddr>,
    ) -> Pending {
        use std::fmt::Write as _;
        let header = |name: http::HeaderName| parts.headers.get(name).map(|v| v.as_bytes());
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let version = match parts.version {
            http::Version::HTTP_09 => "HTTP/0.9",
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            http::Version::HTTP_3 => "HTTP/3.0",
            _ => "HTTP/1.1",
        };
        let now = SystemTime::now();
        let mut line = String::with_capacity(256);
        match self.format {
            AccessLogFormat::Combined => {
                match client {
                    Some(c) => {
                        let _ = write!(line, "{}", c.ip());
                    }
                    None => line.push('-'),
                }
                line.push_str(" - - [");
                clf_time(now, &mut line);
                line.push_str("] \"");
                line.push_str(parts.method.as_str());
                line.push(' ');
                push_clf(&mut line, target.as_bytes());
                line.push(' ');
                line.push_str(version);
                line.push_str("\" ");
                let mut after = String::with_capacity(64);
                after.push_str(" \"");
                push_clf(&mut after, header(http::header::REFERER).unwrap_or(b"-"));
                after.push_str("\" \"");
                push_clf(&mut after, header(http::header::USER_AGENT).unwrap_or(b"-"));
                after.push('"');
                Pending { line, after }
            }
            AccessLogFormat::Json => {
                line.push_str("{\"time\":\"");
                iso_time(now, &mut line);
                line.push_str("\",\"client\":");
                match client {
                    Some(c) => {
                        let _ = write!(line, "\"{}\"", c.ip());
                    }
                    None => line.push_str("null"),
                }
                line.push_str(",\"method\":");
                push_json(&mut line, parts.method.as_str().as_bytes());
                line.push_str(",\"path\":");
                push_json(&mut line, target.as_bytes());
                let _ = write!(
                    line,
                    ",\"protocol\":\"{version}\",\"generation\":{},\"pid\":{},\"user_agent\":",
                    self.generation, self.pid
                );
                match header(http::header::USER_AGENT) {
                    Some(agent) => push_json(&mut line, agent),
                    None => line.push_str("null"),
                }
                Pending {
                    line,
                    after: String::new(),
                }
            }
        }
    }

    /// Completes and queues a request's line.
    pub(crate) fn finish(&self, mut p: Pending, status: u16, bytes: Option<u64>, seconds: f64) {
        use std::fmt::Write as _;
        match self.format {
            AccessLogFormat::Combined => {
                let _ = match bytes {
                    Some(b) => write!(p.line, "{status} {b}"),
                    None => write!(p.line, "{status} -"),
                };
                let _ = writeln!(
                    p.line,
                    "{} {seconds:.6} {} {}",
                    p.after, self.generation, self.pid
                );
            }
            AccessLogFormat::Json => {
                let bytes = bytes.map_or_else(|| "null".to_owned(), |b| b.to_string());
                let _ = writeln!(
                    p.line,
                    ",\"status\":{status},\"bytes\":{bytes},\"duration\":{seconds:.6}}}"
                );
            }
        }
        self.push(p.line.as_bytes());
    }

    fn push(&self, line: &[u8]) {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
        }
        let shard = &self.shards[SHARD.with(|s| *s)];
        let full = {
            let mut buf = shard.lock().unwrap_or_else(|e| e.into_inner());
            buf.extend_from_slice(line);
            (buf.len() >= FLUSH_BYTES).then(|| std::mem::take(&mut *buf))
        };
        if let Some(full) = full {
            self.hand_over(full);
        }
    }

    /// Hands a buffer to the writer, or drops it (counted) when the writer is behind.
    fn hand_over(&self, buf: Vec<u8>) {
        if let Err(TrySendError::Full(buf) | TrySendError::Disconnected(buf)) =
            self.full.try_send(buf)
        {
            self.dropped.fetch_add(lines_in(&buf), Ordering::Relaxed);
        }
    }
}

fn lines_in(buf: &[u8]) -> u64 {
    buf.iter().filter(|&&b| b == b'\n').count() as u64
}

/// Where lines go.
enum Target {
    Stdout,
    File(std::fs::File),
}

impl Target {
    fn open(target: &str) -> std::io::Result<Target> {
        if target == "stdout" {
            return Ok(Target::Stdout);
        }
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o640)
            .open(target)
            .map(Target::File)
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Target::Stdout => std::io::stdout().lock().write_all(buf),
            Target::File(f) => f.write_all(buf),
        }
    }
}

struct Writer {
    log: std::sync::Weak<AccessLog>,
    target: Target,
    path: String,
    queued: Receiver<Vec<u8>>,
}

impl Writer {
    /// Writes what comes until the worker exits (the thread dies with the process).
    fn run(mut self) {
        let mut last_error = None::<String>;
        let mut reported = 0;
        loop {
            let got = self.queued.recv_timeout(COLLECT_EVERY);
            let Some(log) = self.log.upgrade() else {
                return;
            };
            let flushed = log.flushed.lock().unwrap_or_else(|e| e.into_inner()).take();
            let reopen = log.reopen.swap(false, Ordering::Relaxed);
            let mut bufs = Vec::new();
            if let Ok(buf) = got {
                bufs.push(buf);
            }
            bufs.extend(self.queued.try_iter());
            // What sits in the threads' buffers: at most COLLECT_EVERY old.
            for shard in log.shards.iter() {
                let buf = std::mem::take(&mut *shard.lock().unwrap_or_else(|e| e.into_inner()));
                if !buf.is_empty() {
                    bufs.push(buf);
                }
            }
            // Lines from before a reopen go to the file they were logged for.
            for buf in bufs {
                if let Err(e) = self.target.write(&buf) {
                    log.dropped.fetch_add(lines_in(&buf), Ordering::Relaxed);
                    let e = e.to_string();
                    if last_error.as_ref() != Some(&e) {
                        tracing::error!("access log {}: {e}", self.path);
                        last_error = Some(e);
                    }
                }
            }
            if reopen {
                match Target::open(&self.path) {
                    Ok(t) => {
                        self.target = t;
                        tracing::info!("access log {} reopened", self.path);
                    }
                    Err(e) => tracing::error!("cannot reopen access log {}: {e}", self.path),
                }
            }
            if let Some(tx) = flushed {
                let _ = tx.send(());
            }
            let dropped = log.dropped();
            if dropped > reported {
                tracing::warn!(
                    "access log: {} line(s) dropped (the writer fell behind)",
                    dropped - reported
                );
                reported = dropped;
            }
        }
    }
}

thread_local! {
    /// This thread's last second, written both ways: formatting a date per request showed.
    static SECOND: std::cell::RefCell<(u64, String, String)> =
        const { std::cell::RefCell::new((u64::MAX, String::new(), String::new())) };
}

/// Appends `at`'s second as the combined format (`27/Nov/2026:16:12:13 +0000`, UTC) or,
/// with `iso`, as `2026-11-27T16:12:13`.
fn push_second(at: SystemTime, iso: bool, out: &mut String) {
    let secs = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    SECOND.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != secs {
            let (y, mo, d, h, mi, s) = civil(secs);
            const MONTHS: [&str; 12] = [
                "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
            ];
            cached.1 = format!(
                "{d:02}/{}/{y}:{h:02}:{mi:02}:{s:02} +0000",
                MONTHS[mo as usize - 1]
            );
            cached.2 = format!("{y}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}");
            cached.0 = secs;
        }
        out.push_str(if iso { &cached.2 } else { &cached.1 });
    });
}

/// `27/Nov/2026:16:12:13 +0000` (UTC), as the combined format writes time.
fn clf_time(at: SystemTime, out: &mut String) {
    push_second(at, false, out);
}

/// `2026-11-27T16:12:13.123Z`.
fn iso_time(at: SystemTime, out: &mut String) {
    use std::fmt::Write as _;
    push_second(at, true, out);
    let ms = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_millis();
    let _ = write!(out, ".{ms:03}Z");
}

/// UTC year, month, day, hour, minute, second of `secs` since the epoch.
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let secs = secs as i64;
    let (days, rest) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, rest / 3600, rest / 60 % 60, rest % 60)
}

/// Whether `b` needs no escaping inside quotes (printable ASCII but `"` and `\`).
fn plain(b: u8) -> bool {
    (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\'
}

/// A value inside the combined format's quotes: `"` and `\` escaped, other bytes outside
/// printable ASCII as `\xHH` (as nginx does).
fn push_clf(out: &mut String, value: &[u8]) {
    use std::fmt::Write as _;
    if value.iter().all(|&b| plain(b)) {
        out.push_str(std::str::from_utf8(value).expect("ASCII"));
        return;
    }
    for &b in value {
        match b {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b if plain(b) => out.push(b as char),
            b => {
                let _ = write!(out, "\\x{b:02X}");
            }
        }
    }
}

/// A JSON string of `value` (not UTF-8: replaced as `from_utf8_lossy` does).
fn push_json(out: &mut String, value: &[u8]) {
    if value.iter().all(|&b| plain(b)) {
        out.push('"');
        out.push_str(std::str::from_utf8(value).expect("ASCII"));
        out.push('"');
        return;
    }
    let text = String::from_utf8_lossy(value);
    out.push_str(&serde_json::to_string(&*text).expect("strings serialise"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_written_in_utc() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_795_305_273);
        let (mut clf, mut iso) = (String::new(), String::new());
        clf_time(at, &mut clf);
        iso_time(at, &mut iso);
        assert_eq!(clf, "27/Nov/2026:16:01:45 +0000");
        assert_eq!(iso, "2026-11-27T16:01:45.273Z");
        let mut leap = String::new();
        iso_time(
            SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400),
            &mut leap,
        );
        assert_eq!(leap, "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn quoted_values_are_escaped() {
        let mut out = String::new();
        push_clf(&mut out, "a\"b\\c\né".as_bytes());
        assert_eq!(out, "a\\\"b\\\\c\\x0A\\xC3\\xA9");
        let mut json = String::new();
        push_json(&mut json, "q\"é".as_bytes());
        assert_eq!(json, "\"q\\\"é\"");
    }
}
