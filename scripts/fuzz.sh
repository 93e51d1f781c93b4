#!/usr/bin/env bash
# Coverage-guided fuzzing of the device models (cargo fuzz / libFuzzer, fuzz/).
#
#   scripts/fuzz.sh [SECONDS]      run every target for SECONDS each (default 60), one at a
#                                  time at nice 19, and print: target, execs, execs/s,
#                                  coverage (edges / features), corpus, crashes, timeouts
#   scripts/fuzz.sh --runs N       run every target for exactly N executions (libFuzzer -runs),
#                                  however long that takes; the table adds wall seconds
#   scripts/fuzz.sh --replay       replay the committed corpora (fuzz/corpus, fuzz/regressions)
#                                  through every target as a plain `cargo test` (no libFuzzer,
#                                  no cargo-fuzz needed; what CI runs)
#   FUZZ_TARGETS="ioapic remap_unit" scripts/fuzz.sh 30     only these targets
#   FUZZ_MAX_LEN=1024 scripts/fuzz.sh 30                       one -max_len for every target
#   FUZZ_TRACE_COMPARES=1 scripts/fuzz.sh 30                   with libFuzzer's comparison
#                                  tracing (cargo fuzz's default; 2-3.5x fewer execs/s here)
#
# By default the targets are built with `--no-trace-compares` into fuzz/target/ntc: the
# `__sanitizer_cov_trace_cmp*` hooks on every comparison in vm-memory's and the models' loops
# cost more than the models themselves, and the targets' inputs pick operations with `% n`
# and small constants, which mutation finds without comparison operands (same or better
# coverage per minute in measurements, see fuzz/README.md).
#
# execs/s is wall-clock (what libFuzzer prints); execs/cpu-s divides by the CPU time the
# fuzzer used, which stays meaningful on a loaded machine (nice 19 gets what is left).
# Each target runs with its own -max_len (max_len_of below): the longest input that still
# reaches its deep states, so executions stay short (see fuzz/README.md for the figures).
#
# Needs `cargo install cargo-fuzz`. The stable toolchain has no sanitizers, so targets are
# built with `-s none` (coverage instrumentation, debug assertions and overflow checks on);
# memory errors stay impossible by construction (the device models have no `unsafe`). New
# inputs go to fuzz/work/TARGET (not committed); crashes and timeouts to fuzz/artifacts/TARGET.
# A crash becomes a file in fuzz/regressions/TARGET/ and a test named after it.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root/fuzz"

if [[ "${1:-}" == "--replay" ]]; then
    exec cargo test --no-default-features --test corpus -- --nocapture
fi

secs="${1:-60}"
limit=(-max_total_time="$secs")
if [[ "$secs" == "--runs" ]]; then
    [[ "${2:-}" =~ ^[0-9]+$ ]] || { echo "fuzz.sh: --runs needs a number of executions" >&2; exit 2; }
    limit=(-runs="$2")
fi
targets="${FUZZ_TARGETS:-$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^vmm-fuzz$')}"
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: needs cargo-fuzz (cargo install cargo-fuzz)" >&2; exit 1; }

# The input length cap per target: long enough for a bring-up plus a few dozen operations.
max_len_of() {
    case "$1" in
        virtio_blk | virtio_iommu) echo 512 ;;
        remap_unit) echo 2048 ;;
        *) echo 1024 ;;
    esac
}

# User + system seconds of all children so far, into $cpu_now: bash `times` (second line),
# run in this shell (a command substitution would report its own subshell).
child_cpu() {
    local t
    t=$(mktemp)
    times >"$t"
    cpu_now=$(tail -1 "$t" | awk '{
        t = 0
        for (i = 1; i <= 2; i++) { split($i, a, "m"); sub("s", "", a[2]); t += a[1] * 60 + a[2] }
        printf "%.2f", t
    }')
    rm -f "$t"
}

build_flags=(-s none)
if [[ -z "${FUZZ_TRACE_COMPARES:-}" ]]; then
    build_flags+=(--no-trace-compares --target-dir target/ntc)
fi
nice -n 19 cargo fuzz build "${build_flags[@]}" >&2
mkdir -p work logs
rows=()
for t in $targets; do
    mkdir -p "work/$t" "artifacts/$t"
    before_crash=$(find "artifacts/$t" -name 'crash-*' | wc -l)
    before_timeout=$(find "artifacts/$t" -name 'timeout-*' -o -name 'oom-*' | wc -l)
    log="logs/$t.log"
    echo "fuzz.sh: $t (${limit[*]})" >&2
    max_len="${FUZZ_MAX_LEN:-$(max_len_of "$t")}"
    child_cpu
    cpu0=$cpu_now
    wall0=$SECONDS
    set +e
    nice -n 19 cargo fuzz run "${build_flags[@]}" "$t" "work/$t" "corpus/$t" -- \
        "${limit[@]}" -max_len="$max_len" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1
    rc=$?
    set -e
    wall=$((SECONDS - wall0))
    child_cpu
    cpu=$(awk -v a="$cpu0" -v b="$cpu_now" 'BEGIN { printf "%.2f", b - a }')
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    last=$(grep -E '^#[0-9]+' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
    ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
    corp=$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")
    crashes=$(( $(find "artifacts/$t" -name 'crash-*' | wc -l) - before_crash ))
    timeouts=$(( $(find "artifacts/$t" -name 'timeout-*' -o -name 'oom-*' | wc -l) - before_timeout ))
    if [[ $rc -ne 0 && $crashes -eq 0 && $timeouts -eq 0 ]]; then
        crashes="? (rc $rc, see fuzz/$log)"
    fi
    cpu_rate=$(awk -v e="${execs:-0}" -v c="$cpu" 'BEGIN { if (c > 0) printf "%d", e / c; else print "?" }')
    rows+=("$(printf '%-14s %12s %7s %9s %11s %7s %7s %8s %6s %8s %s' "$t" "${execs:-?}" "$wall" "${rate:-?}" "$cpu_rate" "$max_len" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes" "$timeouts")")
done
printf '%-14s %12s %7s %9s %11s %7s %7s %8s %6s %8s %s\n' target execs secs execs/s execs/cpu-s max_len edges features corpus crashes timeouts
printf '%s\n' "${rows[@]}"
