//! Idle keep-alive connections, held by the worker in one place instead of a task each.
//!
//! An HTTP/1 connection that went idle outside hyper ([`crate::connection`]) has nothing
//! to keep but its socket and its share of the worker's state. Waiting in a task of its
//! own, it still held the task (768 bytes), tokio's registration of the socket (256), a
//! timer and the allocator's slack around each: about 2.2 KiB per idle connection. Here
//! the socket leaves tokio and waits in an epoll set of the worker's own, registered with
//! `EPOLLONESHOT`; the set keeps a small entry per connection (the socket, when its idle
//! time runs out, and what resumes it). When the client sends (or closes), the entry
//! leaves the set and the connection gets a new task, served as before.
//!
//! One task, [`IdleSet::watch`], waits for the set and applies the same rules as a
//! connection's own clock: `keepalive_timeout` closes an idle connection (counted from
//! when it came here, which is up to two ticks of its clock after its last request, and
//! checked every quarter of the timeout: never before the timeout, and at most 2.25
//! times it, 1.4 times with the defaults);
//! a drain gives the idle connections `drain_idle_grace` to send one more request
//! (answered with `Connection: close`) and then closes the rest, with a FIN; the forced
//! phase closes them at once. It never reads from a socket and never answers a request:
//! what it resumes is handed back to the connection's code ([`Resume`]).
//!
//! An idle HTTP/2 connection out of h2 ([`Waiting::Http2`], from [`crate::h2_idle`])
//! waits here until its client sends, its `keepalive_timeout` runs out or a drain begins;
//! the set never closes one: it resumes it, and the connection's code closes it with a
//! GOAWAY of its own (a GOAWAY tells an HTTP/2 client to take its next request elsewhere,
//! so no grace is needed for it at a drain).
//!
//! Quiet WebSockets wait here too ([`Waiting::WebSocket`], from [`crate::websocket`]),
//! without their task and tungstenite's buffers. The set never closes one: it resumes it
//! when its client sends, when its ping is due (checked every quarter of the shorter of
//! `keepalive_timeout` and `websocket.ping_interval`), when its plugin sends
//! ([`IdleSet::wake`]), at its place in the drain's spread (kept in order from when the
//! drain began, so that each comes back on time and the watcher stays until the last), and
//! at the forced phase. The connection's task does the rest (the ping, the 1012).

use crate::drain::{DrainWatch, Phase};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// A socket out of tokio, waiting idle (non-blocking, as tokio left it).
#[derive(Debug)]
pub(crate) enum IdleSocket {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

impl AsFd for IdleSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            IdleSocket::Tcp(s) => s.as_fd(),
            IdleSocket::Unix(s) => s.as_fd(),
        }
    }
}

impl IdleSocket {
    /// Whether the client sent something that is not read yet. Closing the socket then
    /// would send a reset (and lose a request): such a connection is resumed instead.
    pub(crate) fn has_unread(&self) -> bool {
        use nix::sys::socket::{MsgFlags, recv};
        use std::os::fd::AsRawFd;
        let mut byte = [0u8; 1];
        let fd = self.as_fd().as_raw_fd();
        matches!(
            recv(fd, &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT),
            Ok(1)
        )
    }
}

/// What brings an idle connection back: called with its socket when the client sent
/// something (or closed), and for a WebSocket also when its deadline comes, its plugin
/// sends or the drain reaches it; dropped, with the socket closed, when a keep-alive
/// connection's idle time ran out or the drain closes it.
pub(crate) type Resume = Box<dyn FnOnce(IdleSocket) + Send>;

/// What a connection waits for, and so what its deadline and the drain do to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Waiting {
    /// An HTTP/1 keep-alive connection, for its next request: closed (with a FIN) when its
    /// idle time runs out, or when the drain's grace ends.
    Request,
    /// An HTTP/2 connection out of h2 ([`crate::h2_idle`]), for its next request: resumed
    /// when its client sends, when its deadline comes (`keepalive_timeout`) and when the
    /// drain begins; its resume closes it then, with a GOAWAY. Never closed here.
    Http2,
    /// A quiet WebSocket: resumed when its client sends, when its deadline comes (a ping
    /// is due), when its plugin sends ([`IdleSet::wake`]), `spread` after the drain began
    /// (its task then closes it with 1012) or at the forced phase. Never closed here.
    WebSocket { spread: Duration },
}

