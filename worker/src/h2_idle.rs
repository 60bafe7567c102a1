//! Idle HTTP/2 connections without h2: what a new h2 connection on the same socket needs
//! to carry on where the last one stopped, followed on the wire.
//!
//! h2 keeps its buffers for a connection's whole life (16 KiB to write, 8 KiB to read, 4
//! KiB for HPACK, its streams' store), about 20 KiB per idle connection, and has no way
//! to give them back or to hand its state over. What an idle connection needs of that
//! state is small, and all of it crosses the socket, so [`H2Idle`] watches the frames
//! both ways ([`H2Idle::inbound`], [`H2Idle::outbound`]) and keeps:
//!
//! - the client's settings, merged: a new connection gets them as the client's first
//!   SETTINGS frame, in a preface replayed in front of what the socket brings
//!   ([`H2Idle::resume`]);
//! - the connection's flow-control windows. What the client granted the server goes to the
//!   new connection as a WINDOW_UPDATE in that replay; what the client may still send is
//!   brought in line by adjusting the new connection's first WINDOW_UPDATEs to the client
//!   ([`H2Idle::filter_out`]);
//! - the highest stream the client opened: a frame the client sends later on one of those
//!   closed streams (a late WINDOW_UPDATE or RST_STREAM, which RFC 9113 allows) would be a
//!   protocol error to a connection that never saw the stream, so it becomes a frame of a
//!   type every implementation ignores (RFC 9113, 4.1);
//! - HPACK: on sockets that can wait idle, the worker's h2 advertises a header table of 0
//!   bytes, so the client's encoder keeps no entries that a new decoder would lack. A
//!   client's first request may come before it knows, and add entries; once it has
//!   acknowledged the setting, its next header block must begin by emptying its table
//!   (RFC 7541, 4.2), which a new decoder accepts as well. The client's header blocks are
//!   read to know where its table stands ([`Hpack`]). The server's encoder may
//!   start afresh: the entries it adds are the newest in the client's table, found at the
//!   same indices whatever older ones that table still holds.
//!
//! Every SETTINGS and PING must be acknowledged before a connection leaves h2. The replay
//! also acknowledges the new connection's own SETTINGS, which the client already applied
//! (the same worker sends the same settings), so that they hold from its first frame:
//! the window of a new stream among them (h2 opens new streams with 64 KiB until its
//! settings are acknowledged, and a request body sent at once would overrun that). So
//! the new connection's SETTINGS is dropped on its way out, and so is its acknowledgement
//! of the client's replayed SETTINGS: the client never asked for either.
//!
//! A connection is at rest ([`H2Idle::rest`]) when all of that is settled: every stream
//! the client opened has ended both ways, no frame is half read or half written, no GOAWAY
//! was sent, and the windows allow a new connection's assumptions. This module never
//! touches a socket; [`crate::connection`] feeds it the bytes and decides when to park.

/// How an HTTP/2 connection with prior knowledge begins.
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A frame header's length.
const HEAD: usize = 9;

/// Every flow-control window's size when a connection begins (RFC 9113, 6.9.2).
const INITIAL_WINDOW: i64 = 65_535;

/// The connection receive window the worker's h2 keeps open (set on its builder). A new
/// connection opens it with its first WINDOW_UPDATE.
pub(crate) const CONN_WINDOW: u32 = 1 << 20;

/// Frame types (RFC 9113, 6).
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
/// A frame type no specification defines: receivers ignore it (RFC 9113, 4.1; 5.5).
const IGNORED: u8 = 0xf7;

/// Flags.
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A frame's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Head {
    fn parse(b: &[u8; HEAD]) -> Self {
        Self {
            len: usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]),
            kind: b[3],
            flags: b[4],
            stream: u32::from_be_bytes([b[5], b[6], b[7], b[8]]) & 0x7fff_ffff,
        }
    }
}

/// A frame of `kind` with `payload`, as bytes.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(HEAD + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A GOAWAY (NO_ERROR) that tells the client every stream up to `last_stream` was
/// processed: what an idle connection is closed with.
pub(crate) fn goaway(last_stream: u32) -> [u8; HEAD + 8] {
    let mut out = [0u8; HEAD + 8];
    out[2] = 8;
    out[3] = GOAWAY;
    out[HEAD..HEAD + 4].copy_from_slice(&last_stream.to_be_bytes());
    out
}

/// What [`Walker::next`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// A frame's header is complete; `at`: where it began in this piece, if all of it is
    /// in this piece.
    Head { head: Head, at: Option<usize> },
    /// A frame is complete (its payload in [`Walker::payload`] if it was kept).
    Frame(Head),
}

/// Follows the frames of one direction through the pieces the bytes pass in.
#[derive(Debug, Default)]
struct Walker {
    head: [u8; HEAD],
    /// Bytes of the next frame's header seen so far.
    have: usize,
    /// The frame whose payload is passing, and how much of it is still to come.
    current: Option<Head>,
    left: usize,
    /// The current frame's payload, for the kinds looked into.
    payload: Vec<u8>,
    keep: bool,
    /// Header blocks are looked into (the client's).
    headers: bool,
}

