#!/usr/bin/env python3
"""Baton against nginx, HAProxy and the seeds' Go stack (net/http + cloudflare/tableflip),
and a bare hyper server (the ceiling), side by side.

One run installs what it needs (wrk, nginx, haproxy, golang-go and tableflip from Debian's
packages; the Go server is built offline from tests/bench/http_tableflip.go), builds Baton
in release mode, then runs every scenario for every server, alternating them, and prints
one table plus a JSON file. Everything binds to 127.0.0.1 and every step is bounded in
time. `--quick` shortens (a) to (c) (about 7 minutes in all instead of about 17;
the variants of (a) add 60 s each).

    python3 tests/bench/run.py [--quick] [--json PATH] [--only a,b,c,d,e,f] [--conns 1000,5000,15000]

Scenarios:
  a  steady throughput and latency: wrk -t2 -c64, keep-alive and Connection: close, and
     keep-alive under wrk -t1 (which leaves the server more CPU) (every server up at
     once, measured in turns of 2 s, 10 turns each in a full run and 2 in a quick one; a
     server's figure is over all its turns)
  b  an upgrade every 0.5 s under wrk -t1 -c32 (keep-alive / close): failed requests,
     socket errors, p99 and max latency
  c  upgrade latency over N upgrades, idle and under load: signal -> a new worker
     answers a fresh connection, and signal -> every old worker is gone. Then the
     supervisor upgrading itself in place, N' times idle and under load: Baton's
     re-exec (the baton binary on disk alternates between two builds; request ->
     the new image answers `status`, with the same pid and the serving generation
     untouched) next to nginx's binary upgrade (USR2 -> a worker of the new master
     answers; WINCH and QUIT to the old master, whose pid the new one does not keep)
  d  RSS and PSS of every process, idle and holding 1,000 connections (each kind of
     connection in a fresh server process)
  e  10,000 keep-alive connections (wrk -c10000) carried across 5 upgrades
  f  idle keep-alive connections (HTTP/1.1, one request each) held at 1,000, 5,000 and
     15,000 (--conns): the workers' RSS and PSS per connection; then one upgrade with
     15,000 held: how they were closed (FIN or reset, as the client sees it), when the
     old workers were gone, and the clients reconnecting at once (peak per 100 ms,
     failures). Baton, nginx and go-tableflip; bare hyper for memory only. Then idle
     WebSockets (one message echoed each) held by Baton at the same levels: its memory
Each server is sized for the connections a scenario holds, as its users would size it
(SCENARIO_CONNS: nginx's worker_connections, HAProxy's maxconn, Baton's max_connections).
Variants, measured in (a) only, next to the server they vary: baton-metrics ([metrics]
on, scraped every second), baton-log-combined / baton-log-json (the access log to a
file), nginx-log (nginx's access_log to a file, combined format).
"""

import argparse
import base64
import http.client
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import idle_conns

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RELEASE = os.path.join(ROOT, "target", "release")
# Baton's defaults: one worker process with a thread per core (work stealing keeps both
# cores busy). BATON_BENCH_PROCESSES/THREADS change it. Two single-threaded processes
# share the listener unevenly under a burst of keep-alive connections (64/0 and 60/4 were
# seen: whichever process wakes first accepts them all), and both wake for every
# connection, which costs system time under connection-per-request load.
BATON_PROCESSES = int(os.environ.get("BATON_BENCH_PROCESSES", "1"))
BATON_THREADS = int(os.environ.get("BATON_BENCH_THREADS", "0"))


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- set-up

def ensure_tools(tools=(("wrk", "wrk"), ("nginx", "nginx"), ("haproxy", "haproxy"))):
    """Installs the Debian package of each (tool, package) whose tool is missing."""
    missing = [pkg for tool, pkg in tools
               if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")]
    if not missing:
        return
    log(f"installing {' '.join(missing)} from Debian's packages")
    # Keep the packages' maintainer scripts from starting the daemons (port 80 and all).
    policy = "/usr/sbin/policy-rc.d"
    created = not os.path.exists(policy)
    if created:
        with open(policy, "w") as f:
            f.write("#!/bin/sh\nexit 101\n")
        os.chmod(policy, 0o755)
    try:
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, timeout=600, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    finally:
        if created:
            os.remove(policy)


def build():
    log("building Baton in release mode")
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "baton-tests",
                    "--bin", "baton-bare-hyper"], cwd=ROOT, check=True)


def raise_fd_limit():
    """Raises the fd limit (inherited by every server and wrk) as far as allowed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 200_000
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, PermissionError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def fd_budget():
    """The fd limit every process runs with (on some machines the hard limit is low)."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def version_of(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout + out.stderr).strip().splitlines()[0]
    except Exception as e:  # noqa: BLE001 - a missing version is reported, not fatal
        return f"unknown ({e})"


# ---------------------------------------------------------------------- processes

def children(pid):
    out = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    except OSError:
        pass
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return False


def memory(pid):
    """(RSS, PSS) in KiB from smaps_rollup."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def wait_until(cond, timeout, step=0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def get(port, path, timeout=2.0):
    """One request on a fresh connection: (status, headers, body) or None."""
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        conn.request("GET", path, headers={"Connection": "close"})
        r = conn.getresponse()
        body = r.read()
        conn.close()
        return r.status, dict((k.lower(), v) for k, v in r.getheaders()), body
    except (OSError, http.client.HTTPException):
        return None


# ------------------------------------------------------------------------- servers

# The most connections each scenario holds at once. Every server is sized for it the way its
# own users size it for that load: nginx's worker_connections, HAProxy's maxconn, Baton's
# http.max_connections (the Go server has no such knob). docs/BENCHMARKS.md says why.
SCENARIO_CONNS = {"a": 64, "b": 32, "c": 32, "c_self": 32, "d": 1000, "e": 10000, "f": 15000}


class Server:
    """A server under test. `upgrades` names how it is upgraded (None: it is not).
    `conns`: the most connections the scenario holds at once (the server is sized for it)."""
    name = "?"
    path = "/"
    upgrade_kind = None
    workers = 1

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix=f"bench-{self.name}-")
        self.port = free_port()
        self.proc = None
        self.conns = 64

    def ready(self):
        r = get(self.port, self.path, timeout=0.5)
        return r is not None and r[0] == 200

    def start(self):
        self.launch()
        if not wait_until(self.ready, 20, 0.02):
            raise RuntimeError(f"{self.name} did not start")
        # Every worker up before anything is measured (the first to answer is not all).
        wait_until(lambda: len(self.worker_pids()) >= self.workers, 10, 0.02)

    def upgrade_start(self):
        """Starts an upgrade without waiting for it (scenario f)."""
        self.upgrade()

    def upgrade_finish(self):
        pass

    def answering_pid(self):
        """The worker pid that answers a fresh connection."""
        r = get(self.port, self.path)
        if r is None or r[0] != 200:
            return None
        return self.pid_of(r)

    def pid_of(self, response):
        pid = response[1].get("x-pid")
        return int(pid) if pid and pid.isdigit() else None

    def worker_pids(self):
        return children(self.master())

    def master(self):
        return self.proc.pid

    def all_pids(self):
        return [self.master(), *self.worker_pids()]

    def end(self):
        """Stops the server's processes; its directory stays (see `stop`, `restart`)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT if self.name.startswith("nginx") else signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def stop(self):
        self.end()
        shutil.rmtree(self.dir, ignore_errors=True)

    def restart(self):
        """The same server in fresh processes (same directory, ports and settings)."""
        self.end()
        self.start()


class Bare(Server):
    name = "hyper"

    def launch(self):
        self.proc = subprocess.Popen([os.path.join(RELEASE, "baton-bare-hyper"),
                                      f"127.0.0.1:{self.port}", "2"])

    def worker_pids(self):
        return [self.proc.pid]

    def all_pids(self):
        return [self.proc.pid]


