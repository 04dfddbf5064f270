#!/usr/bin/env bash
# HTTP ingest with Debian's wrk: ferry (202 after the durable commit) with 1 and 100 readings
# per request, against an axum handler that does no work (bench null_http), same tool, same
# machine, same run.
#
#   bench/http-vs-null.sh [SECS] [CONNECTIONS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; conns=${2:-256}
command -v wrk >/dev/null || { echo "wrk is not installed (apt-get install wrk)" >&2; exit 1; }
cargo build --release -q --bin ferry -p ferry-gateway
cargo build --release -q --bin null_http -p ferry-bench
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

printf 'wrk.method = "POST"\nwrk.path = "/v1/readings/bench/site-1/temp"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = "{\\"temp\\":21.5}"\n' > "$work/single.lua"
body=$(python3 -c 'import json; print(json.dumps([{"topic": f"bench/site-1/s{i}", "payload": {"temp": 21.5 + i / 10, "hum": 40}} for i in range(100)]))')
printf 'wrk.method = "POST"\nwrk.path = "/v1/readings"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [==[%s]==]\n' "$body" > "$work/batch.lua"
cp "$work/single.lua" "$work/null.lua"

start_ferry() {
    rm -rf "$work/data"
    FERRY_GATEWAY_DATA_DIR="$work/data" FERRY_HTTP_LISTEN=127.0.0.1:0 FERRY_MQTT_ENABLED=false \
    FERRY_HTTP_MAX_CONNECTIONS=4096 FERRY_LOG=warn \
        target/release/ferry run > "$work/ferry.out" 2> "$work/ferry.err" &
    pid=$!
    for _ in $(seq 100); do grep -q '^ready' "$work/ferry.out" 2>/dev/null && break; sleep 0.1; done
    addr=$(sed -n 's/^ready .*"http":"\([^"]*\)".*/\1/p' "$work/ferry.out")
}
wrk_run() {  # url script -> "req/s p50 p99"
    wrk -t2 -c"$conns" -d"${secs}s" --latency -s "$2" "$1" > "$work/wrk.out"
    rps=$(awk '/Requests\/sec/ {print $2}' "$work/wrk.out")
    p50=$(awk '$1 == "50%" {print $2}' "$work/wrk.out"); p99=$(awk '$1 == "99%" {print $2}' "$work/wrk.out")
    non2xx=$(awk '/Non-2xx/ {print $4}' "$work/wrk.out")
    echo "$rps $p50 $p99 ${non2xx:-0}"
}

echo "# $(uname -m), $(nproc) cores; wrk -t2 -c${conns} -d${secs}s"
echo "| target | req/s | readings/s | p50 | p99 | non-2xx |"
echo "|---|---:|---:|---:|---:|---:|"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/null_http "127.0.0.1:$port" > /dev/null 2>&1 &
npid=$!; sleep 0.5
read -r nrps np50 np99 nbad < <(wrk_run "http://127.0.0.1:$port" "$work/null.lua")
echo "| null axum handler | $nrps | – | $np50 | $np99 | $nbad |"
kill "$npid"
start_ferry
read -r srps sp50 sp99 sbad < <(wrk_run "http://$addr" "$work/single.lua")
echo "| ferry, 1 reading/request | $srps | ${srps%.*} | $sp50 | $sp99 | $sbad |"
kill "$pid"; wait "$pid" 2>/dev/null || true
start_ferry
read -r brps bp50 bp99 bbad < <(wrk_run "http://$addr" "$work/batch.lua")
echo "| ferry, 100 readings/request | $brps | $(python3 -c "print(int($brps * 100))") | $bp50 | $bp99 | $bbad |"
kill "$pid"; wait "$pid" 2>/dev/null || true
echo
python3 -c "print(f'single-reading ferry / null handler: {$srps / $nrps:.2f}x; batched: {$brps * 100:.0f} readings/s')"