impl Walker {
    fn new(headers: bool) -> Self {
        Self {
            headers,
            ..Self::default()
        }
    }

    /// The next event in `piece` from `*pos` on, which it moves past what was used.
    fn next(&mut self, piece: &[u8], pos: &mut usize) -> Option<Event> {
        if let Some(head) = self.current {
            let take = self.left.min(piece.len() - *pos);
            if self.keep {
                self.payload.extend_from_slice(&piece[*pos..*pos + take]);
            }
            *pos += take;
            self.left -= take;
            if self.left > 0 {
                return None;
            }
            self.current = None;
            return Some(Event::Frame(head));
        }
        if *pos == piece.len() {
            return None;
        }
        let take = (HEAD - self.have).min(piece.len() - *pos);
        let at = (self.have == 0 && take == HEAD).then_some(*pos);
        self.head[self.have..self.have + take].copy_from_slice(&piece[*pos..*pos + take]);
        self.have += take;
        *pos += take;
        if self.have < HEAD {
            return None;
        }
        self.have = 0;
        let head = Head::parse(&self.head);
        self.current = Some(head);
        self.left = head.len;
        self.payload.clear();
        self.keep = matches!(head.kind, SETTINGS | WINDOW_UPDATE)
            || (self.headers && matches!(head.kind, HEADERS | CONTINUATION));
        Some(Event::Head { head, at })
    }

    /// Between two frames: nothing of a frame is half seen.
    fn between(&self) -> bool {
        self.have == 0 && self.current.is_none()
    }

    /// Bytes of a header that began at the end of the last piece and is not complete.
    fn partial_head(&self) -> usize {
        if self.current.is_none() { self.have } else { 0 }
    }

    /// Forgets the partial header at the end of the last piece (it will pass again).
    fn unsee_partial_head(&mut self) {
        if self.current.is_none() {
            self.have = 0;
        }
    }
}

/// The client's side of HPACK, as far as it matters here: whether its header table may
/// hold entries (which a new connection's decoder would not have).
#[derive(Debug)]
struct Hpack {
    /// The header block being received (HEADERS and its CONTINUATIONs).
    block: Vec<u8>,
    in_block: bool,
    /// The table may hold entries.
    entries: bool,
    /// The client's last table size update was to 0: its table stays empty.
    zero: bool,
    /// A block could not be read: something is off, the connection never parks.
    unreadable: bool,
}

impl Hpack {
    fn new() -> Self {
        Self {
            block: Vec::new(),
            in_block: false,
            entries: false,
            zero: false,
            unreadable: false,
        }
    }

    fn fragment(&mut self, fragment: &[u8], end: bool) {
        if end && self.block.is_empty() {
            self.scan(fragment);
        } else {
            self.block.extend_from_slice(fragment);
            if end {
                let block = std::mem::take(&mut self.block);
                self.scan(&block);
            }
        }
        self.in_block = !end;
    }

    /// Reads a header block's representations (RFC 7541, 6): which insert into the table,
    /// and its size updates.
    fn scan(&mut self, mut b: &[u8]) {
        while let Some(&first) = b.first() {
            let read = if first & 0x80 != 0 {
                int(&mut b, 7).map(drop)
            } else if first & 0xc0 == 0x40 {
                if !self.zero {
                    self.entries = true;
                }
                literal(&mut b, 6)
            } else if first & 0xe0 == 0x20 {
                int(&mut b, 5).map(|size| {
                    self.zero = size == 0;
                    if self.zero {
                        self.entries = false;
                    }
                })
            } else {
                literal(&mut b, 4)
            };
            if read.is_none() {
                self.unreadable = true;
                return;
            }
        }
    }
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541, 5.1).
fn int(b: &mut &[u8], n: u32) -> Option<u64> {
    let (&first, rest) = b.split_first()?;
    *b = rest;
    let max = (1u64 << n) - 1;
    let mut value = u64::from(first) & max;
    if value < max {
        return Some(value);
    }
    let mut shift = 0;
    loop {
        let (&byte, rest) = b.split_first()?;
        *b = rest;
        value = value.checked_add(u64::from(byte & 0x7f).checked_shl(shift)?)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
}

/// A literal field: its name index (`n`-bit prefix), its name if not indexed, its value.
fn literal(b: &mut &[u8], n: u32) -> Option<()> {
    if int(b, n)? == 0 {
        string(b)?;
    }
    string(b)
}

fn string(b: &mut &[u8]) -> Option<()> {
    let len = usize::try_from(int(b, 7)?).ok()?;
    *b = b.get(len..)?;
    Some(())
}

/// A stream the client opened that has not ended both ways.
#[derive(Debug, Clone, Copy)]
struct Stream {
    id: u32,
    client_ended: bool,
    server_ended: bool,
}

/// Whether a connection could leave h2 now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rest {
    No,
    /// At rest, but a stream was reset since the last park: the client may still send a
    /// frame or two for it. Safe once the connection has been idle for a while.
    AfterReset,
    Yes,
}