class Baton(Server):
    """Baton with the `hello` plugin. own_binary: it runs a copy of the baton binary in its
    own directory, which `install` replaces by one of two builds (for self-upgrades)."""
    name = "baton"
    path = "/hello"
    upgrade_kind = "SIGUSR2"
    workers = BATON_PROCESSES
    MARKER = b"BATON-RELEASE:"

    def __init__(self, own_binary=False, metrics=False, access_log=None):
        # Variants of (a) only: with [metrics] on (and scraped every second), with the
        # access log on ("combined" or "json", to a file).
        if metrics:
            self.name = "baton-metrics"
        elif access_log:
            self.name = f"baton-log-{access_log}"
        super().__init__()
        self.metrics_port = free_port() if metrics else None
        self.access_log = access_log
        self.scraper = None
        self.scraping = threading.Event()
        self.own_binary = own_binary
        self.binary = os.path.join(RELEASE, "baton")
        # Where it goes by default without $RUNTIME_DIRECTORY (a directory only we enter).
        self.control_socket = os.path.join(self.dir, ".baton-run", "baton.sock")

    def builds(self):
        """The release binary and a copy whose release marker names another version of
        the same length (another hash, another reported version): [(version, bytes)]."""
        with open(os.path.join(RELEASE, "baton"), "rb") as f:
            data = f.read()
        if data.count(self.MARKER) != 1:
            raise RuntimeError("baton binary: expected exactly one release marker")
        at = data.index(self.MARKER) + len(self.MARKER)
        end = data.index(b";", at)
        version = data[at:end]
        other = version[:-1] + (b"2" if version.endswith(b"1") else b"1")
        return [(version.decode(), data), (other.decode(), data[:at] + other + data[end:])]

    def install(self, data):
        """Puts `data` in place as the baton binary on disk, as a package manager does
        (a new file renamed over the old one; the running image is not written to)."""
        tmp = self.binary + ".new"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o755)
        os.rename(tmp, self.binary)

    def launch(self):
        plugins = os.path.join(self.dir, "plugins.d")
        os.makedirs(plugins, mode=0o755, exist_ok=True)
        os.chmod(self.dir, 0o755)
        shutil.copy(os.path.join(RELEASE, "libbaton_hello.so"), plugins)
        if self.own_binary:
            self.binary = os.path.join(self.dir, "baton")
            self.install(self.builds()[0][1])
        self.config = os.path.join(self.dir, "baton.toml")
        with open(self.config, "w") as f:
            f.write(f"""[[listener]]
name = "http"
address = "127.0.0.1:{self.port}"
[worker]
path = "{RELEASE}/baton-worker"
processes = {BATON_PROCESSES}
threads = {BATON_THREADS}
drain_timeout = "10s"
{self.http_section()}[plugins]
dir = "{plugins}"
[control]
socket = "{self.control_socket}"
""")
            if self.metrics_port:
                f.write(f'[metrics]\naddress = "127.0.0.1:{self.metrics_port}"\n')
            if self.access_log:
                f.write(f'[log]\naccess = "{self.dir}/access.log"\naccess_format = "{self.access_log}"\n')
        self.proc = subprocess.Popen([self.binary, "run", "-c", self.config],
                                     env={**os.environ, "BATON_LOG": "warn"})
        if self.metrics_port:
            self.scraper = threading.Thread(target=self.scrape_every_second, daemon=True)
            self.scraper.start()

    def http_section(self):
        """The default max_connections (10,000 per worker) for up to 5,000 connections; above
        that, room for the scenario's connections under the fd limit (e and f)."""
        if self.conns <= 5000:
            return ""
        return f"[http]\nmax_connections = {min(18000, fd_budget() - 2000)}\n"

    def scrape_every_second(self):
        """What a Prometheus scraping every second costs, for as long as the server runs
        (bounded: it stops with the server, at the latest after an hour)."""
        deadline = time.time() + 3600
        while not self.scraping.wait(1.0) and time.time() < deadline:
            get(self.metrics_port, "/metrics", timeout=2.0)

    def stop(self):
        self.scraping.set()
        super().stop()

    def pid_of(self, response):
        m = re.search(rb"pid (\d+)", response[2])
        return int(m.group(1)) if m else None

    def upgrade(self):
        os.kill(self.proc.pid, signal.SIGUSR2)

    def status(self, timeout=5.0):
        """`baton status` through the control socket: the status document, or None (no
        answer, e.g. while the supervisor re-executes and its old image closed the
        connection)."""
        reply = control(self.control_socket, {"command": "status"}, timeout)
        return reply["status"] if reply and reply.get("reply") == "status" else None

    def supervisor_upgrade(self):
        """`baton upgrade --supervisor` without waiting: re-exec the binary on disk."""
        reply = control(self.control_socket, {"command": "upgrade", "wait": False, "supervisor": True})
        if not reply or reply.get("reply") != "accepted":
            raise RuntimeError(f"baton: supervisor upgrade not accepted: {reply}")


def control(path, request, timeout=5.0):
    """One request on a control socket (one JSON line each way): the first reply or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps(request).encode() + b"\n")
            line = b""
            while not line.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    return None
                line += chunk
        return json.loads(line)
    except (OSError, ValueError):
        return None


class Nginx(Server):
    """nginx 1.22, 2 workers, `return 200`. kind: "HUP" (reload) or "binary" (USR2/WINCH/QUIT).
    worker_connections 4096 for up to 4,000 connections; above that 20,000 (the fd limit), as
    a user expecting 10,000 or 15,000 connections would set it (a worker preallocates its
    connection slots, so a larger value costs memory and time at every reload)."""

    workers = 2

    def __init__(self, kind="HUP", access_log=False):
        self.name = "nginx" if kind == "HUP" else "nginx-binary"
        if access_log:
            self.name = "nginx-log"
        self.access_log = access_log
        self.upgrade_kind = kind
        super().__init__()
        self.current_master = None

    def launch(self):
        # HTTP/2 with prior knowledge on a port of its own (scenario d).
        self.h2_port = free_port()
        for d in ("logs", "tmp"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        self.conf = os.path.join(self.dir, "nginx.conf")
        with open(self.conf, "w") as f:
            big = self.conns > 4000
            rlimit = f"worker_rlimit_nofile {fd_budget()};\n" if big else ""
            f.write(f"""worker_processes 2;
{rlimit}pid {self.dir}/nginx.pid;
error_log {self.dir}/logs/error.log warn;
events {{ worker_connections {min(20000, fd_budget()) if big else 4096}; }}
http {{
    access_log {f"{self.dir}/logs/access.log combined" if self.access_log else "off"};
    client_body_temp_path {self.dir}/tmp;
    proxy_temp_path {self.dir}/tmp;
    fastcgi_temp_path {self.dir}/tmp;
    uwsgi_temp_path {self.dir}/tmp;
    scgi_temp_path {self.dir}/tmp;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{self.port} backlog=4096;
        listen 127.0.0.1:{self.h2_port} http2;
        location / {{
            add_header X-Pid $pid always;
            return 200 "hello\\n";
        }}
    }}
}}
""")
        # Daemonised, as in production: nginx ignores the binary-upgrade signal when its
        # parent is still the process that started it.
        # By absolute path: the binary upgrade re-executes argv[0].
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        subprocess.run([nginx, "-p", self.dir, "-c", self.conf], check=True)
        pidfile = os.path.join(self.dir, "nginx.pid")
        wait_until(lambda: os.path.exists(pidfile) and open(pidfile).read().strip().isdigit(), 10)
        with open(pidfile) as f:
            self.current_master = int(f.read().strip())

    def master(self):
        return self.current_master

    def worker_pids(self):
        return [p for p in children(self.current_master) if self.is_worker(p)]

    @staticmethod
    def is_worker(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return b"worker process" in f.read()
        except OSError:
            return False

    def upgrade(self):
        if self.upgrade_kind == "HUP":
            os.kill(self.current_master, signal.SIGHUP)
            return
        old = self.current_master
        pidfile = os.path.join(self.dir, "nginx.pid")
        os.kill(old, signal.SIGUSR2)

        def new_master():
            try:
                with open(pidfile) as f:
                    pid = int(f.read().strip())
                return pid if pid != old else None
            except (OSError, ValueError):
                return None
        if not wait_until(lambda: new_master() is not None, 10):
            raise RuntimeError("nginx binary upgrade: no new master")
        new = new_master()
        wait_until(lambda: any(self.is_worker(p) for p in children(new)), 10)
        os.kill(old, signal.SIGWINCH)
        os.kill(old, signal.SIGQUIT)
        self.current_master = new

    def end(self):
        if self.current_master and alive(self.current_master):
            os.kill(self.current_master, signal.SIGQUIT)
            if not wait_until(lambda: not alive(self.current_master), 10):
                os.kill(self.current_master, signal.SIGKILL)


class HAProxy(Server):
    """HAProxy 2.6 in master-worker mode, 2 threads, `http-request return`; reload: USR2.
    maxconn 4096 for up to 4,000 connections; above that as many as the fd limit allows:
    HAProxy counts two fds per connection (a proxy's two sides) and refuses to start when
    ulimit-n is below that (9,900 with a limit of 20,000)."""
    name = "haproxy"
    upgrade_kind = "USR2"

    def maxconn(self):
        return 4096 if self.conns <= 4000 else fd_budget() // 2 - 100

    def launch(self):
        self.conf = os.path.join(self.dir, "haproxy.cfg")
        with open(self.conf, "w") as f:
            f.write(f"""global
    master-worker
    nbthread 2
    maxconn {self.maxconn()}
    ulimit-n {fd_budget()}
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend fe
    bind 127.0.0.1:{self.port} backlog 4096
    http-request return status 200 content-type text/plain string "hello" hdr x-pid "%pid"
""")
        self.proc = subprocess.Popen(["haproxy", "-W", "-db", "-f", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def upgrade(self):
        os.kill(self.proc.pid, signal.SIGUSR2)


# Servers that are another server with one feature on, compared with it in (a).
VARIANTS = {"baton-metrics": "baton", "baton-log-combined": "baton", "baton-log-json": "baton",
            "nginx-log": "nginx"}


# (f) holds up to 15,000 connections: the bare server (memory only, the ceiling), Baton, nginx
# (HUP) and the Go stack. HAProxy cannot take 15,000 under this machine's fd limit (its
# maxconn counts two fds per connection); nginx's binary upgrade closes idle connections
# as its HUP does.
F_SERVERS = ("hyper", "baton", "nginx", "go-tableflip")


TABLEFLIP_SRC = "/usr/share/gocode/src/github.com/cloudflare/tableflip"


def go_tableflip_binary():
    """Builds tests/bench/http_tableflip.go once per run, offline from Debian's packages
    (installing golang-go and golang-github-cloudflare-tableflip-dev if missing)."""
    if getattr(go_tableflip_binary, "path", None):
        return go_tableflip_binary.path
    missing = [pkg for pkg, present in [
        ("golang-go", shutil.which("go")),
        ("golang-github-cloudflare-tableflip-dev", os.path.isdir(TABLEFLIP_SRC))] if not present]
    if missing:
        log(f"installing {' '.join(missing)} from Debian's packages")
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, timeout=600,
                       stdout=subprocess.DEVNULL, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    out = os.path.join(ROOT, "target", "bench")
    os.makedirs(out, exist_ok=True)
    binary = os.path.join(out, "http-tableflip")
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode",
               GOCACHE=os.path.join(out, "gocache"))
    subprocess.run(["go", "build", "-o", binary, os.path.join(ROOT, "tests/bench/http_tableflip.go")],
                   check=True, timeout=600, env=env)
    go_tableflip_binary.path = binary
    return binary


class GoTableflip(Server):
    """The seeds' own stack: Go net/http behind cloudflare/tableflip (fork+exec on SIGUSR2,
    the old process drains with Shutdown). One process serves; an upgrade replaces it."""
    name = "go-tableflip"
    upgrade_kind = "SIGUSR2"

    def __init__(self):
        super().__init__()
        self.pidfile = os.path.join(self.dir, "go.pid")
        self.started = []

    def current(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def launch(self):
        binary = go_tableflip_binary()
        self.argv0 = binary
        self.proc = subprocess.Popen([binary, "-listen", f"127.0.0.1:{self.port}",
                                      "-pid-file", self.pidfile],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.current() == self.proc.pid, 20)
        self.started.append(self.proc.pid)

    def master(self):
        return self.current() or self.proc.pid

    def worker_pids(self):
        return [self.master()]

    def all_pids(self):
        return [p for p in self.started if self.ours(p)]

    def ours(self, pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read().split(b"\0")[0].decode() == self.argv0
        except OSError:
            return False

    def upgrade(self):
        self.upgrade_start()
        self.upgrade_finish()

    def upgrade_start(self):
        self.upgrading = self.current()
        os.kill(self.upgrading, signal.SIGUSR2)

    def upgrade_finish(self):
        old = self.upgrading
        # The new process writes the PID file once it is ready (tableflip's Ready).
        if not wait_until(lambda: self.current() not in (0, old), 20, 0.002):
            raise RuntimeError(f"go-tableflip: no new process after SIGUSR2 to {old}")
        self.started.append(self.current())

    def end(self):
        # Only the processes this server started that still run it (a reused pid is left alone).
        for pid in reversed(self.started):
            if self.ours(pid):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        wait_until(lambda: not any(self.ours(p) for p in self.started), 40, 0.05)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def write_results(results, path):
    """Writes a run's results as JSON to `path`, making its directory if needed."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


