#!/usr/bin/env python3
"""TLS: Baton against nginx with the same certificates, side by side in one run.

    python3 tests/bench/tls.py [--quick] [--json PATH] [--no-build] [--rotations N]

For an ECDSA P-256 and an RSA 2048 certificate (each a new key and leaf for localhost and
127.0.0.1 from a private CA of the same kind, made with openssl in a private temporary
directory; chain = leaf + CA; key mode 0600), Baton (its bench default: 1 worker process,
a thread per core, the `hello` plugin on GET /hello/{name}, `[listener.tls]` defaults) and
nginx (2 workers, TLS 1.2+1.3, session tickets, a shared session cache, HTTP/2, `return 200`,
no access log) serve the same certificate, and clients speak TLS 1.3 to both:

  full            new connection, full handshake, GET, close: a Go crypto/tls client built
                  here from GO_CLIENT (16 at once; no certificate verification)
  resumed         the same, each client offering the session ticket it was last given
  keepalive       wrk -t2 -c64, HTTP/1.1 requests on kept-alive TLS connections
  h2              h2load -t2 -c16 -m10, HTTP/2 by ALPN
  s_time-full     2 x `openssl s_time -new` (OpenSSL's own client, one connection at a time)
  s_time-resumed  2 x `openssl s_time -reuse`

wrk and h2load with `Connection: close` resume their sessions (nearly every connection, by
nginx's $ssl_session_reused), so neither measures full handshakes; s_time does, but spends
2-3 times the server's CPU per handshake, so it is kept as a cross-check. Each metric runs in
turns of a few seconds, the two servers alternating, and a server's figure is over all its
turns; the CPU time of the server's processes over the turn, per operation, is given too
(the clients share the two cores, so it is the figure that depends on the server alone).

Then, per certificate kind and server, certificate rotations under load: wrk -c16
keep-alive, 4 clients making full handshakes and 4 resuming, while the certificate files
are replaced (new key, new certificate, renamed into place) and the server upgraded, 20
times: Baton by `baton upgrade --wait`, nginx by SIGHUP (`nginx -s reload`) and a wait until
a new handshake gets the new certificate. Counted: failed requests (wrk's errors, failed
connections of the new-connection clients), resumptions refused, new handshakes that still
got the old certificate right after the upgrade, and whether `openssl s_client` gets the
last certificate at the end.

Installs wrk, nginx, nghttp2-client (h2load), openssl and golang-go from Debian's packages if
missing. Loopback only; every step is bounded in time; servers are stopped by their PID.
About 6.5 minutes; --quick (turns of 2 s, 5 rotations) under 2.
"""

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402
from run import RELEASE, ROOT, alive, children, free_port, parse_wrk, raise_fd_limit, version_of, wait_until  # noqa: E402

PATH = "/hello/bench"
KINDS = ("ecdsa", "rsa")