/// The adjustments a new connection's first frames to the client need.
#[derive(Debug)]
struct OutFilter {
    /// SETTINGS acknowledgements to drop (the answer to the replayed SETTINGS).
    acks: u32,
    /// SETTINGS frames to drop (the new connection's own, acknowledged in the replay).
    settings: u32,
    /// How much more the new connection thinks the client may send than the client
    /// thinks: taken off (or added to) its connection WINDOW_UPDATEs until even.
    debt: i64,
    /// What h2 wrote that does not end a frame yet.
    partial: Vec<u8>,
}

impl OutFilter {
    fn done(&self) -> bool {
        self.acks == 0 && self.settings == 0 && self.debt == 0
    }
}

/// One HTTP/2 connection's state on the wire (see the module).
#[derive(Debug)]
pub(crate) struct H2Idle {
    inbound: Walker,
    outbound: Walker,
    /// Bytes of the client's preface still to pass (a new connection).
    preface_left: usize,
    /// The client's settings, merged, in the order first sent.
    settings: Vec<(u16, u32)>,
    /// SETTINGS each side sent that the other has not acknowledged yet.
    client_settings_unacked: i64,
    server_settings_unacked: i64,
    /// PINGs each side sent that the other has not answered yet.
    client_pings_unanswered: i64,
    server_pings_unanswered: i64,
    goaway: bool,
    /// How much the client may still send on the connection, as it sees it.
    recv_window: i64,
    /// How much the server may still send on the connection.
    send_window: i64,
    streams: Vec<Stream>,
    /// The highest stream the client opened.
    last_stream: u32,
    /// Streams up to this one were closed before the last park.
    old_streams: u32,
    reset: bool,
    hpack: Hpack,
    filter: Option<OutFilter>,
    /// Something this module does not follow happened: the connection stays in h2.
    broken: bool,
    /// How often the connection left h2.
    parks: u32,
    /// The header table size the server last told the client (HPACK's 4,096 if never).
    server_table: u32,
    /// The connection's request count ([`crate::conn_state::ConnState::activity`]) at a
    /// park, and when it was first seen there: since then no request began.
    quiet_since: Option<(u64, std::time::Instant)>,
}

impl H2Idle {
    /// A new connection, before the client's preface.
    pub(crate) fn new() -> Self {
        Self {
            inbound: Walker::new(true),
            outbound: Walker::new(false),
            preface_left: PREFACE.len(),
            settings: Vec::new(),
            client_settings_unacked: 0,
            server_settings_unacked: 0,
            client_pings_unanswered: 0,
            server_pings_unanswered: 0,
            goaway: false,
            recv_window: INITIAL_WINDOW,
            send_window: INITIAL_WINDOW,
            streams: Vec::new(),
            last_stream: 0,
            old_streams: 0,
            reset: false,
            hpack: Hpack::new(),
            filter: None,
            broken: false,
            parks: 0,
            server_table: 4096,
            quiet_since: None,
        }
    }

    /// The highest stream the client opened (all processed when the connection is at
    /// rest): what a GOAWAY closing it idle says.
    pub(crate) fn last_stream(&self) -> u32 {
        self.last_stream
    }

    /// Bytes from the client, about to be given to h2. Frames on streams closed before the
    /// last park are turned into frames h2 ignores. Returns how many bytes at the end begin
    /// a frame header that is not complete: they are to be held back and given again with
    /// what follows, so that a header is always whole in one piece, where it can be changed.
    pub(crate) fn inbound(&mut self, piece: &mut [u8]) -> usize {
        let mut pos = 0;
        if self.preface_left > 0 {
            let n = self.preface_left.min(piece.len());
            if piece[..n] != PREFACE[PREFACE.len() - self.preface_left..][..n] {
                self.broken = true;
            }
            self.preface_left -= n;
            pos = n;
        }
        while let Some(event) = self.inbound.next(piece, &mut pos) {
            match event {
                Event::Head { head, at } => {
                    // Their HEADERS too (trailers): a client that knows its header table is
                    // 0 bytes adds nothing to it with them.
                    if head.stream != 0 && head.stream <= self.old_streams {
                        match at {
                            Some(at) => piece[at + 3] = IGNORED,
                            None => self.broken = true,
                        }
                    }
                }
                Event::Frame(head) => self.client_frame(head),
            }
        }
        let held = self.inbound.partial_head();
        self.inbound.unsee_partial_head();
        held
    }