impl Waiting {
    /// The set closes such a connection when its idle time runs out or the drain's grace
    /// ends (unless its client sent something meanwhile): an HTTP/1 keep-alive connection.
    /// The others are resumed instead, and closed by their own code.
    fn closed_here(self) -> bool {
        self == Waiting::Request
    }
}

/// An entry's place in the set, for [`IdleSet::wake`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Parked {
    index: u32,
    tag: u32,
}

struct Entry {
    socket: IdleSocket,
    resume: Resume,
    /// When `keepalive_timeout` runs out for it, or a WebSocket's ping is due.
    deadline: Instant,
    /// Told apart from an earlier entry in the same slot.
    tag: u32,
    waiting: Waiting,
}

/// What a look through the whole set does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sweep {
    /// Takes what is due by then: keep-alive connections are closed, WebSockets resumed.
    Due(Instant),
    /// The drain's grace is over: every keep-alive connection is closed, and none parks
    /// any more; WebSockets wait for their place in the drain's spread.
    GraceOver,
    /// Everything goes.
    All,
}

#[derive(Default)]
struct Slots {
    entries: Vec<Option<Entry>>,
    /// Free slots, lowest first: entries gather at the front, so the tail can be given
    /// back once many connections are gone ([`Slots::compact`]).
    free: BinaryHeap<Reverse<u32>>,
    /// The tag the next entry gets.
    next_tag: u32,
    held: usize,
    /// The drain began: WebSockets no longer park (they are about to be closed).
    draining: bool,
    /// The drain's grace is over (or it was forced): no keep-alive connection waits idle
    /// any more.
    ended: bool,
}

impl Slots {
    fn take(&mut self, index: u32, tag: Option<u32>) -> Option<Entry> {
        let slot = self.entries.get_mut(index as usize)?;
        if tag.is_some_and(|tag| slot.as_ref().is_none_or(|e| e.tag != tag)) {
            return None;
        }
        let entry = slot.take()?;
        self.free.push(Reverse(index));
        self.held -= 1;
        Some(entry)
    }

    fn slot(&mut self) -> u32 {
        match self.free.pop() {
            Some(Reverse(index)) => index,
            None => {
                self.entries.push(None);
                (self.entries.len() - 1) as u32
            }
        }
    }

    /// Gives back the room of free slots at the end, and the memory of a table mostly
    /// empty (after a crowd of idle connections left).
    fn compact(&mut self) {
        while matches!(self.entries.last(), Some(None)) {
            self.entries.pop();
        }
        let len = self.entries.len() as u32;
        self.free.retain(|&Reverse(i)| i < len);
        if self.entries.capacity() > 2 * self.entries.len() + 64 {
            self.entries
                .shrink_to(self.entries.len() + self.entries.len() / 2);
            self.free.shrink_to_fit();
        }
    }
}

/// The worker's idle connections.
pub(crate) struct IdleSet {
    /// None if the kernel refused an epoll instance: connections then wait in their tasks.
    epoll: Option<Epoll>,
    slots: Mutex<Slots>,
    /// [`IdleSet::watch`] runs: without it nothing would resume what waits here.
    watched: AtomicBool,
}

/// How many events one look at the set takes.
const BATCH: usize = 256;

/// How many entries a sweep looks at under one hold of the lock.
const SWEEP_CHUNK: usize = 4096;

/// How often the watcher looks for connections idle too long with `keepalive_timeout`
/// (a connection is closed at most this late), and the shortest such pause.
pub(crate) fn sweep_every(keepalive: Duration) -> Duration {
    (keepalive / 4).max(MIN_SWEEP)
}
const MIN_SWEEP: Duration = Duration::from_millis(25);

impl IdleSet {
    pub(crate) fn new() -> Self {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .inspect_err(|e| {
                tracing::warn!("epoll_create1: {e}; idle connections wait in their own tasks");
            })
            .ok();
        Self {
            epoll,
            slots: Mutex::default(),
            watched: AtomicBool::new(false),
        }
    }