def log(msg):
    print(f"[tls {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------- certificates

def openssl(*args, cwd=None):
    subprocess.run(["openssl", *args], check=True, cwd=cwd, timeout=60,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def newkey_args(kind):
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if kind == "ecdsa" else ["-newkey", "rsa:2048"]


class Pki:
    """A private CA of one key kind in DIR (mode 0700) and the certificates it issues:
    each a new key and a new leaf for localhost and 127.0.0.1, valid 90 days, written as
    the chain (leaf, then the CA, as an intermediate would be) and the key (mode 0600)."""

    def __init__(self, root, kind):
        self.kind = kind
        self.dir = os.path.join(root, f"pki-{kind}")
        os.makedirs(self.dir, mode=0o700)
        self.ca_key = os.path.join(self.dir, "ca.key")
        self.ca = os.path.join(self.dir, "ca.pem")
        openssl("req", "-x509", *newkey_args(kind), "-nodes", "-keyout", self.ca_key, "-out", self.ca,
                "-days", "3650", "-subj", f"/CN=Baton bench CA ({kind})")
        self.ext = os.path.join(self.dir, "leaf.ext")
        usage = "digitalSignature" if kind == "ecdsa" else "digitalSignature,keyEncipherment"
        with open(self.ext, "w") as f:
            f.write(f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,{usage}\n"
                    "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n")
        self.issued = 0

    def issue(self):
        """A new key and certificate: (chain PEM, key PEM, SHA-256 of the leaf, hex)."""
        self.issued += 1
        n = self.issued
        key, csr, leaf = (os.path.join(self.dir, f"leaf{n}.{ext}") for ext in ("key", "csr", "pem"))
        openssl("req", *newkey_args(self.kind), "-nodes", "-keyout", key, "-out", csr,
                "-subj", f"/CN=localhost/O=bench {self.kind} {n}")
        openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
                "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-days", "90",
                "-extfile", self.ext, "-out", leaf)
        with open(leaf) as f:
            leaf_pem = f.read()
        with open(self.ca) as f:
            ca_pem = f.read()
        with open(key) as f:
            key_pem = f.read()
        for p in (key, csr, leaf):
            os.remove(p)
        return leaf_pem + ca_pem, key_pem, sha256_of_pem(leaf_pem)


def sha256_of_pem(pem):
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def put(path, text, mode):
    """Replaces PATH by a new file (written beside it, then renamed over it, as certbot's
    and most deployment tools' writes are atomic)."""
    tmp = path + ".new"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- clients

def client_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def tls_get(port, ctx=None, session=None, timeout=2.0):
    """One request on a new TLS 1.3 connection: (status, leaf SHA-256, session, reused) or
    None when anything failed."""
    ctx = ctx or client_context()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
                s.sendall(f"GET {PATH} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                m = re.match(rb"HTTP/1\.[01] (\d{3})", data)
                der = s.getpeercert(binary_form=True)
                return (int(m.group(1)) if m else 0, hashlib.sha256(der).hexdigest(),
                        s.session, s.session_reused)
    except (OSError, ssl.SSLError, ValueError):
        return None


# ------------------------------------------------------------------- load client

# The new-connection load: each of -c goroutines connects, shakes hands (TLS 1.3), sends one
# GET with `Connection: close`, reads the answer to its end and starts again, until -d is
# over or SIGINT/SIGTERM arrives; then it prints its counts as JSON. With -resume each
# goroutine keeps the session ticket it was last given and offers it on its next connection
# (a resumed handshake); without it every handshake is a full one. Go's crypto/tls (no
# certificate verification) costs the client under half of what `openssl s_time` does
# per full handshake (OpenSSL 3.0), so the figure says more about the server.
GO_CLIENT = r"""
package main

import (
	"bytes"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"flag"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:8443", "server address")
	path := flag.String("path", "/", "path to GET")
	conns := flag.Int("c", 8, "concurrent clients")
	dur := flag.Duration("d", 3*time.Second, "at most this long")
	resume := flag.Bool("resume", false, "offer the last session ticket on every new connection")
	flag.Parse()
	var ok, resumed, offered, missed, dial, handshake, io_, status int64
	var stop int32
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() { <-sigs; atomic.StoreInt32(&stop, 1) }()
	deadline := time.Now().Add(*dur)
	req := []byte("GET " + *path + " HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
	var mu sync.Mutex
	last := ""
	var wg sync.WaitGroup
	start := time.Now()
	for i := 0; i < *conns; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			cfg := &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13, ServerName: "localhost"}
			if *resume {
				cfg.ClientSessionCache = tls.NewLRUClientSessionCache(1)
			}
			buf := make([]byte, 4096)
			for atomic.LoadInt32(&stop) == 0 && time.Now().Before(deadline) {
				offer := false
				if *resume {
					_, offer = cfg.ClientSessionCache.Get("localhost")
				}
				c, err := net.DialTimeout("tcp", *addr, 5*time.Second)
				if err != nil {
					atomic.AddInt64(&dial, 1)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				c.SetDeadline(time.Now().Add(5 * time.Second))
				t := tls.Client(c, cfg)
				if err = t.Handshake(); err != nil {
					atomic.AddInt64(&handshake, 1)
					c.Close()
					continue
				}
				var got []byte
				if _, err = t.Write(req); err == nil {
					for {
						n, e := t.Read(buf)
						got = append(got, buf[:n]...)
						if e != nil {
							if e != io.EOF {
								err = e
							}
							break
						}
					}
				}
				st := t.ConnectionState()
				t.Close()
				if err != nil {
					atomic.AddInt64(&io_, 1)
					continue
				}
				if !bytes.HasPrefix(got, []byte("HTTP/1.1 200")) {
					atomic.AddInt64(&status, 1)
					continue
				}
				atomic.AddInt64(&ok, 1)
				if offer {
					atomic.AddInt64(&offered, 1)
					if st.DidResume {
						atomic.AddInt64(&resumed, 1)
					} else {
						atomic.AddInt64(&missed, 1)
					}
				}
				if len(st.PeerCertificates) > 0 {
					sum := sha256.Sum256(st.PeerCertificates[0].Raw)
					mu.Lock()
					last = hex.EncodeToString(sum[:])
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	json.NewEncoder(os.Stdout).Encode(map[string]interface{}{
		"ok": ok, "offered": offered, "resumed": resumed, "missed": missed,
		"dial": dial, "handshake": handshake, "io": io_, "status": status,
		"errors": dial + handshake + io_ + status, "seconds": time.Since(start).Seconds(),
		"last_sha256": last})
}
"""


def go_client():
    """Builds GO_CLIENT (standard library only, offline) into target/bench once per source
    version; installs Debian's golang-go first if there is no Go."""
    if shutil.which("go") is None:
        log("installing golang-go from Debian's packages")
        subprocess.run(["apt-get", "install", "-y", "-q", "golang-go"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    out = os.path.join(ROOT, "target", "bench")
    os.makedirs(out, exist_ok=True)
    digest = hashlib.sha256(GO_CLIENT.encode()).hexdigest()[:12]
    binary = os.path.join(out, f"tls-load-{digest}")
    if not os.path.exists(binary):
        src = os.path.join(out, f"tls-load-{digest}.go")
        with open(src, "w") as f:
            f.write(GO_CLIENT)
        env = dict(os.environ, GO111MODULE="off", GOCACHE=os.path.join(out, "gocache"))
        subprocess.run(["go", "build", "-o", binary + ".tmp", src], check=True, timeout=600, env=env)
        os.replace(binary + ".tmp", binary)
    return binary


# ---------------------------------------------------------------------- servers

def cpu_ticks(pids):
    """utime + stime of PIDS, in clock ticks."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            pass
    return total


class TlsServer:
    """A server under test with one TLS listener whose certificate files live in its own
    private directory (0700; the key 0600, the chain 0644)."""

    def __init__(self, root, kind):
        self.kind = kind
        self.name = f"{self.server}-{kind}"
        self.dir = os.path.join(root, self.name)
        os.makedirs(self.dir, mode=0o700)
        self.port = free_port()
        self.chain = os.path.join(self.dir, "chain.pem")
        self.key = os.path.join(self.dir, "key.pem")
        self.fingerprint = None
        self.log_path = os.path.join(self.dir, "server.log")

    def install(self, issued):
        chain_pem, key_pem, fingerprint = issued
        put(self.key, key_pem, 0o600)
        put(self.chain, chain_pem, 0o644)
        self.fingerprint = fingerprint

    def answers_with(self, fingerprint):
        r = tls_get(self.port, timeout=1.0)
        return r is not None and r[0] == 200 and r[1] == fingerprint

    def start(self, issued):
        self.install(issued)
        self.launch()
        if not wait_until(lambda: self.answers_with(self.fingerprint), 20, 0.05):
            raise RuntimeError(f"{self.name} did not start; {self.log_path}:\n{self.log_tail()}")
        wait_until(lambda: len(self.worker_pids()) >= self.workers, 10, 0.02)

    def log_tail(self, lines=20):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def all_pids(self):
        return [self.master(), *self.worker_pids()]


class Baton(TlsServer):
    """Baton, its bench default (1 worker process, a thread per core), the `hello` plugin;
    the TLS listener with its defaults (TLS 1.2 and 1.3, ALPN h2 and http/1.1, tickets)."""
    server = "baton"
    workers = 1

    def launch(self):
        plugins = os.path.join(self.dir, "plugins.d")
        os.makedirs(plugins, mode=0o755)
        shutil.copy(os.path.join(RELEASE, "libbaton_hello.so"), plugins)
        self.config = os.path.join(self.dir, "baton.toml")
        self.control = os.path.join(self.dir, "run", "baton.sock")
        with open(self.config, "w") as f:
            f.write(f"""[[listener]]
name = "https"
address = "127.0.0.1:{self.port}"
[listener.tls]
[[listener.tls.certificate]]
chain = "{self.chain}"
key = "{self.key}"

[worker]
path = "{RELEASE}/baton-worker"
processes = 1
threads = 0
drain_timeout = "10s"

[plugins]
dir = "{plugins}"

[control]
socket = "{self.control}"
""")
        self.out = open(self.log_path, "w")
        self.proc = subprocess.Popen([os.path.join(RELEASE, "baton"), "run", "-c", self.config],
                                     stdout=self.out, stderr=subprocess.STDOUT,
                                     env={**os.environ, "BATON_LOG": "warn"})

    def master(self):
        return self.proc.pid

    def worker_pids(self):
        return children(self.proc.pid)

    def upgrade(self, timeout=30):
        """`baton upgrade --wait`: (ok, what it printed)."""
        r = subprocess.run([os.path.join(RELEASE, "baton"), "upgrade", "--wait", "-c", self.config],
                           capture_output=True, text=True, timeout=timeout)
        return r.returncode == 0, (r.stdout + r.stderr).strip()

    def status(self):
        r = subprocess.run([os.path.join(RELEASE, "baton"), "status", "--json", "-c", self.config],
                           capture_output=True, text=True, timeout=10)
        try:
            return json.loads(r.stdout)
        except ValueError:
            return None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


class Nginx(TlsServer):
    """nginx as its users set it up for HTTPS: 2 workers (one per core), TLS 1.2 and 1.3,
    session tickets and a shared session cache, HTTP/2 on, `return 200`, no access log."""
    server = "nginx"
    workers = 2

    def launch(self):
        for d in ("logs", "tmp"):
            os.makedirs(os.path.join(self.dir, d))
        self.conf = os.path.join(self.dir, "nginx.conf")
        self.pidfile = os.path.join(self.dir, "nginx.pid")
        budget = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        with open(self.conf, "w") as f:
            f.write(f"""worker_processes 2;
worker_rlimit_nofile {budget};
pid {self.pidfile};
error_log {self.log_path} warn;
events {{ worker_connections {min(20000, budget // 2)}; }}
http {{
    access_log off;
    client_body_temp_path {self.dir}/tmp;
    proxy_temp_path {self.dir}/tmp;
    fastcgi_temp_path {self.dir}/tmp;
    uwsgi_temp_path {self.dir}/tmp;
    scgi_temp_path {self.dir}/tmp;
    keepalive_requests 1000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets on;
    server {{
        listen 127.0.0.1:{self.port} ssl http2 backlog=4096;
        ssl_certificate {self.chain};
        ssl_certificate_key {self.key};
        location / {{
            default_type text/plain;
            return 200 "hello, bench! (generation 1, pid $pid)\\n";
        }}
    }}
}}
""")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        subprocess.run([nginx, "-p", self.dir, "-c", self.conf], check=True, timeout=30)
        wait_until(lambda: self.read_pid() is not None, 10)
        self.pid = self.read_pid()

    def read_pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def master(self):
        return self.pid

    def worker_pids(self):
        out = []
        for p in children(self.pid):
            try:
                with open(f"/proc/{p}/cmdline", "rb") as f:
                    if b"worker process" in f.read():
                        out.append(p)
            except OSError:
                pass
        return out

    def upgrade(self, timeout=30):
        """A reload (SIGHUP, what `nginx -s reload` sends), then waits until a new handshake
        gets the certificate on disk (the new workers answer): (ok, note)."""
        os.kill(self.pid, signal.SIGHUP)
        ok = wait_until(lambda: self.answers_with(self.fingerprint), timeout, 0.005)
        return ok, "" if ok else "the new certificate is not served"

    def stop(self):
        if self.pid and alive(self.pid):
            os.kill(self.pid, signal.SIGQUIT)
            if not wait_until(lambda: not alive(self.pid), 15):
                os.kill(self.pid, signal.SIGKILL)


# --------------------------------------------------------------------- measuring

def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def url(server):
    return f"https://127.0.0.1:{server.port}{PATH}"


def run_go(go, server, seconds, conns, resume):
    cmd = [go, "-addr", f"127.0.0.1:{server.port}", "-path", PATH, "-c", str(conns), "-d", f"{seconds}s"]
    if resume:
        cmd.append("-resume")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    d = json.loads(out)
    return {"ops": d["ok"], "seconds": d["seconds"], "errors": d["errors"],
            "resumed": d["resumed"], "missed": d["missed"]}


def run_wrk(server, seconds):
    out = subprocess.run(["wrk", "-t2", "-c64", f"-d{seconds}s", "--timeout=5s", url(server)],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    r = parse_wrk(out)
    m = re.search(r"requests in ([\d.]+)(ms|s|m)", out)
    took = float(m.group(1)) * {"ms": 0.001, "s": 1.0, "m": 60.0}[m.group(2)] if m else seconds
    return {"ops": r["requests"], "seconds": took, "errors": r["errors"]}


def run_h2load(server, seconds):
    """HTTP/2 (ALPN h2) keep-alive: 16 connections, 10 streams each."""
    out = subprocess.run(["h2load", "-t2", "-c16", "-m10", "-D", str(seconds), url(server)],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    t = re.search(r"finished in ([\d.]+)(ms|s)", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if not m or not t or not proto or proto.group(1) != "h2":
        raise RuntimeError(f"h2load: unexpected output:\n{out}")
    took = float(t.group(1)) * (0.001 if t.group(2) == "ms" else 1.0)
    return {"ops": int(m.group(4)), "seconds": took,
            "errors": int(m.group(5)) + int(m.group(6)) + int(m.group(7))}


def run_s_time(server, seconds, reuse, procs=2):
    """`openssl s_time` as PROCS clients at once, each one connection after the other (GET
    over HTTP/1.0, read to the end); -new: full handshakes, -reuse: the first session over
    and over. Counted from its per-connection marks ('r' resumed, '*' full), timed here
    (its own clock counts whole seconds)."""
    cmd = ["openssl", "s_time", "-connect", f"127.0.0.1:{server.port}", "-reuse" if reuse else "-new",
           "-tls1_3", "-www", PATH, "-time", str(seconds), "-no-CAfile", "-no-CApath", "-no-CAstore"]
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(procs)]
    outs = [p.communicate(timeout=seconds + 60) for p in procs]
    took = time.monotonic() - t0
    ops = resumed = errors = 0
    for (out, err), p in zip(outs, procs):
        # One mark per timed connection, on a line of their own.
        marks = "".join(re.findall(r"^([r*3t]+)$", out, re.M))
        ops += len(marks)
        resumed += marks.count("r")
        errors += p.returncode != 0 or "ERROR" in out
    return {"ops": ops, "seconds": took, "errors": errors, "resumed": resumed,
            "missed": ops - resumed if reuse else 0}


# metric: (what it measures, how)
METRICS = {
    "full": ("full handshakes/s", "Go crypto/tls client, 16 at once, new connection + full TLS 1.3 handshake + GET + close"),
    "resumed": ("resumed handshakes/s", "the same with each client offering its last session ticket"),
    "keepalive": ("keep-alive req/s", "wrk -t2 -c64, HTTP/1.1 over TLS 1.3"),
    "h2": ("HTTP/2 req/s", "h2load -t2 -c16 -m10 (ALPN h2)"),
    "s_time-full": ("full handshakes/s", "2 x openssl s_time -new (OpenSSL 3.0 client, one connection at a time)"),
    "s_time-resumed": ("resumed handshakes/s", "2 x openssl s_time -reuse"),
}


def one_turn(metric, server, seconds, go):
    pids = server.all_pids()
    cpu0, client0 = cpu_ticks(pids), children_cpu()
    if metric == "full":
        r = run_go(go, server, seconds, 16, False)
    elif metric == "resumed":
        r = run_go(go, server, seconds, 16, True)
    elif metric == "keepalive":
        r = run_wrk(server, seconds)
    elif metric == "h2":
        r = run_h2load(server, seconds)
    elif metric == "s_time-full":
        r = run_s_time(server, seconds, False)
    else:
        r = run_s_time(server, seconds, True)
    tick = os.sysconf("SC_CLK_TCK")
    r["server_cpu"] = (cpu_ticks(pids) - cpu0) / tick
    r["client_cpu"] = children_cpu() - client0
    return r


def aggregate(turns):
    ops = sum(t["ops"] for t in turns)
    seconds = sum(t["seconds"] for t in turns)
    out = {"ops": ops, "rate": ops / seconds if seconds else 0.0,
           "errors": sum(t["errors"] for t in turns),
           "server_us": 1e6 * sum(t["server_cpu"] for t in turns) / ops if ops else None,
           "client_us": 1e6 * sum(t["client_cpu"] for t in turns) / ops if ops else None,
           "turns": [round(t["ops"] / t["seconds"]) if t["seconds"] else 0 for t in turns]}
    if any("resumed" in t for t in turns):
        out["resumed"] = sum(t.get("resumed", 0) for t in turns)
    return out


def measure(pair, metrics, turns, seconds, go):
    """Each metric in turns of SECONDS, the two servers alternating (the one that goes first
    changes every turn), so that the machine's slow spells fall on both alike."""
    out = {}
    for metric, n in metrics:
        slices = {s.name: [] for s in pair}
        for t in range(n):
            for s in (pair if t % 2 == 0 else pair[::-1]):
                slices[s.name].append(one_turn(metric, s, seconds, go))
        out[metric] = {s.server: aggregate(slices[s.name]) for s in pair}
        b, n_ = out[metric]["baton"], out[metric]["nginx"]
        log(f"  {metric:15} baton {b['rate']:9.0f}/s ({b['server_us'] or 0:5.0f} us CPU)   "
            f"nginx {n_['rate']:9.0f}/s ({n_['server_us'] or 0:5.0f} us CPU)   x{b['rate'] / max(n_['rate'], 1):.2f}")
    return out


# -------------------------------------------------------------------- rotations

def served_fingerprint(port):
    """The SHA-256 of the leaf certificate `openssl s_client` gets on a new connection."""
    p = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                        "-tls1_3"], input="", capture_output=True, text=True, timeout=15)
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", p.stdout, re.S)
    return sha256_of_pem(m.group(0)) if m else None


def rotate(server, certificates, gap, go):
    """Under load (wrk keep-alive, new connections with full handshakes, new connections
    resuming), replaces the certificate files and upgrades once per certificate."""
    bound = 60 + 15 * len(certificates)
    loads = {
        "keepalive": subprocess.Popen(["wrk", "-t1", "-c16", f"-d{bound}s", "--timeout=5s", url(server)],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
        "full": subprocess.Popen([go, "-addr", f"127.0.0.1:{server.port}", "-path", PATH, "-c", "4",
                                  "-d", f"{bound}s"], stdout=subprocess.PIPE, text=True),
        "resumed": subprocess.Popen([go, "-addr", f"127.0.0.1:{server.port}", "-path", PATH, "-c", "4",
                                     "-d", f"{bound}s", "-resume"], stdout=subprocess.PIPE, text=True),
    }
    upgrades = []
    try:
        time.sleep(1.0)
        for cert in certificates:
            old = server.fingerprint
            server.install(cert)
            t0 = time.monotonic()
            ok, note = server.upgrade()
            took = time.monotonic() - t0
            # Right after the command returned: which certificate do new handshakes get?
            probes = [tls_get(server.port) for _ in range(3)]
            stale = sum(1 for r in probes if r and r[1] == old)
            failed = sum(1 for r in probes if r is None or r[0] != 200)
            t1 = time.monotonic()
            served = wait_until(lambda: server.answers_with(cert[2]), 10, 0.01)
            upgrades.append({"ok": ok, "note": note, "seconds": round(took, 4), "stale_after": stale,
                             "probe_failed": failed, "served": served,
                             "served_after_s": round(time.monotonic() - t1, 4)})
            if not ok or not served:
                log(f"  {server.name}: upgrade {len(upgrades)}: ok={ok} served={served} {note}")
            time.sleep(gap)
        time.sleep(1.0)
    finally:
        for p in loads.values():
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        outs = {k: p.communicate(timeout=60)[0] for k, p in loads.items()}
    ka = parse_wrk(outs["keepalive"])
    full, res = json.loads(outs["full"]), json.loads(outs["resumed"])
    final = served_fingerprint(server.port)
    result = {
        "upgrades": len(upgrades),
        "upgrades_failed": sum(1 for u in upgrades if not u["ok"]),
        "upgrade_s_median": statistics.median(u["seconds"] for u in upgrades),
        "upgrade_s_max": max(u["seconds"] for u in upgrades),
        "stale_after_upgrade": sum(u["stale_after"] for u in upgrades),
        "keepalive": {k: ka[k] for k in ("requests", "non2xx", "connect", "read", "write", "timeout", "errors")},
        "full": {k: full[k] for k in ("ok", "dial", "handshake", "io", "status", "errors")},
        "resumed": {k: res[k] for k in ("ok", "offered", "resumed", "missed", "errors")},
        "final_fingerprint_ok": final == server.fingerprint,
        "final_fingerprint": final,
        "per_upgrade": upgrades,
    }
    result["failed_requests"] = ka["errors"] + full["errors"] + res["errors"] + sum(u["probe_failed"] for u in upgrades)
    if isinstance(server, Baton):
        st = server.status() or {}
        try:
            result["status_fingerprint_ok"] = st["listeners"][0]["certificates"][0]["sha256"] == server.fingerprint
        except (KeyError, IndexError, TypeError):
            result["status_fingerprint_ok"] = False
    return result


# ------------------------------------------------------------------------ report

def report(results):
    lines = []
    r = results
    lines.append(f"TLS 1.3 on 127.0.0.1: Baton ({r['settings']['baton']}) against nginx ({r['settings']['nginx']}),")
    lines.append("the same certificate for both (chain: leaf + CA); server CPU = its processes' user+system time per operation")
    lines.append(f"{'cert':6} {'metric':15} {'baton/s':>9} {'nginx/s':>9} {'x nginx':>7} {'baton us':>9} {'nginx us':>9} "
                 f"{'client us b/n':>14} {'errors b/n':>10}")
    for kind in KINDS:
        for metric, per in r["results"].get(kind, {}).items():
            b, n = per["baton"], per["nginx"]
            client = f"{b['client_us'] or 0:.0f}/{n['client_us'] or 0:.0f}"
            errors = f"{b['errors']}/{n['errors']}"
            lines.append(f"{kind:6} {metric:15} {b['rate']:9.0f} {n['rate']:9.0f} {b['rate'] / max(n['rate'], 1):7.2f} "
                         f"{b['server_us'] or 0:9.0f} {n['server_us'] or 0:9.0f} {client:>14} {errors:>10}")
    lines.append("")
    lines.append("certificate rotations under load (each: new key and certificate files, then the upgrade; "
                 "load: wrk -c16 keep-alive, 4 full-handshake and 4 resuming clients)")
    lines.append(f"{'cert':6} {'server':6} {'upg':>4} {'upg fail':>8} {'upg med s':>9} {'upg max s':>9} "
                 f"{'ka reqs':>8} {'ka err':>6} {'new ok':>7} {'new err':>7} {'resumed':>8} {'missed':>6} "
                 f"{'stale':>5} {'failed':>6} {'last cert':>9}")
    for kind in KINDS:
        for name, x in r["rotations"].get(kind, {}).items():
            lines.append(f"{kind:6} {name:6} {x['upgrades']:4} {x['upgrades_failed']:8} {x['upgrade_s_median']:9.3f} "
                         f"{x['upgrade_s_max']:9.3f} {x['keepalive']['requests']:8} {x['keepalive']['errors']:6} "
                         f"{x['full']['ok'] + x['resumed']['ok']:7} {x['full']['errors'] + x['resumed']['errors']:7} "
                         f"{x['resumed']['resumed']:8} {x['resumed']['missed']:6} {x['stale_after_upgrade']:5} "
                         f"{x['failed_requests']:6} {'ok' if x['final_fingerprint_ok'] else 'WRONG':>9}")
    return "\n".join(lines)


# -------------------------------------------------------------------------- main

def ensure_tools():
    run.ensure_tools((("wrk", "wrk"), ("nginx", "nginx"), ("h2load", "nghttp2-client"),
                      ("openssl", "openssl")))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short turns, 5 rotations (under 3 minutes)")
    parser.add_argument("--json", default=None, help="where to write the results (default: target/bench/tls.json)")
    parser.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    parser.add_argument("--rotations", type=int, default=None, help="upgrades per server and certificate kind (default 20; 5 with --quick)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="certificate kinds: ecdsa,rsa")
    args = parser.parse_args()
    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.monotonic()
    # (turns, seconds) for the main metrics and for the cross-checks (s_time, HTTP/2).
    turns, seconds, xturns = (2, 2, 1) if args.quick else (5, 3, 3)
    rotations = args.rotations if args.rotations is not None else (5 if args.quick else 20)
    metrics = [("full", turns), ("resumed", turns), ("keepalive", turns), ("h2", xturns),
               ("s_time-full", xturns), ("s_time-resumed", xturns)]
    kinds = [k for k in args.kinds.split(",") if k]
    ensure_tools()
    raise_fd_limit()
    if not args.no_build:
        log("building Baton in release mode")
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True, timeout=1800)
    go = go_client()
    load_before = os.getloadavg()
    results = {
        "started": started, "quick": args.quick, "turns": turns, "seconds": seconds, "xturns": xturns,
        "loadavg_before": load_before,
        "versions": {"nginx": version_of(["nginx", "-v"]), "openssl": version_of(["openssl", "version"]),
                     "wrk": version_of(["wrk", "-v"]), "h2load": version_of(["h2load", "--version"]),
                     "go": version_of(["go", "version"]),
                     "baton": version_of([os.path.join(RELEASE, "baton"), "--version"])},
        "git": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip(),
        "settings": {"baton": "1 worker process, a thread per core, the hello plugin, [listener.tls] defaults",
                     "nginx": "2 workers, ssl_session_tickets on, ssl_session_cache shared:SSL:10m, http2, return 200"},
        "metrics": {k: METRICS[k] for k, _ in metrics},
        "results": {}, "rotations": {},
    }
    root = tempfile.mkdtemp(prefix="baton-tls-bench-")  # 0700, ours: the keys' parents
    servers = []
    try:
        for i, kind in enumerate(kinds):
            log(f"{kind}: certificates, servers")
            pki = Pki(root, kind)
            first = pki.issue()
            pair = [Baton(root, kind), Nginx(root, kind)]
            for s in pair:
                servers.append(s)
                s.start(first)
            for s in pair:  # warm-up, not counted
                run_go(go, s, 1, 16, False)
            log(f"{kind}: measuring ({turns} turns of {seconds} s per server and metric, alternating)")
            results["results"][kind] = measure(pair, metrics, turns, seconds, go)
            certs = [pki.issue() for _ in range(rotations)]
            results["rotations"][kind] = {}
            for s in (pair if i % 2 == 0 else pair[::-1]):
                log(f"{kind}: {rotations} certificate rotations of {s.server} under load")
                results["rotations"][kind][s.server] = rotate(s, certs, 0.5, go)
            for s in pair:
                s.stop()
    finally:
        for s in servers:
            try:
                s.stop()
            except Exception as e:  # noqa: BLE001 - the others are still stopped
                log(f"stopping {s.name}: {e}")
        shutil.rmtree(root, ignore_errors=True)
    results["took_s"] = round(time.monotonic() - t0)
    text = report(results)
    print(text)
    print(f"\n(load average before: {load_before[0]:.2f}; took {results['took_s']} s)")
    path = args.json or os.path.join(ROOT, "target", "bench", "tls.json")
    run.write_results(results, path)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
