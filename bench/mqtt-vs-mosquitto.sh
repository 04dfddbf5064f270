#!/usr/bin/env bash
# QoS1 (or QoS0) ingest: ferry with durable acks against Debian's mosquitto with persistence
# off, driven by the same load generator (bench ferry-load), alternating runs on this machine.
# Prints one table with rates, the ratio, ack latency at half of ferry's max rate, and RSS.
#
#   bench/mqtt-vs-mosquitto.sh [SECS] [CLIENTS] [QOS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-10}; clients=${2:-50}; qos=${3:-1}; rounds=${4:-2}

command -v mosquitto >/dev/null || { echo "mosquitto is not installed (apt-get install mosquitto)" >&2; exit 1; }
cargo build --release -q --bin ferry -p ferry-gateway
cargo build --release -q --bin ferry-load -p ferry-bench
load="target/release/ferry-load mqtt"
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
rss_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }

start_ferry() {
    rm -rf "$work/ferry-data"
    FERRY_GATEWAY_DATA_DIR="$work/ferry-data" FERRY_MQTT_LISTEN="127.0.0.1:0" FERRY_HTTP_LISTEN="127.0.0.1:0" \
    FERRY_MQTT_MAX_CONNECTIONS=4096 FERRY_LOG=warn \
        target/release/ferry run > "$work/ferry.out" 2> "$work/ferry.err" &
    ferry_pid=$!
    for _ in $(seq 100); do grep -q '^ready' "$work/ferry.out" 2>/dev/null && break; sleep 0.1; done
    ferry_addr=$(sed -n 's/^ready .*"mqtt":"\([^"]*\)".*/\1/p' "$work/ferry.out")
}
start_mosquitto() {
    port=$(free_port)
    printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nmax_inflight_messages 0\nmax_queued_messages 0\n' "$port" > "$work/mosq.conf"
    mosquitto -c "$work/mosq.conf" 2> "$work/mosq.err" &
    mosq_pid=$!
    sleep 0.5
    mosq_addr="127.0.0.1:$port"
}
rate_of() { sed -n 's/.*"rate":\([0-9.]*\).*/\1/p'; }

echo "# $(uname -m), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(mosquitto -h 2>&1 | head -1)"
echo "# ${clients} clients, QoS ${qos}, 100-byte JSON, ${secs} s per run, ${rounds} alternating rounds"
echo "| run | target | msg/s | ack p50 ms | ack p99 ms | peak RSS MiB |"
echo "|---|---|---:|---:|---:|---:|"
fsum=0; msum=0
for r in $(seq "$rounds"); do
    start_ferry
    out=$($load "$ferry_addr" --clients "$clients" --secs "$secs" --qos "$qos" --json)
    f=$(echo "$out" | rate_of); rss=$(rss_kib "$ferry_pid")
    echo "| $r | ferry | ${f%.*} | $(echo "$out" | sed -n 's/.*"p50_ms":\([0-9.]*\).*/\1/p') | $(echo "$out" | sed -n 's/.*"p99_ms":\([0-9.]*\).*/\1/p') | $((rss / 1024)) |"
    kill "$ferry_pid"; wait "$ferry_pid" 2>/dev/null || true
    start_mosquitto
    out=$($load "$mosq_addr" --clients "$clients" --secs "$secs" --qos "$qos" --json)
    m=$(echo "$out" | rate_of); rss=$(rss_kib "$mosq_pid")
    echo "| $r | mosquitto | ${m%.*} | $(echo "$out" | sed -n 's/.*"p50_ms":\([0-9.]*\).*/\1/p') | $(echo "$out" | sed -n 's/.*"p99_ms":\([0-9.]*\).*/\1/p') | $((rss / 1024)) |"
    kill "$mosq_pid"; wait "$mosq_pid" 2>/dev/null || true
    fsum=$(python3 -c "print($fsum + $f)"); msum=$(python3 -c "print($msum + $m)")
done
echo
python3 -c "print(f'ferry / mosquitto QoS${qos} rate: {($fsum)/($msum):.2f}x (mean of ${rounds} rounds each)')"

# Ack latency at half of ferry's measured max rate (open loop).
half=$(python3 -c "print(int($fsum / $rounds / 2))")
start_ferry
out=$($load "$ferry_addr" --clients "$clients" --secs "$secs" --qos "$qos" --rate "$half" --json)
echo "ferry at half its max rate (${half} msg/s offered): $(echo "$out" | rate_of | cut -d. -f1) msg/s, ack p50 $(echo "$out" | sed -n 's/.*"p50_ms":\([0-9.]*\).*/\1/p') ms, p99 $(echo "$out" | sed -n 's/.*"p99_ms":\([0-9.]*\).*/\1/p') ms, peak RSS $(( $(rss_kib "$ferry_pid") / 1024 )) MiB"
kill "$ferry_pid"; wait "$ferry_pid" 2>/dev/null || true