    /// Whether connections can wait here (the set exists and is watched).
    pub(crate) fn open(&self) -> bool {
        self.epoll.is_some() && self.watched.load(Ordering::Acquire)
    }

    /// Connections waiting here now.
    pub(crate) fn held(&self) -> usize {
        self.lock().held
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds `socket` until its client sends, `idle_for` passes, or the drain closes it
    /// (see [`Waiting`] for what each kind waits for). After the drain's grace a keep-alive
    /// connection is closed at once; once the drain began a WebSocket is resumed at once.
    /// Where it waits, if it does.
    pub(crate) fn park(
        &self,
        socket: IdleSocket,
        idle_for: Duration,
        waiting: Waiting,
        resume: Resume,
    ) -> Option<Parked> {
        let epoll = self.epoll.as_ref()?;
        let mut slots = self.lock();
        let refused = match waiting {
            Waiting::Request => slots.ended,
            Waiting::Http2 | Waiting::WebSocket { .. } => slots.draining || slots.ended,
        };
        if refused {
            drop(slots);
            // A request that arrived after the drain's grace is still served (with
            // `Connection: close`), as in a connection's own task; a WebSocket goes back
            // to its task, which closes it.
            if !waiting.closed_here() || socket.has_unread() {
                resume(socket);
            }
            return None;
        }
        let index = slots.slot();
        let tag = slots.next_tag;
        slots.next_tag = tag.wrapping_add(1);
        let event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT,
            (u64::from(tag) << 32) | u64::from(index),
        );
        // Still holding the lock: the watcher cannot look for the entry before it is there.
        if let Err(e) = epoll.add(&socket, event) {
            // It waits in a task of its own again.
            tracing::debug!("idle set: epoll_ctl: {e}");
            slots.free.push(Reverse(index));
            drop(slots);
            resume(socket);
            return None;
        }
        slots.entries[index as usize] = Some(Entry {
            socket,
            resume,
            deadline: Instant::now() + idle_for,
            tag,
            waiting,
        });
        slots.held += 1;
        Some(Parked { index, tag })
    }

    /// Resumes the connection parked at `parked`, if it still waits there (for a plugin
    /// that sent on a quiet WebSocket). Within the runtime: the resume registers the
    /// socket with tokio again.
    pub(crate) fn wake(&self, parked: Parked) {
        let Some(epoll) = &self.epoll else {
            return;
        };
        let entry = self.lock().take(parked.index, Some(parked.tag));
        if let Some(entry) = entry {
            let _ = epoll.delete(&entry.socket);
            (entry.resume)(entry.socket);
        }
    }

    /// The drain began: WebSockets park no more, and those waiting here are to be resumed
    /// at their places in the drain's spread, from `now`. Their slots, in that order.
    fn begin_drain(&self, now: Instant) -> std::collections::VecDeque<(Instant, Parked)> {
        let mut slots = self.lock();
        slots.draining = true;
        let mut spread: Vec<(Instant, Parked)> = slots
            .entries
            .iter()
            .enumerate()
            .filter_map(|(index, entry)| {
                let entry = entry.as_ref()?;
                let spread = match entry.waiting {
                    Waiting::WebSocket { spread } => spread,
                    // Closed at once, by its resume.
                    Waiting::Http2 => Duration::ZERO,
                    Waiting::Request => return None,
                };
                let parked = Parked {
                    index: index as u32,
                    tag: entry.tag,
                };
                Some(((now + spread).min(entry.deadline), parked))
            })
            .collect();
        drop(slots);
        spread.sort_unstable_by_key(|(at, _)| *at);
        spread.into()
    }

