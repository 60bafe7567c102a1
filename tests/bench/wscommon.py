"""What the WebSocket benchmarks (ws.py, ws_upgrade.py) share: where things are, the build
of Baton and the C test plugin, ports, and the memory of processes. Nothing here starts or
stops a server."""

import os
import socket
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
RELEASE = os.path.join(ROOT, "target", "release")


def build_baton_and_plugin(tmp):
    """Builds Baton, its worker and the test binaries in release mode, and the WebSocket
    test plugin (tests/harness/ws_plugin.c) into TMP/plugins (both directories 0755, so
    that workers reach them); returns that directory."""
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "baton", "-p", "baton-worker",
                    "-p", "baton-tests", "--bins"], cwd=ROOT, check=True, timeout=1800)
    plugins = os.path.join(tmp, "plugins")
    os.makedirs(plugins, mode=0o755)
    os.chmod(tmp, 0o755)
    os.chmod(plugins, 0o755)
    subprocess.run(["cc", "-std=c11", "-O2", "-fPIC", "-shared", "-I",
                    os.path.join(ROOT, "plugins/api/include"),
                    os.path.join(ROOT, "tests/harness/ws_plugin.c"),
                    "-o", os.path.join(plugins, "ws_test.so")], check=True, timeout=120)
    return plugins


def write_baton_config(path, port, plugins, max_connections, drain_spread, extra=""):
    """A Baton config at `path`: one listener on 127.0.0.1:`port`, one worker process of the
    release build, the plugins in `plugins`, `drain_spread` (a duration), and `extra` lines
    (more tables) at the end."""
    with open(path, "w") as f:
        f.write(f"""[[listener]]
name = "http"
address = "127.0.0.1:{port}"

[http]
max_connections = {max_connections}

[worker]
path = "{RELEASE}/baton-worker"
processes = 1
drain_spread = "{drain_spread}"

[plugins]
dir = "{plugins}"
{extra}""")


def logger(prefix):
    """A function that prints `[prefix HH:MM:SS] message` to stderr."""
    def log(msg):
        print(f"[{prefix} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
    return log


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, within=20.0):
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {within}s")


def rss_kib(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]
