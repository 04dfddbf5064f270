#!/usr/bin/env bash
# Memory of one ferry under an MQTT load while its disk stalls: the buffer lives on a
# filesystem that this script freezes (fsfreeze) for a while in the middle of the load, so
# commits hang as on a stalling SD card. Prints peak RSS, how often connections paused for
# buffer.max_pending_bytes, and the ack latency.
#
#   bench/stall-probe.sh MOUNT CLIENTS RATE SECS FREEZE_AT FREEZE_SECS [BIN_DIR]
#   bench/stall-probe.sh /mnt/fimg 1000 10000 20 5 3
#
# MOUNT must be a filesystem of its own that may be frozen: freezing the root filesystem
# would stall the whole machine. As root, for example:
#   truncate -s 512M /var/tmp/fimg.img && mkfs.ext4 -q -F /var/tmp/fimg.img
#   mkdir -p /mnt/fimg && mount -o loop /var/tmp/fimg.img /mnt/fimg
# BIN_DIR holds ferry and ferry-load (default target/release). FERRY_*
# variables in the environment reach the gateway, e.g. FERRY_BUFFER_MAX_PENDING_BYTES.
set -euo pipefail
. "$(dirname "$0")/probe-lib.sh"
mount=${1:?MOUNT}; clients=${2:?CLIENTS}; rate=${3:?RATE}; secs=${4:?SECS}
freeze_at=${5:?FREEZE_AT}; freeze_secs=${6:?FREEZE_SECS}
bin=${7:-"$(dirname "$0")/../target/release"}
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
mountpoint -q "$mount" || { echo "$mount is not a mount point" >&2; exit 2; }
d=$(mktemp -d)
data=$(mktemp -d "$mount/stall-probe.XXXXXX")
pid=""
cleanup() {
    fsfreeze -u "$mount" 2>/dev/null || true
    [ -n "$pid" ] && kill "$pid" 2>/dev/null
    rm -rf "$d" "$data"
}
trap cleanup EXIT
start_ferry "$bin" "$d" "$data"
echo "idle:  $(mem 'VmRSS|RssAnon')"
"$bin/ferry-load" mqtt "$mqtt" --clients "$clients" --rate "$rate" --secs "$secs" > "$d/load" 2>&1 &
load=$!
sleep "$freeze_at"
fsfreeze -f "$mount"
echo "frozen for ${freeze_secs} s: $(mem 'VmRSS')"
sleep "$freeze_secs"
echo "at thaw: $(mem 'VmRSS|VmHWM')"
fsfreeze -u "$mount"
wait "$load"
echo "load:  $(tail -1 "$d/load")"
echo "after: $(mem 'VmHWM|VmRSS|RssAnon')"
curl -s "http://$http/metrics" | grep -E "^ferry_mqtt_read_pauses_total|^ferry_readings_received_total|^ferry_mqtt_ack_latency_seconds\{quantile=\"(0.99|1)\"\}|^ferry_mqtt_rejected_total" || true
