//! Where a WebSocket client's frames begin and end, seen in the bytes on their way to
//! tungstenite ([`FrameEdges`]), so that a connection's task knows when tungstenite holds
//! nothing of the client's: no part of a frame and no part of a fragmented message. Only
//! then may an idle connection leave tungstenite (and its buffers) to wait in the worker's
//! idle set, and get a fresh tungstenite when it comes back ([`crate::websocket`]).
//!
//! It reads frame headers only (RFC 6455 §5.2: the FIN bit, the opcode, the payload
//! length and whether a mask follows) and never changes a byte; tungstenite does the
//! protocol, and rejects what is malformed.

use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest frame header: 2 bytes, a 64-bit length, a 4-byte mask.
const MAX_HEADER: usize = 14;

/// A client's byte stream, with where its frames end.
#[derive(Debug)]
pub(crate) struct FrameEdges<S> {
    io: S,
    /// The header under way (its first `have` bytes).
    head: [u8; MAX_HEADER],
    have: usize,
    /// Payload bytes of the current frame still to come.
    left: u64,
    /// A data frame without FIN began a message that has not ended yet.
    fragmented: bool,
    /// The last read found nothing to read. tungstenite reads only once the frames it
    /// holds are used up: after a read that found nothing, it holds at most the beginning
    /// of a frame (whole frames read along with others are parsed before it reads again).
    starved: bool,
}

impl<S> FrameEdges<S> {
    pub(crate) fn new(io: S) -> Self {
        Self {
            io,
            head: [0; MAX_HEADER],
            have: 0,
            left: 0,
            fragmented: false,
            starved: false,
        }
    }

    pub(crate) fn into_inner(self) -> S {
        self.io
    }

    /// The reader above holds nothing of the client's: its last read found nothing (so
    /// it had parsed every whole frame it was given), every byte read so far belongs to a
    /// whole frame, and no fragmented message is under way.
    pub(crate) fn at_rest(&self) -> bool {
        self.starved && self.have == 0 && self.left == 0 && !self.fragmented
    }

    fn saw(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.left > 0 {
                let n = bytes
                    .len()
                    .min(usize::try_from(self.left).unwrap_or(usize::MAX));
                self.left -= n as u64;
                bytes = &bytes[n..];
                continue;
            }
            let need = header_len(&self.head[..self.have]);
            let n = (need - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == header_len(&self.head[..self.have]) {
                self.header_done();
            }
        }
    }

    fn header_done(&mut self) {
        let head = &self.head[..self.have];
        let (fin, opcode) = (head[0] & 0x80 != 0, head[0] & 0x0f);
        self.left = match head[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([head[2], head[3]])),
            127 => u64::from_be_bytes(head[2..10].try_into().expect("8 bytes")),
            n => u64::from(n),
        };
        // Control frames (opcodes 8 and up) may come between a message's fragments.
        if opcode < 8 {
            self.fragmented = !fin;
        }
        self.have = 0;
    }
}