    fn client_frame(&mut self, head: Head) {
        let payload = std::mem::take(&mut self.inbound.payload);
        match head.kind {
            DATA => {
                self.recv_window -= head.len as i64;
                if head.flags & END_STREAM != 0 {
                    self.end(head.stream, true);
                }
            }
            HEADERS => {
                if head.stream > self.last_stream {
                    self.last_stream = head.stream;
                    self.streams.push(Stream {
                        id: head.stream,
                        client_ended: false,
                        server_ended: false,
                    });
                }
                match header_fragment(head.flags, &payload) {
                    Some(fragment) => self.hpack.fragment(fragment, head.flags & END_HEADERS != 0),
                    None => self.broken = true,
                }
                if head.flags & END_STREAM != 0 {
                    self.end(head.stream, true);
                }
            }
            CONTINUATION => self.hpack.fragment(&payload, head.flags & END_HEADERS != 0),
            RST_STREAM => self.reset_stream(head.stream),
            SETTINGS if head.flags & ACK != 0 => self.server_settings_unacked -= 1,
            SETTINGS => {
                for pair in payload.chunks_exact(6) {
                    let id = u16::from_be_bytes([pair[0], pair[1]]);
                    let value = u32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]);
                    match self.settings.iter_mut().find(|(i, _)| *i == id) {
                        Some(setting) => setting.1 = value,
                        None => self.settings.push((id, value)),
                    }
                }
                self.client_settings_unacked += 1;
            }
            PING if head.flags & ACK != 0 => self.server_pings_unanswered -= 1,
            PING => self.client_pings_unanswered += 1,
            GOAWAY | PUSH_PROMISE => self.goaway = true,
            WINDOW_UPDATE if head.stream == 0 => self.send_window += increment(&payload),
            _ => {}
        }
        self.inbound.payload = payload;
        self.inbound.payload.clear();
    }

    /// Bytes the client is sent (after [`H2Idle::filter_out`], if that is under way).
    pub(crate) fn outbound(&mut self, piece: &[u8]) {
        let mut pos = 0;
        while let Some(event) = self.outbound.next(piece, &mut pos) {
            if let Event::Frame(head) = event {
                self.server_frame(head);
            }
        }
    }

    fn server_frame(&mut self, head: Head) {
        match head.kind {
            DATA => {
                self.send_window -= head.len as i64;
                if head.flags & END_STREAM != 0 {
                    self.end(head.stream, false);
                }
            }
            HEADERS if head.flags & END_STREAM != 0 => self.end(head.stream, false),
            RST_STREAM => self.reset_stream(head.stream),
            SETTINGS if head.flags & ACK != 0 => self.client_settings_unacked -= 1,
            SETTINGS => {
                self.server_settings_unacked += 1;
                for pair in self.outbound.payload.chunks_exact(6) {
                    if pair[..2] == [0, 1] {
                        self.server_table =
                            u32::from_be_bytes([pair[2], pair[3], pair[4], pair[5]]);
                    }
                }
            }
            PING if head.flags & ACK != 0 => self.client_pings_unanswered -= 1,
            PING => self.server_pings_unanswered += 1,
            GOAWAY => self.goaway = true,
            PUSH_PROMISE => self.broken = true,
            WINDOW_UPDATE if head.stream == 0 => {
                self.recv_window += increment(&self.outbound.payload);
            }
            _ => {}
        }
    }

    fn end(&mut self, id: u32, client: bool) {
        if let Some(i) = self.streams.iter().position(|s| s.id == id) {
            let stream = &mut self.streams[i];
            if client {
                stream.client_ended = true;
            } else {
                stream.server_ended = true;
            }
            if stream.client_ended && stream.server_ended {
                self.streams.swap_remove(i);
            }
        }
    }

    fn reset_stream(&mut self, id: u32) {
        if let Some(i) = self.streams.iter().position(|s| s.id == id) {
            self.streams.swap_remove(i);
            self.reset = true;
        }
    }

    /// Whether the connection could leave h2 now, as far as the frames show. (The caller
    /// also knows that h2 read everything and wrote everything: see
    /// [`crate::connection`].)
    pub(crate) fn rest(&self) -> Rest {
        // Entries in the client's table do not matter once it must empty it.
        let table_empty =
            !self.hpack.entries || (self.server_table == 0 && self.server_settings_unacked == 0);
        let settled = !self.broken
            && !self.goaway
            && self.preface_left == 0
            && self.inbound.between()
            && self.outbound.between()
            && self.filter.is_none()
            && self.streams.is_empty()
            && self.client_settings_unacked == 0
            && self.server_settings_unacked == 0
            && self.client_pings_unanswered == 0
            && self.server_pings_unanswered == 0
            && !self.hpack.in_block
            && table_empty
            && !self.hpack.unreadable
            && self.recv_window <= i64::from(CONN_WINDOW)
            && self.send_window >= INITIAL_WINDOW;
        match (settled, self.reset) {
            (false, _) => Rest::No,
            (true, true) => Rest::AfterReset,
            (true, false) => Rest::Yes,
        }
    }

    /// What is left of `keepalive` for the connection, with `activity` requests begun in
    /// all: counted from the first park since its last request (a client that only sends
    /// frames of its own, PINGs or WINDOW_UPDATEs, brings the connection back each time, and
    /// must not keep it open so).
    pub(crate) fn idle_left(
        &mut self,
        activity: u64,
        keepalive: std::time::Duration,
    ) -> std::time::Duration {
        let since = match self.quiet_since {
            Some((mark, since)) if mark == activity => since,
            _ => {
                let now = std::time::Instant::now();
                self.quiet_since = Some((activity, now));
                now
            }
        };
        keepalive.saturating_sub(since.elapsed())
    }

    /// How often the connection left h2.
    pub(crate) fn parks(&self) -> u32 {
        self.parks
    }

    /// Leaves h2: what is kept while the connection waits is freed of its buffers.
    pub(crate) fn park(&mut self) {
        self.parks += 1;
        self.inbound.payload = Vec::new();
        self.outbound.payload = Vec::new();
        self.streams = Vec::new();
        self.hpack.block = Vec::new();
        self.reset = false;
    }

    /// The bytes a new h2 connection reads first, in front of what the socket brings: the
    /// client's preface and settings as it sent them, the acknowledgement of the server's
    /// settings, and what the client granted the server on the connection. From here on,
    /// frames on the streams it used before are ignored, and the new connection's first
    /// frames to the client are adjusted ([`H2Idle::filter_out`]).
    pub(crate) fn resume(&mut self) -> Vec<u8> {
        let mut replay = PREFACE.to_vec();
        let settings: Vec<u8> = self
            .settings
            .iter()
            .flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
            .collect();
        replay.extend(frame(SETTINGS, 0, 0, &settings));
        replay.extend(frame(SETTINGS, ACK, 0, &[]));
        let granted = self.send_window - INITIAL_WINDOW;
        if granted > 0 {
            replay.extend(frame(WINDOW_UPDATE, 0, 0, &(granted as u32).to_be_bytes()));
        }
        self.old_streams = self.last_stream;
        self.filter = Some(OutFilter {
            acks: 1,
            settings: 1,
            debt: INITIAL_WINDOW - self.recv_window,
            partial: Vec::new(),
        });
        replay
    }

    /// Whether h2's output passes through [`H2Idle::filter_out`] (just after a resume).
    pub(crate) fn filtering(&self) -> bool {
        self.filter.is_some()
    }

    /// h2's output while the new connection's first frames are adjusted: appends to `out`
    /// what the client is to get of `piece` (whole frames only; the rest waits for its
    /// end), and follows it. Once nothing is left to adjust, what waits is let through and
    /// the filter ends.
    pub(crate) fn filter_out(&mut self, piece: &[u8], out: &mut Vec<u8>) {
        let Some(mut filter) = self.filter.take() else {
            out.extend_from_slice(piece);
            self.outbound(piece);
            return;
        };
        filter.partial.extend_from_slice(piece);
        let mut used = 0;
        while !filter.done() {
            let rest = &filter.partial[used..];
            if rest.len() < HEAD {
                break;
            }
            let head = Head::parse(rest[..HEAD].try_into().expect("nine bytes"));
            if rest.len() < HEAD + head.len {
                break;
            }
            let whole = &rest[..HEAD + head.len];
            used += whole.len();
            if head.kind == SETTINGS && head.flags & ACK != 0 && filter.acks > 0 {
                filter.acks -= 1;
                continue;
            }
            if head.kind == SETTINGS && head.flags & ACK == 0 && filter.settings > 0 {
                filter.settings -= 1;
                continue;
            }
            if head.kind == WINDOW_UPDATE && head.stream == 0 && filter.debt != 0 {
                let adjusted = increment(&whole[HEAD..]) + filter.debt;
                if adjusted <= 0 {
                    filter.debt = adjusted;
                    continue;
                }
                filter.debt = 0;
                let update = frame(WINDOW_UPDATE, 0, 0, &(adjusted as u32).to_be_bytes());
                out.extend_from_slice(&update);
                self.outbound(&update);
                continue;
            }
            out.extend_from_slice(whole);
            self.outbound(whole);
        }
        let rest = filter.partial.split_off(used);
        if filter.done() {
            out.extend_from_slice(&rest);
            self.outbound(&rest);
        } else {
            filter.partial = rest;
            self.filter = Some(filter);
        }
    }
}