    /// Resumes the connections whose sockets became readable, `BATCH` at most; true if
    /// there may be more.
    fn resume_ready(&self, epoll: &Epoll, events: &mut [EpollEvent]) -> std::io::Result<bool> {
        let n = epoll.wait(events, EpollTimeout::ZERO)?;
        let mut ready = Vec::with_capacity(n);
        {
            let mut slots = self.lock();
            for event in &events[..n] {
                let (index, tag) = (event.data() as u32, (event.data() >> 32) as u32);
                if let Some(entry) = slots.take(index, Some(tag)) {
                    ready.push(entry);
                }
            }
        }
        for entry in ready {
            // Out of the set before tokio takes it (closing would remove it too, but the
            // socket lives on). Outside the lock: parks need not wait for the system calls.
            let _ = epoll.delete(&entry.socket);
            (entry.resume)(entry.socket);
        }
        Ok(n == events.len())
    }

    /// Looks through the whole set (see [`Sweep`]): closes each keep-alive connection it
    /// takes with a FIN and resumes each WebSocket. With an `epoll` (the watcher's), a
    /// keep-alive connection whose client sent something meanwhile (its event not handled
    /// yet) is resumed instead, so that its request is served, never reset; without one
    /// (the watcher is gone) every keep-alive connection taken is closed.
    fn sweep(&self, epoll: Option<&Epoll>, sweep: Sweep) {
        self.sweep_by(epoll, sweep, SWEEP_CHUNK);
    }

    /// [`IdleSet::sweep`], `chunk` entries at a time: a park or a resume on another thread
    /// waits for one chunk at most, not for a look through a million entries.
    fn sweep_by(&self, epoll: Option<&Epoll>, sweep: Sweep, chunk: usize) {
        if matches!(sweep, Sweep::GraceOver | Sweep::All) {
            self.lock().ended = true;
        }
        let mut due = Vec::new();
        let mut next = 0;
        loop {
            let more = {
                let mut slots = self.lock();
                let end = (next + chunk).min(slots.entries.len());
                for i in next as u32..end as u32 {
                    let taken = slots.entries[i as usize]
                        .as_ref()
                        .is_some_and(|e| match sweep {
                            Sweep::Due(now) => e.deadline <= now,
                            Sweep::GraceOver => e.waiting.closed_here(),
                            Sweep::All => true,
                        });
                    if taken {
                        due.extend(slots.take(i, None));
                    }
                }
                next = end;
                let more = end < slots.entries.len();
                if !more {
                    slots.compact();
                }
                more
            };
            // Outside the lock: each drop closes a socket and releases its connection.
            for entry in due.drain(..) {
                let resumed = match epoll {
                    Some(_) => !entry.waiting.closed_here() || entry.socket.has_unread(),
                    // The watcher is gone (it failed, or the worker stops): a WebSocket
                    // still goes back to a task, while the runtime runs, so that it is
                    // closed properly and its plugin hears of it.
                    None => {
                        !entry.waiting.closed_here()
                            && tokio::runtime::Handle::try_current().is_ok()
                    }
                };
                if resumed {
                    if let Some(epoll) = &self.epoll {
                        let _ = epoll.delete(&entry.socket);
                    }
                    (entry.resume)(entry.socket);
                }
            }
            if !more {
                return;
            }
        }
    }

