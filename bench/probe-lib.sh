# Shared by rss-probe.sh and stall-probe.sh (sourced, not run): starts one ferry.
#
#   start_ferry BIN_DIR WORK_DIR DATA_DIR
# starts ferry from BIN_DIR with its buffer in DATA_DIR, its config and output
# in WORK_DIR, waits for its ready line and sets: pid, mqtt, http. FERRY_* variables in the
# environment reach the gateway. mem 'VmRSS|RssAnon' prints those lines of its
# /proc/PID/status.
start_ferry() {
    local bin=$1 work=$2 data=$3
    : > "$work/ferry.toml"
    FERRY_GATEWAY_DATA_DIR="$data" FERRY_GATEWAY_ID=probe FERRY_MQTT_LISTEN=127.0.0.1:0 \
    FERRY_HTTP_LISTEN=127.0.0.1:0 FERRY_MQTT_MAX_CONNECTIONS=4096 \
    FERRY_LOG=warn "$bin/ferry" run --config "$work/ferry.toml" > "$work/out" 2> "$work/err" &
    pid=$!
    for _ in $(seq 200); do grep -q '^ready' "$work/out" && break; sleep 0.1; done
    mqtt=$(ready_addr "$work" mqtt)
    http=$(ready_addr "$work" http)
}

ready_addr() {
    sed -n 's/^ready //p' "$1/out" | python3 -c "import json,sys; print(json.load(sys.stdin)['$2'])"
}

mem() { grep -E "^($1):" "/proc/$pid/status" | awk '{printf "%s %s kB  ", $1, $2}'; }