def servers_for(which):
    table = {"hyper": Bare, "baton": Baton, "nginx": lambda: Nginx("HUP"),
             "nginx-binary": lambda: Nginx("binary"), "haproxy": HAProxy,
             "go-tableflip": GoTableflip,
             # Variants measured in (a) only: the cost of metrics and of access logs.
             "baton-metrics": lambda: Baton(metrics=True),
             "baton-log-combined": lambda: Baton(access_log="combined"),
             "baton-log-json": lambda: Baton(access_log="json"),
             "nginx-log": lambda: Nginx("HUP", access_log=True)}
    return [(name, table[name]) for name in which]


# ---------------------------------------------------------------------------- wrk

UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def to_ms(text):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    return float(m.group(1)) * UNITS[m.group(2)] if m else None


def wrk(port, path, threads, conns, seconds, close=False, timeout="5s"):
    cmd = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", f"--timeout={timeout}"]
    if close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60).stdout
    return parse_wrk(out)


def parse_wrk(out):
    r = {"requests": 0, "rps": 0.0, "non2xx": 0, "connect": 0, "read": 0, "write": 0,
         "timeout": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    m = re.search(r"(\d+) requests in", out)
    if m:
        r["requests"] = int(m.group(1))
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m:
        r["rps"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        r["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        r["connect"], r["read"], r["write"], r["timeout"] = map(int, m.groups())
    m = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    if m:
        r["max_ms"] = to_ms(m.group(1))
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", out, re.M)
        if m:
            r[key] = to_ms(m.group(1))
    r["errors"] = r["non2xx"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return r


# ---------------------------------------------------------------------- scenarios

# (a)'s modes: name, Connection: close, wrk threads.
A_MODES = (("keepalive", False, 2), ("close", True, 2), ("keepalive-t1", False, 1))


def turn_totals(rs):
    """wrk's counts summed over turns, and the largest latency of any turn."""
    total = {key: sum(r[key] for r in rs)
             for key in ("requests", "non2xx", "connect", "read", "write", "timeout", "errors")}
    total["max_ms"] = max((r["max_ms"] for r in rs if r["max_ms"] is not None), default=None)
    return total


def scenario_a(servers, turns, seconds):
    """Every server is up; they take turns of `seconds` under the same load, in an order
    that rotates, `turns` times for each mode. The machine's slow spells last several
    seconds (rounds of 5 s per server ranged by +-20% for every server): short turns,
    taken in alternation, spread them over all servers alike. `keepalive-t1`: keep-alive
    under `wrk -t1`, which leaves the server more of the two cores."""
    out = {}
    for mode, close, threads in A_MODES:
        slices = {s.name: [] for s in servers}
        for t in range(turns):
            k = t % len(servers)
            for server in servers[k:] + servers[:k]:
                slices[server.name].append(wrk(server.port, server.path, threads, 64, seconds, close=close))
        for name, rs in slices.items():
            total = turn_totals(rs)
            total["rps"] = sum(r["requests"] for r in rs) / (seconds * len(rs))
            for key in ("p50_ms", "p99_ms"):
                got = sorted(r[key] for r in rs if r[key] is not None)
                total[key] = statistics.median(got) if got else None
            total["turns_rps"] = [r["rps"] for r in rs]
            out.setdefault(name, {})[mode] = total
    return out


def upgrade_every(server, interval, duration, stop):
    count = 0
    deadline = time.monotonic() + duration
    while time.monotonic() < deadline and not stop.is_set():
        time.sleep(interval)
        try:
            server.upgrade()
            count += 1
        except Exception as e:  # noqa: BLE001 - reported, the run goes on
            log(f"{server.name}: upgrade failed: {e}")
    return count


def scenario_b(server, seconds):
    out = {}
    for mode, close in (("keepalive", False), ("close", True)):
        stop = threading.Event()
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "upgrades", upgrade_every(server, 0.5, seconds - 0.5, stop)))
        t.start()
        r = wrk(server.port, server.path, 1, 32, seconds, close=close)
        stop.set()
        t.join()
        r["upgrades"] = result.get("upgrades", 0)
        out[mode] = r
        # Let the last drains finish before the next measurement.
        wait_until(lambda: len(server.worker_pids()) <= 2, 15, 0.05)
    return out


def one_upgrade_latency(server):
    old = set(server.worker_pids())
    t0 = time.monotonic()
    server.upgrade()
    new_at = gone_at = None
    deadline = t0 + 15
    while time.monotonic() < deadline and (new_at is None or gone_at is None):
        if new_at is None:
            pid = server.answering_pid()
            if pid is not None and pid not in old:
                new_at = time.monotonic()
        if gone_at is None and not any(alive(p) for p in old):
            gone_at = time.monotonic()
        if new_at is None or gone_at is None:
            time.sleep(0.001)
    ms = lambda t: None if t is None else (t - t0) * 1000.0  # noqa: E731
    return ms(new_at), ms(gone_at)


def summarize(values):
    v = sorted(x for x in values if x is not None)
    if not v:
        return {"median": None, "p99": None, "max": None, "missing": len(values)}
    p99 = v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))]
    return {"median": statistics.median(v), "p99": p99, "max": v[-1], "missing": len(values) - len(v)}


