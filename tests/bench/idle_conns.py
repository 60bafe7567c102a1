"""Many idle HTTP/1.1 keep-alive connections from one thread, for run.py's scenario (f).

`Clients` opens connections that each send one request and read its answer, then keeps
them idle; when the server closes one it tells how (a read of 0 bytes is a FIN, ECONNRESET
is a reset) and, once `reconnect` is on, opens a new connection at once, as a client does,
recording when each reconnect connected and was answered and how any failed (refused,
reset, closed before the answer, timed out). Non-blocking sockets on epoll; everything is
on 127.0.0.1 and every wait is bounded (`timeout` per connection, deadlines per call).
"""

import collections
import errno
import re
import selectors
import socket
import time

CONNECTING, READING, IDLE = range(3)
# Linux's IP_BIND_ADDRESS_NO_PORT (Python 3.11 has no name for it): bind() takes the address
# only and connect() picks the port for the whole 4-tuple.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)


class Conn:
    __slots__ = ("sock", "state", "buf", "started", "reconnect", "got_data")

    def __init__(self, sock, reconnect):
        self.sock = sock
        self.state = CONNECTING
        self.buf = b""
        self.started = time.monotonic()
        self.reconnect = reconnect
        self.got_data = False


def answered(buf):
    """Whether `buf` holds one whole answer: (done, status) ."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False, None
    head = buf[:end]
    status = head[9:12]
    m = CONTENT_LENGTH.search(head)
    if m:
        return len(buf) >= end + 4 + int(m.group(1)), status
    if b"chunked" in head.lower():
        return buf.endswith(b"0\r\n\r\n"), status
    return True, status


class Clients:
    def __init__(self, port, path, timeout=10.0, sources=64):
        self.addr = ("127.0.0.1", port)
        # The clients come from `sources` addresses (127.0.0.2, .3, ...), as many clients
        # do: from one address, connect() searches the ephemeral ports for a free one, and
        # with 15,000 in use that search took 0.6 ms per connect, which made the client,
        # not the server, the bottleneck of a reconnect burst.
        self.sources = [f"127.0.0.{2 + i}" for i in range(sources)]
        self.next_source = 0
        self.request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
        self.timeout = timeout
        self.sel = selectors.EpollSelector()
        self.conns = {}                       # fd -> Conn
        self.pending = collections.deque()    # not yet answered, in the order started
        self.idle = 0                         # answered and open
        self.waiting = 0                      # started, not yet answered nor failed
        self.reconnect = False
        self.on_timeout = None                # called with a Conn about to time out (debugging)
        # Idle connections the server closed, by how: first-generation ones (opened by
        # fill) and reconnected ones apart.
        self.closes = {"fin": 0, "reset": 0}
        self.closes_of_reconnects = {"fin": 0, "reset": 0}
        self.data_on_idle = 0                 # bytes arrived on an idle connection (unasked)
        self.close_times = []
        self.failed = collections.Counter()   # initial connections that failed, by why
        self.reconnect_failed = collections.Counter()
        self.reconnects_started = 0
        self.connected_times = []             # reconnects whose TCP handshake completed
        self.answered_times = []              # reconnects answered with 200

    # ------------------------------------------------------------------ connections

    def start(self, reconnect):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        s.bind((self.sources[self.next_source], 0))
        self.next_source = (self.next_source + 1) % len(self.sources)
        c = Conn(s, reconnect)
        if reconnect:
            self.reconnects_started += 1
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            s.close()
            self.fail(c, err)
            return
        self.conns[s.fileno()] = c
        self.waiting += 1
        self.pending.append(c)
        self.sel.register(s, selectors.EVENT_WRITE, c)

    def fail(self, c, why):
        if isinstance(why, int):
            why = {errno.ECONNREFUSED: "refused", errno.ECONNRESET: "reset",
                   errno.ETIMEDOUT: "timeout"}.get(why, errno.errorcode.get(why, str(why)))
        (self.reconnect_failed if c.reconnect else self.failed)[why] += 1

    def drop(self, c):
        if c.state != IDLE and c.sock.fileno() >= 0:
            self.waiting -= 1
        fd = c.sock.fileno()
        if fd >= 0:
            self.conns.pop(fd, None)
            try:
                self.sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        c.sock.close()

    def on_event(self, c, now):
        if c.state == CONNECTING:
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.drop(c)
                return self.fail(c, err)
            if c.reconnect:
                self.connected_times.append(now)
            try:
                c.sock.send(self.request)
            except OSError as e:
                self.drop(c)
                return self.fail(c, e.errno)
            c.state = READING
            self.sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        try:
            data = c.sock.recv(65536)
        except ConnectionResetError:
            data = None
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return
            data = None
        if c.state == READING:
            if not data:
                self.drop(c)
                return self.fail(c, "reset" if data is None else "closed")
            c.buf += data
            done, status = answered(c.buf)
            if not done:
                return
            if status != b"200":
                self.drop(c)
                return self.fail(c, "status")
            c.state = IDLE
            c.buf = b""
            self.idle += 1
            self.waiting -= 1
            if c.reconnect:
                self.answered_times.append(now)
            return
        # IDLE: the server said something on a connection that asked nothing.
        if data:
            c.got_data = True
            self.data_on_idle += 1
            return
        self.drop(c)
        self.idle -= 1
        kind = "fin" if data == b"" else "reset"
        (self.closes_of_reconnects if c.reconnect else self.closes)[kind] += 1
        self.close_times.append(now)
        if self.reconnect:
            self.start(reconnect=True)

    def poll(self, timeout):
        now = time.monotonic()
        for key, _ in self.sel.select(timeout):
            self.on_event(key.data, now)
        # Connections not answered within `timeout` (they were started in order).
        now = time.monotonic()
        while self.pending and (self.pending[0].state == IDLE or self.pending[0].sock.fileno() < 0
                                or now - self.pending[0].started > self.timeout):
            c = self.pending.popleft()
            if c.state != IDLE and c.sock.fileno() >= 0:
                if self.on_timeout:
                    self.on_timeout(c)
                self.drop(c)
                self.fail(c, "timeout (no handshake)" if c.state == CONNECTING
                          else "timeout (no answer)" if not c.buf else "timeout (part of an answer)")

    def in_flight(self):
        return self.waiting

    # ---------------------------------------------------------------------- phases

    def fill(self, n, deadline, window=256):
        """Opens connections until `n` are answered and idle (at most `window` waiting for
        their answer at once, so the listener's backlog never overflows); gives up at
        `deadline` or when as many failed as `n`."""
        while self.idle < n and time.monotonic() < deadline and sum(self.failed.values()) < n:
            want = n - self.idle - self.in_flight()
            for _ in range(max(0, min(want, window - self.in_flight()))):
                self.start(reconnect=False)
            self.poll(0.05)
        return self.idle

    def close_all(self):
        for c in list(self.conns.values()):
            self.drop(c)
        self.pending.clear()
        self.idle = 0
        self.sel.close()


def peak_per(times, t0, width):
    """The most events in one bucket of `width` seconds, counted from t0."""
    buckets = collections.Counter(int((t - t0) / width) for t in times)
    return max(buckets.values(), default=0)
