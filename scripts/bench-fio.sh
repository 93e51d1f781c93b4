#!/usr/bin/env bash
# fio benchmark: boots the test guest once per configuration and runs fio jobs inside it.
# Matrix: transport {mmio, pci once the VMM has it} x IOMMU {off, lazy, strict} x interrupt
# remapping {off, on}, plus the same fio jobs under QEMU where an equivalent exists
# (virtio-blk-pci without IOMMU, behind virtio-iommu-pci lazy/strict, behind
# intel-iommu,intremap=on with split irqchip), when qemu-system-x86_64 is installed.
# Default jobs: 4 KiB randread and randwrite (libaio, iodepth 32), then psync iodepth 1 for
# latency, time-based, JSON output; --fio "ARGS" replaces them (fio's own options, on
# /dev/vda). Per configuration: IOPS, bandwidth, clat p50/p99 and, from the VMM's counters
# between the guest's marks around the fio run, register exits, interrupts, MAP/UNMAP
# requests and VMM CPU time per I/O.
# Writes OUT/results.json, OUT/results.md (the table, also printed) and OUT/results.png.
#
#   scripts/bench-fio.sh [--out DIR] [--runtime SECS] [--transports mmio,pci]
#                        [--iommu off,lazy,strict] [--remap off,on] [--no-qemu]
#                        [--repeat N] [--fio "ARGS"] [--ab BASE_RESULTS_JSON]
#   scripts/bench-fio.sh --compare BASE_JSON NEW_JSON
#
# --ab BASE_JSON (with --repeat >= 5, and a base made with >= 5 repeats) flags a metric only
# when an exact permutation test gives p < 0.01 and the means differ by >= 5 %, as
# Firecracker's A/B tool does; exit 1 if any metric regressed.
# On a PVM host (guest kernel code emulated) absolute IOPS measure the emulator; the per-I/O
# counts are exact.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
if [[ "${1:-}" == --compare ]]; then
  exec /usr/bin/python3 "$root/scripts/bench-fio.py" compare "$2" "$3"
fi
out="$root/target/bench-fio"
args=()
while (($#)); do
  case $1 in
    --out) out=$2; shift 2 ;;
    --transports)
      # pci needs `--disk ...,transport=pci`: skip it with a note until the VMM has it.
      if [[ $2 == *pci* ]] && ! "${VMM_BIN:-$root/target/release/vmm}" --help 2>/dev/null | grep -q transport; then
        echo "bench-fio: this vmm has no --disk transport=pci yet: running mmio only" >&2
        args+=(--transports mmio)
      else
        args+=(--transports "$2")
      fi
      shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
command -v gnuplot >/dev/null || {
  echo "bench-fio: installing gnuplot-nox for the chart" >&2
  sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q gnuplot-nox >&2 # env: sudo drops it otherwise
}
guest="$(bash resources/guest/build.sh | tail -n1)"
if [[ -z "${VMM_BIN:-}" ]]; then
  cargo build --release --bin vmm >&2
fi
exec /usr/bin/python3 "$root/scripts/bench-fio.py" run --guest "$guest" \
  --vmm "${VMM_BIN:-$root/target/release/vmm}" --out "$out" "${args[@]}"