/// How long a header is, from what of it arrived (2 until its second byte is known).
fn header_len(partial: &[u8]) -> usize {
    let Some(&second) = partial.get(1) else {
        return 2;
    };
    let length = match second & 0x7f {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if second & 0x80 != 0 { 4 } else { 0 };
    2 + length + mask
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameEdges<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.starved = polled.is_pending();
        let filled = &buf.filled()[before..];
        if !filled.is_empty() {
            self.saw(filled);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameEdges<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame: `fin`, `opcode`, `len` payload bytes.
    fn frame(fin: bool, opcode: u8, len: usize) -> Vec<u8> {
        let mut f = vec![u8::from(fin) << 7 | opcode];
        match len {
            0..=125 => f.push(0x80 | len as u8),
            126..=0xffff => {
                f.push(0x80 | 126);
                f.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                f.push(0x80 | 127);
                f.extend_from_slice(&(len as u64).to_be_bytes());
            }
        }
        f.extend_from_slice(&[1, 2, 3, 4]);
        f.extend(std::iter::repeat_n(b'x', len));
        f
    }

    /// Edges whose reads found nothing after each piece: only frames decide.
    fn starved() -> FrameEdges<()> {
        let mut edges = FrameEdges::new(());
        edges.starved = true;
        edges
    }

    /// Feeds `bytes` in pieces of `step`, and says after each piece whether it was at rest.
    fn rests(bytes: &[u8], step: usize) -> Vec<bool> {
        let mut edges = starved();
        bytes
            .chunks(step)
            .map(|piece| {
                edges.saw(piece);
                edges.at_rest()
            })
            .collect()
    }

    #[test]
    fn at_rest_exactly_where_frames_end_whatever_the_pieces() {
        for len in [0, 1, 125, 126, 300, 0xffff, 70_000] {
            let f = frame(true, 2, len);
            for step in [1, 2, 3, 7, 13, 1000, f.len()] {
                let seen = rests(&f, step);
                let last = seen.len() - 1;
                assert!(seen[last], "len {len} step {step}: a whole frame");
                assert!(
                    seen[..last].iter().all(|r| !r),
                    "len {len} step {step}: rest before the frame ended"
                );
            }
        }
    }

    #[test]
    fn two_frames_in_one_read_and_one_cut_in_its_header() {
        let mut bytes = frame(true, 1, 5);
        bytes.extend(frame(true, 1, 200));
        let mut edges = starved();
        edges.saw(&bytes);
        assert!(edges.at_rest());
        let third = frame(true, 1, 300);
        edges.saw(&third[..3]);
        assert!(!edges.at_rest(), "a header cut after its length byte");
        edges.saw(&third[3..]);
        assert!(edges.at_rest());
    }

    #[test]
    fn a_fragmented_message_is_under_way_until_its_final_fragment_even_across_pings() {
        let mut edges = starved();
        edges.saw(&frame(false, 1, 10));
        assert!(!edges.at_rest(), "first fragment");
        edges.saw(&frame(true, 9, 4));
        assert!(!edges.at_rest(), "a ping between fragments ends nothing");
        edges.saw(&frame(false, 0, 10));
        assert!(!edges.at_rest(), "a middle fragment");
        edges.saw(&frame(true, 0, 10));
        assert!(edges.at_rest(), "the final fragment");
    }

    #[tokio::test]
    async fn a_frame_tungstenite_read_along_with_another_is_never_taken_for_rest() {
        use futures_util::StreamExt;
        use tokio::io::AsyncWriteExt;
        use tokio_tungstenite::WebSocketStream;
        use tokio_tungstenite::tungstenite::protocol::Role;
        let (mut client, server) = tokio::io::duplex(4096);
        // Two whole messages in one write: tungstenite reads both at once.
        let mut two = frame(true, 1, 3);
        two.extend(frame(true, 1, 4));
        client.write_all(&two).await.unwrap();
        let mut ws =
            WebSocketStream::from_raw_socket(FrameEdges::new(server), Role::Server, None).await;
        assert!(ws.next().await.unwrap().is_ok());
        assert!(
            !ws.get_ref().at_rest(),
            "the second message waits in tungstenite's buffer"
        );
        assert!(ws.next().await.unwrap().is_ok());
        // Only once a read found nothing is its buffer known to be empty.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(ws.poll_next_unpin(&mut cx).is_pending());
        assert!(ws.get_ref().at_rest());
        // A frame cut short is not rest either.
        client.write_all(&frame(true, 1, 10)[..5]).await.unwrap();
        assert!(ws.poll_next_unpin(&mut cx).is_pending());
        assert!(!ws.get_ref().at_rest());
    }

    #[tokio::test]
    async fn bytes_pass_through_unchanged() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, b) = tokio::io::duplex(1024);
        let mut edges = FrameEdges::new(b);
        let f = frame(true, 2, 100);
        a.write_all(&f).await.unwrap();
        let mut got = vec![0; f.len()];
        edges.read_exact(&mut got).await.unwrap();
        assert_eq!(got, f);
        edges.write_all(b"back").await.unwrap();
        let mut back = [0; 4];
        a.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }
}
