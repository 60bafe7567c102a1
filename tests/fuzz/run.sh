#!/bin/sh
# Runs every fuzz target for SECONDS each (default 60), one after another:
#   tests/fuzz/run.sh [SECONDS] [TARGET...]
# Coverage-guided (libFuzzer through cargo-fuzz) on stable Rust, without a sanitizer.
# New inputs go to tests/fuzz/corpus/<target>/ (not committed; tests/fuzz/seeds/ is),
# crashes to tests/fuzz/artifacts/<target>/. Reproduce one with
#   cargo fuzz run --fuzz-dir tests/fuzz --sanitizer none <target> <file>
set -eu
secs=${1:-60}
[ $# -gt 0 ] && shift
targets=${*:-config notify control http}
cd "$(dirname "$0")"
command -v c++ >/dev/null || apt-get install -y g++
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
host=$(rustc -vV | sed -n 's/^host: //p')
# The http target serves through the example plugins (built normally, not instrumented).
(cd ../.. && cargo build --release -p baton-echo -p baton-hello)
BATON_FUZZ_PLUGINS="$PWD/../../target/release/libbaton_echo.so:$PWD/../../target/release/libbaton_hello.so"
export BATON_FUZZ_PLUGINS
for t in $targets; do
    mkdir -p "corpus/$t"
    echo "== $t: $secs s"
    cargo fuzz run --fuzz-dir . --sanitizer none --target "$host" "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$secs" -max_len=65536 -timeout=20 -rss_limit_mb=2048 -print_final_stats=1
done
