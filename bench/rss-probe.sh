#!/usr/bin/env bash
# Memory and disk writes of one ferry under an MQTT load, split the way /proc tells them:
# RssAnon (ferry's own heap) against RssFile (the binary's and libraries' pages), peak RSS, bytes
# written, and how well commits grouped. Used for the per-connection figures in BENCHMARKS.md.
#
#   bench/rss-probe.sh CLIENTS RATE SECS [BIN_DIR]
#   bench/rss-probe.sh 1000 200 10        # 1,000 nearly idle connections: cost per connection
#   bench/rss-probe.sh 1000 10000 20      # scenario 5's load
#   OUTAGE=1 bench/rss-probe.sh 100 3000 60   # the same with a Kafka uplink whose broker
#                                             # is unreachable (a site whose link is down)
#
# BIN_DIR holds ferry and ferry-load (default target/release; build them with
# `cargo build --release -p ferry-gateway -p ferry-bench`). FERRY_* variables in the environment reach the
# gateway, e.g. FERRY_BUFFER_CACHE_BYTES=1048576.
set -euo pipefail
. "$(dirname "$0")/probe-lib.sh"
if [ "${OUTAGE:-0}" = 1 ]; then
    # Nothing listens on port 1: every connection is refused, as when a site's link is down.
    export FERRY_UPLINKS_KAFKA_TYPE=kafka FERRY_UPLINKS_KAFKA_BROKERS=127.0.0.1:1
fi
clients=${1:?CLIENTS}; rate=${2:?RATE}; secs=${3:?SECS}
bin=${4:-"$(dirname "$0")/../target/release"}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
d=$(mktemp -d)
pid=""
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$d"' EXIT
start_ferry "$bin" "$d" "$d/data"
echo "idle:  $(mem 'VmRSS|RssAnon|RssFile')"
"$bin/ferry-load" mqtt "$mqtt" --clients "$clients" --rate "$rate" --secs "$secs" > "$d/load" 2>&1
echo "load:  $(tail -1 "$d/load")"
echo "after: $(mem 'VmHWM|VmRSS|RssAnon|RssFile')"
echo "disk:  $(grep -E '^write_bytes' "/proc/$pid/io")"
curl -s "http://$http/metrics" | grep -E "^ferry_buffer_commits_total|^ferry_readings_received_total|^ferry_buffer_commit_duration_seconds\{quantile=\"(0.99|0.999|1)\"\}|^ferry_mqtt_ack_latency_seconds\{quantile=\"0.99\"\}" || true