def scenario_c(server, upgrades):
    out = {}
    for mode in ("idle", "load"):
        load = None
        if mode == "load":
            load = subprocess.Popen(["wrk", "-t1", "-c32", "-d600s", f"http://127.0.0.1:{server.port}{server.path}"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
        new, gone = [], []
        try:
            for _ in range(upgrades):
                n, g = one_upgrade_latency(server)
                new.append(n)
                gone.append(g)
                time.sleep(0.05)
        finally:
            if load:
                load.terminate()
                load.wait()
        out[mode] = {"new_answers_ms": summarize(new), "old_gone_ms": summarize(gone)}
    return out


def fd_count(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def serving(status):
    """(number, worker pids) of the serving generation in a Baton status document."""
    for g in status["generations"]:
        if g["state"] == "serving":
            return g["number"], sorted(g["pids"])
    return None


def one_supervisor_upgrade(server, version):
    """Baton's supervisor re-exec: request -> the new image answers `status` (its
    `reexecs` went up). Returns (ms or None, the status it answered, or None)."""
    status = server.status()
    if status is None:
        log("baton: no status before the supervisor upgrade")
        return None, None
    before = status["supervisor"]["reexecs"]
    t0 = time.monotonic()
    server.supervisor_upgrade()
    deadline = t0 + 15
    while time.monotonic() < deadline:
        status = server.status(timeout=max(0.1, deadline - time.monotonic()))
        if status is not None and status["supervisor"]["reexecs"] > before:
            ms = (time.monotonic() - t0) * 1000.0
            if status["supervisor"]["version"] != version:
                last = status.get("last_upgrade") or {}
                log(f"baton: the re-exec runs {status['supervisor']['version']}, not {version}: "
                    f"{last.get('result')} {last.get('reason')}")
            return ms, status
        time.sleep(0.001)
    log("baton: no new supervisor image within 15 s")
    return None, server.status()


def scenario_c_self(server, upgrades):
    """The supervisor upgrading itself, `upgrades` times idle and under wrk -t1 -c32.
    Baton: `upgrade --supervisor` over the control socket with the binary on disk
    alternating between two builds; the pid, the serving generation and its worker pids
    must stay as they are. nginx-binary: its binary upgrade, timed as in scenario (c)."""
    baton = isinstance(server, Baton)
    builds = server.builds()[::-1] if baton else None  # the first upgrade installs the other build
    done = 0
    out = {}
    for mode in ("idle", "load"):
        load = None
        if mode == "load":
            load = subprocess.Popen(["wrk", "-t1", "-c32", "-d600s", f"http://127.0.0.1:{server.port}{server.path}"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            time.sleep(0.5)
        time.sleep(0.3)  # a control connection just answered may still be open
        master = server.master()
        r = {"upgrades": upgrades, "pid_before": master, "fds_before": fd_count(master),
             "rss_kib_before": memory(master)[0], "pid_changes": 0, "serving_changes": 0,
             "version_mismatches": 0}
        first = serving(server.status()) if baton else None
        times = []
        try:
            for _ in range(upgrades):
                pid = server.master()
                if baton:
                    version, data = builds[done % 2]
                    server.install(data)
                    ms, status = one_supervisor_upgrade(server, version)
                    now = serving(status) if status else None
                    if status is None or status["supervisor"]["pid"] != pid or server.proc.poll() is not None:
                        r["pid_changes"] += 1
                    if now is None or now != first or sorted(server.worker_pids()) != now[1]:
                        r["serving_changes"] += 1
                        log(f"baton: serving generation {first} became {now}")
                    if status is None or status["supervisor"]["version"] != version:
                        r["version_mismatches"] += 1
                else:
                    ms, _ = one_upgrade_latency(server)
                    if server.master() != pid:
                        r["pid_changes"] += 1
                times.append(ms)
                done += 1
                time.sleep(0.05)
        finally:
            if load:
                load.send_signal(signal.SIGINT)  # wrk prints its figures on SIGINT
                try:
                    wrk_out = load.communicate(timeout=30)[0]
                except subprocess.TimeoutExpired:
                    load.kill()
                    wrk_out = load.communicate()[0]
                w = parse_wrk(wrk_out)
                r.update({k: w[k] for k in ("requests", "errors", "non2xx", "connect", "read", "write", "timeout")})
        time.sleep(0.3)
        master = server.master()
        r.update({"upgrade_ms": summarize(times), "failed": sum(t is None for t in times),
                  "pid_after": master, "fds_after": fd_count(master), "rss_kib_after": memory(master)[0]})
        if baton:
            st = server.status()
            r["reexecs"] = st["supervisor"]["reexecs"]
            r["version_after"] = st["supervisor"]["version"]
        out[mode] = r
    return out


def mem_of(server):
    procs = []
    for pid in server.all_pids():
        rss, pss = memory(pid)
        with open(f"/proc/{pid}/comm") as f:
            comm = f.read().strip()
        procs.append({"pid": pid, "comm": comm, "rss_kib": rss, "pss_kib": pss})
    return {"processes": procs, "rss_kib": sum(p["rss_kib"] for p in procs),
            "pss_kib": sum(p["pss_kib"] for p in procs)}


# (d) holds idle connections of three kinds, each after one exchange: HTTP/1.1 keep-alive,
# HTTP/2 with prior knowledge (h2c, one request on stream 1) and WebSocket (the upgrade
# and one echoed message). Servers that do not speak a kind on their port get "-": nginx
# speaks h2c on a port of its own (D_H2_PORT), HAProxy detects the HTTP/2 preface on its
# HTTP/1 port, Go's net/http (1.19, without golang.org/x/net) has no h2c; only Baton
# terminates WebSockets here (a Baton with the C test plugin's echo route).
D_KINDS = ("h1", "h2", "ws")


def d_h2_request(path):
    """The HTTP/2 preface, an empty SETTINGS frame, a WINDOW_UPDATE that opens the
    connection's window to 32 MiB (as curl 7.88 does; h2load opens it to 1 GiB) and a GET
    of `path` on stream 1. Baton keeps a connection whose client never opened the window
    in h2 (about 20 KiB): see docs/BENCHMARKS.md."""
    def literal(index, value):  # literal header field without indexing, indexed name
        return bytes([index, len(value)]) + value.encode()
    block = b"\x82\x86" + literal(0x04, path) + literal(0x01, "127.0.0.1")  # GET, http
    headers = len(block).to_bytes(3, "big") + b"\x01\x05" + (1).to_bytes(4, "big") + block
    window = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + (32 * 2**20 - 65535).to_bytes(4, "big")
    return (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00" + window
            + headers)


def d_h2_answered(s):
    """Reads frames until stream 1 ends; acknowledges the server's SETTINGS."""
    buf, acked = b"", False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
            length, kind, flags = int.from_bytes(buf[:3], "big"), buf[3], buf[4]
            stream = int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            buf = buf[9 + length:]
            if kind == 4 and not flags & 1 and not acked:
                s.sendall(b"\x00\x00\x00\x04\x01\x00\x00\x00\x00")
                acked = True
            if stream == 1 and kind in (0, 1) and flags & 1:
                return True
            if kind == 7:  # GOAWAY
                return False
        chunk = s.recv(65536)
        if not chunk:
            return False
        buf += chunk
    return False


def d_open(kind, port, path):
    """One connection of `kind` after its exchange, or None if the server refused it."""
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError:
        return None
    try:
        if kind == "h1":
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            head = s.recv(65536)
            ok = head.startswith(b"HTTP/1.1 200")
        elif kind == "h2":
            s.sendall(d_h2_request(path))
            ok = d_h2_answered(s)
        else:
            key = base64.b64encode(os.urandom(16)).decode()
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
            ok = s.recv(65536).startswith(b"HTTP/1.1 101")
            if ok:
                mask = os.urandom(4)
                s.sendall(bytes([0x81, 0x82]) + mask + bytes(b ^ mask[i] for i, b in enumerate(b"hi")))
                ok = len(s.recv(64)) > 0
    except OSError:
        ok = False
    if not ok:
        s.close()
        return None
    return s


def d_hold(server, kind, port, path, conns):
    """RSS before, while holding `conns` idle connections of `kind`, and 2.5 s after they
    closed; None if the server does not speak `kind`."""
    probe = d_open(kind, port, path)
    if probe is None:
        return None
    probe.close()
    time.sleep(0.5)
    before = mem_of(server)
    socks = []
    try:
        for _ in range(conns):
            s = d_open(kind, port, path)
            if s is None:
                raise RuntimeError(f"{server.name}: {kind} connection {len(socks) + 1} refused")
            socks.append(s)
        # A WebSocket counts as idle once it has been quiet for a while: Baton's leaves
        # its task after a second without a message (and the worker trims the allocator
        # at its next 1 s tick).
        time.sleep(3.0 if kind == "ws" else 1.0)
        busy = mem_of(server)
    finally:
        for s in socks:
            s.close()
    # Once they are closed: what the processes give back (a Baton worker trims the
    # allocator within its 1 s stats tick once its connections fell to half of a peak).
    time.sleep(2.5)
    after = mem_of(server)
    return {"connections": conns, "before": before, "holding": busy, "after_close": after,
            "bytes_per_connection": round((busy["rss_kib"] - before["rss_kib"]) * 1024 / conns)}


class BatonWs(Baton):
    """Baton with the C test plugin (tests/harness/ws_plugin.c), for (d)'s WebSockets."""
    name = "baton-ws"
    path = "/ws/echo"

    def ready(self):
        return d_open("ws", self.port, self.path) is not None


def baton_ws(conns):
    """A BatonWs sized for `conns`, its plugin built, not started."""
    server = BatonWs()
    server.conns = conns
    plugins = os.path.join(server.dir, "plugins.d")
    os.makedirs(plugins, mode=0o755)
    subprocess.run(["cc", "-std=c11", "-O2", "-fPIC", "-shared", "-I",
                    os.path.join(ROOT, "plugins/api/include"), os.path.join(ROOT, "tests/harness/ws_plugin.c"),
                    "-o", os.path.join(plugins, "ws_test.so")], check=True, timeout=120)
    return server


def d_baton_ws(conns):
    server = baton_ws(conns)
    try:
        server.start()
        return d_hold(server, "ws", server.port, server.path, conns)
    finally:
        server.stop()


F_IDLE_KINDS = {"ws": "WebSockets (one message echoed each)",
                "h2": "HTTP/2 connections with prior knowledge (one request each)"}


def f_baton_idle(kind, levels):
    """Idle connections of `kind` ("ws" or "h2", see F_IDLE_KINDS) held at each of `levels`
    by Baton (the one with the C test plugin): the worker's RSS and PSS per connection at
    each, as (f) measures HTTP/1.1. Opened one after another; measured 3 s after the last
    opened (quiet, out of their tasks, and past the worker's trim tick)."""
    server = baton_ws(max(levels))
    path = server.path if kind == "ws" else "/_baton/health"
    socks = []
    try:
        server.start()
        idle = workers_memory(server.worker_pids())
        out = {"idle": idle, "levels": {}}
        for n in sorted(levels):
            t = time.monotonic()
            while len(socks) < n:
                s = d_open(kind, server.port, path)
                if s is None:
                    raise RuntimeError(f"{kind} connection {len(socks) + 1} refused")
                socks.append(s)
            seconds = time.monotonic() - t
            time.sleep(3.0)
            m = workers_memory(server.worker_pids())
            per = lambda key: (m[key] - idle[key]) / n  # noqa: E731
            out["levels"][str(n)] = {**m, "open": len(socks), "fill_s": round(seconds, 2),
                                     "rss_kib_per_conn": per("rss_kib"), "pss_kib_per_conn": per("pss_kib")}
            log(f"(f) baton: {n} idle {kind} connections in {seconds:.1f} s, worker "
                f"{m['rss_kib'] / 1024:.1f} MiB RSS ({per('rss_kib'):.2f} KiB each)")
        return out
    finally:
        for s in socks:
            s.close()
        server.stop()


def scenario_d(server, conns):
    idle = mem_of(server)
    out = {"idle": idle}
    for i, kind in enumerate(D_KINDS):
        if i and kind != "ws":
            # Each kind in a fresh process: memory freed by the connections of the kind
            # before (and kept by an allocator that does not trim) would be reused, and
            # the kind after would look cheaper than it is.
            server.restart()
        if kind == "ws":
            r = d_baton_ws(conns) if isinstance(server, Baton) else None
        else:
            port = getattr(server, "h2_port", server.port) if kind == "h2" else server.port
            r = d_hold(server, kind, port, server.path, conns)
        out[kind] = r
        if r:
            log(f"(d) {server.name} {kind}: {r['bytes_per_connection']} bytes per idle connection")
    return out


def scenario_e(server, conns, upgrades):
    seconds = 4 + upgrades * 1.5
    stop = threading.Event()

    def upgrade_later():
        time.sleep(2)
        n = 0
        while n < upgrades and not stop.is_set():
            server.upgrade()
            n += 1
            time.sleep(1.5)
    t = threading.Thread(target=upgrade_later)
    t.start()
    r = wrk(server.port, server.path, 2, conns, int(seconds), timeout="10s")
    stop.set()
    t.join()
    wait_until(lambda: len(server.worker_pids()) <= 2, 20, 0.05)
    return r


def scenario_e_turns(servers, conns, upgrades, turns):
    """(e) for every server, up at once, taking `turns` turns each in an order that
    rotates, as in (a): a single run per server was as far off as 0.78x or 0.96x on the
    same build, the machine's slow spells falling on one server or another. Totals over
    the turns, with each turn's requests kept."""
    slices = {s.name: [] for s in servers}
    for t in range(turns):
        k = t % len(servers)
        for server in servers[k:] + servers[:k]:
            log(f"(e) {server.name}, turn {t + 1} of {turns}")
            slices[server.name].append(scenario_e(server, conns, upgrades))
    out = {}
    for name, rs in slices.items():
        total = turn_totals(rs)
        total["turns"] = len(rs)
        total["turns_requests"] = [r["requests"] for r in rs]
        out[name] = total
    return out


def kernel_memory():
    """Kernel memory that grows with sockets, KiB: slab (struct sock, file, epoll items, ...)
    and TCP's buffers (sockstat's mem, in pages). System-wide; on loopback both ends count."""
    slab = tcp = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Slab:"):
                slab = int(line.split()[1])
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                tcp = int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE") // 1024
    return {"slab_kib": slab, "tcp_mem_kib": tcp}


def tcp_counters():
    """The kernel's TcpExt counters that tell a listener's queue overflowed (system-wide)."""
    with open("/proc/net/netstat") as f:
        lines = [line.split() for line in f if line.startswith("TcpExt:")]
    values = dict(zip(lines[0][1:], map(int, lines[1][1:])))
    return {k: values.get(k, 0) for k in ("ListenOverflows", "ListenDrops", "TCPSynRetrans",
                                           "SyncookiesSent", "TCPReqQFullDrop")}


def workers_memory(pids):
    procs = []
    for pid in pids:
        rss, pss = memory(pid)
        procs.append({"pid": pid, "rss_kib": rss, "pss_kib": pss, "fds": fd_count(pid)})
    return {"processes": procs, "rss_kib": sum(p["rss_kib"] for p in procs),
            "pss_kib": sum(p["pss_kib"] for p in procs)}


def scenario_f(server, levels, upgrade, grace_ms=1000):
    """Idle keep-alive connections (HTTP/1.1, one request each) held at each of `levels`:
    the workers' RSS and PSS (and the kernel's socket memory) at each, per connection.
    Then, at the last level, one upgrade: how the old generation closes the connections
    (FIN or reset, seen by the client), when its workers are gone, and the reconnects
    (every client reconnects as soon as it sees its close): their peak per 100 ms and
    any that failed."""
    idle = workers_memory(server.worker_pids())
    kernel0 = kernel_memory()
    out = {"idle": idle, "levels": {}}
    clients = idle_conns.Clients(server.port, server.path)
    try:
        for n in sorted(levels):
            t = time.monotonic()
            got = clients.fill(n, deadline=t + 120)
            seconds = time.monotonic() - t
            time.sleep(1.5)  # past the workers' 1 s stats tick; nothing is in flight
            clients.poll(0)
            m = workers_memory(server.worker_pids())
            k = kernel_memory()
            per = lambda key: (m[key] - idle[key]) / got if got else None  # noqa: E731
            out["levels"][str(n)] = {
                **m, "open": clients.idle, "failed": dict(clients.failed), "fill_s": round(seconds, 2),
                "rss_kib_per_conn": per("rss_kib"), "pss_kib_per_conn": per("pss_kib"),
                "all_rss_kib_per_conn": m["rss_kib"] / got if got else None,
                "kernel_kib_per_conn": ((k["slab_kib"] + k["tcp_mem_kib"]) -
                                        (kernel0["slab_kib"] + kernel0["tcp_mem_kib"])) / got if got else None,
                "kernel": k}
            log(f"(f) {server.name}: {clients.idle} idle connections in {seconds:.1f} s, workers "
                f"{m['rss_kib'] / 1024:.1f} MiB RSS ({out['levels'][str(n)]['rss_kib_per_conn'] or 0:.2f} KiB each)")
        if upgrade:
            out["upgrade"] = upgrade_under_idle(server, clients, grace_ms)
    finally:
        clients.close_all()
    return out


def upgrade_under_idle(server, clients, grace_ms):
    held = clients.idle
    old = set(server.worker_pids())
    counters = tcp_counters()
    clients.reconnect = True
    gone = []
    done = threading.Event()

    def watch_old():
        # A thread of its own, so a burst of closes for the client loop to handle does not
        # delay the check (every 2 ms, bounded by the run's deadline).
        while not done.is_set():
            if not any(alive(p) for p in old):
                gone.append(time.monotonic())
                return
            time.sleep(0.002)
    t0 = time.monotonic()
    server.upgrade_start()
    watcher = threading.Thread(target=watch_old, daemon=True)
    watcher.start()
    deadline = t0 + grace_ms / 1000 + 30
    while time.monotonic() < deadline:
        clients.poll(0.005)
        closed = sum(clients.closes.values())
        if gone and closed >= held and clients.in_flight() == 0:
            break
    done.set()
    watcher.join()
    gone_at = gone[0] if gone else None
    after = tcp_counters()
    server.upgrade_finish()
    ms = lambda t: None if t is None else round((t - t0) * 1000.0, 1)  # noqa: E731
    closes = clients.close_times
    reconnected = clients.connected_times
    new = [p for p in server.worker_pids() if p not in old]
    r = {
        "held": held, "fin": clients.closes["fin"], "reset": clients.closes["reset"],
        "not_closed": held - sum(clients.closes.values()),
        "data_on_idle": clients.data_on_idle,
        "reconnects_closed_again": dict(clients.closes_of_reconnects),
        "first_close_ms": ms(min(closes, default=None)), "last_close_ms": ms(max(closes, default=None)),
        "old_gone_ms": ms(gone_at), "grace_ms": grace_ms,
        "reconnects": clients.reconnects_started, "reconnects_answered": len(clients.answered_times),
        "reconnect_failed": dict(clients.reconnect_failed),
        "reconnect_peak_per_100ms": idle_conns.peak_per(reconnected, t0, 0.1),
        "answered_peak_per_100ms": idle_conns.peak_per(clients.answered_times, t0, 0.1),
        "last_reconnect_answered_ms": ms(max(clients.answered_times, default=None)),
        "new_workers": workers_memory(new),
        "kernel_counters": {k: after[k] - counters[k] for k in counters},
    }
    log(f"(f) {server.name}: upgrade at {held}: {r['fin']} FIN, {r['reset']} reset, {r['not_closed']} not "
        f"closed; old gone at {r['old_gone_ms']} ms; reconnect peak {r['reconnect_peak_per_100ms']}/100 ms, "
        f"answered peak {r['answered_peak_per_100ms']}/100 ms, failed {r['reconnect_failed']}; "
        f"kernel: {r['kernel_counters']}")
    return r


# ------------------------------------------------------------------------ report

def fmt(v, digits=1):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def report(results, quick):
    lines = []
    add = lines.append
    names = list(results["servers"].keys())
    a = {n: results["servers"][n].get("a") for n in names}
    anchor_n = a.get("nginx")
    anchor_h = a.get("hyper")
    add("(a) steady state, wrk -t2 -c64 (keepalive-t1: wrk -t1) (servers taking turns of 2 s; p50/p99: median turn)")
    add(f"{'server':14} {'mode':12} {'req/s':>10} {'x nginx':>8} {'x hyper':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'errors':>7}")
    for n in names:
        if not a[n]:
            continue
        for mode in [m for m, _, _ in A_MODES if m in a[n]]:
            r = a[n][mode]
            xn = r["rps"] / anchor_n[mode]["rps"] if anchor_n and mode in anchor_n else None
            xh = r["rps"] / anchor_h[mode]["rps"] if anchor_h and mode in anchor_h else None
            add(f"{n:14} {mode:12} {r['rps']:>10.0f} {fmt(xn, 2):>8} {fmt(xh, 2):>8} {fmt(r['p50_ms'], 2):>8} "
                f"{fmt(r['p99_ms'], 2):>8} {fmt(r['max_ms'], 1):>8} {r['errors']:>7}")
    costs = [(n, VARIANTS[n]) for n in names if n in VARIANTS and a.get(n) and a.get(VARIANTS[n])]
    if costs:
        add("")
        add("(a) the cost of a feature: a variant's throughput relative to the same server without it")
        add(f"{'variant':20} {'of':8} {'keepalive':>10} {'close':>8}")
        for n, base in costs:
            ka = a[n]["keepalive"]["rps"] / a[base]["keepalive"]["rps"]
            cl = a[n]["close"]["rps"] / a[base]["close"]["rps"]
            add(f"{n:20} {base:8} {ka:>9.3f}x {cl:>7.3f}x")
    add("")
    add("(b) an upgrade every 0.5 s under wrk -t1 -c32")
    add(f"{'server':14} {'mode':10} {'upgrades':>8} {'requests':>9} {'non-2xx':>8} {'connect':>8} {'read':>6} {'write':>6} {'timeout':>8} {'p99 ms':>8} {'max ms':>8}")
    for n in names:
        b = results["servers"][n].get("b")
        if not b:
            continue
        for mode in ("keepalive", "close"):
            r = b[mode]
            add(f"{n:14} {mode:10} {r['upgrades']:>8} {r['requests']:>9} {r['non2xx']:>8} {r['connect']:>8} "
                f"{r['read']:>6} {r['write']:>6} {r['timeout']:>8} {fmt(r['p99_ms'], 2):>8} {fmt(r['max_ms'], 1):>8}")
    add("")
    add("(c) upgrade latency, ms: signal -> new worker answers | signal -> old workers gone")
    add(f"{'server':14} {'mode':6} {'new med':>8} {'new p99':>8} {'new max':>8} {'gone med':>9} {'gone p99':>9} {'gone max':>9}")
    for n in names:
        c = results["servers"][n].get("c")
        if not c:
            continue
        for mode in ("idle", "load"):
            nw, g = c[mode]["new_answers_ms"], c[mode]["old_gone_ms"]
            add(f"{n:14} {mode:6} {fmt(nw['median']):>8} {fmt(nw['p99']):>8} {fmt(nw['max']):>8} "
                f"{fmt(g['median']):>9} {fmt(g['p99']):>9} {fmt(g['max']):>9}")
    add("")
    add("(c) supervisor upgrade in place, ms. baton: upgrade --supervisor (binary on disk alternating")
    add("    between two builds) -> the new image answers status; nginx-binary: USR2 -> a worker of the")
    add("    new master answers (then WINCH, QUIT to the old master). pid chg: upgrades after which the")
    add("    master pid differed; gen chg: serving generation or its worker pids changed (baton)")
    add(f"{'server':14} {'mode':6} {'n':>3} {'med':>7} {'p99':>7} {'max':>7} {'fail':>5} {'pid chg':>8} {'gen chg':>8} "
        f"{'req err':>8} {'fds':>8} {'RSS MiB':>10}")
    for n in names:
        c = results["servers"][n].get("c_self")
        if not c:
            continue
        for mode in ("idle", "load"):
            r = c[mode]
            u = r["upgrade_ms"]
            err = fmt(r.get("errors")) if mode == "load" else "-"
            gen = fmt(r["serving_changes"]) if n == "baton" else "-"
            fds = f"{fmt(r['fds_before'])}->{fmt(r['fds_after'])}"
            rss = f"{r['rss_kib_before'] / 1024:.1f}->{r['rss_kib_after'] / 1024:.1f}"
            add(f"{n:14} {mode:6} {r['upgrades']:>3} {fmt(u['median']):>7} {fmt(u['p99']):>7} {fmt(u['max']):>7} "
                f"{r['failed']:>5} {r['pid_changes']:>8} {gen:>8} {err:>8} {fds:>8} {rss:>10}")
    add("")
    add("(d) memory: RSS of all processes, MiB; per idle connection (HTTP/1.1 keep-alive, HTTP/2, WebSocket,")
    add("    each after one exchange), KiB; after: RSS 2.5 s after they closed, MiB")
    add(f"{'server':14} {'idle RSS':>9} {'idle PSS':>9} {'h1 KiB':>7} {'h2 KiB':>7} {'ws KiB':>7} "
        f"{'h1 after':>9} {'h2 after':>9} {'ws after':>9}  per process (idle RSS)")
    for n in names:
        d = results["servers"][n].get("d")
        if not d:
            continue
        per_kind, after = [], []
        for kind in D_KINDS:
            r = d.get(kind)
            per_kind.append(f"{r['bytes_per_connection'] / 1024:>7.2f}" if r else f"{'-':>7}")
            after.append(f"{r['after_close']['rss_kib'] / 1024:>9.1f}" if r else f"{'-':>9}")
        per = ", ".join(f"{p['comm']} {p['rss_kib'] / 1024:.1f}" for p in d["idle"]["processes"])
        add(f"{n:14} {d['idle']['rss_kib'] / 1024:>9.1f} {d['idle']['pss_kib'] / 1024:>9.1f} "
            f"{' '.join(per_kind)} {' '.join(after)}  {per}")
    add("")
    add("(e) 10,000 keep-alive connections across 5 upgrades (wrk -t2 -c10000), totals over the turns")
    add(f"{'server':14} {'turns':>5} {'requests':>9} {'non-2xx':>8} {'connect':>8} {'read':>6} {'write':>6} "
        f"{'timeout':>8} {'max ms':>8}  per turn")
    for n in names:
        e = results["servers"][n].get("e")
        if not e:
            continue
        add(f"{n:14} {e.get('turns', 1):>5} {e['requests']:>9} {e['non2xx']:>8} {e['connect']:>8} {e['read']:>6} "
            f"{e['write']:>6} {e['timeout']:>8} {fmt(e['max_ms'], 1):>8}  "
            f"{' '.join(str(r) for r in e.get('turns_requests', []))}")
    f_rows = [(n, results["servers"][n]["f"]) for n in names if results["servers"][n].get("f")]
    if f_rows:
        add("")
        add("(f) idle HTTP/1.1 keep-alive connections (one request each): the workers' memory. marginal:")
        add("    (RSS at N - idle RSS) / N; all: RSS at N / N (what the workers preallocate included);")
        add("    kernel: slab + TCP buffers, system-wide, both ends on loopback")
        add(f"{'server':14} {'conns':>6} {'RSS MiB':>8} {'PSS MiB':>8} {'KiB/conn':>9} {'PSS KiB/c':>9} "
            f"{'all KiB/c':>9} {'kernel KiB/c':>12} {'fill s':>7}")
        for n, f in f_rows:
            add(f"{n:14} {0:>6} {f['idle']['rss_kib'] / 1024:>8.1f} {f['idle']['pss_kib'] / 1024:>8.1f}")
            for level, r in f["levels"].items():
                add(f"{'':14} {level:>6} {r['rss_kib'] / 1024:>8.1f} {r['pss_kib'] / 1024:>8.1f} "
                    f"{fmt(r['rss_kib_per_conn'], 2):>9} {fmt(r['pss_kib_per_conn'], 2):>9} "
                    f"{fmt(r['all_rss_kib_per_conn'], 2):>9} {fmt(r['kernel_kib_per_conn'], 2):>12} {r['fill_s']:>7.1f}")
        for kind, what in F_IDLE_KINDS.items():
            ws = results["servers"].get("baton", {}).get(f"f_{kind}")
            if not ws:
                continue
            add("")
            add(f"(f) idle {what}, Baton's worker: marginal KiB per connection")
            add(f"{'server':14} {'conns':>6} {'RSS MiB':>8} {'PSS MiB':>8} {'KiB/conn':>9} {'PSS KiB/c':>9} {'fill s':>7}")
            add(f"{'baton':14} {0:>6} {ws['idle']['rss_kib'] / 1024:>8.1f} {ws['idle']['pss_kib'] / 1024:>8.1f}")
            for level, r in ws["levels"].items():
                add(f"{'':14} {level:>6} {r['rss_kib'] / 1024:>8.1f} {r['pss_kib'] / 1024:>8.1f} "
                    f"{fmt(r['rss_kib_per_conn'], 2):>9} {fmt(r['pss_kib_per_conn'], 2):>9} {r['fill_s']:>7.1f}")
        add("")
        add("(f) one upgrade with the last level held: closes seen by the clients (ms after the signal), old")
        add("    workers gone, and the reconnects (each client reconnects as soon as it sees its close): how many")
        add("    were answered, failed (no answer within 10 s, refused, reset), the most connected (handshake")
        add("    done) and answered in any 100 ms, when the last was answered, and the listener's queue")
        add("    overflows the kernel counted meanwhile (ListenOverflows)")
        add(f"{'server':14} {'held':>6} {'FIN':>6} {'reset':>6} {'open':>5} {'1st close':>9} {'last cl':>8} "
            f"{'old gone':>9} {'answered':>8} {'failed':>7} {'conn/100ms':>10} {'answ/100ms':>10} {'last answ':>9} {'overflows':>9}")
        for n, f in f_rows:
            u = f.get("upgrade")
            if not u:
                continue
            add(f"{n:14} {u['held']:>6} {u['fin']:>6} {u['reset']:>6} {u['not_closed']:>5} "
                f"{fmt(u['first_close_ms'], 0):>9} {fmt(u['last_close_ms'], 0):>8} {fmt(u['old_gone_ms'], 0):>9} "
                f"{u['reconnects_answered']:>8} {sum(u['reconnect_failed'].values()):>7} "
                f"{u['reconnect_peak_per_100ms']:>10} {u['answered_peak_per_100ms']:>10} "
                f"{fmt(u['last_reconnect_answered_ms'], 0):>9} {u['kernel_counters']['ListenOverflows']:>9}")
    # Sections of scenarios that did not run (their last line is the column header) go.
    blocks = "\n".join(lines).split("\n\n")
    kept = [b for b in blocks if not b.splitlines()[-1].startswith(("server ", "variant "))]
    return "\n\n".join(kept + [goals(results)])


def goals(results):
    s = results["servers"]
    out = ["Goals (Baton):"]
    def line(ok, text):
        out.append(f"  [{'ok' if ok else 'MISS' if ok is False else '--'}] {text}")
    b = s.get("baton", {})
    if b.get("b"):
        failed = sum(b["b"][m]["errors"] for m in ("keepalive", "close"))
        line(failed == 0, f"zero failed requests across upgrades (keep-alive and close): {failed}")
    if b.get("a") and s.get("nginx", {}).get("a") and s.get("hyper", {}).get("a"):
        for mode in [m for m, _, _ in A_MODES if m in b["a"] and m in s["nginx"]["a"] and m in s["hyper"]["a"]]:
            xn = b["a"][mode]["rps"] / s["nginx"]["a"][mode]["rps"]
            xh = b["a"][mode]["rps"] / s["hyper"]["a"][mode]["rps"]
            line(xn >= 1.0 and xh >= 0.95, f"{mode} throughput {xn:.2f}x nginx (>= 1.0), {xh:.2f}x bare hyper (>= 0.95)")
    if b.get("c") and s.get("nginx", {}).get("c"):
        for mode in ("idle", "load"):
            mine = b["c"][mode]["new_answers_ms"]["median"]
            theirs = s["nginx"]["c"][mode]["new_answers_ms"]["median"]
            if mine is not None and theirs is not None:
                line(mine <= theirs, f"upgrade latency ({mode}) median {mine:.1f} ms vs nginx HUP {theirs:.1f} ms")
    if b.get("c_self"):
        c = b["c_self"]
        n = sum(c[m]["upgrades"] for m in ("idle", "load"))
        bad = sum(c[m]["failed"] + c[m]["pid_changes"] + c[m]["serving_changes"] + c[m]["version_mismatches"]
                  for m in ("idle", "load"))
        line(bad == 0, f"supervisor re-exec x{n}: same pid, serving generation and workers untouched, version "
                       f"follows the binary (violations: {bad})")
        errors = c["load"].get("errors")
        line(errors == 0, f"zero failed requests across supervisor re-execs under load: {errors}")
        grew = c["load"]["fds_after"] - c["idle"]["fds_after"]
        line(grew <= 0, f"no fd growth over the second {c['load']['upgrades']} re-execs: "
                        f"{c['idle']['fds_after']} -> {c['load']['fds_after']}")
    if b.get("a") and b.get("b"):
        steady = b["a"]["keepalive"]["p99_ms"]
        during = b["b"]["keepalive"]["p99_ms"]
        if steady and during:
            line(during <= 1.5 * steady, f"p99 during upgrades {during:.2f} ms <= 1.5x steady p99 {steady:.2f} ms")
    g = s.get("go-tableflip", {})
    if b.get("a") and g.get("a"):
        for mode in ("keepalive", "close"):
            x = b["a"][mode]["rps"] / g["a"][mode]["rps"]
            line(x >= 1.0, f"{mode} throughput {x:.2f}x go-tableflip (>= 1.0)")
    if b.get("b") and g.get("b"):
        theirs = sum(g["b"][m]["errors"] for m in ("keepalive", "close"))
        mine = sum(b["b"][m]["errors"] for m in ("keepalive", "close"))
        line(mine <= theirs, f"failed requests across upgrades {mine} vs go-tableflip {theirs}")
    if b.get("c") and g.get("c"):
        for mode in ("idle", "load"):
            mine = b["c"][mode]["new_answers_ms"]["median"]
            theirs = g["c"][mode]["new_answers_ms"]["median"]
            if mine is not None and theirs is not None:
                line(mine <= theirs, f"upgrade latency ({mode}) median {mine:.1f} ms vs go-tableflip {theirs:.1f} ms")
    if b.get("e"):
        for other in ("nginx", "haproxy", "go-tableflip"):
            if s.get(other, {}).get("e"):
                x = b["e"]["requests"] / max(1, s[other]["e"]["requests"])
                line(x >= 1.0, f"(e) requests at 10,000 connections {x:.2f}x {other} (>= 1.0); "
                               f"failed {b['e']['errors']} vs {s[other]['e']['errors']}")
    if b.get("f"):
        f = b["f"]
        top = list(f["levels"])[-1]
        mine = f["levels"][top]["rss_kib_per_conn"]
        line(mine is not None and mine <= 2.0, f"(f) memory per idle connection at {top}: {fmt(mine, 2)} KiB (<= 2)")
        for other in ("nginx", "go-tableflip"):
            o = s.get(other, {}).get("f")
            if o and top in o["levels"]:
                theirs = o["levels"][top]
                line(mine is not None and mine <= theirs["all_rss_kib_per_conn"],
                     f"(f) {fmt(mine, 2)} KiB per connection vs {other} {fmt(theirs['rss_kib_per_conn'], 2)} "
                     f"marginal, {fmt(theirs['all_rss_kib_per_conn'], 2)} with what it preallocates")
        for kind, what in (("ws", "WebSocket"), ("h2", "HTTP/2 connection")):
            idle = b.get(f"f_{kind}")
            if idle:
                top_idle = list(idle["levels"])[-1]
                per = idle["levels"][top_idle]["rss_kib_per_conn"]
                line(per is not None and per <= 2.0,
                     f"(f) memory per idle {what} at {top_idle}: {fmt(per, 2)} KiB (<= 2)")
        u = f.get("upgrade")
        if u:
            line(u["fin"] == u["held"] and u["reset"] == 0,
                 f"(f) upgrade at {u['held']}: {u['fin']} closed with a FIN, {u['reset']} reset, {u['not_closed']} not closed")
            limit = u["grace_ms"] + 500
            line(u["old_gone_ms"] is not None and u["old_gone_ms"] <= limit,
                 f"(f) old generation gone after {fmt(u['old_gone_ms'], 0)} ms (<= drain_idle_grace + 500 ms = {limit})")
            failed = sum(u["reconnect_failed"].values())
            line(failed == 0, f"(f) reconnects failed: {failed} of {u['reconnects']} "
                              f"(peak {u['reconnect_peak_per_100ms']} new connections per 100 ms)")
    if b.get("d"):
        procs = b["d"]["idle"]["processes"]
        sup = procs[0]["rss_kib"] / 1024
        line(sup <= 4.0, f"supervisor RSS {sup:.1f} MiB <= 4 MiB")
        if len(procs) > 1 and s.get("nginx", {}).get("d"):
            mine = (procs[0]["rss_kib"] + procs[1]["rss_kib"]) / 1024
            theirs = s["nginx"]["d"]["idle"]["rss_kib"] / 1024
            line(mine <= theirs, f"supervisor + one idle worker {mine:.1f} MiB <= nginx master + 2 workers {theirs:.1f} MiB")
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (about 3 minutes)")
    parser.add_argument("--json", default=None, help="where to write the results (default: target/bench/results.json)")
    parser.add_argument("--only", default="a,b,c,d,e,f", help="scenarios to run, e.g. a,c")
    parser.add_argument("--servers", default="hyper,baton,baton-metrics,baton-log-combined,"
                        "nginx,nginx-log,nginx-binary,haproxy,go-tableflip")
    parser.add_argument("--no-build", action="store_true", help="use the release binaries as they are")
    parser.add_argument("--conns", default="1000,5000,15000",
                        help="(f): levels of idle connections measured; the upgrade happens at the last")
    args = parser.parse_args()
    only = set(args.only.split(","))
    q = args.quick
    levels = sorted(int(x) for x in args.conns.split(","))
    plan = {
        "a_seconds": 2, "a_turns": 2 if q else 10,
        "b_seconds": 8 if q else 30, "c_upgrades": 10 if q else 50, "c_self_upgrades": 5 if q else 20,
        "d_connections": 1000, "e_connections": 10000, "e_upgrades": 5, "e_turns": 1 if q else 3,
        "f_levels": levels,
    }
    SCENARIO_CONNS["f"] = levels[-1]

    ensure_tools()
    if not args.no_build:
        build()
    raise_fd_limit()
    started = time.time()
    results = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "quick": q, "plan": plan,
        "machine": {"cores": os.cpu_count(), "kernel": os.uname().release, "fd_limit": fd_budget(),
                    "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "versions": {"nginx": version_of(["nginx", "-v"]), "haproxy": version_of(["haproxy", "-v"]),
                     "wrk": version_of(["wrk", "-v"]),
                     "baton": version_of([os.path.join(RELEASE, "baton"), "--version"])},
        "servers": {},
    }
    names = args.servers.split(",")
    for n in names:
        results["servers"][n] = {}

    def start_all(names, key, wanted, up):
        """Starts every server `wanted(name, class)` says, set up for scenario `key`, into
        `up` (so that the caller stops those that started if a later one fails)."""
        for n, cls in servers_for(names):
            if wanted(n, cls):
                server = cls()
                server.conns = SCENARIO_CONNS[key]
                up.append(server)
                server.start()

    def with_server(cls, fn, key):
        server = cls()
        server.conns = SCENARIO_CONNS[key]
        server.start()
        try:
            return fn(server)
        finally:
            server.stop()

    # (a): every server up at once, taking turns (nginx-binary is nginx in steady state).
    if "a" in only:
        up = []
        try:
            start_all(names, "a", lambda n, cls: n != "nginx-binary", up)
            log(f"(a) {plan['a_turns']} turns of {plan['a_seconds']} s per server and mode")
            for n, r in scenario_a(up, plan["a_turns"], plan["a_seconds"]).items():
                results["servers"][n]["a"] = r
        finally:
            for server in up:
                server.stop()
    for key, fn in (("b", lambda s: scenario_b(s, plan["b_seconds"])),
                    ("c", lambda s: scenario_c(s, plan["c_upgrades"])),
                    ("d", lambda s: scenario_d(s, plan["d_connections"])),
                    ("f", lambda s: scenario_f(s, plan["f_levels"], upgrade=s.upgrade_kind is not None))):
        if key not in only:
            continue
        for n, cls in servers_for(names):
            if n in VARIANTS:
                continue  # measured in (a) only
            if key not in ("d", "f") and cls is Bare:
                continue  # the bare server cannot be upgraded
            if key == "d" and n == "nginx-binary":
                continue
            if key == "f" and n not in F_SERVERS:
                continue
            log(f"({key}) {n}")
            results["servers"][n][key] = with_server(cls, fn, key)
            if key == "f" and n == "baton":
                for kind in F_IDLE_KINDS:
                    log(f"(f) baton: idle {kind} connections")
                    results["servers"][n][f"f_{kind}"] = f_baton_idle(kind, plan["f_levels"])
        if key == "c":
            # The supervisor upgrading itself: Baton's re-exec next to nginx's binary upgrade.
            for n, cls in servers_for(names):
                if n not in ("baton", "nginx-binary"):
                    continue
                log(f"(c) {n}: supervisor upgrade in place, {plan['c_self_upgrades']} times idle and under load")
                results["servers"][n]["c_self"] = with_server(
                    (lambda: Baton(own_binary=True)) if n == "baton" else cls,
                    lambda s: scenario_c_self(s, plan["c_self_upgrades"]), "c_self")
    # (e): every server up at once, taking turns (see scenario_e_turns).
    if "e" in only:
        up = []
        try:
            start_all(names, "e", lambda n, cls: n not in VARIANTS and cls is not Bare, up)
            log(f"(e) {plan['e_turns']} turns per server")
            for n, r in scenario_e_turns(up, plan["e_connections"], plan["e_upgrades"],
                                         plan["e_turns"]).items():
                results["servers"][n]["e"] = r
        finally:
            for server in up:
                server.stop()
    results["seconds"] = round(time.time() - started)

    table = report(results, q)
    print(table)
    path = args.json or os.path.join(ROOT, "target", "bench", "results.json")
    write_results(results, path)
    log(f"results in {path}; the run took {results['seconds']} s")


if __name__ == "__main__":
    main()
