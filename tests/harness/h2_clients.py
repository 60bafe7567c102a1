"""HTTP/2 clients of httpx (with Python's h2) for the end-to-end tests: CLIENTS clients,
each on one connection with prior knowledge (h2c), each sending ROUNDS GETs of URL with
PAUSE seconds between them. Prints one JSON line: answers, errors (their text, at most
five) and the HTTP versions seen. Every request has a 10 s timeout, so it ends by itself.

Usage: python h2_clients.py URL CLIENTS ROUNDS PAUSE
"""
import json
import sys
import threading
import time

import httpx


def main():
    url, clients, rounds, pause = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    lock = threading.Lock()
    seen = {"answers": 0, "errors": [], "versions": set(), "statuses": set()}

    def client():
        with httpx.Client(http1=False, http2=True, timeout=10) as c:
            for i in range(rounds):
                if i:
                    time.sleep(pause)
                try:
                    r = c.get(url)
                    with lock:
                        seen["answers"] += 1
                        seen["versions"].add(r.http_version)
                        seen["statuses"].add(r.status_code)
                except Exception as e:  # noqa: BLE001 - every failure is reported
                    with lock:
                        seen["errors"].append(repr(e))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"answers": seen["answers"], "errors": seen["errors"][:5],
                      "error_count": len(seen["errors"]), "versions": sorted(seen["versions"]),
                      "statuses": sorted(seen["statuses"])}))


if __name__ == "__main__":
    main()
