#!/usr/bin/env python3
"""WebSockets across upgrades: Baton against Go's fork+exec pattern (cloudflare/tableflip),
side by side in one run.

    python3 tests/bench/ws_upgrade.py [--quick] [--connections N] [--upgrades K] [--json PATH]

For each server in turn, N clients (`baton-ws-churn`, tests/harness/ws_churn.rs) echo
32-byte messages continuously (a 100 ms pause after each echo), reconnect at once when
their connection ends and classify every end: a close frame with its code (clean) or an
abnormal end (reset, EOF without a close frame, a socket error: a browser's 1006). Then
K upgrades, one every --interval seconds: Baton by `baton upgrade --wait` (its draining
generation closes WebSockets with 1012 spread over `worker.drain_spread`, 5 s), tableflip by
SIGHUP to the process in its PID file (tests/bench/ws_tableflip.go, written as tableflip's
example: the old process runs `server.Shutdown` and exits, which cuts the WebSockets that
net/http does not track; and, as a second server, the careful user: every WebSocket gets a
1001 close at once and the old process waits for them). Per server and upgrade: abnormal
closes, clean closes, failed reconnect attempts, and the peak of reconnects per second
(over any 1 s window, and the busiest 100 ms bucket times 10) after the upgrade, i.e. on
the new generation.

Installs golang-go, golang-github-gorilla-websocket-dev and
golang-github-cloudflare-tableflip-dev from Debian's packages if missing and builds the Go
server offline from them; builds Baton in release mode. Loopback only; every step is
bounded in time; the servers started here are stopped by their PID.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wscommon import RELEASE, ROOT, build_baton_and_plugin, free_port, wait_port, logger, write_baton_config

log = logger("ws-upgrade")

TABLEFLIP_SRC = "/usr/share/gocode/src/github.com/cloudflare/tableflip"
GORILLA_SRC = "/usr/share/gocode/src/github.com/gorilla/websocket"


def build(tmp):
    log("building Baton (release) and the load generator")
    plugins = build_baton_and_plugin(tmp)
    missing = [pkg for pkg, present in [
        ("golang-go", shutil.which("go")),
        ("golang-github-gorilla-websocket-dev", os.path.isdir(GORILLA_SRC)),
        ("golang-github-cloudflare-tableflip-dev", os.path.isdir(TABLEFLIP_SRC))] if not present]
    if missing:
        log(f"installing {' '.join(missing)}")
        subprocess.run(["apt-get", "install", "-y", "-q", *missing], check=True, timeout=600,
                       stdout=subprocess.DEVNULL)
    go = os.path.join(tmp, "ws-tableflip")
    env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode",
               GOCACHE=os.path.join(tmp, "gocache"))
    subprocess.run(["go", "build", "-o", go, os.path.join(ROOT, "tests/bench/ws_tableflip.go")],
                   check=True, timeout=600, env=env)
    return plugins, go


class Baton:
    def __init__(self, tmp, plugins, connections):
        self.name = "baton"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws/echo"
        self.tmp = tmp
        self.config = os.path.join(tmp, "baton.toml")
        write_baton_config(self.config, self.port, plugins, 2 * connections + 100, "5s",
                           extra=f'cache_dir = "{tmp}/cache"\n')
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([os.path.join(RELEASE, "baton"), "run", "-c", self.config],
                                     cwd=self.tmp, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.tmp, "baton.log"), "w"))
        wait_port(self.port)
        time.sleep(0.5)

    def upgrade(self):
        subprocess.run([os.path.join(RELEASE, "baton"), "upgrade", "-c", self.config, "--wait",
                        "--timeout", "60s"], check=True, timeout=90,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Tableflip:
    def __init__(self, tmp, binary, ws_close):
        self.name = "tableflip" if ws_close == "none" else "tableflip+1001"
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/"
        self.tmp = tmp
        self.pidfile = os.path.join(tmp, f"tableflip-{ws_close}.pid")
        self.argv = [binary, "-listen", f"127.0.0.1:{self.port}", "-pid-file", self.pidfile,
                     "-ws-close", ws_close]
        self.proc = None
        self.started = []  # every PID of this server: the first, then each upgrade's

    def pid(self):
        try:
            with open(self.pidfile) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def start(self):
        self.proc = subprocess.Popen(self.argv, cwd=self.tmp, stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.tmp, self.name + ".log"), "w"))
        wait_port(self.port)
        deadline = time.time() + 20
        while self.pid() != self.proc.pid and time.time() < deadline:
            time.sleep(0.05)
        self.started.append(self.proc.pid)
        time.sleep(0.5)

    def upgrade(self):
        old = self.pid()
        os.kill(old, signal.SIGHUP)
        # The new process writes the PID file once it is ready (tableflip's Ready).
        deadline = time.time() + 60
        while self.pid() in (0, old):
            if time.time() > deadline:
                raise RuntimeError(f"{self.name}: no new process 60 s after SIGHUP to {old}")
            time.sleep(0.02)
        self.started.append(self.pid())

    def stop(self):
        # Only the processes of this server still running (a PID reused since is left alone).
        for pid in reversed(self.started):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[0].decode() != self.argv[0]:
                        continue
                os.kill(pid, signal.SIGTERM)
            except (OSError, ProcessLookupError):
                pass
        try:
            self.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def peak_per_second(buckets):
    """The most events in any 10 consecutive 100 ms buckets."""
    best = 0
    for i in range(len(buckets)):
        best = max(best, sum(buckets[i:i + 10]))
    return best


def run(server, connections, upgrades, interval, settle):
    log(f"{server.name}: starting, {connections} clients")
    server.start()
    churn = None
    try:
        max_seconds = int(upgrades * (interval + 5) + settle + 60)
        churn = subprocess.Popen([os.path.join(RELEASE, "baton-ws-churn"), server.url,
                                  str(connections), str(max_seconds)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        ready = churn.stdout.readline().split()
        if not ready or ready[0] != "ready" or int(ready[1]) != connections:
            raise RuntimeError(f"{server.name}: connecting {connections} clients failed: {ready}")
        t0 = float(ready[3])
        time.sleep(settle)
        marks = []
        for i in range(upgrades):
            began = time.time()
            server.upgrade()
            done = time.time()
            marks.append((began - t0, done - t0))
            log(f"{server.name}: upgrade {i + 1} took {done - began:.2f} s")
            time.sleep(max(0.0, interval - (time.time() - began)))
        time.sleep(settle)
        churn.stdin.close()
        churn.wait(timeout=60)
        out = churn.stdout.read()
        result = json.loads(out.strip().splitlines()[-1])
    finally:
        if churn and churn.poll() is None:
            churn.kill()
            churn.wait()
        server.stop()
    timeline = result.pop("timeline")
    per = []
    for i, (began, done) in enumerate(marks):
        lo = int(began * 10)
        hi = int(marks[i + 1][0] * 10) if i + 1 < len(marks) else len(timeline["reconnects"])
        window = {k: v[lo:hi] for k, v in timeline.items()}
        rec = window["reconnects"]
        nonzero = [j for j, n in enumerate(rec) if n]
        per.append({
            "upgrade_s": round(done - began, 3),
            "abnormal": sum(window["abnormal"]),
            "clean": sum(window["clean"]),
            "failed_attempts": sum(window["failed"]),
            "reconnects": sum(rec),
            "peak_reconnects_per_s": peak_per_second(rec),
            "peak_100ms_x10": 10 * max(rec, default=0),
            "reconnects_spread_s": round((nonzero[-1] - nonzero[0] + 1) / 10, 1) if nonzero else 0,
        })
        log(f"{server.name}: upgrade {i + 1}: {per[-1]}")
    result["upgrades"] = per
    result["timeline"] = timeline
    result["marks"] = marks
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--upgrades", type=int)
    ap.add_argument("--interval", type=float, default=10.0,
                    help="seconds from one upgrade's start to the next")
    ap.add_argument("--json")
    args = ap.parse_args()
    upgrades = args.upgrades or (2 if args.quick else 5)
    connections = 200 if args.quick and args.connections == 1000 else args.connections
    tmp = tempfile.mkdtemp(prefix="baton-ws-upgrade.")
    plugins, go = build(tmp)
    servers = [Baton(tmp, plugins, connections), Tableflip(tmp, go, "none"),
               Tableflip(tmp, go, "1001")]
    results = {}
    for server in servers:
        results[server.name] = run(server, connections, upgrades, args.interval, settle=3.0)

    print(f"\nWebSockets across upgrades: {connections} clients echoing, {upgrades} upgrades "
          f"{args.interval:g} s apart per server")
    print(f"{'server':<16}{'abnormal/upg':>13}{'clean/upg':>10}{'failed att':>11}"
          f"{'peak rec/s':>11}{'peak 100ms':>11}{'spread s':>9}{'upgrade s':>10}  close codes")
    for name, r in results.items():
        per = r["upgrades"]
        n = len(per)
        print(f"{name:<16}{sum(u['abnormal'] for u in per) / n:>13.1f}"
              f"{sum(u['clean'] for u in per) / n:>10.1f}"
              f"{sum(u['failed_attempts'] for u in per):>11}"
              f"{max(u['peak_reconnects_per_s'] for u in per):>11}"
              f"{max(u['peak_100ms_x10'] for u in per):>11}"
              f"{sum(u['reconnects_spread_s'] for u in per) / n:>9.1f}"
              f"{sum(u['upgrade_s'] for u in per) / n:>10.2f}"
              f"  {r['codes']} {r['abnormal_kinds'] or ''}")
    print("abnormal/upg: connections ended without a close frame per upgrade (goal 0); "
          "peak rec/s: the most reconnects in any 1 s after an upgrade; peak 100ms: the "
          "busiest 100 ms times 10; spread: first to last reconnect of an upgrade")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"connections": connections, "upgrades": upgrades,
                       "interval_s": args.interval, "servers": results}, f, indent=2)
    if not os.environ.get("BATON_BENCH_KEEP"):
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
