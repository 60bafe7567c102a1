#!/usr/bin/env bash
# RFC 6455 conformance of Baton's WebSocket routes, as the Autobahn test suite's fuzzing
# client checks it: every case but the compression ones (12.*, 13.*), against the echo
# route of tests/harness/ws_plugin.c served by a real `baton` from target/debug.
#
# Needs `wstest` (pip's autobahntestsuite 0.8.2, which runs on Python 2.7 only; pyenv:
# PYENV_VERSION=2.7.18 python -m pip install autobahntestsuite==0.8.2). Not part of CI.
# Prints one line per case that is not OK or INFORMATIONAL, then the counts; exits
# non-zero if any case failed. Reports: $OUT/reports/index.html.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
port=${PORT:-9001}
OUT=${OUT:-$(mktemp -d /tmp/baton-autobahn.XXXXXX)}
chmod 755 "$OUT"
mkdir -p "$OUT/plugins" && chmod 755 "$OUT/plugins"
cargo build --quiet -p baton -p baton-worker --manifest-path "$root/Cargo.toml"
cc -std=c11 -O1 -fPIC -shared -Wall -Werror -I "$root/plugins/api/include" \
    "$root/tests/harness/ws_plugin.c" -o "$OUT/plugins/ws_test.so"
cat > "$OUT/baton.toml" <<TOML
[[listener]]
name = "http"
address = "127.0.0.1:$port"

[worker]
path = "$root/target/debug/baton-worker"
processes = 1

[websocket]
# Case 9.* sends messages of up to 16 MiB.
max_message_bytes = "64MiB"
send_queue_bytes = "128MiB"

[plugins]
dir = "$OUT/plugins"
cache_dir = "$OUT/cache"
TOML
cat > "$OUT/fuzzingclient.json" <<JSON
{
  "outdir": "$OUT/reports",
  "servers": [{"agent": "baton", "url": "ws://127.0.0.1:$port/ws/echo"}],
  "cases": ["*"],
  "exclude-cases": ["12.*", "13.*"],
  "exclude-agent-cases": {}
}
JSON
"$root/target/debug/baton" run -c "$OUT/baton.toml" > "$OUT/baton.log" 2>&1 &
baton=$!
trap 'kill -TERM $baton 2>/dev/null; wait $baton 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/_baton/health" > /dev/null && break
    sleep 0.1
done
(cd "$OUT" && wstest -m fuzzingclient -s "$OUT/fuzzingclient.json" > "$OUT/wstest.log" 2>&1)
python3 - "$OUT/reports/index.json" <<'PY'
import collections, json, sys
cases = json.load(open(sys.argv[1]))["baton"]
good = ("OK", "INFORMATIONAL", "NON-STRICT")
counts = collections.Counter(v["behavior"] for v in cases.values())
bad = 0
for case, v in sorted(cases.items(), key=lambda kv: [int(x) for x in kv[0].split(".")]):
    if v["behavior"] != "OK" and v["behavior"] != "INFORMATIONAL" or v["behaviorClose"] not in good:
        print(case, v["behavior"], v["behaviorClose"])
    bad += v["behavior"] not in good or v["behaviorClose"] not in good
print(f"{len(cases)} cases: {dict(counts)}")
sys.exit(1 if bad else 0)
PY
