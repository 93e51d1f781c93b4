#!/usr/bin/env bash
# Coverage-guided fuzzing of the device models (cargo fuzz / libFuzzer, fuzz/).
#
#   scripts/fuzz.sh [SECONDS]      run every target for SECONDS each (default 60), one at a
#                                  time at nice 19, and print: target, execs, execs/s,
#                                  coverage (edges / features), corpus, crashes, timeouts
#   scripts/fuzz.sh --replay       replay the committed corpora (fuzz/corpus, fuzz/regressions)
#                                  through every target as a plain `cargo test` (no libFuzzer,
#                                  no cargo-fuzz needed; what CI runs)
#   FUZZ_TARGETS="ioapic remap_unit" scripts/fuzz.sh 30     only these targets
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
targets="${FUZZ_TARGETS:-$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^vmm-fuzz$')}"
command -v cargo-fuzz >/dev/null || { echo "fuzz.sh: needs cargo-fuzz (cargo install cargo-fuzz)" >&2; exit 1; }

nice -n 19 cargo fuzz build -s none >&2
mkdir -p work logs
rows=()
for t in $targets; do
    mkdir -p "work/$t" "artifacts/$t"
    before_crash=$(find "artifacts/$t" -name 'crash-*' | wc -l)
    before_timeout=$(find "artifacts/$t" -name 'timeout-*' -o -name 'oom-*' | wc -l)
    log="logs/$t.log"
    echo "fuzz.sh: $t for ${secs}s" >&2
    set +e
    nice -n 19 cargo fuzz run -s none "$t" "work/$t" "corpus/$t" -- \
        -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        >"$log" 2>&1
    rc=$?
    set -e
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
    rows+=("$(printf '%-14s %12s %9s %7s %8s %6s %8s %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes" "$timeouts")")
done
printf '%-14s %12s %9s %7s %8s %6s %8s %s\n' target execs execs/s edges features corpus crashes timeouts
printf '%s\n' "${rows[@]}"
