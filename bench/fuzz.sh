#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for N seconds each, one at a time (one process), and prints the
# libFuzzer summary (execs, exec/s, coverage) of each.
#
#   bench/fuzz.sh [SECONDS] [TARGET...]      default: 180 s, all four targets
#   FUZZ_RUNS=1000000 bench/fuzz.sh 7200     stop each target after 1M executions instead
#
# Needs only the stable toolchain: RUSTC_BOOTSTRAP=1 lets stable rustc take the -Z flags
# cargo-fuzz passes (ASan, sanitizer coverage). Set FUZZ_SANITIZER=none to build without ASan.
# New corpus entries land in fuzz/corpus/<target>/; minimize before committing with
#   (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz cmin <target>)
# A crash is saved under fuzz/artifacts/<target>/ and the script exits non-zero.
#
# http_body and mqtt_session link the gateway, built without its `kafka` feature (librdkafka's
# configure script fails under cargo-fuzz: "Argument list too long" from mklove); their
# proptest twins run in `cargo test -p ferry-gateway --lib testkit` (PROPTEST_CASES=N).
set -euo pipefail

secs=${1:-180}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(segment_decode config_load http_body mqtt_session)
sanitizer=${FUZZ_SANITIZER:-address}

cd "$(dirname "$0")/../fuzz"
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz

status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log=$(mktemp)
    echo "== $t: ${secs}s, sanitizer=$sanitizer"
    # -malloc_limit_mb: a single allocation above 256 MiB is a bug (segment_decode's lying
    # body length); -timeout: one input taking 30 s is a hang.
    features=()
    case $t in http_body | mqtt_session) features=(--features gateway) ;; esac
    runs=()
    [ -z "${FUZZ_RUNS:-}" ] || runs=(-runs="$FUZZ_RUNS")
    if ! cargo fuzz run -s "$sanitizer" "${features[@]}" "$t" "corpus/$t" -- \
        -max_total_time="$secs" "${runs[@]}" -timeout=30 -rss_limit_mb=2048 \
        -malloc_limit_mb=256 -print_final_stats=1 >"$log" 2>&1; then
        status=1
        echo "   FAILED; see $log"
        grep -E "ERROR|panicked|SUMMARY|artifact" "$log" | head -n 20 || true
    fi
    grep -E "^#[0-9]+[[:space:]]+DONE" "$log" || tail -n 3 "$log"
    grep -E "^stat::number_of_executed_units|^stat::average_exec_per_sec" "$log" || true
    echo "   corpus: $(find "corpus/$t" -type f | wc -l) files; log: $log"
done
exit $status
