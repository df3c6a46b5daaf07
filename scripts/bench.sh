#!/usr/bin/env bash
# The figures of docs/BENCHMARKS.md "Over HTTP, from outside": `atls serve`
# (release build) loaded by `atls bench` on this machine, each ATLS workload
# beside the same workload on `atls serve --plain` (the same application
# and access log, without ATLS) or, for new sessions, `--plain-https` (new
# HTTPS connections, same engine and certificate) in the same run. The
# server issues no tickets (--no-resumption), as the baseline does not.
# Server CPU per operation from /proc/PID/stat; memory per session from
# /proc/PID/status.
# Usage: scripts/bench.sh [RUNS] [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
secs=${2:-3}
# Logging each request costs about 12 µs (docs/BENCHMARKS.md): the
# figures are taken without it.
export RUST_LOG=warn
cargo build --release -q -p atls-cli
atls=target/release/atls
state=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$state"' EXIT
# Start `atls serve` on ENGINE; sets $pid.
start() {
  "$atls" serve --engine "$1" --http 127.0.0.1:18480 --plain 127.0.0.1:18481 --plain-https 127.0.0.1:18482 \
    --max-half-open 20000 --max-half-open-per-client 0 --max-sessions 20000 --no-resumption \
    --state-dir "$state" >"$state/serve.out" 2>/dev/null &
  pid=$!
  for _ in $(seq 100); do grep -q "HTTPS without" "$state/serve.out" 2>/dev/null && break; sleep 0.1; done
  grep -q "HTTPS without" "$state/serve.out" || { echo "bench.sh: atls serve did not start" >&2; exit 1; }
}
stop() { kill "$pid"; wait "$pid" 2>/dev/null || true; }
for engine in openssl rustls; do
  start "$engine"
  for run in $(seq "$runs"); do
    for spec in "request 8 oscore" "request 8 cose" "request 8 records" "request 1 oscore" \
                "session 4 oscore" "session 4 records"; do
      set -- $spec
      # Requests against plain HTTP; new sessions against new HTTPS
      # connections with the same engine and certificate.
      baseline=http://127.0.0.1:18481
      [ "$1" = session ] && baseline=https://127.0.0.1:18482
      "$atls" bench http://127.0.0.1:18480 --ca "$state/ca.pem" --server-pid "$pid" \
        --baseline "$baseline" --workload "$1" -c "$2" --mode "$3" \
        --duration "$secs" --json --no-progress |
        sed "s/^{/{\"server_engine\":\"$engine\",\"run\":$run,\"clients\":$2,/"
    done
  done
  stop
  # Memory: the resident growth per session kept, each measurement in a
  # fresh server (memory freed by earlier work would be reused and hide it).
  for run in $(seq "$runs"); do
    for spec in "hold oscore" "hold records" "half-open oscore"; do
      set -- $spec
      start "$engine"
      "$atls" bench http://127.0.0.1:18480 --ca "$state/ca.pem" --server-pid "$pid" \
        --workload "$1" --mode "$2" -n 10000 -c 8 --json |
        sed "s/^{/{\"server_engine\":\"$engine\",\"run\":$run,/"
      stop
    done
  done
done
