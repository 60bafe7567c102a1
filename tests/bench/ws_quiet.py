#!/usr/bin/env python3
"""Quiet WebSockets across an upgrade, with a client nobody here wrote (aiohttp).

    python3 tests/bench/ws_quiet.py [--clients N] [--spread SECONDS]

Starts Baton (release build, one worker, the echo route of tests/harness/ws_plugin.c,
`worker.drain_spread` of --spread seconds), opens N aiohttp WebSocket clients that each
exchange one message and then stay quiet (aiohttp answers pings and close frames itself),
and waits until every one waits in the worker's idle set (`idle` in `baton status --json`).
Then `baton upgrade --wait`: every client should get a close frame 1012 at its own place in
the spread, reconnect, be answered by the new generation and go quiet there too. Prints the
worker's memory per quiet WebSocket, the close codes, when the closes came (deciles, seconds
after the upgrade began), the reconnects, and the new generation's idle count. Loopback only;
every wait is bounded. Installs aiohttp with pip into target/bench/aiohttp-venv if the
running Python lacks it.
"""

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from wscommon import (RELEASE, ROOT, build_baton_and_plugin, free_port, wait_port, rss_kib, logger,
                      write_baton_config)

log = logger("ws-quiet")


def ensure_aiohttp():
    """Runs this script again in a virtualenv with aiohttp if this Python has none."""
    try:
        import aiohttp  # noqa: F401
        return
    except ImportError:
        pass
    venv = os.path.join(ROOT, "target", "bench", "aiohttp-venv")
    python = os.path.join(venv, "bin", "python")
    if not os.path.exists(python):
        log("installing aiohttp into " + venv)
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
        subprocess.run([python, "-m", "pip", "install", "--quiet", "aiohttp"], check=True, timeout=900)
    os.execv(python, [python, *sys.argv])


class Baton:
    def __init__(self, tmp, plugins, spread):
        self.port = free_port()
        control = os.path.join(tmp, "control")
        os.makedirs(control, mode=0o700)
        self.config = os.path.join(tmp, "baton.toml")
        write_baton_config(self.config, self.port, plugins, 18000, f"{spread}s",
                           extra=f'[control]\nsocket = "{control}/baton.sock"\n')
        self.proc = subprocess.Popen([os.path.join(RELEASE, "baton"), "run", "-c", self.config],
                                     env={**os.environ, "BATON_LOG": "warn"})
        wait_port(self.port)

    def cli(self, *args, timeout=60):
        return subprocess.run([os.path.join(RELEASE, "baton"), *args, "-c", self.config],
                              capture_output=True, text=True, timeout=timeout)

    def generation(self, number):
        status = json.loads(self.cli("status", "--json").stdout)
        return next((g for g in status["generations"] if g["number"] == number), None)

    def stop(self):
        self.cli("stop", "--wait", timeout=60)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def quiet_client(session, url, out, upgraded):
    """One client: an exchange, quiet until the server closes it, then the same again."""
    import aiohttp
    ws = await session.ws_connect(url)
    await ws.send_str("whoami")
    first = await asyncio.wait_for(ws.receive(), 30)
    if first.data != "gen=1":
        raise RuntimeError(f"first answer {first!r}")
    out["ready"] += 1
    while True:
        m = await asyncio.wait_for(ws.receive(), 120)
        if m.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
            break
        if m.type == aiohttp.WSMsgType.ERROR:
            out["errors"] += 1
            break
    await ws.close()
    out["codes"][ws.close_code] = out["codes"].get(ws.close_code, 0) + 1
    out["closes"].append(time.monotonic() - upgraded[0])
    try:
        again = await session.ws_connect(url)
        await again.send_str("whoami")
        m = await asyncio.wait_for(again.receive(), 30)
        out["answers"][m.data] = out["answers"].get(m.data, 0) + 1
        out["again"].append(again)
    except (OSError, asyncio.TimeoutError, aiohttp.ClientError) as e:
        out["reconnect_failed"] += 1
        log(f"reconnect failed: {e!r}")