    /// Watches the set until the drain is over: resumes the connections whose clients
    /// sent, closes those idle for too long, and applies the drain (see the module).
    /// `sweep`: how often deadlines are checked (a connection closes, or a WebSocket's
    /// ping goes out, at most this late); `grace`: `drain_idle_grace`.
    pub(crate) async fn watch(&self, sweep: Duration, grace: Duration, drain: DrainWatch) {
        let Some(epoll) = &self.epoll else {
            return;
        };
        let ready = match epoll.0.try_clone().and_then(baton_sys::readiness::readable) {
            Ok(fd) => fd,
            Err(e) => {
                return tracing::warn!("idle connections wait in their own tasks: {e}");
            }
        };
        self.watched.store(true, Ordering::Release);
        let _unwatched = Unwatched(self);
        let mut events = vec![EpollEvent::empty(); BATCH];
        let mut tick = tokio::time::interval(sweep);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut grace_ends: Option<Instant> = None;
        let mut grace_over = false;
        // WebSockets waiting for their places in the drain's spread, soonest first.
        let mut spread = std::collections::VecDeque::new();
        let (mut closing, mut forced) = (drain.clone(), drain);
        loop {
            let next_spread = spread.front().map(|(at, _)| *at);
            // Not biased, so that a steady stream of ready sockets cannot hold off the
            // deadlines: a sweep resumes a due socket whose client sent meanwhile.
            tokio::select! {
                guard = ready.readable() => {
                    let mut guard = match guard {
                        Ok(guard) => guard,
                        Err(e) => return tracing::warn!("idle connections: {e}"),
                    };
                    match self.resume_ready(epoll, &mut events) {
                        Ok(true) => tokio::task::yield_now().await,
                        Ok(false) => guard.clear_ready(),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return tracing::warn!("idle connections: epoll_wait: {e}"),
                    }
                }
                _ = tick.tick() => self.sweep(Some(epoll), Sweep::Due(Instant::now())),
                () = closing.reached(Phase::Closing), if grace_ends.is_none() => {
                    let now = Instant::now();
                    grace_ends = Some(now + grace);
                    spread = self.begin_drain(now);
                }
                () = tokio::time::sleep_until(next_spread.unwrap_or_else(Instant::now)),
                    if next_spread.is_some() => {
                    let now = Instant::now();
                    while let Some(&(at, parked)) = spread.front() && at <= now {
                        spread.pop_front();
                        self.wake(parked);
                    }
                }
                () = forced.reached(Phase::Forced) => {
                    self.sweep(Some(epoll), Sweep::All);
                    return;
                }
                () = tokio::time::sleep_until(grace_ends.unwrap_or_else(Instant::now)),
                    if grace_ends.is_some() && !grace_over => {
                    self.sweep(Some(epoll), Sweep::GraceOver);
                    grace_over = true;
                }
            }
            // After the grace only WebSockets wait for their turn in the spread.
            if grace_over && self.held() == 0 {
                return;
            }
        }
    }
}

/// Once the watcher is gone (the drain is over, or it failed), nothing parks here and
/// whatever waited is closed.
struct Unwatched<'a>(&'a IdleSet);