/// A HEADERS frame's header block fragment: its payload without padding and priority.
fn header_fragment(flags: u8, payload: &[u8]) -> Option<&[u8]> {
    let mut p = payload;
    let mut pad = 0;
    if flags & PADDED != 0 {
        let (&n, rest) = p.split_first()?;
        pad = usize::from(n);
        p = rest;
    }
    if flags & PRIORITY != 0 {
        p = p.get(5..)?;
    }
    p.get(..p.len().checked_sub(pad)?)
}

fn increment(payload: &[u8]) -> i64 {
    match payload {
        [a, b, c, d] => i64::from(u32::from_be_bytes([*a, *b, *c, *d]) & 0x7fff_ffff),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
        let payload: Vec<u8> = pairs
            .iter()
            .flat_map(|(id, v)| id.to_be_bytes().into_iter().chain(v.to_be_bytes()))
            .collect();
        frame(SETTINGS, 0, 0, &payload)
    }

    fn window_update(stream: u32, inc: u32) -> Vec<u8> {
        frame(WINDOW_UPDATE, 0, stream, &inc.to_be_bytes())
    }

    /// A GET on `stream`, with `block` as its header block.
    fn get(stream: u32, block: &[u8]) -> Vec<u8> {
        frame(HEADERS, END_STREAM | END_HEADERS, stream, block)
    }

    /// `:method GET`, `:scheme http`, `:path /` indexed, `:authority x` literal without
    /// indexing.
    const PLAIN_BLOCK: &[u8] = &[0x82, 0x86, 0x84, 0x01, 0x01, b'x'];

    /// Feeds `bytes` to the inbound side in pieces of `size`, as a socket would, giving
    /// held-back bytes again; returns what h2 would have got.
    fn feed_in(h2: &mut H2Idle, bytes: &[u8], size: usize) -> Vec<u8> {
        let mut given = Vec::new();
        let mut held: Vec<u8> = Vec::new();
        for chunk in bytes.chunks(size) {
            let mut piece = std::mem::take(&mut held);
            piece.extend_from_slice(chunk);
            let keep = h2.inbound(&mut piece);
            held = piece.split_off(piece.len() - keep);
            given.extend(piece);
        }
        given.extend(held);
        given
    }

    /// A client's first exchange: preface, settings, window update, a GET; the server's
    /// settings, the answer, and the acknowledgements both ways.
    fn first_exchange(h2: &mut H2Idle, size: usize) {
        let mut client = PREFACE.to_vec();
        client.extend(settings(&[(2, 0), (4, 1 << 24)]));
        client.extend(window_update(0, 1 << 24));
        client.extend(get(1, PLAIN_BLOCK));
        assert_eq!(feed_in(h2, &client, size), client);
        let mut server = settings(&[(1, 0), (3, 200)]);
        server.extend(window_update(0, CONN_WINDOW - 65_535));
        server.extend(frame(SETTINGS, ACK, 0, &[]));
        server.extend(frame(HEADERS, END_HEADERS, 1, &[0x88]));
        server.extend(frame(DATA, END_STREAM, 1, b"hello"));
        for piece in server.chunks(size) {
            h2.outbound(piece);
        }
        assert_eq!(
            h2.rest(),
            Rest::No,
            "the server's SETTINGS is not acknowledged"
        );
        feed_in(h2, &frame(SETTINGS, ACK, 0, &[]), size);
    }

    #[test]
    fn an_exchange_in_pieces_of_any_size_comes_to_rest() {
        for size in [1, 2, 5, 8, 9, 10, 13, 64, 4096] {
            let mut h2 = H2Idle::new();
            first_exchange(&mut h2, size);
            assert_eq!(h2.rest(), Rest::Yes, "pieces of {size}");
            assert_eq!(h2.last_stream(), 1);
            assert_eq!(h2.recv_window, i64::from(CONN_WINDOW));
            assert_eq!(h2.send_window, 65_535 + (1 << 24) - 5);
        }
    }

    #[test]
    fn what_keeps_a_connection_from_resting() {
        let rested = |extra_in: &[u8], extra_out: &[u8]| {
            let mut h2 = H2Idle::new();
            first_exchange(&mut h2, 4096);
            feed_in(&mut h2, extra_in, 4096);
            h2.outbound(extra_out);
            h2.rest()
        };
        assert_eq!(rested(&[], &[]), Rest::Yes);
        // A stream under way, or half a frame.
        assert_eq!(
            rested(&frame(HEADERS, END_HEADERS, 3, PLAIN_BLOCK), &[]),
            Rest::No
        );
        assert_eq!(rested(&get(3, PLAIN_BLOCK)[..12], &[]), Rest::No);
        assert_eq!(
            rested(
                &get(3, PLAIN_BLOCK),
                &frame(HEADERS, END_HEADERS, 3, &[0x88])
            ),
            Rest::No
        );
        assert_eq!(
            rested(
                &get(3, PLAIN_BLOCK),
                &frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0x88])
            ),
            Rest::Yes
        );
        // A reset stream: later.
        assert_eq!(
            rested(
                &get(3, PLAIN_BLOCK),
                &frame(RST_STREAM, 0, 3, &[0, 0, 0, 8])
            ),
            Rest::AfterReset
        );
        // Unanswered PING or SETTINGS, either way; a GOAWAY.
        assert_eq!(rested(&frame(PING, 0, 0, &[0; 8]), &[]), Rest::No);
        assert_eq!(
            rested(&frame(PING, 0, 0, &[0; 8]), &frame(PING, ACK, 0, &[0; 8])),
            Rest::Yes
        );
        assert_eq!(rested(&[], &frame(PING, 0, 0, &[0; 8])), Rest::No);
        assert_eq!(rested(&settings(&[(4, 1000)]), &[]), Rest::No);
        assert_eq!(rested(&[], &goaway(1)), Rest::No);
        // A header the client's table keeps: at rest once the client acknowledged a table
        // of 0, which it must empty its table for before its next header block.
        let indexed = [0x82, 0x86, 0x84, 0x41, 0x01, b'x'];
        assert_eq!(
            rested(&get(3, &indexed), &frame(HEADERS, 5, 3, &[0x88])),
            Rest::Yes
        );
        assert_eq!(
            rested(
                &get(3, &indexed),
                &[frame(HEADERS, 5, 3, &[0x88]), settings(&[(1, 4096)])].concat()
            ),
            Rest::No,
            "a table of 4,096 again, not acknowledged yet"
        );
        let mut kept = H2Idle::new();
        let mut client = PREFACE.to_vec();
        client.extend(settings(&[]));
        client.extend(get(1, &indexed));
        client.extend(frame(SETTINGS, ACK, 0, &[]));
        feed_in(&mut kept, &client, 4096);
        kept.outbound(&settings(&[(3, 100)]));
        kept.outbound(&frame(SETTINGS, ACK, 0, &[]));
        kept.outbound(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x88]));
        assert_eq!(
            kept.rest(),
            Rest::No,
            "the server never asked for a table of 0"
        );
        feed_in(
            &mut kept,
            &get(3, &[0x20, 0x82, 0x86, 0x84, 0x01, 0x01, b'x']),
            4096,
        );
        kept.outbound(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0x88]));
        assert_eq!(kept.rest(), Rest::Yes, "the client emptied its table");
        // The client used more of the server's window than it gave back.
        let mut h2 = H2Idle::new();
        let mut client = PREFACE.to_vec();
        client.extend(settings(&[]));
        client.extend(frame(HEADERS, END_HEADERS, 1, PLAIN_BLOCK));
        client.extend(frame(SETTINGS, ACK, 0, &[]));
        feed_in(&mut h2, &client, 4096);
        h2.outbound(&settings(&[]));
        h2.outbound(&frame(SETTINGS, ACK, 0, &[]));
        assert_eq!(h2.rest(), Rest::No, "stream 1 is open");
        h2.outbound(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &[0x88]));
        feed_in(&mut h2, &frame(DATA, END_STREAM, 1, b"body"), 4096);
        assert_eq!(h2.rest(), Rest::Yes);
        let mut sent = H2Idle::new();
        feed_in(&mut sent, &client, 4096);
        sent.outbound(&settings(&[]));
        sent.outbound(&frame(SETTINGS, ACK, 0, &[]));
        sent.outbound(&frame(HEADERS, END_HEADERS, 1, &[0x88]));
        sent.outbound(&frame(DATA, END_STREAM, 1, b"answer"));
        feed_in(&mut sent, &frame(DATA, END_STREAM, 1, b"body"), 4096);
        assert_eq!(sent.rest(), Rest::No, "the server's window is below 65,535");
    }

    #[test]
    fn the_replay_gives_a_new_connection_the_clients_settings_and_window() {
        let mut h2 = H2Idle::new();
        first_exchange(&mut h2, 4096);
        feed_in(&mut h2, &settings(&[(4, 1 << 20)]), 4096);
        h2.outbound(&frame(SETTINGS, ACK, 0, &[]));
        h2.park();
        let replay = h2.resume();
        let mut expected = PREFACE.to_vec();
        expected.extend(settings(&[(2, 0), (4, 1 << 20)]));
        expected.extend(frame(SETTINGS, ACK, 0, &[]));
        expected.extend(window_update(0, (1 << 24) - 5));
        assert_eq!(replay, expected);
        assert!(h2.filtering());
        assert_eq!(
            h2.rest(),
            Rest::No,
            "until the new connection's first frames passed"
        );
    }

    #[test]
    fn the_new_connections_acknowledgement_is_dropped_and_its_window_update_evened() {
        let mut h2 = H2Idle::new();
        first_exchange(&mut h2, 4096);
        // The client sent 1,000 bytes of a body the old connection has not given back.
        feed_in(&mut h2, &get(3, PLAIN_BLOCK), 4096);
        h2.outbound(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0x88]));
        h2.recv_window -= 1000;
        h2.park();
        h2.resume();
        // h2's new connection: its SETTINGS, then the acknowledgement of the replayed
        // one and its WINDOW_UPDATE, in pieces.
        let mut written = settings(&[(1, 0), (3, 200)]);
        written.extend(frame(SETTINGS, ACK, 0, &[]));
        written.extend(window_update(0, CONN_WINDOW - 65_535));
        written.extend(frame(HEADERS, END_HEADERS, 5, &[0x88]));
        let mut out = Vec::new();
        for piece in written.chunks(7) {
            h2.filter_out(piece, &mut out);
        }
        assert!(!h2.filtering());
        // Its SETTINGS (acknowledged in the replay) and its acknowledgement of the
        // client's go; the update is what the client's window lacks.
        let mut expected = window_update(0, 1000);
        expected.extend(frame(HEADERS, END_HEADERS, 5, &[0x88]));
        assert_eq!(out, expected);
        assert_eq!(h2.recv_window, i64::from(CONN_WINDOW));
        // When the client's window is whole, the new connection's update is dropped.
        let mut whole = H2Idle::new();
        first_exchange(&mut whole, 4096);
        whole.park();
        whole.resume();
        let mut out = Vec::new();
        whole.filter_out(&settings(&[(1, 0), (3, 200)]), &mut out);
        whole.filter_out(&frame(SETTINGS, ACK, 0, &[]), &mut out);
        whole.filter_out(&window_update(0, CONN_WINDOW - 65_535), &mut out);
        assert!(out.is_empty());
        assert!(!whole.filtering());
    }

    #[test]
    fn frames_on_streams_closed_before_the_park_are_ignored_by_the_new_connection() {
        let mut h2 = H2Idle::new();
        first_exchange(&mut h2, 4096);
        h2.park();
        h2.resume();
        let mut late = window_update(1, 100);
        late.extend(frame(RST_STREAM, 0, 1, &[0, 0, 0, 8]));
        // Trailers, on a stream the new connection never saw.
        late.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1, &[0x82]));
        late.extend(get(3, PLAIN_BLOCK));
        late.extend(window_update(3, 100));
        for size in [1, 4, 9, 11, 4096] {
            let mut copy = H2Idle::new();
            first_exchange(&mut copy, 4096);
            copy.park();
            copy.resume();
            let given = feed_in(&mut copy, &late, size);
            assert_eq!(given.len(), late.len());
            assert_eq!(given[3], IGNORED, "pieces of {size}");
            assert_eq!(given[13 + 3], IGNORED);
            assert_eq!(given[26 + 3], IGNORED);
            assert_eq!(given[36..], late[36..], "stream 3 is new");
            assert_eq!(copy.last_stream(), 3);
        }
    }

    #[test]
    fn a_header_block_in_continuations_is_read_whole() {
        let mut h2 = H2Idle::new();
        first_exchange(&mut h2, 4096);
        let block = [0x82, 0x86, 0x84, 0x41, 0x01, b'x'];
        let mut client = frame(HEADERS, END_STREAM, 3, &block[..4]);
        client.extend(frame(CONTINUATION, END_HEADERS, 3, &block[4..]));
        feed_in(&mut h2, &client, 3);
        h2.outbound(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0x88]));
        assert!(h2.hpack.entries, "the literal is indexed");
        assert!(!h2.hpack.in_block && !h2.hpack.unreadable);
        // Padding and priority are not part of the block.
        let mut padded = H2Idle::new();
        first_exchange(&mut padded, 4096);
        let mut payload = vec![2u8, 0, 0, 0, 1, 16];
        payload.extend_from_slice(PLAIN_BLOCK);
        payload.extend_from_slice(&[0, 0]);
        feed_in(
            &mut padded,
            &frame(
                HEADERS,
                END_STREAM | END_HEADERS | PADDED | PRIORITY,
                3,
                &payload,
            ),
            4096,
        );
        padded.outbound(&frame(HEADERS, END_HEADERS | END_STREAM, 3, &[0x88]));
        assert_eq!(padded.rest(), Rest::Yes);
    }

    #[test]
    fn hpack_integers_and_strings() {
        let mut b: &[u8] = &[0x1f, 0x9a, 0x0a];
        assert_eq!(int(&mut b, 5), Some(1337));
        assert!(b.is_empty());
        let mut b: &[u8] = &[0x7f, 0xff];
        assert_eq!(int(&mut b, 7), None, "cut short");
        let mut b: &[u8] = &[0x03, b'a', b'b'];
        assert_eq!(string(&mut b), None, "shorter than it says");
        let mut hpack = Hpack::new();
        hpack.scan(&[0x40, 0x01, b'a', 0x01, b'b']);
        assert!(hpack.entries && !hpack.unreadable);
        hpack.scan(&[0x20, 0x40, 0x01, b'a', 0x01, b'b']);
        assert!(!hpack.entries, "a table of 0 keeps nothing");
        hpack.scan(&[0x3f, 0xe1, 0x1f]);
        assert!(!hpack.zero);
    }

    #[test]
    fn the_goaway_names_the_last_stream() {
        let g = goaway(7);
        assert_eq!(
            Head::parse(g[..9].try_into().unwrap()),
            Head {
                len: 8,
                kind: GOAWAY,
                flags: 0,
                stream: 0
            }
        );
        assert_eq!(&g[9..], &[0, 0, 0, 7, 0, 0, 0, 0]);
    }
}
