#!/usr/bin/env bash
# Smoke-test a cross-built ferry under qemu-user: --version, check-config on the packaged
# config, a short run that ingests one reading over HTTP and finds it with
# `ferry buffer stats`, and a run that forwards one reading to Kafka (librdkafka's
# in-process mock cluster, zstd) and waits for its ack. Prints the idle RSS under qemu next
# to the native binary's.
#
#   deploy/qemu-smoke.sh aarch64-unknown-linux-gnu [BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
target="${1:?usage: deploy/qemu-smoke.sh TARGET [BINARY]}"
bin="${2:-${CARGO_TARGET_DIR:-target}/$target/release/ferry}"
case "$target" in
    aarch64-unknown-linux-gnu)     qemu=qemu-aarch64-static; prefix=/usr/aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) qemu=qemu-arm-static;     prefix=/usr/arm-linux-gnueabihf ;;
    *) echo "unsupported target: $target" >&2; exit 2 ;;
esac
if ! command -v "$qemu" >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends qemu-user-static >/dev/null
fi
export QEMU_LD_PREFIX="$prefix"
run() { "$qemu" "$bin" "$@"; }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT

command -v file >/dev/null && echo "== $(file -b "$bin" | cut -d, -f1-2)"
echo "== ferry --version: $(run --version)"
run check-config deploy/ferry.toml

start_and_idle() {   # $1: command prefix ("" for native), $2: binary, [$3: config]; prints "pid addr"
    FERRY_GATEWAY_DATA_DIR="$work/data" FERRY_HTTP_LISTEN=127.0.0.1:0 FERRY_MQTT_LISTEN=127.0.0.1:0 \
    FERRY_UPLINKS_KAFKA_ENABLED="${KAFKA:-false}" FERRY_LOG=warn \
        $1 "$2" run --config "${3:-deploy/ferry.toml}" > "$work/out" 2> "$work/err" &
    local pid=$!
    for _ in $(seq 300); do grep -q '^ready' "$work/out" 2>/dev/null && break; sleep 0.1; done
    grep -q '^ready' "$work/out" || { echo "ferry did not become ready:"; cat "$work/err"; exit 1; }
    echo "$pid $(sed -n 's/^ready .*"http":"\([^"]*\)".*/\1/p' "$work/out")"
}

stopped() {   # waits for a process that is not our child to exit
    for _ in $(seq 300); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
    echo "ferry (pid $1) did not stop within 30 s of SIGTERM"; exit 1
}

read -r pid addr < <(start_and_idle "$qemu" "$bin")
code=$(curl -s -o "$work/resp" -w '%{http_code}' -X POST -H 'content-type: application/json' \
    --data '{"temp":21.5}' "http://$addr/v1/readings/site/pi/temp")
[ "$code" = 202 ] || { echo "POST answered $code: $(cat "$work/resp")"; exit 1; }
echo "== POST /v1/readings/site/pi/temp: $code $(cat "$work/resp")"
sleep 3
rss_qemu=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
kill -TERM "$pid"; stopped "$pid"
stats=$(run buffer stats --data-dir "$work/data" --json)
echo "$stats" | grep -q '"readings": 1' || { echo "buffer stats do not show the reading: $stats"; exit 1; }
echo "== ferry buffer stats: 1 reading stored"

# The bundled librdkafka on the target: its mock cluster stands in for the brokers.
rm -rf "$work/data" "$work/out"
cp deploy/ferry.toml "$work/kafka.toml"
printf '\n[uplinks.kafka.librdkafka]\n"test.mock.num.brokers" = "1"\n' >> "$work/kafka.toml"
read -r kpid kaddr < <(KAFKA=true start_and_idle "$qemu" "$bin" "$work/kafka.toml")
curl -s -o /dev/null -X POST -H 'content-type: application/json' --data '{"temp":21.5}' \
    "http://$kaddr/v1/readings/site/pi/temp"
for _ in $(seq 300); do
    curl -s "http://$kaddr/api/status" | grep -q '"acked_total":1' && break; sleep 0.1
done
curl -s "http://$kaddr/api/status" | grep -q '"acked_total":1' \
    || { echo "Kafka (mock cluster) did not acknowledge the reading:"; cat "$work/err"; exit 1; }
kill -TERM "$kpid"; stopped "$kpid"
echo "== Kafka uplink (librdkafka mock cluster, zstd): 1 reading acknowledged"

native="${NATIVE_FERRY:-${CARGO_TARGET_DIR:-target}/release/ferry}"
if [ -x "$native" ]; then
    rm -rf "$work/data" "$work/out"
    read -r npid _ < <(start_and_idle "" "$native")
    sleep 3
    rss_native=$(awk '/VmRSS/ {print $2}' "/proc/$npid/status")
    kill -TERM "$npid"; stopped "$npid"
    echo "== idle RSS: $target under qemu ${rss_qemu} KiB (includes the emulator), x86-64 native ${rss_native} KiB"
else
    echo "== idle RSS: $target under qemu ${rss_qemu} KiB (includes the emulator); no native release binary to compare"
fi
echo "qemu smoke test passed"