impl Drop for Unwatched<'_> {
    fn drop(&mut self) {
        self.0.watched.store(false, Ordering::Release);
        // Keep-alive connections are closed, not resumed: the watcher may be gone because
        // the worker is stopping.
        self.0.sweep(None, Sweep::All);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drain::Drain;
    use std::io::{Read, Write};
    use std::sync::atomic::AtomicUsize;
    use std::sync::{Arc, Mutex};

    /// A connected pair: the client's end (blocking) and the server's (non-blocking, as
    /// tokio leaves a socket).
    fn pair() -> (std::net::TcpStream, IdleSocket) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (client, IdleSocket::Tcp(server))
    }

    /// A resume that counts, and sends the first bytes it finds back to the client.
    fn echo_once(resumed: &Arc<AtomicUsize>) -> Resume {
        let resumed = resumed.clone();
        Box::new(move |socket| {
            resumed.fetch_add(1, Ordering::SeqCst);
            if let IdleSocket::Tcp(mut s) = socket {
                s.set_nonblocking(false).unwrap();
                let mut buf = [0u8; 64];
                let n = s.read(&mut buf).unwrap();
                s.write_all(&buf[..n]).unwrap();
            }
        })
    }

    async fn watched(
        set: &Arc<IdleSet>,
        sweep: Duration,
        grace: Duration,
    ) -> (Drain, tokio::task::JoinHandle<()>) {
        let (drain, watch) = Drain::new();
        let watcher = {
            let set = set.clone();
            tokio::spawn(async move { set.watch(sweep, grace, watch).await })
        };
        while !set.open() {
            tokio::task::yield_now().await;
        }
        (drain, watcher)
    }

    /// Waits (up to 5 s) until `f` holds.
    async fn until(what: &str, f: impl Fn() -> bool) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while !f() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what}"));
    }

    #[tokio::test]
    async fn a_connection_whose_client_sends_is_resumed_with_its_bytes_unread() {
        let set = Arc::new(IdleSet::new());
        let (_drain, _watcher) =
            watched(&set, Duration::from_secs(60), Duration::from_secs(1)).await;
        let resumed = Arc::new(AtomicUsize::new(0));
        let mut clients = Vec::new();
        // More than one batch, so that a full batch is followed by another look.
        for _ in 0..BATCH + 44 {
            let (client, socket) = pair();
            set.park(
                socket,
                Duration::from_secs(60),
                Waiting::Request,
                echo_once(&resumed),
            );
            clients.push(client);
        }
        assert_eq!(set.held(), BATCH + 44);
        for (i, client) in clients.iter_mut().enumerate() {
            client.write_all(format!("ping {i}").as_bytes()).unwrap();
        }
        until("every connection resumed", || {
            resumed.load(Ordering::SeqCst) == BATCH + 44
        })
        .await;
        for (i, client) in clients.iter_mut().enumerate() {
            let mut buf = [0u8; 64];
            let n = client.read(&mut buf).unwrap();
            assert_eq!(&buf[..n], format!("ping {i}").as_bytes());
        }
        assert_eq!(set.held(), 0);
        // The next sweep gives the table's room back.
        set.sweep(None, Sweep::Due(Instant::now()));
        let slots = set.lock();
        assert_eq!((slots.entries.len(), slots.free.len()), (0, 0));
        assert!(
            slots.entries.capacity() <= 64,
            "{}",
            slots.entries.capacity()
        );
    }

    #[tokio::test]
    async fn a_request_that_arrived_as_its_deadline_or_the_grace_ended_is_served_not_reset() {
        // No watcher: its events wait, as when a sweep or the grace's end comes first.
        let set = IdleSet::new();
        let resumed = Arc::new(AtomicUsize::new(0));
        let (mut late, socket) = pair();
        set.park(
            socket,
            Duration::ZERO,
            Waiting::Request,
            echo_once(&resumed),
        );
        let (mut silent, socket) = pair();
        set.park(
            socket,
            Duration::ZERO,
            Waiting::Request,
            echo_once(&resumed),
        );
        late.write_all(b"late").unwrap();
        // Until the bytes are there to peek at.
        until("the bytes arrived", || {
            set.lock()
                .entries
                .iter()
                .flatten()
                .any(|e| e.socket.has_unread())
        })
        .await;
        set.sweep(set.epoll.as_ref(), Sweep::All);
        assert_eq!(resumed.load(Ordering::SeqCst), 1);
        let mut buf = [0u8; 8];
        let n = late.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"late");
        assert_eq!(silent.read(&mut buf).expect("a FIN, not a reset"), 0);
        // After the grace: a connection going idle with a request already there is
        // served; one without is closed.
        let (mut late, socket) = pair();
        late.write_all(b"later").unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        set.park(
            socket,
            Duration::from_secs(60),
            Waiting::Request,
            echo_once(&resumed),
        );
        assert_eq!(resumed.load(Ordering::SeqCst), 2);
        let n = late.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"later");
        assert_eq!(set.held(), 0);
    }

    #[test]
    fn slots_are_taken_lowest_first_and_the_free_tail_is_given_back() {
        let mut slots = Slots::default();
        let taken: Vec<u32> = (0..8).map(|_| slots.slot()).collect();
        assert_eq!(taken, (0..8).collect::<Vec<_>>());
        // Slots 2 and 5 freed (as `take` does): the lowest comes back first.
        slots.free.push(Reverse(5));
        slots.free.push(Reverse(2));
        assert_eq!(slots.slot(), 2);
        slots.free.push(Reverse(2));
        // Entries 0..8 are all empty (none was filled): compacting empties the table.
        slots.compact();
        assert_eq!((slots.entries.len(), slots.free.len()), (0, 0));
        assert_eq!(slots.slot(), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_with_a_fin_once_its_idle_time_ran_out() {
        let set = Arc::new(IdleSet::new());
        let (_drain, _watcher) =
            watched(&set, Duration::from_millis(20), Duration::from_secs(1)).await;
        let resumed = Arc::new(AtomicUsize::new(0));
        let (mut client, socket) = pair();
        let began = std::time::Instant::now();
        set.park(
            socket,
            Duration::from_millis(150),
            Waiting::Request,
            echo_once(&resumed),
        );
        let mut rest = Vec::new();
        let n = tokio::task::spawn_blocking(move || client.read_to_end(&mut rest))
            .await
            .unwrap()
            .expect("a FIN, not a reset");
        assert_eq!(n, 0);
        assert!(
            began.elapsed() >= Duration::from_millis(150),
            "{:?}",
            began.elapsed()
        );
        assert_eq!(resumed.load(Ordering::SeqCst), 0);
        assert_eq!(set.held(), 0);
    }

    #[tokio::test]
    async fn a_drain_resumes_what_sends_within_the_grace_and_closes_the_rest_after_it() {
        let set = Arc::new(IdleSet::new());
        let grace = Duration::from_millis(300);
        let (drain, watcher) = watched(&set, Duration::from_secs(60), grace).await;
        let resumed = Arc::new(AtomicUsize::new(0));
        let (mut sender, socket) = pair();
        set.park(
            socket,
            Duration::from_secs(60),
            Waiting::Request,
            echo_once(&resumed),
        );
        let (mut silent, socket) = pair();
        set.park(
            socket,
            Duration::from_secs(60),
            Waiting::Request,
            echo_once(&resumed),
        );
        let began = std::time::Instant::now();
        drain.advance(Phase::Closing);
        tokio::time::sleep(grace / 3).await;
        sender.write_all(b"last").unwrap();
        until("the sender resumed", || resumed.load(Ordering::SeqCst) == 1).await;
        // Within the grace a keep-alive connection that goes idle still waits (its next
        // request would be answered with `Connection: close`); an HTTP/2 one goes back to
        // its own code at once, which closes it with a GOAWAY.
        let (during, socket) = pair();
        let waits = set.park(
            socket,
            Duration::from_secs(60),
            Waiting::Request,
            echo_once(&resumed),
        );
        assert!(waits.is_some(), "refused within the grace");
        let (_h2, socket) = pair();
        let h2_resumed = Arc::new(AtomicUsize::new(0));
        let h2_waits = {
            let h2_resumed = h2_resumed.clone();
            set.park(
                socket,
                Duration::from_secs(60),
                Waiting::Http2,
                Box::new(move |_| {
                    h2_resumed.fetch_add(1, Ordering::SeqCst);
                }),
            )
        };
        assert!(h2_waits.is_none());
        assert_eq!(
            h2_resumed.load(Ordering::SeqCst),
            1,
            "given back to be closed"
        );
        let mut rest = Vec::new();
        let n = tokio::task::spawn_blocking(move || silent.read_to_end(&mut rest))
            .await
            .unwrap()
            .expect("a FIN, not a reset");
        assert_eq!(n, 0);
        let mut during = during;
        let mut rest = Vec::new();
        let n = tokio::task::spawn_blocking(move || during.read_to_end(&mut rest))
            .await
            .unwrap()
            .expect("a FIN, not a reset");
        assert_eq!(n, 0, "closed after the grace, with nothing sent");
        assert!(began.elapsed() >= grace, "{:?}", began.elapsed());
        watcher.await.unwrap();
        // The grace is over: a connection that goes idle now is closed, not held.
        assert!(!set.open());
        let (mut late, socket) = pair();
        set.park(
            socket,
            Duration::from_secs(60),
            Waiting::Request,
            echo_once(&resumed),
        );
        assert_eq!(set.held(), 0);
        assert_eq!(late.read(&mut [0u8; 8]).unwrap(), 0);
    }

    #[tokio::test]
    async fn a_sweep_in_chunks_takes_what_is_due_in_every_chunk_and_nothing_else() {
        let set = IdleSet::new();
        let resumed = Arc::new(AtomicUsize::new(0));
        let mut clients = Vec::new();
        for i in 0..7 {
            let (client, socket) = pair();
            let idle_for = Duration::from_secs(if i % 3 == 0 { 60 } else { 0 });
            set.park(socket, idle_for, Waiting::Request, echo_once(&resumed));
            clients.push((i % 3 == 0, client));
        }
        set.sweep_by(set.epoll.as_ref(), Sweep::Due(Instant::now()), 2);
        assert_eq!(set.held(), 3, "the three not due are left");
        for (kept, client) in &mut clients {
            if !*kept {
                assert_eq!(client.read(&mut [0u8; 8]).expect("a FIN, not a reset"), 0);
            }
        }
        assert_eq!(resumed.load(Ordering::SeqCst), 0);
    }

    /// A resume that records its name and when it ran (dropping the socket).
    fn record(log: &Arc<Mutex<Vec<(&'static str, Instant)>>>, name: &'static str) -> Resume {
        let log = log.clone();
        Box::new(move |_| log.lock().unwrap().push((name, Instant::now())))
    }

    const WEBSOCKET: Waiting = Waiting::WebSocket {
        spread: Duration::ZERO,
    };

    #[tokio::test]
    async fn a_websocket_comes_back_when_its_deadline_comes_or_it_is_woken_never_closed() {
        let set = Arc::new(IdleSet::new());
        let (_drain, _watcher) =
            watched(&set, Duration::from_millis(25), Duration::from_secs(1)).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (_ping_due, socket) = pair();
        set.park(
            socket,
            Duration::from_millis(50),
            WEBSOCKET,
            record(&log, "due"),
        );
        until("resumed when its ping was due", || {
            log.lock().unwrap().len() == 1
        })
        .await;
        let (_woken, socket) = pair();
        let parked = set
            .park(
                socket,
                Duration::from_secs(60),
                WEBSOCKET,
                record(&log, "woken"),
            )
            .expect("parked");
        set.wake(parked);
        let names: Vec<_> = log.lock().unwrap().iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["due", "woken"]);
        assert_eq!(set.held(), 0);
        // Woken again, a slot left (or taken by another connection since) is not touched.
        let (_other, socket) = pair();
        set.park(
            socket,
            Duration::from_secs(60),
            WEBSOCKET,
            record(&log, "other"),
        );
        set.wake(parked);
        assert_eq!((log.lock().unwrap().len(), set.held()), (2, 1));
    }

    #[tokio::test]
    async fn at_a_drain_websockets_come_back_at_their_places_in_the_spread_in_order() {
        let set = Arc::new(IdleSet::new());
        let grace = Duration::from_millis(50);
        let (drain, watcher) = watched(&set, Duration::from_secs(60), grace).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let spread = |ms| Waiting::WebSocket {
            spread: Duration::from_millis(ms),
        };
        let (_late, socket) = pair();
        set.park(
            socket,
            Duration::from_secs(60),
            spread(300),
            record(&log, "late"),
        );
        let (_soon, socket) = pair();
        set.park(
            socket,
            Duration::from_secs(60),
            spread(100),
            record(&log, "soon"),
        );
        let (mut keepalive, socket) = pair();
        set.park(
            socket,
            Duration::from_secs(60),
            Waiting::Request,
            record(&log, "no"),
        );
        let began = Instant::now();
        drain.advance(Phase::Closing);
        // Once the set saw the drain, a WebSocket that goes quiet goes straight back.
        until("the drain seen", || set.lock().draining).await;
        let (_refused, socket) = pair();
        assert!(
            set.park(
                socket,
                Duration::from_secs(60),
                spread(0),
                record(&log, "refused")
            )
            .is_none()
        );
        // The keep-alive connection is closed (a FIN) after the grace; the WebSockets wait.
        let read = tokio::task::spawn_blocking(move || keepalive.read(&mut [0u8; 8]));
        assert_eq!(read.await.unwrap().expect("a FIN, not a reset"), 0);
        until("both WebSockets back", || log.lock().unwrap().len() == 3).await;
        let log = log.lock().unwrap().clone();
        let names: Vec<_> = log.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["refused", "soon", "late"]);
        assert!(
            log[1].1 - began >= Duration::from_millis(100),
            "{:?}",
            log[1].1 - began
        );
        assert!(
            log[2].1 - began >= Duration::from_millis(300),
            "{:?}",
            log[2].1 - began
        );
        // Nothing waits any more: the watcher is done.
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("the watcher ended")
            .unwrap();
    }
}