async def poll_until(check, within):
    """Polls `check` (in a thread) until it holds or `within` seconds passed; its last value."""
    deadline = time.monotonic() + within
    while True:
        got = await asyncio.to_thread(check)
        if got or time.monotonic() > deadline:
            return got
        await asyncio.sleep(0.2)


async def run(baton, clients):
    import aiohttp
    url = f"ws://127.0.0.1:{baton.port}/ws/echo"
    out = {"ready": 0, "errors": 0, "codes": {}, "closes": [], "answers": {}, "again": [],
           "reconnect_failed": 0}
    upgraded = [0.0]
    before = rss_kib(baton.generation(1)["pids"])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        tasks = []
        for i in range(clients):
            tasks.append(asyncio.create_task(quiet_client(session, url, out, upgraded)))
            if i % 200 == 199:
                await asyncio.sleep(0.05)
        if not await poll_until(lambda: out["ready"] == clients, 120):
            raise RuntimeError(f"only {out['ready']} of {clients} clients connected")
        idle = lambda: baton.generation(1)["idle"] == clients  # noqa: E731
        if not await poll_until(idle, 30):
            raise RuntimeError(f"not all quiet: {baton.generation(1)}")
        await asyncio.sleep(1.5)  # past the worker's 1 s tick (the allocator's trim)
        pids = baton.generation(1)["pids"]
        held = rss_kib(pids)
        log(f"{clients} quiet WebSockets in the idle set; worker {before} -> {held} KiB RSS, "
            f"{(held - before) / clients:.2f} KiB each")
        upgraded[0] = time.monotonic()
        r = await asyncio.to_thread(baton.cli, "upgrade", "--wait")
        log(f"upgrade: {r.stdout.strip()} (exit {r.returncode})")
        await asyncio.wait_for(asyncio.gather(*tasks), 180)
        closes = sorted(out["closes"])
        deciles = [round(closes[len(closes) * k // 10], 2) for k in range(1, 10)]
        gen2 = lambda: (baton.generation(2) or {}).get("idle") == clients  # noqa: E731
        parked_again = await poll_until(gen2, 30)
        result = {
            "clients": clients, "kib_per_quiet_ws": round((held - before) / clients, 2),
            "close_codes": out["codes"], "errors": out["errors"],
            "first_close_s": round(closes[0], 2), "last_close_s": round(closes[-1], 2),
            "close_deciles_s": deciles, "reconnect_answers": out["answers"],
            "reconnect_failed": out["reconnect_failed"],
            "generation_2": baton.generation(2), "all_quiet_again": bool(parked_again),
        }
        for ws in out["again"]:
            await ws.close()
        return result


def main():
    ensure_aiohttp()
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=3000)
    ap.add_argument("--spread", type=float, default=3.0)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="baton-ws-quiet.")
    baton = None
    try:
        log("building Baton (release) and the test plugin")
        plugins = build_baton_and_plugin(tmp)
        baton = Baton(tmp, plugins, args.spread)
        r = asyncio.run(run(baton, args.clients))
        g2 = r.pop("generation_2") or {}
        print(f"quiet WebSockets (aiohttp), {r['clients']} clients, drain_spread {args.spread} s")
        print(f"  worker memory per quiet WebSocket: {r['kib_per_quiet_ws']} KiB")
        print(f"  close codes at the upgrade: {r['close_codes']}, errors {r['errors']}")
        print(f"  closes from {r['first_close_s']} s to {r['last_close_s']} s after the upgrade began; "
              f"deciles {r['close_deciles_s']}")
        print(f"  reconnects answered by: {r['reconnect_answers']}, failed {r['reconnect_failed']}")
        print(f"  generation 2: {g2.get('websockets')} WebSockets, {g2.get('idle')} idle "
              f"(all quiet again: {r['all_quiet_again']})")
        ok = (r["close_codes"] == {1012: r["clients"]} and r["errors"] == 0
              and r["reconnect_failed"] == 0 and r["all_quiet_again"])
        return 0 if ok else 1
    finally:
        if baton:
            baton.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
