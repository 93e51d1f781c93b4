#!/usr/bin/env bash
# Runs every test: sets up the host, builds the test guest (cached), checks formatting and
# lints, runs the unit, KVM and end-to-end tests. Prints each step's wall time.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
t0=$SECONDS
step() { echo "=== $* (t=$((SECONDS - t0))s)" >&2; }

step "host packages"
bash scripts/setup-host.sh
step "guest image"
bash resources/guest/build.sh >&2
step "format"
cargo fmt --all -- --check
(cd tests/guest-agent && cargo fmt -- --check)
(cd fuzz && cargo fmt -- --check)
step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
(cd tests/guest-agent && cargo clippy --all-targets -- -D warnings)
(cd fuzz && cargo clippy --no-default-features --all-targets -- -D warnings)
step "unit and KVM tests"
cargo build --workspace
cargo test --workspace --exclude e2e
(cd tests/guest-agent && cargo test)
step "fuzz corpus replay"
# Every committed fuzz corpus and regression input through its target, as a plain test (no
# libFuzzer: a cold `cargo install cargo-fuzz` alone takes minutes). scripts/fuzz.sh fuzzes.
bash scripts/fuzz.sh --replay
step "command-line tests"
cargo test -p e2e --test cli --test boot_timeline
step "guest boot tests"
# One boot at a time: the host has 2 cores and boot times are reported.
cargo test -p e2e --test boot -- --test-threads=1 --nocapture
step "bench-fio (one configuration, 3 s)"
cargo test -p e2e --test bench_fio -- --test-threads=1 --nocapture
step "done"
