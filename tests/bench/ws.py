#!/usr/bin/env python3
"""WebSocket echo: Baton (the C test plugin's echo route) against a bare tokio-tungstenite
server on the same crate (the ceiling) and Go's gorilla/websocket, side by side.

    python3 tests/bench/ws.py [--quick] [--connections N] [--json PATH]

For each server, in turns: the worker's memory per idle WebSocket (RSS with N idle
clients minus RSS with none, over N), then N clients each echoing 32-byte text messages
one at a time for the run's seconds: messages per second and the latency p50/p99/max
that `baton-ws-bench` measured. Installs golang-go and golang-github-gorilla-websocket-dev
from Debian's packages if `go` is missing; builds Baton in release mode. Loopback only,
every step bounded in time.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wscommon import RELEASE, ROOT, build_baton_and_plugin, free_port, wait_port, rss_kib, children, logger

log = logger("ws-bench")


def build(tmp):
    log("building Baton (release), the bare server and the load generator")
    plugins = build_baton_and_plugin(tmp)
    if shutil.which("go") is None:
        log("installing golang-go and golang-github-gorilla-websocket-dev")
        subprocess.run(["apt-get", "install", "-y", "-q", "golang-go",
                        "golang-github-gorilla-websocket-dev"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
    go = os.path.join(tmp, "ws-echo-go")
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode",
               GOCACHE=os.path.join(tmp, "gocache"))
    subprocess.run(["go", "build", "-o", go, os.path.join(ROOT, "tests/bench/ws_echo.go")],
                   check=True, timeout=600, env=env)
    return plugins, go


class Server:
    def __init__(self, name, argv, url, serving_pids, cwd=None):
        self.name, self.argv, self.url, self.serving_pids, self.cwd = (
            name, argv, url, serving_pids, cwd)
        self.proc = None

    def __enter__(self):
        self.proc = subprocess.Popen(PIN_SERVER + self.argv, cwd=self.cwd, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        wait_port(int(self.url.split(":")[2].split("/")[0]))
        time.sleep(0.5)
        return self

    def pids(self):
        return self.serving_pids(self.proc.pid)

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def idle_memory(server, connections):
    before = rss_kib(server.pids())
    hold = subprocess.Popen([os.path.join(RELEASE, "baton-ws-bench"), server.url,
                             str(connections), "hold"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = hold.stdout.readline().split()
        if not line or line[0] != "ready" or int(line[1]) != connections:
            raise RuntimeError(f"{server.name}: holding {connections} clients failed: {line}")
        time.sleep(1.0)
        after = rss_kib(server.pids())
    finally:
        hold.stdin.close()
        hold.wait(timeout=60)
    return before, after


# With --pin, servers run on CPU 0 and the load generator on CPU 1, so that the client's
# own work does not compete with the server it measures (each server gets the same core).
PIN_SERVER = []
PIN_CLIENT = []


def echo(server, connections, seconds):
    out = subprocess.run(PIN_CLIENT + [os.path.join(RELEASE, "baton-ws-bench"), server.url, str(connections),
                          str(seconds), "32"], capture_output=True, text=True,
                         timeout=seconds + 120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--json")
    ap.add_argument("--pin", action="store_true",
                    help="servers on CPU 0, the load generator on CPU 1 (taskset)")
    args = ap.parse_args()
    if args.pin:
        PIN_SERVER[:] = ["taskset", "-c", "0"]
        PIN_CLIENT[:] = ["taskset", "-c", "1"]
    seconds = 3 if args.quick else 10
    turns = 1 if args.quick else 3
    tmp = tempfile.mkdtemp(prefix="baton-ws-bench.")
    plugins, go = build(tmp)

    port = free_port()
    config = os.path.join(tmp, "baton.toml")
    with open(config, "w") as f:
        f.write(f"""[[listener]]
name = "http"
address = "127.0.0.1:{port}"

[http]
max_connections = {args.connections + 100}

[worker]
path = "{RELEASE}/baton-worker"
processes = 1

[plugins]
dir = "{plugins}"
cache_dir = "{tmp}/cache"
""")
    servers = [
        ("baton", lambda p: Server("baton", [os.path.join(RELEASE, "baton"), "run", "-c", config],
                                   f"ws://127.0.0.1:{port}/ws/echo", children, tmp)),
        ("bare tungstenite", lambda p: Server(
            "bare tungstenite", [os.path.join(RELEASE, "baton-bare-ws"), f"127.0.0.1:{p}", "2"],
            f"ws://127.0.0.1:{p}/", lambda pid: [pid])),
        ("go gorilla", lambda p: Server("go gorilla", [go, f"127.0.0.1:{p}"],
                                        f"ws://127.0.0.1:{p}/", lambda pid: [pid])),
    ]
    results = {name: {"runs": []} for name, _ in servers}
    for turn in range(turns):
        for name, make in servers:
            with make(free_port()) as server:
                if turn == 0:
                    before, after = idle_memory(server, args.connections)
                    results[name]["idle_rss_kib"] = [before, after]
                    results[name]["bytes_per_idle_ws"] = (after - before) * 1024 // args.connections
                    log(f"{name}: idle {args.connections} WebSockets: RSS {before} -> {after} KiB")
                r = echo(server, args.connections, seconds)
                log(f"{name}: turn {turn + 1}: {r}")
                results[name]["runs"].append(r)
    print(f"\nWebSocket echo, {args.connections} connections, 32-byte messages, "
          f"{turns} turn(s) of {seconds} s per server")
    print(f"{'server':<18}{'msg/s':>10}{'p50 us':>9}{'p99 us':>9}{'max us':>9}{'errors':>8}"
          f"{'B/idle WS':>11}")
    for name, r in results.items():
        runs = r["runs"]
        best = max(runs, key=lambda x: x["per_second"])
        rate = sum(x["per_second"] for x in runs) / len(runs)
        p99 = sorted(x["p99_us"] for x in runs)[len(runs) // 2]
        print(f"{name:<18}{rate:>10.0f}{best['p50_us']:>9}{p99:>9}"
              f"{max(x['max_us'] for x in runs):>9}{sum(x['errors'] for x in runs):>8}"
              f"{r['bytes_per_idle_ws']:>11}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
